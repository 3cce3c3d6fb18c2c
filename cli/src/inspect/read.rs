//! Reading a clip into [`Frame`]s, in the two forms longtake writes (`coordinator/src/encode.rs`):
//! an H.264 MP4 (demuxed with the `mp4` crate, decoded with openh264) or a directory of
//! `frame_00000.png`, `frame_00001.png`, ...

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use openh264::decoder::Decoder;
use openh264::formats::YUVSource;

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
    #[error("{}: not a readable PNG: {source}", path.display())]
    Png {
        path: PathBuf,
        #[source]
        source: png::DecodingError,
    },
    #[error("{}: not a readable MP4: {source}", path.display())]
    Mp4 {
        path: PathBuf,
        #[source]
        source: mp4::Error,
    },
    #[error("{}: no H.264 video track", path.display())]
    NoH264Track { path: PathBuf },
    #[error("{}: H.264 sample {sample}: {message}", path.display())]
    H264 {
        path: PathBuf,
        sample: u32,
        message: String,
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

fn open(path: &Path) -> Result<File, ClipError> {
    File::open(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        what: "cannot open",
        source,
    })
}

/// One PNG as RGB8: palette, grey and 16-bit images are converted, alpha is dropped.
fn read_png(path: &Path) -> Result<Frame, ClipError> {
    let png_err = |source| ClipError::Png {
        path: path.to_path_buf(),
        source,
    };
    let file = open(path)?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(png_err)?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).map_err(png_err)?;
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    let rgb: Vec<u8> = buf
        .chunks_exact(channels)
        .flat_map(|p| match p.len() {
            1 | 2 => [p[0], p[0], p[0]],
            _ => [p[0], p[1], p[2]],
        })
        .collect();
    Frame::new(info.width as usize, info.height as usize, rgb).map_err(|source| {
        ClipError::FrameSize {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The frames of the first H.264 track of an MP4.
pub fn read_mp4(path: &Path) -> Result<Vec<Frame>, ClipError> {
    let mp4_err = |source| ClipError::Mp4 {
        path: path.to_path_buf(),
        source,
    };
    let file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| ClipError::Io {
            path: path.to_path_buf(),
            what: "cannot read",
            source,
        })?
        .len();
    let mut mp4 = mp4::Mp4Reader::read_header(BufReader::new(file), size).map_err(mp4_err)?;
    let mut tracks: Vec<&mp4::Mp4Track> = mp4
        .tracks()
        .values()
        .filter(|t| t.trak.mdia.minf.stbl.stsd.avc1.is_some())
        .collect();
    tracks.sort_by_key(|t| t.track_id());
    let track = tracks.first().ok_or_else(|| ClipError::NoH264Track {
        path: path.to_path_buf(),
    })?;
    let track_id = track.track_id();
    let samples = track.sample_count();
    let avcc = &track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .expect("filtered on avc1")
        .avcc;
    let length_size = usize::from(avcc.length_size_minus_one & 3) + 1;
    // openh264 takes Annex B: the parameter sets from avcC first, then every sample with its
    // length prefixes replaced by start codes.
    let mut parameter_sets = Vec::new();
    for nal in avcc
        .sequence_parameter_sets
        .iter()
        .chain(&avcc.picture_parameter_sets)
    {
        parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
        parameter_sets.extend_from_slice(&nal.bytes);
    }

    let h264_err = |sample, message: String| ClipError::H264 {
        path: path.to_path_buf(),
        sample,
        message,
    };
    let mut decoder = Decoder::new().map_err(|e| h264_err(0, e.to_string()))?;
    let mut frames = Vec::with_capacity(samples as usize);
    let mut annex_b = Vec::new();
    for sample_id in 1..=samples {
        let Some(sample) = mp4.read_sample(track_id, sample_id).map_err(mp4_err)? else {
            continue;
        };
        annex_b.clear();
        if sample_id == 1 {
            annex_b.extend_from_slice(&parameter_sets);
        }
        to_annex_b(&sample.bytes, length_size, &mut annex_b)
            .map_err(|reason| h264_err(sample_id, reason.to_string()))?;
        let decoded = decoder
            .decode(&annex_b)
            .map_err(|e| h264_err(sample_id, e.to_string()))?;
        if let Some(yuv) = decoded {
            frames.push(yuv_to_frame(&yuv).map_err(|source| ClipError::FrameSize {
                path: path.to_path_buf(),
                source,
            })?);
        }
    }
    let remaining = decoder
        .flush_remaining()
        .map_err(|e| h264_err(samples, e.to_string()))?;
    for yuv in remaining {
        frames.push(yuv_to_frame(&yuv).map_err(|source| ClipError::FrameSize {
            path: path.to_path_buf(),
            source,
        })?);
    }
    Ok(frames)
}

/// Appends the length-prefixed NAL units of one MP4 sample to `out` as Annex B.
fn to_annex_b(sample: &[u8], length_size: usize, out: &mut Vec<u8>) -> Result<(), &'static str> {
    let mut rest = sample;
    while !rest.is_empty() {
        if rest.len() < length_size {
            return Err("truncated NAL length");
        }
        let (prefix, body) = rest.split_at(length_size);
        let len = prefix
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if body.len() < len {
            return Err("NAL unit longer than its sample");
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&body[..len]);
        rest = &body[len..];
    }
    Ok(())
}

/// Converts a decoded yuv420p picture to RGB8 with the BT.709 limited-range matrix longtake's
/// encoder signals and uses. openh264's own `write_rgb8` assumes BT.601, which would shift every
/// saturated colour by up to ~20 levels, enough to matter when colours are named.
fn yuv_to_frame(yuv: &impl YUVSource) -> Result<Frame, FrameSizeError> {
    let (w, h) = yuv.dimensions();
    let (y_stride, u_stride, v_stride) = yuv.strides();
    let (y_plane, u_plane, v_plane) = (yuv.y(), yuv.u(), yuv.v());
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        for col in 0..w {
            let luma = 1.164_383_6 * (f64::from(y_plane[row * y_stride + col]) - 16.0);
            let cb = f64::from(u_plane[(row / 2) * u_stride + col / 2]) - 128.0;
            let cr = f64::from(v_plane[(row / 2) * v_stride + col / 2]) - 128.0;
            let to_u8 = |v: f64| v.round().clamp(0.0, 255.0) as u8;
            rgb.extend_from_slice(&[
                to_u8(luma + 1.792_741_1 * cr),
                to_u8(luma - 0.213_248_6 * cb - 0.532_909_3 * cr),
                to_u8(luma + 2.112_401_8 * cb),
            ]);
        }
    }
    Frame::new(w, h, rgb)
}
