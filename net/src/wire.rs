//! Conversions between the worker's types and their `switchyard.v1` messages.

use switchyard_proto::v1 as pb;

use switchyard_scheduler::processors::Adjust;
use switchyard_scheduler::sampling::{Draw, TokenLogprob, TopLogprob};
use switchyard_scheduler::step::{LogitsWanted, SeqInput, SeqResult, SeqWork};
use switchyard_scheduler::validate::DEFAULT_MAX_TOKENS;
use switchyard_scheduler::{FinishReason, SamplingParams, Update, Usage};

/// A message that does not say what it must: which field, and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct Malformed(pub String);

pub fn tensor(data: &[f32], rows: usize, cols: usize) -> pb::Tensor {
    pb::Tensor {
        rows: rows as u32,
        cols: cols as u32,
        data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The data of `t` as f32, with its shape.
pub fn from_tensor(t: &pb::Tensor) -> Result<(Vec<f32>, usize, usize), Malformed> {
    let (rows, cols) = (t.rows as usize, t.cols as usize);
    if t.data.len() != rows * cols * 4 {
        return Err(Malformed(format!(
            "tensor of [{rows}, {cols}] f32 carries {} bytes, expected {}",
            t.data.len(),
            rows * cols * 4
        )));
    }
    let data = t
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((data, rows, cols))
}

pub fn token_logprob(t: &TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: t.token_id,
        logprob: t.logprob,
        top: t
            .top
            .iter()
            .map(|a| pb::TopLogprob {
                token_id: a.token_id,
                logprob: a.logprob,
            })
            .collect(),
    }
}

pub fn from_token_logprob(t: &pb::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        token_id: t.token_id,
        logprob: t.logprob,
        top: t
            .top
            .iter()
            .map(|a| TopLogprob {
                token_id: a.token_id,
                logprob: a.logprob,
            })
            .collect(),
    }
}

pub fn seq_work(w: &SeqWork) -> pb::SeqWork {
    pb::SeqWork {
        seq_id: w.id,
        tokens: w.input.tokens.clone(),
        start_pos: w.input.start_pos as u32,
        block_table: w.input.block_table.clone(),
        logits: match w.input.logits {
            LogitsWanted::None => pb::LogitsWanted::LogitsNone,
            LogitsWanted::Last => pb::LogitsWanted::LogitsLast,
            LogitsWanted::All => pb::LogitsWanted::LogitsAll,
        } as i32,
        prompt_targets: w
            .prompt_targets
            .as_ref()
            .map_or(Vec::new(), |(t, _)| t.clone()),
        prompt_logprobs: w.prompt_targets.as_ref().map(|(_, n)| *n as u32),
        draw: w.draw.map(|d| pb::Draw {
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k as u32,
            seed: d.seed,
            index: d.index,
        }),
        adjust: w.adjust.as_ref().map(adjust),
        logprobs: w.logprobs.map(|n| n as u32),
    }
}

fn adjust(a: &Adjust) -> pb::LogitsAdjust {
    pb::LogitsAdjust {
        bias_tokens: a.bias.iter().map(|(t, _)| *t).collect(),
        bias_values: a.bias.iter().map(|(_, b)| *b).collect(),
        repetition_penalty: a.repetition_penalty,
        seen: a.seen.clone(),
        banned: a.banned.clone(),
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        count_tokens: a.counts.iter().map(|(t, _)| *t).collect(),
        counts: a.counts.iter().map(|(_, n)| *n).collect(),
    }
}

/// The inverse of [`adjust`]; the worker has checked the lists' lengths and ids.
fn from_adjust(a: &pb::LogitsAdjust) -> Adjust {
    Adjust {
        bias: a
            .bias_tokens
            .iter()
            .copied()
            .zip(a.bias_values.iter().copied())
            .collect(),
        repetition_penalty: if a.repetition_penalty == 0.0 {
            1.0
        } else {
            a.repetition_penalty
        },
        seen: a.seen.clone(),
        banned: a.banned.clone(),
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        counts: a
            .count_tokens
            .iter()
            .copied()
            .zip(a.counts.iter().copied())
            .collect(),
    }
}

pub fn from_seq_work(w: &pb::SeqWork) -> Result<SeqWork, Malformed> {
    if w.tokens.is_empty() {
        return Err(Malformed(format!("sequence {} has no tokens", w.seq_id)));
    }
    let logits = match pb::LogitsWanted::try_from(w.logits) {
        Ok(pb::LogitsWanted::LogitsNone) => LogitsWanted::None,
        Ok(pb::LogitsWanted::LogitsLast) => LogitsWanted::Last,
        Ok(pb::LogitsWanted::LogitsAll) => LogitsWanted::All,
        Err(_) => return Err(Malformed(format!("logits = {}", w.logits))),
    };
    Ok(SeqWork {
        id: w.seq_id,
        input: SeqInput {
            tokens: w.tokens.clone(),
            start_pos: w.start_pos as usize,
            block_table: w.block_table.clone(),
            logits,
        },
        prompt_targets: w
            .prompt_logprobs
            .map(|n| (w.prompt_targets.clone(), n as usize)),
        draw: w.draw.map(|d| Draw {
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k as usize,
            seed: d.seed,
            index: d.index,
        }),
        adjust: w.adjust.as_ref().map(from_adjust),
        logprobs: w.logprobs.map(|n| n as usize),
    })
}

pub fn seq_result(r: &SeqResult) -> pb::SeqResult {
    pb::SeqResult {
        prompt_logprobs: r.prompt_logprobs.iter().map(token_logprob).collect(),
        token: r.token,
        logprob: r.logprob.as_ref().map(token_logprob),
    }
}

pub fn from_seq_result(r: &pb::SeqResult) -> SeqResult {
    SeqResult {
        prompt_logprobs: r.prompt_logprobs.iter().map(from_token_logprob).collect(),
        token: r.token,
        logprob: r.logprob.as_ref().map(from_token_logprob),
    }
}

/// One update of a request as the `Inference` API streams it.
pub fn generate_response(request_id: &str, u: Update) -> pb::GenerateResponse {
    let (finish_reason, usage) = match u.finish {
        Some((reason, usage)) => (
            reason.as_str().to_string(),
            Some(pb::Usage {
                prompt_tokens: usage.prompt_tokens as u32,
                completion_tokens: usage.completion_tokens as u32,
                cached_tokens: usage.cached_tokens as u32,
            }),
        ),
        None => (String::new(), None),
    };
    pb::GenerateResponse {
        request_id: request_id.to_string(),
        token_ids: u.token_ids,
        text: u.text,
        logprobs: u.logprobs.iter().map(token_logprob).collect(),
        prompt_logprobs: u
            .prompt_logprobs
            .unwrap_or_default()
            .iter()
            .map(|p| pb::PromptLogprob {
                logprob: p.as_ref().map(token_logprob),
            })
            .collect(),
        finish_reason,
        usage,
    }
}

/// The inverse of [`generate_response`]: what a client of the `Inference` API got, as the
/// update it was made from (without the sequence id, which stays on the server).
pub fn update(m: pb::GenerateResponse) -> Update {
    let finish = FinishReason::parse(&m.finish_reason).map(|reason| {
        let usage = m.usage.unwrap_or_default();
        let usage = Usage {
            prompt_tokens: usage.prompt_tokens as usize,
            completion_tokens: usage.completion_tokens as usize,
            cached_tokens: usage.cached_tokens as usize,
        };
        (reason, usage)
    });
    let prompt_logprobs = (!m.prompt_logprobs.is_empty()).then(|| {
        m.prompt_logprobs
            .iter()
            .map(|p| p.logprob.as_ref().map(from_token_logprob))
            .collect()
    });
    Update {
        id: 0,
        token_ids: m.token_ids,
        logprobs: m.logprobs.iter().map(from_token_logprob).collect(),
        text: m.text,
        prompt_logprobs,
        finish,
    }
}

/// The sampling fields of a client's request, with the defaults filled in.
pub fn sampling_params(r: &pb::GenerateRequest) -> SamplingParams {
    SamplingParams {
        temperature: r.temperature,
        top_p: r.top_p.unwrap_or(1.0),
        top_k: r.top_k as usize,
        seed: r.seed,
        max_tokens: r.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
        stop: r.stop.clone(),
        logprobs: r.logprobs.map(|n| n as usize),
        prompt_logprobs: r.prompt_logprobs.map(|n| n as usize),
        ignore_eos: r.ignore_eos,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        repetition_penalty: r.repetition_penalty.unwrap_or(1.0),
        // By token: the same request always makes the same steps.
        logit_bias: r
            .logit_bias
            .iter()
            .map(|(t, b)| (*t, *b))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect(),
        min_tokens: r.min_tokens as usize,
        stop_token_ids: r.stop_token_ids.clone(),
        bad_words: r.bad_words.clone(),
        bad_word_ids: r.bad_word_ids.iter().map(|w| w.ids.clone()).collect(),
    }
}

/// A request with `p` as its sampling fields and no input yet.
pub fn sampling_request(p: SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        max_tokens: Some(p.max_tokens as u32),
        temperature: p.temperature,
        top_p: Some(p.top_p),
        top_k: p.top_k as u32,
        seed: p.seed,
        stop: p.stop,
        logprobs: p.logprobs.map(|n| n as u32),
        prompt_logprobs: p.prompt_logprobs.map(|n| n as u32),
        ignore_eos: p.ignore_eos,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: Some(p.repetition_penalty),
        logit_bias: p.logit_bias.into_iter().collect(),
        min_tokens: p.min_tokens as u32,
        stop_token_ids: p.stop_token_ids,
        bad_words: p.bad_words,
        bad_word_ids: p
            .bad_word_ids
            .into_iter()
            .map(|ids| pb::TokenIds { ids })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steps_logits_changes_survive_the_wire() {
        let a = Adjust {
            bias: vec![(1, 2.0)],
            repetition_penalty: 1.5,
            seen: vec![1, 4],
            banned: vec![2],
            presence_penalty: 0.5,
            frequency_penalty: 0.1,
            counts: vec![(4, 3)],
        };
        assert_eq!(from_adjust(&adjust(&a)), a);
        // An unset penalty on the wire is off.
        assert_eq!(
            from_adjust(&pb::LogitsAdjust::default()).repetition_penalty,
            1.0
        );
    }

    #[test]
    fn a_generate_response_becomes_the_update_it_was_made_from() {
        let u = update(pb::GenerateResponse {
            request_id: "r".into(),
            token_ids: vec![5, 6],
            text: "hi".into(),
            finish_reason: "length".into(),
            usage: Some(pb::Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 1,
            }),
            ..Default::default()
        });
        assert_eq!(u.token_ids, vec![5, 6]);
        assert_eq!(u.text, "hi");
        assert_eq!(u.prompt_logprobs, None);
        assert_eq!(
            u.finish,
            Some((
                FinishReason::Length,
                Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    cached_tokens: 1,
                }
            ))
        );
    }

    #[test]
    fn sampling_fields_survive_the_wire_and_absent_ones_get_the_defaults() {
        let p = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            seed: Some(7),
            max_tokens: 123,
            stop: vec!["\n\n".into()],
            logprobs: Some(3),
            prompt_logprobs: Some(0),
            ignore_eos: true,
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            repetition_penalty: 1.3,
            logit_bias: vec![(3, -100.0), (9, 2.5)],
            min_tokens: 4,
            stop_token_ids: vec![7, 8],
            bad_words: vec!["no".into()],
            bad_word_ids: vec![vec![1, 2], vec![5]],
        };
        assert_eq!(sampling_params(&sampling_request(p.clone())), p);
        let empty = sampling_params(&pb::GenerateRequest::default());
        assert_eq!(empty.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(empty.top_p, 1.0);
        assert_eq!((empty.logprobs, empty.prompt_logprobs), (None, None));
        assert_eq!(empty.repetition_penalty, 1.0);
        assert_eq!(
            empty,
            SamplingParams {
                max_tokens: DEFAULT_MAX_TOKENS,
                ..Default::default()
            }
        );
    }
}
