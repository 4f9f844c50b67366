//! Logs to stderr (text or JSON) and, with `--otlp-endpoint`, spans exported over OTLP/gRPC.
//!
//! The log filter is `RUST_LOG` (errors only when unset). Exported spans are chosen apart from
//! it: every info span of Switchyard's own crates (requests, steps, stage forwards, expert
//! exchanges), so a quiet log still gives whole traces. The exporter's own gRPC traffic is
//! never traced. Standard `OTEL_*` variables (service name, resource attributes, sampler,
//! batch sizes) apply as in any OpenTelemetry SDK.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flushes the spans not yet exported when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("switchyard: could not export the last spans: {e}");
            }
        }
    }
}

/// Installs the process's subscriber. Must run inside the tokio runtime: the OTLP exporter's
/// gRPC channel lives there.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>, service: &str) -> Result<Telemetry> {
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
    .with_filter(EnvFilter::from_default_env());
    let Some(endpoint) = otlp_endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| {
            format!("--otlp-endpoint {endpoint}: expected an OTLP/gRPC address such as http://127.0.0.1:4317")
        })?;
    let resource = match std::env::var_os("OTEL_SERVICE_NAME") {
        Some(_) => Resource::builder().build(),
        None => Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // A target prefix: `switchyard` covers `switchyard_worker`, `switchyard_coordinator`, ….
    let traced = Targets::new().with_target("switchyard", LevelFilter::INFO);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_filter(traced);
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}
