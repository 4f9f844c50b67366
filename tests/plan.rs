//! `switchyard plan` as a user runs it: the ranked table, `--json`, memory per worker equal to
//! what `model inspect --grid` (the coordinator's placement) gives, and clear errors.

mod common;

use common::{fails, ok};

use serde_json::Value;

fn plan_json(args: &[&str]) -> Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&all)).unwrap()
}

fn find<'a>(v: &'a Value, hardware: &str, grid: &str, copies: u64) -> &'a Value {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["hardware"] == hardware && c["grid"] == grid && c["copies"] == copies)
        .unwrap_or_else(|| panic!("no {hardware} {grid} x{copies}"))
}

#[test]
fn mixtral_on_a10g_and_h100() {
    let v = plan_json(&[
        "--model",
        "mixtral-8x7b",
        "--hardware",
        "8xA10G",
        "--hardware",
        "2xH100",
    ]);
    // bf16 weights of the whole model on one worker: 46.7B parameters × 2 bytes ≈ 93 GB; it
    // does not fit one 80 GB H100, and the refusal is the placement's.
    let one = find(&v, "2xH100", "1x1", 1);
    let total = one["weight_bytes"]["total"].as_u64().unwrap();
    assert_eq!((total as f64 / 1e9).round(), 93.0);
    assert!(one["does_not_fit"]
        .as_str()
        .unwrap()
        .contains("bytes missing"));
    // Two H100s as 1x2: each holds about half, and the placement's KV for 8 streams of 4096.
    let two = find(&v, "2xH100", "1x2", 1);
    assert!(two["does_not_fit"].is_null(), "{two}");
    let per_worker = two["weight_bytes"]["per_worker"].as_array().unwrap();
    assert_eq!(per_worker.len(), 2);
    for w in per_worker {
        let gb = w.as_u64().unwrap() as f64 / 1e9;
        assert!(gb > 46.0 && gb < 49.0, "{gb}");
    }
    let kv = two["kv_bytes"]["per_worker"][0].as_u64().unwrap();
    assert_eq!(
        kv,
        4 * 4096 * 131072,
        "4 streams per lane × 4096 tokens × 128 KiB"
    );
    for field in ["ttft_s", "cost_per_million_tokens"] {
        assert!(two[field].as_f64().unwrap() > 0.0, "{field}");
    }
    let speed = &two["decode_tokens_per_s"];
    assert!(speed["aggregate"].as_f64().unwrap() > speed["per_stream"].as_f64().unwrap());
    // Ranked: fitting candidates first, cheapest per token first.
    let candidates = v["candidates"].as_array().unwrap();
    let costs: Vec<f64> = candidates
        .iter()
        .take_while(|c| c["does_not_fit"].is_null())
        .map(|c| c["cost_per_million_tokens"].as_f64().unwrap())
        .collect();
    assert!(costs.len() > 2);
    assert!(costs.windows(2).all(|w| w[0] <= w[1]), "{costs:?}");
    // Every catalog row used is in the answer with its sources.
    assert!(v["hardware"][0]["device"]["source"]
        .as_str()
        .unwrap()
        .contains("A10"));

    let text = ok(&[
        "plan",
        "--model",
        "mixtral-8x7b",
        "--hardware",
        "8xA10G",
        "--hardware",
        "2xH100",
    ]);
    assert!(text.contains("tok/s/stream"), "{text}");
    assert!(text.contains("best: "), "{text}");
    assert!(text.contains("do not fit"), "{text}");
}

/// The planner's memory per worker is the coordinator's: `model inspect --grid` on the same
/// files gives the same bytes, for a CPU host keeping the stored type.
#[test]
fn memory_per_worker_is_the_placement_s() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    ok(&[
        "model",
        "init",
        "--preset",
        "tiny-mixtral",
        "--out",
        dir.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    let d = dir.to_str().unwrap();
    let inspect: Value =
        serde_json::from_str(&ok(&["model", "inspect", d, "--grid", "2x2", "--json"])).unwrap();
    let v = plan_json(&["--model", d, "--hardware", "4xcpu-2core"]);
    let c = find(&v, "4xcpu-2core", "2x2", 1);
    let planned: Vec<u64> = c["weight_bytes"]["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let placed: Vec<u64> = inspect["grid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cell| cell["stored_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(planned, placed);
    assert_eq!(c["held_as"], "as stored (BF16)");
    // The same shapes planned as Q8_0: a CPU host keeps it, smaller than bf16.
    let q8 = plan_json(&["--model", d, "--hardware", "4xcpu-2core", "--dtype", "q8_0"]);
    let c8 = find(&q8, "4xcpu-2core", "2x2", 1);
    assert!(c8["weight_bytes"]["total"].as_u64() < c["weight_bytes"]["total"].as_u64());
}

#[test]
fn custom_hardware_and_a_target() {
    let v = plan_json(&[
        "--model",
        "mistral-7b",
        "--hardware",
        "mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2,name=mine",
        "--target-tps",
        "1000000",
    ]);
    let c = find(&v, "1xmine", "1x1", 1);
    assert_eq!(c["meets_target"], false);
    assert_eq!(c["price_per_hour"], 1.2);
    assert!(c["does_not_fit"].is_null(), "{c}");
}

#[test]
fn bad_plans_get_clear_errors() {
    // (flags after `plan`, what the error must say)
    let cases: [(&[&str], &str); 9] = [
        (
            &["--model", "mixtral-8x7b", "--hardware", "8xB200"],
            "unknown device \"B200\"; expected one of A10G",
        ),
        (
            &["--model", "mixtral-8x7b", "--hardware", "mem=24GiB"],
            "bw, flops missing",
        ),
        (
            &["--model", "mixtral-8x7b", "--hardware", "A10G,bw=fast"],
            "bw \"fast\": expected bytes per second",
        ),
        (&["--model", "mixtral-8x7b"], "--hardware"),
        (&["--model", "gpt-5", "--hardware", "A10G"], "not a preset"),
        (
            &["--model", "acme/unknown-model", "--hardware", "A10G"],
            "no Hugging Face cache",
        ),
        (
            &[
                "--model",
                "mixtral-8x7b",
                "--hardware",
                "A10G",
                "--dtype",
                "q3_k",
            ],
            "expected one of q8_0",
        ),
        (
            &[
                "--model",
                "mixtral-8x7b",
                "--hardware",
                "A10G",
                "--prompt",
                "9000",
            ],
            "at most --context (4096)",
        ),
        (
            &[
                "--model",
                "mixtral-8x7b",
                "--hardware",
                "A10G",
                "--concurrency",
                "0",
            ],
            "at least 1",
        ),
    ];
    for (flags, want) in cases {
        let e = fails(&[&["plan"], flags].concat());
        assert!(e.contains(want), "{flags:?}: {e}");
    }
    // An unknown preset names the ones there are.
    let e = fails(&["plan", "--model", "gpt-5", "--hardware", "A10G"]);
    assert!(e.contains("mixtral-8x7b"), "{e}");
}
