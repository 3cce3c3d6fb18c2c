//! The one vocabulary of longtake's telemetry: the spans every process opens for the work it
//! does, nested job → attempt → task → step → window → block → collective, with decode, encode
//! and fetch beside them, and the names of the metrics the farm
//! exports. The coordinator, the worker daemon and the model stack open their spans through
//! these functions, so a trace reads the same whichever process wrote it and the observability
//! work (OTLP export, the trace context over gRPC, Prometheus) has one place to change.
//!
//! Spans are `tracing` spans at `INFO` (a step, a job) or `DEBUG` (a collective): with no
//! subscriber, or a filter that drops them, they cost a level check. A trace crosses processes
//! through [`inject`] (a caller's gRPC metadata) and [`extract`] / [`adopt`] (the callee's span).

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A command of the CLI that talks to a farm (`render`, `submit`, ...): the root of a job's
/// trace.
pub fn cli_span(command: &str) -> Span {
    tracing::info_span!("cli", command)
}

/// A job, from submission to its end, on the coordinator.
pub fn job_span(job_id: &str) -> Span {
    tracing::info_span!("job", job.id = %job_id)
}

/// One attempt of a job on its workers (a job re-queued after a lost worker has several).
pub fn attempt_span(job_id: &str, attempt: u32) -> Span {
    tracing::info_span!("attempt", job.id = %job_id, attempt)
}

/// A worker's task: its rank of an attempt.
pub fn task_span(job_id: &str, attempt: u32, rank: usize, world_size: usize) -> Span {
    tracing::info_span!("task", job.id = %job_id, attempt, rank, world_size)
}

/// One denoising step (0-based `index` of `total`).
pub fn step_span(index: usize, total: usize) -> Span {
    tracing::info_span!("step", index, total)
}

/// One window's flow prediction inside a denoising step (latent frames `start..start + len`).
pub fn window_span(start: usize, len: usize) -> Span {
    tracing::debug_span!("window", start, len)
}

/// A transfer of shared frames between this rank and its peer in worker group `group` (a long
/// clip's groups settle the frames they share every step): `direction` is `send` or `recv`;
/// `bytes` where known when it starts (a receive records them once they have arrived: a field
/// given a value at the start and recorded again is exported twice).
pub fn exchange_span(direction: &'static str, group: usize, bytes: Option<usize>) -> Span {
    let span = tracing::debug_span!("exchange", direction, group, bytes = tracing::field::Empty);
    if let Some(bytes) = bytes {
        span.record("bytes", bytes);
    }
    span
}

/// One transformer block of a flow prediction (`index` from 0), within a step.
pub fn block_span(index: usize) -> Span {
    tracing::debug_span!("block", index)
}

/// Encoding a job's clip on the coordinator, as its frames arrive and closing it.
pub fn encode_span(job_id: &str, frames: usize) -> Span {
    tracing::info_span!("encode", job.id = %job_id, frames)
}

/// Serving a finished job's output to a client.
pub fn fetch_span(job_id: &str) -> Span {
    tracing::info_span!("fetch", job.id = %job_id)
}

/// The VAE decode of a group's latents.
pub fn decode_span(latent_frames: usize) -> Span {
    tracing::info_span!("decode", latent_frames)
}

/// One collective of a communicator (`op`: all_reduce, all_gather, all_to_all, ...).
pub fn collective_span(op: &'static str, bytes: usize) -> Span {
    tracing::debug_span!("collective", op, bytes)
}

/// Carries `span`'s trace context (W3C `traceparent`, `tracestate`) in gRPC metadata, so the
/// spans the callee opens for the call join the caller's trace. Does nothing where no trace
/// is exported (the global propagator is then a no-op).
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataCarrier(metadata))
    });
}

/// The trace context a caller sent in `metadata` (see [`inject`]), to parent the callee's
/// span with [`adopt`].
pub fn extract(metadata: &MetadataMap) -> opentelemetry::Context {
    let carrier = ReadCarrier(metadata);
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
}

/// `span`'s trace context as one `traceparent` value, kept with a job so that its later
/// attempts join the trace of its submission; empty where no trace is exported.
pub fn traceparent(span: &Span) -> String {
    let mut fields: HashMap<String, String> = HashMap::new();
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut fields)
    });
    fields.remove("traceparent").unwrap_or_default()
}

/// The trace context of a `traceparent` value kept by [`traceparent`] (an empty context for
/// an empty or malformed one).
pub fn context_of(traceparent: &str) -> opentelemetry::Context {
    let fields = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&fields))
}

/// Makes `span` a child of the (remote) span of `parent`, when `parent` has one.
pub fn adopt(span: &Span, parent: opentelemetry::Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // refused only for a span already started elsewhere: the span keeps its own parent
        let _ = span.set_parent(parent);
    }
}

struct MetadataCarrier<'a>(&'a mut MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct ReadCarrier<'a>(&'a MetadataMap);

impl Extractor for ReadCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The names of the metrics the farm exports (Prometheus conventions: a `longtake_` prefix,
/// base units in the name, `_total` on counters). The coordinator's describe the farm; a
/// worker's (`longtake_worker_`) describe that worker.
pub mod metric {
    /// Jobs waiting in the queue, by priority (gauge, label `priority`).
    pub const QUEUE_DEPTH: &str = "longtake_queue_depth";
    /// Jobs the coordinator knows, by state (gauge, label `state`).
    pub const JOBS: &str = "longtake_jobs";
    /// Jobs accepted (counter).
    pub const JOBS_SUBMITTED: &str = "longtake_jobs_submitted_total";
    /// Jobs that ended, by state: done, failed, cancelled (counter, label `state`).
    pub const JOBS_ENDED: &str = "longtake_jobs_ended_total";
    /// Attempts started on workers (counter).
    pub const ATTEMPTS: &str = "longtake_attempts_total";
    /// Jobs sent back to the queue after a lost worker or a failed start (counter).
    pub const REQUEUES: &str = "longtake_requeues_total";
    /// From submission to the clip written, of the jobs done (histogram, seconds).
    pub const JOB_SECONDS: &str = "longtake_job_duration_seconds";
    /// One denoising step, by layout (histogram, seconds, labels `cfg`, `tp`, `ulysses`,
    /// `ring`: the degrees, and `groups`: the worker groups).
    pub const STEP_SECONDS: &str = "longtake_step_duration_seconds";
    /// Latent tokens denoised: per step, the job's latent frames × height × width in latent
    /// cells (counter; its rate is the farm's tokens per second).
    pub const TOKENS: &str = "longtake_denoised_tokens_total";
    /// Bytes the worker groups of multi-group jobs exchanged (counter).
    pub const EXCHANGE_BYTES: &str = "longtake_exchange_bytes_total";
    /// The VAE decode of a job (its longest group's), of the jobs done (histogram, seconds).
    pub const DECODE_SECONDS: &str = "longtake_vae_decode_seconds";
    /// Encoding a job's clip on the coordinator (histogram, seconds).
    pub const ENCODE_SECONDS: &str = "longtake_encode_seconds";
    /// Workers in the membership, by state (gauge, label `state`).
    pub const WORKERS: &str = "longtake_workers";

    /// Tasks this worker ran, by outcome: finished, failed (counter, label `outcome`).
    pub const WORKER_TASKS: &str = "longtake_worker_tasks_total";
    /// One denoising step on this worker (histogram, seconds).
    pub const WORKER_STEP_SECONDS: &str = "longtake_worker_step_duration_seconds";
    /// Bytes this worker sent to the ranks of other worker groups (counter).
    pub const WORKER_EXCHANGE_BYTES: &str = "longtake_worker_exchange_bytes_total";
    /// Loading a model's weights for a task (histogram, seconds).
    pub const WORKER_LOAD_SECONDS: &str = "longtake_worker_load_seconds";
    /// This worker's VAE decodes (histogram, seconds).
    pub const WORKER_DECODE_SECONDS: &str = "longtake_worker_vae_decode_seconds";
    /// Whether this worker holds a task now (gauge, 0 or 1).
    pub const WORKER_BUSY: &str = "longtake_worker_busy";
    /// The memory of this worker's GPU, by kind: `used` (by every process on the device) and
    /// `total` (gauge, bytes, label `kind`), read at each scrape; only on workers whose device
    /// reports it (CUDA). A CPU worker's memory is its process's resident memory.
    pub const WORKER_DEVICE_MEMORY: &str = "longtake_worker_device_memory_bytes";

    /// Of Prometheus's process collector, on every daemon (Linux): resident memory (gauge,
    /// bytes).
    pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
    /// Of the process collector: CPU time used (counter, seconds).
    pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
    /// Of the process collector: open file descriptors (gauge; connections count).
    pub const PROCESS_OPEN_FDS: &str = "process_open_fds";

    /// Every name above, for checks (a dashboard's queries name only these).
    pub const ALL: &[&str] = &[
        QUEUE_DEPTH,
        JOBS,
        JOBS_SUBMITTED,
        JOBS_ENDED,
        ATTEMPTS,
        REQUEUES,
        JOB_SECONDS,
        STEP_SECONDS,
        TOKENS,
        EXCHANGE_BYTES,
        DECODE_SECONDS,
        ENCODE_SECONDS,
        WORKERS,
        WORKER_TASKS,
        WORKER_STEP_SECONDS,
        WORKER_EXCHANGE_BYTES,
        WORKER_LOAD_SECONDS,
        WORKER_DECODE_SECONDS,
        WORKER_BUSY,
        WORKER_DEVICE_MEMORY,
        PROCESS_RESIDENT_MEMORY,
        PROCESS_CPU_SECONDS,
        PROCESS_OPEN_FDS,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing::subscriber::with_default;
    use tracing_subscriber_free::Recorder;

    /// A minimal subscriber that records span names and their parents, so the nesting the
    /// functions promise is checked without an exporter.
    mod tracing_subscriber_free {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        use tracing::span::{Attributes, Id, Record};
        use tracing::{Event, Metadata, Subscriber};

        /// A span as recorded: its id, name and the id of the span it was opened in.
        pub type Recorded = (u64, &'static str, Option<u64>);

        #[derive(Clone, Default)]
        pub struct Recorder {
            pub spans: Arc<Mutex<Vec<Recorded>>>,
            pub stack: Arc<Mutex<Vec<u64>>>,
            next: Arc<AtomicU64>,
        }

        impl Subscriber for Recorder {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, attrs: &Attributes<'_>) -> Id {
                let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
                let parent = self.stack.lock().unwrap().last().copied();
                self.spans
                    .lock()
                    .unwrap()
                    .push((id, attrs.metadata().name(), parent));
                Id::from_u64(id)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, _: &Event<'_>) {}
            fn enter(&self, id: &Id) {
                self.stack.lock().unwrap().push(id.into_u64());
            }
            fn exit(&self, _: &Id) {
                self.stack.lock().unwrap().pop();
            }
        }
    }

    #[test]
    fn spans_nest_job_attempt_task_step_collective() {
        let recorder = Recorder::default();
        let spans: Arc<Mutex<_>> = recorder.spans.clone();
        with_default(recorder, || {
            let _job = job_span("j-1").entered();
            let _attempt = attempt_span("j-1", 1).entered();
            let _task = task_span("j-1", 1, 0, 2).entered();
            let _step = step_span(0, 10).entered();
            let _collective = collective_span("all_gather", 64).entered();
        });
        let spans = spans.lock().unwrap();
        let names: Vec<&str> = spans.iter().map(|s| s.1).collect();
        assert_eq!(names, ["job", "attempt", "task", "step", "collective"]);
        for pair in spans.windows(2) {
            assert_eq!(
                pair[1].2,
                Some(pair[0].0),
                "{} under {}",
                pair[1].1,
                pair[0].1
            );
        }
        assert!(metric::STEP_SECONDS.starts_with("longtake_"));
    }
}
