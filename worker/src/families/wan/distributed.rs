//! The Wan transformer run by the ranks of a parallel [`Layout`]: CFG branches on different
//! ranks, the token sequence split over `ulysses × ring` ranks, heads and FFN features split over
//! `tp` ranks. [`DistributedWanTransformer::forward`] takes the same full inputs as the
//! single-process [`WanTransformer3DModel`](crate::families::wan::transformer::WanTransformer3DModel)
//! and returns the same full output on every rank (within float rounding), so the two can be
//! compared directly and the sampler above need not know the layout.
//!
//! Per block, a rank holds its `tokens / (ulysses · ring)` tokens (the sequence padded to a
//! multiple of that; padded keys never enter attention) of its CFG branch. Self-attention: q/k/v
//! of its tp heads, the across-heads q/k norm completed by a tp all-reduce, RoPE of its tokens,
//! a Ulysses all-to-all to (the ulysses group's tokens, a chunk of the heads), ring attention over
//! the ring group's blocks, the inverse all-to-all, and the row-parallel output projection with
//! its tp all-reduce. Cross-attention and the FFN only need tp. Modulation, norms, embeddings and
//! the output head are replicated.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{apply_rope, image_tokens};
use super::rope::RopeTables;
use super::tensor_parallel::{tensor_parallel_plan, TpAttention, TpFeedForward};
use super::transformer::{check_batch, unpatchify, BlockResiduals, Config, TransformerEnds};
use crate::model::attention::{attention, merge_heads, split_heads, AttentionOptions};
use crate::model::loader::Component;
use crate::parallel::comm::Communicator;
use crate::parallel::group::Group;
use crate::parallel::layout::{padded_len, shard_range, Coords, GroupKind, Layout};
use crate::parallel::ring::ring_attention;
use crate::parallel::ulysses::{heads_to_tokens, tokens_to_heads};

/// The groups one rank belongs to.
#[derive(Debug)]
struct Groups {
    tp: Group,
    ulysses: Group,
    ring: Group,
    /// All `ulysses × ring` holders of one sequence (same tp slice), in sequence-shard order.
    sequence: Group,
    cfg: Group,
}

impl Groups {
    fn new(layout: &Layout, rank: usize, world: &dyn Communicator) -> Result<Self> {
        let create = |kind| Group::create(world, &layout.group(kind, rank));
        // Struct fields are evaluated in the order written: every rank creates its subgroups in
        // this same order, as `Communicator::subgroup` requires.
        Ok(Self {
            tp: create(GroupKind::Tp)?,
            ulysses: create(GroupKind::Ulysses)?,
            ring: create(GroupKind::Ring)?,
            sequence: create(GroupKind::Sequence)?,
            cfg: create(GroupKind::Cfg)?,
        })
    }
}

/// Which tokens of the (padded) sequence this rank holds.
#[derive(Debug, Clone, Copy)]
struct SequenceShard {
    /// Real tokens of the whole sequence.
    tokens: usize,
    /// Tokens per rank (padded length / (ulysses · ring)).
    local: usize,
    /// First token of this rank.
    start: usize,
    /// Tokens per ring member after the Ulysses exchange (`ulysses · local`).
    ring_block: usize,
}

impl SequenceShard {
    fn new(tokens: usize, layout: &Layout, rank: usize) -> Self {
        let parts = layout.ulysses * layout.ring;
        let local = padded_len(tokens, parts) / parts;
        Self {
            tokens,
            local,
            start: layout.sequence_index(rank) * local,
            ring_block: local * layout.ulysses,
        }
    }

    /// Real (non-padding) keys in ring member `member`'s block; the padding is at the end of the
    /// sequence, so they are a prefix of the block.
    fn valid_keys(&self, member: usize) -> usize {
        self.tokens
            .saturating_sub(member * self.ring_block)
            .min(self.ring_block)
    }

    /// This rank's tokens of `x` along `dim`, zero-padded past the end of the sequence.
    fn take(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let valid = self.tokens.saturating_sub(self.start).min(self.local);
        if valid == self.local {
            return x.narrow(dim, self.start, valid);
        }
        let mut pad_shape = x.dims().to_vec();
        pad_shape[dim] = self.local - valid;
        let pad = Tensor::zeros(pad_shape, x.dtype(), x.device())?;
        if valid == 0 {
            return Ok(pad);
        }
        Tensor::cat(&[&x.narrow(dim, self.start, valid)?, &pad], dim)
    }
}

/// One `blocks.{i}` as a rank of the layout holds it.
#[derive(Debug, Clone)]
struct DistributedBlock {
    residuals: BlockResiduals,
    attn1: TpAttention,
    attn2: TpAttention,
    ffn: TpFeedForward,
}

/// What a block needs besides its input.
struct BlockContext<'a> {
    modulation: &'a Tensor,
    context: &'a Tensor,
    rope: &'a RopeTables,
    sequence: SequenceShard,
    groups: &'a Groups,
    options: &'a AttentionOptions,
}

impl DistributedBlock {
    fn new(cfg: &Config, tp: usize, tp_rank: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            residuals: BlockResiduals::new(cfg, &vb)?,
            attn1: TpAttention::new(cfg, tp, tp_rank, vb.pp("attn1"))?,
            attn2: TpAttention::cross(cfg, tp, tp_rank, vb.pp("attn2"))?,
            ffn: TpFeedForward::new(cfg, tp, tp_rank, vb.pp("ffn"))?,
        })
    }

    /// The same computation as `WanTransformerBlock::forward`, on this rank's tokens.
    fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        self.residuals.forward(
            x,
            ctx.modulation,
            |h| self.self_attention(h, ctx),
            |h| self.cross_attention(h, ctx),
            |h| self.ffn.forward(h, &ctx.groups.tp),
        )
    }

    fn self_attention(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let attn = &self.attn1;
        let groups = ctx.groups;
        let q = attn.project_q(x)?;
        let (k, v) = attn.project_kv(x)?;
        let (q, k) = attn.norm_qk(&q, &k, &groups.tp)?;
        let heads = attn.local_heads();
        // RoPE before the exchange: this rank has the tables of its own tokens.
        let q = apply_rope(&split_heads(&q, heads)?, ctx.rope)?;
        let k = apply_rope(&split_heads(&k, heads)?, ctx.rope)?;
        let v = split_heads(&v, heads)?;
        let (q, k, v) = if groups.ulysses.size() > 1 {
            // One all-to-all for q, k and v, stacked along the batch.
            let b = q.dim(0)?;
            let qkv = tokens_to_heads(&Tensor::cat(&[&q, &k, &v], 0)?, &groups.ulysses)?;
            (
                qkv.narrow(0, 0, b)?,
                qkv.narrow(0, b, b)?,
                qkv.narrow(0, 2 * b, b)?,
            )
        } else {
            (q, k, v)
        };
        let seq = ctx.sequence;
        let out = ring_attention(
            &q,
            &k,
            &v,
            |member| seq.valid_keys(member),
            &groups.ring,
            ctx.options,
        )?;
        let out = heads_to_tokens(&out, &groups.ulysses)?;
        attn.project_out(&merge_heads(&out)?, &groups.tp)
    }

    /// `WanAttention::cross_attention` on this rank's tokens and heads: the image tokens (for
    /// image-to-video) split off the context by the same rule.
    fn cross_attention(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let attn = &self.attn2;
        let tp = &ctx.groups.tp;
        let len = ctx.context.dim(1)?;
        let image_len = if attn.takes_image() {
            image_tokens(len)
        } else {
            0
        };
        let text = ctx.context.narrow(1, image_len, len - image_len)?;
        let q = attn.project_q(x)?;
        let (k, v) = attn.project_kv(&text)?;
        let (q, k) = attn.norm_qk(&q, &k, tp)?;
        let heads = attn.local_heads();
        let q = split_heads(&q, heads)?;
        let mut out = attention(
            &q,
            &split_heads(&k, heads)?,
            &split_heads(&v, heads)?,
            ctx.options,
        )?;
        if image_len > 0 {
            let (k, v) = attn.project_image_kv(&ctx.context.narrow(1, 0, image_len)?, tp)?;
            let image = attention(
                &q,
                &split_heads(&k, heads)?,
                &split_heads(&v, heads)?,
                ctx.options,
            )?;
            out = (out + image)?;
        }
        attn.project_out(&merge_heads(&out)?, tp)
    }
}

/// The Wan2.1 transformer as one rank of a parallel layout holds and runs it.
pub struct DistributedWanTransformer {
    config: Config,
    layout: Layout,
    rank: usize,
    coords: Coords,
    groups: Groups,
    /// The whole-job communicator the groups were made from; kept alive with them.
    world: Box<dyn Communicator>,
    ends: TransformerEnds,
    blocks: Vec<DistributedBlock>,
    options: AttentionOptions,
    loaded_weight_bytes: Option<u64>,
}

impl std::fmt::Debug for DistributedWanTransformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedWanTransformer")
            .field("layout", &self.layout)
            .field("rank", &self.rank)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl DistributedWanTransformer {
    /// Builds this rank's part of the model. `world` spans the whole layout (its rank is this
    /// rank); `vb` must serve the slices of [`tensor_parallel_plan`] for this rank's tp
    /// coordinate (a [`Weights`](crate::model::loader::Weights) `sharded` by it, or [`Self::load`] which makes one).
    pub fn new(
        config: &Config,
        layout: Layout,
        world: Box<dyn Communicator>,
        vb: VarBuilder,
    ) -> Result<Self> {
        config.validate()?;
        layout
            .validate(&config.layout_limits(layout.cfg > 1))
            .map_err(candle_core::Error::wrap)?;
        if world.world_size() != layout.world_size() {
            candle_core::bail!(
                "layout {layout} needs {} ranks, the communicator has {}",
                layout.world_size(),
                world.world_size()
            );
        }
        let rank = world.rank();
        let coords = layout.coords(rank);
        let groups = Groups::new(&layout, rank, world.as_ref())?;
        let blocks = (0..config.num_layers)
            .map(|i| {
                DistributedBlock::new(config, layout.tp, coords.tp, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            layout,
            rank,
            coords,
            groups,
            world,
            ends: TransformerEnds::new(config, &vb)?,
            blocks,
            options: AttentionOptions::for_device(vb.device()),
            loaded_weight_bytes: None,
        })
    }

    /// Loads this rank's part of the `transformer` component: only its tp slices are read from
    /// the weight files.
    pub fn load(
        component: &Component,
        dtype: DType,
        device: &candle_core::Device,
        layout: Layout,
        world: Box<dyn Communicator>,
    ) -> Result<Self> {
        let config: Config = component.config().map_err(candle_core::Error::wrap)?;
        if world.rank() >= layout.world_size() {
            candle_core::bail!(
                "rank {} is outside layout {layout} ({} ranks)",
                world.rank(),
                layout.world_size()
            );
        }
        let plan = tensor_parallel_plan(&config, layout.tp, layout.coords(world.rank()).tp);
        let weights = component
            .weights()
            .map_err(candle_core::Error::wrap)?
            .sharded(plan);
        let read = weights.bytes_read();
        let vb = weights.var_builder(dtype, device);
        let mut model = Self::new(&config, layout, world, vb)?;
        model.loaded_weight_bytes = Some(read.get());
        Ok(model)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The whole-job communicator (every rank of the layout).
    pub fn world(&self) -> &dyn Communicator {
        self.world.as_ref()
    }

    /// Bytes of weights this rank read from the checkpoint, when built by [`Self::load`].
    pub fn loaded_weight_bytes(&self) -> Option<u64> {
        self.loaded_weight_bytes
    }

    /// Sets how every attention core bounds its memory (see [`AttentionOptions`]).
    pub fn set_attention_options(&mut self, options: AttentionOptions) {
        self.options = options;
    }

    /// The single-process forward, computed by the whole layout: every rank passes the same full
    /// inputs (`hidden_states` `(B, C, F, H, W)`, `timestep` `(B,)`, `encoder_hidden_states`
    /// `(B, Lt, text_dim)`; with `cfg = 2` the batch rows are split between the CFG ranks) and
    /// gets the full `(B, C_out, F, H, W)` output. Every rank must call it with the same shapes.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.run(hidden_states, timestep, encoder_hidden_states, None)
    }

    /// [`Self::forward`] of an image-to-video transformer, with the image embedding
    /// `(B, Li, image_dim)` (split between the CFG ranks like the text).
    pub fn forward_with_image(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: &Tensor,
    ) -> Result<Tensor> {
        self.run(
            hidden_states,
            timestep,
            encoder_hidden_states,
            Some(encoder_hidden_states_image),
        )
    }

    fn run(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, f, h, w) = check_batch(hidden_states, timestep, encoder_hidden_states)?;
        if b < self.layout.cfg {
            candle_core::bail!(
                "layout {} splits the batch over {} CFG ranks, but the batch has {b} rows",
                self.layout,
                self.layout.cfg
            );
        }
        let rows = shard_range(b, self.layout.cfg, self.coords.cfg);
        let branch = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let (x, timestep, text) = (
            branch(hidden_states)?,
            branch(timestep)?,
            branch(encoder_hidden_states)?,
        );

        let device = x.device();
        let [pt, ph, pw] = self.config.patch_size;
        let grid = (f / pt, h / ph, w / pw);
        let sequence = SequenceShard::new(grid.0 * grid.1 * grid.2, &self.layout, self.rank);
        let rope = self.ends.rope().tables(grid, device)?;
        let rope = RopeTables {
            cos: sequence.take(&rope.cos, 0)?,
            sin: sequence.take(&rope.sin, 0)?,
        };

        let image = image.map(branch).transpose()?;
        let (x, cond) = self.ends.embed(&x, &timestep, &text, image.as_ref())?;
        let mut x = sequence.take(&x, 1)?;
        let ctx = BlockContext {
            modulation: &cond.modulation,
            context: &cond.context,
            rope: &rope,
            sequence,
            groups: &self.groups,
            options: &self.options,
        };
        for (index, block) in self.blocks.iter().enumerate() {
            let _span = longtake_proto::telemetry::block_span(index).entered();
            x = block.forward(&x, &ctx)?;
        }

        let x = self.ends.head(&x, &cond.temb)?;
        // Gathered after the output projection, where a token is smallest.
        let x = self
            .groups
            .sequence
            .all_gather(&x, 1)?
            .narrow(1, 0, sequence.tokens)?;
        let out = unpatchify(
            &x,
            rows.len(),
            grid,
            self.config.patch_size,
            self.config.out_channels(),
        )?;
        self.groups.cfg.all_gather(&out, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::wan::transformer::WanTransformer3DModel;
    use crate::model::compare::relative_l2;
    use crate::model::loader::{
        seeded_var_builder, Checkpoint, SafetensorsWeights, ShardPlan, Weights,
    };
    use crate::parallel::testing::{
        assert_every_layout_fixture_present, assert_refused, bits, fixture_takes, layout,
        run_ranks, Takes, TestResult, LAYOUTS,
    };
    use candle_core::Device;
    use std::path::PathBuf;

    const TOLERANCE: f64 = 1e-4;

    /// One model and inputs, with the single-process output to match.
    struct Case {
        name: String,
        /// Which layouts this model takes (the others must be refused).
        takes: Takes,
        config: Config,
        weight_files: Vec<PathBuf>,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        expected: Tensor,
    }

    impl Case {
        fn rank_model(
            &self,
            layout: Layout,
            world: Box<dyn Communicator>,
        ) -> TestResult<DistributedWanTransformer> {
            let tp_rank = layout.coords(world.rank()).tp;
            let plan = tensor_parallel_plan(&self.config, layout.tp, tp_rank);
            let vb = Weights::files(SafetensorsWeights::open(&self.weight_files)?)
                .sharded(plan)
                .var_builder(DType::F32, &Device::Cpu);
            Ok(DistributedWanTransformer::new(
                &self.config,
                layout,
                world,
                vb,
            )?)
        }
    }

    fn fixture_cases() -> TestResult<Vec<Case>> {
        let dev = Device::Cpu;
        let mut cases = Vec::new();
        let dirs = crate::model::reference::test_fixture_dirs();
        assert_every_layout_fixture_present(&dirs);
        for dir in dirs {
            let component = Checkpoint::open(dir.join("pipeline"))?.component("transformer")?;
            let config: Config = component.config()?;
            let single =
                WanTransformer3DModel::new(&config, component.var_builder(DType::F32, &dev)?)?;
            let refs = SafetensorsWeights::open_file(dir.join("cases/transformer.safetensors"))?;
            let x = refs.load("hidden_states", &dev)?;
            let t = refs.load("timestep", &dev)?;
            let text = refs.load("encoder_hidden_states", &dev)?;
            let expected = single.forward(&x, &t, &text)?;
            cases.push(Case {
                name: dir.display().to_string(),
                takes: fixture_takes(&dir),
                config,
                weight_files: component.weight_files()?,
                x,
                t,
                text,
                expected,
            });
        }
        Ok(cases)
    }

    /// A random model with 4 heads on a latent of `(frames, height, width)`; `(3, 2, 6)` gives
    /// 3·1·3 = 9 tokens, which divide by neither 2 nor 4.
    fn random_case(
        dir: &std::path::Path,
        (frames, height, width): (usize, usize, usize),
    ) -> TestResult<Case> {
        let dev = Device::Cpu;
        let config = Config {
            num_attention_heads: 4,
            attention_head_dim: 8,
            text_dim: 8,
            freq_dim: 16,
            ffn_dim: 32,
            num_layers: 2,
            ..Config::default()
        };
        let (weights, recorded) = Weights::seeded(11).recorded();
        let single = WanTransformer3DModel::new(&config, weights.var_builder(DType::F32, &dev))?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&recorded.take(), &path)?;
        let normal = |stream: u64, shape: &[usize]| -> Result<Tensor> {
            let n = shape.iter().product();
            Tensor::from_vec(crate::model::noise::gaussian(3, stream, 0, n), shape, &dev)
        };
        let x = normal(0, &[2, 16, frames, height, width])?;
        let t = Tensor::new(&[700f32, 40.0], &dev)?;
        let text = normal(1, &[2, 5, 8])?;
        let expected = single.forward(&x, &t, &text)?;
        let tokens = frames * (height / 2) * (width / 2);
        Ok(Case {
            name: format!("seeded {tokens}-token model"),
            takes: Takes::All,
            config,
            weight_files: vec![path],
            x,
            t,
            text,
            expected,
        })
    }

    /// Runs every layout of `layouts` that `case` takes against the single-process output, and
    /// checks that `validate` refuses, with its reason, every one it does not take. Nothing is
    /// skipped: a layout listed as taken that fails to run fails the test. Returns how many ran.
    fn check_layouts(case: &Case, layouts: &[Layout]) -> TestResult<usize> {
        let limits = case.config.layout_limits(true);
        let mut ran = 0;
        for &layout in layouts {
            if !case.takes.takes(layout) {
                assert_refused(&case.name, layout, &limits);
                continue;
            }
            if let Err(why) = layout.validate(&limits) {
                panic!(
                    "{}: {layout} is listed as taken but refused: {why}",
                    case.name
                );
            }
            let run = || {
                run_ranks(layout.world_size(), |_, world| {
                    let model = case.rank_model(layout, world)?;
                    let first = model.forward(&case.x, &case.t, &case.text)?;
                    let second = model.forward(&case.x, &case.t, &case.text)?;
                    Ok((first, second))
                })
            };
            let outputs = run()?;
            // A second job on a fresh mesh: arrival order of messages may differ, bits may not.
            let again = run()?;
            let reference = bits(&outputs[0].0)?;
            for (rank, (first, second)) in outputs.iter().enumerate() {
                let err = relative_l2(first, &case.expected)?;
                println!("{}: {layout} rank {rank}: relative L2 {err:.3e}", case.name);
                assert!(
                    err <= TOLERANCE,
                    "{}: {layout} rank {rank}: relative L2 {err:.3e} > {TOLERANCE}",
                    case.name
                );
                assert_eq!(
                    bits(first)?,
                    bits(second)?,
                    "{layout} rank {rank}: second forward differs"
                );
                assert_eq!(
                    bits(first)?,
                    bits(&again[rank].0)?,
                    "{layout} rank {rank}: second job differs"
                );
                assert_eq!(
                    bits(first)?,
                    reference,
                    "{layout}: rank {rank} differs from rank 0"
                );
            }
            ran += 1;
        }
        Ok(ran)
    }

    /// `layouts` on every fixture (wan-tiny and wan-wide must be among them and run all of
    /// them) and on a seeded model whose 9 tokens divide by neither 2 nor 4.
    fn run_all(layouts: &[Layout]) -> TestResult {
        let tmp = tempfile::tempdir()?;
        let mut cases = fixture_cases()?;
        cases.push(random_case(tmp.path(), (3, 2, 6))?);
        for case in &cases {
            let ran = check_layouts(case, layouts)?;
            println!("{}: {ran} of {} layouts ran", case.name, layouts.len());
            if matches!(case.takes, Takes::All) {
                assert_eq!(ran, layouts.len(), "{}: a layout did not run", case.name);
            }
        }
        Ok(())
    }

    #[test]
    fn tensor_parallel_matches_single_process() -> TestResult {
        run_all(&[layout(LAYOUTS[0])])
    }

    #[test]
    fn ulysses_with_padding_matches_single_process() -> TestResult {
        run_all(&[layout(LAYOUTS[1])])
    }

    #[test]
    fn ring_attention_matches_single_process() -> TestResult {
        run_all(&[layout(LAYOUTS[2])])
    }

    #[test]
    fn cfg_branches_on_different_ranks_match_single_process() -> TestResult {
        run_all(&[layout(LAYOUTS[3])])
    }

    /// tp × ulysses, ulysses × ring (USP), tp × ring and ulysses × cfg.
    #[test]
    fn combined_layouts_match_single_process() -> TestResult {
        run_all(&LAYOUTS[4..].iter().copied().map(layout).collect::<Vec<_>>())
    }

    /// One token over up to four sequence ranks: some ranks hold padding only, and whole ring
    /// blocks of padding are skipped.
    #[test]
    fn fewer_tokens_than_sequence_ranks() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let case = random_case(tmp.path(), (1, 2, 2))?;
        let layouts: Vec<Layout> = LAYOUTS.iter().copied().map(layout).collect();
        assert_eq!(check_layouts(&case, &layouts)?, layouts.len());
        Ok(())
    }

    #[test]
    fn layouts_the_model_cannot_take_are_refused_with_the_reason() -> TestResult {
        let config = Config {
            num_attention_heads: 3,
            attention_head_dim: 8,
            text_dim: 8,
            freq_dim: 16,
            ffn_dim: 24,
            num_layers: 1,
            ..Config::default()
        };
        let err = DistributedWanTransformer::new(
            &config,
            layout(LAYOUTS[0]),
            Box::new(crate::parallel::SingleRank::new()),
            seeded_var_builder(0, DType::F32, &Device::Cpu),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
        .err()
        .ok_or("tp=2 with 3 heads was accepted")?;
        assert!(
            err.contains("does not divide the 3 attention heads"),
            "{err}"
        );
        let err = DistributedWanTransformer::new(
            &config,
            layout(LAYOUTS[2]),
            Box::new(crate::parallel::SingleRank::new()),
            seeded_var_builder(0, DType::F32, &Device::Cpu),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
        .err()
        .ok_or("a 2-rank layout on a 1-rank communicator was accepted")?;
        assert!(err.contains("needs 2 ranks"), "{err}");
        Ok(())
    }

    #[test]
    fn sequence_shards_pad_the_end_and_mask_it_from_attention() {
        let tokens = 9;
        // ulysses 2 × ring 2: padded to 12, 3 tokens per rank, ring blocks of 6.
        let layout = Layout {
            cfg: 1,
            tp: 1,
            ulysses: 2,
            ring: 2,
        };
        let shards: Vec<_> = (0..4)
            .map(|rank| SequenceShard::new(tokens, &layout, rank))
            .collect();
        assert_eq!(
            shards.iter().map(|s| s.start).collect::<Vec<_>>(),
            [0, 3, 6, 9]
        );
        assert!(shards.iter().all(|s| s.local == 3 && s.ring_block == 6));
        assert_eq!((shards[0].valid_keys(0), shards[0].valid_keys(1)), (6, 3));
        // A whole block of padding contributes no keys.
        let one = SequenceShard::new(1, &layout, 0);
        assert_eq!((one.valid_keys(0), one.valid_keys(1)), (1, 0));
    }

    #[test]
    fn a_tensor_parallel_rank_loads_half_of_the_sharded_weights() -> TestResult {
        let dev = Device::Cpu;
        let dir = crate::model::reference::test_fixture_dirs()
            .into_iter()
            .find(|d| {
                Checkpoint::open(d.join("pipeline"))
                    .and_then(|c| c.component("transformer"))
                    .and_then(|c| c.config::<Config>())
                    .is_ok_and(|c| c.num_attention_heads % 2 == 0 && c.ffn_dim % 2 == 0)
            })
            .ok_or("no fixture with an even number of heads")?;
        let component = Checkpoint::open(dir.join("pipeline"))?.component("transformer")?;
        let config: Config = component.config()?;
        let all = SafetensorsWeights::open(&component.weight_files()?)?;
        let plan: ShardPlan = tensor_parallel_plan(&config, 2, 0);
        let (mut sharded, mut whole) = (0u64, 0u64);
        for name in all.names().map(str::to_string).collect::<Vec<_>>() {
            let t = all.load(&name, &dev)?;
            let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            if plan.shard_of(&name).is_some() {
                sharded += bytes;
            } else {
                whole += bytes;
            }
        }
        assert!(
            sharded > whole,
            "the block projections dominate the weights"
        );
        let tp2 = layout(LAYOUTS[0]);
        let loaded = run_ranks(2, |_, world| {
            let model = DistributedWanTransformer::load(&component, DType::F32, &dev, tp2, world)?;
            let refs = SafetensorsWeights::open_file(dir.join("cases/transformer.safetensors"))?;
            let out = model.forward(
                &refs.load("hidden_states", &dev)?,
                &refs.load("timestep", &dev)?,
                &refs.load("encoder_hidden_states", &dev)?,
            )?;
            let err = relative_l2(&out, &refs.load("output", &dev)?)?;
            Ok((model.loaded_weight_bytes(), err))
        })?;
        for (rank, (bytes, err)) in loaded.into_iter().enumerate() {
            let bytes = bytes.ok_or("load did not count bytes")?;
            let own_sharded = bytes - whole;
            println!(
                "tp=2 rank {rank}: {bytes} of {} weight bytes; sharded part {own_sharded} of \
                 {sharded} ({:.3}); output vs reference {err:.3e}",
                sharded + whole,
                own_sharded as f64 / sharded as f64
            );
            assert_eq!(own_sharded * 2, sharded, "rank {rank}");
            assert!(err <= TOLERANCE, "rank {rank}: {err:.3e}");
        }
        Ok(())
    }
}
