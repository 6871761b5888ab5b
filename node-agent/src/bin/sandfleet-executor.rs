//! `sandfleet-executor`: runs inside a session's container (the image's
//! entrypoint) and executes the agent's commands under bubblewrap; see
//! [`sandfleet_agent::executor`].

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
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
        };
        serve(cfg, shutdown, |sock| {
            eprintln!("{}", serde_json::json!({"ready": "executor", "socket": sock.display().to_string()}))
        })
        .await
        .context("executor failed")
    })
}
