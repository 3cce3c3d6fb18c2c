//! The harness of the multi-process farm tests: a throw-away etcd, `longtake serve coordinator`
//! and `longtake serve worker` processes, the `longtake` CLI run against them, and the checks of
//! rendered outputs.

#![allow(dead_code)] // not every test file uses every helper

pub mod cli;
pub mod farm;
pub mod media;
pub mod metrics;
pub mod otlp;
pub mod poll;
pub mod process;
