//! The simulated agents: each registers, heartbeats with its reports and
//! follows `WatchAssignments` the way `sandfleet-agent` does, with the agent's
//! own retry backoff and coordinator connection settings
//! ([`sandfleet_agent::coordinator_link`]), and runs no sandbox: a session is
//! "ready" as soon as it is assigned.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sandfleet_agent::control::plan::PushedSet;
use sandfleet_agent::coordinator_link::{self, backoff, CALL_TIMEOUT};
use sandfleet_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::report::Beats;

/// Heartbeat accounting shared by every agent.
#[derive(Default)]
pub(crate) struct BeatLog {
    pub(crate) ok: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// (answered at, latency) of every answered heartbeat; (failed at) of every failure.
    pub(crate) samples: Mutex<Vec<(Instant, Duration)>>,
    pub(crate) failures: Mutex<Vec<Instant>>,
    /// When a heartbeat was answered before the reports it carried were
    /// committed (the agent sends them again).
    pub(crate) resent: Mutex<Vec<Instant>>,
    /// Why heartbeats failed: gRPC code and the start of the message -> count.
    pub(crate) reasons: Mutex<HashMap<String, u64>>,
}

impl BeatLog {
    /// Forgets the samples and failure times kept so far (the counters and
    /// reasons stay), so that a long run does not keep every heartbeat.
    pub(crate) fn forget(&self) {
        self.samples.lock().clear();
        self.failures.lock().clear();
        self.resent.lock().clear();
    }

    pub(crate) fn window(&self, from: Instant, to: Instant) -> Beats {
        let latencies: Vec<Duration> =
            self.samples.lock().iter().filter(|(t, _)| *t >= from && *t <= to).map(|(_, d)| *d).collect();
        let failed = self.failures.lock().iter().filter(|t| **t >= from && **t <= to).count();
        let resent = self.resent.lock().iter().filter(|t| **t >= from && **t <= to).count();
        Beats { window: to - from, ok: latencies.len() as u64, failed: failed as u64, resent: resent as u64, latencies }
    }
}

/// What the agents have seen of the sessions being measured.
pub(crate) struct Tracker {
    pub(crate) expected: std::sync::OnceLock<HashSet<String>>,
    pub(crate) inner: Mutex<TrackInner>,
}

#[derive(Default)]
pub(crate) struct TrackInner {
    pub(crate) t0: Option<Instant>,
    /// Session -> newest generation seen assigned.
    pub(crate) placed: HashMap<String, u64>,
    /// Sessions whose newest generation was reported RUNNING and answered.
    pub(crate) running: HashSet<String>,
    pub(crate) all_placed: Option<Duration>,
    pub(crate) all_running: Option<Duration>,
    pub(crate) via_watch: u64,
    pub(crate) via_heartbeat: u64,
    pub(crate) replaced: u64,
}

impl Tracker {
    pub(crate) fn expect(&self, ids: HashSet<String>) {
        let _ = self.expected.set(ids);
    }

    fn expected_len(&self) -> usize {
        self.expected.get().map_or(usize::MAX, |e| e.len())
    }

    pub(crate) fn start(&self, t0: Instant) {
        self.inner.lock().t0 = Some(t0);
    }

    pub(crate) fn progress(&self) -> (usize, usize, Option<Duration>, Option<Duration>) {
        let g = self.inner.lock();
        (g.placed.len(), g.running.len(), g.all_placed, g.all_running)
    }

    pub(crate) fn sources(&self) -> (u64, u64, u64) {
        let g = self.inner.lock();
        (g.via_watch, g.via_heartbeat, g.replaced)
    }

    /// `new` were just assigned to some agent (seen on its watch stream or a heartbeat answer).
    fn placed(&self, new: &[(String, u64)], via_watch: bool) {
        let Some(expected) = self.expected.get() else { return };
        let now = Instant::now();
        let mut g = self.inner.lock();
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

    /// The heartbeat carrying `reports` was answered, saying they are committed.
    fn acked(&self, reports: &[pb::SessionReport]) {
        if reports.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut g = self.inner.lock();
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

pub(crate) struct SimAgent {
    pub(crate) node_id: String,
    /// Session -> generation this agent "runs".
    pub(crate) held: Mutex<HashMap<String, u64>>,
    pub(crate) reports: Mutex<Vec<pb::SessionReport>>,
    pub(crate) report_ready: Notify,
}

impl SimAgent {
    /// Brings the held set in line with the full assignment set, as the real
    /// agent's reconcile does; every new (session, generation) is "ready" at
    /// once and queued as a RUNNING report, which wakes the heartbeat loop.
    fn reconcile(&self, tracker: &Tracker, assignments: Vec<pb::Assignment>, via_watch: bool) {
        let mut new = Vec::new();
        {
            let mut held = self.held.lock();
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
        let mut reports = self.reports.lock();
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

/// The shape of a simulated fleet: how many agents, how they connect, what each offers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FleetShape {
    pub(crate) agents: usize,
    /// HTTP/2 connections per coordinator shared by the agents.
    pub(crate) connections: usize,
    /// Session slots of each simulated node.
    pub(crate) slots: u32,
    /// Start agent i with coordinator i mod n instead of the first one listed.
    pub(crate) spread: bool,
}

pub(crate) struct Pool {
    /// channels[coordinator][k]: `connections` HTTP/2 connections per coordinator.
    pub(crate) channels: Vec<Vec<Channel>>,
    pub(crate) agents: Vec<SimAgent>,
    pub(crate) tracker: Tracker,
    pub(crate) beats: BeatLog,
    pub(crate) registered: AtomicUsize,
    pub(crate) registered_at: Mutex<Option<Instant>>,
    pub(crate) watch_reconnects: AtomicU64,
    pub(crate) interval_ms: AtomicU64,
    pub(crate) ttl_ms: AtomicU64,
    pub(crate) spread: bool,
    pub(crate) capacity: pb::NodeCapacity,
}

impl Pool {
    pub(crate) async fn connect(coordinators: &[String], settings: &FleetShape) -> Result<Arc<Pool>> {
        let mut channels = Vec::new();
        for addr in coordinators {
            let mut per = Vec::new();
            for _ in 0..settings.connections.max(1) {
                let ch = coordinator_link::endpoint(addr)?
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
pub(crate) async fn agent_main(pool: Arc<Pool>, i: usize, stop: CancellationToken) {
    let mut current = pool.first_coordinator(i);
    let Some(mut interval) = register(&pool, i, &mut current, &stop).await else { return };
    if pool.registered.fetch_add(1, Ordering::Relaxed) + 1 == pool.agents.len() {
        *pool.registered_at.lock() = Some(Instant::now());
    }
    let watcher = tokio::spawn(watch_loop(pool.clone(), i, stop.clone()));
    let agent = &pool.agents[i];
    let mut failures = 0u32;
    let mut resend_soon = false;
    // A real fleet's agents started at different times, so their heartbeats are
    // spread over the interval; agents that all register in the same second
    // would otherwise beat in lock-step. Spread the first one (golden-ratio
    // sequence over the agents).
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(interval.mul_f64((i as f64 * 0.618_033_988_75).fract())) => {}
    }
    loop {
        // Reports answered before their commit go again a quarter interval later, as the agent's do.
        let wait = if resend_soon { interval / 4 } else { interval };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = agent.report_ready.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let reports = std::mem::take(&mut *agent.reports.lock());
        let mut req = tonic::Request::new(pb::HeartbeatRequest {
            node_id: agent.node_id.clone(),
            reports: reports.clone(),
            resend_uncommitted: true,
            ..Default::default()
        });
        req.set_timeout(CALL_TIMEOUT.min(interval * 2));
        let t = Instant::now();
        match pool.client(i, current).heartbeat(req).await {
            Ok(resp) => {
                let now = Instant::now();
                pool.beats.ok.fetch_add(1, Ordering::Relaxed);
                pool.beats.samples.lock().push((now, now - t));
                failures = 0;
                let resp = resp.into_inner();
                resend_soon = !resp.reports_committed && !reports.is_empty();
                if resend_soon {
                    pool.beats.resent.lock().push(now);
                    agent.reports.lock().splice(0..0, reports);
                } else {
                    pool.tracker.acked(&reports);
                }
                agent.reconcile(&pool.tracker, resp.assignments, false);
            }
            Err(status) => {
                pool.beats.failed.fetch_add(1, Ordering::Relaxed);
                pool.beats.failures.lock().push(Instant::now());
                let reason = format!("{:?}: {}", status.code(), status.message().chars().take(60).collect::<String>());
                *pool.beats.reasons.lock().entry(reason).or_insert(0) += 1;
                agent.reports.lock().splice(0..0, reports);
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
            r = client.watch_assignments(pb::WatchAssignmentsRequest { node_id: agent.node_id.clone(), deltas: true }) => r,
        };
        if let Ok(resp) = opened {
            let mut stream = resp.into_inner();
            // As the real agent follows it: the full set, then deltas.
            let mut pushed = PushedSet::default();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    msg = stream.message() => match msg.map(|m| m.map(|m| pushed.follow(m))) {
                        Ok(Some(Ok(set))) => agent.reconcile(&pool.tracker, set, true),
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
