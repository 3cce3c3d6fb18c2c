//! Tensor (Megatron) parallelism of the Wan transformer blocks.
//!
//! Each of the `tp` ranks holds a contiguous range of the attention heads and of the FFN's hidden
//! features: `to_q`/`to_k`/`to_v` and `ffn.net.0.proj` are column-parallel (their weight rows,
//! i.e. output features, are sharded), `to_out.0` and `ffn.net.2` row-parallel (their weight
//! columns, i.e. input features, are sharded) so each sublayer ends with one all-reduce of the
//! partial products, after which the bias is added once. The q/k RMS norm of Wan spans all heads;
//! it stays exact by all-reducing the per-token partial sums of squares (q's and k's in one
//! message). [`tensor_parallel_plan`] names the slices in the checkpoint's own tensor names so
//! that each rank reads only its part of the weights.

use std::ops::Range;

use crate::model::linear::{linear, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::families::wan::transformer::Config;
use crate::model::cpu_math::gelu;
use crate::model::cpu_norm::rms_norm;
use crate::model::loader::{Shard, ShardPlan};
use crate::parallel::group::Group;
use crate::parallel::layout::shard_range;

/// The attention heads tensor-parallel rank `tp_rank` of `tp` holds.
pub fn head_range(config: &Config, tp: usize, tp_rank: usize) -> Range<usize> {
    shard_range(config.num_attention_heads, tp, tp_rank)
}

/// The model-width features (`heads · head_dim`) of those heads.
pub fn feature_range(config: &Config, tp: usize, tp_rank: usize) -> Range<usize> {
    let heads = head_range(config, tp, tp_rank);
    let d = config.attention_head_dim;
    heads.start * d..heads.end * d
}

/// The FFN hidden features tensor-parallel rank `tp_rank` of `tp` holds.
pub fn ffn_range(config: &Config, tp: usize, tp_rank: usize) -> Range<usize> {
    shard_range(config.ffn_dim, tp, tp_rank)
}

/// `blocks.{i}.rest` → `rest`.
fn block_suffix(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("blocks.")?;
    let (index, suffix) = rest.split_once('.')?;
    index.bytes().all(|b| b.is_ascii_digit()).then_some(suffix)
}

/// The slices of a Wan transformer checkpoint that tensor-parallel rank `tp_rank` of `tp` loads;
/// everything else (embeddings, modulation tables, `norm2`, `proj_out`, the output biases of
/// row-parallel layers) is loaded whole.
pub fn tensor_parallel_plan(config: &Config, tp: usize, tp_rank: usize) -> ShardPlan {
    let features = feature_range(config, tp, tp_rank);
    let width = config.num_attention_heads * config.attention_head_dim;
    let hidden = ffn_range(config, tp, tp_rank);
    let ffn_dim = config.ffn_dim;
    ShardPlan::new().rule(move |name| {
        let suffix = block_suffix(name)?;
        if let Some(ffn) = suffix.strip_prefix("ffn.") {
            return match ffn {
                "net.0.proj.weight" | "net.0.proj.bias" => {
                    Some(Shard::rows(hidden.clone(), ffn_dim))
                }
                "net.2.weight" => Some(Shard::cols(hidden.clone(), ffn_dim)),
                _ => None,
            };
        }
        let attn = suffix
            .strip_prefix("attn1.")
            .or_else(|| suffix.strip_prefix("attn2."))?;
        match attn {
            "to_q.weight"
            | "to_q.bias"
            | "to_k.weight"
            | "to_k.bias"
            | "to_v.weight"
            | "to_v.bias"
            | "norm_q.weight"
            | "norm_k.weight"
            | "add_k_proj.weight"
            | "add_k_proj.bias"
            | "add_v_proj.weight"
            | "add_v_proj.bias"
            | "norm_added_k.weight" => Some(Shard::rows(features.clone(), width)),
            "to_out.0.weight" => Some(Shard::cols(features.clone(), width)),
            _ => None,
        }
    })
}

/// A row-parallel linear layer: this rank's input features of the weight, the whole bias. The
/// partial products are summed over the tp group before the bias is added, once.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    partial: Linear,
    bias: Tensor,
}

impl RowParallelLinear {
    /// `local_in` input features of this rank, `out` output features, weight `(out, local_in)`.
    pub fn new(local_in: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            partial: Linear::new(vb.get((out, local_in), "weight")?, None),
            bias: vb.get(out, "bias")?,
        })
    }

    pub fn forward(&self, x: &Tensor, tp: &Group) -> Result<Tensor> {
        let partial = self.partial.forward(x)?;
        tp.all_reduce_sum(&partial)?.broadcast_add(&self.bias)
    }
}

/// [`sharded_rms_norm_pair`] for one tensor (an image-to-video cross-attention's image keys).
pub fn sharded_rms_norm(
    x: &Tensor,
    weight: &Tensor,
    full_dim: usize,
    eps: f64,
    tp: &Group,
) -> Result<Tensor> {
    if tp.size() == 1 {
        return rms_norm(x, weight, eps as f32);
    }
    let xf = x.to_dtype(DType::F32)?;
    let total = tp.all_reduce_sum(&xf.sqr()?.sum_keepdim(D::Minus1)?)?;
    let inv_rms = ((total / full_dim as f64)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv_rms)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .to_dtype(x.dtype())
}

/// RMS norm over the full model width of `x`, of which this rank holds the features that
/// `weight` (its slice of the norm scale) covers; `full_dim` is the whole width. Runs in f32.
/// With one rank it is [`rms_norm`], exactly the single-process computation.
pub fn sharded_rms_norm_pair(
    (q, k): (&Tensor, &Tensor),
    (q_weight, k_weight): (&Tensor, &Tensor),
    full_dim: usize,
    eps: f64,
    tp: &Group,
) -> Result<(Tensor, Tensor)> {
    if tp.size() == 1 {
        return Ok((
            rms_norm(q, q_weight, eps as f32)?,
            rms_norm(k, k_weight, eps as f32)?,
        ));
    }
    let (qf, kf) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
    let lq = qf.dim(1)?;
    // One all-reduce for both: q's and k's per-token sums of squares side by side.
    let partial = Tensor::cat(
        &[
            qf.sqr()?.sum_keepdim(D::Minus1)?,
            kf.sqr()?.sum_keepdim(D::Minus1)?,
        ],
        1,
    )?;
    let total = tp.all_reduce_sum(&partial)?;
    let inv_rms = ((total / full_dim as f64)? + eps)?.sqrt()?.recip()?;
    let norm = |x: &Tensor, inv: Tensor, w: &Tensor, dtype: DType| -> Result<Tensor> {
        x.broadcast_mul(&inv)?
            .broadcast_mul(&w.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    };
    let lk = kf.dim(1)?;
    Ok((
        norm(&qf, inv_rms.narrow(1, 0, lq)?, q_weight, q.dtype())?,
        norm(&kf, inv_rms.narrow(1, lq, lk)?, k_weight, k.dtype())?,
    ))
}

/// This rank's part of one `WanAttention` (`attn1` or `attn2`): its heads' q/k/v projections and
/// norm scales (column-parallel), and its input columns of `to_out.0` (row-parallel).
#[derive(Debug, Clone)]
pub struct TpAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: RowParallelLinear,
    norm_q: Tensor,
    norm_k: Tensor,
    eps: f64,
    dim: usize,
    local_heads: usize,
    /// An image-to-video cross-attention's image key and value projections (this rank's heads)
    /// and the image keys' norm scale.
    image: Option<(Linear, Linear, Tensor)>,
}

impl TpAttention {
    /// `vb` must serve the slices of [`tensor_parallel_plan`] for this tp rank.
    pub fn new(config: &Config, tp: usize, tp_rank: usize, vb: VarBuilder) -> Result<Self> {
        let dim = config.dim();
        let local = feature_range(config, tp, tp_rank).len();
        Ok(Self {
            to_q: linear(dim, local, vb.pp("to_q"))?,
            to_k: linear(dim, local, vb.pp("to_k"))?,
            to_v: linear(dim, local, vb.pp("to_v"))?,
            to_out: RowParallelLinear::new(local, dim, vb.pp("to_out.0"))?,
            norm_q: vb.get(local, "norm_q.weight")?,
            norm_k: vb.get(local, "norm_k.weight")?,
            eps: config.eps,
            dim,
            local_heads: head_range(config, tp, tp_rank).len(),
            image: None,
        })
    }

    /// The cross-attention (`attn2`): [`Self::new`] and, for an image-to-video transformer,
    /// this rank's heads of the image key and value projections.
    pub fn cross(config: &Config, tp: usize, tp_rank: usize, vb: VarBuilder) -> Result<Self> {
        let mut attention = Self::new(config, tp, tp_rank, vb.clone())?;
        if let Some(image_dim) = config.added_kv_proj_dim {
            let local = feature_range(config, tp, tp_rank).len();
            attention.image = Some((
                linear(image_dim, local, vb.pp("add_k_proj"))?,
                linear(image_dim, local, vb.pp("add_v_proj"))?,
                vb.get(local, "norm_added_k.weight")?,
            ));
        }
        Ok(attention)
    }

    /// Whether this is an image-to-video cross-attention.
    pub fn takes_image(&self) -> bool {
        self.image.is_some()
    }

    /// Keys (normalised across all heads, exact under tensor parallelism) and values of this
    /// rank's heads for the image tokens.
    pub fn project_image_kv(&self, tokens: &Tensor, tp: &Group) -> Result<(Tensor, Tensor)> {
        let Some((add_k, add_v, norm)) = &self.image else {
            candle_core::bail!("image keys asked of an attention without image projections");
        };
        let k = sharded_rms_norm(&add_k.forward(tokens)?, norm, self.dim, self.eps, tp)?;
        Ok((k, add_v.forward(tokens)?))
    }

    /// The heads this rank holds.
    pub fn local_heads(&self) -> usize {
        self.local_heads
    }

    /// Queries of this rank's heads, `(B, L, local_heads · head_dim)`, not yet normalised.
    pub fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        self.to_q.forward(x)
    }

    /// Keys and values of this rank's heads, not yet normalised.
    pub fn project_kv(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.to_k.forward(source)?, self.to_v.forward(source)?))
    }

    /// The across-heads RMS norm of q and k, exact under tensor parallelism.
    pub fn norm_qk(&self, q: &Tensor, k: &Tensor, tp: &Group) -> Result<(Tensor, Tensor)> {
        sharded_rms_norm_pair((q, k), (&self.norm_q, &self.norm_k), self.dim, self.eps, tp)
    }

    /// The output projection of this rank's merged heads, summed over the tp group.
    pub fn project_out(&self, x: &Tensor, tp: &Group) -> Result<Tensor> {
        self.to_out.forward(x, tp)
    }
}

/// This rank's part of the block's `ffn`: its hidden features of `net.0.proj` (column-parallel)
/// and of `net.2` (row-parallel).
#[derive(Debug, Clone)]
pub struct TpFeedForward {
    proj_in: Linear,
    proj_out: RowParallelLinear,
}

impl TpFeedForward {
    pub fn new(config: &Config, tp: usize, tp_rank: usize, vb: VarBuilder) -> Result<Self> {
        let dim = config.dim();
        let local = ffn_range(config, tp, tp_rank).len();
        Ok(Self {
            proj_in: linear(dim, local, vb.pp("net.0.proj"))?,
            proj_out: RowParallelLinear::new(local, dim, vb.pp("net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, tp: &Group) -> Result<Tensor> {
        self.proj_out.forward(&gelu(&self.proj_in.forward(x)?)?, tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_shards_exactly_the_block_projections() {
        let config = Config {
            num_attention_heads: 4,
            attention_head_dim: 8,
            ffn_dim: 48,
            ..Config::default()
        };
        let plan = tensor_parallel_plan(&config, 2, 1);
        let rows = |r: Range<usize>, len| Some(Shard::rows(r, len));
        let cols = |r: Range<usize>, len| Some(Shard::cols(r, len));
        assert_eq!(
            plan.shard_of("blocks.0.attn1.to_q.weight"),
            rows(16..32, 32)
        );
        assert_eq!(plan.shard_of("blocks.11.attn2.to_v.bias"), rows(16..32, 32));
        assert_eq!(
            plan.shard_of("blocks.3.attn1.norm_k.weight"),
            rows(16..32, 32)
        );
        assert_eq!(
            plan.shard_of("blocks.3.attn2.to_out.0.weight"),
            cols(16..32, 32)
        );
        assert_eq!(
            plan.shard_of("blocks.0.ffn.net.0.proj.bias"),
            rows(24..48, 48)
        );
        assert_eq!(plan.shard_of("blocks.0.ffn.net.2.weight"), cols(24..48, 48));
        for whole in [
            "blocks.0.attn1.to_out.0.bias",
            "blocks.0.ffn.net.2.bias",
            "blocks.0.norm2.weight",
            "blocks.0.scale_shift_table",
            "condition_embedder.time_proj.weight",
            "proj_out.weight",
            "blocks.x.attn1.to_q.weight",
        ] {
            assert_eq!(plan.shard_of(whole), None, "{whole}");
        }
    }
}
