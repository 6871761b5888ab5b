//! The executor's side: serving the agent's requests, each exec under
//! bubblewrap. It runs inside a session's container (docker, cri), or on the
//! host as the session's uid inside the session's cgroups (process runtime,
//! see [`crate::runtime::process`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::reaper::Reaper;
use super::wire::{ExecutorCodec, Message, Pong, Request, WireError, WireExec, WireExit, PROTOCOL_VERSION};
use super::{CONTAINER_RUN_DIR, CONTAINER_WORKSPACE, SOCKET_NAME};
use crate::runtime::bwrap::{self, RootLayout};
use crate::runtime::cgroup::AnyCgroupManager;
use crate::runtime::{seccomp, ExecEvent, ExitInfo, RuntimeError};
use crate::workspace::Workspace;
use sandfleet_common::trace_context::MeasuredSpan;

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
    /// `etc_dir` was prepared by the agent (process runtime): use it as it is,
    /// write nothing (the executor's uid cannot write there).
    pub etc_prepared: bool,
    /// The cgroup whose OOM kills and refused forks are reported, relative to
    /// the hierarchy root as the executor sees it: `""` in a container (its
    /// cgroup namespace), the session's cgroup on the host.
    pub cgroup: String,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            run_dir: PathBuf::from(CONTAINER_RUN_DIR),
            workspace: PathBuf::from(CONTAINER_WORKSPACE),
            bwrap_path: PathBuf::from("/usr/bin/bwrap"),
            etc_dir: PathBuf::from("/tmp/sandfleet-etc"),
            etc_prepared: false,
            cgroup: String::new(),
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
    /// Reaps the orphans its commands leave (see [`super::reaper`]).
    reaper: Arc<Reaper>,
}

/// Prepares the sandbox root and the seccomp filter, binds the socket and
/// serves until `shutdown` fires. Calls `ready` once the socket accepts.
pub async fn serve(
    cfg: ExecutorConfig,
    shutdown: tokio_util::sync::CancellationToken,
    ready: impl FnOnce(&Path),
) -> Result<(), RuntimeError> {
    let layout = if cfg.etc_prepared {
        RootLayout::prepared(&cfg.etc_dir)?
    } else {
        bwrap::write_etc_files(&cfg.etc_dir)
            .map_err(|e| RuntimeError::Unavailable(format!("writing {}: {e}", cfg.etc_dir.display())))?;
        RootLayout::detect(&cfg.etc_dir)?
    };
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
    let reaper = Arc::new(
        Reaper::new()
            .map_err(|e| RuntimeError::Unavailable(format!("becoming the reaper of the commands' orphans: {e}")))?,
    );
    let reaping = {
        let (reaper, shutdown) = (reaper.clone(), shutdown.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move { reaper.run(shutdown).await }))
    };
    let server = Arc::new(Server { cfg, layout, filter, cgroups, uid, gid, reaper });
    info!(socket = %sock.display(), uid, "executor serving");
    ready(&sock);
    let _reaping = reaping;
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

fn output(ev: ExecEvent) -> Message {
    match ev {
        ExecEvent::Stdout(b) => Message::Stdout(b),
        ExecEvent::Stderr(b) => Message::Stderr(b),
    }
}

impl Server {
    async fn handle(&self, stream: UnixStream) -> io::Result<()> {
        let (mut tx, mut rx) = Framed::new(stream, ExecutorCodec::default()).split();
        let req = match rx.next().await {
            Some(Ok(Message::Request(r))) => r,
            Some(Ok(other)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected a request, got {other:?}")))
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                let err = WireError { kind: "invalid_argument".into(), message: format!("malformed request: {e}") };
                return tx.send(Message::Error(err)).await;
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        };
        match req {
            Request::Ping => tx.send(Message::Pong(Pong { protocol: PROTOCOL_VERSION })).await,
            Request::Exec(x) => {
                // Timed here, returned with the exit: this container has no network to export it.
                let measuring = MeasuredSpan::start("executor.exec", &x.traceparent);
                let (out_tx, mut out_rx) = mpsc::channel::<ExecEvent>(32);
                let run = self.exec(x, out_tx);
                tokio::pin!(run);
                let mut peer_gone = false;
                let result = loop {
                    tokio::select! {
                        r = &mut run => break r,
                        ev = out_rx.recv() => if let Some(ev) = ev {
                            if tx.send(output(ev)).await.is_err() {
                                // Dropping the receiver makes supervise kill the command.
                                out_rx.close();
                                peer_gone = true;
                            }
                        },
                        // The client sends nothing after its request: anything but more
                        // waiting means it went away.
                        _ = rx.next(), if !peer_gone => {
                            debug!("client went away; killing the command");
                            out_rx.close();
                            peer_gone = true;
                        }
                    }
                };
                // Output read before the exit.
                while let Ok(ev) = out_rx.try_recv() {
                    tx.send(output(ev)).await?;
                }
                match result {
                    Ok(info) => {
                        let mut exit = WireExit::from(&info);
                        exit.spans = measuring
                            .map(|m| {
                                m.finish(vec![
                                    ("exit_code".into(), info.exit_code.to_string()),
                                    ("timed_out".into(), info.timed_out.to_string()),
                                ])
                            })
                            .into_iter()
                            .collect();
                        tx.send(Message::Exit(exit)).await
                    }
                    Err(e) => tx.send(Message::Error(WireError::from(&e))).await,
                }
            }
        }
    }

    async fn exec(&self, x: WireExec, out: mpsc::Sender<ExecEvent>) -> Result<ExitInfo, RuntimeError> {
        let spec = x.spec()?;
        sandfleet_common::ids::validate_env("session env", &x.session_env)?;
        let v = crate::exec::validate(&spec, bwrap::CODE_PATH)?;
        let ws = Workspace::new(&self.cfg.workspace, self.uid, self.gid);
        crate::exec::check_workdir(&ws, &spec.workdir).await?;
        let mut env = bwrap::base_env();
        env.extend(x.session_env.clone());
        env.extend(spec.env.clone());

        let cg = self.cfg.cgroup.as_str();
        let oom_before = self.cgroups.as_ref().map_or(0, |c| c.oom_kills(cg));
        let forks_before = self.cgroups.as_ref().map_or(0, |c| c.pids_max_events(cg));
        let started = tokio::time::Instant::now();
        // Registered with the reaper until supervised to the end (`_own` drops last).
        let (child, fds, _own) = self
            .reaper
            .spawn(|| {
                bwrap::spawn(&bwrap::Launch {
                    bwrap_path: &self.cfg.bwrap_path,
                    layout: &self.layout,
                    filter: &self.filter,
                    workspace: &self.cfg.workspace,
                    workdir: &v.workdir,
                    env: &env,
                    argv: &v.plan.argv,
                    code: v.plan.code_file.as_deref(),
                    run_as: None,
                    own_process_group: true,
                })
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
                (c.oom_kills(cg).saturating_sub(oom_before), c.pids_max_events(cg).saturating_sub(forks_before))
            }
            None => (0, 0),
        };
        crate::exec::note_limits(&mut info, oom, x.memory_bytes, forks, x.pids_limit);
        Ok(info)
    }
}
