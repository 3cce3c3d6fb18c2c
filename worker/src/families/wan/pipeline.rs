//! The single-process Wan2.1 text-to-video pipeline: prompts → umT5 embeddings → denoising loop
//! with classifier-free guidance → VAE decode → frames.
//!
//! The flow itself, [`WanPipeline::render_with`], takes any [`FlowModel`] and whether to decode,
//! so the distributed pipeline runs the very same code with its ranks' transformer; the loop is a
//! [`Denoiser`], which lets a render resume from a saved [`DenoiserState`].
//!
//! This is the reference every distributed path is tested against. It loads a checkpoint in the
//! diffusers layout ([`WanPipeline::load`]; the built-in `toy` model, trained by us on procedural
//! videos, is one: see `crate::model::builtin`) or builds the built-in `tiny` model from a seed
//! ([`WanPipeline::tiny`]), which makes abstract motion rather than pictures and exists to
//! exercise the system without any files. It is the family's [`VideoPipeline`] in one process;
//! [`describe`] checks a Wan2.1 model without loading weights, for the worker to advertise it.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use longtake_proto::spec::frames::first_video_frame;
use longtake_proto::spec::{
    NoiseSchedule, WindowPlan, WindowSettings, WAN21_DEFAULT_FPS, WAN21_DEFAULT_FRAMES,
};

use super::image_to_video::{self, ImageConditioned, ImageProcessorConfig};
use super::transformer::{self as wan_transformer, WanTransformer3DModel};
use super::vae::{self as wan_vae, DecoderCache, WanVaeDecoder};
use super::vae_encoder::WanVaeEncoder;
use super::vae_split::RowSplit;
use crate::model::clip_vision::{self, ClipVisionEncoder};
use crate::model::denoiser::{AfterStep, Conditioning, Denoiser, DenoiserError, DenoiserState};
use crate::model::family::{ModelFamily, PipelineSource};
use crate::model::held_frames::HeldFrames;
use crate::model::loader::{seeded_var_builder, Checkpoint, Component, LoadError};
use crate::model::noise::{self, LatentShape};
use crate::model::render::{
    component, CancelToken, FlowModel, ModelFacts, PipelineError, PipelineInfo, Progress,
    RenderInput, RenderOptions, RenderSpec, Rendered, Result, Video, VideoPipeline,
};
use crate::model::scheduler::{self, Scheduler};
use crate::model::stated_defaults::StatedDefaults;
use crate::model::text::PromptEncoder;
use crate::model::tokenizer::PromptTokenizer;
use crate::model::umt5::{self, UMT5EncoderModel};
use crate::model::video;
use crate::model::windows::{GroupPeers, GroupWindowedFlow, WindowedFlow};
use crate::parallel::Communicator;

/// The defaults of a checkpoint loaded by [`WanPipeline::load`]: those its `model_index.json`
/// states in its `_longtake` section ([`StatedDefaults`]), the others Wan2.1's published 480p
/// settings (5 s at 16 fps); named by the section or by its directory.
pub fn checkpoint_info(checkpoint: &Checkpoint) -> std::result::Result<PipelineInfo, LoadError> {
    let wan21 = PipelineInfo {
        name: checkpoint.root().display().to_string(),
        default_width: 832,
        default_height: 480,
        default_frames: WAN21_DEFAULT_FRAMES as usize,
        default_fps: WAN21_DEFAULT_FPS as usize,
        default_steps: 50,
        max_sequence_length: WAN_MAX_SEQUENCE_LENGTH,
        world: None,
    };
    Ok(StatedDefaults::of(checkpoint)?.over(wan21))
}

/// The defaults of the built-in tiny model ([`WanPipeline::tiny`]).
pub fn tiny_info() -> PipelineInfo {
    PipelineInfo {
        name: "tiny".into(),
        default_width: 256,
        default_height: 256,
        default_frames: WAN21_DEFAULT_FRAMES as usize,
        default_fps: WAN21_DEFAULT_FPS as usize,
        default_steps: 10,
        max_sequence_length: 64,
        world: None,
    }
}

/// A heavy part of the pipeline, built only when it is `wanted` (see [`Parts`]).
fn optional_part<T>(wanted: bool, build: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    wanted.then(build).transpose()
}

/// Who decodes the final latents of a render.
#[derive(Clone, Copy)]
pub enum Decode<'a> {
    /// Nobody: the render ends with its latents.
    No,
    /// This process, alone.
    Here,
    /// Every rank of this communicator, each its rows of the frames ([`RowSplit`]); the frames
    /// come out on its first rank. Latents fewer rows high than it has ranks are decoded by its
    /// first rank alone.
    Split(&'a dyn Communicator),
}

impl Decode<'_> {
    /// Whether this rank takes part in the decode.
    fn here(self) -> bool {
        !matches!(self, Decode::No)
    }
}

/// The configurations of the built-in tiny model's parts: Wan2.1's architecture at a toy size.
pub struct TinyConfigs {
    pub text: umt5::Config,
    pub transformer: wan_transformer::Config,
    pub vae: wan_vae::Config,
}

/// The tiny model's configurations, for a tokenizer of `vocab_size` entries.
pub fn tiny_configs(vocab_size: usize) -> Result<TinyConfigs> {
    let text_config: umt5::Config = builtin_config(
        "text encoder",
        serde_json::json!({
            "vocab_size": vocab_size,
            "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
        }),
    )?;
    let transformer_config: wan_transformer::Config = builtin_config(
        "transformer",
        serde_json::json!({
            "patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16,
            "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 64, "ffn_dim": 128,
            "num_layers": 2, "cross_attn_norm": true, "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6, "rope_max_seq_len": 1024,
        }),
    )?;
    // Wan2.1's own latent statistics, so the tiny model un-normalises like the real one.
    let vae_config: wan_vae::Config = builtin_config(
        "VAE",
        serde_json::json!({
            "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
            "attn_scales": [], "temperal_downsample": [false, true, true], "dropout": 0.0,
            "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                             0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
            "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
        }),
    )?;
    Ok(TinyConfigs {
        text: text_config,
        transformer: transformer_config,
        vae: vae_config,
    })
}

/// Parses a configuration of the built-in tiny model.
fn builtin_config<T: serde::de::DeserializeOwned>(
    component: &str,
    json: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(json)
        .map_err(|e| PipelineError::Spec(format!("built-in tiny {component} config: {e}")))
}

impl FlowModel for WanTransformer3DModel {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x, t, context)
    }

    fn predict_with_image(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        image: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_image(x, t, context, image)
    }
}

/// Which of the heavy parts a pipeline loads. A rank of a parallel job brings its own share of
/// the transformer, and only the rank that writes the video needs the VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub transformer: bool,
    pub vae: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        transformer: true,
        vae: true,
    };
}

pub struct WanPipeline {
    info: PipelineInfo,
    text: PromptEncoder,
    transformer: Option<WanTransformer3DModel>,
    transformer_config: wan_transformer::Config,
    vae: Option<WanVaeDecoder>,
    vae_config: wan_vae::Config,
    /// Where the VAE encoder's weights are, and the encoder once a render needed it (extending
    /// a clip): text-to-video renders never load it.
    vae_encoder: LazyEncoder,
    /// An image-to-video checkpoint's CLIP tower and preprocessing; `None` for text-to-video.
    picture: Option<PictureEncoder>,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
    cancel: CancelToken,
}

/// What an image-to-video checkpoint encodes its picture with.
struct PictureEncoder {
    clip: ClipVisionEncoder,
    processor: ImageProcessorConfig,
}

/// The VAE encoder of a pipeline, built on first use.
struct LazyEncoder {
    weights: EncoderWeights,
    built: std::sync::Mutex<Option<std::sync::Arc<WanVaeEncoder>>>,
}

enum EncoderWeights {
    /// The checkpoint's `vae/` component.
    Checkpoint(Component),
    /// The built-in tiny model's seeded weights.
    Seeded,
}

impl LazyEncoder {
    fn new(weights: EncoderWeights) -> Self {
        Self {
            weights,
            built: Default::default(),
        }
    }

    fn get(
        &self,
        config: &wan_vae::Config,
        dtype: DType,
        device: &Device,
    ) -> Result<std::sync::Arc<WanVaeEncoder>> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(encoder) = built.as_ref() {
            return Ok(encoder.clone());
        }
        let vb = match &self.weights {
            EncoderWeights::Checkpoint(vae) => vae.var_builder(dtype, device)?,
            EncoderWeights::Seeded => {
                seeded_var_builder(TINY_WEIGHT_SEED, dtype, device).pp("tiny_vae")
            }
        };
        let encoder =
            std::sync::Arc::new(component("vae encoder", WanVaeEncoder::new(config, vb))?);
        *built = Some(encoder.clone());
        Ok(encoder)
    }
}

/// The seed of the built-in tiny model's weights.
pub const TINY_WEIGHT_SEED: u64 = 0x5EED_0F10_7A4E;
/// The name prefix of the tiny transformer's seeded weights (a seeded tensor is a function of
/// its full name, so a rank building a slice of the model must ask under the same names).
pub const TINY_TRANSFORMER_PREFIX: &str = "tiny_transformer";

/// What a worker advertises about a Wan2.1 model, checked without loading weights: the tiny
/// model's configuration, or a checkpoint's (the toy model's included) stated defaults,
/// components and its transformer's `config.json`.
pub fn describe(source: PipelineSource<'_>) -> Result<ModelFacts> {
    let (info, transformer) = match source.checkpoint_dir()? {
        None => {
            let vocab = PromptTokenizer::builtin_tiny()?.vocab_size();
            (tiny_info(), tiny_configs(vocab)?.transformer)
        }
        Some(dir) => {
            let transformer = check_checkpoint(dir)?;
            (checkpoint_info(&Checkpoint::open(dir)?)?, transformer)
        }
    };
    let takes_picture = match source.checkpoint_dir()? {
        Some(dir) => ModelFamily::of(&Checkpoint::open(dir)?)?.takes_picture(),
        None => false,
    };
    Ok(ModelFacts {
        takes_picture,
        info,
        attention_heads: transformer.num_attention_heads,
        ffn_dim: transformer.ffn_dim,
    })
}

/// Every component a render loads is present, with weights; returns the transformer's config.
fn check_checkpoint(dir: &Path) -> std::result::Result<wan_transformer::Config, LoadError> {
    let ckpt = Checkpoint::open(dir)?;
    ModelFamily::of(&ckpt)?;
    let tokenizer = ckpt.component("tokenizer")?.dir().join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(LoadError::Missing {
            path: tokenizer,
            what: "tokenizer file".into(),
        });
    }
    for weighted in ["text_encoder", "vae"] {
        ckpt.component(weighted)?.weight_files()?;
    }
    if ModelFamily::of(&ckpt)?.takes_picture() {
        let encoder = ckpt.component("image_encoder")?;
        encoder.weight_files()?;
        encoder.config::<clip_vision::Config>()?;
        ckpt.component("image_processor")?
            .json::<ImageProcessorConfig>("preprocessor_config.json")?;
    }
    ckpt.component("scheduler")?;
    let transformer = ckpt.component("transformer")?;
    transformer.weight_files()?;
    transformer.config()
}

/// Wan's prompt length for the published checkpoints (a checkpoint trained with another states
/// it in `_longtake.max_sequence_length`).
const WAN_MAX_SEQUENCE_LENGTH: usize = 512;

impl WanPipeline {
    /// The built-in tiny model, or a checkpoint (the built-in toy model's included; see
    /// [`Self::tiny`], [`Self::load`]).
    pub fn from_source(source: PipelineSource<'_>, device: &Device, dtype: DType) -> Result<Self> {
        match source.checkpoint_dir()? {
            None => Self::tiny(device, dtype),
            Some(dir) => Self::load(dir, device, dtype),
        }
    }

    /// Loads a checkpoint directory in the diffusers layout (e.g. `Wan2.1-T2V-1.3B-Diffusers`),
    /// with the defaults and prompt length its `_longtake` section states ([`checkpoint_info`]).
    pub fn load(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_parts(dir, device, dtype, Parts::ALL)
    }

    /// [`Self::load`] with only the heavy `parts` asked for; the text encoder, tokenizer and
    /// scheduler are always loaded.
    pub fn load_parts(
        dir: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
        parts: Parts,
    ) -> Result<Self> {
        let ckpt = Checkpoint::open(dir.as_ref())?;
        let family = ModelFamily::of(&ckpt)?;
        let info = checkpoint_info(&ckpt)?;
        let tokenizer_dir = ckpt.component("tokenizer")?;
        let tokenizer = PromptTokenizer::from_file(tokenizer_dir.dir().join("tokenizer.json"))?;

        let text_dir = ckpt.component("text_encoder")?;
        let text_config: umt5::Config = text_dir.config()?;
        // umT5 is numerically fragile in half precision (its activations overflow f16): the
        // reference runs it in f32 and so do we, whatever the transformer's dtype.
        let text_vb = text_dir.var_builder(DType::F32, device)?;
        let encoder = component("text_encoder", UMT5EncoderModel::new(&text_config, text_vb))?;

        let transformer_dir = ckpt.component("transformer")?;
        let transformer_config: wan_transformer::Config = transformer_dir.config()?;
        let transformer = optional_part(parts.transformer, || {
            component(
                "transformer",
                WanTransformer3DModel::new(
                    &transformer_config,
                    transformer_dir.var_builder(dtype, device)?,
                ),
            )
        })?;

        let vae_dir = ckpt.component("vae")?;
        let vae_config: wan_vae::Config = vae_dir.config()?;
        let vae = optional_part(parts.vae, || {
            component(
                "vae",
                WanVaeDecoder::new(&vae_config, vae_dir.var_builder(dtype, device)?),
            )
        })?;

        let picture = if family.takes_picture() {
            let clip_dir = ckpt.component("image_encoder")?;
            let clip_config: clip_vision::Config = clip_dir.config()?;
            let clip = component(
                "image_encoder",
                ClipVisionEncoder::new(&clip_config, clip_dir.var_builder(dtype, device)?),
            )?;
            let processor = ckpt
                .component("image_processor")?
                .json("preprocessor_config.json")?;
            Some(PictureEncoder { clip, processor })
        } else {
            None
        };
        let scheduler_config = ckpt.component("scheduler")?.json("scheduler_config.json")?;
        Ok(Self {
            text: PromptEncoder::new(tokenizer, encoder, info.max_sequence_length),
            info,
            transformer,
            transformer_config,
            vae,
            vae_config,
            vae_encoder: LazyEncoder::new(EncoderWeights::Checkpoint(vae_dir)),
            picture,
            scheduler_config,
            device: device.clone(),
            dtype,
            cancel: CancelToken::default(),
        })
    }

    /// The built-in tiny model: Wan2.1's architecture at a toy size with weights made from a
    /// fixed seed. It needs no files and renders in seconds on a CPU, but it was never trained:
    /// it makes abstract motion, not pictures.
    pub fn tiny(device: &Device, dtype: DType) -> Result<Self> {
        Self::tiny_parts(device, dtype, Parts::ALL)
    }

    /// [`Self::tiny`] with only the heavy `parts` asked for.
    pub fn tiny_parts(device: &Device, dtype: DType, parts: Parts) -> Result<Self> {
        let tokenizer = PromptTokenizer::builtin_tiny()?;
        let TinyConfigs {
            text: text_config,
            transformer: transformer_config,
            vae: vae_config,
        } = tiny_configs(tokenizer.vocab_size())?;
        let encoder = component(
            "text_encoder",
            UMT5EncoderModel::new(
                &text_config,
                seeded_var_builder(TINY_WEIGHT_SEED, DType::F32, device).pp("tiny_text"),
            ),
        )?;
        let transformer = optional_part(parts.transformer, || {
            component(
                "transformer",
                WanTransformer3DModel::new(
                    &transformer_config,
                    seeded_var_builder(TINY_WEIGHT_SEED, dtype, device).pp(TINY_TRANSFORMER_PREFIX),
                ),
            )
        })?;
        let vae = optional_part(parts.vae, || {
            component(
                "vae",
                WanVaeDecoder::new(
                    &vae_config,
                    seeded_var_builder(TINY_WEIGHT_SEED, dtype, device).pp("tiny_vae"),
                ),
            )
        })?;
        let scheduler_config = serde_json::json!({
            "_class_name": "UniPCMultistepScheduler",
            "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
            "use_flow_sigmas": true, "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2",
            "predict_x0": true, "lower_order_final": true, "final_sigmas_type": "zero",
            "timestep_spacing": "linspace", "disable_corrector": [],
        });
        let info = tiny_info();
        Ok(Self {
            text: PromptEncoder::new(tokenizer, encoder, info.max_sequence_length),
            info,
            transformer,
            transformer_config,
            vae,
            vae_config,
            vae_encoder: LazyEncoder::new(EncoderWeights::Seeded),
            picture: None,
            scheduler_config,
            device: device.clone(),
            dtype,
            cancel: CancelToken::default(),
        })
    }

    /// The token that stops this pipeline's renders between steps.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Overrides the prompt length in tokens (Wan's checkpoints use 512, the toy model states 16;
    /// the reference fixtures use less).
    pub fn with_max_sequence_length(mut self, max_sequence_length: usize) -> Self {
        self.info.max_sequence_length = max_sequence_length;
        self.text.max_sequence_length = max_sequence_length;
        self
    }

    pub fn info(&self) -> &PipelineInfo {
        &self.info
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformer's configuration (also when the transformer itself was not loaded).
    pub fn transformer_config(&self) -> &wan_transformer::Config {
        &self.transformer_config
    }

    /// The latent shape for a spec, rejecting sizes the model cannot make.
    pub fn latent_shape(&self, spec: &RenderSpec) -> Result<LatentShape> {
        if spec.steps == 0 {
            return Err(PipelineError::Spec("steps must be at least 1".into()));
        }
        let patch = &self.transformer_config.patch_size;
        video::latent_shape(
            spec.frames,
            spec.height,
            spec.width,
            patch[1].max(patch[2]),
            self.vae_config.z_dim,
        )
        .map_err(PipelineError::Spec)
    }

    /// The number of tokens of `prompt` beyond the text encoder's length, which are cut off as
    /// the reference pipeline cuts them (0 when it fits).
    pub fn prompt_overflow(&self, prompt: &str) -> Result<usize> {
        let limit = self.text.max_sequence_length;
        Ok(self
            .text
            .tokenizer
            .count_tokens(prompt)?
            .saturating_sub(limit))
    }

    /// Embeddings of the prompt and the negative prompt, each `(1, max_sequence_length, text_dim)`.
    pub fn encode_prompts(&self, prompt: &str, negative_prompt: &str) -> Result<(Tensor, Tensor)> {
        let both = self.text.encode(&[prompt, negative_prompt])?;
        let both = both.to_dtype(self.dtype)?;
        Ok((both.narrow(0, 0, 1)?, both.narrow(0, 1, 1)?))
    }

    /// The conditioning of each window of `plan`: the prompt in force at the window's centre
    /// (the spec's, or a timeline cue's) with the negative prompt, each prompt encoded once.
    pub fn window_conditioning(
        &self,
        spec: &RenderSpec,
        plan: &WindowPlan,
    ) -> Result<Vec<Conditioning>> {
        let prompts: Vec<&str> = std::iter::once(spec.prompt.as_str())
            .chain(spec.timeline.prompts())
            .collect();
        let chosen = spec
            .timeline
            .window_prompts(plan, video::VAE_SCALE_TEMPORAL);
        let mut encoded = std::collections::BTreeMap::new();
        for &k in &chosen {
            if let std::collections::btree_map::Entry::Vacant(slot) = encoded.entry(k) {
                let (cond, uncond) = self.encode_prompts(prompts[k], &spec.negative_prompt)?;
                slot.insert(Conditioning::new(&cond, &uncond, spec.guidance_scale)?);
            }
        }
        Ok(chosen
            .iter()
            .filter_map(|k| encoded.get(k).cloned())
            .collect())
    }

    /// The initial noise of a spec: a pure function of the seed and the latent position.
    pub fn initial_latents(&self, spec: &RenderSpec) -> Result<Tensor> {
        let shape = self.latent_shape(spec)?;
        self.initial_noise(spec, &self.window_plan(spec)?, 0..shape.frames)
    }

    /// The initial noise of latent frames `frames` of `spec`'s clip cut as `plan`: each frame
    /// its own, or under [`NoiseSchedule::Rescheduled`] a multi-window clip's later frames the
    /// first window's noise, shuffled ([`noise::rescheduled_sources`]).
    fn initial_noise(
        &self,
        spec: &RenderSpec,
        plan: &WindowPlan,
        frames: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let shape = self.latent_shape(spec)?;
        let settings = plan.settings();
        let sources = match settings.noise {
            NoiseSchedule::Rescheduled if !plan.is_single_window() => noise::rescheduled_sources(
                spec.seed,
                shape.frames,
                settings.latent_frames as usize,
                (settings.latent_frames - settings.overlap) as usize,
            ),
            _ => (0..shape.frames).collect(),
        };
        Ok(noise::initial_latents_from(
            spec.seed,
            shape,
            frames,
            |f| sources[f],
            DType::F32,
            &self.device,
        )?)
    }

    /// How `spec`'s clip is cut into windows (one window when the spec states no cut).
    pub fn window_plan(&self, spec: &RenderSpec) -> Result<WindowPlan> {
        let shape = self.latent_shape(spec)?;
        let settings = spec.windows.unwrap_or(WindowSettings {
            latent_frames: shape.frames as u32,
            overlap: 0,
            fusion: Default::default(),
            groups: 1,
            noise: Default::default(),
        });
        WindowPlan::new(shape.frames as u32, settings)
            .map_err(|e| PipelineError::Spec(format!("spec.{}: {}", e.field(), e.problem())))
    }

    /// The latents a render that continues a clip ([`RenderInput::Continues`]) holds as its
    /// first latent frames: the clip's last frames encoded by the VAE encoder (its mean,
    /// normalised), f32 `(1, C, k, H/8, W/8)`; `None` for a render that continues nothing.
    /// Refuses frames of another size than the spec's, a count the encoder cannot take, and
    /// more frames than leave the first window anything new to render.
    pub fn held_latents(&self, spec: &RenderSpec, plan: &WindowPlan) -> Result<Option<Tensor>> {
        let clip = match &spec.input {
            Some(RenderInput::Continues(clip)) => clip,
            None | Some(RenderInput::FirstFrame(_)) => return Ok(None),
        };
        if self.picture.is_some() {
            // an image-to-video model conditions on the clip's last frame instead
            return Ok(None);
        }
        if (clip.width, clip.height) != (spec.width, spec.height) {
            return Err(PipelineError::Spec(format!(
                "the clip to continue is {}×{}, the render {}×{}: render at the clip's size",
                clip.width, clip.height, spec.width, spec.height
            )));
        }
        let temporal = video::VAE_SCALE_TEMPORAL;
        if clip.frames == 0 || !(clip.frames - 1).is_multiple_of(temporal) {
            return Err(PipelineError::Spec(format!(
                "{} frames of the clip to continue: the VAE encoder takes 1 + 4k",
                clip.frames
            )));
        }
        let held = (clip.frames - 1) / temporal + 1;
        let window = plan.settings().latent_frames as usize;
        let total = self.latent_shape(spec)?.frames;
        if held >= window.min(total) {
            return Err(PipelineError::Spec(format!(
                "{held} latent frames of the clip to continue leave nothing new in a first \
                 window of {} latent frames",
                window.min(total)
            )));
        }
        let encoder = self
            .vae_encoder
            .get(&self.vae_config, self.dtype, &self.device)?;
        let frames = video::rgb8_to_video(
            &clip.rgb,
            clip.frames,
            clip.height,
            clip.width,
            &self.device,
        )?;
        let mean = component("vae encoder", encoder.encode(&frames))?.mean;
        let latents = component("vae encoder", self.vae_config.normalize_latents(&mean))?;
        Ok(Some(latents.to_dtype(DType::F32)?))
    }

    /// What an image-to-video render conditions on besides the text: the first-frame condition
    /// of the clip's first `latent_frames` latent frames `(1, 20, F', H/8, W/8)` (the VAE
    /// encoder is causal, so a prefix is the whole clip's condition cut short: a worker group
    /// encodes only up to its last frame) and the picture's CLIP embedding `(1, Li,
    /// image_dim)`, in the model's dtype; `None` for a text-to-video render. A picture given to
    /// a text-to-video model and a render of an image-to-video model without one are refused by
    /// name.
    pub fn picture_condition(
        &self,
        spec: &RenderSpec,
        latent_frames: usize,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let name = &self.info.name;
        let (picture, encoder) = match (&spec.input, &self.picture) {
            (Some(RenderInput::FirstFrame(picture)), Some(encoder)) => (picture, encoder),
            // extending a clip: its last frame is the render's first
            (Some(RenderInput::Continues(last)), Some(encoder)) => (last, encoder),
            (Some(RenderInput::FirstFrame(_)), None) => {
                return Err(PipelineError::Spec(format!(
                    "model {name} is a text-to-video model: it takes no picture (rendering from \
                     a picture needs an image-to-video model, e.g. Wan2.1 I2V); render from the \
                     prompt alone"
                )))
            }
            (None, Some(_)) => {
                return Err(PipelineError::Spec(format!(
                    "model {name} is an image-to-video model: it renders from a picture \
                     (--image) or extends a clip"
                )))
            }
            _ => return Ok(None),
        };
        if picture.frames != 1 {
            return Err(PipelineError::Spec(format!(
                "an image-to-video render starts from one frame (the picture, or the last frame \
                 of the clip it extends), not {}",
                picture.frames
            )));
        }
        let image =
            (video::rgb8_to_video(&picture.rgb, 1, picture.height, picture.width, &self.device)?
                .squeeze(0)?
                .squeeze(1)?
                .permute((1, 2, 0))?
                .affine(0.5, 0.5)?)
            .contiguous()?;
        let pixels = component("image_processor", encoder.processor.pixel_values(&image))?;
        let embeds = component(
            "image_encoder",
            encoder
                .clip
                .penultimate_hidden_states(&pixels.to_dtype(self.dtype)?),
        )?;
        let vae_encoder = self
            .vae_encoder
            .get(&self.vae_config, self.dtype, &self.device)?;
        let frame = component(
            "image_processor",
            image_to_video::first_frame(&image, spec.height, spec.width),
        )?;
        let condition = component(
            "vae encoder",
            image_to_video::first_frame_condition(
                &vae_encoder,
                &self.vae_config,
                &frame,
                first_video_frame(latent_frames, video::VAE_SCALE_TEMPORAL),
            ),
        )?;
        Ok(Some((
            condition.to_dtype(self.dtype)?,
            embeds.to_dtype(self.dtype)?,
        )))
    }

    /// `model` conditioned on `spec`'s picture over the clip's first `latent_frames` latent
    /// frames ([`Self::picture_condition`]); `None` for a text-to-video render.
    fn picture_conditioned<'m>(
        &self,
        model: &'m dyn FlowModel,
        spec: &RenderSpec,
        latent_frames: usize,
    ) -> Result<Option<ImageConditioned<'m>>> {
        Ok(self
            .picture_condition(spec, latent_frames)?
            .map(|(condition, image_embeds)| ImageConditioned {
                transformer: model,
                condition,
                image_embeds,
            }))
    }

    /// `model` holding the first latent frames of `spec`'s clip on their path to `held`
    /// ([`HeldFrames`]), from the frames' own initial noise.
    fn holding<'m>(
        &self,
        model: &'m dyn FlowModel,
        spec: &RenderSpec,
        plan: &WindowPlan,
        held: &Tensor,
    ) -> Result<HeldFrames<'m>> {
        let noise = self.initial_noise(spec, plan, 0..held.dim(2)?)?;
        component("transformer", HeldFrames::new(model, held, &noise))
    }

    /// The transformer, unless this pipeline was loaded without it.
    pub fn transformer(&self) -> Result<&WanTransformer3DModel> {
        self.transformer.as_ref().ok_or_else(|| {
            PipelineError::Spec("this pipeline was loaded without its transformer".into())
        })
    }

    /// The scheduler of a spec, fresh at step 0: the checkpoint's, or the spec's kind, with the
    /// spec's steps and shift.
    pub fn scheduler(&self, spec: &RenderSpec) -> Result<Box<dyn Scheduler>> {
        Ok(scheduler::build(
            &self.scheduler_config,
            spec.scheduler,
            spec.steps,
            spec.shift,
        )?)
    }

    /// A denoiser for `spec` starting from `latents` at step 0.
    pub fn denoiser(&self, spec: &RenderSpec, latents: Tensor) -> Result<Denoiser> {
        Denoiser::new(
            self.scheduler(spec)?,
            latents.to_device(&self.device)?,
            self.dtype,
        )
    }

    /// A denoiser for `spec` continuing from a saved `state`. Fails, naming the mismatch, when
    /// the state was saved by a render of another scheduler, step count or shift, or of another
    /// latent size.
    pub fn resume_denoiser(&self, spec: &RenderSpec, state: &DenoiserState) -> Result<Denoiser> {
        let frames = self.latent_shape(spec)?.frames;
        self.resume_denoiser_of(spec, 0..frames, state)
    }

    /// [`Self::resume_denoiser`] for the latent frames `frames` of the clip (one worker group's
    /// share of a co-denoised clip): the state must hold exactly those frames.
    fn resume_denoiser_of(
        &self,
        spec: &RenderSpec,
        frames: std::ops::Range<usize>,
        state: &DenoiserState,
    ) -> Result<Denoiser> {
        let shape = self.latent_shape(spec)?;
        let expected = vec![1, shape.channels, frames.len(), shape.height, shape.width];
        if state.latents.dims() != expected.as_slice() {
            return Err(DenoiserError::LatentShape {
                saved: state.latents.dims().to_vec(),
                expected,
            }
            .into());
        }
        Denoiser::resume(self.scheduler(spec)?, state, self.dtype)
    }

    /// Runs the denoising loop from `latents` with classifier-free guidance and returns the
    /// final latents (f32, `(1, C, F, H, W)`).
    pub fn denoise(
        &self,
        spec: &RenderSpec,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: &Tensor,
        latents: Tensor,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        self.denoise_with(
            self.transformer()?,
            spec,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            progress,
        )
    }

    /// [`Self::denoise`] with another flow model in place of the pipeline's own transformer
    /// (e.g. a [`DistributedWanTransformer`](super::distributed::DistributedWanTransformer)).
    pub fn denoise_with(
        &self,
        model: &dyn FlowModel,
        spec: &RenderSpec,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: &Tensor,
        latents: Tensor,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        let mut denoiser = self.denoiser(spec, latents)?;
        let conditioning =
            Conditioning::new(prompt_embeds, negative_prompt_embeds, spec.guidance_scale)?;
        self.run_denoiser(
            model,
            &mut denoiser,
            (&conditioning, Duration::ZERO),
            progress,
            &mut |_| Ok(()),
        )?;
        Ok(denoiser.into_latents())
    }

    /// The loop every render runs: [`Progress::Encoded`] (with the time the `conditioning`
    /// took to encode), the steps left (stopping between two when this pipeline's
    /// [`CancelToken`] is cancelled), then the model's check of the final latents.
    fn run_denoiser(
        &self,
        model: &dyn FlowModel,
        denoiser: &mut Denoiser,
        (conditioning, text): (&Conditioning, Duration),
        progress: &mut dyn FnMut(Progress),
        after_step: &mut AfterStep<'_>,
    ) -> Result<()> {
        progress(Progress::Encoded {
            total: denoiser.total_steps(),
            text,
        });
        denoiser.run_to_end(model, conditioning, &self.cancel, progress, after_step)?;
        component("transformer", model.check_final_latents(denoiser.latents()))
    }

    /// Decodes final latents into a video tensor `(1, 3, frames, H, W)` in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_with(latents, |vae, z| vae.decode(z))
    }

    /// The video `(1, 3, frames, H, W)` of latent frames `owned` of the final latents, decoded
    /// on their own from `warmup` latent frames before them ([`WanVaeDecoder::decode_segment`]).
    pub fn decode_segment(
        &self,
        latents: &Tensor,
        owned: std::ops::Range<usize>,
        warmup: usize,
    ) -> Result<Tensor> {
        self.decode_with(latents, |vae, z| vae.decode_segment(z, owned, warmup))
    }

    /// `decode` on the un-normalised final latents, the video in f32.
    fn decode_with(
        &self,
        latents: &Tensor,
        decode: impl FnOnce(&WanVaeDecoder, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let vae = self.vae.as_ref().ok_or_else(|| {
            PipelineError::Spec("this pipeline was loaded without its VAE".into())
        })?;
        let z = component(
            "vae",
            vae.unnormalize_latents(&latents.to_dtype(self.dtype)?),
        )?;
        let video = component("vae", decode(vae, &z))?;
        Ok(video.to_dtype(DType::F32)?)
    }

    /// The whole text-to-video run for a spec.
    pub fn render(&self, spec: &RenderSpec, progress: &mut dyn FnMut(Progress)) -> Result<Video> {
        self.render_with_options(spec, RenderOptions::default(), progress)?
            .video
            .ok_or_else(|| PipelineError::Spec("the render decoded no video".into()))
    }

    /// [`Self::render`] with `options`: resumed from a saved state, with a hook after each step;
    /// returns the final latents with the video.
    pub fn render_with_options(
        &self,
        spec: &RenderSpec,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered> {
        self.render_with(self.transformer()?, spec, Decode::Here, options, progress)
    }

    /// The text-to-video flow every render runs, in one process or on each rank of a layout:
    /// initial noise (or the state resumed from), prompt embeddings, the denoising loop with
    /// `model`, then, where this rank takes part in `decode`, [`Progress::Decoding`] and the
    /// frames (those of the rank that gets them).
    pub fn render_with(
        &self,
        model: &dyn FlowModel,
        spec: &RenderSpec,
        decode: Decode<'_>,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered> {
        let RenderOptions {
            resume,
            after_step,
            stream_frames,
        } = options;
        // The plan and the latents before the prompts: a spec the model cannot render fails
        // before the text encoder runs.
        let plan = self.window_plan(spec)?;
        let mut denoiser = match &resume {
            None => {
                let frames = self.latent_shape(spec)?.frames;
                self.denoiser(spec, self.initial_noise(spec, &plan, 0..frames)?)?
            }
            Some(state) => self.resume_denoiser(spec, state)?,
        };
        let held = self.held_latents(spec, &plan)?;
        let text_start = Instant::now();
        let per_window = self.window_conditioning(spec, &plan)?;
        let text = text_start.elapsed();
        let conditioning = first_window(&per_window)?;
        let mut no_hook = |_: &Denoiser| -> Result<()> { Ok(()) };
        let after_step: &mut AfterStep<'_> = match after_step {
            Some(hook) => hook,
            None => &mut no_hook,
        };
        let conditioned = self.picture_conditioned(model, spec, plan.latent_frames())?;
        let model: &dyn FlowModel = conditioned.as_ref().map_or(model, |c| c);
        // A clip of one window runs the model itself: exactly the plain render.
        let windowed;
        let model: &dyn FlowModel = if plan.is_single_window() {
            model
        } else {
            windowed = component(
                "transformer",
                WindowedFlow::new(model, &plan, &self.device)
                    .and_then(|w| w.with_window_conditioning(&per_window)),
            )?;
            &windowed
        };
        let holding;
        let model: &dyn FlowModel = match &held {
            Some(held) => {
                holding = self.holding(model, spec, &plan, held)?;
                &holding
            }
            None => model,
        };
        self.run_denoiser(
            model,
            &mut denoiser,
            (conditioning, text),
            progress,
            after_step,
        )?;
        let latents = with_held(denoiser.into_latents(), held.as_ref())?;
        let video = if decode.here() {
            progress(Progress::Decoding);
            let start = Instant::now();
            let mut frames = DecodedFrames::new(stream_frames);
            let handed_out = self.decode_plan_with(&latents, &plan, decode, &mut |video| {
                frames.take(video, progress)
            })?;
            progress(Progress::Decoded {
                elapsed: start.elapsed().saturating_sub(handed_out),
            });
            frames.into_video()
        } else {
            None
        };
        Ok(Rendered { latents, video })
    }

    /// One worker group's share of a clip co-denoised by several groups (`peers`: where this
    /// rank's group sits; `model`: the group's flow, one process or the group's layout). The
    /// group denoises only its windows' frames (their initial noise is the same pure function
    /// of seed and frame as the whole clip's), settling shared frames with its neighbours every
    /// step ([`GroupWindowedFlow`]). At the end the first rank of each group sends the latent
    /// frames it owns (its own, and those shared with the next group) to the job's rank 0, which
    /// returns the clip's latents (the single-process reference's bits); every other rank returns
    /// its group's. Where `decode`, the first rank of each group returns the video of the frames
    /// it owns ([`Self::decode_group_segment`], numbered in the clip; decoded by it alone or,
    /// with [`Decode::Split`] over the group, by the whole group): segments go their own way to
    /// whoever stitches them, so no rank holds the whole clip's frames. `options.resume`
    /// is the group's own state (its frames only), saved by the `after_step` hook of a group
    /// stopped after the same step as every other group.
    pub fn render_group(
        &self,
        model: &dyn FlowModel,
        spec: &RenderSpec,
        peers: GroupPeers<'_>,
        decode: Decode<'_>,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered> {
        let RenderOptions {
            resume,
            after_step,
            stream_frames,
        } = options;
        let plan = self.window_plan(spec)?;
        let (job, group, size) = (peers.job, peers.group, peers.size);
        if group >= plan.group_count() || job.world_size() != plan.group_count() * size {
            return Err(PipelineError::Spec(format!(
                "a job of {} ranks cannot be {} groups of {size}: this rank (group {group}) \
                 does not fit the plan",
                job.world_size(),
                plan.group_count()
            )));
        }
        let frames = plan.group_frames(group);
        let mut denoiser = match &resume {
            None => self.denoiser(spec, self.initial_noise(spec, &plan, frames.clone())?)?,
            Some(state) => self.resume_denoiser_of(spec, frames.clone(), state)?,
        };
        let mut no_hook = |_: &Denoiser| -> Result<()> { Ok(()) };
        let after_step: &mut AfterStep<'_> = match after_step {
            Some(hook) => hook,
            None => &mut no_hook,
        };
        let text_start = Instant::now();
        let per_window = self.window_conditioning(spec, &plan)?;
        let text = text_start.elapsed();
        // a render from a picture: the condition of the group's frames and those before them
        let conditioned = self.picture_conditioned(model, spec, frames.end)?;
        let model: &dyn FlowModel = conditioned.as_ref().map_or(model, |c| c);
        let flow = component(
            "transformer",
            GroupWindowedFlow::new(model, &plan, peers, &self.device)
                .and_then(|f| f.with_window_conditioning(&per_window)),
        )?;
        // The clip's first frames, which a clip it continues holds, are the first group's.
        let held = match frames.start {
            0 => self.held_latents(spec, &plan)?,
            _ => None,
        };
        let holding;
        let flow: &dyn FlowModel = match &held {
            Some(held) => {
                holding = self.holding(&flow, spec, &plan, held)?;
                &holding
            }
            None => &flow,
        };
        let conditioning = first_window(&per_window)?;
        self.run_denoiser(
            flow,
            &mut denoiser,
            (conditioning, text),
            progress,
            after_step,
        )?;
        let local = with_held(denoiser.into_latents(), held.as_ref())?;
        let owned_frames = plan.group_owned_frames(group);
        let skip = owned_frames.start - frames.start;
        let owned = local.narrow(2, skip, owned_frames.len())?.contiguous()?;
        let video = if decode.here() {
            let peers = GroupPeers { job, group, size };
            self.decode_group_segment(&plan, &peers, &local, decode, stream_frames, progress)?
        } else {
            None
        };
        let gathered = if job.rank() == 0 {
            let mut parts = vec![owned];
            for g in 1..plan.group_count() {
                parts.push(component(
                    "exchange",
                    job.recv(g * size, &self.device).map_err(Into::into),
                )?);
            }
            Tensor::cat(&parts, 2)?
        } else {
            if job.rank() % size == 0 {
                component("exchange", job.send(&owned, 0).map_err(Into::into))?;
            }
            local
        };
        Ok(Rendered {
            latents: gathered,
            video,
        })
    }

    /// The video `(1, 3, frames, H, W)` of the frames `group` owns, decoded on the group's first
    /// rank, or by the whole group with [`Decode::Split`] ([`Self::decode_segment`]), from its
    /// final latents `local` (the group's frames) after [`SEGMENT_WARMUP_LATENT_FRAMES`] of
    /// warm-up that the previous group sends (the last latent frames it holds, which are the
    /// clip's frames before this group's own): each decoding rank of a group receives them from
    /// the rank at its place in the previous group ([`GroupPeers::peer`]). `None` on the other
    /// ranks of the group.
    fn decode_group_segment(
        &self,
        plan: &WindowPlan,
        peers: &GroupPeers<'_>,
        local: &Tensor,
        decode: Decode<'_>,
        stream_frames: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Option<Video>> {
        let (job, group) = (peers.job, peers.group);
        let decoding = match decode {
            Decode::No => false,
            Decode::Here => job.rank().is_multiple_of(peers.size),
            Decode::Split(_) => true,
        };
        if !decoding {
            return Ok(None);
        }
        let frames = plan.group_frames(group);
        if group + 1 < plan.group_count() {
            let warm = segment_warmup(plan, group + 1);
            let tail = local.narrow(2, frames.len() - warm, warm)?.contiguous()?;
            component(
                "exchange",
                job.send(&tail, peers.peer(group + 1)).map_err(Into::into),
            )?;
        }
        progress(Progress::Decoding);
        let start = Instant::now();
        let owned = plan.group_owned_frames(group);
        let own = local.narrow(2, owned.start - frames.start, owned.len())?;
        let (latents, warmup) = if group == 0 {
            (own, 0)
        } else {
            let warm = component(
                "exchange",
                job.recv(peers.peer(group - 1), &self.device)
                    .map_err(Into::into),
            )?;
            let n = warm.dim(2)?;
            (Tensor::cat(&[&warm, &own], 2)?, n)
        };
        let mut segment = DecodedFrames::new(stream_frames);
        let handed_out =
            self.decode_frames(&latents, warmup, owned.start, decode, &mut |video| {
                segment.take(video, progress)
            })?;
        progress(Progress::Decoded {
            elapsed: start.elapsed().saturating_sub(handed_out),
        });
        Ok(segment.into_video())
    }

    /// The clip's frames from its final latents, handed to `sink` a few at a time in order: one
    /// decode of the whole clip, or for a plan of several worker groups each group's owned
    /// frames decoded on their own after a warm-up ([`SEGMENT_WARMUP_LATENT_FRAMES`]): what the
    /// groups decode in parallel, so one process and a job of groups give the same frames.
    /// Returns the time `sink` took.
    pub fn decode_plan_into(
        &self,
        latents: &Tensor,
        plan: &WindowPlan,
        sink: &mut dyn FnMut(Video) -> Result<()>,
    ) -> Result<Duration> {
        self.decode_plan_with(latents, plan, Decode::Here, sink)
    }

    /// [`Self::decode_plan_into`] by `decode`'s ranks; `sink` sees the frames on the rank
    /// that gets them.
    fn decode_plan_with(
        &self,
        latents: &Tensor,
        plan: &WindowPlan,
        decode: Decode<'_>,
        sink: &mut dyn FnMut(Video) -> Result<()>,
    ) -> Result<Duration> {
        let mut handed_out = Duration::ZERO;
        for g in 0..plan.group_count() {
            let owned = plan.group_owned_frames(g);
            let warm = segment_warmup(plan, g);
            let start = owned.start - warm;
            let latents = latents.narrow(2, start, owned.end - start)?;
            handed_out += self.decode_frames(&latents, warm, owned.start, decode, sink)?;
        }
        Ok(handed_out)
    }

    /// [`Self::decode_plan_into`], the frames gathered into one video.
    pub fn decode_plan(&self, latents: &Tensor, plan: &WindowPlan) -> Result<Video> {
        let mut frames = DecodedFrames::new(false);
        self.decode_plan_into(latents, plan, &mut |video| frames.take(video, &mut |_| {}))?;
        frames
            .into_video()
            .ok_or_else(|| PipelineError::Spec("no latent frames to decode".into()))
    }

    /// Decodes final latents into RGB frames.
    pub fn decode_to_video(&self, latents: &Tensor) -> Result<Video> {
        let mut frames = DecodedFrames::new(false);
        self.decode_frames(latents, 0, 0, Decode::Here, &mut |video| {
            frames.take(video, &mut |_| {})
        })?;
        frames
            .into_video()
            .ok_or_else(|| PipelineError::Spec("no latent frames to decode".into()))
    }

    /// Decodes `latents` (final latents of the clip's latent frames from `first_latent` −
    /// `warmup` on) with one decoder cache, [`STREAMED_LATENT_FRAMES`] latent frames at a time,
    /// handing each piece's frames (numbered in the clip) to `sink`; the first `warmup` latent
    /// frames are decoded for the causal context only and their frames thrown away (0 from the
    /// clip's start: then this is the whole decode, frame for frame). Under [`Decode::Split`]
    /// every rank of the split decodes its rows and `sink` is called on its first rank only.
    /// Returns the time `sink` took.
    fn decode_frames(
        &self,
        latents: &Tensor,
        warmup: usize,
        first_latent: usize,
        decode: Decode<'_>,
        sink: &mut dyn FnMut(Video) -> Result<()>,
    ) -> Result<Duration> {
        let vae = self.vae.as_ref().ok_or_else(|| {
            PipelineError::Spec("this pipeline was loaded without its VAE".into())
        })?;
        let total = latents.dim(2)?;
        if first_latent > 0 && warmup == 0 {
            return Err(PipelineError::Spec(format!(
                "frames from latent frame {first_latent} need a warm-up of at least one latent frame"
            )));
        }
        let _span = longtake_proto::telemetry::decode_span(total - warmup).entered();
        let z = component(
            "vae",
            vae.unnormalize_latents(&latents.to_dtype(self.dtype)?),
        )?;
        let split = match decode {
            Decode::No => return Ok(Duration::ZERO),
            Decode::Here => None,
            Decode::Split(comm) if comm.world_size() > latents.dim(3)? => {
                // Too few rows to go round: the first rank decodes alone.
                if comm.rank() != 0 {
                    return Ok(Duration::ZERO);
                }
                None
            }
            Decode::Split(comm) => Some(component("vae", RowSplit::new(comm, latents.dim(3)?))?),
        };
        let mut cache = DecoderCache::new();
        let decode_piece = |z: &Tensor, cache: &mut DecoderCache| match &split {
            None => vae.decode_with_cache(z, cache).map(Some),
            Some(split) => vae.decode_rows_with_cache(z, cache, split),
        };
        if warmup > 0 {
            component("vae", decode_piece(&z.narrow(2, 0, warmup)?, &mut cache))?;
        }
        let mut next_frame = first_video_frame(first_latent, video::VAE_SCALE_TEMPORAL);
        let mut handed_out = Duration::ZERO;
        let mut start = warmup;
        while start < total {
            let len = STREAMED_LATENT_FRAMES.min(total - start);
            let piece = component("vae", decode_piece(&z.narrow(2, start, len)?, &mut cache))?;
            start += len;
            let Some(piece) = piece else {
                continue; // another rank of the split has the frames
            };
            let video = to_video(&piece.to_dtype(DType::F32)?, next_frame)?;
            next_frame += video.frames;
            let handing = Instant::now();
            sink(video)?;
            handed_out += handing.elapsed();
        }
        Ok(handed_out)
    }
}

/// Latent frames decoded at a time when frames are handed out as they are decoded: 16 video
/// frames, so a rank holds a few frames rather than its whole segment.
pub const STREAMED_LATENT_FRAMES: usize = 4;

/// Where decoded frames go: out as [`Progress::Frames`] as they come (streaming), or gathered
/// into one video.
struct DecodedFrames {
    stream: bool,
    gathered: Option<Video>,
}

impl DecodedFrames {
    fn new(stream: bool) -> Self {
        Self {
            stream,
            gathered: None,
        }
    }

    fn take(&mut self, video: Video, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        if self.stream {
            progress(Progress::Frames(video));
            return Ok(());
        }
        match &mut self.gathered {
            None => self.gathered = Some(video),
            Some(all) => {
                if (all.width, all.height) != (video.width, video.height)
                    || all.first_frame + all.frames != video.first_frame
                {
                    return Err(PipelineError::Spec(format!(
                        "frames {}.. of {}x{} do not follow frames {}..{} of {}x{}",
                        video.first_frame,
                        video.width,
                        video.height,
                        all.first_frame,
                        all.first_frame + all.frames,
                        all.width,
                        all.height
                    )));
                }
                all.rgb.extend_from_slice(&video.rgb);
                all.frames += video.frames;
            }
        }
        Ok(())
    }

    /// The gathered video (`None` when streamed, or nothing was decoded).
    fn into_video(self) -> Option<Video> {
        self.gathered
    }
}

/// Latent frames a worker group's segment of a clip is decoded after, thrown away, so that the
/// causal VAE has the context a whole decode would give it. Measured on the toy model (a
/// 97-frame render, the frames of latent frames 13–24 against the whole decode; test
/// `a_segment_decoded_after_a_warm_up_matches_the_whole_decode`): largest error 77.9 8-bit levels
/// after 1 frame of warm-up, 20.1 after 3, 9.4 after 4, 0.16 after 6, 0.02 after 8. At 6 no
/// pixel is off by a level before rounding, for 6 latent frames of decode per group.
pub const SEGMENT_WARMUP_LATENT_FRAMES: usize = 6;

/// The warm-up of group `group`'s segment: [`SEGMENT_WARMUP_LATENT_FRAMES`], or as many as the
/// previous group holds (they are what it sends); none for the first group, which decodes from
/// the clip's start.
fn segment_warmup(plan: &WindowPlan, group: usize) -> usize {
    match group {
        0 => 0,
        g => SEGMENT_WARMUP_LATENT_FRAMES.min(plan.group_frames(g - 1).len()),
    }
}

/// A decoded video tensor `(1, 3, frames, H, W)` in [-1, 1] as RGB bytes, the clip's frames
/// from `first_frame` on.
/// The final latents with the held frames set to the known latents exactly (the held path
/// ends there up to the model dtype's rounding): the decoder's context is the clip's own.
fn with_held(latents: Tensor, held: Option<&Tensor>) -> Result<Tensor> {
    let Some(held) = held else {
        return Ok(latents);
    };
    let k = held.dim(2)?;
    let rest = latents.narrow(2, k, latents.dim(2)? - k)?;
    Ok(Tensor::cat(&[held, &rest], 2)?)
}

fn to_video(video: &Tensor, first_frame: usize) -> Result<Video> {
    let (rgb, frames, height, width) = video::video_to_rgb8(video)?;
    Ok(Video {
        rgb,
        first_frame,
        frames,
        height,
        width,
    })
}

/// The conditioning the denoiser holds: the first window's (a clip of one window: its only
/// one; a longer clip's windows each use their own through [`WindowedFlow`]).
fn first_window(per_window: &[Conditioning]) -> Result<&Conditioning> {
    per_window
        .first()
        .ok_or_else(|| PipelineError::Spec("a window plan without windows".into()))
}

impl VideoPipeline for WanPipeline {
    fn info(&self) -> &PipelineInfo {
        WanPipeline::info(self)
    }

    fn layout_limits(&self, guidance: bool) -> longtake_proto::spec::LayoutLimits {
        self.transformer_config.layout_limits(guidance)
    }

    fn cancel_token(&self) -> &CancelToken {
        WanPipeline::cancel_token(self)
    }

    fn render_with_options(
        &self,
        spec: &RenderSpec,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered> {
        WanPipeline::render_with_options(self, spec, options, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reference::toy_checkpoint_dir;

    /// The built-in toy model loads through the diffusers-layout path as any checkpoint does,
    /// with the defaults and the prompt length its `_longtake` section states, and the copy
    /// written out of the binary renders exactly what the committed files render.
    #[test]
    fn the_toy_model_loads_as_a_checkpoint_with_its_stated_defaults() -> Result<()> {
        let dev = Device::Cpu;
        let committed = WanPipeline::load(toy_checkpoint_dir(), &dev, DType::F32)?;
        let info = committed.info().clone();
        assert_eq!(info.name, "toy");
        assert_eq!(
            (info.default_width, info.default_height),
            (64, 64),
            "{info:?}"
        );
        assert_eq!(
            (info.default_frames, info.default_fps),
            (17, 16),
            "{info:?}"
        );
        assert_eq!(info.max_sequence_length, 16, "trained on 16-token prompts");
        let (cond, _) = committed.encode_prompts("a red circle moving left", "")?;
        assert_eq!(cond.dim(1)?, 16);

        let embedded = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        assert_eq!(embedded.info(), &info);
        let spec = RenderSpec {
            input: None,
            prompt: "a red circle moving left on a blue background".into(),
            negative_prompt: String::new(),
            frames: 5,
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 11,
            windows: None,
            timeline: Default::default(),
        };
        assert!(committed.render(&spec, &mut |_| {})? == embedded.render(&spec, &mut |_| {})?);
        Ok(())
    }

    /// A render that continues a clip holds the clip's last frames: its final latents start
    /// with their encoding exactly, and its first frames decode back to them (the toy VAE's
    /// round trip); a count the encoder cannot take, another size, or a clip that fills the
    /// first window is refused by name.
    #[test]
    fn a_render_that_continues_a_clip_starts_with_its_frames() -> Result<()> {
        let dev = Device::Cpu;
        let pipe = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        let clip = RenderSpec {
            input: None,
            prompt: "a red circle moving right on a black background".into(),
            negative_prompt: String::new(),
            frames: 17,
            width: 64,
            height: 64,
            steps: 8,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 3,
            windows: None,
            timeline: Default::default(),
        };
        let original = pipe.render(&clip, &mut |_| {})?;
        let frame_bytes = 64 * 64 * 3;
        let last = |n: usize| Video {
            rgb: original.rgb[(17 - n) * frame_bytes..].to_vec(),
            first_frame: 0,
            frames: n,
            height: 64,
            width: 64,
        };
        let extension = RenderSpec {
            input: Some(RenderInput::Continues(last(5))),
            seed: 4,
            ..clip.clone()
        };
        let rendered =
            pipe.render_with_options(&extension, RenderOptions::default(), &mut |_| {})?;
        let plan = pipe.window_plan(&extension)?;
        let held = pipe.held_latents(&extension, &plan)?.expect("held latents");
        assert_eq!(held.dim(2)?, 2);
        let start = rendered.latents.narrow(2, 0, 2)?;
        assert_eq!(
            (start - &held)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0,
            "the held frames end at the clip's latents"
        );
        let video = rendered.video.expect("decoded");
        let mean_error = |a: &[u8], b: &[u8]| {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| (x as f64 - y as f64).abs())
                .sum::<f64>()
                / a.len() as f64
        };
        let round_trip = mean_error(&video.rgb[..5 * frame_bytes], &last(5).rgb);
        assert!(
            round_trip < 8.0,
            "held frames decode {round_trip} levels off the clip's"
        );

        for (input, problem) in [
            (last(4), "1 + 4k"),
            (last(17), "leave nothing new"),
            (
                Video {
                    rgb: vec![0; 5 * 32 * 32 * 3],
                    first_frame: 0,
                    frames: 5,
                    height: 32,
                    width: 32,
                },
                "render at the clip's size",
            ),
        ] {
            let spec = RenderSpec {
                input: Some(RenderInput::Continues(input)),
                ..clip.clone()
            };
            let e = pipe.render(&spec, &mut |_| {}).unwrap_err().to_string();
            assert!(e.contains(problem), "{e}");
        }
        Ok(())
    }

    /// A clip no longer than its window renders exactly as a plain render, whatever the window
    /// settings; a longer one is co-denoised: it differs from the one-sequence render, holds
    /// the clip's frames, and is the same bits run twice.
    #[test]
    fn a_clip_is_co_denoised_only_when_it_is_longer_than_its_window() -> Result<()> {
        use longtake_proto::spec::{Fusion, WindowSettings};
        let dev = Device::Cpu;
        let pipe = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        let windows = |latent_frames| {
            Some(WindowSettings {
                latent_frames,
                overlap: 1,
                fusion: Fusion::Linear,
                groups: 1,
                noise: Default::default(),
            })
        };
        let plain = RenderSpec {
            input: None,
            prompt: "a green square moving up on a black background".into(),
            negative_prompt: String::new(),
            frames: 13,
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 5,
            windows: None,
            timeline: Default::default(),
        };
        let latents = |spec: &RenderSpec| -> Result<Tensor> {
            Ok(pipe
                .render_with_options(spec, RenderOptions::default(), &mut |_| {})?
                .latents)
        };
        let reference = latents(&plain)?;
        let one_window = latents(&RenderSpec {
            windows: windows(4),
            ..plain.clone()
        })?;
        let diff = (&one_window - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "a clip of one window is a plain render");

        let cut = RenderSpec {
            windows: windows(3),
            ..plain.clone()
        };
        assert_eq!(pipe.window_plan(&cut)?.windows().len(), 2);
        let co = latents(&cut)?;
        assert_eq!(co.dims(), reference.dims());
        let diff = (&co - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff > 1e-3,
            "two windows of 3 should not equal one sequence of 4"
        );
        let again = latents(&cut)?;
        assert_eq!(
            (&co - &again)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0,
            "the same plan twice"
        );
        let video = pipe.render(&cut, &mut |_| {})?;
        assert_eq!(video.frames, 13);
        Ok(())
    }

    /// Decoding a segment of a clip's latents on its own, from a few latent frames before it
    /// (a worker group decoding the frames it owns): from frame 0 it is the whole decode bit
    /// for bit; later, its error against the whole decode shrinks with the warm-up. Prints the
    /// error in 8-bit levels per warm-up (the figures behind the default warm-up).
    #[test]
    fn a_segment_decoded_after_a_warm_up_matches_the_whole_decode() -> Result<()> {
        let dev = Device::Cpu;
        let pipe = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        let spec = RenderSpec {
            input: None,
            prompt: "a yellow square bouncing on a blue background".into(),
            negative_prompt: String::new(),
            frames: 97, // 25 latent frames, 3 windows
            width: 64,
            height: 64,
            steps: 20,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 3,
            windows: None,
            timeline: Default::default(),
        };
        let latents = pipe
            .render_with(
                pipe.transformer()?,
                &spec,
                Decode::No,
                RenderOptions::default(),
                &mut |_| {},
            )?
            .latents;
        let whole = pipe.decode(&latents)?;
        let levels = |a: &Tensor, b: &Tensor| -> Result<(f32, f32)> {
            // [-1, 1] → 0..255
            let d = ((a - b)?.abs()? * 127.5)?;
            Ok((
                d.max_all()?.to_scalar::<f32>()?,
                d.mean_all()?.to_scalar::<f32>()?,
            ))
        };
        let head = pipe.decode_segment(&latents, 0..9, 0)?;
        assert_eq!(levels(&head, &whole.narrow(2, 0, 33)?)?.0, 0.0);
        let owned = 13..25;
        let frames = 1 + 4 * (owned.start - 1)..1 + 4 * (owned.end - 1);
        let reference = whole.narrow(2, frames.start, frames.len())?;
        let mut errors = Vec::new();
        for warmup in [1, 2, 3, 4, 6, 8, 13] {
            let segment = pipe.decode_segment(&latents, owned.clone(), warmup)?;
            assert_eq!(segment.dims(), reference.dims());
            let (max, mean) = levels(&segment, &reference)?;
            println!("warm-up {warmup:>2} latent frames: max {max:.2}, mean {mean:.4} levels");
            errors.push((warmup, max, mean));
        }
        let (_, max_full, _) = errors[errors.len() - 1];
        assert_eq!(
            max_full, 0.0,
            "a warm-up back to frame 0 is the whole decode"
        );
        let chosen = errors
            .iter()
            .find(|(w, _, _)| *w == SEGMENT_WARMUP_LATENT_FRAMES)
            .map(|&(_, max, _)| max);
        assert!(
            chosen.is_some_and(|max| max < 0.5),
            "the default warm-up leaves no pixel off by half a level: {chosen:?}"
        );
        Ok(())
    }

    /// A render that streams its frames hands them out a few latent frames at a time, numbered
    /// in the clip, and they are the frames of the render that returns its video, bit for bit
    /// (one decode of a window, and each group's segment after its warm-up for a long clip);
    /// the whole decode in pieces is the whole decode in one call.
    #[test]
    fn streamed_frames_are_the_returned_video_in_pieces() -> Result<()> {
        let dev = Device::Cpu;
        let pipe = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        for (frames, groups) in [(33, 1), (97, 1), (97, 2)] {
            let spec = RenderSpec {
                input: None,
                prompt: "a yellow square bouncing on a blue background".into(),
                negative_prompt: String::new(),
                frames,
                width: 64,
                height: 64,
                steps: 2,
                guidance_scale: 5.0,
                shift: None,
                scheduler: None,
                seed: 3,
                windows: Some(WindowSettings {
                    latent_frames: 9,
                    overlap: 3,
                    fusion: longtake_proto::spec::Fusion::Linear,
                    groups,
                    noise: NoiseSchedule::Independent,
                }),
                timeline: Default::default(),
            };
            let whole = pipe.render_with_options(&spec, RenderOptions::default(), &mut |_| {})?;
            let whole_video = whole.video.expect("decoded");
            let mut pieces = Vec::new();
            let mut decoded = 0;
            let streamed = pipe.render_with_options(
                &spec,
                RenderOptions {
                    stream_frames: true,
                    ..Default::default()
                },
                &mut |p| match p {
                    Progress::Frames(video) => pieces.push(video),
                    Progress::Decoded { .. } => decoded += 1,
                    _ => {}
                },
            )?;
            assert!(
                streamed.video.is_none(),
                "a streamed render returns no video"
            );
            assert_eq!(decoded, 1);
            let mut next = 0;
            let mut rgb = Vec::new();
            for piece in &pieces {
                assert_eq!(piece.first_frame, next, "{frames} frames, {groups} groups");
                assert!(piece.frames <= 4 * STREAMED_LATENT_FRAMES);
                next += piece.frames;
                rgb.extend_from_slice(&piece.rgb);
            }
            assert_eq!(next, frames);
            assert!(pieces.len() > 1);
            assert!(rgb == whole_video.rgb, "{frames} frames, {groups} groups");
            if groups == 1 {
                let in_one_call = to_video(&pipe.decode(&whole.latents)?, 0)?;
                assert!(in_one_call == whole_video, "{frames} frames");
            }
        }
        Ok(())
    }

    /// With a prompt timeline each window is conditioned on the prompt in force at its centre
    /// frame: one window renders exactly the plain render of that prompt (a cue before its
    /// centre takes over, one after it does not), and two windows on either side of a cue
    /// render neither prompt's plain co-denoised clip.
    #[test]
    fn each_window_renders_the_prompt_in_force_at_its_centre() -> Result<()> {
        use longtake_proto::spec::{Fusion, PromptTimeline, WindowSettings};
        use longtake_proto::PromptCue;
        let dev = Device::Cpu;
        let pipe = WanPipeline::from_source(PipelineSource::Toy, &dev, DType::F32)?;
        let (right, left) = (
            "a red circle moving right on a gray background",
            "a red circle moving left on a gray background",
        );
        let spec = |prompt: &str, cue: Option<(f64, &str)>, latent_window| RenderSpec {
            input: None,
            prompt: prompt.into(),
            negative_prompt: String::new(),
            frames: 13, // 4 latent frames; video frame 6 is the centre
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 9,
            windows: Some(WindowSettings {
                latent_frames: latent_window,
                overlap: 1,
                fusion: Fusion::Linear,
                groups: 1,
                noise: Default::default(),
            }),
            timeline: PromptTimeline::new(
                &cue.map(|(at, p)| PromptCue {
                    at_seconds: at,
                    prompt: p.into(),
                })
                .into_iter()
                .collect::<Vec<_>>(),
                16,
            ),
        };
        let bits = |spec: &RenderSpec| -> Result<Vec<u32>> {
            let latents = pipe
                .render_with_options(spec, RenderOptions::default(), &mut |_| {})?
                .latents;
            Ok(latents
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        // one window of 4 latent frames
        assert_eq!(
            bits(&spec(right, Some((0.25, left)), 4))?,
            bits(&spec(left, None, 4))?,
            "a cue at frame 4, before the centre, conditions the window"
        );
        assert_eq!(
            bits(&spec(right, Some((0.5, left)), 4))?,
            bits(&spec(right, None, 4))?,
            "a cue at frame 8, after the centre, does not"
        );
        // windows of 3 latent frames: frames 0..9 (centre 4) and 1..13 (centre 6.5)
        let story = spec(right, Some((0.3125, left)), 3);
        let plan = pipe.window_plan(&story)?;
        assert_eq!(story.timeline.window_prompts(&plan, 4), [0, 1]);
        let mixed = bits(&story)?;
        assert_ne!(mixed, bits(&spec(right, None, 3))?);
        assert_ne!(mixed, bits(&spec(left, None, 3))?);
        assert_eq!(mixed, bits(&story)?, "the same timeline twice");
        Ok(())
    }
}
