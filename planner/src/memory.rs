//! Memory per worker, by the coordinator's own placement ([`placement::plan`]): the planner
//! hands it the workers a deployment would have, as their inventories would describe them,
//! and reads back each worker's weights and KV cache. Nothing here counts a byte the placement
//! does not; the allowances for what it does not count (the runtime, a step's activations)
//! are added beside it and named as such.

use std::ops::Range;

use switchyard_coordinator::placement::{self, Grid, Inventory, Placement, PlanError};
use switchyard_coordinator::PlanOptions;
use switchyard_model::ModelConfig;

use crate::hardware::Kind;
use crate::models::Model;

/// Memory the placement may treat as unlimited (a quarter of `u64`, so sums do not overflow).
pub const UNLIMITED: u64 = u64::MAX / 4;

/// How a worker keeps what it holds: the two fields of its inventory the placement sizes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerMemory {
    /// Bytes of one KV value (and of a weight value when stored types are not kept).
    pub value_bytes: u64,
    pub keeps_stored_weights: bool,
}

impl WorkerMemory {
    /// What a worker on `kind` reports (`worker/src/service.rs`, `inventory`): the CPU backend
    /// keeps f32 KV and the weights' stored types; the CUDA backend keeps bf16 KV and widens
    /// or narrows every weight to bf16. The binary's tests check these against the worker's
    /// own constants.
    pub const fn of(kind: Kind) -> WorkerMemory {
        match kind {
            Kind::Cpu => WorkerMemory {
                value_bytes: 4,
                keeps_stored_weights: true,
            },
            Kind::Gpu => WorkerMemory {
                value_bytes: 2,
                keeps_stored_weights: false,
            },
        }
    }
}

/// The coordinator's placement of `model` on `grid`, every worker keeping memory as `worker`
/// says with `available` bytes for weights and KV.
pub fn place(
    model: &Model,
    grid: Grid,
    worker: WorkerMemory,
    available: u64,
    options: PlanOptions,
) -> Result<Placement, PlanError> {
    let workers: Vec<Inventory> = (0..grid.cells())
        .map(|i| Inventory {
            address: format!("{i} of {grid}"),
            device: String::new(),
            memory_bytes: available,
            available_bytes: available,
            value_bytes: worker.value_bytes,
            keeps_stored_weights: worker.keeps_stored_weights,
            expert_memory: None,
        })
        .collect();
    placement::plan(
        &model.config,
        &|s| model.stored_bytes(s),
        grid,
        &workers,
        options,
        1,
    )
}

/// The serving load memory is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Tokens of KV each sequence may hold (prompt and output).
    pub context: usize,
    /// Sequences running at once in each lane (one lane per grid column).
    pub streams_per_lane: usize,
    pub block_size: usize,
}

/// KV bytes per worker that give every lane `load`'s blocks on the stage holding the most
/// layers: the `kv_bytes_per_worker` to hand the placement (`--kv-cache-mb` when serving).
pub fn kv_bytes_per_worker(
    config: &ModelConfig,
    stages: &[Range<usize>],
    load: Load,
    value_bytes: u64,
) -> u64 {
    let blocks = (load.streams_per_lane * load.context.div_ceil(load.block_size)) as u64;
    let layers = stages.iter().map(|s| s.len()).max().unwrap_or(0);
    blocks * placement::kv_block_bytes(config, layers, load.block_size, value_bytes)
}

/// What the placement does not count: the runtime (a CUDA context with its kernels and
/// cuBLASLt workspace; a process with its tokenizer) and one step's activations and exchange
/// buffers. The runtime allowances are stated, not measured: 1 GiB on a GPU, 512 MiB on a CPU
/// host.
pub fn overhead_bytes(config: &ModelConfig, kind: Kind, step_tokens: usize) -> u64 {
    let runtime: u64 = match kind {
        Kind::Gpu => 1 << 30,
        Kind::Cpu => 512 << 20,
    };
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let k = config.moe.map_or(1, |m| m.top_k) as u64;
    // f32 rows of one step: the residual, the normed input, attention's q/k/v and output, the
    // routed rows' gate and up products, the exchange's send and receive buffers; and the
    // logits of every row (a prefill chunk's last rows at most, but counted whole).
    let per_token = 4 * (2 * h + config.q_dim() as u64 + 2 * config.kv_dim() as u64 + h)
        + 4 * k * 2 * i
        + 4 * 2 * h;
    runtime + step_tokens as u64 * per_token + step_tokens as u64 * 4 * config.vocab_size as u64
}

/// The placement of `model` on `grid` with KV for `load`, each worker having `usable` bytes for
/// weights and KV: the stages come from a first placement with unlimited memory (they depend on
/// the weights only), the KV cache is sized for their largest, then the placement is made
/// again with the real memory, so a worker that cannot hold its part is refused as the
/// coordinator would refuse it.
pub fn place_for_load(
    model: &Model,
    grid: Grid,
    worker: WorkerMemory,
    usable: u64,
    load: Load,
) -> Result<Placement, PlanError> {
    let options = PlanOptions {
        kv_bytes_per_worker: PlanOptions::default().kv_bytes_per_worker,
        block_size: load.block_size,
    };
    let first = place(model, grid, worker, UNLIMITED, options)?;
    let kv = kv_bytes_per_worker(&model.config, &first.stages, load, worker.value_bytes);
    place(
        model,
        grid,
        worker,
        usable,
        PlanOptions {
            kv_bytes_per_worker: kv,
            block_size: load.block_size,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::Subset;

    fn mixtral() -> Model {
        Model::resolve("mixtral-8x7b").unwrap()
    }

    /// The weights per worker are the placement's, and add up to the model plus what each
    /// shard repeats (attention and router of its layers, embedding and head on the ends).
    #[test]
    fn workers_hold_what_the_placement_gives_them() {
        let m = mixtral();
        let gpu = WorkerMemory::of(Kind::Gpu);
        let p = place(
            &m,
            "2x4".parse().unwrap(),
            gpu,
            UNLIMITED,
            Default::default(),
        )
        .unwrap();
        for c in &p.cells {
            assert_eq!(c.weight_bytes, m.config.subset_params(&c.subset) * 2);
        }
        let whole = m.config.param_counts().total * 2;
        let sum: u64 = p.cells.iter().map(|c| c.weight_bytes).sum();
        let pc = m.config.param_counts();
        let repeated =
            3 * (32 * (pc.attention_per_layer + 8 * 4096) + pc.embedding + pc.lm_head + 4096) * 2;
        assert_eq!(sum, whole + repeated);
        // 8 experts over 4 shards: each worker about a quarter of the experts of half the layers.
        let one = p.cells[0].weight_bytes as f64 / 1e9;
        assert!(one > 12.0 && one < 14.5, "{one} GB");
    }

    #[test]
    fn kv_is_sized_for_the_load_on_the_largest_stage() {
        let m = mixtral();
        let load = Load {
            context: 4096,
            streams_per_lane: 8,
            block_size: 16,
        };
        let gpu = WorkerMemory::of(Kind::Gpu);
        let p = place_for_load(&m, "1x2".parse().unwrap(), gpu, UNLIMITED, load).unwrap();
        // 128 KiB per token in bf16 (32 layers × 8 KV heads × 128 × K and V × 2 bytes).
        let per_token = m
            .config
            .kv_bytes_per_token(switchyard_model::safetensors::Dtype::BF16);
        assert_eq!(p.cells[0].kv_bytes, 8 * 4096 * per_token);
        assert_eq!(p.kv_blocks, 8 * 4096 / 16);
        // Three stages of 32 layers: 11, 11, 10; the KV of the largest decides the blocks.
        let p = place_for_load(&m, "3x1".parse().unwrap(), gpu, UNLIMITED, load).unwrap();
        assert_eq!(p.kv_blocks, 8 * 4096 / 16);
        let layers: Vec<usize> = p.stages.iter().map(|s| s.len()).collect();
        for (c, l) in p.cells.iter().zip(layers) {
            assert_eq!(c.kv_bytes, 8 * 4096 * per_token / 32 * l as u64);
        }
    }

    #[test]
    fn a_worker_that_cannot_hold_its_part_is_refused() {
        let m = mixtral();
        let load = Load {
            context: 4096,
            streams_per_lane: 1,
            block_size: 16,
        };
        let gpu = WorkerMemory::of(Kind::Gpu);
        let e = place_for_load(&m, "1x1".parse().unwrap(), gpu, 80_000_000_000, load).unwrap_err();
        assert!(matches!(e, PlanError::DoesNotFit { .. }), "{e}");
        // A CPU host keeps the stored type: the same model in Q4_K_M fits in 32 GB.
        let q4 = mixtral().stored_as(switchyard_model::quantize::Scheme::Q4KM);
        let cpu = WorkerMemory::of(Kind::Cpu);
        let p = place_for_load(&q4, "1x1".parse().unwrap(), cpu, 32_000_000_000, load).unwrap();
        assert_eq!(
            p.cells[0].weight_bytes,
            q4.stored_bytes(&Subset::all(&q4.config))
        );
        // On a GPU the same file is held in bf16, as the CUDA backend keeps it.
        let p = place(
            &q4,
            "1x1".parse().unwrap(),
            gpu,
            UNLIMITED,
            Default::default(),
        )
        .unwrap();
        assert_eq!(p.cells[0].weight_bytes, m.config.param_counts().total * 2);
    }

    #[test]
    fn overhead_is_small_beside_the_weights() {
        let m = mixtral();
        let o = overhead_bytes(&m.config, Kind::Gpu, 512);
        assert!(o > 1 << 30 && o < 2 << 30, "{o}");
    }
}
