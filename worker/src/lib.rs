//! longtake's worker side. `model` is the single-process Wan2.1 stack (no network code); the
//! parallel runtime and the daemon join it in later issues.

pub mod model;
pub mod parallel;
