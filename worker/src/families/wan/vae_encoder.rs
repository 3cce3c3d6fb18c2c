//! The Wan2.1 VAE encoder: `encoder.*` and `quant_conv` of an `AutoencoderKLWan`, frames to the
//! latent distribution (mean and log-variance) that image-to-video conditions on and that a
//! clip's extension starts from.
//!
//! Causal and chunked like the decoder ([`super::vae`]): the video's first frame alone, then four
//! frames at a time, each chunk through every layer with the causal convolutions' history and the
//! time downsamplers' last frame carried in a cache, as diffusers' `_encode` does; so memory is
//! one chunk's activations whatever the clip's length. The blocks are the decoder's
//! ([`super::vae_blocks`]), on channels-last frames `(T, H, W, C)`; the tensor names mirror
//! diffusers' exactly.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::vae::Config;
use super::vae_blocks::{
    AttentionBlock, Downsample, Pass, ResidualBlock, RmsNorm, Slot, SlotCounter,
};
use super::vae_conv::CausalConv3d;

/// Frames per chunk after the first (the product of Wan2.1's two time downsamplings).
const CHUNK_FRAMES: usize = 4;

/// diffusers' `DiagonalGaussianDistribution` bounds the log-variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// The encoder's latent distribution for a video, `(B, z_dim, F', H', W')` each, before the
/// latents' normalisation: the pipelines encode with the mean.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

/// One layer of `encoder.down_blocks` (a flat list in diffusers).
#[derive(Debug, Clone)]
enum DownLayer {
    Residual(ResidualBlock),
    Attention(AttentionBlock),
    Downsample(Downsample),
}

/// The Wan2.1 VAE encoder.
#[derive(Debug, Clone)]
pub struct WanVaeEncoder {
    config: Config,
    conv_in: CausalConv3d,
    down: Vec<DownLayer>,
    mid_resnets: [ResidualBlock; 2],
    mid_attention: AttentionBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
    quant_conv: CausalConv3d,
    /// How many cache slots one encode needs.
    slot_count: usize,
    /// The weights' dtype, which the video is cast to.
    dtype: DType,
}

impl WanVaeEncoder {
    /// Loads the encoder from the VAE component's weights (the decoder's are not read).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let mut slots = SlotCounter::default();
        let z2 = 2 * config.z_dim;
        let quant_conv = CausalConv3d::new(z2, z2, (1, 1, 1), vb.pp("quant_conv"), &mut slots)?;
        let vb = vb.pp("encoder");
        let dims: Vec<usize> = std::iter::once(1)
            .chain(config.dim_mult.iter().copied())
            .map(|m| config.base_dim * m)
            .collect();
        let in_channels = config.in_channels;
        let conv_in = CausalConv3d::new(
            in_channels,
            dims[0],
            (3, 3, 3),
            vb.pp("conv_in"),
            &mut slots,
        )?;
        let stages = config.dim_mult.len();
        let mut down = Vec::new();
        let mut scale = 1.0;
        for i in 0..stages {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            for _ in 0..config.num_res_blocks {
                let at = vb.pp(format!("down_blocks.{}", down.len()));
                down.push(DownLayer::Residual(ResidualBlock::new(
                    in_dim, out_dim, at, &mut slots,
                )?));
                if config.attn_scales.contains(&scale) {
                    let at = vb.pp(format!("down_blocks.{}", down.len()));
                    down.push(DownLayer::Attention(AttentionBlock::new(out_dim, at)?));
                }
                in_dim = out_dim;
            }
            if i + 1 < stages {
                let temporal = config.temperal_downsample.get(i).copied().unwrap_or(false);
                let at = vb.pp(format!("down_blocks.{}", down.len()));
                down.push(DownLayer::Downsample(Downsample::new(
                    out_dim, temporal, at, &mut slots,
                )?));
                scale /= 2.0;
            }
        }
        let last = dims[stages];
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResidualBlock::new(last, last, mid.pp("resnets.0"), &mut slots)?,
            ResidualBlock::new(last, last, mid.pp("resnets.1"), &mut slots)?,
        ];
        let mid_attention = AttentionBlock::new(last, mid.pp("attentions.0"))?;
        let norm_out = RmsNorm::new(last, false, vb.pp("norm_out"))?;
        let conv_out = CausalConv3d::new(last, z2, (3, 3, 3), vb.pp("conv_out"), &mut slots)?;
        Ok(Self {
            config: config.clone(),
            conv_in,
            down,
            mid_resnets,
            mid_attention,
            norm_out,
            conv_out,
            quant_conv,
            slot_count: slots.count(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Encodes a video `(B, C, F, H, W)` in [-1, 1], `F = 1 + 4k`, into its latent distribution
    /// `(B, z_dim, 1 + k, H/8, W/8)`, as diffusers' `AutoencoderKLWan.encode` does. Each video
    /// is encoded on its own.
    pub fn encode(&self, video: &Tensor) -> Result<LatentDistribution> {
        let (batch, channels, frames, _, _) = video.dims5()?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "the VAE encoder takes videos of {} channels, got shape {:?}",
                self.config.in_channels,
                video.dims()
            );
        }
        if frames == 0 || !(frames - 1).is_multiple_of(CHUNK_FRAMES) {
            candle_core::bail!(
                "the VAE encoder takes 1 + 4k frames (1, 5, 9, ...), got {frames}: trim the clip \
                 to such a count"
            );
        }
        let mut means = Vec::with_capacity(batch);
        let mut logvars = Vec::with_capacity(batch);
        for b in 0..batch {
            let moments = self.encode_one(&video.get(b)?)?;
            let z = self.config.z_dim;
            means.push(moments.narrow(0, 0, z)?);
            logvars.push(
                moments
                    .narrow(0, z, z)?
                    .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?,
            );
        }
        Ok(LatentDistribution {
            mean: Tensor::stack(&means, 0)?,
            logvar: Tensor::stack(&logvars, 0)?,
        })
    }

    /// One video `(C, F, H, W)` → its moments `(2 z_dim, F', H', W')`.
    fn encode_one(&self, video: &Tensor) -> Result<Tensor> {
        let frames = video.dim(1)?;
        let x = video
            .to_dtype(self.dtype)?
            .permute((1, 2, 3, 0))?
            .contiguous()?;
        let mut slots = vec![Slot::Empty; self.slot_count];
        let mut pass = Pass {
            slots: &mut slots,
            split: None,
        };
        let mut chunks = vec![self.encode_chunk(&x.narrow(0, 0, 1)?, &mut pass)?];
        for start in (1..frames).step_by(CHUNK_FRAMES) {
            chunks.push(self.encode_chunk(&x.narrow(0, start, CHUNK_FRAMES)?, &mut pass)?);
        }
        let moments = self
            .quant_conv
            .forward(&Tensor::cat(&chunks, 0)?, &mut pass)?;
        moments
            .to_dtype(DType::F32)?
            .permute((3, 0, 1, 2))?
            .contiguous()
    }

    /// The encoder on one chunk `(T, H, W, C)` → `(T', H/8, W/8, 2 z_dim)`.
    fn encode_chunk(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, pass)?;
        for layer in &self.down {
            x = match layer {
                DownLayer::Residual(block) => block.forward(&x, pass)?,
                DownLayer::Attention(block) => block.forward(&x, None)?,
                DownLayer::Downsample(block) => block.forward(&x, pass)?,
            };
        }
        x = self.mid_resnets[0].forward(&x, pass)?;
        x = self.mid_attention.forward(&x, None)?;
        x = self.mid_resnets[1].forward(&x, pass)?;
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x, pass)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::{Checkpoint, SafetensorsWeights};

    /// Every fixture with an encoder case and a Wan2.1 VAE (`wan-i2v-tiny`, `wan22-moe-tiny`):
    /// mean and log-variance against PyTorch's.
    #[test]
    fn encode_matches_reference() {
        let dev = Device::Cpu;
        let dirs: Vec<_> = crate::model::reference::all_fixture_dirs()
            .into_iter()
            .filter(|dir| dir.join("cases/vae_encode.safetensors").is_file())
            .collect();
        let mut checked = 0;
        for dir in dirs {
            let component = Checkpoint::open(dir.join("pipeline"))
                .unwrap()
                .component("vae")
                .unwrap();
            let config: Config = component.config().unwrap();
            if let Err(unsupported) = config.validate() {
                // Wan2.2's TI2V VAE (residual blocks, pixel patching): refused by name, as the
                // decoder refuses it
                println!("{}: not a Wan2.1 VAE ({unsupported})", dir.display());
                continue;
            }
            checked += 1;
            let vb = component.var_builder(DType::F32, &dev).unwrap();
            let encoder = WanVaeEncoder::new(&config, vb).unwrap();
            let case =
                SafetensorsWeights::open_file(dir.join("cases/vae_encode.safetensors")).unwrap();
            let video = case.load("video", &dev).unwrap();
            let ours = encoder.encode(&video).unwrap();
            for (name, got) in [("mean", &ours.mean), ("logvar", &ours.logvar)] {
                let want = case.load(name, &dev).unwrap();
                assert_eq!(got.dims(), want.dims(), "{}: {name}", dir.display());
                let err = relative_l2(got, &want).unwrap();
                println!("{}: vae_encode {name} relative L2 {err:.3e}", dir.display());
                assert!(
                    err <= 1e-4,
                    "{}: {name} relative L2 {err:.3e}",
                    dir.display()
                );
            }
        }
        assert!(
            checked > 0,
            "no fixture has a Wan2.1 VAE with a vae_encode case"
        );
    }

    /// A frame count the chunking cannot take is named, not truncated.
    #[test]
    fn frame_counts_outside_one_plus_four_k_are_refused() {
        let config = Config {
            base_dim: 8,
            num_res_blocks: 1,
            ..Config::default()
        };
        let vb = crate::model::loader::seeded_var_builder(3, DType::F32, &Device::Cpu);
        let encoder = WanVaeEncoder::new(&config, vb).unwrap();
        let video = Tensor::zeros((1, 3, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let err = encoder.encode(&video).unwrap_err().to_string();
        assert!(err.contains("1 + 4k") && err.contains("got 4"), "{err}");
    }
}
