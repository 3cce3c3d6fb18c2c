//! A throw-away etcd server for tests: Debian's `etcd` binary on free loopback ports with a
//! temporary data directory, killed (and its directory removed) on drop. Tests that need etcd
//! fail with a message saying how to install it rather than skipping.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd server owned by a test.
pub struct EtcdServer {
    child: Child,
    client_url: String,
    /// The port of plain-HTTP `/health` (the client port itself, or with TLS a metrics port).
    health_port: u16,
    data: tempfile::TempDir,
}

/// The TLS an [`EtcdServer`] serves its clients with: its certificate and key, and the CA
/// every client certificate must come from (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A loopback port that was free a moment ago: nothing listens on it (for "unreachable" tests),
/// and a server may bind it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl EtcdServer {
    /// Starts etcd and waits until it answers on its client port (panics with the reason if it
    /// cannot: missing binary, or no answer within 60 s). The free ports are only free a
    /// moment ago, so a parallel test can take one first: an etcd that exits at start is
    /// started again on other ports, three times at most.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`EtcdServer::start`], serving clients over TLS and only to holders of a
    /// certificate of `tls.ca` (the client URL is `https://`).
    pub fn start_tls(tls: &EtcdServerTls) -> Self {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&EtcdServerTls>) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start_cluster(1, tls) {
                Ok(mut members) => return members.remove(0),
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd did not start: {}", failures.join("; "));
    }

    /// Starts `size` members of one new cluster, all of them before waiting for any: a member
    /// is healthy only once a quorum has elected a leader.
    fn try_start_cluster(size: usize, tls: Option<&EtcdServerTls>) -> Result<Vec<Self>, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let names: Vec<String> = (0..size).map(|i| format!("member{i}")).collect();
        let peer_urls: Vec<String> = (0..size)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial_cluster = names
            .iter()
            .zip(&peer_urls)
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, peer_url) in names.iter().zip(&peer_urls) {
            let data = tempfile::tempdir().expect("temporary directory for etcd");
            let client_url = format!("{scheme}://127.0.0.1:{}", free_port());
            let log = std::fs::File::create(data.path().join("etcd.log")).expect("etcd log file");
            let mut command =
                Command::new(std::env::var("LONGTAKE_ETCD_BIN").unwrap_or("etcd".into()));
            let mut health_port = client_url.rsplit(':').next().and_then(|p| p.parse().ok());
            if let Some(tls) = tls {
                let metrics = free_port();
                health_port = Some(metrics);
                command
                    .arg("--cert-file")
                    .arg(&tls.cert)
                    .arg("--key-file")
                    .arg(&tls.key)
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca)
                    .arg("--client-cert-auth")
                    .args([
                        "--listen-metrics-urls",
                        &format!("http://127.0.0.1:{metrics}"),
                    ]);
            }
            let child = command
                .args(["--name", name, "--data-dir"])
                .arg(data.path().join("data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", peer_url])
                .args(["--initial-advertise-peer-urls", peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start etcd ({e}); install it with tests/setup.sh (Debian: apt-get install etcd-server)")
                });
            members.push(Self {
                child,
                client_url,
                health_port: health_port.expect("the client URL ends in its port"),
                data,
            });
        }
        for member in &mut members {
            member.wait_ready()?;
        }
        Ok(members)
    }

    /// `Err` when etcd exited at start (its log's last line says why, e.g. a port in use).
    fn wait_ready(&mut self) -> Result<(), String> {
        // A hang guard, not a speed check: etcd is up when its health answers.
        let guard = Duration::from_secs(60);
        let deadline = Instant::now() + guard;
        let health = format!("127.0.0.1:{}", self.health_port);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default();
                let last = log.lines().last().unwrap_or("no log").to_string();
                return Err(format!("etcd exited at start with {status}: {last}"));
            }
            if let Ok(mut stream) = std::net::TcpStream::connect(&health) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let request = "GET /health HTTP/1.0\r\n\r\n";
                let mut reply = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut reply).is_ok()
                    && reply.contains("\"health\":\"true\"")
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "hang guard ({guard:?}): etcd did not become healthy at {}",
            self.client_url
        );
    }

    /// Stops the etcd process (SIGSTOP): to its clients an outage (a partition, a hung node)
    /// until [`EtcdServer::resume`]; its data and ports stay.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill {signal} etcd failed");
    }

    /// The client URL, e.g. `http://127.0.0.1:23791`.
    pub fn url(&self) -> &str {
        &self.client_url
    }
}

/// A cluster of etcd members on loopback, for tests of a farm that loses one of them.
pub struct EtcdCluster {
    members: Vec<Option<EtcdServer>>,
    urls: Vec<String>,
}

impl EtcdCluster {
    /// Starts `size` members (panics with the reason if they cannot start, as
    /// [`EtcdServer::start`]); plain HTTP.
    pub fn start(size: usize) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match EtcdServer::try_start_cluster(size, None) {
                Ok(members) => {
                    return Self {
                        urls: members.iter().map(|m| m.url().to_string()).collect(),
                        members: members.into_iter().map(Some).collect(),
                    }
                }
                Err(why) => failures.push(why),
            }
        }
        panic!("etcd cluster did not start: {}", failures.join("; "));
    }

    /// Every member's client URL, comma-separated (as `--etcd` takes them), the killed ones
    /// included: a client configured before a loss still names the dead member.
    pub fn urls(&self) -> String {
        self.urls.join(",")
    }

    /// Kills member `index` (SIGKILL), leaving the others a quorum for a cluster of three.
    pub fn kill(&mut self, index: usize) {
        self.members[index] = None;
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
