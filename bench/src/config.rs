//! What a run is asked to do: target, load, prompts, bounds, SLOs and sweeps. Every value is
//! parsed from its command-line string here, and a bad one is refused with what was expected,
//! before anything connects.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

use crate::BenchError;

/// Why a flag's value was refused: what was expected (clap adds the flag and the value).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn expected<T>(what: &str) -> Result<T, ParseError> {
    Err(ParseError(format!("expected {what}")))
}

/// Where requests go: the gRPC `Inference` API or the OpenAI-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "url", rename_all = "lowercase")]
pub enum Target {
    /// `grpc://host:port`, kept as the `http://host:port` URI tonic dials.
    Grpc(String),
    /// `http://host:port/v1` without the trailing slash: endpoints are appended to it.
    Http(String),
}

impl FromStr for Target {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str =
            "grpc://HOST:PORT or http://HOST:PORT/v1 (grpcs:// and https:// for TLS)";
        let (scheme, rest) = match s.split_once("://") {
            Some(parts) => parts,
            None => return expected(WHAT),
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || !host.contains(':') {
            return expected(&format!("{WHAT} (a host and a port)"));
        }
        match scheme {
            "grpc" | "grpcs" if rest.trim_end_matches('/') != host => {
                expected(&format!("{WHAT}: a gRPC target has no path"))
            }
            "grpc" => Ok(Target::Grpc(format!("http://{host}"))),
            "grpcs" => Ok(Target::Grpc(format!("https://{host}"))),
            "http" | "https" => Ok(Target::Http(format!(
                "{scheme}://{}",
                rest.trim_end_matches('/')
            ))),
            _ => expected(WHAT),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Target::Grpc(uri) => match uri.strip_prefix("https://") {
                Some(host) => write!(f, "grpcs://{host}"),
                None => write!(f, "grpc://{}", uri.trim_start_matches("http://")),
            },
            Target::Http(base) => f.write_str(base),
        }
    }
}

/// Which API shape requests take: a completion of a prompt, or a chat of one user message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Completions,
    Chat,
}

impl FromStr for Api {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "completions" => Ok(Api::Completions),
            "chat" => Ok(Api::Chat),
            _ => expected("completions or chat"),
        }
    }
}

/// A distribution of token lengths: `128`, `uniform:64-256` or `normal:128:32`. Samples are
/// whole numbers of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LenDist {
    Fixed { len: usize },
    Uniform { lo: usize, hi: usize },
    Normal { mean: f64, std: f64 },
}

impl FromStr for LenDist {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "a token count N ≥ 1, uniform:LO-HI (1 ≤ LO ≤ HI) or normal:MEAN:STD (MEAN ≥ 1, STD ≥ 0)";
        let count = |v: &str| v.trim().parse::<usize>().ok().filter(|n| *n >= 1);
        let real = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite());
        let dist = if let Some(rest) = s.strip_prefix("uniform:") {
            rest.split_once('-')
                .and_then(|(lo, hi)| Some((count(lo)?, count(hi)?)))
                .filter(|(lo, hi)| lo <= hi)
                .map(|(lo, hi)| LenDist::Uniform { lo, hi })
        } else if let Some(rest) = s.strip_prefix("normal:") {
            rest.split_once(':')
                .and_then(|(m, sd)| Some((real(m)?, real(sd)?)))
                .filter(|(m, sd)| *m >= 1.0 && *sd >= 0.0)
                .map(|(mean, std)| LenDist::Normal { mean, std })
        } else {
            count(s.strip_prefix("fixed:").unwrap_or(s)).map(|len| LenDist::Fixed { len })
        };
        dist.map_or_else(|| expected(WHAT), Ok)
    }
}

impl LenDist {
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        match *self {
            LenDist::Fixed { len } => len,
            LenDist::Uniform { lo, hi } => rng.random_range(lo..=hi),
            LenDist::Normal { mean, std } => {
                let x = Normal::new(mean, std)
                    .expect("checked when parsed")
                    .sample(rng);
                x.round().max(1.0) as usize
            }
        }
    }
}

/// A time such as `200ms`, `1.5s`, `2m` or a bare number of seconds, greater than 0: the
/// bench's bounds and SLOs.
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    match duration(s) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => expected(&format!("{DURATION}, greater than 0")),
    }
}

/// A time such as `500ms`, `1.5s`, `2m` or a bare number of seconds (so `30` stays 30 s), 0
/// allowed: the serving commands' timeouts, grace periods and lease times.
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, ParseError> {
    duration(s).map_or_else(|| expected(&format!("{DURATION}, 0 or more")), Ok)
}

const DURATION: &str = "a time such as 200ms, 1.5s, 2m or a number of seconds";

/// The one reading of a time: a number ≥ 0, then `ms`, `s`, `m` or nothing (seconds).
fn duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let x = number.trim().parse::<f64>().ok()?;
    Duration::try_from_secs_f64(x * scale).ok()
}

/// Service-level objectives a request must all meet to count towards goodput, e.g.
/// `ttft=200ms,tpot=50ms,e2e=2s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Slo {
    #[serde(rename = "ttft_ms", serialize_with = "opt_ms")]
    pub ttft: Option<Duration>,
    #[serde(rename = "tpot_ms", serialize_with = "opt_ms")]
    pub tpot: Option<Duration>,
    #[serde(rename = "e2e_ms", serialize_with = "opt_ms")]
    pub e2e: Option<Duration>,
}

/// Times in the JSON output are milliseconds, like every other time there.
fn opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64() * 1e3),
        None => s.serialize_none(),
    }
}

fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl FromStr for Slo {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str = "NAME=TIME pairs separated by commas, NAME one of ttft, tpot, e2e (e.g. ttft=200ms,tpot=50ms)";
        let mut slo = Slo::default();
        for part in s.split(',') {
            let Some((name, time)) = part.split_once('=') else {
                return expected(WHAT);
            };
            let time = parse_duration(time).map_err(|e| ParseError(format!("{name}: {e}")))?;
            let slot = match name.trim() {
                "ttft" => &mut slo.ttft,
                "tpot" => &mut slo.tpot,
                "e2e" => &mut slo.e2e,
                _ => return expected(WHAT),
            };
            *slot = Some(time);
        }
        Ok(slo)
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let parts: Vec<String> = [("ttft", self.ttft), ("tpot", self.tpot), ("e2e", self.e2e)]
            .iter()
            .filter_map(|(n, d)| d.map(|d| format!("{n}≤{}ms", d.as_secs_f64() * 1e3)))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// `concurrency=1,4,16` or `rate=1,2,4`: one run per value, the other load settings kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "axis", content = "values", rename_all = "lowercase")]
pub enum Sweep {
    Concurrency(Vec<usize>),
    Rate(Vec<f64>),
}

impl FromStr for Sweep {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        const WHAT: &str =
            "concurrency=N,N,… (each ≥ 1) or rate=R,R,… (requests per second, each > 0)";
        let Some((axis, values)) = s.split_once('=') else {
            return expected(WHAT);
        };
        let values: Vec<&str> = values.split(',').map(str::trim).collect();
        let sweep = match axis.trim() {
            "concurrency" => values
                .iter()
                .map(|v| v.parse::<usize>().ok().filter(|n| *n >= 1))
                .collect::<Option<Vec<_>>>()
                .map(Sweep::Concurrency),
            "rate" => values
                .iter()
                .map(|v| v.parse::<f64>().ok().filter(|r| r.is_finite() && *r > 0.0))
                .collect::<Option<Vec<_>>>()
                .map(Sweep::Rate),
            _ => None,
        };
        sweep.map_or_else(|| expected(WHAT), Ok)
    }
}

/// A request rate: requests per second, or `inf` (every request at once).
pub fn parse_rate(s: &str) -> Result<f64, ParseError> {
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => expected("requests per second greater than 0, or inf"),
    }
}

/// How requests are let in: at most `concurrency` in flight, arriving at `rate` per second
/// (gaps drawn from a gamma distribution of shape `burstiness`: 1 is Poisson, below 1
/// burstier, above 1 more even).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Load {
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub burstiness: f64,
}

impl Load {
    /// `concurrency=8` or `rate=2.5` for tables and plots; both when both are set.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.concurrency {
            parts.push(format!("concurrency={c}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate={r}"));
        }
        match parts.is_empty() {
            true => "all at once".into(),
            false => parts.join(" "),
        }
    }
}

/// Everything one `switchyard bench` invocation does.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub target: Target,
    pub api: Api,
    /// The model named in HTTP request bodies; the server's first model when unset.
    pub model_name: Option<String>,
    /// A `tokenizer.json` or a model directory holding one; without it a gRPC target's
    /// `Tokenize` RPC counts tokens.
    pub tokenizer: Option<PathBuf>,
    pub requests: Option<usize>,
    #[serde(rename = "duration_ms", serialize_with = "opt_ms")]
    pub duration: Option<Duration>,
    pub load: Load,
    pub sweep: Option<Sweep>,
    pub input_len: Option<LenDist>,
    pub output_len: Option<LenDist>,
    pub dataset: Option<PathBuf>,
    pub warmup: usize,
    pub seed: u64,
    pub slo: Option<Slo>,
    #[serde(rename = "request_timeout_ms", serialize_with = "ms")]
    pub request_timeout: Duration,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// TLS and the API key: not part of the report (the key is never written anywhere).
    #[serde(skip)]
    pub access: crate::args::AccessArgs,
}

/// Input and output length of synthetic prompts when not given.
pub const DEFAULT_LEN: LenDist = LenDist::Fixed { len: 128 };

impl Config {
    /// Refuses combinations that cannot run, before anything connects.
    pub fn validate(&self) -> Result<(), BenchError> {
        let flag = |flag: &'static str, value: String, expected: &str| {
            Err(BenchError::Flag {
                flag,
                value,
                expected: expected.to_string(),
            })
        };
        if self.load.concurrency == Some(0) {
            return flag("--concurrency", "0".into(), "at least 1 request in flight");
        }
        if !(self.load.burstiness.is_finite() && self.load.burstiness > 0.0) {
            return flag(
                "--burstiness",
                self.load.burstiness.to_string(),
                "a number greater than 0 (1 = Poisson)",
            );
        }
        if self.requests == Some(0) {
            return flag("--requests", "0".into(), "at least 1");
        }
        let sweeps_concurrency = matches!(self.sweep, Some(Sweep::Concurrency(_)));
        let sweeps_rate = matches!(self.sweep, Some(Sweep::Rate(_)));
        if sweeps_concurrency && self.load.concurrency.is_some() {
            return flag(
                "--concurrency",
                self.load.concurrency.unwrap_or_default().to_string(),
                "no --concurrency with --sweep concurrency=… (the sweep sets it)",
            );
        }
        if sweeps_rate && self.load.rate.is_some() {
            return flag(
                "--rate",
                self.load.rate.unwrap_or_default().to_string(),
                "no --rate with --sweep rate=… (the sweep sets it)",
            );
        }
        let bounded_in_flight =
            self.load.concurrency.is_some() || self.load.rate.is_some() || self.sweep.is_some();
        if !bounded_in_flight {
            return flag(
                "--concurrency/--rate",
                "(none)".into(),
                "the load: --concurrency N (requests in flight) and/or --rate R (requests per second), or --sweep",
            );
        }
        if self.dataset.is_some() && self.input_len.is_some() {
            return flag(
                "--input-len",
                "(with --dataset)".into(),
                "either --dataset or --input-len: a dataset's prompts have their own lengths",
            );
        }
        if let Some(path) = &self.dataset {
            if !path.is_file() {
                return flag(
                    "--dataset",
                    path.display().to_string(),
                    "an existing ShareGPT .json or .jsonl file",
                );
            }
        }
        let target_url = match &self.target {
            Target::Grpc(url) | Target::Http(url) => url,
        };
        if self.access.wants_tls() && !target_url.starts_with("https://") {
            return flag(
                "--target",
                self.target.to_string(),
                "a grpcs:// or https:// target: --tls-ca and --tls-client-cert are for TLS",
            );
        }
        if let (Target::Http(_), None) = (&self.target, &self.tokenizer) {
            return flag(
                "--tokenizer",
                "(none)".into(),
                "the model's tokenizer.json or model directory: an HTTP target cannot count tokens for the bench",
            );
        }
        for (name, path) in [("--json", &self.json), ("--plot", &self.plot)] {
            let Some(path) = path else { continue };
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) {
                return flag(
                    name,
                    path.display().to_string(),
                    "a file in an existing directory",
                );
            }
        }
        if let Some(plot) = &self.plot {
            match plot.extension().and_then(|e| e.to_str()) {
                Some("svg") => {}
                Some("png") => {
                    return flag(
                        "--plot",
                        plot.display().to_string(),
                        "an .svg file (PNG output is not supported; convert the SVG, e.g. with rsvg-convert)",
                    )
                }
                _ => return flag("--plot", plot.display().to_string(), "an .svg file"),
            }
        }
        Ok(())
    }

    /// The runs this configuration asks for: one, or one per sweep value.
    pub fn loads(&self) -> Vec<Load> {
        match &self.sweep {
            None => vec![self.load],
            Some(Sweep::Concurrency(values)) => values
                .iter()
                .map(|c| Load {
                    concurrency: Some(*c),
                    ..self.load
                })
                .collect(),
            Some(Sweep::Rate(values)) => values
                .iter()
                .map(|r| Load {
                    rate: Some(*r),
                    ..self.load
                })
                .collect(),
        }
    }

    /// Requests when neither a count nor a duration bounds the run.
    pub fn request_count(&self) -> Option<usize> {
        match (self.requests, self.duration) {
            (None, None) => Some(DEFAULT_REQUESTS),
            (n, _) => n,
        }
    }
}

pub const DEFAULT_REQUESTS: usize = 100;

/// `path`, or its `tokenizer.json` when it is a directory.
pub fn tokenizer_file(path: &Path) -> PathBuf {
    match path.is_dir() {
        true => path.join("tokenizer.json"),
        false => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            "grpc://127.0.0.1:50051".parse(),
            Ok(Target::Grpc("http://127.0.0.1:50051".into()))
        );
        assert_eq!(
            "http://localhost:8000/v1/".parse(),
            Ok(Target::Http("http://localhost:8000/v1".into()))
        );
        for bad in [
            "127.0.0.1:50051",
            "ftp://h:1",
            "grpc://host",
            "grpc://h:1/v1",
            "http://",
        ] {
            let err = bad.parse::<Target>().unwrap_err().0;
            assert!(err.contains("grpc://HOST:PORT"), "{bad}: {err}");
        }
        let t: Target = "grpc://h:1".parse().unwrap();
        assert_eq!(t.to_string(), "grpc://h:1");
        let t: Target = "grpcs://h:1".parse().unwrap();
        assert_eq!(
            (&t, t.to_string().as_str()),
            (&Target::Grpc("https://h:1".into()), "grpcs://h:1")
        );
        assert_eq!(
            "https://h:1/v1".parse(),
            Ok(Target::Http("https://h:1/v1".into()))
        );
    }

    #[test]
    fn length_distributions() {
        assert_eq!("64".parse(), Ok(LenDist::Fixed { len: 64 }));
        assert_eq!("fixed:64".parse(), Ok(LenDist::Fixed { len: 64 }));
        assert_eq!(
            "uniform:8-16".parse(),
            Ok(LenDist::Uniform { lo: 8, hi: 16 })
        );
        assert_eq!(
            "normal:100:10".parse(),
            Ok(LenDist::Normal {
                mean: 100.0,
                std: 10.0
            })
        );
        for bad in [
            "0",
            "-3",
            "uniform:9-3",
            "uniform:0-3",
            "normal:5",
            "normal:0:1",
            "gauss:1:2",
            "",
        ] {
            assert!(bad.parse::<LenDist>().is_err(), "{bad} was accepted");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        use rand::SeedableRng;
        let u = LenDist::Uniform { lo: 8, hi: 16 };
        let samples: Vec<usize> = (0..500).map(|_| u.sample(&mut rng)).collect();
        assert!(samples.iter().all(|n| (8..=16).contains(n)));
        assert!(samples.contains(&8) && samples.contains(&16));
        let n = LenDist::Normal {
            mean: 3.0,
            std: 10.0,
        };
        assert!((0..500).all(|_| n.sample(&mut rng) >= 1));
        let mean = (0..2000)
            .map(|_| {
                LenDist::Normal {
                    mean: 200.0,
                    std: 20.0,
                }
                .sample(&mut rng) as f64
            })
            .sum::<f64>()
            / 2000.0;
        assert!((mean - 200.0).abs() < 3.0, "mean {mean}");
    }

    #[test]
    fn durations_take_units_and_plain_seconds() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("500ms", ms(500)),
            ("30s", ms(30_000)),
            ("2m", ms(120_000)),
            ("1.5s", ms(1500)),
            ("0.25m", ms(15_000)),
            ("30", ms(30_000)),
            ("2.5", ms(2500)),
            (" 10s ", ms(10_000)),
            ("0", ms(0)),
            ("0ms", ms(0)),
        ] {
            assert_eq!(parse_duration_or_zero(text), Ok(want), "{text}");
        }
        for bad in [
            "", "-1", "-1s", "-0.5m", "soon", "1h", "s", "ms", "1 2s", "1e400", "NaN", "inf",
        ] {
            let err = parse_duration_or_zero(bad).unwrap_err().0;
            assert!(
                err.contains("a time such as 200ms, 1.5s, 2m"),
                "{bad}: {err}"
            );
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_duration("0").is_err());
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
    }

    #[test]
    fn durations_and_slos() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("0s").is_err());
        let slo: Slo = "ttft=200ms,tpot=50ms".parse().unwrap();
        assert_eq!(slo.ttft, Some(Duration::from_millis(200)));
        assert_eq!(slo.tpot, Some(Duration::from_millis(50)));
        assert_eq!(slo.e2e, None);
        for bad in ["ttft", "ttft=soon", "latency=1s", "ttft=1s,"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn sweeps() {
        assert_eq!(
            "concurrency=1,4,16".parse(),
            Ok(Sweep::Concurrency(vec![1, 4, 16]))
        );
        assert_eq!("rate=0.5,2".parse(), Ok(Sweep::Rate(vec![0.5, 2.0])));
        for bad in [
            "concurrency=",
            "concurrency=0,1",
            "rate=-1",
            "rate=inf",
            "batch=1,2",
            "1,2",
        ] {
            assert!(bad.parse::<Sweep>().is_err(), "{bad} was accepted");
        }
    }
}
