//! The `Backend` trait: the fused operations one transformer layer is made of. The model is
//! written once over it ([`crate::model`]); the CPU backend is the reference, the CUDA backend
//! must match it op by op.

use switchyard_model::{HostWeight, ModelConfig, WeightType};

use crate::batch::AttentionBatch;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Shape(String),
    /// The GPU (driver, kernels, cuBLASLt) failed; the kernels' error is the source.
    #[error("device error: {0}")]
    Device(#[from] switchyard_kernels::KernelError),
}

/// Token routes of one MoE layer: for token `t`, slot `j < top_k`, expert `experts[t*top_k+j]`
/// with weight `weights[t*top_k+j]` (softmax over all experts in f32, top-k, renormalised).
/// Kept on the host: the exchange between expert shards is planned from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One expert's SwiGLU weights: `down(silu(gate(x)) * up(x))`, Mixtral's `w1`, `w3`, `w2`.
pub struct FfnWeights<W> {
    pub gate: W,
    pub up: W,
    pub down: W,
}

/// Queries, keys and values of one step's tokens, RoPE applied to `q` and `k`.
pub struct Qkv<T> {
    pub q: T,
    pub k: T,
    pub v: T,
}

/// What a worker runs on: the memory it reports to the planner, and a backend for the model it
/// is assigned (a GPU's kernels are compiled for the model's attention shapes, so the backend
/// is made once the model is known).
pub trait Hardware: Send + Sync + 'static {
    type Backend: Backend + 'static;

    /// "cpu (16 threads)", "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)".
    fn describe(&self) -> String;
    /// Total and available bytes for weights and KV cache (0 where unknown).
    fn memory(&self) -> (u64, u64);
    /// The type a weight stored as `stored` is kept in on this hardware (what it costs in
    /// memory).
    fn weight_type(&self, stored: WeightType) -> WeightType;
    fn backend(&self, model: &ModelConfig) -> Result<Self::Backend, BackendError>;
}

pub trait Backend: Send + Sync {
    /// Activations: a row-major `[rows, cols]` matrix on the device.
    type Tensor: Send + Sync;
    /// A weight matrix `[out, in]` resident on the device.
    type Weight: Send + Sync;
    /// The paged K/V memory of the layers one worker holds.
    type KvCache: Send;

    /// Bytes one stored weight or KV cache value takes (f32 on the CPU, bf16 on a GPU).
    const VALUE_BYTES: u64;

    /// Moves a weight onto the device. A backend keeps it in the type it was stored in where
    /// it has kernels for that type, and converts it otherwise.
    fn weight(&self, w: HostWeight) -> Result<Self::Weight, BackendError>;

    /// The type a matrix stored as `stored` is kept in by [`Backend::weight`] (what it costs
    /// in memory; the expert cache budgets with it).
    fn kept_type(&self, stored: WeightType) -> WeightType;

    /// [`Backend::weight`] of an f32 matrix `[rows, cols]`.
    fn weight_f32(
        &self,
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Weight, BackendError> {
        let w = HostWeight::from_f32(&data, rows, cols)
            .map_err(|e| BackendError::Shape(e.to_string()))?;
        self.weight(w)
    }

    fn tensor(
        &self,
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Tensor, BackendError>;
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    fn rows(&self, t: &Self::Tensor) -> usize;
    fn cols(&self, t: &Self::Tensor) -> usize;

    /// `residual += x`, element by element, both `[rows, cols]` f32 (the remote experts'
    /// outputs of an exchange into the residual stream), on the backend's device.
    fn add(&self, x: &Self::Tensor, residual: &mut Self::Tensor) -> Result<(), BackendError>;

    /// `layers` layers of `num_blocks` blocks, each holding `block_size` tokens of K and V.
    fn kv_cache(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self::KvCache, BackendError>;

    /// Rows of the embedding table for `ids`.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor, BackendError>;

    /// RMSNorm of each row, scaled by `weight`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor, BackendError>;

    /// `x · wᵀ`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor, BackendError>;

    /// `residual += x · wᵀ` (the attention output projection).
    fn linear_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        residual: &mut Self::Tensor,
    ) -> Result<(), BackendError>;

    /// Projects `x` to Q, K and V and applies RoPE at `positions` to Q and K.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope(
        &self,
        x: &Self::Tensor,
        wq: &Self::Weight,
        wk: &Self::Weight,
        wv: &Self::Weight,
        positions: &[u32],
        head_dim: usize,
        rope_theta: f64,
    ) -> Result<Qkv<Self::Tensor>, BackendError>;

    /// Appends K and V of this step to `layer`'s paged cache, then attends: each query sees the
    /// keys of its own sequence at positions `max(0, p - window + 1) ..= p`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        batch: &AttentionBatch,
    ) -> Result<Self::Tensor, BackendError>;

    /// Router logits, softmax in f32, top-k, renormalised. The k experts are chosen by logit,
    /// highest first, ties to the lower expert id (not by probability: probabilities tie where
    /// logits do not once they underflow), so every backend plans the same exchange.
    fn router_topk(
        &self,
        x: &Self::Tensor,
        gate: &Self::Weight,
        top_k: usize,
    ) -> Result<Routes, BackendError>;

    /// `residual += Σ_j weight_j · expert_j(x)` over each token's routed experts that are in
    /// `experts` (expert id, weights); tokens are grouped by expert so each expert runs once.
    fn experts_ffn_add(
        &self,
        x: &Self::Tensor,
        routes: &Routes,
        experts: &[(u32, &FfnWeights<Self::Weight>)],
        residual: &mut Self::Tensor,
    ) -> Result<(), BackendError>;

    /// `residual += down(silu(gate(x)) * up(x))`: the dense MLP.
    fn mlp_add(
        &self,
        x: &Self::Tensor,
        w: &FfnWeights<Self::Weight>,
        residual: &mut Self::Tensor,
    ) -> Result<(), BackendError>;

    /// The rows `rows` of `x` (e.g. the last token of each sequence before `lm_head`).
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor, BackendError>;
}
