//! Logits processors: what a request asks to change in the model's next-token logits before a
//! token is drawn (penalties, biases, banned tokens). They never change the reported logprobs,
//! which stay those of the model's own distribution, as vLLM reports them by default.
//!
//! The work is split where the data lives. The scheduler keeps each sequence's [`History`]
//! (token counts, updated once per generated token, never recounted) and, for each step that
//! draws, turns it and the request into an [`Adjust`]: only the tokens it touches. The last
//! stage (or the one-process engine) applies it to the logits row ([`Adjust::apply`]) before
//! [`crate::sampling::Draw::sample`].
//!
//! The order is Hugging Face's (`GenerationMixin._get_logits_processor`), so outputs match
//! `transformers`' own processors: `logit_bias` (its `SequenceBiasLogitsProcessor` on
//! single tokens), `repetition_penalty` (`RepetitionPenaltyLogitsProcessor`, over prompt and
//! output), banned tokens (`NoBadWordsLogitsProcessor`, then `MinNewTokensLengthLogitsProcessor`
//! for `min_tokens`), then presence and frequency penalties (not in `transformers`: a custom
//! processor, which `generate` applies after its own), then temperature, top-k, top-p.

use std::collections::{BTreeMap, BTreeSet};

use crate::request::SamplingParams;

/// What one sequence generated so far, as the penalties need it.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// How often each token was generated (presence and frequency penalties).
    counts: BTreeMap<u32, u32>,
    /// Every distinct token of the prompt and the output (repetition penalty).
    seen: BTreeSet<u32>,
    /// Whether this request needs the counts at all: without penalties nothing is kept.
    keep_counts: bool,
    keep_seen: bool,
}

impl History {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let keep_seen = params.repetition_penalty != 1.0;
        History {
            counts: BTreeMap::new(),
            seen: match keep_seen {
                true => prompt.iter().copied().collect(),
                false => BTreeSet::new(),
            },
            keep_counts: params.presence_penalty != 0.0 || params.frequency_penalty != 0.0,
            keep_seen,
        }
    }

    /// Counts one generated token.
    pub fn push(&mut self, token: u32) {
        if self.keep_counts {
            *self.counts.entry(token).or_default() += 1;
        }
        if self.keep_seen {
            self.seen.insert(token);
        }
    }
}

/// The changes to one logits row before a draw: only the tokens they touch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adjust {
    /// OpenAI's `logit_bias`: added to the token's logit.
    pub bias: Vec<(u32, f32)>,
    /// Hugging Face's repetition penalty (1 = off) over `seen`: a positive logit is divided by
    /// it, any other multiplied.
    pub repetition_penalty: f32,
    pub seen: Vec<u32>,
    /// Tokens that must not be drawn now: the last token of a bad word whose other tokens end
    /// the output, and EOS and stop tokens before `min_tokens`.
    pub banned: Vec<u32>,
    /// OpenAI's penalties over the generated tokens: `presence` once for a token generated at
    /// all, `frequency` times how often.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub counts: Vec<(u32, u32)>,
}

impl Adjust {
    /// What `params` change at the next draw of a sequence that generated `output` (with
    /// `history` of it), for a model whose end-of-sequence tokens are `eos`. `None` when
    /// nothing changes, so plain requests pay nothing.
    pub fn next(
        params: &SamplingParams,
        history: &History,
        output: &[u32],
        eos: &[u32],
    ) -> Option<Adjust> {
        let mut banned = Vec::new();
        for word in &params.bad_word_ids {
            if let Some((last, prefix)) = word.split_last() {
                if output.ends_with(prefix) {
                    banned.push(*last);
                }
            }
        }
        if output.len() < params.min_tokens {
            if !params.ignore_eos {
                banned.extend_from_slice(eos);
            }
            banned.extend_from_slice(&params.stop_token_ids);
        }
        let adjust = Adjust {
            bias: params.logit_bias.clone(),
            repetition_penalty: params.repetition_penalty,
            seen: history.seen.iter().copied().collect(),
            banned,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            counts: history.counts.iter().map(|(t, n)| (*t, *n)).collect(),
        };
        (!adjust.is_noop()).then_some(adjust)
    }

    fn is_noop(&self) -> bool {
        self.bias.is_empty()
            && (self.repetition_penalty == 1.0 || self.seen.is_empty())
            && self.banned.is_empty()
            && ((self.presence_penalty == 0.0 && self.frequency_penalty == 0.0)
                || self.counts.is_empty())
    }

    /// Applies the changes to a row of logits, in Hugging Face's order. Token ids past the row
    /// are skipped (the worker refuses them before they get here).
    pub fn apply(&self, logits: &mut [f32]) {
        let n = logits.len();
        for &(t, b) in &self.bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if self.repetition_penalty != 1.0 {
            let p = self.repetition_penalty;
            for &t in self.seen.iter().filter(|t| (**t as usize) < n) {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
        for &t in self.banned.iter().filter(|t| (**t as usize) < n) {
            logits[t as usize] = f32::NEG_INFINITY;
        }
        for &(t, c) in self.counts.iter().filter(|(t, _)| (*t as usize) < n) {
            let l = &mut logits[t as usize];
            *l -= self.presence_penalty + self.frequency_penalty * c as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(params: &SamplingParams, prompt: &[u32], output: &[u32]) -> History {
        let mut h = History::new(params, prompt);
        for t in output {
            h.push(*t);
        }
        h
    }

    fn adjusted(params: &SamplingParams, prompt: &[u32], output: &[u32], row: &[f32]) -> Vec<f32> {
        let h = history(params, prompt, output);
        let mut row = row.to_vec();
        if let Some(a) = Adjust::next(params, &h, output, &[2]) {
            a.apply(&mut row);
        }
        row
    }

    #[test]
    fn plain_requests_change_nothing_and_keep_nothing() {
        let p = SamplingParams::default();
        let h = history(&p, &[1, 2, 3], &[4, 4]);
        assert!(h.counts.is_empty() && h.seen.is_empty());
        assert_eq!(Adjust::next(&p, &h, &[4, 4], &[2]), None);
    }

    #[test]
    fn presence_and_frequency_count_only_generated_tokens() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        // Token 1 is only in the prompt; 3 was generated twice, 4 once.
        let row = adjusted(&p, &[1], &[3, 4, 3], &[1.0; 6]);
        assert_eq!(row, [1.0, 1.0, 1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0]);
        // Negative values reward repetition, as OpenAI allows.
        let p = SamplingParams {
            presence_penalty: -1.0,
            ..Default::default()
        };
        assert_eq!(adjusted(&p, &[], &[0], &[0.0, 0.0])[0], 1.0);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let row = adjusted(&p, &[0, 1], &[2], &[4.0, -4.0, 0.0, 4.0]);
        assert_eq!(row, [2.0, -8.0, 0.0, 4.0]);
        // Once per token however often it appears.
        let row = adjusted(&p, &[0, 0], &[0, 0], &[4.0]);
        assert_eq!(row, [2.0]);
    }

    #[test]
    fn logit_bias_adds() {
        let p = SamplingParams {
            logit_bias: vec![(1, 100.0), (2, -100.0)],
            ..Default::default()
        };
        assert_eq!(
            adjusted(&p, &[0], &[], &[1.0, 1.0, 1.0]),
            [1.0, 101.0, -99.0]
        );
    }

    #[test]
    fn bad_words_ban_their_last_token_where_the_output_ends_with_the_rest() {
        let p = SamplingParams {
            bad_word_ids: vec![vec![5], vec![1, 2, 3]],
            ..Default::default()
        };
        let row = [0.0; 6];
        let banned = |output: &[u32]| -> Vec<usize> {
            adjusted(&p, &[1, 2], output, &row)
                .iter()
                .enumerate()
                .filter(|(_, l)| **l == f32::NEG_INFINITY)
                .map(|(i, _)| i)
                .collect()
        };
        // A one-token bad word is always banned; a longer one after its prefix only, and the
        // prompt does not count (vLLM's rule).
        assert_eq!(banned(&[]), [5]);
        assert_eq!(banned(&[1]), [5]);
        assert_eq!(banned(&[0, 1, 2]), [3, 5]);
        assert_eq!(banned(&[1, 2, 4]), [5]);
    }

    #[test]
    fn min_tokens_bans_eos_and_stop_tokens_until_reached() {
        let p = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![4],
            ..Default::default()
        };
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            adjusted(&p, &[0], &[], &[0.0; 5]),
            [0.0, 0.0, inf, 0.0, inf]
        );
        assert_eq!(
            adjusted(&p, &[0], &[1], &[0.0; 5]),
            [0.0, 0.0, inf, 0.0, inf]
        );
        assert_eq!(adjusted(&p, &[0], &[1, 1], &[0.0; 5]), [0.0; 5]);
        // With ignore_eos, EOS is not a stop; stop tokens still are.
        let p = SamplingParams {
            ignore_eos: true,
            ..p
        };
        assert_eq!(
            adjusted(&p, &[0], &[], &[0.0; 5]),
            [0.0, 0.0, 0.0, 0.0, inf]
        );
    }

    #[test]
    fn the_order_is_hugging_faces() {
        // Bias first, then repetition: a bias that makes a logit positive is then divided.
        let p = SamplingParams {
            logit_bias: vec![(0, 3.0)],
            repetition_penalty: 2.0,
            presence_penalty: 1.0,
            ..Default::default()
        };
        // -1 + 3 = 2, / 2 = 1, then the presence penalty: 0.
        assert_eq!(adjusted(&p, &[], &[0], &[-1.0]), [0.0]);
    }
}
