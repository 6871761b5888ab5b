//! Process signals shared by the binaries.

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, the signals every Sandfleet daemon
/// treats as "shut down cleanly". If SIGTERM cannot be hooked, waits for SIGINT only.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
