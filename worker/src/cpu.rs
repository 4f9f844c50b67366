//! The CPU backend: f32 activations and KV cache, plain Rust loops over slices. Weights stay in
//! the type the checkpoint stores them in (bf16, f16, GGUF blocks), computed by
//! [`crate::matmul`]'s kernels, unless [`CpuBackend::exact_f32`] widens them; f32 weights use
//! the `gemm` crate (candle's matrix engine) for products with many rows and our own threaded
//! GEMV for few rows, where decoding is bound by reading the weights once. The f32 path is the
//! reference the CUDA backend is checked against, so clarity wins over cleverness everywhere
//! but the hot loops.

use rayon::prelude::*;
use switchyard_model::{HostWeight, ModelConfig, WeightType};

use crate::backend::{Backend, BackendError, FfnWeights, Hardware, Qkv, Routes};
use crate::batch::AttentionBatch;
use switchyard_scheduler::kv_blocks::FREED;

/// A row-major `[rows, cols]` f32 matrix: both activations and weights on the CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Mat {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self, BackendError> {
        if data.len() != rows * cols {
            return Err(BackendError::Shape(format!(
                "{} values cannot form a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(Mat { data, rows, cols })
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Paged K/V memory: per layer, `[block, slot, kv_head, head_dim]` for K and for V.
pub struct CpuKvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CpuKvCache {
    fn slot(&self, block: u32, offset: usize) -> usize {
        ((block as usize * self.block_size + offset) * self.kv_heads) * self.head_dim
    }
}

/// The CPU backend. [`CpuBackend::default`] keeps weights in their stored type and multiplies
/// with f32 activations; [`CpuBackend::exact_f32`] widens every weight to f32 (the exact
/// reference path, for checks against other implementations); [`CpuBackend::q8_activations`]
/// quantizes activations to 8 bits for the products with quantized weights, as llama.cpp does.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    widen: bool,
    q8: bool,
}

impl CpuBackend {
    pub fn exact_f32() -> Self {
        CpuBackend {
            widen: true,
            q8: false,
        }
    }

    pub fn q8_activations(self) -> Self {
        CpuBackend { q8: true, ..self }
    }
}

/// A weight on the CPU: f32 values, or the checkpoint's bytes in their stored type (often
/// still in the file's memory map).
#[derive(Debug, Clone)]
pub enum CpuWeight {
    F32(Mat),
    Stored(HostWeight),
}

impl CpuWeight {
    pub fn rows(&self) -> usize {
        match self {
            CpuWeight::F32(m) => m.rows,
            CpuWeight::Stored(w) => w.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            CpuWeight::F32(m) => m.cols,
            CpuWeight::Stored(w) => w.cols(),
        }
    }

    /// Bytes held in memory (mapped bytes count: they are resident once touched).
    pub fn bytes(&self) -> usize {
        match self {
            CpuWeight::F32(m) => m.data.len() * 4,
            CpuWeight::Stored(w) => w.bytes().len(),
        }
    }

    /// A vector weight (norms) as f32 values; vectors are always widened on load.
    fn values(&self) -> Result<&[f32], BackendError> {
        match self {
            CpuWeight::F32(m) => Ok(&m.data),
            CpuWeight::Stored(w) => Err(shape_err(format!(
                "a {} weight used where f32 values are needed",
                w.ty()
            ))),
        }
    }
}

/// Up to this many rows a product runs as GEMV: each weight row is read once for all rows.
const GEMV_MAX_ROWS: usize = 4;

fn shape_err(msg: String) -> BackendError {
    BackendError::Shape(msg)
}

/// `x[m, k] · w[n, k]ᵀ` into a new `[m, n]` buffer: the f32 weights' product.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    if m <= GEMV_MAX_ROWS {
        // Each task takes a run of weight rows and produces their outputs for every input row
        // (stored transposed, [n, m]); the weights stream through memory once.
        let mut out_t = vec![0.0f32; n * m];
        let per_task = (n / (rayon::current_num_threads() * 8)).max(16);
        out_t
            .par_chunks_mut(per_task * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (jj, outs) in chunk.chunks_mut(m).enumerate() {
                    let j = task * per_task + jj;
                    let wrow = &w[j * k..(j + 1) * k];
                    for (r, o) in outs.iter_mut().enumerate() {
                        *o = dot(&x[r * k..(r + 1) * k], wrow);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0.0f32; m * n];
        for j in 0..n {
            for r in 0..m {
                out[r * n + j] = out_t[j * m + r];
            }
        }
        return out;
    }
    let mut out = vec![0.0f32; m * n];
    // SAFETY: the pointers cover exactly the [m,k], [k,n] (as wᵀ: column stride k, row stride
    // 1) and [m,n] buffers checked above; `out` is not aliased.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    out
}

/// Dot product, with an AVX2+FMA path chosen at run time (the binary stays portable).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let va = _mm256_loadu_ps(pa.add(i + 8 * j));
            let vb = _mm256_loadu_ps(pb.add(i + 8 * j));
            *acc = _mm256_fmadd_ps(va, vb, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `y += a * x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Rotates pairs `(i, i + d/2)` of each head by `pos · θ^(-2i/d)`: the "rotate half" layout
/// Hugging Face checkpoints use.
fn apply_rope(x: &mut Mat, positions: &[u32], head_dim: usize, theta: f64) {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let cols = x.cols;
    x.data
        .par_chunks_mut(cols)
        .zip(positions)
        .for_each(|(row, &pos)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|f| {
                    let a = pos as f64 * f;
                    (a.cos() as f32, a.sin() as f32)
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
}

impl CpuBackend {
    fn check_cols(what: &str, x: &Mat, cols: usize) -> Result<(), BackendError> {
        if x.cols != cols {
            return Err(shape_err(format!(
                "{what}: input has {} columns, weight expects {cols}",
                x.cols
            )));
        }
        Ok(())
    }

    fn swiglu(&self, x: &Mat, w: &FfnWeights<CpuWeight>) -> Result<Mat, BackendError> {
        let gate = self.linear(x, &w.gate)?;
        let up = self.linear(x, &w.up)?;
        let act: Vec<f32> = gate
            .data
            .iter()
            .zip(&up.data)
            .map(|(g, u)| silu(*g) * u)
            .collect();
        let act = Mat::new(act, x.rows, gate.cols)?;
        self.linear(&act, &w.down)
    }
}

/// The CPU backend serves any model, in the machine's memory.
impl Hardware for CpuBackend {
    type Backend = CpuBackend;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    /// Total and available memory of this machine, from `/proc/meminfo` (0 where unknown).
    fn memory(&self) -> (u64, u64) {
        let field = |name| crate::service::proc_bytes("/proc/meminfo", name);
        (field("MemTotal:"), field("MemAvailable:"))
    }

    fn weight_type(&self, stored: WeightType) -> WeightType {
        self.kept_type(stored)
    }

    fn backend(&self, _: &ModelConfig) -> Result<CpuBackend, BackendError> {
        Ok(*self)
    }
}

impl Backend for CpuBackend {
    type Tensor = Mat;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    const VALUE_BYTES: u64 = 4;

    /// Vectors (norm weights) and f32 matrices become f32; other matrices stay as stored
    /// unless this backend widens everything.
    fn kept_type(&self, stored: WeightType) -> WeightType {
        match self.widen {
            true => WeightType::F32,
            false => stored,
        }
    }

    fn weight(&self, w: HostWeight) -> Result<CpuWeight, BackendError> {
        if self.widen || w.rows() == 1 || w.ty() == WeightType::F32 {
            let (rows, cols) = (w.rows(), w.cols());
            return Ok(CpuWeight::F32(Mat::new(w.to_f32(), rows, cols)?));
        }
        Ok(CpuWeight::Stored(w))
    }

    fn tensor(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Mat, BackendError> {
        Mat::new(data, rows, cols)
    }

    fn to_host(&self, t: &Mat) -> Result<Vec<f32>, BackendError> {
        Ok(t.data.clone())
    }

    fn rows(&self, t: &Mat) -> usize {
        t.rows
    }

    fn cols(&self, t: &Mat) -> usize {
        t.cols
    }

    fn add(&self, x: &Mat, residual: &mut Mat) -> Result<(), BackendError> {
        if (x.rows, x.cols) != (residual.rows, residual.cols) {
            return Err(shape_err(format!(
                "add: [{}, {}] into a [{}, {}] residual",
                x.rows, x.cols, residual.rows, residual.cols
            )));
        }
        residual
            .data
            .iter_mut()
            .zip(&x.data)
            .for_each(|(h, r)| *h += r);
        Ok(())
    }

    fn kv_cache(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<CpuKvCache, BackendError> {
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        Ok(CpuKvCache {
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            block_size,
            kv_heads,
            head_dim,
        })
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<Mat, BackendError> {
        let cols = table.cols();
        let mut data = vec![0f32; ids.len() * cols];
        for (&id, out) in ids.iter().zip(data.chunks_exact_mut(cols.max(1))) {
            if id as usize >= table.rows() {
                return Err(shape_err(format!(
                    "token id {id} is out of range for a vocabulary of {}",
                    table.rows()
                )));
            }
            match table {
                CpuWeight::F32(m) => out.copy_from_slice(m.row(id as usize)),
                CpuWeight::Stored(w) => w.dequantize_row_into(id as usize, out),
            }
        }
        Mat::new(data, ids.len(), cols)
    }

    fn rms_norm(&self, x: &Mat, weight: &CpuWeight, eps: f32) -> Result<Mat, BackendError> {
        let weight = weight.values()?;
        Self::check_cols("rms_norm", x, weight.len())?;
        let mut out = x.data.clone();
        out.par_chunks_mut(x.cols).for_each(|row| {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for (v, w) in row.iter_mut().zip(weight) {
                *v = *v * inv * w;
            }
        });
        Mat::new(out, x.rows, x.cols)
    }

    fn linear(&self, x: &Mat, w: &CpuWeight) -> Result<Mat, BackendError> {
        Self::check_cols("linear", x, w.cols())?;
        let y = match w {
            CpuWeight::F32(w) => matmul_t(&x.data, x.rows, x.cols, &w.data, w.rows),
            CpuWeight::Stored(w) => match self.q8 {
                true => crate::matmul::matmul_t(&x.data, x.rows, w),
                false => crate::matmul::matmul_t_f32(&x.data, x.rows, w),
            },
        };
        Mat::new(y, x.rows, w.rows())
    }

    fn linear_add(&self, x: &Mat, w: &CpuWeight, residual: &mut Mat) -> Result<(), BackendError> {
        let y = self.linear(x, w)?;
        if y.cols != residual.cols || y.rows != residual.rows {
            return Err(shape_err(
                "linear_add: output and residual differ in shape".into(),
            ));
        }
        residual
            .data
            .iter_mut()
            .zip(&y.data)
            .for_each(|(r, y)| *r += y);
        Ok(())
    }

    fn qkv_rope(
        &self,
        x: &Mat,
        wq: &CpuWeight,
        wk: &CpuWeight,
        wv: &CpuWeight,
        positions: &[u32],
        head_dim: usize,
        rope_theta: f64,
    ) -> Result<Qkv<Mat>, BackendError> {
        if positions.len() != x.rows {
            return Err(shape_err(format!(
                "qkv_rope: {} positions for {} rows",
                positions.len(),
                x.rows
            )));
        }
        let mut q = self.linear(x, wq)?;
        let mut k = self.linear(x, wk)?;
        let v = self.linear(x, wv)?;
        apply_rope(&mut q, positions, head_dim, rope_theta);
        apply_rope(&mut k, positions, head_dim, rope_theta);
        Ok(Qkv { q, k, v })
    }

    fn attention(
        &self,
        q: &Mat,
        k: &Mat,
        v: &Mat,
        cache: &mut CpuKvCache,
        layer: usize,
        batch: &AttentionBatch,
    ) -> Result<Mat, BackendError> {
        let (hd, kvh, bs) = (cache.head_dim, cache.kv_heads, cache.block_size);
        if bs != batch.block_size || k.cols != kvh * hd || !q.cols.is_multiple_of(hd) {
            return Err(shape_err(
                "attention: cache and batch shapes disagree".into(),
            ));
        }
        let heads = q.cols / hd;
        let group = heads / kvh;
        let num_blocks = cache.k[layer].len() / (bs * kvh * hd);
        let block_of = |table: &[u32], pos: usize| -> Result<u32, BackendError> {
            match table.get(pos / bs) {
                Some(&b) if b != FREED && (b as usize) < num_blocks => Ok(b),
                _ => Err(shape_err(format!(
                    "attention: no KV block for position {pos}"
                ))),
            }
        };

        // 1. Write this step's keys and values into their slots.
        let mut row_pos = vec![(0usize, 0usize); q.rows]; // (sequence index, position)
        for (si, s) in batch.seqs.iter().enumerate() {
            for (i, r) in s.rows.clone().enumerate() {
                let pos = s.start_pos + i;
                row_pos[r] = (si, pos);
                let dst = cache.slot(block_of(&s.block_table, pos)?, pos % bs);
                cache.k[layer][dst..dst + kvh * hd].copy_from_slice(k.row(r));
                cache.v[layer][dst..dst + kvh * hd].copy_from_slice(v.row(r));
            }
        }
        // Every key a query will read must have a block: check once, outside the hot loop.
        for s in &batch.seqs {
            let last = s.start_pos + s.rows.len();
            for pos in batch.first_visible(s.start_pos)..last {
                block_of(&s.block_table, pos)?;
            }
        }

        // 2. Each (row, head) attends over its visible keys.
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0.0f32; q.rows * q.cols];
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each_init(Vec::new, |scores, (i, o)| {
                let (r, h) = (i / heads, i % heads);
                let (si, pos) = row_pos[r];
                let table = &batch.seqs[si].block_table;
                let g = h / group;
                let qh = &q.data[r * q.cols + h * hd..r * q.cols + (h + 1) * hd];
                let first = batch.first_visible(pos);
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for p in first..=pos {
                    let at = ((table[p / bs] as usize * bs + p % bs) * kvh + g) * hd;
                    let s = dot(qh, &kc[at..at + hd]) * scale;
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (p, s) in (first..=pos).zip(scores.iter()) {
                    let at = ((table[p / bs] as usize * bs + p % bs) * kvh + g) * hd;
                    axpy(o, s / sum, &vc[at..at + hd]);
                }
            });
        Mat::new(out, q.rows, q.cols)
    }

    fn router_topk(&self, x: &Mat, gate: &CpuWeight, top_k: usize) -> Result<Routes, BackendError> {
        let logits = self.linear(x, gate)?;
        let mut experts = Vec::with_capacity(x.rows * top_k);
        let mut weights = Vec::with_capacity(x.rows * top_k);
        for t in 0..x.rows {
            let row = logits.row(t);
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let probs: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = probs.iter().sum();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            // The trait's rule: by logit (probabilities can tie where logits do not, e.g. when
            // both underflow), highest first, ties to the lower expert id.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let chosen = &order[..top_k];
            let kept: f32 = chosen.iter().map(|&e| probs[e] / total).sum();
            for &e in chosen {
                experts.push(e as u32);
                weights.push(probs[e] / total / kept);
            }
        }
        Ok(Routes {
            top_k,
            experts,
            weights,
        })
    }

    fn experts_ffn_add(
        &self,
        x: &Mat,
        routes: &Routes,
        experts: &[(u32, &FfnWeights<CpuWeight>)],
        residual: &mut Mat,
    ) -> Result<(), BackendError> {
        for &(e, w) in experts {
            // Tokens routed to this expert and their weights, gathered into one matrix.
            let picks: Vec<(usize, f32)> = routes
                .experts
                .iter()
                .zip(&routes.weights)
                .enumerate()
                .filter(|(_, (ex, _))| **ex == e)
                .map(|(i, (_, wt))| (i / routes.top_k, *wt))
                .collect();
            if picks.is_empty() {
                continue;
            }
            let mut gathered = Vec::with_capacity(picks.len() * x.cols);
            for &(t, _) in &picks {
                gathered.extend_from_slice(x.row(t));
            }
            let y = self.swiglu(&Mat::new(gathered, picks.len(), x.cols)?, w)?;
            for (i, &(t, wt)) in picks.iter().enumerate() {
                axpy(
                    &mut residual.data[t * x.cols..(t + 1) * x.cols],
                    wt,
                    y.row(i),
                );
            }
        }
        Ok(())
    }

    fn mlp_add(
        &self,
        x: &Mat,
        w: &FfnWeights<CpuWeight>,
        residual: &mut Mat,
    ) -> Result<(), BackendError> {
        let y = self.swiglu(x, w)?;
        residual
            .data
            .iter_mut()
            .zip(&y.data)
            .for_each(|(r, y)| *r += y);
        Ok(())
    }

    fn select_rows(&self, x: &Mat, rows: &[usize]) -> Result<Mat, BackendError> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r >= x.rows {
                return Err(shape_err(format!("select_rows: row {r} of {}", x.rows)));
            }
            data.extend_from_slice(x.row(r));
        }
        Mat::new(data, rows.len(), x.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use switchyard_scheduler::step::{LogitsWanted, SeqInput};

    fn weight(data: Vec<f32>, rows: usize, cols: usize) -> Result<CpuWeight, BackendError> {
        CpuBackend::default().weight_f32(data, rows, cols)
    }

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_paths_agree_with_naive() {
        let mut rng = switchyard_model::rng::Rng::new(1);
        for (m, k, n) in [
            (1, 67, 33),
            (3, 64, 130),
            (4, 5, 7),
            (9, 100, 31),
            (37, 64, 64),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let got = matmul_t(&x, m, k, &w, n);
            for (a, b) in got.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn dot_paths_agree() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        assert!((dot(&a, &b) - dot_portable(&a, &b)).abs() < 1e-5);
    }

    #[test]
    fn router_renormalises_top_k() {
        let cpu = CpuBackend::default();
        let x = Mat::new(vec![1.0, 0.0], 1, 2).unwrap();
        // Expert logits 2, 1, 0, 3 → top-2 are experts 3 and 0.
        let gate = weight(vec![2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0, 0.0], 4, 2).unwrap();
        let r = cpu.router_topk(&x, &gate, 2).unwrap();
        assert_eq!(r.experts, vec![3, 0]);
        let e = 1.0f32.exp();
        assert!((r.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn router_picks_by_logit_when_probabilities_underflow_alike() {
        // Logits -300, -200, 0, 1: the first two probabilities are both 0 in f32, but the
        // logits still order them, so top-3 is 3, 2, 1 (as the GPU kernel picks).
        let x = Mat::new(vec![1.0, 0.0], 1, 2).unwrap();
        let gate = weight(vec![-300.0, 0.0, -200.0, 0.0, 0.0, 0.0, 1.0, 0.0], 4, 2).unwrap();
        let r = CpuBackend::default().router_topk(&x, &gate, 3).unwrap();
        assert_eq!(r.experts, vec![3, 2, 1]);
        let e = (-1.0f32).exp();
        assert_eq!(r.weights[2], 0.0);
        assert!((r.weights[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert!((r.weights[1] - e / (1.0 + e)).abs() < 1e-6);
        // Equal logits: the lower expert id first.
        let gate = weight(vec![1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 2.0, 0.0], 4, 2).unwrap();
        let r = CpuBackend::default().router_topk(&x, &gate, 3).unwrap();
        assert_eq!(r.experts, vec![1, 3, 0]);
    }

    #[test]
    fn empty_sequences_in_a_step_change_nothing() {
        // Two sequences attended alone, then with empty sequences before, between and after
        // them: the same output rows, and the empty ones write nothing into the cache.
        let mut rng = switchyard_model::rng::Rng::new(4);
        let (hd, heads, kvh, bs) = (8, 4, 2, 4);
        let seq = |tokens: usize, start_pos: usize, table: Vec<u32>| SeqInput {
            tokens: vec![0; tokens],
            start_pos,
            block_table: table,
            logits: LogitsWanted::Last,
        };
        let n = 5;
        let mut randn =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
        let (q, k, v) = (
            randn(n * heads * hd),
            randn(n * kvh * hd),
            randn(n * kvh * hd),
        );
        let run = |inputs: &[SeqInput]| {
            let cpu = CpuBackend::default();
            let mut cache = cpu.kv_cache(1, 4, bs, kvh, hd).unwrap();
            let batch = AttentionBatch::new(inputs, bs, None);
            let t = |d: &Vec<f32>, cols| Mat::new(d.clone(), n, cols).unwrap();
            let out = cpu
                .attention(
                    &t(&q, heads * hd),
                    &t(&k, kvh * hd),
                    &t(&v, kvh * hd),
                    &mut cache,
                    0,
                    &batch,
                )
                .unwrap();
            (out.data, cache.k[0].clone())
        };
        let alone = run(&[seq(4, 0, vec![0]), seq(1, 0, vec![1])]);
        let with_empty = run(&[
            seq(0, 0, vec![2]),
            seq(4, 0, vec![0]),
            seq(0, 3, vec![3]),
            seq(1, 0, vec![1]),
            seq(0, 0, vec![]),
        ]);
        assert_eq!(alone, with_empty);
    }

    #[test]
    fn embed_rejects_out_of_range_ids() {
        let table = weight(vec![0.0; 6], 3, 2).unwrap();
        let e = CpuBackend::default()
            .embed(&table, &[1, 3])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token id 3") && e.contains("vocabulary of 3"),
            "{e}"
        );
    }
}
