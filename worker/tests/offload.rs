//! Expert offload (`--expert-memory`): any budget, down to one expert per layer, gives exactly
//! the all-resident outputs, for safetensors (f32, bf16) and GGUF (f32, Q8_0, Q4_K) experts;
//! a budget under one expert is refused with the minimum; a checkpoint truncated or removed
//! while served fails the request that needed it, not the process; routing statistics
//! written by one run choose the experts the next one keeps resident before traffic.

use std::path::{Path, PathBuf};

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_scheduler::{Completion, Request, SamplingParams};
use switchyard_worker::offload::Offload;
use switchyard_worker::{CpuBackend, Engine, EngineConfig, EngineError};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn engine(dir: &Path, offload: Option<Offload>) -> Result<Engine<CpuBackend>, EngineError> {
    engine_on(CpuBackend::default(), dir, offload)
}

fn engine_on(
    backend: CpuBackend,
    dir: &Path,
    offload: Option<Offload>,
) -> Result<Engine<CpuBackend>, EngineError> {
    let config = EngineConfig {
        block_size: 4,
        kv_cache_bytes: 1 << 20,
        offload,
        ..EngineConfig::default()
    };
    Engine::load(backend, dir, config)
}

fn budget(bytes: u64, prefetch: bool) -> Option<Offload> {
    Some(Offload {
        budget_bytes: bytes,
        prefetch,
        stats_file: None,
    })
}

/// Bytes of one expert as the CPU keeps it, and the number of MoE layers.
fn expert_bytes(dir: &Path) -> (u64, usize) {
    let e = engine(dir, budget(u64::MAX, false)).unwrap();
    let store = e.model().expert_store().expect("a MoE model offloads");
    (store.expert_bytes(), store.resident_per_layer().len())
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11) % 240 + 3)
        .collect()
}

/// Every position's logits of a 33-token prefill, then 6 decode steps of two sequences in one
/// batch (each step's logits), then two greedy completions with logprobs.
fn outputs(e: &mut Engine<CpuBackend>) -> (Vec<Vec<f32>>, Vec<Completion>) {
    let (a, b) = (prompt(33, 1), prompt(9, 2));
    let mut logits = e
        .step_chunks(&[
            (1, &a, 0, LogitsWanted::All),
            (2, &b, 0, LogitsWanted::Last),
        ])
        .unwrap();
    for i in 0..6 {
        let (ta, tb) = ([a[i] + 1], [b[i] + 2]);
        logits.extend(
            e.step_chunks(&[
                (1, &ta, a.len() + i, LogitsWanted::Last),
                (2, &tb, b.len() + i, LogitsWanted::Last),
            ])
            .unwrap(),
        );
    }
    e.release(1);
    e.release(2);
    let request = |id, prompt| Request {
        id,
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: 10,
            ignore_eos: true,
            logprobs: Some(3),
            ..SamplingParams::default()
        },
    };
    let done = e
        .run(vec![request(10, prompt(20, 3)), request(11, prompt(5, 4))])
        .unwrap();
    (logits, done)
}

fn assert_same(
    name: &str,
    what: &str,
    got: &(Vec<Vec<f32>>, Vec<Completion>),
    want: &(Vec<Vec<f32>>, Vec<Completion>),
) {
    // Bit for bit: the experts' sums are added in the same order whatever is resident.
    assert_eq!(
        got.0, want.0,
        "{name}, {what}: logits differ from all-resident"
    );
    for (g, w) in got.1.iter().zip(&want.1) {
        assert_eq!(g.token_ids, w.token_ids, "{name}, {what}: tokens differ");
        let (gl, wl) = (g.logprobs.as_ref().unwrap(), w.logprobs.as_ref().unwrap());
        for (x, y) in gl.iter().zip(wl) {
            assert!(
                (x.logprob - y.logprob).abs() <= 1e-6,
                "{name}, {what}: logprob {} vs {}",
                x.logprob,
                y.logprob
            );
        }
    }
}

#[test]
fn any_budget_gives_the_all_resident_outputs() {
    let bf16 = tempfile::tempdir().unwrap();
    write_model_dir(
        bf16.path(),
        &preset("tiny-mixtral").unwrap(),
        5,
        Dtype::BF16,
        None,
    )
    .unwrap();
    let models = [
        ("safetensors f32", fixture("hf/mixtral-window")),
        ("safetensors bf16", bf16.path().to_path_buf()),
        ("GGUF f32", fixture("llama-cpp/mixtral-f32")),
        ("GGUF Q8_0", fixture("llama-cpp/mixtral-q8_0")),
        ("GGUF Q4_K", fixture("llama-cpp/mixtral-q4_k_m")),
    ];
    for (name, dir) in models {
        let want = outputs(&mut engine(&dir, None).unwrap());
        let (expert, layers) = expert_bytes(&dir);
        let experts = preset("tiny-mixtral").unwrap().moe.unwrap().num_experts as u64;
        for (what, bytes, prefetch) in [
            ("one expert per layer", expert * layers as u64, false),
            (
                "one expert per layer, prefetch",
                expert * layers as u64,
                true,
            ),
            ("one expert in all", expert, true),
            (
                "half the experts",
                expert * experts * layers as u64 / 2,
                true,
            ),
            ("every expert", expert * experts * layers as u64, true),
        ] {
            let mut e = engine(&dir, budget(bytes, prefetch)).unwrap();
            let got = outputs(&mut e);
            assert_same(name, what, &got, &want);
            let store = e.model().expert_store().unwrap();
            let m = store.metrics();
            let resident: usize = store.resident_per_layer().iter().sum();
            assert!(
                resident as u64 * expert <= bytes,
                "{name}, {what}: over budget"
            );
            if bytes < expert * experts * layers as u64 {
                assert!(m.misses.get() > 0, "{name}, {what}: nothing was paged in");
                assert!(m.bytes_paged_in.get() >= expert, "{name}, {what}");
            } else {
                assert_eq!(
                    m.misses.get(),
                    0,
                    "{name}, {what}: every expert is resident"
                );
                assert!(m.hits.get() > 0, "{name}, {what}");
            }
        }
    }
}

/// `--dtype f32` (experts widened on every read) and 8-bit activations offload exactly too;
/// the budget counts experts as kept (f32: 4 bytes a value, whatever the file stores).
#[test]
fn widened_weights_and_q8_activations_offload_exactly() {
    let dir = fixture("llama-cpp/mixtral-q4_k_m");
    for backend in [
        CpuBackend::exact_f32(),
        CpuBackend::default().q8_activations(),
    ] {
        let want = outputs(&mut engine_on(backend, &dir, None).unwrap());
        let all = engine_on(backend, &dir, budget(u64::MAX, false)).unwrap();
        let store = all.model().expert_store().unwrap();
        let (expert, layers) = (store.expert_bytes(), store.resident_per_layer().len());
        drop(all);
        let mut e = engine_on(backend, &dir, budget(expert * layers as u64, true)).unwrap();
        assert_same(
            &format!("{backend:?}"),
            "one expert per layer",
            &outputs(&mut e),
            &want,
        );
        assert!(e.model().expert_store().unwrap().metrics().misses.get() > 0);
    }
    let widened = engine_on(CpuBackend::exact_f32(), &dir, budget(u64::MAX, false)).unwrap();
    let c = widened.model().config();
    let f32_expert = (3 * c.hidden_size * c.intermediate_size * 4) as u64;
    assert_eq!(
        widened.model().expert_store().unwrap().expert_bytes(),
        f32_expert
    );
    let stored = engine(&dir, budget(u64::MAX, false)).unwrap();
    assert!(stored.model().expert_store().unwrap().expert_bytes() < f32_expert / 4);
}

#[test]
fn a_budget_under_one_expert_is_refused_with_the_minimum() {
    let dir = fixture("llama-cpp/mixtral-q4_k_m");
    let (expert, _) = expert_bytes(&dir);
    let err = engine(&dir, budget(expert - 1, true))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("smaller than one expert")
            && err.contains(&format!("at least {expert} bytes")),
        "{err}"
    );
    assert!(engine(&dir, budget(expert, true)).is_ok());
}

#[test]
fn a_checkpoint_truncated_or_removed_while_served_fails_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    std::fs::copy(fixture("llama-cpp/mixtral-q8_0/model.gguf"), &file).unwrap();
    let (expert, layers) = expert_bytes(&file);
    let mut e = engine(&file, budget(expert * layers as u64, false)).unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 4)
        .unwrap();
    let a = prompt(30, 5);
    let err = e
        .step_chunks(&[(1, &a, 0, LogitsWanted::Last)])
        .expect_err("a truncated checkpoint fails the step")
        .to_string();
    assert!(err.contains("was the file truncated"), "{err}");
    e.release(1);

    std::fs::remove_file(&file).unwrap();
    let err = e
        .step_chunks(&[(2, &a, 0, LogitsWanted::Last)])
        .expect_err("a removed checkpoint fails the step")
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains("model.gguf"),
        "{err}"
    );
}

#[test]
fn statistics_of_one_run_warm_the_next() {
    let dir = fixture("llama-cpp/mixtral-q4_k_m");
    let stats = tempfile::tempdir().unwrap();
    let file = stats.path().join("experts.json");
    let (expert, layers) = expert_bytes(&dir);
    let offload = Offload {
        budget_bytes: expert * layers as u64,
        prefetch: true,
        stats_file: Some(file.clone()),
    };
    {
        let mut e = engine(&dir, Some(offload.clone())).unwrap();
        outputs(&mut e);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let scores: Vec<Vec<f64>> = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(scores.len(), layers);
    assert!(scores.iter().flatten().any(|s| *s > 0.0), "{json}");

    // As many experts as layers fit: the hottest ones over all layers are resident at load,
    // before any token.
    let e = engine(&dir, Some(offload)).unwrap();
    let store = e.model().expert_store().unwrap();
    let (mut kept, mut left) = (Vec::new(), Vec::new());
    for (l, row) in scores.iter().enumerate() {
        let resident = store.resident_experts(l);
        for (x, s) in row.iter().enumerate() {
            match resident.contains(&(x as u32)) {
                true => kept.push(*s),
                false => left.push(*s),
            }
        }
    }
    assert_eq!(kept.len(), layers);
    let coldest_kept = kept.iter().cloned().fold(f64::INFINITY, f64::min);
    let hottest_left = left.iter().cloned().fold(0.0, f64::max);
    assert!(coldest_kept >= hottest_left, "kept {kept:?}, left {left:?}");
    assert!(coldest_kept > 0.0, "kept {kept:?}");
}

/// A worker started with expert offload reports its budget, serves steps, counts hits and
/// misses; when its checkpoint is truncated under it, the step that needed a missing expert
/// fails with a status naming the read, the worker's ready gauge drops to 0, and the process
/// lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_truncated_checkpoint_fails_the_step_and_is_not_ready() {
    use switchyard_net::grpc::{channel, worker_client};
    use switchyard_proto::v1 as pb;
    use switchyard_worker::service::{spawn_worker, WorkerService};

    let model = tempfile::tempdir().unwrap();
    write_model_dir(
        model.path(),
        &preset("tiny-mixtral").unwrap(),
        1,
        Dtype::F32,
        None,
    )
    .unwrap();
    // tiny-mixtral in f32: experts of 3 × 64 × 128 × 4 bytes, 2 layers of 4.
    let expert = 3 * 64 * 128 * 4;
    let service = WorkerService::new(CpuBackend::default()).with_offload(Offload {
        budget_bytes: 2 * expert,
        prefetch: true,
        stats_file: None,
    });
    let metrics = service.metrics();
    let w = spawn_worker(
        service,
        "127.0.0.1:0".parse().unwrap(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let mut client = worker_client(channel(&w.address.to_string()).unwrap());
    let inventory = client
        .inventory(pb::InventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inventory.expert_memory_bytes, 2 * expert);
    client
        .assign(pb::Assignment {
            epoch: 1,
            model_dir: model.path().display().to_string(),
            layer_start: 0,
            layer_end: 2,
            experts: (0..4).collect(),
            embedding: true,
            head: true,
            kv_blocks: 32,
            block_size: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let step = |block: u32| pb::StepRequest {
        epoch: 1,
        seqs: vec![pb::SeqWork {
            tokens: prompt(12, block),
            block_table: vec![3 * block, 3 * block + 1, 3 * block + 2],
            logits: pb::LogitsWanted::LogitsLast as i32,
            draw: Some(pb::Draw::default()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = client.step(step(0)).await.unwrap().into_inner();
    assert!(r.results[0].token.is_some(), "{r:?}");
    let cache = &metrics.expert_cache;
    assert!(cache.misses.get() > 0 && cache.bytes_paged_in.get() >= expert);
    assert_eq!(metrics.ready.get(), 1.0);

    let file = model.path().join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let e = client.step(step(1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(
        e.message().starts_with("cannot read an offloaded expert")
            && e.message().contains("was the file truncated"),
        "{e}"
    );
    assert_eq!(metrics.ready.get(), 0.0);
    // The process and its gRPC server are still there.
    client.inventory(pb::InventoryRequest {}).await.unwrap();
}

#[test]
fn a_non_finite_expert_is_refused_at_load_even_when_not_kept() {
    use std::os::unix::fs::FileExt;
    use switchyard_model::safetensors::SafetensorsFile;

    let dir = tempfile::tempdir().unwrap();
    write_model_dir(
        dir.path(),
        &preset("tiny-mixtral").unwrap(),
        2,
        Dtype::F32,
        None,
    )
    .unwrap();
    let path = dir.path().join("model.safetensors");
    let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let at = {
        let f = SafetensorsFile::open(&path).unwrap();
        f.range(f.get(name).unwrap()).start + 4 * 5
    };
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&f32::NAN.to_le_bytes(), at as u64)
        .unwrap();
    // The budget keeps one expert: layer 1's expert 3 would only ever be read on demand.
    let expert = 3 * 64 * 128 * 4;
    let err = engine(dir.path(), budget(expert, true))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains(name) && err.contains("element 5") && err.contains("expected finite"),
        "{err}"
    );
}
