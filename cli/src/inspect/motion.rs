//! The object's motion from its centroid track: net displacement, a least-squares velocity,
//! reflections, and the direction the track shows.
//!
//! The track is median-smoothed first (a faint frame's misplaced centroid is one outlier, not a
//! turn). A reflection is a reversal along x or y with real movement on both sides (the smoothed
//! position must first travel [`REVERSAL_TRAVEL`] of the frame one way and then come back at
//! least as far) at a wall: where it turns, the object is within [`WALL_MARGIN`] of the border it
//! turned back from, as a bouncing object of the world is when it reflects. A reversal in the
//! middle of the frame is a wobble of the object's outline (a rendered object's centroid shifts
//! as its shape breathes), not a bounce.
//!
//! In the world (`worker/toy/world.py`: 17 frames, straight motion 1.5–2.0 px/frame along one
//! axis, bouncing 2.0–3.0 px/frame at any angle, redrawn until it reflects) most bouncing clips
//! turn well inside the clip, but some only graze a wall in the last frames. So a track is also
//! bouncing when it moves as only a bouncing object does there: more than
//! [`MAX_STRAIGHT_ANGLE_DEG`] off both axes, or faster than [`MAX_STRAIGHT_SPEED`].

use serde::Serialize;

use super::stats::{running_median, slope};
use super::world::Direction;

/// How far, as a share of the frame's extent along an axis, the track must go each way for a
/// reversal to count: 3.2 px at 64 px.
pub const REVERSAL_TRAVEL: f64 = 0.05;

/// How near, as a share of the frame's extent along the axis, the object's edge must come to a
/// border for a reversal there to be a reflection: 6.4 px at 64 px (the smoothed track turns a
/// frame's travel or so short of the wall, and a rendered object's outline is soft).
pub const WALL_MARGIN: f64 = 0.1;

/// Below this net displacement, as a share of the frame's shorter side, the object is static:
/// 3.84 px at 64 px, where the world's slowest straight motion covers 24 px in 17 frames.
pub const STATIC_TRAVEL: f64 = 0.06;

/// Straight motion runs along an axis; a net displacement farther off both axes than this is
/// bouncing (or no caption's motion at all).
pub const MAX_STRAIGHT_ANGLE_DEG: f64 = 20.0;

/// Faster than this, as a share of the frame's shorter side per frame, is bouncing: 2.4 px/frame
/// at 64 px, where straight motion is at most 2.0 and bouncing at least 2.0. The gap is a margin
/// for measurement (a rendered object's centroid wobbles), so bouncing clips between 2.0 and 2.4
/// px/frame are only caught by a reflection or their angle.
pub const MAX_STRAIGHT_SPEED: f64 = 2.4 / 64.0;

/// Frames in the running median that smooths the track.
const SMOOTHING_WINDOW: usize = 5;

/// The direction a clip shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedDirection {
    Left,
    Right,
    Up,
    Down,
    Bouncing,
    Static,
}

impl ObservedDirection {
    pub fn name(self) -> &'static str {
        match self {
            ObservedDirection::Left => "left",
            ObservedDirection::Right => "right",
            ObservedDirection::Up => "up",
            ObservedDirection::Down => "down",
            ObservedDirection::Bouncing => "bouncing",
            ObservedDirection::Static => "static",
        }
    }

    /// Whether this is what a caption's direction says.
    pub fn matches(self, said: Direction) -> bool {
        self.name() == said.name()
    }
}

/// What the centroid track shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Motion {
    /// Net displacement from the first to the last frame the object was found in, px (smoothed
    /// track; `+y` is down).
    pub dx: f64,
    pub dy: f64,
    /// Least-squares velocity over the smoothed track, px per frame.
    pub velocity: [f64; 2],
    pub reflections_x: usize,
    pub reflections_y: usize,
    pub direction: ObservedDirection,
}

impl Motion {
    pub fn reflections(&self) -> usize {
        self.reflections_x + self.reflections_y
    }

    pub fn speed(&self) -> f64 {
        self.velocity[0].hypot(self.velocity[1])
    }
}

/// The motion of a track of `(frame index, centroid)` points of an object of half-size
/// `half_extent` (px along x and y) in a `width`×`height` frame; `None` for fewer than two points.
pub fn analyse(
    track: &[(usize, [f64; 2])],
    half_extent: [f64; 2],
    width: usize,
    height: usize,
) -> Option<Motion> {
    if track.len() < 2 {
        return None;
    }
    let axis = |a: usize| {
        running_median(
            &track.iter().map(|(_, c)| c[a]).collect::<Vec<_>>(),
            SMOOTHING_WINDOW,
        )
    };
    let (xs, ys) = (axis(0), axis(1));
    let n = track.len();
    let (dx, dy) = (xs[n - 1] - xs[0], ys[n - 1] - ys[0]);
    let fit = |values: &[f64]| {
        let points: Vec<(f64, f64)> = track
            .iter()
            .zip(values)
            .map(|((t, _), &v)| (*t as f64, v))
            .collect();
        slope(&points).unwrap_or(0.0)
    };
    let velocity = [fit(&xs), fit(&ys)];
    let at_wall = |turns: Vec<Turn>, extent: usize, half: f64| {
        let near = half + WALL_MARGIN * extent as f64;
        turns
            .iter()
            .filter(|turn| match turn {
                Turn::Low(v) => *v <= near,
                Turn::High(v) => *v >= extent as f64 - near,
            })
            .count()
    };
    let reflections_x = at_wall(
        turns(&xs, REVERSAL_TRAVEL * width as f64),
        width,
        half_extent[0],
    );
    let reflections_y = at_wall(
        turns(&ys, REVERSAL_TRAVEL * height as f64),
        height,
        half_extent[1],
    );

    let speed = velocity[0].hypot(velocity[1]);
    let shorter_side = width.min(height) as f64;
    let off_axis =
        dx.abs().min(dy.abs()) > MAX_STRAIGHT_ANGLE_DEG.to_radians().tan() * dx.abs().max(dy.abs());
    let direction = if reflections_x + reflections_y > 0 {
        ObservedDirection::Bouncing
    } else if dx.hypot(dy) < STATIC_TRAVEL * shorter_side {
        ObservedDirection::Static
    } else if off_axis || speed > MAX_STRAIGHT_SPEED * shorter_side {
        ObservedDirection::Bouncing
    } else if dx.abs() >= dy.abs() {
        if dx > 0.0 {
            ObservedDirection::Right
        } else {
            ObservedDirection::Left
        }
    } else if dy > 0.0 {
        ObservedDirection::Down
    } else {
        ObservedDirection::Up
    };
    Some(Motion {
        dx,
        dy,
        velocity,
        reflections_x,
        reflections_y,
        direction,
    })
}

/// Where a track turned back: at its highest or its lowest value of the leg before.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Turn {
    High(f64),
    Low(f64),
}

/// Reversals of direction in `values` where each leg, before and after the turn, covers at
/// least `min_travel`: a zig-zag filter, so wobble smaller than `min_travel` is never a turn.
fn turns(values: &[f64], min_travel: f64) -> Vec<Turn> {
    let mut out = Vec::new();
    let Some(&first) = values.first() else {
        return out;
    };
    // +1 rising, -1 falling, 0 before the first leg has covered `min_travel`.
    let mut heading = 0i8;
    let (mut low, mut high) = (first, first);
    for &v in values {
        match heading {
            0 => {
                low = low.min(v);
                high = high.max(v);
                if v - low >= min_travel {
                    heading = 1;
                    high = v;
                } else if high - v >= min_travel {
                    heading = -1;
                    low = v;
                }
            }
            1 if v > high => high = v,
            1 if high - v >= min_travel => {
                out.push(Turn::High(high));
                heading = -1;
                low = v;
            }
            -1 if v < low => low = v,
            -1 if v - low >= min_travel => {
                out.push(Turn::Low(low));
                heading = 1;
                high = v;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A radius-8 object.
    const HALF: [f64; 2] = [8.0, 8.0];

    fn track(points: impl Fn(f64) -> [f64; 2], frames: usize) -> Vec<(usize, [f64; 2])> {
        (0..frames).map(|t| (t, points(t as f64))).collect()
    }

    #[test]
    fn straight_tracks_are_classified_by_their_dominant_axis() {
        let cases = [
            ([0.3, 0.0], ObservedDirection::Right),
            ([-0.25, 0.02], ObservedDirection::Left),
            ([0.0, 0.4], ObservedDirection::Down),
            ([0.05, -0.5], ObservedDirection::Up),
        ];
        for (v, expected) in cases {
            let motion = analyse(
                &track(|t| [32.0 + v[0] * (t - 40.0), 32.0 + v[1] * (t - 40.0)], 81),
                HALF,
                64,
                64,
            )
            .unwrap();
            assert_eq!(motion.direction, expected, "{v:?}: {motion:?}");
            assert_eq!(motion.reflections(), 0);
            // The smoothing window, clamped at the ends, shortens the track by ~1 frame a side.
            assert!(
                (motion.velocity[0] - v[0]).abs() < 0.01 * v[0].abs().max(0.1),
                "{motion:?}"
            );
            assert!(
                (motion.velocity[1] - v[1]).abs() < 0.01 * v[1].abs().max(0.1),
                "{motion:?}"
            );
            assert!(
                (motion.dx - 80.0 * v[0]).abs() < 2.0 * v[0].abs() + 1e-9,
                "{motion:?}"
            );
        }
    }

    #[test]
    fn a_still_or_wobbling_object_is_static() {
        let wobble = track(|t| [20.0 + (t * 0.9).sin(), 40.0 + (t * 1.3).cos()], 81);
        let motion = analyse(&wobble, HALF, 64, 64).unwrap();
        assert_eq!(motion.direction, ObservedDirection::Static, "{motion:?}");
        assert_eq!(motion.reflections(), 0);
    }

    #[test]
    fn a_reflection_is_counted_once_and_a_spike_is_not() {
        // 1 px/frame right, turns at x = 54
        let bounce = track(|t| [if t < 40.0 { 14.0 + t } else { 94.0 - t }, 30.0], 81);
        let motion = analyse(&bounce, HALF, 64, 64).unwrap();
        assert_eq!((motion.reflections_x, motion.reflections_y), (1, 0));
        assert_eq!(motion.direction, ObservedDirection::Bouncing);

        // a straight track with two misplaced centroids in a row (faint frames)
        let mut spiky = track(|t| [10.0 + 0.3 * t, 30.0], 81);
        spiky[40].1 = [50.0, 5.0];
        spiky[41].1 = [2.0, 60.0];
        let motion = analyse(&spiky, HALF, 64, 64).unwrap();
        assert_eq!(motion.direction, ObservedDirection::Right, "{motion:?}");
    }

    #[test]
    fn off_axis_or_fast_tracks_without_a_turn_are_bouncing() {
        // a bouncing object that meets no wall in the clip: 2.5 px/frame at 37° from x
        let diagonal = track(|t| [10.0 + 2.0 * t, 10.0 + 1.5 * t], 17);
        let motion = analyse(&diagonal, HALF, 64, 64).unwrap();
        assert_eq!(motion.reflections(), 0);
        assert_eq!(motion.direction, ObservedDirection::Bouncing, "{motion:?}");
        // along an axis but faster than straight motion goes
        let fast = track(|t| [8.0 + 2.8 * t, 30.0], 17);
        assert_eq!(
            analyse(&fast, HALF, 64, 64).unwrap().direction,
            ObservedDirection::Bouncing
        );
        // the same track at 128 px is 1.4 px/frame in the world's scale: straight
        assert_eq!(
            analyse(&fast, HALF, 128, 128).unwrap().direction,
            ObservedDirection::Right
        );
        // slightly off the axis is still straight
        let drift = track(|t| [8.0 + 1.8 * t, 30.0 + 0.4 * t], 17);
        assert_eq!(
            analyse(&drift, HALF, 64, 64).unwrap().direction,
            ObservedDirection::Right
        );
    }

    #[test]
    fn a_turn_away_from_the_walls_is_a_wobble_not_a_reflection() {
        // down at 1.6 px/frame while the outline sways 4 px either way, every 4 frames
        let sway = |t: f64| match (t as usize / 4).is_multiple_of(2) {
            true => 4.0,
            false => -4.0,
        };
        // in the middle of the frame
        let swaying = track(|t| [32.0 + sway(t), 10.0 + 1.6 * t], 17);
        let motion = analyse(&swaying, HALF, 64, 64).unwrap();
        assert_eq!(motion.reflections(), 0, "{motion:?}");
        assert_eq!(motion.direction, ObservedDirection::Down, "{motion:?}");
        // the same sway where the object's edge meets the left wall is a reflection
        let at_wall = track(|t| [13.0 + sway(t), 10.0 + 1.6 * t], 17);
        assert!(analyse(&at_wall, HALF, 64, 64).unwrap().reflections_x > 0);
    }

    #[test]
    fn reversals_need_travel_on_both_sides() {
        let reversals = |values: &[f64], travel: f64| turns(values, travel).len();
        assert_eq!(
            turns(&[0.0, 5.0, 10.0, 5.0, 0.0, 5.0, 10.0], 3.0),
            vec![Turn::High(10.0), Turn::Low(0.0)]
        );
        // comes back by less than the travel
        assert_eq!(reversals(&[0.0, 5.0, 10.0, 8.0], 3.0), 0);
        // the first leg is too short to be one
        assert_eq!(reversals(&[0.0, 1.0, 0.0, -10.0], 3.0), 0);
        assert_eq!(reversals(&[], 3.0), 0);
    }

    #[test]
    fn one_point_is_no_motion() {
        assert!(analyse(&[(0, [1.0, 1.0])], HALF, 64, 64).is_none());
    }
}
