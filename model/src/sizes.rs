//! Sizes derived from a config, for `model inspect` and for the placement planner:
//! parameter counts (total and active per token) and KV-cache bytes per token.

use crate::config::ModelConfig;
use crate::safetensors::Dtype;

/// Parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub total: u64,
    /// What one token's forward pass multiplies by: every dense weight plus `top_k` experts per
    /// layer (the embedding counted, as Mixtral's published 12.9B does).
    pub active_per_token: u64,
    pub embedding: u64,
    pub lm_head: u64,
    pub attention_per_layer: u64,
    pub one_expert: u64,
}

impl ModelConfig {
    pub fn param_counts(&self) -> ParamCounts {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let layers = self.num_layers as u64;
        let embedding = v * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { v * h };
        let attention_per_layer =
            2 * h * self.q_dim() as u64 + 2 * h * self.kv_dim() as u64 + 2 * h;
        let one_expert = 3 * h * i;
        let (ffn_total, ffn_active) = match self.moe {
            Some(m) => {
                let router = m.num_experts as u64 * h;
                (
                    router + m.num_experts as u64 * one_expert,
                    router + m.top_k as u64 * one_expert,
                )
            }
            None => (one_expert, one_expert),
        };
        let shared = embedding + lm_head + h + layers * attention_per_layer;
        ParamCounts {
            total: shared + layers * ffn_total,
            active_per_token: shared + layers * ffn_active,
            embedding,
            lm_head,
            attention_per_layer,
            one_expert,
        }
    }

    /// Parameters a worker holding `subset` loads (the placement planner's unit).
    pub fn subset_params(&self, subset: &crate::Subset) -> u64 {
        let p = self.param_counts();
        let h = self.hidden_size as u64;
        let layers = subset.layers.len() as u64;
        let ffn = match self.moe {
            Some(m) => {
                let held = (0..m.num_experts).filter(|e| subset.has_expert(*e)).count() as u64;
                m.num_experts as u64 * h + held * p.one_expert
            }
            None => p.one_expert,
        };
        let mut total = layers * (p.attention_per_layer + ffn);
        if subset.embedding {
            total += p.embedding;
        }
        if subset.head {
            // The final norm, and the head unless it is the (tied) embedding.
            total += h + p.lm_head;
            if p.lm_head == 0 && !subset.embedding {
                total += p.embedding;
            }
        }
        total
    }

    /// Bytes of K and V one token occupies across all layers with the cache in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: Dtype) -> u64 {
        2 * self.num_layers as u64 * self.kv_dim() as u64 * dtype.size() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_8x7b_matches_published_counts() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2}"#,
        )
        .unwrap();
        let p = c.param_counts();
        // Mistral AI publishes 46.7B total and 12.9B active parameters.
        assert_eq!((p.total as f64 / 1e8).round(), 467.0);
        assert_eq!((p.active_per_token as f64 / 1e8).round(), 129.0);
        // 32 layers × 8 KV heads × 128 × (K+V) × 2 bytes = 128 KiB per token in bf16.
        assert_eq!(c.kv_bytes_per_token(Dtype::BF16), 131072);
        // The parts of a 2×2 grid add up to the whole, the shared router and attention counted
        // once per shard.
        let part = |layers: std::ops::Range<usize>, experts: [usize; 4], ends: (bool, bool)| {
            c.subset_params(&crate::Subset {
                layers,
                experts: Some(experts.into_iter().collect()),
                embedding: ends.0,
                head: ends.1,
            })
        };
        let grid = part(0..16, [0, 1, 2, 3], (true, false))
            + part(0..16, [4, 5, 6, 7], (true, false))
            + part(16..32, [0, 1, 2, 3], (false, true))
            + part(16..32, [4, 5, 6, 7], (false, true));
        let duplicated = 32 * (p.attention_per_layer + 8 * 4096) + p.embedding + p.lm_head + 4096;
        assert_eq!(grid, p.total + duplicated);
    }
}
