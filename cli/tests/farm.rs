//! The coordinator end to end over real gRPC on 127.0.0.1, against real worker daemons
//! (`longtake_worker::daemon::run`, the tiny model) sharing an in-process membership: submit to
//! done with the clip decoded by ffprobe and equal to the single-process render, priority order,
//! cancel, error codes, a job that waits for a worker, and a coordinator restarted over the same
//! job store.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use longtake_cli::local::{LocalFarm, Served};
use longtake_coordinator::encode::{open_writer, Quality, VideoFormat};
use longtake_coordinator::{Coordinator, CoordinatorConfig, JobStore};
use longtake_proto::cluster_service_client::ClusterServiceClient;
use longtake_proto::media::{MediaError, Mp4Clip};
use longtake_proto::membership::{InProcessMembership, Membership};
use longtake_proto::render_service_client::RenderServiceClient;
use longtake_proto::spec::Limits;
use longtake_proto::{
    job_event, submit_part, CancelRequest, Input, InputKind, Job, JobEvent, JobRequest, JobState,
    ListRequest, ListWorkersRequest, OutputFormat, RenderSpec, SubmitPart, SubmitRequest,
    WorkerState,
};
use longtake_worker::daemon::{self, DaemonConfig, ModelSource};

// The cluster tests' PNG checks, shared (only the frame readers are used here).
#[allow(dead_code)]
#[path = "../../tests/support/media.rs"]
mod media;
use tonic::transport::Channel;
use tonic::Code;

/// Hang guard for every wait here: it turns a hang into a failure, it never checks speed.
const PATIENCE: Duration = Duration::from_secs(120);

fn spec(steps: u32) -> RenderSpec {
    RenderSpec {
        prompt: "a lighthouse in a storm".into(),
        model: "tiny".into(),
        frames: 9,
        width: 64,
        height: 64,
        steps,
        guidance_scale: 5.0,
        seed: 7,
        fps: 16,
        ..Default::default()
    }
}

/// A [`LocalFarm`] over a temporary artifact directory.
struct Farm {
    local: LocalFarm,
    artifacts: tempfile::TempDir,
}

/// A part of the farm; stopping it must succeed ([`PATIENCE`] is a hang guard).
struct Running(Served);

impl Running {
    async fn stop(self) {
        tokio::time::timeout(PATIENCE, self.0.stop())
            .await
            .expect("hang guard (PATIENCE, 120 s): it never stopped")
            .expect("it stops cleanly");
    }
}

impl Farm {
    fn new() -> Self {
        let artifacts = tempfile::tempdir().unwrap();
        Self {
            local: LocalFarm::new(artifacts.path()),
            artifacts,
        }
    }

    async fn coordinator(&self) -> (Coordinator, String, Running) {
        self.coordinator_over(self.local.membership.clone()).await
    }

    /// A coordinator over this farm's job store, seeing the workers of `membership`.
    async fn coordinator_over(
        &self,
        membership: Arc<InProcessMembership>,
    ) -> (Coordinator, String, Running) {
        let config = CoordinatorConfig::new(self.artifacts.path().to_path_buf());
        let (coordinator, served) = self
            .local
            .coordinator_with(config, membership)
            .await
            .unwrap();
        (coordinator, served.url().to_string(), Running(served))
    }

    /// A coordinator over this farm's job store with `limits`.
    async fn coordinator_limited(&self, limits: Limits) -> (String, Running) {
        let config = CoordinatorConfig {
            limits,
            ..CoordinatorConfig::new(self.artifacts.path().to_path_buf())
        };
        let (_, served) = self
            .local
            .coordinator_with(config, self.local.membership.clone())
            .await
            .unwrap();
        (served.url().to_string(), Running(served))
    }

    async fn worker(&self, id: &str) -> Running {
        let config = DaemonConfig {
            models: vec![ModelSource::Tiny],
            ..DaemonConfig::new(id, "127.0.0.1")
        };
        Running(self.local.worker(config).await.unwrap())
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "hang guard ({PATIENCE:?}): still waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(url: &str) -> RenderServiceClient<Channel> {
    RenderServiceClient::connect(url.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(longtake_proto::MAX_MESSAGE_BYTES)
}

async fn submit(c: &mut RenderServiceClient<Channel>, spec: RenderSpec, priority: i32) -> Job {
    c.submit(SubmitRequest {
        spec: Some(spec),
        priority,
        name: "clip".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .job
    .unwrap()
}

async fn get(c: &mut RenderServiceClient<Channel>, id: &str) -> Job {
    c.get(JobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Every event of the job until its stream closes (after the terminal one).
async fn watch_all(c: &mut RenderServiceClient<Channel>, id: &str) -> Vec<(Instant, JobEvent)> {
    let mut stream = c
        .watch(JobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("hang guard (PATIENCE, 120 s): the job never ended")
        .unwrap()
    {
        events.push((Instant::now(), event));
    }
    events
}

async fn wait_state(c: &mut RenderServiceClient<Channel>, id: &str, state: JobState) -> Job {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let job = get(c, id).await;
        if job.state == state as i32 {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "hang guard ({PATIENCE:?}): job {id} never reached {state:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fetch(c: &mut RenderServiceClient<Channel>, id: &str, out: &Path) {
    let mut stream = c
        .fetch_output(JobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset, bytes.len() as u64);
        bytes.extend_from_slice(&chunk.data);
        assert!(bytes.len() as u64 <= chunk.file_size);
    }
    std::fs::write(out, bytes).unwrap();
}

fn ffprobe_frames(path: &Path) -> HashMap<String, String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
        ])
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .expect("ffprobe is on PATH (apt-get install ffmpeg)");
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every file of a finished job's output, written under `dir` by the names the coordinator
/// gives them (a PNG sequence is one file per frame).
async fn fetch_files(c: &mut RenderServiceClient<Channel>, id: &str, dir: &Path) {
    let mut stream = c
        .fetch_output(JobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    while let Some(chunk) = stream.message().await.unwrap() {
        let bytes = files.entry(chunk.file.clone()).or_default();
        assert_eq!(chunk.offset, bytes.len() as u64, "{}", chunk.file);
        bytes.extend_from_slice(&chunk.data);
    }
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        let name = Path::new(&name).file_name().expect("a file name");
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A rendered video's frames, as RGB bytes per frame.
fn frames_of(video: &longtake_worker::model::render::Video) -> Vec<Vec<u8>> {
    video
        .rgb
        .chunks_exact(video.width * video.height * 3)
        .map(<[u8]>::to_vec)
        .collect()
}

/// The frames of the single-process tiny pipeline for `spec`, as RGB bytes per frame.
fn single_process_frames(spec: &RenderSpec) -> Vec<Vec<u8>> {
    use longtake_worker::families::wan::pipeline::WanPipeline;
    let pipeline = WanPipeline::tiny(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    frames_of(
        &pipeline
            .render(&tiny_render_spec(spec), &mut |_| {})
            .unwrap(),
    )
}

/// The same spec rendered by the single-process pipeline and encoded by the same writer.
fn reference_clip(spec: &RenderSpec, out: &Path) {
    use longtake_worker::families::wan::pipeline::WanPipeline;
    let pipeline = WanPipeline::tiny(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let video = pipeline
        .render(&tiny_render_spec(spec), &mut |_| {})
        .unwrap();
    let mut sink = open_writer(
        out,
        Some(VideoFormat::Mp4),
        video.width as u32,
        video.height as u32,
        spec.fps,
        Quality::default(),
    )
    .unwrap();
    for frame in video.rgb.chunks_exact(video.width * video.height * 3) {
        sink.push_frame(frame).unwrap();
    }
    sink.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitted_job_renders_and_matches_the_single_process_clip() {
    let farm = Farm::new();
    let (coordinator, url, served) = farm.coordinator().await;
    let worker = farm.worker("w1").await;
    let mut c = client(&url).await;

    let submitted_at = Instant::now();
    let job = submit(&mut c, spec(4), 0).await;
    assert_eq!(job.state, JobState::Queued as i32);
    let events = watch_all(&mut c, &job.id).await;
    let job = get(&mut c, &job.id).await;
    assert_eq!(job.state, JobState::Done as i32, "{job:?}");
    assert_eq!((job.steps_done, job.steps_total, job.attempts), (4, 4, 1));
    assert_eq!(job.workers, ["w1"]);

    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| match e.event.as_ref().unwrap() {
            job_event::Event::Queued(_) => "queued",
            job_event::Event::Planned(_) => "planned",
            job_event::Event::Step(_) => "step",
            job_event::Event::Decoding(_) => "decoding",
            job_event::Event::Encoding(_) => "encoding",
            job_event::Event::Done(_) => "done",
            job_event::Event::Failed(_) => "failed",
            job_event::Event::Cancelled(_) => "cancelled",
        })
        .collect();
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert!(
        kinds.contains(&"decoding") && kinds.contains(&"encoding"),
        "{kinds:?}"
    );
    let steps: Vec<(u32, f64, Instant)> = events
        .iter()
        .filter_map(|(at, e)| match e.event.as_ref()? {
            job_event::Event::Step(s) if s.step > 0 => Some((s.step, s.step_s, *at)),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "every step of rank 0, in order"
    );

    let out = farm.artifacts.path().join("fetched.mp4");
    fetch(&mut c, &job.id, &out).await;
    assert_eq!(std::fs::metadata(&out).unwrap().len(), job.output_bytes);
    let probe = ffprobe_frames(&out);
    assert_eq!(probe["codec_name"], "h264");
    assert_eq!(
        (probe["width"].as_str(), probe["height"].as_str()),
        ("64", "64")
    );
    assert_eq!(probe["nb_read_frames"], "9");
    let reference = farm.artifacts.path().join("reference.mp4");
    reference_clip(&spec(4), &reference);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(),
        "the farm's clip differs from the single-process render of the same spec"
    );

    // the measurements the closing note quotes
    let first_step = steps[0].2 - submitted_at;
    let step_sum: f64 = steps.iter().map(|s| s.1).sum();
    let wall = (job.finished_at_ms - job.started_at_ms) as f64 / 1000.0;
    let overhead = coordinator.step_overhead();
    assert_eq!(overhead.steps, 4);
    eprintln!(
        "farm timing: submit→first step {:.0} ms; job wall (running→done) {wall:.3} s vs sum of \
         step times {step_sum:.3} s; coordinator per-step overhead mean {:.1} µs, max {:.1} µs",
        first_step.as_secs_f64() * 1e3,
        overhead.total.as_secs_f64() * 1e6 / overhead.steps as f64,
        overhead.max.as_secs_f64() * 1e6,
    );

    worker.stop().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_rank_job_runs_on_two_workers() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let w1 = farm.worker("w1").await;
    let w2 = farm.worker("w2").await;
    let mut c = client(&url).await;
    let job = submit(
        &mut c,
        RenderSpec {
            layout: "cfg=2".into(),
            format: OutputFormat::Png as i32,
            ..spec(2)
        },
        0,
    )
    .await;
    watch_all(&mut c, &job.id).await;
    let job = get(&mut c, &job.id).await;
    assert_eq!(job.state, JobState::Done as i32, "{job:?}");
    assert_eq!(job.workers, ["w1", "w2"]);
    // The content, as PNG so that no encoder stands between: cfg=2 moves the frames by float
    // rounding only, so every byte is within one 8-bit level of the single-process render.
    let dir = farm.artifacts.path().join("two-frames");
    fetch_files(&mut c, &job.id, &dir).await;
    let got = media::png_frames(&dir);
    let want = single_process_frames(&spec(2));
    assert_eq!(got.len(), 9, "frames fetched");
    let worst = media::max_diff(&got, &want);
    println!("cfg=2 on two workers vs the single-process frames: max |diff| {worst} levels");
    assert!(
        worst <= 1,
        "cfg=2 frames differ from the single-process render by {worst} levels"
    );
    w1.stop().await;
    w2.stop().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_jobs_wait_for_a_worker_and_run_in_priority_order() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let mut c = client(&url).await;
    let mut cluster = ClusterServiceClient::connect(url.clone()).await.unwrap();

    let low = submit(&mut c, spec(2), 0).await;
    let high = submit(&mut c, spec(2), 5).await;
    let waiting = wait_state(&mut c, &low.id, JobState::Queued).await;
    eventually("the job says why it waits", || {
        let mut c = c.clone();
        let id = low.id.clone();
        async move { get(&mut c, &id).await.message == "waiting: no live worker serves model tiny" }
    })
    .await;
    assert_eq!(waiting.attempts, 0);

    let worker = farm.worker("w1").await;
    let listed = cluster
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        listed.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["w1"]
    );

    let high = wait_state(&mut c, &high.id, JobState::Done).await;
    let low = wait_state(&mut c, &low.id, JobState::Done).await;
    assert!(
        high.finished_at_ms <= low.started_at_ms,
        "the high-priority job ran first: high {high:?}, low {low:?}"
    );

    worker.stop().await;
    eventually("the stopped worker leaves the cluster list", || {
        let mut cluster = cluster.clone();
        async move {
            cluster
                .list_workers(ListWorkersRequest {})
                .await
                .unwrap()
                .into_inner()
                .workers
                .is_empty()
        }
    })
    .await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_a_running_job_and_frees_its_worker() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let worker = farm.worker("w1").await;
    let mut c = client(&url).await;
    let cluster = ClusterServiceClient::connect(url.clone()).await.unwrap();

    let long = submit(&mut c, spec(200), 0).await;
    let mut stream = c
        .watch(JobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // wait for a real step, so the cancel hits a running render
    loop {
        let e = stream.message().await.unwrap().expect("the job runs");
        if matches!(e.event, Some(job_event::Event::Step(ref s)) if s.step >= 1) {
            break;
        }
    }
    let cancelled = c
        .cancel(CancelRequest {
            id: long.id.clone(),
            reason: "wrong prompt".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    assert_eq!(cancelled.message, "wrong prompt");
    let last = loop {
        match stream.message().await.unwrap() {
            Some(e) => {
                if e.state == JobState::Cancelled as i32 {
                    break e;
                }
            }
            None => panic!("the watch ended without the cancellation"),
        }
    };
    assert!(matches!(last.event, Some(job_event::Event::Cancelled(_))));
    assert!(
        stream.message().await.unwrap().is_none(),
        "the watch closes after the end"
    );

    eventually("the worker is idle again", || {
        let mut cluster = cluster.clone();
        async move {
            let workers = cluster
                .list_workers(ListWorkersRequest {})
                .await
                .unwrap()
                .into_inner()
                .workers;
            workers.len() == 1 && workers[0].state == WorkerState::Idle as i32
        }
    })
    .await;
    let next = submit(&mut c, spec(2), 0).await;
    let next = wait_state(&mut c, &next.id, JobState::Done).await;
    assert_eq!(next.workers, ["w1"]);
    let long = get(&mut c, &long.id).await;
    assert_eq!(long.state, JobState::Cancelled as i32);
    assert!(long.steps_done < 200);

    worker.stop().await;
    served.stop().await;
}

/// Many clients submitting at once, each retrying some submissions with the same request id
/// (as after a lost reply): every request id is exactly one job, every retry gets that job's id
/// back, and the same id with another spec is refused naming the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_id_is_exactly_one_job_under_concurrent_retries() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let (clients, per_client) = (20, 10);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..clients {
        let url = url.clone();
        tasks.spawn(async move {
            let mut c = client(&url).await;
            let mut answers = Vec::new();
            for i in 0..per_client {
                let request_id = format!("client-{k}:shot-{i}");
                // 1 to 3 tries, as a client whose replies got lost would make
                for _ in 0..1 + (k + i) % 3 {
                    let job = c
                        .submit(SubmitRequest {
                            spec: Some(spec(1)),
                            name: format!("shot {i}"),
                            request_id: request_id.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .job
                        .unwrap();
                    answers.push((request_id.clone(), job.id));
                }
            }
            answers
        });
    }
    let mut by_request: HashMap<String, String> = HashMap::new();
    while let Some(answers) = tasks.join_next().await {
        for (request_id, job_id) in answers.unwrap() {
            let first = by_request
                .entry(request_id.clone())
                .or_insert(job_id.clone());
            assert_eq!(*first, job_id, "{request_id} answered with two jobs");
        }
    }
    let mut c = client(&url).await;
    let jobs = c
        .list(ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), clients * per_client, "one job per request id");
    assert_eq!(by_request.len(), clients * per_client);
    for job in &jobs {
        assert_eq!(by_request.get(&job.request_id), Some(&job.id), "{job:?}");
    }

    let e = c
        .submit(SubmitRequest {
            spec: Some(RenderSpec { seed: 8, ..spec(1) }),
            name: "shot 0".into(),
            request_id: "client-0:shot-0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message().contains(&by_request["client-0:shot-0"]),
        "{}",
        e.message()
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_codes() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let mut c = client(&url).await;

    let e = c
        .get(JobRequest {
            id: "j-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no job j-nope"));
    let e = c
        .watch(JobRequest {
            id: "j-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .cancel(CancelRequest {
            id: "j-nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .fetch_output(JobRequest {
            id: "j-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let e = c
        .submit(SubmitRequest {
            spec: Some(RenderSpec {
                width: 250,
                ..spec(2)
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "spec.width: 250 is not a multiple of 16");
    let e = c
        .submit(SubmitRequest {
            spec: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "spec.prompt: must not be empty")
    );

    // no worker: the job stays queued, and its output cannot be fetched yet
    let job = submit(&mut c, spec(2), 0).await;
    let e = c
        .fetch_output(JobRequest { id: job.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        format!("job {} is queued; fetch it when it is done", job.id)
    );
    let listed = c
        .list(ListRequest {
            states: vec![JobState::Queued as i32],
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    let listed = c
        .list(ListRequest {
            states: vec![JobState::Done as i32],
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(listed.is_empty());
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_coordinator_lists_its_jobs_and_requeues_the_running_one() {
    let farm = Farm::new();
    let (_first, url, served) = farm.coordinator().await;
    let worker = farm.worker("w1").await;
    let mut c = client(&url).await;
    let running = submit(&mut c, spec(200), 1).await;
    let queued = submit(&mut c, spec(2), 0).await;
    eventually("the running job has taken two steps", || {
        let mut c = c.clone();
        let id = running.id.clone();
        async move { get(&mut c, &id).await.steps_done >= 2 }
    })
    .await;
    served.stop().await;

    // the records are as the first coordinator left them: nothing recorded its end
    let stored = farm.local.store.load_all().await.unwrap();
    let state_of = |id: &str| {
        let loaded = stored.iter().find(|j| j.record.id == id).unwrap();
        JobState::from(loaded.record.phase) as i32
    };
    assert_eq!(state_of(&running.id), JobState::Running as i32);
    assert_eq!(state_of(&queued.id), JobState::Queued as i32);

    // a coordinator that sees no worker yet: the jobs wait where the restart put them
    let (_second, url, served) = farm
        .coordinator_over(Arc::new(InProcessMembership::new()))
        .await;
    let mut c = client(&url).await;
    let listed = c
        .list(ListRequest { states: vec![] })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let ids: Vec<&str> = listed.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [running.id.as_str(), queued.id.as_str()]);
    let requeued = &listed[0];
    assert_eq!(requeued.state, JobState::Queued as i32, "{requeued:?}");
    assert!(
        requeued
            .message
            .starts_with("re-queued: the coordinator restarted during attempt 1"),
        "{requeued:?}"
    );
    served.stop().await;

    let (_third, url, served) = farm.coordinator().await;
    let mut c = client(&url).await;
    // the re-queued job runs again (its worker aborted the orphaned task) as attempt 2, from
    // the checkpoint the first coordinator kept of it
    eventually("the re-queued job starts its second attempt", || {
        let mut c = c.clone();
        let id = running.id.clone();
        async move {
            let job = get(&mut c, &id).await;
            job.attempts == 2 && job.state == JobState::Running as i32
        }
    })
    .await;
    let resumed = get(&mut c, &running.id).await;
    assert!(
        resumed.resumed_from_step >= 1,
        "the second attempt resumes from a checkpoint: {resumed:?}"
    );
    c.cancel(CancelRequest {
        id: running.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let done = wait_state(&mut c, &queued.id, JobState::Done).await;
    assert_eq!(done.attempts, 1);

    worker.stop().await;
    served.stop().await;
}

/// A worker daemon on a runtime of its own, so the test can make it vanish the way a killed
/// process does: its connections and its membership record go at once, without a goodbye.
fn doomed_worker(farm: &Farm, id: &str) -> tokio::runtime::Runtime {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let membership: Arc<dyn Membership> = farm.local.membership.clone();
    let config = DaemonConfig {
        models: vec![ModelSource::Tiny],
        ..DaemonConfig::new(id, "127.0.0.1")
    };
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _ = daemon::run(config, membership, listener, std::future::pending()).await;
    });
    runtime
}

/// A worker that died while its lease still holds (its record says idle, nothing answers at its
/// address) costs the jobs placed on it no attempt and is passed over: every job finishes on
/// the live worker, none with more than its one attempt. (Each try on the dead worker once used
/// up an attempt, and 1 job in 4 failed within 3 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_worker_whose_lease_still_holds_burns_no_attempts() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let live = farm.worker("w-live").await;
    let membership: Arc<dyn Membership> = farm.local.membership.clone();
    let record = membership
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.id == "w-live")
        .unwrap();
    let nothing_listens = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _dead = membership
        .register(longtake_proto::Worker {
            id: "w-dead".into(),
            address: nothing_listens.to_string(),
            ..record
        })
        .await
        .unwrap();
    let mut c = client(&url).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&mut c, spec(2), 0).await.id);
    }
    for id in &ids {
        let job = wait_state(&mut c, id, JobState::Done).await;
        assert_eq!(job.attempts, 1, "{job:?}");
        assert_eq!(job.workers, ["w-live"], "{job:?}");
    }
    live.stop().await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_worker_dies_is_requeued_and_finishes_on_another() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let doomed = doomed_worker(&farm, "w1");
    eventually("the doomed worker registers", || {
        let membership = farm.local.membership.clone();
        async move {
            membership
                .list()
                .await
                .unwrap()
                .iter()
                .any(|w| w.id == "w1")
        }
    })
    .await;
    let survivor = farm.worker("w2").await;
    let mut c = client(&url).await;

    let job = submit(&mut c, spec(60), 0).await;
    let mut stream = c
        .watch(JobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    // Step 2's event comes after step 1's checkpoint (rank 0 sends it between the two, and the
    // coordinator stores it before it takes the next event): the job has one to resume from.
    loop {
        let e = stream.message().await.unwrap().expect("the job runs");
        if matches!(e.event, Some(job_event::Event::Step(ref s)) if s.step >= 2) {
            break;
        }
    }
    assert_eq!(
        get(&mut c, &job.id).await.workers,
        ["w1"],
        "ids order the ranks"
    );
    doomed.shutdown_background();

    let mut requeued = None;
    while let Some(e) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("hang guard (PATIENCE, 120 s): the job never ended")
        .unwrap()
    {
        if let Some(job_event::Event::Queued(q)) = &e.event {
            requeued.get_or_insert(q.reason.clone());
        }
    }
    let requeued = requeued.expect("the job went back to the queue");
    assert!(
        requeued.starts_with("re-queued: worker w1 (rank 0) lost during step"),
        "{requeued}"
    );
    let lost_at: u32 = requeued
        .trim_start_matches("re-queued: worker w1 (rank 0) lost during step ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {requeued:?}"));
    let job = get(&mut c, &job.id).await;
    assert_eq!(job.state, JobState::Done as i32, "{job:?}");
    assert_eq!(
        (job.attempts, job.workers.as_slice()),
        (2, &["w2".to_string()][..])
    );
    // The second attempt continued from the first one's last checkpoint (one per step): it
    // redid at most the step that was running when the worker died and the one before it (its
    // checkpoint may have been on the way).
    println!(
        "lost during step {lost_at} of 60, resumed from step {}",
        job.resumed_from_step
    );
    assert!(
        job.resumed_from_step >= 1 && job.resumed_from_step + 2 >= lost_at,
        "lost during step {lost_at}, resumed from step {}",
        job.resumed_from_step
    );
    let checkpoints: Vec<_> = std::fs::read_dir(farm.artifacts.path().join(&job.id))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with(".checkpoint"))
        .collect();
    assert!(
        checkpoints.is_empty(),
        "a finished job keeps no checkpoint: {checkpoints:?}"
    );
    let out = farm.artifacts.path().join("survived.mp4");
    fetch(&mut c, &job.id, &out).await;
    assert_eq!(ffprobe_frames(&out)["nb_read_frames"], "9");
    // The resumed job's clip is the undisturbed single-process clip, byte for byte.
    let reference = farm.artifacts.path().join("survived-reference.mp4");
    reference_clip(&spec(60), &reference);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(),
        "the re-queued job's clip differs from the single-process render of its spec"
    );

    survivor.stop().await;
    served.stop().await;
}

/// The single-process pipeline's spec for `spec`, as a worker serving the tiny model makes it.
fn tiny_render_spec(spec: &RenderSpec) -> longtake_worker::model::render::RenderSpec {
    use longtake_worker::daemon::models::ServedModel;
    use longtake_worker::daemon::{task, ModelSource};
    let tiny = ServedModel::open(ModelSource::Tiny).expect("the tiny model");
    task::render_spec(&task::job_spec(spec, &tiny).expect("a valid spec"))
}

/// A 64×64 clip of `frames` frames at 16 fps: a bar sweeping right over a gradient.
fn input_clip(frames: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.mp4");
    let mut sink = open_writer(
        &path,
        Some(VideoFormat::Mp4),
        64,
        64,
        16,
        Quality::default(),
    )
    .unwrap();
    for f in 0..frames {
        let mut rgb = Vec::with_capacity(64 * 64 * 3);
        for y in 0..64usize {
            for x in 0..64usize {
                let bar = (x + 64 - 4 * f % 64) % 64 < 8;
                rgb.extend_from_slice(&if bar {
                    [230, 60, 40]
                } else {
                    [(x * 3) as u8, (y * 2) as u8, 90]
                });
            }
        }
        sink.push_frame(&rgb).unwrap();
    }
    sink.finish().unwrap();
    std::fs::read(path).unwrap()
}

/// Every frame of an MP4, decoded.
fn decoded(mp4: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    Mp4Clip::open(mp4)
        .unwrap()
        .decode(|rgb| {
            frames.push(rgb);
            Ok::<_, MediaError>(())
        })
        .unwrap();
    frames
}

/// Submits `spec` with `file` as its input, in 1000-byte parts.
async fn submit_with_input(
    c: &mut RenderServiceClient<Channel>,
    spec: RenderSpec,
    file: &[u8],
) -> Result<Job, tonic::Status> {
    let request = SubmitPart {
        part: Some(submit_part::Part::Request(SubmitRequest {
            spec: Some(spec),
            name: "extended".into(),
            ..Default::default()
        })),
    };
    let parts: Vec<SubmitPart> = std::iter::once(request)
        .chain(file.chunks(1000).map(|chunk| SubmitPart {
            part: Some(submit_part::Part::Data(chunk.to_vec())),
        }))
        .collect();
    Ok(c.submit_with_input(tokio_stream::iter(parts))
        .await?
        .into_inner()
        .job
        .unwrap())
}

/// An extension's spec on the tiny model: `new` frames after the clip.
fn extension(new: u32) -> RenderSpec {
    RenderSpec {
        frames: new,
        fps: 0,
        width: 0,
        height: 0,
        input: Some(Input {
            kind: InputKind::Clip as i32,
            ..Default::default()
        }),
        ..spec(2)
    }
}

/// The output the single process makes of an extension: the clip's frames as decoded, then the
/// tiny pipeline's new frames after it held the clip's last frames, written by the encoder the
/// coordinator uses.
fn reference_extension(spec: &RenderSpec, clip: &[u8], out: &Path) {
    use longtake_worker::families::wan::pipeline::WanPipeline;
    use longtake_worker::model::render::{RenderInput, Video};
    let mut spec = spec.clone();
    spec.input = Some(
        longtake_coordinator::input::read(longtake_proto::spec::InputKind::Clip, clip)
            .unwrap()
            .to_proto(),
    );
    let frames = decoded(clip);
    let mut render = tiny_render_spec(&spec);
    let held = render.frames - spec.frames as usize;
    render.input = Some(RenderInput::Continues(Video {
        rgb: frames[frames.len() - held..].concat(),
        first_frame: 0,
        frames: held,
        height: 64,
        width: 64,
    }));
    let pipeline = WanPipeline::tiny(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let video = pipeline.render(&render, &mut |_| {}).unwrap();
    let mut sink =
        open_writer(out, Some(VideoFormat::Mp4), 64, 64, 16, Quality::default()).unwrap();
    for frame in frames.iter() {
        sink.push_frame(frame).unwrap();
    }
    for frame in video.rgb.chunks_exact(64 * 64 * 3).skip(held) {
        sink.push_frame(frame).unwrap();
    }
    sink.finish().unwrap();
}

/// An extension through the farm: the clip uploaded with the job, its frames first in the
/// output, then the new frames, the bytes of the single-process render of the same extension;
/// in one worker group and co-denoised by two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extension_is_the_clip_then_the_single_process_new_frames() {
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let workers = [farm.worker("w1").await, farm.worker("w2").await];
    let mut c = client(&url).await;
    let clip = input_clip(13);
    let two_groups = RenderSpec {
        groups: 2,
        window_latent_frames: 3,
        overlap_latent_frames: Some(1),
        ..extension(16)
    };
    for spec in [extension(8), two_groups] {
        let job = submit_with_input(&mut c, spec.clone(), &clip)
            .await
            .unwrap();
        let input = job.spec.as_ref().unwrap().input.clone().unwrap();
        assert_eq!(
            (input.width, input.height, input.frames, input.fps),
            (64, 64, 13, 16)
        );
        assert_eq!(input.bytes, clip.len() as u64);
        let job = wait_state(&mut c, &job.id, JobState::Done).await;
        let out = farm.artifacts.path().join(format!("{}.mp4", job.id));
        fetch(&mut c, &job.id, &out).await;
        let frames = decoded(&std::fs::read(&out).unwrap());
        assert_eq!(frames.len(), 13 + spec.frames as usize);
        let reference = farm
            .artifacts
            .path()
            .join(format!("{}-reference.mp4", job.id));
        reference_extension(&spec, &clip, &reference);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(),
            "the farm's extension differs from the single process's ({} group(s))",
            spec.groups.max(1)
        );
        // the input is kept with the job's artifacts
        let kept = farm.artifacts.path().join(&job.id).join(".input.mp4");
        assert_eq!(std::fs::read(kept).unwrap(), clip);
    }
    for worker in workers {
        worker.stop().await;
    }
    served.stop().await;
}

/// Bad inputs are named and nothing of them is kept: an oversized upload (refused as it
/// streams), an unreadable clip, a clip of another frame rate than the spec, a file sent with
/// the plain Submit; the farm stays up and an extension queued before a restart still runs
/// after it, from the file kept with its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_are_named_and_a_queued_extension_survives_a_restart() {
    let farm = Farm::new();
    let clip = input_clip(9);
    let (url, served) = farm
        .coordinator_limited(Limits {
            max_input_bytes: clip.len() as u64 - 1,
            ..Limits::default()
        })
        .await;
    let mut c = client(&url).await;
    let e = submit_with_input(&mut c, extension(4), &clip)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("input: the clip is over this farm's limit of"),
        "{}",
        e.message()
    );
    served.stop().await;

    let (url, served) = farm.coordinator_limited(Limits::default()).await;
    let mut c = client(&url).await;
    for (spec, file, message) in [
        (
            extension(4),
            b"not an mp4".to_vec(),
            "input: the clip is not a readable MP4",
        ),
        (
            RenderSpec {
                fps: 24,
                ..extension(4)
            },
            clip.clone(),
            "spec.fps: 24 differs from the clip's 16",
        ),
        (
            extension(6),
            clip.clone(),
            "spec.frames: an extension renders new frames in fours",
        ),
        (
            RenderSpec {
                input: None,
                ..extension(4)
            },
            clip.clone(),
            "spec.input: unset",
        ),
    ] {
        let e = submit_with_input(&mut c, spec, &file).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with(message), "{}", e.message());
    }
    let e = c
        .submit(SubmitRequest {
            spec: Some(extension(4)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e
        .message()
        .starts_with("spec.input: a job with an input file is submitted with SubmitWithInput"));
    // nothing of the refused uploads is kept
    let kept: Vec<_> = std::fs::read_dir(farm.artifacts.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != ".incoming")
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    let incoming = farm.artifacts.path().join(".incoming");
    assert!(!incoming.exists() || std::fs::read_dir(&incoming).unwrap().next().is_none());

    // queued with no worker, then the coordinator restarts: the job and its file are kept
    let queued = submit_with_input(&mut c, extension(4), &clip)
        .await
        .unwrap();
    served.stop().await;
    let (url, served) = farm.coordinator_limited(Limits::default()).await;
    let worker = farm.worker("w1").await;
    let mut c = client(&url).await;
    let done = wait_state(&mut c, &queued.id, JobState::Done).await;
    let out = farm.artifacts.path().join("after-restart.mp4");
    fetch(&mut c, &done.id, &out).await;
    assert_eq!(decoded(&std::fs::read(&out).unwrap()).len(), 13);
    worker.stop().await;
    served.stop().await;
}

/// A render from a picture through the farm: the picture uploaded with the job, rendered by
/// the image-to-video fixture's checkpoint on two workers under `cfg=2`, and longer than a
/// window by two worker groups, each equal within one level to the single process; a picture
/// to a text-to-video model fails naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_render_from_a_picture_on_two_ranks_equals_the_single_process() {
    use longtake_worker::families::wan::pipeline::WanPipeline;
    use longtake_worker::model::render::{RenderInput, Video};
    let fixture = longtake_worker::model::reference::parity_fixture_dirs()
        .into_iter()
        .find(|dir| dir.ends_with("wan-i2v-tiny"))
        .expect("the wan-i2v-tiny fixture")
        .join("pipeline");
    let farm = Farm::new();
    let (_coordinator, url, served) = farm.coordinator().await;
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        let config = DaemonConfig {
            models: vec![
                ModelSource::Checkpoint {
                    name: "i2v".into(),
                    dir: fixture.clone(),
                },
                ModelSource::Tiny,
            ],
            ..DaemonConfig::new(id, "127.0.0.1")
        };
        workers.push(Running(farm.local.worker(config).await.unwrap()));
    }
    let mut c = client(&url).await;
    // a 40×24 picture: the render takes its aspect over the size asked for
    let rgb: Vec<u8> = (0..40 * 24)
        .flat_map(|i| [(i % 40 * 6) as u8, (i / 40 * 10) as u8, 120])
        .collect();
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, 40, 24);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&rgb).unwrap();
    }
    let spec = RenderSpec {
        model: "i2v".into(),
        frames: 9,
        width: 48,
        height: 32,
        steps: 3,
        layout: "cfg=2".into(),
        format: OutputFormat::Png as i32,
        input: Some(Input {
            kind: InputKind::Image as i32,
            ..Default::default()
        }),
        ..spec(3)
    };
    let job = submit_with_input(&mut c, spec.clone(), &png).await.unwrap();
    let job = wait_state(&mut c, &job.id, JobState::Done).await;
    let dir = farm.artifacts.path().join("picture-render");
    fetch_files(&mut c, &job.id, &dir).await;
    let frames = media::png_frames(&dir);
    assert_eq!(frames.len(), 9);

    let pipeline =
        WanPipeline::load(&fixture, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let resolved = RenderSpec {
        input: Some(
            longtake_coordinator::input::read(longtake_proto::spec::InputKind::Image, &png)
                .unwrap()
                .to_proto(),
        ),
        ..spec.clone()
    };
    let served_model =
        longtake_worker::daemon::models::ServedModel::open(ModelSource::Checkpoint {
            name: "i2v".into(),
            dir: fixture.clone(),
        })
        .unwrap();
    let job_spec = longtake_worker::daemon::task::job_spec(&resolved, &served_model).unwrap();
    let mut render = longtake_worker::daemon::task::render_spec(&job_spec);
    render.input = Some(RenderInput::FirstFrame(Video {
        rgb,
        first_frame: 0,
        frames: 1,
        height: 24,
        width: 40,
    }));
    let worst = media::max_diff(
        &frames,
        &frames_of(&pipeline.render(&render, &mut |_| {}).unwrap()),
    );
    assert!(
        worst <= 1,
        "cfg=2 on the farm: {worst} levels from the single process"
    );

    // longer than a window (2 windows of 3 latent frames), co-denoised by two worker groups
    let long = RenderSpec {
        frames: 17,
        layout: String::new(),
        window_latent_frames: 3,
        overlap_latent_frames: Some(1),
        groups: 2,
        ..spec.clone()
    };
    let job = submit_with_input(&mut c, long, &png).await.unwrap();
    let job = wait_state(&mut c, &job.id, JobState::Done).await;
    let dir = farm.artifacts.path().join("long-picture-render");
    fetch_files(&mut c, &job.id, &dir).await;
    let frames = media::png_frames(&dir);
    assert_eq!(frames.len(), 17);
    let job_spec =
        longtake_worker::daemon::task::job_spec(&job.spec.unwrap(), &served_model).unwrap();
    assert!(job_spec.is_windowed());
    let mut single = longtake_worker::daemon::task::render_spec(&job_spec);
    single.windows = single
        .windows
        .map(|w| longtake_proto::spec::WindowSettings { groups: 1, ..w });
    single.input = render.input.clone();
    let worst = media::max_diff(
        &frames,
        &frames_of(&pipeline.render(&single, &mut |_| {}).unwrap()),
    );
    assert!(
        worst <= 1,
        "two groups on the farm: {worst} levels from the single process"
    );

    // extending a clip with the image-to-video model: it starts from the clip's last frame;
    // the output is the clip, then the frames after that one
    let clip = input_clip(9);
    let extension = RenderSpec {
        model: "i2v".into(),
        steps: 3,
        layout: String::new(),
        ..extension(8)
    };
    let job = submit_with_input(&mut c, extension, &clip).await.unwrap();
    let job = wait_state(&mut c, &job.id, JobState::Done).await;
    let out = farm.artifacts.path().join("i2v-extension.mp4");
    fetch(&mut c, &job.id, &out).await;
    let frames = decoded(&std::fs::read(&out).unwrap());
    assert_eq!(frames.len(), 17);
    let clip_frames = decoded(&clip);
    let job_spec =
        longtake_worker::daemon::task::job_spec(&job.spec.unwrap(), &served_model).unwrap();
    assert_eq!(job_spec.held_frames(), 1);
    let mut render = longtake_worker::daemon::task::render_spec(&job_spec);
    render.input = Some(RenderInput::FirstFrame(Video {
        rgb: clip_frames[8].clone(),
        first_frame: 0,
        frames: 1,
        height: 64,
        width: 64,
    }));
    let video = pipeline.render(&render, &mut |_| {}).unwrap();
    let expected = farm.artifacts.path().join("i2v-extension-reference.mp4");
    let mut sink = open_writer(
        &expected,
        Some(VideoFormat::Mp4),
        64,
        64,
        16,
        Quality::default(),
    )
    .unwrap();
    for frame in clip_frames.iter() {
        sink.push_frame(frame).unwrap();
    }
    for frame in video.rgb.chunks_exact(64 * 64 * 3).skip(1) {
        sink.push_frame(frame).unwrap();
    }
    sink.finish().unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&expected).unwrap(),
        "the image-to-video extension differs from the single process's"
    );

    // the text-to-video tiny model takes no picture: the job fails saying so
    let t2v = RenderSpec {
        model: "tiny".into(),
        layout: String::new(),
        ..spec
    };
    let job = submit_with_input(&mut c, t2v, &png).await.unwrap();
    let failed = wait_state(&mut c, &job.id, JobState::Failed).await;
    assert!(
        failed
            .message
            .contains("model tiny is a text-to-video model: it takes no picture"),
        "{}",
        failed.message
    );
    for worker in workers {
        worker.stop().await;
    }
    served.stop().await;
}
