//! `longtake inspect`: checks what a rendered clip of the toy world (`worker/toy/world.py`) shows
//! against its caption. [`world`] is the caption grammar and palette, [`read`] turns an MP4 or a
//! PNG sequence into [`Frame`]s, [`checker`] measures background, object, motion and
//! consistency, [`verdict`] compares them with the caption, [`seams`] measures the window seams
//! of a long clip, and [`Report`] puts it together for printing.

pub mod checker;
pub mod frame;
pub mod motion;
pub mod read;
mod report;
pub mod seams;
pub mod segment;
mod stats;
pub mod strip;
pub mod verdict;
pub mod world;

#[cfg(test)]
mod synth;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use checker::{measure, CheckError, Measurements};
pub use frame::Frame;
use longtake_proto::spec::job::default_overlap;
use longtake_proto::spec::WindowSettings;
pub use longtake_worker::model::render::ToyWorld;
pub use read::{read_clip, ClipError};
pub use seams::{join_report, seam_report, JoinReport, SeamReport};
pub use segment::Topology;
pub use verdict::Verdict;
pub use world::{Caption, CaptionError};

/// Why a clip could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Caption(#[from] CaptionError),
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error("{}: {source}", path.display())]
    Check {
        path: PathBuf,
        #[source]
        source: CheckError,
    },
}

/// A clip's measurements and the verdict on its caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub clip: PathBuf,
    pub caption: String,
    pub expected: Caption,
    pub verdict: Verdict,
    pub passed: bool,
    pub measurements: Measurements,
    /// Where the clip is longer than one window of the toy model (or of the windows asked
    /// for): the change across each window seam against the change inside windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seams: Option<SeamReport>,
}

/// The windows a clip of the toy world was cut into when nothing else is said: the toy model's
/// native 9 latent frames with the spec's default overlap.
pub fn toy_windows() -> WindowSettings {
    WindowSettings {
        latent_frames: TOY_WINDOW,
        overlap: default_overlap(TOY_WINDOW),
        fusion: Default::default(),
        groups: 1,
        noise: Default::default(),
    }
}

/// The toy model's native length in latent frames (17 frames).
pub const TOY_WINDOW: u32 = 5;

impl Report {
    /// Measures `frames` (of the shipped toy world: a plane) and judges them against `caption`.
    pub fn of_frames(
        clip: PathBuf,
        caption: Caption,
        frames: &[Frame],
    ) -> Result<Self, CheckError> {
        Self::with_windows(clip, caption, frames, toy_windows(), Topology::Plane)
    }

    /// [`Self::of_frames`] with the seams of a clip cut with `windows` (a cut that is not valid
    /// for this clip reports no seams).
    pub fn with_windows(
        clip: PathBuf,
        caption: Caption,
        frames: &[Frame],
        windows: WindowSettings,
        topology: Topology,
    ) -> Result<Self, CheckError> {
        let measurements = measure(frames, topology)?;
        let verdict = Verdict::judge(&caption, &measurements);
        let seams = seam_report(frames, &measurements.per_frame, windows, topology)
            .ok()
            .flatten();
        Ok(Self {
            clip,
            caption: caption.to_string(),
            expected: caption,
            verdict,
            passed: verdict.passed(),
            measurements,
            seams,
        })
    }
}

/// Parses `caption`, reads the clip at `path` and reports on it. The caption is parsed first, so
/// a caption outside the grammar fails before any decoding.
pub fn inspect(path: &Path, caption: &str) -> Result<Report, InspectError> {
    inspect_with_windows(path, caption, toy_windows(), ToyWorld::Bordered)
}

/// The seams of the clip at `path` cut with `windows`, with no caption to judge it by (the
/// object is what stands out from the background): what `longtake render` reports after a
/// clip of several windows. `Ok(None)` for a clip of one window.
pub fn seams_of(
    path: &Path,
    windows: WindowSettings,
    topology: Topology,
) -> Result<Option<SeamReport>, InspectError> {
    Ok(seams_and_join_of(path, windows, topology, None)?.0)
}

/// [`seams_of`] for the clip at `path` whose frames from `join` on were rendered after the
/// frames before it (an extension: its windows start `held` frames before the join, at the
/// clip's last frames it held), with the [`JoinReport`] of the join. `join` `None`: the whole
/// clip was rendered, as [`seams_of`].
pub fn seams_and_join_of(
    path: &Path,
    windows: WindowSettings,
    topology: Topology,
    join: Option<(usize, usize)>,
) -> Result<(Option<SeamReport>, Option<JoinReport>), InspectError> {
    let frames = read_clip(path)?;
    let measurements = measure(&frames, topology).map_err(|source| InspectError::Check {
        path: path.to_path_buf(),
        source,
    })?;
    let per_frame = &measurements.per_frame;
    let Some((join, held)) = join else {
        let seams = seam_report(&frames, per_frame, windows, topology)
            .ok()
            .flatten();
        return Ok((seams, None));
    };
    let rendered = join.saturating_sub(held).min(frames.len());
    let seams = seam_report(
        &frames[rendered..],
        &per_frame[rendered..],
        windows,
        topology,
    )
    .ok()
    .flatten()
    .map(|mut report| {
        for seam in &mut report.seams {
            seam.frames = seam.frames.start + rendered..seam.frames.end + rendered;
        }
        report
    });
    Ok((seams, join_report(&frames, per_frame, join, topology)))
}

/// [`inspect`] with the seams of a clip cut with `windows`, of a model trained on `world`.
pub fn inspect_with_windows(
    path: &Path,
    caption: &str,
    windows: WindowSettings,
    world: ToyWorld,
) -> Result<Report, InspectError> {
    let caption: Caption = caption.parse()?;
    let topology = Topology::of_world(world, [caption.direction]);
    let frames = read_clip(path)?;
    Report::with_windows(path.to_path_buf(), caption, &frames, windows, topology).map_err(
        |source| InspectError::Check {
            path: path.to_path_buf(),
            source,
        },
    )
}
