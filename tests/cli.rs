//! The `switchyard` command line as other tools call it: `model init`, `model inspect`,
//! `generate --json`, and clear errors for bad input.

mod common;

use common::{fails, ok};

use std::path::Path;

use serde_json::Value;

fn init(dir: &Path, preset: &str) {
    ok(&[
        "model",
        "init",
        "--preset",
        preset,
        "--out",
        dir.to_str().unwrap(),
        "--seed",
        "7",
    ]);
}

#[test]
fn init_inspect_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-mixtral");
    let d = dir.to_str().unwrap();

    let info: Value = serde_json::from_str(&ok(&["model", "inspect", d, "--json"])).unwrap();
    assert_eq!(info["architecture"], "MixtralForCausalLM");
    let (total, active) = (
        info["parameters"]["total"].as_u64().unwrap(),
        info["parameters"]["active_per_token"].as_u64().unwrap(),
    );
    assert!(active < total, "{active} {total}");
    // 2 layers × 2 KV heads × 16 × (K+V) × 2 bytes.
    assert_eq!(info["kv_bytes_per_token"]["bf16"], 256);
    assert!(ok(&["model", "inspect", d]).contains("4 per layer, top-2"));

    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["generate", "--model", d, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let g = run(&[
        "--prompt",
        "Hello world",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--logprobs",
        "3",
        "--prompt-logprobs",
        "2",
    ]);
    assert_eq!(g["token_ids"].as_array().unwrap().len(), 6);
    assert_eq!(g["finish_reason"], "length");
    assert_eq!(g["usage"]["completion_tokens"], 6);
    let lp = &g["logprobs"][0];
    assert_eq!(lp["top"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_id"], g["token_ids"][0]);
    let prompt_lps = g["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        prompt_lps.len() as u64,
        g["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(prompt_lps[0].is_null() && prompt_lps[1]["logprob"].as_f64().unwrap() <= 0.0);

    // Greedy is deterministic.
    let again = run(&[
        "--prompt",
        "Hello world",
        "--max-tokens",
        "6",
        "--ignore-eos",
    ]);
    assert_eq!(again["token_ids"], g["token_ids"]);

    // Seeded sampling repeats; another seed (almost surely) differs somewhere in 24 tokens.
    let sample = |seed: &str| {
        run(&[
            "--prompt",
            "Hi",
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ])["token_ids"]
            .clone()
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));

    // A stop string taken from the greedy text ends generation there, without the string.
    let long = run(&[
        "--prompt-ids",
        "1,5,9,13",
        "--max-tokens",
        "12",
        "--ignore-eos",
    ]);
    let text = long["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() > 4 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let s = run(&[
            "--prompt-ids",
            "1,5,9,13",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--stop",
            &stop,
        ]);
        assert_eq!(s["finish_reason"], "stop");
        let cut = s["text"].as_str().unwrap();
        assert!(
            text.starts_with(cut) && !cut.contains(&stop),
            "{cut:?} / {text:?} / {stop:?}"
        );
    }
    // Chat input goes through the template (BOS + "[INST]").
    let chat = run(&["--chat", "Hi", "--max-tokens", "1"]);
    assert!(chat["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-mistral");
    let d = dir.to_str().unwrap();

    let e = fails(&["model", "init", "--preset", "giant", "--out", d]);
    assert!(
        e.contains("unknown preset \"giant\"") && e.contains("tiny-mixtral"),
        "{e}"
    );
    let e = fails(&[
        "model",
        "init",
        "--preset",
        "tiny-llama",
        "--out",
        d,
        "--dtype",
        "int4",
    ]);
    assert!(e.contains("int4") && e.contains("bf16"), "{e}");
    let e = fails(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(
        e.contains("/nonexistent/model") && e.contains("config.json"),
        "{e}"
    );
    let e = fails(&["generate", "--model", d, "--prompt-ids", "1,99999"]);
    assert!(
        e.contains("99999") && e.contains("vocabulary has 512"),
        "{e}"
    );
    let e = fails(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "x",
        "--temperature=-1",
    ]);
    assert!(e.contains("temperature"), "{e}");
    let e = fails(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "x",
        "--logprobs",
        "50",
    ]);
    assert!(e.contains("at most 20"), "{e}");
    let e = fails(&["generate", "--model", d]);
    assert!(e.contains("--prompt"), "{e}");
    let e = fails(&["generate", "--model", d, "--prompt", "x", "--chat", "y"]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = fails(&["generate", "--model", d, "--prompt-ids", "1,x"]);
    assert!(e.contains("invalid"), "{e}");

    // Issue 18: these panicked at start (a block of 0 tokens, a deadline past the end of
    // time) or made every request hang (steps of 0 tokens, 0 sequences running).
    for (flag, value, expected) in [
        ("--block-size", "0", "expected 1 to 1024 tokens"),
        ("--block-size", "4096", "expected 1 to 1024 tokens"),
        ("--max-step-tokens", "0", "at least 1"),
        ("--max-running", "0", "at least 1"),
        ("--request-timeout-s", "1e300", "expected a time"),
        ("--request-timeout", "1e10", "expected at most 365 days"),
        ("--step-timeout", "100000000", "expected at most 365 days"),
    ] {
        let e = fails(&[
            "serve",
            "--model",
            d,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            flag,
            value,
        ]);
        let name = flag.trim_end_matches("-s");
        assert!(
            e.contains(name) && e.contains(value) && e.contains(expected),
            "{flag} {value}: {e}"
        );
    }
}

/// A worker registering in etcd must say where it can be reached: `0.0.0.0` is nobody's
/// address (the coordinator refuses the same for its own gRPC port).
#[test]
fn a_worker_on_every_interface_needs_an_advertised_address() {
    let e = fails(&[
        "worker",
        "--listen",
        "0.0.0.0:0",
        "--etcd",
        "http://127.0.0.1:1",
    ]);
    assert!(
        e.contains("--listen 0.0.0.0:0") && e.contains("--advertise HOST:PORT"),
        "{e}"
    );
}

/// A GPU that cannot be used is refused at start, saying why, by every command that takes
/// `--device` (cuda:99 exists nowhere: without a driver the message says so, with one it
/// counts the GPUs).
#[test]
fn an_unusable_gpu_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-mixtral");
    let d = dir.to_str().unwrap();
    let no_gpu = |e: &str| {
        e.contains("cuda:99")
            && (e.contains("CUDA driver (libcuda) was not found") || e.contains("GPU(s)"))
    };
    let e = fails(&["worker", "--device", "cuda:99", "--listen", "127.0.0.1:0"]);
    assert!(no_gpu(&e), "{e}");
    let e = fails(&[
        "serve",
        "--device",
        "cuda:99",
        "--model",
        d,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert!(no_gpu(&e), "{e}");
    let e = fails(&[
        "generate", "--device", "cuda:99", "--model", d, "--prompt", "x",
    ]);
    assert!(no_gpu(&e), "{e}");
    let e = fails(&["worker", "--device", "tpu"]);
    assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
}

/// A GGUF file (SmolLM2-135M-Instruct Q4_1; scripts/smollm2.sh fetches it) inspects like a
/// model directory.
#[test]
fn inspect_a_gguf_file() {
    let path = std::env::var("SWITCHYARD_SMOLLM2").expect(
        "SWITCHYARD_SMOLLM2 is not set: run scripts/test.sh or `source scripts/smollm2.sh`",
    );
    let info: Value = serde_json::from_str(&ok(&["model", "inspect", &path, "--json"])).unwrap();
    assert_eq!(info["format"], "GGUF v3, 272 tensors");
    assert_eq!(info["architecture"], "LlamaForCausalLM");
    assert_eq!(info["config"]["num_layers"], 30);
    assert_eq!(info["config"]["tie_word_embeddings"], true);
    assert_eq!(info["bytes_by_dtype"]["Q8_0"], 49152 * 576 / 32 * 34);
    assert!(info["bytes_by_dtype"]["Q4_1"].as_u64().unwrap() > 50_000_000);
    let text = ok(&["model", "inspect", &path]);
    assert!(text.contains("bytes (Q4_1)"), "{text}");
}

/// `model inspect --grid` places the model as the coordinator would: every layer in one stage,
/// every expert in one shard, and bytes as stored (f32 here) twice those in bf16.
#[test]
fn inspect_shows_what_each_worker_of_a_grid_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, "tiny-mixtral");
    let d = dir.to_str().unwrap();
    let info: Value =
        serde_json::from_str(&ok(&["model", "inspect", d, "--grid", "2x2", "--json"])).unwrap();
    let cells = info["grid"].as_array().unwrap();
    assert_eq!(cells.len(), 4);
    let layers = info["config"]["num_layers"].as_u64().unwrap();
    let mut covered = vec![0; layers as usize];
    for cell in cells {
        let stored = cell["stored_bytes"].as_u64().unwrap();
        assert!(stored > 0);
        assert_eq!(stored, 2 * cell["bf16_bytes"].as_u64().unwrap(), "{cell}");
        if cell["shard"] == 0 {
            let (a, b) = (
                cell["layers"][0].as_u64().unwrap(),
                cell["layers"][1].as_u64().unwrap(),
            );
            (a..b).for_each(|l| covered[l as usize] += 1);
        }
    }
    assert_eq!(covered, vec![1; layers as usize]);
    let text = ok(&["model", "inspect", d, "--grid", "2x2"]);
    assert!(text.contains("worker 1.1"), "{text}");
    let e = fails(&["model", "inspect", d, "--grid", "2by2"]);
    assert!(e.contains("PxE"), "{e}");
}
