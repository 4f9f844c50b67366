//! The CUDA backend against the CPU backend, on a real GPU. Every test is ignored by a plain
//! `cargo test` (CI has no GPU; there the kernels are checked by `kernels/tests/ptxas.rs`);
//! `kernels/gpu-check` runs them with `--ignored`, where a missing GPU is a failure.
//!
//! Every op runs on fresh random inputs at several shapes, with fresh CUDA outputs poisoned
//! (NaN), and must satisfy ‖cuda − cpu‖ / ‖cpu‖ ≤ 1e-2 (bf16 weights and KV against f32); a NaN
//! anywhere fails. Timings of our kernels go to `$SWITCHYARD_GPU_TIMINGS` (JSON lines) when set.

use std::time::Instant;

use switchyard_model::rng::Rng;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{init, Arch, ModelConfig, MoeConfig};
use switchyard_scheduler::step::{LogitsWanted, SeqInput};
use switchyard_worker::backend::{Backend, FfnWeights, Routes};
use switchyard_worker::batch::AttentionBatch;
use switchyard_worker::{CpuBackend, CudaBackend, Engine, EngineConfig};

const TOL: f64 = 1e-2;

fn gpu(head_dim: usize, heads: usize, kv_heads: usize) -> CudaBackend {
    let mut b = CudaBackend::new(0, head_dim, heads, kv_heads).expect("the GPU check needs a GPU");
    b.set_poison(true);
    b
}

fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

/// bf16-rounded values: what the GPU holds, so the CPU sees the same weights.
fn bf(v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: NaN or inf in the CUDA output"
    );
    let (mut d, mut r) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        d += ((g - w) as f64).powi(2);
        r += (*w as f64).powi(2);
    }
    let rel = (d / r.max(1e-30)).sqrt();
    println!("{what:<48} rel err {rel:.2e}");
    assert!(rel <= TOL, "{what}: ‖Δ‖/‖ref‖ = {rel:.3e} > {TOL}");
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

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn dense_ops_match_the_cpu() {
    let (cpu, g) = (CpuBackend, gpu(128, 32, 8));
    let mut rng = Rng::new(1);
    for (rows, hidden, out) in [
        (1, 64, 48),
        (7, 4096, 1024),
        (300, 512, 1536),
        (33, 4096, 14336),
    ] {
        let tag = format!("[{rows}x{hidden}]->{out}");
        let x = randn(&mut rng, rows * hidden, 1.0);
        let w = bf(randn(&mut rng, out * hidden, 0.05));
        let norm_w = bf(randn(&mut rng, hidden, 1.0));
        let (xc, xg) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        let (wc, wg) = (
            cpu.weight(w.clone(), out, hidden).unwrap(),
            g.weight(w.clone(), out, hidden).unwrap(),
        );
        let (nc, ng) = (
            cpu.weight(norm_w.clone(), 1, hidden).unwrap(),
            g.weight(norm_w, 1, hidden).unwrap(),
        );
        let rc = cpu.rms_norm(&xc, &nc, 1e-5).unwrap();
        let rg = g.rms_norm(&xg, &ng, 1e-5).unwrap();
        close(
            &format!("rms_norm {tag}"),
            &g.to_host(&rg).unwrap(),
            &cpu.to_host(&rc).unwrap(),
        );
        let lc = cpu.linear(&rc, &wc).unwrap();
        let lg = g.linear(&rg, &wg).unwrap();
        close(
            &format!("linear {tag}"),
            &g.to_host(&lg).unwrap(),
            &cpu.to_host(&lc).unwrap(),
        );
        // residual[rows, hidden] += linear(x) · w2ᵀ, w2 being [hidden, out].
        let w2 = bf(randn(&mut rng, hidden * out, 0.05));
        let (w2c, w2g) = (
            cpu.weight(w2.clone(), hidden, out).unwrap(),
            g.weight(w2, hidden, out).unwrap(),
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
            &g.to_host(&resg).unwrap(),
            &cpu.to_host(&resc).unwrap(),
        );
        let gate = bf(randn(&mut rng, out * hidden, 0.05));
        let up = bf(randn(&mut rng, out * hidden, 0.05));
        let down = bf(randn(&mut rng, hidden * out, 0.05));
        let fc = FfnWeights {
            gate: cpu.weight(gate.clone(), out, hidden).unwrap(),
            up: cpu.weight(up.clone(), out, hidden).unwrap(),
            down: cpu.weight(down.clone(), hidden, out).unwrap(),
        };
        let fg = FfnWeights {
            gate: g.weight(gate, out, hidden).unwrap(),
            up: g.weight(up, out, hidden).unwrap(),
            down: g.weight(down, hidden, out).unwrap(),
        };
        let (mut mc, mut mg) = (
            cpu.tensor(x.clone(), rows, hidden).unwrap(),
            g.tensor(x.clone(), rows, hidden).unwrap(),
        );
        cpu.mlp_add(&rc, &fc, &mut mc).unwrap();
        g.mlp_add(&rg, &fg, &mut mg).unwrap();
        close(
            &format!("mlp_add {tag}"),
            &g.to_host(&mg).unwrap(),
            &cpu.to_host(&mc).unwrap(),
        );
        // The exchange's remote outputs into the residual stream.
        cpu.add(&lc_in, &mut resc).unwrap();
        g.add(&lg_in, &mut resg).unwrap();
        close(
            &format!("add {tag}"),
            &g.to_host(&resg).unwrap(),
            &cpu.to_host(&resc).unwrap(),
        );
        let pick: Vec<usize> = (0..rows).rev().step_by(2).collect();
        let sc = cpu.select_rows(&xc, &pick).unwrap();
        let sg = g.select_rows(&xg, &pick).unwrap();
        close(
            &format!("select_rows {tag}"),
            &g.to_host(&sg).unwrap(),
            &cpu.to_host(&sc).unwrap(),
        );
    }
    let table = bf(randn(&mut rng, 1000 * 256, 1.0));
    let ids = [0u32, 999, 5, 5, 17];
    let ec = cpu
        .embed(&cpu.weight(table.clone(), 1000, 256).unwrap(), &ids)
        .unwrap();
    let eg = g.embed(&g.weight(table, 1000, 256).unwrap(), &ids).unwrap();
    close(
        "embed",
        &g.to_host(&eg).unwrap(),
        &cpu.to_host(&ec).unwrap(),
    );
}

/// One attention step: sequences (start position, new rows) over a fresh cache whose earlier
/// positions are filled by a first prefill, then the step checked against the CPU.
fn attention_case(
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    seqs: &[(usize, usize)],
    time_it: bool,
) {
    let (cpu, g) = (CpuBackend, gpu(head_dim, heads, kv_heads));
    let mut rng = Rng::new(7);
    let bs = 16;
    let mut next_block = 0u32;
    let mut inputs = Vec::new();
    let mut history = Vec::new();
    for &(start, rows) in seqs {
        let blocks = (start + rows).div_ceil(bs);
        let table: Vec<u32> = (next_block..next_block + blocks as u32).collect();
        next_block += blocks as u32;
        if start > 0 {
            history.push(SeqInput {
                tokens: vec![0; start],
                start_pos: 0,
                block_table: table.clone(),
                logits: LogitsWanted::None,
            });
        }
        inputs.push(SeqInput {
            tokens: vec![0; rows],
            start_pos: start,
            block_table: table,
            logits: LogitsWanted::Last,
        });
    }
    let (qd, kd) = (heads * head_dim, kv_heads * head_dim);
    let cpu_blocks = if time_it { 1 } else { next_block as usize };
    let mut cc = cpu.kv_cache(1, cpu_blocks, bs, kv_heads, head_dim).unwrap();
    let mut cg = g
        .kv_cache(1, next_block as usize, bs, kv_heads, head_dim)
        .unwrap();
    let mut run = |inputs: &[SeqInput], check: bool| {
        let batch = AttentionBatch::new(inputs, bs, window);
        let n: usize = inputs.iter().map(|s| s.tokens.len()).sum();
        // bf16-exact q, k, v so both backends attend over the same numbers.
        let (q, k, v) = (
            bf(randn(&mut rng, n * qd, 1.0)),
            bf(randn(&mut rng, n * kd, 1.0)),
            bf(randn(&mut rng, n * kd, 1.0)),
        );
        let qc = cpu.tensor(q.clone(), n, qd).unwrap();
        let kc = cpu.tensor(k.clone(), n, kd).unwrap();
        let vc = cpu.tensor(v.clone(), n, kd).unwrap();
        // Timing-only cases (long contexts) skip the CPU: its reference would take minutes.
        let oc = match time_it {
            false => Some(cpu.attention(&qc, &kc, &vc, &mut cc, 0, &batch).unwrap()),
            true => None,
        };
        // The GPU's attention takes bf16 q, k, v as qkv_rope makes them. An identity projection
        // at position 0 (where RoPE is the identity) reproduces the inputs exactly in bf16.
        let ident = |d: usize| {
            let mut m = vec![0.0f32; d * d];
            (0..d).for_each(|i| m[i * d + i] = 1.0);
            g.weight(m, d, d).unwrap()
        };
        let (iq, ik) = (ident(qd), ident(kd));
        let zeros = vec![0u32; n];
        let as_bf16 = |x: Vec<f32>, cols: usize, w: &_| {
            let t = g.tensor(x, n, cols).unwrap();
            g.qkv_rope(&t, w, w, w, &zeros, head_dim, 1e4).unwrap()
        };
        let qg = as_bf16(q, qd, &iq).q;
        let kg = as_bf16(k, kd, &ik).k;
        let vg = as_bf16(v, kd, &ik).v;
        let og = g.attention(&qg, &kg, &vg, &mut cg, 0, &batch).unwrap();
        if let Some(oc) = oc.filter(|_| check) {
            let name = format!(
                "attention d={head_dim} {heads}/{kv_heads} window={window:?} seqs={seqs:?}"
            );
            close(&name, &g.to_host(&og).unwrap(), &cpu.to_host(&oc).unwrap());
        }
        if check && time_it {
            {
                let secs = time(&g, 20, || {
                    g.attention(&qg, &kg, &vg, &mut cg, 0, &batch).unwrap();
                });
                let ctx: usize = seqs.iter().map(|(s, r)| s + r).sum();
                let kv_bytes = ctx * kd * 2 * 2;
                timing(
                    "attention",
                    format!(
                        "d={head_dim} h={heads}/{kv_heads} window={window:?} seqs={}x{:?}",
                        seqs.len(),
                        seqs[0]
                    ),
                    secs,
                    format!(",\"kv_bytes\":{kv_bytes}"),
                );
            }
        }
    };
    if !history.is_empty() {
        run(&history, false);
    }
    run(&inputs, true);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn attention_matches_the_cpu() {
    // RoPE at position 0 is the identity, which the case builder relies on.
    attention_case(16, 4, 2, None, &[(0, 5), (3, 1), (40, 1), (0, 70)], false);
    attention_case(16, 4, 2, Some(16), &[(0, 40), (50, 1), (20, 7)], false);
    attention_case(
        128,
        32,
        8,
        None,
        &[(0, 200), (1000, 1), (300, 1), (64, 65)],
        false,
    );
    attention_case(128, 32, 8, Some(4096), &[(5000, 1), (4000, 130)], false);
    attention_case(64, 8, 4, None, &[(0, 1), (0, 64), (2000, 1)], false);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn attention_timings() {
    // Prefill: 4k causal, with and without a 4096 window (compare with torch SDPA).
    attention_case(128, 32, 8, None, &[(0, 4096)], true);
    attention_case(128, 32, 8, Some(4096), &[(0, 4096)], true);
    // Decode: batch × context, as a fraction of HBM bandwidth (kv_bytes / time).
    for batch in [1, 8, 64] {
        for ctx in [1024, 8192, 32768] {
            if batch * ctx > 64 * 8192 {
                continue; // the history prefill would dominate the run's time
            }
            attention_case(128, 32, 8, None, &vec![(ctx - 1, 1); batch], true);
        }
    }
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn rope_matches_the_cpu() {
    let (cpu, g) = (CpuBackend, gpu(128, 32, 8));
    let mut rng = Rng::new(3);
    let (rows, hidden) = (9, 256);
    let x = bf(randn(&mut rng, rows * hidden, 1.0));
    let wq = bf(randn(&mut rng, 4096 * hidden, 0.05));
    let wk = bf(randn(&mut rng, 1024 * hidden, 0.05));
    let positions: Vec<u32> = vec![0, 1, 2, 100, 4095, 4096, 20000, 32767, 7];
    let c = cpu
        .qkv_rope(
            &cpu.tensor(x.clone(), rows, hidden).unwrap(),
            &cpu.weight(wq.clone(), 4096, hidden).unwrap(),
            &cpu.weight(wk.clone(), 1024, hidden).unwrap(),
            &cpu.weight(wk.clone(), 1024, hidden).unwrap(),
            &positions,
            128,
            1e6,
        )
        .unwrap();
    let gq = g
        .qkv_rope(
            &g.tensor(x, rows, hidden).unwrap(),
            &g.weight(wq, 4096, hidden).unwrap(),
            &g.weight(wk.clone(), 1024, hidden).unwrap(),
            &g.weight(wk, 1024, hidden).unwrap(),
            &positions,
            128,
            1e6,
        )
        .unwrap();
    close(
        "qkv_rope q",
        &g.to_host(&gq.q).unwrap(),
        &cpu.to_host(&c.q).unwrap(),
    );
    close(
        "qkv_rope k",
        &g.to_host(&gq.k).unwrap(),
        &cpu.to_host(&c.k).unwrap(),
    );
    close(
        "qkv_rope v",
        &g.to_host(&gq.v).unwrap(),
        &cpu.to_host(&c.v).unwrap(),
    );
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn moe_matches_the_cpu_and_the_sort_matches_its_reference() {
    let (cpu, g) = (CpuBackend, gpu(128, 32, 8));
    let mut rng = Rng::new(11);
    for (tokens, hidden, inter, experts, top_k, held) in [
        (1, 4096, 14336, 8, 2, 8),
        (5, 512, 1536, 8, 2, 8),
        (64, 4096, 14336, 8, 2, 8),
        (300, 512, 1536, 8, 2, 3),
        (2048, 4096, 14336, 8, 2, 8),
    ] {
        let tag =
            format!("tokens={tokens} h={hidden} i={inter} e={experts} top{top_k} held={held}");
        let x = bf(randn(&mut rng, tokens * hidden, 1.0));
        let router = bf(randn(&mut rng, experts * hidden, 0.05));
        let xc = cpu.tensor(x.clone(), tokens, hidden).unwrap();
        let xg = g.tensor(x.clone(), tokens, hidden).unwrap();
        let rc = cpu
            .router_topk(
                &xc,
                &cpu.weight(router.clone(), experts, hidden).unwrap(),
                top_k,
            )
            .unwrap();
        let rg = g
            .router_topk(&xg, &g.weight(router, experts, hidden).unwrap(), top_k)
            .unwrap();
        let same = rc
            .experts
            .iter()
            .zip(&rg.experts)
            .filter(|(a, b)| a == b)
            .count();
        println!(
            "router {tag}: {same}/{} expert choices identical",
            rc.experts.len()
        );
        assert!(
            same * 100 >= rc.experts.len() * 95,
            "router {tag}: too many different choices"
        );
        // The experts themselves on the CPU's routes (so both sides do the same work).
        let mut wc = Vec::new();
        let mut wg = Vec::new();
        for e in 0..held as u32 {
            let (ga, u, d) = (
                bf(randn(&mut rng, inter * hidden, 0.02)),
                bf(randn(&mut rng, inter * hidden, 0.02)),
                bf(randn(&mut rng, hidden * inter, 0.02)),
            );
            wc.push((
                e,
                FfnWeights {
                    gate: cpu.weight(ga.clone(), inter, hidden).unwrap(),
                    up: cpu.weight(u.clone(), inter, hidden).unwrap(),
                    down: cpu.weight(d.clone(), hidden, inter).unwrap(),
                },
            ));
            wg.push((
                e,
                FfnWeights {
                    gate: g.weight(ga, inter, hidden).unwrap(),
                    up: g.weight(u, inter, hidden).unwrap(),
                    down: g.weight(d, hidden, inter).unwrap(),
                },
            ));
        }
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
        close(&format!("experts_ffn_add {tag}"), &dg, &dc);
        sort_matches_reference(&g, &rc, held);
        let secs = time(&g, 10, || {
            let mut r = g.tensor(x.clone(), tokens, hidden).unwrap();
            g.experts_ffn_add(&xg, &rc, &lg, &mut r).unwrap();
        });
        let touched: std::collections::BTreeSet<u32> = rc
            .experts
            .iter()
            .copied()
            .filter(|e| (*e as usize) < held)
            .collect();
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

fn sort_matches_reference(g: &CudaBackend, routes: &Routes, held: usize) {
    use switchyard_kernels::routing::sort_by_expert;
    let experts = routes.experts.iter().copied().max().unwrap() as usize + 1;
    let local_of: Vec<i32> = (0..experts)
        .map(|e| if e < held { e as i32 } else { -1 })
        .collect();
    let want = sort_by_expert(
        &routes.experts,
        &routes.weights,
        routes.top_k,
        &local_of,
        switchyard_kernels::geometry::MOE_TILE_ROWS,
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
    assert_eq!(
        &s.clone_dtoh(&sorted.pos_of).unwrap()[..routes.experts.len()],
        &want.pos_of[..]
    );
}

/// Logits of a prompt (prefill) and of four decode steps, CPU vs CUDA, for a model directory.
fn end_to_end(name: &str, config: &ModelConfig, prompt_len: usize) {
    let dir = tempfile::tempdir().unwrap();
    init::write_model_dir(dir.path(), config, 0, Dtype::BF16, None).unwrap();
    let ec = EngineConfig {
        kv_cache_bytes: 256 << 20,
        max_step_tokens: 4096,
        ..EngineConfig::default()
    };
    let mut cpu = Engine::load(CpuBackend, dir.path(), ec.clone()).unwrap();
    let mut g = gpu(config.head_dim, config.num_heads, config.num_kv_heads);
    g.set_poison(false); // the engine's whole-model path; poisoning is for the op checks
    let mut gpu_e = Engine::load(g, dir.path(), ec).unwrap();
    let mut rng = Rng::new(2);
    let mut tokens: Vec<u32> = (0..prompt_len)
        .map(|_| (rng.uniform() * config.vocab_size as f64) as u32)
        .collect();
    let mut start = 0;
    for step in 0..5 {
        let chunk = tokens[start..].to_vec();
        let lc = cpu
            .step_chunks(&[(0, &chunk, start, LogitsWanted::Last)])
            .unwrap();
        let t = Instant::now();
        let lg = gpu_e
            .step_chunks(&[(0, &chunk, start, LogitsWanted::Last)])
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        close(
            &format!("{name} step {step} ({} tokens) logits", chunk.len()),
            &lg[0],
            &lc[0],
        );
        timing(
            "engine_step",
            format!("{name} tokens={}", chunk.len()),
            secs,
            String::new(),
        );
        start = tokens.len();
        tokens.push(switchyard_scheduler::sampling::argmax(&lc[0]));
    }
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn tiny_mixtral_end_to_end() {
    end_to_end("tiny-mixtral", &init::preset("tiny-mixtral").unwrap(), 37);
    end_to_end("tiny-mistral", &init::preset("tiny-mistral").unwrap(), 40);
}

#[test]
#[ignore = "needs a GPU: kernels/gpu-check runs it"]
fn mixtral_shaped_layer_end_to_end() {
    // Mixtral-8x7B layer shapes; one layer so the CPU reference fits and finishes.
    let config = ModelConfig {
        arch: Arch::Mixtral,
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_layers: 1,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        max_position_embeddings: 32768,
        sliding_window: None,
        tie_word_embeddings: false,
        moe: Some(MoeConfig {
            num_experts: 8,
            top_k: 2,
        }),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: Some(Dtype::BF16),
    };
    end_to_end("mixtral-8x7b-shaped (1 layer)", &config, 300);
}
