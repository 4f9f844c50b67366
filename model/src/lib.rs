//! What a model is: its `config.json`, the tensors a checkpoint must hold (names, dtypes,
//! shapes), memory-mapped safetensors loading (whole or a subset of layers and experts), the
//! tokenizer and chat template, and the sizes the planner needs.
//!
//! This crate knows nothing about compute or networking: it hands out validated tensor bytes
//! and token ids. Every malformed input is an error that names what was wrong.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_vocab;
pub mod init;
pub mod quant;
pub mod quantize;
pub mod rng;
pub mod safetensors;
pub mod sizes;
pub mod tokenizer;
pub mod upcycle;
pub mod weights;

pub use chat::ChatMessage;
pub use checkpoint::{Checkpoint, CheckpointError, TensorOnDisk};
pub use config::{Arch, ConfigError, ModelConfig, MoeConfig};
pub use gguf_vocab::GgufVocab;
pub use quant::{HostWeight, WeightBytes, WeightError, WeightType};
pub use tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
pub use weights::{Subset, TensorSpec};
