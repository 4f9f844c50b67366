//! Switchyard's CUDA kernels: the CUDA C++ sources (`cuda/*.cu`), their compilation at run time
//! by NVRTC for the GPU at hand (cached on disk), typed Rust launch wrappers over cudarc, and
//! the cuBLASLt plans of the dense projections.
//!
//! Owns: what runs on the GPU and how it is launched. Must not: know about models, batches of
//! requests or the `Backend` trait (that is `switchyard-worker`'s CUDA backend, built on this).
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): this crate builds and its host-side
//! logic is tested on machines with no CUDA at all, and a missing driver or NVRTC is a
//! [`KernelError`], never a panic.

pub mod blas;
pub mod cache;
pub mod compile;
pub mod geometry;
pub mod gpu;
pub mod routing;
pub mod source;

/// The CUDA bindings the wrappers take and return (device buffers, streams).
pub use cudarc;

pub use cache::DiskCache;
pub use compile::{Nvrtc, Target};
pub use gpu::{Gpu, GpuContext};
pub use source::{Module, Spec, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A CUDA library (driver, NVRTC, cuBLASLt) is not installed where the loader looks.
    #[error("{0}")]
    Missing(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("compiling {module} failed ({options}):\n{log}")]
    Compile {
        module: String,
        options: String,
        log: String,
    },
    /// A driver call failed (allocation, copy, launch, module load); the driver's error is
    /// the source.
    #[error("CUDA: {0}")]
    Cuda(#[from] cudarc::driver::DriverError),
    /// A CUDA library call that is not the driver's failed (cuBLASLt).
    #[error("CUDA: {0}")]
    Driver(String),
    /// Arguments a kernel cannot run with (checked before launching).
    #[error("{0}")]
    Launch(String),
    #[error("kernel cache: {0}")]
    Cache(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
}
