//! Pass 1 of `attention_decode` (kernels/cuda/attention_decode.cu) emulated lane by lane on the
//! CPU, at every head_dim the kernels accept: which lane holds which 16-byte chunk of q, K and
//! V (`decode_lanes`, the kernel's LPK and CH), the xor-shuffle reduction of a key's dot product
//! inside its lane group, each part's online softmax, the parts' stores to shared memory and
//! their merge. Checked against plain softmax attention, so a lane layout that mixes lanes of
//! different keys, drops a chunk, scores a key twice or indexes past its part fails here,
//! without a GPU.

use switchyard_kernels::geometry::{decode_lanes, DecodeLanes};

const WARP: usize = 32;
const DEC_WARPS: usize = 4;

/// Uniform values in [-1, 1) from a linear congruential generator (the kernels crate has no
/// random-number dependency, and needs none beyond this).
struct Lcg(u64);

impl Lcg {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

/// One block's pass 1 over keys `0..n` for `group` query heads, then the block's merge:
/// the attention output of each head (`q`, `out`: `[group, head_dim]`; `k`, `v`: `[n, head_dim]`).
fn emulate(head_dim: usize, group: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let DecodeLanes {
        lanes_per_key: lpk,
        chunks_per_lane: ch,
    } = decode_lanes(head_dim);
    let (nch, kpw) = (head_dim / 8, WARP / lpk);
    let parts = DEC_WARPS * kpw;
    let n = k.len() / head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Shared memory, poisoned: a slot no lane writes turns the result into NaN.
    let mut sm_m = vec![f32::NAN; parts * group];
    let mut sm_l = vec![f32::NAN; parts * group];
    let mut sm_acc = vec![f32::NAN; parts * group * head_dim];
    let mut written = vec![0u32; parts * group * head_dim];
    // Dims of chunk c of lane sl, when inside the row.
    let dims = |sl: usize, c: usize| {
        let chunk = sl + c * lpk;
        (chunk < nch).then(|| chunk * 8..chunk * 8 + 8)
    };
    for warp in 0..DEC_WARPS {
        let mut m = vec![f32::NEG_INFINITY; WARP * group];
        let mut l = vec![0.0f32; WARP * group];
        let mut acc = vec![0.0f32; WARP * group * head_dim]; // only this lane's dims are touched
        let mut kb = warp * kpw;
        while kb < n {
            for hh in 0..group {
                // Each lane's partial dot product over its chunks.
                let mut d: Vec<f32> = (0..WARP)
                    .map(|lane| {
                        let kpos = kb + lane / lpk;
                        (0..ch)
                            .filter_map(|c| dims(lane % lpk, c))
                            .flatten()
                            .filter(|_| kpos < n)
                            .map(|i| q[hh * head_dim + i] * k[kpos * head_dim + i])
                            .sum()
                    })
                    .collect();
                // __shfl_xor_sync over offsets LPK/2 .. 1, every lane at once.
                let mut o = lpk / 2;
                while o > 0 {
                    d = (0..WARP).map(|lane| d[lane] + d[lane ^ o]).collect();
                    o /= 2;
                }
                for (lane, dot) in d.iter().enumerate() {
                    let kpos = kb + lane / lpk;
                    if kpos >= n {
                        continue;
                    }
                    let s = lane * group + hh;
                    let score = dot * scale;
                    let mn = m[s].max(score);
                    let (corr, p) = ((m[s] - mn).exp(), (score - mn).exp());
                    m[s] = mn;
                    l[s] = l[s] * corr + p;
                    for i in (0..ch).filter_map(|c| dims(lane % lpk, c)).flatten() {
                        let a = &mut acc[s * head_dim + i];
                        *a = *a * corr + p * v[kpos * head_dim + i];
                    }
                }
            }
            kb += DEC_WARPS * kpw;
        }
        // The stores to shared memory: lane 0 of a key group writes m and l, every lane its dims.
        for lane in 0..WARP {
            let (sub, sl) = (lane / lpk, lane % lpk);
            let part = warp * kpw + sub;
            assert!(part < parts, "d={head_dim}: part {part} of {parts}");
            for hh in 0..group {
                let (s, at) = (lane * group + hh, part * group + hh);
                if sl == 0 {
                    sm_m[at] = m[s];
                    sm_l[at] = l[s];
                }
                for i in (0..ch).filter_map(|c| dims(sl, c)).flatten() {
                    sm_acc[at * head_dim + i] = acc[s * head_dim + i];
                    written[at * head_dim + i] += 1;
                }
            }
        }
    }
    assert!(
        written.iter().all(|&w| w == 1),
        "d={head_dim}: a shared accumulator slot written other than once"
    );
    // The merge: one thread per (head, d).
    let mut out = vec![0.0f32; group * head_dim];
    for hh in 0..group {
        let mx = (0..parts)
            .map(|p| sm_m[p * group + hh])
            .fold(f32::NEG_INFINITY, f32::max);
        for dd in 0..head_dim {
            let (mut sum, mut a) = (0.0, 0.0);
            for p in 0..parts {
                let f = (sm_m[p * group + hh] - mx).exp();
                sum += sm_l[p * group + hh] * f;
                a += sm_acc[(p * group + hh) * head_dim + dd] * f;
            }
            out[hh * head_dim + dd] = a / sum;
        }
    }
    out
}

fn reference(head_dim: usize, group: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let n = k.len() / head_dim;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = vec![0.0f32; group * head_dim];
    for hh in 0..group {
        let qh = &q[hh * head_dim..(hh + 1) * head_dim];
        let scores: Vec<f64> = (0..n)
            .map(|j| {
                let kj = &k[j * head_dim..(j + 1) * head_dim];
                qh.iter()
                    .zip(kj)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
        for (j, s) in scores.iter().enumerate() {
            let w = (s - mx).exp() / total;
            for dd in 0..head_dim {
                out[hh * head_dim + dd] += (w * v[j * head_dim + dd] as f64) as f32;
            }
        }
    }
    out
}

#[test]
fn the_decode_lane_layout_computes_attention_at_every_head_dim() {
    let mut rng = Lcg(7);
    for head_dim in (16..=256).step_by(16) {
        let group = 2;
        // Fewer keys than one pass of the block, and several passes with a ragged end.
        for n in [1, 5, 3 * DEC_WARPS * WARP + 7] {
            let q = rng.vec(group * head_dim);
            let (k, v) = (rng.vec(n * head_dim), rng.vec(n * head_dim));
            let got = emulate(head_dim, group, &q, &k, &v);
            let want = reference(head_dim, group, &q, &k, &v);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "d={head_dim} keys={n}: max |Δ| {worst}");
        }
    }
}
