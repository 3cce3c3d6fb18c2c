//! A scheduler's resumable state, [`SchedulerState`]: the tensors a multistep sampler carries
//! between steps (UniPC's past x₀ predictions and last sample) and a small JSON header that says
//! which schedule they belong to.
//!
//! The header names the scheduler class, the number of steps, the configuration and a check value
//! of the sigma schedule itself, so that restoring into a scheduler built for another kind, step
//! count or shift is an error naming the difference. Restoring such a state anyway would not
//! fail: the tensors have the right shapes, and the render would silently continue on another
//! schedule into plausible-looking garbage.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The state of a [`Scheduler`](super::Scheduler) between two steps, as returned by its `state`
/// and taken by its `restore`. The fields other than `tensors` are the JSON header; the tensors
/// are stored beside it (see [`crate::model::denoiser`] for the file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerState {
    /// The diffusers class name of the scheduler that made the state.
    pub class: String,
    /// The length of its schedule.
    pub num_inference_steps: usize,
    /// Steps taken; the next step is `timesteps[step_index]`.
    pub step_index: usize,
    /// The scheduler's configuration as `scheduler_config.json` fields (with the flow shift
    /// override applied), so that a mismatch can be named.
    pub config: serde_json::Value,
    /// FNV-1a of the timesteps' and sigmas' f64 bits: catches a different schedule whatever
    /// made it differ.
    pub schedule_check: String,
    /// The scheduler's own counters (UniPC: `lower_order_nums`, `this_order`).
    #[serde(default)]
    pub counters: BTreeMap<String, usize>,
    /// The scheduler's tensors by name (UniPC: `model_output.{i}`, oldest first, and
    /// `last_sample`); absent ones are `None` in the scheduler.
    #[serde(skip)]
    pub tensors: BTreeMap<String, Tensor>,
}

/// Why a saved state cannot be restored into a scheduler. Each names the difference.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the saved scheduler state is from a {saved}; this scheduler is a {this}")]
    Kind { saved: String, this: &'static str },
    #[error(
        "the saved scheduler state is of a {saved}-step schedule; this scheduler has {this} steps"
    )]
    Steps { saved: usize, this: usize },
    #[error("the saved scheduler state has another {scheduler} configuration: {}", differences.join("; "))]
    Config {
        scheduler: &'static str,
        /// One `` `option`: saved …, here … `` per differing option.
        differences: Vec<String>,
    },
    #[error("the saved scheduler state is of another sigma schedule (check value {saved}, this scheduler's {this})")]
    Schedule { saved: String, this: String },
    #[error("{scheduler}: the saved state does not fit this schedule: {why}")]
    Inconsistent {
        scheduler: &'static str,
        why: String,
    },
}

impl SchedulerState {
    /// A header for a scheduler of class `class` with `config`, on the schedule given by
    /// `timesteps` and `sigmas`, after `step_index` steps; no counters or tensors yet.
    pub(crate) fn header(
        class: &'static str,
        config: &impl Serialize,
        timesteps: &[f64],
        sigmas: &[f64],
        step_index: usize,
    ) -> Self {
        Self {
            class: class.into(),
            num_inference_steps: timesteps.len(),
            step_index,
            config: config_json(config),
            schedule_check: schedule_check(timesteps, sigmas),
            counters: BTreeMap::new(),
            tensors: BTreeMap::new(),
        }
    }

    /// Checks that the state was saved by a scheduler of class `class` built with `config` on
    /// this schedule, and that its step is within it. The checks go from the coarsest
    /// difference to the finest, so that the error names the one a person would.
    pub(crate) fn check_fits(
        &self,
        class: &'static str,
        config: &impl Serialize,
        timesteps: &[f64],
        sigmas: &[f64],
    ) -> Result<(), StateError> {
        if self.class != class {
            return Err(StateError::Kind {
                saved: self.class.clone(),
                this: class,
            });
        }
        if self.num_inference_steps != timesteps.len() {
            return Err(StateError::Steps {
                saved: self.num_inference_steps,
                this: timesteps.len(),
            });
        }
        let differences = config_differences(&self.config, &config_json(config));
        if !differences.is_empty() {
            return Err(StateError::Config {
                scheduler: class,
                differences,
            });
        }
        let this = schedule_check(timesteps, sigmas);
        if self.schedule_check != this {
            return Err(StateError::Schedule {
                saved: self.schedule_check.clone(),
                this,
            });
        }
        if self.step_index > timesteps.len() {
            return Err(StateError::Inconsistent {
                scheduler: class,
                why: format!(
                    "step {} is past the end of the {}-step schedule",
                    self.step_index,
                    timesteps.len()
                ),
            });
        }
        Ok(())
    }

    /// Counter `name`, which a state of this class must have.
    pub(crate) fn counter(&self, scheduler: &'static str, name: &str) -> Result<usize, StateError> {
        self.counters
            .get(name)
            .copied()
            .ok_or_else(|| StateError::Inconsistent {
                scheduler,
                why: format!("counter `{name}` is missing"),
            })
    }

    /// Fails on a tensor or counter that a state of this class does not have: one from another
    /// version or a mixed-up file, whose meaning this scheduler cannot know.
    pub(crate) fn only(
        &self,
        scheduler: &'static str,
        counters: &[&str],
        tensor: impl Fn(&str) -> bool,
    ) -> Result<(), StateError> {
        let unknown = |kind: &str, name: &str| StateError::Inconsistent {
            scheduler,
            why: format!("unexpected {kind} `{name}`"),
        };
        if let Some(name) = self
            .counters
            .keys()
            .find(|c| !counters.contains(&c.as_str()))
        {
            return Err(unknown("counter", name));
        }
        if let Some(name) = self.tensors.keys().find(|t| !tensor(t)) {
            return Err(unknown("tensor", name));
        }
        Ok(())
    }
}

/// A configuration as the JSON a saved state holds: serialised and parsed back, so that the
/// configuration of this scheduler compares with a saved one through the same float formatting
/// and parsing.
fn config_json(config: &impl Serialize) -> serde_json::Value {
    serde_json::to_string(config)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The options whose values differ between two configurations, each as
/// `` `option`: saved …, here … ``.
fn config_differences(saved: &serde_json::Value, this: &serde_json::Value) -> Vec<String> {
    let (Some(saved), Some(this)) = (saved.as_object(), this.as_object()) else {
        return (saved != this)
            .then(|| format!("saved {saved}, here {this}"))
            .into_iter()
            .collect();
    };
    let missing = serde_json::Value::String("(absent)".into());
    let keys: std::collections::BTreeSet<&String> = saved.keys().chain(this.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (s, t) = (
                saved.get(key).unwrap_or(&missing),
                this.get(key).unwrap_or(&missing),
            );
            (s != t).then(|| format!("`{key}`: saved {s}, here {t}"))
        })
        .collect()
}

/// FNV-1a over the f64 bits of the timesteps and then the sigmas, as 16 hex digits.
fn schedule_check(timesteps: &[f64], sigmas: &[f64]) -> String {
    let hash = timesteps
        .iter()
        .chain(sigmas)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            v.to_bits().to_le_bytes().iter().fold(h, |h, b| {
                (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            })
        });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_differences_name_each_option() {
        let saved = json!({"flow_shift": 3.0, "solver_order": 2, "old": true});
        let this = json!({"flow_shift": 5.0, "solver_order": 2, "new": 1});
        let d = config_differences(&saved, &this);
        assert_eq!(
            d,
            vec![
                "`flow_shift`: saved 3.0, here 5.0",
                "`new`: saved \"(absent)\", here 1",
                "`old`: saved true, here \"(absent)\"",
            ]
        );
        assert!(config_differences(&saved, &saved).is_empty());
    }

    #[test]
    fn schedule_check_sees_one_bit() {
        let a = schedule_check(&[999.0, 500.0], &[1.0, 0.5, 0.0]);
        let b = schedule_check(
            &[999.0, 500.0],
            &[1.0, f64::from_bits(0.5f64.to_bits() + 1), 0.0],
        );
        assert_ne!(a, b);
        assert_eq!(a, schedule_check(&[999.0, 500.0], &[1.0, 0.5, 0.0]));
        assert_eq!(a.len(), 16);
    }
}
