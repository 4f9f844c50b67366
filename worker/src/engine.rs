//! One process, one backend, a whole model: the reference path behind `switchyard generate`.
//! A small continuous-batching loop: every step packs decode tokens of running sequences and
//! prefill chunks of new ones under a token budget; when the KV pool runs dry the newest
//! sequence is preempted and later recomputed from its prompt and the tokens it already
//! generated (never dropped).

use std::collections::VecDeque;
use std::path::Path;

use serde::Serialize;
use switchyard_model::{Checkpoint, Subset, Tokenizer};
use tracing::{debug, info_span};

use crate::backend::Backend;
use crate::batch::{LogitsWanted, SeqInput};
use crate::kv_cache::{BlockAllocator, SeqId};
use crate::model::{Model, ModelError};
use crate::sampling::{
    log_softmax, token_logprob, InvalidParams, Sampler, SamplingParams, TokenLogprob,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] switchyard_model::TokenizerError),
    #[error(transparent)]
    Params(#[from] InvalidParams),
    #[error("request {id}: {problem}")]
    Request { id: SeqId, problem: String },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes of KV memory to allocate.
    pub kv_cache_bytes: usize,
    /// Most tokens one step processes (prefill is chunked to fit).
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            max_step_tokens: 512,
            max_running: 64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What `switchyard generate --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    #[serde(skip)]
    pub id: SeqId,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// One entry per prompt token; the first is `null` (nothing precedes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub usage: Usage,
}

/// A request in flight.
struct Sequence {
    req: Request,
    sampler: Sampler,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    text: String,
    /// Bytes of `text` already checked for stop strings (a new match ends at or after this).
    stop_checked: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.req.prompt.len()..]
    }
}

pub struct Engine<B: Backend> {
    backend: B,
    model: Model<B>,
    cache: B::KvCache,
    blocks: BlockAllocator,
    tokenizer: Option<Tokenizer>,
    config: EngineConfig,
    preemptions: u64,
}

impl<B: Backend> Engine<B> {
    /// Loads a whole model directory onto `backend`.
    pub fn load(backend: B, dir: &Path, config: EngineConfig) -> Result<Self, EngineError> {
        let checkpoint = Checkpoint::open(dir).map_err(ModelError::from)?;
        let model = Model::load(&backend, &checkpoint, &Subset::all(checkpoint.config()))?;
        let tokenizer = match dir.join("tokenizer.json").exists() {
            true => Some(Tokenizer::from_dir(dir)?),
            false => None,
        };
        Self::new(backend, model, tokenizer, config)
    }

    pub fn new(
        backend: B,
        model: Model<B>,
        tokenizer: Option<Tokenizer>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let c = model.config();
        let block_bytes =
            2 * model.num_layers() * c.kv_dim() * config.block_size * std::mem::size_of::<f32>();
        let num_blocks = (config.kv_cache_bytes / block_bytes.max(1)).max(1);
        let cache = backend
            .kv_cache(
                model.num_layers(),
                num_blocks,
                config.block_size,
                c.num_kv_heads,
                c.head_dim,
            )
            .map_err(ModelError::from)?;
        let blocks = BlockAllocator::new(num_blocks, config.block_size, c.sliding_window);
        Ok(Engine {
            backend,
            model,
            cache,
            blocks,
            tokenizer,
            config,
            preemptions: 0,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// How many times a running sequence was preempted (its KV dropped, to be recomputed).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn blocks(&self) -> &BlockAllocator {
        &self.blocks
    }

    /// Runs one step over chunks `(sequence, tokens, position of the first token, logits
    /// wanted)` that the caller schedules itself, allocating their KV blocks; returns the logits
    /// each chunk asked for. For tests and tools that drive the model directly.
    pub fn step_chunks(
        &mut self,
        chunks: &[(SeqId, &[u32], usize, LogitsWanted)],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut inputs = Vec::with_capacity(chunks.len());
        for &(seq, tokens, start, logits) in chunks {
            self.blocks
                .allocate(seq, start, start + tokens.len())
                .map_err(|e| EngineError::Request {
                    id: seq,
                    problem: e.to_string(),
                })?;
            inputs.push(SeqInput {
                tokens: tokens.to_vec(),
                start_pos: start,
                block_table: self.blocks.table(seq).to_vec(),
                logits,
            });
        }
        Ok(self.model.forward(
            &self.backend,
            &mut self.cache,
            &inputs,
            self.config.block_size,
        )?)
    }

    /// Frees a sequence's KV blocks (after [`Engine::step_chunks`]).
    pub fn release(&mut self, seq: SeqId) {
        self.blocks.free(seq);
    }

    /// Checks a request before it is admitted.
    fn check(&self, req: &Request) -> Result<(), EngineError> {
        let bad = |problem: String| {
            Err(EngineError::Request {
                id: req.id,
                problem,
            })
        };
        req.params.validate()?;
        let c = self.model.config();
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

    /// Runs `requests` to completion with continuous batching; completions come back in the
    /// order of `requests`.
    pub fn run(&mut self, requests: Vec<Request>) -> Result<Vec<Completion>, EngineError> {
        for r in &requests {
            self.check(r)?;
        }
        let order: Vec<SeqId> = requests.iter().map(|r| r.id).collect();
        let mut waiting: VecDeque<Sequence> = requests
            .into_iter()
            .map(|req| Sequence {
                sampler: Sampler::new(&req.params),
                tokens: req.prompt.clone(),
                computed: 0,
                logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
                text: String::new(),
                stop_checked: 0,
                finish: (req.params.max_tokens == 0).then_some(FinishReason::Length),
                req,
            })
            .collect();
        let mut running: Vec<Sequence> = Vec::new();
        let mut done: Vec<Sequence> = Vec::new();

        while !waiting.is_empty() || !running.is_empty() {
            self.schedule(&mut waiting, &mut running);
            self.step(&mut running)?;
            // A sequence with max_tokens = 0 is finished from the start but still runs its
            // prompt through, for its prompt logprobs.
            let (finished, still): (Vec<_>, Vec<_>) = running
                .drain(..)
                .partition(|s| s.finish.is_some() && s.computed >= s.req.prompt.len());
            running = still;
            for s in finished {
                self.blocks.free(s.req.id);
                done.push(s);
            }
        }
        let mut out = Vec::with_capacity(order.len());
        for id in order {
            let i = done
                .iter()
                .position(|s| s.req.id == id)
                .expect("every request finishes");
            out.push(self.completion(done.swap_remove(i)));
        }
        Ok(out)
    }

    /// Admits waiting sequences while there is room, preempting the newest running sequences
    /// when a running one cannot get the block it needs.
    fn schedule(&mut self, waiting: &mut VecDeque<Sequence>, running: &mut Vec<Sequence>) {
        // Running sequences first, oldest first: each needs room for its next chunk.
        let mut i = 0;
        while i < running.len() {
            let s = &running[i];
            let end = (s.computed + self.config.max_step_tokens).min(s.tokens.len());
            if self.blocks.allocate(s.req.id, s.computed, end).is_ok() {
                i += 1;
                continue;
            }
            // Preempt the newest sequence (possibly this one) and recompute it later.
            let mut victim = running.pop().expect("non-empty");
            self.blocks.free(victim.req.id);
            victim.computed = 0;
            self.preemptions += 1;
            debug!(seq = victim.req.id, "preempted: KV cache full");
            waiting.push_front(victim);
        }
        while running.len() < self.config.max_running {
            let Some(s) = waiting.front() else { break };
            let end = (s.computed + self.config.max_step_tokens).min(s.tokens.len());
            if self.blocks.allocate(s.req.id, s.computed, end).is_err() {
                break;
            }
            running.push(waiting.pop_front().expect("front exists"));
        }
    }

    /// One forward step over every running sequence, within the token budget.
    fn step(&mut self, running: &mut [Sequence]) -> Result<(), EngineError> {
        let mut budget = self.config.max_step_tokens;
        let mut inputs = Vec::new();
        let mut members = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let start = s.computed;
            let end = (start + budget).min(s.tokens.len());
            let prompt_len = s.req.prompt.len();
            let completes = end == s.tokens.len();
            let wants_prompt = s.req.params.prompt_logprobs.is_some() && start < prompt_len;
            let logits = match (wants_prompt, completes) {
                (true, _) => LogitsWanted::All,
                (false, true) => LogitsWanted::Last,
                (false, false) => LogitsWanted::None,
            };
            // Allocation is all-or-nothing per chunk; a shorter chunk fits in what was reserved.
            self.blocks
                .allocate(s.req.id, start, end)
                .map_err(|e| EngineError::Request {
                    id: s.req.id,
                    problem: e.to_string(),
                })?;
            inputs.push(SeqInput {
                tokens: s.tokens[start..end].to_vec(),
                start_pos: start,
                block_table: self.blocks.table(s.req.id).to_vec(),
                logits,
            });
            members.push(i);
            budget -= end - start;
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let span = info_span!(
            "step",
            seqs = inputs.len(),
            tokens = self.config.max_step_tokens - budget
        );
        let _g = span.enter();
        let logits = self.model.forward(
            &self.backend,
            &mut self.cache,
            &inputs,
            self.config.block_size,
        )?;
        let vocab = self.model.config().vocab_size;
        for ((input, rows), i) in inputs.iter().zip(logits).zip(members) {
            let s = &mut running[i];
            let start = input.start_pos;
            s.computed = start + input.tokens.len();
            if rows.is_empty() {
                continue;
            }
            let n_rows = rows.len() / vocab;
            // Row j predicts the token at position start + j + 1 (one row when only Last).
            let first_pos = start + input.tokens.len() - n_rows;
            let prompt_len = s.req.prompt.len();
            if let Some(n) = s.req.params.prompt_logprobs {
                if start == 0 {
                    s.prompt_logprobs = vec![None];
                }
                for j in 0..n_rows {
                    let target = first_pos + j + 1;
                    if target < prompt_len && s.prompt_logprobs.len() == target {
                        let lp = log_softmax(&rows[j * vocab..(j + 1) * vocab]);
                        s.prompt_logprobs
                            .push(Some(token_logprob(&lp, s.tokens[target], n)));
                    }
                }
            }
            if s.computed == s.tokens.len() && s.finish.is_none() {
                let last = &rows[(n_rows - 1) * vocab..];
                let token = s.sampler.sample(last);
                if let Some(n) = s.req.params.logprobs {
                    s.logprobs.push(token_logprob(&log_softmax(last), token, n));
                }
                s.tokens.push(token);
                self.after_token(s, token)?;
            }
        }
        Ok(())
    }

    /// Stop checks after a new token: EOS, stop strings, max tokens, context length.
    fn after_token(&self, s: &mut Sequence, token: u32) -> Result<(), EngineError> {
        let c = self.model.config();
        if !s.req.params.ignore_eos && c.eos_token_ids.contains(&token) {
            s.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        if let Some(tok) = &self.tokenizer {
            // Decoding the generated tokens whole keeps the text exact; a stop string is looked
            // for only where it could newly end.
            // Ids past the tokenizer's vocabulary (padded embedding rows) carry no text.
            let known: Vec<u32> = s
                .generated()
                .iter()
                .copied()
                .filter(|t| (*t as usize) < tok.vocab_size())
                .collect();
            s.text = tok.decode(&known)?;
            let from = s
                .stop_checked
                .saturating_sub(s.req.params.stop.iter().map(String::len).max().unwrap_or(0));
            let from = (0..=from)
                .rev()
                .find(|i| s.text.is_char_boundary(*i))
                .unwrap_or(0);
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
        if s.generated().len() >= s.req.params.max_tokens
            || s.tokens.len() >= c.max_position_embeddings
        {
            s.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    fn completion(&self, s: Sequence) -> Completion {
        let generated = s.generated().to_vec();
        Completion {
            id: s.req.id,
            usage: Usage {
                prompt_tokens: s.req.prompt.len(),
                completion_tokens: generated.len(),
            },
            token_ids: generated,
            text: s.text,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
            logprobs: s.req.params.logprobs.map(|_| s.logprobs),
            prompt_logprobs: s.req.params.prompt_logprobs.map(|_| s.prompt_logprobs),
        }
    }
}
