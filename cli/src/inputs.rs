//! The file a job starts from, read here before it is sent (an unreadable one fails before
//! anything starts; the coordinator reads it again, as it trusts no client), and what it sets in
//! the spec: its kind, and for a clip to extend the new frames at the clip's rate.

use std::path::Path;

use anyhow::{Context, Result};
use longtake_proto::media::{decode_png, ClipFacts, Mp4Clip};
use longtake_proto::spec::frames::{for_duration, WAN_TEMPORAL_PACK};
use longtake_proto::spec::{InputKind, JobInput};

use crate::spec_args::{Built, SpecArgs};

/// A picture to render from, or a clip to extend.
pub struct Upload {
    kind: InputKind,
    bytes: Vec<u8>,
    /// The clip's, for an extension.
    clip: Option<ClipFacts>,
}

impl Upload {
    /// Reads the file at `path` as a `kind`, naming the flag and the file when it is not one.
    pub fn read(path: &Path, kind: InputKind) -> Result<Self> {
        let flag = match kind {
            InputKind::Image => "--image",
            InputKind::Clip => "--input",
        };
        let bytes = std::fs::read(path)
            .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
        let clip = match kind {
            InputKind::Image => {
                decode_png(&bytes).with_context(|| format!("{flag} {}", path.display()))?;
                None
            }
            InputKind::Clip => Some(
                Mp4Clip::open(&bytes)
                    .with_context(|| format!("{flag} {}", path.display()))?
                    .facts(),
            ),
        };
        Ok(Self { kind, bytes, clip })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Sets the spec's input to this file. A clip's extension counts its new frames from
    /// `--seconds` at the clip's rate (rounded up to a multiple of 4, as the VAE packs frames)
    /// or from `--frames`, and renders at the clip's rate and size unless `--fps` or `--size`
    /// ask otherwise (which the coordinator then refuses, naming the clip's).
    pub fn attach(&self, built: &mut Built, args: &SpecArgs) -> Result<()> {
        built.spec.input = Some(JobInput::unread(self.kind).to_proto());
        let Some(clip) = self.clip else {
            return Ok(());
        };
        let requested = match (args.frames, args.seconds) {
            (Some(n), _) => Some(u32::try_from(n).context("--frames is far beyond any limit")?),
            (None, Some(seconds)) => Some(for_duration(seconds, clip.fps)),
            (None, None) => None,
        };
        built.notes.clear();
        built.spec.frames = match requested {
            Some(n) => {
                let frames = n.div_ceil(WAN_TEMPORAL_PACK).max(1) * WAN_TEMPORAL_PACK;
                if frames != n {
                    built.notes.push(format!(
                        "note: an extension renders new frames in fours; {n} frames rounded up \
                         to {frames}"
                    ));
                }
                frames
            }
            None => 0,
        };
        built.spec.fps = args.fps.unwrap_or(0);
        built.notes.push(format!(
            "extending a clip of {} frames, {}x{}, {} fps",
            clip.frames, clip.width, clip.height, clip.fps
        ));
        Ok(())
    }
}
