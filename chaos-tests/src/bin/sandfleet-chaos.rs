//! `sandfleet-chaos`: runs a seeded random workload against a real cluster
//! and checks the cluster's promises afterwards.
//!
//! ```text
//! sandfleet-chaos --coordinators 3 --agents 2 --duration 30s --seed 42
//! sandfleet-chaos --coordinators 3 --agents 2 --duration 2m --faults
//! sandfleet-chaos --smoke            # the CI preset: every fault kind once, ~2 minutes
//! sandfleet-chaos --cleanup-network  # remove leftovers of crashed runs, then exit
//! ```
//!
//! Workers create, re-send (idempotent retry), get, exec in and delete
//! sessions, each from its own RNG derived from the seed. Every create, get
//! and delete is recorded in a history that is checked for linearizability at
//! the end (`sandfleet_chaos::linearizability`). Also at the end, every create
//! the cluster acknowledged must be retrievable with its request id, no
//! request id may have produced two sessions, no session may appear that
//! nobody asked for, and acknowledged deletes must be TERMINATED. A violation
//! exits with status 1; rerun with the printed seed to replay the same
//! operation sequence per worker and the same fault schedule.
//!
//! With `--faults`, a nemesis injects one fault every `--fault-interval`,
//! chosen by the seed:
//! - SIGKILL of the leader, a follower or an agent (restarted a few seconds later);
//! - SIGSTOP of an agent or the leader (SIGCONT later);
//! - a network partition of an agent from every coordinator, or of one
//!   coordinator (the leader half the time) from the other coordinators
//!   (healed later). Partitions need the cluster in network namespaces (root,
//!   `ip`, `nsenter`, `iptables`); on loopback they are skipped with a message.
//!
//! Most agent kills and agent partitions last until the node's sessions run
//! elsewhere: every live session that was on the node must be RUNNING on
//! another node, with a newer generation, within `--move-deadline` (default
//! node TTL + 7 s, so 10 s with the default `--node-ttl 3s`), and at that moment
//! its old copy must be gone (no process left in its cgroup on the old node;
//! after a partition, no cgroup left at all: the agent fenced itself first).
//! The other agent faults are short, to exercise the paths where the node
//! comes back before it is declared down.
//!
//! After the workload the faults are healed and the runner also checks that
//! every coordinator converged to the same state digest, that every live
//! acknowledged session is RUNNING again, and that no session has a copy
//! (cgroups) on any node other than the one it is placed on.
//!
//! `--smoke` is `--coordinators 3 --agents 2 --workers 3 --max-live 3 --faults
//! --fault-interval 5s` with a schedule of two rounds of every fault kind, each
//! round in an order drawn from the seed (in the first round every agent kill
//! and agent partition waits for the node's sessions to move); the workload
//! runs until the schedule is done, about 100 s in all with startup and checks.
//! Before an agent fault whose moves are checked, the nemesis makes sure two
//! sessions of its own ("anchors", never deleted by the runner; a 90 s TTL ends
//! them) run on that node, since the
//! workers' sessions often live shorter than a node TTL. Without the sandbox
//! facilities the smoke run prints SKIPPED and exits 0, unless
//! `SANDFLEET_REQUIRE_FACILITIES=1`; on loopback (no namespaces) it skips the
//! partition faults with a warning, or fails when facilities are required.
//! `scripts/test` runs it after the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandfleet::{proto, Client, CreateSession, ExecRequest};
use sandfleet_chaos::linearizability::{Call, CheckResult, EndedBy, History, Outcome, Ret};
use sandfleet_chaos::s3::S3Server;
use sandfleet_chaos::testkit::{list_all_sessions, state_of};
use sandfleet_chaos::{require_sandbox_facilities, Cluster, ClusterBuilder, Target};

#[derive(Debug, Parser)]
#[command(name = "sandfleet-chaos", about = "Seeded workload and invariant checks against a real Sandfleet cluster")]
struct Args {
    /// Number of coordinators [default: 1; --smoke: 3].
    #[arg(long)]
    coordinators: Option<usize>,
    /// Number of node agents [default: 1; --smoke: 2].
    #[arg(long)]
    agents: Option<usize>,
    /// How long the workload runs (e.g. 30s, 5m) [default: 30s; --smoke: until
    /// every fault kind was injected once].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// RNG seed; random when not given. Printed either way.
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent workers [default: 4; --smoke: 3].
    #[arg(long)]
    workers: Option<usize>,
    /// Most live sessions per worker [default: 4; --smoke: 3].
    #[arg(long)]
    max_live: Option<usize>,
    /// Extra arguments for every agent (repeat, e.g. --agent-arg=--slots --agent-arg=16).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Extra arguments for every coordinator (repeat). Without any, the runner
    /// uses a 500ms agent heartbeat and a 3s node TTL so faults heal quickly.
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
    /// Inject faults (kills, freezes and network partitions) during the workload.
    #[arg(long)]
    faults: bool,
    /// Time between two faults [default: 6s; --smoke: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    fault_interval: Option<Duration>,
    /// How long after an agent is killed or cut off its sessions may take to
    /// run elsewhere [default: node TTL + 7s].
    #[arg(long, value_parser = humantime::parse_duration)]
    move_deadline: Option<Duration>,
    /// The CI preset: 3 coordinators, 2 agents, faults, every fault kind twice (~100 s).
    #[arg(long)]
    smoke: bool,
    /// Where agents keep workspaces: `s3` (a test S3 server the runner starts)
    /// or `local` (a directory the agents share) [default: s3].
    #[arg(long, default_value = "s3", value_parser = ["s3", "local"])]
    workspace_store: String,
    /// Remove network namespaces, bridges and iptables rules left by crashed
    /// runs (whose owner process is gone), then exit.
    #[arg(long)]
    cleanup_network: bool,
    /// Keep the cluster directory (logs, data) even when everything passes.
    #[arg(long)]
    keep: bool,
}

/// [`Args`] with the defaults of the chosen mode applied.
#[derive(Debug, Clone)]
struct Settings {
    coordinators: usize,
    agents: usize,
    duration: Option<Duration>,
    workers: usize,
    max_live: usize,
    faults: bool,
    fault_interval: Duration,
    smoke: bool,
    node_ttl: Duration,
    move_deadline: Duration,
    coordinator_args: Vec<String>,
}

impl Settings {
    fn from(args: &Args) -> Settings {
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
fn flag_duration(args: &[String], flag: &str) -> Option<Duration> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = if a == flag { it.next().cloned() } else { a.strip_prefix(&format!("{flag}=")).map(str::to_string) };
        if let Some(v) = v {
            return humantime::parse_duration(&v).ok();
        }
    }
    None
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillLeader,
    KillFollower,
    KillAgent,
    FreezeAgent,
    FreezeLeader,
    PartitionAgent,
    PartitionCoordinator,
}

const ALL_FAULTS: [Fault; 7] = [
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
struct Schedule {
    /// One line per event, with its time.
    lines: Vec<String>,
    /// Faults injected (not skipped), per kind.
    injected: BTreeMap<Fault, u32>,
    /// Faults of the plan that could not be injected, per kind.
    skipped: BTreeMap<Fault, u32>,
    /// How long the moved sessions took, over all checked agent faults.
    move_times: Vec<Duration>,
    /// Sessions whose planted workspace files were checked after a move.
    markers_checked: usize,
}

/// The nemesis's view of the workload: what it needs to check moves.
struct NemesisCtx<'a> {
    client: &'a Client,
    ledger: &'a Shared,
    history: &'a History,
    run: &'a str,
    seed: u64,
    settings: &'a Settings,
}

/// The least time between the end of one fault and the start of the next.
const CALM: Duration = Duration::from_millis(1500);

/// The client id of the nemesis's own operations in the history.
const NEMESIS_CLIENT: u64 = 0;
/// Sessions the nemesis keeps on a node before killing or cutting it off, so
/// that the move check has something to move even when the workers' sessions
/// churn faster than a node TTL.
const ANCHORS_PER_FAULT: usize = 2;

/// Injects the seeded fault schedule, healing each fault before the next:
/// until `until` (drawing each fault from the seed), or in smoke mode through
/// two seeded permutations of every fault kind. Returns the schedule as it happened.
async fn nemesis(cluster: &mut Cluster, ctx: &NemesisCtx<'_>, seed: u64, until: Option<Instant>) -> Schedule {
    let interval = ctx.settings.fault_interval;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6E65_6D65_7369_73);
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
struct Planned {
    fault: Fault,
    /// Agent kills and partitions last until the sessions moved.
    force_long: bool,
    retries: u32,
}

/// Creates sessions (recorded like the workers' ones, never deleted, ended by
/// their short TTL) until
/// [`ANCHORS_PER_FAULT`] of the run's live sessions run on `node`, a few
/// attempts at most. Returns a note when it could not.
async fn ensure_anchors(ctx: &NemesisCtx<'_>, node: &str, counter: &mut u64) -> Option<String> {
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
        match &r {
            Ok(resp) => match &resp.session {
                Some(s) => ctx.history.complete(op, Outcome::Ok(Ret::Created { session_id: s.id.clone() })),
                None => ctx.history.complete(op, Outcome::Unknown),
            },
            Err(e) => ctx.history.complete(op, outcome_of(e)),
        }
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
async fn sessions_on(ctx: &NemesisCtx<'_>, node: &str) -> Vec<proto::Session> {
    match list_all_sessions(ctx.client, &[(RUN_LABEL, ctx.run)], &[]).await {
        Ok(all) => all.into_iter().filter(|s| s.node_id == node && !is_terminal(s)).collect(),
        Err(e) => {
            eprintln!("sandfleet-chaos: nemesis: cannot list the sessions on {node}: {e:#}");
            Vec::new()
        }
    }
}

fn is_terminal(s: &proto::Session) -> bool {
    matches!(state_of(s), proto::SessionState::Terminated | proto::SessionState::Failed)
}

/// A file planted in a session's workspace before its node is killed.
struct Marker {
    session: proto::Session,
    path: String,
    content: Vec<u8>,
}

/// Writes a marker file (through the file API, then copied by an exec) into
/// up to two of the runner's own anchor sessions and syncs their workspaces.
/// Milliseconds since the Unix epoch (session expiry times use it).
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A session whose calls fail (another fault may be under way) is left out.
async fn plant_markers(ctx: &NemesisCtx<'_>, victims: &[proto::Session]) -> Vec<Marker> {
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
async fn check_markers(ctx: &NemesisCtx<'_>, markers: &[Marker]) -> (usize, Vec<String>) {
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

struct MoveReport {
    summary: String,
    times: Vec<Duration>,
    violations: Vec<String>,
}

/// Live processes whose cgroup is the copy of session `sid` on `node`.
fn copy_processes(node: &str, sid: &str) -> Vec<i32> {
    sandfleet_chaos::host::processes_in_cgroup_matching(sid)
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
async fn watch_moves(
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
                    let dirs: Vec<_> = sandfleet_chaos::host::cgroup_dirs_matching(&old.id)
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

/// After the faults: all coordinators agree, live sessions run again, and no
/// session has a copy on a node it is not placed on.
async fn verify_after_faults(cluster: &mut Cluster, client: &Client, run: &str, ledger: &Ledger) -> Vec<String> {
    let mut violations = Vec::new();
    if let Err(e) = cluster.wait_converged(Duration::from_secs(60)).await {
        violations.push(format!("coordinators did not converge to one state digest: {e:#}"));
    }
    let live: Vec<&String> = ledger.acked.values().filter(|sid| !ledger.deleted.contains(*sid)).collect();
    // Checked 32 at a time, each with its own 60 s: one slow session must not hold up the rest.
    let not_running: Vec<String> = futures::stream::iter(live)
        .map(|sid| async move {
            // A session whose delete failed stays live until its TTL; expiry is not a fault.
            if let Ok(s) = client.get_session(sid).await {
                if state_of(&s) == proto::SessionState::Terminated && s.message.contains("expired") {
                    return None;
                }
                // A delete whose answer was lost may still have happened.
                if state_of(&s) == proto::SessionState::Terminated && ledger.delete_sent.contains(sid) {
                    return None;
                }
            }
            match client.wait_running(sid, Duration::from_secs(60)).await {
                Ok(_) => None,
                Err(e) => Some(format!("live session {sid} is not RUNNING again after the faults: {e}")),
            }
        })
        .buffer_unordered(32)
        .filter_map(|v| async move { v })
        .collect()
        .await;
    violations.extend(not_running);
    // Give agents one fencing window to stop superseded copies, then look.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes: Vec<String> = cluster.agents.iter().map(|a| a.id.clone()).collect();
    let Ok(sessions) = list_all_sessions(client, &[(RUN_LABEL, run)], &[]).await else {
        violations.push("cannot list sessions after the faults".into());
        return violations;
    };
    let copies_ok = |s: &proto::Session| {
        let dirs = sandfleet_chaos::host::cgroup_dirs_matching(&s.id);
        let copies: BTreeSet<String> =
            nodes.iter().filter(|n| dirs.iter().any(|d| d.to_string_lossy().contains(n.as_str()))).cloned().collect();
        let running = state_of(s) == proto::SessionState::Running;
        let ok = if running {
            copies.len() == 1 && copies.contains(&s.node_id)
        } else if s.state == proto::SessionState::Terminated as i32 || s.state == proto::SessionState::Failed as i32 {
            copies.is_empty()
        } else {
            copies.len() <= 1
        };
        (ok, copies)
    };
    for s in &sessions {
        let (mut ok, mut copies) = copies_ok(s);
        let mut s = s.clone();
        if !ok {
            // The list is a moment old: a session may have expired (TTL) or its
            // teardown may still be running. Look again before calling it a violation.
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Ok(now) = client.get_session(&s.id).await {
                s = now;
            }
            (ok, copies) = copies_ok(&s);
        }
        if !ok {
            violations.push(format!(
                "session {} ({:?} on {:?}, generation {}) has copies on {copies:?}",
                s.id,
                state_of(&s),
                s.node_id,
                s.generation
            ));
        }
    }
    violations
}

#[derive(Debug, Default)]
struct Ledger {
    /// request id -> session id, for every create the cluster acknowledged.
    acked: BTreeMap<String, String>,
    /// request ids whose create failed: the session may or may not exist.
    ambiguous: BTreeSet<String>,
    /// session ids whose delete the cluster acknowledged.
    deleted: BTreeSet<String>,
    /// session ids a delete was sent for (acknowledged or not).
    delete_sent: BTreeSet<String>,
    violations: Vec<String>,
    ops: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
}

impl Ledger {
    fn op(&mut self, name: &'static str, ok: bool) {
        *self.ops.entry(name).or_default() += 1;
        if !ok {
            *self.errors.entry(name).or_default() += 1;
        }
    }
}

type Shared = Arc<Mutex<Ledger>>;

const RUN_LABEL: &str = "chaos-run";

fn spec(request_id: &str, run: &str) -> CreateSession {
    CreateSession::new()
        .request_id(request_id.to_string())
        .memory_bytes(64 << 20)
        .cpu_millis(100)
        .pids_limit(64)
        .ttl(Duration::from_secs(900))
        .label(RUN_LABEL, run.to_string())
}

/// Anchors are only needed until their fault's move check (at most the move
/// deadline); a short TTL keeps them from filling the nodes over a long run.
const ANCHOR_TTL: Duration = Duration::from_secs(90);

/// How a failed call goes into the history: `Failed` only when the server
/// definitely rejected it (so it cannot have taken effect), else `Unknown`.
fn outcome_of(e: &sandfleet::Error) -> Outcome {
    use tonic::Code::*;
    match e.code() {
        Some(
            InvalidArgument | AlreadyExists | FailedPrecondition | PermissionDenied | Unauthenticated | OutOfRange
            | Unimplemented,
        ) => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

fn ended_of(s: &proto::Session) -> Option<EndedBy> {
    is_terminal(s).then(|| EndedBy::from_message(&s.message))
}

/// One worker's fixed inputs.
#[derive(Clone)]
struct WorkerCtx {
    seed: u64,
    run: String,
    client: Client,
    ledger: Shared,
    history: History,
    stop: Arc<AtomicBool>,
    max_live: usize,
    faults: bool,
}

async fn worker(id: usize, ctx: WorkerCtx) {
    let WorkerCtx { seed, run, client, ledger, history, stop, max_live, faults } = ctx;
    let me = id as u64 + 1;
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut live: Vec<String> = Vec::new();
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let roll = rng.random_range(0..100);
        if roll < 40 || live.is_empty() {
            if live.len() >= max_live {
                let i = rng.random_range(0..live.len());
                delete(&client, &ledger, &history, me, live.swap_remove(i)).await;
                continue;
            }
            let rid = format!("chaos-{seed}-w{id}-{n}");
            let op = history.invoke(me, Call::Create { request_id: rid.clone() });
            let r = client.create_session_full(spec(&rid, &run)).await;
            match &r {
                Ok(resp) => match &resp.session {
                    Some(s) => history.complete(op, Outcome::Ok(Ret::Created { session_id: s.id.clone() })),
                    None => history.complete(op, Outcome::Unknown),
                },
                Err(e) => history.complete(op, outcome_of(e)),
            }
            match r {
                Ok(resp) => {
                    let mut l = ledger.lock().unwrap();
                    l.op("create", true);
                    match resp.session {
                        Some(s) => {
                            // existing=true on a fresh request id means the SDK retried
                            // after an attempt that committed but whose answer was lost
                            // (a fault): correct, as long as it is this request's session.
                            if s.request_id != rid {
                                l.violations.push(format!(
                                    "create {rid}: answered with session {} of request id {:?}",
                                    s.id, s.request_id
                                ));
                            }
                            if resp.existing {
                                l.op("create-retried-by-sdk", true);
                            }
                            l.acked.insert(rid.clone(), s.id.clone());
                            live.push(s.id.clone());
                            mine.push((rid, s.id));
                        }
                        None => l.violations.push(format!("create {rid}: response without a session")),
                    }
                }
                Err(e) => {
                    let mut l = ledger.lock().unwrap();
                    l.op("create", false);
                    l.ambiguous.insert(rid.clone());
                    eprintln!("worker {id}: create {rid} failed: {e}");
                }
            }
        } else if roll < 50 && !mine.is_empty() {
            // An idempotent retry of an acknowledged create.
            let (rid, sid) = mine[rng.random_range(0..mine.len())].clone();
            let op = history.invoke(me, Call::Create { request_id: rid.clone() });
            let r = client.create_session_full(spec(&rid, &run)).await;
            match &r {
                Ok(resp) => match &resp.session {
                    Some(s) => history.complete(op, Outcome::Ok(Ret::Created { session_id: s.id.clone() })),
                    None => history.complete(op, Outcome::Unknown),
                },
                Err(e) => history.complete(op, outcome_of(e)),
            }
            let mut l = ledger.lock().unwrap();
            l.op("retry-create", r.is_ok());
            if let Ok(resp) = r {
                let got = resp.session.map(|s| s.id).unwrap_or_default();
                if got != sid || !resp.existing {
                    l.violations.push(format!(
                        "retried create {rid}: got session {got:?} existing={} but the first create returned {sid}",
                        resp.existing
                    ));
                }
            }
        } else if roll < 62 && !mine.is_empty() {
            // A linearizable read of one of this worker's sessions, live or deleted.
            let (_, sid) = mine[rng.random_range(0..mine.len())].clone();
            let op = history.invoke(me, Call::Get { session_id: sid.clone() });
            let r = client.get_session(&sid).await;
            match &r {
                Ok(s) => history.complete(op, Outcome::Ok(Ret::Found { ended: ended_of(s) })),
                Err(e) if e.code() == Some(tonic::Code::NotFound) => history.complete(op, Outcome::Ok(Ret::NotFound)),
                Err(e) => history.complete(op, outcome_of(e)),
            }
            let mut l = ledger.lock().unwrap();
            l.op("get", r.is_ok());
            if let Ok(s) = &r {
                if s.id != sid {
                    l.violations.push(format!("get {sid}: answered with session {}", s.id));
                }
            }
        } else if roll < 82 {
            let sid = live[rng.random_range(0..live.len())].clone();
            let token = format!("{}", rng.random_range(0..1_000_000u32));
            let result = async {
                let s = client.wait_running(&sid, Duration::from_secs(30)).await?;
                client
                    .exec_collect(&s, ExecRequest::argv(["echo", token.as_str()]).timeout(Duration::from_secs(20)))
                    .await
            }
            .await;
            let mut l = ledger.lock().unwrap();
            l.op("exec", result.is_ok());
            match result {
                // Under faults a session's copy can be stopped mid-exec (its node was
                // declared down, or the agent fenced itself): the exec dies with SIGKILL.
                Ok(out) if faults && out.exit.signal == 9 => l.op("exec-killed-by-fault", true),
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if out.exit.exit_code != 0 || text != format!("{token}\n") {
                        l.violations.push(format!(
                            "exec echo {token} in {sid}: exit {:?}, stdout {text:?}, stderr {:?}",
                            out.exit,
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                Err(e) => eprintln!("worker {id}: exec in {sid} failed: {e}"),
            }
        } else {
            let i = rng.random_range(0..live.len());
            delete(&client, &ledger, &history, me, live.swap_remove(i)).await;
        }
    }
}

async fn delete(client: &Client, ledger: &Shared, history: &History, me: u64, sid: String) {
    ledger.lock().unwrap().delete_sent.insert(sid.clone());
    let op = history.invoke(me, Call::Delete { session_id: sid.clone() });
    let r = client.delete_session(&sid).await;
    match &r {
        Ok(s) => history.complete(op, Outcome::Ok(Ret::Deleted { ended: ended_of(s) })),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => history.complete(op, Outcome::Ok(Ret::NotFound)),
        Err(e) => history.complete(op, outcome_of(e)),
    }
    let mut l = ledger.lock().unwrap();
    l.op("delete", r.is_ok());
    match r {
        Ok(_) => {
            l.deleted.insert(sid);
        }
        Err(e) => eprintln!("delete {sid} failed: {e}"),
    }
}

/// Checks the cluster's promises against the ledger; returns the violations found.
async fn verify(client: &Client, run: &str, ledger: &Ledger) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    for (rid, sid) in &ledger.acked {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        let got = loop {
            match client.get_session(sid).await {
                Ok(s) => break Some(s),
                Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                    last = Some(e.to_string());
                    break None;
                }
                Err(e) => last = Some(e.to_string()),
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match got {
            None => violations.push(format!("acknowledged create {rid} -> {sid} is not retrievable: {last:?}")),
            Some(s) => {
                if s.request_id != *rid {
                    violations.push(format!("session {sid} has request id {:?}, created with {rid}", s.request_id));
                }
                if ledger.deleted.contains(sid) && state_of(&s) != proto::SessionState::Terminated {
                    violations.push(format!("session {sid} was deleted but is {:?}", state_of(&s)));
                }
            }
        }
    }
    let listed = list_all_sessions(client, &[(RUN_LABEL, run)], &[]).await?;
    let mut by_rid: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &listed {
        by_rid.entry(s.request_id.as_str()).or_default().push(s.id.as_str());
    }
    for (rid, ids) in &by_rid {
        if ids.len() > 1 {
            violations.push(format!("request id {rid} produced {} sessions: {ids:?}", ids.len()));
        }
        if !ledger.acked.contains_key(*rid) && !ledger.ambiguous.contains(*rid) {
            violations.push(format!("session(s) {ids:?} with request id {rid} that no worker sent"));
        }
    }
    let listed_ids: BTreeSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    for (rid, sid) in &ledger.acked {
        if !listed_ids.contains(sid.as_str()) {
            violations.push(format!("acknowledged session {sid} ({rid}) is missing from ListSessions"));
        }
    }
    Ok(violations)
}

/// Runs the linearizability check off the async threads; a non-`Ok` verdict is a violation.
async fn check_history(history: &History) -> (String, Option<String>) {
    let h = history.clone();
    let started = Instant::now();
    let verdict = tokio::task::spawn_blocking(move || h.check()).await;
    let took = started.elapsed();
    let n = history.len();
    match verdict {
        Ok(CheckResult::Ok) => (format!("linearizable ({n} operations, checked in {took:.1?})"), None),
        Ok(other) => {
            let mut text = other.to_string();
            if text.len() > 20_000 {
                let mut end = 20_000;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push_str("\n... (truncated)");
            }
            (
                format!("NOT shown linearizable ({n} operations, {took:.1?})"),
                Some(format!("linearizability check of {n} create/get/delete operations: {text}")),
            )
        }
        Err(e) => (format!("checker crashed: {e}"), Some(format!("linearizability checker crashed: {e}"))),
    }
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn facilities_required() -> bool {
    std::env::var(sandfleet_chaos::facilities::REQUIRE_ENV).is_ok_and(|v| v == "1")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.cleanup_network {
        return match sandfleet_chaos::netns::cleanup_stale() {
            Ok(removed) => {
                for r in &removed {
                    println!("sandfleet-chaos: removed {r}");
                }
                println!("sandfleet-chaos: {} stale network(s) removed", removed.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sandfleet-chaos: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    println!("sandfleet-chaos: seed {seed} (replay with --seed {seed}{})", if args.smoke { " --smoke" } else { "" });
    if !require_sandbox_facilities() {
        eprintln!("sandfleet-chaos: cannot run without the sandbox facilities above");
        if args.smoke {
            // Like the tests: skipped (and said so loudly) unless facilities are required.
            println!("sandfleet-chaos: smoke run SKIPPED (facility missing)");
            return ExitCode::SUCCESS;
        }
        return ExitCode::from(2);
    }
    let started = Instant::now();
    // On SIGINT/SIGTERM the run is dropped, and with it the cluster: its
    // processes are stopped and its namespaces, bridge and rules removed.
    let result = tokio::select! {
        r = run(&args, seed) => r,
        sig = interrupted() => Err(anyhow::anyhow!("interrupted by {sig}; cluster stopped and cleaned up")),
    };
    println!("sandfleet-chaos: wall time {:.1?}", started.elapsed());
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sandfleet-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args, seed: u64) -> Result<bool> {
    let settings = Settings::from(args);
    // Workspaces go to a real S3 server (s3s-fs, its own process) unless asked otherwise.
    let s3_dir = tempfile::tempdir()?;
    let s3 = if args.workspace_store == "s3" { Some(S3Server::start(s3_dir.path()).await?) } else { None };
    let mut builder = ClusterBuilder::new()
        .coordinators(settings.coordinators)
        .agents(settings.agents)
        .agent_args(args.agent_args.clone())
        .coordinator_args(settings.coordinator_args.clone());
    if let Some(s3) = &s3 {
        builder = builder.agent_args(s3.agent_args("chaos"));
        for (k, v) in S3Server::env() {
            builder = builder.env(k, v);
        }
        println!("sandfleet-chaos: workspaces in a test S3 server on port {}", s3.port());
    }
    let mut cluster = builder.start().await?;
    println!(
        "sandfleet-chaos: cluster of {} coordinator(s) and {} agent(s) up in {} ({}{})",
        settings.coordinators,
        settings.agents,
        cluster.dir().display(),
        cluster.network_mode(),
        cluster.network().map(|n| format!(", bridge {} at {}", n.bridge(), n.gateway())).unwrap_or_default()
    );
    if settings.faults {
        println!(
            "sandfleet-chaos: faults every {:.1?}; node TTL {:.1?}, move deadline {:.1?}",
            settings.fault_interval, settings.node_ttl, settings.move_deadline
        );
    }
    if settings.smoke && !cluster.can_partition() {
        if facilities_required() {
            anyhow::bail!("the smoke run needs network namespaces for its partition faults");
        }
        println!("sandfleet-chaos: WARNING: partitions unavailable; the smoke run skips its partition faults");
    }
    let client = cluster.try_client().await?;
    let run = seed.to_string();
    let ledger: Shared = Arc::default();
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let until = settings.duration.map(|d| started + d);
    let mut tasks = Vec::new();
    let ctx = WorkerCtx {
        seed,
        run: run.clone(),
        client: client.clone(),
        ledger: ledger.clone(),
        history: history.clone(),
        stop: stop.clone(),
        max_live: settings.max_live,
        faults: settings.faults,
    };
    for w in 0..settings.workers {
        tasks.push(tokio::spawn(worker(w, ctx.clone())));
    }
    drop(ctx);
    let schedule = if settings.faults {
        let nctx =
            NemesisCtx { client: &client, ledger: &ledger, history: &history, run: &run, seed, settings: &settings };
        let s = nemesis(&mut cluster, &nctx, seed, until).await;
        // A little load after the last heal.
        tokio::time::sleep(Duration::from_secs(2)).await;
        s
    } else {
        Schedule::default()
    };
    if let Some(u) = until {
        tokio::time::sleep_until(u.into()).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();

    let mut ledger =
        Arc::try_unwrap(ledger).map_err(|_| anyhow::anyhow!("workers still hold the ledger"))?.into_inner().unwrap();
    let found = verify(&client, &run, &ledger).await?;
    ledger.violations.extend(found);
    if settings.faults {
        let found = verify_after_faults(&mut cluster, &client, &run, &ledger).await;
        ledger.violations.extend(found);
    }
    let (lin_summary, lin_violation) = check_history(&history).await;
    ledger.violations.extend(lin_violation);
    if settings.smoke {
        let wanted: Vec<Fault> = if settings.coordinators >= 3 {
            ALL_FAULTS.to_vec()
        } else {
            vec![Fault::KillAgent, Fault::FreezeAgent, Fault::PartitionAgent]
        };
        for k in wanted {
            let partition = matches!(k, Fault::PartitionAgent | Fault::PartitionCoordinator);
            if !schedule.injected.contains_key(&k) && !(partition && !cluster.can_partition()) {
                ledger.violations.push(format!("smoke schedule incomplete: {k:?} was never injected"));
            }
        }
        // The SIGKILL-and-restore scenario must have run at least once.
        if schedule.markers_checked == 0 {
            ledger.violations.push("smoke schedule incomplete: no workspace was checked after an agent kill".into());
        }
    }

    println!("sandfleet-chaos: summary (seed {seed}, workload {elapsed:.1?})");
    for (op, n) in &ledger.ops {
        println!("  {op:<21} {n:>6} ops, {:>4} errors", ledger.errors.get(op).copied().unwrap_or(0));
    }
    let injected: u32 = schedule.injected.values().sum();
    let skipped: u32 = schedule.skipped.values().sum();
    println!(
        "  acknowledged creates {}, ambiguous creates {}, acknowledged deletes {}, faults {injected} ({}), skipped {skipped}",
        ledger.acked.len(),
        ledger.ambiguous.len(),
        ledger.deleted.len(),
        schedule.injected.iter().map(|(k, n)| format!("{k:?} x{n}")).collect::<Vec<_>>().join(", ")
    );
    if let Some(max) = schedule.move_times.iter().max() {
        println!(
            "  sessions moved off killed/cut-off nodes: {}, slowest {max:.2?} (deadline {:.1?})",
            schedule.move_times.len(),
            settings.move_deadline
        );
    }
    if schedule.markers_checked > 0 {
        println!("  workspaces restored intact after agent kills: {} session(s) checked", schedule.markers_checked);
    }
    println!("  history: {lin_summary}");
    if ledger.violations.is_empty() {
        println!("sandfleet-chaos: OK, no violations");
        if args.keep {
            println!("sandfleet-chaos: cluster directory kept in {}", cluster.keep_dir().display());
        }
        cluster.shutdown().await?;
        Ok(true)
    } else {
        println!("sandfleet-chaos: {} VIOLATION(S) (seed {seed}):", ledger.violations.len());
        for v in &ledger.violations {
            println!("  - {v}");
        }
        if !schedule.lines.is_empty() {
            println!("sandfleet-chaos: fault schedule (seed {seed}):");
            for line in &schedule.lines {
                println!("  {line}");
            }
        }
        let dir = cluster.keep_dir();
        cluster.print_logs(40);
        println!(
            "sandfleet-chaos: logs and data kept in {}; replay with --seed {seed}{}",
            dir.display(),
            if args.smoke { " --smoke" } else { "" }
        );
        Ok(false)
    }
}
