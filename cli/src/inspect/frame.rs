//! [`Frame`]: one decoded picture as the checker sees it, owned RGB8 of a known size.

use super::world::Rgb;

/// A `width`×`height` picture, row-major RGB8 without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

/// A buffer whose length is not `width × height × 3`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {width}x{height} RGB frame needs {expected} bytes, got {got}")]
pub struct FrameSizeError {
    pub width: usize,
    pub height: usize,
    pub expected: usize,
    pub got: usize,
}

impl Frame {
    pub fn new(width: usize, height: usize, rgb: Vec<u8>) -> Result<Self, FrameSizeError> {
        let expected = width * height * 3;
        if rgb.len() != expected || width == 0 || height == 0 {
            return Err(FrameSizeError {
                width,
                height,
                expected,
                got: rgb.len(),
            });
        }
        Ok(Self { width, height, rgb })
    }

    /// A frame of one colour.
    pub fn filled(width: usize, height: usize, color: Rgb) -> Self {
        Self {
            width,
            height,
            rgb: color.repeat(width * height),
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = 3 * (y * self.width + x);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    pub fn set_pixel(&mut self, x: usize, y: usize, color: Rgb) {
        let i = 3 * (y * self.width + x);
        self.rgb[i..i + 3].copy_from_slice(&color);
    }

    /// Every pixel in row-major order.
    pub fn pixels(&self) -> impl Iterator<Item = Rgb> + '_ {
        self.rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_checked_and_pixels_are_row_major() {
        assert!(Frame::new(2, 2, vec![0; 11]).is_err());
        assert!(Frame::new(0, 2, vec![]).is_err());
        let mut frame = Frame::filled(3, 2, [1, 2, 3]);
        frame.set_pixel(2, 1, [9, 8, 7]);
        assert_eq!(frame.pixel(2, 1), [9, 8, 7]);
        assert_eq!(&frame.rgb()[15..18], &[9, 8, 7]);
        assert_eq!(frame.pixels().count(), 6);
    }
}
