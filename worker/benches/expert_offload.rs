//! Expert offload on the CPU: batch-1 decode tokens/s and the expert cache's hit rate against
//! the budget (100%, 50%, 25%, 12.5% of the experts' bytes), prefetch on and off; and the
//! time to first token of the first request after loading, cold (the lowest expert ids
//! resident) against warm (the hottest experts of a previous run's statistics resident).
//!
//! The model is the `small-mixtral` preset in bf16 (96 experts of 4.5 MiB) with a skewed
//! router, as real routing is: in layer `l`, router row `e` is scaled by `SKEW^rank` with
//! `SKEW` = 0.8 and `rank = (3e + 5l + 1) mod 8`, so the logits of low-rank experts spread
//! wider and win the top-2 more often, and each layer has its own hot experts (not the lowest
//! ids, which a cold start keeps). The measured share of each rank is printed.
//!
//! `cargo bench --workspace --bench expert_offload` (or `cargo test --workspace --bench
//! expert_offload` for the test profile). The checkpoint is read from the page cache (it was
//! just written): the reads cost a copy, not a disk.

use std::path::Path;
use std::time::Instant;

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::{self, Dtype, OwnedTensor, SafetensorsFile};
use switchyard_model::weights::LayerNames;
use switchyard_model::{Checkpoint, Subset};
use switchyard_scheduler::sampling::argmax;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_worker::offload::Offload;
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const SKEW: f32 = 0.8;
const PROMPT_LEN: usize = 32;
const DECODE_STEPS: usize = 64;

/// Expert `e`'s place in layer `l`'s popularity order (0 the hottest): a permutation.
fn rank(l: usize, e: usize, experts: usize) -> usize {
    (3 * e + 5 * l + 1) % experts
}

/// Rewrites `dir/model.safetensors` with router row `e` of layer `l` scaled by
/// `SKEW^rank(l, e)`.
fn skew_routers(dir: &Path) {
    let path = dir.join("model.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let c = ckpt.config().clone();
    let experts = c.moe.unwrap().num_experts;
    let routers: Vec<String> = (0..c.num_layers)
        .map(|l| LayerNames::new(l).router())
        .collect();
    assert_eq!(experts, 8, "rank() is a permutation of 8 experts");
    let tensors: Vec<OwnedTensor> = file
        .tensors()
        .iter()
        .map(|(name, info)| {
            let mut data = file.bytes(info).to_vec();
            if let Some(l) = routers.iter().position(|r| r == name) {
                let mut w = ckpt.read_f32(name, &[experts, c.hidden_size]).unwrap();
                for (e, row) in w.chunks_mut(c.hidden_size).enumerate() {
                    let scale = SKEW.powi(rank(l, e, experts) as i32);
                    row.iter_mut().for_each(|v| *v *= scale);
                }
                data = safetensors::from_f32(Dtype::BF16, &w);
            }
            OwnedTensor {
                name: name.clone(),
                dtype: info.float_dtype().unwrap(),
                shape: info.shape.clone(),
                data,
            }
        })
        .collect();
    drop((file, ckpt));
    safetensors::write(&path, &tensors.iter().collect::<Vec<_>>()).unwrap();
}

fn engine(dir: &Path, offload: Option<Offload>) -> Engine<CpuBackend> {
    let config = EngineConfig {
        kv_cache_bytes: 64 << 20,
        offload,
        ..EngineConfig::default()
    };
    Engine::load(CpuBackend::default(), dir, config).unwrap()
}

fn prompt(vocab: usize, salt: u32) -> Vec<u32> {
    (0..PROMPT_LEN as u32)
        .map(|i| (i * 7919 + salt * 104729) % (vocab as u32 - 3) + 3)
        .collect()
}

/// Decode-time expert cache figures: hit rate, and the share of misses a prefetch had read or
/// started.
struct Cache {
    hit_rate: f64,
    prefetched: f64,
}

/// (time to first token in seconds, decode tokens/s at batch 1, the cache during decode).
fn run(e: &mut Engine<CpuBackend>, vocab: usize, salt: u32) -> (f64, f64, Option<Cache>) {
    let p = prompt(vocab, salt);
    let t = Instant::now();
    let logits = e
        .step_chunks(&[(0, p.as_slice(), 0, LogitsWanted::Last)])
        .unwrap();
    let ttft = t.elapsed().as_secs_f64();
    let counts = |e: &Engine<CpuBackend>| {
        e.model().expert_store().map(|s| {
            let m = s.metrics();
            (m.hits.get(), m.misses.get(), m.prefetch_useful.get())
        })
    };
    let before = counts(e);
    let mut next = [argmax(&logits[0])];
    let t = Instant::now();
    for step in 0..DECODE_STEPS {
        let logits = e
            .step_chunks(&[(0, next.as_slice(), PROMPT_LEN + step, LogitsWanted::Last)])
            .unwrap();
        next = [argmax(&logits[0])];
    }
    let decode = DECODE_STEPS as f64 / t.elapsed().as_secs_f64();
    e.release(0);
    let cache = match (before, counts(e)) {
        (Some((h0, m0, p0)), Some((h1, m1, p1))) => Some(Cache {
            hit_rate: (h1 - h0) as f64 / ((h1 - h0) + (m1 - m0)) as f64,
            prefetched: (p1 - p0) as f64 / (m1 - m0).max(1) as f64,
        }),
        _ => None,
    };
    (ttft, decode, cache)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let config = preset("small-mixtral").unwrap();
    write_model_dir(dir.path(), &config, 7, Dtype::BF16, None).unwrap();
    skew_routers(dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let all = Subset::all(ckpt.config());
    let total = ckpt.subset_bytes(&all, |t| t).unwrap();
    let rest = ckpt
        .subset_bytes(
            &Subset {
                experts: Some(Default::default()),
                ..all
            },
            |t| t,
        )
        .unwrap();
    let experts = total - rest;
    drop(ckpt);
    let vocab = config.vocab_size;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "small-mixtral bf16, router row e of layer l scaled by {SKEW}^((3e + 5l + 1) mod 8): \
         experts {:.0} MiB, other weights {:.0} MiB",
        mib(experts),
        mib(rest)
    );

    // The routing share of each popularity rank, from one all-resident run's statistics.
    let stats = dir.path().join("expert-stats.json");
    {
        let mut e = engine(
            dir.path(),
            Some(Offload {
                budget_bytes: experts,
                prefetch: false,
                stats_file: Some(stats.clone()),
            }),
        );
        run(&mut e, vocab, 0);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let mut share = vec![0.0; config.moe.unwrap().num_experts];
    let n = share.len();
    for (l, layer) in json["layers"].as_array().unwrap().iter().enumerate() {
        for (e, s) in layer["scores"].as_array().unwrap().iter().enumerate() {
            share[rank(l, e, n)] += s.as_f64().unwrap();
        }
    }
    let sum: f64 = share.iter().sum();
    println!(
        "routing share by rank, hottest first (all layers): {}",
        share
            .iter()
            .map(|s| format!("{:.1}%", 100.0 * s / sum))
            .collect::<Vec<_>>()
            .join(" ")
    );

    println!();
    println!("| budget | prefetch | decode tok/s | hit rate | misses a prefetch had read |");
    println!("| --- | --- | --- | --- | --- |");
    let (_, base, _) = run(&mut engine(dir.path(), None), vocab, 1);
    println!("| all resident (no --expert-memory) | – | {base:.1} | – | – |");
    for (label, num, den) in [
        ("100%", 1, 1),
        ("50%", 1, 2),
        ("25%", 1, 4),
        ("12.5%", 1, 8),
    ] {
        for prefetch in [true, false] {
            let o = Offload {
                budget_bytes: experts * num / den,
                prefetch,
                stats_file: None,
            };
            let mut e = engine(dir.path(), Some(o));
            // The first request fills the cache; the second is measured.
            run(&mut e, vocab, 2);
            let (_, tps, cache) = run(&mut e, vocab, 1);
            let cache = cache.unwrap();
            println!(
                "| {label} ({:.0} MiB) | {} | {tps:.1} | {:.1}% | {:.1}% |",
                mib(experts * num / den),
                if prefetch { "on" } else { "off" },
                100.0 * cache.hit_rate,
                100.0 * cache.prefetched
            );
        }
    }

    println!();
    println!("| 25% budget, first request after load | resident at load | TTFT ({PROMPT_LEN}-token prompt) | decode tok/s | hit rate |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, stats_file) in [("cold", None), ("warm", Some(stats.clone()))] {
        let o = Offload {
            budget_bytes: experts / 4,
            prefetch: true,
            stats_file,
        };
        let mut e = engine(dir.path(), Some(o));
        let (ttft, tps, cache) = run(&mut e, vocab, 1);
        println!(
            "| {label} | {} | {:.0} ms | {tps:.1} | {:.1}% |",
            if label == "cold" {
                "lowest expert ids, same count per layer"
            } else {
                "hottest by the statistics file"
            },
            1000.0 * ttft,
            100.0 * cache.unwrap().hit_rate
        );
    }
}
