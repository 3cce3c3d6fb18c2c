//! Which model family a checkpoint is, read from its `model_index.json` (the pipeline class and
//! the fields that tell Wan2.1 from Wan2.2 under the same class), so that a checkpoint this build
//! cannot run is refused at load with what it is, instead of rendering something wrong. Each
//! family the worker runs has its own pipeline; a new family is a new variant here and a new
//! folder beside `wan/`.

use std::path::Path;

use serde_json::Value;

use super::builtin;
use super::loader::{Checkpoint, LoadError};

/// Where a pipeline is loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineSource<'a> {
    /// The built-in tiny model: Wan2.1's architecture at a toy size with seeded weights.
    Tiny,
    /// The built-in toy model, a checkpoint embedded in the binary (see `model::builtin`).
    Toy,
    /// A checkpoint directory in the diffusers layout.
    Checkpoint(&'a Path),
}

impl<'a> PipelineSource<'a> {
    /// The checkpoint directory this source loads from (the toy model's is written out on first
    /// use); `None` for the seeded tiny model, which has no files.
    pub fn checkpoint_dir(self) -> Result<Option<&'a Path>, LoadError> {
        match self {
            PipelineSource::Tiny => Ok(None),
            PipelineSource::Toy => Ok(Some(builtin::toy_dir()?)),
            PipelineSource::Checkpoint(dir) => Ok(Some(dir)),
        }
    }
}

/// The model families this build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Wan2.1 text-to-video (`WanPipeline` with one transformer and the Wan2.1 VAE).
    Wan21TextToVideo,
    /// Wan2.1 image-to-video (`WanImageToVideoPipeline`: a CLIP image encoder and its
    /// processor, a 36-channel transformer with image cross-attention, the Wan2.1 VAE).
    Wan21ImageToVideo,
}

impl ModelFamily {
    /// The family of a pipeline source: the tiny model's, or a checkpoint's (see [`Self::of`]).
    pub fn of_source(source: PipelineSource<'_>) -> Result<Self, LoadError> {
        match source.checkpoint_dir()? {
            None => Ok(ModelFamily::Wan21TextToVideo),
            Some(dir) => Self::of(&Checkpoint::open(dir)?),
        }
    }

    /// The family of `checkpoint`, or [`LoadError::Unsupported`] naming what it is.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let index = checkpoint.index();
        let unsupported = |what: &str| LoadError::Unsupported {
            path: checkpoint.root().join("model_index.json"),
            what: what.to_string(),
        };
        let class = index.get("_class_name").and_then(Value::as_str);
        let family = match class {
            Some("WanPipeline") => ModelFamily::Wan21TextToVideo,
            Some("WanImageToVideoPipeline") => ModelFamily::Wan21ImageToVideo,
            Some(other) => return Err(unsupported(&format!("pipeline class {other:?}"))),
            // Hand-assembled checkpoints may leave the class out; the components decide then.
            None => ModelFamily::Wan21TextToVideo,
        };
        let set = |key: &str| match index.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            // An absent component is written `[null, null]`.
            Some(Value::Array(parts)) => parts.iter().any(|p| !p.is_null()),
            Some(_) => true,
        };
        if set("transformer_2") || set("boundary_ratio") {
            return Err(unsupported(
                "Wan2.2 with two expert transformers (transformer_2, boundary_ratio)",
            ));
        }
        if set("expand_timesteps") {
            return Err(unsupported(
                "Wan2.2 TI2V (expand_timesteps: one timestep per latent token, the Wan2.2 VAE)",
            ));
        }
        Ok(family)
    }

    /// Whether the family's renders start from a picture.
    pub fn takes_picture(self) -> bool {
        self == ModelFamily::Wan21ImageToVideo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reference::all_fixture_dirs;

    /// Every fixture directory is either a family this build runs (Wan2.1 text-to-video and
    /// image-to-video) or refused at load with what it is (Wan2.2): none is left out without a
    /// word.
    #[test]
    fn every_fixture_is_run_or_refused_by_name() {
        let mut supported = 0;
        for dir in all_fixture_dirs() {
            let checkpoint = Checkpoint::open(dir.join("pipeline")).unwrap();
            match ModelFamily::of(&checkpoint) {
                Ok(family) => {
                    supported += 1;
                    println!("{}: {family:?}, in the parity runs", dir.display());
                }
                Err(e) => {
                    let message = e.to_string();
                    println!("{}: refused: {message}", dir.display());
                    assert!(
                        message.contains("model_index.json") && message.contains("not supported"),
                        "{message}"
                    );
                    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                    assert!(
                        name.starts_with("wan22") && message.contains("Wan2.2"),
                        "{name}: {message}"
                    );
                    let checkpoint = dir.join("pipeline");
                    let load = crate::families::load_pipeline(
                        PipelineSource::Checkpoint(&checkpoint),
                        &candle_core::Device::Cpu,
                        candle_core::DType::F32,
                    );
                    let Err(load) = load else {
                        panic!("{name}: the pipeline loaded a checkpoint it cannot run");
                    };
                    assert_eq!(load.to_string(), message, "{name}");
                }
            }
        }
        assert!(
            supported >= 3,
            "wan-tiny, wan-wide and wan-i2v-tiny at least"
        );
    }
}
