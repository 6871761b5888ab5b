//! `sandfleet-bench placement`: placements per second of a three-coordinator
//! cluster with 1,000 simulated node agents, against the cluster's own raw
//! Raft commit rate measured in the same run.
//!
//! The simulated agents live in this process. Each one speaks the real
//! `AgentService` protocol the way `sandfleet-agent` does (see
//! `node-agent/src/control.rs`): `RegisterNode`, then a heartbeat every
//! interval the coordinator returns (and at once when it has reports; the
//! agents' phases are spread over the interval as a fleet's would be), a
//! `WatchAssignments` stream, both starting with the first coordinator of its
//! list and moving to the next on failure, and a RUNNING report for every new
//! assignment, carried by the next heartbeat. It runs no sandboxes: a session
//! is "ready" as soon as it is assigned. The agents share a few HTTP/2
//! connections per coordinator (`--connections`).
//!
//! Measurement:
//! 1. Anchor: a fresh three-coordinator cluster, measured exactly as
//!    `sandfleet-bench raft` does (single-session creates at 64 clients onto a
//!    registered node with no agent, `--node-ttl 1h`): the raw commit rate.
//! 2. A second fresh cluster with the default agent timings
//!    (`--agent-heartbeat 1s --node-ttl 5s`). With no node registered, N
//!    sessions are created by many concurrent clients; they stay PENDING
//!    ("no node agent has registered yet"). Not measured beyond a progress line.
//! 3. The clock starts and the 1,000 agents register at once. A session counts
//!    as placed when an agent first sees it assigned (its watch stream or a
//!    heartbeat answer), and as RUNNING when the heartbeat that carried its
//!    report was answered (the coordinator commits the report before it
//!    answers). The clock stops when all N are placed, and separately when all
//!    N are RUNNING; `ListSessions` then confirms N RUNNING sessions.
//! 4. Heartbeat load: heartbeats answered per second and their latency, while
//!    placing and in a steady window afterwards, plus the CPU time of every
//!    coordinator and of this process in each phase.
//!
//! # Layout
//! - this module: the settings and [`run`], one method of `Bench` per phase;
//! - `sim`: the simulated agents (with the agent's own call deadline, retry
//!   backoff and connection settings, `sandfleet_agent::coordinator_link`);
//! - `cpu`: CPU time per process and phase, from `/proc`;
//! - `report`: what a run measured and its Markdown section ([`render`]).

pub(crate) mod cpu;
mod report;
pub(crate) mod sim;

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandfleet::Client;
use sandfleet_proto::v1 as pb;
use sandfleet_testkit::helpers::{list_all_sessions, percentile};
use sandfleet_testkit::{Cluster, ClusterBuilder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::cpu::CpuProbe;
use self::report::ms;
pub use self::report::{render, Beats, Cpu, Report};
use self::sim::{agent_main, FleetShape, Pool};
use crate::raft;

/// Nomad's C1M (2016): one million containers placed at about 3,750 per second.
/// A published figure, not measured here.
pub const NOMAD_C1M_PER_SEC: f64 = 3750.0;
/// The goal.
pub const GOAL_PER_SEC: f64 = 10_000.0;
/// The goal for heartbeats answered while a backlog is placed (and none may fail).
pub const HEARTBEAT_P99_GOAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sessions: usize,
    pub agents: usize,
    pub create_clients: usize,
    pub connections: usize,
    pub anchor_clients: usize,
    pub anchor_duration: Duration,
    pub steady: Duration,
    pub timeout: Duration,
    /// Start agent i with coordinator i mod 3 instead of the first one.
    pub spread: bool,
    pub start: Start,
    /// Session slots of each simulated node (the real agent's default is 64).
    pub slots: u32,
    /// Extra arguments for the placement cluster's coordinators (not the anchor's).
    pub coordinator_args: Vec<String>,
}

impl Settings {
    /// The simulated fleet these settings describe.
    fn fleet(&self) -> FleetShape {
        FleetShape { agents: self.agents, connections: self.connections, slots: self.slots, spread: self.spread }
    }
}

/// What starts the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// The agents are registered, heartbeating and watching, every node ready,
    /// and placement is paused (`ClusterService.SetSchedulerPaused`) while the
    /// sessions are created; the clock starts with the one call that resumes
    /// it. This measures placement alone: all capacity and all work are there.
    Resume,
    /// The agents are registered, heartbeating and watching before the sessions
    /// are created, with every node cordoned; the clock starts as they are
    /// all uncordoned (concurrently, `--create-clients` at a time).
    Uncordon,
    /// No agent exists while the sessions are created; the clock starts as
    /// all of them register at once.
    Register,
}

/// Runs the whole measurement: the anchor, then the placement cluster through
/// its phases (prepare, create PENDING, clock until all RUNNING, steady state).
pub async fn run(settings: &Settings) -> Result<Report> {
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
    if settings.sessions > settings.agents * settings.slots as usize {
        bail!("{} sessions do not fit {} nodes of {} slots", settings.sessions, settings.agents, settings.slots);
    }

    // 1. The anchor: raw commit rate of a fresh cluster, as `bench raft` measures it.
    eprintln!(
        "sandfleet-bench placement: anchor: single-session creates at {} clients for {:?} (as `bench raft`)",
        settings.anchor_clients, settings.anchor_duration
    );
    let anchor = anchor(settings, &child_log).await.context("measuring the commit-rate anchor")?;
    anchor.print("sandfleet", "creates");

    // 2. The placement cluster, default agent timings, no node yet; the fleet
    //    ready for the chosen start, and the sessions created PENDING.
    let mut bench = Bench::start(settings, child_log).await?;
    bench.prepare().await?;
    let (n_sessions, create_elapsed, create_cpu) = bench.create_pending().await?;

    // 3. The clock: the agents register (or the nodes are uncordoned, or placement resumes).
    let mark = bench.cpu.sample().await;
    let t0 = Instant::now();
    let started = bench.start_clock(t0);
    let (all_placed, all_running) = bench.wait_all_running(t0, n_sessions).await?;
    let placing_cpu = bench.cpu.since(&mark).await;
    let placing_beats = bench.pool.beats.window(t0, t0 + all_running);
    let registered_after = bench.pool.registered_at.lock().map(|t| t.saturating_duration_since(t0));
    eprintln!(
        "  all {} placed after {:.3} s ({:.0} placements/s), all RUNNING after {:.3} s",
        n_sessions,
        all_placed.as_secs_f64(),
        n_sessions as f64 / all_placed.as_secs_f64(),
        all_running.as_secs_f64()
    );
    print_beats("heartbeats while placing:", &placing_beats);
    eprintln!("    cpu while placing: {}", placing_cpu.line());

    // 4. Steady state: every session RUNNING, only heartbeats.
    let (steady_beats, steady_cpu) = bench.steady(n_sessions).await;
    let verified_running = bench.verify_running().await?;

    let fleet = bench.stop_fleet().await;
    let uncordon_took = match started {
        Some(h) => Some(h.await??),
        None => None,
    };
    bench.cluster.shutdown().await?;

    let per_node = &fleet.per_node;
    Ok(Report {
        anchor,
        created: n_sessions,
        uncordon_took,
        create_elapsed,
        heartbeat_interval: fleet.heartbeat_interval,
        node_ttl: fleet.node_ttl,
        registered_after,
        all_placed,
        all_running,
        placed_via_watch: fleet.via_watch,
        placed_via_heartbeat: fleet.via_heartbeat,
        replaced: fleet.replaced,
        verified_running,
        min_per_node: per_node.iter().copied().min().unwrap_or(0),
        max_per_node: per_node.iter().copied().max().unwrap_or(0),
        nodes_used: per_node.iter().filter(|n| **n > 0).count(),
        nodes_full: per_node.iter().filter(|n| **n >= settings.slots as usize).count(),
        placing_beats,
        steady_beats,
        watch_reconnects: fleet.watch_reconnects,
        beat_failures: fleet.beat_failures,
        create_cpu,
        placing_cpu,
        steady_cpu,
    })
}

fn print_beats(what: &str, beats: &Beats) {
    eprintln!(
        "    {what} {:.0}/s answered, p50 {:.1} ms, p99 {:.1} ms, {} failed",
        beats.rate(),
        ms(percentile(&beats.latencies, 50.0)),
        ms(percentile(&beats.latencies, 99.0)),
        beats.failed
    );
}

/// The placement cluster and the simulated fleet while a run lasts.
struct Bench<'a> {
    settings: &'a Settings,
    cluster: Cluster,
    /// A client that tries the leader first.
    client: Client,
    cpu: CpuProbe,
    pool: Arc<Pool>,
    /// The simulated agents' node ids.
    nodes: Vec<String>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// What the fleet saw, collected as it stops.
struct FleetSummary {
    /// Sessions held per simulated node at the end.
    per_node: Vec<usize>,
    via_watch: u64,
    via_heartbeat: u64,
    replaced: u64,
    heartbeat_interval: Duration,
    node_ttl: Duration,
    watch_reconnects: u64,
    /// Heartbeat failure reasons, most frequent first.
    beat_failures: Vec<(String, u64)>,
}

/// A client of `cluster` (30 s deadlines) that asks the current leader
/// first, so reads and writes are not forwarded, once the cluster converged.
pub(crate) async fn leader_first_client(cluster: &mut Cluster) -> Result<Client> {
    let status = cluster.wait_converged(Duration::from_secs(60)).await?;
    let leader_idx = cluster
        .coordinator_index(status.leader_id)
        .ok_or_else(|| anyhow!("leader {} is not ours", status.leader_id))?;
    let leader = cluster.coordinators[leader_idx].addr.clone();
    let mut endpoints = vec![leader.clone()];
    endpoints.extend(cluster.coordinator_addrs().into_iter().filter(|a| *a != leader));
    Ok(cluster.client_for(endpoints).request_timeout(Duration::from_secs(30)).connect().await?)
}

impl<'a> Bench<'a> {
    /// Starts the three-coordinator placement cluster and connects the fleet (no agent runs yet).
    async fn start(settings: &'a Settings, child_log: String) -> Result<Bench<'a>> {
        // Plaintext on loopback: the simulated agents share one connection per
        // coordinator, and an agent certificate binds one node id per
        // connection; `bench tls` measures what mutual TLS costs.
        let mut cluster = ClusterBuilder::new()
            .tls(false)
            .coordinators(3)
            .agents(0)
            .coordinator_args(settings.coordinator_args.iter().cloned())
            .env("RUST_LOG", child_log)
            .start()
            .await?;
        let client = leader_first_client(&mut cluster).await?;

        let cpu = CpuProbe::new(&cluster, client.clone());
        let pool = Pool::connect(&cluster.coordinator_addrs(), &settings.fleet()).await?;
        let nodes = pool.agents.iter().map(|a| a.node_id.clone()).collect();
        Ok(Bench { settings, cluster, client, cpu, pool, nodes, stop: CancellationToken::new(), tasks: Vec::new() })
    }

    /// Starts every simulated agent.
    fn spawn_agents(&mut self) {
        for i in 0..self.settings.agents {
            let (pool, stop) = (self.pool.clone(), self.stop.clone());
            self.tasks.push(tokio::spawn(async move { agent_main(pool, i, stop).await }));
        }
    }

    /// Before the sessions are created: with `Resume` or `Uncordon`, every
    /// agent registered; then placement paused, or every node cordoned.
    async fn prepare(&mut self) -> Result<()> {
        let settings = self.settings;
        if matches!(settings.start, Start::Uncordon | Start::Resume) {
            // Every agent registered, heartbeating and watching.
            self.spawn_agents();
            self.wait_registered().await?;
        }
        if settings.start == Start::Resume {
            self.client.set_scheduler_paused(true).await.map_err(|e| anyhow!("pausing the scheduler: {e}"))?;
            let ready = self.list_nodes().await?.iter().filter(|n| n.state == "ready").count();
            eprintln!("  {} agents registered, {ready} nodes ready, scheduler paused", settings.agents);
        }
        if settings.start == Start::Uncordon {
            self.cordon_every_node().await?;
        }
        Ok(())
    }

    async fn wait_registered(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.pool.registered.load(Ordering::Relaxed) < self.settings.agents {
            if Instant::now() >= deadline {
                self.stop.cancel();
                bail!(
                    "only {} of {} agents registered within 120 s",
                    self.pool.registered.load(Ordering::Relaxed),
                    self.settings.agents
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<pb::Node>> {
        self.client.list_nodes().await.map_err(|e| anyhow!("ListNodes: {e}"))
    }

    /// Cordons every node, again for those that came back "ready" after
    /// missing heartbeats for a TTL, until every one is cordoned.
    async fn cordon_every_node(&self) -> Result<()> {
        let clients = self.settings.create_clients;
        let t = Instant::now();
        cordon_all(&self.client, &self.nodes, true, clients).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = self.list_nodes().await?;
            let loose: Vec<String> =
                listed.iter().filter(|n| n.state != "cordoned" && n.state != "down").map(|n| n.id.clone()).collect();
            let down = listed.iter().filter(|n| n.state == "down").count();
            if loose.is_empty() && down == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} nodes not cordoned and {down} down 60 s after cordoning (is the machine overloaded?)",
                    loose.len()
                );
            }
            eprintln!("  {} nodes not cordoned, {down} down; cordoning again", loose.len());
            cordon_all(&self.client, &loose, true, clients).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "  {} agents registered and cordoned ({:.1} s to cordon)",
            self.settings.agents,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Creates the sessions, which stay PENDING, checks that nothing was
    /// placed before the clock, and hands the ids to the tracker. Returns
    /// how many, how long the creates took and the CPU they used.
    async fn create_pending(&mut self) -> Result<(usize, Duration, Cpu)> {
        let settings = self.settings;
        let mark = self.cpu.sample().await;
        let (created, create_elapsed) = create_pending(&self.client, settings).await?;
        let create_cpu = self.cpu.since(&mark).await;
        eprintln!(
            "  created {} PENDING sessions in {:.1} s ({:.0}/s at {} clients; setup, not the measurement)",
            created.len(),
            create_elapsed.as_secs_f64(),
            created.len() as f64 / create_elapsed.as_secs_f64().max(1e-9),
            settings.create_clients
        );
        eprintln!("    cpu while creating: {}", create_cpu.line());
        let n_sessions = created.len();
        self.check_nothing_placed(n_sessions).await?;
        self.pool.tracker.expect(created);
        Ok((n_sessions, create_elapsed, create_cpu))
    }

    /// Before the clock nothing may be placed: placement is paused, or every
    /// node is still cordoned (a node that flapped down and up during the
    /// creates would be ready again).
    async fn check_nothing_placed(&self, n_sessions: usize) -> Result<()> {
        if self.settings.start == Start::Resume {
            let status = self.client.cluster_status().await.map_err(|e| anyhow!("cluster status: {e}"))?;
            let placed: usize = self.list_nodes().await?.iter().map(|n| n.session_count as usize).sum();
            if !status.scheduler_paused || placed > 0 || status.unplaced_sessions as usize != n_sessions {
                self.stop.cancel();
                bail!(
                    "before the clock: scheduler paused {}, {placed} sessions placed, {} unplaced of {n_sessions}",
                    status.scheduler_paused,
                    status.unplaced_sessions
                );
            }
        }
        if self.settings.start == Start::Uncordon {
            let listed = self.list_nodes().await?;
            let loose = listed.iter().filter(|n| n.state != "cordoned").count();
            let placed: usize = listed.iter().map(|n| n.session_count as usize).sum();
            if loose > 0 || placed > 0 {
                self.stop.cancel();
                bail!(
                    "before the clock: {loose} nodes not cordoned and {placed} sessions placed (nodes missed heartbeats \
                     for a node TTL while the sessions were created: is the machine overloaded?)"
                );
            }
        }
        Ok(())
    }

    /// Starts the clock at `t0` with the chosen start; for `Resume` and
    /// `Uncordon`, the task that makes the call, which answers how long it took.
    fn start_clock(&mut self, t0: Instant) -> Option<JoinHandle<Result<Duration>>> {
        self.pool.tracker.start(t0);
        match self.settings.start {
            Start::Register => {
                self.spawn_agents();
                None
            }
            Start::Resume => {
                let client = self.client.clone();
                Some(tokio::spawn(async move {
                    client.set_scheduler_paused(false).await.map_err(|e| anyhow!("resuming the scheduler: {e}"))?;
                    Ok::<_, anyhow::Error>(t0.elapsed())
                }))
            }
            Start::Uncordon => {
                let (client, nodes, n) = (self.client.clone(), self.nodes.clone(), self.settings.create_clients);
                Some(tokio::spawn(async move {
                    cordon_all(&client, &nodes, false, n).await?;
                    Ok::<_, anyhow::Error>(t0.elapsed())
                }))
            }
        }
    }

    /// Waits until every session is placed and RUNNING, with a progress line
    /// a second; returns both times since `t0`.
    async fn wait_all_running(&self, t0: Instant, n_sessions: usize) -> Result<(Duration, Duration)> {
        let pool = &self.pool;
        let deadline = t0 + self.settings.timeout;
        let mut last_print = t0;
        let (mut last_placed, mut last_beats) = (0usize, pool.beats.ok.load(Ordering::Relaxed));
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (placed, running, p_at, r_at) = pool.tracker.progress();
            if let (Some(p), Some(r)) = (p_at, r_at) {
                return Ok((p, r));
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                let dt = last_print.elapsed().as_secs_f64();
                last_print = Instant::now();
                let beats = pool.beats.ok.load(Ordering::Relaxed);
                eprintln!(
                    "  t+{:>5.1} s: {} agents registered, {placed} placed ({:.0}/s), {running} RUNNING, {:.0} heartbeats/s answered, {} failed so far",
                    t0.elapsed().as_secs_f64(),
                    pool.registered.load(Ordering::Relaxed),
                    (placed - last_placed) as f64 / dt,
                    (beats - last_beats) as f64 / dt,
                    pool.beats.failed.load(Ordering::Relaxed),
                );
                (last_placed, last_beats) = (placed, beats);
            }
            if Instant::now() >= deadline {
                self.stop.cancel();
                bail!(
                    "only {placed} of {} sessions placed and {running} RUNNING after {:?}",
                    n_sessions,
                    self.settings.timeout
                );
            }
        }
    }

    /// A steady window with every session RUNNING: only heartbeats.
    async fn steady(&self, n_sessions: usize) -> (Beats, Cpu) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mark = self.cpu.sample().await;
        let s0 = Instant::now();
        tokio::time::sleep(self.settings.steady).await;
        let steady_beats = self.pool.beats.window(s0, Instant::now());
        let steady_cpu = self.cpu.since(&mark).await;
        print_beats(
            &format!("steady ({} agents, {} RUNNING sessions):", self.settings.agents, n_sessions),
            &steady_beats,
        );
        eprintln!("    cpu in steady state: {}", steady_cpu.line());
        (steady_beats, steady_cpu)
    }

    /// The cluster's own view: how many of the sessions `ListSessions` shows RUNNING.
    async fn verify_running(&self) -> Result<usize> {
        let running = list_all_sessions(&self.client, &[], &[pb::SessionState::Running]).await?;
        let want = self.pool.tracker.expected.get().ok_or_else(|| anyhow!("no sessions"))?;
        let verified_running = running.iter().filter(|s| want.contains(&s.id)).count();
        eprintln!("  ListSessions: {verified_running} of {} RUNNING", want.len());
        Ok(verified_running)
    }

    /// Stops every simulated agent and collects what the fleet saw.
    async fn stop_fleet(&mut self) -> FleetSummary {
        let pool = &self.pool;
        let per_node = pool.agents.iter().map(|a| a.held.lock().len()).collect();
        let (via_watch, via_heartbeat, replaced) = pool.tracker.sources();
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let mut beat_failures: Vec<(String, u64)> =
            pool.beats.reasons.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        beat_failures.sort_by_key(|b| std::cmp::Reverse(b.1));
        for (why, n) in &beat_failures {
            eprintln!("    heartbeat failures: {n} x {why}");
        }
        FleetSummary {
            per_node,
            via_watch,
            via_heartbeat,
            replaced,
            heartbeat_interval: Duration::from_millis(pool.interval_ms.load(Ordering::Relaxed)),
            node_ttl: Duration::from_millis(pool.ttl_ms.load(Ordering::Relaxed)),
            watch_reconnects: pool.watch_reconnects.load(Ordering::Relaxed),
            beat_failures,
        }
    }
}

/// The commit-rate anchor on its own fresh cluster, measured as `bench raft` does.
async fn anchor(settings: &Settings, child_log: &str) -> Result<raft::Load> {
    let (cluster, client) = raft::paper_cluster(child_log).await?;
    let load = raft::drive_creates(&client, "anchor", settings.anchor_clients, settings.anchor_duration).await;
    cluster.shutdown().await?;
    Ok(load)
}

/// Cordons (or uncordons) every node in `nodes`, `clients` calls at a time.
async fn cordon_all(client: &Client, nodes: &[String], cordoned: bool, clients: usize) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let nodes = Arc::new(nodes.to_vec());
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (client, next, nodes) = (client.clone(), next.clone(), nodes.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(node) = nodes.get(i) else { return Ok::<_, anyhow::Error>(()) };
                    client
                        .cordon_node(node, cordoned)
                        .await
                        .map_err(|e| anyhow!("CordonNode {node} {cordoned}: {e}"))?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Creates `settings.sessions` sessions while no node is ready; all stay PENDING.
async fn create_pending(client: &Client, settings: &Settings) -> Result<(HashSet<String>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(HashSet::with_capacity(settings.sessions)));
    let t = Instant::now();
    let tasks: Vec<_> = (0..settings.create_clients.max(1))
        .map(|_| {
            let (client, next, ids) = (client.clone(), next.clone(), ids.clone());
            let total = settings.sessions;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let s = client
                        .create_session(raft::spec(format!("place-{}-{i}", std::process::id())))
                        .await
                        .map_err(|e| anyhow!("create #{i}: {e}"))?;
                    if !s.node_id.is_empty() {
                        bail!("session {} was placed at create on {}: a node is registered", s.id, s.node_id);
                    }
                    ids.lock().insert(s.id);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = t.elapsed();
    let ids = std::mem::take(&mut *ids.lock());
    if ids.len() != settings.sessions {
        bail!("created {} distinct sessions, expected {}", ids.len(), settings.sessions);
    }
    Ok((ids, elapsed))
}
