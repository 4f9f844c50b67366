//! A small client of the `Inference` API: what `switchyard generate --server` uses. It gathers
//! a streamed generation into the same [`Completion`] the offline path prints.

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_worker::service::{channel, MAX_MESSAGE_BYTES};
use switchyard_worker::{wire, Completion, FinishReason, Usage};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the stream ended without a finish reason")]
    Unfinished,
}

fn connect(address: &str) -> Result<InferenceClient<tonic::transport::Channel>, ClientError> {
    let channel = channel(address).map_err(|e| ClientError::Address {
        address: address.into(),
        reason: e.to_string(),
    })?;
    Ok(InferenceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// The cluster's grid, workers, placement epoch and lanes.
pub async fn status(address: &str) -> Result<pb::ClusterStatusResponse, ClientError> {
    Ok(connect(address)?
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Sends `request` to the server at `address`, calling `on_message` with every streamed
/// message, and returns the whole completion.
pub async fn generate(
    address: &str,
    request: pb::GenerateRequest,
    mut on_message: impl FnMut(&pb::GenerateResponse),
) -> Result<Completion, ClientError> {
    let mut client = connect(address)?;
    let wants_logprobs = request.logprobs.is_some();
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = Completion {
        id: 0,
        token_ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        logprobs: wants_logprobs.then(Vec::new),
        prompt_logprobs: None,
        usage: Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
    };
    let mut finished = false;
    while let Some(m) = stream.message().await? {
        on_message(&m);
        out.token_ids.extend(&m.token_ids);
        out.text.push_str(&m.text);
        if let Some(l) = &mut out.logprobs {
            l.extend(m.logprobs.iter().map(wire::from_token_logprob));
        }
        if !m.prompt_logprobs.is_empty() {
            out.prompt_logprobs = Some(
                m.prompt_logprobs
                    .iter()
                    .map(|p| p.logprob.as_ref().map(wire::from_token_logprob))
                    .collect(),
            );
        }
        if !m.finish_reason.is_empty() {
            finished = true;
            out.finish_reason = match m.finish_reason.as_str() {
                "stop" => FinishReason::Stop,
                _ => FinishReason::Length,
            };
            let usage = m.usage.unwrap_or_default();
            out.usage = Usage {
                prompt_tokens: usage.prompt_tokens as usize,
                completion_tokens: usage.completion_tokens as usize,
            };
        }
    }
    match finished {
        true => Ok(out),
        false => Err(ClientError::Unfinished),
    }
}
