//! The worker daemon: serves `WorkerService` to the coordinator, keeps this worker's record in
//! the cluster membership (idle / busy / draining, devices, models, labels), and runs one task at
//! a time with the model stack. On shutdown it stops taking tasks, finishes (or hands back) the
//! one it has, and leaves the membership.

mod control;
pub mod metrics;
pub mod models;
mod service;
pub mod slot;
pub mod system;
pub mod task;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::membership::Membership;
use longtake_proto::worker_service_server::WorkerServiceServer;
use longtake_proto::{WorkerState, MAX_MESSAGE_BYTES};

use crate::model::device::{parse_device, parse_dtype, DeviceError};
use crate::parallel::Timeouts;
use control::{Control, Identity};
pub use models::{ModelError, ModelSource};
use task::TaskRunner;

/// How a worker daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Unique id in the farm (the membership key).
    pub id: String,
    /// Host name or IP address the coordinator and the other ranks reach this worker at; its
    /// gRPC port is the listener's, its mesh listeners bind this host on a free port.
    pub advertise_host: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`; `None`: f32 on CPU, bf16 on CUDA.
    pub dtype: Option<String>,
    /// What it serves; empty: the tiny model.
    pub models: Vec<ModelSource>,
    /// Free-form placement labels (node, zone, ...).
    pub labels: BTreeMap<String, String>,
    /// Time-outs of the job's communication mesh.
    pub mesh_timeouts: Timeouts,
    /// How long a reservation waits for its task before the worker frees itself.
    pub reservation_timeout: Duration,
    /// What the daemon has done, counted (shared: the caller keeps a clone to read them).
    pub counters: Arc<DaemonCounters>,
    /// The worker's certificate: it serves over mutual TLS, to the farm's coordinator alone
    /// (`None`: plain gRPC, for a farm on loopback or the embedded farm).
    pub tls: Option<longtake_proto::tls::Tls>,
    /// Its Prometheus metrics (shared: whoever serves `/metrics` keeps a clone).
    pub metrics: Arc<metrics::WorkerMetrics>,
}

/// Counts of what a daemon did, read by whoever holds the `Arc` (tests, a future metrics
/// exporter): events, not timings, so that a check on them cannot pass by luck of the clock.
#[derive(Debug, Default)]
pub struct DaemonCounters {
    /// Pipelines loaded from their source (a task that reuses the cached one loads none).
    pub pipelines_loaded: AtomicU64,
    /// Denoising steps finished, over every task.
    pub steps_run: AtomicU64,
}

impl DaemonCounters {
    pub fn pipelines_loaded(&self) -> u64 {
        self.pipelines_loaded.load(Ordering::SeqCst)
    }

    pub fn steps_run(&self) -> u64 {
        self.steps_run.load(Ordering::SeqCst)
    }
}

/// Everything that stops a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Membership(#[from] longtake_proto::membership::MembershipError),
    #[error("worker {id}: {message}")]
    Config { id: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("worker gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl DaemonConfig {
    /// A worker on the CPU in f32 serving the default model (`toy`), with default time-outs.
    pub fn new(id: impl Into<String>, advertise_host: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            advertise_host: advertise_host.into(),
            device: "cpu".into(),
            dtype: None,
            models: vec![ModelSource::Toy],
            labels: BTreeMap::new(),
            mesh_timeouts: Timeouts::default(),
            reservation_timeout: DEFAULT_RESERVATION_TIMEOUT,
            counters: Arc::default(),
            tls: None,
            metrics: Arc::default(),
        }
    }
}

/// How long a reservation waits for its RunTask by default: the coordinator sends it right after
/// every rank has answered Reserve.
pub const DEFAULT_RESERVATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `WorkerService` on `listener` and keeps the worker registered in `membership` until
/// `shutdown` resolves; then drains (finishes the running task) and leaves.
///
/// The device, dtype and every model are checked before the worker registers, so a bad
/// configuration fails here and never shows up in the farm.
pub async fn run(
    config: DaemonConfig,
    membership: Arc<dyn Membership>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let config_err = |message: String| DaemonError::Config {
        id: config.id.clone(),
        message,
    };
    if config.id.trim().is_empty() {
        return Err(config_err("the worker id is empty; pass --id".into()));
    }
    if config.advertise_host.trim().is_empty() {
        return Err(config_err(
            "the advertised host is empty; pass --advertise HOST".into(),
        ));
    }
    let device = parse_device(&config.device)?;
    let dtype = parse_dtype(config.dtype.as_deref(), &device)?;
    config.metrics.watch_device(&device);
    let models = models::Models::open(&config.models)?;
    let port = listener
        .local_addr()
        .map_err(|e| config_err(format!("the gRPC listener has no address: {e}")))?
        .port();
    let address = if config.advertise_host.contains(':') {
        format!("[{}]:{port}", config.advertise_host)
    } else {
        format!("{}:{port}", config.advertise_host)
    };
    let identity = Identity {
        id: config.id.clone(),
        address,
        advertise_host: config.advertise_host.clone(),
        devices: vec![system::device_info(&device)],
        memory_bytes: system::host_memory_bytes(),
        labels: config.labels.clone().into_iter().collect(),
        models: models.infos(),
        started_at_ms: longtake_proto::now_ms(),
    };
    let runner = TaskRunner::new(device, dtype, config.mesh_timeouts.clone())
        .with_counters(config.counters.clone());
    let control = Arc::new(Control::new(
        identity,
        models,
        runner,
        config.reservation_timeout,
    ));
    let record = control.record();
    debug_assert_eq!(record.state, WorkerState::Idle as i32);
    control
        .set_registration(membership.register(record).await?)
        .await;
    tracing::info!(worker = %control.id(), "registered");

    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    let drainer = control.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!(worker = %drainer.id(), "draining");
        let _ = left_tx.send(drainer.drain().await);
    };
    let service = WorkerServiceServer::new(service::Service::new(
        control.clone(),
        config.tls.is_some(),
        config.metrics.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = longtake_proto::serving::incoming(listener);
    longtake_proto::serving::server_with_tls(config.tls.as_ref().map(|tls| tls.server(true)))?
        .add_service(service)
        .serve_with_incoming_shutdown(incoming.connections, stop)
        .await?;
    // No answer: the server stopped on its own, and the registration goes with `control`.
    if let Ok(left) = left_rx.await {
        left?;
    }
    tracing::info!(worker = %control.id(), "left");
    Ok(())
}
