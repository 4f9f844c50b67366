//! Metrics and the dashboard with the real tools that read them: a real Prometheus scrapes the
//! coordinator and separate worker processes under load (its query API must count what was
//! sent; `promtool` checks the exposition and our alerting rules; every query of the Grafana
//! dashboard must return data), and headless Chromium renders the live dashboard.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    coordinator, free_port, http, http_address, model, output_within, serve, start, KillOnDrop,
    Proc,
};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One completion over HTTP; returns (prompt tokens, completion tokens).
fn complete(address: &str, prompt: &str, max_tokens: u32) -> (u64, u64) {
    let body = format!(
        r#"{{"prompt": "{prompt}", "max_tokens": {max_tokens}, "temperature": 0.7, "ignore_eos": true}}"#
    );
    let (status, text) = http(address, "POST", "/v1/completions", &body);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PromQL instant query's result vector.
fn query(prometheus: &str, q: &str) -> Vec<Value> {
    let (status, body) = http(
        prometheus,
        "GET",
        &format!("/api/v1/query?query={}", encode(q)),
        "",
    );
    assert_eq!(status, 200, "{q}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn scalar(prometheus: &str, q: &str) -> Option<f64> {
    let r = query(prometheus, q);
    r.first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
}

fn promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn worker_with_metrics() -> Proc {
    start(
        &[
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        "worker listening on ",
    )
}

#[test]
fn prometheus_scrapes_coordinator_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let workers = [worker_with_metrics(), worker_with_metrics()];
    let coord = coordinator(dir.path(), &workers, "1x2", &[]);
    let coord_http = http_address(&coord);
    let worker_metrics: Vec<String> = workers
        .iter()
        .map(|w| w.address_after("worker metrics on "))
        .collect();

    let prom_dir = tempfile::tempdir().unwrap();
    let targets = |addrs: &[String]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {ROOT}/deploy/prometheus/alerts.yml\nscrape_configs:\n  - job_name: switchyard-coordinator\n    static_configs:\n      - targets: [{}]\n  - job_name: switchyard-worker\n    static_configs:\n      - targets: [{}]\n",
        targets(std::slice::from_ref(&coord_http)),
        targets(&worker_metrics)
    );
    let config_path = prom_dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let prometheus = format!("127.0.0.1:{}", free_port());
    let _prom = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prometheus}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package; scripts/test.sh installs it)"),
    );

    // Rates need a scrape from before the load: wait for every target's first one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(&prometheus).is_err()
        || http(&prometheus, "GET", "/-/ready", "").0 != 200
        || scalar(&prometheus, "count(up == 1)") != Some(3.0)
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the 3 targets"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(1500));

    // Load: 24 requests from 4 threads, with known token counts.
    let (mut prompt, mut generated) = (0, 0);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = coord_http.clone();
            std::thread::spawn(move || {
                (0..6)
                    .map(|i| complete(&addr, &format!("request {t} {i} of the load"), 12 + i))
                    .fold((0, 0), |(p, g), (a, b)| (p + a, g + b))
            })
        })
        .collect();
    for t in threads {
        let (p, g) = t.join().unwrap();
        prompt += p;
        generated += g;
    }
    assert_eq!(generated, 4 * (12 + 13 + 14 + 15 + 16 + 17));

    // Prometheus sees every request once the next scrapes land. The coordinator and the
    // workers are scraped at their own times: wait for a scrape of each after the load.
    let sum = |q: &str| scalar(&prometheus, q).unwrap_or(-1.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = sum("sum(switchyard_request_success_total)");
        let routed = sum("sum(switchyard_expert_tokens_routed_total)");
        if done == 24.0 && routed >= generated as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus saw {done} of 24 requests and {routed} routed tokens (at least \
             {generated} expected)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        sum("sum(switchyard_generation_tokens_total)"),
        generated as f64
    );
    assert_eq!(sum("sum(switchyard_prompt_tokens_total)"), prompt as f64);
    assert_eq!(
        sum("sum(switchyard_time_to_first_token_seconds_count)"),
        24.0
    );
    // Every token of every step is routed (top-k per MoE layer) on the worker of its lane.
    assert!(sum("sum(switchyard_expert_tokens_routed_total)") >= generated as f64);
    assert!(sum("sum(switchyard_worker_exchange_bytes_total)") > 0.0);
    assert_eq!(sum("count(up{job=\"switchyard-worker\"} == 1)"), 2.0);
    assert_eq!(sum("sum(switchyard_worker_up)"), 2.0);

    // The exposition passes promtool's checks, the rules load and pass too.
    let (_, coord_text) = http(&coord_http, "GET", "/metrics", "");
    promtool(&["check", "metrics"], Some(&coord_text));
    let (_, worker_text) = http(&worker_metrics[0], "GET", "/metrics", "");
    promtool(&["check", "metrics"], Some(&worker_text));
    let rules = format!("{ROOT}/deploy/prometheus/alerts.yml");
    promtool(&["check", "rules", &rules], None);

    // Every query of the Grafana dashboard returns data. Rates need two scrapes after the load.
    std::thread::sleep(Duration::from_secs(3));
    let grafana: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/switchyard.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let q = target["expr"].as_str().unwrap();
            let result = query(&prometheus, q);
            let real = result.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .is_some_and(|v| v.parse::<f64>().is_ok_and(|x| !x.is_nan()))
            });
            assert!(
                real,
                "panel {:?}: {q} returned no data: {result:?}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} queries");
}

#[test]
fn the_dashboard_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap(), "--grid", "2x2"]);
    let addr = http_address(&server);

    // Steady load while the page is loaded and rendered.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|t| {
            let (addr, stop) = (addr.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    complete(&addr, &format!("dashboard load {t} {i}"), 24);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));

    let profile = tempfile::tempdir().unwrap();
    let chromium = |mode: &str| {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(format!("http://{addr}/"));
        // Debian's chromium; scripts/system-deps.sh installs it.
        let out = output_within(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "chromium {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = chromium("--dump-dom");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    chromium(&format!("--screenshot={}", shot.display()));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }

    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page loaded its data:\n{dom}"
    );
    assert_eq!(
        dom.matches(r#"class="worker" data-up="true""#).count(),
        4,
        "{dom}"
    );
    let attr = |marker: &str| -> Vec<f64> {
        dom.split(marker)
            .skip(1)
            .filter_map(|rest| rest.split('"').next()?.parse().ok())
            .collect()
    };
    let throughput = attr(r#"id="throughput" data-value=""#);
    assert!(
        throughput.first().is_some_and(|t| *t > 0.0),
        "throughput {throughput:?}"
    );
    let cells = attr(r#"data-tokens=""#);
    assert_eq!(cells.len(), 2 * 4, "layers × experts cells");
    assert!(cells.iter().any(|n| *n > 0.0), "heat map {cells:?}");
    assert!(dom.contains(">length</td>"), "finished requests listed");
    let png = std::fs::metadata(&shot).unwrap().len();
    assert!(
        png > 10_000,
        "screenshot kept at {} ({png} bytes)",
        shot.display()
    );
}
