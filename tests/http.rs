//! The OpenAI-compatible HTTP API, driven by the official `openai` Python package
//! (`tests/openai_client.py`) against real `switchyard serve` processes, and the plain HTTP
//! endpoints (`/health`, `/ready`, errors) with a raw HTTP/1.1 client.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    http, http_address, http_with_headers, model, output_within, python, serve, start_env, BIN,
};
use serde_json::Value;

#[test]
fn the_openai_package_works_against_serve() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let m = dir.path().to_str().unwrap();
    let server = serve(&["--model", m, "--grid", "1x2"]);
    let small = serve(&["--model", m, "--max-running", "1", "--max-queue", "1"]);
    let base = format!("http://{}/v1", http_address(&server));
    let small_base = format!("http://{}/v1", http_address(&small));
    let prompt_ids = "1,17,93,5,250,44,61,7,7,120";

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = output_within(
        Command::new(python()).args([script, &base, &small_base, prompt_ids]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let http: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // The same prompt scored offline, in one process, by the reference path.
    let offline = Command::new(BIN)
        .args(["generate", "--model", m, "--prompt-ids", prompt_ids])
        .args(["--max-tokens", "1", "--prompt-logprobs", "1", "--json"])
        .output()
        .unwrap();
    assert!(offline.status.success());
    let offline: Value = serde_json::from_slice(&offline.stdout).unwrap();
    let expected = offline["prompt_logprobs"].as_array().unwrap();
    let got = http["token_logprobs"].as_array().unwrap();
    let tops = http["top_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got[0].is_null() && expected[0].is_null());
    for i in 1..got.len() {
        let (g, e) = (
            got[i].as_f64().unwrap(),
            expected[i]["logprob"].as_f64().unwrap(),
        );
        assert!(
            (g - e).abs() <= 1e-4,
            "prompt token {i}: HTTP {g}, offline {e}"
        );
        // The most likely alternative (lm-eval's greedy check reads it) agrees too.
        let best = tops[i]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        let e_best = expected[i]["top"][0]["logprob"].as_f64().unwrap().max(e);
        assert!(
            (best - e_best).abs() <= 1e-4,
            "top at {i}: {best} vs {e_best}"
        );
    }
}

#[test]
fn health_ready_and_errors_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mistral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap()]);
    let addr = http_address(&server);
    assert_eq!(http(&addr, "GET", "/health", "").0, 200);
    assert_eq!(http(&addr, "GET", "/ready", "").0, 200);

    let cases = [
        ("/v1/completions", "{not json", 400, "invalid request body"),
        ("/v1/completions", r#"{"max_tokens": 3}"#, 400, "prompt"),
        (
            "/v1/completions",
            r#"{"prompt": []}"#,
            400,
            "prompt is empty",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 0}"#,
            400,
            "n is 0",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [999999]}"#,
            400,
            "out of range",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 50}"#,
            400,
            "logprobs is 50",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#,
            400,
            "max_tokens is 0",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            400,
            "image_url",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [], "tools": [{}]}"#,
            400,
            "tools",
        ),
        ("/v1/embeddings", "{}", 404, "no such endpoint"),
        ("/tokenize", "{}", 400, "no input"),
        (
            "/tokenize",
            r#"{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}"#,
            400,
            "conflicting inputs",
        ),
        (
            "/detokenize",
            r#"{"tokens": [999999]}"#,
            400,
            "not in the vocabulary",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (got, text) = http(&addr, "POST", path, body);
        assert_eq!(got, status, "{path} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON error: {text}"));
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
        assert_eq!(v["error"]["code"], status);
    }
    // vLLM's /tokenize and /detokenize agree with what generation counts and sees.
    let post = |path: &str, body: &str| -> Value {
        let (status, text) = http(&addr, "POST", path, body);
        assert_eq!(status, 200, "{path} {body}: {text}");
        serde_json::from_str(&text).unwrap()
    };
    let text = "tokens of a sentence";
    let t = post("/tokenize", &format!(r#"{{"prompt": "{text}"}}"#));
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(t["count"], tokens.len());
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let c = post(
        "/v1/completions",
        &format!(r#"{{"prompt": "{text}", "max_tokens": 1}}"#),
    );
    assert_eq!(c["usage"]["prompt_tokens"], t["count"]);
    let d = post("/detokenize", &format!(r#"{{"tokens": {}}}"#, t["tokens"]));
    assert_eq!(d["prompt"], text);
    let messages = r#"[{"role": "user", "content": "a question"}]"#;
    let t = post("/tokenize", &format!(r#"{{"messages": {messages}}}"#));
    let c = post(
        "/v1/chat/completions",
        &format!(r#"{{"messages": {messages}, "max_tokens": 1}}"#),
    );
    assert_eq!(c["usage"]["prompt_tokens"], t["count"]);

    // A dense model has no expert routing, and says so on the dashboard's data.
    let (status, body) = http(&addr, "GET", "/api/dashboard", "");
    assert_eq!(status, 200);
    let d: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["heatmap"]["experts"], 0);
    assert_eq!(d["workers"].as_array().unwrap().len(), 1);
}

#[test]
fn a_request_id_reaches_every_worker_step_in_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let m = dir.path().to_str().unwrap();
    let server = start_env(
        &[
            "--log-format",
            "json",
            "serve",
            "--grid",
            "2x1",
            "--model",
            m,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "info,switchyard_worker::service=debug")],
        "switchyard: listening on ",
    );
    let (status, body) = http_with_headers(
        &http_address(&server),
        "POST",
        "/v1/completions",
        &[("X-Request-Id", "trace-me-42")],
        r#"{"prompt": "trace me", "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{body}");

    // JSON log lines: the coordinator's admission and both stages' steps name the request.
    let mut stages = std::collections::BTreeSet::new();
    let mut admitted = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && !(admitted && stages.len() == 2) {
        let Ok(l) = server.lines.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if !l.contains("trace-me-42") {
            continue;
        }
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|_| panic!("not JSON: {l}"));
        match v["fields"]["message"].as_str() {
            Some("generate") => admitted = true,
            Some("step ran") => {
                stages.insert(v["span"]["stage"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    assert!(admitted, "the coordinator logged the request id");
    assert_eq!(stages.len(), 2, "both stages' steps carry the request id");
}
