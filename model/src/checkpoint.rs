//! A model: a directory with `config.json` plus one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, or a GGUF file (given itself, or as the only `.gguf` of a
//! directory without safetensors). Opening it maps the files and reads only their headers;
//! [`Checkpoint::validate`] checks every tensor a subset needs (presence, dtype, shape) before
//! any compute, and [`Checkpoint::read`] touches only the bytes of the tensor asked for. Tensors
//! are asked for by their Hugging Face names whatever the file; a GGUF file's are mapped to
//! llama.cpp's (see [`crate::gguf_model`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, ModelConfig};
use crate::gguf::{GgufError, GgufFile, GgufMetadata};
use crate::gguf_model::{expert_rows, locate, unpermute_qk_order};
use crate::quant::{HostWeight, WeightBytes, WeightType};
use crate::safetensors::{SafetensorsError, SafetensorsFile};
use crate::weights::{LayerNames, Subset, TensorSpec};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{dir}: no model.safetensors, model.safetensors.index.json or .gguf file")]
    NoWeights { dir: PathBuf },
    #[error(
        "{dir}: {count} .gguf files and no safetensors; expected one, or give the file itself"
    )]
    ManyGguf { dir: PathBuf, count: usize },
    #[error("{path}: {source}")]
    GgufConfig { path: PathBuf, source: ConfigError },
    #[error(
        "{path}: not found; expected a model directory (config.json and safetensors) or a \
         GGUF file"
    )]
    NotFound { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Index { path: PathBuf, problem: String },
    #[error("tensor {name} is missing from the checkpoint (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {found:?}; expected {expected:?} from the model's config")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has dtype {found}; expected one of F32, F16, BF16")]
    Dtype { name: String, found: String },
    #[error("tensor {name}: {problem}")]
    Layout { name: String, problem: String },
    #[error(
        "tensor {name}: {path} is {len} bytes now; the tensor lies at bytes {start}..{end} \
         (was the file truncated or replaced while in use?)"
    )]
    Truncated {
        name: String,
        path: PathBuf,
        len: u64,
        start: usize,
        end: usize,
    },
    #[error("tensor {name}: cannot read {path}: {source}")]
    ReadTensor {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor {name} holds {value} at element {index}; expected finite weights")]
    NotFinite {
        name: String,
        index: usize,
        value: f32,
    },
}

/// The last component of `path` once made absolute (`.` names its directory), as a model's
/// name in the files written from it.
pub(crate) fn model_name(path: &Path) -> Option<String> {
    std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// One tensor as a checkpoint's file stores it (see [`Checkpoint::stored_tensors`]).
pub struct StoredTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub ty: WeightType,
    pub bytes: &'a [u8],
}

/// An opened model.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    source: Source,
}

enum Source {
    Safetensors {
        files: Vec<SafetensorsFile>,
        /// Tensor name → index into `files`.
        index: HashMap<String, usize>,
    },
    Gguf(GgufFile),
}

/// Where a tensor's bytes are, once found and checked against the shape asked for.
struct Located {
    ty: WeightType,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
    /// The file the bytes are in, and where (absolute offsets).
    file: PathBuf,
    range: Range<usize>,
    /// Rows to reorder (a GGUF Q/K projection): the head count.
    rope_heads: Option<usize>,
}

/// Where one tensor lies in its file, found from the headers: read with `pread` into owned
/// memory, never through the file's map. Expert offload reads the experts it does not keep
/// this way on demand, so a file truncated or removed while being served is an error on that
/// read instead of a SIGBUS, and bytes never read stay out of the process's memory.
#[derive(Debug, Clone)]
pub struct TensorOnDisk {
    name: String,
    path: PathBuf,
    range: Range<usize>,
    ty: WeightType,
    rows: usize,
    cols: usize,
    rope_heads: Option<usize>,
}

impl TensorOnDisk {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ty(&self) -> WeightType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes the tensor takes in the file.
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// [`TensorOnDisk::read`], then every value checked to be finite (as [`Checkpoint::read`]
    /// checks them): for the first read of a tensor.
    pub fn read_checked(&self) -> Result<HostWeight, CheckpointError> {
        finite(&self.name, self.read()?)
    }

    /// Opens the file again (so a file removed since is an error, not a read of the old one)
    /// and reads the tensor's bytes into an owned buffer. Values are not checked: the caller
    /// checked them on the first read ([`TensorOnDisk::read_checked`]).
    pub fn read(&self) -> Result<HostWeight, CheckpointError> {
        let io = |source| CheckpointError::ReadTensor {
            name: self.name.clone(),
            path: self.path.clone(),
            source,
        };
        let file = std::fs::File::open(&self.path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < self.range.end as u64 {
            return Err(CheckpointError::Truncated {
                name: self.name.clone(),
                path: self.path.clone(),
                len,
                start: self.range.start,
                end: self.range.end,
            });
        }
        // An anonymous map rather than the heap: a worker reads and drops experts all the
        // time, and a map's pages go back to the system when it is dropped, where freed heap
        // blocks between live ones would stay resident.
        let bytes = match self.range.len() {
            0 => WeightBytes::from(Vec::new()),
            len => {
                let mut buf = memmap2::MmapMut::map_anon(len).map_err(io)?;
                file.read_exact_at(&mut buf, self.range.start as u64)
                    .map_err(io)?;
                WeightBytes::Mapped {
                    map: std::sync::Arc::new(buf.make_read_only().map_err(io)?),
                    range: 0..len,
                }
            }
        };
        finish(
            &self.name,
            self.ty,
            self.rows,
            self.cols,
            bytes,
            self.rope_heads,
        )
    }
}

/// A tensor's bytes as a [`HostWeight`], its rows put back in Hugging Face order when it is a
/// GGUF Q/K projection (a copy).
fn finish(
    name: &str,
    ty: WeightType,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
    rope_heads: Option<usize>,
) -> Result<HostWeight, CheckpointError> {
    let layout = |problem: String| CheckpointError::Layout {
        name: name.to_string(),
        problem,
    };
    let mut weight = HostWeight::new(ty, rows, cols, bytes).map_err(|e| layout(e.to_string()))?;
    if let Some(heads) = rope_heads {
        let order = unpermute_qk_order(rows, heads).ok_or_else(|| {
            layout(format!(
                "{rows} rows do not split into {heads} heads of an even size"
            ))
        })?;
        weight = weight.permute_rows(&order);
    }
    Ok(weight)
}

/// `weight` if every value is finite.
fn finite(name: &str, weight: HostWeight) -> Result<HostWeight, CheckpointError> {
    match weight.first_non_finite() {
        None => Ok(weight),
        Some((index, value)) => Err(CheckpointError::NotFinite {
            name: name.to_string(),
            index,
            value,
        }),
    }
}

impl Checkpoint {
    /// Opens a model directory, a `.gguf` file, or a directory holding exactly one `.gguf`
    /// file and no safetensors.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        if path.is_file() {
            return Self::open_gguf(path);
        }
        if !path.exists() {
            return Err(CheckpointError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut ggufs = Vec::new();
        let mut safetensors = false;
        for entry in std::fs::read_dir(path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            match p.extension().and_then(|e| e.to_str()) {
                Some("gguf") => ggufs.push(p),
                Some("safetensors") => safetensors = true,
                _ => {}
            }
        }
        match ggufs.len() {
            1 if !safetensors => Self::open_gguf(&ggufs[0]),
            n if n > 1 && !safetensors => Err(CheckpointError::ManyGguf {
                dir: path.to_path_buf(),
                count: n,
            }),
            _ => Self::open_safetensors(path),
        }
    }

    fn open_gguf(file: &Path) -> Result<Self, CheckpointError> {
        let gguf = GgufFile::open(file)?;
        let config =
            ModelConfig::from_gguf(&gguf).map_err(|source| CheckpointError::GgufConfig {
                path: file.to_path_buf(),
                source,
            })?;
        Ok(Checkpoint {
            dir: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            config,
            source: Source::Gguf(gguf),
        })
    }

    fn open_safetensors(dir: &Path) -> Result<Self, CheckpointError> {
        let config = ModelConfig::load(dir)?;
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let bad = |problem: String| CheckpointError::Index {
                path: index_path.clone(),
                problem,
            };
            let text = std::fs::read_to_string(&index_path).map_err(|e| bad(e.to_string()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("missing object `weight_map`".into()))?;
            // Each shard is opened once, in name order, whatever order the map lists it in.
            let mut shard_names: BTreeMap<&str, usize> = BTreeMap::new();
            for v in map.values() {
                let f = v
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map value {v} is not a file name")))?;
                if f.contains('/') || f.contains("..") {
                    return Err(bad(format!("shard {f:?} is not a plain file name")));
                }
                shard_names.insert(f, 0);
            }
            for (i, (name, slot)) in shard_names.iter_mut().enumerate() {
                *slot = i;
                files.push(SafetensorsFile::open(&dir.join(name))?);
            }
            for (tensor, file) in map {
                let i = shard_names[file.as_str().expect("checked above")];
                if files[i].get(tensor).is_none() {
                    return Err(bad(format!(
                        "maps {tensor} to {} but that file does not hold it",
                        files[i].path().display()
                    )));
                }
                index.insert(tensor.clone(), i);
            }
        } else if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            index.extend(file.tensors().keys().map(|k| (k.clone(), 0)));
            files.push(file);
        } else {
            return Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            source: Source::Safetensors { files, index },
        })
    }

    /// The model's directory (for a GGUF file, the directory holding it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The GGUF file, when the model is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf(f) => Some(f),
            Source::Safetensors { .. } => None,
        }
    }

    /// The GGUF file's metadata (tokenizer, chat template, ...), when the model is one.
    pub fn metadata(&self) -> Option<&GgufMetadata> {
        self.gguf().map(GgufFile::metadata)
    }

    /// `name`, with the GGUF tensor it maps to when the file is GGUF.
    fn display_name(&self, name: &str) -> String {
        match self.gguf().and_then(|f| locate(name, &self.config, f)) {
            Some(l) => format!("{name} (GGUF {})", l.name),
            None => name.to_string(),
        }
    }

    fn has(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { index, .. } => index.contains_key(name),
            Source::Gguf(f) => {
                locate(name, &self.config, f).is_some_and(|l| f.tensor(&l.name).is_some())
            }
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Checks that every tensor `subset` needs is present with a float dtype and the shape the
    /// config implies. Reads headers only. The config's counts are compared with the file's
    /// tensors first (each layer's norm is there; the router has one row per expert), so a
    /// config that claims more layers or experts than the file holds is refused before the
    /// list of tensors is made from them.
    pub fn validate(&self, subset: &Subset) -> Result<(), CheckpointError> {
        let c = &self.config;
        let h = c.hidden_size;
        for layer in subset.layers.clone() {
            let norm = LayerNames::new(layer).input_norm();
            if !self.has(&norm) {
                return Err(CheckpointError::Missing {
                    name: self.display_name(&norm),
                    expected: vec![h],
                });
            }
        }
        if let (Some(moe), Some(first)) = (c.moe, subset.layers.clone().next()) {
            self.check(&TensorSpec {
                name: LayerNames::new(first).router(),
                shape: vec![moe.num_experts, h],
            })?;
        }
        for spec in c.tensor_specs(subset) {
            self.check(&spec)?;
        }
        Ok(())
    }

    fn check(&self, spec: &TensorSpec) -> Result<Located, CheckpointError> {
        let missing = |name: String| CheckpointError::Missing {
            name,
            expected: spec.shape.clone(),
        };
        let (rows, cols) = match spec.shape[..] {
            [cols] => (1, cols),
            [rows, cols] => (rows, cols),
            _ => unreachable!("model tensors are vectors or matrices"),
        };
        match &self.source {
            Source::Safetensors { files, index } => {
                let file = index
                    .get(&spec.name)
                    .map(|&i| &files[i])
                    .ok_or_else(|| missing(spec.name.clone()))?;
                let info = file.get(&spec.name).expect("indexed");
                let dtype = info.float_dtype().ok_or_else(|| CheckpointError::Dtype {
                    name: spec.name.clone(),
                    found: info.dtype.clone(),
                })?;
                if info.shape != spec.shape {
                    return Err(CheckpointError::Shape {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        found: info.shape.clone(),
                    });
                }
                Ok(Located {
                    ty: dtype.into(),
                    rows,
                    cols,
                    bytes: file.weight_bytes(info),
                    range: file.range(info),
                    file: file.path().to_path_buf(),
                    rope_heads: None,
                })
            }
            Source::Gguf(f) => {
                let loc = locate(&spec.name, &self.config, f)
                    .ok_or_else(|| missing(spec.name.clone()))?;
                let named = || self.display_name(&spec.name);
                let info = f.tensor(&loc.name).ok_or_else(|| missing(named()))?;
                let shape = info.shape();
                // A merged expert tensor is [experts, rows, cols]; one expert is its rows.
                let (expected, range) = match loc.expert {
                    None => (spec.shape.clone(), info.range.clone()),
                    Some(e) => {
                        let n = match shape[..] {
                            [n, _, _] => n,
                            _ => 0,
                        };
                        if e >= n {
                            return Err(CheckpointError::Shape {
                                name: named(),
                                expected: vec![e + 1, rows, cols],
                                found: shape,
                            });
                        }
                        let row_bytes = info.ty.row_bytes(cols).expect("checked when parsed");
                        let r = expert_rows(e, rows);
                        let start = info.range.start + r.start * row_bytes;
                        (
                            vec![n, rows, cols],
                            start..info.range.start + r.end * row_bytes,
                        )
                    }
                };
                if shape != expected {
                    return Err(CheckpointError::Shape {
                        name: named(),
                        expected,
                        found: shape,
                    });
                }
                Ok(Located {
                    ty: info.ty,
                    rows,
                    cols,
                    bytes: f.weight_bytes(range.clone()),
                    file: f.path().to_path_buf(),
                    range,
                    rope_heads: loc.rope_heads,
                })
            }
        }
    }

    /// One tensor in its stored type, checked against `shape` first (`[cols]` for a vector,
    /// `[rows, cols]` for a matrix) and for non-finite values. Its bytes stay in the file's map,
    /// except a GGUF file's Q and K projections, whose rows are put back in Hugging Face order
    /// (a copy).
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<HostWeight, CheckpointError> {
        let at = self.check(&TensorSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        })?;
        finite(
            name,
            finish(name, at.ty, at.rows, at.cols, at.bytes, at.rope_heads)?,
        )
    }

    /// Where one tensor lies in its file, checked against `shape` (`[cols]` or `[rows,
    /// cols]`); reads headers only.
    pub fn on_disk(&self, name: &str, shape: &[usize]) -> Result<TensorOnDisk, CheckpointError> {
        let at = self.check(&TensorSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        })?;
        Ok(TensorOnDisk {
            name: name.to_string(),
            path: at.file,
            range: at.range,
            ty: at.ty,
            rows: at.rows,
            cols: at.cols,
            rope_heads: at.rope_heads,
        })
    }

    /// [`Checkpoint::read`] into owned memory with `pread`, without touching the file's map:
    /// what a worker that offloads experts keeps, so that no weight it uses lives in a map a
    /// truncated file would turn into a SIGBUS.
    pub fn read_owned(&self, name: &str, shape: &[usize]) -> Result<HostWeight, CheckpointError> {
        self.on_disk(name, shape)?.read_checked()
    }

    /// Reads one tensor as f32, checking it against `shape` first.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Ok(self.read(name, shape)?.to_f32())
    }

    /// Bytes the tensors of `subset` take once loaded, each kept in `kept(its stored type)`
    /// (a CPU keeps the stored type, a GPU bf16). Reads headers only.
    pub fn subset_bytes(
        &self,
        subset: &Subset,
        kept: impl Fn(WeightType) -> WeightType,
    ) -> Result<u64, CheckpointError> {
        let mut total = 0u64;
        for spec in self.config.tensor_specs(subset) {
            let at = self.check(&spec)?;
            total = total.saturating_add(kept(at.ty).matrix_bytes(at.rows, at.cols));
        }
        Ok(total)
    }

    /// Every tensor as the files store it, in file order: its name there (llama.cpp's names in
    /// a GGUF file), row-major shape (outermost first), type and bytes. For tools that rewrite a
    /// checkpoint whole (`model upcycle`); the engine reads through [`Checkpoint::read`].
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor<'_>>, CheckpointError> {
        match &self.source {
            Source::Gguf(f) => Ok(f
                .tensors()
                .iter()
                .map(|info| StoredTensor {
                    name: &info.name,
                    shape: info.shape(),
                    ty: info.ty,
                    bytes: f.bytes(info),
                })
                .collect()),
            Source::Safetensors { files, .. } => {
                let mut out = Vec::new();
                for f in files {
                    for (name, info) in f.tensors() {
                        let dtype = info.float_dtype().ok_or_else(|| CheckpointError::Dtype {
                            name: name.clone(),
                            found: info.dtype.clone(),
                        })?;
                        out.push(StoredTensor {
                            name,
                            shape: info.shape.clone(),
                            ty: dtype.into(),
                            bytes: f.bytes(info),
                        });
                    }
                }
                Ok(out)
            }
        }
    }

    /// Bytes on disk per stored type (`BF16`, `Q4_K`, ...) over all tensors of the checkpoint.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        match &self.source {
            Source::Safetensors { files, .. } => {
                for f in files {
                    for info in f.tensors().values() {
                        *out.entry(info.dtype.clone()).or_default() += info.end - info.begin;
                    }
                }
            }
            Source::Gguf(f) => {
                for info in f.tensors() {
                    *out.entry(info.ty.name().to_string()).or_default() += info.range.len();
                }
            }
        }
        out
    }
}
