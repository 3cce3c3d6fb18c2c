//! The Wan VAE's convolutions on frames-first video `(T, C, H, W)`: the causal 3D convolution
//! (`WanCausalConv3d`) with its per-layer frame cache, and the plain 2D convolutions.
//!
//! Candle has no conv3d, and its CPU conv2d is slow at the VAE's shapes (few channels, large
//! frames), so on the CPU a convolution is one spatial im2col of every input frame followed by a
//! batched matmul: the im2col rows of the `kernel_t` frames a temporal window covers lie next to
//! each other in memory, so each output frame's patch matrix is an overlapping view
//! ([`Tensor::unfold`]) and no per-tap copy or sum is made. Other devices stack the temporal taps
//! along the channels and use the backend's conv2d.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::vae_blocks::{Pass, Slot, SlotCounter};
use super::vae_split::RowSplit;

/// The most im2col elements built at once (16 MiB in f32); bigger inputs are done in bands of
/// rows. Bands that stay in cache while the matmul reads them are 2-3× faster than whole frames,
/// and they bound the memory of a real-size decode (a 480p frame at 96 channels would otherwise
/// need gigabytes of patches).
const IM2COL_MAX_ELEMENTS: usize = 1 << 22;

/// The weights of one convolution, laid out for the device that runs it.
#[derive(Debug, Clone)]
enum Kernel {
    /// `(kernel_t · C_in · k · k, C_out)`, rows ordered (tap, channel, ky, kx) like the im2col.
    Gemm(Tensor),
    /// `(C_out, kernel_t · C_in, k, k)`, the taps stacked tap-major along the input channels.
    Conv2d(Tensor),
}

/// A convolution over frames, `kernel_t` frames deep and `k × k` wide, stride 1.
#[derive(Debug, Clone)]
struct FrameConv {
    kernel: Kernel,
    /// `(1, C_out, 1)`, broadcast over frames and pixels.
    bias: Tensor,
    kernel_t: usize,
    k: usize,
    out_dim: usize,
}

impl FrameConv {
    /// `weight` is `(C_out, C_in, kernel_t, k, k)`.
    fn new(weight: Tensor, bias: Tensor, device: &Device) -> Result<Self> {
        let (out_dim, in_dim, kernel_t, k, kw) = weight.dims5()?;
        if k != kw || (k != 1 && k != 3) {
            candle_core::bail!("only 1×1 and 3×3 spatial kernels are supported, got {k}×{kw}");
        }
        let kernel = if device.is_cpu() {
            let w = weight
                .permute((2, 1, 3, 4, 0))?
                .reshape((kernel_t * in_dim * k * k, out_dim))?;
            Kernel::Gemm(w.contiguous()?)
        } else {
            let w = weight
                .permute((0, 2, 1, 3, 4))?
                .reshape((out_dim, kernel_t * in_dim, k, k))?;
            Kernel::Conv2d(w.contiguous()?)
        };
        let bias = bias.reshape((1, out_dim, 1))?;
        Ok(Self {
            kernel,
            bias,
            kernel_t,
            k,
            out_dim,
        })
    }

    /// Convolves `padded` `(T + kernel_t - 1, C_in, H, W)`, whose first frames are the history,
    /// into `(T, C_out, H, W)`; spatial padding is `k / 2` zeros on each side.
    fn forward(&self, padded: &Tensor) -> Result<Tensor> {
        self.forward_banded(padded, IM2COL_MAX_ELEMENTS, false)
    }

    /// [`Self::forward`] on this rank's rows of the frames under `split`: a 3×3 kernel reads
    /// one row of the neighbouring bands on each side.
    fn forward_split(&self, padded: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        match split {
            Some(split) if self.k > 1 => {
                self.forward_banded(&split.with_halo(padded)?, IM2COL_MAX_ELEMENTS, true)
            }
            _ => self.forward(padded),
        }
    }

    /// [`Self::forward`] building at most about `max_elements` patch values at once; with
    /// `halo` the input's outer rows are only read ([`Self::forward_halo`]).
    fn forward_banded(&self, padded: &Tensor, max_elements: usize, halo: bool) -> Result<Tensor> {
        let (n, c, h_in, w) = padded.dims4()?;
        let t = n + 1 - self.kernel_t;
        // Output row y reads input rows y - 1 ..= y + 1 of the frame, rows y ..= y + 2 of a
        // band with halo: it is the padded convolution's row y + 1.
        let (first, h) = if halo {
            if h_in < 3 {
                candle_core::bail!("a band with halo rows needs at least 3 rows, got {h_in}");
            }
            (1, h_in - 2)
        } else {
            (0, h_in)
        };
        match &self.kernel {
            Kernel::Gemm(weight) => {
                let padded = padded.contiguous()?;
                let rows_k = c * self.k * self.k;
                let band = (max_elements / (n * rows_k * w).max(1)).clamp(1, h);
                let mut bands = Vec::with_capacity(h.div_ceil(band));
                for y in (0..h).step_by(band) {
                    let rows = band.min(h - y);
                    let y0 = first + y;
                    let cols = if self.k == 1 {
                        padded.narrow(2, y0, rows)?.contiguous()?
                    } else {
                        padded.apply_op1_no_bwd(&Im2Col3x3 { y0, rows })?
                    };
                    let pixels = rows * w;
                    // Window j of the flattened (N·rows_k, pixels) patch rows is output frame j's
                    // (kernel_t·rows_k) patch matrix, read transposed: (T, pixels, kernel_t·rows_k).
                    let windows = cols.reshape((n * rows_k, pixels))?.unfold(
                        0,
                        self.kernel_t * rows_k,
                        rows_k,
                    )?;
                    let out = windows.broadcast_matmul(weight)?; // (T, pixels, C_out)
                    bands.push(out.transpose(1, 2)?.broadcast_add(&self.bias)?.reshape((
                        t,
                        self.out_dim,
                        rows,
                        w,
                    ))?);
                }
                if bands.len() == 1 {
                    Ok(bands.remove(0))
                } else {
                    Tensor::cat(&bands, 2)
                }
            }
            Kernel::Conv2d(weight) => {
                let taps: Vec<Tensor> = (0..self.kernel_t)
                    .map(|k| padded.narrow(0, k, t))
                    .collect::<Result<_>>()?;
                let stacked = if taps.len() == 1 {
                    taps[0].clone()
                } else {
                    Tensor::cat(&taps, 1)?
                };
                let out = stacked
                    .conv2d(weight, self.k / 2, 1, 1, 1)?
                    .narrow(2, first, h)?;
                out.broadcast_add(&self.bias.unsqueeze(3)?)
            }
        }
    }
}

/// The 3×3, padding 1 patches of output rows `y0 .. y0 + rows` of each frame:
/// `(N, C, H, W)` → `(N, C·9, rows, W)`, patch rows ordered (channel, ky, kx).
struct Im2Col3x3 {
    y0: usize,
    rows: usize,
}

impl Im2Col3x3 {
    fn run<T: Copy + Default + Send + Sync>(
        &self,
        src: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let plane = self.rows * w;
        let mut dst = vec![T::default(); n * c * 9 * plane];
        // One (frame, channel) input plane fills 9 consecutive output planes.
        dst.par_chunks_mut(9 * plane)
            .enumerate()
            .for_each(|(fc, out)| {
                let src = &src[fc * h * w..(fc + 1) * h * w];
                for ky in 0..3 {
                    for kx in 0..3 {
                        let out = &mut out[(ky * 3 + kx) * plane..(ky * 3 + kx + 1) * plane];
                        for r in 0..self.rows {
                            let y = self.y0 + r + ky;
                            if y == 0 || y > h {
                                continue; // the zero padding above or below the frame
                            }
                            let line = &src[(y - 1) * w..y * w];
                            let dst = &mut out[r * w..(r + 1) * w];
                            match kx {
                                0 => dst[1..].copy_from_slice(&line[..w - 1]),
                                1 => dst.copy_from_slice(line),
                                _ => dst[..w - 1].copy_from_slice(&line[1..]),
                            }
                        }
                    }
                }
            });
        dst
    }
}

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "wan-vae-im2col3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (n, c, h, w) = dims;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col needs a contiguous input");
        };
        if self.y0 + self.rows > h || w == 0 {
            candle_core::bail!(
                "im2col rows {}..{} outside a frame of {h} rows",
                self.y0,
                self.y0 + self.rows
            );
        }
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], dims)),
            CpuStorage::F16(v) => CpuStorage::F16(self.run(&v[start..end], dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(&v[start..end], dims)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end], dims)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((n, c * 9, self.rows, w))))
    }
}

/// `WanCausalConv3d`: a 3D convolution padded on the past side only in time (`kernel_t - 1`
/// frames, taken from the cache after the first chunk) and symmetrically in space.
#[derive(Debug, Clone)]
pub(crate) struct CausalConv3d {
    conv: FrameConv,
    history: usize,
    pub(crate) slot: usize,
}

impl CausalConv3d {
    /// `kernel` is `(t, k, k)`; the spatial padding is `k / 2` as in every Wan VAE conv.
    pub(crate) fn new(
        in_dim: usize,
        out_dim: usize,
        kernel: (usize, usize, usize),
        vb: VarBuilder,
        slots: &mut SlotCounter,
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        let weight = vb.get((out_dim, in_dim, kt, kh, kw), "weight")?;
        let conv = FrameConv::new(weight, vb.get(out_dim, "bias")?, vb.device())?;
        let slot = if kt > 1 { slots.next() } else { usize::MAX };
        Ok(Self {
            conv,
            history: kt - 1,
            slot,
        })
    }

    /// The convolution of `x` `(T, C_in, H, W)` given the frames before it, `(T, C_out, H, W)`.
    /// Updates the layer's slot with the last `kernel_t - 1` frames of its input. Under a row
    /// split `x` and the slot hold this rank's rows only.
    pub(crate) fn forward(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        if self.history == 0 {
            // Pointwise in time: diffusers keeps no cache for these either.
            return self.conv.forward_split(x, pass.split);
        }
        let cache = &mut *pass.slots;
        let past = match &cache[self.slot] {
            Slot::Frames(frames) => frames.clone(),
            Slot::Empty | Slot::Started => {
                let (_, c, h, w) = x.dims4()?;
                Tensor::zeros((self.history, c, h, w), x.dtype(), x.device())?
            }
        };
        let padded = Tensor::cat(&[&past, x], 0)?;
        let t = x.dim(0)?;
        // Copied out so that the cache does not pin the whole padded input.
        cache[self.slot] = Slot::Frames(padded.narrow(0, t, self.history)?.copy()?);
        self.conv.forward_split(&padded, pass.split)
    }
}

/// A 2D convolution with bias over `(N, C, H, W)`, stride 1, padding `k / 2`.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    conv: FrameConv,
}

impl Conv2d {
    pub(crate) fn new(in_dim: usize, out_dim: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim, k, k), "weight")?.unsqueeze(2)?;
        Ok(Self {
            conv: FrameConv::new(weight, vb.get(out_dim, "bias")?, vb.device())?,
        })
    }

    /// The convolution of `x` `(N, C_in, H, W)`, or of this rank's rows of it under `split`.
    pub(crate) fn forward(&self, x: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        self.conv.forward_split(x, split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;

    #[test]
    fn gemm_path_matches_conv2d_path_in_bands_too() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 4, 7, 6), &dev).unwrap();
        for (kt, k) in [(3, 3), (1, 3), (3, 1), (1, 1)] {
            let weight = Tensor::randn(0f32, 1., (5, 4, kt, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., 5, &dev).unwrap();
            let conv = FrameConv::new(weight.clone(), bias, &dev).unwrap();
            let stacked = weight
                .permute((0, 2, 1, 3, 4))
                .unwrap()
                .reshape((5, kt * 4, k, k))
                .unwrap();
            let direct = FrameConv {
                kernel: Kernel::Conv2d(stacked.contiguous().unwrap()),
                ..conv.clone()
            };
            let want = direct.forward_banded(&x, usize::MAX, false).unwrap();
            assert_eq!(want.dims(), &[6 - kt, 5, 7, 6]);
            // Whole frames, then bands of 1 and 3 rows.
            for max in [usize::MAX, 1, 5 * 4 * 9 * 6 * 3] {
                let got = conv.forward_banded(&x, max, false).unwrap();
                let err = relative_l2(&got, &want).unwrap();
                assert!(err < 1e-6, "kt {kt} k {k} max {max}: {err:.3e}");
            }
        }
    }
}
