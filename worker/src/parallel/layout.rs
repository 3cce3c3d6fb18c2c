//! The layout of a parallel render, as the parallel runtime uses it. The type, its grammar, its
//! group maths and its checks are the job spec's (`longtake_proto::spec::layout`), shared with
//! the coordinator that plans with them; this module only re-exports them under the runtime.

pub use longtake_proto::spec::layout::*;
