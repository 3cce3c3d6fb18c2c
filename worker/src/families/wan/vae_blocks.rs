//! The building blocks of the Wan2.1 VAE above the convolutions (those are in `vae_conv`): the
//! cache slots of causal layers, the channel RMS norm, residual blocks, the single-head attention
//! of the mid blocks, the decoder's spatial / spatio-temporal upsamplers and the encoder's
//! downsamplers.
//!
//! Every block works on one video laid out channels-last, `(T, H, W, C)`: the frames are the
//! batch of the 2D operations, so that the temporal taps of a causal 3D convolution are slices
//! along the first dimension, and a pixel's channels are contiguous, which the convolutions'
//! matrix products and the channel norm read best.
//! The tensor names mirror diffusers' `AutoencoderKLWan` exactly.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::vae_conv::{CausalConv3d, Conv2d, UpsampleConv2d};
use super::vae_split::RowSplit;
use crate::model::cpu_math::{silu, Isa};

/// The state a causal layer keeps between two chunks of frames (diffusers' `feat_cache` entry).
#[derive(Debug, Clone, Default)]
pub(crate) enum Slot {
    /// Nothing has been decoded yet: a causal convolution sees zeros before the first frame.
    #[default]
    Empty,
    /// Only for the time upsampler: the first chunk went through without temporal upsampling,
    /// the next one starts its time convolution from zeros (diffusers' `"Rep"` marker).
    Started,
    /// The last `kernel_t - 1` input frames of the layer, zeros included where the history is
    /// shorter, `(kernel_t - 1, H, W, C)`.
    Frames(Tensor),
}

/// What one decode carries through the decoder's layers: the causal cache slots, and the row
/// split when the ranks of a group decode the frames together.
pub(crate) struct Pass<'s, 'c> {
    pub(crate) slots: &'s mut [Slot],
    pub(crate) split: Option<&'s RowSplit<'c>>,
}

/// Hands out cache slots in the order diffusers' `feat_idx` counts them.
#[derive(Debug, Default)]
pub(crate) struct SlotCounter(usize);

impl SlotCounter {
    pub(crate) fn next(&mut self) -> usize {
        self.0 += 1;
        self.0 - 1
    }

    pub(crate) fn count(&self) -> usize {
        self.0
    }
}

/// `WanRMS_norm` (without bias, as in Wan2.1): `x / max(‖x‖₂, 1e-12) · √C · γ` over the channel
/// dimension of `(N, H, W, C)`, computed in f32 whatever the model dtype. Every use but the
/// attention's is followed by SiLU, which [`RmsNorm::forward_silu`] fuses in.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    /// `γ · √C` as `(C,)`, f32.
    scale: Tensor,
    /// The same values on the host, for the fused CPU kernel.
    scale_host: Vec<f32>,
}

impl RmsNorm {
    /// `images` selects the stored shape of γ: `(C, 1, 1)` for the attention's norm, `(C, 1, 1, 1)`
    /// for the others.
    pub(crate) fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        let scale = (gamma.to_dtype(DType::F32)?.reshape(dim)? * (dim as f64).sqrt())?;
        let scale_host = scale.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { scale, scale_host })
    }

    /// `silu(norm(x))`.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let y = if x.device().is_cpu() {
            // One pass over memory instead of the six of the tensor-op version below.
            x.contiguous()?.apply_op1_no_bwd(&ChannelRmsNorm {
                scale: &self.scale_host,
                silu,
                isa: Isa::detect(),
            })?
        } else {
            // F.normalize's eps bounds the norm from below, it is not added to it.
            let norm = x
                .sqr()?
                .sum_keepdim(3)?
                .sqrt()?
                .clamp(1e-12f64, f64::INFINITY)?;
            let y = x.broadcast_div(&norm)?.broadcast_mul(&self.scale)?;
            if silu {
                y.silu()?
            } else {
                y
            }
        };
        y.to_dtype(dtype)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// The CPU kernel of [`RmsNorm`] on contiguous f32 `(N, H, W, C)`, optionally followed by SiLU.
struct ChannelRmsNorm<'a> {
    scale: &'a [f32],
    silu: bool,
    /// The compilation of [`Self::pixels`] to run.
    isa: Isa,
}

impl ChannelRmsNorm<'_> {
    /// Pixels per parallel task.
    const BLOCK: usize = 512;

    fn pixels(&self, src: &[f32], dst: &mut [f32]) {
        // SAFETY (both): `isa` comes from `Isa::detect`, so the CPU has the features.
        match self.isa {
            Isa::Portable => self.pixels_portable(src, dst),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { self.pixels_avx2(src, dst) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.pixels_avx512(src, dst) },
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pixels_avx2(&self, src: &[f32], dst: &mut [f32]) {
        self.pixels_portable(src, dst)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn pixels_avx512(&self, src: &[f32], dst: &mut [f32]) {
        self.pixels_portable(src, dst)
    }

    #[inline(always)]
    fn pixels_portable(&self, src: &[f32], dst: &mut [f32]) {
        const LANES: usize = 16;
        let channels = self.scale.len();
        for (src, dst) in src
            .chunks_exact(channels)
            .zip(dst.chunks_exact_mut(channels))
        {
            // Sixteen partial sums, so that the sum of squares vectorises.
            let mut lanes = [0f32; LANES];
            let mut blocks = src.chunks_exact(LANES);
            for block in &mut blocks {
                for (acc, v) in lanes.iter_mut().zip(block) {
                    *acc += v * v;
                }
            }
            let tail: f32 = blocks.remainder().iter().map(|v| v * v).sum();
            let inv = 1.0 / (lanes.iter().sum::<f32>() + tail).sqrt().max(1e-12);
            let values = dst.iter_mut().zip(src).zip(self.scale);
            // two loops, not a branch per channel, so that each vectorises
            if self.silu {
                for ((out, v), scale) in values {
                    *out = silu(v * inv * scale);
                }
            } else {
                for ((out, v), scale) in values {
                    *out = v * inv * scale;
                }
            }
        }
    }
}

impl CustomOp1 for ChannelRmsNorm<'_> {
    fn name(&self) -> &'static str {
        "wan-vae-channel-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = layout.shape().dims4()?.3;
        let (CpuStorage::F32(src), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("channel rms norm needs contiguous f32");
        };
        if c != self.scale.len() || c == 0 {
            candle_core::bail!(
                "channel rms norm over {c} channels with {} scales",
                self.scale.len()
            );
        }
        let src = &src[start..end];
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(Self::BLOCK * c)
            .zip(src.par_chunks(Self::BLOCK * c))
            .for_each(|(dst, src)| self.pixels(src, dst));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `WanResidualBlock`: norm, SiLU, causal conv, norm, SiLU, causal conv, plus a 1×1×1 shortcut
/// when the width changes.
#[derive(Debug, Clone)]
pub(crate) struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub(crate) fn new(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        slots: &mut SlotCounter,
    ) -> Result<Self> {
        let norm1 = RmsNorm::new(in_dim, false, vb.pp("norm1"))?;
        let conv1 = CausalConv3d::new(in_dim, out_dim, (3, 3, 3), vb.pp("conv1"), slots)?;
        let norm2 = RmsNorm::new(out_dim, false, vb.pp("norm2"))?;
        let conv2 = CausalConv3d::new(out_dim, out_dim, (3, 3, 3), vb.pp("conv2"), slots)?;
        let shortcut = if in_dim != out_dim {
            Some(CausalConv3d::new(
                in_dim,
                out_dim,
                (1, 1, 1),
                vb.pp("conv_shortcut"),
                slots,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            norm2,
            conv2,
            shortcut,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(x, pass)?,
            None => x.clone(),
        };
        let h = self.norm1.forward_silu(x)?;
        let h = self.conv1.forward(&h, pass)?;
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h, pass)?;
        h + residual
    }
}

/// `WanAttentionBlock`: single-head self-attention over the pixels of each frame.
#[derive(Debug, Clone)]
pub(crate) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
    dim: usize,
}

impl AttentionBlock {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let norm = RmsNorm::new(dim, true, vb.pp("norm"))?;
        let to_qkv = Conv2d::new(dim, 3 * dim, 1, vb.pp("to_qkv"))?;
        let proj = Conv2d::new(dim, dim, 1, vb.pp("proj"))?;
        Ok(Self {
            norm,
            to_qkv,
            proj,
            dim,
        })
    }
}

impl AttentionBlock {
    /// Self-attention over each frame's pixels, `x` `(T, H, W, C)`; under `split`, `x` is this
    /// rank's rows and they attend to the whole frame's keys and values, gathered from the
    /// group.
    pub(crate) fn forward(&self, x: &Tensor, split: Option<&RowSplit<'_>>) -> Result<Tensor> {
        let (t, h, w, c) = x.dims4()?;
        let qkv = self.to_qkv.forward(&self.norm.forward(x)?, None)?;
        let q = qkv.narrow(3, 0, c)?.reshape((t, h * w, c))?;
        let kv = match split {
            Some(split) => split.gather_rows(&qkv.narrow(3, c, 2 * c)?)?,
            None => qkv.narrow(3, c, 2 * c)?,
        };
        let pixels = kv.dim(1)? * kv.dim(2)?;
        let kv = kv.reshape((t, pixels, 2 * c))?;
        let k = kv.narrow(2, 0, c)?.contiguous()?;
        let v = kv.narrow(2, c, c)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (self.dim as f64).sqrt())?;
        let attn =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = attn.matmul(&v)?.reshape((t, h, w, c))?;
        self.proj.forward(&out, None)? + x
    }
}

/// `WanResample` in its two decoder modes: nearest ×2 in space then a 3×3 conv to half the width,
/// preceded for `upsample3d` by a causal time conv that doubles the frame count.
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    resample: UpsampleConv2d,
    /// `(3, 1, 1)` causal conv from `C` to `2C`: the two halves are the two output frames.
    time_conv: Option<CausalConv3d>,
    /// The cache slot of the time conv's "first chunk seen" state.
    slot: usize,
}

impl Upsample {
    pub(crate) fn new(
        dim: usize,
        temporal: bool,
        vb: VarBuilder,
        slots: &mut SlotCounter,
    ) -> Result<Self> {
        let (time_conv, slot) = if temporal {
            let conv = CausalConv3d::new(dim, 2 * dim, (3, 1, 1), vb.pp("time_conv"), slots)?;
            let slot = conv.slot;
            (Some(conv), slot)
        } else {
            (None, usize::MAX)
        };
        let resample = UpsampleConv2d::new(dim, dim / 2, vb.pp("resample.1"))?;
        Ok(Self {
            resample,
            time_conv,
            slot,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(time_conv) = &self.time_conv {
            if matches!(pass.slots[self.slot], Slot::Empty) {
                // The video's first frame is not upsampled in time (1 + 4(F-1) output frames).
                pass.slots[self.slot] = Slot::Started;
            } else {
                let (t, h, w, c) = x.dims4()?;
                // (T, H, W, 2C) → (2T, H, W, C): frame 2t+j is half j of frame t's channels.
                x = time_conv
                    .forward(&x, pass)?
                    .reshape((t, h, w, 2, c))?
                    .permute((0, 3, 1, 2, 4))?
                    .reshape((2 * t, h, w, c))?;
            }
        }
        self.resample.forward(&x, pass.split)
    }
}

/// `WanResample` in its two encoder modes: zero padding on the right and bottom, then a 3×3
/// convolution of stride 2 (`downsample2d`), followed for `downsample3d` by a time convolution of
/// three frames and stride 2 over the previous chunk's last frame and this chunk's.
#[derive(Debug, Clone)]
pub(crate) struct Downsample {
    /// `(C, C, 3, 3)` and `(C, 1, 1)`, f32, for candle's strided convolution over
    /// `(N, C, H, W)` (computed in f32 whatever the model dtype: candle's CPU convolution takes
    /// no half precision).
    weight: Tensor,
    bias: Tensor,
    time: Option<TimeDownsample>,
}

/// The `(3, 1, 1)`, stride-2, unpadded time convolution of `downsample3d`: per pixel, three
/// consecutive frames' channels side by side times one `(3C, C)` matrix.
#[derive(Debug, Clone)]
struct TimeDownsample {
    /// `(3C, C)`: row `tap · C + c_in`, column `c_out`.
    weight: Tensor,
    bias: Tensor,
    /// Holds the last frame of the previous chunk, after the spatial step.
    slot: usize,
}

impl Downsample {
    pub(crate) fn new(
        dim: usize,
        temporal: bool,
        vb: VarBuilder,
        slots: &mut SlotCounter,
    ) -> Result<Self> {
        let conv = vb.pp("resample.1").to_dtype(DType::F32);
        let weight = conv.get((dim, dim, 3, 3), "weight")?;
        let bias = conv.get(dim, "bias")?.reshape((1, dim, 1, 1))?;
        let time = if temporal {
            let conv = vb.pp("time_conv");
            let weight = conv
                .get((dim, dim, 3, 1, 1), "weight")?
                .reshape((dim, dim, 3))?
                .permute((2, 1, 0))?
                .reshape((3 * dim, dim))?
                .contiguous()?;
            Some(TimeDownsample {
                weight,
                bias: conv.get(dim, "bias")?,
                slot: slots.next(),
            })
        } else {
            None
        };
        Ok(Self { weight, bias, time })
    }

    /// `x` `(T, H, W, C)` → `(T', ⌈H/2⌉, ⌈W/2⌉, C)`; `T' = T` but in `downsample3d` after the
    /// video's first chunk, where it is `⌊(T − 2) / 2⌋ + 1` (four frames become two, two one).
    pub(crate) fn forward(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        let y = x
            .to_dtype(DType::F32)?
            .pad_with_zeros(1, 0, 1)?
            .pad_with_zeros(2, 0, 1)?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(&self.weight, 0, 2, 1, 1)?
            .broadcast_add(&self.bias)?
            .permute((0, 2, 3, 1))?
            .to_dtype(x.dtype())?
            .contiguous()?;
        let Some(time) = &self.time else {
            return Ok(y);
        };
        let t = y.dim(0)?;
        let last = y.narrow(0, t - 1, 1)?.copy()?;
        let previous = std::mem::replace(&mut pass.slots[time.slot], Slot::Frames(last));
        match previous {
            // The video's first chunk is not downsampled in time (diffusers keeps it as is).
            Slot::Empty | Slot::Started => Ok(y),
            Slot::Frames(previous) => time.forward(&Tensor::cat(&[&previous, &y], 0)?),
        }
    }
}

impl TimeDownsample {
    /// `x` `(N, H, W, C)` → `(⌊(N − 3) / 2⌋ + 1, H, W, C)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        if n < 3 {
            candle_core::bail!("a stride-2 time convolution of 3 frames got {n} frames");
        }
        let frames = (0..=(n - 3) / 2)
            .map(|j| {
                let taps = x
                    .narrow(0, 2 * j, 3)?
                    .permute((1, 2, 0, 3))?
                    .reshape((h * w, 3 * c))?;
                taps.matmul(&self.weight)?
                    .broadcast_add(&self.bias)?
                    .reshape((1, h, w, c))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&frames, 0)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::model::compare::relative_l2;

    #[test]
    fn fused_norm_matches_its_definition() {
        let dev = Device::Cpu;
        // 21 channels: one block of sixteen lanes and a tail; 900 pixels: one parallel block of
        // 512 and a partial one; one pixel all zeros.
        let gamma = Tensor::randn(1f32, 0.3, (21, 1, 1, 1), &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [("gamma".to_string(), gamma.clone())].into(),
            DType::F32,
            &dev,
        );
        let norm = RmsNorm::new(21, false, vb).unwrap();
        let x = Tensor::randn(0f32, 2.0, (3, 10, 30, 21), &dev).unwrap();
        let x = x
            .slice_assign(
                &[0..1, 0..1, 0..1, 0..21],
                &Tensor::zeros((1, 1, 1, 21), DType::F32, &dev).unwrap(),
            )
            .unwrap();
        let l2 = x
            .sqr()
            .unwrap()
            .sum_keepdim(3)
            .unwrap()
            .sqrt()
            .unwrap()
            .clamp(1e-12f64, f64::INFINITY)
            .unwrap();
        let want = (x.broadcast_div(&l2).unwrap() * 21f64.sqrt())
            .unwrap()
            .broadcast_mul(&gamma.reshape(21).unwrap())
            .unwrap();
        assert!(relative_l2(&norm.forward(&x).unwrap(), &want).unwrap() < 1e-6);
        let want = want.silu().unwrap();
        assert!(relative_l2(&norm.forward_silu(&x).unwrap(), &want).unwrap() < 1e-6);
    }
}
