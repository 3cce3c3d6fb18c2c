//! The models a worker serves: parsing `--model` values, checking each checkpoint at start (so a
//! bad path fails the daemon, not its first job) and the [`ModelInfo`] the worker advertises.

use std::path::PathBuf;

use longtake_proto::ModelInfo;

use crate::families;
use crate::model::family::PipelineSource;
use crate::model::render::{ModelFacts, PipelineError};

/// The name the built-in tiny model is served under.
pub const TINY: &str = "tiny";
/// The name the built-in toy model is served under.
pub use crate::model::builtin::TOY;

/// A model this worker can run.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The built-in toy Wan2.1 (trained by longtake on procedural videos; the default), served
    /// as `toy`.
    Toy,
    /// The built-in tiny Wan2.1 (seeded random weights, for tests), served as `tiny`.
    Tiny,
    /// A checkpoint directory in the diffusers layout, served under `name`.
    Checkpoint { name: String, dir: PathBuf },
}

/// A model that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--model {text:?}: {reason}; expected `toy`, `tiny`, `NAME=DIR` or a checkpoint DIR")]
    Parse { text: String, reason: String },
    #[error("model {name}: {source}")]
    Checkpoint {
        name: String,
        #[source]
        source: Box<PipelineError>,
    },
    /// A built-in model (`toy`, `tiny`) that cannot be served, e.g. an unwritable cache.
    #[error("model {name}: {source}")]
    Builtin {
        name: &'static str,
        #[source]
        source: Box<PipelineError>,
    },
    #[error("model name {0} is given twice; give each --model a distinct NAME=DIR")]
    Duplicate(String),
}

impl ModelSource {
    /// `toy`, `tiny`, `NAME=DIR`, or a bare `DIR` served under its final path component.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let err = |reason: &str| ModelError::Parse {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        match text {
            TOY => return Ok(Self::Toy),
            TINY => return Ok(Self::Tiny),
            _ => {}
        }
        let (name, dir) = match text.split_once('=') {
            Some((name, dir)) => (name.trim().to_string(), PathBuf::from(dir.trim())),
            None => {
                let dir = PathBuf::from(text);
                let name = dir
                    .components()
                    .next_back()
                    .and_then(|c| c.as_os_str().to_str())
                    .filter(|n| !matches!(*n, "" | "." | ".." | "/"))
                    .ok_or_else(|| err("the directory has no final component to name it by"))?
                    .to_string();
                (name, dir)
            }
        };
        if name.is_empty() {
            return Err(err("the model name is empty"));
        }
        if dir.as_os_str().is_empty() {
            return Err(err("the checkpoint directory is empty"));
        }
        if name == TINY || name == TOY {
            return Err(err(&format!(
                "`{name}` is a built-in model's name; pick another"
            )));
        }
        Ok(Self::Checkpoint { name, dir })
    }

    /// Where the model's pipeline loads from.
    pub fn pipeline_source(&self) -> PipelineSource<'_> {
        match self {
            Self::Toy => PipelineSource::Toy,
            Self::Tiny => PipelineSource::Tiny,
            Self::Checkpoint { dir, .. } => PipelineSource::Checkpoint(dir),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Toy => TOY,
            Self::Tiny => TINY,
            Self::Checkpoint { name, .. } => name,
        }
    }
}

/// A checked model: what it is, what the worker advertises and what it was told by the model's
/// family (defaults, the transformer's shape which layouts can split).
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub source: ModelSource,
    pub info: ModelInfo,
    pub facts: ModelFacts,
}

impl ServedModel {
    /// Checks the model without loading weights: the tiny model's configuration, or a
    /// checkpoint's (the toy model's, written out first) components and its transformer's
    /// `config.json`.
    pub fn open(source: ModelSource) -> Result<Self, ModelError> {
        let facts = families::describe(source.pipeline_source()).map_err(|e| match &source {
            ModelSource::Toy => ModelError::Builtin {
                name: TOY,
                source: Box::new(e),
            },
            ModelSource::Tiny => ModelError::Builtin {
                name: TINY,
                source: Box::new(e),
            },
            ModelSource::Checkpoint { name, .. } => ModelError::Checkpoint {
                name: name.clone(),
                source: Box::new(e),
            },
        })?;
        let info = ModelInfo {
            name: source.name().to_string(),
            default_width: facts.info.default_width as u32,
            default_height: facts.info.default_height as u32,
            default_steps: facts.info.default_steps as u32,
            default_frames: facts.info.default_frames as u32,
            default_fps: facts.info.default_fps as u32,
            attention_heads: facts.attention_heads as u32,
            ffn_dim: facts.ffn_dim as u32,
            max_prompt_tokens: facts.info.max_sequence_length as u32,
            world: facts
                .info
                .world
                .map(|w| w.name().to_string())
                .unwrap_or_default(),
            takes_picture: facts.takes_picture,
        };
        Ok(Self {
            source,
            info,
            facts,
        })
    }
}

/// The models of one worker, by name.
#[derive(Debug, Clone)]
pub struct Models(Vec<ServedModel>);

impl Models {
    /// Checks every source; an empty list serves the default model, `toy`.
    pub fn open(sources: &[ModelSource]) -> Result<Self, ModelError> {
        let sources = if sources.is_empty() {
            vec![ModelSource::Toy]
        } else {
            sources.to_vec()
        };
        let mut models: Vec<ServedModel> = Vec::with_capacity(sources.len());
        for source in sources {
            if models.iter().any(|m| m.source.name() == source.name()) {
                return Err(ModelError::Duplicate(source.name().to_string()));
            }
            models.push(ServedModel::open(source)?);
        }
        Ok(Self(models))
    }

    /// The model of a (resolved) spec's name.
    pub fn get(&self, name: &str) -> Option<&ServedModel> {
        self.0.iter().find(|m| m.source.name() == name)
    }

    pub fn infos(&self) -> Vec<ModelInfo> {
        self.0.iter().map(|m| m.info.clone()).collect()
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|m| m.source.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toy_tiny_named_and_bare_directories() {
        assert_eq!(ModelSource::parse("toy").unwrap(), ModelSource::Toy);
        assert_eq!(ModelSource::parse("tiny").unwrap(), ModelSource::Tiny);
        assert_eq!(
            ModelSource::parse("wan=/models/Wan2.1").unwrap(),
            ModelSource::Checkpoint {
                name: "wan".into(),
                dir: "/models/Wan2.1".into()
            }
        );
        assert_eq!(
            ModelSource::parse("/models/Wan2.1-T2V-1.3B-Diffusers/").unwrap(),
            ModelSource::Checkpoint {
                name: "Wan2.1-T2V-1.3B-Diffusers".into(),
                dir: "/models/Wan2.1-T2V-1.3B-Diffusers/".into()
            }
        );
        for bad in ["=dir", "name=", "/", "tiny=/x", "toy=/x"] {
            let err = ModelSource::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--model {bad:?}")), "{err}");
        }
    }

    #[test]
    fn toy_is_served_by_default_with_the_defaults_its_checkpoint_states() {
        let models = Models::open(&[]).unwrap();
        assert_eq!(models.names(), [TOY]);
        let toy = &models.get(TOY).unwrap().info;
        let dir = crate::model::reference::toy_checkpoint_dir();
        let read = |file: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        let stated = &read("model_index.json")["_longtake"];
        let advertised = [
            ("default_width", toy.default_width),
            ("default_height", toy.default_height),
            ("default_frames", toy.default_frames),
            ("default_fps", toy.default_fps),
            ("default_steps", toy.default_steps),
            ("max_sequence_length", toy.max_prompt_tokens),
        ];
        for (field, value) in advertised {
            assert_eq!(stated[field].as_u64(), Some(u64::from(value)), "{field}");
        }
        let transformer = read("transformer/config.json");
        assert_eq!(
            transformer["num_attention_heads"].as_u64(),
            Some(u64::from(toy.attention_heads))
        );
        assert_eq!(
            transformer["ffn_dim"].as_u64(),
            Some(u64::from(toy.ffn_dim))
        );
    }

    #[test]
    fn tiny_advertises_the_pipeline_defaults_and_heads() {
        let models = Models::open(&[ModelSource::Tiny]).unwrap();
        let tiny = models.get(TINY).unwrap();
        let defaults = crate::families::wan::pipeline::tiny_info();
        assert_eq!(tiny.info.default_width as usize, defaults.default_width);
        assert_eq!(tiny.info.default_steps as usize, defaults.default_steps);
        let vocab = crate::model::tokenizer::PromptTokenizer::builtin_tiny()
            .unwrap()
            .vocab_size();
        let transformer = crate::families::wan::pipeline::tiny_configs(vocab)
            .unwrap()
            .transformer;
        assert_eq!(
            tiny.info.attention_heads as usize,
            transformer.num_attention_heads
        );
        assert_eq!(tiny.info.ffn_dim as usize, transformer.ffn_dim);
        assert!(models.get("wan").is_none());
    }

    #[test]
    fn a_checkpoint_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Models::open(&[ModelSource::Checkpoint {
            name: "wan".into(),
            dir: missing.clone(),
        }])
        .unwrap_err()
        .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("checkpoint directory not found"), "{err}");

        std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
        let err = Models::open(&[ModelSource::Checkpoint {
            name: "wan".into(),
            dir: dir.path().to_path_buf(),
        }])
        .unwrap_err()
        .to_string();
        assert!(err.contains("tokenizer"), "{err}");
    }

    #[test]
    fn fixture_checkpoints_advertise_their_heads() {
        for dir in crate::model::reference::test_fixture_dirs() {
            let source = ModelSource::Checkpoint {
                name: "fixture".into(),
                dir: dir.join("pipeline"),
            };
            let model = ServedModel::open(source).unwrap();
            assert!(model.info.attention_heads > 0);
            // The fixtures state no `_longtake` defaults: Wan2.1's.
            assert_eq!(model.info.default_steps, 50);
            assert_eq!(
                (model.info.default_frames, model.info.default_fps),
                (81, 16)
            );
            assert_eq!(model.info.max_prompt_tokens, 512);
        }
    }

    #[test]
    fn a_name_is_served_once() {
        let err = Models::open(&[ModelSource::Tiny, ModelSource::Tiny]).unwrap_err();
        assert!(matches!(err, ModelError::Duplicate(name) if name == "tiny"));
    }
}
