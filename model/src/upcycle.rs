//! `switchyard model upcycle`: a dense Llama-architecture checkpoint (safetensors or GGUF) made
//! into a Mixtral-architecture one with `E` experts that computes the same function.
//!
//! Each expert holds a 1/E slice of the FFN's intermediate neurons: rows of `gate_proj` and
//! `up_proj`, the matching columns of `down_proj`. An FFN is a sum over its neurons, so the
//! experts' outputs add up to the dense FFN's. The router is all zeros and every token uses all
//! `E` experts (`top_k = E`), so each gets the softmax weight 1/E; the down slices are scaled
//! by E to cancel it. For a power-of-two E the scaling is exact (a block format scales its f16
//! block scales, the quantized values stay), so the only differences from the dense model are
//! the order of f32 additions. The output is an *upcycled equivalent*, not a trained MoE: its
//! model card and metadata say so. What it is for: a real model whose every token visits every
//! expert shard, which checks routing, exchange and combine on real activations.
//!
//! Tensors are streamed like `model quantize` does: the header from the shapes, then one
//! output tensor in memory at a time. The output keeps the input's format and storage types.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::{model_name, Checkpoint, CheckpointError, StoredTensor};
use crate::config::Arch;
use crate::gguf::{GgufError, GgufMetadata, GgufValue, GgufWriter, TensorDesc};
use crate::gguf_model::GGUF_ARCH;
use crate::quant::{scale_blocks, WeightType};
use crate::safetensors::SafetensorsWriter;

#[derive(Debug, thiserror::Error)]
pub enum UpcycleError {
    #[error(
        "{path}: not found; expected a dense model directory (config.json, safetensors) or a \
         GGUF file"
    )]
    NotFound { path: PathBuf },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Model(String),
    #[error("--experts {experts}: {problem}")]
    Experts { experts: usize, problem: String },
    #[error(
        "--out {path}: exists and is not an empty directory; expected a new or empty directory"
    )]
    OutExists { path: PathBuf },
    #[error("tensor {name}: scaled by {factor}, a value becomes {value}, out of range for {ty}")]
    Overflow {
        name: String,
        factor: usize,
        value: f32,
        ty: WeightType,
    },
}

/// What [`upcycle`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcycleReport {
    /// The weights file written (`model.safetensors` or a `.gguf`).
    pub weights: PathBuf,
    pub layers: usize,
    pub experts: usize,
    /// Intermediate neurons per expert.
    pub expert_intermediate: usize,
    pub tensors: usize,
    pub tensor_bytes: u64,
}

/// Which FFN matrix of which layer a stored tensor is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ffn {
    Gate,
    Up,
    Down,
}

impl Ffn {
    fn hf(self) -> &'static str {
        match self {
            Ffn::Gate => "w1",
            Ffn::Down => "w2",
            Ffn::Up => "w3",
        }
    }
    fn gguf(self) -> &'static str {
        match self {
            Ffn::Gate => "ffn_gate",
            Ffn::Up => "ffn_up",
            Ffn::Down => "ffn_down",
        }
    }
}

/// The two layouts a checkpoint comes in, named as their files name tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Safetensors,
    Gguf,
}

impl Format {
    fn ffn(self, name: &str) -> Option<(usize, Ffn)> {
        let (layer, rest) = match self {
            Format::Safetensors => name.strip_prefix("model.layers.")?.split_once(".mlp.")?,
            Format::Gguf => name.strip_prefix("blk.")?.split_once('.')?,
        };
        let ffn = match (self, rest) {
            (Format::Safetensors, "gate_proj.weight") | (Format::Gguf, "ffn_gate.weight") => {
                Ffn::Gate
            }
            (Format::Safetensors, "up_proj.weight") | (Format::Gguf, "ffn_up.weight") => Ffn::Up,
            (Format::Safetensors, "down_proj.weight") | (Format::Gguf, "ffn_down.weight") => {
                Ffn::Down
            }
            _ => return None,
        };
        Some((layer.parse().ok()?, ffn))
    }
}

/// A piece of an output tensor's bytes.
enum Part {
    /// A stored tensor whole.
    Copy(usize),
    /// Expert `e`'s rows of a gate or up matrix.
    Rows { src: usize, e: usize },
    /// Expert `e`'s columns of a down matrix, scaled by the expert count.
    Columns { src: usize, e: usize },
    /// A zero router of this many bytes.
    Zeros(usize),
}

struct Output {
    name: String,
    shape: Vec<usize>,
    ty: WeightType,
    parts: Vec<Part>,
}

/// Writes the Mixtral-architecture equivalent of the dense checkpoint `input` (a model
/// directory or a GGUF file) with `experts` experts into the directory `out`.
pub fn upcycle(input: &Path, out: &Path, experts: usize) -> Result<UpcycleReport, UpcycleError> {
    if !input.exists() {
        return Err(UpcycleError::NotFound {
            path: input.to_path_buf(),
        });
    }
    let ckpt = Checkpoint::open(input)?;
    let config = ckpt.config();
    if config.moe.is_some() || config.arch == Arch::Mixtral {
        return Err(UpcycleError::Model(format!(
            "{}: already a mixture of experts; expected a dense Llama or Mistral checkpoint",
            input.display()
        )));
    }
    let inter = config.intermediate_size;
    let bad = |problem: String| UpcycleError::Experts { experts, problem };
    if !(2..=1024).contains(&experts) {
        return Err(bad("expected 2 to 1024 experts".into()));
    }
    if !inter.is_multiple_of(experts) {
        return Err(bad(format!(
            "the intermediate size {inter} does not split into {experts} equal slices; expected \
             a divisor of {inter}"
        )));
    }
    let slice = inter / experts;
    let format = if ckpt.gguf().is_some() {
        Format::Gguf
    } else {
        Format::Safetensors
    };
    let stored = ckpt.stored_tensors()?;
    let shape = (config.num_layers, config.hidden_size, inter);
    let outputs = plan(format, &stored, shape, experts)?;
    prepare_out(out)?;
    let source = name_of(input);

    let (weights, tensor_bytes) = match format {
        Format::Gguf => {
            let file = ckpt.gguf().expect("a GGUF checkpoint");
            let stem = file
                .path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let path = out.join(format!("{stem}.upcycled-{experts}x.gguf"));
            let metadata = gguf_metadata(file.metadata(), experts, slice);
            let descs: Vec<TensorDesc> = outputs
                .iter()
                .map(|o| TensorDesc {
                    name: o.name.clone(),
                    shape: o.shape.clone(),
                    ty: o.ty,
                })
                .collect();
            let mut w = GgufWriter::create(&path, &metadata, &descs)?;
            let total = stream(&outputs, &stored, experts, |data| Ok(w.write_tensor(data)?))?;
            w.finish()?;
            (path, total)
        }
        Format::Safetensors => {
            let config_path = input.join("config.json");
            let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| {
                UpcycleError::Model(format!("{}: not valid JSON: {e}", config_path.display()))
            })?;
            let mixtral = hf_config(json, experts, slice, &source);
            let config_out = out.join("config.json");
            let pretty = serde_json::to_string_pretty(&mixtral).expect("a JSON value");
            std::fs::write(&config_out, pretty + "\n").map_err(io(&config_out))?;
            copy_side_files(input, out)?;
            let path = out.join("model.safetensors");
            let descs: Vec<_> = outputs
                .iter()
                .map(|o| {
                    let dtype = o.ty.safetensors_dtype().expect("safetensors holds floats");
                    (o.name.clone(), dtype, o.shape.clone())
                })
                .collect();
            let mut w = SafetensorsWriter::create(&path, &descs).map_err(io(&path))?;
            let total = stream(&outputs, &stored, experts, |data| {
                w.write_tensor(data).map_err(io(&path))
            })?;
            w.finish().map_err(io(&path))?;
            (path, total)
        }
    };
    let card = out.join("README.md");
    std::fs::write(&card, model_card(&source, experts, slice, inter)).map_err(io(&card))?;
    Ok(UpcycleReport {
        weights,
        layers: config.num_layers,
        experts,
        expert_intermediate: slice,
        tensors: outputs.len(),
        tensor_bytes,
    })
}

/// The output tensors, in the input's order, each FFN matrix replaced by its experts' (and
/// the router inserted before the gate).
fn plan(
    format: Format,
    stored: &[StoredTensor<'_>],
    (layers, hidden, inter): (usize, usize, usize),
    experts: usize,
) -> Result<Vec<Output>, UpcycleError> {
    let slice = inter / experts;
    let mut out = Vec::new();
    let mut found = std::collections::BTreeSet::new();
    for (src, t) in stored.iter().enumerate() {
        let Some((layer, ffn)) = format.ffn(t.name) else {
            out.push(Output {
                name: t.name.to_string(),
                shape: t.shape.clone(),
                ty: t.ty,
                parts: vec![Part::Copy(src)],
            });
            continue;
        };
        let expected = match ffn {
            Ffn::Gate | Ffn::Up => [inter, hidden],
            Ffn::Down => [hidden, inter],
        };
        found.insert((layer, ffn.gguf()));
        if t.shape != expected {
            return Err(UpcycleError::Model(format!(
                "tensor {} has shape {:?}; expected {expected:?} from the config",
                t.name, t.shape
            )));
        }
        if ffn == Ffn::Down && !slice.is_multiple_of(t.ty.block_len()) {
            let fits: Vec<String> = (2..=inter)
                .filter(|e| inter % e == 0 && (inter / e) % t.ty.block_len() == 0)
                .take(6)
                .map(|e| e.to_string())
                .collect();
            return Err(UpcycleError::Experts {
                experts,
                problem: format!(
                    "tensor {} is {} ({}-value blocks) and {slice} columns per expert is not \
                     whole blocks; expected an expert count whose slice is (here: {})",
                    t.name,
                    t.ty,
                    t.ty.block_len(),
                    if fits.is_empty() {
                        "none".into()
                    } else {
                        fits.join(", ")
                    }
                ),
            });
        }
        let rows = match ffn {
            Ffn::Gate | Ffn::Up => slice,
            Ffn::Down => hidden,
        };
        let cols = match ffn {
            Ffn::Gate | Ffn::Up => hidden,
            Ffn::Down => slice,
        };
        let part = |e| match ffn {
            Ffn::Gate | Ffn::Up => Part::Rows { src, e },
            Ffn::Down => Part::Columns { src, e },
        };
        let router = |name: String, ty: WeightType| Output {
            name,
            shape: vec![experts, hidden],
            ty,
            parts: vec![Part::Zeros(
                experts * ty.row_bytes(hidden).expect("a float type"),
            )],
        };
        match format {
            Format::Gguf => {
                if ffn == Ffn::Gate {
                    // llama.cpp keeps routers in F32.
                    out.push(router(
                        format!("blk.{layer}.ffn_gate_inp.weight"),
                        WeightType::F32,
                    ));
                }
                out.push(Output {
                    name: format!("blk.{layer}.{}_exps.weight", ffn.gguf()),
                    shape: vec![experts, rows, cols],
                    ty: t.ty,
                    parts: (0..experts).map(part).collect(),
                });
            }
            Format::Safetensors => {
                let moe = format!("model.layers.{layer}.block_sparse_moe");
                if ffn == Ffn::Gate {
                    out.push(router(format!("{moe}.gate.weight"), t.ty));
                }
                for e in 0..experts {
                    out.push(Output {
                        name: format!("{moe}.experts.{e}.{}.weight", ffn.hf()),
                        shape: vec![rows, cols],
                        ty: t.ty,
                        parts: vec![part(e)],
                    });
                }
            }
        }
    }
    if found.len() != 3 * layers {
        return Err(UpcycleError::Model(format!(
            "the checkpoint holds {} FFN matrices; expected gate, up and down for each of its \
             {layers} layers",
            found.len()
        )));
    }
    Ok(out)
}

/// The bytes of one output tensor.
fn make(o: &Output, stored: &[StoredTensor<'_>], experts: usize) -> Result<Vec<u8>, UpcycleError> {
    let mut data = Vec::new();
    for part in &o.parts {
        match *part {
            Part::Copy(src) => data.extend_from_slice(stored[src].bytes),
            Part::Zeros(n) => data.resize(data.len() + n, 0),
            Part::Rows { src, e } => {
                let t = &stored[src];
                let len = t.bytes.len() / experts;
                data.extend_from_slice(&t.bytes[e * len..(e + 1) * len]);
            }
            Part::Columns { src, e } => {
                let t = &stored[src];
                let row = t.ty.row_bytes(t.shape[1]).expect("checked when opened");
                let share = row / experts;
                let start = data.len();
                for r in t.bytes.chunks_exact(row) {
                    data.extend_from_slice(&r[e * share..(e + 1) * share]);
                }
                let factor = experts as f32;
                scale_blocks(t.ty, &mut data[start..], factor).map_err(|value| {
                    UpcycleError::Overflow {
                        name: t.name.to_string(),
                        factor: experts,
                        value,
                        ty: t.ty,
                    }
                })?;
            }
        }
    }
    Ok(data)
}

fn name_of(input: &Path) -> String {
    model_name(input).unwrap_or_else(|| input.display().to_string())
}

/// The error of an I/O call on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpcycleError {
    let path = path.to_path_buf();
    move |source| UpcycleError::Io { path, source }
}

/// Makes each output tensor in turn and hands its bytes to `write`; the tensor bytes written.
fn stream(
    outputs: &[Output],
    stored: &[StoredTensor<'_>],
    experts: usize,
    mut write: impl FnMut(&[u8]) -> Result<(), UpcycleError>,
) -> Result<u64, UpcycleError> {
    let mut total = 0u64;
    for o in outputs {
        let data = make(o, stored, experts)?;
        total += data.len() as u64;
        write(&data)?;
    }
    Ok(total)
}

const UPCYCLED: &str = "Upcycled equivalent, not a trained mixture of experts";

fn description(source: &str, experts: usize, slice: usize) -> String {
    format!(
        "{UPCYCLED}: {source} with each FFN split into {experts} experts of {slice} neurons, a \
         zero router and all {experts} experts used per token (switchyard model upcycle); it \
         computes the dense model's function"
    )
}

/// The dense file's metadata with the expert keys of llama.cpp's Mixtral form.
fn gguf_metadata(dense: &GgufMetadata, experts: usize, slice: usize) -> GgufMetadata {
    let mut m = GgufMetadata::new();
    for (k, v) in dense.iter() {
        m.insert(k, v.clone());
    }
    let k = |name: &str| format!("{GGUF_ARCH}.{name}");
    let u = |v: usize| GgufValue::U32(v as u32);
    // llama.cpp's Mixtral files give the per-expert size as the feed-forward length.
    m.insert(k("feed_forward_length"), u(slice));
    m.insert(k("expert_count"), u(experts));
    m.insert(k("expert_used_count"), u(experts));
    let source = dense
        .get_str("general.name")
        .ok()
        .flatten()
        .unwrap_or("model")
        .to_string();
    m.insert(
        "general.name",
        GgufValue::String(format!("{source} (upcycled, {experts} experts)")),
    );
    m.insert(
        "general.description",
        GgufValue::String(description(&source, experts, slice)),
    );
    m
}

/// The dense `config.json` as a Mixtral one: the same attention, norms, RoPE, vocabulary and
/// special tokens, with the expert fields.
fn hf_config(mut json: Value, experts: usize, slice: usize, source: &str) -> Value {
    let obj = json
        .as_object_mut()
        .expect("config.json was read as an object");
    // Llama-only fields MixtralConfig does not take.
    for key in ["attention_bias", "mlp_bias", "pretraining_tp"] {
        obj.remove(key);
    }
    obj.insert(
        "architectures".into(),
        serde_json::json!(["MixtralForCausalLM"]),
    );
    obj.insert("model_type".into(), "mixtral".into());
    obj.insert("intermediate_size".into(), slice.into());
    obj.insert("num_local_experts".into(), experts.into());
    obj.insert("num_experts_per_tok".into(), experts.into());
    obj.insert("output_router_logits".into(), false.into());
    obj.insert("router_aux_loss_coef".into(), 0.0.into());
    obj.insert("router_jitter_noise".into(), 0.0.into());
    obj.entry("sliding_window").or_insert(Value::Null);
    obj.insert(
        "upcycled_from".into(),
        serde_json::json!({"model": source, "note": UPCYCLED}),
    );
    json
}

fn model_card(source: &str, experts: usize, slice: usize, inter: usize) -> String {
    format!(
        "# {source}, upcycled to {experts} experts\n\n\
         **{UPCYCLED}.** Made by `switchyard model upcycle --experts {experts}` from \
         `{source}`.\n\n\
         Each layer's FFN ({inter} intermediate neurons) is split into {experts} experts of \
         {slice} neurons (gate and up rows, the matching down columns scaled by {experts}). \
         The router is all zeros and every token uses all {experts} experts, each weighted \
         1/{experts} by the softmax, so the model computes the same function as `{source}` \
         up to the order of floating-point additions. It exists to exercise expert routing, \
         exchange and combine on a real model; it has no more capacity than the dense one.\n\n\
         The license and terms of `{source}` apply.\n"
    )
}

/// `out` must be new or empty, so an upcycle never mixes with another model's files.
fn prepare_out(out: &Path) -> Result<(), UpcycleError> {
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_none();
        if !empty {
            return Err(UpcycleError::OutExists {
                path: out.to_path_buf(),
            });
        }
    }
    std::fs::create_dir_all(out).map_err(io(out))
}

/// The tokenizer, generation config and other files beside a safetensors model, copied as they
/// are (not the weights, their index, config.json or a model card).
fn copy_side_files(input: &Path, out: &Path) -> Result<(), UpcycleError> {
    for entry in std::fs::read_dir(input).map_err(io(input))? {
        let path = entry.map_err(io(input))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let skip = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == "config.json"
            || name == "README.md";
        if path.is_file() && !skip {
            let to = out.join(&*name);
            std::fs::copy(&path, &to).map_err(io(&to))?;
        }
    }
    Ok(())
}
