//! The job record as it is stored (JSON, in etcd or in memory) and read back: [`StoredJob`],
//! schema version [`SCHEMA_VERSION`], written by [`encode`]; [`decode`] reads it and every older
//! version this coordinator knows.
//!
//! Versions:
//! - 1 (no `schema` field): the protocol's `Job` message as serde JSON, what coordinators wrote
//!   before the record had its own format. Its spec becomes the submitted spec (once planned it
//!   held the resolved spec, every field set, which re-resolves to itself), its workers one
//!   group running the spec's layout.
//! - 2: [`StoredJob`]: the spec as submitted and as resolved, the plan's groups, the attempt
//!   count and the checkpoint reference.
//!
//! Text that is not JSON of a job is a [`StoreError::Decode`] and the store refuses to load (a
//! job skipped silently would be worse than a coordinator that does not start). A record that is
//! readable but not usable (a newer schema, an invalid spec) comes back with a [`RecordProblem`]
//! naming the job and what to do, so that job fails and the others carry on.

use longtake_proto::spec::{
    JobSpec, Layout, LayoutError, ModelDescription, SpecError, SpecRequest,
};
use longtake_proto::{Job, RenderSpec, TimeSplit};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::record::{
    is_job_id, CheckpointRef, GroupPlan, JobPhase, JobRecord, JobSpecs, Plan, WindowRange,
};

/// The version [`encode`] writes.
pub const SCHEMA_VERSION: u32 = 2;

/// A job record as stored, version 2. Specs are kept in the protocol's `RenderSpec` form, the
/// spec's one serialised shape (a `SpecRequest` and a `JobSpec` both convert to and from it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    pub schema: u32,
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub priority: i32,
    pub phase: StoredPhase,
    /// The spec as submitted.
    pub spec: RenderSpec,
    /// The spec with the model's defaults, once planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<RenderSpec>,
    /// The current or last attempt's plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<StoredPlan>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<StoredCheckpoint>,
    #[serde(default)]
    pub submitted_at_ms: u64,
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: u64,
    #[serde(default)]
    pub steps_done: u32,
    #[serde(default)]
    pub steps_total: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub output_bytes: u64,
    /// Where a finished job's time went (added within version 2: older records have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_split: Option<TimeSplit>,
    /// The idempotency key it was submitted with (added within version 2).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// The step its current or last attempt resumed from (added within version 2).
    #[serde(default)]
    pub resumed_from_step: u32,
    /// Who submitted it (added within version 2: older records have no owner, which only an
    /// admin reaches on a farm with tokens).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// The submission's trace context (added within version 2).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_parent: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredPhase {
    Queued,
    Planned,
    Running,
    Done,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPlan {
    pub groups: Vec<StoredGroup>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<StoredWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredGroup {
    /// Worker ids in rank order.
    pub workers: Vec<String>,
    /// The layout in its `cfg=…,tp=…` form.
    pub layout: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWindow {
    pub start: u32,
    pub end: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheckpoint {
    pub step: u32,
    /// Added within version 2 (older records name one file in a `path`, which is ignored: the
    /// files are found by group and step).
    #[serde(default = "one_group")]
    pub groups: u32,
}

fn one_group() -> u32 {
    1
}

/// Why a stored record can be listed but not run. Each message names the job and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordProblem {
    #[error("job {id}: its stored spec is invalid: {source}; submit the job again")]
    InvalidSpec {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("job {id}: its stored plan is invalid: {source}; submit the job again")]
    InvalidPlan {
        id: String,
        #[source]
        source: LayoutError,
    },
    #[error("job {id}: its stored state {state} is not a job state; submit the job again")]
    InvalidState { id: String, state: i32 },
    #[error(
        "job {id}: its record {key} has schema version {found}, but this coordinator reads \
         versions 1 to {SCHEMA_VERSION}; a newer coordinator wrote it: run that version, or \
         delete the record to drop the job"
    )]
    UnknownSchema { id: String, key: String, found: u32 },
    #[error(
        "the record {key} holds the job id {id:?}, which is not the id its key names or not a \
         job id at all (letters, digits, - and _); longtake never writes such a record: delete \
         the key"
    )]
    InvalidId { id: String, key: String },
}

/// One record as read back: the job as far as it could be read, and why it cannot run when it
/// cannot.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedJob {
    /// With a problem: what could be read (an unreadable spec kept as stored; for an unknown
    /// schema only the id, name, priority and submission time, the phase FAILED and the problem
    /// as its message).
    pub record: JobRecord,
    pub problem: Option<RecordProblem>,
}

/// The record in the current schema, as JSON.
pub fn encode(record: &JobRecord) -> Vec<u8> {
    serde_json::to_vec(&StoredJob::from(record)).expect("a job record always serialises")
}

/// Reads a stored record. `key` names it in errors (the etcd key, or the id in memory).
pub fn decode(key: &str, bytes: &[u8]) -> Result<LoadedJob, StoreError> {
    let mut loaded = decode_record(key, bytes)?;
    // The id names the job's artifact directory and its key: one that is not the key's own or
    // not an id at all (`..`, `../victim`) fails the job, which then never runs, and the
    // artifact directory refuses it.
    let id = &loaded.record.id;
    if !is_job_id(id) || key.rsplit('/').next() != Some(id.as_str()) {
        let problem = RecordProblem::InvalidId {
            id: id.clone(),
            key: key.to_string(),
        };
        loaded.record.phase = JobPhase::Failed;
        loaded.record.message = problem.to_string();
        loaded.problem = Some(problem);
    }
    Ok(loaded)
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<LoadedJob, StoreError> {
    let decode_error = |source| StoreError::Decode {
        key: key.to_string(),
        source,
    };
    /// The fields every schema has, read before knowing which one it is.
    #[derive(Deserialize)]
    struct Header {
        #[serde(default)]
        schema: Option<u32>,
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        priority: i32,
        #[serde(default)]
        submitted_at_ms: u64,
        #[serde(default)]
        owner: String,
    }
    let header: Header = serde_json::from_slice(bytes).map_err(decode_error)?;
    match header.schema {
        None | Some(1) => Ok(from_v1(
            serde_json::from_slice::<Job>(bytes).map_err(decode_error)?,
        )),
        Some(SCHEMA_VERSION) => Ok(from_v2(
            serde_json::from_slice::<StoredJob>(bytes).map_err(decode_error)?,
        )),
        Some(found) => {
            let id = if header.id.is_empty() {
                key.rsplit('/').next().unwrap_or(key).to_string()
            } else {
                header.id
            };
            let problem = RecordProblem::UnknownSchema {
                id: id.clone(),
                key: key.to_string(),
                found,
            };
            let record = JobRecord {
                id,
                name: header.name,
                priority: header.priority,
                phase: JobPhase::Failed,
                spec: JobSpecs::Unreadable(RenderSpec::default()),
                plan: None,
                attempts: 0,
                checkpoint: None,
                submitted_at_ms: header.submitted_at_ms,
                started_at_ms: 0,
                finished_at_ms: 0,
                steps_done: 0,
                steps_total: 0,
                message: problem.to_string(),
                output_bytes: 0,
                time_split: None,
                request_id: String::new(),
                resumed_from_step: 0,
                owner: header.owner,
                trace_parent: String::new(),
            };
            Ok(LoadedJob {
                record,
                problem: Some(problem),
            })
        }
    }
}

/// A version 1 record: the protocol's `Job`.
fn from_v1(job: Job) -> LoadedJob {
    let raw_spec = job.spec.clone().unwrap_or_default();
    let mut problem = None;
    let spec = match SpecRequest::try_from(&raw_spec) {
        Ok(request) => JobSpecs::Submitted(request),
        Err(source) => {
            problem = Some(RecordProblem::InvalidSpec {
                id: job.id.clone(),
                source,
            });
            JobSpecs::Unreadable(raw_spec)
        }
    };
    let phase = JobPhase::from_proto(job.state).unwrap_or_else(|| {
        problem.get_or_insert(RecordProblem::InvalidState {
            id: job.id.clone(),
            state: job.state,
        });
        // Never run, and listed as what it has become once restored: a failed job.
        JobPhase::Failed
    });
    // Version 1 kept the workers of the current or last attempt in rank order: one group
    // running the spec's layout. Without a readable spec its layout is unknown, so no plan.
    let plan = match spec.request() {
        Some(request) if !job.workers.is_empty() => {
            Some(Plan::single(job.workers.clone(), request.layout))
        }
        _ => None,
    };
    LoadedJob {
        record: JobRecord {
            id: job.id,
            name: job.name,
            priority: job.priority,
            phase,
            spec,
            plan,
            attempts: job.attempts,
            checkpoint: None,
            submitted_at_ms: job.submitted_at_ms,
            started_at_ms: job.started_at_ms,
            finished_at_ms: job.finished_at_ms,
            steps_done: job.steps_done,
            steps_total: job.steps_total,
            message: job.message,
            output_bytes: job.output_bytes,
            time_split: job.time_split,
            request_id: job.request_id,
            resumed_from_step: job.resumed_from_step,
            owner: job.owner,
            trace_parent: String::new(),
        },
        problem,
    }
}

/// A version 2 record.
fn from_v2(stored: StoredJob) -> LoadedJob {
    let id = stored.id.clone();
    let invalid_spec = |source| RecordProblem::InvalidSpec {
        id: id.clone(),
        source,
    };
    let spec = SpecRequest::try_from(&stored.spec).and_then(|request| {
        let resolved = stored.resolved.as_ref().map(resolved_spec).transpose()?;
        Ok(match resolved {
            Some(resolved) => JobSpecs::Resolved {
                request,
                resolved: Box::new(resolved),
            },
            None => JobSpecs::Submitted(request),
        })
    });
    let (spec, spec_problem) = match spec {
        Ok(spec) => (spec, None),
        Err(source) => (
            JobSpecs::Unreadable(stored.spec.clone()),
            Some(invalid_spec(source)),
        ),
    };
    let plan = stored.plan.map(Plan::try_from).transpose();
    let (plan, plan_problem) = match plan {
        Ok(plan) => (plan, None),
        Err(source) => (
            None,
            Some(RecordProblem::InvalidPlan {
                id: id.clone(),
                source,
            }),
        ),
    };
    LoadedJob {
        record: JobRecord {
            id: stored.id,
            name: stored.name,
            priority: stored.priority,
            phase: stored.phase.into(),
            spec,
            plan,
            attempts: stored.attempts,
            checkpoint: stored.checkpoint.map(|c| CheckpointRef {
                step: c.step,
                groups: c.groups,
            }),
            submitted_at_ms: stored.submitted_at_ms,
            started_at_ms: stored.started_at_ms,
            finished_at_ms: stored.finished_at_ms,
            steps_done: stored.steps_done,
            steps_total: stored.steps_total,
            message: stored.message,
            output_bytes: stored.output_bytes,
            time_split: stored.time_split,
            request_id: stored.request_id,
            resumed_from_step: stored.resumed_from_step,
            owner: stored.owner,
            trace_parent: stored.trace_parent,
        },
        problem: spec_problem.or(plan_problem),
    }
}

/// A resolved spec read back: every field is set, so resolving it against a model that lends
/// no defaults gives it back (and a missing field is an error naming it). The layout was fitted
/// to the model when it was first resolved.
fn resolved_spec(spec: &RenderSpec) -> Result<JobSpec, SpecError> {
    let request = SpecRequest::try_from(spec)?;
    request.resolve(&ModelDescription {
        name: request.model.clone(),
        ..Default::default()
    })
}

impl From<&JobRecord> for StoredJob {
    fn from(record: &JobRecord) -> Self {
        let (spec, resolved) = match &record.spec {
            JobSpecs::Submitted(request) => (RenderSpec::from(request), None),
            JobSpecs::Resolved { request, resolved } => (
                RenderSpec::from(request),
                Some(RenderSpec::from(resolved.as_ref())),
            ),
            JobSpecs::Unreadable(raw) => (raw.clone(), None),
        };
        StoredJob {
            schema: SCHEMA_VERSION,
            id: record.id.clone(),
            name: record.name.clone(),
            priority: record.priority,
            phase: record.phase.into(),
            spec,
            resolved,
            plan: record.plan.as_ref().map(StoredPlan::from),
            attempts: record.attempts,
            checkpoint: record.checkpoint.map(|c| StoredCheckpoint {
                step: c.step,
                groups: c.groups,
            }),
            submitted_at_ms: record.submitted_at_ms,
            started_at_ms: record.started_at_ms,
            finished_at_ms: record.finished_at_ms,
            steps_done: record.steps_done,
            steps_total: record.steps_total,
            message: record.message.clone(),
            output_bytes: record.output_bytes,
            time_split: record.time_split,
            request_id: record.request_id.clone(),
            resumed_from_step: record.resumed_from_step,
            owner: record.owner.clone(),
            trace_parent: record.trace_parent.clone(),
        }
    }
}

impl From<&Plan> for StoredPlan {
    fn from(plan: &Plan) -> Self {
        StoredPlan {
            groups: plan
                .groups
                .iter()
                .map(|g| StoredGroup {
                    workers: g.workers.clone(),
                    layout: g.layout.to_string(),
                })
                .collect(),
            windows: plan
                .windows
                .iter()
                .map(|w| StoredWindow {
                    start: w.start,
                    end: w.end,
                })
                .collect(),
        }
    }
}

impl TryFrom<StoredPlan> for Plan {
    type Error = LayoutError;

    fn try_from(stored: StoredPlan) -> Result<Self, LayoutError> {
        let groups = stored
            .groups
            .into_iter()
            .map(|g| {
                Ok(GroupPlan {
                    layout: g.layout.parse::<Layout>()?,
                    workers: g.workers,
                })
            })
            .collect::<Result<Vec<_>, LayoutError>>()?;
        let windows = stored
            .windows
            .into_iter()
            .map(|w| WindowRange {
                start: w.start,
                end: w.end,
            })
            .collect();
        Ok(Plan { groups, windows })
    }
}

impl From<JobPhase> for StoredPhase {
    fn from(phase: JobPhase) -> Self {
        match phase {
            JobPhase::Queued => Self::Queued,
            JobPhase::Planned => Self::Planned,
            JobPhase::Running => Self::Running,
            JobPhase::Done => Self::Done,
            JobPhase::Failed => Self::Failed,
            JobPhase::Cancelled => Self::Cancelled,
        }
    }
}

impl From<StoredPhase> for JobPhase {
    fn from(phase: StoredPhase) -> Self {
        match phase {
            StoredPhase::Queued => Self::Queued,
            StoredPhase::Planned => Self::Planned,
            StoredPhase::Running => Self::Running,
            StoredPhase::Done => Self::Done,
            StoredPhase::Failed => Self::Failed,
            StoredPhase::Cancelled => Self::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::OutputFormat;

    /// What a coordinator before the versioned format wrote: the protocol's `Job` as serde JSON,
    /// no schema field (produced with `serde_json::to_string` of a `Job` by that code).
    const V1_RUNNING: &str = r#"{"id":"j-lz3k9q1abcd","spec":{"prompt":"a wolf howls at the moon","negative_prompt":"","model":"tiny","frames":9,"width":64,"height":64,"steps":3,"guidance_scale":5.0,"shift":null,"scheduler":"","seed":7,"fps":16,"format":0,"layout":"cfg=2"},"priority":2,"state":3,"steps_done":1,"steps_total":3,"submitted_at_ms":1700000000000,"started_at_ms":1700000001000,"finished_at_ms":0,"message":"","workers":["w1","w2"],"attempts":1,"output_bytes":0,"name":"shot 12"}"#;

    fn request() -> SpecRequest {
        SpecRequest::try_from(&RenderSpec {
            prompt: "a wolf".into(),
            negative_prompt: "blur".into(),
            frames: 17,
            height: 96,
            guidance_scale: 5.0,
            shift: Some(3.0),
            scheduler: "euler".into(),
            seed: 42,
            fps: 24,
            format: OutputFormat::Png as i32,
            layout: "cfg=2,ulysses=2".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn planned() -> JobRecord {
        let submitted = request();
        let resolved = submitted
            .resolve(&ModelDescription {
                name: "tiny".into(),
                default_width: 64,
                default_height: 64,
                default_steps: 3,
                attention_heads: 4,
                ffn_dim: 64,
                ..Default::default()
            })
            .unwrap();
        JobRecord {
            phase: JobPhase::Planned,
            plan: Some(Plan {
                groups: vec![GroupPlan {
                    workers: vec!["w3".into(), "w1".into(), "w2".into(), "w0".into()],
                    layout: resolved.layout,
                }],
                windows: vec![WindowRange { start: 0, end: 5 }],
            }),
            spec: JobSpecs::Resolved {
                request: submitted,
                resolved: Box::new(resolved),
            },
            attempts: 2,
            checkpoint: Some(CheckpointRef { step: 2, groups: 1 }),
            started_at_ms: 30,
            steps_total: 3,
            message: "re-queued: worker w9 (rank 0) lost".into(),
            ..JobRecord::queued("j-1".into(), request(), -3, "shot 7".into(), 20)
        }
    }

    #[test]
    fn a_record_round_trips_through_the_stored_format() {
        for record in [
            JobRecord::queued("j-2".into(), request(), 0, String::new(), 5),
            planned(),
            JobRecord {
                phase: JobPhase::Done,
                finished_at_ms: 90,
                output_bytes: 12345,
                steps_done: 3,
                request_id: "render-farm:shot-12:take-3".into(),
                owner: "studio-a".into(),
                time_split: Some(TimeSplit {
                    denoise_s: 2.5,
                    exchange_s: 0.25,
                    encode_s: 0.125,
                    wall_s: 3.0,
                    ..Default::default()
                }),
                ..planned()
            },
        ] {
            let bytes = encode(&record);
            let stored: StoredJob = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(stored.schema, SCHEMA_VERSION);
            let loaded = decode(&format!("/longtake/jobs/{}", record.id), &bytes).unwrap();
            assert_eq!(loaded.problem, None);
            assert_eq!(loaded.record, record);
        }
    }

    #[test]
    fn a_version_1_record_is_migrated() {
        let loaded = decode("/longtake/jobs/j-lz3k9q1abcd", V1_RUNNING.as_bytes()).unwrap();
        assert_eq!(loaded.problem, None);
        let record = loaded.record;
        assert_eq!(record.id, "j-lz3k9q1abcd");
        assert_eq!(
            (record.name.as_str(), record.priority, record.phase),
            ("shot 12", 2, JobPhase::Running)
        );
        let request = record.spec.request().unwrap();
        assert_eq!(
            (request.prompt.as_str(), request.width, request.steps),
            ("a wolf howls at the moon", Some(64), Some(3))
        );
        assert_eq!(request.layout.to_string(), "cfg=2,tp=1,ulysses=1,ring=1");
        let plan = record.plan.as_ref().unwrap();
        assert_eq!(plan.groups.len(), 1);
        assert_eq!(plan.groups[0].workers, ["w1", "w2"]);
        assert_eq!(plan.groups[0].layout, request.layout);
        assert!(plan.windows.is_empty());
        assert_eq!(
            (record.attempts, record.steps_done, record.steps_total),
            (1, 1, 3)
        );
        assert_eq!(
            (
                record.submitted_at_ms,
                record.started_at_ms,
                record.finished_at_ms
            ),
            (1_700_000_000_000, 1_700_000_001_000, 0)
        );
        assert_eq!(record.checkpoint, None);
        // What clients are shown is what the version 1 record held, the layout in the canonical
        // form a coordinator writes.
        let mut v1: Job = serde_json::from_str(V1_RUNNING).unwrap();
        v1.spec.as_mut().unwrap().layout = "cfg=2,tp=1,ulysses=1,ring=1".into();
        assert_eq!(Job::from(&record), v1);
    }

    #[test]
    fn a_version_1_record_with_an_invalid_spec_comes_back_with_its_problem() {
        let bad = V1_RUNNING.replace(r#""layout":"cfg=2""#, r#""layout":"tp=two""#);
        let loaded = decode("/longtake/jobs/j-lz3k9q1abcd", bad.as_bytes()).unwrap();
        let problem = loaded.problem.unwrap().to_string();
        assert!(
            problem.starts_with(
                "job j-lz3k9q1abcd: its stored spec is invalid: spec.layout: layout `tp=two`"
            ),
            "{problem}"
        );
        assert!(problem.ends_with("; submit the job again"), "{problem}");
        // kept as stored, so it is shown and written back unchanged
        assert_eq!(
            loaded.record.spec.to_render_spec().layout,
            "tp=two".to_string()
        );
        let again = decode("j", &encode(&loaded.record)).unwrap();
        assert_eq!(again.record.spec, loaded.record.spec);
    }

    #[test]
    fn a_newer_schema_is_refused_naming_the_job_and_what_to_do() {
        let newer = br#"{"schema": 99, "id": "j-9", "name": "shot 9", "priority": 1,
            "submitted_at_ms": 7, "phase": {"rendering": {"window": 3}}}"#;
        let loaded = decode("/longtake/jobs/j-9", newer).unwrap();
        assert_eq!(
            loaded.problem,
            Some(RecordProblem::UnknownSchema {
                id: "j-9".into(),
                key: "/longtake/jobs/j-9".into(),
                found: 99,
            })
        );
        assert_eq!(
            loaded.problem.unwrap().to_string(),
            "job j-9: its record /longtake/jobs/j-9 has schema version 99, but this coordinator \
             reads versions 1 to 2; a newer coordinator wrote it: run that version, or delete the \
             record to drop the job"
        );
        let record = loaded.record;
        assert_eq!(record.phase, JobPhase::Failed);
        assert_eq!(
            (
                record.name.as_str(),
                record.priority,
                record.submitted_at_ms
            ),
            ("shot 9", 1, 7)
        );
        // no id in the record: the key names it
        let loaded = decode("/longtake/jobs/j-10", br#"{"schema": 3}"#).unwrap();
        assert_eq!(loaded.record.id, "j-10");
    }

    /// A record whose id is not the id its key names, or not an id at all (`..`, `../victim`:
    /// once the coordinator served, deleted and wrote files outside its artifact directory
    /// for such records), fails its job with the reason and what to do; it never runs.
    #[test]
    fn a_record_whose_id_is_not_its_keys_job_id_fails_its_job() {
        for (key, id) in [
            ("/longtake/jobs/..", ".."),
            ("/longtake/jobs/victim", "../victim"),
            ("/longtake/jobs/j-1", "j-2"),
            ("/longtake/jobs/", ""),
        ] {
            let record = JobRecord {
                id: id.to_string(),
                ..planned()
            };
            let loaded = decode(key, &encode(&record)).unwrap();
            assert_eq!(
                loaded.problem,
                Some(RecordProblem::InvalidId {
                    id: id.to_string(),
                    key: key.to_string()
                }),
                "{key} holding {id:?}"
            );
            assert_eq!(loaded.record.phase, JobPhase::Failed);
            assert!(loaded.record.message.ends_with("delete the key"));
        }
        let good = decode("/longtake/jobs/j-1", &encode(&planned())).unwrap();
        assert_eq!(good.problem, None);
    }

    #[test]
    fn text_that_is_not_a_job_record_is_an_error_naming_the_key() {
        for text in [
            &b"{\"id\": "[..],
            b"\"a string\"",
            br#"{"schema": 2, "id": "j-1"}"#,
        ] {
            let e = decode("/longtake/jobs/j-bad", text).unwrap_err();
            assert!(
                matches!(e, StoreError::Decode { ref key, .. } if key == "/longtake/jobs/j-bad"),
                "{e}"
            );
        }
    }
}
