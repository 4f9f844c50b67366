//! Launch geometry: how a step's work is cut into blocks. Pure host arithmetic, mirrored by
//! constants in the `.cu` files (named alongside), and unit-tested here without a GPU.

/// Query rows per prefill attention block (`BM` in attention_prefill.cu).
pub const PREFILL_ROWS: usize = 64;
/// Keys per decode split are a multiple of this (keeps splits on 16-token cache blocks).
pub const DECODE_SPLIT_QUANTUM: usize = 64;
/// The fewest keys worth a split of their own: below this the merge costs more than it saves.
pub const DECODE_MIN_SPLIT: usize = 256;
/// Row tile of the tensor-core expert GEMM (`TM` in moe_gemm.cu).
pub const MOE_TILE_ROWS: usize = 64;
/// Output columns per tensor-core expert GEMM block (`TN`).
pub const MOE_TILE_COLS: usize = 64;
/// Token rows the GEMV expert path applies one pass of the weights to (`GEMV_ROWS`); an expert
/// with at most this many rows reads its weights exactly once.
pub const MOE_GEMV_ROWS: usize = 8;
/// Output rows per GEMV block (`GEMV_WARPS · GEMV_WROWS`).
pub const MOE_GEMV_BLOCK_OUT: usize = 8;

/// How the decode kernel spreads one key row of `head_dim / 8` 16-byte chunks over a warp's
/// lanes (`LPK` and `CH` in attention_decode.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLanes {
    /// Lanes per key: the largest power of two not above the chunk count, so a key's lanes are
    /// an aligned group of the warp that the shuffle reduction stays inside.
    pub lanes_per_key: usize,
    /// Chunks each lane holds (1 or 2): its registers for q and the output grow with this.
    pub chunks_per_lane: usize,
}

/// The decode kernel's lane layout for `head_dim` (a multiple of 8, at most 256).
pub fn decode_lanes(head_dim: usize) -> DecodeLanes {
    let chunks = (head_dim / 8).max(1);
    let lanes_per_key = 1 << chunks.ilog2();
    DecodeLanes {
        lanes_per_key,
        chunks_per_lane: chunks.div_ceil(lanes_per_key),
    }
}

/// Prefill tiles: for each tile, its sequence and its first row within that sequence.
pub fn prefill_tiles(seq_lens: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let (mut seq, mut row) = (Vec::new(), Vec::new());
    for (s, &len) in seq_lens.iter().enumerate() {
        for start in (0..len).step_by(PREFILL_ROWS) {
            seq.push(s as u32);
            row.push(start as u32);
        }
    }
    (seq, row)
}

/// How decode attention splits each sequence's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSplit {
    /// Splits per (sequence, KV head): the grid's z.
    pub splits: usize,
    /// Keys per split.
    pub split_len: usize,
}

/// Enough (sequence × KV head × split) blocks to fill `sm_count` SMs about twice over, but no
/// split shorter than [`DECODE_MIN_SPLIT`] keys. `longest` is the most keys any sequence sees.
pub fn decode_split(seqs: usize, kv_heads: usize, longest: usize, sm_count: usize) -> DecodeSplit {
    let longest = longest.max(1);
    let base_blocks = (seqs * kv_heads).max(1);
    let wanted = (2 * sm_count).div_ceil(base_blocks).max(1);
    let by_length = longest.div_ceil(DECODE_MIN_SPLIT).max(1);
    let splits = wanted.min(by_length);
    let split_len = longest
        .div_ceil(splits)
        .next_multiple_of(DECODE_SPLIT_QUANTUM);
    DecodeSplit {
        splits: longest.div_ceil(split_len),
        split_len,
    }
}

/// Which grouped-GEMM kernels run the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoePath {
    /// Few rows per expert: bandwidth-bound GEMV.
    Gemv,
    /// Many rows: tensor cores.
    Mma,
}

impl MoePath {
    /// Chosen from the most rows any local expert received.
    pub fn for_rows(max_rows_per_expert: usize) -> MoePath {
        match max_rows_per_expert <= MOE_GEMV_ROWS {
            true => MoePath::Gemv,
            false => MoePath::Mma,
        }
    }
}

/// Row tiles the tensor-core grid must provide: Σ_e ⌈rows_e / TM⌉ is at most this, whatever
/// the split of `rows` over `experts` (the sort computes the exact prefix on the GPU; blocks
/// past it exit).
pub fn moe_row_tiles_bound(rows: usize, experts: usize) -> usize {
    rows.div_ceil(MOE_TILE_ROWS) + experts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_tiles_cover_every_row_once() {
        let lens = [1, 64, 65, 130, 0];
        let (seq, row) = prefill_tiles(&lens);
        let mut covered = vec![0usize; lens.len()];
        for (&s, &r) in seq.iter().zip(&row) {
            let s = s as usize;
            assert!((r as usize) < lens[s]);
            assert_eq!(r as usize % PREFILL_ROWS, 0);
            covered[s] += (lens[s] - r as usize).min(PREFILL_ROWS);
        }
        assert_eq!(covered, lens);
    }

    #[test]
    fn decode_lanes_cover_each_key_once_within_aligned_lane_groups() {
        for head_dim in (16..=256).step_by(16) {
            let chunks = head_dim / 8;
            let l = decode_lanes(head_dim);
            assert!(l.lanes_per_key.is_power_of_two() && 32 % l.lanes_per_key == 0);
            assert!((1..=2).contains(&l.chunks_per_lane), "{head_dim}: {l:?}");
            // Lane `sl` of a key takes chunks sl, sl + lanes: each chunk exactly once.
            let mut seen = vec![0; chunks];
            for sl in 0..l.lanes_per_key {
                for c in 0..l.chunks_per_lane {
                    if let Some(n) = seen.get_mut(sl + c * l.lanes_per_key) {
                        *n += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{head_dim}: {seen:?}");
        }
        assert_eq!(
            decode_lanes(128),
            DecodeLanes {
                lanes_per_key: 16,
                chunks_per_lane: 1
            }
        );
        assert_eq!(
            decode_lanes(96),
            DecodeLanes {
                lanes_per_key: 8,
                chunks_per_lane: 2
            }
        );
        assert_eq!(
            decode_lanes(48),
            DecodeLanes {
                lanes_per_key: 4,
                chunks_per_lane: 2
            }
        );
    }

    #[test]
    fn decode_splits_cover_the_context_and_respect_the_minimum() {
        for (seqs, kvh, longest, sms) in [
            (1, 8, 32768, 132),
            (64, 8, 1024, 132),
            (1, 8, 10, 132),
            (3, 2, 4097, 108),
            (1, 1, 1, 1),
        ] {
            let d = decode_split(seqs, kvh, longest, sms);
            assert!(d.splits >= 1);
            assert_eq!(d.split_len % DECODE_SPLIT_QUANTUM, 0);
            assert!(d.splits * d.split_len >= longest, "{d:?} for {longest}");
            assert!(
                (d.splits - 1) * d.split_len < longest,
                "{d:?}: an empty split"
            );
            if d.splits > 1 {
                assert!(d.split_len >= DECODE_MIN_SPLIT);
            }
        }
        // One long sequence: many splits to fill the GPU. Many short ones: one split.
        assert!(decode_split(1, 8, 32768, 132).splits >= 32);
        assert_eq!(decode_split(64, 8, 1024, 132).splits, 1);
    }

    #[test]
    fn moe_path_and_tile_bound() {
        assert_eq!(MoePath::for_rows(1), MoePath::Gemv);
        assert_eq!(MoePath::for_rows(MOE_GEMV_ROWS), MoePath::Gemv);
        assert_eq!(MoePath::for_rows(MOE_GEMV_ROWS + 1), MoePath::Mma);
        // Worst case: every expert one row past a tile boundary.
        let experts = 8;
        let counts = [65usize; 8];
        let tiles: usize = counts.iter().map(|c| c.div_ceil(MOE_TILE_ROWS)).sum();
        assert!(tiles <= moe_row_tiles_bound(counts.iter().sum(), experts));
    }
}
