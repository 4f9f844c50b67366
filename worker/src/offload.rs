//! Expert offload: a worker keeps the experts of its part that fit `--expert-memory` resident
//! and reads the others from the checkpoint file when a token is routed to them.
//!
//! Reads go through `pread` into owned buffers ([`TensorOnDisk::read`]), never through the
//! file's memory map: the bytes of experts not kept never count in the process's memory, and a
//! file truncated or removed while served is an error on the request that needed it, not a
//! SIGBUS.
//!
//! The policy: every expert of the part has a score, the tokens routed to it decayed with a
//! half-life (frequency with recency). An expert read on a miss replaces the lowest-scored
//! resident expert when it scores higher, and is used once and dropped otherwise, so a cold
//! expert cannot push a hot one out. Reads run on one loader thread: a miss queues a read at
//! the front; [`ExpertStore::prefetch`] queues the experts the next layer's router would pick
//! for the current hidden state at the back, so they are read while this layer computes.
//! Experts are run in ascending id order whatever was resident, exactly as the all-resident
//! model runs them, so offload never changes a result (the sums are added in the same order).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use switchyard_metrics::{Counter, Family, Gauge, Registry};
use switchyard_model::{CheckpointError, HostWeight, Subset, TensorOnDisk};
use tracing::{debug, warn};

use crate::backend::{Backend, FfnWeights};

/// How a worker offloads its experts (`--expert-memory`, `--no-prefetch`, `--expert-stats`).
#[derive(Debug, Clone, PartialEq)]
pub struct Offload {
    /// Bytes of experts kept resident (as the backend keeps them), over all layers held.
    pub budget_bytes: u64,
    /// Read the experts the next layer's router would pick while this layer computes.
    pub prefetch: bool,
    /// Routing statistics: read at load to choose the experts resident before traffic, and
    /// written back as the worker routes ([`ExpertStore::save_stats`]).
    pub stats_file: Option<PathBuf>,
}

/// The expert cache's counters, per worker (registered with the worker's other metrics).
#[derive(Clone)]
pub struct ExpertCacheMetrics {
    pub hits: Arc<Counter>,
    pub misses: Arc<Counter>,
    pub bytes_paged_in: Arc<Counter>,
    pub prefetch_useful: Arc<Counter>,
    /// Resident experts by global layer.
    pub resident: Arc<Family<Gauge>>,
}

impl ExpertCacheMetrics {
    pub fn register(r: &Registry) -> Self {
        ExpertCacheMetrics {
            hits: r
                .counter(
                    "switchyard_expert_cache_hits_total",
                    "Expert uses (one per expert per MoE layer of a step) that found the expert resident.",
                    &[],
                )
                .with(&[]),
            misses: r
                .counter(
                    "switchyard_expert_cache_misses_total",
                    "Expert uses that found the expert not resident (read from the checkpoint, or already being read by a prefetch).",
                    &[],
                )
                .with(&[]),
            bytes_paged_in: r
                .counter(
                    "switchyard_expert_cache_bytes_paged_in_total",
                    "Bytes of experts read from the checkpoint file after load (misses and prefetches).",
                    &[],
                )
                .with(&[]),
            prefetch_useful: r
                .counter(
                    "switchyard_expert_cache_prefetch_useful_total",
                    "Misses whose expert a prefetch had already read or started reading.",
                    &[],
                )
                .with(&[]),
            resident: r.gauge(
                "switchyard_expert_cache_resident_experts",
                "Experts resident in memory, by layer (the others are read from the checkpoint on demand).",
                &["layer"],
            ),
        }
    }
}

impl ExpertCacheMetrics {
    /// Counts one MoE layer's uses of held experts as hits: for a part that keeps every
    /// expert resident (no `--expert-memory`), so the hit rate reads 100% there.
    pub fn count_resident_uses(&self, held: &Subset, routed: &[u32]) {
        let used: BTreeSet<u32> = routed
            .iter()
            .copied()
            .filter(|e| held.has_expert(*e as usize))
            .collect();
        self.hits.add(used.len() as u64);
    }
}

/// The `n` experts `routed` names most often (ties to the lower id): what a prefetch reads, so
/// a guess for a long prefill does not read (and hold) a whole layer.
pub(crate) fn most_routed(routed: &[u32], n: usize) -> Vec<u32> {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for &e in routed {
        match counts.iter_mut().find(|(x, _)| *x == e) {
            Some((_, c)) => *c += 1,
            None => counts.push((e, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.into_iter().take(n).map(|(e, _)| e).collect()
}

/// Why the expert store could not be made or could not give an expert.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error(
        "--expert-memory {budget} bytes is smaller than one expert ({expert} bytes as this \
         device keeps it); give at least {expert} bytes ({mib:.1} MiB), or leave it out to keep \
         every expert resident"
    )]
    BudgetTooSmall { budget: u64, expert: u64, mib: f64 },
    #[error("layer {layer}, expert {expert}: {source}")]
    Read {
        layer: usize,
        expert: u32,
        #[source]
        source: Arc<CheckpointError>,
    },
    #[error("expert statistics {path}: {problem}")]
    Stats { path: PathBuf, problem: String },
    #[error("cannot start the expert loader thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the expert loader thread stopped; see the log")]
    LoaderStopped,
}

/// The three matrices of one expert as the file holds them: gate (`w1`), up (`w3`), down (`w2`).
pub struct ExpertOnDisk {
    pub gate: TensorOnDisk,
    pub up: TensorOnDisk,
    pub down: TensorOnDisk,
}

impl ExpertOnDisk {
    fn read(&self) -> Result<FfnWeights<HostWeight>, CheckpointError> {
        Ok(FfnWeights {
            gate: self.gate.read()?,
            up: self.up.read()?,
            down: self.down.read()?,
        })
    }

    fn file_bytes(&self) -> u64 {
        (self.gate.len() + self.up.len() + self.down.len()) as u64
    }
}

/// The statistics file is written at most this often while tokens are routed.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Scores halve after this many MoE-layer uses per layer held (about this many steps).
const HALF_LIFE_STEPS: f64 = 64.0;

/// A read's progress, per (layer, expert). Only the loader thread and the consumers of the
/// store touch it, under [`Io`]'s lock.
enum Load {
    Idle,
    /// Queued or being read; `prefetch` until a consumer needs it.
    Reading {
        prefetch: bool,
    },
    Done {
        weights: Result<FfnWeights<HostWeight>, Arc<CheckpointError>>,
        prefetch: bool,
    },
}

struct Io {
    loads: Vec<Vec<Load>>,
    queue: VecDeque<(usize, u32)>,
    shutdown: bool,
}

/// What the loader thread shares with the store: no backend type, so it can be `'static`.
struct Loader {
    io: Mutex<Io>,
    /// A read finished.
    done: Condvar,
    /// A read was queued, or the store is dropped.
    queued: Condvar,
    /// Per local layer and expert id: `None` for experts the part does not hold.
    disk: Vec<Vec<Option<ExpertOnDisk>>>,
    metrics: ExpertCacheMetrics,
}

impl Loader {
    fn lock(&self) -> MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let mut io = self.lock();
            let (layer, expert) = loop {
                if io.shutdown {
                    return;
                }
                match io.queue.pop_front() {
                    Some(job) => break job,
                    None => io = self.queued.wait(io).unwrap_or_else(|p| p.into_inner()),
                }
            };
            // A prefetch dropped before its turn, or a read already done for a duplicate job.
            if !matches!(io.loads[layer][expert as usize], Load::Reading { .. }) {
                continue;
            }
            drop(io);
            let disk = self.disk[layer][expert as usize]
                .as_ref()
                .expect("reads are queued only for held experts");
            let weights = disk.read().map_err(Arc::new);
            if weights.is_ok() {
                self.metrics.bytes_paged_in.add(disk.file_bytes());
            }
            let mut io = self.lock();
            if let Load::Reading { prefetch } = io.loads[layer][expert as usize] {
                io.loads[layer][expert as usize] = Load::Done { weights, prefetch };
                self.done.notify_all();
            }
        }
    }
}

/// Resident experts and their scores, under the store's other lock (taken before [`Io`]'s
/// when both are held).
struct Cache<W> {
    resident: Vec<Vec<Option<Arc<FfnWeights<W>>>>>,
    /// Decayed token counts, and the tick each was last brought up to date at.
    score: Vec<Vec<(f64, u64)>>,
    resident_bytes: u64,
    tick: u64,
}

/// The experts of a model part's MoE layers, some resident, the others read on demand.
pub struct ExpertStore<W> {
    first_layer: usize,
    expert_bytes: u64,
    budget: u64,
    prefetch: bool,
    half_life_ticks: f64,
    stats_file: Option<PathBuf>,
    last_saved: Mutex<Instant>,
    cache: Mutex<Cache<W>>,
    loader: Arc<Loader>,
    thread: Option<JoinHandle<()>>,
}

impl<W> Drop for ExpertStore<W> {
    fn drop(&mut self) {
        if let Err(e) = self.save_stats() {
            warn!("{e}");
        }
        self.loader.lock().shutdown = true;
        self.loader.queued.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn decayed(score: (f64, u64), now: u64, half_life: f64) -> f64 {
    score.0 * 0.5f64.powf((now - score.1) as f64 / half_life)
}

impl<W: Send + Sync> ExpertStore<W> {
    /// A store over `disk` (per layer held, from global layer `first_layer`, per expert id),
    /// its experts costing `expert_bytes` each on `backend`; the experts that fit the budget
    /// are read now, hottest first by the statistics file when there is one (else the same
    /// number in every layer, lowest ids first), with their values checked. Every other
    /// expert is read once too, to check its values as a resident load would, and dropped.
    pub fn new<B: Backend<Weight = W>>(
        backend: &B,
        first_layer: usize,
        disk: Vec<Vec<Option<ExpertOnDisk>>>,
        offload: &Offload,
        metrics: ExpertCacheMetrics,
    ) -> Result<Self, crate::model::ModelError> {
        let expert_bytes = disk
            .iter()
            .flatten()
            .flatten()
            .map(|e| {
                [&e.gate, &e.up, &e.down]
                    .iter()
                    .map(|t| backend.kept_type(t.ty()).matrix_bytes(t.rows(), t.cols()))
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        if offload.budget_bytes < expert_bytes {
            return Err(OffloadError::BudgetTooSmall {
                budget: offload.budget_bytes,
                expert: expert_bytes,
                mib: expert_bytes as f64 / (1 << 20) as f64,
            }
            .into());
        }
        let layers = disk.len();
        let experts = disk.first().map_or(0, Vec::len);
        let mut score = vec![vec![(0.0, 0); experts]; layers];
        if let Some(path) = &offload.stats_file {
            if let Some(counts) = read_stats(path, first_layer, layers, experts)? {
                for (l, row) in counts.into_iter().enumerate() {
                    for (e, n) in row.into_iter().enumerate() {
                        score[l][e].0 = n;
                    }
                }
            }
        }
        // Warm order: hottest first; ties (no statistics) go round the layers, lowest ids first.
        let mut order: Vec<(usize, usize)> = (0..experts)
            .flat_map(|e| (0..layers).map(move |l| (l, e)))
            .filter(|&(l, e)| disk[l][e].is_some())
            .collect();
        order.sort_by(|a, b| score[b.0][b.1].0.total_cmp(&score[a.0][a.1].0));
        let mut resident: Vec<Vec<Option<Arc<FfnWeights<W>>>>> = (0..layers)
            .map(|_| (0..experts).map(|_| None).collect())
            .collect();
        let mut resident_bytes = 0;
        for (l, e) in order {
            let d = disk[l][e].as_ref().expect("filtered to held experts");
            let [gate, up, down] = [&d.gate, &d.up, &d.down].map(TensorOnDisk::read_checked);
            let (gate, up, down) = (gate?, up?, down?);
            if resident_bytes + expert_bytes <= offload.budget_bytes {
                resident[l][e] = Some(Arc::new(FfnWeights {
                    gate: backend.weight(gate)?,
                    up: backend.weight(up)?,
                    down: backend.weight(down)?,
                }));
                resident_bytes += expert_bytes;
            }
        }
        for (l, row) in resident.iter().enumerate() {
            metrics
                .resident
                .with(&[&(first_layer + l).to_string()])
                .set(row.iter().flatten().count() as f64);
        }
        let loader = Arc::new(Loader {
            io: Mutex::new(Io {
                loads: (0..layers)
                    .map(|_| (0..experts).map(|_| Load::Idle).collect())
                    .collect(),
                queue: VecDeque::new(),
                shutdown: false,
            }),
            done: Condvar::new(),
            queued: Condvar::new(),
            disk,
            metrics,
        });
        let thread = {
            let loader = loader.clone();
            std::thread::Builder::new()
                .name("expert-loader".into())
                .spawn(move || loader.run())
                .map_err(OffloadError::Thread)?
        };
        debug!(
            resident_bytes,
            expert_bytes,
            budget = offload.budget_bytes,
            "expert store loaded"
        );
        Ok(ExpertStore {
            first_layer,
            expert_bytes,
            budget: offload.budget_bytes,
            prefetch: offload.prefetch,
            half_life_ticks: HALF_LIFE_STEPS * layers.max(1) as f64,
            stats_file: offload.stats_file.clone(),
            last_saved: Mutex::new(Instant::now()),
            cache: Mutex::new(Cache {
                resident,
                score,
                resident_bytes,
                tick: 0,
            }),
            loader,
            thread: Some(thread),
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache<W>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether reads for the next layer are started ahead ([`ExpertStore::prefetch`]).
    pub fn prefetches(&self) -> bool {
        self.prefetch
    }

    /// The cache's counters.
    pub fn metrics(&self) -> &ExpertCacheMetrics {
        &self.loader.metrics
    }

    /// Bytes of one expert as kept.
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    /// Resident experts per layer held.
    pub fn resident_per_layer(&self) -> Vec<usize> {
        let c = self.cache();
        c.resident
            .iter()
            .map(|r| r.iter().flatten().count())
            .collect()
    }

    /// The expert ids resident in local layer `layer`.
    pub fn resident_experts(&self, layer: usize) -> Vec<u32> {
        let c = self.cache();
        c.resident[layer]
            .iter()
            .enumerate()
            .filter(|(_, w)| w.is_some())
            .map(|(e, _)| e as u32)
            .collect()
    }

    /// Starts reading the experts of local layer `layer` among `experts` that are neither
    /// resident nor on their way; they wait for that layer's [`ExpertStore::run_layer`].
    pub fn prefetch(&self, layer: usize, experts: &[u32]) {
        let c = self.cache();
        let mut io = self.loader.lock();
        let mut queued = false;
        for &e in experts {
            let held = self.loader.disk[layer]
                .get(e as usize)
                .is_some_and(Option::is_some);
            if held
                && c.resident[layer][e as usize].is_none()
                && matches!(io.loads[layer][e as usize], Load::Idle)
            {
                io.loads[layer][e as usize] = Load::Reading { prefetch: true };
                io.queue.push_back((layer, e));
                queued = true;
            }
        }
        drop(io);
        drop(c);
        if queued {
            self.loader.queued.notify_one();
        }
    }

    /// Runs `run(expert, weights)` for each expert of local layer `layer` that this part holds
    /// and `routed` names (top-k ids per token), in ascending expert id. Resident experts run
    /// at once; the reads of the others are all queued first, and each waits only for its own.
    /// `next` (a local layer and the experts its router would pick) is prefetched once this
    /// layer's own reads are queued, so they go first.
    pub fn run_layer(
        &self,
        backend: &impl Backend<Weight = W>,
        layer: usize,
        routed: &[u32],
        next: Option<(usize, &[u32])>,
        mut run: impl FnMut(u32, &FfnWeights<W>) -> Result<(), crate::model::ModelError>,
    ) -> Result<(), crate::model::ModelError> {
        let disk = &self.loader.disk[layer];
        let mut counts = vec![0u32; disk.len()];
        for &e in routed {
            if let Some(n) = counts.get_mut(e as usize) {
                *n += 1;
            }
        }
        let needed: Vec<u32> = (0..disk.len())
            .filter(|&e| counts[e] > 0 && disk[e].is_some())
            .map(|e| e as u32)
            .collect();
        {
            let mut c = self.cache();
            c.tick += 1;
            let now = c.tick;
            let mut io = self.loader.lock();
            let m = &self.loader.metrics;
            let mut queued = false;
            for &e in &needed {
                let s = &mut c.score[layer][e as usize];
                *s = (
                    decayed(*s, now, self.half_life_ticks) + counts[e as usize] as f64,
                    now,
                );
                if c.resident[layer][e as usize].is_some() {
                    m.hits.inc();
                    continue;
                }
                m.misses.inc();
                match &mut io.loads[layer][e as usize] {
                    Load::Idle => {
                        io.loads[layer][e as usize] = Load::Reading { prefetch: false };
                        io.queue.push_front((layer, e));
                        queued = true;
                    }
                    Load::Reading { prefetch } | Load::Done { prefetch, .. } => {
                        if *prefetch {
                            m.prefetch_useful.inc();
                            *prefetch = false;
                        }
                    }
                }
            }
            if queued {
                self.loader.queued.notify_one();
            }
        }
        if let Some((next, experts)) = next {
            self.prefetch(next, experts);
        }
        let result = needed.iter().try_for_each(|&e| {
            let w = self.get(backend, layer, e)?;
            run(e, &w)
        });
        self.drop_unused_prefetches(layer);
        if self.stats_file.is_some() {
            let mut last = self.last_saved.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= SAVE_EVERY {
                *last = Instant::now();
                drop(last);
                if let Err(e) = self.save_stats() {
                    warn!("{e}");
                }
            }
        }
        result
    }

    /// Prefetched experts of `layer` that its routing did not pick: dropped (a read under
    /// way is discarded when it finishes), so they hold no memory past their layer.
    fn drop_unused_prefetches(&self, layer: usize) {
        let mut io = self.loader.lock();
        for load in &mut io.loads[layer] {
            if matches!(
                load,
                Load::Reading { prefetch: true } | Load::Done { prefetch: true, .. }
            ) {
                *load = Load::Idle;
            }
        }
    }

    /// Expert `e` of local layer `layer`: resident, or waited for and converted (and admitted
    /// to the resident set if it scores above the lowest resident expert).
    fn get(
        &self,
        backend: &impl Backend<Weight = W>,
        layer: usize,
        e: u32,
    ) -> Result<Arc<FfnWeights<W>>, crate::model::ModelError> {
        let host = loop {
            if let Some(w) = &self.cache().resident[layer][e as usize] {
                return Ok(w.clone());
            }
            let mut io = self.loader.lock();
            match std::mem::replace(&mut io.loads[layer][e as usize], Load::Idle) {
                Load::Done { weights, .. } => break weights,
                Load::Idle => {
                    // Another consumer used it and did not keep it: read it again.
                    io.loads[layer][e as usize] = Load::Reading { prefetch: false };
                    io.queue.push_front((layer, e));
                    self.loader.queued.notify_one();
                }
                reading @ Load::Reading { .. } => {
                    io.loads[layer][e as usize] = reading;
                    // Woken by each finished read; the timeout only notices a loader that
                    // died (a panic), which would otherwise leave this step waiting forever.
                    let timeout = Duration::from_secs(1);
                    let waited = self.loader.done.wait_timeout(io, timeout);
                    drop(waited.unwrap_or_else(|p| p.into_inner()));
                    if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                        return Err(OffloadError::LoaderStopped.into());
                    }
                }
            }
        };
        let host = host.map_err(|source| OffloadError::Read {
            layer: self.first_layer + layer,
            expert: e,
            source,
        })?;
        let w = Arc::new(FfnWeights {
            gate: backend.weight(host.gate)?,
            up: backend.weight(host.up)?,
            down: backend.weight(host.down)?,
        });
        self.admit(layer, e, &w);
        Ok(w)
    }

    /// Keeps `w` resident if it fits, or if it scores above the lowest-scored resident
    /// expert, which it then replaces.
    fn admit(&self, layer: usize, e: u32, w: &Arc<FfnWeights<W>>) {
        let mut c = self.cache();
        let now = c.tick;
        let h = self.half_life_ticks;
        let mut changed = vec![layer];
        if c.resident_bytes + self.expert_bytes > self.budget {
            let mine = decayed(c.score[layer][e as usize], now, h);
            let victim = c
                .resident
                .iter()
                .enumerate()
                .flat_map(|(l, row)| {
                    row.iter()
                        .enumerate()
                        .filter(|(_, w)| w.is_some())
                        .map(move |(e, _)| (l, e))
                })
                .map(|(l, e)| (decayed(c.score[l][e], now, h), l, e))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            match victim {
                Some((s, l, v)) if s < mine => {
                    c.resident[l][v] = None;
                    c.resident_bytes -= self.expert_bytes;
                    changed.push(l);
                }
                _ => return,
            }
        }
        c.resident[layer][e as usize] = Some(w.clone());
        c.resident_bytes += self.expert_bytes;
        for l in changed {
            let n = c.resident[l].iter().flatten().count();
            self.loader
                .metrics
                .resident
                .with(&[&(self.first_layer + l).to_string()])
                .set(n as f64);
        }
    }
}

impl<W> ExpertStore<W> {
    /// Writes the routing scores to the statistics file (when there is one), for the next
    /// start to load the hottest experts before it takes traffic.
    pub fn save_stats(&self) -> Result<(), OffloadError> {
        let Some(path) = &self.stats_file else {
            return Ok(());
        };
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = c.tick;
        let layers: Vec<serde_json::Value> = c
            .score
            .iter()
            .enumerate()
            .map(|(l, row)| {
                serde_json::json!({
                    "layer": self.first_layer + l,
                    "scores": row.iter().map(|s| decayed(*s, now, self.half_life_ticks)).collect::<Vec<_>>(),
                })
            })
            .collect();
        drop(c);
        let text = serde_json::to_string_pretty(&serde_json::json!({ "layers": layers }))
            .expect("numbers and arrays serialize");
        let bad = |e: std::io::Error| OffloadError::Stats {
            path: path.clone(),
            problem: e.to_string(),
        };
        // Written beside and renamed, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(bad)?;
        std::fs::rename(&tmp, path).map_err(bad)
    }
}

/// The scores of `layers` layers from `first_layer`, `experts` each, from a statistics file
/// ([`ExpertStore::save_stats`]); `None` when the file does not exist yet. Layers the file
/// does not name score 0.
fn read_stats(
    path: &Path,
    first_layer: usize,
    layers: usize,
    experts: usize,
) -> Result<Option<Vec<Vec<f64>>>, OffloadError> {
    let bad = |problem: String| OffloadError::Stats {
        path: path.to_path_buf(),
        problem,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let entries = json
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| bad("expected an object with an array `layers`".into()))?;
    let mut out = vec![vec![0.0; experts]; layers];
    for entry in entries {
        let layer = entry
            .get("layer")
            .and_then(|l| l.as_u64())
            .ok_or_else(|| bad("a layer entry without a whole `layer` number".into()))?
            as usize;
        let scores = entry
            .get("scores")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("layer {layer}: expected an array `scores`")))?;
        if scores.len() != experts {
            return Err(bad(format!(
                "layer {layer}: {} scores; the model has {experts} experts",
                scores.len()
            )));
        }
        let Some(local) = layer.checked_sub(first_layer).filter(|l| *l < layers) else {
            continue;
        };
        for (e, s) in scores.iter().enumerate() {
            let s = s
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    bad(format!(
                        "layer {layer}, expert {e}: expected a finite score ≥ 0, found {s}"
                    ))
                })?;
            out[local][e] = s;
        }
    }
    if out.iter().flatten().all(|s| *s == 0.0) {
        warn!(path = %path.display(), "expert statistics hold no routed tokens for this part");
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_reads_the_most_routed_experts() {
        assert_eq!(most_routed(&[3, 1, 3, 2, 1, 3, 0, 2], 2), vec![3, 1]);
        assert_eq!(most_routed(&[5, 4], 3), vec![4, 5]);
        assert!(most_routed(&[], 2).is_empty());
    }

    #[test]
    fn statistics_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert!(read_stats(&path, 0, 2, 4).unwrap().is_none());
        std::fs::write(&path, r#"{"layers": [{"layer": 3, "scores": [1, 2, 3, 4]}, {"layer": 1, "scores": [0, 0, 9, 0]}]}"#).unwrap();
        // Layers 1..3 held: layer 3 is someone else's.
        let s = read_stats(&path, 1, 2, 4).unwrap().unwrap();
        assert_eq!(s, vec![vec![0.0, 0.0, 9.0, 0.0], vec![0.0; 4]]);
        for (text, expected) in [
            ("[]", "an array `layers`"),
            (
                r#"{"layers": [{"layer": 1, "scores": [1]}]}"#,
                "1 scores; the model has 4 experts",
            ),
            (
                r#"{"layers": [{"layer": 1, "scores": [1, -2, 0, 0]}]}"#,
                "expert 1: expected a finite score",
            ),
            ("{", "not valid JSON"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read_stats(&path, 1, 2, 4).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("s.json"), "{text}: {e}");
        }
    }
}
