//! A whole generation gathered from its stream of [`Update`]s: what the one-process engine
//! returns and what a client of the gRPC API assembles (`switchyard generate --json` prints it).

use serde::Serialize;

use crate::kv_blocks::SeqId;
use crate::sampling::TokenLogprob;
use crate::scheduler::{FinishReason, Update, Usage};

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

impl Completion {
    /// An empty completion of request `id`, with a logprob list if they were asked for.
    pub fn new(id: SeqId, logprobs: bool) -> Self {
        Completion {
            id,
            token_ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            logprobs: logprobs.then(Vec::new),
            prompt_logprobs: None,
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
            },
        }
    }

    /// Adds what one step brought.
    pub fn extend(&mut self, u: Update) {
        self.token_ids.extend(u.token_ids);
        if let Some(l) = &mut self.logprobs {
            l.extend(u.logprobs);
        }
        self.text.push_str(&u.text);
        if u.prompt_logprobs.is_some() {
            self.prompt_logprobs = u.prompt_logprobs;
        }
        if let Some((reason, usage)) = u.finish {
            self.finish_reason = reason;
            self.usage = usage;
        }
    }
}
