//! Message sizes sized to the part held, enforced from each gRPC message's length prefix:
//! a message over its limit is refused when its 5-byte header arrives, before any of its body
//! is buffered. Steps and exchanges may be as large as the part's largest step
//! ([`crate::checks::PartLimits::max_message_bytes`], small while no part is held); every other
//! `Worker` call takes [`CONTROL_MESSAGE_BYTES`].
//!
//! tonic's own `max_decoding_message_size` also checks the prefix before buffering, but it is
//! fixed when the server is built, before the model is known; it stays as the ceiling.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::checks::CONTROL_MESSAGE_BYTES;

/// The calls whose messages carry a step's tokens or activations.
const DATA_CALLS: [&str; 2] = [
    "/switchyard.v1.Worker/Step",
    "/switchyard.v1.Worker/RunExperts",
];

/// A gRPC service whose requests' messages are held to a size limit.
#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
    /// The current limit of the data calls.
    data: Arc<AtomicUsize>,
}

impl<S> MessageLimit<S> {
    pub fn new(inner: S, data: Arc<AtomicUsize>) -> Self {
        MessageLimit { inner, data }
    }
}

impl<S: NamedService> NamedService for MessageLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for MessageLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let limit = match DATA_CALLS.contains(&request.uri().path()) {
            true => self.data.load(Ordering::SeqCst),
            false => CONTROL_MESSAGE_BYTES,
        };
        self.inner
            .call(request.map(|body| Body::new(Prefixed::new(body, limit))))
    }
}

/// A request body read through, watching each message's length prefix.
struct Prefixed {
    inner: Body,
    limit: usize,
    /// The prefix being read (compression flag, then the length, big-endian) and how much of
    /// it has arrived.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    rest: usize,
}

impl Prefixed {
    fn new(inner: Body, limit: usize) -> Self {
        Prefixed {
            inner,
            limit,
            prefix: [0; 5],
            have: 0,
            rest: 0,
        }
    }

    /// Follows the message framing through `data`; an error as soon as a prefix announces a
    /// message over the limit.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(data.len());
                self.rest -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > self.limit {
                    return Err(Status::resource_exhausted(format!(
                        "a message of {len} bytes; this worker takes at most {} bytes for this \
                         call with the part it holds",
                        self.limit
                    )));
                }
                self.rest = len;
            }
        }
        Ok(())
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            self.scan(data)?;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend(len.to_be_bytes());
        m
    }

    #[test]
    fn a_prefix_over_the_limit_is_refused_even_split_across_frames() {
        let mut p = Prefixed::new(Body::empty(), 100);
        let mut two = framed(3);
        two.extend([1, 2, 3]);
        two.extend(framed(100));
        p.scan(&two).unwrap();
        p.scan(&[0; 100]).unwrap();
        let big = framed(101);
        p.scan(&big[..2]).unwrap();
        let e = p.scan(&big[2..]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("a message of 101 bytes"), "{e}");
    }
}
