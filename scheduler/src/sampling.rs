//! Choosing the next token from logits: greedy, or temperature with top-k and top-p under a
//! seeded generator; and the log-probabilities reported with it. Logprobs are always those of
//! the model's own distribution (log-softmax of the raw logits, before temperature), as vLLM
//! reports them by default.

use serde::Serialize;
use switchyard_model::rng::Rng;

use crate::request::SamplingParams;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// A token with its logprob and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

/// Log-softmax in f64 accumulation, so logprobs do not depend on summation order.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|l| l - log_sum).collect()
}

/// The logprob of `token` at this position with the `n` most likely alternatives.
pub fn token_logprob(logprobs: &[f32], token: u32, n: usize) -> TokenLogprob {
    TokenLogprob {
        token_id: token,
        logprob: logprobs[token as usize],
        top: top_n(logprobs, n)
            .into_iter()
            .map(|(token_id, logprob)| TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// The `n` largest entries, highest first (ties to the lower id).
fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    // `n` is what a message asked for: never more room than there are values.
    let n = n.min(values.len());
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, &v) in values.iter().enumerate() {
        if best.len() == n && v <= best[n - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(n);
    }
    best
}

/// Index of the largest logit (the lowest id among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    top_n(logits, 1).first().map_or(0, |t| t.0)
}

/// Everything needed to draw one token. It carries the draw's own index, so a token comes out
/// the same wherever it is drawn: in the one-process engine, on whichever worker is a lane's
/// last stage, or again after the sequence was preempted and recomputed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    /// How many tokens the sequence generated before this one.
    pub index: u64,
}

/// The request's seed, or a fresh one when it gave none.
pub fn seed_of(params: &SamplingParams) -> u64 {
    params.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (std::process::id() as u64).rotate_left(32)
    })
}

impl Draw {
    pub fn new(params: &SamplingParams, seed: u64, index: u64) -> Self {
        Draw {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            seed,
            index,
        }
    }

    pub fn sample(&self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates: the top-k (or all), highest first.
        let k = if self.top_k == 0 {
            logits.len()
        } else {
            self.top_k.min(logits.len())
        };
        let mut cand: Vec<(u32, f32)> = if k < logits.len() {
            top_n(logits, k)
        } else {
            let mut all: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, *l))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all
        };
        let max = cand[0].1;
        // Every token banned (a request's bad words can do that): the lowest id, as greedy.
        if max == f32::NEG_INFINITY {
            return cand[0].0;
        }
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|(_, l)| (((l - max) / self.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        // Top-p: the smallest prefix whose probability reaches p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p / total;
            if cum >= self.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        probs.truncate(keep);
        let kept: f64 = probs.iter().sum();
        let mut rng = Rng::for_stream(self.seed, &format!("token {}", self.index));
        let mut u = rng.uniform() * kept;
        for ((id, _), p) in cand.iter().zip(&probs) {
            if u < *p {
                return *id;
            }
            u -= p;
        }
        cand[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_and_logprobs() {
        let logits = [1.0, 3.0, 3.0, -2.0];
        assert_eq!(argmax(&logits), 1);
        let lp = log_softmax(&logits);
        let total: f64 = lp.iter().map(|l| (*l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let t = token_logprob(&lp, 0, 2);
        assert_eq!(
            t.top.iter().map(|t| t.token_id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(t.logprob, lp[0]);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_filters() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let draw = |p: &SamplingParams| {
            (0..200)
                .map(|i| Draw::new(p, p.seed.unwrap(), i).sample(&logits))
                .collect::<Vec<_>>()
        };
        let p = params(1.0, 0, 1.0, 42);
        assert_eq!(draw(&p), draw(&p));
        assert_ne!(draw(&p), draw(&params(1.0, 0, 1.0, 43)));
        // top-k = 3: only the three largest logits ever come out.
        let top3: Vec<u32> = top_n(&logits, 3).into_iter().map(|t| t.0).collect();
        assert!(draw(&params(1.0, 3, 1.0, 1))
            .iter()
            .all(|t| top3.contains(t)));
        // A tiny top-p keeps only the most likely token.
        assert!(draw(&params(1.0, 0, 1e-6, 1))
            .iter()
            .all(|t| *t == argmax(&logits)));
        // Temperature 1 over several tokens does explore.
        let distinct: std::collections::BTreeSet<u32> = draw(&p).into_iter().collect();
        assert!(distinct.len() > 5);
    }
}
