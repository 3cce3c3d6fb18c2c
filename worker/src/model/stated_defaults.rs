//! The defaults a checkpoint states for itself: the optional `_longtake` section of its
//! `model_index.json` (diffusers ignores keys that start with `_`). A model trained at its own
//! size, clip length or prompt length says so there, e.g. the built-in toy model:
//!
//! ```json
//! "_longtake": {"name": "toy", "default_width": 64, "default_height": 64, "default_frames": 17,
//!               "default_fps": 16, "default_steps": 40, "max_sequence_length": 16}
//! ```
//!
//! A toy model also names the procedural world it was trained on (`"world": "bordered"` or
//! `"wrapping"`), so the clip checker measures its clips in that world.
//!
//! Every field is optional and falls back to the family's defaults; unknown fields are ignored
//! (a newer checkpoint may state more than this build reads); a field of the wrong type or an
//! impossible value is an error naming `model_index.json` and the field.

use longtake_proto::spec::frames::{self, WAN_TEMPORAL_PACK};
use longtake_proto::spec::SIZE_MULTIPLE;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::loader::{Checkpoint, LoadError};
use super::render::{PipelineInfo, ToyWorld};

/// The key of the section in `model_index.json`.
pub const SECTION: &str = "_longtake";

/// What a checkpoint's `_longtake` section states; `None`: the family's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatedDefaults {
    /// The name the pipeline reports (the checkpoint directory otherwise).
    pub name: Option<String>,
    pub default_width: Option<usize>,
    pub default_height: Option<usize>,
    /// A 4k+1 frame count.
    pub default_frames: Option<usize>,
    pub default_fps: Option<usize>,
    pub default_steps: Option<usize>,
    /// The prompt length in tokens the model was trained with (prompts are cut or zero-padded
    /// to it; a model trained on 16 tokens must not be given 512).
    pub max_sequence_length: Option<usize>,
    /// The procedural world a toy model was trained on: `"bordered"` or `"wrapping"`.
    pub world: Option<ToyWorld>,
}

impl StatedDefaults {
    /// The section of `checkpoint`'s `model_index.json`; empty when there is none.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let path = checkpoint.root().join("model_index.json");
        Self::from_index(checkpoint.index(), &path)
    }

    /// The section of a parsed `model_index.json` read from `path` (named in errors).
    pub fn from_index(
        index: &Map<String, Value>,
        path: &std::path::Path,
    ) -> Result<Self, LoadError> {
        let invalid = |field: &str, reason: String| LoadError::InvalidField {
            path: path.to_path_buf(),
            field: format!("{SECTION}.{field}"),
            reason,
        };
        let section = match index.get(SECTION) {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(section)) => section,
            Some(other) => {
                return Err(LoadError::InvalidField {
                    path: path.to_path_buf(),
                    field: SECTION.into(),
                    reason: format!("expected an object of defaults, got {other}"),
                })
            }
        };
        let field = |key: &str| section.get(key).filter(|v| !v.is_null()).cloned();
        let typed = |key: &str| -> Result<Option<usize>, LoadError> {
            read::<usize>(field(key)).map_err(|e| invalid(key, e.to_string()))
        };
        let positive = |key: &str| -> Result<Option<usize>, LoadError> {
            match typed(key)? {
                Some(0) => Err(invalid(key, "must be at least 1".into())),
                other => Ok(other),
            }
        };
        let size = |key: &str| -> Result<Option<usize>, LoadError> {
            let value = positive(key)?;
            if let Some(pixels) = value {
                if pixels % SIZE_MULTIPLE as usize != 0 {
                    return Err(invalid(
                        key,
                        format!("{pixels} is not a multiple of {SIZE_MULTIPLE}"),
                    ));
                }
            }
            Ok(value)
        };
        let name = read::<String>(field("name")).map_err(|e| invalid("name", e.to_string()))?;
        if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(invalid("name", "must not be empty".into()));
        }
        let default_frames = positive("default_frames")?;
        if let Some(count) = default_frames {
            let count = u32::try_from(count)
                .map_err(|_| invalid("default_frames", format!("{count} is too large")))?;
            frames::check(count, WAN_TEMPORAL_PACK)
                .map_err(|e| invalid("default_frames", e.to_string()))?;
        }
        Ok(Self {
            name,
            default_width: size("default_width")?,
            default_height: size("default_height")?,
            default_frames,
            default_fps: positive("default_fps")?,
            default_steps: positive("default_steps")?,
            max_sequence_length: positive("max_sequence_length")?,
            world: read::<ToyWorld>(field("world")).map_err(|e| invalid("world", e.to_string()))?,
        })
    }

    /// `family` with every default this section states in its place.
    pub fn over(&self, family: PipelineInfo) -> PipelineInfo {
        PipelineInfo {
            name: self.name.clone().unwrap_or(family.name),
            default_width: self.default_width.unwrap_or(family.default_width),
            default_height: self.default_height.unwrap_or(family.default_height),
            default_frames: self.default_frames.unwrap_or(family.default_frames),
            default_fps: self.default_fps.unwrap_or(family.default_fps),
            default_steps: self.default_steps.unwrap_or(family.default_steps),
            max_sequence_length: self
                .max_sequence_length
                .unwrap_or(family.max_sequence_length),
            world: self.world.or(family.world),
        }
    }
}

fn read<T: DeserializeOwned>(value: Option<Value>) -> serde_json::Result<Option<T>> {
    value.map(serde_json::from_value).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn family() -> PipelineInfo {
        PipelineInfo {
            name: "/models/wan".into(),
            default_width: 832,
            default_height: 480,
            default_frames: 81,
            default_fps: 16,
            default_steps: 50,
            max_sequence_length: 512,
            world: None,
        }
    }

    fn parse(index: Value) -> Result<StatedDefaults, LoadError> {
        let Value::Object(index) = index else {
            panic!("an index is an object")
        };
        StatedDefaults::from_index(&index, std::path::Path::new("/m/model_index.json"))
    }

    #[test]
    fn an_index_without_the_section_keeps_the_familys_defaults() {
        let stated = parse(json!({"_class_name": "WanPipeline"})).unwrap();
        assert_eq!(stated, StatedDefaults::default());
        assert_eq!(stated.over(family()), family());
        let null = parse(json!({"_longtake": null})).unwrap();
        assert_eq!(null.over(family()), family());
    }

    #[test]
    fn stated_fields_replace_the_familys_and_unknown_ones_are_ignored() {
        let stated = parse(json!({"_longtake": {
            "name": "toy", "default_width": 64, "default_frames": 33,
            "max_sequence_length": 16, "trained_on": "procedural videos", "world": "wrapping"
        }}))
        .unwrap();
        let info = stated.over(family());
        assert_eq!(
            info,
            PipelineInfo {
                name: "toy".into(),
                default_width: 64,
                default_frames: 33,
                max_sequence_length: 16,
                world: Some(ToyWorld::Wrapping),
                ..family()
            }
        );
    }

    #[test]
    fn a_wrong_type_or_value_names_the_file_and_the_field() {
        let cases = [
            (json!({"_longtake": 3}), "_longtake: expected an object"),
            (
                json!({"_longtake": {"default_steps": "20"}}),
                "_longtake.default_steps: invalid type: string \"20\"",
            ),
            (
                json!({"_longtake": {"max_sequence_length": -1}}),
                "_longtake.max_sequence_length: invalid value",
            ),
            (
                json!({"_longtake": {"default_fps": 0}}),
                "_longtake.default_fps: must be at least 1",
            ),
            (
                json!({"_longtake": {"default_width": 60}}),
                "_longtake.default_width: 60 is not a multiple of 16",
            ),
            (
                json!({"_longtake": {"default_frames": 32}}),
                "_longtake.default_frames: 32 is not 4k+1",
            ),
            (
                json!({"_longtake": {"name": 7}}),
                "_longtake.name: invalid type",
            ),
            (
                json!({"_longtake": {"name": " "}}),
                "_longtake.name: must not be empty",
            ),
            (
                json!({"_longtake": {"world": "round"}}),
                "_longtake.world: unknown variant `round`, expected `bordered` or `wrapping`",
            ),
        ];
        for (index, want) in cases {
            let message = parse(index).unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("/m/model_index.json: {want}")),
                "got {message:?}, want {want:?}"
            );
        }
    }
}
