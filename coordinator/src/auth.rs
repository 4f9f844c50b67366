//! API keys: clients of the gRPC API send `authorization: Bearer KEY` metadata, clients of the
//! HTTP API the same header (OpenAI's convention). A call without a known key is refused
//! (`UNAUTHENTICATED`; HTTP 401 with OpenAI's error body). Health, readiness, metrics and the
//! dashboard stay open unless [`ApiKeys::guard_health`] asks otherwise. Keys are compared in
//! constant time and never logged. No keys configured: every call is let in.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::openai::ApiError;

/// The keys a coordinator accepts.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
    guard_health: bool,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys themselves are never printed.
        f.debug_struct("ApiKeys")
            .field("keys", &self.keys.len())
            .field("guard_health", &self.guard_health)
            .finish()
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing API key: send the header `Authorization: Bearer KEY`")]
    Missing,
    #[error("incorrect API key provided")]
    Wrong,
}

/// What a call is to: the API, or health, readiness, metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Api,
    Health,
}

/// A key file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("API key file {path}: {source}")]
pub struct KeyFileError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl ApiKeys {
    /// Accepts `keys` (empty ones are ignored); `guard_health`: health, readiness, metrics and
    /// the dashboard want a key too.
    pub fn new(keys: impl IntoIterator<Item = String>, guard_health: bool) -> ApiKeys {
        ApiKeys {
            keys: keys
                .into_iter()
                .filter(|k| !k.is_empty())
                .map(String::into_bytes)
                .collect(),
            guard_health,
        }
    }

    /// The keys in a file, one a line; blank lines and lines starting with `#` are skipped.
    pub fn read_file(path: &std::path::Path) -> Result<Vec<String>, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError {
            path: path.into(),
            source,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect())
    }

    /// Whether any key is required at all.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Lets a call to `scope` in with the `authorization` value it brought, or says why not.
    pub fn check(&self, scope: Scope, authorization: Option<&[u8]>) -> Result<(), Refused> {
        if !self.enabled() || (scope == Scope::Health && !self.guard_health) {
            return Ok(());
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .map(|k| k.trim_ascii())
            .ok_or(Refused::Missing)?;
        // Every key is compared, so the time taken does not tell which one came close.
        let known = self.keys.iter().fold(subtle::Choice::from(0), |found, k| {
            found | k.as_slice().ct_eq(presented)
        });
        match bool::from(known) {
            true => Ok(()),
            false => Err(Refused::Wrong),
        }
    }

    /// A gRPC interceptor for calls to `scope`.
    pub fn interceptor(
        self: &Arc<Self>,
        scope: Scope,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone {
        let keys = self.clone();
        move |r: tonic::Request<()>| {
            let presented = r.metadata().get("authorization").map(|v| v.as_bytes());
            match keys.check(scope, presented) {
                Ok(()) => Ok(r),
                Err(e) => Err(Status::unauthenticated(e.to_string())),
            }
        }
    }
}

/// The HTTP port's guard (an axum middleware).
pub async fn http_guard(State(keys): State<Arc<ApiKeys>>, r: Request, next: Next) -> Response {
    let scope = match r.uri().path() {
        "/health" | "/ready" | "/metrics" | "/" | "/api/dashboard" => Scope::Health,
        _ => Scope::Api,
    };
    let presented = r
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match keys.check(scope, presented) {
        Ok(()) => next.run(r).await,
        Err(e) => ApiError::unauthorized(e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_required_where_asked_and_compared_whole() {
        let keys = ApiKeys::new(["sk-one".to_string(), "sk-two".to_string()], false);
        let check = |scope, v: Option<&str>| keys.check(scope, v.map(str::as_bytes));
        assert_eq!(check(Scope::Api, None), Err(Refused::Missing));
        assert_eq!(check(Scope::Api, Some("sk-one")), Err(Refused::Missing));
        assert_eq!(check(Scope::Api, Some("Bearer sk-on")), Err(Refused::Wrong));
        assert_eq!(
            check(Scope::Api, Some("Bearer sk-one2")),
            Err(Refused::Wrong)
        );
        assert_eq!(check(Scope::Api, Some("Bearer sk-one")), Ok(()));
        assert_eq!(check(Scope::Api, Some("Bearer sk-two")), Ok(()));
        assert_eq!(check(Scope::Health, None), Ok(()));

        let guarded = ApiKeys::new(["k".to_string()], true);
        assert_eq!(guarded.check(Scope::Health, None), Err(Refused::Missing));
        assert_eq!(guarded.check(Scope::Health, Some(b"Bearer k")), Ok(()));

        let open = ApiKeys::new([String::new()], true);
        assert!(!open.enabled());
        assert_eq!(open.check(Scope::Api, None), Ok(()));
    }

    #[test]
    fn keys_are_never_printed() {
        let keys = ApiKeys::new(["sk-secret".to_string()], false);
        assert!(!format!("{keys:?}").contains("sk-secret"));
    }
}
