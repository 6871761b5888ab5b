//! The checks after the workload: every acknowledged create is retrievable,
//! no request id made two sessions, the history is linearizable, and after
//! faults the coordinators converge, live sessions run again and no session
//! has a copy off its node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt as _;
use sandfleet::{proto, Client};
use sandfleet_testkit::helpers::{list_all_sessions, state_of};
use sandfleet_testkit::linearizability::{CheckResult, History};
use sandfleet_testkit::Cluster;

use crate::workload::{Ledger, RUN_LABEL};

/// After the faults: all coordinators agree, live sessions run again, and no
/// session has a copy on a node it is not placed on.
pub async fn verify_after_faults(cluster: &mut Cluster, client: &Client, run: &str, ledger: &Ledger) -> Vec<String> {
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
        let dirs = sandfleet_testkit::host::cgroup_dirs_matching(&s.id);
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

/// Checks the cluster's promises against the ledger; returns the violations found.
pub async fn verify(client: &Client, run: &str, ledger: &Ledger) -> Result<Vec<String>> {
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
pub async fn check_history(history: &History) -> (String, Option<String>) {
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
