//! Scaled dot-product attention over `(batch, heads, tokens, head_dim)` tensors, for any model:
//! the core with queries in chunks under a memory bound, attention to one block of keys with
//! its log-sum-exp and the exact merge of such blocks (what ring attention needs), and the
//! head split/merge around it. Model-specific steps (projections, q/k norms, rotary embedding)
//! live with each family; the sequence-parallel forms (Ulysses, ring) in the parallel runtime.

use candle_core::{DType, Device, Result, Tensor, D};

use super::cpu_attention;

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
    /// The bound for `device`: the default on the CPU (whose fused kernel holds no scores at all);
    /// on a GPU, scores in a sixteenth of its memory. A score costs up to 10 bytes while a chunk
    /// is attended (f32 scores, their f32 softmax, the probabilities in the values' dtype). The
    /// default's 2²⁶ would cut a 14B model's 720p self-attention (2 × 40 rows of 75,600 keys)
    /// into chunks of 11 queries; an H200 (141 GB) takes chunks of 145.
    pub fn for_device(device: &Device) -> Self {
        const BYTES_PER_SCORE: usize = 10;
        let default = Self::default();
        match super::device::memory_info(device) {
            Some((_, total)) => Self {
                max_scores: (total / 16 / BYTES_PER_SCORE).max(default.max_scores),
            },
            None => default,
        }
    }

    /// The number of queries per chunk for `batch · heads` rows attending to `keys` keys.
    pub fn query_chunk(&self, rows: usize, keys: usize) -> usize {
        (self.max_scores / (rows * keys).max(1)).max(1)
    }
}

/// Scaled dot-product attention, `softmax(q kᵀ / √d) v`, without a mask. `q` is
/// `(B, H, Lq, D)`, `k` and `v` are `(B, H, Lk, D)`; the result is `(B, H, Lq, D)` in `q`'s dtype.
/// Scores and softmax are computed in f32. On the CPU the fused kernel of
/// [`cpu_attention`](super::cpu_attention) holds no score matrix; elsewhere queries go in chunks
/// so that at most `options.max_scores` scores exist at a time.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<Tensor> {
    if cpu_attention::serves(q.device()) {
        return Ok(cpu_attention::attention_with_lse(q, k, v)?.0);
    }
    attention_chunked(q, k, v, options)
}

/// [`attention`] with the score matrix computed a chunk of queries at a time (the path of
/// devices without a fused kernel).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<Tensor> {
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
    if cpu_attention::serves(q.device()) {
        return cpu_attention::attention_with_lse(q, k, v);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;

    fn qkv(b: usize, h: usize, lq: usize, lk: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        Ok((
            Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?,
            Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?,
            Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?,
        ))
    }

    #[test]
    fn the_cpu_keeps_the_default_bound() {
        assert_eq!(
            AttentionOptions::for_device(&Device::Cpu).max_scores,
            AttentionOptions::default().max_scores
        );
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
        let chunked = attention_chunked(&q, &k, &v, &options)?;
        let err = relative_l2(&chunked, &whole)?;
        assert!(err < 1e-6, "chunked vs unchunked: {err}");
        // One query at a time.
        let single = attention_chunked(&q, &k, &v, &AttentionOptions { max_scores: 1 })?;
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
