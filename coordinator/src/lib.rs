//! The coordinator: for now only the output side (turning decoded frames into a clip); the job
//! API, planner and membership arrive with the render-farm service issue.

pub mod encode;
