//! What a worker measures about itself: its steps, its share of the expert exchange and the
//! tokens its router sends to each expert. Served as Prometheus metrics on `/metrics` and read
//! by the coordinator through the `Stats` RPC (dashboard, benchmarks).

use std::sync::Arc;

use switchyard_metrics::{Counter, Family, Gauge, Histogram, Registry, LATENCY_BUCKETS};

use crate::offload::ExpertCacheMetrics;

pub struct WorkerMetrics {
    pub registry: Arc<Registry>,
    pub steps: Arc<Counter>,
    pub step_tokens: Arc<Counter>,
    pub step_seconds: Arc<Histogram>,
    pub exchange_bytes_sent: Arc<Counter>,
    pub exchange_bytes_received: Arc<Counter>,
    /// (token, remote shard) pairs sent: each needs at least one hidden vector out and one
    /// back, the floor the bytes are compared with.
    pub exchange_token_shard_pairs: Arc<Counter>,
    /// One observation per exchange (all peers of one MoE layer of one step).
    pub exchange_seconds: Arc<Histogram>,
    pub expert_tokens_served: Arc<Counter>,
    /// Tokens the router sent to each expert, by global layer and expert id.
    pub routed: Arc<Family<Counter>>,
    /// 1 when this worker holds a loaded part and can run steps; 0 again when a step could
    /// not read an offloaded expert from its checkpoint file.
    pub ready: Arc<Gauge>,
    pub epoch: Arc<Gauge>,
    /// The expert cache, with `--expert-memory`.
    pub expert_cache: ExpertCacheMetrics,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let r = Registry::default();
        let exchange_bytes = r.counter(
            "switchyard_worker_exchange_bytes_total",
            "Encoded bytes of expert-exchange messages, by direction.",
            &["direction"],
        );
        WorkerMetrics {
            steps: r
                .counter(
                    "switchyard_worker_steps_total",
                    "Steps this worker ran its layers for.",
                    &[],
                )
                .with(&[]),
            step_tokens: r
                .counter(
                    "switchyard_worker_step_tokens_total",
                    "Tokens (prefill and decode) that went through this worker's layers.",
                    &[],
                )
                .with(&[]),
            step_seconds: r
                .histogram(
                    "switchyard_worker_step_duration_seconds",
                    "Time this worker spent on a step's layers (and sampling on the last stage), without the next stages.",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            exchange_bytes_sent: exchange_bytes.with(&["sent"]),
            exchange_bytes_received: exchange_bytes.with(&["received"]),
            exchange_token_shard_pairs: r
                .counter(
                    "switchyard_worker_exchange_token_shard_pairs_total",
                    "(token, remote shard) pairs sent in the expert exchange.",
                    &[],
                )
                .with(&[]),
            exchange_seconds: r
                .histogram(
                    "switchyard_worker_exchange_duration_seconds",
                    "Wall time of one MoE layer's exchange with the other shards of the stage.",
                    &[],
                    LATENCY_BUCKETS,
                )
                .with(&[]),
            expert_tokens_served: r
                .counter(
                    "switchyard_worker_expert_tokens_served_total",
                    "Tokens this worker ran through its experts for other shards.",
                    &[],
                )
                .with(&[]),
            routed: r.counter(
                "switchyard_expert_tokens_routed_total",
                "Tokens the router sent to each expert, by layer and expert (counted on the worker that routed them).",
                &["layer", "expert"],
            ),
            ready: r
                .gauge(
                    "switchyard_worker_ready",
                    "1 when this worker holds a loaded part and can run steps.",
                    &[],
                )
                .with(&[]),
            epoch: r
                .gauge(
                    "switchyard_worker_placement_epoch",
                    "The placement epoch of the part this worker holds.",
                    &[],
                )
                .with(&[]),
            expert_cache: ExpertCacheMetrics::register(&r),
            registry: Arc::new(r),
        }
    }
}

impl WorkerMetrics {
    /// Counts one MoE layer's routing: `experts` holds top-k expert ids per token.
    pub fn count_routes(&self, layer: usize, experts: &[u32]) {
        let mut per_expert: Vec<u64> = Vec::new();
        for &e in experts {
            let e = e as usize;
            if per_expert.len() <= e {
                per_expert.resize(e + 1, 0);
            }
            per_expert[e] += 1;
        }
        let layer = layer.to_string();
        for (e, n) in per_expert.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            self.routed.with(&[&layer, &e.to_string()]).add(n);
        }
    }
}
