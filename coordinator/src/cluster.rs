//! The cluster: the model, the placement being served with one lane driver per grid column,
//! and the requests between placements.
//!
//! A placement comes up in one transition ([`Cluster::transition`]): plan it from the workers'
//! inventory, stop the lanes of the previous placement (their requests are kept, to be
//! recomputed), assign every worker its part (they load in parallel), run a warm-up step
//! through every lane (so every worker's weights, attention, exchange and head have run
//! once), then start the new lanes and hand them the waiting requests. Only then is the cluster
//! ready (health `SERVING`). Between placements requests wait ("parked"), bounded by their
//! deadline and the recovery timeout: they end with `UNAVAILABLE` saying why, never hang.
//! What triggers a transition (a worker lost, drained or added) is [`crate::membership`]'s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchyard_model::{Checkpoint, CheckpointError, ModelConfig, Tokenizer, TokenizerError};
use switchyard_net::grpc::{channel, worker_client};
use switchyard_proto::v1 as pb;
use switchyard_scheduler::{
    kv_blocks, Invalid, PromptInput, Request, Scheduler, SchedulerConfig, ValidRequest, Validator,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;
use tracing::{info, warn};

use crate::lane::{Admitted, Lane, LaneConfig, LaneFailure, Work, MAX_MOVES};
use crate::metrics::Metrics;
use crate::placement::{self, grids_for, plan, Grid, Inventory, Placement, PlanError, PlanOptions};
use crate::role::{ProcessRole, Role};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model_dir: PathBuf,
    /// The grid wanted; with fewer healthy workers, the best grid within it that they fill.
    pub grid: Grid,
    /// Worker addresses of a static cluster (no etcd); cell `(p, e)` is `workers[p * E + e]`.
    pub workers: Vec<String>,
    pub plan: PlanOptions,
    pub max_step_tokens: usize,
    pub max_running: usize,
    /// Requests waiting for a lane beyond this are refused (`RESOURCE_EXHAUSTED`).
    pub max_queue: usize,
    /// Deadline of a request that brings none.
    pub request_timeout: Option<Duration>,
    /// How long a worker may take to answer a probe (inventory).
    pub connect_timeout: Duration,
    /// A step without an answer by then counts as a failed worker.
    pub step_timeout: Duration,
    /// How long assigning and warming up a placement may take.
    pub load_timeout: Duration,
    /// How long a request waits for a placement before it ends with `UNAVAILABLE`.
    pub recovery_timeout: Duration,
    /// How long a draining worker's or coordinator's requests may take to finish.
    pub drain_grace: Duration,
    /// Each lane keeps the K/V of full blocks for sequences that start with the same tokens
    /// (`switchyard_scheduler::kv_blocks`).
    pub prefix_caching: bool,
    /// How a request picks its lane.
    pub routing: Routing,
}

/// How a new request picks its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// The lane whose prefix cache holds the longest prefix of the prompt, unless that lane
    /// is overloaded ([`overloaded`]); ties (no lane holding any of it, too) go to the least
    /// loaded. Without the prefix cache, the same as `LeastLoaded`.
    #[default]
    CacheAware,
    /// The lane with the fewest requests, running or queued.
    LeastLoaded,
}

/// A lane that cache-aware routing passes over although it holds the longest prefix: a
/// request sent there would queue (it already holds `max_running` requests) or the lane
/// holds a quarter of `max_running` (at least 4) more requests than the least loaded one.
/// Computing a prefix again costs one prefill; waiting behind a full lane costs whole
/// generations, and a lane that holds every popular prefix must not take all the traffic
/// (SGLang's router likewise falls back to balancing when the load gap grows too large).
/// The least loaded lane is never overloaded.
fn overloaded(load: usize, least: usize, max_running: usize) -> bool {
    load > least && (load >= max_running || load - least >= (max_running / 4).max(4))
}

impl ClusterConfig {
    pub fn new(model_dir: PathBuf, grid: Grid, workers: Vec<String>) -> Self {
        ClusterConfig {
            model_dir,
            grid,
            workers,
            plan: PlanOptions::default(),
            max_step_tokens: 512,
            max_running: 64,
            max_queue: 1024,
            request_timeout: None,
            connect_timeout: Duration::from_secs(5),
            step_timeout: Duration::from_secs(10),
            load_timeout: Duration::from_secs(300),
            recovery_timeout: Duration::from_secs(30),
            drain_grace: Duration::from_secs(30),
            prefix_caching: true,
            routing: Routing::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting that cannot work (a block of 0 tokens, a step of 0 tokens, …).
    #[error("{0}")]
    Setting(String),
    #[error("model directory {dir}: {source}")]
    Model {
        dir: String,
        source: CheckpointError,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("worker {address} did not answer: {reason}")]
    Unreachable { address: String, reason: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("worker {address} could not load its part: {reason}")]
    Assign { address: String, reason: String },
    /// No worker is named: any of them may be the slow one.
    #[error("the placement was not loaded within {0:?}")]
    LoadTimeout(Duration),
    #[error("the warm-up step through lane {lane} failed: {reason}")]
    WarmUp { lane: usize, reason: String },
}

impl StartError {
    /// The worker at fault, where one is known.
    pub fn worker(&self) -> Option<&str> {
        match self {
            StartError::Unreachable { address, .. } | StartError::Assign { address, .. } => {
                Some(address)
            }
            _ => None,
        }
    }
}

/// What each worker reported, and what it loaded.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub inventory: Inventory,
    pub loaded: pb::AssignResponse,
}

/// A placement being served: its workers and lanes.
pub struct Serving {
    pub placement: Placement,
    pub workers: Vec<WorkerInfo>,
    pub lanes: Vec<Lane>,
    /// An empty scheduler with the lanes' limits: checks requests before they are queued.
    pub checker: Scheduler,
}

/// A request waiting for a placement.
struct Parked {
    admitted: Admitted,
    since: Instant,
}

/// The model and whatever placement serves it now.
pub struct Cluster {
    model_name: String,
    /// The model's files, headers read (its tensors' stored types size the placement).
    checkpoint: Checkpoint,
    /// The model and its tokenizer, and the checks every request passes before it is queued.
    validator: Validator,
    config: ClusterConfig,
    /// Sequence ids, which also name requests that come without an id.
    next_seq: AtomicU64,
    /// Requests moved off a placement that ended, to be recomputed.
    moved: AtomicU64,
    metrics: Arc<Metrics>,
    serving: RwLock<Option<Arc<Serving>>>,
    parked: Mutex<Vec<Parked>>,
    /// Why nothing is served, for the requests that wait or are refused.
    why_not: Mutex<String>,
    ready: watch::Sender<bool>,
    /// Leading, standing by (the APIs forward to the leader; what reaches the cluster itself
    /// is refused) or draining (new requests are refused).
    role: ProcessRole,
    failures: mpsc::UnboundedSender<LaneFailure>,
    /// Held by the membership loop that handles them.
    failures_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<LaneFailure>>>,
    /// Checks requests while no placement is served: everything but the KV fit, which the
    /// lane checks again when the request arrives there.
    loose_checker: Scheduler,
}

impl Cluster {
    /// The model, with no placement yet.
    pub fn new(config: ClusterConfig) -> Result<Arc<Cluster>, StartError> {
        for (name, value) in [
            ("block_size", config.plan.block_size),
            ("max_step_tokens", config.max_step_tokens),
            ("max_running", config.max_running),
        ] {
            if value == 0 {
                return Err(StartError::Setting(format!(
                    "{name} is 0; expected at least 1"
                )));
            }
        }
        let dir = config.model_dir.clone();
        let checkpoint = Checkpoint::open(&dir).map_err(|source| StartError::Model {
            dir: dir.display().to_string(),
            source,
        })?;
        let model = checkpoint.config().clone();
        let tokenizer = Tokenizer::for_checkpoint(&checkpoint)?.map(Arc::new);
        let model_name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        let block_size = config.plan.block_size;
        let loose_checker = Scheduler::new(
            SchedulerConfig {
                block_size,
                num_blocks: model.max_position_embeddings.div_ceil(block_size) + 2,
                max_step_tokens: config.max_step_tokens,
                max_running: config.max_running,
                prefix_caching: false,
                cache_salt: 0,
            },
            model.clone(),
            tokenizer.clone(),
        );
        let (failures, failures_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Cluster {
            model_name,
            checkpoint,
            validator: Validator::new(model, tokenizer),
            config,
            next_seq: AtomicU64::new(1),
            moved: AtomicU64::new(0),
            metrics: Arc::default(),
            serving: RwLock::new(None),
            parked: Mutex::new(Vec::new()),
            why_not: Mutex::new("no placement yet: waiting for workers".into()),
            ready: watch::Sender::new(false),
            role: ProcessRole::default(),
            failures,
            failures_rx: Arc::new(tokio::sync::Mutex::new(failures_rx)),
            loose_checker,
        }))
    }

    /// A static cluster over `config.workers`, serving once this returns; a worker that does
    /// not answer or cannot load its part is an error. Failures later on are recovered from
    /// by [`crate::membership::run_static`], which the caller starts.
    pub async fn start(config: ClusterConfig) -> Result<Arc<Cluster>, StartError> {
        let cluster = Cluster::new(config)?;
        let inventories = probe_all(&cluster.config.workers, cluster.config.connect_timeout)
            .await
            .into_iter()
            .map(|r| r.map(|(inventory, _)| inventory))
            .collect::<Result<Vec<_>, _>>()?;
        cluster.transition(inventories, 1).await?;
        Ok(cluster)
    }

    /// The placement served now, if any.
    pub fn serving(&self) -> Option<Arc<Serving>> {
        self.serving.read().expect("not poisoned").clone()
    }

    /// Changes of readiness: true while a complete, warmed-up placement serves.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Lane failures, for the membership loop that handles them.
    pub(crate) fn failures(&self) -> Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<LaneFailure>>> {
        self.failures_rx.clone()
    }

    pub(crate) fn set_why_not(&self, why: String) {
        *self.why_not.lock().expect("not poisoned") = why;
    }

    /// The served model's directory name: its id in both APIs.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn model(&self) -> &ModelConfig {
        self.validator.model()
    }

    /// The model's tokenizer, or why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer, Invalid> {
        self.validator.tokenizer()
    }

    /// A prompt's token ids.
    pub fn tokenize(&self, input: PromptInput<'_>) -> Result<Vec<u32>, Invalid> {
        self.validator.tokenize(input)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The part this coordinator plays, and the election as it sees it.
    pub fn role(&self) -> &ProcessRole {
        &self.role
    }

    /// A new sequence id, unique in this coordinator.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Requests moved off placements that ended, so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Checks a request before it is queued: against the model, and whether the lanes' KV
    /// pools could ever hold it.
    pub fn check(&self, req: Request) -> Result<ValidRequest, Invalid> {
        match self.serving() {
            Some(s) => s.checker.check(req),
            None => self.loose_checker.check(req),
        }
    }

    /// Requests not running yet: waiting for a placement, or queued on a lane.
    pub fn queued(&self) -> usize {
        let parked = self.parked.lock().expect("not poisoned").len();
        parked
            + self
                .serving()
                .map_or(0, |s| s.lanes.iter().map(Lane::queued).sum())
    }

    /// Takes a new request: to the least loaded lane taking requests, or to wait for one.
    pub fn submit(&self, admitted: Admitted) -> Result<(), Status> {
        match self.role.get() {
            Role::Leading => {}
            Role::Standby => {
                return Err(Status::unavailable(
                    "this coordinator is a standby: another one leads the cluster (its calls \
                     are forwarded there); retry",
                ))
            }
            Role::Draining => {
                return Err(Status::unavailable(
                    "this coordinator is shutting down; retry on another",
                ))
            }
        }
        if let Some(admitted) = self.route(admitted) {
            self.park(admitted, Instant::now());
        }
        Ok(())
    }

    fn park(&self, admitted: Admitted, since: Instant) {
        self.parked
            .lock()
            .expect("not poisoned")
            .push(Parked { admitted, since });
    }

    /// Hands a request to a lane taking requests ([`Routing`]); gives it back if none does.
    fn route(&self, admitted: Admitted) -> Option<Admitted> {
        let lane = self.serving().and_then(|s| self.pick_lane(&s, &admitted));
        match lane {
            Some(lane) => lane.submit(admitted).err().map(|a| *a),
            None => Some(admitted),
        }
    }

    /// The lane for a request, by [`Routing`]: the most blocks of its prompt cached, then the
    /// fewest requests, then the first.
    fn pick_lane(&self, s: &Serving, admitted: &Admitted) -> Option<Lane> {
        let lanes: Vec<(&Lane, usize)> = s
            .lanes
            .iter()
            .filter(|l| !l.is_draining())
            .map(|l| (l, l.load()))
            .collect();
        let least = lanes.iter().map(|(_, load)| *load).min()?;
        let hashes = match self.config.routing {
            Routing::CacheAware if self.config.prefix_caching && lanes.len() > 1 => {
                // The lanes' schedulers hash with the placement's epoch as the salt.
                kv_blocks::block_hashes(
                    s.placement.epoch,
                    s.placement.block_size,
                    admitted.tokens(),
                )
            }
            _ => Vec::new(),
        };
        let max_running = self.config.max_running;
        lanes
            .iter()
            .enumerate()
            .filter(|(_, (_, load))| !overloaded(*load, least, max_running))
            .max_by_key(|(i, (lane, load))| {
                let cached = match hashes.is_empty() {
                    true => 0,
                    false => lane.cached_prefix(&hashes),
                };
                (cached, std::cmp::Reverse(*load), std::cmp::Reverse(*i))
            })
            .map(|(_, (lane, _))| (*lane).clone())
    }

    /// Ends or re-routes waiting requests: those whose client left, whose deadline passed,
    /// or that waited longer than the recovery timeout, end; the rest go to a lane if one
    /// takes requests now. Called periodically by the membership loop.
    pub fn tend_parked(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().expect("not poisoned"));
        if parked.is_empty() {
            return;
        }
        let why = self.why_not.lock().expect("not poisoned").clone();
        let now = Instant::now();
        for p in parked {
            let a = &p.admitted;
            let end = if a.life.out.is_closed() {
                continue;
            } else if a.life.deadline.is_some_and(|d| d <= now) {
                Status::deadline_exceeded(
                    "the request's deadline passed while it waited for a placement",
                )
            } else if a.life.moves > MAX_MOVES {
                Status::unavailable(format!(
                    "the request was recomputed on {MAX_MOVES} placements and failed each time; last trouble: {why}"
                ))
            } else if now - p.since >= self.config.recovery_timeout {
                Status::unavailable(format!(
                    "no placement could serve the request within {:?}: {why}",
                    self.config.recovery_timeout
                ))
            } else {
                if let Some(admitted) = self.route(p.admitted) {
                    self.park(admitted, p.since);
                }
                continue;
            };
            p.admitted.life.close(Err(end));
        }
    }

    /// Stops serving the current placement; its requests wait for the next one.
    pub async fn stop_serving(&self, why: &str) {
        let old = self.serving.write().expect("not poisoned").take();
        let _ = self.ready.send_replace(false);
        self.set_why_not(why.to_string());
        let Some(old) = old else { return };
        info!(epoch = old.placement.epoch, "stopping placement: {why}");
        let mut moved = Vec::new();
        for lane in &old.lanes {
            moved.extend(lane.stop().await);
        }
        let n = moved
            .iter()
            .filter(|a| matches!(a.work, Work::Moved(_)))
            .count();
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        self.parked
            .lock()
            .expect("not poisoned")
            .extend(moved.into_iter().map(|admitted| Parked {
                admitted,
                since: now,
            }));
    }

    /// Ends every request held with `UNAVAILABLE` and `why` (the coordinator goes away).
    pub async fn fail_all(&self, why: &str) {
        let status = Status::unavailable(why);
        self.stop_serving(why).await;
        for p in std::mem::take(&mut *self.parked.lock().expect("not poisoned")) {
            p.admitted.life.close(Err(status.clone()));
        }
    }

    /// Refuses new requests from now on (in-flight ones go on).
    pub fn stop_admitting(&self) {
        self.role.drain();
        let _ = self.ready.send_replace(false);
    }

    /// No request is held anywhere.
    pub fn is_idle(&self) -> bool {
        self.parked.lock().expect("not poisoned").is_empty()
            && self
                .serving()
                .is_none_or(|s| s.lanes.iter().all(Lane::is_idle))
    }

    /// Plans a placement of `epoch` over `workers` (in order of preference), stops the
    /// current one, loads and warms up the new one and serves it. On an error nothing is
    /// served (the requests wait) unless planning itself failed, which changes nothing.
    pub async fn transition(
        &self,
        workers: Vec<Inventory>,
        epoch: u64,
    ) -> Result<Arc<Serving>, StartError> {
        let placement = self.plan(&workers, epoch)?;
        info!("{placement}");
        self.stop_serving("a new placement is loading").await;
        let t = Instant::now();
        let loaded = match tokio::time::timeout(
            self.config.load_timeout,
            assign_all(&self.config, &placement),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(StartError::LoadTimeout(self.config.load_timeout)),
        };
        let mut lanes_clients = Vec::new();
        for shard in 0..placement.grid.shards {
            let stage0 = placement.cell(0, shard).address.clone();
            let client = worker_client(channel(&stage0).map_err(|e| StartError::Unreachable {
                address: stage0.clone(),
                reason: e.to_string(),
            })?);
            lanes_clients.push(client);
        }
        warm_up(&lanes_clients, epoch, self.config.step_timeout).await?;
        info!(epoch, "placement loaded and warmed up in {:?}", t.elapsed());

        let scheduler_config = SchedulerConfig {
            block_size: placement.block_size,
            num_blocks: placement.kv_blocks,
            max_step_tokens: self.config.max_step_tokens,
            max_running: self.config.max_running,
            prefix_caching: self.config.prefix_caching,
            // What else a block's K/V depend on: the model and the workers of this placement.
            // A router's hashes must use the same salt (`pick_lane`).
            cache_salt: epoch,
        };
        let scheduler = || {
            Scheduler::new(
                scheduler_config.clone(),
                self.model().clone(),
                self.validator.shared_tokenizer(),
            )
        };
        let lanes = lanes_clients
            .into_iter()
            .enumerate()
            .map(|(lane, client)| {
                let config = LaneConfig {
                    lane,
                    epoch,
                    max_in_flight: placement.grid.stages,
                    step_timeout: self.config.step_timeout,
                };
                Lane::spawn(
                    scheduler(),
                    client,
                    config,
                    self.failures.clone(),
                    self.metrics.clone(),
                )
            })
            .collect();
        let workers = workers
            .into_iter()
            .zip(loaded)
            .map(|(inventory, loaded)| WorkerInfo { inventory, loaded })
            .collect();
        let m = &self.metrics;
        m.epoch.set(placement.epoch as f64);
        // The labels name the placement's cells: forget the last placement's.
        m.worker_ready.clear();
        m.worker_up.clear();
        m.running.clear();
        m.waiting.clear();
        m.kv_usage.clear();
        for cell in &placement.cells {
            let (stage, shard) = (cell.stage.to_string(), cell.shard.to_string());
            let labels = [cell.address.as_str(), &stage, &shard];
            m.worker_ready.with(&labels).set(1.0);
            m.worker_up.with(&labels).set(1.0);
        }
        let serving = Arc::new(Serving {
            placement,
            workers,
            lanes,
            checker: scheduler(),
        });
        *self.serving.write().expect("not poisoned") = Some(serving.clone());
        let _ = self.ready.send_replace(true);
        // Requests moved off the last placement go first: they were admitted earlier.
        let parked = std::mem::take(&mut *self.parked.lock().expect("not poisoned"));
        let (moved, new): (Vec<_>, Vec<_>) = parked
            .into_iter()
            .partition(|p| matches!(p.admitted.work, Work::Moved(_)));
        let mut parked = self.parked.lock().expect("not poisoned");
        parked.extend(moved);
        parked.extend(new);
        drop(parked);
        self.tend_parked();
        Ok(serving)
    }

    /// The best placement of `epoch` the workers can hold, within the configured grid.
    pub(crate) fn plan(&self, workers: &[Inventory], epoch: u64) -> Result<Placement, PlanError> {
        let mut first_error = None;
        for grid in grids_for(self.config.grid, workers.len()) {
            match plan(
                self.model(),
                &|subset| placement::stored_bytes(&self.checkpoint, subset),
                grid,
                &workers[..grid.cells()],
                self.config.plan,
                epoch,
            ) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(PlanError::WorkerCount {
            grid: self.config.grid,
            needed: 1,
            given: 0,
        }))
    }
}

/// Asks each worker what it has (and which epoch it holds), each within `timeout`.
pub async fn probe_all(
    addresses: &[String],
    timeout: Duration,
) -> Vec<Result<(Inventory, pb::InventoryResponse), StartError>> {
    let mut calls = JoinSet::new();
    for (i, address) in addresses.iter().enumerate() {
        let address = address.clone();
        calls.spawn(async move { (i, probe(address, timeout).await) });
    }
    let mut out: Vec<_> = (0..addresses.len()).map(|_| None).collect();
    while let Some(r) = calls.join_next().await {
        let (i, r) = r.expect("probe tasks do not panic");
        out[i] = Some(r);
    }
    out.into_iter()
        .map(|r| r.expect("every probe answered"))
        .collect()
}

async fn probe(
    address: String,
    timeout: Duration,
) -> Result<(Inventory, pb::InventoryResponse), StartError> {
    let unreachable = |reason: String| StartError::Unreachable {
        address: address.clone(),
        reason,
    };
    let mut client = worker_client(channel(&address).map_err(|e| unreachable(e.to_string()))?);
    let reply = tokio::time::timeout(timeout, client.inventory(pb::InventoryRequest {}))
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(|s| unreachable(s.message().to_string()))?
        .into_inner();
    Ok((
        Inventory {
            address: address.clone(),
            device: reply.device.clone(),
            memory_bytes: reply.memory_bytes,
            available_bytes: reply.available_bytes,
            // A worker that does not say stores f32.
            value_bytes: match reply.value_bytes {
                0 => 4,
                n => n.into(),
            },
            keeps_stored_weights: reply.keeps_stored_weights,
            expert_memory: (reply.expert_memory_bytes > 0).then_some(reply.expert_memory_bytes),
        },
        reply,
    ))
}

/// Tells workers that are no longer in the placement to drop their parts.
pub async fn release(addresses: &[String], epoch: u64, timeout: Duration) {
    for address in addresses {
        let Ok(ch) = channel(address) else { continue };
        let mut client = worker_client(ch);
        let call = client.release(pb::ReleaseRequest { epoch });
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(_)) => info!(worker = %address, "released"),
            Ok(Err(s)) => warn!(worker = %address, "release refused: {}", s.message()),
            Err(_) => warn!(worker = %address, "release got no answer"),
        }
    }
}

/// One step of one token through a lane at `epoch`: the warm-up step.
pub fn warm_up_step(epoch: u64) -> pb::StepRequest {
    pb::StepRequest {
        epoch,
        step_id: u64::MAX,
        seqs: vec![pb::SeqWork {
            seq_id: 0,
            tokens: vec![0],
            start_pos: 0,
            // Block 0 holds garbage afterwards; a sequence that gets it overwrites it before
            // reading it.
            block_table: vec![0],
            logits: pb::LogitsWanted::LogitsLast as i32,
            draw: Some(pb::Draw::default()),
            ..Default::default()
        }],
        hidden: None,
        request_ids: vec!["warm-up".into()],
    }
}

/// One step of one token through every lane: every worker has then run its part (weights,
/// attention, exchange, head) once before real requests come.
async fn warm_up(
    lanes: &[switchyard_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>],
    epoch: u64,
    timeout: Duration,
) -> Result<(), StartError> {
    let mut calls = JoinSet::new();
    for (lane, client) in lanes.iter().enumerate() {
        let mut client = client.clone();
        let request = warm_up_step(epoch);
        calls.spawn(async move {
            let r = tokio::time::timeout(timeout, client.step(request)).await;
            let reason = match r {
                Ok(Ok(r)) if r.get_ref().results.len() == 1 => return Ok(()),
                Ok(Ok(_)) => "a wrong number of results".to_string(),
                Ok(Err(s)) => s.message().to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            Err(StartError::WarmUp { lane, reason })
        });
    }
    while let Some(r) = calls.join_next().await {
        r.expect("warm-up tasks do not panic")?;
    }
    Ok(())
}

async fn assign_all(
    config: &ClusterConfig,
    placement: &Placement,
) -> Result<Vec<pb::AssignResponse>, StartError> {
    let grid = placement.grid;
    let expert_shard = placement.expert_shard();
    let mut calls = JoinSet::new();
    for (i, cell) in placement.cells.iter().enumerate() {
        let assignment = pb::Assignment {
            epoch: placement.epoch,
            model_dir: config.model_dir.display().to_string(),
            stage: cell.stage as u32,
            shard: cell.shard as u32,
            layer_start: cell.subset.layers.start as u32,
            layer_end: cell.subset.layers.end as u32,
            experts: placement.experts[cell.shard].clone(),
            embedding: cell.subset.embedding,
            head: cell.subset.head,
            kv_blocks: placement.kv_blocks as u32,
            block_size: placement.block_size as u32,
            stage_peers: (0..grid.shards)
                .map(|e| placement.cell(cell.stage, e).address.clone())
                .collect(),
            expert_shard: expert_shard.clone(),
            next_stage: match cell.stage + 1 < grid.stages {
                true => placement.cell(cell.stage + 1, cell.shard).address.clone(),
                false => String::new(),
            },
            exchange_timeout_ms: config.step_timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        let address = cell.address.clone();
        calls.spawn(async move {
            let failed = |reason: String| StartError::Assign {
                address: address.clone(),
                reason,
            };
            let mut client = worker_client(channel(&address).map_err(|e| failed(e.to_string()))?);
            let reply = client
                .assign(assignment)
                .await
                .map_err(|s| failed(s.message().to_string()))?;
            Ok::<_, StartError>((i, reply.into_inner()))
        });
    }
    let mut out = vec![None; placement.cells.len()];
    while let Some(r) = calls.join_next().await {
        let (i, loaded) = r.expect("assign task does not panic")?;
        out[i] = Some(loaded);
    }
    Ok(out
        .into_iter()
        .map(|l| l.expect("every worker loaded"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::overloaded;

    #[test]
    fn a_lane_is_overloaded_when_a_request_would_queue_or_it_is_far_ahead() {
        // The least loaded lane never is, even when full.
        assert!(!overloaded(64, 64, 64));
        // A few requests ahead of the least loaded: still worth its cached prefix.
        assert!(!overloaded(3, 0, 8));
        assert!(!overloaded(15, 0, 64));
        // At least a quarter of max_running (and 4) ahead…
        assert!(overloaded(4, 0, 8));
        assert!(overloaded(16, 0, 64));
        // …or full while another lane has room.
        assert!(overloaded(8, 7, 8));
    }
}
