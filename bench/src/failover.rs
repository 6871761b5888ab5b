//! `sandfleet-bench failover`: how long after a node agent is SIGKILLed its
//! sessions are RUNNING on another node.
//!
//! Real binaries through the test harness: three coordinators and three
//! agents (process runtime), the coordinators at `--agent-heartbeat` and
//! `--node-ttl` (default 1 s and 5 s, the coordinator's own defaults). Each
//! round:
//! 1. Steady state: every agent ready; the previous round's sessions are
//!    deleted and `agents x per-agent` fresh sessions are created one at a
//!    time (spread placement puts `per-agent` on each node) and wait RUNNING.
//! 2. After a delay that walks the victim's heartbeat cycle over the rounds
//!    (its last heartbeat reported the new sessions), the clock starts and
//!    one agent (round-robin) gets SIGKILL.
//! 3. `ListSessions` is polled every `--poll` (20 ms): "detected" is the first
//!    poll that shows one of the victim's sessions off the victim (LOST or
//!    placed elsewhere), "RUNNING elsewhere" the first that shows every one of
//!    them RUNNING on another node. The clock stops there.
//! 4. The agent is restarted and the harness waits until it is ready again.
//!
//! The floor is the node TTL: the leader declares a node down only after
//! `node_ttl` without a heartbeat, counted from the last heartbeat before the
//! kill (0 to one interval earlier), checked every 250 ms.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::millis as ms;
use anyhow::{anyhow, bail, Result};
use sandfleet::Client;
use sandfleet_proto::v1 as pb;
use sandfleet_testkit::helpers::{list_all_sessions, percentile, state_of};
use sandfleet_testkit::{ClusterBuilder, Target};

use crate::raft::spec;

/// Kubernetes, not measured: node-monitor-grace-period (40 s) before the node is
/// NotReady, then the default 300 s not-ready/unreachable toleration before its
/// pods are evicted and replaced.
pub const K8S_REFERENCE: Duration = Duration::from_secs(40 + 300);
/// Nomad, not measured: a node is down after its heartbeat TTL (at least
/// `min_heartbeat_ttl`, 10 s) plus `heartbeat_grace` (10 s).
pub const NOMAD_REFERENCE: Duration = Duration::from_secs(20);
/// The goal for p99 at the default timings.
pub const GOAL_P99: Duration = Duration::from_secs(7);

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kills: usize,
    pub agents: usize,
    pub sessions_per_agent: usize,
    pub agent_heartbeat: Duration,
    pub node_ttl: Duration,
    pub poll: Duration,
    pub timeout: Duration,
}

/// One kill.
#[derive(Debug, Clone)]
pub struct Kill {
    pub victim: String,
    pub sessions: usize,
    /// Kill to the first poll showing one of its sessions off the victim.
    pub detected: Duration,
    /// Kill to every one of them RUNNING on another node.
    pub running: Duration,
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    pub kills: Vec<Kill>,
}

impl Report {
    fn series(&self, f: impl Fn(&Kill) -> Duration) -> Vec<Duration> {
        self.kills.iter().map(f).collect()
    }
}

const LIVE: &[pb::SessionState] = &[pb::SessionState::Pending, pb::SessionState::Running, pb::SessionState::Lost];

pub async fn run(settings: &Settings) -> Result<Report> {
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
    let hb = humantime::format_duration(settings.agent_heartbeat).to_string();
    let ttl = humantime::format_duration(settings.node_ttl).to_string();
    eprintln!(
        "sandfleet-bench failover: {} kills, {} agents, {} sessions per agent, coordinators at --agent-heartbeat {hb} --node-ttl {ttl}",
        settings.kills, settings.agents, settings.sessions_per_agent
    );
    let mut cluster = ClusterBuilder::new()
        .coordinators(3)
        .agents(settings.agents)
        .coordinator_args(["--agent-heartbeat", hb.as_str(), "--node-ttl", ttl.as_str()])
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    cluster.wait_converged(Duration::from_secs(60)).await?;
    let client =
        cluster.client_for(cluster.coordinator_addrs()).request_timeout(Duration::from_secs(5)).connect().await?;

    let mut kills = Vec::with_capacity(settings.kills);
    let mut created = 0usize;
    for k in 0..settings.kills {
        let victim = k % settings.agents;
        let victim_node = cluster.agents[victim].id.clone();

        // 1. Steady state with fresh sessions, `sessions_per_agent` on each node.
        cluster.wait_nodes_ready(Duration::from_secs(60)).await?;
        for s in list_all_sessions(&client, &[], LIVE).await? {
            client.delete_session(&s.id).await.map_err(|e| anyhow!("delete {}: {e}", s.id))?;
        }
        let mut ids = Vec::new();
        for _ in 0..settings.agents * settings.sessions_per_agent {
            created += 1;
            let s = client
                .create_session(spec(format!("failover-{}-{created}", std::process::id())))
                .await
                .map_err(|e| anyhow!("create: {e}"))?;
            ids.push(s.id);
        }
        let sessions = wait_all_running(&client, &ids, settings.timeout).await?;
        let on_victim: Vec<String> =
            sessions.values().filter(|s| s.node_id == victim_node).map(|s| s.id.clone()).collect();
        if on_victim.is_empty() {
            bail!("no session was placed on {victim_node}: {:?}", per_node(&sessions));
        }

        // 2. Kill, at a point of the victim's heartbeat cycle that varies from
        // round to round: its last heartbeat (the one that reported the new
        // sessions RUNNING) was just answered, so wait a fraction of an
        // interval that walks the whole cycle over the rounds (golden-ratio
        // sequence), as a kill at a random moment would.
        let phase = settings.agent_heartbeat.mul_f64(((k + 1) as f64 * 0.618_033_988_75).fract());
        // (The victim's heartbeat that reported its sessions RUNNING was answered just before they showed RUNNING.)
        tokio::time::sleep(phase).await;
        let t0 = Instant::now();
        cluster.kill(Target::Agent(victim)).await?;

        // 3. Poll until every one of its sessions runs elsewhere.
        let mut detected = None;
        let running = loop {
            let now = list_all_sessions(&client, &[], LIVE).await?;
            let at = t0.elapsed();
            let by_id: HashMap<&str, &pb::Session> = now.iter().map(|s| (s.id.as_str(), s)).collect();
            let mut done = true;
            for id in &on_victim {
                let Some(s) = by_id.get(id.as_str()) else {
                    bail!("session {id} of the killed agent {victim_node} ended (not PENDING, RUNNING or LOST)");
                };
                let moved = s.node_id != victim_node;
                if moved && detected.is_none() {
                    detected = Some(at);
                }
                if !(moved && state_of(s) == pb::SessionState::Running) {
                    done = false;
                }
            }
            if done {
                break at;
            }
            if at > settings.timeout {
                bail!("the sessions of {victim_node} were not RUNNING elsewhere within {:?}", settings.timeout);
            }
            tokio::time::sleep(settings.poll).await;
        };
        let kill = Kill {
            victim: victim_node.clone(),
            sessions: on_victim.len(),
            detected: detected.unwrap_or(running),
            running,
        };
        eprintln!(
            "  kill {:>2}/{}: {} ({} sessions, killed {:.0} ms after they were RUNNING): detected {:.0} ms, all RUNNING elsewhere {:.0} ms",
            k + 1,
            settings.kills,
            kill.victim,
            kill.sessions,
            ms(phase),
            ms(kill.detected),
            ms(kill.running)
        );
        kills.push(kill);

        // 4. Back to steady state.
        cluster.restart_agent(victim).await?;
    }
    cluster.shutdown().await?;
    Ok(Report { kills })
}

/// Polls until every session in `ids` is RUNNING; returns them by id.
async fn wait_all_running(client: &Client, ids: &[String], timeout: Duration) -> Result<HashMap<String, pb::Session>> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = list_all_sessions(client, &[], LIVE).await?;
        let by_id: HashMap<String, pb::Session> = all.into_iter().map(|s| (s.id.clone(), s)).collect();
        let running =
            ids.iter().filter(|id| by_id.get(*id).is_some_and(|s| state_of(s) == pb::SessionState::Running)).count();
        if running == ids.len() {
            return Ok(by_id.into_iter().filter(|(id, _)| ids.contains(id)).collect());
        }
        if Instant::now() >= deadline {
            bail!("only {running} of {} sessions RUNNING after {timeout:?}", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn per_node(sessions: &HashMap<String, pb::Session>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in sessions.values() {
        *m.entry(s.node_id.clone()).or_insert(0) += 1;
    }
    m
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The Markdown section for `bench/RESULTS.md`.
pub fn render(r: &Report, settings: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let running = r.series(|k| k.running);
    let detected = r.series(|k| k.detected);
    let restart = r.series(|k| k.running.saturating_sub(k.detected));
    let max = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    let p99 = percentile(&running, 99.0);
    let verdict = if p99 <= GOAL_P99 { "met" } else { "MISSED" };
    let sessions: usize = r.kills.iter().map(|k| k.sessions).sum();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench failover --kills {} --sessions-per-agent {}`: three `sandfleet-coordinator` processes \
         (`--agent-heartbeat {} --node-ttl {}`) and {} `sandfleet-agent` processes (process runtime) on loopback on this machine. Each \
         round deletes the previous sessions, creates {} fresh ones (spread placement: {} per node), waits until all are \
         RUNNING, waits 0 to 1 heartbeat interval (varied over the rounds, so the kill lands anywhere in the victim's \
         heartbeat cycle), SIGKILLs one agent (round-robin) and polls `ListSessions` every {} ms until every session that was on it \
         is RUNNING on another node; then restarts the agent and waits until it is ready. {} kills, {} sessions moved in all.\n",
        settings.kills,
        settings.sessions_per_agent,
        humantime::format_duration(settings.agent_heartbeat),
        humantime::format_duration(settings.node_ttl),
        settings.agents,
        settings.agents * settings.sessions_per_agent,
        settings.sessions_per_agent,
        settings.poll.as_millis(),
        r.kills.len(),
        sessions
    );
    let _ = writeln!(out, "| measurement | p50 | p99 | max | goal | vs goal |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
    let _ = writeln!(
        out,
        "| **kill -> every session RUNNING elsewhere** | {} | **{}** | {} | p99 <= {} s | {:.2}x goal: {verdict} |",
        secs(percentile(&running, 50.0)),
        secs(p99),
        secs(max(&running)),
        GOAL_P99.as_secs(),
        p99.as_secs_f64() / GOAL_P99.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| kill -> first session off the node (node declared down) | {} | {} | {} | - | |",
        secs(percentile(&detected, 50.0)),
        secs(percentile(&detected, 99.0)),
        secs(max(&detected))
    );
    let _ = writeln!(
        out,
        "| declared down -> all RUNNING elsewhere (placement + sandbox start) | {} | {} | {} | - | |",
        secs(percentile(&restart, 50.0)),
        secs(percentile(&restart, 99.0)),
        secs(max(&restart))
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Floor (configured, same run): node TTL {} with agent heartbeats every {}: the leader declares a node down once \
         it has gone `node TTL` without a heartbeat, counted from the last heartbeat before the kill (0 to {} earlier), \
         checked every 250 ms; so detection lands between {} and {} after the kill.\n",
        humantime::format_duration(settings.node_ttl),
        humantime::format_duration(settings.agent_heartbeat),
        humantime::format_duration(settings.agent_heartbeat),
        secs(settings.node_ttl.saturating_sub(settings.agent_heartbeat)),
        secs(settings.node_ttl + Duration::from_millis(250)),
    );
    let _ = writeln!(out, "References (published defaults, not measured here):\n");
    let _ = writeln!(
        out,
        "- Kubernetes: ~{} s = node-monitor-grace-period 40 s before the node is NotReady + the default 300 s \
         not-ready/unreachable toleration before its pods are evicted (and only then replaced).",
        K8S_REFERENCE.as_secs()
    );
    let _ = writeln!(
        out,
        "- Nomad: >= {} s = heartbeat TTL (min_heartbeat_ttl 10 s) + heartbeat_grace 10 s before a node is down and its \
         allocations are rescheduled.\n",
        NOMAD_REFERENCE.as_secs()
    );
    crate::push_machine(&mut out, machine);
    out
}
