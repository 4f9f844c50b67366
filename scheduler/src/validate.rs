//! Request validation, once for every entry point. The gRPC API, the OpenAI HTTP API and the
//! command line each turn what they were sent into a prompt of token ids
//! ([`Validator::tokenize`]) and [`SamplingParams`], and every request is checked against the
//! model before it is queued ([`Validator::validate`]); what depends on the KV pool of the lane
//! that will run it is the [`crate::Scheduler`]'s own check on top. Only a [`ValidRequest`] can
//! be queued. The limits are defined here and nowhere else.

use std::sync::Arc;

use switchyard_model::{ChatMessage, ModelConfig, Tokenizer, TokenizerError};

use crate::request::{Request, SamplingParams};

/// Most alternatives reported per token (`logprobs`, `prompt_logprobs`, OpenAI's
/// `top_logprobs`), as OpenAI's API allows.
pub const MAX_LOGPROBS: usize = 20;

/// Tokens generated when a request does not say (OpenAI's default for completions).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Why a request was refused. Each says what was wrong and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// The request itself is wrong (`INVALID_ARGUMENT`, HTTP 400).
    #[error("{0}")]
    Request(String),
    /// The request needs a tokenizer the model directory lacks (`FAILED_PRECONDITION`).
    #[error("the model directory has no tokenizer.json; send prompt_token_ids")]
    NoTokenizer,
    /// The text could not be tokenized.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

fn bad<T>(problem: String) -> Result<T, Invalid> {
    Err(Invalid::Request(problem))
}

/// A prompt as a client gives it: exactly one of text, token ids or chat messages.
#[derive(Debug, Clone, Copy)]
pub enum PromptInput<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
    Chat(&'a [ChatMessage]),
}

impl<'a> PromptInput<'a> {
    /// The one input a request set, or why there is not exactly one.
    pub fn exactly_one(
        text: Option<&'a str>,
        ids: &'a [u32],
        messages: &'a [ChatMessage],
    ) -> Result<Self, Invalid> {
        let given = [text.is_some(), !ids.is_empty(), !messages.is_empty()];
        match given.iter().filter(|g| **g).count() {
            0 => bad("no input: set exactly one of prompt, prompt_token_ids or messages".into()),
            1 => Ok(match text {
                Some(t) => PromptInput::Text(t),
                None if !ids.is_empty() => PromptInput::Ids(ids),
                None => PromptInput::Chat(messages),
            }),
            _ => bad(
                "conflicting inputs: set exactly one of prompt, prompt_token_ids or messages"
                    .into(),
            ),
        }
    }
}

/// A request that passed every check: only a [`Validator`] (or a [`crate::Scheduler`], which
/// adds its pool's) makes one, and only a valid request can be queued.
#[derive(Debug, Clone)]
pub struct ValidRequest(Request);

impl ValidRequest {
    /// Marks a request checked; the caller has checked it.
    pub(crate) fn checked(req: Request) -> Self {
        ValidRequest(req)
    }

    pub fn into_inner(self) -> Request {
        self.0
    }
}

impl std::ops::Deref for ValidRequest {
    type Target = Request;

    fn deref(&self) -> &Request {
        &self.0
    }
}

/// Checks requests against one model (and its tokenizer, if it has one).
#[derive(Debug, Clone)]
pub struct Validator {
    model: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl Validator {
    pub fn new(model: ModelConfig, tokenizer: Option<Arc<Tokenizer>>) -> Self {
        Validator { model, tokenizer }
    }

    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// The model's tokenizer, or why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer, Invalid> {
        self.tokenizer.as_deref().ok_or(Invalid::NoTokenizer)
    }

    /// The tokenizer itself, to share (schedulers detokenise with it).
    pub fn shared_tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.tokenizer.clone()
    }

    /// The prompt's token ids: text gets the BOS token, chat messages the model's template.
    pub fn tokenize(&self, input: PromptInput<'_>) -> Result<Vec<u32>, Invalid> {
        Ok(match input {
            PromptInput::Text(text) => self.tokenizer()?.encode(text, true)?,
            PromptInput::Ids(ids) => ids.to_vec(),
            PromptInput::Chat(messages) => self.tokenizer()?.apply_chat(messages)?,
        })
    }

    /// Everything about a request that does not depend on where it runs: its sampling
    /// parameters, its prompt against the vocabulary and the context, stop strings against
    /// the tokenizer.
    pub fn validate(&self, req: Request) -> Result<ValidRequest, Invalid> {
        self.check(&req)?;
        Ok(ValidRequest(req))
    }

    /// [`Validator::validate`] without taking the request.
    pub fn check(&self, req: &Request) -> Result<(), Invalid> {
        check_params(&req.params)?;
        let c = &self.model;
        if req.prompt.is_empty() {
            return bad("the prompt is empty; expected at least one token".into());
        }
        if let Some(&t) = req.prompt.iter().find(|t| **t as usize >= c.vocab_size) {
            return bad(format!(
                "prompt token id {t} is out of range; the vocabulary has {} tokens",
                c.vocab_size
            ));
        }
        if req.prompt.len() > c.max_position_embeddings {
            return bad(format!(
                "the prompt has {} tokens; the model accepts at most {}",
                req.prompt.len(),
                c.max_position_embeddings
            ));
        }
        if !req.params.stop.is_empty() && self.tokenizer.is_none() {
            return bad("stop strings need a tokenizer.json in the model directory".into());
        }
        Ok(())
    }
}

/// The sampling parameters alone.
pub fn check_params(p: &SamplingParams) -> Result<(), Invalid> {
    let bad = |s: String| bad(format!("invalid sampling parameter: {s}"));
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return bad(format!(
            "temperature is {}; expected a number >= 0",
            p.temperature
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad(format!("top_p is {}; expected 0 < top_p <= 1", p.top_p));
    }
    for (name, n) in [
        ("logprobs", p.logprobs),
        ("prompt_logprobs", p.prompt_logprobs),
    ] {
        if let Some(n) = n.filter(|n| *n > MAX_LOGPROBS) {
            return bad(format!("{name} is {n}; expected at most {MAX_LOGPROBS}"));
        }
    }
    if p.stop.iter().any(String::is_empty) {
        return bad("stop holds an empty string".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn invalid_params_are_named() {
        let e = |p: SamplingParams| check_params(&p).unwrap_err().to_string();
        assert!(e(params(-1.0, 1.0)).contains("temperature is -1"));
        assert!(e(params(1.0, 0.0)).contains("top_p is 0"));
        let many = SamplingParams {
            logprobs: Some(21),
            ..Default::default()
        };
        assert!(e(many).contains("logprobs is 21; expected at most 20"));
    }
}
