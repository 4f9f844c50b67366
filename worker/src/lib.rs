//! The worker: backends (CPU, CUDA), model execution, the paged KV cache and sampling.
//!
//! It owns KV memory and runs steps it is handed; it does not decide what runs when (that is
//! the coordinator's scheduler, or [`engine::Engine`] for one-process generation) and it never
//! talks to clients. With etcd it registers itself under a lease ([`registration`]).

pub mod backend;
pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod etcd;
pub mod exchange;
pub mod kv_cache;
pub mod metrics;
pub mod model;
pub mod registration;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod stats;
pub mod trace_context;
pub mod wire;

pub use backend::{Backend, BackendError, Hardware};
pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, CudaDevice, Device};
pub use engine::{Completion, Engine, EngineConfig, EngineError};
pub use model::{Model, ModelError};
pub use sampling::SamplingParams;
pub use scheduler::{Detached, FinishReason, Request, Scheduler, SchedulerConfig, Update, Usage};
