//! What every `Worker` RPC must satisfy before the worker acts on it. Anyone who reaches the
//! worker's port can send any message, so each field is checked against the model, the part
//! held and the hardware before anything is allocated, dropped or indexed: sizes with checked
//! arithmetic, counts against the model, indices against the batch and the KV cache. A refusal
//! names the field, what it was and what was expected.
//!
//! The checks are pure functions of the message and [`PartLimits`], so they are fuzzed
//! (`fuzz/fuzz_targets/worker_rpc.rs`) without a model or a socket.

use std::collections::HashSet;
use std::ops::Range;

use switchyard_model::ModelConfig;
use switchyard_proto::v1 as pb;
use switchyard_scheduler::kv_blocks::FREED;
use switchyard_scheduler::validate::MAX_LOGPROBS;

/// The most tokens one KV block may hold. The scheduler's blocks hold tens of tokens; a block
/// larger than this is a mistake, and one of 0 tokens means nothing.
pub const MAX_BLOCK_SIZE: u32 = 1024;

/// Messages that are not steps or exchanges (assignments, inventory, release, stats) are small:
/// an assignment is a path, a few numbers and one address per peer.
pub const CONTROL_MESSAGE_BYTES: usize = 1 << 20;

/// A message the worker refuses (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(m: String) -> Result<T, Refused> {
    Err(Refused(m))
}

/// What the part a worker holds allows: the model's sizes and the part's layers and KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct PartLimits {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_positions: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub layers: Range<usize>,
    /// Stage 0 embeds token ids; the others take hidden states.
    pub embedding: bool,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub window: Option<usize>,
}

impl PartLimits {
    /// The limits of `a` (already passed [`check_assignment`]) for the model `c`.
    pub fn new(c: &ModelConfig, a: &pb::Assignment) -> Self {
        PartLimits {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_positions: c.max_position_embeddings,
            num_experts: c.moe.map_or(0, |m| m.num_experts),
            top_k: c.moe.map_or(0, |m| m.top_k),
            layers: a.layer_start as usize..a.layer_end as usize,
            embedding: a.embedding,
            kv_blocks: a.kv_blocks as usize,
            block_size: a.block_size as usize,
            window: c.sliding_window,
        }
    }

    /// The most tokens one step can carry: every one of them needs a slot in the KV cache.
    pub fn max_step_tokens(&self) -> usize {
        self.kv_blocks.saturating_mul(self.block_size)
    }

    /// The largest `Step` or `RunExperts` message a coordinator or peer sends for this part:
    /// hidden states of a full step, and per token its id, prompt target, routes and one
    /// block-table entry per block of the context, at their longest encodings, plus slack for
    /// the envelope. Larger messages are refused before they are read.
    pub fn max_message_bytes(&self) -> usize {
        let tokens = self.max_step_tokens();
        let per_token = 4 * self.hidden_size + 2 * 5 + self.top_k * (5 + 4) + 16;
        let tables = self.max_positions.div_ceil(self.block_size.max(1)) * 5;
        tokens
            .saturating_mul(per_token.saturating_add(tables))
            .saturating_add(CONTROL_MESSAGE_BYTES)
    }
}

/// Checks an assignment against the model it names; returns the bytes its KV cache needs
/// (`value_bytes` per stored value), for the caller to compare with the device's memory.
pub fn check_assignment(
    a: &pb::Assignment,
    c: &ModelConfig,
    value_bytes: u64,
) -> Result<u64, Refused> {
    let layers = a.layer_start as usize..a.layer_end as usize;
    if layers.is_empty() || layers.end > c.num_layers {
        return refuse(format!(
            "layers {layers:?}: expected a non-empty range within 0..{}",
            c.num_layers
        ));
    }
    if a.block_size == 0 || a.block_size > MAX_BLOCK_SIZE {
        return refuse(format!(
            "block_size is {}; expected 1 to {MAX_BLOCK_SIZE} tokens",
            a.block_size
        ));
    }
    if a.kv_blocks == 0 {
        return refuse("kv_blocks is 0; expected at least one KV block".into());
    }
    let kv_bytes = [
        2,
        layers.len() as u64,
        a.kv_blocks as u64,
        a.block_size as u64,
        c.kv_dim() as u64,
        value_bytes,
    ]
    .into_iter()
    .try_fold(1u64, u64::checked_mul);
    let Some(kv_bytes) = kv_bytes else {
        return refuse(format!(
            "kv_blocks {} of {} tokens over {} layers: the KV cache size overflows",
            a.kv_blocks,
            a.block_size,
            layers.len()
        ));
    };
    match c.moe {
        Some(moe) => {
            if let Some(e) = a.experts.iter().find(|e| **e as usize >= moe.num_experts) {
                return refuse(format!(
                    "expert {e}: the model has {} experts",
                    moe.num_experts
                ));
            }
            if a.experts.iter().collect::<HashSet<_>>().len() != a.experts.len() {
                return refuse("experts lists an expert twice".into());
            }
            if a.stage_peers.len() > 1 {
                let peers = a.stage_peers.len();
                if a.shard as usize >= peers {
                    return refuse(format!("shard {} of a stage of {peers} workers", a.shard));
                }
                if a.expert_shard.len() != moe.num_experts {
                    return refuse(format!(
                        "expert_shard names {} shards; expected one per expert ({})",
                        a.expert_shard.len(),
                        moe.num_experts
                    ));
                }
                if let Some(s) = a.expert_shard.iter().find(|s| **s as usize >= peers) {
                    return refuse(format!(
                        "expert_shard holds shard {s}; the stage has {peers} workers"
                    ));
                }
            }
        }
        None if !a.experts.is_empty() => {
            return refuse("experts are listed but the model is dense".into());
        }
        None => {}
    }
    Ok(kv_bytes)
}

/// Checks a step against the part it runs on, before anything is embedded, attended or
/// sampled.
pub fn check_step(r: &pb::StepRequest, p: &PartLimits) -> Result<(), Refused> {
    if r.seqs.is_empty() {
        return refuse("a step with no sequences".into());
    }
    let mut total = 0usize;
    for s in &r.seqs {
        check_seq(s, p).map_err(|Refused(m)| Refused(format!("sequence {}: {m}", s.seq_id)))?;
        total += s.tokens.len();
    }
    if total > p.max_step_tokens() {
        return refuse(format!(
            "the step carries {total} tokens; this part's KV cache holds {} ({} blocks of {})",
            p.max_step_tokens(),
            p.kv_blocks,
            p.block_size
        ));
    }
    match (&r.hidden, p.embedding) {
        (None, true) => Ok(()),
        (Some(_), true) => refuse("hidden states sent to the stage that embeds tokens".into()),
        (None, false) => refuse("no hidden states: this stage does not embed tokens".into()),
        (Some(t), false) => check_tensor("hidden", t, total, p.hidden_size),
    }
}

fn check_seq(s: &pb::SeqWork, p: &PartLimits) -> Result<(), Refused> {
    if s.tokens.is_empty() {
        return refuse("no tokens".into());
    }
    if let Some(t) = s.tokens.iter().find(|t| **t as usize >= p.vocab_size) {
        return refuse(format!(
            "token id {t} is out of range; the vocabulary has {} tokens",
            p.vocab_size
        ));
    }
    let start = s.start_pos as usize;
    let end = start + s.tokens.len();
    if end > p.max_positions {
        return refuse(format!(
            "positions {start}..{end}; the model has {} positions",
            p.max_positions
        ));
    }
    // Every position a query reads or writes needs a block of this cache.
    let first = match p.window {
        Some(w) => (start + 1).saturating_sub(w),
        None => 0,
    };
    let needed = first / p.block_size..end.div_ceil(p.block_size);
    if s.block_table.len() < needed.end {
        return refuse(format!(
            "the block table has {} blocks; positions up to {end} need {}",
            s.block_table.len(),
            needed.end
        ));
    }
    // One block of slack: a scheduler may reserve the next block before it fills.
    let most = p.max_positions.div_ceil(p.block_size) + 1;
    if s.block_table.len() > most {
        return refuse(format!(
            "the block table has {} blocks; the model's {} positions need at most {most}",
            s.block_table.len(),
            p.max_positions,
        ));
    }
    for (i, &b) in s.block_table.iter().enumerate() {
        let live = needed.contains(&i);
        if (live || b != FREED) && b as usize >= p.kv_blocks {
            return refuse(format!(
                "block table entry {i} is block {b}; this part's KV cache has {} blocks",
                p.kv_blocks
            ));
        }
    }
    let logits = pb::LogitsWanted::try_from(s.logits)
        .map_err(|_| Refused(format!("logits is {}; expected 0, 1 or 2", s.logits)))?;
    for (name, n) in [
        ("logprobs", s.logprobs),
        ("prompt_logprobs", s.prompt_logprobs),
    ] {
        if let Some(n) = n.filter(|n| *n as usize > MAX_LOGPROBS) {
            return refuse(format!("{name} is {n}; expected at most {MAX_LOGPROBS}"));
        }
    }
    if !s.prompt_targets.is_empty() || s.prompt_logprobs.is_some() {
        if logits != pb::LogitsWanted::LogitsAll {
            return refuse("prompt_targets need logits = LOGITS_ALL".into());
        }
        if s.prompt_targets.len() > s.tokens.len() {
            return refuse(format!(
                "{} prompt_targets for a chunk of {} tokens",
                s.prompt_targets.len(),
                s.tokens.len()
            ));
        }
        if let Some(t) = s
            .prompt_targets
            .iter()
            .find(|t| **t as usize >= p.vocab_size)
        {
            return refuse(format!(
                "prompt target {t} is out of range; the vocabulary has {} tokens",
                p.vocab_size
            ));
        }
    }
    if let Some(d) = &s.draw {
        if logits == pb::LogitsWanted::LogitsNone {
            return refuse("a draw needs logits".into());
        }
        if !d.temperature.is_finite() || d.temperature < 0.0 {
            return refuse(format!(
                "temperature is {}; expected a number >= 0",
                d.temperature
            ));
        }
        // 0 comes with greedy draws (the field's default): only the top token is kept.
        if !(0.0..=1.0).contains(&d.top_p) {
            return refuse(format!("top_p is {}; expected 0 to 1", d.top_p));
        }
    }
    if let Some(a) = &s.adjust {
        check_adjust(a, s.draw.is_some(), p.vocab_size)?;
    }
    Ok(())
}

/// A draw's logits changes: paired lists of equal length, ids in the vocabulary, finite values.
fn check_adjust(a: &pb::LogitsAdjust, draws: bool, vocab: usize) -> Result<(), Refused> {
    if !draws {
        return refuse("adjust without a draw".into());
    }
    for (name, a, b) in [
        ("bias", a.bias_tokens.len(), a.bias_values.len()),
        ("count", a.count_tokens.len(), a.counts.len()),
    ] {
        if a != b {
            return refuse(format!(
                "{a} {name}_tokens but {b} values; expected as many"
            ));
        }
    }
    let ids = [&a.bias_tokens, &a.seen, &a.banned, &a.count_tokens];
    if let Some(t) = ids.into_iter().flatten().find(|t| **t as usize >= vocab) {
        return refuse(format!(
            "adjust names token {t}; the vocabulary has {vocab} tokens"
        ));
    }
    let values = [
        a.repetition_penalty,
        a.presence_penalty,
        a.frequency_penalty,
    ];
    if let Some(v) = values.iter().chain(&a.bias_values).find(|v| !v.is_finite()) {
        return refuse(format!("adjust holds {v}; expected finite numbers"));
    }
    if a.repetition_penalty < 0.0 {
        return refuse(format!(
            "repetition_penalty is {}; expected > 0 (0: off)",
            a.repetition_penalty
        ));
    }
    Ok(())
}

/// Checks an exchange call against the part that serves it.
pub fn check_expert_batch(b: &pb::ExpertBatch, p: &PartLimits) -> Result<(), Refused> {
    if p.num_experts == 0 {
        return refuse("this worker's model has no experts".into());
    }
    if !p.layers.contains(&(b.layer as usize)) {
        return refuse(format!(
            "layer {}: this worker holds layers {:?}",
            b.layer, p.layers
        ));
    }
    if b.top_k as usize != p.top_k {
        return refuse(format!(
            "top_k is {}; the model routes each token to {}",
            b.top_k, p.top_k
        ));
    }
    let x =
        b.x.as_ref()
            .ok_or_else(|| Refused("no activations".into()))?;
    let rows = x.rows as usize;
    if rows > p.max_step_tokens() {
        return refuse(format!(
            "{rows} tokens; a step of this part carries at most {}",
            p.max_step_tokens()
        ));
    }
    check_tensor("x", x, rows, p.hidden_size)?;
    if b.experts.len() != rows * p.top_k || b.weights.len() != rows * p.top_k {
        return refuse(format!(
            "{} experts and {} weights for {rows} tokens × top-{}",
            b.experts.len(),
            b.weights.len(),
            p.top_k
        ));
    }
    if let Some(e) = b.experts.iter().find(|e| **e as usize >= p.num_experts) {
        return refuse(format!(
            "expert {e}: the model has {} experts",
            p.num_experts
        ));
    }
    if let Some(w) = b.weights.iter().find(|w| !w.is_finite()) {
        return refuse(format!("router weight {w}; expected a finite number"));
    }
    Ok(())
}

fn check_tensor(name: &str, t: &pb::Tensor, rows: usize, cols: usize) -> Result<(), Refused> {
    if t.rows as usize != rows || t.cols as usize != cols {
        return refuse(format!(
            "{name} is [{}, {}]; expected [{rows}, {cols}]",
            t.rows, t.cols
        ));
    }
    if Some(t.data.len()) != rows.checked_mul(cols).and_then(|n| n.checked_mul(4)) {
        return refuse(format!(
            "{name} of [{rows}, {cols}] f32 carries {} bytes",
            t.data.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PartLimits {
        PartLimits {
            vocab_size: 100,
            hidden_size: 8,
            max_positions: 64,
            num_experts: 4,
            top_k: 2,
            layers: 0..2,
            embedding: true,
            kv_blocks: 4,
            block_size: 4,
            window: None,
        }
    }

    fn seq(tokens: Vec<u32>, table: Vec<u32>) -> pb::SeqWork {
        pb::SeqWork {
            tokens,
            block_table: table,
            logits: pb::LogitsWanted::LogitsLast as i32,
            ..Default::default()
        }
    }

    fn step(s: pb::SeqWork) -> pb::StepRequest {
        pb::StepRequest {
            seqs: vec![s],
            ..Default::default()
        }
    }

    fn refused(r: &pb::StepRequest) -> String {
        check_step(r, &limits()).unwrap_err().0
    }

    #[test]
    fn a_well_formed_step_passes() {
        check_step(&step(seq(vec![1, 2, 3, 4, 5], vec![0, 1])), &limits()).unwrap();
    }

    #[test]
    fn hostile_steps_are_refused_by_name() {
        let ok = seq(vec![1, 2], vec![0]);
        let huge = pb::SeqWork {
            logprobs: Some(u32::MAX),
            ..ok.clone()
        };
        assert!(refused(&step(huge)).contains("logprobs is 4294967295; expected at most 20"));
        let targets = pb::SeqWork {
            logits: pb::LogitsWanted::LogitsAll as i32,
            prompt_logprobs: Some(1),
            prompt_targets: vec![1, 2, 3],
            ..ok.clone()
        };
        assert!(refused(&step(targets)).contains("3 prompt_targets for a chunk of 2 tokens"));
        let far = seq(vec![1], vec![9]);
        assert!(refused(&step(far)).contains("block 9; this part's KV cache has 4 blocks"));
        let short = seq(vec![1; 5], vec![0]);
        assert!(refused(&step(short)).contains("need 2"));
        let many = pb::StepRequest {
            seqs: vec![seq(vec![1; 12], vec![0, 1, 2]); 2],
            ..Default::default()
        };
        assert!(refused(&many).contains("24 tokens; this part's KV cache holds 16"));
    }

    #[test]
    fn hostile_logits_changes_are_refused_by_name() {
        let with = |adjust: pb::LogitsAdjust| pb::SeqWork {
            draw: Some(pb::Draw::default()),
            adjust: Some(adjust),
            ..seq(vec![1, 2], vec![0])
        };
        check_step(&step(with(pb::LogitsAdjust::default())), &limits()).unwrap();
        let far = pb::LogitsAdjust {
            banned: vec![100],
            ..Default::default()
        };
        assert!(refused(&step(with(far))).contains("adjust names token 100"));
        let unpaired = pb::LogitsAdjust {
            bias_tokens: vec![1, 2],
            bias_values: vec![1.0],
            ..Default::default()
        };
        assert!(refused(&step(with(unpaired))).contains("2 bias_tokens but 1 values"));
        let nan = pb::LogitsAdjust {
            presence_penalty: f32::NAN,
            ..Default::default()
        };
        assert!(refused(&step(with(nan))).contains("expected finite numbers"));
        let alone = pb::SeqWork {
            draw: None,
            ..with(pb::LogitsAdjust::default())
        };
        assert!(refused(&step(alone)).contains("adjust without a draw"));
    }
}
