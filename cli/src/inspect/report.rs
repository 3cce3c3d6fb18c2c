//! The human-readable form of a [`Report`]: one block of figures per measurement, each judged
//! line ending in `ok` or `WRONG`.

use std::fmt;

use super::Report;

fn rgb(c: [f64; 3]) -> String {
    format!("({:.0}, {:.0}, {:.0})", c[0], c[1], c[2])
}

fn mark(right: bool) -> &'static str {
    if right {
        "ok"
    } else {
        "WRONG"
    }
}

/// Frame indices, runs of consecutive ones shortened to `a-b`.
fn frame_list(indices: &[usize]) -> String {
    if indices.is_empty() {
        return "none".into();
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in indices {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    runs.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.measurements;
        let expected = &self.expected;
        let verdict = &self.verdict;
        writeln!(
            f,
            "clip         {} ({} frames, {}x{})",
            self.clip.display(),
            m.frames,
            m.width,
            m.height
        )?;
        writeln!(f, "caption      {}", self.caption)?;

        let bg = &m.background;
        writeln!(
            f,
            "background   {} -> {} (distance {:.1}); caption: {}  {}",
            rgb(bg.measured_rgb),
            bg.nearest.name,
            bg.distance,
            expected.background.name,
            mark(verdict.background_right)
        )?;

        let found = m.frames - m.consistency.missing_frames.len();
        match &m.object {
            Some(object) => {
                writeln!(
                    f,
                    "object       {} -> {} at {:.0}% strength (distance {:.1}); caption: {}  {}",
                    rgb(object.median_rgb),
                    object.nearest.name,
                    100.0 * object.strength,
                    object.distance,
                    expected.color.name,
                    mark(verdict.color_right)
                )?;
                writeln!(
                    f,
                    "             found in {found}/{} frames (pixels over {:.0} from the background), median area {:.0} px",
                    m.frames, bg.object_threshold, object.median_area
                )?;
                writeln!(
                    f,
                    "shape        fill ratio {:.2} -> {}; caption: {} (not judged)",
                    object.fill_ratio,
                    object.nearest_shape.name(),
                    expected.shape.name()
                )?;
            }
            None => writeln!(
                f,
                "object       not found in any frame (no blob over {:.0} from the background)  {}",
                bg.object_threshold,
                mark(verdict.color_right)
            )?,
        }

        match &m.motion {
            Some(motion) => {
                let inner = &motion.motion;
                writeln!(
                    f,
                    "motion       dx {:+.1} px, dy {:+.1} px, velocity ({:+.3}, {:+.3}) px/frame, {} reflection(s) (x {}, y {}), {}",
                    inner.dx,
                    inner.dy,
                    inner.velocity[0],
                    inner.velocity[1],
                    motion.reflections,
                    inner.reflections_x,
                    inner.reflections_y,
                    if motion.stays_inside { "stays inside" } else { "leaves the frame" }
                )?;
                writeln!(
                    f,
                    "direction    {}; caption: {}  {}",
                    inner.direction.name(),
                    expected.direction.name(),
                    mark(verdict.direction_right)
                )?;
            }
            None => writeln!(
                f,
                "motion       not measurable (object in fewer than 2 frames)  {}",
                mark(verdict.direction_right)
            )?,
        }

        let c = &m.consistency;
        let figure = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
        };
        writeln!(
            f,
            "consistency  area CV {}, colour std {}, largest centroid jump {} px, frames without object: {}",
            figure(c.area_cv, 3),
            figure(c.color_std, 1),
            figure(c.max_centroid_jump, 2),
            frame_list(&c.missing_frames)
        )?;
        if let Some(seams) = &self.seams {
            let ratio = |r: Option<f64>| figure(r, 2);
            let change = |c: &super::seams::Change| {
                format!(
                    "picture {:.2}, jump {} px, colour {}, area {}",
                    c.picture,
                    figure(c.centroid_jump, 2),
                    figure(c.color, 1),
                    figure(c.area, 3)
                )
            };
            let ratios = |r: [Option<f64>; 4]| {
                format!(
                    "×{} ×{} ×{} ×{}",
                    ratio(r[0]),
                    ratio(r[1]),
                    ratio(r[2]),
                    ratio(r[3])
                )
            };
            writeln!(f, "windows      {}", seams.plan)?;
            writeln!(
                f,
                "seams        inside windows: mean {}; 95th percentile {}",
                change(&seams.inside_mean),
                change(&seams.inside_p95)
            )?;
            writeln!(
                f,
                "             per seam, mean change / inside mean (drift) and largest / inside 95th percentile (jump), picture jump colour area:"
            )?;
            for seam in &seams.seams {
                writeln!(
                    f,
                    "             windows {}|{} (frames {}-{}): drift {}, jump {}",
                    seam.windows[0],
                    seam.windows[1],
                    seam.frames.start,
                    seam.frames.end.saturating_sub(1),
                    ratios(seam.drift_ratio),
                    ratios(seam.jump_ratio)
                )?;
            }
            writeln!(f, "             worst seam: {}", seams.worst())?;
            writeln!(
                f,
                "             like for like, each span's largest change, {} seams against {} stretches inside windows: {}",
                seams.seam_spans.count,
                seams.inside_spans.count,
                seams.like_for_like()
            )?;
            writeln!(
                f,
                "             glitches (a leap over {} px, colour over {}, area over {:.0}%, or the object lost): {}",
                super::seams::GLITCH_LEAP_PX,
                super::seams::GLITCH_COLOR,
                super::seams::GLITCH_AREA * 100.0,
                seams.glitches
            )?;
            writeln!(f, "motion per window {}", seams.directions())?;
        }
        write!(
            f,
            "verdict      {}",
            if self.passed { "PASS" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_frames_are_shortened() {
        assert_eq!(frame_list(&[]), "none");
        assert_eq!(frame_list(&[3]), "3");
        assert_eq!(frame_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }
}
