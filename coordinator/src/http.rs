//! The coordinator's HTTP port: the OpenAI-compatible API under `/v1`, `GET /health` (the
//! process is alive), `GET /ready` (a complete placement is serving), `GET /metrics`
//! (Prometheus), and the live dashboard (`/`, fed by `GET /api/dashboard`). API keys, when
//! configured, guard it ([`crate::auth::http_guard`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use switchyard_metrics::{self as metrics, Registry};

use crate::api::InferenceApi;
use crate::auth::{self, ApiKeys};
use crate::cluster::Cluster;
use crate::monitor::Monitor;
use crate::openai;

const DASHBOARD: &str = include_str!("../assets/dashboard.html");

#[derive(Clone)]
struct Dashboard {
    cluster: Arc<Cluster>,
    monitor: Arc<Monitor>,
    /// Registries of workers in this process (`serve`), rendered with the coordinator's.
    local_workers: Arc<Vec<Arc<Registry>>>,
}

/// The whole HTTP application over `cluster`, letting in the calls `keys` accept.
/// `local_workers` are the metric registries of workers running in this process, whose
/// metrics `/metrics` includes.
pub fn router(
    cluster: Arc<Cluster>,
    local_workers: Vec<Arc<Registry>>,
    keys: Arc<ApiKeys>,
) -> Router {
    let api = InferenceApi::new(cluster.clone());
    let dashboard = Dashboard {
        monitor: Monitor::spawn(cluster.clone()),
        cluster,
        local_workers: Arc::new(local_workers),
    };
    let v1 = Router::new()
        .route("/models", get(openai::models))
        .route("/completions", post(openai::completions))
        .route("/chat/completions", post(openai::chat_completions))
        .fallback(not_found)
        .with_state(api.clone());
    let tokens = Router::new()
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .with_state(api.clone());
    Router::new()
        .nest("/v1", v1)
        .merge(tokens)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(prometheus))
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/api/dashboard", get(snapshot))
        .with_state(dashboard)
        .layer(axum::middleware::from_fn_with_state(keys, auth::http_guard))
}

async fn ready(State(d): State<Dashboard>) -> Response {
    match *d.cluster.ready().borrow() {
        true => (StatusCode::OK, "ready").into_response(),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no complete placement is serving",
        )
            .into_response(),
    }
}

async fn prometheus(State(d): State<Dashboard>) -> Response {
    let mut registries: Vec<&Registry> = vec![&d.cluster.metrics().registry];
    registries.extend(d.local_workers.iter().map(|r| &**r));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&registries),
    )
        .into_response()
}

async fn snapshot(State(d): State<Dashboard>) -> Json<crate::monitor::Snapshot> {
    Json(d.monitor.snapshot())
}

async fn not_found() -> Response {
    openai::ApiError::not_found(
        "no such endpoint; see /v1/models, /v1/completions, /v1/chat/completions",
    )
    .into_response()
}
