//! The [`Client`]: connection management, retries, and the control-plane calls.
//!
//! Control-plane calls go to the coordinators. Each attempt carries a deadline
//! (`grpc-timeout`, and the same bound locally). Idempotent calls that fail with
//! `UNAVAILABLE` or a connection error are sent again to the next coordinator
//! after a jittered exponential backoff; every other failure is returned at once.
//!
//! Data-plane calls (exec, files; see [`crate::exec`] and [`crate::files`]) go
//! straight to the node agent in `Session.node_address` with the session token.
//!
//! With an API key ([`ClientBuilder::api_key`]) every control-plane call
//! carries `authorization: Bearer sfk_...`; data-plane calls never do (their
//! `authorization` is the session token).
//!
//! Every call, control and data plane, carries the current `tracing` span's
//! W3C trace context (`traceparent`; [`sandfleet_common::trace_context`]) when
//! the process exports spans, so the servers' spans join the caller's trace.

use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tracing::{debug, Instrument};

use crate::proto;
use crate::proto::cluster_service_client::ClusterServiceClient;
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::session_service_client::SessionServiceClient;
use crate::retry::{self, Backoff, RetryPolicy};
use crate::session::{ceil_secs, is_terminal, state_name, CreateSession};
use crate::Error;
use sandfleet_common::auth::IdentityKind;
use sandfleet_common::grpc::{self, ChannelOptions};
use sandfleet_common::tls::{ClientTls, TlsDialer};
use std::path::PathBuf;

/// Default per-call deadline of control-plane calls.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default number of retries (so at most this plus one attempts).
pub const DEFAULT_MAX_RETRIES: u32 = 8;
/// Slack given to a local deadline on top of the `grpc-timeout` sent, so the
/// server's own DEADLINE_EXCEEDED (with its message) normally arrives first.
const LOCAL_DEADLINE_SLACK: Duration = Duration::from_millis(500);
/// How much longer a wait_running watch may live on the server than the wait itself.
const WATCH_DEADLINE_SLACK: Duration = Duration::from_secs(2);
/// Deadline of membership changes, which wait for a new member to catch up.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// A session update stream, from [`Client::watch_session`].
pub type SessionWatch = BoxStream<'static, Result<proto::Session, Error>>;

/// Configures and builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_retries: u32,
    backoff: Backoff,
    tls: Option<TlsOptions>,
    api_key: Option<Secret>,
}

/// A key kept out of `Debug` output.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Debug for ApiKeyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ApiKeyAuth(<key>)" } else { "ApiKeyAuth(None)" })
    }
}

/// Adds the API key to every control-plane request, and the current span's
/// trace context (`traceparent`, see [`sandfleet_common::trace_context`]).
#[derive(Clone)]
pub(crate) struct ApiKeyAuth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for ApiKeyAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        sandfleet_common::trace_context::inject(req.metadata_mut());
        Ok(req)
    }
}

/// A channel to a coordinator plus the credential its calls carry.
#[derive(Clone)]
pub(crate) struct ControlChannel {
    channel: Channel,
    auth: ApiKeyAuth,
}

/// The transport of control-plane clients.
pub(crate) type Ctl = tonic::service::interceptor::InterceptedService<Channel, ApiKeyAuth>;

/// How the client authenticates the cluster (and itself) over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// The cluster CA certificate (PEM): coordinators and agents must present
    /// certificates it signed.
    pub ca: PathBuf,
    /// A `client` certificate and key (PEM), for mutual TLS. Optional when the
    /// client authenticates with an API key.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

impl TlsOptions {
    /// From `SANDFLEET_TLS_CA`, `SANDFLEET_TLS_CERT` and `SANDFLEET_TLS_KEY`;
    /// `Ok(None)` when none is set.
    pub fn from_env() -> Result<Option<Self>, Error> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self::from_parts(var(ENV_TLS_CA), var(ENV_TLS_CERT), var(ENV_TLS_KEY))
    }

    /// From the three optional paths (flags or environment): a certificate
    /// needs its key and a CA; a CA alone authenticates the server only.
    pub fn from_parts(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<Self>, Error> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), None, None) => Ok(Some(Self { ca, cert_and_key: None })),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Self { ca, cert_and_key: Some((cert, key)) })),
            (None, _, _) => Err(Error::InvalidArgument(format!(
                "a TLS client certificate needs the cluster CA too ({ENV_TLS_CA} or --tls-ca)"
            ))),
            (Some(_), _, _) => Err(Error::InvalidArgument(format!(
                "a TLS client certificate and its key go together ({ENV_TLS_CERT}/--tls-cert and {ENV_TLS_KEY}/--tls-key)"
            ))),
        }
    }
}

/// The environment variable listing coordinator endpoints (comma-separated).
pub const ENV_ENDPOINT: &str = "SANDFLEET_ENDPOINT";
/// The environment variable holding an API key.
pub const ENV_API_KEY: &str = "SANDFLEET_API_KEY";
/// The endpoint when none is configured: a `sandfleet dev` cluster.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7070";

/// The environment variable naming the cluster CA certificate.
pub const ENV_TLS_CA: &str = "SANDFLEET_TLS_CA";
/// The environment variable naming the client certificate.
pub const ENV_TLS_CERT: &str = "SANDFLEET_TLS_CERT";
/// The environment variable naming the client key.
pub const ENV_TLS_KEY: &str = "SANDFLEET_TLS_KEY";

impl ClientBuilder {
    /// A builder configured from the environment, as the CLI is:
    /// `SANDFLEET_ENDPOINT` (comma-separated; default `127.0.0.1:7070`, a
    /// `sandfleet dev` cluster), `SANDFLEET_API_KEY`, and `SANDFLEET_TLS_CA`,
    /// `SANDFLEET_TLS_CERT`, `SANDFLEET_TLS_KEY`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let endpoints: Vec<String> = var(ENV_ENDPOINT)
            .map(|e| e.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()]);
        let path = |k: &str| var(k).map(PathBuf::from);
        let tls = TlsOptions::from_parts(path(ENV_TLS_CA), path(ENV_TLS_CERT), path(ENV_TLS_KEY))?;
        Ok(Self::new(endpoints).tls(tls).api_key(var(ENV_API_KEY)))
    }

    /// Coordinator endpoints, as `host:port` or `http://host:port`.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: Backoff::default(),
            tls: None,
            api_key: None,
        }
    }

    /// An API key (`sfk_<id>_<secret>`) sent as `authorization: Bearer <key>`
    /// with every control-plane call (sessions, nodes, cluster, tenants, keys);
    /// never with data-plane calls, which carry the session token. `None` or
    /// an empty key sends none.
    pub fn api_key(mut self, key: Option<impl Into<String>>) -> Self {
        self.api_key = key.map(Into::into).filter(|k: &String| !k.trim().is_empty()).map(Secret);
        self
    }

    /// Talk TLS to coordinators and agents (see [`TlsOptions`]); plaintext
    /// (an `--insecure` loopback cluster) without it.
    pub fn tls(mut self, tls: Option<TlsOptions>) -> Self {
        self.tls = tls;
        self
    }

    /// TCP connect timeout for coordinators and agents (default 3 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Deadline of each control-plane attempt (default 10 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// How many times an idempotent call is retried on `UNAVAILABLE` (default 8).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The backoff between retries (default: full jitter, 50 ms doubling to 2 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Builds the client. Connections are made lazily on first use, so this
    /// only fails for an empty or malformed endpoint list.
    pub async fn connect(self) -> Result<Client, Error> {
        let coordinators: Vec<String> =
            self.endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).map(normalize_endpoint).collect();
        if coordinators.is_empty() {
            return Err(Error::InvalidArgument("no coordinator endpoint given".into()));
        }
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                Some(ClientTls::new(t.ca.clone(), t.cert_and_key.clone()).map_err(|e| Error::Tls(e.to_string()))?)
            }
        };
        let dialers =
            tls.map(|tls| (tls.dialer(Some(IdentityKind::Coordinator)), tls.dialer(Some(IdentityKind::Agent))));
        let mut channels = HashMap::new();
        for uri in &coordinators {
            if !channels.contains_key(uri) {
                let dialer = dialers.as_ref().map(|(c, _)| c);
                channels.insert(uri.clone(), make_channel(uri, self.connect_timeout, dialer)?);
            }
        }
        let auth = match &self.api_key {
            None => None,
            Some(Secret(k)) => {
                let k = k.trim();
                if sandfleet_common::auth::ApiKey::parse(k).is_none() {
                    return Err(Error::InvalidArgument(
                        "invalid API key: expected sfk_<16 hex>_<43 base64url characters>".into(),
                    ));
                }
                Some(
                    MetadataValue::try_from(format!("Bearer {k}"))
                        .map_err(|_| Error::InvalidArgument("invalid API key: not ASCII".into()))?,
                )
            }
        };
        debug!(endpoints = ?coordinators, api_key = auth.is_some(), "sandfleet client ready");
        Ok(Client {
            inner: Arc::new(Inner {
                coordinators,
                preferred: AtomicUsize::new(0),
                channels: Mutex::new(channels),
                connect_timeout: self.connect_timeout,
                request_timeout: self.request_timeout,
                max_retries: self.max_retries,
                backoff: self.backoff,
                dialers,
                auth: ApiKeyAuth(auth),
            }),
        })
    }
}

/// A handle on a Sandfleet cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// Coordinator URIs (`http://host:port`).
    coordinators: Vec<String>,
    /// Index of the coordinator to try first (the last one that answered).
    preferred: AtomicUsize,
    /// One lazily connected channel per coordinator and per agent address.
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_retries: u32,
    backoff: Backoff,
    /// TLS dialers toward coordinators and toward agents; `None` for plaintext.
    dialers: Option<(TlsDialer, TlsDialer)>,
    auth: ApiKeyAuth,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("coordinators", &self.inner.coordinators)
            .field("request_timeout", &self.inner.request_timeout)
            .field("max_retries", &self.inner.max_retries)
            .finish_non_exhaustive()
    }
}

/// `host:port` becomes `http://host:port`; URIs with a scheme are kept (the
/// rule of `sandfleet_common::grpc`, shared with the servers' own clients).
pub(crate) use sandfleet_common::grpc::normalize_uri as normalize_endpoint;

fn make_channel(uri: &str, connect_timeout: Duration, tls: Option<&TlsDialer>) -> Result<Channel, Error> {
    let opts = ChannelOptions { connect_timeout, ..ChannelOptions::CLIENT };
    grpc::channel(uri, opts, tls).map_err(|e| Error::Connect { endpoint: uri.to_string(), source: Box::new(e) })
}

/// Adds the session bearer token to a data-plane request.
pub(crate) struct DataTarget {
    pub(crate) channel: Channel,
    pub(crate) session_id: String,
    auth: MetadataValue<Ascii>,
}

impl DataTarget {
    /// A request with the `authorization` header, the current span's trace
    /// context and, if given, a deadline.
    pub(crate) fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", self.auth.clone());
        sandfleet_common::trace_context::inject(req.metadata_mut());
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        req
    }
}

pub(crate) fn session_client(ch: ControlChannel) -> SessionServiceClient<Ctl> {
    SessionServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn cluster_client(ch: ControlChannel) -> ClusterServiceClient<Ctl> {
    ClusterServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn node_client(ch: ControlChannel) -> NodeServiceClient<Ctl> {
    NodeServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn tenant_client(ch: ControlChannel) -> crate::proto::tenant_service_client::TenantServiceClient<Ctl> {
    crate::proto::tenant_service_client::TenantServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn api_key_client(ch: ControlChannel) -> crate::proto::api_key_service_client::ApiKeyServiceClient<Ctl> {
    crate::proto::api_key_service_client::ApiKeyServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn pool_client(ch: ControlChannel) -> crate::proto::pool_service_client::PoolServiceClient<Ctl> {
    crate::proto::pool_service_client::PoolServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn template_client(ch: ControlChannel) -> crate::proto::template_service_client::TemplateServiceClient<Ctl> {
    crate::proto::template_service_client::TemplateServiceClient::with_interceptor(ch.channel, ch.auth)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

pub(crate) fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

pub(crate) fn missing(what: &str) -> Error {
    Error::Protocol(format!("the server's answer has no {what}"))
}

impl Client {
    /// Connects to coordinators (`host:port` or `http://host:port`) with default settings.
    /// See [`ClientBuilder`] for the knobs.
    pub async fn connect(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Client, Error> {
        ClientBuilder::new(endpoints).connect().await
    }

    /// A builder, same as [`ClientBuilder::new`].
    pub fn builder(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientBuilder {
        ClientBuilder::new(endpoints)
    }

    /// The coordinator URIs this client uses.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.coordinators
    }

    /// The per-attempt deadline of control-plane calls.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The cached channel to `uri`, made on first use.
    pub(crate) fn channel(&self, uri: &str) -> Result<Channel, Error> {
        let mut channels = self.inner.channels.lock();
        if let Some(ch) = channels.get(uri) {
            return Ok(ch.clone());
        }
        // Coordinators' channels are made up front; any other address is an agent's.
        let dialer = self.inner.dialers.as_ref().map(|(_, agent)| agent);
        let ch = make_channel(uri, self.inner.connect_timeout, dialer)?;
        channels.insert(uri.to_string(), ch.clone());
        Ok(ch)
    }

    /// Runs one control-plane call with failover and retries.
    ///
    /// `call` gets a channel to one coordinator and the deadline to put on the
    /// request; it is called again (with the next coordinator) when `policy`
    /// allows retrying its failure.
    pub(crate) async fn control<T, F, Fut>(
        &self,
        op: &'static str,
        policy: RetryPolicy,
        timeout: Duration,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(ControlChannel, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let inner = &self.inner;
        let n = inner.coordinators.len();
        let start = inner.preferred.load(Ordering::Relaxed) % n;
        let mut attempt: u32 = 0;
        loop {
            let idx = (start + attempt as usize) % n;
            let uri = &inner.coordinators[idx];
            let channel = ControlChannel { channel: self.channel(uri)?, auth: inner.auth.clone() };
            let result = match tokio::time::timeout(timeout + LOCAL_DEADLINE_SLACK, call(channel, timeout)).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "{op}: no answer from {uri} within {}",
                    humanize(timeout)
                ))),
            };
            let status = match result {
                Ok(v) => {
                    inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(status) => status,
            };
            if !policy.allows(&status) || attempt >= inner.max_retries {
                if retry::is_connect_failure(&status) {
                    return Err(Error::Connect {
                        endpoint: uri.clone(),
                        source: retry::describe_transport_failure(&status).into(),
                    });
                }
                return Err(status.into());
            }
            // Start the next call with another coordinator.
            inner.preferred.store((idx + 1) % n, Ordering::Relaxed);
            let delay = inner.backoff.delay(attempt);
            debug!(
                op,
                endpoint = %uri,
                attempt,
                code = crate::error::code_name(status.code()),
                message = status.message(),
                delay_ms = delay.as_millis() as u64,
                "retrying on the next coordinator"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Creates a session and returns it (normally PENDING). Retries reuse
    /// `req.request_id`, so a retried create never doubles a session.
    pub async fn create_session(&self, req: CreateSession) -> Result<proto::Session, Error> {
        self.create_session_full(req).await?.session.ok_or_else(|| missing("session"))
    }

    /// Like [`create_session`](Self::create_session) but returns the whole
    /// response, whose `existing` says whether this request id had already
    /// created the session.
    pub async fn create_session_full(&self, req: CreateSession) -> Result<proto::CreateSessionResponse, Error> {
        let span = tracing::info_span!("create_session", request_id = %req.request_id);
        // The server's own checks, so a bad spec fails here with the code the
        // server would give, without a round trip.
        req.validate()?;
        let msg = req.into_proto();
        self.control("create_session", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).create_session(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(span)
        .await
    }

    /// One session, with a fresh data-plane token (linearizable read).
    pub async fn get_session(&self, id: &str) -> Result<proto::Session, Error> {
        let msg =
            proto::GetSessionRequest { id: id.to_string(), consistency: proto::ReadConsistency::Linearizable as i32 };
        self.control("get_session", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).get_session(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("get_session", id))
        .await?
        .session
        .ok_or_else(|| missing("session"))
    }

    /// One page of sessions. Follow `next_page_token` for more.
    pub async fn list_sessions(&self, req: proto::ListSessionsRequest) -> Result<proto::ListSessionsResponse, Error> {
        self.control("list_sessions", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = req.clone();
            async move { Ok(session_client(ch).list_sessions(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("list_sessions"))
        .await
    }

    /// Every session matching `req`, following pages from `req.page_token`.
    pub async fn list_all_sessions(&self, mut req: proto::ListSessionsRequest) -> Result<Vec<proto::Session>, Error> {
        let mut all = Vec::new();
        loop {
            let page = self.list_sessions(req.clone()).await?;
            all.extend(page.sessions);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Terminates a session (a no-op for one already terminated) and returns it.
    pub async fn delete_session(&self, id: &str) -> Result<proto::Session, Error> {
        let msg = proto::DeleteSessionRequest { id: id.to_string() };
        self.control("delete_session", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).delete_session(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::info_span!("delete_session", id))
        .await?
        .session
        .ok_or_else(|| missing("session"))
    }

    /// Pushes a session's expiry out by `ttl` from now (`None`: its own ttl).
    /// Returns the session with a fresh token.
    pub async fn renew_session(&self, id: &str, ttl: Option<Duration>) -> Result<proto::Session, Error> {
        let msg = proto::RenewSessionRequest { id: id.to_string(), ttl_seconds: ttl.map(ceil_secs).unwrap_or(0) };
        self.control("renew_session", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).renew_session(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("renew_session", id))
        .await?
        .session
        .ok_or_else(|| missing("session"))
    }

    /// Streams a session's states (without token), starting with the current
    /// one, until it terminates or the server hangs up. Opening the watch is
    /// retried like any idempotent call; a broken stream is not resumed.
    pub async fn watch_session(&self, id: &str) -> Result<SessionWatch, Error> {
        self.watch_inner(id, None).await
    }

    async fn watch_inner(&self, id: &str, deadline: Option<Duration>) -> Result<SessionWatch, Error> {
        let msg = proto::WatchSessionRequest { id: id.to_string() };
        // The first message (the current state) is awaited inside the retried
        // attempt, so a watch is retried only before anything was delivered.
        let open_timeout = deadline.map_or(self.inner.request_timeout, |d| d.min(self.inner.request_timeout));
        let (first, rest) = self
            .control("watch_session", RetryPolicy::Idempotent, open_timeout, |ch, _t| {
                let msg = msg.clone();
                async move {
                    let mut req = tonic::Request::new(msg);
                    if let Some(d) = deadline {
                        req.set_timeout(d);
                    }
                    let mut stream = session_client(ch).watch_session(req).await?.into_inner();
                    let first = stream.message().await?;
                    Ok((first, stream))
                }
            })
            .instrument(tracing::debug_span!("watch_session", id))
            .await?;
        let head = stream::iter(first.map(Ok));
        let events = head.chain(rest).filter_map(|item| async move {
            match item {
                Ok(ev) => ev.session.map(Ok),
                Err(status) => Some(Err(Error::from(status))),
            }
        });
        Ok(events.boxed())
    }

    /// Waits until the session is RUNNING and returns it with a fresh token.
    ///
    /// Uses WatchSession (re-opened if it breaks; polling GetSession if the
    /// server does not implement it). Fails with [`Error::SessionFailed`] when
    /// the session goes FAILED or TERMINATED, and with [`Error::Timeout`] after
    /// `timeout`, naming the last state and pending reason.
    pub async fn wait_running(&self, id: &str, timeout: Duration) -> Result<proto::Session, Error> {
        let span = tracing::debug_span!("wait_running", id, timeout_ms = timeout.as_millis() as u64);
        let deadline = Instant::now() + timeout;
        let mut last: Option<proto::Session> = None;
        let wait = self.wait_running_inner(id, deadline, &mut last);
        let result = tokio::time::timeout_at(deadline, wait).instrument(span).await;
        match result {
            Ok(r) => r,
            Err(_) => {
                let mut msg = format!("session {id} is not running after {}", humanize(timeout));
                if let Some(s) = &last {
                    msg.push_str(&format!(" (state {}", state_name(s.state)));
                    if !s.pending_reason.is_empty() {
                        msg.push_str(&format!(": {}", s.pending_reason));
                    }
                    msg.push(')');
                }
                Err(Error::Timeout(msg))
            }
        }
    }

    async fn wait_running_inner(
        &self,
        id: &str,
        deadline: Instant,
        last: &mut Option<proto::Session>,
    ) -> Result<proto::Session, Error> {
        let mut attempt = 0u32;
        let mut poll = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if poll {
                let s = self.get_session(id).await?;
                if let Some(done) = self.check_running(s, last).await? {
                    return Ok(done);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            // The server-side deadline outlives ours, so our timeout (with its
            // pending reason) is what the caller sees.
            match self.watch_inner(id, Some(remaining + WATCH_DEADLINE_SLACK)).await {
                Ok(mut watch) => {
                    while let Some(item) = watch.next().await {
                        match item {
                            Ok(s) => {
                                attempt = 0;
                                if let Some(done) = self.check_running(s, last).await? {
                                    return Ok(done);
                                }
                            }
                            Err(e) if matches!(&e, Error::Status(s) if retry::is_unavailable(s)) => {
                                debug!(id, error = %e, "watch broke; re-opening");
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.code() == Some(tonic::Code::Unimplemented) => {
                    debug!(id, "WatchSession unimplemented; polling GetSession");
                    poll = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(self.inner.backoff.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// `Some(session with token)` once RUNNING; an error once terminal; `None` to keep waiting.
    async fn check_running(
        &self,
        s: proto::Session,
        last: &mut Option<proto::Session>,
    ) -> Result<Option<proto::Session>, Error> {
        let state = proto::SessionState::try_from(s.state).unwrap_or(proto::SessionState::Unspecified);
        if is_terminal(s.state) {
            return Err(Error::SessionFailed { id: s.id.clone(), state, message: s.message.clone() });
        }
        if state != proto::SessionState::Running {
            *last = Some(s);
            return Ok(None);
        }
        // Watch events carry no token; fetch the session with one.
        let full = if s.token.is_empty() { self.get_session(&s.id).await? } else { s };
        if full.state == proto::SessionState::Running as i32 {
            return Ok(Some(full));
        }
        if is_terminal(full.state) {
            let state = proto::SessionState::try_from(full.state).unwrap_or(proto::SessionState::Unspecified);
            return Err(Error::SessionFailed { id: full.id.clone(), state, message: full.message.clone() });
        }
        *last = Some(full);
        Ok(None)
    }

    /// Every registered node agent.
    pub async fn list_nodes(&self) -> Result<Vec<proto::Node>, Error> {
        let resp = self
            .control("list_nodes", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| async move {
                Ok(node_client(ch).list_nodes(with_timeout(proto::ListNodesRequest {}, t)).await?.into_inner())
            })
            .instrument(tracing::debug_span!("list_nodes"))
            .await?;
        Ok(resp.nodes)
    }

    /// Starts draining a node: no new placements, and its sessions move to
    /// other nodes, `max_parallel` at a time; after `deadline` the rest move
    /// at once. Follow progress in [`list_nodes`](Self::list_nodes)' `drain`.
    pub async fn drain_node(&self, node_id: &str, deadline: Duration, max_parallel: u32) -> Result<proto::Node, Error> {
        let msg = proto::DrainNodeRequest {
            node_id: node_id.to_string(),
            deadline_seconds: ceil_secs(deadline).max(1),
            max_parallel,
        };
        self.control("drain_node", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(node_client(ch).drain_node(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("drain_node", node_id, max_parallel))
        .await?
        .node
        .ok_or_else(|| missing("node"))
    }

    /// Stops new placements on a node (`cordoned = true`) or allows them again.
    /// Sessions already on it keep running. Idempotent, so it is retried.
    pub async fn cordon_node(&self, node_id: &str, cordoned: bool) -> Result<proto::Node, Error> {
        let msg = proto::CordonNodeRequest { node_id: node_id.to_string(), cordoned };
        self.control("cordon_node", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(node_client(ch).cordon_node(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("cordon_node", node_id, cordoned))
        .await?
        .node
        .ok_or_else(|| missing("node"))
    }

    /// Status of every coordinator.
    pub async fn cluster_status(&self) -> Result<proto::ClusterStatusResponse, Error> {
        self.control("cluster_status", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| async move {
            Ok(cluster_client(ch).status(with_timeout(proto::ClusterStatusRequest {}, t)).await?.into_inner())
        })
        .instrument(tracing::debug_span!("cluster_status"))
        .await
    }

    /// Pauses (`true`) or resumes (`false`) placement cluster-wide. While
    /// paused, new sessions and sessions that lost their node stay PENDING and
    /// drains move nothing; running sessions are untouched. Idempotent, so it
    /// is retried like a read.
    pub async fn set_scheduler_paused(&self, paused: bool) -> Result<proto::SetSchedulerPausedResponse, Error> {
        self.control("set_scheduler_paused", RetryPolicy::Idempotent, self.inner.request_timeout, |ch, t| async move {
            Ok(cluster_client(ch)
                .set_scheduler_paused(with_timeout(proto::SetSchedulerPausedRequest { paused }, t))
                .await?
                .into_inner())
        })
        .instrument(tracing::debug_span!("set_scheduler_paused", paused))
        .await
    }

    /// Initializes a new cluster whose first voters are `members` (Raft id,
    /// `host:port`). Sent to this client's first reachable coordinator, which
    /// must be one of the members and must not be initialized yet
    /// (FAILED_PRECONDITION otherwise). Returns once a leader is elected.
    pub async fn init_cluster(
        &self,
        members: impl IntoIterator<Item = (u64, String)>,
    ) -> Result<proto::ClusterStatusResponse, Error> {
        let msg = proto::InitClusterRequest { members: members.into_iter().collect(), create_admin_key: false };
        let timeout = self.inner.request_timeout.max(MEMBERSHIP_TIMEOUT);
        self.control("init_cluster", RetryPolicy::ConnectOnly, timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(cluster_client(ch).init_cluster(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("init_cluster"))
        .await?
        .status
        .ok_or_else(|| missing("status"))
    }

    /// Adds a coordinator (as a learner, then a voter once caught up).
    /// Retried only when no coordinator could be reached; its deadline is at least 60 s.
    pub async fn add_member(&self, id: u64, address: &str) -> Result<proto::ClusterStatusResponse, Error> {
        let msg = proto::AddMemberRequest { id, address: address.to_string() };
        let timeout = self.inner.request_timeout.max(MEMBERSHIP_TIMEOUT);
        self.control("add_member", RetryPolicy::ConnectOnly, timeout, |ch, t| {
            let msg = msg.clone();
            async move { Ok(cluster_client(ch).add_member(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("add_member", id, address))
        .await?
        .status
        .ok_or_else(|| missing("status"))
    }

    /// Removes a coordinator. Retried only when no coordinator could be reached.
    pub async fn remove_member(&self, id: u64) -> Result<proto::ClusterStatusResponse, Error> {
        let msg = proto::RemoveMemberRequest { id };
        let timeout = self.inner.request_timeout.max(MEMBERSHIP_TIMEOUT);
        self.control("remove_member", RetryPolicy::ConnectOnly, timeout, |ch, t| async move {
            Ok(cluster_client(ch).remove_member(with_timeout(msg, t)).await?.into_inner())
        })
        .instrument(tracing::debug_span!("remove_member", id))
        .await?
        .status
        .ok_or_else(|| missing("status"))
    }

    // ------------------------------------------------------------------
    // Data plane plumbing
    // ------------------------------------------------------------------

    fn data_target(&self, s: &proto::Session) -> Result<DataTarget, Error> {
        let uri = normalize_endpoint(&s.node_address);
        let channel = self.channel(&uri)?;
        let auth: MetadataValue<Ascii> = format!("Bearer {}", s.token)
            .parse()
            .map_err(|_| Error::InvalidArgument("the session token is not valid header text".into()))?;
        Ok(DataTarget { channel, session_id: s.id.clone(), auth })
    }

    /// Runs one data-plane call against the session's agent.
    ///
    /// A session without token or address (e.g. from a list or a watch) is
    /// fetched first. When the agent answers UNAUTHENTICATED (token expired),
    /// UNAVAILABLE or FAILED_PRECONDITION (the session moved), the session is
    /// fetched again and the call made once more.
    pub(crate) async fn data_call<T, F, Fut>(
        &self,
        session: &proto::Session,
        op: &'static str,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut(DataTarget) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        if session.id.is_empty() {
            return Err(Error::InvalidArgument("the session has no id".into()));
        }
        let mut current: Cow<'_, proto::Session> = Cow::Borrowed(session);
        let mut refreshed = false;
        if current.token.is_empty() || current.node_address.is_empty() {
            current = Cow::Owned(self.refresh_for_data(&session.id).await?);
            refreshed = true;
        }
        loop {
            let target = self.data_target(&current)?;
            let node = current.node_address.clone();
            match call(target).await {
                Ok(v) => return Ok(v),
                Err(status)
                    if !refreshed
                        && (matches!(
                            status.code(),
                            tonic::Code::Unauthenticated | tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                        ) || retry::is_unavailable(&status)) =>
                {
                    debug!(
                        op,
                        session = %session.id,
                        node = %node,
                        code = crate::error::code_name(status.code()),
                        message = status.message(),
                        "refreshing the session and retrying once"
                    );
                    current = Cow::Owned(self.refresh_for_data(&session.id).await?);
                    refreshed = true;
                }
                Err(status) => {
                    if retry::is_connect_failure(&status) {
                        return Err(Error::Connect {
                            endpoint: normalize_endpoint(&node),
                            source: retry::describe_transport_failure(&status).into(),
                        });
                    }
                    return Err(status.into());
                }
            }
        }
    }

    /// The session, fresh from a coordinator, if the data plane can use it.
    async fn refresh_for_data(&self, id: &str) -> Result<proto::Session, Error> {
        let s = self.get_session(id).await?;
        if is_terminal(s.state) {
            let state = proto::SessionState::try_from(s.state).unwrap_or(proto::SessionState::Unspecified);
            return Err(Error::SessionFailed { id: s.id, state, message: s.message });
        }
        if s.node_address.is_empty() || s.state != proto::SessionState::Running as i32 {
            let mut msg = format!("session {id} is {}", state_name(s.state));
            if !s.pending_reason.is_empty() {
                msg.push_str(&format!(": {}", s.pending_reason));
            }
            msg.push_str("; wait until it is RUNNING");
            return Err(Error::Status(tonic::Status::failed_precondition(msg)));
        }
        if s.token.is_empty() {
            return Err(missing("session token"));
        }
        Ok(s)
    }
}

/// `1.5s`, `10s`, `2m` style text for messages.
pub(crate) fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_is_lazy_and_checks_input() {
        let c = Client::connect(["127.0.0.1:1", "http://127.0.0.1:2"]).await.expect("lazy connect");
        assert_eq!(c.endpoints(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let empty: [&str; 0] = [];
        assert!(matches!(Client::connect(empty).await, Err(Error::InvalidArgument(_))));
        assert!(matches!(Client::connect(["http://bad host:1"]).await, Err(Error::Connect { .. })));
    }

    #[test]
    fn the_environment_configures_a_builder_as_it_does_the_cli() {
        let env: HashMap<&str, &str> = [
            (ENV_ENDPOINT, "a:1, b:2"),
            (ENV_TLS_CA, "/pki/ca.crt"),
            (ENV_TLS_CERT, "/pki/me.crt"),
            (ENV_TLS_KEY, "/pki/me.key"),
            (ENV_API_KEY, " "),
        ]
        .into();
        let b = ClientBuilder::from_vars(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(b.endpoints, ["a:1", "b:2"]);
        assert_eq!(
            b.tls,
            Some(TlsOptions {
                ca: "/pki/ca.crt".into(),
                cert_and_key: Some(("/pki/me.crt".into(), "/pki/me.key".into()))
            })
        );
        assert!(b.api_key.is_none(), "a blank key is no key");
        let none = ClientBuilder::from_vars(|_| None).unwrap();
        assert_eq!((none.endpoints, none.tls), (vec![DEFAULT_ENDPOINT.to_string()], None));
        let half = ClientBuilder::from_vars(|k| (k == ENV_TLS_CERT).then(|| "/c".to_string()));
        assert!(matches!(half, Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn the_api_key_is_checked_and_never_printed() {
        let key = sandfleet_common::auth::ApiKey::generate().expose();
        let b = ClientBuilder::new(["127.0.0.1:1"]).api_key(Some(key.clone()));
        assert!(!format!("{b:?}").contains(&key[4..]), "Debug must not print the key");
        assert!(b.connect().await.is_ok());
        let bad = ClientBuilder::new(["127.0.0.1:1"]).api_key(Some("sfk_short")).connect().await;
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
        assert!(ClientBuilder::new(["127.0.0.1:1"]).api_key(None::<String>).connect().await.is_ok());
    }

    #[test]
    fn humanized_durations() {
        assert_eq!(humanize(Duration::from_millis(50)), "50ms");
        assert_eq!(humanize(Duration::from_secs(10)), "10s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
    }
}
