//! Process signals shared by the binaries.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, the signals every Sandfleet daemon
/// treats as "shut down cleanly".
///
/// The handlers are installed when this function is *called* (inside a Tokio
/// runtime), not when the future is first polled, so a daemon that calls it
/// before announcing readiness never dies of a SIGTERM that arrives in between.
/// A signal that cannot be hooked is ignored; the other one still works.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let term = async {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let int = async {
            match int {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = int => {}
        }
    }
}
