//! Timings of one Wan transformer forward: the built-in tiny model on its default render's latent,
//! and a mid-size random-weight configuration. Run with
//! `cargo bench -p longtake-worker --bench model [filter]`; a filter keeps the cases whose name
//! contains it. The VAE decode has its own bench (`--bench vae`).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use longtake_worker::families::wan::pipeline::tiny_configs;
use longtake_worker::families::wan::transformer::{Config, WanTransformer3DModel};
use longtake_worker::model::attention::{self, AttentionOptions};
use longtake_worker::model::linear::linear;
use longtake_worker::model::loader::seeded_var_builder;

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
        // The built-in tiny model's transformer on the latent of its default render: 81 frames
        // at 256x256 → a 21x32x32 latent.
        let cfg = tiny_configs(256)?.transformer;
        let model = WanTransformer3DModel::new(&cfg, seeded_var_builder(0, DType::F32, &device))?;
        bench_transformer(
            "transformer_tiny forward",
            &model,
            (21, 32, 32),
            64,
            5,
            &device,
        )?;
    }

    // The attention core alone on the tiny model's self-attention shape (B=2 × 4 heads, 5,376
    // tokens, head dim 16), the mid model's (B=2 × 8 heads, 1,344 tokens, 64) and the mid width
    // in heads of 32 (the toy model's head dimension, where the AMX kernel takes over): the fused
    // CPU kernel beside the score-matrix path it replaced on the CPU (a filter such as
    // "attention_mid fused" runs one of them).
    for (name, heads, tokens, d) in [
        ("tiny", 4, 5376, 16),
        ("mid", 8, 1344, 64),
        ("d32", 16, 1344, 32),
    ] {
        let fused = format!("attention_{name} fused");
        let chunked = format!("attention_{name} score matrix (chunked)");
        if !wanted(&fused) && !wanted(&chunked) {
            continue;
        }
        let qkv = || Tensor::randn(0f32, 1.0, (2, heads, tokens, d), &device);
        let (q, k, v) = (qkv()?, qkv()?, qkv()?);
        if wanted(&fused) {
            time(&fused, 5, || {
                attention::attention(&q, &k, &v, &AttentionOptions::default())?;
                Ok(())
            })?;
        }
        if wanted(&chunked) {
            time(&chunked, 3, || {
                attention::attention_chunked(&q, &k, &v, &AttentionOptions::default())?;
                Ok(())
            })?;
        }
    }

    if wanted("linear") {
        // The linear layers alone at the mid model's shapes (2 × 1,344 tokens; attention
        // projections, FFN in and out) and the tiny model's (2 × 5,376 tokens, dim 64, FFN 256).
        for (tokens, fan_in, fan_out) in [
            (2688, 512, 512),
            (2688, 512, 2048),
            (2688, 2048, 512),
            (10752, 64, 64),
            (10752, 64, 256),
        ] {
            let x = Tensor::randn(0f32, 1.0, (tokens, fan_in), &device)?;
            let vb = seeded_var_builder(0, DType::F32, &device);
            let ours = linear(fan_in, fan_out, vb.clone())?;
            let candles = candle_nn::linear(fan_in, fan_out, vb)?;
            let flops = 2.0 * (tokens * fan_in * fan_out) as f64;
            for (kind, layer) in [("fused", &ours as &dyn Module), ("candle", &candles)] {
                let mut best = f64::INFINITY;
                time(
                    &format!("linear {tokens}x{fan_in} -> {fan_out} {kind}"),
                    10,
                    || {
                        let start = Instant::now();
                        layer.forward(&x)?;
                        best = best.min(start.elapsed().as_secs_f64());
                        Ok(())
                    },
                )?;
                println!("    {:.0} GFLOP/s at its best", flops / best / 1e9);
            }
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

    Ok(())
}
