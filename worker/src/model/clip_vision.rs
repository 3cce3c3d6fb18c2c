//! The CLIP vision tower (transformers' `CLIPVisionModel`), as Wan2.1 image-to-video uses it: the
//! image's patch tokens and class token through the encoder, the penultimate layer's hidden
//! states as the image embedding (`hidden_states[-2]`; the last layer and the pooled output are
//! not used).
//!
//! Written here rather than taken from candle-transformers: its CLIP knows only the quick GELU
//! and a fixed norm epsilon, where Wan's image encoders (open-clip's ViT-H/14 converted, and the
//! fixtures) use the exact GELU and state their epsilon in `config.json`. The tensor names are
//! transformers' (`embeddings.*`, `pre_layrnorm`, `encoder.layers.{i}.*`), with or without the
//! `vision_model.` prefix that older transformers versions write.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use serde::Deserialize;

use super::attention::{attention, merge_heads, split_heads, AttentionOptions};
use super::linear::{linear, Linear};

/// `image_encoder/config.json` (a `CLIPVisionConfig`); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_channels() -> usize {
    3
}

fn default_eps() -> f64 {
    1e-5
}

fn default_act() -> String {
    "quick_gelu".into()
}

/// The feed-forward's activation, from `hidden_act`.
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `"gelu"`: the exact (erf) GELU.
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
    /// `"quick_gelu"`: `x · sigmoid(1.702 x)`, OpenAI's CLIP.
    QuickGelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            other => candle_core::bail!(
                "image_encoder/config.json: hidden_act {other:?} is not supported (gelu, \
                 gelu_new, gelu_pytorch_tanh, quick_gelu are)"
            ),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// One pre-norm encoder layer: self-attention and a two-layer MLP, each with a residual.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(config: &Config, activation: Activation, vb: VarBuilder) -> Result<Self> {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(dim, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(dim, dim, attn.pp("q_proj"))?,
            k_proj: linear(dim, dim, attn.pp("k_proj"))?,
            v_proj: linear(dim, dim, attn.pp("v_proj"))?,
            out_proj: linear(dim, dim, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(dim, eps, vb.pp("layer_norm2"))?,
            fc1: linear(dim, config.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(config.intermediate_size, dim, vb.pp("mlp.fc2"))?,
            heads: config.num_attention_heads,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = split_heads(&self.q_proj.forward(&h)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(&h)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&h)?, self.heads)?;
        let attended = attention(&q, &k, &v, &AttentionOptions::for_device(x.device()))?;
        let x = (x + self.out_proj.forward(&merge_heads(&attended)?)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&self.activation.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// The vision tower up to its penultimate layer.
#[derive(Debug, Clone)]
pub struct ClipVisionEncoder {
    config: Config,
    patch_embedding: candle_nn::Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    /// The first `num_hidden_layers - 1` layers: the last one's output is never used.
    layers: Vec<EncoderLayer>,
}

impl ClipVisionEncoder {
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        if config.patch_size == 0 || !config.image_size.is_multiple_of(config.patch_size) {
            candle_core::bail!(
                "image_encoder/config.json: image_size {} is not a whole number of patches of {}",
                config.image_size,
                config.patch_size
            );
        }
        let activation = Activation::parse(&config.hidden_act)?;
        let dim = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        // in f32 whatever the model dtype: candle's CPU convolution takes no half precision
        let patch_embedding = candle_nn::conv2d_no_bias(
            config.num_channels,
            dim,
            config.patch_size,
            candle_nn::Conv2dConfig {
                stride: config.patch_size,
                ..Default::default()
            },
            embeddings.pp("patch_embedding").to_dtype(DType::F32),
        )?;
        let positions = (config.image_size / config.patch_size).pow(2) + 1;
        let layers = (0..config.num_hidden_layers.saturating_sub(1))
            .map(|i| EncoderLayer::new(config, activation, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            config: config.clone(),
            patch_embedding,
            class_embedding: embeddings.get(dim, "class_embedding")?,
            position_embedding: embeddings.get((positions, dim), "position_embedding.weight")?,
            pre_layrnorm: candle_nn::layer_norm(dim, config.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `pixel_values` `(B, C, S, S)`, preprocessed (`S` the configured image size) → the
    /// penultimate layer's hidden states `(B, 1 + (S / patch)², hidden_size)`, the class token
    /// first.
    pub fn penultimate_hidden_states(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixel_values.dims4()?;
        let size = self.config.image_size;
        if (channels, height, width) != (self.config.num_channels, size, size) {
            candle_core::bail!(
                "the image encoder takes {} × {size} × {size} pixel values, got {:?}",
                self.config.num_channels,
                pixel_values.dims()
            );
        }
        let dtype = self.class_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, self.config.hidden_size))?
            .repeat((batch, 1, 1))?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?
            .apply(&self.pre_layrnorm)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.to_dtype(DType::F32)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::{Checkpoint, SafetensorsWeights};

    /// Every fixture with an image encoder case: the penultimate hidden states against
    /// transformers'.
    #[test]
    fn image_embeddings_match_reference() {
        let dev = Device::Cpu;
        let dirs: Vec<_> = crate::model::reference::all_fixture_dirs()
            .into_iter()
            .filter(|dir| dir.join("cases/image_encoder.safetensors").is_file())
            .collect();
        assert!(!dirs.is_empty(), "no fixture has an image_encoder case");
        for dir in dirs {
            let component = Checkpoint::open(dir.join("pipeline"))
                .unwrap()
                .component("image_encoder")
                .unwrap();
            let config: Config = component.config().unwrap();
            let vb = component.var_builder(DType::F32, &dev).unwrap();
            let encoder = ClipVisionEncoder::new(&config, vb).unwrap();
            let case =
                SafetensorsWeights::open_file(dir.join("cases/image_encoder.safetensors")).unwrap();
            let ours = encoder
                .penultimate_hidden_states(&case.load("pixel_values", &dev).unwrap())
                .unwrap();
            let want = case.load("image_embeds", &dev).unwrap();
            assert_eq!(ours.dims(), want.dims());
            let err = relative_l2(&ours, &want).unwrap();
            println!("{}: image_encoder relative L2 {err:.3e}", dir.display());
            assert!(err <= 1e-4, "{}: relative L2 {err:.3e}", dir.display());
        }
    }
}
