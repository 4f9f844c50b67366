//! The figures of a run, as `vllm bench serve` reports them: counts, throughputs, TTFT, TPOT,
//! ITL and end-to-end latency (mean, median, p90, p99, std), goodput under SLOs, peak
//! concurrency, and the bench's own CPU use. Printed as a table, written as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::client::{Outcome, Prompt};
use crate::config::{Load, Slo};

/// Mean, median, p90, p99 and (population) standard deviation; percentiles interpolate
/// linearly between samples, like numpy's default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub std: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Some(Stats {
            mean,
            median: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            std: var.sqrt(),
            max: v[v.len() - 1],
        })
    }
}

/// The `p`-th percentile of sorted `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One request's figures (times in ms from the start of the run).
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub sent_at_ms: f64,
    /// Prompt tokens as the bench counted them, and generated tokens asked for and counted.
    pub input_tokens: usize,
    pub output_tokens_asked: usize,
    pub output_tokens: usize,
    /// The server's usage figures, when it sent them.
    pub server_prompt_tokens: Option<usize>,
    pub server_completion_tokens: Option<usize>,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: f64,
    pub itl_ms: Vec<f64>,
    /// The status it failed with and the server's message.
    pub error: Option<String>,
    pub error_message: Option<String>,
}

impl RequestRecord {
    pub fn new(prompt: &Prompt, sent_at: Duration, o: Outcome) -> Self {
        let ttft = o.ttft.map(ms);
        let tpot = match (ttft, o.output_tokens) {
            (Some(t), n) if n > 1 => Some((ms(o.e2e) - t) / (n - 1) as f64),
            _ => None,
        };
        let (error, error_message) = o.error.map_or((None, None), |(s, m)| (Some(s), Some(m)));
        RequestRecord {
            sent_at_ms: ms(sent_at),
            input_tokens: prompt.input_tokens,
            output_tokens_asked: prompt.output_tokens,
            output_tokens: o.output_tokens,
            server_prompt_tokens: o.usage.map(|u| u.0),
            server_completion_tokens: o.usage.map(|u| u.1),
            ttft_ms: ttft,
            tpot_ms: tpot,
            e2e_ms: ms(o.e2e),
            itl_ms: o.itl.into_iter().map(ms).collect(),
            error,
            error_message,
        }
    }

    fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Whether the server's usage disagrees with what the bench counted.
    fn mismatched(&self) -> bool {
        self.server_prompt_tokens
            .is_some_and(|n| n != self.input_tokens)
            || self
                .server_completion_tokens
                .is_some_and(|n| n != self.output_tokens)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Goodput {
    pub slo: Slo,
    pub good_requests: usize,
    pub requests_per_s: f64,
}

/// Every figure of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub load: Load,
    pub completed: usize,
    pub failed: usize,
    /// Failed requests by the status they failed with.
    pub failed_by_status: BTreeMap<String, usize>,
    /// The first message of each failure status.
    pub failure_messages: BTreeMap<String, String>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub input_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Option<Stats>,
    pub tpot_ms: Option<Stats>,
    pub itl_ms: Option<Stats>,
    pub e2e_ms: Option<Stats>,
    pub goodput: Option<Goodput>,
    pub peak_concurrency: usize,
    /// Completed requests whose usage figures differ from the bench's counts.
    pub token_mismatches: usize,
    /// The bench's CPU use over the run, in percent of one core.
    pub bench_cpu_percent: Option<f64>,
    /// How late the bench's arrival timer woke (rate-driven runs), mean and max, in ms.
    pub arrival_lateness_ms: Option<(f64, f64)>,
    pub warnings: Vec<String>,
    pub requests: Vec<RequestRecord>,
}

impl Report {
    #[allow(clippy::too_many_arguments)] // the parts of a run, gathered in one place
    pub fn new(
        label: String,
        load: Load,
        requests: Vec<RequestRecord>,
        duration: Duration,
        peak_concurrency: usize,
        bench_cpu_percent: Option<f64>,
        lateness: &[Duration],
        slo: Option<&Slo>,
    ) -> Report {
        let ok: Vec<&RequestRecord> = requests.iter().filter(|r| r.ok()).collect();
        let mut failed_by_status = BTreeMap::new();
        let mut failure_messages = BTreeMap::new();
        for r in requests.iter().filter(|r| !r.ok()) {
            let status = r.error.clone().unwrap_or_default();
            *failed_by_status.entry(status.clone()).or_insert(0) += 1;
            failure_messages
                .entry(status)
                .or_insert_with(|| r.error_message.clone().unwrap_or_default());
        }
        let secs = duration.as_secs_f64().max(1e-9);
        let input_tokens: usize = ok.iter().map(|r| r.input_tokens).sum();
        let output_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
        let collect = |f: &dyn Fn(&RequestRecord) -> Option<f64>| -> Vec<f64> {
            ok.iter().filter_map(|r| f(r)).collect()
        };
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
        let goodput = slo.map(|slo| {
            let within = |limit: Option<Duration>, v: Option<f64>| {
                limit.is_none_or(|l| v.is_some_and(|v| v <= ms(l)))
            };
            let good = ok
                .iter()
                .filter(|r| {
                    within(slo.ttft, r.ttft_ms)
                        // One token has no time per output token: it cannot miss that SLO.
                        && (r.output_tokens < 2 || within(slo.tpot, r.tpot_ms))
                        && within(slo.e2e, Some(r.e2e_ms))
                })
                .count();
            Goodput {
                slo: slo.clone(),
                good_requests: good,
                requests_per_s: good as f64 / secs,
            }
        });
        let lateness_ms: Vec<f64> = lateness.iter().map(|d| ms(*d)).collect();
        let arrival_lateness_ms = Stats::of(&lateness_ms).map(|s| (s.mean, s.max));
        let token_mismatches = ok.iter().filter(|r| r.mismatched()).count();
        let mut warnings = Vec::new();
        if token_mismatches > 0 {
            warnings.push(format!(
                "{token_mismatches} requests: the server's usage differs from the bench's token counts (wrong --tokenizer?)"
            ));
        }
        let short = ok
            .iter()
            .filter(|r| r.output_tokens != r.output_tokens_asked)
            .count();
        if short > 0 {
            warnings.push(format!(
                "{short} requests generated another number of tokens than asked (does the server honour ignore_eos?)"
            ));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if let Some(cpu) = bench_cpu_percent.filter(|c| *c >= 80.0 * cores) {
            warnings.push(format!(
                "the bench itself used {cpu:.0}% CPU of {cores} cores: it may be the bottleneck"
            ));
        }
        if let Some((mean, max)) = arrival_lateness_ms.filter(|(mean, _)| *mean > 5.0) {
            warnings.push(format!(
                "arrivals were sent {mean:.1} ms late on average (max {max:.1} ms): the bench cannot keep this rate"
            ));
        }
        Report {
            label,
            load,
            completed: ok.len(),
            failed: requests.len() - ok.len(),
            failed_by_status,
            failure_messages,
            duration_s: secs,
            request_throughput: ok.len() as f64 / secs,
            input_tokens,
            output_tokens,
            input_throughput: input_tokens as f64 / secs,
            output_throughput: output_tokens as f64 / secs,
            total_token_throughput: (input_tokens + output_tokens) as f64 / secs,
            ttft_ms: Stats::of(&collect(&|r| r.ttft_ms)),
            tpot_ms: Stats::of(&collect(&|r| r.tpot_ms)),
            itl_ms: Stats::of(&itl),
            e2e_ms: Stats::of(&collect(&|r| Some(r.e2e_ms))),
            goodput,
            peak_concurrency,
            token_mismatches,
            bench_cpu_percent,
            arrival_lateness_ms,
            warnings,
            requests,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let line = |f: &mut fmt::Formatter, name: &str, value: String| {
            writeln!(f, "{name:<34}{value:>14}")
        };
        writeln!(f, "{:=^48}", format!(" {} ", self.label))?;
        line(f, "Completed requests:", self.completed.to_string())?;
        line(f, "Failed requests:", self.failed.to_string())?;
        for (status, n) in &self.failed_by_status {
            line(f, &format!("  {status}:"), n.to_string())?;
        }
        line(f, "Duration (s):", format!("{:.2}", self.duration_s))?;
        line(f, "Input tokens:", self.input_tokens.to_string())?;
        line(f, "Output tokens:", self.output_tokens.to_string())?;
        line(
            f,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        )?;
        line(
            f,
            "Input token throughput (tok/s):",
            format!("{:.2}", self.input_throughput),
        )?;
        line(
            f,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput),
        )?;
        line(
            f,
            "Total token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        )?;
        if let Some(g) = &self.goodput {
            line(f, "SLO:", g.slo.to_string())?;
            line(f, "Goodput (req/s):", format!("{:.2}", g.requests_per_s))?;
        }
        line(f, "Peak concurrency:", self.peak_concurrency.to_string())?;
        if let Some(cpu) = self.bench_cpu_percent {
            line(f, "Bench CPU use (% of a core):", format!("{cpu:.1}"))?;
        }
        writeln!(f, "{:-^48}", " latency (ms) ")?;
        writeln!(
            f,
            "{:<6}{:>8}{:>9}{:>8}{:>8}{:>9}",
            "", "mean", "median", "p90", "p99", "std"
        )?;
        for (name, s) in [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ] {
            match s {
                Some(s) => writeln!(
                    f,
                    "{name:<6}{:>8.1}{:>9.1}{:>8.1}{:>8.1}{:>9.1}",
                    s.mean, s.median, s.p90, s.p99, s.std
                )?,
                None => writeln!(f, "{name:<6}{:>8}", "-")?,
            }
        }
        writeln!(f, "{}", "=".repeat(48))?;
        for (status, message) in &self.failure_messages {
            writeln!(f, "failure {status}: {message}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// One line per run of a sweep: the latency–throughput curve as a table.
pub fn sweep_table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| load | completed | failed | req/s | output tok/s | TTFT median / p99 ms | TPOT median ms | E2E median / p99 ms | peak concurrency |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let pair =
        |s: &Option<Stats>| s.map_or("-".into(), |s| format!("{:.0} / {:.0}", s.median, s.p99));
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {} | {} | {} | {} |\n",
            r.label,
            r.completed,
            r.failed,
            r.request_throughput,
            r.output_throughput,
            pair(&r.ttft_ms),
            r.tpot_ms.map_or("-".into(), |s| format!("{:.1}", s.median)),
            pair(&r.e2e_ms),
            r.peak_concurrency
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_match_numpy() {
        // numpy: mean 5.5, median 5.5, percentile(90) 9.1, percentile(99) 9.91, std 2.8722813
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!((s.mean, s.median, s.max), (5.5, 5.5, 10.0));
        assert!((s.p90 - 9.1).abs() < 1e-9 && (s.p99 - 9.91).abs() < 1e-9);
        assert!((s.std - 2.872_281_3).abs() < 1e-6);
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[4.0]).unwrap().p99, 4.0);
    }

    fn record(ttft_ms: u64, e2e_ms: u64, tokens: usize, error: Option<&str>) -> RequestRecord {
        let prompt = Prompt {
            text: String::new(),
            input_tokens: 10,
            output_tokens: tokens,
        };
        let outcome = Outcome {
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: vec![Duration::from_millis(10); tokens.saturating_sub(1)],
            e2e: Duration::from_millis(e2e_ms),
            output_tokens: tokens,
            usage: Some((10, tokens)),
            error: error.map(|s| (s.to_string(), "busy".to_string())),
        };
        RequestRecord::new(&prompt, Duration::ZERO, outcome)
    }

    #[test]
    fn figures_of_a_run() {
        let load = Load {
            concurrency: Some(2),
            rate: None,
            burstiness: 1.0,
        };
        let slo: Slo = "ttft=100ms,tpot=20ms".parse().unwrap();
        let records = vec![
            record(50, 150, 11, None),  // tpot 10 ms: good
            record(150, 250, 11, None), // ttft too slow
            record(50, 550, 11, None),  // tpot 50 ms: too slow
            record(0, 5, 0, Some("RESOURCE_EXHAUSTED")),
        ];
        let r = Report::new(
            "x".into(),
            load,
            records,
            Duration::from_secs(2),
            2,
            Some(1.0),
            &[],
            Some(&slo),
        );
        assert_eq!((r.completed, r.failed), (3, 1));
        assert_eq!(r.failed_by_status["RESOURCE_EXHAUSTED"], 1);
        assert_eq!(r.failure_messages["RESOURCE_EXHAUSTED"], "busy");
        assert_eq!((r.input_tokens, r.output_tokens), (30, 33));
        assert_eq!(r.output_throughput, 16.5);
        assert_eq!(r.goodput.as_ref().unwrap().good_requests, 1);
        assert_eq!(r.tpot_ms.unwrap().median, 10.0);
        assert_eq!(r.token_mismatches, 0);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let table = r.to_string();
        assert!(
            table.contains("RESOURCE_EXHAUSTED:") && table.contains("Goodput"),
            "{table}"
        );
    }
}
