//! A GGUF file as a model: its `llama` metadata as a [`ModelConfig`] (dense Llama, Mistral,
//! SmolLM; Mixtral when it has experts), and where each tensor the engine asks for by its
//! Hugging Face name lies in the file (llama.cpp's names, ggml's dimension order, experts
//! merged into one 3-D tensor, Q and K rows interleaved for ggml's RoPE).

use std::ops::Range;

use crate::config::{Arch, ConfigError, ModelConfig, MoeConfig};
use crate::gguf::{GgufError, GgufFile, GgufMetadata};

/// The GGUF architecture we run. llama.cpp's converter writes `llama` for Llama, Mistral and
/// Mixtral checkpoints alike (one graph; Mixtral adds `expert_count`).
pub const GGUF_ARCH: &str = "llama";

fn meta_err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Gguf {
        key: key.to_string(),
        problem: problem.into(),
    }
}

fn typed(e: GgufError) -> ConfigError {
    match e {
        GgufError::MetadataType {
            key,
            expected,
            found,
        } => meta_err(&key, format!("is {found}; expected {expected}")),
        e => meta_err("(file)", e.to_string()),
    }
}

fn opt_usize(m: &GgufMetadata, key: &str) -> Result<Option<usize>, ConfigError> {
    Ok(m.get_u64(key)
        .map_err(typed)?
        .map(|v| usize::try_from(v).unwrap_or(usize::MAX)))
}

fn req_usize(m: &GgufMetadata, key: &str) -> Result<usize, ConfigError> {
    opt_usize(m, key)?.ok_or_else(|| meta_err(key, "is missing; expected a positive integer"))
}

impl ModelConfig {
    /// The model a GGUF file describes (architecture `llama`), from its metadata and tensor
    /// infos. `dtype` is `None`: a GGUF file mixes types tensor by tensor.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let m = file.metadata();
        let arch = m
            .get_str("general.architecture")
            .map_err(typed)?
            .ok_or_else(|| {
                meta_err(
                    "general.architecture",
                    format!("is missing; expected {GGUF_ARCH:?}"),
                )
            })?;
        if arch != GGUF_ARCH {
            return Err(ConfigError::UnknownGgufArch {
                found: arch.to_string(),
            });
        }
        let k = |name: &str| format!("{GGUF_ARCH}.{name}");

        let hidden_size = req_usize(m, &k("embedding_length"))?;
        let num_layers = req_usize(m, &k("block_count"))?;
        let num_heads = req_usize(m, &k("attention.head_count"))?;
        if num_heads == 0 {
            return Err(meta_err(
                &k("attention.head_count"),
                "is 0; expected a positive integer",
            ));
        }
        let num_kv_heads = opt_usize(m, &k("attention.head_count_kv"))?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(meta_err(
                &k("attention.head_count_kv"),
                format!("is {num_kv_heads}; expected a divisor of the head count ({num_heads})"),
            ));
        }
        let head_dim = match opt_usize(m, &k("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(meta_err(
                    &k("attention.key_length"),
                    format!("is missing and embedding_length ({hidden_size}) is not a multiple of the head count ({num_heads})"),
                ))
            }
        };
        match m.get_str(&k("rope.scaling.type")).map_err(typed)? {
            None | Some("none") => {}
            Some(other) => {
                return Err(meta_err(
                    &k("rope.scaling.type"),
                    format!("is {other:?}; only plain RoPE (\"none\") is supported"),
                ))
            }
        }
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(meta_err(
                "rope_freqs.weight",
                "is present (Llama 3.1 RoPE scaling); only plain RoPE is supported",
            ));
        }
        let rope_theta = m
            .get_f64(&k("rope.freq_base"))
            .map_err(typed)?
            .unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(meta_err(
                &k("rope.freq_base"),
                format!("is {rope_theta}; expected a finite number above 0"),
            ));
        }
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = m
            .get_f64(&eps_key)
            .map_err(typed)?
            .ok_or_else(|| meta_err(&eps_key, "is missing; expected a float"))?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(meta_err(
                &eps_key,
                format!("is {rms_norm_eps}; expected a finite number >= 0"),
            ));
        }

        let moe = match opt_usize(m, &k("expert_count"))? {
            None | Some(0) => None,
            Some(num_experts) => {
                let key = k("expert_used_count");
                let top_k = req_usize(m, &key)?;
                if top_k == 0 || top_k > num_experts {
                    return Err(meta_err(
                        &key,
                        format!("is {top_k}; expected 1..={num_experts} (expert_count)"),
                    ));
                }
                Some(MoeConfig { num_experts, top_k })
            }
        };
        let intermediate_size = match (moe, opt_usize(m, &k("expert_feed_forward_length"))?) {
            (Some(_), Some(n)) => n,
            _ => req_usize(m, &k("feed_forward_length"))?,
        };

        // The vocabulary: the tokenizer's tokens, else the embedding's rows.
        let vocab_size = match m.get_str_array("tokenizer.ggml.tokens").map_err(typed)? {
            Some(tokens) => tokens.len(),
            None => match file.tensor("token_embd.weight") {
                Some(t) if t.dims.len() == 2 => t.dims[1],
                Some(t) => {
                    return Err(meta_err(
                        "token_embd.weight",
                        format!("has dims {:?}; expected [embedding_length, vocab]", t.dims),
                    ))
                }
                None => {
                    return Err(meta_err(
                        "tokenizer.ggml.tokens",
                        "is missing and so is token_embd.weight; expected one to give the vocabulary size",
                    ))
                }
            },
        };
        let token = |name: &str| {
            let key = format!("tokenizer.ggml.{name}_token_id");
            m.get_u32(&key).map_err(typed)
        };
        let bos_token_id = token("bos")?;
        // End of generation: eos, and the end-of-turn / end-of-message tokens chat models stop at.
        let mut eos_token_ids = Vec::new();
        for name in ["eos", "eot", "eom"] {
            if let Some(id) = token(name)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        let config = ModelConfig {
            arch: if moe.is_some() {
                Arch::Mixtral
            } else {
                Arch::Llama
            },
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings: opt_usize(m, &k("context_length"))?.unwrap_or(4096),
            sliding_window: None,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            moe,
            bos_token_id,
            eos_token_ids,
            dtype: None,
        };
        config.check_sizes().map_err(|e| match e {
            ConfigError::Field { field, problem } => meta_err(&gguf_key(&field), problem),
            e => e,
        })?;
        // Checked once the sizes are known to be in range.
        if let Some(v) = opt_usize(m, &k("attention.value_length"))? {
            if v != head_dim {
                return Err(meta_err(
                    &k("attention.value_length"),
                    format!("is {v}; expected the key length {head_dim}"),
                ));
            }
        }
        if head_dim % 2 != 0 {
            return Err(meta_err(
                &k("attention.key_length"),
                format!("gives a head size of {head_dim}; RoPE needs an even one"),
            ));
        }
        if let Some(r) = opt_usize(m, &k("rope.dimension_count"))? {
            if r != head_dim {
                return Err(meta_err(
                    &k("rope.dimension_count"),
                    format!("is {r}; only RoPE over the whole head ({head_dim}) is supported"),
                ));
            }
        }
        Ok(config)
    }
}

/// The GGUF metadata key of a `config.json` field, for errors.
fn gguf_key(field: &str) -> String {
    let k = match field {
        "vocab_size" => return "tokenizer.ggml.tokens (length)".into(),
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "head_dim" => "attention.key_length",
        "max_position_embeddings" => "context_length",
        "num_local_experts" => "expert_count",
        other => other,
    };
    format!("{GGUF_ARCH}.{k}")
}

/// Where a Hugging Face tensor lies in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLocation {
    /// The GGUF tensor's name.
    pub name: String,
    /// For one expert of a merged `*_exps` tensor: its index.
    pub expert: Option<usize>,
    /// For `q_proj`/`k_proj`: the head count llama.cpp's converter interleaved the rows by.
    pub rope_heads: Option<usize>,
}

/// The GGUF name of Hugging Face tensor `hf` of a model shaped `config` in `file`, or `None`
/// when the name is not one the engine asks for.
pub fn locate(hf: &str, config: &ModelConfig, file: &GgufFile) -> Option<GgufLocation> {
    let plain = |name: String| GgufLocation {
        name,
        expert: None,
        rope_heads: None,
    };
    match hf {
        crate::weights::EMBEDDING => return Some(plain("token_embd.weight".into())),
        crate::weights::FINAL_NORM => return Some(plain("output_norm.weight".into())),
        crate::weights::LM_HEAD => return Some(plain("output.weight".into())),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |t: &str| format!("blk.{layer}.{t}.weight");
    let rest = rest.strip_suffix(".weight")?;
    Some(match rest {
        "input_layernorm" => plain(blk("attn_norm")),
        "post_attention_layernorm" => plain(blk("ffn_norm")),
        "self_attn.q_proj" => GgufLocation {
            rope_heads: Some(config.num_heads),
            ..plain(blk("attn_q"))
        },
        "self_attn.k_proj" => GgufLocation {
            rope_heads: Some(config.num_kv_heads),
            ..plain(blk("attn_k"))
        },
        "self_attn.v_proj" => plain(blk("attn_v")),
        "self_attn.o_proj" => plain(blk("attn_output")),
        "mlp.gate_proj" => plain(blk("ffn_gate")),
        "mlp.up_proj" => plain(blk("ffn_up")),
        "mlp.down_proj" => plain(blk("ffn_down")),
        "block_sparse_moe.gate" => plain(blk("ffn_gate_inp")),
        _ => {
            let rest = rest.strip_prefix("block_sparse_moe.experts.")?;
            let (e, w) = rest.split_once('.')?;
            let e: usize = e.parse().ok()?;
            let ffn = match w {
                "w1" => "ffn_gate",
                "w2" => "ffn_down",
                "w3" => "ffn_up",
                _ => return None,
            };
            // llama.cpp merges the experts into one tensor; files from before 2024 kept them
            // apart as `ffn_gate.E`.
            let split = format!("blk.{layer}.{ffn}.{e}.weight");
            match file.tensor(&split) {
                Some(_) => plain(split),
                None => GgufLocation {
                    expert: Some(e),
                    ..plain(blk(&format!("{ffn}_exps")))
                },
            }
        }
    })
}

/// The row order that undoes llama.cpp's Q/K interleaving (for [`HostWeight::permute_rows`]):
/// row `i` of the Hugging Face matrix is row `order[i]` of the GGUF one; `None` unless `rows`
/// splits into `heads` heads of an even size.
///
/// [`HostWeight::permute_rows`]: crate::quant::HostWeight::permute_rows
///
/// The converter (`LlamaModel.permute`) reshapes each head's `head_dim` rows as `[2, half]` and
/// swaps the two axes, so HF row `h*head_dim + s*half + j` is stored at GGUF row
/// `h*head_dim + 2*j + s`: it pairs RoPE's rotated halves as neighbours for ggml's interleaved
/// RoPE, where our RoPE (like transformers') pairs row `j` with row `j + half`.
pub fn unpermute_qk_order(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (h, within) = (r / head_dim, r % head_dim);
                let (s, j) = (within / half, within % half);
                h * head_dim + 2 * j + s
            })
            .collect(),
    )
}

/// The rows of expert `e` of a merged `[experts, rows, cols]` tensor, as rows of the tensor
/// seen as one `[experts * rows, cols]` matrix.
pub fn expert_rows(e: usize, rows: usize) -> Range<usize> {
    e * rows..(e + 1) * rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, spelled out on row indices:
    /// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`,
    /// with `n_head` replaced by `n_head_kv` when they differ (the K projection).
    fn converter_permute(w: &[Vec<f32>], n_head: usize, n_head_kv: Option<usize>) -> Vec<Vec<f32>> {
        let n = match n_head_kv {
            Some(kv) if kv != n_head => kv,
            _ => n_head,
        };
        let rows = w.len();
        let half = rows / n / 2;
        // After the reshape, element [h, s, j] is row (h*2 + s)*half + j; after swapaxes the
        // output walks [h, j, s] in row-major order.
        let mut out = Vec::with_capacity(rows);
        for h in 0..n {
            for j in 0..half {
                for s in 0..2 {
                    out.push(w[(h * 2 + s) * half + j].clone());
                }
            }
        }
        out
    }

    fn check(n_head: usize, n_head_kv: Option<usize>, rows: usize, cols: usize) {
        use crate::quant::{HostWeight, WeightType};
        let hf: Vec<Vec<f32>> = (0..rows)
            .map(|r| (0..cols).map(|c| (r * 1000 + c) as f32).collect())
            .collect();
        let stored = converter_permute(&hf, n_head, n_head_kv);
        let flat: Vec<f32> = stored.concat();
        let heads = n_head_kv.unwrap_or(n_head);
        let order = unpermute_qk_order(rows, heads).unwrap();
        let w = HostWeight::from_f32(&flat, rows, cols).unwrap();
        assert_eq!(w.permute_rows(&order).to_f32(), hf.concat());
        // Block-quantized rows move whole: Q8_0 of the permuted rows, unpermuted, is the Q8_0
        // of the Hugging Face rows.
        let mut q = Vec::new();
        crate::quant::quantize_row(WeightType::Q8_0, &flat, &mut q);
        let wq = HostWeight::new(WeightType::Q8_0, rows, cols, q.into()).unwrap();
        let mut expected = Vec::new();
        crate::quant::quantize_row(WeightType::Q8_0, &hf.concat(), &mut expected);
        assert_eq!(wq.permute_rows(&order).bytes(), expected.as_slice());
    }

    #[test]
    fn the_inverse_undoes_the_converters_q_and_k_permutation() {
        // Q: 4 heads of 8 rows; K with 2 KV heads (the converter permutes by n_head_kv).
        check(4, None, 32, 32);
        check(4, Some(2), 16, 32);
        // SmolLM2's shapes: 9 heads / 3 KV heads of 64.
        check(9, None, 576, 32);
        check(9, Some(3), 192, 32);
        assert_eq!(unpermute_qk_order(10, 4), None);
        assert_eq!(unpermute_qk_order(12, 4), None);
    }
}
