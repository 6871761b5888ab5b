//! Starting, stopping, crashing and restarting a real Sandfleet cluster.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use sandfleet_testkit::{ClusterBuilder, Target};
//! let mut cluster = ClusterBuilder::new().coordinators(1).agents(1).start().await?;
//! let client = cluster.client().await;
//! // ... use the cluster ...
//! cluster.kill(Target::Agent(0)).await?;
//! cluster.restart_agent(0).await?;
//! # Ok(()) }
//! ```
//!
//! # Network
//! Where the machine allows it (root, `ip`, `nsenter`, `iptables`), every
//! process runs in its own network namespace on a per-cluster bridge
//! (see [`crate::netns`]): coordinator `i` at `10.X.Y.(11+i)`, agent `i` at
//! `10.X.Y.(101+i)`, and the harness and its SDK clients on the host reach
//! all of them through the bridge at `10.X.Y.1`. That makes network
//! partitions possible: [`Cluster::partition`], [`Cluster::isolate_agent`],
//! [`Cluster::isolate_coordinator`], [`Cluster::heal`]. Elsewhere the cluster
//! falls back to `127.0.0.1` with a loud warning, and partition calls fail with
//! [`PartitionsUnavailable`](crate::netns::PartitionsUnavailable) ([`Cluster::can_partition`]
//! says so up front); with `SANDFLEET_REQUIRE_FACILITIES=1` the fallback is an
//! error instead. [`ClusterBuilder::network`] or `SANDFLEET_NETWORK=loopback|netns`
//! choose explicitly.
//!
//! Each process is a [`Proc`] (see [`crate::process`]): started with
//! `--listen <its address>:0`, its address learnt from its ready line and
//! pinned across restarts, its stderr in `<cluster dir>/<name>.log`. A
//! restarted process comes back in the same namespace, so cut links stay cut
//! across restarts. When the thread is panicking as the [`Cluster`] is dropped
//! (a failed test), the tail of every log is printed to stderr and the
//! directory is kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::bins::{bin_dir, bin_path_in};
use crate::netns::{NetHost, Network, NetworkChoice, NetworkMode, PartitionsUnavailable};
use crate::process::{Proc, Role, DEFAULT_READY_TIMEOUT, LOG_TAIL_LINES};
use crate::tls::{TestPki, TlsPaths};
use sandfleet_common::auth::IdentityKind;

/// Which process of a [`Cluster`] an operation is aimed at (index into
/// [`Cluster::coordinators`] or [`Cluster::agents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `cluster.coordinators[i]`, Raft id `i + 1`.
    Coordinator(usize),
    /// `cluster.agents[i]`, node id `n{i + 1}-<suffix>`.
    Agent(usize),
}

/// The [`Network`] key of a process: `c1`.. for coordinators, `a1`.. for agents.
fn net_key(t: Target) -> String {
    match t {
        Target::Coordinator(i) => format!("c{}", i + 1),
        Target::Agent(i) => format!("a{}", i + 1),
    }
}

fn target_of(key: &str) -> Option<Target> {
    let n: usize = key.get(1..)?.parse().ok()?;
    match key.as_bytes().first()? {
        b'c' => Some(Target::Coordinator(n.checked_sub(1)?)),
        b'a' => Some(Target::Agent(n.checked_sub(1)?)),
        _ => None,
    }
}

/// The port of every self-forming coordinator in its own namespace.
pub const SELF_FORMING_PORT: u16 = 7070;
/// The StatefulSet name self-forming coordinators take their hostnames from:
/// coordinator `i` is `sandfleet-coordinator-<i>`.
pub const SELF_FORMING_NAME: &str = "sandfleet-coordinator";

/// A free loopback port, for addresses that must be known before the process starts.
fn free_loopback_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// `--health-listen`'s value for a process in `netns` (or on loopback): its address, any port.
fn health_listen(netns: &Option<NetHost>) -> String {
    match netns {
        Some(h) => format!("{}:0", h.ip),
        None => "127.0.0.1:0".to_string(),
    }
}

/// The port of every metrics listener in its own namespace (the OpenTelemetry
/// Prometheus exporter's customary port; the Kubernetes manifests use it too).
pub const METRICS_PORT: u16 = 9464;

/// `--metrics-listen`'s value for a process in `netns` (or on loopback): its
/// address and a port fixed before the start ([`METRICS_PORT`] in its
/// namespace, else a free loopback port), so that a scraper configured up
/// front finds it, across restarts too.
fn metrics_listen(netns: &Option<NetHost>) -> Result<String> {
    Ok(match netns {
        Some(h) => format!("{}:{METRICS_PORT}", h.ip),
        None => format!("127.0.0.1:{}", free_loopback_port()?),
    })
}

/// Five random characters of `[a-z0-9]`, for node ids.
fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..5).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// Configures and starts a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    coordinators: usize,
    agents: usize,
    agent_args: Vec<String>,
    /// Extra arguments of single agents, by index, after `agent_args`.
    agent_args_of: std::collections::BTreeMap<usize, Vec<String>>,
    coordinator_args: Vec<String>,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
    join_with_add_member: bool,
    bootstrap: bool,
    wait_nodes: bool,
    bin_dir: Option<PathBuf>,
    tmp_in: Option<PathBuf>,
    network: NetworkChoice,
    tls: bool,
    self_forming: bool,
    started_coordinators: Option<usize>,
    health_listeners: bool,
    metrics_listeners: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterBuilder {
    /// One coordinator, one agent.
    pub fn new() -> Self {
        ClusterBuilder {
            coordinators: 1,
            agents: 1,
            agent_args: Vec::new(),
            agent_args_of: Default::default(),
            coordinator_args: Vec::new(),
            env: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            join_with_add_member: true,
            bootstrap: true,
            wait_nodes: true,
            bin_dir: None,
            tmp_in: None,
            network: NetworkChoice::Auto,
            tls: true,
            self_forming: false,
            started_coordinators: None,
            health_listeners: false,
            metrics_listeners: false,
        }
    }

    /// Coordinators that form the cluster by themselves, as a Kubernetes
    /// StatefulSet runs them (default: no): coordinator `i` starts with
    /// `--id-from-hostname --hostname sandfleet-coordinator-<i>` (so Raft id
    /// `i + 1`) and `--initial-members` listing every coordinator at an address
    /// fixed in advance (port [`SELF_FORMING_PORT`] of its namespace, or a free
    /// loopback port). Nobody calls `InitCluster` or `AddMember`; `start` waits
    /// until the cluster has formed, and reads the admin key the initializing
    /// member writes (`--admin-key-file`, given to every member).
    pub fn self_forming(mut self, yes: bool) -> Self {
        self.self_forming = yes;
        self
    }

    /// With [`ClusterBuilder::self_forming`]: start only the first `k`
    /// coordinators; the others are prepared (arguments, addresses,
    /// certificates) and started later with [`Cluster::restart`]. `start` then
    /// neither waits for the cluster to form nor starts agents.
    pub fn start_coordinators(mut self, k: usize) -> Self {
        self.started_coordinators = Some(k);
        self
    }

    /// Give every coordinator and agent a plaintext health listener
    /// (`--health-listen <its address>:0`); its address is in the process's
    /// ready line ([`Cluster::health_addr`]). Default: no.
    pub fn health_listeners(mut self, yes: bool) -> Self {
        self.health_listeners = yes;
        self
    }

    /// Give every coordinator and agent a metrics listener
    /// (`--metrics-listen <its address>:<port>`: `/metrics`, `/healthz`,
    /// `/readyz`), at an address fixed before it starts and kept across
    /// restarts ([`Cluster::metrics_addr`]). Default: no.
    pub fn metrics_listeners(mut self, yes: bool) -> Self {
        self.metrics_listeners = yes;
        self
    }

    /// Mutual TLS everywhere (the default): a CA per cluster and a
    /// certificate per process and for the test's own clients. `false` runs
    /// `--insecure` plaintext, which the daemons allow only on loopback, so it
    /// also puts the cluster on loopback (no partitions).
    pub fn tls(mut self, yes: bool) -> Self {
        self.tls = yes;
        self
    }

    /// How many coordinators (Raft ids 1..=n; the first bootstraps).
    pub fn coordinators(mut self, n: usize) -> Self {
        assert!(n >= 1, "a cluster needs at least one coordinator");
        self.coordinators = n;
        self
    }

    /// How many agents (node ids `n1-<suffix>`..=`nM-<suffix>`, the suffix random per cluster).
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// Extra arguments for every agent, e.g. `["--cpu", "2", "--slots", "2"]`.
    pub fn agent_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.agent_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Extra arguments for agent `i` only (after those of every agent; a
    /// repeated option's last value wins), e.g. another runtime.
    pub fn agent_args_of<I, S>(mut self, i: usize, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.agent_args_of.entry(i).or_default().extend(args.into_iter().map(Into::into));
        self
    }

    /// Extra arguments for every coordinator.
    pub fn coordinator_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.coordinator_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for every started process; `{host}` in the
    /// value stands for the host's address as the processes reach it.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long each process may take to print its ready line (default 30 s).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// Whether the harness joins coordinators 2..=N by calling
    /// `ClusterService.AddMember` on coordinator 1 (default: yes). Turn off
    /// when the coordinators join by themselves through their arguments.
    pub fn join_with_add_member(mut self, yes: bool) -> Self {
        self.join_with_add_member = yes;
        self
    }

    /// Whether coordinator 1 starts with `--bootstrap` (default: yes). Without
    /// it the coordinators start uninitialized and unjoined (the test calls
    /// `InitCluster`), and no agents may be asked for.
    pub fn bootstrap(mut self, yes: bool) -> Self {
        self.bootstrap = yes;
        self
    }

    /// Whether `start` waits until `ListNodes` shows every agent `ready` (default: yes).
    pub fn wait_for_nodes(mut self, yes: bool) -> Self {
        self.wait_nodes = yes;
        self
    }

    /// Takes the binaries from `dir` instead of [`bin_dir`] (e.g. stand-ins in
    /// the harness's own tests).
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Creates the cluster directory under `dir` instead of
    /// `SANDFLEET_TEST_TMPDIR` or the system temporary directory.
    pub fn tmp_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tmp_in = Some(dir.into());
        self
    }

    /// How the processes are connected (default [`NetworkChoice::Auto`]:
    /// a network namespace per process where possible, see the module docs).
    pub fn network(mut self, choice: NetworkChoice) -> Self {
        self.network = choice;
        self
    }

    /// Picks the network per [`ClusterBuilder::network`], the environment and the machine.
    fn make_network(&self) -> Result<(NetworkMode, Option<Network>, String)> {
        let require = std::env::var(crate::facilities::REQUIRE_ENV).is_ok_and(|v| v == "1");
        let choice = match self.network {
            // Plaintext is refused on any address that is not loopback.
            _ if !self.tls => NetworkChoice::Loopback,
            NetworkChoice::Auto => match std::env::var(crate::netns::NETWORK_ENV).as_deref() {
                Ok("loopback") => NetworkChoice::Loopback,
                Ok("netns") => NetworkChoice::Namespaces,
                Ok(other) if !other.is_empty() => {
                    bail!("{}={other:?}: expected \"loopback\" or \"netns\"", crate::netns::NETWORK_ENV)
                }
                _ => NetworkChoice::Auto,
            },
            c => c,
        };
        match choice {
            NetworkChoice::Loopback => {
                Ok((NetworkMode::Loopback, None, "the cluster was built for loopback".to_string()))
            }
            NetworkChoice::Namespaces => {
                let net = Network::create().context("creating the cluster's network namespaces")?;
                Ok((NetworkMode::Namespaces, Some(net), String::new()))
            }
            NetworkChoice::Auto => {
                let made = match crate::netns::unavailable_reason() {
                    Some(why) => Err(anyhow!("missing {why}")),
                    None => Network::create(),
                };
                match made {
                    Ok(net) => Ok((NetworkMode::Namespaces, Some(net), String::new())),
                    Err(e) if require => Err(e.context(format!(
                        "network namespaces (for partitions) are unavailable and {}=1",
                        crate::facilities::REQUIRE_ENV
                    ))),
                    Err(e) => {
                        let why = format!("{e:#}");
                        crate::netns::warn_loopback(&why);
                        Ok((NetworkMode::Loopback, None, why))
                    }
                }
            }
        }
    }

    /// Starts the coordinators, then the agents, and waits until the cluster is usable.
    pub async fn start(self) -> Result<Cluster> {
        // Panics with build instructions before anything is created.
        let _ = self.binaries();
        let base = self
            .tmp_in
            .clone()
            .or_else(|| std::env::var_os("SANDFLEET_TEST_TMPDIR").map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix("sandfleet-test-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a cluster directory in {}", base.display()))?;
        // The agent's sandboxes resolve their workspace as an unprivileged uid,
        // so every ancestor of the data dirs must be traversable (tempfile makes 0700).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("chmod 0711 {}", tmp.path().display()))?;
        }
        let (network_mode, net, loopback_reason) = self.make_network()?;
        let (pki, client_tls) = if self.tls {
            let pki = TestPki::create(&tmp.path().join("pki"), "sandfleet test CA")?;
            let client = pki.issue(IdentityKind::Client, "test-admin", &[])?;
            (Some(pki), Some(client))
        } else {
            (None, None)
        };
        // `{host}` in an environment value stands for the host's address as the
        // processes reach it (as in agent flags): for servers a test runs.
        let host = net.as_ref().map(|n| n.gateway()).unwrap_or(std::net::Ipv4Addr::LOCALHOST).to_string();
        let env = self.env.iter().map(|(k, v)| (k.clone(), v.replace("{host}", &host))).collect();
        let mut cluster = Cluster {
            pki,
            client_tls,
            coordinators: Vec::new(),
            agents: Vec::new(),
            net,
            network_mode,
            loopback_reason,
            tmp,
            ready_timeout: self.ready_timeout,
            coordinator_bin: self.binaries().0,
            coordinator_args: self.coordinator_args.clone(),
            env,
            admin_key: None,
            health_listeners: self.health_listeners,
            metrics_listeners: self.metrics_listeners,
        };
        if self.tls {
            // A TLS cluster needs a credential on every call: the bootstrap
            // member writes the first admin API key, for tests of keys and tenants.
            cluster.admin_key = Some(String::new());
        }
        match self.start_into(&mut cluster).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                // The error carries the failing process's log; keep all of them for reading.
                let dir = cluster.keep_dir();
                Err(e.context(format!("starting the cluster failed; logs kept in {}", dir.display())))
            }
        }
    }

    fn binaries(&self) -> (PathBuf, Option<PathBuf>) {
        let bins = self.bin_dir.clone().unwrap_or_else(bin_dir);
        let coordinator = bin_path_in(&bins, "sandfleet-coordinator");
        let agent = if self.agents > 0 { Some(bin_path_in(&bins, "sandfleet-agent")) } else { None };
        (coordinator, agent)
    }

    async fn start_into(&self, cluster: &mut Cluster) -> Result<()> {
        let dir = cluster.tmp.path().to_path_buf();
        let (_, agent_bin) = self.binaries();

        if self.self_forming {
            anyhow::ensure!(self.bootstrap, "a self-forming cluster initializes itself; do not turn bootstrap off");
            cluster.prepare_self_forming(self.coordinators)?;
            let k = self.started_coordinators.unwrap_or(self.coordinators).min(self.coordinators);
            for i in 0..k {
                cluster.restart(Target::Coordinator(i)).await?;
            }
            if k < self.coordinators {
                anyhow::ensure!(self.agents == 0, "agents need a formed cluster; start them after every coordinator");
                return Ok(());
            }
            cluster.wait_formed(self.ready_timeout * 2).await?;
        } else {
            for i in 0..self.coordinators {
                cluster.launch_coordinator(i == 0 && self.bootstrap).await?;
            }
        }
        if !self.bootstrap {
            anyhow::ensure!(self.agents == 0, "agents need an initialized cluster; start them after InitCluster");
            return Ok(());
        }
        if self.coordinators > 1 && self.join_with_add_member && !self.self_forming {
            cluster.join_coordinators().await?;
        }

        let coordinators = cluster.coordinator_addrs().join(",");
        if let Some(agent_bin) = agent_bin {
            // Agents of concurrently running clusters share the host's cgroup
            // tree (`sandfleet/<node id>/...`) and uid space, and an agent
            // cleans up its node's cgroups when it starts; so node ids and
            // session uid ranges are unique per cluster.
            let suffix = random_suffix();
            let uid_block: u32 = rand::Rng::random_range(&mut rand::rng(), 0..4000);
            let set_uid_base = !self.agent_args.iter().any(|a| a == "--uid-base" || a.starts_with("--uid-base="));
            for i in 0..self.agents {
                let id = format!("n{}-{suffix}", i + 1);
                let data_dir = dir.join(format!("agent-{id}"));
                std::fs::create_dir_all(&data_dir)?;
                let netns = cluster.add_netns(Target::Agent(i))?;
                let listen = match &netns {
                    Some(h) => format!("{}:0", h.ip),
                    None => "127.0.0.1:0".to_string(),
                };
                let tls_args = cluster.tls_args(IdentityKind::Agent, &id, &listen)?;
                let mut args: Vec<String> = vec![
                    "--node-id".into(),
                    id.clone(),
                    "--listen".into(),
                    listen,
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--coordinators".into(),
                    coordinators.clone(),
                    "--runtime".into(),
                    "process".into(),
                ];
                args.extend(tls_args);
                if self.health_listeners {
                    args.extend(["--health-listen".to_string(), health_listen(&netns)]);
                }
                if self.metrics_listeners {
                    args.extend(["--metrics-listen".to_string(), metrics_listen(&netns)?]);
                }
                if set_uid_base {
                    let base = 300_000 + (uid_block * 16 + i as u32 % 16) * 1024;
                    args.extend(["--uid-base".to_string(), base.to_string()]);
                }
                // Agents of one cluster share a local workspace store (like a shared
                // mount), so a session placed again elsewhere finds its files.
                if !self.agent_args.iter().any(|a| a.starts_with("--workspace-store")) {
                    args.extend([
                        "--workspace-store-dir".to_string(),
                        dir.join("workspace-store").display().to_string(),
                    ]);
                }
                // `{host}` stands for the host's address as the agents reach it (the
                // bridge's gateway in namespaces, else loopback): for servers a test runs.
                let host = cluster.host_ip().to_string();
                args.extend(self.agent_args.iter().map(|a| a.replace("{host}", &host)));
                args.extend(self.agent_args_of.get(&i).into_iter().flatten().map(|a| a.replace("{host}", &host)));
                let mut p = Proc::new(Role::Agent, id, agent_bin.clone(), args, data_dir, &dir, cluster.env.clone());
                p.netns = netns;
                let started = p.launch(self.ready_timeout).await;
                cluster.agents.push(p);
                started?;
            }
        }
        if self.wait_nodes && self.agents > 0 {
            cluster.wait_nodes_ready(self.ready_timeout).await?;
        }
        Ok(())
    }
}

/// A running Sandfleet cluster of real processes in one temporary directory.
///
/// Dropping it stops every process (SIGTERM, then SIGKILL after 5 s) and
/// removes the directory — unless the thread is panicking, in which case the
/// log tails are printed and the directory is kept.
pub struct Cluster {
    /// Coordinators; `coordinators[i]` has Raft id `i + 1`.
    pub coordinators: Vec<Proc>,
    /// Agents; `agents[i]` has node id `n{i + 1}-<suffix>`, the suffix random per cluster.
    pub agents: Vec<Proc>,
    net: Option<Network>,
    network_mode: NetworkMode,
    loopback_reason: String,
    tmp: TempDir,
    ready_timeout: Duration,
    coordinator_bin: PathBuf,
    coordinator_args: Vec<String>,
    env: Vec<(String, String)>,
    /// The cluster's CA; `None` for an `--insecure` cluster.
    pki: Option<TestPki>,
    /// The test's own `client/test-admin` certificate.
    client_tls: Option<TlsPaths>,
    /// The first admin API key of a TLS cluster (empty until bootstrapped).
    admin_key: Option<String>,
    /// Every process gets `--health-listen`.
    health_listeners: bool,
    /// Every process gets `--metrics-listen`.
    metrics_listeners: bool,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.tmp.path())
            .field("network", &self.network_mode)
            .field("bridge", &self.net.as_ref().map(|n| n.bridge().to_string()))
            .field("coordinators", &self.coordinators)
            .field("agents", &self.agents)
            .finish()
    }
}

impl Cluster {
    /// The cluster's temporary directory (data dirs and logs).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Keeps the directory after the cluster is dropped and returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.tmp.disable_cleanup(true);
        self.tmp.path().to_path_buf()
    }

    /// Every coordinator address (`host:port`), in id order.
    pub fn coordinator_addrs(&self) -> Vec<String> {
        self.coordinators.iter().map(|c| c.addr.clone()).collect()
    }

    /// The endpoint list as the CLI takes it: `addr[,addr...]`.
    pub fn endpoint(&self) -> String {
        self.coordinator_addrs().join(",")
    }

    /// A connected SDK client for every coordinator.
    ///
    /// # Panics
    /// When it cannot connect, printing the processes' logs.
    pub async fn client(&self) -> sandfleet::Client {
        match self.try_client().await {
            Ok(c) => c,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A connected SDK client for every coordinator, with the test's client
    /// certificate (cluster admin) on a TLS cluster.
    pub async fn try_client(&self) -> Result<sandfleet::Client> {
        self.client_builder().connect().await.map_err(|e| anyhow!("connecting the SDK to {}: {e}", self.endpoint()))
    }

    /// A connected SDK client for every coordinator that authenticates with
    /// `api_key` alone (none with `None`): on a TLS cluster it trusts the
    /// cluster CA but presents no client certificate.
    pub async fn try_client_with_key(&self, api_key: Option<&str>) -> Result<sandfleet::Client> {
        let tls = self.client_tls.as_ref().map(|t| sandfleet::TlsOptions { ca: t.ca.clone(), cert_and_key: None });
        sandfleet::Client::builder(self.coordinator_addrs())
            .tls(tls)
            .api_key(api_key)
            .connect()
            .await
            .map_err(|e| anyhow!("connecting the SDK to {}: {e}", self.endpoint()))
    }

    /// An SDK builder for every coordinator, with the test's client
    /// certificate when the cluster runs TLS.
    pub fn client_builder(&self) -> sandfleet::ClientBuilder {
        self.client_for(self.coordinator_addrs())
    }

    /// An SDK builder for some coordinators (`host:port`), with the test's
    /// client certificate when the cluster runs TLS.
    pub fn client_for(&self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> sandfleet::ClientBuilder {
        sandfleet::Client::builder(endpoints).tls(self.client_tls.as_ref().map(TlsPaths::sdk_options))
    }

    /// The CA of a TLS cluster, to issue more certificates (for attacks).
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// The test's `client/test-admin` certificate files of a TLS cluster.
    pub fn client_tls(&self) -> Option<&TlsPaths> {
        self.client_tls.as_ref()
    }

    /// The environment a `sandfleet` CLI needs to reach this cluster
    /// (`SANDFLEET_TLS_*`; empty for an `--insecure` cluster).
    pub fn cli_env(&self) -> Vec<(String, String)> {
        self.client_tls.as_ref().map(TlsPaths::client_env).unwrap_or_default()
    }

    /// A raw tonic channel to `addr`, a coordinator (`kind` Coordinator) or
    /// an agent, over TLS with the test's client certificate when the cluster runs TLS.
    pub fn channel(&self, addr: &str, kind: IdentityKind) -> Result<tonic::transport::Channel> {
        self.channel_as(addr, kind, self.client_tls.as_ref())
    }

    /// A raw tonic channel to `addr` (a server of `kind`) presenting the
    /// certificate `tls` (plaintext when `None`): to act as another identity.
    pub fn channel_as(
        &self,
        addr: &str,
        kind: IdentityKind,
        tls: Option<&TlsPaths>,
    ) -> Result<tonic::transport::Channel> {
        let dialer = match tls {
            Some(t) => Some(t.dialer(kind)?),
            None => None,
        };
        let opts = sandfleet_common::grpc::ChannelOptions {
            connect_timeout: Duration::from_secs(2),
            ..sandfleet_common::grpc::ChannelOptions::CLIENT
        };
        Ok(sandfleet_common::grpc::channel(addr, opts, dialer.as_ref())?)
    }

    /// The daemon flags of process `kind/name` listening on `listen`: its
    /// certificate (issued now, with the listen IP as a SAN) or `--insecure`.
    fn tls_args(&self, kind: IdentityKind, name: &str, listen: &str) -> Result<Vec<String>> {
        let Some(pki) = &self.pki else {
            return Ok(vec!["--insecure".into()]);
        };
        let ip = listen.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_else(|| listen.to_string());
        Ok(pki.issue(kind, name, &[ip, "localhost".into()])?.daemon_args())
    }

    /// The first admin API key (tenant `default`) of a TLS cluster, written by
    /// the bootstrap member (`--admin-key-file`).
    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref().filter(|k| !k.is_empty())
    }

    /// The process `t` names.
    pub fn proc(&self, t: Target) -> &Proc {
        match t {
            Target::Coordinator(i) => &self.coordinators[i],
            Target::Agent(i) => &self.agents[i],
        }
    }

    /// The process `t` names, mutably.
    pub fn proc_mut(&mut self, t: Target) -> &mut Proc {
        match t {
            Target::Coordinator(i) => &mut self.coordinators[i],
            Target::Agent(i) => &mut self.agents[i],
        }
    }

    /// SIGKILL the process `t` and reap it.
    pub async fn kill(&mut self, t: Target) -> Result<ExitStatus> {
        self.proc_mut(t).kill().await
    }

    /// SIGTERM the process `t` and wait for it to exit (an error if it hangs).
    pub async fn terminate(&mut self, t: Target) -> Result<ExitStatus> {
        self.proc_mut(t).terminate().await
    }

    /// SIGKILL agent `i`.
    pub async fn kill_agent(&mut self, i: usize) -> Result<ExitStatus> {
        self.kill(Target::Agent(i)).await
    }

    /// SIGKILL coordinator `i`.
    pub async fn kill_coordinator(&mut self, i: usize) -> Result<ExitStatus> {
        self.kill(Target::Coordinator(i)).await
    }

    /// SIGTERM agent `i` and wait.
    pub async fn terminate_agent(&mut self, i: usize) -> Result<ExitStatus> {
        self.terminate(Target::Agent(i)).await
    }

    /// SIGTERM coordinator `i` and wait.
    pub async fn terminate_coordinator(&mut self, i: usize) -> Result<ExitStatus> {
        self.terminate(Target::Coordinator(i)).await
    }

    /// Starts process `t` again with the same arguments, data dir and address,
    /// and waits for its ready line. A process that still runs is terminated first.
    pub async fn restart(&mut self, t: Target) -> Result<()> {
        let timeout = self.ready_timeout;
        let p = self.proc_mut(t);
        if p.is_running() {
            p.terminate().await?;
        }
        // The old socket may linger for a moment; retry a few times if the
        // process dies before it is ready (e.g. "address in use").
        let mut attempt = 0;
        loop {
            attempt += 1;
            match p.launch(timeout).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 && !p.is_running() => {
                    p.note(&format!("restart attempt {attempt} failed: {e:#}; retrying"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Restarts agent `i` and waits until the cluster lists it `ready`.
    pub async fn restart_agent(&mut self, i: usize) -> Result<()> {
        self.restart(Target::Agent(i)).await?;
        self.wait_nodes_ready(self.ready_timeout).await
    }

    /// Restarts coordinator `i` and waits until the cluster answers again with
    /// every running agent `ready`.
    pub async fn restart_coordinator(&mut self, i: usize) -> Result<()> {
        self.restart(Target::Coordinator(i)).await?;
        self.wait_nodes_ready(self.ready_timeout).await
    }

    /// Waits until `ListNodes` (through any coordinator) shows every running
    /// agent in state `ready`.
    pub async fn wait_nodes_ready(&mut self, timeout: Duration) -> Result<()> {
        let want: Vec<String> =
            self.agents.iter_mut().filter_map(|a| if a.is_running() { Some(a.id.clone()) } else { None }).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let last;
            match self.try_client().await {
                Ok(client) => match client.list_nodes().await {
                    Ok(nodes) => {
                        let not_ready: Vec<String> = want
                            .iter()
                            .filter(|id| !nodes.iter().any(|n| &n.id == *id && n.state == "ready"))
                            .cloned()
                            .collect();
                        if not_ready.is_empty() {
                            return Ok(());
                        }
                        last = format!(
                            "not ready: {not_ready:?}; nodes: {:?}",
                            nodes.iter().map(|n| format!("{}={}", n.id, n.state)).collect::<Vec<_>>()
                        );
                    }
                    Err(e) => last = format!("ListNodes failed: {e}"),
                },
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("agents not ready within {timeout:?}: {last}\n{}", self.logs(LOG_TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds coordinators 2..=N to the Raft group through coordinator 1, then
    /// waits until every member is a voter and a leader is known.
    async fn join_coordinators(&mut self) -> Result<()> {
        use sandfleet_proto::v1::cluster_service_client::ClusterServiceClient;
        use sandfleet_proto::v1::AddMemberRequest;

        let first = self.channel(&self.coordinators[0].addr, IdentityKind::Coordinator)?;
        let deadline = Instant::now() + self.ready_timeout * 2;
        for c in self.coordinators.iter().skip(1) {
            let id: u64 = c.id.parse().expect("coordinator ids are numbers");
            loop {
                let result = async {
                    let mut api = ClusterServiceClient::new(first.clone());
                    api.add_member(AddMemberRequest { id, address: c.addr.clone() }).await?;
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        let already =
                            e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::AlreadyExists);
                        if already {
                            break;
                        }
                        if Instant::now() >= deadline {
                            bail!("adding coordinator {id} ({}) failed: {e:#}\n{}", c.addr, self.logs(LOG_TAIL_LINES));
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        self.wait_voters(deadline).await
    }

    /// Waits until coordinator 1 sees a leader and every coordinator as a voter.
    async fn wait_voters(&self, deadline: Instant) -> Result<()> {
        use sandfleet_proto::v1::cluster_service_client::ClusterServiceClient;
        use sandfleet_proto::v1::ClusterStatusRequest;
        let first = self.channel(&self.coordinators[0].addr, IdentityKind::Coordinator)?;
        let n = self.coordinators.len();
        loop {
            let status = async {
                let mut api = ClusterServiceClient::new(first.clone());
                let mut req = tonic::Request::new(ClusterStatusRequest {});
                req.set_timeout(Duration::from_secs(5));
                Ok::<_, anyhow::Error>(api.status(req).await?.into_inner())
            }
            .await;
            let last = match status {
                Ok(s) if s.leader_id != 0 && s.members.iter().filter(|m| m.voter).count() == n => return Ok(()),
                Ok(s) => format!("{s:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("coordinators did not form a {n}-voter group: {last}\n{}", self.logs(LOG_TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Prepares `n` self-forming coordinators (see [`ClusterBuilder::self_forming`])
    /// without starting them: namespaces, fixed addresses, certificates, arguments.
    fn prepare_self_forming(&mut self, n: usize) -> Result<()> {
        let dir = self.tmp.path().to_path_buf();
        let mut hosts = Vec::new();
        for i in 0..n {
            let netns = self.add_netns(Target::Coordinator(i))?;
            let addr = match &netns {
                Some(h) => format!("{}:{SELF_FORMING_PORT}", h.ip),
                None => format!("127.0.0.1:{}", free_loopback_port()?),
            };
            hosts.push((netns, addr));
        }
        let members: Vec<String> = hosts.iter().enumerate().map(|(i, (_, addr))| format!("{}={addr}", i + 1)).collect();
        let members = members.join(",");
        for (i, (netns, listen)) in hosts.into_iter().enumerate() {
            let id = (i + 1).to_string();
            let data_dir = dir.join(format!("coordinator-{id}"));
            std::fs::create_dir_all(&data_dir)?;
            let mut args: Vec<String> = vec![
                "--id-from-hostname".into(),
                "--hostname".into(),
                format!("{SELF_FORMING_NAME}-{i}"),
                "--initial-members".into(),
                members.clone(),
                "--listen".into(),
                listen.clone(),
                "--data-dir".into(),
                data_dir.display().to_string(),
            ];
            if self.admin_key.is_some() {
                args.extend(["--admin-key-file".into(), dir.join("admin.key").display().to_string()]);
            }
            if self.health_listeners {
                args.extend(["--health-listen".to_string(), health_listen(&netns)]);
            }
            if self.metrics_listeners {
                args.extend(["--metrics-listen".to_string(), metrics_listen(&netns)?]);
            }
            args.extend(self.tls_args(IdentityKind::Coordinator, &format!("c{id}"), &listen)?);
            args.extend(self.coordinator_args.iter().cloned());
            let mut p =
                Proc::new(Role::Coordinator, id, self.coordinator_bin.clone(), args, data_dir, &dir, self.env.clone());
            p.netns = netns;
            self.coordinators.push(p);
        }
        Ok(())
    }

    /// Waits until the self-forming coordinators have formed a cluster of
    /// them all, then reads the admin key the initializing member wrote.
    pub async fn wait_formed(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.wait_voters(deadline).await?;
        if self.admin_key.as_deref() == Some("") {
            let path = self.tmp.path().join("admin.key");
            loop {
                match std::fs::read_to_string(&path) {
                    Ok(key) if key.ends_with('\n') => {
                        self.admin_key = Some(key.trim().to_string());
                        break;
                    }
                    _ if Instant::now() >= deadline => {
                        bail!("no admin key in {} within {timeout:?}\n{}", path.display(), self.logs(LOG_TAIL_LINES))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    /// The plaintext health listener of process `t` (`--health-listen`, see
    /// [`ClusterBuilder::health_listeners`]), from its latest ready line.
    pub fn health_addr(&self, t: Target) -> Option<String> {
        self.proc(t).ready.as_ref()?.health().map(str::to_string)
    }

    /// The metrics listener of process `t` (`--metrics-listen`, see
    /// [`ClusterBuilder::metrics_listeners`]): `host:port`, reachable from
    /// the host, the same across restarts.
    pub fn metrics_addr(&self, t: Target) -> Option<String> {
        let args = &self.proc(t).args;
        let at = args.iter().position(|a| a == "--metrics-listen")?;
        args.get(at + 1).cloned()
    }

    /// The metrics listeners of every coordinator, then of every agent, with
    /// the process each belongs to (empty without
    /// [`ClusterBuilder::metrics_listeners`]).
    pub fn metrics_addrs(&self) -> Vec<(Target, String)> {
        let coordinators = (0..self.coordinators.len()).map(Target::Coordinator);
        let agents = (0..self.agents.len()).map(Target::Agent);
        coordinators.chain(agents).filter_map(|t| Some((t, self.metrics_addr(t)?))).collect()
    }

    /// Starts one more coordinator with the next free Raft id, the builder's
    /// coordinator arguments and no `--bootstrap`. It is not a member until
    /// someone calls `AddMember`. Returns its index in `coordinators`.
    pub async fn spawn_coordinator(&mut self) -> Result<usize> {
        self.launch_coordinator(false).await
    }

    /// Starts coordinator `coordinators.len() + 1` (optionally with
    /// `--bootstrap`) and waits for its ready line; the process is kept even
    /// when it fails to start, so its log is printed.
    async fn launch_coordinator(&mut self, bootstrap: bool) -> Result<usize> {
        let index = self.coordinators.len();
        let id = (index + 1).to_string();
        let dir = self.tmp.path().to_path_buf();
        let data_dir = dir.join(format!("coordinator-{id}"));
        std::fs::create_dir_all(&data_dir)?;
        let netns = self.add_netns(Target::Coordinator(index))?;
        let listen = match &netns {
            Some(h) => format!("{}:0", h.ip),
            None => "127.0.0.1:0".to_string(),
        };
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.clone(),
            "--listen".into(),
            listen.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if bootstrap {
            args.push("--bootstrap".into());
            if self.admin_key.is_some() {
                args.extend(["--admin-key-file".into(), dir.join("admin.key").display().to_string()]);
            }
        }
        if self.health_listeners {
            args.extend(["--health-listen".to_string(), health_listen(&netns)]);
        }
        if self.metrics_listeners {
            args.extend(["--metrics-listen".to_string(), metrics_listen(&netns)?]);
        }
        args.extend(self.tls_args(IdentityKind::Coordinator, &format!("c{id}"), &listen)?);
        args.extend(self.coordinator_args.iter().cloned());
        let mut p =
            Proc::new(Role::Coordinator, id, self.coordinator_bin.clone(), args, data_dir, &dir, self.env.clone());
        p.netns = netns;
        let started = p.launch(self.ready_timeout).await;
        self.coordinators.push(p);
        started?;
        // The real coordinator writes the key before its ready line (a stand-in
        // binary of the harness's own tests writes none).
        let path = dir.join("admin.key");
        if bootstrap && self.admin_key.as_deref() == Some("") && path.exists() {
            let key = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            self.admin_key = Some(key.trim().to_string());
        }
        Ok(index)
    }

    /// Creates the namespace of `t` when the cluster runs in namespaces.
    fn add_netns(&mut self, t: Target) -> Result<Option<NetHost>> {
        match self.net.as_mut() {
            Some(net) => Ok(Some(net.add_host(&net_key(t))?)),
            None => Ok(None),
        }
    }

    /// How the processes are connected.
    /// The host's address as the cluster's processes reach it: the bridge's
    /// gateway when they run in namespaces, else 127.0.0.1.
    pub fn host_ip(&self) -> std::net::Ipv4Addr {
        self.net.as_ref().map(|n| n.gateway()).unwrap_or(std::net::Ipv4Addr::LOCALHOST)
    }

    pub fn network_mode(&self) -> NetworkMode {
        self.network_mode
    }

    /// Whether [`Cluster::partition`] and friends work (the cluster runs in namespaces).
    pub fn can_partition(&self) -> bool {
        self.net.is_some()
    }

    /// The cluster's network, when it runs in namespaces.
    pub fn network(&self) -> Option<&Network> {
        self.net.as_ref()
    }

    /// The namespace address of `t` (`10.X.Y.N`), when the cluster runs in namespaces.
    pub fn ip(&self, t: Target) -> Option<std::net::Ipv4Addr> {
        self.net.as_ref()?.host(&net_key(t)).map(|h| h.ip)
    }

    fn net_mut(&mut self) -> Result<&mut Network> {
        let why = self.loopback_reason.clone();
        self.net.as_mut().ok_or_else(|| anyhow::Error::new(PartitionsUnavailable(why)))
    }

    fn check_target(&self, t: Target) -> Result<()> {
        let ok = match t {
            Target::Coordinator(i) => i < self.coordinators.len(),
            Target::Agent(i) => i < self.agents.len(),
        };
        anyhow::ensure!(ok, "{t:?} is not a process of this cluster");
        Ok(())
    }

    /// Cuts every link between `t` and each of `from` (both directions: packets
    /// are dropped, so connections hang and connects time out, as in a real
    /// partition). Links to anyone else, including the harness and its SDK
    /// clients on the host, stay up. Cutting an already cut link is a no-op.
    /// The cut lasts until healed, across kills and restarts of either side.
    ///
    /// Fails with [`PartitionsUnavailable`] on a loopback cluster.
    pub async fn partition(&mut self, t: Target, from: &[Target]) -> Result<()> {
        self.check_target(t)?;
        for &o in from {
            self.check_target(o)?;
        }
        let net = self.net_mut()?;
        for &o in from {
            net.cut(&net_key(t), &net_key(o)).with_context(|| format!("cutting {t:?} from {o:?}"))?;
        }
        let names: Vec<String> = from.iter().map(|o| self.proc(*o).name.clone()).collect();
        if !names.is_empty() {
            self.proc(t).note(&format!("network: cut off from {}", names.join(", ")));
            let me = self.proc(t).name.clone();
            for &o in from {
                self.proc(o).note(&format!("network: cut off from {me}"));
            }
        }
        Ok(())
    }

    /// Cuts agent `i` off from every coordinator. The agent can still be
    /// reached by clients on the host (its data plane), as when a node loses
    /// its control-plane network: it stops hearing from the cluster, fences
    /// itself after `fence_after`, and the leader declares it down after `node_ttl`.
    pub async fn isolate_agent(&mut self, i: usize) -> Result<()> {
        let all: Vec<Target> = (0..self.coordinators.len()).map(Target::Coordinator).collect();
        self.partition(Target::Agent(i), &all).await
    }

    /// Cuts coordinator `i` off from every other coordinator (a Raft minority
    /// of one). Agents and clients can still reach it: the harder case, where
    /// a deposed leader keeps answering. It must not confirm reads or commit
    /// writes, agents talking to it get no heartbeat answers and move on to
    /// another coordinator, and the majority elects a new leader.
    pub async fn isolate_coordinator(&mut self, i: usize) -> Result<()> {
        let others: Vec<Target> = (0..self.coordinators.len()).filter(|j| *j != i).map(Target::Coordinator).collect();
        self.partition(Target::Coordinator(i), &others).await
    }

    /// Cuts coordinator `i` off from everyone: the other coordinators, every
    /// agent and the clients on the host (as if its machine left the network).
    pub async fn isolate_coordinator_fully(&mut self, i: usize) -> Result<()> {
        let others: Vec<Target> = (0..self.coordinators.len())
            .filter(|j| *j != i)
            .map(Target::Coordinator)
            .chain((0..self.agents.len()).map(Target::Agent))
            .collect();
        self.partition(Target::Coordinator(i), &others).await?;
        let key = net_key(Target::Coordinator(i));
        self.net_mut()?.cut(&key, crate::netns::HOST_KEY).context("cutting the host's clients off")?;
        self.proc(Target::Coordinator(i)).note("network: cut off from the host's clients");
        Ok(())
    }

    /// Heals every cut link. A no-op (Ok) on a loopback cluster, which has none.
    pub async fn heal(&mut self) -> Result<()> {
        let Some(net) = self.net.as_mut() else {
            return Ok(());
        };
        let had = !net.cuts().is_empty();
        net.heal_all()?;
        if had {
            for p in self.coordinators.iter().chain(self.agents.iter()) {
                p.note("network: healed");
            }
        }
        Ok(())
    }

    /// Heals every cut link of `t`. A no-op (Ok) on a loopback cluster.
    pub async fn heal_target(&mut self, t: Target) -> Result<()> {
        let Some(net) = self.net.as_mut() else {
            return Ok(());
        };
        net.heal_host(&net_key(t))?;
        self.proc(t).note("network: links healed");
        Ok(())
    }

    /// The cut links, as pairs of processes (the host's clients are not listed).
    pub fn partitions(&self) -> Vec<(Target, Target)> {
        self.net
            .as_ref()
            .map(|n| n.cuts().iter().filter_map(|(a, b)| Some((target_of(a)?, target_of(b)?))).collect())
            .unwrap_or_default()
    }

    /// The index in `coordinators` of the coordinator with Raft id `id`.
    pub fn coordinator_index(&self, id: u64) -> Option<usize> {
        self.coordinators.iter().position(|c| c.id == id.to_string())
    }

    /// Cluster status as the first running coordinator that answers reports it.
    pub async fn status(&mut self) -> Result<sandfleet_proto::v1::ClusterStatusResponse> {
        use sandfleet_proto::v1::cluster_service_client::ClusterServiceClient;
        use sandfleet_proto::v1::ClusterStatusRequest;
        let mut last = anyhow!("no coordinator is running");
        let running: Vec<(String, String)> = self
            .coordinators
            .iter_mut()
            .filter_map(|c| c.is_running().then(|| (c.addr.clone(), c.name.clone())))
            .collect();
        for (addr, name) in running {
            let channel = self.channel(&addr, IdentityKind::Coordinator)?;
            let result = async {
                let mut api = ClusterServiceClient::new(channel);
                let mut req = tonic::Request::new(ClusterStatusRequest {});
                req.set_timeout(Duration::from_secs(5));
                Ok::<_, anyhow::Error>(api.status(req).await?.into_inner())
            }
            .await;
            match result {
                Ok(s) => return Ok(s),
                Err(e) => last = e.context(format!("status from {name}")),
            }
        }
        Err(last)
    }

    /// Cluster status as coordinator `i` itself reports it (its own view of the
    /// leader and the members), with a 5 s deadline.
    pub async fn status_of(&self, i: usize) -> Result<sandfleet_proto::v1::ClusterStatusResponse> {
        use sandfleet_proto::v1::cluster_service_client::ClusterServiceClient;
        use sandfleet_proto::v1::ClusterStatusRequest;
        let c = self.coordinators.get(i).ok_or_else(|| anyhow!("no coordinator {i}"))?;
        let channel = self.channel(&c.addr, IdentityKind::Coordinator)?;
        let result = async {
            let mut api = ClusterServiceClient::new(channel);
            let mut req = tonic::Request::new(ClusterStatusRequest {});
            req.set_timeout(Duration::from_secs(5));
            Ok::<_, anyhow::Error>(api.status(req).await?.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(8), result)
            .await
            .map_err(|_| anyhow!("no status from {} within 8 s", c.name))?
            .with_context(|| format!("status from {}", c.name))
    }

    /// Waits until a leader is known and every member reports the same
    /// applied index and state digest (none unreachable), and returns that status.
    pub async fn wait_converged(&mut self, timeout: Duration) -> Result<sandfleet_proto::v1::ClusterStatusResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status().await {
                Ok(s) => {
                    let first = s.members.first().cloned().unwrap_or_default();
                    let converged = s.leader_id != 0
                        && !s.members.is_empty()
                        && s.members.iter().all(|m| {
                            m.role != "unreachable"
                                && m.applied_index == first.applied_index
                                && m.state_digest == first.state_digest
                        });
                    if converged {
                        return Ok(s);
                    }
                    format!(
                        "leader {}; members: {}",
                        s.leader_id,
                        s.members
                            .iter()
                            .map(|m| format!(
                                "{}={} applied {} digest {:.12}",
                                m.id, m.role, m.applied_index, m.state_digest
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("members did not converge within {timeout:?}: {last}\n{}", self.logs(LOG_TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tail of every process's log, with headers.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in self.coordinators.iter().chain(self.agents.iter()) {
            out.push_str(&format!(
                "----- {} (addr {}, log {}) last {lines} lines -----\n{}\n",
                p.name,
                p.addr,
                p.log_path.display(),
                p.log_tail(lines)
            ));
        }
        out
    }

    /// Prints [`Cluster::logs`] to stderr.
    pub fn print_logs(&self, lines: usize) {
        eprintln!("{}", self.logs(lines));
    }

    /// Stops agents, then coordinators, with SIGTERM, and fails if one of them
    /// hangs or exits with an error.
    pub async fn shutdown(mut self) -> Result<()> {
        let mut errors = Vec::new();
        // Cut links could keep a process waiting on a peer while it shuts down.
        if let Some(net) = self.net.as_mut() {
            if let Err(e) = net.heal_all() {
                errors.push(format!("healing the network before shutdown: {e:#}"));
            }
        }
        for i in 0..self.agents.len() {
            if self.agents[i].is_running() {
                match self.agents[i].terminate().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => errors.push(format!("{} exited with {s}", self.agents[i].name)),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        for i in 0..self.coordinators.len() {
            if self.coordinators[i].is_running() {
                match self.coordinators[i].terminate().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => errors.push(format!("{} exited with {s}", self.coordinators[i].name)),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            let dir = self.keep_dir();
            bail!("unclean shutdown (logs kept in {}):\n{}", dir.display(), errors.join("\n"))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let keep = std::env::var("SANDFLEET_KEEP_TMP").is_ok_and(|v| v == "1");
        if std::thread::panicking() {
            let dir = self.keep_dir();
            eprintln!(
                "\n===== sandfleet harness: test failed; process logs follow (all kept in {}) =====",
                dir.display()
            );
            self.print_logs(LOG_TAIL_LINES);
        } else if keep {
            let dir = self.keep_dir();
            eprintln!("sandfleet harness: cluster directory kept in {}", dir.display());
        }
        // Cut links could keep a process waiting on a peer while it shuts down.
        if let Some(net) = self.net.as_mut() {
            let _ = net.heal_all();
        }
        for p in self.agents.iter_mut() {
            p.stop_blocking(Duration::from_secs(5));
        }
        for p in self.coordinators.iter_mut() {
            p.stop_blocking(Duration::from_secs(5));
        }
        // Agents keep session cgroups across restarts by design; once the
        // cluster is gone nobody will, so remove this cluster's nodes' trees.
        for p in &self.agents {
            if let Err(e) = crate::host::remove_node_cgroups(&p.id) {
                eprintln!("sandfleet harness: could not remove the cgroups of {}: {e}", p.id);
            }
        }
        // Agents keep their sessions' filesystems mounted across restarts by
        // design (and their pool of ready ones until a clean exit); once the
        // cluster is gone nobody will use them.
        sandfleet_common::mounts::unmount_all_under(self.tmp.path());
        // Namespaces, veths, bridge and FORWARD rule, once nobody is in them.
        if let Some(mut net) = self.net.take() {
            net.teardown();
        }
    }
}
