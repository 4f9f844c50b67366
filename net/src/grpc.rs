//! gRPC channels between Switchyard's processes: one endpoint builder (connect timeout, no
//! Nagle delay), channels of the cluster plane (mutual TLS when the process has a cluster
//! identity, [`crate::tls`]) and the message limit every client and server of the cluster uses.

use std::time::Duration;

use switchyard_proto::v1::worker_client::WorkerClient;
use tonic::transport::{Channel, Endpoint};

/// Messages between workers carry activations of whole prefill chunks: far above tonic's
/// 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// An endpoint at `addr` (`host:port` or a URL): 5 s to connect, no Nagle delay.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

/// A channel of the cluster plane to a worker or coordinator at `addr`, connected on first
/// use: mutual TLS with the cluster identity installed ([`crate::tls::install_cluster`]), if
/// any, else plain.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(cluster_lazy(endpoint(addr)?))
}

/// A channel of the cluster plane to `endpoint`, connected on first use: mutual TLS with the
/// cluster identity installed, if any, else plain.
pub fn cluster_lazy(endpoint: Endpoint) -> Channel {
    match crate::tls::cluster() {
        Some(tls) => endpoint.connect_with_connector_lazy(crate::tls::Connector(tls.client)),
        None => endpoint.connect_lazy(),
    }
}

pub fn worker_client(channel: Channel) -> WorkerClient<Channel> {
    WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
