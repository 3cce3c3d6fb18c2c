//! The denoising loop as a value. A [`Denoiser`] owns one render's scheduler (and with it the
//! step index) and its latents, takes one guided step at a time, and can be turned into a
//! [`DenoiserState`] at any step boundary: saved to disk, loaded in another process and resumed,
//! giving final latents bit-identical to an uninterrupted run.
//!
//! # The state file
//!
//! [`DenoiserState::save`] writes one safetensors file, `denoiser-state.safetensors`
//! ([`DenoiserState::FILE`]), into a directory:
//!
//! - tensors: `latents` (f32, `(1, C, F, H, W)`) and the scheduler's tensors under
//!   `scheduler.<name>` (UniPC: `scheduler.model_output.{i}`, `scheduler.last_sample`);
//! - metadata key `longtake.denoiser`: JSON `{"format": 1, "checksum": …, "scheduler": {…}}`,
//!   the scheduler part being the [`SchedulerState`] header (class, steps, step index,
//!   configuration, schedule check value, counters). `checksum` is FNV-1a over every tensor's
//!   values, so a flipped bit in the data is an error, not a different video.
//!
//! One file rather than latents and JSON side by side: it is written to a temporary name, synced
//! and renamed into place, so a crash while saving leaves the previous state whole instead of the
//! latents of one step beside the scheduler state of another.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::render::{component, CancelToken, FlowModel, PipelineError, Progress, Result};
use super::scheduler::{Scheduler, SchedulerState, StateError};

/// The safetensors metadata key that holds the JSON header.
const METADATA_KEY: &str = "longtake.denoiser";
/// The state file layout this build writes and reads.
const FORMAT: u32 = 1;
const LATENTS: &str = "latents";
const SCHEDULER_PREFIX: &str = "scheduler.";

/// What can be wrong with a saved denoiser state or with resuming from one; each names the file
/// or the mismatch.
#[derive(Debug, thiserror::Error)]
pub enum DenoiserError {
    #[error("{}: cannot {what} the denoiser state: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: not a valid denoiser state ({reason}); the file is corrupt or truncated", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: a safetensors file without `{METADATA_KEY}` metadata, not a denoiser state", path.display())]
    NotAState { path: PathBuf },
    #[error("{}: denoiser state format {found}; this build reads format {FORMAT}", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("cannot save the denoiser state: {0}")]
    Save(String),
    #[error("cannot resume: {0}")]
    Scheduler(#[from] StateError),
    #[error(
        "cannot resume: the saved latents have shape {saved:?}, this render's have {expected:?}"
    )]
    LatentShape {
        saved: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("cannot run to step {until}: the schedule has {total} steps")]
    PastEnd { until: usize, total: usize },
}

/// A hook that sees the denoiser after every step, e.g. to save its state; its error stops the
/// run.
pub type AfterStep<'a> = dyn FnMut(&Denoiser) -> Result<()> + 'a;

/// The text conditioning of a render: the context batch the transformer sees each step and the
/// guidance that combines its outputs.
#[derive(Debug, Clone)]
pub struct Conditioning {
    context: Tensor,
    guidance_scale: f64,
}

impl Conditioning {
    /// The conditioning for `prompt_embeds` and `negative_prompt_embeds` (each
    /// `(1, L, text_dim)`) with classifier-free guidance of `guidance_scale`; at 1 or below the
    /// negative prompt is not used.
    pub fn new(
        prompt_embeds: &Tensor,
        negative_prompt_embeds: &Tensor,
        guidance_scale: f64,
    ) -> Result<Self> {
        // Both branches in one batch: one transformer call per step instead of two.
        let context = if guidance_scale > 1.0 {
            Tensor::cat(&[prompt_embeds, negative_prompt_embeds], 0)?
        } else {
            prompt_embeds.clone()
        };
        Ok(Self {
            context,
            guidance_scale,
        })
    }

    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The transformer's text context: cond and uncond stacked when guided.
    pub fn context(&self) -> &Tensor {
        &self.context
    }
}

/// One render's denoising loop: the scheduler, whose step index is the loop's, and the latents
/// (f32) after the steps taken so far.
pub struct Denoiser {
    scheduler: Box<dyn Scheduler>,
    latents: Tensor,
    /// The dtype the flow model takes its input in.
    model_dtype: DType,
}

impl std::fmt::Debug for Denoiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denoiser")
            .field("step_index", &self.step_index())
            .field("total_steps", &self.total_steps())
            .field("latents", &self.latents.dims())
            .field("model_dtype", &self.model_dtype)
            .finish()
    }
}

impl Denoiser {
    /// A denoiser that continues `scheduler` (fresh: from step 0) from `latents`, feeding the
    /// flow model in `model_dtype`.
    pub fn new(scheduler: Box<dyn Scheduler>, latents: Tensor, model_dtype: DType) -> Result<Self> {
        Ok(Self {
            scheduler,
            latents: latents.to_dtype(DType::F32)?,
            model_dtype,
        })
    }

    /// A denoiser that continues from a saved `state`: `scheduler`, built for the same render
    /// as the one that saved it, takes the saved scheduler state (or refuses it, naming the
    /// mismatch).
    pub fn resume(
        mut scheduler: Box<dyn Scheduler>,
        state: &DenoiserState,
        model_dtype: DType,
    ) -> Result<Self> {
        scheduler
            .restore(&state.scheduler)
            .map_err(DenoiserError::from)?;
        Self::new(scheduler, state.latents.clone(), model_dtype)
    }

    /// Steps taken so far; the next one is `step_index()`.
    pub fn step_index(&self) -> usize {
        self.scheduler.step_index()
    }

    pub fn total_steps(&self) -> usize {
        self.scheduler.timesteps().len()
    }

    pub fn is_done(&self) -> bool {
        self.step_index() >= self.total_steps()
    }

    /// The latents after the steps taken so far, f32 `(1, C, F, H, W)`.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    pub fn into_latents(self) -> Tensor {
        self.latents
    }

    pub fn scheduler(&self) -> &dyn Scheduler {
        self.scheduler.as_ref()
    }

    /// The state to resume from later (cheap: the tensors are shared, not copied).
    pub fn state(&self) -> DenoiserState {
        DenoiserState {
            latents: self.latents.clone(),
            scheduler: self.scheduler.state(),
        }
    }

    /// Runs denoising step `step_index()`: one flow prediction for both guidance branches,
    /// the guided combination, one scheduler step. When it fails, the denoiser is left as it was
    /// before the step.
    pub fn step(&mut self, model: &dyn FlowModel, conditioning: &Conditioning) -> Result<()> {
        let index = self.step_index();
        let total = self.total_steps();
        let &t = self
            .scheduler
            .timesteps()
            .get(index)
            .ok_or(DenoiserError::PastEnd {
                until: index + 1,
                total,
            })?;
        let _span = longtake_proto::telemetry::step_span(index, total).entered();
        let context = &conditioning.context;
        let batch = context.dim(0)?;
        let input = self
            .latents
            .to_dtype(self.model_dtype)?
            .repeat((batch, 1, 1, 1, 1))?;
        let timestep = Tensor::full(t as f32, batch, self.latents.device())?;
        let flow = component("transformer", model.predict(&input, &timestep, context))?;
        let flow = flow.to_dtype(DType::F32)?;
        // This arithmetic is the reference pipeline's; a change here changes every render's
        // bits, so resumed and saved renders stay comparable only while it does not change.
        let flow = if conditioning.guided() {
            let cond = flow.narrow(0, 0, 1)?;
            let uncond = flow.narrow(0, 1, 1)?;
            (&uncond + ((cond - &uncond)? * conditioning.guidance_scale)?)?
        } else {
            flow
        };
        self.latents = component("scheduler", self.scheduler.step(&flow, &self.latents))?;
        Ok(())
    }

    /// Runs steps until `until` have been taken (or none, if that many already have), reporting
    /// each as [`Progress::Step`] (with its index in the whole schedule and the time since this
    /// call began). After each step `after_step` sees the denoiser (e.g. to save a checkpoint;
    /// its error stops the run), then `cancel` is checked: a cancelled run stops with
    /// [`PipelineError::Cancelled`] unless it just took the schedule's last step, and the
    /// denoiser keeps the latents and state of the steps it took.
    pub fn run(
        &mut self,
        model: &dyn FlowModel,
        conditioning: &Conditioning,
        until: usize,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(Progress),
        after_step: &mut AfterStep<'_>,
    ) -> Result<()> {
        let total = self.total_steps();
        if until > total {
            return Err(DenoiserError::PastEnd { until, total }.into());
        }
        let start = Instant::now();
        while self.step_index() < until {
            let index = self.step_index();
            self.step(model, conditioning)?;
            progress(Progress::Step {
                index,
                total,
                elapsed: start.elapsed(),
                exchange: model.group_exchange(),
            });
            after_step(self)?;
            if cancel.is_cancelled() && index + 1 < total {
                return Err(PipelineError::Cancelled {
                    after_step: index + 1,
                    total,
                });
            }
        }
        Ok(())
    }

    /// [`Self::run`] to the end of the schedule.
    pub fn run_to_end(
        &mut self,
        model: &dyn FlowModel,
        conditioning: &Conditioning,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(Progress),
        after_step: &mut AfterStep<'_>,
    ) -> Result<()> {
        let total = self.total_steps();
        self.run(model, conditioning, total, cancel, progress, after_step)
    }
}

/// A denoiser between two steps: its latents and its scheduler's state. See the module docs for
/// the file.
#[derive(Debug, Clone)]
pub struct DenoiserState {
    /// f32 `(1, C, F, H, W)`.
    pub latents: Tensor,
    pub scheduler: SchedulerState,
}

/// The JSON header of a state file.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    checksum: String,
    scheduler: SchedulerState,
}

impl DenoiserState {
    /// The file name [`Self::save`] writes inside its directory.
    pub const FILE: &'static str = "denoiser-state.safetensors";

    /// Steps taken before the state was saved.
    pub fn step_index(&self) -> usize {
        self.scheduler.step_index
    }

    /// The state file inside `dir`.
    pub fn path_in(dir: impl AsRef<Path>) -> PathBuf {
        dir.as_ref().join(Self::FILE)
    }

    /// Writes the state into `dir` (created if missing), replacing any earlier state there
    /// atomically; returns the file's path.
    pub fn save(&self, dir: impl AsRef<Path>) -> std::result::Result<PathBuf, DenoiserError> {
        let dir = dir.as_ref();
        let path = Self::path_in(dir);
        let tmp = dir.join(format!("{}.tmp", Self::FILE));
        let io = |what, source| DenoiserError::Io {
            path: path.clone(),
            what,
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io("write", e))?;
        let bytes = self.to_bytes()?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
        file.write_all(&bytes).map_err(|e| io("write", e))?;
        // Synced before the rename, so that the name never points at a half-written file.
        file.sync_all().map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("write", e))?;
        Ok(path)
    }

    /// The state as the bytes of a state file (what [`Self::save`] writes): safetensors with
    /// the scheduler's state and a checksum in its metadata.
    pub fn to_bytes(&self) -> std::result::Result<Vec<u8>, DenoiserError> {
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        tensors.insert(LATENTS.into(), self.latents.contiguous().map_err(save_err)?);
        for (name, t) in &self.scheduler.tensors {
            tensors.insert(
                format!("{SCHEDULER_PREFIX}{name}"),
                t.contiguous().map_err(save_err)?,
            );
        }
        let header = Header {
            format: FORMAT,
            checksum: checksum(&tensors).map_err(save_err)?,
            scheduler: self.scheduler.clone(),
        };
        let json = serde_json::to_string(&header).map_err(save_err)?;
        let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
        safetensors::serialize(&tensors, Some(metadata)).map_err(save_err)
    }

    /// Reads the state that [`Self::save`] wrote into `dir`, its tensors on `device`.
    pub fn load(
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> std::result::Result<Self, DenoiserError> {
        let path = Self::path_in(dir);
        let bytes = std::fs::read(&path).map_err(|source| DenoiserError::Io {
            path: path.clone(),
            what: "read",
            source,
        })?;
        Self::from_bytes(&bytes, &path, device)
    }

    /// Reads the bytes of a state file ([`Self::to_bytes`]); `origin` names them in errors.
    pub fn from_bytes(
        bytes: &[u8],
        origin: &Path,
        device: &Device,
    ) -> std::result::Result<Self, DenoiserError> {
        let path = origin.to_path_buf();
        let corrupt = |reason: String| DenoiserError::Corrupt {
            path: path.clone(),
            reason,
        };
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| corrupt(format!("{e:?}")))?;
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| DenoiserError::NotAState { path: path.clone() })?;
        // The format first, so that a newer file is reported as such rather than as corrupt.
        let format = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()))
            .ok_or_else(|| corrupt(format!("`{METADATA_KEY}` has no format number")))?;
        if format != FORMAT as u64 {
            return Err(DenoiserError::Format {
                path: path.clone(),
                found: format as u32,
            });
        }
        let header: Header = serde_json::from_str(json)
            .map_err(|e| corrupt(format!("`{METADATA_KEY}` metadata: {e}")))?;

        let file =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(format!("{e:?}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let t = view
                .load(device)
                .map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        let sum = checksum(&tensors).map_err(|e| corrupt(e.to_string()))?;
        if sum != header.checksum {
            return Err(corrupt(format!(
                "checksum {sum} of the tensors, the header says {}",
                header.checksum
            )));
        }
        let latents = tensors
            .remove(LATENTS)
            .ok_or_else(|| corrupt(format!("no `{LATENTS}` tensor")))?;
        let mut scheduler = header.scheduler;
        for (name, t) in tensors {
            match name.strip_prefix(SCHEDULER_PREFIX) {
                Some(short) => {
                    scheduler.tensors.insert(short.to_string(), t);
                }
                None => return Err(corrupt(format!("unexpected tensor `{name}`"))),
            }
        }
        Ok(Self { latents, scheduler })
    }
}

fn save_err(e: impl std::fmt::Display) -> DenoiserError {
    DenoiserError::Save(e.to_string())
}

/// FNV-1a over the names and the f64 bits of the values of `tensors`, in name order, as 16 hex
/// digits. f64 holds every value of the f32/f16/bf16/f64 tensors a state has exactly.
fn checksum(tensors: &BTreeMap<String, Tensor>) -> candle_core::Result<String> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, t) in tensors {
        feed(name.as_bytes());
        for d in t.dims() {
            feed(&(*d as u64).to_le_bytes());
        }
        for v in t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()? {
            feed(&v.to_bits().to_le_bytes());
        }
    }
    Ok(format!("{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::wan::pipeline::{Decode, WanPipeline};
    use crate::model::render::{RenderOptions, RenderSpec};
    use crate::model::scheduler::{self, SchedulerKind};
    use crate::parallel::testing::{bits, TestResult};

    const KINDS: [SchedulerKind; 2] = [SchedulerKind::UniPc, SchedulerKind::Euler];

    /// A cheap flow model that is nonlinear in the latents and depends on the timestep and on
    /// the context, so that guidance and the scheduler history both matter.
    struct Toy;

    impl FlowModel for Toy {
        fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
            let b = x.dim(0)?;
            let t = (t.reshape((b, 1, 1, 1, 1))? / 1000.0)?;
            let c = context
                .mean_keepdim(2)?
                .mean_keepdim(1)?
                .reshape((b, 1, 1, 1, 1))?;
            ((x * 0.7)?.sin()?.broadcast_mul(&t)? + x.broadcast_mul(&c)?)? - 0.1
        }
    }

    fn toy_scheduler(kind: SchedulerKind, steps: usize) -> Box<dyn Scheduler> {
        let config = serde_json::json!({
            "_class_name": kind.class_name(), "prediction_type": "flow_prediction",
            "use_flow_sigmas": true, "flow_shift": 3.0, "shift": 3.0, "solver_order": 3,
        });
        scheduler::build(&config, Some(kind), steps, None).unwrap()
    }

    fn toy_inputs() -> TestResult<(Tensor, Conditioning)> {
        let dev = Device::Cpu;
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 2, 3, 3), &dev)?;
        let cond = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev)?;
        let uncond = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev)?;
        Ok((latents, Conditioning::new(&cond, &uncond, 4.5)?))
    }

    fn no_hook(_: &Denoiser) -> Result<()> {
        Ok(())
    }

    /// With both schedulers (UniPC at order 3, so its whole history is in the state), a
    /// denoiser run to step k, saved, loaded and resumed in a fresh denoiser ends with the bits
    /// of the uninterrupted run, for every k from 0 to the end.
    #[test]
    fn resumed_at_every_step_is_bit_identical() -> TestResult {
        let (latents, conditioning) = toy_inputs()?;
        let cancel = CancelToken::default();
        for kind in KINDS {
            let steps = 6;
            let mut full = Denoiser::new(toy_scheduler(kind, steps), latents.clone(), DType::F32)?;
            full.run_to_end(&Toy, &conditioning, &cancel, &mut |_| {}, &mut no_hook)?;
            let expected = bits(full.latents())?;
            for k in 0..=steps {
                let mut first =
                    Denoiser::new(toy_scheduler(kind, steps), latents.clone(), DType::F32)?;
                first.run(&Toy, &conditioning, k, &cancel, &mut |_| {}, &mut no_hook)?;
                assert_eq!(first.step_index(), k);
                let dir = tempfile::tempdir()?;
                first.state().save(dir.path())?;
                drop(first);

                let state = DenoiserState::load(dir.path(), &Device::Cpu)?;
                assert_eq!(state.step_index(), k);
                let mut resumed = Denoiser::resume(toy_scheduler(kind, steps), &state, DType::F32)?;
                let mut indices = Vec::new();
                resumed.run_to_end(
                    &Toy,
                    &conditioning,
                    &cancel,
                    &mut |p| {
                        if let Progress::Step { index, .. } = p {
                            indices.push(index)
                        }
                    },
                    &mut no_hook,
                )?;
                assert_eq!(indices, (k..steps).collect::<Vec<_>>(), "{kind:?} k={k}");
                assert!(resumed.is_done());
                assert!(
                    bits(resumed.latents())? == expected,
                    "{kind:?}: resumed after step {k} differs from the uninterrupted run"
                );
            }
            // Past the end is an error naming the schedule's length, and changes nothing.
            let before = bits(full.latents())?;
            let err = full.step(&Toy, &conditioning).unwrap_err().to_string();
            assert!(err.contains("6 steps"), "{err}");
            assert_eq!(bits(full.latents())?, before);
            let err = Denoiser::new(toy_scheduler(kind, steps), latents.clone(), DType::F32)?
                .run(&Toy, &conditioning, 7, &cancel, &mut |_| {}, &mut no_hook)
                .unwrap_err()
                .to_string();
            assert!(err.contains("step 7") && err.contains("6 steps"), "{err}");
        }
        Ok(())
    }

    /// A cancelled run stops after the step it was in, keeping that step's state.
    #[test]
    fn cancelled_run_keeps_its_last_step() -> TestResult {
        let (latents, conditioning) = toy_inputs()?;
        let cancel = CancelToken::default();
        let mut d = Denoiser::new(toy_scheduler(SchedulerKind::UniPc, 5), latents, DType::F32)?;
        let err = d
            .run_to_end(
                &Toy,
                &conditioning,
                &cancel,
                &mut |_| {},
                &mut |d: &Denoiser| {
                    if d.step_index() == 2 {
                        cancel.cancel();
                    }
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                PipelineError::Cancelled {
                    after_step: 2,
                    total: 5
                }
            ),
            "{err}"
        );
        assert_eq!(d.step_index(), 2);
        assert_eq!(d.state().step_index(), 2);
        Ok(())
    }

    fn tiny_spec(kind: SchedulerKind, steps: usize) -> RenderSpec {
        RenderSpec {
            input: None,
            prompt: "a wolf howling at the moon".into(),
            negative_prompt: "blurry".into(),
            frames: 5,
            width: 32,
            height: 32,
            steps,
            guidance_scale: 5.0,
            shift: None,
            scheduler: Some(kind),
            seed: 11,
            windows: None,
            timeline: Default::default(),
        }
    }

    /// The tiny model's render, stopped (cancelled) after step k of 6 with its state saved by
    /// the after-step hook, then resumed from the saved file by another pipeline, ends with the
    /// uninterrupted render's latents bit for bit, for both schedulers and k = 1, 3, 5.
    #[test]
    fn tiny_render_stopped_and_resumed_is_bit_identical() -> TestResult {
        let dev = Device::Cpu;
        let pipe = WanPipeline::tiny(&dev, DType::F32)?;
        // Another pipeline resumes, as another process would.
        let other = WanPipeline::tiny(&dev, DType::F32)?;
        let steps = 6;
        for kind in KINDS {
            let spec = tiny_spec(kind, steps);
            let full = pipe.render_with(
                pipe.transformer()?,
                &spec,
                Decode::No,
                RenderOptions::default(),
                &mut |_| {},
            )?;
            assert!(full.video.is_none());
            let expected = bits(&full.latents)?;
            for k in [1, 3, steps - 1] {
                let dir = tempfile::tempdir()?;
                let token = pipe.cancel_token();
                token.reset();
                let mut save = |d: &Denoiser| -> Result<()> {
                    if d.step_index() == k {
                        d.state().save(dir.path())?;
                        token.cancel();
                    }
                    Ok(())
                };
                let options = RenderOptions {
                    resume: None,
                    after_step: Some(&mut save),
                    stream_frames: false,
                };
                match pipe.render_with(pipe.transformer()?, &spec, Decode::No, options, &mut |_| {})
                {
                    Err(PipelineError::Cancelled { after_step, total }) => {
                        assert_eq!((after_step, total), (k, steps), "{kind:?}")
                    }
                    other => panic!("{kind:?} k={k}: expected a cancelled render, got {other:?}"),
                }
                token.reset();

                let state = DenoiserState::load(dir.path(), &dev)?;
                let mut events = Vec::new();
                let resumed = other.render_with(
                    other.transformer()?,
                    &spec,
                    Decode::No,
                    RenderOptions {
                        resume: Some(state),
                        after_step: None,
                        stream_frames: false,
                    },
                    &mut |p| events.push(p),
                )?;
                assert!(
                    matches!(events[0], Progress::Encoded { total, .. } if total == steps),
                    "{:?}",
                    events[0]
                );
                let indices: Vec<usize> = events[1..]
                    .iter()
                    .map(|p| match p {
                        Progress::Step { index, .. } => *index,
                        other => panic!("unexpected {other:?}"),
                    })
                    .collect();
                assert_eq!(indices, (k..steps).collect::<Vec<_>>());
                assert!(
                    bits(&resumed.latents)? == expected,
                    "{kind:?}: render resumed after step {k} differs from the uninterrupted one"
                );
            }
        }
        Ok(())
    }

    /// A state saved by one render does not resume another scheduler kind, step count, shift or
    /// latent size; each error names the mismatch, and the state resumes its own render after.
    #[test]
    fn resuming_another_render_names_the_mismatch() -> TestResult {
        let dev = Device::Cpu;
        let pipe = WanPipeline::tiny_parts(
            &dev,
            DType::F32,
            crate::families::wan::pipeline::Parts {
                transformer: false,
                vae: false,
            },
        )?;
        let (_, conditioning) = toy_inputs()?;
        let cancel = CancelToken::default();
        for kind in KINDS {
            let spec = tiny_spec(kind, 6);
            let initial = pipe.initial_latents(&spec)?;
            let mut d = pipe.denoiser(&spec, initial)?;
            // The tiny transformer is not needed to make a state: any flow will do.
            d.run(&Toy, &conditioning, 3, &cancel, &mut |_| {}, &mut no_hook)?;
            let dir = tempfile::tempdir()?;
            d.state().save(dir.path())?;
            let state = DenoiserState::load(dir.path(), &dev)?;

            let other_kind = KINDS.into_iter().find(|k| *k != kind).unwrap();
            let err = |spec: RenderSpec| match pipe.resume_denoiser(&spec, &state) {
                Ok(_) => panic!("{kind:?}: resumed into {spec:?}"),
                Err(e) => e.to_string(),
            };
            let e = err(RenderSpec {
                scheduler: Some(other_kind),
                ..spec.clone()
            });
            assert!(
                e.contains(kind.class_name()) && e.contains(other_kind.class_name()),
                "{e}"
            );
            let e = err(RenderSpec {
                steps: 5,
                ..spec.clone()
            });
            assert!(e.contains("6-step") && e.contains("5 steps"), "{e}");
            let e = err(RenderSpec {
                shift: Some(5.0),
                ..spec.clone()
            });
            let option = match kind {
                SchedulerKind::UniPc => "`flow_shift`: saved 3.0, here 5.0",
                SchedulerKind::Euler => "`shift`: saved 3.0, here 5.0",
            };
            assert!(e.contains(option), "{e}");
            let e = err(RenderSpec {
                width: 48,
                ..spec.clone()
            });
            assert!(
                e.contains("[1, 16, 2, 4, 4]") && e.contains("[1, 16, 2, 4, 6]"),
                "{e}"
            );

            // The scheduler a refused state was offered is untouched.
            let mut fresh = pipe.scheduler(&RenderSpec {
                steps: 5,
                ..spec.clone()
            })?;
            assert!(fresh.restore(&state.scheduler).is_err());
            assert_eq!(fresh.step_index(), 0);
            assert_eq!(pipe.resume_denoiser(&spec, &state)?.step_index(), 3);
        }
        Ok(())
    }

    /// Damaged, foreign, missing and future state files are errors naming the file and what is
    /// wrong, never a state.
    #[test]
    fn damaged_state_files_are_clear_errors() -> TestResult {
        let dev = Device::Cpu;
        let (latents, conditioning) = toy_inputs()?;
        let mut d = Denoiser::new(toy_scheduler(SchedulerKind::UniPc, 4), latents, DType::F32)?;
        d.run(
            &Toy,
            &conditioning,
            2,
            &CancelToken::default(),
            &mut |_| {},
            &mut no_hook,
        )?;
        let dir = tempfile::tempdir()?;
        let path = d.state().save(dir.path())?;
        assert_eq!(path, DenoiserState::path_in(dir.path()));
        let good = std::fs::read(&path)?;
        let load_err = |bytes: &[u8]| -> String {
            std::fs::write(&path, bytes).unwrap();
            match DenoiserState::load(dir.path(), &dev) {
                Ok(_) => panic!("a damaged state loaded"),
                Err(e) => e.to_string(),
            }
        };
        let file = path.display().to_string();

        for cut in [good.len() - 1, good.len() / 2, 12, 3, 0] {
            let e = load_err(&good[..cut]);
            assert!(
                e.contains(&file) && e.contains("corrupt or truncated"),
                "cut {cut}: {e}"
            );
        }
        // One flipped bit in the last value of the data.
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        let e = load_err(&flipped);
        assert!(e.contains(&file) && e.contains("checksum"), "{e}");

        // A safetensors file that is not a state.
        let plain =
            safetensors::serialize([("latents", &Tensor::zeros(2, DType::F32, &dev)?)], None)?;
        let e = load_err(&plain);
        assert!(
            e.contains(&file) && e.contains("not a denoiser state"),
            "{e}"
        );

        // A state of a later format.
        let future = safetensors::serialize(
            [("latents", &Tensor::zeros(2, DType::F32, &dev)?)],
            Some(HashMap::from([(
                METADATA_KEY.to_string(),
                r#"{"format": 2}"#.to_string(),
            )])),
        )?;
        let e = load_err(&future);
        assert!(e.contains("format 2") && e.contains("format 1"), "{e}");

        std::fs::write(&path, &good)?;
        assert_eq!(DenoiserState::load(dir.path(), &dev)?.step_index(), 2);
        let e = DenoiserState::load(dir.path().join("nowhere"), &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere") && e.contains("cannot read"), "{e}");
        Ok(())
    }
}
