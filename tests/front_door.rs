//! The bounded front door (issue 18), against a real `switchyard serve`: each finding of the
//! hostile-input probe sent as it was found, answered with a clean error, the server serving
//! on afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{client, http, http_address, http_with_headers, model, request, runtime, serve};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use tokio_stream::StreamExt;
use tonic::Code;

/// A request of `max_tokens` greedy tokens still goes through.
async fn serves(address: &str) {
    let mut c = client(address).await;
    let mut stream = c
        .generate(request(&[1, 2, 3], 4))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.next().await {
        tokens += m.unwrap().token_ids.len();
    }
    assert_eq!(tokens, 4);
}

#[test]
fn hostile_requests_get_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap()]);
    let web = http_address(&server);
    runtime().block_on(async {
        // A grpc-timeout the client API parsed itself panicked ("overflow when adding
        // duration to instant").
        for timeout in ["18446744073709551615S", "99999999999H", "soon", "-1S"] {
            let mut c = client(&server.address).await;
            let mut r = tonic::Request::new(request(&[1, 2, 3], 4));
            r.metadata_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
            let e = c.generate(r).await.map(|_| ()).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{timeout}: {e}");
            assert!(e.message().contains("is not a gRPC timeout"), "{e}");
        }
        serves(&server.address).await;

        // A 1 MB request id was echoed into every streamed message.
        let mut c = client(&server.address).await;
        let long = pb::GenerateRequest {
            request_id: "x".repeat(1 << 20),
            ..request(&[1, 2, 3], 4)
        };
        let e = c.generate(long).await.map(|_| ()).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message()
                .contains("the request id is 1048576 bytes long; expected at most 256"),
            "{e}"
        );
        serves(&server.address).await;
    });

    // top_k = 2^32 + 1 wrapped to 1: greedy, silently.
    let (status, body) = http(
        &web,
        "POST",
        "/v1/completions",
        r#"{"prompt": [1, 2, 3], "top_k": 4294967297, "temperature": 1}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("top_k is 4294967297"), "{body}");
    let (status, body) = http_with_headers(
        &web,
        "POST",
        "/v1/completions",
        &[("x-request-id", &"r".repeat(300))],
        r#"{"prompt": [1, 2, 3], "max_tokens": 2}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("expected at most 256"), "{body}");
    let (status, body) = http(
        &web,
        "POST",
        "/v1/completions",
        r#"{"prompt": [1, 2, 3], "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
}

/// A connection that never finishes its headers, or its body, is closed (10 s for headers,
/// 30 s for a body) instead of being held forever; the server answers others meanwhile.
#[test]
fn slow_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mistral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap()]);
    let web = http_address(&server);
    let started = Instant::now();
    // On the gRPC port: a client that connects and never sends HTTP/2's preface, and one
    // that sends only part of it.
    let mut silent_grpc = TcpStream::connect(&server.address).unwrap();
    let mut half_grpc = TcpStream::connect(&server.address).unwrap();
    half_grpc.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let mut slow_headers: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&web).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let mut slow_body = TcpStream::connect(&web).unwrap();
    slow_body
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 2000000\r\n\r\n{\"prompt\": ",
        )
        .unwrap();
    assert_eq!(http(&web, "GET", "/health", "").0, 200);
    for s in &mut slow_headers {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(25),
        "slow headers were cut off after {waited:?}"
    );
    for s in [&mut silent_grpc, &mut half_grpc] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(25),
        "gRPC connections that never opened were kept {waited:?}"
    );
    slow_body
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let answer = read_answer(&mut slow_body);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 30s"), "{answer}");
    assert_eq!(http(&web, "GET", "/health", "").0, 200);
}

/// What arrives on `s` until it closes, a read times out, or a JSON body has come.
fn read_answer(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A client that stops reading its stream: generation pauses once its stream is full (it
/// generated thousands of tokens into memory before), and the request is cancelled after 30
/// s without a read.
#[test]
fn a_stream_nobody_reads_pauses_then_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap()]);
    let web = http_address(&server);
    let generated = || {
        let (_, text) = http(&web, "GET", "/metrics", "");
        text.lines()
            .find(|l| l.starts_with("switchyard_generation_tokens_total"))
            .and_then(|l| l.split_whitespace().last())
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    runtime().block_on(async {
        // A small HTTP/2 window, so the transport stops taking messages soon.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
            .unwrap()
            .initial_stream_window_size(Some(16 << 10))
            .initial_connection_window_size(Some(16 << 10))
            .connect()
            .await
            .unwrap();
        let mut c = InferenceClient::new(channel);
        let r = pb::GenerateRequest {
            request_id: "r".repeat(256),
            ..request(&[1, 2, 3], 4000)
        };
        let started = Instant::now();
        let mut stream = c.generate(r).await.unwrap().into_inner();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = generated();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = generated();
        assert_eq!(before, after, "generation went on for a stream nobody read");
        assert!(after < 4000.0, "{after} tokens generated");
        // Past the stall timeout, reading gets what was held, then the cancellation.
        tokio::time::sleep(Duration::from_secs(45).saturating_sub(started.elapsed())).await;
        let mut tokens = 0;
        let end = loop {
            match stream.next().await {
                Some(Ok(m)) => tokens += m.token_ids.len(),
                Some(Err(e)) => break e,
                None => panic!("the stream ended without its cancellation"),
            }
        };
        assert!(tokens < 4000, "{tokens}");
        assert_eq!(end.code(), Code::Cancelled, "{end}");
        assert!(
            end.message().contains("read nothing of its stream"),
            "{end}"
        );
        assert!(started.elapsed() >= Duration::from_secs(30));
        serves(&server.address).await;
    });
}
