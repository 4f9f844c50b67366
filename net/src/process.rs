//! What every serving process does at its edges: bind a listening port (saying which one
//! failed) and wait for Ctrl-C or SIGTERM, the signal to drain.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::etcd::{Etcd, EtcdAccess, EtcdError};
use crate::keys::{BadClusterName, Keys};

/// A port that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// How a process joins a cluster kept in etcd.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    /// The endpoint, e.g. `http://127.0.0.1:2379`.
    pub url: String,
    /// The cluster's name: its keys live under `/switchyard/NAME/`.
    pub cluster: String,
    /// How long a dead process stays registered (or leader); [`EtcdMember::lease_ttl`] raises
    /// it to at least 1 s.
    pub lease_ttl: std::time::Duration,
    /// The address others reach this process at, when not the one it listens on.
    pub advertise: Option<String>,
    /// TLS and authentication, where etcd wants them.
    pub access: EtcdAccess,
}

/// Why a process could not join its cluster in etcd.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    ClusterName(#[from] BadClusterName),
}

impl EtcdMember {
    /// A client of the etcd endpoint and the cluster's keys.
    pub fn connect(&self) -> Result<(Etcd, Keys), JoinError> {
        Ok((
            Etcd::connect_with(&self.url, &self.access)?,
            Keys::new(&self.cluster)?,
        ))
    }

    /// The lease's time to live: etcd grants whole seconds, at least one.
    pub fn lease_ttl(&self) -> std::time::Duration {
        self.lease_ttl.max(std::time::Duration::from_secs(1))
    }
}
