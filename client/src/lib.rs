//! The Sandfleet Rust SDK.
//!
//! This crate owns the client side of the `sandfleet.v1` API: connecting to
//! several coordinators with failover, deadlines and jittered retries;
//! idempotent session creation; waiting for a session to run; and the data
//! plane (exec and files), which talks straight to the session's node agent
//! with the session token and refreshes the session when the token expires or
//! the session moves.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sandfleet::Error> {
//! use std::time::Duration;
//! use sandfleet::{Client, CreateSession, ExecRequest, Language};
//!
//! let client = Client::connect(["127.0.0.1:7070"]).await?;
//! let session = client.create_session(CreateSession::new().memory_bytes(256 << 20)).await?;
//! let session = client.wait_running(&session.id, Duration::from_secs(60)).await?;
//! let out = client.exec_collect(&session, ExecRequest::code(Language::Python, "print(1)")).await?;
//! assert_eq!(out.stdout, b"1\n");
//! client.delete_session(&session.id).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`ClientBuilder`] (also `ClientBuilder::from_env`: `SANDFLEET_ENDPOINT`, `SANDFLEET_API_KEY`,
//!   `SANDFLEET_TLS_*`), [`Client`], TLS, connection caching, retries, control-plane calls.
//! - [`session`]: [`CreateSession`] and session-state helpers.
//! - [`batch`]: [`CreateBatch`] and the batch calls (create whole or not at all, get, list, delete, wait).
//! - [`exec`]: [`ExecRequest`], [`ExecStream`], [`ExecEvent`], [`ExecOutput`] and the exec calls.
//! - [`files`]: upload, download, list and remove in a session's workspace.
//! - [`tenant`]: tenants, quotas and API keys (admin calls).
//! - [`pool`]: warm pools (create, get, list, update, delete); claims are `CreateSession::pool`.
//! - [`template`]: cluster templates (create, get, list, update, delete).
//! - [`retry`]: the backoff policy ([`Backoff`]).
//! - [`error`]: the [`Error`] type and gRPC code names.
//!
//! # Features
//! - `serde`: `Serialize`/`Deserialize` for the [`proto`] messages in the
//!   proto3 JSON mapping (what the CLI's `--output json` prints).
//!
//! This crate depends on the API contract (`sandfleet-proto`), the shared
//! `sandfleet-common` helpers and client-side libraries only: no coordinator,
//! node agent or storage engine. The `sandfleet` command line is the separate
//! `sandfleet-cli` crate, built on this one.

pub mod batch;
pub mod client;
pub mod error;
pub mod exec;
pub mod files;
pub mod pool;
pub mod retry;
pub mod session;
pub mod template;
pub mod tenant;

pub use sandfleet_proto::v1 as proto;
pub use sandfleet_proto::v1::Language;

pub use batch::CreateBatch;
pub use client::{
    Client, ClientBuilder, SessionWatch, TlsOptions, DEFAULT_ENDPOINT, ENV_API_KEY, ENV_ENDPOINT, ENV_TLS_CA,
    ENV_TLS_CERT, ENV_TLS_KEY,
};
pub use error::Error;
pub use exec::{exit_code_of, ExecEvent, ExecOutput, ExecRequest, ExecStream};
pub use files::FileStream;
pub use retry::Backoff;
pub use session::CreateSession;
