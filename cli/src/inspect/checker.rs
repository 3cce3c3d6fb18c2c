//! The measurements of a clip: its background, the object in every frame, the object's colour
//! and shape over the clip, its motion and how steady all of that is from frame to frame.
//!
//! Everything is measured, then named: a measured colour is given the nearest palette name and
//! its distance, so a blurred or slightly off render still reads as what it most resembles, and
//! the distance says how far off it is.

use serde::Serialize;

use super::frame::Frame;
use super::motion::{self, Motion};
use super::segment::{largest_blob, Blob, FrameBackground, Topology};
use super::stats::{mean, median, median_rgb, std_dev};
use super::world::{distance, nearest, nearest_faded, Named, Shape, BACKGROUNDS, OBJECT_COLORS};

/// The least RGB distance from the background that makes a pixel an object pixel. The least
/// object–background distance the world draws is about 101 (purple on gray), so this takes a
/// pixel at least ~40% covered by the object even in that worst case.
pub const OBJECT_MIN_DISTANCE: f64 = 40.0;

/// In noisy clips the threshold rises to this many times the median pixel distance from the
/// background (for Gaussian noise of σ per channel that median is ~1.5σ, so ~6σ).
pub const NOISE_FACTOR: f64 = 4.0;

/// A blob smaller than this share of the frame is not the object (8 px at 64×64; the world's
/// smallest object, a triangle of radius 6, covers about 72).
pub const MIN_OBJECT_AREA: f64 = 0.002;

/// A blob touching the border with less than this share of the clip's median area is cut off
/// by the border: the object has (partly) left the frame.
pub const CUT_OFF_AREA: f64 = 0.6;

/// The least share of its colour's difference from the background an object may keep and still
/// be named by that colour: blur and faintness fade a small object towards the background, but
/// an object less than 60% of the way to its colour is some other colour.
pub const MIN_COLOR_STRENGTH: f64 = 0.6;

/// Why a sequence of frames cannot be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("the clip has no frames")]
    NoFrames,
    #[error("frame {index} is {got}, but frame 0 is {expected}")]
    SizeChanges {
        index: usize,
        got: String,
        expected: String,
    },
}

/// Everything measured on a clip.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurements {
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub background: BackgroundFigures,
    /// `None` when no frame shows an object.
    pub object: Option<ObjectFigures>,
    /// `None` when fewer than two frames show an object.
    pub motion: Option<MotionFigures>,
    pub consistency: Consistency,
    /// The object in each frame.
    pub per_frame: Vec<FrameObject>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackgroundFigures {
    /// Mean colour of every pixel not taken for the object, over the clip.
    pub measured_rgb: [f64; 3],
    pub nearest: Named,
    pub distance: f64,
    /// The RGB distance from the background above which a pixel was an object pixel.
    pub object_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectFigures {
    /// Per-channel median over the frames of each frame's core colour.
    pub median_rgb: [f64; 3],
    /// The nearest palette colour allowing a fade towards the background
    /// ([`super::world::nearest_faded`] down to [`MIN_COLOR_STRENGTH`]), the distance to it and
    /// the strength at which it is nearest (1: not faded).
    pub nearest: Named,
    pub distance: f64,
    pub strength: f64,
    /// Median area, px.
    pub median_area: f64,
    /// Median share of its bounding box the object fills, and the shape whose share is nearest:
    /// a figure, not a judgement (thresholding a small blurred shape moves it by ~0.1).
    pub fill_ratio: f64,
    pub nearest_shape: Shape,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MotionFigures {
    #[serde(flatten)]
    pub motion: Motion,
    pub speed: f64,
    pub reflections: usize,
    /// No frame shows the object cut off by the border.
    pub stays_inside: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Consistency {
    /// Standard deviation over mean of the object's area across the frames it was found in.
    pub area_cv: Option<f64>,
    /// RGB norm of the per-channel standard deviations of the core colour across frames.
    pub color_std: Option<f64>,
    /// Largest centroid move between consecutive frames the object was found in, px.
    pub max_centroid_jump: Option<f64>,
    /// Frames in which no object was found.
    pub missing_frames: Vec<usize>,
}

/// The object in one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameObject {
    pub index: usize,
    /// The largest blob was at least [`MIN_OBJECT_AREA`] of the frame.
    pub found: bool,
    /// The largest blob, found or not (a faint object leaves a small one).
    pub blob: Option<Blob>,
}

impl FrameObject {
    /// The blob, where it was taken for the object.
    pub fn object(&self) -> Option<&Blob> {
        self.blob.as_ref().filter(|_| self.found)
    }
}

/// Measures `frames`, which must all have one size, on a picture plane of `topology` (a torus
/// joins a blob across the edges and follows a track past them).
pub fn measure(frames: &[Frame], topology: Topology) -> Result<Measurements, CheckError> {
    let first = frames.first().ok_or(CheckError::NoFrames)?;
    let (width, height) = (first.width(), first.height());
    for (index, frame) in frames.iter().enumerate() {
        if (frame.width(), frame.height()) != (width, height) {
            return Err(CheckError::SizeChanges {
                index,
                got: format!("{}x{}", frame.width(), frame.height()),
                expected: format!("{width}x{height}"),
            });
        }
    }

    let backgrounds: Vec<FrameBackground> = frames.iter().map(FrameBackground::of).collect();
    let noise = median(&backgrounds.iter().map(|b| b.noise).collect::<Vec<_>>())
        .expect("there is at least one frame");
    let threshold = OBJECT_MIN_DISTANCE.max(NOISE_FACTOR * noise);
    let min_area = (MIN_OBJECT_AREA * (width * height) as f64).max(4.0);

    let per_frame: Vec<FrameObject> = frames
        .iter()
        .zip(&backgrounds)
        .enumerate()
        .map(|(index, (frame, background))| {
            let blob = largest_blob(frame, background.rgb, threshold, topology);
            FrameObject {
                index,
                found: blob.as_ref().is_some_and(|b| b.area as f64 >= min_area),
                blob,
            }
        })
        .collect();

    let background = measure_background(frames, &backgrounds, threshold);
    let found: Vec<&Blob> = per_frame.iter().filter_map(FrameObject::object).collect();
    let object = measure_object(&found, background.measured_rgb);
    let track: Vec<(usize, [f64; 2])> = per_frame
        .iter()
        .filter_map(|f| f.object().map(|b| (f.index, b.centroid)))
        .collect();
    let track = topology.unwrap_track(&track, width, height);
    let motion =
        motion::analyse(&track, half_extent(&found), width, height).map(|motion| MotionFigures {
            speed: motion.speed(),
            reflections: motion.reflections(),
            stays_inside: stays_inside(&found),
            motion,
        });
    let consistency = Consistency {
        area_cv: std_dev(&areas(&found))
            .zip(mean(&areas(&found)))
            .map(|(s, m)| s / m),
        color_std: (!found.is_empty()).then(|| {
            (0..3)
                .map(|c| {
                    let channel: Vec<f64> = found.iter().map(|b| b.core_rgb[c]).collect();
                    std_dev(&channel).expect("not empty").powi(2)
                })
                .sum::<f64>()
                .sqrt()
        }),
        max_centroid_jump: track
            .windows(2)
            .map(|w| distance([w[0].1[0], w[0].1[1], 0.0], [w[1].1[0], w[1].1[1], 0.0]))
            .max_by(f64::total_cmp),
        missing_frames: per_frame
            .iter()
            .filter(|f| !f.found)
            .map(|f| f.index)
            .collect(),
    };
    Ok(Measurements {
        frames: frames.len(),
        width,
        height,
        background,
        object,
        motion,
        consistency,
        per_frame,
    })
}

fn areas(found: &[&Blob]) -> Vec<f64> {
    found.iter().map(|b| b.area as f64).collect()
}

fn measure_background(
    frames: &[Frame],
    backgrounds: &[FrameBackground],
    threshold: f64,
) -> BackgroundFigures {
    let mut sum = [0.0; 3];
    let mut count = 0usize;
    for (frame, background) in frames.iter().zip(backgrounds) {
        for pixel in frame.pixels() {
            let pixel = pixel.map(f64::from);
            if distance(pixel, background.rgb) <= threshold {
                for (s, v) in sum.iter_mut().zip(pixel) {
                    *s += v;
                }
                count += 1;
            }
        }
    }
    // The per-channel median is within the threshold of itself, so some pixel always counts
    // unless every frame is noise; fall back to the medians then.
    let measured_rgb = if count > 0 {
        sum.map(|s| s / count as f64)
    } else {
        median_rgb(&backgrounds.iter().map(|b| b.rgb).collect::<Vec<_>>()).expect("frames")
    };
    let (nearest, distance) = nearest(&BACKGROUNDS, measured_rgb);
    BackgroundFigures {
        measured_rgb,
        nearest,
        distance,
        object_threshold: threshold,
    }
}

fn measure_object(found: &[&Blob], background: [f64; 3]) -> Option<ObjectFigures> {
    let median_rgb = median_rgb(&found.iter().map(|b| b.core_rgb).collect::<Vec<_>>())?;
    let (nearest, distance, strength) =
        nearest_faded(&OBJECT_COLORS, median_rgb, background, MIN_COLOR_STRENGTH);
    let fill_ratio = median(&found.iter().map(|b| b.fill_ratio()).collect::<Vec<_>>())?;
    let nearest_shape = *Shape::ALL
        .iter()
        .min_by(|a, b| {
            (a.fill_ratio() - fill_ratio)
                .abs()
                .total_cmp(&(b.fill_ratio() - fill_ratio).abs())
        })
        .expect("three shapes");
    Some(ObjectFigures {
        median_rgb,
        nearest,
        distance,
        strength,
        median_area: median(&areas(found))?,
        fill_ratio,
        nearest_shape,
    })
}

/// The object's usual half-size along x and y, px: the median over `found` of half its bounds.
pub fn half_extent(found: &[&Blob]) -> [f64; 2] {
    let half = |axis: usize| {
        let halves: Vec<f64> = found
            .iter()
            .map(|b| (b.bounds[axis + 2] - b.bounds[axis] + 1) as f64 / 2.0)
            .collect();
        median(&halves).unwrap_or(0.0)
    };
    [half(0), half(1)]
}

/// Whether no frame shows the object cut off: touching the border with much less than its usual
/// area. Touching alone is allowed, since a bouncing object reflects exactly at the border.
fn stays_inside(found: &[&Blob]) -> bool {
    let Some(usual) = median(&areas(found)) else {
        return true;
    };
    !found
        .iter()
        .any(|b| b.touches_edge && (b.area as f64) < CUT_OFF_AREA * usual)
}
