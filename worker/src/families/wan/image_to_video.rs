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
    use crate::families::wan::vae::WanVaeDecoder;
    use crate::model::clip_vision::{self, ClipVisionEncoder};
    use crate::model::compare::relative_l2;
    use crate::model::denoiser::{Conditioning, Denoiser};
    use crate::model::loader::{read_json, Checkpoint, SafetensorsWeights};
    use crate::model::render::CancelToken;
    use crate::model::{scheduler, video};

    /// The whole image-to-video run of every fixture that has one (`wan-i2v-tiny`), against
    /// diffusers': the image embedding and the condition computed here from the picture, then
    /// the denoising from the case's initial noise and prompt embeddings (the text encoder has
    /// its own parity test), every step's latents, and the decoded video.
    #[test]
    fn image_to_video_pipeline_matches_reference() {
        let dev = Device::Cpu;
        let dirs: Vec<_> = crate::model::reference::all_fixture_dirs()
            .into_iter()
            .filter(|dir| {
                read_json::<serde_json::Value>(&dir.join("cases/pipeline.json"))
                    .is_ok_and(|spec| spec["task"] == "image-to-video")
            })
            .collect();
        assert!(
            !dirs.is_empty(),
            "no fixture has an image-to-video pipeline case"
        );
        for dir in dirs {
            let spec: serde_json::Value = read_json(&dir.join("cases/pipeline.json")).unwrap();
            let checkpoint = Checkpoint::open(dir.join("pipeline")).unwrap();
            let case =
                SafetensorsWeights::open_file(dir.join("cases/pipeline.safetensors")).unwrap();
            let load = |name: &str| case.load(name, &dev).unwrap();
            let image = load("image");

            let processor: ImageProcessorConfig =
                read_json(&dir.join("pipeline/image_processor/preprocessor_config.json")).unwrap();
            let clip = checkpoint.component("image_encoder").unwrap();
            let clip_config: clip_vision::Config = clip.config().unwrap();
            let clip =
                ClipVisionEncoder::new(&clip_config, clip.var_builder(DType::F32, &dev).unwrap())
                    .unwrap();
            let image_embeds = clip
                .penultimate_hidden_states(&processor.pixel_values(&image).unwrap())
                .unwrap();
            let mut checks = vec![(
                "image_embeds",
                relative_l2(&image_embeds, &load("image_embeds")).unwrap(),
                1e-4,
            )];

            let vae = checkpoint.component("vae").unwrap();
            let vae_config: VaeConfig = vae.config().unwrap();
            let encoder =
                WanVaeEncoder::new(&vae_config, vae.var_builder(DType::F32, &dev).unwrap())
                    .unwrap();
            let frames = spec["num_frames"].as_u64().unwrap() as usize;
            let condition = first_frame_condition(&encoder, &vae_config, &image, frames).unwrap();
            checks.push((
                "condition",
                relative_l2(&condition, &load("condition")).unwrap(),
                1e-4,
            ));

            let transformer = checkpoint.component("transformer").unwrap();
            let transformer = WanTransformer3DModel::new(
                &transformer.config().unwrap(),
                transformer.var_builder(DType::F32, &dev).unwrap(),
            )
            .unwrap();
            let steps = spec["num_inference_steps"].as_u64().unwrap() as usize;
            let scheduler_config: serde_json::Value =
                read_json(&dir.join("pipeline/scheduler/scheduler_config.json")).unwrap();
            let scheduler =
                scheduler::build(&scheduler_config, None, steps, spec["flow_shift"].as_f64())
                    .unwrap();
            let mut denoiser =
                Denoiser::new(scheduler, load("initial_latents"), DType::F32).unwrap();
            let conditioning = Conditioning::new(
                &load("prompt_embeds"),
                &load("negative_prompt_embeds"),
                spec["guidance_scale"].as_f64().unwrap(),
            )
            .unwrap();
            let model = ImageConditioned {
                transformer: &transformer,
                condition,
                image_embeds,
            };
            let mut worst_step = 0f64;
            for i in 0..steps {
                denoiser
                    .run(
                        &model,
                        &conditioning,
                        i + 1,
                        &CancelToken::default(),
                        &mut |_| {},
                        &mut |_| Ok(()),
                    )
                    .unwrap();
                let err = relative_l2(denoiser.latents(), &load(&format!("latents_{i}"))).unwrap();
                worst_step = worst_step.max(err);
            }
            checks.push(("latents (worst step)", worst_step, 1e-3));
            let latents = denoiser.into_latents();
            checks.push((
                "final_latents",
                relative_l2(&latents, &load("final_latents")).unwrap(),
                1e-3,
            ));
            let decoder =
                WanVaeDecoder::new(&vae_config, vae.var_builder(DType::F32, &dev).unwrap())
                    .unwrap();
            let decoded = decoder
                .decode(&vae_config.unnormalize_latents(&latents).unwrap())
                .unwrap();
            let frames = video::video_to_unit_frames(&decoded).unwrap();
            checks.push(("video", relative_l2(&frames, &load("video")).unwrap(), 1e-3));
            for (name, err, tolerance) in checks {
                println!(
                    "{}: image-to-video {name} relative L2 {err:.3e}",
                    dir.display()
                );
                assert!(
                    err <= tolerance,
                    "{}: {name} {err:e} > {tolerance:e}",
                    dir.display()
                );
            }
        }
    }

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
