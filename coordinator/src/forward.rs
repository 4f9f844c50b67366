//! A standby coordinator answers clients by forwarding to the leader.
//!
//! With etcd, every coordinator may sit behind one address (a Kubernetes Service): whichever
//! one a client reaches must answer. The leader serves; a standby relays each
//! `switchyard.v1.Inference` call to the leader it finds in the election (each coordinator
//! proclaims its client API address there), over one cached channel. Request metadata
//! (`x-request-id`, `grpc-timeout`, `traceparent`, …) goes along; the leader's replies, response
//! metadata and status codes come back unchanged, and a stream the leader ends with an error
//! ends with that error. A standby marks what it forwards (`x-switchyard-forwarded`); a
//! coordinator that gets a marked request while not leading refuses it rather than forwarding
//! again, and a coordinator never forwards to its own address. With no leader known, or the
//! leader unreachable, the answer is `UNAVAILABLE` naming the leader tried (or saying none is
//! elected) and why. Once the standby wins the election it serves itself.
//!
//! gRPC calls are relayed whole ([`Hop`]); the OpenAI HTTP API takes the same road through
//! [`ToLeader`], the forwarding [`Admission`]: it relays a checked, tokenized request to the
//! leader's gRPC API and turns its replies back into the updates the HTTP layer streams.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::admission::{Admission, Started};
use crate::client::inference_client;
use crate::cluster::Cluster;
use crate::lane::outcome_stream;
use crate::role::{ProcessRole, Role, Target};

/// Set on a forwarded request: the forwarding coordinator's address. A coordinator that is
/// not leading refuses such a request instead of forwarding it a second time.
pub const FORWARDED: &str = "x-switchyard-forwarded";
/// Set on the replies of a forwarded call: the leader that served it.
pub const SERVED_BY: &str = "x-switchyard-served-by";

/// Headers that belong to one hop and are not forwarded: compression is negotiated per
/// connection, and the marker is set anew.
const HOP_HEADERS: [&str; 3] = ["grpc-encoding", "grpc-accept-encoding", FORWARDED];

/// A call a standby sends on to the leader.
pub struct Hop {
    me: String,
    leader: String,
    client: InferenceClient<Channel>,
}

/// The stream of a generate call relayed from the leader.
pub type RelayedStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl Hop {
    fn new(t: Target) -> Hop {
        Hop {
            me: t.me,
            leader: t.leader,
            client: inference_client(t.channel),
        }
    }

    /// The leader's answer as this coordinator gives it back.
    fn reply<T>(&self, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        r.map(|r| back(r, &self.leader, |m| m))
            .map_err(|s| from_leader(s, &self.me, &self.leader))
    }

    pub async fn generate(
        self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<RelayedStream>, Status> {
        let Hop {
            me,
            leader,
            mut client,
        } = self;
        debug!(%leader, "forwarding a generate request");
        let reply = client
            .generate(onward(request, &me))
            .await
            .map_err(|s| from_leader(s, &me, &leader))?;
        let to = leader.clone();
        Ok(back(reply, &leader, move |s| {
            Box::pin(s.map(move |m| m.map_err(|e| from_leader(e, &me, &to)))) as RelayedStream
        }))
    }

    pub async fn tokenize(
        mut self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = self.client.tokenize(onward(request, &self.me)).await;
        self.reply(r)
    }

    pub async fn list_models(
        mut self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let r = self.client.list_models(onward(request, &self.me)).await;
        self.reply(r)
    }

    pub async fn cluster_status(
        mut self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let r = self.client.cluster_status(onward(request, &self.me)).await;
        self.reply(r)
    }
}

/// Where a call with `metadata` goes: `None` to be served here (this coordinator leads, or
/// drains), or the hop to the leader (it stands by).
pub fn route(role: &ProcessRole, metadata: &MetadataMap) -> Result<Option<Hop>, Status> {
    if role.get() != Role::Standby {
        return Ok(None);
    }
    let from = metadata
        .get(FORWARDED)
        .map(|v| format!("by {}", v.to_str().unwrap_or("(unreadable)")));
    role.target(from.as_deref()).map(Hop::new).map(Some)
}

/// The request as sent on to the leader: the client's metadata (deadline, request id, trace
/// context) but this hop's, marked as forwarded by `me`.
fn onward<T>(request: Request<T>, me: &str) -> Request<T> {
    let (mut metadata, _, message) = request.into_parts();
    for h in HOP_HEADERS {
        metadata.remove(h);
    }
    if let Ok(v) = MetadataValue::try_from(me) {
        metadata.insert(FORWARDED, v);
    }
    Request::from_parts(metadata, Default::default(), message)
}

/// A status from the forwarded call: the leader's own, unchanged; a failure to reach it,
/// as `UNAVAILABLE` naming the leader.
fn from_leader(status: Status, me: &str, leader: &str) -> Status {
    // A status the leader sent has no local cause; one from the connection has.
    if std::error::Error::source(&status).is_none() {
        return status;
    }
    Status::unavailable(format!(
        "coordinator {me} is a standby and forwards to the leader {leader}, which cannot be \
         reached: {}",
        status.message()
    ))
}

/// The leader's reply with its metadata, marked with who served it.
fn back<T, U>(reply: Response<T>, leader: &str, f: impl FnOnce(T) -> U) -> Response<U> {
    let (mut metadata, message, extensions) = reply.into_parts();
    if let Ok(v) = MetadataValue::try_from(leader) {
        metadata.insert(SERVED_BY, v);
    }
    Response::from_parts(metadata, f(message), extensions)
}

/// Admission on the leader, for the HTTP API of a standby: a checked, tokenized request
/// (`prompt_token_ids` set) goes to the leader's gRPC API. A refusal by the leader arrives as
/// the first update.
#[derive(Clone)]
pub struct ToLeader {
    cluster: Arc<Cluster>,
}

impl ToLeader {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ToLeader { cluster }
    }
}

impl Admission for ToLeader {
    fn start(
        &self,
        request: &pb::GenerateRequest,
        deadline: Option<Instant>,
        caller: &HeaderMap,
    ) -> Result<Started, Status> {
        let cluster = &self.cluster;
        // The caller chose this admission because the coordinator stands by.
        let Hop {
            me,
            leader,
            mut client,
        } = Hop::new(cluster.role().target(None)?);
        let prompt = request.prompt_token_ids.clone();
        let mut r = request.clone();
        if r.request_id.is_empty() {
            let id = cluster.next_seq();
            r.request_id = format!("req-{id}");
        }
        let request_id = r.request_id.clone();
        let mut call = Request::new(r);
        if let Some(d) = deadline {
            call.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        if let Ok(v) = MetadataValue::try_from(request_id.as_str()) {
            call.metadata_mut().insert("x-request-id", v);
        }
        // The client's trace context goes along, so the leader's spans join the client's
        // trace; and its API key, which the leader checks as this coordinator did.
        for key in ["traceparent", "tracestate", "authorization"] {
            if let Some(v) = caller
                .get(key)
                .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
            {
                call.metadata_mut().insert(key, v);
            }
        }
        let call = onward(call, &me);
        let (tx, rx) = outcome_stream();
        tokio::spawn(async move {
            let mut stream = match client.generate(call).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    let _ = tx.send(Err(from_leader(s, &me, &leader))).await;
                    return;
                }
            };
            loop {
                let next = tokio::select! {
                    m = stream.next() => m,
                    // The HTTP client went away: dropping the stream cancels the call.
                    _ = tx.closed() => return,
                };
                let Some(m) = next else { return };
                let outcome = m
                    .map(wire::update)
                    .map_err(|s| from_leader(s, &me, &leader));
                let end = outcome.is_err();
                // Waiting for room here holds back the leader's stream, and so its lane.
                if tx.send(outcome).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Started {
            request_id,
            prompt,
            updates: rx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_metadata_keeps_the_clients_but_not_the_hops() {
        let mut r = Request::new(());
        let m = r.metadata_mut();
        m.insert("x-request-id", "abc".parse().unwrap());
        m.insert("grpc-timeout", "5S".parse().unwrap());
        m.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        m.insert("grpc-accept-encoding", "gzip".parse().unwrap());
        m.insert(FORWARDED, "spoofed".parse().unwrap());
        let out = onward(r, "10.0.0.2:50051");
        let m = out.metadata();
        assert_eq!(m.get("x-request-id").unwrap(), "abc");
        assert_eq!(m.get("grpc-timeout").unwrap(), "5S");
        assert!(m.get("traceparent").is_some());
        assert!(m.get("grpc-accept-encoding").is_none());
        assert_eq!(m.get(FORWARDED).unwrap(), "10.0.0.2:50051");
    }

    #[test]
    fn the_leaders_statuses_pass_unchanged_and_connection_failures_name_it() {
        let s = Status::resource_exhausted("the queue is full");
        let out = from_leader(s, "b:1", "a:1");
        assert_eq!(out.code(), tonic::Code::ResourceExhausted);
        assert_eq!(out.message(), "the queue is full");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let s = Status::from_error(Box::new(io));
        let out = from_leader(s, "b:1", "a:1");
        assert_eq!(out.code(), tonic::Code::Unavailable);
        assert!(out.message().contains("leader a:1"), "{out}");
    }
}
