//! The Wan VAE decode split by rows across the ranks of a group
//! ([`WanVaeDecoder::decode_rows_with_cache`]): time and peak memory per rank for 1, 2 and 4
//! ranks, on seeded weights at Wan2.1's real decoder sizes (base_dim 96) and a 2×16×16 latent
//! (5 frames of 128×128).
//!
//! Every rank is a process of its own (this executable started again with `--rank`), so that
//! its peak resident memory (`VmHWM`) is its own; the ranks are joined by a loopback
//! [`TcpMesh`]. Each rank computes on one thread (`RAYON_NUM_THREADS=1`, which candle's matmul
//! and the decoder's kernels follow), as each rank of a real group has a device of its own; one
//! rank on two threads is timed too, for comparison. The configurations run round-robin
//! (`--rounds`, the median reported) so that load from other processes hits all of them alike,
//! and every split decode is compared with the one-rank frames (in 8-bit levels).
//!
//! `cargo bench -p longtake-worker --bench vae_split [-- --rounds N]`; without `--bench` (as
//! `cargo test --all-targets` runs it) a fixture-size decoder runs once on 1 and 2 ranks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use longtake_worker::families::wan::vae::{Config, DecoderCache, WanVaeDecoder};
use longtake_worker::families::wan::vae_split::RowSplit;
use longtake_worker::model::loader::{seeded_var_builder, SafetensorsWeights};
use longtake_worker::model::noise;
use longtake_worker::parallel::{MeshSecret, TcpMesh, TcpMeshConfig};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A decoder and the latent it decodes.
struct Case {
    config: Config,
    /// (F, H, W) of the latent.
    latent: (usize, usize, usize),
}

fn case(full: bool) -> Case {
    if full {
        Case {
            config: Config::default(),
            latent: (2, 16, 16),
        }
    } else {
        Case {
            config: Config {
                base_dim: 8,
                num_res_blocks: 1,
                ..Config::default()
            },
            latent: (2, 4, 6),
        }
    }
}

/// One timed configuration: how many ranks, each on how many threads.
#[derive(Clone, Copy)]
struct Setup {
    ranks: usize,
    threads: usize,
}

/// What one rank reports.
struct RankReport {
    seconds: f64,
    /// Peak resident memory once the weights and latents were in, then at the end, in KiB.
    loaded_kib: u64,
    peak_kib: u64,
}

/// This process's peak resident set (`VmHWM`), in KiB.
fn peak_resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A rank: decodes its rows (all of them alone) and prints its report; rank 0 saves the video.
fn rank_main(args: &[String]) -> BenchResult {
    let value = |name: &str| -> BenchResult<String> {
        let at = args
            .iter()
            .position(|a| a == name)
            .ok_or(format!("missing {name}"))?;
        Ok(args
            .get(at + 1)
            .ok_or(format!("{name} needs a value"))?
            .clone())
    };
    let rank: usize = value("--rank")?.parse()?;
    let peers: Vec<SocketAddr> = value("--peers")?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let out = PathBuf::from(value("--out")?);
    let case = case(args.iter().any(|a| a == "--full"));
    let device = Device::Cpu;
    let vae = WanVaeDecoder::new(&case.config, seeded_var_builder(11, DType::F32, &device))?;
    let (f, h, w) = case.latent;
    let values = noise::gaussian(5, 0, 0, 16 * f * h * w);
    let z = Tensor::from_vec(values, (1, 16, f, h, w), &device)?;
    let mesh = if peers.len() > 1 {
        let secret = MeshSecret::new([7; 32]);
        Some(TcpMesh::connect(TcpMeshConfig::new(rank, peers, secret))?)
    } else {
        None
    };
    let loaded_kib = peak_resident_kib();
    let start = Instant::now();
    let video = match &mesh {
        None => Some(vae.decode(&z)?),
        Some(mesh) => {
            let split = RowSplit::new(mesh, h)?;
            vae.decode_rows_with_cache(&z, &mut DecoderCache::new(), &split)?
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    if let Some(video) = video {
        let tensors = [("video".to_string(), video)].into_iter().collect();
        candle_core::safetensors::save(&tensors, &out)?;
    }
    println!(
        "RANK {rank} seconds {seconds} loaded_kib {loaded_kib} peak_kib {}",
        peak_resident_kib()
    );
    Ok(())
}

/// Free loopback ports for `n` ranks (bound, read and released: the ranks bind them again).
fn loopback_addrs(n: usize) -> BenchResult<Vec<SocketAddr>> {
    let (listeners, addrs) = longtake_worker::parallel::tcp::loopback_listeners(n)?;
    drop(listeners);
    Ok(addrs)
}

/// Runs one configuration's ranks as processes; their reports by rank.
fn run_setup(setup: Setup, full: bool, out: &Path) -> BenchResult<Vec<RankReport>> {
    let exe = std::env::current_exe()?;
    let peers = loopback_addrs(setup.ranks)?
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let children = (0..setup.ranks)
        .map(|rank| {
            let mut command = Command::new(&exe);
            command
                .args(["--rank", &rank.to_string(), "--peers", &peers])
                .arg("--out")
                .arg(out)
                .env("RAYON_NUM_THREADS", setup.threads.to_string())
                .stdout(Stdio::piped());
            if full {
                command.arg("--full");
            }
            command.spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut reports = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!("rank {rank} of {} failed: {text}", setup.ranks).into());
        }
        let line = text
            .lines()
            .find(|l| l.starts_with("RANK "))
            .ok_or(format!("rank {rank} printed no report: {text}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| -> BenchResult<&str> {
            let at = fields.iter().position(|f| *f == name).ok_or("bad report")?;
            Ok(fields[at + 1])
        };
        reports.push(RankReport {
            seconds: field("seconds")?.parse()?,
            loaded_kib: field("loaded_kib")?.parse()?,
            peak_kib: field("peak_kib")?.parse()?,
        });
    }
    Ok(reports)
}

/// The largest difference between two videos in [-1, 1], in 8-bit levels.
fn largest_level_difference(a: &Path, b: &Path) -> BenchResult<f32> {
    let load = |p: &Path| -> BenchResult<Tensor> {
        Ok(SafetensorsWeights::open_file(p)?.load("video", &Device::Cpu)?)
    };
    let levels = |t: Tensor| -> candle_core::Result<Tensor> { ((t + 1.0)? * 127.5)?.round() };
    let diff = (levels(load(a)?)? - levels(load(b)?)?)?.abs()?;
    Ok(diff.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() -> BenchResult {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--rank") {
        return rank_main(&args);
    }
    let full = args.iter().any(|a| a == "--bench");
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(at) => args.get(at + 1).ok_or("--rounds needs a value")?.parse()?,
        None if full => 3,
        None => 1,
    };
    // (ranks, threads per rank)
    let shapes: &[(usize, usize)] = if full {
        &[(1, 1), (2, 1), (4, 1), (1, 2)]
    } else {
        &[(1, 1), (2, 1)]
    };
    let setups: Vec<Setup> = shapes
        .iter()
        .map(|&(ranks, threads)| Setup { ranks, threads })
        .collect();
    let dir = tempfile::tempdir()?;
    let video_of = |i: usize| dir.path().join(format!("setup{i}.safetensors"));
    let c = case(full);
    let (f, h, w) = c.latent;
    println!(
        "vae_split: base_dim {}, latent {f}x{h}x{w}, {rounds} round(s), load average {}",
        c.config.base_dim,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut memory: Vec<Vec<(u64, u64)>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (i, setup) in setups.iter().enumerate() {
            let reports = run_setup(*setup, full, &video_of(i))?;
            times[i].push(reports.iter().map(|r| r.seconds).fold(0.0, f64::max));
            memory[i] = reports.iter().map(|r| (r.loaded_kib, r.peak_kib)).collect();
        }
    }
    let baseline = median(times[0].clone());
    for (i, setup) in setups.iter().enumerate() {
        let time = median(times[i].clone());
        let levels = largest_level_difference(&video_of(0), &video_of(i))?;
        let per_rank = memory[i]
            .iter()
            .map(|(loaded, peak)| {
                format!(
                    "{:.0} MiB (+{:.0} decoding)",
                    *peak as f64 / 1024.0,
                    peak.saturating_sub(*loaded) as f64 / 1024.0
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{} rank(s) x {} thread(s): {time:.3} s, {:.2}x one rank on one thread; \
             largest difference {levels} levels; peak memory per rank: {per_rank}",
            setup.ranks,
            setup.threads,
            baseline / time
        );
        if levels > 1.0 {
            return Err(format!(
                "{} ranks: frames differ from one rank's by {levels} levels",
                setup.ranks
            )
            .into());
        }
    }
    Ok(())
}
