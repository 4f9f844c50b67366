//! `matmul::matmul_t` on weights in every stored type: GEMV (m = 1, decode) with 8-bit
//! activations (`matmul_t`) and with f32 activations (`matmul_t_f32`, the CPU backend's
//! default), and GEMM (m = 128, prefill) at a Mixtral expert's down projection (n 4096, k 14336) and a small
//! model's (n 576, k 1536), beside the f32 `gemm` path the CPU backend keeps and the machine's
//! memory bandwidth measured in the same run.
//!
//! `cargo bench -p switchyard-worker --bench quant_matmul` (env `BENCH_REPEATS`, default 9 for
//! GEMV, a third of that for GEMM).
//!
//! GB/s counts the weight bytes read per call; the memory bandwidth is measured before and after
//! each shape, so that drift during the run (a shared machine's) shows. GEMV cycles through copies of the weight
//! totalling over 1 GiB, so each call reads its weight from memory, not from a cache.

use std::time::Instant;

use rayon::prelude::*;
use switchyard_model::quant::quantize_row;
use switchyard_model::{HostWeight, WeightType};
use switchyard_worker::matmul::{matmul_t_f32_with, matmul_t_with, Isa};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per call of `f`, the median of `repeats` (after one warm-up call).
fn time(repeats: usize, mut f: impl FnMut(usize)) -> f64 {
    f(0);
    median(
        (1..=repeats)
            .map(|i| {
                let t = Instant::now();
                f(i);
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Values in [-1, 1) from a hash of the index: cheap, and as good as random for timing.
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let z = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn quantize(ty: WeightType, w: &[f32], n: usize, k: usize) -> HostWeight {
    let rows: Vec<Vec<u8>> = w
        .par_chunks(k)
        .map(|row| {
            let mut b = Vec::new();
            quantize_row(ty, row, &mut b);
            b
        })
        .collect();
    HostWeight::new(ty, n, k, rows.concat().into()).unwrap()
}

/// Read bandwidth: a parallel sum over 1 GiB, as the GEMV reads its weights.
fn memory_bandwidth(repeats: usize) -> f64 {
    let buf = values(1 << 28, 7);
    let s = time(repeats, |_| {
        let sum: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // Eight lanes so the loop vectorizes (a plain fold is one serial chain).
                let mut acc = [0f32; 8];
                for v in c.chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] += v[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
    });
    (buf.len() * 4) as f64 / s / 1e9
}

fn main() {
    let repeats: usize = std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(9);
    let isa = Isa::best();
    println!(
        "{} threads, kernels {isa:?}; memory read bandwidth {:.1} GB/s (parallel sum of 1 GiB)",
        rayon::current_num_threads(),
        memory_bandwidth(repeats)
    );
    println!(
        "{:<14} {:<5} {:>9} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10}",
        "shape n×k",
        "type",
        "MiB",
        "gemv ms",
        "gemv GB/s",
        "f32a ms",
        "f32a GB/s",
        "gemm ms",
        "gemm GF/s"
    );
    for (n, k) in [(4096usize, 14336usize), (576, 1536)] {
        let wf = values(n * k, 1);
        let x1 = values(k, 2);
        let x128 = values(128 * k, 3);
        let flops = |m: usize| 2.0 * (m * n * k) as f64;
        for ty in WeightType::ALL {
            let w = quantize(ty, &wf, n, k);
            let bytes = w.bytes().len();
            // Copies to cycle through, so that GEMV reads memory, not a cache.
            let copies: Vec<HostWeight> = (0..(1usize << 30).div_ceil(bytes).min(64))
                .map(|_| HostWeight::new(ty, n, k, w.bytes().to_vec().into()).unwrap())
                .collect();
            let gemv = time(repeats, |i| {
                std::hint::black_box(matmul_t_with(isa, &x1, 1, &copies[i % copies.len()]));
            });
            let gemv_f32 = time(repeats, |i| {
                let w = &copies[i % copies.len()];
                std::hint::black_box(matmul_t_f32_with(isa, &x1, 1, w));
            });
            drop(copies);
            let gemm = time(repeats.div_ceil(3), |_| {
                std::hint::black_box(matmul_t_with(isa, &x128, 128, &w));
            });
            println!(
                "{:<14} {:<5} {:>9.1} {:>9.3} {:>10.1} {:>9.3} {:>10.1} {:>9.1} {:>10.1}",
                format!("{n}×{k}"),
                ty.name(),
                bytes as f64 / (1 << 20) as f64,
                gemv * 1e3,
                bytes as f64 / gemv / 1e9,
                gemv_f32 * 1e3,
                bytes as f64 / gemv_f32 / 1e9,
                gemm * 1e3,
                flops(128) / gemm / 1e9
            );
        }
        // The CPU backend's f32 path for comparison: gemm at m = 128.
        let gemm = time(repeats.div_ceil(3), |_| {
            std::hint::black_box(switchyard_worker::cpu::matmul_t(&x128, 128, k, &wf, n));
        });
        println!(
            "{:<14} {:<5} {:>9.1} {:>9} {:>10} {:>9} {:>10} {:>9.1} {:>10.1}",
            format!("{n}×{k}"),
            "gemm",
            (n * k * 4) as f64 / (1 << 20) as f64,
            "-",
            "-",
            "-",
            "-",
            gemm * 1e3,
            flops(128) / gemm / 1e9
        );
        // Again after the shape: on a shared machine the bandwidth drifts during a run, and the
        // rows above are to be read against the figures either side of them.
        println!(
            "memory read bandwidth {:.1} GB/s",
            memory_bandwidth(repeats)
        );
    }
}
