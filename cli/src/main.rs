//! The `sandfleet` command line: sessions, exec, files, nodes and cluster
//! membership against a Sandfleet cluster, plus `sandfleet dev`, a one-process
//! coordinator and node agent for local work.
//!
//! Exit status: 0 on success; the command's own exit code for `run` and
//! `session exec`; 1 for errors (printed as `error: <message>`); 2 for usage errors.
//! The implementation is this crate's library (`src/lib.rs` and its modules).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sandfleet_cli as cli;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = cli.validate() {
        e.exit();
    }
    if std::env::var_os("RUST_LOG").is_none() {
        // Still single-threaded: no runtime exists yet.
        std::env::set_var("RUST_LOG", cli.default_log_filter());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = {
        // The OTLP exporter (when configured) needs the runtime while it is
        // built and when the guard flushes it on drop.
        let _enter = runtime.enter();
        // Logs at the level above (warnings by default); spans at info are
        // exported when OTEL_EXPORTER_OTLP_ENDPOINT is set, flushed when the
        // guard drops.
        let _telemetry = sandfleet_common::telemetry::init_with_traces(
            "sandfleet-cli",
            tracing_subscriber::EnvFilter::from_default_env(),
            tracing_subscriber::EnvFilter::new("info,openraft=warn"),
        );
        match runtime.block_on(cli::run(cli)) {
            Ok(code) => code,
            Err(e) if is_broken_pipe(&e) => 0,
            Err(e) => {
                eprintln!("error: {}", cli::error_line(&e));
                1
            }
        }
    };
    // Do not wait for a blocking stdin read that nobody needs any more.
    runtime.shutdown_timeout(Duration::from_millis(200));
    // Out-of-range codes must still read as failure.
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// A closed stdout (e.g. `| head`) is not worth an error message.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
