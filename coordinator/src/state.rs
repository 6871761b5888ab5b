//! The replicated cluster state and the commands that change it.
//!
//! Everything here is deterministic: a [`Command`] carries every timestamp and
//! every id it needs, so applying the same log on every coordinator yields the
//! same [`ClusterState`]. The state lives in memory for reads and is written
//! through to RocksDB by [`crate::raft::store`] on every apply.
//!
//! Capacity accounting is part of the state: placing a session onto a node is
//! checked again at apply time, so two concurrent placements can never
//! over-commit a node even though the scheduler decided them in parallel.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::pending::PendingReason;

/// A session's lifecycle state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionPhase {
    Pending,
    Running,
    Lost,
    Terminated,
    Failed,
}

impl SessionPhase {
    /// True for states that never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionPhase::Terminated | SessionPhase::Failed)
    }

    /// True when the session holds resources on its node.
    pub fn holds_resources(self) -> bool {
        matches!(self, SessionPhase::Pending | SessionPhase::Running)
    }
}

/// What a session asked for, with defaults filled in: the one definition of
/// a session spec, in `sandfleet-common`.
pub use sandfleet_common::spec::SessionSpec as SpecRecord;

/// A session as stored in the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub spec: SpecRecord,
    pub phase: SessionPhase,
    /// The node it is placed on, if any.
    pub node_id: Option<String>,
    /// Placement generation; bumped on every placement.
    pub generation: u64,
    pub request_id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub updated_at_ms: i64,
    /// Why it is not running yet.
    pub pending_reason: PendingReason,
    /// Detail for terminal states.
    pub message: String,
    /// Times it was queued for placement again after losing its node.
    #[serde(default)]
    pub restarts: u32,
    /// A lost session is not placed before this time (restart backoff).
    #[serde(default)]
    pub not_before_ms: i64,
    /// Set while a drain moves it off this node, until it runs elsewhere.
    #[serde(default)]
    pub moved_from: Option<String>,
    /// Last renewal; idle timeouts count from here at the latest.
    #[serde(default)]
    pub renewed_at_ms: i64,
}

/// Resources in one unit system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub slots: u64,
}

impl Resources {
    /// What one session uses.
    pub fn of(spec: &SpecRecord) -> Self {
        Resources { cpu_millis: spec.cpu_reserved_millis() as u64, memory_bytes: spec.memory_bytes, slots: 1 }
    }

    /// True when `need` fits in `self` minus `used`.
    pub fn fits(&self, used: &Resources, need: &Resources) -> bool {
        used.cpu_millis + need.cpu_millis <= self.cpu_millis
            && used.memory_bytes + need.memory_bytes <= self.memory_bytes
            && used.slots + need.slots <= self.slots
    }

    fn add(&mut self, r: &Resources) {
        self.cpu_millis += r.cpu_millis;
        self.memory_bytes += r.memory_bytes;
        self.slots += r.slots;
    }

    fn sub(&mut self, r: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(r.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(r.memory_bytes);
        self.slots = self.slots.saturating_sub(r.slots);
    }
}

/// A node's scheduling state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePhase {
    Ready,
    Down,
    Cordoned,
    Draining,
}

impl NodePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Ready => "ready",
            NodePhase::Down => "down",
            NodePhase::Cordoned => "cordoned",
            NodePhase::Draining => "draining",
        }
    }
}

/// A registered node agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub runtimes: Vec<sandfleet_common::spec::Runtime>,
    pub phase: NodePhase,
    pub registered_at_ms: i64,
    /// Set while the node drains.
    #[serde(default)]
    pub drain: Option<DrainRecord>,
}

/// A drain in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub started_at_ms: i64,
    /// After this the remaining sessions move all at once.
    pub deadline_ms: i64,
    /// Sessions of this node allowed to be moving at a time.
    pub max_parallel: u32,
}

/// One placement in a [`Command::PlaceSessions`] batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub id: String,
    pub node_id: String,
    pub expected_generation: u64,
}

/// One session report in a [`Command::ReportSessions`] batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub generation: u64,
    pub phase: SessionPhase,
    pub message: String,
}

/// A state change, proposed through Raft.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Sets the cluster's token signing key. Applied once; later ones are ignored.
    InitCluster { signing_seed: Vec<u8> },
    /// Creates a session unless its request id was already seen. When
    /// `session.node_id` is set, the placement is re-checked against capacity.
    CreateSession { session: SessionRecord },
    /// Terminates sessions (client delete or expiry).
    TerminateSessions { ids: Vec<String>, message: String, now_ms: i64 },
    /// Sets a new expiry.
    RenewSession { id: String, expires_at_ms: i64, now_ms: i64 },
    /// Registers or updates a node.
    RegisterNode { node: NodeRecord },
    /// The leader saw no heartbeat for `node_ttl`: the node goes down and its
    /// live sessions become LOST and unplaced, to be placed again with a new
    /// generation (fencing the old copies), except those in `keep`, whose own
    /// `lost_after` is longer (they follow with `SessionsLost`).
    NodeDown {
        node_id: String,
        now_ms: i64,
        #[serde(default)]
        keep: Vec<String>,
    },
    /// A down node heartbeats again: it is ready for new placements.
    NodeUp { node_id: String, now_ms: i64 },
    /// An operator stops (or resumes) new placements on a node. Uncordoning
    /// also ends a drain.
    CordonNode { node_id: String, cordoned: bool },
    /// Places sessions onto nodes, each with a new generation if it still
    /// fits and the session's generation is still `expected_generation`; the
    /// others are skipped.
    PlaceSessions { placements: Vec<Placement>, now_ms: i64 },
    /// Records why sessions cannot be placed.
    SetPendingReasons { reasons: Vec<(String, PendingReason)>, now_ms: i64 },
    /// A node agent's reports about sessions it runs. Each is ignored unless
    /// it comes from the node and generation the session is placed with (fencing).
    ReportSessions { node_id: String, reports: Vec<Report>, now_ms: i64 },
    /// Sessions on `node_id` whose own `lost_after` passed: LOST (or FAILED
    /// when out of attempts), to be placed again.
    SessionsLost { node_id: String, ids: Vec<String>, now_ms: i64 },
    /// Starts (or updates) a drain: no new placements, sessions move off.
    DrainNode { node_id: String, drain: DrainRecord },
    /// Moves sessions off a draining node: they become unplaced and are placed
    /// elsewhere with a new generation, which stops the old copy.
    MoveSessions { node_id: String, ids: Vec<String>, now_ms: i64 },
    /// An operator pauses (or resumes) placement cluster-wide.
    SetSchedulerPaused { paused: bool },
}

/// What applying a command produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum CommandResponse {
    /// Nothing to report.
    Ok,
    /// The session after the change.
    Session(SessionRecord),
    /// A create whose request id had been seen: the first session.
    Existing(SessionRecord),
    /// Sessions after a batch change.
    Sessions(Vec<SessionRecord>),
    /// The session does not exist.
    NotFound(String),
    /// The command was refused; the state is unchanged.
    Rejected(String),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    pub sessions: BTreeMap<String, SessionRecord>,
    /// request id → session id.
    pub request_ids: HashMap<String, String>,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Ed25519 seed for session tokens; empty until InitCluster.
    pub signing_seed: Vec<u8>,
    /// Placement paused by an operator: unplaced sessions wait, drains do not start moves.
    #[serde(default)]
    pub scheduler_paused: bool,
    /// Resources held on each node by its Pending and Running sessions.
    #[serde(skip)]
    pub allocated: HashMap<String, Resources>,
    /// Live sessions per node.
    #[serde(skip)]
    pub node_sessions: HashMap<String, BTreeSet<String>>,
    /// Live sessions without a node, oldest first: what the leader must place.
    #[serde(skip)]
    pub unplaced: BTreeSet<(i64, String)>,
    /// Live sessions by expiry time: what the leader must expire.
    #[serde(skip)]
    pub expiring: BTreeSet<(i64, String)>,
    /// The expiry each live session is indexed under in `expiring`.
    #[serde(skip)]
    expiry_of: HashMap<String, (i64, i64)>,
    /// Live sessions with an idle timeout.
    #[serde(skip)]
    pub idle: BTreeSet<String>,
    /// Per draining node: its sessions moved off that do not run elsewhere yet.
    #[serde(skip)]
    pub moving: HashMap<String, BTreeSet<String>>,
    #[serde(skip)]
    moving_of: HashMap<String, String>,
    /// The Raft log index this state reflects. The same index means the same
    /// state on every member, so agents use it to order assignment sets that
    /// come from different coordinators.
    #[serde(skip)]
    pub applied_index: u64,
    /// Bumped whenever a node's assignment set may have changed, so each
    /// agent's watch recomputes only its own node's set when it changed.
    #[serde(skip)]
    pub node_versions: HashMap<String, u64>,
}

/// The keys an apply touched, so the store can write them through.
#[derive(Debug, Default)]
pub struct Touched {
    pub sessions: Vec<String>,
    pub nodes: Vec<String>,
    pub request_ids: Vec<String>,
    pub meta: bool,
}

impl ClusterState {
    /// Rebuilds derived indexes after loading from disk or a snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.allocated.clear();
        self.node_sessions.clear();
        self.unplaced.clear();
        self.expiring.clear();
        self.expiry_of.clear();
        self.idle.clear();
        self.moving.clear();
        self.moving_of.clear();
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for id in ids {
            self.reindex(&id);
        }
        let live: Vec<(String, String, Resources)> = self
            .sessions
            .values()
            .filter(|s| s.phase.holds_resources())
            .filter_map(|s| s.node_id.clone().map(|n| (n, s.id.clone(), Resources::of(&s.spec))))
            .collect();
        for (node, id, r) in live {
            self.allocated.entry(node.clone()).or_default().add(&r);
            self.node_sessions.entry(node).or_default().insert(id);
        }
    }

    /// Brings `unplaced` and `expiring` up to date for one session, so the
    /// leader finds its work without scanning every session.
    fn reindex(&mut self, id: &str) {
        if let Some((created, expires)) = self.expiry_of.remove(id) {
            self.unplaced.remove(&(created, id.to_string()));
            self.expiring.remove(&(expires, id.to_string()));
        }
        self.idle.remove(id);
        if let Some(from) = self.moving_of.remove(id) {
            if let Some(set) = self.moving.get_mut(&from) {
                set.remove(id);
                if set.is_empty() {
                    self.moving.remove(&from);
                }
            }
        }
        let Some(s) = self.sessions.get(id) else { return };
        if let Some(node) = &s.node_id {
            *self.node_versions.entry(node.clone()).or_default() += 1;
        }
        if s.phase.is_terminal() {
            return;
        }
        self.expiring.insert((s.expires_at_ms, s.id.clone()));
        if s.node_id.is_none() && matches!(s.phase, SessionPhase::Pending | SessionPhase::Lost) {
            self.unplaced.insert((s.created_at_ms, s.id.clone()));
        }
        if s.spec.idle_timeout_seconds > 0 {
            self.idle.insert(s.id.clone());
        }
        if let (Some(from), false) = (&s.moved_from, s.phase == SessionPhase::Running) {
            self.moving.entry(from.clone()).or_default().insert(s.id.clone());
            self.moving_of.insert(s.id.clone(), from.clone());
        }
        self.expiry_of.insert(s.id.clone(), (s.created_at_ms, s.expires_at_ms));
    }

    /// The version of a node's assignment set (see `node_versions`).
    pub fn node_version(&self, node: &str) -> u64 {
        self.node_versions.get(node).copied().unwrap_or_default()
    }

    /// Live sessions whose expiry is at or before `now_ms`.
    pub fn expired_at(&self, now_ms: i64) -> Vec<String> {
        self.expiring.range(..(now_ms.saturating_add(1), String::new())).map(|(_, id)| id.clone()).collect()
    }

    /// Resources held on a node.
    pub fn allocated_on(&self, node: &str) -> Resources {
        self.allocated.get(node).copied().unwrap_or_default()
    }

    fn release(&mut self, s: &SessionRecord) {
        if let Some(node) = &s.node_id {
            *self.node_versions.entry(node.clone()).or_default() += 1;
        }
        if let (Some(node), true) = (&s.node_id, s.phase.holds_resources()) {
            if let Some(a) = self.allocated.get_mut(node) {
                a.sub(&Resources::of(&s.spec));
            }
            if let Some(set) = self.node_sessions.get_mut(node) {
                set.remove(&s.id);
            }
        }
    }

    fn hold(&mut self, s: &SessionRecord) {
        if let (Some(node), true) = (&s.node_id, s.phase.holds_resources()) {
            self.allocated.entry(node.clone()).or_default().add(&Resources::of(&s.spec));
            self.node_sessions.entry(node.clone()).or_default().insert(s.id.clone());
        }
    }

    /// True when the node exists, is ready and has room for `spec`.
    pub fn node_fits(&self, node_id: &str, spec: &SpecRecord) -> bool {
        match self.nodes.get(node_id) {
            Some(n) if n.phase == NodePhase::Ready => {
                n.capacity.fits(&self.allocated_on(node_id), &Resources::of(spec))
            }
            _ => false,
        }
    }

    /// Applies one command. Never fails: a command that cannot apply is
    /// answered with [`CommandResponse::Rejected`] and changes nothing.
    pub fn apply(&mut self, cmd: Command, touched: &mut Touched) -> CommandResponse {
        let first = touched.sessions.len();
        let response = self.apply_inner(cmd, touched);
        for i in first..touched.sessions.len() {
            let id = touched.sessions[i].clone();
            self.reindex(&id);
        }
        response
    }

    fn apply_inner(&mut self, cmd: Command, touched: &mut Touched) -> CommandResponse {
        match cmd {
            Command::InitCluster { signing_seed } => {
                if self.signing_seed.is_empty() {
                    self.signing_seed = signing_seed;
                    touched.meta = true;
                }
                CommandResponse::Ok
            }
            Command::SetSchedulerPaused { paused } => {
                if self.scheduler_paused != paused {
                    self.scheduler_paused = paused;
                    touched.meta = true;
                }
                CommandResponse::Ok
            }
            Command::CreateSession { mut session } => {
                if let Some(existing) = self.request_ids.get(&session.request_id).and_then(|id| self.sessions.get(id)) {
                    return CommandResponse::Existing(existing.clone());
                }
                if self.sessions.contains_key(&session.id) {
                    return CommandResponse::Rejected(format!("session id {} already exists", session.id));
                }
                if let Some(node) = session.node_id.clone() {
                    if self.scheduler_paused {
                        // Paused after the service chose a node: the session waits like any other.
                        session.node_id = None;
                        session.generation = 0;
                        session.pending_reason = PendingReason::Paused;
                    } else if !self.node_fits(&node, &session.spec) {
                        session.node_id = None;
                        session.generation = 0;
                        session.pending_reason = PendingReason::FilledUp { node };
                    }
                }
                self.hold(&session);
                self.request_ids.insert(session.request_id.clone(), session.id.clone());
                touched.request_ids.push(session.request_id.clone());
                touched.sessions.push(session.id.clone());
                self.sessions.insert(session.id.clone(), session.clone());
                CommandResponse::Session(session)
            }
            Command::PlaceSessions { placements, now_ms } => {
                let mut placed = Vec::with_capacity(placements.len());
                for p in placements {
                    if let CommandResponse::Session(s) = self.place_one(p, now_ms, touched) {
                        placed.push(s);
                    }
                }
                CommandResponse::Sessions(placed)
            }
            Command::SetPendingReasons { reasons, now_ms } => {
                for (id, reason) in reasons {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        if !s.phase.is_terminal() && s.pending_reason != reason {
                            s.pending_reason = reason;
                            s.updated_at_ms = now_ms;
                            touched.sessions.push(id);
                        }
                    }
                }
                CommandResponse::Ok
            }
            Command::ReportSessions { node_id, reports, now_ms } => {
                for r in reports {
                    // Stale reports are fenced off one by one; the rest apply.
                    let _ = self.report_one(r, &node_id, now_ms, touched);
                }
                CommandResponse::Ok
            }
            Command::SessionsLost { node_id, ids, now_ms } => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(s) = self.lose(&id, &node_id, now_ms, touched) {
                        out.push(s);
                    }
                }
                CommandResponse::Sessions(out)
            }
            Command::DrainNode { node_id, drain } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::NotFound(node_id),
                Some(n) if n.phase == NodePhase::Down => CommandResponse::Rejected(format!(
                    "node {node_id} is down; its sessions are placed elsewhere already"
                )),
                Some(n) => {
                    // A repeated drain keeps its start time and updates the rest.
                    let started_at_ms = n.drain.map_or(drain.started_at_ms, |d| d.started_at_ms);
                    n.phase = NodePhase::Draining;
                    n.drain = Some(DrainRecord { started_at_ms, ..drain });
                    touched.nodes.push(node_id);
                    CommandResponse::Ok
                }
            },
            Command::MoveSessions { node_id, ids, now_ms } => {
                if self.nodes.get(&node_id).is_none_or(|n| n.phase != NodePhase::Draining) {
                    return CommandResponse::Rejected(format!("node {node_id} is not draining"));
                }
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let Some(s) = self.sessions.get(&id).cloned() else { continue };
                    if !s.phase.holds_resources() || s.node_id.as_deref() != Some(node_id.as_str()) {
                        continue;
                    }
                    self.release(&s);
                    let mut s = s;
                    s.phase = SessionPhase::Pending;
                    s.node_id = None;
                    s.moved_from = Some(node_id.clone());
                    s.pending_reason = PendingReason::Moving { node: node_id.clone() };
                    s.updated_at_ms = now_ms;
                    touched.sessions.push(id.clone());
                    self.sessions.insert(id, s.clone());
                    out.push(s);
                }
                CommandResponse::Sessions(out)
            }
            Command::TerminateSessions { ids, message, now_ms } => {
                let mut out = Vec::with_capacity(ids.len());
                let single = ids.len() == 1;
                for id in ids {
                    let Some(s) = self.sessions.get(&id).cloned() else {
                        // A single delete reports NOT_FOUND; batches skip unknown ids.
                        if single {
                            return CommandResponse::NotFound(id);
                        }
                        continue;
                    };
                    if s.phase.is_terminal() {
                        out.push(s);
                        continue;
                    }
                    self.release(&s);
                    let mut s = s;
                    s.phase = SessionPhase::Terminated;
                    s.message = message.clone();
                    s.pending_reason = PendingReason::None;
                    s.updated_at_ms = now_ms;
                    touched.sessions.push(id.clone());
                    self.sessions.insert(id, s.clone());
                    out.push(s);
                }
                CommandResponse::Sessions(out)
            }
            Command::RenewSession { id, expires_at_ms, now_ms } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return CommandResponse::NotFound(id);
                };
                if s.phase.is_terminal() {
                    return CommandResponse::Rejected(format!("session {id} has ended and cannot be renewed"));
                }
                s.expires_at_ms = expires_at_ms;
                s.updated_at_ms = now_ms;
                s.renewed_at_ms = now_ms;
                touched.sessions.push(id);
                CommandResponse::Session(s.clone())
            }
            Command::RegisterNode { node } => {
                let id = node.id.clone();
                let phase = self.nodes.get(&id).map(|n| n.phase);
                let mut node = node;
                // Re-registration keeps an operator's cordon or drain; a down node comes back ready.
                if let Some(p @ (NodePhase::Cordoned | NodePhase::Draining)) = phase {
                    node.phase = p;
                    node.drain = self.nodes.get(&id).and_then(|n| n.drain);
                }
                if self.nodes.get(&id) != Some(&node) {
                    touched.nodes.push(id.clone());
                    self.nodes.insert(id, node);
                }
                CommandResponse::Ok
            }
            Command::NodeDown { node_id, now_ms, keep } => {
                match self.nodes.get_mut(&node_id) {
                    None => return CommandResponse::Rejected(format!("node {node_id} is not registered")),
                    Some(n) if n.phase == NodePhase::Down => return CommandResponse::Sessions(Vec::new()),
                    Some(n) => {
                        n.phase = NodePhase::Down;
                        n.drain = None;
                    }
                }
                touched.nodes.push(node_id.clone());
                let ids: Vec<String> =
                    self.node_sessions.get(&node_id).map(|s| s.iter().cloned().collect()).unwrap_or_default();
                let mut lost = Vec::with_capacity(ids.len());
                for id in ids.into_iter().filter(|id| !keep.contains(id)) {
                    if let Some(s) = self.lose(&id, &node_id, now_ms, touched) {
                        lost.push(s);
                    }
                }
                CommandResponse::Sessions(lost)
            }
            Command::CordonNode { node_id, cordoned } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::NotFound(node_id),
                Some(n) if n.phase == NodePhase::Down => {
                    CommandResponse::Rejected(format!("node {node_id} is down; cordon or uncordon it once it is back"))
                }
                Some(n) => {
                    let phase = if cordoned { NodePhase::Cordoned } else { NodePhase::Ready };
                    if n.phase != phase || n.drain.is_some() {
                        n.phase = phase;
                        n.drain = None;
                        touched.nodes.push(node_id);
                    }
                    CommandResponse::Ok
                }
            },
            Command::NodeUp { node_id, now_ms: _ } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::Rejected(format!("node {node_id} is not registered")),
                Some(n) if n.phase != NodePhase::Down => CommandResponse::Ok,
                Some(n) => {
                    n.phase = NodePhase::Ready;
                    touched.nodes.push(node_id);
                    CommandResponse::Ok
                }
            },
        }
    }

    fn place_one(&mut self, p: Placement, now_ms: i64, touched: &mut Touched) -> CommandResponse {
        let Placement { id, node_id, expected_generation } = p;
        let Some(s) = self.sessions.get(&id).cloned() else {
            return CommandResponse::NotFound(id);
        };
        if s.phase.is_terminal() || s.generation != expected_generation || s.node_id.is_some() {
            return CommandResponse::Rejected(format!("session {id} changed since it was scheduled"));
        }
        if self.scheduler_paused {
            return CommandResponse::Rejected("scheduling is paused".into());
        }
        if !self.node_fits(&node_id, &s.spec) {
            return CommandResponse::Rejected(format!("node {node_id} has no room for session {id}"));
        }
        self.release(&s);
        let mut s = s;
        s.node_id = Some(node_id);
        s.generation += 1;
        s.phase = SessionPhase::Pending;
        s.pending_reason = PendingReason::Starting;
        s.not_before_ms = 0;
        s.updated_at_ms = now_ms;
        self.hold(&s);
        touched.sessions.push(id.clone());
        self.sessions.insert(id, s.clone());
        CommandResponse::Session(s)
    }

    fn report_one(&mut self, r: Report, node_id: &str, now_ms: i64, touched: &mut Touched) -> CommandResponse {
        let Report { id, generation, phase, message } = r;
        let Some(s) = self.sessions.get(&id).cloned() else {
            return CommandResponse::NotFound(id);
        };
        if s.phase.is_terminal() {
            return CommandResponse::Session(s);
        }
        if s.node_id.as_deref() != Some(node_id) || s.generation != generation {
            return CommandResponse::Rejected(format!(
                "stale report for session {id}: node {node_id} generation {generation}, current {:?} generation {}",
                s.node_id, s.generation
            ));
        }
        let mut next = s.clone();
        match phase {
            SessionPhase::Running => {
                next.phase = SessionPhase::Running;
                next.pending_reason = PendingReason::None;
                next.moved_from = None;
            }
            SessionPhase::Failed => {
                next.phase = SessionPhase::Failed;
                next.message = message;
            }
            other => return CommandResponse::Rejected(format!("agents cannot report {other:?}")),
        }
        if next == s {
            return CommandResponse::Session(s);
        }
        next.updated_at_ms = now_ms;
        self.release(&s);
        self.hold(&next);
        touched.sessions.push(id.clone());
        self.sessions.insert(id, next.clone());
        CommandResponse::Session(next)
    }

    /// A live session on `node_id` lost its node: LOST and unplaced, with its
    /// restart backoff, or FAILED when it has no attempts left.
    fn lose(&mut self, id: &str, node_id: &str, now_ms: i64, touched: &mut Touched) -> Option<SessionRecord> {
        let s = self.sessions.get(id).cloned()?;
        if !s.phase.holds_resources() || s.node_id.as_deref() != Some(node_id) {
            return None;
        }
        self.release(&s);
        let mut s = s;
        s.node_id = None;
        s.moved_from = None;
        s.updated_at_ms = now_ms;
        if s.spec.max_attempts > 0 && s.restarts >= s.spec.max_attempts {
            s.phase = SessionPhase::Failed;
            s.pending_reason = PendingReason::None;
            s.message = format!(
                "lost with node {node_id}; not placed again: all {} restart attempts are used up",
                s.spec.max_attempts
            );
        } else {
            s.phase = SessionPhase::Lost;
            s.restarts += 1;
            let backoff = if s.spec.backoff_ms == 0 {
                0
            } else {
                s.spec
                    .backoff_ms
                    .saturating_mul(1 << (s.restarts - 1).min(16))
                    .min(sandfleet_common::limits::MAX_RESTART_BACKOFF_MS)
            };
            s.not_before_ms = if backoff == 0 { 0 } else { now_ms + backoff as i64 };
            s.pending_reason = PendingReason::NodeLost { node: node_id.to_string(), backoff_ms: backoff };
        }
        touched.sessions.push(id.to_string());
        self.sessions.insert(id.to_string(), s.clone());
        Some(s)
    }

    /// SHA-256 over the canonical JSON of sessions and nodes: equal on every
    /// member that applied the same log.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for s in self.sessions.values() {
            h.update(serde_json::to_vec(s).unwrap_or_default());
        }
        for n in self.nodes.values() {
            h.update(serde_json::to_vec(n).unwrap_or_default());
        }
        let mut rids: Vec<_> = self.request_ids.iter().collect();
        rids.sort();
        for (k, v) in rids {
            h.update(k.as_bytes());
            h.update(v.as_bytes());
        }
        h.update(&self.signing_seed);
        h.update([u8::from(self.scheduler_paused)]);
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cpu: u32) -> SpecRecord {
        SpecRecord {
            cpu_millis: cpu,
            cpu_request_millis: cpu,
            memory_bytes: 1 << 20,
            pids_limit: 64,
            ttl_seconds: 60,
            ..Default::default()
        }
    }

    fn session(id: &str, rid: &str, node: Option<&str>, cpu: u32) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            spec: spec(cpu),
            phase: SessionPhase::Pending,
            node_id: node.map(Into::into),
            generation: node.map(|_| 1).unwrap_or(0),
            request_id: rid.into(),
            created_at_ms: 1,
            expires_at_ms: 100,
            updated_at_ms: 1,
            pending_reason: PendingReason::None,
            message: String::new(),
            restarts: 0,
            not_before_ms: 0,
            moved_from: None,
            renewed_at_ms: 0,
        }
    }

    fn node(id: &str, cpu: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: "a".into(),
            capacity: Resources { cpu_millis: cpu, memory_bytes: 1 << 30, slots: 10 },
            labels: Default::default(),
            runtimes: vec![sandfleet_common::spec::Runtime::Process],
            phase: NodePhase::Ready,
            registered_at_ms: 0,
            drain: None,
        }
    }

    /// A one-placement batch, as the leader proposes it.
    fn place(id: &str, node: &str, expected_generation: u64, now_ms: i64) -> Command {
        Command::PlaceSessions {
            placements: vec![Placement { id: id.into(), node_id: node.into(), expected_generation }],
            now_ms,
        }
    }

    #[test]
    fn create_is_idempotent_on_request_id() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        let r1 = st.apply(Command::CreateSession { session: session("a", "r", None, 100) }, &mut t);
        assert!(matches!(r1, CommandResponse::Session(_)));
        let r2 = st.apply(Command::CreateSession { session: session("b", "r", None, 100) }, &mut t);
        match r2 {
            CommandResponse::Existing(s) => assert_eq!(s.id, "a"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(st.sessions.len(), 1);
    }

    #[test]
    fn records_and_commands_with_the_old_text_reasons_still_load() {
        // Before PendingReason, the log and snapshots held the reason text.
        let mut old = serde_json::to_value(session("a", "r1", None, 100)).unwrap();
        old["pending_reason"] = "node n1 stopped heartbeating; placing it again".into();
        let s: SessionRecord = serde_json::from_value(old).unwrap();
        assert_eq!(s.pending_reason.to_string(), "node n1 stopped heartbeating; placing it again");
        let cmd = r#"{"SetPendingReasons":{"reasons":[["a","waiting for capacity: 0/1 nodes"],["b",""]],"now_ms":5}}"#;
        let Command::SetPendingReasons { reasons, now_ms: 5 } = serde_json::from_str::<Command>(cmd).unwrap() else {
            panic!()
        };
        assert_eq!(reasons[0].1.to_string(), "waiting for capacity: 0/1 nodes");
        assert!(reasons[1].1.is_none());
        // And what is written now reads back as the same typed reason.
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        st.apply(Command::NodeDown { node_id: "n1".into(), now_ms: 10, keep: vec![] }, &mut t);
        let mut back: ClusterState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.sessions["a"].pending_reason, PendingReason::NodeLost { node: "n1".into(), backoff_ms: 0 });
        assert_eq!(back.digest(), st.digest());
    }

    #[test]
    fn placement_is_rechecked_at_apply_and_capacity_is_released() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 800) }, &mut t);
        // A concurrent placement decided on the same free capacity falls back to pending.
        let r = st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 800) }, &mut t);
        let CommandResponse::Session(b) = r else { panic!() };
        assert_eq!(b.node_id, None);
        assert_eq!(b.pending_reason, PendingReason::FilledUp { node: "n1".into() });
        assert_eq!(st.allocated_on("n1").cpu_millis, 800);

        st.apply(Command::TerminateSessions { ids: vec!["a".into()], message: "deleted".into(), now_ms: 2 }, &mut t);
        assert_eq!(st.allocated_on("n1").cpu_millis, 0);
        let r = st.apply(place("b", "n1", 0, 3), &mut t);
        let CommandResponse::Sessions(placed) = r else { panic!("{r:?}") };
        assert_eq!(placed.iter().map(|b| (b.id.as_str(), b.generation)).collect::<Vec<_>>(), [("b", 1)]);
        assert_eq!(st.allocated_on("n1").cpu_millis, 800);
    }

    #[test]
    fn reports_are_fenced_by_node_and_generation() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        let report = |generation| Command::ReportSessions {
            node_id: "n1".into(),
            reports: vec![Report { id: "a".into(), generation, phase: SessionPhase::Running, message: String::new() }],
            now_ms: 2,
        };
        st.apply(report(7), &mut t);
        assert_eq!(st.sessions["a"].phase, SessionPhase::Pending, "a stale generation's report is ignored");
        let other = Command::ReportSessions {
            node_id: "n2".into(),
            reports: vec![Report {
                id: "a".into(),
                generation: 1,
                phase: SessionPhase::Running,
                message: String::new(),
            }],
            now_ms: 2,
        };
        st.apply(other, &mut t);
        assert_eq!(st.sessions["a"].phase, SessionPhase::Pending, "another node's report is ignored");
        st.apply(report(1), &mut t);
        assert_eq!(st.sessions["a"].phase, SessionPhase::Running);
    }

    #[test]
    fn digest_is_stable_across_rebuild() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        let json = serde_json::to_vec(&st).unwrap();
        let mut back: ClusterState = serde_json::from_slice(&json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.digest(), st.digest());
        assert_eq!(back.allocated_on("n1"), st.allocated_on("n1"));
    }

    #[test]
    fn leader_work_indexes_follow_every_change() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", None, 100) }, &mut t);
        st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 100) }, &mut t);
        assert_eq!(st.unplaced.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(st.expired_at(99), Vec::<String>::new());
        assert_eq!(st.expired_at(100), ["a", "b"]);

        st.apply(place("a", "n1", 0, 2), &mut t);
        assert!(st.unplaced.is_empty());
        st.apply(Command::RenewSession { id: "a".into(), expires_at_ms: 500, now_ms: 3 }, &mut t);
        assert_eq!(st.expired_at(100), ["b"]);
        st.apply(Command::TerminateSessions { ids: vec!["b".into()], message: "deleted".into(), now_ms: 4 }, &mut t);
        assert_eq!(st.expired_at(1000), ["a"]);

        let json = serde_json::to_vec(&st).unwrap();
        let mut back: ClusterState = serde_json::from_slice(&json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.expiring, st.expiring);
        assert_eq!(back.unplaced, st.unplaced);
    }

    fn running(st: &mut ClusterState, t: &mut Touched, id: &str, node: &str) {
        let generation = st.sessions[id].generation;
        let r = Report { id: id.into(), generation, phase: SessionPhase::Running, message: String::new() };
        st.apply(Command::ReportSessions { node_id: node.into(), reports: vec![r], now_ms: 2 }, t);
        assert_eq!(st.sessions[id].phase, SessionPhase::Running);
    }

    #[test]
    fn lost_sessions_back_off_and_fail_when_out_of_attempts() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::RegisterNode { node: node("n2", 1000) }, &mut t);
        let mut a = session("a", "r1", Some("n1"), 100);
        a.spec.max_attempts = 1;
        a.spec.backoff_ms = 400;
        st.apply(Command::CreateSession { session: a }, &mut t);
        running(&mut st, &mut t, "a", "n1");

        let CommandResponse::Sessions(lost) =
            st.apply(Command::NodeDown { node_id: "n1".into(), now_ms: 10, keep: vec![] }, &mut t)
        else {
            panic!()
        };
        assert_eq!(lost.len(), 1);
        let a = &st.sessions["a"];
        assert_eq!((a.phase, a.restarts, a.not_before_ms, a.node_id.as_deref()), (SessionPhase::Lost, 1, 410, None));
        assert!(st.unplaced.iter().any(|(_, id)| id == "a"));
        assert_eq!(st.allocated_on("n1").cpu_millis, 0);

        st.apply(
            Command::PlaceSessions {
                placements: vec![Placement { id: "a".into(), node_id: "n2".into(), expected_generation: 1 }],
                now_ms: 420,
            },
            &mut t,
        );
        assert_eq!((st.sessions["a"].generation, st.sessions["a"].not_before_ms), (2, 0));
        // The second loss exceeds max_attempts = 1: FAILED, not placed again.
        st.apply(Command::SessionsLost { node_id: "n2".into(), ids: vec!["a".into()], now_ms: 500 }, &mut t);
        let a = &st.sessions["a"];
        assert_eq!(a.phase, SessionPhase::Failed);
        assert!(a.message.contains("restart attempts"), "{}", a.message);
        assert!(st.unplaced.is_empty());
        assert_eq!(st.allocated_on("n2").cpu_millis, 0);
    }

    #[test]
    fn node_down_keeps_sessions_with_a_longer_lost_after() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 100) }, &mut t);
        st.apply(Command::NodeDown { node_id: "n1".into(), now_ms: 10, keep: vec!["b".into()] }, &mut t);
        assert_eq!(st.sessions["a"].phase, SessionPhase::Lost);
        assert_eq!(st.sessions["b"].phase, SessionPhase::Pending);
        assert_eq!(st.sessions["b"].node_id.as_deref(), Some("n1"));
        // A stale report from the down node's old copy of a cannot revive it.
        let r = Report { id: "a".into(), generation: 1, phase: SessionPhase::Running, message: String::new() };
        st.apply(Command::ReportSessions { node_id: "n1".into(), reports: vec![r], now_ms: 11 }, &mut t);
        assert_eq!(st.sessions["a"].phase, SessionPhase::Lost);
        st.apply(Command::SessionsLost { node_id: "n1".into(), ids: vec!["b".into()], now_ms: 20 }, &mut t);
        assert_eq!(st.sessions["b"].phase, SessionPhase::Lost);
    }

    #[test]
    fn drain_moves_sessions_and_tracks_them_until_running_elsewhere() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::RegisterNode { node: node("n2", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        let v0 = st.node_version("n1");
        let drain = DrainRecord { started_at_ms: 5, deadline_ms: 100, max_parallel: 1 };
        assert_eq!(st.apply(Command::DrainNode { node_id: "n1".into(), drain }, &mut t), CommandResponse::Ok);
        assert!(!st.node_fits("n1", &spec(1)), "a draining node takes no new sessions");
        st.apply(Command::MoveSessions { node_id: "n1".into(), ids: vec!["a".into()], now_ms: 6 }, &mut t);
        assert!(st.node_version("n1") > v0, "the old node's watch must see the session go");
        assert_eq!(st.moving["n1"].len(), 1);
        assert!(st.node_sessions["n1"].is_empty());
        st.apply(
            Command::PlaceSessions {
                placements: vec![Placement { id: "a".into(), node_id: "n2".into(), expected_generation: 1 }],
                now_ms: 7,
            },
            &mut t,
        );
        assert_eq!(st.moving["n1"].len(), 1, "still moving until it runs");
        running(&mut st, &mut t, "a", "n2");
        assert!(!st.moving.contains_key("n1"));
        assert_eq!(st.sessions["a"].generation, 2);
        // Re-registering keeps the drain; uncordoning ends it.
        st.apply(Command::RegisterNode { node: node("n1", 2000) }, &mut t);
        assert_eq!(st.nodes["n1"].drain.map(|d| d.started_at_ms), Some(5));
        st.apply(Command::CordonNode { node_id: "n1".into(), cordoned: false }, &mut t);
        assert_eq!((st.nodes["n1"].phase, st.nodes["n1"].drain), (NodePhase::Ready, None));
    }

    #[test]
    fn paused_scheduler_places_nothing_until_resumed() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::SetSchedulerPaused { paused: true }, &mut t);
        assert!(t.meta, "the pause is persisted with the state machine's meta");
        // A create that the service placed before the pause committed waits instead.
        let r = st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100) }, &mut t);
        let CommandResponse::Session(a) = r else { panic!("{r:?}") };
        assert_eq!((a.node_id.as_deref(), a.generation), (None, 0));
        assert_eq!(a.pending_reason, PendingReason::Paused);
        assert_eq!(st.allocated_on("n1").cpu_millis, 0);
        let r = st.apply(place("a", "n1", 0, 2), &mut t);
        assert_eq!(r, CommandResponse::Sessions(vec![]), "nothing is placed while paused");
        assert_eq!(st.sessions["a"].node_id, None);
        let before = st.digest();
        st.apply(Command::SetSchedulerPaused { paused: false }, &mut t);
        assert_ne!(st.digest(), before, "the pause is part of the replicated state");
        st.apply(place("a", "n1", 0, 3), &mut t);
        let a = &st.sessions["a"];
        assert_eq!((a.node_id.as_deref(), a.generation), (Some("n1"), 1));
    }
}
