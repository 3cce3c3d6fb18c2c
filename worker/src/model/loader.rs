//! Checkpoint directories in the published diffusers layout, and the weights behind a
//! `VarBuilder`.
//!
//! A checkpoint is a directory with `model_index.json` and one sub-directory per component
//! (`tokenizer/`, `text_encoder/`, `transformer/`, `vae/`, `scheduler/`). A component holds its
//! `config.json` and its weights: one `*.safetensors` file, or shards listed by a
//! `*.safetensors.index.json`. Weights may be stored as f32, f16 or bf16; they are converted to the
//! dtype the model runs in as they are loaded. Every failure names the file, and the tensor where
//! there is one, so that a user knows what to re-download.
//!
//! The built-in `tiny` model has no files: [`seeded_var_builder`] makes its weights from a seed
//! with the same counter-based generator as the initial noise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::de::DeserializeOwned;

use super::noise;

/// What can go wrong opening a checkpoint. Each message names the path or tensor at fault and,
/// where it is not obvious, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {what} not found; a checkpoint directory needs model_index.json and the tokenizer/, text_encoder/, transformer/, vae/ and scheduler/ components (diffusers layout)", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: not a valid safetensors file ({reason}); it is corrupt or truncated, copy it again", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: no weights (*.safetensors or *.safetensors.index.json) in this component directory", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{}: the shard index lists {shard}, which is missing", index.display())]
    MissingShard { index: PathBuf, shard: String },
    #[error(
        "tensor `{tensor}` not found in {files}; the checkpoint does not match this model's layout"
    )]
    MissingTensor { tensor: String, files: String },
    #[error("tensor `{tensor}` in {} has shape {got:?}, this model expects {expected:?}; the config.json and the weights disagree", file.display())]
    ShapeMismatch {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{tensor}` in {} has dtype {dtype:?}; only f32, f16 and bf16 weights are supported", file.display())]
    UnsupportedDtype {
        tensor: String,
        file: PathBuf,
        dtype: DType,
    },
}

/// Reads and parses a JSON file, with errors naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::Missing {
                path: path.to_path_buf(),
                what: "file".into(),
            }
        } else {
            LoadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A checkpoint directory in the diffusers layout.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    root: PathBuf,
    /// `model_index.json`: component name → `[library, class]`.
    index: serde_json::Map<String, serde_json::Value>,
}

impl Checkpoint {
    pub fn open(root: impl AsRef<Path>) -> Result<Self, LoadError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(LoadError::Missing {
                path: root,
                what: "checkpoint directory".into(),
            });
        }
        let index = read_json(&root.join("model_index.json"))?;
        Ok(Self { root, index })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The class `model_index.json` gives a component, e.g. `"WanTransformer3DModel"`.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        self.index.get(name)?.as_array()?.get(1)?.as_str()
    }

    /// A component sub-directory; it must exist.
    pub fn component(&self, name: &str) -> Result<Component, LoadError> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(LoadError::Missing {
                path: dir,
                what: format!("{name} component directory"),
            });
        }
        Ok(Component { dir })
    }
}

/// One component directory of a checkpoint (`transformer/`, `vae/`, ...).
#[derive(Debug, Clone)]
pub struct Component {
    dir: PathBuf,
}

impl Component {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Parses a JSON file of the component, `config.json` unless told otherwise.
    pub fn json<T: DeserializeOwned>(&self, file: &str) -> Result<T, LoadError> {
        read_json(&self.dir.join(file))
    }

    pub fn config<T: DeserializeOwned>(&self) -> Result<T, LoadError> {
        self.json("config.json")
    }

    /// The component's weight files: the shards of a `*.safetensors.index.json` if there is one,
    /// otherwise every `*.safetensors` file in the directory.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, LoadError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| LoadError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        if let Some(index_name) = names
            .iter()
            .find(|n| n.ends_with(".safetensors.index.json"))
        {
            #[derive(serde::Deserialize)]
            struct ShardIndex {
                weight_map: HashMap<String, String>,
            }
            let index_path = self.dir.join(index_name);
            let index: ShardIndex = read_json(&index_path)?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            return shards
                .into_iter()
                .map(|shard| {
                    let path = self.dir.join(&shard);
                    if path.is_file() {
                        Ok(path)
                    } else {
                        Err(LoadError::MissingShard {
                            index: index_path.clone(),
                            shard,
                        })
                    }
                })
                .collect();
        }
        let files: Vec<PathBuf> = names
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .map(|n| self.dir.join(n))
            .collect();
        if files.is_empty() {
            return Err(LoadError::NoWeights {
                dir: self.dir.clone(),
            });
        }
        Ok(files)
    }

    /// A `VarBuilder` over the component's weights, converting them to `dtype` on `device`.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, LoadError> {
        let backend = SafetensorsWeights::open(&self.weight_files()?)?;
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }
}

/// Memory-mapped safetensors files that know which file holds which tensor, so that errors can
/// name it.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name → index into `files`
    location: HashMap<String, usize>,
}

impl SafetensorsWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(LoadError::Missing {
                    path: path.clone(),
                    what: "weights file".into(),
                });
            }
            // SAFETY: the file is mapped read-only; like every safetensors loader we rely on it not
            // being modified while the model is loaded.
            let mapped =
                unsafe { MmapedSafetensors::new(path) }.map_err(|e| LoadError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            for (name, _) in mapped.tensors() {
                location.insert(name, files.len());
            }
            files.push((path.clone(), mapped));
        }
        Ok(Self { files, location })
    }

    /// Opens one safetensors file, e.g. a reference case.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::open(&[path.as_ref().to_path_buf()])
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }

    /// Loads a tensor in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, LoadError> {
        let Some(&i) = self.location.get(name) else {
            return Err(LoadError::MissingTensor {
                tensor: name.into(),
                files: self.file_list(),
            });
        };
        let (path, file) = &self.files[i];
        file.load(name, device).map_err(|e| LoadError::Corrupt {
            path: path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        let tensor = self.load(name, device)?;
        if !matches!(tensor.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && tensor.dtype() != dtype
        {
            let file = self.files[self.location[name]].0.clone();
            return Err(LoadError::UnsupportedDtype {
                tensor: name.into(),
                file,
                dtype: tensor.dtype(),
            });
        }
        tensor.to_dtype(dtype).map_err(|e| LoadError::Corrupt {
            path: self.files[self.location[name]].0.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .load_as(name, dtype, dev)
            .map_err(candle_core::Error::wrap)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::wrap(LoadError::ShapeMismatch {
                tensor: name.into(),
                file: self.files[self.location[name]].0.clone(),
                expected: shape.dims().to_vec(),
                got: tensor.dims().to_vec(),
            }));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_as(name, dtype, dev)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }
}

/// Weights made from a seed, for the built-in tiny model and for benchmarks: each tensor is a pure
/// function of (seed, tensor name, shape), so a model built twice is identical on every machine.
///
/// Matrices and kernels get N(0, 1/fan_in) entries, which keeps activations at unit scale through
/// random layers; vectors named like norm scales get ones; other vectors (biases, modulation
/// tables) get small N(0, 0.02²) values. `Init::Const` hints are honoured.
pub struct SeededWeights {
    seed: u64,
}

impl SeededWeights {
    fn values(&self, name: &str, shape: &Shape, hint: Init) -> Vec<f32> {
        let n = shape.elem_count();
        if let Init::Const(c) = hint {
            if c != 0.0 {
                return vec![c as f32; n];
            }
        }
        let dims = shape.dims();
        let is_norm_scale = dims.len() == 1
            && (name.ends_with("norm.weight")
                || name.contains("norm") && name.ends_with(".weight")
                || name.ends_with(".gamma")
                || name.ends_with("layer_norm.weight"));
        if is_norm_scale {
            return vec![1.0; n];
        }
        let scale = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in.max(1) as f32).sqrt()
        } else {
            0.02
        };
        // FNV-1a of the name picks the stream, so tensors do not share values.
        let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        noise::gaussian(self.seed, stream, 0, n)
            .into_iter()
            .map(|v| v * scale)
            .collect()
    }
}

impl SimpleBackend for SeededWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = self.values(name, &shape, hint);
        Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded weights need a shape for tensor `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` whose every tensor is made from `seed` (see [`SeededWeights`]).
pub fn seeded_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededWeights { seed }), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_weights(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).unwrap();
    }

    #[test]
    fn loads_and_converts_half_precision() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1.5f32, -2.0, 3.25], &Device::Cpu).unwrap();
        write_weights(
            &dir.path().join("model.safetensors"),
            &[("a.weight", t.to_dtype(DType::BF16).unwrap())],
        );
        let component = Component {
            dir: dir.path().to_path_buf(),
        };
        let vb = component.var_builder(DType::F32, &Device::Cpu).unwrap();
        let got = vb.get(3, "a.weight").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![1.5, -2.0, 3.25]);
    }

    #[test]
    fn sharded_weights_follow_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        write_weights(
            &dir.path().join("m-00001-of-00002.safetensors"),
            &[("x", Tensor::ones(2, DType::F16, &dev).unwrap())],
        );
        write_weights(
            &dir.path().join("m-00002-of-00002.safetensors"),
            &[("y", Tensor::zeros(3, DType::F32, &dev).unwrap())],
        );
        std::fs::write(
            dir.path().join("m.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "m-00001-of-00002.safetensors", "y": "m-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let vb = Component {
            dir: dir.path().to_path_buf(),
        }
        .var_builder(DType::F32, &dev)
        .unwrap();
        assert_eq!(
            vb.get(2, "x").unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 1.0]
        );
        assert_eq!(vb.get(3, "y").unwrap().dims(), &[3]);
    }

    #[test]
    fn errors_name_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let path = dir.path().join("model.safetensors");
        write_weights(
            &path,
            &[("w", Tensor::zeros((2, 3), DType::F32, &dev).unwrap())],
        );
        let vb = Component {
            dir: dir.path().to_path_buf(),
        }
        .var_builder(DType::F32, &dev)
        .unwrap();

        let missing = vb.get((2, 3), "nope").unwrap_err().to_string();
        assert!(
            missing.contains("`nope`") && missing.contains("model.safetensors"),
            "{missing}"
        );
        let shape = vb.get((3, 2), "w").unwrap_err().to_string();
        assert!(
            shape.contains("`w`") && shape.contains("[2, 3]") && shape.contains("[3, 2]"),
            "{shape}"
        );

        // Truncate the file: opening it must fail and name it.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = Component {
            dir: dir.path().to_path_buf(),
        }
        .var_builder(DType::F32, &dev)
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("corrupt or truncated"),
            "{err}"
        );

        std::fs::write(&path, b"garbage that is not safetensors").unwrap();
        let err = SafetensorsWeights::open_file(&path)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("corrupt or truncated"), "{err}");
    }

    #[test]
    fn missing_parts_of_a_checkpoint_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model_index.json"), "{err}");
        std::fs::write(
            dir.path().join("model_index.json"),
            r#"{"vae": ["diffusers", "AutoencoderKLWan"]}"#,
        )
        .unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.component_class("vae"), Some("AutoencoderKLWan"));
        let err = ckpt.component("vae").unwrap_err().to_string();
        assert!(err.contains("vae component directory"), "{err}");
        std::fs::create_dir(dir.path().join("vae")).unwrap();
        let err = ckpt
            .component("vae")
            .unwrap()
            .weight_files()
            .unwrap_err()
            .to_string();
        assert!(err.contains("no weights"), "{err}");
    }

    #[test]
    fn seeded_weights_are_deterministic() {
        let dev = Device::Cpu;
        let a = seeded_var_builder(3, DType::F32, &dev)
            .get((4, 8), "blocks.0.w")
            .unwrap();
        let b = seeded_var_builder(3, DType::F32, &dev)
            .get((4, 8), "blocks.0.w")
            .unwrap();
        let c = seeded_var_builder(3, DType::F32, &dev)
            .get((4, 8), "blocks.1.w")
            .unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        assert_ne!(a.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
        let norm = seeded_var_builder(3, DType::F32, &dev)
            .get(4, "norm_q.weight")
            .unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
    }
}
