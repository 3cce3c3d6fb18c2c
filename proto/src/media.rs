//! The files a render takes as input, read at the edge into frames: a PNG picture (the first
//! frame of an image-to-video render) and an H.264 MP4 clip (the clip a render extends), the
//! form longtake itself writes (`coordinator/src/encode.rs`). The coordinator reads an upload
//! here before it queues the job (an unreadable file is refused then, naming what is wrong), the
//! worker reads the frames it renders from, and the CLI reads clips it inspects. No ffmpeg: the
//! `mp4` crate demuxes and openh264 decodes.

use std::io::Cursor;

use openh264::decoder::Decoder;
use openh264::formats::YUVSource;

/// Why an input file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("not a readable PNG: {0}")]
    Png(#[from] png::DecodingError),
    #[error("not a readable MP4: {0}")]
    Mp4(#[from] mp4::Error),
    #[error("the MP4 has no H.264 video track (longtake reads H.264 in MP4, as it writes)")]
    NoH264Track,
    #[error("H.264 sample {sample}: {message}")]
    H264 { sample: u32, message: String },
    #[error("the MP4's frame rate {fps:.3} is not a whole number of frames per second")]
    FrameRate { fps: f64 },
    #[error("the MP4's frames are {got} where its track says {width}×{height}")]
    FrameSize {
        width: u32,
        height: u32,
        got: String,
    },
    #[error("the MP4's video track has no frames")]
    Empty,
    #[error("larger than longtake reads ({width}×{height}; at most {MAX_SIDE} pixels a side)")]
    TooLarge { width: u32, height: u32 },
}

/// The largest side of a picture or clip read here: twice 4K's width, so a file whose header
/// claims more is refused before anything is allocated for it.
pub const MAX_SIDE: u32 = 8192;

fn check_size(width: u32, height: u32) -> Result<(), MediaError> {
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(MediaError::TooLarge { width, height });
    }
    Ok(())
}

/// A picture, RGB8 row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// What an MP4's header says of its first H.264 track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipFacts {
    pub width: u32,
    pub height: u32,
    /// Frames per second (whole; longtake writes whole rates).
    pub fps: u32,
    /// Samples in the track: its frames.
    pub frames: u32,
}

/// A PNG as RGB8: palette, grey and 16-bit images are converted, alpha is dropped.
pub fn decode_png(bytes: &[u8]) -> Result<Picture, MediaError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let header = reader.info();
    check_size(header.width, header.height)?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    let channels = info.color_type.samples();
    let rgb = buf
        .chunks_exact(channels)
        .flat_map(|p| match p.len() {
            1 | 2 => [p[0], p[0], p[0]],
            _ => [p[0], p[1], p[2]],
        })
        .collect();
    Ok(Picture {
        width: info.width,
        height: info.height,
        rgb,
    })
}

/// An MP4 clip opened for reading: its facts from the header, its frames by [`Self::decode`].
pub struct Mp4Clip<'a> {
    reader: mp4::Mp4Reader<Cursor<&'a [u8]>>,
    track_id: u32,
    facts: ClipFacts,
    /// The avcC parameter sets as Annex B, sent before the first sample.
    parameter_sets: Vec<u8>,
    length_size: usize,
}

impl<'a> Mp4Clip<'a> {
    /// Reads the header of the MP4 in `bytes` and finds its first H.264 track.
    pub fn open(bytes: &'a [u8]) -> Result<Self, MediaError> {
        let reader = mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64)?;
        let mut tracks: Vec<&mp4::Mp4Track> = reader
            .tracks()
            .values()
            .filter(|t| t.trak.mdia.minf.stbl.stsd.avc1.is_some())
            .collect();
        tracks.sort_by_key(|t| t.track_id());
        let track = tracks.first().ok_or(MediaError::NoH264Track)?;
        let avc1 = track
            .trak
            .mdia
            .minf
            .stbl
            .stsd
            .avc1
            .as_ref()
            .ok_or(MediaError::NoH264Track)?;
        let fps = track.frame_rate();
        let whole = fps.round();
        if !fps.is_finite() || whole < 1.0 || (fps - whole).abs() > 1e-3 {
            return Err(MediaError::FrameRate { fps });
        }
        let frames = track.sample_count();
        if frames == 0 {
            return Err(MediaError::Empty);
        }
        check_size(u32::from(avc1.width), u32::from(avc1.height))?;
        let facts = ClipFacts {
            width: u32::from(avc1.width),
            height: u32::from(avc1.height),
            fps: whole as u32,
            frames,
        };
        // openh264 takes Annex B: the parameter sets from avcC first, then every sample with
        // its length prefixes replaced by start codes.
        let mut parameter_sets = Vec::new();
        for nal in avc1
            .avcc
            .sequence_parameter_sets
            .iter()
            .chain(&avc1.avcc.picture_parameter_sets)
        {
            parameter_sets.extend_from_slice(&[0, 0, 0, 1]);
            parameter_sets.extend_from_slice(&nal.bytes);
        }
        let length_size = usize::from(avc1.avcc.length_size_minus_one & 3) + 1;
        let track_id = track.track_id();
        Ok(Self {
            reader,
            track_id,
            facts,
            parameter_sets,
            length_size,
        })
    }

    pub fn facts(&self) -> ClipFacts {
        self.facts
    }

    /// Decodes every frame in order, handing each (RGB8, `width × height × 3` bytes) to
    /// `frame`, which may stop the decode with its error; so memory is one frame's whatever the
    /// clip's length. Returns the frames decoded.
    pub fn decode<E: From<MediaError>>(
        mut self,
        mut frame: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<u32, E> {
        let h264 = |sample, message: String| MediaError::H264 { sample, message };
        let mut decoder = Decoder::new().map_err(|e| h264(0, e.to_string()))?;
        let mut annex_b = Vec::new();
        let mut count = 0u32;
        let facts = self.facts;
        let mut take = |yuv: &dyn YUVSource| -> Result<(), E> {
            let (w, h) = yuv.dimensions();
            if (w as u32, h as u32) != (facts.width, facts.height) {
                return Err(MediaError::FrameSize {
                    width: facts.width,
                    height: facts.height,
                    got: format!("{w}×{h}"),
                }
                .into());
            }
            count += 1;
            frame(yuv_to_rgb(yuv))
        };
        for sample_id in 1..=facts.frames {
            let sample = self
                .reader
                .read_sample(self.track_id, sample_id)
                .map_err(MediaError::from)?;
            let Some(sample) = sample else {
                continue;
            };
            annex_b.clear();
            if sample_id == 1 {
                annex_b.extend_from_slice(&self.parameter_sets);
            }
            to_annex_b(&sample.bytes, self.length_size, &mut annex_b)
                .map_err(|reason| h264(sample_id, reason.to_string()))?;
            let decoded = decoder
                .decode(&annex_b)
                .map_err(|e| h264(sample_id, e.to_string()))?;
            if let Some(yuv) = decoded {
                take(&yuv)?;
            }
        }
        let remaining = decoder
            .flush_remaining()
            .map_err(|e| h264(facts.frames, e.to_string()))?;
        for yuv in remaining {
            take(&yuv)?;
        }
        Ok(count)
    }

    /// The last `n` frames (fewer when the clip is shorter), packed frame after frame.
    pub fn last_frames(self, n: usize) -> Result<Vec<Vec<u8>>, MediaError> {
        let mut kept = std::collections::VecDeque::with_capacity(n + 1);
        self.decode(|rgb| {
            kept.push_back(rgb);
            if kept.len() > n {
                kept.pop_front();
            }
            Ok::<_, MediaError>(())
        })?;
        Ok(kept.into())
    }
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

/// A decoded yuv420p picture as RGB8 with the BT.709 limited-range matrix longtake's encoder
/// signals and uses. openh264's own `write_rgb8` assumes BT.601, which would shift every
/// saturated colour by up to ~20 levels, enough to matter when colours are named.
fn yuv_to_rgb(yuv: &dyn YUVSource) -> Vec<u8> {
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
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(width: u32, height: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn pictures_read_as_rgb_whatever_their_colour_type() {
        let rgba = png_of(2, 1, png::ColorType::Rgba, &[1, 2, 3, 255, 4, 5, 6, 0]);
        let picture = decode_png(&rgba).unwrap();
        assert_eq!((picture.width, picture.height), (2, 1));
        assert_eq!(picture.rgb, vec![1, 2, 3, 4, 5, 6]);
        let grey = png_of(1, 2, png::ColorType::Grayscale, &[9, 200]);
        assert_eq!(decode_png(&grey).unwrap().rgb, vec![9, 9, 9, 200, 200, 200]);
    }

    #[test]
    fn a_picture_larger_than_longtake_reads_is_refused_from_its_header() {
        // the header claims 9000×9000; the data is never read
        let mut encoder_out = Vec::new();
        let mut encoder = png::Encoder::new(&mut encoder_out, 9000, 1);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 9000]).unwrap();
        writer.finish().unwrap();
        let e = decode_png(&encoder_out).unwrap_err().to_string();
        assert_eq!(
            e,
            "larger than longtake reads (9000×1; at most 8192 pixels a side)"
        );
    }

    #[test]
    fn unreadable_files_are_named_for_what_they_are_not() {
        let e = decode_png(b"GIF89a not a png").unwrap_err().to_string();
        assert!(e.starts_with("not a readable PNG"), "{e}");
        let e = Mp4Clip::open(b"\x89PNG\r\n\x1a\n....")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("not a readable MP4"), "{e}");
        let mut truncated = png_of(4, 4, png::ColorType::Rgb, &[7; 48]);
        truncated.truncate(truncated.len() - 20);
        assert!(decode_png(&truncated).is_err());
    }
}
