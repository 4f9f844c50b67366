//! `switchyard model quantize`: every type, read back by our checkpoint reader and by gguf-py
//! (llama.cpp's reader), the tokenizer carried over, the same greedy tokens as the safetensors
//! directory for float types, and clear errors for bad input.

mod common;

use common::{fails, generate_json, gguf_py, ok};

use std::path::Path;

use switchyard_model::gguf::GgufFile;
use switchyard_model::{Checkpoint, Subset, Tokenizer, WeightType};

const TYPES: [&str; 8] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q6_k", "q4_k_m",
];

fn init(dir: &Path, preset: &str) {
    let d = dir.to_str().unwrap();
    ok(&["model", "init", "--preset", preset, "--out", d]);
}

fn quantize(dir: &Path, out: &Path, ty: &str) {
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    ok(&["model", "quantize", "--in", d, "--out", o, "--type", ty]);
}

/// The largest relative rms error a type's rounding allows: f16 and bf16 round each value
/// (2^-11 and 2^-8 relative), the block formats' bounds are their step over a block's range.
fn bound(ty: &str) -> f64 {
    match ty {
        "f32" => 0.0,
        "f16" => 1e-3,
        "bf16" => 5e-3,
        "q8_0" => 0.01,
        "q6_k" => 0.03,
        _ => 0.15,
    }
}

#[test]
fn every_type_reads_back_close_to_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["tiny-mixtral", "tiny-llama"] {
        let dir = tmp.path().join(preset);
        init(&dir, preset);
        let original = Checkpoint::open(&dir).unwrap();
        let specs = original
            .config()
            .tensor_specs(&Subset::all(original.config()));
        for ty in TYPES {
            let out = tmp.path().join(format!("{preset}-{ty}.gguf"));
            quantize(&dir, &out, ty);
            let gguf = Checkpoint::open(&out).unwrap();
            let (a, b) = (original.config(), gguf.config());
            assert_eq!(
                (a.arch, a.num_layers, a.hidden_size, a.moe, a.vocab_size),
                (b.arch, b.num_layers, b.hidden_size, b.moe, b.vocab_size),
                "{preset} {ty}"
            );
            assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings);
            gguf.validate(&Subset::all(b)).unwrap();
            for spec in &specs {
                let x = original.read_f32(&spec.name, &spec.shape).unwrap();
                let y = gguf.read_f32(&spec.name, &spec.shape).unwrap();
                let err: f64 = x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum();
                let norm: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
                let rel = (err / norm.max(1e-30)).sqrt();
                // Vectors (norms, the router) stay F32 whatever the type.
                let limit = if spec.shape.len() == 1 || spec.name.ends_with("gate.weight") {
                    0.0
                } else {
                    bound(ty)
                };
                assert!(
                    rel <= limit,
                    "{preset} {ty} {}: relative rms {rel} > {limit}",
                    spec.name
                );
            }
        }
    }
}

#[test]
fn q4_k_m_mixes_types_as_llama_cpp_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    // small-mixtral's rows are whole 256-value blocks, so no fallback is taken.
    init(&dir, "small-mixtral");
    let out = tmp.path().join("m.gguf");
    quantize(&dir, &out, "q4_k_m");
    let f = GgufFile::open(&out).unwrap();
    let ty = |n: &str| f.tensor(n).unwrap_or_else(|| panic!("{n} missing")).ty;
    let layers = f.metadata().get_u32("llama.block_count").unwrap().unwrap() as usize;
    for l in 0..layers {
        let more = switchyard_model::quantize::more_bits(l, layers);
        let want = if more {
            WeightType::Q6_K
        } else {
            WeightType::Q4_K
        };
        assert_eq!(ty(&format!("blk.{l}.attn_v.weight")), want, "layer {l}");
        assert_eq!(ty(&format!("blk.{l}.ffn_down_exps.weight")), want);
        assert_eq!(ty(&format!("blk.{l}.attn_q.weight")), WeightType::Q4_K);
        assert_eq!(ty(&format!("blk.{l}.ffn_up_exps.weight")), WeightType::Q4_K);
        assert_eq!(ty(&format!("blk.{l}.ffn_gate_inp.weight")), WeightType::F32);
        assert_eq!(ty(&format!("blk.{l}.attn_norm.weight")), WeightType::F32);
    }
    assert!((0..layers).any(|l| switchyard_model::quantize::more_bits(l, layers)));
    assert_eq!(ty("token_embd.weight"), WeightType::Q4_K);
    assert_eq!(f.metadata().get_u32("general.file_type").unwrap(), Some(15));
}

#[test]
fn tokenizer_round_trips_through_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-llama");
    let out = tmp.path().join("m.gguf");
    quantize(&dir, &out, "q8_0");
    let hf = Tokenizer::from_dir(&dir).unwrap();
    let gguf = Tokenizer::for_checkpoint(&Checkpoint::open(&out).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((hf.bos_id(), hf.eos_id()), (gguf.bos_id(), gguf.eos_id()));
    for text in [
        "The morning train left the station on time.",
        "  two spaces, tabs\tand\nnew lines",
        "Ünïcödé → bytes: 東京 🚀",
        "questions? 12345 numbers!",
        "",
    ] {
        for bos in [false, true] {
            assert_eq!(
                hf.encode(text, bos).unwrap(),
                gguf.encode(text, bos).unwrap(),
                "{text:?}"
            );
        }
    }
}

#[test]
fn float_types_generate_the_same_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["tiny-mixtral", "tiny-llama"] {
        let dir = tmp.path().join(preset);
        init(&dir, preset);
        let generate = |model: &Path| {
            let m = model.to_str().unwrap();
            let args = ["--model", m, "--prompt-ids", "1,50,60,70,80"];
            generate_json(&[&args[..], &["--max-tokens", "12", "--dtype", "f32"]].concat())
                ["token_ids"]
                .clone()
        };
        let want = generate(&dir);
        assert!(want.as_array().is_some_and(|t| !t.is_empty()), "{want}");
        for ty in ["f32", "f16"] {
            let out = tmp.path().join(format!("{preset}-{ty}.gguf"));
            quantize(&dir, &out, ty);
            assert_eq!(generate(&out), want, "{preset} {ty}");
        }
    }
}

/// gguf-py (the llama.cpp project's reader) sees the tensors we wrote with the same names,
/// shapes and types. Needs `SWITCHYARD_GGUF_PYTHON` (scripts/gguf-py-env.sh; scripts/test.sh
/// sources it).
#[test]
fn gguf_py_reads_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-mixtral");
    let script = r#"
import sys, json
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
out = {"tensors": [[t.name, [int(d) for d in t.shape], t.tensor_type.name] for t in r.tensors]}
f = r.fields
out["arch"] = bytes(f["general.architecture"].parts[-1]).decode()
out["experts"] = int(f["llama.expert_count"].parts[-1][0])
out["tokens"] = len(f["tokenizer.ggml.tokens"].data)
print(json.dumps(out))
"#;
    for ty in TYPES {
        let out = tmp.path().join(format!("{ty}.gguf"));
        quantize(&dir, &out, ty);
        let v: serde_json::Value =
            serde_json::from_str(&gguf_py(script, &[out.to_str().unwrap()])).unwrap();
        let ours = GgufFile::open(&out).unwrap();
        let want: Vec<serde_json::Value> = ours
            .tensors()
            .iter()
            .map(|t| serde_json::json!([t.name, t.dims, t.ty.name()]))
            .collect();
        assert_eq!(v["tensors"], serde_json::Value::Array(want), "{ty}");
        assert_eq!(v["arch"], "llama");
        assert_eq!(v["experts"], 4);
        assert_eq!(v["tokens"], 512);
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.gguf");
    let o = out.to_str().unwrap();
    let e = fails(&[
        "model",
        "quantize",
        "--in",
        "/nonexistent/m",
        "--out",
        o,
        "--type",
        "q8_0",
    ]);
    assert!(
        e.contains("/nonexistent/m") && e.contains("not found"),
        "{e}"
    );

    let dir = tmp.path().join("m");
    init(&dir, "tiny-llama");
    let d = dir.to_str().unwrap();
    let e = fails(&["model", "quantize", "--in", d, "--out", o, "--type", "q3_k"]);
    assert!(e.contains("q3_k") && e.contains("q4_k_m"), "{e}");

    // A WordPiece tokenizer has no llama.cpp form.
    let wordpiece = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}},
    });
    std::fs::write(dir.join("tokenizer.json"), wordpiece.to_string()).unwrap();
    let e = fails(&["model", "quantize", "--in", d, "--out", o, "--type", "q8_0"]);
    assert!(
        e.contains("tokenizer.json") && e.contains("WordPiece") && e.contains("--no-tokenizer"),
        "{e}"
    );
    ok(&[
        "model",
        "quantize",
        "--in",
        d,
        "--out",
        o,
        "--type",
        "q8_0",
        "--no-tokenizer",
    ]);
    let f = GgufFile::open(&out).unwrap();
    assert!(f.metadata().get("tokenizer.ggml.model").is_none());

    // A GGUF file as input is refused: quantize reads safetensors.
    let o2 = tmp.path().join("o2.gguf");
    let e = fails(&[
        "model",
        "quantize",
        "--in",
        o,
        "--out",
        o2.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(e.contains("safetensors"), "{e}");
}
