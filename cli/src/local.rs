//! A whole farm in one process, for the farm tests, the farm benchmark and the CLI's embedded
//! farm (`longtake render` with no coordinator named): coordinators over one
//! in-process membership and one in-memory job store, serving gRPC on loopback ports, and real
//! worker daemons registered in that membership. Every part talks over real sockets, exactly as
//! in a deployed farm; only etcd is replaced by the in-process membership and store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use longtake_proto::membership::{InProcessMembership, Membership};
use longtake_worker::daemon::{self, DaemonConfig, DaemonError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use longtake_coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorError, InMemoryJobStore, JobStore,
};

/// How long a started worker may take to appear in the membership.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a part of a local farm did not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum LocalFarmError {
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[from] std::io::Error),
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("worker {0} did not register within {REGISTRATION_TIMEOUT:?}")]
    NotRegistered(String),
    #[error("worker {0} stopped before it registered")]
    StoppedEarly(String),
    #[error("{0} stopped on its own")]
    Ended(String),
    #[error("{what} panicked: {message}")]
    Panicked { what: String, message: String },
}

/// The membership, job store and artifact directory the parts of a local farm share.
pub struct LocalFarm {
    pub membership: Arc<InProcessMembership>,
    pub store: Arc<InMemoryJobStore>,
    pub artifact_dir: PathBuf,
}

/// A coordinator or worker serving on a loopback port until [`Served::stop`] (or until dropped,
/// which stops it without waiting).
pub struct Served {
    url: String,
    what: String,
    stop: Option<oneshot::Sender<()>>,
    /// `None` once [`Served::ended`] has seen it end: a finished task cannot be awaited again.
    task: Option<JoinHandle<Result<(), LocalFarmError>>>,
}

impl Served {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks it to stop (a worker drains its task first) and waits until it has. After
    /// [`Served::ended`] resolved there is nothing left to stop, and this is `Ok`.
    pub async fn stop(mut self) -> Result<(), LocalFarmError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match &mut self.task {
            Some(task) => join(&self.what, task).await,
            None => Ok(()),
        }
    }

    /// Resolves when it stopped without being asked to, with why; whoever waits on it would
    /// otherwise hang. Cancel-safe.
    pub async fn ended(&mut self) -> LocalFarmError {
        let Some(task) = &mut self.task else {
            return std::future::pending().await;
        };
        let outcome = join(&self.what, task).await;
        self.task = None;
        outcome
            .err()
            .unwrap_or_else(|| LocalFarmError::Ended(self.what.clone()))
    }
}

async fn join(
    what: &str,
    task: &mut JoinHandle<Result<(), LocalFarmError>>,
) -> Result<(), LocalFarmError> {
    match task.await {
        Ok(result) => result,
        Err(e) => Err(LocalFarmError::Panicked {
            what: what.to_string(),
            message: e.to_string(),
        }),
    }
}

impl LocalFarm {
    /// A farm with no parts yet; outputs go under `artifact_dir`.
    pub fn new(artifact_dir: impl Into<PathBuf>) -> Self {
        Self {
            membership: Arc::new(InProcessMembership::new()),
            store: Arc::new(InMemoryJobStore::new()),
            artifact_dir: artifact_dir.into(),
        }
    }

    /// A coordinator over this farm's membership and store with the default configuration.
    pub async fn coordinator(&self) -> Result<(Coordinator, Served), LocalFarmError> {
        self.coordinator_with(
            CoordinatorConfig::new(self.artifact_dir.clone()),
            self.membership.clone(),
        )
        .await
    }

    /// A coordinator over this farm's job store that sees the workers of `membership` (another
    /// membership shows a coordinator restarted where no worker is visible yet).
    pub async fn coordinator_with(
        &self,
        config: CoordinatorConfig,
        membership: Arc<InProcessMembership>,
    ) -> Result<(Coordinator, Served), LocalFarmError> {
        let membership: Arc<dyn Membership> = membership;
        let store: Arc<dyn JobStore> = self.store.clone();
        let coordinator = Coordinator::start(config, membership, store).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = coordinator.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            Ok(serving.serve(listener, shutdown).await?)
        });
        let served = Served {
            url,
            what: "the coordinator".into(),
            stop: Some(stop),
            task: Some(task),
        };
        Ok((coordinator, served))
    }

    /// Starts a worker daemon in this farm and returns once it is in the membership (so a job
    /// submitted next can be placed on it at once).
    pub async fn worker(&self, config: DaemonConfig) -> Result<Served, LocalFarmError> {
        let id = config.id.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let membership: Arc<dyn Membership> = self.membership.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            Ok(daemon::run(config, membership, listener, shutdown).await?)
        });
        let what = format!("worker {id}");
        let deadline = Instant::now() + REGISTRATION_TIMEOUT;
        loop {
            let listed = self.membership.list().await.unwrap_or_default();
            if listed.iter().any(|w| w.id == id) {
                break;
            }
            if task.is_finished() {
                join(&what, &mut task).await?;
                return Err(LocalFarmError::StoppedEarly(id));
            }
            if Instant::now() > deadline {
                task.abort();
                return Err(LocalFarmError::NotRegistered(id));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Served {
            url,
            what,
            stop: Some(stop),
            task: Some(task),
        })
    }
}
