//! Wan2.1 models: the video transformer and its parts, and the VAE decoder.

pub mod attention;
pub mod distributed;
pub mod distributed_pipeline;
pub mod embeddings;
pub mod pipeline;
pub mod rope;
pub mod tensor_parallel;
pub mod transformer;
pub mod vae;
mod vae_blocks;
mod vae_conv;
