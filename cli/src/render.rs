//! `longtake render`: submit a job, watch it, download the clip to `--out`. With no coordinator
//! named it runs the whole farm in this process (see `embedded.rs`), so one command still
//! renders on a machine with nothing else installed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use longtake_cli::inspect::{Caption, Topology, ToyWorld};
use longtake_proto::spec::input::held_latent_frames;
use longtake_proto::spec::{InputKind, WindowSettings};
use longtake_proto::{JobEvent, RenderSpec};
use longtake_worker::daemon::models;

use crate::client::{Client, CoordinatorArg, Target};
use crate::download::{self, Destination};
use crate::embedded::{Farm, FarmOptions};
use crate::inputs::Upload;
use crate::jobs::{self, JobArgs};
use crate::progress::JobDisplay;
use crate::spec_args::SpecArgs;

pub const TINY_NOTE: &str =
    "model: built-in tiny Wan2.1 (seeded random weights: it makes abstract motion, not pictures; \
     pass --model DIR with a Wan2.1 checkpoint for real video)";

pub const TOY_NOTE: &str =
    "model: built-in toy Wan2.1 (trained by longtake on procedural videos: a coloured shape moving \
     on a plain background, 64x64; pass --model DIR with a Wan2.1 checkpoint for real video)";

#[derive(Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Output: an .mp4 file, or a directory for a PNG sequence.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// Local workers of the embedded farm (no coordinator) [default: the layout's world size].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Compute device of the embedded farm's workers: cpu, or cuda / cuda:N with a CUDA build
    /// [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Precision of the embedded farm's workers: f32, bf16 or f16 [default: f32 on cpu, bf16 on
    /// cuda].
    #[arg(long)]
    pub dtype: Option<String>,
    /// A PNG picture the clip starts from (image-to-video, with a model that takes one); the
    /// size follows the picture's aspect over the model's default area unless --size is given.
    #[arg(long, value_name = "FRAME.png")]
    pub image: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExtendArgs {
    /// The clip to extend: an H.264 MP4 (longtake's own output, or any whose sides are
    /// multiples of 16). The new frames render at its size and frame rate; --seconds and
    /// --frames count the new frames only, and --prompt-at times count from the clip's end.
    #[arg(long, value_name = "CLIP.mp4")]
    pub input: PathBuf,
    #[command(flatten)]
    pub render: RenderArgs,
}

pub async fn run(args: RenderArgs) -> Result<i32> {
    let format = download::format_for(&args.out, args.spec.format.map(|f| f.proto()))?;
    let mut built = args.spec.build(format)?;
    let upload = match &args.image {
        Some(path) => Some(Upload::read(path, InputKind::Image)?),
        None => None,
    };
    if let Some(upload) = &upload {
        upload.attach(&mut built, &args.spec)?;
    }
    render_built(args, built, upload).await
}

/// `longtake extend`: the clip read and attached, the new frames counted at its rate.
pub async fn extend(args: ExtendArgs) -> Result<i32> {
    let ExtendArgs { input, render } = args;
    if render.image.is_some() {
        bail!("--image is for `render`: an extension continues --input, the clip");
    }
    let upload = Upload::read(&input, InputKind::Clip)?;
    let format = download::format_for(&render.out, render.spec.format.map(|f| f.proto()))?;
    let mut built = render.spec.build(format)?;
    upload.attach(&mut built, &render.spec)?;
    render_built(render, built, Some(upload)).await
}

async fn render_built(
    args: RenderArgs,
    built: crate::spec_args::Built,
    upload: Option<Upload>,
) -> Result<i32> {
    let format = download::format_for(&args.out, args.spec.format.map(|f| f.proto()))?;
    let url = args.coordinator.url();
    // The embedded farm has no tokens or TLS: they are for a farm named by --coordinator.
    let target = match url {
        Some(_) => Some(args.coordinator.target()?),
        None => None,
    };
    if url.is_some() {
        for (flag, given) in [
            ("--workers", args.workers.is_some()),
            ("--device", args.device.is_some()),
            ("--dtype", args.dtype.is_some()),
        ] {
            if given {
                bail!("{flag} is for the embedded farm; a farm's workers are set up by `longtake serve worker`");
            }
        }
    }
    let workers = args.workers.unwrap_or(built.ranks);
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    // Before anything starts: an unwritable --out fails now, not after the render.
    let dest = Destination::prepare(&args.out, format)?;
    for note in &built.notes {
        eprintln!("{note}");
    }
    match built.spec.model.as_str() {
        models::TINY => eprintln!("{TINY_NOTE}"),
        models::TOY => eprintln!("{TOY_NOTE}"),
        _ => {}
    }

    let mut farm = None;
    let url = match url {
        Some(url) => url,
        None => {
            let options = FarmOptions {
                workers,
                model: built.spec.model.clone(),
                device: args.device.clone().unwrap_or_else(|| "cpu".into()),
                dtype: args.dtype.clone(),
            };
            match Farm::start(options).await {
                Ok(started) => farm.insert(started).url().to_string(),
                Err(err) => {
                    dest.discard();
                    return Err(err);
                }
            }
        }
    };
    let target = target.unwrap_or_else(|| Target::plain(&url));
    let outcome =
        submit_watch_fetch(&target, built.spec, &args, upload.as_ref(), dest, &mut farm).await;
    if let Some(farm) = farm {
        farm.shutdown().await;
    }
    outcome.map(|()| 0)
}

async fn submit_watch_fetch(
    target: &Target,
    spec: RenderSpec,
    args: &RenderArgs,
    upload: Option<&Upload>,
    dest: Destination,
    farm: &mut Option<Farm>,
) -> Result<()> {
    let start = Instant::now();
    let url = target.url.as_str();
    let mut client = match Client::connect(target).await {
        Ok(client) => client,
        Err(err) => {
            dest.discard();
            return Err(err);
        }
    };
    let submitted = match upload {
        Some(upload) => {
            jobs::submit_spec_with_input(&mut client, spec, &args.job, upload.bytes()).await
        }
        None => jobs::submit_spec(&mut client, spec, &args.job).await,
    };
    let job = match submitted {
        Ok(job) => job,
        Err(err) => {
            dest.discard();
            return Err(err);
        }
    };
    match farm {
        Some(_) => eprintln!("job {} (embedded farm)", job.id),
        None => eprintln!("job {} submitted to {url}", job.id),
    }
    let last = match watch(&mut client, &job.id, farm).await {
        Ok(last) => last,
        Err(err) => {
            dest.discard();
            return Err(err);
        }
    };
    if let Err(err) = jobs::outcome(&last) {
        dest.discard();
        return Err(err);
    }
    let got = jobs::download(&mut client, &job.id, dest).await?;
    let done = jobs::get(&mut client, &job.id).await?;
    // A finished job's record holds the spec as it ran, the model's defaults filled in.
    let spec = done.spec.unwrap_or_default();
    let extended = spec
        .input
        .as_ref()
        .filter(|i| i.kind == longtake_proto::InputKind::Clip as i32)
        .map(|clip| clip.frames);
    let frames = match extended {
        Some(clip_frames) => format!(
            "{} frames (the clip's {clip_frames}, {} new)",
            clip_frames + spec.frames,
            spec.frames
        ),
        None => format!("{} frames", spec.frames),
    };
    println!(
        "wrote {}: {frames}, {}x{}, {} fps, {} bytes, in {:.1} s",
        args.out.display(),
        spec.width,
        spec.height,
        spec.fps,
        got.bytes,
        start.elapsed().as_secs_f64()
    );
    let world = model_world(&mut client, &spec.model).await;
    report_seams(&args.out, &spec, world, extended);
    Ok(())
}

/// The procedural world the workers say `model` was trained on; bordered when none says (a
/// model of real video, or workers from before the field), which measures on a plane.
async fn model_world(client: &mut Client, model: &str) -> ToyWorld {
    let Ok(workers) = jobs::list_workers(client).await else {
        return ToyWorld::Bordered;
    };
    workers
        .iter()
        .flat_map(|w| &w.models)
        .filter(|m| m.name == model)
        .find_map(|m| m.world.parse().ok())
        .unwrap_or(ToyWorld::Bordered)
}

/// After a clip of several windows, one line on its seams (the change across each window
/// boundary against the change inside windows) and how to see them all. A clip of one window
/// (its spec shows no window settings) has none. The clip is measured in the model's world,
/// on a torus where every prompt is a toy-world caption of a straight mover that wraps.
fn report_seams(out: &Path, spec: &RenderSpec, world: ToyWorld, extended: Option<u32>) {
    if spec.window_latent_frames == 0 && extended.is_none() {
        return;
    }
    let windows = WindowSettings {
        latent_frames: spec.window_latent_frames,
        overlap: spec.overlap_latent_frames.unwrap_or(0),
        fusion: spec.fusion.parse().unwrap_or_default(),
        groups: spec.groups.max(1),
        noise: Default::default(),
    };
    let prompts =
        std::iter::once(&spec.prompt).chain(spec.prompt_timeline.iter().map(|c| &c.prompt));
    let directions: Option<Vec<_>> = prompts
        .map(|p| p.parse::<Caption>().ok().map(|c| c.direction))
        .collect();
    let topology = Topology::of_world(world, directions.unwrap_or_default());
    // An extension's windows start at the clip's last frames it held, before the join.
    let join = extended.map(|clip_frames| {
        let held = match spec.window_latent_frames {
            0 => 0,
            window => {
                let pack = longtake_proto::spec::frames::WAN_TEMPORAL_PACK;
                let latents = held_latent_frames(window, windows.overlap, clip_frames, pack);
                (latents.max(1) - 1) * pack + 1
            }
        };
        (clip_frames as usize, held as usize)
    });
    let (seams, join) = match longtake_cli::inspect::seams_and_join_of(out, windows, topology, join)
    {
        Ok(reports) => reports,
        Err(err) => {
            eprintln!("note: no seam report for {}: {err}", out.display());
            return;
        }
    };
    if let Some(join) = join {
        println!(
            "join at frame {} (the clip's last frame → the first new one): {}",
            join.join,
            join.summary()
        );
    }
    if let Some(report) = seams {
        println!(
            "seams: {} window boundaries; each seam's largest change against each stretch \
             inside the windows (picture, object centroid, colour, area): {}; worst seam against \
             the inside's mean and 95th percentile: {} (each seam: longtake inspect {} --window \
             {} --overlap {} --caption ...)",
            report.seams.len(),
            report.like_for_like(),
            report.worst(),
            out.display(),
            windows.latent_frames,
            windows.overlap
        );
    }
}

/// Follows the job to its end. Ctrl-C cancels an embedded job (its farm ends with this process)
/// but leaves a farm's job running; a second Ctrl-C stops waiting for the cancel.
async fn watch(client: &mut Client, id: &str, farm: &mut Option<Farm>) -> Result<JobEvent> {
    let mut display = JobDisplay::default();
    let mut interrupted = false;
    let last = loop {
        tokio::select! {
            last = jobs::follow(client, id, |event| display.show(event)) => break last,
            signal = tokio::signal::ctrl_c() => {
                display.clear();
                signal?;
                if farm.is_none() {
                    bail!(
                        "interrupted: job {id} keeps running on {} (`longtake watch {id}`, `longtake cancel {id}`)",
                        client.url()
                    );
                }
                if interrupted {
                    bail!("interrupted again while job {id} was being cancelled");
                }
                interrupted = true;
                eprintln!("cancelling job {id} (Ctrl-C again to stop waiting)");
                jobs::cancel_job(client, id, "interrupted (Ctrl-C)").await?;
                // Watching again replays the job's state, so no event is lost.
            }
            err = failure(farm) => break Err(err),
        }
    };
    display.clear();
    last
}

/// Why the embedded farm broke down; never resolves for a farm elsewhere.
async fn failure(farm: &mut Option<Farm>) -> anyhow::Error {
    match farm {
        Some(farm) => farm.failure().await,
        None => std::future::pending().await,
    }
}
