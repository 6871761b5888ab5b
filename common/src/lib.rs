//! Pieces shared by every Sandfleet crate that are not part of the wire contract itself.
//!
//! This crate owns the rules both sides of a call must agree on: what a valid
//! id looks like, the hard limits on requests, how resource quantities are
//! written, how session tokens are signed and verified, and how a process sets
//! up tracing with OpenTelemetry export.
//!
//! # Layout
//! - [`auth`]: identities (SPIFFE ids in certificates), API keys, roles, tenants, the resolved caller.
//! - [`backoff`]: exponential backoff with jitter, for every retry loop.
//! - [`grpc`]: the gRPC channel factory (address rule, timeouts per kind of peer).
//! - `health` (feature `health`): the daemons' `grpc.health.v1` service and its plaintext listener.
//! - [`ids`]: validation of session ids, node ids, templates, request ids, labels and env keys.
//! - [`limits`]: defaults and hard limits (sizes, counts, durations).
//! - [`spec`]: the one definition of a session spec: runtimes, templates, defaults, range checks.
//! - [`template`]: cluster templates and what a session of one may set.
//! - [`quantity`]: parsing `256Mi` / `0.5` / `500m` style resource quantities.
//! - [`ready`]: the JSON ready line a process prints once it serves.
//! - [`tls`]: mutual TLS for every connection: server/client configs, accept loop, dialer, reload.
//! - [`x509`]: the Sandfleet identity in a certificate.
//! - [`token`]: Ed25519-signed, session-scoped data-plane tokens.
//! - [`telemetry`]: `tracing` subscriber set from `RUST_LOG`, with optional OTLP export.
//! - [`trace_context`]: W3C `traceparent` across gRPC calls, Raft entries and the executor's socket.
//! - [`signal`]: the SIGINT/SIGTERM shutdown signal of the daemons.
//! - [`time`]: wall-clock helpers in Unix milliseconds.
//! - [`x509`]: the Sandfleet identity (SPIFFE URI SAN) of a peer certificate.
//! - `metrics` (feature `metrics`): OpenTelemetry instruments read as Prometheus text on
//!   `--metrics-listen` (`/metrics`, `/healthz`, `/readyz`) and pushed over OTLP.
//! - `pki` (feature `pki`): the cluster CA, issuing certificates, writing them with safe modes.

pub mod auth;
pub mod backoff;
pub mod grpc;
#[cfg(feature = "health")]
pub mod health;
pub mod ids;
pub mod limits;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod mounts;
#[cfg(feature = "pki")]
pub mod pki;
pub mod quantity;
pub mod ready;
pub mod signal;
pub mod spec;
pub mod telemetry;
pub mod template;
pub mod time;
pub mod tls;
pub mod token;
pub mod trace_context;
pub mod x509;

pub use ids::ValidationError;
