//! Sending one streamed request to a target and timing it: the gRPC `Inference` API or the
//! OpenAI-compatible HTTP API (SSE). A failure is an [`Outcome`] with the status it failed
//! with, never an error of the bench: a loaded server refusing work is a figure to report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use switchyard_net::api_client::{
    error_chain, AccessError, ApiAccess, ApiInferenceClient, HttpConnector,
};
use switchyard_proto::code_name;
use switchyard_proto::v1 as pb;

use crate::config::{Api, Target};
use crate::BenchError;

/// One request of a run: the prompt text, its exact length in tokens as the server counts it,
/// and how many tokens to generate.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub input_tokens: usize,
    pub output_tokens: usize,
}

/// What happened to one request, timed from just before it was sent.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Time to the first message carrying generated text or tokens.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive messages carrying tokens, after the first.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    /// Generated tokens as the bench counted them: gRPC streams token ids; HTTP streams text,
    /// so there the server's usage (asked for with `include_usage`) or the number of text
    /// chunks is all there is.
    pub output_tokens: usize,
    /// The server's own usage figures: (prompt, completion).
    pub usage: Option<(usize, usize)>,
    /// The status it failed with (`RESOURCE_EXHAUSTED`, `HTTP 429`, `timeout`, …) and the
    /// server's message.
    pub error: Option<(String, String)>,
}

/// A connected target.
#[derive(Clone)]
pub enum Client {
    Grpc(ApiInferenceClient),
    Http(HttpClient),
}

#[derive(Clone)]
pub struct HttpClient {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    base: String,
    model: String,
    /// `Bearer KEY`, when an API key is set.
    authorization: Option<String>,
}

/// How long connecting and the first probe may take before the target counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// Connects and asks the target for its models, so an unreachable or wrong target is an
    /// error at once. Returns the client and the served model's name.
    pub async fn connect(
        target: &Target,
        access: &ApiAccess,
        model_name: Option<&str>,
    ) -> Result<(Client, String), BenchError> {
        let unreachable = |reason: String| BenchError::Unreachable {
            target: target.to_string(),
            reason,
        };
        let probe = async {
            match target {
                Target::Grpc(uri) => {
                    let mut client = match access.connect_inference(uri).await {
                        Ok(c) => c,
                        Err(AccessError::Connect { reason, .. }) => return Err(reason),
                        Err(e) => return Err(e.to_string()),
                    };
                    let models = client
                        .list_models(pb::ListModelsRequest {})
                        .await
                        .map_err(|s| {
                            format!("ListModels: {}: {}", code_name(s.code()), s.message())
                        })?
                        .into_inner();
                    let name = match (model_name, models.models.first()) {
                        (Some(n), _) => n.to_string(),
                        (None, Some(m)) => m.id.clone(),
                        (None, None) => return Err("the server lists no model".to_string()),
                    };
                    Ok((Client::Grpc(client), name))
                }
                Target::Http(base) => {
                    let connector = access.http_connector(base).map_err(|e| e.to_string())?;
                    let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                        .build(connector);
                    let mut http = HttpClient {
                        inner,
                        base: base.clone(),
                        model: String::new(),
                        authorization: access.authorization(),
                    };
                    let body = http.get("models").await?;
                    http.model = match (model_name, body["data"][0]["id"].as_str()) {
                        (Some(n), _) => n.to_string(),
                        (None, Some(id)) => id.to_string(),
                        (None, None) => {
                            return Err(format!(
                            "GET {base}/models: expected {{\"data\": [{{\"id\": …}}]}}, got {body}"
                        ))
                        }
                    };
                    let name = http.model.clone();
                    Ok((Client::Http(http), name))
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(result) => result.map_err(unreachable),
            Err(_) => Err(unreachable(format!(
                "no answer within {} s (is it a Switchyard server?)",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Sends `prompt` and times its stream; `tokens` counts generated tokens as they arrive
    /// (for the live progress line).
    pub async fn send(
        &self,
        api: Api,
        prompt: &Prompt,
        timeout: Duration,
        tokens: &AtomicU64,
    ) -> Outcome {
        let start = Instant::now();
        let mut out = Outcome::default();
        let result = match self {
            Client::Grpc(c) => {
                tokio::time::timeout(
                    timeout,
                    grpc_send(c.clone(), api, prompt, start, tokens, &mut out),
                )
                .await
            }
            Client::Http(c) => {
                tokio::time::timeout(timeout, c.send(api, prompt, start, tokens, &mut out)).await
            }
        };
        out.e2e = start.elapsed();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => out.error = Some(e),
            Err(_) => {
                out.error = Some((
                    "timeout".into(),
                    format!("no end of stream within {} s", timeout.as_secs_f64()),
                ))
            }
        }
        out
    }
}

/// Records one message carrying `n` tokens at `now`.
fn arrived(out: &mut Outcome, start: Instant, last: &mut Option<Instant>, n: usize) {
    let now = Instant::now();
    match last {
        None => out.ttft = Some(now - start),
        Some(prev) => out.itl.push(now - *prev),
    }
    *last = Some(now);
    out.output_tokens += n;
}

async fn grpc_send(
    mut client: ApiInferenceClient,
    api: Api,
    prompt: &Prompt,
    start: Instant,
    tokens: &AtomicU64,
    out: &mut Outcome,
) -> Result<(), (String, String)> {
    let status = |s: tonic::Status| (code_name(s.code()), s.message().to_string());
    let (text, messages) = match api {
        Api::Completions => (Some(prompt.text.clone()), Vec::new()),
        Api::Chat => (
            None,
            vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.text.clone(),
            }],
        ),
    };
    let request = pb::GenerateRequest {
        prompt: text,
        messages,
        max_tokens: Some(prompt.output_tokens as u32),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.map_err(status)?.into_inner();
    let mut last = None;
    let mut finished = false;
    while let Some(m) = stream.message().await.map_err(status)? {
        if !m.token_ids.is_empty() {
            arrived(out, start, &mut last, m.token_ids.len());
            tokens.fetch_add(m.token_ids.len() as u64, Ordering::Relaxed);
        }
        if !m.finish_reason.is_empty() {
            finished = true;
            let u = m.usage.unwrap_or_default();
            out.usage = Some((u.prompt_tokens as usize, u.completion_tokens as usize));
        }
    }
    match finished {
        true => Ok(()),
        false => Err((
            "incomplete".into(),
            "the stream ended without a finish reason".into(),
        )),
    }
}

impl HttpClient {
    fn url(&self, endpoint: &str) -> String {
        format!("{}/{endpoint}", self.base)
    }

    fn authorize(&self, request: hyper::http::request::Builder) -> hyper::http::request::Builder {
        match &self.authorization {
            Some(v) => request.header(hyper::header::AUTHORIZATION, v),
            None => request,
        }
    }

    /// `GET {base}/{endpoint}` as JSON; errors are reasons for [`BenchError::Unreachable`].
    async fn get(&self, endpoint: &str) -> Result<Value, String> {
        let url = self.url(endpoint);
        let request = self
            .authorize(hyper::Request::get(&url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self
            .inner
            .request(request)
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "GET {url}: HTTP {status}: {}",
                error_message(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
    }

    async fn send(
        &self,
        api: Api,
        prompt: &Prompt,
        start: Instant,
        tokens: &AtomicU64,
        out: &mut Outcome,
    ) -> Result<(), (String, String)> {
        let (endpoint, mut body) = match api {
            Api::Completions => ("completions", json!({"prompt": prompt.text})),
            Api::Chat => (
                "chat/completions",
                json!({"messages": [{"role": "user", "content": prompt.text}]}),
            ),
        };
        body["model"] = json!(self.model);
        body["max_tokens"] = json!(prompt.output_tokens);
        body["temperature"] = json!(0.0);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["ignore_eos"] = json!(true);
        let transport = |e: String| ("connection".to_string(), e);
        let request = self
            .authorize(hyper::Request::post(self.url(endpoint)))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| transport(e.to_string()))?;
        let response = self
            .inner
            .request(request)
            .await
            .map_err(|e| transport(error_chain(&e)))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err((format!("HTTP {}", status.as_u16()), error_message(&bytes)));
        }
        let mut lines = SseLines::default();
        let mut last = None;
        let mut chunks = 0;
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| transport(e.to_string()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for event in lines.push(data) {
                if event == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&event).map_err(|e| {
                    (
                        "bad response".to_string(),
                        format!("SSE data is not JSON ({e}): {event}"),
                    )
                })?;
                if let Some(e) = v.get("error") {
                    return Err((
                        "stream error".into(),
                        e["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
                let choice = &v["choices"][0];
                let text = choice["text"]
                    .as_str()
                    .or_else(|| choice["delta"]["content"].as_str())
                    .unwrap_or_default();
                if !text.is_empty() {
                    chunks += 1;
                    arrived(out, start, &mut last, 0);
                    tokens.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    let n = |k: &str| u[k].as_u64().unwrap_or_default() as usize;
                    out.usage = Some((n("prompt_tokens"), n("completion_tokens")));
                }
            }
        }
        out.output_tokens = out.usage.map_or(chunks, |(_, completion)| completion);
        match done {
            true => Ok(()),
            false => Err((
                "incomplete".into(),
                "the stream ended before data: [DONE]".into(),
            )),
        }
    }
}

/// The `data:` payloads of a server-sent event stream, from chunks cut anywhere.
#[derive(Default)]
pub struct SseLines {
    buf: Vec<u8>,
}

impl SseLines {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                events.push(data.trim_start().to_string());
            }
        }
        events
    }
}

/// The message of an OpenAI-style error body `{"error": {"message": …}}`, or the body itself.
fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_chunking() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\r\n\r\n: keep-alive\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut sse = SseLines::default();
            let mut events = sse.push(&stream[..cut]);
            events.extend(sse.push(&stream[cut..]));
            assert_eq!(events.len(), 3, "cut at {cut}: {events:?}");
            assert_eq!(events[2], "[DONE]");
            assert!(events[1].contains("\"usage\""));
        }
    }

    #[test]
    fn error_bodies() {
        let body = br#"{"error": {"message": "queue full", "type": "overloaded", "code": 429}}"#;
        assert_eq!(error_message(body), "queue full");
        assert_eq!(error_message(b"plain failure"), "plain failure");
    }
}
