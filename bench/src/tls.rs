//! `sandfleet-bench tls`: what mutual TLS costs, against plaintext, in the
//! same run: two clusters of the same shape (3 coordinators, 1 process-runtime
//! agent, loopback), one with a certificate per process (the testkit's
//! default) and one `--insecure`.
//!
//! - **exec round trip**: `true` in one warm session per cluster, the two
//!   clusters alternating run by run so that drift of the machine hits both.
//! - **create throughput**: `clients` concurrent clients, each with its own
//!   SDK client (its own connections, so its own handshakes), creating
//!   sessions for `duration`; rounds alternate between the clusters. The
//!   sessions ask for a node label no node has, so they stay PENDING: the
//!   figure is the commit path's, not sandbox starts.
//!
//! Goal: TLS at most 10% slower on both.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::millis as ms;
use anyhow::{anyhow, bail, Result};
use sandfleet::{Client, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder, NetworkChoice};

/// The goal: TLS figures at most this much worse than plaintext.
pub const GOAL_OVERHEAD: f64 = 0.10;

#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub warmup: usize,
    pub clients: usize,
    pub duration: Duration,
    pub rounds: usize,
}

#[derive(Debug, Default)]
pub struct Side {
    pub exec: Vec<Duration>,
    pub creates: u64,
    pub create_errors: u64,
    pub create_time: Duration,
    pub create_latencies: Vec<Duration>,
}

impl Side {
    fn creates_per_s(&self) -> f64 {
        self.creates as f64 / self.create_time.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug)]
pub struct Report {
    pub tls: Side,
    pub plain: Side,
}

async fn start(tls: bool, child_log: &str) -> Result<(Cluster, Client, sandfleet::proto::Session)> {
    let cluster = ClusterBuilder::new()
        .tls(tls)
        .network(NetworkChoice::Loopback)
        .coordinators(3)
        .agents(1)
        .coordinator_args(["--node-ttl", "1h"])
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let client = cluster.try_client().await?;
    let spec = CreateSession::new()
        .request_id(format!("bench-tls-{tls}-{}", std::process::id()))
        .memory_bytes(128 << 20)
        .cpu_millis(250)
        .ttl(Duration::from_secs(3600));
    let created = client.create_session(spec).await.map_err(|e| anyhow!("create: {e}"))?;
    let session = client.wait_running(&created.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait: {e}"))?;
    Ok((cluster, client, session))
}

async fn exec_once(client: &Client, session: &sandfleet::proto::Session) -> Result<Duration> {
    let t = Instant::now();
    let out = client.exec_collect(session, ExecRequest::argv(["true"])).await.map_err(|e| anyhow!("exec: {e}"))?;
    let d = t.elapsed();
    if out.exit.exit_code != 0 {
        bail!("exec true exited with {:?}", out.exit);
    }
    Ok(d)
}

/// `clients` clients creating PENDING sessions for `duration`.
async fn create_load(
    cluster: &Cluster,
    clients: usize,
    duration: Duration,
    round: usize,
    side: &mut Side,
) -> Result<()> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let c = cluster.client_builder().request_timeout(Duration::from_secs(10)).connect().await?;
        // Connect (and handshake) before the clock starts, as long-lived clients would.
        c.list_nodes().await.map_err(|e| anyhow!("warm-up call: {e}"))?;
        conns.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let (stop, errors) = (stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let spec = CreateSession::new()
                    .request_id(format!("tls-{}-{round}-{i}-{n}", std::process::id()))
                    .memory_bytes(64 << 20)
                    .cpu_millis(100)
                    .node_selector("bench", "nowhere")
                    .ttl(Duration::from_secs(3600));
                let s = Instant::now();
                match c.create_session(spec).await {
                    Ok(_) => lat.push(s.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let lat = task.await?;
        side.creates += lat.len() as u64;
        side.create_latencies.extend(lat);
    }
    side.create_time += t.elapsed();
    side.create_errors += errors.load(Ordering::Relaxed);
    Ok(())
}

pub async fn run(settings: &Settings, child_log: &str) -> Result<Report> {
    let (tls_cluster, tls_client, tls_session) = start(true, child_log).await?;
    let (plain_cluster, plain_client, plain_session) = start(false, child_log).await?;
    let mut report = Report { tls: Side::default(), plain: Side::default() };

    for i in 0..settings.warmup + settings.runs {
        let a = exec_once(&tls_client, &tls_session).await?;
        let b = exec_once(&plain_client, &plain_session).await?;
        if i >= settings.warmup {
            report.tls.exec.push(a);
            report.plain.exec.push(b);
        }
    }
    eprintln!(
        "  exec p50: tls {:.2} ms, plaintext {:.2} ms",
        ms(percentile(&report.tls.exec, 50.0)),
        ms(percentile(&report.plain.exec, 50.0))
    );
    for round in 0..settings.rounds {
        // Alternate which cluster goes first.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for tls in order {
            let (cluster, side) =
                if tls { (&tls_cluster, &mut report.tls) } else { (&plain_cluster, &mut report.plain) };
            create_load(cluster, settings.clients, settings.duration, round, side).await?;
        }
    }
    eprintln!("  creates/s: tls {:.0}, plaintext {:.0}", report.tls.creates_per_s(), report.plain.creates_per_s());
    tls_cluster.shutdown().await?;
    plain_cluster.shutdown().await?;
    Ok(report)
}

pub fn render(r: &Report, s: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench tls --runs {} --clients {} --duration {}s --rounds {}`: two clusters of \
         3 coordinators and 1 process-runtime agent on loopback, one with mutual TLS on every connection \
         (a certificate per process) and one `--insecure`, measured in the same run. Exec: `true` in a warm \
         session, the clusters alternating run by run. Creates: {} clients, each with its own connections, \
         creating sessions that stay PENDING (no node matches), {} rounds of {}s per cluster, alternating.\n",
        s.runs,
        s.clients,
        s.duration.as_secs(),
        s.rounds,
        s.clients,
        s.rounds,
        s.duration.as_secs()
    );
    let _ = writeln!(out, "| measurement | plaintext | mutual TLS | TLS overhead | goal (≤ 10%) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    let verdict = |overhead: f64| if overhead <= GOAL_OVERHEAD { "met" } else { "MISSED" };
    for (name, p) in [("exec round trip p50", 50.0), ("exec round trip p99", 99.0)] {
        let (a, b) = (percentile(&r.plain.exec, p), percentile(&r.tls.exec, p));
        let overhead = b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0;
        let goal = if p == 50.0 { verdict(overhead) } else { "(reported)" };
        let _ = writeln!(out, "| {name} | {:.2} ms | {:.2} ms | {:+.1}% | {goal} |", ms(a), ms(b), overhead * 100.0);
    }
    let (a, b) = (r.plain.creates_per_s(), r.tls.creates_per_s());
    let overhead = a / b.max(1e-9) - 1.0;
    let _ = writeln!(
        out,
        "| creates/s, {} clients | {a:.0} | {b:.0} | {:+.1}% | {} |",
        s.clients,
        overhead * 100.0,
        verdict(overhead)
    );
    for (name, p) in [("create latency p50", 50.0), ("create latency p99", 99.0)] {
        let (a, b) = (percentile(&r.plain.create_latencies, p), percentile(&r.tls.create_latencies, p));
        let overhead = b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0;
        let _ =
            writeln!(out, "| {name} | {:.2} ms | {:.2} ms | {:+.1}% | (reported) |", ms(a), ms(b), overhead * 100.0);
    }
    let _ = writeln!(
        out,
        "\nFailed creates: plaintext {}, TLS {}. Overhead of a throughput is plaintext/TLS − 1.\n",
        r.plain.create_errors, r.tls.create_errors
    );
    crate::push_machine(&mut out, machine);
    out
}
