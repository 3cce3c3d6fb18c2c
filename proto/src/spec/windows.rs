//! The windows of a long clip. A model is trained on clips of one length (Wan2.1: 21 latent
//! frames, 5 s); a longer clip is denoised as overlapping windows of that length, each predicting
//! the flow of its own frames, the predictions on shared frames fused with fixed weights before
//! every scheduler step (co-denoising), so that a shared frame holds one value. Windows go in
//! contiguous runs to worker groups, each group running its run with the job's layout.
//!
//! [`WindowPlan`] is that cut, computed from the clip's latent frame count and a spec's
//! [`WindowSettings`]; it is a pure function of them, so every rank and the coordinator compute
//! the same plan, and the fusion weights (f32, normalised per frame) are the same bits
//! everywhere.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::spec::frames::first_video_frame;

/// How the predictions of two windows are weighted across the frames they share: each window's
/// weight rises over its overlap with the window before and falls over its overlap with the one
/// after, then the weights on each frame are normalised to sum to 1.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Weights linear in the position across the overlap.
    #[default]
    Linear,
    /// A raised-cosine ramp: flat at both ends of the overlap, so each window keeps more of its
    /// own prediction near the edges of the shared frames.
    Cosine,
}

/// A fusion name that is not one of [`Fusion::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not linear or cosine")]
pub struct UnknownFusion(pub String);

impl Fusion {
    pub const ALL: [Fusion; 2] = [Fusion::Linear, Fusion::Cosine];

    /// The name a spec and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            Fusion::Linear => "linear",
            Fusion::Cosine => "cosine",
        }
    }

    /// A spec's optional fusion field: empty means the default.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, UnknownFusion> {
        match text.trim() {
            "" => Ok(None),
            name => name.parse().map(Some),
        }
    }

    /// The ramp's value at `x` in (0, 1), rising from 0 to 1.
    fn ramp(self, x: f64) -> f64 {
        match self {
            Fusion::Linear => x,
            Fusion::Cosine => 0.5 - 0.5 * (std::f64::consts::PI * x).cos(),
        }
    }
}

impl FromStr for Fusion {
    type Err = UnknownFusion;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == text)
            .ok_or_else(|| UnknownFusion(text.to_string()))
    }
}

impl fmt::Display for Fusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a long clip's initial noise comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSchedule {
    /// Every latent frame its own noise (a pure function of the seed and the frame).
    Independent,
    /// FreeNoise-style (Qiu et al., 2023): the first window's frames their own noise, each later
    /// stretch of a window's stride a shuffle of the first window's noise frames, so every
    /// window starts from the first window's noise in another order. The default: with the toy
    /// model of the wrapping world its one-minute clips glitch less and join better at the seams
    /// (README, "Noise").
    #[default]
    Rescheduled,
}

/// A noise name that is not one of [`NoiseSchedule::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not independent or rescheduled")]
pub struct UnknownNoise(pub String);

impl NoiseSchedule {
    pub const ALL: [NoiseSchedule; 2] = [NoiseSchedule::Independent, NoiseSchedule::Rescheduled];

    /// The name a spec and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            NoiseSchedule::Independent => "independent",
            NoiseSchedule::Rescheduled => "rescheduled",
        }
    }

    /// A spec's optional noise field: empty means the default.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, UnknownNoise> {
        match text.trim() {
            "" => Ok(None),
            name => name.parse().map(Some),
        }
    }
}

impl FromStr for NoiseSchedule {
    type Err = UnknownNoise;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|n| n.name() == text)
            .ok_or_else(|| UnknownNoise(text.to_string()))
    }
}

impl fmt::Display for NoiseSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a job cuts its clip: the window length and the least overlap (latent frames), the
/// fusion ramp, the worker groups the windows are spread over, and where its noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSettings {
    /// Latent frames per window: the model's native length unless a spec overrides it.
    pub latent_frames: u32,
    /// The least number of latent frames two neighbouring windows share.
    pub overlap: u32,
    pub fusion: Fusion,
    /// Worker groups; each runs a contiguous run of windows with the job's layout.
    pub groups: u32,
    /// Records stored before this setting existed read as the default.
    #[serde(default)]
    pub noise: NoiseSchedule,
}

/// Why a clip cannot be cut with some settings; each names the spec field to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window_latent_frames: must be at least 1")]
    EmptyWindow,
    #[error(
        "overlap_latent_frames: {overlap} is more than half the window ({window} latent frames); \
         use at most {}", window / 2
    )]
    OverlapTooLarge { overlap: u32, window: u32 },
    #[error("groups: must be at least 1")]
    NoGroups,
    #[error(
        "groups: {groups} groups for a clip of {windows} window(s) ({latent_frames} latent frames \
         in windows of {window}); use at most {windows}, or shorter windows"
    )]
    MoreGroupsThanWindows {
        groups: u32,
        windows: usize,
        latent_frames: u32,
        window: u32,
    },
    #[error(
        "groups: with an overlap of {overlap} some windows of group {first} share frames with \
         group {second}, which is not its neighbour; use fewer groups or a smaller overlap"
    )]
    NonNeighbourGroupsShareFrames {
        overlap: u32,
        first: usize,
        second: usize,
    },
}

impl WindowError {
    /// The spec field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            WindowError::EmptyWindow => "window_latent_frames",
            WindowError::OverlapTooLarge { .. } => "overlap_latent_frames",
            WindowError::NoGroups
            | WindowError::MoreGroupsThanWindows { .. }
            | WindowError::NonNeighbourGroupsShareFrames { .. } => "groups",
        }
    }

    /// The message without the field name in front.
    pub fn problem(&self) -> String {
        let text = self.to_string();
        match text.split_once(": ") {
            Some((_, rest)) => rest.to_string(),
            None => text,
        }
    }
}

/// One window: latent frames `start..start + len`, run by group `group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub group: usize,
}

impl Window {
    pub fn frames(&self) -> Range<usize> {
        self.start..self.start + self.len
    }

    /// The video frames this window's latent frames decode to (the first latent frame is one
    /// video frame, each later one `pack`).
    pub fn video_frames(&self, pack: usize) -> Range<usize> {
        first_video_frame(self.start, pack)..first_video_frame(self.start + self.len, pack)
    }
}

/// The windows of one clip, their groups and their fusion weights.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPlan {
    latent_frames: usize,
    settings: WindowSettings,
    windows: Vec<Window>,
    /// Per window, per latent frame of the window: its share of that frame's fused prediction.
    weights: Vec<Vec<f32>>,
    /// Per group, the indices of its windows.
    groups: Vec<Range<usize>>,
}

impl WindowPlan {
    /// Cuts `latent_frames` frames with `settings`. A clip no longer than one window is one
    /// window of the clip's own length (a plain render). Otherwise the fewest windows whose
    /// neighbours all share at least `overlap` frames, spread evenly: the first starts at frame
    /// 0, the last ends at the last frame, and every overlap is `overlap` or a little more.
    pub fn new(latent_frames: u32, settings: WindowSettings) -> Result<Self, WindowError> {
        let (window, overlap) = (settings.latent_frames, settings.overlap);
        if window == 0 {
            return Err(WindowError::EmptyWindow);
        }
        if overlap > window / 2 {
            return Err(WindowError::OverlapTooLarge { overlap, window });
        }
        if settings.groups == 0 {
            return Err(WindowError::NoGroups);
        }
        let total = latent_frames.max(1) as usize;
        let window = window as usize;
        let starts: Vec<usize> = if total <= window {
            vec![0]
        } else {
            let stride = window - overlap as usize;
            let count = (total - window).div_ceil(stride) + 1;
            let span = total - window;
            // round(k · span / (count − 1)) in integers
            (0..count)
                .map(|k| (2 * k * span + (count - 1)) / (2 * (count - 1)))
                .collect()
        };
        let len = window.min(total);
        let count = starts.len();
        let group_count = settings.groups as usize;
        if group_count > count {
            return Err(WindowError::MoreGroupsThanWindows {
                groups: settings.groups,
                windows: count,
                latent_frames: total as u32,
                window: window as u32,
            });
        }
        let (base, extra) = (count / group_count, count % group_count);
        let mut groups = Vec::with_capacity(group_count);
        let mut next = 0;
        for g in 0..group_count {
            let size = base + usize::from(g < extra);
            groups.push(next..next + size);
            next += size;
        }
        let windows: Vec<Window> = starts
            .iter()
            .enumerate()
            .map(|(i, &start)| Window {
                start,
                len,
                group: groups.iter().position(|r| r.contains(&i)).unwrap_or(0),
            })
            .collect();
        let weights = fusion_weights(&windows, total, settings.fusion);
        let plan = Self {
            latent_frames: total,
            settings,
            windows,
            weights,
            groups,
        };
        for first in 0..group_count {
            for second in first + 2..group_count {
                let (a, b) = (plan.group_frames(first), plan.group_frames(second));
                if a.end > b.start {
                    return Err(WindowError::NonNeighbourGroupsShareFrames {
                        overlap,
                        first,
                        second,
                    });
                }
            }
        }
        Ok(plan)
    }

    pub fn latent_frames(&self) -> usize {
        self.latent_frames
    }

    pub fn settings(&self) -> &WindowSettings {
        &self.settings
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Whether the clip is one window: rendered exactly as a plain render.
    pub fn is_single_window(&self) -> bool {
        self.windows.len() == 1
    }

    /// Window `index`'s share of each of its frames' fused prediction (normalised: on every
    /// latent frame the shares of the windows covering it sum to 1, up to f32 rounding).
    pub fn weights(&self, index: usize) -> &[f32] {
        &self.weights[index]
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The indices of group `group`'s windows.
    pub fn group_windows(&self, group: usize) -> Range<usize> {
        self.groups[group].clone()
    }

    /// The latent frames group `group`'s windows cover (what its ranks hold).
    pub fn group_frames(&self, group: usize) -> Range<usize> {
        let run = &self.groups[group];
        self.windows[run.start].start..self.windows[run.end - 1].frames().end
    }

    /// The latent frames group `group` owns: from where the previous group's frames end (the
    /// clip's start for group 0) to where its own end. Every latent frame has one owner, which
    /// decodes it; the groups' owned frames, in order, are the clip.
    pub fn group_owned_frames(&self, group: usize) -> Range<usize> {
        let start = match group {
            0 => 0,
            g => self.group_frames(g - 1).end,
        };
        start..self.group_frames(group).end
    }

    /// The latent frames group `group` shares with group `group + 1` (empty for the last group,
    /// or when they do not overlap): what the two exchange each step.
    pub fn shared_with_next(&self, group: usize) -> Range<usize> {
        if group + 1 >= self.groups.len() {
            return 0..0;
        }
        let (this, next) = (self.group_frames(group), self.group_frames(group + 1));
        next.start..this.end.max(next.start)
    }

    /// The smallest and largest number of frames two neighbouring windows share.
    pub fn overlap_range(&self) -> Option<(usize, usize)> {
        let overlaps = self
            .windows
            .windows(2)
            .map(|w| w[0].frames().end.saturating_sub(w[1].start));
        overlaps.fold(None, |acc, o| match acc {
            None => Some((o, o)),
            Some((lo, hi)) => Some((lo.min(o), hi.max(o))),
        })
    }
}

impl fmt::Display for WindowPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.windows.len();
        if count == 1 {
            return write!(f, "{} latent frames in one window", self.latent_frames);
        }
        let (lo, hi) = self.overlap_range().unwrap_or((0, 0));
        let shared = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}–{hi}")
        };
        write!(
            f,
            "{} latent frames in {count} windows of {} sharing {shared} frames ({} fusion); ",
            self.latent_frames, self.windows[0].len, self.settings.fusion
        )?;
        let groups = self.groups.len();
        write!(f, "{groups} group{}:", if groups == 1 { "" } else { "s" })?;
        for g in 0..groups {
            let run = &self.groups[g];
            let frames = self.group_frames(g);
            let windows = if run.len() == 1 {
                format!("window {}", run.start)
            } else {
                format!("windows {}–{}", run.start, run.end - 1)
            };
            write!(
                f,
                "{} group {g}: {windows}, latent frames {}–{}",
                if g == 0 { "" } else { ";" },
                frames.start,
                frames.end - 1
            )?;
        }
        Ok(())
    }
}

/// Each window's raw weight rises over its overlap with the window before (`ramp` from near 0 to
/// near 1) and falls over its overlap with the window after; the weights on each frame are then
/// normalised to sum to 1 (which also covers a frame shared by three windows).
fn fusion_weights(windows: &[Window], total: usize, fusion: Fusion) -> Vec<Vec<f32>> {
    let raw: Vec<Vec<f64>> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let before = match i {
                0 => 0,
                _ => windows[i - 1].frames().end.saturating_sub(w.start),
            };
            let after = windows
                .get(i + 1)
                .map_or(0, |next| w.frames().end.saturating_sub(next.start));
            // 1 outside the overlaps; `x` runs from near 0 at the window's edge to 1 where the
            // overlap ends
            let edge = |distance: usize, overlap: usize| match overlap {
                0 => 1.0,
                n if distance > n => 1.0,
                n => fusion.ramp(distance as f64 / (n + 1) as f64),
            };
            (0..w.len)
                .map(|j| edge(j + 1, before).min(edge(w.len - j, after)))
                .collect()
        })
        .collect();
    let mut sums = vec![0.0f64; total];
    for (w, r) in windows.iter().zip(&raw) {
        for (j, v) in r.iter().enumerate() {
            sums[w.start + j] += v;
        }
    }
    windows
        .iter()
        .zip(&raw)
        .map(|(w, r)| {
            r.iter()
                .enumerate()
                .map(|(j, v)| (v / sums[w.start + j]) as f32)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window: u32, overlap: u32, groups: u32) -> WindowSettings {
        WindowSettings {
            latent_frames: window,
            overlap,
            fusion: Fusion::Linear,
            groups,
            noise: Default::default(),
        }
    }

    fn plan(total: u32, window: u32, overlap: u32, groups: u32) -> WindowPlan {
        WindowPlan::new(total, settings(window, overlap, groups)).unwrap()
    }

    fn starts(p: &WindowPlan) -> Vec<usize> {
        p.windows().iter().map(|w| w.start).collect()
    }

    #[test]
    fn a_clip_of_one_window_is_a_plain_render() {
        for total in [1, 5, 21] {
            let p = plan(total, 21, 5, 1);
            assert!(p.is_single_window());
            assert_eq!(p.windows()[0].frames(), 0..total as usize);
            assert!(p.weights(0).iter().all(|&w| w == 1.0));
            assert_eq!(
                p.to_string(),
                format!("{total} latent frames in one window")
            );
        }
    }

    #[test]
    fn windows_cover_the_clip_with_at_least_the_overlap_and_end_on_the_last_frame() {
        for (total, window, overlap) in [
            (241, 21, 5),
            (241, 9, 3),
            (22, 21, 0),
            (30, 9, 4),
            (15, 9, 4),
            (61, 9, 2),
        ] {
            let p = plan(total, window, overlap, 1);
            let w = p.windows();
            assert_eq!(w[0].start, 0);
            assert_eq!(w.last().unwrap().frames().end, total as usize);
            let (lo, _) = p.overlap_range().unwrap();
            assert!(lo >= overlap as usize, "{total}/{window}/{overlap}: {lo}");
            // the fewest windows: one fewer could not give every neighbour the overlap
            let n = w.len();
            let stride = (window - overlap) as usize;
            assert!((n - 2) * stride + (window as usize) < total as usize);
            // every frame's weights sum to 1
            let mut sums = vec![0.0f64; total as usize];
            for (i, win) in w.iter().enumerate() {
                for (j, &v) in p.weights(i).iter().enumerate() {
                    assert!(v > 0.0 && v <= 1.0);
                    sums[win.start + j] += v as f64;
                }
            }
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        }
        assert_eq!(starts(&plan(241, 21, 5, 1)).len(), 15);
        assert_eq!(starts(&plan(27, 9, 3, 1)), vec![0, 6, 12, 18]);
        assert_eq!(starts(&plan(25, 9, 3, 1)), vec![0, 5, 11, 16]);
    }

    #[test]
    fn linear_and_cosine_ramps_cross_over_the_shared_frames() {
        let linear = plan(15, 9, 3, 1);
        assert_eq!(starts(&linear), vec![0, 6]);
        let tail: Vec<f32> = linear.weights(0)[6..].to_vec();
        assert_eq!(tail, vec![0.75, 0.5, 0.25]);
        assert_eq!(linear.weights(1)[..3].to_vec(), vec![0.25, 0.5, 0.75]);
        assert!(linear.weights(0)[..6].iter().all(|&w| w == 1.0));
        let cosine = WindowPlan::new(
            15,
            WindowSettings {
                fusion: Fusion::Cosine,
                ..settings(9, 3, 1)
            },
        )
        .unwrap();
        let c = cosine.weights(0);
        assert!((c[7] - 0.5).abs() < 1e-6);
        assert!(c[6] > 0.75 && c[8] < 0.25, "{c:?}");
        // no overlap: each frame belongs to one window
        let hard = plan(18, 9, 0, 1);
        assert_eq!(starts(&hard), vec![0, 9]);
        assert!((0..2).all(|i| hard.weights(i).iter().all(|&w| w == 1.0)));
    }

    #[test]
    fn windows_go_to_groups_in_contiguous_runs() {
        let p = plan(241, 9, 3, 3);
        assert_eq!(p.windows().len(), 40);
        assert_eq!(
            (0..3).map(|g| p.group_windows(g)).collect::<Vec<_>>(),
            vec![0..14, 14..27, 27..40]
        );
        for (i, w) in p.windows().iter().enumerate() {
            assert!(p.group_windows(w.group).contains(&i));
        }
        let shared = p.shared_with_next(0);
        assert_eq!(shared.start, p.windows()[14].start);
        assert_eq!(shared.end, p.windows()[13].frames().end);
        assert!(shared.len() >= 3);
        assert!(p.shared_with_next(2).is_empty());
        assert!(plan(18, 9, 0, 2).shared_with_next(0).is_empty());
        // every latent frame has one owner: the owned runs tile the clip in group order
        let owned: Vec<_> = (0..3).map(|g| p.group_owned_frames(g)).collect();
        assert_eq!((owned[0].start, owned[2].end), (0, 241));
        assert!(owned.windows(2).all(|o| o[0].end == o[1].start));
        assert_eq!(
            owned[1].start, shared.end,
            "the next group owns what it shares"
        );
        let hard = plan(18, 9, 0, 2);
        assert_eq!(
            (hard.group_owned_frames(0), hard.group_owned_frames(1)),
            (0..9, 9..18)
        );
        let shown = p.to_string();
        assert!(
            shown.starts_with("241 latent frames in 40 windows of 9 sharing "),
            "{shown}"
        );
        assert!(
            shown.contains("3 groups: group 0: windows 0–13, latent frames 0–"),
            "{shown}"
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        let e = WindowPlan::new(100, settings(0, 0, 1)).unwrap_err();
        assert_eq!(e.field(), "window_latent_frames");
        let e = WindowPlan::new(100, settings(9, 5, 1)).unwrap_err();
        assert_eq!(e.field(), "overlap_latent_frames");
        assert!(e.problem().contains("use at most 4"), "{e}");
        let e = WindowPlan::new(100, settings(9, 3, 0)).unwrap_err();
        assert_eq!(e.field(), "groups");
        let e = WindowPlan::new(9, settings(9, 3, 2)).unwrap_err();
        assert_eq!(e.field(), "groups");
        assert_eq!(
            e.problem(),
            "2 groups for a clip of 1 window(s) (9 latent frames in windows of 9); use at most 1, \
             or shorter windows"
        );
        // three windows sharing frames, each in its own group
        let e = WindowPlan::new(15, settings(9, 4, 3)).unwrap_err();
        assert!(matches!(
            e,
            WindowError::NonNeighbourGroupsShareFrames {
                first: 0,
                second: 2,
                ..
            }
        ));
    }

    #[test]
    fn names_parse_and_print() {
        for f in Fusion::ALL {
            assert_eq!(f.name().parse::<Fusion>().unwrap(), f);
        }
        assert_eq!(Fusion::parse_optional(" ").unwrap(), None);
        assert_eq!(
            "smooth".parse::<Fusion>().unwrap_err().to_string(),
            "\"smooth\" is not linear or cosine"
        );
    }
}
