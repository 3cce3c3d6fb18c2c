//! The parts of the `longtake` command line that its tests and benches use too: `inspect`, the
//! checker of rendered toy-world clips against their captions, and `local`, a whole
//! farm in one process (the embedded farm `longtake render` starts when no coordinator is
//! named). It is the one crate that links both the coordinator and the worker daemon, so the
//! coordinator itself never links the model stack.

pub mod inspect;
pub mod local;
