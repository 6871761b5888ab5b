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
//! the end (`sandfleet_testkit::linearizability`). Also at the end, every create
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
//!
//! # Layout
//! - [`args`]: the flags and the settings they resolve to (`--smoke` preset);
//! - [`workload`]: the seeded workers and the ledger of what the cluster acknowledged;
//! - [`nemesis`]: the fault schedule, and the move checks after agent faults;
//! - [`verify`]: the checks after the run (ledger, linearizability, convergence, copies).

mod args;
mod nemesis;
mod verify;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use rand::Rng;
use sandfleet_testkit::linearizability::History;
use sandfleet_testkit::s3::S3Server;
use sandfleet_testkit::{require_sandbox_facilities, ClusterBuilder};

use crate::args::{Args, Settings};
use crate::nemesis::{nemesis, Fault, NemesisCtx, Schedule, ALL_FAULTS};
use crate::verify::{check_history, verify, verify_after_faults};
use crate::workload::{worker, Shared, WorkerCtx};

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
    std::env::var(sandfleet_testkit::facilities::REQUIRE_ENV).is_ok_and(|v| v == "1")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.cleanup_network {
        return match sandfleet_testkit::netns::cleanup_stale() {
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
    // The move check expects every session of a killed node to run elsewhere:
    // one node must have room for the whole workload, whatever the host's cores.
    if !args.agent_args.iter().any(|a| a == "--cpu" || a.starts_with("--cpu=")) {
        builder = builder.agent_args(["--cpu".to_string(), format!("{}m", workload::cpu_for_all(&settings))]);
    }
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
            if !schedule.injected.contains_key(&k) && (!partition || cluster.can_partition()) {
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
