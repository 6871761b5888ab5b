//! `sandfleet-executor`: runs inside a session's container (the image's
//! entrypoint), or on the host as the session's uid in the session's cgroups
//! (the process runtime starts one per session), and executes the agent's
//! commands under bubblewrap; see [`sandfleet_agent::executor`].

use std::os::fd::{FromRawFd as _, RawFd};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use sandfleet_agent::executor::{serve, ExecutorConfig, CONTAINER_RUN_DIR, CONTAINER_WORKSPACE};
use tokio_util::sync::CancellationToken;

/// Serves exec requests of the agent over a Unix socket, each under bubblewrap.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory of the socket (bind-mounted from the agent).
    #[arg(long, default_value = CONTAINER_RUN_DIR)]
    run_dir: PathBuf,
    /// The workspace.
    #[arg(long, default_value = CONTAINER_WORKSPACE)]
    workspace: PathBuf,
    /// bubblewrap.
    #[arg(long, default_value = "/usr/bin/bwrap")]
    bwrap: PathBuf,
    /// Where the sandbox's /etc files are written.
    #[arg(long, default_value = "/tmp/sandfleet-etc")]
    etc_dir: PathBuf,
    /// --etc-dir was prepared by the agent: use it as it is.
    #[arg(long)]
    etc_prepared: bool,
    /// The cgroup whose OOM kills and refused forks are reported, relative
    /// to the hierarchy root ("" = the executor's own, in a container).
    #[arg(long, default_value = "")]
    cgroup: String,
    /// An inherited Unix socket to the agent: "ready" is written to it once
    /// the executor serves, and the executor exits when the agent's end
    /// closes (the agent died or let the session go).
    #[arg(long)]
    lifeline_fd: Option<RawFd>,
    /// Drop to this uid and gid (no supplementary groups) before anything
    /// else; the process runtime starts the executor as root into the
    /// session's cgroups.
    #[arg(long)]
    uid: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(uid) = args.uid {
        drop_to(uid)?;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SANDFLEET_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // Two workers: the executor supervises a handful of commands and must stay small.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let lifeline = match args.lifeline_fd {
        Some(fd) => Some(lifeline(fd).context("taking the lifeline socket")?),
        None => None,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let mut lifeline = match lifeline {
            Some(s) => Some(tokio::net::UnixStream::from_std(s).context("registering the lifeline socket")?),
            None => None,
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.cancel();
        });
        let cfg = ExecutorConfig {
            run_dir: args.run_dir,
            workspace: args.workspace,
            bwrap_path: args.bwrap,
            etc_dir: args.etc_dir,
            etc_prepared: args.etc_prepared,
            cgroup: args.cgroup,
        };
        let serving = shutdown.clone();
        serve(cfg, shutdown, |sock| match lifeline.take() {
            Some(mut s) => {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    // The agent waits for this line; then only EOF is expected.
                    if s.write_all(b"ready\n").await.is_err() {
                        serving.cancel();
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    serving.cancel();
                });
            }
            None => eprintln!("{}", serde_json::json!({"ready": "executor", "socket": sock.display().to_string()})),
        })
        .await
        .context("executor failed")
    })
}

/// Becomes `uid`/`gid` `uid` with no supplementary groups, for good.
fn drop_to(uid: u32) -> anyhow::Result<()> {
    // SAFETY: plain syscalls on integers, made before any other thread exists.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("dropping to uid {uid}"));
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != uid || libc::getegid() != uid {
            anyhow::bail!("still not uid {uid} after setuid");
        }
        if uid != 0 && libc::setuid(0) == 0 {
            anyhow::bail!("could regain root after dropping to uid {uid}");
        }
    }
    Ok(())
}

/// Takes ownership of the inherited lifeline socket `fd`, closed on exec (no
/// command may inherit it) and non-blocking.
fn lifeline(fd: RawFd) -> anyhow::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: F_GETFD on any integer is harmless; it fails on a closed fd.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("--lifeline-fd {fd} is not an open descriptor");
    }
    // SAFETY: the fd is open (checked above), inherited for this purpose and owned by nobody else here.
    let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    // SAFETY: plain fcntl on a descriptor we own.
    if unsafe { libc::fcntl(s.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting FD_CLOEXEC");
    }
    s.set_nonblocking(true)?;
    Ok(s)
}
