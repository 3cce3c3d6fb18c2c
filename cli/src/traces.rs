//! The process's tracing: the log on stderr (`LONGTAKE_LOG`), and, when an OTLP endpoint is set
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `--otlp-endpoint`), the spans exported over OTLP/gRPC
//! under this process's service name, with the W3C trace context propagated across gRPC.
//! Without an endpoint there is no exporter and no propagation: the spans cost a level check.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable naming the OTLP/gRPC endpoint (OpenTelemetry's own).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Which spans are exported (a `tracing` filter); by default every INFO span and longtake's
/// DEBUG ones (the collectives).
pub const TRACE_FILTER_ENV: &str = "LONGTAKE_TRACE";
const DEFAULT_TRACE_FILTER: &str = "info,longtake_proto::telemetry=debug";

/// The exporter of a process that exports traces; flush it with [`Traces::shutdown`] before
/// the process ends.
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Sends the spans not yet exported and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("note: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Sets up the log (`default_log` unless `LONGTAKE_LOG` says otherwise) and, when an OTLP
/// endpoint is set, the trace exporter of `service` (`longtake-cli`, `longtake-coordinator`,
/// `longtake-worker`). Must run inside the tokio runtime that the exporter sends from.
pub fn init(service: &str, default_log: &str) -> Result<Traces> {
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // colour codes only for a person: a daemon's log goes to a file or a collector
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_env("LONGTAKE_LOG").unwrap_or_else(|_| EnvFilter::new(default_log)),
        );
    let endpoint = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry().with(log).init();
        return Ok(Traces { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&endpoint)
        .build()
        .with_context(|| format!("the OTLP exporter for {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build(),
        )
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_env(TRACE_FILTER_ENV)
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_TRACE_FILTER));
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("longtake"))
        .with_filter(filter);
    tracing_subscriber::registry().with(log).with(spans).init();
    Ok(Traces {
        provider: Some(provider),
    })
}
