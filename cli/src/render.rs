//! `longtake render`: one text-to-video job in this process, written as MP4 or PNG frames.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use longtake_coordinator::encode::{self, Quality, VideoFormat};
use longtake_worker::model::pipeline::{Progress, RenderSpec, WanPipeline};
use longtake_worker::model::scheduler::SchedulerKind;
use longtake_worker::model::video;

#[derive(Args)]
pub struct RenderArgs {
    /// What the clip shows.
    #[arg(long)]
    prompt: String,
    /// What the clip must not show (classifier-free guidance pushes away from it).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// A checkpoint directory in the diffusers layout (e.g. Wan2.1-T2V-1.3B-Diffusers), or `tiny`
    /// for the built-in toy model with seeded random weights (abstract motion, not pictures).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Number of frames; Wan makes 4k+1 frames, other counts are rounded up.
    #[arg(long, conflicts_with = "seconds")]
    frames: Option<usize>,
    /// Clip length in seconds (frames = seconds × fps, rounded up to 4k+1).
    #[arg(long)]
    seconds: Option<f64>,
    /// Frames per second of the output.
    #[arg(long, default_value_t = 16)]
    fps: u32,
    /// Frame size WIDTHxHEIGHT, multiples of 16 [default: 832x480, tiny: 256x256].
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Denoising steps [default: 50, tiny: 10].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Flow shift of the scheduler [default: the checkpoint's].
    #[arg(long)]
    shift: Option<f64>,
    /// Seed of the initial noise; the same seed and spec give the same frames.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler [default: the checkpoint's, UniPC for Wan2.1].
    #[arg(long, value_enum)]
    scheduler: Option<SchedulerArg>,
    /// Output: an .mp4 file, or a directory for a PNG sequence.
    #[arg(long)]
    out: PathBuf,
    /// Output format [default: from --out: .mp4 → mp4, a directory → png].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Compute device: cpu, or cuda / cuda:N with a CUDA build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the transformer and VAE: f32, bf16 or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchedulerArg {
    Unipc,
    Euler,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Mp4,
    Png,
}

fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("size must be WIDTHxHEIGHT, e.g. 832x480; got {text:?}"))?;
    let w = w
        .trim()
        .parse()
        .map_err(|_| format!("width in {text:?} is not a number"))?;
    let h = h
        .trim()
        .parse()
        .map_err(|_| format!("height in {text:?} is not a number"))?;
    Ok((w, h))
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .with_context(|| format!("--device {cuda}: the GPU ordinal is not a number"))?
                .unwrap_or(0);
            Device::new_cuda(ordinal).with_context(|| {
                format!("--device {cuda}: no usable CUDA device (is this a CUDA build?)")
            })
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

fn dtype(name: Option<&str>, device: &Device) -> Result<DType> {
    Ok(match name {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
    })
}

pub fn run(args: RenderArgs) -> Result<i32> {
    let device = device(&args.device)?;
    let dtype = dtype(args.dtype.as_deref(), &device)?;
    if args.fps == 0 {
        bail!("--fps must be at least 1");
    }
    let requested = match (args.frames, args.seconds) {
        (Some(0), _) => bail!("--frames must be at least 1"),
        (Some(n), _) => n,
        (None, Some(s)) if s > 0.0 && s.is_finite() => video::frame_count_for(s, args.fps),
        (None, Some(s)) => bail!("--seconds must be a positive number; got {s}"),
        (None, None) => 81,
    };
    let frames = video::round_frames(requested);
    if frames != requested {
        eprintln!("note: Wan renders 4k+1 frames; {requested} frames rounded up to {frames}");
    }
    let format = VideoFormat::for_path(
        &args.out,
        args.format.map(|f| match f {
            FormatArg::Mp4 => VideoFormat::Mp4,
            FormatArg::Png => VideoFormat::PngSequence,
        }),
    )?;

    let load_start = Instant::now();
    let pipeline = if args.model == "tiny" {
        eprintln!(
            "model: built-in tiny Wan2.1 (seeded random weights: it makes abstract motion, not pictures; \
             pass --model DIR with a Wan2.1 checkpoint for real video)"
        );
        WanPipeline::tiny(&device, dtype)?
    } else {
        eprintln!("model: {}", args.model);
        WanPipeline::load(&args.model, &device, dtype)?
    };
    let info = pipeline.info().clone();
    let (width, height) = args
        .size
        .unwrap_or((info.default_width, info.default_height));
    let spec = RenderSpec {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        frames,
        width,
        height,
        steps: args.steps.unwrap_or(info.default_steps),
        guidance_scale: args.guidance,
        shift: args.shift,
        scheduler: args.scheduler.map(|s| match s {
            SchedulerArg::Unipc => SchedulerKind::UniPc,
            SchedulerArg::Euler => SchedulerKind::Euler,
        }),
        seed: args.seed,
    };
    for (what, text) in [
        ("prompt", &spec.prompt),
        ("negative prompt", &spec.negative_prompt),
    ] {
        let overflow = pipeline.prompt_overflow(text)?;
        if overflow > 0 {
            eprintln!(
                "warning: the {what} is {overflow} tokens longer than the text encoder takes ({}); the end is cut off",
                info.max_sequence_length
            );
        }
    }
    // Validate before any heavy work so a bad size fails at once.
    let latent = pipeline.latent_shape(&spec)?;
    eprintln!(
        "render: {frames} frames at {width}x{height}, {} fps ({:.2} s), {} steps, seed {}, latent {}x{}x{} (loaded in {:.1} s)",
        args.fps,
        frames as f64 / args.fps as f64,
        spec.steps,
        spec.seed,
        latent.frames,
        latent.height,
        latent.width,
        load_start.elapsed().as_secs_f64()
    );

    let bar = ProgressBar::new(spec.steps as u64);
    let interactive = std::io::stderr().is_terminal();
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} steps  {elapsed} elapsed, ETA {eta}",
        )
        .expect("static progress template")
        .progress_chars("=> "),
    );
    bar.set_message("denoising");
    // Open the output first: an unwritable path fails before the render, not after it.
    let mut sink = encode::open_writer(
        &args.out,
        Some(format),
        width as u32,
        height as u32,
        args.fps,
        Quality::default(),
    )?;
    let start = Instant::now();
    let rendered = pipeline.render(&spec, &mut |event| match event {
        Progress::Encoded { .. } => {}
        Progress::Step {
            index,
            total,
            elapsed,
        } => {
            bar.set_position(index as u64 + 1);
            if !interactive {
                eprintln!(
                    "step {}/{total} ({:.1} s)",
                    index + 1,
                    elapsed.as_secs_f64()
                );
            }
        }
        Progress::Decoding => {
            bar.finish_and_clear();
            eprintln!("decoding {frames} frames");
        }
    });
    let video = match rendered {
        Ok(video) => video,
        Err(err) => {
            // An MP4 without its index does not play: do not leave one behind.
            drop(sink);
            if format == VideoFormat::Mp4 {
                let _ = std::fs::remove_file(&args.out);
            }
            return Err(err.into());
        }
    };
    let frame_bytes = video.width * video.height * 3;
    for frame in video.rgb.chunks_exact(frame_bytes) {
        sink.push_frame(frame)?;
    }
    sink.finish()?;
    println!(
        "wrote {}: {} frames, {}x{}, {} fps, in {:.1} s",
        args.out.display(),
        video.frames,
        video.width,
        video.height,
        args.fps,
        start.elapsed().as_secs_f64()
    );
    Ok(0)
}
