//! The `switchyard.v1.Worker` gRPC service: a worker process holds one part of the model (its
//! grid cell's layers and experts), the KV memory of its lane for those layers, and runs the
//! steps the coordinator sends. Stage `p` forwards its hidden states to stage `p + 1` of the
//! same lane inside the same call, so the coordinator's one `Step` call to stage 0 returns
//! what the last stage drew. Workers keep no per-sequence state: block tables, positions and
//! sampling draws all come with each step.
//!
//! A worker being drained (SIGTERM) takes no new assignment and waits for the coordinator to
//! release it ([`WorkerControl`]).
//!
//! Fencing: the worker keeps the highest placement epoch it has seen (assigned, or published
//! in etcd: [`crate::registration`] watches the placement) and refuses steps, exchanges and
//! assignments of older epochs, so a coordinator that lost its leadership cannot drive it. An
//! assignment raises the fence only once its part has loaded.
//!
//! No message is trusted ([`crate::checks`]): an assignment is checked whole (its model
//! directory under the model root, its sizes against the model and the device's memory)
//! before the part held is touched, and a refused one leaves the worker as it was; steps and
//! exchanges are checked against the part before anything is allocated, and messages larger
//! than the part's largest step are refused from their length prefix, before they are read.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchyard_model::{Checkpoint, Subset, WeightType};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use switchyard_proto::v1::worker_server::{Worker, WorkerServer};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, info_span, Instrument};

use crate::backend::{Backend, Hardware, Routes};
use crate::batch::AttentionBatch;
use crate::checks::{self, PartLimits, CONTROL_MESSAGE_BYTES};
use crate::exchange::GrpcExchange;
use crate::message_limit::MessageLimit;
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertExchange, Model, ModelError};
use crate::offload::{Offload, OffloadError};
use switchyard_net::grpc::{channel, worker_client, MAX_MESSAGE_BYTES};
use switchyard_net::tls;
use switchyard_net::{trace_context, wire};
use switchyard_scheduler::step::{sample_step, SeqInput};

/// The part of the model this worker was assigned, loaded, with its KV memory.
struct Part<B: Backend> {
    assignment: pb::Assignment,
    limits: PartLimits,
    /// Both shared with the next part when only the epoch or the peers change.
    backend: Arc<B>,
    model: Arc<Model<B>>,
    cache: Mutex<B::KvCache>,
    next: Option<WorkerClient<Channel>>,
    exchange: Option<GrpcExchange>,
    weight_bytes: u64,
    kv_bytes: u64,
}

/// A loaded part's backend and model, kept for the next assignment of the same weights.
type Reused<B> = (Arc<B>, Arc<Model<B>>);

/// The service; clones share one worker.
pub struct WorkerService<H: Hardware>(Arc<WorkerState<H>>);

impl<H: Hardware> Clone for WorkerService<H> {
    fn clone(&self) -> Self {
        WorkerService(self.0.clone())
    }
}

struct WorkerState<H: Hardware> {
    hardware: H,
    part: RwLock<Option<Arc<Part<H::Backend>>>>,
    metrics: Arc<WorkerMetrics>,
    control: ControlState,
    /// Assignments may only name model directories under this one (canonical).
    model_root: Option<PathBuf>,
    /// One assignment at a time: each sees the part the one before left.
    assigning: tokio::sync::Mutex<()>,
    /// The largest `Step` / `RunExperts` message the part held takes.
    data_limit: Arc<AtomicUsize>,
    /// `--expert-memory`: parts load with their experts offloaded to this budget.
    offload: std::sync::OnceLock<Offload>,
}

#[derive(Default)]
struct ControlState {
    draining: AtomicBool,
    released: Notify,
    /// The highest placement epoch seen: older ones are refused.
    fence: AtomicU64,
}

/// What [`WorkerControl`] needs of a worker, whatever its hardware.
trait PartSlot: Send + Sync {
    fn control(&self) -> &ControlState;
    fn held_epoch(&self) -> Option<u64>;
    /// Drops the part held if `drop_it(its epoch)`, in one locked step; its epoch if it did.
    fn release_if(&self, drop_it: &dyn Fn(u64) -> bool) -> Option<u64>;
}

/// The worker's life outside the RPCs: draining, the placement fence, and release.
#[derive(Clone)]
pub struct WorkerControl(Arc<dyn PartSlot>);

impl WorkerControl {
    /// From now on the worker refuses new assignments.
    pub fn start_draining(&self) {
        self.0.control().draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.control().draining.load(Ordering::SeqCst)
    }

    /// The highest placement epoch seen; steps of older placements are refused.
    pub fn fence(&self) -> u64 {
        self.0.control().fence.load(Ordering::SeqCst)
    }

    /// A placement of `epoch` was published: older epochs are fenced off from now on. When it
    /// leaves this worker out (`includes_me` false), a part of an older placement is dropped;
    /// returns that part's epoch if one was.
    pub fn placement_published(&self, epoch: u64, includes_me: bool) -> Option<u64> {
        self.0.control().fence.fetch_max(epoch, Ordering::SeqCst);
        match includes_me {
            true => None,
            false => self.0.release_if(&|held| held < epoch),
        }
    }

    /// Waits until the worker holds no part (at once when it holds none).
    pub async fn released(&self) {
        loop {
            let notified = self.0.control().released.notified();
            if self.0.held_epoch().is_none() {
                return;
            }
            notified.await;
        }
    }
}

impl<H: Hardware> PartSlot for WorkerState<H> {
    fn control(&self) -> &ControlState {
        &self.control
    }

    fn held_epoch(&self) -> Option<u64> {
        let part = self.part.read().expect("not poisoned");
        part.as_ref().map(|p| p.assignment.epoch)
    }

    fn release_if(&self, drop_it: &dyn Fn(u64) -> bool) -> Option<u64> {
        let mut part = self.part.write().expect("not poisoned");
        let held = part.as_ref()?.assignment.epoch;
        if !drop_it(held) {
            return None;
        }
        *part = None;
        drop(part);
        self.metrics.ready.set(0.0);
        self.data_limit
            .store(CONTROL_MESSAGE_BYTES, Ordering::SeqCst);
        self.control.released.notify_waiters();
        Some(held)
    }
}

impl<H: Hardware> WorkerService<H> {
    /// A worker that loads any model directory its process can read.
    pub fn new(hardware: H) -> Self {
        Self::build(hardware, None)
    }

    /// A worker that loads only model directories under `root` (`--model-root`); symbolic
    /// links that lead out of it are refused.
    pub fn with_model_root(hardware: H, root: &Path) -> std::io::Result<Self> {
        Ok(Self::build(hardware, Some(std::fs::canonicalize(root)?)))
    }

    fn build(hardware: H, model_root: Option<PathBuf>) -> Self {
        WorkerService(Arc::new(WorkerState {
            hardware,
            part: RwLock::new(None),
            metrics: Arc::default(),
            control: ControlState::default(),
            model_root,
            assigning: tokio::sync::Mutex::new(()),
            data_limit: Arc::new(AtomicUsize::new(CONTROL_MESSAGE_BYTES)),
            offload: std::sync::OnceLock::new(),
        }))
    }

    /// Parts this worker loads keep `offload.budget_bytes` of experts resident and read the
    /// others from the checkpoint on demand (`--expert-memory`).
    pub fn with_offload(self, offload: Offload) -> Self {
        let _ = self.0.offload.set(offload);
        self
    }

    /// What this worker measures, for `/metrics`.
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.0.metrics.clone()
    }

    pub fn control(&self) -> WorkerControl {
        WorkerControl(self.0.clone())
    }

    pub fn hardware(&self) -> &H {
        &self.0.hardware
    }
}

impl<H: Hardware> WorkerState<H> {
    fn part(&self, epoch: u64) -> Result<Arc<Part<H::Backend>>, Status> {
        let fence = self.control.fence.load(Ordering::SeqCst);
        if epoch < fence {
            return Err(Status::aborted(format!(
                "placement epoch {epoch} is fenced off: placement epoch {fence} has been \
                 published or assigned since; this worker serves no older placement"
            )));
        }
        let part = self
            .part
            .read()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| Status::failed_precondition("this worker has no assignment yet"))?;
        if part.assignment.epoch != epoch {
            return Err(Status::failed_precondition(format!(
                "placement epoch {epoch} asked, this worker holds epoch {}",
                part.assignment.epoch
            )));
        }
        Ok(part)
    }

    /// The model directory (or GGUF file) `given` names, if it is one this worker may load:
    /// under the model root when there is one. Whether a refused path exists is not told.
    fn model_dir(&self, given: &str) -> Result<PathBuf, Status> {
        let Some(root) = &self.model_root else {
            return Ok(PathBuf::from(given));
        };
        let refused = || {
            Status::invalid_argument(format!(
                "model_dir {given:?} is not a model directory under this worker's model root \
                 ({})",
                root.display()
            ))
        };
        // Relative paths are taken from the root; `..` and links are resolved first, for the
        // directory and each file in it.
        let under_root = |p: &Path| std::fs::canonicalize(p).is_ok_and(|p| p.starts_with(root));
        let dir = std::fs::canonicalize(root.join(given)).map_err(|_| refused())?;
        // A model given as one file (GGUF).
        if dir.is_file() {
            return match dir.starts_with(root) {
                true => Ok(dir),
                false => Err(refused()),
            };
        }
        let entries = std::fs::read_dir(&dir).map_err(|_| refused())?;
        let mut files = entries.map(|e| e.map(|e| e.path()));
        match dir.starts_with(root) && files.all(|f| f.is_ok_and(|f| under_root(&f))) {
            true => Ok(dir),
            false => Err(refused()),
        }
    }

    /// Everything about `a` that can be checked without loading a weight: the model directory
    /// and its headers, every field against the model, its memory against the device's. The
    /// part held is not touched.
    fn prepare(&self, a: &pb::Assignment) -> Result<Prepared, Status> {
        let invalid = |m: String| Status::invalid_argument(m);
        let dir = self.model_dir(&a.model_dir)?;
        let checkpoint = Checkpoint::open(&dir).map_err(|e| invalid(e.to_string()))?;
        let c = checkpoint.config();
        let kv_bytes = checks::check_assignment(a, c, H::Backend::VALUE_BYTES)
            .map_err(|e| invalid(format!("assignment refused: {e}")))?;
        let subset = Subset {
            layers: a.layer_start as usize..a.layer_end as usize,
            experts: c
                .moe
                .map(|_| a.experts.iter().map(|e| *e as usize).collect()),
            embedding: a.embedding,
            head: a.head,
        };
        checkpoint
            .validate(&subset)
            .map_err(|e| invalid(e.to_string()))?;
        for addr in a.stage_peers.iter().chain(Some(&a.next_stage)) {
            if !addr.is_empty() {
                switchyard_net::grpc::endpoint(addr)
                    .map_err(|e| invalid(format!("worker address {addr:?}: {e}")))?;
            }
        }
        let kept = |t| self.hardware.weight_type(t);
        let mut weight_bytes = checkpoint
            .subset_bytes(&subset, kept)
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(o) = self.offload.get() {
            // Offloaded experts count only up to the budget.
            let without_experts = Subset {
                experts: Some(Default::default()),
                ..subset.clone()
            };
            let rest = checkpoint
                .subset_bytes(&without_experts, kept)
                .map_err(|e| invalid(e.to_string()))?;
            weight_bytes = rest + (weight_bytes - rest).min(o.budget_bytes);
        }
        Ok(Prepared {
            checkpoint,
            subset,
            weight_bytes,
            kv_bytes,
        })
    }

    /// Loads the part `a` names; `reuse` is the backend and model of the previous part when `a`
    /// holds the same layers and experts of the same model (a new epoch, other peers): no
    /// reload.
    fn load(
        &self,
        a: pb::Assignment,
        p: Prepared,
        reuse: Option<Reused<H::Backend>>,
    ) -> Result<Part<H::Backend>, Status> {
        let invalid = |m: String| Status::invalid_argument(m);
        let c = p.checkpoint.config().clone();
        let (backend, model) = match reuse {
            Some(r) => r,
            None => {
                let backend = self.hardware.backend(&c).map_err(|e| {
                    Status::failed_precondition(format!(
                        "{}: cannot run this model: {e}",
                        self.hardware.describe()
                    ))
                })?;
                let mut m = match self.offload.get() {
                    None => Model::load(&backend, &p.checkpoint, &p.subset),
                    Some(o) => Model::load_offloaded(
                        &backend,
                        &p.checkpoint,
                        &p.subset,
                        o,
                        self.metrics.expert_cache.clone(),
                    ),
                }
                .map_err(|e| invalid(e.to_string()))?;
                let metrics = self.metrics.clone();
                // Without offload every expert is resident: each use is a hit.
                let all_resident = self.offload.get().is_none().then(|| p.subset.clone());
                m.observe_routes(Arc::new(move |layer, experts| {
                    metrics.count_routes(layer, experts);
                    if let Some(held) = &all_resident {
                        metrics.expert_cache.count_resident_uses(held, experts);
                    }
                }));
                (Arc::new(backend), Arc::new(m))
            }
        };
        let cache = backend
            .kv_cache(
                model.num_layers(),
                a.kv_blocks as usize,
                a.block_size as usize,
                c.num_kv_heads,
                c.head_dim,
            )
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let client = |addr: &str| {
            channel(addr)
                .map(worker_client)
                .map_err(|e| invalid(format!("worker address {addr:?}: {e}")))
        };
        let next = match a.next_stage.as_str() {
            "" => None,
            addr => Some(client(addr)?),
        };
        let exchange = match (c.moe, a.stage_peers.len()) {
            (Some(_), n) if n > 1 => Some(GrpcExchange {
                handle: tokio::runtime::Handle::current(),
                epoch: a.epoch,
                shard: a.shard as usize,
                peers: a
                    .stage_peers
                    .iter()
                    .map(|p| client(p))
                    .collect::<Result<_, _>>()?,
                expert_shard: a.expert_shard.clone(),
                metrics: self.metrics.clone(),
                timeout: peer_timeout(&a),
            }),
            _ => None,
        };
        Ok(Part {
            weight_bytes: p.weight_bytes,
            kv_bytes: p.kv_bytes,
            limits: PartLimits::new(&c, &a),
            assignment: a,
            backend,
            model,
            cache: Mutex::new(cache),
            next,
            exchange,
        })
    }

    /// A step or exchange that could not read an offloaded expert from the checkpoint file
    /// (truncated, removed) leaves the worker not ready: its part can fail any step.
    fn check_health(&self, status: &Status) {
        if status.message().starts_with(EXPERT_READ_FAILED) {
            self.metrics.ready.set(0.0);
            tracing::error!(problem = status.message(), "worker marked not ready");
        }
    }

    /// Holds `part` from now on, and sizes the data messages it takes.
    fn hold(&self, part: Part<H::Backend>) {
        self.data_limit
            .store(part.limits.max_message_bytes(), Ordering::SeqCst);
        self.metrics.ready.set(1.0);
        *self.part.write().expect("not poisoned") = Some(Arc::new(part));
    }
}

/// How a step's status begins when an offloaded expert could not be read.
const EXPERT_READ_FAILED: &str = "cannot read an offloaded expert";

/// A model error as a step's status; an expert read that failed is named as such.
fn model_failed(e: ModelError) -> Status {
    match e {
        ModelError::Offload(e @ OffloadError::Read { .. }) => {
            Status::unavailable(format!("{EXPERT_READ_FAILED}: {e}"))
        }
        e => Status::internal(e.to_string()),
    }
}

/// An assignment that passed every check before loading.
struct Prepared {
    checkpoint: Checkpoint,
    subset: Subset,
    weight_bytes: u64,
    kv_bytes: u64,
}

/// What a stage's share of a step gives.
enum StageOutput {
    /// A middle stage's hidden states, for the next stage of the lane.
    Forward(pb::Tensor),
    /// The last stage's draws: the step's answer.
    Done(pb::StepResponse),
}

/// What the worker runs a step's layers with: its model part, its KV memory, its exchange.
/// The step passed [`checks::check_step`].
fn run_step<B: Backend>(part: &Part<B>, request: &pb::StepRequest) -> Result<StageOutput, Status> {
    let backend = &*part.backend;
    let work = request
        .seqs
        .iter()
        .map(wire::from_seq_work)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let inputs: Vec<SeqInput> = work.iter().map(|w| w.input.clone()).collect();
    let model = &part.model;
    let c = model.config();
    let failed = model_failed;
    let mut hidden = match &request.hidden {
        None => {
            let ids: Vec<u32> = inputs.iter().flat_map(|s| s.tokens.clone()).collect();
            model.embed(backend, &ids).map_err(failed)?
        }
        Some(t) => {
            let (data, rows, cols) =
                wire::from_tensor(t).map_err(|e| Status::invalid_argument(e.to_string()))?;
            backend
                .tensor(data, rows, cols)
                .map_err(|e| failed(e.into()))?
        }
    };
    let batch = AttentionBatch::new(
        &inputs,
        part.assignment.block_size as usize,
        c.sliding_window,
    );
    {
        let mut cache = part.cache.lock().expect("not poisoned");
        let exchange = part.exchange.as_ref().map(|x| x as &dyn ExpertExchange<B>);
        // A panic must not unwind through the guard: the lock would stay poisoned and every
        // later step fail. Messages are checked before they get here; this is the backstop.
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            model.forward_layers(backend, &mut cache, &mut hidden, &batch, exchange)
        }))
        .map_err(|_| Status::internal("the step's layers panicked; see the worker's log"))?
        .map_err(failed)?;
    }
    if !part.assignment.head {
        let rows = backend.rows(&hidden);
        let data = backend.to_host(&hidden).map_err(|e| failed(e.into()))?;
        return Ok(StageOutput::Forward(wire::tensor(
            &data,
            rows,
            c.hidden_size,
        )));
    }
    let logits = model.logits(backend, &hidden, &inputs).map_err(failed)?;
    let results = sample_step(&work, &logits, c.vocab_size);
    Ok(StageOutput::Done(pb::StepResponse {
        results: results.iter().map(wire::seq_result).collect(),
    }))
}

#[tonic::async_trait]
impl<H: Hardware> Worker for WorkerService<H>
where
    <H::Backend as Backend>::KvCache: Sync,
{
    async fn inventory(
        &self,
        _: Request<pb::InventoryRequest>,
    ) -> Result<Response<pb::InventoryResponse>, Status> {
        let (total, available) = self.0.hardware.memory();
        let part = self.0.part.read().expect("not poisoned").clone();
        Ok(Response::new(pb::InventoryResponse {
            device: self.0.hardware.describe(),
            memory_bytes: total,
            // The part held is dropped before a new one loads when its memory is needed: its
            // weights count as available (its KV cache does not: on the CPU untouched KV pages
            // are not resident).
            available_bytes: available + part.as_ref().map_or(0, |p| p.weight_bytes),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
            version: env!("CARGO_PKG_VERSION").into(),
            epoch: part.as_ref().map_or(0, |p| p.assignment.epoch),
            draining: self.control().is_draining(),
            fence: self.control().fence(),
            value_bytes: H::Backend::VALUE_BYTES as u32,
            // Hardware that keeps the densest block type as it is keeps every stored type.
            keeps_stored_weights: self.0.hardware.weight_type(WeightType::Q4_K) == WeightType::Q4_K,
            expert_memory_bytes: self.0.offload.get().map_or(0, |o| o.budget_bytes),
        }))
    }

    async fn assign(
        &self,
        request: Request<pb::Assignment>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let a = request.into_inner();
        if self.control().is_draining() {
            return Err(Status::failed_precondition(
                "this worker is draining (it was asked to stop); assign its part elsewhere",
            ));
        }
        let _one_at_a_time = self.0.assigning.lock().await;
        let epoch = a.epoch;
        let stale = move |fence: u64| {
            Status::failed_precondition(format!(
                "assignment of placement epoch {epoch} refused: placement epoch {fence} has \
                 been published or assigned since (is this coordinator still the leader?)"
            ))
        };
        let fence = self.control().fence();
        if a.epoch < fence {
            return Err(stale(fence));
        }
        let span = info_span!("assign", epoch = a.epoch, stage = a.stage, shard = a.shard);
        let this = self.0.clone();
        let part = tokio::task::spawn_blocking(move || {
            span.in_scope(|| -> Result<_, Status> {
                let prepared = this.prepare(&a)?;
                let old = this.part.read().expect("not poisoned").clone();
                let reuse = old
                    .as_ref()
                    .filter(|p| same_weights(&p.assignment, &a))
                    .map(|p| (p.backend.clone(), p.model.clone()));
                let new_weights = match reuse {
                    Some(_) => 0,
                    None => prepared.weight_bytes,
                };
                let need = new_weights + prepared.kv_bytes;
                let (total, available) = this.hardware.memory();
                let held = old.as_ref().map_or(0, |p| p.weight_bytes + p.kv_bytes);
                if total > 0 && need > available.saturating_add(held) {
                    return Err(Status::resource_exhausted(format!(
                        "the part needs {need} bytes ({new_weights} of weights, {} of KV \
                         cache); {} has {} available",
                        prepared.kv_bytes,
                        this.hardware.describe(),
                        available.saturating_add(held)
                    )));
                }
                // The part held stays while the new one loads, unless its memory is needed:
                // then a load that fails (a read error, a bad weight) leaves the worker
                // without a part, its fence unchanged.
                if total > 0 && need > available {
                    drop(old);
                    this.release_if(&|_| true);
                }
                this.load(a, prepared, reuse)
            })
        })
        .await
        .map_err(|e| Status::internal(format!("the load failed: {e}")))??;
        // Steps of older epochs are fenced off only now that the part is here.
        let fence = self
            .0
            .control
            .fence
            .fetch_max(part.assignment.epoch, Ordering::SeqCst);
        if part.assignment.epoch < fence {
            return Err(stale(fence));
        }
        let response = pb::AssignResponse {
            weight_bytes: part.weight_bytes,
            kv_bytes: 0,
            resident_bytes: resident_bytes(),
        };
        info!(
            layers = ?(part.assignment.layer_start..part.assignment.layer_end),
            experts = ?part.assignment.experts,
            weight_bytes = part.weight_bytes,
            resident_bytes = response.resident_bytes,
            "loaded"
        );
        let m = &self.0.metrics;
        m.registry
            .set_label("stage", &part.assignment.stage.to_string());
        m.registry
            .set_label("shard", &part.assignment.shard.to_string());
        m.epoch.set(part.assignment.epoch as f64);
        self.0.hold(part);
        Ok(Response::new(response))
    }

    async fn step(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let (caller, _, request) = request.into_parts();
        let part = self.0.part(request.epoch)?;
        checks::check_step(&request, &part.limits)
            .map_err(|e| Status::invalid_argument(format!("step refused: {e}")))?;
        let span = info_span!(
            "step",
            id = request.step_id,
            stage = part.assignment.stage,
            shard = part.assignment.shard,
            requests = ?request.request_ids,
        );
        trace_context::adopt(&span, caller.as_ref());
        let tokens: u64 = request.seqs.iter().map(|s| s.tokens.len() as u64).sum();
        let (p, in_step) = (part.clone(), span.clone());
        let started = Instant::now();
        let (out, mut request) = tokio::task::spawn_blocking(move || {
            let out = in_step.in_scope(|| {
                let out = run_step(&p, &request);
                debug!(tokens, ok = out.is_ok(), "step ran");
                out
            });
            (out, request)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let m = &self.0.metrics;
        m.steps.inc();
        m.step_tokens.add(tokens);
        m.step_seconds.observe(started.elapsed().as_secs_f64());
        match out.inspect_err(|s| self.0.check_health(s))? {
            StageOutput::Done(done) => Ok(Response::new(done)),
            StageOutput::Forward(hidden) => {
                let mut next = part
                    .next
                    .clone()
                    .ok_or_else(|| Status::internal("a middle stage without a next stage"))?;
                request.hidden = Some(hidden);
                let timeout = peer_timeout(&part.assignment);
                let forward_span =
                    info_span!(parent: &span, "forward", stage = part.assignment.stage + 1);
                let forward = next
                    .step(trace_context::request(&forward_span, request))
                    .instrument(forward_span);
                tokio::time::timeout(timeout, forward)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "the next stage did not answer within {timeout:?}"
                        )))
                    })
            }
        }
    }

    async fn run_experts(
        &self,
        request: Request<pb::ExpertBatch>,
    ) -> Result<Response<pb::ExpertOutput>, Status> {
        let (caller, _, b) = request.into_parts();
        let part = self.0.part(b.epoch)?;
        checks::check_expert_batch(&b, &part.limits)
            .map_err(|e| Status::invalid_argument(format!("exchange refused: {e}")))?;
        let span = info_span!("run_experts", layer = b.layer, experts = b.experts.len());
        trace_context::adopt(&span, caller.as_ref());
        let this = self.0.clone();
        let y = tokio::task::spawn_blocking(move || -> Result<pb::Tensor, Status> {
            let _in_span = span.enter();
            let backend = &*part.backend;
            let invalid = |m: String| Status::invalid_argument(m);
            let x =
                b.x.as_ref()
                    .ok_or_else(|| invalid("no activations".into()))?;
            let (data, rows, cols) = wire::from_tensor(x).map_err(|e| invalid(e.to_string()))?;
            let k = b.top_k as usize;
            if b.experts.len() != rows * k || b.weights.len() != rows * k {
                return Err(invalid(format!(
                    "{} experts and {} weights for {rows} tokens × top-{k}",
                    b.experts.len(),
                    b.weights.len()
                )));
            }
            let routes = Routes {
                top_k: k,
                experts: b.experts,
                weights: b.weights,
            };
            let failed = model_failed;
            let x = backend
                .tensor(data, rows, cols)
                .map_err(|e| failed(e.into()))?;
            let mut y = backend
                .tensor(vec![0.0; rows * cols], rows, cols)
                .map_err(|e| failed(e.into()))?;
            part.model
                .run_experts(backend, b.layer as usize, &x, &routes, &mut y)
                .map_err(failed)?;
            this.metrics.expert_tokens_served.add(rows as u64);
            let y = backend.to_host(&y).map_err(|e| failed(e.into()))?;
            Ok(wire::tensor(&y, rows, cols))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .inspect_err(|s| self.0.check_health(s))?;
        Ok(Response::new(pb::ExpertOutput { y: Some(y) }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let epoch = request.into_inner().epoch;
        // A release for an older epoch than the part held is stale: keep the part.
        self.0.release_if(&|held| held <= epoch);
        if self.0.held_epoch().is_some_and(|held| held > epoch) {
            return Err(Status::failed_precondition(format!(
                "release of epoch {epoch}, but this worker holds a part of a later epoch"
            )));
        }
        info!(epoch, "released");
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::WorkerStats>, Status> {
        let m = &self.0.metrics;
        Ok(Response::new(pb::WorkerStats {
            steps: m.steps.get(),
            step_seconds: m.step_seconds.sum(),
            exchange_bytes_sent: m.exchange_bytes_sent.get(),
            exchange_bytes_received: m.exchange_bytes_received.get(),
            exchange_calls: m.exchange_seconds.count(),
            exchange_seconds: m.exchange_seconds.sum(),
            expert_tokens_served: m.expert_tokens_served.get(),
            exchange_token_shard_pairs: m.exchange_token_shard_pairs.get(),
            routed: m
                .routed
                .children()
                .into_iter()
                .map(|(labels, c)| pb::RoutedTokens {
                    layer: labels[0].parse().unwrap_or_default(),
                    expert: labels[1].parse().unwrap_or_default(),
                    tokens: c.get(),
                })
                .collect(),
            step_tokens: m.step_tokens.get(),
        }))
    }
}

/// How long a peer (next stage, exchange) may take to answer before the step fails.
fn peer_timeout(a: &pb::Assignment) -> Duration {
    match a.exchange_timeout_ms {
        0 => Duration::from_secs(60),
        ms => Duration::from_millis(ms as u64),
    }
}

/// Whether two assignments name the same weights (same model, layers, experts, ends).
fn same_weights(a: &pb::Assignment, b: &pb::Assignment) -> bool {
    (
        &a.model_dir,
        a.layer_start,
        a.layer_end,
        &a.experts,
        a.embedding,
        a.head,
    ) == (
        &b.model_dir,
        b.layer_start,
        b.layer_end,
        &b.experts,
        b.embedding,
        b.head,
    )
}

/// A worker serving on a socket.
pub struct SpawnedWorker {
    pub address: SocketAddr,
    pub metrics: Arc<WorkerMetrics>,
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Binds `addr` and serves `service` there until `shutdown`.
pub async fn spawn_worker<H: Hardware>(
    service: WorkerService<H>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SpawnedWorker>
where
    <H::Backend as Backend>::KvCache: Sync,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let address = listener.local_addr()?;
    let metrics = service.metrics();
    metrics.registry.set_label("worker", &address.to_string());
    let data_limit = service.0.data_limit.clone();
    let server = WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = MessageLimit::new(server, data_limit);
    let task = tokio::spawn(
        switchyard_net::grpc::server()
            .add_service(server)
            .serve_with_incoming_shutdown(
                // Mutual TLS with the process's cluster identity, if it has one: only
                // certificates the cluster CA signed get in.
                switchyard_net::grpc::incoming(listener, tls::cluster().map(|t| t.server))?,
                shutdown,
            ),
    );
    Ok(SpawnedWorker {
        address,
        metrics,
        task,
    })
}

/// This process's resident memory, from `/proc/self/status` (0 where unknown).
pub fn resident_bytes() -> u64 {
    proc_bytes("/proc/self/status", "VmRSS:")
}

/// A `NAME: N kB` field of a `/proc` file, in bytes (0 where unknown).
pub(crate) fn proc_bytes(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
