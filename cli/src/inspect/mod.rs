//! `longtake inspect`: checks what a rendered clip of the toy world (`worker/toy/world.py`) shows
//! against its caption. [`world`] is the caption grammar and palette, [`read`] turns an MP4 or a
//! PNG sequence into [`Frame`]s, [`checker`] measures background, object, motion and
//! consistency, [`verdict`] compares them with the caption, and [`Report`] puts it together for
//! printing.

pub mod checker;
pub mod frame;
pub mod motion;
pub mod read;
mod report;
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
pub use read::{read_clip, ClipError};
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
}

impl Report {
    /// Measures `frames` and judges them against `caption`.
    pub fn of_frames(
        clip: PathBuf,
        caption: Caption,
        frames: &[Frame],
    ) -> Result<Self, CheckError> {
        let measurements = measure(frames)?;
        let verdict = Verdict::judge(&caption, &measurements);
        Ok(Self {
            clip,
            caption: caption.to_string(),
            expected: caption,
            verdict,
            passed: verdict.passed(),
            measurements,
        })
    }
}

/// Parses `caption`, reads the clip at `path` and reports on it. The caption is parsed first, so
/// a caption outside the grammar fails before any decoding.
pub fn inspect(path: &Path, caption: &str) -> Result<Report, InspectError> {
    let caption: Caption = caption.parse()?;
    let frames = read_clip(path)?;
    Report::of_frames(path.to_path_buf(), caption, &frames).map_err(|source| InspectError::Check {
        path: path.to_path_buf(),
        source,
    })
}
