//! How an agent reaches the coordinators, apart from what it says to them:
//! the deadline of a control-plane call, the retry backoff, and the
//! connection settings. The control loop ([`crate::control`]) uses them, and
//! so does the placement bench's simulated fleet, so that both behave alike.

use std::time::Duration;

use rand::Rng;
use tonic::transport::Endpoint;

/// Deadline of each control-plane call (a heartbeat's is also bounded by two
/// heartbeat intervals).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause before retry `attempt` (1, 2, ...) of a failed call: doubling
/// from 100 ms up to 2 s, with the upper half jittered so that a fleet does
/// not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let cap = 2_000u64.min(50 * (1u64 << attempt.min(6)));
    Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
}

/// The endpoint of the coordinator at `addr` (`host:port`, or a URI with a
/// scheme): 2 s to connect, no Nagle delay, HTTP/2 keep-alive every 5 s so
/// that a dead coordinator is noticed.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
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
