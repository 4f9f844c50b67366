//! What one step asks of a model: for each sequence a chunk of tokens at known positions (a
//! prefill chunk or a single decode token), the block table of its paged KV cache, and which
//! logits to return. Prefill chunks and decode tokens of many sequences share one step.

use crate::kv_blocks::SeqId;
use crate::processors::Adjust;
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
    /// Physical block of each logical block `pos / block_size`; [`crate::kv_blocks::FREED`] for
    /// blocks that slid out of the window.
    pub block_table: Vec<u32>,
    pub logits: LogitsWanted,
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
    /// Changes to the last row before the draw (penalties, biases, banned tokens).
    pub adjust: Option<Adjust>,
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

/// Turns each sequence's logits rows (as the model's `logits` returns them) into prompt
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
                // Logprobs stay those of the model's own distribution, as vLLM reports them.
                let token = match &w.adjust {
                    Some(adjust) => {
                        let mut adjusted = last.to_vec();
                        adjust.apply(&mut adjusted);
                        draw.sample(&adjusted)
                    }
                    None => draw.sample(last),
                };
                out.token = Some(token);
                out.logprob = w
                    .logprobs
                    .map(|n| token_logprob(&log_softmax(last), token, n));
            }
            out
        })
        .collect()
}
