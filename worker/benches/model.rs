//! Timings of the model stack's hot paths, one forward at a time: the Wan transformer at the
//! reference tiny size and at a mid size with random weights. Run with
//! `cargo bench -p longtake-worker --bench model [filter]`; a filter keeps the cases whose name
//! contains it. `LONGTAKE_REFERENCE_DIR` points at the fixtures as for the tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use longtake_worker::model::loader::{seeded_var_builder, Checkpoint};
use longtake_worker::model::wan::transformer::{Config, WanTransformer3DModel};

type BenchResult = Result<(), Box<dyn std::error::Error>>;

/// Runs `f` once to warm up, then `iters` times; prints min and median.
fn time(name: &str, iters: usize, mut f: impl FnMut() -> BenchResult) -> BenchResult {
    f()?;
    let mut samples: Vec<Duration> = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "{name:<58} min {:>9.2} ms   median {:>9.2} ms   ({iters} runs)",
        samples[0].as_secs_f64() * 1e3,
        samples[iters / 2].as_secs_f64() * 1e3
    );
    Ok(())
}

fn reference_root() -> PathBuf {
    std::env::var_os("LONGTAKE_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference"))
}

/// One transformer forward with classifier-free guidance's batch of 2 on a latent of
/// `(frames, height, width)` and `text_len` text tokens.
fn bench_transformer(
    name: &str,
    model: &WanTransformer3DModel,
    latent: (usize, usize, usize),
    text_len: usize,
    iters: usize,
    device: &Device,
) -> BenchResult {
    let cfg = model.config();
    let (f, h, w) = latent;
    let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, f, h, w), device)?;
    let t = Tensor::new(&[999f32, 999.0], device)?;
    let text = Tensor::randn(0f32, 1.0, (2, text_len, cfg.text_dim), device)?;
    let (nf, nh, nw) = model.token_grid(f, h, w);
    let label = format!(
        "{name} (B=2, {}x{}x{} = {} tokens)",
        nf,
        nh,
        nw,
        nf * nh * nw
    );
    time(&label, iters, || {
        model.forward(&x, &t, &text)?;
        Ok(())
    })
}

fn main() -> BenchResult {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let device = Device::Cpu;

    if wanted("transformer_tiny") {
        // The reference pipeline's own transformer, on the latent of its 81-frame render
        // (32x48 pixels → 21x4x6 latent).
        let pipeline = reference_root().join("wan-tiny/pipeline");
        match Checkpoint::open(&pipeline) {
            Ok(ckpt) => {
                let component = ckpt.component("transformer")?;
                let cfg: Config = component.config()?;
                let model =
                    WanTransformer3DModel::new(&cfg, component.var_builder(DType::F32, &device)?)?;
                bench_transformer(
                    "transformer_tiny forward",
                    &model,
                    (21, 4, 6),
                    16,
                    10,
                    &device,
                )?;
            }
            Err(e) => println!("transformer_tiny: skipped, no reference pipeline: {e}"),
        }
    }

    if wanted("transformer_mid") {
        // 8 layers, 8 heads x 64, FFN 2048, random weights, on a 21x16x16 latent.
        let cfg = Config {
            num_attention_heads: 8,
            attention_head_dim: 64,
            ffn_dim: 2048,
            num_layers: 8,
            text_dim: 512,
            freq_dim: 256,
            ..Config::default()
        };
        let model = WanTransformer3DModel::new(&cfg, seeded_var_builder(0, DType::F32, &device))?;
        bench_transformer(
            "transformer_mid forward",
            &model,
            (21, 16, 16),
            64,
            3,
            &device,
        )?;
    }

    // VAE decode: the VAE engineer adds its case here.

    Ok(())
}
