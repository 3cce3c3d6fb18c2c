//! The GPU check: on one GPU, the parity fixtures in f32 and bf16, one denoising step of Wan2.1
//! 1.3B- and 14B-size transformers (random weights drawn on the device with the seeded weights'
//! distributions: made on the host, 14·10⁹ values take most of a minute on 16 cores; bf16) on 480p and 720p 81-frame
//! latents, and one 480p 81-frame decode of Wan2.1's VAE, each with its time and the peak device
//! memory the model stack allocated. `deploy/gpu/check.sh` builds it, carries it to a GPU machine
//! and runs it beside PyTorch; `deploy/gpu/README.md` says how.
//!
//! ```text
//! cargo bench -p longtake-worker --features cuda --bench gpu -- [--device cuda:N] [--only parity,step,vae]
//!     [--cases 1.3b-480p,14b-720p] [--fixtures DIR]... [--json FILE]
//! ```
//!
//! A step is one transformer forward on classifier-free guidance's batch of 2 with 512 text
//! tokens (what a denoising step costs; the scheduler's update is negligible beside it), timed
//! after a warm-up forward on a one-frame latent that loads the kernels and the cuBLAS handles.
//! Results go to stdout and, with `--json`, one JSON object per line appended as each finishes, so that
//! a run cut short still leaves what it measured. Exit status 1 when a parity case fails.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke test on the CPU: the
//! first fixture in bf16, a two-layer transformer on a small latent and the fixture-size VAE.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use longtake_worker::families::wan::transformer::{Config, WanTransformer3DModel};
use longtake_worker::families::wan::vae::{self, WanVaeDecoder};
use longtake_worker::model::device::{memory_info, parse_device, peak_memory, reset_peak_memory};
use longtake_worker::model::loader::Weights;
use longtake_worker::model::reference::{check_fixture, test_fixture_dirs, Tolerances};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// One transformer size and latent: Wan2.1's published sizes at 81 frames.
struct StepCase {
    name: &'static str,
    config: Config,
    /// `(frames, height, width)` of the latent (the VAE's 4× in time, 8× in space).
    latent: (usize, usize, usize),
    text_tokens: usize,
}

fn wan21_1_3b() -> Config {
    Config {
        num_attention_heads: 12,
        ffn_dim: 8960,
        num_layers: 30,
        ..Config::default()
    }
}

/// 81 frames at 480×832 and 720×1280: 21×60×104 and 21×90×160 latents.
const LATENT_480P: (usize, usize, usize) = (21, 60, 104);
const LATENT_720P: (usize, usize, usize) = (21, 90, 160);

fn step_cases(smoke: bool) -> Vec<StepCase> {
    if smoke {
        return vec![StepCase {
            name: "smoke",
            config: Config {
                num_attention_heads: 2,
                attention_head_dim: 16,
                ffn_dim: 64,
                num_layers: 2,
                text_dim: 32,
                freq_dim: 32,
                ..Config::default()
            },
            latent: (2, 8, 8),
            text_tokens: 8,
        }];
    }
    [
        ("1.3b-480p", wan21_1_3b(), LATENT_480P),
        ("1.3b-720p", wan21_1_3b(), LATENT_720P),
        ("14b-480p", Config::default(), LATENT_480P),
        ("14b-720p", Config::default(), LATENT_720P),
    ]
    .into_iter()
    .map(|(name, config, latent)| StepCase {
        name,
        config,
        latent,
        text_tokens: 512,
    })
    .collect()
}

/// What the command line asks for.
struct Options {
    device: Device,
    device_name: String,
    smoke: bool,
    sections: Vec<String>,
    cases: Option<Vec<String>>,
    fixtures: Vec<PathBuf>,
    json: Option<std::fs::File>,
}

impl Options {
    fn parse() -> BenchResult<Self> {
        let mut args = std::env::args().skip(1);
        let mut smoke = true;
        let mut device_name = None;
        let mut sections = vec!["parity".to_string(), "vae".into(), "step".into()];
        let mut cases = None;
        let mut fixtures = Vec::new();
        let mut json = None;
        let list = |v: Option<String>, flag: &str| -> BenchResult<Vec<String>> {
            let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
            Ok(v.split(',').map(str::to_string).collect())
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => smoke = false,
                "--device" => device_name = Some(args.next().ok_or("--device needs a value")?),
                "--only" => sections = list(args.next(), "--only")?,
                "--cases" => cases = Some(list(args.next(), "--cases")?),
                "--fixtures" => fixtures.push(args.next().ok_or("--fixtures needs a dir")?.into()),
                "--json" => {
                    let path = args.next().ok_or("--json needs a file")?;
                    // Appended to: a driver script runs one section per process into one file.
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| format!("{path}: {e}"))?;
                    json = Some(file);
                }
                other => {
                    return Err(format!("unknown argument {other:?} (see the file's doc)").into())
                }
            }
        }
        let device_name =
            device_name.unwrap_or_else(|| if smoke { "cpu".into() } else { "cuda".into() });
        if fixtures.is_empty() {
            fixtures = test_fixture_dirs();
            if smoke {
                fixtures.truncate(1);
            }
        }
        Ok(Self {
            device: parse_device(&device_name)?,
            device_name,
            smoke,
            sections,
            cases,
            fixtures,
            json,
        })
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }

    /// Prints a result line and appends it as JSON.
    fn report(&mut self, line: String, json: serde_json::Value) -> BenchResult {
        println!("{line}");
        if let Some(file) = &mut self.json {
            writeln!(file, "{json}")?;
            file.flush()?;
        }
        Ok(())
    }
}

fn gib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        None => "n/a".into(),
    }
}

/// Runs `f`, waits for the device to finish, and returns its result, wall time and the peak
/// memory the device's pool had in use meanwhile.
fn measured<T>(
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> BenchResult<(T, Duration, Option<u64>)> {
    device.synchronize()?;
    reset_peak_memory(device);
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((out, start.elapsed(), peak_memory(device)))
}

fn parity(options: &mut Options, dtypes: &[DType]) -> BenchResult<usize> {
    let mut failed = 0;
    for dtype in dtypes {
        let tolerances = Tolerances::for_dtype(*dtype);
        for dir in options.fixtures.clone() {
            let started = Instant::now();
            let results = check_fixture(&dir, &options.device, *dtype);
            println!(
                "parity {} {dtype:?} (modules within {:.0e}, pipeline within {:.0e}): {:.1} s",
                dir.display(),
                tolerances.module,
                tolerances.pipeline,
                started.elapsed().as_secs_f64()
            );
            for result in results {
                failed += usize::from(!result.passed());
                let json = serde_json::json!({
                    "section": "parity",
                    "fixture": dir.display().to_string(),
                    "dtype": format!("{dtype:?}"),
                    "case": result.case,
                    "rel_l2": result.error,
                    "tolerance": result.tolerance,
                    "passed": result.passed(),
                });
                options.report(format!("  {result}"), json)?;
            }
        }
    }
    Ok(failed)
}

fn step(options: &mut Options, case: &StepCase) -> BenchResult {
    let device = options.device.clone();
    let dtype = DType::BF16;
    let cfg = &case.config;
    let (model, built, weights_peak) = measured(&device, || {
        WanTransformer3DModel::new(cfg, Weights::device_random().var_builder(dtype, &device))
    })?;
    let text =
        Tensor::randn(0f32, 1.0, (2, case.text_tokens, cfg.text_dim), &device)?.to_dtype(dtype)?;
    let t = Tensor::new(&[999f32, 999.0], &device)?;
    let latent = |(f, h, w): (usize, usize, usize)| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, (2, cfg.in_channels, f, h, w), &device)?.to_dtype(dtype)
    };
    let small = latent((1, 16, 16))?;
    let (_, warm_up, _) = measured(&device, || model.forward(&small, &t, &text))?;
    let x = latent(case.latent)?;
    let (out, took, peak) = measured(&device, || model.forward(&x, &t, &text))?;
    let finite = out
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_finite();
    let (f, h, w) = case.latent;
    let (nf, nh, nw) = model.token_grid(f, h, w);
    let tokens = nf * nh * nw;
    let line = format!(
        "step {:<10} {} layers × dim {}, {tokens} tokens (latent {f}×{h}×{w}), B=2, bf16: \
         {:.3} s   (weights made in {:.1} s, {}; warm-up {:.1} s; peak {}{})",
        case.name,
        cfg.num_layers,
        cfg.num_attention_heads * cfg.attention_head_dim,
        took.as_secs_f64(),
        built.as_secs_f64(),
        gib(weights_peak),
        warm_up.as_secs_f64(),
        gib(peak),
        if finite { "" } else { "; OUTPUT NOT FINITE" },
    );
    let json = serde_json::json!({
        "section": "step",
        "case": case.name,
        "layers": cfg.num_layers,
        "dim": cfg.num_attention_heads * cfg.attention_head_dim,
        "tokens": tokens,
        "seconds": took.as_secs_f64(),
        "build_seconds": built.as_secs_f64(),
        "warm_up_seconds": warm_up.as_secs_f64(),
        "weights_peak_bytes": weights_peak,
        "peak_bytes": peak,
        "finite": finite,
    });
    options.report(line, json)
}

fn vae_decode(options: &mut Options, dtype: DType) -> BenchResult {
    let device = options.device.clone();
    let (config, latent, name) = if options.smoke {
        let config = vae::Config {
            base_dim: 8,
            num_res_blocks: 1,
            ..vae::Config::default()
        };
        (config, (2, 4, 6), "smoke")
    } else {
        (vae::Config::default(), LATENT_480P, "wan2.1-480p")
    };
    let decoder = WanVaeDecoder::new(
        &config,
        Weights::device_random().var_builder(dtype, &device),
    )?;
    let (f, h, w) = latent;
    let z = Tensor::randn(0f32, 1.0, (1, config.z_dim, f, h, w), &device)?.to_dtype(dtype)?;
    let warm = Tensor::randn(0f32, 1.0, (1, config.z_dim, 1, 8, 8), &device)?.to_dtype(dtype)?;
    measured(&device, || decoder.decode(&warm))?;
    let (video, took, peak) = measured(&device, || decoder.decode(&z))?;
    let dims = video.dims().to_vec();
    let line = format!(
        "vae {name} {dtype:?}: latent {f}×{h}×{w} -> video {dims:?}: {:.3} s (peak {})",
        took.as_secs_f64(),
        gib(peak)
    );
    let json = serde_json::json!({
        "section": "vae",
        "case": name,
        "dtype": format!("{dtype:?}"),
        "seconds": took.as_secs_f64(),
        "peak_bytes": peak,
        "video": dims,
    });
    options.report(line, json)
}

fn main() -> BenchResult {
    let mut options = Options::parse()?;
    if !options.device.is_cpu() {
        // the CPU's generator cannot be seeded this way; its draws are only for the smoke test
        options.device.set_seed(0)?;
    }
    let memory = memory_info(&options.device).map(|(_, total)| total as u64);
    println!(
        "gpu check on {} ({} device memory){}",
        options.device_name,
        gib(memory),
        if options.smoke {
            ": smoke run (pass --bench for the full check)"
        } else {
            ""
        }
    );
    let mut failed = 0;
    if options.wants("parity") {
        let dtypes: &[DType] = if options.smoke {
            &[DType::BF16]
        } else {
            &[DType::F32, DType::BF16]
        };
        failed += parity(&mut options, dtypes)?;
    }
    if options.wants("vae") {
        vae_decode(&mut options, DType::BF16)?;
    }
    if options.wants("step") {
        for case in step_cases(options.smoke) {
            let wanted = options
                .cases
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == case.name));
            if wanted {
                step(&mut options, &case)?;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} parity cases failed");
        std::process::exit(1);
    }
    Ok(())
}
