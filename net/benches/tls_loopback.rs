//! What TLS costs the cluster plane, on loopback, through the code the cluster uses: a server
//! accepting with `tls::Incoming`, a client dialing with `tls::connect`, mutual TLS from
//! `ClusterTls` (ECDSA P-256 certificates, TLS 1.3). Two figures, plain and TLS interleaved
//! over several rounds, medians:
//!
//! - the round trip of one exchange-sized message (`BENCH_MSG` bytes, default 3236: what the
//!   2×2 cluster bench measured per token per MoE layer) echoed back;
//! - bulk throughput of `BENCH_BULK_MIB` MiB (default 256) one way, in 64 KiB writes (a
//!   prefill chunk's activations).
//!
//! `cargo bench -p switchyard-net --bench tls_loopback` (use `--workspace`-wide builds in this
//! repository: `cargo bench --workspace --bench tls_loopback`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use switchyard_net::tls::{self, ClusterFiles, ClusterTls, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ClientConfig;
use tokio_stream::StreamExt;

const ROUNDS: usize = 5;
const ROUND_TRIPS: usize = 2000;
const CHUNK: usize = 64 << 10;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A CA and one certificate it signed, as cluster files in `dir`.
fn pki(dir: &Path) -> ClusterFiles {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["node.bench".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    ClusterFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    }
}

/// Serves on loopback: echoes `msg`-byte messages, or (after a first byte of 1) swallows a
/// bulk transfer until the client stops writing and answers one byte.
async fn server(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>, msg: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut incoming = Incoming::new(listener, tls, 16).unwrap();
    tokio::spawn(async move {
        while let Some(Ok(mut c)) = incoming.next().await {
            tokio::spawn(async move {
                let mut mode = [0u8];
                if c.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == 1 {
                    let mut buf = vec![0u8; CHUNK];
                    while matches!(c.read(&mut buf).await, Ok(1..)) {}
                    let _ = c.write_all(&[1]).await;
                    let _ = c.flush().await;
                    return;
                }
                let mut buf = vec![0u8; msg];
                while c.read_exact(&mut buf).await.is_ok() {
                    if c.write_all(&buf).await.is_err() || c.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Median microseconds per round trip of `msg` bytes.
async fn round_trips(address: &str, tls: Option<Arc<ClientConfig>>, msg: usize) -> f64 {
    let uri = format!("http://{address}").parse().unwrap();
    let mut s = tls::connect(&uri, tls).await.unwrap();
    s.write_all(&[0]).await.unwrap();
    let out = vec![7u8; msg];
    let mut back = vec![0u8; msg];
    let start = Instant::now();
    for _ in 0..ROUND_TRIPS {
        s.write_all(&out).await.unwrap();
        s.flush().await.unwrap();
        s.read_exact(&mut back).await.unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / ROUND_TRIPS as f64
}

/// MiB/s of a one-way transfer of `bytes`.
async fn bulk(address: &str, tls: Option<Arc<ClientConfig>>, bytes: usize) -> f64 {
    let uri = format!("http://{address}").parse().unwrap();
    let mut s = tls::connect(&uri, tls).await.unwrap();
    s.write_all(&[1]).await.unwrap();
    let chunk = vec![7u8; CHUNK];
    let start = Instant::now();
    for _ in 0..bytes / CHUNK {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8];
    s.read_exact(&mut ack).await.unwrap();
    bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let msg = env("BENCH_MSG", 3236);
    let bulk_bytes = env("BENCH_BULK_MIB", 256) << 20;
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterTls::new(&pki(dir.path())).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let plain = server(None, msg).await;
        let secure = server(Some(cluster.server.clone()), msg).await;
        // A first connection each, so no figure pays for a cold start.
        round_trips(&plain, None, msg).await;
        round_trips(&secure, Some(cluster.client.clone()), msg).await;
        let (mut rt_plain, mut rt_tls, mut bw_plain, mut bw_tls) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            rt_plain.push(round_trips(&plain, None, msg).await);
            rt_tls.push(round_trips(&secure, Some(cluster.client.clone()), msg).await);
            bw_plain.push(bulk(&plain, None, bulk_bytes).await);
            bw_tls.push(bulk(&secure, Some(cluster.client.clone()), bulk_bytes).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ratios = |a: &[f64], b: &[f64]| {
            median(a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
        };
        println!(
            "round trip of {msg} B ({ROUND_TRIPS} per round, {ROUNDS} rounds, medians): \
             plain {:.1} µs, TLS {:.1} µs, TLS/plain {:.2} (per-round ratios' median)",
            median(rt_plain.clone()),
            median(rt_tls.clone()),
            ratios(&rt_tls, &rt_plain)
        );
        println!(
            "bulk {} MiB one way: plain {:.0} MiB/s, TLS {:.0} MiB/s, TLS/plain {:.2}",
            bulk_bytes >> 20,
            median(bw_plain.clone()),
            median(bw_tls.clone()),
            ratios(&bw_tls, &bw_plain)
        );
        println!("rounds: rt plain {rt_plain:.1?} tls {rt_tls:.1?}; MiB/s plain {bw_plain:.0?} tls {bw_tls:.0?}");
    });
}
