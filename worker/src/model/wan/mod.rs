//! Wan2.1 diffusion models: the video transformer and its parts.

pub mod attention;
pub mod embeddings;
pub mod rope;
pub mod transformer;
