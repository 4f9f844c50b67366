//! `switchyard model upcycle`: a trained dense model (SmolLM2-135M-Instruct, Q4_1 GGUF, from
//! `scripts/smollm2.sh`) made into an equivalent 8-expert Mixtral, whose greedy tokens equal
//! the dense model's in one process and on a 2x2 grid (every token visits both expert shards
//! of both stages); the file is readable by gguf-py (llama.cpp's reader) as a Mixtral-form
//! `llama` file; bad input gets clear errors. (The safetensors path is checked against
//! transformers in `worker/tests/hf_reference.rs`.)

mod common;

use std::path::Path;

use common::{fails, generate_json, gguf_py, http, http_address, ok, serve, smollm2};
use switchyard_model::Checkpoint;

const PROMPT: &str = "The three largest cities of France are";
const TOKENS: &str = "24";

/// Greedy token ids and text of `generate` on `model`.
fn generate(model: &str) -> (Vec<u64>, String) {
    let reply = generate_json(&[
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--max-tokens",
        TOKENS,
        "--ignore-eos",
    ]);
    let ids = reply["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {reply}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    (ids, reply["text"].as_str().unwrap().to_string())
}

#[test]
fn an_upcycled_smollm2_generates_the_dense_models_tokens_on_a_2x2_grid() {
    let dense = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-8x");
    let o = out.to_str().unwrap();
    ok(&[
        "model",
        "upcycle",
        "--in",
        &dense,
        "--out",
        o,
        "--experts",
        "8",
    ]);

    let moe = Checkpoint::open(&out).unwrap();
    let c = moe.config();
    assert_eq!(c.moe.map(|m| (m.num_experts, m.top_k)), Some((8, 8)));
    assert_eq!(c.intermediate_size, 1536 / 8);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("not a trained mixture of experts"), "{card}");
    let file = moe.gguf().unwrap().path().to_str().unwrap().to_string();

    let want = generate(&dense);
    assert_eq!(want.0.len(), 24);
    assert_eq!(
        generate(&file),
        want,
        "one process: upcycled vs dense tokens"
    );

    // Through the cluster: 2 stages x 2 expert shards, 4 experts each.
    let server = serve(&["--model", &file, "--grid", "2x2"]);
    let name = Path::new(&file).file_name().unwrap().to_str().unwrap();
    let body = serde_json::json!({
        "model": name,
        "prompt": PROMPT,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, reply) = http(
        &http_address(&server),
        "POST",
        "/v1/completions",
        &body.to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let text = reply["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, want.1, "2x2 grid: upcycled vs dense text");
}

/// gguf-py, llama.cpp's own reader, sees the upcycled file as llama.cpp's Mixtral form:
/// merged `*_exps` tensors, an F32 router, the expert keys.
#[test]
fn gguf_py_reads_the_upcycled_file_as_a_mixtral() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = out.to_str().unwrap();
    ok(&[
        "model",
        "upcycle",
        "--in",
        &smollm2(),
        "--out",
        o,
        "--experts",
        "4",
    ]);
    let file = Checkpoint::open(&out)
        .unwrap()
        .gguf()
        .unwrap()
        .path()
        .to_owned();
    const SCRIPT: &str = r#"
import sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
f = r.fields
val = lambda k: f[k].parts[f[k].data[0]][0]
print("experts", val("llama.expert_count"), val("llama.expert_used_count"), val("llama.feed_forward_length"))
for t in r.tensors:
    if t.name.startswith("blk.0.ffn"):
        print(t.name, t.tensor_type.name, list(reversed([int(x) for x in t.shape])))
"#;
    let text = gguf_py(SCRIPT, &[file.to_str().unwrap()]);
    assert!(text.contains("experts 4 4 384"), "{text}");
    assert!(
        text.contains("blk.0.ffn_gate_inp.weight F32 [4, 576]"),
        "{text}"
    );
    assert!(text.contains("blk.0.ffn_gate_exps.weight"), "{text}");
    assert!(text.contains("[4, 576, 384]"), "down: {text}");
    assert!(!text.contains("blk.0.ffn_gate.weight"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    ok(&[
        "model",
        "init",
        "--preset",
        "tiny-llama",
        "--out",
        &dir("llama"),
    ]);
    ok(&[
        "model",
        "init",
        "--preset",
        "tiny-mixtral",
        "--out",
        &dir("mixtral"),
    ]);
    let up = |input: &str, out: &str, e: &str| {
        fails(&[
            "model",
            "upcycle",
            "--in",
            input,
            "--out",
            out,
            "--experts",
            e,
        ])
    };
    let e = up(&dir("mixtral"), &dir("o1"), "4");
    assert!(e.contains("already a mixture of experts"), "{e}");
    let e = up(&dir("llama"), &dir("o2"), "1");
    assert!(e.contains("--experts 1") && e.contains("2 to 1024"), "{e}");
    // tiny-llama's FFN has 160 neurons.
    let e = up(&dir("llama"), &dir("o3"), "3");
    assert!(e.contains("160") && e.contains("divisor"), "{e}");
    let e = up(&dir("missing"), &dir("o4"), "4");
    assert!(e.contains("not found"), "{e}");
    let e = up(&dir("llama"), &dir("mixtral"), "4");
    assert!(e.contains("not an empty directory"), "{e}");
    // Q8_0 blocks are 32 values: 160 / 2 = 80 columns per expert is not whole blocks.
    let q8 = dir("llama-q8.gguf");
    ok(&[
        "model",
        "quantize",
        "--in",
        &dir("llama"),
        "--out",
        &q8,
        "--type",
        "q8_0",
    ]);
    let e = up(&q8, &dir("o5"), "2");
    assert!(
        e.contains("Q8_0") && e.contains("whole blocks") && e.contains("here: 5"),
        "{e}"
    );
    // An expert count that fits works, and the result loads.
    ok(&[
        "model",
        "upcycle",
        "--in",
        &q8,
        "--out",
        &dir("o6"),
        "--experts",
        "5",
    ]);
    Checkpoint::open(Path::new(&dir("o6"))).unwrap();
}
