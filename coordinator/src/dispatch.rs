//! One attempt of a job on its workers. `Reserve` on each rank in order (all within the start
//! time-out), then `RunTask` on each with every rank's mesh address; then the ranks' event
//! streams are merged: rank 0's steps and decoding become job events, the frames (rank 0's, or
//! for a clip of several worker groups each group's first rank's segment, in clip order) go to
//! the encoder as they arrive, and when every rank has finished and every frame is written the
//! clip is closed. A rank whose stream breaks (process died, connection lost, worker left the farm)
//! makes the attempt `Lost` (the job is re-queued); a rank that reports an error fails the job;
//! in both cases the other ranks are told to abort.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use longtake_proto::media::Mp4Clip;
use longtake_proto::spec::{InputKind, JobSpec};
use longtake_proto::telemetry;
use longtake_proto::tls::{Tls, WORKER_NAME};
use longtake_proto::worker_service_client::WorkerServiceClient;
use longtake_proto::{
    task_event, AbortRequest, FrameBatch, OutputFormat, RenderSpec, ReserveRequest, Step,
    TaskEvent, TaskRequest, TimeSplit, Worker, MAX_MESSAGE_BYTES,
};
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::Instrument;

use crate::artifacts::Artifacts;
use crate::encode::{self, FrameSink, Quality, VideoFormat};
use crate::jobs::{Control, Outcome};

/// How long connecting to one worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the workers of a failed start stay claimed, so that a worker whose published state
/// lags (it says idle, it answers busy) is not asked again in a tight loop.
const START_FAILURE_BACKOFF: Duration = Duration::from_secs(1);
/// How long an `Abort` may take; it is best effort (the stream closing aborts the task too).
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an attempt reports its progress (the scheduler, which records and broadcasts it).
#[async_trait::async_trait]
pub trait Reporter: Send + Sync {
    /// Every rank's task is running.
    async fn running(&self);
    /// Rank 0 finished a step; `received` is when its event arrived here.
    async fn step(&self, step: Step, received: Instant);
    async fn decoding(&self, frames: u32);
    async fn encoding(&self, frames_written: u32, frames_total: u32);
    /// The first rank of worker group `group` sent its group's denoiser state after step
    /// `step`.
    async fn checkpoint(&self, group: u32, step: u32, state: Vec<u8>);
}

/// What one attempt runs.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub job_id: String,
    pub attempt: u32,
    /// Resolved spec (no zero size or steps).
    pub spec: JobSpec,
    /// In rank order.
    pub workers: Vec<Worker>,
    /// Where the encoder writes the clip (or the PNG directory).
    pub output: PathBuf,
    /// The job's input file (`spec.input`), handed to every rank; an extended clip's frames
    /// also start the output.
    pub input: Option<PathBuf>,
    pub start_timeout: Duration,
    /// The checkpoint of an earlier attempt each worker group continues from, in group order
    /// (empty: none, every group starts from the spec's noise).
    pub resume_state: Vec<Vec<u8>>,
    /// The first rank of each group checkpoints after every this many steps (0: never).
    pub checkpoint_every: u32,
    /// The coordinator's TLS: workers are reached over mutual TLS and must prove the worker
    /// role (`None`: plain gRPC, a farm without certificates).
    pub tls: Option<Tls>,
    /// The job's submission trace context: the attempt's span joins it (empty: none).
    pub trace_parent: String,
}

type Client = WorkerServiceClient<Channel>;

/// Runs the attempt to its end and says how it ended, inside the attempt's span.
pub async fn run(
    attempt: Attempt,
    control: mpsc::UnboundedReceiver<Control>,
    reporter: &dyn Reporter,
) -> Outcome {
    let span = telemetry::attempt_span(&attempt.job_id, attempt.attempt);
    telemetry::adopt(&span, telemetry::context_of(&attempt.trace_parent));
    run_attempt(attempt, control, reporter)
        .instrument(span)
        .await
}

async fn run_attempt(
    attempt: Attempt,
    mut control: mpsc::UnboundedReceiver<Control>,
    reporter: &dyn Reporter,
) -> Outcome {
    let input = match &attempt.input {
        Some(path) => match tokio::fs::read(path).await {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                return Outcome::Failed(format!(
                    "the job's input file {} cannot be read ({e}): submit the job again",
                    path.display()
                ))
            }
        },
        None => Bytes::new(),
    };
    let started = tokio::select! {
        started = tokio::time::timeout(attempt.start_timeout, start(&attempt, &input)) => match started {
            Ok(started) => started,
            Err(_) => Err(Outcome::StartFailed {
                reason: format!(
                    "the ranks did not start within {:?}",
                    attempt.start_timeout
                ),
                counts: true,
                unreachable: None,
            }),
        },
        Some(Control::Cancel(reason)) = control.recv() => Err(Outcome::Cancelled(reason)),
    };
    let (clients, streams) = match started {
        Ok(s) => s,
        Err(outcome) => {
            abort_all(&attempt, "the attempt did not start");
            if matches!(outcome, Outcome::StartFailed { .. }) {
                tokio::select! {
                    _ = tokio::time::sleep(START_FAILURE_BACKOFF) => {}
                    Some(Control::Cancel(reason)) = control.recv() => return Outcome::Cancelled(reason),
                }
            }
            return outcome;
        }
    };
    reporter.running().await;
    let outcome = follow(&attempt, &input, streams, &mut control, reporter).await;
    if !matches!(outcome, Outcome::Done { .. }) {
        let reason = match &outcome {
            Outcome::Cancelled(r) | Outcome::Failed(r) | Outcome::Lost(r) => r.clone(),
            _ => String::new(),
        };
        abort_all(&attempt, &reason);
    }
    drop(clients);
    outcome
}

async fn connect(worker: &Worker, tls: Option<&Tls>) -> Result<Client, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", worker.address))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(tls) = tls {
        // the worker's certificate is checked for the worker role, not for the address its
        // etcd record claims: a record alone makes no worker
        endpoint = endpoint.tls_config(tls.client(WORKER_NAME))?;
    }
    let channel = endpoint.connect().await?;
    Ok(WorkerServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

type Streams = Vec<tonic::Streaming<TaskEvent>>;

/// Bytes of the secret the ranks of an attempt prove to each other (`TaskRequest.mesh_secret`).
const MESH_SECRET_BYTES: usize = 32;

/// A fresh mesh secret for one attempt, from the operating system's random source: a rank of
/// an earlier attempt, or anyone who reaches a mesh port, cannot take a rank of this one.
fn new_mesh_secret() -> Vec<u8> {
    let mut secret = vec![0u8; MESH_SECRET_BYTES];
    getrandom::fill(&mut secret).expect("the operating system's random source failed");
    secret
}

/// Reserves every rank, then starts every task.
async fn start(a: &Attempt, input: &Bytes) -> Result<(Vec<Client>, Streams), Outcome> {
    let world = a.workers.len() as u32;
    let mut clients = Vec::with_capacity(a.workers.len());
    let mut mesh = Vec::with_capacity(a.workers.len());
    for (rank, worker) in a.workers.iter().enumerate() {
        // A worker that cannot be reached (dead, its lease not yet expired) is not the job's
        // fault: the attempt does not count, and placement passes the worker over for a while.
        let mut client =
            connect(worker, a.tls.as_ref())
                .await
                .map_err(|e| Outcome::StartFailed {
                    reason: format!(
                        "worker {} (rank {rank}) at {} is unreachable: {e}",
                        worker.id, worker.address
                    ),
                    counts: false,
                    unreachable: Some(worker.id.clone()),
                })?;
        let reply = client
            .reserve(ReserveRequest {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                rank: rank as u32,
                world_size: world,
            })
            .await
            .map_err(|s| Outcome::StartFailed {
                reason: format!(
                    "worker {} (rank {rank}) refused the reservation: {}",
                    worker.id,
                    s.message()
                ),
                counts: s.code() != Code::Unavailable,
                unreachable: None,
            })?;
        mesh.push(reply.into_inner().mesh_address);
        clients.push(client);
    }
    let peers = if world > 1 { mesh } else { Vec::new() };
    let mesh_secret = if world > 1 {
        new_mesh_secret()
    } else {
        Vec::new()
    };
    let mut streams = Vec::with_capacity(clients.len());
    for (rank, client) in clients.iter_mut().enumerate() {
        let mut request = tonic::Request::new(TaskRequest {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: rank as u32,
            spec: Some(RenderSpec::from(&a.spec)),
            peers: peers.clone(),
            resume_state: a
                .resume_state
                .get(rank / a.spec.layout.world_size())
                .cloned()
                .unwrap_or_default(),
            checkpoint_every: a.checkpoint_every,
            mesh_secret: mesh_secret.clone(),
            input: input.clone(),
        });
        // the attempt's span: each rank's task joins the job's trace
        telemetry::inject(&tracing::Span::current(), request.metadata_mut());
        let stream = client
            .run_task(request)
            .await
            .map_err(|s| Outcome::StartFailed {
                reason: format!(
                    "worker {} (rank {rank}) did not start its task: {}",
                    a.workers[rank].id,
                    s.message()
                ),
                counts: true,
                unreachable: None,
            })?;
        streams.push(stream.into_inner());
    }
    Ok((clients, streams))
}

/// What a rank's stream yielded.
enum Item {
    Event(TaskEvent),
    /// The stream ended (`None`: cleanly, but without `TaskFinished`).
    Broken(Option<tonic::Status>),
}

/// Where the attempt is, for the reason of a lost rank.
fn phase(step: u32, total: u32, decoding: bool, frames: u32) -> String {
    if frames > 0 {
        format!("while sending frames ({frames} received)")
    } else if decoding {
        "during decoding".to_string()
    } else if step == 0 {
        "before the first step".to_string()
    } else {
        format!("during step {} of {total}", step + 1)
    }
}

/// How long the task stream of a worker that left the farm may still take to finish.
const LEFT_GRACE: Duration = Duration::from_secs(5);

async fn follow(
    a: &Attempt,
    input: &Bytes,
    streams: Streams,
    control: &mut mpsc::UnboundedReceiver<Control>,
    reporter: &dyn Reporter,
) -> Outcome {
    let mut encoder = Encoder::new(a);
    // An extension's output starts with the clip it extends; the workers' frames follow it.
    if a.spec
        .input
        .as_ref()
        .is_some_and(|i| i.kind == InputKind::Clip)
    {
        if let Err(reason) = encoder.push_clip(input.clone()).await {
            return Outcome::Failed(reason);
        }
    }
    let (tx, mut rx) = mpsc::channel::<(usize, Item)>(64);
    // Frames written so far. Each worker group's first rank streams the segment it decoded; a
    // segment is read from its stream only once the frames before it are written, and a batch
    // only once the one before it is, so the clip is encoded in order and what is not encoded
    // yet waits in its worker (the stream's flow control), not here.
    let (written_tx, written_rx) = tokio::sync::watch::channel(encoder.written);
    let mut forwarders = tokio::task::JoinSet::new();
    for (rank, mut stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        let mut written = written_rx.clone();
        forwarders.spawn(async move {
            let mut segment_started = false;
            loop {
                let item = match stream.message().await {
                    Ok(Some(event)) => Item::Event(event),
                    Ok(None) => Item::Broken(None),
                    Err(status) => Item::Broken(Some(status)),
                };
                let mut batch_end = None;
                if let Item::Event(TaskEvent {
                    event: Some(task_event::Event::Frames(batch)),
                }) = &item
                {
                    if !segment_started {
                        let first = batch.first;
                        if written.wait_for(|&w| w >= first).await.is_err() {
                            return;
                        }
                        segment_started = true;
                    }
                    batch_end = Some(batch.first.saturating_add(batch.count));
                }
                let end = matches!(item, Item::Broken(_));
                if tx.send((rank, item)).await.is_err() || end {
                    return;
                }
                // One batch of frames in the coordinator at a time: the next waits in its
                // worker until this one is encoded, so memory here does not grow with the clip.
                if let Some(batch_end) = batch_end {
                    if written.wait_for(|&w| w >= batch_end).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);

    let frames_total = a.spec.output_frames();
    let mut finished = vec![false; a.workers.len()];
    let mut timings = vec![TimeSplit::default(); a.workers.len()];
    let mut step = 0u32;
    let mut total = a.spec.steps;
    let mut decoding = false;
    // Per worker group, the bytes its first rank sent to other groups in its last step.
    let group_size = a.spec.layout.world_size();
    let mut exchange = vec![0u64; a.spec.windows.groups as usize];
    let lost = |rank: usize, how: String, step, total, decoding, frames| {
        Outcome::Lost(format!(
            "worker {} (rank {rank}) lost {}: {how}",
            a.workers[rank].id,
            phase(step, total, decoding, frames)
        ))
    };
    // A worker that leaves the farm gracefully does so after its task ended, but the task's last
    // events may still be in flight (or queued behind a slow encode) when its record goes: the
    // stream gets this long to finish before the rank counts as lost.
    let mut left: Option<(usize, tokio::time::Instant)> = None;
    loop {
        let left_at = left.map(|(_, at)| at);
        tokio::select! {
            _ = async {
                match left_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let (rank, _) = left.expect("armed above");
                return lost(rank, "it left the farm".into(), step, total, decoding, encoder.written);
            }
            item = rx.recv() => {
                let Some((rank, item)) = item else {
                    // every forwarder ended without every rank finishing: handled per rank below
                    return Outcome::Lost("every rank's stream closed".into());
                };
                let event = match item {
                    Item::Event(TaskEvent { event: Some(e) }) => e,
                    Item::Event(TaskEvent { event: None }) => continue,
                    Item::Broken(status) => {
                        if finished[rank] {
                            continue;
                        }
                        let how = match status {
                            Some(s) => format!("{} ({:?})", s.message(), s.code()),
                            None => "its task stream ended without a result".to_string(),
                        };
                        return lost(rank, how, step, total, decoding, encoder.written);
                    }
                };
                match event {
                    task_event::Event::Started(_) => {}
                    task_event::Event::Step(mut s) if rank % group_size == 0 => {
                        if let Some(bytes) = exchange.get_mut(rank / group_size) {
                            *bytes = s.exchange_bytes;
                        }
                        if rank != 0 {
                            continue;
                        }
                        let received = Instant::now();
                        step = s.step;
                        if s.total != 0 {
                            total = s.total;
                        }
                        if exchange.len() > 1 {
                            s.group_exchange_bytes = exchange.clone();
                        }
                        reporter.step(s, received).await;
                    }
                    task_event::Event::Decoding(d) if rank == 0 => {
                        decoding = true;
                        reporter.decoding(d.frames).await;
                    }
                    task_event::Event::Frames(batch) if rank % group_size == 0 => {
                        if let Err(reason) = encoder.push(batch).await {
                            return Outcome::Failed(format!(
                                "worker {} (rank {rank}): {reason}",
                                a.workers[rank].id
                            ));
                        }
                        written_tx.send_replace(encoder.written);
                        reporter.encoding(encoder.written, frames_total).await;
                    }
                    task_event::Event::Timings(t) => timings[rank] = t,
                    task_event::Event::Checkpoint(c) if rank % group_size == 0 => {
                        let group = (rank / group_size) as u32;
                        reporter.checkpoint(group, c.step, c.state).await;
                    }
                    task_event::Event::Finished(f) => {
                        if !f.error.is_empty() || f.cancelled {
                            let why = if f.error.is_empty() { "cancelled" } else { &f.error };
                            return Outcome::Failed(format!(
                                "worker {} (rank {rank}): {why}",
                                a.workers[rank].id
                            ));
                        }
                        finished[rank] = true;
                        if finished.iter().all(|&f| f) {
                            return encoder.finish(frames_total, &timings).await;
                        }
                    }
                    // steps, decoding and frames of other ranks carry nothing the job needs
                    _ => {}
                }
            }
            c = control.recv() => match c {
                Some(Control::Cancel(reason)) => return Outcome::Cancelled(reason),
                Some(Control::WorkerLeft(id)) => {
                    if let Some(rank) = a.workers.iter().position(|w| w.id == id) {
                        if !finished[rank] && left.is_none() {
                            left = Some((rank, tokio::time::Instant::now() + LEFT_GRACE));
                        }
                    }
                }
                // the scheduler dropped the handle: it is stopping, nothing to report to
                None => return Outcome::Cancelled("the coordinator is stopping".into()),
            },
        }
    }
}

/// The clip being written from rank 0's frames; the writer runs on the blocking pool.
struct Encoder {
    output: PathBuf,
    format: VideoFormat,
    fps: u32,
    sink: Option<Box<dyn FrameSink>>,
    written: u32,
    started: Instant,
    /// Time in the writer (opening, frames, closing), and in checking batches around it.
    encoding: Duration,
    stitching: Duration,
    job_id: String,
    frames: usize,
    /// From the first frame to the clip closed.
    span: Option<tracing::Span>,
}

impl Encoder {
    fn new(a: &Attempt) -> Self {
        let format = if a.spec.format == OutputFormat::Png {
            VideoFormat::PngSequence
        } else {
            VideoFormat::Mp4
        };
        Self {
            output: a.output.clone(),
            format,
            fps: a.spec.fps,
            sink: None,
            written: 0,
            started: Instant::now(),
            encoding: Duration::ZERO,
            stitching: Duration::ZERO,
            job_id: a.job_id.clone(),
            frames: a.spec.output_frames() as usize,
            span: None,
        }
    }

    /// Writes the frames of the clip an extension extends (the MP4 in `clip`), the output's
    /// first frames.
    async fn push_clip(&mut self, clip: Bytes) -> Result<(), String> {
        self.write(move |_, place| {
            let clip = Mp4Clip::open(&clip).map_err(|e| format!("the clip to extend: {e}"))?;
            let facts = clip.facts();
            let mut sink = place.open(facts.width, facts.height)?;
            clip.decode(
                |rgb| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                    Ok(sink.push_frame(&rgb)?)
                },
            )
            .map_err(|e| format!("the clip to extend: {e}"))?;
            Ok(sink)
        })
        .await
    }

    async fn push(&mut self, batch: FrameBatch) -> Result<(), String> {
        let start = Instant::now();
        if batch.first != self.written {
            return Err(format!(
                "frames from {} arrived when {} were written (frames must come in order)",
                batch.first, self.written
            ));
        }
        let frame_bytes = batch.width as usize * batch.height as usize * 3;
        if batch.rgb.len() != frame_bytes * batch.count as usize {
            return Err(format!(
                "{} bytes arrived for {} frames of {}x{}",
                batch.rgb.len(),
                batch.count,
                batch.width,
                batch.height
            ));
        }
        self.stitching += start.elapsed();
        self.write(move |sink, place| {
            let mut sink = match sink {
                Some(sink) => sink,
                None => place.open(batch.width, batch.height)?,
            };
            for frame in batch.rgb.chunks_exact(frame_bytes.max(1)) {
                sink.push_frame(frame).map_err(|e| e.to_string())?;
            }
            Ok(sink)
        })
        .await
    }

    /// Runs `write` on the blocking pool, inside the encode span, with the clip's writer
    /// (`None` before the first frames: `write` opens it where `WriterPlace` says), counting its
    /// time as encoding.
    async fn write(
        &mut self,
        write: impl FnOnce(Option<Box<dyn FrameSink>>, &WriterPlace) -> Result<Box<dyn FrameSink>, String>
            + Send
            + 'static,
    ) -> Result<(), String> {
        let place = WriterPlace {
            output: self.output.clone(),
            format: self.format,
            fps: self.fps,
        };
        let sink = self.sink.take();
        let start = Instant::now();
        let span = self
            .span
            .get_or_insert_with(|| telemetry::encode_span(&self.job_id, self.frames))
            .clone();
        let result = tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            write(sink, &place)
        })
        .await
        .map_err(|e| format!("the encoder panicked: {e}"))?;
        self.encoding += start.elapsed();
        let sink = result.map_err(|e| format!("encoding the output: {e}"))?;
        self.written = sink.frames_written() as u32;
        self.sink = Some(sink);
        Ok(())
    }

    /// Closes the clip; `ranks` are the time splits the ranks reported.
    async fn finish(&mut self, frames_total: u32, ranks: &[TimeSplit]) -> Outcome {
        if self.written != frames_total {
            return Outcome::Failed(format!(
                "every rank finished after {} of {frames_total} frames arrived",
                self.written
            ));
        }
        let Some(sink) = self.sink.take() else {
            return Outcome::Failed("no frames arrived".into());
        };
        let output = self.output.clone();
        let start = Instant::now();
        // the span ends with the clip closed
        let span = self.span.take().unwrap_or_else(tracing::Span::none);
        let result = tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            sink.finish().map_err(|e| e.to_string())?;
            Artifacts::seal(&output).map_err(|e| format!("{}: {e}", output.display()))?;
            Ok::<_, String>(output_size(&output))
        })
        .await;
        self.encoding += start.elapsed();
        match result {
            Ok(Ok(output_bytes)) => {
                let render_s = self.started.elapsed().as_secs_f64();
                Outcome::Done {
                    output_bytes,
                    render_s,
                    time_split: TimeSplit {
                        stitch_s: self.stitching.as_secs_f64(),
                        encode_s: self.encoding.as_secs_f64(),
                        wall_s: render_s,
                        ..slowest(ranks)
                    },
                }
            }
            Ok(Err(e)) => Outcome::Failed(format!("encoding the output: {e}")),
            Err(e) => Outcome::Failed(format!("the encoder panicked: {e}")),
        }
    }
}

/// Where and how the clip's writer is opened.
struct WriterPlace {
    output: PathBuf,
    format: VideoFormat,
    fps: u32,
}

impl WriterPlace {
    fn open(&self, width: u32, height: u32) -> Result<Box<dyn FrameSink>, String> {
        encode::open_writer(
            &self.output,
            Some(self.format),
            width,
            height,
            self.fps,
            Quality::default(),
        )
        .map_err(|e| e.to_string())
    }
}

/// Each worker phase's longest time over the ranks: they run each phase at the same time, so the
/// slowest rank's is what the job waited for.
fn slowest(ranks: &[TimeSplit]) -> TimeSplit {
    ranks.iter().fold(TimeSplit::default(), |a, r| TimeSplit {
        load_s: a.load_s.max(r.load_s),
        text_s: a.text_s.max(r.text_s),
        denoise_s: a.denoise_s.max(r.denoise_s),
        exchange_s: a.exchange_s.max(r.exchange_s),
        decode_s: a.decode_s.max(r.decode_s),
        send_s: a.send_s.max(r.send_s),
        ..a
    })
}

fn output_size(path: &std::path::Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Tells every worker of the attempt to drop its task of the job, without waiting.
fn abort_all(a: &Attempt, reason: &str) {
    for worker in &a.workers {
        let (worker, job_id, reason) = (worker.clone(), a.job_id.clone(), reason.to_string());
        let tls = a.tls.clone();
        tokio::spawn(async move {
            let abort = async {
                let mut client = connect(&worker, tls.as_ref()).await.ok()?;
                client.abort(AbortRequest { job_id, reason }).await.ok()
            };
            if tokio::time::timeout(ABORT_TIMEOUT, abort).await.is_err() {
                tracing::debug!(worker = %worker.id, "abort timed out");
            }
        });
    }
}
