//! Real model files on the CPU backend, in the types they are stored in: resident memory after
//! loading against the file's tensor bytes, prefill of 512 tokens and batch-1 decode, for each
//! way the backend can run them (weights as stored with f32 or 8-bit activations, or widened
//! to f32).
//!
//! `cargo bench -p switchyard-worker --bench model_files` measures the `small-mixtral` preset
//! written as f32 and as bf16 safetensors, SmolLM2-135M-Instruct Q4_1 when `SWITCHYARD_SMOLLM2`
//! is set (`source scripts/smollm2.sh`), and any further files listed in `BENCH_MODELS`
//! (comma-separated paths, e.g. GGUFs made by `switchyard model quantize`). `BENCH_REPEATS`
//! (default 3) runs per figure; medians are printed.
//!
//! `small-mixtral` also goes through `model quantize` into Q8_0 and Q4_K_M GGUFs. With
//! `SWITCHYARD_LLAMA_PYTHON` set (`source scripts/llama-cpp-env.sh`), each model is also run by
//! llama.cpp on the same weights as GGUF (the safetensors ones converted by `model quantize` to
//! f32 and bf16 GGUF), with as many threads, as a row of its own: the side-by-side figure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::quantize::{quantize, Scheme};
use switchyard_model::safetensors::Dtype;
use switchyard_model::{Checkpoint, WeightType};
use switchyard_scheduler::sampling::argmax;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const PROMPT_LEN: usize = 512;
const DECODE_STEPS: usize = 32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// This process's resident bytes (`VmRSS`).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// (prefill tokens/s over `PROMPT_LEN` tokens, decode tokens/s at batch 1).
fn run(engine: &mut Engine<CpuBackend>, vocab: usize) -> (f64, f64) {
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32)
        .map(|i| (i * 7919) % (vocab as u32 - 3) + 3)
        .collect();
    let t = Instant::now();
    let logits = engine
        .step_chunks(&[(0, prompt.as_slice(), 0, LogitsWanted::Last)])
        .unwrap();
    let prefill = PROMPT_LEN as f64 / t.elapsed().as_secs_f64();
    let mut next = [argmax(&logits[0])];
    let t = Instant::now();
    for step in 0..DECODE_STEPS {
        let logits = engine
            .step_chunks(&[(0, next.as_slice(), PROMPT_LEN + step, LogitsWanted::Last)])
            .unwrap();
        next = [argmax(&logits[0])];
    }
    let decode = DECODE_STEPS as f64 / t.elapsed().as_secs_f64();
    engine.release(0);
    (prefill, decode)
}

fn main() {
    if let Ok(how) = std::env::var(CHILD) {
        return child(how.parse().unwrap());
    }
    let repeats: usize = std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let llama = std::env::var("SWITCHYARD_LLAMA_PYTHON").ok();
    let tmp = tempfile::tempdir().unwrap();
    // (name, what we load, the GGUF llama.cpp runs).
    let mut models: Vec<(String, PathBuf, Option<PathBuf>)> = Vec::new();
    // llama.cpp loads no GGUF without a vocabulary: small-mixtral's 32000 tokens get Mistral's.
    let mistral = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/mistral-v1-tokenizer/tokenizer.json");
    let gguf = |dir: &Path, scheme: Scheme, name: &str| {
        let out = tmp.path().join(format!("{}.gguf", name.replace(' ', "-")));
        quantize(dir, &out, scheme, true).unwrap();
        out
    };
    let f32_dir = tmp.path().join("small-mixtral-F32");
    for dtype in [Dtype::F32, Dtype::BF16] {
        let dir = tmp.path().join(format!("small-mixtral-{}", dtype.name()));
        write_model_dir(&dir, &preset("small-mixtral").unwrap(), 0, dtype, None).unwrap();
        std::fs::copy(&mistral, dir.join("tokenizer.json")).unwrap();
        let name = format!("small-mixtral {}", dtype.name());
        // The same weights as a GGUF only for llama.cpp to run.
        let file = llama
            .is_some()
            .then(|| gguf(&dir, Scheme::Plain(dtype.into()), &name));
        models.push((name, dir, file));
    }
    for (label, scheme) in [
        ("Q8_0", Scheme::Plain(WeightType::Q8_0)),
        ("Q4_K_M", Scheme::Q4KM),
    ] {
        let name = format!("small-mixtral {label}");
        let file = gguf(&f32_dir, scheme, &name);
        models.push((name, file.clone(), Some(file)));
    }
    if let Ok(p) = std::env::var("SWITCHYARD_SMOLLM2") {
        models.push(("SmolLM2-135M Q4_1".into(), p.clone().into(), Some(p.into())));
    }
    for p in std::env::var("BENCH_MODELS").unwrap_or_default().split(',') {
        if !p.is_empty() {
            let name = Path::new(p).file_name().unwrap().to_string_lossy().into();
            let gguf = p.ends_with(".gguf").then(|| PathBuf::from(p));
            models.push((name, p.into(), gguf));
        }
    }
    println!("{} threads", rayon::current_num_threads());
    println!("| model | weights kept as | file tensor MB | RSS after load MB | RSS / file | prefill {PROMPT_LEN} tok/s | decode tok/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, path, gguf) in &models {
        if let (Some(python), Some(gguf)) = (&llama, gguf) {
            llama_cpp_row(python, name, gguf, repeats);
        }
        for how in 0..BACKENDS.len() {
            // Each in a process of its own, so that resident memory is this load's alone.
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env(CHILD, format!("{how}"))
                .env("BENCH_NAME", name)
                .env("BENCH_PATH", path)
                .env("BENCH_REPEATS", repeats.to_string())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}

/// llama.cpp (llama-cpp-python) on `gguf` with this process's thread count: a table row.
fn llama_cpp_row(python: &str, name: &str, gguf: &Path, repeats: usize) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama_cpp_reference.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(["bench", "--model"])
        .arg(gguf)
        .args(["--prompt", &PROMPT_LEN.to_string()])
        .args(["--decode", &DECODE_STEPS.to_string()])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .args(["--repeats", &repeats.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama.cpp on {}: {}",
        gguf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file_bytes: usize = Checkpoint::open(gguf)
        .unwrap()
        .bytes_by_dtype()
        .values()
        .sum();
    let rss = r["rss_bytes"].as_f64().unwrap();
    println!(
        "| {name} | llama.cpp 0.3.36 (GGUF) | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |",
        file_bytes as f64 / 1e6,
        rss / 1e6,
        rss / file_bytes as f64,
        r["prefill_tps"].as_f64().unwrap(),
        r["decode_tps"].as_f64().unwrap(),
    );
}

const CHILD: &str = "BENCH_MODEL_FILES_BACKEND";

const BACKENDS: [&str; 3] = [
    "stored, f32 activations",
    "stored, 8-bit activations",
    "widened to f32",
];

/// One model on one backend: a table row.
fn child(how: usize) {
    let name = std::env::var("BENCH_NAME").unwrap();
    let path = PathBuf::from(std::env::var("BENCH_PATH").unwrap());
    let repeats: usize = std::env::var("BENCH_REPEATS").unwrap().parse().unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let file_bytes: usize = checkpoint.bytes_by_dtype().values().sum();
    let vocab = checkpoint.config().vocab_size;
    drop(checkpoint);
    let backend = match how {
        0 => CpuBackend::default(),
        1 => CpuBackend::default().q8_activations(),
        _ => CpuBackend::exact_f32(),
    };
    let config = EngineConfig {
        max_step_tokens: PROMPT_LEN,
        kv_cache_bytes: 256 << 20,
        ..EngineConfig::default()
    };
    let before = rss();
    let mut engine = Engine::load(backend, &path, config).unwrap();
    let loaded = rss().saturating_sub(before);
    let runs: Vec<(f64, f64)> = (0..repeats).map(|_| run(&mut engine, vocab)).collect();
    let prefill = median(runs.iter().map(|r| r.0).collect());
    let decode = median(runs.iter().map(|r| r.1).collect());
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.2} | {prefill:.1} | {decode:.1} |",
        BACKENDS[how],
        file_bytes as f64 / 1e6,
        loaded as f64 / 1e6,
        loaded as f64 / file_bytes as f64,
    );
}
