//! A prompt timeline: a long clip's prompt changing at given times, and the prompt each window
//! of its [`WindowPlan`] is conditioned on.
//!
//! A spec's `prompt` holds from the clip's start; each cue's prompt holds from its time to the
//! next cue. A window takes the prompt in force at its centre frame, so a change of prompt lands
//! at a window boundary and the overlap between the two windows blends them (their predictions
//! are fused there with the plan's weights, as for any two windows).
//!
//! Cues are the wire's [`PromptCue`]s, in seconds (what a person means by "at 30 s");
//! [`PromptTimeline`] is the same timeline in video frames, once the clip's frame rate is known.

use std::fmt;

use super::windows::WindowPlan;
use crate::PromptCue;

/// What is wrong with a cue of a timeline. `index` counts cues from 0, as they were given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TimelineError {
    #[error("cue {index}: {at} is not a time in seconds ≥ 0")]
    BadTime { index: usize, at: f64 },
    #[error("cue {index} at {at} s has an empty prompt")]
    EmptyPrompt { index: usize, at: f64 },
    #[error(
        "cue {index} at {at} s does not come after cue {previous} at {previous_at} s: give the \
         cues in time order, one per time"
    )]
    OutOfOrder {
        index: usize,
        at: f64,
        previous: usize,
        previous_at: f64,
    },
    #[error(
        "cue {index} at {at} s is past the clip's last frame at {end:.2} s ({frames} frames at \
         {fps} fps): make the clip longer or the cue earlier"
    )]
    PastEnd {
        index: usize,
        at: f64,
        end: f64,
        frames: u32,
        fps: u32,
    },
    #[error("{count} cues is over this farm's limit of {max}")]
    TooMany { count: usize, max: u32 },
    #[error("cue {index} at {at} s: {chars} characters is over this farm's limit of {max}")]
    PromptTooLong {
        index: usize,
        at: f64,
        chars: usize,
        max: u32,
    },
}

/// The rules a list of cues follows whatever the clip: times finite and ≥ 0, strictly
/// increasing, prompts not blank.
pub fn check_cues(cues: &[PromptCue]) -> Result<(), TimelineError> {
    for (index, cue) in cues.iter().enumerate() {
        let at = cue.at_seconds;
        if !at.is_finite() || at < 0.0 {
            return Err(TimelineError::BadTime { index, at });
        }
        if cue.prompt.trim().is_empty() {
            return Err(TimelineError::EmptyPrompt { index, at });
        }
        if index > 0 && at <= cues[index - 1].at_seconds {
            return Err(TimelineError::OutOfOrder {
                index,
                at,
                previous: index - 1,
                previous_at: cues[index - 1].at_seconds,
            });
        }
    }
    Ok(())
}

/// The cues fit a clip of `frames` frames at `fps`: none after its last frame.
pub fn check_cues_fit(cues: &[PromptCue], frames: u32, fps: u32) -> Result<(), TimelineError> {
    let end = frames.saturating_sub(1) as f64 / fps.max(1) as f64;
    match cues.iter().position(|c| c.at_seconds > end) {
        Some(index) => Err(TimelineError::PastEnd {
            index,
            at: cues[index].at_seconds,
            end,
            frames,
            fps,
        }),
        None => Ok(()),
    }
}

/// Parses `SECONDS=TEXT` (the CLI's `--prompt-at`): `30=a red circle moving left`; the time
/// may also be written `30s`, `30.5` or `1:30` (minutes and seconds).
pub fn parse_cue(text: &str) -> Result<PromptCue, String> {
    let Some((time, prompt)) = text.split_once('=') else {
        return Err(format!(
            "{text:?} is not SECONDS=TEXT (e.g. \"30=a red circle moving left\")"
        ));
    };
    let time = time.trim();
    let number = |s: &str| -> Option<f64> { s.parse::<f64>().ok().filter(|v| v.is_finite()) };
    let at = match time.split_once(':') {
        Some((minutes, seconds)) => {
            let minutes = minutes.parse::<u32>().ok();
            let seconds = number(seconds).filter(|s| (0.0..60.0).contains(s));
            minutes.zip(seconds).map(|(m, s)| f64::from(m) * 60.0 + s)
        }
        None => number(time.strip_suffix('s').unwrap_or(time)),
    };
    let at = at.filter(|&at| at >= 0.0).ok_or_else(|| {
        format!("{time:?} is not a time: write seconds (30, 30.5, 30s) or minutes:seconds (1:30)")
    })?;
    let prompt = prompt.trim();
    if prompt.is_empty() {
        return Err(format!("the cue at {at} s has no prompt after '='"));
    }
    Ok(PromptCue {
        at_seconds: at,
        prompt: prompt.to_string(),
    })
}

/// A clip's prompts by video frame: the spec's prompt from frame 0, then each cue's from its
/// first frame. Built from checked cues by [`PromptTimeline::new`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptTimeline {
    /// `(first video frame, prompt)`, frames ascending.
    cues: Vec<(usize, String)>,
}

impl PromptTimeline {
    /// The cues (checked by [`check_cues`]) of a clip at `fps`: a cue takes over at the frame
    /// nearest its time.
    pub fn new(cues: &[PromptCue], fps: u32) -> Self {
        Self {
            cues: cues
                .iter()
                .map(|c| {
                    (
                        (c.at_seconds * f64::from(fps)).round() as usize,
                        c.prompt.clone(),
                    )
                })
                .collect(),
        }
    }

    /// The same cues for a render whose first `frames` frames come before time 0: an extension
    /// counts its cues from the clip's end, after the clip's frames it holds.
    pub fn after(mut self, frames: usize) -> Self {
        for (first, _) in &mut self.cues {
            *first += frames;
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.cues.is_empty()
    }

    /// The cues' prompts, in order: prompt `k` of [`Self::prompt_index_at`] is `cues()[k - 1]`.
    pub fn prompts(&self) -> impl Iterator<Item = &str> {
        self.cues.iter().map(|(_, p)| p.as_str())
    }

    /// Which prompt is in force at video frame `frame`: 0 the spec's, `k` the `k`-th cue's.
    pub fn prompt_index_at(&self, frame: f64) -> usize {
        self.cues
            .iter()
            .take_while(|(first, _)| *first as f64 <= frame)
            .count()
    }

    /// Per window of `plan`, the prompt in force at its centre video frame (`pack` video frames
    /// per latent frame after the first), as [`Self::prompt_index_at`] numbers them.
    pub fn window_prompts(&self, plan: &WindowPlan, pack: usize) -> Vec<usize> {
        plan.windows()
            .iter()
            .map(|w| {
                let frames = w.video_frames(pack);
                let centre = (frames.start + frames.end - 1) as f64 / 2.0;
                self.prompt_index_at(centre)
            })
            .collect()
    }
}

impl PromptTimeline {
    /// Which windows of `plan` take which prompt, in runs: `windows 0–19: "a red circle moving
    /// right"; windows 20–39: "a red circle moving left"` (`base`: the spec's prompt).
    pub fn summary(&self, base: &str, plan: &WindowPlan, pack: usize) -> String {
        let chosen = self.window_prompts(plan, pack);
        let prompt = |k: usize| {
            if k == 0 {
                base
            } else {
                self.cues[k - 1].1.as_str()
            }
        };
        let mut runs: Vec<(usize, usize, usize)> = Vec::new(); // (first, last, prompt)
        for (i, &k) in chosen.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if run.2 == k => run.1 = i,
                _ => runs.push((i, i, k)),
            }
        }
        runs.iter()
            .map(|&(first, last, k)| {
                let windows = if first == last {
                    format!("window {first}")
                } else {
                    format!("windows {first}–{last}")
                };
                format!("{windows}: {:?}", prompt(k))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for PromptCue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.at_seconds, self.prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::windows::{Fusion, WindowSettings};

    fn cue(at: f64, prompt: &str) -> PromptCue {
        PromptCue {
            at_seconds: at,
            prompt: prompt.into(),
        }
    }

    #[test]
    fn cues_parse_from_seconds_or_minutes_and_bad_ones_say_why() {
        assert_eq!(
            parse_cue("30=a red circle").unwrap(),
            cue(30.0, "a red circle")
        );
        assert_eq!(parse_cue("2.5s = left ").unwrap(), cue(2.5, "left"));
        assert_eq!(parse_cue("1:30=x=y").unwrap(), cue(90.0, "x=y"));
        for (bad, says) in [
            ("30 a red circle", "is not SECONDS=TEXT"),
            ("soon=x", "is not a time"),
            ("-3=x", "is not a time"),
            ("1:75=x", "is not a time"),
            ("inf=x", "is not a time"),
            ("4=  ", "has no prompt"),
        ] {
            let err = parse_cue(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cues_must_be_ordered_timed_and_worded_and_inside_the_clip() {
        assert_eq!(check_cues(&[cue(0.0, "a"), cue(30.0, "b")]), Ok(()));
        assert!(matches!(
            check_cues(&[cue(30.0, "a"), cue(30.0, "b")]),
            Err(TimelineError::OutOfOrder { index: 1, .. })
        ));
        assert!(matches!(
            check_cues(&[cue(f64::NAN, "a")]),
            Err(TimelineError::BadTime { index: 0, .. })
        ));
        assert!(matches!(
            check_cues(&[cue(1.0, " ")]),
            Err(TimelineError::EmptyPrompt { index: 0, .. })
        ));
        // 961 frames at 16 fps: the last frame is at 60 s exactly
        assert_eq!(check_cues_fit(&[cue(60.0, "a")], 961, 16), Ok(()));
        let err = check_cues_fit(&[cue(10.0, "a"), cue(60.5, "b")], 961, 16).unwrap_err();
        assert!(matches!(err, TimelineError::PastEnd { index: 1, .. }));
        assert!(err.to_string().contains("last frame at 60.00 s"), "{err}");
    }

    #[test]
    fn each_window_takes_the_prompt_at_its_centre() {
        // 241 latent frames in windows of 9 overlapping by 3: 40 windows
        let plan = WindowPlan::new(
            241,
            WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion: Fusion::Linear,
                groups: 1,
                noise: Default::default(),
            },
        )
        .unwrap();
        let timeline = PromptTimeline::new(&[cue(30.0, "left"), cue(45.0, "up")], 16);
        let prompts = timeline.window_prompts(&plan, 4);
        assert_eq!(prompts.len(), plan.windows().len());
        for (w, &p) in plan.windows().iter().zip(&prompts) {
            let frames = w.video_frames(4);
            let centre_s = (frames.start + frames.end - 1) as f64 / 2.0 / 16.0;
            let expected = if centre_s >= 45.0 {
                2
            } else if centre_s >= 30.0 {
                1
            } else {
                0
            };
            assert_eq!(p, expected, "window {w:?} centred at {centre_s} s");
        }
        // prompts never go back, and every cue is used
        assert!(prompts.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(prompts.first(), Some(&0));
        assert_eq!(prompts.last(), Some(&2));
        assert_eq!(timeline.prompts().collect::<Vec<_>>(), ["left", "up"]);
        let first_left = prompts.iter().position(|&p| p == 1).unwrap();
        let first_up = prompts.iter().position(|&p| p == 2).unwrap();
        assert_eq!(
            timeline.summary("right", &plan, 4),
            format!(
                "windows 0–{}: \"right\"; windows {first_left}–{}: \"left\"; windows {first_up}–{}: \"up\"",
                first_left - 1,
                first_up - 1,
                prompts.len() - 1
            )
        );
        assert!(PromptTimeline::default()
            .window_prompts(&plan, 4)
            .iter()
            .all(|&p| p == 0));
    }
}
