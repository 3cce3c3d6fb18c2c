//! The farm `render` starts in this process when no coordinator is named: a coordinator with
//! in-process membership and an in-memory job store, and local worker daemons, all talking gRPC
//! over loopback exactly as a real farm does, with the artifacts in a temporary directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use longtake_coordinator::{Coordinator, CoordinatorConfig, InMemoryJobStore};
use longtake_proto::membership::{InProcessMembership, Membership};
use longtake_worker::daemon::{self, DaemonConfig, ModelSource};
use longtake_worker::parallel::Timeouts;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How a worker waits for its task after the coordinator reserved it.
const RESERVATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What the embedded farm runs.
#[derive(Debug, Clone)]
pub struct FarmOptions {
    pub workers: usize,
    /// `tiny` or a checkpoint directory; the workers serve it under this same name, so the
    /// spec's `model` needs no translation.
    pub model: String,
    pub device: String,
    pub dtype: Option<String>,
}

/// A running embedded farm.
pub struct Farm {
    url: String,
    stop: watch::Sender<bool>,
    coordinator: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    /// A part that stopped on its own (a worker that could not start, say): the render cannot
    /// go on, and waiting for it would hang.
    failures: mpsc::UnboundedReceiver<anyhow::Error>,
    _artifacts: tempfile::TempDir,
}

impl Farm {
    pub async fn start(options: FarmOptions) -> Result<Self> {
        let artifacts = tempfile::Builder::new()
            .prefix("longtake-artifacts-")
            .tempdir()
            .context("cannot create a temporary artifact directory")?;
        let membership: Arc<dyn Membership> = Arc::new(InProcessMembership::new());
        let store = Arc::new(InMemoryJobStore::new());
        let (stop, _) = watch::channel(false);
        let (failed, failures) = mpsc::unbounded_channel();

        let config = CoordinatorConfig::new(artifacts.path().to_path_buf());
        let coordinator = Coordinator::start(config, membership.clone(), store)
            .await
            .context("embedded coordinator")?;
        let listener = loopback().await?;
        let url = format!("http://{}", listener.local_addr()?);
        let coordinator = {
            let (shutdown, failed) = (stopped(&stop), failed.clone());
            tokio::spawn(async move {
                let outcome = coordinator.serve(listener, shutdown).await;
                report("the embedded coordinator", outcome, &failed);
            })
        };

        let mut workers = Vec::new();
        for rank in 0..options.workers {
            let config = worker_config(&options, rank);
            let listener = loopback().await?;
            let (membership, shutdown, failed) =
                (membership.clone(), stopped(&stop), failed.clone());
            let what = format!("embedded worker {}", config.id);
            workers.push(tokio::spawn(async move {
                let outcome = daemon::run(config, membership, listener, shutdown).await;
                report(&what, outcome, &failed);
            }));
        }
        Ok(Self {
            url,
            stop,
            coordinator,
            workers,
            failures,
            _artifacts: artifacts,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Resolves when a part of the farm stopped by itself, with why.
    pub async fn failure(&mut self) -> anyhow::Error {
        self.failures
            .recv()
            .await
            .unwrap_or_else(|| anyhow!("the embedded farm stopped"))
    }

    /// Stops the workers (they finish or hand back their task and leave), then the coordinator,
    /// and removes the artifacts.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        let _ = self.coordinator.await;
    }
}

fn worker_config(options: &FarmOptions, rank: usize) -> DaemonConfig {
    let model = if options.model == "tiny" {
        ModelSource::Tiny
    } else {
        ModelSource::Checkpoint {
            name: options.model.clone(),
            dir: PathBuf::from(&options.model),
        }
    };
    DaemonConfig {
        id: format!("local-{rank}"),
        advertise_host: "127.0.0.1".into(),
        device: options.device.clone(),
        dtype: options.dtype.clone(),
        models: vec![model],
        labels: BTreeMap::from([("node".to_string(), "local".to_string())]),
        mesh_timeouts: Timeouts::default(),
        reservation_timeout: RESERVATION_TIMEOUT,
    }
}

async fn loopback() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1 for the embedded farm")
}

/// A future that resolves once `stop` is sent (or the farm is dropped).
fn stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// Passes on how a part ended; ending cleanly is a failure too unless the farm was stopping,
/// which the receiver no longer listens for by then.
fn report<E: std::error::Error + Send + Sync + 'static>(
    what: &str,
    outcome: Result<(), E>,
    failed: &mpsc::UnboundedSender<anyhow::Error>,
) {
    let error = match outcome {
        Ok(()) => anyhow!("{what} stopped"),
        Err(err) => anyhow::Error::new(err).context(what.to_string()),
    };
    let _ = failed.send(error);
}
