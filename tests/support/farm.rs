//! One farm per test: a throw-away etcd, a `longtake serve coordinator` process and any number
//! of `longtake serve worker` processes, all on free loopback ports, and the CLI pointed at them
//! through `LONGTAKE_COORDINATOR`. Farms run one at a time: the renders are CPU-bound and the
//! lease timings would drift if several farms shared two cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use longtake_proto::membership::testing::{EtcdCluster, EtcdServer, EtcdServerTls};
use serde_json::Value;

use super::cli::{field, longtake, Run};
use super::poll::wait_until;
use super::process::Proc;

static SERIAL: Mutex<()> = Mutex::new(());

/// How long a server may take to print its ready line (a worker checks its model first).
const READY: Duration = Duration::from_secs(60);

/// `--tls-cert/--tls-key/--tls-ca` of `role` (coordinator or worker) from `certs init`'s files.
fn tls_args(dir: &Path, role: &str) -> Vec<PathBuf> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{role}.pem")),
        "--tls-key".into(),
        dir.join(format!("{role}.key")),
        "--tls-ca".into(),
        dir.join("ca.pem"),
    ]
}

/// `--etcd-ca/--etcd-cert/--etcd-key`: the farm's CA and `role`'s certificate as an etcd client.
fn etcd_tls_args(dir: &Path, role: &str) -> Vec<PathBuf> {
    vec![
        "--etcd-ca".into(),
        dir.join("ca.pem"),
        "--etcd-cert".into(),
        dir.join(format!("{role}.pem")),
        "--etcd-key".into(),
        dir.join(format!("{role}.key")),
    ]
}

/// The etcd a farm keeps its membership and job records in.
enum FarmEtcd {
    Single(EtcdServer),
    Cluster(EtcdCluster),
}

impl FarmEtcd {
    /// What `--etcd` takes: the client URL, or every member's, comma-separated.
    fn urls(&self) -> String {
        match self {
            FarmEtcd::Single(server) => server.url().to_string(),
            FarmEtcd::Cluster(cluster) => cluster.urls(),
        }
    }
}

/// A coordinator, its workers and the etcd they share. Dropping it kills every process.
pub struct Farm {
    // Field order is drop order: the servers go before the etcd they talk to.
    workers: BTreeMap<String, Proc>,
    coordinator: Option<Proc>,
    /// Environment every process of the farm (the CLI included) starts with.
    env: Vec<(String, String)>,
    /// A second coordinator standing by (`start_standby_coordinator`) and its URL.
    standby: Option<(Proc, String)>,
    coordinator_args: Vec<String>,
    url: String,
    /// The API token the CLI sends (`LONGTAKE_TOKEN`), for a farm started with `--tokens`.
    token: Option<String>,
    /// The directory of `longtake certs init`'s files, for a farm that speaks TLS.
    tls: Option<PathBuf>,
    artifacts: tempfile::TempDir,
    scratch: tempfile::TempDir,
    etcd: FarmEtcd,
    _serial: MutexGuard<'static, ()>,
}

impl Farm {
    /// etcd and a coordinator, no worker yet.
    pub fn start() -> Farm {
        Farm::start_with(&[])
    }

    /// etcd and a coordinator started with `coordinator_args` (e.g. `--max-frames 33`).
    pub fn start_with(coordinator_args: &[&str]) -> Farm {
        Farm::start_over(coordinator_args, None, false, &[])
    }

    /// etcd and a coordinator speaking TLS with the certificates `longtake certs init` wrote
    /// to `certs`; the workers it starts do too, and the CLI trusts the farm's CA. etcd serves
    /// TLS as well (with the coordinator's certificate, which names 127.0.0.1) and requires a
    /// client certificate of the farm's CA: each daemon presents its own.
    pub fn start_tls(certs: &Path, coordinator_args: &[&str]) -> Farm {
        Farm::start_over(coordinator_args, Some(certs.to_path_buf()), false, &[])
    }

    /// A coordinator over a 3-member etcd cluster (plain HTTP), every daemon given all three
    /// members' URLs.
    pub fn start_on_etcd_cluster(coordinator_args: &[&str]) -> Farm {
        Farm::start_over(coordinator_args, None, true, &[])
    }

    /// etcd and a coordinator, every process of the farm (workers and CLI calls included)
    /// started with `env` (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(coordinator_args: &[&str], env: &[(&str, &str)]) -> Farm {
        Farm::start_over(coordinator_args, None, false, env)
    }

    fn start_over(
        coordinator_args: &[&str],
        tls: Option<PathBuf>,
        cluster: bool,
        env: &[(&str, &str)],
    ) -> Farm {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut farm = Farm {
            workers: BTreeMap::new(),
            coordinator: None,
            standby: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
            url: String::new(),
            token: None,
            tls: None,
            artifacts: tempfile::tempdir().expect("artifact directory"),
            scratch: tempfile::tempdir().expect("scratch directory"),
            etcd: match &tls {
                Some(dir) => FarmEtcd::Single(EtcdServer::start_tls(&EtcdServerTls {
                    cert: dir.join("coordinator.pem"),
                    key: dir.join("coordinator.key"),
                    ca: dir.join("ca.pem"),
                })),
                None if cluster => FarmEtcd::Cluster(EtcdCluster::start(3)),
                None => FarmEtcd::Single(EtcdServer::start()),
            },
            _serial: serial,
        };
        farm.tls = tls;
        farm.start_coordinator();
        farm
    }

    /// A farm with workers `ids` registered (lease TTL 2 s).
    pub fn with_workers(ids: &[&str]) -> Farm {
        let mut farm = Farm::start();
        for id in ids {
            farm.start_worker(id, &[]);
        }
        farm
    }

    /// Starts (or restarts) the coordinator over this farm's etcd and artifact directory and
    /// points the CLI at its new address.
    pub fn start_coordinator(&mut self) {
        assert!(
            self.coordinator.is_none(),
            "a coordinator is already running"
        );
        let mut cmd = longtake();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(["serve", "coordinator", "--etcd", &self.etcd.urls()])
            .args(["--listen", "127.0.0.1:0", "--artifacts"])
            .arg(self.artifacts.path())
            .args(&self.coordinator_args);
        if let Some(dir) = &self.tls {
            cmd.args(tls_args(dir, "coordinator"));
            cmd.args(etcd_tls_args(dir, "coordinator"));
        }
        let mut proc = Proc::spawn("coordinator", cmd);
        let addr = proc.wait_for_line("coordinator listening on ", READY);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.url = format!("{scheme}://{addr}");
        self.coordinator = Some(proc);
    }

    /// Starts a second coordinator over this farm's etcd and artifact directory, with the
    /// same arguments, on a port of its own; it stands by while the first leads. The CLI is
    /// given both URLs from now on.
    pub fn start_standby_coordinator(&mut self) {
        assert!(self.standby.is_none(), "a standby is already running");
        assert!(
            self.tls.is_none(),
            "a standby of a TLS farm is not supported here"
        );
        let port = longtake_proto::membership::testing::free_port();
        let mut cmd = longtake();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(["serve", "coordinator", "--etcd", &self.etcd.urls()])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--artifacts"])
            .arg(self.artifacts.path())
            .args(&self.coordinator_args);
        let mut proc = Proc::spawn("standby coordinator", cmd);
        proc.wait_for_line("coordinator standby: ", READY);
        let url = format!("http://127.0.0.1:{port}");
        self.url = format!("{},{url}", self.url);
        self.standby = Some((proc, url));
    }

    /// Waits until the standby coordinator leads (its ready line) and makes it this farm's
    /// coordinator; the CLI keeps both URLs.
    pub fn wait_standby_leads(&mut self, timeout: Duration) {
        let (mut proc, url) = self.standby.take().expect("a standby coordinator");
        let addr = proc.wait_for_line("coordinator listening on ", timeout);
        assert_eq!(
            format!("http://{addr}"),
            url,
            "the standby listens where it said"
        );
        assert!(self.coordinator.is_none(), "the leader still runs");
        self.coordinator = Some(proc);
    }

    /// SIGTERMs the coordinator (a graceful stop) and waits for it to exit.
    pub fn stop_coordinator(&mut self) -> std::process::ExitStatus {
        let mut proc = self.coordinator.take().expect("a running coordinator");
        proc.terminate();
        proc.wait_exit(READY)
    }

    /// SIGKILLs the coordinator (no chance to tidy up).
    pub fn kill_coordinator(&mut self) {
        let mut proc = self.coordinator.take().expect("a running coordinator");
        proc.kill();
    }

    /// Starts worker `id` (tiny model, lease TTL 2 s unless `extra` says otherwise) and waits
    /// for its ready line.
    pub fn start_worker(&mut self, id: &str, extra: &[&str]) {
        self.spawn_worker(id, extra, self.tls.is_some());
    }

    /// A worker of this farm's etcd without the farm's certificates (what a forged etcd
    /// record stands for on a farm with TLS).
    pub fn start_worker_without_tls(&mut self, id: &str) {
        self.spawn_worker(id, &[], false);
    }

    fn spawn_worker(&mut self, id: &str, extra: &[&str], tls: bool) {
        assert!(!self.workers.contains_key(id), "worker {id} already runs");
        let mut cmd = longtake();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(["serve", "worker", "--etcd", &self.etcd.urls()])
            .args(["--listen", "127.0.0.1:0", "--id", id]);
        if !extra.contains(&"--model") {
            cmd.args(["--model", "tiny"]);
        }
        if !extra.contains(&"--lease-ttl") {
            cmd.args(["--lease-ttl", "2"]);
        }
        cmd.args(extra);
        if let Some(dir) = &self.tls {
            // etcd access even without the worker's own certificate: what a forged record
            // stands for is someone who can write to etcd
            cmd.args(etcd_tls_args(dir, "worker"));
            if tls {
                cmd.args(tls_args(dir, "worker"));
            }
        }
        let mut proc = Proc::spawn(&format!("worker {id}"), cmd);
        proc.wait_for_line(&format!("worker {id} listening on "), READY);
        self.workers.insert(id.to_string(), proc);
    }

    /// Drops worker `id`'s process (killed or exited), so that a worker of that id can start
    /// again.
    pub fn forget_worker(&mut self, id: &str) {
        if let Some(mut proc) = self.workers.remove(id) {
            proc.kill();
        }
    }

    pub fn worker(&mut self, id: &str) -> &mut Proc {
        self.workers
            .get_mut(id)
            .unwrap_or_else(|| panic!("no worker {id} in this farm"))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The coordinator's artifact directory.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.artifacts.path().to_path_buf()
    }

    /// This farm's etcd, e.g. to pause it (a farm on one etcd server).
    pub fn etcd(&self) -> &EtcdServer {
        match &self.etcd {
            FarmEtcd::Single(server) => server,
            FarmEtcd::Cluster(_) => panic!("this farm runs on an etcd cluster: use etcd_cluster"),
        }
    }

    /// This farm's etcd cluster, e.g. to kill a member (a farm started on one).
    pub fn etcd_cluster(&mut self) -> &mut EtcdCluster {
        match &mut self.etcd {
            FarmEtcd::Cluster(cluster) => cluster,
            FarmEtcd::Single(_) => panic!("this farm runs on one etcd server"),
        }
    }

    /// The client URL(s) of this farm's etcd, as `--etcd` takes them.
    pub fn etcd_url(&self) -> String {
        self.etcd.urls()
    }

    /// A path in the test's scratch directory (for `--out`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// From now on the CLI calls (this farm's helpers included) send `token`.
    pub fn use_token(&mut self, token: &str) {
        self.token = Some(token.to_string());
    }

    /// The CLI pointed at this farm's coordinator, with this farm's token if it has one.
    fn command(&self, token: Option<&str>) -> Command {
        let mut cmd = longtake();
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("LONGTAKE_COORDINATOR", &self.url)
            .env_remove("LONGTAKE_TOKEN")
            .env_remove("LONGTAKE_CA_CERT");
        if let Some(dir) = &self.tls {
            cmd.env("LONGTAKE_CA_CERT", dir.join("ca.pem"));
        }
        if let Some(token) = token.or(self.token.as_deref()) {
            cmd.env("LONGTAKE_TOKEN", token);
        }
        cmd
    }

    /// Runs the CLI against this farm's coordinator.
    pub fn cli(&self, args: &[&str]) -> Run {
        Run::of(self.command(None), args)
    }

    /// Runs the CLI against this farm's coordinator as the holder of `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Run {
        Run::of(self.command(Some(token)), args)
    }

    /// Starts a long-running CLI command (e.g. `watch`) against this farm in the background.
    pub fn spawn_cli(&self, name: &str, args: &[&str]) -> Proc {
        let mut cmd = self.command(None);
        cmd.args(args);
        Proc::spawn(name, cmd)
    }

    /// The rest of the coordinator's ready line that starts with `prefix` (e.g. the URL after
    /// `coordinator metrics on `).
    pub fn coordinator_line(&mut self, prefix: &str) -> String {
        self.coordinator
            .as_mut()
            .expect("a running coordinator")
            .wait_for_line(prefix, READY)
    }

    /// What the coordinator wrote on stderr so far (its log).
    pub fn coordinator_stderr(&self) -> String {
        self.coordinator
            .as_ref()
            .map(|c| c.stderr())
            .unwrap_or_default()
    }

    /// `submit` with `spec` flags and `extra` (priority, name...); returns the job id.
    pub fn submit(&self, spec: &[String], extra: &[&str]) -> String {
        let mut args = vec!["submit"];
        args.extend(spec.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let run = self.cli(&args).ok();
        let id = run.stdout.trim().to_string();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "submit should print the job id alone: {}",
            run.describe()
        );
        id
    }

    /// `status ID --json`.
    pub fn job(&self, id: &str) -> Value {
        self.cli(&["status", id, "--json"]).ok().json()
    }

    /// `list --json`.
    pub fn jobs(&self) -> Vec<Value> {
        self.cli(&["list", "--json"]).ok().json_values()
    }

    /// `workers --json`.
    pub fn workers(&self) -> Vec<Value> {
        self.cli(&["workers", "--json"]).ok().json_values()
    }

    /// `(id, state)` of every worker the coordinator lists, sorted by id.
    pub fn worker_states(&self) -> Vec<(String, String)> {
        let mut states: Vec<(String, String)> = self
            .workers()
            .iter()
            .map(|w| (field(w, "id").to_string(), field(w, "state").to_string()))
            .collect();
        states.sort();
        states
    }

    /// [`wait_until`] that fails the test with every process's output.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        wait_until(what, timeout, probe).unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Waits until job `id` satisfies `ready`; fails at once if the job ends in another way.
    pub fn wait_job(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until(&format!("job {id}: {what}"), timeout, || {
            let job = self.job(id);
            if ready(&job) {
                return Ok(job);
            }
            let state = field(&job, "state");
            if matches!(state, "done" | "failed" | "cancelled") {
                panic!(
                    "job {id} ended {state} while waiting for {what}: {job}\n{}",
                    self.logs()
                );
            }
            Err(job.to_string())
        })
    }

    /// Waits until job `id` is done and returns it.
    pub fn wait_done(&self, id: &str, timeout: Duration) -> Value {
        self.wait_job(id, "state done", timeout, |j| j["state"] == "done")
    }

    /// Waits until job `id` is running with at least one step done.
    pub fn wait_running(&self, id: &str, timeout: Duration) -> Value {
        self.wait_job(id, "running with a step done", timeout, |j| {
            j["state"] == "running" && j["steps_done"].as_u64().unwrap_or(0) >= 1
        })
    }

    /// Every process's output, for failure messages.
    pub fn logs(&self) -> String {
        let mut logs = String::new();
        if let Some(c) = &self.coordinator {
            logs.push_str(&c.logs());
        }
        if let Some((standby, _)) = &self.standby {
            logs.push_str(&standby.logs());
        }
        for w in self.workers.values() {
            logs.push_str(&w.logs());
        }
        logs
    }
}
