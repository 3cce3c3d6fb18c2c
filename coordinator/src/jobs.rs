//! The job table and its state machine over [`JobRecord`]s, without I/O: QUEUED → PLANNED →
//! RUNNING → DONE | FAILED | CANCELLED, QUEUED/PLANNED/RUNNING → CANCELLED, PLANNED/RUNNING →
//! QUEUED when an attempt's workers are lost. Every method that changes a job returns a
//! [`Change`]: the caller writes the record to the job store (when `persist`) before it
//! broadcasts the event to the job's watchers. Events of an attempt that is no longer the job's
//! current one (a cancelled job's, a re-queued one's) are ignored.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

use longtake_proto::spec::frames::WAN_TEMPORAL_PACK;
use longtake_proto::spec::{
    check_job_name, JobSpec, Limits, ModelDescription, SpecError, SpecRequest,
};
use longtake_proto::{
    job_event, Cancelled, Decoding, Done, Encoding, Failed, JobEvent, JobState, Planned, Queued,
    RenderSpec, Step, TimeSplit, Worker,
};
use tokio::sync::{broadcast, mpsc};

use crate::placement::{RankQuotas, Request};
use crate::record::{is_request_id, CheckpointRef, JobPhase, JobRecord, JobSpecs, Plan};
use crate::store::LoadedJob;

/// Events a slow watcher may lag behind before it is resynchronised with the job's state (a
/// watcher that falls further behind gets the job's current state instead of what it missed).
const EVENT_BUFFER: usize = 64;

/// What the coordinator tells a running attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// The job was cancelled: abort the ranks.
    Cancel(String),
    /// This worker left the farm (its lease expired or it deregistered).
    WorkerLeft(String),
}

/// How an attempt ended, as dispatch reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done {
        output_bytes: u64,
        render_s: f64,
        time_split: TimeSplit,
    },
    /// A rank failed; the job fails with this reason.
    Failed(String),
    Cancelled(String),
    /// A rank's worker died or became unreachable: re-queue while attempts remain.
    Lost(String),
    /// The ranks could not be started. `counts`: whether it uses up one of the job's attempts
    /// (a worker that only said "busy", or could not be reached, does not); `unreachable`: the
    /// worker that could not be reached, which placement then passes over for a while.
    StartFailed {
        reason: String,
        counts: bool,
        unreachable: Option<String>,
    },
}

/// A change to a job: its new record and the event that announces it.
#[derive(Debug, Clone)]
pub struct Change {
    pub job: JobRecord,
    pub event: JobEvent,
    /// Whether the record must be written to the store (state transitions and messages; not
    /// per-step progress, which a restart re-does anyway).
    pub persist: bool,
}

/// A job that placement gave workers: what dispatch needs to run its attempt.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job: JobRecord,
    /// The spec with the model's defaults filled in.
    pub spec: JobSpec,
    pub attempt: u32,
    pub workers: Vec<Worker>,
}

/// The attempt a job is running, while its dispatch task lives.
pub struct AttemptHandle {
    pub attempt: u32,
    pub workers: Vec<String>,
    pub control: mpsc::UnboundedSender<Control>,
}

struct Entry {
    job: JobRecord,
    /// The job's watchers' channel: opened by the first watcher, dropped when the job ends or
    /// nobody watches, so a job nobody watches (most of a long queue, every finished job) holds
    /// no event buffer.
    events: Option<broadcast::Sender<JobEvent>>,
    attempt: Option<AttemptHandle>,
    /// Why the job went back to the queue, kept in front of the reasons it waits since.
    requeued: Option<String>,
    /// The queue position its watchers last heard.
    announced: Option<u32>,
}

/// Why a job-level request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    #[error("no job {0}")]
    NotFound(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("name: {0}")]
    Name(String),
    #[error("request_id: {0:?} is not a request id (1-128 letters, digits and . _ : -)")]
    InvalidRequestId(String),
    #[error(
        "request_id: {request_id} already submitted job {job_id} with another spec, priority or \
         name; a retry must repeat the submission exactly (use a new request id for a new job)"
    )]
    RequestIdReused { request_id: String, job_id: String },
    #[error(
        "the job needs {ranks} workers at once, and {owner} may use at most {quota}: it could \
         never run (use a smaller layout or fewer --groups, or ask for a larger quota)"
    )]
    OverQuota {
        owner: String,
        ranks: usize,
        quota: usize,
    },
}

/// What a submission did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new job, queued.
    New(Change),
    /// The job an earlier submission with the same request id made (a retry).
    Existing(JobRecord),
}

pub struct JobTable {
    jobs: HashMap<String, Entry>,
    /// Request ids → job ids, per owner: a request id is the owner's own namespace (another
    /// owner's same id is another job, and never reveals the first).
    request_ids: HashMap<(String, String), String>,
    queue: crate::queue::JobQueue,
    limits: Limits,
    quotas: RankQuotas,
    max_attempts: u32,
    /// The latest `submitted_at_ms` handed out.
    last_submitted_ms: u64,
}

/// Ends `job` as failed with `reason`: the change that records and announces it.
fn fail(job: &mut JobRecord, reason: String, now_ms: u64) -> Change {
    job.phase = JobPhase::Failed;
    job.message = reason;
    job.finished_at_ms = now_ms;
    let body = job_event::Event::Failed(Failed {
        reason: job.message.clone(),
    });
    Change {
        event: event(job, body, now_ms),
        job: job.clone(),
        persist: true,
    }
}

fn event(job: &JobRecord, body: job_event::Event, now_ms: u64) -> JobEvent {
    JobEvent {
        job_id: job.id.clone(),
        state: JobState::from(job.phase) as i32,
        at_ms: now_ms,
        event: Some(body),
    }
}

/// A new job id: `j-` + base36 milliseconds (so ids sort by submission time) + 4 random base36
/// characters.
pub fn new_job_id(now_ms: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut millis = Vec::new();
    let mut n = now_ms;
    loop {
        millis.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    millis.reverse();
    // RandomState is seeded per process and per instance: enough to tell jobs of one
    // millisecond apart without a random-number dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms);
    let mut r = hasher.finish();
    let mut suffix = String::new();
    for _ in 0..4 {
        suffix.push(DIGITS[(r % 36) as usize] as char);
        r /= 36;
    }
    format!(
        "j-{}{suffix}",
        String::from_utf8(millis).unwrap_or_default()
    )
}

impl JobTable {
    pub fn new(limits: Limits, max_attempts: u32) -> Self {
        Self {
            jobs: HashMap::new(),
            request_ids: HashMap::new(),
            queue: Default::default(),
            limits,
            quotas: RankQuotas::default(),
            max_attempts: max_attempts.max(1),
            last_submitted_ms: 0,
        }
    }

    /// Limits each owner's ranks running at once (no limit by default).
    pub fn with_quotas(mut self, quotas: RankQuotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// For each owner of a queued job that has a quota, the ranks it may still start.
    pub fn ranks_left(&self) -> HashMap<String, usize> {
        let mut in_use: HashMap<String, usize> = HashMap::new();
        for entry in self.jobs.values() {
            if let Some(attempt) = &entry.attempt {
                *in_use.entry(entry.job.owner.clone()).or_default() += attempt.workers.len();
            }
        }
        let queued = self
            .queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|e| e.job.owner.as_str());
        self.quotas.left(queued, &in_use)
    }

    /// Takes the stored jobs: queued ones queue again, planned or running ones (their attempt
    /// died with the previous coordinator) go back to the queue, ended ones are listed as they
    /// were. A record that cannot run (its problem names the job) fails its job if it had not
    /// ended. Returns the changes of the re-queued and failed jobs.
    pub fn restore(&mut self, stored: Vec<LoadedJob>, now_ms: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut failed = Vec::new();
        for LoadedJob {
            record: mut job,
            problem,
        } in stored
        {
            self.last_submitted_ms = self.last_submitted_ms.max(job.submitted_at_ms);
            if let Some(problem) = problem {
                // A record this coordinator cannot read back (written by another version, or
                // edited by hand) is never run with a guessed spec: the job fails, named, and
                // the other jobs carry on.
                tracing::error!(job = %job.id, "stored job record: {problem}");
                if !job.phase.is_ended() {
                    job.phase = JobPhase::Failed;
                    job.message = problem.to_string();
                    job.finished_at_ms = now_ms;
                    failed.push(job.id.clone());
                }
            }
            let is_active_before = job.phase.is_active();
            if is_active_before {
                job.phase = JobPhase::Queued;
                job.message = format!(
                    "re-queued: the coordinator restarted during attempt {}",
                    job.attempts
                );
                job.steps_done = 0;
                changes.push(job.id.clone());
            }
            if job.phase == JobPhase::Queued {
                self.queue.push(&job.id, job.priority, job.submitted_at_ms);
            }
            let requeued = is_active_before.then(|| job.message.clone());
            if !job.request_id.is_empty() {
                self.request_ids
                    .insert((job.owner.clone(), job.request_id.clone()), job.id.clone());
            }
            self.jobs.insert(
                job.id.clone(),
                Entry {
                    requeued,
                    job,
                    events: None,
                    attempt: None,
                    announced: None,
                },
            );
        }
        let mut changes: Vec<Change> = changes
            .into_iter()
            .map(|id| self.queued_change(&id, now_ms))
            .collect();
        changes.extend(failed.iter().filter_map(|id| {
            let job = self.jobs.get(id)?.job.clone();
            Some(Change {
                event: self.current_event(&job, now_ms),
                job,
                persist: true,
            })
        }));
        changes
    }

    /// Accepts a job: checks the spec, gives it an id and queues it.
    /// What specs this table accepts.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn submit(
        &mut self,
        spec: &RenderSpec,
        priority: i32,
        name: &str,
        request_id: &str,
        owner: &str,
        now_ms: u64,
    ) -> Result<Submitted, TableError> {
        let request = SpecRequest::try_from(spec)?;
        request.check_limits(&self.limits)?;
        let ranks = request.layout.world_size() * request.groups as usize;
        if let Some(quota) = self.quotas.limit(owner).filter(|&q| q < ranks) {
            return Err(TableError::OverQuota {
                owner: owner.to_string(),
                ranks,
                quota,
            });
        }
        check_job_name(name, &self.limits).map_err(TableError::Name)?;
        if !request_id.is_empty() {
            if !is_request_id(request_id) {
                return Err(TableError::InvalidRequestId(request_id.to_string()));
            }
            if let Some(job) = self
                .request_ids
                .get(&(owner.to_string(), request_id.to_string()))
                .and_then(|id| self.jobs.get(id))
                .map(|e| &e.job)
            {
                let same = job.spec.request() == Some(&request)
                    && job.priority == priority
                    && job.name == name;
                return if same {
                    Ok(Submitted::Existing(job.clone()))
                } else {
                    Err(TableError::RequestIdReused {
                        request_id: request_id.to_string(),
                        job_id: job.id.clone(),
                    })
                };
            }
        }
        // Submission times are strictly increasing, so FIFO within a priority (and the ids,
        // which start with the time) follow the order of arrival, even within a millisecond.
        let now_ms = now_ms.max(self.last_submitted_ms + 1);
        self.last_submitted_ms = now_ms;
        let mut id = new_job_id(now_ms);
        while self.jobs.contains_key(&id) {
            id = new_job_id(now_ms);
        }
        let job = JobRecord {
            request_id: request_id.to_string(),
            owner: owner.to_string(),
            ..JobRecord::queued(id.clone(), request, priority, name.to_string(), now_ms)
        };
        if !request_id.is_empty() {
            self.request_ids
                .insert((owner.to_string(), request_id.to_string()), id.clone());
        }
        self.queue.push(&id, priority, now_ms);
        self.jobs.insert(
            id.clone(),
            Entry {
                job,
                events: None,
                attempt: None,
                requeued: None,
                announced: None,
            },
        );
        Ok(Submitted::New(self.queued_change(&id, now_ms)))
    }

    /// Takes back a submission that could not be stored.
    pub fn forget(&mut self, id: &str) {
        self.queue.remove(id);
        if let Some(entry) = self.jobs.remove(id) {
            self.request_ids
                .remove(&(entry.job.owner, entry.job.request_id));
        }
    }

    pub fn get(&self, id: &str) -> Option<&JobRecord> {
        self.jobs.get(id).map(|e| &e.job)
    }

    /// The jobs whose phase is `wanted`, oldest first.
    /// Ended jobs that finished before `cutoff_ms`, oldest first (what retention prunes).
    pub fn ended_before(&self, cutoff_ms: u64) -> Vec<JobRecord> {
        let mut ended: Vec<JobRecord> = self
            .jobs
            .values()
            .filter(|e| e.job.phase.is_ended() && e.job.finished_at_ms < cutoff_ms)
            .map(|e| e.job.clone())
            .collect();
        ended.sort_by_key(|j| (j.finished_at_ms, j.id.clone()));
        ended
    }

    /// Forgets an ended job (retention pruned it); a job still active is kept.
    pub fn remove_ended(&mut self, id: &str) -> Option<JobRecord> {
        if !self.jobs.get(id)?.job.phase.is_ended() {
            return None;
        }
        let entry = self.jobs.remove(id)?;
        self.request_ids
            .remove(&(entry.job.owner.clone(), entry.job.request_id.clone()));
        Some(entry.job)
    }

    /// Keeps the trace context of job `id`'s submission (see [`JobRecord::trace_parent`]).
    pub fn set_trace_parent(&mut self, id: &str, trace_parent: &str) {
        if let Some(entry) = self.jobs.get_mut(id) {
            entry.job.trace_parent = trace_parent.to_string();
        }
    }

    /// Every job's phase and priority (what the metrics count), in no order.
    pub fn phases(&self) -> impl Iterator<Item = (JobPhase, i32)> + '_ {
        self.jobs.values().map(|e| (e.job.phase, e.job.priority))
    }

    pub fn list(&self, wanted: impl Fn(JobPhase) -> bool) -> Vec<JobRecord> {
        let mut jobs: Vec<JobRecord> = self
            .jobs
            .values()
            .filter(|e| wanted(e.job.phase))
            .map(|e| e.job.clone())
            .collect();
        jobs.sort_by(|a, b| (a.submitted_at_ms, &a.id).cmp(&(b.submitted_at_ms, &b.id)));
        jobs
    }

    /// A receiver of the job's future events and the events that describe it now: the one of
    /// [`Self::current_event`], after the job's plan when it is running (a watcher that joins
    /// after the job was placed still sees its workers and windows).
    pub fn watch(
        &mut self,
        id: &str,
        now_ms: u64,
    ) -> Option<(Vec<JobEvent>, broadcast::Receiver<JobEvent>)> {
        let job = &self.jobs.get(id)?.job;
        let mut opening = Vec::new();
        if job.phase == JobPhase::Running {
            opening.push(event(job, job_event::Event::Planned(planned(job)), now_ms));
        }
        opening.push(self.current_event(job, now_ms));
        let entry = self.jobs.get_mut(id)?;
        let events = if entry.job.phase.is_ended() {
            // nothing follows the end: a channel already closed
            broadcast::channel(1).1
        } else {
            entry
                .events
                .get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0)
                .subscribe()
        };
        Some((opening, events))
    }

    /// The event that sums up the job's state, the first one a watcher gets.
    pub fn current_event(&self, job: &JobRecord, now_ms: u64) -> JobEvent {
        use job_event::Event;
        let body = match job.phase {
            JobPhase::Queued => Event::Queued(Queued {
                position: self.queue.position(&job.id).unwrap_or(0),
                reason: job.message.clone(),
            }),
            JobPhase::Planned => Event::Planned(planned(job)),
            JobPhase::Running => Event::Step(Step {
                step: job.steps_done,
                total: job.steps_total,
                elapsed_s: 0.0,
                step_s: 0.0,
                ..Default::default()
            }),
            JobPhase::Done => Event::Done(Done {
                output_bytes: job.output_bytes,
                render_s: job.render_s(),
                time_split: job.time_split,
            }),
            JobPhase::Failed => Event::Failed(Failed {
                reason: job.message.clone(),
            }),
            JobPhase::Cancelled => Event::Cancelled(Cancelled {
                reason: job.message.clone(),
            }),
        };
        event(job, body, now_ms)
    }

    /// Tells the job's watchers the change's event. The channel closes after the job's last
    /// event, and goes when no watcher is left.
    pub fn announce(&mut self, change: Change) {
        let Some(entry) = self.jobs.get_mut(&change.job.id) else {
            return;
        };
        if let Some(tx) = &entry.events {
            // no watcher is not an error
            let _ = tx.send(change.event);
            if entry.job.phase.is_ended() || tx.receiver_count() == 0 {
                entry.events = None;
            }
        }
    }

    /// How many jobs have an open watchers' channel (each holds up to [`EVENT_BUFFER`] events).
    pub fn event_channels(&self) -> usize {
        self.jobs.values().filter(|e| e.events.is_some()).count()
    }

    /// The queued jobs in the order they run, as placement sees them.
    pub fn queued_requests(&self) -> Vec<Request> {
        self.queue
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter_map(|e| {
                let request = e.job.spec.request()?;
                Some(Request {
                    job_id: e.job.id.clone(),
                    model: request.model.clone(),
                    world_size: request.layout.world_size() * request.groups as usize,
                    owner: e.job.owner.clone(),
                })
            })
            .collect()
    }

    /// Workers that a live attempt holds.
    pub fn claimed(&self) -> HashSet<String> {
        self.jobs
            .values()
            .filter_map(|e| e.attempt.as_ref())
            .flat_map(|a| a.workers.iter().cloned())
            .collect()
    }

    /// Records why a queued job waits; a change only when the reason is new.
    pub fn set_waiting(&mut self, id: &str, reason: &str, now_ms: u64) -> Option<Change> {
        let entry = self.jobs.get_mut(id)?;
        let message = match &entry.requeued {
            Some(requeued) => format!("{requeued}; {reason}"),
            None => reason.to_string(),
        };
        if entry.job.phase != JobPhase::Queued || entry.job.message == message {
            return None;
        }
        entry.job.message = message;
        Some(self.queued_change(id, now_ms))
    }

    /// Moves a queued job onto `workers` (rank order): PLANNED, one more attempt. A spec whose
    /// defaults break a limit fails the job instead (the error names the field).
    pub fn plan(
        &mut self,
        id: &str,
        workers: &[Worker],
        now_ms: u64,
    ) -> Result<(Change, Assignment), Option<Box<Change>>> {
        let Some(entry) = self.jobs.get_mut(id) else {
            return Err(None);
        };
        if entry.job.phase != JobPhase::Queued {
            return Err(None);
        }
        self.queue.remove(id);
        entry.requeued = None;
        entry.announced = None;
        let Some(request) = entry.job.spec.request().cloned() else {
            return Err(None);
        };
        let model = workers
            .first()
            .and_then(|w| w.models.iter().find(|m| m.name == request.model))
            .map(ModelDescription::from)
            .unwrap_or_else(|| ModelDescription {
                name: request.model.clone(),
                ..Default::default()
            });
        let limits = &self.limits;
        let resolved = request
            .resolve(&model)
            .and_then(|job| job.check_limits(limits).map(|()| job));
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(e) => return Err(Some(Box::new(fail(&mut entry.job, e.to_string(), now_ms)))),
        };
        let job = &mut entry.job;
        job.phase = JobPhase::Planned;
        job.attempts += 1;
        job.plan = Some(Plan::for_job(
            workers.iter().map(|w| w.id.clone()).collect(),
            &resolved,
        ));
        job.steps_done = 0;
        job.steps_total = resolved.steps;
        // The record shows what will run (the model's defaults filled in), so a client needs no
        // other source to learn the size or steps the farm chose.
        job.spec = JobSpecs::Resolved {
            request,
            resolved: Box::new(resolved.clone()),
        };
        job.message.clear();
        let body = job_event::Event::Planned(planned(job));
        let change = Change {
            event: event(job, body, now_ms),
            job: job.clone(),
            persist: true,
        };
        let assignment = Assignment {
            job: job.clone(),
            spec: resolved,
            attempt: job.attempts,
            workers: workers.to_vec(),
        };
        Ok((change, assignment))
    }

    /// Binds the live attempt's handle to its job (its workers count as claimed until
    /// [`JobTable::finish`]).
    pub fn attach(&mut self, id: &str, handle: AttemptHandle) {
        if let Some(entry) = self.jobs.get_mut(id) {
            entry.attempt = Some(handle);
        }
    }

    /// The entry of `id` if `attempt` is its current, still active attempt.
    fn current(&mut self, id: &str, attempt: u32) -> Option<&mut Entry> {
        self.jobs
            .get_mut(id)
            .filter(|e| e.job.attempts == attempt && e.job.phase.is_active())
    }

    /// The ranks are running: PLANNED → RUNNING.
    pub fn running(&mut self, id: &str, attempt: u32, now_ms: u64) -> Option<Change> {
        let entry = self.current(id, attempt)?;
        let job = &mut entry.job;
        job.phase = JobPhase::Running;
        job.started_at_ms = now_ms;
        let body = job_event::Event::Step(Step {
            step: 0,
            total: job.steps_total,
            elapsed_s: 0.0,
            step_s: 0.0,
            ..Default::default()
        });
        Some(Change {
            event: event(job, body, now_ms),
            job: job.clone(),
            persist: true,
        })
    }

    /// Rank 0 finished a denoising step.
    pub fn step(&mut self, id: &str, attempt: u32, step: Step, now_ms: u64) -> Option<Change> {
        let entry = self.current(id, attempt)?;
        let job = &mut entry.job;
        job.steps_done = step.step;
        if step.total != 0 {
            job.steps_total = step.total;
        }
        Some(Change {
            event: event(job, job_event::Event::Step(step), now_ms),
            job: job.clone(),
            persist: false,
        })
    }

    /// Fails queued job `id` at once when its spec can never run on `model` (a model a live
    /// worker serves): its layout does not fit the transformer, or the model's defaults take it
    /// over the farm's limits. Such a job once waited in the queue forever when fewer workers
    /// were live than its layout needs. `None` when it can run (or is not queued).
    pub fn fail_if_unrunnable(
        &mut self,
        id: &str,
        model: &ModelDescription,
        now_ms: u64,
    ) -> Option<Change> {
        let limits = &self.limits;
        let entry = self.jobs.get_mut(id)?;
        if entry.job.phase != JobPhase::Queued {
            return None;
        }
        let request = entry.job.spec.request()?;
        let problem = request
            .resolve(model)
            .and_then(|job| job.check_limits(limits))
            .err()?;
        self.queue.remove(id);
        let entry = self.jobs.get_mut(id)?;
        let reason = format!("it can never run on model {}: {problem}", model.name);
        Some(fail(&mut entry.job, reason, now_ms))
    }

    /// The attempt `attempt` of job `id` continues from the checkpoint of step `step`.
    pub fn resume_from(&mut self, id: &str, attempt: u32, step: u32) {
        if let Some(entry) = self.current(id, attempt) {
            entry.job.resumed_from_step = step;
        }
    }

    /// Every worker group of the attempt saved its state after step `checkpoint.step`: the job
    /// resumes from there if the attempt is lost. Returns the record to store (no watcher needs
    /// to hear of it).
    pub fn checkpoint(
        &mut self,
        id: &str,
        attempt: u32,
        checkpoint: CheckpointRef,
    ) -> Option<JobRecord> {
        let entry = self.current(id, attempt)?;
        entry.job.checkpoint = Some(checkpoint);
        Some(entry.job.clone())
    }

    /// Rank 0 is decoding (`Decoding`) or the coordinator is encoding (`Encoding`).
    pub fn progress(
        &mut self,
        id: &str,
        attempt: u32,
        body: job_event::Event,
        now_ms: u64,
    ) -> Option<Change> {
        debug_assert!(matches!(
            body,
            job_event::Event::Decoding(Decoding { .. })
                | job_event::Event::Encoding(Encoding { .. })
        ));
        let entry = self.current(id, attempt)?;
        Some(Change {
            event: event(&entry.job, body, now_ms),
            job: entry.job.clone(),
            persist: false,
        })
    }

    /// The attempt's dispatch ended: releases its workers and applies the outcome (a stale
    /// attempt's outcome only releases the workers).
    pub fn finish(
        &mut self,
        id: &str,
        attempt: u32,
        outcome: Outcome,
        now_ms: u64,
    ) -> Option<Change> {
        let max_attempts = self.max_attempts;
        let entry = self.jobs.get_mut(id)?;
        if entry.attempt.as_ref().is_some_and(|a| a.attempt == attempt) {
            entry.attempt = None;
        }
        if entry.job.attempts != attempt || !entry.job.phase.is_active() {
            return None;
        }
        let job = &mut entry.job;
        let requeue = |job: &mut JobRecord, reason: String| {
            job.phase = JobPhase::Queued;
            job.message = reason;
            job.steps_done = 0;
        };
        let end = |job: &mut JobRecord, phase: JobPhase, reason: String| {
            job.phase = phase;
            job.message = reason;
            job.finished_at_ms = now_ms;
        };
        match outcome {
            Outcome::Done {
                output_bytes,
                render_s: _,
                time_split,
            } => {
                end(job, JobPhase::Done, String::new());
                job.checkpoint = None;
                job.output_bytes = output_bytes;
                job.time_split = Some(time_split);
                job.steps_done = job.steps_total;
            }
            Outcome::Failed(reason) => end(job, JobPhase::Failed, reason),
            Outcome::Cancelled(reason) => end(job, JobPhase::Cancelled, reason),
            Outcome::Lost(reason) => {
                if job.attempts < max_attempts {
                    requeue(job, format!("re-queued: {reason}"));
                } else {
                    end(
                        job,
                        JobPhase::Failed,
                        format!("{reason}; gave up after {} attempts", job.attempts),
                    );
                }
            }
            Outcome::StartFailed { reason, counts, .. } => {
                if !counts {
                    job.attempts -= 1;
                }
                if !counts || job.attempts < max_attempts {
                    requeue(job, format!("re-queued: {reason}"));
                } else {
                    end(
                        job,
                        JobPhase::Failed,
                        format!("{reason}; gave up after {} attempts", job.attempts),
                    );
                }
            }
        }
        if job.phase == JobPhase::Queued {
            let (priority, at) = (job.priority, job.submitted_at_ms);
            entry.requeued = Some(entry.job.message.clone());
            self.queue.push(id, priority, at);
            return Some(self.queued_change(id, now_ms));
        }
        let job = self.jobs.get(id)?.job.clone();
        Some(Change {
            event: self.current_event(&job, now_ms),
            job,
            persist: true,
        })
    }

    /// Cancels a job that has not ended: a queued one at once; an active one is marked
    /// CANCELLED and its attempt told to abort (its workers stay claimed until the attempt
    /// ends). An ended job is returned as it is.
    pub fn cancel(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(JobRecord, Option<Change>), TableError> {
        let entry = self
            .jobs
            .get_mut(id)
            .ok_or_else(|| TableError::NotFound(id.to_string()))?;
        if entry.job.phase.is_ended() {
            return Ok((entry.job.clone(), None));
        }
        let reason = if reason.trim().is_empty() {
            "cancelled by request".to_string()
        } else {
            reason.to_string()
        };
        if let Some(attempt) = &entry.attempt {
            let _ = attempt.control.send(Control::Cancel(reason.clone()));
        }
        let job = &mut entry.job;
        job.phase = JobPhase::Cancelled;
        job.message = reason.clone();
        job.finished_at_ms = now_ms;
        let body = job_event::Event::Cancelled(Cancelled { reason });
        let change = Change {
            event: event(job, body, now_ms),
            job: job.clone(),
            persist: true,
        };
        self.queue.remove(id);
        Ok((change.job.clone(), Some(change)))
    }

    /// Tells every attempt that runs on `worker_id` that it left the farm.
    pub fn worker_left(&self, worker_id: &str) {
        for entry in self.jobs.values() {
            if let Some(a) = &entry.attempt {
                if a.workers.iter().any(|w| w == worker_id) {
                    let _ = a.control.send(Control::WorkerLeft(worker_id.to_string()));
                }
            }
        }
    }

    /// Drops every attempt handle (the coordinator is stopping; nothing is recorded).
    pub fn abandon_attempts(&mut self) {
        for entry in self.jobs.values_mut() {
            entry.attempt = None;
        }
    }

    /// Queued events for the jobs whose place in the queue moved since their watchers last
    /// heard it (not stored: positions are derived).
    pub fn position_updates(&mut self, now_ms: u64) -> Vec<Change> {
        let moved: Vec<String> = self
            .queue
            .iter()
            .enumerate()
            .filter(|(i, id)| {
                self.jobs
                    .get(*id)
                    .is_some_and(|e| e.announced != Some(*i as u32))
            })
            .map(|(_, id)| id.to_string())
            .collect();
        moved
            .iter()
            .map(|id| Change {
                persist: false,
                ..self.queued_change(id, now_ms)
            })
            .collect()
    }

    fn queued_change(&mut self, id: &str, now_ms: u64) -> Change {
        let position = self.queue.position(id);
        let entry = self
            .jobs
            .get_mut(id)
            .expect("a queued change of a known job");
        entry.announced = position;
        let job = entry.job.clone();
        Change {
            event: self.current_event(&job, now_ms),
            job,
            persist: true,
        }
    }
}

/// The `Planned` event of a job's current plan.
fn planned(job: &JobRecord) -> Planned {
    let plan = job.plan.as_ref();
    let windows = job
        .spec
        .resolved()
        .and_then(|spec| Some((spec.window_plan().ok()?, spec)))
        .filter(|(windows, _)| !windows.is_single_window())
        .map(|(windows, spec)| {
            let timeline = spec.timeline();
            if timeline.is_empty() {
                windows.to_string()
            } else {
                format!(
                    "{windows}; prompts: {}",
                    timeline.summary(&spec.prompt, &windows, WAN_TEMPORAL_PACK as usize)
                )
            }
        })
        .unwrap_or_default();
    Planned {
        workers: plan.map(Plan::workers).unwrap_or_default(),
        layout: plan.map(Plan::layout_text).unwrap_or_default(),
        attempt: job.attempts,
        windows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submissions without a request id, which always make a new job.
    trait SubmitNew {
        fn submit_new(
            &mut self,
            spec: &RenderSpec,
            priority: i32,
            name: &str,
            now_ms: u64,
        ) -> Result<Change, TableError>;
    }

    impl SubmitNew for JobTable {
        fn submit_new(
            &mut self,
            spec: &RenderSpec,
            priority: i32,
            name: &str,
            now_ms: u64,
        ) -> Result<Change, TableError> {
            match self.submit(spec, priority, name, "", "", now_ms)? {
                Submitted::New(change) => Ok(change),
                Submitted::Existing(job) => panic!("no request id, yet job {} came back", job.id),
            }
        }
    }
    use crate::store::{format, InMemoryJobStore, JobStore};
    use longtake_proto::{ModelInfo, WorkerState};

    fn spec() -> RenderSpec {
        RenderSpec {
            prompt: "a wolf".into(),
            frames: 9,
            steps: 0,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        }
    }

    fn worker(id: &str) -> Worker {
        Worker {
            id: id.into(),
            state: WorkerState::Idle as i32,
            models: vec![ModelInfo {
                // Specs without a model name ask for the default one.
                name: longtake_proto::spec::DEFAULT_MODEL.into(),
                default_width: 64,
                default_height: 64,
                default_steps: 3,
                attention_heads: 2,
                ffn_dim: 64,
                max_prompt_tokens: 64,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn state(t: &JobTable, id: &str) -> JobPhase {
        t.get(id).unwrap().phase
    }

    fn handle(t: &mut JobTable, a: &Assignment) -> mpsc::UnboundedReceiver<Control> {
        let (tx, rx) = mpsc::unbounded_channel();
        t.attach(
            &a.job.id,
            AttemptHandle {
                attempt: a.attempt,
                workers: a.workers.iter().map(|w| w.id.clone()).collect(),
                control: tx,
            },
        );
        rx
    }

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let a = new_job_id(1_700_000_000_000);
        let b = new_job_id(1_700_000_000_001);
        assert!(a.starts_with("j-") && a.len() <= 14, "{a}");
        assert!(a < b);
        let same: HashSet<String> = (0..50).map(|_| new_job_id(5)).collect();
        assert!(same.len() > 40, "ids of one millisecond collide too often");
    }

    #[test]
    fn jobs_of_one_millisecond_keep_their_order() {
        let mut t = JobTable::new(Limits::default(), 3);
        let ids: Vec<String> = (0..20)
            .map(|_| t.submit_new(&spec(), 0, "", 10).unwrap().job.id)
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        let queued: Vec<String> = t.queued_requests().into_iter().map(|r| r.job_id).collect();
        assert_eq!(queued, ids);
    }

    #[test]
    fn a_job_runs_through_to_done() {
        let mut t = JobTable::new(Limits::default(), 3);
        let c = t.submit_new(&spec(), 0, "wolf", 10).unwrap();
        let id = c.job.id.clone();
        assert!(c.persist);
        assert!(matches!(
            c.event.event,
            Some(job_event::Event::Queued(Queued { position: 0, .. }))
        ));
        assert_eq!(
            t.submit_new(
                &RenderSpec {
                    frames: 8,
                    ..spec()
                },
                0,
                "",
                11
            )
            .unwrap_err()
            .to_string()[..12],
            *"spec.frames:"
        );

        let (c, a) = t.plan(&id, &[worker("w1")], 20).unwrap();
        assert_eq!(state(&t, &id), JobPhase::Planned);
        assert_eq!((a.attempt, a.spec.steps, a.spec.width), (1, 3, 64));
        assert_eq!(c.job.plan.as_ref().unwrap().workers(), ["w1"]);
        let _rx = handle(&mut t, &a);
        assert_eq!(t.claimed(), HashSet::from(["w1".to_string()]));
        assert!(t.queued_requests().is_empty());

        t.running(&id, 1, 30).unwrap();
        assert_eq!(state(&t, &id), JobPhase::Running);
        // a watcher joining a running job still sees its plan first
        let (opening, _events) = t.watch(&id, 35).unwrap();
        let kinds: Vec<_> = opening
            .iter()
            .map(|e| match &e.event {
                Some(job_event::Event::Planned(p)) => format!("planned on {:?}", p.workers),
                Some(job_event::Event::Step(s)) => format!("step {}", s.step),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["planned on [\"w1\"]", "step 0"]);
        let c = t
            .step(
                &id,
                1,
                Step {
                    step: 2,
                    total: 3,
                    elapsed_s: 1.0,
                    step_s: 0.5,
                    ..Default::default()
                },
                40,
            )
            .unwrap();
        assert!(!c.persist);
        assert_eq!(c.job.steps_done, 2);
        // a stale attempt's events change nothing
        assert!(t.step(&id, 7, Step::default(), 41).is_none());

        let c = t
            .finish(
                &id,
                1,
                Outcome::Done {
                    output_bytes: 1234,
                    render_s: 1.0,
                    time_split: TimeSplit::default(),
                },
                50,
            )
            .unwrap();
        assert_eq!(state(&t, &id), JobPhase::Done);
        assert_eq!(
            (c.job.output_bytes, c.job.steps_done, c.job.finished_at_ms),
            (1234, 3, 50)
        );
        assert!(t.claimed().is_empty());
        assert!(matches!(c.event.event, Some(job_event::Event::Done(_))));
    }

    /// A job holds an event buffer only while somebody watches it and it has not ended (a
    /// 1024-slot channel per job, kept forever, once cost 125–155 KB per job): a long queue
    /// nobody watches holds none; a watcher gets the job's last event, then the end of its
    /// stream, and the buffer is gone.
    #[test]
    fn event_buffers_live_only_while_a_running_job_is_watched() {
        let mut t = JobTable::new(Limits::default(), 3);
        let ids: Vec<String> = (0..1000)
            .map(|i| t.submit_new(&spec(), 0, "", 10 + i).unwrap().job.id)
            .collect();
        assert_eq!(t.event_channels(), 0, "nobody watches the queue");

        let id = &ids[0];
        let (_, mut events) = t.watch(id, 20).unwrap();
        assert_eq!(t.event_channels(), 1);
        let (c, a) = t.plan(id, &[worker("w1")], 21).unwrap();
        t.announce(c);
        let _rx = handle(&mut t, &a);
        let done = Outcome::Done {
            output_bytes: 1,
            render_s: 1.0,
            time_split: TimeSplit::default(),
        };
        let c = t.finish(id, 1, done, 30).unwrap();
        t.announce(c);
        assert_eq!(t.event_channels(), 0, "the job ended");
        assert!(matches!(
            events.try_recv().map(|e| e.event),
            Ok(Some(job_event::Event::Planned(_)))
        ));
        assert!(matches!(
            events.try_recv().map(|e| e.event),
            Ok(Some(job_event::Event::Done(_)))
        ));
        assert!(matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Closed)
        ));

        // a watcher that leaves lets the buffer go at the next event
        let (_, events) = t.watch(&ids[1], 40).unwrap();
        drop(events);
        let c = t.cancel(&ids[1], "no longer needed", 41).unwrap().1;
        if let Some(c) = c {
            t.announce(c);
        }
        let (_, events) = t.watch(&ids[2], 42).unwrap();
        drop(events);
        assert_eq!(t.event_channels(), 1);
        let change = t.queued_change(&ids[2], 43);
        t.announce(change);
        assert_eq!(t.event_channels(), 0);
        // an ended job's watcher gets a stream that is already over
        let (opening, mut events) = t.watch(id, 50).unwrap();
        assert!(matches!(
            opening.last().and_then(|e| e.event.as_ref()),
            Some(job_event::Event::Done(_))
        ));
        assert!(events.try_recv().is_err());
        assert_eq!(t.event_channels(), 0);
    }

    /// Names are bounded and one line of plain text; prompts hold no control characters (once
    /// a 1 MB name was accepted, and escape sequences reached every `list`).
    #[test]
    fn names_and_prompts_are_bounded_plain_text() {
        let mut t = JobTable::new(Limits::default(), 3);
        let long = "x".repeat(201);
        let e = t.submit_new(&spec(), 0, &long, 10).unwrap_err().to_string();
        assert_eq!(e, "name: 201 characters is over this farm's limit of 200");
        let e = t
            .submit_new(&spec(), 0, "shot\u{1b}[2J", 10)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "name: contains the control character \\u{1b}; a name is one line of plain text"
        );
        let escape = RenderSpec {
            prompt: "a wolf\u{1b}[31m".into(),
            ..spec()
        };
        let e = t.submit_new(&escape, 0, "", 10).unwrap_err().to_string();
        assert!(
            e.starts_with("spec.prompt: contains the control character"),
            "{e}"
        );
        let lines = RenderSpec {
            prompt: "a wolf\n\tat night".into(),
            ..spec()
        };
        t.submit_new(&lines, 0, "shot 12 — take 3", 10).unwrap();
        assert_eq!(t.list(|_| true).len(), 1, "nothing refused was queued");
    }

    /// A submission that repeats a request id gets the job the first one made (a client
    /// retrying after a lost reply), also after a restart; the same id with another spec,
    /// priority or name is refused naming the job; ids that are not request ids are refused.
    #[test]
    fn a_request_id_makes_one_job_however_often_it_is_submitted() {
        let mut t = JobTable::new(Limits::default(), 3);
        let first = match t
            .submit(&spec(), 1, "shot", "ci:shot-12", "studio-a", 10)
            .unwrap()
        {
            Submitted::New(c) => c.job,
            Submitted::Existing(j) => panic!("the first submission made {}", j.id),
        };
        assert_eq!(first.request_id, "ci:shot-12");
        for now in [11, 12] {
            match t
                .submit(&spec(), 1, "shot", "ci:shot-12", "studio-a", now)
                .unwrap()
            {
                Submitted::Existing(j) => assert_eq!(j.id, first.id),
                Submitted::New(c) => panic!("a retry made a second job {}", c.job.id),
            }
        }
        let other = RenderSpec { seed: 9, ..spec() };
        let e = t
            .submit(&other, 1, "shot", "ci:shot-12", "studio-a", 13)
            .unwrap_err();
        assert_eq!(
            e,
            TableError::RequestIdReused {
                request_id: "ci:shot-12".into(),
                job_id: first.id.clone()
            }
        );
        assert!(t
            .submit(&spec(), 2, "shot", "ci:shot-12", "studio-a", 13)
            .is_err());
        assert!(t
            .submit(&spec(), 1, "take 2", "ci:shot-12", "studio-a", 13)
            .is_err());
        for bad in ["with space", "a/b", "\u{1b}[2J", &"x".repeat(129)] {
            assert_eq!(
                t.submit(&spec(), 0, "", bad, "studio-a", 14).unwrap_err(),
                TableError::InvalidRequestId(bad.to_string())
            );
        }
        assert_eq!(t.list(|_| true).len(), 1);
        // another owner's same request id is that owner's own job, and reveals nothing
        let theirs = match t
            .submit(&other, 1, "shot", "ci:shot-12", "studio-b", 15)
            .unwrap()
        {
            Submitted::New(c) => c.job,
            Submitted::Existing(j) => panic!("studio-b was handed studio-a's job {}", j.id),
        };
        assert_eq!(theirs.owner, "studio-b");
        assert_ne!(theirs.id, first.id);
        assert_eq!(first.owner, "studio-a");

        // a restarted coordinator knows the request ids of the jobs it restores
        let stored = t
            .list(|_| true)
            .into_iter()
            .map(|record| LoadedJob {
                record,
                problem: None,
            })
            .collect();
        let mut restarted = JobTable::new(Limits::default(), 3);
        restarted.restore(stored, 20);
        match restarted
            .submit(&spec(), 1, "shot", "ci:shot-12", "studio-a", 21)
            .unwrap()
        {
            Submitted::Existing(j) => assert_eq!(j.id, first.id),
            Submitted::New(c) => panic!("a retry after a restart made {}", c.job.id),
        }
        match restarted
            .submit(&other, 1, "shot", "ci:shot-12", "studio-b", 22)
            .unwrap()
        {
            Submitted::Existing(j) => assert_eq!(j.id, theirs.id),
            Submitted::New(c) => panic!("a retry after a restart made {}", c.job.id),
        }
    }

    /// Retention picks the ended jobs that finished before the cutoff, never an active one, and
    /// a pruned job's request id is free again.
    #[test]
    fn retention_takes_only_jobs_ended_before_the_cutoff() {
        let mut t = JobTable::new(Limits::default(), 3);
        let old = match t.submit(&spec(), 0, "", "take-1", "a", 10).unwrap() {
            Submitted::New(c) => c.job.id,
            Submitted::Existing(j) => panic!("{}", j.id),
        };
        let queued = t.submit_new(&spec(), 0, "", 11).unwrap().job.id;
        t.cancel(&old, "done with it", 20).unwrap();
        assert!(t.ended_before(20).is_empty(), "ended at 20, not before");
        let expired = t.ended_before(21);
        assert_eq!(expired.iter().map(|j| &j.id).collect::<Vec<_>>(), [&old]);
        assert!(
            t.remove_ended(&queued).is_none(),
            "a queued job is never pruned"
        );
        assert!(t.remove_ended(&old).is_some());
        assert!(t.get(&old).is_none() && t.get(&queued).is_some());
        // the request id names no job any more: the same key makes a new one
        match t.submit(&spec(), 0, "", "take-1", "a", 30).unwrap() {
            Submitted::New(c) => assert_ne!(c.job.id, old),
            Submitted::Existing(j) => panic!("a pruned job came back: {}", j.id),
        }
    }

    /// A job that needs more workers than its owner's quota can never run: refused at submit,
    /// naming the quota; the same job of an owner with a larger quota is queued.
    #[test]
    fn a_job_beyond_its_owners_quota_is_refused() {
        let quotas = RankQuotas {
            default: Some(1),
            owners: [("ops".to_string(), 4)].into(),
        };
        let mut t = JobTable::new(Limits::default(), 3).with_quotas(quotas);
        let cfg2 = RenderSpec {
            layout: "cfg=2".into(),
            ..spec()
        };
        let e = t.submit(&cfg2, 0, "", "", "studio-a", 1).unwrap_err();
        assert_eq!(
            e,
            TableError::OverQuota {
                owner: "studio-a".into(),
                ranks: 2,
                quota: 1
            }
        );
        assert!(e.to_string().contains("at most 1"), "{e}");
        assert!(matches!(
            t.submit(&cfg2, 0, "", "", "ops", 2).unwrap(),
            Submitted::New(_)
        ));
        assert!(matches!(
            t.submit(&spec(), 0, "", "", "studio-a", 3).unwrap(),
            Submitted::New(_)
        ));
        // what each queued job's owner may still start: nothing runs yet
        assert_eq!(
            t.ranks_left(),
            [("ops".to_string(), 4), ("studio-a".to_string(), 1)].into()
        );
    }

    /// A queued spec that can never run on the farm's model fails at once with the reason
    /// (it once waited forever while fewer workers were live than it needed); one that fits
    /// keeps waiting.
    #[test]
    fn a_spec_that_can_never_run_on_the_model_fails_at_once() {
        let mut t = JobTable::new(Limits::default(), 3);
        let served = ModelDescription::from(&worker("w1").models[0]); // 2 heads
        let tp3 = t
            .submit_new(
                &RenderSpec {
                    layout: "tp=3".into(),
                    ..spec()
                },
                0,
                "",
                10,
            )
            .unwrap()
            .job
            .id;
        let fits = t.submit_new(&spec(), 0, "", 11).unwrap().job.id;
        assert!(t.fail_if_unrunnable(&fits, &served, 20).is_none());
        assert_eq!(state(&t, &fits), JobPhase::Queued);
        let change = t.fail_if_unrunnable(&tp3, &served, 20).unwrap();
        assert!(change.persist);
        assert_eq!(state(&t, &tp3), JobPhase::Failed);
        let message = &t.get(&tp3).unwrap().message;
        assert!(
            message.starts_with("it can never run on model toy: spec.layout: "),
            "{message}"
        );
        assert_eq!(
            t.queued_requests().len(),
            1,
            "the failed job left the queue"
        );
    }

    #[test]
    fn lost_workers_requeue_until_attempts_run_out() {
        let mut t = JobTable::new(Limits::default(), 2);
        let id = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let (_, a) = t.plan(&id, &[worker("w1")], 20).unwrap();
        let c = t
            .finish(
                &id,
                a.attempt,
                Outcome::Lost("worker w1 (rank 0) lost during step 2: gone".into()),
                30,
            )
            .unwrap();
        assert_eq!(state(&t, &id), JobPhase::Queued);
        assert_eq!(
            c.job.message,
            "re-queued: worker w1 (rank 0) lost during step 2: gone"
        );
        // a busy refusal does not use up an attempt
        let (_, a) = t.plan(&id, &[worker("w1")], 40).unwrap();
        t.finish(
            &id,
            a.attempt,
            Outcome::StartFailed {
                reason: "worker w1 is busy".into(),
                counts: false,
                unreachable: None,
            },
            50,
        );
        assert_eq!(t.get(&id).unwrap().attempts, 1);
        let (_, a) = t.plan(&id, &[worker("w1")], 60).unwrap();
        assert_eq!(a.attempt, 2);
        let c = t
            .finish(&id, 2, Outcome::Lost("worker w1 (rank 0) lost".into()), 70)
            .unwrap();
        assert_eq!(state(&t, &id), JobPhase::Failed);
        assert_eq!(
            c.job.message,
            "worker w1 (rank 0) lost; gave up after 2 attempts"
        );
    }

    #[test]
    fn cancel_queued_at_once_and_running_through_its_attempt() {
        let mut t = JobTable::new(Limits::default(), 3);
        let q = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let r = t.submit_new(&spec(), 0, "", 11).unwrap().job.id;
        let (job, _) = t.cancel(&q, "", 12).unwrap();
        assert_eq!(job.phase, JobPhase::Cancelled);
        assert_eq!(job.message, "cancelled by request");
        assert_eq!(t.queued_requests().len(), 1);

        let (_, a) = t.plan(&r, &[worker("w1")], 20).unwrap();
        let mut control = handle(&mut t, &a);
        t.running(&r, 1, 21);
        t.cancel(&r, "wrong prompt", 22).unwrap();
        assert_eq!(state(&t, &r), JobPhase::Cancelled);
        assert_eq!(
            control.try_recv().unwrap(),
            Control::Cancel("wrong prompt".into())
        );
        // the workers stay claimed until the attempt ends; its outcome does not override
        assert_eq!(t.claimed().len(), 1);
        assert!(t
            .finish(&r, 1, Outcome::Lost("closed".into()), 23)
            .is_none());
        assert!(t.claimed().is_empty());
        assert_eq!(state(&t, &r), JobPhase::Cancelled);
        // cancelling an ended job changes nothing; an unknown one is NotFound
        assert!(t.cancel(&r, "again", 24).unwrap().1.is_none());
        assert_eq!(
            t.cancel("j-nope", "", 25).unwrap_err().to_string(),
            "no job j-nope"
        );
    }

    #[test]
    fn a_default_over_the_limits_fails_the_job_at_planning() {
        let mut t = JobTable::new(
            Limits {
                max_steps: 2,
                ..Limits::default()
            },
            3,
        );
        let id = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let c = t.plan(&id, &[worker("w1")], 20).unwrap_err().unwrap();
        assert_eq!(c.job.phase, JobPhase::Failed);
        assert_eq!(
            c.job.message,
            "spec.steps: 3 is over this farm's limit of 2"
        );
    }

    #[test]
    fn requeue_reasons_stay_in_front_of_waiting_reasons() {
        let mut t = JobTable::new(Limits::default(), 3);
        let id = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let (_, a) = t.plan(&id, &[worker("w1")], 20).unwrap();
        t.finish(
            &id,
            a.attempt,
            Outcome::Lost("worker w1 (rank 0) lost".into()),
            30,
        );
        let c = t
            .set_waiting(&id, "waiting: no live worker serves model tiny", 40)
            .unwrap();
        assert_eq!(
            c.job.message,
            "re-queued: worker w1 (rank 0) lost; waiting: no live worker serves model tiny"
        );
        // planned again, the old reason goes
        t.plan(&id, &[worker("w2")], 50).unwrap();
        assert_eq!(t.get(&id).unwrap().message, "");
    }

    #[test]
    fn watchers_hear_when_their_place_in_the_queue_moves() {
        let mut t = JobTable::new(Limits::default(), 3);
        let a = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let b = t.submit_new(&spec(), 0, "", 11).unwrap().job.id;
        assert!(t.position_updates(12).is_empty());
        t.plan(&a, &[worker("w1")], 13).unwrap();
        let moved = t.position_updates(14);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].job.id, b);
        assert!(!moved[0].persist);
        assert!(matches!(
            moved[0].event.event,
            Some(job_event::Event::Queued(Queued { position: 0, .. }))
        ));
        assert!(t.position_updates(15).is_empty());
    }

    #[test]
    fn waiting_reasons_are_changes_only_when_new() {
        let mut t = JobTable::new(Limits::default(), 3);
        let id = t.submit_new(&spec(), 0, "", 10).unwrap().job.id;
        let c = t
            .set_waiting(&id, "waiting: needs 2 workers, 1 live", 11)
            .unwrap();
        assert!(matches!(
            c.event.event,
            Some(job_event::Event::Queued(Queued { ref reason, .. })) if reason == "waiting: needs 2 workers, 1 live"
        ));
        assert!(t
            .set_waiting(&id, "waiting: needs 2 workers, 1 live", 12)
            .is_none());
    }

    #[tokio::test]
    async fn a_restart_requeues_active_jobs_and_keeps_ended_ones() {
        let store = InMemoryJobStore::new();
        let mut t = JobTable::new(Limits::default(), 3);
        let ids: Vec<String> = (0..4)
            .map(|i| t.submit_new(&spec(), i, "", 10 + i as u64).unwrap().job.id)
            .collect();
        let (_, a) = t.plan(&ids[3], &[worker("w1")], 20).unwrap();
        t.running(&ids[3], a.attempt, 21);
        t.step(
            &ids[3],
            a.attempt,
            Step {
                step: 1,
                total: 3,
                ..Default::default()
            },
            22,
        );
        t.plan(&ids[2], &[worker("w2")], 23).unwrap();
        t.cancel(&ids[1], "no", 24).unwrap();
        for job in t.list(|_| true) {
            store.put(&job).await.unwrap();
        }

        let mut restarted = JobTable::new(Limits::default(), 3);
        let changes = restarted.restore(store.load_all().await.unwrap(), 100);
        assert_eq!(changes.len(), 2);
        let job = restarted.get(&ids[3]).unwrap();
        assert_eq!(job.phase, JobPhase::Queued);
        assert_eq!(
            job.message,
            "re-queued: the coordinator restarted during attempt 1"
        );
        assert_eq!(job.steps_done, 0);
        assert_eq!(state(&restarted, &ids[1]), JobPhase::Cancelled);
        let order: Vec<String> = restarted
            .queued_requests()
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(order, [ids[3].clone(), ids[2].clone(), ids[0].clone()]);
        assert_eq!(restarted.list(|_| true).len(), 4);
        assert_eq!(restarted.list(|p| p == JobPhase::Cancelled).len(), 1);
    }

    /// A record whose layout cannot be parsed (another version wrote it, or a hand edit) fails
    /// its job with a message naming the job and the field; it is never run as one rank.
    #[test]
    fn a_stored_record_with_a_malformed_layout_fails_named_instead_of_running() {
        let mut t = JobTable::new(Limits::default(), 3);
        let good = t.submit_new(&spec(), 0, "", 10).unwrap().job;
        let bad = t.submit_new(&spec(), 0, "", 11).unwrap().job;
        let mut stored: serde_json::Value = serde_json::from_slice(&format::encode(&bad)).unwrap();
        stored["spec"]["layout"] = "tp=two".into();
        let stored = serde_json::to_vec(&stored).unwrap();

        let mut restarted = JobTable::new(Limits::default(), 3);
        let loaded = vec![
            format::decode(&good.id, &format::encode(&good)).unwrap(),
            format::decode(&bad.id, &stored).unwrap(),
        ];
        let changes = restarted.restore(loaded, 100);
        let failed = restarted.get(&bad.id).unwrap();
        assert_eq!(failed.phase, JobPhase::Failed);
        assert!(
            failed.message.starts_with(&format!(
                "job {}: its stored spec is invalid: spec.layout: layout `tp=two`",
                bad.id
            )),
            "{}",
            failed.message
        );
        let change = changes.iter().find(|c| c.job.id == bad.id).unwrap();
        assert!(change.persist, "the failure is written back to the store");
        let queued: Vec<String> = restarted
            .queued_requests()
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(
            queued,
            vec![good.id.clone()],
            "the readable job still queues"
        );
        assert!(restarted.plan(&bad.id, &[worker("w1")], 101).is_err());
    }

    /// A record a newer coordinator wrote is listed as failed, naming the job and what to do,
    /// and is not written back (that would destroy the newer record); the others carry on.
    #[test]
    fn a_stored_record_of_a_newer_schema_fails_named_and_is_left_as_stored() {
        let mut t = JobTable::new(Limits::default(), 3);
        let good = t.submit_new(&spec(), 0, "", 10).unwrap().job;
        let newer = br#"{"schema": 99, "id": "j-newer", "name": "shot 9", "priority": 4,
            "submitted_at_ms": 11, "spec": {"prompt": "a wolf", "windows": [[0, 8]]}}"#;

        let mut restarted = JobTable::new(Limits::default(), 3);
        let loaded = vec![
            format::decode(&good.id, &format::encode(&good)).unwrap(),
            format::decode("/longtake/jobs/j-newer", newer).unwrap(),
        ];
        let changes = restarted.restore(loaded, 100);
        assert!(changes.is_empty(), "nothing is written back: {changes:?}");
        let failed = restarted.get("j-newer").unwrap();
        assert_eq!(failed.phase, JobPhase::Failed);
        assert_eq!((failed.name.as_str(), failed.priority), ("shot 9", 4));
        assert!(
            failed.message.starts_with(
                "job j-newer: its record /longtake/jobs/j-newer has schema version 99"
            ),
            "{}",
            failed.message
        );
        assert!(
            failed.message.contains("delete the record"),
            "{}",
            failed.message
        );
        let queued: Vec<String> = restarted
            .queued_requests()
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(queued, vec![good.id.clone()]);
        assert!(restarted.plan("j-newer", &[worker("w1")], 101).is_err());
    }
}
