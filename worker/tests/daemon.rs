//! The worker daemon over real gRPC on loopback: daemons started with `daemon::run` and the
//! in-process membership, driven by a `WorkerServiceClient` as the coordinator drives them. The
//! tiny model at 64×64, 9 frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use longtake_proto::membership::{InProcessMembership, Membership, MembershipEvent};
use longtake_proto::worker_service_client::WorkerServiceClient;
use longtake_proto::{
    task_event::Event, AbortRequest, HealthRequest, RenderSpec, ReserveRequest, TaskEvent,
    TaskFinished, TaskRequest, Worker, WorkerState, MAX_MESSAGE_BYTES,
};
use longtake_worker::daemon::{self, DaemonConfig, DaemonCounters, DaemonError, ModelSource};
use longtake_worker::families::wan::pipeline::WanPipeline;
use longtake_worker::model::render as pipeline;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Client = WorkerServiceClient<Channel>;

/// Hang guard for every wait on the daemon: far beyond anything the tests wait for, it only turns
/// a hang into a failure. No test asserts on how long something took.
const WAIT: Duration = Duration::from_secs(60);

fn spec(steps: u32, layout: &str) -> RenderSpec {
    RenderSpec {
        prompt: "a wolf howls at the moon".into(),
        model: "tiny".into(),
        frames: 9,
        width: 64,
        height: 64,
        steps,
        guidance_scale: 5.0,
        seed: 7,
        fps: 16,
        layout: layout.into(),
        ..Default::default()
    }
}

/// The single-process reference render of [`spec`].
async fn reference(steps: u32) -> TestResult<pipeline::Video> {
    tokio::task::spawn_blocking(move || -> TestResult<_> {
        let pipeline = WanPipeline::tiny(&Device::Cpu, DType::F32)?;
        let spec = pipeline::RenderSpec {
            input: None,
            prompt: "a wolf howls at the moon".into(),
            negative_prompt: String::new(),
            frames: 9,
            width: 64,
            height: 64,
            steps: steps as usize,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 7,
            windows: None,
            timeline: Default::default(),
        };
        Ok(pipeline.render(&spec, &mut |_| {})?)
    })
    .await?
}

struct Daemon {
    id: String,
    counters: Arc<DaemonCounters>,
    address: String,
    shutdown: Option<oneshot::Sender<()>>,
    run: tokio::task::JoinHandle<Result<(), DaemonError>>,
}

impl Daemon {
    async fn start(
        id: &str,
        membership: &InProcessMembership,
        configure: impl FnOnce(&mut DaemonConfig),
    ) -> TestResult<Self> {
        let mut config = DaemonConfig::new(id, "127.0.0.1");
        // The specs here are the tiny model's (seeded weights, compared with WanPipeline::tiny).
        config.models = vec![ModelSource::Tiny];
        config.reservation_timeout = Duration::from_secs(20);
        configure(&mut config);
        let counters = config.counters.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let membership: Arc<dyn Membership> = Arc::new(membership.clone());
        let run = tokio::spawn(daemon::run(config, membership.clone(), listener, async {
            let _ = rx.await;
        }));
        // Registered before it serves: wait for the record.
        let deadline = Instant::now() + WAIT;
        while !membership.list().await?.iter().any(|w| w.id == id) {
            assert!(
                Instant::now() < deadline,
                "hang guard ({WAIT:?}): worker {id} never registered"
            );
            if run.is_finished() {
                return Err(format!("worker {id} stopped: {:?}", run.await?).into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            id: id.into(),
            counters,
            address,
            shutdown: Some(tx),
            run,
        })
    }

    async fn client(&self) -> TestResult<Client> {
        Ok(
            WorkerServiceClient::connect(format!("http://{}", self.address))
                .await?
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    async fn stop(mut self) -> TestResult {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, self.run)
            .await
            .map_err(|_| format!("hang guard ({WAIT:?}): the daemon never stopped"))???;
        Ok(())
    }
}

fn reserve(job: &str, rank: u32, world_size: u32) -> ReserveRequest {
    ReserveRequest {
        job_id: job.into(),
        attempt: 1,
        rank,
        world_size,
    }
}

/// The mesh secret of the tasks here, as the coordinator would draw one per attempt.
const MESH_SECRET: [u8; 32] = [0x42; 32];

fn task(job: &str, rank: u32, spec: RenderSpec, peers: &[String]) -> TaskRequest {
    TaskRequest {
        job_id: job.into(),
        attempt: 1,
        rank,
        spec: Some(spec),
        peers: peers.to_vec(),
        mesh_secret: if peers.is_empty() {
            Vec::new()
        } else {
            MESH_SECRET.to_vec()
        },
        ..Default::default()
    }
}

/// Reserves and starts a one-rank task.
async fn start_task(
    client: &mut Client,
    job: &str,
    spec: RenderSpec,
) -> TestResult<Streaming<TaskEvent>> {
    client.reserve(reserve(job, 0, 1)).await?;
    Ok(client.run_task(task(job, 0, spec, &[])).await?.into_inner())
}

async fn next(stream: &mut Streaming<TaskEvent>) -> TestResult<Event> {
    let event = tokio::time::timeout(WAIT, stream.message())
        .await
        .map_err(|_| format!("hang guard ({WAIT:?}): no task event"))??
        .ok_or("the task stream ended without `finished`")?;
    Ok(event.event.ok_or("an empty task event")?)
}

/// Every event up to and including `finished`.
async fn collect(stream: &mut Streaming<TaskEvent>) -> TestResult<Vec<Event>> {
    let mut events = Vec::new();
    loop {
        let event = next(stream).await?;
        let last = matches!(event, Event::Finished(_));
        events.push(event);
        if last {
            assert!(
                stream.message().await?.is_none(),
                "an event after `finished`"
            );
            return Ok(events);
        }
    }
}

fn finished(events: &[Event]) -> TaskFinished {
    match events.last() {
        Some(Event::Finished(f)) => f.clone(),
        other => panic!("the last event is not `finished`: {other:?}"),
    }
}

/// The RGB bytes of the frame batches, checked to be in order and of the spec's size.
fn frames(events: &[Event]) -> Vec<u8> {
    let mut rgb = Vec::new();
    let mut next_frame = 0;
    for event in events {
        if let Event::Frames(batch) = event {
            assert_eq!(batch.first, next_frame, "frame batches out of order");
            assert_eq!((batch.width, batch.height), (64, 64));
            assert_eq!(batch.rgb.len(), batch.count as usize * 64 * 64 * 3);
            next_frame += batch.count;
            rgb.extend_from_slice(&batch.rgb);
        }
    }
    rgb
}

fn state(worker: &Worker) -> (WorkerState, String) {
    (worker.state(), worker.job_id.clone())
}

async fn health(client: &mut Client) -> TestResult<(WorkerState, String)> {
    Ok(state(&client.health(HealthRequest {}).await?.into_inner()))
}

/// Waits for the worker's record to reach `want` in the membership; returns the states seen on
/// the way (consecutive repeats folded).
async fn watch_until(
    events: &mut mpsc::Receiver<MembershipEvent>,
    id: &str,
    want: Option<(WorkerState, &str)>,
) -> TestResult<Vec<Option<(WorkerState, String)>>> {
    let mut seen: Vec<Option<(WorkerState, String)>> = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .map_err(|_| format!("hang guard ({WAIT:?}): no membership event for {id}"))?
            .ok_or("the membership subscription closed")?;
        let now = match event {
            MembershipEvent::Put(w) if w.id == id => Some(state(&w)),
            MembershipEvent::Left(left) if left == id => None,
            _ => continue,
        };
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now.as_ref().map(|(s, j)| (*s, j.as_str())) == want {
            return Ok(seen);
        }
    }
}

/// One rank: started, the steps in order, decoding, the frames, finished; the frames are the
/// single-process pipeline's bit for bit; the record goes idle → busy(job) → idle. A second task
/// reuses the loaded pipeline: the daemon's load counter stays at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rank_task_renders_the_single_process_frames() -> TestResult {
    let membership = InProcessMembership::new();
    let mut sub = membership.subscribe().await?;
    let daemon = Daemon::start("w1", &membership, |_| {}).await?;
    let mut client = daemon.client().await?;
    assert_eq!(
        health(&mut client).await?,
        (WorkerState::Idle, String::new())
    );

    let expected = reference(3).await?;
    assert_eq!(daemon.counters.pipelines_loaded(), 0, "nothing loaded yet");
    let mut stream = start_task(&mut client, "j1", spec(3, "")).await?;
    let events = collect(&mut stream).await?;
    assert_eq!(
        daemon.counters.pipelines_loaded(),
        1,
        "the first task loads"
    );
    assert_eq!(daemon.counters.steps_run(), 3);
    assert_eq!(finished(&events), TaskFinished::default());
    let Event::Started(started) = &events[0] else {
        panic!("the first event is not `started`: {:?}", events[0]);
    };
    let steps: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step(s) => Some((s.step, s.total)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
    assert!(
        matches!(events[4], Event::Decoding(ref d) if d.frames == 9),
        "{:?}",
        events[4]
    );
    assert!(events[5..events.len() - 2]
        .iter()
        .all(|e| matches!(e, Event::Frames(_))));
    // after the frames, where the task's time went
    let Event::Timings(timings) = &events[events.len() - 2] else {
        panic!(
            "no time split before `finished`: {:?}",
            events[events.len() - 2]
        );
    };
    assert!(
        timings.denoise_s > 0.0 && timings.decode_s > 0.0,
        "{timings:?}"
    );
    assert_eq!(timings.exchange_s, 0.0, "one group exchanges nothing");
    assert!(
        frames(&events) == expected.rgb,
        "the daemon's frames differ from the pipeline's"
    );

    // The subscription began before the worker registered: its first record is in the events.
    let mut seen = watch_until(&mut sub.events, "w1", Some((WorkerState::Busy, "j1"))).await?;
    seen.extend(watch_until(&mut sub.events, "w1", Some((WorkerState::Idle, ""))).await?);
    let busy = Some((WorkerState::Busy, "j1".to_string()));
    let idle = Some((WorkerState::Idle, String::new()));
    assert_eq!(seen, vec![idle.clone(), busy, idle]);
    assert_eq!(
        health(&mut client).await?,
        (WorkerState::Idle, String::new())
    );

    // The same model again: no loading (counted, not timed).
    let mut stream = start_task(&mut client, "j2", spec(3, "")).await?;
    let again = collect(&mut stream).await?;
    assert!(frames(&again) == expected.rgb);
    let Event::Started(cached) = &again[0] else {
        panic!("no `started`");
    };
    println!(
        "load: {:.3} s first task, {:.3} s cached (reported, not checked)",
        started.load_s, cached.load_s,
    );
    assert_eq!(
        daemon.counters.pipelines_loaded(),
        1,
        "the second task loaded the model again"
    );
    assert_eq!(daemon.counters.steps_run(), 6);
    daemon.stop().await
}

/// Two daemons run the ranks of a `cfg=2` job over their own mesh; rank 0 sends the frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_render_a_cfg_parallel_job() -> TestResult {
    let membership = InProcessMembership::new();
    let d0 = Daemon::start("w0", &membership, |_| {}).await?;
    let d1 = Daemon::start("w1", &membership, |_| {}).await?;
    let (mut c0, mut c1) = (d0.client().await?, d1.client().await?);
    let a0 = c0
        .reserve(reserve("j1", 0, 2))
        .await?
        .into_inner()
        .mesh_address;
    let a1 = c1
        .reserve(reserve("j1", 1, 2))
        .await?
        .into_inner()
        .mesh_address;
    assert!(
        a0.starts_with("127.0.0.1:") && a1.starts_with("127.0.0.1:"),
        "{a0} {a1}"
    );
    let peers = vec![a0, a1];
    let mut s0 = c0
        .run_task(task("j1", 0, spec(3, "cfg=2"), &peers))
        .await?
        .into_inner();
    let mut s1 = c1
        .run_task(task("j1", 1, spec(3, "cfg=2"), &peers))
        .await?
        .into_inner();
    let (e0, e1) = tokio::join!(collect(&mut s0), collect(&mut s1));
    let (e0, e1) = (e0?, e1?);
    assert_eq!(finished(&e0), TaskFinished::default());
    assert_eq!(finished(&e1), TaskFinished::default());
    assert!(frames(&e1).is_empty(), "rank 1 sent frames");
    for events in [&e0, &e1] {
        let steps = events
            .iter()
            .filter(|e| matches!(e, Event::Step(_)))
            .count();
        assert_eq!(steps, 3);
    }
    let got = frames(&e0);
    let expected = reference(3).await?;
    assert_eq!(got.len(), expected.rgb.len());
    let worst = got
        .iter()
        .zip(&expected.rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    println!("cfg=2 over two daemons: largest difference from the single render {worst} levels");
    assert!(worst <= 2, "rank 0's frames differ by {worst} levels");
    for client in [&mut c0, &mut c1] {
        assert_eq!(health(client).await?.0, WorkerState::Idle);
    }
    d0.stop().await?;
    d1.stop().await
}

/// Busy refuses another job (UNAVAILABLE), a task needs its reservation (FAILED_PRECONDITION),
/// and a reservation that no task claims is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_reservation_timeout() -> TestResult {
    let membership = InProcessMembership::new();
    let daemon = Daemon::start("w1", &membership, |c| {
        c.reservation_timeout = Duration::from_millis(300)
    })
    .await?;
    let mut client = daemon.client().await?;

    let err = client
        .run_task(task("j0", 0, spec(3, ""), &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no reservation for job j0"),
        "{}",
        err.message()
    );

    let err = client.reserve(reserve("j0", 2, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    client.reserve(reserve("j1", 0, 1)).await?;
    assert_eq!(health(&mut client).await?, (WorkerState::Busy, "j1".into()));
    let err = client.reserve(reserve("j2", 0, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "worker w1 is busy with job j1");

    let deadline = Instant::now() + WAIT;
    while health(&mut client).await?.0 != WorkerState::Idle {
        assert!(
            Instant::now() < deadline,
            "hang guard ({WAIT:?}): the 300 ms reservation was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = client
        .run_task(task("j1", 0, spec(3, ""), &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Abort releases a reservation at once; an unknown job is not found.
    client.reserve(reserve("j3", 0, 1)).await?;
    let abort = |job: &str| AbortRequest {
        job_id: job.into(),
        reason: "test".into(),
    };
    assert!(!client.abort(abort("j9")).await?.into_inner().found);
    assert!(client.abort(abort("j3")).await?.into_inner().found);
    assert_eq!(health(&mut client).await?.0, WorkerState::Idle);
    daemon.stop().await
}

/// Steps enough that a task is still running seconds later on a loaded machine.
const LONG: u32 = 1000;

/// Abort stops a running task after its current step; the worker is idle again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancels_a_running_task() -> TestResult {
    let membership = InProcessMembership::new();
    let daemon = Daemon::start("w1", &membership, |_| {}).await?;
    let mut client = daemon.client().await?;
    let mut stream = start_task(&mut client, "j1", spec(LONG, "")).await?;
    while !matches!(next(&mut stream).await?, Event::Step(_)) {}
    let found = client
        .abort(AbortRequest {
            job_id: "j1".into(),
            reason: "cancelled by the studio".into(),
        })
        .await?
        .into_inner()
        .found;
    assert!(found);
    let rest = collect(&mut stream).await?;
    let end = finished(&rest);
    assert!(end.cancelled, "{end:?}");
    assert!(
        end.error
            .starts_with("cancelled: cancelled by the studio (after step "),
        "{}",
        end.error
    );
    let steps = rest.iter().filter(|e| matches!(e, Event::Step(_))).count();
    assert!(steps < LONG as usize - 1 && frames(&rest).is_empty());
    assert_eq!(
        health(&mut client).await?,
        (WorkerState::Idle, String::new())
    );
    daemon.stop().await
}

/// Closing the RunTask stream cancels the task: the worker is idle again with only a few of the
/// task's steps run (the daemon's step counter), and no step runs after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_task() -> TestResult {
    let membership = InProcessMembership::new();
    let daemon = Daemon::start("w1", &membership, |_| {}).await?;
    let mut client = daemon.client().await?;
    let mut stream = start_task(&mut client, "j1", spec(LONG, "")).await?;
    while !matches!(next(&mut stream).await?, Event::Step(_)) {}
    drop(stream);
    let t0 = Instant::now();
    while health(&mut client).await?.0 != WorkerState::Idle {
        assert!(
            t0.elapsed() < WAIT,
            "hang guard ({WAIT:?}): the task kept running after its stream closed ({} steps)",
            daemon.counters.steps_run()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = daemon.counters.steps_run();
    println!("idle after {ran} of {LONG} steps");
    assert!(
        (1..LONG as u64 / 2).contains(&ran),
        "{ran} of {LONG} steps ran: the task ran on after its stream closed"
    );
    // Idle means the task is over: another task runs, and the first one adds no step.
    let mut stream = start_task(&mut client, "j2", spec(3, "")).await?;
    assert_eq!(
        finished(&collect(&mut stream).await?),
        TaskFinished::default()
    );
    assert_eq!(
        daemon.counters.steps_run(),
        ran + 3,
        "the cancelled task ran on"
    );
    daemon.stop().await
}

/// A layout that cannot split the model fails the task with an error naming it, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_the_model_cannot_split_fails_the_task() -> TestResult {
    let membership = InProcessMembership::new();
    let daemon = Daemon::start("w1", &membership, |_| {}).await?;
    let mut client = daemon.client().await?;
    let mesh = client
        .reserve(reserve("j1", 0, 8))
        .await?
        .into_inner()
        .mesh_address;
    let peers: Vec<String> = (0..8).map(|_| mesh.clone()).collect();
    let mut stream = client
        .run_task(task("j1", 0, spec(3, "tp=8"), &peers))
        .await?
        .into_inner();
    let events = collect(&mut stream).await?;
    assert_eq!(events.len(), 1, "{events:?}");
    let end = finished(&events);
    assert!(!end.cancelled);
    assert!(
        end.error
            .starts_with("spec.layout: tp × ulysses = 8 does not divide the 4 attention heads"),
        "{}",
        end.error
    );
    assert_eq!(health(&mut client).await?.0, WorkerState::Idle);
    daemon.stop().await
}

/// Shutdown while a task runs: the worker drains (refuses new work), the task finishes with all
/// its frames, then the record leaves and `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_running_task_then_leaves() -> TestResult {
    let membership = InProcessMembership::new();
    let mut sub = membership.subscribe().await?;
    let mut daemon = Daemon::start("w1", &membership, |_| {}).await?;
    let mut client = daemon.client().await?;
    // Enough steps (4 ms each here) that the task outlasts the draining checks below.
    let steps = 200;
    let mut stream = start_task(&mut client, "j1", spec(steps, "")).await?;
    let mut events = Vec::new();
    while !matches!(events.last(), Some(Event::Step(_))) {
        events.push(next(&mut stream).await?);
    }
    let _ = daemon.shutdown.take().expect("not stopped yet").send(());
    watch_until(&mut sub.events, "w1", Some((WorkerState::Draining, "j1"))).await?;
    let err = client.reserve(reserve("j2", 0, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("draining"), "{}", err.message());

    events.extend(collect(&mut stream).await?);
    assert_eq!(finished(&events), TaskFinished::default());
    let steps_seen = events
        .iter()
        .filter(|e| matches!(e, Event::Step(_)))
        .count();
    assert_eq!(steps_seen, steps as usize);
    assert_eq!(frames(&events).len(), 9 * 64 * 64 * 3);

    let seen = watch_until(&mut sub.events, "w1", None).await?;
    assert_eq!(seen.last(), Some(&None));
    tokio::time::timeout(WAIT, daemon.run)
        .await
        .map_err(|_| format!("hang guard ({WAIT:?}): the daemon never stopped"))???;
    assert!(membership.list().await?.is_empty());
    assert_eq!(daemon.id, "w1");
    Ok(())
}

/// A daemon with a checkpoint that is not there does not start, and says which path.
#[tokio::test]
async fn a_missing_checkpoint_stops_the_daemon_before_it_registers() -> TestResult {
    let membership = InProcessMembership::new();
    let missing = std::env::temp_dir().join("longtake-no-such-checkpoint");
    let result = Daemon::start("w1", &membership, |c| {
        c.models = vec![daemon::ModelSource::Checkpoint {
            name: "wan".into(),
            dir: missing.clone(),
        }]
    })
    .await;
    let err = result.err().expect("the daemon started").to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(membership.list().await?.is_empty());
    Ok(())
}

/// A checkpoint served as `NAME=DIR`: the task loads it from disk once, renders the frames of
/// `WanPipeline::load`, and the next task of that model reuses the loaded pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_model_is_loaded_once_and_renders_like_the_pipeline() -> TestResult {
    let dir = longtake_worker::model::reference::test_fixture_dirs()[0].join("pipeline");
    let source = daemon::ModelSource::parse(&format!("fixture={}", dir.display()))?;
    let membership = InProcessMembership::new();
    let daemon = Daemon::start("w1", &membership, |c| c.models = vec![source]).await?;
    let record = &membership.list().await?[0];
    assert_eq!(record.models.len(), 1);
    assert_eq!(record.models[0].name, "fixture");
    assert_eq!(
        (
            record.models[0].default_width,
            record.models[0].default_steps
        ),
        (832, 50)
    );

    let spec = RenderSpec {
        model: "fixture".into(),
        width: 48,
        height: 32,
        steps: 4,
        ..spec(4, "")
    };
    let reference_dir = dir.clone();
    let expected = tokio::task::spawn_blocking(move || -> TestResult<_> {
        let pipeline = WanPipeline::load(&reference_dir, &Device::Cpu, DType::F32)?;
        let spec = pipeline::RenderSpec {
            input: None,
            prompt: "a wolf howls at the moon".into(),
            negative_prompt: String::new(),
            frames: 9,
            width: 48,
            height: 32,
            steps: 4,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 7,
            windows: None,
            timeline: Default::default(),
        };
        Ok(pipeline.render(&spec, &mut |_| {})?)
    })
    .await??;

    let mut client = daemon.client().await?;
    let mut load_s = Vec::new();
    for job in ["j1", "j2"] {
        let mut stream = start_task(&mut client, job, spec.clone()).await?;
        let events = collect(&mut stream).await?;
        assert_eq!(finished(&events), TaskFinished::default());
        let rgb: Vec<u8> = events
            .iter()
            .filter_map(|e| match e {
                Event::Frames(b) => Some(b.rgb.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            rgb == expected.rgb,
            "{job}: frames differ from WanPipeline::load's"
        );
        match &events[0] {
            Event::Started(s) => load_s.push(s.load_s),
            other => panic!("{job}: first event {other:?}"),
        }
    }
    println!(
        "fixture checkpoint: loaded in {:.3} s, cached task {:.4} s",
        load_s[0], load_s[1]
    );
    assert!(
        load_s[1] < load_s[0],
        "the second task loaded the checkpoint again"
    );

    let unknown = RenderSpec {
        model: "wan".into(),
        ..spec
    };
    let mut stream = start_task(&mut client, "j3", unknown).await?;
    let end = finished(&collect(&mut stream).await?);
    assert_eq!(
        end.error,
        "spec.model: this worker serves no model \"wan\" (it serves fixture)"
    );
    daemon.stop().await
}
