//! `longtake render`: one text-to-video job written as MP4 or PNG frames, in this process or,
//! with `--layout`, in several local processes (the hidden `longtake rank`, started by
//! `launch.rs`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use longtake_coordinator::encode::{self, Quality, VideoFormat};
use longtake_worker::model::pipeline::{PipelineInfo, Progress, RenderSpec, WanPipeline};
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
    /// Run on several local processes in a parallel layout, e.g. `cfg=2,tp=1,ulysses=2,ring=1`
    /// (cfg × tp × ulysses × ring processes; missing keys are 1). Absent: one process.
    #[arg(long)]
    pub layout: Option<String>,
}

/// What a render needs before any model is loaded.
pub struct Prepared {
    pub device: Device,
    pub dtype: DType,
    pub frames: usize,
    pub format: VideoFormat,
}

/// Checks the arguments that need no model: device, dtype, frame count, output format.
pub fn prepare(args: &RenderArgs, notes: bool) -> Result<Prepared> {
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
    if frames != requested && notes {
        eprintln!("note: Wan renders 4k+1 frames; {requested} frames rounded up to {frames}");
    }
    let format = VideoFormat::for_path(
        &args.out,
        args.format.map(|f| match f {
            FormatArg::Mp4 => VideoFormat::Mp4,
            FormatArg::Png => VideoFormat::PngSequence,
        }),
    )?;
    Ok(Prepared {
        device,
        dtype,
        frames,
        format,
    })
}

impl RenderArgs {
    /// The render spec, with the model's defaults for what was not given.
    pub fn spec(&self, info: &PipelineInfo, frames: usize) -> RenderSpec {
        let (width, height) = self
            .size
            .unwrap_or((info.default_width, info.default_height));
        RenderSpec {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            frames,
            width,
            height,
            steps: self.steps.unwrap_or(info.default_steps),
            guidance_scale: self.guidance,
            shift: self.shift,
            scheduler: self.scheduler.map(|s| match s {
                SchedulerArg::Unipc => SchedulerKind::UniPc,
                SchedulerArg::Euler => SchedulerKind::Euler,
            }),
            seed: self.seed,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn guidance(&self) -> f64 {
        self.guidance
    }
}

/// The step counter on stderr: a bar on a terminal, one line per step otherwise.
pub struct StepDisplay {
    bar: ProgressBar,
    interactive: bool,
}

impl StepDisplay {
    pub fn new(steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {pos}/{len} steps  {elapsed} elapsed, ETA {eta}",
            )
            .expect("static progress template")
            .progress_chars("=> "),
        );
        bar.set_message("denoising");
        Self {
            bar,
            interactive: std::io::stderr().is_terminal(),
        }
    }

    /// Step `index` (0-based) of `total` finished `elapsed_s` seconds into the loop.
    pub fn step(&self, index: usize, total: usize, elapsed_s: f64) {
        self.bar.set_position(index as u64 + 1);
        if !self.interactive {
            eprintln!("step {}/{total} ({elapsed_s:.1} s)", index + 1);
        }
    }

    pub fn decoding(&self, frames: usize) {
        self.bar.finish_and_clear();
        eprintln!("decoding {frames} frames");
    }

    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// Writes decoded frames to an already opened sink.
pub fn write_video(
    mut sink: Box<dyn encode::FrameSink>,
    video: &longtake_worker::model::pipeline::Video,
) -> Result<()> {
    let frame_bytes = video.width * video.height * 3;
    for frame in video.rgb.chunks_exact(frame_bytes) {
        sink.push_frame(frame)?;
    }
    sink.finish()?;
    Ok(())
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

pub fn run(args: RenderArgs, launch_args: Vec<std::ffi::OsString>) -> Result<i32> {
    if let Some(layout) = args.layout.clone() {
        return crate::launch::run(&args, &layout, launch_args);
    }
    let Prepared {
        device,
        dtype,
        frames,
        format,
    } = prepare(&args, true)?;

    let load_start = Instant::now();
    let pipeline = if args.model == "tiny" {
        eprintln!("{TINY_NOTE}");
        WanPipeline::tiny(&device, dtype)?
    } else {
        eprintln!("model: {}", args.model);
        WanPipeline::load(&args.model, &device, dtype)?
    };
    let info = pipeline.info().clone();
    let spec = args.spec(&info, frames);
    announce(&pipeline, &spec, &args, load_start)?;

    let display = StepDisplay::new(spec.steps);
    // Open the output first: an unwritable path fails before the render, not after it.
    let sink = open_sink(&args, format, &spec)?;
    let start = Instant::now();
    let rendered = pipeline.render(&spec, &mut |event| match event {
        Progress::Encoded { .. } => {}
        Progress::Step {
            index,
            total,
            elapsed,
        } => display.step(index, total, elapsed.as_secs_f64()),
        Progress::Decoding => display.decoding(frames),
    });
    let video = match rendered {
        Ok(video) => video,
        Err(err) => {
            discard_output(sink, &args, format);
            return Err(err.into());
        }
    };
    write_video(sink, &video)?;
    print_wrote(&args, &video, start);
    Ok(0)
}

const TINY_NOTE: &str =
    "model: built-in tiny Wan2.1 (seeded random weights: it makes abstract motion, not pictures; \
     pass --model DIR with a Wan2.1 checkpoint for real video)";

/// Warns about over-long prompts, validates the size and prints what will be rendered.
fn announce(
    pipeline: &WanPipeline,
    spec: &RenderSpec,
    args: &RenderArgs,
    load_start: Instant,
) -> Result<()> {
    let info = pipeline.info();
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
    let latent = pipeline.latent_shape(spec)?;
    eprintln!(
        "render: {} frames at {}x{}, {} fps ({:.2} s), {} steps, seed {}, latent {}x{}x{} (loaded in {:.1} s)",
        spec.frames,
        spec.width,
        spec.height,
        args.fps,
        spec.frames as f64 / args.fps as f64,
        spec.steps,
        spec.seed,
        latent.frames,
        latent.height,
        latent.width,
        load_start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn open_sink(
    args: &RenderArgs,
    format: VideoFormat,
    spec: &RenderSpec,
) -> Result<Box<dyn encode::FrameSink>> {
    Ok(encode::open_writer(
        &args.out,
        Some(format),
        spec.width as u32,
        spec.height as u32,
        args.fps,
        Quality::default(),
    )?)
}

/// An MP4 without its index does not play: a failed render leaves none behind.
fn discard_output(sink: Box<dyn encode::FrameSink>, args: &RenderArgs, format: VideoFormat) {
    drop(sink);
    if format == VideoFormat::Mp4 {
        let _ = std::fs::remove_file(&args.out);
    }
}

fn print_wrote(args: &RenderArgs, video: &longtake_worker::model::pipeline::Video, start: Instant) {
    println!(
        "wrote {}: {} frames, {}x{}, {} fps, in {:.1} s",
        args.out.display(),
        video.frames,
        video.width,
        video.height,
        args.fps,
        start.elapsed().as_secs_f64()
    );
}

/// The hidden `longtake rank` subcommand: one process of a parallel render started by the
/// launcher (see `launch.rs` for the protocol on stdin/stdout).
#[derive(Args)]
pub struct RankArgs {
    /// This process's rank in the layout.
    #[arg(long)]
    rank: usize,
    #[command(flatten)]
    render: RenderArgs,
}

/// Test hook: `LONGTAKE_TEST_ABORT_RANK=R:K` makes rank R abort (SIGABRT) right after it
/// finishes denoising step K (1-based), to test how the launcher handles a dying rank.
const ABORT_HOOK: &str = "LONGTAKE_TEST_ABORT_RANK";

fn abort_hook(rank: usize) -> Option<usize> {
    let text = std::env::var(ABORT_HOOK).ok()?;
    let (r, k) = text.split_once(':')?;
    (r.trim().parse::<usize>().ok()? == rank)
        .then(|| k.trim().parse().ok())
        .flatten()
}

pub fn run_rank(args: RankArgs) -> Result<i32> {
    use longtake_worker::parallel::{DistributedPipeline, TcpMesh, TcpMeshConfig};
    use std::io::BufRead;

    let RankArgs { rank, render: args } = args;
    let root = rank == 0;
    let layout_text = args.layout.clone().context("a rank needs --layout")?;
    let layout: longtake_worker::parallel::layout::Layout =
        layout_text.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let Prepared {
        device,
        dtype,
        frames,
        format,
    } = prepare(&args, root)?;

    // Rendezvous: our port out, everyone's addresses in (one comma-separated line).
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
    println!("port {}", listener.local_addr()?.port());
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the peer list from the launcher")?;
    let peers = line
        .trim()
        .split(',')
        .map(|a| a.parse::<std::net::SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad peer list {line:?}"))?;
    let mesh = TcpMesh::connect_with_listener(TcpMeshConfig::new(rank, peers), listener)?;

    let load_start = Instant::now();
    let pipeline = if args.model == "tiny" {
        if root {
            eprintln!("{TINY_NOTE}");
        }
        DistributedPipeline::tiny(&device, dtype, layout, Box::new(mesh))?
    } else {
        if root {
            eprintln!("model: {}", args.model);
        }
        DistributedPipeline::load(&args.model, &device, dtype, layout, Box::new(mesh))?
    };
    let spec = args.spec(pipeline.pipeline().info(), frames);
    if root {
        announce(pipeline.pipeline(), &spec, &args, load_start)?;
    } else {
        pipeline.pipeline().latent_shape(&spec)?;
    }
    pipeline.check_spec(&spec)?;
    let sink = if root {
        Some(open_sink(&args, format, &spec)?)
    } else {
        None
    };
    let abort_after = abort_hook(rank);
    let start = Instant::now();
    let rendered = pipeline.render(&spec, &mut |event| match event {
        Progress::Encoded { total } => println!("progress encoded {total}"),
        Progress::Step {
            index,
            total,
            elapsed,
        } => {
            println!("progress step {index} {total} {:.3}", elapsed.as_secs_f64());
            if abort_after == Some(index + 1) {
                std::process::abort();
            }
        }
        Progress::Decoding => println!("progress decoding"),
    });
    match (rendered, sink) {
        (Ok(Some(video)), Some(sink)) => {
            write_video(sink, &video)?;
            print_wrote(&args, &video, start);
        }
        (Ok(_), _) => {}
        (Err(err), sink) => {
            if let Some(sink) = sink {
                discard_output(sink, &args, format);
            }
            return Err(err.into());
        }
    }
    Ok(0)
}
