//! The `sandfleet` command line: argument definitions and dispatch.
//!
//! This crate builds the `sandfleet` binary (`src/main.rs`) on the `sandfleet`
//! SDK crate; this library is its implementation, not an API to build on (use
//! the SDK for that). With the default `dev` feature it also embeds a
//! coordinator and a node agent for `sandfleet dev`.
//!
//! # Layout
//! - [`args`]: value parsers (durations, quantities, `K=V`, `ID:PATH`).
//! - [`output`]: text tables, and JSON printing (API messages in the proto3 JSON mapping).
//! - [`exec`]: `run` and `session exec` (streamed output, exit codes, cleanup).
//! - [`session`]: the other `session` subcommands, including `cp`.
//! - [`batch`]: `session create --count N` and `batch get|list|wait|rm`.
//! - [`pool`]: `pool create|get|list|update|delete` (warm pools; `session create --pool` claims).
//! - [`template`]: `template create|get|list|update|delete` (cluster templates).
//! - [`cluster`]: `node list` and `cluster ...`.
//! - [`top`]: `top`, the live view of the cluster and its nodes.
//! - [`progress`]: progress of long operations, on a terminal only.
//! - [`tenant`], [`apikey`]: `tenant ...` and `apikey ...` (admin).
//! - [`dev`]: `dev`, a coordinator plus a node agent in this process.
//! - [`pki`]: `pki init|issue`, the cluster CA and certificates.

pub mod apikey;
pub mod args;
pub mod batch;
pub mod cluster;
pub mod dev;
pub mod exec;
pub mod output;
pub mod pki;
pub mod pool;
pub mod progress;
pub mod session;
pub mod template;
pub mod tenant;
pub mod top;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sandfleet::{proto, Client};

use self::args::{parse_cp_spec, parse_cpu, parse_duration, parse_key_value, parse_memory, parse_state, CpSpec};
use self::output::OutputFormat;

/// Run untrusted code in Sandfleet sandboxes.
#[derive(Debug, Parser)]
#[command(name = "sandfleet", version, about, propagate_version = true)]
pub struct Cli {
    /// Coordinator endpoints, comma-separated (host:port or http://host:port).
    #[arg(
        long,
        short = 'e',
        env = "SANDFLEET_ENDPOINT",
        default_value = "127.0.0.1:7070",
        value_delimiter = ',',
        global = true
    )]
    pub endpoint: Vec<String>,

    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub output: OutputFormat,

    /// The cluster CA certificate (PEM): speak TLS and verify coordinators and agents with it.
    #[arg(long, env = "SANDFLEET_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,

    /// A client certificate (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long, env = "SANDFLEET_TLS_CERT", value_name = "FILE", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, env = "SANDFLEET_TLS_KEY", value_name = "FILE", global = true)]
    pub tls_key: Option<std::path::PathBuf>,

    /// API key (sfk_...) sent with every control-plane call.
    #[arg(long, env = "SANDFLEET_API_KEY", global = true, value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Print more about what happens, on stderr: `run` prints its trace id
    /// (`trace id: <32 hex>`) when spans are exported (OTEL_EXPORTER_OTLP_ENDPOINT),
    /// for an operator to find the whole run in the tracing backend.
    #[arg(long, short = 'v', global = true)]
    pub verbose: bool,

    /// Deadline of each control-plane call (give it before the subcommand).
    #[arg(long = "timeout", value_parser = parse_duration, default_value = "10s", value_name = "DURATION")]
    pub request_timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a session, run one command in it, stream its output, delete the
    /// session, and exit with the command's exit code.
    Run(RunArgs),
    /// Manage sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Inspect node agents.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Inspect and change the coordinator cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// A live view of the cluster (leader, term, members, pending and running
    /// sessions, creates per second) and of each node (state, sessions, CPU
    /// and memory: used, allocated of capacity, free), redrawn in place.
    ///
    /// On a terminal the view refreshes every --interval until Ctrl-C. When
    /// stdout is not a terminal, frames are printed one after another (like
    /// `top -b`); --once prints one frame and exits. With --output json each
    /// frame is one JSON object (numbers as numbers, unknowns as null).
    /// USED is what the node's sandboxes use now (their cgroups, as the
    /// node's agent last reported; `-` when the answering coordinator has no
    /// report); FREE is capacity less what placed sessions reserve. Needs an
    /// admin API key on a cluster with keys.
    Top(TopArgs),
    /// Inspect and delete batches of sessions (made by `session create --count N`).
    #[command(subcommand)]
    Batch(batch::BatchCmd),
    /// Manage warm pools (claimed by `session create --pool NAME`).
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Manage cluster templates (named by --template; writes are admin calls).
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// Manage tenants and their quotas (admin).
    #[command(subcommand)]
    Tenant(tenant::TenantCmd),
    /// Manage API keys (admin).
    #[command(subcommand)]
    Apikey(apikey::ApiKeyCmd),
    /// Run a coordinator and a node agent (process runtime) in this process.
    Dev(DevArgs),
    /// Make the cluster CA and issue certificates (files only; no cluster needed).
    #[command(subcommand)]
    Pki(pki::PkiCmd),
}

/// What a session asks for.
#[derive(Debug, Args, Clone, Default)]
pub struct ResourceArgs {
    /// Memory limit, e.g. 256Mi, 1Gi.
    #[arg(long, value_parser = parse_memory, value_name = "QUANTITY")]
    pub memory: Option<u64>,
    /// CPU limit in cores or millicores, e.g. 0.5, 2, 250m.
    #[arg(long, value_parser = parse_cpu, value_name = "QUANTITY")]
    pub cpu: Option<u32>,
    /// CPU reserved on the node for placement (at most --cpu); default: --cpu
    /// when given, else 100m.
    #[arg(long, value_parser = parse_cpu, value_name = "QUANTITY")]
    pub cpu_request: Option<u32>,
    /// Maximum processes and threads.
    #[arg(long, value_name = "N")]
    pub pids: Option<u32>,
    /// Disk quota, e.g. 256Mi, 10Gi (default 1Gi): the size of the session's
    /// own filesystem; a write past it fails with ENOSPC.
    #[arg(long, value_parser = parse_memory, value_name = "QUANTITY")]
    pub disk: Option<u64>,
    /// Most files, directories and symlinks on the session's disk (default:
    /// one per 16 KiB of --disk).
    #[arg(long, value_name = "N")]
    pub disk_inodes: Option<u64>,
    /// Sandbox template.
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// Session label (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Runtime to run in: process, docker or cri (default: any offering the template).
    #[arg(long, value_enum, value_name = "RUNTIME")]
    pub runtime: Option<sandfleet_common::spec::Runtime>,
    /// Run only on nodes carrying this label (repeatable).
    #[arg(long = "node-selector", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub node_selector: Vec<(String, String)>,
    /// End the session after this long without exec or file calls, e.g. 10m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,
    /// Node silence after which the session is placed elsewhere (default: the cluster's node TTL).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub lost_after: Option<Duration>,
    /// Placements allowed after losing a node before the session fails (0: unlimited).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Delay before placing a lost session again; doubles per loss, up to 60s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub restart_backoff: Option<Duration>,
}

/// What to execute, for `run` and `session exec`.
#[derive(Debug, Args, Clone)]
pub struct ExecArgs {
    /// Wall-clock limit of the command (server default 30s, at most 1h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'E', value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub env: Vec<(String, String)>,
    /// Working directory, relative to the workspace root.
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// Send this terminal's standard input (at most 1 MiB) to the command.
    #[arg(long, short = 'i')]
    pub stdin: bool,
    /// Run source code instead of a command.
    #[arg(long, short = 'c', value_name = "CODE", conflicts_with = "cmd")]
    pub code: Option<String>,
    /// Interpreter for --code.
    #[arg(long, value_enum, default_value_t = LanguageArg::Python, requires = "code")]
    pub language: LanguageArg,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD", required_unless_present = "code")]
    pub cmd: Vec<String>,
}

/// Interpreters for `--code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LanguageArg {
    /// python3 -c CODE
    Python,
    /// node -e CODE
    Node,
    /// bash -c CODE
    Bash,
}

impl From<LanguageArg> for proto::Language {
    fn from(l: LanguageArg) -> Self {
        match l {
            LanguageArg::Python => proto::Language::Python,
            LanguageArg::Node => proto::Language::Node,
            LanguageArg::Bash => proto::Language::Bash,
        }
    }
}

/// `sandfleet run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Session time to live; a safety net should this CLI die before deleting it
    /// (default: the command timeout plus 10 minutes).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// How long to wait for the session to start.
    #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DURATION")]
    pub wait_timeout: Duration,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// `sandfleet top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, short = 'd', value_parser = parse_duration, default_value = "2s", value_name = "DURATION")]
    pub interval: Duration,
    /// Print one frame and exit (creates per second needs two frames: unknown here).
    #[arg(long, conflicts_with = "count")]
    pub once: bool,
    /// Stop after this many frames (default: until Ctrl-C).
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,
}

/// `sandfleet session ...`.
// Parsed once per process: boxing `Create`'s arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Create a session.
    Create {
        /// Idempotency key (default: random). Repeating a create with the same id returns the first session.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
        #[command(flatten)]
        resources: ResourceArgs,
        /// Time to live, e.g. 1h.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// Environment variable for every exec in the session (repeatable).
        #[arg(long = "env", short = 'E', value_parser = parse_key_value, value_name = "KEY=VALUE")]
        env: Vec<(String, String)>,
        /// Create N sessions as one batch, whole or not at all (prints the
        /// batch; see `sandfleet batch`). Each carries the label
        /// sandfleet.io/batch=<batch id>.
        #[arg(long, value_name = "N")]
        count: Option<u32>,
        /// With --count: a JSON Lines file whose line i sets replica i's env
        /// and labels, e.g. {"env": {"SHARD": "0"}, "labels": {"shard": "0"}}
        /// (without --count, one replica per line).
        #[arg(long, value_name = "FILE")]
        patch_file: Option<PathBuf>,
        /// Claim an idle sandbox of this warm pool (RUNNING at once), or start
        /// one cold from the pool's spec when none is idle (said on stderr).
        /// With --count, the batch's replicas come from the pool (patches may
        /// set labels only).
        #[arg(long, value_name = "NAME")]
        pool: Option<String>,
        /// Wait until the session is running (on a terminal, a spinner shows
        /// its state and why it waits; for a batch, a bar of running replicas).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DURATION")]
        wait_timeout: Duration,
    },
    /// Show one session.
    Get {
        /// Session id.
        id: String,
    },
    /// List sessions.
    #[command(alias = "ls")]
    List {
        /// Only sessions with this label (repeatable; all must match).
        #[arg(long = "label", short = 'l', value_parser = parse_key_value, value_name = "KEY=VALUE")]
        labels: Vec<(String, String)>,
        /// Only sessions in this state (repeatable: any may match).
        #[arg(long = "state", short = 's', value_parser = parse_state, value_name = "STATE")]
        states: Vec<proto::SessionState>,
        /// Sessions per page (1-1000).
        #[arg(long, value_name = "N")]
        page_size: Option<u32>,
        /// Continue from a previous page.
        #[arg(long, value_name = "TOKEN", conflicts_with = "all")]
        page_token: Option<String>,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
        /// Only sessions of this tenant (admins; a user always sees only its own).
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
    },
    /// Delete sessions.
    #[command(alias = "delete")]
    Rm {
        /// Session ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Extend a session's expiry.
    Renew {
        /// Session id.
        id: String,
        /// New time to live from now (default: the session's own ttl).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// Print a session's state changes until it ends.
    Watch {
        /// Session id.
        id: String,
    },
    /// Run a command in a session and exit with its exit code.
    Exec {
        /// Session id.
        id: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Copy a file into or out of a session: `cp local ID:path` or `cp ID:path local`
    /// (`-` is stdin/stdout).
    Cp {
        /// Source: a local path, `-`, or ID:PATH.
        #[arg(value_parser = parse_cp_spec)]
        src: CpSpec,
        /// Destination: a local path, `-`, or ID:PATH.
        #[arg(value_parser = parse_cp_spec)]
        dst: CpSpec,
        /// File mode of an upload (octal, e.g. 755; default: the local file's mode).
        #[arg(long, value_parser = parse_mode, value_name = "OCTAL")]
        mode: Option<u32>,
    },
    /// Copy a session's workspace changes to its node's workspace store now;
    /// returns when they are durable there.
    Sync {
        /// Session id.
        id: String,
    },
    /// Print a presigned URL that downloads a workspace file straight from the
    /// workspace store (S3 stores only).
    Url {
        /// Session id.
        id: String,
        /// File path, relative to the workspace root.
        path: String,
        /// How long the URL works (at most 7d).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "15m")]
        expires_in: Duration,
    },
    /// List a directory of a session's workspace.
    Files {
        /// Session id.
        id: String,
        /// Directory, relative to the workspace root.
        #[arg(default_value = "")]
        path: String,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode like 644"))
}

/// `sandfleet node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List node agents.
    #[command(alias = "ls")]
    List,
    /// Show one node: its state, resources, labels, and who holds it out of
    /// placement (an operator's cordon or drain, its agent's) and why.
    Get {
        /// Node id.
        id: String,
    },
    /// Stop placing new sessions on a node (running sessions stay).
    Cordon {
        /// Node id.
        id: String,
    },
    /// Allow new sessions on a cordoned or drained node again (ends a drain).
    Uncordon {
        /// Node id.
        id: String,
    },
    /// Move every session off a node, a few at a time, and place no new ones
    /// on it. Follows progress until the node is empty (on a terminal, a bar
    /// shows the sessions moved off out of the total).
    Drain {
        /// Node id.
        id: String,
        /// After this long, move every remaining session at once.
        #[arg(long, value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
        deadline: Duration,
        /// How many of the node's sessions may be moving at a time.
        #[arg(long, default_value_t = 1, value_name = "N")]
        max_parallel: u32,
        /// Start the drain and return without following it.
        #[arg(long)]
        detach: bool,
        /// How long to follow before giving up (the drain goes on).
        #[arg(long, value_parser = parse_duration, default_value = "2h", value_name = "DURATION")]
        wait_timeout: Duration,
    },
}

/// `sandfleet cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Show every coordinator (the leader's id is marked with *).
    Status,
    /// Initialize a new cluster from coordinators started without --bootstrap.
    /// Send it to one of them (with --endpoint); every listed member becomes a voter.
    Init {
        /// The initial voters as ID=HOST:PORT, including the member called.
        #[arg(required = true, value_name = "ID=ADDR", value_parser = sandfleet_common::ids::parse_member)]
        members: Vec<(u64, String)>,
        /// Also create the first admin API key and write it to this file
        /// (mode 0600; refused if the file exists).
        #[arg(long, value_name = "FILE")]
        admin_key_file: Option<PathBuf>,
    },
    /// Add a coordinator; returns once it has caught up and joined (on a
    /// terminal, a bar shows its applied index against the leader's log).
    Add {
        /// Raft id of the new member.
        id: u64,
        /// Its gRPC address (host:port).
        address: String,
    },
    /// Remove a coordinator.
    Remove {
        /// Raft id of the member.
        id: u64,
    },
    /// Pause or resume placement cluster-wide.
    #[command(subcommand)]
    Scheduler(SchedulerCmd),
}

/// `sandfleet cluster scheduler ...`.
#[derive(Debug, Subcommand)]
pub enum SchedulerCmd {
    /// Stop placing sessions: new and displaced sessions wait PENDING, drains
    /// move nothing; running sessions go on.
    Pause,
    /// Place again; waiting sessions are placed at once.
    Resume,
}

/// `sandfleet dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the coordinator and the agent keep their data.
    #[arg(long, default_value = "./.sandfleet/dev", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Coordinator gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Node agent gRPC address.
    #[arg(long, default_value = "127.0.0.1:7071", value_name = "ADDR")]
    pub agent_listen: std::net::SocketAddr,
    /// How the node agent runs sessions: bubblewrap and cgroups on this host,
    /// or a hardened container per session (docker: needs the Docker engine
    /// and the image built by deploy/images/build-sandbox-image; cri: needs a
    /// containerd of its own at /run/sandfleet/containerd/containerd.sock with
    /// that image imported, see docs/kubernetes.md).
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: sandfleet_common::spec::Runtime,
    /// The node agent's node id (lowercase letters, digits and '-') [default:
    /// this host's name]. Two `sandfleet dev` on one host need different ones:
    /// the second refuses to start on a node id in use.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
}

impl Cli {
    /// Checks rules clap cannot express; the error exits with status 2 like clap's own.
    pub fn validate(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        if let Command::Top(t) = &self.command {
            if t.interval < Duration::from_millis(100) {
                return Err(Cli::command()
                    .error(clap::error::ErrorKind::ValueValidation, "top --interval must be at least 100ms"));
            }
        }
        if let Command::Session(SessionCmd::Cp { src, dst, .. }) = &self.command {
            if let Err(msg) = args::check_cp_pair(src, dst) {
                return Err(Cli::command().error(clap::error::ErrorKind::ArgumentConflict, msg));
            }
        }
        Ok(())
    }

    /// The log filter when `RUST_LOG` is not set.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            // openraft is chatty at info.
            Command::Dev(_) => "info,openraft=warn",
            _ => "warn",
        }
    }
}

/// Shared by every subcommand.
pub struct Ctx {
    pub client: Client,
    pub output: OutputFormat,
    /// `--verbose`.
    pub verbose: bool,
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Dev(args) = cli.command {
        return dev::run(args).await;
    }
    if let Command::Pki(cmd) = cli.command {
        return pki::run(cmd, cli.output);
    }
    let tls = sandfleet::TlsOptions::from_parts(cli.tls_ca.clone(), cli.tls_cert.clone(), cli.tls_key.clone())?;
    let client = Client::builder(cli.endpoint.iter().map(|e| e.trim()).filter(|e| !e.is_empty()))
        .request_timeout(cli.request_timeout)
        .tls(tls)
        .api_key(cli.api_key.clone())
        .connect()
        .await?;
    let ctx = Ctx { client, output: cli.output, verbose: cli.verbose };
    match cli.command {
        Command::Run(args) => exec::run(&ctx, args).await,
        Command::Session(cmd) => session::run(&ctx, cmd).await,
        Command::Node(NodeCmd::List) => cluster::node_list(&ctx).await,
        Command::Node(NodeCmd::Get { id }) => cluster::node_get(&ctx, &id).await,
        Command::Node(NodeCmd::Cordon { id }) => cluster::node_cordon(&ctx, &id, true).await,
        Command::Node(NodeCmd::Uncordon { id }) => cluster::node_cordon(&ctx, &id, false).await,
        Command::Node(NodeCmd::Drain { id, deadline, max_parallel, detach, wait_timeout }) => {
            cluster::node_drain(&ctx, &id, deadline, max_parallel, detach, wait_timeout).await
        }
        Command::Cluster(cmd) => cluster::run(&ctx, cmd).await,
        Command::Top(args) => {
            let opts = top::TopOptions { interval: args.interval, once: args.once, count: args.count.unwrap_or(0) };
            top::run(&ctx, opts).await
        }
        Command::Batch(cmd) => batch::run(&ctx, cmd).await,
        Command::Pool(cmd) => pool::run(&ctx, cmd).await,
        Command::Template(cmd) => template::run(&ctx, cmd).await,
        Command::Tenant(cmd) => tenant::run(&ctx, cmd).await,
        Command::Apikey(cmd) => apikey::run(&ctx, cmd).await,
        Command::Dev(_) | Command::Pki(_) => unreachable!("handled above"),
    }
}

pub use sandfleet_common::signal::shutdown_signal;

/// The error and its causes on one line, without repeating text a message already includes.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("sandfleet").chain(args.iter().copied()))?;
        cli.validate()?;
        Ok(cli)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_parses_resources_and_command() {
        let cli = parse(&[
            "-e",
            "a:1,b:2",
            "--timeout",
            "5s",
            "run",
            "--memory",
            "256Mi",
            "--cpu",
            "0.5",
            "--env",
            "A=1",
            "--label",
            "team=ml",
            "--timeout",
            "3s",
            "--",
            "python3",
            "-c",
            "print(1)",
        ])
        .expect("parses");
        assert_eq!(cli.endpoint, ["a:1", "b:2"]);
        assert_eq!(cli.request_timeout, Duration::from_secs(5));
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.resources.memory, Some(256 << 20));
        assert_eq!(r.resources.cpu, Some(500));
        assert_eq!(r.resources.labels, [("team".to_string(), "ml".to_string())]);
        assert_eq!(r.exec.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(r.exec.timeout, Some(Duration::from_secs(3)));
        assert_eq!(r.exec.cmd, ["python3", "-c", "print(1)"]);
    }

    #[test]
    fn run_without_double_dash_keeps_command_flags() {
        let cli = parse(&["run", "ls", "-la"]).expect("parses");
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.exec.cmd, ["ls", "-la"]);
    }

    #[test]
    fn run_code_form() {
        let cli = parse(&["run", "--code", "print(1)", "--language", "node"]).expect("parses");
        let Command::Run(r) = cli.command else { panic!("not run") };
        assert_eq!(r.exec.code.as_deref(), Some("print(1)"));
        assert_eq!(r.exec.language, LanguageArg::Node);
        // Neither a command nor code, or both: usage errors.
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["run", "--code", "1", "--", "ls"]).is_err());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["run", "--memory", "lots", "--", "ls"][..],
            &["run", "--env", "NOVALUE", "--", "ls"][..],
            &["session", "list", "--state", "sleepy"][..],
            &["session", "cp", "a", "b"][..],
            &["session", "cp", "s1:", "b"][..],
            &["session", "cp", "s1:x", "s2:y"][..],
            &["--output", "yaml", "node", "list"][..],
        ] {
            let e = parse(args).err().unwrap_or_else(|| panic!("{args:?} should not parse"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn session_subcommands() {
        let cli =
            parse(&["-o", "json", "session", "list", "--label", "a=b", "--state", "running", "--all"]).expect("parses");
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Session(SessionCmd::List { labels, states, all, .. }) = cli.command else { panic!() };
        assert_eq!(labels, [("a".to_string(), "b".to_string())]);
        assert_eq!(states, [proto::SessionState::Running]);
        assert!(all);

        let cli = parse(&["session", "cp", "./local.txt", "s1:dir/x.txt"]).expect("parses");
        let Command::Session(SessionCmd::Cp { src, dst, .. }) = cli.command else { panic!() };
        assert_eq!(src, CpSpec::Local("./local.txt".into()));
        assert_eq!(dst, CpSpec::Remote { id: "s1".into(), path: "dir/x.txt".into() });

        let cli = parse(&["session", "exec", "s1", "--timeout", "2s", "--", "echo", "hi"]).expect("parses");
        let Command::Session(SessionCmd::Exec { id, exec }) = cli.command else { panic!() };
        assert_eq!(id, "s1");
        assert_eq!(exec.cmd, ["echo", "hi"]);

        assert!(parse(&["session", "rm"]).is_err());
        assert!(parse(&["session", "create", "--ttl", "1h", "--wait", "--env", "K=V"]).is_ok());
        assert!(parse(&["cluster", "add", "2", "10.0.0.2:7070"]).is_ok());
        assert!(parse(&["dev", "--listen", "127.0.0.1:0"]).is_ok());
        let cli = parse(&["-o", "json", "top", "--once"]).expect("parses");
        let Command::Top(t) = cli.command else { panic!() };
        assert_eq!((t.once, t.interval, t.count), (true, Duration::from_secs(2), None));
        let cli = parse(&["top", "--interval", "500ms", "-n", "3"]).expect("parses");
        let Command::Top(t) = cli.command else { panic!() };
        assert_eq!((t.once, t.interval, t.count), (false, Duration::from_millis(500), Some(3)));
        assert!(parse(&["top", "--once", "--count", "2"]).is_err());
        assert_eq!(parse(&["top", "--interval", "10ms"]).err().map(|e| e.exit_code()), Some(2));
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert!(parse_mode("9").is_err());
    }

    #[test]
    fn tenant_and_apikey_subcommands() {
        let cli = parse(&["--api-key", "sfk_x", "tenant", "create", "team-a", "--max-sessions", "5", "--max-cpu", "2"])
            .expect("parses");
        assert_eq!(cli.api_key.as_deref(), Some("sfk_x"));
        let Command::Tenant(tenant::TenantCmd::Create { name, quota }) = cli.command else { panic!() };
        assert_eq!(
            (name.as_str(), quota.max_sessions, quota.max_cpu, quota.max_memory),
            ("team-a", Some(5), Some(2000), None)
        );
        let cli = parse(&["apikey", "create", "--tenant", "a", "--role", "user", "--expires", "30d"]).expect("parses");
        let Command::Apikey(apikey::ApiKeyCmd::Create { role, expires, .. }) = cli.command else { panic!() };
        assert_eq!(role, sandfleet_common::auth::Role::User);
        assert_eq!(expires, Some(Duration::from_secs(30 * 86400)));
        assert!(parse(&["apikey", "create", "--tenant", "a", "--role", "root"]).is_err());
        assert!(parse(&["tenant", "update", "a", "--max-memory", "64Gi"]).is_ok());
        assert!(parse(&["cluster", "init", "1=a:1", "--admin-key-file", "k"]).is_ok());
    }

    #[test]
    fn error_lines_do_not_repeat() {
        let inner = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(inner).context("cannot connect to x: connection refused");
        assert_eq!(error_line(&e), "cannot connect to x: connection refused");
        let e = anyhow::Error::new(std::io::Error::other("disk full")).context("writing out.txt");
        assert_eq!(error_line(&e), "writing out.txt: disk full");
    }
}
