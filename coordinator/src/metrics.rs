//! The coordinator's metrics (`docs/operations.md` lists them with their
//! meaning). Instruments come from [`sandfleet_common::metrics::meter`]:
//! - the recorded ones ([`Metrics`], one set per process, made on first use)
//!   are updated where things happen: the session service, the heartbeat
//!   handler, the leader's placement round, the Raft proposal and the WAL
//!   syncer;
//! - the observed ones ([`observe`]) are read from the member's applied state
//!   and its Raft metrics when `/metrics` is scraped (or the OTLP reader
//!   collects), so they cost nothing between scrapes.
//!
//! Every member exports the state gauges of its own applied view; counting a
//! cluster-wide figure once means selecting the leader
//! (`... and on(instance) sandfleet_raft_is_leader == 1`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};
use opentelemetry::KeyValue;
use sandfleet_common::metrics::{latency_histogram, meter, COUNT_BUCKETS};
use sandfleet_common::spec::Runtime;

use crate::core::Core;
use crate::state::{NodePhase, SessionPhase};

/// The recorded instruments.
pub struct Metrics {
    /// `sandfleet_session_requests_total{operation, code}`.
    pub session_requests: Counter<u64>,
    /// `sandfleet_session_create_to_running_seconds{runtime}`.
    pub create_to_running: Histogram<f64>,
    /// `sandfleet_placement_round_duration_seconds`.
    pub placement_round: Histogram<f64>,
    /// `sandfleet_placement_round_placements`.
    pub placement_round_placements: Histogram<u64>,
    /// `sandfleet_placements_total`.
    pub placements: Counter<u64>,
    /// `sandfleet_heartbeats_received_total`.
    pub heartbeats: Counter<u64>,
    /// `sandfleet_heartbeat_lateness_seconds`.
    pub heartbeat_lateness: Histogram<f64>,
    /// `sandfleet_heartbeat_reports_uncommitted_total`.
    pub reports_uncommitted: Counter<u64>,
    /// `sandfleet_raft_leader_changes_total`.
    pub leader_changes: Counter<u64>,
    /// `sandfleet_raft_proposal_duration_seconds`.
    pub proposal: Histogram<f64>,
    /// `sandfleet_raft_commit_batch_commands`.
    pub commit_batch: Histogram<u64>,
    /// `sandfleet_raft_fsync_duration_seconds`.
    pub fsync: Histogram<f64>,
    /// `sandfleet_raft_snapshot_build_duration_seconds`.
    pub snapshot_build: Histogram<f64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = meter();
    let seconds = |name: &'static str, description: &'static str| latency_histogram(&m, name, description);
    Metrics {
        session_requests: m
            .u64_counter("sandfleet.session.requests")
            .with_description("Session creates, deletes and renews answered by this member, by operation and gRPC code")
            .build(),
        create_to_running: seconds(
            "sandfleet.session.create_to_running",
            "From a session's creation to its first RUNNING report (observed by the leader)",
        ),
        placement_round: seconds("sandfleet.placement.round.duration", "One placement round of the leader"),
        placement_round_placements: m
            .u64_histogram("sandfleet.placement.round.placements")
            .with_description("Sessions placed by one placement round")
            .with_boundaries(COUNT_BUCKETS.to_vec())
            .build(),
        placements: m.u64_counter("sandfleet.placements").with_description("Sessions placed by this leader").build(),
        heartbeats: m
            .u64_counter("sandfleet.heartbeats.received")
            .with_description("Agent heartbeats answered by this member as the leader")
            .build(),
        heartbeat_lateness: seconds(
            "sandfleet.heartbeat.lateness",
            "How much later than the heartbeat interval a node's heartbeat arrived",
        ),
        reports_uncommitted: m
            .u64_counter("sandfleet.heartbeat.reports_uncommitted")
            .with_description(
                "Heartbeats this member answered as the leader before the session reports they carried were \
                 committed (the agent sends them again)",
            )
            .build(),
        leader_changes: m
            .u64_counter("sandfleet.raft.leader_changes")
            .with_description("Changes of the Raft leader seen by this member")
            .build(),
        proposal: seconds(
            "sandfleet.raft.proposal.duration",
            "A proposal of this member: from proposing to committed and applied",
        ),
        commit_batch: m
            .u64_histogram("sandfleet.raft.commit.batch.commands")
            .with_description("Commands group-committed in one Raft entry by this member")
            .with_boundaries(COUNT_BUCKETS.to_vec())
            .build(),
        fsync: seconds("sandfleet.raft.fsync.duration", "One fsync of the Raft log's WAL"),
        snapshot_build: seconds("sandfleet.raft.snapshot.build.duration", "Building a snapshot of the state machine"),
    }
});

/// The recorded instruments (made on first use, after the daemon's
/// `telemetry::init`).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The label of a session's runtime: its name, or `any` when the spec leaves
/// the choice to the scheduler.
pub fn runtime_label(runtime: Option<Runtime>) -> &'static str {
    runtime.map_or("any", Runtime::as_str)
}

/// Counts one session call by operation and the gRPC code of its answer.
pub fn count_request<T>(operation: &'static str, result: &Result<T, tonic::Status>) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    metrics().session_requests.add(
        1,
        &[KeyValue::new("operation", operation), KeyValue::new("code", sandfleet_common::grpc::code_name(code))],
    );
}

/// Counts a session call's answer in `sandfleet_session_requests_total`.
pub trait CountRequest {
    /// Counts this answer under `operation` and returns it.
    fn counted(self, operation: &'static str) -> Self;
}

impl<T> CountRequest for Result<T, tonic::Status> {
    fn counted(self, operation: &'static str) -> Self {
        count_request(operation, &self);
        self
    }
}

/// Raft figures the stores keep for the gauges (openraft's metrics show
/// neither a follower's commit index nor the snapshot's size).
#[derive(Debug, Default)]
pub struct RaftStats {
    /// The highest committed index this member was told of (`save_committed`).
    pub committed: AtomicU64,
    /// The size of the newest snapshot built or installed, in bytes.
    pub snapshot_bytes: AtomicU64,
}

/// The label of a session phase.
fn phase_label(p: SessionPhase) -> &'static str {
    match p {
        SessionPhase::Pending => "pending",
        SessionPhase::Running => "running",
        SessionPhase::Lost => "lost",
        SessionPhase::Terminated => "terminated",
        SessionPhase::Failed => "failed",
    }
}

const PHASES: [SessionPhase; 5] =
    [SessionPhase::Pending, SessionPhase::Running, SessionPhase::Lost, SessionPhase::Terminated, SessionPhase::Failed];
const NODE_PHASES: [NodePhase; 4] = [NodePhase::Ready, NodePhase::Cordoned, NodePhase::Draining, NodePhase::Down];
const RAFT_STATES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

/// Reads one gauge's points (value, labels) from a coordinator.
type Read = Box<dyn Fn(&Core) -> Vec<(u64, Vec<KeyValue>)> + Send + Sync>;

/// The observed instruments of one coordinator; their callbacks hold only a
/// weak reference to it and observe nothing once it is gone.
pub struct Observers {
    _gauges: Vec<ObservableGauge<u64>>,
    _f64_gauges: Vec<ObservableGauge<f64>>,
}

/// Registers the gauges read from `core` at collection time, and starts
/// counting leader changes (the task ends with the Raft instance).
pub fn observe(core: &Arc<Core>, stats: Arc<RaftStats>) -> Observers {
    let m = meter();
    let weak = Arc::downgrade(core);
    let gauge = |name: &'static str, description: &'static str, f: Read| {
        let weak: Weak<Core> = weak.clone();
        m.u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| {
                if let Some(core) = weak.upgrade() {
                    for (v, labels) in f(&core) {
                        o.observe(v, &labels);
                    }
                }
            })
            .build()
    };
    let raft = |f: fn(&crate::raft::typ::Metrics, &RaftStats) -> u64| {
        let stats = stats.clone();
        Box::new(move |core: &Core| {
            let m = core.raft.metrics().borrow().clone();
            vec![(f(&m, &stats), vec![])]
        }) as Read
    };
    let mut gauges = vec![
        gauge(
            "sandfleet.sessions",
            "Sessions in this member's applied state, by state and runtime",
            Box::new(|core| {
                let mut counts = [[0u64; 4]; 5];
                core.state.read(|s| {
                    for r in s.sessions.values() {
                        let p = PHASES.iter().position(|p| *p == r.phase).unwrap_or(0);
                        let k = r.spec.runtime.map_or(3, |rt| Runtime::ALL.iter().position(|x| *x == rt).unwrap_or(3));
                        counts[p][k] += 1;
                    }
                });
                let runtimes = [Runtime::Process.as_str(), Runtime::Docker.as_str(), Runtime::Cri.as_str(), "any"];
                let mut out = Vec::with_capacity(20);
                for (p, row) in PHASES.iter().zip(counts) {
                    for (rt, n) in runtimes.iter().zip(row) {
                        out.push((n, vec![KeyValue::new("state", phase_label(*p)), KeyValue::new("runtime", *rt)]));
                    }
                }
                out
            }),
        ),
        gauge(
            "sandfleet.pool.sandboxes",
            "Sandboxes of each warm pool, by state (idle, starting, claimed, failed)",
            Box::new(|core| {
                core.state.read(|s| {
                    let mut out = Vec::with_capacity(s.pools.len() * 4);
                    for (key, p) in &s.pools {
                        let c = s.pool_counts(key);
                        for (state, n) in
                            [("idle", c.idle), ("starting", c.starting), ("claimed", c.claimed), ("failed", c.failed)]
                        {
                            out.push((
                                u64::from(n),
                                vec![
                                    KeyValue::new("pool", p.name.clone()),
                                    KeyValue::new("tenant", p.tenant.clone()),
                                    KeyValue::new("state", state),
                                ],
                            ));
                        }
                    }
                    out
                })
            }),
        ),
        gauge(
            "sandfleet.pending_sessions",
            "Live sessions waiting for a node",
            Box::new(|core| vec![(core.state.read(|s| s.unplaced.len() as u64), vec![])]),
        ),
        gauge(
            "sandfleet.nodes",
            "Registered nodes, by state",
            Box::new(|core| {
                let mut counts = [0u64; 4];
                core.state.read(|s| {
                    for n in s.nodes.values() {
                        counts[NODE_PHASES.iter().position(|p| *p == n.phase).unwrap_or(0)] += 1;
                    }
                });
                NODE_PHASES.iter().zip(counts).map(|(p, n)| (n, vec![KeyValue::new("state", p.as_str())])).collect()
            }),
        ),
        gauge(
            "sandfleet.raft.state",
            "1 for this member's current Raft role",
            Box::new(|core| {
                let current = raft_state(&core.raft.metrics().borrow());
                RAFT_STATES.iter().map(|s| (u64::from(*s == current), vec![KeyValue::new("state", *s)])).collect()
            }),
        ),
        gauge(
            "sandfleet.raft.is_leader",
            "1 on the Raft leader, else 0",
            raft(|m, _| u64::from(m.current_leader == Some(m.id))),
        ),
        gauge("sandfleet.raft.term", "Current Raft term", raft(|m, _| m.current_term)),
        gauge("sandfleet.raft.commit_index", "Highest committed log index this member knows", raft(commit_index)),
        gauge("sandfleet.raft.applied_index", "Last applied log index", raft(|m, _| applied(m))),
        gauge("sandfleet.raft.last_log_index", "Last log index", raft(|m, _| m.last_log_index.unwrap_or(0))),
        gauge(
            "sandfleet.raft.apply_lag_entries",
            "Committed entries this member has not applied yet",
            raft(|m, s| commit_index(m, s).saturating_sub(applied(m))),
        ),
        gauge(
            "sandfleet.raft.log_entries",
            "Entries in the Raft log (last index - purged index)",
            raft(|m, _| m.last_log_index.unwrap_or(0).saturating_sub(m.purged.map_or(0, |p| p.index))),
        ),
    ];
    // Units the exporter turns into name suffixes.
    gauges.push(
        m.u64_observable_gauge("sandfleet.raft.snapshot.size")
            .with_unit("By")
            .with_description("Size of the newest snapshot")
            .with_callback(move |o| o.observe(stats.snapshot_bytes.load(Ordering::Relaxed), &[]))
            .build(),
    );
    let oldest = {
        let weak = weak.clone();
        m.f64_observable_gauge("sandfleet.pending.oldest_age")
            .with_unit("s")
            .with_description("Age of the oldest session waiting for a node (0 when none waits)")
            .with_callback(move |o| {
                if let Some(core) = weak.upgrade() {
                    let oldest = core.state.read(|s| s.unplaced.first().map(|(at, _)| *at));
                    let age = oldest.map_or(0.0, |at| (crate::now_ms() - at).max(0) as f64 / 1000.0);
                    o.observe(age, &[]);
                }
            })
            .build()
    };
    tokio::spawn(count_leader_changes(weak));
    Observers { _gauges: gauges, _f64_gauges: vec![oldest] }
}

/// Counts every change of the leader this member sees, until the Raft
/// instance stops or the coordinator is dropped.
async fn count_leader_changes(core: Weak<Core>) {
    let Some(mut rx) = core.upgrade().map(|c| c.raft.metrics()) else { return };
    let mut leader = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow().current_leader;
        if now != leader {
            if now.is_some() {
                metrics().leader_changes.add(1, &[]);
            }
            leader = now;
        }
        if core.strong_count() == 0 {
            return;
        }
    }
}

fn applied(m: &crate::raft::typ::Metrics) -> u64 {
    m.last_applied.map_or(0, |l| l.index)
}

/// The leader's commit index is what a quorum matched; a follower knows what
/// the leader told it (`save_committed`). Never below the applied index.
fn commit_index(m: &crate::raft::typ::Metrics, stats: &RaftStats) -> u64 {
    let mut committed = stats.committed.load(Ordering::Relaxed);
    if let (true, Some(replication)) = (m.current_leader == Some(m.id), &m.replication) {
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|id| {
                if *id == m.id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    replication.get(id).and_then(|l| l.as_ref()).map_or(0, |l| l.index)
                }
            })
            .collect();
        if !matched.is_empty() {
            matched.sort_unstable_by(|a, b| b.cmp(a));
            committed = committed.max(matched[voters.len() / 2]);
        }
    }
    committed.max(applied(m))
}

fn raft_state(m: &crate::raft::typ::Metrics) -> &'static str {
    use openraft::ServerState::*;
    match m.state {
        Leader => "leader",
        Follower => "follower",
        Candidate => "candidate",
        Learner => "learner",
        Shutdown => "shutdown",
    }
}

/// Seconds as `f64`.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
