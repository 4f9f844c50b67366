//! The command line's flags: every subcommand's clap arguments, and what they become (the
//! crates' option structs). `main` parses them and dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use switchyard_bench::args::AccessArgs;
use switchyard_bench::config::parse_duration_or_zero;
use switchyard_coordinator::auth::{ApiKeys, RateLimit};
use switchyard_coordinator::run::Ports;
use switchyard_coordinator::{ClusterConfig, Grid, PlanOptions, Routing};
use switchyard_net::etcd::{Credentials, EtcdAccess};
use switchyard_net::process::EtcdMember;
use switchyard_net::tls::{self, ClusterFiles, ClusterTls, ServerTls};
use switchyard_scheduler::SamplingParams;
use switchyard_worker::offload::Offload;
use switchyard_worker::{CpuBackend, Device};

use crate::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Serve Mixture-of-Experts language models across many GPUs and machines"
)]
pub struct Cli {
    /// Log lines as text, or as JSON objects (one per line, with span fields such as the
    /// request id) for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Export spans (requests, steps, stage forwards, expert exchanges) over OTLP/gRPC to this
    /// collector, e.g. http://127.0.0.1:4317. Trace context travels between processes as W3C
    /// `traceparent` in gRPC metadata and is taken from clients' HTTP and gRPC headers.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of its largest variant (generate's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Make or describe model directories.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Generate from a prompt: in this process (the reference path), on the CPU or one GPU, or
    /// from a running cluster with --server.
    Generate(GenerateArgs),
    /// A coordinator and P×E workers in this process (each worker a gRPC server on loopback).
    Serve(Box<ServeArgs>),
    /// One worker process: it waits for a coordinator to assign it a part of a model.
    Worker(Box<WorkerArgs>),
    /// A coordinator over separately started workers.
    Coordinator(Box<CoordinatorArgs>),
    /// Load-test a running server (gRPC or OpenAI HTTP API): throughput, TTFT, TPOT, ITL,
    /// end-to-end latency, goodput; sweeps and plots.
    Bench(Box<switchyard_bench::Args>),
    /// Make a CA and certificates for a trial cluster: for the client ports (--tls-cert),
    /// the cluster plane (--cluster-ca/--cluster-cert) and a client (--tls-client-ca).
    Certs(CertsArgs),
    /// Which grid, on which hardware, at what memory per worker, speed and cost: predicted
    /// before buying, with the coordinator's own placement.
    Plan(Box<PlanArgs>),
    /// A running cluster's grid, workers (memory), lanes (KV usage) and queue.
    Status {
        /// HOST:PORT, http://HOST:PORT or https://HOST:PORT of the gRPC API.
        #[arg(long, default_value = "127.0.0.1:50051")]
        server: String,
        #[command(flatten)]
        access: AccessArgs,
    },
}

#[derive(Args)]
pub struct ClusterArgs {
    /// P×E: pipeline stages × expert shards.
    #[arg(long, default_value = "1x1")]
    pub grid: Grid,
    /// Address of the client gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of the HTTP port: OpenAI-compatible API under /v1, the dashboard at /,
    /// Prometheus metrics at /metrics, /health and /ready.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// KV cache per worker, in MiB.
    #[arg(long, default_value_t = 256)]
    pub kv_cache_mb: u64,
    /// Tokens per KV block (1 to 1024).
    #[arg(long, default_value_t = 16, value_parser = block_size)]
    pub block_size: usize,
    /// Most tokens one step processes per lane (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub max_step_tokens: usize,
    /// Most sequences running at once per lane.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_running: usize,
    #[command(flatten)]
    pub prefix_caching: PrefixCachingArgs,
    /// How a request picks its lane: `cache-aware` (the lane whose prefix cache holds the
    /// longest prefix of its prompt, unless that lane is overloaded; then the least loaded),
    /// or `least-loaded`.
    #[arg(long, default_value = "cache-aware")]
    pub routing: RoutingArg,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Deadline of requests that bring none (grpc-timeout), e.g. 500ms, 30s, 2m (a plain
    /// number is seconds).
    #[arg(long = "request-timeout", alias = "request-timeout-s", value_parser = duration)]
    pub request_timeout: Option<Duration>,
    /// A step without an answer for this long counts as a failed worker; its requests are
    /// recomputed on a new placement.
    #[arg(long = "step-timeout", alias = "step-timeout-s", default_value = "10s", value_parser = duration)]
    pub step_timeout: Duration,
    /// How long a request waits for a placement (after a failure) before UNAVAILABLE.
    #[arg(long = "recovery-timeout", alias = "recovery-timeout-s", default_value = "30s", value_parser = duration)]
    pub recovery_timeout: Duration,
    /// How long in-flight requests may take to finish when a worker or this coordinator
    /// drains (SIGTERM).
    #[arg(long = "drain-grace", alias = "drain-grace-s", default_value = "30s", value_parser = duration)]
    pub drain_grace: Duration,
    #[command(flatten)]
    pub front: FrontDoorArgs,
}

/// TLS and API keys of the client ports: the gRPC API and the HTTP port.
#[derive(Args)]
pub struct FrontDoorArgs {
    /// Serve the client gRPC API and the HTTP port over TLS with this certificate (PEM, leaf
    /// first); read again when the file changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM; may hold several) on both ports.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Accept this API key (repeatable): clients send `Authorization: Bearer KEY` (HTTP) or
    /// `authorization` metadata (gRPC). Command lines are visible to local users: prefer
    /// --api-key-file.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// Accept the API keys in this file, one a line (# starts a comment).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Require an API key for /health, /ready, /metrics, the dashboard and the gRPC health
    /// service too (open by default, for probes and scrapers).
    #[arg(long)]
    pub auth_health: bool,
    /// Requests each API key may start: N (per second), N/s, N/min or N/h; more are refused
    /// with HTTP 429 (Retry-After) or RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "RATE")]
    pub api_key_rate_limit: Option<RateLimit>,
}

/// Mutual TLS on the cluster plane (coordinator ↔ workers ↔ workers): every process presents
/// a certificate the cluster CA signed and accepts only such certificates.
#[derive(Args)]
pub struct ClusterTlsArgs {
    /// The cluster CA (PEM).
    #[arg(long, requires_all = ["cluster_cert", "cluster_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// This process's certificate, signed by the cluster CA (PEM); read again when it changes.
    #[arg(long, requires = "cluster_ca")]
    pub cluster_cert: Option<PathBuf>,
    /// The private key of --cluster-cert (PEM).
    #[arg(long, requires = "cluster_ca")]
    pub cluster_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write into (made when missing). A CA already there (ca.pem, ca.key) signs
    /// the new certificates: run again to renew them.
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the server certificates are valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
    pub hosts: Vec<String>,
    /// How long the new certificates are valid, in days.
    #[arg(long, default_value_t = 90)]
    pub days: u32,
}

/// The longest time a serving flag takes: deadlines computed from it stay far from overflow.
const MAX_SERVING_TIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A serving time (timeouts, grace periods, lease times): `500ms`, `30s`, `2m` or seconds, 0
/// to a year.
fn duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s).map_err(|e| e.to_string())?;
    match d <= MAX_SERVING_TIME {
        true => Ok(d),
        false => Err(format!(
            "{s} is more than a year; expected at most 365 days"
        )),
    }
}

/// A count that must be at least 1 (0 would leave every request waiting).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s} is not a whole number of at least 1")),
    }
}

/// Tokens per KV block: as many as the workers take.
fn block_size(s: &str) -> Result<usize, String> {
    let max = switchyard_worker::checks::MAX_BLOCK_SIZE as usize;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s} is not a block size; expected 1 to {max} tokens"
        )),
    }
}

#[derive(Args)]
pub struct EtcdArgs {
    /// etcd endpoint (e.g. http://127.0.0.1:2379): membership, placement and leader election.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The cluster's name: its keys in etcd live under /switchyard/NAME/.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Time to live of the etcd lease: how long a dead process stays registered (or leader);
    /// at least 1s.
    #[arg(long = "lease-ttl", alias = "lease-ttl-s", default_value = "3s", value_parser = duration)]
    pub lease_ttl: Duration,
    /// The address others reach this process at, when not the one it listens on (a
    /// coordinator's: its gRPC API, where standbys forward to while it leads; required when
    /// --grpc-addr is 0.0.0.0 or [::]).
    #[arg(long)]
    pub advertise: Option<String>,
    /// etcd's CA (PEM): talk to etcd over TLS (give an https:// --etcd URL).
    #[arg(long, requires = "etcd")]
    pub etcd_ca: Option<PathBuf>,
    /// This process's client certificate for etcd (PEM; etcd's --client-cert-auth).
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Log in to etcd as this user (etcd's own authentication).
    #[arg(long, requires = "etcd")]
    pub etcd_user: Option<String>,
    /// The password of --etcd-user. Command lines are visible to local users: prefer
    /// --etcd-password-file.
    #[arg(long, requires = "etcd_user", conflicts_with = "etcd_password_file")]
    pub etcd_password: Option<String>,
    /// A file holding the password of --etcd-user (its first line).
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

/// Expert offload: how much of the experts a worker keeps resident.
#[derive(Args, Clone, Default)]
pub struct OffloadArgs {
    /// Keep at most this much of the experts resident (e.g. 512MiB, 6GiB) and read the others
    /// from the checkpoint file when tokens are routed to them. Absent: every expert resident.
    #[arg(long, value_parser = expert_memory)]
    pub expert_memory: Option<u64>,
    /// With --expert-memory: do not read the next layer's likely experts ahead (they are
    /// guessed by applying its router to the current hidden state).
    #[arg(long, requires = "expert_memory")]
    pub no_prefetch: bool,
    /// With --expert-memory: routing statistics (JSON). Read at load, to keep the hottest
    /// experts resident before taking traffic; written as tokens are routed and at exit.
    #[arg(long, requires = "expert_memory")]
    pub expert_stats: Option<PathBuf>,
}

fn expert_memory(s: &str) -> Result<u64, String> {
    switchyard_planner::units::parse_bytes("--expert-memory", s).map_err(|e| e.to_string())
}

impl OffloadArgs {
    pub fn offload(&self) -> Option<Offload> {
        self.expert_memory.map(|budget_bytes| Offload {
            budget_bytes,
            prefetch: !self.no_prefetch,
            stats_file: self.expert_stats.clone(),
        })
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory; without it, a demo tiny-mixtral made once into ~/.cache/switchyard.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    /// Where the workers run: cpu; cuda:N (all on GPU N); or cuda (worker i on GPU i, as
    /// many GPUs as grid cells).
    #[arg(long, default_value = "cpu")]
    pub device: ServeDevices,
    #[arg(long, default_value = "auto")]
    pub dtype: CpuDtype,
    #[arg(long, default_value = "f32")]
    pub activations: CpuActivations,
    #[command(flatten)]
    pub offload: OffloadArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// How a CPU worker multiplies activations by quantized weights (`--activations`): `f32`
/// (weights dequantized in registers, exact up to f32 rounding) or `q8` (activations quantized
/// to 8 bits per block and integer dot products, as llama.cpp does: faster, about 0.5% error
/// per product).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuActivations {
    F32,
    Q8,
}

/// How a CPU worker keeps its weights (`--dtype`): `auto` in the type the checkpoint stores
/// them in (bf16 stays bf16, GGUF blocks stay blocks; computed in f32), `f32` widened to f32
/// (the exact reference path, for checks). A GPU keeps bf16 whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuDtype {
    Auto,
    F32,
}

impl CpuDtype {
    pub fn backend(self, activations: CpuActivations) -> CpuBackend {
        let b = match self {
            CpuDtype::Auto => CpuBackend::default(),
            CpuDtype::F32 => CpuBackend::exact_f32(),
        };
        match activations {
            CpuActivations::F32 => b,
            CpuActivations::Q8 => b.q8_activations(),
        }
    }
}

/// Where `serve` puts its workers.
#[derive(Clone, Copy)]
pub enum ServeDevices {
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
pub struct WorkerArgs {
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Where to run: cpu, or cuda:N (GPU N; kernels compile for the assigned model's shapes
    /// and are cached on disk).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, default_value = "auto")]
    pub dtype: CpuDtype,
    #[arg(long, default_value = "f32")]
    pub activations: CpuActivations,
    #[command(flatten)]
    pub offload: OffloadArgs,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Load only model directories under this one (symbolic links out of it are refused).
    /// Without it the worker loads any directory a coordinator names that it can read.
    #[arg(long)]
    pub model_root: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    /// With --etcd: how long a draining worker (SIGTERM) waits to be released.
    #[arg(long = "drain-grace", alias = "drain-grace-s", default_value = "60s", value_parser = duration)]
    pub drain_grace: Duration,
}

#[derive(Args)]
pub struct CoordinatorArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Worker addresses, stage by stage: cell (p, e) is the (p·E + e)-th.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    pub workers: Vec<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// With --etcd, --grid is the largest grid wanted: fewer workers get the best smaller one.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
}

#[derive(Subcommand)]
pub enum ModelCommand {
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
    /// Convert a Hugging Face safetensors directory to a GGUF file (llama.cpp's layout),
    /// streaming tensor by tensor.
    Quantize {
        /// The model directory (config.json, safetensors, tokenizer.json).
        #[arg(long = "in")]
        input: PathBuf,
        /// The GGUF file to write.
        #[arg(long)]
        out: PathBuf,
        /// q8_0, q4_0, q4_1, q4_k_m, q6_k, f16, bf16 or f32.
        #[arg(long = "type")]
        ty: String,
        /// Write the weights only, without the tokenizer.
        #[arg(long)]
        no_tokenizer: bool,
    },
    /// Turn a dense Llama-architecture model (safetensors directory or GGUF) into an
    /// equivalent Mixtral-architecture one: each expert a slice of the FFN, a zero router, every
    /// expert used. Not a trained MoE: a real model whose tokens visit every expert shard.
    Upcycle {
        /// The dense model: a directory (config.json, safetensors), a .gguf file, or a
        /// directory holding one.
        #[arg(long = "in")]
        input: PathBuf,
        /// The directory to write (new or empty).
        #[arg(long)]
        out: PathBuf,
        /// Experts per layer; must divide the intermediate size (in whole quantization
        /// blocks for a quantized down projection).
        #[arg(long, default_value_t = 8)]
        experts: usize,
    },
    /// Architecture, parameter counts, bytes per dtype and KV bytes per token.
    Inspect {
        /// A model directory, a .gguf file, or a directory holding one.
        dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also show what each worker of this grid (PxE) would hold, placed as the coordinator
        /// places it: its layers and experts, and their bytes as stored (a CPU worker) and in
        /// bf16 (a GPU worker).
        #[arg(long)]
        grid: Option<switchyard_coordinator::Grid>,
    },
}

#[derive(Args)]
pub struct PlanArgs {
    /// A preset of a published model's shapes (mixtral-8x7b, mixtral-8x22b, mistral-7b,
    /// llama-2-7b, llama-2-13b, llama-2-70b, or model init's tiny-* and small-mixtral), a
    /// model directory or .gguf file, or org/name from the Hugging Face cache.
    #[arg(long)]
    pub model: String,
    /// Devices to plan for (repeatable): a catalog name with a count, e.g. 8xA10G or 2xH100
    /// (fields overridable: 8xA10G,price=1.5), or a device described whole, e.g.
    /// mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2 (kind=cpu for a CPU host).
    #[arg(long, required = true)]
    pub hardware: Vec<String>,
    /// Weight storage to plan for (repeatable): q8_0, q4_0, q4_1, q4_k_m, q6_k, f16, bf16, f32.
    /// Default: bf16 for a preset, the stored types for a checkpoint. GPU workers hold bf16
    /// whatever is stored (the CUDA backend's only weight type).
    #[arg(long)]
    pub dtype: Vec<String>,
    /// KV tokens each sequence may hold (prompt and output).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub context: usize,
    /// Sequences decoding at once, over the whole deployment.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub concurrency: usize,
    /// Prompt tokens for the time to first token (at most --context).
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub prompt: usize,
    /// Decode tokens per second each stream should get: candidates meeting it rank first.
    #[arg(long)]
    pub target_tps: Option<f64>,
    /// Tokens per KV block (1 to 1024), as served.
    #[arg(long, default_value_t = 16, value_parser = block_size)]
    pub block_size: usize,
    /// Most tokens one step processes per lane, as served (prefill chunks).
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    pub max_step_tokens: usize,
    /// Rows of the table (the best ones); --json has every candidate.
    #[arg(long, default_value_t = 15, value_parser = at_least_one)]
    pub top: usize,
    /// Every candidate as JSON, with the catalog rows used.
    #[arg(long)]
    pub json: bool,
}

/// `--enable-prefix-caching` (the default) and `--no-enable-prefix-caching`, as vLLM spells
/// them; the last one given wins.
#[derive(Args)]
pub struct PrefixCachingArgs {
    /// Reuse the KV cache of full blocks (--block-size tokens) that a prompt shares with an
    /// earlier one, kept until the blocks are needed (on by default).
    #[arg(
        long = "enable-prefix-caching",
        overrides_with = "no_enable_prefix_caching"
    )]
    enable_prefix_caching: bool,
    /// Compute every prompt in full: no KV block is shared or kept.
    #[arg(
        long = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching"
    )]
    no_enable_prefix_caching: bool,
}

impl PrefixCachingArgs {
    pub fn enabled(&self) -> bool {
        !self.no_enable_prefix_caching
    }
}

/// `--routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingArg {
    CacheAware,
    LeastLoaded,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    pub model: Option<PathBuf>,
    /// Generate from a running cluster at this address instead (streams the text):
    /// HOST:PORT, http://HOST:PORT or https://HOST:PORT of its gRPC API.
    #[arg(long)]
    pub server: Option<String>,
    /// TLS and the API key, for --server.
    #[command(flatten)]
    pub access: AccessArgs,
    #[arg(long, group = "input", required = true)]
    pub prompt: Option<String>,
    /// Comma-separated token ids, fed as they are.
    #[arg(long, group = "input", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// One user message, formatted with the model's chat template.
    #[arg(long, group = "input")]
    pub chat: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mb: usize,
    #[command(flatten)]
    pub prefix_caching: PrefixCachingArgs,
    /// Where to run: cpu, or cuda:N (GPU N; kernels compile on first use and are cached).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, default_value = "auto")]
    pub dtype: CpuDtype,
    #[arg(long, default_value = "f32")]
    pub activations: CpuActivations,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// The sampling flags of `generate`: one mapping to [`SamplingParams`], which the in-process
/// path runs and the `--server` path sends.
#[derive(Args)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable; the string is not returned).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Report each generated token's logprob with this many alternatives.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Report each prompt token's logprob with this many alternatives.
    #[arg(long)]
    pub prompt_logprobs: Option<usize>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// OpenAI's: lower a generated token's logit by this once (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI's: lower a generated token's logit by this per time generated (-2 to 2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Hugging Face's, over prompt and output (> 0; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// TOKEN=BIAS: add BIAS (-100 to 100) to the token's logit (repeatable).
    #[arg(long, value_parser = logit_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Generate at least this many tokens before EOS or a stop token.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Comma-separated token ids that end the generation as EOS does.
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    /// A word the output must not contain (repeatable; needs the model's tokenizer).
    #[arg(long)]
    pub bad_words: Vec<String>,
    /// A token sequence the output must not contain, comma-separated (repeatable).
    #[arg(long, value_parser = token_ids)]
    pub bad_word_ids: Vec<TokenIds>,
}

/// A comma-separated list of token ids, one value of a repeatable flag.
#[derive(Clone, Debug)]
pub struct TokenIds(pub Vec<u32>);

fn token_ids(s: &str) -> Result<TokenIds, String> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| format!("{t:?} is not a token id: {e}"))
        })
        .collect::<Result<_, _>>()
        .map(TokenIds)
}

fn logit_bias(s: &str) -> Result<(u32, f32), String> {
    let (t, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TOKEN=BIAS"))?;
    let t = t
        .trim()
        .parse()
        .map_err(|e| format!("{t:?} is not a token id: {e}"))?;
    let b = b
        .trim()
        .parse()
        .map_err(|e| format!("{b:?} is not a number: {e}"))?;
    Ok((t, b))
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            ignore_eos: self.ignore_eos,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logit_bias: self.logit_bias.clone(),
            min_tokens: self.min_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            bad_words: self.bad_words.clone(),
            bad_word_ids: self.bad_word_ids.iter().map(|w| w.0.clone()).collect(),
        }
    }
}

impl ClusterArgs {
    /// The cluster these flags describe, over `model` and `workers`.
    pub fn config(&self, model: PathBuf, workers: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            plan: PlanOptions {
                kv_bytes_per_worker: self.kv_cache_mb << 20,
                block_size: self.block_size,
            },
            max_step_tokens: self.max_step_tokens,
            max_running: self.max_running,
            prefix_caching: self.prefix_caching.enabled(),
            routing: match self.routing {
                RoutingArg::CacheAware => Routing::CacheAware,
                RoutingArg::LeastLoaded => Routing::LeastLoaded,
            },
            max_queue: self.max_queue,
            request_timeout: self.request_timeout,
            step_timeout: self.step_timeout,
            recovery_timeout: self.recovery_timeout,
            drain_grace: self.drain_grace,
            ..ClusterConfig::new(model, self.grid, workers)
        }
    }

    /// The client ports, their TLS and the API keys (reading --api-key-file).
    pub fn ports(&self) -> anyhow::Result<Ports> {
        let f = &self.front;
        let mut keys = f.api_keys.clone();
        if let Some(path) = &f.api_key_file {
            keys.extend(ApiKeys::read_file(path)?);
        }
        if f.api_key_rate_limit.is_some() && keys.iter().all(String::is_empty) {
            anyhow::bail!(
                "--api-key-rate-limit limits each API key, but none is given: add --api-key \
                 or --api-key-file"
            );
        }
        let tls = match (&f.tls_cert, &f.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: f.tls_client_ca.clone(),
            }),
            _ => None,
        };
        Ok(Ports {
            grpc: self.grpc_addr,
            http: self.http_addr,
            tls,
            keys: std::sync::Arc::new(
                ApiKeys::new(keys, f.auth_health).with_rate_limit(f.api_key_rate_limit),
            ),
        })
    }
}

impl ClusterTlsArgs {
    /// Gives this process its cluster identity, when the flags name one (reading the files
    /// now, so a bad one stops the start).
    pub fn install(&self) -> anyhow::Result<()> {
        let (Some(ca), Some(cert), Some(key)) =
            (&self.cluster_ca, &self.cluster_cert, &self.cluster_key)
        else {
            return Ok(());
        };
        let files = ClusterFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        tls::install_cluster(Some(ClusterTls::new(&files)?));
        Ok(())
    }
}

impl EtcdArgs {
    /// How this process joins its cluster in etcd, when --etcd is given (reading the TLS and
    /// password files now).
    pub fn member(&self) -> anyhow::Result<Option<EtcdMember>> {
        let Some(url) = self.etcd.clone() else {
            return Ok(None);
        };
        let tls = match &self.etcd_ca {
            Some(ca) => {
                let identity = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
                Some(tls::client_config(ca, identity)?)
            }
            None => None,
        };
        let password = match (&self.etcd_password, &self.etcd_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("--etcd-password-file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => String::new(),
        };
        let user = self
            .etcd_user
            .clone()
            .map(|user| Credentials { user, password });
        Ok(Some(EtcdMember {
            url,
            cluster: self.cluster.clone(),
            lease_ttl: self.lease_ttl,
            advertise: self.advertise.clone(),
            access: EtcdAccess { tls, user },
        }))
    }
}

impl WorkerArgs {
    pub fn options(&self) -> anyhow::Result<switchyard_worker::run::Options> {
        Ok(switchyard_worker::run::Options {
            listen: self.listen,
            metrics_addr: self.metrics_addr,
            etcd: self.etcd.member()?,
            drain_grace: self.drain_grace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("switchyard").chain(args.iter().copied()))
    }

    fn coordinator(args: &[&str]) -> CoordinatorArgs {
        let mut all = vec!["coordinator", "--model", "m", "--etcd", "http://e:1"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Coordinator(c) => *c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn expert_memory_on_generate_serve_and_worker() {
        let offload = |args: &[&str]| match parse(args).unwrap().command {
            Command::Generate(a) => a.offload.offload(),
            Command::Serve(a) => a.offload.offload(),
            Command::Worker(a) => a.offload.offload(),
            _ => unreachable!(),
        };
        let generate = ["generate", "--model", "m", "--prompt", "x"];
        assert_eq!(offload(&generate), None);
        let o = offload(&[&generate[..], &["--expert-memory", "512MiB"]].concat()).unwrap();
        assert_eq!(
            (o.budget_bytes, o.prefetch, o.stats_file),
            (512 << 20, true, None)
        );
        let o = offload(&["serve", "--expert-memory", "6GiB", "--no-prefetch"]).unwrap();
        assert_eq!((o.budget_bytes, o.prefetch), (6 << 30, false));
        let o = offload(&[
            "worker",
            "--expert-memory",
            "1GB",
            "--expert-stats",
            "s.json",
        ])
        .unwrap();
        assert_eq!(o.budget_bytes, 1_000_000_000);
        assert_eq!(o.stats_file, Some(PathBuf::from("s.json")));
        // Prefetch and statistics mean nothing without a budget.
        assert!(parse(&["worker", "--no-prefetch"]).is_err());
        assert!(parse(&["worker", "--expert-stats", "s.json"]).is_err());
        let e = parse(&["worker", "--expert-memory", "lots"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("expected a number with a unit"), "{e}");
    }

    #[test]
    fn durations_take_units_and_the_old_flag_names() {
        let c = coordinator(&[]);
        assert_eq!(c.cluster.step_timeout, Duration::from_secs(10));
        assert_eq!(c.cluster.drain_grace, Duration::from_secs(30));
        assert_eq!(c.cluster.request_timeout, None);
        assert_eq!(c.etcd.lease_ttl, Duration::from_secs(3));
        let c = coordinator(&[
            "--step-timeout-s",
            "2",
            "--recovery-timeout",
            "1.5s",
            "--drain-grace-s",
            "500ms",
            "--request-timeout",
            "2m",
            "--lease-ttl-s",
            "0",
        ]);
        assert_eq!(c.cluster.step_timeout, Duration::from_secs(2));
        assert_eq!(c.cluster.recovery_timeout, Duration::from_millis(1500));
        assert_eq!(c.cluster.drain_grace, Duration::from_millis(500));
        assert_eq!(c.cluster.request_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.etcd.lease_ttl, Duration::ZERO);
        let w = match parse(&["worker", "--drain-grace-s", "45"]).unwrap().command {
            Command::Worker(w) => w,
            _ => unreachable!(),
        };
        assert_eq!(w.drain_grace, Duration::from_secs(45));
        for flag in ["--drain-grace-s", "--step-timeout", "--request-timeout-s"] {
            let arg = format!("{flag}=-1");
            let e = parse(&["serve", &arg]).err().unwrap().to_string();
            let name = flag.trim_end_matches("-s");
            assert!(
                e.contains(name) && e.contains("a time such as 200ms, 1.5s, 2m"),
                "{e}"
            );
        }
    }
}
