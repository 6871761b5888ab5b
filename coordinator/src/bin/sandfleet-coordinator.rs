//! `sandfleet-coordinator`: one member of the coordinator cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sandfleet_common::ready::ReadyLine;
use sandfleet_coordinator::formation::{hostname, id_from_hostname};
use sandfleet_coordinator::scheduler::Strategy;
use sandfleet_coordinator::{serve, CoordinatorConfig};
use tokio_util::sync::CancellationToken;

/// A Sandfleet coordinator: Raft-replicated cluster state and the public gRPC API.
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("member_id").required(true).args(["id", "id_from_hostname"])))]
#[command(group(clap::ArgGroup::new("init").args(["bootstrap", "initial_members"])))]
struct Args {
    /// Raft member id, unique and non-zero.
    #[arg(long)]
    id: Option<u64>,
    /// Take the member id from this host's name, a StatefulSet pod name
    /// <statefulset>-<ordinal>: id = ordinal + 1 (sandfleet-coordinator-0 is
    /// member 1). Excludes --id.
    #[arg(long, conflicts_with = "id")]
    id_from_hostname: bool,
    /// With --id-from-hostname: read the ordinal from NAME instead of this
    /// host's name.
    #[arg(long, value_name = "NAME", requires = "id_from_hostname")]
    hostname: Option<String>,
    /// Every initial voter of a cluster that forms by itself, ID=HOST:PORT,
    /// comma-separated, this member included (in a StatefulSet: id = ordinal + 1
    /// and the pods' DNS names under the headless Service). Once every member
    /// answers with its id, the member with the lowest id initializes the
    /// cluster, as `sandfleet cluster init` would; a member or cluster that is
    /// initialized already is left alone. The advertised address defaults to
    /// this member's entry. Excludes --bootstrap.
    #[arg(long, value_delimiter = ',', value_name = "ID=HOST:PORT", value_parser = sandfleet_common::ids::parse_member)]
    initial_members: Vec<(u64, String)>,
    /// Also serve the standard gRPC health service (grpc.health.v1) alone, in
    /// plaintext, on this address, for probes that speak no TLS (Kubernetes
    /// grpc probes). Service "" is SERVING once this member is ready, "liveness"
    /// while it runs. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Serve metrics in plaintext HTTP on this address: `/metrics` (Prometheus
    /// text format), `/healthz` (200 while running) and `/readyz` (200 once this
    /// member is ready, else 503 and why). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
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
    #[arg(long, conflicts_with = "initial_members")]
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
    /// Most concurrent writes group-committed in one Raft entry. 1 turns group
    /// commit off: run every member with `--group-commit 1` while a cluster is
    /// rolled from a version without it, then roll again without the flag.
    #[arg(long, default_value_t = sandfleet_coordinator::commit::MAX_COMMANDS)]
    group_commit: usize,
    /// Longest a heartbeat waits for the commit of the session reports it
    /// carries (from agents that send uncommitted reports again); past it the
    /// answer says they are not committed yet and the agent re-sends them.
    /// Keeps heartbeats fast while the log is busy placing a backlog.
    #[arg(long, default_value = "150ms", value_parser = humantime_duration)]
    report_wait: Duration,
    /// With --bootstrap, or on the member of --initial-members that initializes
    /// the cluster: create the first admin API key (tenant "default") and write
    /// it to this file, mode 0600. If the file exists, nothing is written and
    /// no key is created.
    #[arg(long, value_name = "FILE", requires = "init")]
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
    let id = match (args.id, args.id_from_hostname) {
        (Some(id), _) => id,
        (None, _) => {
            let hostname = match args.hostname {
                Some(h) => h,
                None => hostname().map_err(anyhow::Error::msg)?,
            };
            let id = id_from_hostname(&hostname).map_err(anyhow::Error::msg)?;
            tracing::info!(%hostname, id, "member id from the hostname");
            id
        }
    };
    let mut initial_members = std::collections::BTreeMap::new();
    for (member, addr) in args.initial_members {
        if let Some(before) = initial_members.insert(member, addr.clone()) {
            anyhow::bail!("--initial-members names member {member} twice ({before} and {addr})");
        }
    }
    let config = CoordinatorConfig {
        id,
        initial_members,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
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
        group_commit: args.group_commit,
        report_wait: args.report_wait,
        admin_key_file: args.admin_key_file,
    };
    let coordinator = serve(config, shutdown.clone()).await.context("failed to start the coordinator")?;
    let health = coordinator.health_addr().map(|a| a.to_string());
    let metrics = coordinator.metrics_addr().map(|a| a.to_string());
    println!("{}", ReadyLine::Coordinator { id, addr: coordinator.addr().to_string(), health, metrics });

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
