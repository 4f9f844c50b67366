//! A worker process from start to exit: serve the `Worker` gRPC API (and Prometheus metrics
//! when asked), register in etcd when given one, and on Ctrl-C or SIGTERM drain (with etcd:
//! wait to be released from the placement, within the grace period) and stop.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_metrics as metrics;
use switchyard_net::process::{bind, shutdown_signal, BindError, EtcdMember, JoinError};
use switchyard_net::tls::{self, Incoming};
use switchyard_proto::v1 as pb;

use crate::backend::{Backend, Hardware};
use crate::registration::{self, RegistrationConfig};
use crate::service::{spawn_worker, WorkerService};

/// Where a worker listens and how it joins its cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `Worker` gRPC API.
    pub listen: SocketAddr,
    /// Serve Prometheus metrics here (`/metrics`).
    pub metrics_addr: Option<SocketAddr>,
    /// Register in etcd; without it a coordinator is given this worker's address.
    pub etcd: Option<EtcdMember>,
    /// With etcd: how long a draining worker waits to be released.
    pub drain_grace: Duration,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(
        "--listen {0} listens on every interface: give --advertise HOST:PORT, the address \
         coordinators and other workers reach this worker at (it is what the worker \
         registers in etcd)"
    )]
    NoAdvertise(SocketAddr),
}

/// Serves `service` until Ctrl-C or SIGTERM, then drains and stops.
pub async fn run<H: Hardware>(service: WorkerService<H>, o: Options) -> Result<(), RunError>
where
    <H::Backend as Backend>::KvCache: Sync,
{
    if let Some(member) = &o.etcd {
        if member.advertise.is_none() && o.listen.ip().is_unspecified() {
            return Err(RunError::NoAdvertise(o.listen));
        }
    }
    let control = service.control();
    let (device, (memory_bytes, _)) = (service.hardware().describe(), service.hardware().memory());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let w = spawn_worker(service, o.listen, async {
        let _ = stop_rx.await;
    })
    .await
    .map_err(|source| BindError {
        addr: o.listen,
        source,
    })?;
    let (addr, task) = (w.address, w.task);
    if let Some(metrics_addr) = o.metrics_addr {
        let listener = bind(metrics_addr).await?;
        // With a cluster identity the metrics port is part of the cluster plane: mutual TLS,
        // so a scraper needs a certificate the cluster CA signed.
        let tls = tls::cluster().map(|c| c.http);
        eprintln!(
            "switchyard: worker metrics on {} (/metrics{})",
            listener.local_addr()?,
            if tls.is_some() { ", mutual TLS" } else { "" }
        );
        let m = w.metrics.clone();
        let router = metrics::router(move || m.registry.render());
        let incoming = Incoming::new(listener, tls, metrics::MAX_CONNECTIONS)?;
        tokio::spawn(metrics::serve_http(incoming, router, shutdown_signal()));
    }
    eprintln!("switchyard: worker listening on {addr}");
    match o.etcd {
        Some(member) => {
            let (etcd, keys) = member.connect()?;
            let address = member.advertise.clone().unwrap_or(addr.to_string());
            let config = RegistrationConfig {
                keys,
                record: pb::WorkerRecord {
                    address,
                    device,
                    memory_bytes,
                    draining: false,
                },
                ttl: member.lease_ttl(),
                grace: o.drain_grace,
            };
            registration::run(etcd, config, control, shutdown_signal()).await;
        }
        None => shutdown_signal().await,
    }
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .is_err()
    {
        eprintln!("switchyard: the worker's gRPC server did not stop within 5 s");
    }
    eprintln!("switchyard: worker stopped");
    Ok(())
}
