//! The job spec and its rules, in one candle-free place that every edge parses into: the layout
//! grammar and its group maths (`layout`), the frame rule (`frames`), the sampler names
//! (`scheduler`), the window plan of a long clip (`windows`), and the checked, resolved spec of a job (`job`). The CLI builds a spec from
//! its flags with these types, the coordinator validates and resolves submissions with them, and
//! the worker turns a task's spec into its pipeline's input through them; nothing re-implements
//! a rule.
//!
//! The windows of a long clip and the worker groups that run them (`windows`) and its prompt
//! timeline (`timeline`) are part of the spec too, and so is what a render starts from besides
//! its prompt (`input`: a picture, or a clip to extend).

pub mod frames;
pub mod input;
pub mod job;
pub mod layout;
pub mod scheduler;
pub mod timeline;
pub mod windows;

pub use frames::FrameCountError;
pub use input::{InputKind, JobInput};
pub use job::{
    check_job_name, JobSpec, Limits, ModelDescription, SpecError, SpecRequest, DEFAULT_MODEL,
    SIZE_MULTIPLE, WAN21_DEFAULT_FPS, WAN21_DEFAULT_FRAMES,
};
pub use layout::{Coords, GroupKind, Layout, LayoutError, LayoutLimits};
pub use scheduler::{SchedulerKind, UnknownScheduler};
pub use timeline::{PromptTimeline, TimelineError};
pub use windows::{
    Fusion, NoiseSchedule, UnknownFusion, UnknownNoise, Window, WindowError, WindowPlan,
    WindowSettings,
};
