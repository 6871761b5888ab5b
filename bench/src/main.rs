//! `sandfleet-bench`: latency benchmarks of a real Sandfleet cluster against
//! the tools users would otherwise pick.
//!
//! ```text
//! sandfleet-bench skeleton [--runs 200] [--write bench/RESULTS.md]
//! sandfleet-bench raft [--duration 10] [--clients 1,64] [--kills 10] [--write bench/RESULTS.md]
//! sandfleet-bench placement [--sessions 20000] [--agents 1000] [--write bench/RESULTS.md]
//! sandfleet-bench failover [--kills 20] [--sessions-per-agent 10] [--write bench/RESULTS.md]
//! sandfleet-bench scale [--agents 10000] [--sessions 100000] [--baseline-fraction 0.1] [--write bench/RESULTS.md]
//! sandfleet-bench docker [--creates 20] [--execs 200] [--pool 2] [--write bench/RESULTS.md]
//! sandfleet-bench cri [--creates 20] [--execs 200] [--pool 2] [--write bench/RESULTS.md]
//! sandfleet-bench workspace [--files 1000] [--total-mib 100] [--runs 3] [--write bench/RESULTS.md]
//! sandfleet-bench disk [--runs 100] [--write bench/RESULTS.md]
//! sandfleet-bench tls [--runs 200] [--clients 64] [--write bench/RESULTS.md]
//! sandfleet-bench telemetry [--runs 200] [--clients 64] [--write bench/RESULTS.md]
//! sandfleet-bench python [--runs 200] [--creates 100] [--python PATH] [--write bench/RESULTS.md]
//! sandfleet-bench batch [--size 100] [--runs 5] [--sim-size 1000] [--sim-agents 1000] [--claims 200] [--write bench/RESULTS.md]
//! ```
//!
//! `batch` compares one `CreateSessions` batch with as many single creates,
//! on real sandboxes and on a simulated fleet; see [`batch`].
//!
//! `python` compares the Python SDK (`sdk/python`, driven by
//! `bench/python/driver.py`) with the Rust SDK on the same cluster; see [`python`].
//!
//! `workspace` compares the agent's workspace sync and restore with
//! `aws s3 sync` on the same S3 server; see [`workspace`].
//!
//! `placement` measures placements per second with 1,000 simulated agents
//! against the cluster's raw commit rate; see [`placement`]. `failover`
//! measures SIGKILL of an agent -> its sessions RUNNING elsewhere; see
//! [`failover`].
//!
//! `scale` measures a three-coordinator cluster with 10,000 simulated agents
//! and 100,000 RUNNING sessions (CPU, memory, heartbeats, RocksDB size,
//! snapshot build and install, cold restart, filtered `ListSessions`), and
//! the same at a tenth of that for the growth check; see [`scale`].
//!
//! `raft` compares a three-coordinator cluster with a three-member etcd
//! cluster on the same machine in the same run; see [`raft`].
//!
//! `skeleton` starts a one-coordinator, one-agent cluster through the test
//! harness (the same binaries the tests use) and measures, in one run:
//! raw `bwrap ... true` spawns (the floor), exec round trips of `true` in one
//! session, create -> RUNNING, and create -> first exec of `true` completed.
//! It prints a table with the goals (exec p50 <= 2x raw bwrap p50;
//! create -> RUNNING p50 <= 20 ms) and, with `--write`, replaces the
//! `## Walking skeleton` section of a results file, keeping other sections.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use sandfleet::{CreateSession, ExecRequest};
use sandfleet_testkit::facilities::BWRAP_TRUE_ARGS;
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{bins, require_sandbox_facilities, ClusterBuilder};

mod batch;
mod cri;
mod disk;
mod docker;
mod failover;
mod pair;
mod placement;
mod profile;
mod python;
mod raft;
mod scale;
mod telemetry;
mod tls;
mod workspace;

/// The generated client of the etcd v3 API subset in `proto/etcd_subset.proto`.
#[allow(clippy::all)]
mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

#[derive(Debug, Parser)]
#[command(name = "sandfleet-bench", about = "Sandfleet latency benchmarks against real processes")]
struct Cli {
    /// Which cargo profile's binaries to measure. The bench builds them first
    /// (`cargo build --profile ... --workspace --bins`) and runs that
    /// profile's own `sandfleet-bench`; `SANDFLEET_BIN_DIR` overrides both.
    #[arg(long, global = true, value_enum, default_value_t = profile::Profile::Release)]
    profile: profile::Profile,
    /// Do not build: measure the binaries already built in that profile.
    #[arg(long, global = true)]
    no_build: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Workspace sync and restore (1,000 files, 100 MiB) vs `aws s3 sync` on the same S3 server.
    Workspace {
        /// Files in the workspace.
        #[arg(long, default_value_t = 1000)]
        files: usize,
        /// Total size in MiB.
        #[arg(long, default_value_t = 100)]
        total_mib: u64,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Replace the section in this results file (e.g. bench/RESULTS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Docker runtime vs plain Docker: cold create vs `docker run --rm IMAGE true`, warm-pool
    /// create, exec round trip vs `docker exec CONTAINER true`.
    Docker {
        /// Measured creates of each kind.
        #[arg(long, default_value_t = 20)]
        creates: usize,
        /// Measured exec round trips.
        #[arg(long, default_value_t = 200)]
        execs: usize,
        /// Warm-up runs before each measurement.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Warm pool size of the warm-create agent.
        #[arg(long, default_value_t = 2)]
        pool: u32,
        /// Replace the section in this results file (e.g. bench/RESULTS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// CRI runtime vs raw CRI calls: cold and warm create vs RunPodSandbox + CreateContainer +
    /// StartContainer, exec round trip vs ExecSync, against a containerd started for the run.
    Cri {
        /// Measured creates of each kind.
        #[arg(long, default_value_t = 20)]
        creates: usize,
        /// Measured exec round trips.
        #[arg(long, default_value_t = 200)]
        execs: usize,
        /// Warm-up runs before each measurement.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Warm pool size of the warm-create agent.
        #[arg(long, default_value_t = 2)]
        pool: u32,
        /// Replace the section in this results file (e.g. bench/RESULTS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Walking-skeleton latencies: raw bwrap, exec round trip, create -> RUNNING, create -> first exec.
    Skeleton {
        /// Measured runs per measurement.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Unmeasured warm-up runs before each measurement.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Replace the `## Walking skeleton` section of this Markdown file (created if missing).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Raft cluster vs etcd: create/put throughput and latency, leader failover time.
    Raft {
        /// Seconds per load point.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Concurrent client counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<usize>,
        /// Leader kills for the failover measurement (per system).
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// The etcd server binary (Debian package etcd-server).
        #[arg(long, default_value = "etcd")]
        etcd: PathBuf,
        /// Replace the `## Raft cluster vs etcd` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Placements per second: N PENDING sessions, then 1,000 simulated agents register; vs the raw commit rate.
    Placement {
        /// Sessions to place.
        #[arg(long, default_value_t = 20_000)]
        sessions: usize,
        /// Simulated node agents (in this process, real AgentService protocol, no sandboxes).
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Concurrent clients creating the PENDING sessions (setup, not measured).
        #[arg(long, default_value_t = 64)]
        create_clients: usize,
        /// HTTP/2 connections per coordinator shared by the simulated agents.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Clients of the commit-rate anchor (single-session creates, as `bench raft`).
        #[arg(long, default_value_t = 64)]
        anchor_clients: usize,
        /// Seconds of the commit-rate anchor.
        #[arg(long, default_value_t = 10)]
        anchor_duration: u64,
        /// Seconds of the steady-state heartbeat window after placement.
        #[arg(long, default_value_t = 10)]
        steady: u64,
        /// Give up after this many seconds without every session RUNNING.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Start agent i on coordinator i mod 3 (the real agent starts on the first one listed).
        #[arg(long)]
        spread: bool,
        /// What starts the clock: resuming the paused scheduler (every node ready, every session
        /// queued), uncordoning the registered, cordoned nodes, or the agents registering.
        #[arg(long, value_enum, default_value = "resume")]
        start: placement::Start,
        /// Session slots of each simulated node (the real agent's default).
        #[arg(long, default_value_t = 64)]
        slots: u32,
        /// An extra argument for the measured cluster's coordinators (repeatable), e.g. `--coordinator-arg=--placement-batch=256`.
        #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
        coordinator_args: Vec<String>,
        /// Replace the `## Placement throughput` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Scale: 10,000 simulated agents and 100,000 RUNNING sessions on three coordinators (CPU, memory,
    /// heartbeats, RocksDB size, snapshot build/install, cold restart, filtered ListSessions), and a
    /// baseline at a tenth of that for the growth check.
    Scale {
        /// Simulated node agents (in this process, real AgentService protocol, no sandboxes).
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Sessions, all RUNNING before anything is measured.
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        /// First measure at this fraction of the agents and sessions, on a fresh cluster, for the growth check (0: no baseline).
        #[arg(long, default_value_t = 0.1)]
        baseline_fraction: f64,
        /// Seconds of the steady window (CPU, RSS, heartbeats).
        #[arg(long, default_value_t = 30)]
        steady: u64,
        /// Concurrent clients creating the sessions.
        #[arg(long, default_value_t = 64)]
        create_clients: usize,
        /// HTTP/2 connections per coordinator shared by the simulated agents.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Session slots of each simulated node (default: twice the even share, at least 64).
        #[arg(long)]
        slots: Option<u32>,
        /// Filtered ListSessions calls timed.
        #[arg(long, default_value_t = 200)]
        list_calls: usize,
        /// Page size of those calls.
        #[arg(long, default_value_t = 100)]
        list_page_size: u32,
        /// Concurrent renew clients that drive the leader to its next snapshot.
        #[arg(long, default_value_t = 32)]
        renew_clients: usize,
        /// Give up on any one phase (registration, all RUNNING, a snapshot, a catch-up) after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Start agent i with coordinator i mod 3 instead of the leader.
        #[arg(long)]
        spread: bool,
        /// An extra argument for every coordinator (repeatable), e.g. `--coordinator-arg=--snapshot-after-entries=20000`.
        #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
        coordinator_args: Vec<String>,
        /// Replace the `## Scale` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Per-session disk quotas vs none, same run: create -> RUNNING.
    Disk {
        /// Measured creates per cluster and size.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Warm-up creates per cluster and size.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Replace the `## Disk quota cost` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Mutual TLS vs plaintext, same run: exec round trip and create throughput.
    Tls {
        /// Measured exec round trips per cluster.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Warm-up exec round trips per cluster.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Concurrent create clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds per create round.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Create rounds per cluster (alternating).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Replace the `## Mutual TLS overhead` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Metrics and trace propagation at their defaults vs off, same run: exec
    /// round trip and create throughput.
    Telemetry {
        /// Measured exec round trips per cluster.
        #[arg(long, default_value_t = 300)]
        runs: usize,
        /// Warm-up exec round trips per cluster.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Concurrent create clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds per create round.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Create rounds per cluster (alternating).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Replace the `## Telemetry cost` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// The Python SDK vs the Rust SDK, same run, same cluster: exec round trip and create -> RUNNING.
    Python {
        /// Measured exec round trips per SDK.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Unmeasured exec round trips per SDK first.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Measured create -> RUNNING per SDK.
        #[arg(long, default_value_t = 100)]
        creates: usize,
        /// Batches per measurement and SDK; the SDKs alternate batch by batch.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// The Python interpreter that runs bench/python/driver.py; it must import the SDK
        /// [default: the virtualenv scripts/test-python makes, $SANDFLEET_VENV or
        /// ~/.cache/sandfleet-venv-py, else python3].
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
        /// Replace the `## Python SDK vs Rust SDK` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// A batch of N (CreateSessions) vs N concurrent single creates -> all RUNNING, same run:
    /// real sandboxes (one agent) and a simulated fleet (three coordinators).
    Batch {
        /// Replicas of the real-sandbox batch.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Rounds of each measurement (batch and singles alternate).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Replicas of the simulated-fleet batch.
        #[arg(long, default_value_t = 1000)]
        sim_size: usize,
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        sim_agents: usize,
        /// Concurrent clients of the single creates.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Claims from a warm pool pre-filled with as many idle sandboxes.
        #[arg(long, default_value_t = 200)]
        claims: usize,
        /// Replace the `## Batches` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Agent SIGKILL -> its sessions RUNNING on another node, real binaries.
    Failover {
        /// Agent kills (round-robin over the agents).
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Real agents.
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// Sessions per agent before each kill.
        #[arg(long, default_value_t = 10)]
        sessions_per_agent: usize,
        /// The coordinators' --agent-heartbeat.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        agent_heartbeat: Duration,
        /// The coordinators' --node-ttl.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        node_ttl: Duration,
        /// ListSessions poll interval while waiting.
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        poll: Duration,
        /// Replace the `## Agent failover` section of this Markdown file.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

const EXEC_GOAL_RATIO: f64 = 2.0;
const RUNNING_GOAL: Duration = Duration::from_millis(20);
const SECTION: &str = "## Walking skeleton";
const RAFT_SECTION: &str = "## Raft cluster vs etcd";
const PLACEMENT_SECTION: &str = "## Placement throughput";
const FAILOVER_SECTION: &str = "## Agent failover";
const DOCKER_SECTION: &str = "## Docker runtime vs Docker";
const CRI_SECTION: &str = "## CRI runtime vs raw CRI calls";
const WORKSPACE_SECTION: &str = "## Workspace sync vs aws s3 sync";
const TLS_SECTION: &str = "## Mutual TLS overhead";
const TELEMETRY_SECTION: &str = "## Telemetry cost";
const DISK_SECTION: &str = "## Disk quota cost";
const SCALE_SECTION: &str = "## Scale";
const PYTHON_SECTION: &str = "## Python SDK vs Rust SDK";
const BATCH_SECTION: &str = "## Batches";

#[derive(Debug)]
struct Series {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Series {
    fn p50(&self) -> Duration {
        percentile(&self.samples, 50.0)
    }
    fn p99(&self) -> Duration {
        percentile(&self.samples, 99.0)
    }
    fn max(&self) -> Duration {
        self.samples.iter().max().copied().unwrap_or_default()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(code) = profile::prepare(cli.profile, !cli.no_build) {
        return code;
    }
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("sandfleet-bench: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    match cli.cmd {
        Cmd::Workspace { files, total_mib, runs, write } => {
            let settings =
                workspace::Settings { files: files.max(100), total_mib: total_mib.max(1), runs: runs.max(1) };
            let result = async {
                let report = workspace::run(&settings).await?;
                let section = workspace::render(&report, &settings, WORKSPACE_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, WORKSPACE_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {WORKSPACE_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Disk { runs, warmup, write } => {
            let settings = disk::Settings { runs: runs.max(1), warmup };
            let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
            let result = async {
                if !require_sandbox_facilities() {
                    bail!("the disk bench needs root, bubblewrap and cgroups");
                }
                let report = disk::run(&settings, &child_log).await?;
                let section = disk::render(&report, &settings, DISK_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, DISK_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {DISK_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Tls { runs, warmup, clients, duration, rounds, write } => {
            let settings = pair::Settings::new(runs, warmup, clients, duration, rounds);
            let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
            let result = async {
                if !require_sandbox_facilities() {
                    bail!("the tls bench needs root, bubblewrap and cgroups");
                }
                let report = tls::run(&settings, &child_log).await?;
                publish(TLS_SECTION, &tls::render(&report, &settings, TLS_SECTION, &machine_description()), write)
            }
            .await;
            exit_code(result)
        }
        Cmd::Telemetry { runs, warmup, clients, duration, rounds, write } => {
            let settings = pair::Settings::new(runs, warmup, clients, duration, rounds);
            let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
            let result = async {
                if !require_sandbox_facilities() {
                    bail!("the telemetry bench needs root, bubblewrap and cgroups");
                }
                let (report, scrapes) = telemetry::run(&settings, &child_log).await?;
                let section =
                    telemetry::render(&report, &scrapes, &settings, TELEMETRY_SECTION, &machine_description());
                publish(TELEMETRY_SECTION, &section, write)
            }
            .await;
            exit_code(result)
        }
        Cmd::Batch { size, runs, sim_size, sim_agents, clients, claims, write } => {
            let settings = batch::Settings {
                size: size.max(1),
                runs: runs.max(1),
                sim_size: sim_size.max(1),
                sim_agents: sim_agents.max(1),
                clients: clients.max(1),
                claims: claims.max(1),
            };
            let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
            let result = async {
                if !require_sandbox_facilities() {
                    bail!("the batch bench needs root, bubblewrap and cgroups");
                }
                let report = batch::run(&settings, &child_log).await?;
                publish(BATCH_SECTION, &batch::render(&report, &settings, BATCH_SECTION, &machine_description()), write)
            }
            .await;
            exit_code(result)
        }
        Cmd::Python { runs, warmup, creates, rounds, python, write } => {
            let settings = python::Settings {
                runs: runs.max(1),
                warmup,
                creates: creates.max(1),
                rounds: rounds.max(1),
                python: python.unwrap_or_else(python::default_python),
            };
            let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
            let result = async {
                if !require_sandbox_facilities() {
                    bail!("the python bench needs root, bubblewrap and cgroups");
                }
                let report = python::run(&settings, &child_log).await?;
                publish(
                    PYTHON_SECTION,
                    &python::render(&report, &settings, PYTHON_SECTION, &machine_description()),
                    write,
                )
            }
            .await;
            exit_code(result)
        }
        Cmd::Docker { creates, execs, warmup, pool, write } => {
            loopback_unless_chosen();
            let settings = docker::Settings { creates: creates.max(1), execs: execs.max(1), warmup, pool: pool.max(1) };
            let result = async {
                let report = docker::run(&settings).await?;
                let section = docker::render(&report, &settings, DOCKER_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, DOCKER_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {DOCKER_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Cri { creates, execs, warmup, pool, write } => {
            loopback_unless_chosen();
            let settings = cri::Settings { creates: creates.max(1), execs: execs.max(1), warmup, pool: pool.max(1) };
            let result = async {
                let report = cri::run(&settings).await?;
                let section = cri::render(&report, &settings, CRI_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, CRI_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {CRI_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Placement {
            sessions,
            agents,
            create_clients,
            connections,
            anchor_clients,
            anchor_duration,
            steady,
            timeout,
            spread,
            start,
            slots,
            coordinator_args,
            write,
        } => {
            loopback_unless_chosen();
            let settings = placement::Settings {
                sessions: sessions.max(1),
                agents: agents.max(1),
                create_clients: create_clients.max(1),
                connections: connections.max(1),
                anchor_clients: anchor_clients.max(1),
                anchor_duration: Duration::from_secs(anchor_duration.max(1)),
                steady: Duration::from_secs(steady.max(1)),
                timeout: Duration::from_secs(timeout.max(1)),
                spread,
                start,
                slots: slots.max(1),
                coordinator_args,
            };
            let result = async {
                let report = placement::run(&settings).await?;
                let section = placement::render(&report, &settings, PLACEMENT_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, PLACEMENT_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {PLACEMENT_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Scale {
            agents,
            sessions,
            baseline_fraction,
            steady,
            create_clients,
            connections,
            slots,
            list_calls,
            list_page_size,
            renew_clients,
            timeout,
            spread,
            coordinator_args,
            write,
        } => {
            loopback_unless_chosen();
            let settings = scale::Settings {
                agents: agents.max(1),
                sessions: sessions.max(1),
                baseline_fraction: if baseline_fraction.is_finite() { baseline_fraction.clamp(0.0, 1.0) } else { 0.0 },
                steady: Duration::from_secs(steady.max(1)),
                create_clients: create_clients.max(1),
                connections: connections.max(1),
                slots: slots.map(|s| s.max(1)),
                list_calls: list_calls.max(1),
                list_page_size: list_page_size.clamp(1, 1000),
                renew_clients: renew_clients.max(1),
                timeout: Duration::from_secs(timeout.max(1)),
                spread,
                coordinator_args,
            };
            let result = async {
                let report = scale::run(&settings).await?;
                let section = scale::render(&report, &settings, SCALE_SECTION, &machine_description());
                publish(SCALE_SECTION, &section, write)
            }
            .await;
            exit_code(result)
        }
        Cmd::Failover { kills, agents, sessions_per_agent, agent_heartbeat, node_ttl, poll, write } => {
            loopback_unless_chosen();
            if !require_sandbox_facilities() {
                eprintln!("sandfleet-bench: the failover benchmark needs real sandboxes");
                return ExitCode::from(2);
            }
            let settings = failover::Settings {
                kills: kills.max(1),
                agents: agents.max(2),
                sessions_per_agent: sessions_per_agent.max(1),
                agent_heartbeat,
                node_ttl,
                poll,
                timeout: Duration::from_secs(60),
            };
            let result = async {
                let report = failover::run(&settings).await?;
                let section = failover::render(&report, &settings, FAILOVER_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, FAILOVER_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {FAILOVER_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            exit_code(result)
        }
        Cmd::Raft { duration, clients, kills, etcd, write } => {
            let settings = raft::Settings {
                duration: Duration::from_secs(duration.max(1)),
                clients: if clients.is_empty() { vec![1, 64] } else { clients },
                kills,
                etcd,
            };
            let result = async {
                let report = raft::run(&settings).await?;
                let section = raft::render(&report, &settings, RAFT_SECTION, &machine_description());
                println!("{section}");
                if let Some(path) = write {
                    write_section(&path, RAFT_SECTION, &section)?;
                    eprintln!("sandfleet-bench: wrote the {RAFT_SECTION:?} section of {}", path.display());
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sandfleet-bench: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Skeleton { runs, warmup, write } => {
            if !require_sandbox_facilities() {
                eprintln!("sandfleet-bench: the skeleton benchmark needs real sandboxes");
                return ExitCode::from(2);
            }
            match skeleton(runs.max(1), warmup, write.as_deref()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sandfleet-bench: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs the harness's clusters on loopback (as `raft` and the published
/// figures are) unless `SANDFLEET_NETWORK` chooses otherwise: the harness
/// would otherwise put every process in its own network namespace.
fn loopback_unless_chosen() {
    if std::env::var_os("SANDFLEET_NETWORK").is_none() {
        // Before any task of ours runs; the runtime's idle workers read no environment.
        std::env::set_var("SANDFLEET_NETWORK", "loopback");
    }
}

fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandfleet-bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn skeleton(runs: usize, warmup: usize, write: Option<&Path>) -> Result<()> {
    eprintln!("sandfleet-bench: {runs} runs per measurement (+{warmup} warm-up)");

    // (c) The floor: raw bubblewrap spawns, no Sandfleet involved.
    let raw = tokio::task::spawn_blocking(move || raw_bwrap(runs, warmup)).await??;
    eprintln!("  raw bwrap:            p50 {}", ms(raw.p50()));

    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
    let cluster = ClusterBuilder::new().coordinators(1).agents(1).env("RUST_LOG", child_log).start().await?;
    let client = cluster.try_client().await?;
    let spec = |i: usize| {
        CreateSession::new()
            .request_id(format!("bench-{}-{i}", std::process::id()))
            .memory_bytes(128 << 20)
            .cpu_millis(250)
            .pids_limit(64)
            .ttl(Duration::from_secs(600))
    };

    // (b) Exec round trip of `true` in one warm session.
    let created = client.create_session(spec(usize::MAX)).await.map_err(|e| anyhow!("create: {e}"))?;
    let session =
        client.wait_running(&created.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
    let mut exec = Series { name: "exec round trip (`true`, warm session)", samples: Vec::with_capacity(runs) };
    for i in 0..warmup + runs {
        let t = Instant::now();
        let out =
            client.exec_collect(&session, ExecRequest::argv(["true"])).await.map_err(|e| anyhow!("exec true: {e}"))?;
        let d = t.elapsed();
        if out.exit.exit_code != 0 {
            bail!("exec true exited with {:?}", out.exit);
        }
        if i >= warmup {
            exec.samples.push(d);
        }
    }
    client.delete_session(&session.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    eprintln!("  exec round trip:      p50 {}", ms(exec.p50()));

    // (d) create -> RUNNING and (a) create -> first exec completed, one fresh session per run.
    let mut running = Series { name: "create -> RUNNING", samples: Vec::with_capacity(runs) };
    let mut first = Series { name: "create -> first exec (`true`) completed", samples: Vec::with_capacity(runs) };
    for i in 0..warmup + runs {
        let t = Instant::now();
        let s = client.create_session(spec(i)).await.map_err(|e| anyhow!("create #{i}: {e}"))?;
        let s =
            client.wait_running(&s.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running #{i}: {e}"))?;
        let to_running = t.elapsed();
        let out =
            client.exec_collect(&s, ExecRequest::argv(["true"])).await.map_err(|e| anyhow!("first exec #{i}: {e}"))?;
        let to_first = t.elapsed();
        if out.exit.exit_code != 0 {
            bail!("first exec of true exited with {:?}", out.exit);
        }
        client.delete_session(&s.id).await.map_err(|e| anyhow!("delete #{i}: {e}"))?;
        if i >= warmup {
            running.samples.push(to_running);
            first.samples.push(to_first);
        }
    }
    eprintln!("  create -> RUNNING:    p50 {}", ms(running.p50()));
    cluster.shutdown().await?;

    let machine = machine_description();
    let section = render(runs, &raw, &exec, &running, &first, &machine);
    println!("{section}");
    if let Some(path) = write {
        write_section(path, SECTION, &section)?;
        eprintln!("sandfleet-bench: wrote the walking-skeleton section of {}", path.display());
    }
    Ok(())
}

fn raw_bwrap(runs: usize, warmup: usize) -> Result<Series> {
    let bwrap = sandfleet_testkit::facilities::BWRAP;
    let mut s = Series { name: "raw `bwrap --unshare-all ... true`", samples: Vec::with_capacity(runs) };
    for i in 0..warmup + runs {
        let t = Instant::now();
        let status = Command::new(bwrap)
            .args(BWRAP_TRUE_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {bwrap}"))?;
        let d = t.elapsed();
        if !status.success() {
            bail!("{bwrap} {} failed: {status}", BWRAP_TRUE_ARGS.join(" "));
        }
        if i >= warmup {
            s.samples.push(d);
        }
    }
    Ok(s)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn render(
    runs: usize,
    raw: &Series,
    exec: &Series,
    running: &Series,
    first: &Series,
    machine: &[(String, String)],
) -> String {
    let ratio = exec.p50().as_secs_f64() / raw.p50().as_secs_f64().max(1e-9);
    let exec_verdict = if ratio <= EXEC_GOAL_RATIO { "met" } else { "MISSED" };
    let running_verdict = if running.p50() <= RUNNING_GOAL { "met" } else { "MISSED" };
    let running_ratio = running.p50().as_secs_f64() / RUNNING_GOAL.as_secs_f64();

    let mut out = String::new();
    let _ = writeln!(out, "{SECTION}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench skeleton --runs {runs}`: one coordinator and one agent \
         (process runtime) on this machine, all measurements in the same run, {runs} measured runs each.\n"
    );
    let _ = writeln!(out, "| measurement | p50 | p99 | max | goal | vs goal |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
    let row = |out: &mut String, s: &Series, goal: &str, verdict: String| {
        let _ =
            writeln!(out, "| {} | {} | {} | {} | {goal} | {verdict} |", s.name, ms(s.p50()), ms(s.p99()), ms(s.max()));
    };
    row(&mut out, raw, "baseline", "1.00x".to_string());
    row(&mut out, exec, "p50 <= 2x raw bwrap p50", format!("{ratio:.2}x raw bwrap: {exec_verdict}"));
    row(&mut out, running, "p50 <= 20 ms", format!("{running_ratio:.2}x goal: {running_verdict}"));
    row(&mut out, first, "-", String::new());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Side by side: exec p50 {} vs raw bwrap p50 {} = **{ratio:.2}x** (goal <= {EXEC_GOAL_RATIO:.0}x, {exec_verdict}); \
         create -> RUNNING p50 {} (goal <= {} ms, {running_verdict}).\n",
        ms(exec.p50()),
        ms(raw.p50()),
        ms(running.p50()),
        RUNNING_GOAL.as_millis()
    );
    crate::push_machine(&mut out, machine);
    out
}

/// Appends the machine a result was measured on, as a Markdown list.
fn push_machine(out: &mut String, machine: &[(String, String)]) {
    let _ = writeln!(out, "Machine:\n");
    for (k, v) in machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
}

/// A duration in milliseconds, for tables.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn machine_description() -> Vec<(String, String)> {
    let nproc = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let bwrap = Command::new(sandfleet_testkit::facilities::BWRAP)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let profile = bins::bin_dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "?".into());
    vec![
        ("CPU".into(), format!("{model}, {nproc} CPUs (nproc)")),
        ("Memory".into(), mem),
        ("Load average (1/5/15 min) when the table was written".into(), load),
        ("Kernel".into(), kernel),
        ("cgroups".into(), sandfleet_testkit::host::cgroup_version().into()),
        ("bubblewrap".into(), bwrap),
        ("Binaries".into(), format!("`{profile}` profile ({})", bins::bin_dir().display())),
        ("Date".into(), utc_now()),
    ]
}

/// Now as `YYYY-MM-DD HH:MM UTC`, without a date library.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60)
}

/// Replaces the section headed `title` (up to the next `## ` heading)
/// of `path`, or appends it; other sections stay as they are.
/// Prints a report's section and, with `--write`, replaces its section of that file.
fn publish(title: &str, section: &str, write: Option<PathBuf>) -> Result<()> {
    println!("{section}");
    if let Some(path) = write {
        write_section(&path, title, section)?;
        eprintln!("sandfleet-bench: wrote the {title:?} section of {}", path.display());
    }
    Ok(())
}

fn write_section(path: &Path, title: &str, section: &str) -> Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Sandfleet benchmark results\n".to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let updated = replace_section(&existing, title, section);
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replace_section(doc: &str, title: &str, section: &str) -> String {
    let lines: Vec<&str> = doc.lines().collect();
    let section = section.trim_end();
    match lines.iter().position(|l| l.trim_end() == title) {
        Some(start) => {
            let end = lines[start + 1..]
                .iter()
                .position(|l| l.starts_with("## "))
                .map(|i| start + 1 + i)
                .unwrap_or(lines.len());
            let mut out = lines[..start].join("\n");
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(section);
            out.push('\n');
            if end < lines.len() {
                out.push('\n');
                out.push_str(&lines[end..].join("\n"));
                out.push('\n');
            }
            out
        }
        None => {
            let mut out = doc.trim_end().to_string();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(section);
            out.push('\n');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_section() {
        let doc = "# R\n\nintro\n\n## Walking skeleton\n\nold\n| a |\n\n## Other\n\nkeep me\n";
        let out = replace_section(doc, SECTION, "## Walking skeleton\n\nnew\n");
        assert_eq!(out, "# R\n\nintro\n\n## Walking skeleton\n\nnew\n\n## Other\n\nkeep me\n");
        let out = replace_section("# R\n", SECTION, "## Walking skeleton\n\nnew\n");
        assert_eq!(out, "# R\n\n## Walking skeleton\n\nnew\n");
        let doc = "# R\n\n## Walking skeleton\n\nold\n";
        assert_eq!(replace_section(doc, SECTION, "## Walking skeleton\n\nnew"), "# R\n\n## Walking skeleton\n\nnew\n");
    }

    #[test]
    fn dates() {
        let d = utc_now();
        assert!(d.ends_with(" UTC") && d.len() == "2026-01-01 00:00 UTC".len(), "{d}");
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
    }
}
