//! The Wan VAE's convolutions on channels-last frames `(T, H, W, C)`: the causal 3D convolution
//! (`WanCausalConv3d`) with its per-layer frame cache, and the plain 2D convolutions.
//!
//! Candle has no conv3d, and its CPU conv2d is slow at the VAE's shapes, so on the CPU a
//! convolution is a sum of matrix products over shifted views of the input, with no patch
//! matrix: channels-last, the input frames are padded once (a zero pixel on each side of a row,
//! a zero row above and below a frame), and then for a kernel tap `(t, y)` the rows of the left
//! operand are the padded pixels shifted by that tap, each row the `3 · C` values of three
//! neighbouring pixels (the three `x` taps, contiguous in memory, so the rows overlap). Every
//! output frame and row is one matrix of the product: output pixels over the padded width, the
//! two pixels of each row that fall on the padding thrown away when the result is copied out
//! with the bias. The products are `gemm`'s canonical row-major form, which runs at the
//! machine's matrix rate, and no operand is copied but the padded input. Other devices use the
//! backend's conv2d on channels-first frames, with the temporal taps stacked along the channels.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::vae_blocks::{Pass, Slot, SlotCounter};
use super::vae_split::RowSplit;

/// The weights of one convolution, laid out for the device that runs it.
#[derive(Debug, Clone)]
enum Kernel {
    /// `(kernel_t, k, k, C_in, C_out)` and the bias, f32 on the host, for [`ShiftedProducts`].
    Host { weight: Vec<f32>, bias: Vec<f32> },
    /// `(C_out, kernel_t · C_in, k, k)`, the taps stacked tap-major along the input channels,
    /// and the bias as `(1, C_out, 1, 1)`.
    Conv2d { weight: Tensor, bias: Tensor },
}

/// A convolution over frames, `kernel_t` frames deep and `k × k` wide, stride 1.
#[derive(Debug, Clone)]
struct FrameConv {
    kernel: Kernel,
    kernel_t: usize,
    k: usize,
    in_dim: usize,
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
            let host = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            Kernel::Host {
                weight: host(weight.permute((2, 3, 4, 1, 0))?.contiguous()?)?,
                bias: host(bias)?,
            }
        } else {
            let w = weight
                .permute((0, 2, 1, 3, 4))?
                .reshape((out_dim, kernel_t * in_dim, k, k))?;
            Kernel::Conv2d {
                weight: w.contiguous()?,
                bias: bias.reshape((1, out_dim, 1, 1))?,
            }
        };
        Ok(Self {
            kernel,
            kernel_t,
            k,
            in_dim,
            out_dim,
        })
    }

    /// Convolves `padded` `(T + kernel_t - 1, H, W, C_in)`, whose first frames are the history,
    /// into `(T, H, W, C_out)`; spatial padding is `k / 2` zeros on each side.
    fn forward(&self, padded: &Tensor) -> Result<Tensor> {
        self.forward_rows(padded, false)
    }

    /// [`Self::forward`] on this rank's rows of the frames under `split`: a 3×3 kernel reads
    /// one row of the neighbouring bands on each side.
    fn forward_split(&self, padded: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        match split {
            Some(split) if self.k > 1 => self.forward_rows(&split.with_halo(padded)?, true),
            _ => self.forward(padded),
        }
    }

    /// With `halo`, the first and last rows of `padded` are only read (the neighbouring bands'
    /// rows): the output has two rows fewer than the input.
    fn forward_rows(&self, padded: &Tensor, halo: bool) -> Result<Tensor> {
        let (n, h_in, _, c) = padded.dims4()?;
        if c != self.in_dim || n < self.kernel_t {
            candle_core::bail!(
                "a convolution of {} input channels and {} frames deep got frames {:?}",
                self.in_dim,
                self.kernel_t,
                padded.dims()
            );
        }
        if halo && h_in < 3 {
            candle_core::bail!("a band with halo rows needs at least 3 rows, got {h_in}");
        }
        match &self.kernel {
            Kernel::Host { weight, bias } => {
                let dtype = padded.dtype();
                let op = ShiftedProducts {
                    weight,
                    bias,
                    kernel_t: self.kernel_t,
                    k: self.k,
                    out_dim: self.out_dim,
                    halo,
                };
                padded
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&op)?
                    .to_dtype(dtype)
            }
            Kernel::Conv2d { weight, bias } => {
                let t = n + 1 - self.kernel_t;
                let frames = padded.permute((0, 3, 1, 2))?;
                let taps: Vec<Tensor> = (0..self.kernel_t)
                    .map(|k| frames.narrow(0, k, t))
                    .collect::<Result<_>>()?;
                let stacked = Tensor::cat(&taps, 1)?.contiguous()?;
                let out = stacked.conv2d(weight, self.k / 2, 1, 1, 1)?;
                let out = if halo {
                    out.narrow(2, 1, h_in - 2)?
                } else {
                    out
                };
                out.broadcast_add(bias)?.permute((0, 2, 3, 1))?.contiguous()
            }
        }
    }
}

/// The CPU convolution of contiguous f32 channels-last frames `(N, H, W, C_in)` into
/// `(N + 1 - kernel_t, H', W, C_out)` as sums of products of shifted views (see the module
/// documentation).
struct ShiftedProducts<'a> {
    /// `(kernel_t, k, k, C_in, C_out)`.
    weight: &'a [f32],
    bias: &'a [f32],
    kernel_t: usize,
    k: usize,
    out_dim: usize,
    /// The input's first and last rows are the neighbouring bands' rows, not zero padding.
    halo: bool,
}

impl ShiftedProducts<'_> {
    fn run(&self, src: &[f32], (n, h_in, w, c): (usize, usize, usize, usize)) -> (Vec<f32>, Shape) {
        let t = n + 1 - self.kernel_t;
        let cout = self.out_dim;
        if self.k == 1 {
            // Pointwise in space: the frames themselves are the operand of each time tap.
            let pixels = h_in * w;
            let mut out = vec![0f32; t * pixels * cout];
            let taps: Vec<(usize, &[f32])> = (0..self.kernel_t)
                .map(|tap| {
                    (
                        tap * pixels * c,
                        &self.weight[tap * c * cout..(tap + 1) * c * cout],
                    )
                })
                .collect();
            shifted_products(&mut out, cout, src, c, c, &taps);
            self.add_bias(&mut out);
            return (out, Shape::from((t, h_in, w, cout)));
        }
        // Frames padded to (H + 2) × (W + 2), or W + 2 only when the halo rows are there; two
        // extra pixels at the end, which only the thrown-away columns of the last row read.
        let (hp, wp, top) = if self.halo {
            (h_in, w + 2, 0)
        } else {
            (h_in + 2, w + 2, 1)
        };
        let h = hp - 2;
        let plane = hp * wp;
        let mut padded = vec![0f32; (n * plane + 2) * c];
        padded[..n * plane * c]
            .par_chunks_mut(plane * c)
            .zip(src.par_chunks(h_in * w * c))
            .for_each(|(dst, frame)| {
                for (y, row) in frame.chunks(w * c).enumerate() {
                    let at = ((y + top) * wp + 1) * c;
                    dst[at..at + w * c].copy_from_slice(row);
                }
            });
        // Output pixel r of the padded grid (frame r / plane, row, column) reads padded pixels
        // r + base(tap) .. r + base(tap) + 3 for the tap's three x offsets.
        let rows = (t - 1) * plane + h * wp;
        let mut grid = vec![0f32; rows * cout];
        let taps: Vec<(usize, &[f32])> = (0..self.kernel_t * 3)
            .map(|tap| {
                let (dt, dy) = (tap / 3, tap % 3);
                let weight = &self.weight[tap * 3 * c * cout..(tap + 1) * 3 * c * cout];
                ((dt * plane + dy * wp) * c, weight)
            })
            .collect();
        shifted_products(&mut grid, cout, &padded, c, 3 * c, &taps);
        // Copied out without the padding columns (and rows between frames), bias added.
        let mut out = vec![0f32; t * h * w * cout];
        out.par_chunks_mut(w * cout)
            .enumerate()
            .for_each(|(i, dst)| {
                let (f, y) = (i / h, i % h);
                let at = (f * plane + y * wp) * cout;
                for (dst, src) in dst
                    .chunks_exact_mut(cout)
                    .zip(grid[at..at + w * cout].chunks_exact(cout))
                {
                    for ((d, s), b) in dst.iter_mut().zip(src).zip(self.bias) {
                        *d = s + b;
                    }
                }
            });
        (out, Shape::from((t, h, w, cout)))
    }

    fn add_bias(&self, out: &mut [f32]) {
        out.par_chunks_mut(self.out_dim * 256).for_each(|block| {
            for pixel in block.chunks_exact_mut(self.out_dim) {
                for (v, b) in pixel.iter_mut().zip(self.bias) {
                    *v += b;
                }
            }
        });
    }
}

/// `dst (M, N) = Σ lhs_tap · rhs_tap` over the `taps` `(offset, rhs)`: row `r` of `lhs_tap` is
/// the `K` values of `lhs` from `offset + r · lhs_step` (rows overlap when `lhs_step < K`),
/// `rhs` is row-major `(K, N)`, and so is `dst`.
///
/// The rows are cut into blocks that the threads take whole, every tap of a block in turn, so
/// that the block's sums stay in the core's cache across the taps; gemm's own threading splits
/// one product across the threads instead and, at these shapes, streams its packed operand
/// through memory on both cores at once (1.2× from the second thread, against 1.8-2× this way).
fn shifted_products(
    dst: &mut [f32],
    n: usize,
    lhs: &[f32],
    lhs_step: usize,
    k: usize,
    taps: &[(usize, &[f32])],
) {
    let m = dst.len() / n;
    if m == 0 {
        return;
    }
    for (offset, rhs) in taps {
        assert!(
            lhs.len() >= offset + (m - 1) * lhs_step + k,
            "lhs rows out of bounds"
        );
        assert_eq!(rhs.len(), k * n, "rhs is not K × N");
    }
    let block = m
        .div_ceil(8 * rayon::current_num_threads())
        .clamp(128, 2048);
    dst.par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(b, dst)| {
            let rows = dst.len() / n;
            for (i, (offset, rhs)) in taps.iter().enumerate() {
                let lhs = &lhs[offset + b * block * lhs_step..];
                // SAFETY: the asserts above keep every read of `lhs` and `rhs` in bounds (this
                // block's rows are a part of the M rows checked), `dst` is this block's
                // rows × N with row stride N, and no other task holds it.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        i > 0,
                        lhs.as_ptr(),
                        1,
                        lhs_step as isize,
                        rhs.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
}

impl CustomOp1 for ShiftedProducts<'_> {
    fn name(&self) -> &'static str {
        "wan-vae-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = layout.shape().dims4()?;
        let (CpuStorage::F32(src), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("the VAE convolution needs contiguous f32 frames");
        };
        if self.weight.len() != self.kernel_t * self.k * self.k * c * self.out_dim
            || n < self.kernel_t
            || w == 0
        {
            candle_core::bail!(
                "a {}×{k}×{k} convolution to {} channels cannot take frames {:?}",
                self.kernel_t,
                self.out_dim,
                (n, h, w, c),
                k = self.k
            );
        }
        let (out, shape) = self.run(&src[start..end], (n, h, w, c));
        Ok((CpuStorage::F32(out), shape))
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
                let (_, h, w, c) = x.dims4()?;
                Tensor::zeros((self.history, h, w, c), x.dtype(), x.device())?
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
    fn shifted_products_match_the_backend_conv2d() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 7, 6, 4), &dev).unwrap();
        for (kt, k) in [(3, 3), (1, 3), (3, 1), (1, 1)] {
            let weight = Tensor::randn(0f32, 1., (5, 4, kt, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., 5, &dev).unwrap();
            let host = FrameConv::new(weight.clone(), bias.clone(), &dev).unwrap();
            let stacked = weight
                .permute((0, 2, 1, 3, 4))
                .unwrap()
                .reshape((5, kt * 4, k, k))
                .unwrap();
            let backend = FrameConv {
                kernel: Kernel::Conv2d {
                    weight: stacked.contiguous().unwrap(),
                    bias: bias.reshape((1, 5, 1, 1)).unwrap(),
                },
                ..host.clone()
            };
            assert!(matches!(host.kernel, Kernel::Host { .. }));
            let want = backend.forward(&x).unwrap();
            assert_eq!(want.dims(), &[6 - kt, 7, 6, 5]);
            let got = host.forward(&x).unwrap();
            let err = relative_l2(&got, &want).unwrap();
            assert!(err < 1e-6, "kt {kt} k {k}: {err:.3e}");
            if k == 3 {
                // Rows 1..6 with rows 0 and 6 as halo: the inner rows of the whole convolution.
                for conv in [&host, &backend] {
                    let got = conv.forward_rows(&x, true).unwrap();
                    let err = relative_l2(&got, &want.narrow(1, 1, 5).unwrap()).unwrap();
                    assert!(err < 1e-6, "halo kt {kt}: {err:.3e}");
                }
            }
        }
    }
}
