//! The worker daemon: serves `WorkerService` to the coordinator, keeps this worker's record in
//! the cluster membership (idle / busy / draining, devices, models, labels), and runs one task at
//! a time with the model stack. On shutdown it stops taking tasks, finishes (or hands back) the
//! one it has, and leaves the membership.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::membership::Membership;

use crate::parallel::Timeouts;

/// A model this worker can run.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The built-in tiny Wan2.1 (seeded random weights), served as `tiny`.
    Tiny,
    /// A checkpoint directory in the diffusers layout, served under `name`.
    Checkpoint { name: String, dir: PathBuf },
}

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
    pub models: Vec<ModelSource>,
    /// Free-form placement labels (node, zone, ...).
    pub labels: BTreeMap<String, String>,
    /// Time-outs of the job's communication mesh.
    pub mesh_timeouts: Timeouts,
    /// How long a reservation waits for its task before the worker frees itself.
    pub reservation_timeout: Duration,
}

/// Everything that stops a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Membership(#[from] longtake_proto::membership::MembershipError),
    #[error("worker {id}: {message}")]
    Config { id: String, message: String },
    #[error("worker gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves `WorkerService` on `listener` and keeps the worker registered in `membership` until
/// `shutdown` resolves; then drains (finishes the running task) and leaves.
pub async fn run(
    config: DaemonConfig,
    membership: Arc<dyn Membership>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let _ = (config, membership, listener, shutdown);
    todo!("issue 4: worker daemon")
}
