//! Finding the object in one frame: the frame's dominant colour is the background, pixels far
//! enough from it in RGB are object pixels, and the largest 8-connected blob of them is the
//! object. Soft edges and noise only move a few pixels across the threshold; the blob's centroid
//! and the mean colour of its interior stay put.

use serde::Serialize;

use super::frame::Frame;
use super::world::distance;

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
    /// Inclusive pixel bounds `[x0, y0, x1, y1]`.
    pub bounds: [usize; 4],
    /// Whether the blob reaches the frame's border.
    pub touches_edge: bool,
}

impl Blob {
    /// The share of its bounding box the blob fills.
    pub fn fill_ratio(&self) -> f64 {
        let [x0, y0, x1, y1] = self.bounds;
        self.area as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64
    }
}

/// The largest 8-connected blob of pixels farther than `threshold` from `background`; `None`
/// when there is no such pixel.
pub fn largest_blob(frame: &Frame, background: [f64; 3], threshold: f64) -> Option<Blob> {
    let (w, h) = (frame.width(), frame.height());
    let object: Vec<bool> = frame
        .pixels()
        .map(|p| distance(p.map(f64::from), background) > threshold)
        .collect();
    // 0: not yet labelled; blobs are numbered from 1.
    let mut label = vec![0u32; w * h];
    let mut best: Option<Vec<usize>> = None;
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !object[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut members = Vec::new();
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % w, i / w);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let n = ny * w + nx;
                    if object[n] && label[n] == 0 {
                        label[n] = next;
                        stack.push(n);
                    }
                }
            }
        }
        if best.as_ref().is_none_or(|b| members.len() > b.len()) {
            best = Some(members);
        }
    }
    let members = best?;

    let from_background = |i: usize| distance(frame.pixel(i % w, i / w).map(f64::from), background);
    let mut distances: Vec<f64> = members.iter().map(|&i| from_background(i)).collect();
    let rank = (distances.len() - 1) * 9 / 10;
    let strong = *distances.select_nth_unstable_by(rank, f64::total_cmp).1;
    let core: Vec<usize> = members
        .iter()
        .copied()
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
    let mut bounds = [w, h, 0, 0];
    for &i in &members {
        let (x, y) = (i % w, i / w);
        for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                let n = ny * w + nx;
                if !weighed[n] {
                    weighed[n] = true;
                    let weight = (from_background(n) / strong).min(1.0);
                    sx += weight * (nx as f64 + 0.5);
                    sy += weight * (ny as f64 + 0.5);
                    weights += weight;
                }
            }
        }
        bounds = [
            bounds[0].min(x),
            bounds[1].min(y),
            bounds[2].max(x),
            bounds[3].max(y),
        ];
    }
    let area = members.len();
    Some(Blob {
        area,
        centroid: [sx / weights, sy / weights],
        core_rgb: core_sum.map(|s| s / core.len() as f64),
        bounds,
        touches_edge: bounds[0] == 0 || bounds[1] == 0 || bounds[2] == w - 1 || bounds[3] == h - 1,
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
        let blob = largest_blob(&square_frame(), [10.0, 20.0, 30.0], 40.0).unwrap();
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
        let blob = largest_blob(&frame, [0.0; 3], 40.0).unwrap();
        assert_eq!(blob.area, 5);
        assert!(blob.touches_edge);
        assert!(largest_blob(&Frame::filled(8, 8, [0, 0, 0]), [0.0; 3], 40.0).is_none());
    }
}
