//! The client API: `switchyard.v1.Inference` over gRPC, with the standard health service and
//! server reflection so generic clients (grpcurl, grpc_health_probe) work without a .proto.
//! A request is checked, tokenized, given the least loaded lane, and its updates streamed back.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_model::ChatMessage;
use switchyard_net::{trace_context, wire};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_server::{Inference, InferenceServer};
use switchyard_scheduler::{Request, SamplingParams};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http::HeaderMap;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::{Response, Status};
use tonic_health::ServingStatus;
use tracing::{field, info, info_span};

use crate::cluster::Cluster;
use crate::forward::Forwarding;
use crate::lane::{code_label, Admitted, Client, Outcome, Work};
use crate::metrics::RequestTimes;

#[derive(Clone)]
pub struct InferenceApi {
    cluster: Arc<Cluster>,
}

/// A request the cluster has taken: its id, its prompt and the stream of its outcomes.
pub struct Started {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub updates: mpsc::UnboundedReceiver<Outcome>,
}

/// The client's `x-request-id` header (set by proxies and tracers), if it sent one: it names
/// the request in logs and spans.
pub(crate) fn header_request_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

pub(crate) type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl InferenceApi {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        InferenceApi { cluster }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Checks a request, queues it and returns its stream; every API (gRPC, HTTP) goes
    /// through here. A refusal is counted in the failure metric. `caller` holds the client's
    /// headers: its trace context, if any, becomes the request span's parent.
    pub fn start(
        &self,
        r: &pb::GenerateRequest,
        deadline: Option<Instant>,
        caller: &HeaderMap,
    ) -> Result<Started, Status> {
        let arrived = Instant::now();
        self.admit(r, deadline, arrived, caller)
            .inspect_err(|status| {
                let code = code_label(status.code());
                self.cluster.metrics.failure.with(&[&code]).inc();
            })
    }

    fn admit(
        &self,
        r: &pb::GenerateRequest,
        deadline: Option<Instant>,
        arrived: Instant,
        caller: &HeaderMap,
    ) -> Result<Started, Status> {
        let cluster = &self.cluster;
        let id = cluster.next_seq.fetch_add(1, Ordering::Relaxed);
        let request_id = match r.request_id.as_str() {
            "" => format!("req-{id}"),
            given => given.to_string(),
        };
        let prompt = self.prompt_ids(r.prompt.as_deref(), &r.prompt_token_ids, &r.messages)?;
        let req = Request {
            id,
            prompt: prompt.clone(),
            params: params(r)?,
        };
        cluster.check(&req)?;
        let queued = cluster.queued();
        if queued >= cluster.config.max_queue {
            return Err(Status::resource_exhausted(format!(
                "the queue is full ({queued} requests waiting, limit {}); retry later",
                cluster.config.max_queue
            )));
        }
        // The request's whole life, from here to its last outcome (see `lane::Driver::end`);
        // the steps that serve it link to it.
        let span = info_span!(
            "request",
            request_id = %request_id,
            prompt_tokens = req.prompt.len(),
            completion_tokens = field::Empty,
            outcome = field::Empty,
            otel.status_code = field::Empty,
        );
        trace_context::adopt(&span, caller);
        span.in_scope(|| info!("generate"));
        let (tx, rx) = mpsc::unbounded_channel();
        cluster.submit(Admitted {
            work: Work::New(req),
            client: Client {
                request_id: request_id.clone(),
                span,
                deadline,
                out: tx,
                moves: 0,
                times: RequestTimes::new(arrived),
                prompt_tokens: prompt.len(),
                completion_tokens: 0,
            },
        })?;
        Ok(Started {
            request_id,
            prompt,
            updates: rx,
        })
    }

    pub fn tokenizer(&self) -> Result<&switchyard_model::Tokenizer, Status> {
        self.cluster.tokenizer.as_deref().ok_or_else(|| {
            Status::failed_precondition(
                "the model directory has no tokenizer.json; send prompt_token_ids",
            )
        })
    }

    /// The prompt's token ids from exactly one of `prompt`, `prompt_token_ids`, `messages`.
    pub fn prompt_ids(
        &self,
        prompt: Option<&str>,
        ids: &[u32],
        messages: &[pb::ChatMessage],
    ) -> Result<Vec<u32>, Status> {
        let given = [prompt.is_some(), !ids.is_empty(), !messages.is_empty()];
        match given.iter().filter(|g| **g).count() {
            1 => {}
            0 => {
                return Err(Status::invalid_argument(
                    "no input: set exactly one of prompt, prompt_token_ids or messages",
                ))
            }
            _ => {
                return Err(Status::invalid_argument(
                    "conflicting inputs: set exactly one of prompt, prompt_token_ids or messages",
                ))
            }
        }
        let tokenizer_error =
            |e: switchyard_model::TokenizerError| Status::invalid_argument(e.to_string());
        if let Some(text) = prompt {
            return self
                .tokenizer()?
                .encode(text, true)
                .map_err(tokenizer_error);
        }
        if !messages.is_empty() {
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect();
            return self
                .tokenizer()?
                .apply_chat(&messages)
                .map_err(tokenizer_error);
        }
        Ok(ids.to_vec())
    }
}

fn params(r: &pb::GenerateRequest) -> Result<SamplingParams, Status> {
    let max_tokens = r.max_tokens.unwrap_or(16) as usize;
    if max_tokens == 0 && r.prompt_logprobs.is_none() {
        return Err(Status::invalid_argument(
            "max_tokens is 0; expected at least 1 (or set prompt_logprobs to only score the prompt)",
        ));
    }
    Ok(SamplingParams {
        temperature: r.temperature,
        top_p: r.top_p.unwrap_or(1.0),
        top_k: r.top_k as usize,
        seed: r.seed,
        max_tokens,
        stop: r.stop.clone(),
        logprobs: r.logprobs.map(|n| n as usize),
        prompt_logprobs: r.prompt_logprobs.map(|n| n as usize),
        ignore_eos: r.ignore_eos,
    })
}

/// The deadline a client set with `grpc-timeout` (e.g. `500m`, `10S`), or the server's default.
fn deadline(metadata: &tonic::metadata::MetadataMap, default: Option<Duration>) -> Option<Instant> {
    let from_header = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (n, unit) = v.split_at(v.len().checked_sub(1)?);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "H" => Duration::from_secs(n * 3600),
                "M" => Duration::from_secs(n * 60),
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return None,
            })
        });
    from_header.or(default).map(|d| Instant::now() + d)
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline(request.metadata(), self.cluster.config.request_timeout);
        let (metadata, _, mut r) = request.into_parts();
        if let (true, Some(id)) = (
            r.request_id.is_empty(),
            header_request_id(metadata.as_ref()),
        ) {
            r.request_id = id.to_string();
        }
        let started = self.start(&r, deadline, metadata.as_ref())?;
        let request_id = started.request_id;
        let stream = UnboundedReceiverStream::new(started.updates)
            .map(move |outcome| outcome.map(|u| wire::generate_response(&request_id, u)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: tonic::Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let token_ids = self.prompt_ids(r.prompt.as_deref(), &[], &r.messages)?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn list_models(
        &self,
        _: tonic::Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let c = &self.cluster.model;
        let p = c.param_counts();
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: self.cluster.model_name.clone(),
                architecture: c.arch.hf_name().to_string(),
                parameters: p.total,
                active_parameters: p.active_per_token,
                max_context: c.max_position_embeddings as u32,
                vocab_size: c.vocab_size as u32,
            }],
        }))
    }

    async fn cluster_status(
        &self,
        _: tonic::Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let cluster = &self.cluster;
        let Some(serving) = cluster.serving() else {
            return Ok(Response::new(pb::ClusterStatusResponse {
                model: cluster.model_name.clone(),
                queue_depth: cluster.queued() as u32,
                requests_moved: cluster.moved.load(Ordering::Relaxed),
                ..Default::default()
            }));
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
        Ok(Response::new(pb::ClusterStatusResponse {
            stages: p.grid.stages as u32,
            shards: p.grid.shards as u32,
            placement_epoch: p.epoch,
            model: cluster.model_name.clone(),
            workers,
            lanes,
            queue_depth: cluster.queued() as u32,
            requests_moved: cluster.moved.load(Ordering::Relaxed),
        }))
    }
}

/// Serves the client API on `listener` until `shutdown`.
pub async fn serve(
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // SERVING only while a complete, warmed-up placement serves.
    let mut ready = cluster.ready();
    tokio::spawn(async move {
        loop {
            let status = match *ready.borrow_and_update() {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
            // "" is the server as a whole.
            for name in ["", <InferenceServer<InferenceApi> as NamedService>::NAME] {
                health.set_service_status(name, status).await;
            }
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError(e.to_string()))?;
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(Forwarding::new(cluster)))
        .serve_with_incoming_shutdown(
            // Replies must not wait for Nagle's algorithm: an exchange is many small
            // round trips.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| ServeError(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
#[error("gRPC server: {0}")]
pub struct ServeError(pub String);
