//! The Wan2.1 text-to-video family: the video transformer and its parts (`transformer`,
//! `attention`, `rope`, `embeddings`), the VAE decoder (`vae*`), the single-process pipeline
//! (`pipeline`: `WanPipeline`, the built-in tiny model), and the transformer's distributed form
//! under a parallel layout (`tensor_parallel`: the TP plan and sharded layers; `distributed`:
//! `DistributedWanTransformer`; `distributed_pipeline`: `DistributedPipeline`).

pub mod attention;
pub mod distributed;
pub mod distributed_pipeline;
pub mod embeddings;
pub mod image_to_video;
pub mod pipeline;
pub mod rope;
pub mod tensor_parallel;
pub mod transformer;
pub mod vae;
mod vae_blocks;
mod vae_conv;
pub mod vae_encoder;
pub mod vae_split;
