//! `sandfleet-executor`: the process inside a session's container that runs
//! every exec under bubblewrap, and the agent's client for it.
//!
//! The agent and the executor talk over a Unix socket in a per-session
//! directory that the agent bind-mounts into the container (so the container
//! needs no network). One connection carries one request:
//!
//! - the client sends one [`Message::Request`];
//! - for [`Request::Exec`] the executor streams [`Message::Stdout`] /
//!   [`Message::Stderr`] chunks as they are read, then one [`Message::Exit`]
//!   or [`Message::Error`]; [`Request::Ping`] gets one [`Message::Pong`];
//! - if the client closes the connection, the command is killed (the same
//!   "caller went away" rule as everywhere).
//!
//! An exec request carries the `traceparent` of the agent's exec span; the
//! executor times its own span (`executor.exec`, spawn under bwrap to exit)
//! and returns it in the exit, and the agent exports it as
//! `sandfleet-executor` ([`sandfleet_common::telemetry::relay`]): the
//! container has no network to export it itself.
//!
//! Exec semantics are not re-implemented here: the request is validated by
//! [`crate::exec::validate`], the workdir is checked by
//! [`crate::workspace::Workspace`], bwrap is started by
//! [`crate::runtime::bwrap::spawn`] with the seccomp filter of
//! [`crate::runtime::seccomp`], the command is supervised by
//! [`crate::exec::supervise`] and OOM kills and refused forks are read from
//! the container's own cgroup and reported by [`crate::exec::note_limits`]:
//! the very code the process runtime uses.
//!
//! # Layout
//! - [`wire`]: the messages and their framing ([`wire::ExecutorCodec`]).
//! - [`client`]: the agent's side ([`connect`], [`ping`], [`exec`]).
//! - [`server`]: the executor's side ([`serve`]).

pub mod client;
pub mod reaper;
pub mod server;
pub mod wire;

pub use client::{connect, exec, exec_on, ping, Connection};
pub use server::{serve, ExecutorConfig};
pub use wire::{Message, Request, WireExec, PROTOCOL_VERSION};

/// pids on top of a session's `pids_limit` in the cgroup that holds its
/// executor: the executor's threads (and tini in a container), the two bwrap
/// processes of each exec, and the charges of exited sandbox processes that
/// the kernel releases a little late.
pub const EXECUTOR_PIDS_HEADROOM: u32 = 32;
/// Grace on top of an exec's timeout before the agent gives up on the executor.
pub const EXEC_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The socket's file name in the per-session run directory.
pub const SOCKET_NAME: &str = "executor.sock";
/// Where the per-session run directory is mounted inside the container.
pub const CONTAINER_RUN_DIR: &str = "/sandfleet";
/// Where the workspace is mounted inside the container.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
