//! What the farm costs over rendering in one process. For each spec and round, side by side:
//! the single-process reference (`WanPipeline::tiny(..).render`, then the same MP4 writer the
//! coordinator uses), and the same spec as a job through a farm in this process (a coordinator
//! over `InProcessMembership` + `InMemoryJobStore`, real worker daemons, gRPC over loopback),
//! watched and fetched by a client; plus a `cfg=2` job on two workers. Prints medians (min, max)
//! and how the difference splits into start, per-step and tail. See `FARM.md` for what each
//! figure includes and the figures measured.
//!
//! `cargo bench -p longtake-cli --bench farm -- [--rounds N] [--spec WxHxFxS ...]
//! [--cfg2-spec WxHxFxS | --no-cfg2] [--quick]` (`cargo bench --profile dev ...` reuses the dev
//! build). `cargo test` does not run it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use longtake_cli::local::{LocalFarm, Served};
use longtake_coordinator::encode::{open_writer, Quality, VideoFormat};
use longtake_coordinator::Coordinator;
use longtake_proto::render_service_client::RenderServiceClient;
use longtake_proto::worker_service_client::WorkerServiceClient;
use longtake_proto::{
    job_event, task_event, HealthRequest, JobRequest, JobState, RenderSpec, ReserveRequest,
    SubmitRequest, TaskRequest, WorkerState, MAX_MESSAGE_BYTES,
};
use longtake_worker::daemon::{DaemonConfig, ModelSource};
use longtake_worker::families::wan::pipeline::WanPipeline;
use longtake_worker::model::render::Progress;
use tonic::transport::Channel;

const USAGE: &str =
    "usage: farm [--rounds N] [--spec WxHxFxS ...] [--cfg2-spec WxHxFxS | --no-cfg2] \
[--prompt TEXT] [--quick]
  --spec       width x height x frames x steps of the tiny model; repeat for several
               (default: 64x64x9x10 and 256x256x33x10)
  --cfg2-spec  the spec of the two-worker cfg=2 job (default: the first --spec)
  --quick      one round of the first spec only (a smoke run)";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Size {
    width: u32,
    height: u32,
    frames: u32,
    steps: u32,
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<u32> = s
            .split('x')
            .map(|p| p.parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("--spec {s:?}: {e}; expected WxHxFxS, e.g. 64x64x9x10"))?;
        let [width, height, frames, steps] = parts[..] else {
            return Err(format!(
                "--spec {s:?}: expected four numbers WxHxFxS, e.g. 64x64x9x10"
            ));
        };
        Ok(Self {
            width,
            height,
            frames,
            steps,
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}, {} frames, {} steps",
            self.width, self.height, self.frames, self.steps
        )
    }
}

struct Args {
    rounds: usize,
    specs: Vec<Size>,
    cfg2: Option<Size>,
    prompt: String,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut rounds = 5;
    let mut specs = Vec::new();
    let mut cfg2: Option<Option<Size>> = None;
    let mut prompt = "a lighthouse in a storm".to_string();
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes this to every bench binary
            "--bench" => {}
            "--rounds" => {
                rounds = value("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--spec" => specs.push(value("--spec")?.parse()?),
            "--cfg2-spec" => cfg2 = Some(Some(value("--cfg2-spec")?.parse()?)),
            "--no-cfg2" => cfg2 = Some(None),
            "--prompt" => prompt = value("--prompt")?,
            "--quick" => quick = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if specs.is_empty() {
        specs = vec!["64x64x9x10".parse()?, "256x256x33x10".parse()?];
    }
    if quick {
        rounds = 1;
        specs.truncate(1);
    }
    if rounds == 0 {
        return Err("--rounds: at least 1".into());
    }
    let cfg2 = cfg2.unwrap_or(Some(specs[0]));
    Ok(Args {
        rounds,
        specs,
        cfg2,
        prompt,
    })
}

fn proto_spec(size: Size, prompt: &str, layout: &str) -> RenderSpec {
    RenderSpec {
        prompt: prompt.into(),
        model: "tiny".into(),
        frames: size.frames,
        width: size.width,
        height: size.height,
        steps: size.steps,
        guidance_scale: 5.0,
        seed: 7,
        fps: 16,
        layout: layout.into(),
        ..Default::default()
    }
}

/// One single-process render and its encoding, in seconds.
struct Direct {
    /// `pipeline.render`: initial latents, prompt encoding, denoising, VAE decode.
    render: f64,
    /// Render start → prompts encoded.
    encoded: f64,
    /// Render start → first step done.
    first_step: f64,
    /// First step done → last step done.
    steps_span: f64,
    /// Last step done → frames decoded.
    decode: f64,
    /// The frames written to MP4 by the coordinator's writer.
    mp4: f64,
    /// The MP4 itself, to check the farm's clip against.
    clip: Vec<u8>,
}

fn direct(pipeline: &WanPipeline, spec: &RenderSpec, dir: &Path) -> Result<Direct> {
    let start = Instant::now();
    let mut encoded = None;
    let mut steps = Vec::new();
    let video = pipeline.render(&tiny_render_spec(spec), &mut |p| match p {
        Progress::Encoded { .. } => encoded = Some(start.elapsed()),
        Progress::Step { .. } => steps.push(start.elapsed()),
        Progress::Decoding | Progress::Frames(_) | Progress::Decoded { .. } => {}
    })?;
    let render = start.elapsed();
    let (Some(encoded), Some(first), Some(last)) = (encoded, steps.first(), steps.last()) else {
        return Err("the pipeline reported no encoding or no step".into());
    };

    let path = dir.join("direct.mp4");
    let start = Instant::now();
    let mut sink = open_writer(
        &path,
        Some(VideoFormat::Mp4),
        video.width as u32,
        video.height as u32,
        spec.fps,
        Quality::default(),
    )?;
    for frame in video.rgb.chunks_exact(video.width * video.height * 3) {
        sink.push_frame(frame)?;
    }
    sink.finish()?;
    let mp4 = start.elapsed().as_secs_f64();
    Ok(Direct {
        render: render.as_secs_f64(),
        encoded: encoded.as_secs_f64(),
        first_step: first.as_secs_f64(),
        steps_span: (*last - *first).as_secs_f64(),
        decode: (render - *last).as_secs_f64(),
        mp4,
        clip: std::fs::read(&path)?,
    })
}

/// One job through the farm, as its client saw it, in seconds from the start of `Submit`.
struct FarmJob {
    submit_rpc: f64,
    /// The coordinator's `planned` event (when Watch saw it live) and the job's `started_at_ms`
    /// (every rank's task started), from the server's clock (milliseconds) against the job's
    /// `submitted_at_ms`.
    planned_ms: Option<u64>,
    running_ms: u64,
    /// The first `Step` event seen by Watch; `None` when Watch attached after it.
    first_step: Option<f64>,
    last_step: f64,
    done: f64,
    fetch: f64,
    output_bytes: u64,
    /// The coordinator's own time per step during this job (mean over its steps).
    coordinator_step: Duration,
    coordinator_steps: u64,
    clip: Vec<u8>,
}

async fn farm_job(
    coordinator: &Coordinator,
    client: &mut RenderServiceClient<Channel>,
    spec: RenderSpec,
) -> Result<FarmJob> {
    let before = coordinator.step_overhead();
    let start = Instant::now();
    let job = client
        .submit(SubmitRequest {
            spec: Some(spec.clone()),
            priority: 0,
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .job
        .ok_or("Submit answered no job")?;
    let submit_rpc = start.elapsed().as_secs_f64();
    let mut stream = client
        .watch(JobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let (mut planned_ms, mut first_step, mut last_step, mut done) = (None, None, None, None);
    let mut first_event = true;
    while let Some(event) = stream.message().await? {
        let at = start.elapsed().as_secs_f64();
        let since_submit = event.at_ms.saturating_sub(job.submitted_at_ms);
        // The first event is a snapshot of the job stamped when Watch attached, not when it
        // happened: it times nothing.
        let live = !first_event;
        first_event = false;
        match event.event {
            Some(job_event::Event::Planned(_)) if live => planned_ms = Some(since_submit),
            Some(job_event::Event::Step(s)) if s.step == 0 => {}
            Some(job_event::Event::Step(s)) => {
                if s.step == 1 && live {
                    first_step = Some(at);
                }
                last_step = Some(at);
            }
            Some(job_event::Event::Done(_)) => done = Some(at),
            Some(job_event::Event::Failed(f)) => {
                return Err(format!("job failed: {}", f.reason).into())
            }
            Some(job_event::Event::Cancelled(c)) => {
                return Err(format!("job cancelled: {}", c.reason).into())
            }
            _ => {}
        }
    }
    let done = done.ok_or("the watch ended without `done`")?;
    let last_step = last_step.ok_or("the watch saw no step")?;
    let after = coordinator.step_overhead();

    let fetch_start = Instant::now();
    let mut chunks = client
        .fetch_output(JobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let mut clip = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        clip.extend_from_slice(&chunk.data);
    }
    let fetch = fetch_start.elapsed().as_secs_f64();
    let job = client.get(JobRequest { id: job.id }).await?.into_inner();
    if job.state != JobState::Done as i32 || clip.len() as u64 != job.output_bytes {
        return Err(format!(
            "job ended {:?} with {} of {} bytes fetched",
            job.state(),
            clip.len(),
            job.output_bytes
        )
        .into());
    }
    let coordinator_steps = after.steps - before.steps;
    Ok(FarmJob {
        submit_rpc,
        planned_ms,
        running_ms: job.started_at_ms.saturating_sub(job.submitted_at_ms),
        first_step,
        last_step,
        done,
        fetch,
        output_bytes: job.output_bytes,
        coordinator_step: (after.total - before.total) / coordinator_steps.max(1) as u32,
        coordinator_steps,
        clip,
    })
}

/// A worker's first task sent to it directly (no coordinator): its `started.load_s` (the cold
/// model load) and when the task started and took its first step, from the `RunTask` call.
struct Probe {
    load_s: f64,
    reserve: f64,
    started: f64,
    first_step: f64,
}

async fn probe_worker(url: &str, job_id: &str, spec: RenderSpec) -> Result<Probe> {
    let mut client = WorkerServiceClient::connect(url.to_string())
        .await?
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let job_id = job_id.to_string();
    let start = Instant::now();
    client
        .reserve(ReserveRequest {
            job_id: job_id.clone(),
            attempt: 1,
            rank: 0,
            world_size: 1,
        })
        .await?;
    let reserve = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut stream = client
        .run_task(TaskRequest {
            job_id,
            attempt: 1,
            rank: 0,
            spec: Some(spec),
            peers: vec![],
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut load_s, mut started, mut first_step) = (None, None, None);
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(task_event::Event::Started(s)) => {
                load_s = Some(s.load_s);
                started = Some(start.elapsed().as_secs_f64());
            }
            Some(task_event::Event::Step(s)) if s.step == 1 => {
                first_step = Some(start.elapsed().as_secs_f64())
            }
            Some(task_event::Event::Finished(f)) if !f.error.is_empty() => {
                return Err(format!("probe task: {}", f.error).into())
            }
            _ => {}
        }
    }
    // the worker publishes idle once the task is over; a job placed before that would be refused
    loop {
        let worker = client.health(HealthRequest {}).await?.into_inner();
        if worker.state() == WorkerState::Idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match (load_s, started, first_step) {
        (Some(load_s), Some(started), Some(first_step)) => Ok(Probe {
            load_s,
            reserve,
            started,
            first_step,
        }),
        _ => Err("the probe task reported no start or no first step".into()),
    }
}

async fn render_client(url: &str) -> Result<RenderServiceClient<Channel>> {
    Ok(RenderServiceClient::connect(url.to_string())
        .await?
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A farm of `workers` tiny-model workers, its coordinator and a client.
struct Bench {
    _local: LocalFarm,
    coordinator: Coordinator,
    served: Served,
    workers: Vec<Served>,
    client: RenderServiceClient<Channel>,
}

impl Bench {
    async fn start(dir: PathBuf, name: &str, workers: usize) -> Result<Self> {
        let local = LocalFarm::new(dir);
        let (coordinator, served) = local.coordinator().await?;
        let mut started = Vec::new();
        for i in 0..workers {
            let config = DaemonConfig {
                models: vec![ModelSource::Tiny],
                ..DaemonConfig::new(format!("{name}-w{i}"), "127.0.0.1")
            };
            started.push(local.worker(config).await?);
        }
        let client = render_client(served.url()).await?;
        Ok(Self {
            _local: local,
            coordinator,
            served,
            workers: started,
            client,
        })
    }

    async fn stop(self) -> Result<()> {
        for worker in self.workers {
            worker.stop().await?;
        }
        self.served.stop().await?;
        Ok(())
    }
}

/// Per-round figures of one line of the table, in the unit of the line.
#[derive(Default)]
struct Table {
    rows: Vec<(String, String, Vec<f64>)>,
}

impl Table {
    fn add(&mut self, group: &str, what: &str, value: f64) {
        match self
            .rows
            .iter_mut()
            .find(|(g, w, _)| g == group && w == what)
        {
            Some((_, _, values)) => values.push(value),
            None => self.rows.push((group.into(), what.into(), vec![value])),
        }
    }

    fn print(&self) {
        let mut group = "";
        for (g, what, values) in &self.rows {
            if g != group {
                println!(
                    "\n{g}\n  {:<58} {:>10} {:>10} {:>10}",
                    "", "median", "min", "max"
                );
                group = g;
            }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "  {what:<58} {:>10.1} {:>10.1} {:>10.1}",
                median(&sorted),
                sorted[0],
                sorted[sorted.len() - 1]
            );
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The rows comparing one farm job with the direct render of its spec (milliseconds).
fn compare(table: &mut Table, group: &str, steps: u32, d: &Direct, f: &FarmJob) {
    let ms = 1e3;
    let steps = f64::from(steps);
    table.add(group, "direct: pipeline.render", d.render * ms);
    table.add(group, "direct: + MP4 encode", d.mp4 * ms);
    table.add(group, "direct: start → prompts encoded", d.encoded * ms);
    table.add(
        group,
        "direct: start → first step (latents, prompts, step 1)",
        d.first_step * ms,
    );
    table.add(group, "farm: submit → done (client)", f.done * ms);
    table.add(group, "farm: fetch", f.fetch * ms);
    table.add(group, "farm: submit RPC", f.submit_rpc * ms);
    if let Some(p) = f.planned_ms {
        table.add(group, "farm: submit → planned (server clock, ms)", p as f64);
    }
    table.add(
        group,
        "farm: submit → running (server clock, ms)",
        f.running_ms as f64,
    );
    let total = (f.done - d.render - d.mp4) / steps * ms;
    table.add(group, "DIFF per step: (farm − render − MP4) / steps", total);
    if let Some(first) = f.first_step {
        table.add(group, "farm: submit → first step (client)", first * ms);
        table.add(
            group,
            "  diff start: farm − direct to first step",
            (first - d.first_step) * ms,
        );
        if steps > 1.0 {
            table.add(
                group,
                "  diff per step of the loop (steps 2..n)",
                ((f.last_step - first) - d.steps_span) / (steps - 1.0) * ms,
            );
        }
        table.add(
            group,
            "  diff tail: last step → done vs decode + MP4",
            ((f.done - f.last_step) - (d.decode + d.mp4)) * ms,
        );
    }
    table.add(
        group,
        "coordinator step overhead, mean per step (µs)",
        f.coordinator_step.as_secs_f64() * 1e6,
    );
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    println!(
        "farm overhead: {} round(s); specs {}; cfg=2 job: {}",
        args.rounds,
        args.specs
            .iter()
            .map(Size::to_string)
            .collect::<Vec<_>>()
            .join(" | "),
        args.cfg2.map_or("none".into(), |s| s.to_string())
    );

    let load_start = Instant::now();
    let pipeline = WanPipeline::tiny(&Device::Cpu, DType::F32)?;
    let direct_load = load_start.elapsed();

    let one = runtime.block_on(Bench::start(dir.path().join("one"), "one", 1))?;
    let two = match args.cfg2 {
        Some(_) => Some(runtime.block_on(Bench::start(dir.path().join("two"), "two", 2))?),
        None => None,
    };

    // The worker's first two tasks, straight to it: the first loads the model, the second finds
    // it loaded (the daemon keeps the pipeline between one-rank tasks, so every farm job below
    // runs warm).
    let mut probes = Vec::new();
    for id in ["probe-cold", "probe-warm"] {
        let spec = proto_spec(args.specs[0], &args.prompt, "");
        probes.push(runtime.block_on(probe_worker(one.workers[0].url(), id, spec))?);
    }

    let mut table = Table::default();
    let mut missed = 0;
    let mut sizes: Vec<Size> = args.specs.clone();
    if let Some(cfg2) = args.cfg2 {
        if !sizes.contains(&cfg2) {
            sizes.push(cfg2);
        }
    }
    let (mut one, mut two) = (one, two);
    for round in 1..=args.rounds {
        eprintln!("round {round} of {}", args.rounds);
        for &size in &sizes {
            let spec = proto_spec(size, &args.prompt, "");
            let cfg2 = args.cfg2.filter(|&c| c == size);
            // The machine's load drifts: every other round the farm goes first.
            let direct_first = round % 2 == 1;
            let mut d = None;
            if direct_first {
                d = Some(direct(&pipeline, &spec, dir.path())?);
            }
            let f1 = match args.specs.contains(&size) {
                true => Some(runtime.block_on(farm_job(
                    &one.coordinator,
                    &mut one.client,
                    spec.clone(),
                ))?),
                false => None,
            };
            let f2 = match (cfg2, two.as_mut()) {
                (Some(_), Some(two)) => {
                    let spec = proto_spec(size, &args.prompt, "cfg=2");
                    Some(runtime.block_on(farm_job(&two.coordinator, &mut two.client, spec))?)
                }
                _ => None,
            };
            let d = match d {
                Some(d) => d,
                None => direct(&pipeline, &spec, dir.path())?,
            };
            if let Some(f) = f1 {
                if f.clip != d.clip {
                    return Err(
                        format!("{size}: the farm's clip differs from the direct one").into(),
                    );
                }
                if f.coordinator_steps != u64::from(size.steps) {
                    return Err(format!(
                        "{size}: the coordinator counted {} steps",
                        f.coordinator_steps
                    )
                    .into());
                }
                missed += usize::from(f.first_step.is_none());
                let group = format!("{size} — 1 worker");
                compare(&mut table, &group, size.steps, &d, &f);
                table.add(&group, "farm: output bytes", f.output_bytes as f64);
            }
            if let Some(f) = f2 {
                missed += usize::from(f.first_step.is_none());
                compare(
                    &mut table,
                    &format!("{size} — cfg=2 on 2 workers"),
                    size.steps,
                    &d,
                    &f,
                );
            }
        }
    }

    println!(
        "\nsingle-process model load (WanPipeline::tiny, cold): {:.1} ms",
        direct_load.as_secs_f64() * 1e3
    );
    for (probe, which) in probes.iter().zip(["first (cold)", "second (warm)"]) {
        println!(
            "worker's {which} task sent straight to it ({}): Reserve {:.1} ms; RunTask → started \
             {:.1} ms (started.load_s {:.1} ms); RunTask → first step {:.1} ms",
            args.specs[0],
            probe.reserve * 1e3,
            probe.started * 1e3,
            probe.load_s * 1e3,
            probe.first_step * 1e3
        );
    }
    table.print();
    let overall = one.coordinator.step_overhead();
    println!(
        "\ncoordinator step overhead over the whole run (1-worker farm): {} steps, mean {:.1} µs, max {:.1} µs",
        overall.steps,
        overall.total.as_secs_f64() * 1e6 / overall.steps.max(1) as f64,
        overall.max.as_secs_f64() * 1e6
    );
    if missed > 0 {
        println!("({missed} job(s) took their first step before Watch attached; their start rows are left out)");
    }
    runtime.block_on(async {
        one.stop().await?;
        if let Some(two) = two {
            two.stop().await?;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    Ok(())
}

/// The single-process pipeline's spec for `spec`, as a worker serving the tiny model makes it.
fn tiny_render_spec(spec: &RenderSpec) -> longtake_worker::model::render::RenderSpec {
    use longtake_worker::daemon::models::ServedModel;
    use longtake_worker::daemon::task;
    let tiny = ServedModel::open(ModelSource::Tiny).expect("the tiny model");
    task::render_spec(&task::job_spec(spec, &tiny).expect("a valid spec"))
}
