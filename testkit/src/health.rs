//! Asking a daemon's `grpc.health.v1` service, as a Kubernetes probe does.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tonic::transport::Channel;
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The service name of the whole server (readiness).
pub const SERVER: &str = "";
/// The service name liveness probes ask for.
pub const LIVENESS: &str = "liveness";

/// A plaintext channel to a health listener (`--health-listen`).
pub fn channel(addr: &str) -> Result<Channel> {
    let opts = sandfleet_common::grpc::ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        ..sandfleet_common::grpc::ChannelOptions::CLIENT
    };
    Ok(sandfleet_common::grpc::channel(addr, opts, None)?)
}

/// `Check(service)` on `channel`, with a 3 s deadline, as a probe makes it.
pub async fn check_on(channel: Channel, service: &str) -> Result<ServingStatus> {
    let mut req = tonic::Request::new(HealthCheckRequest { service: service.to_string() });
    req.set_timeout(Duration::from_secs(3));
    let resp = HealthClient::new(channel).check(req).await.with_context(|| format!("Check({service:?})"))?;
    Ok(resp.into_inner().status())
}

/// `Check(service)` on the plaintext health listener at `addr`.
pub async fn check(addr: &str, service: &str) -> Result<ServingStatus> {
    check_on(channel(addr)?, service).await.with_context(|| format!("health of {addr}"))
}

/// Polls `Check(service)` at `addr` until it answers `want`, and returns how
/// long that took; an error after `timeout`, with the last answer.
pub async fn wait_for(addr: &str, service: &str, want: ServingStatus, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let last = match check(addr, service).await {
            Ok(s) if s == want => return Ok(start.elapsed()),
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!("{addr} did not report {want:?} for {service:?} within {timeout:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `Watch(service)` stream on the plaintext health listener at `addr`.
pub struct Watch {
    stream: tonic::Streaming<HealthCheckResponse>,
}

impl Watch {
    /// Opens the stream.
    pub async fn open(addr: &str, service: &str) -> Result<Self> {
        let req = tonic::Request::new(HealthCheckRequest { service: service.to_string() });
        let stream = HealthClient::new(channel(addr)?).watch(req).await.context("Watch")?.into_inner();
        Ok(Self { stream })
    }

    /// The next status sent, or `None` once the stream ended; an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<ServingStatus>> {
        match tokio::time::timeout(timeout, self.stream.message()).await {
            Err(_) => Err(anyhow!("no health update within {timeout:?}")),
            Ok(Ok(m)) => Ok(m.map(|m| m.status())),
            Ok(Err(status)) => Err(anyhow!("the watch stream failed: {status}")),
        }
    }

    /// Reads updates until one is `want`; returns the statuses seen before it.
    pub async fn until(&mut self, want: ServingStatus, timeout: Duration) -> Result<Vec<ServingStatus>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await.with_context(|| format!("waiting for {want:?} after {seen:?}"))? {
                Some(s) if s == want => return Ok(seen),
                Some(s) => seen.push(s),
                None => bail!("the watch stream ended before {want:?}; saw {seen:?}"),
            }
        }
    }
}
