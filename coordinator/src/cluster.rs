//! Bringing a cluster up: ask each worker what it has, plan the placement, assign every worker
//! its part (they load in parallel), and start one lane driver per grid column.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use switchyard_model::{Checkpoint, CheckpointError, ModelConfig, Tokenizer, TokenizerError};
use switchyard_proto::v1 as pb;
use switchyard_worker::service::{channel, worker_client};
use switchyard_worker::{Scheduler, SchedulerConfig};
use tokio::task::JoinSet;
use tracing::info;

use crate::lane::Lane;
use crate::metrics::Metrics;
use crate::placement::{plan, Grid, Inventory, Placement, PlanError, PlanOptions};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub model_dir: PathBuf,
    pub grid: Grid,
    /// Worker addresses; cell `(p, e)` is `workers[p * E + e]`.
    pub workers: Vec<String>,
    pub plan: PlanOptions,
    pub max_step_tokens: usize,
    pub max_running: usize,
    /// Requests waiting for a lane beyond this are refused (`RESOURCE_EXHAUSTED`).
    pub max_queue: usize,
    /// Deadline of a request that brings none.
    pub request_timeout: Option<Duration>,
    /// How long a worker may take to answer at start-up.
    pub connect_timeout: Duration,
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
}

/// What each worker reported, and what it loaded.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub inventory: Inventory,
    pub loaded: pb::AssignResponse,
}

/// A running cluster: the model, its placement, the lanes.
pub struct Cluster {
    pub model_name: String,
    pub model: ModelConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub placement: Placement,
    pub workers: Vec<WorkerInfo>,
    pub lanes: Vec<Lane>,
    /// An empty scheduler with the lanes' limits: checks requests before they are queued.
    pub checker: Scheduler,
    pub config: ClusterConfig,
    pub metrics: Arc<Metrics>,
    pub next_seq: AtomicU64,
}

impl Cluster {
    pub async fn start(config: ClusterConfig) -> Result<Arc<Cluster>, StartError> {
        let dir = config.model_dir.clone();
        let checkpoint = Checkpoint::open(&dir).map_err(|source| StartError::Model {
            dir: dir.display().to_string(),
            source,
        })?;
        let model = checkpoint.config().clone();
        let tokenizer = match dir.join("tokenizer.json").exists() {
            true => Some(Arc::new(Tokenizer::from_dir(&dir)?)),
            false => None,
        };

        let inventories = inventory_all(&config).await?;
        let placement = plan(&model, config.grid, &inventories, config.plan, 1)?;
        info!("{placement}");
        let loaded = assign_all(&config, &placement).await?;
        let workers = inventories
            .into_iter()
            .zip(loaded)
            .map(|(inventory, loaded)| WorkerInfo { inventory, loaded })
            .collect();

        let scheduler_config = SchedulerConfig {
            block_size: placement.block_size,
            num_blocks: placement.kv_blocks,
            max_step_tokens: config.max_step_tokens,
            max_running: config.max_running,
        };
        let scheduler =
            || Scheduler::new(scheduler_config.clone(), model.clone(), tokenizer.clone());
        let metrics = Arc::new(Metrics::default());
        metrics.epoch.set(placement.epoch as f64);
        for cell in &placement.cells {
            let (stage, shard) = (cell.stage.to_string(), cell.shard.to_string());
            let labels = [cell.address.as_str(), &stage, &shard];
            metrics.worker_ready.with(&labels).set(1.0);
            metrics.worker_up.with(&labels).set(1.0);
        }
        let mut lanes = Vec::with_capacity(config.grid.shards);
        for shard in 0..config.grid.shards {
            let stage0 = placement.cell(0, shard).address.clone();
            let client = worker_client(channel(&stage0).map_err(|e| StartError::Unreachable {
                address: stage0.clone(),
                reason: e.to_string(),
            })?);
            lanes.push(Lane::spawn(
                shard,
                scheduler(),
                client,
                placement.epoch,
                config.grid.stages,
                metrics.clone(),
            ));
        }
        let model_name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Arc::new(Cluster {
            model_name,
            checker: scheduler(),
            model,
            tokenizer,
            placement,
            workers,
            lanes,
            config,
            metrics,
            next_seq: AtomicU64::new(1),
        }))
    }
}

impl Cluster {
    /// Whether a complete placement is serving: every lane's driver is running.
    pub fn is_serving(&self) -> bool {
        self.lanes.iter().all(|l| l.is_running())
    }
}

async fn inventory_all(config: &ClusterConfig) -> Result<Vec<Inventory>, StartError> {
    let mut calls = JoinSet::new();
    for (i, address) in config.workers.iter().enumerate() {
        let (address, timeout) = (address.clone(), config.connect_timeout);
        calls.spawn(async move {
            let unreachable = |reason: String| StartError::Unreachable {
                address: address.clone(),
                reason,
            };
            let mut client =
                worker_client(channel(&address).map_err(|e| unreachable(e.to_string()))?);
            let reply = tokio::time::timeout(timeout, client.inventory(pb::InventoryRequest {}))
                .await
                .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
                .map_err(|s| unreachable(s.message().to_string()))?
                .into_inner();
            Ok::<_, StartError>((
                i,
                Inventory {
                    address: address.clone(),
                    device: reply.device,
                    memory_bytes: reply.memory_bytes,
                    available_bytes: reply.available_bytes,
                },
            ))
        });
    }
    let mut out = vec![None; config.workers.len()];
    while let Some(r) = calls.join_next().await {
        let (i, inv) = r.expect("inventory task does not panic")?;
        out[i] = Some(inv);
    }
    Ok(out
        .into_iter()
        .map(|i| i.expect("every worker answered"))
        .collect())
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
