//! Input embeddings of the Wan transformer: the 3D patch embedding of the latent video and the
//! `condition_embedder` (sinusoidal timestep → `time_embedder` → `time_proj` modulation, and the
//! `text_embedder` projection of the text encoder's states).

use crate::model::linear::{linear, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `patch_embedding`: a Conv3d whose kernel equals its stride, computed as "cut the latent into
/// patches, flatten each, one matmul" (no overlapping windows, so no generic convolution needed).
#[derive(Debug, Clone)]
pub struct PatchEmbedding {
    /// `(dim, C·pt·ph·pw)`: the conv kernel flattened in the same (channel, t, h, w) order as a
    /// flattened patch.
    weight: Tensor,
    bias: Tensor,
    patch: [usize; 3],
}

impl PatchEmbedding {
    pub fn new(in_channels: usize, dim: usize, patch: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let [pt, ph, pw] = patch;
        let weight = vb.get((dim, in_channels, pt, ph, pw), "weight")?;
        let weight = weight.reshape((dim, in_channels * pt * ph * pw))?;
        let bias = vb.get(dim, "bias")?;
        Ok(Self {
            weight,
            bias,
            patch,
        })
    }

    /// `(B, C, F, H, W)` → `(B, F'·H'·W', dim)` with `F' = F / pt` etc., tokens frame-major.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.patch;
        let (nf, nh, nw) = (f / pt, h / ph, w / pw);
        // Like the reference conv, trailing positions that do not fill a patch are dropped.
        let x = if nf * pt != f || nh * ph != h || nw * pw != w {
            x.narrow(2, 0, nf * pt)?
                .narrow(3, 0, nh * ph)?
                .narrow(4, 0, nw * pw)?
        } else {
            x.clone()
        };
        let patches = x
            .reshape(vec![b, c, nf, pt, nh, ph, nw, pw])?
            .permute([0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b * nf * nh * nw, c * pt * ph * pw))?;
        let tokens = patches
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        tokens.reshape((b, nf * nh * nw, ()))
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps, `(B,)` → `(B, freq_dim)` f32, as
/// diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`: `[cos(t·ωᵢ), sin(t·ωᵢ)]`
/// with `ωᵢ = 10000^(−i / (freq_dim/2))`.
pub fn timestep_embedding(timestep: &Tensor, freq_dim: usize) -> Result<Tensor> {
    let half = freq_dim / 2;
    let device: &Device = timestep.device();
    // Computed with f32 exp like the reference, so frequencies round the same way.
    let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)?
        * (-(10000f64.ln()) / half as f64))?;
    let freqs = exponent.exp()?.unsqueeze(0)?;
    let args = timestep
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if freq_dim % 2 == 1 {
        // Odd sizes are zero-padded at the end, as in the reference.
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `linear_1 → act → linear_2`, the shape of both `time_embedder` (SiLU) and `text_embedder`
/// (GELU, tanh approximation).
#[derive(Debug, Clone)]
struct TwoLayer {
    linear_1: Linear,
    linear_2: Linear,
    act: candle_nn::Activation,
}

impl TwoLayer {
    fn new(in_dim: usize, dim: usize, act: candle_nn::Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}

/// `image_embedder` (diffusers' `WanImageEmbedding`): the image encoder's hidden states through a
/// layer norm, a feed-forward to the model width (exact GELU) and a second layer norm; the norms
/// in f32 whatever the model dtype, as diffusers' `FP32LayerNorm`.
#[derive(Debug, Clone)]
struct ImageEmbedding {
    norm1: candle_nn::LayerNorm,
    proj_in: Linear,
    proj_out: Linear,
    norm2: candle_nn::LayerNorm,
}

/// `nn.LayerNorm`'s default epsilon, which `FP32LayerNorm` keeps.
const LAYER_NORM_EPS: f64 = 1e-5;

impl ImageEmbedding {
    fn new(image_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let f32_vb = vb.to_dtype(DType::F32);
        Ok(Self {
            norm1: candle_nn::layer_norm(image_dim, LAYER_NORM_EPS, f32_vb.pp("norm1"))?,
            proj_in: linear(image_dim, image_dim, vb.pp("ff.net.0.proj"))?,
            proj_out: linear(image_dim, dim, vb.pp("ff.net.2"))?,
            norm2: candle_nn::layer_norm(dim, LAYER_NORM_EPS, f32_vb.pp("norm2"))?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let dtype = image.dtype();
        let h = self
            .norm1
            .forward(&image.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?;
        let h = self
            .proj_out
            .forward(&self.proj_in.forward(&h)?.gelu_erf()?)?;
        self.norm2
            .forward(&h.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}

/// Output of the condition embedder.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `(B, dim)` in f32: the time embedding, used by the output norm.
    pub temb: Tensor,
    /// `(B, 6, dim)` in f32: the per-block modulation (shift, scale, gate for attention and FFN).
    pub modulation: Tensor,
    /// `(B, Lt, dim)` in the model dtype: the projected text for cross-attention; for
    /// image-to-video the projected image tokens first, then the text's (diffusers' order).
    pub context: Tensor,
}

/// `condition_embedder`: timestep and text embeddings.
#[derive(Debug, Clone)]
pub struct ConditionEmbedder {
    time_embedder: TwoLayer,
    time_proj: Linear,
    text_embedder: TwoLayer,
    image_embedder: Option<ImageEmbedding>,
    freq_dim: usize,
    dim: usize,
}

impl ConditionEmbedder {
    /// `image_dim`: an image-to-video transformer's image encoder width (`image_embedder`).
    pub fn new(
        dim: usize,
        freq_dim: usize,
        text_dim: usize,
        image_dim: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        // The reference keeps the time embedder in f32 whatever the model dtype.
        let time_vb = vb.pp("time_embedder").to_dtype(DType::F32);
        Ok(Self {
            time_embedder: TwoLayer::new(freq_dim, dim, candle_nn::Activation::Silu, time_vb)?,
            time_proj: linear(dim, 6 * dim, vb.pp("time_proj"))?,
            text_embedder: TwoLayer::new(
                text_dim,
                dim,
                candle_nn::Activation::GeluPytorchTanh,
                vb.pp("text_embedder"),
            )?,
            image_embedder: image_dim
                .map(|image_dim| ImageEmbedding::new(image_dim, dim, vb.pp("image_embedder")))
                .transpose()?,
            freq_dim,
            dim,
        })
    }

    /// `timestep` `(B,)`, `text` `(B, Lt, text_dim)` and, for image-to-video, `image`
    /// `(B, Li, image_dim)`, in the model dtype.
    pub fn forward(
        &self,
        timestep: &Tensor,
        text: &Tensor,
        image: Option<&Tensor>,
    ) -> Result<Conditioning> {
        let dtype = text.dtype();
        let b = timestep.dim(0)?;
        let sinusoid = timestep_embedding(timestep, self.freq_dim)?;
        // The reference rounds temb to the model dtype before using it anywhere.
        let temb = self.time_embedder.forward(&sinusoid)?.to_dtype(dtype)?;
        let modulation = self
            .time_proj
            .forward(&candle_nn::ops::silu(&temb)?)?
            .reshape((b, 6, self.dim))?
            .to_dtype(DType::F32)?;
        let text = self.text_embedder.forward(text)?;
        let context = match (&self.image_embedder, image) {
            (Some(embedder), Some(image)) => Tensor::cat(&[&embedder.forward(image)?, &text], 1)?,
            (None, None) => text,
            (Some(_), None) => candle_core::bail!(
                "an image-to-video transformer needs the image embedding \
                 (encoder_hidden_states_image) with the text"
            ),
            (None, Some(_)) => candle_core::bail!(
                "an image embedding was given to a text-to-video transformer (no image_embedder)"
            ),
        };
        Ok(Conditioning {
            temb: temb.to_dtype(DType::F32)?,
            modulation,
            context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::seeded_var_builder;

    #[test]
    fn patch_embedding_equals_a_strided_conv() -> Result<()> {
        let dev = Device::Cpu;
        let vb = seeded_var_builder(1, DType::F32, &dev);
        let (c, dim) = (3, 5);
        let pe = PatchEmbedding::new(c, dim, [1, 2, 2], vb.pp("p"))?;
        let x = Tensor::randn(0f32, 1.0, (2, c, 3, 4, 6), &dev)?;
        let ours = pe.forward(&x)?;
        // Reference: per frame, a 2D conv with kernel = stride = 2 (pt = 1).
        let w = vb.get((dim, c, 1, 2, 2), "p.weight")?.squeeze(2)?;
        let bias = vb.get(dim, "p.bias")?;
        let mut frames = Vec::new();
        for f in 0..3 {
            let xf = x.narrow(2, f, 1)?.squeeze(2)?;
            let y = xf
                .conv2d(&w, 0, 2, 1, 1)?
                .broadcast_add(&bias.reshape((1, dim, 1, 1))?)?;
            frames.push(y.flatten_from(2)?.transpose(1, 2)?); // (B, H'W', dim)
        }
        let reference = Tensor::cat(&frames, 1)?;
        let err = crate::model::compare::relative_l2(&ours, &reference)?;
        assert!(err < 1e-6, "patch embedding vs conv: {err}");
        Ok(())
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() -> Result<()> {
        let t = Tensor::new(&[0f32, 10.0], &Device::Cpu)?;
        let e = timestep_embedding(&t, 8)?.to_vec2::<f32>()?;
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // ω₁ = 10000^(-1/4) = 0.1
        assert!((e[1][1] - 1.0f32.cos()).abs() < 1e-5 && (e[1][5] - 1.0f32.sin()).abs() < 1e-5);
        Ok(())
    }
}
