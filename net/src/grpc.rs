//! gRPC channels between Switchyard's processes: one endpoint builder (connect timeout, no
//! Nagle delay), the message limit every client and server of the cluster uses, the servers'
//! bounds (connections, keep-alive, header size), and the reading of a client's
//! `grpc-timeout` header.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use switchyard_proto::v1::worker_client::WorkerClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Server};
use tracing::debug;

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

/// The connections `listener` accepts, at most [`MAX_CONNECTIONS`] open at once, without
/// Nagle delay (replies must not wait: an exchange is many small round trips).
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Bounded>> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    TcpListenerStream::new(listener).filter_map(move |accepted| {
        let stream = accepted.ok()?;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("{MAX_CONNECTIONS} gRPC connections open; closed a new one");
            return None;
        };
        let _ = stream.set_nodelay(true);
        Some(Ok(Bounded {
            stream,
            _permit: permit,
        }))
    })
}

/// An accepted connection, counted against [`MAX_CONNECTIONS`] until it closes.
pub struct Bounded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Bounded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
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
