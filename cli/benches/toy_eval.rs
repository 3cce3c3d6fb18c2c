//! How well the built-in `toy` model draws what its caption says. Renders captions of the toy
//! world (half of them colour × shape × motion combinations held out of its training) with the
//! single-process pipeline at the model's defaults, one seed per caption, and judges each render
//! with `longtake inspect`'s checker. Prints one line per render, then the share of renders with
//! the right colour, direction and background, for seen and held-out captions apart, and the
//! model's own glitch rate: the frame transitions where the object leaps, changes colour or area
//! abruptly, or is lost (`Change::is_glitch`, what the seam report of a long clip counts at its
//! seams and inside its windows). One native clip has no seams, so this rate is the yardstick
//! for a long clip's: seams that glitch no more often than the model's own clips add nothing.
//!
//! `cargo bench -p longtake-cli --bench toy_eval -- [--count N] [--seed S] [--steps N]
//! [--guidance G] [--model DIR] [--caption TEXT] [--out DIR]` (`--caption` renders that caption
//! at N seeds instead; `--out` also writes each render as PNG frames).
//! Renders are judged in the world the model states it was trained on (`_longtake.world`).
//! `cargo test` does not run it; `cli/tests/toy.rs` checks a few captions on every test run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use longtake_cli::inspect::seams::transitions;
use longtake_cli::inspect::{toy_windows, Caption, Frame, Report, Topology, ToyWorld};
use longtake_coordinator::encode::PngSequenceWriter;
use longtake_worker::families::wan::pipeline::WanPipeline;
use longtake_worker::model::builtin;
use longtake_worker::model::render::RenderSpec;

const USAGE: &str = "usage: toy_eval [--count N] [--seed S] [--steps N] [--guidance G] \
[--model DIR] [--caption TEXT] [--out DIR]
  --count     captions to render, half seen in training and half held out (default 50)
  --seed      picks the captions and the first render seed (default 1)
  --steps     denoising steps (default: the model's)
  --guidance  classifier-free guidance scale (default 5)
  --model     a checkpoint directory (default: the built-in toy model)
  --caption   render this caption at N seeds instead of N captions
  --out       also write each render's frames as PNG under DIR/NN/";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    count: usize,
    seed: u64,
    steps: Option<usize>,
    guidance: f64,
    model: Option<PathBuf>,
    caption: Option<Caption>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        count: 50,
        seed: 1,
        steps: None,
        guidance: 5.0,
        model: None,
        caption: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--count" => args.count = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--steps" => args.steps = Some(value()?.parse()?),
            "--guidance" => args.guidance = value()?.parse()?,
            "--model" => args.model = Some(value()?.into()),
            "--caption" => args.caption = Some(value()?.parse()?),
            "--out" => args.out = Some(value()?.into()),
            "--bench" => {}
            _ => return Err(format!("unknown argument {flag}\n{USAGE}").into()),
        }
    }
    Ok(args)
}

#[derive(Default)]
struct Tally {
    renders: usize,
    color: usize,
    direction: usize,
    background: usize,
    all: usize,
    glitches: usize,
    transitions: usize,
}

impl Tally {
    fn add(&mut self, report: &Report, glitches: usize, transitions: usize) {
        let v = &report.verdict;
        self.glitches += glitches;
        self.transitions += transitions;
        self.renders += 1;
        self.color += usize::from(v.color_right);
        self.direction += usize::from(v.direction_right);
        self.background += usize::from(v.background_right);
        self.all += usize::from(report.passed);
    }

    fn line(&self, name: &str) -> String {
        let pct = |n: usize| 100.0 * n as f64 / self.renders.max(1) as f64;
        format!(
            "{name:9} {:3} renders: colour {:5.1}%  direction {:5.1}%  background {:5.1}%  all three {:5.1}%  \
             glitches {} of {} transitions ({:.2}%)",
            self.renders,
            pct(self.color),
            pct(self.direction),
            pct(self.background),
            pct(self.all),
            self.glitches,
            self.transitions,
            100.0 * self.glitches as f64 / self.transitions.max(1) as f64
        )
    }
}

fn frames_of(video: &longtake_worker::model::render::Video) -> Result<Vec<Frame>> {
    let size = video.width * video.height * 3;
    video
        .rgb
        .chunks_exact(size)
        .map(|rgb| Ok(Frame::new(video.width, video.height, rgb.to_vec())?))
        .collect()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => builtin::toy_dir()?.to_path_buf(),
    };
    let pipeline = WanPipeline::load(&dir, &Device::Cpu, DType::F32)?;
    let info = pipeline.info().clone();
    let world = info.world.unwrap_or(ToyWorld::Bordered);
    println!(
        "{} ({} world): {}x{}, {} frames, {} steps, guidance {}",
        info.name,
        world.name(),
        info.default_width,
        info.default_height,
        info.default_frames,
        args.steps.unwrap_or(info.default_steps),
        args.guidance
    );
    let (mut seen, mut held) = (Tally::default(), Tally::default());
    let started = Instant::now();
    let captions = match args.caption {
        Some(caption) => vec![caption; args.count],
        None => Caption::evaluation_set(args.count, args.seed),
    };
    for (i, caption) in captions.into_iter().enumerate() {
        let spec = RenderSpec {
            input: None,
            prompt: caption.to_string(),
            negative_prompt: String::new(),
            frames: info.default_frames,
            width: info.default_width,
            height: info.default_height,
            steps: args.steps.unwrap_or(info.default_steps),
            guidance_scale: args.guidance,
            shift: None,
            scheduler: None,
            seed: args.seed + i as u64,
            windows: None,
            timeline: Default::default(),
        };
        let video = pipeline.render(&spec, &mut |_| {})?;
        let frames = frames_of(&video)?;
        if let Some(out) = &args.out {
            let dir = out.join(format!("{i:02}"));
            std::fs::create_dir_all(&dir)?;
            let mut writer = PngSequenceWriter::create(
                &dir,
                info.default_width as u32,
                info.default_height as u32,
            )?;
            for frame in &frames {
                writer.push_frame(frame.rgb())?;
            }
            writer.finish()?;
        }
        let topology = Topology::of_world(world, [caption.direction]);
        let report = Report::with_windows(
            PathBuf::from(format!("render {i}")),
            caption,
            &frames,
            toy_windows(),
            topology,
        )?;
        let changes = transitions(&frames, &report.measurements.per_frame, topology);
        let glitches = changes.iter().filter(|c| c.is_glitch()).count();
        let held_out = caption.held_out();
        if held_out {
            held.add(&report, glitches, changes.len());
        } else {
            seen.add(&report, glitches, changes.len());
        }
        let v = &report.verdict;
        let mark = |ok: bool| if ok { "ok " } else { "NO " };
        println!(
            "{i:2} {} colour {} direction {} ({:8}) background {} glitches {glitches:2} {caption}",
            if held_out { "held" } else { "seen" },
            mark(v.color_right),
            mark(v.direction_right),
            report
                .measurements
                .motion
                .as_ref()
                .map_or("no track", |m| m.motion.direction.name()),
            mark(v.background_right),
        );
    }
    let mut total = Tally::default();
    for t in [&seen, &held] {
        total.renders += t.renders;
        total.color += t.color;
        total.direction += t.direction;
        total.background += t.background;
        total.all += t.all;
        total.glitches += t.glitches;
        total.transitions += t.transitions;
    }
    println!("{}", seen.line("seen"));
    println!("{}", held.line("held out"));
    println!("{}", total.line("all"));
    println!("{:.1} s in all", started.elapsed().as_secs_f64());
    Ok(())
}
