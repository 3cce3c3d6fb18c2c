//! longtake's cluster protocol: the gRPC messages and services of `longtake.proto` (CLI ↔
//! coordinator ↔ workers), and `membership`, how workers announce themselves (in etcd, or in
//! process for the embedded farm), and `spec`, the job spec and its rules (layout grammar, frame
//! rule, sampler names, validation and resolution), parsed once at each edge, and `telemetry`,
//! the spans and metric names every process reports under, and `serving`, what the gRPC
//! servers share, and `tls`, the farm's certificates and the roles they prove. The CLI, the
//! coordinator and the
//! worker build on it; it links no model code.

pub mod membership;
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

/// Milliseconds since the Unix epoch, the time unit of every `*_ms` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
