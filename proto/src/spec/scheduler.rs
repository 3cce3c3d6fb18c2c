//! The sampler names a spec may ask for (`unipc`, `euler`), parsed here and nowhere else, and the
//! diffusers class each one is (what a checkpoint's `scheduler_config.json` names).

use std::fmt;
use std::str::FromStr;

/// Which sampler a render runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// diffusers' `UniPCMultistepScheduler` with flow sigmas: what Wan ships.
    UniPc,
    /// diffusers' `FlowMatchEulerDiscreteScheduler`.
    Euler,
}

/// A sampler name that is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not unipc or euler")]
pub struct UnknownScheduler(pub String);

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 2] = [SchedulerKind::UniPc, SchedulerKind::Euler];

    /// The name a spec and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Euler => "euler",
        }
    }

    /// The diffusers class name, as written in `scheduler_config.json`'s `_class_name`.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Euler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.class_name() == name)
    }

    /// A spec's optional scheduler field: empty means the checkpoint's own.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, UnknownScheduler> {
        match text.trim() {
            "" => Ok(None),
            name => name.parse().map(Some),
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| UnknownScheduler(text.to_string()))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_named() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>(), Ok(kind));
            assert_eq!(
                SchedulerKind::from_class_name(kind.class_name()),
                Some(kind)
            );
        }
        assert_eq!(SchedulerKind::parse_optional(""), Ok(None));
        assert_eq!(
            SchedulerKind::parse_optional("euler"),
            Ok(Some(SchedulerKind::Euler))
        );
        assert_eq!(
            "ddim".parse::<SchedulerKind>().unwrap_err().to_string(),
            "\"ddim\" is not unipc or euler"
        );
    }
}
