//! Process signals shared by the binaries.

use std::future::Future;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, the signals every Sandfleet daemon
/// treats as "shut down cleanly".
///
/// The handlers are installed when this function is *called* (inside a Tokio
/// runtime), not when the future is first polled, so a daemon that calls it
/// before announcing readiness never dies of a SIGTERM that arrives in between.
/// A signal that cannot be hooked is ignored; the other one still works.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move { next_signal(&mut term, &mut int).await }
}

/// The exit code of a process ended by a second shutdown signal (the shell's
/// code for "ended by SIGINT").
pub const FORCED_EXIT_CODE: i32 = 130;

/// Calls `shutdown` at the first SIGINT or SIGTERM, and ends the process at
/// once (exit code [`FORCED_EXIT_CODE`]) at the second, without waiting for
/// the graceful shutdown to finish: the operator's way out of a shutdown
/// that hangs. Must be called inside a Tokio runtime; as with
/// [`shutdown_signal`], the handlers are installed before this returns.
pub fn on_shutdown_signal(shutdown: impl FnOnce() + Send + 'static) {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::spawn(async move {
        next_signal(&mut term, &mut int).await;
        tracing::info!("shutting down (a second SIGINT or SIGTERM exits at once)");
        shutdown();
        next_signal(&mut term, &mut int).await;
        tracing::warn!("second shutdown signal: exiting now, without waiting for the graceful shutdown");
        eprintln!("second shutdown signal: exiting now");
        std::process::exit(FORCED_EXIT_CODE);
    });
}

/// The next SIGTERM or SIGINT of the given listeners (a missing one never fires).
async fn next_signal(term: &mut Option<Signal>, int: &mut Option<Signal>) {
    let term = async {
        match term.as_mut() {
            Some(s) => s.recv().await,
            None => std::future::pending().await,
        }
    };
    let int = async {
        match int.as_mut() {
            Some(s) => s.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = int => {}
    }
}
