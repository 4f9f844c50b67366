//! A small client of the `Inference` API: what `switchyard generate --server` uses. It gathers
//! a streamed generation into the same [`Completion`] the offline path prints.

use switchyard_net::api_client::{AccessError, ApiAccess};
use switchyard_net::grpc::MAX_MESSAGE_BYTES;
use switchyard_net::wire;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_scheduler::Completion;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Access(#[from] AccessError),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the stream ended without a finish reason")]
    Unfinished,
}

/// A client of the `Inference` API on `channel`, taking replies as large as the API sends
/// (prompt logprobs of a long prompt exceed tonic's 4 MiB default).
pub(crate) fn inference_client(channel: Channel) -> InferenceClient<Channel> {
    InferenceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The cluster's grid, workers, placement epoch and lanes.
pub async fn status(
    address: &str,
    access: &ApiAccess,
) -> Result<pb::ClusterStatusResponse, ClientError> {
    Ok(access
        .inference(address)?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Sends `request` to the server at `address`, calling `on_message` with every streamed
/// message, and returns the whole completion.
pub async fn generate(
    address: &str,
    access: &ApiAccess,
    request: pb::GenerateRequest,
    mut on_message: impl FnMut(&pb::GenerateResponse),
) -> Result<Completion, ClientError> {
    let mut client = access.inference(address)?;
    let wants_logprobs = request.logprobs.is_some();
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = Completion::new(0, wants_logprobs);
    let mut finished = false;
    while let Some(m) = stream.message().await? {
        on_message(&m);
        let u = wire::update(m);
        finished |= u.finish.is_some();
        out.extend(u);
    }
    match finished {
        true => Ok(out),
        false => Err(ClientError::Unfinished),
    }
}
