//! Frame replacement: the flow model of a render whose first latent frames are known (the end
//! of a clip it extends). Those frames are held on the straight path from their initial noise
//! to the known latents, so at every step they are the known latents noised to the step's
//! level, and the model's other frames see them as context.
//!
//! Under flow matching a latent at noise level σ is `(1 − σ)·z + σ·ε`; its flow is `ε − z`
//! whatever σ. Predicting exactly that flow on the known frames keeps them on the path under
//! any of our samplers (Euler's step is linear in it; UniPC's data prediction `x − σ·v` is then
//! `z` at every step, so its multistep corrections vanish), without the wrapper knowing the
//! schedule. The frames start at their own initial noise `ε` and end at `z`.

use candle_core::{DType, Result, Tensor};

use super::render::{FlowModel, GroupExchange};

/// `inner` with the flow of latent frames `0..k` replaced by `ε − z` (`noise` `ε` and
/// `known` `z`, each f32 `(1, C, k, H, W)`).
pub struct HeldFrames<'a> {
    inner: &'a dyn FlowModel,
    /// `ε − z`, f32 `(1, C, k, H, W)`.
    flow: Tensor,
}

impl<'a> HeldFrames<'a> {
    pub fn new(inner: &'a dyn FlowModel, known: &Tensor, noise: &Tensor) -> Result<Self> {
        if known.dims() != noise.dims() {
            candle_core::bail!(
                "held frames: known latents {:?} and their noise {:?} differ in shape",
                known.dims(),
                noise.dims()
            );
        }
        let flow = (noise.to_dtype(DType::F32)? - known.to_dtype(DType::F32)?)?;
        Ok(Self { inner, flow })
    }

    /// Latent frames held.
    pub fn frames(&self) -> usize {
        self.flow.dim(2).unwrap_or(0)
    }
}

impl FlowModel for HeldFrames<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let predicted = self.inner.predict(x, t, context)?;
        let (batch, _, frames, _, _) = predicted.dims5()?;
        let held = self.frames();
        if held > frames {
            candle_core::bail!("held frames: {held} known latent frames in a clip of {frames}");
        }
        let flow = self
            .flow
            .to_dtype(predicted.dtype())?
            .repeat((batch, 1, 1, 1, 1))?;
        let rest = predicted.narrow(2, held, frames - held)?;
        Tensor::cat(&[&flow, &rest], 2)
    }

    fn check_final_latents(&self, latents: &Tensor) -> Result<()> {
        self.inner.check_final_latents(latents)
    }

    fn group_exchange(&self) -> GroupExchange {
        self.inner.group_exchange()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::denoiser::{Conditioning, Denoiser};
    use crate::model::scheduler::{self, SchedulerKind};

    /// A flow of each element on its own, anything but the held path.
    struct Drift;

    impl FlowModel for Drift {
        fn predict(&self, x: &Tensor, _t: &Tensor, _context: &Tensor) -> Result<Tensor> {
            x.affine(1.0, -0.5)
        }
    }

    #[test]
    fn held_frames_follow_the_noised_path_to_the_known_latents() -> crate::model::render::Result<()>
    {
        let device = Device::Cpu;
        let shape = (1, 2, 5, 3, 4);
        let noise = Tensor::randn(0f32, 1.0, shape, &device)?;
        let known = Tensor::randn(0f32, 1.0, (1, 2, 2, 3, 4), &device)?;
        let context = Tensor::zeros((1, 3, 8), DType::F32, &device)?;
        let conditioning = Conditioning::new(&context, &context, 1.0)?;
        let held = HeldFrames::new(&Drift, &known, &noise.narrow(2, 0, 2)?)?;
        for kind in [SchedulerKind::UniPc, SchedulerKind::Euler] {
            let config = serde_json::json!({
                "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                "prediction_type": "flow_prediction", "use_flow_sigmas": true,
                "flow_shift": 3.0, "solver_order": 2, "predict_x0": true,
                "lower_order_final": true, "final_sigmas_type": "zero",
            });
            let scheduler = scheduler::build(&config, Some(kind), 8, None)?;
            let sigmas = scheduler.sigmas().to_vec();
            let mut denoiser = Denoiser::new(scheduler, noise.clone(), DType::F32)?;
            while !denoiser.is_done() {
                denoiser.step(&held, &conditioning)?;
                let sigma = sigmas[denoiser.step_index()];
                let expected = ((&known * (1.0 - sigma))? + (noise.narrow(2, 0, 2)? * sigma)?)?;
                let got = denoiser.latents().narrow(2, 0, 2)?;
                let error = (got - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(error < 1e-5, "{kind:?} σ {sigma}: off the path by {error}");
            }
            // the other frames went where the model alone takes them (it works frame by frame)
            let mut alone = Denoiser::new(
                scheduler::build(&config, Some(kind), 8, None)?,
                noise.clone(),
                DType::F32,
            )?;
            while !alone.is_done() {
                alone.step(&Drift, &conditioning)?;
            }
            let free = denoiser.latents().narrow(2, 2, 3)?;
            let expected = alone.latents().narrow(2, 2, 3)?;
            let error = (free - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(error, 0.0, "{kind:?}");
        }
        Ok(())
    }
}
