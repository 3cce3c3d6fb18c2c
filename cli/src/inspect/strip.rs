//! A strip: a few evenly spaced frames of a clip side by side, enlarged without smoothing, with
//! a thin white gap between them; what a person looks at to see the object move (the README's
//! picture of the toy model is one).

use super::frame::Frame;

/// Pixels between two frames of a strip, before enlarging.
const GAP: usize = 2;

/// `count` frames of `frames`, the first and the last included and the others evenly spaced,
/// each enlarged `scale` times. `None` for an empty clip or a zero `count` or `scale`.
pub fn strip(frames: &[Frame], count: usize, scale: usize) -> Option<Frame> {
    if frames.is_empty() || count == 0 || scale == 0 {
        return None;
    }
    let count = count.min(frames.len());
    let picked: Vec<&Frame> = (0..count)
        .map(|i| {
            let index = if count == 1 {
                0
            } else {
                i * (frames.len() - 1) / (count - 1)
            };
            &frames[index]
        })
        .collect();
    let (w, h) = (frames[0].width(), frames[0].height());
    let width = (count * w + (count - 1) * GAP) * scale;
    let height = h * scale;
    let mut out = Frame::filled(width, height, [255, 255, 255]);
    for (i, frame) in picked.into_iter().enumerate() {
        let left = i * (w + GAP) * scale;
        for y in 0..height {
            for x in 0..w.min(frame.width()) * scale {
                if y / scale < frame.height() {
                    out.set_pixel(left + x, y, frame.pixel(x / scale, y / scale));
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(count: usize) -> Vec<Frame> {
        (0..count)
            .map(|i| Frame::filled(4, 3, [i as u8, 0, 0]))
            .collect()
    }

    #[test]
    fn picks_first_middle_and_last_enlarged_with_gaps() {
        let frames = numbered(33);
        let s = strip(&frames, 3, 2).unwrap();
        assert_eq!((s.width(), s.height()), ((3 * 4 + 2 * GAP) * 2, 6));
        let at = |i: usize| s.pixel(i * (4 + GAP) * 2 + 1, 5)[0];
        assert_eq!([at(0), at(1), at(2)], [0, 16, 32]);
        assert_eq!(s.pixel(4 * 2, 0), [255, 255, 255], "the gap is white");
    }

    #[test]
    fn a_short_clip_gives_what_it_has_and_an_empty_one_nothing() {
        assert_eq!(strip(&numbered(2), 3, 1).unwrap().width(), 2 * 4 + GAP);
        assert!(strip(&[], 3, 1).is_none());
        assert!(strip(&numbered(5), 0, 1).is_none());
    }
}
