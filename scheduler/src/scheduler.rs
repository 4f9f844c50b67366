//! Continuous batching over one pool of KV blocks: the queue of waiting requests, the running
//! sequences, and for every step which chunk of which sequence runs. Every step packs decode
//! tokens of running sequences and prefill chunks of new ones under a token budget; when the
//! pool runs dry the newest sequence is preempted and later recomputed from its prompt and the
//! tokens it already generated (never dropped).
//!
//! The scheduler never touches a model. A step is planned ([`Scheduler::plan`]), run wherever
//! the model is (the one-process [`crate::Engine`], or a lane of workers for the coordinator,
//! which keeps one scheduler per lane), and its results applied ([`Scheduler::apply`]), which
//! yields what each request's client should see next. Several planned steps may be in flight
//! at once (pipeline stages): a sequence is in at most one of them.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;
use switchyard_model::{IncrementalDecoder, ModelConfig, Tokenizer, TokenizerError};
use tracing::debug;

use crate::kv_blocks::{BlockAllocator, SeqId};
use crate::processors::{Adjust, History};
use crate::request::Request;
use crate::sampling::{seed_of, Draw, TokenLogprob};
use crate::step::{LogitsWanted, SeqInput, SeqResult, SeqWork};
use crate::validate::{Invalid, ValidRequest, Validator};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Most tokens one step processes (prefill is chunked to fit).
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Share the K/V of full blocks between sequences that start with the same tokens, and
    /// keep them after their sequences end ([`crate::kv_blocks`]).
    pub prefix_caching: bool,
    /// What else the cached K/V depend on (the placement epoch): blocks of another salt are
    /// never shared, and a router's block hashes must use the same one.
    pub cache_salt: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }

    /// The inverse of [`FinishReason::as_str`].
    pub fn parse(s: &str) -> Option<FinishReason> {
        match s {
            "stop" => Some(FinishReason::Stop),
            "length" => Some(FinishReason::Length),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache when the request was first
    /// admitted (OpenAI's `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
}

/// What a request's client sees after a step: only what is final. Text that could still turn
/// out to be the start of a stop string, or an incomplete UTF-8 character, is held back.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub id: SeqId,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub text: String,
    /// Once, when the whole prompt has been through the model (first entry `None`).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: Option<(FinishReason, Usage)>,
}

/// A request in flight.
struct Sequence {
    req: Request,
    seed: u64,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// The generated tokens counted for the penalties, one token at a time (boxed: most
    /// requests keep nothing in it, and sequences move between queues whole).
    history: Box<History>,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    /// Prompt tokens found in the prefix cache when it was first admitted (`None` before).
    cached_tokens: Option<usize>,
    /// Part of a planned step whose results are not applied yet.
    in_flight: bool,
    /// Its client is not reading: no more steps until it catches up ([`Scheduler::pause`]).
    paused: bool,
    cancelled: bool,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    prompt_logprobs_sent: bool,
    /// Generated text so far, decoded incrementally: it only ever grows (or is cut at a stop
    /// string), so what was sent stays true.
    text: String,
    decoder: IncrementalDecoder,
    /// Bytes of `text` already sent.
    text_sent: usize,
    /// Bytes of `text` already checked for stop strings (a new match ends at or after this).
    stop_checked: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.req.prompt.len()..]
    }

    /// Done with the model: finished, and the prompt ran through (for its prompt logprobs).
    fn retired(&self) -> bool {
        self.cancelled || (self.finish.is_some() && self.computed >= self.req.prompt.len())
    }
}

/// A sequence between two schedulers (see [`Scheduler::detach_all`]).
pub struct Detached(Sequence);

impl Detached {
    pub fn id(&self) -> SeqId {
        self.0.req.id
    }

    /// Tokens generated (and sent) so far.
    pub fn generated(&self) -> usize {
        self.0.generated().len()
    }

    /// The prompt and the tokens generated so far: what it is recomputed from.
    pub fn tokens(&self) -> &[u32] {
        &self.0.tokens
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    /// The model and its tokenizer, with the checks that do not depend on the pool.
    validator: Validator,
    blocks: BlockAllocator,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    prefix_queries: u64,
    prefix_hits: u64,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        model: ModelConfig,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Self {
        let mut blocks =
            BlockAllocator::new(config.num_blocks, config.block_size, model.sliding_window);
        if config.prefix_caching {
            blocks = blocks.with_prefix_cache(config.cache_salt);
        }
        Scheduler {
            config,
            validator: Validator::new(model, tokenizer),
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn blocks(&self) -> &BlockAllocator {
        &self.blocks
    }

    /// The pool itself, for callers that place chunks by hand (tests, benchmarks).
    pub fn blocks_mut(&mut self) -> &mut BlockAllocator {
        &mut self.blocks
    }

    /// How many times a running sequence was preempted (its KV dropped, to be recomputed).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Prompt tokens looked up in the prefix cache and those found there, so far: once per
    /// request, when first admitted; requests with prompt logprobs skip the cache and are not
    /// counted (tokens, as vLLM counts them).
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Checks a request before it is admitted: what is wrong and what was expected.
    pub fn check(&self, mut req: Request) -> Result<ValidRequest, Invalid> {
        self.fits(&req)?;
        self.validator.resolve(&mut req.params)?;
        Ok(ValidRequest::checked(req))
    }

    /// The model's checks, then whether the pool could ever hold the request.
    fn fits(&self, req: &Request) -> Result<(), Invalid> {
        let bad = |problem: String| Err(Invalid::Request(problem));
        self.validator.check(req)?;
        let c = self.validator.model();
        // The most blocks this sequence can ever hold at once must fit in the whole pool.
        let longest = (req.prompt.len() + req.params.max_tokens).min(c.max_position_embeddings);
        let live = match c.sliding_window {
            Some(w) => longest.min(w + self.config.max_step_tokens + self.config.block_size),
            None => longest,
        };
        let worst = live.div_ceil(self.config.block_size) + 1;
        if worst > self.blocks.num_blocks() {
            return bad(format!(
                "needs up to {worst} KV blocks of {} tokens but the cache has {}; raise the KV cache size",
                self.config.block_size,
                self.blocks.num_blocks()
            ));
        }
        Ok(())
    }

    /// Queues a request checked by [`Scheduler::check`] (or one like it: a lane's requests are
    /// checked by an empty scheduler with the same pool).
    pub fn add(&mut self, req: ValidRequest) {
        let req = req.into_inner();
        self.waiting.push_back(Sequence {
            seed: seed_of(&req.params),
            tokens: req.prompt.clone(),
            history: Box::new(History::new(&req.params, &req.prompt)),
            computed: 0,
            cached_tokens: None,
            in_flight: false,
            paused: false,
            cancelled: false,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_sent: false,
            text: String::new(),
            decoder: IncrementalDecoder::default(),
            text_sent: 0,
            stop_checked: 0,
            finish: (req.params.max_tokens == 0).then_some(FinishReason::Length),
            req,
        });
    }

    /// Takes every sequence out, to be recomputed elsewhere ([`Scheduler::adopt`]): running
    /// ones lose their KV as when preempted, and steps in flight are forgotten (results that
    /// still come back are ignored). What each client has already been sent goes with it.
    pub fn detach_all(&mut self) -> Vec<Detached> {
        let mut out = Vec::new();
        for mut s in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.blocks.free(s.req.id);
            if s.cancelled {
                continue;
            }
            s.computed = 0;
            s.in_flight = false;
            out.push(Detached(s));
        }
        out
    }

    /// Queues a sequence detached from another scheduler; it is recomputed from its prompt and
    /// the tokens it already generated, so its client sees no token twice.
    pub fn adopt(&mut self, d: Detached) -> Result<(), Invalid> {
        self.fits(&d.0.req)?;
        self.waiting.push_back(d.0);
        Ok(())
    }

    /// Stops planning steps for a request (`paused`), or takes it up again: its client is not
    /// reading what it generated. It keeps its place and its blocks.
    pub fn pause(&mut self, id: SeqId, paused: bool) {
        let all = self.running.iter_mut().chain(self.waiting.iter_mut());
        if let Some(s) = all.into_iter().find(|s| s.req.id == id) {
            s.paused = paused;
        }
    }

    /// Drops a request (its client went away): at once when it is not in a step in flight,
    /// otherwise when that step's results come back. Its blocks go back to the pool.
    pub fn cancel(&mut self, id: SeqId) {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            self.waiting.remove(i);
            self.blocks.free(id);
        } else if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            self.running[i].cancelled = true;
            if !self.running[i].in_flight {
                self.running.remove(i);
                self.blocks.free(id);
            }
        }
    }

    /// The next step: chunks of sequences not already in flight, within the token budget.
    /// Empty when there is nothing to run now.
    pub fn plan(&mut self) -> Vec<SeqWork> {
        self.admit();
        let mut budget = self.config.max_step_tokens;
        let mut work = Vec::new();
        for s in self
            .running
            .iter_mut()
            .filter(|s| !s.in_flight && !s.paused)
        {
            if budget == 0 {
                break;
            }
            let start = s.computed;
            let end = (start + budget).min(s.tokens.len());
            // Allocation is all-or-nothing per chunk; a shorter chunk fits in what was reserved.
            if self.blocks.allocate(s.req.id, start, end).is_err() {
                continue;
            }
            let prompt_len = s.req.prompt.len();
            // Prompt tokens predicted by this chunk's rows that have no logprob yet.
            let prompt_targets = s.req.params.prompt_logprobs.and_then(|n| {
                let collected = s.prompt_logprobs.len().max(1);
                let hi = (end + 1).min(prompt_len);
                let targets = &s.tokens[(start + 1).min(hi)..hi];
                (start + 1 + targets.len() > collected).then(|| (targets.to_vec(), n))
            });
            let completes = end == s.tokens.len();
            let draw = (completes && s.finish.is_none())
                .then(|| Draw::new(&s.req.params, s.seed, s.generated().len() as u64));
            let adjust = draw.and_then(|_| {
                let eos = &self.validator.model().eos_token_ids;
                Adjust::next(&s.req.params, &s.history, s.generated(), eos)
            });
            let logits = match (&prompt_targets, completes) {
                (Some(_), _) => LogitsWanted::All,
                (None, true) => LogitsWanted::Last,
                (None, false) => LogitsWanted::None,
            };
            work.push(SeqWork {
                id: s.req.id,
                input: SeqInput {
                    tokens: s.tokens[start..end].to_vec(),
                    start_pos: start,
                    block_table: self.blocks.table(s.req.id).to_vec(),
                    logits,
                },
                prompt_targets,
                draw,
                adjust,
                logprobs: s.req.params.logprobs,
            });
            s.in_flight = true;
            budget -= end - start;
        }
        work
    }

    /// Applies a step's results (the same order as its plan) and says what each client sees.
    pub fn apply(
        &mut self,
        work: &[SeqWork],
        results: Vec<SeqResult>,
    ) -> Result<Vec<Update>, TokenizerError> {
        let mut updates = Vec::new();
        for (w, r) in work.iter().zip(results) {
            let Some(s) = self.running.iter_mut().find(|s| s.req.id == w.id) else {
                continue;
            };
            s.in_flight = false;
            if s.cancelled {
                continue;
            }
            let start = w.input.start_pos;
            s.computed = start + w.input.tokens.len();
            // Only now are the chunk's K/V written on every stage: from here on a step planned
            // for another sequence may read them.
            self.blocks
                .register_computed(s.req.id, &s.tokens[..s.computed]);
            let prompt_len = s.req.prompt.len();
            if s.prompt_logprobs.is_empty() && s.req.params.prompt_logprobs.is_some() {
                s.prompt_logprobs.push(None);
            }
            for (j, lp) in r.prompt_logprobs.into_iter().enumerate() {
                if s.prompt_logprobs.len() == start + j + 1 {
                    s.prompt_logprobs.push(Some(lp));
                }
            }
            let mut update = Update {
                id: w.id,
                token_ids: Vec::new(),
                logprobs: Vec::new(),
                text: String::new(),
                prompt_logprobs: None,
                finish: None,
            };
            if s.computed >= prompt_len && !s.prompt_logprobs_sent {
                s.prompt_logprobs_sent = true;
                if s.req.params.prompt_logprobs.is_some() {
                    update.prompt_logprobs = Some(s.prompt_logprobs.clone());
                }
            }
            if let (Some(token), true) = (r.token, s.computed == s.tokens.len()) {
                s.tokens.push(token);
                s.history.push(token);
                update.token_ids.push(token);
                update.logprobs.extend(r.logprob);
                after_token(
                    self.validator.model(),
                    self.validator.tokenizer().ok(),
                    s,
                    token,
                )?;
            }
            let retired = s.retired();
            update.text = take_stable_text(s, retired);
            if retired {
                let finish = s.finish.unwrap_or(FinishReason::Length);
                let usage = Usage {
                    prompt_tokens: prompt_len,
                    completion_tokens: s.generated().len(),
                    cached_tokens: s.cached_tokens.unwrap_or(0),
                };
                update.finish = Some((finish, usage));
            }
            if !update.token_ids.is_empty()
                || !update.text.is_empty()
                || update.prompt_logprobs.is_some()
                || update.finish.is_some()
            {
                updates.push(update);
            }
        }
        let blocks = &mut self.blocks;
        self.running.retain(|s| {
            let keep = s.in_flight || !s.retired();
            if !keep {
                blocks.free(s.req.id);
            }
            keep
        });
        Ok(updates)
    }

    /// Admits waiting sequences while there is room, preempting the newest running sequences
    /// (never one in flight) when a running one cannot get the block it needs.
    fn admit(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let end = (s.computed + self.config.max_step_tokens).min(s.tokens.len());
            if s.in_flight || self.blocks.allocate(s.req.id, s.computed, end).is_ok() {
                i += 1;
                continue;
            }
            // Preempt the newest sequence not in flight (possibly this one); recompute it later.
            let Some(v) = self.running.iter().rposition(|s| !s.in_flight) else {
                break;
            };
            let mut victim = self.running.remove(v);
            self.blocks.free(victim.req.id);
            victim.computed = 0;
            self.preemptions += 1;
            debug!(seq = victim.req.id, "preempted: KV cache full");
            self.waiting.push_front(victim);
            if v < i {
                i -= 1;
            }
        }
        while self.running.len() < self.config.max_running {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            // A waiting sequence holds no blocks (a preempted or moved one lost them); its
            // prefix may be cached. Prompt logprobs need every prompt token's logits, so those
            // requests compute the whole prompt, as vLLM does (their blocks are still cached).
            let hit = match s.req.params.prompt_logprobs {
                Some(_) => 0,
                None => self.blocks.acquire_cached(s.req.id, &s.tokens),
            };
            let end = (hit + self.config.max_step_tokens).min(s.tokens.len());
            if self.blocks.allocate(s.req.id, hit, end).is_err() {
                // The hit is given back (still cached) and looked up again next time.
                self.blocks.free(s.req.id);
                break;
            }
            s.computed = hit;
            if s.cached_tokens.is_none() {
                // Counted once per request, as its usage reports it.
                let cached = hit.min(s.req.prompt.len());
                s.cached_tokens = Some(cached);
                if self.blocks.prefix_caching() && s.req.params.prompt_logprobs.is_none() {
                    self.prefix_queries += s.req.prompt.len() as u64;
                    self.prefix_hits += cached as u64;
                }
            }
            self.running
                .push(self.waiting.pop_front().expect("front exists"));
        }
    }
}

/// Stop checks after a new token: EOS and stop tokens, stop strings, max tokens, context length.
fn after_token(
    c: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
    s: &mut Sequence,
    token: u32,
) -> Result<(), TokenizerError> {
    let p = &s.req.params;
    if (!p.ignore_eos && c.eos_token_ids.contains(&token)) || p.stop_token_ids.contains(&token) {
        s.finish = Some(FinishReason::Stop);
        if let Some(tok) = tokenizer {
            detokenize(tok, s, None, true)?;
        }
        return Ok(());
    }
    if let Some(tok) = tokenizer {
        detokenize(tok, s, Some(token), false)?;
        // A stop string is looked for only where it could newly end.
        let longest_stop = s.req.params.stop.iter().map(String::len).max().unwrap_or(0);
        let from = floor_char_boundary(&s.text, s.stop_checked.saturating_sub(longest_stop));
        if let Some(at) = s
            .req
            .params
            .stop
            .iter()
            .filter_map(|p| s.text[from..].find(p.as_str()))
            .min()
        {
            s.text.truncate(from + at);
            s.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        s.stop_checked = s.text.len();
    }
    if s.generated().len() >= s.req.params.max_tokens || s.tokens.len() >= c.max_position_embeddings
    {
        s.finish = Some(FinishReason::Length);
        if let Some(tok) = tokenizer {
            detokenize(tok, s, None, true)?;
        }
    }
    Ok(())
}

/// Appends the text `token` completes, or with `flush` whatever is held back. Ids past the
/// tokenizer's vocabulary (padded embedding rows) carry no text.
fn detokenize(
    tok: &Tokenizer,
    s: &mut Sequence,
    token: Option<u32>,
    flush: bool,
) -> Result<(), TokenizerError> {
    if let Some(t) = token.filter(|t| (*t as usize) < tok.vocab_size()) {
        let delta = s.decoder.push(tok, t)?;
        s.text.push_str(&delta);
    }
    if flush {
        let delta = s.decoder.finish(tok)?;
        s.text.push_str(&delta);
    }
    Ok(())
}

/// The text that became final since the last call. Until the sequence is done, the last
/// `longest stop − 1` bytes are held back: they may be the start of a stop string.
fn take_stable_text(s: &mut Sequence, done: bool) -> String {
    let mut end = s.text.len();
    if !done {
        let longest_stop = s.req.params.stop.iter().map(String::len).max().unwrap_or(0);
        end = floor_char_boundary(&s.text, end.saturating_sub(longest_stop.saturating_sub(1)));
    }
    if end <= s.text_sent {
        return String::new();
    }
    let delta = s.text[s.text_sent..end].to_string();
    s.text_sent = end;
    delta
}

fn floor_char_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SamplingParams;
    use switchyard_model::init::preset;

    fn scheduler() -> Scheduler {
        let config = SchedulerConfig {
            block_size: 4,
            num_blocks: 64,
            max_step_tokens: 64,
            max_running: 8,
            prefix_caching: true,
            cache_salt: 0,
        };
        Scheduler::new(config, preset("tiny-mixtral").unwrap(), None)
    }

    fn add(s: &mut Scheduler, id: SeqId, prompt: Vec<u32>, max_tokens: usize) {
        let params = SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let req = s.check(Request { id, prompt, params }).unwrap();
        s.add(req);
    }

    /// Runs every request to its end; the usage each one finished with.
    fn run_all(s: &mut Scheduler) -> Vec<(SeqId, Usage)> {
        let mut done = Vec::new();
        while !s.is_idle() {
            for u in step(s) {
                if let Some((_, usage)) = u.finish {
                    done.push((u.id, usage));
                }
            }
        }
        done
    }

    #[test]
    fn a_cached_prefix_is_not_computed_again() {
        let mut s = scheduler();
        add(&mut s, 1, (0..10).collect(), 3);
        assert_eq!(run_all(&mut s)[0].1.cached_tokens, 0);
        // Shares 9 tokens: two full blocks of 4. The first step starts after them.
        let mut prompt: Vec<u32> = (0..9).collect();
        prompt.push(50);
        add(&mut s, 2, prompt.clone(), 3);
        let work = s.plan();
        assert_eq!(work[0].input.start_pos, 8);
        assert_eq!(work[0].input.tokens, [8, 50]);
        s.apply(&work, stand_in(&work)).unwrap();
        let done = run_all(&mut s);
        assert_eq!(done[0].1.cached_tokens, 8);
        assert_eq!(s.prefix_cache_counts(), (20, 8));

        // Prompt logprobs need every prompt token's logits: no lookup, not counted.
        let params = SamplingParams {
            max_tokens: 1,
            prompt_logprobs: Some(0),
            ..Default::default()
        };
        let req = s
            .check(Request {
                id: 3,
                prompt,
                params,
            })
            .unwrap();
        s.add(req);
        assert_eq!(s.plan()[0].input.start_pos, 0);
        assert_eq!(s.prefix_cache_counts(), (20, 8));
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared() {
        let mut s = scheduler();
        s.config.prefix_caching = false;
        s.blocks = BlockAllocator::new(64, 4, None);
        add(&mut s, 1, (0..10).collect(), 3);
        run_all(&mut s);
        add(&mut s, 2, (0..10).collect(), 3);
        assert_eq!(s.plan()[0].input.start_pos, 0);
        assert_eq!(s.prefix_cache_counts(), (0, 0));
    }

    #[test]
    fn a_preempted_sequence_resumes_from_its_cached_blocks() {
        // Room for one sequence of 3 blocks and not two: the second preempts the first.
        let config = SchedulerConfig {
            block_size: 4,
            num_blocks: 5,
            max_step_tokens: 64,
            max_running: 8,
            prefix_caching: true,
            cache_salt: 0,
        };
        let mut s = Scheduler::new(config, preset("tiny-mixtral").unwrap(), None);
        add(&mut s, 1, (0..8).collect(), 4);
        add(&mut s, 2, (100..108).collect(), 4);
        let mut tokens: std::collections::HashMap<SeqId, Vec<u32>> = Default::default();
        let mut fed: std::collections::HashMap<SeqId, usize> = Default::default();
        while !s.is_idle() {
            let work = s.plan();
            for w in &work {
                *fed.entry(w.id).or_default() += w.input.tokens.len();
            }
            for u in s.apply(&work, stand_in(&work)).unwrap() {
                tokens.entry(u.id).or_default().extend(u.token_ids);
            }
        }
        assert!(s.num_preemptions() > 0);
        // The preempted sequence resumed from its cached full blocks: no token went through the
        // model twice (12 tokens, the last never fed), and it drew the same tokens.
        assert_eq!(fed[&1], 11);
        assert_eq!(fed[&2], 11);
        assert_eq!(tokens[&1], [10, 11, 12, 13]);
        assert_eq!(tokens[&2], [10, 11, 12, 13]);
    }

    /// What a stand-in model that draws token `10 + index` every time returns for `work`.
    fn stand_in(work: &[SeqWork]) -> Vec<SeqResult> {
        work.iter()
            .map(|w| SeqResult {
                token: w.draw.map(|d| d.index as u32 + 10),
                ..Default::default()
            })
            .collect()
    }

    /// One step with the [`stand_in`] model.
    fn step(s: &mut Scheduler) -> Vec<Update> {
        let work = s.plan();
        s.apply(&work, stand_in(&work)).unwrap()
    }

    #[test]
    fn each_draw_carries_the_counts_so_far_and_stop_tokens_end_the_sequence() {
        let mut s = scheduler();
        let params = SamplingParams {
            max_tokens: 8,
            frequency_penalty: 0.5,
            min_tokens: 2,
            stop_token_ids: vec![12],
            ..Default::default()
        };
        let req = s
            .check(Request {
                id: 1,
                prompt: vec![3, 4],
                params,
            })
            .unwrap();
        s.add(req);
        let eos = s.validator.model().eos_token_ids.clone();
        let mut seen = Vec::new();
        let mut finish = None;
        for _ in 0..4 {
            let work = s.plan();
            if work.is_empty() {
                break;
            }
            let a = work[0]
                .adjust
                .clone()
                .expect("penalties or min_tokens apply");
            seen.push(a.counts.clone());
            // Before min_tokens, EOS and the stop token are banned; after, nothing is.
            let generated = a.counts.iter().map(|(_, n)| *n as usize).sum::<usize>();
            let mut banned = eos.clone();
            banned.push(12);
            assert_eq!(a.banned, if generated < 2 { banned } else { vec![] });
            for u in s.apply(&work, stand_in(&work)).unwrap() {
                finish = finish.or(u.finish);
            }
        }
        // Draws 10, 11, then 12: a stop token, which ends the sequence as EOS would.
        assert_eq!(seen, [vec![], vec![(10, 1)], vec![(10, 1), (11, 1)]]);
        assert_eq!(finish.map(|f| f.0), Some(FinishReason::Stop));
    }

    #[test]
    fn a_detached_sequence_resumes_elsewhere_without_repeating_a_token() {
        let mut a = scheduler();
        let params = SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        let req = a
            .check(Request {
                id: 1,
                prompt: vec![3, 4, 5],
                params,
            })
            .unwrap();
        a.add(req);
        let mut sent = Vec::new();
        for _ in 0..3 {
            sent.extend(step(&mut a).into_iter().flat_map(|u| u.token_ids));
        }
        assert_eq!(sent, [10, 11, 12]);
        // A step is in flight when the lane stops: its results never come.
        assert_eq!(a.plan().len(), 1);
        let moved = a.detach_all();
        assert!(a.is_idle());
        assert_eq!(a.blocks().num_free(), 64);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].generated(), 3);

        let mut b = scheduler();
        b.adopt(moved.into_iter().next().unwrap()).unwrap();
        let work = b.plan();
        // Recomputed from the prompt and the tokens already sent, drawing the fourth token.
        assert_eq!(work[0].input.tokens, [3, 4, 5, 10, 11, 12]);
        assert_eq!(work[0].input.start_pos, 0);
        assert_eq!(work[0].draw.unwrap().index, 3);
        let results = vec![SeqResult {
            token: Some(13),
            ..Default::default()
        }];
        let mut finish = None;
        for u in b
            .apply(&work, results)
            .unwrap()
            .into_iter()
            .chain((0..2).flat_map(|_| step(&mut b)))
        {
            sent.extend(u.token_ids);
            finish = finish.or(u.finish);
        }
        assert_eq!(sent, [10, 11, 12, 13, 14, 15]);
        let (reason, usage) = finish.expect("finished");
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 6);
    }
}
