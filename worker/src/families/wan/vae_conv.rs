//! The Wan VAE's convolutions on channels-last frames `(T, H, W, C)`: the causal 3D convolution
//! (`WanCausalConv3d`) with its per-layer frame cache, and the plain 2D convolutions.
//!
//! Candle has no conv3d, and its CPU conv2d is slow at the VAE's shapes, so on the CPU a
//! convolution is a sum of matrix products over shifted views of the input, with no patch
//! matrix: channels-last, the input frames are padded once (a zero pixel on each side of a row,
//! a zero row above and below a frame), and then for a kernel tap `(t, y)` the rows of the left
//! operand are the padded pixels shifted by that tap, each row the `3 · C` values of three
//! neighbouring pixels (the three `x` taps, contiguous in memory, so the rows overlap). All the
//! output frames and rows form one matrix of the product, its rows the output pixels over the
//! padded width: the two pixels of each row that fall on the padding are thrown away when the
//! result is copied out with the bias. The products are `gemm`'s canonical row-major form, which
//! runs at the machine's matrix rate, and no operand is copied but the padded input. Other
//! devices use the backend's conv2d on channels-first frames (permuted there and back, two
//! copies per convolution that a GPU build has not measured yet), with the temporal taps stacked
//! along the channels.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::vae_blocks::{Pass, Slot, SlotCounter};
use super::vae_split::RowSplit;
use crate::model::cpu_amx::{self, Left, PackedWeights, Start};
use crate::model::cpu_math::{product, written};

/// The weights of one convolution, laid out for the device that runs it.
#[derive(Debug, Clone)]
enum Kernel {
    /// `(kernel_t, k, k, C_in, C_out)` and the bias, f32 on the host, for [`ShiftedProducts`];
    /// each tap's weights laid out for AMX tiles where the CPU has them and the shape fits.
    Host {
        weight: Vec<f32>,
        bias: Vec<f32>,
        tiles: Option<Tiles>,
    },
    /// `(C_out, kernel_t · C_in, k, k)`, the taps stacked tap-major along the input channels,
    /// and the bias as `(1, C_out, 1, 1)`.
    Conv2d { weight: Tensor, bias: Tensor },
}

/// The right operands of a convolution's taps laid out for AMX tiles, in the order of its taps.
type Tiles = Arc<Vec<PackedWeights>>;

/// `weight` cut into `taps` right operands of `k × n` (row-major, one after the other), laid
/// out for AMX tiles; `None` where the CPU has no AMX or the shape does not fit the tiles.
fn tap_tiles(weight: &[f32], taps: usize, k: usize, n: usize) -> Option<Tiles> {
    if !(cpu_amx::available() && cpu_amx::fits(k, n)) || weight.len() != taps * k * n {
        return None;
    }
    let packed = weight
        .chunks_exact(k * n)
        .map(|tap| PackedWeights::pack_columns(tap, k, n))
        .collect();
    Some(Arc::new(packed))
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
            let weight = host(weight.permute((2, 3, 4, 1, 0))?.contiguous()?)?;
            // a 3×3 kernel's taps are (t, y), each reading three pixels' channels (module docs)
            let tiles = match k {
                1 => tap_tiles(&weight, kernel_t, in_dim, out_dim),
                _ => tap_tiles(&weight, kernel_t * 3, 3 * in_dim, out_dim),
            };
            Kernel::Host {
                weight,
                bias: host(bias)?,
                tiles,
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

    /// The CPU operation of this convolution with the host `weight`, `bias` and `tiles` of its
    /// kernel.
    fn host_op<'a>(
        &self,
        (weight, bias, tiles): (&'a [f32], &'a [f32], Option<&'a [PackedWeights]>),
        halo: bool,
    ) -> ShiftedProducts<'a> {
        ShiftedProducts {
            weight,
            bias,
            tiles,
            kernel_t: self.kernel_t,
            k: self.k,
            out_dim: self.out_dim,
            halo,
        }
    }

    /// [`Self::forward_split`] of the frames `history` then `x`, joined only where the device
    /// path needs them joined.
    fn forward_causal(
        &self,
        history: &Tensor,
        x: &Tensor,
        split: Option<&RowSplit<'_>>,
    ) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Host {
                weight,
                bias,
                tiles,
            } if self.k == 3 && split.is_none() => {
                let op = self.host_op((weight, bias, tiles.as_deref().map(Vec::as_slice)), false);
                let host = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
                host(history)?
                    .apply_op2_no_bwd(&host(x)?, &op)?
                    .to_dtype(x.dtype())
            }
            _ => self.forward_split(&Tensor::cat(&[history, x], 0)?, split),
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
            Kernel::Host {
                weight,
                bias,
                tiles,
            } => {
                let dtype = padded.dtype();
                let op = self.host_op((weight, bias, tiles.as_deref().map(Vec::as_slice)), halo);
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
    /// `weight`'s taps laid out for AMX tiles, where it has them.
    tiles: Option<&'a [PackedWeights]>,
    kernel_t: usize,
    k: usize,
    out_dim: usize,
    /// The input's first and last rows are the neighbouring bands' rows, not zero padding.
    halo: bool,
}

impl ShiftedProducts<'_> {
    /// `sources` hold the `N` input frames one after the other.
    fn run(&self, sources: &[&[f32]], (n, h_in, w, c): Dims4) -> (Vec<f32>, Shape) {
        let t = n + 1 - self.kernel_t;
        let cout = self.out_dim;
        if self.k == 1 {
            let joined;
            let src = match sources {
                [src] => *src,
                _ => {
                    joined = sources.concat();
                    &joined
                }
            };
            // Pointwise in space: the frames themselves are the operand of each time tap.
            let pixels = h_in * w;
            let mut out = zeroed(t * pixels * cout);
            let taps: Vec<(usize, &[f32])> = (0..self.kernel_t)
                .map(|tap| {
                    (
                        tap * pixels * c,
                        &self.weight[tap * c * cout..(tap + 1) * c * cout],
                    )
                })
                .collect();
            shifted_products(&mut out, cout, src, c, c, &taps, self.tiles);
            self.add_bias(&mut out);
            return (out, Shape::from((t, h_in, w, cout)));
        }
        let (padding, mut grid) = scratch::take();
        let padded = Padded::new(sources, (n, h_in, w, c), self.halo, padding);
        let (plane, wp, h) = (padded.plane, padded.wp, padded.rows);
        // Output pixel r of the padded grid (frame r / plane, row, column) reads padded pixels
        // r + base(tap) .. r + base(tap) + 3 for the tap's three x offsets.
        scratch::fit(&mut grid, padded.grid_rows(t) * cout);
        let taps: Vec<(usize, &[f32])> = (0..self.kernel_t * 3)
            .map(|tap| {
                let (dt, dy) = (tap / 3, tap % 3);
                let weight = &self.weight[tap * 3 * c * cout..(tap + 1) * 3 * c * cout];
                ((dt * plane + dy * wp) * c, weight)
            })
            .collect();
        shifted_products(&mut grid, cout, &padded.data, c, 3 * c, &taps, self.tiles);
        // Copied out without the padding columns (and rows between frames), bias added.
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(w * cout)
                .enumerate()
                .for_each(|(i, dst)| {
                    let (f, y) = (i / h, i % h);
                    let at = (f * plane + y * wp) * cout;
                    add_bias_to(dst, &grid[at..at + w * cout], self.bias);
                })
        };
        // SAFETY: the rows of `fill` cover the output, and `add_bias_to` writes each of theirs.
        let out = unsafe { written(t * h * w * cout, fill) };
        scratch::put(padded.data, grid);
        (out, Shape::from((t, h, w, cout)))
    }

    fn check(&self, (n, h, w, c): Dims4) -> Result<()> {
        if self.weight.len() != self.kernel_t * self.k * self.k * c * self.out_dim
            || n < self.kernel_t
            || w == 0
            || (self.halo && h < 3)
        {
            candle_core::bail!(
                "a {}×{k}×{k} convolution to {} channels cannot take frames {:?}",
                self.kernel_t,
                self.out_dim,
                (n, h, w, c),
                k = self.k
            );
        }
        Ok(())
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

/// `len` zeros, written by all the threads: a large buffer's single-threaded memset was a
/// tenth of a decode's wall time on two cores.
fn zeroed(len: usize) -> Vec<f32> {
    let mut zeros = Vec::with_capacity(len);
    zeros.par_extend(rayon::iter::repeat_n(0f32, len));
    zeros
}

/// The large temporaries of the CPU convolutions (the padded input, the product grid), kept per
/// thread from one convolution to the next: fresh buffers of this size are new pages each time,
/// and the page faults and the kernel's zeroing of them cost more than the copies themselves.
/// Holds as much as the largest convolution of the thread needed (about 70 MB for Wan2.1's
/// decoder at 128×128; a 480p frame needs proportionally more).
mod scratch {
    use std::cell::RefCell;

    thread_local! {
        static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// The thread's two buffers, with whatever they held; empty ones if another call has them.
    pub(super) fn take() -> (Vec<f32>, Vec<f32>) {
        BUFFERS.with(|buffers| std::mem::take(&mut *buffers.borrow_mut()))
    }

    /// Gives the buffers back for the next convolution on this thread.
    pub(super) fn put(padding: Vec<f32>, grid: Vec<f32>) {
        BUFFERS.with(|buffers| *buffers.borrow_mut() = (padding, grid));
    }

    /// `buffer` at `len` values; the values it keeps are not cleared (callers overwrite them).
    pub(super) fn fit(buffer: &mut Vec<f32>, len: usize) {
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        } else {
            buffer.truncate(len);
        }
    }
}

/// `dst = src + bias` pixel by pixel, `bias` one value per channel.
fn add_bias_to(dst: &mut [MaybeUninit<f32>], src: &[f32], bias: &[f32]) {
    for (dst, src) in dst
        .chunks_exact_mut(bias.len())
        .zip(src.chunks_exact(bias.len()))
    {
        for ((d, s), b) in dst.iter_mut().zip(src).zip(bias) {
            d.write(s + b);
        }
    }
}

/// Channels-last frames `(N, H, W, C)` padded for a 3×3 kernel: to `(H + 2) × (W + 2)`, or to
/// `W + 2` only when the frames' first and last rows are halo rows of the neighbouring bands;
/// two extra zero pixels at the end, which only the thrown-away columns of the last row read.
struct Padded {
    data: Vec<f32>,
    /// Pixels per padded row and per padded frame.
    wp: usize,
    plane: usize,
    /// Output rows per frame.
    rows: usize,
}

impl Padded {
    /// `sources` hold the `N` frames one after the other (the causal history, then the chunk);
    /// `data` is a buffer to reuse, whatever it holds.
    fn new(sources: &[&[f32]], (n, h_in, w, c): Dims4, halo: bool, mut data: Vec<f32>) -> Self {
        let (hp, top) = if halo { (h_in, 0) } else { (h_in + 2, 1) };
        let wp = w + 2;
        let plane = hp * wp;
        let frames: Vec<&[f32]> = sources
            .iter()
            .flat_map(|source| source.chunks_exact(h_in * w * c))
            .collect();
        assert_eq!(frames.len(), n, "the sources hold {} frames", frames.len());
        scratch::fit(&mut data, (n * plane + 2) * c);
        let (body, end) = data.split_at_mut(n * plane * c);
        end.fill(0.0);
        body.par_chunks_mut(plane * c)
            .zip(frames.par_iter())
            .for_each(|(dst, frame)| {
                for (yp, row) in dst.chunks_exact_mut(wp * c).enumerate() {
                    match (yp as isize - top as isize).try_into() {
                        Ok(y) if y < h_in => {
                            let y: usize = y;
                            row[..c].fill(0.0);
                            row[c..(w + 1) * c].copy_from_slice(&frame[y * w * c..][..w * c]);
                            row[(w + 1) * c..].fill(0.0);
                        }
                        _ => row.fill(0.0),
                    }
                }
            });
        Self {
            data,
            wp,
            plane,
            rows: hp - 2,
        }
    }

    /// The rows of the output grid of `frames` output frames: every padded pixel of the frames
    /// but the last frame's two bottom rows. Grid row `r` is output frame `r / plane`, row
    /// `r % plane / wp`, column `r % wp` (columns `W` and `W + 1` are thrown away).
    fn grid_rows(&self, frames: usize) -> usize {
        (frames - 1) * self.plane + self.rows * self.wp
    }
}

/// `WanResample`'s nearest ×2 upsampling followed by its 3×3 convolution, computed at the
/// input's resolution: output pixel `(2y + a, 2x + b)` reads only input rows `y - 1 + a ..= y + a`
/// and columns `x - 1 + b ..= x + b`, so each of the four phases `(a, b)` is a 2×2 convolution of
/// the input whose weights are sums of the 3×3 kernel's (the kernel taps that fall on the same
/// input pixel). 16 products per input pixel instead of 36, and the upsampled frames are never
/// made. Exact up to the order of float sums.
struct UpsampledProducts<'a> {
    /// `(a, b, dy, dx, C_in, C_out)`: [`phase_weights`].
    phases: &'a [f32],
    /// The phases' eight taps `(a, b, dy)` laid out for AMX tiles, where it has them.
    tiles: Option<&'a [PackedWeights]>,
    bias: &'a [f32],
    out_dim: usize,
    halo: bool,
}

/// The 2×2 kernels of [`UpsampledProducts`] from a 3×3 kernel `(ky, kx, C_in, C_out)`.
fn phase_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    // The 3×3 taps that phase `a`'s tap `d` sums: a = 0 reads input rows y - 1 (tap 0) and y
    // (taps 1, 2); a = 1 reads y (taps 0, 1) and y + 1 (tap 2). Columns alike.
    const TAPS: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];
    let block = cin * cout;
    let mut phases = vec![0f32; 16 * block];
    for (i, out) in phases.chunks_exact_mut(block).enumerate() {
        let (a, b, dy, dx) = (i / 8, i / 4 % 2, i / 2 % 2, i % 2);
        for &ky in TAPS[a][dy] {
            for &kx in TAPS[b][dx] {
                let tap = &weight[(ky * 3 + kx) * block..(ky * 3 + kx + 1) * block];
                for (o, w) in out.iter_mut().zip(tap) {
                    *o += w;
                }
            }
        }
    }
    phases
}

impl UpsampledProducts<'_> {
    fn run(&self, src: &[f32], (n, h_in, w, c): Dims4) -> (Vec<f32>, Shape) {
        let cout = self.out_dim;
        let (padding, mut grids) = scratch::take();
        let padded = Padded::new(&[src], (n, h_in, w, c), self.halo, padding);
        let (plane, wp, h) = (padded.plane, padded.wp, padded.rows);
        let block = 2 * c * cout;
        let grid_len = padded.grid_rows(n) * cout;
        scratch::fit(&mut grids, 4 * grid_len);
        for (phase, grid) in grids.chunks_exact_mut(grid_len).enumerate() {
            let (a, b) = (phase / 2, phase % 2);
            // Tap dy of phase (a, b) reads padded rows y + a + dy, columns x + b and x + b + 1.
            let taps: Vec<(usize, &[f32])> = (0..2)
                .map(|dy| {
                    let weight = &self.phases[(phase * 2 + dy) * block..][..block];
                    (((a + dy) * wp + b) * c, weight)
                })
                .collect();
            let tiles = self.tiles.map(|t| &t[phase * 2..phase * 2 + 2]);
            shifted_products(grid, cout, &padded.data, c, 2 * c, &taps, tiles);
        }
        let phase = |i: usize| &grids[i * grid_len..(i + 1) * grid_len];
        // Output row 2y + a interleaves phases (a, 0) and (a, 1) of input row y.
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(2 * w * cout)
                .enumerate()
                .for_each(|(i, dst)| {
                    let (f, y, a) = (i / (2 * h), i % (2 * h) / 2, i % 2);
                    let at = (f * plane + y * wp) * cout;
                    for (x, pair) in dst.chunks_exact_mut(2 * cout).enumerate() {
                        let (left, right) = pair.split_at_mut(cout);
                        let src = at + x * cout..at + (x + 1) * cout;
                        add_bias_to(left, &phase(2 * a)[src.clone()], self.bias);
                        add_bias_to(right, &phase(2 * a + 1)[src], self.bias);
                    }
                })
        };
        // SAFETY: the rows of `fill` cover the output, and each pixel pair is written whole.
        let out = unsafe { written(n * 2 * h * 2 * w * cout, fill) };
        scratch::put(padded.data, grids);
        (out, Shape::from((n, 2 * h, 2 * w, cout)))
    }
}

/// `dst (M, N) = Σ lhs_tap · rhs_tap` over the `taps` `(offset, rhs)`: row `r` of `lhs_tap` is
/// the `K` values of `lhs` from `offset + r · lhs_step` (rows overlap when `lhs_step < K`),
/// `rhs` is row-major `(K, N)`, and so is `dst`. With `tiles` (each tap's `rhs` laid out for
/// AMX), the products run on the tiles.
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
    tiles: Option<&[PackedWeights]>,
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
    // For the tiles, every input value split into bf16 parts once, not once per row and tap that
    // reads it.
    let (mut hi, mut lo) = (Vec::new(), Vec::new());
    if tiles.is_some() {
        (hi, lo) = (vec![0u16; lhs.len()], vec![0u16; lhs.len()]);
        lhs.par_chunks(SPLIT_CHUNK)
            .zip(hi.par_chunks_mut(SPLIT_CHUNK))
            .zip(lo.par_chunks_mut(SPLIT_CHUNK))
            .for_each(|((values, hi), lo)| cpu_amx::split_values(values, hi, lo));
    }
    let split = tiles.map(|_| Left::Split { hi: &hi, lo: &lo });
    let block = m
        .div_ceil(8 * rayon::current_num_threads())
        .clamp(128, 2048);
    dst.par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(b, dst)| {
            let rows = dst.len() / n;
            if let Some((tiles, split)) = tiles.zip(split) {
                for (i, ((offset, _), tile)) in taps.iter().zip(tiles).enumerate() {
                    let lhs = split.from(offset + b * block * lhs_step);
                    let start = if i == 0 { Start::Zero } else { Start::Out };
                    cpu_amx::product_rows(dst, lhs, lhs_step, tile, start);
                }
                return;
            }
            for (i, (offset, rhs)) in taps.iter().enumerate() {
                let lhs = &lhs[offset + b * block * lhs_step..];
                // SAFETY: the asserts above keep every read of `lhs` and `rhs` in bounds (this
                // block's rows are a part of the M rows checked), `dst` is this block's
                // rows × N with row stride N, and no other task holds it.
                unsafe {
                    product(
                        (rows, n, k),
                        dst.as_mut_ptr(),
                        n,
                        i > 0,
                        lhs.as_ptr(),
                        lhs_step,
                        rhs.as_ptr(),
                        (n, 1),
                    );
                }
            }
        });
}

/// Values per task when an operand is split into bf16 parts for the tiles.
const SPLIT_CHUNK: usize = 1 << 16;

/// `(N, H, W, C)`.
type Dims4 = (usize, usize, usize, usize);

/// The contiguous f32 values of channels-last frames, for the CPU operations of this module.
fn host_frames<'s>(storage: &'s CpuStorage, layout: &Layout) -> Result<(&'s [f32], Dims4)> {
    let dims = layout.shape().dims4()?;
    let (CpuStorage::F32(src), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("the VAE convolution needs contiguous f32 frames");
    };
    Ok((&src[start..end], dims))
}

impl CustomOp1 for ShiftedProducts<'_> {
    fn name(&self) -> &'static str {
        "wan-vae-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (src, dims) = host_frames(storage, layout)?;
        self.check(dims)?;
        let (out, shape) = self.run(&[src], dims);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The convolution of the causal history (the first argument) followed by the chunk (the
/// second), without joining them first.
impl CustomOp2 for ShiftedProducts<'_> {
    fn name(&self) -> &'static str {
        "wan-vae-causal-conv"
    }

    fn cpu_fwd(
        &self,
        history: &CpuStorage,
        history_layout: &Layout,
        chunk: &CpuStorage,
        chunk_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (past, (p, ph, pw, pc)) = host_frames(history, history_layout)?;
        let (src, (n, h, w, c)) = host_frames(chunk, chunk_layout)?;
        if (ph, pw, pc) != (h, w, c) {
            candle_core::bail!(
                "causal history frames {:?} do not match the chunk's {:?}",
                (p, ph, pw, pc),
                (n, h, w, c)
            );
        }
        let dims = (p + n, h, w, c);
        self.check(dims)?;
        let (out, shape) = self.run(&[past, src], dims);
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp1 for UpsampledProducts<'_> {
    fn name(&self) -> &'static str {
        "wan-vae-upsample-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (src, (n, h, w, c)) = host_frames(storage, layout)?;
        if self.phases.len() != 16 * c * self.out_dim || n == 0 || w == 0 || (self.halo && h < 3) {
            candle_core::bail!(
                "an upsampling 3×3 convolution to {} channels cannot take frames {:?}",
                self.out_dim,
                (n, h, w, c)
            );
        }
        let (out, shape) = self.run(src, (n, h, w, c));
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
        let t = x.dim(0)?;
        // Copied out so that the cache does not pin the whole input.
        let next = if t >= self.history {
            x.narrow(0, t - self.history, self.history)?.copy()?
        } else {
            Tensor::cat(&[&past, x], 0)?.narrow(0, t, self.history)?
        };
        let out = self.conv.forward_causal(&past, x, pass.split)?;
        cache[self.slot] = Slot::Frames(next);
        Ok(out)
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

    /// The convolution of `x` `(N, H, W, C_in)`, or of this rank's rows of it under `split`.
    pub(crate) fn forward(&self, x: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        self.conv.forward_split(x, split)
    }
}

/// `WanResample`'s `resample`: nearest ×2 upsampling in space, then a 3×3 convolution with bias.
#[derive(Debug, Clone)]
pub(crate) struct UpsampleConv2d {
    conv: FrameConv,
    /// On the CPU, the 2×2 kernels of the four output phases ([`UpsampledProducts`]), and
    /// their eight taps laid out for AMX tiles where the CPU has them.
    phases: Option<(Vec<f32>, Option<Tiles>)>,
}

impl UpsampleConv2d {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(in_dim, out_dim, 3, vb)?.conv;
        let phases = match &conv.kernel {
            Kernel::Host { weight, .. } => {
                let phases = phase_weights(weight, in_dim, out_dim);
                let tiles = tap_tiles(&phases, 8, 2 * in_dim, out_dim);
                Some((phases, tiles))
            }
            Kernel::Conv2d { .. } => None,
        };
        Ok(Self { conv, phases })
    }

    /// `x` `(N, H, W, C_in)` upsampled and convolved, `(N, 2H, 2W, C_out)`; under `split`, this
    /// rank's rows of it.
    pub(crate) fn forward(&self, x: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        match (&self.phases, &self.conv.kernel) {
            (Some((phases, tiles)), Kernel::Host { bias, .. }) => {
                let input = match split {
                    Some(split) => split.with_halo(x)?,
                    None => x.clone(),
                };
                let op = UpsampledProducts {
                    phases,
                    tiles: tiles.as_deref().map(Vec::as_slice),
                    bias,
                    out_dim: self.conv.out_dim,
                    halo: split.is_some(),
                };
                input
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&op)?
                    .to_dtype(x.dtype())
            }
            _ => {
                // Nearest-exact at an integer ×2 factor is plain nearest: every pixel repeated
                // 2 × 2 (exact in any dtype, so no f32 round trip as diffusers makes).
                let (n, h, w, c) = x.dims4()?;
                let up = x
                    .reshape((n, h, 1, w, 1, c))?
                    .broadcast_as((n, h, 2, w, 2, c))?
                    .reshape((n, 2 * h, 2 * w, c))?;
                self.conv.forward_split(&up, split)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;

    /// Against the backend's conv2d, at a few channels (`gemm`) and at 128 → 32 (AMX tiles where
    /// the CPU has them: f32 accuracy from bf16 parts, within 2e-5).
    #[test]
    fn shifted_products_match_the_backend_conv2d() {
        let dev = Device::Cpu;
        for (cin, cout) in [(4, 5), (128, 32)] {
            let x = Tensor::randn(0f32, 1., (5, 7, 6, cin), &dev).unwrap();
            for (kt, k) in [(3, 3), (1, 3), (3, 1), (1, 1)] {
                let weight = Tensor::randn(0f32, 1., (cout, cin, kt, k, k), &dev).unwrap();
                let bias = Tensor::randn(0f32, 1., cout, &dev).unwrap();
                let host = FrameConv::new(weight.clone(), bias.clone(), &dev).unwrap();
                let on_tiles = matches!(&host.kernel, Kernel::Host { tiles: Some(_), .. });
                assert_eq!(on_tiles, cpu_amx::available() && cin == 128);
                let tolerance = if on_tiles { 2e-5 } else { 1e-6 };
                let stacked = weight
                    .permute((0, 2, 1, 3, 4))
                    .unwrap()
                    .reshape((cout, kt * cin, k, k))
                    .unwrap();
                let backend = FrameConv {
                    kernel: Kernel::Conv2d {
                        weight: stacked.contiguous().unwrap(),
                        bias: bias.reshape((1, cout, 1, 1)).unwrap(),
                    },
                    ..host.clone()
                };
                let want = backend.forward(&x).unwrap();
                assert_eq!(want.dims(), &[6 - kt, 7, 6, cout]);
                let got = host.forward(&x).unwrap();
                let err = relative_l2(&got, &want).unwrap();
                assert!(err < tolerance, "{cin}→{cout} kt {kt} k {k}: {err:.3e}");
                if k == 3 {
                    // Rows 1..6 with rows 0 and 6 as halo: the inner rows of the whole.
                    for conv in [&host, &backend] {
                        let got = conv.forward_rows(&x, true).unwrap();
                        let err = relative_l2(&got, &want.narrow(1, 1, 5).unwrap()).unwrap();
                        assert!(err < tolerance, "halo kt {kt}: {err:.3e}");
                    }
                }
            }
        }
    }

    /// At a few channels (`gemm`) and at 64 → 32 (AMX tiles where the CPU has them).
    #[test]
    fn the_upsampling_convolution_equals_upsampling_then_convolving() {
        let dev = Device::Cpu;
        for (cin, cout) in [(3, 6), (64, 32)] {
            let x = Tensor::randn(0f32, 1., (2, 5, 4, cin), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., cout, &dev).unwrap();
            let vb = VarBuilder::from_tensors(
                [("weight".to_string(), weight), ("bias".to_string(), bias)].into(),
                DType::F32,
                &dev,
            );
            let conv = UpsampleConv2d::new(cin, cout, vb).unwrap();
            let (phases, tiles) = conv.phases.as_ref().unwrap();
            assert_eq!(tiles.is_some(), cpu_amx::available() && cin == 64);
            let tolerance = if tiles.is_some() { 2e-5 } else { 1e-6 };
            let explicit = UpsampleConv2d {
                phases: None,
                ..conv.clone()
            };
            let want = explicit.forward(&x, None).unwrap();
            assert_eq!(want.dims(), &[2, 10, 8, cout]);
            let got = conv.forward(&x, None).unwrap();
            let err = relative_l2(&got, &want).unwrap();
            assert!(err < tolerance, "{cin}→{cout}: {err:.3e}");
            // Input rows 1..4 with rows 0 and 4 as halo: output rows 2..8 of the whole.
            let op = UpsampledProducts {
                phases,
                tiles: tiles.as_deref().map(Vec::as_slice),
                bias: match &conv.conv.kernel {
                    Kernel::Host { bias, .. } => bias,
                    Kernel::Conv2d { .. } => unreachable!(),
                },
                out_dim: cout,
                halo: true,
            };
            let got = x.apply_op1_no_bwd(&op).unwrap();
            let err = relative_l2(&got, &want.narrow(1, 2, 6).unwrap()).unwrap();
            assert!(err < tolerance, "halo: {err:.3e}");
        }
    }
}
