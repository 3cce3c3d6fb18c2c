//! Ulysses sequence parallelism: around the attention core, an all-to-all turns "my tokens, all
//! heads" into "all tokens of the group, my heads" and a second one turns it back, so that
//! attention itself runs unchanged on whole sequences. Every member holds the same number of
//! tokens (the sequence is padded to a multiple of the degree; the caller keeps padded keys out
//! of attention) and the same number of heads (the degree divides the heads).

use candle_core::{Result, Tensor};

use super::group::Group;

/// `(B, H, l, D)` (this member's `l` tokens, all `H` heads) → `(B, H / n, n · l, D)` (the group's
/// tokens in member order, this member's chunk of heads: chunk `rank`).
pub fn tokens_to_heads(x: &Tensor, group: &Group) -> Result<Tensor> {
    let n = group.size();
    if n == 1 {
        return Ok(x.clone());
    }
    let heads = x.dim(1)?;
    if heads % n != 0 {
        candle_core::bail!("Ulysses degree {n} does not divide the {heads} heads of this rank");
    }
    let chunk = heads / n;
    // Contiguous parts: the wire copies them anyway, and the part kept by this rank then lets
    // `cat` produce a contiguous result the attention matmuls can take.
    let parts = (0..n)
        .map(|j| x.narrow(1, j * chunk, chunk)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&group.all_to_all(parts)?, 2)
}

/// The inverse of [`tokens_to_heads`]: `(B, H / n, n · l, D)` → `(B, H, l, D)`.
pub fn heads_to_tokens(x: &Tensor, group: &Group) -> Result<Tensor> {
    let n = group.size();
    if n == 1 {
        return Ok(x.clone());
    }
    let tokens = x.dim(2)?;
    if tokens % n != 0 {
        candle_core::bail!("Ulysses degree {n} does not divide the {tokens} gathered tokens");
    }
    let chunk = tokens / n;
    let parts = (0..n)
        .map(|j| x.narrow(2, j * chunk, chunk)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&group.all_to_all(parts)?, 1)
}
