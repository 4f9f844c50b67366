//! `--otlp-endpoint`: a coordinator and four worker processes export their spans over OTLP/gRPC
//! to a collector endpoint served here from OpenTelemetry's own protocol definitions
//! (`opentelemetry-proto`). The client's W3C trace context must reach the request span, and a
//! step's trace must run from the coordinator through both stages and the expert exchange.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, coordinator, http_address, http_with_headers, model, start, Proc};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use switchyard_proto::v1 as pb;
use tokio_stream::StreamExt;

/// A span as received, with the service that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    links: Vec<(String, String)>,
    attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| attributes(&r.attributes));
            let service = resource
                .and_then(|mut r| r.remove("service.name"))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    attributes: attributes(&span.attributes),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

const GRPC_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GRPC_PARENT: &str = "00f067aa0ba902b7";
const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HTTP_PARENT: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread")]
async fn spans_follow_a_request_through_every_stage_and_the_expert_exchange() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    // Export every 100 ms rather than every 5 s: the processes are killed, not stopped.
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");

    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let workers: Vec<Proc> = (0..4)
        .map(|_| {
            start(
                &[
                    "--otlp-endpoint",
                    &endpoint,
                    "worker",
                    "--listen",
                    "127.0.0.1:0",
                ],
                "worker listening on ",
            )
        })
        .collect();
    let coord = coordinator(dir.path(), &workers, "2x2", &["--otlp-endpoint", &endpoint]);

    // One request over gRPC, one over HTTP, each with the caller's trace context.
    let mut request = tonic::Request::new(pb::GenerateRequest {
        prompt: Some("the trace of a request".into()),
        max_tokens: Some(4),
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    let traceparent = format!("00-{GRPC_TRACE}-{GRPC_PARENT}-01");
    metadata.insert("traceparent", traceparent.parse().unwrap());
    metadata.insert("x-request-id", "otlp-grpc".parse().unwrap());
    let mut stream = client(&coord.address)
        .await
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    let finished = async {
        while let Some(update) = stream.next().await {
            update.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), finished)
        .await
        .expect("the traced request did not finish within 60 s");
    let address = http_address(&coord);
    let (status, body) = tokio::task::spawn_blocking(move || {
        let traceparent = format!("00-{HTTP_TRACE}-{HTTP_PARENT}-01");
        http_with_headers(
            &address,
            "POST",
            "/v1/completions",
            &[("traceparent", &traceparent), ("X-Request-Id", "otlp-http")],
            r#"{"prompt": "a traced completion", "max_tokens": 2}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // Wait for the whole trace of a step that served the gRPC request.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let spans = collector.0.lock().unwrap().clone();
        match find_trace(&spans) {
            Ok(trace) => break trace,
            Err(missing) if Instant::now() > deadline => {
                let names: Vec<_> = spans
                    .iter()
                    .map(|s| format!("{}:{} {}", s.service, s.name, s.trace_id))
                    .collect();
                panic!("{missing}; received {} spans: {names:#?}", spans.len());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    println!("{trace}");
    drop((coord, workers));
}

/// Checks the trace tree; returns it drawn, or what is missing.
fn find_trace(spans: &[Received]) -> Result<String, String> {
    let one = |what: &str, f: &dyn Fn(&Received) -> bool| -> Result<Received, String> {
        spans
            .iter()
            .find(|s| f(s))
            .cloned()
            .ok_or_else(|| format!("no {what}"))
    };
    let request = one("request span in the client's gRPC trace", &|s| {
        s.name == "request" && s.trace_id == GRPC_TRACE
    })?;
    assert_eq!(request.parent, GRPC_PARENT, "{request:?}");
    assert_eq!(request.service, "switchyard-coordinator");
    assert_eq!(request.attributes["request_id"], "otlp-grpc");
    assert_eq!(request.attributes["outcome"], "length");
    assert_eq!(request.attributes["completion_tokens"], "4");
    let http = one("request span in the client's HTTP trace", &|s| {
        s.name == "request" && s.trace_id == HTTP_TRACE
    })?;
    assert_eq!(http.parent, HTTP_PARENT);
    assert_eq!(http.attributes["request_id"], "otlp-http");

    let link = (request.trace_id.clone(), request.span_id.clone());
    let steps: Vec<&Received> = spans
        .iter()
        .filter(|s| s.name == "step" && s.links.contains(&link))
        .collect();
    if steps.len() < 4 {
        return Err(format!(
            "{} coordinator steps linked to the request (4 tokens need 4)",
            steps.len()
        ));
    }
    let child = |parent: &Received, name: &str| {
        spans
            .iter()
            .find(|s| s.trace_id == parent.trace_id && s.parent == parent.span_id && s.name == name)
            .cloned()
    };
    // Every step's trace: coordinator → stage 0 → forward → stage 1, with an exchange on the way.
    for step in steps {
        assert_eq!(step.service, "switchyard-coordinator");
        assert!(
            step.attributes["requests"].contains("otlp-grpc"),
            "{step:?}"
        );
        let stage0 = child(step, "step").ok_or("no stage-0 step under a coordinator step")?;
        let forward = child(&stage0, "forward").ok_or("no forward under a stage-0 step")?;
        let stage1 = child(&forward, "step").ok_or("no stage-1 step under a forward")?;
        for (s, stage) in [(&stage0, "0"), (&stage1, "1")] {
            assert_eq!(s.service, "switchyard-worker");
            assert_eq!(s.attributes["stage"], stage);
            assert!(s.attributes["requests"].contains("otlp-grpc"), "{s:?}");
        }
        let exchanges: Vec<&Received> = spans
            .iter()
            .filter(|s| {
                s.name == "exchange"
                    && s.trace_id == step.trace_id
                    && (s.parent == stage0.span_id || s.parent == stage1.span_id)
            })
            .collect();
        let Some(served) = exchanges
            .iter()
            .find_map(|e| child(e, "run_experts").map(|r| (e, r)))
        else {
            return Err("no exchange answered by a peer's run_experts in a step".into());
        };
        assert_eq!(served.1.service, "switchyard-worker");
        assert_eq!(served.0.attributes["layer"], served.1.attributes["layer"]);
    }
    Ok(format!(
        "request {} ← client span {}; {} spans in all",
        request.span_id,
        request.parent,
        spans.len()
    ))
}
