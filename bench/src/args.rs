//! `switchyard bench`'s flags: the binary flattens [`Args`] into its command and hands
//! [`Args::into_config`] to [`crate::bench`].

use std::path::PathBuf;
use std::time::Duration;

use switchyard_net::api_client::ApiAccess;

use crate::config::{self, Api, Config, LenDist, Load, Slo, Sweep, Target};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// grpc://HOST:PORT (the Inference API) or http://HOST:PORT/v1 (the OpenAI API).
    #[arg(long)]
    pub target: Target,
    /// completions (a prompt) or chat (one user message, through the chat template).
    #[arg(long, default_value = "completions")]
    pub api: Api,
    /// The model named in HTTP requests (default: the server's first model).
    #[arg(long)]
    pub model_name: Option<String>,
    /// The model's tokenizer.json, or its model directory, to count prompt tokens exactly
    /// (default for gRPC targets: the server's Tokenize RPC; HTTP targets need it).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Requests to send (default 100 when --duration is not given either).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Stop sending after this long (200ms, 30s, 2m); requests in flight then finish.
    #[arg(long, value_parser = config::parse_duration)]
    pub duration: Option<Duration>,
    /// Most requests in flight at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests per second arriving (inf: all at once).
    #[arg(long, value_parser = config::parse_rate)]
    pub rate: Option<f64>,
    /// Shape of the gamma distribution of gaps between arrivals: 1 is Poisson, below 1
    /// burstier, above 1 more even.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Prompt tokens, BOS and chat template included: N, uniform:LO-HI or normal:MEAN:STD
    /// (default 128; normal samples below the template's own tokens are raised to them).
    #[arg(long)]
    pub input_len: Option<LenDist>,
    /// Generated tokens (the server is asked to ignore EOS): N, uniform:LO-HI or
    /// normal:MEAN:STD (default 128, or the dataset's reply lengths).
    #[arg(long)]
    pub output_len: Option<LenDist>,
    /// Prompts from a ShareGPT JSON file or JSONL (one prompt per line) instead.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Requests sent and awaited first, not counted.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Seed of prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput counts requests meeting all of these, e.g. ttft=200ms,tpot=50ms,e2e=2s.
    #[arg(long)]
    pub slo: Option<Slo>,
    /// Fail a request that has not finished within this long (200ms, 30s, 2m).
    #[arg(long, default_value = "300s", value_parser = config::parse_duration)]
    pub request_timeout: Duration,
    /// One run per value: concurrency=1,4,16,64 or rate=1,2,4.
    #[arg(long)]
    pub sweep: Option<Sweep>,
    /// Write every figure (and every request's) to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the latency–throughput curve and latency distributions to this .svg file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// How to reach a server whose client ports want TLS, a client certificate or an API key:
/// the flags of every command that talks to a running server (`bench`, `generate --server`,
/// `status`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// The CA that signed the server's certificate: TLS to a HOST:PORT address (an https://
    /// or grpcs:// address uses the system's CA bundle without it).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate, for a server started with --tls-client-ca.
    #[arg(long, requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// The API key, sent as `Authorization: Bearer KEY` (default: the SWITCHYARD_API_KEY
    /// environment variable, which keeps it out of the process list).
    #[arg(long)]
    pub api_key: Option<String>,
    /// A file whose first line (blank lines and `#` comments skipped) is the API key.
    #[arg(long, conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
}

/// The API key file of `--api-key-file` could not be read or holds no key.
#[derive(Debug, thiserror::Error)]
#[error("--api-key-file {path}: {reason}")]
pub struct KeyFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl AccessArgs {
    /// What these flags say, the key read from its file or the environment.
    pub fn access(&self) -> Result<ApiAccess, KeyFileError> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(path)) => {
                let bad = |reason: String| KeyFileError {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                let key = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .ok_or_else(|| bad("expected a key on a line of its own, found none".into()))?;
                Some(key.to_string())
            }
            (None, None) => std::env::var("SWITCHYARD_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
        };
        Ok(ApiAccess {
            ca: self.tls_ca.clone(),
            identity: self
                .tls_client_cert
                .clone()
                .zip(self.tls_client_key.clone()),
            api_key,
        })
    }

    /// Whether a certificate flag asks for TLS.
    pub fn wants_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_client_cert.is_some()
    }
}

impl Args {
    /// The run these flags ask for (checked by [`Config::validate`] when it starts).
    pub fn into_config(self) -> Config {
        Config {
            target: self.target,
            api: self.api,
            model_name: self.model_name,
            tokenizer: self.tokenizer,
            requests: self.requests,
            duration: self.duration,
            load: Load {
                concurrency: self.concurrency,
                rate: self.rate,
                burstiness: self.burstiness,
            },
            sweep: self.sweep,
            input_len: self.input_len,
            output_len: self.output_len,
            dataset: self.dataset,
            warmup: self.warmup,
            seed: self.seed,
            slo: self.slo,
            request_timeout: self.request_timeout,
            json: self.json,
            plot: self.plot,
            access: self.access,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    #[test]
    fn flags_become_a_config() {
        let cli = Cli::try_parse_from([
            "bench",
            "--target",
            "grpc://127.0.0.1:1",
            "--concurrency",
            "4",
            "--duration",
            "1.5s",
            "--request-timeout",
            "30",
        ])
        .unwrap();
        let c = cli.args.into_config();
        assert_eq!(c.load.concurrency, Some(4));
        assert_eq!(c.duration, Some(std::time::Duration::from_millis(1500)));
        assert_eq!(c.request_timeout, std::time::Duration::from_secs(30));
        let e = Cli::try_parse_from(["bench", "--target", "grpc://h:1", "--duration=-1s"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--duration") && e.contains("a time such as 200ms"),
            "{e}"
        );
    }
}
