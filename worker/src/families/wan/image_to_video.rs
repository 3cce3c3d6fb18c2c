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

use super::vae::Config as VaeConfig;
use super::vae_encoder::WanVaeEncoder;
use crate::model::render::{FlowModel, GroupExchange};
use crate::model::resample::{resize, Filter};

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
    /// The CLIP input of a picture `(H, W, 3)` of 8-bit values scaled to [0, 1]: `(1, 3, crop_h,
    /// crop_w)`. As transformers' `CLIPImageProcessor` does: the short side resized to the
    /// configured size (Pillow's bicubic, the long side `⌊size · long / short⌋`), centre-cropped
    /// (the crop's top-left corner at `((H − h) / 2, (W − w) / 2)`, rounded down) and normalised
    /// by the configured mean and deviation.
    pub fn pixel_values(&self, image: &Tensor) -> Result<Tensor> {
        let (height, width, channels) = image.dims3()?;
        if channels != 3 {
            candle_core::bail!("the picture has {channels} channels; RGB (3) is needed");
        }
        let short = height.min(width);
        let size = self.size.shortest_edge;
        let image = if self.do_resize && short != size {
            let long = size * height.max(width) / short;
            let target = if height <= width {
                (size, long)
            } else {
                (long, size)
            };
            resized(image, target, Filter::Bicubic)?
        } else {
            image.clone()
        };
        let (height, width, _) = image.dims3()?;
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

/// A picture `(H, W, 3)` of 8-bit values scaled to [0, 1] resized to `(height, width)` as Pillow
/// does (a copy when the size does not change).
pub fn resized(image: &Tensor, (height, width): (usize, usize), filter: Filter) -> Result<Tensor> {
    let dims = image.dims3()?;
    if (dims.0, dims.1) == (height, width) {
        return Ok(image.clone());
    }
    let bytes: Vec<u8> = (image.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let out = resize(&bytes, dims, (height, width), filter);
    (Tensor::from_vec(out, (height, width, dims.2), image.device())?.to_dtype(DType::F32)? / 255.0)?
        .to_dtype(image.dtype())
}

/// The picture as the video's first frame: resized to the video's `(height, width)` with
/// Lanczos, as diffusers' video processor does before the VAE encodes it.
pub fn first_frame(image: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    resized(image, (height, width), Filter::Lanczos)
}

/// The condition of a render of `frames` video frames from the picture `image` `(H, W, 3)` in
/// [0, 1] (already the video's size: [`first_frame`]): `(1, 20, F', H/8, W/8)`, the first-frame mask then the
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
    pub transformer: &'a dyn FlowModel,
    /// `(1, 20, F', H', W')`, from [`first_frame_condition`]: the clip's first `F'` latent
    /// frames (at least those of every window the model is asked for).
    pub condition: Tensor,
    /// `(1, Li, image_dim)`, the CLIP tower's penultimate hidden states.
    pub image_embeds: Tensor,
}

impl FlowModel for ImageConditioned<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.predict_frames(x, t, context, 0..x.dim(2)?)
    }

    /// A window of a long clip takes the condition's frames where it sits: the first window the
    /// picture's latent and the mask that marks it given, a later one the encoded blank frames
    /// that follow it, nothing marked given.
    fn predict_frames(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        frames: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let (batch, _, len, _, _) = x.dims5()?;
        let held = self.condition.dim(2)?;
        if frames.len() != len || frames.end > held {
            candle_core::bail!(
                "latent frames {frames:?} ({len} in the latents) are not in the condition's {held}"
            );
        }
        let condition = self
            .condition
            .narrow(2, frames.start, len)?
            .to_dtype(x.dtype())?
            .repeat((batch, 1, 1, 1, 1))?;
        let image = self.image_embeds.repeat((batch, 1, 1))?;
        self.transformer
            .predict_with_image(&Tensor::cat(&[x, &condition], 1)?, t, context, &image)
    }

    fn check_final_latents(&self, latents: &Tensor) -> Result<()> {
        self.transformer.check_final_latents(latents)
    }

    fn group_exchange(&self) -> GroupExchange {
        self.transformer.group_exchange()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::families::wan::distributed::DistributedWanTransformer;
    use crate::families::wan::transformer::WanTransformer3DModel;

    /// Image-to-video under `cfg = 2`, `tp = 2` and `ulysses = 2` (each rank a thread, joined by
    /// a loopback mesh) gives the single process's frames within one 8-bit level: the fixture's
    /// run from its noise, prompt embeddings, image embedding and condition.
    #[test]
    fn image_to_video_under_layouts_gives_the_single_process_frames() {
        use crate::families::wan::vae::WanVaeDecoder;
        use crate::model::denoiser::{Conditioning, Denoiser};
        use crate::model::loader::{read_json, Checkpoint, SafetensorsWeights};
        use crate::model::render::CancelToken;
        use crate::model::{scheduler, video};
        use crate::parallel::testing::{largest_level_difference, layout, run_ranks};

        let dev = Device::Cpu;
        let dir = crate::model::reference::parity_fixture_dirs()
            .into_iter()
            .find(|dir| dir.ends_with("wan-i2v-tiny"))
            .expect("the wan-i2v-tiny fixture");
        let checkpoint = Checkpoint::open(dir.join("pipeline")).unwrap();
        let case = SafetensorsWeights::open_file(dir.join("cases/pipeline.safetensors")).unwrap();
        let load = |name: &str| case.load(name, &dev).unwrap();
        let spec: serde_json::Value = read_json(&dir.join("cases/pipeline.json")).unwrap();
        let steps = spec["num_inference_steps"].as_u64().unwrap() as usize;
        let scheduler_config: serde_json::Value =
            read_json(&dir.join("pipeline/scheduler/scheduler_config.json")).unwrap();
        let conditioning = Conditioning::new(
            &load("prompt_embeds"),
            &load("negative_prompt_embeds"),
            spec["guidance_scale"].as_f64().unwrap(),
        )
        .unwrap();
        let transformer = checkpoint.component("transformer").unwrap();
        let vae = checkpoint.component("vae").unwrap();
        let vae_config: VaeConfig = vae.config().unwrap();
        let decoder =
            WanVaeDecoder::new(&vae_config, vae.var_builder(DType::F32, &dev).unwrap()).unwrap();
        // the run of one flow model, to 8-bit frames
        let frames_of = |model: &dyn FlowModel| -> Vec<u8> {
            let conditioned = ImageConditioned {
                transformer: model,
                condition: load("condition"),
                image_embeds: load("image_embeds"),
            };
            let scheduler = scheduler::build(&scheduler_config, None, steps, None).unwrap();
            let mut denoiser =
                Denoiser::new(scheduler, load("initial_latents"), DType::F32).unwrap();
            denoiser
                .run_to_end(
                    &conditioned,
                    &conditioning,
                    &CancelToken::default(),
                    &mut |_| {},
                    &mut |_| Ok(()),
                )
                .unwrap();
            let latents = vae_config
                .unnormalize_latents(&denoiser.into_latents())
                .unwrap();
            let frames = video::video_to_unit_frames(&decoder.decode(&latents).unwrap()).unwrap();
            let values: Vec<f32> = frames.flatten_all().unwrap().to_vec1().unwrap();
            values
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect()
        };
        let single = WanTransformer3DModel::new(
            &transformer.config().unwrap(),
            transformer.var_builder(DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let expected = frames_of(&single);
        // (tp, ulysses, ring, cfg)
        for shape in [(1, 1, 1, 2), (2, 1, 1, 1), (1, 2, 1, 1)] {
            let layout = layout(shape);
            let frames = run_ranks(layout.world_size(), |_, world| {
                let model =
                    DistributedWanTransformer::load(&transformer, DType::F32, &dev, layout, world)?;
                Ok(frames_of(&model))
            })
            .unwrap();
            for (rank, frames) in frames.iter().enumerate() {
                let worst = largest_level_difference(frames, &expected);
                println!("{layout} rank {rank}: largest difference {worst} levels");
                assert!(worst <= 1, "{layout} rank {rank}: {worst} levels");
            }
        }
    }

    /// A long clip's windows each take the condition of their own latent frames: a transformer
    /// that returns its input's condition channels, co-denoised in windows, gives back the
    /// whole clip's condition on every frame (the windows' weights sum to one), the mask set on
    /// the first frame only; a window outside the condition is refused.
    #[test]
    fn every_window_takes_the_condition_of_its_own_frames() -> Result<()> {
        use crate::model::windows::WindowedFlow;
        use longtake_proto::spec::{Fusion, WindowPlan, WindowSettings};

        /// Returns the first 16 condition channels (the mask's 4 and 12 of the latent's).
        struct Echo;
        impl FlowModel for Echo {
            fn predict(&self, _x: &Tensor, _t: &Tensor, _c: &Tensor) -> Result<Tensor> {
                candle_core::bail!("an image-to-video model is asked with the image")
            }
            fn predict_with_image(
                &self,
                x: &Tensor,
                _t: &Tensor,
                _c: &Tensor,
                _image: &Tensor,
            ) -> Result<Tensor> {
                x.narrow(1, 16, 16)
            }
        }
        let device = Device::Cpu;
        let frames = 11;
        let mask = Tensor::cat(
            &[
                Tensor::ones((1, 4, 1, 2, 2), DType::F32, &device)?,
                Tensor::zeros((1, 4, frames - 1, 2, 2), DType::F32, &device)?,
            ],
            2,
        )?;
        // the latent part: each frame's value its index
        let index = Tensor::arange(0f32, frames as f32, &device)?.reshape((1, 1, frames, 1, 1))?;
        let latent = index.broadcast_as((1, 16, frames, 2, 2))?.contiguous()?;
        let condition = Tensor::cat(&[&mask, &latent], 1)?;
        let conditioned = ImageConditioned {
            transformer: &Echo,
            condition: condition.clone(),
            image_embeds: Tensor::zeros((1, 3, 8), DType::F32, &device)?,
        };
        let plan = WindowPlan::new(
            frames as u32,
            WindowSettings {
                latent_frames: 5,
                overlap: 2,
                fusion: Fusion::Linear,
                groups: 1,
                noise: Default::default(),
            },
        )
        .unwrap();
        assert!(plan.windows().len() >= 3, "{plan}");
        let windowed = WindowedFlow::new(&conditioned, &plan, &device)?;
        let x = Tensor::zeros((2, 16, frames, 2, 2), DType::F32, &device)?;
        let t = Tensor::zeros(2, DType::F32, &device)?;
        let flow = windowed.predict(&x, &t, &t)?;
        let want = condition.narrow(1, 0, 16)?.repeat((2, 1, 1, 1, 1))?;
        let worst = (flow - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(worst < 1e-5, "{worst}");
        let e = conditioned
            .predict_frames(&x.narrow(2, 0, 5)?, &t, &t, 8..13)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in the condition"), "{e}");
        Ok(())
    }

    /// The image branch of the cross-attention (a full 512-token text context, so that the
    /// image tokens before it go through `add_k_proj` / `add_v_proj`) under `tp = 2`, `cfg = 2`
    /// and `ulysses = 2` equals the single process: the fixtures' short prompts leave it empty.
    #[test]
    fn the_image_branch_under_layouts_equals_the_single_process() {
        use crate::families::wan::tensor_parallel::tensor_parallel_plan;
        use crate::families::wan::transformer::Config;
        use crate::model::compare::relative_l2;
        use crate::model::loader::{SafetensorsWeights, Weights};
        use crate::parallel::testing::{layout, run_ranks};

        let dev = Device::Cpu;
        let config = Config {
            num_attention_heads: 4,
            attention_head_dim: 8,
            in_channels: 36,
            text_dim: 8,
            freq_dim: 16,
            ffn_dim: 32,
            num_layers: 2,
            image_dim: Some(12),
            added_kv_proj_dim: Some(32),
            ..Config::default()
        };
        let (weights, recorded) = Weights::seeded(5).recorded();
        let single =
            WanTransformer3DModel::new(&config, weights.var_builder(DType::F32, &dev)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&recorded.take(), &path).unwrap();
        let normal = |stream: u64, shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_vec(crate::model::noise::gaussian(9, stream, 0, n), shape, &dev).unwrap()
        };
        let x = normal(0, &[2, 36, 2, 4, 4]);
        let t = Tensor::new(&[600f32, 600.0], &dev).unwrap();
        let text = normal(1, &[2, 512, 8]);
        let image = normal(2, &[2, 3, 12]);
        let expected = single.forward_with_image(&x, &t, &text, &image).unwrap();
        // the image counts: another image moves the output
        let text_only = single
            .forward_with_image(&x, &t, &text, &image.zeros_like().unwrap())
            .unwrap();
        assert!(relative_l2(&text_only, &expected).unwrap() > 1e-3);
        for shape in [(2, 1, 1, 1), (1, 1, 1, 2), (1, 2, 1, 1)] {
            let layout = layout(shape);
            let outputs = run_ranks(layout.world_size(), |_, world| {
                let tp_rank = layout.coords(world.rank()).tp;
                let vb = Weights::files(SafetensorsWeights::open(std::slice::from_ref(&path))?)
                    .sharded(tensor_parallel_plan(&config, layout.tp, tp_rank))
                    .var_builder(DType::F32, &dev);
                let model = DistributedWanTransformer::new(&config, layout, world, vb)?;
                Ok(model.forward_with_image(&x, &t, &text, &image)?)
            })
            .unwrap();
            for (rank, out) in outputs.iter().enumerate() {
                let err = relative_l2(out, &expected).unwrap();
                println!("{layout} rank {rank}: relative L2 {err:.3e}");
                assert!(err < 1e-5, "{layout} rank {rank}: {err:e}");
            }
        }
    }

    /// A picture of another size is resized (bicubic, short side to the CLIP size, long side
    /// in proportion) and centre-cropped, giving the bits of resizing it first.
    #[test]
    fn pictures_are_resized_and_cropped_as_transformers_does() {
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
        let dev = Device::Cpu;
        // a landscape picture: 480 × 832 → 224 × 388, cropped to its middle 224 columns
        let values: Vec<f32> = (0..480 * 832 * 3)
            .map(|i| ((i * 37 + i / 2496 * 11) % 256) as f32 / 255.0)
            .collect();
        let image = Tensor::from_vec(values, (480, 832, 3), &dev).unwrap();
        let pixels = processor.pixel_values(&image).unwrap();
        assert_eq!(pixels.dims(), [1, 3, 224, 224]);
        let first = resized(&image, (224, 388), Filter::Bicubic).unwrap();
        let direct = processor.pixel_values(&first).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&pixels), bits(&direct));
        // a portrait one keeps its orientation
        let portrait = Tensor::zeros((300, 200, 3), DType::F32, &dev).unwrap();
        assert_eq!(
            processor.pixel_values(&portrait).unwrap().dims(),
            [1, 3, 224, 224]
        );
        let err = processor
            .pixel_values(&Tensor::zeros((8, 8, 4), DType::F32, &dev).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 channels"), "{err}");
    }
}
