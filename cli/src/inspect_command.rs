//! `longtake inspect CLIP --caption TEXT`: the report of `longtake_cli::inspect` on one clip,
//! readable or as JSON, and its verdict as the exit status.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use longtake_cli::inspect;
use longtake_coordinator::encode::write_png;

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
}

/// Exit status 0 when colour, direction and background all match the caption, 1 otherwise.
pub fn run(args: InspectArgs) -> Result<i32> {
    let report = inspect::inspect(&args.clip, &args.caption)?;
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
