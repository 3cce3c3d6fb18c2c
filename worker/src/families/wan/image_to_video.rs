//! Wan2.1 image-to-video (diffusers' `WanImageToVideoPipeline`): what a render conditions on
//! besides the text, and the flow model that takes it.
//!
//! - The image embedding: the picture through `image_processor/`'s CLIP preprocessing (short side
//!   to the CLIP size, centre crop, normalisation) and the CLIP vision tower
//!   ([`crate::model::clip_vision`]), its penultimate hidden states.
//! - The condition latents: the picture as the first frame of a video whose other frames are
//!   zeros, through the VAE encoder ([`super::vae_encoder`], its mean), normalised like the
//!   latents, after a 4-channel mask marking the first latent frame as given: 20 channels that
//!   every step's input carries after the 16 of the latents.
//! - [`ImageConditioned`]: the transformer with both, as a [`FlowModel`] for the denoiser, so
//!   the text-to-video loop (guidance, schedulers, resumable state) runs image-to-video as is.

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::transformer::WanTransformer3DModel;
use super::vae::Config as VaeConfig;
use super::vae_encoder::WanVaeEncoder;
use crate::model::render::FlowModel;

/// Latent frames' worth of video frames the mask marks per latent frame (the VAE's time factor).
const MASK_CHANNELS: usize = 4;

/// `image_processor/preprocessor_config.json` (a `CLIPImageProcessor`); unknown fields ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    pub size: ShortestEdge,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    pub crop_size: CropSize,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShortestEdge {
    pub shortest_edge: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CropSize {
    pub height: usize,
    pub width: usize,
}

impl ImageProcessorConfig {
    /// The CLIP input of a picture `(H, W, 3)` in [0, 1]: `(1, 3, crop_h, crop_w)`, centre-cropped
    /// (the crop's top-left corner at `((H − h) / 2, (W − w) / 2)`, rounded down, as transformers
    /// does) and normalised by the configured mean and deviation.
    ///
    /// A picture whose short side is not already the CLIP size needs the processor's bicubic
    /// resize, which this build does not do yet: it is refused, naming the size to give.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        let (height, width, channels) = image.dims3()?;
        if channels != 3 {
            candle_core::bail!("the picture has {channels} channels; RGB (3) is needed");
        }
        let short = height.min(width);
        if self.do_resize && short != self.size.shortest_edge {
            candle_core::bail!(
                "the picture is {width}×{height}; the image encoder's preprocessing resizes its \
                 short side to {} (bicubic), which this build does not do yet: give a picture \
                 whose short side is {} pixels",
                self.size.shortest_edge,
                self.size.shortest_edge
            );
        }
        let (crop_h, crop_w) = (self.crop_size.height, self.crop_size.width);
        let cropped = if self.do_center_crop {
            if crop_h > height || crop_w > width {
                candle_core::bail!(
                    "the picture ({width}×{height}) is smaller than the image encoder's crop \
                     ({crop_w}×{crop_h})"
                );
            }
            image.narrow(0, (height - crop_h) / 2, crop_h)?.narrow(
                1,
                (width - crop_w) / 2,
                crop_w,
            )?
        } else {
            image.clone()
        };
        let pixels = cropped.to_dtype(DType::F32)?.permute((2, 0, 1))?;
        let pixels = if self.do_normalize {
            let device = image.device();
            let mean =
                Tensor::new(&self.image_mean.map(|m| m as f32), device)?.reshape((3, 1, 1))?;
            let std = Tensor::new(&self.image_std.map(|s| s as f32), device)?.reshape((3, 1, 1))?;
            pixels.broadcast_sub(&mean)?.broadcast_div(&std)?
        } else {
            pixels
        };
        pixels.unsqueeze(0)?.contiguous()
    }
}

/// The condition of a render of `frames` video frames from the picture `image` `(H, W, 3)` in
/// [0, 1] (already the video's size): `(1, 20, F', H/8, W/8)`, the first-frame mask then the
/// normalised latent mean of `[picture, zero frames...]`.
pub fn first_frame_condition(
    encoder: &WanVaeEncoder,
    vae: &VaeConfig,
    image: &Tensor,
    frames: usize,
) -> Result<Tensor> {
    let (height, width, _) = image.dims3()?;
    let device = image.device();
    // [0, 1] → [-1, 1], channels first, one frame
    let first = ((image.to_dtype(DType::F32)?.permute((2, 0, 1))? * 2.0)? - 1.0)?
        .unsqueeze(1)?
        .unsqueeze(0)?;
    let rest = Tensor::zeros((1, 3, frames - 1, height, width), DType::F32, device)?;
    let video = Tensor::cat(&[&first, &rest], 2)?;
    let mean = encoder.encode(&video)?.mean;
    let latent = vae.normalize_latents(&mean)?;
    let (_, _, latent_frames, h, w) = latent.dims5()?;
    let given = Tensor::ones((1, MASK_CHANNELS, 1, h, w), DType::F32, device)?;
    let mask = Tensor::cat(
        &[
            &given,
            &Tensor::zeros(
                (1, MASK_CHANNELS, latent_frames - 1, h, w),
                DType::F32,
                device,
            )?,
        ],
        2,
    )?;
    Tensor::cat(&[&mask, &latent], 1)
}

/// An image-to-video transformer with its render's condition and image embedding: the flow
/// model the denoiser steps. Each call's batch (cond and uncond under guidance) gets the same
/// condition channels and image embedding, as diffusers gives both branches.
pub struct ImageConditioned<'a> {
    pub transformer: &'a WanTransformer3DModel,
    /// `(1, 20, F', H', W')`, from [`first_frame_condition`].
    pub condition: Tensor,
    /// `(1, Li, image_dim)`, the CLIP tower's penultimate hidden states.
    pub image_embeds: Tensor,
}

impl FlowModel for ImageConditioned<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let condition = self
            .condition
            .to_dtype(x.dtype())?
            .repeat((batch, 1, 1, 1, 1))?;
        let image = self.image_embeds.repeat((batch, 1, 1))?;
        self.transformer
            .forward_with_image(&Tensor::cat(&[x, &condition], 1)?, t, context, &image)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A picture the preprocessing would have to resize is refused with the size to give.
    #[test]
    fn a_picture_needing_a_resize_is_named() {
        let processor = ImageProcessorConfig {
            do_resize: true,
            size: ShortestEdge { shortest_edge: 224 },
            do_center_crop: true,
            crop_size: CropSize {
                height: 224,
                width: 224,
            },
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        };
        let image = Tensor::zeros((480, 832, 3), DType::F32, &Device::Cpu).unwrap();
        let err = processor.pixel_values(&image).unwrap_err().to_string();
        assert!(
            err.contains("832×480") && err.contains("224 pixels"),
            "{err}"
        );
        let image = Tensor::zeros((224, 300, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            processor.pixel_values(&image).unwrap().dims(),
            [1, 3, 224, 224]
        );
    }
}
