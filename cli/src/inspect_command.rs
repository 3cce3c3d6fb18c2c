//! `longtake inspect CLIP --caption TEXT`: the report of `longtake_cli::inspect` on one clip,
//! readable or as JSON, and its verdict as the exit status.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use longtake_cli::inspect;
use longtake_coordinator::encode::write_png;
use longtake_proto::spec::job::default_overlap;

#[derive(Args)]
pub struct InspectArgs {
    /// The clip: an .mp4 written by longtake or a directory of frame_00000.png, ...
    clip: PathBuf,
    /// What the clip should show, in the toy world's grammar: "a {color} {shape} moving
    /// {left|right|up|down} on a {background} background" or "a {color} {shape} bouncing on a
    /// {background} background".
    #[arg(long)]
    caption: String,
    /// Print the report (every figure, per frame too) as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write a PNG strip of the clip: --strip-frames evenly spaced frames (first and last
    /// included) side by side, enlarged --strip-scale times.
    #[arg(long, value_name = "FILE.png")]
    strip: Option<PathBuf>,
    #[arg(long, default_value_t = 3, value_name = "N")]
    strip_frames: usize,
    #[arg(long, default_value_t = 3, value_name = "N")]
    strip_scale: usize,
    /// For the seam report of a long clip: the window length it was rendered with, in latent
    /// frames [default: the toy model's 5].
    #[arg(long, value_name = "N")]
    window: Option<u32>,
    /// ... and the least overlap of its windows [default: a third of the window].
    #[arg(long, value_name = "N")]
    overlap: Option<u32>,
    /// The world the model was trained on: bordered (the shipped toy model's) or wrapping
    /// (`worker/toy/world.py --wrap`: a straight mover leaves by one edge and comes back by the
    /// other, so its clips are measured on a torus; a bouncing object stays inside in both)
    /// [default: bordered].
    #[arg(long, value_name = "WORLD", default_value = "bordered")]
    world: inspect::ToyWorld,
}

/// Exit status 0 when colour, direction and background all match the caption, 1 otherwise.
pub fn run(args: InspectArgs) -> Result<i32> {
    let mut windows = inspect::toy_windows();
    if let Some(window) = args.window {
        windows.latent_frames = window;
        windows.overlap = default_overlap(window);
    }
    if let Some(overlap) = args.overlap {
        windows.overlap = overlap;
    }
    // A cut the clip cannot have is named before anything is read.
    longtake_proto::spec::WindowPlan::new(1, windows).map_err(|e| {
        anyhow::anyhow!(
            "--{}: {}",
            e.field().replace("_latent_frames", "").replace('_', "-"),
            e.problem()
        )
    })?;
    let report = inspect::inspect_with_windows(&args.clip, &args.caption, windows, args.world)?;
    if let Some(path) = &args.strip {
        let frames = inspect::read_clip(&args.clip)?;
        let strip = inspect::strip::strip(&frames, args.strip_frames, args.strip_scale)
            .context("--strip-frames and --strip-scale must be at least 1")?;
        write_png(
            path,
            strip.width() as u32,
            strip.height() as u32,
            strip.rgb(),
            &mut Vec::new(),
        )?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?
        );
    } else {
        println!("{report}");
    }
    Ok(if report.passed { 0 } else { 1 })
}
