//! The HTTP server of every HTTP port (the coordinator's API and dashboard, a worker's
//! metrics), bounded so that slow or idle clients cannot hold it: a client has
//! [`HEADER_TIMEOUT`] to send a request's headers (also the time an idle keep-alive
//! connection is kept) and [`BODY_TIMEOUT`] to send its body of at most [`MAX_BODY_BYTES`].
//! The listener bounds the connections: ports are served from `switchyard_net::tls::Incoming`
//! with [`MAX_CONNECTIONS`], so at most `MAX_CONNECTIONS × MAX_BODY_BYTES` of request bodies
//! are held at any time.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Connections open at once on one HTTP port.
pub const MAX_CONNECTIONS: usize = 256;
/// Time to send a request's headers, from the connection's start or its last response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request body taken.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Serves `router` on the connections `listener` accepts (plain or TLS) until `shutdown`, then
/// waits for the requests under way.
pub async fn serve_http<L: axum::serve::Listener>(
    mut listener: L,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router.layer(axum::middleware::from_fn(body_in_time));
    let service = TowerToHyperService::new(router);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service.clone());
        tokio::spawn(graceful.watch(connection));
    }
    // Closed now, not after the requests under way: a new client is refused and can go
    // elsewhere, rather than accepted and never answered.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Reads a request's body within [`BODY_TIMEOUT`] and [`MAX_BODY_BYTES`] before the handler
/// sees it.
async fn body_in_time(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY_BYTES} bytes, or was cut off"),
            )
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// An error in the shape OpenAI's clients read.
fn refuse(status: StatusCode, message: String) -> Response {
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": status.as_u16(),
    }});
    (status, axum::Json(body)).into_response()
}
