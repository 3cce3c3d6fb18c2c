//! The building blocks of the Wan2.1 VAE decoder: the causal 3D convolution with its per-layer
//! frame cache, the channel RMS norm, residual blocks, the single-head attention of the mid
//! block and the spatial / spatio-temporal upsamplers.
//!
//! Every block works on one video laid out frames-first, `(T, C, H, W)`: the frames are the
//! batch of the 2D convolutions, so that the temporal taps of a causal 3D convolution are plain
//! slices along the first dimension and the time upsampler's interleave is a free reshape.
//! The tensor names mirror diffusers' `AutoencoderKLWan` exactly.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::vae_conv::{CausalConv3d, Conv2d};

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
    /// shorter, `(kernel_t - 1, C, H, W)`.
    Frames(Tensor),
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
/// dimension of `(N, C, H, W)`, computed in f32 whatever the model dtype.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    /// `γ · √C` as `(C, 1, 1)`, f32.
    scale: Tensor,
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
        let scale = (gamma.to_dtype(DType::F32)?.reshape((dim, 1, 1))? * (dim as f64).sqrt())?;
        Ok(Self { scale })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        // F.normalize's eps bounds the norm from below, it is not added to it.
        let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f64, f64::INFINITY)?;
        x.broadcast_div(&norm)?.broadcast_mul(&self.scale)?.to_dtype(dtype)
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
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder, slots: &mut SlotCounter) -> Result<Self> {
        let norm1 = RmsNorm::new(in_dim, false, vb.pp("norm1"))?;
        let conv1 = CausalConv3d::new(in_dim, out_dim, (3, 3, 3), vb.pp("conv1"), slots)?;
        let norm2 = RmsNorm::new(out_dim, false, vb.pp("norm2"))?;
        let conv2 = CausalConv3d::new(out_dim, out_dim, (3, 3, 3), vb.pp("conv2"), slots)?;
        let shortcut = if in_dim != out_dim {
            Some(CausalConv3d::new(in_dim, out_dim, (1, 1, 1), vb.pp("conv_shortcut"), slots)?)
        } else {
            None
        };
        Ok(Self { norm1, conv1, norm2, conv2, shortcut })
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut [Slot]) -> Result<Tensor> {
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(x, cache)?,
            None => x.clone(),
        };
        let h = self.norm1.forward(x)?.silu()?;
        let h = self.conv1.forward(&h, cache)?;
        let h = self.norm2.forward(&h)?.silu()?;
        let h = self.conv2.forward(&h, cache)?;
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
        Ok(Self { norm, to_qkv, proj, dim })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, c, h, w) = x.dims4()?;
        let qkv = self.to_qkv.forward(&self.norm.forward(x)?)?.reshape((t, 3 * c, h * w))?;
        // Channels-first (T, C, HW) operands: scores = qᵀk, out = v·attnᵀ, so no transposed copy
        // of the activations is needed.
        let q = qkv.narrow(1, 0, c)?;
        let k = qkv.narrow(1, c, c)?;
        let v = qkv.narrow(1, 2 * c, c)?;
        let scores = (q.transpose(1, 2)?.matmul(&k)? / (self.dim as f64).sqrt())?;
        let attn = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = v.matmul(&attn.transpose(1, 2)?)?.reshape((t, c, h, w))?;
        self.proj.forward(&out)? + x
    }
}

/// `WanResample` in its two decoder modes: nearest ×2 in space then a 3×3 conv to half the width,
/// preceded for `upsample3d` by a causal time conv that doubles the frame count.
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    resample: Conv2d,
    /// `(3, 1, 1)` causal conv from `C` to `2C`: the two halves are the two output frames.
    time_conv: Option<CausalConv3d>,
    /// The cache slot of the time conv's "first chunk seen" state.
    slot: usize,
}

impl Upsample {
    pub(crate) fn new(dim: usize, temporal: bool, vb: VarBuilder, slots: &mut SlotCounter) -> Result<Self> {
        let (time_conv, slot) = if temporal {
            let conv = CausalConv3d::new(dim, 2 * dim, (3, 1, 1), vb.pp("time_conv"), slots)?;
            let slot = conv.slot;
            (Some(conv), slot)
        } else {
            (None, usize::MAX)
        };
        let resample = Conv2d::new(dim, dim / 2, 3, vb.pp("resample.1"))?;
        Ok(Self { resample, time_conv, slot })
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut [Slot]) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(time_conv) = &self.time_conv {
            if matches!(cache[self.slot], Slot::Empty) {
                // The video's first frame is not upsampled in time (1 + 4(F-1) output frames).
                cache[self.slot] = Slot::Started;
            } else {
                let (t, c, h, w) = x.dims4()?;
                // (T, 2C, H, W) → (2T, C, H, W): frame 2t+j is half j of frame t.
                x = time_conv.forward(&x, cache)?.reshape((2 * t, c, h, w))?;
            }
        }
        let (_, _, h, w) = x.dims4()?;
        let dtype = x.dtype();
        // Nearest-exact at an integer ×2 factor is plain nearest; diffusers upsamples in f32.
        let up = x.to_dtype(DType::F32)?.upsample_nearest2d(2 * h, 2 * w)?.to_dtype(dtype)?;
        self.resample.forward(&up)
    }
}
