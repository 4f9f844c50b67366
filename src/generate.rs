//! `switchyard generate`: in this process (the reference path), or from a running cluster
//! with `--server`. Both run the one `SamplingParams` the flags map to.

use anyhow::{Context, Result};
use switchyard_coordinator::client;
use switchyard_model::{ChatMessage, Checkpoint};
use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_scheduler::Request;
use switchyard_worker::{Backend, Device, Engine, EngineConfig, Hardware};

use crate::flags::GenerateArgs;

pub fn local(a: GenerateArgs) -> Result<()> {
    match a.device {
        Device::Cpu => generate_on(a.dtype.backend(a.activations), a),
        Device::Cuda(ordinal) => {
            let dir = a
                .model
                .clone()
                .expect("clap requires --model without --server");
            let ckpt = Checkpoint::open(&dir)
                .with_context(|| format!("cannot open model directory {}", dir.display()))?;
            let backend = crate::open_gpu(ordinal)?
                .backend(ckpt.config())
                .with_context(|| format!("cannot use cuda:{ordinal}"))?;
            generate_on(backend, a)
        }
    }
}

fn generate_on<B: Backend>(backend: B, a: GenerateArgs) -> Result<()> {
    let config = EngineConfig {
        kv_cache_bytes: a.kv_cache_mb << 20,
        offload: a.offload.offload(),
        prefix_caching: a.prefix_caching.enabled(),
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
    let params = a.sampling.params();
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

/// `generate --server`: the same request over gRPC, streamed.
pub async fn remote(a: GenerateArgs) -> Result<()> {
    let server = a.server.clone().expect("checked by the caller");
    let request = pb::GenerateRequest {
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
        request_id: format!("cli-{}", std::process::id()),
        ..wire::sampling_request(a.sampling.params())
    };
    let json = a.json;
    let access = a.access.access()?;
    let out = client::generate(&server, &access, request, |m| {
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
