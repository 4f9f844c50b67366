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
    /// OpenAI's penalties over generated tokens (0 = off; -2 to 2): a token's logit loses
    /// `presence_penalty` once it was generated and `frequency_penalty` per time.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face's penalty over prompt and generated tokens (1 = off; > 0): a positive logit
    /// is divided by it, any other multiplied.
    pub repetition_penalty: f32,
    /// OpenAI's `logit_bias`: added to each token's logit (-100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    /// EOS and `stop_token_ids` cannot be drawn before this many tokens were generated.
    pub min_tokens: usize,
    /// Tokens that end the generation as EOS does (vLLM's `stop_token_ids`).
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `bad_words` as text: each becomes token sequences when the request is checked
    /// ([`crate::Validator::resolve`]), which join `bad_word_ids`.
    pub bad_words: Vec<String>,
    /// Token sequences that must not be generated: the last token of one is banned wherever
    /// the output ends with the rest of it.
    pub bad_word_ids: Vec<Vec<u32>>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            bad_words: Vec::new(),
            bad_word_ids: Vec::new(),
        }
    }
}
