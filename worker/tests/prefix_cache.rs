//! The prefix cache changes what is computed, never what comes out: the same prompt twice, and
//! prompts sharing a system prompt, give the same tokens, and logprobs within f32 rounding,
//! with it on as with it off, through the one-process engine; and the hits really happened. The sliding-window model
//! (tiny-mistral, window 16) is run with prompts longer than its window.

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_scheduler::{Completion, Request, SamplingParams};
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const BLOCK: usize = 4;

fn engine(dir: &std::path::Path, prefix_caching: bool) -> Engine<CpuBackend> {
    let config = EngineConfig {
        block_size: BLOCK,
        kv_cache_bytes: 1 << 20,
        max_step_tokens: 64,
        prefix_caching,
        ..EngineConfig::default()
    };
    Engine::load(CpuBackend::default(), dir, config).unwrap()
}

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 500 + 3)
        .collect()
}

fn request(id: u64, prompt: Vec<u32>) -> Request {
    Request {
        id,
        prompt,
        params: SamplingParams {
            max_tokens: 10,
            ignore_eos: true,
            logprobs: Some(3),
            ..SamplingParams::default()
        },
    }
}

/// Tokens equal; the largest difference between their logprobs (drawn and top).
fn gap(what: &str, on: &Completion, off: &Completion) -> f32 {
    assert_eq!(on.token_ids, off.token_ids, "{what}: tokens differ");
    let (on_lp, off_lp) = (
        on.logprobs.as_ref().unwrap(),
        off.logprobs.as_ref().unwrap(),
    );
    assert_eq!(on_lp.len(), off_lp.len());
    let mut worst = 0.0f32;
    for (a, b) in on_lp.iter().zip(off_lp) {
        worst = worst.max((a.logprob - b.logprob).abs());
        for (x, y) in a.top.iter().zip(&b.top) {
            assert_eq!(x.token_id, y.token_id, "{what}: top tokens differ");
            worst = worst.max((x.logprob - y.logprob).abs());
        }
    }
    worst
}

#[test]
fn cached_prefixes_give_the_same_outputs() {
    for name in ["tiny-mixtral", "tiny-mistral"] {
        let dir = tempfile::tempdir().unwrap();
        write_model_dir(dir.path(), &preset(name).unwrap(), 3, Dtype::F32, None).unwrap();
        // A system prompt of 6½ blocks, two questions after it, and the first one again.
        let system = ids(26, 1);
        let prompts: Vec<Vec<u32>> = [ids(9, 2), ids(14, 3), ids(9, 2)]
            .into_iter()
            .map(|q| [system.clone(), q].concat())
            .collect();

        let mut on = engine(dir.path(), true);
        let mut off = engine(dir.path(), false);
        let mut cached = Vec::new();
        let mut worst = 0.0f32;
        for (i, p) in prompts.iter().enumerate() {
            let r = request(i as u64, p.clone());
            let a = on.run(vec![r.clone()]).unwrap().remove(0);
            let b = off.run(vec![r]).unwrap().remove(0);
            worst = worst.max(gap(&format!("{name}, prompt {i}"), &a, &b));
            assert_eq!(b.usage.cached_tokens, 0);
            cached.push(a.usage.cached_tokens);
        }
        // Nothing cached at first; then the system prompt's 6 full blocks; then the whole
        // repeated prompt (35 tokens) but its last token: 8 full blocks.
        assert_eq!(cached, [0, 24, 32], "{name}");
        let total: usize = prompts.iter().map(Vec::len).sum();
        assert_eq!(on.prefix_cache_counts(), (total as u64, 56));
        assert_eq!(off.prefix_cache_counts(), (0, 0));

        // Batched: both questions again at once, and a new one sharing the system prompt,
        // with the generated tokens of earlier runs cached too.
        let batch: Vec<Request> = [prompts[0].clone(), prompts[1].clone(), {
            [system.clone(), ids(5, 4)].concat()
        }]
        .into_iter()
        .enumerate()
        .map(|(i, p)| request(10 + i as u64, p))
        .collect();
        let a = on.run(batch.clone()).unwrap();
        let b = off.run(batch).unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            worst = worst.max(gap(&format!("{name}, batched {i}"), x, y));
        }
        assert_eq!(
            a.iter().map(|c| c.usage.cached_tokens).collect::<Vec<_>>(),
            [32, 36, 24]
        );
        assert_eq!(on.blocks().num_free(), on.blocks().num_blocks());
        // A hit changes where prefill chunks start, and f32 rounding with them: the same
        // few-ulp differences as chunked prefill (`batching.rs`). Measured: 9.5e-7 for
        // tiny-mixtral, 1.2e-6 for tiny-mistral (a top logprob of -3.85).
        println!("{name}: cache on vs off, max |Δlogprob| = {worst:e}");
        assert!(worst <= 1e-5, "{name}: logprobs differ by {worst}");
    }
}
