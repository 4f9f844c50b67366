//! `switchyard`: the command line. It parses flags ([`flags`]) and calls the crates: process
//! lifecycles live in `switchyard_coordinator::run` and `switchyard_worker::run`, the load
//! tester in `switchyard_bench`.

mod certs;
mod flags;
mod generate;
mod plan;
mod telemetry;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use switchyard_coordinator::{client, run as coordinator};
use switchyard_model::init;
use switchyard_model::quantize::{self, Scheme};
use switchyard_model::safetensors::Dtype;
use switchyard_model::Checkpoint;
use switchyard_worker::service::{spawn_worker, WorkerService};
use switchyard_worker::{run as worker, CudaHardware, Device};

use flags::{
    Cli, Command, CoordinatorArgs, ModelCommand, OffloadArgs, ServeArgs, ServeDevices, WorkerArgs,
};

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
        Command::Model(ModelCommand::Quantize {
            input,
            out,
            ty,
            no_tokenizer,
        }) => {
            let Some(scheme) = Scheme::from_name(&ty) else {
                bail!("--type {ty:?}: expected one of {}", Scheme::NAMES);
            };
            let report = quantize::quantize(&input, &out, scheme, !no_tokenizer)?;
            for f in &report.fallbacks {
                eprintln!("note: {f}");
            }
            eprintln!(
                "wrote {} ({} tensors, {} tensor bytes, tokenizer: {})",
                out.display(),
                report.tensors,
                report.tensor_bytes,
                report.tokenizer.as_deref().unwrap_or("none")
            );
        }
        Command::Model(ModelCommand::Upcycle {
            input,
            out,
            experts,
        }) => {
            let r = switchyard_model::upcycle::upcycle(&input, &out, experts)?;
            eprintln!(
                "wrote {} ({} layers of {} experts of {} neurons, {} tensors, {} tensor bytes)",
                r.weights.display(),
                r.layers,
                r.experts,
                r.expert_intermediate,
                r.tensors,
                r.tensor_bytes
            );
        }
        Command::Model(ModelCommand::Inspect { dir, json, grid }) => inspect(&dir, json, grid)?,
        Command::Generate(args) if args.server.is_some() => {
            runtime.block_on(generate::remote(args))?
        }
        Command::Generate(args) => generate::local(args)?,
        Command::Serve(args) => runtime.block_on(serve(*args))?,
        Command::Worker(args) => runtime.block_on(run_worker(*args))?,
        Command::Coordinator(args) => runtime.block_on(run_coordinator(*args))?,
        Command::Bench(args) => runtime.block_on(bench(*args))?,
        Command::Certs(args) => certs::write_all(&args)?,
        Command::Plan(args) => plan::run(&args)?,
        Command::Status { server, access } => runtime.block_on(status(&server, &access))?,
    }
    Ok(())
}

/// A coordinator and P×E workers in this process, each worker a gRPC server on loopback.
async fn serve(a: ServeArgs) -> Result<()> {
    a.cluster_tls.install()?;
    let ports = a.cluster.ports()?;
    let model = match a.model {
        Some(m) => m,
        None => demo_model()?,
    };
    // Absolute, so the workers (whose model root it is) find it wherever they resolve it.
    let model = std::fs::canonicalize(&model)
        .with_context(|| format!("--model {}: cannot open it", model.display()))?;
    let (mut workers, mut metrics) = (Vec::new(), Vec::new());
    let any = "127.0.0.1:0".parse()?;
    let cells = a.cluster.grid.cells();
    for i in 0..cells {
        // Each in-process worker keeps statistics of its own part: `experts.json` becomes
        // `experts.worker0.json`, `experts.worker1.json`, ...
        let mut offload = a.offload.clone();
        if let (Some(file), true) = (&mut offload.expert_stats, cells > 1) {
            let ext = file.extension().map(|e| e.to_string_lossy().into_owned());
            *file = file.with_extension(match ext {
                Some(ext) => format!("worker{i}.{ext}"),
                None => format!("worker{i}"),
            });
        }
        let forever = std::future::pending();
        let gpu = match a.device {
            ServeDevices::Cpu => None,
            ServeDevices::EachGpu => Some(i),
            ServeDevices::Gpu(n) => Some(n),
        };
        // The in-process workers load this model and nothing else.
        let w = match gpu {
            None => {
                let hardware = a.dtype.backend(a.activations);
                spawn_worker(service(hardware, Some(&model), &offload)?, any, forever).await?
            }
            Some(n) => {
                let hardware = open_gpu(n)?;
                spawn_worker(service(hardware, Some(&model), &offload)?, any, forever).await?
            }
        };
        workers.push(w.address.to_string());
        metrics.push(w.metrics.registry.clone());
    }
    let config = a.cluster.config(model, workers);
    Ok(coordinator::static_cluster(config, ports, metrics).await?)
}

async fn run_worker(a: WorkerArgs) -> Result<()> {
    a.cluster_tls.install()?;
    let options = a.options()?;
    let root = a.model_root.as_deref();
    match a.device {
        Device::Cpu => {
            let hardware = a.dtype.backend(a.activations);
            worker::run(service(hardware, root, &a.offload)?, options).await?
        }
        Device::Cuda(n) => worker::run(service(open_gpu(n)?, root, &a.offload)?, options).await?,
    }
    Ok(())
}

/// A worker's service on `hardware`, loading models only under `model_root` when given, with
/// its experts offloaded when `--expert-memory` is given.
fn service<H: switchyard_worker::Hardware>(
    hardware: H,
    model_root: Option<&Path>,
    offload: &OffloadArgs,
) -> Result<WorkerService<H>> {
    let service = match model_root {
        None => WorkerService::new(hardware),
        Some(root) => WorkerService::with_model_root(hardware, root)
            .with_context(|| format!("--model-root {}: cannot use it", root.display()))?,
    };
    Ok(match offload.offload() {
        Some(o) => service.with_offload(o),
        None => service,
    })
}

async fn run_coordinator(a: CoordinatorArgs) -> Result<()> {
    a.cluster_tls.install()?;
    let config = a.cluster.config(a.model, a.workers);
    let ports = a.cluster.ports()?;
    match a.etcd.member()? {
        Some(member) => coordinator::etcd_cluster(config, ports, member).await?,
        None => coordinator::static_cluster(config, ports, Vec::new()).await?,
    }
    Ok(())
}

async fn bench(a: switchyard_bench::Args) -> Result<()> {
    let progress = Arc::new(switchyard_bench::progress_line);
    let outcome = switchyard_bench::bench(a.into_config(), progress).await?;
    print!("{}", outcome.table());
    outcome.write_files()?;
    Ok(())
}

/// GPU `ordinal`, or an error saying why it cannot be used (no driver, no such GPU, too old).
fn open_gpu(ordinal: usize) -> Result<CudaHardware> {
    CudaHardware::open(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}: cannot use this GPU"))
}

async fn status(server: &str, access: &switchyard_bench::args::AccessArgs) -> Result<()> {
    let s = client::status(server, &access.access()?).await?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{}: grid {}x{}, placement epoch {}, queue depth {}",
        s.model, s.stages, s.shards, s.placement_epoch, s.queue_depth
    );
    for w in &s.workers {
        let offload = match w.resident_expert_share > 0.0 {
            true => format!(
                ", {:.0}% of its experts resident",
                100.0 * w.resident_expert_share
            ),
            false => String::new(),
        };
        println!(
            "  worker ({}, {}) {} {}: layers {}..{}, experts {:?}, {:.1} MiB weights, {:.1} MiB resident{offload}, ready {}",
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

/// What each worker of `grid` would hold: per cell, its part and the bytes of that part kept
/// as stored and in bf16, from the planner's placement (the coordinator's own, the same path
/// `switchyard plan` sizes workers by).
fn grid_parts(dir: &Path, grid: switchyard_coordinator::Grid) -> Result<serde_json::Value> {
    use switchyard_planner::memory::{place, WorkerMemory, UNLIMITED};
    let model = switchyard_planner::Model::open(dir)?;
    let as_stored = WorkerMemory {
        value_bytes: 2,
        keeps_stored_weights: true,
    };
    let gpu = WorkerMemory::of(switchyard_planner::Kind::Gpu);
    let place = |worker| place(&model, grid, worker, UNLIMITED, Default::default());
    let (as_stored, as_bf16) = (place(as_stored)?, place(gpu)?);
    Ok(as_stored
        .cells
        .iter()
        .zip(&as_bf16.cells)
        .map(|(s, b)| {
            serde_json::json!({
                "stage": s.stage,
                "shard": s.shard,
                "layers": [s.subset.layers.start, s.subset.layers.end],
                "experts": s.subset.experts,
                "embedding": s.subset.embedding,
                "head": s.subset.head,
                "stored_bytes": s.weight_bytes,
                "bf16_bytes": b.weight_bytes,
            })
        })
        .collect())
}

fn inspect(
    dir: &std::path::Path,
    json: bool,
    grid: Option<switchyard_coordinator::Grid>,
) -> Result<()> {
    let ckpt =
        Checkpoint::open(dir).with_context(|| format!("cannot open model {}", dir.display()))?;
    ckpt.validate(&switchyard_model::Subset::all(ckpt.config()))?;
    let c = ckpt.config();
    let p = c.param_counts();
    let format = match ckpt.gguf() {
        Some(g) => format!(
            "GGUF v{}, {} tensors",
            g.header().version,
            g.tensors().len()
        ),
        None => "safetensors".to_string(),
    };
    let report = serde_json::json!({
        "format": format,
        "architecture": c.arch.hf_name(),
        "config": c,
        "parameters": {"total": p.total, "active_per_token": p.active_per_token},
        "bytes_by_dtype": ckpt.bytes_by_dtype(),
        "kv_bytes_per_token": {"bf16": c.kv_bytes_per_token(Dtype::BF16), "f32": c.kv_bytes_per_token(Dtype::F32)},
    });
    let mut report = report;
    if let Some(g) = grid {
        report["grid"] = grid_parts(dir, g)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("format            {format}");
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
    if let Some(cells) = report.get("grid").and_then(|g| g.as_array()) {
        for cell in cells {
            let experts = match &cell["experts"] {
                serde_json::Value::Null => String::new(),
                e => format!(", experts {e}"),
            };
            println!(
                "worker {}.{}        layers {}..{}{experts}: {} bytes as stored, {} in bf16",
                cell["stage"],
                cell["shard"],
                cell["layers"][0],
                cell["layers"][1],
                cell["stored_bytes"],
                cell["bf16_bytes"]
            );
        }
    }
    Ok(())
}
