//! The render farm as separate OS processes: a real etcd, `longtake serve coordinator`, two or
//! more `longtake serve worker` daemons and the `longtake` CLI, all talking over loopback
//! sockets. Renders are checked by decoding them and by comparing them with the embedded
//! single-process `longtake render` of the same spec.
//!
//! Every wait has a deadline and says what it waited for; the farms run one at a time (see
//! `support::farm`).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cli::{embedded_render, field, number, spec, spec_of, strs};
use support::farm::Farm;
use support::media::{max_diff, png_frames, probe};
use support::poll::MIN_HANG_GUARD;

/// Hang guard for a small job on a loaded two-core machine (a failure turns a hang into a
/// message, it never checks speed).
const JOB: Duration = Duration::from_secs(120);
/// A job that must still be running while the test acts on it (cancel, drain): 33 frames at
/// 128×128 take ~0.14 s a step on a loaded two-core machine, so `steps` of them are seconds of
/// work (the coordinator's default limit is 200 steps).
fn long_spec(steps: u32) -> Vec<String> {
    spec_of("33", "128x128", steps)
}

fn ids(jobs: &[Value]) -> Vec<String> {
    jobs.iter().map(|j| field(j, "id").to_string()).collect()
}

fn workers_of(job: &Value) -> Vec<String> {
    job["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers array in {job}"))
        .iter()
        .map(|w| w.as_str().expect("worker ids are strings").to_string())
        .collect()
}

#[test]
fn a_submitted_job_completes_and_equals_the_single_process_render() {
    // No worker yet: the job waits in the queue until the watch has begun.
    let mut farm = Farm::start();

    // MP4 through submit, watch and fetch. The watch attaches while the job is queued (its
    // first line), and only then do the workers start: every step is in the watch.
    let id = farm.submit(&spec(3), &["--name", "wolf"]);
    let mut watch = farm.spawn_cli("watch", &["watch", &id, "--json"]);
    watch.wait_for_line("{", JOB);
    farm.start_worker("w1", &[]);
    farm.start_worker("w2", &[]);
    let status = watch.wait_exit(JOB);
    assert!(status.success(), "{}", watch.logs());
    let events: Vec<Value> = watch
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events[0]["state"], "queued", "{}", watch.logs());
    let last = events.last().expect("at least the first line");
    assert_eq!(
        (&last["event"], &last["state"]),
        (&"done".into(), &"done".into()),
        "watch ends with the done event: {}",
        watch.logs()
    );
    // Every step of the job, in order (step 0 is the job starting to run).
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .map(|e| number(e, "step"))
        .filter(|&s| s > 0)
        .collect();
    assert_eq!(steps, [1, 2, 3], "step events: {}", watch.logs());
    let job = farm.job(&id);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(field(&job, "name"), "wolf");
    assert_eq!(
        (number(&job, "steps_done"), number(&job, "steps_total")),
        (3, 3)
    );
    assert_eq!(number(&job, "attempts"), 1, "{job}");
    assert_eq!(workers_of(&job).len(), 1, "{job}");
    let (submitted, started, finished) = (
        number(&job, "submitted_at_ms"),
        number(&job, "started_at_ms"),
        number(&job, "finished_at_ms"),
    );
    assert!(
        submitted > 0 && submitted <= started && started <= finished,
        "{job}"
    );
    let clip = farm.path("wolf.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(
        std::fs::metadata(&clip).unwrap().len(),
        number(&job, "output_bytes"),
        "fetched size vs the job's output_bytes"
    );
    let stream = probe(&clip);
    assert_eq!(stream["codec_name"], "h264", "{stream}");
    assert_eq!(stream["nb_read_frames"], "9", "{stream}");
    assert_eq!(
        (stream["width"].as_u64(), stream["height"].as_u64()),
        (Some(64), Some(64))
    );

    // PNG through `render --coordinator`: exactly the embedded single-process frames.
    let mut png = spec(3);
    png.extend(["--format", "png"].map(String::from));
    let reference = farm.path("reference");
    let mut args = strs(&png);
    args.extend(["--out", reference.to_str().unwrap()]);
    embedded_render(&args);
    let expected = png_frames(&reference);
    assert_eq!(expected.len(), 9);

    let one_rank = farm.path("one-rank");
    let mut args = vec!["render"];
    args.extend(strs(&png));
    args.extend(["--out", one_rank.to_str().unwrap()]);
    farm.cli(&args).ok();
    let frames = png_frames(&one_rank);
    assert_eq!(frames.len(), expected.len());
    assert!(
        frames == expected,
        "a one-rank farm render must equal the single-process one (max |diff| {})",
        max_diff(&frames, &expected)
    );

    // cfg=2 on both workers: within rounding of the single-process frames.
    let two_ranks = farm.path("cfg2");
    let mut args = vec!["render", "--layout", "cfg=2"];
    args.extend(strs(&png));
    args.extend(["--out", two_ranks.to_str().unwrap()]);
    farm.cli(&args).ok();
    let worst = max_diff(&png_frames(&two_ranks), &expected);
    assert!(
        worst <= 2,
        "cfg=2 on two workers: max |diff| {worst} levels"
    );
    let jobs = farm.jobs();
    let cfg2 = jobs
        .iter()
        .find(|j| j["spec"]["layout"] == "cfg=2,tp=1,ulysses=1,ring=1")
        .unwrap_or_else(|| panic!("no cfg=2 job listed: {jobs:?}"));
    let mut ranks = workers_of(cfg2);
    ranks.sort();
    assert_eq!(ranks, ["w1", "w2"], "{cfg2}");
    assert_eq!(jobs.len(), 3, "three jobs were submitted: {jobs:?}");
}

#[test]
fn workers_appear_and_leave_when_stopped_or_killed() {
    let mut farm = Farm::start();
    assert_eq!(farm.worker_states(), vec![], "no worker yet");

    // A lease far longer than the hang guard of the wait for it to go: if w1 is gone within
    // that guard after SIGTERM, it left by itself (no lease expired).
    farm.start_worker("w1", &["--lease-ttl", "300"]);
    farm.wait_until("w1 listed idle", JOB, || {
        let states = farm.worker_states();
        (states == [("w1".into(), "idle".into())])
            .then_some(())
            .ok_or(format!("{states:?}"))
    });
    let listed = farm.workers();
    let w1 = &listed[0];
    assert!(field(w1, "address").starts_with("127.0.0.1:"), "{w1}");
    assert!(
        w1["models"].to_string().contains("tiny"),
        "w1 serves the tiny model: {w1}"
    );
    assert!(
        w1["devices"].as_array().is_some_and(|d| !d.is_empty()),
        "{w1}"
    );
    assert!(number(w1, "memory_bytes") > 0, "{w1}");

    let id = farm.submit(&long_spec(50), &[]);
    farm.wait_running(&id, JOB);
    farm.start_worker("w2", &[]);
    farm.wait_until("w1 busy with the job, w2 idle", JOB, || {
        let workers = farm.workers();
        let states: Vec<_> = workers
            .iter()
            .map(|w| (field(w, "id"), field(w, "state"), field(w, "job_id")))
            .collect();
        (states.len() == 2
            && states.contains(&("w1", "busy", id.as_str()))
            && states.contains(&("w2", "idle", "")))
        .then_some(())
        .ok_or(format!("{states:?}"))
    });

    // SIGTERM: w1 drains (finishes its job, takes no other), then leaves at once.
    farm.worker("w1").terminate();
    farm.wait_until("w1 draining", JOB, || {
        let states = farm.worker_states();
        states
            .contains(&("w1".into(), "draining".into()))
            .then_some(())
            .ok_or(format!("{states:?}"))
    });
    let job = farm.wait_done(&id, JOB);
    assert_eq!(
        (workers_of(&job), number(&job, "attempts")),
        (vec!["w1".to_string()], 1),
        "the draining worker finished it in its first attempt: {job}\n{}",
        farm.logs()
    );
    let status = farm.worker("w1").wait_exit(JOB);
    assert!(status.success(), "a drained worker exits 0: {status}");
    farm.wait_until(
        "w1 gone by leaving (its 300 s lease cannot have expired within this guard)",
        MIN_HANG_GUARD,
        || {
            let states = farm.worker_states();
            (states == [("w2".into(), "idle".into())])
                .then_some(())
                .ok_or(format!("{states:?}"))
        },
    );

    // SIGKILL: w2 cannot say goodbye; its 2 s lease expires.
    farm.worker("w2").kill();
    farm.wait_until(
        "w2 gone after its lease expired",
        Duration::from_secs(60),
        || {
            let states = farm.worker_states();
            states.is_empty().then_some(()).ok_or(format!("{states:?}"))
        },
    );
}

#[test]
fn a_job_queued_with_no_free_worker_starts_when_one_joins() {
    let mut farm = Farm::start();
    let id = farm.submit(&spec(3), &[]);
    let queued = farm.cli(&["list", "--state", "queued", "--json"]).ok();
    assert_eq!(
        ids(&queued.json_values()),
        vec![id.clone()],
        "{}",
        queued.describe()
    );
    let job = farm.job(&id);
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(number(&job, "started_at_ms"), 0, "{job}");

    farm.start_worker("w1", &[]);
    let job = farm.wait_done(&id, JOB);
    assert_eq!(workers_of(&job), ["w1"], "{job}");
    let done = farm.cli(&["list", "--state", "done", "--json"]).ok();
    assert_eq!(
        ids(&done.json_values()),
        vec![id.clone()],
        "{}",
        done.describe()
    );
    let queued = farm.cli(&["list", "--state", "queued", "--json"]).ok();
    assert!(queued.json_values().is_empty(), "{}", queued.describe());
}

#[test]
fn cancel_frees_the_worker_and_queued_jobs_run_by_priority() {
    let farm = Farm::with_workers(&["w1"]);
    let long = farm.submit(&long_spec(100), &["--name", "long"]);
    farm.wait_running(&long, JOB);
    let low = farm.submit(&spec(3), &["--priority", "0", "--name", "low"]);
    let high = farm.submit(&spec(3), &["--priority", "5", "--name", "high"]);
    for id in [&low, &high] {
        let job = farm.job(id);
        assert_eq!(job["state"], "queued", "the only worker is busy: {job}");
    }

    let mut watch = farm.spawn_cli("watch", &["watch", &long]);
    farm.cli(&["cancel", &long, "--reason", "wrong prompt"])
        .ok();
    let job = farm.wait_job(&long, "cancelled", JOB, |j| j["state"] == "cancelled");
    assert!(
        number(&job, "steps_done") < number(&job, "steps_total"),
        "cancel stopped the job before its last step: {job}"
    );
    assert!(field(&job, "message").contains("wrong prompt"), "{job}");
    let status = watch.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(1),
        "watch of a cancelled job exits 1\n{}",
        watch.logs()
    );
    assert!(
        watch.stderr().contains("cancel"),
        "watch says why: {}",
        watch.logs()
    );

    // The freed worker takes the high-priority job first although it was submitted last.
    let high_job = farm.wait_done(&high, JOB);
    let low_job = farm.wait_done(&low, JOB);
    assert!(
        number(&high_job, "finished_at_ms") <= number(&low_job, "started_at_ms"),
        "priority 5 ran before priority 0:\n{high_job}\n{low_job}"
    );
    farm.wait_until("w1 idle again", JOB, || {
        let states = farm.worker_states();
        (states == [("w1".into(), "idle".into())])
            .then_some(())
            .ok_or(format!("{states:?}"))
    });
}

#[test]
fn unknown_ids_and_malformed_specs_are_refused_with_their_names() {
    let farm = Farm::start_with(&["--max-frames", "33"]);
    let out = farm.path("nothing.mp4");
    for args in [
        vec!["status", "j-nope"],
        vec!["cancel", "j-nope"],
        vec!["watch", "j-nope"],
        vec!["fetch", "j-nope", "--out", out.to_str().unwrap()],
    ] {
        let line = farm.cli(&args).error_line();
        assert!(line.contains("no job j-nope"), "{args:?}: {line}");
    }
    assert!(!out.exists(), "a failed fetch writes nothing");

    let bad_width = spec_of("9", "250x256", 3);
    let bad_frames = spec_of("97", "64x64", 3);
    for (spec, field_name) in [(bad_width, "spec.width"), (bad_frames, "spec.frames")] {
        let mut args = vec!["submit"];
        args.extend(strs(&spec));
        let line = farm.cli(&args).error_line();
        assert!(line.contains(field_name), "{args:?}: {line}");
    }
    assert!(farm.jobs().is_empty(), "refused specs are not stored");

    // A job that is not done yet cannot be fetched (no worker: it stays queued).
    let id = farm.submit(&spec(3), &[]);
    let line = farm
        .cli(&["fetch", &id, "--out", out.to_str().unwrap()])
        .error_line();
    assert!(line.contains(&id), "{line}");
    assert!(!out.exists(), "a failed fetch writes nothing");
}

/// A farm started with `--tokens`: a call without a known token is refused; a studio sees,
/// watches, cancels and fetches only its own jobs (another's job is "no job", as if it did not
/// exist) and its request ids are its own; an admin reaches every job. The coordinator's audit
/// log names who did what and what was refused, and never a token. (Before tokens, anyone who
/// reached the API could cancel or fetch any job.) A job beyond its owner's rank quota is
/// refused.
#[test]
fn api_tokens_keep_each_studio_to_its_own_jobs() {
    const A: &str = "tok-a-5c0e9d8f7b6a4e3d";
    const B: &str = "tok-b-1f2e3d4c5b6a7980";
    const OPS: &str = "tok-ops-9a8b7c6d5e4f3a2b";
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("# the farm's tokens\n{A} studio-a\n{B} studio-b studio\n{OPS} ops admin\n"),
    )
    .unwrap();
    let mut farm = Farm::start_with(&[
        "--tokens",
        tokens.to_str().unwrap(),
        "--max-ranks-per-owner",
        "1",
    ]);
    farm.start_worker("w1", &[]);

    let line = farm.cli(&["list"]).error_line();
    assert!(line.contains("requires an API token"), "{line}");
    let line = farm
        .cli_as("tok-x-0000000000000000", &["list"])
        .error_line();
    assert!(line.contains("does not know the API token"), "{line}");
    let mut submit = vec!["submit"];
    let small = spec(2);
    submit.extend(strs(&small));
    assert!(farm.cli(&submit).error_line().contains("API token"));

    // a job beyond the owner's quota of ranks could never run: refused at once
    let mut wide = submit.clone();
    wide.extend(["--layout", "cfg=2"]);
    let line = farm.cli_as(A, &wide).error_line();
    assert!(line.contains("studio-a may use at most 1"), "{line}");

    // studio-a's job, with a request id
    let mut with_request = submit.clone();
    with_request.extend(["--request-id", "shot-7"]);
    let a_job = farm.cli_as(A, &with_request).ok().stdout.trim().to_string();
    farm.use_token(OPS);
    let done = farm.wait_done(&a_job, JOB);
    assert_eq!(field(&done, "owner"), "studio-a");

    // studio-b reaches none of it, and its own same request id is its own job
    let out = farm.path("b.mp4");
    for args in [
        vec!["status", a_job.as_str()],
        vec!["watch", a_job.as_str()],
        vec!["cancel", a_job.as_str()],
        vec!["fetch", a_job.as_str(), "--out", out.to_str().unwrap()],
    ] {
        let line = farm.cli_as(B, &args).error_line();
        assert!(
            line.contains(&format!("no job {a_job}")),
            "{args:?}: {line}"
        );
    }
    assert!(!out.exists(), "a refused fetch writes nothing");
    assert!(farm
        .cli_as(B, &["list", "--json"])
        .ok()
        .json_values()
        .is_empty());
    let b_job = farm.cli_as(B, &with_request).ok().stdout.trim().to_string();
    assert_ne!(
        b_job, a_job,
        "studio-b's request id handed it studio-a's job"
    );
    let b_status = farm.cli_as(B, &["status", &b_job, "--json"]).ok().json();
    assert_eq!(field(&b_status, "owner"), "studio-b");
    farm.wait_done(&b_job, JOB);

    // studio-a fetches its own; a retry of its request gets the same job
    let a_out = farm.path("a.mp4");
    farm.cli_as(A, &["fetch", &a_job, "--out", a_out.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&a_out)["nb_read_frames"], "9");
    assert_eq!(farm.cli_as(A, &with_request).ok().stdout.trim(), a_job);
    let mine = ids(&farm.cli_as(A, &["list", "--json"]).ok().json_values());
    assert_eq!(mine, vec![a_job.clone()]);

    // the admin sees both, and may cancel anyone's job
    let all = ids(&farm.jobs());
    assert_eq!(all, vec![a_job.clone(), b_job.clone()]);
    let queued = farm.cli_as(B, &submit).ok().stdout.trim().to_string();
    farm.cli(&["cancel", &queued]).ok();

    let log = farm.coordinator_stderr();
    for wanted in [
        format!("caller=studio-a (studio) action=\"submit\" job={a_job}"),
        format!("caller=studio-a (studio) action=\"fetch\" job={a_job}"),
        format!("caller=studio-b (studio) action=\"cancel\" job={a_job} owner=studio-a"),
        format!("caller=ops (admin) action=\"cancel\" job={queued}"),
        "action=\"list\"".to_string(),
    ] {
        assert!(
            log.contains(&wanted),
            "no audit line with {wanted:?}:\n{log}"
        );
    }
    for token in [A, B, OPS, "tok-x-0000000000000000"] {
        assert!(!log.contains(token), "a token reached the log:\n{log}");
    }
}

/// A farm on TLS with certificates from `longtake certs init`: a job runs end to end over
/// https (CLI → coordinator), mutual TLS (coordinator → worker) and an etcd that serves TLS to
/// holders of a farm certificate only. A worker registered in etcd
/// without the farm's certificate (as a forged etcd record was: it once received prompts and
/// had its frames taken as a finished job) is never given the job; a worker's RPCs refuse a
/// caller without a farm certificate, and one whose certificate is not the coordinator's; a
/// client without the farm's CA, or speaking plain http, gets nothing.
#[test]
fn a_tls_farm_runs_jobs_and_refuses_who_holds_no_farm_certificate() {
    use longtake_proto::tls::{Tls, TlsFiles, COORDINATOR_NAME, WORKER_NAME};
    use longtake_proto::worker_service_client::WorkerServiceClient;
    use longtake_proto::HealthRequest;
    use tonic::transport::Endpoint;

    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().join("farm");
    let made = support::cli::longtake()
        .args(["certs", "init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut farm = Farm::start_tls(&dir, &[]);
    assert!(farm.url().starts_with("https://"), "{}", farm.url());
    farm.start_worker_without_tls("impostor");
    farm.start_worker("w1", &[]);

    let id = farm.submit(&spec(2), &[]);
    let done = farm.wait_done(&id, JOB);
    assert_eq!(workers_of(&done), vec!["w1"], "{done}");
    assert_eq!(number(&done, "attempts"), 1, "{done}");
    let clip = farm.path("tls.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&clip)["nb_read_frames"], "9");
    let impostor = farm.worker("impostor").stderr();
    assert!(
        !impostor.contains(&id),
        "the impostor heard of the job: {impostor}"
    );

    // clients that do not hold the farm's CA, or do not speak TLS
    let address = farm.url().trim_start_matches("https://").to_string();
    let mut plain = support::cli::longtake();
    plain.env("LONGTAKE_COORDINATOR", format!("http://{address}"));
    plain
        .env_remove("LONGTAKE_CA_CERT")
        .env_remove("LONGTAKE_TOKEN");
    let line = support::cli::Run::of(plain, &["list"]).error_line();
    assert!(line.contains("https:// URL and --ca-cert"), "{line}");
    let mut no_ca = support::cli::longtake();
    no_ca.env("LONGTAKE_COORDINATOR", farm.url());
    no_ca
        .env_remove("LONGTAKE_CA_CERT")
        .env_remove("LONGTAKE_TOKEN");
    let line = support::cli::Run::of(no_ca, &["list"]).error_line();
    assert!(line.contains("--ca-cert"), "{line}");

    // etcd serves TLS to holders of a farm certificate only
    assert!(
        farm.etcd_url().starts_with("https://"),
        "{}",
        farm.etcd_url()
    );
    let artifacts = tempfile::tempdir().unwrap();
    let refused = support::cli::longtake()
        .args([
            "serve",
            "coordinator",
            "--etcd",
            &farm.etcd_url(),
            "--etcd-ca",
        ])
        .arg(dir.join("ca.pem"))
        .args(["--listen", "127.0.0.1:0", "--artifacts"])
        .arg(artifacts.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a coordinator without an etcd certificate started"
    );
    // (how the refusal shows depends on timing: a TLS alert, or a closed connection)
    assert!(
        said.contains("etcd at https://") && said.contains("--etcd-cert/--etcd-key"),
        "{said}"
    );

    // the worker's RPCs: only the coordinator's certificate gets an answer
    let worker = farm
        .workers()
        .into_iter()
        .find(|w| field(w, "id") == "w1")
        .expect("w1 is listed");
    let worker_url = format!("https://{}", field(&worker, "address"));
    let role = |name: &str, role: &'static str| {
        Tls::load(
            &TlsFiles {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
                ca: dir.join("ca.pem"),
            },
            role,
        )
        .unwrap()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let health = |tls: Option<tonic::transport::ClientTlsConfig>| {
        let url = worker_url.clone();
        runtime.block_on(async move {
            let mut endpoint = Endpoint::from_shared(url).unwrap();
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).unwrap();
            }
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            WorkerServiceClient::new(channel)
                .health(HealthRequest {})
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    };
    let ca_only = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(dir.join("ca.pem")).unwrap(),
        ))
        .domain_name(WORKER_NAME);
    let without_certificate = health(Some(ca_only));
    assert!(
        without_certificate.is_err(),
        "a caller without a certificate was answered"
    );
    let as_worker = health(Some(role("worker", WORKER_NAME).client(WORKER_NAME)));
    let refusal = as_worker.expect_err("a worker's certificate passed for the coordinator's");
    assert!(refusal.starts_with("PermissionDenied"), "{refusal}");
    health(Some(
        role("coordinator", COORDINATOR_NAME).client(WORKER_NAME),
    ))
    .expect("the coordinator's certificate is answered");
}

/// 200 submissions from 20 concurrent clients, each request id sent one to three times (a
/// client retrying after a lost reply, some retries racing the first submission): every
/// request id is exactly one job, every retry got that job's id, and nothing else was queued.
#[test]
fn concurrent_clients_retrying_make_one_job_per_request_id() {
    let farm = Farm::start();
    let small = spec(2);
    let outcomes: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..20u64)
            .map(|client| {
                let (farm, small) = (&farm, &small);
                s.spawn(move || {
                    // a fixed pseudo-random number of sends per request id (1 to 3)
                    let mut state = client.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut next = move || {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state
                    };
                    (0..10)
                        .map(|shot| {
                            let request_id = format!("client-{client}:shot-{shot}");
                            let sends = 1 + next() % 3;
                            // the sends of one request id at once: the retries race the first
                            let ids = std::thread::scope(|s| {
                                let sent: Vec<_> = (0..sends)
                                    .map(|_| {
                                        let request_id = request_id.as_str();
                                        s.spawn(move || {
                                            let mut args = vec!["submit"];
                                            args.extend(strs(small));
                                            args.extend(["--request-id", request_id]);
                                            farm.cli(&args).ok().stdout.trim().to_string()
                                        })
                                    })
                                    .collect();
                                sent.into_iter()
                                    .map(|h| h.join().expect("a send panicked"))
                                    .collect::<Vec<_>>()
                            });
                            (request_id, ids)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client panicked"))
            .collect()
    });
    assert_eq!(outcomes.len(), 200);
    let mut job_of = std::collections::HashMap::new();
    for (request_id, ids) in &outcomes {
        assert!(
            ids.iter().all(|id| id == &ids[0]),
            "{request_id} made several jobs: {ids:?}"
        );
        assert!(
            job_of.insert(ids[0].clone(), request_id.clone()).is_none(),
            "two request ids got job {}",
            ids[0]
        );
    }
    let jobs = farm.jobs();
    assert_eq!(jobs.len(), 200, "jobs queued: {}", jobs.len());
    for job in &jobs {
        let id = field(job, "id");
        assert_eq!(
            job_of.get(id).map(String::as_str),
            Some(field(job, "request_id")),
            "{job}"
        );
    }
}

/// etcd unreachable for 20 s mid-job (its process stopped: to its clients, a partition), then
/// back: the job finishes once, and what etcd holds afterwards is what happened: a coordinator
/// restarted over it finds the job done (it neither re-runs it nor deletes its output) and the
/// worker idle. (Before, the job's record stayed `running` and its worker `busy` forever, and a
/// restarted coordinator re-ran the finished job and deleted its output meanwhile.)
#[test]
fn an_etcd_outage_mid_job_leaves_no_stale_record() {
    // No checkpoints, so the job ends within the outage (each failed write holds the table for
    // the store's 5 s time-out); a lease longer than the outage, so the worker's record is not
    // simply put again by re-registering.
    let mut farm = Farm::start_with(&["--checkpoint-every", "0"]);
    farm.start_worker("w1", &["--lease-ttl", "60"]);
    let id = farm.submit(&long_spec(30), &[]);
    farm.wait_running(&id, JOB);
    farm.etcd().pause();
    std::thread::sleep(Duration::from_secs(20));
    farm.etcd().resume();
    let done = farm.wait_done(&id, JOB);
    assert_eq!(number(&done, "attempts"), 1, "{done}");
    farm.wait_until("worker w1 is listed idle", JOB, || {
        let states = farm.worker_states();
        if states == [("w1".to_string(), "idle".to_string())] {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    });
    // what etcd holds: a coordinator started over it now
    farm.kill_coordinator();
    farm.start_coordinator();
    let job = farm.job(&id);
    assert_eq!(field(&job, "state"), "done", "{job}");
    assert_eq!(number(&job, "attempts"), 1, "{job}");
    std::thread::sleep(Duration::from_secs(3)); // a re-run would have started by now
    let job = farm.job(&id);
    assert_eq!(
        (field(&job, "state"), number(&job, "attempts")),
        ("done", 1),
        "{job}"
    );
    let clip = farm.path("after-outage.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&clip)["nb_read_frames"], "33");
    assert_eq!(
        farm.worker_states(),
        [("w1".to_string(), "idle".to_string())]
    );
}

/// A 3-member etcd cluster loses one member (SIGKILL) mid-job: the job finishes, the next one
/// runs, a worker joins, and a coordinator restarted over the two survivors (still given all
/// three URLs, as its configuration would) loads the jobs and schedules. (Before, etcd-client
/// kept sending a share of the requests to the dead member, each failing with a connection
/// error: the restarted coordinator could not load its jobs and exited.)
#[test]
fn a_three_member_etcd_losing_one_member_keeps_the_farm_working() {
    let mut farm = Farm::start_on_etcd_cluster(&[]);
    farm.start_worker("w1", &[]);
    let first = farm.submit(&long_spec(12), &["--name", "first"]);
    farm.wait_running(&first, JOB);
    farm.etcd_cluster().kill(0);
    let done = farm.wait_done(&first, JOB);
    assert_eq!(number(&done, "attempts"), 1, "{done}");

    farm.start_worker("w2", &[]);
    let second = farm.submit(&spec(3), &["--name", "second"]);
    farm.wait_done(&second, JOB);

    farm.kill_coordinator();
    farm.start_coordinator();
    assert_eq!(ids(&farm.jobs()), [first.clone(), second.clone()]);
    let third = farm.submit(&spec(3), &["--name", "third"]);
    let third_job = farm.wait_done(&third, JOB);
    assert_eq!(number(&third_job, "attempts"), 1, "{third_job}");
    let mut workers: Vec<String> = farm
        .workers()
        .iter()
        .map(|w| field(w, "id").to_string())
        .collect();
    workers.sort();
    assert_eq!(workers, ["w1", "w2"]);
    let clip = farm.path("third.mp4");
    farm.cli(&["fetch", &third, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&clip)["nb_read_frames"], "9");
}

/// Two coordinators on one etcd: the first leads, the second stands by (it does not listen, so
/// the CLI, given both URLs, reaches the leader). The leader is SIGKILLed mid-job: the standby
/// leads within the leader's lease (2 s here), resumes the job from its last checkpoint, and a
/// `watch` started before the failover follows the job to its end on the new leader; the clip
/// is byte for byte the undisturbed single-process render. Then a leader stopped by SIGTERM
/// hands over at once to the next standby, which lists the jobs. (Before, two coordinators on
/// one etcd both scheduled: a job ran twice into two artifact directories.)
#[test]
fn a_standby_coordinator_takes_over_from_a_killed_leader_mid_job() {
    let mut farm = Farm::start_with(&["--leader-ttl", "2s"]);
    farm.start_standby_coordinator();
    farm.start_worker("w1", &[]);
    let job_spec = long_spec(20);
    let id = farm.submit(&job_spec, &[]);
    let mut watcher = farm.spawn_cli("watch", &["watch", &id, "--json"]);
    farm.wait_job(&id, "3 steps done", JOB, |j| {
        j["steps_done"].as_u64().unwrap_or(0) >= 3
    });
    let killed = std::time::Instant::now();
    farm.kill_coordinator();
    farm.wait_standby_leads(JOB);
    eprintln!(
        "the standby leads {:.2} s after the leader was killed (lease 2 s)",
        killed.elapsed().as_secs_f64()
    );

    let job = farm.wait_done(&id, JOB);
    eprintln!(
        "job done {:.2} s after the kill: {job}",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(number(&job, "attempts"), 2, "{job}");
    assert!(
        number(&job, "resumed_from_step") >= 2,
        "the new leader resumed from a checkpoint: {job}"
    );
    let status = watcher.wait_exit(JOB);
    assert!(status.success(), "watch: {status}\n{}", watcher.logs());
    assert!(
        watcher.stderr().contains("re-attached to job"),
        "{}",
        watcher.logs()
    );
    let last = watcher
        .stdout()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.contains("\"done\""), "watch ended on: {last}");

    let clip = farm.path("failover.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    let reference = farm.path("reference.mp4");
    let mut args = strs(&job_spec);
    args.extend(["--out", reference.to_str().unwrap()]);
    embedded_render(&args);
    assert!(
        std::fs::read(&clip).unwrap() == std::fs::read(&reference).unwrap(),
        "the job resumed on the new leader differs from the undisturbed render"
    );

    // a graceful stop hands the leadership over without waiting for the lease
    farm.start_standby_coordinator();
    let status = farm.stop_coordinator();
    assert!(status.success(), "the stopped leader exits 0: {status}");
    farm.wait_standby_leads(JOB);
    assert_eq!(ids(&farm.jobs()), [id]);
    let second = farm.submit(&spec(3), &[]);
    let second_job = farm.wait_done(&second, JOB);
    assert_eq!(number(&second_job, "attempts"), 1, "{second_job}");
}

/// A coordinator with `--retain-finished 2s` prunes a job that ended more than 2 s ago: its
/// record (a restarted coordinator does not know it either) and its output go; a job still
/// queued stays. (Nothing was ever deleted: the history grew until the coordinator could not
/// restart.)
#[test]
fn ended_jobs_are_pruned_after_the_retention_age() {
    let mut farm = Farm::start_with(&["--retain-finished", "2s"]);
    farm.start_worker("w1", &[]);
    let done = farm.submit(&spec(2), &[]);
    farm.wait_done(&done, JOB);
    let output = farm.artifacts_dir().join(&done);
    assert!(output.is_dir(), "no output at {}", output.display());
    // no worker serves `toy` here: this one stays queued
    let mut waiting_spec = spec(2);
    let model = waiting_spec.iter().position(|a| a == "tiny").unwrap();
    waiting_spec[model] = "toy".into();
    let waiting = farm.submit(&waiting_spec, &[]);

    farm.wait_until(&format!("job {done} is pruned"), JOB, || {
        let run = farm.cli(&["status", &done]);
        if run.code == Some(1) && run.stderr.contains(&format!("no job {done}")) {
            Ok(())
        } else {
            Err(run.describe())
        }
    });
    assert!(
        !output.exists(),
        "the output of a pruned job is still there"
    );
    farm.kill_coordinator();
    farm.start_coordinator();
    assert_eq!(ids(&farm.jobs()), vec![waiting]);
}

/// A clip of three windows of the toy model on two worker groups (two worker processes, one
/// rank each): the groups exchange their shared frames peer to peer and each decodes the frames
/// it owns, and the clip is the embedded single-process co-denoised render (one group, one
/// decode of the whole clip) within one 8-bit level: the latents are the same bits, and a
/// segment decoded after its warm-up is within a level of the whole decode (the trained VAE
/// forgets what came before the warm-up; the random `tiny` one does not, by up to 52 levels).
#[test]
fn a_long_clip_on_two_worker_groups_equals_the_single_process_render() {
    let mut farm = Farm::start();
    for id in ["w1", "w2"] {
        farm.start_worker(id, &["--model", "toy"]);
    }
    let mut long = spec_of("61", "64x64", 3);
    long[1] = "toy".into();
    long.extend(["--window", "9"].map(String::from));
    let mut grouped = long.clone();
    grouped.extend(["--groups", "2"].map(String::from));
    let id = farm.submit(&grouped, &["--name", "long"]);
    farm.wait_done(&id, JOB);
    let job = farm.job(&id);
    assert_eq!(workers_of(&job).len(), 2, "two groups of one rank: {job}");
    assert_eq!(number(&job["spec"], "groups"), 2, "{job}");
    // where the time went: the workers' phases (the groups exchanged shared frames every step,
    // each decoded its segment) and the coordinator's encode, inside the attempt's wall time
    let split = &job["time_split"];
    let seconds = |phase: &str| {
        split[phase]
            .as_f64()
            .unwrap_or_else(|| panic!("no {phase} in the time split: {job}"))
    };
    for phase in ["denoise_s", "exchange_s", "decode_s", "encode_s", "wall_s"] {
        assert!(seconds(phase) > 0.0, "{phase} took time: {split}");
    }
    assert!(seconds("exchange_s") < seconds("denoise_s"), "{split}");
    assert!(
        seconds("denoise_s") + seconds("decode_s") <= seconds("wall_s"),
        "{split}"
    );
    let clip = farm.path("long.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&clip)["nb_read_frames"], "61");

    let png = |args: &[String]| {
        let mut args = args.to_vec();
        args.extend(["--format", "png"].map(String::from));
        args
    };
    let on_groups = farm.path("long-groups");
    let mut args = vec!["render".to_string()];
    args.extend(png(&grouped));
    args.extend(["--out".to_string(), on_groups.display().to_string()]);
    farm.cli(&strs(&args)).ok();
    let reference = farm.path("long-reference");
    let mut args = png(&long);
    args.extend(["--out".to_string(), reference.display().to_string()]);
    let rendered = embedded_render(&strs(&args));
    assert!(
        rendered
            .stdout
            .contains("seams: 2 window boundaries; each seam's largest change against each stretch inside the windows"),
        "a clip of three windows reports its seams: {}",
        rendered.stdout
    );
    let (frames, expected) = (png_frames(&on_groups), png_frames(&reference));
    assert_eq!((frames.len(), expected.len()), (61, 61));
    let worst = max_diff(&frames, &expected);
    assert!(
        worst <= 1,
        "two groups on the farm: max |diff| {worst} levels from the single-process render"
    );
}

/// `longtake extend` on the farm: the clip uploaded with the job, the output the clip followed
/// by the new frames, co-denoised by two worker groups within one level of the embedded single
/// process, the join reported; a clip of another frame rate than asked is refused by name.
#[test]
fn an_extended_clip_on_two_worker_groups_equals_the_single_process_extension() {
    let mut farm = Farm::start();
    for id in ["w1", "w2"] {
        farm.start_worker(id, &["--model", "toy"]);
    }
    let caption = "a red circle moving right on a black background";
    let base = |frames: &str| -> Vec<String> {
        [
            "--model", "toy", "--prompt", caption, "--frames", frames, "--steps", "3", "--seed",
            "5",
        ]
        .map(String::from)
        .to_vec()
    };
    let clip = farm.path("clip.mp4");
    let mut args = base("17");
    args.extend(["--out".to_string(), clip.display().to_string()]);
    embedded_render(&strs(&args));

    let extend = |out: &std::path::Path, groups: &[&str]| -> Vec<String> {
        let mut args = vec![
            "extend".to_string(),
            "--input".into(),
            clip.display().to_string(),
        ];
        args.extend(base("32"));
        args.extend(["--window", "5", "--format", "png", "--out"].map(String::from));
        args.push(out.display().to_string());
        args.extend(groups.iter().map(|s| s.to_string()));
        args
    };
    let on_groups = farm.path("extended-groups");
    let run = farm
        .cli(&strs(&extend(&on_groups, &["--groups", "2"])))
        .ok();
    assert!(
        run.stdout.contains("wrote ") && run.stdout.contains("49 frames (the clip's 17, 32 new)"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("join at frame 17"),
        "{}",
        run.describe()
    );
    let reference = farm.path("extended-reference");
    let mut cmd = support::cli::longtake();
    cmd.env_remove("LONGTAKE_COORDINATOR");
    support::cli::Run::of(cmd, &strs(&extend(&reference, &[]))).ok();
    let (frames, expected) = (png_frames(&on_groups), png_frames(&reference));
    assert_eq!((frames.len(), expected.len()), (49, 49));
    let worst = max_diff(&frames, &expected);
    assert!(
        worst <= 1,
        "an extension on two groups: max |diff| {worst} levels from the single process"
    );

    let mut wrong_rate = extend(&farm.path("never"), &[]);
    wrong_rate.extend(["--fps", "24"].map(String::from));
    let refused = farm.cli(&strs(&wrong_rate));
    assert_ne!(refused.code, Some(0), "{}", refused.describe());
    assert!(
        refused
            .error_line()
            .contains("spec.fps: 24 differs from the clip's 16"),
        "{}",
        refused.describe()
    );
}

#[test]
fn a_restarted_coordinator_keeps_its_jobs_and_runs_the_queue() {
    let mut farm = Farm::with_workers(&["w1"]);
    let first = farm.submit(&long_spec(25), &["--name", "first"]);
    farm.wait_running(&first, JOB);
    let second = farm.submit(&spec(3), &["--name", "second"]);
    let third = farm.submit(&spec(3), &["--name", "third", "--priority", "1"]);
    let before = farm.jobs();
    assert_eq!(ids(&before), [first.clone(), second.clone(), third.clone()]);

    farm.kill_coordinator();
    farm.start_coordinator();
    let after = farm.jobs();
    assert_eq!(
        ids(&after),
        ids(&before),
        "the restarted coordinator lists its jobs"
    );
    for (b, a) in before.iter().zip(&after) {
        for key in ["name", "priority", "submitted_at_ms", "spec"] {
            assert_eq!(a[key], b[key], "{key} survives the restart:\n{b}\n{a}");
        }
        assert!(
            !matches!(field(a, "state"), "done" | "failed" | "cancelled"),
            "nothing ended while the coordinator was down: {a}"
        );
    }

    for id in [&first, &second, &third] {
        farm.wait_done(id, JOB);
    }
    let first_job = farm.job(&first);
    assert!(
        number(&first_job, "attempts") >= 2,
        "the interrupted job ran again: {first_job}"
    );
    let (second_job, third_job) = (farm.job(&second), farm.job(&third));
    assert!(
        number(&third_job, "finished_at_ms") <= number(&second_job, "started_at_ms"),
        "the queue kept its priorities across the restart:\n{third_job}\n{second_job}"
    );
    let clip = farm.path("second.mp4");
    farm.cli(&["fetch", &second, "--out", clip.to_str().unwrap()])
        .ok();
    assert_eq!(probe(&clip)["nb_read_frames"], "9");
    // Its content: the embedded single-process render of the same spec, byte for byte.
    let reference = farm.path("second-reference.mp4");
    let second_spec = spec(3);
    let mut args = strs(&second_spec);
    args.extend(["--out", reference.to_str().unwrap()]);
    embedded_render(&args);
    assert!(
        std::fs::read(&clip).unwrap() == std::fs::read(&reference).unwrap(),
        "the job queued across the restart differs from the single-process render"
    );
}

#[test]
fn a_worker_killed_mid_job_is_replaced_and_the_result_is_unchanged() {
    let mut farm = Farm::with_workers(&["w1", "w2"]);
    let mut png = long_spec(25);
    png.extend(["--format", "png"].map(String::from));
    let id = farm.submit(&png, &[]);
    let job = farm.wait_running(&id, JOB);
    let victim = workers_of(&job)[0].clone();
    let survivor = if victim == "w1" { "w2" } else { "w1" };
    farm.worker(&victim).kill();

    let job = farm.wait_done(&id, JOB);
    assert_eq!(workers_of(&job), [survivor], "{job}");
    assert_eq!(number(&job, "attempts"), 2, "{job}");
    farm.wait_until(&format!("{victim} gone"), Duration::from_secs(60), || {
        let states = farm.worker_states();
        (states == [(survivor.to_string(), "idle".to_string())])
            .then_some(())
            .ok_or(format!("{states:?}"))
    });

    let fetched = farm.path("fetched");
    farm.cli(&["fetch", &id, "--out", fetched.to_str().unwrap()])
        .ok();
    let reference = farm.path("reference");
    let mut args = strs(&png);
    args.extend(["--out", reference.to_str().unwrap()]);
    embedded_render(&args);
    let (frames, expected) = (png_frames(&fetched), png_frames(&reference));
    assert_eq!(frames.len(), 33);
    assert!(
        frames == expected,
        "the re-run equals the undisturbed render (max |diff| {})",
        max_diff(&frames, &expected)
    );
}

/// kill -9 of a worker of a two-rank job (`cfg=2`) at each point of its run: as soon as it
/// runs (reserving, loading, the first step), mid-denoising (rank 1, then rank 0) and after the
/// last step (rank 0 decoding, encoding, streaming frames: rank 1's part is done by then). Each
/// time the job finishes on the workers left, and its clip is byte for byte the undisturbed
/// render of the same layout; a kill mid-run costs one attempt, resumed from a checkpoint.
#[test]
fn a_worker_killed_at_any_point_of_a_two_rank_job_costs_no_frame() {
    let mut farm = Farm::with_workers(&["w1", "w2", "w3"]);
    let mut job_spec = long_spec(12);
    job_spec.extend(["--layout", "cfg=2"].map(String::from));
    let reference = farm.path("reference.mp4");
    let mut args = strs(&job_spec);
    args.extend(["--out", reference.to_str().unwrap()]);
    embedded_render(&args);
    let reference = std::fs::read(&reference).unwrap();

    // (what the job has done when the worker is killed, which rank dies)
    for (round, (steps_done, rank)) in [(0, 1), (5, 1), (6, 0), (12, 0)].into_iter().enumerate() {
        let id = farm.submit(&job_spec, &[]);
        let job = farm.wait_job(&id, &format!("{steps_done} steps done"), JOB, |j| {
            j["state"] == "running" && j["steps_done"].as_u64().unwrap_or(0) >= steps_done
        });
        let victim = workers_of(&job)[rank].clone();
        farm.worker(&victim).kill();
        let killed_at = job;
        let done = farm.wait_done(&id, JOB);
        if steps_done < 12 {
            assert_eq!(
                number(&done, "attempts"),
                2,
                "round {round}: the job ran again after {victim} was killed: {done}"
            );
        }
        let clip = farm.path(&format!("round-{round}.mp4"));
        farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
            .ok();
        assert!(
            std::fs::read(&clip).unwrap() == reference,
            "round {round}: killed {victim} (rank {rank}) at {} steps ({}), the clip differs \
             from the undisturbed render",
            number(&killed_at, "steps_done"),
            field(&killed_at, "state")
        );
        eprintln!(
            "round {round}: killed {victim} (rank {rank}) at {} of 12 steps ({}); attempts {}, \
             resumed from step {}",
            number(&killed_at, "steps_done"),
            field(&killed_at, "state"),
            number(&done, "attempts"),
            number(&done, "resumed_from_step")
        );
        // the killed worker comes back under its id once its lease has expired
        farm.wait_until(&format!("{victim} gone"), JOB, || {
            let states = farm.worker_states();
            (!states.iter().any(|(id, _)| *id == victim))
                .then_some(())
                .ok_or(format!("{states:?}"))
        });
        farm.forget_worker(&victim);
        farm.start_worker(&victim, &[]);
    }
}

/// kill -9 of the worker of group 0 of a long clip on two worker groups (one rank each)
/// mid-denoising: each group checkpointed its own frames after every step, so the job resumes on
/// the workers left from the last step both groups saved, its clip is byte for byte the
/// undisturbed render's, and no checkpoint is left once it is done.
#[test]
fn a_worker_killed_mid_job_of_two_worker_groups_resumes_from_their_checkpoints() {
    let mut farm = Farm::start();
    for id in ["w1", "w2", "w3"] {
        farm.start_worker(id, &["--model", "toy"]);
    }
    let steps = 16;
    let mut grouped = spec_of("61", "64x64", steps);
    grouped[1] = "toy".into();
    grouped.extend(["--window", "9", "--groups", "2"].map(String::from));
    let undisturbed = farm.submit(&grouped, &["--name", "undisturbed"]);
    farm.wait_done(&undisturbed, JOB);
    let reference = farm.path("undisturbed.mp4");
    farm.cli(&["fetch", &undisturbed, "--out", reference.to_str().unwrap()])
        .ok();

    let id = farm.submit(&grouped, &["--name", "killed"]);
    let job = farm.wait_job(&id, "6 steps done", JOB, |j| {
        j["state"] == "running" && j["steps_done"].as_u64().unwrap_or(0) >= 6
    });
    let victim = workers_of(&job)[0].clone();
    farm.worker(&victim).kill();
    let killed_at = number(&job, "steps_done");
    let done = farm.wait_done(&id, JOB);
    assert_eq!(number(&done, "attempts"), 2, "{done}");
    assert!(
        !workers_of(&done).contains(&victim),
        "the second attempt ran on the workers left: {done}"
    );
    let resumed = number(&done, "resumed_from_step");
    let took = |job: &Value| {
        (number(job, "finished_at_ms") - number(job, "submitted_at_ms")) as f64 / 1000.0
    };
    let undisturbed_took = took(&farm.job(&undisturbed));
    eprintln!(
        "killed {victim} (group 0) at {killed_at} of {steps} steps; resumed from step {resumed}; \
         submitted to done {:.2} s against {undisturbed_took:.2} s undisturbed",
        took(&done)
    );
    assert!(
        resumed >= 1 && resumed + 2 >= killed_at,
        "lost at step {killed_at}, resumed from step {resumed}"
    );
    let clip = farm.path("killed.mp4");
    farm.cli(&["fetch", &id, "--out", clip.to_str().unwrap()])
        .ok();
    assert!(
        std::fs::read(&clip).unwrap() == std::fs::read(&reference).unwrap(),
        "the resumed clip differs from the undisturbed render"
    );
    let left: Vec<String> = std::fs::read_dir(farm.artifacts_dir().join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".checkpoint"))
        .collect();
    assert!(
        left.is_empty(),
        "a finished job keeps no checkpoint: {left:?}"
    );
}

/// Both daemons' `/metrics` (`--metrics-listen`), scraped as Prometheus would and parsed by a
/// Prometheus text-format parser and checked by `promtool check metrics`: during a job the coordinator counts it running, its steps and tokens, and the
/// worker holds it; after it, the job is counted done with its step, decode and encode times,
/// and the worker's task finished; both export their process's memory, CPU and descriptors.
#[test]
fn metrics_of_both_daemons_move_as_a_job_runs() {
    use support::metrics::{promtool_check, scrape, value};
    let mut farm = Farm::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let coordinator = farm.coordinator_line("coordinator metrics on ");
    farm.start_worker("w1", &["--metrics-listen", "127.0.0.1:0"]);
    let worker = farm
        .worker("w1")
        .wait_for_line("worker w1 metrics on ", JOB);

    let (_, idle) = scrape(&coordinator);
    assert_eq!(
        value(&idle, "longtake_workers", &[("state", "idle")]),
        Some(1.0)
    );
    assert_eq!(
        value(&idle, "longtake_jobs_submitted_total", &[]),
        Some(0.0)
    );

    let steps = 40;
    let id = farm.submit(&long_spec(steps), &["--priority", "3"]);
    let blocked = farm.submit(&spec(3), &["--priority", "2"]);
    farm.wait_job(&id, "5 steps done", JOB, |j| {
        j["steps_done"].as_u64().unwrap_or(0) >= 5
    });
    let (during_body, during) = scrape(&coordinator);
    let (worker_during_body, worker_during) = scrape(&worker);
    assert_eq!(
        value(&during, "longtake_jobs", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(
        value(&during, "longtake_queue_depth", &[("priority", "2")]),
        Some(1.0)
    );
    assert_eq!(
        value(&during, "longtake_workers", &[("state", "busy")]),
        Some(1.0)
    );
    assert_eq!(value(&during, "longtake_attempts_total", &[]), Some(1.0));
    let layout = [
        ("cfg", "1"),
        ("tp", "1"),
        ("ulysses", "1"),
        ("ring", "1"),
        ("groups", "1"),
    ];
    let steps_during = value(&during, "longtake_step_duration_seconds_count", &layout)
        .expect("steps counted by layout");
    assert!(
        steps_during >= 5.0 && steps_during < f64::from(steps),
        "{steps_during}"
    );
    assert_eq!(
        value(&worker_during, "longtake_worker_busy", &[]),
        Some(1.0)
    );

    farm.wait_done(&id, JOB);
    farm.wait_done(&blocked, JOB);
    let (after_body, after) = scrape(&coordinator);
    let (worker_after_body, worker_after) = scrape(&worker);
    assert_eq!(
        value(&after, "longtake_jobs_submitted_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(&after, "longtake_jobs_ended_total", &[("state", "done")]),
        Some(2.0)
    );
    assert_eq!(
        value(&after, "longtake_jobs", &[("state", "done")]),
        Some(2.0)
    );
    assert_eq!(
        value(&after, "longtake_queue_depth", &[("priority", "2")]),
        None
    );
    assert_eq!(
        value(&after, "longtake_step_duration_seconds_count", &layout),
        Some(f64::from(steps + 3))
    );
    // 33 frames at 128x128: 9 latent frames of 16 x 16 cells a step; 9 frames at 64x64: 3 of 8 x 8
    assert_eq!(
        value(&after, "longtake_denoised_tokens_total", &[]),
        Some(f64::from(steps * 9 * 16 * 16 + 3 * 3 * 8 * 8))
    );
    for histogram in [
        "longtake_job_duration_seconds",
        "longtake_vae_decode_seconds",
        "longtake_encode_seconds",
    ] {
        assert_eq!(
            value(&after, &format!("{histogram}_count"), &[]),
            Some(2.0),
            "{histogram}"
        );
        let sum = value(&after, &format!("{histogram}_sum"), &[]).unwrap();
        assert!(sum > 0.0, "{histogram}_sum {sum}");
    }
    assert_eq!(value(&after, "longtake_requeues_total", &[]), Some(0.0));
    assert_eq!(
        value(
            &worker_after,
            "longtake_worker_tasks_total",
            &[("outcome", "finished")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&worker_after, "longtake_worker_busy", &[]), Some(0.0));
    assert_eq!(
        value(
            &worker_after,
            "longtake_worker_step_duration_seconds_count",
            &[]
        ),
        Some(f64::from(steps + 3))
    );
    // every daemon's own memory, CPU and descriptors (the process collector)
    for (daemon, metrics) in [("coordinator", &after), ("worker", &worker_after)] {
        let of = |name| value(metrics, name, &[]).unwrap_or_else(|| panic!("{daemon}: no {name}"));
        assert!(of("process_resident_memory_bytes") > 1e6, "{daemon}");
        assert!(of("process_open_fds") > 3.0, "{daemon}");
        // whole seconds in this collector: a quiet coordinator may have used less than one
        assert!(of("process_cpu_seconds_total") >= 0.0, "{daemon}");
    }
    for body in [
        &during_body,
        &worker_during_body,
        &after_body,
        &worker_after_body,
    ] {
        let said = promtool_check(body);
        assert!(!said.contains("promtool failed"), "{said}\n{body}");
    }
}

/// One trace per job across processes: with an OTLP endpoint set (a real OTLP/gRPC receiver
/// here), a `render` of a two-rank `cfg=2` job yields one trace holding the CLI's span, the
/// coordinator's (the submission and the attempt, its child) and each worker's task (children
/// of the attempt, one per rank), with the steps under each task, the transformer blocks under
/// the steps and the collectives (with their bytes) under the tasks, the steps' among them; the
/// coordinator's encode under the attempt and its fetch under the CLI's command. Then a long
/// clip on two worker groups: window spans, and the groups' exchanges (both ways, with their
/// bytes) inside the steps of its own trace.
#[test]
fn a_two_worker_job_is_one_trace_across_the_cli_the_coordinator_and_both_workers() {
    use support::otlp::{ReceivedSpan, Receiver};
    let receiver = Receiver::start();
    let mut farm = Farm::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    farm.start_worker("w1", &[]);
    farm.start_worker("w2", &[]);
    let clip = farm.path("traced.mp4");
    let mut args = strs(&spec(3))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    args.extend(["--layout", "cfg=2", "--out", clip.to_str().unwrap()].map(String::from));
    let mut render = vec!["render"];
    render.extend(args.iter().map(String::as_str));
    farm.cli(&render).ok();

    let named = |spans: &[ReceivedSpan], service: &str, name: &str| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .cloned()
            .collect()
    };
    let spans = receiver.wait_for(
        "the spans of the CLI, the coordinator and both ranks",
        |spans| {
            !named(spans, "longtake-cli", "cli").is_empty()
                && !named(spans, "longtake-coordinator", "attempt").is_empty()
                && named(spans, "longtake-worker", "task").len() == 2
                && named(spans, "longtake-worker", "step").len() >= 6
                && !named(spans, "longtake-worker", "collective").is_empty()
        },
    );
    let cli = &named(&spans, "longtake-cli", "cli")[0];
    assert_eq!(cli.attribute("command"), Some("render"));
    assert!(cli.parent_span_id.is_empty(), "the CLI's span is the root");
    let trace = cli.trace_id.clone();
    let submit = named(&spans, "longtake-coordinator", "submit");
    assert_eq!(submit.len(), 1, "{submit:?}");
    assert_eq!(
        submit[0].parent_span_id, cli.span_id,
        "submit under the CLI's span"
    );
    let attempt = &named(&spans, "longtake-coordinator", "attempt")[0];
    assert_eq!(
        attempt.parent_span_id, submit[0].span_id,
        "the attempt under the submission"
    );
    let tasks = named(&spans, "longtake-worker", "task");
    let mut ranks: Vec<&str> = tasks.iter().filter_map(|t| t.attribute("rank")).collect();
    ranks.sort();
    assert_eq!(ranks, ["0", "1"], "one task per rank: {tasks:?}");
    for task in &tasks {
        assert_eq!(
            task.parent_span_id, attempt.span_id,
            "task under the attempt"
        );
        let steps: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.name == "step" && s.parent_span_id == task.span_id)
            .collect();
        assert_eq!(
            steps.len(),
            3,
            "3 steps under rank {:?}",
            task.attribute("rank")
        );
    }
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    // the names of a span's ancestors, nearest first
    let ancestors = |span: &ReceivedSpan| {
        let mut names = Vec::new();
        let mut at = by_id(&span.parent_span_id);
        while let Some(parent) = at {
            names.push(parent.name.clone());
            at = by_id(&parent.parent_span_id);
        }
        names
    };
    let collectives = named(&spans, "longtake-worker", "collective");
    let mut in_steps = 0;
    for collective in &collectives {
        // a rank's collectives belong to its task: the steps' and the setup's and decode's
        let above = ancestors(collective);
        assert!(
            above.contains(&"task".to_string()),
            "{collective:?} under {above:?}"
        );
        assert!(collective.attribute("bytes").is_some(), "{collective:?}");
        if above.contains(&"step".to_string()) {
            in_steps += 1;
        }
    }
    assert!(in_steps > 0, "no collective inside a step: {collectives:?}");
    // every transformer block's span lies in a step
    let blocks = named(&spans, "longtake-worker", "block");
    assert!(!blocks.is_empty(), "no block spans");
    for block in &blocks {
        assert!(ancestors(block).contains(&"step".to_string()), "{block:?}");
    }
    // the coordinator's encode under the attempt, its fetch under the CLI's command
    let encode = named(&spans, "longtake-coordinator", "encode");
    assert_eq!(encode.len(), 1, "{encode:?}");
    assert_eq!(
        encode[0].parent_span_id, attempt.span_id,
        "encode under the attempt"
    );
    let fetch = named(&spans, "longtake-coordinator", "fetch");
    assert_eq!(fetch.len(), 1, "{fetch:?}");
    assert_eq!(
        fetch[0].parent_span_id, cli.span_id,
        "fetch under the CLI's span"
    );
    for span in [cli, &submit[0], attempt].into_iter().chain(&tasks).chain(
        spans
            .iter()
            .filter(|s| s.name == "step" || s.name == "collective"),
    ) {
        assert_eq!(span.trace_id, trace, "one trace: {span:?}");
    }

    // A long clip on two worker groups: each group's steps hold its windows and the exchanges
    // of the frames it shares with the other group, with their bytes, in the job's one trace.
    let mut long = spec_of("61", "64x64", 2);
    long.extend(["--window", "9", "--groups", "2"].map(String::from));
    long.extend([
        "--out".to_string(),
        farm.path("long.mp4").display().to_string(),
    ]);
    let mut render = vec!["render"];
    render.extend(long.iter().map(String::as_str));
    farm.cli(&render).ok();
    let spans = receiver.wait_for("the long clip's exchanges", |spans| {
        spans.iter().filter(|s| s.name == "cli").count() == 2
            && named(spans, "longtake-worker", "exchange").len() >= 4
    });
    let second = spans
        .iter()
        .find(|s| s.name == "cli" && s.trace_id != trace)
        .expect("the second render's span");
    let exchanges: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "exchange" && s.trace_id == second.trace_id)
        .collect();
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    let step_of = |span: &ReceivedSpan| {
        let mut at = by_id(&span.parent_span_id);
        while let Some(parent) = at {
            if parent.name == "step" {
                return true;
            }
            at = by_id(&parent.parent_span_id);
        }
        false
    };
    for direction in ["send", "recv"] {
        let of: Vec<_> = exchanges
            .iter()
            .filter(|s| s.attribute("direction") == Some(direction))
            .collect();
        assert!(!of.is_empty(), "no {direction} exchange: {exchanges:?}");
        for span in of {
            assert!(step_of(span), "{span:?} not inside a step");
            let bytes: u64 = span.attribute("bytes").unwrap().parse().unwrap();
            assert!(bytes > 0, "{span:?}");
        }
    }
    let windows = spans
        .iter()
        .filter(|s| s.name == "window" && s.trace_id == second.trace_id)
        .count();
    assert!(
        windows >= 2 * 2,
        "a window span per window and step: {windows}"
    );
}
