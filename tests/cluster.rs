//! The cluster end to end: separate `switchyard worker` processes on loopback, a
//! `switchyard coordinator` over them, clients over gRPC. Outputs must equal the offline
//! `switchyard generate` on the same model, whatever the grid and however requests share it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    client, coordinator, four_layers_eight_experts, generate_json, model, offline, runtime, worker,
    Proc, BIN,
};
use serde_json::Value;
use switchyard_model::ModelConfig;
use switchyard_proto::v1 as pb;
use tonic::Code;

fn generate(target: &[&str], args: &[&str]) -> Value {
    generate_json(&[target, args].concat())
}

fn ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 101) % 400 + 3) as u32)
        .collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Largest difference between two lists of logprob entries (`null` entries must match).
fn logprob_gap(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.is_null(), y.is_null());
        if x.is_null() {
            continue;
        }
        assert_eq!(x["token_id"], y["token_id"]);
        worst = worst.max((x["logprob"].as_f64().unwrap() - y["logprob"].as_f64().unwrap()).abs());
        for (p, q) in x["top"]
            .as_array()
            .unwrap()
            .iter()
            .zip(y["top"].as_array().unwrap())
        {
            worst =
                worst.max((p["logprob"].as_f64().unwrap() - q["logprob"].as_f64().unwrap()).abs());
        }
    }
    worst
}

#[test]
fn every_grid_matches_offline_generate() {
    let tmp = tempfile::tempdir().unwrap();
    type Change = fn(&mut ModelConfig);
    let models: [(&str, Change); 3] = [
        // 8 experts: 2×3 holds 2, 3 and 3 per shard.
        ("tiny-mixtral", four_layers_eight_experts),
        // Window 16, prompt 40: the window slides during prefill and decode.
        ("tiny-mistral", |c| c.num_layers = 4),
        ("tiny-llama", |c| c.num_layers = 4),
    ];
    let workers: Vec<Proc> = (0..6).map(|_| worker()).collect();
    let prompt = csv(&ids(40, 1));
    let args = [
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "24",
        "--ignore-eos",
        "--logprobs",
        "3",
        "--prompt-logprobs",
        "2",
    ];
    for (name, change) in models {
        let dir = tmp.path().join(name);
        model(&dir, name, change);
        let offline = generate(&["--model", dir.to_str().unwrap()], &args);
        for grid in ["1x1", "1x4", "4x1", "2x2", "2x3"] {
            let c = coordinator(&dir, &workers, grid, &[]);
            let remote = generate(&["--server", &c.address], &args);
            assert_eq!(
                remote["token_ids"], offline["token_ids"],
                "{name} on {grid}: tokens differ"
            );
            let gap = logprob_gap(&remote["logprobs"], &offline["logprobs"]).max(logprob_gap(
                &remote["prompt_logprobs"],
                &offline["prompt_logprobs"],
            ));
            println!("{name} on {grid}: max |Δlogprob| vs offline = {gap:e}");
            assert!(gap <= 1e-4, "{name} on {grid}: logprobs differ by {gap}");
            assert_eq!(remote["usage"], offline["usage"]);
            assert_eq!(remote["text"], offline["text"]);
        }
    }
}

/// A greedy request with the chosen token's logprob.
fn request(prompt: &[u32], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        logprobs: Some(1),
        ..common::request(prompt, max_tokens)
    }
}

/// Runs a request to its end; the token ids and logprobs it streamed.
async fn stream_all(
    address: String,
    r: pb::GenerateRequest,
) -> Result<(Vec<u32>, Vec<f32>), tonic::Status> {
    let mut c = client(&address).await;
    let mut s = c.generate(r).await?.into_inner();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let mut finished = false;
    while let Some(m) = s.message().await? {
        assert!(!finished, "a message after the last one");
        tokens.extend(m.token_ids);
        logprobs.extend(m.logprobs.iter().map(|l| l.logprob));
        finished = !m.finish_reason.is_empty();
    }
    assert!(finished, "the stream ended without a finish reason");
    Ok((tokens, logprobs))
}

async fn status(address: &str) -> pb::ClusterStatusResponse {
    client(address)
        .await
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[test]
fn concurrent_streams_with_preemption_match_their_outputs_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model(&dir, "tiny-mixtral", four_layers_eight_experts);
    let workers: Vec<Proc> = (0..4).map(|_| worker()).collect();
    // 1 MiB per worker, blocks of 16 tokens over 2 layers: 128 blocks per lane; the 64
    // requests below need about 400 at once.
    let c = coordinator(
        &dir,
        &workers,
        "2x2",
        &["--kv-cache-mb", "1", "--max-step-tokens", "96"],
    );
    let requests: Vec<(Vec<u32>, u32)> = (0..64)
        .map(|i| (ids(20 + (i * 13) % 100, i), 8 + (i as u32 * 7) % 33))
        .collect();

    let alone = offline(&dir, &requests, Some(1));

    let rt = runtime();
    let results = rt.block_on(async {
        let tasks: Vec<_> = requests
            .iter()
            .map(|(p, m)| tokio::spawn(stream_all(c.address.clone(), request(p, *m))))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, (r, a)) in results.into_iter().zip(&alone).enumerate() {
        let (tokens, logprobs) = r.unwrap_or_else(|s| panic!("request {i} failed: {s}"));
        assert_eq!(
            tokens, a.token_ids,
            "request {i}: output differs from alone"
        );
        for (x, y) in logprobs.iter().zip(a.logprobs.as_ref().unwrap()) {
            assert!(
                (x - y.logprob).abs() <= 1e-4,
                "request {i}: logprob {x} vs {}",
                y.logprob
            );
        }
    }
    let s = rt.block_on(status(&c.address));
    let preemptions: u64 = s.lanes.iter().map(|l| l.preemptions).sum();
    assert!(preemptions > 0, "the KV cache was meant to run out: {s:?}");
    assert!(s
        .lanes
        .iter()
        .all(|l| l.kv_blocks_used == 0 && l.running == 0));
}

#[test]
fn cancellation_limits_and_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model(&dir, "tiny-mixtral", |_| {});
    let workers: Vec<Proc> = (0..2).map(|_| worker()).collect();
    let c = coordinator(
        &dir,
        &workers,
        "1x2",
        &["--max-running", "1", "--max-queue", "2"],
    );
    let rt = runtime();
    rt.block_on(async {
        // A client that goes away mid-stream frees its KV blocks.
        let mut cl = client(&c.address).await;
        let mut s = cl
            .generate(request(&ids(30, 1), 4000))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        let used: u32 = status(&c.address)
            .await
            .lanes
            .iter()
            .map(|l| l.kv_blocks_used)
            .sum();
        assert!(used > 0);
        drop(s);
        let t = Instant::now();
        loop {
            let used: u32 = status(&c.address)
                .await
                .lanes
                .iter()
                .map(|l| l.kv_blocks_used)
                .sum();
            if used == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "blocks still held after cancel"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A deadline (grpc-timeout) that passes mid-stream ends it with DEADLINE_EXCEEDED and
        // frees its blocks.
        let mut r = tonic::Request::new(request(&ids(30, 2), 4000));
        r.set_timeout(Duration::from_millis(400));
        let mut s = cl.generate(r).await.unwrap().into_inner();
        let t = Instant::now();
        let end = loop {
            match s.message().await {
                Ok(Some(m)) => assert!(m.finish_reason.is_empty()),
                Ok(None) => panic!("the stream ended without an error"),
                Err(e) => break e,
            }
        };
        assert_eq!(end.code(), Code::DeadlineExceeded, "{end}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // One running per lane and two waiting in all: the rest are refused at once.
        let tasks: Vec<_> = (0..12)
            .map(|i| tokio::spawn(stream_all(c.address.clone(), request(&ids(10, i), 200))))
            .collect();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => {}
                Err(s) if s.code() == Code::ResourceExhausted => {
                    assert!(s.message().contains("queue is full"), "{}", s.message());
                    refused += 1;
                }
                Err(s) => panic!("unexpected failure: {s}"),
            }
        }
        assert!(refused > 0 && refused < 12, "{refused} refused");

        // Bad requests: INVALID_ARGUMENT saying what was wrong.
        let bad = |r: pb::GenerateRequest, says: &'static str| {
            let address = c.address.clone();
            async move {
                let e = stream_all(address, r).await.unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
                assert!(
                    e.message().contains(says),
                    "{:?} lacks {says:?}",
                    e.message()
                );
            }
        };
        bad(pb::GenerateRequest::default(), "no input").await;
        bad(
            pb::GenerateRequest {
                prompt: Some("hi".into()),
                prompt_token_ids: vec![1, 2],
                ..Default::default()
            },
            "conflicting inputs",
        )
        .await;
        bad(request(&ids(5000, 1), 4), "the model accepts at most 4096").await;
        bad(request(&ids(5, 1), 0), "max_tokens is 0").await;
        bad(
            pb::GenerateRequest {
                top_p: Some(1.5),
                ..request(&ids(5, 1), 4)
            },
            "top_p is 1.5",
        )
        .await;
        bad(request(&[7, 9999], 4), "token id 9999 is out of range").await;

        // The standard health service says SERVING.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.address))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    });
}

#[test]
fn a_worker_that_does_not_answer_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model(&dir, "tiny-mixtral", |_| {});
    // A port nobody listens on, and one that accepts connections but never speaks gRPC.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    for addr in [closed_addr, silent_addr] {
        let t = Instant::now();
        let out = Command::new(BIN)
            .args([
                "coordinator",
                "--model",
                dir.to_str().unwrap(),
                "--grid",
                "1x1",
            ])
            .args(["--grpc-addr", "127.0.0.1:0", "--workers", &addr])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains(&format!("worker {addr} did not answer")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t.elapsed()
        );
    }
}
