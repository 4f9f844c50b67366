//! Watches a running cluster once a second: polls every worker's stats (which also says whether
//! it is up), samples the coordinator's counters into a few minutes of history, and keeps the
//! expert-routing counts of the last minute. The dashboard draws [`Monitor::snapshot`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use switchyard_net::grpc::{channel, worker_client};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::cluster::Cluster;

const PERIOD: Duration = Duration::from_secs(1);
/// Points of history kept (one per period).
const HISTORY: usize = 300;
/// The heat map covers this many periods.
const HEAT_WINDOW: usize = 60;

pub struct Monitor {
    cluster: Arc<Cluster>,
    state: Mutex<State>,
    /// One channel per worker address, reused by every poll.
    clients: Mutex<HashMap<String, WorkerClient<Channel>>>,
}

#[derive(Default)]
struct State {
    /// The epoch `workers` belong to.
    epoch: u64,
    workers: Vec<Polled>,
    history: VecDeque<Point>,
    /// Routed-token totals (layer-major, `layers × experts`), one per period, oldest first.
    routed: VecDeque<Vec<u64>>,
    last: Totals,
}

/// A worker as the last polls saw it.
#[derive(Clone, Default)]
struct Polled {
    /// It answered the last poll.
    up: bool,
    /// Its last answer (a worker that missed a poll keeps its last figures).
    stats: pb::WorkerStats,
}

/// One second of the cluster, for the dashboard's charts.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub t: f64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Mean over the requests whose first token came in this second (None if none did).
    pub ttft_s: Option<f64>,
    pub itl_s: Option<f64>,
    pub queue_depth: usize,
    /// Per lane, 0–1.
    pub kv_usage: Vec<f64>,
}

/// Counter readings, to difference between periods.
#[derive(Default, Clone, Copy)]
struct Totals {
    tokens: u64,
    finished: u64,
    ttft: (u64, f64),
    itl: (u64, f64),
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub model: String,
    pub stages: usize,
    pub shards: usize,
    pub epoch: u64,
    pub workers: Vec<WorkerView>,
    pub lanes: Vec<LaneView>,
    pub queue_depth: usize,
    pub history: Vec<Point>,
    pub heatmap: HeatMap,
    pub recent: Vec<crate::metrics::RequestRecord>,
}

#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub address: String,
    pub stage: usize,
    pub shard: usize,
    pub device: String,
    pub memory_bytes: u64,
    pub weight_bytes: u64,
    pub resident_bytes: u64,
    pub layers: [usize; 2],
    pub experts: Vec<u32>,
    pub up: bool,
    pub steps: u64,
    pub step_seconds: f64,
    pub exchange_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct LaneView {
    pub lane: usize,
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub preemptions: u64,
}

/// Tokens routed to each expert of each layer over the last `window_s` seconds.
#[derive(Debug, Serialize)]
pub struct HeatMap {
    pub layers: usize,
    pub experts: usize,
    pub window_s: usize,
    /// `tokens[layer][expert]`.
    pub tokens: Vec<Vec<u64>>,
}

impl Monitor {
    /// Starts watching `cluster` (until the process ends).
    pub fn spawn(cluster: Arc<Cluster>) -> Arc<Monitor> {
        let monitor = Arc::new(Monitor {
            state: Mutex::default(),
            clients: Mutex::default(),
            cluster,
        });
        let m = monitor.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                m.poll().await;
            }
        });
        monitor
    }

    async fn poll(&self) {
        let serving = self.cluster.serving();
        let cells = serving.as_ref().map_or(&[][..], |s| &s.placement.cells[..]);
        let lanes = serving.as_ref().map_or(&[][..], |s| &s.lanes[..]);
        let mut calls = JoinSet::new();
        for (i, cell) in cells.iter().enumerate() {
            let client = self.client(&cell.address);
            calls.spawn(async move {
                let stats = async {
                    let reply = client?.stats(pb::StatsRequest {}).await.ok()?;
                    Some(reply.into_inner())
                };
                (i, tokio::time::timeout(PERIOD, stats).await.ok().flatten())
            });
        }
        let mut workers = vec![None; cells.len()];
        while let Some(Ok((i, stats))) = calls.join_next().await {
            workers[i] = stats;
        }
        let m = &self.cluster.metrics();
        for (cell, stats) in cells.iter().zip(&workers) {
            let (stage, shard) = (cell.stage.to_string(), cell.shard.to_string());
            m.worker_up
                .with(&[&cell.address, &stage, &shard])
                .set(if stats.is_some() { 1.0 } else { 0.0 });
        }
        let queue_depth = self.cluster.queued();
        m.queue_depth.set(queue_depth as f64);
        let now = Totals {
            tokens: m.generation_tokens.get(),
            finished: m.success.children().iter().map(|(_, c)| c.get()).sum(),
            ttft: (m.ttft.count(), m.ttft.sum()),
            itl: (m.itl.count(), m.itl.sum()),
        };
        let routed = self.routed_totals(&workers);

        let mut s = self.state.lock().expect("not poisoned");
        let last = std::mem::replace(&mut s.last, now);
        let mean = |(n1, s1): (u64, f64), (n0, s0): (u64, f64)| {
            (n1 > n0).then(|| (s1 - s0) / (n1 - n0) as f64)
        };
        let per_s = PERIOD.as_secs_f64();
        let point = Point {
            t: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            tokens_per_s: now.tokens.saturating_sub(last.tokens) as f64 / per_s,
            requests_per_s: now.finished.saturating_sub(last.finished) as f64 / per_s,
            ttft_s: mean(now.ttft, last.ttft),
            itl_s: mean(now.itl, last.itl),
            queue_depth,
            kv_usage: lanes
                .iter()
                .map(|l| {
                    let st = l.stats();
                    st.kv_blocks_used as f64 / st.kv_blocks_total.max(1) as f64
                })
                .collect(),
        };
        if s.history.len() == HISTORY {
            s.history.pop_front();
        }
        s.history.push_back(point);
        if s.routed.len() == HEAT_WINDOW + 1 {
            s.routed.pop_front();
        }
        s.routed.push_back(routed);
        let epoch = serving.as_ref().map_or(0, |s| s.placement.epoch);
        if s.epoch != epoch || s.workers.len() != workers.len() {
            s.epoch = epoch;
            s.workers = vec![Polled::default(); workers.len()];
        }
        for (kept, new) in s.workers.iter_mut().zip(workers) {
            kept.up = new.is_some();
            if let Some(stats) = new {
                kept.stats = stats;
            }
        }
    }

    /// The channel to `address`, made once.
    fn client(&self, address: &str) -> Option<WorkerClient<Channel>> {
        let mut clients = self.clients.lock().expect("not poisoned");
        if let Some(c) = clients.get(address) {
            return Some(c.clone());
        }
        let c = worker_client(channel(address).ok()?);
        clients.insert(address.to_string(), c.clone());
        Some(c)
    }

    fn dims(&self) -> (usize, usize) {
        let c = self.cluster.model();
        (c.num_layers, c.moe.map_or(0, |m| m.num_experts))
    }

    /// Routing totals summed over workers: each token is routed once per layer, by the worker
    /// of its lane that holds the layer.
    fn routed_totals(&self, workers: &[Option<pb::WorkerStats>]) -> Vec<u64> {
        let (layers, experts) = self.dims();
        let mut total = vec![0u64; layers * experts];
        for r in workers.iter().flatten().flat_map(|w| &w.routed) {
            let (l, e) = (r.layer as usize, r.expert as usize);
            if l < layers && e < experts {
                total[l * experts + e] += r.tokens;
            }
        }
        total
    }

    /// While no placement is served: history and recent requests only.
    fn empty(&self, s: &State) -> Snapshot {
        let (layers, experts) = self.dims();
        Snapshot {
            model: self.cluster.model_name().to_string(),
            stages: 0,
            shards: 0,
            epoch: 0,
            workers: Vec::new(),
            lanes: Vec::new(),
            queue_depth: self.cluster.queued(),
            history: s.history.iter().cloned().collect(),
            heatmap: HeatMap {
                layers,
                experts,
                window_s: 0,
                tokens: vec![vec![0; experts]; layers],
            },
            recent: self.cluster.metrics().recent(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let cluster = &self.cluster;
        let serving = cluster.serving();
        let s = self.state.lock().expect("not poisoned");
        let Some(sv) = serving.as_ref() else {
            return self.empty(&s);
        };
        let p = &sv.placement;
        // Not polled yet since this placement loaded: its workers just answered `Assign`.
        let fresh = vec![
            Polled {
                up: true,
                ..Polled::default()
            };
            p.cells.len()
        ];
        let polled = if s.epoch == p.epoch {
            &s.workers
        } else {
            &fresh
        };
        let workers = p
            .cells
            .iter()
            .zip(&sv.workers)
            .zip(polled)
            .map(|((cell, info), polled)| {
                let stats = &polled.stats;
                WorkerView {
                    address: cell.address.clone(),
                    stage: cell.stage,
                    shard: cell.shard,
                    device: info.inventory.device.clone(),
                    memory_bytes: info.inventory.memory_bytes,
                    weight_bytes: info.loaded.weight_bytes,
                    resident_bytes: info.loaded.resident_bytes,
                    layers: [cell.subset.layers.start, cell.subset.layers.end],
                    experts: p.experts[cell.shard].clone(),
                    up: polled.up,
                    steps: stats.steps,
                    step_seconds: stats.step_seconds,
                    exchange_bytes: stats.exchange_bytes_sent + stats.exchange_bytes_received,
                }
            })
            .collect();
        let lanes = sv
            .lanes
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let st = l.stats();
                LaneView {
                    lane: i,
                    running: st.running,
                    waiting: st.waiting,
                    kv_blocks_used: st.kv_blocks_used,
                    kv_blocks_total: st.kv_blocks_total,
                    preemptions: st.preemptions,
                }
            })
            .collect();
        let (layers, experts) = self.dims();
        let tokens = match (s.routed.front(), s.routed.back()) {
            (Some(old), Some(new)) if experts > 0 => (0..layers)
                .map(|l| {
                    (0..experts)
                        .map(|e| new[l * experts + e].saturating_sub(old[l * experts + e]))
                        .collect()
                })
                .collect(),
            _ => vec![vec![0; experts]; layers],
        };
        Snapshot {
            model: cluster.model_name().to_string(),
            stages: p.grid.stages,
            shards: p.grid.shards,
            epoch: p.epoch,
            workers,
            lanes,
            queue_depth: cluster.queued(),
            history: s.history.iter().cloned().collect(),
            heatmap: HeatMap {
                layers,
                experts,
                window_s: s.routed.len().saturating_sub(1) * PERIOD.as_secs() as usize,
                tokens,
            },
            recent: cluster.metrics().recent(),
        }
    }
}
