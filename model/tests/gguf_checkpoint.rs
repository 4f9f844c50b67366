//! GGUF files as checkpoints: a model converted to GGUF the way llama.cpp's converter lays it
//! out (its names, Q/K rows interleaved, experts merged or split, f32 or Q8_0) reads back, by
//! Hugging Face names, as the safetensors model it came from; and broken files are refused
//! naming the tensor or key.

use std::collections::BTreeSet;
use std::path::Path;

use switchyard_model::gguf::{write, GgufArray, GgufMetadata, GgufValue, TensorDesc};
use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::quant::quantize_row;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{Checkpoint, ModelConfig, Subset, WeightBytes, WeightType};

/// The converter's `LlamaModel.permute` on rows: `reshape(n, 2, rows/n/2, cols).swapaxes(1, 2)`.
fn permute(values: &[f32], cols: usize, n: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let half = rows / n / 2;
    let row = |r: usize| &values[r * cols..(r + 1) * cols];
    let mut out = Vec::with_capacity(values.len());
    for h in 0..n {
        for j in 0..half {
            for s in 0..2 {
                out.extend_from_slice(row((h * 2 + s) * half + j));
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Options {
    ty: WeightType,
    merged_experts: bool,
}

fn metadata(c: &ModelConfig) -> GgufMetadata {
    let mut m = GgufMetadata::new();
    let s = |v: &str| GgufValue::String(v.into());
    let u = |v: usize| GgufValue::U32(v as u32);
    m.insert("general.architecture", s("llama"));
    m.insert("llama.block_count", u(c.num_layers));
    m.insert("llama.context_length", u(c.max_position_embeddings));
    m.insert("llama.embedding_length", u(c.hidden_size));
    m.insert("llama.feed_forward_length", u(c.intermediate_size));
    m.insert("llama.attention.head_count", u(c.num_heads));
    m.insert("llama.attention.head_count_kv", u(c.num_kv_heads));
    m.insert("llama.rope.freq_base", GgufValue::F32(c.rope_theta as f32));
    m.insert(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(c.rms_norm_eps as f32),
    );
    m.insert("llama.rope.dimension_count", u(c.head_dim));
    if c.head_dim * c.num_heads != c.hidden_size {
        m.insert("llama.attention.key_length", u(c.head_dim));
        m.insert("llama.attention.value_length", u(c.head_dim));
    }
    if let Some(moe) = c.moe {
        m.insert("llama.expert_count", u(moe.num_experts));
        m.insert("llama.expert_used_count", u(moe.top_k));
    }
    m.insert("tokenizer.ggml.model", s("gpt2"));
    m.insert(
        "tokenizer.ggml.tokens",
        GgufValue::Array(GgufArray::String(
            (0..c.vocab_size).map(|i| format!("t{i}")).collect(),
        )),
    );
    m.insert("tokenizer.ggml.bos_token_id", u(1));
    m.insert("tokenizer.ggml.eos_token_id", u(2));
    m
}

/// Converts the safetensors model in `dir` to `out` as llama.cpp's converter would.
fn to_gguf(dir: &Path, out: &Path, o: Options) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let c = ckpt.config().clone();
    let read = |name: &str, shape: &[usize]| ckpt.read_f32(name, shape).unwrap();
    let mut tensors: Vec<(TensorDesc, Vec<f32>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        let ty = if shape.len() == 1 {
            WeightType::F32
        } else {
            o.ty
        };
        tensors.push((TensorDesc { name, shape, ty }, values));
    };
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    push(
        "token_embd.weight".into(),
        vec![v, h],
        read("model.embed_tokens.weight", &[v, h]),
    );
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let blk = |t: &str| format!("blk.{l}.{t}.weight");
        push(
            blk("attn_norm"),
            vec![h],
            read(&format!("{p}.input_layernorm.weight"), &[h]),
        );
        let q = read(&format!("{p}.self_attn.q_proj.weight"), &[c.q_dim(), h]);
        push(
            blk("attn_q"),
            vec![c.q_dim(), h],
            permute(&q, h, c.num_heads),
        );
        let k = read(&format!("{p}.self_attn.k_proj.weight"), &[c.kv_dim(), h]);
        push(
            blk("attn_k"),
            vec![c.kv_dim(), h],
            permute(&k, h, c.num_kv_heads),
        );
        push(
            blk("attn_v"),
            vec![c.kv_dim(), h],
            read(&format!("{p}.self_attn.v_proj.weight"), &[c.kv_dim(), h]),
        );
        push(
            blk("attn_output"),
            vec![h, c.q_dim()],
            read(&format!("{p}.self_attn.o_proj.weight"), &[h, c.q_dim()]),
        );
        push(
            blk("ffn_norm"),
            vec![h],
            read(&format!("{p}.post_attention_layernorm.weight"), &[h]),
        );
        match c.moe {
            None => {
                for (hf, g, shape) in [
                    ("gate_proj", "ffn_gate", [i, h]),
                    ("up_proj", "ffn_up", [i, h]),
                    ("down_proj", "ffn_down", [h, i]),
                ] {
                    push(
                        blk(g),
                        shape.to_vec(),
                        read(&format!("{p}.mlp.{hf}.weight"), &shape),
                    );
                }
            }
            Some(moe) => {
                let n = moe.num_experts;
                push(
                    blk("ffn_gate_inp"),
                    vec![n, h],
                    read(&format!("{p}.block_sparse_moe.gate.weight"), &[n, h]),
                );
                for (w, g, shape) in [
                    ("w1", "ffn_gate", [i, h]),
                    ("w3", "ffn_up", [i, h]),
                    ("w2", "ffn_down", [h, i]),
                ] {
                    let expert = |e: usize| {
                        read(
                            &format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"),
                            &shape,
                        )
                    };
                    if o.merged_experts {
                        let all: Vec<f32> = (0..n).flat_map(expert).collect();
                        push(blk(&format!("{g}_exps")), vec![n, shape[0], shape[1]], all);
                    } else {
                        for e in 0..n {
                            push(format!("blk.{l}.{g}.{e}.weight"), shape.to_vec(), expert(e));
                        }
                    }
                }
            }
        }
    }
    push(
        "output_norm.weight".into(),
        vec![h],
        read("model.norm.weight", &[h]),
    );
    if !c.tie_word_embeddings {
        push(
            "output.weight".into(),
            vec![v, h],
            read("lm_head.weight", &[v, h]),
        );
    }
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(d, values)| {
            let mut b = Vec::new();
            quantize_row(d.ty, values, &mut b);
            b
        })
        .collect();
    let refs: Vec<(TensorDesc, &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((d, _), b)| (d.clone(), b.as_slice()))
        .collect();
    write(out, &metadata(&c), &refs).unwrap();
}

fn model(preset_name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(
        dir.path(),
        &preset(preset_name).unwrap(),
        3,
        Dtype::F32,
        None,
    )
    .unwrap();
    dir
}

/// What `values` become stored as `ty` and read back.
fn through(ty: WeightType, values: &[f32]) -> Vec<f32> {
    let mut b = Vec::new();
    quantize_row(ty, values, &mut b);
    let w = switchyard_model::HostWeight::new(ty, 1, values.len(), b.into()).unwrap();
    w.to_f32()
}

#[test]
fn a_converted_model_reads_back_as_its_safetensors() {
    for (name, o) in [
        (
            "tiny-llama",
            Options {
                ty: WeightType::F32,
                merged_experts: true,
            },
        ),
        (
            "tiny-llama",
            Options {
                ty: WeightType::Q8_0,
                merged_experts: true,
            },
        ),
        (
            "tiny-mixtral",
            Options {
                ty: WeightType::F32,
                merged_experts: true,
            },
        ),
        (
            "tiny-mixtral",
            Options {
                ty: WeightType::Q8_0,
                merged_experts: true,
            },
        ),
        (
            "tiny-mixtral",
            Options {
                ty: WeightType::F16,
                merged_experts: false,
            },
        ),
    ] {
        let hf = model(name);
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("m.gguf");
        to_gguf(hf.path(), &path, o);
        let reference = Checkpoint::open(hf.path()).unwrap();
        // The file itself, and the directory holding it, open alike.
        for at in [path.as_path(), out.path()] {
            let g = Checkpoint::open(at).unwrap();
            let (rc, gc) = (reference.config(), g.config());
            assert_eq!(gc.num_layers, rc.num_layers);
            assert_eq!(gc.hidden_size, rc.hidden_size);
            assert_eq!(gc.intermediate_size, rc.intermediate_size);
            assert_eq!(
                (gc.num_heads, gc.num_kv_heads, gc.head_dim),
                (rc.num_heads, rc.num_kv_heads, rc.head_dim)
            );
            assert_eq!(gc.vocab_size, rc.vocab_size);
            assert_eq!(gc.moe, rc.moe);
            assert_eq!(gc.tie_word_embeddings, rc.tie_word_embeddings);
            assert_eq!(gc.rope_theta, rc.rope_theta as f32 as f64);
            assert_eq!(gc.bos_token_id, Some(1));
            assert_eq!(gc.eos_token_ids, vec![2]);
            assert_eq!(gc.dtype, None);
            let all = Subset::all(gc);
            g.validate(&all).unwrap();
            for spec in gc.tensor_specs(&all) {
                let want = reference.read_f32(&spec.name, &spec.shape).unwrap();
                let want = if spec.shape.len() == 1 {
                    want
                } else {
                    // Row by row, as the file stores them (quantization is per row block).
                    want.chunks(spec.shape[1])
                        .flat_map(|r| through(o.ty, r))
                        .collect()
                };
                let got = g.read(&spec.name, &spec.shape).unwrap();
                assert_eq!(got.to_f32(), want, "{name} {:?}: {}", o.ty, spec.name);
            }
            let bytes = g.bytes_by_dtype();
            assert!(
                bytes.contains_key("F32") && bytes.contains_key(o.ty.name()),
                "{bytes:?}"
            );
        }
    }
}

#[test]
fn one_expert_is_a_byte_range_of_the_merged_tensor() {
    let hf = model("tiny-mixtral");
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("m.gguf");
    to_gguf(
        hf.path(),
        &path,
        Options {
            ty: WeightType::Q8_0,
            merged_experts: true,
        },
    );
    let g = Checkpoint::open(&path).unwrap();
    let c = g.config().clone();
    let subset = Subset {
        layers: 1..2,
        experts: Some(BTreeSet::from([2])),
        embedding: false,
        head: false,
    };
    g.validate(&subset).unwrap();
    let exps = g
        .gguf()
        .unwrap()
        .tensor("blk.1.ffn_up_exps.weight")
        .unwrap()
        .clone();
    let w = g
        .read(
            "model.layers.1.block_sparse_moe.experts.2.w3.weight",
            &[c.intermediate_size, c.hidden_size],
        )
        .unwrap();
    let expert_bytes = exps.range.len() / 4;
    match w.storage() {
        WeightBytes::Mapped { range, .. } => {
            assert_eq!(range.start, exps.range.start + 2 * expert_bytes);
            assert_eq!(range.len(), expert_bytes);
        }
        WeightBytes::Owned(_) => panic!("an expert's weight was copied"),
    }
}

/// A converted tiny-mixtral with one tensor or key changed by `edit`.
fn broken(edit: impl FnOnce(&mut GgufMetadata, &mut Vec<(TensorDesc, Vec<u8>)>)) -> String {
    let hf = model("tiny-mixtral");
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("m.gguf");
    to_gguf(
        hf.path(),
        &path,
        Options {
            ty: WeightType::F32,
            merged_experts: true,
        },
    );
    let f = switchyard_model::gguf::GgufFile::open(&path).unwrap();
    let mut meta = f.metadata().clone();
    let mut tensors: Vec<(TensorDesc, Vec<u8>)> = f
        .tensors()
        .iter()
        .map(|t| {
            (
                TensorDesc {
                    name: t.name.clone(),
                    shape: t.shape(),
                    ty: t.ty,
                },
                f.bytes(t).to_vec(),
            )
        })
        .collect();
    drop(f);
    edit(&mut meta, &mut tensors);
    let refs: Vec<(TensorDesc, &[u8])> = tensors
        .iter()
        .map(|(d, b)| (d.clone(), b.as_slice()))
        .collect();
    write(&path, &meta, &refs).unwrap();
    match Checkpoint::open(&path).and_then(|c| c.validate(&Subset::all(c.config()))) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("broken GGUF accepted"),
    }
}

#[test]
fn shapes_that_disagree_with_the_metadata_are_refused() {
    // The Q projection one head short of head_count.
    let e = broken(|_, t| {
        let (d, b) = t
            .iter_mut()
            .find(|(d, _)| d.name == "blk.0.attn_q.weight")
            .unwrap();
        d.shape[0] -= 16;
        b.truncate(b.len() - 16 * 64 * 4);
    });
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight (GGUF blk.0.attn_q.weight)")
            && e.contains("[48, 64]")
            && e.contains("expected [64, 64]"),
        "{e}"
    );
    // More experts claimed than the merged tensors hold.
    let e = broken(|m, _| m.insert("llama.expert_count", GgufValue::U32(5)));
    assert!(
        e.contains("blk.0.ffn_gate_inp.weight") && e.contains("expected [5, 64]"),
        "{e}"
    );
    // A vocabulary longer than the embedding.
    let e = broken(|m, _| {
        m.insert(
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::String(vec!["x".into(); 600])),
        )
    });
    assert!(
        e.contains("token_embd.weight") && e.contains("expected [600, 64]"),
        "{e}"
    );
    // A layer missing.
    let e = broken(|_, t| t.retain(|(d, _)| !d.name.starts_with("blk.1.")));
    assert!(
        e.contains(
            "model.layers.1.input_layernorm.weight (GGUF blk.1.attn_norm.weight) is missing"
        ),
        "{e}"
    );
}

#[test]
fn bad_metadata_is_refused_naming_the_key() {
    let e = broken(|m, _| m.insert("general.architecture", GgufValue::String("qwen2".into())));
    assert!(e.contains("unsupported GGUF architecture \"qwen2\""), "{e}");
    let e = broken(|m, _| m.insert("llama.attention.head_count_kv", GgufValue::U32(3)));
    assert!(
        e.contains("`llama.attention.head_count_kv` is 3; expected a divisor"),
        "{e}"
    );
    let e = broken(|m, _| m.insert("llama.block_count", GgufValue::String("2".into())));
    assert!(
        e.contains("`llama.block_count` is the string \"2\"; expected a non-negative integer"),
        "{e}"
    );
    let e = broken(|m, _| m.insert("llama.rope.dimension_count", GgufValue::U32(8)));
    assert!(e.contains("`llama.rope.dimension_count` is 8"), "{e}");
    let e = broken(|m, _| m.insert("llama.expert_used_count", GgufValue::U32(9)));
    assert!(
        e.contains("`llama.expert_used_count` is 9; expected 1..=4"),
        "{e}"
    );
    let e = broken(|m, _| m.insert("llama.embedding_length", GgufValue::U64(1 << 40)));
    assert!(
        e.contains("`llama.embedding_length` is 1099511627776; expected at most"),
        "{e}"
    );
}

#[test]
fn a_directory_with_several_gguf_files_is_ambiguous() {
    let hf = model("tiny-llama");
    let out = tempfile::tempdir().unwrap();
    let o = Options {
        ty: WeightType::F32,
        merged_experts: true,
    };
    to_gguf(hf.path(), &out.path().join("a.gguf"), o);
    to_gguf(hf.path(), &out.path().join("b.gguf"), o);
    let e = Checkpoint::open(out.path()).err().unwrap().to_string();
    assert!(e.contains("2 .gguf files"), "{e}");
    // Beside safetensors, a .gguf is ignored: the directory is the safetensors model.
    to_gguf(hf.path(), &hf.path().join("a.gguf"), o);
    assert!(Checkpoint::open(hf.path()).unwrap().gguf().is_none());
}
