//! What one step asks of a model: for each sequence a chunk of tokens at known positions (a
//! prefill chunk or a single decode token), the block table of its paged KV cache, and which
//! logits to return. Prefill chunks and decode tokens of many sequences share one step.

use std::ops::Range;

use crate::kv_cache::SeqId;
use crate::sampling::{log_softmax, token_logprob, Draw, TokenLogprob};

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// A prefill chunk that is not the last one of its prompt, without prompt logprobs.
    None,
    /// The next-token distribution after the chunk's last token.
    Last,
    /// Every position of the chunk (prompt logprobs) — the last row is the next-token one.
    All,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqInput {
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; everything before it is already in the KV cache.
    pub start_pos: usize,
    /// Physical block of each logical block `pos / block_size`; [`crate::kv_cache::FREED`] for
    /// blocks that slid out of the window.
    pub block_table: Vec<u32>,
    pub logits: LogitsWanted,
}

/// The attention view of a step: which rows of the flattened batch belong to which sequence.
#[derive(Debug, Clone)]
pub struct AttentionBatch {
    pub seqs: Vec<AttentionSeq>,
    pub block_size: usize,
    /// A query at position `p` sees keys `p - window + 1 ..= p` (all earlier keys when `None`).
    pub window: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct AttentionSeq {
    pub rows: Range<usize>,
    pub start_pos: usize,
    pub block_table: Vec<u32>,
}

impl AttentionBatch {
    pub fn new(inputs: &[SeqInput], block_size: usize, window: Option<usize>) -> Self {
        let mut row = 0;
        let seqs = inputs
            .iter()
            .map(|s| {
                let rows = row..row + s.tokens.len();
                row = rows.end;
                AttentionSeq {
                    rows,
                    start_pos: s.start_pos,
                    block_table: s.block_table.clone(),
                }
            })
            .collect();
        AttentionBatch {
            seqs,
            block_size,
            window,
        }
    }

    /// First key position the query at `pos` may see.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Positions of every row, flattened.
    pub fn positions(&self) -> Vec<u32> {
        self.seqs
            .iter()
            .flat_map(|s| (s.start_pos..s.start_pos + s.rows.len()).map(|p| p as u32))
            .collect()
    }
}

/// One sequence's part of a step as a scheduler plans it: the model input, plus what to do with
/// its logits where they are computed (the engine, or a lane's last stage).
#[derive(Debug, Clone)]
pub struct SeqWork {
    pub id: SeqId,
    pub input: SeqInput,
    /// The prompt tokens that rows `0..n` of this chunk predict, for prompt logprobs with `n`
    /// alternatives (needs [`LogitsWanted::All`]).
    pub prompt_targets: Option<(Vec<u32>, usize)>,
    /// Draw the next token from the last row.
    pub draw: Option<Draw>,
    /// Alternatives to report with the drawn token.
    pub logprobs: Option<usize>,
}

/// What a step returns for one [`SeqWork`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqResult {
    pub prompt_logprobs: Vec<TokenLogprob>,
    pub token: Option<u32>,
    pub logprob: Option<TokenLogprob>,
}

/// Turns each sequence's logits rows (as [`crate::Model::logits`] returns them) into prompt
/// logprobs and drawn tokens.
pub fn sample_step(work: &[SeqWork], logits: &[Vec<f32>], vocab: usize) -> Vec<SeqResult> {
    work.iter()
        .zip(logits)
        .map(|(w, rows)| {
            let mut out = SeqResult::default();
            let n_rows = rows.len() / vocab;
            let row = |j: usize| &rows[j * vocab..(j + 1) * vocab];
            if let Some((targets, n)) = &w.prompt_targets {
                for (j, &t) in targets.iter().enumerate().take(n_rows) {
                    out.prompt_logprobs
                        .push(token_logprob(&log_softmax(row(j)), t, *n));
                }
            }
            if let (Some(draw), true) = (&w.draw, n_rows > 0) {
                let last = row(n_rows - 1);
                let token = draw.sample(last);
                out.token = Some(token);
                out.logprob = w
                    .logprobs
                    .map(|n| token_logprob(&log_softmax(last), token, n));
            }
            out
        })
        .collect()
}
