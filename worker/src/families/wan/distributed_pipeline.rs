//! The whole text-to-video pipeline run by the ranks of a parallel [`Layout`].
//!
//! Every rank encodes the prompts itself (the text encoder is small and gives the same result
//! everywhere), holds the full latents and takes the same scheduler step after each
//! [`DistributedWanTransformer`] forward, whose output is bit-identical on every rank. So the
//! ranks never exchange latents; a fingerprint of the latents is compared across ranks before
//! every step and once more at the end, so a rank that drifted is an error instead of a silently
//! torn video. Every rank loads the VAE and decodes its rows of the frames (the layout's ranks
//! split the decode by rows, [`Decode::Split`]); the frames come out on rank 0. The flow itself
//! is the single-process one, [`WanPipeline::render_with`], run with a `CheckedFlow` model; so a
//! distributed render
//! resumes from a saved [`DenoiserState`](crate::model::denoiser::DenoiserState) like one in a
//! single process. It is the family's [`VideoPipeline`] on a rank of a layout.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::distributed::DistributedWanTransformer;
use super::pipeline::{Decode, Parts, WanPipeline, TINY_TRANSFORMER_PREFIX, TINY_WEIGHT_SEED};
use super::tensor_parallel::tensor_parallel_plan;
use crate::model::family::PipelineSource;
use crate::model::loader::{Checkpoint, Weights};
use crate::model::render::{
    CancelToken, FlowModel, PipelineError, PipelineInfo, Progress, RenderOptions, RenderSpec,
    Rendered, Result, VideoPipeline,
};
use crate::model::windows::GroupPeers;
use crate::parallel::comm::Communicator;
use crate::parallel::layout::Layout;

/// The rank that gets the decoded frames and writes the video.
pub const ROOT: usize = 0;

impl FlowModel for DistributedWanTransformer {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x, t, context)
    }

    fn predict_with_image(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        image: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_image(x, t, context, image)
    }
}

/// A [`DistributedWanTransformer`] that checks that every rank holds the same latents before
/// each step and at the end.
struct CheckedFlow<'a>(&'a DistributedWanTransformer);

impl FlowModel for CheckedFlow<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        check_in_sync(self.0.world(), x, "latents")?;
        self.0.forward(x, t, context)
    }

    fn predict_with_image(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        image: &Tensor,
    ) -> candle_core::Result<Tensor> {
        check_in_sync(self.0.world(), x, "latents")?;
        self.0.forward_with_image(x, t, context, image)
    }

    fn check_final_latents(&self, latents: &Tensor) -> candle_core::Result<()> {
        check_in_sync(self.0.world(), latents, "final latents")
    }
}

/// A 64-bit FNV-1a hash of a tensor's f32 bits.
fn fingerprint(t: &Tensor) -> candle_core::Result<u64> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01b3)
    }))
}

/// Fails unless `t` is bit-identical on every rank of `world`; costs one all-gather of 8 bytes.
fn check_in_sync(world: &dyn Communicator, t: &Tensor, what: &str) -> candle_core::Result<()> {
    if world.world_size() == 1 {
        return Ok(());
    }
    let hash = fingerprint(t)?;
    let mine = Tensor::new(&[[hash as u32, (hash >> 32) as u32]], t.device())?;
    let all = world.all_gather(&mine, 0)?.to_vec2::<u32>()?;
    let first = &all[0];
    if let Some(other) = all.iter().position(|h| h != first) {
        candle_core::bail!(
            "rank {}: the {what} of rank {other} differ from rank 0's: the ranks are out of sync",
            world.rank()
        );
    }
    Ok(())
}

fn transformer_err(source: candle_core::Error) -> PipelineError {
    PipelineError::Component {
        component: "transformer",
        source,
    }
}

/// One rank's share of a text-to-video job under a [`Layout`].
pub struct DistributedPipeline {
    pipeline: WanPipeline,
    transformer: DistributedWanTransformer,
    /// In a job of several worker groups: the job's communicator and this rank's group.
    job: Option<JobGroups>,
}

/// A job of several worker groups, each running the job's layout on its windows of the clip.
struct JobGroups {
    world: Box<dyn Communicator>,
    group: usize,
}

impl DistributedPipeline {
    /// This rank's part of the built-in tiny model or of a checkpoint (the built-in toy model's
    /// included; see [`Self::tiny`], [`Self::load`]).
    pub fn from_source(
        source: PipelineSource<'_>,
        device: &Device,
        dtype: DType,
        layout: Layout,
        world: Box<dyn Communicator>,
    ) -> Result<Self> {
        match source.checkpoint_dir()? {
            None => Self::tiny(device, dtype, layout, world),
            Some(dir) => Self::load(dir, device, dtype, layout, world),
        }
    }

    /// Loads this rank's part of a checkpoint in the diffusers layout: the text encoder, its
    /// tensor-parallel slices of the transformer, and the VAE. `world` spans the
    /// layout; its rank is this rank.
    pub fn load(
        dir: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
        layout: Layout,
        world: Box<dyn Communicator>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        check_rank(layout, world.as_ref())?;
        let parts = Parts {
            transformer: false,
            vae: true,
        };
        let pipeline = WanPipeline::load_parts(dir, device, dtype, parts)?;
        let component = Checkpoint::open(dir)?.component("transformer")?;
        let transformer = DistributedWanTransformer::load(&component, dtype, device, layout, world)
            .map_err(transformer_err)?;
        Ok(Self {
            pipeline,
            transformer,
            job: None,
        })
    }

    /// This rank's part of a job of `groups` worker groups, each a [`Layout`]: `job` spans every
    /// rank of the job (group `g` is ranks `g · n .. (g + 1) · n`, `n` the layout's world size);
    /// the group's own communicator is carved out of it, and the neighbouring groups are
    /// reached through it. One group is [`Self::from_source`] on `job`.
    pub fn for_job(
        source: PipelineSource<'_>,
        device: &Device,
        dtype: DType,
        layout: Layout,
        job: Box<dyn Communicator>,
        groups: usize,
    ) -> Result<Self> {
        let size = layout.world_size();
        if groups <= 1 {
            return Self::from_source(source, device, dtype, layout, job);
        }
        if job.world_size() != groups * size {
            return Err(PipelineError::Spec(format!(
                "{groups} groups of layout {layout} need {} ranks; this job has {}",
                groups * size,
                job.world_size()
            )));
        }
        let group = job.rank() / size;
        let members: Vec<usize> = (group * size..(group + 1) * size).collect();
        let world = job
            .subgroup(&members)
            .map_err(|e| transformer_err(e.into()))?;
        let mut pipeline = Self::from_source(source, device, dtype, layout, world)?;
        pipeline.job = Some(JobGroups { world: job, group });
        Ok(pipeline)
    }

    /// This rank's part of the built-in tiny model (see [`WanPipeline::tiny`]): the same seeded
    /// weights as the single-process model, of which a tensor-parallel rank keeps its slices.
    pub fn tiny(
        device: &Device,
        dtype: DType,
        layout: Layout,
        world: Box<dyn Communicator>,
    ) -> Result<Self> {
        check_rank(layout, world.as_ref())?;
        let parts = Parts {
            transformer: false,
            vae: true,
        };
        let pipeline = WanPipeline::tiny_parts(device, dtype, parts)?;
        let config = pipeline.transformer_config().clone();
        let plan = tensor_parallel_plan(&config, layout.tp, layout.coords(world.rank()).tp);
        let vb = Weights::seeded_under(TINY_WEIGHT_SEED, TINY_TRANSFORMER_PREFIX)
            .sharded(plan)
            .var_builder(dtype, device);
        let transformer =
            DistributedWanTransformer::new(&config, layout, world, vb).map_err(transformer_err)?;
        Ok(Self {
            pipeline,
            transformer,
            job: None,
        })
    }

    /// See [`WanPipeline::with_max_sequence_length`].
    pub fn with_max_sequence_length(mut self, max_sequence_length: usize) -> Self {
        self.pipeline = self.pipeline.with_max_sequence_length(max_sequence_length);
        self
    }

    /// The single-process pipeline's shared pieces (text encoder, scheduler, sizes, the VAE);
    /// its own transformer is not loaded.
    pub fn pipeline(&self) -> &WanPipeline {
        &self.pipeline
    }

    pub fn transformer(&self) -> &DistributedWanTransformer {
        &self.transformer
    }

    pub fn layout(&self) -> Layout {
        self.transformer.layout()
    }

    pub fn rank(&self) -> usize {
        self.transformer.rank()
    }

    /// Checks that the layout can run `spec`: `cfg = 2` needs guidance. (The model's shape was
    /// checked against the layout when the transformer was built.)
    pub fn check_spec(&self, spec: &RenderSpec) -> Result<()> {
        self.layout()
            .check_degrees(spec.guidance_scale > 1.0)
            .map_err(|e| PipelineError::Spec(e.to_string()))
    }

    /// [`WanPipeline::denoise`] computed by the whole layout; every rank passes the same inputs
    /// and gets the same final latents.
    pub fn denoise(
        &self,
        spec: &RenderSpec,
        prompt_embeds: &Tensor,
        negative_prompt_embeds: &Tensor,
        latents: Tensor,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        self.check_spec(spec)?;
        self.pipeline.denoise_with(
            &CheckedFlow(&self.transformer),
            spec,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            progress,
        )
    }
}

impl VideoPipeline for DistributedPipeline {
    fn info(&self) -> &PipelineInfo {
        self.pipeline.info()
    }

    fn layout_limits(&self, guidance: bool) -> longtake_proto::spec::LayoutLimits {
        self.transformer.config().layout_limits(guidance)
    }

    fn cancel_token(&self) -> &CancelToken {
        self.pipeline.cancel_token()
    }

    fn render_with_options(
        &self,
        spec: &RenderSpec,
        options: RenderOptions<'_>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered> {
        // Every rank passes the same options (a resumed state too: for several worker groups,
        // its own group's) and gets the same final latents; the video is rank 0's, or for
        // several worker groups each group's first rank's segment.
        self.check_spec(spec)?;
        if let Some(job) = &self.job {
            let peers = GroupPeers {
                job: job.world.as_ref(),
                group: job.group,
                size: self.layout().world_size(),
            };
            return self.pipeline.render_group(
                &CheckedFlow(&self.transformer),
                spec,
                peers,
                Decode::Split(self.transformer.world()),
                options,
                progress,
            );
        }
        self.pipeline.render_with(
            &CheckedFlow(&self.transformer),
            spec,
            Decode::Split(self.transformer.world()),
            options,
            progress,
        )
    }
}

fn check_rank(layout: Layout, world: &dyn Communicator) -> Result<()> {
    if world.world_size() != layout.world_size() || world.rank() >= layout.world_size() {
        return Err(PipelineError::Spec(format!(
            "layout {layout} needs {} ranks; this rank is {} of {}",
            layout.world_size(),
            world.rank(),
            world.world_size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::denoiser::{Denoiser, DenoiserState};
    use crate::model::loader::SafetensorsWeights;
    use crate::model::reference::PipelineCase;
    use crate::model::render::Video;
    use crate::model::scheduler::SchedulerKind;
    use crate::parallel::testing::{
        assert_every_layout_fixture_present, assert_refused, bits, fixture_takes,
        largest_level_difference, run_ranks, Takes, TestResult, LAYOUTS,
    };

    const TOLERANCE: f64 = 1e-4;

    /// A render from a picture (the image-to-video fixture's checkpoint, a picture of another
    /// size than the clip) under `cfg = 2`, `tp = 2`, `ulysses = 2`, `ring = 2` and
    /// `cfg = 2, tp = 2` gives the single process's frames within one 8-bit level; the picture
    /// changes the clip; a render of the image-to-video model without a picture is refused by
    /// name; a clip longer than a window on two worker groups gives the single process's frames.
    #[test]
    fn a_render_from_a_picture_under_layouts_gives_the_single_process_frames() -> TestResult {
        use crate::model::render::RenderInput;
        let dev = Device::Cpu;
        let dir = crate::model::reference::parity_fixture_dirs()
            .into_iter()
            .find(|dir| dir.ends_with("wan-i2v-tiny"))
            .expect("the wan-i2v-tiny fixture");
        let case = PipelineCase::read(&dir)?;
        let checkpoint = dir.join("pipeline");
        let picture = |shift: usize| Video {
            rgb: (0..40 * 24)
                .flat_map(|i| {
                    let (x, y) = (i % 40, i / 40);
                    [(x * 6 + shift) as u8, (y * 10) as u8, ((x + y) * 3) as u8]
                })
                .collect(),
            first_frame: 0,
            frames: 1,
            height: 24,
            width: 40,
        };
        let spec = RenderSpec {
            input: Some(RenderInput::FirstFrame(picture(0))),
            ..case.render()
        };
        let single = WanPipeline::load(&checkpoint, &dev, DType::F32)?
            .with_max_sequence_length(case.max_sequence_length);
        let expected = single.render(&spec, &mut |_| {})?;
        let other = RenderSpec {
            input: Some(RenderInput::FirstFrame(picture(90))),
            ..spec.clone()
        };
        assert!(
            single.render(&other, &mut |_| {})? != expected,
            "the picture is ignored"
        );
        // extending a clip: the image-to-video model starts from the clip's last frame
        let extension = RenderSpec {
            input: Some(RenderInput::Continues(picture(0))),
            ..spec.clone()
        };
        assert!(single.render(&extension, &mut |_| {})? == expected);
        let no_picture = RenderSpec {
            input: None,
            ..spec.clone()
        };
        let e = single
            .render(&no_picture, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("it renders from a picture"), "{e}");
        for layout in ["cfg=2", "tp=2", "ulysses=2", "ring=2", "cfg=2,tp=2"] {
            let layout: Layout = layout.parse()?;
            let videos = run_ranks(layout.world_size(), |_, world| {
                let pipe = DistributedPipeline::load(&checkpoint, &dev, DType::F32, layout, world)?
                    .with_max_sequence_length(case.max_sequence_length);
                Ok(pipe.render(&spec, &mut |_| {})?)
            })?;
            let video = videos[0].as_ref().expect("rank 0 writes the video");
            let worst = largest_level_difference(&video.rgb, &expected.rgb);
            println!("image-to-video under {layout}: max |diff| {worst} levels");
            assert!(
                worst <= 1,
                "{layout}: {worst} levels from the single process"
            );
        }
        // longer than a window: co-denoised, the picture conditioning the first window; two
        // worker groups (each encoding the condition only up to its last frame) give the single
        // process's frames, one rank each bit for bit, `cfg=2` each within one level
        let long = |groups| RenderSpec {
            frames: spec.frames + 8,
            windows: Some(longtake_proto::spec::WindowSettings {
                latent_frames: 3,
                overlap: 1,
                fusion: Default::default(),
                groups,
                noise: Default::default(),
            }),
            ..spec.clone()
        };
        assert_eq!(single.window_plan(&long(1))?.windows().len(), 2);
        let expected = single.render(&long(1), &mut |_| {})?;
        assert!(
            single.render(
                &RenderSpec {
                    input: Some(RenderInput::FirstFrame(picture(90))),
                    ..long(1)
                },
                &mut |_| {}
            )? != expected,
            "the picture is ignored"
        );
        let source = PipelineSource::Checkpoint(&checkpoint);
        for (layout, most) in [("", 0), ("cfg=2", 1)] {
            let layout: Layout = layout.parse()?;
            let videos = run_ranks(2 * layout.world_size(), |_, job| {
                let pipe = DistributedPipeline::for_job(source, &dev, DType::F32, layout, job, 2)?
                    .with_max_sequence_length(case.max_sequence_length);
                Ok(pipe.render(&long(2), &mut |_| {})?)
            })?;
            // each group's first rank has its segment; joined, the clip
            let mut joined = Vec::new();
            for video in videos.iter().flatten() {
                joined.extend_from_slice(&video.rgb);
            }
            assert_eq!(joined.len(), expected.rgb.len(), "{layout}: the whole clip");
            let worst = largest_level_difference(&joined, &expected.rgb);
            println!("image-to-video in 2 groups of {layout}: max |diff| {worst} levels");
            assert!(
                worst <= most,
                "{layout}: {worst} levels from the single process"
            );
        }
        Ok(())
    }

    /// The whole pipeline on each fixture checkpoint under every layout it takes (wan-tiny and
    /// wan-wide: all of them; wan-tiny-alt: its listed ones, the others refused by `validate`
    /// with the reason): the final latents match the single-process pipeline's, are
    /// bit-identical on every rank, and a second job gives the same bits.
    #[test]
    fn every_layout_renders_the_single_process_latents() -> TestResult {
        let dev = Device::Cpu;
        let dirs = crate::model::reference::test_fixture_dirs();
        assert_every_layout_fixture_present(&dirs);
        for dir in dirs {
            let takes = fixture_takes(&dir);
            let name = dir.display().to_string();
            let spec = PipelineCase::read(&dir)?;
            let render = spec.render();
            let checkpoint = dir.join("pipeline");
            let initial = SafetensorsWeights::open_file(dir.join("cases/pipeline.safetensors"))?
                .load("initial_latents", &dev)?;
            let single = WanPipeline::load(&checkpoint, &dev, DType::F32)?
                .with_max_sequence_length(spec.max_sequence_length);
            let (cond, uncond) = single.encode_prompts(&render.prompt, &render.negative_prompt)?;
            let expected = single.denoise(&render, &cond, &uncond, initial.clone(), &mut |_| {})?;
            let limits = single.transformer_config().layout_limits(true);
            let mut ran = 0;
            for (tp, ulysses, ring, cfg) in LAYOUTS {
                let layout = Layout {
                    cfg,
                    tp,
                    ulysses,
                    ring,
                };
                if !takes.takes(layout) {
                    assert_refused(&name, layout, &limits);
                    continue;
                }
                if let Err(why) = layout.validate(&limits) {
                    panic!("{name}: {layout} is listed as taken but refused: {why}");
                }
                let job = || {
                    run_ranks(layout.world_size(), |_, world| {
                        let pipe = DistributedPipeline::load(
                            &checkpoint,
                            &dev,
                            DType::F32,
                            layout,
                            world,
                        )?
                        .with_max_sequence_length(spec.max_sequence_length);
                        let (c, u) = pipe
                            .pipeline()
                            .encode_prompts(&render.prompt, &render.negative_prompt)?;
                        let mut steps = 0;
                        let latents = pipe.denoise(&render, &c, &u, initial.clone(), &mut |p| {
                            if let Progress::Step { .. } = p {
                                steps += 1;
                            }
                        })?;
                        assert_eq!(steps, render.steps);
                        Ok(latents)
                    })
                };
                let (first, second) = (job()?, job()?);
                let err = relative_l2(&first[0], &expected)?;
                println!("{}: {layout}: relative L2 {err:.3e}", dir.display());
                assert!(err <= TOLERANCE, "{layout}: relative L2 {err:e}");
                let reference = bits(&first[0])?;
                for (rank, latents) in first.iter().chain(&second).enumerate() {
                    assert!(
                        bits(latents)? == reference,
                        "{layout}: latents of job {} rank {} differ from job 0 rank 0",
                        rank / layout.world_size(),
                        rank % layout.world_size()
                    );
                }
                ran += 1;
            }
            println!("{name}: {ran} of {} layouts ran", LAYOUTS.len());
            match takes {
                Takes::All => assert_eq!(ran, LAYOUTS.len(), "{name}: a layout did not run"),
                Takes::Only(listed) => {
                    assert_eq!(ran, listed.len(), "{name}: a listed layout did not run")
                }
            }
        }
        Ok(())
    }

    /// The built-in tiny model (seeded weights, 4 heads, ffn_dim 128: it takes every layout),
    /// split under every layout of [`LAYOUTS`] and tp=2,cfg=2 (each rank making only its slices
    /// of the seeded weights), gives the single-process tiny model's render.
    #[test]
    fn tiny_seeded_model_under_every_layout_matches_single_process() -> TestResult {
        let dev = Device::Cpu;
        let spec = RenderSpec {
            input: None,
            prompt: "a wolf".into(),
            negative_prompt: String::new(),
            frames: 5,
            width: 32,
            height: 32,
            steps: 2,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 3,
            windows: None,
            timeline: Default::default(),
        };
        let single = WanPipeline::tiny(&dev, DType::F32)?;
        let (c, u) = single.encode_prompts(&spec.prompt, &spec.negative_prompt)?;
        let initial = single.initial_latents(&spec)?;
        let expected = single.denoise(&spec, &c, &u, initial.clone(), &mut |_| {})?;
        let mut layouts: Vec<Layout> = LAYOUTS
            .iter()
            .map(|&l| crate::parallel::testing::layout(l))
            .collect();
        layouts.push("tp=2,cfg=2".parse()?);
        for layout in layouts {
            let outputs = run_ranks(layout.world_size(), |_, world| {
                let pipe = DistributedPipeline::tiny(&dev, DType::F32, layout, world)?;
                let (c, u) = pipe
                    .pipeline()
                    .encode_prompts(&spec.prompt, &spec.negative_prompt)?;
                Ok(pipe.denoise(&spec, &c, &u, initial.clone(), &mut |_| {})?)
            })?;
            let err = relative_l2(&outputs[0], &expected)?;
            println!("seeded tiny model: {layout}: relative L2 {err:.3e}");
            assert!(
                err <= TOLERANCE,
                "seeded tiny model: {layout}: relative L2 {err:e}"
            );
            let reference = bits(&outputs[0])?;
            for (rank, latents) in outputs.iter().enumerate() {
                assert!(
                    bits(latents)? == reference,
                    "seeded tiny model: {layout}: rank {rank} differs from rank 0"
                );
            }
        }
        Ok(())
    }

    /// The built-in toy model (a trained checkpoint: 4 heads, ffn_dim 512) at its own size and
    /// clip length, under layouts of every kind and width its heads take: rank 0's frames are
    /// the single-process frames within one 8-bit level, as on a real checkpoint.
    #[test]
    fn toy_checkpoint_under_every_layout_gives_the_single_process_frames() -> TestResult {
        let dev = Device::Cpu;
        let checkpoint = crate::model::reference::toy_checkpoint_dir();
        let single = WanPipeline::load(&checkpoint, &dev, DType::F32)?;
        let info = single.info().clone();
        let spec = RenderSpec {
            input: None,
            prompt: "a yellow square bouncing on a black background".into(),
            negative_prompt: String::new(),
            frames: info.default_frames,
            width: info.default_width,
            height: info.default_height,
            steps: 3,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 9,
            windows: None,
            timeline: Default::default(),
        };
        let expected = single.render(&spec, &mut |_| {})?;
        assert_eq!(expected.frames, 17);
        let layouts = [
            "cfg=2",
            "tp=2",
            "tp=4",
            "ulysses=2",
            "ulysses=4",
            "ring=2",
            "cfg=2,ulysses=2",
        ];
        for text in layouts {
            let layout: Layout = text.parse()?;
            let videos = run_ranks(layout.world_size(), |_, world| {
                let pipe = DistributedPipeline::load(&checkpoint, &dev, DType::F32, layout, world)?;
                Ok(VideoPipeline::render(&pipe, &spec, &mut |_| {})?)
            })?;
            let [Some(video), ..] = videos.as_slice() else {
                panic!("toy: {layout}: rank 0 decoded no video");
            };
            assert!(
                videos[1..].iter().all(Option::is_none),
                "{layout}: only rank 0 gets the frames"
            );
            assert_eq!(
                (video.frames, video.height, video.width),
                (expected.frames, expected.height, expected.width)
            );
            let worst = largest_level_difference(&video.rgb, &expected.rgb);
            println!("toy: {layout}: largest difference {worst} levels");
            assert!(worst <= 1, "toy: {layout}: frames differ by {worst} levels");
        }
        Ok(())
    }

    /// A clip of three windows (the toy model's 9 latent frames, 61 frames = 16 latent frames)
    /// co-denoised by one group under `cfg=2`, `ulysses=2` and `tp=2` ends with the
    /// single-process co-denoised latents (the reference: every window on one rank, in order),
    /// and the same plan run twice gives the same bits.
    #[test]
    fn a_multi_window_clip_under_a_layout_gives_the_single_process_latents() -> TestResult {
        let dev = Device::Cpu;
        let checkpoint = crate::model::reference::toy_checkpoint_dir();
        let single = WanPipeline::load(&checkpoint, &dev, DType::F32)?;
        let spec = RenderSpec {
            input: None,
            prompt: "a red circle bouncing on a gray background".into(),
            negative_prompt: String::new(),
            frames: 61,
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 4,
            windows: Some(longtake_proto::spec::WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion: longtake_proto::spec::Fusion::Cosine,
                groups: 1,
                noise: Default::default(),
            }),
            timeline: Default::default(),
        };
        assert_eq!(single.window_plan(&spec)?.windows().len(), 3);
        let expected = single
            .render_with_options(&spec, RenderOptions::default(), &mut |_| {})?
            .latents;
        for text in ["cfg=2", "ulysses=2", "tp=2"] {
            let layout: Layout = text.parse()?;
            let run = || {
                run_ranks(layout.world_size(), |_, world| {
                    let pipe =
                        DistributedPipeline::load(&checkpoint, &dev, DType::F32, layout, world)?;
                    Ok(pipe
                        .render_with_options(&spec, RenderOptions::default(), &mut |_| {})?
                        .latents)
                })
            };
            let first = run()?;
            let err = relative_l2(&first[0], &expected)?;
            println!("toy, 3 windows: {layout}: relative L2 {err:.2e}");
            assert!(err < TOLERANCE, "{layout}: relative L2 {err}");
            let again = run()?;
            for (a, b) in first.iter().zip(&again) {
                assert_eq!(bits(a)?, bits(b)?, "{layout}: the same plan twice differs");
            }
        }
        Ok(())
    }

    /// A clip of four windows (101 frames = 26 latent frames, toy windows of 9 sharing 3)
    /// co-denoised by worker groups that exchange only their shared frames: 2 groups of one
    /// rank and 3 groups of one rank (windows 2 + 1 + 1) give the single-process latents bit
    /// for bit, 2 groups of `ulysses=2` within the layout tolerance, and 2 groups of one rank
    /// with a prompt timeline (the direction changing at 3 s) bit for bit, with the video
    /// decoded on the job's rank 0 only; each step every rank sends exactly the flows of the
    /// frames its group shares with its neighbours; the same plan run twice is bit-identical.
    #[test]
    fn worker_groups_give_the_single_process_latents() -> TestResult {
        use longtake_proto::spec::{Fusion, PromptTimeline, WindowSettings};
        use longtake_proto::PromptCue;
        let dev = Device::Cpu;
        let checkpoint = crate::model::reference::toy_checkpoint_dir();
        let single = WanPipeline::load(&checkpoint, &dev, DType::F32)?;
        let story = PromptTimeline::new(
            &[PromptCue {
                at_seconds: 3.0,
                prompt: "a blue triangle moving left on a white background".into(),
            }],
            16,
        );
        let spec = |groups, timeline: &PromptTimeline| RenderSpec {
            input: None,
            prompt: "a blue triangle moving right on a white background".into(),
            negative_prompt: String::new(),
            frames: 101,
            width: 64,
            height: 64,
            steps: 3,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 8,
            windows: Some(WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion: Fusion::Linear,
                groups,
                noise: Default::default(),
            }),
            timeline: timeline.clone(),
        };
        let plain = PromptTimeline::default();
        let reference = |timeline| {
            single.render_with_options(&spec(1, timeline), RenderOptions::default(), &mut |_| {})
        };
        let (plain_reference, story_reference) = (reference(&plain)?, reference(&story)?);
        let plan = single.window_plan(&spec(1, &story))?;
        assert_eq!(plan.windows().len(), 4);
        assert_eq!(story.window_prompts(&plan, 4), [0, 0, 1, 1]);
        assert!(
            relative_l2(&story_reference.latents, &plain_reference.latents)? > 1e-3,
            "the timeline changes the render"
        );
        let source = PipelineSource::Checkpoint(&checkpoint);
        for (groups, layout, exact, timeline) in [
            (2, "", true, &plain),
            (3, "", true, &plain),
            (2, "ulysses=2", false, &plain),
            (2, "", true, &story),
        ] {
            let layout: Layout = layout.parse()?;
            let reference = if timeline.is_empty() {
                &plain_reference
            } else {
                &story_reference
            };
            let plan = single.window_plan(&spec(groups, timeline))?;
            assert_eq!(plan.group_count(), groups as usize);
            let ranks = groups as usize * layout.world_size();
            let run = || {
                run_ranks(ranks, |_, job| {
                    let pipe = DistributedPipeline::for_job(
                        source,
                        &dev,
                        DType::F32,
                        layout,
                        job,
                        groups as usize,
                    )?;
                    let mut exchanged = Vec::new();
                    let r = pipe.render_with_options(
                        &spec(groups, timeline),
                        RenderOptions::default(),
                        &mut |p| {
                            if let Progress::Step { exchange, .. } = p {
                                exchanged.push(exchange.bytes);
                            }
                        },
                    )?;
                    Ok((r.latents, r.video, exchanged))
                })
            };
            let first = run()?;
            // Each step every rank sends the flows of the frames its group shares with each
            // neighbour, once: f32, cond and uncond, 16 channels of 8 × 8 latents a frame.
            for (rank, (_, _, exchanged)) in first.iter().enumerate() {
                let g = rank / layout.world_size();
                let mut shared = plan.shared_with_next(g).len();
                if g > 0 {
                    shared += plan.shared_with_next(g - 1).len();
                }
                let expected = (shared * 2 * 16 * 8 * 8 * 4) as u64;
                assert!(shared > 0);
                assert_eq!(
                    exchanged,
                    &vec![expected; 3],
                    "{groups} groups of {layout}: rank {rank}'s bytes per step"
                );
            }
            let (latents, _, _) = &first[0];
            let err = relative_l2(latents, &reference.latents)?;
            println!("{groups} groups of {layout}: relative L2 {err:.2e}");
            if exact {
                assert_eq!(
                    bits(latents)?,
                    bits(&reference.latents)?,
                    "{groups} groups of {layout}"
                );
            } else {
                assert!(
                    err < TOLERANCE,
                    "{groups} groups of {layout}: relative L2 {err}"
                );
            }
            // each group's first rank gets the frames its group owns; in order they are
            // the clip
            let mut segments: Vec<&Video> = Vec::new();
            for (rank, (_, video, _)) in first.iter().enumerate() {
                assert_eq!(
                    video.is_some(),
                    rank % layout.world_size() == 0,
                    "{groups} groups of {layout}: rank {rank} gets frames only as its group's first"
                );
                segments.extend(video);
            }
            let mut next = 0;
            for (g, segment) in segments.iter().enumerate() {
                assert_eq!(
                    segment.first_frame, next,
                    "group {g}'s segment starts where the previous one ends"
                );
                next += segment.frames;
            }
            assert_eq!(next, 101);
            let rgb: Vec<u8> = segments
                .iter()
                .flat_map(|v| v.rgb.iter().copied())
                .collect();
            if exact {
                // each group decodes its own frames after a warm-up, as the single process
                // does for the same plan
                let single_video = single
                    .render_with_options(
                        &spec(groups, timeline),
                        RenderOptions::default(),
                        &mut |_| {},
                    )?
                    .video
                    .expect("the single process decodes");
                assert!(
                    rgb == single_video.rgb,
                    "the same latents decode to the same frames"
                );
                let whole = &reference.video.as_ref().expect("decoded").rgb;
                let most = largest_level_difference(&rgb, whole);
                assert!(
                    most <= 1,
                    "segments decoded after a warm-up are within a level of the whole decode: {most:?}"
                );
            }
            let again = run()?;
            for ((a, _, _), (b, _, _)) in first.iter().zip(&again) {
                assert_eq!(
                    bits(a)?,
                    bits(b)?,
                    "{groups} groups of {layout}: the same plan twice"
                );
            }
        }

        // the other noise schedule (the plans above draw FreeNoise-style rescheduled noise, the
        // default): every frame its own noise, the same on every group
        let independent = |groups| {
            let mut spec = spec(groups, &plain);
            if let Some(w) = spec.windows.as_mut() {
                w.noise = longtake_proto::spec::NoiseSchedule::Independent;
            }
            spec
        };
        let expected = single
            .render_with_options(&independent(1), RenderOptions::default(), &mut |_| {})?
            .latents;
        assert!(relative_l2(&expected, &plain_reference.latents)? > 1e-3);
        let on_groups = run_ranks(2, |_, job| {
            let pipe =
                DistributedPipeline::for_job(source, &dev, DType::F32, Layout::SINGLE, job, 2)?;
            Ok(pipe
                .render_with_options(&independent(2), RenderOptions::default(), &mut |_| {})?
                .latents)
        })?;
        assert_eq!(
            bits(&on_groups[0])?,
            bits(&expected)?,
            "independent noise on 2 groups"
        );
        Ok(())
    }

    /// A clip of four windows co-denoised by 2 worker groups (of one rank, and of `ulysses=2`)
    /// whose ranks all stop after step k of 4, each group's first rank saving its group's state,
    /// then resumed by every rank from its own group's file, ends with the uninterrupted run's
    /// latents bit for bit on rank 0 (the clip) and on every rank (its group's frames), for
    /// k = 1, 3.
    #[test]
    fn worker_groups_stopped_and_resumed_are_bit_identical() -> TestResult {
        use longtake_proto::spec::{Fusion, WindowSettings};
        let dev = Device::Cpu;
        let checkpoint = crate::model::reference::toy_checkpoint_dir();
        let source = PipelineSource::Checkpoint(&checkpoint);
        let steps = 4;
        let stops = [1, 3];
        let spec = RenderSpec {
            input: None,
            prompt: "a red circle moving right on a black background".into(),
            negative_prompt: String::new(),
            frames: 101,
            width: 64,
            height: 64,
            steps,
            guidance_scale: 5.0,
            shift: None,
            scheduler: Some(SchedulerKind::UniPc),
            seed: 3,
            windows: Some(WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion: Fusion::Linear,
                groups: 2,
                noise: Default::default(),
            }),
            timeline: Default::default(),
        };
        for layout in ["", "ulysses=2"] {
            let layout: Layout = layout.parse()?;
            let size = layout.world_size();
            let dirs: Vec<Vec<_>> = stops
                .iter()
                .map(|_| (0..2).map(|_| tempfile::tempdir()).collect())
                .collect::<std::io::Result<_>>()?;
            let outputs = run_ranks(2 * size, |rank, job| {
                let group = rank / size;
                let pipe = DistributedPipeline::for_job(source, &dev, DType::F32, layout, job, 2)?;
                let full =
                    pipe.render_with_options(&spec, RenderOptions::default(), &mut |_| {})?;
                let mut resumed = Vec::new();
                for (&k, dirs) in stops.iter().zip(&dirs) {
                    let token = pipe.pipeline().cancel_token();
                    let mut save = |d: &Denoiser| -> Result<()> {
                        if d.step_index() == k {
                            if rank % size == 0 {
                                d.state().save(dirs[group].path())?;
                            }
                            token.cancel();
                        }
                        Ok(())
                    };
                    let options = RenderOptions {
                        resume: None,
                        after_step: Some(&mut save),
                        stream_frames: false,
                    };
                    match pipe.render_with_options(&spec, options, &mut |_| {}) {
                        Err(PipelineError::Cancelled { after_step, .. }) if after_step == k => {}
                        other => return Err(format!("stop after {k}: got {other:?}").into()),
                    }
                    token.reset();
                    // Every group's file is written before any rank reads one.
                    pipe.job
                        .as_ref()
                        .expect("a job of groups")
                        .world
                        .barrier()?;
                    let state = DenoiserState::load(dirs[group].path(), &dev)?;
                    let options = RenderOptions {
                        resume: Some(state),
                        after_step: None,
                        stream_frames: false,
                    };
                    let latents = pipe
                        .render_with_options(&spec, options, &mut |_| {})?
                        .latents;
                    resumed.push((k, latents));
                }
                Ok((full.latents, resumed))
            })?;
            assert_eq!(outputs[0].0.dim(2)?, 26, "rank 0 holds the clip's latents");
            for (rank, (full, resumed)) in outputs.iter().enumerate() {
                for (k, latents) in resumed {
                    assert!(
                        bits(latents)? == bits(full)?,
                        "{layout}: rank {rank}: resumed after step {k} differs from the uninterrupted render"
                    );
                }
            }
        }
        Ok(())
    }

    /// A state saved by the single process after step 2 of 4 resumes under every layout of the
    /// parallel runtime (a re-queued job placed on another layout) and ends within the layout
    /// tolerance of the uninterrupted single-process render: the state holds the whole clip's
    /// latents and the solver's history, nothing of the layout.
    #[test]
    fn a_state_saved_in_one_layout_resumes_in_every_other() -> TestResult {
        let dev = Device::Cpu;
        let spec = RenderSpec {
            input: None,
            prompt: "a wolf howling at the moon".into(),
            negative_prompt: "blurry".into(),
            frames: 5,
            width: 32,
            height: 32,
            steps: 4,
            guidance_scale: 5.0,
            shift: None,
            scheduler: Some(SchedulerKind::UniPc),
            seed: 5,
            windows: None,
            timeline: Default::default(),
        };
        let single = WanPipeline::tiny(&dev, DType::F32)?;
        let expected = single.render_with_options(&spec, RenderOptions::default(), &mut |_| {})?;
        let dir = tempfile::tempdir()?;
        let token = single.cancel_token();
        let mut save = |d: &Denoiser| -> Result<()> {
            if d.step_index() == 2 {
                d.state().save(dir.path())?;
                token.cancel();
            }
            Ok(())
        };
        let options = RenderOptions {
            after_step: Some(&mut save),
            ..Default::default()
        };
        assert!(matches!(
            single.render_with_options(&spec, options, &mut |_| {}),
            Err(PipelineError::Cancelled { after_step: 2, .. })
        ));
        for &l in LAYOUTS.iter() {
            let layout = crate::parallel::testing::layout(l);
            let outputs = run_ranks(layout.world_size(), |_, world| {
                let pipe = DistributedPipeline::tiny(&dev, DType::F32, layout, world)?;
                let options = RenderOptions {
                    resume: Some(DenoiserState::load(dir.path(), &dev)?),
                    ..Default::default()
                };
                Ok(pipe
                    .render_with_options(&spec, options, &mut |_| {})?
                    .latents)
            })?;
            let err = relative_l2(&outputs[0], &expected.latents)?;
            println!("saved in one process, resumed under {layout}: relative L2 {err:.3e}");
            assert!(
                err <= TOLERANCE,
                "resumed under {layout}: relative L2 {err:e}"
            );
        }
        Ok(())
    }

    /// Under `ulysses=2`, for both schedulers: a render whose ranks stop (cancelled) after step
    /// k of 5, rank 0 saving the state, then resumed by every rank from rank 0's file, ends with
    /// the uninterrupted distributed render's latents bit for bit on every rank, for k = 1, 3, 4.
    #[test]
    fn distributed_render_stopped_and_resumed_is_bit_identical() -> TestResult {
        let dev = Device::Cpu;
        let layout: Layout = "ulysses=2".parse()?;
        let steps = 5;
        let stops = [1, 3, steps - 1];
        let dirs: Vec<_> = (0..2 * stops.len())
            .map(|_| tempfile::tempdir())
            .collect::<std::io::Result<_>>()?;
        for (kind_index, kind) in [SchedulerKind::UniPc, SchedulerKind::Euler]
            .into_iter()
            .enumerate()
        {
            let spec = RenderSpec {
                input: None,
                prompt: "a wolf howling at the moon".into(),
                negative_prompt: "blurry".into(),
                frames: 5,
                width: 32,
                height: 32,
                steps,
                guidance_scale: 5.0,
                shift: None,
                scheduler: Some(kind),
                seed: 5,
                windows: None,
                timeline: Default::default(),
            };
            let dirs = &dirs[kind_index * stops.len()..][..stops.len()];
            // One job: the uninterrupted render, then each stop and its resumption, on the same
            // ranks (a resumption makes a fresh denoiser and scheduler from the file).
            let outputs = run_ranks(layout.world_size(), |rank, world| {
                let pipe = DistributedPipeline::tiny(&dev, DType::F32, layout, world)?;
                let full =
                    pipe.render_with_options(&spec, RenderOptions::default(), &mut |_| {})?;
                assert_eq!(full.video.is_some(), rank == ROOT);
                let mut resumed = Vec::new();
                for (&k, dir) in stops.iter().zip(dirs) {
                    let token = pipe.pipeline().cancel_token();
                    let mut save = |d: &Denoiser| -> Result<()> {
                        if d.step_index() == k {
                            if rank == ROOT {
                                d.state().save(dir.path())?;
                            }
                            token.cancel();
                        }
                        Ok(())
                    };
                    let options = RenderOptions {
                        resume: None,
                        after_step: Some(&mut save),
                        stream_frames: false,
                    };
                    match pipe.render_with_options(&spec, options, &mut |_| {}) {
                        Err(PipelineError::Cancelled { after_step, .. }) if after_step == k => {}
                        other => {
                            return Err(format!("{kind:?}: stop after {k}: got {other:?}").into())
                        }
                    }
                    token.reset();
                    // Rank 0's file is written before any rank reads it.
                    pipe.transformer().world().barrier()?;
                    let state = DenoiserState::load(dir.path(), &dev)?;
                    let options = RenderOptions {
                        resume: Some(state),
                        after_step: None,
                        stream_frames: false,
                    };
                    let latents = pipe
                        .render_with_options(&spec, options, &mut |_| {})?
                        .latents;
                    resumed.push((k, latents));
                }
                Ok((full.latents, resumed))
            })?;
            let expected = bits(&outputs[0].0)?;
            for (rank, (full, resumed)) in outputs.iter().enumerate() {
                assert!(bits(full)? == expected, "{kind:?}: rank {rank} full render");
                for (k, latents) in resumed {
                    assert!(
                        bits(latents)? == expected,
                        "{kind:?}: rank {rank}: resumed after step {k} differs from the uninterrupted render"
                    );
                }
            }
        }
        Ok(())
    }
}
