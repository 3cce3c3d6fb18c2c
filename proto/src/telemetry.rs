//! The one vocabulary of longtake's telemetry: the spans every process opens for the work it
//! does, nested job → attempt → group → step → window → collective, and the names of the metrics the farm
//! exports. The coordinator, the worker daemon and the model stack open their spans through
//! these functions, so a trace reads the same whichever process wrote it and the observability
//! work (OTLP export, the trace context over gRPC, Prometheus) has one place to change.
//!
//! Spans are `tracing` spans at `INFO` (a step, a job) or `DEBUG` (a collective): with no
//! subscriber, or a filter that drops them, they cost a level check.

use tracing::Span;

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

/// The VAE decode of a group's latents.
pub fn decode_span(latent_frames: usize) -> Span {
    tracing::info_span!("decode", latent_frames)
}

/// One collective of a communicator (`op`: all_reduce, all_gather, all_to_all, ...).
pub fn collective_span(op: &'static str, bytes: usize) -> Span {
    tracing::debug_span!("collective", op, bytes)
}

/// The names of the metrics the farm exports (Prometheus style: `longtake_` prefix, base units).
pub mod metric {
    /// Jobs waiting in the queue (gauge).
    pub const QUEUE_DEPTH: &str = "longtake_queue_depth";
    /// Jobs that ended, by state (counter, label `state`).
    pub const JOBS_ENDED: &str = "longtake_jobs_ended_total";
    /// Duration of one denoising step (histogram, seconds).
    pub const STEP_SECONDS: &str = "longtake_step_seconds";
    /// Bytes a rank sent through its communicator (counter).
    pub const COMM_BYTES: &str = "longtake_comm_bytes_total";
    /// Workers in the membership, by state (gauge, label `state`).
    pub const WORKERS: &str = "longtake_workers";
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
