//! API keys: clients of the gRPC API send `authorization: Bearer KEY` metadata, clients of the
//! HTTP API the same header (OpenAI's convention). A call without a known key is refused
//! (`UNAUTHENTICATED`; HTTP 401 with OpenAI's error body). Health, readiness, metrics and the
//! dashboard stay open unless [`ApiKeys::guard_health`] asks otherwise. Keys are compared in
//! constant time and never logged. No keys configured: every call is let in.
//!
//! With a [`RateLimit`], each key may start that many API calls per second (a token bucket
//! holding one second's worth, so short bursts pass); a call over it is refused
//! `RESOURCE_EXHAUSTED` (HTTP 429 with `Retry-After`) before it reaches the scheduler.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::Status;

use crate::openai::ApiError;

/// The keys a coordinator accepts.
#[derive(Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
    guard_health: bool,
    limit: Option<RateLimit>,
    /// One bucket per key, in the order of `keys`.
    buckets: Mutex<Vec<Bucket>>,
}

/// API calls each key may start per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
}

impl RateLimit {
    /// The most calls let through at once after a quiet second: at least one.
    fn burst(&self) -> f64 {
        self.per_second.max(1.0)
    }
}

impl std::str::FromStr for RateLimit {
    type Err = String;

    /// `N`, `N/s`, `N/m` (or `/min`) or `N/h`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, per) = s.split_once('/').unwrap_or((s, "s"));
        let seconds = match per {
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => f64::NAN,
        };
        match n.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 && seconds.is_finite() => Ok(RateLimit {
                per_second: n / seconds,
            }),
            _ => Err(format!(
                "{s:?}: expected a positive number of requests per key, as N, N/s, N/min or N/h"
            )),
        }
    }
}

/// A key's tokens: what it may still start now, and when that was counted.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys themselves are never printed.
        f.debug_struct("ApiKeys")
            .field("keys", &self.keys.len())
            .field("guard_health", &self.guard_health)
            .field("limit", &self.limit)
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
    #[error("rate limit reached for this API key: retry after {} ms", .retry_after.as_millis())]
    RateLimited { retry_after: Duration },
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
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| !k.is_empty())
            .map(String::into_bytes)
            .collect();
        let buckets = vec![
            Bucket {
                tokens: 0.0,
                at: None
            };
            keys.len()
        ];
        ApiKeys {
            keys,
            guard_health,
            limit: None,
            buckets: Mutex::new(buckets),
        }
    }

    /// Each key may start `limit` API calls per second.
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> ApiKeys {
        self.limit = limit;
        self
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
        let (mut found, mut index) = (subtle::Choice::from(0), 0u64);
        for (i, k) in self.keys.iter().enumerate() {
            let equal = k.as_slice().ct_eq(presented);
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        if !bool::from(found) {
            return Err(Refused::Wrong);
        }
        match (scope, self.limit) {
            (Scope::Api, Some(limit)) => self.take(index as usize, limit, Instant::now()),
            _ => Ok(()),
        }
    }

    /// Takes one token from key `index`'s bucket at `now`, or says when one will be there.
    fn take(&self, index: usize, limit: RateLimit, now: Instant) -> Result<(), Refused> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut buckets[index];
        let refill = b.at.map_or(limit.burst(), |at| {
            now.saturating_duration_since(at).as_secs_f64() * limit.per_second
        });
        b.tokens = (b.tokens + refill).min(limit.burst());
        b.at = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let retry_after = Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second);
        Err(Refused::RateLimited { retry_after })
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
                Err(e @ Refused::RateLimited { .. }) => {
                    Err(Status::resource_exhausted(e.to_string()))
                }
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
        Err(e @ Refused::RateLimited { retry_after }) => {
            let mut response = ApiError::rate_limited(e.to_string()).into_response();
            // Whole seconds, rounded up, as the header takes.
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
            response
        }
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

    #[test]
    fn a_key_over_its_rate_waits_and_others_do_not() {
        let keys = ApiKeys::new(["a".to_string(), "b".to_string()], false)
            .with_rate_limit(Some("2/s".parse().unwrap()));
        let t0 = Instant::now();
        let take = |i, ms| keys.take(i, keys.limit.unwrap(), t0 + Duration::from_millis(ms));
        // A burst of one second's worth, then refused with the wait until the next token.
        assert_eq!(take(0, 0), Ok(()));
        assert_eq!(take(0, 0), Ok(()));
        assert_eq!(
            take(0, 0),
            Err(Refused::RateLimited {
                retry_after: Duration::from_millis(500)
            })
        );
        // The other key has its own bucket.
        assert_eq!(take(1, 0), Ok(()));
        // Half a second later one token is back.
        assert_eq!(take(0, 500), Ok(()));
        assert!(take(0, 500).is_err());
        // Through check(): health calls are not counted, API calls are.
        for _ in 0..10 {
            assert_eq!(keys.check(Scope::Health, Some(b"Bearer b")), Ok(()));
        }
        assert_eq!(keys.check(Scope::Api, Some(b"Bearer b")), Ok(()));
        assert!(matches!(
            keys.check(Scope::Api, Some(b"Bearer b")),
            Err(Refused::RateLimited { .. })
        ));
    }

    #[test]
    fn rate_limits_parse_or_say_what_they_expect() {
        assert_eq!("5".parse(), Ok(RateLimit { per_second: 5.0 }));
        assert_eq!("120/min".parse(), Ok(RateLimit { per_second: 2.0 }));
        assert_eq!("3600/h".parse(), Ok(RateLimit { per_second: 1.0 }));
        for bad in ["0", "-1/s", "x", "5/day", "inf"] {
            let e = bad.parse::<RateLimit>().unwrap_err();
            assert!(e.contains("N/min"), "{bad}: {e}");
        }
    }
}
