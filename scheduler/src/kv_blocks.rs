//! Accounting of the paged KV cache: a pool of fixed-size blocks and one block table per
//! sequence (vLLM's block manager). The memory itself belongs to the backend; this type only
//! decides which block holds which tokens. For sliding-window models, blocks that fall wholly
//! outside the window go back to the pool, so a sequence's KV memory stays bounded: Mistral's
//! rolling buffer, paged.
//!
//! With the prefix cache on ([`BlockAllocator::with_prefix_cache`], vLLM v1's automatic prefix
//! caching), every *full* block a sequence has computed is named by a hash chained over the
//! tokens of all blocks up to and including it, seeded with a salt for everything else its
//! K/V depend on (the placement epoch: the model and the lane's workers). A new sequence that
//! starts with the same blocks shares them instead of computing them again (blocks are
//! reference counted), and blocks whose sequences ended stay cached until the pool needs
//! them, least recently used first. Only full blocks are shared, and a full block is never
//! written again: a sequence's partial last block is its own.
//!
//! The sliding window does not reuse blocks: a position always maps to block
//! `table[pos / block_size]` (no modulo, no rolling buffer inside a sequence), and blocks
//! that slid out of the window are only *released* (a reference dropped), so a cached block's
//! contents stay those of its hash and sharing is safe. K/V at a position depend only on the
//! tokens up to it (the window included), which is exactly what the chain hashes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A block-table entry whose block has slid out of the window and was returned to the pool.
pub const FREED: u32 = u32::MAX;

pub type SeqId = u64;

/// Names a full block by its tokens and every token before it (and the salt).
pub type BlockHash = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache full: sequence {seq} needs {needed} more blocks, {free} free")]
    OutOfBlocks {
        seq: SeqId,
        needed: usize,
        free: usize,
    },
}

/// The hashes of the full blocks of `tokens`, chained from `salt`: what
/// [`BlockAllocator::acquire_cached`] looks up, and what a router compares with the blocks a
/// lane holds ([`CacheChange`]).
pub fn block_hashes(salt: u64, block_size: usize, tokens: &[u32]) -> Vec<BlockHash> {
    let mut parent = salt;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = chain(parent, block);
            parent
        })
        .collect()
}

fn chain(parent: BlockHash, block: &[u32]) -> BlockHash {
    // Stable within a process, which is all it needs: caches and routers never outlive it.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    block.hash(&mut h);
    h.finish()
}

/// A block that became cached or was evicted, in the order they happened (the same hash can be
/// evicted and cached again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChange {
    Added(BlockHash),
    Evicted(BlockHash),
}

/// What a cached block holds. The tokens and the parent are kept so that a hit is checked
/// exactly: a 64-bit collision can cost a hit, never give a sequence another's K/V.
#[derive(Debug)]
struct Cached {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct PrefixCache {
    salt: u64,
    by_hash: HashMap<BlockHash, u32>,
    /// Per block: what it holds, if it is cached.
    entries: Vec<Option<Cached>>,
    /// Cached blocks no sequence holds, by when they were released: evicted oldest first.
    evictable: BTreeMap<u64, u32>,
    /// Per block: its key in `evictable` while it is there.
    released_at: Vec<u64>,
    clock: u64,
    /// Per sequence: the hashes of its full blocks so far (also of those it could not cache).
    seq_hashes: HashMap<SeqId, Vec<BlockHash>>,
    /// Kept only for a caller that asked ([`BlockAllocator::track_changes`]).
    changes: Option<Vec<CacheChange>>,
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
    /// Blocks holding nothing anyone may want.
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
    cache: Option<PrefixCache>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize, window: Option<usize>) -> Self {
        BlockAllocator {
            block_size,
            num_blocks,
            window,
            // Reversed so blocks are handed out from 0 upwards.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            tables: HashMap::new(),
            cache: None,
        }
    }

    /// Turns the prefix cache on; `salt` stands for everything besides the tokens that the
    /// blocks' K/V depend on.
    pub fn with_prefix_cache(mut self, salt: u64) -> Self {
        self.cache = Some(PrefixCache {
            salt,
            by_hash: HashMap::new(),
            entries: (0..self.num_blocks).map(|_| None).collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; self.num_blocks],
            clock: 0,
            seq_hashes: HashMap::new(),
            changes: None,
        });
        self
    }

    /// Starts keeping the [`CacheChange`]s for [`BlockAllocator::take_changes`].
    pub fn track_changes(&mut self) {
        if let Some(c) = &mut self.cache {
            c.changes.get_or_insert_with(Vec::new);
        }
    }

    /// Blocks cached or evicted since the last call (with [`BlockAllocator::track_changes`]).
    pub fn take_changes(&mut self) -> Vec<CacheChange> {
        self.cache
            .as_mut()
            .and_then(|c| c.changes.as_mut())
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn prefix_caching(&self) -> bool {
        self.cache.is_some()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks that can be handed out: free ones and cached ones no sequence holds.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.cache.as_ref().map_or(0, |c| c.evictable.len())
    }

    /// Blocks kept by the prefix cache (held by sequences or not).
    pub fn num_cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.by_hash.len())
    }

    /// Fraction of blocks in use, 0..=1.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free() as f64 / self.num_blocks.max(1) as f64
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
        let free = self.num_free();
        if needed > free {
            return Err(KvError::OutOfBlocks { seq, needed, free });
        }
        let first_live = self.first_live_block(start);
        let need = end.div_ceil(self.block_size);
        let mut table = self.tables.remove(&seq).unwrap_or_default();
        while table.len() < need {
            let block = if table.len() < first_live {
                FREED
            } else {
                self.take_block()
            };
            table.push(block);
        }
        self.tables.insert(seq, table);
        Ok(())
    }

    /// Gives `seq`, which holds no blocks yet, the cached blocks its `tokens` start with, and
    /// says how many tokens they hold (their K/V need not be computed). The last token is never
    /// counted (its logits are needed, and its block would be shared), so at most
    /// `(len − 1) / block_size` blocks are taken. Nothing is taken with the prefix cache off.
    pub fn acquire_cached(&mut self, seq: SeqId, tokens: &[u32]) -> usize {
        let bs = self.block_size;
        if self.tables.contains_key(&seq) {
            // Its blocks are placed already: nothing to share.
            return 0;
        }
        let Some(cache) = &mut self.cache else {
            return 0;
        };
        let full = tokens.len().saturating_sub(1) / bs;
        let mut table = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = cache.salt;
        for block_tokens in tokens.chunks_exact(bs).take(full) {
            let hash = chain(parent, block_tokens);
            let Some(&b) = cache.by_hash.get(&hash) else {
                break;
            };
            let hit = cache.entries[b as usize]
                .as_ref()
                .is_some_and(|e| e.parent == parent && *e.tokens == *block_tokens);
            if !hit {
                break;
            }
            if self.refs[b as usize] == 0 {
                cache.evictable.remove(&cache.released_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            table.push(b);
            hashes.push(hash);
            parent = hash;
        }
        let hit = table.len() * bs;
        if !table.is_empty() {
            cache.seq_hashes.insert(seq, hashes);
            self.tables.insert(seq, table);
        }
        hit
    }

    /// Caches the full blocks among the first `tokens.len()` tokens of `seq`, whose K/V have
    /// been computed, that are not cached yet. Where another block already holds the same
    /// tokens, this one stays the sequence's own and is freed with it.
    pub fn register_computed(&mut self, seq: SeqId, tokens: &[u32]) {
        let bs = self.block_size;
        let Some(cache) = &mut self.cache else {
            return;
        };
        let Some(table) = self.tables.get(&seq) else {
            return;
        };
        let hashes = cache.seq_hashes.entry(seq).or_default();
        let full = tokens.len() / bs;
        for i in hashes.len()..full {
            let parent = hashes.last().copied().unwrap_or(cache.salt);
            let block_tokens = &tokens[i * bs..(i + 1) * bs];
            let hash = chain(parent, block_tokens);
            hashes.push(hash);
            // A block released before it was registered (only the window does that, and it
            // registers first) cannot be cached: its memory may already be another's.
            let Some(&b) = table.get(i).filter(|b| **b != FREED) else {
                continue;
            };
            if cache.by_hash.contains_key(&hash) || cache.entries[b as usize].is_some() {
                continue;
            }
            cache.by_hash.insert(hash, b);
            cache.entries[b as usize] = Some(Cached {
                hash,
                parent,
                tokens: block_tokens.into(),
            });
            if let Some(c) = &mut cache.changes {
                c.push(CacheChange::Added(hash));
            }
        }
    }

    /// Returns to the pool every block of `seq` that lies wholly before what a query at `pos`
    /// can see.
    pub fn release_outside_window(&mut self, seq: SeqId, pos: usize) {
        let first_live = self.first_live_block(pos);
        let Some(mut table) = self.tables.remove(&seq) else {
            return;
        };
        for b in table.iter_mut().take(first_live) {
            if *b != FREED {
                self.release(*b);
                *b = FREED;
            }
        }
        self.tables.insert(seq, table);
    }

    /// Frees all blocks of a finished, cancelled or preempted sequence. Its cached blocks stay
    /// cached; the last ones are evicted first (a longer prefix is less likely to be shared).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            for b in table.into_iter().rev().filter(|b| *b != FREED) {
                self.release(b);
            }
        }
        if let Some(c) = &mut self.cache {
            c.seq_hashes.remove(&seq);
        }
    }

    /// Blocks a sequence holds right now.
    pub fn held(&self, seq: SeqId) -> usize {
        self.table(seq).iter().filter(|b| **b != FREED).count()
    }

    /// A block for a sequence: a free one, else the least recently used cached one nobody
    /// holds (evicted). The caller has checked [`BlockAllocator::num_free`].
    fn take_block(&mut self) -> u32 {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let cache = self.cache.as_mut().expect("counted in num_free");
                let (_, b) = cache.evictable.pop_first().expect("counted in num_free");
                let entry = cache.entries[b as usize]
                    .take()
                    .expect("evictable is cached");
                cache.by_hash.remove(&entry.hash);
                if let Some(c) = &mut cache.changes {
                    c.push(CacheChange::Evicted(entry.hash));
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        b
    }

    /// Drops one sequence's hold on block `b`.
    fn release(&mut self, b: u32) {
        let refs = &mut self.refs[b as usize];
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        match &mut self.cache {
            Some(c) if c.entries[b as usize].is_some() => {
                c.clock += 1;
                c.released_at[b as usize] = c.clock;
                c.evictable.insert(c.clock, b);
            }
            _ => self.free.push(b),
        }
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

    /// Sequence `seq` computes `tokens` from `from` on and has them cached.
    fn compute(a: &mut BlockAllocator, seq: SeqId, tokens: &[u32], from: usize) {
        a.allocate(seq, from, tokens.len()).unwrap();
        a.register_computed(seq, tokens);
    }

    #[test]
    fn full_blocks_are_shared_and_outlive_their_sequence() {
        let mut a = BlockAllocator::new(8, 4, None).with_prefix_cache(7);
        a.track_changes();
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(a.acquire_cached(1, &prompt,), 0);
        compute(&mut a, 1, &prompt, 0);
        // Two full blocks cached; the partial third is the sequence's own.
        assert_eq!(a.num_cached(), 2);
        let added: Vec<_> = block_hashes(7, 4, &prompt)
            .into_iter()
            .map(CacheChange::Added)
            .collect();
        assert_eq!(a.take_changes(), added);

        // A second sequence sharing 9 tokens gets the two full blocks, held by both.
        let mut other = prompt[..9].to_vec();
        other.extend([50, 51, 52]);
        assert_eq!(a.acquire_cached(2, &other,), 8);
        assert_eq!(a.table(2), &a.table(1)[..2]);
        a.allocate(2, 8, other.len()).unwrap();
        assert_ne!(
            a.table(2)[2],
            a.table(1)[2],
            "partial blocks are never shared"
        );
        assert_eq!(a.num_free(), 8 - 4);

        // Both gone: the cached blocks stay, counted as free, and a third sequence hits them.
        a.free(1);
        a.free(2);
        assert_eq!(a.num_free(), 8);
        assert_eq!(a.num_cached(), 2);
        assert_eq!(a.acquire_cached(3, &prompt,), 8);
        // A different salt (another placement) shares nothing.
        let mut b = BlockAllocator::new(8, 4, None).with_prefix_cache(8);
        compute(&mut b, 1, &prompt, 0);
        assert_ne!(block_hashes(8, 4, &prompt), block_hashes(7, 4, &prompt));
    }

    #[test]
    fn the_last_token_is_always_computed() {
        let mut a = BlockAllocator::new(8, 4, None).with_prefix_cache(0);
        let prompt: Vec<u32> = (0..8).collect();
        compute(&mut a, 1, &prompt, 0);
        a.free(1);
        // All 8 tokens are cached, but the second block holds the last one: only 4 count.
        assert_eq!(a.acquire_cached(2, &prompt,), 4);
        a.allocate(2, 4, 8).unwrap();
        assert_eq!(a.held(2), 2);
    }

    #[test]
    fn evicts_least_recently_released_and_tails_first() {
        let mut a = BlockAllocator::new(4, 2, None).with_prefix_cache(0);
        a.track_changes();
        let x = [1, 2, 3, 4];
        let y = [5, 6, 7, 8];
        compute(&mut a, 1, &x, 0);
        a.free(1);
        compute(&mut a, 2, &y, 0);
        a.free(2);
        assert_eq!(a.num_cached(), 4);
        a.take_changes();
        // One new block evicts x's tail: released first, before y's blocks.
        a.allocate(3, 0, 2).unwrap();
        let hx = block_hashes(0, 2, &x);
        assert_eq!(a.take_changes(), [CacheChange::Evicted(hx[1])]);
        assert_eq!(a.acquire_cached(4, &[1, 2, 3, 4, 9],), 2);
        assert_eq!(a.acquire_cached(5, &[5, 6, 7, 8, 9],), 4);
        // Every block is now held: nothing more to hand out.
        assert_eq!(a.num_free(), 0);
        assert!(a.allocate(6, 0, 1).is_err());
    }

    #[test]
    fn a_token_mismatch_is_a_miss_even_with_the_same_hash() {
        let mut a = BlockAllocator::new(4, 2, None).with_prefix_cache(0);
        compute(&mut a, 1, &[1, 2, 3], 0);
        // Forge the entry's tokens: the lookup compares them, not only the hash.
        let b = a.table(1)[0] as usize;
        a.cache.as_mut().unwrap().entries[b]
            .as_mut()
            .unwrap()
            .tokens = vec![9, 9].into();
        a.free(1);
        assert_eq!(a.acquire_cached(2, &[1, 2, 3],), 0);
    }

    #[test]
    fn the_window_releases_shared_blocks_without_evicting_them() {
        // Window 4, blocks of 2: a query at p sees p-3..=p.
        let mut a = BlockAllocator::new(8, 2, Some(4)).with_prefix_cache(0);
        let tokens: Vec<u32> = (0..12).collect();
        compute(&mut a, 1, &tokens[..6], 0);
        for pos in 6..12 {
            a.allocate(1, pos, pos + 1).unwrap();
            a.register_computed(1, &tokens[..pos + 1]);
        }
        // Blocks it no longer sees went back to the pool but stay cached.
        assert!(a.held(1) <= 3);
        assert_eq!(a.num_cached(), 6);
        a.free(1);
        // Another sequence gets the whole chain (what a window drops is its own business).
        assert_eq!(a.acquire_cached(2, &tokens,), 10);
        a.allocate(2, 10, 12).unwrap();
        assert!(a.held(2) <= 3, "{:?}", a.table(2));
    }
}
