//! Counter-based Gaussian noise: every value is a pure function of (seed, stream, index).
//!
//! The initial latents of a render must not depend on how the latent is split across ranks or
//! windows, so no generator state is ever carried from one element to the next. Each latent frame
//! is its own ChaCha stream, and inside a frame the element at `(c, h, w)` reads the two 32-bit
//! words at a fixed counter position. Any shard can therefore produce exactly its own slice, and a
//! longer video shares the noise of its first frames with a shorter one of the same size.

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

/// `len` standard-normal values at counter positions `start..start + len` of `(seed, stream)`.
/// Long runs are made in pieces on every core (each piece seeks to its own counter position, so
/// the values are the same as one sequential run): a 14B-parameter model's seeded weights are
/// 14·10⁹ values.
pub fn gaussian(seed: u64, stream: u64, start: u64, len: usize) -> Vec<f32> {
    const PIECE: usize = 1 << 16;
    let mut values = vec![0f32; len];
    if len <= PIECE {
        fill_gaussian(seed, stream, start, &mut values);
    } else {
        values
            .par_chunks_mut(PIECE)
            .enumerate()
            .for_each(|(i, piece)| fill_gaussian(seed, stream, start + (i * PIECE) as u64, piece));
    }
    values
}

/// Writes the values at counter positions `start..start + out.len()` of `(seed, stream)`.
fn fill_gaussian(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    // Two words per value (Box-Muller on a pair of uniforms, cosine branch only), so the value at
    // index i always comes from words 2i and 2i+1.
    rng.set_word_pos(2 * start as u128);
    for value in out {
        // Uniforms in (0, 1]: never 0, so the logarithm is finite.
        let u1 = (rng.next_u32() as f64 + 1.0) / 4_294_967_296.0;
        let u2 = rng.next_u32() as f64 / 4_294_967_296.0;
        *value = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
    }
}

/// Shape of a video latent: `(channels, frames, height, width)` in latent units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

/// For FreeNoise-style rescheduled noise (Qiu et al., 2023), the latent frame whose noise each
/// of a clip's `frames` latent frames starts from: the first `window` frames their own; each
/// later run of `stride` frames the first `stride` of a shuffle of `0..window` drawn from
/// `(seed, run)`. A pure function of its arguments, so every group of a job computes the same.
pub fn rescheduled_sources(seed: u64, frames: usize, window: usize, stride: usize) -> Vec<usize> {
    let window = window.min(frames).max(1);
    let stride = stride.clamp(1, window);
    let mut sources: Vec<usize> = (0..window).collect();
    let mut run = 0u64;
    while sources.len() < frames {
        // Fisher–Yates on a stream of its own per run (frame streams are the frame indices,
        // counted from 0; these count down from the top)
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::MAX - run);
        let mut order: Vec<usize> = (0..window).collect();
        for i in (1..window).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let take = stride.min(frames - sources.len());
        sources.extend_from_slice(&order[..take]);
        run += 1;
    }
    sources
}

/// The initial noise for latent frames `frames.start..frames.end` of a render, shaped
/// `(1, C, frames.len(), H, W)`. The full latent is `initial_latents(seed, shape, 0..shape.frames)`;
/// any contiguous frame range of it is bit-identical to the same range generated on its own.
pub fn initial_latents(
    seed: u64,
    shape: LatentShape,
    frames: std::ops::Range<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    initial_latents_from(seed, shape, frames, |f| f, dtype, device)
}

/// [`initial_latents`] where latent frame `f` takes the noise of frame `source(f)` (e.g.
/// [`rescheduled_sources`]).
pub fn initial_latents_from(
    seed: u64,
    shape: LatentShape,
    frames: std::ops::Range<usize>,
    source: impl Fn(usize) -> usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let LatentShape {
        channels,
        height,
        width,
        ..
    } = shape;
    if frames.end > shape.frames || frames.start >= frames.end {
        candle_core::bail!(
            "latent frame range {frames:?} is empty or outside the latent's {} frames",
            shape.frames
        );
    }
    let per_frame = channels * height * width;
    let slices = frames
        .map(|f| {
            let values = gaussian(seed, source(f) as u64, 0, per_frame);
            Tensor::from_vec(values, (channels, 1, height, width), device)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&slices, 1)?.unsqueeze(0)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_depend_only_on_position() {
        let whole = gaussian(7, 3, 0, 1000);
        let middle = gaussian(7, 3, 400, 100);
        assert_eq!(&whole[400..500], &middle[..]);
        assert_ne!(gaussian(8, 3, 0, 16), whole[..16]);
        assert_ne!(gaussian(7, 4, 0, 16), whole[..16]);
    }

    #[test]
    fn a_long_run_made_in_parallel_pieces_is_the_sequential_run() {
        // Three and a bit pieces, from an odd start: every piece boundary inside the run.
        let (start, len) = (12_345u64, 3 * (1 << 16) + 777);
        let whole = gaussian(9, 2, start, len);
        let mut sequential = vec![0f32; len];
        fill_gaussian(9, 2, start, &mut sequential);
        assert_eq!(whole, sequential);
    }

    #[test]
    fn looks_standard_normal() {
        let v = gaussian(1, 0, 0, 200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let beyond_2 = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((beyond_2 - 0.0455).abs() < 0.003, "tail mass {beyond_2}");
    }

    #[test]
    fn rescheduled_noise_reuses_the_first_window_shuffled() {
        let sources = rescheduled_sources(5, 26, 9, 6);
        assert_eq!(sources.len(), 26);
        assert_eq!(&sources[..9], &(0..9).collect::<Vec<_>>()[..]);
        for run in sources[9..].chunks(6) {
            let mut sorted = run.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), run.len(), "no frame twice in a run: {run:?}");
            assert!(run.iter().all(|&s| s < 9));
        }
        assert_ne!(
            &sources[9..15],
            &sources[15..21],
            "each run its own shuffle"
        );
        assert_eq!(sources, rescheduled_sources(5, 26, 9, 6));
        assert_ne!(sources, rescheduled_sources(6, 26, 9, 6));
        // a clip of one window is its own noise
        assert_eq!(rescheduled_sources(5, 7, 9, 6), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn frame_ranges_are_slices_of_the_whole() -> Result<()> {
        let shape = LatentShape {
            channels: 16,
            frames: 6,
            height: 4,
            width: 5,
        };
        let dev = Device::Cpu;
        let whole = initial_latents(42, shape, 0..6, DType::F32, &dev)?;
        let part = initial_latents(42, shape, 2..5, DType::F32, &dev)?;
        assert_eq!(whole.dims(), &[1, 16, 6, 4, 5]);
        let diff = (whole.narrow(2, 2, 3)? - part)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let other = initial_latents(43, shape, 0..6, DType::F32, &dev)?;
        assert!((whole - other)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.1);
        Ok(())
    }
}
