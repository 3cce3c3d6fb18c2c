//! longtake's worker side. `model` is the single-process Wan2.1 stack (no network code);
//! `parallel` holds the parallel runtime's communicators (single rank, TCP mesh); the parallel
//! model wiring and the daemon join them in later issues.

pub mod model;
pub mod parallel;
