//! The prefix cache through `switchyard serve` with two lanes: outputs with it on equal those
//! with it off (tokens, and logprobs within 1e-6) while hits happen, which both APIs report
//! (`usage.cached_tokens`, `usage.prompt_tokens_details.cached_tokens`) and the metrics count;
//! and cache-aware routing sends a request to the lane holding its prefix where least-loaded
//! routing would not.

mod common;

use std::path::Path;

use common::{client, http, http_address, model, request, runtime, serve, Proc};
use serde_json::Value;
use switchyard_proto::v1 as pb;

const BLOCK: &str = "4";

fn ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 101) % 400 + 3) as u32)
        .collect()
}

/// `serve` of `dir` on a 1×2 grid (two lanes) with blocks of 4 tokens, and `extra` flags.
fn two_lanes(dir: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--model",
        dir.to_str().unwrap(),
        "--grid",
        "1x2",
        "--block-size",
        BLOCK,
    ];
    args.extend_from_slice(extra);
    serve(&args)
}

/// Runs a request to its end over gRPC: its tokens, logprobs (with the top ones) and usage.
async fn generate(address: &str, prompt: &[u32]) -> (Vec<u32>, Vec<pb::TokenLogprob>, pb::Usage) {
    let r = pb::GenerateRequest {
        logprobs: Some(3),
        ..request(prompt, 10)
    };
    let mut s = client(address)
        .await
        .generate(r)
        .await
        .unwrap()
        .into_inner();
    let (mut tokens, mut logprobs, mut usage) = (Vec::new(), Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        tokens.extend(m.token_ids);
        logprobs.extend(m.logprobs);
        usage = usage.or(m.usage);
    }
    (
        tokens,
        logprobs,
        usage.expect("the last message has the usage"),
    )
}

/// The value of an unlabelled counter on the server's `/metrics`.
fn counter(server: &Proc, name: &str) -> f64 {
    let (status, body) = http(&http_address(server), "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .parse()
        .unwrap()
}

#[test]
fn serve_gives_the_same_outputs_with_the_prefix_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-mixtral");
    model(&dir, "tiny-mixtral", |_| {});
    let on = two_lanes(&dir, &[]);
    let off = two_lanes(&dir, &["--no-enable-prefix-caching"]);
    // A system prompt of 6½ blocks, two questions after it, and the first one again.
    let system = ids(26, 1);
    let prompts: Vec<Vec<u32>> = [ids(9, 2), ids(14, 3), ids(9, 2)]
        .into_iter()
        .map(|q| [system.clone(), q].concat())
        .collect();
    let mut cached = Vec::new();
    runtime().block_on(async {
        for (i, p) in prompts.iter().enumerate() {
            let (t_on, lp_on, u_on) = generate(&on.address, p).await;
            let (t_off, lp_off, u_off) = generate(&off.address, p).await;
            assert_eq!(t_on, t_off, "prompt {i}: tokens differ");
            assert_eq!(lp_on.len(), lp_off.len());
            for (a, b) in lp_on.iter().zip(&lp_off) {
                assert!(
                    (a.logprob - b.logprob).abs() <= 1e-6,
                    "prompt {i}: {a:?} vs {b:?}"
                );
                for (x, y) in a.top.iter().zip(&b.top) {
                    assert_eq!(x.token_id, y.token_id, "prompt {i}");
                    assert!((x.logprob - y.logprob).abs() <= 1e-6, "prompt {i}");
                }
            }
            assert_eq!(u_off.cached_tokens, 0);
            assert_eq!(u_on.prompt_tokens, u_off.prompt_tokens);
            cached.push(u_on.cached_tokens);
        }
    });
    // The system prompt's 6 full blocks; then the repeated prompt (35 tokens) but its last.
    assert_eq!(cached, [0, 24, 32]);

    // The OpenAI API reports it as OpenAI does.
    let body = serde_json::json!({
        "model": "tiny-mixtral",
        "prompt": prompts[1],
        "max_tokens": 2,
    });
    let (status, reply) = http(
        &http_address(&on),
        "POST",
        "/v1/completions",
        &body.to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    // 40 tokens, cached from the second request with its 10 generated ones: 9 full blocks.
    assert_eq!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"], 36,
        "{reply}"
    );

    // Counted in tokens, once per request: 35 + 40 + 35 + 40 looked up, 24 + 32 + 36 found.
    assert_eq!(counter(&on, "switchyard_prefix_cache_queries_total"), 150.0);
    assert_eq!(counter(&on, "switchyard_prefix_cache_hits_total"), 92.0);
    assert_eq!(counter(&off, "switchyard_prefix_cache_queries_total"), 0.0);
}

/// Lane 0 holds the system prompt and one request that keeps running (its client reads
/// nothing, so it pauses but stays); a second question on the system prompt then finds the
/// lanes at loads 1 and 0.
fn cached_tokens_with_one_lane_busy(routing: &str) -> u32 {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-mixtral");
    model(&dir, "tiny-mixtral", |_| {});
    let server = two_lanes(&dir, &["--routing", routing]);
    let system = ids(26, 1);
    runtime().block_on(async {
        generate(&server.address, &[system.clone(), ids(9, 2)].concat()).await;
        // Both lanes idle: the busy request goes to the first, which holds the prefix.
        let mut busy = client(&server.address).await;
        let _stream = busy
            .generate(request(&ids(8, 9), 3000))
            .await
            .unwrap()
            .into_inner();
        // Wait until the lane has taken it up.
        let t = std::time::Instant::now();
        while counter(&server, "switchyard_prefix_cache_queries_total") < 43.0 {
            assert!(t.elapsed().as_secs() < 10, "the busy request never ran");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (_, _, usage) = generate(&server.address, &[system.clone(), ids(14, 3)].concat()).await;
        usage.cached_tokens
    })
}

#[test]
fn cache_aware_routing_goes_where_the_prefix_is() {
    // Least loaded: the idle second lane, which has never seen the system prompt.
    assert_eq!(cached_tokens_with_one_lane_busy("least-loaded"), 0);
    // Cache aware: the first lane, one request busier (not overloaded), holding 6 blocks.
    assert_eq!(cached_tokens_with_one_lane_busy("cache-aware"), 24);
}
