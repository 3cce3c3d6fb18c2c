//! Ring attention: each member of the ring group holds the queries, keys and values of one block
//! of tokens; the K/V blocks travel around the ring (send to the next member, receive from the
//! previous) while each member attends its queries to every block in turn. The per-block outputs
//! and log-sum-exps are kept by source member and merged in that fixed order, so the result does
//! not depend on arrival order and repeated runs are bit-identical.

use candle_core::{Result, Tensor};

use super::group::Group;
use crate::model::attention::{
    attention, attention_block_with_lse, merge_blocks, AttentionOptions,
};

/// [`attention_block_with_lse`] with queries in chunks, so at most `options.max_scores` scores
/// exist at a time.
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    let (b, h, lq, _) = q.dims4()?;
    let chunk = options.query_chunk(b * h, k.dim(2)?);
    if chunk >= lq {
        return attention_block_with_lse(q, k, v);
    }
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < lq {
        let len = chunk.min(lq - start);
        let (out, lse) = attention_block_with_lse(&q.narrow(2, start, len)?, k, v)?;
        outs.push(out);
        lses.push(lse);
        start += len;
    }
    Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
}

/// Attention of this member's queries `(B, H, l, D)` to the keys and values of every member of
/// `ring`, each `(B, H, l, D)`. Only the first `valid_keys(j)` keys of member `j`'s block take
/// part (the rest is sequence padding; a block of padding alone is skipped). With one member this
/// is the plain attention core.
pub fn ring_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    valid_keys: impl Fn(usize) -> usize,
    ring: &Group,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let n = ring.size();
    if n == 1 {
        let valid = valid_keys(0);
        return attention(q, &k.narrow(2, 0, valid)?, &v.narrow(2, 0, valid)?, options);
    }
    let me = ring.rank();
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    // One message per step: keys and values stacked.
    let mut kv = Tensor::stack(&[k, v], 0)?;
    let mut blocks: Vec<Option<(Tensor, Tensor)>> = vec![None; n];
    for step in 0..n {
        let source = (me + n - step) % n;
        let last = step + 1 == n;
        // Sent before computing so the transfer overlaps with this step's attention.
        if !last {
            ring.send(&kv, next)?;
        }
        let valid = valid_keys(source);
        if valid > 0 {
            let k = kv.get(0)?.narrow(2, 0, valid)?;
            let v = kv.get(1)?.narrow(2, 0, valid)?;
            blocks[source] = Some(attention_with_lse(q, &k, &v, options)?);
        }
        if !last {
            kv = ring.recv(prev, q.device())?;
        }
    }
    let blocks: Vec<(Tensor, Tensor)> = blocks.into_iter().flatten().collect();
    merge_blocks(&blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::attention_unchunked;
    use crate::model::compare::relative_l2;
    use candle_core::{DType, Device};

    #[test]
    fn padded_keys_do_not_change_the_result() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        // Large padding keys would dominate the softmax if they took part.
        let pad = (Tensor::ones((1, 2, 3, 8), DType::F32, &dev)? * 50.0)?;
        let (kp, vp) = (Tensor::cat(&[&k, &pad], 2)?, Tensor::cat(&[&v, &pad], 2)?);
        let options = AttentionOptions::default();
        let masked = ring_attention(&q, &kp, &vp, |_| 7, &Group::solo(), &options)?;
        let exact = attention_unchunked(&q, &k, &v)?;
        assert!(relative_l2(&masked, &exact)? < 1e-6);
        let unmasked = ring_attention(&q, &kp, &vp, |_| 10, &Group::solo(), &options)?;
        assert!(relative_l2(&unmasked, &exact)? > 1e-2);
        Ok(())
    }

    #[test]
    fn chunked_lse_equals_whole_block() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 11, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev)?;
        let (whole, whole_lse) = attention_block_with_lse(&q, &k, &v)?;
        let options = AttentionOptions {
            max_scores: 2 * 7 * 3,
        };
        let (out, lse) = attention_with_lse(&q, &k, &v, &options)?;
        assert!(relative_l2(&out, &whole)? < 1e-6);
        assert!(relative_l2(&lse, &whole_lse)? < 1e-6);
        assert!(relative_l2(&out, &attention_unchunked(&q, &k, &v)?)? < 1e-6);
        Ok(())
    }
}
