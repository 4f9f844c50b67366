//! Every deployment worth considering: for each `--hardware` and weight type, each grid P×E
//! and number of data-parallel copies that fits on the devices given; its memory per worker
//! (the coordinator's placement), predicted speed and cost; ranked.

use std::fmt::Write as _;

use serde::Serialize;
use switchyard_coordinator::placement::{Grid, Placement};
use switchyard_model::Subset;

use crate::hardware::{Hardware, Kind};
use crate::memory::{self, Load, WorkerMemory};
use crate::models::Model;
use crate::time::{exchange_bytes_per_token, Efficiency, Shape};
use crate::units::show_bytes;

/// What to plan for, beside the model and the hardware.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// KV tokens each sequence may hold.
    pub context: usize,
    /// Sequences decoding at once, over the whole deployment.
    pub concurrency: usize,
    /// Prompt length for the time to first token.
    pub prompt: usize,
    /// Decode tokens per second each stream should get, at least.
    pub target_tps: Option<f64>,
    pub block_size: usize,
    /// Tokens one step processes per lane (`--max-step-tokens`).
    pub step_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bytes {
    pub total: u64,
    /// Row-major over the grid, as the placement numbers its workers.
    pub per_worker: Vec<u64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Speed {
    pub per_stream: f64,
    pub aggregate: f64,
}

/// One deployment.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub hardware: String,
    pub kind: Kind,
    /// How the weights are stored (`--dtype`) and how the workers hold them.
    pub dtype: String,
    pub held_as: String,
    pub grid: String,
    pub copies: usize,
    pub devices: usize,
    pub price_per_hour: Option<f64>,
    /// Bytes a worker has for weights and KV: its memory less [`memory::overhead_bytes`].
    pub usable_bytes_per_worker: u64,
    pub overhead_bytes_per_worker: u64,
    /// Why it does not fit (the placement's refusal), if it does not.
    pub does_not_fit: Option<String>,
    /// Of one copy.
    pub weight_bytes: Bytes,
    pub kv_bytes: Bytes,
    pub streams_per_lane: usize,
    pub decode_tokens_per_s: Option<Speed>,
    pub ttft_s: Option<f64>,
    /// Idle fraction of the busiest stage in decode.
    pub pipeline_bubble: Option<f64>,
    pub exchange_bytes_per_token_per_layer: f64,
    pub cost_per_million_tokens: Option<f64>,
    pub meets_target: Option<bool>,
    /// How to serve one copy of it.
    pub serve: String,
}

/// Grids × copies using at most `devices` devices: stages up to the layers, shards up to the
/// experts (1 for a dense model, whose copies are the copies).
fn shapes(model: &Model, devices: usize) -> Vec<(Grid, usize)> {
    let max_shards = model.config.moe.map_or(1, |m| m.num_experts);
    let mut out = Vec::new();
    for stages in 1..=model.config.num_layers.min(devices) {
        for shards in 1..=max_shards.min(devices / stages) {
            for copies in 1..=devices / (stages * shards) {
                out.push((Grid { stages, shards }, copies));
            }
        }
    }
    out
}

fn bytes_of(
    placement: &Placement,
    f: impl Fn(&switchyard_coordinator::placement::Cell) -> u64,
) -> Bytes {
    let per_worker: Vec<u64> = placement.cells.iter().map(f).collect();
    Bytes {
        total: per_worker.iter().sum(),
        per_worker,
    }
}

/// Every candidate for `model` on `hw`, fitting or not.
pub fn candidates(model: &Model, hw: &Hardware, work: &Workload) -> Vec<Candidate> {
    let device = &hw.device;
    let worker = WorkerMemory::of(device.kind);
    let overhead = memory::overhead_bytes(&model.config, device.kind, work.step_tokens);
    let usable = device.memory_bytes.saturating_sub(overhead);
    let held_as = match worker.keeps_stored_weights {
        true => model.storage_name(),
        false => "bf16".to_string(),
    };
    let params = model.config.param_counts().total as f64;
    let weight_bytes_per_param = match worker.keeps_stored_weights {
        true => model.stored_bytes(&Subset::all(&model.config)) as f64 / params,
        false => worker.value_bytes as f64,
    };
    let efficiency = Efficiency::default_for(device.kind);
    let mut out = Vec::new();
    for (grid, copies) in shapes(model, hw.count) {
        let lanes = grid.shards * copies;
        let streams_per_lane = work.concurrency.div_ceil(lanes).max(1);
        let load = Load {
            context: work.context,
            streams_per_lane,
            block_size: work.block_size,
        };
        let devices = grid.cells() * copies;
        let price_per_hour = device.price.map(|p| p * devices as f64);
        let mut c = Candidate {
            hardware: hw.to_string(),
            kind: device.kind,
            dtype: model.storage_name(),
            held_as: held_as.clone(),
            grid: grid.to_string(),
            copies,
            devices,
            price_per_hour,
            usable_bytes_per_worker: usable,
            overhead_bytes_per_worker: overhead,
            does_not_fit: None,
            weight_bytes: Bytes {
                total: 0,
                per_worker: Vec::new(),
            },
            kv_bytes: Bytes {
                total: 0,
                per_worker: Vec::new(),
            },
            streams_per_lane,
            decode_tokens_per_s: None,
            ttft_s: None,
            pipeline_bubble: None,
            exchange_bytes_per_token_per_layer: exchange_bytes_per_token(
                &model.config,
                grid.shards,
            ),
            cost_per_million_tokens: None,
            meets_target: None,
            serve: String::new(),
        };
        // The memory a worker needs, fitting or not, comes from a placement with unlimited
        // memory; whether it fits, from the one with the device's.
        let sized = memory::place_for_load(model, grid, worker, memory::UNLIMITED, load);
        let placement = match sized {
            Ok(p) => p,
            Err(e) => {
                c.does_not_fit = Some(e.to_string());
                out.push(c);
                continue;
            }
        };
        c.weight_bytes = bytes_of(&placement, |cell| cell.weight_bytes);
        c.kv_bytes = bytes_of(&placement, |cell| cell.kv_bytes);
        if let Err(e) = memory::place_for_load(model, grid, worker, usable, load) {
            c.does_not_fit = Some(e.to_string());
            out.push(c);
            continue;
        }
        let layers: Vec<usize> = placement.stages.iter().map(|s| s.len()).collect();
        let shape = Shape {
            config: &model.config,
            device,
            efficiency,
            weight_bytes_per_param,
            kv_value_bytes: worker.value_bytes as f64,
            stages: grid.stages,
            shards: grid.shards,
            stage_layers: &layers,
        };
        // Decode at half the context on average; every lane busy when there are streams enough.
        let busy_lanes = work.concurrency.div_ceil(copies).min(grid.shards).max(1) as f64;
        let (per_token, bubble) =
            shape.decode(streams_per_lane, work.context as f64 / 2.0, busy_lanes);
        let per_stream = 1.0 / per_token;
        let aggregate = per_stream * work.concurrency.min(streams_per_lane * lanes) as f64;
        c.decode_tokens_per_s = Some(Speed {
            per_stream,
            aggregate,
        });
        c.pipeline_bubble = Some(bubble);
        c.ttft_s = Some(shape.ttft(work.prompt, work.step_tokens));
        c.cost_per_million_tokens = price_per_hour.map(|p| p / 3600.0 / aggregate * 1e6);
        c.meets_target = work.target_tps.map(|t| per_stream >= t);
        let kv_mb = c
            .kv_bytes
            .per_worker
            .iter()
            .max()
            .copied()
            .unwrap_or(0)
            .div_ceil(1 << 20);
        c.serve = format!(
            "--grid {grid} --kv-cache-mb {kv_mb} --block-size {} --max-running {streams_per_lane}",
            work.block_size
        );
        out.push(c);
    }
    out
}

/// Fitting candidates first: those meeting the target, then cheapest per token (unpriced
/// last), then fastest per stream.
pub fn rank(candidates: &mut [Candidate]) {
    let key = |c: &Candidate| {
        (
            c.does_not_fit.is_some(),
            c.meets_target == Some(false),
            c.cost_per_million_tokens.is_none(),
        )
    };
    candidates.sort_by(|a, b| {
        key(a)
            .cmp(&key(b))
            .then(
                a.cost_per_million_tokens
                    .unwrap_or(0.0)
                    .total_cmp(&b.cost_per_million_tokens.unwrap_or(0.0)),
            )
            .then(
                b.decode_tokens_per_s
                    .map_or(0.0, |s| s.per_stream)
                    .total_cmp(&a.decode_tokens_per_s.map_or(0.0, |s| s.per_stream)),
            )
    });
}

fn money(x: Option<f64>) -> String {
    match x {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

/// The ranked table of fitting candidates (at most `limit` rows), and a line per hardware and
/// weight type about what does not fit.
pub fn table(ranked: &[Candidate], limit: usize) -> String {
    let mut out = String::new();
    let fitting: Vec<&Candidate> = ranked.iter().filter(|c| c.does_not_fit.is_none()).collect();
    let header = [
        "rank",
        "hardware",
        "weights",
        "grid",
        "copies",
        "devices",
        "weights/worker",
        "KV/worker",
        "TTFT s",
        "tok/s/stream",
        "tok/s total",
        "$/hour",
        "$/M tokens",
        "target",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for (i, c) in fitting.iter().take(limit).enumerate() {
        let max = |b: &Bytes| b.per_worker.iter().max().copied().unwrap_or(0);
        let speed = c.decode_tokens_per_s.expect("fitting candidates are timed");
        rows.push(vec![
            (i + 1).to_string(),
            c.hardware.clone(),
            c.held_as.clone(),
            c.grid.clone(),
            c.copies.to_string(),
            c.devices.to_string(),
            show_bytes(max(&c.weight_bytes)),
            show_bytes(max(&c.kv_bytes)),
            format!("{:.3}", c.ttft_s.unwrap_or(0.0)),
            format!("{:.1}", speed.per_stream),
            format!("{:.1}", speed.aggregate),
            money(c.price_per_hour),
            money(c.cost_per_million_tokens),
            match c.meets_target {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    if fitting.is_empty() {
        out.push_str("no candidate fits\n");
    } else {
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, w))| match i {
                    1..=3 => format!("{cell:<w$}"),
                    _ => format!("{cell:>w$}"),
                })
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        if fitting.len() > limit {
            let _ = writeln!(
                out,
                "({} more fit; --top to see them, --json for all)",
                fitting.len() - limit
            );
        }
    }
    // Per hardware and weight type: how many do not fit, and why the largest of them does not.
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for c in ranked.iter().filter(|c| c.does_not_fit.is_some()) {
        let key = (c.hardware.as_str(), c.held_as.as_str());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let same: Vec<&Candidate> = ranked
            .iter()
            .filter(|o| {
                o.does_not_fit.is_some() && (o.hardware.as_str(), o.held_as.as_str()) == key
            })
            .collect();
        // The largest grid that does not fit says most about why.
        let widest = same
            .iter()
            .max_by_key(|o| (o.devices / o.copies, o.copies == 1))
            .expect("at least this one");
        let _ = writeln!(
            out,
            "{} ({}): {} layouts do not fit; the largest, grid {}: {}",
            c.hardware,
            c.held_as,
            same.len(),
            widest.grid,
            widest.does_not_fit.as_deref().unwrap_or_default()
        );
    }
    out
}
