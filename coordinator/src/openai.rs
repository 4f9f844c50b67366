//! The OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
//! with SSE streaming. Each choice becomes one `switchyard.v1.GenerateRequest` started through
//! [`InferenceApi::admission`], the path gRPC clients take too, so both APIs share checks, queue,
//! scheduling and metrics; on a standby coordinator both go on to the leader
//! ([`crate::forward::ToLeader`]). Field names and shapes follow OpenAI's API and vLLM's extensions
//! (`top_k`, `ignore_eos`, `repetition_penalty`, `min_tokens`, `stop_token_ids`, `bad_words`),
//! what lm-eval-harness and the `openai` package send and read. The sampling fields' ranges are
//! checked once, by the scheduler's validation, for both APIs.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_proto::v1 as pb;
use switchyard_scheduler::sampling::TokenLogprob;
use switchyard_scheduler::Update;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt, StreamMap};
use tonic::{Code, Status};
use tracing::{info_span, Instrument};

use crate::admission::{header_request_id, prompt_ids, refusal};
use crate::api::InferenceApi;
use crate::lane::Outcome;

/// vLLM's limit on alternatives per token.
/// OpenAI's `logprobs`/`top_logprobs` limit: the scheduler's, as this API's integer type.
const MAX_LOGPROBS: u32 = switchyard_scheduler::validate::MAX_LOGPROBS as u32;
const MAX_N: u32 = 16;
/// Choices one request may start (prompts × `n`): each is a request in the queue (as many as
/// the queue holds by default).
const MAX_CHOICES: usize = 1024;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// A key over its rate limit ([`crate::auth`]).
    pub fn rate_limited(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
        }
    }

    /// A call without a valid API key ([`crate::auth`]).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            // OpenAI's type for a missing or wrong key, too.
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            _ => "internal_error",
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": null,
            "code": self.status.as_u16(),
        }})
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: s.message().to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
    Texts(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What completions and chat share: sampling, stopping, streaming, and the OpenAI fields we
/// refuse rather than silently ignore.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// vLLM's extension; -1 or 0 = off.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Token id (as a string, as JSON keys are) → bias.
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's extensions.
    repetition_penalty: Option<f32>,
    min_tokens: Option<u32>,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    bad_words: Vec<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    best_of: Option<u32>,
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

impl Common {
    fn check(&self, served: &str) -> ApiResult<()> {
        if let Some(model) = self.model.as_deref().filter(|m| *m != served) {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{model}` does not exist; this server serves `{served}`"
                ),
            });
        }
        match self.n {
            Some(n) if n == 0 || n > MAX_N => Err(ApiError::bad_request(format!(
                "n is {n}; expected 1 to {MAX_N}"
            ))),
            _ => Ok(()),
        }
    }

    /// The gRPC request for one choice (`choice` makes the seeds of `n` choices differ).
    /// `max_tokens: None` means up to the model's context.
    fn request(&self, max_tokens: Option<u32>, choice: u32) -> ApiResult<pb::GenerateRequest> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(format!(
                "temperature is {temperature}; expected 0 to 2"
            )));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            k if k <= 0 => 0,
            k => u32::try_from(k).map_err(|_| {
                ApiError::bad_request(format!(
                    "top_k is {k}; expected -1 or 0 (off) or 1 to {}",
                    u32::MAX
                ))
            })?,
        };
        let mut logit_bias = std::collections::HashMap::new();
        for (token, bias) in self.logit_bias.iter().flatten() {
            let t = token.parse::<u32>().map_err(|_| {
                ApiError::bad_request(format!(
                    "logit_bias key {token:?} is not a token id; expected token ids as strings"
                ))
            })?;
            let b = bias.as_f64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "logit_bias of token {t} is {bias}; expected a number from -100 to 100"
                ))
            })?;
            logit_bias.insert(t, b as f32);
        }
        Ok(pb::GenerateRequest {
            max_tokens,
            temperature,
            top_p: self.top_p,
            top_k,
            seed: self.seed.map(|s| (s as u64).wrapping_add(choice as u64)),
            stop: match &self.stop {
                None => vec![],
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            ignore_eos: self.ignore_eos,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty,
            logit_bias,
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.clone(),
            bad_words: self.bad_words.clone(),
            ..Default::default()
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn models(State(api): State<InferenceApi>) -> Json<Value> {
    let c = api.cluster();
    Json(json!({
        "object": "list",
        "data": [{
            "id": c.model_name(),
            "object": "model",
            "created": 0,
            "owned_by": "switchyard",
            "max_model_len": c.model().max_position_embeddings,
        }],
    }))
}

#[derive(Deserialize)]
struct TokenizeRequest {
    /// Accepted and ignored, as on `/v1/*`: one model per server.
    #[serde(rename = "model")]
    _model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    #[serde(rename = "model")]
    _model: Option<String>,
    tokens: Vec<u32>,
}

/// vLLM's `POST /tokenize`: a prompt (with BOS) or chat messages (through the chat template)
/// as the server would feed them to the model.
pub async fn tokenize(State(api): State<InferenceApi>, body: Bytes) -> Response {
    let result = parse::<TokenizeRequest>(&body).and_then(|r| {
        let messages = r
            .messages
            .map(chat_messages)
            .transpose()?
            .unwrap_or_default();
        Ok(prompt_ids(
            api.cluster(),
            r.prompt.as_deref(),
            &[],
            &messages,
        )?)
    });
    match result {
        Ok(tokens) => Json(json!({
            "count": tokens.len(),
            "max_model_len": api.cluster().model().max_position_embeddings,
            "tokens": tokens,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// vLLM's `POST /detokenize`: token ids back to text.
pub async fn detokenize(State(api): State<InferenceApi>, body: Bytes) -> Response {
    let result = parse::<DetokenizeRequest>(&body).and_then(|r| {
        let vocab = api.cluster().model().vocab_size;
        if let Some(bad) = r.tokens.iter().find(|t| **t as usize >= vocab) {
            return Err(ApiError::bad_request(format!(
                "token {bad} is not in the vocabulary of {vocab} tokens"
            )));
        }
        api.cluster().tokenizer().map_err(refusal)?;
        decode(&api, &r.tokens)
    });
    match result {
        Ok(prompt) => Json(json!({ "prompt": prompt })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One choice under way: its index and the stream of its request's outcomes.
struct Choice {
    index: u32,
    request_id: String,
    prompt: Vec<u32>,
    /// The prompt's text, when it is echoed.
    echo: Option<String>,
}

type Choices = Vec<(Choice, mpsc::Receiver<Outcome>)>;

/// Starts every choice, or none: if one is refused the others are dropped (and so cancelled).
fn start_all(
    api: &InferenceApi,
    requests: Vec<(pb::GenerateRequest, bool)>,
    caller: &HeaderMap,
) -> ApiResult<Choices> {
    let id = header_request_id(caller).map(str::to_string);
    let several = requests.len() > 1;
    let deadline = api
        .cluster()
        .config()
        .request_timeout
        .and_then(|d| Instant::now().checked_add(d));
    let context = api.cluster().model().max_position_embeddings;
    let mut choices = Vec::with_capacity(requests.len());
    for (index, (mut request, echo)) in requests.into_iter().enumerate() {
        let ids = prompt_ids(
            api.cluster(),
            request.prompt.as_deref(),
            &request.prompt_token_ids,
            &request.messages,
        )?;
        // As vLLM: a request that cannot fit is refused; no max_tokens means up to the context.
        match request.max_tokens {
            Some(m) if ids.len() + m as usize > context => {
                return Err(ApiError::bad_request(format!(
                    "this model's maximum context length is {context} tokens; the request asks for {} ({} in the prompt, {m} to generate)",
                    ids.len() + m as usize,
                    ids.len()
                )))
            }
            Some(_) => {}
            None => request.max_tokens = Some(context.saturating_sub(ids.len()).max(1) as u32),
        }
        let echo = match echo {
            false => None,
            true => Some(match request.prompt.take() {
                Some(text) => text,
                None => decode(api, &ids)?,
            }),
        };
        request.prompt = None;
        request.messages.clear();
        request.prompt_token_ids = ids;
        if let Some(id) = &id {
            request.request_id = match several {
                true => format!("{id}-{index}"),
                false => id.clone(),
            };
        }
        // A standby sends it on to the leader.
        let started = api.admission().start(&request, deadline, caller)?;
        let choice = Choice {
            index: index as u32,
            request_id: started.request_id,
            prompt: started.prompt,
            echo,
        };
        choices.push((choice, started.updates));
    }
    Ok(choices)
}

fn decode(api: &InferenceApi, ids: &[u32]) -> ApiResult<String> {
    match api.cluster().tokenizer() {
        Ok(t) => t
            .decode(ids)
            .map_err(|e| ApiError::bad_request(e.to_string())),
        Err(_) => Ok(String::new()),
    }
}

fn token_text(api: &InferenceApi, id: u32) -> String {
    api.cluster()
        .tokenizer()
        .ok()
        .and_then(|t| t.token_text(id).ok())
        .unwrap_or_else(|| format!("<{id}>"))
}

#[derive(Default, Clone, Copy)]
struct Usage {
    prompt: u32,
    completion: u32,
    /// Prompt tokens found in the prefix cache.
    cached: u32,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": { "cached_tokens": self.cached },
        })
    }
}

/// The response's identity, shared by its chunks.
struct Meta {
    id: String,
    object: &'static str,
    model: String,
    created: u64,
    /// Choices started per prompt (`best_of`, else `n`): a prompt's tokens count once per
    /// that many in usage.
    n: u32,
    /// With `best_of` > `n`: the `n` choices of each prompt with the highest cumulative logprob
    /// are returned.
    keep: Option<u32>,
    logprobs: bool,
    stream: bool,
    include_usage: bool,
}

impl Meta {
    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn usage(&self, parts: &[Usage]) -> Usage {
        let mut usage = Usage::default();
        for (i, u) in parts.iter().enumerate() {
            if (i as u32).is_multiple_of(self.n) {
                usage.prompt += u.prompt;
                usage.cached += u.cached;
            }
            usage.completion += u.completion;
        }
        usage
    }
}

/// The two response shapes: `/v1/completions` and `/v1/chat/completions`.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// What one update of a choice adds to the response: text, logprobs, maybe the end.
struct Delta {
    text: String,
    /// Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`; chat: a list.
    logprobs: Option<Value>,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
}

/// Per-choice state: offsets for completion logprobs.
#[derive(Default)]
struct Tracker {
    /// Characters of the choice's text so far.
    offset: usize,
    started: bool,
}

impl Tracker {
    fn delta(&mut self, api: &InferenceApi, c: &Choice, u: &Update, m: &Meta, kind: Kind) -> Delta {
        let mut text = String::new();
        // (token id, its logprob entry) in order: the echoed prompt first, then new tokens.
        let mut entries: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
        if !self.started {
            self.started = true;
            if let Some(echo) = &c.echo {
                text.push_str(echo);
                if let Some(prompt) = &u.prompt_logprobs {
                    entries.extend(c.prompt.iter().zip(prompt).map(|(id, p)| (*id, p.as_ref())));
                }
            }
        }
        text.push_str(&u.text);
        entries.extend(
            u.token_ids
                .iter()
                .zip(&u.logprobs)
                .map(|(id, l)| (*id, Some(l))),
        );
        let logprobs = m.logprobs.then(|| match kind {
            Kind::Completion => self.completion_logprobs(api, &entries),
            Kind::Chat => entries
                .iter()
                .filter_map(|(_, l)| l.map(|l| chat_logprob(api, l)))
                .collect(),
        });
        let (finish_reason, usage) = match &u.finish {
            Some((reason, usage)) => (
                Some(reason.as_str()),
                Some(Usage {
                    prompt: usage.prompt_tokens as u32,
                    completion: usage.completion_tokens as u32,
                    cached: usage.cached_tokens as u32,
                }),
            ),
            None => (None, None),
        };
        Delta {
            text,
            logprobs,
            finish_reason,
            usage,
        }
    }

    fn completion_logprobs(
        &mut self,
        api: &InferenceApi,
        entries: &[(u32, Option<&TokenLogprob>)],
    ) -> Value {
        let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for (id, lp) in entries {
            let text = token_text(api, *id);
            offsets.push(self.offset);
            self.offset += text.chars().count();
            tokens.push(text);
            lps.push(lp.map(|l| l.logprob));
            tops.push(lp.map(|l| {
                let mut top = serde_json::Map::new();
                for t in &l.top {
                    top.insert(token_text(api, t.token_id), json!(t.logprob));
                }
                // The chosen token is listed too, as vLLM and OpenAI do.
                top.entry(token_text(api, l.token_id))
                    .or_insert(json!(l.logprob));
                top
            }));
        }
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }
}

fn chat_logprob(api: &InferenceApi, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(api, id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let mut e = entry(lp.token_id, lp.logprob);
    e["top_logprobs"] = lp
        .top
        .iter()
        .map(|t| entry(t.token_id, t.logprob))
        .collect();
    e
}

/// Appends a delta's logprobs to a choice's accumulated ones.
fn extend_logprobs(acc: &mut Option<Value>, new: Value) {
    match (acc.as_mut(), new) {
        (None, new) => *acc = Some(new),
        (Some(Value::Array(a)), Value::Array(b)) => a.extend(b),
        (Some(Value::Object(a)), Value::Object(b)) => {
            for (k, v) in b {
                if let (Some(Value::Array(x)), Value::Array(y)) = (a.get_mut(&k), v) {
                    x.extend(y);
                }
            }
        }
        _ => {}
    }
}

/// Runs every choice to its end and answers with one JSON body.
async fn whole(api: InferenceApi, meta: Meta, choices: Choices, kind: Kind) -> Response {
    let mut out = Vec::new();
    let mut usages = Vec::new();
    // Each choice's cumulative logprob, for `best_of`.
    let mut scores = Vec::new();
    for (c, mut updates) in choices {
        let mut tracker = Tracker::default();
        let (mut text, mut logprobs, mut finish) = (String::new(), None, None);
        let mut score = 0.0f64;
        while let Some(outcome) = updates.recv().await {
            let u = match outcome {
                Ok(u) => u,
                Err(s) => return ApiError::from(s).into_response(),
            };
            score += u.logprobs.iter().map(|l| l.logprob as f64).sum::<f64>();
            let d = tracker.delta(&api, &c, &u, &meta, kind);
            text.push_str(&d.text);
            if let Some(l) = d.logprobs {
                extend_logprobs(&mut logprobs, l);
            }
            if d.finish_reason.is_some() {
                finish = d.finish_reason;
                usages.push(d.usage.unwrap_or_default());
            }
        }
        if finish.is_none() {
            return ApiError::from(Status::internal("a request ended without a finish reason"))
                .into_response();
        }
        out.push(match kind {
            Kind::Completion => json!({
                "index": c.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Chat => json!({
                "index": c.index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.map(|l| json!({"content": l})),
                "finish_reason": finish,
            }),
        });
        scores.push(score);
    }
    if let Some(keep) = meta.keep {
        out = best_of(out, &scores, meta.n as usize, keep as usize);
    }
    let mut body = meta.envelope(out);
    body["usage"] = meta.usage(&usages).json();
    Json(body).into_response()
}

/// The `keep` choices of each group of `group` (one prompt's) with the highest cumulative
/// logprob, best first (ties to the earlier choice), numbered again from 0.
fn best_of(choices: Vec<Value>, scores: &[f64], group: usize, keep: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut choices = choices.into_iter();
    for (g, scores) in scores.chunks(group).enumerate() {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
        let mut these: Vec<Option<Value>> = choices.by_ref().take(scores.len()).map(Some).collect();
        for (j, i) in order.into_iter().take(keep).enumerate() {
            let mut c = these[i].take().expect("each choice is taken once");
            c["index"] = json!(g * keep + j);
            out.push(c);
        }
    }
    out
}

/// Streams every choice's deltas as server-sent events, ending with `data: [DONE]`. A task
/// drives the choices; when the client goes away its sends fail, it stops, and dropping the
/// choices cancels their requests.
fn streamed(api: InferenceApi, meta: Meta, choices: Choices, kind: Kind) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Event::default().data(v.to_string())).await.is_ok() }
        };
        let mut updates = StreamMap::new();
        let mut state = Vec::new();
        for (i, (c, rx)) in choices.into_iter().enumerate() {
            if kind == Kind::Chat {
                let first = json!({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                if !send(meta.envelope(vec![first])).await {
                    return;
                }
            }
            updates.insert(i, ReceiverStream::new(rx));
            state.push((c, Tracker::default()));
        }
        let mut usages = vec![Usage::default(); state.len()];
        while let Some((i, outcome)) = updates.next().await {
            let u = match outcome {
                Ok(u) => u,
                Err(s) => {
                    let _ = send(ApiError::from(s).body()).await;
                    break;
                }
            };
            let (c, tracker) = &mut state[i];
            let d = tracker.delta(&api, c, &u, &meta, kind);
            if let Some(usage) = d.usage {
                usages[i] = usage;
            }
            let choice = match kind {
                Kind::Completion => json!({
                    "index": c.index,
                    "text": d.text,
                    "logprobs": d.logprobs,
                    "finish_reason": d.finish_reason,
                }),
                Kind::Chat => json!({
                    "index": c.index,
                    "delta": if d.text.is_empty() { json!({}) } else { json!({"content": d.text}) },
                    "logprobs": d.logprobs.map(|l| json!({"content": l})),
                    "finish_reason": d.finish_reason,
                }),
            };
            if !send(meta.envelope(vec![choice])).await {
                return;
            }
        }
        if meta.include_usage {
            let mut last = meta.envelope(vec![]);
            last["usage"] = meta.usage(&usages).json();
            if !send(last).await {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let events = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn completions(
    State(api): State<InferenceApi>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match start_completions(&api, &body, &headers) {
        Ok((meta, choices)) => respond(api, meta, choices, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

pub async fn chat_completions(
    State(api): State<InferenceApi>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match start_chat(&api, &body, &headers) {
        Ok((meta, choices)) => respond(api, meta, choices, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn respond(api: InferenceApi, meta: Meta, choices: Choices, kind: Kind) -> Response {
    let span = info_span!("openai", id = %meta.id, choices = choices.len());
    let stream = meta.stream;
    async move {
        match stream {
            true => streamed(api, meta, choices, kind),
            false => whole(api, meta, choices, kind).await,
        }
    }
    .instrument(span)
    .await
}

/// A request body as the gRPC requests of its choices, with everything checked that needs no
/// tokenizer or placement, and what the response needs to know of it.
pub struct Decoded {
    /// Each choice's request, and whether its prompt is echoed.
    pub requests: Vec<(pb::GenerateRequest, bool)>,
    /// Choices started per prompt.
    n: u32,
    /// Choices returned per prompt, when fewer than started (`best_of`).
    keep: Option<u32>,
    logprobs: bool,
    stream: bool,
    include_usage: bool,
}

impl Decoded {
    fn meta(&self, api: &InferenceApi, choices: &Choices, kind: Kind) -> Meta {
        let (prefix, object) = match (kind, self.stream) {
            (Kind::Completion, _) => ("cmpl", "text_completion"),
            (Kind::Chat, true) => ("chatcmpl", "chat.completion.chunk"),
            (Kind::Chat, false) => ("chatcmpl", "chat.completion"),
        };
        Meta {
            id: format!("{prefix}-{}", choices[0].0.request_id),
            object,
            model: api.cluster().model_name().to_string(),
            created: now_s(),
            n: self.n,
            keep: self.keep,
            logprobs: self.logprobs,
            stream: self.stream,
            include_usage: self.include_usage,
        }
    }
}

fn start_completions(
    api: &InferenceApi,
    body: &[u8],
    caller: &HeaderMap,
) -> ApiResult<(Meta, Choices)> {
    let mut d = completion_requests(body, api.cluster().model_name())?;
    let choices = start_all(api, std::mem::take(&mut d.requests), caller)?;
    Ok((d.meta(api, &choices, Kind::Completion), choices))
}

/// Decodes and checks a `/v1/completions` body for the model `served`.
pub fn completion_requests(body: &[u8], served: &str) -> ApiResult<Decoded> {
    let r: CompletionRequest = parse(body)?;
    r.common.check(served)?;
    let n = r.common.n.unwrap_or(1);
    // As OpenAI and vLLM: best_of candidates per prompt, the n most likely returned.
    let best_of = r.best_of.unwrap_or(n);
    if best_of < n || best_of > MAX_N {
        return Err(ApiError::bad_request(format!(
            "best_of is {best_of}; expected n ({n}) to {MAX_N}"
        )));
    }
    if best_of > n && r.common.stream {
        return Err(ApiError::bad_request(format!(
            "best_of ({best_of}) greater than n ({n}) cannot be streamed; expected stream false"
        )));
    }
    if r.suffix.is_some() {
        return Err(ApiError::bad_request("suffix is not supported"));
    }
    if let Some(k) = r.logprobs.filter(|k| *k > MAX_LOGPROBS) {
        return Err(ApiError::bad_request(format!(
            "logprobs is {k}; expected 0 to {MAX_LOGPROBS}"
        )));
    }
    let max_tokens = r.max_tokens.unwrap_or(16);
    if max_tokens == 0 && !r.echo {
        return Err(ApiError::bad_request(
            "max_tokens is 0 without echo; expected at least 1, or echo to score the prompt",
        ));
    }
    let prompts: Vec<(Option<String>, Vec<u32>)> = match r.prompt {
        Prompt::Text(t) => vec![(Some(t), vec![])],
        Prompt::Texts(ts) => ts.into_iter().map(|t| (Some(t), vec![])).collect(),
        Prompt::Ids(ids) => vec![(None, ids)],
        Prompt::IdLists(lists) => lists.into_iter().map(|ids| (None, ids)).collect(),
    };
    if prompts.is_empty() || prompts.iter().any(|(t, ids)| t.is_none() && ids.is_empty()) {
        return Err(ApiError::bad_request(
            "prompt is empty; expected text, a list of texts or token ids",
        ));
    }
    check_choices(prompts.len(), best_of)?;
    let mut requests = Vec::new();
    for (text, ids) in prompts {
        for choice in 0..best_of {
            let mut req = r.common.request(Some(max_tokens), choice)?;
            req.prompt = text.clone();
            req.prompt_token_ids = ids.clone();
            req.logprobs = r.logprobs;
            // Choosing the best needs every token's logprob; they are reported only if asked.
            if best_of > n {
                req.logprobs.get_or_insert(0);
            }
            // Scoring the prompt (lm-eval's log-likelihood) needs its logprobs; with
            // `max_tokens: 0` that is all that runs.
            if r.echo && (r.logprobs.is_some() || max_tokens == 0) {
                req.prompt_logprobs = Some(r.logprobs.unwrap_or(0));
            }
            requests.push((req, r.echo));
        }
    }
    Ok(Decoded {
        requests,
        n: best_of,
        keep: (best_of > n).then_some(n),
        logprobs: r.logprobs.is_some(),
        stream: r.common.stream,
        include_usage: r.common.include_usage(),
    })
}

/// Refuses more than [`MAX_CHOICES`] choices (`prompts` × `n`) in one request.
fn check_choices(prompts: usize, n: u32) -> ApiResult<()> {
    match prompts.saturating_mul(n as usize) {
        c if c > MAX_CHOICES => Err(ApiError::bad_request(format!(
            "{prompts} prompts × n = {n} is {c} choices; expected at most {MAX_CHOICES}"
        ))),
        _ => Ok(()),
    }
}

/// OpenAI chat messages as the chat template takes them: text only.
fn chat_messages(given: Vec<ChatMessage>) -> ApiResult<Vec<pb::ChatMessage>> {
    if given.is_empty() {
        return Err(ApiError::bad_request(
            "messages is empty; expected at least one",
        ));
    }
    let mut messages = Vec::with_capacity(given.len());
    for (i, m) in given.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}]: content part of type {kind:?} is not supported; expected text"
                            )))
                        }
                    }
                }
                text
            }
        };
        messages.push(pb::ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(messages)
}

fn start_chat(api: &InferenceApi, body: &[u8], caller: &HeaderMap) -> ApiResult<(Meta, Choices)> {
    let mut d = chat_requests(body, api.cluster().model_name())?;
    let choices = start_all(api, std::mem::take(&mut d.requests), caller)?;
    Ok((d.meta(api, &choices, Kind::Chat), choices))
}

/// Decodes and checks a `/v1/chat/completions` body for the model `served`.
pub fn chat_requests(body: &[u8], served: &str) -> ApiResult<Decoded> {
    let r: ChatRequest = parse(body)?;
    r.common.check(served)?;
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request("tools are not supported"));
    }
    if let Some(format) = &r.response_format {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::bad_request(
                "response_format other than {\"type\": \"text\"} is not supported",
            ));
        }
    }
    if let Some(k) = r.top_logprobs.filter(|k| *k > MAX_LOGPROBS) {
        return Err(ApiError::bad_request(format!(
            "top_logprobs is {k}; expected 0 to {MAX_LOGPROBS}"
        )));
    }
    let messages = chat_messages(r.messages)?;
    let n = r.common.n.unwrap_or(1);
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens is 0; expected at least 1",
        ));
    }
    let mut requests = Vec::new();
    for choice in 0..n {
        let mut req = r.common.request(max_tokens, choice)?;
        req.messages = messages.clone();
        if r.logprobs {
            req.logprobs = Some(r.top_logprobs.unwrap_or(0));
        }
        requests.push((req, false));
    }
    Ok(Decoded {
        requests,
        n,
        keep: None,
        logprobs: r.logprobs,
        stream: r.common.stream,
        include_usage: r.common.include_usage(),
    })
}
