//! What runs when. A [`Scheduler`] takes [`Request`]s, plans each step of continuous batching
//! (prefill chunks and decode tokens under a token budget, preemption when KV blocks run out),
//! accounts for the paged KV cache's blocks ([`kv_blocks`]) and turns each step's results into
//! client [`Update`]s: sampled tokens, logprobs, incremental text and stop strings.
//!
//! It never touches a tensor: the model runs where the scheduler's [`step::SeqWork`] is sent
//! (the one-process engine in `switchyard-worker`, or a lane of workers driven by the
//! coordinator), and only [`step::sample_step`] (the last stage's draw from logits) runs there.

pub mod completion;
pub mod kv_blocks;
pub mod processors;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod step;
pub mod validate;

pub use completion::Completion;
pub use request::{Request, SamplingParams};
pub use scheduler::{Detached, FinishReason, Scheduler, SchedulerConfig, Update, Usage};
pub use validate::{Invalid, PromptInput, ValidRequest, Validator};
