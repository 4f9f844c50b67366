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

/// Most entries in each of `logit_bias`, `stop_token_ids` and `bad_words` (with their token
/// forms): each is looked at on every step of the request.
pub const MAX_TOKEN_LIST: usize = 1024;

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
    pub fn validate(&self, mut req: Request) -> Result<ValidRequest, Invalid> {
        self.check(&req)?;
        self.resolve(&mut req.params)?;
        Ok(ValidRequest(req))
    }

    /// Turns `bad_words` text into token sequences (appended to `bad_word_ids`) as vLLM does:
    /// each word as written and, where that tokenizes differently, after a space, so it is
    /// banned at the start of the text and inside it.
    pub fn resolve(&self, p: &mut SamplingParams) -> Result<(), Invalid> {
        if p.bad_words.is_empty() {
            return Ok(());
        }
        let tok = self.tokenizer()?;
        for word in std::mem::take(&mut p.bad_words) {
            let plain = tok.encode(word.trim_start(), false)?;
            let spaced = tok.encode(&format!(" {}", word.trim_start()), false)?;
            let differs = spaced.first() != plain.first() && spaced.len() == plain.len();
            p.bad_word_ids.push(plain);
            if differs {
                p.bad_word_ids.push(spaced);
            }
        }
        p.bad_word_ids.retain(|w| !w.is_empty());
        check_token_ids(p, self.model.vocab_size)
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
        if !req.params.bad_words.is_empty() && self.tokenizer.is_none() {
            return bad(
                "bad_words need a tokenizer.json in the model directory; send bad_word_ids".into(),
            );
        }
        check_token_ids(&req.params, c.vocab_size)
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
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            return bad(format!("{name} is {v}; expected -2 to 2"));
        }
    }
    if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
        return bad(format!(
            "repetition_penalty is {}; expected a number > 0 (1 = off)",
            p.repetition_penalty
        ));
    }
    if let Some((t, b)) = p
        .logit_bias
        .iter()
        .find(|(_, b)| !(-100.0..=100.0).contains(b))
    {
        return bad(format!(
            "logit_bias of token {t} is {b}; expected -100 to 100"
        ));
    }
    if p.min_tokens > p.max_tokens {
        return bad(format!(
            "min_tokens is {}; expected at most max_tokens ({})",
            p.min_tokens, p.max_tokens
        ));
    }
    for (name, n) in [
        ("logit_bias", p.logit_bias.len()),
        ("stop_token_ids", p.stop_token_ids.len()),
        ("bad_words", p.bad_words.len() + p.bad_word_ids.len()),
    ] {
        if n > MAX_TOKEN_LIST {
            return bad(format!(
                "{name} has {n} entries; expected at most {MAX_TOKEN_LIST}"
            ));
        }
    }
    if p.bad_words.iter().any(|w| w.trim().is_empty()) {
        return bad("bad_words holds an empty string".into());
    }
    if p.bad_word_ids.iter().any(Vec::is_empty) {
        return bad("bad_word_ids holds an empty sequence".into());
    }
    Ok(())
}

/// The token ids the sampling parameters name, against the vocabulary.
fn check_token_ids(p: &SamplingParams, vocab: usize) -> Result<(), Invalid> {
    let named = p
        .logit_bias
        .iter()
        .map(|(t, _)| ("logit_bias", *t))
        .chain(p.stop_token_ids.iter().map(|t| ("stop_token_ids", *t)))
        .chain(
            p.bad_word_ids
                .iter()
                .flatten()
                .map(|t| ("bad_word_ids", *t)),
        );
    for (name, t) in named {
        if t as usize >= vocab {
            return bad(format!(
                "invalid sampling parameter: {name} names token {t}; the vocabulary has {vocab} tokens"
            ));
        }
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
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            e(p)
        };
        assert!(with(|p| p.presence_penalty = 2.5)
            .contains("presence_penalty is 2.5; expected -2 to 2"));
        assert!(with(|p| p.frequency_penalty = -3.0)
            .contains("frequency_penalty is -3; expected -2 to 2"));
        assert!(with(|p| p.repetition_penalty = 0.0)
            .contains("repetition_penalty is 0; expected a number > 0"));
        assert!(with(|p| p.repetition_penalty = f32::NAN).contains("repetition_penalty is NaN"));
        assert!(with(|p| p.logit_bias = vec![(3, 101.0)])
            .contains("logit_bias of token 3 is 101; expected -100 to 100"));
        assert!(with(|p| p.min_tokens = 17)
            .contains("min_tokens is 17; expected at most max_tokens (16)"));
        assert!(with(|p| p.stop_token_ids = vec![0; 1025])
            .contains("stop_token_ids has 1025 entries; expected at most 1024"));
        assert!(with(|p| p.bad_word_ids = vec![vec![]]).contains("an empty sequence"));
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary_and_bad_words_need_a_tokenizer() {
        let model = switchyard_model::init::preset("tiny-mixtral").unwrap();
        let vocab = model.vocab_size;
        let v = Validator::new(model, None);
        let req = |f: fn(&mut SamplingParams, u32)| {
            let mut params = SamplingParams::default();
            f(&mut params, vocab as u32);
            Request {
                id: 0,
                prompt: vec![1],
                params,
            }
        };
        let e = |r: Request| v.validate(r).unwrap_err().to_string();
        assert!(e(req(|p, v| p.logit_bias = vec![(v, 1.0)]))
            .contains(&format!("logit_bias names token {vocab}")));
        assert!(e(req(|p, v| p.stop_token_ids = vec![v])).contains("stop_token_ids names token"));
        assert!(e(req(|p, v| p.bad_word_ids = vec![vec![1, v]])).contains("bad_word_ids names"));
        assert!(e(req(|p, _| p.bad_words = vec!["x".into()])).contains("need a tokenizer.json"));
        assert!(v
            .validate(req(|p, v| p.bad_word_ids = vec![vec![v - 1]]))
            .is_ok());
    }

    #[test]
    fn bad_words_become_token_sequences_with_and_without_a_leading_space() {
        let model = switchyard_model::init::preset("tiny-mixtral").unwrap();
        let json = switchyard_model::tokenizer::synthetic_tokenizer_json(model.vocab_size);
        let tok = Tokenizer::from_json_str(&json).unwrap();
        let plain = tok.encode("ab", false).unwrap();
        let v = Validator::new(model, Some(Arc::new(tok)));
        let r = v
            .validate(Request {
                id: 0,
                prompt: vec![1],
                params: SamplingParams {
                    bad_words: vec!["ab".into()],
                    ..Default::default()
                },
            })
            .unwrap();
        assert!(r.params.bad_words.is_empty());
        assert_eq!(r.params.bad_word_ids[0], plain);
        assert!(!plain.is_empty());
    }
}
