//! The CUDA backend: the [`Backend`] operations on one NVIDIA GPU, built from our kernels
//! (`switchyard-kernels`) and cuBLASLt. Weights and the KV cache are bf16; the residual stream
//! stays f32 (a tensor says which it holds), and every product takes bf16 operands with f32
//! accumulation. The CPU backend is the reference it is checked against
//! (`worker/tests/gpu_check.rs`).
//!
//! What runs where in one layer:
//! - `rms_norm`: one kernel, f32 residual in, bf16 out (the next product's operand);
//! - `qkv_rope`: three cuBLASLt products, RoPE applied while converting Q and K to bf16;
//! - `attention`: the step's metadata (slots, block tables, per-tile and per-sequence columns)
//!   in one upload per step (the layers reuse it), K/V appended to the paged cache, then
//!   prefill sequences through the FlashAttention-2 kernel and single-token (decode) sequences
//!   through split-KV decoding;
//! - `linear_add`: cuBLASLt with beta = 1, so the residual add is the product's epilogue;
//! - `router_topk`: one fused kernel (the routes then go to the host, as the trait requires);
//! - `experts_ffn_add`: GPU sort by expert, grouped SwiGLU GEMMs (GEMV or tensor cores), and
//!   a combine into the residual.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use half::bf16;
use switchyard_kernels::blas::Out;
use switchyard_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use switchyard_kernels::geometry::{decode_split, prefill_tiles};
use switchyard_kernels::gpu::{DecodeArgs, ExpertTables, PrefillArgs};
use switchyard_kernels::{Gpu, GpuContext, KernelError, Spec};
use switchyard_model::{HostWeight, ModelConfig, WeightType};

use crate::backend::{Backend, BackendError, FfnWeights, Hardware, Qkv, Routes};
use crate::batch::AttentionBatch;
use switchyard_scheduler::kv_blocks::FREED;

fn dev(e: KernelError) -> BackendError {
    BackendError::Device(e)
}

fn shape(msg: impl Into<String>) -> BackendError {
    BackendError::Shape(msg.into())
}

/// A bf16 matrix `[rows, cols]` on the GPU, as raw bits.
pub struct CudaWeight {
    data: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

/// Activations: f32 for the residual stream, bf16 for the operands of products.
pub enum CudaData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A row-major activation matrix on the GPU.
pub struct CudaTensor {
    data: CudaData,
    rows: usize,
    cols: usize,
}

/// Paged K/V per layer, bf16, `[block, slot, kv_head, head_dim]` as in the CPU backend.
pub struct CudaKvCache {
    k: Vec<CudaSlice<u16>>,
    v: Vec<CudaSlice<u16>>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// GPU `ordinal` as a worker's [`Hardware`], opened: a worker on it reports its memory and
/// makes a [`CudaBackend`] for each model it is assigned.
pub struct CudaHardware {
    ordinal: usize,
    context: GpuContext,
}

impl CudaHardware {
    pub fn open(ordinal: usize) -> Result<CudaHardware, BackendError> {
        Ok(CudaHardware {
            ordinal,
            context: GpuContext::open(ordinal).map_err(dev)?,
        })
    }
}

impl Hardware for CudaHardware {
    type Backend = CudaBackend;

    fn describe(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.context.describe())
    }

    fn memory(&self) -> (u64, u64) {
        self.context.memory().unwrap_or((0, 0))
    }

    fn weight_type(&self, _: WeightType) -> WeightType {
        WeightType::BF16
    }

    fn backend(&self, c: &ModelConfig) -> Result<CudaBackend, BackendError> {
        let spec = Spec::new(c.head_dim, c.num_heads, c.num_kv_heads).map_err(|e| dev(e.into()))?;
        CudaBackend::on(self, spec)
    }
}

pub struct CudaBackend {
    gpu: Gpu,
    meta: Mutex<Option<UploadedMeta>>,
}

/// The device a worker or `generate` runs on, from `--device`: `cpu` or `cuda:N` (the value of
/// the flag; [`CudaHardware::open`] opens a GPU it names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; expected cpu, cuda or cuda:N")),
        }
    }
}

fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// Cache slot (`block · block_size + offset`) of every row of the step, checking that each row
/// and each key a query will read has a live block (the CPU backend's checks, done on the host
/// before any kernel reads the tables).
fn slots_and_checks(batch: &AttentionBatch, num_blocks: usize) -> Result<Vec<u32>, BackendError> {
    let bs = batch.block_size;
    let block_of = |table: &[u32], pos: usize| -> Result<u32, BackendError> {
        match table.get(pos / bs) {
            Some(&b) if b != FREED && (b as usize) < num_blocks => Ok(b),
            _ => Err(shape(format!("attention: no KV block for position {pos}"))),
        }
    };
    let mut slots = Vec::new();
    for s in &batch.seqs {
        let last = s.start_pos + s.rows.len();
        for pos in batch.first_visible(s.start_pos)..last {
            let b = block_of(&s.block_table, pos)?;
            if pos >= s.start_pos {
                slots.push(b * bs as u32 + (pos % bs) as u32);
            }
        }
    }
    Ok(slots)
}

/// The sequences of a step for each attention kernel: prefill (several rows) and decode (one
/// row). A sequence with no rows this step is in neither: it has nothing to attend, and the
/// decode kernel would write the row that starts where it starts, which belongs to the next
/// sequence (or lies past the end).
fn prefill_and_decode(batch: &AttentionBatch) -> (Vec<usize>, Vec<usize>) {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for (i, s) in batch.seqs.iter().enumerate() {
        match s.rows.len() {
            0 => {}
            1 => decode.push(i),
            _ => prefill.push(i),
        }
    }
    (prefill, decode)
}

/// Everything the attention kernels of a step read besides q, k, v and the cache, packed end
/// to end in `data` for one upload; each field says where its array lies (see
/// attention_prefill.cu and attention_decode.cu for what each holds).
#[derive(Debug, Default, PartialEq)]
struct StepMeta {
    data: Vec<u32>,
    slots: Range<usize>,
    tables: Range<usize>,
    tile_seq: Range<usize>,
    tile_row: Range<usize>,
    seq_row: Range<usize>,
    seq_len: Range<usize>,
    seq_pos: Range<usize>,
    seq_table: Range<usize>,
    dec_row: Range<usize>,
    dec_pos: Range<usize>,
    dec_table: Range<usize>,
}

impl StepMeta {
    /// The metadata of `batch` over a pool of `num_blocks` blocks, checked (see
    /// [`slots_and_checks`]); `prefill` and `decode` from [`prefill_and_decode`].
    fn new(
        batch: &AttentionBatch,
        num_blocks: usize,
        prefill: &[usize],
        decode: &[usize],
    ) -> Result<StepMeta, BackendError> {
        let mut data = Vec::new();
        let mut push = |values: Vec<u32>| {
            let start = data.len();
            data.extend(values);
            start..data.len()
        };
        let slots = push(slots_and_checks(batch, num_blocks)?);
        let mut table_at = Vec::with_capacity(batch.seqs.len());
        let mut tables = Vec::new();
        for s in &batch.seqs {
            table_at.push(tables.len() as u32);
            tables.extend_from_slice(&s.block_table);
        }
        let tables = push(tables);
        let seq = |i: usize| &batch.seqs[i];
        let column = |of: &[usize], f: &dyn Fn(usize) -> u32| of.iter().map(|&i| f(i)).collect();
        let lens: Vec<usize> = prefill.iter().map(|&i| seq(i).rows.len()).collect();
        let (tile_seq, tile_row) = prefill_tiles(&lens);
        let (tile_seq, tile_row) = (push(tile_seq), push(tile_row));
        let seq_row = push(column(prefill, &|i| seq(i).rows.start as u32));
        let seq_len = push(column(prefill, &|i| seq(i).rows.len() as u32));
        let seq_pos = push(column(prefill, &|i| seq(i).start_pos as u32));
        let seq_table = push(column(prefill, &|i| table_at[i]));
        let dec_row = push(column(decode, &|i| seq(i).rows.start as u32));
        let dec_pos = push(column(decode, &|i| seq(i).start_pos as u32));
        let dec_table = push(column(decode, &|i| table_at[i]));
        push(vec![0]); // never empty, so the upload always has a buffer
        Ok(StepMeta {
            data,
            slots,
            tables,
            tile_seq,
            tile_row,
            seq_row,
            seq_len,
            seq_pos,
            seq_table,
            dec_row,
            dec_pos,
            dec_table,
        })
    }
}

/// The last step metadata uploaded: every layer of a step builds the same, so while it does,
/// the device copy is reused (one upload per step rather than one per layer).
struct UploadedMeta {
    host: Vec<u32>,
    device: Arc<CudaSlice<u32>>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles the kernels for a model with these attention shapes.
    pub fn new(
        ordinal: usize,
        head_dim: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Self, BackendError> {
        // Shapes the kernels cannot serve are refused before the driver is touched.
        let spec = Spec::new(head_dim, heads, kv_heads).map_err(|e| dev(e.into()))?;
        CudaBackend::on(&CudaHardware::open(ordinal)?, spec)
    }

    /// Compiles the kernels on an opened GPU for a model of attention shape `spec`.
    fn on(hardware: &CudaHardware, spec: Spec) -> Result<Self, BackendError> {
        let gpu = Gpu::on(&hardware.context, spec).map_err(dev)?;
        Ok(CudaBackend {
            gpu,
            meta: Mutex::new(None),
        })
    }

    /// Fresh outputs, KV caches and the kernels' internal buffers start as NaN (indices far out
    /// of range) rather than zeros; for checks, not serving.
    pub fn set_poison(&mut self, on: bool) {
        self.gpu.set_poison(on);
    }

    /// The kernels and the stream, for tests and benchmarks that call kernels directly.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.gpu.stream()
    }

    fn upload<T: switchyard_kernels::cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, BackendError> {
        self.stream().clone_htod(data).map_err(|e| dev(e.into()))
    }

    /// The step's attention metadata on the device: the last upload when it holds the same
    /// values, else a new one.
    fn upload_meta(&self, data: &[u32]) -> Result<Arc<CudaSlice<u32>>, BackendError> {
        let mut last = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = last.as_ref().filter(|m| m.host == data) {
            return Ok(m.device.clone());
        }
        let device = Arc::new(self.upload(data)?);
        *last = Some(UploadedMeta {
            host: data.to_vec(),
            device: device.clone(),
        });
        Ok(device)
    }

    fn fresh_f32(&self, n: usize) -> Result<CudaSlice<f32>, BackendError> {
        self.gpu.scratch(n).map_err(dev)
    }

    fn fresh_bf16(&self, n: usize) -> Result<CudaSlice<u16>, BackendError> {
        self.gpu.scratch(n).map_err(dev)
    }

    /// The bf16 operand of a product: the tensor itself, or a converted copy of an f32 one.
    fn as_bf16<'a>(
        &self,
        x: &'a CudaTensor,
        converted: &'a mut Option<CudaSlice<u16>>,
    ) -> Result<&'a CudaSlice<u16>, BackendError> {
        match &x.data {
            CudaData::Bf16(b) => Ok(b),
            CudaData::F32(f) => {
                let mut out = self.fresh_bf16(x.rows * x.cols)?;
                self.gpu.cast_f32_bf16(f, &mut out).map_err(dev)?;
                Ok(converted.insert(out))
            }
        }
    }

    fn check_cols(what: &str, x: &CudaTensor, cols: usize) -> Result<(), BackendError> {
        if x.cols != cols {
            return Err(shape(format!(
                "{what}: input has {} columns, weight expects {cols}",
                x.cols
            )));
        }
        Ok(())
    }

    fn residual_f32<'a>(
        what: &str,
        r: &'a mut CudaTensor,
        rows: usize,
        cols: usize,
    ) -> Result<&'a mut CudaSlice<f32>, BackendError> {
        if r.rows != rows || r.cols != cols {
            return Err(shape(format!(
                "{what}: output and residual differ in shape"
            )));
        }
        match &mut r.data {
            CudaData::F32(f) => Ok(f),
            CudaData::Bf16(_) => Err(shape(format!(
                "{what}: the residual must be an f32 tensor (the residual stream)"
            ))),
        }
    }

    /// `x · wᵀ` into a new tensor of the given storage.
    fn product(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        f32_out: bool,
    ) -> Result<CudaTensor, BackendError> {
        let mut conv = None;
        let xb = self.as_bf16(x, &mut conv)?;
        self.product_of(xb, (x.rows, x.cols), w, f32_out)
    }

    /// `x · wᵀ` for a bf16 operand `xb` of shape `(rows, cols)`.
    fn product_of(
        &self,
        xb: &CudaSlice<u16>,
        (rows, cols): (usize, usize),
        w: &CudaWeight,
        f32_out: bool,
    ) -> Result<CudaTensor, BackendError> {
        if cols != w.cols {
            return Err(shape(format!(
                "linear: input has {cols} columns, weight expects {}",
                w.cols
            )));
        }
        let mnk = (rows, w.rows, w.cols);
        let data = if f32_out {
            let mut y = self.fresh_f32(rows * w.rows)?;
            self.gpu
                .matmul(xb, &w.data, Out::F32(&mut y), mnk, false)
                .map_err(dev)?;
            CudaData::F32(y)
        } else {
            let mut y = self.fresh_bf16(rows * w.rows)?;
            self.gpu
                .matmul(xb, &w.data, Out::Bf16(&mut y), mnk, false)
                .map_err(dev)?;
            CudaData::Bf16(y)
        };
        Ok(CudaTensor {
            data,
            rows,
            cols: w.rows,
        })
    }

    /// Q or K: f32 product of the bf16 operand `xb`, then RoPE into bf16.
    fn project_rope(
        &self,
        xb: &CudaSlice<u16>,
        dims: (usize, usize),
        w: &CudaWeight,
        positions: &CudaSlice<u32>,
        theta: f64,
    ) -> Result<CudaTensor, BackendError> {
        let y = self.product_of(xb, dims, w, true)?;
        let CudaData::F32(yf) = &y.data else {
            unreachable!("product_of(.., true) is f32")
        };
        let mut out = self.fresh_bf16(y.rows * y.cols)?;
        self.gpu
            .rope(yf, positions, &mut out, y.cols, theta)
            .map_err(dev)?;
        Ok(CudaTensor {
            data: CudaData::Bf16(out),
            rows: y.rows,
            cols: y.cols,
        })
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    const VALUE_BYTES: u64 = 2;

    /// Every stored type is widened on the host and kept as bf16 (the dequantizing GEMV
    /// kernels are not wired in yet).
    fn kept_type(&self, _: WeightType) -> WeightType {
        WeightType::BF16
    }

    fn weight(&self, w: HostWeight) -> Result<CudaWeight, BackendError> {
        Ok(CudaWeight {
            data: self.upload(&to_bf16_bits(&w.to_f32()))?,
            rows: w.rows(),
            cols: w.cols(),
        })
    }

    fn tensor(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        if data.len() != rows * cols {
            return Err(shape(format!(
                "{} values cannot form a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let data = match data.is_empty() {
            true => self.fresh_f32(0)?,
            false => self.upload(&data)?,
        };
        Ok(CudaTensor {
            data: CudaData::F32(data),
            rows,
            cols,
        })
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        let n = t.rows * t.cols;
        let s = self.stream();
        let mut v = match &t.data {
            CudaData::F32(f) => s.clone_dtoh(f).map_err(|e| dev(e.into()))?,
            CudaData::Bf16(b) => s
                .clone_dtoh(b)
                .map_err(|e| dev(e.into()))?
                .into_iter()
                .map(|x| bf16::from_bits(x).to_f32())
                .collect(),
        };
        v.truncate(n);
        Ok(v)
    }

    fn rows(&self, t: &CudaTensor) -> usize {
        t.rows
    }

    fn cols(&self, t: &CudaTensor) -> usize {
        t.cols
    }

    fn add(&self, x: &CudaTensor, residual: &mut CudaTensor) -> Result<(), BackendError> {
        let CudaData::F32(xf) = &x.data else {
            return Err(shape("add: x must be an f32 tensor"));
        };
        let r = Self::residual_f32("add", residual, x.rows, x.cols)?;
        self.gpu.add_f32(xf, r).map_err(dev)
    }

    fn kv_cache(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<CudaKvCache, BackendError> {
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.fresh_bf16(per_layer)?);
            v.push(self.fresh_bf16(per_layer)?);
        }
        Ok(CudaKvCache {
            k,
            v,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        })
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor, BackendError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(shape(format!(
                "token id {id} is out of range for a vocabulary of {}",
                table.rows
            )));
        }
        let mut out = self.fresh_f32(ids.len() * table.cols)?;
        if !ids.is_empty() {
            let ids_d = self.upload(ids)?;
            self.gpu
                .embed_gather(&table.data, &ids_d, &mut out, table.cols)
                .map_err(dev)?;
        }
        Ok(CudaTensor {
            data: CudaData::F32(out),
            rows: ids.len(),
            cols: table.cols,
        })
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        Self::check_cols("rms_norm", x, weight.rows * weight.cols)?;
        let CudaData::F32(xf) = &x.data else {
            return Err(shape(
                "rms_norm: the input must be an f32 tensor (the residual stream)",
            ));
        };
        let mut out = self.fresh_bf16(x.rows * x.cols)?;
        self.gpu
            .rms_norm(xf, &weight.data, &mut out, (x.rows, x.cols), eps)
            .map_err(dev)?;
        Ok(CudaTensor {
            data: CudaData::Bf16(out),
            rows: x.rows,
            cols: x.cols,
        })
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor, BackendError> {
        self.product(x, w, true)
    }

    fn linear_add(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        residual: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        Self::check_cols("linear_add", x, w.cols)?;
        let mut conv = None;
        let xb = self.as_bf16(x, &mut conv)?;
        let r = Self::residual_f32("linear_add", residual, x.rows, w.rows)?;
        self.gpu
            .matmul(xb, &w.data, Out::F32(r), (x.rows, w.rows, w.cols), true)
            .map_err(dev)
    }

    fn qkv_rope(
        &self,
        x: &CudaTensor,
        wq: &CudaWeight,
        wk: &CudaWeight,
        wv: &CudaWeight,
        positions: &[u32],
        head_dim: usize,
        rope_theta: f64,
    ) -> Result<Qkv<CudaTensor>, BackendError> {
        if positions.len() != x.rows {
            return Err(shape(format!(
                "qkv_rope: {} positions for {} rows",
                positions.len(),
                x.rows
            )));
        }
        if head_dim != self.gpu.spec().head_dim {
            return Err(shape(format!(
                "qkv_rope: head_dim {head_dim}, but the kernels were compiled for {}",
                self.gpu.spec().head_dim
            )));
        }
        // One bf16 operand for the three products (converted once if x is f32), not copied.
        let mut conv = None;
        let xb = self.as_bf16(x, &mut conv)?;
        let dims = (x.rows, x.cols);
        let pos = self.upload(positions)?;
        Ok(Qkv {
            q: self.project_rope(xb, dims, wq, &pos, rope_theta)?,
            k: self.project_rope(xb, dims, wk, &pos, rope_theta)?,
            v: self.product_of(xb, dims, wv, false)?,
        })
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        batch: &AttentionBatch,
    ) -> Result<CudaTensor, BackendError> {
        let (hd, kvh, bs) = (cache.head_dim, cache.kv_heads, cache.block_size);
        if bs != batch.block_size
            || k.cols != kvh * hd
            || v.cols != kvh * hd
            || !q.cols.is_multiple_of(hd)
        {
            return Err(shape("attention: cache and batch shapes disagree"));
        }
        let heads = q.cols / hd;
        if heads / kvh != self.gpu.spec().group || hd != self.gpu.spec().head_dim {
            return Err(shape(
                "attention: head layout differs from what the kernels were compiled for",
            ));
        }
        let (CudaData::Bf16(qb), CudaData::Bf16(kb), CudaData::Bf16(vb)) =
            (&q.data, &k.data, &v.data)
        else {
            return Err(shape(
                "attention: q, k and v must be bf16 (the output of qkv_rope)",
            ));
        };
        if layer >= cache.k.len() {
            return Err(shape(format!(
                "attention: layer {layer} of {}",
                cache.k.len()
            )));
        }

        // 1. All the metadata the kernels read, in one upload per step.
        let (prefill, decode) = prefill_and_decode(batch);
        let meta = StepMeta::new(batch, cache.num_blocks, &prefill, &decode)?;
        if meta.slots.len() != q.rows {
            return Err(shape(
                "attention: the batch's rows and the tensors' rows differ",
            ));
        }
        let meta_d = self.upload_meta(&meta.data)?;
        let part = |r: &Range<usize>| meta_d.slice(r.clone());

        // 2. This step's K and V into their slots.
        self.gpu
            .kv_append(
                kb,
                vb,
                &part(&meta.slots),
                (&mut cache.k[layer], &mut cache.v[layer]),
                kvh * hd,
                cache.num_blocks * bs,
            )
            .map_err(dev)?;

        // 3. Attention: prefill sequences, then decode sequences.
        let window = batch.window.unwrap_or(0);
        let mut out = self.fresh_bf16(q.rows * q.cols)?;
        if !prefill.is_empty() {
            let a = PrefillArgs {
                q: qb,
                k_cache: &cache.k[layer],
                v_cache: &cache.v[layer],
                tile_seq: part(&meta.tile_seq),
                tile_row: part(&meta.tile_row),
                seq_row: part(&meta.seq_row),
                seq_len: part(&meta.seq_len),
                seq_pos: part(&meta.seq_pos),
                seq_table: part(&meta.seq_table),
                tables: part(&meta.tables),
                heads,
                kv_heads: kvh,
                block_size: bs,
                window,
            };
            self.gpu.attention_prefill(&a, &mut out).map_err(dev)?;
        }
        if !decode.is_empty() {
            let longest = decode
                .iter()
                .map(|&i| {
                    let pos = batch.seqs[i].start_pos;
                    pos + 1 - batch.first_visible(pos)
                })
                .max()
                .unwrap_or(1);
            let split = decode_split(decode.len(), kvh, longest, self.gpu.sm_count());
            let a = DecodeArgs {
                q: qb,
                k_cache: &cache.k[layer],
                v_cache: &cache.v[layer],
                dec_row: part(&meta.dec_row),
                dec_pos: part(&meta.dec_pos),
                dec_table: part(&meta.dec_table),
                tables: part(&meta.tables),
                seqs: decode.len(),
                heads,
                kv_heads: kvh,
                block_size: bs,
                window,
                splits: split.splits,
                split_len: split.split_len,
            };
            self.gpu.attention_decode(&a, &mut out).map_err(dev)?;
        }
        Ok(CudaTensor {
            data: CudaData::Bf16(out),
            rows: q.rows,
            cols: q.cols,
        })
    }

    fn router_topk(
        &self,
        x: &CudaTensor,
        gate: &CudaWeight,
        top_k: usize,
    ) -> Result<Routes, BackendError> {
        Self::check_cols("router_topk", x, gate.cols)?;
        let mut conv = None;
        let xb = self.as_bf16(x, &mut conv)?;
        let (ids, weights) = self
            .gpu
            .moe_router(xb, &gate.data, (x.rows, x.cols, gate.rows), top_k)
            .map_err(dev)?;
        let s = self.stream();
        let mut experts = s.clone_dtoh(&ids).map_err(|e| dev(e.into()))?;
        let mut weights = s.clone_dtoh(&weights).map_err(|e| dev(e.into()))?;
        experts.truncate(x.rows * top_k);
        weights.truncate(x.rows * top_k);
        Ok(Routes {
            top_k,
            experts,
            weights,
        })
    }

    fn experts_ffn_add(
        &self,
        x: &CudaTensor,
        routes: &Routes,
        experts: &[(u32, &FfnWeights<CudaWeight>)],
        residual: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let Some((_, first)) = experts.first() else {
            return Ok(());
        };
        let (hidden, inter) = (x.cols, first.gate.rows);
        Self::check_cols("experts_ffn_add", x, first.gate.cols)?;
        if routes.experts.len() != x.rows * routes.top_k {
            return Err(shape("experts_ffn_add: routes do not match the rows"));
        }
        // Local index of each expert id held here, -1 for the rest.
        let n_ids = routes
            .experts
            .iter()
            .copied()
            .chain(experts.iter().map(|(e, _)| *e))
            .max()
            .unwrap_or(0) as usize
            + 1;
        let mut local_of = vec![-1i32; n_ids];
        let mut rows_per_local = vec![0usize; experts.len()];
        for (l, (e, w)) in experts.iter().enumerate() {
            if w.gate.cols != hidden
                || w.gate.rows != inter
                || w.up.rows != inter
                || w.down.cols != inter
            {
                return Err(shape(format!(
                    "experts_ffn_add: expert {e} differs in shape"
                )));
            }
            local_of[*e as usize] = l as i32;
        }
        for &e in &routes.experts {
            if let Ok(l) = usize::try_from(local_of[e as usize]) {
                rows_per_local[l] += 1;
            }
        }
        let rows: usize = rows_per_local.iter().sum();
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let ptrs = |pick: &dyn Fn(&FfnWeights<CudaWeight>) -> &CudaSlice<u16>| -> Result<CudaSlice<u64>, BackendError> {
            let addrs: Vec<u64> = experts
                .iter()
                .map(|(_, w)| pick(w).device_ptr(s).0)
                .collect();
            self.upload(&addrs)
        };
        let tables = ExpertTables {
            gate: ptrs(&|w| &w.gate.data)?,
            up: ptrs(&|w| &w.up.data)?,
            down: ptrs(&|w| &w.down.data)?,
            count: experts.len(),
        };
        let mut conv = None;
        let xb = self.as_bf16(x, &mut conv)?;
        let ids = self.upload(&routes.experts)?;
        let wts = self.upload(&routes.weights)?;
        let local_d = self.upload(&local_of)?;
        let sorted = self
            .gpu
            .moe_sort(&ids, &wts, &local_d, routes.top_k, experts.len())
            .map_err(dev)?;
        let max_rows = rows_per_local.iter().copied().max().unwrap_or(0);
        let y = self
            .gpu
            .moe_experts(xb, &sorted, &tables, (rows, hidden, inter), max_rows)
            .map_err(dev)?;
        let r = Self::residual_f32("experts_ffn_add", residual, x.rows, hidden)?;
        self.gpu
            .moe_combine(&y, &sorted.pos_of, r, (x.rows, hidden), routes.top_k)
            .map_err(dev)
    }

    fn mlp_add(
        &self,
        x: &CudaTensor,
        w: &FfnWeights<CudaWeight>,
        residual: &mut CudaTensor,
    ) -> Result<(), BackendError> {
        let gate = self.product(x, &w.gate, true)?;
        let up = self.product(x, &w.up, true)?;
        let (CudaData::F32(g), CudaData::F32(u)) = (&gate.data, &up.data) else {
            unreachable!("product(.., true) is f32")
        };
        let mut act = self.fresh_bf16(gate.rows * gate.cols)?;
        self.gpu.silu_mul(g, u, &mut act).map_err(dev)?;
        let act = CudaTensor {
            data: CudaData::Bf16(act),
            rows: gate.rows,
            cols: gate.cols,
        };
        self.linear_add(&act, &w.down, residual)
    }

    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor, BackendError> {
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(shape(format!("select_rows: row {r} of {}", x.rows)));
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let n = rows.len() * x.cols;
        let data = if idx.is_empty() {
            match &x.data {
                CudaData::F32(_) => CudaData::F32(self.fresh_f32(0)?),
                CudaData::Bf16(_) => CudaData::Bf16(self.fresh_bf16(0)?),
            }
        } else {
            let idx_d = self.upload(&idx)?;
            match &x.data {
                CudaData::F32(f) => {
                    let mut out = self.fresh_f32(n)?;
                    self.gpu
                        .gather_rows(f, &idx_d, &mut out, x.cols)
                        .map_err(dev)?;
                    CudaData::F32(out)
                }
                CudaData::Bf16(b) => {
                    let mut out = self.fresh_bf16(n)?;
                    self.gpu
                        .gather_rows(b, &idx_d, &mut out, x.cols)
                        .map_err(dev)?;
                    CudaData::Bf16(out)
                }
            }
        };
        Ok(CudaTensor {
            data,
            rows: rows.len(),
            cols: x.cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_scheduler::step::SeqInput;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn slots_follow_the_block_tables_and_freed_blocks_are_refused() {
        let inputs = [
            SeqInput {
                tokens: vec![1, 2, 3],
                start_pos: 15,
                block_table: vec![4, 7],
                logits: switchyard_scheduler::step::LogitsWanted::Last,
            },
            SeqInput {
                tokens: vec![9],
                start_pos: 0,
                block_table: vec![2],
                logits: switchyard_scheduler::step::LogitsWanted::Last,
            },
        ];
        let batch = AttentionBatch::new(&inputs, 16, None);
        assert_eq!(
            slots_and_checks(&batch, 8).unwrap(),
            vec![4 * 16 + 15, 7 * 16, 7 * 16 + 1, 2 * 16]
        );
        // Block 7 is beyond an 6-block pool.
        assert!(slots_and_checks(&batch, 6).is_err());
        // A window of 2 at position 17 needs positions 16.. only: block 0 of the table may be
        // freed for the decode-only view, but this chunk starts at 15, so it must be live.
        let mut freed = inputs.clone();
        freed[0].block_table[0] = FREED;
        let batch = AttentionBatch::new(&freed, 16, Some(2));
        assert!(slots_and_checks(&batch, 8).is_err());
    }

    fn seq(tokens: usize, start_pos: usize, block_table: Vec<u32>) -> SeqInput {
        SeqInput {
            tokens: vec![5; tokens],
            start_pos,
            block_table,
            logits: switchyard_scheduler::step::LogitsWanted::Last,
        }
    }

    #[test]
    fn sequences_without_rows_reach_no_kernel() {
        let inputs = [
            seq(0, 3, vec![0]),
            seq(4, 0, vec![1]),
            seq(0, 7, vec![0]),
            seq(1, 9, vec![2]),
            seq(0, 0, vec![]),
        ];
        let batch = AttentionBatch::new(&inputs, 16, None);
        assert_eq!(prefill_and_decode(&batch), (vec![1], vec![3]));
    }

    #[test]
    fn step_metadata_packs_each_kernels_columns() {
        // A prefill chunk over two blocks, a decode row, and an empty sequence between them.
        let inputs = [
            seq(3, 15, vec![4, 7]),
            seq(0, 5, vec![1]),
            seq(1, 0, vec![2]),
        ];
        let batch = AttentionBatch::new(&inputs, 16, None);
        let (prefill, decode) = prefill_and_decode(&batch);
        let m = StepMeta::new(&batch, 8, &prefill, &decode).unwrap();
        let at = |r: &Range<usize>| m.data[r.clone()].to_vec();
        assert_eq!(at(&m.slots), vec![4 * 16 + 15, 7 * 16, 7 * 16 + 1, 2 * 16]);
        assert_eq!(at(&m.tables), vec![4, 7, 1, 2]);
        assert_eq!((at(&m.tile_seq), at(&m.tile_row)), (vec![0], vec![0]));
        assert_eq!(
            (
                at(&m.seq_row),
                at(&m.seq_len),
                at(&m.seq_pos),
                at(&m.seq_table)
            ),
            (vec![0], vec![3], vec![15], vec![0])
        );
        assert_eq!(
            (at(&m.dec_row), at(&m.dec_pos), at(&m.dec_table)),
            (vec![3], vec![0], vec![3])
        );
        // Every layer of the step builds the same metadata, so one upload serves them all.
        assert_eq!(m, StepMeta::new(&batch, 8, &prefill, &decode).unwrap());
        // A key without a block is refused before anything is uploaded.
        assert!(StepMeta::new(&batch, 5, &prefill, &decode).is_err());
    }

    #[test]
    fn a_machine_without_cuda_gets_an_error_not_a_panic() {
        // On a GPU machine this opens the device instead; either way it must not panic.
        if let Err(e) = CudaBackend::new(0, 16, 4, 2) {
            assert!(matches!(e, BackendError::Device(_)), "{e}");
        }
        // Unsupported shapes are refused before touching the driver.
        let e = CudaBackend::new(0, 72, 8, 8).err().expect("head_dim 72");
        assert!(e.to_string().contains("head_dim 72"), "{e}");
    }
}
