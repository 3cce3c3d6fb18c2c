//! The model families this worker runs, one folder each: its configuration and modules, its
//! distributed form under a parallel layout, and its pipelines.

pub mod wan;
