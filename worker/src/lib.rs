//! The worker: backends (CPU, CUDA), model execution, KV memory, the expert exchange and the
//! `Worker` gRPC service that runs the steps a coordinator sends.
//!
//! It owns weights and KV memory and runs steps it is handed; it does not decide what runs when
//! (that is `switchyard-scheduler`'s, driven by the coordinator's lanes or by [`engine::Engine`]
//! for one-process generation) and it never talks to clients. With etcd it registers itself
//! under a lease and watches the published placement ([`registration`]).

pub mod backend;
pub mod batch;
pub mod checks;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod exchange;
pub mod matmul;
mod message_limit;
pub mod metrics;
pub mod model;
pub mod offload;
pub mod registration;
pub mod run;
pub mod service;

pub use backend::{Backend, BackendError, Hardware};
pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, CudaHardware, Device};
pub use engine::{Engine, EngineConfig, EngineError};
pub use model::{Model, ModelError};
