//! The job spec as the domain sees it. A [`RenderSpec`] from the wire (gRPC, an etcd record, the
//! CLI's flags) is parsed once into a [`SpecRequest`]: typed fields, every rule that needs no
//! model checked, each error naming its field (`spec.width: 250 is not a multiple of 16`).
//! [`Limits`] are a farm's own bounds on top. Once the model that will run it is known, the
//! request is resolved into a [`JobSpec`]: the model's defaults filled in and the layout checked
//! against the model's shape. A `JobSpec` converts back into a `RenderSpec` with every field set,
//! which parses to the same `JobSpec` again: what the coordinator stores and hands to workers.

use super::frames::{self, WAN_TEMPORAL_PACK};
use super::input::{held_latent_frames, size_for_picture, InputKind, JobInput};
use super::layout::{Layout, LayoutLimits};
use super::scheduler::SchedulerKind;
use super::timeline::{self, PromptTimeline, TimelineError};
use super::windows::{Fusion, NoiseSchedule, WindowPlan, WindowSettings};
use crate::{ModelInfo, OutputFormat, PromptCue, RenderSpec};

/// The model a spec without one renders with: the built-in toy model, trained by longtake.
pub const DEFAULT_MODEL: &str = "toy";

/// The clip length of a model that states none (a worker from before `default_frames`): Wan2.1's
/// 5 s at 16 fps.
pub const WAN21_DEFAULT_FRAMES: u32 = 81;
/// The frame rate of a model that states none: Wan2.1's.
pub const WAN21_DEFAULT_FPS: u32 = 16;

/// Pixel sizes are multiples of this: Wan's VAE downsamples 8× and the transformer patches 2×2.
pub const SIZE_MULTIPLE: u32 = 16;

/// A spec field that breaks a rule. Displays as `spec.<field>: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// What specs a farm accepts; a spec over a limit is refused naming the field and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_frames: u32,
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
    /// Prompt and negative prompt, in characters.
    pub max_prompt_chars: u32,
    /// Ranks (workers) one job may use.
    pub max_ranks: u32,
    /// Cues of a prompt timeline.
    pub max_prompt_cues: u32,
    /// A job's name, in characters.
    pub max_name_chars: u32,
    /// A job's input file (a picture, or a clip to extend), in bytes. A task carries its job's
    /// input in one message, so this stays under [`crate::MAX_MESSAGE_BYTES`].
    pub max_input_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // one minute at 16 fps, rounded to 4k+1, with room for 24 fps
            max_frames: 1441,
            max_width: 1920,
            max_height: 1088,
            max_steps: 200,
            max_prompt_chars: 4000,
            max_ranks: 64,
            // a change of prompt every window of a minute of the toy model, with room
            max_prompt_cues: 64,
            max_name_chars: 200,
            // a minute of 480p H.264 at a studio's review bitrate (~5 Mbit/s) is ~38 MB
            max_input_bytes: 48 << 20,
        }
    }
}

/// Checks a job's name (not part of the spec: it names the job in lists and its output file):
/// at most `limits.max_name_chars` characters, none of them a control character (a name is
/// printed in terminals and logs, where those would act).
pub fn check_job_name(name: &str, limits: &Limits) -> Result<(), String> {
    let chars = name.chars().count();
    if chars > limits.max_name_chars as usize {
        return Err(format!(
            "{chars} characters is over this farm's limit of {}",
            limits.max_name_chars
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "contains the control character {}; a name is one line of plain text",
            c.escape_unicode()
        ));
    }
    Ok(())
}

/// What a model tells a spec: the defaults of the fields a spec may leave unset, and the shape a
/// layout must divide. A worker describes each model it serves this way (as a `ModelInfo`).
/// Zero fields are unknown (frames and fps then take Wan2.1's, as before models stated them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDescription {
    pub name: String,
    pub default_width: u32,
    pub default_height: u32,
    pub default_steps: u32,
    /// 4k+1 frames; 0: [`WAN21_DEFAULT_FRAMES`].
    pub default_frames: u32,
    /// 0: [`WAN21_DEFAULT_FPS`].
    pub default_fps: u32,
    /// Attention heads; 0 when not known (the worker checks the layout against its own config).
    pub attention_heads: u32,
    /// Hidden width of the feed-forward layers; 0 when not known.
    pub ffn_dim: u32,
    /// Whether its renders start from a picture (image-to-video); `None` when not known (a
    /// stored spec read back, resolved against no model).
    pub takes_picture: Option<bool>,
}

impl From<&ModelInfo> for ModelDescription {
    fn from(info: &ModelInfo) -> Self {
        Self {
            name: info.name.clone(),
            default_width: info.default_width,
            default_height: info.default_height,
            default_steps: info.default_steps,
            default_frames: info.default_frames,
            default_fps: info.default_fps,
            attention_heads: info.attention_heads,
            ffn_dim: info.ffn_dim,
            takes_picture: Some(info.takes_picture),
        }
    }
}

/// A checked spec whose model defaults are not yet filled in (`None`: the model's).
#[derive(Debug, Clone, PartialEq)]
pub struct SpecRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub frames: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance_scale: f64,
    /// The scheduler's flow shift; `None`: the checkpoint's.
    pub shift: Option<f64>,
    /// `None`: the checkpoint's scheduler.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub fps: Option<u32>,
    pub format: OutputFormat,
    /// Each worker group's layout.
    pub layout: Layout,
    /// Worker groups (at least 1).
    pub groups: u32,
    /// Latent frames per window; `None`: the model's native length.
    pub window_latent_frames: Option<u32>,
    /// `None`: [`default_overlap`] of the window.
    pub overlap_latent_frames: Option<u32>,
    /// `None`: [`Fusion::default`].
    pub fusion: Option<Fusion>,
    /// `None`: [`NoiseSchedule::default`].
    pub noise: Option<NoiseSchedule>,
    /// The prompt changing during the clip (checked: times increasing, prompts not blank).
    pub prompt_timeline: Vec<PromptCue>,
    /// What the render starts from besides its prompt (`None`: noise).
    pub input: Option<JobInput>,
}

/// The overlap of a window of `window` latent frames when a spec sets none: a third of it.
pub fn default_overlap(window: u32) -> u32 {
    window / 3
}

/// A spec ready to render: every field set, the layout fitted to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub shift: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub fps: u32,
    pub format: OutputFormat,
    /// Each worker group's layout.
    pub layout: Layout,
    /// How the clip is cut into windows and spread over worker groups.
    pub windows: WindowSettings,
    /// The prompt changing during the clip (every cue inside it).
    pub prompt_timeline: Vec<PromptCue>,
    /// What the render starts from besides its prompt (`None`: noise); read by the coordinator.
    /// For a clip, `frames` counts the new frames only.
    pub input: Option<JobInput>,
}

impl SpecRequest {
    /// Whether the render uses classifier-free guidance (a scale above 1).
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// Whether the render extends a clip (its frames are then the new frames only).
    pub fn extends(&self) -> bool {
        self.input
            .as_ref()
            .is_some_and(|i| i.kind == InputKind::Clip)
    }

    /// Checks the request against a farm's limits.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), SpecError> {
        check_text("prompt", &self.prompt, limits.max_prompt_chars)?;
        check_text(
            "negative_prompt",
            &self.negative_prompt,
            limits.max_prompt_chars,
        )?;
        check_timeline_limits(&self.prompt_timeline, limits)?;
        if let Some(frames) = self.frames {
            at_most("frames", frames, limits.max_frames)?;
        }
        if let Some(width) = self.width {
            at_most("width", width, limits.max_width)?;
        }
        if let Some(height) = self.height {
            at_most("height", height, limits.max_height)?;
        }
        if let Some(steps) = self.steps {
            at_most("steps", steps, limits.max_steps)?;
        }
        let world = self.layout.world_size();
        if world > limits.max_ranks as usize {
            return Err(bad(
                "layout",
                format!(
                    "{} needs {world} ranks, over this farm's limit of {}",
                    self.layout, limits.max_ranks
                ),
            ));
        }
        let ranks = world.saturating_mul(self.groups as usize);
        if ranks > limits.max_ranks as usize {
            return Err(bad(
                "groups",
                format!(
                    "{} groups of {world} rank(s) ({}) need {ranks} ranks, over this farm's \
                     limit of {}",
                    self.groups, self.layout, limits.max_ranks
                ),
            ));
        }
        Ok(())
    }

    /// Fills the unset fields from `model`'s defaults and checks what only the model can tell:
    /// the layout against its heads and feed-forward width.
    pub fn resolve(&self, model: &ModelDescription) -> Result<JobSpec, SpecError> {
        let fill = |field: &'static str, value: Option<u32>, default: u32| match value {
            Some(value) => Ok(value),
            None if default != 0 => Ok(default),
            None => Err(bad(
                field,
                format!("model {} has no default {field}; set it", model.name),
            )),
        };
        if let Some(input) = self.input.as_ref().filter(|i| !i.is_read()) {
            return Err(bad(
                "input",
                format!(
                    "the {} has not been read: submit it with SubmitWithInput",
                    input.kind.name()
                ),
            ));
        }
        let picture_model = model.takes_picture == Some(true);
        match (&self.input, model.takes_picture) {
            (Some(picture), Some(false)) if picture.kind == InputKind::Image => {
                return Err(bad(
                    "input",
                    format!(
                        "model {} is a text-to-video model: it takes no picture (rendering from \
                         a picture needs an image-to-video model, e.g. Wan2.1 I2V)",
                        model.name
                    ),
                ))
            }
            (None, Some(true)) => {
                return Err(bad(
                    "input",
                    format!(
                        "model {} is an image-to-video model: it renders from a picture (--image) \
                         or extends a clip",
                        model.name
                    ),
                ))
            }
            _ => {}
        }
        let (mut default_width, mut default_height) = (model.default_width, model.default_height);
        let mut default_fps = match model.default_fps {
            0 => WAN21_DEFAULT_FPS,
            stated => stated,
        };
        let mut default_frames = match model.default_frames {
            0 => WAN21_DEFAULT_FRAMES,
            stated => stated,
        };
        match &self.input {
            Some(clip) if clip.kind == InputKind::Clip => {
                (default_width, default_height, default_fps) = (clip.width, clip.height, clip.fps);
                // new frames: the model's clip after its first frame
                default_frames -= 1;
            }
            Some(picture) => {
                (default_width, default_height) = size_for_picture(
                    (picture.width, picture.height),
                    (
                        default_width.max(SIZE_MULTIPLE),
                        default_height.max(SIZE_MULTIPLE),
                    ),
                    SIZE_MULTIPLE,
                );
            }
            None => {}
        }
        let width = fill("width", self.width, default_width)?;
        let height = fill("height", self.height, default_height)?;
        let steps = fill("steps", self.steps, model.default_steps)?;
        let frame_count = self.frames.unwrap_or(default_frames);
        let fps = self.fps.unwrap_or(default_fps);
        check_size("width", width)?;
        check_size("height", height)?;
        if !self.extends() {
            // A model's own default must follow the frame rule too: a worker advertising a
            // count its VAE cannot make is named here, not deep in the render.
            frames::check(frame_count, WAN_TEMPORAL_PACK).map_err(|e| {
                bad(
                    "frames",
                    format!("model {}'s default frame count: {e}", model.name),
                )
            })?;
        }
        if model.attention_heads != 0 && model.ffn_dim != 0 {
            let limits = LayoutLimits {
                heads: model.attention_heads as usize,
                ffn_dim: model.ffn_dim as usize,
                guidance: self.guided(),
            };
            self.layout
                .validate(&limits)
                .map_err(|e| bad("layout", format!("{e} (model {})", model.name)))?;
        }
        let window = self
            .window_latent_frames
            .unwrap_or_else(|| model.native_latent_frames());
        let windows = WindowSettings {
            latent_frames: window,
            overlap: self
                .overlap_latent_frames
                .unwrap_or_else(|| default_overlap(window)),
            fusion: self.fusion.unwrap_or_default(),
            groups: self.groups,
            noise: self.noise.unwrap_or_default(),
        };
        // A clip's held frames are settled once, when the job is first placed, by the model.
        let input = self.input.clone().map(|mut input| {
            if input.kind == InputKind::Clip && input.held_frames == 0 {
                input.held_frames = if picture_model {
                    1
                } else {
                    held_video_frames(Some(&input), &windows)
                };
            }
            input
        });
        let held = input
            .as_ref()
            .filter(|i| i.kind == InputKind::Clip)
            .map_or(0, |i| i.held_frames);
        if self.extends() && held == 0 {
            return Err(bad(
                "window_latent_frames",
                format!(
                    "windows of {window} latent frame(s) leave no room for the clip's last \
                     frames: an extension needs at least 2"
                ),
            ));
        }
        // The cut itself: a window plan the clip cannot have is named here, at submission.
        WindowPlan::new(
            frames::latent_frames(frame_count + held, WAN_TEMPORAL_PACK),
            windows,
        )
        .map_err(|e| bad(e.field(), e.problem()))?;
        // an extension's cues count its new frames only
        timeline::check_cues_fit(&self.prompt_timeline, frame_count, fps)
            .map_err(timeline_error)?;
        Ok(JobSpec {
            input,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            model: self.model.clone(),
            frames: frame_count,
            width,
            height,
            steps,
            guidance_scale: self.guidance_scale,
            shift: self.shift,
            scheduler: self.scheduler,
            seed: self.seed,
            fps,
            format: self.format,
            layout: self.layout,
            windows,
            prompt_timeline: self.prompt_timeline.clone(),
        })
    }
}

impl ModelDescription {
    /// The clip length the model was trained on, in latent frames: its default clip's.
    pub fn native_latent_frames(&self) -> u32 {
        let frames = match self.default_frames {
            0 => WAN21_DEFAULT_FRAMES,
            stated => stated,
        };
        frames::latent_frames(frames, WAN_TEMPORAL_PACK)
    }
}

impl JobSpec {
    /// Whether the render uses classifier-free guidance (a scale above 1).
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// Checks the resolved spec against a farm's limits (the model's defaults included).
    pub fn check_limits(&self, limits: &Limits) -> Result<(), SpecError> {
        SpecRequest::from(self).check_limits(limits)
    }

    /// Latent frames of the clip the workers render (an extension's held frames included).
    pub fn latent_frames(&self) -> u32 {
        frames::latent_frames(self.rendered_frames(), WAN_TEMPORAL_PACK)
    }

    /// The frames the workers render: `frames`, after the clip's last frames an extension holds
    /// ([`Self::held_frames`]).
    pub fn rendered_frames(&self) -> u32 {
        self.frames + self.held_frames()
    }

    /// How many of the extended clip's last frames the render holds as its first (4k + 1 for a
    /// text-to-video model, 1 for an image-to-video model; 0 when it extends nothing): the
    /// workers render them again and send the frames after them.
    pub fn held_frames(&self) -> u32 {
        match &self.input {
            Some(clip) if clip.kind == InputKind::Clip => clip.held_frames,
            _ => 0,
        }
    }

    /// Frames of the output: an extended clip's own and the new ones, or the rendered clip.
    pub fn output_frames(&self) -> u32 {
        match &self.input {
            Some(clip) if clip.kind == InputKind::Clip => clip.frames + self.frames,
            _ => self.frames,
        }
    }

    /// The output frame the workers' rendered frame `rendered` is (`None` for a held frame,
    /// which the output takes from the clip itself).
    pub fn output_frame(&self, rendered: u32) -> Option<u32> {
        let held = self.held_frames();
        let clip_frames = self.output_frames() - self.frames;
        rendered.checked_sub(held).map(|new| clip_frames + new)
    }

    /// The clip's latent cells (latent frames × rows × columns, the VAE's 8× spatial
    /// compression): what one denoising step processes, the unit of the farm's tokens per
    /// second.
    pub fn latent_cells(&self) -> u64 {
        const SPATIAL_SCALE: u64 = 8;
        u64::from(self.latent_frames())
            * (u64::from(self.height) / SPATIAL_SCALE)
            * (u64::from(self.width) / SPATIAL_SCALE)
    }

    /// The clip's windows and their groups (checked when the spec was resolved).
    pub fn window_plan(&self) -> Result<WindowPlan, SpecError> {
        WindowPlan::new(self.latent_frames(), self.windows).map_err(|e| bad(e.field(), e.problem()))
    }

    /// Whether the clip is longer than one window (co-denoised), the rule of
    /// [`WindowPlan::is_single_window`] without building the plan.
    pub fn is_windowed(&self) -> bool {
        self.latent_frames() > self.windows.latent_frames
    }

    /// The prompt timeline in the rendered frames: an extension's cues count from the clip's
    /// end (its first new frame), after the frames it holds.
    pub fn timeline(&self) -> PromptTimeline {
        PromptTimeline::new(&self.prompt_timeline, self.fps).after(self.held_frames() as usize)
    }

    /// Ranks the job needs: its groups times each group's layout.
    pub fn ranks(&self) -> usize {
        self.layout.world_size() * self.windows.groups as usize
    }
}

impl From<&JobSpec> for SpecRequest {
    fn from(spec: &JobSpec) -> Self {
        let windowed = spec.is_windowed();
        Self {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            model: spec.model.clone(),
            frames: Some(spec.frames),
            width: Some(spec.width),
            height: Some(spec.height),
            steps: Some(spec.steps),
            guidance_scale: spec.guidance_scale,
            shift: spec.shift,
            scheduler: spec.scheduler,
            seed: spec.seed,
            fps: Some(spec.fps),
            format: spec.format,
            layout: spec.layout,
            groups: spec.windows.groups,
            // A clip of one window is a plain render: its window settings mean nothing, so the
            // spec a client sees keeps them unset as submitted.
            window_latent_frames: windowed.then_some(spec.windows.latent_frames),
            overlap_latent_frames: windowed.then_some(spec.windows.overlap),
            fusion: windowed.then_some(spec.windows.fusion),
            noise: windowed.then_some(spec.windows.noise),
            prompt_timeline: spec.prompt_timeline.clone(),
            input: spec.input.clone(),
        }
    }
}

impl TryFrom<&RenderSpec> for SpecRequest {
    type Error = SpecError;

    /// Every rule that needs neither the farm's limits nor the model.
    fn try_from(spec: &RenderSpec) -> Result<Self, SpecError> {
        if spec.prompt.trim().is_empty() {
            return Err(bad("prompt", "must not be empty"));
        }
        let model = match spec.model.trim() {
            "" => DEFAULT_MODEL.to_string(),
            _ => spec.model.clone(),
        };
        let input = JobInput::from_proto(spec.input.as_ref()).map_err(|e| bad("input", e))?;
        let extends = input.as_ref().is_some_and(|i| i.kind == InputKind::Clip);
        // Zero frames or fps: the model's defaults, filled in by `resolve`.
        let frame_count = (spec.frames != 0).then_some(spec.frames);
        match frame_count {
            Some(count) if extends && !count.is_multiple_of(WAN_TEMPORAL_PACK) => {
                let nearest = (count / WAN_TEMPORAL_PACK).max(1) * WAN_TEMPORAL_PACK;
                return Err(bad(
                    "frames",
                    format!(
                        "an extension renders new frames in fours (4, 8, 12, ...): {count} is \
                         not one; try {nearest}"
                    ),
                ));
            }
            Some(count) if !extends => {
                frames::check(count, WAN_TEMPORAL_PACK).map_err(|e| bad("frames", e.to_string()))?
            }
            _ => {}
        }
        let fps = (spec.fps != 0).then_some(spec.fps);
        let width = optional_size("width", spec.width)?;
        let height = optional_size("height", spec.height)?;
        if let Some(clip) = input.as_ref().filter(|i| extends && i.is_read()) {
            clip.check_clip_fits(width, height, fps)
                .map_err(|(field, message)| bad(field, message))?;
            if !(clip.width.is_multiple_of(SIZE_MULTIPLE)
                && clip.height.is_multiple_of(SIZE_MULTIPLE))
            {
                return Err(bad(
                    "input",
                    format!(
                        "the clip is {}×{}: an extension renders at the clip's size, whose \
                         sides must be multiples of {SIZE_MULTIPLE}; crop or scale it first",
                        clip.width, clip.height
                    ),
                ));
            }
        }
        let steps = (spec.steps != 0).then_some(spec.steps);
        if !spec.guidance_scale.is_finite() || spec.guidance_scale < 0.0 {
            return Err(bad(
                "guidance_scale",
                format!(
                    "{} is not a finite number ≥ 0 (1 or less disables guidance; 5 is typical)",
                    spec.guidance_scale
                ),
            ));
        }
        if let Some(shift) = spec.shift {
            if !shift.is_finite() || shift <= 0.0 {
                return Err(bad(
                    "shift",
                    format!(
                        "{shift} is not a positive number (leave it unset for the checkpoint's)"
                    ),
                ));
            }
        }
        let scheduler = SchedulerKind::parse_optional(&spec.scheduler)
            .map_err(|e| bad("scheduler", e.to_string()))?;
        let format = OutputFormat::try_from(spec.format).map_err(|_| {
            bad(
                "format",
                format!("{} is not mp4 (0) or png (1)", spec.format),
            )
        })?;
        let layout: Layout = spec
            .layout
            .parse()
            .map_err(|e: super::layout::LayoutError| bad("layout", e.to_string()))?;
        let guided = spec.guidance_scale > 1.0;
        layout
            .check_degrees(guided)
            .map_err(|e| bad("layout", e.to_string()))?;
        let fusion =
            Fusion::parse_optional(&spec.fusion).map_err(|e| bad("fusion", e.to_string()))?;
        timeline::check_cues(&spec.prompt_timeline).map_err(timeline_error)?;
        let noise =
            NoiseSchedule::parse_optional(&spec.noise).map_err(|e| bad("noise", e.to_string()))?;
        Ok(Self {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            model,
            frames: frame_count,
            width,
            height,
            steps,
            guidance_scale: spec.guidance_scale,
            shift: spec.shift,
            scheduler,
            seed: spec.seed,
            fps,
            format,
            layout,
            groups: spec.groups.max(1),
            window_latent_frames: (spec.window_latent_frames != 0)
                .then_some(spec.window_latent_frames),
            overlap_latent_frames: spec.overlap_latent_frames,
            fusion,
            noise,
            prompt_timeline: spec.prompt_timeline.clone(),
            input,
        })
    }
}

impl From<&SpecRequest> for RenderSpec {
    fn from(spec: &SpecRequest) -> Self {
        RenderSpec {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            model: spec.model.clone(),
            frames: spec.frames.unwrap_or(0),
            width: spec.width.unwrap_or(0),
            height: spec.height.unwrap_or(0),
            steps: spec.steps.unwrap_or(0),
            guidance_scale: spec.guidance_scale,
            shift: spec.shift,
            scheduler: spec
                .scheduler
                .map(|s| s.name().to_string())
                .unwrap_or_default(),
            seed: spec.seed,
            fps: spec.fps.unwrap_or(0),
            format: spec.format as i32,
            layout: if spec.layout == Layout::SINGLE {
                String::new()
            } else {
                spec.layout.to_string()
            },
            // 0 is one group, as an empty layout is one rank
            groups: if spec.groups == 1 { 0 } else { spec.groups },
            window_latent_frames: spec.window_latent_frames.unwrap_or(0),
            overlap_latent_frames: spec.overlap_latent_frames,
            fusion: spec
                .fusion
                .map(|f| f.name().to_string())
                .unwrap_or_default(),
            prompt_timeline: spec.prompt_timeline.clone(),
            noise: spec.noise.map(|n| n.name().to_string()).unwrap_or_default(),
            input: spec.input.as_ref().map(JobInput::to_proto),
        }
    }
}

impl From<&JobSpec> for RenderSpec {
    fn from(spec: &JobSpec) -> Self {
        RenderSpec::from(&SpecRequest::from(spec))
    }
}

/// The video frames of `input`'s clip an extension under `windows` holds (0 without a clip).
fn held_video_frames(input: Option<&JobInput>, windows: &WindowSettings) -> u32 {
    match input {
        Some(clip) if clip.kind == InputKind::Clip => {
            match held_latent_frames(
                windows.latent_frames,
                windows.overlap,
                clip.frames,
                WAN_TEMPORAL_PACK,
            ) {
                0 => 0,
                held => (held - 1) * WAN_TEMPORAL_PACK + 1,
            }
        }
        _ => 0,
    }
}

fn check_text(field: &'static str, text: &str, max_chars: u32) -> Result<(), SpecError> {
    let chars = text.chars().count();
    if chars > max_chars as usize {
        return Err(bad(
            field,
            format!("{chars} characters is over this farm's limit of {max_chars}"),
        ));
    }
    // Prompts are shown by `status` and in logs; a control character (an escape sequence)
    // would act on the terminal that shows them. Line breaks and tabs are text.
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(bad(
            field,
            format!(
                "contains the control character {}; prompts are plain text",
                c.escape_unicode()
            ),
        ));
    }
    Ok(())
}

fn timeline_error(e: TimelineError) -> SpecError {
    bad("prompt_timeline", e.to_string())
}

fn check_timeline_limits(cues: &[PromptCue], limits: &Limits) -> Result<(), SpecError> {
    if cues.len() > limits.max_prompt_cues as usize {
        return Err(timeline_error(TimelineError::TooMany {
            count: cues.len(),
            max: limits.max_prompt_cues,
        }));
    }
    for (index, cue) in cues.iter().enumerate() {
        let chars = cue.prompt.chars().count();
        if chars > limits.max_prompt_chars as usize {
            return Err(timeline_error(TimelineError::PromptTooLong {
                index,
                at: cue.at_seconds,
                chars,
                max: limits.max_prompt_chars,
            }));
        }
        check_text("prompt_timeline", &cue.prompt, limits.max_prompt_chars)
            .map_err(|e| bad("prompt_timeline", format!("cue {index}: {}", e.message)))?;
    }
    Ok(())
}

fn at_most(field: &'static str, value: u32, max: u32) -> Result<(), SpecError> {
    if value > max {
        return Err(bad(
            field,
            format!("{value} is over this farm's limit of {max}"),
        ));
    }
    Ok(())
}

fn check_size(field: &'static str, value: u32) -> Result<(), SpecError> {
    if value == 0 || !value.is_multiple_of(SIZE_MULTIPLE) {
        return Err(bad(
            field,
            format!("{value} is not a multiple of {SIZE_MULTIPLE}"),
        ));
    }
    Ok(())
}

/// Zero means "the model's default".
fn optional_size(field: &'static str, value: u32) -> Result<Option<u32>, SpecError> {
    if value == 0 {
        return Ok(None);
    }
    check_size(field, value).map(|()| Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RenderSpec {
        RenderSpec {
            prompt: "a wolf howls at the moon".into(),
            frames: 9,
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 5.0,
            fps: 16,
            ..Default::default()
        }
    }

    fn err(spec: RenderSpec) -> String {
        SpecRequest::try_from(&spec)
            .and_then(|s| s.check_limits(&Limits::default()))
            .expect_err("spec should be refused")
            .to_string()
    }

    /// 32 new frames after an 81-frame clip, at the clip's size and rate.
    fn extension() -> RenderSpec {
        RenderSpec {
            frames: 32,
            width: 0,
            height: 0,
            fps: 0,
            input: Some(clip(81)),
            ..spec()
        }
    }

    /// A 64×64 clip of `frames` frames at 16 fps, as the coordinator read it.
    fn clip(frames: u32) -> crate::Input {
        JobInput {
            bytes: 1000,
            sha256: "ab".repeat(32),
            width: 64,
            height: 64,
            frames,
            fps: 16,
            ..JobInput::unread(InputKind::Clip)
        }
        .to_proto()
    }

    /// An extension renders the clip's last frames again, held, before its new ones: the
    /// workers' clip is longer than `frames`, the output is the clip and the new frames, it
    /// renders at the clip's size and rate, and its prompt cues count from the clip's end.
    #[test]
    fn an_extension_counts_new_frames_after_the_clip() {
        let extend = extension();
        let job = SpecRequest::try_from(&extend)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!((job.width, job.height, job.fps), (64, 64, 16));
        // windows of 9 latent frames (the model's 33 frames), overlap 3: 3 held, 9 frames
        assert_eq!(job.held_frames(), 9);
        assert_eq!(job.rendered_frames(), 41);
        assert_eq!(job.latent_frames(), 11);
        assert_eq!(job.output_frames(), 113);
        assert_eq!(job.output_frame(8), None);
        assert_eq!(job.output_frame(9), Some(81));
        assert_eq!(job.output_frame(40), Some(112));
        // its cues count from the clip's end: 1 s is the 17th new frame, rendered frame 25;
        // a cue past the last new frame (31 at 16 fps: 1.94 s) is refused
        let cue = |at_seconds: f64| PromptCue {
            at_seconds,
            prompt: "a red circle moving left".into(),
        };
        let story = SpecRequest::try_from(&RenderSpec {
            prompt_timeline: vec![cue(1.0)],
            ..extend.clone()
        })
        .unwrap()
        .resolve(&model())
        .unwrap();
        let timeline = story.timeline();
        assert_eq!(
            (
                timeline.prompt_index_at(24.0),
                timeline.prompt_index_at(25.0)
            ),
            (0, 1)
        );
        let late = SpecRequest::try_from(&RenderSpec {
            prompt_timeline: vec![cue(2.0)],
            ..extend.clone()
        })
        .unwrap()
        .resolve(&model())
        .unwrap_err()
        .to_string();
        assert!(
            late.contains("past the clip's last frame at 1.94 s"),
            "{late}"
        );
        // the spec round-trips with its input
        assert_eq!(
            SpecRequest::try_from(&RenderSpec::from(&job))
                .unwrap()
                .resolve(&model())
                .unwrap(),
            job
        );
        // new frames default to the model's clip after its first frame
        let default = SpecRequest::try_from(&RenderSpec {
            frames: 0,
            ..extend.clone()
        })
        .unwrap()
        .resolve(&model())
        .unwrap();
        assert_eq!(default.frames, 32);

        for (spec, start) in [
            (
                RenderSpec {
                    frames: 33,
                    ..extend.clone()
                },
                "spec.frames: an extension renders new frames in fours",
            ),
            (
                RenderSpec {
                    width: 128,
                    ..extend.clone()
                },
                "spec.width: 128 differs from the clip's 64",
            ),
            (
                RenderSpec {
                    fps: 24,
                    ..extend.clone()
                },
                "spec.fps: 24 differs from the clip's 16",
            ),
            (
                RenderSpec {
                    input: Some(crate::Input {
                        width: 60,
                        ..clip(81)
                    }),
                    ..extend.clone()
                },
                "spec.input: the clip is 60×64",
            ),
        ] {
            assert!(err(spec).starts_with(start), "{start}");
        }
        let unread = RenderSpec {
            input: Some(JobInput::unread(InputKind::Clip).to_proto()),
            ..extend.clone()
        };
        let e = SpecRequest::try_from(&unread)
            .unwrap()
            .resolve(&model())
            .unwrap_err()
            .to_string();
        assert!(e.contains("submit it with SubmitWithInput"), "{e}");
        let one_frame_windows = RenderSpec {
            window_latent_frames: 1,
            ..extend
        };
        let e = SpecRequest::try_from(&one_frame_windows)
            .unwrap()
            .resolve(&model())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.window_latent_frames"), "{e}");
    }

    /// An image-to-video model extends a clip from its last frame (one held frame, kept when the
    /// stored spec is resolved again against no model), needs a picture or a clip, and renders
    /// a clip longer than a window as windows; a text-to-video model takes no picture.
    #[test]
    fn the_model_decides_what_an_input_does() {
        let picture_model = ModelDescription {
            takes_picture: Some(true),
            ..model()
        };
        let extend = extension();
        let job = SpecRequest::try_from(&extend)
            .unwrap()
            .resolve(&picture_model)
            .unwrap();
        assert_eq!((job.held_frames(), job.rendered_frames()), (1, 33));
        assert_eq!(job.output_frame(1), Some(81));
        let unknown = ModelDescription {
            name: "toy".into(),
            ..Default::default()
        };
        let again = SpecRequest::try_from(&RenderSpec::from(&job))
            .unwrap()
            .resolve(&unknown)
            .unwrap();
        assert_eq!(again.held_frames(), 1, "settled when first placed");
        let text_model = ModelDescription {
            takes_picture: Some(false),
            ..model()
        };
        let held = SpecRequest::try_from(&extend)
            .unwrap()
            .resolve(&text_model)
            .unwrap()
            .held_frames();
        assert_eq!(held, 9);

        let resolve = |spec: RenderSpec, model: &ModelDescription| {
            SpecRequest::try_from(&spec)
                .unwrap()
                .resolve(model)
                .unwrap_err()
                .to_string()
        };
        let picture = JobInput {
            bytes: 10,
            sha256: "cd".repeat(32),
            width: 64,
            height: 64,
            frames: 1,
            ..JobInput::unread(InputKind::Image)
        }
        .to_proto();
        let from_picture = RenderSpec {
            input: Some(picture),
            ..spec()
        };
        let e = resolve(from_picture.clone(), &text_model);
        assert!(
            e.starts_with("spec.input: model toy is a text-to-video model"),
            "{e}"
        );
        let e = resolve(spec(), &picture_model);
        assert!(
            e.starts_with("spec.input: model toy is an image-to-video model"),
            "{e}"
        );
        // longer than a window: co-denoised as any long clip, the picture in the first window
        let long = SpecRequest::try_from(&RenderSpec {
            frames: 41,
            ..from_picture
        })
        .unwrap()
        .resolve(&picture_model)
        .unwrap();
        assert!(long.is_windowed(), "{long:?}");
    }

    /// A render from a picture takes the picture's aspect over the model's default area unless
    /// the spec sets a size; its frames follow the frame rule as any render's.
    #[test]
    fn a_picture_sets_the_size_a_spec_leaves_unset() {
        let picture = JobInput {
            bytes: 10,
            sha256: "cd".repeat(32),
            width: 1024,
            height: 512,
            frames: 1,
            fps: 0,
            ..JobInput::unread(InputKind::Image)
        }
        .to_proto();
        let from_picture = RenderSpec {
            width: 0,
            height: 0,
            input: Some(picture),
            ..spec()
        };
        let job = SpecRequest::try_from(&from_picture)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!((job.width, job.height), (64, 32));
        assert_eq!((job.rendered_frames(), job.output_frames()), (9, 9));
        let sized = RenderSpec {
            width: 64,
            height: 64,
            ..from_picture
        };
        let job = SpecRequest::try_from(&sized)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!((job.width, job.height), (64, 64));
    }

    fn model() -> ModelDescription {
        ModelDescription {
            takes_picture: None,
            name: "toy".into(),
            default_width: 64,
            default_height: 48,
            default_steps: 4,
            default_frames: 33,
            default_fps: 12,
            attention_heads: 4,
            ffn_dim: 128,
        }
    }

    #[test]
    fn a_good_spec_passes_and_gets_the_default_model() {
        let request = SpecRequest::try_from(&spec()).unwrap();
        request.check_limits(&Limits::default()).unwrap();
        assert_eq!(request.model, "toy");
        assert_eq!(request.layout, Layout::SINGLE);
        assert_eq!(request.scheduler, None);
        assert_eq!(request.format, OutputFormat::Mp4);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(RenderSpec, &str)> = vec![
            (RenderSpec { prompt: "  ".into(), ..spec() }, "spec.prompt: must not be empty"),
            (
                RenderSpec { frames: 80, ..spec() },
                "spec.frames: 80 is not 4k+1 (the VAE packs 4 frames per latent frame after the first; use 81)",
            ),
            (
                RenderSpec { frames: 2001, ..spec() },
                "spec.frames: 2001 is over this farm's limit of 1441",
            ),
            (RenderSpec { width: 250, ..spec() }, "spec.width: 250 is not a multiple of 16"),
            (RenderSpec { height: 72, ..spec() }, "spec.height: 72 is not a multiple of 16"),
            (
                RenderSpec { width: 4096, ..spec() },
                "spec.width: 4096 is over this farm's limit of 1920",
            ),
            (
                RenderSpec { steps: 201, ..spec() },
                "spec.steps: 201 is over this farm's limit of 200",
            ),
            (
                RenderSpec { guidance_scale: -1.0, ..spec() },
                "spec.guidance_scale: -1 is not a finite number",
            ),
            (
                RenderSpec { guidance_scale: f64::NAN, ..spec() },
                "spec.guidance_scale: NaN",
            ),
            (
                RenderSpec { shift: Some(0.0), ..spec() },
                "spec.shift: 0 is not a positive number",
            ),
            (
                RenderSpec { scheduler: "x".into(), ..spec() },
                "spec.scheduler: \"x\" is not unipc or euler",
            ),
            (RenderSpec { format: 7, ..spec() }, "spec.format: 7 is not mp4 (0) or png (1)"),
            (RenderSpec { layout: "tp=two".into(), ..spec() }, "spec.layout: layout `tp=two`"),
            (RenderSpec { layout: "cfg=3".into(), ..spec() }, "spec.layout: cfg = 3"),
            (
                RenderSpec { layout: "cfg=2".into(), guidance_scale: 1.0, ..spec() },
                "spec.layout: cfg = 2 needs classifier-free guidance",
            ),
            (
                RenderSpec { layout: "tp=8,ulysses=16".into(), ..spec() },
                "spec.layout: cfg=1,tp=8,ulysses=16,ring=1 needs 128 ranks, over this farm's limit of 64",
            ),
            (
                RenderSpec { prompt: "x".repeat(4001), ..spec() },
                "spec.prompt: 4001 characters is over this farm's limit of 4000",
            ),
            (
                RenderSpec { negative_prompt: "é".repeat(4001), ..spec() },
                "spec.negative_prompt: 4001 characters is over this farm's limit of 4000",
            ),
            (RenderSpec { fusion: "smooth".into(), ..spec() }, "spec.fusion: \"smooth\" is not linear or cosine"),
            (
                RenderSpec { layout: "ulysses=4".into(), groups: 17, ..spec() },
                "spec.groups: 17 groups of 4 rank(s) (cfg=1,tp=1,ulysses=4,ring=1) need 68 ranks, over this farm's limit of 64",
            ),
        ];
        for (spec, want) in cases {
            let got = err(spec);
            assert!(
                got.starts_with(want),
                "got {got:?}, want it to start with {want:?}"
            );
        }
    }

    #[test]
    fn a_prompt_timeline_round_trips_and_bad_cues_name_the_field() {
        let cue = |at: f64, prompt: &str| PromptCue {
            at_seconds: at,
            prompt: prompt.into(),
        };
        let story = RenderSpec {
            frames: 161, // 10 s at 16 fps
            prompt_timeline: vec![cue(5.0, "a red circle moving left")],
            ..spec()
        };
        let resolved = SpecRequest::try_from(&story)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(resolved.prompt_timeline, story.prompt_timeline);
        let again = SpecRequest::try_from(&RenderSpec::from(&resolved))
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(again, resolved);
        let timeline = resolved.timeline();
        let prompts = timeline.window_prompts(&resolved.window_plan().unwrap(), 4);
        assert_eq!(prompts.first(), Some(&0));
        assert_eq!(prompts.last(), Some(&1));

        let request = |cues| {
            SpecRequest::try_from(&RenderSpec {
                prompt_timeline: cues,
                ..story.clone()
            })
        };
        assert_eq!(
            request(vec![cue(5.0, "a"), cue(2.0, "b")])
                .unwrap_err()
                .to_string(),
            "spec.prompt_timeline: cue 1 at 2 s does not come after cue 0 at 5 s: give the cues \
             in time order, one per time"
        );
        assert_eq!(
            request(vec![cue(12.0, "a")])
                .unwrap()
                .resolve(&model())
                .unwrap_err()
                .to_string(),
            "spec.prompt_timeline: cue 0 at 12 s is past the clip's last frame at 10.00 s (161 \
             frames at 16 fps): make the clip longer or the cue earlier"
        );
        let limits = Limits {
            max_prompt_cues: 1,
            ..Limits::default()
        };
        let two = request(vec![cue(1.0, "a"), cue(2.0, "b")]).unwrap();
        assert_eq!(
            two.check_limits(&limits).unwrap_err().to_string(),
            "spec.prompt_timeline: 2 cues is over this farm's limit of 1"
        );
        let long = request(vec![cue(1.0, &"x".repeat(4001))]).unwrap();
        assert_eq!(
            long.check_limits(&Limits::default()).unwrap_err().field,
            "prompt_timeline"
        );
    }

    #[test]
    fn a_long_clip_is_cut_into_the_model_s_windows_and_bad_cuts_name_their_field() {
        let long = RenderSpec {
            frames: 161, // 41 latent frames; the model's window is 9 (33 frames)
            groups: 2,
            ..spec()
        };
        let resolved = SpecRequest::try_from(&long)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(
            resolved.windows,
            WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion: Fusion::Linear,
                groups: 2,
                noise: Default::default(),
            }
        );
        let plan = resolved.window_plan().unwrap();
        assert_eq!(plan.windows().len(), 7);
        assert_eq!(plan.group_count(), 2);
        // resolved specs round-trip through the wire with every window field set
        let wire = RenderSpec::from(&resolved);
        assert_eq!((wire.groups, wire.window_latent_frames), (2, 9));
        let one_window = RenderSpec {
            frames: 33,
            ..spec()
        };
        let plain = SpecRequest::try_from(&one_window)
            .unwrap()
            .resolve(&model())
            .unwrap();
        let wire_plain = RenderSpec::from(&plain);
        assert_eq!(
            (
                wire_plain.groups,
                wire_plain.window_latent_frames,
                wire_plain.overlap_latent_frames
            ),
            (0, 0, None),
            "a clip of one window shows no window settings"
        );
        assert_eq!(
            SpecRequest::try_from(&wire_plain)
                .unwrap()
                .resolve(&model())
                .unwrap(),
            plain
        );
        assert_eq!(
            (wire.overlap_latent_frames, wire.fusion.as_str()),
            (Some(3), "linear")
        );
        let again = SpecRequest::try_from(&wire)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(again, resolved);
        assert_eq!(wire.noise, "rescheduled");
        let independent = SpecRequest::try_from(&RenderSpec {
            noise: "independent".into(),
            ..long.clone()
        })
        .unwrap()
        .resolve(&model())
        .unwrap();
        assert_eq!(independent.windows.noise, NoiseSchedule::Independent);
        assert_eq!(
            SpecRequest::try_from(&RenderSpec {
                noise: "fresh".into(),
                ..long.clone()
            })
            .unwrap_err()
            .to_string(),
            "spec.noise: \"fresh\" is not independent or rescheduled"
        );
        assert_eq!(resolved.ranks(), 2);

        let refused = |spec: RenderSpec| {
            SpecRequest::try_from(&spec)
                .unwrap()
                .resolve(&model())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(RenderSpec { overlap_latent_frames: Some(5), ..long.clone() }),
            "spec.overlap_latent_frames: 5 is more than half the window (9 latent frames); use at most 4"
        );
        assert!(refused(RenderSpec {
            groups: 8,
            ..long.clone()
        })
        .starts_with("spec.groups: 8 groups for a clip of 7 window(s)"));
        assert!(refused(RenderSpec {
            frames: 33,
            ..long.clone()
        })
        .starts_with("spec.groups: 2 groups for a clip of 1 window(s)"));
        // a clip of one window is a plain render, whatever the window settings
        let short = RenderSpec {
            frames: 33,
            overlap_latent_frames: Some(0),
            ..spec()
        };
        let plan = SpecRequest::try_from(&short)
            .unwrap()
            .resolve(&model())
            .unwrap()
            .window_plan();
        assert!(plan.unwrap().is_single_window());
        // windows of the spec's own length
        let own = RenderSpec {
            window_latent_frames: 21,
            overlap_latent_frames: Some(5),
            ..long
        };
        let own = SpecRequest::try_from(&own)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(own.window_plan().unwrap().windows().len(), 3);
    }

    #[test]
    fn zero_size_and_steps_wait_for_the_model() {
        let bare = RenderSpec {
            width: 0,
            height: 0,
            steps: 0,
            ..spec()
        };
        let request = SpecRequest::try_from(&bare).unwrap();
        request.check_limits(&Limits::default()).unwrap();
        assert_eq!(
            (request.width, request.height, request.steps),
            (None, None, None)
        );
        let resolved = request.resolve(&model()).unwrap();
        assert_eq!(
            (resolved.width, resolved.height, resolved.steps),
            (64, 48, 4)
        );

        let small = Limits {
            max_steps: 2,
            ..Limits::default()
        };
        let e = resolved.check_limits(&small).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.steps: 4 is over this farm's limit of 2"
        );

        let no_default = ModelDescription {
            default_width: 0,
            ..model()
        };
        let e = request.resolve(&no_default).unwrap_err();
        assert_eq!(e.field, "width");

        let split = SpecRequest::try_from(&RenderSpec {
            layout: "tp=3".into(),
            ..spec()
        })
        .unwrap();
        let e = split.resolve(&model()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.layout: tp × ulysses = 3 does not divide the 4 attention heads"),
            "{e}"
        );
        let ffn = ModelDescription {
            ffn_dim: 30,
            attention_heads: 8,
            ..model()
        };
        let e = SpecRequest::try_from(&RenderSpec {
            layout: "tp=4".into(),
            ..spec()
        })
        .unwrap()
        .resolve(&ffn)
        .unwrap_err();
        assert!(e.to_string().contains("ffn_dim = 30"), "{e}");
    }

    #[test]
    fn zero_frames_and_fps_take_the_models_or_wan21s() {
        let bare = RenderSpec {
            frames: 0,
            fps: 0,
            ..spec()
        };
        let request = SpecRequest::try_from(&bare).unwrap();
        assert_eq!((request.frames, request.fps), (None, None));
        request.check_limits(&Limits::default()).unwrap();
        let resolved = request.resolve(&model()).unwrap();
        assert_eq!((resolved.frames, resolved.fps), (33, 12));
        assert_eq!(resolved.latent_frames(), 9);

        // A worker that states no clip: Wan2.1's 5 s at 16 fps, as before models stated one.
        let silent = ModelDescription {
            default_frames: 0,
            default_fps: 0,
            ..model()
        };
        let resolved = request.resolve(&silent).unwrap();
        assert_eq!(
            (resolved.frames, resolved.fps),
            (WAN21_DEFAULT_FRAMES, WAN21_DEFAULT_FPS)
        );

        // A spec's own values win over the model's.
        let set = SpecRequest::try_from(&RenderSpec {
            frames: 0,
            fps: 24,
            ..spec()
        })
        .unwrap()
        .resolve(&model())
        .unwrap();
        assert_eq!((set.frames, set.fps), (33, 24));

        // The resolved default is checked against the farm's limits like a spec's own count.
        let short = Limits {
            max_frames: 17,
            ..Limits::default()
        };
        let e = request
            .resolve(&model())
            .unwrap()
            .check_limits(&short)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.frames: 33 is over this farm's limit of 17"
        );

        let broken = ModelDescription {
            default_frames: 32,
            ..model()
        };
        let e = request.resolve(&broken).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.frames: model toy's default frame count: 32 is not 4k+1"),
            "{e}"
        );
    }

    #[test]
    fn a_resolved_spec_round_trips_through_the_wire() {
        let wire = RenderSpec {
            width: 0,
            scheduler: "euler".into(),
            layout: "ulysses=2, cfg=2".into(),
            shift: Some(3.0),
            format: OutputFormat::Png as i32,
            ..spec()
        };
        let job = SpecRequest::try_from(&wire)
            .unwrap()
            .resolve(&model())
            .unwrap();
        let back = RenderSpec::from(&job);
        assert_eq!(back.width, 64);
        assert_eq!(back.layout, "cfg=2,tp=1,ulysses=2,ring=1");
        assert_eq!(back.scheduler, "euler");
        let again = SpecRequest::try_from(&back)
            .unwrap()
            .resolve(&model())
            .unwrap();
        assert_eq!(again, job);
        assert_eq!(job.latent_frames(), 3);
    }
}
