//! The client API: `switchyard.v1.Inference` over gRPC, and the front door the OpenAI HTTP API
//! shares with it.
//!
//! Every call is routed first ([`crate::forward::route`]): while this coordinator stands by it
//! is relayed whole to the leader; otherwise it is served here, a generate request through
//! [`Local`] admission (checked, tokenized, given the least loaded lane, its updates streamed
//! back). The gRPC server itself (health, reflection) is composed in [`crate::server`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_net::grpc::grpc_timeout;
use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_server::Inference;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Response, Status};

use crate::admission::{header_request_id, prompt_ids, Admission, Local};
use crate::cluster::Cluster;
use crate::forward::{route, ToLeader};
use crate::role::Role;

/// The client API of one coordinator: what it serves itself, and where it sends the rest.
#[derive(Clone)]
pub struct InferenceApi {
    cluster: Arc<Cluster>,
    local: Local,
    leader: ToLeader,
}

pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl InferenceApi {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        InferenceApi {
            local: Local::new(cluster.clone()),
            leader: ToLeader::new(cluster.clone()),
            cluster,
        }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Where a new request goes now: the leader while this coordinator stands by, else here
    /// (where a draining coordinator refuses it).
    pub fn admission(&self) -> &dyn Admission {
        match self.cluster.role().get() {
            Role::Standby => &self.leader,
            Role::Leading | Role::Draining => &self.local,
        }
    }

    fn list_models(&self) -> pb::ListModelsResponse {
        let c = self.cluster.model();
        let p = c.param_counts();
        pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: self.cluster.model_name().to_string(),
                architecture: c.arch.hf_name().to_string(),
                parameters: p.total,
                active_parameters: p.active_per_token,
                max_context: c.max_position_embeddings as u32,
                vocab_size: c.vocab_size as u32,
            }],
        }
    }

    fn cluster_status(&self) -> pb::ClusterStatusResponse {
        let cluster = &self.cluster;
        let Some(serving) = cluster.serving() else {
            return pb::ClusterStatusResponse {
                model: cluster.model_name().to_string(),
                queue_depth: cluster.queued() as u32,
                requests_moved: cluster.moved(),
                ..Default::default()
            };
        };
        let p = &serving.placement;
        let workers = p
            .cells
            .iter()
            .zip(&serving.workers)
            .map(|(cell, w)| pb::WorkerStatus {
                address: cell.address.clone(),
                stage: cell.stage as u32,
                shard: cell.shard as u32,
                device: w.inventory.device.clone(),
                memory_bytes: w.inventory.memory_bytes,
                weight_bytes: w.loaded.weight_bytes,
                resident_bytes: w.loaded.resident_bytes,
                layer_start: cell.subset.layers.start as u32,
                layer_end: cell.subset.layers.end as u32,
                experts: p.experts[cell.shard].clone(),
                ready: true,
                resident_expert_share: cell.resident_expert_share.unwrap_or(0.0),
            })
            .collect();
        let lanes: Vec<pb::LaneStatus> = serving
            .lanes
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let s = l.stats();
                pb::LaneStatus {
                    lane: i as u32,
                    running: s.running as u32,
                    waiting: s.waiting as u32,
                    kv_blocks_total: s.kv_blocks_total as u32,
                    kv_blocks_used: s.kv_blocks_used as u32,
                    preemptions: s.preemptions,
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            stages: p.grid.stages as u32,
            shards: p.grid.shards as u32,
            placement_epoch: p.epoch,
            model: cluster.model_name().to_string(),
            workers,
            lanes,
            queue_depth: cluster.queued() as u32,
            requests_moved: cluster.moved(),
        }
    }
}

/// The deadline a client set with `grpc-timeout` (e.g. `500m`, `10S`), or the server's default;
/// a header that is not a gRPC timeout is refused.
fn deadline(
    metadata: &tonic::metadata::MetadataMap,
    default: Option<Duration>,
) -> Result<Option<Instant>, Status> {
    let from_header = match metadata.get("grpc-timeout") {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or("(not text)");
            Some(grpc_timeout(v).map_err(|e| Status::invalid_argument(e.to_string()))?)
        }
    };
    Ok(from_header
        .or(default)
        .and_then(|d| Instant::now().checked_add(d)))
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if let Some(hop) = route(self.cluster.role(), request.metadata())? {
            return hop.generate(request).await;
        }
        let deadline = deadline(request.metadata(), self.cluster.config().request_timeout)?;
        let (metadata, _, mut r) = request.into_parts();
        if let (true, Some(id)) = (
            r.request_id.is_empty(),
            header_request_id(metadata.as_ref()),
        ) {
            r.request_id = id.to_string();
        }
        let started = self.local.start(&r, deadline, metadata.as_ref())?;
        let request_id = started.request_id;
        let stream = ReceiverStream::new(started.updates)
            .map(move |outcome| outcome.map(|u| wire::generate_response(&request_id, u)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: tonic::Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        if let Some(hop) = route(self.cluster.role(), request.metadata())? {
            return hop.tokenize(request).await;
        }
        let r = request.into_inner();
        let token_ids = prompt_ids(&self.cluster, r.prompt.as_deref(), &[], &r.messages)?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn list_models(
        &self,
        request: tonic::Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        if let Some(hop) = route(self.cluster.role(), request.metadata())? {
            return hop.list_models(request).await;
        }
        Ok(Response::new(self.list_models()))
    }

    async fn cluster_status(
        &self,
        request: tonic::Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        if let Some(hop) = route(self.cluster.role(), request.metadata())? {
            return hop.cluster_status(request).await;
        }
        Ok(Response::new(self.cluster_status()))
    }
}
