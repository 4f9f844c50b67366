//! Driving the load: requests arrive at a rate (gamma-distributed gaps) and/or are held to a
//! number in flight, until a request count or a duration is reached; each is timed by the
//! client and gathered into a [`Report`]. A ticker reports running figures while it goes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Outcome, Prompt};
use crate::config::{Api, Load, Slo};
use crate::report::{Report, RequestRecord};

/// Running figures of a run, for a progress line.
#[derive(Debug, Clone)]
pub struct Progress {
    pub label: String,
    pub elapsed: Duration,
    /// Requests the run will send, when a count bounds it.
    pub total: Option<usize>,
    pub sent: usize,
    pub completed: usize,
    pub failed: usize,
    pub in_flight: usize,
    pub output_tokens: u64,
    /// Mean time to first token of the completed requests, in ms.
    pub mean_ttft_ms: Option<f64>,
    /// The bench's own CPU use since the run began, in percent of one core.
    pub cpu_percent: Option<f64>,
    /// Set on the last call of a run.
    pub finished: bool,
}

/// Seconds of CPU this process has used (user + system), from `/proc/self/stat`.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the whole line, in USER_HZ ticks (100 on Linux).
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// What the requests of one run share while it goes.
#[derive(Default)]
struct Live {
    sent: AtomicUsize,
    completed: AtomicUsize,
    failed: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    tokens: AtomicU64,
    ttft_sum_us: AtomicU64,
}

/// Everything a run needs besides its load.
pub struct Plan<'a> {
    pub client: &'a Client,
    pub api: Api,
    pub prompts: &'a [Prompt],
    /// Send at most this many; without it, prompts are reused in turn until `duration`.
    pub requests: Option<usize>,
    pub duration: Option<Duration>,
    pub seed: u64,
    pub timeout: Duration,
    pub slo: Option<&'a Slo>,
}

/// Sends `prompts` (each once, all at once up to `concurrency`) and waits for them: warm-up
/// requests whose figures are thrown away.
pub async fn warm_up(
    client: &Client,
    api: Api,
    prompts: &[Prompt],
    concurrency: usize,
    timeout: Duration,
) -> Vec<Outcome> {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for p in prompts {
        let (client, p, semaphore) = (client.clone(), p.clone(), semaphore.clone());
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("never closed");
            client.send(api, &p, timeout, &AtomicU64::new(0)).await
        });
    }
    let mut outcomes = Vec::new();
    while let Some(o) = tasks.join_next().await {
        outcomes.push(o.expect("a request task does not panic"));
    }
    outcomes
}

/// One run under `load`; `progress` is called about once a second and once at the end.
pub async fn run(plan: &Plan<'_>, load: Load, progress: ProgressFn) -> Report {
    let live = Arc::new(Live::default());
    let label = load.label();
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let snapshot = {
        let (live, label, total) = (live.clone(), label.clone(), plan.requests);
        move || {
            let completed = live.completed.load(Ordering::Relaxed);
            let elapsed = start.elapsed();
            Progress {
                label: label.clone(),
                elapsed,
                total,
                sent: live.sent.load(Ordering::Relaxed),
                completed,
                failed: live.failed.load(Ordering::Relaxed),
                in_flight: live.in_flight.load(Ordering::Relaxed),
                output_tokens: live.tokens.load(Ordering::Relaxed),
                mean_ttft_ms: (completed > 0).then(|| {
                    live.ttft_sum_us.load(Ordering::Relaxed) as f64 / completed as f64 / 1e3
                }),
                cpu_percent: cpu_start
                    .zip(cpu_seconds())
                    .map(|(a, b)| (b - a) / elapsed.as_secs_f64().max(1e-3) * 100.0),
                finished: false,
            }
        }
    };
    let ticker = {
        let (snapshot, progress) = (snapshot.clone(), progress.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                progress(&snapshot());
            }
        })
    };

    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xa11_1a1);
    let gaps = load
        .rate
        .filter(|r| r.is_finite())
        .map(|r| Gamma::new(load.burstiness, 1.0 / (r * load.burstiness)).expect("checked flags"));
    let semaphore = load.concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let mut tasks = JoinSet::new();
    let mut next = start;
    let mut lateness = Vec::new();
    let past_deadline = |t: Instant| plan.duration.is_some_and(|d| t - start >= d);
    for i in 0.. {
        if plan.requests.is_some_and(|n| i >= n) {
            break;
        }
        if let Some(gaps) = &gaps {
            if i > 0 {
                next += Duration::from_secs_f64(gaps.sample(&mut rng));
            }
            if past_deadline(next) {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
            // How late the timer woke: the bench's own delay, not the server's.
            lateness.push(Instant::now().saturating_duration_since(next));
        }
        let permit = match &semaphore {
            Some(s) => Some(s.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        if past_deadline(Instant::now()) {
            break;
        }
        let prompt = plan.prompts[i % plan.prompts.len()].clone();
        let (client, live, api, timeout) =
            (plan.client.clone(), live.clone(), plan.api, plan.timeout);
        live.sent.fetch_add(1, Ordering::Relaxed);
        let now_in_flight = live.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        live.peak.fetch_max(now_in_flight, Ordering::Relaxed);
        let sent_at = start.elapsed();
        tasks.spawn(async move {
            let outcome = client.send(api, &prompt, timeout, &live.tokens).await;
            // Out of flight before the slot is given to the next request.
            live.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            match (&outcome.error, outcome.ttft) {
                (None, ttft) => {
                    live.completed.fetch_add(1, Ordering::Relaxed);
                    let us = ttft.unwrap_or(outcome.e2e).as_micros() as u64;
                    live.ttft_sum_us.fetch_add(us, Ordering::Relaxed);
                }
                (Some(_), _) => {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            RequestRecord::new(&prompt, sent_at, outcome)
        });
    }
    let mut records = Vec::new();
    while let Some(r) = tasks.join_next().await {
        records.push(r.expect("a request task does not panic"));
    }
    let duration = start.elapsed();
    ticker.abort();
    progress(&Progress {
        finished: true,
        ..snapshot()
    });
    records.sort_by(|a, b| a.sent_at_ms.total_cmp(&b.sent_at_ms));
    let cpu = cpu_start
        .zip(cpu_seconds())
        .map(|(a, b)| (b - a) / duration.as_secs_f64().max(1e-3) * 100.0);
    Report::new(
        label,
        load,
        records,
        duration,
        live.peak.load(Ordering::Relaxed),
        cpu,
        &lateness,
        plan.slo,
    )
}

/// Called with running figures while a run goes.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The count is the whole process's (other tests run beside this one): it must grow while
    /// this thread works, and never faster than every core at once.
    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = cpu_seconds().expect("Linux has /proc/self/stat");
        let t = Instant::now();
        let mut x = 0u64;
        let mut used = 0.0;
        while used < 0.3 {
            assert!(t.elapsed() < Duration::from_secs(20), "stuck at {used} s");
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            used = cpu_seconds().unwrap() - before;
        }
        std::hint::black_box(x);
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        let wall = t.elapsed().as_secs_f64();
        assert!(
            used <= wall * cores + 0.02,
            "{used} s of CPU in {wall} s on {cores} cores"
        );
    }

    /// Gamma gaps of shape b and scale 1/(r·b) average 1/r whatever the burstiness.
    #[test]
    fn arrival_gaps_average_the_rate() {
        let mut rng = StdRng::seed_from_u64(3);
        for b in [0.5, 1.0, 4.0] {
            let g = Gamma::new(b, 1.0 / (10.0 * b)).unwrap();
            let mean = (0..20_000).map(|_| g.sample(&mut rng)).sum::<f64>() / 20_000.0;
            assert!(
                (mean - 0.1).abs() < 0.005,
                "burstiness {b}: mean gap {mean}"
            );
        }
    }
}
