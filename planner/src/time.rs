//! The model of time: each operation of a step costs the longer of its bytes over the device's
//! memory bandwidth and its FLOPs over the device's FLOP/s (a roofline), each scaled by an
//! efficiency factor; a MoE layer adds the expert exchange (the bytes the cluster sends per
//! token, over the link, plus a call's latency); stages add the hand-over of the hidden rows;
//! and a lane's pipeline runs at most one step per stage at a time, so fewer groups of
//! sequences than stages leave bubbles.
//!
//! The efficiency factors are stated defaults until `switchyard plan --calibrate` exists
//! (issue 20, item 3): every report says which were used.

use serde::Serialize;
use switchyard_model::ModelConfig;

use crate::hardware::{Device, Kind};

/// Fractions of the datasheet's peaks a kernel reaches, and the fixed cost of one gRPC call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Efficiency {
    /// Of memory bandwidth, in bandwidth-bound operations (decode's matrix-vector products).
    pub bandwidth: f64,
    /// Of FLOP/s, in compute-bound operations (prefill's matrix products).
    pub compute: f64,
    /// Seconds one gRPC call costs beyond the link's latency and bandwidth (encoding, the
    /// host's copies, scheduling).
    pub call_s: f64,
}

impl Efficiency {
    /// Stated defaults, not measurements: GPUs reach about 75% of bandwidth in GEMV and 50% of
    /// dense peak in GEMM; a CPU host's kernels about 50% of its bandwidth and 25% of its FMA
    /// peak (bf16 and block formats are widened in registers); a call costs 150 µs.
    pub const fn default_for(kind: Kind) -> Efficiency {
        match kind {
            Kind::Gpu => Efficiency {
                bandwidth: 0.75,
                compute: 0.5,
                call_s: 150e-6,
            },
            Kind::Cpu => Efficiency {
                bandwidth: 0.5,
                compute: 0.25,
                call_s: 150e-6,
            },
        }
    }
}

/// One deployment's shape for the time model.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub config: &'a ModelConfig,
    pub device: &'a Device,
    pub efficiency: Efficiency,
    /// Bytes per weight value as the workers hold them (2 for bf16; a stored block type's
    /// average).
    pub weight_bytes_per_param: f64,
    /// Bytes per KV value.
    pub kv_value_bytes: f64,
    pub stages: usize,
    pub shards: usize,
    /// Layers of each stage.
    pub stage_layers: &'a [usize],
}

/// What one pass of some rows through one stage costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTime {
    pub compute_s: f64,
    pub exchange_s: f64,
    pub handover_s: f64,
}

impl StageTime {
    pub fn total(&self) -> f64 {
        self.compute_s + self.exchange_s + self.handover_s
    }
}

/// Expected distinct experts `tokens` rows touch among `held` of `n`, each row choosing `k`.
fn experts_touched(n: usize, k: usize, held: f64, tokens: f64) -> f64 {
    held * (1.0 - (1.0 - k as f64 / n as f64).powf(tokens))
}

/// Expected shards other than a row's own that hold at least one of its `k` experts, when
/// `shards` shards hold `n / shards` experts each: the exchange's fan-out per row.
pub fn remote_shards(n: usize, k: usize, shards: usize) -> f64 {
    if shards <= 1 {
        return 0.0;
    }
    // P(a given other shard holds none of the k) = C(n - m, k) / C(n, k), m = n / shards.
    let m = n as f64 / shards as f64;
    let mut none = 1.0;
    for j in 0..k {
        none *= ((n as f64 - m - j as f64) / (n as f64 - j as f64)).max(0.0);
    }
    (shards - 1) as f64 * (1.0 - none)
}

/// Bytes one row sends and receives per MoE layer, as the gRPC exchange sends them: its f32
/// hidden vector once to every other shard holding one of its experts, one summed f32 vector
/// back from each (BENCHMARKS.md, issue 3: 3219 measured against this 3210 on small-mixtral).
pub fn exchange_bytes_per_token(config: &ModelConfig, shards: usize) -> f64 {
    match config.moe {
        Some(m) => {
            remote_shards(m.num_experts, m.top_k, shards) * 2.0 * 4.0 * config.hidden_size as f64
        }
        None => 0.0,
    }
}

impl Shape<'_> {
    /// The roofline of one operation.
    fn op(&self, bytes: f64, flops: f64) -> f64 {
        let d = self.device;
        (bytes / (d.bandwidth * self.efficiency.bandwidth))
            .max(flops / (d.flops * self.efficiency.compute))
    }

    /// Stage `stage` processing `rows` rows of `seqs` sequences of one lane, whose sequences
    /// hold `context` tokens of KV each before these rows, while `lanes` lanes send it their
    /// rows' expert work.
    pub fn stage(&self, stage: usize, rows: f64, seqs: f64, context: f64, lanes: f64) -> StageTime {
        let c = self.config;
        let (h, q, kv) = (c.hidden_size as f64, c.q_dim() as f64, c.kv_dim() as f64);
        let p = c.param_counts();
        let w = self.weight_bytes_per_param;
        let attn = p.attention_per_layer as f64;
        let one_expert = p.one_expert as f64;
        // Attention: the projections, then each sequence's KV read once; a sequence's new
        // rows attend to each other causally (half of them on average).
        let new_per_seq = rows / seqs.max(1.0);
        let kv_bytes = seqs * (context + new_per_seq) * 2.0 * kv * self.kv_value_bytes;
        let mut layer = self.op(attn * w, 2.0 * attn * rows)
            + self.op(kv_bytes, 4.0 * rows * (context + new_per_seq / 2.0) * q);
        let mut exchange = 0.0;
        match c.moe {
            Some(m) => {
                let (n, k, e) = (m.num_experts, m.top_k, self.shards as f64);
                let router = (n as f64) * h;
                layer += self.op(router * w, 2.0 * router * rows);
                // Each lane's rows reach this shard's experts in their own call: the weights of
                // the experts each call touches are read once per call.
                let touched = lanes * experts_touched(n, k, n as f64 / e, rows);
                layer += self.op(
                    touched * one_expert * w,
                    2.0 * one_expert * k as f64 * rows * lanes / e,
                );
                if self.shards > 1 {
                    let link = &self.device.link;
                    let bytes = rows * exchange_bytes_per_token(c, self.shards);
                    exchange = link.latency_s + self.efficiency.call_s + bytes / link.bandwidth;
                }
            }
            None => layer += self.op(one_expert * w, 2.0 * one_expert * rows),
        }
        let layers = self.stage_layers[stage] as f64;
        let mut compute = layers * layer;
        if stage + 1 == self.stages {
            let head = c.vocab_size as f64 * h;
            compute += self.op(head * w, 2.0 * head * rows);
        }
        let handover = if stage + 1 < self.stages {
            let link = &self.device.link;
            link.latency_s + self.efficiency.call_s + rows * h * 4.0 / link.bandwidth
        } else {
            0.0
        };
        StageTime {
            compute_s: compute,
            exchange_s: layers * exchange,
            handover_s: handover,
        }
    }

    /// Decode with `streams` sequences in each of `lanes` busy lanes, `context` tokens of KV
    /// each: (seconds per output token of one sequence, the pipeline's idle fraction).
    pub fn decode(&self, streams: usize, context: f64, lanes: f64) -> (f64, f64) {
        // Up to one step per stage in flight: the lane's sequences in `groups` groups.
        let groups = streams.clamp(1, self.stages);
        let rows = streams.max(1).div_ceil(groups) as f64;
        let times: Vec<f64> = (0..self.stages)
            .map(|s| self.stage(s, rows, rows, context, lanes).total())
            .collect();
        let round_trip: f64 = times.iter().sum();
        let busiest = times.iter().cloned().fold(0.0, f64::max);
        // A group needs every stage in turn; the busiest stage serves every group in turn.
        let per_token = round_trip.max(groups as f64 * busiest);
        let bubble = 1.0 - groups as f64 * busiest / per_token;
        (per_token, bubble.max(0.0))
    }

    /// Time to the first token of a prompt of `prompt` tokens arriving at an idle lane,
    /// prefilled in chunks of `chunk` tokens, one chunk at a time through the stages.
    pub fn ttft(&self, prompt: usize, chunk: usize) -> f64 {
        let mut done = 0;
        let mut t = 0.0;
        while done < prompt.max(1) {
            let rows = chunk.min(prompt.max(1) - done);
            t += (0..self.stages)
                .map(|s| self.stage(s, rows as f64, 1.0, done as f64, 1.0).total())
                .sum::<f64>();
            done += rows;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::Catalog;
    use crate::models::Model;

    #[test]
    fn the_exchange_fans_out_as_the_cluster_sends() {
        // 8 experts, top-2, 2 shards of 4: the other shard holds one of a row's two experts
        // unless both are local: 1 - C(4,2)/C(8,2) = 1 - 6/28.
        assert!((remote_shards(8, 2, 2) - 22.0 / 28.0).abs() < 1e-12);
        assert_eq!(remote_shards(8, 2, 1), 0.0);
        // 8 shards of one expert: each of the two experts is elsewhere with chance 7/8.
        assert!((remote_shards(8, 2, 8) - 1.75).abs() < 1e-12);
        // small-mixtral, 2 shards: BENCHMARKS.md's floor of 3210 bytes per token per layer.
        let sm = Model::resolve("small-mixtral").unwrap();
        let b = exchange_bytes_per_token(&sm.config, 2);
        assert!((b - 3218.0).abs() < 10.0, "{b}");
    }

    fn shape<'a>(m: &'a Model, d: &'a Device, layers: &'a [usize], shards: usize) -> Shape<'a> {
        Shape {
            config: &m.config,
            device: d,
            efficiency: Efficiency::default_for(d.kind),
            weight_bytes_per_param: 2.0,
            kv_value_bytes: 2.0,
            stages: layers.len(),
            shards,
            stage_layers: layers,
        }
    }

    /// Batch-1 decode is bandwidth-bound: the active weights over the bandwidth.
    #[test]
    fn batch_one_decode_reads_the_active_weights() {
        let m = Model::resolve("mixtral-8x7b").unwrap();
        let c = Catalog::builtin();
        let h100 = c.device("H100").unwrap();
        let s = shape(&m, h100, &[32], 1);
        let (per_token, bubble) = s.decode(1, 0.0, 1.0);
        let active = m.config.param_counts().active_per_token as f64 - 32000.0 * 4096.0;
        let floor = active * 2.0 / (3.35e12 * 0.75);
        assert!(
            (per_token / floor - 1.0).abs() < 0.01,
            "{per_token} vs {floor}"
        );
        assert_eq!(bubble, 0.0);
        // Bigger batches touch more experts: slower per token, faster in aggregate.
        let (t8, _) = s.decode(8, 512.0, 1.0);
        assert!(t8 > per_token && t8 < 8.0 * per_token);
    }

    /// One sequence through two stages leaves one of them idle at any time.
    #[test]
    fn a_lone_sequence_leaves_pipeline_bubbles() {
        let m = Model::resolve("mixtral-8x7b").unwrap();
        let c = Catalog::builtin();
        let a100 = c.device("A100-80GB").unwrap();
        let s = shape(&m, a100, &[16, 16], 1);
        let (_, bubble) = s.decode(1, 0.0, 1.0);
        assert!((bubble - 0.5).abs() < 0.05, "{bubble}");
        let (_, bubble) = s.decode(2, 0.0, 1.0);
        assert!(bubble < 0.05, "{bubble}");
    }

    #[test]
    fn prefill_is_compute_bound_and_grows_with_the_prompt() {
        let m = Model::resolve("mixtral-8x7b").unwrap();
        let c = Catalog::builtin();
        let h100 = c.device("H100").unwrap();
        let s = shape(&m, h100, &[32], 1);
        let (t512, t2048) = (s.ttft(512, 512), s.ttft(2048, 512));
        // 512 rows use about all the experts: 2 × 12.9B FLOPs per row at half of 989 TFLOP/s.
        let flops = 2.0 * m.config.param_counts().active_per_token as f64 * 512.0;
        assert!(t512 > flops / (989e12 * 0.5) * 0.9, "{t512}");
        assert!(t2048 > 4.0 * t512 && t2048 < 6.0 * t512, "{t512} {t2048}");
    }
}
