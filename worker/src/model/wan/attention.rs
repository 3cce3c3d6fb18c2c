//! Attention of the Wan transformer: the projections of `attn1` (self) and `attn2` (cross), and
//! the attention core over `(batch, heads, tokens, head_dim)` tensors.
//!
//! The steps are kept separate (project → RMS-normalise q/k → split heads → rotate → core →
//! merge heads → output projection) because the parallel runtime splits them across devices:
//! tensor parallelism shards heads (the q/k norm is then the only step that needs the full row,
//! see [`WanAttention::norm_qk`]), Ulysses exchanges tokens for heads around [`attention`], and
//! ring attention calls the core on blocks of keys and merges them with the log-sum-exp.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use super::rope::RopeTables;

/// How the attention core bounds its memory.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    /// Upper bound on the number of attention scores (`batch · heads · query_chunk · keys`) held at
    /// once; queries are processed in chunks small enough to stay under it.
    pub max_scores: usize,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        // 2^26 f32 scores = 256 MiB, plus as much again for the softmax output.
        Self {
            max_scores: 1 << 26,
        }
    }
}

impl AttentionOptions {
    /// The number of queries per chunk for `batch · heads` rows attending to `keys` keys.
    pub fn query_chunk(&self, rows: usize, keys: usize) -> usize {
        (self.max_scores / (rows * keys).max(1)).max(1)
    }
}

/// Scaled dot-product attention, `softmax(q kᵀ / √d) v`, without a mask. `q` is
/// `(B, H, Lq, D)`, `k` and `v` are `(B, H, Lk, D)`; the result is `(B, H, Lq, D)` in `q`'s dtype.
/// Scores and softmax are computed in f32, queries in chunks so that at most
/// `options.max_scores` scores exist at a time.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let q = scale_queries(q, d)?;
    let kt = k.t()?;
    let chunk = options.query_chunk(b * h, lk);
    if chunk >= lq {
        return attend(&q, &kt, v);
    }
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let len = chunk.min(lq - start);
        outs.push(attend(&q.narrow(2, start, len)?, &kt, v)?);
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// The same computation as [`attention`] with the whole score matrix at once; a reference for
/// tests and the fastest choice for short sequences.
pub fn attention_unchunked(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let q = scale_queries(q, q.dim(D::Minus1)?)?;
    attend(&q, &k.t()?, v)
}

/// Attention of `q` to one block of keys, also returning the log-sum-exp of each query's scores
/// `(B, H, Lq)` in f32, so that blocks of keys attended separately (ring attention) can be
/// merged exactly with [`merge_blocks`].
pub fn attention_block_with_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let q = scale_queries(q, q.dim(D::Minus1)?)?;
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let probs = exp.broadcast_div(&sum)?.to_dtype(v.dtype())?;
    let out = probs.matmul(v)?;
    let lse = (sum.log()? + max)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}

/// Merges the outputs of attention to disjoint key blocks, given each block's log-sum-exp, into
/// the output of attention to all keys.
pub fn merge_blocks(blocks: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let Some((first, _)) = blocks.first() else {
        candle_core::bail!("merge_blocks needs at least one block");
    };
    let lses: Vec<Tensor> = blocks
        .iter()
        .map(|(_, lse)| lse.unsqueeze(D::Minus1))
        .collect::<Result<_>>()?;
    let total = Tensor::cat(&lses, D::Minus1)?;
    let max = total.max_keepdim(D::Minus1)?;
    let lse_all = (total
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let mut acc: Option<Tensor> = None;
    for (out, lse) in blocks {
        let weight = lse.unsqueeze(D::Minus1)?.broadcast_sub(&lse_all)?.exp()?;
        let part = out.to_dtype(DType::F32)?.broadcast_mul(&weight)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
    }
    match acc {
        Some(a) => a.to_dtype(first.dtype()),
        None => candle_core::bail!("merge_blocks needs at least one block"),
    }
}

/// Folds the `1/√d` softmax scale into the queries (fewer elements than the scores); in f32 so
/// that low-precision queries are rounded once, not twice.
fn scale_queries(q: &Tensor, head_dim: usize) -> Result<Tensor> {
    let scale = 1.0 / (head_dim as f64).sqrt();
    if q.dtype() == DType::F32 {
        q * scale
    } else {
        (q.to_dtype(DType::F32)? * scale)?.to_dtype(q.dtype())
    }
}

/// `softmax(q kt) v` for pre-scaled queries and transposed keys.
fn attend(q: &Tensor, kt: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scores = q.matmul(kt)?.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// `(B, L, H·D)` → `(B, H, L, D)`, contiguous (the layout the core and `rope_i` take).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    x.reshape((b, l, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `(B, H, L, D)` → `(B, L, H·D)`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
}

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
            options: AttentionOptions::default(),
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
            candle_nn::ops::rms_norm(q, &self.norm_q, eps)?,
            candle_nn::ops::rms_norm(k, &self.norm_k, eps)?,
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
    pub fn cross_attention(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.project_q(x)?;
        let (k, v) = self.project_kv(context)?;
        let (q, k) = self.norm_qk(&q, &k)?;
        let q = split_heads(&q, self.heads)?;
        let k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        let out = attention(&q, &k, &v, &self.options)?;
        self.project_out(&merge_heads(&out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use candle_core::Device;

    fn qkv(b: usize, h: usize, lq: usize, lk: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        Ok((
            Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?,
            Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?,
            Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?,
        ))
    }

    #[test]
    fn chunked_attention_equals_unchunked() -> Result<()> {
        let (q, k, v) = qkv(2, 3, 37, 29, 8)?;
        let whole = attention_unchunked(&q, &k, &v)?;
        // 2·3 rows × 29 keys per query: a budget of 5 queries' worth gives chunks of 5 and a
        // ragged last chunk of 2.
        let options = AttentionOptions {
            max_scores: 2 * 3 * 29 * 5,
        };
        assert_eq!(options.query_chunk(6, 29), 5);
        let chunked = attention(&q, &k, &v, &options)?;
        let err = relative_l2(&chunked, &whole)?;
        assert!(err < 1e-6, "chunked vs unchunked: {err}");
        // One query at a time.
        let single = attention(&q, &k, &v, &AttentionOptions { max_scores: 1 })?;
        assert!(relative_l2(&single, &whole)? < 1e-6);
        Ok(())
    }

    #[test]
    fn unchunked_matches_a_naive_softmax() -> Result<()> {
        let (q, k, v) = qkv(1, 2, 5, 7, 4)?;
        let scores = (q.matmul(&k.t()?)? / 2.0)?; // √4
        let e = scores.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let naive = p.matmul(&v)?;
        assert!(relative_l2(&attention_unchunked(&q, &k, &v)?, &naive)? < 1e-6);
        Ok(())
    }

    #[test]
    fn key_blocks_merge_to_full_attention() -> Result<()> {
        let (q, k, v) = qkv(2, 2, 9, 20, 8)?;
        let whole = attention_unchunked(&q, &k, &v)?;
        let blocks = [(0, 7), (7, 6), (13, 7)]
            .iter()
            .map(|&(s, n)| attention_block_with_lse(&q, &k.narrow(2, s, n)?, &v.narrow(2, s, n)?))
            .collect::<Result<Vec<_>>>()?;
        let merged = merge_blocks(&blocks)?;
        let err = relative_l2(&merged, &whole)?;
        assert!(err < 1e-6, "merged blocks vs full: {err}");
        Ok(())
    }
}
