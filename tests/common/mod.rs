//! Real processes on loopback for the end-to-end tests: workers and coordinators started from
//! the built `switchyard` binary, killed when dropped.

#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_model::ModelConfig;
use switchyard_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

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
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
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

/// A random model of `preset` with some fields changed, written to `dir`.
pub fn model(dir: &Path, name: &str, change: impl FnOnce(&mut ModelConfig)) {
    let mut config = preset(name).unwrap();
    change(&mut config);
    write_model_dir(dir, &config, 11, Dtype::F32, None).unwrap();
}

/// One HTTP/1.1 request on a fresh connection; returns the status code and the body.
pub fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(address).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
