//! The running coordinator's core: the job table behind one lock, the job store every transition
//! is written to before it is broadcast, the live view of the workers (from the membership
//! subscription, resubscribed with back-off when it closes), and the loop that re-runs placement
//! on submit, membership changes, attempt ends and a 1 s tick, starting a dispatch task for every
//! job placement gives workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use longtake_proto::membership::{Membership, MembershipEvent};
use longtake_proto::{job_event, now_ms, Decoding, Encoding, JobEvent, RenderSpec, Step, Worker};
use tokio::sync::{broadcast, mpsc, watch, Mutex, Notify};

use crate::artifacts::{Artifacts, StagedInput};
use crate::dispatch::{self, Attempt, Reporter};
use crate::jobs::{AttemptHandle, Change, JobTable, Submitted, TableError};
use crate::metrics::Metrics;
use crate::placement::{self, Decision};
use crate::record::{CheckpointRef, JobPhase, JobRecord};
use crate::{CoordinatorConfig, CoordinatorError, JobStore};
use longtake_proto::spec::{InputKind, Limits, ModelDescription};

const TICK: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long placement passes over a worker an attempt could not reach: longer than a worker's
/// default lease (10 s), so a dead worker's record expires before it is tried again.
const UNREACHABLE_PASSED_OVER: Duration = Duration::from_secs(30);

/// The coordinator's own time per step: from rank 0's step event arriving to the job event
/// being broadcast.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepOverhead {
    pub steps: u64,
    pub total: Duration,
    pub max: Duration,
}

pub(crate) struct Inner {
    config: CoordinatorConfig,
    store: Arc<dyn JobStore>,
    pub(crate) artifacts: Artifacts,
    table: Mutex<JobTable>,
    workers: StdMutex<BTreeMap<String, Worker>>,
    /// Workers an attempt could not reach, passed over by placement until the time given (or
    /// until they register again: another `started_at_ms`).
    unreachable: StdMutex<HashMap<String, (u64, Instant)>>,
    wake: Notify,
    stop: watch::Sender<bool>,
    attempts: StdMutex<tokio::task::JoinSet<()>>,
    step_count: AtomicU64,
    step_nanos: AtomicU64,
    step_max_nanos: AtomicU64,
    /// Jobs whose latest record did not reach the store (an etcd outage): written again at
    /// every tick until the store takes them, so no record stays stale after the outage.
    unsaved: StdMutex<HashSet<String>>,
    metrics: Metrics,
}

/// Handle on the scheduler; clones share it.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

/// A job asked for: its spec, and how and by whom it is queued.
#[derive(Debug, Clone, Copy)]
pub struct Submission<'a> {
    pub spec: &'a RenderSpec,
    pub priority: i32,
    /// The job's name for people (may be empty).
    pub name: &'a str,
    /// The client's id for this submission: a retry with the same id gets the job already
    /// queued (may be empty: no deduplication).
    pub request_id: &'a str,
    /// Who owns the job: the caller named by its token.
    pub owner: &'a str,
    /// The W3C `traceparent` the job's spans continue (may be empty).
    pub trace_parent: &'a str,
}

impl Scheduler {
    pub async fn start(
        config: CoordinatorConfig,
        membership: Arc<dyn Membership>,
        store: Arc<dyn JobStore>,
    ) -> Result<Self, CoordinatorError> {
        let artifacts = Artifacts::open(&config.artifact_dir).map_err(|source| {
            CoordinatorError::Artifacts {
                dir: config.artifact_dir.clone(),
                source,
            }
        })?;
        let mut table = JobTable::new(config.limits.clone(), config.max_attempts)
            .with_quotas(config.quotas.clone());
        let restored = table.restore(store.load_all().await?, now_ms());
        for change in restored.iter().filter(|c| c.persist) {
            store.put(&change.job).await?;
        }
        let subscription = membership.subscribe().await?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            store,
            artifacts,
            table: Mutex::new(table),
            workers: StdMutex::new(
                subscription
                    .workers
                    .iter()
                    .map(|w| (w.id.clone(), w.clone()))
                    .collect(),
            ),
            unreachable: StdMutex::new(HashMap::new()),
            wake: Notify::new(),
            stop,
            attempts: StdMutex::new(tokio::task::JoinSet::new()),
            step_count: AtomicU64::new(0),
            step_nanos: AtomicU64::new(0),
            step_max_nanos: AtomicU64::new(0),
            unsaved: StdMutex::new(HashSet::new()),
            metrics: Metrics::new(),
        });
        tokio::spawn(watch_membership(
            Arc::downgrade(&inner),
            membership,
            subscription.events,
        ));
        tokio::spawn(schedule_loop(Arc::downgrade(&inner)));
        if let Some(retention) = inner.config.retain_finished {
            tokio::spawn(prune_loop(Arc::downgrade(&inner), retention));
        }
        inner.wake.notify_one();
        Ok(Self { inner })
    }

    /// Stops the loops and abandons the running attempts without recording anything, as a crash
    /// would: their workers see the task streams close, and the next start re-queues the jobs.
    pub fn stop(&self) {
        let _ = self.inner.stop.send(true);
        lock(&self.inner.attempts).abort_all();
    }

    /// Resolves once the scheduler is stopped (at once if it already is).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.inner.stop.subscribe();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.inner.artifacts
    }

    /// What specs this farm accepts.
    pub async fn limits(&self) -> Limits {
        self.inner.table.lock().await.limits().clone()
    }

    /// Queues a job, or with a request id an earlier submission already queued, returns its
    /// job. Its input file (read into the spec's `input`), waiting in `input`, is moved into the
    /// job's directory before the job is stored, so a job is never queued without it; it is
    /// removed when the job is not accepted.
    pub async fn submit(
        &self,
        submission: Submission<'_>,
        input: Option<(StagedInput, InputKind)>,
    ) -> Result<JobRecord, SubmitError> {
        let Submission {
            spec,
            priority,
            name,
            request_id,
            owner,
            trace_parent,
        } = submission;
        let mut table = self.inner.table.lock().await;
        let change = match table.submit(spec, priority, name, request_id, owner, now_ms())? {
            Submitted::New(mut change) => {
                if !trace_parent.is_empty() {
                    table.set_trace_parent(&change.job.id, trace_parent);
                    change.job.trace_parent = trace_parent.to_string();
                }
                change
            }
            Submitted::Existing(job) => return Ok(job),
        };
        let id = change.job.id.clone();
        if let Some((staged, kind)) = input {
            if let Err(e) = self.inner.artifacts.place_input(staged, &id, kind) {
                table.forget(&id);
                let _ = self.inner.artifacts.clear(&id);
                return Err(SubmitError::Input(e));
            }
        }
        // nothing a user submitted is lost: the job is accepted only once it is stored
        if let Err(e) = self.inner.store.put(&change.job).await {
            table.forget(&id);
            let _ = self.inner.artifacts.clear(&id);
            return Err(SubmitError::Store(e));
        }
        let job = change.job.clone();
        self.inner.metrics.submitted();
        table.announce(change);
        drop(table);
        self.inner.wake.notify_one();
        Ok(job)
    }

    pub async fn get(&self, id: &str) -> Option<JobRecord> {
        self.inner.table.lock().await.get(id).cloned()
    }

    /// The jobs whose phase is `wanted`, oldest first.
    pub async fn list(&self, wanted: impl Fn(JobPhase) -> bool) -> Vec<JobRecord> {
        self.inner.table.lock().await.list(wanted)
    }

    pub async fn watch(&self, id: &str) -> Option<(Vec<JobEvent>, broadcast::Receiver<JobEvent>)> {
        self.inner.table.lock().await.watch(id, now_ms())
    }

    /// The event that sums up a job now (to resynchronise a lagging watcher).
    pub async fn current_event(&self, id: &str) -> Option<JobEvent> {
        let table = self.inner.table.lock().await;
        let job = table.get(id)?.clone();
        Some(table.current_event(&job, now_ms()))
    }

    pub async fn cancel(&self, id: &str, reason: &str) -> Result<JobRecord, TableError> {
        let mut table = self.inner.table.lock().await;
        let (job, change) = table.cancel(id, reason, now_ms())?;
        if let Some(change) = change {
            self.inner.persist(&change).await;
            table.announce(change);
        }
        drop(table);
        self.inner.wake.notify_one();
        Ok(job)
    }

    /// Every metric, the gauges read from the job table and the membership now.
    pub async fn gather_metrics(&self) -> Vec<prometheus::proto::MetricFamily> {
        let workers = self.workers();
        let table = self.inner.table.lock().await;
        self.inner.metrics.refresh(table.phases(), &workers)
    }

    pub fn workers(&self) -> Vec<Worker> {
        lock(&self.inner.workers).values().cloned().collect()
    }

    pub fn step_overhead(&self) -> StepOverhead {
        let i = &self.inner;
        StepOverhead {
            steps: i.step_count.load(Ordering::Relaxed),
            total: Duration::from_nanos(i.step_nanos.load(Ordering::Relaxed)),
            max: Duration::from_nanos(i.step_max_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] TableError),
    #[error("the job could not be stored, so it was not accepted: {0}")]
    Store(#[from] crate::StoreError),
    #[error("the job's input file could not be stored, so it was not accepted: {0}")]
    Input(std::io::Error),
}

#[async_trait::async_trait]
impl longtake_proto::metrics::Scrape for Scheduler {
    async fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.gather_metrics().await
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    async fn persist(&self, change: &Change) {
        if change.persist {
            self.write(&change.job).await;
        }
    }

    /// Writes a job's record (the caller holds the table); one the store refuses is kept
    /// among the unsaved, written again at the next tick.
    async fn write(&self, job: &JobRecord) {
        match self.store.put(job).await {
            Ok(()) => {
                lock(&self.unsaved).remove(&job.id);
            }
            Err(e) => {
                tracing::warn!(job = %job.id, "job store: {e}; the record is written again once the store answers");
                lock(&self.unsaved).insert(job.id.clone());
            }
        }
    }

    /// Writes the current record of every job whose last write failed; returns how many are
    /// still unsaved.
    async fn save_unsaved(&self) -> usize {
        let ids: Vec<String> = lock(&self.unsaved).iter().cloned().collect();
        if ids.is_empty() {
            return 0;
        }
        let mut saved = 0;
        // The table stays locked across the writes, as for every change's write: a newer
        // record of the same job cannot be written in between and then overwritten by this one.
        let table = self.table.lock().await;
        for id in ids {
            let Some(job) = table.get(&id) else {
                lock(&self.unsaved).remove(&id);
                continue;
            };
            if self.store.put(job).await.is_err() {
                break; // still down: the next tick tries again
            }
            lock(&self.unsaved).remove(&id);
            saved += 1;
        }
        drop(table);
        let left = lock(&self.unsaved).len();
        if saved > 0 {
            tracing::info!(
                "job store answers again: {saved} job record(s) brought up to date, {left} left"
            );
        }
        left
    }

    async fn apply(&self, table: &mut JobTable, change: Option<Change>) {
        if let Some(change) = change {
            self.persist(&change).await;
            self.metrics.observe(&change);
            table.announce(change);
        }
    }

    /// Deletes the ended jobs older than `retention`: the record from the store first (a job
    /// whose record stays is kept whole, to be tried again), then its artifacts, then the entry.
    async fn prune(&self, retention: Duration) {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let expired = self.table.lock().await.ended_before(cutoff);
        for job in expired {
            if let Err(e) = self.store.delete(&job.id).await {
                tracing::warn!(job = %job.id, "retention: cannot delete the record, kept: {e}");
                continue;
            }
            if let Err(e) = self.artifacts.clear(&job.id) {
                tracing::warn!(job = %job.id, "retention: the record is gone, its artifacts not: {e}");
            }
            self.table.lock().await.remove_ended(&job.id);
            tracing::info!(
                target: "longtake::audit",
                action = "prune",
                job = %job.id,
                owner = %job.owner,
                "ended {} s ago",
                now_ms().saturating_sub(job.finished_at_ms) / 1000
            );
        }
    }

    /// One placement round over the queue.
    async fn schedule(self: &Arc<Self>) {
        // reap the attempts that ended, so the set does not grow
        {
            let mut attempts = lock(&self.attempts);
            while attempts.try_join_next().is_some() {}
        }
        let live: Vec<Worker> = {
            let mut unreachable = lock(&self.unreachable);
            let now = Instant::now();
            unreachable.retain(|_, (_, until)| *until > now);
            lock(&self.workers)
                .values()
                .filter(|w| {
                    unreachable
                        .get(&w.id)
                        .is_none_or(|&(started, _)| started != w.started_at_ms)
                })
                .cloned()
                .collect()
        };
        let mut table = self.table.lock().await;
        let requests = table.queued_requests();
        if requests.is_empty() {
            return;
        }
        let decisions = placement::plan(&requests, &live, &table.claimed(), &table.ranks_left());
        for (id, decision) in decisions {
            match decision {
                Decision::Place(workers) => match table.plan(&id, &workers, now_ms()) {
                    Ok((change, assignment)) => {
                        self.apply(&mut table, Some(change)).await;
                        let (control, control_rx) = mpsc::unbounded_channel();
                        table.attach(
                            &id,
                            AttemptHandle {
                                attempt: assignment.attempt,
                                workers: workers.iter().map(|w| w.id.clone()).collect(),
                                control,
                            },
                        );
                        // What an earlier attempt wrote of the output goes; its checkpoints
                        // stay, and the job continues from the last step every group saved.
                        let _ = self.artifacts.clear_output(&assignment.job);
                        let groups = assignment.spec.windows.groups.max(1);
                        let resume = assignment
                            .job
                            .checkpoint
                            .and_then(|c| self.read_checkpoints(&id, c, groups));
                        let resume_state = match resume {
                            Some((step, states)) => {
                                table.resume_from(&id, assignment.attempt, step);
                                states
                            }
                            None => {
                                table.resume_from(&id, assignment.attempt, 0);
                                Vec::new()
                            }
                        };
                        let output = self
                            .artifacts
                            .create_job_dir(&id)
                            .and_then(|_| self.artifacts.output_path(&assignment.job));
                        let (job_id, number) = (id.clone(), assignment.attempt);
                        let trace_parent = assignment.job.trace_parent.clone();
                        let input = match &assignment.spec.input {
                            Some(input) => self.artifacts.input_path(&id, input.kind).map(Some),
                            None => Ok(None),
                        };
                        let attempt = output.and_then(|output| Ok((output, input?))).map(
                            |(output, input)| Attempt {
                                output,
                                input,
                                trace_parent,
                                job_id: id.clone(),
                                attempt: assignment.attempt,
                                spec: assignment.spec,
                                workers,
                                start_timeout: self.config.start_timeout,
                                resume_state,
                                checkpoint_every: self.config.checkpoint_every,
                                tls: self.config.tls.clone(),
                            },
                        );
                        let inner = Arc::clone(self);
                        lock(&self.attempts).spawn(async move {
                            let reporter = AttemptReporter {
                                inner: Arc::clone(&inner),
                                job_id: job_id.clone(),
                                attempt: number,
                                groups,
                                saved: StdMutex::default(),
                            };
                            let outcome = match attempt {
                                Ok(attempt) => dispatch::run(attempt, control_rx, &reporter).await,
                                Err(e) => crate::jobs::Outcome::Failed(format!(
                                    "the job's output has no place in the artifact directory: {e}"
                                )),
                            };
                            inner.finish(&job_id, number, outcome).await;
                        });
                    }
                    Err(failed) => self.apply(&mut table, failed.map(|c| *c)).await,
                },
                Decision::Wait(reason) | Decision::Skip(reason) => {
                    // A model a live worker serves says whether the job can ever run; a job
                    // whose model no worker serves yet waits (workers may still come).
                    let model = table.get(&id).and_then(|job| {
                        let name = &job.spec.request()?.model;
                        live.iter()
                            .flat_map(|w| &w.models)
                            .find(|m| &m.name == name)
                            .map(ModelDescription::from)
                    });
                    let failed =
                        model.and_then(|model| table.fail_if_unrunnable(&id, &model, now_ms()));
                    let change = match failed {
                        Some(failed) => Some(failed),
                        None => table.set_waiting(&id, &reason, now_ms()),
                    };
                    self.apply(&mut table, change).await;
                }
            }
        }
        for change in table.position_updates(now_ms()) {
            table.announce(change);
        }
    }

    /// The states every worker group of job `id` saved after `checkpoint.step`, in group order,
    /// with that step; `None` (the job starts over, with a warning saying why) when the job now
    /// has another number of groups or a state is missing or unreadable.
    fn read_checkpoints(
        &self,
        id: &str,
        checkpoint: CheckpointRef,
        groups: u32,
    ) -> Option<(u32, Vec<Vec<u8>>)> {
        let step = checkpoint.step;
        if checkpoint.groups != groups {
            tracing::warn!(job = %id, "its checkpoint of step {step} is of {} worker groups, the job has {groups}: starting over", checkpoint.groups);
            return None;
        }
        let states = (0..groups)
            .map(|group| match self.artifacts.read_checkpoint(id, group, step) {
                Ok(Some(state)) => Some(state),
                Ok(None) => {
                    tracing::warn!(job = %id, "group {group}'s checkpoint of step {step} is missing: starting over");
                    None
                }
                Err(e) => {
                    tracing::warn!(job = %id, "group {group}'s checkpoint of step {step} cannot be read, starting over: {e}");
                    None
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some((step, states))
    }

    async fn finish(&self, id: &str, attempt: u32, outcome: crate::jobs::Outcome) {
        if let crate::jobs::Outcome::StartFailed {
            unreachable: Some(worker),
            ..
        } = &outcome
        {
            let started = lock(&self.workers)
                .get(worker)
                .map_or(0, |w| w.started_at_ms);
            tracing::warn!(
                worker = %worker,
                "unreachable: passed over by placement for {UNREACHABLE_PASSED_OVER:?} \
                 (or until it registers again)"
            );
            lock(&self.unreachable).insert(
                worker.clone(),
                (started, Instant::now() + UNREACHABLE_PASSED_OVER),
            );
        }
        let mut table = self.table.lock().await;
        let change = table.finish(id, attempt, outcome, now_ms());
        // A job that ended leaves its output only when done, and no checkpoint; one that went
        // back to the queue keeps its checkpoint to resume from.
        if let Some(job) = table.get(id) {
            let tidied = match job.phase {
                JobPhase::Done => self.artifacts.remove_checkpoints(id, None),
                JobPhase::Failed | JobPhase::Cancelled => self.artifacts.clear(id),
                _ => self.artifacts.clear_output(job),
            };
            if let Err(e) = tidied {
                tracing::warn!(job = %id, "tidying its artifacts: {e}");
            }
        }
        self.apply(&mut table, change).await;
        drop(table);
        self.wake.notify_one();
    }
}

struct AttemptReporter {
    inner: Arc<Inner>,
    job_id: String,
    attempt: u32,
    /// The job's worker groups: a step is a checkpoint once each has saved it.
    groups: u32,
    saved: StdMutex<SavedSteps>,
}

/// Which groups of an attempt saved which steps, and the last step all of them saved.
#[derive(Debug, Default)]
struct SavedSteps {
    by_step: BTreeMap<u32, HashSet<u32>>,
    complete: Option<u32>,
}

impl SavedSteps {
    /// Group `group` of `groups` saved `step`. When that completes the step (and it is later
    /// than the last complete one), returns `Some` of the step before it that was complete
    /// (older files can go), or `Some(None)` for the attempt's first.
    fn add(&mut self, group: u32, step: u32, groups: u32) -> Option<Option<u32>> {
        if self.complete.is_some_and(|c| step <= c) {
            return None;
        }
        let saved = self.by_step.entry(step).or_default();
        saved.insert(group);
        if saved.len() < groups as usize {
            return None;
        }
        self.by_step.retain(|&s, _| s > step);
        Some(self.complete.replace(step))
    }
}

#[async_trait::async_trait]
impl Reporter for AttemptReporter {
    async fn running(&self) {
        let mut table = self.inner.table.lock().await;
        let change = table.running(&self.job_id, self.attempt, now_ms());
        self.inner.apply(&mut table, change).await;
    }

    async fn step(&self, step: Step, received: Instant) {
        let mut table = self.inner.table.lock().await;
        let change = table.step(&self.job_id, self.attempt, step, now_ms());
        self.inner.apply(&mut table, change).await;
        drop(table);
        let nanos = received.elapsed().as_nanos() as u64;
        self.inner.step_count.fetch_add(1, Ordering::Relaxed);
        self.inner.step_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.inner
            .step_max_nanos
            .fetch_max(nanos, Ordering::Relaxed);
    }

    async fn decoding(&self, frames: u32) {
        let body = job_event::Event::Decoding(Decoding { frames });
        let mut table = self.inner.table.lock().await;
        let change = table.progress(&self.job_id, self.attempt, body, now_ms());
        self.inner.apply(&mut table, change).await;
    }

    async fn checkpoint(&self, group: u32, step: u32, state: Vec<u8>) {
        let artifacts = self.inner.artifacts.clone();
        let id = self.job_id.clone();
        let written = tokio::task::spawn_blocking(move || {
            artifacts.write_checkpoint(&id, group, step, &state)
        })
        .await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(job = %self.job_id, "writing group {group}'s checkpoint of step {step}: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %self.job_id, "writing group {group}'s checkpoint panicked: {e}");
                return;
            }
        }
        let Some(superseded) = lock(&self.saved).add(group, step, self.groups) else {
            return;
        };
        let checkpoint = CheckpointRef {
            step,
            groups: self.groups,
        };
        let mut table = self.inner.table.lock().await;
        if let Some(job) = table.checkpoint(&self.job_id, self.attempt, checkpoint) {
            self.inner.write(&job).await;
        }
        drop(table);
        // The step before this one stays too: a record whose write failed (etcd away) may
        // still name it when this coordinator is gone.
        if let Some(before) = superseded {
            let artifacts = self.inner.artifacts.clone();
            let id = self.job_id.clone();
            let removed = tokio::task::spawn_blocking(move || {
                artifacts.remove_checkpoints(&id, Some(before))
            })
            .await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(job = %self.job_id, "removing checkpoints before step {before}: {e}");
            }
        }
    }

    async fn encoding(&self, frames_written: u32, frames_total: u32) {
        let body = job_event::Event::Encoding(Encoding {
            frames_written,
            frames_total,
        });
        let mut table = self.inner.table.lock().await;
        let change = table.progress(&self.job_id, self.attempt, body, now_ms());
        self.inner.apply(&mut table, change).await;
    }
}

async fn schedule_loop(inner: Weak<Inner>) {
    let mut stop = match inner.upgrade() {
        Some(i) => i.stop.subscribe(),
        None => return,
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if *stop.borrow() {
            return;
        }
        strong.save_unsaved().await;
        strong.schedule().await;
        let wait = async {
            tokio::select! {
                _ = strong.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = stop.changed() => return,
        }
    }
}

/// How often retention looks for jobs to prune: a quarter of the retention, within 1 s to 60 s.
fn prune_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Prunes ended jobs older than `retention`, record, artifacts and all, from the start on (a
/// coordinator restarted over a long history prunes it first) until the coordinator stops.
async fn prune_loop(inner: Weak<Inner>, retention: Duration) {
    let mut stop = match inner.upgrade() {
        Some(i) => i.stop.subscribe(),
        None => return,
    };
    let mut ticks = tokio::time::interval(prune_interval(retention));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.prune(retention).await;
    }
}

async fn watch_membership(
    inner: Weak<Inner>,
    membership: Arc<dyn Membership>,
    mut events: mpsc::Receiver<MembershipEvent>,
) {
    let mut stop = match inner.upgrade() {
        Some(i) => i.stop.subscribe(),
        None => return,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = stop.changed() => return,
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        match event {
            Some(MembershipEvent::Put(worker)) => {
                lock(&strong.workers).insert(worker.id.clone(), worker);
            }
            Some(MembershipEvent::Left(id)) => {
                lock(&strong.workers).remove(&id);
                strong.table.lock().await.worker_left(&id);
            }
            None => {
                tracing::warn!("the membership watch closed; subscribing again");
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    match membership.subscribe().await {
                        Ok(sub) => {
                            backoff = Duration::from_millis(100);
                            let fresh: BTreeMap<String, Worker> =
                                sub.workers.into_iter().map(|w| (w.id.clone(), w)).collect();
                            let gone: Vec<String> = lock(&strong.workers)
                                .keys()
                                .filter(|id| !fresh.contains_key(*id))
                                .cloned()
                                .collect();
                            *lock(&strong.workers) = fresh;
                            let table = strong.table.lock().await;
                            for id in gone {
                                table.worker_left(&id);
                            }
                            events = sub.events;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!("membership: {e}; retrying in {backoff:?}");
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        }
        strong.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::SavedSteps;

    /// A step is complete once every group saved it, whatever the order the groups report in
    /// (a group may save the next step before another saved this one); completing it names the
    /// previous complete step, whose older files can go, and a late report of an older step
    /// changes nothing.
    #[test]
    fn a_step_is_a_checkpoint_once_every_group_saved_it() {
        let mut saved = SavedSteps::default();
        assert_eq!(saved.add(0, 1, 2), None);
        assert_eq!(saved.add(0, 2, 2), None);
        assert_eq!(saved.add(1, 1, 2), Some(None));
        assert_eq!(saved.add(1, 2, 2), Some(Some(1)));
        assert_eq!(saved.add(1, 3, 2), None);
        assert_eq!(
            saved.add(0, 1, 2),
            None,
            "older than the last complete step"
        );
        assert_eq!(saved.add(0, 3, 2), Some(Some(2)));
        let mut one = SavedSteps::default();
        assert_eq!(one.add(0, 4, 1), Some(None));
        assert_eq!(one.add(0, 8, 1), Some(Some(4)));
    }
}
