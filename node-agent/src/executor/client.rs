//! The agent's side: connecting to a session's executor, ping and exec.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use super::wire::{ExecutorCodec, Message, Request, WireExec};
use crate::runtime::{ExecEvent, ExitInfo, RuntimeError};

/// A connection to an executor, from [`connect`].
pub type Connection = Framed<UnixStream, ExecutorCodec>;

/// Connects to the executor socket at `path`.
///
/// The run directory is writable by the session's uid, so the agent refuses
/// anything there but a socket (a symlink planted by code that escaped bwrap
/// must not redirect the agent). The socket is reached through an `O_PATH`
/// handle on its directory (`/proc/self/fd/N/NAME`), which also keeps the
/// address short: a data dir deep in the filesystem would otherwise exceed
/// the 108 bytes of `sun_path`.
pub async fn connect(path: &Path) -> Result<Connection, RuntimeError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let unavailable = |what: String| RuntimeError::Unavailable(what);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(RuntimeError::Internal(format!("bad executor socket path {}", path.display())));
    };
    let dir_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| unavailable(format!("the session's run directory {} cannot be opened: {e}", dir.display())))?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir_fd.as_raw_fd())).join(name);
    match std::fs::symlink_metadata(&short) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(unavailable(format!(
                "{} is not a socket; refusing to connect (was the run directory tampered with?)",
                path.display()
            )))
        }
        Err(e) => {
            return Err(unavailable(format!("the session's executor is not listening at {}: {e}", path.display())))
        }
    }
    let stream = UnixStream::connect(&short)
        .await
        .map_err(|e| unavailable(format!("the session's executor is not reachable at {}: {e}", path.display())))?;
    drop(dir_fd);
    Ok(Framed::new(stream, ExecutorCodec::default()))
}

/// Pings the executor; returns its protocol version.
pub async fn ping(path: &Path) -> Result<u32, RuntimeError> {
    let mut conn = connect(path).await?;
    let proto_err = |e: io::Error| RuntimeError::Unavailable(format!("executor ping failed: {e}"));
    conn.send(Message::Request(Request::Ping)).await.map_err(proto_err)?;
    match conn.next().await.transpose().map_err(proto_err)? {
        Some(Message::Pong(p)) => Ok(p.protocol),
        other => Err(RuntimeError::Internal(format!("unexpected answer to ping: {other:?}"))),
    }
}

/// Runs one exec through the executor at `path`, forwarding output to `out`.
/// If `out` closes, the connection is dropped and the executor kills the command.
/// `deadline` bounds the whole call (the exec's own timeout plus a grace).
pub async fn exec(
    path: &Path,
    req: WireExec,
    out: mpsc::Sender<ExecEvent>,
    deadline: Duration,
) -> Result<ExitInfo, RuntimeError> {
    exec_on(connect(path).await?, req, out, deadline).await
}

/// The service name the executor's spans are exported under (by the agent).
pub const EXECUTOR_SERVICE_NAME: &str = "sandfleet-executor";

/// Like [`exec`], on a connection from [`connect`]. The request carries the
/// current span's trace context; the executor's spans that come back with the
/// exit are exported as its children ([`sandfleet_common::telemetry::relay`]).
pub async fn exec_on(
    mut conn: Connection,
    mut req: WireExec,
    out: mpsc::Sender<ExecEvent>,
    deadline: Duration,
) -> Result<ExitInfo, RuntimeError> {
    let io_err =
        |e: io::Error| RuntimeError::Unavailable(format!("lost the connection to the session's executor: {e}"));
    let cancelled = || RuntimeError::Internal("cancelled: the caller stopped reading the output".into());
    req.traceparent = sandfleet_common::trace_context::current_traceparent();
    let traceparent = req.traceparent.clone();
    conn.send(Message::Request(Request::Exec(req))).await.map_err(io_err)?;
    let run = async {
        loop {
            let msg = tokio::select! {
                m = conn.next() => m.transpose().map_err(io_err)?,
                () = out.closed() => return Err(cancelled()),
            };
            let ev = match msg {
                Some(Message::Stdout(b)) => ExecEvent::Stdout(b),
                Some(Message::Stderr(b)) => ExecEvent::Stderr(b),
                Some(Message::Exit(mut w)) => {
                    let spans = std::mem::take(&mut w.spans);
                    sandfleet_common::telemetry::relay(EXECUTOR_SERVICE_NAME, &traceparent, &spans);
                    return Ok(ExitInfo::from(w));
                }
                Some(Message::Error(w)) => return Err(w.into()),
                Some(other) => {
                    return Err(RuntimeError::Internal(format!("unexpected message from the executor: {other:?}")))
                }
                None => {
                    return Err(RuntimeError::Unavailable(
                        "the session's executor closed the connection before the command ended (was it killed, \
                         e.g. with its sandbox by the memory limit?)"
                            .into(),
                    ))
                }
            };
            if out.send(ev).await.is_err() {
                return Err(cancelled());
            }
        }
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(r) => r,
        Err(_) => Err(RuntimeError::Unavailable(format!(
            "the session's executor did not finish the command within {} s",
            deadline.as_secs()
        ))),
    }
}
