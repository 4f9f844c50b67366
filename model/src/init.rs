//! `switchyard model init`: complete Hugging Face model directories with seeded random weights,
//! for tests, demos and benchmarks. What is written is exactly what a real checkpoint holds
//! (classic `config.json`, safetensors, optionally sharded with an index, `tokenizer.json`,
//! `tokenizer_config.json`), so every loader path is exercised.

use std::path::Path;

use crate::config::{Arch, ModelConfig, MoeConfig};
use crate::rng::Rng;
use crate::safetensors::{self, Dtype, OwnedTensor};
use crate::weights::Subset;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("unknown preset {name:?}; expected one of {}", PRESETS.join(", "))]
    UnknownPreset { name: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub const PRESETS: [&str; 4] = [
    "tiny-mixtral",
    "tiny-mistral",
    "tiny-llama",
    "small-mixtral",
];

/// The config of a named preset.
pub fn preset(name: &str) -> Result<ModelConfig, InitError> {
    let base = ModelConfig {
        arch: Arch::Mixtral,
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        max_position_embeddings: 4096,
        sliding_window: None,
        tie_word_embeddings: false,
        moe: Some(MoeConfig {
            num_experts: 4,
            top_k: 2,
        }),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: Some(Dtype::F32),
    };
    Ok(match name {
        "tiny-mixtral" => base,
        "tiny-mistral" => ModelConfig {
            arch: Arch::Mistral,
            moe: None,
            sliding_window: Some(16),
            rope_theta: 10000.0,
            ..base
        },
        // head_dim differs from hidden/heads and the head is tied: both paths stay exercised.
        "tiny-llama" => ModelConfig {
            arch: Arch::Llama,
            moe: None,
            head_dim: 32,
            intermediate_size: 160,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            rms_norm_eps: 1e-6,
            ..base
        },
        // ~0.28B parameters (82M active): large enough that the CPU benchmark measures
        // matrix products, small enough for a 2-core machine.
        "small-mixtral" => ModelConfig {
            vocab_size: 32000,
            hidden_size: 512,
            intermediate_size: 1536,
            num_layers: 12,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 64,
            moe: Some(MoeConfig {
                num_experts: 8,
                top_k: 2,
            }),
            ..base
        },
        other => {
            return Err(InitError::UnknownPreset {
                name: other.to_string(),
            })
        }
    })
}

/// Seeded random values for one tensor. Each tensor has its own stream, so the values do not
/// depend on which other tensors are written or in which order.
fn random_tensor(config: &ModelConfig, name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let mut rng = Rng::for_stream(seed, name);
    let n: usize = shape.iter().product();
    if name.ends_with("norm.weight") {
        // Perturbed around 1 so a mis-mapped norm shows in the output.
        return (0..n).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect();
    }
    // Embedding rows ~N(0, 1); matrices scaled by fan-in so activations and logits stay O(1)
    // through the layers and greedy choices are not near-ties.
    let std = if name == crate::weights::EMBEDDING && !config.tie_word_embeddings {
        1.0
    } else {
        1.0 / (shape[shape.len() - 1] as f64).sqrt()
    };
    (0..n).map(|_| (std * rng.normal()) as f32).collect()
}

/// Writes a full model directory for `config` into `out`. With `max_shard_bytes`, the weights
/// are split into `model-0000i-of-0000n.safetensors` files with an index, as large checkpoints are.
pub fn write_model_dir(
    out: &Path,
    config: &ModelConfig,
    seed: u64,
    dtype: Dtype,
    max_shard_bytes: Option<usize>,
) -> Result<(), InitError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| InitError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let config = ModelConfig {
        dtype: Some(dtype),
        ..config.clone()
    };

    // Group tensors into shards in spec order (layer by layer, as real checkpoints are).
    let specs = config.tensor_specs(&Subset::all(&config));
    let mut shards: Vec<Vec<&crate::weights::TensorSpec>> = vec![vec![]];
    let mut shard_bytes = 0;
    for spec in &specs {
        let bytes = spec.shape.iter().product::<usize>() * dtype.size();
        if let Some(max) = max_shard_bytes {
            if shard_bytes > 0 && shard_bytes + bytes > max {
                shards.push(vec![]);
                shard_bytes = 0;
            }
        }
        shard_bytes += bytes;
        shards.last_mut().expect("non-empty").push(spec);
    }

    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = if max_shard_bytes.is_some() {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        } else {
            "model.safetensors".to_string()
        };
        let tensors: Vec<OwnedTensor> = shard
            .iter()
            .map(|spec| OwnedTensor {
                name: spec.name.clone(),
                dtype,
                shape: spec.shape.clone(),
                data: safetensors::from_f32(
                    dtype,
                    &random_tensor(&config, &spec.name, &spec.shape, seed),
                ),
            })
            .collect();
        for t in &tensors {
            weight_map.insert(t.name.clone(), file.clone().into());
            total_size += t.data.len();
        }
        let path = out.join(&file);
        safetensors::write(&path, &tensors.iter().collect::<Vec<_>>()).map_err(io(&path))?;
    }

    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(io(&path))
    };
    if max_shard_bytes.is_some() {
        let index =
            serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write("model.safetensors.index.json", pretty(&index))?;
    }
    write("config.json", pretty(&config.to_hf_json()))?;
    write(
        "tokenizer.json",
        crate::tokenizer::synthetic_tokenizer_json(config.vocab_size),
    )?;
    // No chat template: the tokenizer falls back to Mistral's instruct format.
    write(
        "tokenizer_config.json",
        pretty(
            &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                   "add_bos_token": true, "add_eos_token": false}),
        ),
    )?;
    Ok(())
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON value serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;

    #[test]
    fn presets_parse_and_unknown_is_named() {
        for p in PRESETS {
            let c = preset(p).unwrap();
            assert_eq!(
                ModelConfig::from_json_str(&c.to_hf_json().to_string()).unwrap(),
                c
            );
        }
        let e = preset("huge").unwrap_err().to_string();
        assert!(e.contains("huge") && e.contains("tiny-mixtral"), "{e}");
        let small = preset("small-mixtral").unwrap().param_counts();
        assert!(
            (200_000_000..500_000_000).contains(&small.total),
            "{small:?}"
        );
    }

    #[test]
    fn sharded_and_single_hold_the_same_values() {
        let c = preset("tiny-mixtral").unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_model_dir(a.path(), &c, 5, Dtype::BF16, None).unwrap();
        write_model_dir(b.path(), &c, 5, Dtype::BF16, Some(40_000)).unwrap();
        assert!(b.path().join("model.safetensors.index.json").exists());
        let shards = std::fs::read_dir(b.path())
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("model-0")
            })
            .count();
        assert!(shards > 2, "{shards} shards");
        let (ca, cb) = (
            Checkpoint::open(a.path()).unwrap(),
            Checkpoint::open(b.path()).unwrap(),
        );
        ca.validate(&Subset::all(&c)).unwrap();
        cb.validate(&Subset::all(&c)).unwrap();
        let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
        let shape = [64, 128];
        assert_eq!(
            ca.read_f32(name, &shape).unwrap(),
            cb.read_f32(name, &shape).unwrap()
        );
        assert_eq!(ca.config().dtype, Some(Dtype::BF16));
    }
}
