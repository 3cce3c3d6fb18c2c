//! The decode side of Wan2.1's VAE (diffusers' `AutoencoderKLWan`): the config, latent
//! un-normalisation, `post_quant_conv` and the causal 3D decoder, run one latent frame at a time
//! with an explicit feature cache ([`DecoderCache`]) so that a video can be decoded in segments.
//!
//! Shapes: latents `(B, z_dim, F, H, W)` decode to `(B, 3, 1 + 4(F-1), 8H, 8W)` in [-1, 1] for
//! the standard Wan2.1 configuration (three ×2 spatial upsamplers, two of them also ×2 in time,
//! the first latent frame giving a single output frame).

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::vae_blocks::{
    AttentionBlock, Pass, ResidualBlock, RmsNorm, Slot, SlotCounter, Upsample,
};
use super::vae_conv::CausalConv3d;
use super::vae_split::RowSplit;

/// Wan2.1's latent statistics, diffusers' defaults for `latents_mean` / `latents_std`.
const WAN21_LATENTS_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const WAN21_LATENTS_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// `vae/config.json` of an `AutoencoderKLWan` checkpoint. Unknown fields are ignored; missing
/// ones take diffusers' defaults (which are Wan2.1's real sizes).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub base_dim: usize,
    /// The decoder's width when it differs from the encoder's (`null` in Wan2.1).
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Only the encoder uses attention scales; the decoder's sole attention is in its mid block.
    pub attn_scales: Vec<f64>,
    /// Per encoder stage; the decoder upsamples in time where the encoder downsampled, reversed.
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    /// Wan2.2's residual up blocks; not supported.
    pub is_residual: bool,
    /// The video's channels the encoder takes.
    pub in_channels: usize,
    pub out_channels: usize,
    /// Wan2.2's pixel patching; only `null` / 1 is supported.
    pub patch_size: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
        }
    }
}

/// A VAE configuration this decoder cannot run, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vae config: is_residual is true (the Wan2.2 VAE); only the Wan2.1 VAE is supported")]
    Residual,
    #[error("vae config: patch_size {0} (the Wan2.2 VAE); only the Wan2.1 VAE (patch_size null) is supported")]
    Patched(usize),
    #[error("vae config: {0}")]
    Invalid(String),
}

impl Config {
    /// Checks that this is a Wan2.1 VAE whose sizes are consistent.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.is_residual {
            return Err(ConfigError::Residual);
        }
        if let Some(p) = self.patch_size.filter(|&p| p > 1) {
            return Err(ConfigError::Patched(p));
        }
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.dim_mult.is_empty() || self.dim_mult.contains(&0) {
            return invalid(format!(
                "dim_mult {:?} must be non-empty and positive",
                self.dim_mult
            ));
        }
        if self.decoder_dim() == 0 || self.z_dim == 0 || self.out_channels == 0 {
            return invalid("base_dim, z_dim and out_channels must be positive".into());
        }
        if self.temperal_downsample.len() + 1 < self.dim_mult.len() {
            return invalid(format!(
                "temperal_downsample has {} entries, dim_mult {:?} needs {}",
                self.temperal_downsample.len(),
                self.dim_mult,
                self.dim_mult.len() - 1
            ));
        }
        for (name, stats) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if stats.len() != self.z_dim {
                return invalid(format!(
                    "{name} has {} entries, z_dim is {}",
                    stats.len(),
                    self.z_dim
                ));
            }
        }
        // Each upsampler's conv halves the width, which must leave whole channels.
        if self.dims().iter().skip(1).any(|d| d % 2 != 0) {
            return invalid(format!("the decoder widths {:?} must be even", self.dims()));
        }
        Ok(())
    }

    fn decoder_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// The decoder's stage widths: the mid block's, then each up block's output.
    fn dims(&self) -> Vec<usize> {
        let dim = self.decoder_dim();
        let last = self.dim_mult.last().copied().unwrap_or(1);
        std::iter::once(last)
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| dim * m)
            .collect()
    }

    /// Whether up block `i` upsamples in time: diffusers reverses the whole
    /// `temperal_downsample` list, whatever its length.
    fn temporal_upsample(&self, i: usize) -> bool {
        let list = &self.temperal_downsample;
        list.len().checked_sub(1 + i).is_some_and(|j| list[j])
    }

    /// The number of video frames `latent_frames` decode to.
    pub fn output_frames(&self, latent_frames: usize) -> usize {
        let stages = self.dim_mult.len().saturating_sub(1);
        let factor: usize = (0..stages)
            .map(|i| if self.temporal_upsample(i) { 2 } else { 1 })
            .product();
        if latent_frames == 0 {
            0
        } else {
            1 + factor * (latent_frames - 1)
        }
    }

    /// The per-channel mean and deviation, shaped to broadcast against `latents`.
    fn latent_stats(&self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let channels = latents.dim(1)?;
        if channels != self.z_dim
            || self.latents_mean.len() != channels
            || self.latents_std.len() != channels
        {
            candle_core::bail!(
                "latents have {channels} channels, the VAE config has z_dim {} with {} means and {} stds",
                self.z_dim,
                self.latents_mean.len(),
                self.latents_std.len()
            );
        }
        let mut shape = vec![1; latents.rank()];
        shape[1] = channels;
        let stat = |values: &[f64]| -> Result<Tensor> {
            Tensor::new(values, latents.device())?
                .to_dtype(latents.dtype())?
                .reshape(shape.as_slice())
        };
        Ok((stat(&self.latents_mean)?, stat(&self.latents_std)?))
    }

    /// `latents · std + mean` per channel of `(B, z_dim, F, H, W)`: what the pipeline hands the
    /// decoder (diffusers writes it as `latents / (1 / std) + mean`).
    pub fn unnormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (mean, std) = self.latent_stats(latents)?;
        latents.broadcast_mul(&std)?.broadcast_add(&mean)
    }

    /// `(latents − mean) · (1 / std)` per channel: the inverse, as diffusers' image-to-video
    /// pipeline normalises the encoded first frame (by the reciprocal, as it does).
    pub fn normalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (mean, std) = self.latent_stats(latents)?;
        latents.broadcast_sub(&mean)?.broadcast_mul(&std.recip()?)
    }
}

/// The causal state of the decoder after some latent frames: for each temporal convolution the
/// last input frames it saw (and the time upsamplers' first-chunk marks). Decoding frames
/// `[a, b)` with the cache left by frames `[0, a)` gives exactly the frames one whole decode
/// would. Cheap to clone (the tensors are shared), so a segment boundary can be kept.
#[derive(Debug, Clone, Default)]
pub struct DecoderCache {
    slots: Vec<Slot>,
    latent_frames: usize,
}

impl DecoderCache {
    /// The state before the first frame of a video.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many latent frames have gone through this cache.
    pub fn latent_frames(&self) -> usize {
        self.latent_frames
    }

    /// The same state on another device, e.g. to continue a video on another GPU.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let slots = self
            .slots
            .iter()
            .map(|slot| match slot {
                Slot::Frames(frames) => Ok(Slot::Frames(frames.to_device(device)?)),
                other => Ok(other.clone()),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            latent_frames: self.latent_frames,
        })
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Upsample>,
}

/// The Wan2.1 VAE decoder: `post_quant_conv` and `decoder.*` of an `AutoencoderKLWan`.
#[derive(Debug, Clone)]
pub struct WanVaeDecoder {
    config: Config,
    post_quant_conv: CausalConv3d,
    conv_in: CausalConv3d,
    mid_resnets: [ResidualBlock; 2],
    mid_attention: AttentionBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
    /// How many cache slots a [`DecoderCache`] needs.
    slot_count: usize,
    dtype: DType,
}

impl WanVaeDecoder {
    /// Loads the decoder from the VAE component's weights (the encoder's are not read).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let mut slots = SlotCounter::default();
        let z = config.z_dim;
        let post_quant_conv =
            CausalConv3d::new(z, z, (1, 1, 1), vb.pp("post_quant_conv"), &mut slots)?;

        let vb = vb.pp("decoder");
        let dims = config.dims();
        let conv_in = CausalConv3d::new(z, dims[0], (3, 3, 3), vb.pp("conv_in"), &mut slots)?;
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResidualBlock::new(dims[0], dims[0], mid.pp("resnets.0"), &mut slots)?,
            ResidualBlock::new(dims[0], dims[0], mid.pp("resnets.1"), &mut slots)?,
        ];
        let mid_attention = AttentionBlock::new(dims[0], mid.pp("attentions.0"))?;

        let stages = config.dim_mult.len();
        let mut up_blocks = Vec::with_capacity(stages);
        for i in 0..stages {
            let vb = vb.pp(format!("up_blocks.{i}"));
            // After the first stage the input comes out of an upsampler, which halved the width.
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_dim = dims[i + 1];
            let mut resnets = Vec::with_capacity(config.num_res_blocks + 1);
            for j in 0..=config.num_res_blocks {
                resnets.push(ResidualBlock::new(
                    in_dim,
                    out_dim,
                    vb.pp(format!("resnets.{j}")),
                    &mut slots,
                )?);
                in_dim = out_dim;
            }
            let upsampler = if i + 1 < stages {
                let temporal = config.temporal_upsample(i);
                Some(Upsample::new(
                    out_dim,
                    temporal,
                    vb.pp("upsamplers.0"),
                    &mut slots,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[stages];
        let norm_out = RmsNorm::new(last, false, vb.pp("norm_out"))?;
        let conv_out = CausalConv3d::new(
            last,
            config.out_channels,
            (3, 3, 3),
            vb.pp("conv_out"),
            &mut slots,
        )?;
        Ok(Self {
            config: config.clone(),
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out,
            conv_out,
            slot_count: slots.count(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// See [`Config::unnormalize_latents`].
    pub fn unnormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.config.unnormalize_latents(latents)
    }

    /// Decodes un-normalised latents `(B, z_dim, F, H, W)` into a video `(B, C, F', H', W')` in
    /// [-1, 1], as diffusers' `AutoencoderKLWan.decode` does. Each video is decoded on its own.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let batch = z.dim(0)?;
        let videos = (0..batch)
            .map(|b| self.decode_with_cache(&z.narrow(0, b, 1)?, &mut DecoderCache::new()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&videos, 0)
    }

    /// The video frames of latent frames `owned` of `z` `(1, z_dim, F, H, W)`, decoded on their
    /// own (one worker group's share of a clip): the decoder starts `warmup` latent frames
    /// before `owned.start` with a fresh cache, and the video of those frames is thrown away.
    /// From latent frame 0 this is exactly the whole decode; later, the causal context before
    /// the warm-up is missing, and the frames differ from the whole decode by an error that
    /// shrinks with `warmup` (at least 1 there: a fresh cache makes its first latent frame one
    /// video frame instead of four).
    pub fn decode_segment(&self, z: &Tensor, owned: Range<usize>, warmup: usize) -> Result<Tensor> {
        let frames = z.dim(2)?;
        if owned.is_empty() || owned.end > frames {
            candle_core::bail!("latent frames {owned:?} of a clip of {frames}");
        }
        if owned.start > 0 && warmup == 0 {
            candle_core::bail!(
                "a segment from latent frame {} needs a warm-up of at least one latent frame",
                owned.start
            );
        }
        let start = owned.start.saturating_sub(warmup);
        let video = self.decode_with_cache(
            &z.narrow(2, start, owned.end - start)?,
            &mut DecoderCache::new(),
        )?;
        let thrown = if owned.start == 0 {
            0
        } else {
            self.config.output_frames(owned.start - start)
        };
        let total = video.dim(2)?;
        video.narrow(2, thrown, total - thrown)
    }

    /// Decodes the latent frames `z` `(1, z_dim, F, H, W)` that follow those already passed
    /// through `cache`, and leaves in `cache` the state after them. With a fresh cache the
    /// first latent frame yields one video frame, every later one four (Wan2.1's sizes), so
    /// decoding `[0, a)` then `[a, b)` gives exactly the frames of decoding `[0, b)` at once.
    /// After an error the cache is in an unspecified state and must not be reused.
    pub fn decode_with_cache(&self, z: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let frames = self.decode_pass(z, cache, None)?;
        frames.permute((3, 0, 1, 2))?.unsqueeze(0)?.contiguous()
    }

    /// [`Self::decode_with_cache`] by all the ranks of `split` together, each decoding its rows
    /// of the frames: every rank passes the same latents `z` and its own cache (which holds its
    /// rows only), and the first rank gets the whole video (the others `None`). The frames
    /// equal the single-rank decode's up to the order of float sums.
    pub fn decode_rows_with_cache(
        &self,
        z: &Tensor,
        cache: &mut DecoderCache,
        split: &RowSplit<'_>,
    ) -> Result<Option<Tensor>> {
        let band = split.rows();
        let height = z.dim(3)?;
        if band.end > height {
            candle_core::bail!("latent rows {band:?} of latents {height} rows high");
        }
        let frames = self.decode_pass(&z.narrow(3, band.start, band.len())?, cache, Some(split))?;
        match split.gather_to_first(&frames)? {
            Some(frames) => Ok(Some(
                frames.permute((3, 0, 1, 2))?.unsqueeze(0)?.contiguous()?,
            )),
            None => Ok(None),
        }
    }

    /// The decode of `z` (this rank's latent rows under `split`), channels-last
    /// `(T', H', W', C)`.
    fn decode_pass(
        &self,
        z: &Tensor,
        cache: &mut DecoderCache,
        split: Option<&RowSplit<'_>>,
    ) -> Result<Tensor> {
        let (batch, channels, frames, _, _) = z.dims5()?;
        if batch != 1 || channels != self.config.z_dim || frames == 0 {
            candle_core::bail!(
                "decode_with_cache takes one video of {} latent channels and at least one frame, got shape {:?}",
                self.config.z_dim,
                z.dims()
            );
        }
        if cache.slots.is_empty() {
            cache.slots = vec![Slot::Empty; self.slot_count];
        } else if cache.slots.len() != self.slot_count {
            candle_core::bail!(
                "the decoder cache has {} slots, this decoder needs {}; it comes from another VAE",
                cache.slots.len(),
                self.slot_count
            );
        }
        let z = z.to_dtype(self.dtype)?;
        let mut pass = Pass {
            slots: &mut cache.slots,
            split,
        };
        // Channels-last (F, H, W, C) for the whole decoder; post_quant_conv is pointwise in time.
        let x = z.squeeze(0)?.permute((1, 2, 3, 0))?.contiguous()?;
        let x = self.post_quant_conv.forward(&x, &mut pass)?;
        // One latent frame at a time like diffusers: the time upsamplers treat a video's first
        // frame apart, and peak memory stays at one chunk's activations.
        let mut chunks = Vec::with_capacity(frames);
        for f in 0..frames {
            chunks.push(
                self.decode_chunk(&x.narrow(0, f, 1)?, &mut pass)?
                    .clamp(-1f64, 1f64)?,
            );
            cache.latent_frames += 1;
        }
        Tensor::cat(&chunks, 0)
    }

    /// The decoder on one chunk of frames `(T, H, W, z_dim)` → `(T', 8H, 8W, C)`, unclamped.
    fn decode_chunk(&self, x: &Tensor, pass: &mut Pass<'_, '_>) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, pass)?;
        x = self.mid_resnets[0].forward(&x, pass)?;
        x = self.mid_attention.forward(&x, pass.split)?;
        x = self.mid_resnets[1].forward(&x, pass)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, pass)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, pass)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x, pass)
    }
}

#[cfg(test)]
mod tests {

    use candle_core::{DType, Device, IndexOp, Tensor};

    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::{seeded_var_builder, Checkpoint, SafetensorsWeights};
    use crate::model::noise;

    fn random(shape: &[usize], stream: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(noise::gaussian(7, stream, 0, n), shape, &Device::Cpu).unwrap()
    }

    /// A reference fixture's VAE config, its decoder in `dtype`, and its decode case.
    fn fixture_vae(
        dir: &std::path::Path,
        dtype: DType,
    ) -> (Config, WanVaeDecoder, SafetensorsWeights) {
        let component = Checkpoint::open(dir.join("pipeline"))
            .unwrap()
            .component("vae")
            .unwrap();
        let config: Config = component.config().unwrap();
        let vb = component.var_builder(dtype, &Device::Cpu).unwrap();
        let vae = WanVaeDecoder::new(&config, vb).unwrap();
        let case = SafetensorsWeights::open_file(dir.join("cases/vae_decode.safetensors")).unwrap();
        (config, vae, case)
    }

    fn tiny_config(base_dim: usize) -> Config {
        Config {
            base_dim,
            num_res_blocks: 1,
            ..Config::default()
        }
    }

    #[test]
    fn decode_matches_reference() {
        let dirs = crate::model::reference::test_fixture_dirs();
        assert!(
            !dirs.is_empty(),
            "no reference fixtures found: set LONGTAKE_REFERENCE_DIR"
        );
        let dev = Device::Cpu;
        for dir in dirs {
            let (config, vae, case) = fixture_vae(&dir, DType::F32);
            let z = case.load("z", &dev).unwrap();
            let reference = case.load("video", &dev).unwrap();
            let ours = vae.decode(&z).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{}", dir.display());
            assert_eq!(
                ours.dim(2).unwrap(),
                config.output_frames(z.dim(2).unwrap())
            );
            let err = relative_l2(&ours, &reference).unwrap();
            println!("{}: vae_decode relative L2 {err:.3e}", dir.display());
            assert!(
                err <= 1e-4,
                "{}: vae_decode relative L2 {err:.3e} > 1e-4",
                dir.display()
            );
        }
    }

    /// Every fixture's decode split across two ranks by rows matches PyTorch's as closely as
    /// the single-rank decode does.
    #[test]
    fn split_decode_matches_reference() {
        let dev = Device::Cpu;
        for dir in crate::model::reference::test_fixture_dirs() {
            let (_, vae, case) = fixture_vae(&dir, DType::F32);
            let z = case.load("z", &dev).unwrap();
            let (vae, z) = (&vae, &z);
            let videos = crate::parallel::testing::run_ranks(2, |_, comm| {
                let split = RowSplit::new(comm.as_ref(), z.dim(3)?)?;
                Ok(vae.decode_rows_with_cache(z, &mut DecoderCache::new(), &split)?)
            })
            .unwrap();
            let ours = videos[0].clone().expect("the first rank has the video");
            let err = relative_l2(&ours, &case.load("video", &dev).unwrap()).unwrap();
            println!("{}: 2-rank vae_decode relative L2 {err:.3e}", dir.display());
            assert!(err <= 1e-4, "{}: {err:.3e}", dir.display());
        }
    }

    /// The bf16 path (weights, activations and convolutions in bf16, norms, softmax and
    /// upsampling in f32) runs and stays close to the f32 reference: bf16 rounding only.
    #[test]
    fn bf16_decode_stays_close_to_the_reference() {
        let dev = Device::Cpu;
        let dirs = crate::model::reference::test_fixture_dirs();
        assert!(
            !dirs.is_empty(),
            "no reference fixtures found: set LONGTAKE_REFERENCE_DIR"
        );
        for dir in dirs {
            let (_, vae, case) = fixture_vae(&dir, DType::BF16);
            let z = case.load("z", &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let ours = vae.decode(&z).unwrap();
            assert_eq!(ours.dtype(), DType::BF16);
            let ours = ours.to_dtype(DType::F32).unwrap();
            let err = relative_l2(&ours, &case.load("video", &dev).unwrap()).unwrap();
            println!("{}: bf16 vae_decode relative L2 {err:.3e}", dir.display());
            assert!(
                err < 5e-2,
                "{}: bf16 vae_decode relative L2 {err:.3e}",
                dir.display()
            );
        }
    }

    #[test]
    fn decoding_in_segments_equals_one_decode() {
        let dev = Device::Cpu;
        let vae =
            WanVaeDecoder::new(&tiny_config(8), seeded_var_builder(3, DType::F32, &dev)).unwrap();
        let z = random(&[1, 16, 5, 4, 6], 1);
        let whole = vae.decode(&z).unwrap();
        assert_eq!(whole.dims(), &[1, 3, 17, 32, 48]);
        for split in [1, 2, 4] {
            let mut cache = DecoderCache::new();
            let a = vae
                .decode_with_cache(&z.narrow(2, 0, split).unwrap(), &mut cache)
                .unwrap();
            assert_eq!(cache.latent_frames(), split);
            // A saved (and moved) cache resumes just as well as the live one.
            let mut resumed = cache.to_device(&dev).unwrap();
            let b = vae
                .decode_with_cache(&z.narrow(2, split, 5 - split).unwrap(), &mut resumed)
                .unwrap();
            assert_eq!(a.dim(2).unwrap(), 1 + 4 * (split - 1));
            let joined = Tensor::cat(&[&a, &b], 2).unwrap();
            let err = relative_l2(&joined, &whole).unwrap();
            assert!(err < 1e-6, "split at {split}: relative L2 {err:.3e}");
        }
    }

    /// The ranks of a group decoding their rows together give the single-rank frames (bands
    /// of uneven heights, two segments through the caches, the attention's gathered keys).
    #[test]
    fn a_decode_split_by_rows_across_ranks_equals_one_rank() {
        let dev = Device::Cpu;
        let vae =
            WanVaeDecoder::new(&tiny_config(8), seeded_var_builder(3, DType::F32, &dev)).unwrap();
        let z = random(&[1, 16, 3, 5, 6], 8);
        let whole = vae.decode(&z).unwrap();
        let (vae, z) = (&vae, &z);
        for ranks in [2, 3, 4] {
            let videos = crate::parallel::testing::run_ranks(ranks, |_, comm| {
                let split = RowSplit::new(comm.as_ref(), 5)?;
                let mut cache = DecoderCache::new();
                let a = vae.decode_rows_with_cache(&z.narrow(2, 0, 2)?, &mut cache, &split)?;
                let b = vae.decode_rows_with_cache(&z.narrow(2, 2, 1)?, &mut cache, &split)?;
                Ok(a.zip(b))
            })
            .unwrap();
            assert!(videos[1..].iter().all(Option::is_none), "{ranks} ranks");
            let (a, b) = videos[0].clone().expect("the first rank has the video");
            let joined = Tensor::cat(&[&a, &b], 2).unwrap();
            assert_eq!(joined.dims(), whole.dims());
            let err = relative_l2(&joined, &whole).unwrap();
            println!("{ranks} ranks: relative L2 {err:.3e}");
            assert!(err < 1e-6, "{ranks} ranks: relative L2 {err:.3e}");
        }
    }

    #[test]
    fn other_temporal_layouts_decode_to_their_frame_counts() {
        let dev = Device::Cpu;
        for layout in [
            [false, true, true],
            [true, false, false],
            [false, false, false],
        ] {
            let config = Config {
                temperal_downsample: layout.to_vec(),
                ..tiny_config(4)
            };
            let vae = WanVaeDecoder::new(&config, seeded_var_builder(2, DType::F32, &dev)).unwrap();
            let z = random(&[1, 16, 3, 2, 2], 4);
            let whole = vae.decode(&z).unwrap();
            assert_eq!(
                whole.dims(),
                &[1, 3, config.output_frames(3), 16, 16],
                "{layout:?}"
            );
            let mut cache = DecoderCache::new();
            let a = vae
                .decode_with_cache(&z.narrow(2, 0, 2).unwrap(), &mut cache)
                .unwrap();
            let b = vae
                .decode_with_cache(&z.narrow(2, 2, 1).unwrap(), &mut cache)
                .unwrap();
            let joined = Tensor::cat(&[&a, &b], 2).unwrap();
            assert!(relative_l2(&joined, &whole).unwrap() < 1e-6, "{layout:?}");
        }
    }

    #[test]
    fn batch_items_decode_independently() {
        let dev = Device::Cpu;
        let vae =
            WanVaeDecoder::new(&tiny_config(8), seeded_var_builder(5, DType::F32, &dev)).unwrap();
        let z = random(&[2, 16, 2, 2, 3], 2);
        let both = vae.decode(&z).unwrap();
        let second = vae.decode(&z.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(relative_l2(&both.i(1..2).unwrap(), &second).unwrap() < 1e-7);
        // The output is clamped, and not constant.
        let values = both.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(values.iter().any(|v| (v - values[0]).abs() > 1e-3));
    }

    #[test]
    fn a_mismatched_cache_is_refused() {
        let dev = Device::Cpu;
        let small =
            WanVaeDecoder::new(&tiny_config(8), seeded_var_builder(1, DType::F32, &dev)).unwrap();
        let config = Config {
            num_res_blocks: 2,
            ..tiny_config(8)
        };
        let other = WanVaeDecoder::new(&config, seeded_var_builder(1, DType::F32, &dev)).unwrap();
        let z = random(&[1, 16, 1, 2, 2], 3);
        let mut cache = DecoderCache::new();
        small.decode_with_cache(&z, &mut cache).unwrap();
        let err = other
            .decode_with_cache(&z, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("another VAE"), "{err}");
    }

    #[test]
    fn unnormalize_scales_and_shifts_each_channel() {
        let config = Config::default();
        let latents = Tensor::ones((1, 16, 2, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let z = config.unnormalize_latents(&latents).unwrap();
        let got = z.i((0, .., 1, 0, 0)).unwrap().to_vec1::<f32>().unwrap();
        for (c, v) in got.iter().enumerate() {
            let want = config.latents_std[c] + config.latents_mean[c];
            assert!(
                (*v as f64 - want).abs() < 1e-5,
                "channel {c}: {v} vs {want}"
            );
        }
        let wrong = Tensor::ones((1, 4, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(config.unnormalize_latents(&wrong).is_err());
    }

    #[test]
    fn unsupported_configs_are_named() {
        let parse = |json: &str| serde_json::from_str::<Config>(json).unwrap();
        let cfg = parse(r#"{"base_dim": 16, "some_new_field": 3}"#);
        assert_eq!(cfg.base_dim, 16);
        assert_eq!(cfg.z_dim, 16);
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.output_frames(21), 81);
        // Only the up blocks' own entries of the reversed list count.
        let last_only = parse(r#"{"temperal_downsample": [true, false, false]}"#);
        assert_eq!(last_only.output_frames(3), 5);
        let short = parse(r#"{"temperal_downsample": [false, true]}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(short.contains("temperal_downsample"), "{short}");
        let residual = parse(r#"{"is_residual": true}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(residual.contains("is_residual"), "{residual}");
        let patched = parse(r#"{"patch_size": 2}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(patched.contains("patch_size"), "{patched}");
        let stats = parse(r#"{"z_dim": 48}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(stats.contains("latents_mean"), "{stats}");
        let err = WanVaeDecoder::new(
            &parse(r#"{"is_residual": true}"#),
            seeded_var_builder(0, DType::F32, &Device::Cpu),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is_residual"), "{err}");
    }
}
