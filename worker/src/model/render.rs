//! What every video pipeline shares, whatever its model family: the render request
//! ([`RenderSpec`], [`RenderOptions`]), its progress and result ([`Progress`], [`Rendered`],
//! [`Video`]), its errors and cancellation, the [`FlowModel`] a denoising loop integrates, and
//! [`VideoPipeline`], the face of a loaded pipeline (one process or one rank of a layout) that
//! the worker drives without knowing the family.

use std::time::Duration;

use candle_core::Tensor;
use longtake_proto::spec::{LayoutLimits, PromptTimeline, WindowSettings};

use super::denoiser::{AfterStep, DenoiserError, DenoiserState};
use super::loader::LoadError;
use super::scheduler::{self, SchedulerKind};
use super::text::TextError;
use super::tokenizer::TokenizerError;

/// Everything that can stop a render, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{component}: {source}")]
    Component {
        component: &'static str,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Scheduler(#[from] scheduler::SchedulerError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{0}")]
    Spec(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Denoiser(#[from] DenoiserError),
    /// The render was stopped through its [`CancelToken`] between two steps.
    #[error("cancelled after step {after_step} of {total}")]
    Cancelled { after_step: usize, total: usize },
}

/// Stops a running render at the next step boundary (a worker aborting its task). Clones share
/// one flag; the pipeline checks it after every denoising step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Clears the flag before the next render of a reused pipeline.
    pub fn reset(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

pub type Result<T> = std::result::Result<T, PipelineError>;

pub(crate) fn component<T>(component: &'static str, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|source| PipelineError::Component { component, source })
}

/// What to render. Sizes are in pixels; `frames` must already be of the form 4k+1
/// (see `longtake_proto::spec::frames`).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Overrides the scheduler's flow shift.
    pub shift: Option<f64>,
    /// Overrides the checkpoint's scheduler class.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// How a clip longer than one window is cut (`longtake_proto::spec::windows`); `None`, or a
    /// clip no longer than the window: one window, a plain render.
    pub windows: Option<WindowSettings>,
    /// The prompt changing during the clip (`prompt` until the first cue); each window takes
    /// the prompt in force at its centre.
    pub timeline: PromptTimeline,
    /// What the clip starts from besides noise; `None`: text-to-video.
    pub input: Option<RenderInput>,
}

/// Frames a render starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum RenderInput {
    /// The last 4k+1 frames of a clip this render continues (video extension). They are the
    /// render's first frames: their latents are held to the clip's at every step
    /// ([`HeldFrames`](super::held_frames::HeldFrames)), and the new frames follow them, so
    /// `RenderSpec::frames` counts both.
    Continues(Video),
    /// A picture the clip starts from (image-to-video): its first frame, resized to the
    /// render's size.
    FirstFrame(Video),
}

/// A progress report from a render.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Prompts encoded (in `text`); the denoising loop of `total` steps starts.
    Encoded { total: usize, text: Duration },
    /// Denoising step `index` (0-based) of `total` finished after `elapsed`; what this rank
    /// exchanged with other worker groups in it.
    Step {
        index: usize,
        total: usize,
        elapsed: Duration,
        exchange: GroupExchange,
    },
    /// The latents are being decoded into frames.
    Decoding,
    /// Frames as they are decoded, numbered in the clip, when the render streams them
    /// ([`RenderOptions::stream_frames`]).
    Frames(Video),
    /// The frames this rank decodes are decoded, after `elapsed` (the time the receiver of
    /// [`Progress::Frames`] took left out).
    Decoded { elapsed: Duration },
}

/// What a rank exchanged with the ranks of other worker groups in one step (a clip co-denoised
/// by several groups settles the frames neighbouring groups share).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupExchange {
    /// Bytes sent.
    pub bytes: u64,
    /// Time spent sending and receiving, waiting for the neighbours included.
    pub time: Duration,
}

/// How a render runs beyond its spec. The default starts from the spec's
/// noise with no hook.
#[derive(Default)]
pub struct RenderOptions<'a> {
    /// Continue from this saved state instead of the spec's initial noise (the spec must be the
    /// one that saved it: same scheduler, steps, shift and size are checked; the prompts, seed
    /// and guidance are the caller's to keep).
    pub resume: Option<DenoiserState>,
    /// Called after every step, before the cancellation check, e.g. to save the denoiser's
    /// state; an error stops the render.
    pub after_step: Option<&'a mut AfterStep<'a>>,
    /// Hand the decoded frames out a few at a time as [`Progress::Frames`] instead of returning
    /// the video, so that no more than a few frames are held at once (a worker streaming a long
    /// clip).
    pub stream_frames: bool,
}

/// The result of a render: the final latents, and the video where decoded.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// f32 `(1, C, F, H, W)`.
    pub latents: Tensor,
    pub video: Option<Video>,
}

/// Decoded frames: `frames × height × width × 3` RGB bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Video {
    pub rgb: Vec<u8>,
    /// The clip's frame that the first of these is: 0 for a whole clip, later for the segment
    /// one worker group of a long clip decodes and sends on its own.
    pub first_frame: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

/// Sizes of a pipeline's components that the CLI needs for defaults and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineInfo {
    /// `tiny`, the name a checkpoint states (`_longtake.name`) or the checkpoint directory.
    pub name: String,
    pub default_width: usize,
    pub default_height: usize,
    /// The clip a spec without frames gets (4k+1 frames) and its frame rate.
    pub default_frames: usize,
    pub default_fps: usize,
    pub default_steps: usize,
    /// Prompts are cut or zero-padded to this many tokens.
    pub max_sequence_length: usize,
    /// The procedural world a toy model was trained on (`_longtake.world`); `None` for a model
    /// of real video.
    pub world: Option<ToyWorld>,
}

/// The procedural worlds of `worker/toy/world.py`; the clip checker measures a toy model's clips
/// in the world it was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToyWorld {
    /// The frame has borders: objects stay inside it.
    Bordered,
    /// The frame's edges join for straight movers (`world.py --wrap`); bouncing objects still
    /// bounce off its sides.
    Wrapping,
}

impl ToyWorld {
    pub const ALL: [ToyWorld; 2] = [ToyWorld::Bordered, ToyWorld::Wrapping];

    pub fn name(self) -> &'static str {
        match self {
            ToyWorld::Bordered => "bordered",
            ToyWorld::Wrapping => "wrapping",
        }
    }
}

impl std::str::FromStr for ToyWorld {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown world {s:?}: use bordered or wrapping"))
    }
}

/// A model of the flow (velocity) the sampler integrates: Wan's transformer in one process, or
/// the same transformer run by the ranks of a parallel layout. The denoising loop only needs this.
pub trait FlowModel {
    /// The predicted flow for latents `x` `(B, C, F, H, W)` at timesteps `t` `(B,)` under text
    /// embeddings `context` `(B, Lt, text_dim)`.
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor>;

    /// The flow on latent frames `frames` of the clip (`x` holds exactly those): the flow of a
    /// window of a long clip. The same as [`Self::predict`] for a model whose condition does
    /// not depend on where a window sits; an image-to-video model takes its condition's
    /// frames there.
    fn predict_frames(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        frames: std::ops::Range<usize>,
    ) -> candle_core::Result<Tensor> {
        let _ = frames;
        self.predict(x, t, context)
    }

    /// The flow under an image embedding `image` `(B, Li, image_dim)` as well: an
    /// image-to-video transformer, whose `x` carries the condition's channels after the
    /// latents. A model that takes no image says so.
    fn predict_with_image(
        &self,
        _x: &Tensor,
        _t: &Tensor,
        _context: &Tensor,
        _image: &Tensor,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("this transformer takes no image (it is not an image-to-video model)")
    }

    /// Called with the final latents when the loop has taken its last step. A model run by
    /// several ranks checks there that they all ended with the same latents; one process has
    /// nothing to check.
    fn check_final_latents(&self, _latents: &Tensor) -> candle_core::Result<()> {
        Ok(())
    }

    /// What this rank exchanged with the ranks of other worker groups in its last prediction (a
    /// clip co-denoised by several groups exchanges its shared frames each step); nothing when
    /// one group holds the whole clip.
    fn group_exchange(&self) -> GroupExchange {
        GroupExchange::default()
    }
}

/// What a worker advertises about a model, known without loading its weights: the pipeline's
/// defaults and the transformer's shape that a parallel layout must divide.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    pub info: PipelineInfo,
    pub attention_heads: usize,
    pub ffn_dim: usize,
    /// An image-to-video model: its renders start from a picture.
    pub takes_picture: bool,
}

impl ModelFacts {
    /// What a parallel layout must divide, for a render that does or does not use guidance.
    pub fn layout_limits(&self, guidance: bool) -> LayoutLimits {
        LayoutLimits {
            heads: self.attention_heads,
            ffn_dim: self.ffn_dim,
            guidance,
        }
    }
}

/// A loaded video pipeline of any model family, in one process or as one rank's share of a
/// parallel layout: what the worker drives. `crate::families` loads one for a checkpoint by its
/// `model_index.json` class.
pub trait VideoPipeline: Send {
    /// The pipeline's name and defaults.
    fn info(&self) -> &PipelineInfo;

    /// What a parallel layout must divide in this pipeline's transformer.
    fn layout_limits(&self, guidance: bool) -> LayoutLimits;

    /// Stops a running render at the next step boundary; reset it before reusing the pipeline.
    fn cancel_token(&self) -> &CancelToken;

    /// The whole run for `spec` with `options` (resumed from a saved state, a hook after each
    /// step): the final latents, and the video where this process decodes (one process, or the
    /// rank of a layout that writes the video).
    fn render_with_options(
        &self,
        spec: &RenderSpec,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered>;

    /// [`Self::render_with_options`] with the default options: the video where decoded.
    fn render(
        &self,
        spec: &RenderSpec,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Option<Video>> {
        Ok(self
            .render_with_options(spec, RenderOptions::default(), progress)?
            .video)
    }
}
