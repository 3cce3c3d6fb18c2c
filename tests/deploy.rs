//! What `deploy/` ships, checked without a cluster: the Grafana dashboard loads, queries only
//! metrics the farm exports (`longtake_proto::telemetry::metric`, which the cluster test
//! `metrics_of_both_daemons_move_as_a_job_runs` finds in real scrapes), covers what an SRE
//! watches, and every query is PromQL that Prometheus parses (`promtool check rules`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use longtake_proto::telemetry::metric;
use serde_json::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the cli crate lives in the repository")
        .to_path_buf()
}

fn dashboard() -> Value {
    let path = repository().join("deploy/grafana/longtake.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel with queries (rows hold none), nested rows included.
fn query_panels(panels: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    for panel in panels.as_array().expect("panels is a list") {
        if panel["type"] == "row" {
            found.extend(query_panels(&panel["panels"]));
        } else {
            found.push(panel);
        }
    }
    found
}

/// The metric names an expression reads (`_bucket`, `_sum` and `_count` stand for their
/// histogram).
fn metrics_read(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    let next = |rest: &str| {
        ["longtake_", "process_"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min()
    };
    while let Some(at) = next(rest) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| metric::ALL.contains(base))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_queries_only_exported_metrics_and_covers_the_farm() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "longtake-farm");
    let panels = query_panels(&dashboard["panels"]);
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut read = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let names = metrics_read(expr);
            assert!(
                !names.is_empty(),
                "panel {title} reads no longtake metric: {expr}"
            );
            for name in &names {
                assert!(
                    metric::ALL.contains(&name.as_str()),
                    "panel {title} reads {name}, which the farm does not export: {expr}"
                );
            }
            read.extend(names);
        }
    }
    // queue, throughput, step time by layout, exchange bytes, worker fleet, failures
    for needed in [
        metric::QUEUE_DEPTH,
        metric::JOBS_ENDED,
        metric::TOKENS,
        metric::STEP_SECONDS,
        metric::EXCHANGE_BYTES,
        metric::WORKERS,
        metric::REQUEUES,
    ] {
        assert!(read.contains(needed), "no panel shows {needed}");
    }
    let by_layout = panels.iter().any(|p| {
        p["targets"].as_array().unwrap().iter().any(|t| {
            let expr = t["expr"].as_str().unwrap();
            expr.contains(metric::STEP_SECONDS)
                && ["cfg", "tp", "ulysses", "ring"]
                    .iter()
                    .all(|l| expr.contains(l))
        })
    });
    assert!(by_layout, "no panel shows the step time by layout");
}

/// Each query as a recording rule: `promtool check rules` parses every expression with
/// Prometheus's own PromQL parser.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let dashboard = dashboard();
    let mut rules = String::from("groups:\n  - name: longtake-dashboard\n    rules:\n");
    for (i, panel) in query_panels(&dashboard["panels"]).iter().enumerate() {
        for (j, target) in panel["targets"].as_array().unwrap().iter().enumerate() {
            let expr = target["expr"].as_str().unwrap();
            rules.push_str(&format!(
                "      - record: longtake:dashboard_{i}_{j}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install it with tests/setup.sh (Debian: apt-get install prometheus)")
        });
    assert!(
        out.status.success(),
        "promtool refused a query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Helm chart renders (Helm's own engine, offline) for the default values and for
/// `values-gpu.yaml`, its values pass `values.schema.json`, and every rendered object is valid
/// against the Kubernetes schemas: `deploy/helm/check_chart.py`, which says what it checked.
#[test]
fn the_helm_chart_renders_and_every_object_validates() {
    let script = repository().join("deploy/helm/check_chart.py");
    let out = Command::new("python3")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("ModuleNotFoundError"),
        "install the chart checker's packages with tests/setup.sh (pip: helm-python-sdk \
         kubernetes-validate pyyaml):\n{said}"
    );
    assert!(out.status.success(), "{said}");
    for expected in [
        "default values: longtake/templates/worker.yaml: Deployment farm-longtake-worker: valid",
        "values-gpu.yaml: longtake/templates/worker.yaml: ScaledObject farm-longtake-worker: valid",
        "values-gpu.yaml: longtake/templates/etcd.yaml: StatefulSet farm-longtake-etcd: valid",
        "an HPA on queue depth: longtake/templates/worker.yaml: HorizontalPodAutoscaler farm-longtake-worker: valid",
        "keda and hpa together are refused",
        "values.schema.json refuses worker.device=tpu",
    ] {
        assert!(said.contains(expected), "{expected:?} not in:\n{said}");
    }
}
