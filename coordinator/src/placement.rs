//! The placement planner: which worker holds which layers and experts. A grid of `P` stages ×
//! `E` shards; worker `(p, e)` holds stage `p`'s contiguous layer range (ranges balanced by
//! bytes, the embedding counted on stage 0 and the final norm + `lm_head` on the last), and in
//! each of those layers the experts of shard `e` (spread evenly, uneven counts allowed) plus
//! the attention and router weights its lane needs. A plan that cannot fit is refused, naming
//! the worker and the bytes missing.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use switchyard_model::{Checkpoint, ModelConfig, Subset};

/// `P` pipeline stages × `E` expert shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub stages: usize,
    pub shards: usize,
}

impl Grid {
    pub fn cells(&self) -> usize {
        self.stages * self.shards
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.stages, self.shards)
    }
}

impl FromStr for Grid {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("grid {s:?}: expected PxE with P, E ≥ 1, e.g. 2x2");
        let (p, e) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
        let (stages, shards) = (
            p.trim().parse().map_err(|_| bad())?,
            e.trim().parse().map_err(|_| bad())?,
        );
        if stages == 0 || shards == 0 {
            return Err(bad());
        }
        Ok(Grid { stages, shards })
    }
}

/// What a worker reports about itself.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub address: String,
    pub device: String,
    pub memory_bytes: u64,
    pub available_bytes: u64,
    /// Bytes of one stored weight or KV value on its device: 4 (f32, CPU), 2 (bf16, GPU).
    pub value_bytes: u64,
    /// Weights stay in the checkpoint's stored type instead (a CPU worker by default).
    pub keeps_stored_weights: bool,
    /// With expert offload: the most bytes of experts it keeps resident (the rest are read
    /// from the checkpoint on demand), so a part larger than its memory can fit.
    pub expert_memory: Option<u64>,
}

/// One worker's part.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub address: String,
    pub stage: usize,
    pub shard: usize,
    pub subset: Subset,
    /// Bytes of the weights it keeps resident (its experts up to its expert memory).
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// With expert offload: the share of its experts' bytes that fits its expert memory.
    pub resident_expert_share: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Placement {
    pub epoch: u64,
    pub grid: Grid,
    /// Layer range of each stage.
    pub stages: Vec<Range<usize>>,
    /// Experts of each shard (empty for dense models).
    pub experts: Vec<Vec<u32>>,
    /// Row-major: cell `(p, e)` at `p * shards + e`.
    pub cells: Vec<Cell>,
    pub block_size: usize,
    /// KV blocks of every lane (the same on each stage of a lane).
    pub kv_blocks: usize,
}

impl Placement {
    pub fn cell(&self, stage: usize, shard: usize) -> &Cell {
        &self.cells[stage * self.grid.shards + shard]
    }

    /// The shard holding each expert.
    pub fn expert_shard(&self) -> Vec<u32> {
        let n = self.experts.iter().map(Vec::len).sum();
        let mut owner = vec![0; n];
        for (shard, experts) in self.experts.iter().enumerate() {
            for &e in experts {
                owner[e as usize] = shard as u32;
            }
        }
        owner
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "placement epoch {}: grid {} ({} KV blocks of {} tokens per lane)",
            self.epoch, self.grid, self.kv_blocks, self.block_size
        )?;
        for c in &self.cells {
            let experts = &self.experts[c.shard];
            write!(
                f,
                "  worker ({}, {}) {}: layers {}..{}",
                c.stage, c.shard, c.address, c.subset.layers.start, c.subset.layers.end
            )?;
            if !experts.is_empty() {
                write!(f, ", experts {experts:?}")?;
            }
            if c.subset.embedding {
                write!(f, ", embedding")?;
            }
            if c.subset.head {
                write!(f, ", lm_head")?;
            }
            writeln!(
                f,
                ", {:.1} MiB weights + {:.1} MiB KV{}",
                c.weight_bytes as f64 / (1 << 20) as f64,
                c.kv_bytes as f64 / (1 << 20) as f64,
                match c.resident_expert_share {
                    Some(s) => format!(
                        " ({:.0}% of its experts resident, the rest read on demand)",
                        100.0 * s
                    ),
                    None => String::new(),
                }
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("grid {grid} needs {needed} workers, {given} given")]
    WorkerCount {
        grid: Grid,
        needed: usize,
        given: usize,
    },
    #[error("grid {grid}: {stages} stages for a model of {layers} layers; expected at most one stage per layer")]
    TooManyStages {
        grid: Grid,
        stages: usize,
        layers: usize,
    },
    #[error("grid {grid}: {shards} expert shards for {experts} experts per layer; expected at most one shard per expert")]
    TooManyShards {
        grid: Grid,
        shards: usize,
        experts: usize,
    },
    #[error("worker {address} (stage {stage}, shard {shard}) needs {needed} bytes ({weights} of weights + {kv} of KV cache) but has {available} available: {missing} bytes missing")]
    DoesNotFit {
        address: String,
        stage: usize,
        shard: usize,
        needed: u64,
        weights: u64,
        kv: u64,
        available: u64,
        missing: u64,
    },
    #[error("a KV cache of {kv_bytes} bytes per worker holds no block of {block_size} tokens of stage {stage} ({block_bytes} bytes); raise the KV cache size")]
    NoKvBlock {
        kv_bytes: u64,
        block_size: usize,
        stage: usize,
        block_bytes: u64,
    },
}

/// Sizes the planner works with.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Bytes of KV cache per worker.
    pub kv_bytes_per_worker: u64,
    pub block_size: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            kv_bytes_per_worker: 256 << 20,
            block_size: 16,
        }
    }
}

/// The grids to try with `n` workers when at most `max` is wanted, best first: the most
/// cells, then the stage count nearest `max`'s (stages are usually there for memory), then the
/// most shards. Whether the model fits is [`plan`]'s to say.
pub fn grids_for(max: Grid, n: usize) -> Vec<Grid> {
    let mut grids: Vec<Grid> = (1..=max.stages)
        .flat_map(|stages| (1..=max.shards).map(move |shards| Grid { stages, shards }))
        .filter(|g| g.cells() <= n)
        .collect();
    grids.sort_by_key(|g| {
        (
            std::cmp::Reverse(g.cells()),
            g.stages.abs_diff(max.stages),
            std::cmp::Reverse(g.shards),
        )
    });
    grids
}

/// Bytes of `subset`'s tensors in the checkpoint's own types, the `stored_bytes` the
/// coordinator plans with (f32 per value where the checkpoint cannot say: that subset's
/// workers will refuse it themselves).
pub fn stored_bytes(checkpoint: &Checkpoint, subset: &Subset) -> u64 {
    checkpoint
        .subset_bytes(subset, |t| t)
        .unwrap_or_else(|_| checkpoint.config().subset_params(subset) * 4)
}

/// Bytes one KV block of `block_size` tokens takes on a worker holding `layers` layers, each
/// value `value_bytes` wide (K and V).
pub fn kv_block_bytes(
    config: &ModelConfig,
    layers: usize,
    block_size: usize,
    value_bytes: u64,
) -> u64 {
    2 * layers as u64 * config.kv_dim() as u64 * block_size as u64 * value_bytes
}

/// `stored_bytes(subset)`: what the tensors of `subset` take in the checkpoint's own types.
pub fn plan(
    config: &ModelConfig,
    stored_bytes: &dyn Fn(&Subset) -> u64,
    grid: Grid,
    workers: &[Inventory],
    options: PlanOptions,
    epoch: u64,
) -> Result<Placement, PlanError> {
    if workers.len() != grid.cells() {
        return Err(PlanError::WorkerCount {
            grid,
            needed: grid.cells(),
            given: workers.len(),
        });
    }
    if grid.stages > config.num_layers {
        return Err(PlanError::TooManyStages {
            grid,
            stages: grid.stages,
            layers: config.num_layers,
        });
    }
    let num_experts = config.moe.map_or(0, |m| m.num_experts);
    if config.moe.is_some() && grid.shards > num_experts {
        return Err(PlanError::TooManyShards {
            grid,
            shards: grid.shards,
            experts: num_experts,
        });
    }
    // Shard e holds experts [e·n/E, (e+1)·n/E): counts differ by at most one.
    let experts: Vec<Vec<u32>> = (0..grid.shards)
        .map(|e| {
            (e * num_experts / grid.shards..(e + 1) * num_experts / grid.shards)
                .map(|x| x as u32)
                .collect()
        })
        .collect();
    let subset = |layers: Range<usize>, shard: usize, stage: usize| Subset {
        layers,
        experts: config
            .moe
            .map(|_| experts[shard].iter().map(|e| *e as usize).collect()),
        embedding: stage == 0,
        head: stage + 1 == grid.stages,
    };
    // Balance stages by the parameters of the fullest shard.
    let widest = (0..grid.shards)
        .max_by_key(|e| experts[*e].len())
        .unwrap_or(0);
    let params =
        |layers: Range<usize>, stage: usize| config.subset_params(&subset(layers, widest, stage));
    let stages = balance(config.num_layers, grid.stages, params);

    // KV blocks are counted at the widest storage among the workers, so that every cell holds
    // them whatever its device.
    let value_bytes = workers.iter().map(|w| w.value_bytes).max().unwrap_or(4);
    let kv_block = |layers: usize, value_bytes: u64| {
        kv_block_bytes(config, layers, options.block_size, value_bytes)
    };
    let mut kv_blocks = usize::MAX;
    for (stage, layers) in stages.iter().enumerate() {
        let block_bytes = kv_block(layers.len(), value_bytes);
        let blocks = (options.kv_bytes_per_worker / block_bytes) as usize;
        if blocks == 0 {
            return Err(PlanError::NoKvBlock {
                kv_bytes: options.kv_bytes_per_worker,
                block_size: options.block_size,
                stage,
                block_bytes,
            });
        }
        kv_blocks = kv_blocks.min(blocks);
    }

    let mut cells = Vec::with_capacity(grid.cells());
    for (stage, layers) in stages.iter().enumerate() {
        for shard in 0..grid.shards {
            let w = &workers[stage * grid.shards + shard];
            let subset = subset(layers.clone(), shard, stage);
            let bytes_of = |s: &Subset| match w.keeps_stored_weights {
                true => stored_bytes(s),
                false => config.subset_params(s) * w.value_bytes,
            };
            let mut weight_bytes = bytes_of(&subset);
            // An offloading worker keeps its experts only up to its expert memory.
            let mut resident_expert_share = None;
            if let (Some(budget), Some(_)) = (w.expert_memory, config.moe) {
                let rest = bytes_of(&Subset {
                    experts: Some(Default::default()),
                    ..subset.clone()
                });
                let experts = weight_bytes - rest;
                if experts > 0 {
                    let kept = experts.min(budget);
                    resident_expert_share = Some(kept as f64 / experts as f64);
                    weight_bytes = rest + kept;
                }
            }
            let kv_bytes = kv_blocks as u64 * kv_block(layers.len(), w.value_bytes);
            let needed = weight_bytes + kv_bytes;
            if needed > w.available_bytes {
                return Err(PlanError::DoesNotFit {
                    address: w.address.clone(),
                    stage,
                    shard,
                    needed,
                    weights: weight_bytes,
                    kv: kv_bytes,
                    available: w.available_bytes,
                    missing: needed - w.available_bytes,
                });
            }
            cells.push(Cell {
                address: w.address.clone(),
                stage,
                shard,
                subset,
                weight_bytes,
                kv_bytes,
                resident_expert_share,
            });
        }
    }
    Ok(Placement {
        epoch,
        grid,
        stages,
        experts,
        cells,
        block_size: options.block_size,
        kv_blocks,
    })
}

/// Splits `0..n` into `parts` non-empty contiguous ranges minimising the largest `cost(range,
/// index)`: a binary search on that maximum with a greedy fill.
fn balance(n: usize, parts: usize, cost: impl Fn(Range<usize>, usize) -> u64) -> Vec<Range<usize>> {
    // Greedy: extend each range while it stays within `limit` and leaves a layer for every
    // range after it.
    let fill = |limit: u64| -> Option<Vec<Range<usize>>> {
        let mut ranges = Vec::with_capacity(parts);
        let mut start = 0;
        for part in 0..parts {
            let last = part + 1 == parts;
            let max_end = n - (parts - part - 1);
            let mut end = start + 1;
            if cost(start..end, part) > limit {
                return None;
            }
            while end < max_end && (last || cost(start..end + 1, part) <= limit) {
                end += 1;
            }
            if last && cost(start..end, part) > limit {
                return None;
            }
            ranges.push(start..end);
            start = end;
        }
        Some(ranges)
    };
    let (mut lo, mut hi) = (0u64, cost(0..n, 0) + cost(0..n, parts - 1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match fill(mid) {
            Some(_) => hi = mid,
            None => lo = mid + 1,
        }
    }
    fill(lo).expect("the upper bound always fits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::init::preset;

    fn workers(n: usize, available: u64) -> Vec<Inventory> {
        (0..n)
            .map(|i| Inventory {
                address: format!("w{i}"),
                device: "cpu".into(),
                memory_bytes: available,
                available_bytes: available,
                value_bytes: 4,
                keeps_stored_weights: false,
                expert_memory: None,
            })
            .collect()
    }

    #[test]
    fn grids_cover_every_layer_and_expert_once() {
        let c = preset("small-mixtral").unwrap();
        for grid in ["1x1", "1x4", "4x1", "2x2", "2x3", "3x8"] {
            let grid: Grid = grid.parse().unwrap();
            let p = plan(
                &c,
                &|s| c.subset_params(s) * 4,
                grid,
                &workers(grid.cells(), 1 << 40),
                PlanOptions::default(),
                1,
            )
            .unwrap();
            assert_eq!(p.stages.first().unwrap().start, 0);
            assert_eq!(p.stages.last().unwrap().end, c.num_layers);
            assert!(p.stages.windows(2).all(|w| w[0].end == w[1].start));
            let mut all: Vec<u32> = p.experts.concat();
            all.sort();
            assert_eq!(all, (0..8).collect::<Vec<u32>>(), "{grid}");
            let counts: Vec<usize> = p.experts.iter().map(Vec::len).collect();
            assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
            assert!(p.cells.iter().filter(|c| c.subset.embedding).count() == grid.shards);
            assert!(p.cells.iter().filter(|c| c.subset.head).count() == grid.shards);
        }
    }

    #[test]
    fn grids_shrink_and_grow_with_the_workers() {
        let max: Grid = "2x3".parse().unwrap();
        let best = |n| grids_for(max, n).first().map(|g| g.to_string());
        assert_eq!(best(6).as_deref(), Some("2x3"));
        assert_eq!(best(9).as_deref(), Some("2x3"));
        // 5 workers: no 5-cell grid within 2x3, so 2x2 (the stages kept) and a spare.
        assert_eq!(best(5).as_deref(), Some("2x2"));
        assert_eq!(best(4).as_deref(), Some("2x2"));
        assert_eq!(best(3).as_deref(), Some("1x3"));
        assert_eq!(best(1).as_deref(), Some("1x1"));
        assert_eq!(best(0), None);
        assert!(grids_for(max, 4).iter().all(|g| g.cells() <= 4));
    }

    #[test]
    fn stages_are_balanced_by_bytes() {
        let c = preset("small-mixtral").unwrap();
        let p = plan(
            &c,
            &|s| c.subset_params(s) * 4,
            "2x1".parse().unwrap(),
            &workers(2, 1 << 40),
            PlanOptions::default(),
            1,
        )
        .unwrap();
        let (a, b) = (p.cells[0].weight_bytes, p.cells[1].weight_bytes);
        // Embedding and head weigh as much as several layers; the split accounts for them.
        let layer = c.subset_params(&Subset {
            layers: 0..1,
            experts: None,
            embedding: false,
            head: false,
        }) * 4;
        assert!(a.abs_diff(b) <= layer, "{a} vs {b}, one layer {layer}");
    }

    #[test]
    fn a_worker_smaller_than_its_part_fits_with_expert_offload() {
        let c = preset("small-mixtral").unwrap();
        let bytes = |s: &Subset| c.subset_params(s) * 4;
        let all = Subset::all(&c);
        let rest = bytes(&Subset {
            experts: Some(Default::default()),
            ..all.clone()
        });
        let experts = bytes(&all) - rest;
        let kv = PlanOptions::default().kv_bytes_per_worker;
        // Room for the other weights, a quarter of the experts and the KV cache.
        let mut w = workers(1, rest + experts / 4 + kv);
        let grid = "1x1".parse().unwrap();
        let refused = plan(&c, &bytes, grid, &w, PlanOptions::default(), 1).unwrap_err();
        assert!(matches!(refused, PlanError::DoesNotFit { .. }), "{refused}");
        w[0].expert_memory = Some(experts / 4);
        let p = plan(&c, &bytes, grid, &w, PlanOptions::default(), 1).unwrap();
        assert_eq!(p.cells[0].weight_bytes, rest + experts / 4);
        let share = p.cells[0].resident_expert_share.unwrap();
        assert!((share - 0.25).abs() < 1e-9, "{share}");
        assert!(
            p.to_string().contains("(25% of its experts resident"),
            "{p}"
        );
        // A budget over the part's experts keeps them all, and counts only what they take.
        w[0].expert_memory = Some(experts * 2);
        w[0].available_bytes = bytes(&all) + kv;
        let p = plan(&c, &bytes, grid, &w, PlanOptions::default(), 1).unwrap();
        assert_eq!(p.cells[0].weight_bytes, bytes(&all));
        assert_eq!(p.cells[0].resident_expert_share, Some(1.0));
    }

    #[test]
    fn workers_keeping_stored_types_are_sized_by_the_checkpoint() {
        let c = preset("small-mixtral").unwrap();
        let f32_bytes = c.subset_params(&Subset::all(&c)) * 4;
        // Room for the model at 2 bytes a value plus its KV cache, not at 4.
        let available = f32_bytes * 3 / 4 + PlanOptions::default().kv_bytes_per_worker;
        let mut w = workers(1, available);
        let bf16 = |s: &Subset| c.subset_params(s) * 2;
        assert!(plan(
            &c,
            &bf16,
            "1x1".parse().unwrap(),
            &w,
            PlanOptions::default(),
            1
        )
        .is_err());
        w[0].keeps_stored_weights = true;
        let p = plan(
            &c,
            &bf16,
            "1x1".parse().unwrap(),
            &w,
            PlanOptions::default(),
            1,
        )
        .unwrap();
        assert_eq!(p.cells[0].weight_bytes, f32_bytes / 2);
    }

    #[test]
    fn refusals_name_the_problem() {
        let c = preset("tiny-mixtral").unwrap();
        let e = plan(
            &c,
            &|s| c.subset_params(s) * 4,
            "2x2".parse().unwrap(),
            &workers(3, 1 << 40),
            PlanOptions::default(),
            1,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "grid 2x2 needs 4 workers, 3 given");
        let e = plan(
            &c,
            &|s| c.subset_params(s) * 4,
            "3x1".parse().unwrap(),
            &workers(3, 1 << 40),
            PlanOptions::default(),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("3 stages for a model of 2 layers"));
        let e = plan(
            &c,
            &|s| c.subset_params(s) * 4,
            "1x5".parse().unwrap(),
            &workers(5, 1 << 40),
            PlanOptions::default(),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("5 expert shards for 4 experts"));
        let e = plan(
            &c,
            &|s| c.subset_params(s) * 4,
            "1x2".parse().unwrap(),
            &workers(2, 1 << 20),
            PlanOptions::default(),
            1,
        )
        .unwrap_err();
        let PlanError::DoesNotFit {
            address, missing, ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(address, "w0");
        assert!(*missing > 0);
        assert!(e.to_string().contains("bytes missing"), "{e}");
        assert!("2by2".parse::<Grid>().unwrap_err().contains("expected PxE"));
    }
}
