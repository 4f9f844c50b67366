//! One GPU: its context, a stream of one backend's own, the kernel modules compiled for it and
//! the cuBLASLt plans, with a typed method per kernel. Launch wrappers check what the kernels
//! assume (sizes, alignment) and return [`KernelError::Launch`] instead of launching out of
//! bounds.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::blas::{Blas, Out};
use crate::cache::DiskCache;
use crate::compile::{Nvrtc, Target};
use crate::geometry::{
    moe_row_tiles_bound, MoePath, MOE_GEMV_BLOCK_OUT, MOE_TILE_COLS, PREFILL_ROWS,
};
use crate::source::{Module, Spec};
use crate::KernelError;

/// Threads of the row-wise kernels.
const ROW_THREADS: u32 = 256;

pub struct Gpu {
    stream: Arc<CudaStream>,
    spec: Spec,
    sm_count: usize,
    functions: HashMap<&'static str, CudaFunction>,
    blas: Blas,
    /// Fill fresh buffers with [`Scratch::POISON`] instead of zeros (the on-GPU check does, so
    /// an element a kernel forgot to write cannot pass for a correct zero).
    poison: bool,
}

/// Element types of fresh device buffers, and the value a poisoned one is filled with: NaN
/// for floats, an index far out of range for integers.
pub trait Scratch: DeviceRepr + ValidAsZeroBits + Copy {
    const POISON: Self;
}

impl Scratch for f32 {
    const POISON: f32 = f32::NAN;
}

/// bf16 bits: a quiet NaN.
impl Scratch for u16 {
    const POISON: u16 = 0x7fc0;
}

impl Scratch for u32 {
    const POISON: u32 = u32::MAX;
}

impl Scratch for i32 {
    const POISON: i32 = i32::MIN;
}

fn launch_err(msg: String) -> KernelError {
    KernelError::Launch(msg)
}

fn cfg(grid: (usize, usize, usize), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Inputs of prefill attention (see attention_prefill.cu for the layout of each). The metadata
/// are views: a backend uploads a step's metadata in one copy and hands out its parts.
pub struct PrefillArgs<'a> {
    pub q: &'a CudaSlice<u16>,
    pub k_cache: &'a CudaSlice<u16>,
    pub v_cache: &'a CudaSlice<u16>,
    pub tile_seq: CudaView<'a, u32>,
    pub tile_row: CudaView<'a, u32>,
    pub seq_row: CudaView<'a, u32>,
    pub seq_len: CudaView<'a, u32>,
    pub seq_pos: CudaView<'a, u32>,
    pub seq_table: CudaView<'a, u32>,
    pub tables: CudaView<'a, u32>,
    pub heads: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    /// 0 = no sliding window.
    pub window: usize,
}

/// Inputs of decode attention (see attention_decode.cu).
pub struct DecodeArgs<'a> {
    pub q: &'a CudaSlice<u16>,
    pub k_cache: &'a CudaSlice<u16>,
    pub v_cache: &'a CudaSlice<u16>,
    pub dec_row: CudaView<'a, u32>,
    pub dec_pos: CudaView<'a, u32>,
    pub dec_table: CudaView<'a, u32>,
    pub tables: CudaView<'a, u32>,
    pub seqs: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    pub window: usize,
    pub splits: usize,
    pub split_len: usize,
}

/// The experts of one MoE layer held on this GPU, as tables of device addresses (index = local
/// expert).
pub struct ExpertTables {
    pub gate: CudaSlice<u64>,
    pub up: CudaSlice<u64>,
    pub down: CudaSlice<u64>,
    pub count: usize,
}

/// The GPU expert sort's outputs (see `moe_sort` in moe.cu and [`crate::routing`]).
pub struct Sorted {
    pub offsets: CudaSlice<u32>,
    pub tiles: CudaSlice<u32>,
    pub sorted_token: CudaSlice<u32>,
    pub sorted_weight: CudaSlice<f32>,
    pub pos_of: CudaSlice<i32>,
}

/// Element types `gather_rows` has a kernel for.
pub trait Gatherable: cudarc::driver::DeviceRepr {
    const GATHER_KERNEL: &'static str;
}

impl Gatherable for f32 {
    const GATHER_KERNEL: &'static str = "gather_rows_f32";
}

/// bf16, as its bits.
impl Gatherable for u16 {
    const GATHER_KERNEL: &'static str = "gather_rows_bf16";
}

/// A GPU the driver sees and the kernels can run on (compute capability 8.0 or newer), opened:
/// its CUDA context and architecture. [`Gpu::on`] compiles the kernels on it.
#[derive(Clone)]
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    arch: u32,
}

impl GpuContext {
    /// Opens GPU `ordinal`; says plainly why not when there is no driver, no such GPU, or an
    /// older one.
    pub fn open(ordinal: usize) -> Result<GpuContext, KernelError> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Missing(
                "the CUDA driver (libcuda) was not found: this machine has no NVIDIA driver, \
                 or it is not on the library path"
                    .into(),
            ));
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(KernelError::Missing(format!(
                "cuda:{ordinal} requested but the driver sees {count} GPU(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // Each `Gpu` made from this context runs on a stream of its own (several workers may
        // share a GPU) and its buffers never cross to another's stream (backends exchange
        // tensors through the host), so cudarc's cross-stream event tracking would only add
        // an event record and wait per kernel argument.
        // SAFETY: no buffer of this context is used on two streams (above).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(KernelError::Missing(format!(
                "cuda:{ordinal} has compute capability {major}.{minor}; the kernels need 8.0 \
                 (Ampere) or newer (bf16 mma.sync, cp.async)"
            )));
        }
        Ok(GpuContext {
            ctx,
            arch: (major * 10 + minor) as u32,
        })
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name} (sm_{})", self.arch)
    }

    /// Total and free device memory in bytes.
    pub fn memory(&self) -> Result<(u64, u64), KernelError> {
        let (free, total) = self.ctx.mem_get_info()?;
        Ok((total as u64, free as u64))
    }
}

impl Gpu {
    /// Compiles (or loads from the disk cache) every kernel for `context`'s GPU architecture and a
    /// model of shape `spec`, and sets up cuBLASLt.
    pub fn on(context: &GpuContext, spec: Spec) -> Result<Gpu, KernelError> {
        let (ctx, arch) = (context.ctx.clone(), context.arch);
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        // A stream of its own rather than the legacy default stream, which would serialise
        // every backend on this GPU with every other.
        let stream = ctx.new_stream()?;
        let nvrtc = Nvrtc::load()?;
        let cache = DiskCache::new(DiskCache::default_dir());
        let mut functions = HashMap::new();
        for module in Module::SERVING {
            let cubin = cache.compile(&nvrtc, module, &spec, Target::Cubin(arch))?;
            let loaded = ctx.load_module(Ptx::from_binary(cubin))?;
            for &name in module.kernels() {
                functions.insert(name, loaded.load_function(name)?);
            }
        }
        let blas = Blas::new(stream.clone(), (arch / 10) as i32)?;
        Ok(Gpu {
            stream,
            spec,
            sm_count,
            functions,
            blas,
            poison: false,
        })
    }

    /// Fresh buffers (this crate's and the backend's) start poisoned rather than zeroed; for
    /// checks, not serving.
    pub fn set_poison(&mut self, on: bool) {
        self.poison = on;
    }

    /// A fresh buffer of `n` elements (at least one, so it always has an address): zeros, or
    /// [`Scratch::POISON`] when poisoning.
    pub fn scratch<T: Scratch>(&self, n: usize) -> Result<CudaSlice<T>, KernelError> {
        let n = n.max(1);
        Ok(match self.poison {
            true => self.stream.clone_htod(&vec![T::POISON; n])?,
            false => self.stream.alloc_zeros::<T>(n)?,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn spec(&self) -> Spec {
        self.spec
    }

    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is listed in source.rs and loaded in new()"))
    }

    /// `y[m, n] (+)= x[m, k] · w[n, k]ᵀ` through cuBLASLt.
    pub fn matmul(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: Out<'_>,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<(), KernelError> {
        self.blas.matmul(x, w, out, mnk, accumulate)
    }

    pub fn embed_gather(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<(), KernelError> {
        let rows = ids.len();
        if out.len() < rows * cols {
            return Err(launch_err("embed_gather: output too small".into()));
        }
        if rows == 0 {
            return Ok(());
        }
        let c = cols as i32;
        let mut b = self.stream.launch_builder(self.f("embed_gather"));
        b.arg(table).arg(ids).arg(out).arg(&c);
        // SAFETY: ids were checked against the table on the host; out holds rows × cols.
        unsafe { b.launch(cfg((rows, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        (rows, cols): (usize, usize),
        eps: f32,
    ) -> Result<(), KernelError> {
        if x.len() < rows * cols || out.len() < rows * cols || w.len() < cols {
            return Err(launch_err(
                "rms_norm: buffers do not match the shape".into(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let c = cols as i32;
        let mut b = self.stream.launch_builder(self.f("rms_norm"));
        b.arg(x).arg(w).arg(out).arg(&c).arg(&eps);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg((rows, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    pub fn rope(
        &self,
        x: &CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        out: &mut CudaSlice<u16>,
        cols: usize,
        theta: f64,
    ) -> Result<(), KernelError> {
        let rows = positions.len();
        let hd = self.spec.head_dim;
        if x.len() < rows * cols || out.len() < rows * cols || !cols.is_multiple_of(hd) {
            return Err(launch_err("rope: buffers do not match the shape".into()));
        }
        if rows == 0 {
            return Ok(());
        }
        let (c, h, lt) = (cols as i32, hd as i32, theta.ln());
        let mut b = self.stream.launch_builder(self.f("rope"));
        b.arg(x).arg(positions).arg(out).arg(&c).arg(&h).arg(&lt);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg((rows, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    /// Writes K and V rows into cache slots `slots` (one per row).
    pub fn kv_append(
        &self,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        slots: &CudaView<'_, u32>,
        caches: (&mut CudaSlice<u16>, &mut CudaSlice<u16>),
        kv_cols: usize,
        max_slot: usize,
    ) -> Result<(), KernelError> {
        let rows = slots.len();
        if !kv_cols.is_multiple_of(8)
            || k.len() < rows * kv_cols
            || v.len() < rows * kv_cols
            || caches.0.len() < max_slot * kv_cols
            || caches.1.len() < max_slot * kv_cols
        {
            return Err(launch_err(
                "kv_append: buffers do not match the shape".into(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let c = kv_cols as i32;
        let mut b = self.stream.launch_builder(self.f("kv_append"));
        b.arg(k)
            .arg(v)
            .arg(slots)
            .arg(caches.0)
            .arg(caches.1)
            .arg(&c);
        // SAFETY: every slot is below max_slot (the caller computed them from its block tables).
        unsafe { b.launch(cfg((rows, 1, 1), 128)) }?;
        Ok(())
    }

    pub fn cast_f32_bf16(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), KernelError> {
        let n = x.len();
        if out.len() < n {
            return Err(launch_err("cast_f32_bf16: output too small".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let blocks = n.div_ceil(ROW_THREADS as usize).min(4096);
        let mut b = self.stream.launch_builder(self.f("cast_f32_bf16"));
        b.arg(x).arg(out).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg((blocks, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    /// `out = bf16(silu(gate) ⊙ up)`, elementwise.
    pub fn silu_mul(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), KernelError> {
        let n = gate.len();
        if up.len() != n || out.len() < n {
            return Err(launch_err("silu_mul: buffers differ in size".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let blocks = n.div_ceil(ROW_THREADS as usize).min(4096);
        let mut b = self.stream.launch_builder(self.f("silu_mul"));
        b.arg(gate).arg(up).arg(out).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg((blocks, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    /// `residual += x`, elementwise, f32.
    pub fn add_f32(
        &self,
        x: &CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let n = x.len();
        if residual.len() != n {
            return Err(launch_err("add_f32: buffers differ in size".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let blocks = n.div_ceil(ROW_THREADS as usize).min(4096);
        let mut b = self.stream.launch_builder(self.f("add_f32"));
        b.arg(x).arg(residual).arg(&n64);
        // SAFETY: sizes checked above.
        unsafe { b.launch(cfg((blocks, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    /// `out[i, :] = x[rows[i], :]` for a matrix of `cols` columns (f32, or bf16 bits).
    pub fn gather_rows<T: Gatherable>(
        &self,
        x: &CudaSlice<T>,
        rows: &CudaSlice<u32>,
        out: &mut CudaSlice<T>,
        cols: usize,
    ) -> Result<(), KernelError> {
        if out.len() < rows.len() * cols {
            return Err(launch_err("gather_rows: output too small".into()));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let c = cols as i32;
        let mut b = self.stream.launch_builder(self.f(T::GATHER_KERNEL));
        b.arg(x).arg(rows).arg(out).arg(&c);
        // SAFETY: row indices were checked on the host.
        unsafe { b.launch(cfg((rows.len(), 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    fn scale_log2(&self) -> f32 {
        (1.0 / (self.spec.head_dim as f64).sqrt() * std::f64::consts::LOG2_E) as f32
    }

    /// Prefill attention over `tile_seq.len()` tiles; writes the rows it covers in `out`.
    pub fn attention_prefill(
        &self,
        a: &PrefillArgs<'_>,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), KernelError> {
        let tiles = a.tile_seq.len();
        if tiles == 0 {
            return Ok(());
        }
        if !a.heads.is_multiple_of(a.kv_heads) || a.heads / a.kv_heads != self.spec.group {
            return Err(launch_err(
                "attention_prefill: heads do not match the spec".into(),
            ));
        }
        let (h, kvh, bs, w, sc) = (
            a.heads as i32,
            a.kv_heads as i32,
            a.block_size as i32,
            a.window as i32,
            self.scale_log2(),
        );
        let mut b = self.stream.launch_builder(self.f("attention_prefill"));
        b.arg(a.q).arg(a.k_cache).arg(a.v_cache).arg(out);
        b.arg(&a.tile_seq)
            .arg(&a.tile_row)
            .arg(&a.seq_row)
            .arg(&a.seq_len);
        b.arg(&a.seq_pos).arg(&a.seq_table).arg(&a.tables);
        b.arg(&h).arg(&kvh).arg(&bs).arg(&w).arg(&sc);
        // SAFETY: the caller built the metadata from a validated batch (every visible key has a
        // cache block); PREFILL_ROWS matches BM in the kernel.
        unsafe { b.launch(cfg((tiles, a.heads, 1), (PREFILL_ROWS * 2) as u32)) }?;
        Ok(())
    }

    /// Decode attention for `a.seqs` single-row sequences: the split pass, then the merge.
    pub fn attention_decode(
        &self,
        a: &DecodeArgs<'_>,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), KernelError> {
        if a.seqs == 0 {
            return Ok(());
        }
        if a.heads / a.kv_heads != self.spec.group {
            return Err(launch_err(
                "attention_decode: heads do not match the spec".into(),
            ));
        }
        let parts = a.seqs * a.heads * a.splits;
        let mut part_m = self.scratch::<f32>(parts)?;
        let mut part_l = self.scratch::<f32>(parts)?;
        let mut part_acc = self.scratch::<f32>(parts * self.spec.head_dim)?;
        let (h, kvh, bs, w, sl, sc) = (
            a.heads as i32,
            a.kv_heads as i32,
            a.block_size as i32,
            a.window as i32,
            a.split_len as i32,
            self.scale_log2(),
        );
        let mut b = self.stream.launch_builder(self.f("attention_decode"));
        b.arg(a.q)
            .arg(a.k_cache)
            .arg(a.v_cache)
            .arg(&a.dec_row)
            .arg(&a.dec_pos);
        b.arg(&a.dec_table)
            .arg(&a.tables)
            .arg(&mut part_m)
            .arg(&mut part_l);
        b.arg(&mut part_acc)
            .arg(&h)
            .arg(&kvh)
            .arg(&bs)
            .arg(&w)
            .arg(&sl)
            .arg(&sc);
        // SAFETY: as for prefill; the partial buffers hold seqs × heads × splits states.
        unsafe { b.launch(cfg((a.seqs, a.kv_heads, a.splits), 128)) }?;
        let splits = a.splits as i32;
        let mut r = self
            .stream
            .launch_builder(self.f("attention_decode_reduce"));
        r.arg(&part_m)
            .arg(&part_l)
            .arg(&part_acc)
            .arg(&a.dec_row)
            .arg(out);
        r.arg(&h).arg(&splits);
        // SAFETY: reads the states written above.
        unsafe {
            r.launch(cfg(
                (a.seqs, a.heads, 1),
                self.spec.head_dim.min(128) as u32,
            ))
        }?;
        Ok(())
    }

    /// The fused router: top-k experts and renormalised weights per token.
    pub fn moe_router(
        &self,
        x: &CudaSlice<u16>,
        gate: &CudaSlice<u16>,
        (tokens, hidden, experts): (usize, usize, usize),
        top_k: usize,
    ) -> Result<(CudaSlice<u32>, CudaSlice<f32>), KernelError> {
        if !hidden.is_multiple_of(8) || experts > 256 || top_k == 0 || top_k > 8.min(experts) {
            return Err(launch_err(format!(
                "moe_router: hidden {hidden} (multiple of 8), {experts} experts (at most 256), \
                 top-{top_k} (1 to 8) are outside what the kernel handles"
            )));
        }
        let mut ids = self.scratch::<u32>(tokens * top_k)?;
        let mut weights = self.scratch::<f32>(tokens * top_k)?;
        if tokens == 0 {
            return Ok((ids, weights));
        }
        let (h, e, k) = (hidden as i32, experts as i32, top_k as i32);
        let mut b = self.stream.launch_builder(self.f("moe_router"));
        b.arg(x)
            .arg(gate)
            .arg(&mut ids)
            .arg(&mut weights)
            .arg(&h)
            .arg(&e)
            .arg(&k);
        // SAFETY: x holds tokens × hidden, gate experts × hidden (checked by the caller's types).
        unsafe { b.launch(cfg((tokens, 1, 1), 128)) }?;
        Ok((ids, weights))
    }

    /// Sorts the assignments by local expert on the GPU.
    pub fn moe_sort(
        &self,
        experts: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        local_of: &CudaSlice<i32>,
        top_k: usize,
        n_local: usize,
    ) -> Result<Sorted, KernelError> {
        let n = experts.len();
        if n_local > 256 || local_of.len() > 256 {
            return Err(launch_err("moe_sort: at most 256 experts".into()));
        }
        let mut s = Sorted {
            offsets: self.scratch::<u32>(n_local + 1)?,
            tiles: self.scratch::<u32>(n_local + 1)?,
            sorted_token: self.scratch::<u32>(n)?,
            sorted_weight: self.scratch::<f32>(n)?,
            pos_of: self.scratch::<i32>(n)?,
        };
        let (na, k, nl, tr) = (
            n as i32,
            top_k as i32,
            n_local as i32,
            crate::geometry::MOE_TILE_ROWS as i32,
        );
        let mut b = self.stream.launch_builder(self.f("moe_sort"));
        b.arg(experts)
            .arg(weights)
            .arg(local_of)
            .arg(&na)
            .arg(&k)
            .arg(&nl)
            .arg(&tr);
        b.arg(&mut s.offsets)
            .arg(&mut s.tiles)
            .arg(&mut s.sorted_token);
        b.arg(&mut s.sorted_weight).arg(&mut s.pos_of);
        // SAFETY: every expert id indexes local_of (router output < number of experts).
        unsafe { b.launch(cfg((1, 1, 1), 1024)) }?;
        Ok(s)
    }

    /// The experts' SwiGLU over the sorted rows: returns `y [rows, hidden]` (f32, routing
    /// weight applied). `max_rows` (the most rows any expert got, known on the host from the
    /// routes) picks the path.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_experts(
        &self,
        x: &CudaSlice<u16>,
        sorted: &Sorted,
        tables: &ExpertTables,
        (rows, hidden, inter): (usize, usize, usize),
        max_rows: usize,
    ) -> Result<CudaSlice<f32>, KernelError> {
        if !hidden.is_multiple_of(8) || !inter.is_multiple_of(8) {
            return Err(launch_err(format!(
                "moe experts: hidden {hidden} and intermediate {inter} must be multiples of 8"
            )));
        }
        let mut act = self.scratch::<u16>(rows * inter)?;
        let mut y = self.scratch::<f32>(rows * hidden)?;
        if rows == 0 || tables.count == 0 {
            return Ok(y);
        }
        let (h, i, nl) = (hidden as i32, inter as i32, tables.count as i32);
        match MoePath::for_rows(max_rows) {
            MoePath::Gemv => {
                let mut b = self.stream.launch_builder(self.f("moe_gate_up_gemv"));
                b.arg(x)
                    .arg(&tables.gate)
                    .arg(&tables.up)
                    .arg(&sorted.offsets);
                b.arg(&sorted.sorted_token).arg(&mut act).arg(&h).arg(&i);
                let grid = (inter.div_ceil(MOE_GEMV_BLOCK_OUT), tables.count, 1);
                // SAFETY: the sort's offsets bound every row; weights are inter × hidden.
                unsafe { b.launch(cfg(grid, 128)) }?;
                let mut b = self.stream.launch_builder(self.f("moe_down_gemv"));
                b.arg(&act).arg(&tables.down).arg(&sorted.offsets);
                b.arg(&sorted.sorted_weight).arg(&mut y).arg(&i).arg(&h);
                let grid = (hidden.div_ceil(MOE_GEMV_BLOCK_OUT), tables.count, 1);
                // SAFETY: as above; down is hidden × inter.
                unsafe { b.launch(cfg(grid, 128)) }?;
            }
            MoePath::Mma => {
                let tiles = moe_row_tiles_bound(rows, tables.count);
                let mut b = self.stream.launch_builder(self.f("moe_gate_up_mma"));
                b.arg(x)
                    .arg(&tables.gate)
                    .arg(&tables.up)
                    .arg(&sorted.offsets);
                b.arg(&sorted.tiles).arg(&sorted.sorted_token).arg(&mut act);
                b.arg(&h).arg(&i).arg(&nl);
                // SAFETY: blocks past the sort's tile prefix exit; rows are bounded by offsets.
                unsafe { b.launch(cfg((inter.div_ceil(MOE_TILE_COLS), tiles, 1), 128)) }?;
                let mut b = self.stream.launch_builder(self.f("moe_down_mma"));
                b.arg(&act)
                    .arg(&tables.down)
                    .arg(&sorted.offsets)
                    .arg(&sorted.tiles);
                b.arg(&sorted.sorted_weight)
                    .arg(&mut y)
                    .arg(&i)
                    .arg(&h)
                    .arg(&nl);
                // SAFETY: as above.
                unsafe { b.launch(cfg((hidden.div_ceil(MOE_TILE_COLS), tiles, 1), 128)) }?;
            }
        }
        Ok(y)
    }

    /// `residual[t] += Σ_j y[pos_of[t·top_k + j]]`.
    pub fn moe_combine(
        &self,
        y: &CudaSlice<f32>,
        pos_of: &CudaSlice<i32>,
        residual: &mut CudaSlice<f32>,
        (tokens, hidden): (usize, usize),
        top_k: usize,
    ) -> Result<(), KernelError> {
        if residual.len() < tokens * hidden || pos_of.len() < tokens * top_k {
            return Err(launch_err(
                "moe_combine: buffers do not match the shape".into(),
            ));
        }
        if tokens == 0 {
            return Ok(());
        }
        let (h, k) = (hidden as i32, top_k as i32);
        let mut b = self.stream.launch_builder(self.f("moe_combine"));
        b.arg(y).arg(pos_of).arg(residual).arg(&h).arg(&k);
        // SAFETY: pos_of indexes rows of y (the sort wrote both).
        unsafe { b.launch(cfg((tokens, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }
}
