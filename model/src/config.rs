//! `config.json` of a Hugging Face checkpoint, in both the classic form of the published
//! checkpoints (`rope_theta`, `torch_dtype`) and the form transformers 5 writes
//! (`rope_parameters.rope_theta`, `dtype`, `head_dim: null`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::safetensors::Dtype;

/// The architectures we run. Llama and Mistral share one layer shape; Mixtral swaps the dense
/// MLP for a sparse mixture of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    Mixtral,
    Mistral,
    Llama,
}

impl Arch {
    pub const SUPPORTED: &'static str = "MixtralForCausalLM, MistralForCausalLM, LlamaForCausalLM";

    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Mistral => "mistral",
            Arch::Llama => "llama",
        }
    }

    fn parse(name: &str) -> Option<Arch> {
        [Arch::Mixtral, Arch::Mistral, Arch::Llama]
            .into_iter()
            .find(|a| a.hf_name() == name || a.model_type() == name)
    }
}

/// The sparse part of a Mixtral layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
}

/// Everything the engine needs to know about a model's shape, already checked for consistency.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// A query sees exactly this many keys, itself included (transformers' semantics).
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub dtype: Option<Dtype>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error(
        "config.json: unsupported architecture {found:?}; supported: {}",
        Arch::SUPPORTED
    )]
    UnknownArch { found: String },
    #[error("unsupported GGUF architecture {found:?}; supported: \"llama\" (Llama, Mistral, SmolLM, Mixtral)")]
    UnknownGgufArch { found: String },
    #[error("GGUF metadata `{key}` {problem}")]
    Gguf { key: String, problem: String },
    #[error("config.json: field `{field}` {problem}")]
    Field { field: String, problem: String },
}

fn field_err(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ConfigError::Json { source, .. } => ConfigError::Json {
                path: path.display().to_string(),
                source,
            },
            e => e,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: "config.json".into(),
            source,
        })?;
        let obj = value
            .as_object()
            .ok_or_else(|| field_err("(root)", "must be a JSON object"))?;
        Self::from_map(obj)
    }

    fn from_map(o: &Map<String, Value>) -> Result<Self, ConfigError> {
        let arch_name = match o.get("architectures").and_then(|a| a.get(0)) {
            Some(Value::String(s)) => s.clone(),
            _ => match o.get("model_type") {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(field_err(
                        "architectures",
                        format!("is missing; expected one of {}", Arch::SUPPORTED),
                    ))
                }
            },
        };
        let arch = Arch::parse(&arch_name).ok_or(ConfigError::UnknownArch { found: arch_name })?;

        let hidden_size = req_usize(o, "hidden_size")?;
        let num_heads = req_usize(o, "num_attention_heads")?;
        // Divided by below: a zero is refused before.
        if num_heads == 0 {
            return Err(field_err(
                "num_attention_heads",
                "is 0; expected a positive integer",
            ));
        }
        let num_kv_heads = opt_usize(o, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "is {num_kv_heads}; expected a divisor of num_attention_heads ({num_heads})"
                ),
            ));
        }
        let head_dim = match opt_usize(o, "head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(field_err(
                    "head_dim",
                    format!("is missing and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(field_err(
                "head_dim",
                format!("is {head_dim}; RoPE needs an even head_dim"),
            ));
        }

        let hidden_act = o
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(field_err(
                "hidden_act",
                format!("is {hidden_act:?}; expected \"silu\""),
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if o.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(field_err(
                    flag,
                    "is true; biases are not supported (expected false)",
                ));
            }
        }

        let rope_theta = rope_theta(o, arch)?;
        let sliding_window = match o.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) if arch == Arch::Llama => None,
            Some(v) => match v.as_u64() {
                Some(0) | None => {
                    return Err(field_err(
                        "sliding_window",
                        format!("is {v}; expected a positive integer or null"),
                    ))
                }
                Some(w) => Some(w as usize),
            },
        };
        let moe = if arch == Arch::Mixtral {
            let num_experts = req_usize(o, "num_local_experts")?;
            let top_k = req_usize(o, "num_experts_per_tok")?;
            if top_k == 0 || top_k > num_experts {
                return Err(field_err(
                    "num_experts_per_tok",
                    format!("is {top_k}; expected 1..={num_experts} (num_local_experts)"),
                ));
            }
            Some(MoeConfig { num_experts, top_k })
        } else {
            None
        };
        let dtype = match o.get("dtype").or_else(|| o.get("torch_dtype")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Dtype::from_torch_name(s).ok_or_else(|| {
                field_err(
                    "torch_dtype",
                    format!("is {s:?}; expected float32, bfloat16 or float16"),
                )
            })?),
            Some(v) => {
                return Err(field_err(
                    "torch_dtype",
                    format!("is {v}; expected a string"),
                ))
            }
        };
        let eos_token_ids = match o.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_u32(v, "eos_token_id"))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![as_u32(v, "eos_token_id")?],
        };
        let bos_token_id = match o.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_u32(v, "bos_token_id")?),
        };

        let config = ModelConfig {
            arch,
            vocab_size: req_usize(o, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(o, "intermediate_size")?,
            num_layers: req_usize(o, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: match opt_f64(o, "rms_norm_eps")? {
                Some(eps) if !(eps.is_finite() && eps >= 0.0) => {
                    return Err(field_err(
                        "rms_norm_eps",
                        format!("is {eps}; expected a finite number >= 0"),
                    ))
                }
                Some(eps) => eps,
                None => match arch {
                    Arch::Mixtral => 1e-5,
                    _ => 1e-6,
                },
            },
            rope_theta,
            max_position_embeddings: opt_usize(o, "max_position_embeddings")?.unwrap_or(4096 * 32),
            sliding_window,
            tie_word_embeddings: o
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            moe,
            bos_token_id,
            eos_token_ids,
            dtype,
        };
        config.check_sizes()?;
        Ok(config)
    }

    /// Refuses zero sizes and sizes beyond [`max_size`], named by their `config.json` field.
    pub(crate) fn check_sizes(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
        ] {
            if v == 0 {
                return Err(field_err(name, "is 0; expected a positive integer"));
            }
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_local_experts", self.moe.map_or(0, |m| m.num_experts)),
        ];
        for (name, v) in sizes {
            let max = max_size(name);
            if v > max {
                return Err(field_err(name, format!("is {v}; expected at most {max}")));
            }
        }
        Ok(())
    }

    /// Query heads that share one KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The `config.json` a classic (transformers 4) checkpoint of this shape carries.
    pub fn to_hf_json(&self) -> Value {
        let mut o = serde_json::json!({
            "architectures": [self.arch.hf_name()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "torch_dtype": self.dtype.map(Dtype::torch_name),
        });
        let m = o.as_object_mut().expect("object literal");
        if self.arch != Arch::Llama {
            m.insert(
                "sliding_window".into(),
                serde_json::json!(self.sliding_window),
            );
        }
        if let Some(moe) = self.moe {
            m.insert("num_local_experts".into(), moe.num_experts.into());
            m.insert("num_experts_per_tok".into(), moe.top_k.into());
        }
        o
    }
}

/// The largest value a size may have: far above any published model, and small enough that
/// every size computed from them (parameter counts, bytes of weights and KV cache) fits in 64
/// bits. A config that claims more is refused before anything is sized from it.
fn max_size(field: &str) -> usize {
    match field {
        "vocab_size" | "max_position_embeddings" => 1 << 24,
        "hidden_size" => 1 << 17,
        "intermediate_size" => 1 << 20,
        "head_dim" | "num_attention_heads" => 1 << 12,
        // num_hidden_layers, num_local_experts
        _ => 1 << 10,
    }
}

fn rope_theta(o: &Map<String, Value>, arch: Arch) -> Result<f64, ConfigError> {
    let theta = rope_theta_given(o, arch)?;
    match theta.is_finite() && theta > 0.0 {
        true => Ok(theta),
        false => Err(field_err(
            "rope_theta",
            format!("is {theta}; expected a finite number above 0"),
        )),
    }
}

fn rope_theta_given(o: &Map<String, Value>, arch: Arch) -> Result<f64, ConfigError> {
    // transformers 5 moves RoPE settings into `rope_parameters`; older files use `rope_theta`
    // and optionally `rope_scaling`. Only plain RoPE is implemented.
    let scaling = o.get("rope_parameters").or_else(|| o.get("rope_scaling"));
    if let Some(Value::Object(p)) = scaling {
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(field_err(
                "rope_parameters.rope_type",
                format!("is {kind:?}; only \"default\" RoPE is supported"),
            ));
        }
        if let Some(t) = p.get("rope_theta") {
            return t.as_f64().ok_or_else(|| {
                field_err(
                    "rope_parameters.rope_theta",
                    format!("is {t}; expected a number"),
                )
            });
        }
    }
    Ok(opt_f64(o, "rope_theta")?.unwrap_or(match arch {
        Arch::Mixtral => 1e6,
        _ => 10000.0,
    }))
}

fn opt_usize(o: &Map<String, Value>, k: &str) -> Result<Option<usize>, ConfigError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| field_err(k, format!("is {v}; expected a non-negative integer"))),
    }
}

fn req_usize(o: &Map<String, Value>, k: &str) -> Result<usize, ConfigError> {
    opt_usize(o, k)?.ok_or_else(|| field_err(k, "is missing; expected a positive integer"))
}

fn opt_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ConfigError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| field_err(k, format!("is {v}; expected a number"))),
    }
}

fn as_u32(v: &Value, k: &str) -> Result<u32, ConfigError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| field_err(k, format!("is {v}; expected a token id")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL_CLASSIC: &str = r#"{
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 1e6, "sliding_window": null,
        "num_local_experts": 8, "num_experts_per_tok": 2, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu"}"#;

    #[test]
    fn classic_mixtral() {
        let c = ModelConfig::from_json_str(MIXTRAL_CLASSIC).unwrap();
        assert_eq!(c.arch, Arch::Mixtral);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.gqa_group(), 4);
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                num_experts: 8,
                top_k: 2
            })
        );
        assert_eq!(c.dtype, Some(Dtype::BF16));
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn transformers5_mistral() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 256, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": null, "dtype": "float32", "sliding_window": 8,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
            "eos_token_id": [2, 5]}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.sliding_window, Some(8));
        assert_eq!(c.dtype, Some(Dtype::F32));
        assert_eq!(c.eos_token_ids, vec![2, 5]);
        // Round trip through the classic form we write.
        let again = ModelConfig::from_json_str(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |s: &str| ModelConfig::from_json_str(s).unwrap_err().to_string();
        let e = err(r#"{"architectures": ["GPT2LMHeadModel"]}"#);
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("MixtralForCausalLM"),
            "{e}"
        );
        let e =
            err(&MIXTRAL_CLASSIC
                .replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"));
        assert!(
            e.contains("num_key_value_heads") && e.contains("divisor"),
            "{e}"
        );
        let e =
            err(&MIXTRAL_CLASSIC
                .replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9"));
        assert!(
            e.contains("num_experts_per_tok") && e.contains("1..=8"),
            "{e}"
        );
        let e = err(&MIXTRAL_CLASSIC.replace("\"hidden_size\": 4096,", ""));
        assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");
        let e = err(&MIXTRAL_CLASSIC.replace("\"bfloat16\"", "\"int8\""));
        assert!(e.contains("int8"), "{e}");
        let e = err(&MIXTRAL_CLASSIC.replace(
            "\"rope_theta\": 1e6",
            "\"rope_scaling\": {\"type\": \"yarn\"}",
        ));
        assert!(e.contains("yarn"), "{e}");
        let e = err("[1, 2]");
        assert!(e.contains("JSON object"), "{e}");
    }

    /// Issue 18: configs whose sizes would allocate gigabytes, or whose RoPE base is zero, are
    /// refused by name before anything is sized from them.
    #[test]
    fn absurd_sizes_and_rope_bases_are_refused() {
        let err = |s: &str| ModelConfig::from_json_str(s).unwrap_err().to_string();
        let e = err(&MIXTRAL_CLASSIC.replace(
            "\"num_hidden_layers\": 32",
            "\"num_hidden_layers\": 1000000000",
        ));
        assert!(
            e.contains("num_hidden_layers") && e.contains("is 1000000000; expected at most 1024"),
            "{e}"
        );
        let e = err(&MIXTRAL_CLASSIC.replace(
            "\"num_local_experts\": 8",
            "\"num_local_experts\": 1000000000",
        ));
        assert!(
            e.contains("num_local_experts") && e.contains("expected at most 1024"),
            "{e}"
        );
        // Found by fuzzing (fuzz/corpus/config_json/zero_heads): a division by zero.
        let e =
            err(&MIXTRAL_CLASSIC
                .replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 0"));
        assert!(
            e.contains("num_attention_heads") && e.contains("is 0"),
            "{e}"
        );
        for theta in ["0", "-1e6"] {
            let e = err(&MIXTRAL_CLASSIC.replace("1e6", theta));
            assert!(
                e.contains("rope_theta") && e.contains("above 0"),
                "{theta}: {e}"
            );
        }
    }
}
