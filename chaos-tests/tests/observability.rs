//! The daemons' metrics as a stock Prometheus sees them: a real Prometheus
//! server (Debian's package) scrapes a 3-coordinator, 2-agent cluster through
//! every process's `--metrics-listen` listener every second, and the test asks
//! it through its HTTP API, as a dashboard or an alert rule would:
//! - every target is up and the contract's core series exist
//!   (`docs/operations.md` lists them);
//! - exactly one coordinator says it leads;
//! - `sandfleet_sessions{state="running"}` counted on the leader equals the
//!   number of RUNNING sessions the API lists;
//! - SIGKILLing an agent makes `sandfleet_nodes{state="down"}` on the leader
//!   rise to 1, and the `SandfleetNodeDown` alert of
//!   `deploy/observability/alerts.yml` become pending;
//! - the metrics listener answers `/healthz` and `/readyz`.
//!
//! The coordinators run with a short node TTL (`--agent-heartbeat 500ms
//! --node-ttl 3s`) to keep the test quick.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use sandfleet::proto::SessionState;
use sandfleet_testkit::helpers::{create_running, list_all_sessions, small_session};
use sandfleet_testkit::prometheus::{http_get, Prometheus, PrometheusConfig, Sample};
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};

use common::{start, MOVE_SLACK, NODE_TTL};

/// How long Prometheus may take to see a change: a few 1 s scrapes, on a busy machine.
const SCRAPE_SLACK: Duration = Duration::from_secs(20);

/// Running sessions the test creates.
const SESSIONS: usize = 3;

/// Only the leader's view: each coordinator exports its own applied state.
fn on_leader(selector: &str) -> String {
    format!("sum({selector} and on(instance) sandfleet_raft_is_leader == 1)")
}

/// [`on_leader`], 0 when no such series exists (a state nobody is in may be absent).
fn on_leader_or_zero(selector: &str) -> String {
    format!("{} or vector(0)", on_leader(selector))
}

/// Polls `GET /readyz` on `addr` until it answers 200; the last answer otherwise.
async fn wait_readyz(addr: &str) -> Result<(), (u16, String)> {
    let mut last = (0, String::new());
    for _ in 0..50 {
        last = http_get(addr, "/readyz").await.unwrap_or_else(|e| panic!("{e}"));
        if last.0 == 200 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

/// The value of a one-sample result (a `sum`), `None` when empty.
fn single(samples: &[Sample]) -> Option<f64> {
    match samples {
        [(_, v)] => Some(*v),
        _ => None,
    }
}

fn alerts_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/alerts.yml")
}

/// Prometheus over the metrics listeners of every process of `cluster`: job
/// `sandfleet-coordinator` and `sandfleet-agent`, with the alert rules loaded.
async fn scrape(cluster: &Cluster) -> Prometheus {
    let addrs = cluster.metrics_addrs();
    let of = |agent: bool| -> Vec<String> {
        addrs.iter().filter(|(t, _)| matches!(t, Target::Agent(_)) == agent).map(|(_, a)| a.clone()).collect()
    };
    assert_eq!(addrs.len(), 5, "every process has a metrics listener: {addrs:?}");
    let config = PrometheusConfig::new()
        .job("sandfleet-coordinator", of(false))
        .job("sandfleet-agent", of(true))
        .rule_file(alerts_file());
    Prometheus::start(config).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn wait(prom: &Prometheus, expr: &str, pred: impl Fn(&[Sample]) -> bool, timeout: Duration) -> Vec<Sample> {
    match prom.wait_until(expr, pred, timeout).await {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// Waits until `expr` is one sample equal to `want`.
async fn wait_value(prom: &Prometheus, expr: &str, want: f64, timeout: Duration) {
    wait(prom, expr, |s| single(s) == Some(want), timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_cluster_its_sessions_and_a_dead_node() {
    require_facilities!();
    if !sandfleet_testkit::require_prometheus() {
        return;
    }
    let builder = ClusterBuilder::new().coordinators(3).agents(2).metrics_listeners(true).coordinator_args([
        "--agent-heartbeat",
        "500ms",
        "--node-ttl",
        "3s",
    ]);
    let mut cluster = start(builder).await;
    let prom = scrape(&cluster).await;

    // Every target is scraped, and the core series of both daemons exist.
    let up = wait(&prom, "up", |s| s.len() == 5 && s.iter().all(|(_, v)| *v == 1.0), SCRAPE_SLACK).await;
    let jobs: Vec<&str> = up.iter().filter_map(|(l, _)| l.get("job").map(String::as_str)).collect();
    assert_eq!(jobs.iter().filter(|j| **j == "sandfleet-coordinator").count(), 3, "{up:?}");
    assert_eq!(jobs.iter().filter(|j| **j == "sandfleet-agent").count(), 2, "{up:?}");
    wait_value(&prom, "sum(sandfleet_raft_is_leader)", 1.0, SCRAPE_SLACK).await;
    wait_value(&prom, "count(sandfleet_raft_is_leader)", 3.0, SCRAPE_SLACK).await;
    // Every member exports its Raft state ...
    for series in ["sandfleet_raft_term", "sandfleet_raft_commit_index", "sandfleet_raft_applied_index"] {
        wait_value(&prom, &format!("count({series})"), 3.0, SCRAPE_SLACK).await;
    }
    wait_value(&prom, "count(sandfleet_raft_state == 1)", 3.0, SCRAPE_SLACK).await;
    wait_value(&prom, r#"count(sandfleet_raft_state{state="leader"} == 1)"#, 1.0, SCRAPE_SLACK).await;
    // ... and the leader the cluster's.
    wait_value(&prom, &on_leader_or_zero("sandfleet_pending_sessions"), 0.0, SCRAPE_SLACK).await;
    wait_value(&prom, &on_leader(r#"sandfleet_nodes{state="ready"}"#), 2.0, SCRAPE_SLACK).await;
    wait_value(&prom, "count(sandfleet_agent_registered == 1)", 2.0, SCRAPE_SLACK).await;
    wait_value(&prom, r#"count(target_info{service_name="sandfleet-coordinator"})"#, 3.0, SCRAPE_SLACK).await;
    wait_value(&prom, r#"count(target_info{service_name="sandfleet-agent"})"#, 2.0, SCRAPE_SLACK).await;

    // The running sessions, counted once (on the leader), are the API's.
    let client = cluster.client().await;
    for i in 0..SESSIONS {
        create_running(&client, small_session(&format!("obs{i}"))).await.unwrap();
    }
    let running = list_all_sessions(&client, &[], &[SessionState::Running]).await.unwrap().len();
    assert_eq!(running, SESSIONS, "the API lists every created session RUNNING");
    wait_value(&prom, &on_leader(r#"sandfleet_sessions{state="running"}"#), running as f64, SCRAPE_SLACK).await;
    wait_value(&prom, "sum(sandfleet_agent_sandboxes_running)", running as f64, SCRAPE_SLACK).await;
    let creates = wait(
        &prom,
        r#"sum(sandfleet_session_requests_total{operation="create",code="OK"})"#,
        |s| single(s).is_some_and(|v| v >= SESSIONS as f64),
        SCRAPE_SLACK,
    )
    .await;
    eprintln!("create OK answered: {creates:?}");
    wait(
        &prom,
        "sum(sandfleet_session_create_to_running_seconds_count)",
        |s| single(s).is_some_and(|v| v >= SESSIONS as f64),
        SCRAPE_SLACK,
    )
    .await;
    wait(&prom, "count(sandfleet_raft_proposal_duration_seconds_bucket)", |s| single(s).is_some(), SCRAPE_SLACK).await;

    // Health on a coordinator's metrics listener.
    let coordinator = cluster.metrics_addr(Target::Coordinator(0)).expect("a metrics listener");
    let (code, body) = http_get(&coordinator, "/healthz").await.unwrap();
    assert_eq!(code, 200, "/healthz of a running coordinator: {body}");
    if let Err(last) = wait_readyz(&coordinator).await {
        panic!("/readyz of a coordinator of a healthy cluster: {last:?}");
    }
    let agent = cluster.metrics_addr(Target::Agent(1)).expect("a metrics listener");
    if let Err(last) = wait_readyz(&agent).await {
        panic!("/readyz of a registered agent: {last:?}");
    }
    assert_eq!(http_get(&agent, "/healthz").await.unwrap().0, 200, "/healthz of a running agent");
    let (code, text) = http_get(&coordinator, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("# TYPE sandfleet_raft_is_leader gauge"), "Prometheus text on /metrics:\n{text}");

    // Nothing is down yet, and no alert of deploy/observability fires or waits.
    wait_value(&prom, &on_leader_or_zero(r#"sandfleet_nodes{state="down"}"#), 0.0, SCRAPE_SLACK).await;
    let alerts = prom.query(r#"ALERTS{alertname="SandfleetNodeDown"}"#).await.unwrap();
    assert!(alerts.is_empty(), "no node is down yet: {alerts:?}");

    // A dead agent: its target goes down, then the leader counts its node down.
    cluster.kill(Target::Agent(0)).await.unwrap();
    wait_value(&prom, r#"count(up{job="sandfleet-agent"} == 0)"#, 1.0, SCRAPE_SLACK).await;
    let limit = NODE_TTL + MOVE_SLACK + SCRAPE_SLACK;
    wait_value(&prom, &on_leader(r#"sandfleet_nodes{state="down"}"#), 1.0, limit).await;
    wait_value(&prom, &on_leader(r#"sandfleet_nodes{state="ready"}"#), 1.0, SCRAPE_SLACK).await;
    // The rule as shipped sees it too (pending for its `for:` duration, then firing).
    wait(&prom, r#"ALERTS{alertname="SandfleetNodeDown"}"#, |s| s.len() == 1, SCRAPE_SLACK).await;
}
