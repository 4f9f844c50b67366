//! The safetensors format, read through a memory map and checked before use, and written for
//! `model init` and `model upcycle`. A file is 8 bytes of little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets}}`, then the tensor bytes. Nothing is trusted: lengths,
//! offsets and sizes are checked against the file so a truncated or corrupt file is an error
//! that names it, never a panic or a read out of bounds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

/// The element types we compute from. Others may appear in a header (and are reported by
/// name), but no model tensor may use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<Dtype> {
        match s {
            "float32" | "f32" => Some(Dtype::F32),
            "float16" | "f16" => Some(Dtype::F16),
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// Byte size of every dtype the format defines, so offsets of tensors we will not use can still
/// be checked.
fn header_dtype_size(s: &str) -> Option<usize> {
    Some(match s {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

/// One tensor's entry in a header, already checked against the file's size.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The dtype as the header spells it (`"BF16"`, `"I64"`, …).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    /// The dtype if it is one we compute from.
    pub fn float_dtype(&self) -> Option<Dtype> {
        match self.dtype.as_str() {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// A memory-mapped safetensors file whose header has been validated. Tensor bytes are only
/// touched (paged in) when a tensor is read.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let io = |source| SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; checkpoints are not modified while being served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (data_start, tensors) =
            parse_header(&mmap).map_err(|problem| SafetensorsError::Corrupt {
                path: path.to_path_buf(),
                problem,
            })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            data_start,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The raw bytes of a tensor listed in this file's header.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.begin..self.data_start + info.end]
    }

    /// A tensor's bytes as a shared range of the file's map (nothing copied).
    pub fn weight_bytes(&self, info: &TensorInfo) -> crate::quant::WeightBytes {
        crate::quant::WeightBytes::Mapped {
            map: self.mmap.clone(),
            range: self.range(info),
        }
    }

    /// Where a tensor's bytes lie in the file (absolute offsets).
    pub fn range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        self.data_start + info.begin..self.data_start + info.end
    }
}

/// The largest header read: the format's own limit.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads the header of a safetensors file's bytes `file`: where the data starts and each
/// tensor's entry, checked against the file's size (every size computed with checked
/// arithmetic: a shape whose element count overflows is refused, not wrapped). What is wrong
/// is said without quoting the file's bytes.
pub fn parse_header(file: &[u8]) -> Result<(usize, BTreeMap<String, TensorInfo>), String> {
    let len = file.len();
    let Some(prefix) = file.first_chunk::<8>() else {
        return Err(
            "the file is shorter than the 8-byte header length a safetensors file starts with"
                .into(),
        );
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "the header length (the first 8 bytes) is over the format's limit of \
             {MAX_HEADER_BYTES} bytes: not a safetensors file"
        ));
    }
    if header_len > (len - 8) as u64 {
        return Err(
            "the header length (the first 8 bytes) runs past the end of the file: truncated or \
             not a safetensors file"
                .into(),
        );
    }
    let data_start = 8 + header_len as usize;
    let header: Value = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| format!("header is not valid JSON: {e}"))?;
    let Value::Object(entries) = header else {
        return Err("header is not a JSON object".into());
    };
    let data_len = len - data_start;
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let info = parse_entry(&entry).map_err(|p| format!("tensor {name}: {p}"))?;
        let size = header_dtype_size(&info.dtype)
            .ok_or_else(|| format!("tensor {name}: unknown dtype {:?}", info.dtype))?;
        let bytes = info
            .shape
            .iter()
            .try_fold(size, |n, d| n.checked_mul(*d))
            .ok_or_else(|| {
                format!(
                    "tensor {name}: shape {:?} of {} has more bytes than a file can hold",
                    info.shape, info.dtype
                )
            })?;
        if info.begin > info.end || info.end > data_len {
            return Err(format!(
                "tensor {name}: data_offsets [{}, {}] point past the end of the data ({data_len} bytes): truncated file?",
                info.begin, info.end
            ));
        }
        if info.end - info.begin != bytes {
            return Err(format!(
                "tensor {name}: holds {} bytes but shape {:?} of {} needs {bytes}",
                info.end - info.begin,
                info.shape,
                info.dtype,
            ));
        }
        tensors.insert(name, info);
    }
    Ok((data_start, tensors))
}

fn parse_entry(v: &Value) -> Result<TensorInfo, String> {
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing string field `dtype`")?
        .to_string();
    let shape = v
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing array field `shape`")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or("shape holds a non-integer")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let offsets = v
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or("missing field `data_offsets` [begin, end]")?;
    let off = |i: usize| {
        offsets[i]
            .as_u64()
            .map(|o| o as usize)
            .ok_or("data_offsets holds a non-integer")
    };
    Ok(TensorInfo {
        dtype,
        shape,
        begin: off(0)?,
        end: off(1)?,
    })
}

/// Converts little-endian tensor bytes of a float dtype to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// A tensor to write: name, shape and its bytes already in `dtype`.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Writes a safetensors file tensor by tensor: the header first (every tensor's name, dtype and
/// shape is known up front), then each tensor's bytes in the order given, so memory holds one
/// tensor at a time.
pub struct SafetensorsWriter {
    out: std::io::BufWriter<File>,
    /// Each tensor's name and byte size, in write order.
    sizes: Vec<(String, usize)>,
    next: usize,
}

impl SafetensorsWriter {
    /// `tensors`: name, dtype and shape of each, in the order their bytes will be written.
    pub fn create(path: &Path, tensors: &[(String, Dtype, Vec<usize>)]) -> std::io::Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            let size = shape
                .iter()
                .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    std::io::Error::other(format!("tensor {name} {shape:?}: size overflows"))
                })?;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + size]}),
            );
            offset += size;
            sizes.push((name.clone(), size));
        }
        let mut header = serde_json::to_vec(&Value::Object(header))?;
        // Pad so the data section is 8-byte aligned, as the reference writer does.
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        let mut out = std::io::BufWriter::new(File::create(path)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        Ok(SafetensorsWriter {
            out,
            sizes,
            next: 0,
        })
    }

    /// Writes the next tensor's bytes (in the order given to [`SafetensorsWriter::create`]).
    pub fn write_tensor(&mut self, data: &[u8]) -> std::io::Result<()> {
        let Some((name, size)) = self.sizes.get(self.next) else {
            return Err(std::io::Error::other("every tensor is already written"));
        };
        if data.len() != *size {
            return Err(std::io::Error::other(format!(
                "tensor {name} takes {size} bytes; {} were given",
                data.len()
            )));
        }
        self.out.write_all(data)?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every tensor was written and flushes the file.
    pub fn finish(mut self) -> std::io::Result<()> {
        if let Some((name, _)) = self.sizes.get(self.next) {
            return Err(std::io::Error::other(format!(
                "only {} of {} tensors were written; the next is {name}",
                self.next,
                self.sizes.len()
            )));
        }
        self.out.flush()
    }
}

/// Writes tensors as one safetensors file (sorted by name, as the reference writer does).
pub fn write(path: &Path, tensors: &[&OwnedTensor]) -> std::io::Result<()> {
    let mut sorted: Vec<&&OwnedTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let descs: Vec<_> = sorted
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &descs)?;
    for t in sorted {
        w.write_tensor(&t.data)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[usize]) -> OwnedTensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
        OwnedTensor {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            data: from_f32(Dtype::BF16, &values),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let (a, b) = (tensor("b.weight", &[3, 2]), tensor("a.weight", &[4]));
        write(&path, &[&a, &b]).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let info = f.get("b.weight").unwrap();
        assert_eq!(info.shape, vec![3, 2]);
        assert_eq!(info.float_dtype(), Some(Dtype::BF16));
        assert_eq!(
            to_f32(Dtype::BF16, f.bytes(info)),
            vec![-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
        );
        assert_eq!(f.tensors().len(), 2);
    }

    fn corrupt_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, bytes).unwrap();
        match SafetensorsFile::open(&path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("corrupt file accepted"),
        }
    }

    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let e = corrupt_err(&[1, 2, 3]);
        assert!(e.contains("bad.safetensors") && e.contains("8-byte"), "{e}");
        let e = corrupt_err(&file_with_header("{}", 0)[..6]);
        assert!(e.contains("8-byte"), "{e}");
        let mut huge = 1_000_000u64.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let e = corrupt_err(&huge);
        assert!(e.contains("runs past the end"), "{e}");
        let e = corrupt_err(&file_with_header("{not json", 0));
        assert!(e.contains("not valid JSON"), "{e}");
        let e = corrupt_err(&file_with_header(
            r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
            8,
        ));
        assert!(e.contains("tensor w") && e.contains("past the end"), "{e}");
        let e = corrupt_err(&file_with_header(
            r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}"#,
            16,
        ));
        assert!(e.contains("needs 12"), "{e}");
        let e = corrupt_err(&file_with_header(
            r#"{"w": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 3]}}"#,
            3,
        ));
        assert!(e.contains("unknown dtype \"Q4\""), "{e}");
        let e = corrupt_err(&file_with_header(r#"{"w": {"shape": [3]}}"#, 3));
        assert!(e.contains("dtype"), "{e}");
    }

    #[test]
    fn truncated_data_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(&path, &[&tensor("w", &[64])]).unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 10]).unwrap();
        let e = SafetensorsFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("tensor w") && e.contains("truncated"), "{e}");
    }
}
