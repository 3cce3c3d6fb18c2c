//! The generic model parts in candle, shared by every model family (`crate::families`):
//! checkpoint loading and the weight backend (`loader`), the defaults a checkpoint states
//! (`stated_defaults`), the built-in toy checkpoint (`builtin`), model-family detection (`family`),
//! tokenizer, umT5 text encoder, the CLIP vision tower of image-to-video (`clip_vision`), the attention core, the linear layer with its fused CPU product (`linear`), the CPU kernels' element-wise math (`cpu_math`), schedulers, initial noise, the resumable
//! denoising loop, co-denoising the windows of a long clip (`windows`), frames, the render request and result types with the `VideoPipeline` trait
//! (`render`), and the reference-fixture checks.
//! No network code lives here.

pub mod attention;
pub mod builtin;
pub mod clip_vision;
pub mod compare;
pub mod cpu_amx;
pub mod cpu_attention;
pub mod cpu_math;
pub mod cpu_norm;
pub mod denoiser;
pub mod device;
pub mod family;
pub mod held_frames;
pub mod linear;
pub mod loader;
pub mod noise;
pub mod reference;
pub mod render;
pub mod resample;
pub mod scheduler;
pub mod stated_defaults;
pub mod text;
pub mod tokenizer;
pub mod umt5;
pub mod video;
pub mod windows;
