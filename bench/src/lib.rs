//! The load tester behind `switchyard bench`: it drives a running server (the gRPC API or the
//! OpenAI-compatible HTTP API) with synthetic prompts of exact token lengths or a dataset's,
//! at a fixed concurrency or a Poisson-like rate, and reports what `vllm bench serve` reports,
//! per run or per point of a sweep, as a table, JSON and an SVG plot.
//!
//! It talks to servers only through their public APIs: it depends on the proto and model
//! crates (messages, tokenizer), never on the coordinator or workers.

pub mod args;
pub mod client;
pub mod config;
pub mod plot;
pub mod prompts;
pub mod report;
pub mod run;

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use switchyard_model::Tokenizer;

pub use args::Args;
pub use client::Client;
pub use config::Config;
pub use report::Report;
pub use run::{Progress, ProgressFn};

use crate::prompts::{Counter, Synthesizer};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{flag} {value}: expected {expected}")]
    Flag {
        flag: &'static str,
        value: String,
        expected: String,
    },
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("{0}")]
    Access(String),
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("dataset {path}: {reason}")]
    Dataset { path: PathBuf, reason: String },
    #[error("{0}")]
    Prompt(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Everything a bench produced: the configuration, the model it ran against, every run.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub config: Config,
    pub model: String,
    pub runs: Vec<Report>,
}

/// Checks `config`, connects, makes the prompts, warms up, then runs each load of `config`
/// (one, or one per sweep value) in turn.
pub async fn bench(config: Config, progress: ProgressFn) -> Result<Outcome, BenchError> {
    config.validate()?;
    let dataset = match &config.dataset {
        Some(path) => Some(prompts::read_dataset(path)?),
        None => None,
    };
    let access = config
        .access
        .access()
        .map_err(|e| BenchError::Access(e.to_string()))?;
    let (client, model) =
        Client::connect(&config.target, &access, config.model_name.as_deref()).await?;
    let counter = match (&config.tokenizer, &client) {
        (Some(path), _) => {
            let file = config::tokenizer_file(path);
            let tokenizer = Tokenizer::from_file(&file).map_err(|e| BenchError::Tokenizer {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            Counter::Local(Box::new(tokenizer))
        }
        (None, Client::Grpc(c)) => Counter::Remote(c.clone()),
        (None, Client::Http(_)) => unreachable!("validate() requires --tokenizer for HTTP"),
    };
    let mut synth = Synthesizer::new(counter, config.api).await?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let input_len = config.input_len.unwrap_or(config::DEFAULT_LEN);
    // Without a request count, a pool of prompts is reused in turn until the duration ends.
    let n = config.request_count().unwrap_or(POOL);
    let (output_len, dataset) = (config.output_len, dataset.as_deref());
    let warm = prompts::make(
        &mut synth,
        config.warmup,
        input_len,
        output_len,
        dataset,
        &mut rng,
    )
    .await?;
    let prompts = prompts::make(&mut synth, n, input_len, output_len, dataset, &mut rng).await?;
    let loads = config.loads();
    if !warm.is_empty() {
        let concurrency = loads[0].concurrency.unwrap_or(warm.len());
        let outcomes = run::warm_up(
            &client,
            config.api,
            &warm,
            concurrency,
            config.request_timeout,
        )
        .await;
        let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
        if failed > 0 {
            tracing::warn!(failed, "warm-up requests failed");
        }
    }
    let plan = run::Plan {
        client: &client,
        api: config.api,
        prompts: &prompts,
        requests: config.request_count(),
        duration: config.duration,
        seed: config.seed,
        timeout: config.request_timeout,
        slo: config.slo.as_ref(),
    };
    let mut runs = Vec::new();
    for load in loads {
        runs.push(run::run(&plan, load, progress.clone()).await);
    }
    Ok(Outcome {
        config,
        model,
        runs,
    })
}

/// Prompts made for a run bounded only by its duration.
const POOL: usize = 256;

impl Outcome {
    /// The table of every run, then the sweep's summary when there are several.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for r in &self.runs {
            out.push_str(&r.to_string());
            out.push('\n');
        }
        if self.runs.len() > 1 {
            out.push_str(&report::sweep_table(&self.runs));
        }
        out
    }

    /// Writes `--json` and `--plot` where the configuration asks for them.
    pub fn write_files(&self) -> Result<(), BenchError> {
        let write = |path: &PathBuf, text: String| {
            std::fs::write(path, text).map_err(|e| BenchError::Write {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        if let Some(path) = &self.config.json {
            let text = serde_json::to_string_pretty(self).expect("reports serialize");
            write(path, text)?;
        }
        if let Some(path) = &self.config.plot {
            let title = format!("{} on {}", self.model, self.config.target);
            write(path, plot::svg(&self.runs, &title))?;
        }
        Ok(())
    }
}

/// The live progress line on stderr: rewritten in place on a terminal, else one line every
/// ten seconds and one at the end (logs stay readable).
pub fn progress_line(p: &Progress) {
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
