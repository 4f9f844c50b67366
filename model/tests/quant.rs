//! The block formats of `model::quant` against gguf-py (the llama.cpp project's `gguf` package,
//! from the venv `scripts/gguf-py-env.sh` makes): its numpy dequantizer must read our bytes to
//! the same values as ours, bit for bit, for random blocks of every type; its quantizer must make
//! the same bytes as ours where it has one (floats, Q8_0, Q4_0, Q4_1); for the K-quants, which
//! it cannot quantize, our quantizer's round trip must meet the error bounds of llama.cpp's own
//! `test-quantize-fns` and its bytes must read back the same through gguf-py.

use std::io::Write;
use std::process::{Command, Stdio};

use half::f16;
use switchyard_model::quant::{dequantize_row, quantize_row};
use switchyard_model::WeightType;

/// Runs gguf-py's `quantize` or `dequantize` on a `[rows, cols]` tensor given as raw bytes
/// (f32 values for `quantize`, blocks for `dequantize`); returns the raw bytes it made.
fn gguf_py(op: &str, ty: WeightType, rows: usize, cols: usize, input: &[u8]) -> Vec<u8> {
    let python = std::env::var("SWITCHYARD_GGUF_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SWITCHYARD_GGUF_PYTHON is not set: these tests need gguf-py as their reference; \
             run `source scripts/gguf-py-env.sh` first (scripts/test.sh does)"
        )
    });
    const SCRIPT: &str = r#"
import sys
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize
op, ty, rows, cols = sys.argv[1], T[sys.argv[2]], int(sys.argv[3]), int(sys.argv[4])
data = sys.stdin.buffer.read()
if op == "quantize":
    out = quantize(np.frombuffer(data, dtype=np.float32).reshape(rows, cols), ty)
else:
    out = dequantize(np.frombuffer(data, dtype=np.uint8).reshape(rows, -1), ty).astype(np.float32)
    assert out.shape == (rows, cols), out.shape
sys.stdout.buffer.write(np.ascontiguousarray(out).tobytes())
"#;
    let mut child = Command::new(&python)
        .args([
            "-c",
            SCRIPT,
            op,
            ty.name(),
            &rows.to_string(),
            &cols.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Written from a thread so a large output cannot deadlock against a full stdin pipe.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "gguf-py {op} {ty} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The project's seeded generator, with the draws these tests need.
struct Rng(switchyard_model::rng::Rng);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(switchyard_model::rng::Rng::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u = self.unit().max(1e-7);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
    /// A finite f16 of any sign and magnitude, subnormals and zero included (its exponent
    /// field is never all ones, which would make an infinity or a NaN).
    fn finite_f16(&mut self) -> [u8; 2] {
        loop {
            let h = self.next() as u16;
            if (h >> 10) & 0x1F != 0x1F {
                return h.to_le_bytes();
            }
        }
    }
    /// A finite f16 of moderate size, so that products of scales with values stay finite.
    fn scale_f16(&mut self) -> [u8; 2] {
        let v = (self.unit() * 2.0 - 1.0) * 4.0;
        f16::from_f32(v).to_le_bytes()
    }
}

/// Offsets of a block's f16 fields.
fn f16_fields(ty: WeightType) -> &'static [usize] {
    match ty {
        WeightType::Q8_0 | WeightType::Q4_0 => &[0],
        WeightType::Q4_1 | WeightType::Q4_K | WeightType::Q5_K => &[0, 2],
        WeightType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows` rows of `cols` values of random blocks of `ty`: every other byte random, the f16
/// scales finite (half of the rows of any magnitude, half moderate).
fn random_blocks(rng: &mut Rng, ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let mut bytes: Vec<u8> = (0..rows * row_bytes).map(|_| rng.byte()).collect();
    match ty {
        WeightType::F16 => {
            for v in bytes.chunks_exact_mut(2) {
                v.copy_from_slice(&rng.finite_f16());
            }
        }
        WeightType::BF16 => {
            // A bf16 whose exponent is all ones is an infinity or a NaN.
            for v in bytes.chunks_exact_mut(2) {
                if v[1] & 0x7F == 0x7F && v[0] & 0x80 != 0 {
                    v[1] &= 0xBF;
                }
            }
        }
        _ => {
            for (r, row) in bytes.chunks_exact_mut(row_bytes).enumerate() {
                for block in row.chunks_exact_mut(ty.block_bytes()) {
                    for &at in f16_fields(ty) {
                        let h = if r % 2 == 0 {
                            rng.finite_f16()
                        } else {
                            rng.scale_f16()
                        };
                        block[at..at + 2].copy_from_slice(&h);
                    }
                }
            }
        }
    }
    bytes
}

fn ours_dequantized(ty: WeightType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let mut out = vec![0f32; rows * cols];
    for (src, dst) in bytes
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(cols))
    {
        dequantize_row(ty, src, dst);
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Every value equal, bit for bit (an infinity from an overflowing product included).
fn assert_same_values(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let bad: Vec<_> = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
        .take(5)
        .collect();
    assert!(bad.is_empty(), "{what}: (index, (ours, gguf-py)) {bad:?}");
}

#[test]
fn dequantize_matches_gguf_py_for_every_stored_type() {
    let mut rng = Rng::new(14);
    let (rows, cols) = (64, 512);
    for ty in WeightType::ALL {
        if ty == WeightType::F32 {
            continue;
        }
        let bytes = random_blocks(&mut rng, ty, rows, cols);
        let ours = ours_dequantized(ty, &bytes, rows, cols);
        assert!(
            ours.iter().any(|v| *v != 0.0),
            "{ty}: random blocks read as zeros"
        );
        let theirs = f32s(&gguf_py("dequantize", ty, rows, cols, &bytes));
        assert_same_values(&format!("dequantizing {ty}"), &ours, &theirs);
    }
}

/// Rows of different character: Gaussian, all positive, all negative, one outlier, constant,
/// zeros, small values (not so small that the f16 scales underflow: the formats cannot hold
/// those).
fn test_rows(rng: &mut Rng, cols: usize) -> Vec<f32> {
    let mut v = Vec::new();
    for kind in 0..8 {
        for i in 0..cols {
            let g = rng.normal();
            v.push(match kind {
                0 | 1 => g,
                2 => g.abs() + 0.5,
                3 => -g.abs() * 3.0,
                4 => {
                    if i % 97 == 5 {
                        40.0
                    } else {
                        g * 0.1
                    }
                }
                5 => 0.75,
                6 => 0.0,
                _ => g * 1e-3,
            });
        }
    }
    v
}

fn ours_quantized(ty: WeightType, values: &[f32], cols: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for row in values.chunks_exact(cols) {
        quantize_row(ty, row, &mut out);
    }
    out
}

#[test]
fn quantize_matches_gguf_py_where_it_quantizes() {
    let mut rng = Rng::new(140);
    let cols = 512;
    let values = test_rows(&mut rng, cols);
    let rows = values.len() / cols;
    for ty in [
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q4_0,
        WeightType::Q4_1,
    ] {
        let ours = ours_quantized(ty, &values, cols);
        let theirs = gguf_py("quantize", ty, rows, cols, &f32_bytes(&values));
        assert_eq!(ours.len(), theirs.len(), "{ty}: byte counts");
        if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            panic!(
                "quantizing to {ty}: byte {i} (block {}) is {} in ours, {} in gguf-py",
                i / ty.block_bytes(),
                ours[i],
                theirs[i]
            );
        }
    }
}

/// llama.cpp's `test-quantize-fns` data: `0.1 + 2 cos(i + offset)`.
fn cosine_data(n: usize, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
        .collect()
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// The round trip of every quantized type stays within llama.cpp's bound for its bit width
/// (`test-quantize-fns`: √(Σ error²) / n ≤ 0.002 on its 4096 cosine values for 4 bits and up,
/// that is an rms error under 0.128 on values of ±2; a loose bound), the
/// K-quants read back through gguf-py as through ours, and on Gaussian rows each K-quant is
/// more accurate than the plain format with as many bits (its scale search is what it is for).
#[test]
fn k_quants_round_trip_within_format_bounds() {
    let cols = 4096;
    let cosine = cosine_data(cols, 0.0);
    let mut rng = Rng::new(1400);
    let gauss: Vec<f32> = (0..16 * cols).map(|_| rng.normal()).collect();
    let gauss_mse = |ty: WeightType| {
        let q = ours_quantized(ty, &gauss, cols);
        mse(&ours_dequantized(ty, &q, gauss.len() / cols, cols), &gauss)
    };
    // Relative rms error on unit Gaussian rows: a uniform grid of step Δ errs by Δ/√12, and Δ
    // is about a 32-block's range (≈ 4.3σ) over 2^bits - 1, which gives 0.0049 (Q8_0),
    // 0.083 (Q4_0, Q4_1), 0.040 (5 bits) and 0.020 (6 bits); the K-quants' scale search does
    // better than the plain grid (ours measures 0.0053, 0.086, 0.078, 0.071, 0.036, 0.018).
    // The bounds sit about 10% above those, so a broken search or packing fails them.
    let bounds = [
        (WeightType::Q8_0, 0.0059),
        (WeightType::Q4_0, 0.095),
        (WeightType::Q4_1, 0.086),
        (WeightType::Q4_K, 0.079),
        (WeightType::Q5_K, 0.040),
        (WeightType::Q6_K, 0.020),
    ];
    for (ty, bound) in bounds {
        let q = ours_quantized(ty, &cosine, cols);
        let back = ours_dequantized(ty, &q, 1, cols);
        let e = (mse(&back, &cosine) * cols as f64).sqrt() / cols as f64;
        assert!(e <= 0.002, "{ty}: error {e} on the cosine data, over 0.002");
        let theirs = f32s(&gguf_py("dequantize", ty, 1, cols, &q));
        assert_same_values(&format!("{ty} read back"), &back, &theirs);
        let rel = gauss_mse(ty).sqrt();
        eprintln!("{ty}: cosine error {e:.2e}, Gaussian relative rms {rel:.4}");
        assert!(rel <= bound, "{ty}: relative rms {rel} over {bound}");
    }
    for (k, plain) in [
        (WeightType::Q4_K, WeightType::Q4_1),
        (WeightType::Q5_K, WeightType::Q4_K),
        (WeightType::Q6_K, WeightType::Q5_K),
    ] {
        assert!(
            gauss_mse(k) < gauss_mse(plain),
            "{k} is no more accurate than {plain}"
        );
    }
}

/// Rows of every character (constant, zero, tiny, one outlier) quantize to finite blocks whose
/// values stay near the input.
#[test]
fn k_quants_handle_degenerate_rows() {
    let mut rng = Rng::new(14_000);
    let cols = 512;
    let values = test_rows(&mut rng, cols);
    for ty in [WeightType::Q4_K, WeightType::Q5_K, WeightType::Q6_K] {
        let q = ours_quantized(ty, &values, cols);
        let back = ours_dequantized(ty, &q, values.len() / cols, cols);
        for (r, (x, y)) in values
            .chunks_exact(cols)
            .zip(back.chunks_exact(cols))
            .enumerate()
        {
            let scale = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = x.iter().zip(y).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(y.iter().all(|v| v.is_finite()), "{ty} row {r}: not finite");
            // A 4-bit grid over ±max, plus f16 rounding of the scales.
            assert!(
                worst <= scale * 0.25 + 1e-7,
                "{ty} row {r}: error {worst} for values up to {scale}"
            );
        }
    }
}

/// Scaling a row by a power of two through its block scales (what `model upcycle` does to the
/// down projections) multiplies every value it reads back to exactly that much; a scale that
/// leaves its type's range is refused.
#[test]
fn scaling_blocks_by_a_power_of_two_is_exact() {
    use switchyard_model::quant::scale_blocks;
    let cols = 512;
    let mut rng = Rng::new(1405);
    let x: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
    for ty in WeightType::ALL {
        let q = ours_quantized(ty, &x, cols);
        let before = ours_dequantized(ty, &q, 1, cols);
        for factor in [2.0f32, 8.0] {
            let mut scaled = q.clone();
            scale_blocks(ty, &mut scaled, factor).unwrap();
            let after = ours_dequantized(ty, &scaled, 1, cols);
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                assert_eq!(*a, b * factor, "{ty} ×{factor}: value {i}");
            }
        }
    }
    let mut big = ours_quantized(WeightType::Q8_0, &x, cols);
    let e = scale_blocks(WeightType::Q8_0, &mut big, 1e7).unwrap_err();
    assert!(e.is_infinite() || e > 65504.0, "{e}");
}
