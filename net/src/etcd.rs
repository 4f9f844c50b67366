//! A small client of etcd's v3 gRPC API: leases, keys, prefix watches and leader election,
//! the four things cluster membership needs. Every call but a campaign (which waits for
//! leadership by design) is bounded by [`CALL_TIMEOUT`], so an etcd that is down or
//! unreachable is an error after a short while, never a hang.
//!
//! An etcd that wants more ([`EtcdAccess`]) is reached over TLS (its CA, and a client
//! certificate when it asks for one) and with its own user/password authentication: the
//! client asks etcd for a token before its first call and sends it with every call, and asks
//! again after etcd refused it (tokens expire).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use switchyard_proto::etcd::etcdserverpb as pb;
use switchyard_proto::etcd::etcdserverpb::auth_client::AuthClient;
use switchyard_proto::etcd::etcdserverpb::kv_client::KvClient;
use switchyard_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use switchyard_proto::etcd::etcdserverpb::watch_client::WatchClient;
use switchyard_proto::etcd::v3electionpb as election;
use switchyard_proto::etcd::v3electionpb::election_client::ElectionClient;
use tokio::sync::mpsc;
use tokio_rustls::rustls::ClientConfig;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Streaming;
use tracing::warn;

/// The longest any single etcd call (but a campaign) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait before asking etcd again after a failure.
pub const RETRY: Duration = Duration::from_millis(500);

/// A watch that saw nothing for this long is read again anyway (a watch can go quiet).
const WATCH_QUIET: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd address {url:?}: {reason}; expected e.g. http://127.0.0.1:2379")]
    Address { url: String, reason: String },
    #[error("etcd: {}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd lease {0:x} has expired")]
    LeaseExpired(i64),
    #[error("etcd closed the watch")]
    WatchClosed,
    #[error("etcd refused user {user:?}: {}", .status.message())]
    Authenticate {
        user: String,
        #[source]
        status: tonic::Status,
    },
}

/// What an etcd asks of its clients beyond an address.
#[derive(Debug, Clone, Default)]
pub struct EtcdAccess {
    /// TLS: the CA of etcd's certificate, and this client's certificate where etcd asks for
    /// one (`--client-cert-auth`).
    pub tls: Option<Arc<ClientConfig>>,
    /// etcd's own authentication (`etcdctl auth enable`).
    pub user: Option<Credentials>,
}

/// An etcd user and password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never logged.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The token etcd gave this client, sent with every call (none before the first
/// authentication, or without authentication).
#[derive(Clone, Default)]
struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Token {
    fn get(&self) -> Option<MetadataValue<Ascii>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, t: Option<MetadataValue<Ascii>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.get() {
            r.metadata_mut().insert("token", t);
        }
        Ok(r)
    }
}

/// A channel whose calls carry the token.
type Authed = InterceptedService<Channel, Token>;

/// How this client logs in, when etcd wants it to.
#[derive(Clone)]
struct Login {
    credentials: Credentials,
    auth: AuthClient<Channel>,
}

/// Handles to one etcd endpoint; clones share the connection.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Authed>,
    lease: LeaseClient<Authed>,
    watch: WatchClient<Authed>,
    election: ElectionClient<Authed>,
    token: Token,
    login: Option<Login>,
}

/// Who holds an election: what [`Etcd::resign`] needs.
pub type LeaderKey = election::LeaderKey;

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => Ok(r?.into_inner()),
        Err(_) => Err(EtcdError::Timeout(CALL_TIMEOUT)),
    }
}

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// A client of the etcd at `url` (`http://host:port`, or `host:port`), connected on first
    /// use and reconnected after failures.
    pub fn connect(url: &str) -> Result<Etcd, EtcdError> {
        Etcd::connect_with(url, &EtcdAccess::default())
    }

    /// [`Etcd::connect`] to an etcd that wants TLS or authentication. An `https://` URL needs
    /// a CA in `access`.
    pub fn connect_with(url: &str, access: &EtcdAccess) -> Result<Etcd, EtcdError> {
        let address = |reason: &str| EtcdError::Address {
            url: url.into(),
            reason: reason.into(),
        };
        // The TLS happens in the connector, under HTTP/2: the endpoint stays http://.
        let plain = match (url.strip_prefix("https://"), &access.tls) {
            (Some(_), None) => return Err(address("https needs the CA of etcd's certificate")),
            (Some(rest), Some(_)) => format!("http://{rest}"),
            (None, _) => url.to_string(),
        };
        let endpoint = crate::grpc::endpoint(&plain)
            .map_err(|e| address(&e.to_string()))?
            .connect_timeout(Duration::from_secs(1));
        let channel = match &access.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(crate::tls::Connector(tls.clone())),
            None => endpoint.connect_lazy(),
        };
        let token = Token::default();
        let authed = InterceptedService::new(channel.clone(), token.clone());
        Ok(Etcd {
            kv: KvClient::new(authed.clone()),
            lease: LeaseClient::new(authed.clone()),
            watch: WatchClient::new(authed.clone()),
            election: ElectionClient::new(authed),
            token,
            login: access.user.clone().map(|credentials| Login {
                credentials,
                auth: AuthClient::new(channel),
            }),
        })
    }

    /// Makes sure the calls that follow carry a token, when etcd wants one: asks for one if
    /// none is held.
    async fn log_in(&self) -> Result<(), EtcdError> {
        let Some(login) = &self.login else {
            return Ok(());
        };
        if self.token.get().is_some() {
            return Ok(());
        }
        let c = &login.credentials;
        let r = bounded(login.auth.clone().authenticate(pb::AuthenticateRequest {
            name: c.user.clone(),
            password: c.password.clone(),
        }))
        .await
        .map_err(|e| match e {
            EtcdError::Status(status) => EtcdError::Authenticate {
                user: c.user.clone(),
                status,
            },
            e => e,
        })?;
        let token = MetadataValue::try_from(r.token.as_str()).map_err(|_| {
            EtcdError::Status(tonic::Status::internal(
                "etcd sent a token that is not ASCII",
            ))
        })?;
        self.token.set(Some(token));
        Ok(())
    }

    /// Runs one call with a token (when etcd wants one) within [`CALL_TIMEOUT`]; a token etcd
    /// refused is forgotten, so the next call asks for a new one.
    async fn call<T, F>(&self, call: F) -> Result<T, EtcdError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.log_in().await?;
        let r = bounded(call).await;
        if let Err(EtcdError::Status(s)) = &r {
            if s.code() == tonic::Code::Unauthenticated {
                self.token.set(None);
            }
        }
        r
    }

    /// A new lease that expires `ttl` after its last keep-alive.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let r = self
            .call(self.lease.clone().lease_grant(pb::LeaseGrantRequest {
                ttl: ttl.as_secs().max(1) as i64,
            }))
            .await?;
        match r.error.is_empty() {
            true => Ok(r.id),
            false => Err(EtcdError::Status(tonic::Status::unavailable(r.error))),
        }
    }

    /// Renews `lease` once; an error says whether it already expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<(), EtcdError> {
        let once = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease });
        let mut replies = self.call(self.lease.clone().lease_keep_alive(once)).await?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, replies.message())
            .await
            .map_err(|_| EtcdError::Timeout(CALL_TIMEOUT))??;
        match reply {
            Some(r) if r.ttl > 0 => Ok(()),
            _ => Err(EtcdError::LeaseExpired(lease)),
        }
    }

    /// Renews `lease` every `ttl`/3 and returns once it is found expired. While etcd cannot
    /// be reached the lease is assumed alive (errors are logged): what holds it goes on.
    pub async fn hold(&self, lease: i64, ttl: Duration) {
        loop {
            tokio::time::sleep(ttl / 3).await;
            match self.keep_alive(lease).await {
                Ok(()) => {}
                Err(EtcdError::LeaseExpired(_)) => return,
                Err(e) => warn!("cannot renew etcd lease {lease:x} (will retry): {e}"),
            }
        }
    }

    /// Ends `lease` now, deleting every key attached to it.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call(
            self.lease
                .clone()
                .lease_revoke(pb::LeaseRevokeRequest { id: lease }),
        )
        .await?;
        Ok(())
    }

    /// Sets `key` to `value`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        self.call(self.kv.clone().put(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        }))
        .await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let r = self
            .call(self.kv.clone().range(pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            }))
            .await?;
        Ok(r.kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Every key under `prefix` with its value, and the store's revision they were read at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), EtcdError> {
        let r = self
            .call(self.kv.clone().range(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
            }))
            .await?;
        let revision = r.header.map_or(0, |h| h.revision);
        let kvs = r
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
            .collect();
        Ok((kvs, revision))
    }

    /// Returns once a key under `prefix` changed after `revision` (a read's revision), or
    /// after a few quiet seconds: the caller reads again either way. A failed watch is logged,
    /// naming `what`, and waited out.
    pub async fn wait_for_change(&self, prefix: &str, revision: i64, what: &str) {
        let error = match self.watch(prefix, revision + 1).await {
            Ok(mut w) => match tokio::time::timeout(WATCH_QUIET, w.changed()).await {
                Ok(Err(e)) => e,
                _ => return,
            },
            Err(e) => e,
        };
        warn!("the etcd watch on {what} failed (will read again): {error}");
        tokio::time::sleep(RETRY).await;
    }

    /// Watches every key under `prefix` from `revision` (inclusive) on.
    async fn watch(&self, prefix: &str, revision: i64) -> Result<Watch, EtcdError> {
        // The request side stays open as long as the watch: etcd ends a watch whose client
        // stream closed.
        let (tx, rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            create_request: Some(pb::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: revision,
            }),
        };
        tx.send(create).await.map_err(|_| EtcdError::WatchClosed)?;
        let events = self
            .call(self.watch.clone().watch(ReceiverStream::new(rx)))
            .await?;
        Ok(Watch {
            _requests: tx,
            events,
        })
    }

    /// Waits until this caller leads the election `name` (held by `lease`), proclaiming
    /// `value`. Unbounded by design: standbys wait here.
    pub async fn campaign(
        &self,
        name: &str,
        lease: i64,
        value: Vec<u8>,
    ) -> Result<LeaderKey, EtcdError> {
        self.log_in().await?;
        let r = self
            .election
            .clone()
            .campaign(election::CampaignRequest {
                name: name.as_bytes().to_vec(),
                lease,
                value,
            })
            .await?
            .into_inner();
        r.leader
            .ok_or_else(|| EtcdError::Status(tonic::Status::internal("campaign without leader")))
    }

    /// Gives up leadership so that the next campaigner takes over.
    pub async fn resign(&self, leader: LeaderKey) -> Result<(), EtcdError> {
        self.call(self.election.clone().resign(election::ResignRequest {
            leader: Some(leader),
        }))
        .await?;
        Ok(())
    }

    /// What the current leader of `name` proclaims, if there is one.
    pub async fn leader(&self, name: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        match self
            .call(self.election.clone().leader(election::LeaderRequest {
                name: name.as_bytes().to_vec(),
            }))
            .await
        {
            Ok(r) => Ok(r.kv.map(|kv| kv.value)),
            // etcd answers "election: no leader" when nobody campaigns.
            Err(EtcdError::Status(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A watch on a key prefix.
pub struct Watch {
    _requests: mpsc::Sender<pb::WatchRequest>,
    events: Streaming<pb::WatchResponse>,
}

impl Watch {
    /// Waits for the next change under the prefix; an error ends the watch.
    pub async fn changed(&mut self) -> Result<(), EtcdError> {
        loop {
            let r = self.events.message().await?.ok_or(EtcdError::WatchClosed)?;
            if r.canceled {
                return Err(EtcdError::WatchClosed);
            }
            if !r.events.is_empty() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
