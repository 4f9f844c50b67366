//! Run-time compilation with NVRTC. `libnvrtc` is loaded on first use (cudarc's dynamic
//! loading), so a machine without CUDA builds and runs everything else; asking for a
//! compilation there is an error, not a panic.

use std::ffi::{c_char, c_int, CStr, CString};

use cudarc::nvrtc::{result, sys};

use crate::KernelError;

/// What NVRTC should produce for a GPU architecture `sm_XY` (given as `XY`, e.g. 80 or 90).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// PTX for `compute_XY` (what `ptxas` assembles in the CI check).
    Ptx(u32),
    /// A cubin for `sm_XY`: what a worker loads (no driver JIT on start-up).
    Cubin(u32),
}

impl Target {
    pub fn arch(self) -> u32 {
        match self {
            Target::Ptx(a) | Target::Cubin(a) => a,
        }
    }

    fn arch_option(self) -> String {
        match self {
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
        }
    }
}

/// Options every program is compiled with (besides the architecture and the module's `-D`s).
/// No fast-math: the kernels choose their fast intrinsics (`__expf`, `exp2f`) explicitly.
pub const BASE_OPTIONS: &[&str] = &["--std=c++17", "--device-as-default-execution-space"];

/// The loaded NVRTC library.
#[derive(Debug, Clone, Copy)]
pub struct Nvrtc {
    version: (i32, i32),
}

impl Nvrtc {
    /// Loads `libnvrtc` (found on the library path, `LD_LIBRARY_PATH` on Linux).
    pub fn load() -> Result<Nvrtc, KernelError> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(KernelError::Missing(
                "libnvrtc (NVRTC) was not found on the library path; install the CUDA toolkit or \
                 `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        // SAFETY: the library is present; both pointers are valid for writes.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| KernelError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
        Ok(Nvrtc {
            version: (major, minor),
        })
    }

    /// (major, minor) of the loaded NVRTC; part of the cache key.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Compiles `source` (named `name` in diagnostics) with `options` for `target`.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        options: &[String],
        target: Target,
    ) -> Result<Vec<u8>, KernelError> {
        let src = CString::new(source).expect("kernel sources hold no NUL byte");
        let cname = CString::new(name).expect("module names hold no NUL byte");
        let prog = result::create_program(&src, Some(&cname))
            .map_err(|e| KernelError::Nvrtc(format!("{name}: nvrtcCreateProgram: {e:?}")))?;
        let prog = Program(prog);
        let mut all: Vec<String> = BASE_OPTIONS.iter().map(|s| s.to_string()).collect();
        all.extend(options.iter().cloned());
        all.push(target.arch_option());
        // SAFETY: `prog` is a live program created above.
        let compiled = unsafe { result::compile_program(prog.0, &all) };
        if let Err(e) = compiled {
            // SAFETY: as above; the log is a NUL-terminated string NVRTC wrote.
            let log = unsafe { result::get_program_log(prog.0) }
                .map(|l| {
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            return Err(KernelError::Compile {
                module: name.to_string(),
                options: all.join(" "),
                log: format!("{e:?}\n{log}"),
            });
        }
        match target {
            Target::Ptx(_) => {
                // SAFETY: compiled successfully; the PTX is NUL-terminated text.
                let ptx = unsafe { result::get_ptx(prog.0) }
                    .map_err(|e| KernelError::Nvrtc(format!("{name}: nvrtcGetPTX: {e:?}")))?;
                let text = unsafe { CStr::from_ptr(ptx.as_ptr()) };
                Ok(text.to_bytes().to_vec())
            }
            Target::Cubin(_) => {
                let mut size = 0usize;
                // SAFETY: compiled successfully for an sm_ target; the buffer is sized from
                // nvrtcGetCUBINSize.
                unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                    .result()
                    .map_err(|e| KernelError::Nvrtc(format!("{name}: nvrtcGetCUBINSize: {e:?}")))?;
                let mut cubin = vec![0u8; size];
                unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) }
                    .result()
                    .map_err(|e| KernelError::Nvrtc(format!("{name}: nvrtcGetCUBIN: {e:?}")))?;
                Ok(cubin)
            }
        }
    }
}

/// Destroys the NVRTC program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here. A failure to free is
        // not actionable, so it is ignored.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}
