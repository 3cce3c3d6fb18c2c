//! The umT5 encoder (transformers' `UMT5EncoderModel`), Wan's text encoder.
//!
//! Owns the encoder stack only: token embedding (`shared`), `num_layers` pre-norm blocks of
//! self-attention and a (gated) feed-forward, and the final RMS norm. umT5 differs from T5 in
//! that every block has its own relative-attention bias table
//! (`encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias`), not only block 0.
//! Like T5, attention scores are not scaled by `1/sqrt(d_kv)` (the scale is folded into the
//! trained weights). Norms, the position bias and the softmax run in f32 whatever the model
//! dtype, as in the reference. The decoder of a full checkpoint is never loaded.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, Linear, VarBuilder};
use serde::Deserialize;

fn default_vocab_size() -> usize {
    256_384
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    1024
}
fn default_num_layers() -> usize {
    8
}
fn default_num_heads() -> usize {
    6
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "gated-gelu".to_string()
}

/// `text_encoder/config.json` (transformers' `UMT5Config`); fields the encoder does not use are
/// ignored, missing ones take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"`, `"relu"`, `"gated-silu"`, ...: `gated-` selects the gated feed-forward
    /// (`wi_0`, `wi_1`), the rest names the activation.
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
}

impl Config {
    /// Whether the feed-forward is gated, and its activation, as transformers derives them from
    /// `feed_forward_proj` (`"gated-gelu"` means the tanh-approximated `gelu_new`).
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, name) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => candle_core::bail!("umT5 config: unsupported feed_forward_proj {proj:?}"),
        };
        let act = match (proj, name) {
            ("gated-gelu", _) | (_, "gelu_new") => Activation::NewGelu,
            (_, "gelu") => Activation::Gelu,
            (_, "relu") => Activation::Relu,
            (_, "silu" | "swish") => Activation::Silu,
            _ => candle_core::bail!(
                "umT5 config: unsupported activation in feed_forward_proj {proj:?}"
            ),
        };
        Ok((gated, act))
    }
}

/// T5's RMS norm (no mean subtraction, no bias), computed in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?.to_dtype(DType::F32)?;
        Ok(Self { weight, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        candle_nn::ops::rms_norm(&xs.to_dtype(DType::F32)?, &self.weight, self.eps as f32)?
            .to_dtype(dtype)
    }
}

/// Bidirectional T5 bucketing of `key − query` offsets: half the buckets for each direction,
/// exact for small offsets, logarithmic up to `max_distance`, the last bucket beyond.
fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let num_buckets = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 {
        num_buckets
    } else {
        0
    };
    let distance = relative_position.abs();
    let max_exact = num_buckets / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        // The reference works in f32 with a denominator from Python's f64 `math.log`, and
        // truncates toward zero; mirror that so bucket edges fall on the same offsets.
        let denominator = (max_distance as f64 / max_exact as f64).ln() as f32;
        let log_ratio = (distance as f32 / max_exact as f32).ln() / denominator
            * (num_buckets - max_exact) as f32;
        (max_exact + log_ratio as i64).min(num_buckets - 1)
    };
    bucket as u32
}

/// The (query, key) bucket table for a sequence of `len` tokens, flattened, on `device`.
fn bucket_table(len: usize, cfg: &Config, device: &Device) -> Result<Tensor> {
    let buckets: Vec<u32> = (0..len as i64)
        .flat_map(|q| {
            (0..len as i64).map(move |k| {
                relative_position_bucket(
                    k - q,
                    cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance,
                )
            })
        })
        .collect();
    Tensor::from_vec(buckets, len * len, device)
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// The layer's bias table transposed to (heads, buckets), in f32, so that looking the
    /// buckets up gives (heads, L·L) directly, already in score layout.
    bias_table: Tensor,
    num_heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: candle_nn::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            bias_table: vb
                .get(
                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                    "relative_attention_bias.weight",
                )?
                .to_dtype(DType::F32)?
                .t()?
                .contiguous()?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `buckets`: the flattened (L, L) bucket table; `mask_bias`: (B, 1, 1, L) f32, 0 for real
    /// keys and a large negative number for padding.
    fn forward(&self, xs: &Tensor, buckets: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let heads = |t: Tensor| {
            t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(xs)?)?;
        let k = heads(self.k.forward(xs)?)?;
        let v = heads(self.v.forward(xs)?)?;

        let position_bias =
            self.bias_table
                .index_select(buckets, 1)?
                .reshape((1, self.num_heads, l, l))?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = scores
            .broadcast_add(&position_bias)?
            .broadcast_add(mask_bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let context =
            weights
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, l, self.num_heads * self.d_kv))?;
        self.o.forward(&context)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    /// Only in the gated variant.
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl FeedForward {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let (wi_0, wi_1) = if gated {
            (
                candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(candle_nn::linear_no_bias(
                    cfg.d_model,
                    cfg.d_ff,
                    vb.pp("wi_1"),
                )?),
            )
        } else {
            (
                candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?,
                None,
            )
        };
        let wo = candle_nn::linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"))?;
        Ok(Self {
            wi_0,
            wi_1,
            wo,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hidden = self.act.forward(&self.wi_0.forward(xs)?)?;
        if let Some(wi_1) = &self.wi_1 {
            hidden = (hidden * wi_1.forward(xs)?)?;
        }
        self.wo.forward(&hidden)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attention_norm: RmsNorm,
    attention: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("layer.0");
        let ff = vb.pp("layer.1");
        Ok(Self {
            attention_norm: RmsNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                attn.pp("layer_norm"),
            )?,
            attention: SelfAttention::new(cfg, attn.pp("SelfAttention"))?,
            ff_norm: RmsNorm::new(cfg.d_model, cfg.layer_norm_epsilon, ff.pp("layer_norm"))?,
            ff: FeedForward::new(cfg, ff.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, xs: &Tensor, buckets: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let xs = (xs
            + self
                .attention
                .forward(&self.attention_norm.forward(xs)?, buckets, mask_bias)?)?;
        let xs = clamp_f16(xs)?;
        let xs = (&xs + self.ff.forward(&self.ff_norm.forward(&xs)?)?)?;
        clamp_f16(xs)
    }
}

/// In f16 the residual stream of the large umT5 overflows; like transformers, clamp it to the
/// finite range (leaving a margin once an infinity has appeared).
fn clamp_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    let max = f64::from(half::f16::MAX);
    let has_inf = xs
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_infinite();
    let limit = if has_inf { max - 1000.0 } else { max };
    xs.clamp(-limit, limit)
}

/// `UMT5EncoderModel`: token ids → `last_hidden_state`.
#[derive(Debug, Clone)]
pub struct UMT5EncoderModel {
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: RmsNorm,
    config: Config,
}

impl UMT5EncoderModel {
    /// `vb` is rooted at the component (tensor names `shared.weight`, `encoder.block.{i}...`,
    /// `encoder.final_layer_norm.weight`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        // Full checkpoints tie the encoder's embedding to `shared`; some exports keep only
        // `encoder.embed_tokens`.
        let embed_name = if vb.contains_tensor("shared.weight")
            || !vb.contains_tensor("encoder.embed_tokens.weight")
        {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp(embed_name))?;
        let encoder = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, encoder.pp(format!("block.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = RmsNorm::new(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            encoder.pp("final_layer_norm"),
        )?;
        Ok(Self {
            embed_tokens,
            blocks,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the weights live; inputs are expected there.
    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    /// The dtype the model runs in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    /// `input_ids`: (B, L) integer ids; `attention_mask`: (B, L), nonzero for real tokens.
    /// Returns `last_hidden_state`, (B, L, d_model) in the model's dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if attention_mask.dims() != [b, l] {
            candle_core::bail!(
                "umT5: attention_mask has shape {:?}, input_ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            );
        }
        let device = input_ids.device();
        // (1 − mask)·f32::MIN, as the reference's extended mask: padding keys get the most
        // negative finite value, so a row that masks everything still has a finite softmax.
        let min = f64::from(f32::MIN);
        let mask_bias = attention_mask
            .to_dtype(DType::F32)?
            .affine(-min, min)?
            .reshape((b, 1, 1, l))?;
        let buckets = bucket_table(l, &self.config, device)?;
        let mut xs = self.embed_tokens.forward(input_ids)?;
        for block in &self.blocks {
            xs = block.forward(&xs, &buckets, &mask_bias)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_t5() {
        // Values from transformers' `_relative_position_bucket` (bidirectional, 32 buckets, 128).
        let b = |d| relative_position_bucket(d, 32, 128);
        assert_eq!(
            [b(0), b(1), b(7), b(8), b(-1), b(-8)],
            [0, 17, 23, 24, 1, 8]
        );
        assert_eq!(
            [
                b(12),
                b(-12),
                b(20),
                b(-50),
                b(100),
                b(128),
                b(1000),
                b(-1000)
            ],
            [25, 9, 26, 13, 31, 31, 31, 15]
        );
    }

    #[test]
    fn config_defaults_and_activations() {
        let cfg: Config = serde_json::from_str(r#"{"d_model": 8, "unknown": 1}"#).unwrap();
        assert_eq!(cfg.d_model, 8);
        assert_eq!(cfg.num_heads, 6);
        assert!(matches!(
            cfg.feed_forward().unwrap(),
            (true, Activation::NewGelu)
        ));
        let relu: Config = serde_json::from_str(r#"{"feed_forward_proj": "relu"}"#).unwrap();
        assert!(matches!(
            relu.feed_forward().unwrap(),
            (false, Activation::Relu)
        ));
        let bad: Config = serde_json::from_str(r#"{"feed_forward_proj": "gated-nope"}"#).unwrap();
        assert!(bad.feed_forward().is_err());
    }
}
