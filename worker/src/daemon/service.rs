//! `WorkerService` over gRPC: each call translated to [`Control`], each refusal to its status
//! code (busy or draining: UNAVAILABLE; a task without its reservation: FAILED_PRECONDITION).
//! On a farm with TLS every call must come from the coordinator: a peer whose certificate does
//! not prove the coordinator role is PERMISSION_DENIED (the handshake already refused anyone
//! without a certificate of the farm's CA).

use std::pin::Pin;
use std::sync::Arc;

use longtake_proto::tls::{peer_has_role, COORDINATOR_NAME};
use longtake_proto::worker_service_server::WorkerService;
use longtake_proto::{
    AbortReply, AbortRequest, HealthRequest, ReserveReply, ReserveRequest, TaskEvent, TaskRequest,
    Worker,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::control::Control;
use super::metrics::WorkerMetrics;
use super::slot::{Assignment, SlotError};

pub struct Service {
    control: Arc<Control>,
    /// Whether callers must prove the coordinator role (a worker started with TLS).
    coordinator_only: bool,
    metrics: Arc<WorkerMetrics>,
}

impl Service {
    pub fn new(control: Arc<Control>, coordinator_only: bool, metrics: Arc<WorkerMetrics>) -> Self {
        Self {
            control,
            coordinator_only,
            metrics,
        }
    }

    fn check_caller<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        if !self.coordinator_only || peer_has_role(request, COORDINATOR_NAME) {
            return Ok(());
        }
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        tracing::warn!(target: "longtake::audit", call, %peer, "refused: not the coordinator");
        Err(Status::permission_denied(format!(
            "{call}: only the farm's coordinator may call a worker (its certificate names \
             {COORDINATOR_NAME})"
        )))
    }
}

fn status(err: SlotError) -> Status {
    let message = err.to_string();
    match err {
        SlotError::Draining { .. } | SlotError::Busy { .. } => Status::unavailable(message),
        SlotError::NotReserved { .. } => Status::failed_precondition(message),
        SlotError::InvalidArgument(_) => Status::invalid_argument(message),
        SlotError::Bind { .. } => Status::internal(message),
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for Service {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveReply>, Status> {
        self.check_caller(&request, "Reserve")?;
        let r = request.into_inner();
        let granted = self
            .control
            .reserve(Assignment {
                job_id: r.job_id,
                attempt: r.attempt,
                rank: r.rank,
                world_size: r.world_size,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(ReserveReply {
            mesh_address: granted.mesh_address,
        }))
    }

    type RunTaskStream = TaskStream;

    async fn run_task(
        &self,
        request: Request<TaskRequest>,
    ) -> Result<Response<Self::RunTaskStream>, Status> {
        self.check_caller(&request, "RunTask")?;
        let parent = longtake_proto::telemetry::extract(request.metadata());
        let stream = self
            .control
            .run_task(request.into_inner(), parent)
            .map_err(status)?;
        let open = stream.open;
        let metrics = self.metrics.clone();
        // The stream owns the mark: the worker stays in the farm until gRPC is done with it.
        let events = ReceiverStream::new(stream.events).map(move |event| {
            open.held();
            metrics.observe(&event);
            Ok(event)
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortReply>, Status> {
        self.check_caller(&request, "Abort")?;
        let r = request.into_inner();
        let found = self.control.abort(&r.job_id, &r.reason).await;
        Ok(Response::new(AbortReply { found }))
    }

    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<Worker>, Status> {
        self.check_caller(&request, "Health")?;
        Ok(Response::new(self.control.record()))
    }
}
