//! Accounting of the paged KV cache: a pool of fixed-size blocks and one block table per
//! sequence (vLLM's block manager). The memory itself belongs to the backend; this type only
//! decides which block holds which tokens. For sliding-window models, blocks that fall wholly
//! outside the window go back to the pool, so a sequence's KV memory stays bounded: Mistral's
//! rolling buffer, paged.

use std::collections::HashMap;

/// A block-table entry whose block has slid out of the window and was returned to the pool.
pub const FREED: u32 = u32::MAX;

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache full: sequence {seq} needs {needed} more blocks, {free} free")]
    OutOfBlocks {
        seq: SeqId,
        needed: usize,
        free: usize,
    },
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    free: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize, window: Option<usize>) -> Self {
        BlockAllocator {
            block_size,
            num_blocks,
            window,
            // Reversed so blocks are handed out from 0 upwards.
            free: (0..num_blocks as u32).rev().collect(),
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks in use, 0..=1.
    pub fn usage(&self) -> f64 {
        1.0 - self.free.len() as f64 / self.num_blocks.max(1) as f64
    }

    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Blocks still needed so that positions `start .. end` can be written, after releasing
    /// what a query at `start` can no longer see.
    pub fn blocks_needed(&self, seq: SeqId, start: usize, end: usize) -> usize {
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        let first_live = self.first_live_block(start);
        // Logical blocks [have, need) are new; with a window those below first_live never are.
        let need = end.div_ceil(self.block_size);
        need.saturating_sub(have.max(first_live))
    }

    /// Makes room for positions `start .. end` of `seq`: frees blocks that slid out of the
    /// window of a query at `start`, then allocates the missing blocks. All or nothing.
    pub fn allocate(&mut self, seq: SeqId, start: usize, end: usize) -> Result<(), KvError> {
        self.release_outside_window(seq, start);
        let needed = self.blocks_needed(seq, start, end);
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                seq,
                needed,
                free: self.free.len(),
            });
        }
        let first_live = self.first_live_block(start);
        let table = self.tables.entry(seq).or_default();
        let need = end.div_ceil(self.block_size);
        while table.len() < need {
            let block = if table.len() < first_live {
                FREED
            } else {
                self.free.pop().expect("counted above")
            };
            table.push(block);
        }
        Ok(())
    }

    /// Returns to the pool every block of `seq` that lies wholly before what a query at `pos`
    /// can see.
    pub fn release_outside_window(&mut self, seq: SeqId, pos: usize) {
        let first_live = self.first_live_block(pos);
        if let Some(table) = self.tables.get_mut(&seq) {
            for b in table.iter_mut().take(first_live) {
                if *b != FREED {
                    self.free.push(*b);
                    *b = FREED;
                }
            }
        }
    }

    /// Frees all blocks of a finished, cancelled or preempted sequence.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            self.free.extend(table.into_iter().filter(|b| *b != FREED));
        }
    }

    /// Blocks a sequence holds right now.
    pub fn held(&self, seq: SeqId) -> usize {
        self.table(seq).iter().filter(|b| **b != FREED).count()
    }

    fn first_live_block(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w) / self.block_size,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_and_frees() {
        let mut a = BlockAllocator::new(4, 16, None);
        a.allocate(1, 0, 20).unwrap();
        assert_eq!(a.table(1), &[0, 1]);
        a.allocate(1, 20, 33).unwrap();
        assert_eq!(a.table(1), &[0, 1, 2]);
        assert_eq!(
            a.allocate(2, 0, 40),
            Err(KvError::OutOfBlocks {
                seq: 2,
                needed: 3,
                free: 1
            })
        );
        assert!(
            a.table(2).is_empty(),
            "failed allocation leaves nothing behind"
        );
        a.free(1);
        assert_eq!(a.num_free(), 4);
        a.allocate(2, 0, 40).unwrap();
        assert_eq!(a.held(2), 3);
    }

    #[test]
    fn sliding_window_bounds_memory() {
        // Window 8, blocks of 4: a query at p sees p-7..=p, so at most 3 blocks are live.
        let mut a = BlockAllocator::new(4, 4, Some(8));
        a.allocate(7, 0, 10).unwrap(); // positions 0..10 (a prefill chunk of 10)
        assert_eq!(a.held(7), 3);
        for pos in 10..200 {
            a.allocate(7, pos, pos + 1).unwrap();
            let first_visible = (pos + 1).saturating_sub(8);
            let table = a.table(7);
            // Every block a query at `pos` can see is still there…
            for p in first_visible..=pos {
                assert_ne!(table[p / 4], FREED, "pos {pos} needs {p}");
            }
            // …and the sequence never holds more than the window needs.
            assert!(a.held(7) <= 3, "pos {pos}: {table:?}");
        }
        a.free(7);
        assert_eq!(a.num_free(), 4);
    }

    #[test]
    fn window_skips_blocks_a_chunk_never_sees() {
        let mut a = BlockAllocator::new(8, 4, Some(4));
        // Logical blocks below the window of the chunk's first query are never allocated.
        a.allocate(1, 0, 4).unwrap();
        a.allocate(1, 16, 20).unwrap();
        assert_eq!(a.table(1)[..3], [FREED, FREED, FREED]);
        assert_eq!(a.held(1), 2);
    }
}
