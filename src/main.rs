//! `switchyard`: the command line. It parses flags and calls the crates; nothing else lives here.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use switchyard_model::init;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{ChatMessage, Checkpoint};
use switchyard_worker::{
    Backend, CpuBackend, CudaBackend, Device, Engine, EngineConfig, Request, SamplingParams,
};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Serve Mixture-of-Experts language models across many GPUs and machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make or describe model directories.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Generate from a prompt in this process (the reference path), on the CPU or one GPU.
    Generate(GenerateArgs),
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
    #[arg(long)]
    model: PathBuf,
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
        Command::Generate(args) => generate(args)?,
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
            let ckpt = Checkpoint::open(&a.model)
                .with_context(|| format!("cannot open model directory {}", a.model.display()))?;
            let c = ckpt.config();
            let backend = CudaBackend::new(ordinal, c.head_dim, c.num_heads, c.num_kv_heads)
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
    let mut engine = Engine::load(backend, &a.model, config)
        .with_context(|| format!("cannot load model directory {}", a.model.display()))?;
    let tokenizer = || {
        engine.tokenizer().with_context(|| {
            format!(
                "{} has no tokenizer.json; use --prompt-ids",
                a.model.display()
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
