//! Assignment pushes (`AgentService.WatchAssignments`) against the real
//! binaries, followed as an outside agent would follow them.
//!
//! A raw agent (an agent's certificate, no `sandfleet-agent`) watches its
//! node on every coordinator of a three-member cluster: with `deltas` on two
//! of them, without on the third. While sessions are placed on the node,
//! renewed and deleted:
//! - the first push of every stream is the full set, and a delta stream's
//!   later pushes carry only what changed (an added or renewed session, a
//!   removed id);
//! - the set rebuilt from the deltas, on the leader and on followers alike,
//!   is the full set a heartbeat answers with at the same version;
//! - a stream without `deltas` gets the full set on every push.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sandfleet::proto;
use sandfleet_testkit::helpers::small_session;
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::ClusterBuilder;
use tokio::sync::watch;

use common::{raw_agent, start, AgentApi, SHORT};

/// (generation, expiry) of each session in a set, by id: what an agent acts on.
type Set = BTreeMap<String, (u64, i64)>;

fn set_of(assignments: &[proto::Assignment]) -> Set {
    assignments.iter().map(|a| (a.session_id.clone(), (a.generation, a.expires_at_ms))).collect()
}

/// What a watcher has followed: the rebuilt set, its version, and every push.
#[derive(Clone, Default)]
struct Followed {
    set: Set,
    version: u64,
    pushes: Vec<proto::HeartbeatResponse>,
    /// The first push that broke the protocol, if one did.
    broken: Option<String>,
}

/// Follows one stream in the background, rebuilding the set from its pushes.
async fn follow(mut api: AgentApi, node_id: &str, deltas: bool) -> watch::Receiver<Followed> {
    let req = proto::WatchAssignmentsRequest { node_id: node_id.into(), deltas };
    let mut stream = api.watch_assignments(req).await.expect("a watch").into_inner();
    let (tx, rx) = watch::channel(Followed::default());
    tokio::spawn(async move {
        while let Ok(Some(push)) = stream.message().await {
            tx.send_modify(|f| {
                let mut broken = Vec::new();
                if push.delta {
                    if f.pushes.is_empty() {
                        broken.push("a delta came before the first full set".to_string());
                    }
                    for id in &push.removed_session_ids {
                        if f.set.remove(id).is_none() {
                            broken.push(format!("{id} removed but never pushed"));
                        }
                    }
                    f.set.extend(set_of(&push.assignments));
                } else {
                    f.set = set_of(&push.assignments);
                }
                if push.assignments_version < f.version {
                    broken.push(format!("went back from version {} to {}", f.version, push.assignments_version));
                }
                if !broken.is_empty() && f.broken.is_none() {
                    f.broken = Some(format!("{broken:?} at {push:?}"));
                }
                f.version = push.assignments_version;
                f.pushes.push(push);
            });
        }
    });
    rx
}

/// Heartbeats (keeping the node alive) until every watcher holds the set a
/// heartbeat answers with, pushed at or before that answer's version (entries
/// that touch no session of the node push nothing); returns that set.
async fn converge(api: &mut AgentApi, node_id: &str, watchers: &mut [watch::Receiver<Followed>]) -> Set {
    let until = Instant::now() + SHORT;
    loop {
        let mut req = tonic::Request::new(proto::HeartbeatRequest {
            node_id: node_id.into(),
            resend_uncommitted: true,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(10));
        let answer = api.heartbeat(req).await.expect("a heartbeat answer").into_inner();
        let want = set_of(&answer.assignments);
        let at = answer.assignments_version;
        for w in watchers.iter() {
            assert_eq!(w.borrow().broken, None, "a push broke the protocol");
        }
        if watchers.iter_mut().all(|w| {
            let f = w.borrow_and_update();
            f.version <= at && f.set == want
        }) {
            return want;
        }
        let seen: Vec<(u64, Set)> = watchers
            .iter()
            .map(|w| {
                let f = w.borrow();
                (f.version, f.set.clone())
            })
            .collect();
        assert!(Instant::now() < until, "the watchers never held the heartbeat's set {want:?} at {at}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pushes a watcher has had since `from`.
fn pushes_since(w: &watch::Receiver<Followed>, from: usize) -> Vec<proto::HeartbeatResponse> {
    w.borrow().pushes[from..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_pushes_rebuild_the_heartbeat_set_on_every_coordinator() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(3).agents(0)).await;
    let node_id = format!("raw-{}", nonce());
    let mut api = raw_agent(&cluster, 0, &node_id).await;
    let mut watchers = Vec::new();
    for (coordinator, deltas) in [(0, true), (1, true), (2, false)] {
        let api = raw_agent(&cluster, coordinator, &node_id).await;
        watchers.push(follow(api, &node_id, deltas).await);
    }
    let empty = converge(&mut api, &node_id, &mut watchers).await;
    assert!(empty.is_empty(), "a new node has nothing assigned: {empty:?}");
    for w in &watchers {
        let first = &w.borrow().pushes[0];
        assert!(!first.delta, "the first push is the full set: {first:?}");
    }

    // Three sessions placed on the node (the cluster's only one).
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(client.create_session(small_session(&format!("watched-{i}"))).await.unwrap().id);
    }
    let full = converge(&mut api, &node_id, &mut watchers).await;
    ids.sort();
    assert_eq!(full.keys().cloned().collect::<Vec<_>>(), ids);
    for w in &watchers[..2] {
        for push in &w.borrow().pushes[1..] {
            assert!(push.delta, "after the first, a delta stream pushes deltas: {push:?}");
            assert!(push.removed_session_ids.is_empty(), "nothing was removed: {push:?}");
        }
    }

    // A renewal: each delta stream pushes that one session, changed, and nothing else.
    let mark: Vec<usize> = watchers.iter().map(|w| w.borrow().pushes.len()).collect();
    let renewed = client.renew_session(&ids[0], Some(Duration::from_secs(1200))).await.unwrap();
    let after = converge(&mut api, &node_id, &mut watchers).await;
    assert_eq!(after[&ids[0]].1, renewed.expires_at_ms, "the new expiry is assigned");
    for (w, from) in watchers[..2].iter().zip(&mark) {
        let pushes = pushes_since(w, *from);
        assert!(!pushes.is_empty(), "the renewal was pushed");
        for push in pushes {
            assert!(push.delta && push.removed_session_ids.is_empty(), "{push:?}");
            assert_eq!(set_of(&push.assignments).keys().collect::<Vec<_>>(), [&ids[0]], "only the renewed session");
        }
    }

    // A delete: the delta streams push the id removed, and no assignment.
    let mark: Vec<usize> = watchers.iter().map(|w| w.borrow().pushes.len()).collect();
    client.delete_session(&ids[1]).await.unwrap();
    let after = converge(&mut api, &node_id, &mut watchers).await;
    assert!(!after.contains_key(&ids[1]) && after.len() == 2, "{after:?}");
    for (w, from) in watchers[..2].iter().zip(&mark) {
        let pushes = pushes_since(w, *from);
        let removed: Vec<&String> = pushes.iter().flat_map(|p| &p.removed_session_ids).collect();
        assert_eq!(removed, [&ids[1]], "{pushes:?}");
        assert!(pushes.iter().all(|p| p.delta && p.assignments.is_empty()), "{pushes:?}");
    }

    // The stream without deltas had the full set on every push.
    let full_stream = watchers[2].borrow().clone();
    assert!(full_stream.pushes.len() >= 3, "{} pushes", full_stream.pushes.len());
    for push in &full_stream.pushes {
        assert!(!push.delta && push.removed_session_ids.is_empty(), "{push:?}");
    }
    assert_eq!(set_of(&full_stream.pushes.last().unwrap().assignments), after);
}
