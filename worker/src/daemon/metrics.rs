//! A worker's Prometheus metrics, counted from the events of the tasks it runs as they are
//! handed to gRPC: tasks by outcome, step and decode durations, model loads, bytes sent to other
//! worker groups, and whether it holds a task; and read at each scrape, its GPU's memory. Names
//! are `longtake_proto::telemetry::metric`'s.

use std::sync::OnceLock;

use candle_core::Device;

use longtake_proto::metrics::{registered, seconds, Scrape};
use longtake_proto::task_event::Event;
use longtake_proto::telemetry::metric;
use longtake_proto::TaskEvent;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::system;

/// Every metric of one worker, registered in its own registry.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    tasks: IntCounterVec,
    step_seconds: Histogram,
    exchange_bytes: IntCounter,
    load_seconds: Histogram,
    decode_seconds: Histogram,
    busy: IntGauge,
    device_memory: IntGaugeVec,
    /// The device whose memory is read at each scrape ([`Self::watch_device`]).
    device: OnceLock<Device>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = longtake_proto::metrics::registry();
        Self {
            tasks: registered(
                &registry,
                IntCounterVec::new(
                    Opts::new(metric::WORKER_TASKS, "Tasks this worker ran, by outcome."),
                    &["outcome"],
                )
                .expect("valid metric"),
            ),
            step_seconds: seconds(
                &registry,
                metric::WORKER_STEP_SECONDS,
                "One denoising step on this worker.",
            ),
            exchange_bytes: registered(
                &registry,
                IntCounter::new(
                    metric::WORKER_EXCHANGE_BYTES,
                    "Bytes this worker sent to the ranks of other worker groups.",
                )
                .expect("valid metric"),
            ),
            load_seconds: seconds(
                &registry,
                metric::WORKER_LOAD_SECONDS,
                "Loading a model's weights for a task.",
            ),
            decode_seconds: seconds(
                &registry,
                metric::WORKER_DECODE_SECONDS,
                "This worker's VAE decodes.",
            ),
            busy: registered(
                &registry,
                IntGauge::new(metric::WORKER_BUSY, "Whether this worker holds a task now.")
                    .expect("valid metric"),
            ),
            device_memory: registered(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        metric::WORKER_DEVICE_MEMORY,
                        "Memory of this worker's GPU: used (by every process on it) and total.",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            device: OnceLock::new(),
            registry,
        }
    }

    /// Exports the memory of the device tasks run on, read at each scrape, where the device
    /// reports it ([`system::device_memory`]); the first device given is the one watched.
    pub fn watch_device(&self, device: &Device) {
        let _ = self.device.set(device.clone());
    }

    /// Counts one event of a task as it leaves the worker.
    pub fn observe(&self, event: &TaskEvent) {
        match &event.event {
            Some(Event::Started(_)) => self.busy.set(1),
            Some(Event::Step(step)) => {
                self.step_seconds.observe(step.step_s);
                self.exchange_bytes.inc_by(step.exchange_bytes);
            }
            Some(Event::Timings(split)) => {
                if split.load_s > 0.0 {
                    self.load_seconds.observe(split.load_s);
                }
                if split.decode_s > 0.0 {
                    self.decode_seconds.observe(split.decode_s);
                }
            }
            Some(Event::Finished(finished)) => {
                let outcome = if finished.error.is_empty() {
                    "finished"
                } else if finished.cancelled {
                    "cancelled"
                } else {
                    "failed"
                };
                self.tasks.with_label_values(&[outcome]).inc();
                self.busy.set(0);
            }
            _ => {}
        }
    }
}

#[async_trait::async_trait]
impl Scrape for WorkerMetrics {
    async fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(memory) = self.device.get().and_then(system::device_memory) {
            let kinds = [("used", memory.used), ("total", memory.total)];
            for (kind, bytes) in kinds {
                self.device_memory
                    .with_label_values(&[kind])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        self.registry.gather()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(families: &[prometheus::proto::MetricFamily]) -> Vec<&str> {
        families.iter().map(|f| f.name()).collect()
    }

    /// The CPU has no memory of its own to report: a CPU worker exports no device memory (its
    /// memory is `process_resident_memory_bytes`, which it does export).
    #[tokio::test]
    async fn a_cpu_worker_exports_no_device_memory() {
        let metrics = WorkerMetrics::new();
        metrics.watch_device(&Device::Cpu);
        let families = metrics.gather().await;
        let names = names(&families);
        assert!(!names.contains(&metric::WORKER_DEVICE_MEMORY), "{names:?}");
        assert!(names.contains(&metric::WORKER_BUSY), "{names:?}");
        if cfg!(target_os = "linux") {
            assert!(
                names.contains(&metric::PROCESS_RESIDENT_MEMORY),
                "{names:?}"
            );
        }
    }
}
