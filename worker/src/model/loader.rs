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
//! Every model gets its weights from one backend, [`Weights`]: a source of full tensors (the
//! checkpoint's safetensors files through [`SafetensorsWeights`], or weights made from a seed and
//! the tensor's full name with the same counter-based generator as the initial noise, for the
//! built-in `tiny` model and benchmarks), optionally cut by a [`ShardPlan`] to a tensor-parallel
//! rank's slices and optionally recording what it hands out. From files a rank copies only its
//! slices out of the memory map ([`SafetensorsWeights::load_slice`]), so it materialises about
//! 1/tp of the sharded weights.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    #[error(transparent)]
    Builtin(#[from] super::builtin::BuiltinError),
    #[error("{}: {field}: {reason}", path.display())]
    InvalidField {
        path: PathBuf,
        field: String,
        reason: String,
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

    /// The component's weights (see [`Weights`]): whole, until given a [`ShardPlan`].
    pub fn weights(&self) -> Result<Weights, LoadError> {
        Ok(Weights::files(SafetensorsWeights::open(
            &self.weight_files()?,
        )?))
    }

    /// A `VarBuilder` over the component's weights, converting them to `dtype` on `device`.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, LoadError> {
        Ok(self.weights()?.var_builder(dtype, device))
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
/// name it: the file source of [`Weights`], and the reader of reference fixtures.
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

/// A slice of one tensor: `range` along dimension `dim`, whose full length is `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub range: Range<usize>,
    /// The whole tensor's length along `dim`: seeded weights make the whole tensor to cut the
    /// slice from; files know it themselves.
    pub len: usize,
}

impl Shard {
    /// Rows `range` of a matrix with `len` rows (dim 0): a column-parallel linear layer's output
    /// features, or a bias's entries.
    pub fn rows(range: Range<usize>, len: usize) -> Self {
        Self { dim: 0, range, len }
    }

    /// Columns `range` of a matrix with `len` columns (dim 1): a row-parallel linear layer's
    /// input features.
    pub fn cols(range: Range<usize>, len: usize) -> Self {
        Self { dim: 1, range, len }
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

/// Where a [`Weights`] backend takes its full tensors from.
enum Source {
    /// Checkpoint files (one, or the shards of an index); a slice is read straight from the
    /// memory map.
    Files(SafetensorsWeights),
    /// Tensors made from a seed and the tensor's full name, `prefix` + the name asked for (see
    /// [`seeded_values`]).
    Seeded { seed: u64, prefix: String },
    /// Tensors drawn by the device's own generator with the seeded weights' distributions
    /// ([`seeded_init`]): for timing model sizes whose seeded weights would take minutes to make
    /// on the host (a 14B model's 14·10⁹ values). Not reproducible across devices.
    DeviceRandom,
}

/// The tensors a [`Weights`] backend has handed out, by name, when asked to keep them
/// ([`Weights::recorded`]), e.g. to write a seeded model to a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Recorded(Arc<Mutex<HashMap<String, Tensor>>>);

impl Recorded {
    /// Takes the tensors recorded so far.
    pub fn take(&self) -> HashMap<String, Tensor> {
        self.0
            .lock()
            .map(|mut seen| std::mem::take(&mut *seen))
            .unwrap_or_default()
    }

    fn keep(&self, name: &str, tensor: &Tensor) {
        if let Ok(mut seen) = self.0.lock() {
            seen.insert(name.to_string(), tensor.clone());
        }
    }
}

/// The one weight backend behind every model's `VarBuilder`: a source of full tensors
/// (checkpoint safetensors files, or weights made from a seed), of which the tensors a
/// [`ShardPlan`] names are served as a tensor-parallel rank's slices and every other tensor
/// whole. The model asks for a planned tensor under its full name with the slice's shape; from
/// files only the slice's bytes are read, seeded weights make the full tensor (the plan gives
/// its length along the sliced dimension) and keep the slice, so the slices of all ranks put
/// together are the single-process model's tensors.
pub struct Weights {
    source: Source,
    plan: ShardPlan,
    recorded: Option<Recorded>,
}

impl Weights {
    /// The tensors of checkpoint files, whole.
    pub fn files(files: SafetensorsWeights) -> Self {
        Self::from_source(Source::Files(files))
    }

    /// Weights made from `seed`: each tensor is a pure function of (seed, name, shape).
    pub fn seeded(seed: u64) -> Self {
        Self::seeded_under(seed, "")
    }

    /// [`Self::seeded`] with every tensor made as if it were called `prefix.name`: the same
    /// tensors as a seeded `VarBuilder` scoped with `pp(prefix)`, while a [`ShardPlan`] sees the
    /// names the model asks for.
    pub fn seeded_under(seed: u64, prefix: &str) -> Self {
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        };
        Self::from_source(Source::Seeded { seed, prefix })
    }

    fn from_source(source: Source) -> Self {
        Self {
            source,
            plan: ShardPlan::new(),
            recorded: None,
        }
    }

    /// Weights drawn on the device they are asked for (see [`Source::DeviceRandom`]); seed the
    /// device (`Device::set_seed`) for repeatable draws on one device.
    pub fn device_random() -> Self {
        Self::from_source(Source::DeviceRandom)
    }

    /// Serves the tensors `plan` names as slices.
    pub fn sharded(mut self, plan: ShardPlan) -> Self {
        self.plan = plan;
        self
    }

    /// Keeps every tensor handed out; the handle reads them.
    pub fn recorded(mut self) -> (Self, Recorded) {
        let recorded = Recorded::default();
        self.recorded = Some(recorded.clone());
        (self, recorded)
    }

    /// A handle on the count of bytes copied out of the weight files (seeded weights read none).
    pub fn bytes_read(&self) -> ByteCounter {
        match &self.source {
            Source::Files(files) => files.bytes_read(),
            Source::Seeded { .. } | Source::DeviceRandom => ByteCounter::default(),
        }
    }

    /// A `VarBuilder` over these weights, converting them to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// `name` as errors show it: with its slice where the plan names one.
    fn shown(name: &str, shard: &Option<Shard>) -> String {
        match shard {
            Some(Shard { dim, range, .. }) => {
                format!("{name}[{}..{} along dim {dim}]", range.start, range.end)
            }
            None => name.to_string(),
        }
    }

    /// Tensor `name` (its slice where the plan names one) from the files, converted to `dtype`.
    fn load_file(
        files: &SafetensorsWeights,
        name: &str,
        shard: &Option<Shard>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor, LoadError> {
        match shard {
            Some(Shard { dim, range, .. }) => {
                let slice = files.load_slice(name, *dim, range.clone(), dev)?;
                files.convert(name, slice, dtype)
            }
            None => files.load_as(name, dtype, dev),
        }
    }

    /// Seeded tensor `name` of `shape` (the slice's shape where the plan names one).
    fn make_seeded(
        seed: u64,
        full_name: &str,
        shape: &Shape,
        shard: &Option<Shard>,
        hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(Shard { dim, range, len }) = shard else {
            let values = seeded_values(seed, full_name, shape, hint);
            return Tensor::from_vec(values, shape.clone(), dev)?.to_dtype(dtype);
        };
        let mut full = shape.dims().to_vec();
        if *dim >= full.len() || range.end > *len {
            candle_core::bail!(
                "`{}`: cannot take {}..{} of {len} along dim {dim} of shape {:?}",
                Self::shown(full_name, shard),
                range.start,
                range.end,
                shape.dims()
            );
        }
        full[*dim] = *len;
        let full = Shape::from(full);
        let values = seeded_values(seed, full_name, &full, hint);
        let slice = Tensor::from_vec(values, full, dev)?
            .to_dtype(dtype)?
            .narrow(*dim, range.start, range.len())?
            .contiguous()?;
        if slice.shape() != shape {
            candle_core::bail!(
                "`{full_name}`[{}..{} along dim {dim}] has shape {:?}, the model expects {:?}",
                range.start,
                range.end,
                slice.dims(),
                shape.dims()
            );
        }
        Ok(slice)
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let shard = self.plan.shard_of(name);
        let tensor = match &self.source {
            Source::Files(files) => {
                let tensor = Self::load_file(files, name, &shard, dtype, dev)
                    .map_err(candle_core::Error::wrap)?;
                if tensor.shape() != &shape {
                    return Err(candle_core::Error::wrap(files.shape_mismatch(
                        name,
                        Self::shown(name, &shard),
                        &shape,
                        &tensor,
                    )));
                }
                tensor
            }
            Source::Seeded { seed, prefix } => Self::make_seeded(
                *seed,
                &format!("{prefix}{name}"),
                &shape,
                &shard,
                hint,
                dtype,
                dev,
            )?,
            Source::DeviceRandom => {
                if shard.is_some() {
                    candle_core::bail!(
                        "device-drawn weights are not sliced: `{name}` is in the plan"
                    );
                }
                match seeded_init(name, shape.dims(), hint) {
                    SeededInit::Fill(value) => {
                        Tensor::full(value, shape.clone(), dev)?.to_dtype(dtype)?
                    }
                    SeededInit::Normal(std) => {
                        Tensor::randn(0f32, std, shape.clone(), dev)?.to_dtype(dtype)?
                    }
                }
            }
        };
        if let Some(recorded) = &self.recorded {
            recorded.keep(name, &tensor);
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.source {
            Source::Files(files) => {
                let tensor = Self::load_file(files, name, &self.plan.shard_of(name), dtype, dev)
                    .map_err(candle_core::Error::wrap)?;
                if let Some(recorded) = &self.recorded {
                    recorded.keep(name, &tensor);
                }
                Ok(tensor)
            }
            Source::Seeded { .. } | Source::DeviceRandom => {
                candle_core::bail!("seeded weights need a shape for tensor `{name}`")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Files(files) => files.location.contains_key(name),
            Source::Seeded { .. } | Source::DeviceRandom => true,
        }
    }
}

/// How a seeded tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SeededInit {
    /// Every value the same.
    Fill(f32),
    /// N(0, std²).
    Normal(f32),
}

/// The distribution of seeded tensor `name` with `dims`: matrices and kernels get N(0, 1/fan_in)
/// entries, which keeps activations at unit scale through random layers; vectors named like
/// norm scales get ones; other vectors (biases, modulation tables) small N(0, 0.02²) values.
/// Non-zero `Init::Const` hints are honoured.
pub fn seeded_init(name: &str, dims: &[usize], hint: Init) -> SeededInit {
    if let Init::Const(c) = hint {
        if c != 0.0 {
            return SeededInit::Fill(c as f32);
        }
    }
    let is_norm_scale = dims.len() == 1
        && (name.ends_with("norm.weight")
            || name.contains("norm") && name.ends_with(".weight")
            || name.ends_with(".gamma")
            || name.ends_with("layer_norm.weight"));
    if is_norm_scale {
        return SeededInit::Fill(1.0);
    }
    SeededInit::Normal(if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        1.0 / (fan_in.max(1) as f32).sqrt()
    } else {
        0.02
    })
}

/// The values of seeded tensor `name` of `shape`, for the built-in tiny model and for
/// benchmarks: a pure function of (seed, tensor name, shape), so a model built twice is
/// identical on every machine. Drawn as [`seeded_init`] says.
fn seeded_values(seed: u64, name: &str, shape: &Shape, hint: Init) -> Vec<f32> {
    let n = shape.elem_count();
    let scale = match seeded_init(name, shape.dims(), hint) {
        SeededInit::Fill(value) => return vec![value; n],
        SeededInit::Normal(std) => std,
    };
    // FNV-1a of the name picks the stream, so tensors do not share values.
    let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    noise::gaussian(seed, stream, 0, n)
        .into_iter()
        .map(|v| v * scale)
        .collect()
}

/// A `VarBuilder` whose every tensor is made from `seed` (see [`Weights::seeded`]).
pub fn seeded_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    Weights::seeded(seed).var_builder(dtype, device)
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
    fn device_drawn_weights_follow_the_seeded_distributions() -> candle_core::Result<()> {
        let rms = |t: Tensor| -> candle_core::Result<f32> {
            Ok(t.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt())
        };
        let vb = Weights::device_random().var_builder(DType::F32, &Device::Cpu);
        let std = rms(vb.get((256, 400), "blocks.0.ffn.net.2.weight")?)?;
        assert!(
            (std - 0.05).abs() < 0.002,
            "std {std}, 1/√400 = 0.05 expected"
        );
        let norm = vb.get(8, "norm_q.weight")?.to_vec1::<f32>()?;
        assert_eq!(norm, vec![1.0; 8]);
        let std = rms(vb.get(4096, "to_q.bias")?)?;
        assert!((std - 0.02).abs() < 0.002, "bias std {std}");
        assert_eq!(
            seeded_init("norm_q.weight", &[8], Init::Const(0.0)),
            SeededInit::Fill(1.0)
        );
        Ok(())
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
            .tensor("blocks.0.attn1.to_q.bias", Shard::rows(parts.clone(), dim))
            .rule(move |name| {
                name.ends_with("to_q.weight")
                    .then(|| Shard::rows(parts.clone(), dim))
            })
            .rule(move |name| {
                name.ends_with("to_out.0.weight")
                    .then(|| Shard::cols(cols.clone(), dim))
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
                .weights()
                .unwrap()
                .sharded(tensor_parallel_plan(dim, tp, rank))
                .var_builder(DType::F32, &dev)
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
        let whole = component.weights().unwrap();
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
                .weights()
                .unwrap()
                .sharded(tensor_parallel_plan(dim, tp, rank));
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

    #[test]
    fn seeded_slices_put_together_are_the_seeded_tensors() {
        let dev = Device::Cpu;
        let (dim, tp) = (16, 4);
        let whole = seeded_var_builder(9, DType::F32, &dev).pp("tiny");
        let q = whole.get((dim, dim), "blocks.0.attn1.to_q.weight").unwrap();
        let q_bias = whole.get(dim, "blocks.0.attn1.to_q.bias").unwrap();
        let out = whole
            .get((dim, dim), "blocks.0.attn1.to_out.0.weight")
            .unwrap();
        let out_bias = whole.get(dim, "blocks.0.attn1.to_out.0.bias").unwrap();
        for rank in 0..tp {
            let vb = Weights::seeded_under(9, "tiny")
                .sharded(tensor_parallel_plan(dim, tp, rank))
                .var_builder(DType::F32, &dev)
                .pp("blocks.0.attn1");
            let (start, part) = (rank * dim / tp, dim / tp);
            let got = vb.get((part, dim), "to_q.weight").unwrap();
            assert_eq!(flat_f32(&got), flat_f32(&q.narrow(0, start, part).unwrap()));
            let got = vb.get(part, "to_q.bias").unwrap();
            assert_eq!(
                flat_f32(&got),
                flat_f32(&q_bias.narrow(0, start, part).unwrap())
            );
            let got = vb.get((dim, part), "to_out.0.weight").unwrap();
            assert_eq!(
                flat_f32(&got),
                flat_f32(&out.narrow(1, start, part).unwrap())
            );
            assert_eq!(
                flat_f32(&vb.get(dim, "to_out.0.bias").unwrap()),
                flat_f32(&out_bias)
            );
            let err = vb.get((dim, dim), "to_q.weight").unwrap_err().to_string();
            assert!(err.contains("to_q.weight"), "{err}");
        }
    }

    #[test]
    fn recorded_weights_keep_what_they_hand_out() {
        let dev = Device::Cpu;
        let (weights, recorded) = Weights::seeded(4).recorded();
        let vb = weights.var_builder(DType::F32, &dev);
        let a = vb.get((2, 3), "a.weight").unwrap();
        vb.get(3, "b.bias").unwrap();
        let kept = recorded.take();
        assert_eq!(kept.len(), 2);
        assert_eq!(flat_f32(&kept["a.weight"]), flat_f32(&a));
        assert!(recorded.take().is_empty());
    }
}
