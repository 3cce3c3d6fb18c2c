//! `WorkerService` over gRPC: each call translated to [`Control`], each refusal to its status
//! code (busy or draining: UNAVAILABLE; a task without its reservation: FAILED_PRECONDITION).

use std::pin::Pin;
use std::sync::Arc;

use longtake_proto::worker_service_server::WorkerService;
use longtake_proto::{
    AbortReply, AbortRequest, HealthRequest, ReserveReply, ReserveRequest, TaskEvent, TaskRequest,
    Worker,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::control::Control;
use super::slot::{Assignment, SlotError};

pub struct Service(pub Arc<Control>);

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
        let r = request.into_inner();
        let granted = self
            .0
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
        let stream = self.0.run_task(request.into_inner()).map_err(status)?;
        let open = stream.open;
        // The stream owns the mark: the worker stays in the farm until gRPC is done with it.
        let events = ReceiverStream::new(stream.events).map(move |event| {
            open.held();
            Ok(event)
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortReply>, Status> {
        let r = request.into_inner();
        let found = self.0.abort(&r.job_id, &r.reason).await;
        Ok(Response::new(AbortReply { found }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<Worker>, Status> {
        Ok(Response::new(self.0.record()))
    }
}
