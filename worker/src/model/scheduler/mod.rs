//! Samplers that turn the transformer's flow predictions into the next latent: diffusers'
//! `UniPCMultistepScheduler` (what Wan ships) and `FlowMatchEulerDiscreteScheduler`, behind one
//! small [`Scheduler`] trait, plus [`build`], which makes either one from a checkpoint's
//! `scheduler/scheduler_config.json`. A scheduler's state between steps can be taken out and put
//! back ([`SchedulerState`], see `state.rs`) so that a render can stop and resume mid-schedule.
//!
//! Both follow the diffusers implementation step for step, so that a render reproduces the
//! reference pipeline. Configuration options that diffusers supports but this port does not are
//! rejected with an error naming the option: a scheduler that silently ignores an option would
//! produce plausible-looking but wrong videos.

pub mod euler;
pub mod state;
pub mod unipc;

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use euler::{EulerConfig, FlowMatchEulerDiscreteScheduler};
pub use state::{SchedulerState, StateError};
pub use unipc::{UniPCMultistepScheduler, UniPcConfig, UniPcState};

/// Which sampler to run (the job spec's type: names are parsed there). `build` reads the default
/// from the config's `_class_name`.
pub use longtake_proto::spec::SchedulerKind;

/// What can be wrong with a scheduler configuration.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler_config.json: {}{source}", option.as_ref().map(|o| format!("`{o}`: ")).unwrap_or_default())]
    Json {
        /// The field at fault, where it could be found.
        option: Option<String>,
        source: serde_json::Error,
    },
    #[error("scheduler_config.json: `_class_name` is {0:?}; supported are UniPCMultistepScheduler and FlowMatchEulerDiscreteScheduler (or pick one explicitly)")]
    UnknownClass(String),
    #[error("scheduler_config.json: `_class_name` is missing; pick the scheduler explicitly")]
    MissingClass,
    #[error("{scheduler}: `{option}` = {value} is not supported: {why}")]
    Unsupported {
        scheduler: &'static str,
        option: &'static str,
        value: String,
        why: String,
    },
    #[error("the number of inference steps must be at least 1")]
    NoSteps,
}

/// A sampler driven one step per timestep, in order.
///
/// The pipeline feeds the model `timesteps()[i]` and then calls `step` with the model's output
/// and the current latent; `step_index()` counts the steps taken so far.
pub trait Scheduler: Send {
    /// The timesteps given to the model, one per step, in the model's 0..num_train_timesteps
    /// scale.
    fn timesteps(&self) -> &[f64];
    /// The noise levels: one per step plus the final one (`timesteps().len() + 1` values).
    fn sigmas(&self) -> &[f64];
    /// Advances `sample` by one step given the model's prediction at the current timestep.
    /// Computes in f32 (f64 stays f64) and returns the sample's dtype.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor>;
    /// How many steps have been taken.
    fn step_index(&self) -> usize;
    /// Everything needed to continue this schedule later, in this process or another (cheap:
    /// tensors are shared, not copied).
    fn state(&self) -> SchedulerState;
    /// Continues from `state`, as saved by [`Scheduler::state`] of a scheduler of the same class,
    /// configuration and number of steps; anything else is an error naming the difference, and
    /// leaves this scheduler as it was.
    fn restore(&mut self, state: &SchedulerState) -> Result<(), StateError>;
}

/// Makes the scheduler described by `config` (the parsed `scheduler_config.json`) for
/// `num_inference_steps` steps.
///
/// `kind` overrides the file's `_class_name`; the other scheduler's configuration is then
/// derived from the fields both share (`num_train_timesteps` and the shift, `flow_shift` for
/// UniPC and `shift` for Euler), the rest keeping diffusers' defaults for a flow-matching model.
/// `shift` overrides the file's shift.
pub fn build(
    config: &Value,
    kind: Option<SchedulerKind>,
    num_inference_steps: usize,
    shift: Option<f64>,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let file_kind = match config.get("_class_name") {
        None | Some(Value::Null) => Err(SchedulerError::MissingClass),
        Some(Value::String(name)) => SchedulerKind::from_class_name(name)
            .ok_or_else(|| SchedulerError::UnknownClass(name.clone())),
        Some(other) => Err(SchedulerError::UnknownClass(other.to_string())),
    };
    // An unknown or missing class in the file only matters when the file's own class is wanted.
    let same_class = matches!((&file_kind, kind), (Ok(f), Some(k)) if *f == k);
    let (kind, same_class) = match kind {
        Some(kind) => (kind, same_class),
        None => (file_kind?, true),
    };

    match kind {
        SchedulerKind::UniPc => {
            let mut cfg: UniPcConfig = if same_class {
                parse(config)?
            } else {
                UniPcConfig::flow_matching(
                    shared_train_timesteps(config)?,
                    shared_shift(config, "shift")?,
                )
            };
            if let Some(shift) = shift {
                cfg.flow_shift = shift;
            }
            Ok(Box::new(UniPCMultistepScheduler::new(
                cfg,
                num_inference_steps,
            )?))
        }
        SchedulerKind::Euler => {
            let mut cfg: EulerConfig = if same_class {
                parse(config)?
            } else {
                EulerConfig {
                    num_train_timesteps: shared_train_timesteps(config)?,
                    shift: shared_shift(config, "flow_shift")?,
                    ..EulerConfig::default()
                }
            };
            if let Some(shift) = shift {
                cfg.shift = shift;
            }
            Ok(Box::new(FlowMatchEulerDiscreteScheduler::new(
                cfg,
                num_inference_steps,
            )?))
        }
    }
}

/// Deserialises a scheduler config; on failure, finds the field at fault so that the error
/// names it (serde_json's own message does not).
fn parse<T: DeserializeOwned>(config: &Value) -> Result<T, SchedulerError> {
    serde_json::from_value(config.clone()).map_err(|source| {
        let option = config.as_object().and_then(|fields| {
            fields
                .iter()
                .find(|(k, v)| {
                    let mut alone = serde_json::Map::new();
                    alone.insert((*k).clone(), (*v).clone());
                    serde_json::from_value::<T>(Value::Object(alone)).is_err()
                })
                .map(|(k, _)| k.clone())
        });
        SchedulerError::Json { option, source }
    })
}

/// `num_train_timesteps` of another scheduler's config (diffusers' default 1000 when absent).
fn shared_train_timesteps(config: &Value) -> Result<usize, SchedulerError> {
    match config.get("num_train_timesteps") {
        None | Some(Value::Null) => Ok(1000),
        Some(v) => serde_json::from_value(v.clone()).map_err(|source| SchedulerError::Json {
            option: Some("num_train_timesteps".into()),
            source,
        }),
    }
}

/// The shift of another scheduler's config, stored under `key` there (1.0, no shift, when
/// absent, as in diffusers).
fn shared_shift(config: &Value, key: &str) -> Result<f64, SchedulerError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(1.0),
        Some(v) => serde_json::from_value(v.clone()).map_err(|source| SchedulerError::Json {
            option: Some(key.to_string()),
            source,
        }),
    }
}

/// The dtype the update arithmetic runs in: f32, as diffusers upcasts, unless the sample is
/// already f64.
fn compute_dtype(sample: &Tensor) -> DType {
    if sample.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `Σ cᵢ·tᵢ` over tensors of one shape, skipping zero coefficients. Each update of both
/// schedulers is such a combination, so folding the scalar algebra into the coefficients first
/// keeps the tensor work to one scale-and-add per operand.
fn linear_combination(terms: &[(f64, &Tensor)]) -> candle_core::Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(coef, t) in terms {
        if coef == 0.0 {
            continue;
        }
        let scaled = if coef == 1.0 {
            t.clone()
        } else {
            t.affine(coef, 0.0)?
        };
        acc = Some(match acc {
            None => scaled,
            Some(a) => (a + scaled)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => terms
            .first()
            .map(|(_, t)| t.zeros_like())
            .unwrap_or_else(|| candle_core::bail!("linear_combination of no terms")),
    }
}

/// Checks a diffusers flag that this port does not implement is off.
fn reject_flag(
    scheduler: &'static str,
    option: &'static str,
    set: bool,
    why: &str,
) -> Result<(), SchedulerError> {
    if set {
        return Err(SchedulerError::Unsupported {
            scheduler,
            option,
            value: "true".into(),
            why: why.into(),
        });
    }
    Ok(())
}

/// The sigma-schedule options of diffusers' flow schedulers that this port does not implement:
/// the Karras, exponential and beta schedules (rejected with `schedule_why`) and
/// resolution-dependent shifting (the config's fixed shift is named `shift_option`).
fn reject_sigma_schedules(
    scheduler: &'static str,
    schedule_why: &str,
    [karras, exponential, beta]: [bool; 3],
    dynamic_shifting: bool,
    shift_option: &str,
) -> Result<(), SchedulerError> {
    reject_flag(scheduler, "use_karras_sigmas", karras, schedule_why)?;
    reject_flag(
        scheduler,
        "use_exponential_sigmas",
        exponential,
        schedule_why,
    )?;
    reject_flag(scheduler, "use_beta_sigmas", beta, schedule_why)?;
    reject_flag(
        scheduler,
        "use_dynamic_shifting",
        dynamic_shifting,
        &format!("resolution-dependent shifting is not implemented; set {shift_option} instead"),
    )
}

/// The checks both flow-matching schedulers make of their shared options: the shift (named
/// `shift_option` in the scheduler's config), the terminal shift and the training timesteps.
pub(crate) fn check_flow_shift(
    scheduler: &'static str,
    shift_option: &'static str,
    shift: f64,
    shift_terminal: Option<f64>,
    num_train_timesteps: usize,
) -> Result<(), SchedulerError> {
    let unsupported = |option, value: String, why: &str| SchedulerError::Unsupported {
        scheduler,
        option,
        value,
        why: why.into(),
    };
    if !(shift.is_finite() && shift > 0.0) {
        return Err(unsupported(
            shift_option,
            shift.to_string(),
            "must be a positive number",
        ));
    }
    if let Some(t) = shift_terminal {
        if !(t.is_finite() && t < 1.0) {
            return Err(unsupported(
                "shift_terminal",
                t.to_string(),
                "must be below 1",
            ));
        }
    }
    if num_train_timesteps == 0 {
        return Err(unsupported(
            "num_train_timesteps",
            "0".into(),
            "must be positive",
        ));
    }
    Ok(())
}

/// diffusers' `stretch_shift_to_terminal`: rescales `1 − σ` so that the last sigma becomes
/// `terminal`.
fn stretch_to_terminal(sigmas: &mut [f64], terminal: f64) {
    if let Some(&last) = sigmas.last() {
        let scale = (1.0 - last) / (1.0 - terminal);
        for s in sigmas.iter_mut() {
            *s = 1.0 - (1.0 - *s) / scale;
        }
    }
}

/// Rounds to f32 and back: diffusers keeps its sigma tables in float32, and matching that
/// rounding keeps our timesteps identical to the reference's.
fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compare::relative_l2;
    use crate::model::loader::SafetensorsWeights;
    use candle_core::Device;
    use serde_json::json;

    /// The steps of a scheduler fixture of `case`: how many `model_output_*` tensors it holds.
    pub(super) fn fixture_steps(fixture: &SafetensorsWeights, case: &std::path::Path) -> usize {
        let steps = fixture
            .names()
            .filter(|n| n.starts_with("model_output_"))
            .count();
        assert!(steps > 0, "{}: no model_output_* tensors", case.display());
        steps
    }

    /// Runs `s` through a scheduler fixture: its `timesteps` and `sigmas` must be the fixture's
    /// exactly and every `sample_{i}` after the fixture's `model_output_{i - 1}` within 1e-4
    /// (errors printed under `label`). Returns the last sample.
    pub(super) fn step_through_fixture(
        s: &mut impl Scheduler,
        fixture: &SafetensorsWeights,
        steps: usize,
        case: &std::path::Path,
        label: &str,
    ) -> Tensor {
        let dev = Device::Cpu;
        let load64 = |name: &str| {
            fixture
                .load(name, &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(
            s.timesteps(),
            &load64("timesteps")[..],
            "{}",
            case.display()
        );
        assert_eq!(s.sigmas(), &load64("sigmas")[..], "{}", case.display());

        let mut sample = fixture.load("sample_0", &dev).unwrap();
        for i in 0..steps {
            let mo = fixture.load(&format!("model_output_{i}"), &dev).unwrap();
            sample = s.step(&mo, &sample).unwrap();
            let reference = fixture.load(&format!("sample_{}", i + 1), &dev).unwrap();
            let err = relative_l2(&sample, &reference).unwrap();
            eprintln!(
                "{} {label} sample_{}: rel L2 {err:.3e}",
                case.display(),
                i + 1
            );
            assert!(
                err <= 1e-4,
                "{} sample_{}: rel L2 {err}",
                case.display(),
                i + 1
            );
        }
        sample
    }

    fn wan_unipc() -> Value {
        json!({
            "_class_name": "UniPCMultistepScheduler",
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": true,
            "flow_shift": 3.0,
            "num_train_timesteps": 1000,
            "solver_order": 2,
            "solver_type": "bh2",
            "final_sigmas_type": "zero",
            "some_future_option": 1
        })
    }

    #[test]
    fn builds_the_class_named_in_the_file() {
        let s = build(&wan_unipc(), None, 4, None).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 900.0, 750.0, 500.0]);
        assert_eq!(s.sigmas().len(), 5);
        let s = build(
            &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
            None,
            4,
            None,
        )
        .unwrap();
        assert_eq!(s.timesteps()[0], 1000.0);
    }

    #[test]
    fn kind_override_derives_the_shared_fields() {
        // UniPC file, Euler wanted: flow_shift becomes shift.
        let euler = build(&wan_unipc(), Some(SchedulerKind::Euler), 4, None).unwrap();
        let direct = build(
            &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
            None,
            4,
            None,
        )
        .unwrap();
        assert_eq!(euler.sigmas(), direct.sigmas());
        // Euler file, UniPC wanted: shift becomes flow_shift.
        let unipc = build(
            &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
            Some(SchedulerKind::UniPc),
            4,
            None,
        )
        .unwrap();
        let direct = build(&wan_unipc(), None, 4, None).unwrap();
        assert_eq!(unipc.sigmas(), direct.sigmas());
    }

    #[test]
    fn shift_override_changes_the_sigmas() {
        for kind in [SchedulerKind::UniPc, SchedulerKind::Euler] {
            let base = build(&wan_unipc(), Some(kind), 10, None).unwrap();
            let same = build(&wan_unipc(), Some(kind), 10, Some(3.0)).unwrap();
            let more = build(&wan_unipc(), Some(kind), 10, Some(8.0)).unwrap();
            let less = build(&wan_unipc(), Some(kind), 10, Some(1.0)).unwrap();
            assert_eq!(base.sigmas(), same.sigmas(), "{kind:?}");
            // A larger shift spends more of the schedule at high noise.
            for i in 1..10 {
                assert!(more.sigmas()[i] > base.sigmas()[i], "{kind:?} step {i}");
                assert!(less.sigmas()[i] < base.sigmas()[i], "{kind:?} step {i}");
            }
        }
        // shift 1 is the plain linear schedule.
        let plain = build(&wan_unipc(), Some(SchedulerKind::UniPc), 4, Some(1.0)).unwrap();
        assert!(
            (plain.sigmas()[1] - 0.75025).abs() < 1e-6,
            "{:?}",
            plain.sigmas()
        );
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = |cfg: Value, kind| build(&cfg, kind, 4, None).err().unwrap().to_string();
        assert!(err(json!({"_class_name": "DDIMScheduler"}), None).contains("DDIMScheduler"));
        assert!(err(json!({"shift": 3.0}), None).contains("_class_name"));
        assert!(err(
            json!({"_class_name": "UniPCMultistepScheduler", "solver_order": "two"}),
            None
        )
        .contains("`solver_order`"));
        assert!(err(
            json!({"_class_name": "UniPCMultistepScheduler", "flow_shift": "3"}),
            Some(SchedulerKind::Euler)
        )
        .contains("`flow_shift`"));
        // An unknown class does not matter when the kind is given.
        assert!(build(
            &json!({"_class_name": "DDIMScheduler"}),
            Some(SchedulerKind::Euler),
            4,
            None
        )
        .is_ok());
        assert_eq!(
            build(&wan_unipc(), None, 0, None)
                .err()
                .unwrap()
                .to_string(),
            SchedulerError::NoSteps.to_string()
        );
    }

    /// A state goes back into a scheduler of its own kind and schedule; one of another kind,
    /// length or shift, or one that was tampered with, is refused with the difference named and
    /// the scheduler left as it was.
    #[test]
    fn state_restores_only_into_its_own_schedule() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.0, 2.0], &dev)?;
        for kind in [SchedulerKind::UniPc, SchedulerKind::Euler] {
            let mut s = build(&wan_unipc(), Some(kind), 4, None).unwrap();
            let mut y = x.clone();
            for _ in 0..2 {
                y = s.step(&(&y * 0.5)?, &y)?;
            }
            let state = s.state();
            assert_eq!(state.step_index, 2);
            assert_eq!(state.class, kind.class_name());

            let mut same = build(&wan_unipc(), Some(kind), 4, None).unwrap();
            same.restore(&state).unwrap();
            assert_eq!(same.step_index(), 2);
            let (a, b) = (s.step(&y, &y)?, same.step(&y, &y)?);
            assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?, "{kind:?}");

            let refused = |mut other: Box<dyn Scheduler>, state: &SchedulerState| {
                let e = other.restore(state).unwrap_err().to_string();
                assert_eq!(other.step_index(), 0, "{kind:?}: {e}");
                e
            };
            let other_kind = match kind {
                SchedulerKind::UniPc => SchedulerKind::Euler,
                SchedulerKind::Euler => SchedulerKind::UniPc,
            };
            let e = refused(
                build(&wan_unipc(), Some(other_kind), 4, None).unwrap(),
                &state,
            );
            assert!(e.contains(other_kind.class_name()), "{e}");
            let e = refused(build(&wan_unipc(), Some(kind), 8, None).unwrap(), &state);
            assert!(e.contains("4-step") && e.contains("8 steps"), "{e}");
            let e = refused(
                build(&wan_unipc(), Some(kind), 4, Some(2.0)).unwrap(),
                &state,
            );
            assert!(e.contains("saved 3.0, here 2.0"), "{e}");

            let mut tampered = state.clone();
            tampered.tensors.insert("extra".into(), x.clone());
            let e = refused(build(&wan_unipc(), Some(kind), 4, None).unwrap(), &tampered);
            assert!(e.contains("unexpected tensor `extra`"), "{e}");
            let mut tampered = state.clone();
            tampered.step_index = 5;
            let e = refused(build(&wan_unipc(), Some(kind), 4, None).unwrap(), &tampered);
            assert!(e.contains("step 5"), "{e}");
            let mut tampered = state.clone();
            tampered.schedule_check = "0".repeat(16);
            let e = refused(build(&wan_unipc(), Some(kind), 4, None).unwrap(), &tampered);
            assert!(e.contains("sigma schedule"), "{e}");
        }
        // UniPC's own consistency: its counters and history must match its step.
        let mut s = build(&wan_unipc(), None, 4, None).unwrap();
        s.step(&x, &x)?;
        let mut tampered = s.state();
        tampered.counters.remove("this_order");
        let e = build(&wan_unipc(), None, 4, None)
            .unwrap()
            .restore(&tampered)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`this_order` is missing"), "{e}");
        let mut tampered = s.state();
        tampered.tensors.remove("last_sample");
        let e = build(&wan_unipc(), None, 4, None)
            .unwrap()
            .restore(&tampered)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit this schedule"), "{e}");
        Ok(())
    }

    #[test]
    fn linear_combination_skips_zero_terms() -> candle_core::Result<()> {
        let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
        let b = Tensor::new(&[10f32, 20.0], &Device::Cpu)?;
        let c = linear_combination(&[(2.0, &a), (0.0, &b), (1.0, &b)])?;
        assert_eq!(c.to_vec1::<f32>()?, vec![12.0, 24.0]);
        let z = linear_combination(&[(0.0, &a)])?;
        assert_eq!(z.to_vec1::<f32>()?, vec![0.0, 0.0]);
        Ok(())
    }
}
