//! longtake's worker side. `model` is the single-process Wan2.1 stack and `parallel` the
//! parallel runtime (no network code above the communicators); `daemon` is the worker process
//! around them: gRPC service, membership, one task at a time.

pub mod daemon;
pub mod families;
pub mod model;
pub mod parallel;
