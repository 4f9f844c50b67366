//! The tensors a checkpoint must hold, named as Hugging Face writes them, with the shapes the
//! config implies; and the subsets of them a worker loads (a range of layers, some experts,
//! with or without the embedding and the head).

use std::collections::BTreeSet;
use std::ops::Range;

use crate::config::ModelConfig;

/// One tensor a model part needs: its checkpoint name and expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Which part of a model to load. A whole model is `Subset::all(config)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    pub layers: Range<usize>,
    /// Experts to load in every layer of the range; `None` = all. Ignored for dense models.
    pub experts: Option<BTreeSet<usize>>,
    pub embedding: bool,
    /// The final norm and `lm_head`.
    pub head: bool,
}

impl Subset {
    pub fn all(config: &ModelConfig) -> Self {
        Subset {
            layers: 0..config.num_layers,
            experts: None,
            embedding: true,
            head: true,
        }
    }

    pub fn has_expert(&self, e: usize) -> bool {
        self.experts.as_ref().is_none_or(|s| s.contains(&e))
    }
}

/// Names of one layer's tensors.
pub struct LayerNames {
    prefix: String,
}

impl LayerNames {
    pub fn new(layer: usize) -> Self {
        LayerNames {
            prefix: format!("model.layers.{layer}"),
        }
    }
    pub fn input_norm(&self) -> String {
        format!("{}.input_layernorm.weight", self.prefix)
    }
    pub fn post_attention_norm(&self) -> String {
        format!("{}.post_attention_layernorm.weight", self.prefix)
    }
    /// `q_proj`, `k_proj`, `v_proj` or `o_proj`.
    pub fn attn(&self, proj: &str) -> String {
        format!("{}.self_attn.{proj}.weight", self.prefix)
    }
    pub fn router(&self) -> String {
        format!("{}.block_sparse_moe.gate.weight", self.prefix)
    }
    /// `w1` (gate), `w2` (down) or `w3` (up) of expert `e`.
    pub fn expert(&self, e: usize, w: &str) -> String {
        format!("{}.block_sparse_moe.experts.{e}.{w}.weight", self.prefix)
    }
    /// `gate_proj`, `up_proj` or `down_proj` of a dense MLP.
    pub fn mlp(&self, proj: &str) -> String {
        format!("{}.mlp.{proj}.weight", self.prefix)
    }
}

pub const EMBEDDING: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

impl ModelConfig {
    /// The checkpoint name of the `lm_head` matrix (the embedding when tied).
    pub fn lm_head_name(&self) -> &'static str {
        if self.tie_word_embeddings {
            EMBEDDING
        } else {
            LM_HEAD
        }
    }

    /// Every tensor `subset` needs, with its expected shape, in a stable order.
    pub fn tensor_specs(&self, subset: &Subset) -> Vec<TensorSpec> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let spec = |name: String, shape: &[usize]| TensorSpec {
            name,
            shape: shape.to_vec(),
        };
        let mut specs = Vec::new();
        if subset.embedding {
            specs.push(spec(EMBEDDING.into(), &[v, h]));
        }
        for layer in subset.layers.clone() {
            let n = LayerNames::new(layer);
            specs.push(spec(n.input_norm(), &[h]));
            specs.push(spec(n.attn("q_proj"), &[self.q_dim(), h]));
            specs.push(spec(n.attn("k_proj"), &[self.kv_dim(), h]));
            specs.push(spec(n.attn("v_proj"), &[self.kv_dim(), h]));
            specs.push(spec(n.attn("o_proj"), &[h, self.q_dim()]));
            specs.push(spec(n.post_attention_norm(), &[h]));
            match self.moe {
                Some(moe) => {
                    specs.push(spec(n.router(), &[moe.num_experts, h]));
                    for e in (0..moe.num_experts).filter(|e| subset.has_expert(*e)) {
                        specs.push(spec(n.expert(e, "w1"), &[i, h]));
                        specs.push(spec(n.expert(e, "w2"), &[h, i]));
                        specs.push(spec(n.expert(e, "w3"), &[i, h]));
                    }
                }
                None => {
                    specs.push(spec(n.mlp("gate_proj"), &[i, h]));
                    specs.push(spec(n.mlp("up_proj"), &[i, h]));
                    specs.push(spec(n.mlp("down_proj"), &[h, i]));
                }
            }
        }
        if subset.head {
            specs.push(spec(FINAL_NORM.into(), &[h]));
            if !(self.tie_word_embeddings && subset.embedding) {
                specs.push(spec(self.lm_head_name().into(), &[v, h]));
            }
        }
        specs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tie: bool) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_local_experts": 4, "num_experts_per_tok": 2,
            "tie_word_embeddings": {tie}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn whole_model_specs() {
        let c = config(false);
        let specs = c.tensor_specs(&Subset::all(&c));
        // embed + 4 layers × (6 attention/norm + router + 4 experts × 3) + norm + lm_head
        assert_eq!(specs.len(), 1 + 4 * (6 + 1 + 12) + 2);
        let k = specs
            .iter()
            .find(|s| s.name == "model.layers.3.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(k.shape, vec![4, 8]);
        let w2 = specs
            .iter()
            .find(|s| s.name == "model.layers.0.block_sparse_moe.experts.3.w2.weight")
            .unwrap();
        assert_eq!(w2.shape, vec![8, 16]);
    }

    #[test]
    fn subset_specs() {
        let c = config(true);
        let subset = Subset {
            layers: 2..4,
            experts: Some([1, 3].into()),
            embedding: false,
            head: true,
        };
        let names: Vec<String> = c
            .tensor_specs(&subset)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert!(!names
            .iter()
            .any(|n| n.contains("layers.0") || n.contains("layers.1")));
        assert!(!names
            .iter()
            .any(|n| n.contains("experts.0") || n.contains("experts.2")));
        assert!(names
            .iter()
            .any(|n| n.contains("layers.3.block_sparse_moe.experts.3.w1")));
        // Tied head without the embedding still needs the embedding matrix as lm_head.
        assert_eq!(names.last().unwrap(), EMBEDDING);
    }
}
