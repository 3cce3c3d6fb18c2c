//! The Wan2.1 text-to-video stack in candle: checkpoint loading, tokenizer, umT5 text encoder,
//! Wan transformer, Wan VAE decoder, schedulers, initial noise, the resumable denoising loop and
//! the pipeline that joins them.
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
