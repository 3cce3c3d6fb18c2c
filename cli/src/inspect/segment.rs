//! Finding the object in one frame: the frame's dominant colour is the background, pixels far
//! enough from it in RGB are object pixels, and the largest 8-connected blob of them is the
//! object. Soft edges and noise only move a few pixels across the threshold; the blob's centroid
//! and the mean colour of its interior stay put.

use serde::Serialize;

use longtake_worker::model::render::ToyWorld;

use super::frame::Frame;
use super::world::{distance, Direction};

/// A core pixel is at least this share as far from the background as the blob's 90th
/// percentile pixel (a percentile, not the farthest, so one noisy pixel does not set the bar).
pub const CORE_SHARE: f64 = 0.85;

/// The background of one frame: its per-channel median colour, which is the background's as long
/// as the object covers under half the picture (the world's covers at most a tenth), and the
/// median distance of all pixels from it, a measure of the frame's noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameBackground {
    pub rgb: [f64; 3],
    pub noise: f64,
}

impl FrameBackground {
    pub fn of(frame: &Frame) -> Self {
        let mut histograms = [[0usize; 256]; 3];
        for pixel in frame.pixels() {
            for (histogram, value) in histograms.iter_mut().zip(pixel) {
                histogram[value as usize] += 1;
            }
        }
        let half = frame.width() * frame.height() / 2;
        let rgb = histograms.map(|histogram| {
            let mut seen = 0;
            histogram
                .iter()
                .position(|&count| {
                    seen += count;
                    seen > half
                })
                .expect("the counts sum to the pixel count") as f64
        });
        let mut distances: Vec<f64> = frame
            .pixels()
            .map(|p| distance(p.map(f64::from), rgb))
            .collect();
        let mid = distances.len() / 2;
        let noise = *distances.select_nth_unstable_by(mid, f64::total_cmp).1;
        Self { rgb, noise }
    }
}

/// The shape of the picture plane: a plane with borders (the shipped toy world), or a torus
/// whose left edge continues at the right one and top at bottom (the wrapping world of
/// `worker/toy/world.py`, where a straight mover leaves by one edge and comes back by the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    #[default]
    Plane,
    Torus,
}

impl Topology {
    /// Where clips of `world` whose object moves in `directions` (one per prompt of the clip)
    /// are measured: on a torus only when every prompt's object wraps, i.e. moves straight in
    /// the wrapping world. A bouncing object stays inside the frame in both worlds, and joining
    /// the edges there would merge a large object touching one side with stray pixels on the
    /// other.
    pub fn of_world(world: ToyWorld, directions: impl IntoIterator<Item = Direction>) -> Self {
        let mut directions = directions.into_iter().peekable();
        let all_straight =
            directions.peek().is_some() && directions.all(|d| Direction::STRAIGHT.contains(&d));
        match world {
            ToyWorld::Wrapping if all_straight => Topology::Torus,
            _ => Topology::Plane,
        }
    }

    /// The displacement `to − from` along an axis of `size` pixels: on the torus the shorter way
    /// round, in `[−size/2, size/2)`.
    pub fn delta(self, from: f64, to: f64, size: usize) -> f64 {
        let d = to - from;
        match self {
            Topology::Plane => d,
            Topology::Torus => {
                let size = size as f64;
                (d + size / 2.0).rem_euclid(size) - size / 2.0
            }
        }
    }

    /// A track of `(frame, centroid)` points made continuous: on the torus each step is taken
    /// the shorter way round, so a mover that wraps keeps going past the edge in the track.
    pub fn unwrap_track(
        self,
        track: &[(usize, [f64; 2])],
        width: usize,
        height: usize,
    ) -> Vec<(usize, [f64; 2])> {
        let mut out: Vec<(usize, [f64; 2])> = Vec::with_capacity(track.len());
        for (i, &(frame, [x, y])) in track.iter().enumerate() {
            let point = match out.last() {
                Some(&(_, [px, py])) if self == Topology::Torus => {
                    let [qx, qy] = track[i - 1].1;
                    [
                        px + self.delta(qx, x, width),
                        py + self.delta(qy, y, height),
                    ]
                }
                _ => [x, y],
            };
            out.push((frame, point));
        }
        out
    }
}

/// The largest blob of object pixels in one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blob {
    /// Pixels in the blob.
    pub area: usize,
    /// Centre `(x, y)` of the blob and the pixels around it, weighted by their coverage, in the
    /// generator's coordinates (pixel `i` spans `[i, i+1)`).
    pub centroid: [f64; 2],
    /// Mean colour of the blob's core: its pixels at least [`CORE_SHARE`] as far from the
    /// background as its 90th-percentile pixel, so blurred, half-covered edge pixels do not pull
    /// the colour towards the background (a blurred object's geometric interior still holds
    /// them).
    pub core_rgb: [f64; 3],
    /// Inclusive pixel bounds `[x0, y0, x1, y1]`; on a torus, of the blob joined across the
    /// edges, so `x1` and `y1` may pass the frame's size.
    pub bounds: [usize; 4],
    /// Whether the blob reaches the frame's border (never on a torus, which has none).
    pub touches_edge: bool,
}

impl Blob {
    /// The share of its bounding box the blob fills.
    pub fn fill_ratio(&self) -> f64 {
        let [x0, y0, x1, y1] = self.bounds;
        self.area as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64
    }
}

/// The largest 8-connected blob of pixels farther than `threshold` from `background`, joined
/// across the edges on a torus; `None` when there is no such pixel.
pub fn largest_blob(
    frame: &Frame,
    background: [f64; 3],
    threshold: f64,
    topology: Topology,
) -> Option<Blob> {
    let (w, h) = (frame.width(), frame.height());
    let torus = topology == Topology::Torus;
    let object: Vec<bool> = frame
        .pixels()
        .map(|p| distance(p.map(f64::from), background) > threshold)
        .collect();
    // The 8 neighbours of pixel (x, y) given as unwrapped coordinates: their pixel index and
    // unwrapped coordinates (on the plane, only those inside the frame).
    let neighbours = |x: i64, y: i64| {
        (-1i64..=1)
            .flat_map(move |dy| (-1i64..=1).map(move |dx| (x + dx, y + dy)))
            .filter_map(move |(nx, ny)| {
                let (px, py) = if torus {
                    (nx.rem_euclid(w as i64), ny.rem_euclid(h as i64))
                } else if (0..w as i64).contains(&nx) && (0..h as i64).contains(&ny) {
                    (nx, ny)
                } else {
                    return None;
                };
                Some((py as usize * w + px as usize, nx, ny))
            })
    };
    // 0: not yet labelled; blobs are numbered from 1. Members carry their unwrapped coordinates
    // (on the torus, a blob across an edge continues past it).
    let mut label = vec![0u32; w * h];
    let mut best: Option<Vec<(usize, i64, i64)>> = None;
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !object[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push((start, (start % w) as i64, (start / w) as i64));
        let mut members = Vec::new();
        while let Some((i, x, y)) = stack.pop() {
            members.push((i, x, y));
            for (n, nx, ny) in neighbours(x, y) {
                if object[n] && label[n] == 0 {
                    label[n] = next;
                    stack.push((n, nx, ny));
                }
            }
        }
        if best.as_ref().is_none_or(|b| members.len() > b.len()) {
            best = Some(members);
        }
    }
    let members = best?;

    let from_background = |i: usize| distance(frame.pixel(i % w, i / w).map(f64::from), background);
    let mut distances: Vec<f64> = members.iter().map(|&(i, ..)| from_background(i)).collect();
    let rank = (distances.len() - 1) * 9 / 10;
    let strong = *distances.select_nth_unstable_by(rank, f64::total_cmp).1;
    let core: Vec<usize> = members
        .iter()
        .map(|&(i, ..)| i)
        .filter(|&i| from_background(i) >= CORE_SHARE * strong)
        .collect();
    let mut core_sum = [0.0; 3];
    for &i in &core {
        let p = frame.pixel(i % w, i / w);
        for (sum, value) in core_sum.iter_mut().zip(p) {
            *sum += f64::from(value);
        }
    }

    // Each pixel of the blob and of the ring around it weighs by how covered it looks (its
    // distance over the core's, at most 1), so the centroid moves smoothly as an anti-aliased
    // edge crosses pixels instead of jumping when a row crosses the threshold.
    let mut weighed = vec![false; w * h];
    let (mut sx, mut sy, mut weights) = (0.0, 0.0, 0.0);
    let mut bounds = [i64::MAX, i64::MAX, i64::MIN, i64::MIN];
    for &(_, x, y) in &members {
        for (n, nx, ny) in neighbours(x, y) {
            if !weighed[n] {
                weighed[n] = true;
                let weight = (from_background(n) / strong).min(1.0);
                sx += weight * (nx as f64 + 0.5);
                sy += weight * (ny as f64 + 0.5);
                weights += weight;
            }
        }
        bounds = [
            bounds[0].min(x),
            bounds[1].min(y),
            bounds[2].max(x),
            bounds[3].max(y),
        ];
    }
    // back into the frame: the bounds' top-left corner, and the centroid, modulo its size
    let (shift_x, shift_y) = (
        bounds[0].rem_euclid(w as i64) - bounds[0],
        bounds[1].rem_euclid(h as i64) - bounds[1],
    );
    let bounds = [
        (bounds[0] + shift_x) as usize,
        (bounds[1] + shift_y) as usize,
        (bounds[2] + shift_x) as usize,
        (bounds[3] + shift_y) as usize,
    ];
    let centroid = [sx / weights, sy / weights];
    let centroid = if torus {
        [
            centroid[0].rem_euclid(w as f64),
            centroid[1].rem_euclid(h as f64),
        ]
    } else {
        centroid
    };
    let area = members.len();
    Some(Blob {
        area,
        centroid,
        core_rgb: core_sum.map(|s| s / core.len() as f64),
        bounds,
        touches_edge: !torus
            && (bounds[0] == 0 || bounds[1] == 0 || bounds[2] == w - 1 || bounds[3] == h - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square_frame() -> Frame {
        let mut frame = Frame::filled(20, 10, [10, 20, 30]);
        for y in 2..6 {
            for x in 3..7 {
                frame.set_pixel(x, y, [200, 0, 0]);
            }
        }
        // a lone speck elsewhere, smaller than the square
        frame.set_pixel(15, 8, [0, 200, 0]);
        frame
    }

    #[test]
    fn background_is_the_dominant_colour() {
        let background = FrameBackground::of(&square_frame());
        assert_eq!(background.rgb, [10.0, 20.0, 30.0]);
        assert_eq!(background.noise, 0.0);
    }

    #[test]
    fn the_largest_blob_is_measured() {
        let blob =
            largest_blob(&square_frame(), [10.0, 20.0, 30.0], 40.0, Topology::Plane).unwrap();
        assert_eq!(blob.area, 16);
        assert_eq!(blob.centroid, [5.0, 4.0]);
        assert_eq!(blob.bounds, [3, 2, 6, 5]);
        assert_eq!(blob.core_rgb, [200.0, 0.0, 0.0]);
        assert_eq!(blob.fill_ratio(), 1.0);
        assert!(!blob.touches_edge);
    }

    #[test]
    fn diagonal_neighbours_join_and_an_empty_frame_has_no_blob() {
        let mut frame = Frame::filled(8, 8, [0, 0, 0]);
        for i in 0..5 {
            frame.set_pixel(i, i, [255, 255, 255]);
        }
        let blob = largest_blob(&frame, [0.0; 3], 40.0, Topology::Plane).unwrap();
        assert_eq!(blob.area, 5);
        assert!(blob.touches_edge);
        let empty = Frame::filled(8, 8, [0, 0, 0]);
        assert!(largest_blob(&empty, [0.0; 3], 40.0, Topology::Plane).is_none());
    }

    /// A square across the left/right and top/bottom edges: four pieces on the plane, one blob
    /// on the torus, centred on the corner it straddles.
    #[test]
    fn on_a_torus_a_blob_joins_across_the_edges() {
        let mut frame = Frame::filled(20, 10, [0, 0, 0]);
        for y in [8, 9, 0, 1] {
            for x in [18, 19, 0, 1] {
                frame.set_pixel(x, y, [255, 255, 255]);
            }
        }
        let plane = largest_blob(&frame, [0.0; 3], 40.0, Topology::Plane).unwrap();
        assert_eq!(plane.area, 4);
        let torus = largest_blob(&frame, [0.0; 3], 40.0, Topology::Torus).unwrap();
        assert_eq!(torus.area, 16);
        assert_eq!(torus.centroid, [0.0, 0.0]);
        assert_eq!(torus.bounds, [18, 8, 21, 11]);
        assert_eq!(torus.fill_ratio(), 1.0);
        assert!(!torus.touches_edge);
    }

    #[test]
    fn a_wrapping_track_is_unwrapped() {
        let track = [
            (0, [60.0, 5.0]),
            (1, [63.0, 5.0]),
            (2, [2.0, 5.0]),
            (4, [8.0, 5.0]),
        ];
        let unwrapped = Topology::Torus.unwrap_track(&track, 64, 64);
        let xs: Vec<f64> = unwrapped.iter().map(|(_, [x, _])| *x).collect();
        assert_eq!(xs, [60.0, 63.0, 66.0, 72.0]);
        assert_eq!(Topology::Plane.unwrap_track(&track, 64, 64), track);
        assert_eq!(Topology::Torus.delta(63.0, 1.0, 64), 2.0);
        assert_eq!(Topology::Torus.delta(1.0, 63.0, 64), -2.0);
    }
}
