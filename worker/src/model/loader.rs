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
//! A tensor-parallel rank needs only its slice of some weights: [`SafetensorsWeights::load_slice`]
//! copies just that slice out of the memory map, and [`Component::sharded_var_builder`] serves the
//! tensors a [`ShardPlan`] names as slices and the rest whole, so a rank materialises about 1/tp
//! of the sharded weights.
//!
//! The built-in `tiny` model has no files: [`seeded_var_builder`] makes its weights from a seed
//! with the same counter-based generator as the initial noise.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::{Load, MmapedSafetensors};
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
    #[error("{}: {what}: not supported by this build, which runs Wan2.1 text-to-video (WanPipeline)", path.display())]
    Unsupported { path: PathBuf, what: String },
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
    #[error("tensor `{tensor}` in {} has shape {shape:?}; cannot take {}..{} along dim {dim}", file.display(), range.start, range.end)]
    SliceOutOfRange {
        tensor: String,
        file: PathBuf,
        shape: Vec<usize>,
        dim: usize,
        range: Range<usize>,
    },
    #[error("tensor `{tensor}` in {} has dtype {dtype:?}; only f32, f16 and bf16 weights are supported", file.display())]
    UnsupportedDtype {
        tensor: String,
        file: PathBuf,
        dtype: DType,
    },
    #[error("tensor `{tensor}` in {} is stored as {dtype}; only f32, f16 and bf16 weights are supported", file.display())]
    UnsupportedStoredDtype {
        tensor: String,
        file: PathBuf,
        dtype: String,
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

    /// `model_index.json` as parsed.
    pub fn index(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.index
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

    /// The component's weights with the tensors `plan` names cut to their slice (see
    /// [`ShardedWeights`]).
    pub fn sharded_weights(&self, plan: ShardPlan) -> Result<ShardedWeights, LoadError> {
        Ok(ShardedWeights::new(
            SafetensorsWeights::open(&self.weight_files()?)?,
            plan,
        ))
    }

    /// A `VarBuilder` like [`Self::var_builder`] that serves the tensors `plan` names as slices:
    /// the model asks for the slice's shape under the tensor's full name.
    pub fn sharded_var_builder(
        &self,
        dtype: DType,
        device: &Device,
        plan: ShardPlan,
    ) -> Result<VarBuilder<'static>, LoadError> {
        Ok(VarBuilder::from_backend(
            Box::new(self.sharded_weights(plan)?),
            dtype,
            device.clone(),
        ))
    }
}

/// Counts the bytes copied out of the memory-mapped weights, i.e. what a rank materialises. Clones
/// share the count, so a handle taken before the weights move into a `VarBuilder` still reads it.
#[derive(Debug, Clone, Default)]
pub struct ByteCounter(Arc<AtomicU64>);

impl ByteCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Memory-mapped safetensors files that know which file holds which tensor, so that errors can
/// name it.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name → index into `files`
    location: HashMap<String, usize>,
    bytes_read: ByteCounter,
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
        Ok(Self {
            files,
            location,
            bytes_read: ByteCounter::default(),
        })
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

    /// The error for tensor `name` (reported as `shown`) loaded with another shape than the model
    /// expects; it names the file the tensor came from.
    fn shape_mismatch(
        &self,
        name: &str,
        shown: String,
        expected: &Shape,
        got: &Tensor,
    ) -> LoadError {
        LoadError::ShapeMismatch {
            tensor: shown,
            file: self.files[self.location[name]].0.clone(),
            expected: expected.dims().to_vec(),
            got: got.dims().to_vec(),
        }
    }

    /// A handle on the count of bytes copied out of the files by [`Self::load`] and
    /// [`Self::load_slice`].
    pub fn bytes_read(&self) -> ByteCounter {
        self.bytes_read.clone()
    }

    fn locate(&self, name: &str) -> Result<&(PathBuf, MmapedSafetensors), LoadError> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(LoadError::MissingTensor {
                tensor: name.into(),
                files: self.file_list(),
            }),
        }
    }

    /// Loads a tensor in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, LoadError> {
        let (path, file) = self.locate(name)?;
        let corrupt = |e: candle_core::Error| LoadError::Corrupt {
            path: path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        };
        let view = file.get(name).map_err(corrupt)?;
        self.bytes_read.add(view.data().len());
        view.load(device).map_err(corrupt)
    }

    /// Loads `range` along `dim` of a tensor, in its stored dtype, copying only that slice's bytes
    /// out of the memory map: one contiguous run for dim 0, one run per outer index otherwise (the
    /// rows of a matrix, for dim 1). The result equals `load(name)?.narrow(dim, start, len)`.
    pub fn load_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let (path, file) = self.locate(name)?;
        let view = file.get(name).map_err(|e| LoadError::Corrupt {
            path: path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        let shape = view.shape();
        if dim >= shape.len() || range.start > range.end || range.end > shape[dim] {
            return Err(LoadError::SliceOutOfRange {
                tensor: name.into(),
                file: path.clone(),
                shape: shape.to_vec(),
                dim,
                range,
            });
        }
        let dtype = match DType::try_from(view.dtype()) {
            Ok(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
            Ok(dtype) => {
                return Err(LoadError::UnsupportedDtype {
                    tensor: name.into(),
                    file: path.clone(),
                    dtype,
                })
            }
            Err(_) => {
                return Err(LoadError::UnsupportedStoredDtype {
                    tensor: name.into(),
                    file: path.clone(),
                    dtype: format!("{:?}", view.dtype()),
                })
            }
        };
        let elem = dtype.size_in_bytes();
        let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
        let runs = Runs {
            data: view.data(),
            outer: shape[..dim].iter().product(),
            stride: shape[dim] * inner,
            offset: range.start * inner,
            len: range.len() * inner,
        };
        let mut dims = shape.to_vec();
        dims[dim] = range.len();
        self.bytes_read.add(runs.outer * runs.len);
        // Decoding straight into the typed buffer copies the slice once; safetensors data is
        // little-endian by definition.
        let tensor = match dtype {
            DType::F32 => Tensor::from_vec(runs.decode(f32::from_le_bytes), dims, device),
            DType::F16 => Tensor::from_vec(runs.decode(half::f16::from_le_bytes), dims, device),
            _ => Tensor::from_vec(runs.decode(half::bf16::from_le_bytes), dims, device),
        };
        tensor.map_err(|e| LoadError::Corrupt {
            path: path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })
    }

    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        let tensor = self.load(name, device)?;
        self.convert(name, tensor, dtype)
    }

    /// Converts a loaded tensor (or slice) to the dtype the model runs in.
    fn convert(&self, name: &str, tensor: Tensor, dtype: DType) -> Result<Tensor, LoadError> {
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

/// The byte runs that make up a slice of a row-major tensor: `outer` runs of `len` bytes, each
/// `offset` bytes into a block of `stride` bytes.
struct Runs<'a> {
    data: &'a [u8],
    outer: usize,
    stride: usize,
    offset: usize,
    len: usize,
}

impl Runs<'_> {
    fn decode<T, const N: usize>(&self, from_le: fn([u8; N]) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(self.outer * self.len / N);
        for o in 0..self.outer {
            let start = o * self.stride + self.offset;
            out.extend(self.data[start..start + self.len].chunks_exact(N).map(|c| {
                let mut bytes = [0; N];
                bytes.copy_from_slice(c);
                from_le(bytes)
            }));
        }
        out
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
            return Err(candle_core::Error::wrap(self.shape_mismatch(
                name,
                name.into(),
                &shape,
                &tensor,
            )));
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

/// A slice of one tensor: `range` along dimension `dim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub range: Range<usize>,
}

impl Shard {
    /// Rows `range` of a matrix (dim 0): a column-parallel linear layer's output features, or a
    /// bias's entries.
    pub fn rows(range: Range<usize>) -> Self {
        Self { dim: 0, range }
    }

    /// Columns `range` of a matrix (dim 1): a row-parallel linear layer's input features.
    pub fn cols(range: Range<usize>) -> Self {
        Self { dim: 1, range }
    }
}

type ShardRule = Box<dyn Fn(&str) -> Option<Shard> + Send + Sync>;

/// Which tensors a rank loads as slices. Exact names are looked up first, then the rules in the
/// order they were added; the first rule that answers wins. Tensors nobody names load whole.
#[derive(Default)]
pub struct ShardPlan {
    exact: HashMap<String, Shard>,
    rules: Vec<ShardRule>,
}

impl ShardPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads `range` along `dim` of the tensor called `name`.
    pub fn tensor(mut self, name: impl Into<String>, shard: Shard) -> Self {
        self.exact.insert(name.into(), shard);
        self
    }

    /// Asks `rule` for the slice of every tensor not named exactly, e.g. "rows `r` of every
    /// `*.attn1.to_q.weight`".
    pub fn rule(mut self, rule: impl Fn(&str) -> Option<Shard> + Send + Sync + 'static) -> Self {
        self.rules.push(Box::new(rule));
        self
    }

    /// The slice `name` loads as, or `None` to load it whole.
    pub fn shard_of(&self, name: &str) -> Option<Shard> {
        if let Some(shard) = self.exact.get(name) {
            return Some(shard.clone());
        }
        self.rules.iter().find_map(|rule| rule(name))
    }
}

impl std::fmt::Debug for ShardPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardPlan")
            .field("exact", &self.exact)
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// [`SafetensorsWeights`] that serve the tensors of a [`ShardPlan`] as slices, read straight from
/// the memory map, and every other tensor whole. The model asks for a planned tensor under its
/// full checkpoint name with the slice's shape.
pub struct ShardedWeights {
    weights: SafetensorsWeights,
    plan: ShardPlan,
}

impl ShardedWeights {
    pub fn new(weights: SafetensorsWeights, plan: ShardPlan) -> Self {
        Self { weights, plan }
    }

    /// A handle on the count of bytes this rank has copied out of the weight files.
    pub fn bytes_read(&self) -> ByteCounter {
        self.weights.bytes_read()
    }

    fn load_as(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor, LoadError> {
        match self.plan.shard_of(name) {
            Some(Shard { dim, range }) => {
                let slice = self.weights.load_slice(name, dim, range, dev)?;
                self.weights.convert(name, slice, dtype)
            }
            None => self.weights.load_as(name, dtype, dev),
        }
    }
}

impl SimpleBackend for ShardedWeights {
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
            let tensor_name = match self.plan.shard_of(name) {
                Some(Shard { dim, range }) => {
                    format!("{name}[{}..{} along dim {dim}]", range.start, range.end)
                }
                None => name.to_string(),
            };
            return Err(candle_core::Error::wrap(self.weights.shape_mismatch(
                name,
                tensor_name,
                &shape,
                &tensor,
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_as(name, dtype, dev)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains_tensor(name)
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
        seeded_without_shape(name)
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The answer of seeded weights (and of backends made from them) to a tensor asked for without
/// its shape: a seeded tensor is made to the shape asked for, so there is none to give.
pub(crate) fn seeded_without_shape(name: &str) -> candle_core::Result<Tensor> {
    candle_core::bail!("seeded weights need a shape for tensor `{name}`")
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

    /// Distinct values that survive f16 and bf16 exactly (small integers).
    fn counting(dims: &[usize], dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1.0, -64.0)
            .unwrap()
            .reshape(dims)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn flat_f32(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn slices_equal_narrow_for_every_dtype_and_dim() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = dir.path().join(format!("{dtype:?}.safetensors"));
            let tensors = [
                ("matrix", counting(&[6, 10], dtype)),
                ("bias", counting(&[10], dtype)),
                ("kernel", counting(&[4, 5, 3, 2], dtype)),
            ];
            write_weights(&path, &tensors);
            let weights = SafetensorsWeights::open_file(&path).unwrap();
            for (name, full) in &tensors {
                for dim in 0..full.rank() {
                    let size = full.dim(dim).unwrap();
                    for (start, end) in [(0, size), (1, size), (0, 1), (size / 2, size), (2, 2)] {
                        let slice = weights.load_slice(name, dim, start..end, &dev).unwrap();
                        let want = full.narrow(dim, start, end - start).unwrap();
                        assert_eq!(slice.dtype(), dtype);
                        assert_eq!(slice.dims(), want.dims(), "{name} {dim} {start}..{end}");
                        assert_eq!(
                            flat_f32(&slice),
                            flat_f32(&want),
                            "{dtype:?} {name} dim {dim} {start}..{end}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn out_of_range_slices_name_the_tensor_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_weights(
            &path,
            &[
                ("w", counting(&[4, 6], DType::F32)),
                ("ids", Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap()),
            ],
        );
        let weights = SafetensorsWeights::open_file(&path).unwrap();
        let dev = Device::Cpu;
        for (dim, range) in [
            (0, 0..5),
            (1, 5..7),
            (2, 0..1),
            (0, Range { start: 3, end: 2 }),
        ] {
            let err = weights
                .load_slice("w", dim, range.clone(), &dev)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`w`")
                    && err.contains("model.safetensors")
                    && err.contains("[4, 6]")
                    && err.contains(&format!("{}..{} along dim {dim}", range.start, range.end)),
                "{err}"
            );
        }
        let err = weights.load_slice("v", 0, 0..1, &dev).unwrap_err();
        assert!(err.to_string().contains("`v`"), "{err}");
        let err = weights.load_slice("ids", 0, 0..1, &dev).unwrap_err();
        assert!(
            err.to_string().contains("`ids`") && err.to_string().contains("U32"),
            "{err}"
        );
    }

    /// One attention block's projections at width `dim`, stored as bf16.
    fn attention_checkpoint(dir: &Path, dim: usize) -> Vec<(&'static str, Tensor)> {
        let tensors = vec![
            (
                "blocks.0.attn1.to_q.weight",
                counting(&[dim, dim], DType::BF16),
            ),
            ("blocks.0.attn1.to_q.bias", counting(&[dim], DType::BF16)),
            (
                "blocks.0.attn1.to_out.0.weight",
                counting(&[dim, dim], DType::BF16),
            ),
            (
                "blocks.0.attn1.to_out.0.bias",
                counting(&[dim], DType::BF16),
            ),
        ];
        write_weights(&dir.join("model.safetensors"), &tensors);
        tensors
    }

    fn tensor_parallel_plan(dim: usize, tp: usize, rank: usize) -> ShardPlan {
        let parts = crate::parallel::layout::shard_range(dim, tp, rank);
        let cols = parts.clone();
        ShardPlan::new()
            .tensor("blocks.0.attn1.to_q.bias", Shard::rows(parts.clone()))
            .rule(move |name| {
                name.ends_with("to_q.weight")
                    .then(|| Shard::rows(parts.clone()))
            })
            .rule(move |name| {
                name.ends_with("to_out.0.weight")
                    .then(|| Shard::cols(cols.clone()))
            })
    }

    #[test]
    fn sharded_var_builder_serves_slices_and_whole_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let (dim, tp) = (16, 4);
        let full = attention_checkpoint(dir.path(), dim);
        let component = Component {
            dir: dir.path().to_path_buf(),
        };
        for rank in 0..tp {
            let vb = component
                .sharded_var_builder(DType::F32, &dev, tensor_parallel_plan(dim, tp, rank))
                .unwrap()
                .pp("blocks.0.attn1");
            let start = rank * dim / tp;
            let part = dim / tp;
            let q = vb.get((part, dim), "to_q.weight").unwrap();
            let q_bias = vb.get(part, "to_q.bias").unwrap();
            let out = vb.get((dim, part), "to_out.0.weight").unwrap();
            let out_bias = vb.get(dim, "to_out.0.bias").unwrap();
            assert_eq!(q.dtype(), DType::F32);
            assert_eq!(
                flat_f32(&q),
                flat_f32(&full[0].1.narrow(0, start, part).unwrap())
            );
            assert_eq!(
                flat_f32(&q_bias),
                flat_f32(&full[1].1.narrow(0, start, part).unwrap())
            );
            assert_eq!(
                flat_f32(&out),
                flat_f32(&full[2].1.narrow(1, start, part).unwrap())
            );
            assert_eq!(flat_f32(&out_bias), flat_f32(&full[3].1));

            // Asking for the whole shape of a sliced tensor is the model's mistake; say so.
            let err = vb.get((dim, dim), "to_q.weight").unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "to_q.weight[{start}..{} along dim 0]",
                    start + part
                )) && err.contains("model.safetensors"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_tensor_parallel_rank_materialises_a_tp_th_of_the_sharded_weights() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let (dim, tp) = (64, 4);
        attention_checkpoint(dir.path(), dim);
        let component = Component {
            dir: dir.path().to_path_buf(),
        };
        let whole = component.sharded_weights(ShardPlan::new()).unwrap();
        let whole_read = whole.bytes_read();
        let vb = VarBuilder::from_backend(Box::new(whole), DType::BF16, dev.clone());
        for name in ["to_q.weight", "to_q.bias", "to_out.0.weight"] {
            vb.pp("blocks.0.attn1").get_unchecked(name).unwrap();
        }
        let bf16 = 2u64;
        let sharded_total = (2 * dim * dim + dim) as u64 * bf16;
        assert_eq!(whole_read.get(), sharded_total);

        let mut sum = 0;
        for rank in 0..tp {
            let weights = component
                .sharded_weights(tensor_parallel_plan(dim, tp, rank))
                .unwrap();
            let read = weights.bytes_read();
            let vb = VarBuilder::from_backend(Box::new(weights), DType::BF16, dev.clone())
                .pp("blocks.0.attn1");
            let mut resident = 0;
            for (name, shape) in [
                ("to_q.weight", vec![dim / tp, dim]),
                ("to_q.bias", vec![dim / tp]),
                ("to_out.0.weight", vec![dim, dim / tp]),
            ] {
                let t = vb.get(shape, name).unwrap();
                resident += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            }
            assert_eq!(read.get(), sharded_total / tp as u64, "rank {rank}");
            assert_eq!(resident, sharded_total / tp as u64, "rank {rank}");
            sum += read.get();
        }
        assert_eq!(sum, sharded_total);
    }
}
