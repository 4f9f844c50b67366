//! What a client asks for, once its prompt is token ids: the prompt and how to sample.

use crate::kv_blocks::SeqId;

#[derive(Debug, Clone)]
pub struct Request {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Alternatives to report with each generated token; `None` = no logprobs.
    pub logprobs: Option<usize>,
    /// Alternatives to report with each prompt token; `None` = no prompt logprobs.
    pub prompt_logprobs: Option<usize>,
    /// Keep generating past the end-of-sequence token (fixed output lengths for benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            ignore_eos: false,
        }
    }
}
