//! The host reference of the GPU expert sort (`moe_sort` in moe.cu): the same outputs, computed
//! plainly. The CUDA backend does not use it on the hot path (the sort runs on the GPU, with no
//! host round trip); it documents the contract and is what the on-GPU check compares against.

/// Assignments `a = token · top_k + slot` grouped by the local expert they go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortedRoutes {
    /// Rows `offsets[e] .. offsets[e+1]` belong to local expert `e`.
    pub offsets: Vec<u32>,
    /// Row tiles of `tile_rows`: tiles `tiles[e] .. tiles[e+1]` belong to local expert `e`.
    pub tiles: Vec<u32>,
    /// Token of each sorted row.
    pub sorted_token: Vec<u32>,
    /// Routing weight of each sorted row (as bits, so the type stays `Eq`).
    pub sorted_weight_bits: Vec<u32>,
    /// Sorted row of each assignment, -1 where its expert is not held here.
    pub pos_of: Vec<i32>,
}

/// Sorts assignments by local expert, stably (assignment order within an expert).
/// `local_of[expert]` is the local index of an expert held here, or -1.
pub fn sort_by_expert(
    experts: &[u32],
    weights: &[f32],
    top_k: usize,
    local_of: &[i32],
    tile_rows: usize,
) -> SortedRoutes {
    let n_local = local_of.iter().filter(|&&l| l >= 0).count();
    let mut count = vec![0u32; n_local];
    for &e in experts {
        if let Ok(l) = usize::try_from(local_of[e as usize]) {
            count[l] += 1;
        }
    }
    let (mut offsets, mut tiles) = (vec![0u32], vec![0u32]);
    for &c in &count {
        offsets.push(offsets.last().unwrap() + c);
        tiles.push(tiles.last().unwrap() + c.div_ceil(tile_rows as u32));
    }
    let total = *offsets.last().unwrap() as usize;
    let mut cursor = offsets[..n_local].to_vec();
    let mut sorted_token = vec![0u32; total];
    let mut sorted_weight_bits = vec![0u32; total];
    let mut pos_of = vec![-1i32; experts.len()];
    for (a, (&e, &w)) in experts.iter().zip(weights).enumerate() {
        if let Ok(l) = usize::try_from(local_of[e as usize]) {
            let p = cursor[l] as usize;
            cursor[l] += 1;
            sorted_token[p] = (a / top_k) as u32;
            sorted_weight_bits[p] = w.to_bits();
            pos_of[a] = p as i32;
        }
    }
    SortedRoutes {
        offsets,
        tiles,
        sorted_token,
        sorted_weight_bits,
        pos_of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_stably_and_skips_experts_held_elsewhere() {
        // 4 tokens, top-2, experts 0..4; this shard holds experts 1 and 3 (local 0 and 1).
        let experts = [1, 3, 0, 1, 3, 2, 1, 0];
        let weights = [0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1];
        let local_of = [-1, 0, -1, 1];
        let s = sort_by_expert(&experts, &weights, 2, &local_of, 2);
        assert_eq!(s.offsets, vec![0, 3, 5]);
        assert_eq!(s.tiles, vec![0, 2, 3]);
        assert_eq!(s.sorted_token, vec![0, 1, 3, 0, 2]);
        let w: Vec<f32> = s
            .sorted_weight_bits
            .iter()
            .map(|b| f32::from_bits(*b))
            .collect();
        assert_eq!(w, vec![0.6, 0.3, 0.9, 0.4, 0.5]);
        assert_eq!(s.pos_of, vec![0, 3, -1, 1, 4, -1, 2, -1]);
        // Every local assignment appears exactly once, at the row pos_of says.
        for (a, &p) in s.pos_of.iter().enumerate() {
            if p >= 0 {
                assert_eq!(s.sorted_token[p as usize] as usize, a / 2);
            }
        }
    }
}
