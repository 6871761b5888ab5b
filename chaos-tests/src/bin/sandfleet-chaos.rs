//! `sandfleet-chaos`: runs a seeded random workload against a real cluster
//! and checks the cluster's promises afterwards.
//!
//! ```text
//! sandfleet-chaos --coordinators 3 --agents 2 --duration 30s --seed 42
//! ```
//!
//! Workers create, re-send (idempotent retry), exec in and delete sessions,
//! each from its own RNG derived from the seed. At the end every create the
//! cluster acknowledged must be retrievable with its request id, no request
//! id may have produced two sessions, no session may appear that nobody
//! asked for, and acknowledged deletes must be TERMINATED. A violation exits
//! with status 1; rerun with the printed seed to replay the same operation
//! sequence per worker and the same fault schedule.
//!
//! With `--faults`, a nemesis injects one fault every `--fault-interval`,
//! chosen by the seed: SIGKILL of the leader, a follower or an agent (restarted
//! a few seconds later), or SIGSTOP of an agent or the leader (SIGCONT later).
//! After the workload the faults are healed and the runner also checks that
//! every coordinator converged to the same state digest, that every live
//! acknowledged session is RUNNING again, and that no session has a copy
//! (cgroups) on any node other than the one it is placed on.
//! Not yet: network partitions and a linearizability checker.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandfleet::{proto, Client, CreateSession, ExecRequest};
use sandfleet_chaos::testkit::{list_all_sessions, state_of};
use sandfleet_chaos::{require_sandbox_facilities, ClusterBuilder};

#[derive(Debug, Parser)]
#[command(
    name = "sandfleet-chaos",
    about = "Seeded workload and invariant checks against a real Sandfleet cluster"
)]
struct Args {
    /// Number of coordinators.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// Number of node agents.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// How long the workload runs (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// RNG seed; random when not given. Printed either way.
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Most live sessions per worker.
    #[arg(long, default_value_t = 4)]
    max_live: usize,
    /// Extra arguments for every agent (repeat, e.g. --agent-arg=--slots --agent-arg=16).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Extra arguments for every coordinator (repeat). Without any, the runner
    /// uses a 500ms agent heartbeat and a 3s node TTL so faults heal quickly.
    #[arg(long = "coordinator-arg", allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
    /// Inject faults (kills and freezes of coordinators and agents) during the workload.
    #[arg(long)]
    faults: bool,
    /// Time between two faults.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    fault_interval: Duration,
    /// Keep the cluster directory (logs, data) even when everything passes.
    #[arg(long)]
    keep: bool,
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillLeader,
    KillFollower,
    KillAgent,
    FreezeAgent,
    FreezeLeader,
}

/// Injects the seeded fault schedule until `until`, healing each fault before
/// the next; returns the schedule as it happened.
async fn nemesis(cluster: &mut sandfleet_chaos::Cluster, seed: u64, interval: Duration, until: Instant) -> Vec<String> {
    use nix::sys::signal::Signal;
    use sandfleet_chaos::Target;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6E65_6D65_7369_73);
    let start = Instant::now();
    let mut log = Vec::new();
    let note = |log: &mut Vec<String>, what: String| {
        let line = format!("t+{:>6.1}s {what}", start.elapsed().as_secs_f64());
        println!("sandfleet-chaos: fault {line}");
        log.push(line);
    };
    tokio::time::sleep(interval / 2).await;
    while Instant::now() + interval < until {
        let choices: &[Fault] = if cluster.coordinators.len() >= 3 {
            &[Fault::KillLeader, Fault::KillFollower, Fault::KillAgent, Fault::FreezeAgent, Fault::FreezeLeader]
        } else {
            &[Fault::KillAgent, Fault::FreezeAgent]
        };
        let fault = choices[rng.random_range(0..choices.len())];
        let down_for = Duration::from_millis(rng.random_range(1500..4500));
        let leader = match cluster.status().await {
            Ok(s) => cluster.coordinator_index(s.leader_id),
            Err(_) => None,
        };
        let target = match fault {
            Fault::KillLeader | Fault::FreezeLeader => leader.map(Target::Coordinator),
            Fault::KillFollower => {
                let followers: Vec<usize> = (0..cluster.coordinators.len()).filter(|i| Some(*i) != leader).collect();
                (!followers.is_empty()).then(|| Target::Coordinator(followers[rng.random_range(0..followers.len())]))
            }
            Fault::KillAgent | Fault::FreezeAgent => Some(Target::Agent(rng.random_range(0..cluster.agents.len()))),
        };
        let Some(target) = target else {
            note(&mut log, format!("{fault:?}: no target (no leader known); skipped"));
            tokio::time::sleep(interval).await;
            continue;
        };
        let name = cluster.proc(target).name.clone();
        match fault {
            Fault::KillLeader | Fault::KillFollower | Fault::KillAgent => {
                let r = cluster.kill(target).await;
                note(&mut log, format!("{fault:?}: SIGKILL {name} ({r:?}), restart in {down_for:.1?}"));
                tokio::time::sleep(down_for).await;
                let r = cluster.restart(target).await;
                note(&mut log, format!("restart {name}: {}", if r.is_ok() { "ok".to_string() } else { format!("{r:?}") }));
            }
            Fault::FreezeAgent | Fault::FreezeLeader => {
                let r = cluster.proc(target).signal(Signal::SIGSTOP);
                note(&mut log, format!("{fault:?}: SIGSTOP {name} ({r:?}) for {down_for:.1?}"));
                tokio::time::sleep(down_for).await;
                let r = cluster.proc(target).signal(Signal::SIGCONT);
                note(&mut log, format!("SIGCONT {name} ({r:?})"));
            }
        }
        tokio::time::sleep(interval.saturating_sub(down_for)).await;
    }
    log
}

/// After the faults: all coordinators agree, live sessions run again, and no
/// session has a copy on a node it is not placed on.
async fn verify_after_faults(cluster: &mut sandfleet_chaos::Cluster, client: &Client, run: &str, ledger: &Ledger) -> Vec<String> {
    let mut violations = Vec::new();
    if let Err(e) = cluster.wait_converged(Duration::from_secs(60)).await {
        violations.push(format!("coordinators did not converge to one state digest: {e:#}"));
    }
    let live: Vec<&String> = ledger.acked.values().filter(|sid| !ledger.deleted.contains(*sid)).collect();
    for sid in &live {
        // A session whose delete failed stays live until its TTL; expiry is not a fault.
        if let Ok(s) = client.get_session(sid).await {
            if state_of(&s) == proto::SessionState::Terminated && s.message.contains("expired") {
                continue;
            }
        }
        if let Err(e) = client.wait_running(sid, Duration::from_secs(60)).await {
            violations.push(format!("live session {sid} is not RUNNING again after the faults: {e}"));
        }
    }
    // Give agents one fencing window to stop superseded copies, then look.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes: Vec<String> = cluster.agents.iter().map(|a| a.id.clone()).collect();
    let Ok(sessions) = list_all_sessions(client, &[(RUN_LABEL, run)], &[]).await else {
        violations.push("cannot list sessions after the faults".into());
        return violations;
    };
    for s in &sessions {
        let dirs = sandfleet_chaos::host::cgroup_dirs_matching(&s.id);
        let copies: BTreeSet<&String> =
            nodes.iter().filter(|n| dirs.iter().any(|d| d.to_string_lossy().contains(n.as_str()))).collect();
        let running = state_of(s) == proto::SessionState::Running;
        let ok = if running {
            copies.len() == 1 && copies.contains(&s.node_id)
        } else if s.state == proto::SessionState::Terminated as i32 || s.state == proto::SessionState::Failed as i32 {
            copies.is_empty()
        } else {
            copies.len() <= 1
        };
        if !ok {
            violations.push(format!(
                "session {} ({:?} on {:?}, generation {}) has copies on {copies:?}",
                s.id,
                state_of(s),
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

async fn worker(
    id: usize,
    seed: u64,
    run: String,
    client: Client,
    ledger: Shared,
    until: Instant,
    max_live: usize,
    faults: bool,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut live: Vec<String> = Vec::new();
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let roll = rng.random_range(0..100);
        if roll < 40 || live.is_empty() {
            if live.len() >= max_live {
                let i = rng.random_range(0..live.len());
                delete(&client, &ledger, live.swap_remove(i)).await;
                continue;
            }
            let rid = format!("chaos-{seed}-w{id}-{n}");
            match client.create_session_full(spec(&rid, &run)).await {
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
                        None => l
                            .violations
                            .push(format!("create {rid}: response without a session")),
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
            let r = client.create_session_full(spec(&rid, &run)).await;
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
        } else if roll < 80 {
            let sid = live[rng.random_range(0..live.len())].clone();
            let token = format!("{}", rng.random_range(0..1_000_000u32));
            let result = async {
                let s = client.wait_running(&sid, Duration::from_secs(30)).await?;
                client
                    .exec_collect(
                        &s,
                        ExecRequest::argv(["echo", token.as_str()])
                            .timeout(Duration::from_secs(20)),
                    )
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
            delete(&client, &ledger, live.swap_remove(i)).await;
        }
    }
}

async fn delete(client: &Client, ledger: &Shared, sid: String) {
    let r = client.delete_session(&sid).await;
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
            None => violations.push(format!(
                "acknowledged create {rid} -> {sid} is not retrievable: {last:?}"
            )),
            Some(s) => {
                if s.request_id != *rid {
                    violations.push(format!(
                        "session {sid} has request id {:?}, created with {rid}",
                        s.request_id
                    ));
                }
                if ledger.deleted.contains(sid) && state_of(&s) != proto::SessionState::Terminated {
                    violations.push(format!(
                        "session {sid} was deleted but is {:?}",
                        state_of(&s)
                    ));
                }
            }
        }
    }
    let listed = list_all_sessions(client, &[(RUN_LABEL, run)], &[]).await?;
    let mut by_rid: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &listed {
        by_rid
            .entry(s.request_id.as_str())
            .or_default()
            .push(s.id.as_str());
    }
    for (rid, ids) in &by_rid {
        if ids.len() > 1 {
            violations.push(format!(
                "request id {rid} produced {} sessions: {ids:?}",
                ids.len()
            ));
        }
        if !ledger.acked.contains_key(*rid) && !ledger.ambiguous.contains(*rid) {
            violations.push(format!(
                "session(s) {ids:?} with request id {rid} that no worker sent"
            ));
        }
    }
    let listed_ids: BTreeSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    for (rid, sid) in &ledger.acked {
        if !listed_ids.contains(sid.as_str()) {
            violations.push(format!(
                "acknowledged session {sid} ({rid}) is missing from ListSessions"
            ));
        }
    }
    Ok(violations)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    println!("sandfleet-chaos: seed {seed} (replay with --seed {seed})");
    if !require_sandbox_facilities() {
        eprintln!("sandfleet-chaos: cannot run without the sandbox facilities above");
        return ExitCode::from(2);
    }
    match run(&args, seed).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sandfleet-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args, seed: u64) -> Result<bool> {
    let coordinator_args = if args.coordinator_args.is_empty() {
        vec!["--agent-heartbeat".to_string(), "500ms".into(), "--node-ttl".into(), "3s".into()]
    } else {
        args.coordinator_args.clone()
    };
    let mut cluster = ClusterBuilder::new()
        .coordinators(args.coordinators)
        .agents(args.agents)
        .agent_args(args.agent_args.clone())
        .coordinator_args(coordinator_args)
        .start()
        .await?;
    println!(
        "sandfleet-chaos: cluster of {} coordinator(s) and {} agent(s) up in {}",
        args.coordinators,
        args.agents,
        cluster.dir().display()
    );
    let client = cluster.try_client().await?;
    let run = seed.to_string();
    let ledger: Shared = Arc::default();
    let started = Instant::now();
    let until = started + args.duration;
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        tasks.push(tokio::spawn(worker(
            w,
            seed,
            run.clone(),
            client.clone(),
            ledger.clone(),
            until,
            args.max_live.max(1),
            args.faults,
        )));
    }
    let schedule = if args.faults {
        nemesis(&mut cluster, seed, args.fault_interval, until).await
    } else {
        Vec::new()
    };
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();

    let mut ledger = Arc::try_unwrap(ledger)
        .map_err(|_| anyhow::anyhow!("workers still hold the ledger"))?
        .into_inner()
        .unwrap();
    let found = verify(&client, &run, &ledger).await?;
    ledger.violations.extend(found);
    if args.faults {
        let found = verify_after_faults(&mut cluster, &client, &run, &ledger).await;
        ledger.violations.extend(found);
    }

    println!("sandfleet-chaos: summary (seed {seed}, {elapsed:.1?})");
    for (op, n) in &ledger.ops {
        println!(
            "  {op:<13} {n:>6} ops, {:>4} errors",
            ledger.errors.get(op).copied().unwrap_or(0)
        );
    }
    println!(
        "  acknowledged creates {}, ambiguous creates {}, acknowledged deletes {}, faults {}",
        ledger.acked.len(),
        ledger.ambiguous.len(),
        ledger.deleted.len(),
        schedule.iter().filter(|l| l.contains("SIGKILL") || l.contains("SIGSTOP")).count()
    );
    if ledger.violations.is_empty() {
        println!("sandfleet-chaos: OK, no violations");
        if args.keep {
            println!(
                "sandfleet-chaos: cluster directory kept in {}",
                cluster.keep_dir().display()
            );
        }
        cluster.shutdown().await?;
        Ok(true)
    } else {
        println!("sandfleet-chaos: {} VIOLATION(S):", ledger.violations.len());
        for v in &ledger.violations {
            println!("  - {v}");
        }
        if !schedule.is_empty() {
            println!("sandfleet-chaos: fault schedule (seed {seed}):");
            for line in &schedule {
                println!("  {line}");
            }
        }
        let dir = cluster.keep_dir();
        cluster.print_logs(40);
        println!(
            "sandfleet-chaos: logs and data kept in {}; replay with --seed {seed}",
            dir.display()
        );
        Ok(false)
    }
}
