//! The coordinator's metrics: vLLM's names under a `switchyard_` prefix (so a vLLM dashboard
//! ports by renaming), plus ours (pipeline step time per lane, worker up / ready, placement
//! epoch). Also the short history the dashboard draws: recent requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchyard_metrics::{Counter, Family, Gauge, Histogram, Registry, LATENCY_BUCKETS};

/// vLLM's buckets, so latency panels compare like for like.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// How many finished requests the dashboard lists.
const RECENT: usize = 50;

pub struct Metrics {
    pub registry: Registry,
    pub running: Arc<Family<Gauge>>,
    pub waiting: Arc<Family<Gauge>>,
    pub kv_usage: Arc<Family<Gauge>>,
    pub ttft: Arc<Histogram>,
    pub itl: Arc<Histogram>,
    pub e2e: Arc<Histogram>,
    pub queue_time: Arc<Histogram>,
    pub prompt_tokens: Arc<Counter>,
    pub generation_tokens: Arc<Counter>,
    pub success: Arc<Family<Counter>>,
    pub failure: Arc<Family<Counter>>,
    pub preemptions: Arc<Counter>,
    pub prefix_cache_queries: Arc<Counter>,
    pub prefix_cache_hits: Arc<Counter>,
    pub step_seconds: Arc<Family<Histogram>>,
    pub worker_up: Arc<Family<Gauge>>,
    pub worker_ready: Arc<Family<Gauge>>,
    pub epoch: Arc<Gauge>,
    pub queue_depth: Arc<Gauge>,
    recent: Mutex<VecDeque<RequestRecord>>,
}

/// A finished request, as the dashboard lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub lane: usize,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// "stop", "length", or the gRPC code it ended with.
    pub outcome: String,
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    /// Seconds since the Unix epoch.
    pub finished_at: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::default();
        Metrics {
            running: r.gauge(
                "switchyard_num_requests_running",
                "Requests with a sequence in the lane's running batch.",
                &["lane"],
            ),
            waiting: r.gauge(
                "switchyard_num_requests_waiting",
                "Requests queued for a lane, not running yet.",
                &["lane"],
            ),
            kv_usage: r.gauge(
                "switchyard_kv_cache_usage_perc",
                "Fraction of the lane's KV-cache blocks in use (1 = full).",
                &["lane"],
            ),
            ttft: r
                .histogram(
                    "switchyard_time_to_first_token_seconds",
                    "Time from a request's arrival to its first generated token.",
                    &[],
                    TTFT_BUCKETS,
                )
                .with(&[]),
            itl: r
                .histogram(
                    "switchyard_inter_token_latency_seconds",
                    "Time between two consecutive generated tokens of a request.",
                    &[],
                    ITL_BUCKETS,
                )
                .with(&[]),
            e2e: r
                .histogram(
                    "switchyard_e2e_request_latency_seconds",
                    "Time from a request's arrival to its last token.",
                    &[],
                    REQUEST_BUCKETS,
                )
                .with(&[]),
            queue_time: r
                .histogram(
                    "switchyard_request_queue_time_seconds",
                    "Time a request waited before its first step was scheduled.",
                    &[],
                    REQUEST_BUCKETS,
                )
                .with(&[]),
            prompt_tokens: r
                .counter(
                    "switchyard_prompt_tokens_total",
                    "Prompt tokens of finished requests.",
                    &[],
                )
                .with(&[]),
            generation_tokens: r
                .counter(
                    "switchyard_generation_tokens_total",
                    "Generated tokens sent to clients.",
                    &[],
                )
                .with(&[]),
            success: r.counter(
                "switchyard_request_success_total",
                "Requests that finished, by finish reason.",
                &["finished_reason"],
            ),
            failure: r.counter(
                "switchyard_request_failure_total",
                "Requests that ended with an error, by gRPC status code (refused, cancelled, timed out, failed).",
                &["code"],
            ),
            preemptions: r
                .counter(
                    "switchyard_num_preemptions_total",
                    "Sequences preempted (KV blocks reclaimed, recomputed later).",
                    &[],
                )
                .with(&[]),
            prefix_cache_queries: r
                .counter(
                    "switchyard_prefix_cache_queries_total",
                    "Prompt tokens looked up in the lanes' prefix caches (once per request; requests with prompt logprobs skip the cache).",
                    &[],
                )
                .with(&[]),
            prefix_cache_hits: r
                .counter(
                    "switchyard_prefix_cache_hits_total",
                    "Prompt tokens found in the lanes' prefix caches (their prefill skipped).",
                    &[],
                )
                .with(&[]),
            step_seconds: r.histogram(
                "switchyard_step_duration_seconds",
                "Round trip of one step through a lane's pipeline (every stage).",
                &["lane"],
                LATENCY_BUCKETS,
            ),
            worker_up: r.gauge(
                "switchyard_worker_up",
                "1 when the worker answered the coordinator's last stats poll.",
                &["worker", "stage", "shard"],
            ),
            worker_ready: r.gauge(
                "switchyard_worker_ready_in_placement",
                "1 when the worker holds its part of the current placement.",
                &["worker", "stage", "shard"],
            ),
            epoch: r
                .gauge(
                    "switchyard_placement_epoch",
                    "Epoch of the placement being served.",
                    &[],
                )
                .with(&[]),
            queue_depth: r
                .gauge(
                    "switchyard_queue_depth",
                    "Requests waiting in every lane's queue.",
                    &[],
                )
                .with(&[]),
            registry: r,
            recent: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn record(&self, record: RequestRecord) {
        let mut recent = self.recent.lock().expect("not poisoned");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The last finished requests, newest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        let recent = self.recent.lock().expect("not poisoned");
        recent.iter().rev().cloned().collect()
    }
}

/// The times of one request's life, kept by its lane's driver.
#[derive(Debug, Clone)]
pub struct RequestTimes {
    pub arrived: Instant,
    pub scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

impl RequestTimes {
    pub fn new(arrived: Instant) -> Self {
        RequestTimes {
            arrived,
            scheduled: None,
            first_token: None,
            last_token: None,
        }
    }

    pub fn scheduled(&mut self, m: &Metrics, now: Instant) {
        if self.scheduled.is_none() {
            self.scheduled = Some(now);
            m.queue_time
                .observe(now.duration_since(self.arrived).as_secs_f64());
        }
    }

    /// `n` tokens arrived together (one step).
    pub fn tokens(&mut self, m: &Metrics, n: usize, now: Instant) {
        if n == 0 {
            return;
        }
        m.generation_tokens.add(n as u64);
        match self.last_token {
            None => {
                self.first_token = Some(now);
                m.ttft
                    .observe(now.duration_since(self.arrived).as_secs_f64());
            }
            Some(last) => m.itl.observe(now.duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }
}
