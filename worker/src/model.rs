//! Mixtral, Mistral and Llama, written once over [`Backend`]: embedding → layers of
//! (RMSNorm → QKV + RoPE → paged attention → output projection, RMSNorm → MoE or dense MLP) →
//! final norm → `lm_head`. A [`Model`] may hold only a part of a checkpoint (a range of layers,
//! some experts, with or without the embedding and the head), which is what a worker of the grid
//! loads.

use switchyard_model::weights::{LayerNames, EMBEDDING, FINAL_NORM};
use switchyard_model::{Checkpoint, CheckpointError, ModelConfig, Subset};

use crate::backend::{Backend, BackendError, FfnWeights, Qkv, Routes};
use crate::batch::AttentionBatch;
use crate::offload::{
    most_routed, ExpertCacheMetrics, ExpertOnDisk, ExpertStore, Offload, OffloadError,
};
use switchyard_scheduler::step::{LogitsWanted, SeqInput};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("this model part {0}")]
    MissingPart(&'static str),
    #[error("layer {layer}: tokens are routed to expert {expert}, which this worker does not hold and no exchange reaches")]
    ExpertNotHere { layer: usize, expert: u32 },
    #[error(transparent)]
    Offload(#[from] OffloadError),
    /// The exchange failed; its own error (e.g. a peer's gRPC status) is the source.
    #[error("expert exchange: {0}")]
    Exchange(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The tokens of a MoE layer routed to experts held by other workers of the stage: sent to
/// them, run there, and their weighted outputs brought back (DESIGN.md's exchange). Over gRPC
/// between processes ([`crate::exchange::GrpcExchange`]); NCCL later. It takes and gives
/// backend tensors, so an exchange between GPUs can keep its activations on the devices; one
/// that goes through the host copies them there itself.
pub trait ExpertExchange<B: Backend>: Send + Sync {
    /// Starts the remote part of layer `layer` (a global layer index) for the activations `x`
    /// (`[rows, hidden]`, normed, on `backend`); local experts run while it is under way.
    fn dispatch(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
    ) -> Result<PendingExperts<B>, ModelError>;
}

/// What [`PendingExperts::wait`] runs: given the backend, the remote outputs as its tensor.
type Wait<B> = Box<dyn FnOnce(&B) -> Result<<B as Backend>::Tensor, ModelError> + Send>;

/// Remote expert outputs on their way: `[rows, cols]`, summed over experts with router
/// weights, delivered as a tensor of the backend the exchange was dispatched from.
pub struct PendingExperts<B: Backend>(Wait<B>);

impl<B: Backend> PendingExperts<B> {
    pub fn new(wait: impl FnOnce(&B) -> Result<B::Tensor, ModelError> + Send + 'static) -> Self {
        PendingExperts(Box::new(wait))
    }

    pub fn wait(self, backend: &B) -> Result<B::Tensor, ModelError> {
        (self.0)(backend)
    }
}

enum Ffn<W> {
    Dense(FfnWeights<W>),
    Moe {
        router: W,
        /// The experts this part holds, by expert id; empty when they are in the
        /// [`Model`]'s expert store.
        experts: Vec<(u32, FfnWeights<W>)>,
    },
}

struct Layer<W> {
    input_norm: W,
    q: W,
    k: W,
    v: W,
    o: W,
    post_norm: W,
    ffn: Ffn<W>,
}

enum LmHead<W> {
    Own(W),
    /// `tie_word_embeddings`: the embedding matrix doubles as `lm_head`.
    Tied,
}

/// A loaded model part on one backend.
pub struct Model<B: Backend> {
    config: ModelConfig,
    subset: Subset,
    embedding: Option<B::Weight>,
    layers: Vec<Layer<B::Weight>>,
    head: Option<(B::Weight, LmHead<B::Weight>)>,
    route_observer: Option<RouteObserver>,
    /// With expert offload: every expert of the part, some resident, the others read on
    /// demand.
    store: Option<ExpertStore<B::Weight>>,
}

/// Told, at every MoE layer of a step, the global layer index and the top-k expert ids of
/// each token (the worker counts them for its metrics and the dashboard's heat map).
pub type RouteObserver = std::sync::Arc<dyn Fn(usize, &[u32]) + Send + Sync>;

impl<B: Backend> Model<B> {
    /// Validates every tensor `subset` needs, then loads them (only their bytes are read).
    pub fn load(backend: &B, checkpoint: &Checkpoint, subset: &Subset) -> Result<Self, ModelError> {
        Self::load_with(backend, checkpoint, subset, None)
    }

    /// [`Model::load`] with `offload`'s budget for experts: every weight is read into owned
    /// memory (none stays in the file's map), the experts that fit the budget are kept and
    /// the others are read again when tokens are routed to them. A dense model has no experts
    /// to offload and loads as [`Model::load`] does, into owned memory.
    pub fn load_offloaded(
        backend: &B,
        checkpoint: &Checkpoint,
        subset: &Subset,
        offload: &Offload,
        metrics: ExpertCacheMetrics,
    ) -> Result<Self, ModelError> {
        Self::load_with(backend, checkpoint, subset, Some((offload, metrics)))
    }

    fn load_with(
        backend: &B,
        checkpoint: &Checkpoint,
        subset: &Subset,
        offload: Option<(&Offload, ExpertCacheMetrics)>,
    ) -> Result<Self, ModelError> {
        checkpoint.validate(subset)?;
        let c = checkpoint.config().clone();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let owned = offload.is_some();
        let shape = |rows: usize, cols: usize| -> Vec<usize> {
            if rows == 1 {
                vec![cols]
            } else {
                vec![rows, cols]
            }
        };
        let load = |name: &str, rows: usize, cols: usize| -> Result<B::Weight, ModelError> {
            let shape = shape(rows, cols);
            let w = match owned {
                true => checkpoint.read_owned(name, &shape)?,
                false => checkpoint.read(name, &shape)?,
            };
            Ok(backend.weight(w)?)
        };
        // The expert store first: a budget under one expert is refused before anything loads.
        let store = match (offload, c.moe) {
            (Some((o, metrics)), Some(moe)) => {
                let mut on_disk: Vec<Vec<Option<ExpertOnDisk>>> = Vec::new();
                for l in subset.layers.clone() {
                    let n = LayerNames::new(l);
                    on_disk.push(
                        (0..moe.num_experts)
                            .map(|e| {
                                if !subset.has_expert(e) {
                                    return Ok(None);
                                }
                                Ok(Some(ExpertOnDisk {
                                    gate: checkpoint.on_disk(&n.expert(e, "w1"), &[i, h])?,
                                    up: checkpoint.on_disk(&n.expert(e, "w3"), &[i, h])?,
                                    down: checkpoint.on_disk(&n.expert(e, "w2"), &[h, i])?,
                                }))
                            })
                            .collect::<Result<_, ModelError>>()?,
                    );
                }
                let first = subset.layers.start;
                Some(ExpertStore::new(backend, first, on_disk, o, metrics)?)
            }
            _ => None,
        };
        let ffn =
            |gate: String, up: String, down: String| -> Result<FfnWeights<B::Weight>, ModelError> {
                Ok(FfnWeights {
                    gate: load(&gate, i, h)?,
                    up: load(&up, i, h)?,
                    down: load(&down, h, i)?,
                })
            };

        let embedding = match subset.embedding {
            true => Some(load(EMBEDDING, c.vocab_size, h)?),
            false => None,
        };
        let mut layers = Vec::with_capacity(subset.layers.len());
        for l in subset.layers.clone() {
            let n = LayerNames::new(l);
            let ffn = match c.moe {
                Some(moe) if store.is_some() => Ffn::Moe {
                    router: load(&n.router(), moe.num_experts, h)?,
                    experts: Vec::new(),
                },
                Some(moe) => Ffn::Moe {
                    router: load(&n.router(), moe.num_experts, h)?,
                    experts: (0..moe.num_experts)
                        .filter(|e| subset.has_expert(*e))
                        .map(|e| {
                            Ok((
                                e as u32,
                                ffn(n.expert(e, "w1"), n.expert(e, "w3"), n.expert(e, "w2"))?,
                            ))
                        })
                        .collect::<Result<_, ModelError>>()?,
                },
                None => Ffn::Dense(ffn(
                    n.mlp("gate_proj"),
                    n.mlp("up_proj"),
                    n.mlp("down_proj"),
                )?),
            };
            layers.push(Layer {
                input_norm: load(&n.input_norm(), 1, h)?,
                q: load(&n.attn("q_proj"), c.q_dim(), h)?,
                k: load(&n.attn("k_proj"), c.kv_dim(), h)?,
                v: load(&n.attn("v_proj"), c.kv_dim(), h)?,
                o: load(&n.attn("o_proj"), h, c.q_dim())?,
                post_norm: load(&n.post_attention_norm(), 1, h)?,
                ffn,
            });
        }
        let head = match subset.head {
            false => None,
            true => {
                let lm_head = if c.tie_word_embeddings && embedding.is_some() {
                    LmHead::Tied
                } else {
                    LmHead::Own(load(c.lm_head_name(), c.vocab_size, h)?)
                };
                Some((load(FINAL_NORM, 1, h)?, lm_head))
            }
        };
        Ok(Model {
            config: c,
            subset: subset.clone(),
            embedding,
            layers,
            head,
            route_observer: None,
            store,
        })
    }

    /// The expert store, when experts are offloaded.
    pub fn expert_store(&self) -> Option<&ExpertStore<B::Weight>> {
        self.store.as_ref()
    }

    /// `residual += Σ weight · expert(x)` over the experts of local layer `local` this part
    /// holds that `routes` names, in ascending expert id (resident or read from the store);
    /// `next` is the next layer's likely experts, for the store to prefetch.
    fn run_held_experts(
        &self,
        backend: &B,
        local: usize,
        x: &B::Tensor,
        routes: &Routes,
        residual: &mut B::Tensor,
        next: Option<(usize, &[u32])>,
    ) -> Result<(), ModelError> {
        let Ffn::Moe { experts, .. } = &self.layers[local].ffn else {
            return Err(ModelError::MissingPart("has no experts in that layer"));
        };
        match &self.store {
            None => {
                let held: Vec<(u32, &FfnWeights<B::Weight>)> =
                    experts.iter().map(|(e, w)| (*e, w)).collect();
                Ok(backend.experts_ffn_add(x, routes, &held, residual)?)
            }
            // One expert at a time in ascending id: the order the resident path adds them in.
            Some(store) => store.run_layer(backend, local, &routes.experts, next, |e, w| {
                Ok(backend.experts_ffn_add(x, routes, &[(e, w)], residual)?)
            }),
        }
    }

    pub fn observe_routes(&mut self, observer: RouteObserver) {
        self.route_observer = Some(observer);
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn subset(&self) -> &Subset {
        &self.subset
    }

    /// Bytes of one KV block of `block_size` tokens over the layers this part holds.
    pub fn kv_block_bytes(&self, block_size: usize) -> usize {
        2 * self.num_layers() * self.config.kv_dim() * block_size * B::VALUE_BYTES as usize
    }

    /// Layers held (the KV cache of this part has this many layers).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `residual += Σ weight · expert(x)` over the experts of global layer `layer` this part
    /// holds: the work a worker does for a peer's tokens in an exchange.
    pub fn run_experts(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Tensor,
        routes: &Routes,
        residual: &mut B::Tensor,
    ) -> Result<(), ModelError> {
        let local = layer
            .checked_sub(self.subset.layers.start)
            .filter(|l| *l < self.layers.len())
            .ok_or(ModelError::MissingPart("does not hold that layer"))?;
        self.run_held_experts(backend, local, x, routes, residual, None)
    }

    /// Runs one step of a whole model: token ids in, the logits each sequence asked for out
    /// (`[rows, vocab]` flattened; empty for [`LogitsWanted::None`]).
    pub fn forward(
        &self,
        backend: &B,
        cache: &mut B::KvCache,
        inputs: &[SeqInput],
        block_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let ids: Vec<u32> = inputs
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let batch = AttentionBatch::new(inputs, block_size, self.config.sliding_window);
        let mut hidden = self.embed(backend, &ids)?;
        self.forward_layers(backend, cache, &mut hidden, &batch, None)?;
        self.logits(backend, &hidden, inputs)
    }

    pub fn embed(&self, backend: &B, ids: &[u32]) -> Result<B::Tensor, ModelError> {
        let table = self
            .embedding
            .as_ref()
            .ok_or(ModelError::MissingPart("holds no embedding"))?;
        Ok(backend.embed(table, ids)?)
    }

    /// Runs this part's layers over the residual stream `hidden` in place. Tokens routed to
    /// experts this part does not hold go through `exchange`.
    pub fn forward_layers(
        &self,
        backend: &B,
        cache: &mut B::KvCache,
        hidden: &mut B::Tensor,
        batch: &AttentionBatch,
        exchange: Option<&dyn ExpertExchange<B>>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let positions = batch.positions();
        for (local, layer) in self.layers.iter().enumerate() {
            let x = backend.rms_norm(hidden, &layer.input_norm, eps)?;
            let Qkv { q, k, v } = backend.qkv_rope(
                &x,
                &layer.q,
                &layer.k,
                &layer.v,
                &positions,
                c.head_dim,
                c.rope_theta,
            )?;
            let attn = backend.attention(&q, &k, &v, cache, local, batch)?;
            backend.linear_add(&attn, &layer.o, hidden)?;
            let x = backend.rms_norm(hidden, &layer.post_norm, eps)?;
            match &layer.ffn {
                Ffn::Dense(w) => backend.mlp_add(&x, w, hidden)?,
                Ffn::Moe { router, .. } => {
                    let top_k = c.moe.expect("MoE layer of a MoE config").top_k;
                    let routes = backend.router_topk(&x, router, top_k)?;
                    let global = self.subset.layers.start + local;
                    if let Some(observe) = &self.route_observer {
                        observe(global, &routes.experts);
                    }
                    let remote = routes
                        .experts
                        .iter()
                        .find(|e| !self.subset.has_expert(**e as usize));
                    let pending = match (remote, exchange) {
                        (None, _) => None,
                        (Some(&expert), None) => {
                            return Err(ModelError::ExpertNotHere {
                                layer: global,
                                expert,
                            })
                        }
                        (Some(_), Some(ex)) => Some(ex.dispatch(backend, global, &x, &routes)?),
                    };
                    // The next layer's router on this hidden state: its likely experts, read
                    // while this layer's experts compute.
                    let guess = match (&self.store, self.layers.get(local + 1)) {
                        (Some(store), Some(next)) if store.prefetches() => match &next.ffn {
                            Ffn::Moe { router, .. } => {
                                let guess = backend.router_topk(&x, router, top_k)?;
                                Some(most_routed(&guess.experts, top_k))
                            }
                            Ffn::Dense(_) => None,
                        },
                        _ => None,
                    };
                    let next = guess.as_deref().map(|g| (local + 1, g));
                    self.run_held_experts(backend, local, &x, &routes, hidden, next)?;
                    if let Some(p) = pending {
                        backend.add(&p.wait(backend)?, hidden)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Final norm and `lm_head` over the rows each sequence asked for.
    pub fn logits(
        &self,
        backend: &B,
        hidden: &B::Tensor,
        inputs: &[SeqInput],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let (norm, lm_head) = self
            .head
            .as_ref()
            .ok_or(ModelError::MissingPart("holds no lm_head"))?;
        let lm_head = match lm_head {
            LmHead::Own(w) => w,
            LmHead::Tied => self
                .embedding
                .as_ref()
                .expect("tied head implies the embedding"),
        };
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(inputs.len());
        let mut start = 0;
        for s in inputs {
            let end = start + s.tokens.len();
            let wanted = match s.logits {
                LogitsWanted::None => start..start,
                LogitsWanted::Last => end - 1..end,
                LogitsWanted::All => start..end,
            };
            counts.push(wanted.len());
            rows.extend(wanted);
            start = end;
        }
        if rows.is_empty() {
            return Ok(vec![Vec::new(); inputs.len()]);
        }
        let selected = backend.select_rows(hidden, &rows)?;
        let normed = backend.rms_norm(&selected, norm, self.config.rms_norm_eps as f32)?;
        let logits = backend.to_host(&backend.linear(&normed, lm_head)?)?;
        let vocab = self.config.vocab_size;
        let mut out = Vec::with_capacity(inputs.len());
        let mut at = 0;
        for n in counts {
            out.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(out)
    }
}
