//! diffusers' `FlowMatchEulerDiscreteScheduler`: the first-order Euler step along the predicted
//! flow velocity, `x ← x + (σ_next − σ)·v`, with the shifted sigma schedule. Its only state
//! between steps is the step index.

use candle_core::{bail, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    compute_dtype, f32_round, linear_combination, reject_flag, reject_sigma_schedules,
    stretch_to_terminal, Scheduler, SchedulerError, SchedulerState, StateError,
};

const NAME: &str = "FlowMatchEulerDiscreteScheduler";

/// `scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct EulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: String,
    pub stochastic_sampling: bool,
}

impl Default for EulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".into(),
            stochastic_sampling: false,
        }
    }
}

impl EulerConfig {
    fn validate(&self) -> Result<(), SchedulerError> {
        reject_sigma_schedules(
            NAME,
            "only the shifted linear sigma schedule is supported",
            [
                self.use_karras_sigmas,
                self.use_exponential_sigmas,
                self.use_beta_sigmas,
            ],
            self.use_dynamic_shifting,
            "shift",
        )?;
        reject_flag(
            NAME,
            "stochastic_sampling",
            self.stochastic_sampling,
            "stochastic sampling draws fresh noise each step and is not implemented",
        )?;
        let unsupported = |option, value: String, why: &str| SchedulerError::Unsupported {
            scheduler: NAME,
            option,
            value,
            why: why.into(),
        };
        if !["exponential", "linear"].contains(&self.time_shift_type.as_str()) {
            return Err(unsupported(
                "time_shift_type",
                format!("{:?}", self.time_shift_type),
                "must be \"exponential\" or \"linear\"",
            ));
        }
        super::check_flow_shift(
            NAME,
            "shift",
            self.shift,
            self.shift_terminal,
            self.num_train_timesteps,
        )?;
        Ok(())
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` (deterministic sampling).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: EulerConfig,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Steps taken so far: the only state this single-step sampler has.
    pub step_index: usize,
}

impl FlowMatchEulerDiscreteScheduler {
    /// Validates `config` and sets the schedule for `num_inference_steps` (diffusers'
    /// constructor followed by `set_timesteps`).
    pub fn new(config: EulerConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        if num_inference_steps == 0 {
            return Err(SchedulerError::NoSteps);
        }
        let n = num_inference_steps;
        let train = config.num_train_timesteps as f64;
        let shift = config.shift;
        let shifted = |s: f64| shift * s / (1.0 + (shift - 1.0) * s);

        // The constructor's float32 table of shifted sigmas bounds the schedule; its end point is
        // computed in float32 there, and matching that rounding keeps the timesteps identical.
        let shifted_f32 = |s: f32| (shift as f32 * s / (1.0 + (shift - 1.0) as f32 * s)) as f64;
        let sigma_max = shifted_f32(1.0);
        let sigma_min = shifted_f32(1.0 / train as f32);
        // diffusers shifts these already-shifted bounds once more in `set_timesteps`.
        let (t_max, t_min) = (sigma_max * train, sigma_min * train);
        let mut sigmas: Vec<f64> = (0..n)
            .map(|i| {
                if n == 1 {
                    t_max
                } else {
                    t_max + (t_min - t_max) * i as f64 / (n - 1) as f64
                }
            })
            .map(|t| shifted(t / train))
            .collect();
        if let Some(terminal) = config.shift_terminal.filter(|&t| t != 0.0) {
            stretch_to_terminal(&mut sigmas, terminal);
        }
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(f32_round).collect();
        if config.invert_sigmas {
            for s in sigmas.iter_mut() {
                *s = f32_round(1.0 - *s);
            }
        }
        // Timesteps are σ·train computed in float32, as diffusers does on its tensor.
        let timesteps = sigmas
            .iter()
            .map(|&s| (s as f32 * train as f32) as f64)
            .collect();
        sigmas.push(if config.invert_sigmas { 1.0 } else { 0.0 });
        Ok(Self {
            config,
            timesteps,
            sigmas,
            step_index: 0,
        })
    }

    pub fn config(&self) -> &EulerConfig {
        &self.config
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.step_index;
        let n = self.timesteps.len();
        if k >= n {
            bail!("FlowMatchEuler: all {n} steps have been taken");
        }
        let out_dtype = sample.dtype();
        let dtype = compute_dtype(sample);
        let dt = self.sigmas[k + 1] - self.sigmas[k];
        let prev = linear_combination(&[
            (1.0, &sample.to_dtype(dtype)?),
            (dt, &model_output.to_dtype(dtype)?),
        ])?;
        self.step_index += 1;
        prev.to_dtype(out_dtype)
    }

    fn state(&self) -> SchedulerState {
        SchedulerState::header(
            NAME,
            &self.config,
            &self.timesteps,
            &self.sigmas,
            self.step_index,
        )
    }

    fn restore(&mut self, state: &SchedulerState) -> Result<(), StateError> {
        state.check_fits(NAME, &self.config, &self.timesteps, &self.sigmas)?;
        state.only(NAME, &[], |_| false)?;
        self.step_index = state.step_index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture_steps, step_through_fixture};
    use super::*;
    use crate::model::loader::SafetensorsWeights;

    #[test]
    fn matches_reference_euler() {
        for case in crate::model::reference::test_fixture_dirs() {
            let dir = case.join("cases");
            let text =
                std::fs::read_to_string(dir.join("euler_scheduler/scheduler_config.json")).unwrap();
            let cfg: EulerConfig = serde_json::from_str(&text).unwrap();
            let fixture =
                SafetensorsWeights::open_file(dir.join("scheduler_euler.safetensors")).unwrap();
            let steps = fixture_steps(&fixture, &case);
            let mut s = FlowMatchEulerDiscreteScheduler::new(cfg, steps).unwrap();
            let sample = step_through_fixture(&mut s, &fixture, steps, &case, "euler");
            assert!(
                s.step(&sample, &sample).is_err(),
                "stepping past the end must fail"
            );
        }
    }

    #[test]
    fn single_step_and_inverted_sigmas() {
        let cfg = EulerConfig {
            shift: 3.0,
            ..EulerConfig::default()
        };
        let s = FlowMatchEulerDiscreteScheduler::new(cfg.clone(), 1).unwrap();
        assert_eq!(s.sigmas(), &[1.0, 0.0]);
        assert_eq!(s.timesteps(), &[1000.0]);
        let inv = FlowMatchEulerDiscreteScheduler::new(
            EulerConfig {
                invert_sigmas: true,
                ..cfg.clone()
            },
            4,
        )
        .unwrap();
        let plain = FlowMatchEulerDiscreteScheduler::new(cfg, 4).unwrap();
        for i in 0..4 {
            assert!((inv.sigmas()[i] - (1.0 - plain.sigmas()[i])).abs() < 1e-7);
        }
        assert_eq!(inv.sigmas()[4], 1.0);
    }

    #[test]
    fn shift_terminal_sets_the_last_sigma() {
        let cfg = EulerConfig {
            shift: 3.0,
            shift_terminal: Some(0.1),
            ..EulerConfig::default()
        };
        let s = FlowMatchEulerDiscreteScheduler::new(cfg, 8).unwrap();
        assert!((s.sigmas()[7] - 0.1).abs() < 1e-6, "{:?}", s.sigmas());
        assert!((s.sigmas()[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rejects_unsupported_options() {
        for (option, json) in [
            (
                "use_karras_sigmas",
                serde_json::json!({"use_karras_sigmas": true}),
            ),
            (
                "use_exponential_sigmas",
                serde_json::json!({"use_exponential_sigmas": true}),
            ),
            (
                "use_beta_sigmas",
                serde_json::json!({"use_beta_sigmas": true}),
            ),
            (
                "use_dynamic_shifting",
                serde_json::json!({"use_dynamic_shifting": true}),
            ),
            (
                "stochastic_sampling",
                serde_json::json!({"stochastic_sampling": true}),
            ),
            (
                "time_shift_type",
                serde_json::json!({"time_shift_type": "cubic"}),
            ),
            ("shift", serde_json::json!({"shift": 0.0})),
            ("shift_terminal", serde_json::json!({"shift_terminal": 1.0})),
        ] {
            let cfg: EulerConfig = serde_json::from_value(json).unwrap();
            let err = match FlowMatchEulerDiscreteScheduler::new(cfg, 4) {
                Ok(_) => panic!("{option} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(&format!("`{option}`")), "{option}: {err}");
        }
    }
}
