//! The coordinator's Prometheus metrics: counters and histograms fed by the job events as they
//! are announced ([`Metrics::observe`]), and gauges (queue depth, jobs and workers by state)
//! read from the job table and the membership when scraped ([`Metrics::refresh`]). Names are
//! `longtake_proto::telemetry::metric`'s.

use std::collections::BTreeMap;

use longtake_proto::job_event::Event;
use longtake_proto::metrics::{duration_buckets, registered, seconds};
use longtake_proto::telemetry::metric;
use longtake_proto::{worker_state_name, Worker};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::jobs::Change;
use crate::record::JobPhase;

/// Every metric of one coordinator, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    queue_depth: IntGaugeVec,
    jobs: IntGaugeVec,
    workers: IntGaugeVec,
    submitted: IntCounter,
    ended: IntCounterVec,
    attempts: IntCounter,
    requeues: IntCounter,
    job_seconds: Histogram,
    step_seconds: HistogramVec,
    tokens: IntCounter,
    exchange_bytes: IntCounter,
    decode_seconds: Histogram,
    encode_seconds: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(
        registry,
        IntCounter::new(name, help).expect("a valid metric"),
    )
}

fn gauges(registry: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), &[label]).expect("a valid metric"),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = longtake_proto::metrics::registry();
        let ended = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(metric::JOBS_ENDED, "Jobs that ended, by state."),
                &["state"],
            )
            .expect("a valid metric"),
        );
        let step_seconds = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    metric::STEP_SECONDS,
                    "One denoising step, by layout (its degrees, and the worker groups).",
                )
                .buckets(duration_buckets()),
                &["cfg", "tp", "ulysses", "ring", "groups"],
            )
            .expect("a valid metric"),
        );
        Self {
            queue_depth: gauges(
                &registry,
                metric::QUEUE_DEPTH,
                "Jobs waiting in the queue, by priority.",
                "priority",
            ),
            jobs: gauges(&registry, metric::JOBS, "Jobs known, by state.", "state"),
            workers: gauges(
                &registry,
                metric::WORKERS,
                "Workers in the membership, by state.",
                "state",
            ),
            submitted: counter(&registry, metric::JOBS_SUBMITTED, "Jobs accepted."),
            ended,
            attempts: counter(&registry, metric::ATTEMPTS, "Attempts started on workers."),
            requeues: counter(
                &registry,
                metric::REQUEUES,
                "Jobs sent back to the queue after a lost worker or a failed start.",
            ),
            job_seconds: seconds(
                &registry,
                metric::JOB_SECONDS,
                "From submission to the clip written, of the jobs done.",
            ),
            step_seconds,
            tokens: counter(
                &registry,
                metric::TOKENS,
                "Latent cells denoised (per step: latent frames x rows x columns).",
            ),
            exchange_bytes: counter(
                &registry,
                metric::EXCHANGE_BYTES,
                "Bytes the worker groups of multi-group jobs exchanged.",
            ),
            decode_seconds: seconds(
                &registry,
                metric::DECODE_SECONDS,
                "The VAE decode of a job done (its slowest group's).",
            ),
            encode_seconds: seconds(
                &registry,
                metric::ENCODE_SECONDS,
                "Encoding a job's clip on the coordinator.",
            ),
            registry,
        }
    }

    /// A job was accepted.
    pub fn submitted(&self) {
        self.submitted.inc();
    }

    /// Counts what one announced change says happened.
    pub fn observe(&self, change: &Change) {
        let job = &change.job;
        match &change.event.event {
            Some(Event::Planned(_)) => self.attempts.inc(),
            Some(Event::Queued(queued)) if !queued.reason.is_empty() && job.attempts > 0 => {
                self.requeues.inc()
            }
            // a Step of 0 sums up a job that is loading (the first event a watcher gets)
            Some(Event::Step(step)) if step.step > 0 => {
                if let Some(spec) = job.spec.resolved() {
                    let layout = spec.layout;
                    let groups = job.plan.as_ref().map_or(1, |plan| plan.groups.len());
                    let labels = [layout.cfg, layout.tp, layout.ulysses, layout.ring, groups]
                        .map(|degree| degree.to_string());
                    self.step_seconds
                        .with_label_values(&labels.each_ref().map(String::as_str))
                        .observe(step.step_s);
                    self.tokens.inc_by(spec.latent_cells());
                }
                self.exchange_bytes
                    .inc_by(step.group_exchange_bytes.iter().sum());
            }
            Some(Event::Done(done)) => {
                self.ended.with_label_values(&["done"]).inc();
                let took_ms = job.finished_at_ms.saturating_sub(job.submitted_at_ms);
                self.job_seconds.observe(took_ms as f64 / 1e3);
                if let Some(split) = &done.time_split {
                    self.decode_seconds.observe(split.decode_s);
                    self.encode_seconds.observe(split.encode_s);
                }
            }
            Some(Event::Failed(_)) => self.ended.with_label_values(&["failed"]).inc(),
            Some(Event::Cancelled(_)) => self.ended.with_label_values(&["cancelled"]).inc(),
            _ => {}
        }
    }

    /// Sets the gauges from the jobs' phases and priorities and the workers now, and gathers
    /// every metric.
    pub fn refresh(
        &self,
        jobs: impl Iterator<Item = (JobPhase, i32)>,
        workers: &[Worker],
    ) -> Vec<prometheus::proto::MetricFamily> {
        let mut by_phase: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut queued: BTreeMap<i32, i64> = BTreeMap::new();
        for (phase, priority) in jobs {
            *by_phase.entry(phase.name()).or_default() += 1;
            if phase == JobPhase::Queued {
                *queued.entry(priority).or_default() += 1;
            }
        }
        self.jobs.reset();
        for phase in [
            JobPhase::Queued,
            JobPhase::Planned,
            JobPhase::Running,
            JobPhase::Done,
            JobPhase::Failed,
            JobPhase::Cancelled,
        ] {
            let count = by_phase.get(phase.name()).copied().unwrap_or(0);
            self.jobs.with_label_values(&[phase.name()]).set(count);
        }
        self.queue_depth.reset();
        for (priority, count) in queued {
            self.queue_depth
                .with_label_values(&[priority.to_string().as_str()])
                .set(count);
        }
        self.workers.reset();
        for state in ["idle", "busy", "draining"] {
            self.workers.with_label_values(&[state]).set(0);
        }
        for worker in workers {
            self.workers
                .with_label_values(&[worker_state_name(worker.state)])
                .inc();
        }
        self.registry.gather()
    }
}
