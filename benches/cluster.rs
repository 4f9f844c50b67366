//! Output throughput and time to first token of the cluster against the one-process engine,
//! on `small-mixtral` (f32, CPU), in one run: the engine alone, then grids 1×1 and 2×2 of
//! workers (each a real gRPC server on loopback, in this process) behind the gRPC API. After
//! the 2×2 run, the expert exchange's bytes per token per MoE layer against their floor.
//!
//! `cargo bench -p switchyard --bench cluster` (env `BENCH_CONCURRENCY`, default
//! `1,8,32,64`; `BENCH_PROMPT` 64 and `BENCH_OUTPUT` 32 tokens; `BENCH_MODEL=DIR` reuses a
//! model directory; `BENCH_TLS=1`: the cluster plane over mutual TLS and the client API over
//! TLS, with certificates from `switchyard certs`; `BENCH_TLS=both`: off, then on, in one run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use switchyard_coordinator::{server, Cluster, ClusterConfig, Grid};
use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_net::grpc::{channel, worker_client};
use switchyard_net::tls::{self, ClusterFiles, ClusterTls, Connector, ServerTls};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_scheduler::{Request, SamplingParams};
use switchyard_worker::service::{spawn_worker, WorkerService};
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((j * 7919 + i * 104_729) % 31_000 + 3) as u32)
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Run {
    tokens_per_s: f64,
    ttft_p50: f64,
    ttft_p99: f64,
}

fn engine_run(dir: &std::path::Path, n: usize, prompt_len: usize, output: usize) -> Run {
    let mut engine = Engine::load(CpuBackend::default(), dir, EngineConfig::default()).unwrap();
    let requests: Vec<Request> = (0..n)
        .map(|i| Request {
            id: i as u64,
            prompt: prompt(i, prompt_len),
            params: SamplingParams {
                max_tokens: output,
                ignore_eos: true,
                ..Default::default()
            },
        })
        .collect();
    let t = Instant::now();
    let out = engine.run(requests).unwrap();
    let tokens: usize = out.iter().map(|c| c.token_ids.len()).sum();
    Run {
        tokens_per_s: tokens as f64 / t.elapsed().as_secs_f64(),
        ttft_p50: f64::NAN,
        ttft_p99: f64::NAN,
    }
}

async fn cluster_run(address: &str, n: usize, prompt_len: usize, output: usize) -> Run {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let address = address.to_string();
            tokio::spawn(async move {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap();
                let channel = match tls::cluster() {
                    Some(t) => endpoint.connect_with_connector(Connector(t.client)).await,
                    None => endpoint.connect().await,
                };
                let mut client = InferenceClient::new(channel.unwrap());
                let request = pb::GenerateRequest {
                    prompt_token_ids: prompt(i, prompt_len),
                    max_tokens: Some(output as u32),
                    ignore_eos: true,
                    ..Default::default()
                };
                let started = Instant::now();
                let mut stream = client.generate(request).await.unwrap().into_inner();
                let (mut ttft, mut tokens) = (None, 0);
                while let Some(m) = stream.message().await.unwrap() {
                    if !m.token_ids.is_empty() && ttft.is_none() {
                        ttft = Some(started.elapsed().as_secs_f64());
                    }
                    tokens += m.token_ids.len();
                }
                (ttft.unwrap(), tokens)
            })
        })
        .collect();
    let mut ttfts = Vec::new();
    let mut tokens = 0;
    for task in tasks {
        let (ttft, n) = task.await.unwrap();
        ttfts.push(ttft);
        tokens += n;
    }
    Run {
        tokens_per_s: tokens as f64 / t.elapsed().as_secs_f64(),
        ttft_p50: percentile(&mut ttfts, 0.5),
        ttft_p99: percentile(&mut ttfts, 0.99),
    }
}

async fn start_cluster(dir: &std::path::Path, grid: Grid) -> (Arc<Cluster>, String) {
    let mut workers = Vec::new();
    for _ in 0..grid.cells() {
        let w = spawn_worker(
            WorkerService::new(CpuBackend::default()),
            "127.0.0.1:0".parse().unwrap(),
            std::future::pending(),
        )
        .await
        .unwrap();
        workers.push(w.address.to_string());
    }
    let cluster = Cluster::start(ClusterConfig::new(dir.to_path_buf(), grid, workers))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    // With TLS on, the client API serves the cluster certificate (the clients here trust the
    // cluster CA).
    let api_tls = CERTS.get().map(|dir| {
        ServerTls {
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
            client_ca: None,
        }
        .config(&[tls::H2])
        .unwrap()
    });
    tokio::spawn(server::serve(
        cluster.clone(),
        listener,
        api_tls,
        Default::default(),
        std::future::pending(),
    ));
    (cluster, address)
}

fn main() {
    let concurrency: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32,64".into())
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    let (prompt_len, output) = (env("BENCH_PROMPT", 64), env("BENCH_OUTPUT", 32));
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var("BENCH_MODEL") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => {
            write_model_dir(
                tmp.path(),
                &preset("small-mixtral").unwrap(),
                0,
                Dtype::F32,
                None,
            )
            .unwrap();
            tmp.path().to_path_buf()
        }
    };
    let config = switchyard_model::ModelConfig::load(&dir).unwrap();
    let certs = tempfile::tempdir().unwrap();
    // Off, on, or both in this process (the same weights, the same minutes).
    let modes: &[bool] = match std::env::var("BENCH_TLS").as_deref() {
        Ok("1") => &[true],
        Ok("both") => &[false, true],
        _ => &[false],
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let engine: Vec<Run> = concurrency
        .iter()
        .map(|&n| engine_run(&dir, n, prompt_len, output))
        .collect();
    for &with_tls in modes {
        if with_tls {
            install_tls(certs.path());
        }
        println!(
            "small-mixtral f32, prompt {prompt_len} tokens, {output} output tokens per stream, {} threads, TLS {}",
            rayon_threads(),
            if with_tls { "+ mTLS on" } else { "off" }
        );
        let (grids, exchange) =
            rt.block_on(run_grids(&dir, &config, &concurrency, prompt_len, output));
        print_table(&concurrency, &engine, &grids);
        if let Some(x) = exchange {
            println!("{x}");
        }
    }
}

/// Grids 1×1 and 2×2, each at every concurrency; the 2×2 exchange report.
async fn run_grids(
    dir: &std::path::Path,
    config: &switchyard_model::ModelConfig,
    concurrency: &[usize],
    prompt_len: usize,
    output: usize,
) -> (Vec<Vec<Run>>, Option<String>) {
    let (mut grids, mut exchange) = (Vec::new(), None);
    for grid in ["1x1", "2x2"] {
        let grid: Grid = grid.parse().unwrap();
        let (cluster, address) = start_cluster(dir, grid).await;
        let mut runs = Vec::new();
        for &n in concurrency {
            runs.push(cluster_run(&address, n, prompt_len, output).await);
        }
        if grid.shards > 1 {
            exchange =
                Some(exchange_report(&cluster, config, concurrency, prompt_len, output).await);
        }
        grids.push(runs);
    }
    (grids, exchange)
}

fn print_table(concurrency: &[usize], engine: &[Run], grids: &[Vec<Run>]) {
    println!("| streams | engine tok/s | 1x1 tok/s | 1x1 / engine | 1x1 TTFT p50 / p99 s | 2x2 tok/s | 2x2 / engine | 2x2 TTFT p50 / p99 s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, n) in concurrency.iter().enumerate() {
        let e = engine[i].tokens_per_s;
        let (a, b) = (&grids[0][i], &grids[1][i]);
        println!(
            "| {n} | {e:.1} | {:.1} | {:.2} | {:.2} / {:.2} | {:.1} | {:.2} | {:.2} / {:.2} |",
            a.tokens_per_s,
            a.tokens_per_s / e,
            a.ttft_p50,
            a.ttft_p99,
            b.tokens_per_s,
            b.tokens_per_s / e,
            b.ttft_p50,
            b.ttft_p99
        );
    }
}

/// Exchange traffic of the 2×2 run per token per MoE layer, against its floor: every
/// (token, remote shard) pair sends one f32 hidden vector out and gets one back.
async fn exchange_report(
    cluster: &Cluster,
    config: &switchyard_model::ModelConfig,
    concurrency: &[usize],
    prompt_len: usize,
    output: usize,
) -> String {
    let (mut bytes, mut pairs) = (0u64, 0u64);
    let serving = cluster.serving().expect("a started cluster serves");
    for cell in &serving.placement.cells {
        let mut client = worker_client(channel(&cell.address).unwrap());
        let s = client
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        bytes += s.exchange_bytes_sent + s.exchange_bytes_received;
        pairs += s.exchange_token_shard_pairs;
    }
    // Tokens through the model: every prompt token and every generated token but the last.
    let tokens: usize = concurrency
        .iter()
        .map(|n| n * (prompt_len + output - 1))
        .sum();
    let token_layers = (tokens * config.num_layers) as f64;
    let floor = pairs as f64 * 2.0 * config.hidden_size as f64 * 4.0;
    format!(
        "2x2 exchange: {:.0} bytes per token per MoE layer on the wire; floor {:.0} (f32 hidden out + back per remote shard touched); ratio {:.3}",
        bytes as f64 / token_layers,
        floor / token_layers,
        bytes as f64 / floor
    )
}

/// Where `switchyard certs` wrote this run's certificates, when TLS is on.
static CERTS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Makes certificates in `dir` and gives this process the cluster identity they hold.
fn install_tls(dir: &std::path::Path) {
    common::certs(dir);
    let files = ClusterFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    };
    tls::install_cluster(Some(ClusterTls::new(&files).unwrap()));
    CERTS.set(dir.to_path_buf()).unwrap();
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
