//! Timings of the parallel runtime: one denoising step (one
//! [`DistributedWanTransformer::forward`] on a classifier-free-guidance batch of 2) of a
//! random-weight transformer at the layouts single, tp=2, ulysses=2, ring=2 and cfg=2, every rank a
//! thread of this process joined to the others by a loopback [`TcpMesh`]. Run with
//! `cargo bench -p longtake-worker --bench parallel [-- --rounds N]`; figures and the cost model for
//! real clusters are in `worker/benches/PARALLEL.md`.
//!
//! One compute thread per rank, the single-rank baseline included: `main` sets
//! `RAYON_NUM_THREADS=1` before anything reads it, which candle's CPU matmul consults on every call
//! (`candle_core::utils::get_num_threads`; 1 means `gemm` runs on the calling thread), and every
//! rank runs inside its own one-thread rayon pool, so the element-wise kernels candle-nn spreads
//! with rayon (softmax, layer norm) stay on that rank's thread instead of all ranks queueing on the
//! single thread of the global pool. The mesh's socket readers are extra (mostly idle) threads, as
//! they are in a real worker.
//!
//! The layouts are measured round-robin (one step of each per round, the median reported) so that
//! load from other processes on a shared machine hits all of them alike. Every layout's output is
//! compared with the single-rank one, so a fast but wrong layout cannot pass.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) only a tiny model runs one round.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use longtake_worker::families::wan::distributed::DistributedWanTransformer;
use longtake_worker::families::wan::tensor_parallel::tensor_parallel_plan;
use longtake_worker::families::wan::transformer::Config;
use longtake_worker::model::compare::relative_l2;
use longtake_worker::model::loader::{SafetensorsWeights, Weights};
use longtake_worker::parallel::layout::Layout;
use longtake_worker::parallel::tcp::loopback_listeners;
use longtake_worker::parallel::{CommError, Communicator, SingleRank, TcpMesh, TcpMeshConfig};

type BenchError = Box<dyn std::error::Error + Send + Sync>;
type BenchResult<T = ()> = Result<T, BenchError>;

/// Every layout's output must match the single-rank one this closely (float32; the sums of a
/// distributed step are reordered, nothing else).
const TOLERANCE: f64 = 1e-4;

/// A model and the step it is timed on.
struct Case {
    name: &'static str,
    config: Config,
    /// Latent `(frames, height, width)`; tokens = frames · height/2 · width/2.
    latent: (usize, usize, usize),
    text_len: usize,
    rounds: usize,
}

impl Case {
    fn tokens(&self) -> usize {
        let [pt, ph, pw] = self.config.patch_size;
        let (f, h, w) = self.latent;
        (f / pt) * (h / ph) * (w / pw)
    }
}

/// The timed configuration: 4 layers of width 512 (8 heads of 64, FFN 1536) on 1024 tokens (latent
/// 4×32×32). Each step is about 70 GFLOP, seconds on one core, while a tp=2 rank sends ~50 MB:
/// compute dominates on loopback, as it must for the timings to say anything about the runtime
/// rather than about the kernel's socket copies.
fn bench_case(rounds: usize) -> Case {
    Case {
        name: "bench",
        config: Config {
            num_attention_heads: 8,
            attention_head_dim: 64,
            text_dim: 512,
            freq_dim: 256,
            ffn_dim: 1536,
            num_layers: 4,
            ..Config::default()
        },
        latent: (4, 32, 32),
        text_len: 64,
        rounds,
    }
}

/// A model small enough that the whole smoke run takes well under a second of compute.
fn smoke_case() -> Case {
    Case {
        name: "smoke",
        config: Config {
            num_attention_heads: 4,
            attention_head_dim: 16,
            text_dim: 32,
            freq_dim: 32,
            ffn_dim: 128,
            num_layers: 2,
            ..Config::default()
        },
        // 2·3·3 = 18 tokens: even, so every 2-way sequence split is exact.
        latent: (2, 6, 6),
        text_len: 8,
        rounds: 1,
    }
}

fn layouts() -> BenchResult<Vec<Layout>> {
    ["", "tp=2", "ulysses=2", "ring=2", "cfg=2"]
        .iter()
        .map(|s| s.parse::<Layout>().map_err(BenchError::from))
        .collect()
}

/// Writes a seeded random model of `config` to `path`.
fn write_checkpoint(config: &Config, path: &Path) -> BenchResult {
    let device = Device::Cpu;
    // Seeded weights that keep every tensor handed out, so that the model can be written to a
    // checkpoint from which the ranks load their tensor-parallel slices.
    let (weights, recorded) = Weights::seeded(7).recorded();
    let vb = weights.var_builder(DType::F32, &device);
    DistributedWanTransformer::new(config, Layout::SINGLE, Box::new(SingleRank::new()), vb)?;
    candle_core::safetensors::save(&recorded.take(), path)?;
    Ok(())
}

/// The whole-mesh communicator, shared between the model (which owns its world communicator) and
/// the bench (which reads the mesh's byte count and runs barriers around each step).
struct SharedMesh(Arc<TcpMesh>);

impl Communicator for SharedMesh {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor, CommError> {
        self.0.all_reduce_sum(tensor)
    }
    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor, CommError> {
        self.0.all_gather(tensor, dim)
    }
    fn all_to_all(&self, tensors: Vec<Tensor>) -> Result<Vec<Tensor>, CommError> {
        self.0.all_to_all(tensors)
    }
    fn send(&self, tensor: &Tensor, to: usize) -> Result<(), CommError> {
        self.0.send(tensor, to)
    }
    fn recv(&self, from: usize, device: &Device) -> Result<Tensor, CommError> {
        self.0.recv(from, device)
    }
    fn broadcast(
        &self,
        tensor: Option<&Tensor>,
        root: usize,
        device: &Device,
    ) -> Result<Tensor, CommError> {
        self.0.broadcast(tensor, root, device)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.0.barrier()
    }
    fn subgroup(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>, CommError> {
        self.0.subgroup(ranks)
    }
    fn bytes_sent(&self) -> u64 {
        self.0.bytes_sent()
    }
}

/// The inputs of one step: a CFG batch of 2 (conditional and unconditional rows).
struct StepInputs {
    x: Tensor,
    t: Tensor,
    text: Tensor,
}

impl StepInputs {
    fn new(case: &Case) -> BenchResult<Self> {
        let device = Device::Cpu;
        let cfg = &case.config;
        let (f, h, w) = case.latent;
        let normal = |stream: u64, shape: &[usize]| -> candle_core::Result<Tensor> {
            let n = shape.iter().product();
            let values = longtake_worker::model::noise::gaussian(5, stream, 0, n);
            Tensor::from_vec(values, shape, &device)
        };
        Ok(Self {
            x: normal(0, &[2, cfg.in_channels, f, h, w])?,
            t: Tensor::new(&[700f32, 700.0], &device)?,
            text: normal(1, &[2, case.text_len, cfg.text_dim])?,
        })
    }
}

/// What one rank reports after one step.
struct Report {
    rank: usize,
    elapsed: Duration,
    /// CPU time of the rank's compute thread during the step, where the OS reports it.
    cpu: Option<Duration>,
    bytes: u64,
    /// Rank 0's output of the first step, to be checked against the single-rank output.
    output: Option<Tensor>,
}

/// CPU time the calling thread has used so far (Linux: the first field of
/// `/proc/thread-self/schedstat`, in nanoseconds); `None` elsewhere. On a machine with fewer free
/// cores than ranks the wall time cannot show the split of the work; the per-rank CPU time still
/// does.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ns))
}

/// How one rank joins its mesh and talks to the driver.
struct RankIo {
    mesh_config: TcpMeshConfig,
    listener: std::net::TcpListener,
    /// One message per step to run; closed when the bench is done.
    steps: mpsc::Receiver<()>,
    reports: mpsc::Sender<BenchResult<Report>>,
}

/// One rank for its whole life: join the mesh, load this rank's slices, then run one step per
/// message on `steps` until the channel closes. A failure is reported to the driver, which would
/// otherwise wait for this rank forever.
fn rank_main(case: &Case, layout: Layout, checkpoint: &Path, inputs: &StepInputs, io: RankIo) {
    let reports = io.reports.clone();
    if let Err(e) = run_rank(case, layout, checkpoint, inputs, io) {
        // The driver may be gone already (it stops at the first error): nothing left to tell.
        let _ = reports.send(Err(e));
    }
}

fn run_rank(
    case: &Case,
    layout: Layout,
    checkpoint: &Path,
    inputs: &StepInputs,
    io: RankIo,
) -> BenchResult {
    let RankIo {
        mesh_config,
        listener,
        steps,
        reports,
    } = io;
    let rank = mesh_config.rank;
    let mesh = Arc::new(TcpMesh::connect_with_listener(mesh_config, listener)?);
    let plan = tensor_parallel_plan(&case.config, layout.tp, layout.coords(rank).tp);
    let vb = Weights::files(SafetensorsWeights::open_file(checkpoint)?)
        .sharded(plan)
        .var_builder(DType::F32, &Device::Cpu);
    let model = DistributedWanTransformer::new(
        &case.config,
        layout,
        Box::new(SharedMesh(mesh.clone())),
        vb,
    )?;
    let mut first = true;
    while steps.recv().is_ok() {
        let step = || -> BenchResult<Report> {
            // Barriers on both sides: the time is that of the slowest rank, and the byte count
            // holds only the step's own traffic.
            mesh.barrier()?;
            let before = mesh.total_bytes_sent();
            let cpu_before = thread_cpu_time();
            let start = Instant::now();
            let out = model.forward(&inputs.x, &inputs.t, &inputs.text)?;
            let bytes = mesh.total_bytes_sent() - before;
            let cpu = thread_cpu_time()
                .zip(cpu_before)
                .map(|(after, before)| after.saturating_sub(before));
            mesh.barrier()?;
            Ok(Report {
                rank,
                elapsed: start.elapsed(),
                cpu,
                bytes,
                output: (first && rank == 0).then_some(out),
            })
        };
        let report = step()?;
        if reports.send(Ok(report)).is_err() {
            break;
        }
        first = false;
    }
    Ok(())
}

/// The measurements of one layout over all rounds.
struct LayoutResult {
    layout: Layout,
    /// Per round: the slowest rank's step time.
    steps: Vec<Duration>,
    /// Per round: the busiest rank's compute-thread CPU time, where known.
    cpu: Vec<Duration>,
    /// Bytes each rank sent in one step (the first round; every round sends the same).
    bytes_per_rank: Vec<u64>,
    output: Option<Tensor>,
}

impl LayoutResult {
    fn median(&self) -> Duration {
        median(&self.steps)
    }

    fn median_cpu(&self) -> Option<Duration> {
        (self.cpu.len() == self.steps.len()).then(|| median(&self.cpu))
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn run_case(case: &Case, checkpoint: &Path) -> BenchResult<Vec<LayoutResult>> {
    let layouts = layouts()?;
    let inputs = StepInputs::new(case)?;
    let inputs = &inputs;
    std::thread::scope(|scope| -> BenchResult<Vec<LayoutResult>> {
        // Every layout's ranks are started first and kept alive for all rounds.
        let mut running = Vec::new();
        for &layout in &layouts {
            let world = layout.world_size();
            let (listeners, addrs) = loopback_listeners(world)?;
            let secret = longtake_worker::parallel::MeshSecret::random();
            let (report_tx, report_rx) = mpsc::channel();
            let mut step_txs = Vec::with_capacity(world);
            let mut handles = Vec::with_capacity(world);
            for (rank, listener) in listeners.into_iter().enumerate() {
                let (step_tx, step_rx) = mpsc::channel();
                step_txs.push(step_tx);
                let mesh_config = TcpMeshConfig::new(rank, addrs.clone(), secret.clone());
                let io = RankIo {
                    mesh_config,
                    listener,
                    steps: step_rx,
                    reports: report_tx.clone(),
                };
                handles.push(scope.spawn(move || -> BenchResult {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("rank-{rank}"))
                        .build()?;
                    pool.install(|| rank_main(case, layout, checkpoint, inputs, io));
                    Ok(())
                }));
            }
            running.push((layout, step_txs, report_rx, handles));
        }

        let mut results: Vec<LayoutResult> = layouts
            .iter()
            .map(|&layout| LayoutResult {
                layout,
                steps: Vec::new(),
                cpu: Vec::new(),
                bytes_per_rank: Vec::new(),
                output: None,
            })
            .collect();
        // Round 0 warms up (allocator, first-touch of weights) and is not timed.
        for round in 0..=case.rounds {
            for ((_, step_txs, report_rx, _), result) in running.iter().zip(&mut results) {
                for tx in step_txs {
                    // A rank that is gone has reported why; that report is read below.
                    let _ = tx.send(());
                }
                let mut slowest = Duration::ZERO;
                let mut busiest = Some(Duration::ZERO);
                let mut bytes = vec![0; step_txs.len()];
                for _ in step_txs {
                    let report = report_rx.recv().map_err(|_| "a rank exited early")??;
                    slowest = slowest.max(report.elapsed);
                    busiest = busiest.zip(report.cpu).map(|(a, b)| a.max(b));
                    bytes[report.rank] = report.bytes;
                    if report.output.is_some() {
                        result.output = report.output;
                    }
                }
                if round == 0 {
                    result.bytes_per_rank = bytes;
                } else {
                    result.steps.push(slowest);
                    result.cpu.extend(busiest);
                }
            }
        }
        for (layout, step_txs, _, handles) in running {
            drop(step_txs);
            for handle in handles {
                handle
                    .join()
                    .map_err(|_| format!("a rank of {layout} panicked"))??;
            }
        }
        Ok(results)
    })
}

fn print_results(case: &Case, results: &[LayoutResult]) -> BenchResult {
    let c = &case.config;
    println!(
        "{}: {} layers, dim {} ({} heads x {}), ffn {}, {} tokens (latent {:?}), text {} tokens, CFG batch 2, f32, {} timed rounds",
        case.name,
        c.num_layers,
        c.dim(),
        c.num_attention_heads,
        c.attention_head_dim,
        c.ffn_dim,
        case.tokens(),
        case.latent,
        case.text_len,
        case.rounds
    );
    let single = results
        .iter()
        .find(|r| r.layout == Layout::SINGLE)
        .ok_or("no single-rank layout")?;
    let reference = single.output.as_ref().ok_or("no single-rank output")?;
    let base = single.median().as_secs_f64();
    let base_cpu = single.median_cpu();
    println!(
        "{:<28} {:>5} {:>10} {:>10} {:>8} {:>12} {:>8} {:>17} {:>8}",
        "layout",
        "ranks",
        "median ms",
        "min ms",
        "speedup",
        "rank CPU ms",
        "CPU x",
        "MB sent/rank",
        "rel L2"
    );
    let mut failures = Vec::new();
    for r in results {
        let output = r.output.as_ref().ok_or("a layout returned no output")?;
        let l2 = relative_l2(output, reference)?;
        if l2 > TOLERANCE {
            failures.push(format!("{}: relative L2 {l2:.2e}", r.layout));
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let bytes = r
            .bytes_per_rank
            .iter()
            .map(|&b| format!("{:.3}", b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join("/");
        // schedstat is updated at scheduler events, so a step of a millisecond may read as 0.
        let (cpu, cpu_speedup) = match (r.median_cpu(), base_cpu) {
            (Some(cpu), Some(base)) if !cpu.is_zero() && !base.is_zero() => (
                format!("{:.1}", ms(cpu)),
                format!("{:.2}x", base.as_secs_f64() / cpu.as_secs_f64()),
            ),
            _ => ("n/a".to_string(), "n/a".to_string()),
        };
        println!(
            "{:<28} {:>5} {:>10.1} {:>10.1} {:>7.2}x {:>12} {:>8} {:>17} {:>8.1e}",
            r.layout.to_string(),
            r.layout.world_size(),
            ms(r.median()),
            ms(*r.steps.iter().min().ok_or("no rounds")?),
            base / r.median().as_secs_f64(),
            cpu,
            cpu_speedup,
            bytes,
            l2
        );
    }
    if !failures.is_empty() {
        return Err(format!(
            "layouts that do not match the single-rank output: {}",
            failures.join("; ")
        )
        .into());
    }
    Ok(())
}

fn main() -> BenchResult {
    // Before any thread starts or anything reads it: one compute thread per rank (see the module
    // comment). An explicit setting from the caller wins, to allow experiments.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let rounds = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or("--rounds needs a positive whole number")?,
        None => 3,
    };
    let case = if bench {
        bench_case(rounds)
    } else {
        smoke_case()
    };
    let dir = tempfile::tempdir()?;
    let checkpoint: PathBuf = dir.path().join("transformer.safetensors");
    write_checkpoint(&case.config, &checkpoint)?;
    println!(
        "RAYON_NUM_THREADS={} (candle matmul threads: {})",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        candle_core::utils::get_num_threads()
    );
    let results = run_case(&case, &checkpoint)?;
    print_results(&case, &results)
}
