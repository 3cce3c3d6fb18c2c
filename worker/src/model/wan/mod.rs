//! Wan2.1 model parts.

pub mod vae;
mod vae_blocks;
mod vae_conv;
