//! TLS on every plane, with rustls (ring; no OpenSSL).
//!
//! - The client plane (the coordinator's gRPC API and HTTP port): a server certificate
//!   ([`ServerTls`]), optionally requiring client certificates from a CA.
//! - The cluster plane (coordinator ↔ workers ↔ workers, the expert exchange among them):
//!   mutual TLS from one cluster CA ([`ClusterTls`]). Both ends present a certificate the
//!   cluster CA signed and accept only such certificates. The CA is the identity: a peer's
//!   name is not checked (workers move between addresses; any certificate the cluster CA
//!   signed is a member). A process installs its cluster identity once ([`install_cluster`]);
//!   [`crate::grpc::channel`] and the servers of the cluster plane use it from then on.
//! - etcd: its CA, optionally a client certificate ([`client_config`]).
//!
//! Certificates and keys are read again when their files change (Kubernetes rotates mounted
//! Secrets by swapping a symlink): each handshake looks at the files' modification times, so
//! new connections get the new certificate while those open keep theirs. CA files are read
//! again the same way ([`ReloadingCa`]), so a rotated CA is trusted from the next handshake. A
//! file that no longer parses is reported and the last good certificate or CA is kept.
//!
//! Listening sockets become [`Incoming`] streams of connections, plain or TLS, that tonic's
//! and axum's servers both take; handshakes run on their own tasks, so a client that stalls
//! its handshake holds up no other.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take, once connected (and past TLS), to send its first
/// [`OPENING_BYTES`]: HTTP/2's connection preface is 24 bytes, and an HTTP/1.1 request line
/// with its headers is longer. A connection that never starts speaking would otherwise hold
/// one of the port's connections for good: HTTP/2's keep-alive pings begin only after the
/// preface.
pub const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
const OPENING_BYTES: usize = 24;

/// Why a certificate, key or CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{cert} and {key}: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?;
    match certs.is_empty() {
        true => Err(TlsError::Empty {
            what,
            path: path.into(),
            expected: "PEM certificate",
        }),
        false => Ok(certs),
    }
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The CA certificates in `path` as a root store. Certificates that cannot be roots are
/// skipped with a warning (a system bundle may hold some); a file with none is an error.
fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let (valid, invalid) = store.add_parsable_certificates(read_certs("CA", path)?);
    if valid == 0 {
        return Err(TlsError::Ca {
            path: path.into(),
            reason: "no certificate in it can be a trust anchor".into(),
        });
    }
    if invalid > 0 {
        warn!(
            "{}: skipped {invalid} certificates that cannot be trust anchors",
            path.display()
        );
    }
    Ok(Arc::new(store))
}

/// A CA file, read again when it changes: what client certificates (as a server) and server
/// certificates (as a client, with the usual name checks) are verified against. A CA file
/// that no longer parses is reported once and the last good CA is kept.
pub struct ReloadingCa {
    path: PathBuf,
    current: Mutex<CaLoaded>,
}

struct CaLoaded {
    stamp: FileStamp,
    verifiers: Verifiers,
}

#[derive(Clone)]
struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

impl fmt::Debug for ReloadingCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCa")
            .field("path", &self.path)
            .finish()
    }
}

impl ReloadingCa {
    pub fn new(path: &Path) -> Result<Arc<ReloadingCa>, TlsError> {
        let stamp = file_stamp(path);
        let verifiers = Self::load(path)?;
        Ok(Arc::new(ReloadingCa {
            path: path.into(),
            current: Mutex::new(CaLoaded { stamp, verifiers }),
        }))
    }

    fn load(path: &Path) -> Result<Verifiers, TlsError> {
        let roots = roots(path)?;
        let invalid = |e: &dyn std::fmt::Display| TlsError::Ca {
            path: path.into(),
            reason: e.to_string(),
        };
        Ok(Verifiers {
            client: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| invalid(&e))?,
            server: WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| invalid(&e))?,
        })
    }

    /// The verifiers of the CA as it is now: read again first if the file changed.
    fn current(&self) -> Verifiers {
        let stamp = file_stamp(&self.path);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if stamp != current.stamp {
            current.stamp = stamp;
            match Self::load(&self.path) {
                Ok(v) => {
                    debug!("read the changed CA {}", self.path.display());
                    current.verifiers = v;
                }
                Err(e) => warn!("keeping the previous CA: {e}"),
            }
        }
        current.verifiers.clone()
    }
}

impl ClientCertVerifier for ReloadingCa {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; with a CA that can change under us, none are sent.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .client
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .client
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().client.supported_verify_schemes()
    }
}

impl ServerCertVerifier for ReloadingCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current()
            .server
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .server
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()
            .server
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().server.supported_verify_schemes()
    }
}

/// A certificate chain and its key, read again when either file changes.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    stamp: Stamp,
    key: Arc<CertifiedKey>,
}

/// What tells a changed file: its modification time and length (through a link: of the file
/// it points to, so a swapped Kubernetes Secret counts as changed).
type FileStamp = Option<(SystemTime, u64)>;

fn file_stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The stamps of a certificate and its key.
type Stamp = [FileStamp; 2];

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl ReloadingCert {
    /// Reads `cert` (a PEM chain, leaf first) and `key`; fails if they do not match.
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let stamp = Self::stamp_of(cert, key);
        let loaded = Self::load(cert, key)?;
        Ok(Arc::new(ReloadingCert {
            cert: cert.into(),
            key: key.into(),
            current: Mutex::new(Loaded { stamp, key: loaded }),
        }))
    }

    fn stamp_of(cert: &Path, key: &Path) -> Stamp {
        [cert, key].map(file_stamp)
    }

    fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = read_certs("certificate", cert)?;
        let k = CertifiedKey::from_der(chain, read_key(key)?, &provider()).map_err(|source| {
            TlsError::Pair {
                cert: cert.into(),
                key: key.into(),
                source,
            }
        })?;
        Ok(Arc::new(k))
    }

    /// The current certificate: read again first if a file changed since the last read.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamp = Self::stamp_of(&self.cert, &self.key);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if stamp != current.stamp {
            // Marked read either way: a broken file is reported once, not per handshake.
            current.stamp = stamp;
            match Self::load(&self.cert, &self.key) {
                Ok(k) => {
                    debug!("read the changed certificate {}", self.cert.display());
                    current.key = k;
                }
                Err(e) => warn!("keeping the previous certificate: {e}"),
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server's certificate and key files, and the CA whose client certificates it requires
/// (none: clients need no certificate).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The rustls configuration, speaking the application protocols `alpn`.
    pub fn config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(ReloadingCa::new(ca)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(ReloadingCert::new(&self.cert, &self.key)?);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        if self.client_ca.is_some() {
            // A resumed session skips the client's certificate: after the CA file changes, a
            // client of the old CA could come back on its ticket. Every handshake verifies.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(Arc::new(config))
    }
}

/// ALPN of gRPC servers and clients.
pub const H2: &[u8] = b"h2";
/// ALPN of the HTTP port (HTTP/1.1 only).
pub const HTTP1: &[u8] = b"http/1.1";

/// A client configuration trusting the CA in `ca` (with the usual name checks; read again
/// when the file changes), presenting the certificate `identity` (cert, key) when given,
/// speaking gRPC (HTTP/2): what an etcd client and the API's clients use.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(ReloadingCa::new(ca)?);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_cert_resolver(ReloadingCert::new(cert, key)?),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// The files of a process's cluster identity: the cluster CA, and this process's certificate
/// and key (signed by that CA).
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Mutual TLS of the cluster plane, as a server and as a client.
#[derive(Clone)]
pub struct ClusterTls {
    /// gRPC servers of the cluster plane (workers).
    pub server: Arc<ServerConfig>,
    /// HTTP/1.1 ports of the cluster plane (a worker's metrics): the same certificates.
    pub http: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl ClusterTls {
    pub fn new(files: &ClusterFiles) -> Result<ClusterTls, TlsError> {
        let server_tls = ServerTls {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: Some(files.ca.clone()),
        };
        let (server, http) = (server_tls.config(&[H2])?, server_tls.config(&[HTTP1])?);
        let verifier = ReloadingCa::new(&files.ca)?;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignedByClusterCa(verifier)))
            .with_client_cert_resolver(ReloadingCert::new(&files.cert, &files.key)?);
        client.alpn_protocols = vec![H2.to_vec()];
        Ok(ClusterTls {
            server,
            http,
            client: Arc::new(client),
        })
    }
}

static CLUSTER: RwLock<Option<ClusterTls>> = RwLock::new(None);

/// From now on this process's cluster plane (its worker servers and its channels to workers
/// and coordinators) speaks mutual TLS as `tls`; `None`: plain TCP again.
pub fn install_cluster(tls: Option<ClusterTls>) {
    *CLUSTER.write().unwrap_or_else(|p| p.into_inner()) = tls;
}

/// The cluster identity installed, if any.
pub fn cluster() -> Option<ClusterTls> {
    CLUSTER.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Accepts a server certificate the cluster CA signed, whatever name it carries.
#[derive(Debug)]
struct SignedByClusterCa(Arc<ReloadingCa>);

impl ServerCertVerifier for SignedByClusterCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(&*self.0, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(&*self.0, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(&*self.0)
    }
}

/// Connects channels over TLS with a client configuration: what
/// `Endpoint::connect_with_connector_lazy` takes. The endpoint's URI stays `http://`: the
/// encryption happens here, under HTTP/2.
#[derive(Clone)]
pub struct Connector(pub Arc<ClientConfig>);

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = TokioIo<Io>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<TokioIo<Io>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move { connect(&uri, Some(config)).await.map(TokioIo::new) })
    }
}

/// Connects to `uri`'s host and port (443 when it names none), over TLS with `tls` (the
/// server's name checked against the host), else plain.
pub async fn connect(
    uri: &tonic::codegen::http::Uri,
    tls: Option<Arc<ClientConfig>>,
) -> std::io::Result<Io> {
    let invalid = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
    };
    let host = uri.host().ok_or_else(|| invalid("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    // An exchange is many small round trips: no Nagle delay.
    tcp.set_nodelay(true)?;
    let Some(config) = tls else {
        return Ok(Io::Plain(tcp));
    };
    let name = ServerName::try_from(host).map_err(|_| invalid("not a host name or IP address"))?;
    let tls = TlsConnector::from(config).connect(name, tcp).await?;
    Ok(Io::Tls(Box::new(tls.into())))
}

/// An accepted connection, plain or TLS, counted against its port's connection limit until it
/// closes.
pub struct Conn {
    io: Io,
    _permit: OwnedSemaphorePermit,
    /// Until the client has sent [`OPENING_BYTES`]: the bytes still due and the deadline.
    opening: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
}

impl Conn {
    fn new(io: Io, permit: OwnedSemaphorePermit) -> Conn {
        Conn {
            io,
            _permit: permit,
            opening: Some((OPENING_BYTES, Box::pin(tokio::time::sleep(OPENING_TIMEOUT)))),
        }
    }
}

/// A TCP stream, plain or TLS (either end of it).
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.io {
            Io::Plain(s) => s.connect_info(),
            Io::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// Calls `$f` on the stream inside an [`Io`], whichever it is.
macro_rules! on_io {
    ($io:expr, $s:ident => $f:expr) => {
        match $io {
            Io::Plain($s) => $f,
            Io::Tls($s) => $f,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        on_io!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        on_io!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_io!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_io!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_io!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((due, deadline)) = &mut this.opening else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                match got >= *due || got == 0 {
                    // Opened (or closed by the client): no deadline any more.
                    true => this.opening = None,
                    false => *due -= got,
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client sent no request within {OPENING_TIMEOUT:?}"),
                ))),
                Poll::Pending => Poll::Pending,
            },
            error => error,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The connections accepted on a listening socket, TLS when a configuration is given, at most
/// `max_connections` open at once (more are closed as they arrive; a TLS handshake counts): a
/// `Stream` for tonic's servers and an `axum::serve::Listener` for the HTTP ports. The socket
/// closes when this is dropped.
pub struct Incoming {
    connections: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
}

impl Incoming {
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<ServerConfig>>,
        max_connections: usize,
    ) -> std::io::Result<Incoming> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let permits = Arc::new(Semaphore::new(max_connections));
        tokio::spawn(accept_loop(
            listener,
            tls.map(TlsAcceptor::from),
            permits,
            tx,
        ));
        Ok(Incoming {
            connections: rx,
            local,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<(Conn, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be closed.
                warn!("accepting a connection on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("connection limit reached; closed a new one from {peer}");
            continue;
        };
        // Replies must not wait for Nagle's algorithm: an exchange is many small round trips.
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = tls.clone() else {
            let conn = Conn::new(Io::Plain(tcp), permit);
            if tx.send((conn, peer)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => {
                    let conn = Conn::new(Io::Tls(Box::new(s.into())), permit);
                    let _ = tx.send((conn, peer)).await;
                }
                Ok(Err(e)) => debug!("TLS handshake with {peer} failed: {e}"),
                Err(_) => debug!("TLS handshake with {peer} took over {HANDSHAKE_TIMEOUT:?}"),
            }
        });
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections
            .poll_recv(cx)
            .map(|c| c.map(|(conn, _)| Ok(conn)))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.connections.recv().await {
            Some(c) => c,
            // The accept loop ends only when this is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// A new CA in `dir` and a certificate it signed (for `name`), as cluster files.
    fn pki(dir: &Path) -> ClusterFiles {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let files = ClusterFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        leaf(&files, &issuer, "node.test");
        files
    }

    fn leaf(files: &ClusterFiles, issuer: &Issuer<'_, KeyPair>, name: &str) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_changed_certificate_is_read_again_and_a_broken_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path());
        let cert = ReloadingCert::new(&files.cert, &files.key).unwrap();
        let first = cert.current();
        assert!(
            Arc::ptr_eq(&first, &cert.current()),
            "unchanged files are not read again"
        );

        // A certificate for another name and key: taken on the next look.
        let other_dir = tempfile::tempdir().unwrap();
        let other = pki(other_dir.path());
        std::fs::copy(&other.cert, &files.cert).unwrap();
        std::fs::copy(&other.key, &files.key).unwrap();
        let second = cert.current();
        assert_ne!(first.cert, second.cert);

        // A broken file: the last good certificate stays.
        std::fs::write(&files.cert, "not a certificate").unwrap();
        assert_eq!(cert.current().cert, second.cert);

        // A key that does not match its certificate is refused at start, naming both files.
        std::fs::copy(&other.cert, &files.cert).unwrap();
        std::fs::copy(dir.path().join("ca.pem"), dir.path().join("wrong.pem")).unwrap();
        let e = ReloadingCert::new(&dir.path().join("wrong.pem"), &files.key).unwrap_err();
        assert!(e.to_string().contains("wrong.pem"), "{e}");
    }

    /// Serves `tls` on a loopback port, answering each connection's first byte with itself.
    async fn echo(tls: Arc<ServerConfig>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut incoming = Incoming::new(listener, Some(tls), 8).unwrap();
        tokio::spawn(async move {
            while let Some(Ok(mut c)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).await.is_ok() {
                        let _ = c.write_all(&b).await;
                        let _ = c.flush().await;
                    }
                });
            }
        });
        address
    }

    /// Whether a client with `tls` gets its byte back from `address`.
    async fn answered(address: &str, tls: Arc<ClientConfig>) -> bool {
        use tonic::codegen::Service;
        let uri = format!("http://{address}").parse().unwrap();
        let Ok(io) = Connector(tls).call(uri).await else {
            return false;
        };
        let mut s = io.into_inner();
        let mut b = [7u8];
        if s.write_all(&b).await.is_err() || s.flush().await.is_err() {
            return false;
        }
        s.read_exact(&mut b).await.is_ok() && b == [7]
    }

    #[tokio::test]
    async fn cluster_members_meet_and_strangers_are_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (pki(a.path()), pki(b.path()));
        let (member, stranger) = (ClusterTls::new(&a).unwrap(), ClusterTls::new(&b).unwrap());
        let address = echo(member.server.clone()).await;

        // Another member: in, though its certificate names another host than 127.0.0.1.
        assert!(answered(&address, member.client.clone()).await);
        // A certificate another CA signed: refused (and that server is refused in turn).
        assert!(!answered(&address, stranger.client.clone()).await);
        let theirs = echo(stranger.server.clone()).await;
        assert!(!answered(&theirs, member.client.clone()).await);
        // Trusting the CA but bringing no certificate: refused.
        let anonymous = client_config(&a.ca, None).unwrap();
        let mut anonymous = (*anonymous).clone();
        anonymous
            .dangerous()
            .set_certificate_verifier(Arc::new(SignedByClusterCa(
                ReloadingCa::new(&a.ca).unwrap(),
            )));
        assert!(!answered(&address, Arc::new(anonymous)).await);
    }

    #[tokio::test]
    async fn a_rotated_ca_is_trusted_from_the_next_handshake() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (pki(a.path()), pki(b.path()));
        // A server requiring client certificates from the CA in a's file.
        let server = ServerTls {
            cert: a.cert.clone(),
            key: a.key.clone(),
            client_ca: Some(a.ca.clone()),
        };
        let address = echo(server.config(&[H2]).unwrap()).await;
        // The clients trust the server through a copy of a's CA that does not rotate.
        let trust = a.ca.with_file_name("trust.pem");
        std::fs::copy(&a.ca, &trust).unwrap();
        let client = |identity: &ClusterFiles| {
            let mut c =
                (*client_config(&trust, Some((&identity.cert, &identity.key))).unwrap()).clone();
            // The server's certificate names node.test, not 127.0.0.1.
            c.dangerous()
                .set_certificate_verifier(Arc::new(SignedByClusterCa(
                    ReloadingCa::new(&trust).unwrap(),
                )));
            Arc::new(c)
        };
        let (old_member, new_member) = (client(&a), client(&b));
        assert!(answered(&address, old_member.clone()).await);
        assert!(!answered(&address, new_member.clone()).await);

        // The CA file now holds b's CA: b's certificates are in, a's are out.
        std::fs::copy(&b.ca, &a.ca).unwrap();
        assert!(answered(&address, new_member.clone()).await);
        assert!(!answered(&address, old_member.clone()).await);

        // A broken CA file: the last good CA stays.
        std::fs::write(&a.ca, "not a CA").unwrap();
        assert!(answered(&address, new_member).await);
    }
}
