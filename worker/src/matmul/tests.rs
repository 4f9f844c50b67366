//! Every kernel against f64 math on the dequantized weights (`model::quant::dequantize_row`,
//! itself checked bit for bit against gguf-py): exactly up to f32 summation order when the
//! activations are taken as quantized, and within the activation quantization's error bound
//! against the unquantized activations; every SIMD instruction set this CPU runs against the
//! portable kernels.

use switchyard_model::quant::quantize_row;
use switchyard_model::rng::Rng;

use super::*;

const TYPES: [WeightType; 9] = WeightType::ALL;

fn weight(rng: &mut Rng, ty: WeightType, n: usize, k: usize) -> HostWeight {
    let values: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
    let mut bytes = Vec::new();
    for row in values.chunks_exact(k) {
        quantize_row(ty, row, &mut bytes);
    }
    HostWeight::new(ty, n, k, bytes.into()).unwrap()
}

/// The activations as the kernels see them: quantized to 8 bits for the block types.
fn as_quantized(ty: WeightType, x: &[f32], k: usize) -> Vec<f32> {
    match ty {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => x.to_vec(),
        WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1 => x
            .chunks_exact(k)
            .flat_map(quantize_q8)
            .flat_map(|b| b.qs.map(|q| b.d * q as f32))
            .collect(),
        _ => x
            .chunks_exact(k)
            .flat_map(quantize_q8k)
            .flat_map(|b| b.qs.map(|q| b.d * q as f32))
            .collect(),
    }
}

/// `x · wᵀ` in f64 on the dequantized weights, and Σ|x|·|w| per output (the scale of f32
/// rounding errors).
fn exact(x: &[f32], m: usize, w: &HostWeight) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (w.rows(), w.cols());
    let wf = w.to_f32();
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for r in 0..m {
        for j in 0..n {
            for i in 0..k {
                let p = x[r * k + i] as f64 * wf[j * k + i] as f64;
                out[r * n + j] += p;
                mag[r * n + j] += p.abs();
            }
        }
    }
    (out, mag)
}

fn rel_rms(got: &[f32], want: &[f64]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (err / norm).sqrt()
}

#[test]
fn every_kernel_matches_f64_math_on_the_dequantized_weights() {
    let mut rng = Rng::new(14);
    let k = 1024;
    for ty in TYPES {
        // Odd row counts: tasks of uneven size; from GEMM_MIN_ROWS rows on, dequantized tiles
        // (two of them, one partial, at n = 37).
        for (m, n) in [(1, 37), (3, 64), (15, 19), (GEMM_MIN_ROWS, 37), (40, 6)] {
            let w = weight(&mut rng, ty, n, k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            // The gemm path takes the activations as they are.
            let xq = if m >= GEMM_MIN_ROWS {
                x.clone()
            } else {
                as_quantized(ty, &x, k)
            };
            let (want_q, mag) = exact(&xq, m, &w);
            let (want, _) = exact(&x, m, &w);
            for isa in Isa::supported() {
                let got = matmul_t_with(isa, &x, m, &w);
                assert_eq!(got.len(), m * n);
                // With the activations as quantized the integer dot products are exact; what
                // is left is f32 rounding of per-block products and sums (k/32 of them).
                for (i, ((g, wq), mg)) in got.iter().zip(&want_q).zip(&mag).enumerate() {
                    let tol = 2e-6 * mg + 1e-6;
                    assert!(
                        (*g as f64 - wq).abs() <= tol,
                        "{ty} {isa:?} m={m} n={n} output {i}: {g}, exact {wq} (tolerance {tol})"
                    );
                }
                // Against the f32 activations: 8-bit activations add a relative rms error of
                // about (step / √12) / σ with step = max|x| / 127 over a block: ≈ 0.6% for
                // Gaussian blocks; bounded here at twice that.
                let rel = rel_rms(&got, &want);
                let bound = if ty.is_quantized() && m < GEMM_MIN_ROWS {
                    0.012
                } else {
                    1e-6
                };
                assert!(
                    rel <= bound,
                    "{ty} {isa:?} m={m}: relative rms error {rel} over {bound}"
                );
            }
        }
    }
}

#[test]
fn simd_kernels_agree_with_the_portable_ones() {
    let mut rng = Rng::new(140);
    let (m, n, k) = (5, 33, 2048);
    for ty in TYPES {
        let w = weight(&mut rng, ty, n, k);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32 * 3.0).collect();
        let portable = matmul_t_with(Isa::Portable, &x, m, &w);
        for isa in Isa::supported() {
            let got = matmul_t_with(isa, &x, m, &w);
            let rel = rel_rms(
                &got,
                &portable.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            );
            assert!(rel <= 1e-6, "{ty} {isa:?}: {rel} from the portable kernels");
        }
    }
}

#[test]
fn empty_shapes() {
    let w = weight(&mut Rng::new(1), WeightType::Q4_K, 3, 256);
    assert!(matmul_t(&[], 0, &w).is_empty());
    let w = HostWeight::new(WeightType::Q8_0, 0, 64, Vec::new().into()).unwrap();
    assert!(matmul_t(&[0.5; 128], 2, &w).is_empty());
}

/// The accuracy cost of 8-bit activations at a model's size (k = 4096), as the module doc
/// reports it: relative rms error of the outputs against f64 math on the dequantized weights.
#[test]
fn activation_quantization_costs_under_one_percent() {
    let mut rng = Rng::new(1400);
    let (m, n, k) = (4, 64, 4096);
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    for ty in TYPES.into_iter().filter(|t| t.is_quantized()) {
        let w = weight(&mut rng, ty, n, k);
        let (want, _) = exact(&x, m, &w);
        let rel = rel_rms(&matmul_t(&x, m, &w), &want);
        eprintln!("{ty}: relative rms error of the outputs {rel:.5}");
        assert!(rel < 0.01, "{ty}: {rel}");
    }
}

#[test]
fn f32_activations_are_exact_up_to_f32_rounding() {
    let mut rng = Rng::new(41);
    let k = 512;
    for ty in TYPES {
        // Every group of rows the fused kernels take (1 to 4, and 7 = 4 + 3, 15 = 4+4+4+3).
        for (m, n) in [
            (1, 37),
            (2, 5),
            (3, 64),
            (4, 9),
            (7, 11),
            (15, 6),
            (GEMM_MIN_ROWS, 9),
        ] {
            let w = weight(&mut rng, ty, n, k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let (want, mag) = exact(&x, m, &w);
            for isa in Isa::supported() {
                let got = matmul_t_f32_with(isa, &x, m, &w);
                assert_eq!(got.len(), m * n);
                for (i, ((g, wv), mg)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    let tol = 2e-6 * mg + 1e-6;
                    assert!(
                        (*g as f64 - wv).abs() <= tol,
                        "{ty} {isa:?} m={m} output {i}: {g}, exact {wv} (tolerance {tol})"
                    );
                }
            }
        }
    }
}

/// The fused f32-activation kernels decode each weight with the same f32 operations as
/// `dequantize_row`, so they differ from the portable path (dequantized row · activations)
/// only in the order of the sums: far below f32 rounding's scale Σ|x·w| · 2⁻²⁴ · √k.
#[test]
fn simd_f32_activation_kernels_agree_with_the_portable_ones() {
    let mut rng = Rng::new(1401);
    let k = 2048;
    for ty in TYPES {
        for m in [1, 5, 15] {
            let n = 21;
            let w = weight(&mut rng, ty, n, k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32 * 3.0).collect();
            let portable = matmul_t_f32_with(Isa::Portable, &x, m, &w);
            let (_, mag) = exact(&x, m, &w);
            for isa in Isa::supported() {
                let got = matmul_t_f32_with(isa, &x, m, &w);
                for (i, ((g, p), mg)) in got.iter().zip(&portable).zip(&mag).enumerate() {
                    let tol = 1e-6 * mg;
                    assert!(
                        (g - p).abs() as f64 <= tol,
                        "{ty} {isa:?} m={m} output {i}: {g}, portable {p} (tolerance {tol})"
                    );
                }
            }
        }
    }
}
