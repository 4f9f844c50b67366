//! Prefill and decode throughput of our CPU backend against candle-transformers' Mixtral on the
//! same `small-mixtral` weights (f32), measured in one run on this machine.
//!
//! `cargo bench -p switchyard-worker --bench cpu_vs_candle` (env `BENCH_REPEATS`, default 3;
//! `BENCH_MODEL=DIR` reuses a model directory instead of writing a fresh one).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral;
use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const PROMPT_LEN: usize = 128;
const DECODE_STEPS: usize = 16;

fn prompt(seq: usize) -> Vec<u32> {
    (0..PROMPT_LEN as u32)
        .map(|i| (i * 7919 + seq as u32 * 104_729) % 31_000 + 3)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (prefill tokens/s, decode tokens/s) for `batch` sequences.
fn ours(engine: &mut Engine<CpuBackend>, batch: usize) -> (f64, f64) {
    let prompts: Vec<Vec<u32>> = (0..batch).map(prompt).collect();
    let t = Instant::now();
    let chunks: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(s, p)| (s as u64, p.as_slice(), 0, LogitsWanted::Last))
        .collect();
    let logits = engine.step_chunks(&chunks).unwrap();
    let prefill = (batch * PROMPT_LEN) as f64 / t.elapsed().as_secs_f64();
    let mut next: Vec<[u32; 1]> = logits
        .iter()
        .map(|l| [switchyard_scheduler::sampling::argmax(l)])
        .collect();
    let t = Instant::now();
    for step in 0..DECODE_STEPS {
        let chunks: Vec<_> = next
            .iter()
            .enumerate()
            .map(|(s, tok)| {
                (
                    s as u64,
                    tok.as_slice(),
                    PROMPT_LEN + step,
                    LogitsWanted::Last,
                )
            })
            .collect();
        let logits = engine.step_chunks(&chunks).unwrap();
        next = logits
            .iter()
            .map(|l| [switchyard_scheduler::sampling::argmax(l)])
            .collect();
    }
    let decode = (batch * DECODE_STEPS) as f64 / t.elapsed().as_secs_f64();
    for s in 0..batch {
        engine.release(s as u64);
    }
    (prefill, decode)
}

fn candle(cfg: &mixtral::Config, vb: &VarBuilder, batch: usize) -> (f64, f64) {
    let mut model = mixtral::Model::new(cfg, vb.clone()).unwrap();
    let ids: Vec<u32> = (0..batch).flat_map(prompt).collect();
    let input = Tensor::from_vec(ids, (batch, PROMPT_LEN), &Device::Cpu).unwrap();
    let t = Instant::now();
    let logits = model.forward(&input, 0).unwrap();
    let prefill = (batch * PROMPT_LEN) as f64 / t.elapsed().as_secs_f64();
    let mut next = logits.squeeze(1).unwrap().argmax(1).unwrap();
    let t = Instant::now();
    for step in 0..DECODE_STEPS {
        let logits = model
            .forward(&next.unsqueeze(1).unwrap(), PROMPT_LEN + step)
            .unwrap();
        next = logits.squeeze(1).unwrap().argmax(1).unwrap();
    }
    let decode = (batch * DECODE_STEPS) as f64 / t.elapsed().as_secs_f64();
    (prefill, decode)
}

fn main() {
    let repeats: usize = std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var("BENCH_MODEL") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => {
            let config = preset("small-mixtral").unwrap();
            write_model_dir(tmp.path(), &config, 0, Dtype::F32, None).unwrap();
            tmp.path().to_path_buf()
        }
    };
    let config = switchyard_model::ModelConfig::load(&dir).unwrap();
    let p = config.param_counts();
    println!(
        "small-mixtral: {:.0}M parameters, {:.0}M active per token, f32; {} threads",
        p.total as f64 / 1e6,
        p.active_per_token as f64 / 1e6,
        rayon::current_num_threads()
    );

    let engine_config = EngineConfig {
        max_step_tokens: 16 * PROMPT_LEN,
        ..EngineConfig::default()
    };
    let mut engine = Engine::load(CpuBackend::default(), &dir, engine_config).unwrap();
    let mut candle_json = config.to_hf_json();
    candle_json["sliding_window"] = 4096.into();
    candle_json["use_flash_attn"] = false.into();
    let candle_cfg: mixtral::Config = serde_json::from_value(candle_json).unwrap();
    let weights = dir.join("model.safetensors");
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu).unwrap()
    };

    println!("| batch | phase | switchyard tok/s | candle tok/s | ratio |");
    println!("|---|---|---|---|---|");
    for batch in [1, 16] {
        let (mut ours_runs, mut candle_runs) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            ours_runs.push(ours(&mut engine, batch));
            candle_runs.push(candle(&candle_cfg, &vb, batch));
        }
        for (phase, pick) in [("prefill", 0), ("decode", 1)] {
            let get = |runs: &[(f64, f64)]| {
                median(
                    runs.iter()
                        .map(|r| if pick == 0 { r.0 } else { r.1 })
                        .collect(),
                )
            };
            let (o, c) = (get(&ours_runs), get(&candle_runs));
            println!("| {batch} | {phase} | {o:.1} | {c:.1} | {:.2}× |", o / c);
        }
    }
}
