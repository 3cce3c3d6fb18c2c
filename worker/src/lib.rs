//! longtake's worker side. `model` is the single-process Wan2.1 stack (no network code);
//! `parallel` lays out ranks for the parallel runtime; the daemon joins them in later issues.

pub mod model;
pub mod parallel;
