//! The spec flags shared by `render` and `submit`, turned into a `longtake_proto::RenderSpec`.
//!
//! Only what needs the command line is checked here (frame count from `--seconds`, the shape of
//! `--size` and `--layout`); the coordinator validates the rest against its limits and the model,
//! so one set of rules holds for every client.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use longtake_proto::spec::frames::{self, WAN_TEMPORAL_PACK};
use longtake_proto::spec::{
    Fusion, Layout, NoiseSchedule, SchedulerKind, DEFAULT_MODEL, WAN21_DEFAULT_FPS,
};
use longtake_proto::{OutputFormat, PromptCue, RenderSpec};

#[derive(Args, Clone, Debug)]
pub struct SpecArgs {
    /// What the clip shows.
    #[arg(long)]
    pub prompt: String,
    /// What the clip must not show (classifier-free guidance pushes away from it).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A model the workers serve: `toy` (built in: a small Wan2.1 trained by longtake on
    /// procedural videos), `tiny` (built in: seeded random weights, abstract motion, for tests)
    /// or a name a worker was started with; for the embedded farm also a checkpoint directory in
    /// the diffusers layout (e.g. Wan2.1-T2V-1.3B-Diffusers).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Number of frames; Wan makes 4k+1 frames, other counts are rounded up [default: the
    /// model's: toy 17, Wan2.1 81].
    #[arg(long, conflicts_with = "seconds")]
    pub frames: Option<u64>,
    /// Clip length in seconds (frames = seconds × fps, rounded up to 4k+1; fps 16 unless
    /// --fps is given).
    #[arg(long, allow_negative_numbers = true)]
    pub seconds: Option<f64>,
    /// Frames per second of the output [default: the model's: 16 for toy and Wan2.1].
    #[arg(long)]
    pub fps: Option<u32>,
    /// Frame size WIDTHxHEIGHT, multiples of 16 [default: the model's: toy 64x64, tiny
    /// 256x256, a Wan2.1 checkpoint 832x480].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,
    /// Denoising steps [default: the model's: toy 40, tiny 10, a Wan2.1 checkpoint 50].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Flow shift of the scheduler [default: the checkpoint's].
    #[arg(long)]
    pub shift: Option<f64>,
    /// Seed of the initial noise; the same seed and spec give the same frames.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampler: unipc or euler [default: the checkpoint's, UniPC for Wan2.1].
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Output format [default: mp4; for `render`, from --out: .mp4 → mp4, a directory → png].
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Parallel layout of the job's workers, e.g. `cfg=2,tp=1,ulysses=2,ring=1` (cfg × tp ×
    /// ulysses × ring workers; missing keys are 1). Absent: one worker.
    #[arg(long)]
    pub layout: Option<String>,
    /// A clip longer than the model's native length (toy 17 frames, Wan2.1 81) is denoised as
    /// overlapping windows; this many worker groups share them, each with --layout [default: 1].
    #[arg(long)]
    pub groups: Option<u32>,
    /// Window length in latent frames (4 video frames each after the first) [default: the
    /// model's native length: toy 5, Wan2.1 21].
    #[arg(long)]
    pub window: Option<u32>,
    /// The least number of latent frames neighbouring windows share [default: a third of the
    /// window].
    #[arg(long)]
    pub overlap: Option<u32>,
    /// How predictions on shared frames are weighted: linear or cosine [default: linear].
    #[arg(long, value_parser = parse_fusion)]
    pub fusion: Option<Fusion>,
    /// The prompt from a time on, as SECONDS=TEXT (`30=a red circle moving left`; the time may
    /// also be `30s`, `30.5` or `1:30`); repeat for more changes. --prompt holds until the
    /// first; each window of a long clip takes the prompt in force at its centre.
    #[arg(long = "prompt-at", value_name = "SECONDS=TEXT", value_parser = parse_cue)]
    pub prompt_at: Vec<PromptCue>,
    /// Where a long clip's initial noise comes from: independent (every latent frame its own)
    /// or rescheduled (FreeNoise: later windows start from the first window's noise, shuffled)
    /// [default: rescheduled].
    #[arg(long, value_parser = parse_noise)]
    pub noise: Option<NoiseSchedule>,
}

/// `--noise`, read by the job spec's own parser.
fn parse_noise(text: &str) -> Result<NoiseSchedule, String> {
    text.parse()
        .map_err(|e: longtake_proto::spec::UnknownNoise| e.to_string())
}

/// `--prompt-at`, read by the job spec's own parser.
fn parse_cue(text: &str) -> Result<PromptCue, String> {
    longtake_proto::spec::timeline::parse_cue(text)
}

/// `--fusion`, read by the job spec's own parser.
fn parse_fusion(text: &str) -> Result<Fusion, String> {
    text.parse()
        .map_err(|e: longtake_proto::spec::UnknownFusion| e.to_string())
}

/// `--scheduler`, read by the job spec's own parser of sampler names.
fn parse_scheduler(text: &str) -> Result<SchedulerKind, String> {
    text.parse()
        .map_err(|e: longtake_proto::spec::UnknownScheduler| e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Mp4,
    Png,
}

impl FormatArg {
    pub fn proto(self) -> OutputFormat {
        match self {
            FormatArg::Mp4 => OutputFormat::Mp4,
            FormatArg::Png => OutputFormat::Png,
        }
    }
}

/// A spec ready to submit, and what the user should be told about how it was derived.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub spec: RenderSpec,
    /// How many workers the job needs: the layout's world size times the groups.
    pub ranks: usize,
    /// e.g. the frame count rounded up to 4k+1.
    pub notes: Vec<String>,
}

impl SpecArgs {
    /// The `--prompt-at` cues in time order, as given in any order.
    fn timeline(&self) -> Vec<PromptCue> {
        let mut cues = self.prompt_at.clone();
        cues.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
        cues
    }

    /// The spec in `format` (the caller resolves it: `render` from `--out`, `submit` from
    /// `--format` alone). Zero width/height/steps/frames/fps take the model's defaults (which
    /// only the farm knows: its workers advertise them).
    pub fn build(&self, format: OutputFormat) -> Result<Built> {
        if self.fps == Some(0) {
            bail!("--fps must be at least 1");
        }
        // `--seconds` needs a rate before the model is known: --fps, else Wan2.1's (and the toy
        // model's) 16, which then goes into the spec so the clip lasts what was asked.
        let fps = match (self.seconds, self.fps) {
            (Some(_), None) => Some(WAN21_DEFAULT_FPS),
            (_, fps) => fps,
        };
        let requested = match (self.frames, self.seconds) {
            (Some(0), _) => bail!("--frames must be at least 1"),
            (Some(n), _) => Some(
                u32::try_from(n)
                    .with_context(|| format!("--frames {n} is far beyond any limit"))?,
            ),
            (None, Some(s)) if s > 0.0 && s.is_finite() => {
                Some(frames::for_duration(s, fps.unwrap_or(WAN21_DEFAULT_FPS)))
            }
            (None, Some(s)) => bail!("--seconds must be a positive number; got {s}"),
            (None, None) => None,
        };
        let mut notes = Vec::new();
        let frames = match requested {
            Some(requested) => {
                let frames = frames::round_up(requested, WAN_TEMPORAL_PACK);
                if frames != requested {
                    notes.push(format!(
                        "note: Wan renders 4k+1 frames; {requested} frames rounded up to {frames}"
                    ));
                }
                frames
            }
            None => 0,
        };
        let layout = self.layout()?;
        let (width, height) = self.size.unwrap_or((0, 0));
        let spec = RenderSpec {
            input: None,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            model: self.model.clone(),
            frames,
            width,
            height,
            steps: self.steps.unwrap_or(0),
            guidance_scale: self.guidance,
            shift: self.shift,
            scheduler: self
                .scheduler
                .map(|s| s.name().to_string())
                .unwrap_or_default(),
            seed: self.seed,
            fps: fps.unwrap_or(0),
            format: format as i32,
            layout: self
                .layout
                .as_ref()
                .map(|_| layout.to_string())
                .unwrap_or_default(),
            groups: self.groups.unwrap_or(1),
            window_latent_frames: self.window.unwrap_or(0),
            overlap_latent_frames: self.overlap,
            fusion: self
                .fusion
                .map(|f| f.name().to_string())
                .unwrap_or_default(),
            prompt_timeline: self.timeline(),
            noise: self.noise.map(|n| n.name().to_string()).unwrap_or_default(),
        };
        if self.groups == Some(0) {
            bail!("--groups must be at least 1");
        }
        if self.window == Some(0) {
            bail!("--window must be at least 1 latent frame");
        }
        if let Some(pair) = spec
            .prompt_timeline
            .windows(2)
            .find(|p| p[0].at_seconds == p[1].at_seconds)
        {
            bail!(
                "--prompt-at: two prompts at {} s ({:?} and {:?}); give each time once",
                pair[0].at_seconds,
                pair[0].prompt,
                pair[1].prompt
            );
        }
        Ok(Built {
            spec,
            ranks: layout.world_size() * self.groups.unwrap_or(1) as usize,
            notes,
        })
    }

    /// The parsed `--layout` (one worker without it). Whether the model's heads fit it is the
    /// coordinator's check.
    pub fn layout(&self) -> Result<Layout> {
        match &self.layout {
            None => Ok(Layout::SINGLE),
            Some(text) => text.parse().with_context(|| format!("--layout {text}")),
        }
    }
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        spec: SpecArgs,
    }

    fn args(extra: &[&str]) -> SpecArgs {
        let mut argv = vec!["x", "--prompt", "a wolf"];
        argv.extend_from_slice(extra);
        Cmd::try_parse_from(argv).unwrap().spec
    }

    #[test]
    fn the_help_states_the_built_in_toy_models_own_defaults() {
        use clap::CommandFactory;
        let index = longtake_worker::model::builtin::TOY_FILES
            .iter()
            .find(|(name, _)| *name == "model_index.json")
            .expect("the toy model ships its model_index.json")
            .1;
        let index: serde_json::Value = serde_json::from_slice(index).unwrap();
        let stated = &index["_longtake"];
        let number = |key: &str| stated[key].as_u64().unwrap_or_else(|| panic!("{key}"));
        let mut cmd = Cmd::command();
        let help = cmd
            .render_long_help()
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for claim in [
            format!("toy {}", number("default_steps")),
            format!("toy {}", number("default_frames")),
            format!(
                "toy {}x{}",
                number("default_width"),
                number("default_height")
            ),
            format!("{} for toy", number("default_fps")),
        ] {
            assert!(help.contains(&claim), "the help does not say {claim:?}");
        }
    }

    #[test]
    fn seconds_times_fps_rounds_up_to_4k_plus_1_and_says_so() {
        let built = args(&["--seconds", "5", "--fps", "16"])
            .build(OutputFormat::Mp4)
            .unwrap();
        assert_eq!(built.spec.frames, 81);
        assert_eq!(built.spec.fps, 16);
        assert_eq!(built.notes.len(), 1);
        assert!(built.notes[0].contains("80 frames rounded up to 81"));
        let exact = args(&["--frames", "9"]).build(OutputFormat::Mp4).unwrap();
        assert_eq!(exact.spec.frames, 9);
        assert!(exact.notes.is_empty());
        // Without --fps, seconds are counted at 16 fps and the spec says so.
        let default_rate = args(&["--seconds", "2"]).build(OutputFormat::Mp4).unwrap();
        assert_eq!((default_rate.spec.frames, default_rate.spec.fps), (33, 16));
        let other_rate = args(&["--seconds", "2", "--fps", "24"])
            .build(OutputFormat::Mp4)
            .unwrap();
        assert_eq!((other_rate.spec.frames, other_rate.spec.fps), (49, 24));
    }

    #[test]
    fn prompt_at_cues_are_sorted_into_the_spec_and_a_time_given_twice_is_refused() {
        let built = args(&[
            "--seconds",
            "60",
            "--prompt-at",
            "45=a wolf runs left",
            "--prompt-at",
            "0:30=a wolf runs right",
        ])
        .build(OutputFormat::Mp4)
        .unwrap();
        let cues: Vec<(f64, &str)> = built
            .spec
            .prompt_timeline
            .iter()
            .map(|c| (c.at_seconds, c.prompt.as_str()))
            .collect();
        assert_eq!(
            cues,
            [(30.0, "a wolf runs right"), (45.0, "a wolf runs left")]
        );
        let twice = args(&["--prompt-at", "3=a", "--prompt-at", "3s=b"])
            .build(OutputFormat::Mp4)
            .unwrap_err()
            .to_string();
        assert!(twice.contains("two prompts at 3 s"), "{twice}");
        let mut argv = vec!["x", "--prompt", "a wolf", "--prompt-at", "later"];
        let bad = Cmd::try_parse_from(argv.drain(..))
            .err()
            .unwrap()
            .to_string();
        assert!(bad.contains("is not SECONDS=TEXT"), "{bad}");
    }

    #[test]
    fn flags_map_onto_the_spec_and_absent_ones_are_zero() {
        let built = args(&[
            "--size",
            "64x48",
            "--steps",
            "3",
            "--seed",
            "7",
            "--scheduler",
            "euler",
            "--layout",
            "cfg=2,ulysses=2",
            "--model",
            "wan-1.3b",
        ])
        .build(OutputFormat::Png)
        .unwrap();
        let s = &built.spec;
        assert_eq!((s.width, s.height, s.steps, s.seed), (64, 48, 3, 7));
        assert_eq!(s.scheduler, "euler");
        assert_eq!(s.model, "wan-1.3b");
        assert_eq!(s.format, OutputFormat::Png as i32);
        assert_eq!(s.layout, "cfg=2,tp=1,ulysses=2,ring=1");
        assert_eq!(built.ranks, 4);
        let defaults = args(&[]).build(OutputFormat::Mp4).unwrap().spec;
        assert_eq!((defaults.width, defaults.height, defaults.steps), (0, 0, 0));
        // The clip is the model's too: only the farm knows it.
        assert_eq!((defaults.frames, defaults.fps), (0, 0));
        assert_eq!(defaults.guidance_scale, 5.0);
        assert_eq!(defaults.shift, None);
        assert_eq!(defaults.model, "toy");
        let rate = args(&["--fps", "24"])
            .build(OutputFormat::Mp4)
            .unwrap()
            .spec;
        assert_eq!((rate.frames, rate.fps), (0, 24));
    }

    #[test]
    fn bad_values_name_their_flag() {
        let err = args(&["--layout", "tp=two"])
            .build(OutputFormat::Mp4)
            .unwrap_err();
        assert!(format!("{err:#}").contains("--layout tp=two"), "{err:#}");
        let err = args(&["--fps", "0"]).build(OutputFormat::Mp4).unwrap_err();
        assert!(err.to_string().contains("--fps"));
        let err = args(&["--seconds", "-1"])
            .build(OutputFormat::Mp4)
            .unwrap_err();
        assert!(err.to_string().contains("--seconds"));
        let mut argv = vec!["x", "--prompt", "p", "--size", "64by48"];
        assert!(Cmd::try_parse_from(&argv).is_err());
        argv[4] = "64xtall";
        assert!(Cmd::try_parse_from(&argv).is_err());
    }
}
