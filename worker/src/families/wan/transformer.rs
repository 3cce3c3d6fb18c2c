//! `WanTransformer3DModel`: the Wan2.1 text-to-video diffusion transformer.
//!
//! Latent video `(B, C, F, H, W)` → patch tokens → `num_layers` blocks of (modulated self-attention
//! with 3D RoPE, cross-attention to the text, modulated GELU FFN) → modulated output norm →
//! projection → un-patchified velocity `(B, C_out, F, H, W)`. Norms and modulation run in f32 as
//! in the reference; the rest runs in the dtype of the `VarBuilder`.

use crate::model::linear::{linear, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::attention::WanAttention;
use super::embeddings::{ConditionEmbedder, Conditioning, PatchEmbedding};
use super::rope::{RopeTables, WanRope};
use crate::model::attention::AttentionOptions;
use crate::model::cpu_math::gelu;
use crate::model::cpu_norm::{gated_add, norm_scale_shift};

/// `transformer/config.json`. Unknown fields are ignored; defaults are diffusers' (the 14B model).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f64,
    /// Image-to-video: the image encoder's width, which `condition_embedder.image_embedder`
    /// projects to the model's.
    pub image_dim: Option<usize>,
    /// Image-to-video: the input width of each cross-attention's `add_k_proj` / `add_v_proj`.
    pub added_kv_proj_dim: Option<usize>,
    /// Wan2.1's first-last-frame model's image position embedding; not supported.
    pub pos_embed_seq_len: Option<usize>,
    pub rope_max_seq_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            pos_embed_seq_len: None,
            rope_max_seq_len: 1024,
        }
    }
}

impl Config {
    /// The model width, `heads · head_dim`.
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// What a parallel layout must divide in this transformer, for a render that does or does
    /// not use classifier-free guidance.
    pub fn layout_limits(&self, guidance: bool) -> longtake_proto::spec::LayoutLimits {
        longtake_proto::spec::LayoutLimits {
            heads: self.num_attention_heads,
            ffn_dim: self.ffn_dim,
            guidance,
        }
    }

    /// Whether this is an image-to-video transformer (image embedder, image cross-attention).
    pub fn takes_image(&self) -> bool {
        self.image_dim.is_some()
    }

    /// Rejects configurations this implementation does not run, with a message saying why.
    pub fn validate(&self) -> Result<()> {
        if self.image_dim.is_some() != self.added_kv_proj_dim.is_some() {
            candle_core::bail!(
                "this transformer config sets only one of image_dim ({:?}) and added_kv_proj_dim \
                 ({:?}); an image-to-video transformer has both, a text-to-video one neither",
                self.image_dim,
                self.added_kv_proj_dim
            );
        }
        if let Some(len) = self.pos_embed_seq_len {
            candle_core::bail!(
                "pos_embed_seq_len {len}: the first-last-frame image position embedding \
                 (Wan2.1-FLF2V) is not supported"
            );
        }
        match self.qk_norm.as_deref() {
            Some("rms_norm_across_heads") => {}
            other => candle_core::bail!(
                "qk_norm {other:?} is not supported; Wan2.1 checkpoints use \"rms_norm_across_heads\""
            ),
        }
        if self.patch_size.contains(&0) || self.num_attention_heads == 0 || self.num_layers == 0 {
            candle_core::bail!("invalid transformer config: zero patch size, heads or layers");
        }
        Ok(())
    }
}

/// `ffn`: `net.0.proj` → GELU (tanh) → `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, ffn_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, ffn_dim, vb.pp("net.0.proj"))?,
            proj_out: linear(ffn_dim, dim, vb.pp("net.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&gelu(&self.proj_in.forward(x)?)?)
    }

    /// `net.0.proj` (column-parallel under tensor parallelism) and `net.2` (row-parallel).
    pub fn projections(&self) -> (&Linear, &Linear) {
        (&self.proj_in, &self.proj_out)
    }
}

/// What a block has besides its attention and FFN: the norms, the `(1, 6, dim)` f32
/// modulation table (shift/scale/gate for attention, then for the FFN) and the gated residual
/// structure. Shared with the distributed transformer, whose attention and FFN are sharded but
/// whose residual arithmetic must stay the same op for op.
#[derive(Debug, Clone)]
pub(crate) struct BlockResiduals {
    /// `norm2`'s weight and bias (`cross_attn_norm`); `norm1` and `norm3` have none.
    norm2: Option<(Tensor, Tensor)>,
    eps: f64,
    scale_shift_table: Tensor,
}

impl BlockResiduals {
    /// Reads `norm2` and `scale_shift_table` of the block at `vb`.
    pub(crate) fn new(cfg: &Config, vb: &VarBuilder) -> Result<Self> {
        let dim = cfg.dim();
        let f32_vb = vb.to_dtype(DType::F32);
        let norm2 = if cfg.cross_attn_norm {
            let norm = f32_vb.pp("norm2");
            Some((norm.get(dim, "weight")?, norm.get(dim, "bias")?))
        } else {
            None
        };
        Ok(Self {
            norm2,
            eps: cfg.eps,
            scale_shift_table: f32_vb.get((1, 6, dim), "scale_shift_table")?,
        })
    }

    /// One block around its sublayers: `x` `(B, L, dim)`, `modulation` `(B, 6, dim)` f32; each
    /// sublayer maps its (normed) input in the dtype of `x` to an output of the same shape.
    /// The norms (`norm1`, `norm2`, `norm3`: layer norms in f32) and their modulation are one
    /// fused step each, as are the gated residuals ([`crate::model::cpu_norm`]).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        modulation: &Tensor,
        self_attention: impl FnOnce(&Tensor) -> Result<Tensor>,
        cross_attention: impl FnOnce(&Tensor) -> Result<Tensor>,
        ffn: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let eps = self.eps;
        let m = modulation.broadcast_add(&self.scale_shift_table)?;
        let part = |i: usize| m.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (part(0)?, (part(1)? + 1.0)?, part(2)?);
        let (c_shift, c_scale, c_gate) = (part(3)?, (part(4)? + 1.0)?, part(5)?);

        let xf = x.to_dtype(DType::F32)?;
        let h = norm_scale_shift(&xf, &scale_msa, &shift_msa, eps)?.to_dtype(dtype)?;
        let attn = self_attention(&h)?;
        let xf = gated_add(&xf, &attn.to_dtype(DType::F32)?, &gate_msa)?;
        let x = xf.to_dtype(dtype)?;

        let h = match &self.norm2 {
            Some((weight, bias)) => {
                norm_scale_shift(&x.to_dtype(DType::F32)?, weight, bias, eps)?.to_dtype(dtype)?
            }
            None => x.clone(),
        };
        let x = (&x + cross_attention(&h)?)?;

        let xf = x.to_dtype(DType::F32)?;
        let h = norm_scale_shift(&xf, &c_scale, &c_shift, eps)?.to_dtype(dtype)?;
        let ff = ffn(&h)?;
        gated_add(&xf, &ff.to_dtype(DType::F32)?, &c_gate)?.to_dtype(dtype)
    }
}

/// One `blocks.{i}`.
#[derive(Debug, Clone)]
pub struct WanTransformerBlock {
    residuals: BlockResiduals,
    attn1: WanAttention,
    attn2: WanAttention,
    ffn: FeedForward,
}

impl WanTransformerBlock {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.dim();
        let heads = cfg.num_attention_heads;
        Ok(Self {
            residuals: BlockResiduals::new(cfg, &vb)?,
            attn1: WanAttention::new(dim, heads, cfg.eps, vb.pp("attn1"))?,
            attn2: match cfg.added_kv_proj_dim {
                Some(image_dim) => {
                    WanAttention::with_image(dim, heads, cfg.eps, image_dim, vb.pp("attn2"))?
                }
                None => WanAttention::new(dim, heads, cfg.eps, vb.pp("attn2"))?,
            },
            ffn: FeedForward::new(dim, cfg.ffn_dim, vb.pp("ffn"))?,
        })
    }

    pub fn attn1(&self) -> &WanAttention {
        &self.attn1
    }

    pub fn attn2(&self) -> &WanAttention {
        &self.attn2
    }

    pub fn ffn(&self) -> &FeedForward {
        &self.ffn
    }

    fn set_attention_options(&mut self, options: AttentionOptions) {
        self.attn1.set_options(options);
        self.attn2.set_options(options);
    }

    /// `x` `(B, L, dim)`, `modulation` `(B, 6, dim)` f32, `context` `(B, Lt, dim)`.
    pub fn forward(
        &self,
        x: &Tensor,
        modulation: &Tensor,
        context: &Tensor,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        self.residuals.forward(
            x,
            modulation,
            |h| self.attn1.self_attention(h, rope),
            |h| self.attn2.cross_attention(h, context),
            |h| self.ffn.forward(h),
        )
    }
}

/// The transformer's ends, replicated whole under every parallel layout: the patch and
/// condition embeddings, the rotary tables and the output head (modulated norm, projection).
#[derive(Debug, Clone)]
pub(crate) struct TransformerEnds {
    patch_embedding: PatchEmbedding,
    condition_embedder: ConditionEmbedder,
    /// The output norm's epsilon (a layer norm without learned parameters).
    eps: f64,
    /// `(1, 2, dim)` f32: shift and scale of the output norm, added to the time embedding.
    scale_shift_table: Tensor,
    proj_out: Linear,
    rope: WanRope,
}

impl TransformerEnds {
    pub(crate) fn new(config: &Config, vb: &VarBuilder) -> Result<Self> {
        let dim = config.dim();
        let patch_len: usize = config.patch_size.iter().product();
        Ok(Self {
            patch_embedding: PatchEmbedding::new(
                config.in_channels,
                dim,
                config.patch_size,
                vb.pp("patch_embedding"),
            )?,
            condition_embedder: ConditionEmbedder::new(
                dim,
                config.freq_dim,
                config.text_dim,
                config.image_dim,
                vb.pp("condition_embedder"),
            )?,
            eps: config.eps,
            scale_shift_table: vb
                .to_dtype(DType::F32)
                .get((1, 2, dim), "scale_shift_table")?,
            proj_out: linear(dim, config.out_channels() * patch_len, vb.pp("proj_out"))?,
            rope: WanRope::new(config.attention_head_dim, config.rope_max_seq_len, 10000.0)?,
        })
    }

    /// The model dtype (that of the weights).
    pub(crate) fn dtype(&self) -> DType {
        self.proj_out.weight().dtype()
    }

    pub(crate) fn rope(&self) -> &WanRope {
        &self.rope
    }

    /// The patch tokens `(B, tokens, dim)` of `hidden_states` and the conditioning of
    /// `timestep` and `text` (and, for image-to-video, the image embedding), in the model dtype.
    pub(crate) fn embed(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        image: Option<&Tensor>,
    ) -> Result<(Tensor, Conditioning)> {
        let dtype = self.dtype();
        let x = self
            .patch_embedding
            .forward(&hidden_states.to_dtype(dtype)?)?;
        let image = image.map(|image| image.to_dtype(dtype)).transpose()?;
        let cond =
            self.condition_embedder
                .forward(timestep, &text.to_dtype(dtype)?, image.as_ref())?;
        Ok((x, cond))
    }

    /// The output head on tokens `x` `(B, L, dim)`: the norm modulated by the time embedding
    /// `temb`, then `proj_out`; returns `(B, L, pt·ph·pw·C_out)`.
    pub(crate) fn head(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let table = self.scale_shift_table.broadcast_add(&temb.unsqueeze(1)?)?;
        let (shift, scale) = (table.narrow(1, 0, 1)?, (table.narrow(1, 1, 1)? + 1.0)?);
        let x = norm_scale_shift(&x.to_dtype(DType::F32)?, &scale, &shift, self.eps)?
            .to_dtype(self.dtype())?;
        self.proj_out.forward(&x)
    }
}

/// Checks that the three forward inputs agree on the batch; returns `(B, F, H, W)` of
/// `hidden_states`.
pub(crate) fn check_batch(
    hidden_states: &Tensor,
    timestep: &Tensor,
    text: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (b, _, f, h, w) = hidden_states.dims5()?;
    if timestep.dims() != [b] || text.dim(0)? != b {
        candle_core::bail!(
            "batch mismatch: hidden_states {:?}, timestep {:?}, encoder_hidden_states {:?}",
            hidden_states.dims(),
            timestep.dims(),
            text.dims()
        );
    }
    Ok((b, f, h, w))
}

/// The Wan2.1 text-to-video transformer.
#[derive(Debug, Clone)]
pub struct WanTransformer3DModel {
    config: Config,
    ends: TransformerEnds,
    blocks: Vec<WanTransformerBlock>,
}

/// Intermediate results of one forward pass, for parity tests and debugging.
#[derive(Debug, Clone)]
pub struct ForwardTrace {
    /// `(B, C_out, F, H, W)`.
    pub output: Tensor,
    /// The hidden states `(B, tokens, dim)` after each block.
    pub blocks: Vec<Tensor>,
}

impl WanTransformer3DModel {
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let blocks = (0..config.num_layers)
            .map(|i| WanTransformerBlock::new(config, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            ends: TransformerEnds::new(config, &vb)?,
            blocks,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn blocks(&self) -> &[WanTransformerBlock] {
        &self.blocks
    }

    /// Sets how every attention core bounds its memory (see [`AttentionOptions`]).
    pub fn set_attention_options(&mut self, options: AttentionOptions) {
        for block in &mut self.blocks {
            block.set_attention_options(options);
        }
    }

    /// The token grid `(F', H', W')` of a latent of spatial-temporal size `(F, H, W)`.
    pub fn token_grid(&self, frames: usize, height: usize, width: usize) -> (usize, usize, usize) {
        let [pt, ph, pw] = self.config.patch_size;
        (frames / pt, height / ph, width / pw)
    }

    /// The rotary tables for a latent of size `(F, H, W)`, in the pair form the blocks use.
    pub fn rope_tables(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        device: &candle_core::Device,
    ) -> Result<RopeTables> {
        self.ends
            .rope()
            .tables(self.token_grid(frames, height, width), device)
    }

    /// The rotary tables as diffusers returns them, `(1, tokens, 1, head_dim)` cos and sin.
    pub fn rope_diffusers_tables(
        &self,
        frames: usize,
        height: usize,
        width: usize,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        self.ends
            .rope()
            .diffusers_tables(self.token_grid(frames, height, width), device)
    }

    /// Predicts the flow velocity. `hidden_states` `(B, C, F, H, W)`, `timestep` `(B,)` (any
    /// float dtype, values in `[0, 1000]`), `encoder_hidden_states` `(B, Lt, text_dim)`; returns
    /// `(B, C_out, F, H, W)` in the model dtype.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .run(hidden_states, timestep, encoder_hidden_states, None, false)?
            .output)
    }

    /// [`Self::forward`] of an image-to-video transformer: `encoder_hidden_states_image`
    /// `(B, Li, image_dim)` is the image encoder's embedding of the conditioning frame
    /// (`hidden_states` then carries the condition's 20 channels after the latents' 16).
    pub fn forward_with_image(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .run(
                hidden_states,
                timestep,
                encoder_hidden_states,
                Some(encoder_hidden_states_image),
                false,
            )?
            .output)
    }

    /// [`Self::forward`], also returning each block's output.
    pub fn forward_with_block_outputs(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<ForwardTrace> {
        self.run(hidden_states, timestep, encoder_hidden_states, None, true)
    }

    fn run(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        image: Option<&Tensor>,
        keep_blocks: bool,
    ) -> Result<ForwardTrace> {
        let (b, f, h, w) = check_batch(hidden_states, timestep, text)?;
        let grid = self.token_grid(f, h, w);
        let rope = self.ends.rope().tables(grid, hidden_states.device())?;

        let (mut x, cond) = self.ends.embed(hidden_states, timestep, text, image)?;
        let mut block_outputs = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            let _span = longtake_proto::telemetry::block_span(index).entered();
            x = block.forward(&x, &cond.modulation, &cond.context, &rope)?;
            if keep_blocks {
                block_outputs.push(x.clone());
            }
        }

        let x = self.ends.head(&x, &cond.temb)?;
        let output = self.unpatchify(&x, b, grid)?;
        Ok(ForwardTrace {
            output,
            blocks: block_outputs,
        })
    }

    /// `(B, F'·H'·W', pt·ph·pw·C)` → `(B, C, F'·pt, H'·ph, W'·pw)`.
    fn unpatchify(
        &self,
        x: &Tensor,
        b: usize,
        (nf, nh, nw): (usize, usize, usize),
    ) -> Result<Tensor> {
        unpatchify(
            x,
            b,
            (nf, nh, nw),
            self.config.patch_size,
            self.config.out_channels(),
        )
    }
}

/// `(B, F'·H'·W', pt·ph·pw·C)` → `(B, C, F'·pt, H'·ph, W'·pw)`.
pub(crate) fn unpatchify(
    x: &Tensor,
    b: usize,
    (nf, nh, nw): (usize, usize, usize),
    [pt, ph, pw]: [usize; 3],
    c: usize,
) -> Result<Tensor> {
    x.reshape(vec![b, nf, nh, nw, pt, ph, pw, c])?
        .permute([0, 7, 1, 4, 2, 5, 3, 6])?
        .contiguous()?
        .reshape((b, c, nf * pt, nh * ph, nw * pw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::{seeded_var_builder, Checkpoint, SafetensorsWeights};
    use candle_core::Device;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    const TOLERANCE: f64 = 1e-4;

    #[test]
    fn matches_reference_cases() -> TestResult {
        let dev = Device::Cpu;
        let mut failures = Vec::new();
        for case in crate::model::reference::test_fixture_dirs() {
            let component = Checkpoint::open(case.join("pipeline"))?.component("transformer")?;
            let config: Config = component.config()?;
            let model =
                WanTransformer3DModel::new(&config, component.var_builder(DType::F32, &dev)?)?;
            let refs = SafetensorsWeights::open_file(case.join("cases/transformer.safetensors"))?;
            let x = refs.load("hidden_states", &dev)?;
            let t = refs.load("timestep", &dev)?;
            let text = refs.load("encoder_hidden_states", &dev)?;
            let (_, _, f, h, w) = x.dims5()?;

            let mut checks = Vec::new();
            let (cos, sin) = model.rope_diffusers_tables(f, h, w, &dev)?;
            checks.push((
                "rope_cos".to_string(),
                relative_l2(&cos, &refs.load("rope_cos", &dev)?)?,
            ));
            checks.push((
                "rope_sin".to_string(),
                relative_l2(&sin, &refs.load("rope_sin", &dev)?)?,
            ));
            let trace = model.forward_with_block_outputs(&x, &t, &text)?;
            assert_eq!(trace.blocks.len(), config.num_layers);
            for (i, block) in trace.blocks.iter().enumerate() {
                let name = format!("block_{i}");
                checks.push((name.clone(), relative_l2(block, &refs.load(&name, &dev)?)?));
            }
            checks.push((
                "output".to_string(),
                relative_l2(&trace.output, &refs.load("output", &dev)?)?,
            ));
            for (name, err) in checks {
                println!("{}: {name} relative L2 {err:.3e}", case.display());
                if err.is_nan() || err > TOLERANCE {
                    failures.push(format!("{}: {name} {err:.3e}", case.display()));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "above tolerance {TOLERANCE}: {failures:?}"
        );
        Ok(())
    }

    /// The bf16 path (weights and activations in bf16, norms/softmax/RoPE in f32) runs and stays
    /// close to the f32 reference: the error is bf16 rounding, not a wrong computation.
    #[test]
    fn bf16_stays_close_to_the_reference() -> TestResult {
        let dev = Device::Cpu;
        for case in crate::model::reference::test_fixture_dirs() {
            let component = Checkpoint::open(case.join("pipeline"))?.component("transformer")?;
            let config: Config = component.config()?;
            let model =
                WanTransformer3DModel::new(&config, component.var_builder(DType::BF16, &dev)?)?;
            let refs = SafetensorsWeights::open_file(case.join("cases/transformer.safetensors"))?;
            let out = model.forward(
                &refs.load("hidden_states", &dev)?,
                &refs.load("timestep", &dev)?,
                &refs.load("encoder_hidden_states", &dev)?,
            )?;
            assert_eq!(out.dtype(), DType::BF16);
            let err = relative_l2(&out, &refs.load("output", &dev)?)?;
            println!("{}: bf16 output relative L2 {err:.3e}", case.display());
            assert!(err < 2e-2, "{}: bf16 output {err:.3e}", case.display());
        }
        Ok(())
    }

    fn small_config() -> Config {
        Config {
            num_attention_heads: 2,
            attention_head_dim: 12,
            text_dim: 8,
            freq_dim: 16,
            ffn_dim: 32,
            num_layers: 2,
            ..Config::default()
        }
    }

    #[test]
    fn batch_rows_are_independent_and_chunking_does_not_change_the_output() -> TestResult {
        let dev = Device::Cpu;
        let cfg = small_config();
        let mut model = WanTransformer3DModel::new(&cfg, seeded_var_builder(5, DType::F32, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (2, 16, 3, 4, 6), &dev)?;
        let t = Tensor::new(&[900f32, 20.0], &dev)?;
        let text = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let both = model.forward(&x, &t, &text)?;
        assert_eq!(both.dims(), &[2, 16, 3, 4, 6]);
        let second = model.forward(
            &x.narrow(0, 1, 1)?,
            &t.narrow(0, 1, 1)?,
            &text.narrow(0, 1, 1)?,
        )?;
        assert!(relative_l2(&second, &both.narrow(0, 1, 1)?)? < 1e-6);

        model.set_attention_options(AttentionOptions {
            max_scores: 2 * 2 * 18 * 4,
        });
        let chunked = model.forward(&x, &t, &text)?;
        assert!(relative_l2(&chunked, &both)? < 1e-6);
        Ok(())
    }

    /// Every fixture of an image-to-video transformer (`wan-i2v-tiny`): the output against
    /// diffusers' for the latents with the condition's channels and the image embedding.
    #[test]
    fn image_to_video_matches_reference_cases() -> TestResult {
        let dev = Device::Cpu;
        let mut checked = 0;
        for case in crate::model::reference::all_fixture_dirs() {
            let Ok(component) =
                Checkpoint::open(case.join("pipeline")).and_then(|c| c.component("transformer"))
            else {
                continue;
            };
            let config: Config = component.config()?;
            if !config.takes_image() {
                continue;
            }
            let model =
                WanTransformer3DModel::new(&config, component.var_builder(DType::F32, &dev)?)?;
            let refs = SafetensorsWeights::open_file(case.join("cases/transformer.safetensors"))?;
            let ours = model.forward_with_image(
                &refs.load("hidden_states", &dev)?,
                &refs.load("timestep", &dev)?,
                &refs.load("encoder_hidden_states", &dev)?,
                &refs.load("encoder_hidden_states_image", &dev)?,
            )?;
            let err = relative_l2(&ours, &refs.load("output", &dev)?)?;
            println!(
                "{}: image-to-video transformer relative L2 {err:.3e}",
                case.display()
            );
            assert!(err <= TOLERANCE, "{}: {err:e}", case.display());
            // without the image the model refuses, naming what is missing
            let missing = model
                .forward(
                    &refs.load("hidden_states", &dev)?,
                    &refs.load("timestep", &dev)?,
                    &refs.load("encoder_hidden_states", &dev)?,
                )
                .unwrap_err()
                .to_string();
            assert!(missing.contains("needs the image embedding"), "{missing}");
            checked += 1;
        }
        assert!(checked > 0, "no fixture has an image-to-video transformer");
        Ok(())
    }

    /// With a full 512-token text context (a real pipeline's), the image tokens before it go
    /// through the image projections: the output differs from the same tokens attended as text,
    /// and the split follows diffusers' rule at and below 512 tokens.
    #[test]
    fn image_tokens_are_split_off_as_diffusers_does() {
        use super::super::attention::WanAttention;
        let dev = Device::Cpu;
        assert_eq!(
            [600, 512, 300, 257, 33].map(super::super::attention::image_tokens),
            [88, 0, 88, 2, 0]
        );
        let vb = seeded_var_builder(4, DType::F32, &dev);
        let plain = WanAttention::new(8, 2, 1e-6, vb.pp("a")).unwrap();
        let imaged = WanAttention::with_image(8, 2, 1e-6, 8, vb.pp("a")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev).unwrap();
        let context = Tensor::randn(0f32, 1.0, (1, 515, 8), &dev).unwrap();
        let with_image = imaged.cross_attention(&x, &context).unwrap();
        let as_text = plain
            .cross_attention(&x, &context.narrow(1, 3, 512).unwrap())
            .unwrap();
        // the image branch adds to the text branch: equal only if it contributed nothing
        assert!(relative_l2(&with_image, &as_text).unwrap() > 1e-3);
        // a context of exactly 512 tokens has no image tokens: the text branch alone
        let text_only = imaged
            .cross_attention(&x, &context.narrow(1, 3, 512).unwrap())
            .unwrap();
        assert_eq!(relative_l2(&text_only, &as_text).unwrap(), 0.0);
    }

    #[test]
    fn half_image_conditioning_and_first_last_frame_are_rejected() {
        for (cfg, needle) in [
            (
                Config {
                    image_dim: Some(1280),
                    ..small_config()
                },
                "only one of image_dim",
            ),
            (
                Config {
                    image_dim: Some(1280),
                    added_kv_proj_dim: Some(5120),
                    pos_embed_seq_len: Some(514),
                    ..small_config()
                },
                "FLF2V",
            ),
        ] {
            let err =
                WanTransformer3DModel::new(&cfg, seeded_var_builder(0, DType::F32, &Device::Cpu))
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn config_defaults_and_unknown_fields() -> TestResult {
        let cfg: Config = serde_json::from_str(
            r#"{"num_layers": 3, "some_future_field": 1, "out_channels": null}"#,
        )?;
        assert_eq!(
            (cfg.num_layers, cfg.dim(), cfg.out_channels()),
            (3, 5120, 16)
        );
        cfg.validate()?;
        Ok(())
    }
}
