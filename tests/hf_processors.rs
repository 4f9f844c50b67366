//! The sampling extensions against Hugging Face transformers' own logits processors:
//! `fixtures/hf-processors/reference.json` holds greedy decodings by `transformers.generate`
//! with `repetition_penalty`, `sequence_bias`, `bad_words_ids`, `min_new_tokens`, extra EOS ids
//! and a presence/frequency processor (made by `fixtures/hf-processors/make.sh` through
//! `tests/hf_processors.py`), on the random Mixtral of `worker/tests/fixtures/hf/mixtral-window`.
//! `switchyard generate` must pick the same tokens, in the one process and through a served
//! cluster (`--server`, the gRPC API and a worker's last stage), with the same logprobs.

mod common;

use std::path::Path;

use common::{fails, ok, serve};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A reference case as `generate` flags.
fn flags(case: &Value) -> Vec<String> {
    let ids = |v: &Value| -> String {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut f = vec![
        "--prompt-ids".to_string(),
        ids(&case["prompt"]),
        "--max-tokens".into(),
        case["max_tokens"].to_string(),
        "--logprobs".into(),
        "0".into(),
        "--json".into(),
    ];
    for name in [
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
    ] {
        if let Some(v) = case.get(name) {
            f.push(format!("--{}={v}", name.replace('_', "-")));
        }
    }
    for (t, b) in case
        .get("logit_bias")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        f.push(format!("--logit-bias={t}={b}"));
    }
    if let Some(v) = case.get("stop_token_ids") {
        f.push(format!("--stop-token-ids={}", ids(v)));
    }
    for w in case
        .get("bad_word_ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        f.push(format!("--bad-word-ids={}", ids(w)));
    }
    f
}

fn check(case: &Value, got: &str, path: &str) {
    let name = case["name"].as_str().unwrap();
    let got: Value = serde_json::from_str(got).unwrap();
    assert_eq!(
        got["token_ids"], case["token_ids"],
        "{name} ({path}): tokens differ from transformers'"
    );
    let expected = case["logprobs"].as_array().unwrap();
    let lps = got["logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), expected.len());
    for (i, (g, e)) in lps.iter().zip(expected).enumerate() {
        let (g, e) = (g["logprob"].as_f64().unwrap(), e.as_f64().unwrap());
        assert!(
            (g - e).abs() <= TOLERANCE,
            "{name} ({path}), token {i}: logprob {g}, transformers {e}"
        );
    }
}

fn cases() -> Vec<Value> {
    let path = root().join("tests/fixtures/hf-processors/reference.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json.as_array().unwrap().clone()
}

#[test]
fn greedy_decoding_with_processors_matches_transformers() {
    let model = root().join("worker/tests/fixtures/hf/mixtral-window");
    let model = model.to_str().unwrap();
    let server = serve(&["--model", model, "--grid", "2x1"]);
    for case in cases() {
        let flags = flags(&case);
        let mut args = vec!["generate", "--model", model, "--dtype", "f32"];
        args.extend(flags.iter().map(String::as_str));
        check(&case, &ok(&args), "one process");
        let mut args = vec!["generate", "--server", &server.address];
        args.extend(flags.iter().map(String::as_str));
        check(&case, &ok(&args), "served");
    }
    // A value out of range is refused by name with its range: INVALID_ARGUMENT over gRPC, the
    // same words in one process.
    for (flag, says) in [
        (
            "--presence-penalty=2.5",
            "presence_penalty is 2.5; expected -2 to 2",
        ),
        (
            "--repetition-penalty=0",
            "repetition_penalty is 0; expected a number > 0",
        ),
        (
            "--logit-bias=3=-101",
            "logit_bias of token 3 is -101; expected -100 to 100",
        ),
        (
            "--min-tokens=20",
            "min_tokens is 20; expected at most max_tokens (16)",
        ),
        ("--stop-token-ids=256", "stop_token_ids names token 256"),
        ("--bad-word-ids=1,999", "bad_word_ids names token 999"),
    ] {
        let local = fails(&["generate", "--model", model, "--prompt-ids", "1,2", flag]);
        assert!(local.contains(says), "{flag}: {local}");
        let remote = fails(&[
            "generate",
            "--server",
            &server.address,
            "--prompt-ids",
            "1,2",
            flag,
        ]);
        assert!(remote.contains(says), "{flag}: {remote}");
        assert!(
            remote.to_lowercase().contains("invalid argument"),
            "{flag}: {remote}"
        );
    }
}
