//! A sequence's logits do not depend on its company: alone, batched with prefill chunks and
//! decode tokens of other sequences, or prefilled in chunks, they agree within 1e-5. And the
//! engine's continuous batching, including preemption when the KV cache runs out, gives every
//! request the output it gets alone.

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_scheduler::{Request, SamplingParams};
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

fn model_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &preset(name).unwrap(), 3, Dtype::F32, None).unwrap();
    dir
}

fn engine(
    dir: &std::path::Path,
    kv_cache_bytes: usize,
    max_step_tokens: usize,
) -> Engine<CpuBackend> {
    let config = EngineConfig {
        block_size: 4,
        kv_cache_bytes,
        max_step_tokens,
        ..EngineConfig::default()
    };
    Engine::load(CpuBackend::default(), dir, config).unwrap()
}

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 500 + 3)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_are_the_same_alone_batched_and_chunked() {
    for name in ["tiny-mixtral", "tiny-mistral"] {
        let dir = model_dir(name);
        let a = ids(30, 1);

        // A alone: one prefill of 30 tokens, every position's logits.
        let mut e = engine(dir.path(), 1 << 20, 512);
        let alone = e
            .step_chunks(&[(1, &a, 0, LogitsWanted::All)])
            .unwrap()
            .remove(0);

        // A in chunks of 7, sharing each step with B's prefill chunks and C's decode tokens.
        let mut e = engine(dir.path(), 1 << 20, 512);
        let (b, c) = (ids(40, 2), ids(12, 3));
        e.step_chunks(&[(3, &c[..11], 0, LogitsWanted::Last)])
            .unwrap();
        let mut batched = Vec::new();
        let (mut pos, mut b_pos, mut c_pos) = (0, 0, 11);
        while pos < a.len() {
            let len = 7.min(a.len() - pos);
            let b_len = 9.min(b.len() - b_pos);
            let c_tok = [c[c_pos % c.len()]];
            let out = e
                .step_chunks(&[
                    (2, &b[b_pos..b_pos + b_len], b_pos, LogitsWanted::All),
                    (1, &a[pos..pos + len], pos, LogitsWanted::All),
                    (3, &c_tok, c_pos, LogitsWanted::Last),
                ])
                .unwrap();
            batched.extend_from_slice(&out[1]);
            pos += len;
            b_pos = (b_pos + b_len) % b.len();
            if b_pos == 0 {
                e.release(2);
            }
            c_pos += 1;
        }
        let d = max_diff(&alone, &batched);
        println!("{name}: alone vs batched + chunked, max |Δlogit| = {d:e}");
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

fn request(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        id,
        prompt,
        params: SamplingParams {
            max_tokens,
            ignore_eos: true,
            logprobs: Some(2),
            ..SamplingParams::default()
        },
    }
}

#[test]
fn continuous_batching_and_preemption_keep_outputs() {
    let dir = model_dir("tiny-mixtral");
    let requests: Vec<Request> = (0..6)
        .map(|i| request(i, ids(5 + 9 * i as usize, i as u32), 12 + i as usize))
        .collect();
    let alone: Vec<_> = requests
        .iter()
        .map(|r| {
            engine(dir.path(), 1 << 20, 512)
                .run(vec![r.clone()])
                .unwrap()
                .remove(0)
        })
        .collect();

    // Plenty of room, small steps: prefill is chunked and mixed with decodes.
    let batched = engine(dir.path(), 1 << 20, 16)
        .run(requests.clone())
        .unwrap();
    // A cache too small for all six at once: sequences are preempted and recomputed.
    // (2 layers × 2 KV heads × 16 dims × 2 (K, V) × 4 bytes × 4 tokens = 2 KiB per block, so
    // 24 blocks: the largest request needs 17, all six together 63.)
    let mut tight = engine(dir.path(), 48 << 10, 16);
    let squeezed = tight.run(requests).unwrap();
    assert!(tight.num_preemptions() > 0, "the tight cache must preempt");
    assert_eq!(
        tight.blocks().num_free(),
        tight.blocks().num_blocks(),
        "every block is returned"
    );

    for (i, a) in alone.iter().enumerate() {
        assert_eq!(
            a.token_ids, batched[i].token_ids,
            "request {i}: batched output differs"
        );
        assert_eq!(
            a.token_ids, squeezed[i].token_ids,
            "request {i}: output differs after preemption"
        );
        assert_eq!(a.token_ids.len(), 12 + i);
        for (x, y) in a
            .logprobs
            .as_ref()
            .unwrap()
            .iter()
            .zip(squeezed[i].logprobs.as_ref().unwrap())
        {
            assert!((x.logprob - y.logprob).abs() <= 1e-5);
        }
    }
}

#[test]
fn prompt_logprobs_cover_every_prompt_token_across_chunks() {
    let dir = model_dir("tiny-mistral");
    let prompt = ids(23, 5);
    let mut e = engine(dir.path(), 1 << 20, 6);
    let whole = e
        .step_chunks(&[(9, &prompt, 0, LogitsWanted::All)])
        .unwrap()
        .remove(0);
    let mut r = request(1, prompt.clone(), 0);
    r.params.prompt_logprobs = Some(3);
    let out = e.run(vec![r]).unwrap().remove(0);
    let lps = out.prompt_logprobs.unwrap();
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_none());
    assert!(out.token_ids.is_empty(), "max_tokens 0 generates nothing");
    for (i, lp) in lps.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.token_id, prompt[i]);
        let row = switchyard_scheduler::sampling::log_softmax(&whole[(i - 1) * 512..i * 512]);
        assert!((lp.logprob - row[prompt[i] as usize]).abs() < 1e-5);
        assert_eq!(lp.top.len(), 3);
    }
}
