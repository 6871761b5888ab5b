//! The daemons' metrics: OpenTelemetry instruments, read two ways.
//!
//! [`crate::telemetry::init`] installs one global `SdkMeterProvider` per
//! process with two readers:
//! - a Prometheus reader into a [`prometheus::Registry`], encoded in the
//!   Prometheus text format on `GET /metrics` of the `--metrics-listen`
//!   server ([`Listener`]);
//! - when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OTLP/gRPC exporter that
//!   pushes every `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default).
//!
//! Instruments are named the OpenTelemetry way (`sandfleet.raft.proposal.duration`,
//! unit `s`); the Prometheus reader turns that into
//! `sandfleet_raft_proposal_duration_seconds`, adds `_total` to counters, and
//! drops annotation units such as `{session}`. Each crate makes its own
//! instruments once, from [`meter`], with labels of bounded cardinality only
//! (states, runtimes, result codes: never a session id, a request id or a
//! user's string). `docs/operations.md` lists every one.
//!
//! The same listener serves `GET /healthz` (200 while the process runs and is
//! not shutting down) and `GET /readyz` (200 when the daemon's
//! [`Health`](crate::health::Health) says it is ready, else 503 with the
//! reason), for HTTP probes and load balancers. Like `--health-listen` it is
//! plaintext and reveals no credential or user data, so it is allowed on any
//! address.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use opentelemetry::metrics::Meter;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Histogram boundaries for latencies in seconds: 0.5 ms to 60 s.
pub const LATENCY_BUCKETS_S: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Histogram boundaries for counts per round or batch: 0 to 10,000.
pub const COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 10000.0];

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A latency histogram in seconds with [`LATENCY_BUCKETS_S`].
pub fn latency_histogram(
    meter: &Meter,
    name: &'static str,
    description: &'static str,
) -> opentelemetry::metrics::Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(LATENCY_BUCKETS_S.to_vec())
        .build()
}

/// The Prometheus registry the global meter provider's Prometheus reader
/// writes into; set once by [`crate::telemetry::init`].
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// The registry [`crate::telemetry::init`] made, or a fresh one that nothing
/// writes into when it was not called (library use, unit tests).
pub fn registry() -> &'static prometheus::Registry {
    REGISTRY.get_or_init(prometheus::Registry::new)
}

/// The meter every Sandfleet instrument comes from (the instrumentation scope
/// is `sandfleet`). Instruments made before [`crate::telemetry::init`] record
/// nothing, so daemons make theirs after it.
pub fn meter() -> Meter {
    opentelemetry::global::meter("sandfleet")
}

/// Builds the meter provider with the Prometheus reader (and the OTLP
/// exporter when `otlp`) and installs it as the global one. Returns it so that
/// the telemetry guard can flush it; `None` if the Prometheus reader could not
/// be built (logged; instruments then record nothing).
pub(crate) fn install(
    resource: opentelemetry_sdk::Resource,
    otlp: bool,
) -> Option<opentelemetry_sdk::metrics::SdkMeterProvider> {
    let registry = registry().clone();
    let prometheus =
        match opentelemetry_prometheus::exporter().with_registry(registry).scope_info_enabled(false).build() {
            Ok(reader) => reader,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: the Prometheus reader could not be built; /metrics stays empty");
                return None;
            }
        };
    let mut builder =
        opentelemetry_sdk::metrics::SdkMeterProvider::builder().with_resource(resource).with_reader(prometheus);
    if otlp {
        match opentelemetry_otlp::MetricExporter::builder().with_tonic().build() {
            Ok(exporter) => {
                builder = builder.with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
            }
            Err(e) => tracing::warn!(error = %e, "metrics: no OTLP export"),
        }
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Some(provider)
}

/// The current metrics in the Prometheus text format.
pub fn encode_text() -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    // Encoding in-memory families into a Vec cannot fail but for a bad name,
    // which OpenTelemetry's reader never produces.
    if let Err(e) = prometheus::TextEncoder::new().encode(&registry().gather(), &mut out) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The `--metrics-listen` server: `/metrics`, `/healthz` and `/readyz`, in
/// plaintext HTTP/1.1.
pub struct Listener {
    addr: SocketAddr,
    server: tokio_util::task::AbortOnDropHandle<()>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("addr", &self.addr).finish()
    }
}

/// Each HTTP request is answered within this, or dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Listener {
    /// Binds `at` and serves there until [`Listener::stop`]; readiness comes
    /// from `health`.
    pub async fn bind(at: SocketAddr, health: Arc<Health>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let live = health.clone();
        let app = axum::Router::new()
            .route("/metrics", get(|| async { ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], encode_text()) }))
            .route(
                "/healthz",
                get(move || {
                    let live = live.clone();
                    async move {
                        if live.is_shutting_down() {
                            (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
                        } else {
                            (StatusCode::OK, "ok\n").into_response()
                        }
                    }
                }),
            )
            .route(
                "/readyz",
                get(move || {
                    let health = health.clone();
                    async move {
                        match health.readiness() {
                            Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
                            Err(why) => {
                                (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response()
                            }
                        }
                    }
                }),
            )
            .layer(axum::middleware::from_fn(|req, next: axum::middleware::Next| async move {
                match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
                    Ok(resp) => resp,
                    Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
                }
            }));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "metrics listener stopped");
            }
        });
        tracing::info!(%addr, "metrics (/metrics, /healthz, /readyz) on the metrics listener");
        Ok(Self { addr, server: tokio_util::task::AbortOnDropHandle::new(server), stop })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server, waiting at most `within` for open requests.
    pub async fn stop(self, within: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(within, self.server).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    }

    #[tokio::test]
    async fn serves_health_and_readiness_and_metrics() {
        let health = Health::new(&[]).await;
        let l = Listener::bind("127.0.0.1:0".parse().unwrap(), health.clone()).await.unwrap();
        assert_eq!(get_text(l.addr(), "/healthz").await.0, 200);
        let (code, body) = get_text(l.addr(), "/readyz").await;
        assert_eq!(code, 503, "{body}");
        health.set_ready(Err("no leader is elected".into())).await;
        let (code, body) = get_text(l.addr(), "/readyz").await;
        assert_eq!((code, body.trim()), (503, "not ready: no leader is elected"));
        health.set_ready(Ok(())).await;
        assert_eq!(get_text(l.addr(), "/readyz").await.0, 200);
        assert_eq!(get_text(l.addr(), "/metrics").await.0, 200);
        assert_eq!(get_text(l.addr(), "/nothing").await.0, 404);
        health.shutting_down().await;
        assert_eq!(get_text(l.addr(), "/healthz").await.0, 503);
        assert_eq!(get_text(l.addr(), "/readyz").await.0, 503);
        l.stop(Duration::from_secs(5)).await;
    }
}
