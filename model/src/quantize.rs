//! `switchyard model quantize`: a Hugging Face safetensors directory (Llama, Mistral, Mixtral)
//! to a GGUF file laid out as llama.cpp's `convert_hf_to_gguf.py` writes `general.architecture
//! = llama`: its metadata keys, tensor names, Q/K rows interleaved for ggml's RoPE, Mixtral's
//! experts merged into `[experts, rows, cols]` tensors, vectors and the router kept F32, no
//! `output.weight` when the embedding is tied, and the tokenizer as `tokenizer.ggml.*` keys.
//!
//! It streams: the header is written from the shapes alone, then each GGUF tensor is made row by
//! row from the mapped safetensors (dequantized into one row buffer, permuted, quantized),
//! written, and dropped, so memory holds one output tensor at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::{model_name, Checkpoint, CheckpointError};
use crate::config::ModelConfig;
use crate::gguf::{GgufArray, GgufError, GgufMetadata, GgufValue, GgufWriter, TensorDesc};
use crate::gguf_model::{unpermute_qk_order, GGUF_ARCH};
use crate::gguf_vocab::{
    TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED, TOKEN_USER_DEFINED,
};
use crate::quant::{quantize_row, WeightBytes, WeightType};
use crate::weights::{LayerNames, EMBEDDING, FINAL_NORM, LM_HEAD};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(
        "{path}: not found; expected a Hugging Face model directory (config.json, safetensors)"
    )]
    NotFound { path: PathBuf },
    #[error("{path} is a GGUF file; expected a Hugging Face safetensors directory")]
    NotSafetensors { path: PathBuf },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {problem} (pass --no-tokenizer to write the weights only)")]
    Tokenizer { path: PathBuf, problem: String },
}

/// What the tensors are stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Every matrix in one type.
    Plain(WeightType),
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for `output.weight` and for `attn_v` and
    /// `ffn_down` in the layers [`more_bits`] picks.
    Q4KM,
}

impl Scheme {
    pub const NAMES: &'static str = "q8_0, q4_0, q4_1, q4_k_m, q6_k, f16, bf16, f32";

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Scheme::Q4KM,
            "q8_0" => Scheme::Plain(WeightType::Q8_0),
            "q4_0" => Scheme::Plain(WeightType::Q4_0),
            "q4_1" => Scheme::Plain(WeightType::Q4_1),
            "q6_k" => Scheme::Plain(WeightType::Q6_K),
            "f16" => Scheme::Plain(WeightType::F16),
            "bf16" => Scheme::Plain(WeightType::BF16),
            "f32" => Scheme::Plain(WeightType::F32),
            _ => return None,
        })
    }

    /// llama.cpp's `llama_ftype` for `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Scheme::Plain(WeightType::F32) => 0,
            Scheme::Plain(WeightType::F16) => 1,
            Scheme::Plain(WeightType::Q4_0) => 2,
            Scheme::Plain(WeightType::Q4_1) => 3,
            Scheme::Plain(WeightType::Q8_0) => 7,
            Scheme::Plain(WeightType::Q5_K) => 17,
            Scheme::Plain(WeightType::Q6_K) => 18,
            Scheme::Plain(WeightType::Q4_K) => 14,
            Scheme::Plain(WeightType::BF16) => 32,
            Scheme::Q4KM => 15,
        }
    }

    /// The type a matrix named `name` (GGUF name) of layer `layer` is meant to have.
    fn wanted(self, name: &str, layer: Option<usize>, layers: usize) -> WeightType {
        match self {
            Scheme::Plain(ty) => ty,
            Scheme::Q4KM => {
                let v_or_down = name.contains(".attn_v.") || name.contains(".ffn_down");
                match layer {
                    _ if name == "output.weight" => WeightType::Q6_K,
                    Some(l) if v_or_down && more_bits(l, layers) => WeightType::Q6_K,
                    _ => WeightType::Q4_K,
                }
            }
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between, get Q6_K for `attn_v`/`ffn_down` in Q4_K_M (about half of them in small models).
pub fn more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The type a `cols`-wide matrix gets when `wanted`'s blocks do not divide its rows: llama.cpp
/// falls back from the K-quants to a 32-value format (Q5_0 and Q5_1 are not among ours: Q4_K
/// takes Q4_1, Q6_K takes Q8_0), and to F16 when 32 does not divide the row either.
pub fn fitting_type(wanted: WeightType, cols: usize) -> WeightType {
    if wanted.row_bytes(cols).is_some() {
        return wanted;
    }
    let fallback = match wanted {
        WeightType::Q4_K => WeightType::Q4_1,
        WeightType::Q5_K | WeightType::Q6_K => WeightType::Q8_0,
        _ => WeightType::F16,
    };
    if fallback.row_bytes(cols).is_some() {
        fallback
    } else {
        WeightType::F16
    }
}

/// Where one GGUF tensor comes from.
struct Plan {
    desc: TensorDesc,
    /// Hugging Face tensors stacked along the outermost axis (one per expert; one otherwise),
    /// each `[rows, cols]` (`[cols]` for a vector).
    sources: Vec<(String, Vec<usize>)>,
    /// Q/K: the head count the rows are interleaved by.
    rope_heads: Option<usize>,
}

/// What [`quantize`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Tensor bytes written (without the header).
    pub tensor_bytes: u64,
    /// Tensors stored in another type than the scheme asks, with why.
    pub fallbacks: Vec<String>,
    /// `tokenizer.ggml.model` written, if any.
    pub tokenizer: Option<String>,
}

/// Writes `out` (GGUF) from the safetensors directory `input` in `scheme`; with `tokenizer`,
/// the directory's `tokenizer.json` (and `tokenizer_config.json`) go into the metadata.
pub fn quantize(
    input: &Path,
    out: &Path,
    scheme: Scheme,
    tokenizer: bool,
) -> Result<QuantizeReport, QuantizeError> {
    if !input.exists() {
        return Err(QuantizeError::NotFound {
            path: input.to_path_buf(),
        });
    }
    let ckpt = Checkpoint::open(input)?;
    if ckpt.gguf().is_some() {
        return Err(QuantizeError::NotSafetensors {
            path: input.to_path_buf(),
        });
    }
    let config = ckpt.config().clone();
    let mut metadata = model_metadata(&config, input, scheme);
    let vocab = if tokenizer {
        let v = hf_tokenizer_metadata(input, config.vocab_size)?;
        let kind = v.kind.clone();
        for (k, value) in v.keys {
            metadata.insert(k, value);
        }
        Some(kind)
    } else {
        None
    };
    let (plans, fallbacks) = plan(&config, scheme);
    let descs: Vec<TensorDesc> = plans.iter().map(|p| p.desc.clone()).collect();
    let mut writer = GgufWriter::create(out, &metadata, &descs)?;
    let mut tensor_bytes = 0u64;
    for p in &plans {
        let data = make_tensor(&ckpt, p)?;
        tensor_bytes += data.len() as u64;
        writer.write_tensor(&data)?;
    }
    writer.finish()?;
    Ok(QuantizeReport {
        tensors: plans.len(),
        tensor_bytes,
        fallbacks,
        tokenizer: vocab,
    })
}

/// The `general.*` and `llama.*` keys convert_hf_to_gguf.py writes for a Llama/Mixtral config.
fn model_metadata(c: &ModelConfig, input: &Path, scheme: Scheme) -> GgufMetadata {
    let mut m = GgufMetadata::new();
    let k = |name: &str| format!("{GGUF_ARCH}.{name}");
    let u = |v: usize| GgufValue::U32(v as u32);
    m.insert("general.architecture", GgufValue::String(GGUF_ARCH.into()));
    let name = model_name(input).unwrap_or_else(|| "model".into());
    m.insert("general.name", GgufValue::String(name));
    m.insert(k("block_count"), u(c.num_layers));
    m.insert(k("context_length"), u(c.max_position_embeddings));
    m.insert(k("embedding_length"), u(c.hidden_size));
    m.insert(k("feed_forward_length"), u(c.intermediate_size));
    m.insert(k("attention.head_count"), u(c.num_heads));
    m.insert(k("attention.head_count_kv"), u(c.num_kv_heads));
    m.insert(k("rope.freq_base"), GgufValue::F32(c.rope_theta as f32));
    m.insert(
        k("attention.layer_norm_rms_epsilon"),
        GgufValue::F32(c.rms_norm_eps as f32),
    );
    if let Some(moe) = c.moe {
        m.insert(k("expert_count"), u(moe.num_experts));
        m.insert(k("expert_used_count"), u(moe.top_k));
    }
    // The converter writes the head size only when it is not hidden / heads.
    if c.head_dim * c.num_heads != c.hidden_size {
        m.insert(k("attention.key_length"), u(c.head_dim));
        m.insert(k("attention.value_length"), u(c.head_dim));
    }
    m.insert(k("vocab_size"), u(c.vocab_size));
    m.insert(k("rope.dimension_count"), u(c.head_dim));
    m.insert("general.file_type", GgufValue::U32(scheme.file_type()));
    m.insert("general.quantization_version", GgufValue::U32(2));
    m
}

/// The type each Hugging Face tensor of `c` is stored in by [`quantize`] with `scheme`, by its
/// checkpoint name (an expert's rows of a merged GGUF tensor take that tensor's type): what a
/// planner sizes a quantized model by before the file exists.
pub fn tensor_types(c: &ModelConfig, scheme: Scheme) -> BTreeMap<String, WeightType> {
    plan(c, scheme)
        .0
        .into_iter()
        .flat_map(|p| {
            let ty = p.desc.ty;
            p.sources.into_iter().map(move |(name, _)| (name, ty))
        })
        .collect()
}

/// Every GGUF tensor in file order, with its type, and the fallbacks taken.
fn plan(c: &ModelConfig, scheme: Scheme) -> (Vec<Plan>, Vec<String>) {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut plans = Vec::new();
    let mut fallbacks = Vec::new();
    let mut matrix = |plans: &mut Vec<Plan>,
                      name: String,
                      layer: Option<usize>,
                      shape: Vec<usize>,
                      sources: Vec<(String, Vec<usize>)>,
                      rope_heads: Option<usize>| {
        let cols = shape[shape.len() - 1];
        let wanted = scheme.wanted(&name, layer, c.num_layers);
        let ty = fitting_type(wanted, cols);
        if ty != wanted {
            fallbacks.push(format!(
                "{name}: {ty} instead of {wanted} ({cols} values a row are not whole \
                 {}-value blocks)",
                wanted.block_len()
            ));
        }
        plans.push(Plan {
            desc: TensorDesc { name, shape, ty },
            sources,
            rope_heads,
        });
    };
    let one = |hf: String, shape: &[usize]| vec![(hf, shape.to_vec())];
    matrix(
        &mut plans,
        "token_embd.weight".into(),
        None,
        vec![v, h],
        one(EMBEDDING.into(), &[v, h]),
        None,
    );
    let mut vectors = Vec::new();
    for l in 0..c.num_layers {
        let n = LayerNames::new(l);
        let blk = |t: &str| format!("blk.{l}.{t}.weight");
        vectors.push((blk("attn_norm"), n.input_norm(), plans.len()));
        let (q, kv) = (c.q_dim(), c.kv_dim());
        let attn = [
            ("attn_q", "q_proj", [q, h], Some(c.num_heads)),
            ("attn_k", "k_proj", [kv, h], Some(c.num_kv_heads)),
            ("attn_v", "v_proj", [kv, h], None),
            ("attn_output", "o_proj", [h, q], None),
        ];
        for (g, hf, shape, heads) in attn {
            let sources = one(n.attn(hf), &shape);
            matrix(&mut plans, blk(g), Some(l), shape.to_vec(), sources, heads);
        }
        vectors.push((blk("ffn_norm"), n.post_attention_norm(), plans.len()));
        match c.moe {
            Some(moe) => {
                // The router stays F32, as llama.cpp's quantizer leaves ffn_gate_inp.
                vectors.push((blk("ffn_gate_inp"), n.router(), plans.len()));
                for (g, w, shape) in [
                    ("ffn_gate_exps", "w1", [i, h]),
                    ("ffn_down_exps", "w2", [h, i]),
                    ("ffn_up_exps", "w3", [i, h]),
                ] {
                    let sources = (0..moe.num_experts)
                        .map(|e| (n.expert(e, w), shape.to_vec()))
                        .collect();
                    let merged = vec![moe.num_experts, shape[0], shape[1]];
                    matrix(&mut plans, blk(g), Some(l), merged, sources, None);
                }
            }
            None => {
                for (g, hf, shape) in [
                    ("ffn_gate", "gate_proj", [i, h]),
                    ("ffn_down", "down_proj", [h, i]),
                    ("ffn_up", "up_proj", [i, h]),
                ] {
                    let sources = one(n.mlp(hf), &shape);
                    matrix(&mut plans, blk(g), Some(l), shape.to_vec(), sources, None);
                }
            }
        }
    }
    vectors.push(("output_norm.weight".into(), FINAL_NORM.into(), plans.len()));
    if !c.tie_word_embeddings {
        matrix(
            &mut plans,
            "output.weight".into(),
            None,
            vec![v, h],
            one(LM_HEAD.into(), &[v, h]),
            None,
        );
    }
    // Vectors (norms, the router) are F32 whatever the scheme, placed where the converter puts
    // them among the matrices; inserted last-first so earlier positions stay valid.
    for (gguf, hf, at) in vectors.into_iter().rev() {
        let router = gguf.ends_with("ffn_gate_inp.weight");
        let (shape, src_shape) = match (router, c.moe) {
            (true, Some(moe)) => (vec![moe.num_experts, h], vec![moe.num_experts, h]),
            _ => (vec![h], vec![h]),
        };
        plans.insert(
            at,
            Plan {
                desc: TensorDesc {
                    name: gguf,
                    shape,
                    ty: WeightType::F32,
                },
                sources: vec![(hf, src_shape)],
                rope_heads: None,
            },
        );
    }
    (plans, fallbacks)
}

/// One GGUF tensor's bytes: each source row dequantized into a row buffer and stored as the
/// plan's type, Q/K rows in ggml's interleaved order.
fn make_tensor(ckpt: &Checkpoint, p: &Plan) -> Result<Vec<u8>, QuantizeError> {
    let ty = p.desc.ty;
    let cols = p.desc.shape[p.desc.shape.len() - 1];
    let rows: usize = p.desc.shape[..p.desc.shape.len() - 1].iter().product();
    let mut data = Vec::with_capacity(ty.row_bytes(cols).unwrap_or(0) * rows);
    let mut row = vec![0f32; cols];
    for (name, shape) in &p.sources {
        let w = ckpt.read(name, shape)?;
        // GGUF row g holds Hugging Face row inverse[g].
        let order: Vec<usize> = match p.rope_heads {
            Some(heads) => {
                let forward =
                    unpermute_qk_order(w.rows(), heads).ok_or_else(|| CheckpointError::Layout {
                        name: name.clone(),
                        problem: format!(
                            "{} rows do not split into {heads} heads of an even size",
                            w.rows()
                        ),
                    })?;
                let mut inverse = vec![0; forward.len()];
                for (hf, g) in forward.into_iter().enumerate() {
                    inverse[g] = hf;
                }
                inverse
            }
            None => (0..w.rows()).collect(),
        };
        for r in order {
            w.dequantize_row_into(r, &mut row);
            quantize_row(ty, &row, &mut data);
        }
        release(w.storage());
    }
    Ok(data)
}

/// Drops a source tensor's pages from this process's memory once it is converted: pages of a
/// file map read once stay resident (and counted) until the kernel needs them, so without this
/// the whole input would end up resident. A hint: failure only costs memory.
fn release(bytes: &WeightBytes) {
    if let WeightBytes::Mapped { map, range } = bytes {
        // SAFETY: the map is read-only and file-backed; MADV_DONTNEED only unmaps its pages, and
        // a later read faults them in again from the file, so no data is lost or changed.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
    }
}

/// The `tokenizer.*` keys made from a Hugging Face tokenizer.
struct VocabKeys {
    kind: String,
    keys: Vec<(String, GgufValue)>,
}

/// A token given in `tokenizer_config.json`: a string or `{"content": …}`.
fn config_token(config: &Value, field: &str) -> Option<String> {
    match config.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `tokenizer.json` (+ `tokenizer_config.json`) of `dir` as llama.cpp's `tokenizer.ggml.*`
/// keys: `llama` (SentencePiece-style BPE with byte fallback: tokens, scores, types, and the
/// merges, which our reader uses and llama.cpp ignores) or `gpt2` (byte-level BPE: tokens, types,
/// merges, `pre`). The vocabulary is padded with `[PAD{id}]` unused tokens to the config's
/// `vocab_size`, as the converter does.
fn hf_tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<VocabKeys, QuantizeError> {
    let path = dir.join("tokenizer.json");
    let bad = |problem: String| QuantizeError::Tokenizer {
        path: path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "model type is {}; only BPE tokenizers (SentencePiece-style with byte fallback, or \
             byte-level) convert to GGUF",
            model["type"]
        )));
    }
    let has_type = |v: &Value, ty: &str| -> bool {
        v["type"].as_str() == Some(ty)
            || v["pretokenizers"]
                .as_array()
                .or(v["decoders"].as_array())
                .or(v["normalizers"].as_array())
                .is_some_and(|a| a.iter().any(|x| x["type"].as_str() == Some(ty)))
    };
    let byte_fallback = model["byte_fallback"].as_bool() == Some(true);
    let byte_level = has_type(&json["pre_tokenizer"], "ByteLevel");
    let kind =
        match (byte_fallback, byte_level) {
            (true, false) => "llama",
            (false, true) => "gpt2",
            _ => return Err(bad(
                "neither SentencePiece-style BPE with byte fallback nor byte-level BPE; cannot \
                 tell which llama.cpp tokenizer it is"
                    .into(),
            )),
        };

    // Tokens by id: the model's vocabulary, then added tokens.
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let put = |tokens: &mut Vec<Option<String>>, id: &Value, text: &str| {
        let id = id
            .as_u64()
            .filter(|&id| id < u32::MAX as u64)
            .ok_or_else(|| bad(format!("token {text:?} has id {id}; expected a u32")))?
            as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some(text.to_string());
        Ok::<usize, QuantizeError>(id)
    };
    for (text, id) in vocab {
        put(&mut tokens, id, text)?;
    }
    let mut special = Vec::new();
    let mut user = Vec::new();
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let content = added["content"]
            .as_str()
            .ok_or_else(|| bad(format!("added token {added} has no content")))?;
        let id = put(&mut tokens, &added["id"], content)?;
        if added["special"].as_bool() == Some(true) {
            special.push(id);
        } else {
            user.push(id);
        }
    }
    if tokens.len() > vocab_size {
        return Err(bad(format!(
            "has {} tokens; config.json's vocab_size is {vocab_size}",
            tokens.len()
        )));
    }
    tokens.resize(vocab_size, None);
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| vocab.get(u))
        .and_then(Value::as_u64);
    let mut types = Vec::with_capacity(vocab_size);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            let (text, ty) = match t {
                None => (format!("[PAD{id}]"), TOKEN_UNUSED),
                Some(t) if special.contains(&id) => (t, TOKEN_CONTROL),
                Some(t) if user.contains(&id) => (t, TOKEN_USER_DEFINED),
                Some(t) if Some(id as u64) == unk => (t, TOKEN_UNKNOWN),
                Some(t) if kind == "llama" && is_byte_token(&t) => (t, TOKEN_BYTE),
                Some(t) => (t, TOKEN_NORMAL),
            };
            types.push(ty);
            text
        })
        .collect();

    let merges: Vec<String> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) => match (pair.first(), pair.get(1), pair.len()) {
                (Some(Value::String(a)), Some(Value::String(b)), 2) => Ok(format!("{a} {b}")),
                _ => Err(bad(format!("merge {m} is not a pair of strings"))),
            },
            _ => Err(bad(format!("merge {m} is not a string or a pair"))),
        })
        .collect::<Result<_, _>>()?;

    let config_path = dir.join("tokenizer_config.json");
    let config: Value = match std::fs::read_to_string(&config_path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| QuantizeError::Tokenizer {
            path: config_path.clone(),
            problem: format!("not valid JSON: {e}"),
        })?,
        Err(_) => Value::Null,
    };
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let token_id = |field: &str, default: Option<&str>| {
        config_token(&config, field)
            .as_deref()
            .or(default)
            .and_then(id_of)
    };

    let mut keys = Vec::new();
    let s = |v: &str| GgufValue::String(v.to_string());
    keys.push(("tokenizer.ggml.model".to_string(), s(kind)));
    if kind == "gpt2" {
        keys.push((
            "tokenizer.ggml.pre".into(),
            s(&gpt2_pre(&json).map_err(bad)?),
        ));
    } else {
        keys.push(("tokenizer.ggml.pre".into(), s("default")));
    }
    keys.push((
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(GgufArray::String(tokens.clone())),
    ));
    if kind == "llama" {
        // SentencePiece merges the pair whose joined piece scores highest: a merged token's
        // score is minus its merge's rank, so llama.cpp merges in the same order.
        let mut scores = vec![0f32; tokens.len()];
        for (rank, m) in merges.iter().enumerate().rev() {
            if let Some(id) = id_of(&m.replacen(' ', "", 1)) {
                scores[id as usize] = -(rank as f32) - 1.0;
            }
        }
        keys.push((
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(GgufArray::F32(scores)),
        ));
    }
    keys.push((
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(GgufArray::I32(types)),
    ));
    keys.push((
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(GgufArray::String(merges)),
    ));
    let (bos_default, eos_default) = match kind {
        "llama" => (Some("<s>"), Some("</s>")),
        _ => (None, None),
    };
    let bos = token_id("bos_token", bos_default);
    if let Some(id) = bos {
        keys.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(id)));
    }
    if let Some(id) = token_id("eos_token", eos_default) {
        keys.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(id)));
    }
    if let Some(id) = unk {
        keys.push((
            "tokenizer.ggml.unknown_token_id".into(),
            GgufValue::U32(id as u32),
        ));
    }
    if let Some(id) = token_id("pad_token", None) {
        keys.push(("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(id)));
    }
    // Our directory tokenizer starts prompts with BOS when it has one.
    let add_bos = config["add_bos_token"].as_bool().unwrap_or(bos.is_some());
    keys.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(add_bos),
    ));
    if kind == "llama" {
        let prepends = has_type(&json["normalizer"], "Prepend")
            || json["pre_tokenizer"]["prepend_scheme"]
                .as_str()
                .is_some_and(|s| s != "never");
        keys.push((
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(prepends),
        ));
    }
    let template = match config.get("chat_template") {
        Some(Value::String(t)) => Some(t.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    };
    if let Some(t) = template {
        keys.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(VocabKeys {
        kind: kind.to_string(),
        keys,
    })
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer, told from its pre-tokenizer:
/// GPT-2's ByteLevel split alone, single digits then ByteLevel (StarCoder / SmolLM), or Llama
/// 3's regex then ByteLevel without its own split.
fn gpt2_pre(json: &Value) -> Result<String, String> {
    let pre = &json["pre_tokenizer"];
    if pre["type"].as_str() == Some("ByteLevel") {
        return match pre["use_regex"].as_bool() {
            Some(false) => Err("its ByteLevel pre-tokenizer does not split the text".into()),
            _ => Ok("gpt-2".into()),
        };
    }
    let parts = pre["pretokenizers"].as_array().cloned().unwrap_or_default();
    let types: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    match types[..] {
        ["Digits", "ByteLevel"] if parts[0]["individual_digits"].as_bool() == Some(true) => {
            Ok("smollm".into())
        }
        ["Split", "ByteLevel"]
            if parts[0]["pattern"]["Regex"]
                .as_str()
                .is_some_and(|r| r.contains(r"\p{N}{1,3}")) =>
        {
            Ok("llama-bpe".into())
        }
        _ => Err(format!(
            "its byte-level pre-tokenizer ({pre}) is not one of GPT-2's, SmolLM's or Llama 3's, \
             so llama.cpp's tokenizer.ggml.pre for it is unknown"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_vocab::GgufVocab;
    use crate::tokenizer::Tokenizer;
    use serde_json::json;

    /// A byte-level BPE `tokenizer.json` (GPT-2's form, SmolLM's single-digit split) written by
    /// hand: the 256 byte characters, a few merges, one special token. Its GGUF form must encode
    /// as the `tokenizers` crate encodes the original.
    #[test]
    fn byte_level_tokenizer_round_trips() {
        let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        alphabet.sort();
        let mut tokens: Vec<String> = alphabet.iter().map(char::to_string).collect();
        let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "an d", "Ġ and"];
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let special = tokens.len();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": special, "content": "<|im_end|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": merges},
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let config = json!({"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();

        let keys = hf_tokenizer_metadata(dir.path(), special + 7).unwrap();
        assert_eq!(keys.kind, "gpt2");
        let mut m = GgufMetadata::new();
        for (k, v) in keys.keys {
            m.insert(k, v);
        }
        assert_eq!(m.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
        let vocab = GgufVocab::from_metadata(&m).unwrap().unwrap();
        assert_eq!(vocab.tokens.len(), special + 7);
        assert_eq!(vocab.tokens[special + 1], format!("[PAD{}]", special + 1));
        assert_eq!(vocab.eos_id, Some(special as u32));
        let gguf = Tokenizer::from_gguf_vocab(&vocab).unwrap();
        let hf = Tokenizer::from_dir(dir.path()).unwrap();
        for text in [
            "the cat and the hat",
            " and 2024 in the end<|im_end|>",
            "Ünï 東京\n\n x",
        ] {
            assert_eq!(
                gguf.encode(text, false).unwrap(),
                hf.encode(text, false).unwrap(),
                "{text:?}"
            );
        }
    }

    /// The sizes a planner takes from [`tensor_types`] are the bytes [`quantize`] writes.
    #[test]
    fn tensor_types_size_what_quantize_writes() {
        let c = crate::init::preset("tiny-mixtral").unwrap();
        let dir = tempfile::tempdir().unwrap();
        crate::init::write_model_dir(dir.path(), &c, 1, crate::safetensors::Dtype::F32, None)
            .unwrap();
        for scheme in [Scheme::Q4KM, Scheme::Plain(WeightType::Q8_0)] {
            let out = dir.path().join("m.gguf");
            let report = quantize(dir.path(), &out, scheme, false).unwrap();
            let types = tensor_types(&c, scheme);
            let specs = c.tensor_specs(&crate::Subset::all(&c));
            assert_eq!(types.len(), specs.len());
            let planned: u64 = specs
                .iter()
                .map(|s| {
                    let (rows, cols) = (
                        s.shape[..s.shape.len() - 1].iter().product(),
                        s.shape[s.shape.len() - 1],
                    );
                    types[&s.name].matrix_bytes(rows, cols)
                })
                .sum();
            assert_eq!(planned, report.tensor_bytes, "{scheme:?}");
            assert_eq!(
                types["model.layers.0.block_sparse_moe.gate.weight"],
                WeightType::F32
            );
        }
    }

    #[test]
    fn fallbacks_follow_the_row_length() {
        assert_eq!(fitting_type(WeightType::Q4_K, 512), WeightType::Q4_K);
        assert_eq!(fitting_type(WeightType::Q4_K, 64), WeightType::Q4_1);
        assert_eq!(fitting_type(WeightType::Q6_K, 96), WeightType::Q8_0);
        assert_eq!(fitting_type(WeightType::Q6_K, 48), WeightType::F16);
        // llama.cpp's use_more_bits on 32 layers: 0..4, 28..32 and every third between.
        let picked: Vec<usize> = (0..32).filter(|&l| more_bits(l, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }
}
