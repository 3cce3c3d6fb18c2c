//! Co-denoising a long clip as overlapping windows, in one process: the reference every
//! distributed run of a window plan is tested against.
//!
//! [`WindowedFlow`] is a [`FlowModel`] over the whole clip's latents. Each step it runs the
//! wrapped model (one process, or the ranks of a layout) on every window of the
//! [`WindowPlan`] in order, weights each window's flow with the plan's fusion weights, and sums
//! the weighted flows on every latent frame in window order. The denoising loop then takes one
//! scheduler step over the whole clip, so a frame shared by two windows holds one value and the
//! scheduler's history (UniPC's earlier model outputs) is the fused one too: the solver is
//! elementwise, so stepping the whole clip equals stepping each window's frames.
//!
//! With a prompt timeline each window has its own text conditioning
//! ([`WindowedFlow::with_window_conditioning`]); the overlap of two windows with different
//! prompts is then the fusion of the two prompts' flows.

use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use longtake_proto::spec::WindowPlan;

use super::denoiser::Conditioning;
use super::render::{FlowModel, GroupExchange};
use crate::parallel::comm::Communicator;

/// The flow of a long clip, fused from the flows of its windows.
pub struct WindowedFlow<'a> {
    model: &'a dyn FlowModel,
    plan: &'a WindowPlan,
    /// Per window: its fusion weights as `(1, 1, len, 1, 1)` f32.
    weights: Vec<Tensor>,
    /// The clip cut where any window starts or ends: on each piece the same windows overlap.
    pieces: Vec<(usize, usize)>,
    /// Per window, its own text context in place of the one the denoiser passes (a prompt
    /// timeline); `None`: every window the denoiser's.
    contexts: Option<Vec<Tensor>>,
}

impl<'a> WindowedFlow<'a> {
    pub fn new(
        model: &'a dyn FlowModel,
        plan: &'a WindowPlan,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let weights = (0..plan.windows().len())
            .map(|i| {
                let w = plan.weights(i);
                Tensor::from_slice(w, (1, 1, w.len(), 1, 1), device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut cuts: Vec<usize> = plan
            .windows()
            .iter()
            .flat_map(|w| [w.start, w.start + w.len])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let pieces = cuts.windows(2).map(|c| (c[0], c[1])).collect();
        Ok(Self {
            model,
            plan,
            weights,
            pieces,
            contexts: None,
        })
    }

    /// Each window conditioned on its own entry of `per_window` (one per window of the plan,
    /// all guided alike) instead of the denoiser's conditioning.
    pub fn with_window_conditioning(
        mut self,
        per_window: &[Conditioning],
    ) -> candle_core::Result<Self> {
        if per_window.len() != self.plan.windows().len() {
            candle_core::bail!(
                "{} conditionings for a plan of {} windows",
                per_window.len(),
                self.plan.windows().len()
            );
        }
        self.contexts = Some(per_window.iter().map(|c| c.context().clone()).collect());
        Ok(self)
    }

    /// The weighted flows of `windows` (indices into the plan, ascending; `weighted[k]` is
    /// window `windows[k]`'s) summed on each latent frame of `region` in window order, starting
    /// from `start` (the sum so far of earlier windows on `region`, e.g. a neighbouring group's)
    /// where given. Every frame's sum is taken in window order whatever the caller, so a frame
    /// gets the same bits in one process and split across groups.
    fn accumulate(
        &self,
        region: Range<usize>,
        windows: &[usize],
        weighted: &[Tensor],
        start: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let plan_windows = self.plan.windows();
        let mut parts = Vec::new();
        for &(a, b) in &self.pieces {
            let (a, b) = (a.max(region.start), b.min(region.end));
            if a >= b {
                continue;
            }
            let mut sum = match start {
                Some(s) => Some(s.narrow(2, a - region.start, b - a)?),
                None => None,
            };
            for (&i, flow) in windows.iter().zip(weighted) {
                let w = plan_windows[i];
                if w.start <= a && b <= w.start + w.len {
                    let part = flow.narrow(2, a - w.start, b - a)?;
                    sum = Some(match sum {
                        None => part,
                        Some(s) => (s + part)?,
                    });
                }
            }
            let sum = sum.ok_or_else(|| {
                candle_core::Error::Msg(format!("latent frames {a}..{b} are in no window"))
            })?;
            parts.push(sum);
        }
        Tensor::cat(&parts, 2)?.contiguous()
    }

    /// Window `index`'s flow on `x` (the latents of frames `offset..`), weighted.
    fn weighted_flow(
        &self,
        index: usize,
        x: &Tensor,
        offset: usize,
        t: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let w = self.plan.windows()[index];
        let _span = longtake_proto::telemetry::window_span(w.start, w.len).entered();
        let context = self.contexts.as_ref().map_or(context, |c| &c[index]);
        let window = x.narrow(2, w.start - offset, w.len)?.contiguous()?;
        let flow = self
            .model
            .predict_frames(&window, t, context, w.start..w.start + w.len)?
            .to_dtype(DType::F32)?;
        flow.broadcast_mul(&self.weights[index])
    }
}

impl FlowModel for WindowedFlow<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let frames = x.dim(2)?;
        if frames != self.plan.latent_frames() {
            candle_core::bail!(
                "the window plan covers {} latent frames, the latents have {frames}",
                self.plan.latent_frames()
            );
        }
        let all: Vec<usize> = (0..self.plan.windows().len()).collect();
        let weighted = all
            .iter()
            .map(|&i| self.weighted_flow(i, x, 0, t, context))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.accumulate(0..frames, &all, &weighted, None)
    }

    fn check_final_latents(&self, latents: &Tensor) -> candle_core::Result<()> {
        self.model.check_final_latents(latents)
    }
}

/// Where one rank's worker group sits in a job of several: the job's communicator (every rank
/// of every group; group `g`'s ranks are `g · size .. (g + 1) · size`) through which it reaches
/// the rank in the same place of the neighbouring groups.
pub struct GroupPeers<'a> {
    pub job: &'a dyn Communicator,
    /// This rank's group.
    pub group: usize,
    /// Ranks per group (the job's layout's world size).
    pub size: usize,
}

impl GroupPeers<'_> {
    /// The rank of group `group` in the same place as this rank in its own group.
    pub fn peer(&self, group: usize) -> usize {
        group * self.size + self.job.rank() % self.size
    }
}

/// One group's share of a co-denoised clip: a [`FlowModel`] over the latents of the group's
/// frames ([`WindowPlan::group_frames`]). Each step it predicts its own windows, then settles
/// the frames it shares with its neighbours peer to peer: it sends its partial sum on the frames
/// shared with the next group, receives the previous group's partial sum on the frames they
/// share, adds its own windows to it (window order, as the single process does) and sends the
/// total back, and receives the next group's total. So the only bytes between groups are the
/// shared frames' flows, each way, and every frame gets the single-process reference's bits.
pub struct GroupWindowedFlow<'a> {
    fused: WindowedFlow<'a>,
    peers: GroupPeers<'a>,
    /// What this rank exchanged with other groups in its last step.
    exchanged: std::sync::Mutex<GroupExchange>,
}

impl<'a> GroupWindowedFlow<'a> {
    pub fn new(
        model: &'a dyn FlowModel,
        plan: &'a WindowPlan,
        peers: GroupPeers<'a>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if peers.group >= plan.group_count() {
            candle_core::bail!(
                "group {} of a plan with {} groups",
                peers.group,
                plan.group_count()
            );
        }
        Ok(Self {
            fused: WindowedFlow::new(model, plan, device)?,
            peers,
            exchanged: Default::default(),
        })
    }

    /// See [`WindowedFlow::with_window_conditioning`].
    pub fn with_window_conditioning(
        mut self,
        per_window: &[Conditioning],
    ) -> candle_core::Result<Self> {
        self.fused = self.fused.with_window_conditioning(per_window)?;
        Ok(self)
    }

    /// Sends `tensor` to this rank's peer in `group`, counted in `exchange`.
    fn send(
        &self,
        tensor: &Tensor,
        group: usize,
        exchange: &mut GroupExchange,
    ) -> candle_core::Result<()> {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        let _span = longtake_proto::telemetry::exchange_span("send", group, Some(bytes)).entered();
        let start = Instant::now();
        self.peers.job.send(tensor, self.peers.peer(group))?;
        exchange.time += start.elapsed();
        exchange.bytes += (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        Ok(())
    }

    /// Receives from this rank's peer in `group`, the wait counted in `exchange`.
    fn recv(
        &self,
        group: usize,
        device: &Device,
        exchange: &mut GroupExchange,
    ) -> candle_core::Result<Tensor> {
        let span = longtake_proto::telemetry::exchange_span("recv", group, None);
        let _entered = span.enter();
        let start = Instant::now();
        let tensor = self.peers.job.recv(self.peers.peer(group), device)?;
        span.record(
            "bytes",
            tensor.elem_count() * tensor.dtype().size_in_bytes(),
        );
        exchange.time += start.elapsed();
        Ok(tensor)
    }
}

impl FlowModel for GroupWindowedFlow<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let plan = self.fused.plan;
        let g = self.peers.group;
        let frames = plan.group_frames(g);
        if x.dim(2)? != frames.len() {
            candle_core::bail!(
                "group {g} holds latent frames {frames:?}, the latents have {}",
                x.dim(2)?
            );
        }
        let windows: Vec<usize> = plan.group_windows(g).collect();
        let weighted = windows
            .iter()
            .map(|&i| self.fused.weighted_flow(i, x, frames.start, t, context))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let device = x.device();
        let before = match g {
            0 => frames.start..frames.start,
            _ => plan.shared_with_next(g - 1),
        };
        let after = plan.shared_with_next(g);
        let mut exchange = GroupExchange::default();
        // 1. our partial sum on what we share with the next group
        if !after.is_empty() {
            let partial = self
                .fused
                .accumulate(after.clone(), &windows, &weighted, None)?;
            self.send(&partial, g + 1, &mut exchange)?;
        }
        // 2. the previous group's partial sum on what we share, our windows added, sent back
        let head = if before.is_empty() {
            None
        } else {
            let theirs = self.recv(g - 1, device, &mut exchange)?;
            let total =
                self.fused
                    .accumulate(before.clone(), &windows, &weighted, Some(&theirs))?;
            self.send(&total, g - 1, &mut exchange)?;
            Some(total)
        };
        // 3. the frames only we hold, then the next group's totals on what we share
        let middle_end = if after.is_empty() {
            frames.end
        } else {
            after.start
        };
        let middle = before.end.max(frames.start)..middle_end;
        let mut parts: Vec<Tensor> = head.into_iter().collect();
        if !middle.is_empty() {
            parts.push(self.fused.accumulate(middle, &windows, &weighted, None)?);
        }
        if !after.is_empty() {
            parts.push(self.recv(g + 1, device, &mut exchange)?);
        }
        *self
            .exchanged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = exchange;
        Tensor::cat(&parts, 2)
    }

    fn check_final_latents(&self, latents: &Tensor) -> candle_core::Result<()> {
        self.fused.model.check_final_latents(latents)
    }

    fn group_exchange(&self) -> GroupExchange {
        *self
            .exchanged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longtake_proto::spec::{Fusion, WindowSettings};
    use std::cell::RefCell;

    /// A flow model whose output for each latent frame is a known function of its input and of
    /// its position inside the window, recording the windows it was asked for.
    struct Probe {
        calls: RefCell<Vec<usize>>,
    }

    impl FlowModel for Probe {
        fn predict(&self, x: &Tensor, _t: &Tensor, _c: &Tensor) -> candle_core::Result<Tensor> {
            let len = x.dim(2)?;
            self.calls.borrow_mut().push(len);
            // input + position in the window: two windows disagree on every shared frame
            let pos: Vec<f32> = (0..len).map(|j| j as f32).collect();
            let pos = Tensor::from_slice(&pos, (1, 1, len, 1, 1), x.device())?;
            x.broadcast_add(&pos)
        }
    }

    fn plan(total: u32, fusion: Fusion) -> WindowPlan {
        WindowPlan::new(
            total,
            WindowSettings {
                latent_frames: 9,
                overlap: 3,
                fusion,
                groups: 1,
                noise: Default::default(),
            },
        )
        .unwrap()
    }

    #[test]
    fn shared_frames_take_the_weighted_sum_of_their_windows_predictions() -> candle_core::Result<()>
    {
        let device = Device::Cpu;
        let plan = plan(15, Fusion::Linear);
        assert_eq!(plan.windows().len(), 2);
        let probe = Probe {
            calls: RefCell::new(vec![]),
        };
        let flow = WindowedFlow::new(&probe, &plan, &device)?;
        let x = Tensor::zeros((2, 4, 15, 2, 2), DType::F32, &device)?;
        let t = Tensor::zeros(2, DType::F32, &device)?;
        let out = flow.predict(&x, &t, &t)?;
        assert_eq!(out.dims(), &[2, 4, 15, 2, 2]);
        assert_eq!(*probe.calls.borrow(), vec![9, 9]);
        let per_frame: Vec<f32> = out
            .get(0)?
            .get(0)?
            .flatten_from(1)?
            .narrow(1, 0, 1)?
            .flatten_all()?
            .to_vec1()?;
        // window 0 covers 0..9 (positions 0..9), window 1 covers 6..15 (positions 0..9); on
        // frames 6, 7, 8 window 0 weighs 0.75, 0.5, 0.25
        let want: Vec<f32> = (0..15)
            .map(|f| match f {
                0..=5 => f as f32,
                6 => 0.75 * 6.0 + 0.25 * 0.0,
                7 => 0.5 * 7.0 + 0.5 * 1.0,
                8 => 0.25 * 8.0 + 0.75 * 2.0,
                _ => (f - 6) as f32,
            })
            .collect();
        assert_eq!(per_frame, want);
        Ok(())
    }

    #[test]
    fn every_frame_is_covered_and_the_fusion_is_deterministic() -> candle_core::Result<()> {
        let device = Device::Cpu;
        for fusion in Fusion::ALL {
            let plan = plan(61, fusion);
            let probe = Probe {
                calls: RefCell::new(vec![]),
            };
            let flow = WindowedFlow::new(&probe, &plan, &device)?;
            let x = Tensor::randn(0f32, 1.0, (1, 2, 61, 2, 2), &device)?;
            let t = Tensor::zeros(1, DType::F32, &device)?;
            let a = flow.predict(&x, &t, &t)?;
            let b = flow.predict(&x, &t, &t)?;
            let diff = (a.clone() - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
            // the fused flow minus the input is a weighted mean of positions: within 0..9
            let pos = (a - &x)?;
            let (lo, hi) = (
                pos.min_all()?.to_scalar::<f32>()?,
                pos.max_all()?.to_scalar::<f32>()?,
            );
            assert!(lo > -1e-4 && hi < 8.0 + 1e-4, "{lo} {hi}");
        }
        let probe = Probe {
            calls: RefCell::new(vec![]),
        };
        let plan = plan(61, Fusion::Linear);
        let flow = WindowedFlow::new(&probe, &plan, &device)?;
        let x = Tensor::zeros((1, 2, 60, 2, 2), DType::F32, &device)?;
        let t = Tensor::zeros(1, DType::F32, &device)?;
        let e = flow.predict(&x, &t, &t).unwrap_err().to_string();
        assert!(
            e.contains("covers 61 latent frames, the latents have 60"),
            "{e}"
        );
        Ok(())
    }
}
