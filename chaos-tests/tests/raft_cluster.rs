//! The coordinator cluster as a replicated system: three (or more)
//! `sandfleet-coordinator` processes on loopback, crashed with SIGKILL,
//! restarted, re-shaped with AddMember/RemoveMember, and compared member by
//! member (applied index and state digest) at the end of every test.
//!
//! Sessions are created against a real agent, so the tests need the same
//! facilities as the other end-to-end tests (they print a SKIPPED banner without
//! them, unless `SANDFLEET_REQUIRE_FACILITIES=1`).

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandfleet::{proto, Backoff, Client, CreateSession};
use sandfleet_testkit::helpers::request_id;
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};
use tonic::Code;

use common::start;

const CONVERGE: Duration = Duration::from_secs(60);
/// The bound: after the leader dies, writes succeed again within this.
const FAILOVER_BOUND: Duration = Duration::from_secs(2);

/// Three coordinators and one agent with room for many tiny sessions.
fn three(extra_coordinator_args: &[&str]) -> ClusterBuilder {
    ClusterBuilder::new()
        .coordinators(3)
        .agents(1)
        .agent_args(["--slots", "1000", "--cpu", "1000", "--memory", "64Gi"])
        .coordinator_args(extra_coordinator_args.iter().copied())
}

fn tiny(rid: &str) -> CreateSession {
    CreateSession::new()
        .request_id(rid.to_string())
        .memory_bytes(16 << 20)
        .cpu_millis(10)
        .pids_limit(16)
        .ttl(Duration::from_secs(3600))
}

/// What the writers saw: acknowledged creates (request id → session id) and
/// request ids whose outcome is unknown (the call failed; it may have committed).
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, String>,
    unknown: BTreeSet<String>,
}

/// Concurrent writers creating sessions until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(client: &Client, n: usize, prefix: &str) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let tasks = (0..n)
            .map(|w| {
                let (client, stop, ledger) = (client.clone(), stop.clone(), ledger.clone());
                let prefix = format!("{prefix}{w}");
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let rid = request_id(&prefix);
                        match client.create_session(tiny(&rid)).await {
                            Ok(s) => {
                                ledger.lock().unwrap().acked.insert(rid, s.id);
                            }
                            Err(e) => {
                                ledger.lock().unwrap().unknown.insert(rid);
                                eprintln!("writer: create failed (outcome unknown): {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers { stop, ledger, tasks }
    }

    fn acked(&self) -> usize {
        self.ledger.lock().unwrap().acked.len()
    }

    async fn wait_acked_at_least(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            assert!(Instant::now() < deadline, "writers acknowledged only {} creates in {timeout:?}", self.acked());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task panicked");
        }
        Arc::try_unwrap(self.ledger).ok().expect("writers stopped").into_inner().unwrap()
    }
}

/// Every acknowledged create is present with the id it was acknowledged with,
/// no request id has two sessions, and every session traces back to a writer.
async fn check_no_loss_no_dup(client: &Client, ledger: &Ledger, prefix: &str) {
    let sessions = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    let mut by_rid: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &sessions {
        by_rid.entry(s.request_id.as_str()).or_default().push(s.id.as_str());
    }
    let dups: Vec<_> = by_rid.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(dups.is_empty(), "request ids with more than one session: {dups:?}");
    for (rid, id) in &ledger.acked {
        match by_rid.get(rid.as_str()) {
            Some(ids) => assert_eq!(ids, &vec![id.as_str()], "request id {rid} acknowledged as {id}"),
            None => panic!("acknowledged create {rid} (session {id}) is missing"),
        }
    }
    for rid in by_rid.keys().filter(|r| r.starts_with(prefix)) {
        assert!(
            ledger.acked.contains_key(*rid) || ledger.unknown.contains(*rid),
            "session with request id {rid} was never requested"
        );
    }
}

/// RemoveMember, retried while the cluster has no leader to forward to. The
/// SDK does not retry membership changes by itself (they are not idempotent),
/// so right after a leader was removed a caller can see UNAVAILABLE.
async fn remove_when_led(client: &Client, id: u64) -> proto::ClusterStatusResponse {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match client.remove_member(id).await {
            Ok(s) => return s,
            Err(e) if e.code() == Some(Code::Unavailable) && Instant::now() < until => {
                eprintln!("remove {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("removing member {id}: {e}"),
        }
    }
}

/// (session id, request id) of every session.
async fn session_keys(client: &Client) -> BTreeSet<(String, String)> {
    let all = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    all.into_iter().map(|s| (s.id, s.request_id)).collect()
}

fn voters(s: &proto::ClusterStatusResponse) -> BTreeSet<u64> {
    s.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

fn member_ids(s: &proto::ClusterStatusResponse) -> BTreeSet<u64> {
    s.members.iter().map(|m| m.id).collect()
}

async fn leader_index(cluster: &mut Cluster) -> usize {
    let s = cluster.wait_converged(CONVERGE).await.unwrap();
    cluster.coordinator_index(s.leader_id).expect("the leader is one of ours")
}

/// A client that retries quickly, to measure the cluster rather than SDK backoff.
async fn probe_client(cluster: &Cluster, addrs: Vec<String>) -> Client {
    cluster
        .client_for(addrs)
        .request_timeout(Duration::from_millis(500))
        .max_retries(1000)
        .backoff(Backoff::new(Duration::from_millis(10), Duration::from_millis(50)))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_during_creates_loses_nothing_and_fails_over_fast() {
    require_facilities!();
    let mut cluster = start(three(&[])).await;
    let client = cluster.client().await;
    let leader = leader_index(&mut cluster).await;
    let before = cluster.status().await.unwrap();

    let writers = Writers::start(&client, 4, "kill");
    writers.wait_acked_at_least(30, Duration::from_secs(30)).await;

    let probe = probe_client(&cluster, cluster.coordinator_addrs()).await;
    cluster.kill(Target::Coordinator(leader)).await.unwrap();
    let killed = Instant::now();
    let probe_rid = request_id("probe");
    let probe_session = probe.create_session(tiny(&probe_rid)).await.expect("a write after the leader died");
    let failover = killed.elapsed();
    eprintln!("leader {} killed; first write committed after {failover:?}", leader + 1);

    let after_kill = writers.acked();
    writers.wait_acked_at_least(after_kill + 30, Duration::from_secs(30)).await;
    let mut ledger = writers.stop().await;
    ledger.acked.insert(probe_rid, probe_session.id);

    let status = cluster.status().await.unwrap();
    assert_ne!(status.leader_id, before.leader_id, "a new leader was elected");
    assert_eq!(voters(&status), voters(&before), "a crash does not change membership");

    // The killed member restarts and catches up.
    cluster.restart(Target::Coordinator(leader)).await.unwrap();
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(converged.members.len(), 3);
    check_no_loss_no_dup(&client, &ledger, "kill").await;
    eprintln!("acked {} creates, {} with unknown outcome", ledger.acked.len(), ledger.unknown.len());
    // The create counter is replicated state: the new leader counted every create, before and after the kill.
    let created = converged.sessions_created - before.sessions_created;
    let (acked, unknown) = (ledger.acked.len() as u64, ledger.unknown.len() as u64);
    assert!(
        (acked..=acked + unknown).contains(&created),
        "sessions_created grew by {created}; {acked} creates were acknowledged and {unknown} have an unknown outcome"
    );
    assert!(
        failover <= FAILOVER_BOUND,
        "writes resumed {failover:?} after the leader died; the bound is {FAILOVER_BOUND:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_while_writes_run() {
    require_facilities!();
    // Small snapshots, so the new member also starts from a snapshot.
    let mut cluster = start(three(&["--snapshot-after-entries", "40", "--keep-log-entries", "5"])).await;
    let client = cluster.client().await;
    let writers = Writers::start(&client, 3, "member");
    writers.wait_acked_at_least(60, Duration::from_secs(30)).await;

    // A fourth coordinator joins: learner first, voter once caught up.
    let new = cluster.spawn_coordinator().await.unwrap();
    let new_addr = cluster.coordinators[new].addr.clone();
    let status = client.add_member(4, &new_addr).await.unwrap();
    assert_eq!(voters(&status), BTreeSet::from([1, 2, 3, 4]));
    let n = writers.acked();
    writers.wait_acked_at_least(n + 20, Duration::from_secs(30)).await;

    // Remove the current leader, then one more member, with writes still running.
    let leader_id = cluster.status().await.unwrap().leader_id;
    let status = remove_when_led(&client, leader_id).await;
    assert!(!member_ids(&status).contains(&leader_id), "member {leader_id} removed: {status:?}");
    let n = writers.acked();
    writers.wait_acked_at_least(n + 20, Duration::from_secs(30)).await;
    let removed = cluster.coordinator_index(leader_id).unwrap();
    cluster.terminate(Target::Coordinator(removed)).await.unwrap();

    let remaining: Vec<u64> = voters(&cluster.status().await.unwrap()).into_iter().collect();
    let second = *remaining.iter().find(|id| **id != 4).unwrap();
    let status = remove_when_led(&client, second).await;
    assert_eq!(voters(&status).len(), 2);
    let n = writers.acked();
    writers.wait_acked_at_least(n + 20, Duration::from_secs(30)).await;
    let ledger = writers.stop().await;
    cluster.terminate(Target::Coordinator(cluster.coordinator_index(second).unwrap())).await.unwrap();

    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(voters(&converged).len(), 2);
    assert!(voters(&converged).contains(&4));
    let new_log = std::fs::read_to_string(&cluster.coordinators[new].log_path).unwrap();
    assert!(
        new_log.contains("installing snapshot streamed from the leader"),
        "the new member joined after compaction, so it started from a snapshot"
    );
    let survivors: Vec<String> = converged.members.iter().map(|m| m.address.clone()).collect();
    let client = cluster.client_for(survivors).connect().await.unwrap();
    check_no_loss_no_dup(&client, &ledger, "member").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_that_missed_a_compaction_catches_up_through_a_snapshot() {
    require_facilities!();
    let mut cluster = start(three(&["--snapshot-after-entries", "30", "--keep-log-entries", "5"])).await;
    let client = cluster.client().await;
    let leader = leader_index(&mut cluster).await;
    let lagging = (leader + 1) % 3;
    let lagging_id = (lagging + 1) as u64;
    cluster.kill(Target::Coordinator(lagging)).await.unwrap();
    let last_seen =
        cluster.status().await.unwrap().members.iter().find(|m| m.id != lagging_id).map(|m| m.last_log_index).unwrap();

    // Enough writes that the survivors snapshot and purge past what the lagging member has.
    let mut ledger = Ledger::default();
    for i in 0..120 {
        let rid = request_id(&format!("snap{i}-"));
        let s = client.create_session(tiny(&rid)).await.unwrap();
        ledger.acked.insert(rid, s.id);
    }
    // Snapshots are built and logs purged in the background: wait for both survivors.
    let until = Instant::now() + Duration::from_secs(30);
    let purged = loop {
        let status = cluster.status().await.unwrap();
        let purged = status.members.iter().filter(|m| m.id != lagging_id).map(|m| m.purged_index).min().unwrap();
        if purged > last_seen {
            break purged;
        }
        assert!(Instant::now() < until, "the survivors purged their logs only up to {purged}, not past {last_seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    cluster.restart(Target::Coordinator(lagging)).await.unwrap();
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    let member = converged.members.iter().find(|m| m.id == lagging_id).unwrap();
    assert!(member.snapshot_index >= purged, "the lagging member holds the snapshot: {member:?}");
    let log = std::fs::read_to_string(&cluster.coordinators[lagging].log_path).unwrap();
    assert!(log.contains("installing snapshot streamed from the leader"), "it caught up through a snapshot");

    // It serves the state on its own (stale read, so it answers from its own copy).
    let only = cluster.client_for([cluster.coordinators[lagging].addr.clone()]).connect().await.unwrap();
    let req = proto::ListSessionsRequest { consistency: proto::ReadConsistency::Stale as i32, ..Default::default() };
    let seen: BTreeSet<String> = only.list_all_sessions(req).await.unwrap().into_iter().map(|s| s.id).collect();
    for (rid, id) in &ledger.acked {
        assert!(seen.contains(id), "{rid} ({id}) missing on the restarted member");
    }
    // The create counter came with the snapshot: the member's own count is the leader's.
    let own = only.cluster_status().await.unwrap();
    assert!(own.sessions_created >= ledger.acked.len() as u64, "{own:?}");
    assert_eq!(own.sessions_created, client.cluster_status().await.unwrap().sessions_created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_call_bootstraps_three_members() {
    // No sandboxes here: coordinators only.
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(0).bootstrap(false)).await;
    let addrs = cluster.coordinator_addrs();
    let members: Vec<(u64, String)> = addrs.iter().enumerate().map(|(i, a)| (i as u64 + 1, a.clone())).collect();
    let client = cluster.client_for([addrs[1].clone()]).connect().await.unwrap();

    // Bad input changes nothing.
    let err = client.init_cluster(vec![(1, addrs[0].clone())]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let err = client.init_cluster(vec![(2, "no port".to_string())]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    let status = client.init_cluster(members.clone()).await.unwrap();
    assert_ne!(status.leader_id, 0);
    assert_eq!(voters(&status), BTreeSet::from([1, 2, 3]));
    let err = client.init_cluster(members).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    cluster.wait_converged(CONVERGE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_bad_input_is_refused_and_changes_nothing() {
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(0)).await;
    let client = cluster.client().await;
    let before = cluster.wait_converged(CONVERGE).await.unwrap();
    let addrs = cluster.coordinator_addrs();

    let cases: Vec<(&str, Code, sandfleet::Error)> = vec![
        ("duplicate id", Code::AlreadyExists, client.add_member(2, "127.0.0.1:1").await.unwrap_err()),
        ("duplicate address", Code::AlreadyExists, client.add_member(7, &addrs[2]).await.unwrap_err()),
        ("unreachable address", Code::FailedPrecondition, client.add_member(7, "127.0.0.1:1").await.unwrap_err()),
        ("id zero", Code::InvalidArgument, client.add_member(0, "127.0.0.1:9").await.unwrap_err()),
        ("malformed address", Code::InvalidArgument, client.add_member(7, "not an address").await.unwrap_err()),
        ("unknown member", Code::NotFound, client.remove_member(42).await.unwrap_err()),
    ];
    for (what, code, err) in cases {
        assert_eq!(err.code(), Some(code), "{what}: {err}");
        assert!(!err.to_string().is_empty());
        let now = cluster.status().await.unwrap();
        assert_eq!(member_ids(&now), member_ids(&before), "{what} changed membership");
        assert_eq!(voters(&now), voters(&before), "{what} changed the voters");
    }
    let err = client.add_member(7, "127.0.0.1:1").await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");

    // Shrink to one voter, then removing the last one is refused.
    client.remove_member(3).await.unwrap();
    let status = client.remove_member(2).await.unwrap();
    assert_eq!(voters(&status), BTreeSet::from([1]));
    let only = cluster.client_for([addrs[0].clone()]).connect().await.unwrap();
    let err = only.remove_member(1).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("last voter"), "{err}");
    let status = only.cluster_status().await.unwrap();
    assert_eq!(voters(&status), BTreeSet::from([1]));
    // The removed members can go; the one left is the whole cluster.
    cluster.terminate(Target::Coordinator(1)).await.unwrap();
    cluster.terminate(Target::Coordinator(2)).await.unwrap();
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(member_ids(&converged), BTreeSet::from([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restores_from_one_members_data_dir() {
    require_facilities!();
    let mut cluster = start(three(&[])).await;
    let client = cluster.client().await;
    let mut ledger = Ledger::default();
    for i in 0..20 {
        let rid = request_id(&format!("restore{i}-"));
        let s = client.create_session(tiny(&rid)).await.unwrap();
        ledger.acked.insert(rid, s.id);
    }
    cluster.wait_converged(CONVERGE).await.unwrap();
    let before = session_keys(&client).await;

    // Lose the whole cluster; keep member 1's data dir as the backup.
    for i in 0..3 {
        cluster.kill(Target::Coordinator(i)).await.unwrap();
    }
    cluster.coordinators[0].args.push("--force-new-cluster".into());
    cluster.restart(Target::Coordinator(0)).await.unwrap();

    let restored = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(member_ids(&restored), BTreeSet::from([1]), "a new one-member cluster");
    let only = cluster.client_for([cluster.coordinators[0].addr.clone()]).connect().await.unwrap();
    let after = session_keys(&only).await;
    // The agent keeps running and reporting, so compare content, not the digest.
    assert_eq!(after, before, "every session came back");
    check_no_loss_no_dup(&only, &ledger, "restore").await;
    let rid = request_id("restore-after");
    only.create_session(tiny(&rid)).await.expect("the restored cluster takes writes");

    // A fresh member joins the restored cluster and gets the restored state.
    let new = cluster.spawn_coordinator().await.unwrap();
    let addr = cluster.coordinators[new].addr.clone();
    only.add_member(4, &addr).await.unwrap();
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(member_ids(&converged), BTreeSet::from([1, 4]));
}

/// Group commit: many concurrent creates, some of them the same request id
/// twice at once, become fewer Raft entries than creates, and every caller
/// still gets its own answer. Idempotency holds inside a batch (a request id
/// yields one session, both callers see it), and every member applies the
/// batches to the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_are_group_committed_and_answered_one_by_one() {
    require_facilities!();
    // No agent: the sessions stay PENDING; this is the commit path only.
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(0)).await;
    let client = cluster.client().await;
    let leader = leader_index(&mut cluster).await;
    let before = cluster.status().await.unwrap();
    let log_before = before.members.iter().map(|m| m.last_log_index).max().unwrap_or(0);

    const UNIQUE: usize = 240;
    const TWICE: usize = 60;
    let rids: Vec<String> = (0..UNIQUE).map(|i| request_id(&format!("group{i}"))).collect();
    // The first TWICE request ids are sent twice, concurrently.
    let calls: Vec<String> = rids.iter().cloned().chain(rids[..TWICE].iter().cloned()).collect();
    let answers = futures::future::join_all(calls.iter().map(|rid| {
        let client = client.clone();
        let rid = rid.clone();
        async move {
            let resp = client.create_session(tiny(&rid)).await.unwrap_or_else(|e| panic!("create {rid}: {e}"));
            (rid, resp)
        }
    }))
    .await;

    let mut by_rid: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rid, session) in &answers {
        assert_eq!(&session.request_id, rid, "each caller gets the session of its own request id");
        by_rid.entry(rid.clone()).or_default().insert(session.id.clone());
    }
    assert_eq!(by_rid.len(), UNIQUE);
    for (rid, ids) in &by_rid {
        assert_eq!(ids.len(), 1, "request id {rid} was answered with more than one session: {ids:?}");
    }
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(
        converged.sessions_created - before.sessions_created,
        UNIQUE as u64,
        "one session per request id, however the creates were batched"
    );
    let listed = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    assert_eq!(listed.len(), UNIQUE);

    let log_after = converged.members.iter().map(|m| m.last_log_index).max().unwrap_or(0);
    let entries = log_after - log_before;
    eprintln!(
        "{} creates ({} of them repeats) took {entries} log entries on leader {}",
        calls.len(),
        TWICE,
        leader + 1
    );
    assert!(
        entries < calls.len() as u64,
        "{} concurrent creates took {entries} entries: they were not group-committed",
        calls.len()
    );
}

/// `--group-commit 1` (for a rolling upgrade from a version without group
/// commit): every command is its own entry again, as older members expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_1_writes_one_entry_per_command() {
    require_facilities!();
    let mut cluster =
        start(ClusterBuilder::new().coordinators(3).agents(0).coordinator_args(["--group-commit", "1"])).await;
    let client = cluster.client().await;
    let before = cluster.status().await.unwrap();
    let log_before = before.members.iter().map(|m| m.last_log_index).max().unwrap_or(0);
    const CREATES: usize = 60;
    let created = futures::future::join_all((0..CREATES).map(|i| {
        let client = client.clone();
        async move { client.create_session(tiny(&request_id(&format!("single{i}")))).await }
    }))
    .await;
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let converged = cluster.wait_converged(CONVERGE).await.unwrap();
    let entries = converged.members.iter().map(|m| m.last_log_index).max().unwrap_or(0) - log_before;
    assert!(entries >= CREATES as u64, "{CREATES} creates took only {entries} entries with --group-commit 1");
}
