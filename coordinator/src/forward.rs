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
//! The OpenAI HTTP API takes the same road: [`start`] relays a checked, tokenized request to
//! the leader's gRPC API and turns its replies back into the updates the HTTP layer streams.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_net::grpc::endpoint;
use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::inference_server::Inference;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::api::{GenerateStream, InferenceApi, Started};
use crate::client::inference_client;
use crate::cluster::Cluster;

/// Set on a forwarded request: the forwarding coordinator's address. A coordinator that is
/// not leading refuses such a request instead of forwarding it a second time.
pub const FORWARDED: &str = "x-switchyard-forwarded";
/// Set on the replies of a forwarded call: the leader that served it.
pub const SERVED_BY: &str = "x-switchyard-served-by";

/// How long connecting to the leader may take before the call fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Headers that belong to one hop and are not forwarded: compression is negotiated per
/// connection, and the marker is set anew.
const HOP_HEADERS: [&str; 3] = ["grpc-encoding", "grpc-accept-encoding", FORWARDED];

/// This coordinator's view of the election, and its channel to the leader.
#[derive(Default)]
pub struct Relay {
    state: Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    /// This coordinator's client API address, as it proclaims it.
    me: Option<String>,
    /// The elected leader's address; `None` when nobody leads (or it is not known yet).
    leader: Option<String>,
    /// Why the leader is not known (etcd cannot be read), if so.
    trouble: Option<String>,
    channel: Option<(String, Channel)>,
}

impl Relay {
    /// This coordinator's own address: never a target.
    pub fn set_me(&self, me: &str) {
        self.state.lock().expect("not poisoned").me = Some(me.to_string());
    }

    /// What the election says now: its leader, or why that is not known.
    pub fn set_leader(&self, leader: Option<String>, trouble: Option<String>) {
        let mut s = self.state.lock().expect("not poisoned");
        if s.leader != leader {
            info!(
                leader = leader.as_deref().unwrap_or("(none)"),
                "the elected leader"
            );
        }
        s.leader = leader;
        s.trouble = trouble;
    }

    /// The elected leader's address, as last seen.
    pub fn leader(&self) -> Option<String> {
        self.state.lock().expect("not poisoned").leader.clone()
    }

    /// Where a request a standby got goes: the leader and a channel to it, or why nowhere.
    /// `forwarded_by` is the marker the request came with, if any.
    pub fn target(&self, forwarded_by: Option<&str>) -> Result<(String, String, Channel), Status> {
        let mut s = self.state.lock().expect("not poisoned");
        let me = s.me.clone().unwrap_or_else(|| "(this coordinator)".into());
        let leader = s.leader.clone();
        let named = leader.as_deref().unwrap_or("none is elected");
        if let Some(from) = forwarded_by {
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby and got a request {from} already forwarded; \
                 it forwards no further (the leader it knows: {named})"
            )));
        }
        let Some(leader) = leader else {
            let why = s
                .trouble
                .as_deref()
                .map_or(String::new(), |t| format!(" ({t})"));
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby and no leader is elected{why}; retry shortly"
            )));
        };
        if s.me.as_deref() == Some(leader.as_str()) {
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby, yet the election names its own address as the \
                 leader (it is taking over, or an earlier run of it still holds the lease); \
                 retry shortly"
            )));
        }
        let channel = match &s.channel {
            Some((a, c)) if *a == leader => c.clone(),
            _ => {
                let c = leader_channel(&leader).map_err(|e| {
                    Status::unavailable(format!(
                        "coordinator {me} is a standby; the leader's address {leader:?} is unusable: {e}"
                    ))
                })?;
                s.channel = Some((leader.clone(), c.clone()));
                c
            }
        };
        Ok((me, leader, channel))
    }
}

fn leader_channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(address)?
        .connect_timeout(CONNECT_TIMEOUT)
        // A leader that vanishes without closing its connections is found out.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Where one call goes.
enum Route {
    Here,
    Leader(Box<Hop>),
}

/// A call a standby sends on to the leader.
struct Hop {
    me: String,
    leader: String,
    client: InferenceClient<Channel>,
}

impl Hop {
    /// The leader's answer as this coordinator gives it back.
    fn reply<T>(&self, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        r.map(|r| back(r, &self.leader, |m| m))
            .map_err(|s| from_leader(s, &self.me, &self.leader))
    }
}

fn route(cluster: &Cluster, metadata: &MetadataMap) -> Result<Route, Status> {
    if !cluster.is_standby() {
        return Ok(Route::Here);
    }
    let from = metadata
        .get(FORWARDED)
        .map(|v| format!("by {}", v.to_str().unwrap_or("(unreadable)")));
    let (me, leader, channel) = cluster.relay.target(from.as_deref())?;
    Ok(Route::Leader(Box::new(Hop {
        me,
        leader,
        client: inference_client(channel),
    })))
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

/// The `Inference` service a coordinator serves: its own API while it leads (or without
/// etcd), the leader's through it while it stands by.
#[derive(Clone)]
pub struct Forwarding {
    api: InferenceApi,
}

impl Forwarding {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Forwarding {
            api: InferenceApi::new(cluster),
        }
    }
}

#[tonic::async_trait]
impl Inference for Forwarding {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        match route(self.api.cluster(), request.metadata())? {
            Route::Here => self.api.generate(request).await,
            Route::Leader(hop) => {
                let Hop {
                    me,
                    leader,
                    mut client,
                } = *hop;
                debug!(%leader, "forwarding a generate request");
                let reply = client
                    .generate(onward(request, &me))
                    .await
                    .map_err(|s| from_leader(s, &me, &leader))?;
                let to = leader.clone();
                Ok(back(reply, &leader, move |s| {
                    Box::pin(s.map(move |m| m.map_err(|e| from_leader(e, &me, &to))))
                        as GenerateStream
                }))
            }
        }
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        match route(self.api.cluster(), request.metadata())? {
            Route::Here => self.api.tokenize(request).await,
            Route::Leader(mut hop) => {
                let r = hop.client.tokenize(onward(request, &hop.me)).await;
                hop.reply(r)
            }
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        match route(self.api.cluster(), request.metadata())? {
            Route::Here => self.api.list_models(request).await,
            Route::Leader(mut hop) => {
                let r = hop.client.list_models(onward(request, &hop.me)).await;
                hop.reply(r)
            }
        }
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        match route(self.api.cluster(), request.metadata())? {
            Route::Here => self.api.cluster_status(request).await,
            Route::Leader(mut hop) => {
                let r = hop.client.cluster_status(onward(request, &hop.me)).await;
                hop.reply(r)
            }
        }
    }
}

/// Starts a checked, tokenized request (`prompt_token_ids` set) for the HTTP API: on this
/// coordinator while it leads, else on the leader through its gRPC API. A forwarded
/// request's refusal by the leader arrives as the first update.
pub fn start(
    api: &InferenceApi,
    request: &pb::GenerateRequest,
    deadline: Option<Instant>,
    caller: &HeaderMap,
) -> Result<Started, Status> {
    let cluster = api.cluster();
    let Route::Leader(hop) = route(cluster, &MetadataMap::new())? else {
        return api.start(request, deadline, caller);
    };
    let Hop {
        me,
        leader,
        mut client,
    } = *hop;
    let prompt = request.prompt_token_ids.clone();
    let mut r = request.clone();
    if r.request_id.is_empty() {
        let id = cluster.next_seq.fetch_add(1, Ordering::Relaxed);
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
    // The client's trace context goes along, so the leader's spans join the client's trace.
    for key in ["traceparent", "tracestate"] {
        if let Some(v) = caller
            .get(key)
            .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
        {
            call.metadata_mut().insert(key, v);
        }
    }
    let call = onward(call, &me);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = match client.generate(call).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                let _ = tx.send(Err(from_leader(s, &me, &leader)));
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
            if tx.send(outcome).is_err() || end {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_standby_forwards_once_never_to_itself_and_names_the_leader() {
        let relay = Relay::default();
        relay.set_me("10.0.0.2:50051");

        // Nobody leads: UNAVAILABLE saying so, and why the election is unknown.
        relay.set_leader(None, Some("etcd did not answer".into()));
        let e = relay.target(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("no leader is elected"), "{e}");
        assert!(e.message().contains("etcd did not answer"), "{e}");

        // The election names this coordinator itself: never a forward to itself.
        relay.set_leader(Some("10.0.0.2:50051".into()), None);
        let e = relay.target(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("its own address"), "{e}");

        // A leader elsewhere: that is where requests go, over one cached channel.
        relay.set_leader(Some("10.0.0.1:50051".into()), None);
        let (me, leader, _) = relay.target(None).unwrap();
        assert_eq!(
            (me.as_str(), leader.as_str()),
            ("10.0.0.2:50051", "10.0.0.1:50051")
        );

        // A request another standby already forwarded is refused, naming both.
        let e = relay.target(Some("by 10.0.0.3:50051")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("10.0.0.3:50051"), "{e}");
        assert!(e.message().contains("already forwarded"), "{e}");
        assert!(e.message().contains("10.0.0.1:50051"), "{e}");
    }

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
