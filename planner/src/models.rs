//! What `--model` names: a preset of a published model's shapes (its `config.json`, no
//! weights), a local model directory or GGUF file (shapes and stored types from its headers),
//! or `org/name` found in the Hugging Face cache. And how many bytes a part of it takes when
//! stored in a given weight type.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use switchyard_model::quant::WeightType;
use switchyard_model::quantize::{tensor_types, Scheme};
use switchyard_model::{init, Checkpoint, ModelConfig, Subset};

/// Published models, shapes only: each one's `config.json` as its authors released it (the
/// fields Switchyard reads; tokenizer and generation fields left out).
pub const PRESETS: [(&str, &str, &str); 6] = [
    (
        "mixtral-8x7b",
        "mistralai/Mixtral-8x7B-v0.1",
        r#"{"architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 32000}"#,
    ),
    (
        "mixtral-8x22b",
        "mistralai/Mixtral-8x22B-v0.1",
        r#"{"architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 6144, "intermediate_size": 16384, "max_position_embeddings": 65536,
        "num_attention_heads": 48, "num_experts_per_tok": 2, "num_hidden_layers": 56,
        "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 32000}"#,
    ),
    (
        "mistral-7b",
        "mistralai/Mistral-7B-v0.1",
        r#"{"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000}"#,
    ),
    (
        "llama-2-7b",
        "meta-llama/Llama-2-7b-hf",
        r#"{"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "torch_dtype": "float16", "vocab_size": 32000}"#,
    ),
    (
        "llama-2-13b",
        "meta-llama/Llama-2-13b-hf",
        r#"{"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 5120, "intermediate_size": 13824, "max_position_embeddings": 4096,
        "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "torch_dtype": "float16", "vocab_size": 32000}"#,
    ),
    (
        "llama-2-70b",
        "meta-llama/Llama-2-70b-hf",
        r#"{"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_size": 8192, "intermediate_size": 28672, "max_position_embeddings": 4096,
        "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "torch_dtype": "float16", "vocab_size": 32000}"#,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--model {name}: {source}")]
    Checkpoint {
        name: String,
        #[source]
        source: switchyard_model::CheckpointError,
    },
    #[error("--model {name}: {source}")]
    Config {
        name: String,
        #[source]
        source: switchyard_model::ConfigError,
    },
    #[error("--model {name}: not a local path, and no Hugging Face cache of it under {cache} (download it first, e.g. `huggingface-cli download {name} config.json`); or name a preset: {presets}")]
    NotCached {
        name: String,
        cache: String,
        presets: String,
    },
    #[error("--model {name}: no such file or directory, and not a preset; expected a model directory, a .gguf file, org/name from the Hugging Face cache, or a preset: {presets}")]
    Unknown { name: String, presets: String },
}

/// How the weights are stored, which decides the bytes a worker keeping stored types holds.
pub enum Storage {
    /// A checkpoint on disk: its tensors' own types.
    Checkpoint(Box<Checkpoint>),
    /// A float type: a Hugging Face safetensors checkpoint, every tensor in it.
    Float(WeightType),
    /// A block type: the GGUF `switchyard model quantize` writes (vectors and the router F32,
    /// matrices in the scheme's types), by tensor name.
    Quantized {
        name: String,
        types: BTreeMap<String, WeightType>,
    },
}

/// A model to plan for.
pub struct Model {
    /// What `--model` said.
    pub name: String,
    /// Where the shapes come from: a preset's Hub id, or a path.
    pub origin: String,
    pub config: ModelConfig,
    pub storage: Storage,
}

fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.0)
        .chain(init::PRESETS)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
fn hub_cache() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// `org/name`'s snapshot in the hub cache: the one `refs/main` names, else any with a
/// `config.json`.
fn cached_snapshot(cache: &Path, name: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", name.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|d| d.join("config.json").is_file())
}

impl Model {
    /// A model directory or GGUF file: its shapes and stored types, from its headers.
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        let name = path.display().to_string();
        let ckpt = Checkpoint::open(path).map_err(|source| ModelError::Checkpoint {
            name: name.clone(),
            source,
        })?;
        Ok(Model {
            origin: name.clone(),
            name,
            config: ckpt.config().clone(),
            storage: Storage::Checkpoint(Box::new(ckpt)),
        })
    }

    /// Resolves `--model`: a path first, then a preset, then `org/name` in the hub cache.
    pub fn resolve(name: &str) -> Result<Model, ModelError> {
        let path = Path::new(name);
        if path.exists() {
            return Model::open(path);
        }
        let config_err = |source| ModelError::Config {
            name: name.into(),
            source,
        };
        if let Some((_, hub, json)) = PRESETS.iter().find(|p| p.0.eq_ignore_ascii_case(name)) {
            return Ok(Model {
                name: name.to_ascii_lowercase(),
                origin: format!("{hub} (config.json, shapes only)"),
                config: ModelConfig::from_json_str(json).map_err(config_err)?,
                storage: Storage::Float(WeightType::BF16),
            });
        }
        if let Ok(config) = init::preset(name) {
            return Ok(Model {
                name: name.into(),
                origin: "switchyard model init preset (shapes only)".into(),
                config,
                storage: Storage::Float(WeightType::BF16),
            });
        }
        if name.split('/').count() == 2 && !name.starts_with(['/', '.']) {
            let cache = hub_cache();
            if let Some(dir) = cache.as_deref().and_then(|c| cached_snapshot(c, name)) {
                // Weights there too: their stored types; only config.json: shapes in bf16.
                return Ok(match Checkpoint::open(&dir) {
                    Ok(ckpt) => Model {
                        name: name.into(),
                        origin: dir.display().to_string(),
                        config: ckpt.config().clone(),
                        storage: Storage::Checkpoint(Box::new(ckpt)),
                    },
                    Err(_) => Model {
                        name: name.into(),
                        origin: format!("{} (config.json, shapes only)", dir.display()),
                        config: ModelConfig::load(&dir).map_err(config_err)?,
                        storage: Storage::Float(WeightType::BF16),
                    },
                });
            }
            return Err(ModelError::NotCached {
                name: name.into(),
                cache: cache.map_or("(no HOME)".into(), |c| c.display().to_string()),
                presets: preset_names(),
            });
        }
        Err(ModelError::Unknown {
            name: name.into(),
            presets: preset_names(),
        })
    }

    /// The same shapes stored in `scheme` instead (`--dtype`).
    pub fn stored_as(mut self, scheme: Scheme) -> Model {
        self.storage = match scheme {
            Scheme::Plain(ty) if !ty.is_quantized() => Storage::Float(ty),
            _ => Storage::Quantized {
                name: scheme_name(scheme),
                types: tensor_types(&self.config, scheme),
            },
        };
        self
    }

    /// Bytes of `subset`'s tensors as stored: what a worker keeping stored types holds. A
    /// checkpoint is counted as the coordinator counts it
    /// ([`switchyard_coordinator::placement::stored_bytes`]).
    pub fn stored_bytes(&self, subset: &Subset) -> u64 {
        match &self.storage {
            Storage::Checkpoint(ckpt) => {
                switchyard_coordinator::placement::stored_bytes(ckpt, subset)
            }
            Storage::Float(ty) => self.config.subset_params(subset) * ty.block_bytes() as u64,
            Storage::Quantized { types, .. } => self
                .config
                .tensor_specs(subset)
                .iter()
                .map(|s| {
                    let cols = s.shape[s.shape.len() - 1];
                    let rows = s.shape[..s.shape.len() - 1].iter().product();
                    // Every tensor of the config has a type: both lists come from its shapes.
                    types
                        .get(&s.name)
                        .map_or(u64::MAX / 4, |ty| ty.matrix_bytes(rows, cols))
                })
                .sum(),
        }
    }

    /// How the weights are stored, for people: `bf16`, `q4_k_m`, `as stored (BF16)`.
    pub fn storage_name(&self) -> String {
        match &self.storage {
            Storage::Checkpoint(ckpt) => {
                let types: Vec<String> = ckpt.bytes_by_dtype().into_keys().collect();
                format!("as stored ({})", types.join("+"))
            }
            Storage::Float(ty) => ty.name().to_ascii_lowercase(),
            Storage::Quantized { name, .. } => name.clone(),
        }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({} from {}, {})",
            self.name,
            self.origin,
            self.storage_name()
        )
    }
}

/// `--dtype`'s name of a scheme.
pub fn scheme_name(scheme: Scheme) -> String {
    match scheme {
        Scheme::Q4KM => "q4_k_m".into(),
        Scheme::Plain(ty) => ty.name().to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> Model {
        Model::resolve(name).unwrap()
    }

    /// The presets' parameter counts are the published ones.
    #[test]
    fn presets_have_the_published_sizes() {
        let billions = |name: &str| {
            let p = preset(name).config.param_counts();
            (
                (p.total as f64 / 1e8).round() / 10.0,
                (p.active_per_token as f64 / 1e8).round() / 10.0,
            )
        };
        // Mistral AI: 46.7B total, 12.9B active; 141B total, 39B active.
        assert_eq!(billions("mixtral-8x7b"), (46.7, 12.9));
        assert_eq!(billions("mixtral-8x22b"), (140.6, 39.2));
        // Mistral 7B: 7.24B; Llama 2 (Meta's model card): 7B, 13B, 70B (6.74, 13.0, 69.0).
        assert_eq!(billions("mistral-7b").0, 7.2);
        assert_eq!(billions("llama-2-7b").0, 6.7);
        assert_eq!(billions("llama-2-13b").0, 13.0);
        assert_eq!(billions("llama-2-70b").0, 69.0);
        assert_eq!(preset("llama-2-70b").config.num_kv_heads, 8);
        assert_eq!(preset("mistral-7b").config.sliding_window, Some(4096));
    }

    #[test]
    fn mixtral_8x7b_in_bf16_is_about_93_gb() {
        let m = preset("mixtral-8x7b");
        let all = Subset::all(&m.config);
        let bf16 = m.stored_bytes(&all);
        assert_eq!(bf16, m.config.param_counts().total * 2);
        assert_eq!((bf16 as f64 / 1e9).round(), 93.0);
        assert_eq!(m.storage_name(), "bf16");
        // Q8_0: 34 bytes per 32 values, the router and norms f32: about 49.6 GB.
        let q8 = preset("mixtral-8x7b").stored_as(Scheme::Plain(WeightType::Q8_0));
        let b = q8.stored_bytes(&all) as f64;
        let ideal = m.config.param_counts().total as f64 * 34.0 / 32.0;
        assert!((b / ideal - 1.0).abs() < 0.001, "{b} vs {ideal}");
        // Q4_K_M: 4.5 bits for most, 6.56 for a part: between the two.
        let q4 = preset("mixtral-8x7b").stored_as(Scheme::Q4KM);
        let b = q4.stored_bytes(&all) as f64 / m.config.param_counts().total as f64;
        assert!(b > 4.5 / 8.0 && b < 5.5 / 8.0, "{b} bytes per parameter");
        assert_eq!(q4.storage_name(), "q4_k_m");
    }

    #[test]
    fn unknown_models_are_refused_with_the_choices() {
        let e = Model::resolve("mixtral-9x9b").unwrap_err().to_string();
        assert!(e.contains("not a preset"), "{e}");
        assert!(e.contains("mixtral-8x7b, mixtral-8x22b"), "{e}");
        let e = Model::resolve("nobody/nothing-here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Hugging Face cache of it"), "{e}");
    }

    #[test]
    fn a_hub_cache_snapshot_is_found() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), PRESETS[2].2).unwrap();
        assert_eq!(cached_snapshot(cache.path(), "acme/tiny"), Some(snap));
        assert_eq!(cached_snapshot(cache.path(), "acme/other"), None);
    }

    #[test]
    fn a_local_checkpoint_keeps_its_stored_types() {
        let dir = tempfile::tempdir().unwrap();
        let c = init::preset("tiny-mixtral").unwrap();
        init::write_model_dir(
            dir.path(),
            &c,
            1,
            switchyard_model::safetensors::Dtype::BF16,
            None,
        )
        .unwrap();
        let m = Model::resolve(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(m.config.param_counts(), c.param_counts());
        assert_eq!(m.storage_name(), "as stored (BF16)");
        let all = Subset::all(&c);
        assert_eq!(m.stored_bytes(&all), c.param_counts().total * 2);
    }
}
