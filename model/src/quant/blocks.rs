//! ggml's block layouts, value by value: the exact dequantization every kernel must agree with.

use half::{bf16, f16};

use super::WeightType;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Writes the `dst.len()` values of one row stored as `ty` in `src` (whole blocks).
pub fn dequantize_row(ty: WeightType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    debug_assert_eq!(Some(src.len()), ty.row_bytes(n));
    let blocks = src.chunks_exact(ty.block_bytes());
    let outs = dst.chunks_exact_mut(ty.block_len());
    match ty {
        WeightType::F32 => {
            for (b, o) in src.chunks_exact(4).zip(dst) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WeightType::F16 => {
            for (b, o) in src.chunks_exact(2).zip(dst) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        WeightType::BF16 => {
            for (b, o) in src.chunks_exact(2).zip(dst) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        WeightType::Q8_0 => blocks.zip(outs).for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }),
        WeightType::Q4_0 => blocks.zip(outs).for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                y[j] = d * ((q & 0xF) as i32 - 8) as f32;
                y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }),
        WeightType::Q4_1 => blocks.zip(outs).for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                y[j] = d * (q & 0xF) as f32 + m;
                y[j + 16] = d * (q >> 4) as f32 + m;
            }
        }),
        WeightType::Q4_K => blocks.zip(outs).for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }),
        WeightType::Q5_K => blocks.zip(outs).for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                    y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }),
        WeightType::Q6_K => blocks.zip(outs).for_each(|(b, y)| {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let sc = &sc[8 * half..];
                let y = &mut y[128 * half..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }),
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Appends `src` (whole blocks) stored as `ty`. Plain floats and Q8_0 only, so far.
pub fn quantize_row(ty: WeightType, src: &[f32], dst: &mut Vec<u8>) {
    match ty {
        WeightType::F32 => src.iter().for_each(|v| dst.extend(v.to_le_bytes())),
        WeightType::F16 => src
            .iter()
            .for_each(|v| dst.extend(f16::from_f32(*v).to_le_bytes())),
        WeightType::BF16 => src
            .iter()
            .for_each(|v| dst.extend(bf16::from_f32(*v).to_le_bytes())),
        WeightType::Q8_0 => src.chunks_exact(32).for_each(|x| {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            dst.extend(f16::from_f32(d).to_le_bytes());
            dst.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
        }),
        _ => unimplemented!("quantizing to {ty}"),
    }
}
