//! The gRPC edge: `RenderService` and `ClusterService` over the [`Scheduler`], mapping its errors
//! to status codes (INVALID_ARGUMENT naming the spec field, NOT_FOUND `no job <id>`,
//! FAILED_PRECONDITION for fetching an unfinished job, UNAVAILABLE when the store refuses).

use std::pin::Pin;

use longtake_proto::cluster_service_server::ClusterService;
use longtake_proto::render_service_server::RenderService;
use longtake_proto::{
    CancelRequest, Job, JobEvent, JobRequest, JobState, ListReply, ListRequest, ListWorkersReply,
    ListWorkersRequest, OutputChunk, SubmitReply, SubmitRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::artifacts;
use crate::jobs::TableError;
use crate::record::JobPhase;
use crate::scheduler::{Scheduler, SubmitError};

/// Chunks or events in flight to one client before the sender waits.
const STREAM_BUFFER: usize = 16;

pub struct Service {
    scheduler: Scheduler,
}

impl Service {
    pub fn new(scheduler: Scheduler) -> Self {
        Self { scheduler }
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no job {id}"))
}

fn table_status(e: TableError) -> Status {
    match e {
        TableError::NotFound(id) => not_found(&id),
        e @ (TableError::Spec(_) | TableError::Name(_) | TableError::InvalidRequestId(_)) => {
            Status::invalid_argument(e.to_string())
        }
        e @ TableError::RequestIdReused { .. } => Status::already_exists(e.to_string()),
    }
}

/// Whether an event leaves its job ended (the last event a watcher gets).
fn ends_the_job(event: &JobEvent) -> bool {
    JobPhase::from_proto(event.state).is_some_and(JobPhase::is_ended)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RenderService for Service {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitReply>, Status> {
        let r = request.into_inner();
        let spec = r.spec.unwrap_or_default();
        match self
            .scheduler
            .submit(&spec, r.priority, &r.name, &r.request_id)
            .await
        {
            Ok(job) => Ok(Response::new(SubmitReply {
                job: Some(Job::from(&job)),
            })),
            Err(SubmitError::Invalid(e)) => Err(table_status(e)),
            Err(e @ SubmitError::Store(_)) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn get(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().id;
        self.scheduler
            .get(&id)
            .await
            .map(|job| Response::new(Job::from(&job)))
            .ok_or_else(|| not_found(&id))
    }

    type WatchStream = BoxStream<JobEvent>;

    async fn watch(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().id;
        let (mut opening, mut events) = self
            .scheduler
            .watch(&id)
            .await
            .ok_or_else(|| not_found(&id))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            let Some(mut last) = opening.pop() else {
                return;
            };
            for event in opening {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let end = ends_the_job(&last);
                if tx.send(Ok(last)).await.is_err() || end {
                    return;
                }
                last = match events.recv().await {
                    Ok(event) => event,
                    // fell behind: the job's state now stands for what was missed
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match scheduler.current_event(&id).await {
                            Some(event) => event,
                            None => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<Job>, Status> {
        let r = request.into_inner();
        self.scheduler
            .cancel(&r.id, &r.reason)
            .await
            .map(|job| Response::new(Job::from(&job)))
            .map_err(table_status)
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        // All jobs when no state is asked for; a state number this build does not know
        // matches none.
        let states = request.into_inner().states;
        let wanted =
            |phase: JobPhase| states.is_empty() || states.contains(&(JobState::from(phase) as i32));
        let jobs = self.scheduler.list(wanted).await;
        Ok(Response::new(ListReply {
            jobs: jobs.iter().map(Job::from).collect(),
        }))
    }

    type FetchOutputStream = BoxStream<OutputChunk>;

    async fn fetch_output(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::FetchOutputStream>, Status> {
        let id = request.into_inner().id;
        let job = self
            .scheduler
            .get(&id)
            .await
            .ok_or_else(|| not_found(&id))?;
        if job.phase != JobPhase::Done {
            let state = job.phase.name();
            let hint = if job.phase.is_ended() {
                "it has no output".to_string()
            } else {
                "fetch it when it is done".to_string()
            };
            return Err(Status::failed_precondition(format!(
                "job {id} is {state}; {hint}"
            )));
        }
        let files = self.scheduler.artifacts().files(&job).map_err(|e| {
            Status::internal(format!(
                "the output of job {id} is missing from the artifact directory {}: {e}",
                self.scheduler.artifacts().dir().display()
            ))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::task::spawn_blocking(move || {
            let read = artifacts::read_chunks(&files, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
            if let Err(e) = read {
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "reading the output of job {id}: {e}"
                ))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl ClusterService for Service {
    async fn list_workers(
        &self,
        _request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersReply>, Status> {
        Ok(Response::new(ListWorkersReply {
            workers: self.scheduler.workers(),
        }))
    }
}
