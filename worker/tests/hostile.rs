//! A worker that trusts no message (issue 18): each hostile `Worker` call the probe found is
//! sent by a real gRPC client to a running worker. Each gets a clean error naming what was
//! wrong, the worker keeps the part it held (a refused assignment leaves it exactly as it was,
//! fence included), and it still serves a step afterwards.

use std::path::Path;
use std::time::Duration;

use http_body_util::StreamBody;
use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_net::grpc::{channel, worker_client};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use switchyard_worker::service::{spawn_worker, WorkerService};
use switchyard_worker::CpuBackend;
use tonic::codegen::{Bytes, Service};
use tonic::transport::Channel;
use tonic::Code;

/// tiny-mixtral: 2 layers, 4 experts, vocabulary of 512.
fn assignment(epoch: u64, model: &Path) -> pb::Assignment {
    pb::Assignment {
        epoch,
        model_dir: model.display().to_string(),
        layer_start: 0,
        layer_end: 2,
        experts: (0..4).collect(),
        embedding: true,
        head: true,
        kv_blocks: 16,
        block_size: 4,
        ..Default::default()
    }
}

fn step(epoch: u64, seq: pb::SeqWork) -> pb::StepRequest {
    pb::StepRequest {
        epoch,
        seqs: vec![seq],
        ..Default::default()
    }
}

/// Three prompt tokens in block 0, drawing the next greedily.
fn seq() -> pb::SeqWork {
    pb::SeqWork {
        tokens: vec![1, 5, 9],
        block_table: vec![0],
        logits: pb::LogitsWanted::LogitsLast as i32,
        draw: Some(pb::Draw::default()),
        ..Default::default()
    }
}

struct Worker {
    client: WorkerClient<Channel>,
    address: String,
    model: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Worker {
    /// A worker whose model root holds one tiny-mixtral, assigned epoch 1.
    async fn start() -> Worker {
        let root = tempfile::tempdir().unwrap();
        let model = tempfile::tempdir_in(root.path()).unwrap();
        write_model_dir(
            model.path(),
            &preset("tiny-mixtral").unwrap(),
            1,
            Dtype::F32,
            None,
        )
        .unwrap();
        let service = WorkerService::with_model_root(CpuBackend::default(), root.path()).unwrap();
        let w = spawn_worker(
            service,
            "127.0.0.1:0".parse().unwrap(),
            std::future::pending(),
        )
        .await
        .unwrap();
        let address = w.address.to_string();
        let mut client = worker_client(channel(&address).unwrap());
        client
            .assign(assignment(1, model.path()))
            .await
            .expect("a well-formed assignment loads");
        Worker {
            client,
            address,
            model,
            _root: root,
        }
    }

    /// The worker still holds epoch 1, its fence is unmoved, and it runs a step.
    async fn still_serves(&mut self) {
        let inventory = self
            .client
            .inventory(pb::InventoryRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((inventory.epoch, inventory.fence), (1, 1), "{inventory:?}");
        let r = self.client.step(step(1, seq())).await.unwrap().into_inner();
        assert!(r.results[0].token.is_some(), "{r:?}");
    }

    async fn refused_step(&mut self, s: pb::SeqWork, expected: &str) {
        let e = self.client.step(step(1, s)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(expected), "{e}");
        self.still_serves().await;
    }

    async fn refused_assignment(&mut self, a: pb::Assignment, code: Code, expected: &str) {
        let e = self.client.assign(a).await.unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        assert!(e.message().contains(expected), "{e}");
        self.still_serves().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_steps_are_refused_and_the_worker_serves_on() {
    let mut w = Worker::start().await;
    w.still_serves().await;
    // 2^32 − 1 alternatives allocated 32 GiB and aborted the whole `serve`.
    let huge = pb::SeqWork {
        logprobs: Some(u32::MAX),
        ..seq()
    };
    w.refused_step(huge, "logprobs is 4294967295; expected at most 20")
        .await;
    let huge = pb::SeqWork {
        logits: pb::LogitsWanted::LogitsAll as i32,
        prompt_logprobs: Some(u32::MAX),
        prompt_targets: vec![5, 9],
        ..seq()
    };
    w.refused_step(huge, "prompt_logprobs is 4294967295").await;
    // Prompt targets past the chunk, or past the vocabulary, panicked on an index.
    let past = pb::SeqWork {
        logits: pb::LogitsWanted::LogitsAll as i32,
        prompt_logprobs: Some(1),
        prompt_targets: vec![5, 9, 1, 2, 3],
        ..seq()
    };
    w.refused_step(past, "5 prompt_targets for a chunk of 3 tokens")
        .await;
    let past = pb::SeqWork {
        logits: pb::LogitsWanted::LogitsAll as i32,
        prompt_logprobs: Some(1),
        prompt_targets: vec![5, 100_000],
        ..seq()
    };
    w.refused_step(past, "prompt target 100000 is out of range")
        .await;
    // Blocks the cache does not have, or no block for a position.
    let far = pb::SeqWork {
        block_table: vec![1_000_000],
        ..seq()
    };
    w.refused_step(far, "block 1000000; this part's KV cache has 16 blocks")
        .await;
    let none = pb::SeqWork {
        block_table: vec![],
        ..seq()
    };
    w.refused_step(none, "the block table has 0 blocks").await;
    let late = pb::SeqWork {
        start_pos: u32::MAX - 1,
        ..seq()
    };
    w.refused_step(late, "the model has 4096 positions").await;
    // More tokens than the KV cache holds (16 blocks of 4).
    let long = |first: u32| pb::SeqWork {
        tokens: vec![1; 40],
        block_table: (first..first + 10).collect(),
        ..seq()
    };
    let e = w
        .client
        .step(pb::StepRequest {
            epoch: 1,
            seqs: vec![long(0), long(6)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("80 tokens; this part's KV cache holds 64"),
        "{e}"
    );
    // An exchange call for a layer or routing this worker does not have.
    let x = pb::Tensor {
        rows: 1,
        cols: 64,
        data: vec![0; 256],
    };
    let batch = |layer: u32, top_k: u32| pb::ExpertBatch {
        epoch: 1,
        layer,
        x: Some(x.clone()),
        top_k,
        experts: vec![0; top_k as usize],
        weights: vec![0.5; top_k as usize],
    };
    let e = w.client.run_experts(batch(7, 2)).await.unwrap_err();
    assert!(e.message().contains("layer 7"), "{e}");
    let e = w.client.run_experts(batch(0, 3)).await.unwrap_err();
    assert!(
        e.message()
            .contains("top_k is 3; the model routes each token to 2"),
        "{e}"
    );
    // A million routes is more than any step of this part carries: refused unread.
    let e = w.client.run_experts(batch(0, 1_000_000)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    w.client.run_experts(batch(0, 2)).await.unwrap();
    w.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_assignments_leave_the_worker_as_it_was() {
    let mut w = Worker::start().await;
    let model = w.model.path().to_path_buf();
    // kv_blocks = 2^32 − 1 aborted on an 8.8 TB allocation.
    let a = pb::Assignment {
        kv_blocks: u32::MAX,
        ..assignment(2, &model)
    };
    w.refused_assignment(a, Code::ResourceExhausted, "of KV cache")
        .await;
    // Epoch 2^64 − 1 with a model that does not exist dropped the part and raised the fence:
    // the cluster re-planned without end.
    let a = pb::Assignment {
        model_dir: "/nonexistent/model".into(),
        ..assignment(u64::MAX, &model)
    };
    w.refused_assignment(a, Code::InvalidArgument, "is not a model directory under")
        .await;
    // A block of 0 tokens was accepted; the next step divided by zero holding the KV lock,
    // and every step after it failed on the poisoned lock.
    let a = pb::Assignment {
        block_size: 0,
        ..assignment(2, &model)
    };
    w.refused_assignment(a, Code::InvalidArgument, "block_size is 0")
        .await;
    let a = pb::Assignment {
        layer_end: 9,
        ..assignment(2, &model)
    };
    w.refused_assignment(a, Code::InvalidArgument, "layers 0..9")
        .await;
    let a = pb::Assignment {
        experts: vec![0, 4_000_000],
        ..assignment(2, &model)
    };
    w.refused_assignment(a, Code::InvalidArgument, "expert 4000000")
        .await;
    // A new epoch that passes every check loads, and moves the fence.
    w.client.assign(assignment(2, &model)).await.unwrap();
    let r = w.client.step(step(2, seq())).await.unwrap().into_inner();
    assert!(r.results[0].token.is_some());
    let e = w.client.step(step(1, seq())).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
}

/// Paths outside the model root, through `..` or a symbolic link, and paths that do not exist
/// get one and the same answer: nothing about other files (whether they exist, their size,
/// their first bytes) comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_paths_stay_under_the_root_and_errors_tell_nothing_of_other_files() {
    let mut w = Worker::start().await;
    let model = w.model.path().to_path_buf();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("secret"),
        b"\x10\0\0\0\0\0\0\0{\"hunter2\": 1}",
    )
    .unwrap();
    std::fs::create_dir(outside.path().join("m")).unwrap();
    std::fs::copy(
        model.join("config.json"),
        outside.path().join("m/config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        outside.path().join("m/model.safetensors"),
    )
    .unwrap();
    // A link out of the root, whole or file by file.
    let linked_dir = model.parent().unwrap().join("linked");
    std::os::unix::fs::symlink(outside.path().join("m"), &linked_dir).unwrap();
    let inside = tempfile::tempdir_in(model.parent().unwrap()).unwrap();
    std::fs::copy(model.join("config.json"), inside.path().join("config.json")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        inside.path().join("model.safetensors"),
    )
    .unwrap();
    let mut messages = Vec::new();
    for dir in [
        outside.path().join("m").display().to_string(),
        linked_dir.display().to_string(),
        inside.path().display().to_string(),
        format!("{}/../../{}", model.display(), outside.path().display()),
        "/nonexistent".into(),
        "/etc".into(),
    ] {
        let a = pb::Assignment {
            model_dir: dir.clone(),
            ..assignment(2, &model)
        };
        let e = w.client.assign(a).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{dir}: {e}");
        assert!(!e.message().contains("hunter2"), "{dir}: {e}");
        messages.push(e.message().replace(&dir, "DIR"));
        w.still_serves().await;
    }
    assert!(
        messages.iter().all(|m| m == &messages[0]),
        "the answers differ: {messages:#?}"
    );
    assert!(
        messages[0].contains("is not a model directory under"),
        "{}",
        messages[0]
    );
}

/// A message larger than the part's largest step is refused from its 5-byte length prefix:
/// the answer comes while the body has not even been sent (a 300 MB message was buffered,
/// peaking at 600 MB, before being refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_from_its_prefix() {
    let mut w = Worker::start().await;
    let mut prefix = vec![0u8];
    prefix.extend(300_000_000u32.to_be_bytes());
    let frames = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from(
            prefix,
        )))]),
        tokio_stream::pending(),
    );
    let request = tonic::codegen::http::Request::post(format!(
        "http://{}/switchyard.v1.Worker/Step",
        w.address
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(tonic::body::Body::new(StreamBody::new(frames)))
    .unwrap();
    let mut raw = channel(&w.address).unwrap();
    std::future::poll_fn(|cx| raw.poll_ready(cx)).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), raw.call(request))
        .await
        .expect("refused without waiting for the body")
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header("grpc-status"), "8", "RESOURCE_EXHAUSTED");
    assert!(
        header("grpc-message").contains("300000000"),
        "{}",
        header("grpc-message")
    );
    w.still_serves().await;
}
