//! Mutual TLS for every Sandfleet connection, with certificates that rotate
//! without a restart.
//!
//! - [`TlsFiles`]: the three files every process is given (`--tls-cert`,
//!   `--tls-key`, `--tls-ca`).
//! - [`ServerTls`]: the rustls server config of a daemon. Client certificates
//!   are verified against the cluster CA when sent, and optional at the
//!   handshake, because public callers may authenticate with an API key
//!   instead; each service then decides whom it accepts (see
//!   [`crate::auth`]). The verified identity reaches handlers as a
//!   [`PeerIdentity`] in the request extensions.
//! - [`ClientTls`]: the rustls client config of a caller (the SDK, the CLI, an
//!   agent dialling coordinators, a coordinator dialling peers). It checks the
//!   server's certificate against the CA and the address, and, through
//!   [`TlsDialer`], that the server holds the identity kind the caller expects
//!   (a client of the control plane talks only to a `coordinator`, of the data
//!   plane only to an `agent`).
//! - [`serve_incoming`]: the accept loop of both daemons, plaintext or TLS, with
//!   handshakes off the loop and under a deadline.
//! - [`spawn_reloader`]: reloads the files on SIGHUP or when they change.
//!   Connections that are open keep their session; new handshakes use the new
//!   certificate. A bad new file is logged and the old one kept.
//! - [`spawn_server`]: both daemons' gRPC server, on [`serve_incoming`] with
//!   its reloader, as tasks that a drop aborts.
//!
//! Only the `ring` provider is used, and only TLS 1.3 and 1.2.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, IdentityKind, PeerIdentity};

/// How long a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reloader looks at the files' modification times.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("{what} {path} is not valid PEM: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
    #[error("the certificate {path} is not usable: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// The certificate, key and CA a process is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate (chain), leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM CA certificate(s) peers are verified against.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// From three optional flags: all three or none. `Err` names what is missing.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> =
                    [("--tls-cert", cert.is_none()), ("--tls-key", key.is_none()), ("--tls-ca", ca.is_none())]
                        .into_iter()
                        .filter_map(|(flag, missing)| missing.then_some(flag))
                        .collect();
                Err(format!("TLS needs --tls-cert, --tls-key and --tls-ca together; missing {}", missing.join(", ")))
            }
        }
    }

    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.ca]
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected: "CERTIFICATE" });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::Empty { what: "private key", path: path.to_path_buf(), expected: "PRIVATE KEY" }
        }
        e => TlsError::Pem { what: "private key", path: path.to_path_buf(), reason: e.to_string() },
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA certificate", path)? {
        roots.add(cert).map_err(|e| TlsError::Certificate {
            path: path.to_path_buf(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The process's own certificate, key and identity.
struct Own {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Identity,
}

fn load_own(cert: &Path, key: &Path) -> Result<Own, TlsError> {
    let certs = load_certs("certificate", cert)?;
    let identity = crate::x509::identity_of_der(&certs[0])
        .map_err(|e| TlsError::Certificate { path: cert.to_path_buf(), reason: e.to_string() })?;
    Ok(Own { certs, key: load_key(key)?, identity })
}

fn h2(mut alpn: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    alpn.push(b"h2".to_vec());
    alpn
}

/// The server side of a daemon, reloadable.
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<(Arc<ServerConfig>, Identity)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).field("identity", &self.identity()).finish()
    }
}

impl ServerTls {
    /// Loads the files; fails with a message naming the file at fault.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let built = Self::build(&files)?;
        Ok(Arc::new(Self { files, config: RwLock::new(built) }))
    }

    fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Identity), TlsError> {
        let own = load_own(&files.cert, &files.key)?;
        let roots = load_roots(&files.ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(own.certs, own.key)
            .map_err(|e| TlsError::Certificate { path: files.key.clone(), reason: e.to_string() })?;
        config.alpn_protocols = h2(Vec::new());
        Ok((Arc::new(config), own.identity))
    }

    /// The identity in this server's certificate.
    pub fn identity(&self) -> Identity {
        self.config.read().1.clone()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().0.clone())
    }
}

/// The client side of a caller, reloadable. Without a certificate it
/// authenticates the server only (callers with an API key).
pub struct ClientTls {
    ca: PathBuf,
    own: Option<(PathBuf, PathBuf)>,
    config: RwLock<Arc<ClientConfig>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("ca", &self.ca).field("own", &self.own).finish()
    }
}

impl ClientTls {
    /// A client that presents `files`' certificate (a daemon dialling a peer).
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        Self::new(files.ca.clone(), Some((files.cert.clone(), files.key.clone())))
    }

    /// A client with a CA and, optionally, a certificate and key.
    pub fn new(ca: PathBuf, own: Option<(PathBuf, PathBuf)>) -> Result<Arc<Self>, TlsError> {
        let config = Self::build(&ca, own.as_ref())?;
        Ok(Arc::new(Self { ca, own, config: RwLock::new(config) }))
    }

    fn build(ca: &Path, own: Option<&(PathBuf, PathBuf)>) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = load_roots(ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match own {
            Some((cert, key)) => {
                let own = load_own(cert, key)?;
                builder
                    .with_client_auth_cert(own.certs, own.key)
                    .map_err(|e| TlsError::Certificate { path: key.clone(), reason: e.to_string() })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = h2(Vec::new());
        Ok(Arc::new(config))
    }

    /// A dialer for servers of `expect` kind (`None`: any Sandfleet identity).
    pub fn dialer(self: &Arc<Self>, expect: Option<IdentityKind>) -> TlsDialer {
        TlsDialer { tls: self.clone(), expect, connect_timeout: HANDSHAKE_TIMEOUT }
    }
}

/// Something whose files can be read again.
pub trait Reload: Send + Sync {
    /// Rebuilds from the files; on error the old configuration stays.
    fn reload(&self) -> Result<(), TlsError>;
    /// The files it reads.
    fn files(&self) -> Vec<PathBuf>;
}

impl Reload for ServerTls {
    fn reload(&self) -> Result<(), TlsError> {
        let built = Self::build(&self.files)?;
        *self.config.write() = built;
        Ok(())
    }
    fn files(&self) -> Vec<PathBuf> {
        self.files.paths().iter().map(|p| p.to_path_buf()).collect()
    }
}

impl Reload for ClientTls {
    fn reload(&self) -> Result<(), TlsError> {
        let built = Self::build(&self.ca, self.own.as_ref())?;
        *self.config.write() = built;
        Ok(())
    }
    fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.ca.clone()];
        if let Some((c, k)) = &self.own {
            v.extend([c.clone(), k.clone()]);
        }
        v
    }
}

fn mtimes(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// Reloads `targets` on SIGHUP and when one of their files changes, until
/// `shutdown`. Returns the task's handle.
pub fn spawn_reloader(targets: Vec<Arc<dyn Reload>>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let paths: Vec<PathBuf> = targets.iter().flat_map(|t| t.files()).collect();
        let mut seen = mtimes(&paths);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload only when their files change");
                None
            }
        };
        let mut tick = tokio::time::interval(RELOAD_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => {
                    let now = mtimes(&paths);
                    if now == seen { continue; }
                    seen = now;
                    "files changed"
                }
            };
            // A rotation writes several files; give the writer a moment to finish.
            if why == "files changed" {
                tokio::time::sleep(Duration::from_millis(200)).await;
                seen = mtimes(&paths);
            }
            for t in &targets {
                match t.reload() {
                    Ok(()) => tracing::info!(reason = why, files = ?t.files(), "TLS certificates reloaded"),
                    Err(e) => {
                        tracing::warn!(reason = why, error = %e, "TLS reload failed; keeping the certificates in use")
                    }
                }
            }
        }
    })
}

/// One accepted connection: plaintext or TLS.
pub enum ServerConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerIdentity),
}

/// What handlers learn about the connection: tonic puts it, a [`PeerIdentity`],
/// in every request's extensions.
impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        match self {
            ServerConn::Plain(_) => PeerIdentity(None),
            ServerConn::Tls(_, peer) => peer.clone(),
        }
    }
}

/// The verified certificate identity of the caller of `req` (`None` on
/// plaintext, or when the caller sent no certificate).
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<&Identity> {
    req.extensions().get::<PeerIdentity>().and_then(|p| p.0.as_ref())
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerConn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ServerConn::Tls($s, _) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ServerConn::Plain(s) => s.is_write_vectored(),
            ServerConn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, with Nagle off; with
/// `tls`, each handshake runs in its own task under [`HANDSHAKE_TIMEOUT`], so
/// a slow or hostile peer never holds up the accept loop. Failed handshakes
/// (another CA, plaintext on a TLS port) are logged at debug and dropped.
pub fn serve_incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(ServerConn::Plain(stream))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(conn)) => {
                                let peer = conn
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| crate::x509::identity_of_der(c).ok());
                                let _ = tx.send(Ok(ServerConn::Tls(Box::new(conn), PeerIdentity(peer)))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A gRPC server running on background tasks, from [`spawn_server`]. Dropping
/// it aborts them.
pub struct Serving {
    /// The server; it ends with the server's result after the shutdown.
    pub server: tokio_util::task::AbortOnDropHandle<Result<(), tonic::transport::Error>>,
    /// Reloads the TLS files on SIGHUP or change; `None` on plaintext.
    pub reloader: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

/// Serves `router` on the connections of `listener` ([`serve_incoming`],
/// Nagle off) until `shutdown`, then stops gracefully: mutual TLS with `tls`
/// (a daemon's server and client configurations, both reloaded by
/// [`spawn_reloader`]), plaintext without.
pub fn spawn_server(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<(Arc<ServerTls>, Arc<ClientTls>)>,
    shutdown: CancellationToken,
) -> Serving {
    let incoming = serve_incoming(listener, tls.as_ref().map(|(server, _)| server.clone()), shutdown.clone());
    let reloader = tls.map(|(server, client)| {
        let targets: Vec<Arc<dyn Reload>> = vec![server, client];
        tokio_util::task::AbortOnDropHandle::new(spawn_reloader(targets, shutdown.clone()))
    });
    let server = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await
    }));
    Serving { server, reloader }
}

/// Dials TLS connections for tonic: checks the server's certificate against
/// the CA and the host in the URI, and that the server's identity has the
/// expected kind. Reads the current [`ClientTls`] config at each connect, so
/// rotated certificates are used for new connections.
#[derive(Clone)]
pub struct TlsDialer {
    tls: Arc<ClientTls>,
    expect: Option<IdentityKind>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer").field("expect", &self.expect).finish()
    }
}

impl TlsDialer {
    /// The same dialer with a bound on the TCP connect (the handshake has its own).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects to `uri` and completes the handshake.
    pub async fn dial(
        &self,
        uri: &tonic::codegen::http::Uri,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host =
            uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bad server name {host}: {e}")))?;
        let config = self.tls.config.read().clone();
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {uri} timed out")))??;
        tcp.set_nodelay(true)?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("TLS handshake with {uri} timed out")))??;
        if let Some(expect) = self.expect {
            let id =
                conn.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| crate::x509::identity_of_der(c));
            match id {
                Some(Ok(id)) if id.kind == expect => {}
                Some(Ok(id)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{uri} presented a {} certificate ({id}); a {expect} was expected", id.kind),
                    ))
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("{uri} presented no Sandfleet identity; a {expect} was expected"),
                    ))
                }
            }
        }
        Ok(conn)
    }
}

impl tower_service::Service<tonic::codegen::http::Uri> for TlsDialer {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.dial(&uri).await.map(hyper_util::rt::TokioIo::new) })
    }
}

/// Whether `addr` is a loopback address, where plaintext is allowed.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The error for `--insecure` on an address that is not loopback.
pub fn insecure_refusal(addr: &SocketAddr) -> String {
    format!(
        "refusing to serve plaintext on {addr}: --insecure is allowed only on a loopback address (127.0.0.0/8, ::1), \
         because anyone who can reach the port could then act as the cluster admin; give --tls-cert, --tls-key and \
         --tls-ca (make them with `sandfleet pki`), or listen on 127.0.0.1"
    )
}

/// The TLS flags both daemons take: the three files, or `--insecure`.
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonTlsArgs {
    /// This process's certificate (PEM), from `sandfleet pki issue`.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM) every peer is verified against.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Serve plaintext, with no authentication: only on a loopback address,
    /// for a one-host cluster. A call without a credential then acts as admin.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
}

#[cfg(feature = "clap")]
impl DaemonTlsArgs {
    /// The files, or `None` for `--insecure`; an error when neither is given.
    pub fn files(&self) -> Result<Option<TlsFiles>, String> {
        let files = TlsFiles::from_flags(self.tls_cert.clone(), self.tls_key.clone(), self.tls_ca.clone())?;
        match (files, self.insecure) {
            (Some(files), false) => Ok(Some(files)),
            (None, true) => Ok(None),
            (Some(_), true) => Err("--insecure and the --tls-* flags exclude each other".into()),
            (None, false) => Err("give --tls-cert, --tls-key and --tls-ca (make them with `sandfleet pki`), \
                 or --insecure for a plaintext cluster on loopback"
                .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_files_go_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None).unwrap(), None);
        let all = TlsFiles::from_flags(p("c"), p("k"), p("ca")).unwrap().unwrap();
        assert_eq!(all, TlsFiles { cert: "c".into(), key: "k".into(), ca: "ca".into() });
        let err = TlsFiles::from_flags(p("c"), None, None).unwrap_err();
        assert!(err.ends_with("missing --tls-key, --tls-ca"), "{err}");
        let err = TlsFiles::from_flags(None, None, p("ca")).unwrap_err();
        assert!(err.ends_with("missing --tls-cert, --tls-key"), "{err}");
    }

    #[test]
    fn plaintext_is_for_loopback_only() {
        for (addr, ok) in [("127.0.0.1:1", true), ("127.1.2.3:1", true), ("[::1]:1", true), ("0.0.0.0:1", false)] {
            assert_eq!(is_loopback(&addr.parse().unwrap()), ok, "{addr}");
        }
        assert!(insecure_refusal(&"0.0.0.0:7070".parse().unwrap()).contains("only on a loopback address"));
    }

    #[test]
    fn unreadable_or_empty_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files =
            TlsFiles { cert: dir.path().join("nope.crt"), key: dir.path().join("k"), ca: dir.path().join("ca") };
        let err = ServerTls::load(files.clone()).unwrap_err().to_string();
        assert!(err.contains("nope.crt"), "{err}");
        std::fs::write(&files.cert, "not pem").unwrap();
        let err = ServerTls::load(files.clone()).unwrap_err().to_string();
        assert!(err.contains("nope.crt") && err.contains("no PEM CERTIFICATE"), "{err}");
        let err = ClientTls::new(files.ca.clone(), None).unwrap_err().to_string();
        assert!(err.contains("CA certificate") && err.contains("ca"), "{err}");
    }
}
