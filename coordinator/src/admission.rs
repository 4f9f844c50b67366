//! Admission: how a request gets into the cluster, for every API.
//!
//! The gRPC and OpenAI HTTP APIs both turn what they were sent into a [`pb::GenerateRequest`]
//! and call [`Admission::start`]. There are two implementations: [`Local`] validates the
//! request (one [`switchyard_scheduler::Validator`] for both APIs), opens its span and queues it
//! on this coordinator's cluster; [`crate::forward::ToLeader`] sends it to the elected leader
//! while this coordinator stands by. Either way the caller gets a [`Started`] request: its id,
//! its prompt and the stream of its outcomes.

use std::sync::Arc;
use std::time::Instant;

use switchyard_net::{trace_context, wire};
use switchyard_proto::v1 as pb;
use switchyard_scheduler::{Invalid, PromptInput, Request};
use tokio::sync::mpsc;
use tonic::codegen::http::HeaderMap;
use tonic::Status;
use tracing::{field, info, info_span};

use crate::cluster::Cluster;
use crate::lane::{code_label, outcome_stream, Admitted, Outcome, RequestLife, Work};
use crate::metrics::RequestTimes;

/// A request the cluster has taken: its id, its prompt and the stream of its outcomes.
pub struct Started {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub updates: mpsc::Receiver<Outcome>,
}

/// Starts requests: here, or on the leader.
pub trait Admission: Send + Sync {
    /// Checks `request`, queues it and returns its stream. `caller` holds the client's
    /// headers: its trace context, if any, becomes the request span's parent.
    fn start(
        &self,
        request: &pb::GenerateRequest,
        deadline: Option<Instant>,
        caller: &HeaderMap,
    ) -> Result<Started, Status>;
}

/// The longest request id taken: it names the request in logs and spans and comes back in
/// every streamed message.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// The client's `x-request-id` header (set by proxies and tracers), if it sent one: it names
/// the request in logs and spans.
pub fn header_request_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// How a refusal by validation reaches a client.
pub fn refusal(e: Invalid) -> Status {
    match e {
        Invalid::NoTokenizer => Status::failed_precondition(e.to_string()),
        Invalid::Request(_) | Invalid::Tokenizer(_) => Status::invalid_argument(e.to_string()),
    }
}

/// The prompt of a request: exactly one of text, token ids or chat messages, tokenized.
pub fn prompt_ids(
    cluster: &Cluster,
    prompt: Option<&str>,
    ids: &[u32],
    messages: &[pb::ChatMessage],
) -> Result<Vec<u32>, Status> {
    let messages: Vec<switchyard_model::ChatMessage> = messages
        .iter()
        .map(|m| switchyard_model::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let input = PromptInput::exactly_one(prompt, ids, &messages).map_err(refusal)?;
    cluster.tokenize(input).map_err(refusal)
}

/// Admission into this coordinator's own cluster.
#[derive(Clone)]
pub struct Local {
    cluster: Arc<Cluster>,
}

impl Local {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Local { cluster }
    }

    fn admit(
        &self,
        r: &pb::GenerateRequest,
        deadline: Option<Instant>,
        arrived: Instant,
        caller: &HeaderMap,
    ) -> Result<Started, Status> {
        let cluster = &self.cluster;
        let id = cluster.next_seq();
        let request_id = match r.request_id.as_str() {
            "" => format!("req-{id}"),
            given if given.len() > MAX_REQUEST_ID_BYTES => {
                return Err(Status::invalid_argument(format!(
                    "the request id is {} bytes long; expected at most {MAX_REQUEST_ID_BYTES}",
                    given.len()
                )))
            }
            given if given.chars().any(char::is_control) => {
                return Err(Status::invalid_argument(
                    "the request id holds control characters; expected printable text",
                ))
            }
            given => given.to_string(),
        };
        let prompt = prompt_ids(
            cluster,
            r.prompt.as_deref(),
            &r.prompt_token_ids,
            &r.messages,
        )?;
        let params = wire::sampling_params(r);
        if params.max_tokens == 0 && params.prompt_logprobs.is_none() {
            return Err(Status::invalid_argument(
                "max_tokens is 0; expected at least 1 (or set prompt_logprobs to only score the prompt)",
            ));
        }
        let req = Request {
            id,
            prompt: prompt.clone(),
            params,
        };
        let req = cluster.check(req).map_err(refusal)?;
        let queued = cluster.queued();
        let max_queue = cluster.config().max_queue;
        if queued >= max_queue {
            return Err(Status::resource_exhausted(format!(
                "the queue is full ({queued} requests waiting, limit {max_queue}); retry later"
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
        let (tx, rx) = outcome_stream();
        cluster.submit(Admitted {
            work: Work::New(req),
            life: RequestLife {
                request_id: request_id.clone(),
                span,
                deadline,
                out: tx,
                held: Default::default(),
                stalled_since: None,
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
}

impl Admission for Local {
    /// A refusal is counted in the failure metric.
    fn start(
        &self,
        r: &pb::GenerateRequest,
        deadline: Option<Instant>,
        caller: &HeaderMap,
    ) -> Result<Started, Status> {
        let arrived = Instant::now();
        self.admit(r, deadline, arrived, caller)
            .inspect_err(|status| {
                let code = code_label(status.code());
                self.cluster.metrics().failure.with(&[&code]).inc();
            })
    }
}
