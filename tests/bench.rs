//! `switchyard bench` against real `switchyard serve` processes on loopback: the tokens it
//! counts are the server's own usage figures, its timings are consistent, more load shows as
//! more latency, refusals are counted by status, and bad targets or flags are clear errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{http, http_address, model, output_within, Proc, BIN};
use serde_json::Value;

/// `serve` over a 1×1 grid of `dir`, with `extra` flags, and its gRPC and HTTP addresses.
struct Server {
    _proc: Proc,
    grpc: String,
    http: String,
}

fn serve(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--model", dir.to_str().unwrap(), "--grid", "1x1"];
    args.extend_from_slice(extra);
    let proc = common::serve(&args);
    Server {
        grpc: format!("grpc://{}", proc.address),
        http: http_address(&proc),
        _proc: proc,
    }
}

/// The sum of the samples of Prometheus metric `name` whose labels contain `labels`, from
/// the server's `/metrics`.
fn metric(server: &Server, name: &str, labels: &str) -> f64 {
    let (status, body) = http(&server.http, "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            (series.is_empty() || series.starts_with('{') && series.contains(labels))
                .then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Waits (up to 5 s) for `metric` to reach `want`: a server counts a request just after
/// its last message has gone.
fn metric_reaches(server: &Server, name: &str, labels: &str, want: f64) {
    let t = Instant::now();
    loop {
        let got = metric(server, name, labels);
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}{{{labels}}} is {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bench(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("bench").args(args).env("RUST_LOG", "warn");
    output_within(&mut cmd, Duration::from_secs(300))
}

/// Runs a bench that must succeed; returns its JSON file and its table.
fn bench_ok(args: &[&str], dir: &Path) -> (Value, String) {
    let json = dir.join(format!("bench-{}.json", rand_suffix()));
    let mut all = args.to_vec();
    all.extend_from_slice(&["--json", json.to_str().unwrap()]);
    let out = bench(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed: {stderr}");
    let text = std::fs::read_to_string(&json).unwrap();
    (
        serde_json::from_str(&text).unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn fails(args: &[&str]) -> String {
    let out = bench(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "bench {args:?} should fail");
    assert!(
        !stderr.contains("panicked"),
        "bench {args:?} panicked: {stderr}"
    );
    stderr
}

fn small_model(dir: &Path) {
    model(dir, "tiny-mixtral", |c| c.num_layers = 2);
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// Every completed request: the bench's counts equal the server's usage and what was asked,
/// the first token came before the end; totals are the sums. gRPC streams one message per
/// token here; HTTP streams text, and a chunk may carry several tokens (text held back).
fn check_counts(run: &Value, grpc: bool) -> Vec<u64> {
    let requests = run["requests"].as_array().unwrap();
    let mut inputs = Vec::new();
    let (mut input_sum, mut output_sum) = (0, 0);
    for r in requests {
        assert!(r["error"].is_null(), "failed: {r}");
        assert_eq!(r["input_tokens"], r["server_prompt_tokens"], "{r}");
        assert_eq!(r["output_tokens"], r["server_completion_tokens"], "{r}");
        assert_eq!(r["output_tokens"], r["output_tokens_asked"], "{r}");
        assert!(num(&r["ttft_ms"]) <= num(&r["e2e_ms"]), "{r}");
        let n = r["output_tokens"].as_u64().unwrap() as usize;
        let gaps = r["itl_ms"].as_array().unwrap().len();
        assert!(
            gaps == n - 1 || !grpc && gaps < n,
            "{n} tokens, {gaps} gaps: {r}"
        );
        inputs.push(r["input_tokens"].as_u64().unwrap());
        input_sum += r["input_tokens"].as_u64().unwrap();
        output_sum += r["output_tokens"].as_u64().unwrap();
    }
    assert_eq!(run["input_tokens"], input_sum);
    assert_eq!(run["output_tokens"], output_sum);
    assert_eq!(run["token_mismatches"], 0);
    assert!(
        run["warnings"].as_array().unwrap().is_empty(),
        "{}",
        run["warnings"]
    );
    inputs
}

#[test]
fn counted_tokens_equal_the_servers_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    small_model(&dir);
    let server = serve(&dir, &[]);
    let http = format!("http://{}/v1", server.http);
    let model_dir = dir.to_str().unwrap();
    let prompt_tokens = "switchyard_prompt_tokens_total";
    let generation_tokens = "switchyard_generation_tokens_total";
    let mut counted = (0.0, 0.0);

    // gRPC completions counted by the server's Tokenize RPC, the rest by the local
    // tokenizer; chats through the chat template (which adds its own tokens).
    let runs = [
        (
            &server.grpc,
            vec!["--api", "completions", "--input-len", "uniform:2-60"],
        ),
        (
            &server.grpc,
            vec![
                "--api",
                "chat",
                "--input-len",
                "normal:40:15",
                "--tokenizer",
                model_dir,
            ],
        ),
        (
            &http,
            vec![
                "--api",
                "completions",
                "--input-len",
                "uniform:2-60",
                "--tokenizer",
                model_dir,
            ],
        ),
        (
            &http,
            vec![
                "--api",
                "chat",
                "--input-len",
                "uniform:20-50",
                "--tokenizer",
                model_dir,
            ],
        ),
    ];
    for (target, extra) in runs {
        let mut args = vec![
            "--target",
            target,
            "--requests",
            "16",
            "--concurrency",
            "4",
            "--output-len",
            "uniform:1-12",
            "--seed",
            "5",
            "--slo",
            "ttft=60s",
        ];
        args.extend_from_slice(&extra);
        let (out, table) = bench_ok(&args, tmp.path());
        let run = &out["runs"][0];
        assert_eq!(run["completed"], 16, "{target} {extra:?}");
        assert_eq!(run["failed"], 0);
        let inputs = check_counts(run, target.starts_with("grpc"));
        if extra[3].starts_with("uniform:2-") {
            assert!(inputs.iter().all(|n| (2..=60).contains(n)), "{inputs:?}");
        }
        let distinct: std::collections::BTreeSet<_> = inputs.iter().collect();
        assert!(distinct.len() > 4, "lengths should vary: {inputs:?}");
        assert!(run["peak_concurrency"].as_u64().unwrap() <= 4);
        assert_eq!(run["goodput"]["good_requests"], 16);
        for figure in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            let s = &run[figure];
            assert!(num(&s["median"]) <= num(&s["p99"]), "{figure}: {s}");
            assert!(num(&s["p99"]) <= num(&s["max"]), "{figure}: {s}");
        }
        assert!(num(&run["request_throughput"]) > 0.0);
        assert!(
            table.contains("Completed requests:") && table.contains("TTFT"),
            "{table}"
        );
        assert_eq!(out["model"], "m");
        // The server's Prometheus counters grew by what the bench counted.
        counted.0 += num(&run["input_tokens"]);
        counted.1 += num(&run["output_tokens"]);
        metric_reaches(&server, prompt_tokens, "", counted.0);
        metric_reaches(&server, generation_tokens, "", counted.1);
    }

    // Fewer tokens than the chat template has on its own.
    let target = &server.grpc;
    let out = bench(&[
        "--target",
        target,
        "--api",
        "chat",
        "--concurrency",
        "1",
        "--input-len",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--input-len asks for 3 tokens, fewer than the"),
        "{stderr}"
    );

    // A ShareGPT file: the reply's length is the output length.
    let dataset = tmp.path().join("sharegpt.json");
    std::fs::write(
        &dataset,
        r#"[{"conversations": [{"from": "human", "value": "Tell me about the river in the valley."},
                               {"from": "gpt", "value": "The river was high after the storm."}]},
            {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi, how can I help you today?"}]}]"#,
    )
    .unwrap();
    let (out, _) = bench_ok(
        &[
            "--target",
            target,
            "--dataset",
            dataset.to_str().unwrap(),
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--warmup",
            "2",
        ],
        tmp.path(),
    );
    check_counts(&out["runs"][0], true);

    // Bounded by time at a Poisson rate: nothing is sent after the duration.
    let (out, _) = bench_ok(
        &[
            "--target",
            target,
            "--rate",
            "20",
            "--burstiness",
            "0.5",
            "--duration",
            "1500ms",
            "--input-len",
            "8",
            "--output-len",
            "4",
        ],
        tmp.path(),
    );
    let run = &out["runs"][0];
    let requests = run["requests"].as_array().unwrap();
    assert!(
        requests.len() >= 5,
        "{} requests in 1.5 s at 20/s",
        requests.len()
    );
    assert!(requests.iter().all(|r| num(&r["sent_at_ms"]) < 1500.0));
    check_counts(run, true);
}

#[test]
fn a_server_under_more_load_is_slower() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    small_model(&dir);
    // One sequence at a time: with six in flight, requests wait for the ones ahead.
    let server = serve(&dir, &["--max-running", "1"]);
    let plot = tmp.path().join("sweep.svg");
    let (out, table) = bench_ok(
        &[
            "--target",
            &server.grpc,
            "--sweep",
            "concurrency=1,6",
            "--requests",
            "12",
            "--input-len",
            "16",
            "--output-len",
            "24",
            "--plot",
            plot.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let runs = out["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let median = |r: &Value, f: &str| num(&r[f]["median"]);
    for r in runs {
        check_counts(r, true);
    }
    let (one, six) = (&runs[0], &runs[1]);
    assert_eq!(one["peak_concurrency"], 1);
    assert_eq!(six["peak_concurrency"], 6);
    assert!(
        median(six, "e2e_ms") > 2.0 * median(one, "e2e_ms"),
        "E2E {} vs {}",
        median(six, "e2e_ms"),
        median(one, "e2e_ms")
    );
    assert!(
        median(six, "ttft_ms") > 2.0 * median(one, "ttft_ms"),
        "TTFT {} vs {}",
        median(six, "ttft_ms"),
        median(one, "ttft_ms")
    );
    assert!(table.contains("| concurrency=6 |"), "{table}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Three panels' axes, the curve (E2E and TTFT), a CDF per run in each of two panels.
    assert_eq!(svg.matches("<polyline points=\"").count(), 3 + 2 + 2 * 2);
    assert!(svg.contains("concurrency=6"));
}

#[test]
fn a_full_queue_is_counted_as_failed_with_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    small_model(&dir);
    let server = serve(&dir, &["--max-running", "1", "--max-queue", "1"]);
    let http = format!("http://{}/v1", server.http);
    let model_dir = dir.to_str().unwrap();
    let mut refused_in_all = 0.0;
    for (target, status) in [(&server.grpc, "RESOURCE_EXHAUSTED"), (&http, "HTTP 429")] {
        let (out, table) = bench_ok(
            &[
                "--target",
                target,
                "--tokenizer",
                model_dir,
                "--requests",
                "16",
                "--concurrency",
                "8",
                "--input-len",
                "8",
                "--output-len",
                "32",
            ],
            tmp.path(),
        );
        let run = &out["runs"][0];
        let refused = run["failed_by_status"][status].as_u64().unwrap_or(0);
        assert!(refused > 0, "{target}: {}", run["failed_by_status"]);
        assert_eq!(run["failed"], refused, "{}", run["failed_by_status"]);
        let completed = run["completed"].as_u64().unwrap();
        assert!(completed > 0);
        assert_eq!(completed + refused, 16);
        assert!(
            run["failure_messages"][status]
                .as_str()
                .unwrap()
                .contains("queue is full"),
            "{}",
            run["failure_messages"]
        );
        // Only completed requests count towards the figures.
        assert_eq!(run["output_tokens"], completed * 32);
        assert!(table.contains(&format!("{status}:")), "{table}");
        refused_in_all += refused as f64;
        let code = "code=\"resource_exhausted\"";
        metric_reaches(
            &server,
            "switchyard_request_failure_total",
            code,
            refused_in_all,
        );
    }
}

#[test]
fn an_unreachable_target_is_a_clear_error_at_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    for (target, says) in [
        (format!("grpc://{closed_addr}"), "onnection refused"),
        (format!("http://{closed_addr}/v1"), "onnection refused"),
        (format!("grpc://{silent_addr}"), "within 5 s"),
        (format!("http://{silent_addr}/v1"), "within 5 s"),
    ] {
        let t = Instant::now();
        let stderr = fails(&[
            "--target",
            &target,
            "--concurrency",
            "1",
            "--tokenizer",
            "/nonexistent",
        ]);
        assert!(
            stderr.contains(&format!("cannot reach {target}")) && stderr.contains(says),
            "{target}: {stderr}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{target}: took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = "grpc://127.0.0.1:1";
    let cases: &[(&[&str], &str)] = &[
        (
            &["--target", "127.0.0.1:50051"],
            "expected grpc://HOST:PORT or http://HOST:PORT/v1",
        ),
        (&["--target", "ftp://h:1"], "expected grpc://HOST:PORT"),
        (&["--target", t], "expected the load: --concurrency N"),
        (
            &["--target", t, "--concurrency", "0"],
            "--concurrency 0: expected at least 1",
        ),
        (
            &["--target", t, "--rate", "0"],
            "requests per second greater than 0",
        ),
        (
            &["--target", t, "--concurrency", "1", "--burstiness", "0"],
            "--burstiness 0: expected a number greater than 0",
        ),
        (
            &[
                "--target",
                t,
                "--concurrency",
                "1",
                "--input-len",
                "uniform:9-3",
            ],
            "uniform:LO-HI (1 ≤ LO ≤ HI)",
        ),
        (
            &["--target", t, "--concurrency", "1", "--output-len", "lots"],
            "a token count N ≥ 1",
        ),
        (
            &["--target", t, "--concurrency", "1", "--duration", "soon"],
            "a time such as 200ms",
        ),
        (
            &["--target", t, "--concurrency", "1", "--slo", "ttft=fast"],
            "ttft: expected a time",
        ),
        (
            &["--target", t, "--concurrency", "1", "--slo", "speed=1s"],
            "NAME one of ttft, tpot, e2e",
        ),
        (
            &["--target", t, "--sweep", "concurrency="],
            "concurrency=N,N,",
        ),
        (
            &[
                "--target",
                t,
                "--sweep",
                "concurrency=1,2",
                "--concurrency",
                "3",
            ],
            "the sweep sets it",
        ),
        (
            &["--target", t, "--concurrency", "1", "--plot", "out.png"],
            "PNG output is not supported",
        ),
        (
            &["--target", t, "--concurrency", "1", "--plot", "out.gif"],
            "an .svg file",
        ),
        (
            &[
                "--target",
                t,
                "--concurrency",
                "1",
                "--json",
                "/nonexistent/dir/x.json",
            ],
            "a file in an existing directory",
        ),
        (
            &[
                "--target",
                t,
                "--concurrency",
                "1",
                "--dataset",
                "/nonexistent.json",
            ],
            "an existing ShareGPT",
        ),
        (
            &["--target", t, "--concurrency", "1", "--api", "embeddings"],
            "completions or chat",
        ),
        (
            &["--target", "http://127.0.0.1:1/v1", "--concurrency", "1"],
            "--tokenizer (none): expected the model's tokenizer.json",
        ),
    ];
    for (args, says) in cases {
        let start = Instant::now();
        let stderr = fails(args);
        assert!(stderr.contains(says), "{args:?}: {stderr:?} lacks {says:?}");
        // Checked before connecting to anything.
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // A dataset that is not one.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"no prompt key\"}\n").unwrap();
    let stderr = fails(&[
        "--target",
        t,
        "--concurrency",
        "1",
        "--dataset",
        bad.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("line 1: expected a \"prompt\" string"),
        "{stderr}"
    );
}
