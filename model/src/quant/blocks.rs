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

/// Multiplies every value of `bytes` (whole blocks of `ty`) by `factor`, in place. Block formats
/// scale their f16 super-block scales (and mins), so the quantized values stay as they are:
/// exact when `factor` is a power of two. Returns the first scaled value that is not finite
/// in its storage type (an f16 scale past 65504, say), leaving `bytes` partly scaled.
pub fn scale_blocks(ty: WeightType, bytes: &mut [u8], factor: f32) -> Result<(), f32> {
    fn f16s(bytes: &mut [u8], at: usize, factor: f32) -> Result<(), f32> {
        let v = f16::from_f32(f16_at(bytes, at) * factor);
        if !v.is_finite() {
            return Err(f16_at(bytes, at) * factor);
        }
        bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
        Ok(())
    }
    // Offsets of the f16 scales inside one block.
    let scales: &[usize] = match ty {
        WeightType::F32 => {
            for b in bytes.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * factor;
                if !v.is_finite() {
                    return Err(v);
                }
                b.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(());
        }
        WeightType::F16 => &[0],
        WeightType::BF16 => {
            for b in bytes.chunks_exact_mut(2) {
                let v = bf16::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32() * factor);
                if !v.is_finite() {
                    return Err(v.to_f32());
                }
                b.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(());
        }
        WeightType::Q8_0 | WeightType::Q4_0 => &[0],
        WeightType::Q4_1 | WeightType::Q4_K | WeightType::Q5_K => &[0, 2],
        WeightType::Q6_K => &[208],
    };
    for block in bytes.chunks_exact_mut(ty.block_bytes()) {
        for &at in scales {
            f16s(block, at, factor)?;
        }
    }
    Ok(())
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

/// Appends `src` (whole blocks) stored as `ty`.
///
/// Floats, Q8_0, Q4_0 and Q4_1 round as ggml's reference quantizers do (gguf-py makes the same
/// bytes). The K-quants search each sub-block's scale (and min) for the least weighted squared
/// error, as llama.cpp's reference quantizers do, then quantize the sub-block scales to 6 bits
/// (Q4_K, Q5_K) or 8 bits (Q6_K) under one f16 super-block scale and re-round every value
/// against the scales as stored.
pub fn quantize_row(ty: WeightType, src: &[f32], dst: &mut Vec<u8>) {
    debug_assert_eq!(src.len() % ty.block_len(), 0);
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
        WeightType::Q4_0 => src.chunks_exact(32).for_each(|x| {
            // The value of largest magnitude, signed, maps to -8: the grid's one extra step is
            // spent on the side that needs it.
            let max = x
                .iter()
                .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| ((v * id + 8.5) as u8).min(15);
            dst.extend(f16::from_f32(d).to_le_bytes());
            dst.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }),
        WeightType::Q4_1 => src.chunks_exact(32).for_each(|x| {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
            dst.extend(f16::from_f32(d).to_le_bytes());
            dst.extend(f16::from_f32(min).to_le_bytes());
            dst.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }),
        WeightType::Q4_K => src
            .chunks_exact(256)
            .for_each(|x| quantize_q45_k(x, 15, dst)),
        WeightType::Q5_K => src
            .chunks_exact(256)
            .for_each(|x| quantize_q45_k(x, 31, dst)),
        WeightType::Q6_K => src.chunks_exact(256).for_each(|x| quantize_q6_k(x, dst)),
    }
}

/// Round half away from zero, as ggml's `nearest_int` (and gguf-py's `np_roundf`).
fn nearest(v: f32) -> i32 {
    v.round() as i32
}

/// One Q4_K (`nmax` 15) or Q5_K (`nmax` 31) super-block of 256 values.
fn quantize_q45_k(x: &[f32], nmax: u8, dst: &mut Vec<u8>) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        // Weights favour the large values, which matter most to a dot product, but keep the
        // small ones in play (the sub-block's rms as a floor).
        let rms = (sub.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (w, v) in w.iter_mut().zip(sub) {
            *w = rms + v.abs();
        }
        let (s, m) = scale_min_search(sub, &w, nmax);
        scales[j] = s;
        mins[j] = m;
    }
    let max_scale = scales.iter().copied().fold(0f32, f32::max);
    let max_min = mins.iter().copied().fold(0f32, f32::max);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = nearest(inv_scale * scales[j]).clamp(0, 63) as u8;
        let lm = nearest(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    // Every value re-rounded against the scales as stored (6-bit, under f16 d and dmin).
    let mut l = [0u8; 256];
    for (j, (sub, l)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dmin.to_f32() * m as f32;
        for (l, v) in l.iter_mut().zip(sub) {
            *l = nearest((v + mj) / dj).clamp(0, nmax as i32) as u8;
        }
    }
    dst.extend(d.to_le_bytes());
    dst.extend(dmin.to_le_bytes());
    dst.extend(packed);
    if nmax == 31 {
        // Q5_K: bit 4 of value 32c+l (c = 0..8) is bit c of qh[l].
        let mut qh = [0u8; 32];
        for (i, &q) in l.iter().enumerate() {
            qh[i % 32] |= (q >> 4) << (i / 32);
        }
        dst.extend(qh);
    }
    // Low nibbles: each 64 values share 32 bytes, the first 32 in the low halves.
    for c in l.chunks_exact(64) {
        dst.extend((0..32).map(|i| (c[i] & 0xF) | ((c[i + 32] & 0xF) << 4)));
    }
}

/// The scale `s` and min `m` (both ≥ 0) of a sub-block stored as `s·q - m` with `q` in
/// `0..=nmax`, minimizing Σ w·(s·q - m - x)²: from the plain min/max grid, several stretched
/// grids are tried, each followed by the weighted least-squares fit of `s` and `m` to its
/// rounding; the best fit wins.
fn scale_min_search(x: &[f32], w: &[f32], nmax: u8) -> (f32, f32) {
    let nmax_f = nmax as f32;
    let min = x.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max <= min {
        return (0.0, -min);
    }
    let (sum_w, sum_x) = w
        .iter()
        .zip(x)
        .fold((0f32, 0f32), |(a, b), (w, x)| (a + w, b + w * x));
    let error = |s: f32, lo: f32| -> f32 {
        let inv = 1.0 / s;
        w.iter()
            .zip(x)
            .map(|(w, &v)| {
                let q = nearest(inv * (v - lo)).clamp(0, nmax as i32) as f32;
                let e = s * q + lo - v;
                w * e * e
            })
            .sum()
    };
    let mut best_scale = (max - min) / nmax_f;
    let mut best_min = min;
    let mut best = error(best_scale, best_min);
    // The grid's span stretched from nmax-1 to nmax+1 steps.
    for step in 0..=20 {
        let iscale = (nmax_f - 1.0 + 0.1 * step as f32) / (max - min);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for (&w, &v) in w.iter().zip(x) {
            let q = nearest(iscale * (v - min)).clamp(0, nmax as i32) as f32;
            sl += w * q;
            sl2 += w * q * q;
            sxl += w * q * v;
        }
        let det = sum_w * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (sum_w * sxl - sum_x * sl) / det;
        let mut lo = (sl2 * sum_x - sl * sxl) / det;
        if lo > 0.0 {
            // The format's min only subtracts: refit the scale alone.
            lo = 0.0;
            s = sxl / sl2;
        }
        if s <= 0.0 {
            continue;
        }
        let e = error(s, lo);
        if e < best {
            best = e;
            best_scale = s;
            best_min = lo;
        }
    }
    (best_scale, -best_min)
}

/// One Q6_K super-block: 16 sub-blocks of 16 values, each a signed 8-bit scale under one f16.
fn quantize_q6_k(x: &[f32], dst: &mut Vec<u8>) {
    let mut scales = [0f32; 16];
    for (s, sub) in scales.iter_mut().zip(x.chunks_exact(16)) {
        *s = symmetric_scale_search(sub, 32);
    }
    // The signed scale of largest magnitude maps to -128, as the value grid's extra step does.
    let max_scale = scales
        .iter()
        .fold(0f32, |a, &s| if s.abs() > a.abs() { s } else { a });
    let mut out = [0u8; 210];
    if max_scale.abs() >= 1e-15 {
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let mut l = [0u8; 256];
        for (j, (sub, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let sc = nearest(iscale * scales[j]).clamp(-128, 127) as i8;
            out[192 + j] = sc as u8;
            let dj = d.to_f32() * sc as f32;
            if dj == 0.0 {
                l.fill(32);
                continue;
            }
            for (l, v) in l.iter_mut().zip(sub) {
                *l = (nearest(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }
        out[208..210].copy_from_slice(&d.to_le_bytes());
        // Per 128 values: 64 bytes of low nibbles (values l and l+64 share byte l, l+32 and
        // l+96 share byte l+32) and 32 bytes of high bit pairs (l, l+32, l+64, l+96 → bits
        // 0-1, 2-3, 4-5, 6-7 of byte l).
        for (h, c) in l.chunks_exact(128).enumerate() {
            let (ql, qh) = (&mut out[64 * h..], 128 + 32 * h);
            for i in 0..32 {
                ql[i] = (c[i] & 0xF) | ((c[i + 64] & 0xF) << 4);
                ql[i + 32] = (c[i + 32] & 0xF) | ((c[i + 96] & 0xF) << 4);
            }
            for i in 0..32 {
                out[qh + i] = (c[i] >> 4)
                    | ((c[i + 32] >> 4) << 2)
                    | ((c[i + 64] >> 4) << 4)
                    | ((c[i + 96] >> 4) << 6);
            }
        }
    }
    dst.extend(out);
}

/// The signed scale `s` of values stored as `s·q` with `q` in `-nmax..nmax`, the largest
/// magnitude at `-nmax`: grids slightly stretched and shrunk around that are each rounded, and
/// the least-squares scale of each (weighted by x², the values that matter most) compared.
fn symmetric_scale_search(x: &[f32], nmax: i32) -> f32 {
    let max = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    if max.abs() < 1e-30 {
        return 0.0;
    }
    let fit = |iscale: f32| {
        let (mut sxl, mut sl2) = (0f32, 0f32);
        for &v in x {
            let q = nearest(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sxl += w * v * q;
            sl2 += w * q * q;
        }
        (sxl, sl2)
    };
    let (sxl, sl2) = fit(-(nmax as f32) / max);
    let mut scale = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
    // Σw(x - s·q)² = Σwx² - sxl²/sl2 at the fitted scale: the larger sxl²/sl2, the better.
    let mut best = scale * sxl;
    for step in -9..=9 {
        if step == 0 {
            continue;
        }
        let (sxl, sl2) = fit(-(nmax as f32 + 0.1 * step as f32) / max);
        if sl2 > 0.0 && sxl * sxl > best * sl2 {
            scale = sxl / sl2;
            best = scale * sxl;
        }
    }
    scale
}
