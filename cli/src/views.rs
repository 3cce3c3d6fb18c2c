//! How jobs, workers and job events look to people (tables, one-line summaries) and to scripts
//! (the JSON of the CLI contract, with state names instead of enum numbers).

use std::fmt::Write as _;

use longtake_coordinator::record::JobPhase;
use longtake_proto::{job_event, Job, JobEvent, JobState, OutputFormat, TimeSplit, Worker};
use serde_json::{json, Value};

/// `queued`, `planned`, `running`, `done`, `failed`, `cancelled` (`unknown` for anything else).
pub fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Queued) => "queued",
        Ok(JobState::Planned) => "planned",
        Ok(JobState::Running) => "running",
        Ok(JobState::Done) => "done",
        Ok(JobState::Failed) => "failed",
        Ok(JobState::Cancelled) => "cancelled",
        Ok(JobState::Unspecified) | Err(_) => "unknown",
    }
}

/// The inverse of [`job_state_name`], for `list --state`.
pub fn parse_job_state(name: &str) -> Result<JobState, String> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "queued" => JobState::Queued,
        "planned" => JobState::Planned,
        "running" => JobState::Running,
        "done" => JobState::Done,
        "failed" => JobState::Failed,
        "cancelled" | "canceled" => JobState::Cancelled,
        other => {
            return Err(format!(
                "unknown job state {other:?}: expected queued, planned, running, done, failed or cancelled"
            ))
        }
    })
}

/// Whether a job in this state will change no more (the coordinator's one definition).
pub fn is_final(state: i32) -> bool {
    JobPhase::from_proto(state).is_some_and(JobPhase::is_ended)
}

pub use longtake_proto::worker_state_name;

pub fn format_name(format: i32) -> &'static str {
    match OutputFormat::try_from(format) {
        Ok(OutputFormat::Png) => "png",
        _ => "mp4",
    }
}

/// The contract's JSON job.
pub fn job_json(job: &Job) -> Value {
    let spec = job.spec.as_ref().map(|spec| {
        let mut value = serde_json::to_value(spec).unwrap_or(Value::Null);
        if let Some(map) = value.as_object_mut() {
            map.insert("format".into(), json!(format_name(spec.format)));
        }
        value
    });
    json!({
        "id": job.id,
        "name": job.name,
        "state": job_state_name(job.state),
        "priority": job.priority,
        "steps_done": job.steps_done,
        "steps_total": job.steps_total,
        "attempts": job.attempts,
        "workers": job.workers,
        "message": job.message,
        "submitted_at_ms": job.submitted_at_ms,
        "started_at_ms": job.started_at_ms,
        "finished_at_ms": job.finished_at_ms,
        "output_bytes": job.output_bytes,
        "spec": spec.unwrap_or(Value::Null),
        "time_split": job.time_split,
        "request_id": job.request_id,
        "resumed_from_step": job.resumed_from_step,
        "owner": job.owner,
    })
}

/// The contract's JSON worker.
pub fn worker_json(worker: &Worker) -> Value {
    json!({
        "id": worker.id,
        "address": worker.address,
        "state": worker_state_name(worker.state),
        "job_id": worker.job_id,
        "devices": worker.devices,
        "memory_bytes": worker.memory_bytes,
        "labels": worker.labels,
        "models": worker.models,
    })
}

/// One `watch --json` line: the event's kind under `event` and its fields beside it.
pub fn event_json(event: &JobEvent) -> Value {
    let mut value = json!({
        "job_id": event.job_id,
        "state": job_state_name(event.state),
        "at_ms": event.at_ms,
    });
    let (kind, fields) = match &event.event {
        None => ("state", json!({})),
        Some(job_event::Event::Queued(e)) => (
            "queued",
            json!({"position": e.position, "reason": e.reason}),
        ),
        Some(job_event::Event::Planned(e)) => (
            "planned",
            json!({"workers": e.workers, "layout": e.layout, "attempt": e.attempt, "windows": e.windows}),
        ),
        Some(job_event::Event::Step(e)) => (
            "step",
            json!({"step": e.step, "total": e.total, "elapsed_s": e.elapsed_s, "step_s": e.step_s,
                   "group_exchange_bytes": e.group_exchange_bytes}),
        ),
        Some(job_event::Event::Decoding(e)) => ("decoding", json!({"frames": e.frames})),
        Some(job_event::Event::Encoding(e)) => (
            "encoding",
            json!({"frames_written": e.frames_written, "frames_total": e.frames_total}),
        ),
        Some(job_event::Event::Done(e)) => (
            "done",
            json!({"output_bytes": e.output_bytes, "render_s": e.render_s, "time_split": e.time_split}),
        ),
        Some(job_event::Event::Failed(e)) => ("failed", json!({"reason": e.reason})),
        Some(job_event::Event::Cancelled(e)) => ("cancelled", json!({"reason": e.reason})),
    };
    let map = value.as_object_mut().expect("built as an object");
    map.insert("event".into(), json!(kind));
    if let Value::Object(fields) = fields {
        map.extend(fields);
    }
    value
}

/// `status ID` for people: a few `key: value` lines.
pub fn job_details(job: &Job) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "job:       {}", job.id);
    if !job.name.is_empty() {
        let _ = writeln!(out, "name:      {}", printable(&job.name));
    }
    let _ = writeln!(out, "state:     {}", job_state_name(job.state));
    if !job.message.is_empty() {
        let _ = writeln!(out, "message:   {}", printable(&job.message));
    }
    let _ = writeln!(out, "priority:  {}", job.priority);
    if !job.owner.is_empty() {
        let _ = writeln!(out, "owner:     {}", printable(&job.owner));
    }
    if !job.request_id.is_empty() {
        let _ = writeln!(out, "request:   {}", printable(&job.request_id));
    }
    let _ = writeln!(out, "progress:  {}", progress_text(job));
    if job.resumed_from_step > 0 {
        let _ = writeln!(
            out,
            "resumed:   attempt {} continued from the checkpoint of step {}",
            job.attempts, job.resumed_from_step
        );
    }
    if !job.workers.is_empty() {
        let _ = writeln!(
            out,
            "workers:   {} (attempt {})",
            job.workers.join(", "),
            job.attempts
        );
    }
    if let Some(spec) = &job.spec {
        let size = if spec.width == 0 {
            "model default size".to_string()
        } else {
            format!("{}x{}", spec.width, spec.height)
        };
        // Zero: the model's default, filled in once the job is placed.
        let or_default = |value: u32| match value {
            0 => "default".to_string(),
            set => set.to_string(),
        };
        let _ = writeln!(
            out,
            "spec:      {} frames at {size}, {} fps, {} steps, seed {}, model {}, {}{}",
            or_default(spec.frames),
            or_default(spec.fps),
            or_default(spec.steps),
            spec.seed,
            spec.model,
            format_name(spec.format),
            if spec.layout.is_empty() {
                String::new()
            } else {
                format!(", layout {}", spec.layout)
            }
        );
        if let Some(input) = &spec.input {
            let _ = writeln!(out, "input:     {}", input_text(input));
        }
        let _ = writeln!(out, "prompt:    {}", printable(&spec.prompt));
        for cue in &spec.prompt_timeline {
            let _ = writeln!(
                out,
                "  from {} s: {}",
                cue.at_seconds,
                printable(&cue.prompt)
            );
        }
    }
    if job.output_bytes > 0 {
        let _ = writeln!(out, "output:    {} bytes", job.output_bytes);
    }
    if let Some(elapsed) = elapsed_s(job) {
        let _ = writeln!(out, "time:      {elapsed:.1} s rendering");
    }
    if let Some(split) = &job.time_split {
        let _ = writeln!(out, "split:     {}", time_split_text(split));
    }
    out
}

/// A job's input file as `status` shows it: `a clip to extend: 81 frames, 64x64, 16 fps;
/// 23909 bytes, sha256 ab12…` (what the coordinator read of it).
fn input_text(input: &longtake_proto::Input) -> String {
    let read = format!(
        "{} bytes, sha256 {}",
        input.bytes,
        printable(input.sha256.get(..16).unwrap_or(&input.sha256))
    );
    match longtake_proto::InputKind::try_from(input.kind) {
        Ok(longtake_proto::InputKind::Clip) => format!(
            "a clip to extend: {} frames, {}x{}, {} fps; {read}",
            input.frames, input.width, input.height, input.fps
        ),
        Ok(longtake_proto::InputKind::Image) => {
            format!(
                "a picture to start from: {}x{}; {read}",
                input.width, input.height
            )
        }
        _ => format!("kind {} (unknown to this CLI)", input.kind),
    }
}

/// Where a finished job's time went, in one line: the workers' phases (each the slowest rank's)
/// and the coordinator's.
pub fn time_split_text(t: &TimeSplit) -> String {
    let exchange = if t.exchange_s > 0.0 {
        format!(" (exchange between groups {:.2} s)", t.exchange_s)
    } else {
        String::new()
    };
    format!(
        "load {:.2} s, text {:.2} s, denoise {:.2} s{exchange}, decode {:.2} s, \
         send {:.2} s, stitch {:.2} s, encode {:.2} s; {:.2} s in all",
        t.load_s, t.text_s, t.denoise_s, t.decode_s, t.send_s, t.stitch_s, t.encode_s, t.wall_s
    )
}

/// `list` for people: one row per job, oldest first.
pub fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.id.clone(),
                job_state_name(job.state).to_string(),
                job.priority.to_string(),
                progress_text(job),
                job.name.clone(),
                job.spec
                    .as_ref()
                    .map(|s| shorten(&printable(&s.prompt), 40))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(&["ID", "STATE", "PRI", "STEPS", "NAME", "PROMPT"], &rows)
}

/// `workers` for people: one row per worker.
pub fn workers_table(workers: &[Worker]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.address.clone(),
                worker_state_name(w.state).to_string(),
                w.job_id.clone(),
                w.devices
                    .iter()
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>()
                    .join(","),
                w.models
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<Vec<_>>()
                    .join(","),
                w.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table(
        &[
            "ID", "ADDRESS", "STATE", "JOB", "DEVICES", "MODELS", "LABELS",
        ],
        &rows,
    )
}

fn progress_text(job: &Job) -> String {
    if job.steps_total == 0 {
        "-".into()
    } else {
        format!("{}/{}", job.steps_done, job.steps_total)
    }
}

fn elapsed_s(job: &Job) -> Option<f64> {
    (job.started_at_ms > 0 && job.finished_at_ms >= job.started_at_ms)
        .then(|| (job.finished_at_ms - job.started_at_ms) as f64 / 1000.0)
}

/// `text` for a terminal: every control character (an escape sequence, a line break) shown
/// escaped (`\u{1b}`, `\n`) instead of acting. Text from a farm is whatever someone submitted
/// (or wrote into its store), and `list` and `status` print other people's jobs.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    // every cell may come from someone else's submission or a store record
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::{DeviceInfo, RenderSpec, Step, WorkerState};

    fn job() -> Job {
        Job {
            id: "j-1".into(),
            name: "wolf".into(),
            state: JobState::Running as i32,
            priority: 5,
            steps_done: 2,
            steps_total: 10,
            attempts: 1,
            workers: vec!["w1".into(), "w2".into()],
            spec: Some(RenderSpec {
                prompt: "a wolf".into(),
                format: OutputFormat::Png as i32,
                frames: 9,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Escape sequences in what others submitted (or wrote into the store) are shown, not
    /// acted on: `list`, `status` and `workers` print them escaped.
    #[test]
    fn control_characters_are_shown_escaped() {
        let hostile = Job {
            name: "shot\u{1b}[2J\u{1b}[31m".into(),
            message: "re-queued\r\nstate:     done (a forged line)".into(),
            spec: Some(RenderSpec {
                prompt: "a wolf\u{7}".into(),
                ..Default::default()
            }),
            ..job()
        };
        let worker = Worker {
            id: "w\u{1b}]0;owned\u{7}".into(),
            ..Default::default()
        };
        for text in [
            jobs_table(std::slice::from_ref(&hostile)),
            job_details(&hostile),
            workers_table(&[worker]),
        ] {
            let raw: Vec<char> = text
                .chars()
                .filter(|&c| c.is_control() && c != '\n')
                .collect();
            assert!(raw.is_empty(), "{raw:?} printed raw in {text:?}");
        }
        assert!(job_details(&hostile).contains("name:      shot\\u{1b}[2J"));
        assert_eq!(printable("plain text"), "plain text");
    }

    #[test]
    fn a_job_shows_the_file_it_starts_from() {
        let extension = Job {
            spec: Some(RenderSpec {
                input: Some(longtake_proto::Input {
                    held_frames: 0,
                    kind: longtake_proto::InputKind::Clip as i32,
                    bytes: 23909,
                    sha256: "0123456789abcdef0123".into(),
                    width: 64,
                    height: 64,
                    frames: 81,
                    fps: 16,
                }),
                ..job().spec.unwrap()
            }),
            ..job()
        };
        assert!(job_details(&extension).contains(
            "input:     a clip to extend: 81 frames, 64x64, 16 fps; 23909 bytes, sha256 0123456789abcdef\n"
        ));
    }

    #[test]
    fn job_json_has_the_contract_keys_and_state_names() {
        let value = job_json(&job());
        for key in [
            "id",
            "name",
            "state",
            "priority",
            "steps_done",
            "steps_total",
            "attempts",
            "workers",
            "message",
            "submitted_at_ms",
            "started_at_ms",
            "finished_at_ms",
            "output_bytes",
            "spec",
            "time_split",
            "request_id",
            "resumed_from_step",
            "owner",
        ] {
            assert!(value.get(key).is_some(), "missing {key}: {value}");
        }
        assert_eq!(value["state"], "running");
        assert_eq!(value["workers"], json!(["w1", "w2"]));
        assert_eq!(value["spec"]["format"], "png");
        assert_eq!(value["spec"]["frames"], 9);
        assert_eq!(value["spec"]["prompt"], "a wolf");
    }

    #[test]
    fn worker_json_has_the_contract_keys() {
        let worker = Worker {
            id: "w1".into(),
            address: "127.0.0.1:7071".into(),
            state: WorkerState::Draining as i32,
            devices: vec![DeviceInfo {
                name: "cpu".into(),
                ..Default::default()
            }],
            labels: [("zone".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        let value = worker_json(&worker);
        assert_eq!(value["state"], "draining");
        assert_eq!(value["devices"][0]["name"], "cpu");
        assert_eq!(value["labels"]["zone"], "a");
        for key in ["id", "address", "job_id", "memory_bytes", "models"] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert!(workers_table(&[worker]).contains("zone=a"));
    }

    #[test]
    fn state_names_round_trip() {
        for state in [
            JobState::Queued,
            JobState::Planned,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(parse_job_state(job_state_name(state as i32)), Ok(state));
        }
        assert!(parse_job_state("sleeping").is_err());
        assert!(is_final(JobState::Cancelled as i32));
        assert!(!is_final(JobState::Planned as i32));
    }

    #[test]
    fn step_event_json_is_flat() {
        let event = JobEvent {
            job_id: "j-1".into(),
            state: JobState::Running as i32,
            at_ms: 5,
            event: Some(job_event::Event::Step(Step {
                step: 2,
                total: 3,
                elapsed_s: 1.5,
                step_s: 0.5,
                ..Default::default()
            })),
        };
        let value = event_json(&event);
        assert_eq!(value["event"], "step");
        assert_eq!(value["step"], 2);
        assert_eq!(value["total"], 3);
        assert_eq!(value["state"], "running");
    }

    #[test]
    fn tables_align_columns() {
        let mut other = job();
        other.id = "j-22222".into();
        other.state = JobState::Queued as i32;
        other.steps_total = 0;
        let text = jobs_table(&[job(), other]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str| line.find("running").or(line.find("queued"));
        assert_eq!(column(lines[1]), column(lines[2]));
        assert!(lines[1].contains("2/10"));
        assert!(lines[2].contains(" - "));
    }
}
