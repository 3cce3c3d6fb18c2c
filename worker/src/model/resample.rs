//! Pillow's resampling of 8-bit pictures, bit for bit: what transformers' CLIP image processor
//! (bicubic) and diffusers' video processor (Lanczos) do to a picture before image-to-video, so
//! that a picture of any size gives the embedding and the condition the reference pipeline
//! computes from it.
//!
//! Pillow's algorithm (`Resample.c`): a separable convolution, rows first, then columns; each
//! output pixel's filter is centred on its position in the input and, when shrinking, widened
//! by the scale (antialiasing); the weights are normalised to sum to one, turned into 22-bit
//! fixed point, and every pass rounds and clips to 8 bits.

/// A resampling filter of Pillow's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BICUBIC` (a = −0.5), transformers' `resample=3`.
    Bicubic,
    /// `Image.LANCZOS` (three lobes), diffusers' default.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Bits of the fixed-point weights (Pillow's `PRECISION_BITS`, 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// For each output position: the first input position it reads and its fixed-point weights.
fn coefficients(input: usize, output: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // multiplied by the reciprocal, as Pillow does: a division rounds differently, and a weight
    // at the edge of the support can flip
    let inverse = 1.0 / filter_scale;
    (0..output)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let weights: Vec<f64> = (first..last)
                .map(|x| filter.weight((x as f64 - center + 0.5) * inverse))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if scaled < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (first, fixed)
        })
        .collect()
}

/// One rounded, clipped sample of Pillow's passes.
fn sample(values: impl Iterator<Item = (u8, i32)>) -> u8 {
    let sum = values.fold(1i64 << (PRECISION_BITS - 1), |acc, (v, w)| {
        acc + i64::from(v) * i64::from(w)
    });
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `pixels` (`height × width × channels`, row-major, 8-bit) resized to `(new_height,
/// new_width)` as Pillow's `Image.resize` does with `filter`.
pub fn resize(
    pixels: &[u8],
    (height, width, channels): (usize, usize, usize),
    (new_height, new_width): (usize, usize),
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(pixels.len(), height * width * channels, "picture size");
    assert!(new_height > 0 && new_width > 0, "an empty output picture");
    // rows first (Pillow skips a pass whose size does not change)
    let rows = if new_width == width {
        pixels.to_vec()
    } else {
        let coeffs = coefficients(width, new_width, filter);
        let mut out = vec![0u8; height * new_width * channels];
        for y in 0..height {
            let row = &pixels[y * width * channels..][..width * channels];
            for (x, (first, weights)) in coeffs.iter().enumerate() {
                for c in 0..channels {
                    out[(y * new_width + x) * channels + c] = sample(
                        weights
                            .iter()
                            .enumerate()
                            .map(|(i, &w)| (row[(first + i) * channels + c], w)),
                    );
                }
            }
        }
        out
    };
    if new_height == height {
        return rows;
    }
    let coeffs = coefficients(height, new_height, filter);
    let stride = new_width * channels;
    let mut out = vec![0u8; new_height * stride];
    for (y, (first, weights)) in coeffs.iter().enumerate() {
        for i in 0..stride {
            out[y * stride + i] = sample(
                weights
                    .iter()
                    .enumerate()
                    .map(|(k, &w)| (rows[(first + k) * stride + i], w)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::loader::SafetensorsWeights;

    /// Pillow's outputs (`tests/fixtures/pil-resize/make.py`), shrinking and enlarging, each
    /// side alone and both: equal to the last bit.
    #[test]
    fn resizes_as_pillow_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/pil-resize/cases.safetensors");
        let cases = SafetensorsWeights::open_file(&dir).unwrap();
        let picture = cases.load("picture", &Device::Cpu).unwrap();
        let (height, width, channels) = picture.dims3().unwrap();
        let pixels: Vec<u8> = picture.flatten_all().unwrap().to_vec1().unwrap();
        let (mut checked, mut failures) = (0, Vec::new());
        for name in cases
            .names()
            .filter(|n| *n != "picture")
            .collect::<Vec<_>>()
        {
            let want = cases.load(name, &Device::Cpu).unwrap();
            let (h, w, _) = want.dims3().unwrap();
            let filter = if name.starts_with("bicubic") {
                Filter::Bicubic
            } else {
                Filter::Lanczos
            };
            let got = resize(&pixels, (height, width, channels), (h, w), filter);
            let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            if differ > 0 {
                failures.push(format!("{name}: {differ} of {} values differ", want.len()));
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(checked, 10);
    }
}
