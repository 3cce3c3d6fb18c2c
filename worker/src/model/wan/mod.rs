//! Wan2.1 models: the video transformer and its parts, and the VAE decoder.

pub mod attention;
pub mod embeddings;
pub mod rope;
pub mod transformer;
pub mod vae;
mod vae_blocks;
mod vae_conv;
