//! Wan VAE decode timings on seeded weights: the fixture-size decoder on a small latent, the
//! built-in tiny model's decoder on a 81-frame 256×256 video, and Wan2.1's real decoder sizes
//! (base_dim 96) on a 5×16×16 latent.
//!
//! `cargo bench -p longtake-worker --bench vae` times every size; run without `--bench` (as
//! `cargo test --all-targets` does) it only decodes the smallest case once, as a smoke test.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use longtake_worker::families::wan::pipeline::tiny_configs;
use longtake_worker::families::wan::vae::{Config, WanVaeDecoder};
use longtake_worker::model::loader::seeded_var_builder;
use longtake_worker::model::noise;

struct Case {
    name: &'static str,
    config: Config,
    /// (F, H, W) of the latent
    latent: (usize, usize, usize),
    runs: usize,
}

fn time_case(case: &Case, device: &Device) -> candle_core::Result<()> {
    let vae = WanVaeDecoder::new(&case.config, seeded_var_builder(11, DType::F32, device))?;
    let (f, h, w) = case.latent;
    let values = noise::gaussian(5, 0, 0, 16 * f * h * w);
    let z = Tensor::from_vec(values, (1, 16, f, h, w), device)?;
    let mut best = Duration::MAX;
    let mut dims = Vec::new();
    for _ in 0..case.runs {
        let start = Instant::now();
        let video = vae.decode(&z)?;
        // Force the work to finish on asynchronous devices.
        video.sum_all()?.to_scalar::<f32>()?;
        best = best.min(start.elapsed());
        dims = video.dims().to_vec();
    }
    println!(
        "vae_decode {:<28} latent {f}x{h}x{w} -> video {:?}: {:.3} s (best of {})",
        case.name,
        dims,
        best.as_secs_f64(),
        case.runs
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let full = std::env::args().any(|a| a == "--bench");
    let device = Device::Cpu;
    let fixture = Config {
        base_dim: 8,
        num_res_blocks: 1,
        ..Config::default()
    };
    let mut cases = vec![Case {
        name: "fixture-size (base_dim 8)",
        config: fixture.clone(),
        latent: (3, 4, 6),
        runs: 3,
    }];
    if full {
        cases.push(Case {
            name: "built-in tiny model",
            config: tiny_configs(256)?.vae,
            latent: (21, 32, 32),
            runs: 1,
        });
        cases.push(Case {
            name: "real Wan2.1 dims (base_dim 96)",
            config: Config::default(),
            latent: (5, 16, 16),
            runs: 1,
        });
    } else {
        cases[0].runs = 1;
    }
    for case in &cases {
        time_case(case, &device)?;
    }
    Ok(())
}
