//! `sandfleet-bench disk`: what per-session disk quotas cost at create,
//! against no quotas, in the same run: two clusters of the same shape (1
//! coordinator, 1 process-runtime agent, loopback), one agent with the
//! default `--disk-quota loop` and one with `--disk-quota off`.
//!
//! One session at a time per cluster, the clusters alternating run by run so
//! that drift of the machine hits both: create -> RUNNING, then delete. Two
//! sizes: the default quota (served from the agent's pool of ready
//! filesystems) and another size (its filesystem made at create).
//!
//! Goal: quotas add at most 5 ms to create -> RUNNING at p50 (default size).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::millis as ms;
use anyhow::{anyhow, Result};
use sandfleet::{Client, CreateSession};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder, NetworkChoice};

/// The goal: quotas add at most this much at p50.
pub const GOAL_ADDED: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub warmup: usize,
}

/// Samples of one cluster.
#[derive(Debug, Default)]
pub struct Side {
    pub default_size: Vec<Duration>,
    pub other_size: Vec<Duration>,
}

#[derive(Debug)]
pub struct Report {
    pub quota: Side,
    pub off: Side,
}

async fn start(quota: bool, child_log: &str) -> Result<(Cluster, Client)> {
    let cluster = ClusterBuilder::new()
        .network(NetworkChoice::Loopback)
        .coordinators(1)
        .agents(1)
        .agent_args(["--disk-quota", if quota { "loop" } else { "off" }])
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let client = cluster.try_client().await?;
    Ok((cluster, client))
}

async fn create_to_running(client: &Client, disk_bytes: u64) -> Result<Duration> {
    let t = Instant::now();
    let s = client
        .create_session(CreateSession::new().disk_bytes(disk_bytes).ttl(Duration::from_secs(600)))
        .await
        .map_err(|e| anyhow!("create: {e}"))?;
    client.wait_running(&s.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
    let d = t.elapsed();
    client.delete_session(&s.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    Ok(d)
}

pub async fn run(settings: &Settings, child_log: &str) -> Result<Report> {
    eprintln!("sandfleet-bench disk: starting two clusters (quotas on, quotas off)");
    let (quota_cluster, quota_client) = start(true, child_log).await?;
    let (off_cluster, off_client) = start(false, child_log).await?;
    let mut report = Report { quota: Side::default(), off: Side::default() };
    let default = sandfleet_common::limits::DEFAULT_DISK_BYTES;
    let other = 256 << 20;
    for (size, pick) in [(default, 0), (other, 1)] {
        for i in 0..settings.warmup + settings.runs {
            // Alternate which cluster goes first.
            let order = if i % 2 == 0 { [true, false] } else { [false, true] };
            for quota in order {
                let d = create_to_running(if quota { &quota_client } else { &off_client }, size).await?;
                if i >= settings.warmup {
                    let side = if quota { &mut report.quota } else { &mut report.off };
                    if pick == 0 { &mut side.default_size } else { &mut side.other_size }.push(d);
                }
            }
            // Sessions of the default size come from the pool; let it refill
            // as it would between creates that are not back to back.
            if size == default {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (a, b) = if pick == 0 {
            (&report.off.default_size, &report.quota.default_size)
        } else {
            (&report.off.other_size, &report.quota.other_size)
        };
        eprintln!(
            "  {} MiB: create -> RUNNING p50 off {:.2} ms, quota {:.2} ms",
            size >> 20,
            ms(percentile(a, 50.0)),
            ms(percentile(b, 50.0))
        );
    }
    quota_cluster.shutdown().await?;
    off_cluster.shutdown().await?;
    Ok(report)
}

pub fn render(r: &Report, s: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench disk --runs {} --warmup {}`: two clusters of 1 coordinator and 1 \
         process-runtime agent on loopback (mutual TLS), one agent with per-session filesystems \
         (`--disk-quota loop`, the default) and one with `--disk-quota off`, measured in the same run. \
         One session at a time: create -> RUNNING, then delete; the clusters alternate run by run. The \
         default 1 GiB quota is served from the agent's pool of ready filesystems (the bench waits 50 ms \
         between runs, as creates that are not back to back would); a 256 MiB quota has its filesystem \
         made at create (mkfs.ext4 and a loop mount).\n",
        s.runs, s.warmup
    );
    let _ = writeln!(out, "| create -> RUNNING | quotas off | quotas on | added | goal (≤ 5 ms at p50) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for (name, a, b, goal) in [
        ("default 1 GiB quota", &r.off.default_size, &r.quota.default_size, true),
        ("256 MiB quota (made at create)", &r.off.other_size, &r.quota.other_size, false),
    ] {
        for p in [50.0, 99.0] {
            let (x, y) = (percentile(a, p), percentile(b, p));
            let added = y.as_secs_f64() - x.as_secs_f64();
            let verdict = match (goal, p == 50.0) {
                (true, true) if added <= GOAL_ADDED.as_secs_f64() => "met",
                (true, true) => "MISSED",
                _ => "(reported)",
            };
            let _ = writeln!(
                out,
                "| {name}, p{p:.0} | {:.2} ms | {:.2} ms | {:+.2} ms | {verdict} |",
                ms(x),
                ms(y),
                added * 1000.0
            );
        }
    }
    out.push('\n');
    crate::push_machine(&mut out, machine);
    out
}
