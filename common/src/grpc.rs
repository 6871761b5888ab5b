//! The gRPC channel factory every Sandfleet client side uses (the SDK, the
//! agent's link to the coordinators, the coordinators' Raft and forwarding
//! links, tests and benchmarks): one rule for addresses, and one set of
//! timeouts per kind of peer.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::TlsDialer;

/// `host:port` becomes `http://host:port`; a URI with a scheme is kept as it is.
pub fn normalize_uri(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// How a channel treats its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOptions {
    /// How long one TCP connect may take.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval.
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is dropped.
    pub keep_alive_timeout: Duration,
}

impl ChannelOptions {
    /// Between cluster members on one network: a dead peer is noticed within seconds.
    pub const CLUSTER: ChannelOptions = ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_secs(5),
        keep_alive_timeout: Duration::from_secs(5),
    };
    /// Between Raft members: a connect must fail well inside an election timeout.
    pub const RAFT: ChannelOptions = ChannelOptions { connect_timeout: Duration::from_millis(500), ..Self::CLUSTER };
    /// From clients, across networks that may be slow.
    pub const CLIENT: ChannelOptions = ChannelOptions {
        connect_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_secs(20),
        keep_alive_timeout: Duration::from_secs(10),
    };
}

/// An endpoint for `addr` (see [`normalize_uri`]) with `opts`, Nagle off.
pub fn endpoint(addr: &str, opts: ChannelOptions) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(normalize_uri(addr))?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(opts.keep_alive_interval)
        .keep_alive_timeout(opts.keep_alive_timeout))
}

/// A plaintext channel to `addr` that connects on first use (and reconnects after a failure).
pub fn lazy_channel(addr: &str, opts: ChannelOptions) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr, opts)?.connect_lazy())
}

/// A channel to `addr` that connects on first use, over TLS through `tls`
/// when given (`https://` or a bare `host:port`), plaintext otherwise.
pub fn channel(addr: &str, opts: ChannelOptions, tls: Option<&TlsDialer>) -> Result<Channel, tonic::transport::Error> {
    let endpoint = endpoint(addr, opts)?;
    Ok(match tls {
        Some(dialer) => endpoint.connect_with_connector_lazy(dialer.clone().with_connect_timeout(opts.connect_timeout)),
        None => endpoint.connect_lazy(),
    })
}

/// The canonical name of a gRPC code, as in the gRPC spec: `NOT_FOUND`, `UNAVAILABLE`, ...
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme_once() {
        assert_eq!(normalize_uri("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_uri(" http://h:1/ "), "http://h:1");
        assert_eq!(normalize_uri("https://h:1"), "https://h:1");
        assert_eq!(normalize_uri("[::1]:7070"), "http://[::1]:7070");
    }

    #[tokio::test]
    async fn a_bad_address_is_an_error_not_a_panic() {
        assert!(endpoint("http://bad host:1", ChannelOptions::CLIENT).is_err());
        assert!(lazy_channel("127.0.0.1:1", ChannelOptions::RAFT).is_ok());
    }
}

/// Dials a Unix socket for tonic (the URI is ignored).
#[derive(Debug, Clone)]
struct UnixConnector(std::path::PathBuf);

impl tower_service::Service<tonic::transport::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::transport::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

/// A channel to a gRPC server on the Unix socket `path` (a CRI runtime's),
/// connected now; `timeout` bounds the connect and every call.
pub async fn unix_channel(
    path: impl Into<std::path::PathBuf>,
    timeout: std::time::Duration,
) -> Result<Channel, tonic::transport::Error> {
    // The URI only names the HTTP/2 authority: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(UnixConnector(path.into()))
        .await
}
