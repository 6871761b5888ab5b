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
//! - every metric `docs/operations.md` lists is exported under that name (but
//!   those only rare events create), and nothing else;
//! - the metrics listener answers `/healthz` and `/readyz`, and the ready line
//!   names it;
//! - every query of the Grafana dashboard (`deploy/observability`) runs on
//!   the real series without an error (promtool only parses them).
//!
//! The coordinators run with a short node TTL (`--agent-heartbeat 500ms
//! --node-ttl 3s`) to keep the test quick.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use sandfleet::proto::SessionState;
use sandfleet_testkit::helpers::{create_running, describe, exec_argv, list_all_sessions, small_session};
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

/// The metric names and types of `docs/operations.md`'s tables (rows
/// `` | `sandfleet_x` | gauge | ... | ``), as `scripts/check-observability` reads them.
fn documented_metrics() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut metrics = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells.as_slice() {
            let name = name.trim_matches('`');
            if name.starts_with("sandfleet_") && ["counter", "gauge", "histogram"].contains(kind) {
                metrics.push((name.to_string(), kind.to_string()));
            }
        }
    }
    assert!(metrics.len() > 30, "{}: only {} metrics in its tables", path.display(), metrics.len());
    metrics
}

/// Every query of the dashboard, with Grafana's variables filled in as "All".
fn dashboard_queries() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/sandfleet-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let expr = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*");
            queries.push((panel["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    queries
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

    // One exec, for the agents' exec series.
    let session = list_all_sessions(&client, &[], &[SessionState::Running]).await.unwrap().remove(0);
    let out = exec_argv(&client, &session, ["true"], Duration::from_secs(30)).await.unwrap();
    assert!(out.success(), "{}", describe(&out));
    wait(
        &prom,
        r#"sum(sandfleet_agent_execs_total{result="ok"})"#,
        |s| single(s).is_some_and(|v| v >= 1.0),
        SCRAPE_SLACK,
    )
    .await;

    // Every series is one docs/operations.md lists (the contract's names, units and
    // suffixes included), and every metric it lists is there, but for those that
    // only an event this test does not cause creates.
    let documented = documented_metrics();
    let is_documented = |name: &str| {
        documented.iter().any(|(n, kind)| {
            name == n
                || (kind == "histogram"
                    && ["_bucket", "_sum", "_count"].iter().any(|suffix| name.strip_suffix(suffix) == Some(n)))
        })
    };
    let event_only = [
        // A session that fits is placed by its create; placement rounds place waiting ones.
        "sandfleet_placement_round_duration_seconds",
        "sandfleet_placement_round_placements",
        "sandfleet_placements_total",
        "sandfleet_raft_snapshot_build_duration_seconds",
        "sandfleet_agent_exec_output_capped_total",
        "sandfleet_agent_heartbeat_failures_total",
        // Only while a busy log makes heartbeats answer before their reports commit.
        "sandfleet_heartbeat_reports_uncommitted_total",
        "sandfleet_agent_heartbeat_reports_resent_total",
        "sandfleet_agent_sessions_fenced_total",
        "sandfleet_agent_workspace_transfer_failures_total",
        // Series exist only while a pool does (tests/pools.rs reads them).
        "sandfleet_pool_sandboxes",
    ];
    let required: Vec<String> = documented
        .iter()
        .filter(|(n, _)| !event_only.contains(&n.as_str()))
        .map(|(n, kind)| if kind == "histogram" { format!("{n}_count") } else { n.clone() })
        .collect();
    let names_of = |samples: &[Sample]| -> Vec<String> {
        samples.iter().filter_map(|(labels, _)| labels.get("__name__").cloned()).collect()
    };
    let all_names = r#"group by (__name__) ({__name__=~"sandfleet_.+"})"#;
    let seen =
        match prom.wait_until(all_names, |s| required.iter().all(|r| names_of(s).contains(r)), SCRAPE_SLACK).await {
            Ok(s) => s,
            Err(_) => prom.query(all_names).await.unwrap(),
        };
    let names = names_of(&seen);
    let undocumented: Vec<&String> = names.iter().filter(|n| !is_documented(n)).collect();
    let missing: Vec<&String> = required.iter().filter(|r| !names.contains(r)).collect();
    eprintln!("series names: {names:?}");
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "the metrics differ from docs/operations.md's tables:\n  exported but not listed (misnamed?): \
         {undocumented:?}\n  listed but not exported: {missing:?}"
    );

    // The ready lines name the metrics listeners the harness chose.
    for (t, addr) in cluster.metrics_addrs() {
        let ready = cluster.proc(t).ready.clone().expect("started");
        assert_eq!(ready.metrics(), Some(addr.as_str()), "{t:?}'s ready line: {ready}");
    }

    // Every dashboard query runs on the real series (joins and group modifiers included).
    let queries = dashboard_queries();
    assert!(queries.len() > 40, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        match prom.query(expr).await {
            Ok(samples) if samples.is_empty() => empty.push(panel.as_str()),
            Ok(_) => {}
            Err(e) => panic!("the dashboard's panel {panel:?}: {e}"),
        }
    }
    eprintln!("dashboard: {} queries ran; no data yet for: {empty:?}", queries.len());
    for core in ["Leader", "Sessions by state", "Nodes by state", "Commit and applied index", "Sandboxes running"] {
        assert!(!empty.contains(&core), "the dashboard's {core:?} panel has data: {empty:?}");
    }

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
