//! One process, one backend, a whole model: the reference path behind `switchyard generate`.
//! The [`Scheduler`] plans each step, the model runs it here, and the updates are gathered
//! into one [`Completion`] per request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use switchyard_model::{Checkpoint, Subset, Tokenizer};
use tracing::info_span;

use crate::backend::Backend;
use crate::model::{Model, ModelError};
use crate::offload::{ExpertCacheMetrics, Offload};
use switchyard_metrics::Registry;
use switchyard_scheduler::kv_blocks::{BlockAllocator, SeqId};
use switchyard_scheduler::step::{sample_step, LogitsWanted, SeqInput};
use switchyard_scheduler::Completion;
use switchyard_scheduler::{Request, Scheduler, SchedulerConfig};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] switchyard_model::TokenizerError),
    #[error("request {id}: {source}")]
    Request {
        id: SeqId,
        #[source]
        source: switchyard_scheduler::Invalid,
    },
    #[error("request {id}: {source}")]
    Kv {
        id: SeqId,
        #[source]
        source: switchyard_scheduler::kv_blocks::KvError,
    },
    /// `check` lets in only requests the whole pool can hold, so this is a bug.
    #[error("request {0}: the scheduler found nothing to run")]
    Stalled(SeqId),
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
    /// Keep only this many bytes of experts resident and read the others on demand.
    pub offload: Option<Offload>,
    /// Reuse the K/V of full blocks whose tokens a sequence starts with (vLLM's automatic
    /// prefix caching).
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            max_step_tokens: 512,
            max_running: 64,
            offload: None,
            prefix_caching: true,
        }
    }
}

pub struct Engine<B: Backend> {
    backend: B,
    model: Model<B>,
    cache: B::KvCache,
    scheduler: Scheduler,
    tokenizer: Option<Arc<Tokenizer>>,
    block_size: usize,
}

impl<B: Backend> Engine<B> {
    /// Loads a whole model directory onto `backend`.
    pub fn load(backend: B, dir: &Path, config: EngineConfig) -> Result<Self, EngineError> {
        let checkpoint = Checkpoint::open(dir).map_err(ModelError::from)?;
        let subset = Subset::all(checkpoint.config());
        let model = match &config.offload {
            None => Model::load(&backend, &checkpoint, &subset)?,
            Some(o) => {
                let metrics = ExpertCacheMetrics::register(&Registry::default());
                Model::load_offloaded(&backend, &checkpoint, &subset, o, metrics)?
            }
        };
        let tokenizer = Tokenizer::for_checkpoint(&checkpoint)?.map(Arc::new);
        Self::new(backend, model, tokenizer, config)
    }

    pub fn new(
        backend: B,
        model: Model<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let c = model.config().clone();
        let num_blocks = (config.kv_cache_bytes / model.kv_block_bytes(config.block_size)).max(1);
        let cache = backend
            .kv_cache(
                model.num_layers(),
                num_blocks,
                config.block_size,
                c.num_kv_heads,
                c.head_dim,
            )
            .map_err(ModelError::from)?;
        let scheduler = Scheduler::new(
            SchedulerConfig {
                block_size: config.block_size,
                num_blocks,
                max_step_tokens: config.max_step_tokens,
                max_running: config.max_running,
                prefix_caching: config.prefix_caching,
                // One model in one process: nothing besides the tokens changes a block.
                cache_salt: 0,
            },
            c,
            tokenizer.clone(),
        );
        Ok(Engine {
            backend,
            model,
            cache,
            scheduler,
            tokenizer,
            block_size: config.block_size,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// How many times a running sequence was preempted (its KV dropped, to be recomputed).
    pub fn num_preemptions(&self) -> u64 {
        self.scheduler.num_preemptions()
    }

    pub fn blocks(&self) -> &BlockAllocator {
        self.scheduler.blocks()
    }

    /// Prompt tokens looked up in the prefix cache and those found there, so far.
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        self.scheduler.prefix_cache_counts()
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
            let blocks = self.scheduler.blocks_mut();
            blocks
                .allocate(seq, start, start + tokens.len())
                .map_err(|source| EngineError::Kv { id: seq, source })?;
            inputs.push(SeqInput {
                tokens: tokens.to_vec(),
                start_pos: start,
                block_table: blocks.table(seq).to_vec(),
                logits,
            });
        }
        Ok(self
            .model
            .forward(&self.backend, &mut self.cache, &inputs, self.block_size)?)
    }

    /// Frees a sequence's KV blocks (after [`Engine::step_chunks`]).
    pub fn release(&mut self, seq: SeqId) {
        self.scheduler.blocks_mut().free(seq);
    }

    /// Runs `requests` to completion with continuous batching; completions come back in the
    /// order of `requests`.
    pub fn run(&mut self, requests: Vec<Request>) -> Result<Vec<Completion>, EngineError> {
        let requests = requests
            .into_iter()
            .map(|r| {
                let id = r.id;
                (self.scheduler.check(r)).map_err(|source| EngineError::Request { id, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let order: Vec<SeqId> = requests.iter().map(|r| r.id).collect();
        let mut out: HashMap<SeqId, Completion> = requests
            .iter()
            .map(|r| (r.id, Completion::new(r.id, r.params.logprobs.is_some())))
            .collect();
        for r in requests {
            self.scheduler.add(r);
        }
        while !self.scheduler.is_idle() {
            let work = self.scheduler.plan();
            if work.is_empty() {
                // check() lets in only requests the whole pool can hold, so this is a bug.
                return Err(EngineError::Stalled(order[0]));
            }
            let _g = info_span!("step", seqs = work.len()).entered();
            let inputs: Vec<SeqInput> = work.iter().map(|w| w.input.clone()).collect();
            let logits =
                self.model
                    .forward(&self.backend, &mut self.cache, &inputs, self.block_size)?;
            let results = sample_step(&work, &logits, self.model.config().vocab_size);
            for u in self.scheduler.apply(&work, results)? {
                out.get_mut(&u.id).expect("a request of this run").extend(u);
            }
        }
        Ok(order
            .iter()
            .map(|id| out.remove(id).expect("every request finishes"))
            .collect())
    }
}
