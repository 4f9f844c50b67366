//! gRPC channels between Switchyard's processes: one endpoint builder (connect timeout, no
//! Nagle delay), channels of the cluster plane (mutual TLS when the process has a cluster
//! identity, [`crate::tls`]), the message limit every client and server of the cluster uses,
//! the servers' bounds (connections, keep-alive, header size), and the reading of a client's
//! `grpc-timeout` header.

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::worker_client::WorkerClient;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tonic::transport::{Channel, Endpoint, Server};

use crate::tls::Incoming;

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

/// Connections one gRPC port keeps open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;

/// A peer that has not answered a ping for this long is gone: its connection closes, and with
/// it the calls it made.
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// The most header bytes (metadata) one call may send.
pub const MAX_HEADER_BYTES: u32 = 64 << 10;

/// A gRPC server with the cluster's bounds: pings to find dead peers, a header size limit, no
/// Nagle delay. Serve it on [`incoming`].
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .http2_max_header_list_size(MAX_HEADER_BYTES)
}

/// The connections `listener` accepts for a gRPC server, over TLS with `tls`, at most
/// [`MAX_CONNECTIONS`] open at once.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
) -> std::io::Result<Incoming> {
    Incoming::new(listener, tls, MAX_CONNECTIONS)
}

/// A `grpc-timeout` header that is not one: what it was and what the protocol expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "grpc-timeout {0:?} is not a gRPC timeout: expected 1 to 8 digits and a unit (H, M, S, m, u \
     or n), e.g. 30S"
)]
pub struct BadTimeout(pub String);

/// The time a `grpc-timeout` header value gives: at most 8 digits, then `H`, `M`, `S`, `m`,
/// `u` or `n` (hours to nanoseconds), as the gRPC protocol defines it. Anything else, including
/// a number too long to be a timeout, is refused rather than read as something else.
pub fn grpc_timeout(value: &str) -> Result<Duration, BadTimeout> {
    let bad = || BadTimeout(value.chars().take(32).collect());
    let digits = value
        .get(..value.len().saturating_sub(1))
        .filter(|d| (1..=8).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(bad)?;
    // At most 99,999,999: no product below overflows.
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match &value[digits.len()..] {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_read_as_the_protocol_says_and_nothing_else() {
        assert_eq!(grpc_timeout("500m"), Ok(Duration::from_millis(500)));
        assert_eq!(grpc_timeout("10S"), Ok(Duration::from_secs(10)));
        assert_eq!(
            grpc_timeout("99999999H"),
            Ok(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "18446744073709551615S",
            "123456789S",
            "",
            "S",
            "10",
            "10s",
            "-1S",
            "+1S",
            "1.5S",
            "1é",
            "é",
        ] {
            assert!(grpc_timeout(bad).is_err(), "{bad:?} accepted");
        }
    }
}
