//! The attention view of a step: which rows of the flattened batch belong to which sequence,
//! where their keys are in the paged KV cache, and which keys each query sees.

use std::ops::Range;

use switchyard_scheduler::step::SeqInput;

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
