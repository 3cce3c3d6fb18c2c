//! The commands that talk to a running farm: `submit`, `status`, `watch`, `list`, `cancel`,
//! `fetch` and `workers`, plus the watch-and-download steps `render` shares with them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use longtake_proto::spec::InputKind;
use longtake_proto::{
    job_event, submit_part, CancelRequest, Job, JobEvent, JobRequest, JobState, ListRequest,
    ListWorkersRequest, OutputFormat, SubmitPart, SubmitReply, SubmitRequest, Worker,
};

use crate::client::{Client, CoordinatorArg};
use crate::download::{Destination, Received};
use crate::inputs::Upload;
use crate::progress::JobDisplay;
use crate::spec_args::SpecArgs;
use crate::views;

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    #[command(flatten)]
    pub job: JobArgs,
    /// Print the job as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// A PNG picture the clip starts from (see `render --image`).
    #[arg(long, value_name = "FRAME.png", conflicts_with = "extend")]
    pub image: Option<PathBuf>,
    /// An H.264 MP4 clip to extend (see `extend --input`): --seconds and --frames count the
    /// new frames.
    #[arg(long, value_name = "CLIP.mp4")]
    pub extend: Option<PathBuf>,
}

/// How a job is queued: shared by `submit` and `render`.
#[derive(Args, Clone, Debug, Default)]
pub struct JobArgs {
    /// Higher runs first; equal priorities run in submission order.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A name for the job, shown by `list` and `status`.
    #[arg(long, default_value = "")]
    pub name: String,
    /// An idempotency key: a submission repeating an earlier one's request id gets that job
    /// back instead of a second one (retry a submit whose reply was lost with the same key). 1-128
    /// letters, digits and . _ : -
    #[arg(long, default_value = "")]
    pub request_id: String,
}

#[derive(Args)]
pub struct ShowArgs {
    /// Job id (as `submit` printed it).
    pub id: String,
    /// JSON for scripts (`watch`: one event per line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

#[derive(Args)]
pub struct ListArgs {
    /// Only jobs in these states, e.g. `queued,running`.
    #[arg(long, value_delimiter = ',', value_parser = views::parse_job_state)]
    pub state: Vec<JobState>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

#[derive(Args)]
pub struct CancelArgs {
    pub id: String,
    /// Why, recorded on the job.
    #[arg(long, default_value = "cancelled from the CLI")]
    pub reason: String,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

#[derive(Args)]
pub struct FetchArgs {
    pub id: String,
    /// An .mp4 file, or a directory for a PNG sequence (as the job was submitted).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

#[derive(Args)]
pub struct WorkersArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

async fn connect(arg: &CoordinatorArg) -> Result<Client> {
    arg.connect().await
}

pub async fn submit(args: SubmitArgs) -> Result<i32> {
    let format = args
        .spec
        .format
        .map(|f| f.proto())
        .unwrap_or(OutputFormat::Mp4);
    let mut built = args.spec.build(format)?;
    let upload = match (&args.image, &args.extend) {
        (Some(path), _) => Some(Upload::read(path, InputKind::Image)?),
        (None, Some(path)) => Some(Upload::read(path, InputKind::Clip)?),
        (None, None) => None,
    };
    if let Some(upload) = &upload {
        upload.attach(&mut built, &args.spec)?;
    }
    let mut client = connect(&args.coordinator).await?;
    for note in &built.notes {
        eprintln!("{note}");
    }
    let job = match &upload {
        Some(upload) => {
            submit_spec_with_input(&mut client, built.spec, &args.job, upload.bytes()).await?
        }
        None => submit_spec(&mut client, built.spec, &args.job).await?,
    };
    if args.json {
        println!("{}", views::job_json(&job));
    } else {
        println!("{}", job.id);
    }
    Ok(0)
}

/// Submits and returns the job as the coordinator recorded it.
pub async fn submit_spec(
    client: &mut Client,
    spec: longtake_proto::RenderSpec,
    job: &JobArgs,
) -> Result<Job> {
    let reply = client
        .render
        .submit(SubmitRequest {
            spec: Some(spec),
            priority: job.priority,
            name: job.name.clone(),
            request_id: job.request_id.clone(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    accepted(reply)
}

/// Submits `spec` with its input file (`bytes`: a picture or a clip, as `spec.input` says),
/// streamed to the coordinator in 1 MiB parts.
pub async fn submit_spec_with_input(
    client: &mut Client,
    spec: longtake_proto::RenderSpec,
    job: &JobArgs,
    bytes: &[u8],
) -> Result<Job> {
    const PART_BYTES: usize = 1 << 20;
    let request = SubmitPart {
        part: Some(submit_part::Part::Request(SubmitRequest {
            spec: Some(spec),
            priority: job.priority,
            name: job.name.clone(),
            request_id: job.request_id.clone(),
        })),
    };
    let parts: Vec<SubmitPart> = std::iter::once(request)
        .chain(bytes.chunks(PART_BYTES).map(|chunk| SubmitPart {
            part: Some(submit_part::Part::Data(chunk.to_vec())),
        }))
        .collect();
    let reply = client
        .render
        .submit_with_input(tokio_stream::iter(parts))
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    accepted(reply)
}

/// The job a submission's reply records.
fn accepted(reply: SubmitReply) -> Result<Job> {
    reply
        .job
        .ok_or_else(|| anyhow::anyhow!("the coordinator accepted the job but sent no record of it"))
}

pub async fn status(args: ShowArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let job = get(&mut client, &args.id).await?;
    if args.json {
        println!("{}", views::job_json(&job));
    } else {
        print!("{}", views::job_details(&job));
    }
    Ok(0)
}

pub async fn get(client: &mut Client, id: &str) -> Result<Job> {
    Ok(client
        .render
        .get(JobRequest { id: id.to_string() })
        .await
        .map_err(|s| client.error(s))?
        .into_inner())
}

pub async fn watch(args: ShowArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let last = if args.json {
        follow(&mut client, &args.id, |event| {
            println!("{}", views::event_json(event))
        })
        .await?
    } else {
        let mut display = JobDisplay::default();
        let last = follow(&mut client, &args.id, |event| display.show(event)).await;
        display.clear();
        last?
    };
    outcome(&last)?;
    Ok(0)
}

/// Streams the job's events into `show` until it ends; returns the final event. When the
/// coordinator goes away meanwhile (killed, restarted, or a standby taking over), connects
/// again to whichever of the target's coordinators answers and watches on: watching replays
/// the job's state, so nothing is missed.
pub async fn follow(
    client: &mut Client,
    id: &str,
    mut show: impl FnMut(&JobEvent),
) -> Result<JobEvent> {
    loop {
        let lost = match watch_once(client, id, &mut show).await {
            Ok(Watched::Ended(event)) => return Ok(event),
            Ok(Watched::Lost(why)) => why,
            Err(e) => return Err(e),
        };
        eprintln!(
            "lost the coordinator at {} ({lost}); re-attaching to job {id}",
            client.url()
        );
        client.reconnect().await?;
        eprintln!("re-attached to job {id} at {}", client.url());
    }
}

enum Watched {
    Ended(JobEvent),
    /// The connection to the coordinator broke, or it closed the watch before the job ended.
    Lost(String),
}

async fn watch_once(
    client: &mut Client,
    id: &str,
    show: &mut impl FnMut(&JobEvent),
) -> Result<Watched> {
    let lost = |status: &tonic::Status| crate::client::is_lost_connection(status);
    let mut stream = match client.render.watch(JobRequest { id: id.to_string() }).await {
        Ok(stream) => stream.into_inner(),
        Err(status) if lost(&status) => return Ok(Watched::Lost(status.message().to_string())),
        Err(status) => return Err(client.error(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                show(&event);
                if views::is_final(event.state) {
                    return Ok(Watched::Ended(event));
                }
            }
            Ok(None) => {
                return Ok(Watched::Lost(
                    "it ended the watch before the job ended".into(),
                ))
            }
            Err(status) if lost(&status) => return Ok(Watched::Lost(status.message().to_string())),
            Err(status) => return Err(client.error(status)),
        }
    }
}

/// Ok for a finished job; the job's reason for a failed or cancelled one.
pub fn outcome(last: &JobEvent) -> Result<()> {
    let id = &last.job_id;
    let reason = match &last.event {
        Some(job_event::Event::Failed(f)) => f.reason.clone(),
        Some(job_event::Event::Cancelled(c)) => c.reason.clone(),
        _ => String::new(),
    };
    match JobState::try_from(last.state) {
        Ok(JobState::Done) => Ok(()),
        Ok(JobState::Failed) => bail!("job {id} failed: {}", or_unknown(&reason)),
        Ok(JobState::Cancelled) => bail!("job {id} was cancelled: {}", or_unknown(&reason)),
        _ => bail!(
            "job {id} is {} (not finished)",
            views::job_state_name(last.state)
        ),
    }
}

fn or_unknown(reason: &str) -> &str {
    if reason.is_empty() {
        "no reason given"
    } else {
        reason
    }
}

pub async fn list(args: ListArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let jobs = client
        .render
        .list(ListRequest {
            states: args.state.iter().map(|s| *s as i32).collect(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .jobs;
    if args.json {
        let all: Vec<_> = jobs.iter().map(views::job_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", views::jobs_table(&jobs));
    }
    Ok(0)
}

pub async fn cancel(args: CancelArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let job = cancel_job(&mut client, &args.id, &args.reason).await?;
    println!("{} {}", job.id, views::job_state_name(job.state));
    Ok(0)
}

pub async fn cancel_job(client: &mut Client, id: &str, reason: &str) -> Result<Job> {
    Ok(client
        .render
        .cancel(CancelRequest {
            id: id.to_string(),
            reason: reason.to_string(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner())
}

pub async fn fetch(args: FetchArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let job = get(&mut client, &args.id).await?;
    let format = job
        .spec
        .as_ref()
        .map(|s| OutputFormat::try_from(s.format).unwrap_or(OutputFormat::Mp4))
        .unwrap_or(OutputFormat::Mp4);
    let dest = Destination::prepare(&args.out, format)?;
    let got = download(&mut client, &job.id, dest).await?;
    println!(
        "wrote {}: {} file(s), {} bytes",
        args.out.display(),
        got.files,
        got.bytes
    );
    Ok(0)
}

/// Downloads a finished job's output into `dest`, removing a partial MP4 on failure.
pub async fn download(client: &mut Client, id: &str, mut dest: Destination) -> Result<Received> {
    let url = client.url().to_string();
    let stream = match client
        .render
        .fetch_output(JobRequest { id: id.to_string() })
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(status) => {
            dest.discard();
            return Err(client.error(status));
        }
    };
    match dest
        .receive(stream, |s| crate::client::status_error(&url, s))
        .await
    {
        Ok(got) => Ok(got),
        Err(err) => {
            dest.discard();
            Err(err)
        }
    }
}

/// The workers the coordinator knows, with the models each serves.
pub async fn list_workers(client: &mut Client) -> Result<Vec<Worker>> {
    Ok(client
        .cluster
        .list_workers(ListWorkersRequest {})
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .workers)
}

pub async fn workers(args: WorkersArgs) -> Result<i32> {
    let mut client = connect(&args.coordinator).await?;
    let workers = list_workers(&mut client).await?;
    if args.json {
        let all: Vec<_> = workers.iter().map(views::worker_json).collect();
        println!("{}", serde_json::Value::Array(all));
    } else {
        print!("{}", views::workers_table(&workers));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::{Cancelled, Done, Failed};

    fn last(state: JobState, event: job_event::Event) -> JobEvent {
        JobEvent {
            job_id: "j-1".into(),
            state: state as i32,
            at_ms: 0,
            event: Some(event),
        }
    }

    #[test]
    fn a_failed_or_cancelled_job_is_an_error_with_its_reason() {
        assert!(outcome(&last(
            JobState::Done,
            job_event::Event::Done(Done::default())
        ))
        .is_ok());
        let err = outcome(&last(
            JobState::Failed,
            job_event::Event::Failed(Failed {
                reason: "worker w1 left".into(),
            }),
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "job j-1 failed: worker w1 left");
        let err = outcome(&last(
            JobState::Cancelled,
            job_event::Event::Cancelled(Cancelled {
                reason: "by alice".into(),
            }),
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "job j-1 was cancelled: by alice");
    }
}
