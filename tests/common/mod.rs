//! Real processes on loopback for the end-to-end tests: workers and coordinators started from
//! the built `switchyard` binary, killed when dropped.

#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_model::{ModelConfig, MoeConfig};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_scheduler::{Completion, Request, SamplingParams};
use switchyard_worker::{CpuBackend, Engine, EngineConfig};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The Python with `openai` and `grpc_reflection` installed: `scripts/test.sh` makes it
/// (scripts/python-env.sh).
pub fn python() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/switchyard/py-venv/bin/python")
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh, which installs the openai and grpcio packages (scripts/python-env.sh), or set SWITCHYARD_PYTHON",
        path.display()
    );
    path
}

/// `switchyard args…`, run to the end.
pub fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// [`switchyard`] that must succeed: its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `switchyard generate args… --json` that must succeed within five minutes: its JSON.
pub fn generate_json(args: &[&str]) -> serde_json::Value {
    let out = output_within(
        Command::new(BIN).arg("generate").args(args).arg("--json"),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "generate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SmolLM2-135M-Instruct Q4_1, the real GGUF `scripts/smollm2.sh` fetches: its path.
pub fn smollm2() -> String {
    std::env::var("SWITCHYARD_SMOLLM2").expect(
        "SWITCHYARD_SMOLLM2 is not set: run `source scripts/smollm2.sh` (scripts/test.sh does)",
    )
}

/// `script` run by the Python that has gguf-py (`scripts/gguf-py-env.sh`, which
/// scripts/test.sh sources), with `args`; it must succeed: its stdout.
pub fn gguf_py(script: &str, args: &[&str]) -> String {
    let python = std::env::var_os("SWITCHYARD_GGUF_PYTHON")
        .expect("SWITCHYARD_GGUF_PYTHON is not set: source scripts/gguf-py-env.sh");
    let out = Command::new(python)
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf-py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// [`switchyard`] that must fail cleanly (no panic): its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

/// A child process, killed when dropped; its stderr lines are kept for failure messages.
pub struct Proc {
    pub child: Child,
    pub address: String,
    pub lines: mpsc::Receiver<String>,
    /// Lines read before the marker.
    pub seen: Vec<String>,
}

impl Proc {
    /// The address that follows `marker` in a line printed before the start marker.
    pub fn address_after(&self, marker: &str) -> String {
        self.seen
            .iter()
            .find_map(|l| l.split(marker).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {marker:?} line in {:?}", self.seen))
            .to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchyard args…` and waits (up to 60 s) for a stderr line containing `marker`
/// followed by an address, e.g. "worker listening on 127.0.0.1:4242".
pub fn start(args: &[&str], marker: &str) -> Proc {
    start_env(args, &[("RUST_LOG", "warn")], marker)
}

/// [`start`] with these environment variables.
pub fn start_env(args: &[&str], env: &[(&str, &str)], marker: &str) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Owned from here on, so a failure below still kills the child.
    let mut proc = Proc {
        child,
        address: String::new(),
        lines: rx,
        seen: Vec::new(),
    };
    loop {
        match proc.lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(rest) = line.split(marker).nth(1) {
                    proc.address = rest.split_whitespace().next().unwrap().to_string();
                    return proc;
                }
                proc.seen.push(line);
            }
            Err(_) => panic!(
                "{args:?} never printed {marker:?}; stderr:\n{}",
                proc.seen.join("\n")
            ),
        }
    }
}

pub fn worker() -> Proc {
    start(
        &["worker", "--listen", "127.0.0.1:0"],
        "worker listening on ",
    )
}

/// A coordinator over `workers` (the first P·E of them) for `grid`.
pub fn coordinator(model: &Path, workers: &[Proc], grid: &str, extra: &[&str]) -> Proc {
    let (p, e) = grid.split_once('x').unwrap();
    let cells = p.parse::<usize>().unwrap() * e.parse::<usize>().unwrap();
    let addrs: Vec<&str> = workers[..cells]
        .iter()
        .map(|w| w.address.as_str())
        .collect();
    let addrs = addrs.join(",");
    let mut args = vec![
        "coordinator",
        "--model",
        model.to_str().unwrap(),
        "--workers",
        &addrs,
        "--grid",
        grid,
        "--grpc-addr",
        "127.0.0.1:0",
        // Tests run side by side: the HTTP port's default (8000) would collide.
        "--http-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    start(&args, "switchyard: listening on ")
}

/// `switchyard serve` on free ports; `.address` is the gRPC API, [`http_address`] the HTTP one.
pub fn serve(extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    start(&args, "switchyard: listening on ")
}

pub fn http_address(p: &Proc) -> String {
    p.address_after("switchyard: HTTP on ")
}

pub async fn client(address: &str) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// The cluster tests' Mixtral: four layers, eight experts, top-2.
pub fn four_layers_eight_experts(c: &mut ModelConfig) {
    c.num_layers = 4;
    c.moe = Some(MoeConfig {
        num_experts: 8,
        top_k: 2,
    });
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A greedy request of token ids that ignores EOS.
pub fn request(prompt: &[u32], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt_token_ids: prompt.to_vec(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Each (prompt, max tokens) alone on the offline engine: the undisturbed outputs.
pub fn offline(
    dir: &Path,
    requests: &[(Vec<u32>, u32)],
    logprobs: Option<usize>,
) -> Vec<Completion> {
    let mut engine = Engine::load(CpuBackend::default(), dir, EngineConfig::default()).unwrap();
    requests
        .iter()
        .enumerate()
        .map(|(i, (prompt, max))| {
            let params = SamplingParams {
                max_tokens: *max as usize,
                ignore_eos: true,
                logprobs,
                ..Default::default()
            };
            let r = Request {
                id: i as u64,
                prompt: prompt.clone(),
                params,
            };
            engine.run(vec![r]).unwrap().remove(0)
        })
        .collect()
}

/// A random model of `preset` with some fields changed, written to `dir`.
pub fn model(dir: &Path, name: &str, change: impl FnOnce(&mut ModelConfig)) {
    let mut config = preset(name).unwrap();
    change(&mut config);
    write_model_dir(dir, &config, 11, Dtype::F32, None).unwrap();
}

/// One HTTP/1.1 request on a fresh connection; returns the status code and the body.
pub fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with_headers(address, method, path, &[], body)
}

/// [`http`] with extra header lines (`("traceparent", "00-…")`).
pub fn http_with_headers(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_string(),
    )
}

/// A real etcd on free loopback ports with its own data directory; killed when dropped.
/// It can be stopped and started again on the same ports and data (etcd down for a while).
pub struct EtcdServer {
    pub url: String,
    binary: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// The `etcd` on the PATH.
    pub fn start() -> EtcdServer {
        EtcdServer::start_binary("etcd")
    }

    /// The etcd at `binary` (a path, or a name on the PATH).
    pub fn start_binary(binary: &str) -> EtcdServer {
        let (client_port, peer_port) = (free_port(), free_port());
        let mut e = EtcdServer {
            url: format!("http://127.0.0.1:{client_port}"),
            binary: binary.to_string(),
            dir: tempfile::tempdir().unwrap(),
            client_port,
            peer_port,
            child: None,
        };
        e.start_again();
        e
    }

    /// Starts the stopped server again, on its ports and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new(&self.binary)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start etcd ({e}); scripts/system-deps.sh installs Debian's etcd-server"
                )
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready to serve client requests") {
                    let _ = tx.send(());
                }
            }
        });
        self.child = Some(child);
        rx.recv_timeout(Duration::from_secs(30))
            .expect("etcd did not become ready within 30 s");
        // It says it is ready; wait until its client port accepts connections too.
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "etcd does not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process that is killed when dropped (a server a test started by hand).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, or fails the test after `limit` (a tool that hangs must not hang
/// the test); its output either way.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let id = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// Sends `signal` (e.g. "TERM", "STOP", "CONT", "KILL") to a child.
pub fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} failed");
}

/// Waits up to `limit` for a child to exit; its exit code.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let t = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A worker registered in etcd (`cluster`), with a 2-second lease.
pub fn etcd_worker(etcd: &str, cluster: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        etcd,
        "--cluster",
        cluster,
        "--lease-ttl-s",
        "2",
    ];
    args.extend_from_slice(extra);
    start(&args, "worker listening on ")
}

/// A coordinator of the etcd cluster `cluster` with at most `grid`, 2-second leases and
/// 2-second step timeouts.
pub fn etcd_coordinator(
    model: &Path,
    etcd: &str,
    cluster: &str,
    grid: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "coordinator",
        "--model",
        model.to_str().unwrap(),
        "--etcd",
        etcd,
        "--cluster",
        cluster,
        "--grid",
        grid,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--lease-ttl-s",
        "2",
        "--step-timeout-s",
        "2",
    ];
    args.extend_from_slice(extra);
    start(&args, "switchyard: listening on ")
}

/// `switchyard certs --out dir`: a trial CA and certificates signed by it.
pub fn certs(dir: &Path) {
    let out = Command::new(BIN)
        .args(["certs", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
