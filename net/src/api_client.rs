//! How a client reaches the client-facing ports (`generate --server`, `status`, `bench`):
//! plain or TLS, trusting a named CA or the system's CA bundle, presenting a client
//! certificate where the server requires one, and sending an API key as a bearer token
//! (`authorization` metadata on gRPC, the `Authorization` header on HTTP).
//!
//! An address says whether TLS is wanted: `https://HOST:PORT` always; `HOST:PORT` when a CA or
//! a client certificate is given; `http://HOST:PORT` never.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use switchyard_proto::v1::inference_client::InferenceClient;
use tokio_rustls::rustls::ClientConfig;
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::grpc::{endpoint, MAX_MESSAGE_BYTES};
use crate::tls::{client_config, Io, TlsError, H2, HTTP1};

/// Where the system keeps its CA bundle, by distribution; `SSL_CERT_FILE` comes first.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("server address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error(
        "no CA to verify the server with: pass --tls-ca FILE (SSL_CERT_FILE is not set and \
         there is no system CA bundle at {})",
        SYSTEM_BUNDLES.join(", ")
    )]
    NoCa,
    #[error("the API key holds characters a header cannot carry (expected printable ASCII)")]
    Key,
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
}

/// An error and its causes, joined with ": " (a cause already said by an earlier one is left
/// out): transport errors keep the useful part ("connection refused") in their sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// How to reach a server's client ports.
#[derive(Clone, Default)]
pub struct ApiAccess {
    /// The CA the server's certificate must chain to; `None`: the system's bundle.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for servers that require one.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Sent with every call as `Bearer KEY`.
    pub api_key: Option<String>,
}

impl fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key itself is never printed.
        f.debug_struct("ApiAccess")
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A client of the `Inference` API that sends the API key, if any, with every call.
pub type ApiInferenceClient = InferenceClient<InterceptedService<Channel, Bearer>>;

impl ApiAccess {
    /// Whether a scheme-less address is reached over TLS.
    fn tls_by_default(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// The `(uri tonic dials, TLS or not)` of `address`.
    fn split(&self, address: &str) -> Result<(String, bool), AccessError> {
        let bad = |reason: &str| AccessError::Address {
            address: address.into(),
            reason: reason.into(),
        };
        let (rest, tls) = match address.split_once("://") {
            Some(("https", rest)) => (rest, true),
            Some(("http", _)) if self.tls_by_default() => {
                return Err(bad(
                    "http:// is plain, but a CA or client certificate was given: use https://",
                ))
            }
            Some(("http", rest)) => (rest, false),
            Some(_) => {
                return Err(bad(
                    "expected HOST:PORT, http://HOST:PORT or https://HOST:PORT",
                ))
            }
            None => (address, self.tls_by_default()),
        };
        Ok((format!("http://{rest}"), tls))
    }

    /// The TLS client configuration, speaking `alpn`.
    fn tls(&self, alpn: &[u8]) -> Result<Arc<ClientConfig>, AccessError> {
        let ca = match &self.ca {
            Some(ca) => ca.clone(),
            None => system_bundle().ok_or(AccessError::NoCa)?,
        };
        let identity = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let mut config = (*client_config(&ca, identity)?).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    fn bearer(&self) -> Result<Bearer, AccessError> {
        match &self.api_key {
            None => Ok(Bearer(None)),
            Some(k) => format!("Bearer {k}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| AccessError::Key),
        }
    }

    /// A client of the `Inference` API at `address`, connected on first use, taking replies
    /// as large as the API sends (prompt logprobs of a long prompt exceed tonic's 4 MiB).
    pub fn inference(&self, address: &str) -> Result<ApiInferenceClient, AccessError> {
        let (endpoint, tls, bearer) = self.prepare(address)?;
        let channel = match tls {
            Some(c) => endpoint.connect_with_connector_lazy(crate::tls::Connector(c)),
            None => endpoint.connect_lazy(),
        };
        Ok(Self::client(channel, bearer))
    }

    /// [`Self::inference`], connected now: an unreachable server is an error here, with its
    /// cause ("connection refused", a certificate refused).
    pub async fn connect_inference(
        &self,
        address: &str,
    ) -> Result<ApiInferenceClient, AccessError> {
        let (endpoint, tls, bearer) = self.prepare(address)?;
        let channel = match tls {
            Some(c) => {
                endpoint
                    .connect_with_connector(crate::tls::Connector(c))
                    .await
            }
            None => endpoint.connect().await,
        }
        .map_err(|e| AccessError::Connect {
            address: address.into(),
            reason: error_chain(&e),
        })?;
        Ok(Self::client(channel, bearer))
    }

    fn prepare(
        &self,
        address: &str,
    ) -> Result<(Endpoint, Option<Arc<ClientConfig>>, Bearer), AccessError> {
        let bearer = self.bearer()?;
        let (uri, tls) = self.split(address)?;
        let endpoint = endpoint(&uri).map_err(|e| AccessError::Address {
            address: address.into(),
            reason: e.to_string(),
        })?;
        let tls = match tls {
            true => Some(self.tls(H2)?),
            false => None,
        };
        Ok((endpoint, tls, bearer))
    }

    fn client(channel: Channel, bearer: Bearer) -> ApiInferenceClient {
        InferenceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A connector for hyper's client that dials `https://` URIs over TLS (HTTP/1.1) and
    /// `http://` ones plain.
    pub fn http_connector(&self, base: &str) -> Result<HttpConnector, AccessError> {
        let (_, tls) = self.split(base)?;
        Ok(HttpConnector {
            tls: match tls {
                true => Some(self.tls(HTTP1)?),
                false => None,
            },
        })
    }

    /// The `Authorization` header's value, if a key is set.
    pub fn authorization(&self) -> Option<String> {
        self.api_key.as_ref().map(|k| format!("Bearer {k}"))
    }
}

/// The system's CA bundle: `SSL_CERT_FILE`, else the first of [`SYSTEM_BUNDLES`] there is.
fn system_bundle() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        return Some(f.into());
    }
    SYSTEM_BUNDLES
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// Adds `authorization: Bearer KEY` to every call, when a key is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// Dials the HTTP port for hyper's pooled client: TLS when configured so.
#[derive(Clone)]
pub struct HttpConnector {
    tls: Option<Arc<ClientConfig>>,
}

impl tonic::codegen::Service<Uri> for HttpConnector {
    type Response = HttpIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<HttpIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let tls = match uri.scheme_str() {
                Some("https") => Some(tls.ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{uri}: this client was not set up for TLS"),
                    )
                })?),
                _ => None,
            };
            crate::tls::connect(&uri, tls)
                .await
                .map(|io| HttpIo(TokioIo::new(io)))
        })
    }
}

/// A connection of the HTTP client, plain or TLS.
pub struct HttpIo(TokioIo<Io>);

impl Connection for HttpIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_says_whether_tls_is_wanted() {
        let plain = ApiAccess::default();
        let with_ca = ApiAccess {
            ca: Some("ca.pem".into()),
            ..ApiAccess::default()
        };
        assert_eq!(plain.split("h:1").unwrap(), ("http://h:1".into(), false));
        assert_eq!(
            plain.split("https://h:1").unwrap(),
            ("http://h:1".into(), true)
        );
        assert_eq!(with_ca.split("h:1").unwrap(), ("http://h:1".into(), true));
        let e = with_ca.split("http://h:1").unwrap_err().to_string();
        assert!(e.contains("use https://"), "{e}");
        let e = plain.split("ftp://h:1").unwrap_err().to_string();
        assert!(e.contains("expected HOST:PORT"), "{e}");
    }

    #[test]
    fn the_key_is_never_printed_and_must_fit_a_header() {
        let a = ApiAccess {
            api_key: Some("sk-secret".into()),
            ..ApiAccess::default()
        };
        assert!(!format!("{a:?}").contains("sk-secret"));
        let bad = ApiAccess {
            api_key: Some("sk\nx".into()),
            ..ApiAccess::default()
        };
        assert!(matches!(bad.inference("h:1"), Err(AccessError::Key)));
    }
}
