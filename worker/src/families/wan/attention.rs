//! Attention of the Wan transformer: the projections of `attn1` (self) and `attn2` (cross), the
//! q/k RMS norm across heads and the rotary embedding; the model-agnostic core over
//! `(batch, heads, tokens, head_dim)` tensors is [`crate::model::attention`].
//!
//! The steps are kept separate (project → RMS-normalise q/k → split heads → rotate → core →
//! merge heads → output projection) because the parallel runtime splits them across devices:
//! tensor parallelism shards heads (the q/k norm is then the only step that needs the full row,
//! see [`WanAttention::norm_qk`]), Ulysses exchanges tokens for heads around the core, and
//! ring attention calls the core on blocks of keys and merges them with the log-sum-exp.

use crate::model::linear::{linear, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::rope::RopeTables;
use crate::model::attention::{attention, merge_heads, split_heads, AttentionOptions};
use crate::model::cpu_norm::rms_norm;

/// Rotates interleaved channel pairs of `(B, H, L, D)` queries or keys; in f32 like the reference.
pub fn apply_rope(x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        candle_nn::rotary_emb::rope_i(x, &rope.cos, &rope.sin)
    } else {
        candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?, &rope.cos, &rope.sin)?
            .to_dtype(x.dtype())
    }
}

/// One `WanAttention` module (`attn1` or `attn2` of a block): q/k/v/out projections with biases
/// and RMS norms on q and k taken across all heads (`qk_norm = "rms_norm_across_heads"`).
#[derive(Debug, Clone)]
pub struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// RMS-norm scales `(dim,)`, kept as tensors so a tensor-parallel rank can take its slice.
    norm_q: Tensor,
    norm_k: Tensor,
    eps: f64,
    heads: usize,
    options: AttentionOptions,
    /// Image-to-video's cross-attention: the image tokens' own key and value projections.
    image: Option<ImageKv>,
}

/// `add_k_proj`, `add_v_proj` and `norm_added_k` of an image-to-video cross-attention.
#[derive(Debug, Clone)]
struct ImageKv {
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_k: Tensor,
}

/// The text encoder's context length, which diffusers hard-codes to split the image tokens off
/// the cross-attention's context: the image tokens are those before the last 512 (with Python's
/// slicing when the context is shorter: see [`image_tokens`]).
const TEXT_CONTEXT: usize = 512;

/// How many of a context of `len` tokens diffusers' `WanAttnProcessor` takes as image tokens
/// (`context[:, :len - 512]`, the rest the text's). A real pipeline pads the prompt to 512
/// tokens, so this is the image encoder's 257; with a shorter context Python's negative slice
/// bounds apply (the fixtures' 16 text tokens: no image tokens, the projected image is attended
/// through `to_k` / `to_v` with the text), and this follows them, so that a checkpoint gives
/// diffusers' results.
pub(crate) fn image_tokens(len: usize) -> usize {
    if len >= TEXT_CONTEXT {
        len - TEXT_CONTEXT
    } else {
        (2 * len).saturating_sub(TEXT_CONTEXT)
    }
}

impl WanAttention {
    /// `dim` is the model width (= heads · head_dim); keys and values come from inputs of the same
    /// width (the text embedder projects the text to `dim` first).
    pub fn new(dim: usize, heads: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: vb.get(dim, "norm_q.weight")?,
            norm_k: vb.get(dim, "norm_k.weight")?,
            eps,
            heads,
            options: AttentionOptions::for_device(vb.device()),
            image: None,
        })
    }

    /// The cross-attention of an image-to-video block: [`Self::new`] and the image tokens' key
    /// and value projections from `image_dim` wide inputs (`added_kv_proj_dim`).
    pub fn with_image(
        dim: usize,
        heads: usize,
        eps: f64,
        image_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let image = ImageKv {
            add_k_proj: linear(image_dim, dim, vb.pp("add_k_proj"))?,
            add_v_proj: linear(image_dim, dim, vb.pp("add_v_proj"))?,
            norm_added_k: vb.get(dim, "norm_added_k.weight")?,
        };
        Ok(Self {
            image: Some(image),
            ..Self::new(dim, heads, eps, vb)?
        })
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn set_options(&mut self, options: AttentionOptions) {
        self.options = options;
    }

    /// Projects `x` `(B, L, dim)` to queries, `(B, L, dim)`, not yet normalised.
    pub fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        self.to_q.forward(x)
    }

    /// Projects the key/value source `(B, L, dim)` to keys and values, not yet normalised.
    pub fn project_kv(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.to_k.forward(source)?, self.to_v.forward(source)?))
    }

    /// RMS-normalises queries and keys over the whole `dim` row (all heads together).
    pub fn norm_qk(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let eps = self.eps as f32;
        Ok((
            rms_norm(q, &self.norm_q, eps)?,
            rms_norm(k, &self.norm_k, eps)?,
        ))
    }

    /// The projections `to_q`, `to_k`, `to_v`, `to_out.0`, for sharding.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
    }

    /// The RMS-norm scales of q and k and their epsilon.
    pub fn norm_weights(&self) -> (&Tensor, &Tensor, f64) {
        (&self.norm_q, &self.norm_k, self.eps)
    }

    /// The output projection of merged heads `(B, L, dim)`.
    pub fn project_out(&self, x: &Tensor) -> Result<Tensor> {
        self.to_out.forward(x)
    }

    /// Self-attention of `x` `(B, L, dim)` with rotary position embedding.
    pub fn self_attention(&self, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
        let q = self.project_q(x)?;
        let (k, v) = self.project_kv(x)?;
        let (q, k) = self.norm_qk(&q, &k)?;
        let q = apply_rope(&split_heads(&q, self.heads)?, rope)?;
        let k = apply_rope(&split_heads(&k, self.heads)?, rope)?;
        let v = split_heads(&v, self.heads)?;
        let out = attention(&q, &k, &v, &self.options)?;
        self.project_out(&merge_heads(&out)?)
    }

    /// Cross-attention of `x` `(B, L, dim)` to the embedded text `(B, Lt, dim)`; no rotation.
    /// For image-to-video the context's first tokens are the image's ([`image_tokens`]): the
    /// queries attend to them through their own key and value projections too, and the two
    /// results are summed before the output projection.
    pub fn cross_attention(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let len = context.dim(1)?;
        let image_len = match self.image {
            Some(_) => image_tokens(len),
            None => 0,
        };
        let text = context.narrow(1, image_len, len - image_len)?;
        let q = self.project_q(x)?;
        let (k, v) = self.project_kv(&text)?;
        let (q, k) = self.norm_qk(&q, &k)?;
        let q = split_heads(&q, self.heads)?;
        let k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        let mut out = attention(&q, &k, &v, &self.options)?;
        if let (Some(image), true) = (&self.image, image_len > 0) {
            let tokens = context.narrow(1, 0, image_len)?;
            let k = rms_norm(
                &image.add_k_proj.forward(&tokens)?,
                &image.norm_added_k,
                self.eps as f32,
            )?;
            let v = image.add_v_proj.forward(&tokens)?;
            let k = split_heads(&k, self.heads)?;
            let v = split_heads(&v, self.heads)?;
            out = (out + attention(&q, &k, &v, &self.options)?)?;
        }
        self.project_out(&merge_heads(&out)?)
    }
}
