//! Session reports answered before their commit, against the real binaries.
//!
//! The leader answers a heartbeat within `--report-wait` however busy its log
//! is; an agent that sets `resend_uncommitted` keeps the reports the answer
//! does not call committed and sends them again. Here `--report-wait 0s`
//! makes every first answer come before the commit:
//! - over raw `AgentService` calls (an agent's certificate): answers say "not
//!   committed" until the report sent again is committed (the session is
//!   RUNNING whenever an answer says so), and a report sent after its commit
//!   changes nothing and adds no Raft entry;
//!   an older agent's heartbeat (without `resend_uncommitted`) still waits
//!   for the commit;
//! - with a real `sandfleet-agent`: its session runs and takes commands, and
//!   both sides' counters show the reports went again.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use sandfleet::proto;
use sandfleet_testkit::helpers::{create_running, exec_argv, small_session, stdout};
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::{ClusterBuilder, Target};

use common::{raw_agent, start, AgentApi, SHORT};

/// Every heartbeat with new reports is answered before they are committed.
const NO_WAIT: [&str; 2] = ["--report-wait", "0s"];

async fn heartbeat(
    api: &mut AgentApi,
    node_id: &str,
    reports: Vec<proto::SessionReport>,
    resend_uncommitted: bool,
) -> proto::HeartbeatResponse {
    let mut req = tonic::Request::new(proto::HeartbeatRequest {
        node_id: node_id.into(),
        reports,
        resend_uncommitted,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(10));
    api.heartbeat(req).await.expect("a heartbeat answer").into_inner()
}

/// Heartbeats (without reports) until the node is assigned `session`; its generation.
async fn assigned(api: &mut AgentApi, node_id: &str, session: &str) -> u64 {
    let until = Instant::now() + SHORT;
    loop {
        let resp = heartbeat(api, node_id, Vec::new(), true).await;
        assert!(resp.reports_committed, "nothing to commit is committed");
        if let Some(a) = resp.assignments.iter().find(|a| a.session_id == session) {
            return a.generation;
        }
        assert!(Instant::now() < until, "{session} was not assigned to {node_id}: {:?}", resp.assignments);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(session: &str, generation: u64, state: proto::SessionState) -> proto::SessionReport {
    proto::SessionReport {
        session_id: session.into(),
        generation,
        state: state as i32,
        message: if state == proto::SessionState::Failed { "could not start".into() } else { String::new() },
    }
}

/// A counter's value on a `/metrics` page (0 when the series is absent).
async fn counter(cluster: &sandfleet_testkit::Cluster, t: Target, name: &str) -> f64 {
    let addr = cluster.metrics_addr(t).expect("a metrics listener");
    let (code, text) = sandfleet_testkit::prometheus::http_get(&addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_answered_before_its_commit_is_sent_again_and_applies_once() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(0).coordinator_args(NO_WAIT)).await;
    let node_id = format!("raw-{}", nonce());
    let mut api = raw_agent(&cluster, 0, &node_id).await;
    let client = cluster.client().await;

    // A new agent. With no wait, an answer comes before the commit unless the
    // commit won the race with it (possible on a loaded machine); whenever an
    // answer says committed, the session is RUNNING. Over five sessions, at
    // least one answer must have come early.
    let mut early = 0;
    let mut last = None;
    for i in 0..5 {
        let s = client.create_session(small_session(&format!("resent-{i}"))).await.unwrap();
        let generation = assigned(&mut api, &node_id, &s.id).await;
        let running = report(&s.id, generation, proto::SessionState::Running);
        // Sent again until an answer says it is committed: the session is RUNNING then.
        let until = Instant::now() + SHORT;
        let committed_at = loop {
            let resp = heartbeat(&mut api, &node_id, vec![running.clone()], true).await;
            if resp.reports_committed {
                break resp.assignments_version;
            }
            early += 1;
            assert!(Instant::now() < until, "the report was never answered as committed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let got = client.get_session(&s.id).await.unwrap();
        assert_eq!(got.state, proto::SessionState::Running as i32, "{got:?}");
        last = Some((s, generation, running, committed_at, got));
    }
    assert!(early >= 1, "--report-wait 0s answered some report before its commit");
    let (s, generation, running, committed_at, got) = last.unwrap();
    // Sent once more after its commit: answered committed at once, with no new Raft entry.
    let again = heartbeat(&mut api, &node_id, vec![running.clone()], true).await;
    assert!(again.reports_committed);
    assert_eq!(again.assignments_version, committed_at, "a report already applied proposes nothing");
    assert_eq!(client.get_session(&s.id).await.unwrap().updated_at_ms, got.updated_at_ms, "nothing changed");
    // A stale report (an older generation) is not the agent's problem either.
    let stale = report(&s.id, generation - 1, proto::SessionState::Failed);
    assert!(heartbeat(&mut api, &node_id, vec![stale], true).await.reports_committed);
    assert_eq!(client.get_session(&s.id).await.unwrap().state, proto::SessionState::Running as i32);

    // An older agent (no resend_uncommitted) is answered only after the commit.
    let old = client.create_session(small_session("old-agent")).await.unwrap();
    let generation = assigned(&mut api, &node_id, &old.id).await;
    let failed = report(&old.id, generation, proto::SessionState::Failed);
    let resp = heartbeat(&mut api, &node_id, vec![failed], false).await;
    assert!(resp.reports_committed, "an older agent's reports are committed when it is answered");
    let got = client.get_session(&old.id).await.unwrap();
    assert_eq!(got.state, proto::SessionState::Failed as i32, "{got:?}");
    assert_eq!(got.message, "could not start");
    assert!(!resp.assignments.iter().any(|a| a.session_id == old.id), "a FAILED session is not assigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_sends_uncommitted_reports_again_and_its_sessions_run() {
    require_facilities!();
    let builder = ClusterBuilder::new().coordinators(1).agents(1).coordinator_args(NO_WAIT).metrics_listeners(true);
    let cluster = start(builder).await;
    let client = cluster.client().await;
    // Three sessions, so that at least one report loses the race with its
    // answer even on a loaded machine.
    for i in 0..3 {
        let s = create_running(&client, small_session(&format!("agent-resent-{i}"))).await.unwrap();
        let out = exec_argv(&client, &s, ["sh", "-c", "echo ran"], SHORT).await.unwrap();
        assert_eq!(stdout(&out), "ran\n");
    }
    // A RUNNING report was answered before the commit at least once, and went again.
    let early = counter(&cluster, Target::Coordinator(0), "sandfleet_heartbeat_reports_uncommitted_total").await;
    let resent = counter(&cluster, Target::Agent(0), "sandfleet_agent_heartbeat_reports_resent_total").await;
    assert!(early >= 1.0, "the leader answered a report before its commit: {early}");
    assert!(resent >= 1.0, "the agent sent its report again: {resent}");
    // And then stopped: once committed, a report is not sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = counter(&cluster, Target::Agent(0), "sandfleet_agent_heartbeat_reports_resent_total").await;
    assert_eq!(later, resent, "no report was pending any more, so none went again");
}
