//! Parity checks against reference fixtures made by the PyTorch implementation.
//!
//! A fixture directory is laid out like `shared/reference/wan-tiny/`: `pipeline/` is a checkpoint
//! in the diffusers layout and `cases/` holds inputs and reference outputs (see that directory's
//! README). [`check_fixture`] runs every case and reports one [`CaseResult`] per comparison; the
//! `longtake check-reference` command and the parity tests both use it, so what the CLI prints is
//! exactly what the tests assert.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip_vision::{self, ClipVisionEncoder};
use super::compare::relative_l2;
use super::denoiser::{Conditioning, Denoiser};
use super::family::ModelFamily;
use super::loader::{read_json, Checkpoint, SafetensorsWeights};
use super::render::CancelToken;
use super::render::RenderSpec;
use super::scheduler::{self, SchedulerKind};
use super::text::PromptEncoder;
use super::tokenizer::PromptTokenizer;
use super::umt5::{self, UMT5EncoderModel};
use super::video;
use crate::families::wan::image_to_video::{
    first_frame, first_frame_condition, ImageConditioned, ImageProcessorConfig,
};
use crate::families::wan::pipeline::WanPipeline;
use crate::families::wan::transformer::{self as wan_transformer, WanTransformer3DModel};
use crate::families::wan::vae::{self as wan_vae, WanVaeDecoder};
use crate::families::wan::vae_encoder::WanVaeEncoder;

/// Tolerance on the relative L2 error of a single module in f32.
pub const MODULE_TOLERANCE: f64 = 1e-4;
/// Tolerance on the relative L2 error of the whole pipeline in f32.
pub const PIPELINE_TOLERANCE: f64 = 1e-3;

/// The relative L2 errors a precision is held to against the f32 PyTorch reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// One module (text encoder, transformer, VAE decode, a scheduler's steps).
    pub module: f64,
    /// The whole pipeline: prompt to latents to frames, every step's rounding compounded.
    pub pipeline: f64,
}

impl Tolerances {
    /// f32 matches PyTorch up to summation order. bf16 keeps 8 bits of mantissa (a relative
    /// rounding of 2⁻⁹ ≈ 2e-3 per value): a module is held to 5e-2, which the deepest one, the
    /// VAE decoder (some thirty convolutions, each rounding its input), needs (2.4e-2 measured on
    /// `wan-tiny` on the CPU), and the pipeline to 1e-1 (the steps compound). f16 has 11 bits and
    /// is held to a fifth of that.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self {
                module: 5e-2,
                pipeline: 1e-1,
            },
            DType::F16 => Self {
                module: 1e-2,
                pipeline: 2e-2,
            },
            _ => Self {
                module: MODULE_TOLERANCE,
                pipeline: PIPELINE_TOLERANCE,
            },
        }
    }
}

/// A fixture's `cases/pipeline.json`: the settings of the reference pipeline run.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct PipelineCase {
    prompt: String,
    negative_prompt: String,
    height: usize,
    width: usize,
    num_frames: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    pub(crate) max_sequence_length: usize,
}

impl PipelineCase {
    /// Reads `cases/pipeline.json` of the fixture directory `dir`.
    pub(crate) fn read(dir: &Path) -> Result<Self, super::loader::LoadError> {
        read_json(&dir.join("cases/pipeline.json"))
    }

    /// The render the reference ran. Its noise is given as initial latents, so the seed is
    /// unused.
    pub(crate) fn render(&self) -> RenderSpec {
        RenderSpec {
            input: None,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            frames: self.num_frames,
            width: self.width,
            height: self.height,
            steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            shift: None,
            scheduler: None,
            seed: 0,
            windows: None,
            timeline: Default::default(),
        }
    }
}

/// The outcome of one comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// e.g. `transformer` or `pipeline/video`.
    pub case: String,
    /// Relative L2 error (for the tokenizer: the fraction of ids that differ). `None` when the
    /// case could not run.
    pub error: Option<f64>,
    pub tolerance: f64,
    /// Why the case could not run, or extra detail.
    pub note: Option<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        matches!(self.error, Some(e) if e <= self.tolerance)
    }

    fn measured(case: &str, error: f64, tolerance: f64) -> Self {
        Self {
            case: case.into(),
            error: Some(error),
            tolerance,
            note: None,
        }
    }

    fn failed(case: &str, tolerance: f64, why: impl std::fmt::Display) -> Self {
        Self {
            case: case.into(),
            error: None,
            tolerance,
            note: Some(why.to_string()),
        }
    }
}

impl std::fmt::Display for CaseResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        match self.error {
            Some(e) => write!(
                f,
                "{verdict}  {:<28} rel_l2 {e:.3e}  (tolerance {:.0e})",
                self.case, self.tolerance
            )?,
            None => write!(f, "{verdict}  {:<28} did not run", self.case)?,
        }
        if let Some(note) = &self.note {
            write!(f, "  {note}")?;
        }
        Ok(())
    }
}

/// True when `dir` looks like a fixture directory.
pub fn is_fixture_dir(dir: &Path) -> bool {
    dir.join("pipeline").is_dir() && dir.join("cases").is_dir()
}

/// The fixture directories at `root`: `root` itself if it is one, otherwise its sub-directories
/// that are, sorted by name.
pub fn find_fixture_dirs(root: &Path) -> Vec<PathBuf> {
    if is_fixture_dir(root) {
        return vec![root.to_path_buf()];
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| is_fixture_dir(p))
        .collect();
    dirs.sort();
    dirs
}

/// The built-in toy model's checkpoint as committed (`worker/toy/model`): the trained model the
/// structural tests (loading, every parallel layout) run on beside the fixtures. The binary
/// embeds these files (`model::builtin`).
pub fn toy_checkpoint_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("toy/model")
}

/// The text-to-video fixture directories of [`all_fixture_dirs`]: what the text-to-video
/// parity and layout tests run on. The image-to-video ones are in [`parity_fixture_dirs`]; the
/// others are checked to be refused by name
/// (`family::tests::every_fixture_is_run_or_refused_by_name`).
pub fn test_fixture_dirs() -> Vec<PathBuf> {
    all_fixture_dirs()
        .into_iter()
        .filter(|dir| fixture_kind(dir) == Ok(FixtureKind::TextToVideo))
        .collect()
}

/// Every fixture [`check_fixture`] runs: those of [`test_fixture_dirs`] and the image-to-video
/// ones.
pub fn parity_fixture_dirs() -> Vec<PathBuf> {
    all_fixture_dirs()
        .into_iter()
        .filter(|dir| fixture_kind(dir).is_ok())
        .collect()
}

/// What a fixture directory holds, as far as its checks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FixtureKind {
    /// Wan2.1 text-to-video.
    TextToVideo,
    /// Wan2.1 image-to-video (`WanImageToVideoPipeline`, the Wan2.1 VAE): its model parts and
    /// its whole run.
    ImageToVideo,
}

/// The kind of the fixture in `dir`, or why none of its cases can run (its family is refused).
fn fixture_kind(dir: &Path) -> Result<FixtureKind, String> {
    let checkpoint = Checkpoint::open(dir.join("pipeline")).map_err(msg)?;
    match ModelFamily::of(&checkpoint) {
        Ok(ModelFamily::Wan21TextToVideo) => Ok(FixtureKind::TextToVideo),
        Ok(ModelFamily::Wan21ImageToVideo) => Ok(FixtureKind::ImageToVideo),
        Err(why) => Err(why.to_string()),
    }
}

/// The fixture directories the test suite checks: the fixtures in each entry of
/// `LONGTAKE_REFERENCE_DIR` (a path list, `:`-separated) or, by default, in `shared/reference`
/// beside the repository and in the repository's own `tests/fixtures`.
///
/// Panics when there is none: a parity test that checks nothing must not pass.
pub fn all_fixture_dirs() -> Vec<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let roots: Vec<PathBuf> = match std::env::var_os("LONGTAKE_REFERENCE_DIR") {
        Some(list) => std::env::split_paths(&list).collect(),
        None => vec![
            repo.join("../shared/reference"),
            repo.join("tests/fixtures"),
        ],
    };
    // Every root named must hold fixtures: a missing shared/reference must not let the parity
    // tests pass on the repository's own fixture alone.
    let mut dirs = Vec::new();
    for root in &roots {
        let found = find_fixture_dirs(root);
        assert!(
            !found.is_empty(),
            "no reference fixtures (directories with pipeline/ and cases/) in {}: put shared/reference \
             beside the repository or set LONGTAKE_REFERENCE_DIR",
            root.display()
        );
        dirs.extend(found);
    }
    dirs
}

type CaseOutcome = Result<Vec<CaseResult>, String>;
/// A case: its name, its tolerance and the function that runs it.
type Case = (&'static str, f64, fn(&Fixture) -> CaseOutcome);

/// Runs every case of one fixture directory on `device` with weights and activations in `dtype`,
/// each against the f32 reference within [`Tolerances::for_dtype`]. Schedulers and the text
/// encoder run in f32 whatever `dtype` is, as the pipeline runs them.
pub fn check_fixture(dir: &Path, device: &Device, dtype: DType) -> Vec<CaseResult> {
    // A fixture of a family this build does not run fails as one named case, not as a list of
    // cases that each stumble on a missing file.
    let kind = match fixture_kind(dir) {
        Ok(kind) => kind,
        Err(why) => return vec![CaseResult::failed("model family", 0.0, why)],
    };
    let tolerances = Tolerances::for_dtype(dtype);
    let image_to_video: [Case; 4] = [
        ("vae_encode", tolerances.module, Fixture::vae_encode),
        ("image_encoder", tolerances.module, Fixture::image_encoder),
        (
            "transformer",
            tolerances.module,
            Fixture::transformer_with_image,
        ),
        ("pipeline", tolerances.pipeline, Fixture::image_to_video),
    ];
    let text_to_video: [Case; 8] = [
        ("tokenizer", 0.0, Fixture::tokenizer),
        ("text_encoder", MODULE_TOLERANCE, Fixture::text_encoder),
        ("transformer", tolerances.module, Fixture::transformer),
        ("vae_decode", tolerances.module, Fixture::vae_decode),
        ("vae_encode", tolerances.module, Fixture::vae_encode),
        (
            "scheduler_unipc",
            MODULE_TOLERANCE,
            Fixture::scheduler_unipc,
        ),
        (
            "scheduler_euler",
            MODULE_TOLERANCE,
            Fixture::scheduler_euler,
        ),
        ("pipeline", tolerances.pipeline, Fixture::pipeline),
    ];
    let cases: &[Case] = match kind {
        FixtureKind::TextToVideo => &text_to_video,
        FixtureKind::ImageToVideo => &image_to_video,
    };
    let fixture = Fixture {
        dir: dir.to_path_buf(),
        device: device.clone(),
        dtype,
        tolerances,
    };
    let mut results = Vec::new();
    for &(name, tolerance, run) in cases {
        match run(&fixture) {
            Ok(r) => results.extend(r),
            Err(why) => results.push(CaseResult::failed(name, tolerance, why)),
        }
    }
    results
}

struct Fixture {
    dir: PathBuf,
    device: Device,
    /// The weights' and activations' dtype of the transformer and the VAE.
    dtype: DType,
    tolerances: Tolerances,
}

fn msg<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl Fixture {
    fn pipeline_dir(&self) -> PathBuf {
        self.dir.join("pipeline")
    }

    fn case(&self, file: &str) -> Result<SafetensorsWeights, String> {
        SafetensorsWeights::open_file(self.dir.join("cases").join(file)).map_err(msg)
    }

    fn tensor(&self, case: &SafetensorsWeights, name: &str) -> Result<Tensor, String> {
        case.load(name, &self.device)
            .map_err(msg)?
            .to_dtype(DType::F32)
            .map_err(msg)
    }

    /// An input of the transformer or the VAE, in the dtype they run in.
    fn model_input(&self, case: &SafetensorsWeights, name: &str) -> Result<Tensor, String> {
        self.tensor(case, name)?.to_dtype(self.dtype).map_err(msg)
    }

    fn checkpoint(&self) -> Result<Checkpoint, String> {
        Checkpoint::open(self.pipeline_dir()).map_err(msg)
    }

    fn tokenizer(&self) -> CaseOutcome {
        #[derive(serde::Deserialize)]
        struct Cases {
            max_length: usize,
            cases: Vec<Case>,
        }
        #[derive(serde::Deserialize)]
        struct Case {
            text: String,
            input_ids: Vec<u32>,
            attention_mask: Vec<u32>,
        }
        let cases: Cases = read_json(&self.dir.join("cases/tokenizer.json")).map_err(msg)?;
        let tokenizer =
            PromptTokenizer::from_file(self.pipeline_dir().join("tokenizer/tokenizer.json"))
                .map_err(msg)?;
        if cases.cases.is_empty() {
            return Err(format!(
                "{}: no tokenizer cases; a fixture must compare at least one text",
                self.dir.join("cases/tokenizer.json").display()
            ));
        }
        let (mut wrong, mut total) = (0usize, 0usize);
        let mut first_bad = None;
        for case in &cases.cases {
            let got = tokenizer
                .encode(&case.text, cases.max_length)
                .map_err(msg)?;
            let bad = got.ids.len().abs_diff(case.input_ids.len())
                + got
                    .ids
                    .iter()
                    .zip(&case.input_ids)
                    .filter(|(a, b)| a != b)
                    .count()
                + got
                    .attention_mask
                    .iter()
                    .zip(&case.attention_mask)
                    .filter(|(a, b)| a != b)
                    .count();
            if bad > 0 && first_bad.is_none() {
                first_bad = Some(case.text.clone());
            }
            wrong += bad;
            total += case.input_ids.len() + case.attention_mask.len();
        }
        let mut result = CaseResult::measured("tokenizer", wrong as f64 / total.max(1) as f64, 0.0);
        result.note = Some(match first_bad {
            Some(text) => format!("{} cases, first mismatch on {text:?}", cases.cases.len()),
            None => format!("{} cases, ids and masks exact", cases.cases.len()),
        });
        Ok(vec![result])
    }

    fn text_encoder(&self) -> CaseOutcome {
        let case = self.case("text_encoder.safetensors")?;
        let component = self.checkpoint()?.component("text_encoder").map_err(msg)?;
        let config: umt5::Config = component.config().map_err(msg)?;
        let model = UMT5EncoderModel::new(
            &config,
            component
                .var_builder(DType::F32, &self.device)
                .map_err(msg)?,
        )
        .map_err(msg)?;
        let ids = case
            .load("input_ids", &self.device)
            .map_err(msg)?
            .to_dtype(DType::U32)
            .map_err(msg)?;
        let mask = case
            .load("attention_mask", &self.device)
            .map_err(msg)?
            .to_dtype(DType::U32)
            .map_err(msg)?;
        let ours = model.forward(&ids, &mask).map_err(msg)?;
        let reference = self.tensor(&case, "last_hidden_state")?;
        Ok(vec![CaseResult::measured(
            "text_encoder",
            relative_l2(&ours, &reference).map_err(msg)?,
            MODULE_TOLERANCE,
        )])
    }

    fn transformer_model(&self) -> Result<WanTransformer3DModel, String> {
        let component = self.checkpoint()?.component("transformer").map_err(msg)?;
        let config: wan_transformer::Config = component.config().map_err(msg)?;
        WanTransformer3DModel::new(
            &config,
            component
                .var_builder(self.dtype, &self.device)
                .map_err(msg)?,
        )
        .map_err(msg)
    }

    fn transformer(&self) -> CaseOutcome {
        let case = self.case("transformer.safetensors")?;
        let model = self.transformer_model()?;
        let ours = model
            .forward(
                &self.model_input(&case, "hidden_states")?,
                &self.tensor(&case, "timestep")?,
                &self.model_input(&case, "encoder_hidden_states")?,
            )
            .map_err(msg)?;
        let reference = self.tensor(&case, "output")?;
        Ok(vec![CaseResult::measured(
            "transformer",
            relative_l2(&ours, &reference).map_err(msg)?,
            self.tolerances.module,
        )])
    }

    /// An image-to-video transformer's output for the latents with the condition's channels
    /// and the image embedding.
    fn transformer_with_image(&self) -> CaseOutcome {
        let case = self.case("transformer.safetensors")?;
        let ours = self
            .transformer_model()?
            .forward_with_image(
                &self.model_input(&case, "hidden_states")?,
                &self.tensor(&case, "timestep")?,
                &self.model_input(&case, "encoder_hidden_states")?,
                &self.model_input(&case, "encoder_hidden_states_image")?,
            )
            .map_err(msg)?;
        Ok(vec![CaseResult::measured(
            "transformer",
            relative_l2(&ours, &self.tensor(&case, "output")?).map_err(msg)?,
            self.tolerances.module,
        )])
    }

    fn image_encoder_model(&self) -> Result<ClipVisionEncoder, String> {
        let component = self.checkpoint()?.component("image_encoder").map_err(msg)?;
        let config: clip_vision::Config = component.config().map_err(msg)?;
        ClipVisionEncoder::new(
            &config,
            component
                .var_builder(self.dtype, &self.device)
                .map_err(msg)?,
        )
        .map_err(msg)
    }

    /// The CLIP tower's penultimate hidden states for preprocessed pixels.
    fn image_encoder(&self) -> CaseOutcome {
        let case = self.case("image_encoder.safetensors")?;
        let ours = self
            .image_encoder_model()?
            .penultimate_hidden_states(&self.tensor(&case, "pixel_values")?)
            .map_err(msg)?;
        Ok(vec![CaseResult::measured(
            "image_encoder",
            relative_l2(&ours, &self.tensor(&case, "image_embeds")?).map_err(msg)?,
            self.tolerances.module,
        )])
    }

    fn vae_encoder_model(&self) -> Result<(wan_vae::Config, WanVaeEncoder), String> {
        let component = self.checkpoint()?.component("vae").map_err(msg)?;
        let config: wan_vae::Config = component.config().map_err(msg)?;
        let encoder = WanVaeEncoder::new(
            &config,
            component
                .var_builder(self.dtype, &self.device)
                .map_err(msg)?,
        )
        .map_err(msg)?;
        Ok((config, encoder))
    }

    /// The whole image-to-video run: the prompts' embeddings, the picture's CLIP embedding and
    /// first-frame condition computed here, the denoising from the case's noise (each step's
    /// latents), and the decoded video.
    fn image_to_video(&self) -> CaseOutcome {
        let spec = PipelineCase::read(&self.dir).map_err(msg)?;
        let render = spec.render();
        let case = self.case("pipeline.safetensors")?;
        let checkpoint = self.checkpoint()?;
        let module = self.tolerances.module;
        let mut results = Vec::new();
        let mut measure = |name: &'static str, ours: &Tensor, reference: &str, tolerance: f64| {
            let err = relative_l2(ours, &self.tensor(&case, reference)?).map_err(msg)?;
            results.push(CaseResult::measured(name, err, tolerance));
            Ok::<_, String>(())
        };

        let text = PromptEncoder::load(
            &checkpoint,
            spec.max_sequence_length,
            DType::F32,
            &self.device,
        )
        .map_err(msg)?;
        let both = text
            .encode(&[&render.prompt, &render.negative_prompt])
            .map_err(msg)?;
        let (cond, uncond) = (
            both.narrow(0, 0, 1).map_err(msg)?,
            both.narrow(0, 1, 1).map_err(msg)?,
        );
        measure(
            "pipeline/prompt_embeds",
            &cond,
            "prompt_embeds",
            MODULE_TOLERANCE,
        )?;
        measure(
            "pipeline/negative_embeds",
            &uncond,
            "negative_prompt_embeds",
            MODULE_TOLERANCE,
        )?;

        let image = self.tensor(&case, "image")?;
        let processor: ImageProcessorConfig = read_json(
            &self
                .pipeline_dir()
                .join("image_processor/preprocessor_config.json"),
        )
        .map_err(msg)?;
        let pixels = processor.pixel_values(&image).map_err(msg)?;
        let image_embeds = self
            .image_encoder_model()?
            .penultimate_hidden_states(&pixels)
            .map_err(msg)?;
        measure(
            "pipeline/image_embeds",
            &image_embeds,
            "image_embeds",
            module,
        )?;

        let (vae_config, encoder) = self.vae_encoder_model()?;
        let frame = first_frame(&image, render.height, render.width).map_err(msg)?;
        let condition =
            first_frame_condition(&encoder, &vae_config, &frame, render.frames).map_err(msg)?;
        measure("pipeline/condition", &condition, "condition", module)?;

        let transformer = self.transformer_model()?;
        let model = ImageConditioned {
            transformer: &transformer,
            condition: condition.to_dtype(self.dtype).map_err(msg)?,
            image_embeds: image_embeds.to_dtype(self.dtype).map_err(msg)?,
        };
        let scheduler_config: serde_json::Value =
            read_json(&self.pipeline_dir().join("scheduler/scheduler_config.json")).map_err(msg)?;
        let scheduler =
            scheduler::build(&scheduler_config, None, render.steps, render.shift).map_err(msg)?;
        let mut denoiser = Denoiser::new(
            scheduler,
            self.tensor(&case, "initial_latents")?,
            self.dtype,
        )
        .map_err(msg)?;
        let conditioning = Conditioning::new(
            &cond.to_dtype(self.dtype).map_err(msg)?,
            &uncond.to_dtype(self.dtype).map_err(msg)?,
            render.guidance_scale,
        )
        .map_err(msg)?;
        denoiser
            .run_to_end(
                &model,
                &conditioning,
                &CancelToken::default(),
                &mut |_| {},
                &mut |_| Ok(()),
            )
            .map_err(msg)?;
        let latents = denoiser.into_latents();
        measure(
            "pipeline/final_latents",
            &latents,
            "final_latents",
            self.tolerances.pipeline,
        )?;
        let decoder = self.vae_model()?;
        let decoded = decoder
            .decode(
                &vae_config
                    .unnormalize_latents(&latents.to_dtype(self.dtype).map_err(msg)?)
                    .map_err(msg)?,
            )
            .map_err(msg)?;
        let video = video::video_to_unit_frames(&decoded).map_err(msg)?;
        measure("pipeline/video", &video, "video", self.tolerances.pipeline)?;
        Ok(results)
    }

    fn vae_model(&self) -> Result<WanVaeDecoder, String> {
        let component = self.checkpoint()?.component("vae").map_err(msg)?;
        let config: wan_vae::Config = component.config().map_err(msg)?;
        WanVaeDecoder::new(
            &config,
            component
                .var_builder(self.dtype, &self.device)
                .map_err(msg)?,
        )
        .map_err(msg)
    }

    fn vae_decode(&self) -> CaseOutcome {
        let case = self.case("vae_decode.safetensors")?;
        let ours = self
            .vae_model()?
            .decode(&self.model_input(&case, "z")?)
            .map_err(msg)?;
        let reference = self.tensor(&case, "video")?;
        Ok(vec![CaseResult::measured(
            "vae_decode",
            relative_l2(&ours, &reference).map_err(msg)?,
            self.tolerances.module,
        )])
    }

    /// The encoder's mean and log-variance, where the fixture has an encoder case (those made
    /// for image-to-video; a text-to-video fixture has none, and nothing is checked).
    fn vae_encode(&self) -> CaseOutcome {
        if !self.dir.join("cases/vae_encode.safetensors").is_file() {
            return Ok(Vec::new());
        }
        let case = self.case("vae_encode.safetensors")?;
        let (_, encoder) = self.vae_encoder_model()?;
        let ours = encoder
            .encode(&self.model_input(&case, "video")?)
            .map_err(msg)?;
        [
            ("vae_encode mean", &ours.mean, "mean"),
            ("vae_encode logvar", &ours.logvar, "logvar"),
        ]
        .into_iter()
        .map(|(name, got, reference)| {
            let reference = self.tensor(&case, reference)?;
            let err =
                relative_l2(&got.to_dtype(DType::F32).map_err(msg)?, &reference).map_err(msg)?;
            Ok(CaseResult::measured(name, err, self.tolerances.module))
        })
        .collect()
    }

    fn scheduler_case(
        &self,
        name: &str,
        file: &str,
        config: PathBuf,
        kind: SchedulerKind,
    ) -> CaseOutcome {
        let case = self.case(file)?;
        let config: serde_json::Value = read_json(&config).map_err(msg)?;
        let steps = case
            .names()
            .filter(|n| n.starts_with("model_output_"))
            .count();
        let mut scheduler = scheduler::build(&config, Some(kind), steps, None).map_err(msg)?;
        let timesteps = Tensor::new(
            scheduler
                .timesteps()
                .iter()
                .map(|&t| t as f32)
                .collect::<Vec<_>>(),
            &self.device,
        )
        .map_err(msg)?;
        let mut worst = relative_l2(&timesteps, &self.tensor(&case, "timesteps")?).map_err(msg)?;
        let mut sample = self.tensor(&case, "sample_0")?;
        for i in 0..steps {
            let model_output = self.tensor(&case, &format!("model_output_{i}"))?;
            sample = scheduler.step(&model_output, &sample).map_err(msg)?;
            let reference = self.tensor(&case, &format!("sample_{}", i + 1))?;
            worst = worst.max(relative_l2(&sample, &reference).map_err(msg)?);
        }
        let mut result = CaseResult::measured(name, worst, MODULE_TOLERANCE);
        result.note = Some(format!("{steps} steps, worst step shown"));
        Ok(vec![result])
    }

    fn scheduler_unipc(&self) -> CaseOutcome {
        let config = self.pipeline_dir().join("scheduler/scheduler_config.json");
        self.scheduler_case(
            "scheduler_unipc",
            "scheduler_unipc.safetensors",
            config,
            SchedulerKind::UniPc,
        )
    }

    fn scheduler_euler(&self) -> CaseOutcome {
        let config = self.dir.join("cases/euler_scheduler/scheduler_config.json");
        self.scheduler_case(
            "scheduler_euler",
            "scheduler_euler.safetensors",
            config,
            SchedulerKind::Euler,
        )
    }

    /// The whole run from the reference's initial latents (torch's noise cannot be reproduced, so
    /// it is given), with our own prompt embeddings.
    fn pipeline(&self) -> CaseOutcome {
        let spec = PipelineCase::read(&self.dir).map_err(msg)?;
        let case = self.case("pipeline.safetensors")?;
        let pipe = WanPipeline::load(self.pipeline_dir(), &self.device, self.dtype)
            .map_err(msg)?
            .with_max_sequence_length(spec.max_sequence_length);
        let render = spec.render();
        let (cond, uncond) = pipe
            .encode_prompts(&render.prompt, &render.negative_prompt)
            .map_err(msg)?;
        let mut results = vec![
            CaseResult::measured(
                "pipeline/prompt_embeds",
                relative_l2(&cond, &self.tensor(&case, "prompt_embeds")?).map_err(msg)?,
                self.tolerances.module,
            ),
            CaseResult::measured(
                "pipeline/negative_embeds",
                relative_l2(&uncond, &self.tensor(&case, "negative_prompt_embeds")?)
                    .map_err(msg)?,
                self.tolerances.module,
            ),
        ];
        let initial = self.tensor(&case, "initial_latents")?;
        let latents = pipe
            .denoise(&render, &cond, &uncond, initial, &mut |_| {})
            .map_err(msg)?;
        results.push(CaseResult::measured(
            "pipeline/final_latents",
            relative_l2(&latents, &self.tensor(&case, "final_latents")?).map_err(msg)?,
            self.tolerances.pipeline,
        ));
        let video =
            video::video_to_unit_frames(&pipe.decode(&latents).map_err(msg)?).map_err(msg)?;
        results.push(CaseResult::measured(
            "pipeline/video",
            relative_l2(&video, &self.tensor(&case, "video")?).map_err(msg)?,
            self.tolerances.pipeline,
        ));
        Ok(results)
    }
}
