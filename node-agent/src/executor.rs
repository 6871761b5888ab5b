//! `sandfleet-executor`: the process inside a session's container that runs
//! every exec under bubblewrap, and the agent's client for it.
//!
//! The agent and the executor talk over a Unix socket in a per-session
//! directory that the agent bind-mounts into the container (so the container
//! needs no network). One connection carries one request:
//!
//! - the client sends one [`Frame::Request`] (JSON [`Request`]);
//! - for `exec` the executor streams [`Frame::Stdout`] / [`Frame::Stderr`]
//!   chunks as they are read, then one [`Frame::Exit`] (JSON [`WireExit`]) or
//!   [`Frame::Error`] (JSON [`WireError`]); `ping` gets one [`Frame::Pong`];
//! - if the client closes the connection, the command is killed (the same
//!   "caller went away" rule as everywhere).
//!
//! A frame is `kind: u8`, `len: u32` big-endian, then `len` bytes.
//!
//! Exec semantics are not re-implemented here: the request is validated by
//! [`crate::exec::validate`], the workdir is checked by
//! [`crate::workspace::Workspace`], bwrap is started by
//! [`crate::runtime::bwrap::spawn`] with the seccomp filter of
//! [`crate::runtime::seccomp`], the command is supervised by
//! [`crate::exec::supervise`] and OOM kills and refused forks are read from
//! the container's own cgroup and reported by [`crate::exec::note_limits`]:
//! the very code the process runtime uses.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::runtime::bwrap::{self, RootLayout};
use crate::runtime::cgroup::AnyCgroupManager;
use crate::runtime::{seccomp, Command, ExecEvent, ExecSpec, ExitInfo, Language, RuntimeError};
use crate::workspace::Workspace;

/// Version of the wire protocol; the image carries an executor of the same crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// The socket's file name in the per-session run directory.
pub const SOCKET_NAME: &str = "executor.sock";
/// Where the per-session run directory is mounted inside the container.
pub const CONTAINER_RUN_DIR: &str = "/sandfleet";
/// Where the workspace is mounted inside the container.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
/// Largest frame accepted: a request carries at most stdin (1 MiB) + code
/// (1 MiB) + env (base64 and JSON included); output chunks are 64 KiB.
const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Frame {
    /// Client → executor: a JSON [`Request`].
    Request = 1,
    /// A chunk of stdout.
    Stdout = 2,
    /// A chunk of stderr.
    Stderr = 3,
    /// How the command ended: JSON [`WireExit`].
    Exit = 4,
    /// The request failed: JSON [`WireError`].
    Error = 5,
    /// Answer to `ping`: JSON [`Pong`].
    Pong = 6,
}

impl Frame {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Stdout,
            3 => Self::Stderr,
            4 => Self::Exit,
            5 => Self::Error,
            6 => Self::Pong,
            _ => return None,
        })
    }
}

/// A request to the executor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and version check.
    Ping,
    /// Run one command.
    Exec(WireExec),
}

/// The command of an exec on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireCommand {
    /// A plain argv.
    Argv {
        /// argv[0] is looked up on PATH.
        argv: Vec<String>,
    },
    /// Code for an interpreter ("python", "node" or "bash").
    Code {
        /// The interpreter.
        language: String,
        /// The source.
        code: String,
    },
}

/// One exec, with what the session contributes (env, limits for messages).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireExec {
    /// What to run.
    pub command: WireCommand,
    /// The session's env (applied before `env`).
    pub session_env: BTreeMap<String, String>,
    /// The exec's env.
    pub env: BTreeMap<String, String>,
    /// Written to stdin, then closed.
    #[serde(with = "b64")]
    pub stdin: Vec<u8>,
    /// Working directory relative to the workspace.
    pub workdir: String,
    /// Wall-clock limit in ms (0 = default).
    pub timeout_ms: u64,
    /// Output cap in bytes (0 = default).
    pub output_cap: u64,
    /// The session's memory limit (named in OOM messages).
    pub memory_bytes: u64,
    /// The session's pids limit (named in refused-fork messages).
    pub pids_limit: u32,
}

/// How an exec ended, on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireExit {
    /// Exit code (128+N for signal N).
    pub exit_code: i32,
    /// Signal, or 0.
    pub signal: i32,
    /// Wall-clock duration in microseconds.
    pub duration_us: u64,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// The OOM killer ended a process.
    pub oom_killed: bool,
    /// Output went past the cap.
    pub output_truncated: bool,
    /// Why it did not end on its own.
    pub message: String,
}

/// An error, on the wire: the [`RuntimeError`] variant and its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    /// "invalid_argument", "not_found", "unavailable", "workspace" or "internal".
    pub kind: String,
    /// The message, as the executor's error displayed it.
    pub message: String,
}

/// Answer to a ping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    /// [`PROTOCOL_VERSION`] of the executor.
    pub protocol: u32,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

impl WireExec {
    /// The wire form of an exec of a session.
    pub fn new(spec: &ExecSpec, session_env: &BTreeMap<String, String>, memory_bytes: u64, pids_limit: u32) -> Self {
        let command = match &spec.command {
            Command::Argv(argv) => WireCommand::Argv { argv: argv.clone() },
            Command::Code { language, code } => WireCommand::Code {
                language: match language {
                    Language::Python => "python",
                    Language::Node => "node",
                    Language::Bash => "bash",
                }
                .to_string(),
                code: code.clone(),
            },
        };
        Self {
            command,
            session_env: session_env.clone(),
            env: spec.env.clone(),
            stdin: spec.stdin.clone(),
            workdir: spec.workdir.clone(),
            timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
            output_cap: spec.output_cap,
            memory_bytes,
            pids_limit,
        }
    }

    /// Back to an [`ExecSpec`].
    pub fn spec(&self) -> Result<ExecSpec, RuntimeError> {
        let command = match &self.command {
            WireCommand::Argv { argv } => Command::Argv(argv.clone()),
            WireCommand::Code { language, code } => {
                let language = match language.as_str() {
                    "python" => Language::Python,
                    "node" => Language::Node,
                    "bash" => Language::Bash,
                    other => {
                        return Err(RuntimeError::InvalidArgument(format!(
                            "invalid language {:?}: use python, node or bash",
                            other.chars().take(32).collect::<String>()
                        )))
                    }
                };
                Command::Code { language, code: code.clone() }
            }
        };
        Ok(ExecSpec {
            command,
            env: self.env.clone(),
            stdin: self.stdin.clone(),
            workdir: self.workdir.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            output_cap: self.output_cap,
        })
    }
}

impl From<&ExitInfo> for WireExit {
    fn from(i: &ExitInfo) -> Self {
        Self {
            exit_code: i.exit_code,
            signal: i.signal,
            duration_us: u64::try_from(i.duration.as_micros()).unwrap_or(u64::MAX),
            timed_out: i.timed_out,
            oom_killed: i.oom_killed,
            output_truncated: i.output_truncated,
            message: i.message.clone(),
        }
    }
}

impl From<WireExit> for ExitInfo {
    fn from(w: WireExit) -> Self {
        Self {
            exit_code: w.exit_code,
            signal: w.signal,
            duration: Duration::from_micros(w.duration_us),
            timed_out: w.timed_out,
            oom_killed: w.oom_killed,
            output_truncated: w.output_truncated,
            message: w.message,
        }
    }
}

impl From<&RuntimeError> for WireError {
    fn from(e: &RuntimeError) -> Self {
        let kind = match e {
            RuntimeError::InvalidArgument(_) | RuntimeError::Validation(_) => "invalid_argument",
            RuntimeError::NotFound(_) => "not_found",
            RuntimeError::Unavailable(_) => "unavailable",
            RuntimeError::Workspace(
                crate::workspace::FsError::InvalidPath(_) | crate::workspace::FsError::Escape(_),
            ) => "invalid_argument",
            RuntimeError::Workspace(_) | RuntimeError::Io(_) | RuntimeError::Internal(_) => "internal",
        };
        Self { kind: kind.to_string(), message: e.to_string() }
    }
}

impl From<WireError> for RuntimeError {
    fn from(w: WireError) -> Self {
        match w.kind.as_str() {
            "invalid_argument" => RuntimeError::InvalidArgument(w.message),
            "not_found" => RuntimeError::NotFound(w.message),
            "unavailable" => RuntimeError::Unavailable(w.message),
            _ => RuntimeError::Internal(format!("executor: {}", w.message)),
        }
    }
}

/// Writes one frame.
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, kind: Frame, payload: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<(Frame, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let kind = Frame::from_u8(head[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unknown frame kind {}", head[0])))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME_BYTES}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some((kind, buf)))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Client (in the agent)
// ---------------------------------------------------------------------------

/// Connects to the executor socket at `path`.
///
/// The run directory is writable by the session's uid, so the agent refuses
/// anything there but a socket (a symlink planted by code that escaped bwrap
/// must not redirect the agent). The socket is reached through an `O_PATH`
/// handle on its directory (`/proc/self/fd/N/NAME`), which also keeps the
/// address short: a data dir deep in the filesystem would otherwise exceed
/// the 108 bytes of `sun_path`.
pub async fn connect(path: &Path) -> Result<UnixStream, RuntimeError> {
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
    Ok(stream)
}

/// Pings the executor; returns its protocol version.
pub async fn ping(path: &Path) -> Result<u32, RuntimeError> {
    let mut s = connect(path).await?;
    let proto_err = |e: io::Error| RuntimeError::Unavailable(format!("executor ping failed: {e}"));
    write_frame(&mut s, Frame::Request, &json(&Request::Ping)).await.map_err(proto_err)?;
    match read_frame(&mut s).await.map_err(proto_err)? {
        Some((Frame::Pong, b)) => {
            let p: Pong = serde_json::from_slice(&b)
                .map_err(|e| RuntimeError::Internal(format!("bad pong from the executor: {e}")))?;
            Ok(p.protocol)
        }
        other => Err(RuntimeError::Internal(format!("unexpected answer to ping: {:?}", other.map(|(k, _)| k)))),
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

/// Like [`exec`], on a connection from [`connect`].
pub async fn exec_on(
    mut s: UnixStream,
    req: WireExec,
    out: mpsc::Sender<ExecEvent>,
    deadline: Duration,
) -> Result<ExitInfo, RuntimeError> {
    let io_err =
        |e: io::Error| RuntimeError::Unavailable(format!("lost the connection to the session's executor: {e}"));
    write_frame(&mut s, Frame::Request, &json(&Request::Exec(req))).await.map_err(io_err)?;
    let run = async {
        loop {
            let frame = tokio::select! {
                f = read_frame(&mut s) => f.map_err(io_err)?,
                () = out.closed() => {
                    return Err(RuntimeError::Internal("cancelled: the caller stopped reading the output".into()));
                }
            };
            match frame {
                Some((Frame::Stdout, b)) => {
                    if out.send(ExecEvent::Stdout(Bytes::from(b))).await.is_err() {
                        return Err(RuntimeError::Internal("cancelled: the caller stopped reading the output".into()));
                    }
                }
                Some((Frame::Stderr, b)) => {
                    if out.send(ExecEvent::Stderr(Bytes::from(b))).await.is_err() {
                        return Err(RuntimeError::Internal("cancelled: the caller stopped reading the output".into()));
                    }
                }
                Some((Frame::Exit, b)) => {
                    let w: WireExit =
                        serde_json::from_slice(&b).map_err(|e| RuntimeError::Internal(format!("bad exit frame from the executor: {e}")))?;
                    return Ok(ExitInfo::from(w));
                }
                Some((Frame::Error, b)) => {
                    let w: WireError =
                        serde_json::from_slice(&b).map_err(|e| RuntimeError::Internal(format!("bad error frame from the executor: {e}")))?;
                    return Err(w.into());
                }
                Some((k, _)) => return Err(RuntimeError::Internal(format!("unexpected frame {k:?} from the executor"))),
                None => {
                    return Err(RuntimeError::Unavailable(
                        "the session's executor closed the connection before the command ended (was the container killed, e.g. by its memory limit?)".into(),
                    ))
                }
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

// ---------------------------------------------------------------------------
// Server (in the container)
// ---------------------------------------------------------------------------

/// How the executor is set up.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Directory holding the socket (the bind-mounted run dir).
    pub run_dir: PathBuf,
    /// The workspace inside the container.
    pub workspace: PathBuf,
    /// bubblewrap.
    pub bwrap_path: PathBuf,
    /// Where the sandbox's `/etc` files are written (container tmpfs).
    pub etc_dir: PathBuf,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from(CONTAINER_RUN_DIR),
            workspace: PathBuf::from(CONTAINER_WORKSPACE),
            bwrap_path: PathBuf::from("/usr/bin/bwrap"),
            etc_dir: PathBuf::from("/tmp/sandfleet-etc"),
        }
    }
}

struct Server {
    cfg: ExecutorConfig,
    layout: RootLayout,
    filter: Vec<u8>,
    /// The container's own cgroup (read-only view), for OOM and pids events.
    cgroups: Option<AnyCgroupManager>,
    uid: u32,
    gid: u32,
}

/// Prepares the sandbox root and the seccomp filter, binds the socket and
/// serves until `shutdown` fires. Calls `ready` once the socket accepts.
pub async fn serve(
    cfg: ExecutorConfig,
    shutdown: tokio_util::sync::CancellationToken,
    ready: impl FnOnce(&Path),
) -> Result<(), RuntimeError> {
    bwrap::write_etc_files(&cfg.etc_dir)
        .map_err(|e| RuntimeError::Unavailable(format!("writing {}: {e}", cfg.etc_dir.display())))?;
    let layout = RootLayout::detect(&cfg.etc_dir)?;
    let filter = seccomp::filter_bytes()?;
    let cgroups = match AnyCgroupManager::detect() {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "no cgroup view in the container: OOM kills and refused forks will not be reported");
            None
        }
    };
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let sock = cfg.run_dir.join(SOCKET_NAME);
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::Unavailable(format!("removing a stale {}: {e}", sock.display()))),
    }
    let listener =
        UnixListener::bind(&sock).map_err(|e| RuntimeError::Unavailable(format!("binding {}: {e}", sock.display())))?;
    let server = Arc::new(Server { cfg, layout, filter, cgroups, uid, gid });
    info!(socket = %sock.display(), uid, "executor serving");
    ready(&sock);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server.handle(stream).await {
                            debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Server {
    async fn handle(&self, stream: UnixStream) -> io::Result<()> {
        let (mut rd, mut wr) = stream.into_split();
        let Some((Frame::Request, body)) = read_frame(&mut rd).await? else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "expected a request frame"));
        };
        let req: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let err = WireError { kind: "invalid_argument".into(), message: format!("malformed request: {e}") };
                return write_frame(&mut wr, Frame::Error, &json(&err)).await;
            }
        };
        match req {
            Request::Ping => write_frame(&mut wr, Frame::Pong, &json(&Pong { protocol: PROTOCOL_VERSION })).await,
            Request::Exec(x) => {
                let (tx, mut rx) = mpsc::channel::<ExecEvent>(32);
                let run = self.exec(x, tx);
                tokio::pin!(run);
                let mut peer_gone = false;
                let mut probe = [0u8; 1];
                let result = loop {
                    tokio::select! {
                        r = &mut run => break r,
                        ev = rx.recv() => if let Some(ev) = ev {
                            let (k, b) = match ev { ExecEvent::Stdout(b) => (Frame::Stdout, b), ExecEvent::Stderr(b) => (Frame::Stderr, b) };
                            if write_frame(&mut wr, k, &b).await.is_err() {
                                // Dropping the receiver makes supervise kill the command.
                                rx.close();
                                peer_gone = true;
                            }
                        },
                        r = rd.read(&mut probe), if !peer_gone => {
                            if matches!(r, Ok(0) | Err(_)) {
                                debug!("client went away; killing the command");
                                rx.close();
                                peer_gone = true;
                            }
                        }
                    }
                };
                // Output read before the exit.
                while let Ok(ev) = rx.try_recv() {
                    let (k, b) = match ev {
                        ExecEvent::Stdout(b) => (Frame::Stdout, b),
                        ExecEvent::Stderr(b) => (Frame::Stderr, b),
                    };
                    write_frame(&mut wr, k, &b).await?;
                }
                match result {
                    Ok(info) => write_frame(&mut wr, Frame::Exit, &json(&WireExit::from(&info))).await,
                    Err(e) => write_frame(&mut wr, Frame::Error, &json(&WireError::from(&e))).await,
                }
            }
        }
    }

    async fn exec(&self, x: WireExec, out: mpsc::Sender<ExecEvent>) -> Result<ExitInfo, RuntimeError> {
        let spec = x.spec()?;
        crate::exec::validate_env("session env", &x.session_env)?;
        let v = crate::exec::validate(&spec, bwrap::CODE_PATH)?;
        let ws = Workspace::new(&self.cfg.workspace, self.uid, self.gid);
        crate::exec::check_workdir(&ws, &spec.workdir).await?;
        let mut env = bwrap::base_env();
        env.extend(x.session_env.clone());
        env.extend(spec.env.clone());

        let oom_before = self.cgroups.as_ref().map_or(0, |c| c.oom_kills(""));
        let forks_before = self.cgroups.as_ref().map_or(0, |c| c.pids_max_events(""));
        let started = tokio::time::Instant::now();
        let (child, fds) = bwrap::spawn(&bwrap::Launch {
            bwrap_path: &self.cfg.bwrap_path,
            layout: &self.layout,
            filter: &self.filter,
            workspace: &self.cfg.workspace,
            workdir: &v.workdir,
            env: &env,
            argv: &v.plan.argv,
            code: v.plan.code_file.as_deref(),
            procs_files: &[],
            run_as: None,
            own_process_group: true,
        })
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::E2BIG) {
                RuntimeError::InvalidArgument(
                    "argv and environment together are too large for the kernel (E2BIG)".into(),
                )
            } else {
                RuntimeError::Unavailable(format!("starting bwrap: {e}"))
            }
        })?;
        drop(fds);
        let pgid = child.id().map(|p| p as i32);
        // bwrap runs the command in a new pid namespace whose init dies with
        // bwrap (--die-with-parent), which takes every process of the
        // namespace with it; the group kill is a second net.
        let kill_tree = move || {
            if let Some(pgid) = pgid {
                // SAFETY: kill with a negative pid signals a process group; plain integers.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        };
        let mut info = crate::exec::supervise(child, started, spec.stdin, v.timeout, v.output_cap, out, kill_tree)
            .await
            .map_err(|e| RuntimeError::Io(io::Error::new(e.kind(), format!("supervising the command: {e}"))))?;
        let (oom, forks) = match &self.cgroups {
            Some(c) => {
                // The kernel updates the OOM counter right after the kill; give it a moment when the
                // command died of SIGKILL.
                if info.signal == libc::SIGKILL && !info.timed_out {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (c.oom_kills("").saturating_sub(oom_before), c.pids_max_events("").saturating_sub(forks_before))
            }
            None => (0, 0),
        };
        crate::exec::note_limits(&mut info, oom, x.memory_bytes, forks, x.pids_limit);
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, Frame::Stdout, b"hello").await.unwrap();
        write_frame(&mut a, Frame::Exit, b"{}").await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((Frame::Stdout, b"hello".to_vec())));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((Frame::Exit, b"{}".to_vec())));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[test]
    fn exec_round_trips_through_json() {
        let spec = ExecSpec {
            command: Command::Code { language: Language::Node, code: "1".into() },
            env: BTreeMap::from([("A".to_string(), "b".to_string())]),
            stdin: vec![0, 1, 2, 255],
            workdir: "sub".into(),
            timeout: Duration::from_millis(1500),
            output_cap: 7,
        };
        let w = WireExec::new(&spec, &BTreeMap::new(), 1 << 28, 64);
        let back: WireExec = serde_json::from_slice(&json(&Request::Exec(w.clone())))
            .map(|r: Request| match r {
                Request::Exec(x) => x,
                Request::Ping => panic!("ping"),
            })
            .unwrap();
        let s = back.spec().unwrap();
        assert_eq!(s.stdin, spec.stdin);
        assert_eq!(s.timeout, spec.timeout);
        assert!(matches!(s.command, Command::Code { language: Language::Node, .. }));
        let e: RuntimeError = WireError::from(&RuntimeError::InvalidArgument("x".into())).into();
        assert!(matches!(e, RuntimeError::InvalidArgument(m) if m == "x"));
    }
}
