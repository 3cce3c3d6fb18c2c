//! Test clips drawn the way `worker/toy/world.py` draws them (flat shape, 4×4 supersampled
//! edges, reflection at the borders when bouncing), and the damage a diffusion model does to
//! them: blur, noise, faint frames.

use super::frame::Frame;
use super::world::{Direction, Rgb, Shape};

/// One object moving on a background.
#[derive(Debug, Clone)]
pub struct Scene {
    pub color: Rgb,
    pub background: Rgb,
    pub shape: Shape,
    pub radius: f64,
    /// Centre at frame 0.
    pub start: [f64; 2],
    /// Pixels per frame.
    pub velocity: [f64; 2],
    pub bouncing: bool,
    /// The wrapping world's torus: the object leaves by one edge and is drawn coming back by the
    /// opposite one.
    pub wrap: bool,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
}

impl Scene {
    /// A clip of the world's size (64×64, 17 frames) of a radius-8 object moving `direction`:
    /// straight at 1.75 px/frame with its path centred in the frame, or bouncing at 2.5 px/frame
    /// at 37° from (40, 27), which reflects once, off the right border.
    pub fn new(color: Rgb, background: Rgb, shape: Shape, direction: Direction) -> Self {
        let speed = if direction == Direction::Bouncing {
            2.5
        } else {
            1.75
        };
        let velocity = match direction {
            Direction::Left => [-speed, 0.0],
            Direction::Right => [speed, 0.0],
            Direction::Up => [0.0, -speed],
            Direction::Down => [0.0, speed],
            Direction::Bouncing => [0.8 * speed, 0.6 * speed],
        };
        let mut scene = Self {
            color,
            background,
            shape,
            radius: 8.0,
            start: [0.0, 0.0],
            velocity,
            bouncing: direction == Direction::Bouncing,
            wrap: false,
            width: 64,
            height: 64,
            frames: 17,
        };
        if scene.bouncing {
            scene.start = [40.0, 27.0];
        } else {
            scene.center_path();
        }
        scene
    }

    /// Starts the object where its straight path over the clip is centred in the frame.
    pub fn center_path(&mut self) -> &mut Self {
        let travel = self.velocity.map(|v| v * (self.frames - 1) as f64);
        self.start = [
            self.width as f64 / 2.0 - travel[0] / 2.0,
            self.height as f64 / 2.0 - travel[1] / 2.0,
        ];
        self
    }

    /// The centre in each frame, reflecting at the borders as the generator does.
    pub fn centres(&self) -> Vec<[f64; 2]> {
        let (lo, hi) = (
            [self.radius, self.radius],
            [
                self.width as f64 - self.radius,
                self.height as f64 - self.radius,
            ],
        );
        let (mut p, mut v) = (self.start, self.velocity);
        let mut out = Vec::with_capacity(self.frames);
        for _ in 0..self.frames {
            out.push(p);
            for a in 0..2 {
                p[a] += v[a];
                if self.bouncing && (p[a] < lo[a] || p[a] > hi[a]) {
                    v[a] = -v[a];
                    p[a] = if p[a] < lo[a] {
                        2.0 * lo[a] - p[a]
                    } else {
                        2.0 * hi[a] - p[a]
                    };
                }
            }
        }
        out
    }

    /// Reversals of the velocity along x and y over the clip.
    pub fn reflections(&self) -> [usize; 2] {
        let centres = self.centres();
        let mut count = [0; 2];
        for a in 0..2 {
            let steps: Vec<f64> = centres.windows(2).map(|w| w[1][a] - w[0][a]).collect();
            count[a] = steps.windows(2).filter(|s| s[0] * s[1] < 0.0).count();
        }
        count
    }

    pub fn render(&self) -> Vec<Frame> {
        self.centres()
            .into_iter()
            .map(|centre| self.draw(centre))
            .collect()
    }

    fn inside(&self, dx: f64, dy: f64) -> bool {
        let r = self.radius;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // pointing up, base 2r at dy = r, apex at dy = -r
            Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
        }
    }

    fn draw(&self, [cx, cy]: [f64; 2]) -> Frame {
        const SS: usize = 4;
        let mut frame = Frame::filled(self.width, self.height, self.background);
        // Only pixels near the object can be covered (on the torus, any may be).
        let span = |c: f64, limit: usize| {
            if self.wrap {
                return 0..limit;
            }
            let lo = (c - self.radius - 1.0).floor().max(0.0) as usize;
            let hi = ((c + self.radius + 1.0).ceil().max(0.0) as usize).min(limit);
            lo..hi
        };
        // the offset from the centre, on the torus to its nearest copy
        let offset = |d: f64, size: usize| {
            if self.wrap {
                let size = size as f64;
                (d + size / 2.0).rem_euclid(size) - size / 2.0
            } else {
                d
            }
        };
        for y in span(cy, self.height) {
            for x in span(cx, self.width) {
                let mut covered = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let px = x as f64 + (sx as f64 + 0.5) / SS as f64;
                        let py = y as f64 + (sy as f64 + 0.5) / SS as f64;
                        covered += usize::from(
                            self.inside(offset(px - cx, self.width), offset(py - cy, self.height)),
                        );
                    }
                }
                let cover = covered as f64 / (SS * SS) as f64;
                let mix = |c: usize| {
                    (f64::from(self.background[c]) * (1.0 - cover)
                        + f64::from(self.color[c]) * cover)
                        .round() as u8
                };
                frame.set_pixel(x, y, [mix(0), mix(1), mix(2)]);
            }
        }
        frame
    }
}

/// A 3×3 box blur applied `passes` times (edges clamp).
pub fn blur(frame: &Frame, passes: usize) -> Frame {
    let (w, h) = (frame.width(), frame.height());
    let mut current = frame.clone();
    for _ in 0..passes {
        let mut next = current.clone();
        for y in 0..h {
            for x in 0..w {
                let mut sum = [0u32; 3];
                for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                        for (s, v) in sum.iter_mut().zip(current.pixel(nx, ny)) {
                            *s += u32::from(v);
                        }
                    }
                }
                let n = ((y + 1).min(h - 1) - y.saturating_sub(1) + 1)
                    * ((x + 1).min(w - 1) - x.saturating_sub(1) + 1);
                next.set_pixel(x, y, sum.map(|s| ((s as f64) / n as f64).round() as u8));
            }
        }
        current = next;
    }
    current
}

/// Adds noise uniform in `±amplitude` to every channel, from a fixed seed (xorshift), so a test
/// sees the same noise every run.
pub fn add_noise(frame: &Frame, amplitude: f64, seed: u64) -> Frame {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let rgb = frame
        .rgb()
        .iter()
        .map(|&v| {
            (f64::from(v) + amplitude * (2.0 * uniform() - 1.0))
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect();
    Frame::new(frame.width(), frame.height(), rgb).expect("same size")
}

/// The frame with the object faded: each pixel moved towards `background`, keeping `keep` of its
/// difference from it.
pub fn fade(frame: &Frame, background: Rgb, keep: f64) -> Frame {
    let rgb = frame
        .rgb()
        .chunks_exact(3)
        .flat_map(|p| {
            [0, 1, 2].map(|c| {
                let b = f64::from(background[c]);
                (b + keep * (f64::from(p[c]) - b)).round() as u8
            })
        })
        .collect();
    Frame::new(frame.width(), frame.height(), rgb).expect("same size")
}
