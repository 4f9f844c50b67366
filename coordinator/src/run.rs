//! A coordinator process from start to exit: bind the client gRPC API and the HTTP port, run
//! the membership (a static worker list, or etcd with leader election), serve until Ctrl-C or
//! SIGTERM, then drain: stop admitting (both ports stay open, answering new requests
//! "unavailable" so clients go elsewhere), let requests in flight finish within the grace
//! period, fail the rest and stop the servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_metrics::{self as metrics, Registry};
use switchyard_net::process::{bind, shutdown_signal, BindError, EtcdMember, JoinError};
use switchyard_net::tls::{self, Incoming, ServerTls, TlsError};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::ApiKeys;
use crate::cluster::{Cluster, ClusterConfig, StartError};
use crate::http;
use crate::membership::{self, EtcdMembership};
use crate::server::{self, ServeError};

/// Where a coordinator listens, and whom it lets in.
#[derive(Debug, Clone)]
pub struct Ports {
    /// The client gRPC API.
    pub grpc: SocketAddr,
    /// The HTTP port: the OpenAI-compatible API, the dashboard, metrics, health.
    pub http: SocketAddr,
    /// TLS on both ports; none: plain TCP.
    pub tls: Option<ServerTls>,
    /// The API keys both ports accept.
    pub keys: Arc<ApiKeys>,
}

impl Ports {
    /// The TLS configurations of the gRPC and the HTTP port, read now (so a bad file stops
    /// the start, naming it).
    fn tls(&self) -> Result<[Option<Arc<tokio_rustls::rustls::ServerConfig>>; 2], TlsError> {
        Ok(match &self.tls {
            Some(t) => [Some(t.config(&[tls::H2])?), Some(t.config(&[tls::HTTP1])?)],
            None => [None, None],
        })
    }
}

/// Why a coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(
        "--grpc-addr {0} listens on every interface: give --advertise HOST:PORT, the \
         address other coordinators reach this one's gRPC API at (standbys forward \
         their clients' calls to the leader's)"
    )]
    NoAdvertise(SocketAddr),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Starts a static cluster, then serves the client APIs until Ctrl-C or SIGTERM (then drains).
/// `local_workers` are the metrics of workers in this process, which `/metrics` includes.
pub async fn static_cluster(
    config: ClusterConfig,
    ports: Ports,
    local_workers: Vec<Arc<Registry>>,
) -> Result<(), RunError> {
    let grace = config.drain_grace;
    let [grpc_tls, http_tls] = ports.tls()?;
    let cluster = Cluster::start(config).await?;
    let listener = bind(ports.grpc).await?;
    if let Some(s) = cluster.serving() {
        eprint!("{}", s.placement);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let web = spawn_http(&cluster, &ports, http_tls, local_workers, stop_rx.clone()).await?;
    eprintln!(
        "switchyard: listening on {} (gRPC), serving {}",
        listener.local_addr()?,
        cluster.model_name()
    );
    let leader = tokio::spawn(membership::run_static(cluster.clone(), {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }));
    let front = (grpc_tls, ports.keys);
    serve_until_drained(cluster, listener, front, grace, stop_tx, web).await?;
    let _ = leader.await;
    Ok(())
}

/// A coordinator of a cluster kept in etcd: leader or standby, until Ctrl-C or SIGTERM.
pub async fn etcd_cluster(
    config: ClusterConfig,
    ports: Ports,
    member: EtcdMember,
) -> Result<(), RunError> {
    let (etcd, keys) = member.connect()?;
    let grace = config.drain_grace;
    let [grpc_tls, http_tls] = ports.tls()?;
    let cluster = Cluster::new(config)?;
    let listener = bind(ports.grpc).await?;
    // Proclaimed in the election: standbys forward their clients' calls to it.
    let address = match member.advertise.clone() {
        Some(a) => a,
        None if ports.grpc.ip().is_unspecified() => return Err(RunError::NoAdvertise(ports.grpc)),
        None => listener.local_addr()?.to_string(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // The HTTP port first: its line comes before the one that says the coordinator is up.
    let web = spawn_http(&cluster, &ports, http_tls, Vec::new(), stop_rx.clone()).await?;
    eprintln!(
        "switchyard: listening on {address} (gRPC), serving {} in cluster {:?} (etcd {})",
        cluster.model_name(),
        member.cluster,
        member.url
    );
    let m = EtcdMembership {
        etcd,
        keys,
        address,
        ttl: member.lease_ttl(),
    };
    let leader = tokio::spawn(membership::run_etcd(cluster.clone(), m, stop_rx));
    let front = (grpc_tls, ports.keys);
    serve_until_drained(cluster, listener, front, grace, stop_tx, web).await?;
    let _ = leader.await;
    Ok(())
}

/// Binds the HTTP port and serves it (over TLS with `tls`) until `stop` says the drain is
/// over. While the coordinator drains, the port stays open: new requests are answered 503
/// (and `/ready` says not ready), so a client that raced the signal is told to go elsewhere
/// instead of having its connection reset by a closing socket.
async fn spawn_http(
    cluster: &Arc<Cluster>,
    ports: &Ports,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    local_workers: Vec<Arc<Registry>>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, RunError> {
    let web = bind(ports.http).await?;
    let router = http::router(cluster.clone(), local_workers, ports.keys.clone());
    let over_tls = if tls.is_some() { "TLS; " } else { "" };
    eprintln!(
        "switchyard: HTTP on {} ({over_tls}OpenAI API at /v1, dashboard at /, metrics at /metrics)",
        web.local_addr()?
    );
    Ok(tokio::spawn(metrics::serve_http(
        Incoming::new(web, tls, metrics::MAX_CONNECTIONS)?,
        router,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    )))
}

/// What the client gRPC API serves behind: its TLS, and the keys it accepts.
type Front = (
    Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    Arc<ApiKeys>,
);

/// Serves the client API until a signal, drains, tells `stop` and stops the gRPC server and
/// the HTTP port (`web`).
async fn serve_until_drained(
    cluster: Arc<Cluster>,
    listener: TcpListener,
    (tls, keys): Front,
    grace: Duration,
    stop: watch::Sender<bool>,
    web: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<(), RunError> {
    let (server_tx, server_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(cluster.clone(), listener, tls, keys, async {
        let _ = server_rx.await;
    }));
    shutdown_signal().await;
    drain(&cluster, grace).await;
    let _ = stop.send(true);
    let _ = server_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(r) => r??,
        Err(_) => eprintln!("switchyard: the gRPC server did not stop within 5 s"),
    }
    if tokio::time::timeout(Duration::from_secs(5), web)
        .await
        .is_err()
    {
        eprintln!("switchyard: the HTTP port did not stop within 5 s");
    }
    eprintln!("switchyard: stopped");
    Ok(())
}

/// Stops taking requests, lets those in flight finish within `grace`, ends the rest.
async fn drain(cluster: &Cluster, grace: Duration) {
    eprintln!("switchyard: draining (up to {grace:?})");
    cluster.stop_admitting();
    let deadline = tokio::time::Instant::now() + grace;
    while !cluster.is_idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .fail_all("the coordinator shut down before the request finished (drain grace period over)")
        .await;
}
