//! One task of a job on this worker: the request checked into a plan (model, spec with the
//! model's defaults, layout, peers) before anything heavy, then the render on the calling
//! (plain, non-async) thread — the model family's single-process pipeline for one rank
//! ([`load_pipeline`]), this rank's share of its distributed pipeline over a [`TcpMesh`] for more
//! ([`load_distributed_pipeline`]) — reported as [`TaskEvent`]s. Nothing here names a family.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use candle_core::{DType, Device};
use longtake_proto::{
    task_event, Checkpoint, Decoding, FrameBatch, Step, TaskEvent, TaskFinished, TaskStarted,
    TimeSplit,
};

use super::models::{Models, ServedModel};
use crate::families::{load_distributed_pipeline, load_pipeline};
use crate::model::denoiser::{Denoiser, DenoiserState};
use crate::model::render::{
    CancelToken, PipelineError, Progress, RenderInput, RenderOptions, RenderSpec, Video,
    VideoPipeline,
};
use crate::parallel::{MeshSecret, TcpMesh, TcpMeshConfig, Timeouts};
use longtake_proto::media::{decode_png, Mp4Clip};
use longtake_proto::spec::{InputKind, JobSpec, Layout, ModelDescription, SpecError, SpecRequest};

/// Largest RGB payload of one [`FrameBatch`] (whole frames; at least one per batch). The
/// coordinator holds one batch at a time, so this bounds its memory for a clip of any length
/// (measured: peak RSS 18 MB for a 10 s toy clip; see the README's long clips) while a batch
/// is still large against the per-message overhead (a 832×480 Wan frame is 1.2 MB).
pub const FRAME_BATCH_BYTES: usize = 2 << 20;

/// Why a task did not produce its video. Each message is one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("spec.model: this worker serves no model {name:?} (it serves {served})")]
    UnknownModel { name: String, served: String },
    #[error(transparent)]
    Spec(SpecError),
    #[error("spec.layout: {0}")]
    Layout(String),
    #[error("peers: {0}")]
    Peers(String),
    #[error("mesh_secret: {0} (the coordinator hands one to every rank of a job of several)")]
    MeshSecret(#[from] crate::parallel::mesh_secret::SecretLength),
    #[error("job mesh: {0}")]
    Mesh(#[from] crate::parallel::CommError),
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("input: {0}")]
    Input(String),
}

/// What one task runs, checked against this worker's models.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    pub rank: usize,
    pub model: ServedModel,
    pub spec: RenderSpec,
    /// Each worker group's layout.
    pub layout: Layout,
    /// Worker groups of the job (the windows of a long clip spread over them).
    pub groups: usize,
    /// Every rank's mesh address (empty for one rank).
    pub peers: Vec<SocketAddr>,
    /// What admits the ranks to each other's mesh (`None` for one rank).
    pub mesh_secret: Option<MeshSecret>,
    /// A checkpoint to continue from (a denoiser state file: for a job of several worker
    /// groups, this rank's group's); empty: from the spec's noise.
    pub resume_state: Vec<u8>,
    /// The first rank of each worker group sends its group's checkpoint after every this many
    /// steps (0: none).
    pub checkpoint_every: u32,
    /// The job's spec, resolved.
    pub job: JobSpec,
}

impl TaskPlan {
    /// Checks a task request for a job of `world_size` ranks: the model is served here, the
    /// scheduler is known, the layout has `world_size` ranks and can split the model, and there
    /// is a mesh address for every rank, and a mesh secret.
    pub fn new(
        models: &Models,
        spec: &longtake_proto::RenderSpec,
        rank: usize,
        world_size: usize,
        peers: &[String],
        mesh_secret: &[u8],
    ) -> Result<Self, TaskError> {
        let request = SpecRequest::try_from(spec).map_err(TaskError::Spec)?;
        let model = models
            .get(&request.model)
            .ok_or_else(|| TaskError::UnknownModel {
                name: request.model.clone(),
                served: models.names().join(", "),
            })?
            .clone();
        let job = resolve_spec(&request, &model)?;
        let layout = job.layout;
        if job.ranks() != world_size {
            return Err(TaskError::Layout(format!(
                "{} group(s) of {layout} have {} ranks, but this task was reserved as one of \
                 {world_size}",
                job.windows.groups,
                job.ranks()
            )));
        }
        let render = render_spec(&job);
        let job = job.clone();
        let mesh_secret = if world_size == 1 {
            None
        } else {
            Some(MeshSecret::from_slice(mesh_secret)?)
        };
        let peers = if world_size == 1 {
            Vec::new()
        } else {
            if peers.len() != world_size {
                return Err(TaskError::Peers(format!(
                    "{} addresses for a job of {world_size} ranks",
                    peers.len()
                )));
            }
            peers.iter().map(|p| resolve(p)).collect::<Result<_, _>>()?
        };
        Ok(Self {
            rank,
            model,
            spec: render,
            layout,
            groups: job.windows.groups as usize,
            peers,
            mesh_secret,
            resume_state: Vec::new(),
            checkpoint_every: 0,
            job,
        })
    }

    /// The plan with the frames the job's input file (`bytes`, as submitted) gives its render:
    /// an extended clip's last frames, which the render holds, or the picture it starts from.
    /// Refuses a file that is missing or unreadable, or that does not fit the spec.
    pub fn with_input(mut self, bytes: &[u8]) -> Result<Self, TaskError> {
        let Some(input) = &self.job.input else {
            return Ok(self);
        };
        if bytes.is_empty() {
            return Err(TaskError::Input(format!(
                "the job starts from a {} but the task came without it",
                input.kind.name()
            )));
        }
        let input_error = |e: longtake_proto::media::MediaError| {
            TaskError::Input(format!("the {}: {e}", input.kind.name()))
        };
        let frames = match input.kind {
            InputKind::Clip => {
                let held = self.job.held_frames() as usize;
                let clip = Mp4Clip::open(bytes).map_err(input_error)?;
                let facts = clip.facts();
                let frames = clip.last_frames(held).map_err(input_error)?;
                if frames.len() != held {
                    return Err(TaskError::Input(format!(
                        "the clip has {} frames; the extension holds its last {held}",
                        frames.len()
                    )));
                }
                RenderInput::Continues(Video {
                    rgb: frames.concat(),
                    first_frame: 0,
                    frames: held,
                    height: facts.height as usize,
                    width: facts.width as usize,
                })
            }
            InputKind::Image => {
                let picture = decode_png(bytes).map_err(input_error)?;
                RenderInput::FirstFrame(Video {
                    rgb: picture.rgb,
                    first_frame: 0,
                    frames: 1,
                    height: picture.height as usize,
                    width: picture.width as usize,
                })
            }
        };
        self.spec.input = Some(frames);
        Ok(self)
    }
}

fn resolve(peer: &str) -> Result<SocketAddr, TaskError> {
    peer.to_socket_addrs()
        .map_err(|e| TaskError::Peers(format!("{peer:?} is not a host:port address: {e}")))?
        .next()
        .ok_or_else(|| TaskError::Peers(format!("{peer:?} resolves to no address")))
}

/// A task's spec, parsed and resolved against a model this worker serves: zero sizes and steps
/// take the model's defaults, and the layout is checked against the transformer's shape (the
/// description the worker advertises is made from the transformer's own configuration).
pub fn job_spec(
    spec: &longtake_proto::RenderSpec,
    model: &ServedModel,
) -> Result<JobSpec, TaskError> {
    resolve_spec(
        &SpecRequest::try_from(spec).map_err(TaskError::Spec)?,
        model,
    )
}

fn resolve_spec(request: &SpecRequest, model: &ServedModel) -> Result<JobSpec, TaskError> {
    request
        .resolve(&ModelDescription::from(&model.info))
        .map_err(TaskError::Spec)
}

/// The pipeline's input for a resolved spec (an empty scheduler: the checkpoint's).
pub fn render_spec(job: &JobSpec) -> RenderSpec {
    RenderSpec {
        input: None,
        prompt: job.prompt.clone(),
        negative_prompt: job.negative_prompt.clone(),
        frames: job.rendered_frames() as usize,
        width: job.width as usize,
        height: job.height as usize,
        steps: job.steps as usize,
        guidance_scale: job.guidance_scale,
        shift: job.shift,
        scheduler: job.scheduler,
        seed: job.seed,
        windows: Some(job.windows),
        timeline: job.timeline(),
    }
}

/// Stops one task, remembering why (the first reason wins).
#[derive(Debug, Clone, Default)]
pub struct Abort {
    token: CancelToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Abort {
    pub fn abort(&self, reason: &str) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason.to_string());
        }
        self.token.cancel();
    }

    pub fn is_aborted(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "aborted".into())
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    /// Stopped by [`Abort`]; `detail` says where (e.g. "after step 2 of 10").
    Cancelled {
        reason: String,
        detail: String,
    },
    Failed(String),
}

impl Outcome {
    pub fn finished(&self) -> TaskFinished {
        match self {
            Outcome::Done => TaskFinished::default(),
            Outcome::Cancelled { reason, detail } if detail.is_empty() => TaskFinished {
                error: format!("cancelled: {reason}"),
                cancelled: true,
            },
            Outcome::Cancelled { reason, detail } => TaskFinished {
                error: format!("cancelled: {reason} ({detail})"),
                cancelled: true,
            },
            Outcome::Failed(error) => TaskFinished {
                error: error.clone(),
                cancelled: false,
            },
        }
    }
}

/// A pipeline's render with its options and progress callback.
type RenderFn<'a> =
    dyn FnMut(RenderOptions<'_>, &mut dyn FnMut(Progress)) -> Result<(), PipelineError> + 'a;

/// [`VideoPipeline::render_with_options`] with `options`; the video is streamed through the
/// progress callback, not returned.
fn render_with(
    pipeline: &dyn VideoPipeline,
    spec: &RenderSpec,
    options: RenderOptions<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), PipelineError> {
    pipeline.render_with_options(spec, options, progress)?;
    Ok(())
}

/// Runs tasks on one device, keeping the last single-process pipeline so that the next task of
/// the same model skips loading it.
pub struct TaskRunner {
    device: Device,
    dtype: DType,
    mesh_timeouts: Timeouts,
    cached: Mutex<Option<(String, Box<dyn VideoPipeline>)>>,
    counters: Arc<super::DaemonCounters>,
}

impl TaskRunner {
    pub fn new(device: Device, dtype: DType, mesh_timeouts: Timeouts) -> Self {
        Self {
            device,
            dtype,
            mesh_timeouts,
            cached: Mutex::new(None),
            counters: Arc::default(),
        }
    }

    /// Counts into `counters` (pipelines loaded, steps run) instead of a private set.
    pub fn with_counters(mut self, counters: Arc<super::DaemonCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Runs `plan` to its end on this thread (which must not be inside an async runtime: the
    /// mesh blocks on its own), reporting through `emit`. `mesh` is the listener reserved for
    /// this rank when the job has more than one.
    pub fn run(
        &self,
        plan: TaskPlan,
        mesh: Option<std::net::TcpListener>,
        abort: &Abort,
        emit: &mut dyn FnMut(TaskEvent),
    ) -> Outcome {
        let result = if plan.layout.world_size() * plan.groups == 1 {
            self.run_single(&plan, abort, emit)
        } else {
            self.run_distributed(&plan, mesh, abort, emit)
        };
        match result {
            _ if abort.is_aborted() => Outcome::Cancelled {
                reason: abort.reason(),
                detail: match result {
                    Err(TaskError::Pipeline(PipelineError::Cancelled { after_step, total })) => {
                        format!("after step {after_step} of {total}")
                    }
                    _ => String::new(),
                },
            },
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(one_line(&e.to_string())),
        }
    }

    fn run_single(
        &self,
        plan: &TaskPlan,
        abort: &Abort,
        emit: &mut dyn FnMut(TaskEvent),
    ) -> Result<(), TaskError> {
        let name = plan.model.info.name.clone();
        let load_start = Instant::now();
        // Taken out while it renders: a task that fails or panics leaves no half-used pipeline.
        let cached = self
            .cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .filter(|(cached, _)| *cached == name);
        let pipeline = match cached {
            Some((_, pipeline)) => pipeline,
            None => {
                let loaded = load_pipeline(
                    plan.model.source.pipeline_source(),
                    &self.device,
                    self.dtype,
                )?;
                self.counters
                    .pipelines_loaded
                    .fetch_add(1, Ordering::SeqCst);
                loaded
            }
        };
        pipeline.cancel_token().reset();
        let rendered = self.render(
            pipeline.cancel_token(),
            load_start,
            plan,
            abort,
            emit,
            &mut |options, progress| render_with(pipeline.as_ref(), &plan.spec, options, progress),
        );
        *self.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((name, pipeline));
        rendered
    }

    fn run_distributed(
        &self,
        plan: &TaskPlan,
        mesh: Option<std::net::TcpListener>,
        abort: &Abort,
        emit: &mut dyn FnMut(TaskEvent),
    ) -> Result<(), TaskError> {
        let load_start = Instant::now();
        let listener = mesh.ok_or_else(|| {
            TaskError::Peers("no mesh listener was reserved for this rank".into())
        })?;
        let secret = plan.mesh_secret.clone().ok_or_else(|| {
            TaskError::Peers("a task of several ranks came without a mesh secret".into())
        })?;
        let config = TcpMeshConfig {
            rank: plan.rank,
            peers: plan.peers.clone(),
            timeouts: self.mesh_timeouts.clone(),
            secret,
        };
        let mesh = Box::new(TcpMesh::connect_with_listener(config, listener)?);
        let pipeline = load_distributed_pipeline(
            plan.model.source.pipeline_source(),
            &self.device,
            self.dtype,
            plan.layout,
            plan.groups,
            mesh,
        )?;
        self.counters
            .pipelines_loaded
            .fetch_add(1, Ordering::SeqCst);
        self.render(
            pipeline.cancel_token(),
            load_start,
            plan,
            abort,
            emit,
            &mut |options, progress| render_with(pipeline.as_ref(), &plan.spec, options, progress),
        )
    }

    /// The part both paths share: started, steps, decoding, frames. `render` returns the video
    /// on the rank that decodes it.
    fn render(
        &self,
        pipeline_cancel: &CancelToken,
        load_start: Instant,
        plan: &TaskPlan,
        abort: &Abort,
        emit: &mut dyn FnMut(TaskEvent),
        render: &mut RenderFn<'_>,
    ) -> Result<(), TaskError> {
        if abort.is_aborted() {
            return Ok(());
        }
        let mut timings = TimeSplit {
            load_s: load_start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        emit(event(task_event::Event::Started(TaskStarted {
            load_s: timings.load_s,
        })));
        // The progress callback and the checkpoint hook both report; the denoiser calls them
        // one after the other, never inside each other.
        let emit = RefCell::new(emit);
        let resume = if plan.resume_state.is_empty() {
            None
        } else {
            let origin = Path::new("the checkpoint the coordinator sent");
            Some(
                DenoiserState::from_bytes(&plan.resume_state, origin, &self.device)
                    .map_err(PipelineError::from)?,
            )
        };
        let every = plan.checkpoint_every as usize;
        let mut checkpoint = |denoiser: &Denoiser| -> Result<(), PipelineError> {
            let step = denoiser.step_index();
            if every > 0 && step.is_multiple_of(every) && step < denoiser.total_steps() {
                let state = denoiser.state().to_bytes()?;
                (emit.borrow_mut())(event(task_event::Event::Checkpoint(Checkpoint {
                    step: step as u32,
                    state,
                })));
            }
            Ok(())
        };
        // Checkpoints come from the first rank of each worker group: its group's state (the
        // whole clip's for a job of one group).
        let checkpoints = plan.rank.is_multiple_of(plan.layout.world_size()) && every > 0;
        let options = RenderOptions {
            resume,
            after_step: if checkpoints {
                Some(&mut checkpoint)
            } else {
                None
            },
            stream_frames: true,
        };
        let mut last = 0.0;
        let frames = plan.spec.frames as u32;
        let emit = &emit;
        render(options, &mut |progress| match progress {
            Progress::Encoded { text, .. } => timings.text_s = text.as_secs_f64(),
            Progress::Step {
                index,
                total,
                elapsed,
                exchange,
            } => {
                let elapsed_s = elapsed.as_secs_f64();
                (emit.borrow_mut())(event(task_event::Event::Step(Step {
                    step: index as u32 + 1,
                    total: total as u32,
                    elapsed_s,
                    step_s: elapsed_s - last,
                    exchange_bytes: exchange.bytes,
                    group_exchange_bytes: Vec::new(),
                })));
                last = elapsed_s;
                timings.denoise_s = elapsed_s;
                timings.exchange_s += exchange.time.as_secs_f64();
                self.counters.steps_run.fetch_add(1, Ordering::SeqCst);
                // The pipeline looks at its own token right after this report.
                if abort.is_aborted() {
                    pipeline_cancel.cancel();
                }
            }
            Progress::Decoding => {
                (emit.borrow_mut())(event(task_event::Event::Decoding(Decoding { frames })))
            }
            Progress::Frames(video) => {
                let start = Instant::now();
                let video = numbered_in_output(video, &plan.job);
                send_frames(&video, abort, &mut *emit.borrow_mut());
                timings.send_s += start.elapsed().as_secs_f64();
            }
            Progress::Decoded { elapsed } => timings.decode_s = elapsed.as_secs_f64(),
        })?;
        (emit.borrow_mut())(event(task_event::Event::Timings(timings)));
        Ok(())
    }
}

/// Rendered frames as frames of the job's output: an extension's held frames (the clip's own
/// last frames, which the output has from the clip) left out, the new ones after the clip's.
fn numbered_in_output(mut video: Video, job: &JobSpec) -> Video {
    let held = job.held_frames() as usize;
    if held == 0 {
        return video;
    }
    let skip = held.saturating_sub(video.first_frame).min(video.frames);
    let frame_bytes = video.width * video.height * 3;
    video.rgb.drain(..skip * frame_bytes);
    video.frames -= skip;
    video.first_frame = job
        .output_frame((video.first_frame + skip) as u32)
        .unwrap_or_default() as usize;
    video
}

/// The frames this rank decoded (the whole clip on rank 0, or a worker group's segment on the
/// group's first rank), numbered in the clip, in batches of whole frames of at most
/// [`FRAME_BATCH_BYTES`].
fn send_frames(video: &Video, abort: &Abort, emit: &mut dyn FnMut(TaskEvent)) {
    let frame_bytes = video.width * video.height * 3;
    let per_batch = (FRAME_BATCH_BYTES / frame_bytes.max(1)).max(1);
    for (i, rgb) in video.rgb.chunks(per_batch * frame_bytes).enumerate() {
        if abort.is_aborted() {
            return;
        }
        emit(event(task_event::Event::Frames(FrameBatch {
            first: (video.first_frame + i * per_batch) as u32,
            count: (rgb.len() / frame_bytes) as u32,
            width: video.width as u32,
            height: video.height as u32,
            rgb: rgb.to_vec(),
        })));
    }
}

pub fn event(event: task_event::Event) -> TaskEvent {
    TaskEvent { event: Some(event) }
}

/// Error texts travel in one line (`finished.error`, the job's message).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layout: &str) -> longtake_proto::RenderSpec {
        longtake_proto::RenderSpec {
            prompt: "a wolf".into(),
            frames: 9,
            guidance_scale: 5.0,
            fps: 16,
            layout: layout.into(),
            ..Default::default()
        }
    }

    #[test]
    fn zero_fields_take_the_model_defaults() {
        // The default model: a spec without a model name, served without --model.
        let models = Models::open(&[]).unwrap();
        let unset = longtake_proto::RenderSpec {
            frames: 0,
            fps: 0,
            ..spec("")
        };
        let plan = TaskPlan::new(&models, &unset, 0, 1, &[], &[]).unwrap();
        let toy = &models.get(crate::daemon::models::TOY).unwrap().facts.info;
        assert_eq!(
            (plan.spec.width, plan.spec.height, plan.spec.steps),
            (toy.default_width, toy.default_height, toy.default_steps)
        );
        assert_eq!(plan.spec.frames, toy.default_frames);
        assert_eq!(plan.spec.scheduler, None);
        assert_eq!(plan.layout, Layout::SINGLE);
        let euler = longtake_proto::RenderSpec {
            scheduler: "euler".into(),
            width: 64,
            ..spec("")
        };
        let plan = TaskPlan::new(&models, &euler, 0, 1, &[], &[]).unwrap();
        assert_eq!(
            plan.spec.scheduler,
            Some(longtake_proto::spec::SchedulerKind::Euler)
        );
        assert_eq!(plan.spec.width, 64);
    }

    #[test]
    fn bad_requests_name_the_field() {
        // The tiny model: its shape (4 heads) is fixed in code, whatever the toy model becomes.
        let models = Models::open(&[crate::daemon::ModelSource::Tiny]).unwrap();
        let spec = |layout: &str| longtake_proto::RenderSpec {
            model: "tiny".into(),
            ..spec(layout)
        };
        let check =
            |spec: longtake_proto::RenderSpec, world: usize, peers: &[&str], start: &str| {
                let peers: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
                let err = TaskPlan::new(&models, &spec, 0, world, &peers, &[7; 32])
                    .unwrap_err()
                    .to_string();
                assert!(err.starts_with(start), "{err}");
            };
        let wan = longtake_proto::RenderSpec {
            model: "wan".into(),
            ..spec("")
        };
        check(
            wan,
            1,
            &[],
            "spec.model: this worker serves no model \"wan\" (it serves tiny)",
        );
        let ddim = longtake_proto::RenderSpec {
            scheduler: "ddim".into(),
            ..spec("")
        };
        check(ddim, 1, &[], "spec.scheduler: \"ddim\"");
        check(spec("cfg=2"), 1, &[], "spec.layout: 1 group(s) of cfg=2");
        check(spec("warp=2"), 2, &[], "spec.layout: layout `warp=2`");
        // The tiny transformer has 4 heads.
        check(
            spec("tp=8"),
            8,
            &[],
            "spec.layout: tp × ulysses = 8 does not divide the 4 attention heads",
        );
        check(spec("cfg=2"), 2, &["127.0.0.1:1"], "peers: 1 addresses");
        check(
            spec("cfg=2"),
            2,
            &["127.0.0.1:1", "nowhere"],
            "peers: \"nowhere\"",
        );
    }
}
