//! diffusers' `UniPCMultistepScheduler` in its flow-matching form, the sampler Wan2.1 ships:
//! `prediction_type: flow_prediction`, `use_flow_sigmas`, `flow_shift`, data (x₀) prediction,
//! the B(h) predictor (UniP) and corrector (UniC) of order 1 to 3.
//!
//! The multistep state (step index, previous converted outputs, last sample, warm-up counter)
//! lives in [`UniPcState`] with public fields so that a render can be checkpointed and resumed
//! mid-schedule; [`Scheduler::state`] and [`Scheduler::restore`] carry it in and out as a
//! [`SchedulerState`] with tensors `model_output.{i}` (oldest first) and `last_sample` and
//! counters `lower_order_nums` and `this_order`.

use candle_core::{bail, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    compute_dtype, f32_round, linear_combination, reject_flag, reject_sigma_schedules,
    stretch_to_terminal, Scheduler, SchedulerError, SchedulerState, StateError,
};

const NAME: &str = "UniPCMultistepScheduler";

/// `scheduler_config.json` of a `UniPCMultistepScheduler`. Defaults are diffusers'; fields that
/// only matter for the variance-preserving (non-flow) schedules are accepted and checked for
/// validity but otherwise unused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub beta_schedule: String,
    pub trained_betas: Option<serde_json::Value>,
    pub solver_order: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    /// Step indices whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    pub solver_p: Option<serde_json::Value>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub timestep_spacing: String,
    pub final_sigmas_type: String,
    pub use_dynamic_shifting: bool,
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: "linspace".into(),
            final_sigmas_type: "zero".into(),
            use_dynamic_shifting: false,
            shift_terminal: None,
        }
    }
}

impl UniPcConfig {
    /// The configuration Wan ships, for a model trained on `num_train_timesteps` with
    /// `flow_shift`.
    pub fn flow_matching(num_train_timesteps: usize, flow_shift: f64) -> Self {
        Self {
            num_train_timesteps,
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift,
            ..Self::default()
        }
    }

    /// Rejects everything this port does not reproduce exactly; returns whether the B(h) is
    /// `bh1` (else `bh2`).
    fn validate(&self) -> Result<bool, SchedulerError> {
        let unsupported = |option, value: String, why: &str| SchedulerError::Unsupported {
            scheduler: NAME,
            option,
            value,
            why: why.into(),
        };
        if self.prediction_type != "flow_prediction" {
            return Err(unsupported(
                "prediction_type",
                format!("{:?}", self.prediction_type),
                "only flow-matching models (\"flow_prediction\") are supported",
            ));
        }
        if !self.use_flow_sigmas {
            return Err(unsupported(
                "use_flow_sigmas",
                "false".into(),
                "flow_prediction needs the flow sigma schedule (use_flow_sigmas: true)",
            ));
        }
        reject_sigma_schedules(
            NAME,
            "only the flow sigma schedule is supported",
            [
                self.use_karras_sigmas,
                self.use_exponential_sigmas,
                self.use_beta_sigmas,
            ],
            self.use_dynamic_shifting,
            "flow_shift",
        )?;
        reject_flag(
            NAME,
            "thresholding",
            self.thresholding,
            "dynamic thresholding is for pixel-space models and is not implemented",
        )?;
        if !self.predict_x0 {
            return Err(unsupported(
                "predict_x0",
                "false".into(),
                "flow_prediction is only defined for the data-prediction (x0) form",
            ));
        }
        if let Some(p) = &self.solver_p {
            if !p.is_null() {
                return Err(unsupported(
                    "solver_p",
                    p.to_string(),
                    "an external predictor scheduler is not supported",
                ));
            }
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(unsupported(
                "solver_order",
                self.solver_order.to_string(),
                "must be 1, 2 or 3",
            ));
        }
        if !["linspace", "leading", "trailing"].contains(&self.timestep_spacing.as_str()) {
            return Err(unsupported(
                "timestep_spacing",
                format!("{:?}", self.timestep_spacing),
                "must be \"linspace\", \"leading\" or \"trailing\"",
            ));
        }
        if self.trained_betas.as_ref().is_none_or(|b| b.is_null())
            && !["linear", "scaled_linear", "squaredcos_cap_v2"]
                .contains(&self.beta_schedule.as_str())
        {
            return Err(unsupported(
                "beta_schedule",
                format!("{:?}", self.beta_schedule),
                "must be \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\"",
            ));
        }
        match self.final_sigmas_type.as_str() {
            "zero" | "sigma_min" => {}
            other => {
                return Err(unsupported(
                    "final_sigmas_type",
                    format!("{other:?}"),
                    "must be \"zero\" or \"sigma_min\"",
                ))
            }
        }
        if !self.lower_order_final && self.solver_order > 1 && self.final_sigmas_type == "zero" {
            // The last step would reach σ = 0, where λ is infinite and a multistep update divides
            // by zero (diffusers returns NaN there).
            return Err(unsupported(
                "lower_order_final",
                "false".into(),
                "with final_sigmas_type \"zero\" and solver_order > 1 the last step divides by zero; set lower_order_final: true",
            ));
        }
        super::check_flow_shift(
            NAME,
            "flow_shift",
            self.flow_shift,
            self.shift_terminal,
            self.num_train_timesteps,
        )?;
        // diffusers maps these legacy DPM-Solver names to bh2.
        match self.solver_type.as_str() {
            "bh1" => Ok(true),
            "bh2" | "midpoint" | "heun" | "logrho" => Ok(false),
            other => Err(unsupported(
                "solver_type",
                format!("{other:?}"),
                "must be \"bh1\" or \"bh2\"",
            )),
        }
    }
}

/// The multistep state between two calls of `step`, everything needed to resume a schedule.
#[derive(Debug, Clone, Default)]
pub struct UniPcState {
    /// Steps taken so far; the next step uses `sigmas[step_index]`.
    pub step_index: usize,
    /// The last `solver_order` converted model outputs (x₀ predictions), oldest first; `None`
    /// until that many steps have run.
    pub model_outputs: Vec<Option<Tensor>>,
    /// The sample the last predictor started from (after its correction), for the next
    /// corrector.
    pub last_sample: Option<Tensor>,
    /// Completed steps, saturating at `solver_order`: the warm-up limit on the order.
    pub lower_order_nums: usize,
    /// The order the last predictor used, which the next corrector repeats.
    pub this_order: usize,
}

/// diffusers' `UniPCMultistepScheduler` restricted to flow matching (see the module docs).
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    config: UniPcConfig,
    bh1: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    state: UniPcState,
}

impl UniPCMultistepScheduler {
    /// Validates `config` and sets the schedule for `num_inference_steps` (diffusers'
    /// constructor followed by `set_timesteps`).
    pub fn new(config: UniPcConfig, num_inference_steps: usize) -> Result<Self, SchedulerError> {
        let bh1 = config.validate()?;
        if num_inference_steps == 0 {
            return Err(SchedulerError::NoSteps);
        }
        let n = num_inference_steps;
        let train = config.num_train_timesteps as f64;
        // linspace(1, 1/train, n + 1) without its last point, then the shift.
        let mut sigmas: Vec<f64> = (0..n)
            .map(|i| 1.0 + (1.0 / train - 1.0) * i as f64 / n as f64)
            .map(|s| config.flow_shift * s / (1.0 + (config.flow_shift - 1.0) * s))
            .collect();
        if let Some(terminal) = config.shift_terminal.filter(|&t| t != 0.0) {
            stretch_to_terminal(&mut sigmas, terminal);
        }
        // σ = 1 exactly makes α = 0 and log α infinite in the first updates.
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        // diffusers truncates σ·train to integer timesteps.
        let timesteps = sigmas.iter().map(|s| (s * train).trunc()).collect();
        let last = match config.final_sigmas_type.as_str() {
            "sigma_min" => sigmas[n - 1],
            _ => 0.0,
        };
        sigmas.push(last);
        let sigmas = sigmas.into_iter().map(f32_round).collect();
        let state = UniPcState {
            model_outputs: vec![None; config.solver_order],
            ..UniPcState::default()
        };
        Ok(Self {
            config,
            bh1,
            timesteps,
            sigmas,
            state,
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// The multistep state itself ([`Scheduler::state`] is its saveable form).
    pub fn multistep_state(&self) -> &UniPcState {
        &self.state
    }

    /// Replaces the multistep state, e.g. with one saved from an interrupted render. The state
    /// must be one this schedule can have reached: its step within the schedule, and as many
    /// stored outputs as its warm-up counter says.
    pub fn set_state(&mut self, state: UniPcState) -> candle_core::Result<()> {
        self.check_reachable(&state).map_err(|why| {
            candle_core::Error::Msg(format!("UniPC state does not fit this schedule ({why})"))
        })?;
        self.state = state;
        Ok(())
    }

    /// Whether this schedule can have reached `state`; if not, why not.
    fn check_reachable(&self, state: &UniPcState) -> Result<(), String> {
        let order = self.config.solver_order;
        let stored = state.model_outputs.iter().filter(|m| m.is_some()).count();
        let consistent = state.model_outputs.len() == order
            && state.step_index <= self.timesteps.len()
            && state.lower_order_nums == state.step_index.min(order)
            && stored >= state.lower_order_nums
            && state.this_order <= state.lower_order_nums
            && (state.step_index == 0 || (state.this_order >= 1 && state.last_sample.is_some()));
        if !consistent {
            return Err(format!(
                "solver_order {order}, {} steps: step {}, {} of {} outputs stored, lower_order_nums {}, this_order {}",
                self.timesteps.len(),
                state.step_index,
                stored,
                state.model_outputs.len(),
                state.lower_order_nums,
                state.this_order
            ));
        }
        Ok(())
    }

    /// `(α, σ)` of the flow interpolation `x = α·x₀ + σ·ε` at sigma index `i`.
    fn alpha_sigma(&self, i: usize) -> (f64, f64) {
        let s = self.sigmas[i];
        (1.0 - s, s)
    }

    fn lambda(&self, i: usize) -> f64 {
        let (alpha, sigma) = self.alpha_sigma(i);
        alpha.ln() - sigma.ln()
    }

    /// The B(h)-dependent coefficients shared by predictor and corrector: `(h·φ₁(h), B(h), R, b)`
    /// for the given log-SNR ratios `rks` (the last one 1).
    fn bh_terms(&self, h: f64, rks: &[f64]) -> (f64, f64, Vec<Vec<f64>>, Vec<f64>) {
        // Data prediction integrates in −h.
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let order = rks.len();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, r, b)
    }

    /// The stored converted output `back` steps before the newest one.
    fn past_output(&self, back: usize) -> candle_core::Result<&Tensor> {
        let outputs = &self.state.model_outputs;
        outputs
            .len()
            .checked_sub(back + 1)
            .and_then(|i| outputs[i].as_ref())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "UniPC state lacks the output from {back} steps back"
                ))
            })
    }

    /// UniP: predicts the sample at `sigmas[step_index + 1]` from `x` at `sigmas[step_index]`.
    fn predictor(&self, x: &Tensor, order: usize) -> candle_core::Result<Tensor> {
        let k = self.state.step_index;
        let (alpha_t, sigma_t) = self.alpha_sigma(k + 1);
        let (_, sigma_s0) = self.alpha_sigma(k);
        let lambda_s0 = self.lambda(k);
        let h = self.lambda(k + 1) - lambda_s0;
        let m0 = self.past_output(0)?;

        let mut rks = Vec::with_capacity(order);
        let mut older = Vec::with_capacity(order);
        for i in 1..order {
            rks.push((self.lambda(k - i) - lambda_s0) / h);
            older.push(self.past_output(i)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.bh_terms(h, &rks);

        // x_t = σ_t/σ_s0·x − α_t·hφ₁·m0 − α_t·B(h)·Σ ρ_i·(m_i − m0)/r_i
        let mut m0_coef = -alpha_t * h_phi_1;
        let mut terms = vec![(sigma_t / sigma_s0, x)];
        if order > 1 {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let r: Vec<Vec<f64>> = r[..order - 1]
                    .iter()
                    .map(|row| row[..order - 1].to_vec())
                    .collect();
                solve(r, b[..order - 1].to_vec())?
            };
            for (i, m) in older.iter().enumerate() {
                let c = -alpha_t * b_h * rhos[i] / rks[i];
                terms.push((c, m));
                m0_coef -= c;
            }
        }
        terms.push((m0_coef, m0));
        linear_combination(&terms)
    }

    /// UniC: corrects `this_sample` (at `sigmas[step_index]`) using `model_t`, the converted
    /// output there, and the predictor's starting point `last_sample`.
    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> candle_core::Result<Tensor> {
        let k = self.state.step_index;
        let (alpha_t, sigma_t) = self.alpha_sigma(k);
        let (_, sigma_s0) = self.alpha_sigma(k - 1);
        let lambda_s0 = self.lambda(k - 1);
        let h = self.lambda(k) - lambda_s0;
        let m0 = self.past_output(0)?;

        let mut rks = Vec::with_capacity(order);
        let mut older = Vec::with_capacity(order);
        for i in 1..order {
            rks.push((self.lambda(k - (i + 1)) - lambda_s0) / h);
            older.push(self.past_output(i)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.bh_terms(h, &rks);
        let rhos = if order == 1 { vec![0.5] } else { solve(r, b)? };

        // x_t = σ_t/σ_s0·x − α_t·hφ₁·m0 − α_t·B(h)·(Σ ρ_i·(m_i − m0)/r_i + ρ_last·(model_t − m0))
        let mut m0_coef = -alpha_t * h_phi_1;
        let mut terms = vec![(sigma_t / sigma_s0, last_sample)];
        for (i, m) in older.iter().enumerate() {
            let c = -alpha_t * b_h * rhos[i] / rks[i];
            terms.push((c, m));
            m0_coef -= c;
        }
        let c_t = -alpha_t * b_h * rhos[order - 1];
        terms.push((c_t, model_t));
        m0_coef -= c_t;
        terms.push((m0_coef, m0));
        linear_combination(&terms)
    }
}

impl Scheduler for UniPCMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.state.step_index
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor> {
        // A failed step leaves the state as it was (its tensors are shared, so the copy is
        // cheap): the render can then still be saved, or the step retried.
        let before = self.state.clone();
        let result = self.step_unchecked(model_output, sample);
        if result.is_err() {
            self.state = before;
        }
        result
    }

    fn state(&self) -> SchedulerState {
        let mut state = SchedulerState::header(
            NAME,
            &self.config,
            &self.timesteps,
            &self.sigmas,
            self.state.step_index,
        );
        state.counters.extend([
            (LOWER_ORDER_NUMS.to_string(), self.state.lower_order_nums),
            (THIS_ORDER.to_string(), self.state.this_order),
        ]);
        for (i, output) in self.state.model_outputs.iter().enumerate() {
            if let Some(t) = output {
                state.tensors.insert(model_output_name(i), t.clone());
            }
        }
        if let Some(t) = &self.state.last_sample {
            state.tensors.insert(LAST_SAMPLE.into(), t.clone());
        }
        state
    }

    fn restore(&mut self, state: &SchedulerState) -> Result<(), StateError> {
        state.check_fits(NAME, &self.config, &self.timesteps, &self.sigmas)?;
        let order = self.config.solver_order;
        let outputs: Vec<String> = (0..order).map(model_output_name).collect();
        state.only(NAME, &[LOWER_ORDER_NUMS, THIS_ORDER], |name| {
            name == LAST_SAMPLE || outputs.iter().any(|o| o == name)
        })?;
        let shapes: Vec<_> = state.tensors.values().map(|t| t.dims().to_vec()).collect();
        if shapes.windows(2).any(|w| w[0] != w[1]) {
            return Err(StateError::Inconsistent {
                scheduler: NAME,
                why: format!("its tensors have different shapes: {shapes:?}"),
            });
        }
        let multistep = UniPcState {
            step_index: state.step_index,
            model_outputs: outputs
                .iter()
                .map(|name| state.tensors.get(name).cloned())
                .collect(),
            last_sample: state.tensors.get(LAST_SAMPLE).cloned(),
            lower_order_nums: state.counter(NAME, LOWER_ORDER_NUMS)?,
            this_order: state.counter(NAME, THIS_ORDER)?,
        };
        self.check_reachable(&multistep)
            .map_err(|why| StateError::Inconsistent {
                scheduler: NAME,
                why,
            })?;
        self.state = multistep;
        Ok(())
    }
}

const LOWER_ORDER_NUMS: &str = "lower_order_nums";
const THIS_ORDER: &str = "this_order";
const LAST_SAMPLE: &str = "last_sample";

/// The name of the saved converted output in slot `i` (0 the oldest).
fn model_output_name(i: usize) -> String {
    format!("model_output.{i}")
}

impl UniPCMultistepScheduler {
    /// [`Scheduler::step`] without restoring the state on failure.
    fn step_unchecked(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let k = self.state.step_index;
        let n = self.timesteps.len();
        if k >= n {
            bail!("UniPC: all {n} steps have been taken");
        }
        let out_dtype = sample.dtype();
        let dtype = compute_dtype(sample);
        let sample = sample.to_dtype(dtype)?;
        let model_output = model_output.to_dtype(dtype)?;

        // flow_prediction → x₀ = x − σ·v
        let x0 = linear_combination(&[(1.0, &sample), (-self.sigmas[k], &model_output)])?;

        let use_corrector = k > 0 && !self.config.disable_corrector.contains(&(k - 1));
        let sample = match (&self.state.last_sample, use_corrector) {
            (Some(last), true) => self.corrector(&x0, last, self.state.this_order)?,
            _ => sample,
        };

        self.state.model_outputs.remove(0);
        self.state.model_outputs.push(Some(x0));

        let order = if self.config.lower_order_final {
            self.config.solver_order.min(n - k)
        } else {
            self.config.solver_order
        };
        self.state.this_order = order.min(self.state.lower_order_nums + 1);

        let prev = self.predictor(&sample, self.state.this_order)?;
        self.state.last_sample = Some(sample);
        if self.state.lower_order_nums < self.config.solver_order {
            self.state.lower_order_nums += 1;
        }
        self.state.step_index += 1;
        prev.to_dtype(out_dtype)
    }
}

/// Solves the small dense system `a·x = b` (order ≤ 3) by Gaussian elimination with partial
/// pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> candle_core::Result<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[pivot][col] == 0.0 || !a[pivot][col].is_finite() {
            bail!("UniPC: singular coefficient system (repeated sigmas in the schedule?)");
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture_steps, step_through_fixture};
    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::SafetensorsWeights;
    use candle_core::{DType, Device};

    fn scheduler_config(case: &std::path::Path) -> UniPcConfig {
        let text =
            std::fs::read_to_string(case.join("pipeline/scheduler/scheduler_config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn matches_reference_unipc() {
        for case in crate::model::reference::test_fixture_dirs() {
            let fixture =
                SafetensorsWeights::open_file(case.join("cases/scheduler_unipc.safetensors"))
                    .unwrap();
            let steps = fixture_steps(&fixture, &case);
            let mut s = UniPCMultistepScheduler::new(scheduler_config(&case), steps).unwrap();
            let sample = step_through_fixture(&mut s, &fixture, steps, &case, "unipc");
            assert_eq!(s.step_index(), steps);
            assert!(
                s.step(&sample, &sample).is_err(),
                "stepping past the end must fail"
            );
        }
    }

    /// With the exact velocity of a straight path every order and B(h) must land on its end
    /// point; and a schedule resumed from a copied state must match the uninterrupted one.
    #[test]
    fn orders_and_state_round_trip() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.3f32, -0.7, 1.2, 0.0], &dev)?;
        let noise = Tensor::new(&[1.0f32, 0.5, -1.5, 2.0], &dev)?;
        let run = |order: usize, solver_type: &str| -> candle_core::Result<Tensor> {
            let cfg = UniPcConfig {
                solver_order: order,
                solver_type: solver_type.into(),
                ..UniPcConfig::flow_matching(1000, 3.0)
            };
            let mut s = UniPCMultistepScheduler::new(cfg, 12)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let mut x = noise.clone();
            for _ in 0..12 {
                // The exact velocity of the straight path from x0 to noise.
                let v = (&noise - &x0)?;
                x = s.step(&v, &x)?;
            }
            Ok(x)
        };
        for order in 1..=3 {
            for bh in ["bh1", "bh2"] {
                let out = run(order, bh)?;
                // With the exact velocity every solver lands on x0.
                let err = relative_l2(&out, &x0)?;
                assert!(err < 1e-5, "order {order} {bh}: rel L2 {err}");
            }
        }

        // Resuming from a copied state reproduces the uninterrupted run exactly.
        let cfg = UniPcConfig::flow_matching(1000, 5.0);
        let velocity = |i: usize| (&noise - &x0)? * (1.0 + 0.1 * i as f64);
        let mut a = UniPCMultistepScheduler::new(cfg.clone(), 6).unwrap();
        let mut b = UniPCMultistepScheduler::new(cfg, 6).unwrap();
        let (mut xa, mut xb) = (noise.clone(), noise.clone());
        for i in 0..6 {
            if i == 3 {
                b.set_state(a.multistep_state().clone())?;
                xb = xa.clone();
            }
            xa = a.step(&velocity(i)?, &xa)?;
            if i >= 3 {
                xb = b.step(&velocity(i)?, &xb)?;
            }
        }
        assert_eq!(xa.to_vec1::<f32>()?, xb.to_vec1::<f32>()?);

        // A state this schedule cannot have reached is refused.
        let mut bad = a.multistep_state().clone();
        bad.lower_order_nums = 0;
        assert!(b.set_state(bad).is_err());
        let mut bad = a.multistep_state().clone();
        bad.model_outputs.pop();
        assert!(b.set_state(bad).is_err());
        assert!(b.set_state(UniPcState::default()).is_err());
        Ok(())
    }

    /// Orders 1–3, bh1/bh2, both final sigma types and a disabled corrector, on a smooth
    /// nonlinear toy model over 7 steps, against a float64 transcription of diffusers' `step`
    /// (`testdata/unipc_toy.py`, which prints these rows). The wan-tiny fixtures cover only
    /// order 2 with bh2.
    #[test]
    fn matches_diffusers_transcription_on_all_orders() {
        let expected: &[(usize, &str, &str, bool, [f64; 4])] = &[
            (
                1,
                "bh1",
                "zero",
                false,
                [
                    0.18472554297224875,
                    -0.11493407502471417,
                    0.7587070299246453,
                    -0.0505801992040832,
                ],
            ),
            (
                1,
                "bh1",
                "zero",
                true,
                [
                    0.18605218408549437,
                    -0.11475806057828927,
                    0.7550297800442095,
                    -0.05081678965624828,
                ],
            ),
            (
                1,
                "bh1",
                "sigma_min",
                false,
                [
                    0.41635940757993295,
                    -0.20217414734681766,
                    1.0522274781520502,
                    -0.028942346699324297,
                ],
            ),
            (
                1,
                "bh1",
                "sigma_min",
                true,
                [
                    0.41818009550269863,
                    -0.2017041795972328,
                    1.0482556844331108,
                    -0.029561699788069766,
                ],
            ),
            (
                1,
                "bh2",
                "zero",
                false,
                [
                    0.19049599690361002,
                    -0.11324067876712414,
                    0.7342122584162003,
                    -0.05241433762990406,
                ],
            ),
            (
                1,
                "bh2",
                "zero",
                true,
                [
                    0.19127473941446227,
                    -0.11310564469758949,
                    0.7312790097125819,
                    -0.05258047451727374,
                ],
            ),
            (
                1,
                "bh2",
                "sigma_min",
                false,
                [
                    0.41265032355909703,
                    -0.19134532860710068,
                    1.0068749322383734,
                    -0.03662224885972673,
                ],
            ),
            (
                1,
                "bh2",
                "sigma_min",
                true,
                [
                    0.41371373933742345,
                    -0.19100441414985594,
                    1.0038527987818597,
                    -0.03703589177386775,
                ],
            ),
            (
                2,
                "bh1",
                "zero",
                false,
                [
                    0.18573604682536468,
                    -0.12424796411186274,
                    0.8206687779644091,
                    -0.04187031670258533,
                ],
            ),
            (
                2,
                "bh1",
                "zero",
                true,
                [
                    0.18658057093825764,
                    -0.12409872704951652,
                    0.8175515003581333,
                    -0.042064843346254495,
                ],
            ),
            (
                2,
                "bh1",
                "sigma_min",
                false,
                [
                    0.4029077831513556,
                    -0.19749386753951587,
                    1.0476326064104702,
                    -0.030006389308493125,
                ],
            ),
            (
                2,
                "bh1",
                "sigma_min",
                true,
                [
                    0.4041556571685204,
                    -0.19719018011569026,
                    1.0449126441060692,
                    -0.03041615434977816,
                ],
            ),
            (
                2,
                "bh2",
                "zero",
                false,
                [
                    0.1898854993599405,
                    -0.11990240170809063,
                    0.7786857925258529,
                    -0.0460649913454524,
                ],
            ),
            (
                2,
                "bh2",
                "zero",
                true,
                [
                    0.19067379147929278,
                    -0.11973167396627851,
                    0.7750162274706559,
                    -0.046267447668841444,
                ],
            ),
            (
                2,
                "bh2",
                "sigma_min",
                false,
                [
                    0.40960579710129363,
                    -0.1948871561843177,
                    1.0248505086423347,
                    -0.032791950486781796,
                ],
            ),
            (
                2,
                "bh2",
                "sigma_min",
                true,
                [
                    0.41072581401622776,
                    -0.19451426889982082,
                    1.021457725632507,
                    -0.033243055812868544,
                ],
            ),
            (
                3,
                "bh1",
                "zero",
                false,
                [
                    0.1860953954214526,
                    -0.12428696784085663,
                    0.8190223970009232,
                    -0.04180676736864896,
                ],
            ),
            (
                3,
                "bh1",
                "zero",
                true,
                [
                    0.18689693927656165,
                    -0.12414143515753488,
                    0.815712392358735,
                    -0.041999341271950874,
                ],
            ),
            (
                3,
                "bh1",
                "sigma_min",
                false,
                [
                    0.40295986481788554,
                    -0.19751919113341881,
                    1.0469016875446902,
                    -0.029905117536970803,
                ],
            ),
            (
                3,
                "bh1",
                "sigma_min",
                true,
                [
                    0.4041825497571006,
                    -0.1972165612890294,
                    1.0440691102278647,
                    -0.03031425282760595,
                ],
            ),
            (
                3,
                "bh2",
                "zero",
                false,
                [
                    0.18951012007382084,
                    -0.11985422602673307,
                    0.7795595472692367,
                    -0.0460633298117665,
                ],
            ),
            (
                3,
                "bh2",
                "zero",
                true,
                [
                    0.19026563671936816,
                    -0.11968778306248229,
                    0.7756680242543629,
                    -0.04626397431167348,
                ],
            ),
            (
                3,
                "bh2",
                "sigma_min",
                false,
                [
                    0.40899543460710736,
                    -0.1947904163231966,
                    1.025473163071939,
                    -0.0327875803612441,
                ],
            ),
            (
                3,
                "bh2",
                "sigma_min",
                true,
                [
                    0.41009534630128963,
                    -0.19441900696963643,
                    1.0219386308603526,
                    -0.033238329731787274,
                ],
            ),
        ];
        let velocity = |x: &[f64], g: f64| -> Vec<f64> {
            let var = (1.0 - g).powi(2) * 0.25 + g * g;
            x.iter()
                .map(|&xe| (g - (1.0 - g) * 0.25) / var * xe + 0.3 * (3.0 * xe + g).sin())
                .collect()
        };
        for &(order, bh, final_sigmas, disable, want) in expected {
            let cfg = UniPcConfig {
                solver_order: order,
                solver_type: bh.into(),
                final_sigmas_type: final_sigmas.into(),
                disable_corrector: if disable { vec![1] } else { vec![] },
                ..UniPcConfig::flow_matching(1000, 3.0)
            };
            let mut s = UniPCMultistepScheduler::new(cfg, 7).unwrap();
            let mut x = vec![1.0, -0.5, 2.0, 0.1];
            for i in 0..7 {
                let v = Tensor::new(velocity(&x, s.sigmas()[i]), &Device::Cpu).unwrap();
                let xt = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
                x = s.step(&v, &xt).unwrap().to_vec1::<f64>().unwrap();
            }
            for (got, want) in x.iter().zip(want) {
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "order {order} {bh} {final_sigmas} disable={disable}: {x:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn keeps_the_sample_dtype() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.0], &dev)?.to_dtype(DType::BF16)?;
        let mut s = UniPCMultistepScheduler::new(UniPcConfig::flow_matching(1000, 3.0), 3).unwrap();
        let y = s.step(&x, &x)?;
        assert_eq!(y.dtype(), DType::BF16);
        Ok(())
    }

    #[test]
    fn rejects_unsupported_options() {
        let cases: &[(&str, serde_json::Value)] = &[
            (
                "prediction_type",
                serde_json::json!({"prediction_type": "epsilon", "use_flow_sigmas": true}),
            ),
            (
                "use_flow_sigmas",
                serde_json::json!({"use_flow_sigmas": false}),
            ),
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
            ("thresholding", serde_json::json!({"thresholding": true})),
            ("predict_x0", serde_json::json!({"predict_x0": false})),
            ("solver_order", serde_json::json!({"solver_order": 4})),
            ("solver_order", serde_json::json!({"solver_order": 0})),
            ("solver_type", serde_json::json!({"solver_type": "bh3"})),
            (
                "final_sigmas_type",
                serde_json::json!({"final_sigmas_type": "one"}),
            ),
            (
                "timestep_spacing",
                serde_json::json!({"timestep_spacing": "cosine"}),
            ),
            (
                "beta_schedule",
                serde_json::json!({"beta_schedule": "quadratic"}),
            ),
            ("solver_p", serde_json::json!({"solver_p": {"x": 1}})),
            (
                "lower_order_final",
                serde_json::json!({"lower_order_final": false}),
            ),
            ("flow_shift", serde_json::json!({"flow_shift": -1.0})),
        ];
        for (option, overrides) in cases {
            let mut cfg =
                serde_json::json!({"prediction_type": "flow_prediction", "use_flow_sigmas": true});
            for (k, v) in overrides.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            let cfg: UniPcConfig = serde_json::from_value(cfg).unwrap();
            let err = match UniPCMultistepScheduler::new(cfg, 4) {
                Ok(_) => panic!("{option}: {overrides} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(&format!("`{option}`")), "{option}: {err}");
        }
        // Legacy solver names map to bh2, as in diffusers; sigma_min keeps the last sigma.
        let cfg = UniPcConfig {
            solver_type: "midpoint".into(),
            final_sigmas_type: "sigma_min".into(),
            lower_order_final: false,
            ..UniPcConfig::flow_matching(1000, 3.0)
        };
        let s = UniPCMultistepScheduler::new(cfg, 4).unwrap();
        assert!(!s.bh1);
        assert_eq!(s.sigmas()[4], s.sigmas()[3]);
    }

    #[test]
    fn solves_small_systems() {
        let x = solve(vec![vec![0.0, 2.0], vec![1.0, 1.0]], vec![4.0, 3.0]).unwrap();
        assert!(
            (x[0] - 1.0).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12,
            "{x:?}"
        );
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }
}
