//! How a weight matrix is stored: plain floats (f32, f16, bf16) or one of GGUF's block formats
//! (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), and [`HostWeight`], a matrix in its stored type as a
//! checkpoint hands it to a backend (owned, or borrowed from the file's memory map so that
//! loading copies nothing).
//!
//! Every block format packs a row's values in blocks of [`WeightType::block_len`] values; a row
//! is whole blocks, so rows can be sliced, permuted and split between workers byte-wise.

mod blocks;

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use memmap2::Mmap;

pub use blocks::{dequantize_row, quantize_row, scale_blocks};

/// A weight's storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl WeightType {
    pub const ALL: [WeightType; 9] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q4_K,
        WeightType::Q5_K,
        WeightType::Q6_K,
    ];

    /// Values per block (1 for plain floats).
    pub const fn block_len(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1 => 32,
            WeightType::Q4_K | WeightType::Q5_K | WeightType::Q6_K => 256,
        }
    }

    /// Bytes per block, as ggml lays it out.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q8_0 => 34,
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
            WeightType::Q4_K => 144,
            WeightType::Q5_K => 176,
            WeightType::Q6_K => 210,
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes of one row of `cols` values; `None` when `cols` is not whole blocks (or overflows).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_len()) {
            return None;
        }
        (cols / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Bytes a `[rows, cols]` matrix stored as `self` takes once loaded: a type whose blocks do
    /// not divide the row is widened to f32 by whoever keeps it. The one rule behind every
    /// size the placement planner and `switchyard plan` count.
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        let row = self.row_bytes(cols).unwrap_or(4 * cols);
        (row as u64).saturating_mul(rows as u64)
    }

    /// ggml's type id (`enum ggml_type`), as GGUF stores it.
    pub const fn ggml_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q8_0 => 8,
            WeightType::Q4_K => 12,
            WeightType::Q5_K => 13,
            WeightType::Q6_K => 14,
            WeightType::BF16 => 30,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<Self> {
        WeightType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// The name llama.cpp and `gguf` use: `F32`, `BF16`, `Q4_K`, …
    pub const fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "F32",
            WeightType::F16 => "F16",
            WeightType::BF16 => "BF16",
            WeightType::Q8_0 => "Q8_0",
            WeightType::Q4_0 => "Q4_0",
            WeightType::Q4_1 => "Q4_1",
            WeightType::Q4_K => "Q4_K",
            WeightType::Q5_K => "Q5_K",
            WeightType::Q6_K => "Q6_K",
        }
    }

    /// Parses [`WeightType::name`], case-insensitively.
    pub fn from_name(s: &str) -> Option<Self> {
        WeightType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl WeightType {
    /// The safetensors dtype of a plain float type; `None` for a block format.
    pub fn safetensors_dtype(self) -> Option<crate::safetensors::Dtype> {
        use crate::safetensors::Dtype;
        match self {
            WeightType::F32 => Some(Dtype::F32),
            WeightType::F16 => Some(Dtype::F16),
            WeightType::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }
}

impl From<crate::safetensors::Dtype> for WeightType {
    fn from(d: crate::safetensors::Dtype) -> Self {
        match d {
            crate::safetensors::Dtype::F32 => WeightType::F32,
            crate::safetensors::Dtype::F16 => WeightType::F16,
            crate::safetensors::Dtype::BF16 => WeightType::BF16,
        }
    }
}

/// A weight's bytes: owned, or a range of a memory map (shared, never copied): of a file, or
/// an anonymous one the bytes were read into.
#[derive(Clone)]
pub enum WeightBytes {
    Owned(Arc<[u8]>),
    Mapped { map: Arc<Mmap>, range: Range<usize> },
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WeightBytes::Owned(b) => b,
            WeightBytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl From<Vec<u8>> for WeightBytes {
    fn from(v: Vec<u8>) -> Self {
        WeightBytes::Owned(v.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("a {ty} row of {cols} values is not a whole number of {block}-value blocks")]
    PartialBlock {
        ty: WeightType,
        cols: usize,
        block: usize,
    },
    #[error("a [{rows}, {cols}] {ty} matrix takes {expected} bytes; {found} were given")]
    Size {
        ty: WeightType,
        rows: usize,
        cols: usize,
        expected: String,
        found: usize,
    },
}

/// A row-major weight matrix `[rows, cols]` in its stored type; a vector is one row.
#[derive(Clone)]
pub struct HostWeight {
    ty: WeightType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: WeightBytes,
}

impl fmt::Debug for HostWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostWeight({} [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl HostWeight {
    /// Checks that `bytes` holds exactly `rows` whole rows of `cols` values of `ty`.
    pub fn new(
        ty: WeightType,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self, WeightError> {
        let row_bytes = ty.row_bytes(cols).ok_or(WeightError::PartialBlock {
            ty,
            cols,
            block: ty.block_len(),
        })?;
        let expected = row_bytes.checked_mul(rows);
        if expected != Some(bytes.len()) {
            return Err(WeightError::Size {
                ty,
                rows,
                cols,
                expected: expected.map_or("more than usize".into(), |e| e.to_string()),
                found: bytes.len(),
            });
        }
        Ok(HostWeight {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
        })
    }

    /// An f32 matrix from its values (`rows * cols` of them).
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Result<Self, WeightError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(WeightType::F32, rows, cols, bytes.into())
    }

    pub fn ty(&self) -> WeightType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// All rows' bytes, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn storage(&self) -> &WeightBytes {
        &self.bytes
    }

    /// Row `r`'s bytes.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` as f32 values into `out` (`cols` long).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), out);
    }

    /// The whole matrix as f32 values.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, chunk) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row_into(r, chunk);
            }
        }
        out
    }

    /// The same matrix with row `i` taken from row `order[i]` of this one (an owned copy).
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.rows, "one source row per row");
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for &src in order {
            bytes.extend_from_slice(self.row(src));
        }
        HostWeight {
            bytes: bytes.into(),
            ..self.clone()
        }
    }

    /// The first index of a non-finite value (with it), reading every value.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        let mut row = vec![0f32; self.cols];
        for r in 0..self.rows {
            self.dequantize_row_into(r, &mut row);
            if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                return Some((r * self.cols + i, row[i]));
            }
        }
        None
    }
}
