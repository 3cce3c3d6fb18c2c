//! Reading a clip into [`Frame`]s, in the two forms longtake writes (`coordinator/src/encode.rs`):
//! an H.264 MP4 or a directory of `frame_00000.png`, `frame_00001.png`, ..., each file read by
//! [`longtake_proto::media`].

use std::io;
use std::path::{Path, PathBuf};

use longtake_proto::media::{decode_png, ClipFacts, MediaError, Mp4Clip};

use super::frame::{Frame, FrameSizeError};

/// Why a clip cannot be read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a clip: expected an .mp4 file or a directory of frame_00000.png, frame_00001.png, ...", path.display())]
    NotAClip { path: PathBuf },
    #[error("{}: no frame_*.png files in this directory", path.display())]
    NoPngFrames { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Media {
        path: PathBuf,
        #[source]
        source: MediaError,
    },
    #[error("{}: {source}", path.display())]
    FrameSize {
        path: PathBuf,
        #[source]
        source: FrameSizeError,
    },
}

/// The frames of the clip at `path`: a directory is a PNG sequence, a file is an MP4.
pub fn read_clip(path: &Path) -> Result<Vec<Frame>, ClipError> {
    let metadata = std::fs::metadata(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        what: "cannot open",
        source,
    })?;
    if metadata.is_dir() {
        read_png_sequence(path)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("mp4"))
    {
        read_mp4(path)
    } else {
        Err(ClipError::NotAClip {
            path: path.to_path_buf(),
        })
    }
}

/// `dir/frame_*.png` in name order (the zero-padded numbers sort as they count).
pub fn read_png_sequence(dir: &Path) -> Result<Vec<Frame>, ClipError> {
    let io_err = |source| ClipError::Io {
        path: dir.to_path_buf(),
        what: "cannot list directory",
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        let is_frame = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("frame_") && n.to_ascii_lowercase().ends_with(".png"));
        if is_frame {
            names.push(path);
        }
    }
    if names.is_empty() {
        return Err(ClipError::NoPngFrames {
            path: dir.to_path_buf(),
        });
    }
    names.sort();
    names.iter().map(|path| read_png(path)).collect()
}

/// One PNG as RGB8: palette, grey and 16-bit images are converted, alpha is dropped.
fn read_png(path: &Path) -> Result<Frame, ClipError> {
    let bytes = std::fs::read(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        what: "cannot read",
        source,
    })?;
    let picture = decode_png(&bytes).map_err(|source| ClipError::Media {
        path: path.to_path_buf(),
        source,
    })?;
    Frame::new(picture.width as usize, picture.height as usize, picture.rgb).map_err(|source| {
        ClipError::FrameSize {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The frames of the first H.264 track of an MP4 ([`longtake_proto::media`]).
pub fn read_mp4(path: &Path) -> Result<Vec<Frame>, ClipError> {
    let bytes = std::fs::read(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        what: "cannot read",
        source,
    })?;
    let media_err = |source| ClipError::Media {
        path: path.to_path_buf(),
        source,
    };
    let clip = Mp4Clip::open(&bytes).map_err(media_err)?;
    let ClipFacts { width, height, .. } = clip.facts();
    let mut decoded = Vec::new();
    clip.decode(|rgb| {
        decoded.push(rgb);
        Ok::<_, MediaError>(())
    })
    .map_err(media_err)?;
    let frames = decoded
        .into_iter()
        .map(|rgb| {
            Frame::new(width as usize, height as usize, rgb).map_err(|source| {
                ClipError::FrameSize {
                    path: path.to_path_buf(),
                    source,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(frames)
}
