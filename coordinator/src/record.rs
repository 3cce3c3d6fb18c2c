//! The coordinator's own model of a job: [`JobRecord`], what the job table, the scheduler and the
//! job store work on. It owns the job's phase ([`JobPhase`], with the one definition of "has
//! ended" and "holds workers"), its spec as submitted and as resolved ([`JobSpecs`]), the plan of
//! its current or last attempt ([`Plan`]: worker groups in rank order, each with its layout), its
//! attempt count, and the checkpoint it could resume from ([`CheckpointRef`]).
//!
//! The protocol's `Job` is only an edge: `From<&JobRecord> for Job` builds the gRPC replies, and
//! the store writes its own versioned format (`store::format`).

use longtake_proto::spec::{JobSpec, Layout, SpecRequest};
use longtake_proto::{Job, JobState, OutputFormat, RenderSpec, TimeSplit};

/// Whether `id` is a job id: what [`crate::jobs::new_job_id`] makes (`j-` and base36), or any
/// 1–64 ASCII letters, digits, `-` and `_` starting with a letter or digit. Ids name the job's
/// artifact directory and its store key, so nothing else (`..`, `/`, an empty id) may be one.
pub fn is_job_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `id` is a request id (an idempotency key): 1–128 ASCII letters, digits, `.`, `_`,
/// `:` and `-` (room for a UUID or a pipeline's own job key, nothing a terminal acts on).
pub fn is_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

/// Where a job is in its life: QUEUED → PLANNED → RUNNING → DONE | FAILED | CANCELLED, with
/// QUEUED/PLANNED/RUNNING → CANCELLED and PLANNED/RUNNING → QUEUED when an attempt's workers are
/// lost (the transitions themselves are the job table's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Waiting for enough free workers.
    Queued,
    /// Workers chosen and reserved; the ranks are starting.
    Planned,
    /// The ranks are rendering.
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobPhase {
    /// Whether the job will change no more.
    pub fn is_ended(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// Whether an attempt of the job holds workers (planned or running).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Planned | Self::Running)
    }

    /// `queued`, `planned`, `running`, `done`, `failed` or `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Planned => "planned",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The phase of a protocol `JobState` number; `None` for UNSPECIFIED or a number this build
    /// does not know.
    pub fn from_proto(state: i32) -> Option<Self> {
        Some(match JobState::try_from(state).ok()? {
            JobState::Unspecified => return None,
            JobState::Queued => Self::Queued,
            JobState::Planned => Self::Planned,
            JobState::Running => Self::Running,
            JobState::Done => Self::Done,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        })
    }
}

impl From<JobPhase> for JobState {
    fn from(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Queued => JobState::Queued,
            JobPhase::Planned => JobState::Planned,
            JobPhase::Running => JobState::Running,
            JobPhase::Done => JobState::Done,
            JobPhase::Failed => JobState::Failed,
            JobPhase::Cancelled => JobState::Cancelled,
        }
    }
}

/// A job's spec as far as it got.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpecs {
    /// Checked at submission; the model's defaults are not filled in yet.
    Submitted(SpecRequest),
    /// Planned at least once: the request as submitted, and resolved against the model its
    /// workers serve (what the last attempt ran, and what clients are shown).
    Resolved {
        request: SpecRequest,
        /// Boxed: a job's record is mostly moved whole, and this is its largest part.
        resolved: Box<JobSpec>,
    },
    /// A stored spec this coordinator could not read back (another version wrote it, or a hand
    /// edit): kept as stored so it can still be shown and written back, never run (the job has
    /// failed).
    Unreadable(RenderSpec),
}

impl JobSpecs {
    /// The spec as submitted; `None` when it could not be read back.
    pub fn request(&self) -> Option<&SpecRequest> {
        match self {
            Self::Submitted(request) | Self::Resolved { request, .. } => Some(request),
            Self::Unreadable(_) => None,
        }
    }

    /// The spec with the model's defaults, once planned.
    pub fn resolved(&self) -> Option<&JobSpec> {
        match self {
            Self::Resolved { resolved, .. } => Some(resolved),
            _ => None,
        }
    }

    /// The spec as clients see it: the resolved one once there is one (so a client learns the
    /// size and steps the farm chose), else as submitted, else as stored.
    pub fn to_render_spec(&self) -> RenderSpec {
        match self {
            Self::Submitted(request) => RenderSpec::from(request),
            Self::Resolved { resolved, .. } => RenderSpec::from(resolved.as_ref()),
            Self::Unreadable(raw) => raw.clone(),
        }
    }

    /// The output format the job writes.
    pub fn format(&self) -> OutputFormat {
        match self {
            Self::Submitted(request) | Self::Resolved { request, .. } => request.format,
            Self::Unreadable(raw) => OutputFormat::try_from(raw.format).unwrap_or_default(),
        }
    }
}

/// Which workers run an attempt, and how the clip is split among them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The worker groups, each running a contiguous run of the windows.
    pub groups: Vec<GroupPlan>,
    /// The latent-frame windows of a clip longer than the model's native length, co-denoised
    /// by the groups (`longtake_proto::spec::WindowPlan`); empty for a clip of one window.
    pub windows: Vec<WindowRange>,
}

/// One group of workers that runs a layout together.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    /// Worker ids in rank order.
    pub workers: Vec<String>,
    pub layout: Layout,
}

/// A half-open range of latent frames, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRange {
    pub start: u32,
    pub end: u32,
}

impl Plan {
    /// One group of `workers` (rank order) running `layout` over the whole clip.
    pub fn single(workers: Vec<String>, layout: Layout) -> Self {
        Self {
            groups: vec![GroupPlan { workers, layout }],
            windows: Vec::new(),
        }
    }

    /// `workers` (rank order) split into `spec`'s worker groups, with the windows of its clip.
    /// The spec was resolved, so its window plan is valid; a plan that is not (a record from
    /// an older build) keeps one group of every worker.
    pub fn for_job(workers: Vec<String>, spec: &JobSpec) -> Self {
        let Ok(windows) = spec.window_plan() else {
            return Self::single(workers, spec.layout);
        };
        let size = spec.layout.world_size().max(1);
        let groups = workers
            .chunks(size)
            .map(|w| GroupPlan {
                workers: w.to_vec(),
                layout: spec.layout,
            })
            .collect();
        let windows = if windows.is_single_window() {
            Vec::new()
        } else {
            windows
                .windows()
                .iter()
                .map(|w| WindowRange {
                    start: w.start as u32,
                    end: (w.start + w.len) as u32,
                })
                .collect()
        };
        Self { groups, windows }
    }

    /// Every worker of the plan, group after group, each in rank order.
    pub fn workers(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| g.workers.iter().cloned())
            .collect()
    }

    /// The groups' layouts as the `Planned` event names them (one per group).
    pub fn layout_text(&self) -> String {
        match self.groups.as_slice() {
            [first, rest @ ..]
                if !rest.is_empty() && rest.iter().all(|g| g.layout == first.layout) =>
            {
                format!("{} groups of {}", self.groups.len(), first.layout)
            }
            groups => groups
                .iter()
                .map(|g| g.layout.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// The denoising step a re-queued job resumes from: every worker group of the job saved its
/// state after it (one file per group in the job's artifact directory, named by group and step:
/// [`Artifacts::checkpoint_path`](crate::artifacts::Artifacts::checkpoint_path)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRef {
    /// Denoising steps done in those states.
    pub step: u32,
    /// Worker groups that saved one (the job's groups).
    pub groups: u32,
}

/// One job, as the coordinator knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    /// Free-form name the studio gave the job.
    pub name: String,
    /// Higher runs first; equal priorities run in submission order.
    pub priority: i32,
    pub phase: JobPhase,
    pub spec: JobSpecs,
    /// The current or last attempt's plan; `None` until first planned.
    pub plan: Option<Plan>,
    /// Attempts started so far (a start a busy worker refused does not count).
    pub attempts: u32,
    /// Where the job resumes from if its attempt is lost.
    pub checkpoint: Option<CheckpointRef>,
    /// Unix milliseconds; 0 when not reached.
    pub submitted_at_ms: u64,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// Denoising steps finished of `steps_total` (0 until planned).
    pub steps_done: u32,
    pub steps_total: u32,
    /// Why the job failed or was cancelled; why it was re-queued while it waits again.
    pub message: String,
    /// Size of the finished output in bytes.
    pub output_bytes: u64,
    /// Where a finished job's time went.
    pub time_split: Option<TimeSplit>,
    /// The idempotency key it was submitted with (empty: none).
    pub request_id: String,
    /// The step its current or last attempt resumed from (0: from the start).
    pub resumed_from_step: u32,
    /// Who submitted it (the owner its API token names; empty on a farm without tokens).
    pub owner: String,
    /// The W3C `traceparent` of the submission, so that every attempt (on any coordinator)
    /// joins the trace of the command that submitted it; empty where traces are not exported.
    pub trace_parent: String,
}

impl JobRecord {
    /// A job just accepted: queued, nothing planned.
    pub fn queued(
        id: String,
        request: SpecRequest,
        priority: i32,
        name: String,
        submitted_at_ms: u64,
    ) -> Self {
        Self {
            id,
            name,
            priority,
            phase: JobPhase::Queued,
            spec: JobSpecs::Submitted(request),
            plan: None,
            attempts: 0,
            checkpoint: None,
            submitted_at_ms,
            started_at_ms: 0,
            finished_at_ms: 0,
            steps_done: 0,
            steps_total: 0,
            message: String::new(),
            output_bytes: 0,
            time_split: None,
            request_id: String::new(),
            resumed_from_step: 0,
            owner: String::new(),
            trace_parent: String::new(),
        }
    }

    /// Seconds from the ranks starting to the job ending.
    pub fn render_s(&self) -> f64 {
        self.finished_at_ms.saturating_sub(self.started_at_ms) as f64 / 1000.0
    }
}

impl From<&JobRecord> for Job {
    fn from(record: &JobRecord) -> Self {
        Job {
            id: record.id.clone(),
            spec: Some(record.spec.to_render_spec()),
            priority: record.priority,
            state: JobState::from(record.phase) as i32,
            steps_done: record.steps_done,
            steps_total: record.steps_total,
            submitted_at_ms: record.submitted_at_ms,
            started_at_ms: record.started_at_ms,
            finished_at_ms: record.finished_at_ms,
            message: record.message.clone(),
            workers: record.plan.as_ref().map(Plan::workers).unwrap_or_default(),
            attempts: record.attempts,
            output_bytes: record.output_bytes,
            name: record.name.clone(),
            time_split: record.time_split,
            request_id: record.request_id.clone(),
            resumed_from_step: record.resumed_from_step,
            owner: record.owner.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_map_to_the_protocol_and_back() {
        use JobPhase::*;
        for phase in [Queued, Planned, Running, Done, Failed, Cancelled] {
            assert_eq!(
                JobPhase::from_proto(JobState::from(phase) as i32),
                Some(phase)
            );
            assert_eq!(
                JobState::from(phase)
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_lowercase(),
                phase.name()
            );
        }
        assert_eq!(JobPhase::from_proto(JobState::Unspecified as i32), None);
        assert_eq!(JobPhase::from_proto(99), None);
        let ended: Vec<JobPhase> = [Queued, Planned, Running, Done, Failed, Cancelled]
            .into_iter()
            .filter(|p| p.is_ended())
            .collect();
        assert_eq!(ended, [Done, Failed, Cancelled]);
        assert!(Planned.is_active() && Running.is_active() && !Queued.is_active());
    }

    #[test]
    fn the_protocol_job_shows_the_resolved_spec_and_the_plan_workers() {
        let request = SpecRequest::try_from(&RenderSpec {
            prompt: "a wolf".into(),
            frames: 9,
            fps: 16,
            guidance_scale: 5.0,
            layout: "cfg=2".into(),
            ..Default::default()
        })
        .unwrap();
        let mut record = JobRecord::queued("j-1".into(), request.clone(), 3, "shot".into(), 10);
        let job = Job::from(&record);
        assert_eq!(job.spec, Some(RenderSpec::from(&request)));
        assert_eq!((job.state, job.priority), (JobState::Queued as i32, 3));
        assert!(job.workers.is_empty());

        let resolved = request
            .resolve(&longtake_proto::spec::ModelDescription {
                name: "tiny".into(),
                default_width: 64,
                default_height: 64,
                default_steps: 3,
                ..Default::default()
            })
            .unwrap();
        record.spec = JobSpecs::Resolved {
            request,
            resolved: Box::new(resolved.clone()),
        };
        record.plan = Some(Plan::single(
            vec!["w2".into(), "w1".into()],
            resolved.layout,
        ));
        let job = Job::from(&record);
        assert_eq!(job.spec, Some(RenderSpec::from(&resolved)));
        assert_eq!(job.workers, ["w2", "w1"]);
        assert_eq!(
            record.plan.unwrap().layout_text(),
            resolved.layout.to_string()
        );
    }
}
