//! Each daemon's Prometheus endpoint: `GET /metrics` over plain HTTP on `--metrics-listen`, in
//! the text exposition format (0.0.4). What it exports is the daemon's ([`Scrape`]): the
//! coordinator reads its gauges from the job table at each scrape, the worker counts its tasks.
//! The metric names are those of [`crate::telemetry::metric`].

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};

/// What a daemon exports, gathered when scraped.
#[async_trait::async_trait]
pub trait Scrape: Send + Sync + 'static {
    async fn gather(&self) -> Vec<prometheus::proto::MetricFamily>;
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scrape: Arc<dyn Scrape>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(scrape);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(scrape): State<Arc<dyn Scrape>>) -> impl IntoResponse {
    let families = scrape.gather().await;
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&families, &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            format!("encoding the metrics failed: {e}\n").into_bytes(),
        ),
    }
}

/// A daemon's registry, holding from the start the standard process metrics of Prometheus's
/// process collector where the platform gives them (Linux: resident and virtual memory, CPU
/// seconds, open and maximum descriptors, threads, start time), so every daemon's memory and
/// CPU are on the dashboard beside what it does.
pub fn registry() -> prometheus::Registry {
    let registry = prometheus::Registry::new();
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("a fresh registry takes the process collector");
    registry
}

/// Histogram buckets for durations from 10 ms to about 10 minutes (seconds).
pub fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.01, 2.5, 16).expect("valid buckets")
}

/// `metric`, registered in `registry` (each daemon's metrics are built once, so a name is
/// never registered twice).
pub fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &prometheus::Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// A histogram of durations in seconds ([`duration_buckets`]), registered in `registry`.
pub fn seconds(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::Histogram {
    let opts = prometheus::HistogramOpts::new(name, help).buckets(duration_buckets());
    registered(
        registry,
        prometheus::Histogram::with_opts(opts).expect("a valid metric"),
    )
}
