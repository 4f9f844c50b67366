//! The quantized GEMV kernels' weight reads (`dequant8` in kernels/cuda/quant_gemv.cu)
//! emulated on the CPU, byte for byte as the kernel loads them (the f16 fields as u16, Q8_0's
//! values as four u16 loads, a Q4_K lane's nibbles as one 8-byte load), over every column the
//! warp's walk visits (lane·8, then strides of 32·8). Checked against `dequantize_row`, the
//! reading ggml's own dequantizer is tested to agree with bit for bit: a wrong block offset,
//! sub-block, nibble half or scale index fails here, without a GPU. (The kernels compile and
//! assemble without spills in `kernels/tests/ptxas.rs`; they run only where a GPU is lent.)

use half::f16;
use switchyard_model::quant::{dequantize_row, quantize_row};
use switchyard_model::rng::Rng;
use switchyard_model::WeightType;

const WARP: usize = 32;

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn h2f(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

/// `dequant8<0>`: Q8_0.
fn dequant8_q8_0(row: &[u8], c: usize) -> [f32; 8] {
    let b = &row[(c / 32) * 34..];
    let d = h2f(u16_at(b, 0));
    let q = 2 + c % 32;
    let mut v = [0f32; 8];
    for i in 0..4 {
        let two = u16_at(b, q + 2 * i);
        v[2 * i] = d * ((two & 0xff) as u8 as i8) as f32;
        v[2 * i + 1] = d * ((two >> 8) as u8 as i8) as f32;
    }
    v
}

/// `scale_min_k4` as the kernel spells it.
fn scale_min_k4(j: usize, q: &[u8]) -> (u32, u32) {
    if j < 4 {
        ((q[j] & 63) as u32, (q[j + 4] & 63) as u32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as u32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as u32,
        )
    }
}

/// `dequant8<1>`: Q4_K.
fn dequant8_q4_k(row: &[u8], c: usize) -> [f32; 8] {
    let b = &row[(c / 256) * 144..];
    let (within, mut v) = (c % 256, [0f32; 8]);
    let (j, t) = (within / 32, (within % 32) / 8);
    let (d, dmin) = (h2f(u16_at(b, 0)), h2f(u16_at(b, 2)));
    let (sc, m) = scale_min_k4(j, &b[4..16]);
    let (scale, min) = (d * sc as f32, dmin * m as f32);
    let at = 16 + 32 * (j / 2) + 8 * t;
    let x = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let y = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap());
    let shift = (j % 2) * 4;
    for i in 0..4 {
        v[i] = scale * ((x >> (8 * i + shift)) & 0xF) as f32 - min;
        v[4 + i] = scale * ((y >> (8 * i + shift)) & 0xF) as f32 - min;
    }
    v
}

fn check(ty: WeightType, cols: usize, dequant8: fn(&[u8], usize) -> [f32; 8]) {
    let mut rng = Rng::new(cols as u64);
    let values: Vec<f32> = (0..cols).map(|_| rng.normal() as f32).collect();
    let mut row = Vec::new();
    quantize_row(ty, &values, &mut row);
    let mut want = vec![0f32; cols];
    dequantize_row(ty, &row, &mut want);
    let mut seen = vec![false; cols];
    for lane in 0..WARP {
        let mut c = lane * 8;
        while c < cols {
            let got = dequant8(&row, c);
            for i in 0..8 {
                assert!(
                    !seen[c + i],
                    "{ty} cols {cols}: column {} read twice",
                    c + i
                );
                seen[c + i] = true;
                assert_eq!(
                    got[i].to_bits(),
                    want[c + i].to_bits(),
                    "{ty} cols {cols}: column {}",
                    c + i
                );
            }
            c += WARP * 8;
        }
    }
    assert!(
        seen.iter().all(|&s| s),
        "{ty} cols {cols}: a column was never read"
    );
}

#[test]
fn the_kernels_read_every_q8_0_and_q4_k_value_as_ggml_does() {
    for cols in [32, 96, 256, 512, 2048, 4096 + 32] {
        check(WeightType::Q8_0, cols, dequant8_q8_0);
    }
    for cols in [256, 768, 4096, 14336] {
        check(WeightType::Q4_K, cols, dequant8_q4_k);
    }
}
