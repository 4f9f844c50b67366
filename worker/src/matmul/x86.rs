//! AVX2 + FMA (+ F16C) kernels: the same dot products as `portable.rs`, 32 values at a time.
//! `gemv_f32` (f32 activations) has no portable twin: its definition is the portable path's
//! dequantized row · activations, which it matches up to the order of the sums.
//!
//! Integer products use `vpmaddubsw` (u8 × i8 → pairs summed to i16) and `vpmaddwd` (i16 pairs
//! → i32); every weight operand is made unsigned first (nibbles are 0..16, Q6_K's values 0..64
//! with the offset factored out; Q8_0's signs moved onto the activations), so no pair sum can
//! saturate: at most 2·127·127 < 2¹⁵.
//!
//! Each public function is safe to call once [`has_avx2`] has said yes (the caller,
//! `matmul_t_with`, checks that the instruction set is supported).

use std::arch::x86_64::*;

use switchyard_model::WeightType;

use super::{Q8Block, Q8KBlock};

pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The f16 at byte `i` in every lane, converted in registers (a library call here would cost
/// more than the block's arithmetic). Kept a vector to the end: converting for one scalar
/// compiles to a 16-bit insert into whatever register is at hand (an accumulator, as it was),
/// and waiting on that register serialized the loop.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_splat(b: &[u8], i: usize) -> __m256 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Σ u·s over 32 lanes as eight i32 partial sums (`u` unsigned, `s` signed bytes).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_u8i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Σ u·s·scale over 32 lanes as eight i32 partial sums: the scale is applied with the pair
/// sums' widening (`vpmaddwd`), so it costs no multiply of its own.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_u8i8_scaled(u: __m256i, s: __m256i, scale: i32) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(scale as i16))
}

/// 16 bytes of nibbles as 32 bytes: low nibbles first (values 0..16), then high (16..32).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let b = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0xF);
    let lo = _mm_and_si128(b, m);
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    _mm256_set_m128i(hi, lo)
}

pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; every load is within a chunk of `a` or `b`.
    unsafe { dot_f32_avx2(a, b) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * u));
            let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * u));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = _mm256_loadu_ps(a.as_ptr().add(i));
        let y = _mm256_loadu_ps(b.as_ptr().add(i));
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    hsum_ps(s) + tail
}

pub(super) fn widen_f16(src: &[u8], dst: &mut [f32]) {
    // SAFETY: F16C checked by the caller (with AVX2); loads and stores stay within the slices.
    unsafe { widen_f16_f16c(src, dst) }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_f16c(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    super::portable::widen_f16(&src[2 * i..2 * n], &mut dst[i..n]);
}

pub(super) fn widen_bf16(src: &[u8], dst: &mut [f32]) {
    // SAFETY: AVX2 checked by the caller; loads and stores stay within the slices.
    unsafe { widen_bf16_avx2(src, dst) }
}

#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        // A bf16 is the high half of an f32.
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
        i += 8;
    }
    super::portable::widen_bf16(&src[2 * i..2 * n], &mut dst[i..n]);
}

pub(super) fn dot_q8_0(w: &[u8], a: &[Q8Block]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 34 bytes.
    unsafe { dot_q8_0_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_avx2(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.chunks_exact(34).zip(a) {
        let q = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        // q·y = |q| · (y with q's sign).
        let p = dot_u8i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
        let d = _mm256_mul_ps(f16_splat(b, 0), _mm256_set1_ps(a.d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc);
    }
    hsum_ps(acc)
}

pub(super) fn dot_q4_0(w: &[u8], a: &[Q8Block]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 18 bytes.
    unsafe { dot_q4_0_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_avx2(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane the same: Σ d · 8 Σy over the blocks.
    let mut offset = _mm256_setzero_ps();
    for (b, a) in w.chunks_exact(18).zip(a) {
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let p = dot_u8i8(nibbles(b.as_ptr().add(2)), y);
        let d = _mm256_mul_ps(f16_splat(b, 0), _mm256_set1_ps(a.d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc);
        // The values are nibble - 8: Σ(q - 8)·y = Σ q·y - 8 Σ y.
        offset = _mm256_fmadd_ps(d, _mm256_set1_ps(8.0 * a.sum as f32), offset);
    }
    hsum_ps(acc) - _mm256_cvtss_f32(offset)
}

pub(super) fn dot_q4_1(w: &[u8], a: &[Q8Block]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 20 bytes.
    unsafe { dot_q4_1_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_avx2(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane the same: Σ min · Σy over the blocks.
    let mut mins = _mm256_setzero_ps();
    for (b, a) in w.chunks_exact(20).zip(a) {
        let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let p = dot_u8i8(nibbles(b.as_ptr().add(4)), y);
        let da = _mm256_set1_ps(a.d);
        let d = _mm256_mul_ps(f16_splat(b, 0), da);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc);
        let m = _mm256_mul_ps(f16_splat(b, 2), da);
        mins = _mm256_fmadd_ps(m, _mm256_set1_ps(a.sum as f32), mins);
    }
    hsum_ps(acc) + _mm256_cvtss_f32(mins)
}

/// The eight 6-bit scales of a Q4_K/Q5_K block, and Σ minᵢ · Σ yᵢ over its sub-blocks:
/// unpacked without branches (the scalar `scale_min_k4` branches per sub-block), the mins
/// weighted by the activations' 16-sums in one `vpmaddwd`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn k4_scales(q: &[u8], a: &Q8KBlock) -> ([i32; 8], i32) {
    let q: &[u8; 12] = q.try_into().expect("12 scale bytes");
    let mut sc = [0i32; 8];
    let mut mins = [0i16; 16];
    for j in 0..4 {
        sc[j] = (q[j] & 63) as i32;
        sc[j + 4] = ((q[j + 8] & 0xF) | ((q[j] >> 6) << 4)) as i32;
        let (m, m4) = (q[j + 4] & 63, (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
        // Each min covers two of the activations' 16-sums.
        mins[2 * j] = m as i16;
        mins[2 * j + 1] = m as i16;
        mins[2 * j + 8] = m4 as i16;
        mins[2 * j + 9] = m4 as i16;
    }
    let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
    let m = _mm256_loadu_si256(mins.as_ptr() as *const __m256i);
    (sc, hsum_i32(_mm256_madd_epi16(bsums, m)))
}

pub(super) fn dot_q4_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 144 bytes and
    // the activation block's 256 values.
    unsafe { dot_q4_k_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k_avx2(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane the same: Σ dmin · Σ minᵢ Σyᵢ over the blocks.
    let mut mins_acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0xF);
    for (b, a) in w.chunks_exact(144).zip(a) {
        let (sc, mins) = k4_scales(&b[4..16], a);
        let mut sum = _mm256_setzero_si256();
        for c in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i);
            let y0 = _mm256_loadu_si256(a.qs.as_ptr().add(64 * c) as *const __m256i);
            let y1 = _mm256_loadu_si256(a.qs.as_ptr().add(64 * c + 32) as *const __m256i);
            // Pair sums ≤ 2·15·127, times a 6-bit scale: within i32 after vpmaddwd.
            let lo = dot_u8i8_scaled(_mm256_and_si256(q, m4), y0, sc[2 * c]);
            let hi = dot_u8i8_scaled(
                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                y1,
                sc[2 * c + 1],
            );
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(lo, hi));
        }
        let da = _mm256_set1_ps(a.d);
        let d = _mm256_mul_ps(f16_splat(b, 0), da);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, acc);
        let dmin = _mm256_mul_ps(f16_splat(b, 2), da);
        mins_acc = _mm256_fmadd_ps(dmin, _mm256_set1_ps(mins as f32), mins_acc);
    }
    hsum_ps(acc) - _mm256_cvtss_f32(mins_acc)
}

pub(super) fn dot_q5_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 176 bytes and
    // the activation block's 256 values.
    unsafe { dot_q5_k_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k_avx2(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane the same: Σ dmin · Σ minᵢ Σyᵢ over the blocks.
    let mut mins_acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0xF);
    let sixteen = _mm256_set1_epi8(16);
    for (b, a) in w.chunks_exact(176).zip(a) {
        let (sc, mins) = k4_scales(&b[4..16], a);
        let qh = _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i);
        let mut sum = _mm256_setzero_si256();
        for c in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(48 + 32 * c) as *const __m256i);
            let y0 = _mm256_loadu_si256(a.qs.as_ptr().add(64 * c) as *const __m256i);
            let y1 = _mm256_loadu_si256(a.qs.as_ptr().add(64 * c + 32) as *const __m256i);
            let q0 = _mm256_or_si256(_mm256_and_si256(q, m4), q5_high(qh, 2 * c as i32, sixteen));
            let q1 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                q5_high(qh, 2 * c as i32 + 1, sixteen),
            );
            let lo = dot_u8i8_scaled(q0, y0, sc[2 * c]);
            let hi = dot_u8i8_scaled(q1, y1, sc[2 * c + 1]);
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(lo, hi));
        }
        let da = _mm256_set1_ps(a.d);
        let d = _mm256_mul_ps(f16_splat(b, 0), da);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, acc);
        let dmin = _mm256_mul_ps(f16_splat(b, 2), da);
        mins_acc = _mm256_fmadd_ps(dmin, _mm256_set1_ps(mins as f32), mins_acc);
    }
    hsum_ps(acc) - _mm256_cvtss_f32(mins_acc)
}

/// Q5_K's bit 4 of value 32c + l is bit c of qh[l]: a byte 16 where bit `bit` is set.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q5_high(qh: __m256i, bit: i32, sixteen: __m256i) -> __m256i {
    let m = _mm256_set1_epi8(1 << bit);
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), sixteen)
}

/// Q6_K's two high bits at `shift` of each qh byte, moved to bits 4-5.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6_high(qh: __m256i, shift: i32, m2: __m256i) -> __m256i {
    let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
}

pub(super) fn dot_q6_k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    // SAFETY: AVX2/FMA checked by the caller; each block's loads are within its 210 bytes and
    // the activation block's 256 values.
    unsafe { dot_q6_k_avx2(w, a) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_avx2(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    // Every lane the same: Σ d · offset over the blocks.
    let mut offsets = _mm256_setzero_ps();
    for (b, a) in w.chunks_exact(210).zip(a) {
        let sc = &b[192..208];
        // The -32 offset: Σᵢ scᵢ · 32 · Σ yᵢ over the 16 sub-blocks, in one vpmaddwd.
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
        let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
        let offset = 32 * hsum_i32(_mm256_madd_epi16(scales, bsums));
        let mut sum = _mm256_setzero_si256();
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
            let qs = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), q6_high(qh, 0, m2)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), q6_high(qh, 2, m2)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    q6_high(qh, 4, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    q6_high(qh, 6, m2),
                ),
            ];
            for (g, q) in qs.into_iter().enumerate() {
                // 32 values spanning two 16-value sub-blocks: pair sums as i16, then each half
                // weighted by its sub-block's scale.
                let base = 128 * h + 32 * g;
                let y = _mm256_loadu_si256(a.qs.as_ptr().add(base) as *const __m256i);
                let p = _mm256_maddubs_epi16(q, y);
                let s0 = (sc[base / 16] as i8) as i16;
                let s1 = (sc[base / 16 + 1] as i8) as i16;
                let scales = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, scales));
            }
        }
        let d = _mm256_mul_ps(f16_splat(b, 208), _mm256_set1_ps(a.d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, acc);
        offsets = _mm256_fmadd_ps(d, _mm256_set1_ps(offset as f32), offsets);
    }
    hsum_ps(acc) - _mm256_cvtss_f32(offsets)
}

/// `out[r] = Σᵢ x[r·k + i] · wᵢ` for every activation row r (`x` is `out.len()` rows of
/// k = `w`'s length in values) over the weight row `w` stored as `ty` (one of the block types),
/// dequantized block by block in registers with the same f32 operations as
/// `quant::dequantize_row`, so each weight is bitwise the one it writes and only the order of
/// the sums differs from `dot_f32` on a dequantized row. Each decoded vector of weights meets
/// up to four activation rows before the next is decoded.
pub(super) fn gemv_f32(ty: WeightType, w: &[u8], x: &[f32], out: &mut [f32]) {
    let m = out.len();
    let k = x.len() / m.max(1);
    assert_eq!(x.len(), m * k, "x is {m} rows of k");
    assert_eq!(Some(w.len()), ty.row_bytes(k), "{ty} row of {k} values");
    assert!(ty.is_quantized(), "{ty} has no fused kernel");
    let mut r = 0;
    while r < m {
        // Groups of at most four rows, as even as possible (7 = 4 + 3, not 4 + 4 - 1).
        let groups = (m - r).div_ceil(4);
        let rows = (m - r).div_ceil(groups);
        let (x, out) = (&x[r * k..(r + rows) * k], &mut out[r..r + rows]);
        // SAFETY: AVX2/FMA/F16C checked by the caller; `w` holds exactly the blocks of k
        // values and `x` exactly `rows` rows of k (asserted above), which bound every load.
        unsafe {
            match rows {
                1 => rows_of::<1, 4>(ty, w, x.as_ptr(), k, out),
                2 => rows_of::<2, 4>(ty, w, x.as_ptr(), k, out),
                3 => rows_of::<3, 2>(ty, w, x.as_ptr(), k, out),
                _ => rows_of::<4, 2>(ty, w, x.as_ptr(), k, out),
            }
        }
        r += rows;
    }
}

/// R activation rows, each with U accumulators (independent FMA chains: one chain would wait
/// on the FMA's latency at every vector).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_of<const R: usize, const U: usize>(
    ty: WeightType,
    w: &[u8],
    x: *const f32,
    k: usize,
    out: &mut [f32],
) {
    let mut acc = Acc::<R, U> {
        v: [[_mm256_setzero_ps(); U]; R],
        x,
        k,
    };
    match ty {
        WeightType::Q8_0 => gemv_q8_0(w, &mut acc),
        WeightType::Q4_0 => gemv_q4_0(w, &mut acc),
        WeightType::Q4_1 => gemv_q4_1(w, &mut acc),
        WeightType::Q4_K => gemv_q4_k(w, &mut acc),
        WeightType::Q5_K => gemv_q5_k(w, &mut acc),
        WeightType::Q6_K => gemv_q6_k(w, &mut acc),
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => {
            unreachable!("gemv_f32 takes block types only")
        }
    }
    for (o, v) in out.iter_mut().zip(acc.v) {
        let mut s = v[0];
        for u in &v[1..] {
            s = _mm256_add_ps(s, *u);
        }
        *o = hsum_ps(s);
    }
}

/// The running sums of R activation rows (row r at `x + r·k`).
struct Acc<const R: usize, const U: usize> {
    v: [[__m256; U]; R],
    x: *const f32,
    k: usize,
}

impl<const R: usize, const U: usize> Acc<R, U> {
    /// Adds the 8 weights `w` of values i..i+8 times each row's activations there, into
    /// chain `c` (mod U).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(&mut self, i: usize, c: usize, w: __m256) {
        for (r, v) in self.v.iter_mut().enumerate() {
            let a = _mm256_loadu_ps(self.x.add(r * self.k + i));
            v[c % U] = _mm256_fmadd_ps(a, w, v[c % U]);
        }
    }
}

/// 8 bytes at `p`, zero-extended to i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn u8x8(p: *const u8) -> __m256i {
    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn f32s(v: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(v)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q8_0<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    for (bi, b) in w.chunks_exact(34).enumerate() {
        let d = f16_splat(b, 0);
        for v in 0..4 {
            let p = b.as_ptr().add(2 + 8 * v) as *const __m128i;
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p));
            acc.fma(32 * bi + 8 * v, v, _mm256_mul_ps(d, f32s(q)));
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q4_0<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    let (m4, eight) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(8));
    for (bi, b) in w.chunks_exact(18).enumerate() {
        let d = f16_splat(b, 0);
        for h in 0..2 {
            // Byte j holds value j (low nibble) and value j + 16 (high).
            let q = u8x8(b.as_ptr().add(2 + 8 * h));
            let lo = _mm256_sub_epi32(_mm256_and_si256(q, m4), eight);
            let hi = _mm256_sub_epi32(_mm256_srli_epi32(q, 4), eight);
            acc.fma(32 * bi + 8 * h, h, _mm256_mul_ps(d, f32s(lo)));
            acc.fma(32 * bi + 16 + 8 * h, h + 2, _mm256_mul_ps(d, f32s(hi)));
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q4_1<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    let m4 = _mm256_set1_epi32(0xF);
    for (bi, b) in w.chunks_exact(20).enumerate() {
        let (d, min) = (f16_splat(b, 0), f16_splat(b, 2));
        for h in 0..2 {
            let q = u8x8(b.as_ptr().add(4 + 8 * h));
            let lo = f32s(_mm256_and_si256(q, m4));
            let hi = f32s(_mm256_srli_epi32(q, 4));
            acc.fma(32 * bi + 8 * h, h, _mm256_add_ps(_mm256_mul_ps(d, lo), min));
            acc.fma(
                32 * bi + 16 + 8 * h,
                h + 2,
                _mm256_add_ps(_mm256_mul_ps(d, hi), min),
            );
        }
    }
}

/// Sub-block `j`'s scale `d · scⱼ` and min `dmin · mⱼ` of a Q4_K/Q5_K block, as
/// `dequantize_row` rounds them.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn k4_scale_min(b: &[u8], d: __m256, dmin: __m256, j: usize) -> (__m256, __m256) {
    let (s, m) = super::scale_min_k4(j, &b[4..16]);
    (
        _mm256_mul_ps(d, _mm256_set1_ps(s as f32)),
        _mm256_mul_ps(dmin, _mm256_set1_ps(m as f32)),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q4_k<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    let m4 = _mm256_set1_epi32(0xF);
    for (bi, b) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16_splat(b, 0), f16_splat(b, 2));
        for c in 0..4 {
            let (d1, m1) = k4_scale_min(b, d, dmin, 2 * c);
            let (d2, m2) = k4_scale_min(b, d, dmin, 2 * c + 1);
            let i = 256 * bi + 64 * c;
            for j in 0..4 {
                // Byte l of chunk c holds value 64c + l (low nibble) and 64c + 32 + l (high).
                let q = u8x8(b.as_ptr().add(16 + 32 * c + 8 * j));
                let lo = f32s(_mm256_and_si256(q, m4));
                let hi = f32s(_mm256_srli_epi32(q, 4));
                acc.fma(i + 8 * j, j, _mm256_sub_ps(_mm256_mul_ps(d1, lo), m1));
                acc.fma(
                    i + 32 + 8 * j,
                    j + 1,
                    _mm256_sub_ps(_mm256_mul_ps(d2, hi), m2),
                );
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q5_k<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    let (m4, sixteen) = (_mm256_set1_epi32(0xF), _mm256_set1_epi32(16));
    for (bi, b) in w.chunks_exact(176).enumerate() {
        let (d, dmin) = (f16_splat(b, 0), f16_splat(b, 2));
        for c in 0..4 {
            let (d1, m1) = k4_scale_min(b, d, dmin, 2 * c);
            let (d2, m2) = k4_scale_min(b, d, dmin, 2 * c + 1);
            let i = 256 * bi + 64 * c;
            for j in 0..4 {
                let q = u8x8(b.as_ptr().add(48 + 32 * c + 8 * j));
                // Bit 4 of value 64c + l is bit 2c of qh[l], of value 64c + 32 + l bit 2c + 1:
                // shifted up 4 first, bit b lands on 16 after a shift down by b.
                let qh = _mm256_slli_epi32(u8x8(b.as_ptr().add(16 + 8 * j)), 4);
                let h1 = _mm256_srl_epi32(qh, _mm_cvtsi32_si128(2 * c as i32));
                let h2 = _mm256_srl_epi32(qh, _mm_cvtsi32_si128(2 * c as i32 + 1));
                let lo = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_and_si256(h1, sixteen));
                let hi = _mm256_or_si256(_mm256_srli_epi32(q, 4), _mm256_and_si256(h2, sixteen));
                acc.fma(i + 8 * j, j, _mm256_sub_ps(_mm256_mul_ps(d1, f32s(lo)), m1));
                acc.fma(
                    i + 32 + 8 * j,
                    j + 1,
                    _mm256_sub_ps(_mm256_mul_ps(d2, f32s(hi)), m2),
                );
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_q6_k<const R: usize, const U: usize>(w: &[u8], acc: &mut Acc<R, U>) {
    let (m4, m2, offset) = (
        _mm256_set1_epi32(0xF),
        _mm256_set1_epi32(0x30),
        _mm256_set1_epi32(32),
    );
    for (bi, b) in w.chunks_exact(210).enumerate() {
        let d = f16_splat(b, 208);
        for h in 0..2 {
            let (ql, qh) = (b.as_ptr().add(64 * h), b.as_ptr().add(128 + 32 * h));
            let sc = &b[192 + 8 * h..200 + 8 * h];
            for j in 0..4 {
                // Values l, l + 32, l + 64, l + 96 of this half (l = 8j..8j + 8): low 4 bits
                // from ql[l] and ql[l + 32], high 2 from qh[l] at bits 0, 2, 4, 6; 16 values
                // per scale.
                let (a, c) = (u8x8(ql.add(8 * j)), u8x8(ql.add(32 + 8 * j)));
                let hb = u8x8(qh.add(8 * j));
                let qs = [
                    _mm256_or_si256(
                        _mm256_and_si256(a, m4),
                        _mm256_and_si256(_mm256_slli_epi32(hb, 4), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(c, m4),
                        _mm256_and_si256(_mm256_slli_epi32(hb, 2), m2),
                    ),
                    _mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_and_si256(hb, m2)),
                    _mm256_or_si256(
                        _mm256_srli_epi32(c, 4),
                        _mm256_and_si256(_mm256_srli_epi32(hb, 2), m2),
                    ),
                ];
                for (g, q) in qs.into_iter().enumerate() {
                    let s = (sc[j / 2 + 2 * g] as i8) as f32;
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(s));
                    let v = f32s(_mm256_sub_epi32(q, offset));
                    acc.fma(
                        256 * bi + 128 * h + 32 * g + 8 * j,
                        g,
                        _mm256_mul_ps(scale, v),
                    );
                }
            }
        }
    }
}
