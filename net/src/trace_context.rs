//! W3C trace context (`traceparent`, `tracestate`) across processes.
//!
//! A span's OpenTelemetry context travels in gRPC metadata or HTTP headers, so a request's
//! spans on the coordinator and a step's spans on every worker it passes through join one
//! trace. The propagator is the process-wide one the binary installs with its exporter;
//! without `--otlp-endpoint` it is a no-op and these calls cost nothing.

use opentelemetry::propagation::{Extractor, Injector};
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the context the caller sent, if it sent one.
pub fn adopt(span: &Span, headers: &HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderReader(headers)));
    // A span that tracing does not record (filtered out) cannot take a parent; nothing to do.
    let _ = span.set_parent(parent);
}

/// A tonic request carrying `span`'s context to the next process.
pub fn request<T>(span: &Span, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataWriter(request.metadata_mut()))
    });
    request
}

struct HeaderReader<'a>(&'a HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataWriter<'a>(&'a mut MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    /// What the writer puts in gRPC metadata is W3C's header, and the reader gets it back.
    #[test]
    fn a_context_survives_grpc_metadata() {
        let sent = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let propagator = TraceContextPropagator::new();
        let mut metadata = MetadataMap::new();
        propagator.inject_context(
            &Context::new().with_remote_span_context(sent.clone()),
            &mut MetadataWriter(&mut metadata),
        );
        assert_eq!(
            metadata.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let read = propagator.extract(&HeaderReader(metadata.as_ref()));
        assert_eq!(read.span().span_context(), &sent);
    }
}
