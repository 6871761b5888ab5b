//! The nemesis: injects the seeded fault schedule (kills, freezes, network
//! partitions) and, for agent faults, checks that the node's sessions run
//! elsewhere within the move deadline with their workspace files intact.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandfleet::{proto, Client, ExecRequest};
use sandfleet_testkit::helpers::{list_all_sessions, state_of};
use sandfleet_testkit::linearizability::{Call, History};
use sandfleet_testkit::{Cluster, Target};

use crate::args::Settings;
use crate::workload::{create_outcome, is_terminal, spec, Shared, ANCHOR_TTL, RUN_LABEL};

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillLeader,
    KillFollower,
    KillAgent,
    FreezeAgent,
    FreezeLeader,
    PartitionAgent,
    PartitionCoordinator,
}

pub const ALL_FAULTS: [Fault; 7] = [
    Fault::KillLeader,
    Fault::KillFollower,
    Fault::KillAgent,
    Fault::FreezeAgent,
    Fault::FreezeLeader,
    Fault::PartitionAgent,
    Fault::PartitionCoordinator,
];

/// What the nemesis did.
#[derive(Debug, Default)]
pub struct Schedule {
    /// One line per event, with its time.
    pub lines: Vec<String>,
    /// Faults injected (not skipped), per kind.
    pub injected: BTreeMap<Fault, u32>,
    /// Faults of the plan that could not be injected, per kind.
    pub skipped: BTreeMap<Fault, u32>,
    /// How long the moved sessions took, over all checked agent faults.
    pub move_times: Vec<Duration>,
    /// Sessions whose planted workspace files were checked after a move.
    pub markers_checked: usize,
}

/// The nemesis's view of the workload: what it needs to check moves.
pub struct NemesisCtx<'a> {
    pub client: &'a Client,
    pub ledger: &'a Shared,
    pub history: &'a History,
    pub run: &'a str,
    pub seed: u64,
    pub settings: &'a Settings,
}

/// The least time between the end of one fault and the start of the next.
pub const CALM: Duration = Duration::from_millis(1500);

/// The client id of the nemesis's own operations in the history.
pub const NEMESIS_CLIENT: u64 = 0;
/// Sessions the nemesis keeps on a node before killing or cutting it off, so
/// that the move check has something to move even when the workers' sessions
/// churn faster than a node TTL.
pub const ANCHORS_PER_FAULT: usize = 2;

/// Injects the seeded fault schedule, healing each fault before the next:
/// until `until` (drawing each fault from the seed), or in smoke mode through
/// two seeded permutations of every fault kind. Returns the schedule as it happened.
pub async fn nemesis(cluster: &mut Cluster, ctx: &NemesisCtx<'_>, seed: u64, until: Option<Instant>) -> Schedule {
    let interval = ctx.settings.fault_interval;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006E_656D_6573_6973);
    let start = Instant::now();
    let mut sched = Schedule::default();
    let note = |sched: &mut Schedule, what: String| {
        let line = format!("t+{:>6.1}s {what}", start.elapsed().as_secs_f64());
        println!("sandfleet-chaos: fault {line}");
        sched.lines.push(line);
    };
    let many_coordinators = cluster.coordinators.len() >= 3;
    let choices: Vec<Fault> = if many_coordinators {
        ALL_FAULTS.to_vec()
    } else {
        vec![Fault::KillAgent, Fault::FreezeAgent, Fault::PartitionAgent]
    };
    // Smoke: two rounds of every kind, each in a seeded order; in the first
    // round agent kills and partitions are long (their sessions must move).
    // A skipped fault is retried later (twice at most).
    let mut plan: std::collections::VecDeque<Planned> = Default::default();
    if ctx.settings.smoke {
        for round in 0..2 {
            let mut kinds = choices.clone();
            for i in (1..kinds.len()).rev() {
                kinds.swap(i, rng.random_range(0..=i));
            }
            plan.extend(kinds.into_iter().map(|fault| Planned { fault, force_long: round == 0, retries: 0 }));
        }
        note(&mut sched, format!("smoke plan: {:?}", plan.iter().map(|p| p.fault).collect::<Vec<_>>()));
    }
    if !cluster.can_partition() {
        note(
            &mut sched,
            format!("WARNING: the cluster runs on {}: partition faults will be skipped", cluster.network_mode()),
        );
    }
    let mut anchors = 0u64;
    tokio::time::sleep(interval / 2).await;
    loop {
        let fault_started = Instant::now();
        // The same draws every round, whatever happens, so the schedule replays from the seed.
        let drawn = choices[rng.random_range(0..choices.len())];
        let down_for = Duration::from_millis(rng.random_range(1500..4500));
        let pick: u64 = rng.random();
        let long = rng.random_bool(0.75);
        let extra = Duration::from_millis(rng.random_range(1000..3000));
        let short = Duration::from_millis(rng.random_range(1000..2800));
        let to_leader = rng.random_bool(0.5);
        let planned = if ctx.settings.smoke {
            match plan.pop_front() {
                Some(p) => p,
                None => break,
            }
        } else {
            if until.is_some_and(|u| Instant::now() + interval >= u) {
                break;
            }
            Planned { fault: drawn, force_long: false, retries: 0 }
        };
        let fault = planned.fault;
        let long = long || planned.force_long;
        let leader = match cluster.status().await {
            Ok(s) => cluster.coordinator_index(s.leader_id),
            Err(_) => None,
        };
        let followers: Vec<usize> = (0..cluster.coordinators.len()).filter(|i| Some(*i) != leader).collect();
        let agent = (pick % cluster.agents.len().max(1) as u64) as usize;
        let target = match fault {
            Fault::KillLeader | Fault::FreezeLeader => leader.map(Target::Coordinator),
            Fault::KillFollower => (!followers.is_empty())
                .then(|| Target::Coordinator(followers[(pick % followers.len() as u64) as usize])),
            Fault::PartitionCoordinator => {
                if to_leader || followers.is_empty() {
                    leader.map(Target::Coordinator)
                } else {
                    Some(Target::Coordinator(followers[(pick % followers.len() as u64) as usize]))
                }
            }
            Fault::KillAgent | Fault::FreezeAgent | Fault::PartitionAgent => {
                (!cluster.agents.is_empty()).then_some(Target::Agent(agent))
            }
        };
        let partition = matches!(fault, Fault::PartitionAgent | Fault::PartitionCoordinator);
        let skip_reason = if partition && !cluster.can_partition() {
            Some(format!("network partitions are unavailable ({})", cluster.network_mode()))
        } else if target.is_none() {
            Some("no target (no leader known)".to_string())
        } else {
            None
        };
        if let Some(why) = skip_reason {
            note(&mut sched, format!("{fault:?}: {why}; skipped"));
            *sched.skipped.entry(fault).or_default() += 1;
            if ctx.settings.smoke && !partition && planned.retries < 2 {
                plan.push_back(Planned { retries: planned.retries + 1, ..planned });
            }
            tokio::time::sleep(interval).await;
            continue;
        }
        let target = target.expect("checked above");
        let name = cluster.proc(target).name.clone();
        *sched.injected.entry(fault).or_default() += 1;
        match fault {
            Fault::KillLeader | Fault::KillFollower => {
                let r = cluster.kill(target).await;
                note(&mut sched, format!("{fault:?}: SIGKILL {name} ({r:?}), restart in {down_for:.1?}"));
                tokio::time::sleep(down_for).await;
                let r = cluster.restart(target).await;
                note(
                    &mut sched,
                    format!("restart {name}: {}", if r.is_ok() { "ok".to_string() } else { format!("{r:?}") }),
                );
            }
            Fault::KillAgent | Fault::PartitionAgent => {
                let Target::Agent(i) = target else { unreachable!() };
                let node = cluster.agents[i].id.clone();
                // Sessions can only move when another agent runs.
                let others_up = cluster.agents.len() > 1;
                let check = long && others_up;
                if check {
                    if let Some(why) = ensure_anchors(ctx, &node, &mut anchors).await {
                        note(&mut sched, why);
                    }
                }
                let victims = if check { sessions_on(ctx, &node).await } else { Vec::new() };
                // Before a kill: files in some sessions' workspaces, made durable, must come back.
                let markers =
                    if check && fault == Fault::KillAgent { plant_markers(ctx, &victims).await } else { Vec::new() };
                if !markers.is_empty() {
                    note(&mut sched, format!("planted workspace markers in {} session(s) on {node}", markers.len()));
                }
                let injected = Instant::now();
                let (what, r) = if fault == Fault::KillAgent {
                    (format!("SIGKILL {name}"), cluster.kill(target).await.map(|s| s.to_string()))
                } else {
                    (
                        format!("cut {name} off from every coordinator"),
                        cluster.isolate_agent(i).await.map(|_| "ok".to_string()),
                    )
                };
                let hold = if check {
                    format!(
                        "until its {} session(s) run elsewhere (deadline {:.1?}), then {extra:.1?}",
                        victims.len(),
                        ctx.settings.move_deadline
                    )
                } else if long {
                    format!("{:.1?} (no other agent: no move check)", ctx.settings.move_deadline)
                } else {
                    format!("{short:.1?} (short)")
                };
                let r = r.unwrap_or_else(|e| format!("{e:#}"));
                note(&mut sched, format!("{fault:?}: {what} ({r}), for {hold}"));
                if check {
                    let report = watch_moves(ctx, &node, &victims, injected, fault == Fault::PartitionAgent).await;
                    note(&mut sched, report.summary.clone());
                    sched.move_times.extend(report.times.iter().copied());
                    let (checked, mut lost) = check_markers(ctx, &markers).await;
                    if !markers.is_empty() {
                        note(
                            &mut sched,
                            format!(
                                "workspace markers: {checked} of {} restored intact on the new node",
                                markers.len()
                            ),
                        );
                        sched.markers_checked += checked;
                    }
                    let mut report = report;
                    report.violations.append(&mut lost);
                    if !report.violations.is_empty() {
                        let mut l = ctx.ledger.lock().unwrap();
                        for v in report.violations {
                            l.violations
                                .push(format!("{v} [fault {fault:?} at t+{:.1}s]", (injected - start).as_secs_f64()));
                        }
                    }
                    tokio::time::sleep(extra).await;
                } else if long {
                    tokio::time::sleep(ctx.settings.move_deadline).await;
                } else {
                    tokio::time::sleep(short).await;
                }
                let r = if fault == Fault::KillAgent {
                    cluster.restart(target).await
                } else {
                    cluster.heal_target(target).await
                };
                let verb = if fault == Fault::KillAgent { "restart" } else { "heal" };
                note(
                    &mut sched,
                    format!("{verb} {name}: {}", if r.is_ok() { "ok".to_string() } else { format!("{r:?}") }),
                );
            }
            Fault::FreezeAgent | Fault::FreezeLeader => {
                use nix::sys::signal::Signal;
                let r = cluster.proc(target).signal(Signal::SIGSTOP);
                note(&mut sched, format!("{fault:?}: SIGSTOP {name} ({r:?}) for {down_for:.1?}"));
                tokio::time::sleep(down_for).await;
                let r = cluster.proc(target).signal(Signal::SIGCONT);
                note(&mut sched, format!("SIGCONT {name} ({r:?})"));
            }
            Fault::PartitionCoordinator => {
                let Target::Coordinator(i) = target else { unreachable!() };
                let role = if Some(i) == leader { "leader" } else { "follower" };
                let r = cluster.isolate_coordinator(i).await;
                note(
                    &mut sched,
                    format!(
                        "{fault:?}: cut {name} ({role}) off from the other coordinators ({r:?}) for {down_for:.1?}"
                    ),
                );
                tokio::time::sleep(down_for).await;
                let r = cluster.heal_target(target).await;
                note(
                    &mut sched,
                    format!("heal {name}: {}", if r.is_ok() { "ok".to_string() } else { format!("{r:?}") }),
                );
            }
        }
        // At least a moment of calm after each heal, so that a fault does not
        // hit a node that is still coming back from the previous one.
        tokio::time::sleep(interval.saturating_sub(fault_started.elapsed()).max(CALM)).await;
    }
    if let Err(e) = cluster.heal().await {
        note(&mut sched, format!("final heal failed: {e:#}"));
    }
    sched
}

/// A fault of the smoke plan.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub fault: Fault,
    /// Agent kills and partitions last until the sessions moved.
    pub force_long: bool,
    pub retries: u32,
}

/// Creates sessions (recorded like the workers' ones, never deleted, ended by
/// their short TTL) until
/// [`ANCHORS_PER_FAULT`] of the run's live sessions run on `node`, a few
/// attempts at most. Returns a note when it could not.
pub async fn ensure_anchors(ctx: &NemesisCtx<'_>, node: &str, counter: &mut u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    for _ in 0..8 {
        let have = sessions_on(ctx, node)
            .await
            .iter()
            .filter(|s| s.request_id.contains("-anchor-") && state_of(s) == proto::SessionState::Running)
            .count();
        if have >= ANCHORS_PER_FAULT || Instant::now() >= deadline {
            return None;
        }
        *counter += 1;
        let rid = format!("chaos-{}-anchor-{counter}", ctx.seed);
        let op = ctx.history.invoke(NEMESIS_CLIENT, Call::Create { request_id: rid.clone() });
        let r = ctx.client.create_session_full(spec(&rid, ctx.run).ttl(ANCHOR_TTL)).await;
        ctx.history.complete(op, create_outcome(&r));
        let sid = {
            let mut l = ctx.ledger.lock().unwrap();
            l.op("anchor-create", r.is_ok());
            match r.ok().and_then(|resp| resp.session) {
                Some(s) => {
                    l.acked.insert(rid, s.id.clone());
                    s.id
                }
                None => {
                    l.ambiguous.insert(rid);
                    continue;
                }
            }
        };
        let _ = ctx.client.wait_running(&sid, Duration::from_secs(10)).await;
    }
    let have = sessions_on(ctx, node).await.iter().filter(|s| s.request_id.contains("-anchor-")).count();
    (have < ANCHORS_PER_FAULT).then(|| format!("only {have} anchor session(s) on {node} before the fault"))
}

/// The run's live sessions placed on `node` right now.
pub async fn sessions_on(ctx: &NemesisCtx<'_>, node: &str) -> Vec<proto::Session> {
    match list_all_sessions(ctx.client, &[(RUN_LABEL, ctx.run)], &[]).await {
        Ok(all) => all.into_iter().filter(|s| s.node_id == node && !is_terminal(s)).collect(),
        Err(e) => {
            eprintln!("sandfleet-chaos: nemesis: cannot list the sessions on {node}: {e:#}");
            Vec::new()
        }
    }
}

/// A file planted in a session's workspace before its node is killed.
pub struct Marker {
    pub session: proto::Session,
    pub path: String,
    pub content: Vec<u8>,
}

/// Writes a marker file (through the file API, then copied by an exec) into
/// up to two of the runner's own anchor sessions and syncs their workspaces.
/// Milliseconds since the Unix epoch (session expiry times use it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A session whose calls fail (another fault may be under way) is left out.
pub async fn plant_markers(ctx: &NemesisCtx<'_>, victims: &[proto::Session]) -> Vec<Marker> {
    let mut out = Vec::new();
    // Only anchors with time to live left: one that its TTL ends during the check has nothing to restore.
    let live_until = now_ms() + 40_000;
    for s in victims
        .iter()
        .filter(|s| {
            s.request_id.contains("-anchor-")
                && state_of(s) == proto::SessionState::Running
                && s.expires_at_ms > live_until
        })
        .take(2)
    {
        let content: Vec<u8> = format!("marker {} {}\n", s.id, rand::random::<u64>()).into_bytes();
        let planted = async {
            ctx.client.write_file_bytes(s, "chaos/marker.txt", content.clone()).await?;
            let out = ctx
                .client
                .exec_collect(
                    s,
                    ExecRequest::argv(["cp", "chaos/marker.txt", "chaos/marker-exec.txt"])
                        .timeout(Duration::from_secs(10)),
                )
                .await?;
            if !out.success() {
                return Err(sandfleet::Error::InvalidArgument(format!("cp failed: {}", out.stderr_str())));
            }
            ctx.client.sync_workspace(s).await?;
            Ok::<_, sandfleet::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(20), planted).await {
            Ok(Ok(())) => out.push(Marker { session: s.clone(), path: "chaos/marker.txt".into(), content }),
            Ok(Err(e)) => eprintln!("sandfleet-chaos: nemesis: could not plant a marker in {}: {e}", s.id),
            Err(_) => eprintln!("sandfleet-chaos: nemesis: planting a marker in {} timed out", s.id),
        }
    }
    out
}

/// After the move check: every marked session now running elsewhere must have
/// both marker files, byte for byte. Returns how many were checked and the violations.
pub async fn check_markers(ctx: &NemesisCtx<'_>, markers: &[Marker]) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut violations = Vec::new();
    for m in markers {
        let now = match ctx.client.get_session(&m.session.id).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sandfleet-chaos: nemesis: cannot get {}: {e}", m.session.id);
                continue;
            }
        };
        if state_of(&now) != proto::SessionState::Running || now.generation <= m.session.generation {
            continue; // ended by its TTL, or not moved: nothing to restore (the move check judges moves)
        }
        checked += 1;
        for path in [m.path.as_str(), "chaos/marker-exec.txt"] {
            let mut last = String::new();
            let mut ok = false;
            // The new copy may still be starting right after the move check saw it RUNNING.
            for _ in 0..10 {
                match ctx.client.read_file_bytes(&now, path).await {
                    Ok(b) if b == m.content => {
                        ok = true;
                        break;
                    }
                    Ok(b) => {
                        last = format!("content differs ({} bytes)", b.len());
                        break;
                    }
                    Err(e) if e.code() == Some(tonic::Code::Unavailable) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        last = e.to_string();
                        break;
                    }
                }
            }
            if !ok {
                // Ended meanwhile (its TTL, or a client): its files went with it, as they should.
                if let Ok(after) = ctx.client.get_session(&m.session.id).await {
                    if is_terminal(&after) {
                        eprintln!(
                            "sandfleet-chaos: nemesis: {} ended during its marker check ({}); not counted",
                            m.session.id, after.message
                        );
                        checked -= 1;
                        break;
                    }
                }
                violations.push(format!(
                    "workspace of session {} not restored on {} (generation {}): {path}: {last}",
                    m.session.id, now.node_id, now.generation
                ));
            }
        }
    }
    (checked, violations)
}

pub struct MoveReport {
    pub summary: String,
    pub times: Vec<Duration>,
    pub violations: Vec<String>,
}

/// Live processes whose cgroup is the copy of session `sid` on `node`.
pub fn copy_processes(node: &str, sid: &str) -> Vec<i32> {
    sandfleet_testkit::host::processes_in_cgroup_matching(sid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid))
                .is_ok_and(|c| c.lines().any(|l| l.contains(node) && l.contains(sid)))
        })
        .map(|p| p.pid)
        .collect()
}

/// The invariant "the sessions of a dead or cut-off node run elsewhere within
/// a deadline": waits until every victim is RUNNING on another node with a
/// newer generation (or was deleted by a client), and checks that its old
/// copy is gone at that moment.
pub async fn watch_moves(
    ctx: &NemesisCtx<'_>,
    node: &str,
    victims: &[proto::Session],
    injected: Instant,
    partition: bool,
) -> MoveReport {
    let deadline = ctx.settings.move_deadline;
    let mut pending: Vec<&proto::Session> = victims.iter().collect();
    let mut times = Vec::new();
    let mut violations = Vec::new();
    let mut deleted = 0;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for old in pending {
            if ctx.ledger.lock().unwrap().delete_sent.contains(&old.id) {
                deleted += 1;
                continue;
            }
            let now = match ctx.client.get_session(&old.id).await {
                Ok(s) => s,
                Err(e) => {
                    last.insert(old.id.clone(), format!("GetSession failed: {e}"));
                    still.push(old);
                    continue;
                }
            };
            let took = injected.elapsed();
            if state_of(&now) == proto::SessionState::Running && now.node_id != node && now.generation > old.generation
            {
                times.push(took);
                let pids = copy_processes(node, &old.id);
                if !pids.is_empty() {
                    violations.push(format!(
                        "session {} runs on {} (generation {}) {took:.2?} after the fault while its old copy on {node} \
                         still has processes {pids:?}",
                        old.id, now.node_id, now.generation
                    ));
                }
                if partition {
                    let dirs: Vec<_> = sandfleet_testkit::host::cgroup_dirs_matching(&old.id)
                        .into_iter()
                        .filter(|d| d.to_string_lossy().contains(node))
                        .collect();
                    if !dirs.is_empty() {
                        violations.push(format!(
                            "session {} runs on {} (generation {}) {took:.2?} after {node} was cut off, but the cut-off \
                             node still has its copy (did not fence first): {dirs:?}",
                            old.id, now.node_id, now.generation
                        ));
                    }
                }
                continue;
            }
            // A session deleted by a client, or ended by its TTL (anchors live
            // 90 s), has nothing left to move.
            if is_terminal(&now)
                && (ctx.ledger.lock().unwrap().delete_sent.contains(&old.id) || now.message.contains("expired"))
            {
                deleted += 1;
                continue;
            }
            if is_terminal(&now) {
                violations.push(format!(
                    "session {} of {node} ended ({:?}: {:?}) {took:.2?} after the fault instead of running elsewhere",
                    old.id,
                    state_of(&now),
                    now.message
                ));
                continue;
            }
            last.insert(
                old.id.clone(),
                format!(
                    "{:?} on {:?} generation {} (was {}), pending reason {:?}",
                    state_of(&now),
                    now.node_id,
                    now.generation,
                    old.generation,
                    now.pending_reason
                ),
            );
            still.push(old);
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if injected.elapsed() >= deadline {
            for old in &pending {
                violations.push(format!(
                    "session {} of {node} is not RUNNING on another node {:.2?} after the node was {} \
                     (deadline {deadline:.1?}): {}",
                    old.id,
                    injected.elapsed(),
                    if partition { "cut off" } else { "killed" },
                    last.get(&old.id).map(String::as_str).unwrap_or("never read")
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max = times.iter().max().copied();
    let summary = format!(
        "moves: {} of {} session(s) of {node} RUNNING elsewhere{}{}{}",
        times.len(),
        victims.len(),
        max.map(|m| format!(", the last {m:.2?} after the fault")).unwrap_or_default(),
        if deleted > 0 { format!(", {deleted} deleted or expired meanwhile") } else { String::new() },
        if violations.is_empty() { String::new() } else { format!(", {} VIOLATION(S)", violations.len()) }
    );
    MoveReport { summary, times, violations }
}
