//! The CUDA backend against the CPU backend, on a real GPU. Every test is ignored by a plain
//! `cargo test` (CI has no GPU; there the kernels are checked by `kernels/tests/ptxas.rs`);
//! the device scripts run them with `--ignored`, where a missing GPU is a failure:
//! `kernels/gpu-check-correctness` runs every test but the `timing_` ones (and the `small_` ones
//! again under compute-sanitizer), `kernels/gpu-check-timing` the `timing_` ones.
//!
//! Every op runs on fresh random inputs at several shapes with every fresh CUDA buffer poisoned
//! (outputs, KV caches and the kernels' internal buffers: NaN, indices far out of range), and
//! must satisfy ‖cuda − cpu‖ / ‖cpu‖ ≤ 1e-2 over the whole output and ≤ 3e-2 over each row (each
//! head's slice for attention), so one wrong row cannot hide in a large case; a NaN anywhere
//! fails. Timings of our kernels go to `$SWITCHYARD_GPU_TIMINGS` (JSON lines) when set.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchyard_kernels::geometry::MOE_TILE_ROWS;
use switchyard_kernels::routing::sort_by_expert;
use switchyard_model::rng::Rng;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{init, HostWeight, ModelConfig, WeightType};
use switchyard_scheduler::kv_blocks::FREED;
use switchyard_scheduler::sampling::argmax;
use switchyard_scheduler::step::{LogitsWanted, SeqInput};
use switchyard_worker::backend::{Backend, BackendError, FfnWeights, Qkv, Routes};
use switchyard_worker::batch::AttentionBatch;
use switchyard_worker::cuda::{CudaTensor, CudaWeight};
use switchyard_worker::{CpuBackend, CudaBackend, Engine, EngineConfig};

/// ‖Δ‖ / ‖ref‖ over a whole output.
const TOL: f64 = 1e-2;
/// ‖Δ‖ / ‖ref‖ over each row (or head slice) of an output.
const UNIT_TOL: f64 = 3e-2;

fn gpu(head_dim: usize, heads: usize, kv_heads: usize) -> CudaBackend {
    let mut b = CudaBackend::new(0, head_dim, heads, kv_heads).expect("the GPU check needs a GPU");
    b.set_poison(true);
    b
}

/// Uniform random values of standard deviation `scale` (a uniform draw is several times
/// cheaper than a normal one, and the check needs hundreds of millions).
fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    let half_width = 3f64.sqrt() * scale;
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * half_width) as f32)
        .collect()
}

/// bf16-rounded values: what the GPU holds, so the CPU sees the same weights.
fn bf(v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// Squared norms of `got − want` and of `want`.
fn sq_norms(got: &[f32], want: &[f32]) -> (f64, f64) {
    got.iter().zip(want).fold((0.0, 0.0), |(d, r), (g, w)| {
        (d + ((g - w) as f64).powi(2), r + (*w as f64).powi(2))
    })
}

/// The CUDA output `got` against the CPU's `want`: finite everywhere, within [`TOL`] over the
/// whole, and within [`UNIT_TOL`] over each run of `unit` values (a row, or one head of a row).
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], unit: usize) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(
        unit > 0 && want.len().is_multiple_of(unit),
        "{what}: unit {unit}"
    );
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: {} in the CUDA output at element {i} (unit {})",
            got[i],
            i / unit
        );
    }
    let (d, r) = sq_norms(got, want);
    let rel = (d / r.max(1e-30)).sqrt();
    let units = want.len() / unit;
    // A unit whose reference is near zero is measured against a tenth of a typical unit's norm.
    let floor = (0.1 * (r / units.max(1) as f64).sqrt()).max(1e-30);
    let (worst, worst_rel) = got
        .chunks(unit)
        .zip(want.chunks(unit))
        .map(|(g, w)| {
            let (d, r) = sq_norms(g, w);
            d.sqrt() / r.sqrt().max(floor)
        })
        .enumerate()
        .fold(
            (0, 0.0f64),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    println!("{what:<72} rel err {rel:.2e}; worst of {units} units: #{worst} {worst_rel:.2e}");
    assert!(rel <= TOL, "{what}: ‖Δ‖/‖ref‖ = {rel:.3e} > {TOL}");
    assert!(
        worst_rel <= UNIT_TOL,
        "{what}: unit {worst} ({unit} values): ‖Δ‖/‖ref‖ = {worst_rel:.3e} > {UNIT_TOL}"
    );
}

fn timing(name: &str, shape: String, secs: f64, extra: String) {
    let line = format!(
        "{{\"op\":\"{name}\",\"shape\":\"{shape}\",\"ms\":{:.4}{extra}}}",
        secs * 1e3
    );
    println!("timing {line}");
    if let Ok(path) = std::env::var("SWITCHYARD_GPU_TIMINGS") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

/// Mean seconds per call of `f` after a warm-up, synchronising the GPU's stream.
fn time<F: FnMut()>(g: &CudaBackend, iters: usize, mut f: F) -> f64 {
    f();
    g.gpu().stream().synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    g.gpu().stream().synchronize().unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}

// ---- dense ops -------------------------------------------------------------------------------

fn dense_ops(shapes: &[(usize, usize, usize)]) {
    let (cpu, g) = (CpuBackend::default(), gpu(128, 32, 8));
    let mut rng = Rng::new(1);
    for &(rows, hidden, out) in shapes {
        let tag = format!("[{rows}x{hidden}]->{out}");
        let x = randn(&mut rng, rows * hidden, 1.0);
        let w = bf(randn(&mut rng, out * hidden, 0.05));
        let norm_w = bf(randn(&mut rng, hidden, 1.0));
        let (xc, xg) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        let (wc, wg) = (
            cpu.weight_f32(w.clone(), out, hidden).unwrap(),
            g.weight_f32(w.clone(), out, hidden).unwrap(),
        );
        let (nc, ng) = (
            cpu.weight_f32(norm_w.clone(), 1, hidden).unwrap(),
            g.weight_f32(norm_w, 1, hidden).unwrap(),
        );
        let rc = cpu.rms_norm(&xc, &nc, 1e-5).unwrap();
        let rg = g.rms_norm(&xg, &ng, 1e-5).unwrap();
        let host = |t: &CudaTensor| g.to_host(t).unwrap();
        close(
            &format!("rms_norm {tag}"),
            &host(&rg),
            &cpu.to_host(&rc).unwrap(),
            hidden,
        );
        let lc = cpu.linear(&rc, &wc).unwrap();
        let lg = g.linear(&rg, &wg).unwrap();
        close(
            &format!("linear {tag}"),
            &host(&lg),
            &cpu.to_host(&lc).unwrap(),
            out,
        );
        // residual[rows, hidden] += linear(x) · w2ᵀ, w2 being [hidden, out].
        let w2 = bf(randn(&mut rng, hidden * out, 0.05));
        let (w2c, w2g) = (
            cpu.weight_f32(w2.clone(), hidden, out).unwrap(),
            g.weight_f32(w2, hidden, out).unwrap(),
        );
        let (mut resc, mut resg) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        let (lc_in, lg_in) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        cpu.linear_add(&lc, &w2c, &mut resc).unwrap();
        g.linear_add(&lg, &w2g, &mut resg).unwrap();
        close(
            &format!("linear_add {tag}"),
            &host(&resg),
            &cpu.to_host(&resc).unwrap(),
            hidden,
        );
        let gate = bf(randn(&mut rng, out * hidden, 0.05));
        let up = bf(randn(&mut rng, out * hidden, 0.05));
        let down = bf(randn(&mut rng, hidden * out, 0.05));
        let fc = FfnWeights {
            gate: cpu.weight_f32(gate.clone(), out, hidden).unwrap(),
            up: cpu.weight_f32(up.clone(), out, hidden).unwrap(),
            down: cpu.weight_f32(down.clone(), hidden, out).unwrap(),
        };
        let fg = FfnWeights {
            gate: g.weight_f32(gate, out, hidden).unwrap(),
            up: g.weight_f32(up, out, hidden).unwrap(),
            down: g.weight_f32(down, hidden, out).unwrap(),
        };
        let (mut mc, mut mg) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        cpu.mlp_add(&rc, &fc, &mut mc).unwrap();
        g.mlp_add(&rg, &fg, &mut mg).unwrap();
        close(
            &format!("mlp_add {tag}"),
            &host(&mg),
            &cpu.to_host(&mc).unwrap(),
            hidden,
        );
        // The exchange's remote outputs into the residual stream.
        cpu.add(&lc_in, &mut resc).unwrap();
        g.add(&lg_in, &mut resg).unwrap();
        close(
            &format!("add {tag}"),
            &host(&resg),
            &cpu.to_host(&resc).unwrap(),
            hidden,
        );
        let pick: Vec<usize> = (0..rows).rev().step_by(2).collect();
        let sc = cpu.select_rows(&xc, &pick).unwrap();
        let sg = g.select_rows(&xg, &pick).unwrap();
        close(
            &format!("select_rows {tag}"),
            &host(&sg),
            &cpu.to_host(&sc).unwrap(),
            hidden,
        );
    }
    let mut rng = Rng::new(5);
    let table = bf(randn(&mut rng, 1000 * 256, 1.0));
    let ids = [0u32, 999, 5, 5, 17];
    let ec = cpu
        .embed(&cpu.weight_f32(table.clone(), 1000, 256).unwrap(), &ids)
        .unwrap();
    let eg = g
        .embed(&g.weight_f32(table, 1000, 256).unwrap(), &ids)
        .unwrap();
    close(
        "embed",
        &g.to_host(&eg).unwrap(),
        &cpu.to_host(&ec).unwrap(),
        256,
    );
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn dense_ops_match_the_cpu() {
    dense_ops(&[
        (1, 64, 48),
        (7, 4096, 1024),
        (300, 520, 1000),
        (33, 4096, 14336),
    ]);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn rope_matches_the_cpu() {
    let (cpu, g) = (CpuBackend::default(), gpu(128, 32, 8));
    let mut rng = Rng::new(3);
    let (rows, hidden) = (9, 256);
    let x = bf(randn(&mut rng, rows * hidden, 1.0));
    let wq = bf(randn(&mut rng, 4096 * hidden, 0.05));
    let wk = bf(randn(&mut rng, 1024 * hidden, 0.05));
    let positions: Vec<u32> = vec![0, 1, 2, 100, 4095, 4096, 20000, 32767, 7];
    let c: Qkv<_> = cpu
        .qkv_rope(
            &cpu.tensor(x.clone(), rows, hidden).unwrap(),
            &cpu.weight_f32(wq.clone(), 4096, hidden).unwrap(),
            &cpu.weight_f32(wk.clone(), 1024, hidden).unwrap(),
            &cpu.weight_f32(wk.clone(), 1024, hidden).unwrap(),
            &positions,
            128,
            1e6,
        )
        .unwrap();
    let gq = g
        .qkv_rope(
            &g.tensor(x, rows, hidden).unwrap(),
            &g.weight_f32(wq, 4096, hidden).unwrap(),
            &g.weight_f32(wk.clone(), 1024, hidden).unwrap(),
            &g.weight_f32(wk, 1024, hidden).unwrap(),
            &positions,
            128,
            1e6,
        )
        .unwrap();
    for (name, gt, ct) in [("q", &gq.q, &c.q), ("k", &gq.k, &c.k), ("v", &gq.v, &c.v)] {
        close(
            &format!("qkv_rope {name}"),
            &g.to_host(gt).unwrap(),
            &cpu.to_host(ct).unwrap(),
            128,
        );
    }
}

// ---- attention -------------------------------------------------------------------------------

/// One attention step: sequences `(start position, new rows)` (0 rows: a sequence with nothing
/// to do this step) over a cache whose earlier positions a first prefill filled.
#[derive(Clone, Copy)]
struct Attn<'a> {
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    block_size: usize,
    seqs: &'a [(usize, usize)],
    /// The step's tables mark FREED every block wholly before the keys its rows can see.
    free_outside_window: bool,
    /// The GPU's block ids are the CPU's plus this: its cache reaches past 2³² elements, so
    /// only 64-bit offsets find the keys.
    gpu_block_base: u32,
}

impl<'a> Attn<'a> {
    fn new(head_dim: usize, heads: usize, kv_heads: usize, seqs: &'a [(usize, usize)]) -> Self {
        Attn {
            head_dim,
            heads,
            kv_heads,
            window: None,
            block_size: 16,
            seqs,
            free_outside_window: false,
            gpu_block_base: 0,
        }
    }

    fn name(&self) -> String {
        format!(
            "attention d={} {}/{} window={:?} bs={} freed={} base={} seqs={:?}",
            self.head_dim,
            self.heads,
            self.kv_heads,
            self.window,
            self.block_size,
            self.free_outside_window,
            self.gpu_block_base,
            self.seqs
        )
    }
}

/// Block tables for `seqs` drawn from a pool of about twice the blocks they need, in shuffled
/// order: a kernel that ignored the table, or assumed ascending ids, reads the wrong keys.
fn shuffled_tables(rng: &mut Rng, seqs: &[(usize, usize)], bs: usize) -> (Vec<Vec<u32>>, usize) {
    let need: Vec<usize> = seqs.iter().map(|(s, r)| (s + r).div_ceil(bs)).collect();
    let pool = 2 * need.iter().sum::<usize>() + 1;
    let mut ids: Vec<u32> = (0..pool as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((rng.uniform() * (i + 1) as f64) as usize).min(i);
        ids.swap(i, j);
    }
    let mut next = ids.into_iter();
    let tables = need
        .iter()
        .map(|&n| next.by_ref().take(n).collect())
        .collect();
    (tables, pool)
}

/// Runs case `c` on both backends (the CPU only when `check`), compares the step's output per
/// head, and with `time_it` times the step on the GPU.
fn attention_case(c: Attn<'_>, check: bool, time_it: bool) {
    let (hd, heads, kvh, bs) = (c.head_dim, c.heads, c.kv_heads, c.block_size);
    let (cpu, mut g) = (CpuBackend::default(), gpu(hd, heads, kvh));
    // Timing runs unpoisoned: a poisoned output is an upload inside the timed call.
    g.set_poison(check);
    let mut rng = Rng::new(7);
    let (tables, pool) = shuffled_tables(&mut rng, c.seqs, bs);
    let seq = |tokens: usize, start_pos: usize, block_table: Vec<u32>| SeqInput {
        tokens: vec![0; tokens],
        start_pos,
        block_table,
        logits: LogitsWanted::Last,
    };
    let history: Vec<SeqInput> = c
        .seqs
        .iter()
        .zip(&tables)
        .filter(|((start, _), _)| *start > 0)
        .map(|((start, _), t)| seq(*start, 0, t.clone()))
        .collect();
    let step: Vec<SeqInput> = c
        .seqs
        .iter()
        .zip(&tables)
        .map(|(&(start, rows), t)| {
            let mut t = t.clone();
            if c.free_outside_window {
                let first = c.window.map_or(0, |w| (start + 1).saturating_sub(w));
                t[..first / bs].fill(FREED);
            }
            seq(rows, start, t)
        })
        .collect();
    let on_gpu = |inputs: &[SeqInput]| -> Vec<SeqInput> {
        let shift = |b: u32| if b == FREED { b } else { b + c.gpu_block_base };
        inputs
            .iter()
            .map(|s| SeqInput {
                block_table: s.block_table.iter().map(|&b| shift(b)).collect(),
                ..s.clone()
            })
            .collect()
    };
    let (qd, kd) = (heads * hd, kvh * hd);
    let mut cc = cpu
        .kv_cache(1, if check { pool } else { 1 }, bs, kvh, hd)
        .unwrap();
    // A cache past 2³² elements stays zeroed: poisoning it would be a 16 GiB upload.
    g.set_poison(check && c.gpu_block_base == 0);
    let mut cg = g
        .kv_cache(1, pool + c.gpu_block_base as usize, bs, kvh, hd)
        .unwrap();
    g.set_poison(check);
    // The GPU's attention takes bf16 q, k, v as qkv_rope makes them. An identity projection at
    // position 0 (where RoPE is the identity) reproduces bf16-exact inputs exactly.
    let ident = |d: usize| {
        let mut m = vec![0.0f32; d * d];
        (0..d).for_each(|i| m[i * d + i] = 1.0);
        g.weight_f32(m, d, d).unwrap()
    };
    let (iq, ik) = (ident(qd), ident(kd));
    let mut run = |inputs: &[SeqInput], compare: bool| {
        let n: usize = inputs.iter().map(|s| s.tokens.len()).sum();
        let (q, k, v) = (
            bf(randn(&mut rng, n * qd, 1.0)),
            bf(randn(&mut rng, n * kd, 1.0)),
            bf(randn(&mut rng, n * kd, 1.0)),
        );
        let zeros = vec![0u32; n];
        let as_bf16 = |x: &[f32], cols: usize, w: &CudaWeight| {
            let t = g.tensor(x.to_vec(), n, cols).unwrap();
            g.qkv_rope(&t, w, w, w, &zeros, hd, 1e4).unwrap()
        };
        let qg = as_bf16(&q, qd, &iq).q;
        let kg = as_bf16(&k, kd, &ik).k;
        let vg = as_bf16(&v, kd, &ik).v;
        let gpu_batch = AttentionBatch::new(&on_gpu(inputs), bs, c.window);
        let og = g.attention(&qg, &kg, &vg, &mut cg, 0, &gpu_batch).unwrap();
        if check {
            let batch = AttentionBatch::new(inputs, bs, c.window);
            let t = |x: Vec<f32>, cols| cpu.tensor(x, n, cols).unwrap();
            let oc = cpu
                .attention(&t(q, qd), &t(k, kd), &t(v, kd), &mut cc, 0, &batch)
                .unwrap();
            if compare {
                close(
                    &c.name(),
                    &g.to_host(&og).unwrap(),
                    &cpu.to_host(&oc).unwrap(),
                    hd,
                );
            }
        }
        if compare && time_it {
            let secs = time(&g, 20, || {
                g.attention(&qg, &kg, &vg, &mut cg, 0, &gpu_batch).unwrap();
            });
            let ctx: usize = c.seqs.iter().map(|(s, r)| s + r).sum();
            timing(
                "attention",
                format!(
                    "d={hd} h={heads}/{kvh} window={:?} seqs={}x{:?}",
                    c.window,
                    c.seqs.len(),
                    c.seqs[0]
                ),
                secs,
                format!(",\"kv_bytes\":{}", ctx * kd * 2 * 2),
            );
        }
    };
    if !history.is_empty() {
        run(&history, false);
    }
    run(&step, true);
}

fn check_attention(c: Attn<'_>) {
    attention_case(c, true, false);
}

/// Every head dim `Spec::new` accepts, each at the most query heads per KV head it allows.
fn every_head_dim(seqs: &[(usize, usize)]) {
    for head_dim in (16..=256).step_by(16) {
        let group = (1..=8)
            .rev()
            .find(|&g| switchyard_kernels::Spec::new(head_dim, g, 1).is_ok())
            .unwrap();
        check_attention(Attn::new(head_dim, 2 * group, 2, seqs));
    }
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn attention_matches_the_cpu() {
    // Prefill, decode and an empty sequence (nothing to attend; must write nothing) in a step.
    check_attention(Attn::new(
        16,
        4,
        2,
        &[(0, 5), (3, 1), (10, 0), (40, 1), (0, 70)],
    ));
    check_attention(Attn {
        window: Some(16),
        free_outside_window: true,
        ..Attn::new(16, 4, 2, &[(0, 40), (50, 1), (20, 7)])
    });
    let mixed = [(0, 200), (1000, 1), (300, 1), (64, 65)];
    check_attention(Attn::new(128, 32, 8, &mixed));
    check_attention(Attn {
        window: Some(4096),
        free_outside_window: true,
        ..Attn::new(128, 32, 8, &[(5000, 1), (4000, 130)])
    });
    check_attention(Attn::new(64, 8, 4, &[(0, 1), (0, 64), (2000, 1)]));
    // A window shorter than one 64-key tile on a chunk spanning several tiles.
    check_attention(Attn {
        window: Some(20),
        free_outside_window: true,
        ..Attn::new(64, 8, 2, &[(100, 150), (300, 1), (0, 90)])
    });
    // Cache blocks of other sizes.
    for block_size in [1, 8, 32] {
        check_attention(Attn {
            block_size,
            ..Attn::new(128, 32, 8, &mixed)
        });
    }
    // GQA group 8 (Llama-2-70B-like).
    check_attention(Attn::new(128, 64, 8, &mixed));
    every_head_dim(&[(0, 130), (600, 1), (70, 1), (33, 40)]);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn attention_reads_keys_past_4g_elements() {
    // Block 2¹⁸ of 16 tokens × 8 KV heads × 128 starts at element 2³²: prefill and decode must
    // both reach it (and kv_append write it) with 64-bit offsets.
    check_attention(Attn {
        gpu_block_base: 1 << 18,
        ..Attn::new(128, 32, 8, &[(0, 100), (700, 1), (50, 3), (0, 0)])
    });
}

// ---- MoE -------------------------------------------------------------------------------------

/// One MoE case: `(tokens, hidden, intermediate, experts, top_k, held)`; this GPU holds experts
/// `0 .. held`.
type MoeShape = (usize, usize, usize, usize, usize, usize);

/// Expert weights for `0 .. held`, on both backends.
#[allow(clippy::type_complexity)]
fn expert_weights(
    rng: &mut Rng,
    cpu: &CpuBackend,
    g: &CudaBackend,
    (hidden, inter, held): (usize, usize, usize),
) -> (
    Vec<(u32, FfnWeights<<CpuBackend as Backend>::Weight>)>,
    Vec<(u32, FfnWeights<<CudaBackend as Backend>::Weight>)>,
) {
    let (mut wc, mut wg) = (Vec::new(), Vec::new());
    for e in 0..held as u32 {
        let (ga, u, d) = (
            bf(randn(rng, inter * hidden, 0.02)),
            bf(randn(rng, inter * hidden, 0.02)),
            bf(randn(rng, hidden * inter, 0.02)),
        );
        wc.push((
            e,
            FfnWeights {
                gate: cpu.weight_f32(ga.clone(), inter, hidden).unwrap(),
                up: cpu.weight_f32(u.clone(), inter, hidden).unwrap(),
                down: cpu.weight_f32(d.clone(), hidden, inter).unwrap(),
            },
        ));
        wg.push((
            e,
            FfnWeights {
                gate: g.weight_f32(ga, inter, hidden).unwrap(),
                up: g.weight_f32(u, inter, hidden).unwrap(),
                down: g.weight_f32(d, hidden, inter).unwrap(),
            },
        ));
    }
    (wc, wg)
}

/// The router on both backends: the same choices where the logits are not near a tie, and
/// the same weights where the choices agree.
fn routers_agree(tag: &str, rc: &Routes, rg: &Routes) {
    let k = rc.top_k;
    let (mut same, mut compared, mut worst) = (0, 0, 0.0f32);
    for (t, (ec, eg)) in rc.experts.chunks(k).zip(rg.experts.chunks(k)).enumerate() {
        if ec == eg {
            same += 1;
            for j in 0..k {
                let (a, b) = (rc.weights[t * k + j], rg.weights[t * k + j]);
                assert!(b.is_finite(), "router {tag}: weight {b} at token {t}");
                worst = worst.max((a - b).abs());
                compared += 1;
            }
        }
    }
    let tokens = rc.experts.len() / k;
    println!("router {tag}: {same}/{tokens} tokens route alike; weights max |Δ| {worst:.2e} over {compared}");
    assert!(
        same * 100 >= tokens * 95,
        "router {tag}: too many different choices"
    );
    assert!(worst <= 1e-2, "router {tag}: weights differ by {worst}");
}

/// The GPU sort against its host reference: offsets, tiles, order, weights and positions.
fn sort_matches_reference(g: &CudaBackend, routes: &Routes, held: usize) {
    let experts = routes.experts.iter().copied().max().unwrap() as usize + 1;
    let local_of: Vec<i32> = (0..experts)
        .map(|e| if e < held { e as i32 } else { -1 })
        .collect();
    let want = sort_by_expert(
        &routes.experts,
        &routes.weights,
        routes.top_k,
        &local_of,
        MOE_TILE_ROWS,
    );
    let s = g.gpu().stream();
    let sorted = g
        .gpu()
        .moe_sort(
            &s.clone_htod(&routes.experts).unwrap(),
            &s.clone_htod(&routes.weights).unwrap(),
            &s.clone_htod(&local_of).unwrap(),
            routes.top_k,
            held,
        )
        .unwrap();
    let rows = *want.offsets.last().unwrap() as usize;
    assert_eq!(s.clone_dtoh(&sorted.offsets).unwrap(), want.offsets);
    assert_eq!(s.clone_dtoh(&sorted.tiles).unwrap(), want.tiles);
    assert_eq!(
        &s.clone_dtoh(&sorted.sorted_token).unwrap()[..rows],
        &want.sorted_token[..]
    );
    let weight_bits: Vec<u32> = s
        .clone_dtoh(&sorted.sorted_weight)
        .unwrap()
        .iter()
        .map(|w| w.to_bits())
        .collect();
    assert_eq!(&weight_bits[..rows], &want.sorted_weight_bits[..]);
    assert_eq!(
        &s.clone_dtoh(&sorted.pos_of).unwrap()[..routes.experts.len()],
        &want.pos_of[..]
    );
}

fn moe_cases(shapes: &[MoeShape]) {
    let (cpu, g) = (CpuBackend::default(), gpu(128, 32, 8));
    let mut rng = Rng::new(11);
    for &(tokens, hidden, inter, experts, top_k, held) in shapes {
        let tag =
            format!("tokens={tokens} h={hidden} i={inter} e={experts} top{top_k} held={held}");
        let x = bf(randn(&mut rng, tokens * hidden, 1.0));
        let router = bf(randn(&mut rng, experts * hidden, 0.05));
        let xc = cpu.tensor(x.clone(), tokens, hidden).unwrap();
        let xg = g.tensor(x.clone(), tokens, hidden).unwrap();
        let rc = cpu
            .router_topk(
                &xc,
                &cpu.weight_f32(router.clone(), experts, hidden).unwrap(),
                top_k,
            )
            .unwrap();
        let rg = g
            .router_topk(&xg, &g.weight_f32(router, experts, hidden).unwrap(), top_k)
            .unwrap();
        routers_agree(&tag, &rc, &rg);
        // The experts themselves on the CPU's routes (so both sides do the same work).
        let (wc, wg) = expert_weights(&mut rng, &cpu, &g, (hidden, inter, held));
        let lc: Vec<_> = wc.iter().map(|(e, w)| (*e, w)).collect();
        let lg: Vec<_> = wg.iter().map(|(e, w)| (*e, w)).collect();
        let mut resc = cpu.tensor(x.clone(), tokens, hidden).unwrap();
        let mut resg = g.tensor(x.clone(), tokens, hidden).unwrap();
        cpu.experts_ffn_add(&xc, &rc, &lc, &mut resc).unwrap();
        g.experts_ffn_add(&xg, &rc, &lg, &mut resg).unwrap();
        let (hc, hg) = (cpu.to_host(&resc).unwrap(), g.to_host(&resg).unwrap());
        // Compare the experts' contribution, not the residual it was added to.
        let dc: Vec<f32> = hc.iter().zip(&x).map(|(a, b)| a - b).collect();
        let dg: Vec<f32> = hg.iter().zip(&x).map(|(a, b)| a - b).collect();
        close(&format!("experts_ffn_add {tag}"), &dg, &dc, hidden);
        sort_matches_reference(&g, &rc, held);
    }
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn moe_matches_the_cpu_and_the_sort_matches_its_reference() {
    moe_cases(&[
        // GEMV path (≤ 8 rows per expert); hidden % 32 and intermediate % 64 not 0.
        (1, 1032, 2888, 8, 2, 8),
        (5, 520, 1000, 8, 2, 8),
        // Mixtral-8x7B's expert shape (two experts, so every row reaches one held here).
        (3, 4096, 14336, 2, 2, 2),
        // Tensor-core path: aligned, with tails, some experts held elsewhere, top-4 of 16.
        (64, 4096, 1536, 8, 2, 8),
        (300, 520, 1000, 8, 2, 3),
        (700, 1032, 2888, 16, 4, 8),
    ]);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn router_picks_by_logit_with_ties_to_the_lower_id() {
    let (cpu, g) = (CpuBackend::default(), gpu(128, 32, 8));
    let hidden = 8;
    let x: Vec<f32> = (0..hidden)
        .map(|i| if i == 0 { 1.0 } else { 0.0 })
        .collect();
    // Logits are the gates' first column, exactly (bf16-representable).
    for (firsts, top_k, want) in [
        // Both lowest probabilities underflow to 0; the logits still order them.
        (vec![-300.0, -200.0, 0.0, 1.0], 3, vec![3, 2, 1]),
        // Exact ties: the lower expert id first.
        (vec![2.0, 5.0, 5.0, 2.0], 3, vec![1, 2, 0]),
    ] {
        let experts = firsts.len();
        let mut gate = vec![0.0f32; experts * hidden];
        for (e, v) in firsts.iter().enumerate() {
            gate[e * hidden] = *v;
        }
        let rc = cpu
            .router_topk(
                &cpu.tensor(x.clone(), 1, hidden).unwrap(),
                &cpu.weight_f32(gate.clone(), experts, hidden).unwrap(),
                top_k,
            )
            .unwrap();
        let rg = g
            .router_topk(
                &g.tensor(x.clone(), 1, hidden).unwrap(),
                &g.weight_f32(gate, experts, hidden).unwrap(),
                top_k,
            )
            .unwrap();
        assert_eq!(rc.experts, want, "CPU, logits {firsts:?}");
        assert_eq!(rg.experts, want, "GPU, logits {firsts:?}");
        for (a, b) in rc.weights.iter().zip(&rg.weights) {
            assert!(
                (a - b).abs() <= 1e-5,
                "weights {:?} vs {:?}",
                rc.weights,
                rg.weights
            );
        }
    }
}

// ---- small cases for compute-sanitizer -------------------------------------------------------

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it, and again under compute-sanitizer"]
fn small_cases_reach_every_kernel() {
    dense_ops(&[(3, 64, 40)]);
    check_attention(Attn {
        window: Some(24),
        free_outside_window: true,
        ..Attn::new(32, 4, 2, &[(0, 70), (80, 1), (0, 0), (40, 3)])
    });
    check_attention(Attn::new(96, 8, 2, &[(0, 20), (300, 1)]));
    moe_cases(&[(3, 264, 200, 4, 2, 3), (40, 264, 200, 4, 2, 3)]);
}

// ---- end to end ------------------------------------------------------------------------------

/// Routes and router logits of one router call.
type RouterCall = (Routes, Vec<f32>);

/// A backend that also records each router call's routes and logits (computed again through
/// `linear`), so an end-to-end comparison can tell a legitimate routing flip (a near tie that
/// bf16 decides the other way) from a wrong kernel.
struct Recording<B> {
    inner: B,
    calls: Arc<Mutex<Vec<RouterCall>>>,
}

impl<B: Backend> Backend for Recording<B> {
    type Tensor = B::Tensor;
    type Weight = B::Weight;
    type KvCache = B::KvCache;
    const VALUE_BYTES: u64 = B::VALUE_BYTES;

    fn weight(&self, w: HostWeight) -> Result<B::Weight, BackendError> {
        self.inner.weight(w)
    }
    fn kept_type(&self, stored: WeightType) -> WeightType {
        self.inner.kept_type(stored)
    }
    fn tensor(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<B::Tensor, BackendError> {
        self.inner.tensor(data, rows, cols)
    }
    fn to_host(&self, t: &B::Tensor) -> Result<Vec<f32>, BackendError> {
        self.inner.to_host(t)
    }
    fn rows(&self, t: &B::Tensor) -> usize {
        self.inner.rows(t)
    }
    fn cols(&self, t: &B::Tensor) -> usize {
        self.inner.cols(t)
    }
    fn add(&self, x: &B::Tensor, residual: &mut B::Tensor) -> Result<(), BackendError> {
        self.inner.add(x, residual)
    }
    fn kv_cache(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<B::KvCache, BackendError> {
        self.inner
            .kv_cache(layers, num_blocks, block_size, kv_heads, head_dim)
    }
    fn embed(&self, table: &B::Weight, ids: &[u32]) -> Result<B::Tensor, BackendError> {
        self.inner.embed(table, ids)
    }
    fn rms_norm(&self, x: &B::Tensor, w: &B::Weight, eps: f32) -> Result<B::Tensor, BackendError> {
        self.inner.rms_norm(x, w, eps)
    }
    fn linear(&self, x: &B::Tensor, w: &B::Weight) -> Result<B::Tensor, BackendError> {
        self.inner.linear(x, w)
    }
    fn linear_add(
        &self,
        x: &B::Tensor,
        w: &B::Weight,
        residual: &mut B::Tensor,
    ) -> Result<(), BackendError> {
        self.inner.linear_add(x, w, residual)
    }
    fn qkv_rope(
        &self,
        x: &B::Tensor,
        wq: &B::Weight,
        wk: &B::Weight,
        wv: &B::Weight,
        positions: &[u32],
        head_dim: usize,
        rope_theta: f64,
    ) -> Result<Qkv<B::Tensor>, BackendError> {
        self.inner
            .qkv_rope(x, wq, wk, wv, positions, head_dim, rope_theta)
    }
    fn attention(
        &self,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        cache: &mut B::KvCache,
        layer: usize,
        batch: &AttentionBatch,
    ) -> Result<B::Tensor, BackendError> {
        self.inner.attention(q, k, v, cache, layer, batch)
    }
    fn router_topk(
        &self,
        x: &B::Tensor,
        gate: &B::Weight,
        top_k: usize,
    ) -> Result<Routes, BackendError> {
        let routes = self.inner.router_topk(x, gate, top_k)?;
        let logits = self.inner.to_host(&self.inner.linear(x, gate)?)?;
        self.calls.lock().unwrap().push((routes.clone(), logits));
        Ok(routes)
    }
    fn experts_ffn_add(
        &self,
        x: &B::Tensor,
        routes: &Routes,
        experts: &[(u32, &FfnWeights<B::Weight>)],
        residual: &mut B::Tensor,
    ) -> Result<(), BackendError> {
        self.inner.experts_ffn_add(x, routes, experts, residual)
    }
    fn mlp_add(
        &self,
        x: &B::Tensor,
        w: &FfnWeights<B::Weight>,
        residual: &mut B::Tensor,
    ) -> Result<(), BackendError> {
        self.inner.mlp_add(x, w, residual)
    }
    fn select_rows(&self, x: &B::Tensor, rows: &[usize]) -> Result<B::Tensor, BackendError> {
        self.inner.select_rows(x, rows)
    }
}

fn recording<B: Backend>(inner: B) -> (Recording<B>, Arc<Mutex<Vec<RouterCall>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    (
        Recording {
            inner,
            calls: calls.clone(),
        },
        calls,
    )
}

/// A routing flip is legitimate when the CPU's k-th and (k+1)-th router logits of that token
/// are within this fraction of the token's logit range: bf16 may decide such a near tie either
/// way.
const FLIP_MARGIN: f32 = 0.05;

/// Tokens whose expert sets differ between the CPU's and the GPU's router calls of one step,
/// each with the CPU's margin at its k-th choice (relative to the token's logit range).
fn routing_flips(cpu: &[RouterCall], gpu: &[RouterCall]) -> Vec<(usize, usize, f32)> {
    assert_eq!(cpu.len(), gpu.len(), "router calls per step");
    let mut flips = Vec::new();
    for (layer, ((rc, logits), (rg, _))) in cpu.iter().zip(gpu).enumerate() {
        let k = rc.top_k;
        let experts = logits.len() / (rc.experts.len() / k);
        for (t, (ec, eg)) in rc.experts.chunks(k).zip(rg.experts.chunks(k)).enumerate() {
            let (mut a, mut b) = (ec.to_vec(), eg.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                let mut row = logits[t * experts..(t + 1) * experts].to_vec();
                row.sort_by(|x, y| y.total_cmp(x));
                let range = (row[0] - row[experts - 1]).max(f32::MIN_POSITIVE);
                flips.push((layer, t, (row[k - 1] - row[k]) / range));
            }
        }
    }
    flips
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - lse).collect()
}

/// A prompt (prefill) and greedy decode steps on both backends, the CPU's token fed to both.
/// Logits and the chosen token's logprob are compared while every routing decision so far has
/// agreed; a routing flip (any layer, any token) must be a near tie, and is counted.
fn end_to_end(name: &str, config: &ModelConfig, prompt_len: usize, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    init::write_model_dir(dir.path(), config, 0, Dtype::BF16, None).unwrap();
    let ec = EngineConfig {
        kv_cache_bytes: 256 << 20,
        max_step_tokens: 4096,
        ..EngineConfig::default()
    };
    let (cpu_b, cpu_calls) = recording(CpuBackend::default());
    let mut cpu = Engine::load(cpu_b, dir.path(), ec.clone()).unwrap();
    let mut g = gpu(config.head_dim, config.num_heads, config.num_kv_heads);
    g.set_poison(false); // the engine's whole-model path; poisoning is for the op checks
    let (gpu_b, gpu_calls) = recording(g);
    let mut gpu_e = Engine::load(gpu_b, dir.path(), ec).unwrap();
    let mut rng = Rng::new(2);
    let mut tokens: Vec<u32> = (0..prompt_len)
        .map(|_| (rng.uniform() * config.vocab_size as f64) as u32)
        .collect();
    let (mut start, mut diverged, mut flips) = (0, false, 0);
    for step in 0..steps {
        let chunk = tokens[start..].to_vec();
        let lc = cpu
            .step_chunks(&[(0, &chunk, start, LogitsWanted::Last)])
            .unwrap();
        let lg = gpu_e
            .step_chunks(&[(0, &chunk, start, LogitsWanted::Last)])
            .unwrap();
        let calls = |c: &Mutex<Vec<RouterCall>>| std::mem::take(&mut *c.lock().unwrap());
        for (layer, t, margin) in routing_flips(&calls(&cpu_calls), &calls(&gpu_calls)) {
            println!(
                "{name} step {step}: routing flip at layer {layer} token {t}, margin {margin:.2e}"
            );
            assert!(
                margin <= FLIP_MARGIN,
                "{name} step {step} layer {layer} token {t}: the GPU routed differently at a margin of {margin:.3e} (> {FLIP_MARGIN}) of the logit range"
            );
            flips += 1;
            diverged = true;
        }
        let next = argmax(&lc[0]);
        if !diverged {
            let what = format!("{name} step {step} ({} tokens) logits", chunk.len());
            close(&what, &lg[0], &lc[0], config.vocab_size);
            let (pc, pg) = (log_softmax(&lc[0]), log_softmax(&lg[0]));
            let d = (pc[next as usize] - pg[next as usize]).abs();
            println!("{what}: |Δ logprob| of token {next} {d:.2e}");
            assert!(d <= 5e-2, "{what}: logprob of token {next} differs by {d}");
        }
        start = tokens.len();
        tokens.push(next);
    }
    println!("{name}: {steps} steps, {flips} routing flips, compared until the first");
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-correctness runs it"]
fn tiny_models_end_to_end() {
    end_to_end(
        "tiny-mixtral",
        &init::preset("tiny-mixtral").unwrap(),
        37,
        8,
    );
    end_to_end(
        "tiny-mistral",
        &init::preset("tiny-mistral").unwrap(),
        40,
        8,
    );
}

// ---- timings (kernels/gpu-check-timing) ------------------------------------------------------

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-timing runs it"]
fn timing_attention() {
    // Prefill: 4k causal, with and without a 4096 window (compare with torch SDPA).
    attention_case(Attn::new(128, 32, 8, &[(0, 4096)]), false, true);
    attention_case(
        Attn {
            window: Some(4096),
            ..Attn::new(128, 32, 8, &[(0, 4096)])
        },
        false,
        true,
    );
    // Decode: batch × context, as a fraction of HBM bandwidth (kv_bytes / time).
    for batch in [1, 8, 64] {
        for ctx in [1024, 8192, 32768] {
            if batch * ctx > 64 * 8192 {
                continue; // the history prefill would dominate the run's time
            }
            let seqs = vec![(ctx - 1, 1); batch];
            attention_case(Attn::new(128, 32, 8, &seqs), false, true);
        }
    }
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check-timing runs it"]
fn timing_moe_experts() {
    // Mixtral-8x7B's experts, every one held here; the routes come from a random router.
    // Unpoisoned: a poisoned buffer is an upload inside the timed call.
    let mut g = gpu(128, 32, 8);
    g.set_poison(false);
    let mut rng = Rng::new(13);
    let (hidden, inter, experts, top_k) = (4096, 14336, 8, 2);
    let mut wg = Vec::new();
    for e in 0..experts as u32 {
        let mut w = |rows, cols| {
            g.weight_f32(randn(&mut rng, rows * cols, 0.02), rows, cols)
                .unwrap()
        };
        wg.push((
            e,
            FfnWeights {
                gate: w(inter, hidden),
                up: w(inter, hidden),
                down: w(hidden, inter),
            },
        ));
    }
    let lg: Vec<_> = wg.iter().map(|(e, w)| (*e, w)).collect();
    let router = g
        .weight_f32(randn(&mut rng, experts * hidden, 0.05), experts, hidden)
        .unwrap();
    for tokens in [1, 64, 2048] {
        let tag =
            format!("tokens={tokens} h={hidden} i={inter} e={experts} top{top_k} held={experts}");
        let x = randn(&mut rng, tokens * hidden, 1.0);
        let xg = g.tensor(x.clone(), tokens, hidden).unwrap();
        let routes = g.router_topk(&xg, &router, top_k).unwrap();
        let secs = time(&g, 10, || {
            let mut r = g.tensor(x.clone(), tokens, hidden).unwrap();
            g.experts_ffn_add(&xg, &routes, &lg, &mut r).unwrap();
        });
        let touched: std::collections::BTreeSet<u32> = routes.experts.iter().copied().collect();
        let bytes = touched.len() * 3 * hidden * inter * 2;
        let flops = 2.0 * 3.0 * (tokens * top_k) as f64 * (hidden * inter) as f64;
        timing(
            "moe_experts",
            tag,
            secs,
            format!(",\"expert_bytes\":{bytes},\"flops\":{flops}"),
        );
    }
}
