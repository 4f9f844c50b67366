//! gRPC channels between Switchyard's processes: one endpoint builder (connect timeout, no
//! Nagle delay) and the message limit every client and server of the cluster uses.

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

/// A channel to a worker or coordinator at `addr`, connected on first use.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr)?.connect_lazy())
}

pub fn worker_client(channel: Channel) -> WorkerClient<Channel> {
    WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
