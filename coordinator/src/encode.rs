//! Video output: turns a stream of RGB8 frames into an H.264/MP4 file or a numbered PNG
//! sequence, one frame at a time so a minute-long clip never has to sit in memory whole.
//!
//! The MP4 path converts RGB to BT.709 limited-range yuv420p here (not in openh264) so the
//! colour matrix we signal in the SPS is the one we actually used, encodes with openh264
//! (built from source, no system packages) and muxes with the pure-Rust `mp4` crate. Nothing
//! time-dependent goes into the container, so the same frames give a byte-identical file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, Profile, QpRange,
    RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::YUVSlices;
use openh264::{OpenH264API, Timestamp};

/// Everything that can go wrong while writing a clip; every variant names the output path.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{path}: invalid video size {width}x{height}: {reason}")]
    InvalidSize {
        path: PathBuf,
        width: u32,
        height: u32,
        reason: &'static str,
    },
    #[error("{path}: invalid frame rate {fps}: must be between 1 and 1000 frames per second")]
    InvalidFps { path: PathBuf, fps: u32 },
    #[error("{path}: invalid quality setting: {reason}")]
    InvalidQuality { path: PathBuf, reason: String },
    #[error("{path}: frame {index} has {got} bytes, expected {expected} ({width}x{height} RGB8)")]
    FrameSize {
        path: PathBuf,
        index: u64,
        got: usize,
        expected: usize,
        width: u32,
        height: u32,
    },
    #[error("{path}: no frames were pushed; refusing to write an empty video")]
    NoFrames { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: H.264 encoder: {message}")]
    H264 { path: PathBuf, message: String },
    #[error("{path}: MP4 muxer: {source}")]
    Mux {
        path: PathBuf,
        #[source]
        source: mp4::Error,
    },
    #[error("{path}: PNG encoder: {source}")]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

type Result<T, E = EncodeError> = std::result::Result<T, E>;

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> EncodeError + 'a {
    move |source| EncodeError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// How hard the H.264 encoder may compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Constant quantiser, 0 (best) ..= 51 (worst). Independent of resolution, which is why it
    /// is the default for renders: the picture quality does not depend on guessing a bitrate.
    ConstantQp(u8),
    /// Target average bitrate in bits per second (the encoder varies the quantiser). Frames are
    /// never dropped to meet it, so complex scenes may overshoot.
    Bitrate(u32),
}

impl Default for Quality {
    /// QP 18: visually close to lossless for rendered footage at any resolution.
    fn default() -> Self {
        Quality::ConstantQp(18)
    }
}

/// Output container, chosen from the path or explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    /// H.264 yuv420p in an MP4 file.
    Mp4,
    /// A directory of `frame_00000.png`, `frame_00001.png`, ... (lossless RGB8).
    PngSequence,
}

impl VideoFormat {
    /// The format for `path`: `explicit` if given, otherwise `.mp4` → [`VideoFormat::Mp4`]; an
    /// existing directory, a path ending in `/` or a path without extension →
    /// [`VideoFormat::PngSequence`]. Any other extension is an error rather than a guess.
    pub fn for_path(path: &Path, explicit: Option<VideoFormat>) -> Result<VideoFormat> {
        if let Some(format) = explicit {
            return Ok(format);
        }
        let ends_with_separator = path
            .as_os_str()
            .to_str()
            .is_some_and(|s| s.ends_with('/') || s.ends_with(std::path::MAIN_SEPARATOR));
        if path.is_dir() || ends_with_separator {
            return Ok(VideoFormat::PngSequence);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("mp4") => Ok(VideoFormat::Mp4),
            None => Ok(VideoFormat::PngSequence),
            Some(ext) => Err(EncodeError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "unsupported output extension .{ext}: use .mp4, or a directory for a PNG sequence"
                ),
            }),
        }
    }
}

/// A destination for frames, so callers can switch on the format with one code path. `Send` so
/// encoding can run on its own thread while the next frames are decoded.
pub trait FrameSink: Send {
    /// Frame width in pixels.
    fn width(&self) -> u32;
    /// Frame height in pixels.
    fn height(&self) -> u32;
    /// Frames accepted so far.
    fn frames_written(&self) -> u64;
    /// Appends one frame: `height * width * 3` bytes, row-major RGB8.
    fn push_frame(&mut self, rgb: &[u8]) -> Result<()>;
    /// Flushes and closes the output; without it the output is incomplete.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Opens the writer for `path` in the format [`VideoFormat::for_path`] picks. `fps` and
/// `quality` only matter for MP4.
pub fn open_writer(
    path: &Path,
    format: Option<VideoFormat>,
    width: u32,
    height: u32,
    fps: u32,
    quality: Quality,
) -> Result<Box<dyn FrameSink>> {
    Ok(match VideoFormat::for_path(path, format)? {
        VideoFormat::Mp4 => Box::new(Mp4Writer::create_with_quality(
            path, width, height, fps, quality,
        )?),
        VideoFormat::PngSequence => Box::new(PngSequenceWriter::create(path, width, height)?),
    })
}

fn check_frame(
    path: &Path,
    index: u64,
    rgb: &[u8],
    width: u32,
    height: u32,
) -> Result<(), EncodeError> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected {
        return Err(EncodeError::FrameSize {
            path: path.to_path_buf(),
            index,
            got: rgb.len(),
            expected,
            width,
            height,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// MP4 / H.264
// ---------------------------------------------------------------------------------------------

/// Ticks per frame in the track timescale. A timescale of `fps * 1000` keeps every sample
/// duration an exact integer and is fine-grained enough that players never round.
const TICKS_PER_FRAME: u32 = 1000;

/// H.264 level 5.2's bitrate ceiling for Baseline; openh264 refuses to initialise above it.
const MAX_BITRATE: u32 = 240_000_000;

/// Streaming H.264 (yuv420p, BT.709 limited range) MP4 writer. Samples go to disk about once a
/// second of video; only the sample tables stay in memory. The index (moov) is written by
/// [`Mp4Writer::finish`], so a writer dropped without it leaves an unplayable file.
pub struct Mp4Writer {
    path: PathBuf,
    width: u32,
    height: u32,
    fps: u32,
    encoder: Encoder,
    muxer: mp4::Mp4Writer<BufWriter<File>>,
    /// SPS and PPS of the first IDR; they go into `avcC`, so every later one must match.
    parameter_sets: Option<(Vec<u8>, Vec<u8>)>,
    frames: u64,
    // Reused between frames to avoid per-frame allocations.
    yuv: Vec<u8>,
    sample: Vec<u8>,
}

impl Mp4Writer {
    /// Creates `path` with the default [`Quality`].
    pub fn create(path: impl AsRef<Path>, width: u32, height: u32, fps: u32) -> Result<Self> {
        Self::create_with_quality(path, width, height, fps, Quality::default())
    }

    /// Creates `path` (truncating it) for a `width`x`height` clip at `fps` frames per second.
    pub fn create_with_quality(
        path: impl AsRef<Path>,
        width: u32,
        height: u32,
        fps: u32,
        quality: Quality,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let size_err = |reason| EncodeError::InvalidSize {
            path: path.clone(),
            width,
            height,
            reason,
        };
        if width == 0 || height == 0 {
            return Err(size_err("width and height must be positive"));
        }
        if (width | height) & 1 != 0 {
            return Err(size_err(
                "H.264 4:2:0 needs even width and height (crop or pad by one pixel)",
            ));
        }
        // openh264 (levels up to 5.2) stops at 3840x2160 in either orientation.
        if width.max(height) > 3840 || width.min(height) > 2160 {
            return Err(size_err("larger than 3840x2160, the H.264 encoder's limit"));
        }
        if fps == 0 || fps > 1000 {
            return Err(EncodeError::InvalidFps { path, fps });
        }

        let mut config = EncoderConfig::new()
            // Every pushed frame must become exactly one sample.
            .skip_frames(false)
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .usage_type(UsageType::CameraVideoRealTime)
            .complexity(Complexity::High)
            // Baseline decodes everywhere; openh264 has no CABAC/B-frames to gain from High.
            .profile(Profile::Baseline)
            // A keyframe every two seconds keeps seeking cheap in long clips.
            .intra_frame_period(IntraFramePeriod::from_num_frames(2 * fps))
            // One thread, one slice: the bitstream is identical run to run.
            .num_threads(1)
            .vui(VuiConfig::bt709());
        let pixels_per_second = u64::from(width) * u64::from(height) * u64::from(fps);
        config = match quality {
            Quality::ConstantQp(qp) => {
                if qp > 51 {
                    return Err(EncodeError::InvalidQuality {
                        path,
                        reason: format!("QP {qp} is outside 0..=51"),
                    });
                }
                // Pinning min = max QP makes the rate controller's choices irrelevant. The
                // nominal bitrate still picks the H.264 level, so keep it modest (1/8 bit per
                // pixel, what QP ~18 renders actually use) instead of inflating the level.
                let nominal = (pixels_per_second / 8).clamp(100_000, MAX_BITRATE.into()) as u32;
                config
                    .rate_control_mode(RateControlMode::Quality)
                    .bitrate(BitRate::from_bps(nominal))
                    .qp(QpRange::new(qp, qp))
            }
            Quality::Bitrate(bps) => {
                if !(1..=MAX_BITRATE).contains(&bps) {
                    return Err(EncodeError::InvalidQuality {
                        path,
                        reason: format!("bitrate {bps} bit/s is outside 1..={MAX_BITRATE}"),
                    });
                }
                config
                    .rate_control_mode(RateControlMode::Bitrate)
                    .bitrate(BitRate::from_bps(bps))
            }
        };
        let encoder =
            Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| {
                EncodeError::H264 {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;

        // Read access is needed to patch the moov header after the muxer is done (see finish).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path, "cannot create file"))?;
        let mp4_config = mp4::Mp4Config {
            major_brand: mp4::FourCC::from(*b"isom"),
            minor_version: 512,
            compatible_brands: [b"isom", b"iso2", b"avc1", b"mp41"]
                .into_iter()
                .map(|b| mp4::FourCC::from(*b))
                .collect(),
            timescale: fps * TICKS_PER_FRAME,
        };
        let muxer =
            mp4::Mp4Writer::write_start(BufWriter::with_capacity(1 << 20, file), &mp4_config)
                .map_err(|source| EncodeError::Mux {
                    path: path.clone(),
                    source,
                })?;

        let pixels = width as usize * height as usize;
        Ok(Self {
            path,
            width,
            height,
            fps,
            encoder,
            muxer,
            parameter_sets: None,
            frames: 0,
            yuv: vec![0; pixels + pixels / 2],
            sample: Vec::new(),
        })
    }

    /// Encodes one `height * width * 3` byte RGB8 frame and appends it to the file.
    pub fn push_frame(&mut self, rgb: &[u8]) -> Result<()> {
        check_frame(&self.path, self.frames, rgb, self.width, self.height)?;
        let (w, h) = (self.width as usize, self.height as usize);
        let (y, uv) = self.yuv.split_at_mut(w * h);
        let (u, v) = uv.split_at_mut(w * h / 4);
        rgb_to_yuv420_bt709(rgb, w, h, y, u, v);
        let source = YUVSlices::new((y, u, v), (w, h), (w, w / 2, w / 2));

        let timestamp = Timestamp::from_millis(self.frames * 1000 / u64::from(self.fps));
        let bitstream =
            self.encoder
                .encode_at(&source, timestamp)
                .map_err(|e| EncodeError::H264 {
                    path: self.path.clone(),
                    message: format!("frame {}: {e}", self.frames),
                })?;

        // Annex B NAL units → one MP4 sample of 4-byte length-prefixed NAL units, with the
        // parameter sets moved out of band into avcC.
        self.sample.clear();
        let mut is_sync = false;
        let mut sps: Option<Vec<u8>> = None;
        let mut pps: Option<Vec<u8>> = None;
        for layer_index in 0..bitstream.num_layers() {
            let Some(layer) = bitstream.layer(layer_index) else {
                continue;
            };
            for nal_index in 0..layer.nal_count() {
                let Some(nal) = layer.nal_unit(nal_index) else {
                    continue;
                };
                let nal = strip_start_code(nal);
                let Some(&header) = nal.first() else { continue };
                match header & 0x1f {
                    7 => sps = Some(nal.to_vec()),
                    8 => pps = Some(nal.to_vec()),
                    nal_type => {
                        if nal_type == 5 {
                            is_sync = true;
                        }
                        self.sample
                            .extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        self.sample.extend_from_slice(nal);
                    }
                }
            }
        }
        if self.sample.is_empty() {
            return Err(EncodeError::H264 {
                path: self.path.clone(),
                message: format!("frame {} produced no picture data", self.frames),
            });
        }

        match (&self.parameter_sets, sps, pps) {
            (None, Some(sps), Some(pps)) => {
                self.add_track(&sps, &pps)?;
                self.parameter_sets = Some((sps, pps));
            }
            (None, _, _) => {
                return Err(EncodeError::H264 {
                    path: self.path.clone(),
                    message: "first frame carries no SPS/PPS".into(),
                })
            }
            (Some((first_sps, first_pps)), sps, pps) => {
                if sps.is_some_and(|s| &s != first_sps) || pps.is_some_and(|p| &p != first_pps) {
                    return Err(EncodeError::H264 {
                        path: self.path.clone(),
                        message: format!(
                            "frame {}: parameter sets changed mid-stream, which avc1 cannot carry",
                            self.frames
                        ),
                    });
                }
            }
        }

        let sample = mp4::Mp4Sample {
            start_time: self.frames * u64::from(TICKS_PER_FRAME),
            duration: TICKS_PER_FRAME,
            rendering_offset: 0,
            is_sync,
            bytes: mp4::Bytes::copy_from_slice(&self.sample),
        };
        self.muxer
            .write_sample(1, &sample)
            .map_err(|source| EncodeError::Mux {
                path: self.path.clone(),
                source,
            })?;
        self.frames += 1;
        Ok(())
    }

    fn add_track(&mut self, sps: &[u8], pps: &[u8]) -> Result<()> {
        if sps.len() < 4 {
            return Err(EncodeError::H264 {
                path: self.path.clone(),
                message: format!("SPS of {} bytes is too short", sps.len()),
            });
        }
        let track = mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale: self.fps * TICKS_PER_FRAME,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                // Checked against the 3840x2160 limit in create.
                width: self.width as u16,
                height: self.height as u16,
                seq_param_set: sps.to_vec(),
                pic_param_set: pps.to_vec(),
            }),
        };
        self.muxer
            .add_track(&track)
            .map_err(|source| EncodeError::Mux {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes the index (moov) and closes the file. Without it the file is unplayable.
    pub fn finish(mut self) -> Result<()> {
        if self.frames == 0 {
            drop(self.muxer);
            // Nothing useful was written; do not leave a broken .mp4 behind.
            let _ = fs::remove_file(&self.path);
            return Err(EncodeError::NoFrames { path: self.path });
        }
        let mux_err = |source| EncodeError::Mux {
            path: self.path.clone(),
            source,
        };
        self.muxer.write_end().map_err(mux_err)?;
        let mut file = self
            .muxer
            .into_writer()
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io_err(&self.path, "cannot write file"))?;
        patch_next_track_id(&mut file)
            .map_err(io_err(&self.path, "cannot patch the movie header"))?;
        file.sync_all()
            .map_err(io_err(&self.path, "cannot flush file"))?;
        Ok(())
    }
}

impl FrameSink for Mp4Writer {
    fn width(&self) -> u32 {
        self.width
    }
    fn height(&self) -> u32 {
        self.height
    }
    fn frames_written(&self) -> u64 {
        self.frames
    }
    fn push_frame(&mut self, rgb: &[u8]) -> Result<()> {
        Mp4Writer::push_frame(self, rgb)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Mp4Writer::finish(*self)
    }
}

fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

/// The `mp4` crate leaves `mvhd.next_track_ID` at 1 although track 1 exists; ISO/IEC 14496-12
/// requires it to exceed every track ID, and strict tools reject the file otherwise. Walks the
/// top-level boxes to `moov/mvhd` and writes 2 there.
fn patch_next_track_id(file: &mut File) -> io::Result<()> {
    let invalid = |msg| io::Error::new(io::ErrorKind::InvalidData, msg);
    let end = file.seek(SeekFrom::End(0))?;
    let mut pos = 0u64;
    while pos + 8 <= end {
        let (size, kind, header) = read_box_header(file, pos, end)?;
        if &kind == b"moov" {
            let (_, child, child_header) = read_box_header(file, pos + header, end)?;
            if &child != b"mvhd" {
                return Err(invalid("moov does not start with mvhd"));
            }
            let mvhd_body = pos + header + child_header;
            file.seek(SeekFrom::Start(mvhd_body))?;
            let mut version = [0u8; 1];
            file.read_exact(&mut version)?;
            // version/flags, 3 times (32 or 64 bit) + timescale, rate, volume, reserved, matrix,
            // pre_defined; then next_track_ID.
            let times = if version[0] == 1 { 28 } else { 16 };
            file.seek(SeekFrom::Start(
                mvhd_body + 4 + times + 4 + 2 + 10 + 36 + 24,
            ))?;
            file.write_all(&2u32.to_be_bytes())?;
            return Ok(());
        }
        pos += size;
    }
    Err(invalid("no moov box"))
}

/// Returns (box size, type, header length) of the box at `pos`.
fn read_box_header(file: &mut File, pos: u64, end: u64) -> io::Result<(u64, [u8; 4], u64)> {
    let mut buf = [0u8; 8];
    file.seek(SeekFrom::Start(pos))?;
    file.read_exact(&mut buf)?;
    let kind = [buf[4], buf[5], buf[6], buf[7]];
    let (size, header) = match u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) {
        0 => (end - pos, 8),
        1 => {
            file.read_exact(&mut buf)?;
            (u64::from_be_bytes(buf), 16)
        }
        n => (u64::from(n), 8),
    };
    if size < header || pos + size > end {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt box size",
        ));
    }
    Ok((size, kind, header))
}

// BT.709 limited-range RGB → Y'CbCr in 16-bit fixed point (coefficient × 2^16, rounded; the
// chroma rows sum to exactly zero so greys map to 128).
const Y_R: i32 = 11966; // 0.182586
const Y_G: i32 = 40254; // 0.614231
const Y_B: i32 = 4064; // 0.062007
const CB_R: i32 = -6596; // -0.100644
const CB_B: i32 = 28784; // 0.439216
const CB_G: i32 = -(CB_R + CB_B);
const CR_R: i32 = 28784; // 0.439216
const CR_B: i32 = -2639; // -0.040274
const CR_G: i32 = -(CR_R + CR_B);

/// Converts row-major RGB8 to planar yuv420p. Chroma is the mean of each 2x2 block (sums of
/// four pixels, hence the extra 2 bits of shift). Integer maths: identical on every machine.
fn rgb_to_yuv420_bt709(
    rgb: &[u8],
    width: usize,
    height: usize,
    y: &mut [u8],
    u: &mut [u8],
    v: &mut [u8],
) {
    let half_w = width / 2;
    for by in 0..height / 2 {
        let row0 = &rgb[2 * by * width * 3..(2 * by + 1) * width * 3];
        let row1 = &rgb[(2 * by + 1) * width * 3..(2 * by + 2) * width * 3];
        let (y0, y1) = y[2 * by * width..(2 * by + 2) * width].split_at_mut(width);
        let u_row = &mut u[by * half_w..(by + 1) * half_w];
        let v_row = &mut v[by * half_w..(by + 1) * half_w];
        for bx in 0..half_w {
            let (mut sr, mut sg, mut sb) = (0i32, 0i32, 0i32);
            for (src, dst) in [(row0, &mut *y0), (row1, &mut *y1)] {
                for x in [2 * bx, 2 * bx + 1] {
                    let p = &src[3 * x..3 * x + 3];
                    let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
                    dst[x] = ((Y_R * r + Y_G * g + Y_B * b + (16 << 16) + (1 << 15)) >> 16) as u8;
                    sr += r;
                    sg += g;
                    sb += b;
                }
            }
            let chroma = |cr: i32, cg: i32, cb: i32| {
                ((cr * sr + cg * sg + cb * sb + (128 << 18) + (1 << 17)) >> 18) as u8
            };
            u_row[bx] = chroma(CB_R, CB_G, CB_B);
            v_row[bx] = chroma(CR_R, CR_G, CR_B);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PNG sequence
// ---------------------------------------------------------------------------------------------

/// Writes each frame losslessly as `dir/frame_00000.png`, `dir/frame_00001.png`, ...
pub struct PngSequenceWriter {
    dir: PathBuf,
    width: u32,
    height: u32,
    frames: u64,
    encoded: Vec<u8>,
}

/// Writes one `height * width * 3` byte RGB8 picture as a PNG file at `path`, encoded into
/// `buffer` first and written in one call so that write errors surface here instead of being
/// swallowed by a `BufWriter` dropped inside png's `finish()`.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    rgb: &[u8],
    buffer: &mut Vec<u8>,
) -> Result<()> {
    check_frame(path, 0, rgb, width, height)?;
    let png_err = |source| EncodeError::Png {
        path: path.to_path_buf(),
        source,
    };
    buffer.clear();
    let mut encoder = png::Encoder::new(&mut *buffer, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    fs::write(path, &buffer[..]).map_err(io_err(path, "cannot write file"))
}

impl PngSequenceWriter {
    /// Creates `dir` (and parents). Refuses a directory that already holds `frame_*.png` files,
    /// since stale frames from an earlier, longer render would silently join the sequence.
    pub fn create(dir: impl AsRef<Path>, width: u32, height: u32) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if width == 0 || height == 0 {
            return Err(EncodeError::InvalidSize {
                path: dir,
                width,
                height,
                reason: "width and height must be positive",
            });
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir, "cannot create directory"))?;
        let entries = fs::read_dir(&dir).map_err(io_err(&dir, "cannot list directory"))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&dir, "cannot list directory"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("frame_") && name.ends_with(".png") {
                return Err(EncodeError::Format {
                    path: dir,
                    reason: format!(
                        "directory already contains frames ({name}); remove them or choose another directory"
                    ),
                });
            }
        }
        Ok(Self {
            dir,
            width,
            height,
            frames: 0,
            encoded: Vec::new(),
        })
    }

    /// Path of frame `index` inside the sequence directory.
    pub fn frame_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("frame_{index:05}.png"))
    }

    /// Writes one `height * width * 3` byte RGB8 frame as the next PNG.
    pub fn push_frame(&mut self, rgb: &[u8]) -> Result<()> {
        check_frame(&self.dir, self.frames, rgb, self.width, self.height)?;
        let path = self.frame_path(self.frames);
        write_png(&path, self.width, self.height, rgb, &mut self.encoded)?;
        self.frames += 1;
        Ok(())
    }

    /// Ends the sequence; every frame is already complete on disk.
    pub fn finish(self) -> Result<()> {
        if self.frames == 0 {
            return Err(EncodeError::NoFrames { path: self.dir });
        }
        Ok(())
    }
}

impl FrameSink for PngSequenceWriter {
    fn width(&self) -> u32 {
        self.width
    }
    fn height(&self) -> u32 {
        self.height
    }
    fn frames_written(&self) -> u64 {
        self.frames
    }
    fn push_frame(&mut self, rgb: &[u8]) -> Result<()> {
        PngSequenceWriter::push_frame(self, rgb)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        PngSequenceWriter::finish(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(rgb: [u8; 3]) -> (u8, u8, u8) {
        let block = rgb.repeat(4);
        let (mut y, mut u, mut v) = ([0u8; 4], [0u8; 1], [0u8; 1]);
        rgb_to_yuv420_bt709(&block, 2, 2, &mut y, &mut u, &mut v);
        assert!(y.iter().all(|&l| l == y[0]));
        (y[0], u[0], v[0])
    }

    #[test]
    fn bt709_limited_range_reference_values() {
        // Values from ITU-R BT.709 with 8-bit studio swing (Y 16..235, C 16..240).
        assert_eq!(convert([0, 0, 0]), (16, 128, 128));
        assert_eq!(convert([255, 255, 255]), (235, 128, 128));
        assert_eq!(convert([128, 128, 128]), (126, 128, 128));
        assert_eq!(convert([255, 0, 0]), (63, 102, 240));
        assert_eq!(convert([0, 255, 0]), (173, 42, 26));
        assert_eq!(convert([0, 0, 255]), (32, 240, 118));
    }

    #[test]
    fn chroma_is_the_mean_of_each_block() {
        // Left block black, right block white: chroma stays neutral, luma is per pixel.
        let mut rgb = vec![0u8; 4 * 2 * 3];
        for row in 0..2 {
            rgb[(row * 4 + 2) * 3..(row * 4 + 4) * 3].fill(255);
        }
        let (mut y, mut u, mut v) = ([0u8; 8], [0u8; 2], [0u8; 2]);
        rgb_to_yuv420_bt709(&rgb, 4, 2, &mut y, &mut u, &mut v);
        assert_eq!(y, [16, 16, 235, 235, 16, 16, 235, 235]);
        assert_eq!((u, v), ([128, 128], [128, 128]));
    }

    #[test]
    fn start_codes_are_stripped() {
        assert_eq!(strip_start_code(&[0, 0, 0, 1, 0x67, 1]), &[0x67, 1]);
        assert_eq!(strip_start_code(&[0, 0, 1, 0x68]), &[0x68]);
        assert_eq!(strip_start_code(&[0x65, 0, 0, 1]), &[0x65, 0, 0, 1]);
    }
}
