//! How an agent reaches the coordinators, apart from what it says to them:
//! the deadline of a control-plane call, the retry backoff, and the
//! connection settings, and the client that carries the current span's trace
//! context to them. The control loop ([`crate::control`]) uses them, and
//! so does the placement bench's simulated fleet, so that both behave alike.

use std::time::Duration;

use sandfleet_common::backoff::Backoff;
use sandfleet_common::grpc::{self, ChannelOptions};
use sandfleet_common::tls::TlsDialer;
use sandfleet_common::trace_context::Propagate;
use sandfleet_proto::v1::agent_service_client::AgentServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The agent's AgentService client: every call carries the current span's
/// trace context (`traceparent`).
pub type CoordinatorClient = AgentServiceClient<InterceptedService<Channel, Propagate>>;

/// A [`CoordinatorClient`] on `channel`.
pub fn client(channel: Channel) -> CoordinatorClient {
    AgentServiceClient::with_interceptor(channel, Propagate)
}

/// Deadline of each control-plane call (a heartbeat's is also bounded by two
/// heartbeat intervals).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of failed control-plane calls: 100 ms doubling to 2 s, the upper
/// half jittered so that a fleet does not retry in step.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_floor_percent(50);

/// The pause before retry `attempt` (1, 2, ...) of a failed call.
pub fn backoff(attempt: u32) -> Duration {
    RETRY.delay(attempt.saturating_sub(1))
}

/// The endpoint of the coordinator at `addr` (`host:port`, or a URI with a
/// scheme), with the cluster channel settings of [`ChannelOptions::CLUSTER`].
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    grpc::endpoint(addr, ChannelOptions::CLUSTER)
}

/// A lazily connected channel to the coordinator at `addr`, over mutual TLS
/// when `tls` is given.
pub fn channel(addr: &str, tls: Option<&TlsDialer>) -> Result<Channel, tonic::transport::Error> {
    grpc::channel(addr, ChannelOptions::CLUSTER, tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_two_seconds_within_its_jitter() {
        for (attempt, cap) in [(1u32, 100u64), (2, 200), (3, 400), (5, 1600), (6, 2000), (60, 2000)] {
            for _ in 0..50 {
                let d = backoff(attempt).as_millis() as u64;
                assert!((cap / 2..=cap).contains(&d), "attempt {attempt}: {d} ms not in [{}, {cap}]", cap / 2);
            }
        }
    }

    #[test]
    fn endpoint_adds_http_only_without_a_scheme() {
        assert_eq!(endpoint("10.0.0.1:7000").unwrap().uri().to_string(), "http://10.0.0.1:7000/");
        assert_eq!(endpoint("https://c1.example:7000").unwrap().uri().to_string(), "https://c1.example:7000/");
        assert!(endpoint("not a uri").is_err());
    }
}
