//! Reading an uploaded input file before its job is queued: the whole file is decoded (a picture,
//! or every frame of a clip), so a job never waits in the queue for a file no worker can read;
//! what was read ([`JobInput`]: size, frames, rate, checksum) goes into the job's spec.

use longtake_proto::media::{decode_png, MediaError, Mp4Clip};
use longtake_proto::spec::{InputKind, JobInput};
use sha2::{Digest, Sha256};

/// Why an uploaded file is refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input: the picture is {0}")]
    Picture(MediaError),
    #[error("input: the clip is {0}")]
    Clip(MediaError),
    #[error("input: the clip to extend: {0}")]
    ClipFrames(String),
}

/// What `bytes`, uploaded as a file of `kind`, holds; an error naming what is wrong with it.
/// Blocking (a clip is decoded whole): run it off the async threads.
pub fn read(kind: InputKind, bytes: &[u8]) -> Result<JobInput, InputError> {
    let sha256 = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (width, height, frames, fps) = match kind {
        InputKind::Image => {
            let picture = decode_png(bytes).map_err(InputError::Picture)?;
            (picture.width, picture.height, 1, 0)
        }
        InputKind::Clip => {
            let clip = Mp4Clip::open(bytes).map_err(InputError::Clip)?;
            let facts = clip.facts();
            let decoded = clip
                .decode(|_| Ok::<_, MediaError>(()))
                .map_err(InputError::Clip)?;
            if decoded != facts.frames {
                return Err(InputError::ClipFrames(format!(
                    "its track lists {} frames but {decoded} decode; re-encode it",
                    facts.frames
                )));
            }
            (facts.width, facts.height, facts.frames, facts.fps)
        }
    };
    Ok(JobInput {
        held_frames: 0,
        kind,
        bytes: bytes.len() as u64,
        sha256,
        width,
        height,
        frames,
        fps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{open_writer, Quality, VideoFormat};

    /// An MP4 of `frames` frames of 32×16 at 16 fps, as the coordinator writes outputs.
    fn clip(frames: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.mp4");
        let mut sink = open_writer(
            &path,
            Some(VideoFormat::Mp4),
            32,
            16,
            16,
            Quality::default(),
        )
        .unwrap();
        for i in 0..frames {
            sink.push_frame(&vec![(i * 20) as u8; 32 * 16 * 3]).unwrap();
        }
        sink.finish().unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_clip_is_read_whole_into_its_facts() {
        let bytes = clip(9);
        let input = read(InputKind::Clip, &bytes).unwrap();
        assert_eq!(
            (input.width, input.height, input.frames, input.fps),
            (32, 16, 9, 16)
        );
        assert_eq!(input.bytes, bytes.len() as u64);
        assert_eq!(input.sha256.len(), 64);
        // the frames come back as written, within H.264's loss
        let mut firsts = Vec::new();
        Mp4Clip::open(&bytes)
            .unwrap()
            .decode(|rgb| {
                firsts.push(rgb[0]);
                Ok::<_, MediaError>(())
            })
            .unwrap();
        for (i, value) in firsts.iter().enumerate() {
            assert!((i as i32 * 20 - *value as i32).abs() <= 3, "{firsts:?}");
        }
    }

    #[test]
    fn unreadable_uploads_say_what_they_are_not() {
        let e = read(InputKind::Clip, b"not an mp4 at all").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("input: the clip is not a readable MP4"),
            "{e}"
        );
        let e = read(InputKind::Image, &clip(1)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("input: the picture is not a readable PNG"),
            "{e}"
        );
        let mut cut = clip(9);
        cut.truncate(cut.len() / 2);
        assert!(read(InputKind::Clip, &cut).is_err());
    }
}
