//! The expert exchange over gRPC: at a MoE layer, the tokens routed to experts held by other
//! workers of the same stage are sent to them (`Worker.RunExperts`, one call per peer, all in
//! parallel), and their weighted outputs come back while the local experts run. The
//! activations travel through the host: this exchange copies them off the backend's device and
//! the outputs back onto it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;
use tracing::{info_span, Instrument};

use crate::backend::{Backend, Routes};
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertExchange, ModelError, PendingExperts};
use switchyard_net::{trace_context, wire};

/// Why a gRPC exchange failed; what [`ModelError::Exchange`] holds for it.
#[derive(Debug, thiserror::Error)]
pub enum GrpcExchangeError {
    #[error("expert {0} has no shard in the placement")]
    NoShard(u32),
    /// The task calling the peer failed (panicked or was cancelled).
    #[error("shard {shard}: {source}")]
    Task {
        shard: usize,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The peer answered with an error status (or none within the timeout).
    #[error("shard {shard}: {}", .status.message())]
    Peer {
        shard: usize,
        #[source]
        status: tonic::Status,
    },
    #[error("shard {shard}: reply without outputs")]
    NoOutputs { shard: usize },
    #[error("shard {shard}: {source}")]
    Malformed {
        shard: usize,
        #[source]
        source: wire::Malformed,
    },
    #[error("shard {shard}: {rows}×{cols} outputs for {tokens}×{want_cols} inputs")]
    Shape {
        shard: usize,
        rows: usize,
        cols: usize,
        tokens: usize,
        want_cols: usize,
    },
}

impl From<GrpcExchangeError> for ModelError {
    fn from(e: GrpcExchangeError) -> Self {
        ModelError::Exchange(Box::new(e))
    }
}

pub struct GrpcExchange {
    pub handle: tokio::runtime::Handle,
    pub epoch: u64,
    pub shard: usize,
    /// The workers of this stage, by shard.
    pub peers: Vec<WorkerClient<Channel>>,
    /// The shard holding each expert.
    pub expert_shard: Vec<u32>,
    pub metrics: Arc<WorkerMetrics>,
    /// How long a peer may take to answer.
    pub timeout: std::time::Duration,
}

impl<B: Backend> ExpertExchange<B> for GrpcExchange {
    fn dispatch(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
    ) -> Result<PendingExperts<B>, ModelError> {
        let k = routes.top_k;
        let (rows, cols) = (backend.rows(x), backend.cols(x));
        let x = backend.to_host(x)?;
        // For every other shard, the tokens with at least one of their experts there.
        let mut wanted: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for t in 0..rows {
            for &e in &routes.experts[t * k..(t + 1) * k] {
                let shard = *self
                    .expert_shard
                    .get(e as usize)
                    .ok_or(GrpcExchangeError::NoShard(e))? as usize;
                let tokens = wanted.entry(shard).or_default();
                if shard != self.shard && tokens.last() != Some(&t) {
                    tokens.push(t);
                }
            }
        }
        wanted.remove(&self.shard);
        let started = Instant::now();
        let mut calls = Vec::new();
        for (shard, tokens) in wanted {
            let mut xs = Vec::with_capacity(tokens.len() * cols);
            let mut experts = Vec::with_capacity(tokens.len() * k);
            let mut weights = Vec::with_capacity(tokens.len() * k);
            for &t in &tokens {
                xs.extend_from_slice(&x[t * cols..(t + 1) * cols]);
                experts.extend_from_slice(&routes.experts[t * k..(t + 1) * k]);
                weights.extend_from_slice(&routes.weights[t * k..(t + 1) * k]);
            }
            let request = pb::ExpertBatch {
                epoch: self.epoch,
                layer: layer as u32,
                x: Some(wire::tensor(&xs, tokens.len(), cols)),
                top_k: k as u32,
                experts,
                weights,
            };
            let m = &self.metrics;
            m.exchange_bytes_sent.add(request.encoded_len() as u64);
            m.exchange_token_shard_pairs.add(tokens.len() as u64);
            let mut client = self.peers[shard].clone();
            let timeout = self.timeout;
            let span = info_span!("exchange", layer, shard, tokens = tokens.len());
            let request = trace_context::request(&span, request);
            let call = self.handle.spawn(
                async move {
                    // A peer that froze must not hold this step forever.
                    match tokio::time::timeout(timeout, client.run_experts(request)).await {
                        Ok(r) => r,
                        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                            "no answer within {timeout:?}"
                        ))),
                    }
                }
                .instrument(span),
            );
            calls.push((shard, tokens, call));
        }
        let handle = self.handle.clone();
        let metrics = self.metrics.clone();
        Ok(PendingExperts::new(move |backend: &B| {
            let mut out = vec![0.0f32; rows * cols];
            for (shard, tokens, call) in calls {
                let reply = handle
                    .block_on(call)
                    .map_err(|source| GrpcExchangeError::Task { shard, source })?
                    .map_err(|status| GrpcExchangeError::Peer { shard, status })?
                    .into_inner();
                metrics
                    .exchange_bytes_received
                    .add(reply.encoded_len() as u64);
                let y = reply.y.ok_or(GrpcExchangeError::NoOutputs { shard })?;
                let (y, r, c) = wire::from_tensor(&y)
                    .map_err(|source| GrpcExchangeError::Malformed { shard, source })?;
                if r != tokens.len() || c != cols {
                    return Err(GrpcExchangeError::Shape {
                        shard,
                        rows: r,
                        cols: c,
                        tokens: tokens.len(),
                        want_cols: cols,
                    }
                    .into());
                }
                for (i, &t) in tokens.iter().enumerate() {
                    let row = &mut out[t * cols..(t + 1) * cols];
                    row.iter_mut()
                        .zip(&y[i * cols..(i + 1) * cols])
                        .for_each(|(o, v)| *o += v);
                }
            }
            metrics
                .exchange_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(backend.tensor(out, rows, cols)?)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn a_peer_error_reads_as_before_and_keeps_its_status_as_the_source() {
        let e: ModelError = GrpcExchangeError::Peer {
            shard: 1,
            status: tonic::Status::unavailable("connection refused"),
        }
        .into();
        assert_eq!(
            e.to_string(),
            "expert exchange: shard 1: connection refused"
        );
        let status = e
            .source()
            .and_then(|s| s.source())
            .and_then(|s| s.downcast_ref::<tonic::Status>())
            .expect("the status is in the chain");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
