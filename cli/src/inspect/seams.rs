//! The seam report of a co-denoised clip: how much the picture and the object change where two
//! windows meet, against how much they change inside the windows.
//!
//! A long clip is denoised as overlapping windows (`longtake_proto::spec::WindowPlan`); a seam is
//! where the two windows' predictions are blended. For every pair of neighbouring windows the
//! report takes the frame-to-frame transitions around the video frames of their shared latent
//! frames (one frame either side) and compares them with the transitions away from every seam:
//! the picture's change (mean absolute difference of the pixels), and with the toy world's object
//! its centroid jump, its colour change and its relative area change. Two comparisons:
//! - **drift**: the mean change across the seam over the mean change inside windows (like with
//!   like: 1 when the seam changes the clip as much as any other stretch does; a blend that
//!   drags the object or its colour raises it);
//! - **jump**: the largest change across the seam over the 95th percentile inside windows (a
//!   single-frame cut, as when clips are stitched by hand).
//!
//! Both compare a seam with the whole inside, so a model that glitches anywhere (a flicker, an
//! object that jumps) shows it at the worst seam too. The **like-for-like** comparison answers
//! whether the seams stand out: each seam's largest change against the largest change of each
//! stretch between seams (the inside of one window), the median seam against the median
//! stretch and the worst against the worst. Seam spans are a few transitions longer than the
//! stretches, which only raises the seams' side.
//!
//! Inside figures are floored (picture 0.1, jump 0.1 px, colour 1, area 0.01) so that a perfectly
//! steady clip does not divide by zero.

use std::ops::Range;

use longtake_proto::spec::frames::{first_video_frame, WAN_TEMPORAL_PACK};
use longtake_proto::spec::{WindowError, WindowPlan, WindowSettings};
use serde::Serialize;

use super::checker::{half_extent, FrameObject};
use super::frame::Frame;
use super::motion::{analyse, ObservedDirection};
use super::segment::Blob;
use super::segment::Topology;
use super::stats::{mean, quantile};
use super::world::distance;

/// How much a clip changes from one frame to the next: one transition's figures, or a median or
/// mean of several. Object figures are `None` where the object was not found in both frames.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Change {
    /// Mean absolute difference of the pixels' channels (0–255).
    pub picture: f64,
    /// The object's centroid move, px.
    pub centroid_jump: Option<f64>,
    /// RGB distance between the object's core colours.
    pub color: Option<f64>,
    /// |area change| / the larger area.
    pub area: Option<f64>,
}

/// One seam: the windows that meet, the video frames around their shared latent frames, and
/// the change across them against the change inside windows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Seam {
    /// The two windows' indices.
    pub windows: [usize; 2],
    /// Video frames whose transitions count for this seam.
    pub frames: Range<usize>,
    /// The mean and the largest of the transitions across the seam, figure by figure.
    pub mean: Change,
    pub largest: Change,
    /// `mean` over the mean inside windows, and `largest` over the 95th percentile inside
    /// windows (picture, centroid jump, colour, area); `None` where a figure is missing.
    pub drift_ratio: [Option<f64>; 4],
    pub jump_ratio: [Option<f64>; 4],
}

/// Every seam of a clip and the change inside its windows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeamReport {
    /// The windows the report assumed (the clip's own frame count cut with these settings).
    pub plan: String,
    /// Over the transitions away from every seam: the mean and the 95th percentile.
    pub inside_mean: Change,
    pub inside_p95: Change,
    pub seams: Vec<Seam>,
    /// The largest ratio of every figure over the seams.
    pub worst_drift_ratio: [Option<f64>; 4],
    pub worst_jump_ratio: [Option<f64>; 4],
    /// What each window's own video frames show (`None`: the object is in fewer than two of
    /// them): where a prompt timeline's direction takes hold, or where a long clip loses it.
    pub window_directions: Vec<Option<ObservedDirection>>,
    /// Each span's largest change, over the seams and over the stretches between them.
    pub seam_spans: Spans,
    pub inside_spans: Spans,
    /// `seam_spans` over `inside_spans`: median against median, worst against worst (picture,
    /// centroid jump, colour, area).
    pub like_for_like_median: [Option<f64>; 4],
    pub like_for_like_worst: [Option<f64>; 4],
    /// Glitches (see [`Change::is_glitch`]) at the seams and inside the windows.
    pub glitches: Glitches,
}

/// How many frame transitions glitch, at the seams and away from them, out of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Glitches {
    pub at_seams: usize,
    pub seam_transitions: usize,
    pub inside: usize,
    pub inside_transitions: usize,
}

impl std::fmt::Display for Glitches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} transitions at seams, {} of {} inside windows",
            self.at_seams, self.seam_transitions, self.inside, self.inside_transitions
        )
    }
}

/// A leap of the object's centroid over this many pixels in one frame: several times the toy
/// world's fastest motion (3 px/frame).
pub const GLITCH_LEAP_PX: f64 = 12.0;
/// A change of the object's core colour over this RGB distance in one frame.
pub const GLITCH_COLOR: f64 = 50.0;
/// A change of the object's area by over this share in one frame.
pub const GLITCH_AREA: f64 = 0.35;

impl Change {
    /// Whether the object leaps, changes colour or area abruptly, or is lost or found, in this
    /// one transition: what a viewer sees as a glitch, wherever it falls.
    pub fn is_glitch(&self) -> bool {
        match (self.centroid_jump, self.color, self.area) {
            (Some(jump), Some(color), Some(area)) => {
                jump > GLITCH_LEAP_PX || color > GLITCH_COLOR || area > GLITCH_AREA
            }
            _ => true,
        }
    }
}

/// The largest change of each of several spans of transitions, summarised: the median span's
/// and the worst span's, figure by figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spans {
    pub count: usize,
    pub median: Change,
    pub worst: Change,
}

impl Spans {
    fn of(largest: &[Change]) -> Self {
        let all: Vec<&Change> = largest.iter().collect();
        Spans {
            count: largest.len(),
            median: summarise(&all, |v| quantile(v, 0.5)),
            worst: summarise(&all, self::largest),
        }
    }
}

impl SeamReport {
    /// The worst ratios over every seam, figure by figure (picture, centroid jump, colour,
    /// area): `drift ×1.93 ×2.08 ×3.47 ×2.78, jump ×2.18 ×2.60 ×4.17 ×2.84`.
    pub fn worst(&self) -> String {
        format!(
            "drift {}, jump {}",
            ratio_list(self.worst_drift_ratio),
            ratio_list(self.worst_jump_ratio)
        )
    }

    /// The like-for-like ratios: `median ×1.08 ×1.16 ×1.43 ×1.20, worst ×0.90 ×0.53 ×1.02 ×1.33`.
    pub fn like_for_like(&self) -> String {
        format!(
            "median {}, worst {}",
            ratio_list(self.like_for_like_median),
            ratio_list(self.like_for_like_worst)
        )
    }

    /// [`Self::window_directions`] as runs of windows: `0–19 right, 20 bouncing, 21–39 left`
    /// (`-` where the object was not found).
    pub fn directions(&self) -> String {
        let name = |d: Option<ObservedDirection>| d.map_or("-", ObservedDirection::name);
        let mut runs: Vec<(usize, usize, &str)> = Vec::new();
        for (i, d) in self.window_directions.iter().enumerate() {
            match runs.last_mut() {
                Some((_, end, what)) if *what == name(*d) => *end = i,
                _ => runs.push((i, i, name(*d))),
            }
        }
        runs.iter()
            .map(|&(start, end, what)| match start == end {
                true => format!("{start} {what}"),
                false => format!("{start}–{end} {what}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The seams of `frames` cut as a job with `settings` would cut them; `per_frame` is the
/// checker's object in every frame. `Ok(None)` for a clip of one window (no seams).
pub fn seam_report(
    frames: &[Frame],
    per_frame: &[FrameObject],
    settings: WindowSettings,
    topology: Topology,
) -> Result<Option<SeamReport>, WindowError> {
    let latent = latent_frames(frames.len());
    let plan = WindowPlan::new(latent, settings)?;
    if plan.is_single_window() || frames.len() < 2 {
        return Ok(None);
    }
    let transitions = transitions(frames, per_frame, topology);
    let pack = WAN_TEMPORAL_PACK as usize;
    let seam_frames: Vec<([usize; 2], Range<usize>)> = plan
        .windows()
        .windows(2)
        .enumerate()
        .map(|(i, pair)| {
            let shared = pair[1].start..pair[0].start + pair[0].len;
            let first = first_video_frame(shared.start, pack).saturating_sub(1);
            let last = (first_video_frame(shared.end, pack) + 1).min(frames.len());
            ([i, i + 1], first..last)
        })
        .collect();
    // transition i (frame i → i + 1) is at a seam when both frames are in its range
    let at_seam = |i: usize| {
        seam_frames
            .iter()
            .any(|(_, r)| r.contains(&i) && r.contains(&(i + 1)))
    };
    let marked: Vec<(bool, &Change)> = transitions
        .iter()
        .enumerate()
        .map(|(i, c)| (at_seam(i), c))
        .collect();
    let changes_where = |seam: bool| -> Vec<&Change> {
        marked
            .iter()
            .filter(|(at, _)| *at == seam)
            .map(|(_, c)| *c)
            .collect()
    };
    let (seam_transitions, inside) = (changes_where(true), changes_where(false));
    // the stretches between seams: runs of consecutive transitions away from every seam
    let inside_spans = Spans::of(
        &marked
            .split(|(at, _)| *at)
            .filter(|run| !run.is_empty())
            .map(|run| summarise(&run.iter().map(|(_, c)| *c).collect::<Vec<_>>(), largest))
            .collect::<Vec<_>>(),
    );
    let glitches = Glitches {
        at_seams: seam_transitions.iter().filter(|c| c.is_glitch()).count(),
        seam_transitions: seam_transitions.len(),
        inside: inside.iter().filter(|c| c.is_glitch()).count(),
        inside_transitions: inside.len(),
    };
    let inside_mean = summarise(&inside, mean);
    let inside_p95 = summarise(&inside, |v| quantile(v, 0.95));
    let seams: Vec<Seam> = seam_frames
        .into_iter()
        .map(|(windows, range)| {
            let across: Vec<&Change> = (range.start..range.end.saturating_sub(1))
                .map(|i| &transitions[i])
                .collect();
            let (mean, largest) = (summarise(&across, mean), summarise(&across, largest));
            Seam {
                windows,
                frames: range,
                drift_ratio: ratios(&mean, &inside_mean),
                jump_ratio: ratios(&largest, &inside_p95),
                mean,
                largest,
            }
        })
        .collect();
    let (width, height) = (frames[0].width(), frames[0].height());
    let window_directions = plan
        .windows()
        .iter()
        .map(|w| {
            let shown = w.video_frames(pack);
            let found: Vec<(usize, &Blob)> = (shown.start..shown.end.min(frames.len()))
                .filter_map(|i| per_frame[i].object().map(|o| (i, o)))
                .collect();
            let track: Vec<(usize, [f64; 2])> =
                found.iter().map(|(i, o)| (*i, o.centroid)).collect();
            let track = topology.unwrap_track(&track, width, height);
            let blobs: Vec<&Blob> = found.iter().map(|(_, o)| *o).collect();
            analyse(&track, half_extent(&blobs), width, height).map(|m| m.direction)
        })
        .collect();
    let seam_spans = Spans::of(&seams.iter().map(|s| s.largest).collect::<Vec<_>>());
    let worst = |ratio: fn(&Seam) -> [Option<f64>; 4]| {
        std::array::from_fn(|k| seams.iter().filter_map(|s| ratio(s)[k]).reduce(f64::max))
    };
    Ok(Some(SeamReport {
        plan: plan.to_string(),
        inside_mean,
        inside_p95,
        worst_drift_ratio: worst(|s| s.drift_ratio),
        worst_jump_ratio: worst(|s| s.jump_ratio),
        seams,
        window_directions,
        like_for_like_median: ratios(&seam_spans.median, &inside_spans.median),
        like_for_like_worst: ratios(&seam_spans.worst, &inside_spans.worst),
        seam_spans,
        inside_spans,
        glitches,
    }))
}

/// Where an extended clip's new frames join the clip it extends: the change across the join
/// against the change inside the clip before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinReport {
    /// The first new frame.
    pub join: usize,
    /// Video frames whose transitions count for the join (one frame either side of it).
    pub frames: Range<usize>,
    /// The largest of the transitions across the join, figure by figure.
    pub largest: Change,
    /// Over the clip's own transitions, away from the join: the 95th percentile and the
    /// largest.
    pub clip_p95: Change,
    pub clip_largest: Change,
    /// `largest` over `clip_p95` and over `clip_largest` (picture, centroid jump, colour,
    /// area); `None` where a figure is missing.
    pub jump_ratio: [Option<f64>; 4],
    pub worst_ratio: [Option<f64>; 4],
}

impl JoinReport {
    /// `×0.91 ×1.20 ×0.80 ×1.05 of the clip's 95th percentile (×0.5 ... of its largest)`.
    pub fn summary(&self) -> String {
        format!(
            "{} of the clip's 95th percentile, {} of its largest change",
            ratio_list(self.jump_ratio),
            ratio_list(self.worst_ratio)
        )
    }
}

/// The join at video frame `join` of a clip (`per_frame`: the checker's object in each frame);
/// `None` when the clip has too few frames before or after it.
pub fn join_report(
    frames: &[Frame],
    per_frame: &[FrameObject],
    join: usize,
    topology: Topology,
) -> Option<JoinReport> {
    if join < 3 || join + 1 >= frames.len() {
        return None;
    }
    let transitions = transitions(frames, per_frame, topology);
    let span = join - 2..join + 2;
    let across: Vec<&Change> = (span.start..span.end - 1)
        .map(|i| &transitions[i])
        .collect();
    let clip: Vec<&Change> = transitions[..span.start].iter().collect();
    let largest_across = summarise(&across, largest);
    let clip_p95 = summarise(&clip, |v| quantile(v, 0.95));
    let clip_largest = summarise(&clip, largest);
    Some(JoinReport {
        join,
        frames: span,
        jump_ratio: ratios(&largest_across, &clip_p95),
        worst_ratio: ratios(&largest_across, &clip_largest),
        largest: largest_across,
        clip_p95,
        clip_largest,
    })
}

/// Latent frames of a clip of `frames` video frames (`4k+1`; a clip of another count is
/// counted as the next `4k+1` would be).
fn latent_frames(frames: usize) -> u32 {
    let frames = frames.max(1) as u32;
    (frames - 1).div_ceil(WAN_TEMPORAL_PACK) + 1
}

/// Every frame-to-frame transition of a clip (`per_frame`: the checker's object in each frame):
/// transition `i` is frame `i` → `i + 1`.
pub fn transitions(frames: &[Frame], per_frame: &[FrameObject], topology: Topology) -> Vec<Change> {
    frames
        .windows(2)
        .zip(per_frame.windows(2))
        .map(|(f, o)| change(&f[0], &f[1], &o[0], &o[1], topology))
        .collect()
}

fn change(a: &Frame, b: &Frame, oa: &FrameObject, ob: &FrameObject, topology: Topology) -> Change {
    let picture = a
        .rgb()
        .iter()
        .zip(b.rgb())
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.rgb().len().max(1) as f64;
    let both = oa.object().zip(ob.object());
    Change {
        picture,
        centroid_jump: both.map(|(p, q)| {
            let dx = topology.delta(p.centroid[0], q.centroid[0], a.width());
            let dy = topology.delta(p.centroid[1], q.centroid[1], a.height());
            dx.hypot(dy)
        }),
        color: both.map(|(p, q)| distance(p.core_rgb, q.core_rgb)),
        area: both.map(|(p, q)| p.area.abs_diff(q.area) as f64 / p.area.max(q.area).max(1) as f64),
    }
}

/// Each figure of `changes` summarised by `how` (mean, largest, a quantile) over the
/// transitions that have it.
fn summarise(changes: &[&Change], how: impl Fn(&[f64]) -> Option<f64>) -> Change {
    let figure = |f: fn(&Change) -> Option<f64>| {
        how(&changes.iter().filter_map(|c| f(c)).collect::<Vec<_>>())
    };
    Change {
        picture: figure(|c| Some(c.picture)).unwrap_or(0.0),
        centroid_jump: figure(|c| c.centroid_jump),
        color: figure(|c| c.color),
        area: figure(|c| c.area),
    }
}

/// `×1.08 ×1.16 ×1.43 ×1.20` (`×-` for a missing figure).
pub fn ratio_list(ratios: [Option<f64>; 4]) -> String {
    ratios
        .map(|v| v.map_or_else(|| "×-".to_string(), |v| format!("×{v:.2}")))
        .join(" ")
}

fn largest(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::max)
}

fn ratios(seam: &Change, within: &Change) -> [Option<f64>; 4] {
    let ratio = |a: Option<f64>, b: Option<f64>, floor: f64| match (a, b) {
        (Some(a), Some(b)) => Some(a / b.max(floor)),
        _ => None,
    };
    [
        ratio(Some(seam.picture), Some(within.picture), 0.1),
        ratio(seam.centroid_jump, within.centroid_jump, 0.1),
        ratio(seam.color, within.color, 1.0),
        ratio(seam.area, within.area, 0.01),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::checker::measure;
    use crate::inspect::synth::Scene;
    use crate::inspect::toy_windows;
    use crate::inspect::world::{Direction, Shape};

    /// A clip continued smoothly joins like any stretch of it; one whose object jumps and
    /// changes colour at the join shows it there.
    #[test]
    fn a_join_is_measured_against_the_clip_before_it() {
        let mut scene = Scene::new([220, 40, 40], [0, 0, 0], Shape::Circle, Direction::Right);
        scene.frames = 49;
        scene.velocity = [0.8, 0.0];
        scene.center_path();
        let smooth = scene.render();
        let report = |frames: &[Frame]| {
            let measured = measure(frames, Topology::Plane).unwrap();
            join_report(frames, &measured.per_frame, 33, Topology::Plane).unwrap()
        };
        let even = report(&smooth);
        assert_eq!(even.frames, 31..35);
        assert!(
            even.jump_ratio.iter().flatten().all(|&r| r < 2.0),
            "{}",
            even.summary()
        );
        let mut cut = smooth.clone();
        let other = Scene {
            start: [scene.start[0] - 20.0, scene.start[1] + 16.0],
            color: [40, 220, 40],
            ..scene.clone()
        }
        .render();
        cut[33..].clone_from_slice(&other[33..]);
        let jumped = report(&cut);
        let [_, centroid, color, _] = jumped.jump_ratio;
        assert!(
            centroid.unwrap() > 2.0 && color.unwrap() > 2.0,
            "{}",
            jumped.summary()
        );
    }

    /// The seam report of a clip of several toy windows on the plane.    /// The seam report of a clip of several toy windows on the plane.
    fn report_of(frames: &[Frame]) -> SeamReport {
        let measured = measure(frames, Topology::Plane).unwrap();
        seam_report(frames, &measured.per_frame, toy_windows(), Topology::Plane)
            .unwrap()
            .unwrap()
    }

    /// A bouncing square over 49 frames (13 latent frames: 3 toy windows).
    fn long_scene() -> Scene {
        let mut scene = Scene::new(
            [240, 220, 40],
            [0, 0, 0],
            Shape::Square,
            Direction::Bouncing,
        );
        scene.frames = 49;
        scene
    }

    #[test]
    fn a_seamless_clip_changes_at_its_seams_as_inside_its_windows() {
        let frames = long_scene().render();
        let measured = measure(&frames, Topology::Plane).unwrap();
        let report = seam_report(&frames, &measured.per_frame, toy_windows(), Topology::Plane)
            .unwrap()
            .expect("three windows, two seams");
        assert_eq!(report.seams.len(), 2);
        assert_eq!(report.seams[0].windows, [0, 1]);
        for seam in &report.seams {
            for ratio in [seam.drift_ratio, seam.jump_ratio] {
                let [picture, jump, ..] = ratio;
                assert!(picture.unwrap() < 1.5 && jump.unwrap() < 1.5, "{seam:?}");
            }
        }
    }

    #[test]
    fn a_jump_or_a_colour_shift_at_a_seam_stands_out() {
        let scene = long_scene();
        let clean = scene.render();
        let seam = report_of(&clean).seams[1].frames.clone();
        let cut = (seam.start + seam.end) / 2;
        // from the seam on, the object is 8 px further down its path (where it meets no wall
        // near the cut) and drawn in another colour
        let mut shifted = scene.clone();
        shifted.start = [scene.start[0], scene.start[1] + 8.0];
        shifted.color = [250, 170, 40];
        let mut frames = clean[..cut].to_vec();
        frames.extend_from_slice(&shifted.render()[cut..]);
        let report = report_of(&frames);
        let [_, jump, color, _] = report.seams[1].jump_ratio;
        assert!(jump.unwrap() > 2.0, "{:?}", report.seams[1]);
        assert!(color.unwrap() > 2.0, "{:?}", report.seams[1]);
        let [_, first_jump, ..] = report.seams[0].jump_ratio;
        assert!(
            first_jump.unwrap() < 1.5,
            "the other seam is clean: {:?}",
            report.seams[0]
        );
        // like for like too: the cut seam's jump and colour change outdo every stretch's
        let [_, jump, color, _] = report.like_for_like_worst;
        assert!(jump.unwrap() > 2.0 && color.unwrap() > 2.0, "{report:?}");
    }

    /// An object that leaps for one frame inside a window (a model's own glitch, away from any
    /// seam) raises the worst seam against the inside's 95th percentile only through the
    /// inside; like for like, the clean seams stay below the stretch that holds the glitch.
    #[test]
    fn a_glitch_inside_a_window_is_not_laid_on_the_seams() {
        let scene = long_scene();
        let clean = scene.render();
        let seams = report_of(&clean).seams;
        // the middle of the stretch between the two seams
        let glitch = (seams[0].frames.end + seams[1].frames.start) / 2;
        assert!(seams[0].frames.end < glitch && glitch + 1 < seams[1].frames.start);
        let mut leaped = scene.clone();
        leaped.start = [scene.start[0] + 12.0, scene.start[1] + 12.0];
        let mut frames = clean.clone();
        frames[glitch] = leaped.render()[glitch].clone();
        let report = report_of(&frames);
        let [_, jump, ..] = report.like_for_like_worst;
        assert!(jump.unwrap() < 0.5, "{report:?}");
        assert_eq!(
            report.inside_spans.count, 3,
            "before, between and after the seams"
        );
        assert_eq!(report.seam_spans.count, 2);
        // the leap there and back: two glitching transitions, both inside
        let clean_glitches = report_of(&clean).glitches;
        assert_eq!((clean_glitches.at_seams, clean_glitches.inside), (0, 0));
        assert_eq!((report.glitches.at_seams, report.glitches.inside), (0, 2));
        assert_eq!(
            report.glitches.seam_transitions + report.glitches.inside_transitions,
            frames.len() - 1
        );
    }

    #[test]
    fn each_window_reports_the_motion_its_frames_show() {
        // right at 1 px/frame until it meets the right wall at frame 25, then back left: the
        // three windows of 49 frames (video frames 0–16, 13–32, 29–48) see right, the
        // reflection, left
        let mut right = Scene::new([240, 220, 40], [0, 0, 0], Shape::Square, Direction::Right);
        (right.start, right.velocity, right.frames) = ([29.0, 32.0], [1.0, 0.0], 49);
        let mut left = right.clone();
        (left.start, left.velocity) = ([79.0, 32.0], [-1.0, 0.0]);
        let (there, back) = (right.render(), left.render());
        let frames: Vec<Frame> = (0..49)
            .map(|i| if i < 25 { &there[i] } else { &back[i] }.clone())
            .collect();
        let measured = measure(&frames, Topology::Plane).unwrap();
        let report = seam_report(&frames, &measured.per_frame, toy_windows(), Topology::Plane)
            .unwrap()
            .unwrap();
        use ObservedDirection::*;
        assert_eq!(
            report.window_directions,
            vec![Some(Right), Some(Bouncing), Some(Left)]
        );
        assert_eq!(report.directions(), "0 right, 1 bouncing, 2 left");
    }

    #[test]
    fn a_clip_of_one_window_has_no_seams() {
        let frames =
            Scene::new([240, 220, 40], [0, 0, 0], Shape::Square, Direction::Right).render();
        let measured = measure(&frames, Topology::Plane).unwrap();
        assert_eq!(
            seam_report(&frames, &measured.per_frame, toy_windows(), Topology::Plane),
            Ok(None)
        );
    }
}
