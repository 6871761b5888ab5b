//! The daemons' standard gRPC health service (`grpc.health.v1.Health`, from
//! the `tonic-health` crate), for Kubernetes probes and load balancers.
//!
//! One [`Health`] per daemon holds the statuses; it is served on the daemon's
//! own gRPC listener and, with `--health-listen ADDR`, on a plaintext listener
//! of its own ([`spawn_listener`]). That second listener exists because a
//! Kubernetes `grpc` probe speaks neither TLS nor mutual TLS: on a TLS cluster
//! it could not reach the main port. It serves the health service alone, so
//! it reveals nothing but "ready or not" and takes no credential, and is
//! allowed on any address (unlike `--insecure`). On the main listener the
//! health service needs no credential either (the public services resolve
//! their caller per call; health has no caller), though the TLS handshake
//! still needs the cluster CA.
//!
//! The statuses:
//! - `""` (the whole server) and every service name the daemon serves
//!   (`sandfleet.v1.SessionService`, ...): SERVING only while the daemon is
//!   ready (the daemon decides what that means, see [`Health::set_ready`]);
//!   NOT_SERVING before, whenever it stops being ready, and from the moment it
//!   starts shutting down. Readiness probes ask for `""`.
//! - [`LIVENESS`] (`"liveness"`): SERVING from start until the shutdown begins,
//!   whatever the cluster does. Liveness probes ask for it: a member that lost
//!   its quorum is not ready, but restarting it would not help.
//!
//! A `Watch` stream sends NOT_SERVING when the shutdown begins and then ends,
//! so a watcher never holds up the daemon's graceful stop.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_server::{Health as HealthRpc, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// The service name a liveness probe asks for: SERVING while the process runs
/// and is not shutting down.
pub const LIVENESS: &str = "liveness";

/// The health statuses of one daemon.
pub struct Health {
    reporter: HealthReporter,
    /// `""` and every service name the daemon serves.
    names: Vec<String>,
    /// The last readiness set (`None` before the first), to log changes only.
    ready: Mutex<Option<bool>>,
    /// Why the daemon is not ready, from the last [`Health::set_ready`].
    reason: Mutex<String>,
    /// Fired when the shutdown begins: everything is NOT_SERVING from then on.
    stopping: CancellationToken,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("names", &self.names).field("ready", &*self.ready.lock()).finish()
    }
}

impl Health {
    /// Statuses for `""` and `services` (NOT_SERVING) and [`LIVENESS`] (SERVING).
    pub async fn new(services: &[&str]) -> Arc<Self> {
        let reporter = HealthReporter::new();
        let names: Vec<String> = std::iter::once("").chain(services.iter().copied()).map(String::from).collect();
        for name in &names {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
        Arc::new(Self {
            reporter,
            names,
            ready: Mutex::new(None),
            reason: Mutex::new("starting".into()),
            stopping: CancellationToken::new(),
        })
    }

    /// The gRPC service, to add to a server.
    pub fn service(&self) -> HealthServer<HealthApi> {
        HealthServer::new(HealthApi {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            stopping: self.stopping.clone(),
        })
    }

    /// Sets `""` and every service name SERVING (`Ok`) or NOT_SERVING (`Err`
    /// with the reason, logged when the status changes). Ignored once the
    /// shutdown has begun.
    pub async fn set_ready(&self, ready: Result<(), String>) {
        if self.stopping.is_cancelled() {
            return;
        }
        let now = ready.is_ok();
        *self.reason.lock() = ready.as_ref().err().cloned().unwrap_or_default();
        let before = self.ready.lock().replace(now);
        if before == Some(now) {
            return;
        }
        match &ready {
            Ok(()) => tracing::info!("health: SERVING"),
            Err(why) => tracing::info!(reason = %why, "health: NOT_SERVING"),
        }
        let status = if now { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Whether the daemon last said it was ready.
    pub fn is_ready(&self) -> bool {
        *self.ready.lock() == Some(true) && !self.stopping.is_cancelled()
    }

    /// `Ok` when ready, else why not (the reason last given to
    /// [`Health::set_ready`], "starting" before it, or "shutting down").
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping.is_cancelled() {
            return Err("shutting down".into());
        }
        if *self.ready.lock() == Some(true) {
            Ok(())
        } else {
            Err(self.reason.lock().clone())
        }
    }

    /// Whether the shutdown has begun ([`LIVENESS`] is NOT_SERVING then).
    pub fn is_shutting_down(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// The shutdown has begun: everything, [`LIVENESS`] included, is
    /// NOT_SERVING from now on, and `Watch` streams end after saying so.
    pub async fn shutting_down(&self) {
        if self.stopping.is_cancelled() {
            return;
        }
        tracing::info!("health: NOT_SERVING (shutting down)");
        for name in self.names.iter().map(String::as_str).chain([LIVENESS]) {
            self.reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        self.stopping.cancel();
    }

    /// Calls [`Health::shutting_down`] when `shutdown` fires; the task ends then.
    pub fn spawn_shutdown_watch(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            this.shutting_down().await;
        })
    }
}

/// The served `grpc.health.v1.Health`: tonic-health's service, with `Watch`
/// streams that end at the shutdown.
pub struct HealthApi {
    inner: HealthService,
    stopping: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl HealthRpc for HealthApi {
    async fn check(&self, req: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(req).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(req).await?.into_inner();
        Ok(Response::new(until_stopping(inner, self.stopping.clone())))
    }
}

/// `inner`'s messages until `stopping` fires, then a NOT_SERVING, then the end.
///
/// The statuses turn NOT_SERVING before `stopping` fires, so `inner` has that
/// message ready by then; one is made up should it not.
fn until_stopping(inner: tonic_health::server::WatchStream, stopping: CancellationToken) -> WatchStream {
    let not_serving = || Ok(HealthCheckResponse { status: PbStatus::NotServing as i32 });
    Box::pin(futures::stream::unfold(Some((inner, stopping)), move |state| async move {
        let (mut inner, stopping) = state?;
        let item = tokio::select! {
            biased;
            item = inner.next() => item?,
            () = stopping.cancelled() => not_serving(),
        };
        let last = stopping.is_cancelled() && matches!(&item, Ok(r) if r.status == PbStatus::NotServing as i32);
        Some((item, if last { None } else { Some((inner, stopping)) }))
    }))
}

/// The `--health-listen` server: `health` alone, in plaintext. It keeps
/// answering (NOT_SERVING) through the daemon's shutdown until
/// [`Listener::stop`], the daemon's last step.
pub struct Listener {
    addr: std::net::SocketAddr,
    server: tokio_util::task::AbortOnDropHandle<Result<(), tonic::transport::Error>>,
    stop: CancellationToken,
}

impl Listener {
    /// Binds `at` and serves `health` there.
    pub async fn bind(at: std::net::SocketAddr, health: &Health) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let router = tonic::transport::Server::builder().add_service(health.service());
        let server = crate::tls::spawn_server(router, listener, None, stop.clone()).server;
        tracing::info!(%addr, "grpc.health.v1 in plaintext on the health listener");
        Ok(Self { addr, server, stop })
    }

    /// The bound address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops the server, waiting at most `within` for it.
    pub async fn stop(self, within: std::time::Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(within, self.server).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(api: &HealthApi, service: &str) -> Result<PbStatus, tonic::Code> {
        let req = Request::new(HealthCheckRequest { service: service.into() });
        api.check(req).await.map(|r| r.into_inner().status()).map_err(|s| s.code())
    }

    fn api(h: &Health) -> HealthApi {
        HealthApi { inner: HealthService::from_health_reporter(h.reporter.clone()), stopping: h.stopping.clone() }
    }

    #[tokio::test]
    async fn not_serving_until_ready_and_from_the_shutdown_on() {
        let h = Health::new(&["sandfleet.v1.X"]).await;
        let api = api(&h);
        assert_eq!(check(&api, "").await, Ok(PbStatus::NotServing));
        assert_eq!(check(&api, "sandfleet.v1.X").await, Ok(PbStatus::NotServing));
        assert_eq!(check(&api, LIVENESS).await, Ok(PbStatus::Serving));
        assert_eq!(check(&api, "other").await, Err(tonic::Code::NotFound));
        h.set_ready(Ok(())).await;
        assert!(h.is_ready());
        assert_eq!(check(&api, "").await, Ok(PbStatus::Serving));
        assert_eq!(check(&api, "sandfleet.v1.X").await, Ok(PbStatus::Serving));
        h.set_ready(Err("no leader".into())).await;
        assert_eq!(check(&api, "").await, Ok(PbStatus::NotServing));
        h.set_ready(Ok(())).await;
        h.shutting_down().await;
        assert!(!h.is_ready());
        for name in ["", "sandfleet.v1.X", LIVENESS] {
            assert_eq!(check(&api, name).await, Ok(PbStatus::NotServing), "{name:?}");
        }
        // Nothing turns it back on.
        h.set_ready(Ok(())).await;
        assert_eq!(check(&api, "").await, Ok(PbStatus::NotServing));
    }

    #[tokio::test]
    async fn watch_streams_say_not_serving_and_end_at_the_shutdown() {
        let h = Health::new(&[]).await;
        let api = api(&h);
        let mut stream =
            api.watch(Request::new(HealthCheckRequest { service: String::new() })).await.unwrap().into_inner();
        let status = |m: Option<Result<HealthCheckResponse, Status>>| m.unwrap().unwrap().status();
        assert_eq!(status(stream.next().await), PbStatus::NotServing);
        h.set_ready(Ok(())).await;
        assert_eq!(status(stream.next().await), PbStatus::Serving);
        h.shutting_down().await;
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let last = status(stream.next().await);
            (last, stream.next().await.is_none())
        });
        assert_eq!(end.await.expect("the stream ends"), (PbStatus::NotServing, true));
    }
}
