//! longtake's cluster protocol: the gRPC messages and services of `longtake.proto` (CLI ↔
//! coordinator ↔ workers), and `membership`, how workers announce themselves (in etcd, or in
//! process for the embedded farm), and `spec`, the job spec and its rules (layout grammar, frame
//! rule, sampler names, validation and resolution), parsed once at each edge, and `telemetry`,
//! the spans and metric names every process reports under, and `metrics`, each daemon's
//! Prometheus endpoint, and `serving`, what the gRPC
//! servers share, and `tls`, the farm's certificates and the roles they prove. The CLI, the
//! coordinator and the
//! worker build on it; it links no model code.

pub mod media;
pub mod membership;
pub mod metrics;
pub mod serving;
pub mod spec;
pub mod telemetry;
pub mod tls;

/// The generated messages, clients and servers of package `longtake.v1`.
pub mod v1 {
    tonic::include_proto!("longtake.v1");
}

pub use v1::*;

/// Largest gRPC message either side accepts: a batch of decoded frames (a 1280×720 RGB frame is
/// 2.8 MB) must fit, well above tonic's 4 MB default.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// `idle`, `busy`, `draining` (`unknown` for anything else): a worker's state as people and
/// metrics labels name it.
pub fn worker_state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Idle) => "idle",
        Ok(WorkerState::Busy) => "busy",
        Ok(WorkerState::Draining) => "draining",
        Ok(WorkerState::Unspecified) | Err(_) => "unknown",
    }
}

/// Milliseconds since the Unix epoch, the time unit of every `*_ms` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
