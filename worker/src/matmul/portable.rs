//! Scalar dot products of one weight row in its stored type with one prepared activation row:
//! the definition the SIMD kernels are tested against, and the path on CPUs without them.

use half::{bf16, f16};

use super::{scale_min_k4, Q8Block, Q8KBlock};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the order the compiler may vectorize, and less rounding drift.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub(super) fn widen_f16(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(2).zip(dst) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

pub(super) fn widen_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(2).zip(dst) {
        *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

pub(super) fn dot_q8_0(w: &[u8], a: &[Q8Block]) -> f32 {
    w.chunks_exact(34)
        .zip(a)
        .map(|(b, a)| {
            let s: i32 = b[2..34]
                .iter()
                .zip(&a.qs)
                .map(|(&q, &y)| (q as i8) as i32 * y as i32)
                .sum();
            f16_at(b, 0) * a.d * s as f32
        })
        .sum()
}

/// Σ q·y over a 32-block of nibbles (low halves values 0..16, high halves 16..32).
fn nibble_dot(qs: &[u8], y: &[i8; 32]) -> i32 {
    qs.iter()
        .enumerate()
        .map(|(j, &q)| (q & 0xF) as i32 * y[j] as i32 + (q >> 4) as i32 * y[j + 16] as i32)
        .sum()
}

pub(super) fn dot_q4_0(w: &[u8], a: &[Q8Block]) -> f32 {
    w.chunks_exact(18)
        .zip(a)
        .map(|(b, a)| f16_at(b, 0) * a.d * (nibble_dot(&b[2..18], &a.qs) - 8 * a.sum) as f32)
        .sum()
}

pub(super) fn dot_q4_1(w: &[u8], a: &[Q8Block]) -> f32 {
    w.chunks_exact(20)
        .zip(a)
        .map(|(b, a)| {
            f16_at(b, 0) * a.d * nibble_dot(&b[4..20], &a.qs) as f32
                + f16_at(b, 2) * a.d * a.sum as f32
        })
        .sum()
}

pub(super) fn dot_q4_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    w.chunks_exact(144)
        .zip(a)
        .map(|(b, a)| {
            let scales = &b[4..16];
            let (mut sum, mut mins) = (0i32, 0i32);
            for (c, q) in b[16..144].chunks_exact(32).enumerate() {
                let y = &a.qs[64 * c..64 * c + 64];
                let lo: i32 = (0..32).map(|l| (q[l] & 0xF) as i32 * y[l] as i32).sum();
                let hi: i32 = (0..32).map(|l| (q[l] >> 4) as i32 * y[l + 32] as i32).sum();
                let (s1, m1) = scale_min_k4(2 * c, scales);
                let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                sum += s1 as i32 * lo + s2 as i32 * hi;
                mins += m1 as i32 * a.sum32(2 * c) + m2 as i32 * a.sum32(2 * c + 1);
            }
            a.d * (f16_at(b, 0) * sum as f32 - f16_at(b, 2) * mins as f32)
        })
        .sum()
}

pub(super) fn dot_q5_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    w.chunks_exact(176)
        .zip(a)
        .map(|(b, a)| {
            let (scales, qh) = (&b[4..16], &b[16..48]);
            let (mut sum, mut mins) = (0i32, 0i32);
            for (c, q) in b[48..176].chunks_exact(32).enumerate() {
                let y = &a.qs[64 * c..64 * c + 64];
                let hb = |l: usize, bit: usize| (((qh[l] >> bit) & 1) << 4) as i32;
                let lo: i32 = (0..32)
                    .map(|l| ((q[l] & 0xF) as i32 + hb(l, 2 * c)) * y[l] as i32)
                    .sum();
                let hi: i32 = (0..32)
                    .map(|l| ((q[l] >> 4) as i32 + hb(l, 2 * c + 1)) * y[l + 32] as i32)
                    .sum();
                let (s1, m1) = scale_min_k4(2 * c, scales);
                let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                sum += s1 as i32 * lo + s2 as i32 * hi;
                mins += m1 as i32 * a.sum32(2 * c) + m2 as i32 * a.sum32(2 * c + 1);
            }
            a.d * (f16_at(b, 0) * sum as f32 - f16_at(b, 2) * mins as f32)
        })
        .sum()
}

pub(super) fn dot_q6_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    w.chunks_exact(210)
        .zip(a)
        .map(|(b, a)| {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            // Per 16-value sub-block: Σ q·y with q in 0..64 (the -32 offset applied below).
            let mut sub = [0i32; 16];
            for h in 0..2 {
                let (ql, qh, y) = (&ql[64 * h..], &qh[32 * h..], &a.qs[128 * h..]);
                for l in 0..32 {
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                    let s = 8 * h + l / 16;
                    sub[s] += q1 * y[l] as i32;
                    sub[s + 2] += q2 * y[l + 32] as i32;
                    sub[s + 4] += q3 * y[l + 64] as i32;
                    sub[s + 6] += q4 * y[l + 96] as i32;
                }
            }
            let sum: i32 = (0..16)
                .map(|i| (sc[i] as i8) as i32 * (sub[i] - 32 * a.bsums[i] as i32))
                .sum();
            f16_at(b, 208) * a.d * sum as f32
        })
        .sum()
}
