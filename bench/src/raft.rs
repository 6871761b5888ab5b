//! `sandfleet-bench raft`: session-create commit throughput and latency of a
//! three-coordinator cluster, against etcd (three members) on the same
//! machine in the same run, plus leader failover time of both.
//!
//! Both clusters run on loopback with fsync on and the same Raft timing
//! (100 ms heartbeat, 1 s election timeout). Our load is `CreateSession`
//! through the public API (SDK); etcd's is `KV.Put` of a value as large as a
//! create's Raft entry. Clients of both talk to the leader, over one shared
//! HTTP/2 connection, as the SDK does.
//!
//! Sessions need a node that fits them; the benchmark registers one large
//! node through `AgentService.RegisterNode` with no agent behind it (and runs
//! the coordinators with `--node-ttl 1h` so that node stays ready). Nothing
//! runs the sessions: this measures the control plane's commit path only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandfleet::{Backoff, Client, CreateSession};
use sandfleet_proto::v1 as pb;
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::etcdpb;
use crate::millis as ms;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub duration: Duration,
    pub clients: Vec<usize>,
    pub kills: usize,
    pub etcd: PathBuf,
}

/// Throughput and latency at one client count.
#[derive(Debug, Clone)]
pub struct Load {
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Load {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One progress line on stderr.
    pub(crate) fn print(&self, system: &str, what: &str) {
        eprintln!(
            "  {system:<9} {:>2} clients: {:>8.0} {what}/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            self.clients,
            self.throughput(),
            ms(percentile(&self.latencies, 50.0)),
            ms(percentile(&self.latencies, 99.0)),
            self.errors
        );
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    pub value_bytes: usize,
    pub ours: Vec<Load>,
    pub etcd: Vec<Load>,
    pub ours_failover: Vec<Duration>,
    pub etcd_failover: Vec<Duration>,
    pub etcd_version: String,
}

/// A small session, as the raft and failover benches create them.
pub(crate) fn spec(rid: String) -> CreateSession {
    CreateSession::new()
        .request_id(rid)
        .memory_bytes(16 << 20)
        .cpu_millis(10)
        .pids_limit(16)
        .ttl(Duration::from_secs(3600))
}

/// The size of one session-create Raft entry's command, as the log stores it.
fn entry_bytes() -> usize {
    use sandfleet_coordinator::state::{Command as Cmd, PendingReason, SessionPhase, SessionRecord, SpecRecord};
    let record = SessionRecord {
        id: format!("s-{}", "0".repeat(26)),
        spec: SpecRecord {
            cpu_millis: 10,
            cpu_request_millis: 10,
            memory_bytes: 16 << 20,
            pids_limit: 16,
            ttl_seconds: 3600,
            ..Default::default()
        },
        phase: SessionPhase::Pending,
        node_id: Some("bench-node".into()),
        generation: 1,
        request_id: format!("bench-{}-{:08}", std::process::id(), 0),
        created_at_ms: 1_790_000_000_000,
        expires_at_ms: 1_790_003_600_000,
        updated_at_ms: 1_790_000_000_000,
        pending_reason: PendingReason::Starting,
        message: String::new(),
        restarts: 0,
        not_before_ms: 0,
        moved_from: None,
        renewed_at_ms: 0,
        tenant: "default".into(),
        traceparent: String::new(),
        pool: String::new(),
        claimed_at_ms: 0,
    };
    serde_json::to_vec(&Cmd::CreateSession { session: record, key_id: None }).map(|v| v.len()).unwrap_or(512)
}

pub async fn run(settings: &Settings) -> Result<Report> {
    let value_bytes = entry_bytes();
    eprintln!("sandfleet-bench raft: value size {value_bytes} B, {:?} per load point", settings.duration);

    let etcd_version = etcd_version(&settings.etcd).await?;
    let (ours, ours_failover) = sandfleet_side(settings).await.context("benchmarking the coordinators")?;
    let (etcd, etcd_failover) = etcd_side(settings, value_bytes).await.context("benchmarking etcd")?;
    Ok(Report { value_bytes, ours, etcd, ours_failover, etcd_failover, etcd_version })
}

// ---------------------------------------------------------------------------
// Sandfleet
// ---------------------------------------------------------------------------

/// A fresh three-coordinator cluster as this benchmark measures it, and a
/// client that tries its leader first (as an SDK that has found it would).
///
/// The cluster's one node has no agent behind it, so it never heartbeats: a
/// one-hour node TTL keeps it ready (with the default 5 s it would be
/// declared down mid-run and creates would turn into PENDING sessions).
pub async fn paper_cluster(child_log: &str) -> Result<(Cluster, Client)> {
    // Plaintext on loopback: the paper node registers through the raw agent
    // API without an agent certificate, and the figures stay comparable with
    // earlier runs; `bench tls` measures what mutual TLS costs.
    let mut cluster = ClusterBuilder::new()
        .tls(false)
        .coordinators(3)
        .agents(0)
        .coordinator_args(["--node-ttl", "1h"])
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let status = cluster.wait_converged(Duration::from_secs(60)).await?;
    let leader = status
        .members
        .iter()
        .find(|m| m.id == status.leader_id)
        .map(|m| m.address.clone())
        .ok_or_else(|| anyhow!("no leader in {status:?}"))?;
    register_paper_node(&leader).await?;
    let mut endpoints = vec![leader.clone()];
    endpoints.extend(cluster.coordinator_addrs().into_iter().filter(|a| *a != leader));
    let client = cluster.client_for(endpoints).request_timeout(Duration::from_secs(10)).connect().await?;
    Ok((cluster, client))
}

/// `n` clients creating one small session after another for `duration`,
/// with request ids `<prefix>-<pid>-<n>-<i>`.
pub async fn drive_creates(client: &Client, prefix: &str, n: usize, duration: Duration) -> Load {
    let counter = Arc::new(AtomicU64::new(0));
    let (client, prefix) = (client.clone(), prefix.to_string());
    let op = move || {
        let client = client.clone();
        let rid = format!("{prefix}-{}-{n}-{}", std::process::id(), counter.fetch_add(1, Ordering::Relaxed));
        async move { client.create_session(spec(rid)).await.map(|_| ()).map_err(|e| anyhow!("{e}")) }
    };
    drive(n, duration, op).await
}

async fn sandfleet_side(settings: &Settings) -> Result<(Vec<Load>, Vec<Duration>)> {
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());
    let (mut cluster, client) = paper_cluster(&child_log).await?;
    let mut loads = Vec::new();
    for &n in &settings.clients {
        let load = drive_creates(&client, "bench", n, settings.duration).await;
        load.print("sandfleet", "creates");
        loads.push(load);
    }

    let mut failovers = Vec::new();
    for k in 0..settings.kills {
        let status = cluster.wait_converged(Duration::from_secs(60)).await?;
        let leader = cluster
            .coordinator_index(status.leader_id)
            .ok_or_else(|| anyhow!("leader {} is not ours", status.leader_id))?;
        let probe = cluster
            .client_for(cluster.coordinator_addrs())
            .request_timeout(Duration::from_millis(500))
            .max_retries(10_000)
            .backoff(Backoff::new(Duration::from_millis(10), Duration::from_millis(50)))
            .connect()
            .await?;
        // A write through the probe first, so its connections are warm.
        probe.create_session(spec(format!("bench-warm-{}-{k}", std::process::id()))).await?;
        cluster.kill(Target::Coordinator(leader)).await?;
        let t = Instant::now();
        probe
            .create_session(spec(format!("bench-failover-{}-{k}", std::process::id())))
            .await
            .map_err(|e| anyhow!("no write after killing leader {}: {e}", status.leader_id))?;
        let d = t.elapsed();
        eprintln!("  sandfleet failover {}/{}: {:.0} ms", k + 1, settings.kills, ms(d));
        failovers.push(d);
        cluster.restart(Target::Coordinator(leader)).await?;
    }
    cluster.shutdown().await?;
    Ok((loads, failovers))
}

pub(crate) async fn register_paper_node(addr: &str) -> Result<()> {
    let mut api = pb::agent_service_client::AgentServiceClient::new(channel(addr)?);
    let mut req = tonic::Request::new(pb::RegisterNodeRequest {
        node_id: "bench-node".into(),
        address: "127.0.0.1:9".into(),
        capacity: Some(pb::NodeCapacity { cpu_millis: u32::MAX, memory_bytes: 1 << 60, session_slots: u32::MAX }),
        labels: Default::default(),
        runtimes: vec!["process".into()],
        hold: None,
        images: Vec::new(),
    });
    req.set_timeout(Duration::from_secs(10));
    api.register_node(req).await.context("registering the benchmark's node")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------

async fn etcd_version(etcd: &Path) -> Result<String> {
    let out = Command::new(etcd).arg("--version").output().await.with_context(|| {
        format!("running {} --version (install the etcd-server package: bench/setup)", etcd.display())
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("etcd").trim().to_string())
}

struct EtcdMember {
    name: String,
    client_addr: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    fn spawn(&mut self, etcd: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(etcd)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} for {}", etcd.display(), self.name))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }
}

struct Etcd {
    _dir: tempfile::TempDir,
    members: Vec<EtcdMember>,
    bin: PathBuf,
}

impl Etcd {
    async fn start(bin: &Path) -> Result<Etcd> {
        let dir = tempfile::Builder::new().prefix("sandfleet-bench-etcd-").tempdir()?;
        let ports: Vec<(u16, u16)> =
            (0..3).map(|_| Ok::<_, anyhow::Error>((free_port()?, free_port()?))).collect::<Result<_>>()?;
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{}=http://127.0.0.1:{peer}", i + 1)).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("e{}", i + 1);
            let args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(&name).display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", cluster.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=sandfleet-bench".into(),
                "--heartbeat-interval=100".into(),
                "--election-timeout=1000".into(),
                "--logger=zap".into(),
                "--log-level=warn".into(),
            ];
            let mut m = EtcdMember {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_addr: format!("127.0.0.1:{client}"),
                args,
                child: None,
            };
            m.spawn(bin)?;
            members.push(m);
        }
        let etcd = Etcd { _dir: dir, members, bin: bin.to_path_buf() };
        etcd.leader(Duration::from_secs(30)).await?;
        Ok(etcd)
    }

    /// The index of the member that leads, once all running members agree.
    async fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ids = BTreeMap::new();
            let mut leaders = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                if let Ok(s) = etcd_status(&m.client_addr).await {
                    ids.insert(s.header.map(|h| h.member_id).unwrap_or(0), i);
                    leaders.push(s.leader);
                }
            }
            if let Some(&l) = leaders.first() {
                if l != 0 && leaders.iter().all(|x| *x == l) && leaders.len() == self.running() {
                    if let Some(&i) = ids.get(&l) {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("{}: {}", m.name, std::fs::read_to_string(&m.log).unwrap_or_default()))
                    .collect();
                bail!("etcd did not elect a leader within {timeout:?}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn running(&self) -> usize {
        self.members.iter().filter(|m| m.child.is_some()).count()
    }
}

async fn etcd_status(addr: &str) -> Result<etcdpb::StatusResponse> {
    let mut api = etcdpb::maintenance_client::MaintenanceClient::new(channel(addr)?);
    let mut req = tonic::Request::new(etcdpb::StatusRequest {});
    req.set_timeout(Duration::from_secs(2));
    Ok(api.status(req).await?.into_inner())
}

async fn etcd_put(
    kv: &mut etcdpb::kv_client::KvClient<Channel>,
    key: Vec<u8>,
    value: Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    let mut req = tonic::Request::new(etcdpb::PutRequest { key, value, ..Default::default() });
    req.set_timeout(timeout);
    kv.put(req).await?;
    Ok(())
}

async fn etcd_side(settings: &Settings, value_bytes: usize) -> Result<(Vec<Load>, Vec<Duration>)> {
    let mut etcd = Etcd::start(&settings.etcd).await?;
    let leader = etcd.leader(Duration::from_secs(30)).await?;
    let kv = etcdpb::kv_client::KvClient::new(channel(&etcd.members[leader].client_addr)?);
    let value: Vec<u8> = (0..value_bytes).map(|i| b'a' + (i % 26) as u8).collect();

    let mut loads = Vec::new();
    for &n in &settings.clients {
        let counter = Arc::new(AtomicU64::new(0));
        let op = {
            let (kv, value) = (kv.clone(), value.clone());
            move || {
                let (mut kv, value) = (kv.clone(), value.clone());
                let i = counter.fetch_add(1, Ordering::Relaxed);
                async move { etcd_put(&mut kv, format!("bench/{n}/{i}").into_bytes(), value, Duration::from_secs(10)).await }
            }
        };
        let load = drive(n, settings.duration, op).await;
        load.print("etcd", "puts");
        loads.push(load);
    }

    let mut failovers = Vec::new();
    for k in 0..settings.kills {
        let leader = etcd.leader(Duration::from_secs(60)).await?;
        let mut clients: Vec<_> = etcd
            .members
            .iter()
            .map(|m| channel(&m.client_addr).map(etcdpb::kv_client::KvClient::new))
            .collect::<Result<_>>()?;
        for c in clients.iter_mut() {
            etcd_put(c, b"bench/warm".to_vec(), value.clone(), Duration::from_secs(5)).await?;
        }
        etcd.members[leader].kill().await?;
        let t = Instant::now();
        let mut i = 0usize;
        loop {
            let c = &mut clients[i % 3];
            i += 1;
            if etcd_put(c, format!("bench/failover/{k}").into_bytes(), value.clone(), Duration::from_millis(500))
                .await
                .is_ok()
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("etcd took no write for 60 s after its leader was killed");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = t.elapsed();
        eprintln!("  etcd failover {}/{}: {:.0} ms", k + 1, settings.kills, ms(d));
        failovers.push(d);
        let bin = etcd.bin.clone();
        etcd.members[leader].spawn(&bin)?;
    }
    Ok((loads, failovers))
}

// ---------------------------------------------------------------------------
// Load driver and helpers
// ---------------------------------------------------------------------------

/// Runs `clients` loops of `op` for `duration` (after a one-second warm-up
/// whose operations are not counted) and collects latencies.
pub(crate) async fn drive<F, Fut>(clients: usize, duration: Duration, op: F) -> Load
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (op, measuring, stop) = (op.clone(), measuring.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let counted = measuring.load(Ordering::Relaxed);
                    let t = Instant::now();
                    let r = op().await;
                    let d = t.elapsed();
                    // Only operations that started and ended inside the window count.
                    if counted && !stop.load(Ordering::Relaxed) {
                        match r {
                            Ok(()) => lat.push(d),
                            Err(_) => errors += 1,
                        }
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            errors += e;
        }
    }
    Load { clients, ops: latencies.len() as u64, errors, elapsed, latencies }
}

fn channel(addr: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The Markdown section for `bench/RESULTS.md`.
pub fn render(r: &Report, settings: &Settings, section: &str, machine: &[(String, String)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench raft --duration {} --clients {} --kills {}`: three `sandfleet-coordinator` processes and three \
         `etcd` members ({}) on loopback on this machine, in the same run, fsync on, heartbeat 100 ms, election \
         timeout 1 s. Each load point runs {} s after a 1 s warm-up; clients share one HTTP/2 connection to the leader. \
         Ours: `CreateSession` through the SDK (a Raft entry of {} B). etcd: `KV.Put` of a {} B value. No agent runs \
         the sessions (a registered node with no agent, coordinators at `--node-ttl 1h`): this is the commit path only.\n",
        settings.duration.as_secs(),
        settings.clients.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        settings.kills,
        r.etcd_version,
        settings.duration.as_secs(),
        r.value_bytes,
        r.value_bytes
    );
    let _ = writeln!(out, "| clients | sandfleet creates/s | p50 | p99 | etcd puts/s | p50 | p99 | sandfleet / etcd |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (o, e) in r.ours.iter().zip(r.etcd.iter()) {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | **{:.2}x** |",
            o.clients,
            o.throughput(),
            ms(percentile(&o.latencies, 50.0)),
            ms(percentile(&o.latencies, 99.0)),
            e.throughput(),
            ms(percentile(&e.latencies, 50.0)),
            ms(percentile(&e.latencies, 99.0)),
            o.throughput() / e.throughput().max(1e-9)
        );
    }
    let errors: u64 = r.ours.iter().chain(r.etcd.iter()).map(|l| l.errors).sum();
    let _ = writeln!(out, "\nFailed operations during the load points: {errors}.\n");
    if let (Some(o), Some(e)) = (r.ours.iter().max_by_key(|l| l.clients), r.etcd.iter().max_by_key(|l| l.clients)) {
        let ratio = o.throughput() / e.throughput().max(1e-9);
        let verdict = if ratio >= 1.0 { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "Goal: at least etcd's throughput at {} clients. Ratio **{ratio:.2}x**: {verdict}.\n",
            o.clients
        );
    }
    let stat = |v: &[Duration]| {
        format!(
            "p50 {:.0} ms, max {:.0} ms over {} kills",
            ms(percentile(v, 50.0)),
            ms(v.iter().max().copied().unwrap_or_default()),
            v.len()
        )
    };
    let _ = writeln!(
        out,
        "Leader failover, SIGKILL of the leader to the first successful write (client retrying every 10-50 ms):\n"
    );
    let _ = writeln!(out, "- sandfleet: {}", stat(&r.ours_failover));
    let _ = writeln!(out, "- etcd: {}\n", stat(&r.etcd_failover));
    crate::push_machine(&mut out, machine);
    out
}
