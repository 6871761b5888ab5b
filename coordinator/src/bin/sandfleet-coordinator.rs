//! `sandfleet-coordinator`: one member of the coordinator cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sandfleet_common::ready::ReadyLine;
use sandfleet_coordinator::scheduler::Strategy;
use sandfleet_coordinator::{serve, CoordinatorConfig};
use tokio_util::sync::CancellationToken;

/// A Sandfleet coordinator: Raft-replicated cluster state and the public gRPC API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Raft member id, unique and non-zero.
    #[arg(long)]
    id: u64,
    #[command(flatten)]
    tls: sandfleet_common::tls::DaemonTlsArgs,
    /// Address to listen on for gRPC (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Address others reach this member at (defaults to the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the RocksDB store.
    #[arg(long)]
    data_dir: PathBuf,
    /// Start a new one-member cluster if this member has no state yet.
    #[arg(long)]
    bootstrap: bool,
    /// Disaster recovery: start a new one-member cluster from this data dir's
    /// applied state, forgetting the old membership. Implies --bootstrap. Use
    /// once, then drop the flag.
    #[arg(long)]
    force_new_cluster: bool,
    /// Raft heartbeat interval.
    #[arg(long, default_value = "100ms", value_parser = humantime_duration)]
    heartbeat_interval: Duration,
    /// Raft election timeout T: a follower that hears nothing from the leader
    /// for a random time in [0.8T, T) starts an election. At least 4 heartbeats.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    election_timeout: Duration,
    /// Snapshot and compact the log after this many entries.
    #[arg(long, default_value_t = 5000)]
    snapshot_after_entries: u64,
    /// Log entries kept after a snapshot, so a briefly lagging member can catch
    /// up from the log instead of a snapshot.
    #[arg(long, default_value_t = 1000)]
    keep_log_entries: u64,
    /// How often node agents heartbeat.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    agent_heartbeat: Duration,
    /// A node that has not heartbeated for this long is declared down and its
    /// sessions are placed elsewhere. At least three heartbeat intervals.
    #[arg(long, default_value = "5s", value_parser = humantime_duration)]
    node_ttl: Duration,
    /// Node silence after which a session is declared LOST and placed
    /// elsewhere, unless the session sets its own restart_policy.lost_after_ms.
    /// Agents cut off from a quorum stop their sessions shortly before this.
    /// Defaults to --node-ttl.
    #[arg(long, value_parser = humantime_duration)]
    lost_after: Option<Duration>,
    /// How the scheduler picks among nodes that fit: spread (emptiest first)
    /// or binpack (fullest first).
    #[arg(long, value_enum, default_value_t = Strategy::Spread)]
    placement: Strategy,
    /// Score at most this many feasible nodes per placement, found from a
    /// random start (best-of-K); 0 scores every node.
    #[arg(long, default_value_t = 16)]
    placement_candidates: usize,
    /// Most placements committed in one Raft entry.
    #[arg(long, default_value_t = 1024)]
    placement_batch: usize,
    /// With --bootstrap: create the first admin API key (tenant "default")
    /// and write it to this file, mode 0600. If the file exists, nothing is
    /// written and no key is created.
    #[arg(long, value_name = "FILE", requires = "bootstrap")]
    admin_key_file: Option<PathBuf>,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}; use e.g. 100ms, 1s, 2m"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = sandfleet_common::telemetry::init("sandfleet-coordinator");
    let shutdown = CancellationToken::new();
    // Hooked before anything else, so a SIGTERM at any point shuts down
    // cleanly; a second one exits at once.
    let stop = shutdown.clone();
    sandfleet_common::signal::on_shutdown_signal(move || stop.cancel());
    let tls = args.tls.files().map_err(anyhow::Error::msg)?;
    let config = CoordinatorConfig {
        id: args.id,
        tls,
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        bootstrap: args.bootstrap,
        force_new_cluster: args.force_new_cluster,
        heartbeat_interval: args.heartbeat_interval,
        election_timeout: args.election_timeout,
        snapshot_after_entries: args.snapshot_after_entries,
        keep_log_entries: args.keep_log_entries,
        agent_heartbeat: args.agent_heartbeat,
        node_ttl: args.node_ttl,
        lost_after: args.lost_after,
        placement_strategy: args.placement,
        placement_candidates: args.placement_candidates,
        placement_batch: args.placement_batch,
        admin_key_file: args.admin_key_file,
    };
    let coordinator = serve(config, shutdown.clone()).await.context("failed to start the coordinator")?;
    println!("{}", ReadyLine::Coordinator { id: args.id, addr: coordinator.addr().to_string() });

    let result = coordinator.join().await.context("coordinator stopped with an error");
    // Everything acknowledged is on disk (the Raft log is fsynced before an
    // ack). Leave without running C++ static destructors: RocksDB's background
    // threads may still hold its mutexes, and destroying them under those
    // threads aborts the process ("pthread lock: Invalid argument").
    if let Err(e) = &result {
        eprintln!("Error: {e:#}");
    }
    drop(_telemetry); // flushes spans still queued for export
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; nothing runs after it.
    unsafe { libc::_exit(i32::from(result.is_err())) }
}
