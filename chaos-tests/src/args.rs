//! The runner's command line ([`Args`]) and the settings it resolves to
//! ([`Settings`]): the defaults of a plain run, or of the `--smoke` preset.

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "sandfleet-chaos", about = "Seeded workload and invariant checks against a real Sandfleet cluster")]
pub struct Args {
    /// Number of coordinators [default: 1; --smoke: 3].
    #[arg(long)]
    pub coordinators: Option<usize>,
    /// Number of node agents [default: 1; --smoke: 2].
    #[arg(long)]
    pub agents: Option<usize>,
    /// How long the workload runs (e.g. 30s, 5m) [default: 30s; --smoke: until
    /// every fault kind was injected once].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// RNG seed; random when not given. Printed either way.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Concurrent workers [default: 4; --smoke: 3].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Most live sessions per worker [default: 4; --smoke: 3].
    #[arg(long)]
    pub max_live: Option<usize>,
    /// Extra arguments for every agent (repeat, e.g. --agent-arg=--slots --agent-arg=16).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Extra arguments for every coordinator (repeat). Without any, the runner
    /// uses a 500ms agent heartbeat and a 3s node TTL so faults heal quickly.
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    pub coordinator_args: Vec<String>,
    /// Inject faults (kills, freezes and network partitions) during the workload.
    #[arg(long)]
    pub faults: bool,
    /// Time between two faults [default: 6s; --smoke: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fault_interval: Option<Duration>,
    /// How long after an agent is killed or cut off its sessions may take to
    /// run elsewhere [default: node TTL + 7s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub move_deadline: Option<Duration>,
    /// The CI preset: 3 coordinators, 2 agents, faults, every fault kind twice (~100 s).
    #[arg(long)]
    pub smoke: bool,
    /// Where agents keep workspaces: `s3` (a test S3 server the runner starts)
    /// or `local` (a directory the agents share) [default: s3].
    #[arg(long, default_value = "s3", value_parser = ["s3", "local"])]
    pub workspace_store: String,
    /// Remove network namespaces, bridges and iptables rules left by crashed
    /// runs (whose owner process is gone), then exit.
    #[arg(long)]
    pub cleanup_network: bool,
    /// Keep the cluster directory (logs, data) even when everything passes.
    #[arg(long)]
    pub keep: bool,
}

/// [`Args`] with the defaults of the chosen mode applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub coordinators: usize,
    pub agents: usize,
    pub duration: Option<Duration>,
    pub workers: usize,
    pub max_live: usize,
    pub faults: bool,
    pub fault_interval: Duration,
    pub smoke: bool,
    pub node_ttl: Duration,
    pub move_deadline: Duration,
    pub coordinator_args: Vec<String>,
}

impl Settings {
    pub fn from(args: &Args) -> Settings {
        let smoke = args.smoke;
        let coordinator_args = if args.coordinator_args.is_empty() {
            vec!["--agent-heartbeat".to_string(), "500ms".into(), "--node-ttl".into(), "3s".into()]
        } else {
            args.coordinator_args.clone()
        };
        let node_ttl = flag_duration(&coordinator_args, "--node-ttl").unwrap_or(Duration::from_secs(5));
        Settings {
            coordinators: args.coordinators.unwrap_or(if smoke { 3 } else { 1 }),
            agents: args.agents.unwrap_or(if smoke { 2 } else { 1 }),
            duration: args.duration.or(if smoke { None } else { Some(Duration::from_secs(30)) }),
            workers: args.workers.unwrap_or(if smoke { 3 } else { 4 }),
            max_live: args.max_live.unwrap_or(if smoke { 3 } else { 4 }).max(1),
            faults: args.faults || smoke,
            fault_interval: args.fault_interval.unwrap_or(Duration::from_secs(if smoke { 5 } else { 6 })),
            smoke,
            node_ttl,
            move_deadline: args.move_deadline.unwrap_or(node_ttl + Duration::from_secs(7)),
            coordinator_args,
        }
    }
}

/// The value of `--flag X` or `--flag=X` in `args`, as a duration.
pub fn flag_duration(args: &[String], flag: &str) -> Option<Duration> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = if a == flag { it.next().cloned() } else { a.strip_prefix(&format!("{flag}=")).map(str::to_string) };
        if let Some(v) = v {
            return humantime::parse_duration(&v).ok();
        }
    }
    None
}
