//! `sandfleet-bench scale`: what a three-coordinator cluster costs with
//! 10,000 simulated agents heartbeating at the default 1 s and 100,000
//! RUNNING sessions, and whether any of it grows faster than linearly.
//!
//! One measurement, at each size (the full size, and first a baseline at
//! `--baseline-fraction` of its agents and sessions, on a fresh cluster):
//! 1. Three real coordinators (`ClusterBuilder`, plaintext on loopback, the
//!    default `--agent-heartbeat 1s --node-ttl 5s`, a metrics listener each)
//!    and no real agent. The leader's RSS and data-dir size are read.
//! 2. The simulated agents (`placement::sim`: the real `AgentService`
//!    protocol, phases spread over the heartbeat interval, shared HTTP/2
//!    connections, no sandboxes) register, leader first; then RSS and data
//!    dir again: the baseline before any session.
//! 3. The sessions are created by `--create-clients` concurrent clients, each
//!    with its own request id and a label `team=t<i mod 100>`; the agents
//!    report each one RUNNING as it is assigned. Done when the leader's
//!    applied state (`sandfleet_sessions{state="running"}`) holds them all.
//! 4. A steady window (`--steady`): CPU of every coordinator and of this
//!    process from `/proc/<pid>/stat`, RSS from `/proc/<pid>/status` at its
//!    end, the heartbeats as the agents saw them (latency, failures).
//!    Memory per session = (leader RSS now - leader RSS before any session) /
//!    sessions; the same for the RocksDB data dir.
//! 5. `ListSessions` with a label filter: `--list-calls` calls of one page of
//!    `--list-page-size` through the SDK on the leader, one after another.
//! 6. Snapshot build: sessions are renewed (each renew is a Raft write) until
//!    the leader builds its next snapshot (`--snapshot-after-entries`, default
//!    5,000 entries); the time is the increase of
//!    `sandfleet_raft_snapshot_build_duration_seconds_sum` over that of its
//!    `_count`, from the leader's `/metrics`.
//! 7. Snapshot install: a fresh fourth coordinator is started and added with
//!    `ClusterService.AddMember` (learner, then voter once caught up); timed
//!    from the call until its applied index reaches the leader's (its log
//!    says whether it was through a streamed snapshot). It is removed again.
//! 8. Cold restart: a follower is SIGKILLed and started again on its data
//!    dir; timed from the spawn to its ready line, to health SERVING, and to
//!    its applied index reaching the leader's.
//!
//! `ClusterService.Status` is not called while measuring (see [`probe`]).
//! The report and the growth check are in [`report`].

mod probe;
mod report;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandfleet::Client;
use sandfleet_proto::v1 as pb;
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub use self::report::render;
use self::report::{Install, ListCalls, Member, Restart, SizeReport, SnapshotBuild, Steady};
use crate::placement::cpu::{cpu_seconds, rss_bytes};
use crate::placement::sim::{agent_main, FleetShape, Pool};
use crate::raft;

/// How long a coordinator may take to print its ready line (at its start,
/// the fresh member's, and the cold restart's).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agents: usize,
    pub sessions: usize,
    /// Also measure at this fraction of the agents and sessions first (0: no baseline).
    pub baseline_fraction: f64,
    pub steady: Duration,
    pub create_clients: usize,
    /// HTTP/2 connections per coordinator shared by the simulated agents.
    pub connections: usize,
    /// Session slots per simulated node; `None`: twice the even share, at least 64.
    pub slots: Option<u32>,
    pub list_calls: usize,
    pub list_page_size: u32,
    /// Concurrent renew clients driving the leader to its next snapshot.
    pub renew_clients: usize,
    /// Longest wait for any one phase (registration, all RUNNING, a snapshot, a catch-up).
    pub timeout: Duration,
    /// Start agent i with coordinator i mod 3 instead of the leader.
    pub spread: bool,
    /// Extra arguments for every coordinator.
    pub coordinator_args: Vec<String>,
}

/// One size the benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub agents: usize,
    pub sessions: usize,
    pub slots: u32,
}

impl Settings {
    /// The sizes to measure, smallest first: the baseline (when
    /// `baseline_fraction` makes a smaller one), then the full size.
    pub fn sizes(&self) -> Vec<Size> {
        let full = self.size(self.agents, self.sessions);
        let f = self.baseline_fraction;
        let mut sizes = Vec::new();
        if f > 0.0 && f < 1.0 {
            let scale = |n: usize| ((n as f64 * f).round() as usize).max(1);
            let small = self.size(scale(self.agents), scale(self.sessions));
            if small != full {
                sizes.push(small);
            }
        }
        sizes.push(full);
        sizes
    }

    fn size(&self, agents: usize, sessions: usize) -> Size {
        let agents = agents.max(1);
        let slots = self.slots.unwrap_or_else(|| (sessions.div_ceil(agents) * 2).max(64).min(u32::MAX as usize) as u32);
        Size { agents, sessions: sessions.max(1), slots }
    }
}

/// Everything one run measured, smallest size first.
#[derive(Debug)]
pub struct Report {
    pub runs: Vec<SizeReport>,
}

/// Measures every size in turn, each on a fresh cluster.
pub async fn run(settings: &Settings) -> Result<Report> {
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
    let mut runs = Vec::new();
    for size in settings.sizes() {
        if size.sessions > size.agents * size.slots as usize {
            bail!("{} sessions do not fit {} nodes of {} slots", size.sessions, size.agents, size.slots);
        }
        eprintln!(
            "sandfleet-bench scale: {} agents, {} sessions, {} slots per node",
            size.agents, size.sessions, size.slots
        );
        let r = measure(settings, size, &child_log)
            .await
            .with_context(|| format!("at {} agents and {} sessions", size.agents, size.sessions))?;
        report::print_summary(&r);
        runs.push(r);
    }
    Ok(Report { runs })
}

/// The simulated fleet while it runs; dropping it stops every agent.
struct Fleet {
    pool: Arc<Pool>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    fn start(pool: Arc<Pool>) -> Fleet {
        let stop = CancellationToken::new();
        let tasks = (0..pool.agents.len())
            .map(|i| {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move { agent_main(pool, i, stop).await })
            })
            .collect();
        Fleet { pool, stop, tasks }
    }

    /// Waits until every agent has registered, with a progress line every 2 s.
    async fn wait_registered(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let want = self.pool.agents.len();
        let mut last_print = t0;
        loop {
            let n = self.pool.registered.load(Ordering::Relaxed);
            if n >= want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                bail!("only {n} of {want} agents registered within {timeout:?}");
            }
            if last_print.elapsed() >= Duration::from_secs(2) {
                last_print = Instant::now();
                eprintln!("  t+{:>5.1} s: {n} of {want} agents registered", t0.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every agent and returns the heartbeat failures of the whole run
    /// by reason (most frequent first) and the watch-stream reconnects.
    async fn stop(&mut self) -> (Vec<(String, u64)>, u64) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let mut failures: Vec<(String, u64)> =
            self.pool.beats.reasons.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        failures.sort_by_key(|f| std::cmp::Reverse(f.1));
        (failures, self.pool.watch_reconnects.load(Ordering::Relaxed))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The whole measurement at one size, on its own cluster.
async fn measure(settings: &Settings, size: Size, child_log: &str) -> Result<SizeReport> {
    // Plaintext on loopback: the simulated agents share connections, and an
    // agent certificate binds one node id per connection.
    let mut cluster = ClusterBuilder::new()
        .tls(false)
        .coordinators(3)
        .agents(0)
        .metrics_listeners(true)
        .coordinator_args(settings.coordinator_args.iter().cloned())
        .env("RUST_LOG", child_log)
        // A member restarted on a large state may take a while to its ready line.
        .ready_timeout(READY_TIMEOUT)
        .start()
        .await?;
    let status = cluster.wait_converged(Duration::from_secs(60)).await?;
    let leader = cluster
        .coordinator_index(status.leader_id)
        .ok_or_else(|| anyhow!("leader {} is not ours", status.leader_id))?;
    let leader_id = status.leader_id;
    let leader_addr = cluster.coordinators[leader].addr.clone();
    let mut endpoints = vec![leader_addr.clone()];
    endpoints.extend(cluster.coordinator_addrs().into_iter().filter(|a| *a != leader_addr));
    let client = cluster.client_for(endpoints.clone()).request_timeout(Duration::from_secs(30)).connect().await?;
    let leader_pid = cluster.coordinators[leader].pid().ok_or_else(|| anyhow!("the leader is not running"))?;
    let leader_dir = cluster.coordinators[leader].data_dir.clone();
    let term0 = probe::scrape(&cluster, leader).await?.value(probe::TERM);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_bytes(leader_pid).unwrap_or(0);
    let disk_start = probe::dir_bytes(&leader_dir);

    // The fleet, talking to the leader first (or spread over the members).
    let shape = FleetShape {
        agents: size.agents,
        connections: settings.connections,
        slots: size.slots,
        spread: settings.spread,
    };
    let pool = Pool::connect(&endpoints, &shape).await?;
    let mut fleet = Fleet::start(pool.clone());
    let registered_after = fleet.wait_registered(settings.timeout).await?;
    eprintln!("  {} agents registered in {:.1} s", size.agents, registered_after.as_secs_f64());
    // Let every agent fall into its heartbeat rhythm before the baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_agents = rss_bytes(leader_pid).unwrap_or(0);
    let disk_agents = probe::dir_bytes(&leader_dir);

    // The sessions, until the leader's applied state has them all RUNNING.
    let t_create = Instant::now();
    let created = create_sessions(&client, &cluster, leader, size, settings, &pool).await?;
    let create_beats = pool.beats.window(t_create, Instant::now());
    pool.beats.forget();
    eprintln!(
        "  {} sessions created in {:.1} s ({:.0}/s), all RUNNING after {:.1} s; heartbeats meanwhile p99 {:.1} ms, {} failed",
        size.sessions,
        created.create_elapsed.as_secs_f64(),
        size.sessions as f64 / created.create_elapsed.as_secs_f64().max(1e-9),
        created.all_running_after.as_secs_f64(),
        report::ms(percentile(&create_beats.latencies, 99.0)),
        create_beats.failed
    );

    // The steady window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let steady = steady_window(&cluster, leader, &pool, settings.steady).await?;
    let disk_end = probe::dir_bytes(&leader_dir);
    eprintln!(
        "  steady: leader {:.0}% CPU, RSS {:.0} MiB; heartbeats p50 {:.1} ms, p99 {:.1} ms, {} failed",
        steady.leader_cpu,
        steady.leader_rss as f64 / 1048576.0,
        report::ms(percentile(&steady.beats.latencies, 50.0)),
        report::ms(percentile(&steady.beats.latencies, 99.0)),
        steady.beats.failed
    );

    // ListSessions with a label filter.
    let list = list_calls(&client, settings.list_calls, settings.list_page_size).await;
    eprintln!(
        "  ListSessions (label filter, page {}): p50 {:.1} ms, p99 {:.1} ms, {} errors",
        settings.list_page_size,
        report::ms(percentile(&list.latencies, 50.0)),
        report::ms(percentile(&list.latencies, 99.0)),
        list.errors
    );
    let term_after_steady = probe::scrape(&cluster, leader).await.map(|s| s.value(probe::TERM)).unwrap_or(-1.0);
    let leader_kept = term_after_steady == term0;
    pool.beats.forget();

    // Snapshot build, install, cold restart: each may fail on its own.
    let snapshot = snapshot_build(&cluster, &client, &created.ids, settings).await.map_err(|e| format!("{e:#}"));
    match &snapshot {
        Ok(s) => eprintln!("  snapshot build: {:.0} ms ({} renews to reach it)", report::ms(s.build), s.writes),
        Err(e) => eprintln!("  snapshot build: not measured: {e}"),
    }
    let install = snapshot_install(&mut cluster, &client, settings.timeout).await.map_err(|e| format!("{e:#}"));
    match &install {
        Ok(i) => eprintln!(
            "  snapshot install: caught up {:.2} s after AddMember (via snapshot: {})",
            i.caught_up.as_secs_f64(),
            i.via_snapshot
        ),
        Err(e) => eprintln!("  snapshot install: not measured: {e}"),
    }
    let restart = cold_restart(&mut cluster, settings.timeout).await.map_err(|e| format!("{e:#}"));
    match &restart {
        Ok(r) => eprintln!(
            "  cold restart: ready line {:.2} s, caught up {:.2} s after the spawn",
            r.ready.as_secs_f64(),
            r.caught_up.as_secs_f64()
        ),
        Err(e) => eprintln!("  cold restart: not measured: {e}"),
    }
    let after_beats = pool.beats.window(steady.end, Instant::now());

    let (beat_failures, watch_reconnects) = fleet.stop().await;
    let heartbeat_interval = Duration::from_millis(pool.interval_ms.load(Ordering::Relaxed));
    let node_ttl = Duration::from_millis(pool.ttl_ms.load(Ordering::Relaxed));
    drop(fleet);
    if let Err(e) = cluster.shutdown().await {
        // The figures stand; a member that exited uncleanly is worth a look.
        eprintln!("sandfleet-bench scale: warning: {e:#}");
    }
    Ok(SizeReport {
        size,
        leader_id,
        leader_kept,
        heartbeat_interval,
        node_ttl,
        registered_after,
        create_elapsed: created.create_elapsed,
        all_running_after: created.all_running_after,
        create_beats,
        rss_start,
        rss_agents,
        disk_start,
        disk_agents,
        disk_end,
        steady,
        list,
        snapshot,
        install,
        restart,
        after_beats,
        beat_failures,
        watch_reconnects,
    })
}

/// What creating the sessions gave.
struct Created {
    ids: Vec<String>,
    create_elapsed: Duration,
    all_running_after: Duration,
}

/// The label every session carries, one of 100 values.
fn team(i: usize) -> String {
    format!("t{}", i % 100)
}

/// Creates `size.sessions` sessions with `create_clients` concurrent clients
/// and waits until the leader's applied state has them all RUNNING.
async fn create_sessions(
    client: &Client,
    cluster: &Cluster,
    leader: usize,
    size: Size,
    settings: &Settings,
    pool: &Pool,
) -> Result<Created> {
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(size.sessions)));
    let t0 = Instant::now();
    let mut creators = JoinSet::new();
    for _ in 0..settings.create_clients.max(1) {
        let (client, next, done, ids, stop) = (client.clone(), next.clone(), done.clone(), ids.clone(), stop.clone());
        let total = size.sessions;
        creators.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let spec = raft::spec(format!("scale-{}-{total}-{i}", std::process::id()))
                    .ttl(Duration::from_secs(24 * 3600))
                    .label("team", team(i));
                // The SDK retries on its own; a create that still fails is
                // tried again with the same request id (idempotent).
                let mut attempt = 0;
                let s = loop {
                    let r = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = tokio::time::timeout(Duration::from_secs(60), client.create_session(spec.clone())) => r,
                    };
                    match r {
                        Ok(Ok(s)) => break s,
                        Ok(Err(e)) if attempt >= 5 => bail!("create #{i}: {e}"),
                        Err(_) if attempt >= 5 => bail!("create #{i}: no answer within 60 s"),
                        _ => attempt += 1,
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                ids.lock().push(s.id);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let deadline = t0 + settings.timeout;
    let mut create_elapsed = None;
    let (mut last_print, mut last_done, mut last_beats) = (t0, 0usize, pool.beats.ok.load(Ordering::Relaxed));
    let mut running = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        while let Some(r) = creators.try_join_next() {
            r.context("a create client panicked")??;
        }
        if create_elapsed.is_none() && creators.is_empty() {
            create_elapsed = Some(t0.elapsed());
        }
        if let Ok(s) = probe::scrape(cluster, leader).await {
            running = s.sum(probe::SESSIONS, &[("state", "running")]).unwrap_or(0.0) as u64;
        }
        if create_elapsed.is_some() && running >= size.sessions as u64 {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let dt = last_print.elapsed().as_secs_f64();
            last_print = Instant::now();
            let n = done.load(Ordering::Relaxed);
            let beats = pool.beats.ok.load(Ordering::Relaxed);
            eprintln!(
                "  t+{:>5.1} s: {n} of {} created ({:.0}/s), {running} RUNNING, {:.0} heartbeats/s answered, {} failed so far",
                t0.elapsed().as_secs_f64(),
                size.sessions,
                (n - last_done) as f64 / dt,
                (beats - last_beats) as f64 / dt,
                pool.beats.failed.load(Ordering::Relaxed),
            );
            (last_done, last_beats) = (n, beats);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} of {} sessions created and {running} RUNNING after {:?}",
                done.load(Ordering::Relaxed),
                size.sessions,
                settings.timeout
            );
        }
    }
    let all_running_after = t0.elapsed();
    let ids = std::mem::take(&mut *ids.lock());
    Ok(Created { ids, create_elapsed: create_elapsed.unwrap_or(all_running_after), all_running_after })
}

/// CPU seconds of every running coordinator (index, Raft id, pid, seconds).
fn coordinator_cpu(cluster: &Cluster) -> Vec<(usize, u64, u32, f64)> {
    cluster
        .coordinators
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let pid = c.pid()?;
            Some((i, c.id.parse().ok()?, pid, cpu_seconds(pid)?))
        })
        .collect()
}

/// CPU, RSS and heartbeats over `window` with every session RUNNING.
async fn steady_window(cluster: &Cluster, leader: usize, pool: &Pool, window: Duration) -> Result<Steady> {
    let before = coordinator_cpu(cluster);
    let me = std::process::id();
    let my_before = cpu_seconds(me).unwrap_or(0.0);
    let scrape_before = probe::scrape(cluster, leader).await?;
    let s0 = Instant::now();
    tokio::time::sleep(window).await;
    let end = Instant::now();
    let wall = (end - s0).as_secs_f64();
    let scrape_after = probe::scrape(cluster, leader).await?;
    let after = coordinator_cpu(cluster);
    let my_after = cpu_seconds(me).unwrap_or(0.0);
    let beats = pool.beats.window(s0, end);

    let mut members = Vec::new();
    for (i, id, pid, secs) in &after {
        let Some((_, _, _, was)) = before.iter().find(|(j, _, p, _)| j == i && p == pid) else { continue };
        members.push((*i, Member { id: *id, cpu: (secs - was) / wall * 100.0, rss: rss_bytes(*pid).unwrap_or(0) }));
    }
    let (leader_m, followers): (Vec<_>, Vec<_>) = members.into_iter().partition(|(i, _)| *i == leader);
    let leader_m = leader_m.into_iter().next().map(|(_, m)| m).ok_or_else(|| anyhow!("the leader stopped"))?;
    let term_changed = scrape_after.value(probe::TERM) != scrape_before.value(probe::TERM)
        || scrape_after.value(probe::IS_LEADER) < 1.0;
    let leader_beats = scrape_after.value(probe::HEARTBEATS) - scrape_before.value(probe::HEARTBEATS);
    Ok(Steady {
        window: end - s0,
        end,
        leader_cpu: leader_m.cpu,
        leader_rss: leader_m.rss,
        followers: followers.into_iter().map(|(_, m)| m).collect(),
        bench_cpu: (my_after - my_before) / wall * 100.0,
        beats,
        leader_heartbeats_per_sec: leader_beats / wall,
        leader_changed: term_changed,
    })
}

/// `calls` filtered `ListSessions` calls of one page, one after another.
async fn list_calls(client: &Client, calls: usize, page_size: u32) -> ListCalls {
    let mut out = ListCalls { calls, ..Default::default() };
    for k in 0..calls {
        let req = pb::ListSessionsRequest {
            label_selector: [("team".to_string(), team(k * 37))].into_iter().collect(),
            page_size,
            ..Default::default()
        };
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(30), client.list_sessions(req)).await {
            Ok(Ok(page)) => {
                out.latencies.push(t.elapsed());
                out.returned += page.sessions.len() as u64;
            }
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| "no answer within 30 s".to_string());
            }
        }
    }
    out
}

/// Renews sessions until the leader builds its next snapshot, and reads how
/// long that build took from its metrics.
async fn snapshot_build(
    cluster: &Cluster,
    client: &Client,
    ids: &[String],
    settings: &Settings,
) -> Result<SnapshotBuild> {
    let leader = probe::current_leader(cluster).await.ok_or_else(|| anyhow!("no coordinator says it leads"))?;
    let before = probe::scrape(cluster, leader).await?;
    let (sum0, count0) = (before.value(probe::SNAPSHOT_BUILD_SUM), before.value(probe::SNAPSHOT_BUILD_COUNT));
    if ids.is_empty() {
        bail!("no sessions to renew");
    }
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let writes = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids.to_vec());
    let mut renewers = JoinSet::new();
    for _ in 0..settings.renew_clients.max(1) {
        let (client, stop, writes, next, ids) =
            (client.clone(), stop.clone(), writes.clone(), next.clone(), ids.clone());
        renewers.spawn(async move {
            loop {
                let id = &ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio::time::timeout(Duration::from_secs(30), client.renew_session(id, None)) => {
                        if matches!(r, Ok(Ok(_))) {
                            writes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
    }
    let t0 = Instant::now();
    let after = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(s) = probe::scrape(cluster, leader).await {
            if s.value(probe::SNAPSHOT_BUILD_COUNT) > count0 {
                break s;
            }
        }
        if t0.elapsed() >= settings.timeout {
            bail!(
                "the leader built no snapshot within {:?} ({} renews)",
                settings.timeout,
                writes.load(Ordering::Relaxed)
            );
        }
    };
    stop.cancel();
    while renewers.join_next().await.is_some() {}
    let (sum1, count1) = (after.value(probe::SNAPSHOT_BUILD_SUM), after.value(probe::SNAPSHOT_BUILD_COUNT));
    let builds = (count1 - count0).max(1.0);
    Ok(SnapshotBuild {
        build: Duration::from_secs_f64(((sum1 - sum0) / builds).max(0.0)),
        builds: builds as u64,
        writes: writes.load(Ordering::Relaxed),
        waited: t0.elapsed(),
        snapshot_bytes: after.value(probe::SNAPSHOT_BYTES) as u64,
        all_builds: count1 as u64,
        mean_all: Duration::from_secs_f64((sum1 / count1.max(1.0)).max(0.0)),
    })
}

/// The applied index coordinator `i` reports on its `/metrics`.
async fn applied_of(cluster: &Cluster, i: usize) -> Option<f64> {
    probe::scrape(cluster, i).await.ok().map(|s| s.value(probe::APPLIED))
}

/// A fresh member added with AddMember, timed until it has caught up.
async fn snapshot_install(cluster: &mut Cluster, client: &Client, timeout: Duration) -> Result<Install> {
    let leader = probe::current_leader(cluster).await.ok_or_else(|| anyhow!("no coordinator says it leads"))?;
    let t_spawn = Instant::now();
    let new = cluster.spawn_coordinator().await?;
    let spawned = t_spawn.elapsed();
    let id: u64 = cluster.coordinators[new].id.parse().context("the new member's id")?;
    let addr = cluster.coordinators[new].addr.clone();

    let t0 = Instant::now();
    let mut add = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::spawn(async move { client.add_member(id, &addr).await })
    };
    let (mut first_applied, mut caught_up, mut voter) = (None, None, None);
    let mut applied = 0.0;
    let outcome = loop {
        if voter.is_none() {
            tokio::select! {
                r = &mut add => {
                    match r {
                        Ok(Ok(_)) => voter = Some(t0.elapsed()),
                        Ok(Err(e)) => break Err(anyhow!("AddMember({id}, {addr}): {e}")),
                        Err(e) => break Err(anyhow!("AddMember task: {e}")),
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if caught_up.is_none() {
            let l = applied_of(cluster, leader).await;
            if let (Some(l), Some(m)) = (l, applied_of(cluster, new).await) {
                applied = m;
                if m > 0.0 && first_applied.is_none() {
                    first_applied = Some(t0.elapsed());
                }
                if m > 0.0 && m >= l {
                    caught_up = Some(t0.elapsed());
                }
            }
        }
        if let (Some(c), Some(v)) = (caught_up, voter) {
            break Ok((c, v));
        }
        if t0.elapsed() >= timeout {
            add.abort();
            break Err(anyhow!("member {id} applied up to {applied} and was not caught up within {timeout:?}"));
        }
    };
    let log = std::fs::read_to_string(&cluster.coordinators[new].log_path).unwrap_or_default();
    let via_snapshot = log.contains("installing snapshot streamed from the leader");
    let snapshot_bytes = probe::scrape(cluster, new).await.map(|s| s.value(probe::SNAPSHOT_BYTES) as u64).unwrap_or(0);
    // Back to three members, whatever happened.
    let removed = tokio::time::timeout(Duration::from_secs(90), client.remove_member(id)).await;
    if !matches!(removed, Ok(Ok(_))) {
        eprintln!("sandfleet-bench scale: warning: removing member {id} again failed: {removed:?}");
    }
    if let Err(e) = cluster.terminate(Target::Coordinator(new)).await {
        eprintln!("sandfleet-bench scale: warning: stopping member {id}: {e:#}");
    }
    let (caught_up, voter) = outcome?;
    Ok(Install {
        spawned,
        first_applied: first_applied.unwrap_or(caught_up),
        caught_up,
        voter,
        via_snapshot,
        applied: applied as u64,
        snapshot_bytes,
    })
}

/// A follower SIGKILLed and started again, timed from the spawn.
async fn cold_restart(cluster: &mut Cluster, timeout: Duration) -> Result<Restart> {
    let leader = probe::current_leader(cluster).await.ok_or_else(|| anyhow!("no coordinator says it leads"))?;
    let f = (0..cluster.coordinators.len().min(3))
        .find(|i| *i != leader && cluster.coordinators[*i].pid().is_some())
        .ok_or_else(|| anyhow!("no running follower"))?;
    let addr = cluster.coordinators[f].addr.clone();
    cluster.kill(Target::Coordinator(f)).await?;
    let t0 = Instant::now();
    cluster.restart(Target::Coordinator(f)).await?;
    let ready = t0.elapsed();
    let (mut serving, mut caught_up, mut applied) = (None, None, 0.0);
    loop {
        if serving.is_none() {
            let status = sandfleet_testkit::health::check(&addr, sandfleet_testkit::health::SERVER).await;
            if matches!(status, Ok(sandfleet_testkit::health::ServingStatus::Serving)) {
                serving = Some(t0.elapsed());
            }
        }
        if caught_up.is_none() {
            let l = applied_of(cluster, leader).await;
            if let (Some(l), Some(m)) = (l, applied_of(cluster, f).await) {
                applied = m;
                if m >= l {
                    caught_up = Some(t0.elapsed());
                }
            }
        }
        if let (Some(s), Some(c)) = (serving, caught_up) {
            return Ok(Restart { member: (f + 1) as u64, ready, serving: s, caught_up: c, applied: applied as u64 });
        }
        if t0.elapsed() >= timeout {
            bail!(
                "coordinator {} not SERVING ({serving:?}) and caught up ({caught_up:?}, applied {applied}) within {timeout:?}",
                f + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The default settings at a given size, for the unit tests of this module and of `report`.
#[cfg(test)]
fn test_settings(agents: usize, sessions: usize, fraction: f64) -> Settings {
    Settings {
        agents,
        sessions,
        baseline_fraction: fraction,
        steady: Duration::from_secs(30),
        create_clients: 64,
        connections: 16,
        slots: None,
        list_calls: 200,
        list_page_size: 100,
        renew_clients: 32,
        timeout: Duration::from_secs(3600),
        spread: false,
        coordinator_args: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(agents: usize, sessions: usize, fraction: f64) -> Settings {
        test_settings(agents, sessions, fraction)
    }

    #[test]
    fn the_baseline_comes_first_at_its_fraction() {
        let sizes = settings(10_000, 100_000, 0.1).sizes();
        assert_eq!(
            sizes,
            vec![
                Size { agents: 1000, sessions: 10_000, slots: 64 },
                Size { agents: 10_000, sessions: 100_000, slots: 64 }
            ]
        );
        assert_eq!(settings(10_000, 100_000, 0.0).sizes().len(), 1);
        assert_eq!(settings(10_000, 100_000, 1.0).sizes().len(), 1);
        // Too small to scale down: measured once.
        assert_eq!(settings(1, 1, 0.1).sizes(), vec![Size { agents: 1, sessions: 1, slots: 64 }]);
    }

    #[test]
    fn slots_fit_the_sessions_with_room() {
        let s = settings(100, 100_000, 0.0).sizes()[0];
        assert_eq!(s.slots, 2000);
        assert!(s.sessions <= s.agents * s.slots as usize);
        let mut fixed = settings(100, 1000, 0.0);
        fixed.slots = Some(10);
        assert_eq!(fixed.sizes()[0].slots, 10);
    }
}
