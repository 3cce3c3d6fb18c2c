//! The daemon's shared state and what each request does to it: the [`Slot`] behind a watch
//! channel (so draining can wait for the task to end), the task runner, and the worker's record,
//! re-published in the membership after every change. The gRPC service only translates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use longtake_proto::membership::Registration;
use longtake_proto::telemetry;
use longtake_proto::{task_event, DeviceInfo, ModelInfo, TaskEvent, TaskRequest, Worker};
use tokio::sync::{mpsc, oneshot, watch};

use super::models::Models;
use super::slot::{Aborted, Assignment, Granted, Slot, SlotError};
use super::task::{event, Outcome, TaskPlan, TaskRunner};

/// How long a record update may hold up a request (Reserve answers after its BUSY record is
/// written) before the worker carries on without it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Events a task may queue ahead of a slow reader before its thread waits.
const EVENT_BUFFER: usize = 16;

/// The parts of the worker's record that do not change while it runs.
pub struct Identity {
    pub id: String,
    pub address: String,
    pub advertise_host: String,
    pub devices: Vec<DeviceInfo>,
    pub memory_bytes: u64,
    pub labels: HashMap<String, String>,
    pub models: Vec<ModelInfo>,
    pub started_at_ms: u64,
}

pub struct Control {
    identity: Identity,
    models: Models,
    runner: Arc<TaskRunner>,
    reservation_timeout: Duration,
    slot: watch::Sender<Slot>,
    /// Held while a record is written, so records reach the membership in the slot's order.
    registration: tokio::sync::Mutex<Option<Box<dyn Registration>>>,
    /// RunTask event streams not yet handed over to gRPC in full. A draining worker leaves only
    /// when this is 0: leaving first would let the coordinator see the worker gone before its
    /// task's last frames and `finished`, and re-run a job that had in fact finished.
    open_streams: watch::Sender<usize>,
}

/// How long a draining worker waits for its last task's events to be taken by gRPC before it
/// leaves anyway (a coordinator that stopped reading must not keep it in the farm).
const DELIVERY_GRACE: Duration = Duration::from_secs(30);

/// A task's events and the mark that keeps the worker in the farm until they are all sent:
/// drop it (with the stream that carries the events) when the stream is done.
pub struct TaskStream {
    pub events: mpsc::Receiver<TaskEvent>,
    pub open: OpenStream,
}

/// Counts one open RunTask stream for as long as it lives.
pub struct OpenStream(Arc<Control>);

impl OpenStream {
    /// Names the mark where a stream's code holds it, so the stream owns it.
    pub fn held(&self) {}
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.send_modify(|open| *open -= 1);
    }
}

impl Control {
    pub fn new(
        identity: Identity,
        models: Models,
        runner: TaskRunner,
        reservation_timeout: Duration,
    ) -> Self {
        let slot = watch::Sender::new(Slot::new(identity.id.clone()));
        Self {
            identity,
            models,
            runner: Arc::new(runner),
            reservation_timeout,
            slot,
            registration: tokio::sync::Mutex::new(None),
            open_streams: watch::Sender::new(0),
        }
    }

    pub fn id(&self) -> &str {
        &self.identity.id
    }

    /// This worker's record as it is now.
    pub fn record(&self) -> Worker {
        let (state, job_id) = self.slot.borrow().state();
        let id = &self.identity;
        Worker {
            id: id.id.clone(),
            address: id.address.clone(),
            devices: id.devices.clone(),
            memory_bytes: id.memory_bytes,
            labels: id.labels.clone(),
            state: state as i32,
            job_id,
            models: id.models.clone(),
            started_at_ms: id.started_at_ms,
        }
    }

    pub async fn set_registration(&self, registration: Box<dyn Registration>) {
        *self.registration.lock().await = Some(registration);
    }

    /// Writes the current record; a membership that fails is logged, the worker carries on
    /// (the coordinator sees its state through RPCs too).
    async fn publish(&self) {
        let registration = self.registration.lock().await;
        if let Some(registration) = registration.as_ref() {
            // Read under the lock: the last writer always writes the latest state.
            let record = self.record();
            match tokio::time::timeout(PUBLISH_TIMEOUT, registration.update(record)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(worker = %self.identity.id, "cannot update the worker record: {e}")
                }
                Err(_) => tracing::warn!(
                    worker = %self.identity.id,
                    "the membership took over {PUBLISH_TIMEOUT:?} to update the worker record; carrying on"
                ),
            }
        }
    }

    fn with_slot<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut out = None;
        self.slot.send_modify(|slot| out = Some(f(slot)));
        out.expect("send_modify runs its closure")
    }

    pub async fn reserve(self: &Arc<Self>, assignment: Assignment) -> Result<Granted, SlotError> {
        let host = self.identity.advertise_host.clone();
        let id = self.identity.id.clone();
        let granted = self.with_slot(|slot| {
            slot.reserve(assignment, || {
                let bind_err = |source| SlotError::Bind {
                    id: id.clone(),
                    host: host.clone(),
                    source,
                };
                let listener = std::net::TcpListener::bind((host.as_str(), 0)).map_err(bind_err)?;
                let address = listener.local_addr().map_err(bind_err)?.to_string();
                Ok((listener, address))
            })
        })?;
        self.publish().await;
        let control = self.clone();
        let serial = granted.serial;
        tokio::spawn(async move {
            tokio::time::sleep(control.reservation_timeout).await;
            if control.with_slot(|slot| slot.expire(serial)) {
                tracing::info!(worker = %control.identity.id, "reservation {serial} expired without its task");
                control.publish().await;
            }
        });
        Ok(granted)
    }

    /// Starts the reserved task on its own thread; its events, ending with `finished`, come
    /// through the returned receiver. Dropping the receiver aborts the task.
    /// Starts the task of `request`; its span is a child of `parent` (the coordinator's attempt,
    /// when traces are exported).
    pub fn run_task(
        self: &Arc<Self>,
        request: TaskRequest,
        parent: opentelemetry::Context,
    ) -> Result<TaskStream, SlotError> {
        let (assignment, mesh, abort) =
            self.with_slot(|slot| slot.start(&request.job_id, request.attempt, request.rank))?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (done_tx, done_rx) = oneshot::channel();
        let plan = TaskPlan::new(
            &self.models,
            &request.spec.unwrap_or_default(),
            assignment.rank as usize,
            assignment.world_size as usize,
            &request.peers,
            &request.mesh_secret,
        )
        .and_then(|plan| plan.with_input(&request.input))
        .map(|plan| TaskPlan {
            resume_state: request.resume_state,
            checkpoint_every: request.checkpoint_every,
            ..plan
        });
        let runner = self.runner.clone();
        let thread_tx = tx.clone();
        let thread_abort = abort.clone();
        let span = telemetry::task_span(
            &assignment.job_id,
            request.attempt,
            assignment.rank as usize,
            assignment.world_size as usize,
        );
        telemetry::adopt(&span, parent);
        let spawned = std::thread::Builder::new()
            .name(format!("task-{}-r{}", assignment.job_id, assignment.rank))
            .spawn(move || {
                let _span = span.entered();
                let outcome = match plan {
                    Err(e) => Outcome::Failed(e.to_string()),
                    Ok(plan) => runner.run(plan, mesh, &thread_abort, &mut |event| {
                        if thread_tx.blocking_send(event).is_err() {
                            thread_abort.abort("the RunTask stream was closed");
                        }
                    }),
                };
                let _ = done_tx.send(outcome);
            });
        let control = self.clone();
        tokio::spawn(async move {
            let outcome = match spawned {
                Err(e) => Outcome::Failed(format!("cannot start the task thread: {e}")),
                Ok(_) => {
                    tokio::pin!(done_rx);
                    tokio::select! {
                        outcome = &mut done_rx => outcome,
                        _ = tx.closed() => {
                            abort.abort("the RunTask stream was closed");
                            done_rx.await
                        }
                    }
                    .unwrap_or_else(|_| Outcome::Failed("the task thread panicked".into()))
                }
            };
            // Idle (and published) before `finished`: whoever reads it may reserve us at once.
            control.with_slot(Slot::finish);
            control.publish().await;
            let finished = task_event::Event::Finished(outcome.finished());
            let _ = tx.send(event(finished)).await;
        });
        self.open_streams.send_modify(|open| *open += 1);
        Ok(TaskStream {
            events: rx,
            open: OpenStream(self.clone()),
        })
    }

    pub async fn abort(&self, job_id: &str, reason: &str) -> bool {
        let reason = if reason.is_empty() {
            "aborted by the coordinator"
        } else {
            reason
        };
        match self.with_slot(|slot| slot.abort(job_id, reason)) {
            Aborted::NotFound => false,
            Aborted::Released => {
                self.publish().await;
                true
            }
            Aborted::Stopping => true,
        }
    }

    /// Stops taking tasks, drops a waiting reservation, waits for the running task to end and
    /// leaves the membership.
    pub async fn drain(&self) -> Result<(), longtake_proto::membership::MembershipError> {
        self.with_slot(Slot::drain);
        self.publish().await;
        let mut slot = self.slot.subscribe();
        let _ = slot.wait_for(|slot| !slot.is_running()).await;
        let mut open = self.open_streams.subscribe();
        if tokio::time::timeout(DELIVERY_GRACE, open.wait_for(|open| *open == 0))
            .await
            .is_err()
        {
            tracing::warn!(worker = %self.id(), "leaving with a task's events not yet taken by the coordinator");
        }
        match self.registration.lock().await.take() {
            Some(registration) => registration.leave().await,
            None => Ok(()),
        }
    }
}
