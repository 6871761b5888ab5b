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

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandfleet::Client;
use sandfleet_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::raft;

/// Nomad's C1M (2016): one million containers placed at about 3,750 per second.
/// A published figure, not measured here.
pub const NOMAD_C1M_PER_SEC: f64 = 3750.0;
/// The goal.
pub const GOAL_PER_SEC: f64 = 10_000.0;
/// Deadline of each control-plane call of a simulated agent, as the real agent's.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

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

/// CPU seconds used by each process in one phase, and who led.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    pub wall: Duration,
    /// (name, CPU seconds); the member leading at the end of the phase is marked.
    pub procs: Vec<(String, f64)>,
    /// Leader and term at the start and at the end of the phase.
    pub leader: ((u64, u64), (u64, u64)),
}

impl Cpu {
    fn line(&self) -> String {
        let wall = self.wall.as_secs_f64().max(1e-9);
        let mut line =
            self.procs.iter().map(|(n, s)| format!("{n} {:.0}%", s / wall * 100.0)).collect::<Vec<_>>().join(", ");
        let ((l0, t0), (l1, t1)) = self.leader;
        if (l0, t0) != (l1, t1) {
            let _ = write!(
                line,
                " (LEADER CHANGED in this phase: coordinator-{l0} term {t0} -> coordinator-{l1} term {t1})"
            );
        }
        line
    }

    fn leader_changed(&self) -> bool {
        self.leader.0 != self.leader.1
    }
}

/// Heartbeats answered in one window.
#[derive(Debug, Clone, Default)]
pub struct Beats {
    pub window: Duration,
    pub ok: u64,
    pub failed: u64,
    pub latencies: Vec<Duration>,
}

impl Beats {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    pub anchor: raft::Load,
    pub created: usize,
    pub create_elapsed: Duration,
    pub heartbeat_interval: Duration,
    pub node_ttl: Duration,
    pub registered_after: Option<Duration>,
    /// Start::Uncordon: how long uncordoning every node took (inside the clock);
    /// Start::Resume: when the resume call was answered.
    pub uncordon_took: Option<Duration>,
    pub all_placed: Duration,
    pub all_running: Duration,
    pub placed_via_watch: u64,
    pub placed_via_heartbeat: u64,
    pub replaced: u64,
    pub verified_running: usize,
    pub min_per_node: usize,
    pub max_per_node: usize,
    pub nodes_used: usize,
    /// Nodes holding as many sessions as they have slots.
    pub nodes_full: usize,
    pub placing_beats: Beats,
    pub steady_beats: Beats,
    pub watch_reconnects: u64,
    /// Heartbeat failures over the whole run by reason, most frequent first.
    pub beat_failures: Vec<(String, u64)>,
    pub create_cpu: Cpu,
    pub placing_cpu: Cpu,
    pub steady_cpu: Cpu,
}

impl Report {
    pub fn placements_per_sec(&self) -> f64 {
        self.created as f64 / self.all_placed.as_secs_f64().max(1e-9)
    }
}

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

    // 2. The placement cluster, default agent timings, no node yet.
    let mut cluster = ClusterBuilder::new()
        .coordinators(3)
        .agents(0)
        .coordinator_args(settings.coordinator_args.iter().cloned())
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let status = cluster.wait_converged(Duration::from_secs(60)).await?;
    let leader_idx = cluster
        .coordinator_index(status.leader_id)
        .ok_or_else(|| anyhow!("leader {} is not ours", status.leader_id))?;
    let leader = cluster.coordinators[leader_idx].addr.clone();
    let mut endpoints = vec![leader.clone()];
    endpoints.extend(cluster.coordinator_addrs().into_iter().filter(|a| *a != leader));
    let client = Client::builder(endpoints).request_timeout(Duration::from_secs(30)).connect().await?;

    let cpu_probe = CpuProbe::new(&cluster, client.clone());
    let pool = Pool::connect(&cluster.coordinator_addrs(), settings).await?;
    let stop = CancellationToken::new();
    let spawn_agents = |pool: &Arc<Pool>| -> Vec<tokio::task::JoinHandle<()>> {
        (0..settings.agents)
            .map(|i| {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move { agent_main(pool, i, stop).await })
            })
            .collect()
    };
    let nodes: Vec<String> = pool.agents.iter().map(|a| a.node_id.clone()).collect();

    let mut tasks = Vec::new();
    if matches!(settings.start, Start::Uncordon | Start::Resume) {
        // Every agent registered, heartbeating and watching.
        tasks.extend(spawn_agents(&pool));
        let deadline = Instant::now() + Duration::from_secs(120);
        while pool.registered.load(Ordering::Relaxed) < settings.agents {
            if Instant::now() >= deadline {
                stop.cancel();
                bail!(
                    "only {} of {} agents registered within 120 s",
                    pool.registered.load(Ordering::Relaxed),
                    settings.agents
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if settings.start == Start::Resume {
        client.set_scheduler_paused(true).await.map_err(|e| anyhow!("pausing the scheduler: {e}"))?;
        let ready = client
            .list_nodes()
            .await
            .map_err(|e| anyhow!("ListNodes: {e}"))?
            .iter()
            .filter(|n| n.state == "ready")
            .count();
        eprintln!("  {} agents registered, {ready} nodes ready, scheduler paused", settings.agents);
    }
    if settings.start == Start::Uncordon {
        // Every node cordoned.
        let t = Instant::now();
        cordon_all(&client, &nodes, true, settings.create_clients).await?;
        // A node that missed heartbeats for a TTL comes back "ready", not
        // cordoned; cordon such nodes again until every one is cordoned.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listed = client.list_nodes().await.map_err(|e| anyhow!("ListNodes: {e}"))?;
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
            cordon_all(&client, &loose, true, settings.create_clients).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "  {} agents registered and cordoned ({:.1} s to cordon)",
            settings.agents,
            t.elapsed().as_secs_f64()
        );
    }

    let mark = cpu_probe.sample().await;
    let (created, create_elapsed) = create_pending(&client, settings).await?;
    let create_cpu = cpu_probe.since(&mark).await;
    eprintln!(
        "  created {} PENDING sessions in {:.1} s ({:.0}/s at {} clients; setup, not the measurement)",
        created.len(),
        create_elapsed.as_secs_f64(),
        created.len() as f64 / create_elapsed.as_secs_f64().max(1e-9),
        settings.create_clients
    );
    eprintln!("    cpu while creating: {}", create_cpu.line());
    let n_sessions = created.len();
    if settings.start == Start::Resume {
        let status = client.cluster_status().await.map_err(|e| anyhow!("cluster status: {e}"))?;
        let placed: usize = client
            .list_nodes()
            .await
            .map_err(|e| anyhow!("ListNodes: {e}"))?
            .iter()
            .map(|n| n.session_count as usize)
            .sum();
        if !status.scheduler_paused || placed > 0 || status.unplaced_sessions as usize != n_sessions {
            stop.cancel();
            bail!(
                "before the clock: scheduler paused {}, {placed} sessions placed, {} unplaced of {n_sessions}",
                status.scheduler_paused,
                status.unplaced_sessions
            );
        }
    }
    if settings.start == Start::Uncordon {
        // Nothing may have been placed before the clock (a node that flapped down and
        // up during the creates would be ready again).
        let listed = client.list_nodes().await.map_err(|e| anyhow!("ListNodes: {e}"))?;
        let loose = listed.iter().filter(|n| n.state != "cordoned").count();
        let placed: usize = listed.iter().map(|n| n.session_count as usize).sum();
        if loose > 0 || placed > 0 {
            stop.cancel();
            bail!(
                "before the clock: {loose} nodes not cordoned and {placed} sessions placed (nodes missed heartbeats for a \
                 node TTL while the sessions were created: is the machine overloaded?)"
            );
        }
    }
    pool.tracker.expect(created);

    // 3. The clock: the agents register (or the nodes are uncordoned).
    let mark = cpu_probe.sample().await;
    let t0 = Instant::now();
    pool.tracker.start(t0);
    let uncordoned = match settings.start {
        Start::Register => {
            tasks.extend(spawn_agents(&pool));
            None
        }
        Start::Resume => {
            let client = client.clone();
            Some(tokio::spawn(async move {
                client.set_scheduler_paused(false).await.map_err(|e| anyhow!("resuming the scheduler: {e}"))?;
                Ok::<_, anyhow::Error>(t0.elapsed())
            }))
        }
        Start::Uncordon => {
            let (client, nodes, n) = (client.clone(), nodes.clone(), settings.create_clients);
            Some(tokio::spawn(async move {
                cordon_all(&client, &nodes, false, n).await?;
                Ok::<_, anyhow::Error>(t0.elapsed())
            }))
        }
    };

    let deadline = t0 + settings.timeout;
    let mut last_print = t0;
    let (mut last_placed, mut last_beats) = (0usize, pool.beats.ok.load(Ordering::Relaxed));
    let (all_placed, all_running) = loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (placed, running, p_at, r_at) = pool.tracker.progress();
        if let (Some(p), Some(r)) = (p_at, r_at) {
            break (p, r);
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
            stop.cancel();
            bail!("only {placed} of {} sessions placed and {running} RUNNING after {:?}", n_sessions, settings.timeout);
        }
    };
    let placing_window = all_running;
    let placing_cpu = cpu_probe.since(&mark).await;
    let placing_beats = pool.beats.window(t0, t0 + placing_window);
    let registered_after =
        pool.registered_at.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.saturating_duration_since(t0));
    eprintln!(
        "  all {} placed after {:.3} s ({:.0} placements/s), all RUNNING after {:.3} s",
        n_sessions,
        all_placed.as_secs_f64(),
        n_sessions as f64 / all_placed.as_secs_f64(),
        all_running.as_secs_f64()
    );
    eprintln!(
        "    heartbeats while placing: {:.0}/s answered, p50 {:.1} ms, p99 {:.1} ms, {} failed",
        placing_beats.rate(),
        ms(percentile(&placing_beats.latencies, 50.0)),
        ms(percentile(&placing_beats.latencies, 99.0)),
        placing_beats.failed
    );
    eprintln!("    cpu while placing: {}", placing_cpu.line());

    // 4. Steady state: every session RUNNING, only heartbeats.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mark = cpu_probe.sample().await;
    let s0 = Instant::now();
    tokio::time::sleep(settings.steady).await;
    let steady_beats = pool.beats.window(s0, Instant::now());
    let steady_cpu = cpu_probe.since(&mark).await;
    eprintln!(
        "  steady ({} agents, {} RUNNING sessions): {:.0} heartbeats/s answered, p50 {:.1} ms, p99 {:.1} ms, {} failed",
        settings.agents,
        n_sessions,
        steady_beats.rate(),
        ms(percentile(&steady_beats.latencies, 50.0)),
        ms(percentile(&steady_beats.latencies, 99.0)),
        steady_beats.failed
    );
    eprintln!("    cpu in steady state: {}", steady_cpu.line());

    // The cluster's own view: every session RUNNING.
    let running = sandfleet_testkit::helpers::list_all_sessions(&client, &[], &[pb::SessionState::Running]).await?;
    let want = pool.tracker.expected.get().ok_or_else(|| anyhow!("no sessions"))?;
    let verified_running = running.iter().filter(|s| want.contains(&s.id)).count();
    eprintln!("  ListSessions: {verified_running} of {} RUNNING", want.len());

    let per_node: Vec<usize> =
        pool.agents.iter().map(|a| a.held.lock().unwrap_or_else(|p| p.into_inner()).len()).collect();
    let (via_watch, via_heartbeat, replaced) = pool.tracker.sources();

    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let heartbeat_interval = Duration::from_millis(pool.interval_ms.load(Ordering::Relaxed));
    let node_ttl = Duration::from_millis(pool.ttl_ms.load(Ordering::Relaxed));
    let watch_reconnects = pool.watch_reconnects.load(Ordering::Relaxed);
    let mut beat_failures: Vec<(String, u64)> =
        pool.beats.reasons.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect();
    beat_failures.sort_by(|a, b| b.1.cmp(&a.1));
    for (why, n) in &beat_failures {
        eprintln!("    heartbeat failures: {n} x {why}");
    }
    let created = n_sessions;
    drop(pool);
    let uncordon_took = match uncordoned {
        Some(h) => Some(h.await??),
        None => None,
    };
    cluster.shutdown().await?;

    Ok(Report {
        anchor,
        created,
        uncordon_took,
        create_elapsed,
        heartbeat_interval,
        node_ttl,
        registered_after,
        all_placed,
        all_running,
        placed_via_watch: via_watch,
        placed_via_heartbeat: via_heartbeat,
        replaced,
        verified_running,
        min_per_node: per_node.iter().copied().min().unwrap_or(0),
        max_per_node: per_node.iter().copied().max().unwrap_or(0),
        nodes_used: per_node.iter().filter(|n| **n > 0).count(),
        nodes_full: per_node.iter().filter(|n| **n >= settings.slots as usize).count(),
        placing_beats,
        steady_beats,
        watch_reconnects,
        beat_failures,
        create_cpu,
        placing_cpu,
        steady_cpu,
    })
}

/// The commit-rate anchor on its own fresh cluster, measured as `bench raft` does.
async fn anchor(settings: &Settings, child_log: &str) -> Result<raft::Load> {
    let mut cluster = ClusterBuilder::new()
        .coordinators(3)
        .agents(0)
        .coordinator_args(["--node-ttl", "1h"])
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let status = cluster.wait_converged(Duration::from_secs(60)).await?;
    let leader = status
        .members
        .iter()
        .find(|m| m.id == status.leader_id)
        .map(|m| m.address.clone())
        .ok_or_else(|| anyhow!("no leader in {status:?}"))?;
    raft::register_paper_node(&leader).await?;
    let mut endpoints = vec![leader.clone()];
    endpoints.extend(cluster.coordinator_addrs().into_iter().filter(|a| *a != leader));
    let client = Client::builder(endpoints).request_timeout(Duration::from_secs(10)).connect().await?;
    let counter = Arc::new(AtomicU64::new(0));
    let n = settings.anchor_clients;
    let op = move || {
        let client = client.clone();
        let i = counter.fetch_add(1, Ordering::Relaxed);
        async move {
            client
                .create_session(raft::spec(format!("anchor-{}-{n}-{i}", std::process::id())))
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
        }
    };
    let load = raft::drive(n, settings.anchor_duration, op).await;
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
                    ids.lock().unwrap_or_else(|p| p.into_inner()).insert(s.id);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = t.elapsed();
    let ids = std::mem::take(&mut *ids.lock().unwrap_or_else(|p| p.into_inner()));
    if ids.len() != settings.sessions {
        bail!("created {} distinct sessions, expected {}", ids.len(), settings.sessions);
    }
    Ok((ids, elapsed))
}

// ---------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------

/// utime + stime of a process in seconds (`/proc/<pid>/stat`, USER_HZ = 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

struct CpuProbe {
    /// (Raft id, pid) of every coordinator, then (0, pid) of this process.
    procs: Vec<(u64, u32)>,
    client: Client,
}

struct CpuMark {
    at: Instant,
    secs: Vec<f64>,
    leader: (u64, u64),
}

impl CpuProbe {
    fn new(cluster: &Cluster, client: Client) -> Self {
        let mut procs: Vec<(u64, u32)> =
            cluster.coordinators.iter().filter_map(|c| Some((c.id.parse().ok()?, c.pid()?))).collect();
        procs.push((0, std::process::id()));
        Self { procs, client }
    }

    /// (leader id, term) as the cluster reports it; (0, 0) when it does not answer.
    async fn leader(&self) -> (u64, u64) {
        match self.client.cluster_status().await {
            Ok(s) => (s.leader_id, s.members.iter().map(|m| m.term).max().unwrap_or(0)),
            Err(_) => (0, 0),
        }
    }

    async fn sample(&self) -> CpuMark {
        let leader = self.leader().await;
        CpuMark {
            at: Instant::now(),
            secs: self.procs.iter().map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0)).collect(),
            leader,
        }
    }

    async fn since(&self, mark: &CpuMark) -> Cpu {
        let now = self.sample().await;
        let procs = self
            .procs
            .iter()
            .zip(now.secs.iter().zip(mark.secs.iter()))
            .map(|((id, _), (a, b))| {
                let name = match *id {
                    0 => "bench (sim agents + clients)".to_string(),
                    id if id == now.leader.0 => format!("coordinator-{id} (leader)"),
                    id => format!("coordinator-{id}"),
                };
                (name, a - b)
            })
            .collect();
        Cpu { wall: now.at - mark.at, procs, leader: (mark.leader, now.leader) }
    }
}

// ---------------------------------------------------------------------------
// The simulated agents
// ---------------------------------------------------------------------------

/// Heartbeat accounting shared by every agent.
#[derive(Default)]
struct BeatLog {
    ok: AtomicU64,
    failed: AtomicU64,
    /// (answered at, latency) of every answered heartbeat; (failed at) of every failure.
    samples: Mutex<Vec<(Instant, Duration)>>,
    failures: Mutex<Vec<Instant>>,
    /// Why heartbeats failed: gRPC code and the start of the message -> count.
    reasons: Mutex<HashMap<String, u64>>,
}

impl BeatLog {
    fn window(&self, from: Instant, to: Instant) -> Beats {
        let latencies: Vec<Duration> = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, d)| *d)
            .collect();
        let failed =
            self.failures.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|t| **t >= from && **t <= to).count();
        Beats { window: to - from, ok: latencies.len() as u64, failed: failed as u64, latencies }
    }
}

/// What the agents have seen of the sessions being measured.
struct Tracker {
    expected: std::sync::OnceLock<HashSet<String>>,
    inner: Mutex<TrackInner>,
}

#[derive(Default)]
struct TrackInner {
    t0: Option<Instant>,
    /// Session -> newest generation seen assigned.
    placed: HashMap<String, u64>,
    /// Sessions whose newest generation was reported RUNNING and answered.
    running: HashSet<String>,
    all_placed: Option<Duration>,
    all_running: Option<Duration>,
    via_watch: u64,
    via_heartbeat: u64,
    replaced: u64,
}

impl Tracker {
    fn expect(&self, ids: HashSet<String>) {
        let _ = self.expected.set(ids);
    }

    fn expected_len(&self) -> usize {
        self.expected.get().map_or(usize::MAX, |e| e.len())
    }

    fn start(&self, t0: Instant) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).t0 = Some(t0);
    }

    fn progress(&self) -> (usize, usize, Option<Duration>, Option<Duration>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.placed.len(), g.running.len(), g.all_placed, g.all_running)
    }

    fn sources(&self) -> (u64, u64, u64) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.via_watch, g.via_heartbeat, g.replaced)
    }

    /// `new` were just assigned to some agent (seen on its watch stream or a heartbeat answer).
    fn placed(&self, new: &[(String, u64)], via_watch: bool) {
        let Some(expected) = self.expected.get() else { return };
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (id, generation) in new {
            if !expected.contains(id) {
                continue;
            }
            match g.placed.insert(id.clone(), *generation) {
                None => {
                    if via_watch {
                        g.via_watch += 1;
                    } else {
                        g.via_heartbeat += 1;
                    }
                }
                Some(old) if old < *generation => {
                    g.replaced += 1;
                    g.running.remove(id);
                }
                Some(old) => {
                    g.placed.insert(id.clone(), old);
                }
            }
        }
        if g.all_placed.is_none() && g.placed.len() == self.expected_len() {
            g.all_placed = g.t0.map(|t| now - t);
        }
    }

    /// The heartbeat carrying `reports` was answered: those are committed.
    fn acked(&self, reports: &[pb::SessionReport]) {
        if reports.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for r in reports {
            if g.placed.get(&r.session_id) == Some(&r.generation) {
                g.running.insert(r.session_id.clone());
            }
        }
        if g.all_running.is_none() && g.running.len() == self.expected_len() {
            g.all_running = g.t0.map(|t| now - t);
        }
    }
}

struct SimAgent {
    node_id: String,
    /// Session -> generation this agent "runs".
    held: Mutex<HashMap<String, u64>>,
    reports: Mutex<Vec<pb::SessionReport>>,
    report_ready: Notify,
}

impl SimAgent {
    /// Brings the held set in line with the full assignment set, as the real
    /// agent's reconcile does; every new (session, generation) is "ready" at
    /// once and queued as a RUNNING report, which wakes the heartbeat loop.
    fn reconcile(&self, tracker: &Tracker, assignments: Vec<pb::Assignment>, via_watch: bool) {
        let mut new = Vec::new();
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let desired: HashSet<&str> = assignments.iter().map(|a| a.session_id.as_str()).collect();
            held.retain(|id, _| desired.contains(id.as_str()));
            for a in &assignments {
                match held.get(&a.session_id) {
                    Some(g) if *g >= a.generation => {}
                    _ => {
                        held.insert(a.session_id.clone(), a.generation);
                        new.push((a.session_id.clone(), a.generation));
                    }
                }
            }
        }
        if new.is_empty() {
            return;
        }
        tracker.placed(&new, via_watch);
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.extend(new.into_iter().map(|(session_id, generation)| pb::SessionReport {
            session_id,
            generation,
            state: pb::SessionState::Running as i32,
            ..Default::default()
        }));
        drop(reports);
        self.report_ready.notify_one();
    }
}

struct Pool {
    /// channels[coordinator][k]: `connections` HTTP/2 connections per coordinator.
    channels: Vec<Vec<Channel>>,
    agents: Vec<SimAgent>,
    tracker: Tracker,
    beats: BeatLog,
    registered: AtomicUsize,
    registered_at: Mutex<Option<Instant>>,
    watch_reconnects: AtomicU64,
    interval_ms: AtomicU64,
    ttl_ms: AtomicU64,
    spread: bool,
    capacity: pb::NodeCapacity,
}

impl Pool {
    async fn connect(coordinators: &[String], settings: &Settings) -> Result<Arc<Pool>> {
        let mut channels = Vec::new();
        for addr in coordinators {
            let mut per = Vec::new();
            for _ in 0..settings.connections.max(1) {
                let ch = Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                per.push(ch);
            }
            channels.push(per);
        }
        // A 16-core, 64 GiB host; sessions are 10 mCPU and 16 MiB, so slots bind.
        let capacity = pb::NodeCapacity { cpu_millis: 16_000, memory_bytes: 64 << 30, session_slots: settings.slots };
        let agents = (0..settings.agents)
            .map(|i| SimAgent {
                node_id: format!("sim-{:04}", i + 1),
                held: Mutex::new(HashMap::new()),
                reports: Mutex::new(Vec::new()),
                report_ready: Notify::new(),
            })
            .collect();
        Ok(Arc::new(Pool {
            channels,
            agents,
            tracker: Tracker { expected: std::sync::OnceLock::new(), inner: Mutex::new(TrackInner::default()) },
            beats: BeatLog::default(),
            registered: AtomicUsize::new(0),
            registered_at: Mutex::new(None),
            watch_reconnects: AtomicU64::new(0),
            interval_ms: AtomicU64::new(0),
            ttl_ms: AtomicU64::new(0),
            spread: settings.spread,
            capacity,
        }))
    }

    fn client(&self, agent: usize, coordinator: usize) -> AgentServiceClient<Channel> {
        let per = &self.channels[coordinator % self.channels.len()];
        AgentServiceClient::new(per[agent % per.len()].clone())
    }

    fn first_coordinator(&self, agent: usize) -> usize {
        if self.spread {
            agent % self.channels.len()
        } else {
            0
        }
    }
}

/// The real agent's retry backoff (`node-agent/src/control.rs`).
fn backoff(attempt: u32) -> Duration {
    let cap = 2_000u64.min(50 * (1u64 << attempt.min(6)));
    // Deterministic jitter is enough here: spread by the attempt's low bits and the clock.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
            as u64;
    Duration::from_millis(cap / 2 + nanos % (cap / 2 + 1))
}

async fn register(pool: &Pool, i: usize, current: &mut usize, stop: &CancellationToken) -> Option<Duration> {
    let agent = &pool.agents[i];
    let mut attempt = 0;
    loop {
        let mut req = tonic::Request::new(pb::RegisterNodeRequest {
            node_id: agent.node_id.clone(),
            address: format!("127.0.0.1:{}", 20_000 + i),
            capacity: Some(pool.capacity),
            runtimes: vec!["process".into()],
            ..Default::default()
        });
        req.set_timeout(CALL_TIMEOUT);
        match pool.client(i, *current).register_node(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                pool.interval_ms.store(resp.heartbeat_interval_ms, Ordering::Relaxed);
                pool.ttl_ms.store(resp.node_ttl_ms, Ordering::Relaxed);
                return Some(Duration::from_millis(resp.heartbeat_interval_ms.max(100)));
            }
            Err(_) => *current = (*current + 1) % pool.channels.len(),
        }
        attempt += 1;
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(backoff(attempt)) => {}
        }
    }
}

/// One simulated agent: register, watch, heartbeat with reports; like `Control::run`.
async fn agent_main(pool: Arc<Pool>, i: usize, stop: CancellationToken) {
    let mut current = pool.first_coordinator(i);
    let Some(mut interval) = register(&pool, i, &mut current, &stop).await else { return };
    if pool.registered.fetch_add(1, Ordering::Relaxed) + 1 == pool.agents.len() {
        *pool.registered_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
    let watcher = tokio::spawn(watch_loop(pool.clone(), i, stop.clone()));
    let agent = &pool.agents[i];
    let mut failures = 0u32;
    // A real fleet's agents started at different times, so their heartbeats are
    // spread over the interval; agents that all register in the same second
    // would otherwise beat in lock-step. Spread the first one (golden-ratio
    // sequence over the agents).
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(interval.mul_f64((i as f64 * 0.618_033_988_75).fract())) => {}
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = agent.report_ready.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        let reports = std::mem::take(&mut *agent.reports.lock().unwrap_or_else(|p| p.into_inner()));
        let mut req = tonic::Request::new(pb::HeartbeatRequest {
            node_id: agent.node_id.clone(),
            reports: reports.clone(),
            ..Default::default()
        });
        req.set_timeout(CALL_TIMEOUT.min(interval * 2));
        let t = Instant::now();
        match pool.client(i, current).heartbeat(req).await {
            Ok(resp) => {
                let now = Instant::now();
                pool.beats.ok.fetch_add(1, Ordering::Relaxed);
                pool.beats.samples.lock().unwrap_or_else(|p| p.into_inner()).push((now, now - t));
                failures = 0;
                pool.tracker.acked(&reports);
                agent.reconcile(&pool.tracker, resp.into_inner().assignments, false);
            }
            Err(status) => {
                pool.beats.failed.fetch_add(1, Ordering::Relaxed);
                pool.beats.failures.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
                let reason = format!("{:?}: {}", status.code(), status.message().chars().take(60).collect::<String>());
                *pool.beats.reasons.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_insert(0) += 1;
                agent.reports.lock().unwrap_or_else(|p| p.into_inner()).splice(0..0, reports);
                failures += 1;
                if status.code() == tonic::Code::NotFound {
                    match register(&pool, i, &mut current, &stop).await {
                        Some(d) => interval = d,
                        None => break,
                    }
                } else {
                    current = (current + 1) % pool.channels.len();
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
    }
    let _ = watcher.await;
}

/// Follows WatchAssignments, moving to the next coordinator when the stream breaks.
async fn watch_loop(pool: Arc<Pool>, i: usize, stop: CancellationToken) {
    let agent = &pool.agents[i];
    let mut next = pool.first_coordinator(i);
    let mut attempt = 0u32;
    loop {
        let coordinator = next;
        next += 1;
        let mut client = pool.client(i, coordinator);
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.watch_assignments(pb::WatchAssignmentsRequest { node_id: agent.node_id.clone() }) => r,
        };
        if let Ok(resp) = opened {
            let mut stream = resp.into_inner();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    msg = stream.message() => match msg {
                        Ok(Some(m)) => agent.reconcile(&pool.tracker, m.assignments, true),
                        _ => break,
                    },
                }
            }
        }
        pool.watch_reconnects.fetch_add(1, Ordering::Relaxed);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff(attempt.min(6))) => {}
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The Markdown section for `bench/RESULTS.md`.
pub fn render(r: &Report, settings: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let rate = r.placements_per_sec();
    let verdict = if rate >= GOAL_PER_SEC { "met" } else { "MISSED" };
    let anchor_rate = r.anchor.throughput();
    let _ = writeln!(out, "{section}\n");
    let how = match settings.start {
        Start::Uncordon => format!(
            "The agents register first and every node is cordoned (`NodeService.CordonNode`); {} sessions are created \
             PENDING (\"no node is ready\"); then the clock starts and every node is uncordoned, {} calls at a time \
             (all uncordoned {} after the start).",
            settings.sessions,
            settings.create_clients,
            r.uncordon_took.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
        Start::Resume => format!(
            "The agents register first and every node is ready; placement is paused \
             (`ClusterService.SetSchedulerPaused`, `sandfleet cluster scheduler pause`) and {} sessions are created \
             PENDING (\"scheduling is paused\"); then the clock starts with the one call that resumes placement \
             (answered {} after the start). All capacity and all work are there when the clock starts, so this \
             measures placement itself.",
            settings.sessions,
            r.uncordon_took.map(|d| format!("{:.3} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
        Start::Register => format!(
            "{} sessions are created PENDING with no node registered; then the clock starts and every agent registers \
             at once (all registered {} after the start).",
            settings.sessions,
            r.registered_after.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
    };
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench placement --sessions {} --agents {} --start {}{}{}`: three `sandfleet-coordinator` \
         processes on loopback on this machine at the default agent timings (heartbeat {} ms, node TTL {} ms), and {} \
         simulated node agents in the benchmark process that speak the real `AgentService` protocol as `sandfleet-agent` \
         does (RegisterNode, a heartbeat every interval, phases spread over the interval, and at once when they have \
         reports, a WatchAssignments stream, a \
         RUNNING report per new assignment; {} HTTP/2 connections per coordinator; no sandboxes; {} session slots per \
         node). {how} Placed: an \
         agent has seen the session assigned (watch stream or heartbeat answer). RUNNING: the heartbeat carrying its \
         report was answered (the report is committed before the answer).\n",
        settings.sessions,
        settings.agents,
        match settings.start {
            Start::Resume => "resume",
            Start::Uncordon => "uncordon",
            Start::Register => "register",
        },
        if settings.spread { " --spread" } else { "" },
        settings.coordinator_args.iter().map(|a| format!(" --coordinator-arg={a}")).collect::<String>(),
        r.heartbeat_interval.as_millis(),
        r.node_ttl.as_millis(),
        settings.agents,
        settings.connections,
        settings.slots,
    );
    let _ = writeln!(out, "| measurement | value | vs goal / reference |");
    let _ = writeln!(out, "|---|---:|---|");
    let _ = writeln!(
        out,
        "| **placements/s** ({} sessions / time to all placed) | **{rate:.0}** | goal >= {GOAL_PER_SEC:.0}/s: {:.2}x, {verdict} |",
        r.created,
        rate / GOAL_PER_SEC
    );
    let _ = writeln!(out, "| time to all placed | {:.2} s | - |", r.all_placed.as_secs_f64());
    let _ = writeln!(out, "| time to all RUNNING | {:.2} s | - |", r.all_running.as_secs_f64());
    let _ = writeln!(
        out,
        "| anchor, same run: raw commit rate (single-session creates, {} clients, fresh cluster as `bench raft`) | {anchor_rate:.0}/s | placements/s = {:.2}x the commit rate |",
        r.anchor.clients,
        rate / anchor_rate.max(1e-9)
    );
    let _ = writeln!(
        out,
        "| reference, not measured: Nomad C1M (published, 2016) | {NOMAD_C1M_PER_SEC:.0}/s | placements/s = {:.2}x |",
        rate / NOMAD_C1M_PER_SEC
    );
    let _ = writeln!(
        out,
        "| sessions per node (min / max over {} nodes, {} used, {} full at {} slots) | {} / {} | even spread: {} |",
        settings.agents,
        r.nodes_used,
        r.nodes_full,
        settings.slots,
        r.min_per_node,
        r.max_per_node,
        r.created.div_ceil(settings.agents)
    );
    let beat_row = |out: &mut String, what: &str, b: &Beats| {
        let _ = writeln!(
            out,
            "| heartbeats answered {what} | {:.0}/s | p50 {:.1} ms, p99 {:.1} ms, {} failed |",
            b.rate(),
            ms(percentile(&b.latencies, 50.0)),
            ms(percentile(&b.latencies, 99.0)),
            b.failed
        );
    };
    beat_row(&mut out, "while placing", &r.placing_beats);
    beat_row(&mut out, &format!("in steady state ({} s)", r.steady_beats.window.as_secs()), &r.steady_beats);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Checks: `ListSessions` found {} of {} sessions RUNNING at the end; first seen on a watch stream {} / in a heartbeat \
         answer {}; {} re-placements (a session seen again at a newer generation); {} watch-stream reconnects.\n",
        r.verified_running, r.created, r.placed_via_watch, r.placed_via_heartbeat, r.replaced, r.watch_reconnects,
    );
    if !r.beat_failures.is_empty() {
        let _ = writeln!(out, "Heartbeat failures over the whole run (setup included), by reason:\n");
        for (why, n) in r.beat_failures.iter().take(5) {
            let _ = writeln!(out, "- {n} x `{why}`");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "Setup, not measured: the {} PENDING creates took {:.1} s ({:.0}/s at {} clients).\n",
        r.created,
        r.create_elapsed.as_secs_f64(),
        r.created as f64 / r.create_elapsed.as_secs_f64().max(1e-9),
        settings.create_clients
    );
    let _ = writeln!(out, "CPU (share of one core) per phase; this machine has 2 cores shared by everything:\n");
    let _ = writeln!(out, "- creating PENDING sessions: {}", r.create_cpu.line());
    let _ = writeln!(out, "- placing (clock running): {}", r.placing_cpu.line());
    let _ = writeln!(out, "- steady state, heartbeats only: {}\n", r.steady_cpu.line());
    let changed: Vec<&str> =
        [("creating", &r.create_cpu), ("placing", &r.placing_cpu), ("steady state", &r.steady_cpu)]
            .into_iter()
            .filter(|(_, c)| c.leader_changed())
            .map(|(n, _)| n)
            .collect();
    if !changed.is_empty() {
        let _ = writeln!(
            out,
            "**The Raft leader changed while {}** (an overloaded leader missed its heartbeats).\n",
            changed.join(", ")
        );
    }
    let _ = writeln!(out, "Machine:\n");
    for (k, v) in machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
    out
}
