//! The coordinator: takes render jobs from studios (`RenderService`), keeps them in a priority
//! queue and a job store, places each on a group of live idle workers that matches its layout,
//! drives the workers' tasks (`WorkerService`), encodes the frames rank 0 streams back into the
//! clip in the artifact directory, and serves it back (`FetchOutput`). Operators see the workers
//! through `ClusterService`.
//!
//! The spec rules (validation with field-named errors, resolution with a model's defaults) are
//! the job spec's, `longtake_proto::spec`; this crate links no model code.
//!
//! Modules, one job each: `record` (the job as the coordinator knows it: phase, specs, plan,
//! attempts; the protocol's `Job` is built from it at the gRPC edge), `queue` (priority,
//! FIFO within a priority), `placement` (which workers run a job), `jobs` (the job table and its
//! state machine, without I/O), `store` (job records, versioned JSON in etcd or in memory),
//! `artifacts` (where
//! outputs live, read back in chunks), `dispatch` (one attempt of a job on its workers over
//! `WorkerService`), `scheduler` (the job table behind its lock, the store writes, the live
//! worker view and the placement loop), `access` (API tokens: who the caller is, which jobs it
//! reaches), `leadership` (which of several coordinators on one etcd schedules, and the fence
//! on its writes), `metrics` (what `/metrics` exports), `service` (the thin gRPC edge), and
//! `encode` (frames → MP4 / PNG).

pub mod access;
pub mod artifacts;
pub mod dispatch;
pub mod encode;
pub mod input;
pub mod jobs;
pub mod leadership;
pub mod metrics;
pub mod placement;
pub mod queue;
pub mod record;
pub mod scheduler;
pub mod service;
pub mod store;

pub use scheduler::StepOverhead;
pub use store::{EtcdJobStore, InMemoryJobStore, JobStore, StoreError};

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::membership::Membership;

/// What specs the coordinator accepts; a spec over a limit is refused with InvalidArgument naming
/// the field and the limit.
pub use longtake_proto::spec::Limits;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub limits: Limits,
    /// Where finished outputs are written (`<dir>/<job id>/...`) and served from.
    pub artifact_dir: PathBuf,
    /// Attempts a job gets when its workers die or fail to start before it fails.
    pub max_attempts: u32,
    /// How long reserving and starting a job's ranks may take before the attempt is abandoned.
    pub start_timeout: Duration,
    /// Rank 0 of a job of one worker group checkpoints its denoiser state after every this
    /// many steps, and a lost attempt's job resumes from the last one (0: never).
    pub checkpoint_every: u32,
    /// Who may call the job API ([`access::Access::Open`]: everyone, as a local admin).
    pub access: access::Access,
    /// Ended jobs older than this (since they ended) are pruned with their records and
    /// artifacts (`None`: kept forever).
    pub retain_finished: Option<Duration>,
    /// How many ranks each owner may run at once (no limit by default).
    pub quotas: placement::RankQuotas,
    /// The coordinator's certificate: its API speaks TLS and it reaches workers over mutual
    /// TLS (`None`: plain gRPC, for a farm on loopback or the embedded farm).
    pub tls: Option<longtake_proto::tls::Tls>,
}

impl CoordinatorConfig {
    pub fn new(artifact_dir: PathBuf) -> Self {
        Self {
            limits: Limits::default(),
            artifact_dir,
            max_attempts: 3,
            start_timeout: Duration::from_secs(60),
            checkpoint_every: 1,
            access: access::Access::Open,
            quotas: placement::RankQuotas::default(),
            retain_finished: None,
            tls: None,
        }
    }
}

/// Everything that stops a coordinator from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Membership(#[from] longtake_proto::membership::MembershipError),
    #[error("artifact directory {dir}: {source}")]
    Artifacts {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A running coordinator: its job table, queue and scheduling loop. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    scheduler: scheduler::Scheduler,
    access: Arc<access::Access>,
    tls: Option<longtake_proto::tls::Tls>,
}

impl Coordinator {
    /// Loads the stored jobs (re-queuing those that were planned or running), subscribes to the
    /// membership and starts the scheduling loop.
    pub async fn start(
        config: CoordinatorConfig,
        membership: Arc<dyn Membership>,
        store: Arc<dyn JobStore>,
    ) -> Result<Self, CoordinatorError> {
        let access = Arc::new(config.access.clone());
        let tls = config.tls.clone();
        let scheduler = scheduler::Scheduler::start(config, membership, store).await?;
        Ok(Self {
            scheduler,
            access,
            tls,
        })
    }

    /// Serves `RenderService` and `ClusterService` on `listener` until `shutdown` resolves, then
    /// stops the coordinator (see [`Coordinator::stop`]).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), CoordinatorError> {
        use longtake_proto::cluster_service_server::ClusterServiceServer;
        use longtake_proto::render_service_server::RenderServiceServer;
        use longtake_proto::MAX_MESSAGE_BYTES;

        let render = RenderServiceServer::new(service::Service::new(
            self.scheduler.clone(),
            self.access.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let cluster = ClusterServiceServer::new(service::Service::new(
            self.scheduler.clone(),
            self.access.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let incoming = longtake_proto::serving::incoming(listener);
        // stopped before the server drains its connections: the drain waits for open streams,
        // and a job's watch ends only when the scheduler stops
        let stopping = self.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.stop();
        };
        let served = longtake_proto::serving::server_with_tls(
            self.tls.as_ref().map(|tls| tls.server(false)),
        )?
        .add_service(render)
        .add_service(cluster)
        .serve_with_incoming_shutdown(incoming.connections, shutdown)
        .await;
        self.stop();
        Ok(served?)
    }

    /// Stops the scheduling loop and abandons the running attempts without recording their end,
    /// as a crash would: their workers see the task streams close and abort, and the next
    /// coordinator over the same store re-queues those jobs.
    pub fn stop(&self) {
        self.scheduler.stop();
    }

    /// What the coordinator's `/metrics` exports (see `longtake_proto::metrics::serve`).
    pub fn metrics(&self) -> Arc<dyn longtake_proto::metrics::Scrape> {
        Arc::new(self.scheduler.clone())
    }

    /// The coordinator's own time per denoising step so far: from rank 0's step event arriving
    /// to the job event being broadcast to watchers.
    pub fn step_overhead(&self) -> StepOverhead {
        self.scheduler.step_overhead()
    }
}
