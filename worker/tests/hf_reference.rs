//! Our CPU forward pass against Hugging Face transformers, through fixtures it wrote itself
//! (`fixtures/hf/make.sh`): transformers-5 `config.json` files, sliding windows exercised over
//! 5× the window, `head_dim` ≠ hidden/heads, tied embeddings, bf16 and f16 checkpoints.

use std::path::{Path, PathBuf};

use switchyard_scheduler::step::LogitsWanted;
use switchyard_scheduler::{Completion, Request, SamplingParams};
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const FIXTURES: [&str; 4] = [
    "mistral-window",
    "mixtral-window",
    "llama-headdim-tied-bf16",
    "mistral-gqa-f16",
];
const TOLERANCE: f32 = 1e-4;

struct Reference {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    /// (logprob of the chosen token, top-5 ids) per generated token.
    gen_logprobs: Vec<(f32, Vec<u32>)>,
}

fn fixture(name: &str) -> (PathBuf, Reference) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let logits = json["logits"]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let gen = &json["generate"];
    let gen_logprobs = gen["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let top = t["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["token_id"].as_u64().unwrap() as u32)
                .collect();
            (t["logprob"].as_f64().unwrap() as f32, top)
        })
        .collect();
    let reference = Reference {
        ids: ids(&json["logits"]["ids"]),
        logits,
        prompt_ids: ids(&gen["prompt_ids"]),
        generated: ids(&gen["token_ids"]),
        gen_logprobs,
    };
    (dir, reference)
}

fn engine(dir: &Path) -> Engine<CpuBackend> {
    // Blocks of 4 tokens with a window of 8: blocks slide out of the window and are reused.
    let config = EngineConfig {
        block_size: 4,
        kv_cache_bytes: 1 << 20,
        ..EngineConfig::default()
    };
    Engine::load(CpuBackend::default(), dir, config).unwrap()
}

fn max_diff(ours: &[f32], theirs: &[Vec<f32>]) -> f32 {
    let theirs: Vec<f32> = theirs.concat();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn full_sequence_logits_match_transformers() {
    for name in FIXTURES {
        let (dir, r) = fixture(name);
        let mut e = engine(&dir);
        let whole = e
            .step_chunks(&[(1, &r.ids, 0, LogitsWanted::All)])
            .unwrap()
            .remove(0);
        let d = max_diff(&whole, &r.logits);
        println!(
            "{name}: prefill of {} tokens, max |Δlogit| = {d:e}",
            r.ids.len()
        );
        assert!(d <= TOLERANCE, "{name}: prefill max |Δlogit| {d}");
    }
}

#[test]
fn chunked_prefill_and_decode_match_transformers() {
    for name in FIXTURES {
        let (dir, r) = fixture(name);
        let window = switchyard_model::ModelConfig::load(&dir)
            .unwrap()
            .sliding_window;
        let mut e = engine(&dir);
        // Chunks of 5, then one token at a time: the decode path over a sliding window.
        let mut logits = Vec::new();
        let mut pos = 0;
        while pos < r.ids.len() {
            let len = if pos < 15 { 5 } else { 1 };
            let chunk = &r.ids[pos..pos + len];
            logits.extend(
                e.step_chunks(&[(7, chunk, pos, LogitsWanted::All)])
                    .unwrap()
                    .remove(0),
            );
            pos += len;
            if let Some(w) = window {
                // Memory stays bounded: the window plus at most one partial block each side.
                let bound = (w + len).div_ceil(4) + 1;
                assert!(
                    e.blocks().held(7) <= bound,
                    "{name}: {} blocks held at {pos}",
                    e.blocks().held(7)
                );
            }
        }
        let d = max_diff(&logits, &r.logits);
        println!("{name}: chunked + decode, max |Δlogit| = {d:e}");
        assert!(d <= TOLERANCE, "{name}: chunked/decode max |Δlogit| {d}");
    }
}

/// Greedy decoding of the reference's prompt, with top-5 logprobs.
fn greedy(e: &mut Engine<CpuBackend>, r: &Reference) -> Completion {
    let params = SamplingParams {
        max_tokens: r.generated.len(),
        logprobs: Some(5),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    e.run(vec![Request {
        id: 3,
        prompt: r.prompt_ids.clone(),
        params,
    }])
    .unwrap()
    .remove(0)
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in FIXTURES {
        let (dir, r) = fixture(name);
        let mut e = engine(&dir);
        let out = greedy(&mut e, &r);
        assert_eq!(
            out.token_ids, r.generated,
            "{name}: greedy tokens differ from transformers"
        );
        let logprobs = out.logprobs.unwrap();
        let mut worst = 0.0f32;
        for (ours, (lp, top)) in logprobs.iter().zip(&r.gen_logprobs) {
            worst = worst.max((ours.logprob - lp).abs());
            let ours_top: Vec<u32> = ours.top.iter().map(|t| t.token_id).collect();
            assert_eq!(&ours_top, top, "{name}: top-5 alternatives differ");
        }
        println!(
            "{name}: {} greedy tokens equal, max |Δlogprob| = {worst:e}",
            r.generated.len()
        );
        assert!(worst <= TOLERANCE, "{name}: logprob differs by {worst}");
    }
}

/// `model upcycle` of each dense fixture (4 experts, a zero router, every expert used) still
/// computes what transformers computes for the dense model: the same full-sequence logits and
/// greedy tokens within the same tolerance, now through the MoE path (routing, expert FFNs and
/// their weighted combine) on every token.
#[test]
fn upcycled_dense_fixtures_match_the_dense_transformers_model() {
    for name in [
        "mistral-window",
        "llama-headdim-tied-bf16",
        "mistral-gqa-f16",
    ] {
        let (dense, r) = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("moe");
        switchyard_model::upcycle::upcycle(&dense, &dir, 4).unwrap();
        let config = switchyard_model::ModelConfig::load(&dir).unwrap();
        assert_eq!(config.arch, switchyard_model::Arch::Mixtral, "{name}");
        assert_eq!(config.moe.map(|m| (m.num_experts, m.top_k)), Some((4, 4)));

        let mut e = engine(&dir);
        let whole = e
            .step_chunks(&[(1, &r.ids, 0, LogitsWanted::All)])
            .unwrap()
            .remove(0);
        let d = max_diff(&whole, &r.logits);
        println!("{name} upcycled to 4 experts: max |Δlogit| = {d:e} against the dense model");
        assert!(d <= TOLERANCE, "{name} upcycled: max |Δlogit| {d}");

        let out = greedy(&mut e, &r);
        assert_eq!(out.token_ids, r.generated, "{name} upcycled: greedy tokens");
    }
}
