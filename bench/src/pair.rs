//! Two clusters of the same shape side by side, in the same run: the
//! `baseline` and the `candidate` differ in one setting (mutual TLS for
//! `sandfleet-bench tls`, metrics and trace propagation for
//! `sandfleet-bench telemetry`), and the report is the candidate's overhead.
//!
//! - **exec round trip**: `true` in one warm session per cluster, the two
//!   clusters alternating run by run so that drift of the machine hits both.
//! - **create throughput**: `clients` concurrent clients, each with its own
//!   SDK client (its own connections, so its own handshakes), creating
//!   sessions for `duration`; rounds alternate between the clusters. The
//!   sessions ask for a node label no node has, so they stay PENDING: the
//!   figure is the commit path's, not sandbox starts.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::millis as ms;
use anyhow::{anyhow, bail, Result};
use sandfleet::{Client, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder, NetworkChoice};

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

impl Settings {
    /// The settings of the command line, each count at least 1.
    pub fn new(runs: usize, warmup: usize, clients: usize, duration_s: u64, rounds: usize) -> Self {
        Self {
            runs: runs.max(1),
            warmup,
            clients: clients.max(1),
            duration: Duration::from_secs(duration_s.max(1)),
            rounds: rounds.max(1),
        }
    }

    /// The command line that produced a report: `sandfleet-bench {command} --runs ...`.
    pub fn command_line(&self, command: &str) -> String {
        format!(
            "sandfleet-bench {command} --runs {} --clients {} --duration {}s --rounds {}",
            self.runs,
            self.clients,
            self.duration.as_secs(),
            self.rounds
        )
    }

    /// How both sides were measured, for a report's text.
    pub fn method(&self) -> String {
        format!(
            "Exec: `true` in a warm session, the clusters alternating run by run. Creates: {} clients, each with \
             its own connections, creating sessions that stay PENDING (no node matches), {} rounds of {}s per \
             cluster, alternating.",
            self.clients,
            self.rounds,
            self.duration.as_secs()
        )
    }
}

/// The figures of both sides.
#[derive(Debug, Default)]
pub struct Report {
    pub baseline: Side,
    pub candidate: Side,
}

/// The shape both clusters share: 3 coordinators and 1 process-runtime agent
/// on loopback, nodes never declared down during the run.
pub fn builder(child_log: &str) -> ClusterBuilder {
    ClusterBuilder::new()
        .network(NetworkChoice::Loopback)
        .coordinators(3)
        .agents(1)
        .coordinator_args(["--node-ttl", "1h"])
        .env("RUST_LOG", child_log)
}

/// A started side: its cluster, a client, and one warm RUNNING session.
pub struct Started {
    pub cluster: Cluster,
    client: Client,
    session: sandfleet::proto::Session,
}

/// Starts a cluster from `builder` and a warm session in it.
pub async fn start(builder: ClusterBuilder, name: &str) -> Result<Started> {
    let cluster = builder.start().await?;
    let client = cluster.try_client().await?;
    let spec = CreateSession::new()
        .request_id(format!("bench-{name}-{}", std::process::id()))
        .memory_bytes(128 << 20)
        .cpu_millis(250)
        .ttl(Duration::from_secs(3600));
    let created = client.create_session(spec).await.map_err(|e| anyhow!("create: {e}"))?;
    let session = client.wait_running(&created.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait: {e}"))?;
    Ok(Started { cluster, client, session })
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
    name: &str,
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
        let (stop, errors, name) = (stop.clone(), errors.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let spec = CreateSession::new()
                    .request_id(format!("{name}-{}-{round}-{i}-{n}", std::process::id()))
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

/// Measures both sides, `[baseline, candidate]`, labelled `names` in the
/// progress lines.
pub async fn measure(settings: &Settings, sides: [&Started; 2], names: [&str; 2]) -> Result<Report> {
    let [base, cand] = sides;
    let mut report = Report::default();
    for i in 0..settings.warmup + settings.runs {
        let a = exec_once(&cand.client, &cand.session).await?;
        let b = exec_once(&base.client, &base.session).await?;
        if i >= settings.warmup {
            report.candidate.exec.push(a);
            report.baseline.exec.push(b);
        }
    }
    eprintln!(
        "  exec p50: {} {:.2} ms, {} {:.2} ms",
        names[1],
        ms(percentile(&report.candidate.exec, 50.0)),
        names[0],
        ms(percentile(&report.baseline.exec, 50.0))
    );
    for round in 0..settings.rounds {
        // Alternate which cluster goes first.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for candidate in order {
            let (side, report, name) = if candidate {
                (cand, &mut report.candidate, names[1])
            } else {
                (base, &mut report.baseline, names[0])
            };
            create_load(&side.cluster, settings.clients, settings.duration, round, name, report).await?;
        }
    }
    eprintln!(
        "  creates/s: {} {:.0}, {} {:.0}",
        names[1],
        report.candidate.creates_per_s(),
        names[0],
        report.baseline.creates_per_s()
    );
    Ok(report)
}

/// The table rows of the report: exec round trip p50 (against `goal`) and
/// p99, creates/s (against `goal`), create latency p50 and p99; the columns
/// are baseline, candidate, overhead and verdict. Overhead of a latency is
/// candidate/baseline − 1, of a throughput baseline/candidate − 1.
pub fn rows(r: &Report, s: &Settings, goal: f64) -> String {
    let mut out = String::new();
    let verdict = |overhead: f64| if overhead <= goal { "met" } else { "MISSED" };
    for (name, p) in [("exec round trip p50", 50.0), ("exec round trip p99", 99.0)] {
        let (a, b) = (percentile(&r.baseline.exec, p), percentile(&r.candidate.exec, p));
        let overhead = b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0;
        let goal = if p == 50.0 { verdict(overhead) } else { "(reported)" };
        let _ = writeln!(out, "| {name} | {:.2} ms | {:.2} ms | {:+.1}% | {goal} |", ms(a), ms(b), overhead * 100.0);
    }
    let (a, b) = (r.baseline.creates_per_s(), r.candidate.creates_per_s());
    let overhead = a / b.max(1e-9) - 1.0;
    let _ = writeln!(
        out,
        "| creates/s, {} clients | {a:.0} | {b:.0} | {:+.1}% | {} |",
        s.clients,
        overhead * 100.0,
        verdict(overhead)
    );
    for (name, p) in [("create latency p50", 50.0), ("create latency p99", 99.0)] {
        let (a, b) = (percentile(&r.baseline.create_latencies, p), percentile(&r.candidate.create_latencies, p));
        let overhead = b.as_secs_f64() / a.as_secs_f64().max(1e-9) - 1.0;
        let _ =
            writeln!(out, "| {name} | {:.2} ms | {:.2} ms | {:+.1}% | (reported) |", ms(a), ms(b), overhead * 100.0);
    }
    out
}
