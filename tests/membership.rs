//! Membership and faults with a real etcd and real processes: workers registering under
//! leases, coordinators electing a leader, re-planning as workers come, die (killed or
//! frozen), drain or etcd itself goes away. Every request either completes with exactly its
//! undisturbed output (greedy) or ends with `UNAVAILABLE` and a reason; none hangs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    etcd_coordinator, etcd_worker, four_layers_eight_experts, model, offline, request, runtime,
    signal, wait_exit, EtcdServer, Proc,
};
use prost::Message;
use switchyard_coordinator::cluster::warm_up_step;
use switchyard_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Each test runs a dozen processes on a 2-core machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every test here starts from: the serial lock, a model (Mixtral, 4 layers, 8 experts)
/// in a temporary directory, `n` requests with their undisturbed outputs, an etcd and a runtime.
fn setup(
    n: usize,
) -> (
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<Cases>,
    EtcdServer,
    tokio::runtime::Runtime,
) {
    let serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model(&dir, "tiny-mixtral", four_layers_eight_experts);
    let cases = cases(&dir, n);
    (serial, tmp, dir, cases, EtcdServer::start(), runtime())
}

/// The requests the load cycles through, and each one's output alone on the offline engine.
struct Cases {
    requests: Vec<(Vec<u32>, u32)>,
    outputs: Vec<Vec<u32>>,
}

fn cases(dir: &std::path::Path, n: usize) -> Arc<Cases> {
    let requests: Vec<(Vec<u32>, u32)> = (0..n)
        .map(|i| {
            let prompt = (0..8 + (i * 7) % 33)
                .map(|j| ((j * 31 + i * 97) % 400 + 3) as u32)
                .collect();
            (prompt, 8 + (i as u32 * 5) % 25)
        })
        .collect();
    let outputs = offline(dir, &requests, None)
        .into_iter()
        .map(|c| c.token_ids)
        .collect();
    Arc::new(Cases { requests, outputs })
}

/// How one attempt at a request ended.
enum End {
    Done(Vec<u32>),
    /// With the status and how many tokens had come before it.
    Failed(tonic::Status, usize),
    /// Nothing came for longer than the client waits.
    Hung,
}

/// Longer than any recovery may take: a stream silent this long hangs.
const HANG: Duration = Duration::from_secs(40);

async fn attempt(address: &str, r: pb::GenerateRequest) -> End {
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => return End::Failed(tonic::Status::unavailable(e.to_string()), 0),
    };
    let mut client = pb::inference_client::InferenceClient::new(channel);
    let mut stream = match tokio::time::timeout(HANG, client.generate(r)).await {
        Ok(Ok(s)) => s.into_inner(),
        Ok(Err(s)) => return End::Failed(s, 0),
        Err(_) => return End::Hung,
    };
    let mut tokens = Vec::new();
    loop {
        match tokio::time::timeout(HANG, stream.message()).await {
            Ok(Ok(Some(m))) => {
                tokens.extend(m.token_ids);
                if !m.finish_reason.is_empty() {
                    return End::Done(tokens);
                }
            }
            Ok(Ok(None)) => {
                return End::Failed(tonic::Status::unknown("ended without a finish reason"), 0)
            }
            Ok(Err(s)) => return End::Failed(s, tokens.len()),
            Err(_) => return End::Hung,
        }
    }
}

/// Which failures a client retries (on the next coordinator address).
#[derive(Clone, Copy, PartialEq)]
enum Retry {
    /// None: every failure counts.
    Never,
    /// Refusals before any token (a standby, a draining or unreachable coordinator).
    Refused,
    /// Any failure: the client reconnects and asks again.
    Always,
}

#[derive(Default, Debug)]
struct Tally {
    completed: usize,
    mismatched: Vec<String>,
    /// Requests that ended with UNAVAILABLE (and were not retried), with the reason.
    unavailable: Vec<String>,
    other_errors: Vec<String>,
    hung: usize,
    retried: usize,
}

/// `streams` clients sending requests one after another until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        rt: &tokio::runtime::Runtime,
        addresses: Vec<String>,
        cases: Arc<Cases>,
        streams: usize,
        retry: Retry,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tasks = (0..streams)
            .map(|s| {
                let (stop, tally, cases) = (stop.clone(), tally.clone(), cases.clone());
                let addresses = addresses.clone();
                rt.spawn(async move {
                    let mut k = s;
                    let mut at = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let i = k % cases.requests.len();
                        let (prompt, max) = &cases.requests[i];
                        let give_up = Instant::now() + Duration::from_secs(60);
                        loop {
                            let end = attempt(&addresses[at], request(prompt, *max)).await;
                            let again = {
                                let mut t = tally.lock().unwrap();
                                match end {
                                    End::Done(tokens) if tokens == cases.outputs[i] => {
                                        t.completed += 1;
                                        false
                                    }
                                    End::Done(tokens) => {
                                        t.mismatched.push(format!(
                                            "request {i}: {tokens:?} instead of {:?}",
                                            cases.outputs[i]
                                        ));
                                        false
                                    }
                                    End::Hung => {
                                        t.hung += 1;
                                        false
                                    }
                                    End::Failed(status, got) => {
                                        let retry = match retry {
                                            Retry::Never => false,
                                            Retry::Refused => {
                                                got == 0 && status.code() == Code::Unavailable
                                            }
                                            Retry::Always => true,
                                        };
                                        if retry && Instant::now() < give_up {
                                            t.retried += 1;
                                            true
                                        } else {
                                            let what = format!(
                                                "request {i} after {got} tokens: {:?} {}",
                                                status.code(),
                                                status.message()
                                            );
                                            match status.code() {
                                                Code::Unavailable => t.unavailable.push(what),
                                                _ => t.other_errors.push(what),
                                            }
                                            false
                                        }
                                    }
                                }
                            };
                            if !again {
                                break;
                            }
                            at = (at + 1) % addresses.len();
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        k += streams;
                    }
                })
            })
            .collect();
        Load { stop, tally, tasks }
    }

    /// Finishes the load and asserts it clean: nothing hung, mismatched, failed or
    /// `UNAVAILABLE`.
    fn finish_clean(self, rt: &tokio::runtime::Runtime, name: &str) -> Tally {
        let t = self.finish(rt);
        assert_clean(name, &t);
        assert!(t.unavailable.is_empty(), "{name}: {:?}", t.unavailable);
        t
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(async {
            for t in self.tasks {
                t.await.unwrap();
            }
        });
        Arc::try_unwrap(self.tally).unwrap().into_inner().unwrap()
    }
}

async fn status(address: &str) -> Option<pb::ClusterStatusResponse> {
    let mut c = pb::inference_client::InferenceClient::connect(format!("http://{address}"))
        .await
        .ok()?;
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        c.cluster_status(pb::ClusterStatusRequest {}),
    )
    .await
    .ok()?;
    r.ok().map(|r| r.into_inner())
}

/// The health service's answer, or `None` when there is none within 2 s.
async fn health(address: &str) -> Option<ServingStatus> {
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(r.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// Waits (up to `limit`) until `address`'s cluster status satisfies `f`; how long it took.
fn wait_status(
    rt: &tokio::runtime::Runtime,
    address: &str,
    limit: Duration,
    what: &str,
    f: impl Fn(&pb::ClusterStatusResponse) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        let s = rt.block_on(status(address));
        if s.as_ref().is_some_and(&f) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "not {what} within {limit:?}; last status: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn grid_of(s: &pb::ClusterStatusResponse) -> String {
    format!("{}x{}", s.stages, s.shards)
}

/// Waits (up to `limit`) until `address` serves a complete `grid`; how long it took.
fn wait_grid(
    rt: &tokio::runtime::Runtime,
    address: &str,
    limit: Duration,
    grid: &'static str,
) -> Duration {
    wait_status(rt, address, limit, grid, serving_grid(grid))
}

fn serving_grid(grid: &'static str) -> impl Fn(&pb::ClusterStatusResponse) -> bool {
    move |s| grid_of(s) == grid && s.workers.len() == s.lanes.len() * s.stages as usize
}

fn assert_clean(name: &str, t: &Tally) {
    println!("{name}: {t:?}");
    assert_eq!(t.hung, 0, "{name}: requests hung");
    assert!(
        t.mismatched.is_empty(),
        "{name}: outputs differ: {:?}",
        t.mismatched
    );
    assert!(
        t.other_errors.is_empty(),
        "{name}: errors: {:?}",
        t.other_errors
    );
    assert!(t.completed > 0, "{name}: nothing completed");
}

#[test]
fn workers_register_and_the_placement_grows_under_load() {
    let (_serial, _tmp, dir, cases, etcd, rt) = setup(32);

    // No worker yet: not serving; a request waits (bounded by its deadline), never hangs.
    let c = etcd_coordinator(&dir, &etcd.url, "grow", "2x3", &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rt.block_on(health(&c.address)),
        Some(ServingStatus::NotServing)
    );
    let e = rt.block_on(async {
        let mut cl = common::client(&c.address).await;
        let mut r = tonic::Request::new(request(&[5, 6, 7], 4));
        r.set_timeout(Duration::from_millis(800));
        let ended = async {
            match cl.generate(r).await {
                Ok(s) => s.into_inner().message().await.unwrap_err(),
                Err(s) => s,
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the request's deadline was not enforced")
    });
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");

    // Four workers: a 2×2 placement (2×3 needs six), published in etcd with its epoch.
    let mut workers: Vec<Proc> = (0..4)
        .map(|_| etcd_worker(&etcd.url, "grow", &[]))
        .collect();
    let took = wait_grid(&rt, &c.address, Duration::from_secs(30), "2x2");
    println!("4 workers registered → serving 2x2 after {took:?}");
    assert_eq!(
        rt.block_on(health(&c.address)),
        Some(ServingStatus::Serving)
    );
    let s = rt.block_on(status(&c.address)).unwrap();
    let record = rt.block_on(async {
        let etcd = switchyard_net::etcd::Etcd::connect(&etcd.url).unwrap();
        etcd.get("/switchyard/grow/placement")
            .await
            .unwrap()
            .unwrap()
    });
    let record = pb::PlacementRecord::decode(record.as_slice()).unwrap();
    assert_eq!(record.epoch, s.placement_epoch);
    assert_eq!((record.stages, record.shards), (2, 2));
    let mut in_status: Vec<String> = s.workers.iter().map(|w| w.address.clone()).collect();
    let mut in_record = record.workers.clone();
    in_status.sort();
    in_record.sort();
    assert_eq!(in_status, in_record);
    assert!(s.workers.iter().all(|w| w.ready));

    // Under load: a fifth worker is a spare (no 5-cell grid within 2×3); a sixth makes 2×3.
    let load = Load::start(&rt, vec![c.address.clone()], cases, 16, Retry::Never);
    std::thread::sleep(Duration::from_secs(2));
    workers.push(etcd_worker(&etcd.url, "grow", &[]));
    std::thread::sleep(Duration::from_secs(2));
    let s = rt.block_on(status(&c.address)).unwrap();
    assert_eq!(grid_of(&s), "2x2", "a spare does not change the grid");
    workers.push(etcd_worker(&etcd.url, "grow", &[]));
    let took = wait_grid(&rt, &c.address, Duration::from_secs(30), "2x3");
    println!("sixth worker → serving 2x3 after {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    let moved = rt.block_on(status(&c.address)).unwrap().requests_moved;
    let t = load.finish(&rt);
    assert!(moved > 0, "growing under load moves the requests in flight");
    assert_clean("grow", &t);
    assert!(t.unavailable.is_empty(), "{:?}", t.unavailable);
}

#[test]
fn chaos_workers_killed_frozen_and_replaced_under_load() {
    let (_serial, _tmp, dir, cases, etcd, rt) = setup(64);
    let mut workers: Vec<Proc> = (0..4)
        .map(|_| etcd_worker(&etcd.url, "chaos", &[]))
        .collect();
    let c = etcd_coordinator(
        &dir,
        &etcd.url,
        "chaos",
        "2x2",
        &["--recovery-timeout-s", "20"],
    );
    wait_grid(&rt, &c.address, Duration::from_secs(30), "2x2");

    let started = Instant::now();
    let load = Load::start(&rt, vec![c.address.clone()], cases, 32, Retry::Never);
    let mut detections = Vec::new();
    let mut recoveries = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_secs(10));
        let s = rt.block_on(status(&c.address)).unwrap();
        let victim_address = s.workers[round % s.workers.len()].address.clone();
        let v = workers
            .iter()
            .position(|w| w.address == victim_address)
            .unwrap();
        let mut victim = workers.remove(v);
        // Round 1 freezes the worker (it stops answering but its connections stay open).
        let how = if round == 1 { "STOP" } else { "KILL" };
        signal(&victim.child, how);
        let epoch = s.placement_epoch;
        let detected = wait_status(
            &rt,
            &c.address,
            Duration::from_secs(20),
            "re-planned",
            |s| {
                s.placement_epoch > epoch
                    && !s.workers.is_empty()
                    && s.workers.iter().all(|w| w.address != victim_address)
            },
        );
        println!("round {round}: SIG{how} → serving on the rest after {detected:?}");
        detections.push(detected);
        if how == "STOP" {
            signal(&victim.child, "KILL");
        }
        let _ = victim.child.wait();
        std::thread::sleep(Duration::from_secs(3));
        let t0 = Instant::now();
        workers.push(etcd_worker(&etcd.url, "chaos", &[]));
        wait_status(
            &rt,
            &c.address,
            Duration::from_secs(30),
            "2x2 again",
            serving_grid("2x2"),
        );
        let recovered = t0.elapsed();
        println!("round {round}: replacement started → serving 2x2 after {recovered:?}");
        recoveries.push(recovered);
    }
    std::thread::sleep(Duration::from_secs(8));
    let moved = rt.block_on(status(&c.address)).unwrap().requests_moved;
    let t = load.finish(&rt);
    let elapsed = started.elapsed();
    println!(
        "chaos: {:.0} s, 32 streams, 3 workers lost: {} completed (all equal to their undisturbed outputs; {moved} of them moved and recomputed), {} UNAVAILABLE, {} hung; detection {:?}, recovery {:?}",
        elapsed.as_secs_f64(),
        t.completed,
        t.unavailable.len(),
        t.hung,
        detections,
        recoveries
    );
    assert_clean("chaos", &t);
    // Every loss and every replacement moved the requests in flight.
    assert!(moved >= 6, "{moved} requests moved");
    for u in &t.unavailable {
        let reason = u.split_once("Unavailable ").map_or("", |(_, m)| m.trim());
        assert!(!reason.is_empty(), "UNAVAILABLE without a reason: {u}");
    }
    assert!(
        recoveries.iter().all(|r| *r < Duration::from_secs(20)),
        "{recoveries:?}"
    );
}

/// One generation through `address` with `x-request-id` metadata: the tokens, the request id
/// the replies carried, and who served it (the leader's address when it was forwarded).
async fn generate_with_id(
    address: &str,
    r: pb::GenerateRequest,
    id: &str,
) -> Result<(Vec<u32>, String, Option<String>), tonic::Status> {
    let mut client = common::client(address).await;
    let mut call = tonic::Request::new(r);
    call.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    call.set_timeout(Duration::from_secs(30));
    let reply = client.generate(call).await?;
    let served_by = reply
        .metadata()
        .get(switchyard_coordinator::forward::SERVED_BY)
        .map(|v| v.to_str().unwrap().to_string());
    let mut stream = reply.into_inner();
    let (mut tokens, mut ids) = (Vec::new(), String::new());
    while let Some(m) = stream.message().await? {
        tokens.extend(m.token_ids);
        ids = m.request_id;
    }
    Ok((tokens, ids, served_by))
}

#[test]
fn a_standby_coordinator_forwards_then_takes_over_when_the_leader_dies() {
    let (_serial, _tmp, dir, cases, etcd, rt) = setup(16);
    let _workers: Vec<Proc> = (0..2).map(|_| etcd_worker(&etcd.url, "ha", &[])).collect();
    let mut a = etcd_coordinator(&dir, &etcd.url, "ha", "1x2", &[]);
    wait_grid(&rt, &a.address, Duration::from_secs(30), "1x2");
    let b = etcd_coordinator(&dir, &etcd.url, "ha", "1x2", &[]);
    // The standby is not ready (it leads no placement) but answers: ClusterStatus and
    // Generate are the leader's, forwarded, with the client's request id.
    wait_status(
        &rt,
        &b.address,
        Duration::from_secs(10),
        "forwarded",
        serving_grid("1x2"),
    );
    assert_eq!(
        rt.block_on(health(&b.address)),
        Some(ServingStatus::NotServing)
    );
    let (prompt, max) = &cases.requests[3];
    let (tokens, id, served_by) = rt
        .block_on(generate_with_id(
            &b.address,
            request(prompt, *max),
            "via-standby-1",
        ))
        .unwrap();
    assert_eq!(tokens, cases.outputs[3]);
    assert_eq!(
        id, "via-standby-1",
        "the leader saw the client's x-request-id"
    );
    assert_eq!(served_by.as_deref(), Some(a.address.as_str()));
    // The HTTP API of the standby forwards too: the same completion as the leader's.
    let body = r#"{"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": true}"#;
    let (code_a, via_a) = common::http(&common::http_address(&a), "POST", "/v1/completions", body);
    let (code_b, via_b) = common::http(&common::http_address(&b), "POST", "/v1/completions", body);
    assert_eq!((code_a, code_b), (200, 200), "{via_a} / {via_b}");
    let text = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["choices"][0]["text"].clone()
    };
    assert_eq!(text(&via_a), text(&via_b));
    // A request already forwarded once is refused, not forwarded again.
    let e = rt.block_on(async {
        let mut cl = common::client(&b.address).await;
        let mut r = tonic::Request::new(pb::ListModelsRequest {});
        r.metadata_mut().insert(
            switchyard_coordinator::forward::FORWARDED,
            "10.9.9.9:1".parse().unwrap(),
        );
        cl.list_models(r).await.unwrap_err()
    });
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("already forwarded"), "{}", e.message());

    // Clients of the standby only: forwarded while the leader lives; when it dies, streams
    // it carried end with UNAVAILABLE and are asked again, then the standby serves itself.
    let load = Load::start(
        &rt,
        vec![b.address.clone()],
        cases.clone(),
        8,
        Retry::Always,
    );
    std::thread::sleep(Duration::from_secs(3));
    let before = load.tally.lock().unwrap().completed;
    assert!(before > 0, "nothing completed through the standby");
    signal(&a.child, "KILL");
    let killed = Instant::now();
    let _ = a.child.wait();
    // A client of the standby succeeds once it leads; until then it is told why not.
    let mut refusals = Vec::new();
    let failover = loop {
        match rt.block_on(attempt(&b.address, request(&[5, 6], 2))) {
            End::Done(_) => break killed.elapsed(),
            End::Failed(s, _) => refusals.push(format!("{:?}: {}", s.code(), s.message())),
            End::Hung => panic!("a request to the standby hung"),
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no failover");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("leader killed → the standby serves after {failover:?}");
    assert!(
        refusals.iter().any(|r| r.contains(&a.address)),
        "no refusal names the dead leader: {refusals:?}"
    );
    for r in &refusals {
        assert!(r.starts_with("Unavailable"), "{r}");
    }
    let (tokens, id, served_by) = rt
        .block_on(generate_with_id(
            &b.address,
            request(prompt, *max),
            "via-standby-2",
        ))
        .unwrap();
    assert_eq!(tokens, cases.outputs[3]);
    assert_eq!(id, "via-standby-2");
    assert_eq!(served_by, None, "the ex-standby serves itself");
    assert_eq!(
        rt.block_on(health(&b.address)),
        Some(ServingStatus::Serving)
    );
    std::thread::sleep(Duration::from_secs(3));
    let t = load.finish(&rt);
    println!("through the standby: {before} completed before the leader died");
    assert_clean("failover", &t);
    assert!(t.completed > before, "nothing completed after the failover");
    assert!(t.unavailable.is_empty(), "{:?}", t.unavailable);
    assert!(failover < Duration::from_secs(10), "{failover:?}");
}

#[test]
fn a_published_placement_fences_older_epochs_and_releases_workers_left_out() {
    let (_serial, _tmp, dir, _cases, etcd, rt) = setup(1);
    let w = etcd_worker(&etcd.url, "fence", &[]);
    let assign = |epoch: u64| pb::Assignment {
        epoch,
        model_dir: dir.display().to_string(),
        stage: 0,
        shard: 0,
        layer_start: 0,
        layer_end: 4,
        experts: (0..8).collect(),
        embedding: true,
        head: true,
        kv_blocks: 8,
        block_size: 16,
        stage_peers: vec![w.address.clone()],
        expert_shard: vec![0; 8],
        next_stage: String::new(),
        exchange_timeout_ms: 0,
    };
    let url = etcd.url.clone();
    let publish = |epoch: u64, workers: Vec<String>| {
        let url = url.clone();
        async move {
            let etcd = switchyard_net::etcd::Etcd::connect(&url).unwrap();
            let record = pb::PlacementRecord {
                epoch,
                stages: 1,
                shards: 1,
                workers,
                model: "m".into(),
                leader: "127.0.0.1:1".into(),
            };
            etcd.put("/switchyard/fence/placement", record.encode_to_vec(), 0)
                .await
                .unwrap();
        }
    };
    rt.block_on(async {
        let mut c = pb::worker_client::WorkerClient::connect(format!("http://{}", w.address))
            .await
            .unwrap();
        c.assign(assign(3)).await.unwrap();
        c.step(warm_up_step(3)).await.unwrap();
        let inventory = |mut c: pb::worker_client::WorkerClient<_>| async move {
            c.inventory(pb::InventoryRequest {})
                .await
                .unwrap()
                .into_inner()
        };
        let probe = c.clone();
        let wait_for = move |what: &'static str, f: fn(&pb::InventoryResponse) -> bool| {
            let c = probe.clone();
            async move {
                let t = Instant::now();
                loop {
                    let r = inventory(c.clone()).await;
                    if f(&r) {
                        return t.elapsed();
                    }
                    assert!(t.elapsed() < Duration::from_secs(10), "not {what}: {r:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };

        // A newer placement that includes the worker: steps of epoch 3 are refused at once,
        // before any assignment of epoch 4 arrives; the part stays.
        publish(4, vec![w.address.clone()]).await;
        let took = wait_for("fenced at 4", |r| r.fence == 4).await;
        println!("placement 4 published → the worker fences epoch 3 off after {took:?}");
        let e = c.step(warm_up_step(3)).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e}");
        assert!(
            e.message().contains("epoch 3") && e.message().contains("epoch 4"),
            "{e}"
        );
        assert_eq!(
            inventory(c.clone()).await.epoch,
            3,
            "a worker included keeps its part"
        );
        // A stale leader's assignment is refused too.
        let e = c.assign(assign(2)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(
            e.message().contains("epoch 2") && e.message().contains("epoch 4"),
            "{e}"
        );

        // A placement that leaves it out: its part is dropped, it reports not ready.
        publish(5, vec!["127.0.0.1:9".into()]).await;
        let took = wait_for("released", |r| r.epoch == 0 && r.fence == 5).await;
        println!("placement 5 leaves the worker out → released after {took:?}");
        let e = c.step(warm_up_step(3)).await.unwrap_err();
        assert!(e.message().contains("epoch 5"), "{e}");
        let e = c.step(warm_up_step(5)).await.unwrap_err();
        assert!(e.message().contains("no assignment"), "{e}");
        // Assigned again (epoch 6), it serves.
        c.assign(assign(6)).await.unwrap();
        c.step(warm_up_step(6)).await.unwrap();
    });
}

#[test]
fn draining_a_worker_or_the_coordinator_fails_no_request() {
    let (_serial, _tmp, dir, cases, etcd, rt) = setup(32);
    // Three workers for a 1×2 grid: one spare.
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| etcd_worker(&etcd.url, "drain", &["--drain-grace-s", "30"]))
        .collect();
    let extra = ["--drain-grace-s", "20"];
    let mut a = etcd_coordinator(&dir, &etcd.url, "drain", "1x2", &extra);
    wait_grid(&rt, &a.address, Duration::from_secs(30), "1x2");
    let b = etcd_coordinator(&dir, &etcd.url, "drain", "1x2", &extra);
    let load = Load::start(
        &rt,
        vec![a.address.clone(), b.address.clone()],
        cases,
        16,
        Retry::Refused,
    );
    std::thread::sleep(Duration::from_secs(3));

    // SIGTERM to a worker of the placement: its lane drains, the spare takes its place, it
    // is released and exits 0.
    let s = rt.block_on(status(&a.address)).unwrap();
    let v = workers
        .iter()
        .position(|w| w.address == s.workers[0].address)
        .unwrap();
    let drained = workers[v].address.clone();
    signal(&workers[v].child, "TERM");
    let code = wait_exit(&mut workers[v].child, Duration::from_secs(40));
    assert_eq!(code, Some(0), "the drained worker's exit");
    wait_status(
        &rt,
        &a.address,
        Duration::from_secs(10),
        "re-planned",
        |s| serving_grid("1x2")(s) && s.workers.iter().all(|w| w.address != drained),
    );

    // SIGTERM to the leading coordinator: it finishes what it runs, refuses the rest
    // (clients go to the standby), resigns and exits 0; the standby takes over.
    std::thread::sleep(Duration::from_secs(2));
    signal(&a.child, "TERM");
    let code = wait_exit(&mut a.child, Duration::from_secs(30));
    assert_eq!(code, Some(0), "the drained coordinator's exit");
    wait_status(
        &rt,
        &b.address,
        Duration::from_secs(15),
        "the standby leads",
        serving_grid("1x2"),
    );
    std::thread::sleep(Duration::from_secs(3));
    load.finish_clean(&rt, "drain");
}

#[test]
fn serving_continues_while_etcd_is_down() {
    let (_serial, _tmp, dir, cases, mut etcd, rt) = setup(16);
    let mut workers: Vec<Proc> = (0..2)
        .map(|_| etcd_worker(&etcd.url, "down", &[]))
        .collect();
    let c = etcd_coordinator(&dir, &etcd.url, "down", "1x3", &[]);
    wait_grid(&rt, &c.address, Duration::from_secs(30), "1x2");
    let load = Load::start(&rt, vec![c.address.clone()], cases, 8, Retry::Never);
    std::thread::sleep(Duration::from_secs(2));
    // Down for three lease lifetimes.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(6));
    let s = rt.block_on(status(&c.address)).unwrap();
    assert_eq!(grid_of(&s), "1x2", "the placement stays while etcd is down");
    etcd.start_again();
    // Changes resume: a third worker grows the grid to 1×3.
    std::thread::sleep(Duration::from_secs(2));
    workers.push(etcd_worker(&etcd.url, "down", &[]));
    wait_grid(&rt, &c.address, Duration::from_secs(30), "1x3");
    std::thread::sleep(Duration::from_secs(2));
    load.finish_clean(&rt, "etcd down");
}
