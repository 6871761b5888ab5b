//! Coordinators as a Kubernetes StatefulSet runs them, with the real binaries
//! as processes: member ids from pod hostnames (`--id-from-hostname`), peers
//! from a fixed list (`--initial-members`), the automatic `cluster init`, a
//! rolling restart member by member, and the `grpc.health.v1` service that
//! readiness and liveness probes ask (`--health-listen`), on coordinators and
//! agents.
//!
//! The container rehearsal of the same (images, hostnames and DNS names on a
//! Docker network) is in `statefulset_docker.rs`.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandfleet::{proto, Client, CreateSession};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::health::{self, ServingStatus, Watch, LIVENESS, SERVER};
use sandfleet_testkit::helpers::{create_running, exec_python, request_id, small_session, stdout};
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};

use common::start;

const CONVERGE: Duration = Duration::from_secs(60);
/// During a rolling restart no stretch without an acknowledged write is longer
/// than this (a terminated leader costs an election: about one election
/// timeout, 1 s, plus the SDK's retry backoff).
const WRITE_GAP_BOUND: Duration = Duration::from_secs(5);
/// How long the cluster may be without a known leader while one member is down.
const LEADER_BOUND: Duration = Duration::from_secs(5);
/// How long a health status may take to follow the cluster (checks run every
/// 250 ms while not ready, every second while ready; a lost leader is noticed
/// after an election timeout).
const HEALTH_BOUND: Duration = Duration::from_secs(15);

/// Three self-forming coordinators and one agent with room for many tiny sessions.
fn statefulset() -> ClusterBuilder {
    ClusterBuilder::new()
        .coordinators(3)
        .self_forming(true)
        .agents(1)
        .agent_args(["--slots", "1000", "--cpu", "1000", "--memory", "64Gi"])
}

fn tiny(rid: &str) -> CreateSession {
    CreateSession::new()
        .request_id(rid.to_string())
        .memory_bytes(16 << 20)
        .cpu_millis(10)
        .pids_limit(16)
        .ttl(Duration::from_secs(3600))
}

/// Every member as id -> (address, voter).
fn members(s: &proto::ClusterStatusResponse) -> BTreeMap<u64, (String, bool)> {
    s.members.iter().map(|m| (m.id, (m.address.clone(), m.voter))).collect()
}

fn log_of(cluster: &Cluster, i: usize) -> String {
    std::fs::read_to_string(&cluster.coordinators[i].log_path).unwrap_or_default()
}

const INITIALIZED_LINE: &str = "initialized the cluster from --initial-members";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_form_a_cluster_by_themselves_and_a_full_restart_never_initializes_again() {
    require_facilities!();
    let mut cluster = start(statefulset()).await;
    let formed = cluster.wait_converged(CONVERGE).await.unwrap();
    // Ids from the hostnames sandfleet-coordinator-0..2, addresses from --initial-members.
    let expected: BTreeMap<u64, (String, bool)> =
        cluster.coordinators.iter().map(|c| (c.id.parse().unwrap(), (c.addr.clone(), true))).collect();
    assert_eq!(expected.keys().copied().collect::<BTreeSet<_>>(), BTreeSet::from([1, 2, 3]));
    assert_eq!(members(&formed), expected, "every listed member is a voter at its listed address");
    // Member 1 (the lowest id) initialized, once; the others only joined.
    assert_eq!(log_of(&cluster, 0).matches(INITIALIZED_LINE).count(), 1);
    for i in 1..3 {
        assert!(!log_of(&cluster, i).contains(INITIALIZED_LINE), "member {} initialized too", i + 1);
    }

    let client = cluster.client().await;
    let session = create_running(&client, small_session("sts")).await.unwrap();
    let out = exec_python(&client, &session, "print(6*7)", Duration::from_secs(30)).await.unwrap();
    assert_eq!(stdout(&out).trim(), "42");
    // The auto-init wrote the first admin key; it authenticates on its own.
    let key = cluster.admin_key().expect("the initializing member wrote --admin-key-file").to_string();
    let by_key = cluster.try_client_with_key(Some(&key)).await.unwrap();
    assert_eq!(by_key.list_nodes().await.unwrap().len(), 1);
    let key_file = std::fs::read_to_string(cluster.dir().join("admin.key")).unwrap();
    let applied_before = cluster.wait_converged(CONVERGE).await.unwrap().members[0].applied_index;

    // Every member down at once, then back in reverse order: member 1, the
    // initializer, comes back last, to peers that all have their data.
    for i in 0..3 {
        cluster.terminate(Target::Coordinator(i)).await.unwrap();
    }
    for i in (0..3).rev() {
        cluster.restart(Target::Coordinator(i)).await.unwrap();
    }
    let after = cluster.wait_converged(CONVERGE).await.unwrap();
    assert_eq!(members(&after), expected, "the same membership");
    // The old log went on (a new cluster would start again from index 0).
    let applied_after = after.members[0].applied_index;
    assert!(
        applied_after >= applied_before,
        "applied index {applied_before} before the restart, {applied_after} after"
    );
    assert_eq!(log_of(&cluster, 0).matches(INITIALIZED_LINE).count(), 1, "member 1 did not initialize again");
    assert!(log_of(&cluster, 0).contains("not initializing: this member already belongs to a cluster"));

    // Data kept: the session, its workspace's node, the admin key (no second one written).
    let client = cluster.client().await;
    let got = client.get_session(&session.id).await.unwrap();
    assert_eq!(
        (got.request_id.as_str(), got.node_id.as_str()),
        (session.request_id.as_str(), session.node_id.as_str())
    );
    let out = exec_python(&client, &got, "print(7*6)", Duration::from_secs(30)).await.unwrap();
    assert_eq!(stdout(&out).trim(), "42");
    assert_eq!(std::fs::read_to_string(cluster.dir().join("admin.key")).unwrap(), key_file);
    let by_key = cluster.try_client_with_key(Some(&key)).await.unwrap();
    assert!(by_key.get_session(&session.id).await.is_ok(), "the first admin key still authenticates");
    create_running(&client, small_session("sts-after")).await.expect("the restarted cluster takes new sessions");
    cluster.shutdown().await.unwrap();
}

/// Writers creating sessions until stopped, recording when each create was acknowledged.
struct Writers {
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Ledger {
    /// request id -> session id.
    acked: BTreeMap<String, String>,
    /// When each acknowledgement arrived.
    acked_at: Vec<Instant>,
    /// Failed calls: the outcome is unknown (they may have committed).
    unknown: BTreeSet<String>,
}

impl Writers {
    fn start(client: &Client, n: usize, prefix: &str) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let tasks = (0..n)
            .map(|w| {
                let (client, stop, ledger) = (client.clone(), stop.clone(), ledger.clone());
                let prefix = format!("{prefix}{w}-");
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let rid = request_id(&prefix);
                        match client.create_session(tiny(&rid)).await {
                            Ok(s) => {
                                let mut l = ledger.lock().unwrap();
                                l.acked.insert(rid, s.id);
                                l.acked_at.push(Instant::now());
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

    /// Waits for `more` acknowledgements from now on.
    async fn wait_more(&self, more: usize, timeout: Duration, what: &str) {
        let want = self.acked() + more;
        let deadline = Instant::now() + timeout;
        while self.acked() < want {
            assert!(Instant::now() < deadline, "{what}: fewer than {more} writes acknowledged in {timeout:?}");
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

/// The longest stretch between two acknowledgements.
fn longest_gap(at: &[Instant]) -> Duration {
    let mut at = at.to_vec();
    at.sort();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// Waits until some running coordinator reports a leader other than `not`
/// (a member that is down); returns its id.
async fn wait_leader(cluster: &mut Cluster, not: Option<u64>, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        match cluster.status().await {
            Ok(s) if s.leader_id != 0 && Some(s.leader_id) != not => return s.leader_id,
            other => {
                assert!(Instant::now() < deadline, "no leader within {within:?}: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_member_by_member_keeps_a_leader_and_every_write() {
    require_facilities!();
    let mut cluster = start(statefulset().health_listeners(true)).await;
    cluster.wait_converged(CONVERGE).await.unwrap();
    let client = cluster.client().await;
    let writers = Writers::start(&client, 3, "roll");
    writers.wait_more(20, Duration::from_secs(30), "before the restart").await;

    // As a StatefulSet rolls: the highest ordinal first, each pod back and
    // ready (health SERVING: it has a leader and has caught up) before the next.
    let mut steps = Vec::new();
    for i in (0..3).rev() {
        let leader_before = wait_leader(&mut cluster, None, LEADER_BOUND).await;
        let down = Instant::now();
        cluster.terminate(Target::Coordinator(i)).await.unwrap();
        let leader = wait_leader(&mut cluster, Some(i as u64 + 1), LEADER_BOUND).await;
        writers.wait_more(10, WRITE_GAP_BOUND * 2, &format!("member {} down", i + 1)).await;
        cluster.restart(Target::Coordinator(i)).await.unwrap();
        let addr = cluster.health_addr(Target::Coordinator(i)).expect("a health listener");
        let caught_up = health::wait_for(&addr, SERVER, ServingStatus::Serving, CONVERGE).await.unwrap();
        writers.wait_more(10, WRITE_GAP_BOUND * 2, &format!("member {} back", i + 1)).await;
        steps.push(format!(
            "member {} (leader before: {leader_before}, after: {leader}): down {:?}, SERVING {caught_up:?} after its restart",
            i + 1,
            down.elapsed()
        ));
    }
    let ledger = writers.stop().await;
    let gap = longest_gap(&ledger.acked_at);
    eprintln!(
        "rolling restart: {}; {} writes acknowledged, {} unknown, longest gap {gap:?}",
        steps.join("; "),
        ledger.acked.len(),
        ledger.unknown.len()
    );
    assert!(gap <= WRITE_GAP_BOUND, "no write was acknowledged for {gap:?}; the bound is {WRITE_GAP_BOUND:?}");

    // Nothing lost, nothing doubled, every member has the same state.
    cluster.wait_converged(CONVERGE).await.unwrap();
    let sessions = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    let mut by_rid: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &sessions {
        by_rid.entry(s.request_id.as_str()).or_default().push(s.id.as_str());
    }
    for (rid, id) in &ledger.acked {
        assert_eq!(by_rid.get(rid.as_str()), Some(&vec![id.as_str()]), "acknowledged create {rid} ({id})");
    }
    for (rid, ids) in by_rid.iter().filter(|(r, _)| r.starts_with("roll")) {
        assert_eq!(ids.len(), 1, "request id {rid} has sessions {ids:?}");
        assert!(ledger.acked.contains_key(*rid) || ledger.unknown.contains(*rid), "{rid} was never requested");
    }
    cluster.shutdown().await.unwrap();
}

/// Health on the main (mutual TLS) listener, asked with the cluster CA and no
/// credential at all, as a TLS-speaking probe would.
async fn health_without_credential(cluster: &Cluster, i: usize, service: &str) -> ServingStatus {
    let ca = cluster.client_tls().expect("a TLS cluster").ca.clone();
    let dialer = sandfleet_common::tls::ClientTls::new(ca, None).unwrap().dialer(Some(IdentityKind::Coordinator));
    let opts = sandfleet_common::grpc::ChannelOptions::CLIENT;
    let channel = sandfleet_common::grpc::channel(&cluster.coordinators[i].addr, opts, Some(&dialer)).unwrap();
    health::check_on(channel, service).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_health_is_serving_only_while_the_member_is_ready() {
    // No sandboxes: coordinators only. Member 1 starts alone.
    let builder = ClusterBuilder::new().coordinators(3).self_forming(true).agents(0).health_listeners(true);
    let mut cluster = start(builder.start_coordinators(1)).await;
    let h1 = cluster.health_addr(Target::Coordinator(0)).expect("a health listener");
    let mut watch = Watch::open(&h1, SERVER).await.unwrap();
    assert_eq!(watch.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::NotServing));
    // Alone it forms no cluster, and says so, however long it waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for service in [SERVER, "sandfleet.v1.SessionService", "sandfleet.v1.RaftService"] {
        assert_eq!(health::check(&h1, service).await.unwrap(), ServingStatus::NotServing, "{service:?}");
    }
    assert_eq!(health::check(&h1, LIVENESS).await.unwrap(), ServingStatus::Serving);
    assert_eq!(health_without_credential(&cluster, 0, SERVER).await, ServingStatus::NotServing);
    assert_eq!(health_without_credential(&cluster, 0, LIVENESS).await, ServingStatus::Serving);

    // The other members start: the cluster forms, and member 1 turns SERVING.
    cluster.restart(Target::Coordinator(1)).await.unwrap();
    cluster.restart(Target::Coordinator(2)).await.unwrap();
    let before = watch.until(ServingStatus::Serving, CONVERGE).await.unwrap();
    assert!(before.iter().all(|s| *s == ServingStatus::NotServing), "{before:?}");
    for i in 0..3 {
        let addr = cluster.health_addr(Target::Coordinator(i)).unwrap();
        health::wait_for(&addr, SERVER, ServingStatus::Serving, HEALTH_BOUND).await.unwrap();
        health::wait_for(&addr, "sandfleet.v1.SessionService", ServingStatus::Serving, HEALTH_BOUND).await.unwrap();
        assert_eq!(health_without_credential(&cluster, i, SERVER).await, ServingStatus::Serving);
    }
    cluster.wait_formed(CONVERGE).await.unwrap();

    // Quorum lost: member 1 has no leader and is not ready; it is still alive.
    cluster.terminate(Target::Coordinator(1)).await.unwrap();
    cluster.terminate(Target::Coordinator(2)).await.unwrap();
    watch.until(ServingStatus::NotServing, HEALTH_BOUND).await.unwrap();
    assert_eq!(health::check(&h1, LIVENESS).await.unwrap(), ServingStatus::Serving);
    cluster.restart(Target::Coordinator(1)).await.unwrap();
    watch.until(ServingStatus::Serving, CONVERGE).await.unwrap();
    cluster.restart(Target::Coordinator(2)).await.unwrap();

    // Shutdown: a watcher hears NOT_SERVING, then the stream ends; the member exits cleanly.
    let h3 = cluster.health_addr(Target::Coordinator(2)).unwrap();
    health::wait_for(&h3, SERVER, ServingStatus::Serving, CONVERGE).await.unwrap();
    let mut watch3 = Watch::open(&h3, SERVER).await.unwrap();
    assert_eq!(watch3.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::Serving));
    let status = cluster.terminate(Target::Coordinator(2)).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(watch3.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::NotServing));
    assert!(!matches!(watch3.next(HEALTH_BOUND).await, Ok(Some(_))), "the stream ended");
    drop(watch);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_health_follows_its_registration_and_heartbeats() {
    require_facilities!();
    let mut cluster = start(ClusterBuilder::new().coordinators(1).agents(1).health_listeners(true)).await;
    let a = cluster.health_addr(Target::Agent(0)).expect("a health listener");
    health::wait_for(&a, SERVER, ServingStatus::Serving, HEALTH_BOUND).await.unwrap();
    for service in ["sandfleet.v1.ExecService", "sandfleet.v1.FileService", LIVENESS] {
        assert_eq!(health::check(&a, service).await.unwrap(), ServingStatus::Serving, "{service:?}");
    }
    let mut watch = Watch::open(&a, SERVER).await.unwrap();
    assert_eq!(watch.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::Serving));

    // Its coordinator goes: heartbeats fail, the agent is not ready (but alive).
    cluster.terminate(Target::Coordinator(0)).await.unwrap();
    watch.until(ServingStatus::NotServing, HEALTH_BOUND).await.unwrap();
    assert_eq!(health::check(&a, LIVENESS).await.unwrap(), ServingStatus::Serving);
    // Back: the next heartbeat is answered and the agent is ready again.
    cluster.restart(Target::Coordinator(0)).await.unwrap();
    watch.until(ServingStatus::Serving, CONVERGE).await.unwrap();

    // Shutdown: NOT_SERVING, then the stream ends.
    let status = cluster.terminate(Target::Agent(0)).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(watch.next(HEALTH_BOUND).await.unwrap(), Some(ServingStatus::NotServing));
    assert!(!matches!(watch.next(HEALTH_BOUND).await, Ok(Some(_))), "the stream ended");
    cluster.shutdown().await.unwrap();
}
