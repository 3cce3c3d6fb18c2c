//! The generic model parts in candle, shared by every model family (`crate::families`):
//! checkpoint loading and the weight backend (`loader`), model-family detection (`family`),
//! tokenizer, umT5 text encoder, the attention core, schedulers, initial noise, the resumable
//! denoising loop, frames, the render request and result types with the `VideoPipeline` trait
//! (`render`), and the reference-fixture checks.
//! No network code lives here.

pub mod attention;
pub mod compare;
pub mod denoiser;
pub mod device;
pub mod family;
pub mod loader;
pub mod noise;
pub mod reference;
pub mod render;
pub mod scheduler;
pub mod text;
pub mod tokenizer;
pub mod umt5;
pub mod video;
