//! Dense projections through cuBLASLt: `y = x · wᵀ` with x and w bf16, f32 accumulation, and y
//! in f32 or bf16; `y += x · wᵀ` (beta = 1) fuses the residual add into the product. The
//! descriptors and the algorithm are chosen once per shape and kept.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::KernelError;

/// Where a product's result goes.
pub enum Out<'a> {
    F32(&'a mut CudaSlice<f32>),
    Bf16(&'a mut CudaSlice<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    out_f32: bool,
    accumulate: bool,
}

/// Descriptors and the chosen algorithm of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects, used only under the plan cache's mutex.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `Blas::plan` and destroyed once, here. Failures are not actionable.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

struct Handle(sys::cublasLtHandle_t);
// SAFETY: a cuBLASLt handle may be used from any thread; we serialise use through the stream.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

pub struct Blas {
    handle: Handle,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

fn blas_err(what: &str) -> impl Fn(result::CublasError) -> KernelError + '_ {
    move |e| KernelError::Driver(format!("cuBLASLt {what}: {e:?}"))
}

/// cuBLASLt's recommendation: 32 MiB on Hopper, 4 MiB before.
fn workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>, cc_major: i32) -> Result<Blas, KernelError> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::Missing(
                "libcublasLt was not found on the library path (it ships with the CUDA toolkit \
                 and the nvidia-cublas wheel)"
                    .into(),
            ));
        }
        stream.context().bind_to_thread()?;
        let handle = Handle(result::create_handle().map_err(blas_err("create"))?);
        // SAFETY: cuBLASLt only writes scratch data into the workspace.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes(cc_major)) }?;
        Ok(Blas {
            handle,
            stream,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Row-major `y[m, n] (+)= x[m, k] · w[n, k]ᵀ`.
    ///
    /// cuBLASLt is column-major: row-major y is column-major yᵀ = w · xᵀ, so A = w (k × n,
    /// transposed), B = x (k × m), C = D = yᵀ (n × m).
    pub fn matmul(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: Out<'_>,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<(), KernelError> {
        let out_len = match &out {
            Out::F32(y) => y.len(),
            Out::Bf16(y) => y.len(),
        };
        if x.len() < m * k || w.len() < n * k || out_len < m * n {
            return Err(KernelError::Launch(format!(
                "matmul [{m}, {k}] · [{n}, {k}]ᵀ: buffers of {}, {} and {out_len} elements are too small",
                x.len(),
                w.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let key = PlanKey {
            m,
            n,
            k,
            out_f32: matches!(out, Out::F32(_)),
            accumulate,
        };
        self.stream.context().bind_to_thread()?;
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(p) => p.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(self.plan(key)?),
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let s = &self.stream;
        let (a, _ga) = w.device_ptr(s);
        let (b, _gb) = x.device_ptr(s);
        let (ws, _gw) = self.workspace.device_ptr(s);
        let (d, _gd) = match out {
            Out::F32(y) => y.device_ptr_mut(s),
            Out::Bf16(y) => y.device_ptr_mut(s),
        };
        // SAFETY: the buffers were checked to cover the shapes the plan's layouts describe;
        // C and D are the same matrix (in-place accumulate is allowed by cuBLASLt).
        unsafe {
            result::matmul(
                self.handle.0,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                d as *const c_void,
                plan.c,
                d as *mut c_void,
                plan.c,
                &plan.algo,
                ws as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("matmul"))
    }

    /// Descriptors for `key` and the heuristic's first algorithm.
    fn plan(&self, key: PlanKey) -> Result<Plan, KernelError> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let out_t = match key.out_f32 {
            true => sys::cudaDataType_t::CUDA_R_32F,
            false => bf16,
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_err("descriptor"))?;
        let plan_a = result::create_matrix_layout(bf16, k, n, k as i64);
        let plan_b = result::create_matrix_layout(bf16, k, m, k as i64);
        let plan_c = result::create_matrix_layout(out_t, n, m, n as i64);
        let mut plan = Plan {
            desc,
            a: plan_a.map_err(blas_err("layout"))?,
            b: plan_b.map_err(blas_err("layout"))?,
            c: plan_c.map_err(blas_err("layout"))?,
            // SAFETY: an all-zero algo is a valid placeholder, replaced below before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        let trans: i32 = 1; // CUBLAS_OP_T (cublasOperation_t is an int-sized enum)
                            // SAFETY: the attribute buffer is a live value of the type the attribute expects.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                Attr::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const c_void,
                std::mem::size_of_val(&trans),
            )
        }
        .map_err(blas_err("transpose"))?;
        let pref = result::create_matmul_pref().map_err(blas_err("preference"))?;
        let ws = self.workspace.len();
        // SAFETY: as above; `pref` is destroyed right after the query.
        let heuristic = unsafe {
            let set = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            );
            let h = set.and_then(|_| {
                result::get_matmul_algo_heuristic(
                    self.handle.0,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                )
            });
            let _ = result::destroy_matmul_pref(pref);
            h
        }
        .map_err(|e| {
            KernelError::Driver(format!(
                "cuBLASLt has no algorithm for [{m}, {k}] · [{n}, {k}]ᵀ: {e:?}"
            ))
        })?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}
