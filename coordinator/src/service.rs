//! The gRPC edge: `RenderService` and `ClusterService` over the [`Scheduler`], mapping its errors
//! to status codes (INVALID_ARGUMENT naming the spec field, NOT_FOUND `no job <id>`,
//! FAILED_PRECONDITION for fetching an unfinished job, UNAVAILABLE when the store refuses).
//!
//! Every call first names its caller by the farm's [`Access`] rule (UNAUTHENTICATED without a
//! token the farm knows); a job of another owner is NOT_FOUND, as a job that does not exist,
//! so ids cannot be probed. Job actions and refusals are logged on the `longtake::audit` target
//! (who, what, which job, from where); no token ever is.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::cluster_service_server::ClusterService;
use longtake_proto::render_service_server::RenderService;
use longtake_proto::spec::{InputKind, JobInput, SpecRequest};
use longtake_proto::submit_part;
use longtake_proto::telemetry;
use longtake_proto::{
    CancelRequest, Job, JobEvent, JobRequest, JobState, ListReply, ListRequest, ListWorkersReply,
    ListWorkersRequest, OutputChunk, SubmitPart, SubmitReply, SubmitRequest,
};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Access, Caller};
use crate::artifacts::{self, StagedInput};
use crate::jobs::TableError;
use crate::record::{JobPhase, JobRecord};
use crate::scheduler::{Scheduler, Submission, SubmitError};

/// Chunks or events in flight to one client before the sender waits.
const STREAM_BUFFER: usize = 16;

/// Uploads taken at once: each is held in memory (up to the farm's input limit) while it is
/// read, so this bounds what uploads can take.
const UPLOADS_AT_ONCE: usize = 4;

/// How long an upload waits for its turn, and how long it may take once taken: a client that
/// stalls mid-file does not hold a slot for good.
const UPLOAD_WAIT: Duration = Duration::from_secs(60);
const UPLOAD_TIME: Duration = Duration::from_secs(600);

pub struct Service {
    scheduler: Scheduler,
    access: Arc<Access>,
    uploads: Arc<Semaphore>,
}

impl Service {
    pub fn new(scheduler: Scheduler, access: Arc<Access>) -> Self {
        Self {
            scheduler,
            access,
            uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
        }
    }

    /// The caller `request` comes from, or UNAUTHENTICATED saying what is missing.
    fn caller<T>(&self, request: &Request<T>, action: &str) -> Result<Caller, Status> {
        let header = request.metadata().get(AUTHORIZATION);
        let named = match header.map(|value| value.to_str()) {
            None => self.access.caller(None),
            Some(Ok(value)) => self.access.caller(Some(value)),
            Some(Err(_)) => Err(crate::access::AccessError::Malformed),
        };
        named.map_err(|e| {
            tracing::warn!(
                target: AUDIT,
                action,
                peer = %peer(request),
                "refused: {e}"
            );
            Status::unauthenticated(e.to_string())
        })
    }

    /// Job `id` if `caller` reaches it; NOT_FOUND as for a job that does not exist otherwise.
    async fn reachable_job(
        &self,
        caller: &Caller,
        id: &str,
        action: &str,
    ) -> Result<JobRecord, Status> {
        let job = self.scheduler.get(id).await.ok_or_else(|| not_found(id))?;
        if !caller.reaches(&job.owner) {
            tracing::warn!(
                target: AUDIT,
                caller = %caller,
                action,
                job = %id,
                owner = %job.owner,
                "refused: not the owner's"
            );
            return Err(not_found(id));
        }
        Ok(job)
    }
}

impl Service {
    /// Queues the job of `r` with `spec` (and its input file), logging who submitted it.
    async fn accept(
        &self,
        caller: &Caller,
        from: &str,
        r: &SubmitRequest,
        spec: &longtake_proto::RenderSpec,
        trace_parent: &str,
        input: Option<(StagedInput, InputKind)>,
    ) -> Result<Response<SubmitReply>, Status> {
        let submitted = self
            .scheduler
            .submit(
                Submission {
                    spec,
                    priority: r.priority,
                    name: &r.name,
                    request_id: &r.request_id,
                    owner: &caller.owner,
                    trace_parent,
                },
                input,
            )
            .await;
        match submitted {
            Ok(job) => {
                tracing::info!(
                    target: AUDIT,
                    caller = %caller,
                    action = "submit",
                    job = %job.id,
                    peer = %from,
                    request_id = %r.request_id,
                );
                Ok(Response::new(SubmitReply {
                    job: Some(Job::from(&job)),
                }))
            }
            Err(SubmitError::Invalid(e)) => Err(table_status(e)),
            Err(e @ (SubmitError::Store(_) | SubmitError::Input(_))) => {
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

/// The submitting command's trace context: every attempt of the job joins it.
fn submission_trace<T>(request: &Request<T>) -> String {
    let submission = tracing::info_span!("submit");
    telemetry::adopt(&submission, telemetry::extract(request.metadata()));
    telemetry::traceparent(&submission)
}

/// The metadata key of the API token (`Bearer TOKEN`).
pub const AUTHORIZATION: &str = "authorization";

/// The tracing target of the audit log: one line per job action and per refusal.
pub const AUDIT: &str = "longtake::audit";

fn peer<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into())
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
        e @ TableError::OverQuota { .. } => Status::resource_exhausted(e.to_string()),
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
        let caller = self.caller(&request, "submit")?;
        let from = peer(&request);
        let trace_parent = submission_trace(&request);
        let r = request.into_inner();
        let spec = r.spec.clone().unwrap_or_default();
        if spec.input.is_some() {
            return Err(Status::invalid_argument(
                "spec.input: a job with an input file is submitted with SubmitWithInput, which \
                 carries the file",
            ));
        }
        self.accept(&caller, &from, &r, &spec, &trace_parent, None)
            .await
    }

    async fn submit_with_input(
        &self,
        request: Request<Streaming<SubmitPart>>,
    ) -> Result<Response<SubmitReply>, Status> {
        let caller = self.caller(&request, "submit")?;
        let from = peer(&request);
        let trace_parent = submission_trace(&request);
        let mut parts = request.into_inner();
        let first = parts.message().await?.and_then(|p| p.part);
        let Some(submit_part::Part::Request(r)) = first else {
            return Err(Status::invalid_argument(
                "SubmitWithInput: the first part must be the SubmitRequest, the file's bytes \
                 after it",
            ));
        };
        let mut spec = r.spec.clone().unwrap_or_default();
        let kind =
            match JobInput::from_proto(spec.input.as_ref()) {
                Ok(Some(input)) => input.kind,
                Ok(None) => return Err(Status::invalid_argument(
                    "spec.input: unset: say what the file is (a picture or a clip to extend); a \
                     job without a file is submitted with Submit",
                )),
                Err(e) => return Err(Status::invalid_argument(format!("spec.input: {e}"))),
            };
        // a spec that breaks a rule is refused before its file is taken
        SpecRequest::try_from(&spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let limit = self.scheduler.limits().await.max_input_bytes;
        let _turn = tokio::time::timeout(UPLOAD_WAIT, self.uploads.acquire())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "the coordinator is taking {UPLOADS_AT_ONCE} uploads already; send the job \
                     again in a moment"
                ))
            })?
            .map_err(|_| Status::unavailable("the coordinator is stopping"))?;
        let taken = tokio::time::timeout(UPLOAD_TIME, async {
            let mut bytes = Vec::new();
            while let Some(part) = parts.message().await? {
                match part.part {
                    Some(submit_part::Part::Data(data)) => {
                        if (bytes.len() + data.len()) as u64 > limit {
                            tracing::warn!(
                                target: AUDIT,
                                caller = %caller,
                                action = "submit",
                                peer = %from,
                                "refused: input over {limit} bytes"
                            );
                            return Err(Status::invalid_argument(format!(
                                "input: the {} is over this farm's limit of {limit} bytes (the \
                                 coordinator's --max-input-bytes)",
                                kind.name()
                            )));
                        }
                        bytes.extend_from_slice(&data);
                    }
                    Some(submit_part::Part::Request(_)) => {
                        return Err(Status::invalid_argument(
                            "SubmitWithInput: a second SubmitRequest; one job per call",
                        ))
                    }
                    None => {}
                }
            }
            Ok(bytes)
        })
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "input: the {} did not arrive within {} s; send the job again",
                kind.name(),
                UPLOAD_TIME.as_secs()
            ))
        })?;
        let bytes = taken?;
        if bytes.is_empty() {
            return Err(Status::invalid_argument(format!(
                "input: no bytes of the {} arrived",
                kind.name()
            )));
        }
        let artifacts = self.scheduler.artifacts().clone();
        let read = tokio::task::spawn_blocking(move || {
            let input = crate::input::read(kind, &bytes)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let staged = artifacts.stage_input(&bytes).map_err(|e| {
                Status::unavailable(format!(
                    "the input file could not be stored, so the job was not accepted: {e}"
                ))
            })?;
            Ok::<_, Status>((input, staged))
        })
        .await
        .map_err(|e| Status::internal(format!("reading the input failed: {e}")))?;
        let (input, staged) = read?;
        spec.input = Some(input.to_proto());
        self.accept(
            &caller,
            &from,
            &r,
            &spec,
            &trace_parent,
            Some((staged, kind)),
        )
        .await
    }

    async fn get(&self, request: Request<JobRequest>) -> Result<Response<Job>, Status> {
        let caller = self.caller(&request, "get")?;
        let id = request.into_inner().id;
        let job = self.reachable_job(&caller, &id, "get").await?;
        Ok(Response::new(Job::from(&job)))
    }

    type WatchStream = BoxStream<JobEvent>;

    async fn watch(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request, "watch")?;
        let from = peer(&request);
        let id = request.into_inner().id;
        self.reachable_job(&caller, &id, "watch").await?;
        tracing::info!(target: AUDIT, caller = %caller, action = "watch", job = %id, peer = %from);
        let (mut opening, mut events) = self
            .scheduler
            .watch(&id)
            .await
            .ok_or_else(|| not_found(&id))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let scheduler = self.scheduler.clone();
        let stopped = self.scheduler.stopped();
        tokio::spawn(async move {
            tokio::pin!(stopped);
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
                let received = tokio::select! {
                    received = events.recv() => received,
                    // a stopping coordinator ends its watches (the server waits for open
                    // streams before it exits); the client watches again, elsewhere
                    _ = &mut stopped => return,
                };
                last = match received {
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
        let caller = self.caller(&request, "cancel")?;
        let from = peer(&request);
        let r = request.into_inner();
        self.reachable_job(&caller, &r.id, "cancel").await?;
        let job = self
            .scheduler
            .cancel(&r.id, &r.reason)
            .await
            .map_err(table_status)?;
        tracing::info!(
            target: AUDIT,
            caller = %caller,
            action = "cancel",
            job = %r.id,
            peer = %from,
            state = job.phase.name(),
        );
        Ok(Response::new(Job::from(&job)))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListReply>, Status> {
        let caller = self.caller(&request, "list")?;
        // All the caller's jobs when no state is asked for; a state number this build does not
        // know matches none.
        let states = request.into_inner().states;
        let wanted =
            |phase: JobPhase| states.is_empty() || states.contains(&(JobState::from(phase) as i32));
        let jobs = self.scheduler.list(wanted).await;
        Ok(Response::new(ListReply {
            jobs: jobs
                .iter()
                .filter(|job| caller.reaches(&job.owner))
                .map(Job::from)
                .collect(),
        }))
    }

    type FetchOutputStream = BoxStream<OutputChunk>;

    async fn fetch_output(
        &self,
        request: Request<JobRequest>,
    ) -> Result<Response<Self::FetchOutputStream>, Status> {
        let caller = self.caller(&request, "fetch")?;
        let from = peer(&request);
        let span = telemetry::fetch_span(&request.get_ref().id);
        telemetry::adopt(&span, telemetry::extract(request.metadata()));
        let id = request.into_inner().id;
        let job = self.reachable_job(&caller, &id, "fetch").await?;
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
        tracing::info!(target: AUDIT, caller = %caller, action = "fetch", job = %id, peer = %from);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::task::spawn_blocking(move || {
            let _span = span.entered();
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
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersReply>, Status> {
        self.caller(&request, "workers")?;
        Ok(Response::new(ListWorkersReply {
            workers: self.scheduler.workers(),
        }))
    }
}
