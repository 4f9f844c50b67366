//! GGUF files (versions 2 and 3, little-endian), as llama.cpp writes them: a header of typed
//! metadata key/values and tensor infos, then the tensors' bytes, each at an aligned offset.
//!
//! The reader maps the file and parses the header only; every count, length, dimension, offset
//! and size is checked against the bytes the file actually has before it is used, so a corrupt
//! or hostile header is an error naming the key or tensor at fault, never a panic or an
//! allocation larger than the file. The writer produces version 3 files, streaming tensor by
//! tensor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::{WeightBytes, WeightType};

/// "GGUF" read as a little-endian u32.
const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// llama.cpp refuses tensor names of GGML_MAX_NAME (64) bytes or more; the writer does too.
const MAX_NAME: usize = 63;
/// Arrays of arrays deeper than this are refused: real files nest at most once, and the reader
/// recurses per level.
const MAX_DEPTH: usize = 8;
pub const ALIGNMENT_KEY: &str = "general.alignment";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("GGUF metadata `{key}` is {found}; expected {expected}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("writing {path}: {problem}")]
    Write { path: PathBuf, problem: String },
}

/// A GGUF value type id, as stored before every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgufType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufType {
    fn from_id(id: u32) -> Option<Self> {
        use GgufType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .into_iter()
        .find(|t| *t as u32 == id)
    }

    /// The fewest bytes one value of this type takes in a file (a string's length, an array's
    /// element type and count), so a count can be checked against the bytes left.
    fn min_size(self) -> usize {
        use GgufType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use GgufType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// An array value, held as a typed vector (a vocabulary of 150k strings or scores stays compact).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufValue {
    pub fn ty(&self) -> GgufType {
        match self {
            GgufValue::U8(_) => GgufType::U8,
            GgufValue::I8(_) => GgufType::I8,
            GgufValue::U16(_) => GgufType::U16,
            GgufValue::I16(_) => GgufType::I16,
            GgufValue::U32(_) => GgufType::U32,
            GgufValue::I32(_) => GgufType::I32,
            GgufValue::U64(_) => GgufType::U64,
            GgufValue::I64(_) => GgufType::I64,
            GgufValue::F32(_) => GgufType::F32,
            GgufValue::F64(_) => GgufType::F64,
            GgufValue::Bool(_) => GgufType::Bool,
            GgufValue::String(_) => GgufType::String,
            GgufValue::Array(_) => GgufType::Array,
        }
    }

    /// The value as an integer, whatever integer type stores it.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    fn describe(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("an array of {} {}", a.len(), a.elem_type().name()),
            GgufValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            GgufValue::String(s) => format!("the string {s:?}"),
            v => format!("{} {}", v.ty().name(), v.scalar_text()),
        }
    }

    fn scalar_text(&self) -> String {
        match self {
            GgufValue::F32(v) => v.to_string(),
            GgufValue::F64(v) => v.to_string(),
            GgufValue::Bool(v) => v.to_string(),
            v => v.as_i128().map_or_else(String::new, |i| i.to_string()),
        }
    }
}

impl GgufArray {
    pub fn elem_type(&self) -> GgufType {
        match self {
            GgufArray::U8(_) => GgufType::U8,
            GgufArray::I8(_) => GgufType::I8,
            GgufArray::U16(_) => GgufType::U16,
            GgufArray::I16(_) => GgufType::I16,
            GgufArray::U32(_) => GgufType::U32,
            GgufArray::I32(_) => GgufType::I32,
            GgufArray::U64(_) => GgufType::U64,
            GgufArray::I64(_) => GgufType::I64,
            GgufArray::F32(_) => GgufType::F32,
            GgufArray::F64(_) => GgufType::F64,
            GgufArray::Bool(_) => GgufType::Bool,
            GgufArray::String(_) => GgufType::String,
            GgufArray::Array(_) => GgufType::Array,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file's metadata, by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufMetadata {
    entries: BTreeMap<String, GgufValue>,
}

impl GgufMetadata {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, value: GgufValue) {
        self.entries.insert(key.into(), value);
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn wrong(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::MetadataType {
            key: key.to_string(),
            expected,
            found: self.entries[key].describe(),
        }
    }

    /// A string value; `Ok(None)` when the key is absent, an error when it holds another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }

    /// An integer of any GGUF integer type whose value fits in u32 (writers differ in which
    /// type they store token ids and counts as).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get_int(key, "an integer in 0..=4294967295")
    }

    /// An integer of any GGUF integer type whose value fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get_int(key, "a non-negative integer")
    }

    fn get_int<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i128()
                .and_then(|i| T::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, expected)),
        }
    }

    /// An f32 or f64 value, as f64.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::F32(v)) => Ok(Some(*v as f64)),
            Some(GgufValue::F64(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(key, "a float")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong(key, "a bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&GgufArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.wrong(key, "an array")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            Some(_) => Err(self.wrong(key, "an array of strings")),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::F32(v))) => Ok(Some(v)),
            Some(_) => Err(self.wrong(key, "an array of f32")),
        }
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::I32(v))) => Ok(Some(v)),
            Some(_) => Err(self.wrong(key, "an array of i32")),
        }
    }
}

/// One tensor's entry in the header, checked against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (the fastest-varying dimension).
    pub dims: Vec<usize>,
    pub ty: WeightType,
    /// Where its bytes lie in the file (absolute offsets).
    pub range: Range<usize>,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (`dims` reversed), as numpy and Hugging Face write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn elements(&self) -> usize {
        // Checked when parsed: the product fits, as the bytes lie inside the file.
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: GgufMetadata,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: usize,
    /// Offset of the data section; tensor offsets in the file are relative to it.
    pub data_start: usize,
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    header: GgufHeader,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({})", self.path.display())
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap reader we rely on the file not being
        // truncated underneath us while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse(&map).map_err(|problem| GgufError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            header,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn metadata(&self) -> &GgufMetadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The tensor's bytes, as stored.
    pub fn bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.range.clone()]
    }

    /// Bytes `range` (absolute, inside the file) as a shared view of the map.
    pub fn weight_bytes(&self, range: Range<usize>) -> WeightBytes {
        debug_assert!(range.end <= self.map.len());
        WeightBytes::Mapped {
            map: self.map.clone(),
            range,
        }
    }
}

/// Where the reader stands and what it is reading, for error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!(
                "truncated: {} at byte {} needs {n} bytes, only {} remain (the file has {})",
                what(),
                self.pos,
                self.left(),
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_size` bytes each, refused unless the rest of the file
    /// could hold that many (so nothing is allocated for a count the file cannot back).
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, String> {
        let n = self.u64(what)?;
        let fits = self.left() / min_size;
        match usize::try_from(n) {
            Ok(n) if n <= fits => Ok(n),
            _ => Err(format!(
                "{} is {n}, but the {} bytes left in the file hold at most {fits}",
                what(),
                self.left()
            )),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let len = match usize::try_from(len) {
            Ok(l) if l <= self.left() => l,
            _ => {
                return Err(format!(
                    "{} has length {len}, but only {} bytes remain in the file",
                    what(),
                    self.left()
                ))
            }
        };
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("{} is not valid UTF-8: {e}", what()))
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufType, String> {
        let id = self.u32(&|| format!("the type of {}", what()))?;
        GgufType::from_id(id).ok_or_else(|| {
            format!(
                "{} has value type {id}; expected a GGUF value type 0..=12",
                what()
            )
        })
    }

    fn value(
        &mut self,
        ty: GgufType,
        what: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<GgufValue, String> {
        Ok(match ty {
            GgufType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            GgufType::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            GgufType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            GgufType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            GgufType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            GgufType::String => GgufValue::String(self.string(what)?),
            GgufType::Array => GgufValue::Array(self.array_value(what, depth)?),
        })
    }

    fn array_value(
        &mut self,
        what: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<GgufArray, String> {
        if depth >= MAX_DEPTH {
            return Err(format!(
                "{} nests arrays more than {MAX_DEPTH} deep",
                what()
            ));
        }
        let elem = self.value_type(&|| format!("the elements of {}", what()))?;
        let n = self.count(elem.min_size(), &|| {
            format!("the element count of {}", what())
        })?;
        let item = |i: usize| move || format!("element {i} of {}", what());
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let size = std::mem::size_of::<$t>();
                let bytes = self.take(n * size, &item(0))?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(size)
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("sized chunk")))
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            GgufType::U8 => fixed!(U8, u8),
            GgufType::I8 => fixed!(I8, i8),
            GgufType::U16 => fixed!(U16, u16),
            GgufType::I16 => fixed!(I16, i16),
            GgufType::U32 => fixed!(U32, u32),
            GgufType::I32 => fixed!(I32, i32),
            GgufType::U64 => fixed!(U64, u64),
            GgufType::I64 => fixed!(I64, i64),
            GgufType::F32 => fixed!(F32, f32),
            GgufType::F64 => fixed!(F64, f64),
            GgufType::Bool => {
                GgufArray::Bool(self.take(n, &item(0))?.iter().map(|b| *b != 0).collect())
            }
            GgufType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&item(i))?);
                }
                GgufArray::String(v)
            }
            GgufType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(&item(i), depth + 1)?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// Parses and checks a GGUF header against the whole file's bytes.
pub fn parse(file: &[u8]) -> Result<GgufHeader, String> {
    let mut r = Reader { buf: file, pos: 0 };
    let magic = r.take(4, &|| "the magic number".into())?;
    if magic != MAGIC {
        return Err(format!(
            "starts with {magic:02x?}; expected the magic bytes \"GGUF\""
        ));
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        // A big-endian file's version reads byte-swapped.
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err("is a big-endian GGUF file; only little-endian files are supported".into())
        }
        v => return Err(format!("has GGUF version {v}; expected 2 or 3")),
    }
    // Each tensor info takes at least 32 bytes (name length, one dim, type, offset); each
    // key/value at least 13 (key length, type, a one-byte value).
    let n_tensors = r.count(32, &|| "the tensor count".into())?;
    let n_kv = r.count(13, &|| "the metadata key/value count".into())?;

    let mut metadata = GgufMetadata::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata entry {i}"))?;
        let what = || format!("metadata `{key}`");
        let ty = r.value_type(&what)?;
        let value = r.value(ty, &what, 0)?;
        if metadata.entries.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(v) => {
            return Err(format!(
                "metadata `{ALIGNMENT_KEY}` is {}; expected a u32 power of two",
                v.describe()
            ))
        }
    };

    struct Raw {
        name: String,
        dims: Vec<usize>,
        ty: WeightType,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor {i}"))?;
        let what = || format!("tensor {name}");
        let n_dims = r.u32(&|| format!("the dimension count of {}", what()))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "{} has {n_dims} dimensions; expected 1..={MAX_DIMS}",
                what()
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let v = r.u64(&|| format!("dimension {d} of {}", what()))?;
            // No dimension can exceed the file's bytes (every value takes some bits of a
            // block); larger is refused before it is multiplied.
            match usize::try_from(v) {
                Ok(v) if v <= file.len().saturating_mul(2) => dims.push(v),
                _ => {
                    return Err(format!(
                        "{} has dimension {d} = {v}, more values than a file of {} bytes holds",
                        what(),
                        file.len()
                    ))
                }
            }
        }
        let type_id = r.u32(&|| format!("the type of {}", what()))?;
        let ty = WeightType::from_ggml_id(type_id).ok_or_else(|| {
            format!(
                "{} has ggml type {type_id} ({}); supported: {}",
                what(),
                ggml_type_name(type_id),
                WeightType::ALL.map(WeightType::name).join(", ")
            )
        })?;
        let offset = r.u64(&|| format!("the data offset of {}", what()))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor {name} appears twice"));
        }
        raw.push(Raw {
            name,
            dims,
            ty,
            offset,
        });
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    if data_start > file.len() && n_tensors > 0 {
        return Err(format!(
            "truncated: the data section starts at byte {data_start}, past the end of the file ({} bytes)",
            file.len()
        ));
    }

    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let row_bytes = t.ty.row_bytes(t.dims[0]).ok_or_else(|| {
            format!(
                "tensor {} is {} with rows of {} values; a {} row must be a multiple of {} values",
                t.name,
                t.ty,
                t.dims[0],
                t.ty,
                t.ty.block_len()
            )
        })?;
        let size = t.dims[1..]
            .iter()
            .try_fold(row_bytes, |acc, &d| acc.checked_mul(d));
        let start = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(data_start));
        let dims_text = format!("{:?}", t.dims);
        let (size, start) = match (size, start) {
            (Some(s), Some(o)) => (s, o),
            _ => {
                return Err(format!(
                    "tensor {} ({} {dims_text} at data offset {}) does not fit in memory",
                    t.name, t.ty, t.offset
                ))
            }
        };
        if t.offset % alignment as u64 != 0 {
            return Err(format!(
                "tensor {} has data offset {}; expected a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
        match start.checked_add(size) {
            Some(end) if end <= file.len() => tensors.push(GgufTensorInfo {
                name: t.name,
                dims: t.dims,
                ty: t.ty,
                range: start..end,
            }),
            _ => {
                return Err(format!(
                    "tensor {} ({} {dims_text}, {size} bytes at byte {start}) runs past the end of the file ({} bytes)",
                    t.name, t.ty, file.len()
                ))
            }
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// Names of the ggml types we do not run, for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ type",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        34 | 35 => "a TQ type",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// A tensor to write: its name, row-major shape (outermost first) and stored type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: WeightType,
}

impl TensorDesc {
    fn size(&self) -> Option<usize> {
        let (&cols, outer) = self.shape.split_last()?;
        outer
            .iter()
            .try_fold(self.ty.row_bytes(cols)?, |a, &d| a.checked_mul(d))
    }
}

/// Writes a GGUF v3 file tensor by tensor: the header first (all tensors' names, shapes and
/// types are known up front), then each tensor's bytes in the order given, so memory holds one
/// tensor at a time.
pub struct GgufWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<(TensorDesc, usize)>,
    next: usize,
    alignment: usize,
    pos: usize,
}

impl GgufWriter {
    pub fn create(
        path: &Path,
        metadata: &GgufMetadata,
        tensors: &[TensorDesc],
    ) -> Result<Self, GgufError> {
        let bad = |problem: String| GgufError::Write {
            path: path.to_path_buf(),
            problem,
        };
        let alignment = match metadata.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as usize,
            Some(v) => {
                return Err(bad(format!(
                    "metadata `{ALIGNMENT_KEY}` is {}; expected a u32 power of two",
                    v.describe()
                )))
            }
        };
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata.iter() {
            put_str(&mut header, key);
            header.extend_from_slice(&(value.ty() as u32).to_le_bytes());
            put_value(&mut header, value);
        }
        let mut sized = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        let mut names = HashSet::new();
        for t in tensors {
            if t.name.len() > MAX_NAME {
                return Err(bad(format!(
                    "tensor name {} is {} bytes; llama.cpp reads at most {MAX_NAME}",
                    t.name,
                    t.name.len()
                )));
            }
            if !names.insert(&t.name) {
                return Err(bad(format!("tensor {} is given twice", t.name)));
            }
            if t.shape.is_empty() || t.shape.len() > MAX_DIMS as usize {
                return Err(bad(format!(
                    "tensor {} has shape {:?}; expected 1..={MAX_DIMS} dimensions",
                    t.name, t.shape
                )));
            }
            let size = t.size().ok_or_else(|| {
                bad(format!(
                    "tensor {} has shape {:?}: rows of {} values are not whole {}-value {} blocks",
                    t.name,
                    t.shape,
                    t.shape[t.shape.len() - 1],
                    t.ty.block_len(),
                    t.ty
                ))
            })?;
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                header.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.ty.ggml_id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            sized.push((t.clone(), size));
            offset = (offset + size).div_ceil(alignment) * alignment;
        }
        header.resize(header.len().div_ceil(alignment) * alignment, 0);
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        out.write_all(&header).map_err(io)?;
        Ok(GgufWriter {
            path: path.to_path_buf(),
            out,
            tensors: sized,
            next: 0,
            alignment,
            pos: 0,
        })
    }

    /// Writes the next tensor's bytes (in the order given to [`GgufWriter::create`]).
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<(), GgufError> {
        let (desc, size) = self
            .tensors
            .get(self.next)
            .ok_or_else(|| GgufError::Write {
                path: self.path.clone(),
                problem: format!("all {} tensors are already written", self.tensors.len()),
            })?;
        if data.len() != *size {
            return Err(GgufError::Write {
                path: self.path.clone(),
                problem: format!(
                    "tensor {} ({} {:?}) takes {size} bytes; {} were given",
                    desc.name,
                    desc.ty,
                    desc.shape,
                    data.len()
                ),
            });
        }
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.write_all(data).map_err(io)?;
        let end = self.pos + data.len();
        let padded = end.div_ceil(self.alignment) * self.alignment;
        // The last tensor is padded too, as gguf-py and llama.cpp do.
        self.out.write_all(&vec![0u8; padded - end]).map_err(io)?;
        self.pos = padded;
        self.next += 1;
        Ok(())
    }

    /// Checks that every tensor was written and flushes the file.
    pub fn finish(mut self) -> Result<(), GgufError> {
        if self.next != self.tensors.len() {
            return Err(GgufError::Write {
                path: self.path.clone(),
                problem: format!(
                    "only {} of {} tensors were written; the next is {}",
                    self.next,
                    self.tensors.len(),
                    self.tensors[self.next].0.name
                ),
            });
        }
        self.out.flush().map_err(|source| GgufError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes a whole GGUF v3 file at once.
pub fn write(
    path: &Path,
    metadata: &GgufMetadata,
    tensors: &[(TensorDesc, &[u8])],
) -> Result<(), GgufError> {
    let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
    let mut w = GgufWriter::create(path, metadata, &descs)?;
    for (_, data) in tensors {
        w.write_tensor(data)?;
    }
    w.finish()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            $v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::F64(v) => each!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|b| *b as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;

    fn sample_metadata() -> GgufMetadata {
        let mut m = GgufMetadata::new();
        m.insert("general.architecture", GgufValue::String("llama".into()));
        m.insert("t.u8", GgufValue::U8(200));
        m.insert("t.i8", GgufValue::I8(-5));
        m.insert("t.u16", GgufValue::U16(60000));
        m.insert("t.i16", GgufValue::I16(-30000));
        m.insert("t.u32", GgufValue::U32(4_000_000_000));
        m.insert("t.i32", GgufValue::I32(-7));
        m.insert("t.u64", GgufValue::U64(1 << 40));
        m.insert("t.i64", GgufValue::I64(-(1 << 40)));
        m.insert("t.f32", GgufValue::F32(1e-5));
        m.insert("t.f64", GgufValue::F64(0.1));
        m.insert("t.bool", GgufValue::Bool(true));
        m.insert(
            "t.strs",
            GgufValue::Array(GgufArray::String(vec!["a".into(), "Ġb".into(), "".into()])),
        );
        m.insert(
            "t.nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::I32(vec![1, 2]),
                GgufArray::String(vec!["x".into()]),
                GgufArray::Array(vec![]),
            ])),
        );
        m.insert("t.empty", GgufValue::Array(GgufArray::F32(vec![])));
        m
    }

    /// A file with an f32 matrix, a Q8_0 matrix and an f32 vector.
    fn sample(dir: &Path) -> (PathBuf, Vec<(TensorDesc, Vec<u8>)>) {
        let values: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut q8 = Vec::new();
        quantize_row(WeightType::Q8_0, &values, &mut q8);
        let f32_bytes: Vec<u8> = values[..6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = vec![
            (
                TensorDesc {
                    name: "a.weight".into(),
                    shape: vec![2, 3],
                    ty: WeightType::F32,
                },
                f32_bytes,
            ),
            (
                TensorDesc {
                    name: "blk.0.q.weight".into(),
                    shape: vec![2, 64],
                    ty: WeightType::Q8_0,
                },
                q8,
            ),
            (
                TensorDesc {
                    name: "norm.weight".into(),
                    shape: vec![3],
                    ty: WeightType::F32,
                },
                [1f32, 2., 3.]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        let path = dir.join("t.gguf");
        let refs: Vec<(TensorDesc, &[u8])> = tensors
            .iter()
            .map(|(d, b)| (d.clone(), b.as_slice()))
            .collect();
        write(&path, &sample_metadata(), &refs).unwrap();
        (path, tensors)
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, tensors) = sample(dir.path());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.header().version, 3);
        assert_eq!(f.metadata(), &sample_metadata());
        assert_eq!(f.tensors().len(), 3);
        for (desc, bytes) in &tensors {
            let info = f.tensor(&desc.name).unwrap();
            assert_eq!(info.shape(), desc.shape);
            assert_eq!(info.ty, desc.ty);
            assert_eq!(info.range.start % 32, 0);
            assert_eq!(f.bytes(info), bytes.as_slice());
        }
        assert_eq!(f.tensor("a.weight").unwrap().dims, vec![3, 2]);
        let m = f.metadata();
        assert_eq!(m.get_u32("t.u8").unwrap(), Some(200));
        assert_eq!(m.get_u32("t.u32").unwrap(), Some(4_000_000_000));
        assert_eq!(m.get_u32("absent").unwrap(), None);
        assert!(m.get_u32("t.i8").is_err());
        assert!(m.get_u32("t.u64").is_err());
        assert_eq!(m.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(m.get_str_array("t.strs").unwrap().unwrap()[1], "Ġb");
        let err = m.get_str("t.f32").unwrap_err().to_string();
        assert!(
            err.contains("t.f32") && err.contains("expected a string"),
            "{err}"
        );
        assert_eq!(m.get_f64("t.f32").unwrap(), Some(1e-5f32 as f64));
    }

    /// The offset of tensor `name`'s info: the byte after its name.
    fn info_at(bytes: &[u8], name: &str) -> usize {
        let mut pat = (name.len() as u64).to_le_bytes().to_vec();
        pat.extend_from_slice(name.as_bytes());
        bytes.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len()
    }

    fn err_of(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err()
    }

    #[test]
    fn every_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        // Every prefix up to the end of the last tensor's data is refused; the padding after
        // it is not needed.
        let end = parse(&bytes).unwrap().tensors[2].range.end;
        for len in 0..end {
            let e = err_of(&bytes[..len]);
            assert!(
                e.contains("truncated")
                    || e.contains("past the end")
                    || e.contains("remain")
                    || e.contains("bytes left"),
                "{len}: {e}"
            );
        }
        let e = err_of(&bytes[..end - 1]);
        assert!(
            e.contains("tensor norm.weight") && e.contains("past the end"),
            "{e}"
        );
        parse(&bytes[..end]).unwrap();
    }

    #[test]
    fn version_2_reads_and_an_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path());
        // Version 3 only added big-endian files: a little-endian v2 file is the same layout.
        let mut b = std::fs::read(&path).unwrap();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse(&b).unwrap().version, 2);
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let e = GgufFile::open(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty.gguf: not a valid GGUF file: truncated"),
            "{e}"
        );
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        let huge = (1u64 << 63).to_le_bytes();

        let mut b = good.clone();
        b[8..16].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(e.contains("tensor count is 9223372036854775808"), "{e}");

        let mut b = good.clone();
        b[16..24].copy_from_slice(&huge);
        assert!(err_of(&b).contains("metadata key/value count"));

        // The first key's length.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(
            e.contains("the key of metadata entry 0 has length 9223372036854775808"),
            "{e}"
        );

        // A tensor name's length.
        let at = info_at(&good, "a.weight") - 8 - "a.weight".len();
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(e.contains("the name of tensor 0 has length"), "{e}");

        // An array of 2^63 strings, and a string of 2^63 bytes inside one.
        let pat = b"t.strs";
        let at = good.windows(6).position(|w| w == pat).unwrap() + 6 + 4 + 4;
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(
            e.contains("element count of metadata `t.strs` is 9223372036854775808"),
            "{e}"
        );
        let mut b = good.clone();
        b[at + 8..at + 16].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(
            e.contains("element 0 of metadata `t.strs` has length"),
            "{e}"
        );

        // A dimension of 2^63.
        let at = info_at(&good, "blk.0.q.weight") + 4 + 8;
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&huge);
        let e = err_of(&b);
        assert!(e.contains("tensor blk.0.q.weight has dimension 1"), "{e}");
    }

    #[test]
    fn bad_tensor_infos_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        let q = info_at(&good, "blk.0.q.weight");
        // [n_dims u32][dims u64 x2][type u32][offset u64]
        let (dims0, ty, offset) = (q + 4, q + 4 + 16, q + 4 + 16 + 4);

        let mut b = good.clone();
        b[ty..ty + 4].copy_from_slice(&6u32.to_le_bytes());
        let e = err_of(&b);
        assert!(
            e.contains("tensor blk.0.q.weight has ggml type 6 (Q5_0)"),
            "{e}"
        );
        b[ty..ty + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(err_of(&b).contains("ggml type 1000 (unknown)"));

        let mut b = good.clone();
        b[dims0..dims0 + 8].copy_from_slice(&48u64.to_le_bytes());
        let e = err_of(&b);
        assert!(
            e.contains("tensor blk.0.q.weight is Q8_0 with rows of 48 values")
                && e.contains("multiple of 32"),
            "{e}"
        );

        let mut b = good.clone();
        b[offset..offset + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let e = err_of(&b);
        assert!(
            e.contains("tensor blk.0.q.weight") && e.contains("runs past the end of the file"),
            "{e}"
        );
        b[offset..offset + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err_of(&b).contains("tensor blk.0.q.weight"));
        b[offset..offset + 8].copy_from_slice(&33u64.to_le_bytes());
        assert!(err_of(&b).contains("expected a multiple of the alignment 32"));

        let mut b = good.clone();
        b[q..q + 4].copy_from_slice(&5u32.to_le_bytes());
        assert!(err_of(&b).contains("tensor blk.0.q.weight has 5 dimensions"));

        let mut b = good.clone();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err_of(&b).contains("version 1; expected 2 or 3"));
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err_of(&b).contains("big-endian"));
        b[0] = b'X';
        assert!(err_of(&b).contains("magic"));
    }

    #[test]
    fn bad_metadata_is_refused() {
        let mut m = GgufMetadata::new();
        m.insert(ALIGNMENT_KEY, GgufValue::U32(24));
        let dir = tempfile::tempdir().unwrap();
        let e = write(&dir.path().join("x.gguf"), &m, &[]).unwrap_err();
        assert!(e.to_string().contains("general.alignment"), "{e}");

        // Arrays nested deeper than the reader follows.
        let mut a = GgufArray::U8(vec![]);
        for _ in 0..MAX_DEPTH + 1 {
            a = GgufArray::Array(vec![a]);
        }
        let mut m = GgufMetadata::new();
        m.insert("deep", GgufValue::Array(a));
        let path = dir.path().join("deep.gguf");
        write(&path, &m, &[]).unwrap();
        let e = err_of(&std::fs::read(&path).unwrap());
        assert!(e.contains("nests arrays more than 8 deep"), "{e}");

        // A value type id past the last one.
        let mut m = GgufMetadata::new();
        m.insert("k", GgufValue::U8(1));
        write(&path, &m, &[]).unwrap();
        let mut b = std::fs::read(&path).unwrap();
        let at = 24 + 8 + 1;
        b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
        assert!(err_of(&b).contains("metadata `k` has value type 13"));
    }

    #[test]
    fn the_writer_refuses_partial_blocks_and_wrong_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.gguf");
        let desc = |shape: Vec<usize>, ty| TensorDesc {
            name: "w".into(),
            shape,
            ty,
        };
        let e = write(
            &path,
            &GgufMetadata::new(),
            &[(desc(vec![2, 48], WeightType::Q4_0), &[0u8; 54][..])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rows of 48 values"), "{e}");
        let e = write(
            &path,
            &GgufMetadata::new(),
            &[(desc(vec![2, 3], WeightType::F32), &[0u8; 20][..])],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("takes 24 bytes; 20 were given"),
            "{e}"
        );
    }
}
