//! Any bytes as a `Worker` message (the first byte picks which: assignment, step, exchange)
//! against a tiny-mixtral part: the checks refuse it, or what the worker then does with it
//! (embedding ids, KV blocks of every position, sampling rows) stays in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use switchyard_model::init::preset;
use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_scheduler::step::{sample_step, LogitsWanted};
use switchyard_worker::checks::{check_assignment, check_expert_batch, check_step, PartLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, message)) = data.split_first() else {
        return;
    };
    let config = preset("tiny-mixtral").expect("a preset");
    let part = pb::Assignment {
        layer_end: 2,
        experts: (0..4).collect(),
        embedding: true,
        head: true,
        kv_blocks: 8,
        block_size: 4,
        ..Default::default()
    };
    let limits = PartLimits::new(&config, &part);
    match kind % 3 {
        0 => {
            let Ok(a) = pb::Assignment::decode(message) else {
                return;
            };
            if check_assignment(&a, &config, 4).is_ok() {
                let l = PartLimits::new(&config, &a);
                assert!(l.block_size >= 1 && l.kv_blocks >= 1);
                let _ = l.max_message_bytes();
            }
        }
        1 => {
            let Ok(r) = pb::StepRequest::decode(message) else {
                return;
            };
            if check_step(&r, &limits).is_err() {
                return;
            }
            let work: Vec<_> = r
                .seqs
                .iter()
                .map(|s| wire::from_seq_work(s).expect("checked"))
                .collect();
            for w in &work {
                let s = &w.input;
                assert!(s.tokens.iter().all(|t| (*t as usize) < config.vocab_size));
                for pos in 0..s.start_pos + s.tokens.len() {
                    let block = s.block_table[pos / limits.block_size];
                    assert!((block as usize) < limits.kv_blocks);
                }
            }
            let vocab = config.vocab_size;
            let logits: Vec<Vec<f32>> = work
                .iter()
                .map(|w| match w.input.logits {
                    LogitsWanted::None => vec![],
                    LogitsWanted::Last => vec![0.5; vocab],
                    LogitsWanted::All => vec![0.5; vocab * w.input.tokens.len()],
                })
                .collect();
            let _ = sample_step(&work, &logits, vocab);
        }
        _ => {
            let Ok(b) = pb::ExpertBatch::decode(message) else {
                return;
            };
            if check_expert_batch(&b, &limits).is_ok() {
                let x = b.x.as_ref().expect("checked");
                wire::from_tensor(x).expect("checked");
            }
        }
    }
});
