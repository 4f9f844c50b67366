//! A model directory: `config.json` plus one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Opening it maps the files and reads only their headers;
//! [`Checkpoint::validate`] checks every tensor a subset needs (presence, dtype, shape) before
//! any compute, and [`Checkpoint::read_f32`] touches only the bytes of the tensor asked for.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, ModelConfig};
use crate::quant::HostWeight;
use crate::safetensors::{Dtype, SafetensorsError, SafetensorsFile};
use crate::weights::{LayerNames, Subset, TensorSpec};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {problem}")]
    Index { path: PathBuf, problem: String },
    #[error("tensor {name} is missing from the checkpoint (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {found:?}; expected {expected:?} from config.json")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has dtype {found}; expected one of F32, F16, BF16")]
    Dtype { name: String, found: String },
    #[error("tensor {name}: {problem}")]
    Layout { name: String, problem: String },
    #[error("tensor {name} holds {value} at element {index}; expected finite weights")]
    NotFinite {
        name: String,
        index: usize,
        value: f32,
    },
}

/// An opened model directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
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
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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
            if !self.index.contains_key(&norm) {
                return Err(CheckpointError::Missing {
                    name: norm,
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

    fn check(&self, spec: &TensorSpec) -> Result<(Dtype, &SafetensorsFile), CheckpointError> {
        let (file, info) = self
            .index
            .get(&spec.name)
            .map(|&i| {
                (
                    &self.files[i],
                    self.files[i].get(&spec.name).expect("indexed"),
                )
            })
            .ok_or_else(|| CheckpointError::Missing {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            })?;
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
        Ok((dtype, file))
    }

    /// One tensor in its stored type, checked against `shape` first (`[cols]` for a vector,
    /// `[rows, cols]` for a matrix) and for non-finite values; its bytes stay in the file's map.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<HostWeight, CheckpointError> {
        let spec = TensorSpec {
            name: name.to_string(),
            shape: shape.to_vec(),
        };
        let (dtype, file) = self.check(&spec)?;
        let (rows, cols) = match shape {
            [cols] => (1, *cols),
            [rows, cols] => (*rows, *cols),
            _ => unreachable!("model tensors are vectors or matrices"),
        };
        let info = file.get(name).expect("checked");
        let weight =
            HostWeight::new(dtype.into(), rows, cols, file.weight_bytes(info)).map_err(|e| {
                CheckpointError::Layout {
                    name: name.to_string(),
                    problem: e.to_string(),
                }
            })?;
        match weight.first_non_finite() {
            None => Ok(weight),
            Some((index, value)) => Err(CheckpointError::NotFinite {
                name: name.to_string(),
                index,
                value,
            }),
        }
    }

    /// Reads one tensor as f32, checking it against `shape` first.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Ok(self.read(name, shape)?.to_f32())
    }

    /// Bytes on disk per dtype over all tensors of the checkpoint.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for f in &self.files {
            for info in f.tensors().values() {
                *out.entry(info.dtype.clone()).or_default() += info.end - info.begin;
            }
        }
        out
    }
}
