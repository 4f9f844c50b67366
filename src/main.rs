//! `switchyard`: the command line. It parses flags and calls the crates; nothing else lives here.

mod telemetry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use switchyard_bench::config::{self as bench_config, Api, LenDist, Load, Slo, Sweep, Target};
use switchyard_coordinator::membership::{self, EtcdMembership};
use switchyard_coordinator::{client, http, server, Cluster, ClusterConfig, Grid, PlanOptions};
use switchyard_metrics::{self as metrics, Registry};
use switchyard_model::init;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{ChatMessage, Checkpoint};
use switchyard_net::etcd::Etcd;
use switchyard_net::keys::Keys;
use switchyard_proto::v1 as pb;
use switchyard_scheduler::{Request, SamplingParams};
use switchyard_worker::registration::{self, RegistrationConfig};
use switchyard_worker::service::{spawn_worker, WorkerService};
use switchyard_worker::{
    Backend, CpuBackend, CudaHardware, Device, Engine, EngineConfig, Hardware,
};
use telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Serve Mixture-of-Experts language models across many GPUs and machines"
)]
struct Cli {
    /// Log lines as text, or as JSON objects (one per line, with span fields such as the
    /// request id) for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Export spans (requests, steps, stage forwards, expert exchanges) over OTLP/gRPC to this
    /// collector, e.g. http://127.0.0.1:4317. Trace context travels between processes as W3C
    /// `traceparent` in gRPC metadata and is taken from clients' HTTP and gRPC headers.
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make or describe model directories.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Generate from a prompt: in this process (the reference path), on the CPU or one GPU, or
    /// from a running cluster with --server.
    Generate(GenerateArgs),
    /// A coordinator and P×E workers in this process (each worker a gRPC server on loopback).
    Serve(ServeArgs),
    /// One worker process: it waits for a coordinator to assign it a part of a model.
    Worker(WorkerArgs),
    /// A coordinator over separately started workers.
    Coordinator(CoordinatorArgs),
    /// Load-test a running server (gRPC or OpenAI HTTP API): throughput, TTFT, TPOT, ITL,
    /// end-to-end latency, goodput; sweeps and plots.
    Bench(Box<BenchArgs>),
    /// A running cluster's grid, workers (memory), lanes (KV usage) and queue.
    Status {
        #[arg(long, default_value = "127.0.0.1:50051")]
        server: String,
    },
}

#[derive(Args)]
struct ClusterArgs {
    /// P×E: pipeline stages × expert shards.
    #[arg(long, default_value = "1x1")]
    grid: Grid,
    /// Address of the client gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Address of the HTTP port: OpenAI-compatible API under /v1, the dashboard at /,
    /// Prometheus metrics at /metrics, /health and /ready.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_addr: SocketAddr,
    /// KV cache per worker, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mb: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most tokens one step processes per lane (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512)]
    max_step_tokens: usize,
    /// Most sequences running at once per lane.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Deadline, in seconds, of requests that bring none (grpc-timeout).
    #[arg(long)]
    request_timeout_s: Option<f64>,
    /// A step without an answer for this long counts as a failed worker; its requests are
    /// recomputed on a new placement.
    #[arg(long, default_value_t = 10.0)]
    step_timeout_s: f64,
    /// How long a request waits for a placement (after a failure) before UNAVAILABLE.
    #[arg(long, default_value_t = 30.0)]
    recovery_timeout_s: f64,
    /// How long in-flight requests may take to finish when a worker or this coordinator
    /// drains (SIGTERM).
    #[arg(long, default_value_t = 30.0)]
    drain_grace_s: f64,
}

#[derive(Args)]
struct EtcdArgs {
    /// etcd endpoint (e.g. http://127.0.0.1:2379): membership, placement and leader election.
    #[arg(long)]
    etcd: Option<String>,
    /// The cluster's name: its keys in etcd live under /switchyard/NAME/.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Time to live of the etcd lease: how long a dead process stays registered (or leader).
    #[arg(long, default_value_t = 3)]
    lease_ttl_s: u64,
    /// The address others reach this process at, when not the one it listens on (a
    /// coordinator's: its gRPC API, where standbys forward to while it leads; required when
    /// --grpc-addr is 0.0.0.0 or [::]).
    #[arg(long)]
    advertise: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Model directory; without it, a demo tiny-mixtral made once into ~/.cache/switchyard.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the workers run: cpu; cuda:N (all on GPU N); or cuda (worker i on GPU i, as
    /// many GPUs as grid cells).
    #[arg(long, default_value = "cpu")]
    device: ServeDevices,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Where `serve` puts its workers.
#[derive(Clone, Copy)]
enum ServeDevices {
    Cpu,
    /// Worker i on GPU i.
    EachGpu,
    /// Every worker on this GPU.
    Gpu(usize),
}

impl std::str::FromStr for ServeDevices {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cuda" => Ok(ServeDevices::EachGpu),
            _ => match s.parse::<Device>()? {
                Device::Cpu => Ok(ServeDevices::Cpu),
                Device::Cuda(n) => Ok(ServeDevices::Gpu(n)),
            },
        }
    }
}

#[derive(Args)]
struct WorkerArgs {
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// Where to run: cpu, or cuda:N (GPU N; kernels compile for the assigned model's shapes
    /// and are cached on disk).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// With --etcd: how long a draining worker (SIGTERM) waits to be released.
    #[arg(long, default_value_t = 60.0)]
    drain_grace_s: f64,
}

#[derive(Args)]
struct CoordinatorArgs {
    #[arg(long)]
    model: PathBuf,
    /// Worker addresses, stage by stage: cell (p, e) is the (p·E + e)-th.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    workers: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// With --etcd, --grid is the largest grid wanted: fewer workers get the best smaller one.
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a Hugging Face model directory with seeded random weights.
    Init {
        /// One of tiny-mixtral, tiny-mistral, tiny-llama, small-mixtral.
        #[arg(long)]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Split the weights into shards of at most this many MiB (with an index file).
        #[arg(long)]
        shard_mb: Option<usize>,
    },
    /// Architecture, parameter counts, bytes per dtype and KV bytes per token.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    model: Option<PathBuf>,
    /// Generate from a running cluster at this address instead (streams the text).
    #[arg(long)]
    server: Option<String>,
    #[arg(long, group = "input", required = true)]
    prompt: Option<String>,
    /// Comma-separated token ids, fed as they are.
    #[arg(long, group = "input", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// One user message, formatted with the model's chat template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (repeatable; the string is not returned).
    #[arg(long)]
    stop: Vec<String>,
    /// Report each generated token's logprob with this many alternatives.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Report each prompt token's logprob with this many alternatives.
    #[arg(long)]
    prompt_logprobs: Option<usize>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mb: usize,
    /// Where to run: cpu, or cuda:N (GPU N; kernels compile on first use and are cached).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Args)]
struct BenchArgs {
    /// grpc://HOST:PORT (the Inference API) or http://HOST:PORT/v1 (the OpenAI API).
    #[arg(long)]
    target: Target,
    /// completions (a prompt) or chat (one user message, through the chat template).
    #[arg(long, default_value = "completions")]
    api: Api,
    /// The model named in HTTP requests (default: the server's first model).
    #[arg(long)]
    model_name: Option<String>,
    /// The model's tokenizer.json, or its model directory, to count prompt tokens exactly
    /// (default for gRPC targets: the server's Tokenize RPC; HTTP targets need it).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Requests to send (default 100 when --duration is not given either).
    #[arg(long)]
    requests: Option<usize>,
    /// Stop sending after this long (200ms, 30s, 2m); requests in flight then finish.
    #[arg(long, value_parser = bench_config::parse_duration)]
    duration: Option<Duration>,
    /// Most requests in flight at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Requests per second arriving (inf: all at once).
    #[arg(long, value_parser = bench_config::parse_rate)]
    rate: Option<f64>,
    /// Shape of the gamma distribution of gaps between arrivals: 1 is Poisson, below 1
    /// burstier, above 1 more even.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Prompt tokens, BOS and chat template included: N, uniform:LO-HI or normal:MEAN:STD
    /// (default 128; normal samples below the template's own tokens are raised to them).
    #[arg(long)]
    input_len: Option<LenDist>,
    /// Generated tokens (the server is asked to ignore EOS): N, uniform:LO-HI or
    /// normal:MEAN:STD (default 128, or the dataset's reply lengths).
    #[arg(long)]
    output_len: Option<LenDist>,
    /// Prompts from a ShareGPT JSON file or JSONL (one prompt per line) instead.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Requests sent and awaited first, not counted.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Seed of prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Goodput counts requests meeting all of these, e.g. ttft=200ms,tpot=50ms,e2e=2s.
    #[arg(long)]
    slo: Option<Slo>,
    /// Fail a request that has not finished within this long.
    #[arg(long, default_value = "300s", value_parser = bench_config::parse_duration)]
    request_timeout: Duration,
    /// One run per value: concurrency=1,4,16,64 or rate=1,2,4.
    #[arg(long)]
    sweep: Option<Sweep>,
    /// Write every figure (and every request's) to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency–throughput curve and latency distributions to this .svg file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = runtime()?;
    let service = match &cli.command {
        Command::Worker(_) => "switchyard-worker",
        Command::Coordinator(_) => "switchyard-coordinator",
        _ => "switchyard",
    };
    let _telemetry = {
        let _in_runtime = runtime.enter();
        telemetry::init(cli.log_format, cli.otlp_endpoint.as_deref(), service)?
    };
    run(cli.command, &runtime)
}

fn run(command: Command, runtime: &tokio::runtime::Runtime) -> Result<()> {
    match command {
        Command::Model(ModelCommand::Init {
            preset,
            out,
            seed,
            dtype,
            shard_mb,
        }) => {
            let config = init::preset(&preset)?;
            let Some(dtype) = Dtype::from_torch_name(&dtype) else {
                bail!("--dtype {dtype:?}: expected f32, bf16 or f16");
            };
            init::write_model_dir(&out, &config, seed, dtype, shard_mb.map(|mb| mb << 20))?;
            eprintln!(
                "wrote {preset} ({} parameters) to {}",
                config.param_counts().total,
                out.display()
            );
        }
        Command::Model(ModelCommand::Inspect { dir, json }) => inspect(&dir, json)?,
        Command::Generate(args) if args.server.is_some() => runtime.block_on(remote(args))?,
        Command::Generate(args) => generate(args)?,
        Command::Serve(args) => runtime.block_on(serve(args))?,
        Command::Worker(args) => runtime.block_on(worker(args))?,
        Command::Coordinator(args) => runtime.block_on(coordinator(args))?,
        Command::Bench(args) => runtime.block_on(bench(*args))?,
        Command::Status { server } => runtime.block_on(status(&server))?,
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Stops taking requests, lets those in flight finish within `grace`, ends the rest.
async fn drain(cluster: &Cluster, grace: Duration) {
    eprintln!("switchyard: draining (up to {grace:?})");
    cluster.stop_admitting();
    let deadline = tokio::time::Instant::now() + grace;
    while !cluster.is_idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .fail_all("the coordinator shut down before the request finished (drain grace period over)")
        .await;
}

fn cluster_config(model: PathBuf, workers: Vec<String>, a: &ClusterArgs) -> ClusterConfig {
    ClusterConfig {
        plan: PlanOptions {
            kv_bytes_per_worker: a.kv_cache_mb << 20,
            block_size: a.block_size,
        },
        max_step_tokens: a.max_step_tokens,
        max_running: a.max_running,
        max_queue: a.max_queue,
        request_timeout: a.request_timeout_s.map(Duration::from_secs_f64),
        step_timeout: seconds("--step-timeout-s", a.step_timeout_s),
        recovery_timeout: seconds("--recovery-timeout-s", a.recovery_timeout_s),
        drain_grace: seconds("--drain-grace-s", a.drain_grace_s),
        ..ClusterConfig::new(model, a.grid, workers)
    }
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

fn seconds(flag: &str, s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_else(|_| {
        eprintln!("{flag} {s}: expected a number of seconds ≥ 0");
        std::process::exit(2)
    })
}

/// Binds the HTTP port and serves it until Ctrl-C / SIGTERM. `local_workers` are the metrics
/// of workers in this process, which `/metrics` includes.
async fn spawn_http(
    cluster: &Arc<Cluster>,
    a: &ClusterArgs,
    local_workers: Vec<Arc<Registry>>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let web = bind(a.http_addr).await?;
    let router = http::router(cluster.clone(), local_workers);
    eprintln!(
        "switchyard: HTTP on {} (OpenAI API at /v1, dashboard at /, metrics at /metrics)",
        web.local_addr()?
    );
    Ok(tokio::spawn(metrics::serve_http(
        web,
        router,
        shutdown_signal(),
    )))
}

/// Starts a static cluster, then serves the client APIs until Ctrl-C or SIGTERM (then drains).
async fn run_coordinator(
    config: ClusterConfig,
    a: &ClusterArgs,
    local_workers: Vec<Arc<Registry>>,
) -> Result<()> {
    let grace = config.drain_grace;
    let cluster = Cluster::start(config).await?;
    let listener = bind(a.grpc_addr).await?;
    if let Some(s) = cluster.serving() {
        eprint!("{}", s.placement);
    }
    let _web = spawn_http(&cluster, a, local_workers).await?;
    eprintln!(
        "switchyard: listening on {} (gRPC), serving {}",
        listener.local_addr()?,
        cluster.model_name()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let leader = tokio::spawn(membership::run_static(cluster.clone(), {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }));
    serve_until_drained(cluster, listener, grace, stop_tx).await?;
    let _ = leader.await;
    Ok(())
}

/// Serves the client API until a signal, drains, tells `stop` and stops the server.
async fn serve_until_drained(
    cluster: std::sync::Arc<Cluster>,
    listener: tokio::net::TcpListener,
    grace: Duration,
    stop: tokio::sync::watch::Sender<bool>,
) -> Result<()> {
    let (server_tx, server_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(cluster.clone(), listener, async {
        let _ = server_rx.await;
    }));
    shutdown_signal().await;
    drain(&cluster, grace).await;
    let _ = stop.send(true);
    let _ = server_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r??,
        Err(_) => eprintln!("switchyard: the gRPC server did not stop within 5 s"),
    }
    eprintln!("switchyard: stopped");
    Ok(())
}

/// A coordinator of a cluster kept in etcd: leader or standby, until Ctrl-C or SIGTERM.
async fn run_etcd_coordinator(config: ClusterConfig, a: &ClusterArgs, e: &EtcdArgs) -> Result<()> {
    let url = e.etcd.as_deref().expect("checked by the caller");
    let etcd = Etcd::connect(url)?;
    let keys = Keys::new(&e.cluster)?;
    let grace = config.drain_grace;
    let cluster = Cluster::new(config)?;
    let listener = bind(a.grpc_addr).await?;
    // Proclaimed in the election: standbys forward their clients' calls to it.
    let address = match &e.advertise {
        Some(a) => a.clone(),
        None if a.grpc_addr.ip().is_unspecified() => bail!(
            "--grpc-addr {} listens on every interface: give --advertise HOST:PORT, the \
             address other coordinators reach this one's gRPC API at (standbys forward \
             their clients' calls to the leader's)",
            a.grpc_addr
        ),
        None => listener.local_addr()?.to_string(),
    };
    // The HTTP port first: its line comes before the one that says the coordinator is up.
    let _web = spawn_http(&cluster, a, Vec::new()).await?;
    eprintln!(
        "switchyard: listening on {address} (gRPC), serving {} in cluster {:?} (etcd {url})",
        cluster.model_name(),
        e.cluster
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let m = EtcdMembership {
        etcd,
        keys,
        address,
        ttl: Duration::from_secs(e.lease_ttl_s.max(1)),
    };
    let leader = tokio::spawn(membership::run_etcd(cluster.clone(), m, stop_rx));
    serve_until_drained(cluster, listener, grace, stop_tx).await?;
    let _ = leader.await;
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let model = match a.model {
        Some(m) => m,
        None => demo_model()?,
    };
    let (mut workers, mut metrics) = (Vec::new(), Vec::new());
    let any = "127.0.0.1:0".parse()?;
    for i in 0..a.cluster.grid.cells() {
        let forever = std::future::pending();
        let gpu = match a.device {
            ServeDevices::Cpu => None,
            ServeDevices::EachGpu => Some(i),
            ServeDevices::Gpu(n) => Some(n),
        };
        let w = match gpu {
            None => spawn_worker(WorkerService::new(CpuBackend), any, forever).await?,
            Some(n) => spawn_worker(WorkerService::new(open_gpu(n)?), any, forever).await?,
        };
        workers.push(w.address.to_string());
        metrics.push(w.metrics.registry.clone());
    }
    let config = cluster_config(model, workers, &a.cluster);
    run_coordinator(config, &a.cluster, metrics).await
}

async fn worker(a: WorkerArgs) -> Result<()> {
    match a.device {
        Device::Cpu => run_worker(WorkerService::new(CpuBackend), a).await,
        Device::Cuda(n) => run_worker(WorkerService::new(open_gpu(n)?), a).await,
    }
}

/// GPU `ordinal`, or an error saying why it cannot be used (no driver, no such GPU, too old).
fn open_gpu(ordinal: usize) -> Result<CudaHardware> {
    CudaHardware::open(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}: cannot use this GPU"))
}

async fn run_worker<H: Hardware>(service: WorkerService<H>, a: WorkerArgs) -> Result<()>
where
    <H::Backend as Backend>::KvCache: Sync,
{
    let control = service.control();
    let (device, (memory_bytes, _)) = (service.hardware().describe(), service.hardware().memory());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let w = spawn_worker(service, a.listen, async {
        let _ = stop_rx.await;
    })
    .await
    .with_context(|| format!("cannot listen on {}", a.listen))?;
    let (addr, task) = (w.address, w.task);
    if let Some(metrics_addr) = a.metrics_addr {
        let listener = bind(metrics_addr).await?;
        eprintln!(
            "switchyard: worker metrics on {} (/metrics)",
            listener.local_addr()?
        );
        let m = w.metrics.clone();
        let router = metrics::router(move || m.registry.render());
        tokio::spawn(metrics::serve_http(listener, router, shutdown_signal()));
    }
    eprintln!("switchyard: worker listening on {addr}");
    match &a.etcd.etcd {
        Some(url) => {
            let etcd = Etcd::connect(url)?;
            let address = a.etcd.advertise.clone().unwrap_or(addr.to_string());
            let config = RegistrationConfig {
                keys: Keys::new(&a.etcd.cluster)?,
                record: pb::WorkerRecord {
                    address,
                    device,
                    memory_bytes,
                    draining: false,
                },
                ttl: Duration::from_secs(a.etcd.lease_ttl_s.max(1)),
                grace: seconds("--drain-grace-s", a.drain_grace_s),
            };
            registration::run(etcd, config, control, shutdown_signal()).await;
        }
        None => shutdown_signal().await,
    }
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .is_err()
    {
        eprintln!("switchyard: the worker's gRPC server did not stop within 5 s");
    }
    eprintln!("switchyard: worker stopped");
    Ok(())
}

async fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let config = cluster_config(a.model, a.workers, &a.cluster);
    match a.etcd.etcd.is_some() {
        true => run_etcd_coordinator(config, &a.cluster, &a.etcd).await,
        false => run_coordinator(config, &a.cluster, Vec::new()).await,
    }
}

async fn bench(a: BenchArgs) -> Result<()> {
    let config = switchyard_bench::Config {
        target: a.target,
        api: a.api,
        model_name: a.model_name,
        tokenizer: a.tokenizer,
        requests: a.requests,
        duration: a.duration,
        load: Load {
            concurrency: a.concurrency,
            rate: a.rate,
            burstiness: a.burstiness,
        },
        sweep: a.sweep,
        input_len: a.input_len,
        output_len: a.output_len,
        dataset: a.dataset,
        warmup: a.warmup,
        seed: a.seed,
        slo: a.slo,
        request_timeout: a.request_timeout,
        json: a.json,
        plot: a.plot,
    };
    let outcome = switchyard_bench::bench(config, std::sync::Arc::new(progress_line)).await?;
    print!("{}", outcome.table());
    outcome.write_files()?;
    Ok(())
}

/// The live progress line on stderr: rewritten in place on a terminal, else one line every
/// ten seconds and one at the end (logs stay readable).
fn progress_line(p: &switchyard_bench::Progress) {
    use std::io::IsTerminal;
    let done = p.completed + p.failed;
    let finished = p.finished;
    let terminal = std::io::stderr().is_terminal();
    let secs = p.elapsed.as_secs();
    if !terminal && !finished && !secs.is_multiple_of(10) {
        return;
    }
    let total = p.total.map_or(String::new(), |t| format!("/{t}"));
    let bar = p.total.map_or(String::new(), |t| {
        let filled = (done * 20).checked_div(t).unwrap_or(0).min(20);
        format!("[{}{}] ", "#".repeat(filled), ".".repeat(20 - filled))
    });
    let elapsed = p.elapsed.as_secs_f64().max(1e-3);
    let line = format!(
        "{} {bar}{done}{total} done, {} failed, {} in flight, {:.1} req/s, {:.1} out tok/s, mean TTFT {}, bench CPU {}",
        p.label,
        p.failed,
        p.in_flight,
        p.completed as f64 / elapsed,
        p.output_tokens as f64 / elapsed,
        p.mean_ttft_ms.map_or("-".into(), |t| format!("{t:.0} ms")),
        p.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
    );
    match terminal {
        true => eprint!("\r\x1b[2K{line}{}", if finished { "\n" } else { "" }),
        false => eprintln!("{line}"),
    }
}

async fn status(server: &str) -> Result<()> {
    let s = client::status(server).await?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{}: grid {}x{}, placement epoch {}, queue depth {}",
        s.model, s.stages, s.shards, s.placement_epoch, s.queue_depth
    );
    for w in &s.workers {
        println!(
            "  worker ({}, {}) {} {}: layers {}..{}, experts {:?}, {:.1} MiB weights, {:.1} MiB resident, ready {}",
            w.stage, w.shard, w.address, w.device, w.layer_start, w.layer_end, w.experts,
            mib(w.weight_bytes), mib(w.resident_bytes), w.ready
        );
    }
    for l in &s.lanes {
        println!(
            "  lane {}: {} running, {} waiting, KV {}/{} blocks, {} preemptions",
            l.lane, l.running, l.waiting, l.kv_blocks_used, l.kv_blocks_total, l.preemptions
        );
    }
    Ok(())
}

/// The demo model of `serve` without `--model`: tiny-mixtral, made once.
fn demo_model() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --model")?;
    let dir = Path::new(&home).join(".cache/switchyard/models/tiny-mixtral");
    if !dir.join("config.json").exists() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        init::write_model_dir(&tmp, &init::preset("tiny-mixtral")?, 0, Dtype::F32, None)?;
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("cannot move the demo model into {}", dir.display()))?;
        eprintln!("switchyard: made the demo model in {}", dir.display());
    }
    Ok(dir)
}

/// `generate --server`: the same request over gRPC, streamed.
async fn remote(a: GenerateArgs) -> Result<()> {
    let server = a.server.clone().expect("checked by the caller");
    let mut request = pb::GenerateRequest {
        prompt: a.prompt.clone(),
        prompt_token_ids: a.prompt_ids.clone().unwrap_or_default(),
        messages: a
            .chat
            .iter()
            .map(|c| pb::ChatMessage {
                role: "user".into(),
                content: c.clone(),
            })
            .collect(),
        max_tokens: Some(a.max_tokens as u32),
        temperature: a.temperature,
        top_p: Some(a.top_p),
        top_k: a.top_k as u32,
        seed: a.seed,
        stop: a.stop.clone(),
        logprobs: a.logprobs.map(|n| n as u32),
        prompt_logprobs: a.prompt_logprobs.map(|n| n as u32),
        request_id: String::new(),
        ignore_eos: a.ignore_eos,
    };
    request.request_id = format!("cli-{}", std::process::id());
    let json = a.json;
    let out = client::generate(&server, request, |m| {
        if !json {
            use std::io::Write;
            print!("{}", m.text);
            let _ = std::io::stdout().flush();
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!();
    }
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let ckpt = Checkpoint::open(dir)
        .with_context(|| format!("cannot open model directory {}", dir.display()))?;
    ckpt.validate(&switchyard_model::Subset::all(ckpt.config()))?;
    let c = ckpt.config();
    let p = c.param_counts();
    let report = serde_json::json!({
        "architecture": c.arch.hf_name(),
        "config": c,
        "parameters": {"total": p.total, "active_per_token": p.active_per_token},
        "bytes_by_dtype": ckpt.bytes_by_dtype(),
        "kv_bytes_per_token": {"bf16": c.kv_bytes_per_token(Dtype::BF16), "f32": c.kv_bytes_per_token(Dtype::F32)},
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("architecture      {}", c.arch.hf_name());
    println!(
        "shape             {} layers, hidden {}, {} heads / {} KV heads × {}, intermediate {}, vocab {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    );
    if let Some(moe) = c.moe {
        println!(
            "experts           {} per layer, top-{}",
            moe.num_experts, moe.top_k
        );
    }
    println!(
        "sliding window    {}",
        c.sliding_window
            .map_or("none".to_string(), |w| w.to_string())
    );
    println!(
        "parameters        {} total, {} active per token",
        p.total, p.active_per_token
    );
    for (dtype, bytes) in ckpt.bytes_by_dtype() {
        println!("bytes ({dtype:<4})      {bytes}");
    }
    println!(
        "KV per token      {} bytes (bf16), {} bytes (f32)",
        c.kv_bytes_per_token(Dtype::BF16),
        c.kv_bytes_per_token(Dtype::F32)
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    match a.device {
        Device::Cpu => generate_on(CpuBackend, a),
        Device::Cuda(ordinal) => {
            let dir = a
                .model
                .clone()
                .expect("clap requires --model without --server");
            let ckpt = Checkpoint::open(&dir)
                .with_context(|| format!("cannot open model directory {}", dir.display()))?;
            let backend = open_gpu(ordinal)?
                .backend(ckpt.config())
                .with_context(|| format!("cannot use cuda:{ordinal}"))?;
            generate_on(backend, a)
        }
    }
}

fn generate_on<B: Backend>(backend: B, a: GenerateArgs) -> Result<()> {
    let config = EngineConfig {
        kv_cache_bytes: a.kv_cache_mb << 20,
        ..EngineConfig::default()
    };
    let model = a
        .model
        .clone()
        .expect("clap requires --model without --server");
    let mut engine = Engine::load(backend, &model, config)
        .with_context(|| format!("cannot load model directory {}", model.display()))?;
    let tokenizer = || {
        engine.tokenizer().with_context(|| {
            format!(
                "{} has no tokenizer.json; use --prompt-ids",
                model.display()
            )
        })
    };
    let prompt = match (&a.prompt, &a.prompt_ids, &a.chat) {
        (Some(text), _, _) => tokenizer()?.encode(text, true)?,
        (_, Some(ids), _) => ids.clone(),
        (_, _, Some(text)) => tokenizer()?.apply_chat(&[ChatMessage {
            role: "user".into(),
            content: text.clone(),
        }])?,
        _ => unreachable!("clap requires one input"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop,
        logprobs: a.logprobs,
        prompt_logprobs: a.prompt_logprobs,
        ignore_eos: a.ignore_eos,
    };
    let start = std::time::Instant::now();
    let out = engine
        .run(vec![Request {
            id: 0,
            prompt,
            params,
        }])?
        .pop()
        .expect("one completion per request");
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.text);
        eprintln!(
            "[{} prompt + {} generated tokens in {:.2}s, finish: {:?}]",
            out.usage.prompt_tokens,
            out.usage.completion_tokens,
            start.elapsed().as_secs_f64(),
            out.finish_reason
        );
    }
    Ok(())
}
