//! `x · wᵀ` on the CPU with the weight `w` in its stored type (f16, bf16, or one of ggml's
//! block formats), read as stored: no dequantized copy of a whole weight is ever made.
//!
//! Two ways, chosen by the caller. [`matmul_t_f32`] (the CPU backend's default) keeps the
//! activations in f32: exact up to f32 rounding. With AVX2 its block-type kernels decode each
//! block in registers (with `dequantize_row`'s f32 operations, so bitwise its weights) and FMA
//! every decoded vector into up to four activation rows; elsewhere each weight row is
//! dequantized into L1 and meets the activations with `dot_f32`.
//! [`matmul_t`] is llama.cpp's design (`--activations q8`). The activations (small: `m` rows of `k`) are quantized on the fly
//! into the matching 8-bit form, and each output is an integer dot product per block, scaled
//! once per block in f32:
//! - Q8_0, Q4_0, Q4_1 weights meet [`Q8Block`]s: 32 values as i8 under one f32 scale, with
//!   the sum of the 32 (for Q4_0's offset of 8 and Q4_1's min, which factor out of the dot);
//! - Q4_K, Q5_K, Q6_K weights meet [`Q8KBlock`]s: 256 values as i8 under one f32 scale, with
//!   the sum of each 16 (the K-quants' mins and Q6_K's offset of 32 factor out the same way);
//! - f16 and bf16 rows are widened to f32 (in registers, a row at a time into an L1-resident
//!   buffer) and meet the f32 activations with f32 FMA; f32 weights are handled the same way,
//!   though the CPU backend's `gemm` path is faster for them at prefill sizes.
//!
//! Accuracy: quantizing the activations to 8 bits costs each output a relative error of about
//! (max|x| / 127) / √12 / rms(x) per block, ≈ 0.6% for Gaussian activations: measured on
//! random Gaussian data with k = 4096, the relative rms error of the outputs against f64 math
//! on the dequantized weights is 0.52% (Q8_0), 0.54% (Q4_0), 0.59% (Q4_1), 0.70% (Q4_K), 0.70%
//! (Q5_K) and 0.67% (Q6_K); the 256-blocks err a little more, their max spanning more values.
//! That is well below the weights' own quantization error (relative rms 0.5% for Q8_0, 2% for
//! Q6_K, 7–9% for the 4-bit types). f16/bf16 weights are exact up to f32 summation order.
//!
//! Work is split over output rows (weight rows) with rayon, so the weights stream from memory
//! once; each weight row, once in L1, meets every activation row (decode batches are small, so
//! their prepared activations stay in L2). From [`GEMM_MIN_ROWS`] activation rows on (prefill)
//! the integer kernels lose to f32 FMA: each task dequantizes a tile of weight rows to f32 once
//! and multiplies it with the `gemm` crate's kernel, so a weight block is read and decoded once
//! per matmul, not once per activation row; those outputs are exact up to f32 rounding.
//!
//! The kernels are chosen at run time by [`Isa::best`]: AVX2 with FMA (and F16C) on x86-64
//! where present, else the portable scalar code, which is always compiled and is the definition
//! the SIMD kernels are tested against.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;
use switchyard_model::{HostWeight, WeightType};

/// 32 activations quantized as `d · qs`, with `sum` = Σ qs.
#[derive(Clone, Copy)]
pub(crate) struct Q8Block {
    d: f32,
    sum: i32,
    qs: [i8; 32],
}

/// 256 activations quantized as `d · qs`, with `bsums[i]` = Σ qs over values 16i..16i+16.
#[derive(Clone, Copy)]
pub(crate) struct Q8KBlock {
    d: f32,
    qs: [i8; 256],
    bsums: [i16; 16],
}

impl Q8KBlock {
    /// Σ qs over the 32 values of sub-block `j` (a Q4_K/Q5_K scale's span).
    fn sum32(&self, j: usize) -> i32 {
        self.bsums[2 * j] as i32 + self.bsums[2 * j + 1] as i32
    }
}

/// Rounds `x` to i8 steps of `amax / 127`.
fn quantize_i8(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    d
}

fn quantize_q8(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(32)
        .map(|x| {
            let mut b = Q8Block {
                d: 0.0,
                sum: 0,
                qs: [0; 32],
            };
            b.d = quantize_i8(x, &mut b.qs);
            b.sum = b.qs.iter().map(|&q| q as i32).sum();
            b
        })
        .collect()
}

fn quantize_q8k(x: &[f32]) -> Vec<Q8KBlock> {
    x.chunks_exact(256)
        .map(|x| {
            let mut b = Q8KBlock {
                d: 0.0,
                qs: [0; 256],
                bsums: [0; 16],
            };
            b.d = quantize_i8(x, &mut b.qs);
            for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = q.iter().map(|&q| q as i16).sum();
            }
            b
        })
        .collect()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Scalar Rust, on every CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// Every instruction set this CPU runs, the portable one first.
    pub fn supported() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            v.push(Isa::Avx2);
        }
        v
    }

    /// The fastest this CPU runs.
    pub fn best() -> Isa {
        *Isa::supported()
            .last()
            .expect("the portable kernels always run")
    }
}

/// `x[m, k] · wᵀ` → `[m, w.rows()]` (row-major), with `k = w.cols()`, in the fastest
/// instruction set this CPU has.
pub fn matmul_t(x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    matmul_t_with(Isa::best(), x, m, w)
}

/// [`matmul_t`] with the activations kept in f32: each weight is dequantized (in registers
/// for the block types, block by block, where the instruction set has fused kernels; else a
/// row at a time into L1) and meets them with f32 FMA, so the result is exact up to f32
/// rounding, at the cost of decoding every weight once per product instead of integer dots.
pub fn matmul_t_f32(x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    matmul_t_f32_with(Isa::best(), x, m, w)
}

/// [`matmul_t_f32`] with the kernels of instruction set `isa`, which must be one of
/// [`Isa::supported`].
pub fn matmul_t_f32_with(isa: Isa, x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    matmul(isa, x, m, w, false)
}

/// The prepared activations of one matmul, one row after another.
enum Acts<'a> {
    F32(&'a [f32]),
    Q8(Vec<Q8Block>),
    Q8K(Vec<Q8KBlock>),
}

/// [`matmul_t`] with the integer and f16/bf16 kernels of instruction set `isa`, which must be
/// one of [`Isa::supported`] (from [`GEMM_MIN_ROWS`] rows on, the `gemm` crate's kernels run,
/// which choose their own).
pub fn matmul_t_with(isa: Isa, x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    matmul(isa, x, m, w, true)
}

/// `quantize`: 8-bit activations and integer dots for block types below [`GEMM_MIN_ROWS`] rows.
fn matmul(isa: Isa, x: &[f32], m: usize, w: &HostWeight, quantize: bool) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "x is [m, k] = [{m}, {k}]");
    assert!(
        Isa::supported().contains(&isa),
        "{isa:?} kernels on a CPU without them"
    );
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let ty = w.ty();
    if m >= GEMM_MIN_ROWS {
        return dequantized_gemm(x, m, w);
    }
    let acts = match ty {
        _ if !quantize => Acts::F32(x),
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => Acts::F32(x),
        WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1 => Acts::Q8(
            x.par_chunks(k)
                .flat_map_iter(quantize_q8)
                .collect::<Vec<_>>(),
        ),
        WeightType::Q4_K | WeightType::Q5_K | WeightType::Q6_K => Acts::Q8K(
            x.par_chunks(k)
                .flat_map_iter(quantize_q8k)
                .collect::<Vec<_>>(),
        ),
    };
    let kernels = Kernels::new(isa, ty);

    // Each task takes a run of weight rows and writes their outputs for every activation row,
    // transposed ([n, m]); enough tasks per thread to balance uneven cores.
    let mut out_t = vec![0f32; n * m];
    let per_task = n.div_ceil(rayon::current_num_threads() * 8).max(4);
    out_t
        .par_chunks_mut(per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let rows = task * per_task..task * per_task + chunk.len() / m;
            let fused = kernels.has_gemv_f32();
            let widen = matches!(acts, Acts::F32(_)) && !fused;
            let mut wide = vec![0f32; if widen { k } else { 0 }];
            for (j, outs) in rows.zip(chunk.chunks_exact_mut(m)) {
                let wrow = w.row(j);
                match &acts {
                    Acts::F32(a) if fused => kernels.gemv_f32(wrow, a, outs),
                    Acts::F32(a) => {
                        kernels.widen(wrow, &mut wide);
                        for (o, a) in outs.iter_mut().zip(a.chunks_exact(k)) {
                            *o = kernels.dot_f32(a, &wide);
                        }
                    }
                    Acts::Q8(a) => {
                        for (o, a) in outs.iter_mut().zip(a.chunks_exact(k / 32)) {
                            *o = kernels.dot_q8(wrow, a);
                        }
                    }
                    Acts::Q8K(a) => {
                        for (o, a) in outs.iter_mut().zip(a.chunks_exact(k / 256)) {
                            *o = kernels.dot_q8k(wrow, a);
                        }
                    }
                }
            }
        });
    if m == 1 {
        return out_t;
    }
    transpose(&out_t, n, m)
}

/// From this many activation rows on, [`matmul_t`] dequantizes tiles of weight rows to f32 and
/// multiplies them with the `gemm` crate's f32 kernel: dequantizing costs once per weight value
/// what the integer kernels pay once per weight value *and activation row*, so with enough rows
/// f32 FMA on a tile in cache beats them (and the activations need no quantizing).
pub const GEMM_MIN_ROWS: usize = 16;

/// Weight rows per dequantized tile: 32 rows of k ≤ 14336 f32 values stay within L2.
const GEMM_TILE_ROWS: usize = 32;

fn dequantized_gemm(x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(GEMM_TILE_ROWS * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let rows = chunk.len() / m;
            let mut wf = vec![0f32; rows * k];
            for (i, dst) in wf.chunks_exact_mut(k).enumerate() {
                w.dequantize_row_into(task * GEMM_TILE_ROWS + i, dst);
            }
            // SAFETY: dst is `chunk` as [m, rows] with element (r, j) at j·m + r; lhs is `x`
            // as [m, k] row-major; rhs is `wf` as [k, rows] with element (i, j) at j·k + i.
            // All three are exactly those sizes and `chunk` is not aliased.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    chunk.as_mut_ptr(),
                    m as isize,
                    1,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wf.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    transpose(&out_t, n, m)
}

/// `[n, m]` → `[m, n]`.
fn transpose(t: &[f32], n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return t.to_vec();
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in t.chunks_exact(m).enumerate() {
        for (r, v) in col.iter().enumerate() {
            out[r * n + j] = *v;
        }
    }
    out
}

/// The dot-product functions of one weight type in one instruction set.
struct Kernels {
    isa: Isa,
    ty: WeightType,
}

impl Kernels {
    fn new(isa: Isa, ty: WeightType) -> Self {
        Kernels { isa, ty }
    }

    fn widen(&self, w: &[u8], out: &mut [f32]) {
        match (self.isa, self.ty) {
            (_, WeightType::F32) => {
                for (o, b) in out.iter_mut().zip(w.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::F16) => x86::widen_f16(w, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::BF16) => x86::widen_bf16(w, out),
            (_, WeightType::F16) => portable::widen_f16(w, out),
            (_, WeightType::BF16) => portable::widen_bf16(w, out),
            (_, ty) => switchyard_model::quant::dequantize_row(ty, w, out),
        }
    }

    /// Whether [`Kernels::gemv_f32`] runs: block types decoded in registers, no row buffer.
    fn has_gemv_f32(&self) -> bool {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => self.ty.is_quantized(),
            _ => false,
        }
    }

    /// `out[r]` = row r of `x` (`out.len()` rows) · the weight row `w`, fused: only where
    /// [`Kernels::has_gemv_f32`] says so.
    fn gemv_f32(&self, w: &[u8], x: &[f32], out: &mut [f32]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::gemv_f32(self.ty, w, x, out),
            isa => unreachable!("{isa:?} has no fused f32 GEMV"),
        }
    }

    fn dot_f32(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::dot_f32(a, b),
            _ => portable::dot_f32(a, b),
        }
    }

    fn dot_q8(&self, w: &[u8], a: &[Q8Block]) -> f32 {
        match (self.isa, self.ty) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q8_0) => x86::dot_q8_0(w, a),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q4_0) => x86::dot_q4_0(w, a),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q4_1) => x86::dot_q4_1(w, a),
            (_, WeightType::Q8_0) => portable::dot_q8_0(w, a),
            (_, WeightType::Q4_0) => portable::dot_q4_0(w, a),
            (_, WeightType::Q4_1) => portable::dot_q4_1(w, a),
            (_, ty) => unreachable!("{ty} does not meet 32-blocks"),
        }
    }

    fn dot_q8k(&self, w: &[u8], a: &[Q8KBlock]) -> f32 {
        match (self.isa, self.ty) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q4_K) => x86::dot_q4_k(w, a),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q5_K) => x86::dot_q5_k(w, a),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightType::Q6_K) => x86::dot_q6_k(w, a),
            (_, WeightType::Q4_K) => portable::dot_q4_k(w, a),
            (_, WeightType::Q5_K) => portable::dot_q5_k(w, a),
            (_, WeightType::Q6_K) => portable::dot_q6_k(w, a),
            (_, ty) => unreachable!("{ty} does not meet 256-blocks"),
        }
    }
}

#[cfg(test)]
mod tests;
