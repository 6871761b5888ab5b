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
//!
//! Tenants, their quotas and API keys are replicated state too. A tenant's
//! quota is checked at apply time in `CreateSession`, against an index of the
//! tenant's live sessions, so concurrent creates cannot exceed it; the create
//! also re-checks the API key that made it, so a key revoked meanwhile
//! creates nothing. The `default` tenant always exists (unlimited unless an
//! admin gave it quotas).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sandfleet_common::auth::{ApiKey, Caller, Principal, Role, DEFAULT_TENANT};
use sandfleet_common::template::TemplateRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::pending::PendingReason;

/// A batch of sessions made by one `CreateSessions` call, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    pub request_id: String,
    pub tenant: String,
    pub created_at_ms: i64,
    /// What every replica runs before its patch (defaults filled in).
    pub spec: SpecRecord,
    /// SHA-256 of the patches as stored, so a retry with other patches is told apart.
    pub patches_sha256: String,
    /// The replicas' session ids, in replica order.
    pub session_ids: Vec<String>,
    /// When it was deleted; 0 while not.
    #[serde(default)]
    pub deleted_at_ms: i64,
    /// The warm pool its first replicas were claimed from; empty for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    /// How many replicas (the first ones) were claimed from the pool.
    #[serde(default)]
    pub claimed: u32,
}

impl BatchRecord {
    /// The SHA-256 of a batch's patches, hex.
    pub fn digest(patches: &[sandfleet_common::spec::ReplicaPatch]) -> String {
        let bytes = serde_json::to_vec(patches).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// Where a batch's replicas stand, counted from their sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub placed: u32,
    pub running: u32,
    pub failed: u32,
    pub pending: u32,
    pub terminated: u32,
}

/// A warm pool, as stored (see `proto` `Pool` for the bounds' meanings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub tenant: String,
    /// What each sandbox runs (with the pool label added).
    pub spec: SpecRecord,
    pub min: u32,
    pub max: u32,
    pub buffer_min: u32,
    pub buffer_max: u32,
    pub created_at_ms: i64,
}

/// Changes to a pool's bounds; `None` keeps one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolBounds {
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub buffer_min: Option<u32>,
    pub buffer_max: Option<u32>,
}

impl PoolRecord {
    /// The bounds in order: min <= max, buffer_min <= buffer_max <= max.
    pub fn check_bounds(&self) -> Result<(), String> {
        if self.min > self.max {
            return Err(format!("min ({}) is more than max ({})", self.min, self.max));
        }
        if self.buffer_min > self.buffer_max {
            return Err(format!("buffer_min ({}) is more than buffer_max ({})", self.buffer_min, self.buffer_max));
        }
        if self.buffer_max > self.max {
            return Err(format!("buffer_max ({}) is more than max ({})", self.buffer_max, self.max));
        }
        Ok(())
    }

    /// The pool with `b` applied.
    pub fn with_bounds(&self, b: PoolBounds) -> PoolRecord {
        PoolRecord {
            min: b.min.unwrap_or(self.min),
            max: b.max.unwrap_or(self.max),
            buffer_min: b.buffer_min.unwrap_or(self.buffer_min),
            buffer_max: b.buffer_max.unwrap_or(self.buffer_max),
            ..self.clone()
        }
    }
}

/// A pool's sandboxes by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: u32,
    pub starting: u32,
    pub claimed: u32,
    pub failed: u32,
}

/// The key of a pool: pools are named per tenant.
pub fn pool_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// What [`Command::CreateBatch`] carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewBatch {
    pub batch: BatchRecord,
    pub patches: Vec<sandfleet_common::spec::ReplicaPatch>,
    /// The node of each replica, when the leader placed it at create.
    pub nodes: Vec<Option<String>>,
    /// Why the replicas without a node wait.
    pub waiting: PendingReason,
    /// The API key that made the create, re-checked at apply.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The create's trace parent, kept on each session.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

impl NewBatch {
    /// The sessions of a batch from a pool: the first replicas claimed from
    /// it (idle RUNNING sandboxes, lowest ids first), the rest `cold` ids.
    fn ids_from_pool(ready: &[String], cold: &[String], count: usize) -> Vec<String> {
        ready.iter().take(count).chain(cold.iter()).take(count).cloned().collect()
    }
}

/// A session's lifecycle state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The owning tenant; sessions created before tenants existed are the default tenant's.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The W3C trace parent of the create that made it (its span in the
    /// coordinator), so later work on the session (placement, the agent's
    /// start) joins that trace; empty when the create was not traced. Absent
    /// from older logs and snapshots, and not written when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    /// The warm pool it belongs to; empty for other sessions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    /// When a client claimed it from its pool; 0 while idle (and for other sessions).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub claimed_at_ms: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl SessionRecord {
    /// An idle sandbox of a warm pool: made by the pool, not claimed yet.
    pub fn pool_idle(&self) -> bool {
        !self.pool.is_empty() && self.claimed_at_ms == 0
    }
}

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// The key of a create's request id in [`ClusterState::request_ids`]:
/// request ids are scoped per tenant. The default tenant's keys are the bare
/// request id (as before tenants existed); others are `tenant/request_id`
/// (neither a DNS label nor a request id contains `/`).
pub fn request_key(tenant: &str, request_id: &str) -> String {
    if tenant == DEFAULT_TENANT {
        request_id.to_string()
    } else {
        format!("{tenant}/{request_id}")
    }
}

/// A tenant's limits, 0 meaning unlimited, in the units of [`Resources`]
/// (CPU is the summed *reservation*, `SessionSpec::cpu_reserved_millis`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    #[serde(default)]
    pub max_sessions: u64,
    #[serde(default)]
    pub max_cpu_millis: u64,
    #[serde(default)]
    pub max_memory_bytes: u64,
}

/// A tenant, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: String,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default)]
    pub created_at_ms: i64,
}

impl TenantRecord {
    /// The implicit default tenant: unlimited.
    pub fn implicit_default() -> Self {
        TenantRecord { name: DEFAULT_TENANT.to_string(), quota: Quota::default(), created_at_ms: 0 }
    }
}

/// An API key, as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    /// Hex SHA-256 of the secret ([`ApiKey::secret_hash`]).
    pub secret_hash: String,
    pub created_at_ms: i64,
    /// 0 = never.
    #[serde(default)]
    pub expires_at_ms: i64,
    /// 0 = not revoked.
    #[serde(default)]
    pub revoked_at_ms: i64,
}

impl ApiKeyRecord {
    /// Neither revoked nor expired at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms == 0 && (self.expires_at_ms == 0 || now_ms < self.expires_at_ms)
    }
}

/// Why an API key was refused. Callers get one undifferentiated
/// UNAUTHENTICATED; the reason is for the server's own logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefused {
    Unknown,
    WrongSecret,
    Revoked,
    Expired,
}

/// A partial tenant update: each `Some` replaces that limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUpdate {
    #[serde(default)]
    pub max_sessions: Option<u64>,
    #[serde(default)]
    pub max_cpu_millis: Option<u64>,
    #[serde(default)]
    pub max_memory_bytes: Option<u64>,
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

    pub fn add(&mut self, r: &Resources) {
        self.cpu_millis += r.cpu_millis;
        self.memory_bytes += r.memory_bytes;
        self.slots += r.slots;
    }

    pub fn sub(&mut self, r: &Resources) {
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
    /// The OCI images its agent advertised, normalized: where sessions of
    /// templates with an image may run.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub images: BTreeSet<String>,
    pub phase: NodePhase,
    pub registered_at_ms: i64,
    /// Set while the node drains: the drain in effect, from `operator_hold`
    /// or else `agent_hold` (none while the node is down).
    #[serde(default)]
    pub drain: Option<DrainRecord>,
    /// An operator's cordon or drain (NodeService). Kept while the node is
    /// down and across registrations; only an operator removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_hold: Option<NodeHold>,
    /// The node's own agent's cordon or drain (it follows its Kubernetes
    /// Node): set by its registration and by AgentService.SetNodeSchedulable,
    /// and removed only by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_hold: Option<NodeHold>,
}

impl NodeRecord {
    /// The hold of `by`.
    pub fn hold(&self, by: HoldBy) -> Option<&NodeHold> {
        match by {
            HoldBy::Operator => self.operator_hold.as_ref(),
            HoldBy::Agent => self.agent_hold.as_ref(),
        }
    }

    fn hold_mut(&mut self, by: HoldBy) -> &mut Option<NodeHold> {
        match by {
            HoldBy::Operator => &mut self.operator_hold,
            HoldBy::Agent => &mut self.agent_hold,
        }
    }

    /// Derives the phase and the drain in effect from the holds: the
    /// strongest of them (a drain over a cordon over none; an operator's
    /// drain parameters over the agent's). A down node stays down, its holds
    /// kept for when it is back.
    fn settle(&mut self) {
        if self.phase == NodePhase::Down {
            self.drain = None;
            return;
        }
        let holds = [self.operator_hold.as_ref(), self.agent_hold.as_ref()];
        self.drain = holds.iter().flatten().find_map(|h| h.drain);
        self.phase = if self.drain.is_some() {
            NodePhase::Draining
        } else if holds.iter().any(Option::is_some) {
            NodePhase::Cordoned
        } else {
            NodePhase::Ready
        };
    }

    /// Sets the hold of `by` (None removes it) and settles the phase. A
    /// hold of the same kind keeps its start; a repeated drain keeps its
    /// start time, and an operator's updates its deadline and parallelism
    /// (the agent's keeps them: it sends the same drain again after each
    /// registration). Returns whether anything changed.
    fn set_hold(&mut self, by: HoldBy, new: Option<NodeHold>) -> bool {
        let before = self.clone();
        let slot = self.hold_mut(by);
        *slot = match (slot.take(), new) {
            (_, None) => None,
            (Some(old), Some(new)) if old.drain.is_some() == new.drain.is_some() => Some(NodeHold {
                drain: match (old.drain, new.drain) {
                    (Some(o), Some(_)) if by == HoldBy::Agent => Some(o),
                    (Some(o), Some(n)) => Some(DrainRecord { started_at_ms: o.started_at_ms, ..n }),
                    _ => None,
                },
                reason: new.reason,
                since_ms: old.since_ms,
            }),
            (_, Some(new)) => Some(new),
        };
        self.settle();
        *self != before
    }
}

/// Who holds a node out of placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HoldBy {
    /// An operator, through NodeService (cordon, drain, uncordon).
    #[default]
    Operator,
    /// The node's own agent (following its Kubernetes Node).
    Agent,
}

impl HoldBy {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldBy::Operator => "operator",
            HoldBy::Agent => "agent",
        }
    }
}

/// One source's hold on a node: a cordon (no new sessions), or a drain
/// (its sessions move off too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHold {
    /// Set for a drain.
    pub drain: Option<DrainRecord>,
    /// Why (empty for an operator's).
    pub reason: String,
    /// Since when, Unix ms.
    pub since_ms: i64,
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
// Commands are built once, serialized into a log entry and applied once:
// boxing the large session record would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Sets the cluster's token signing key. Applied once; later ones are ignored.
    InitCluster { signing_seed: Vec<u8> },
    /// Creates a session unless its request id was already seen. When
    /// `session.node_id` is set, the placement is re-checked against capacity.
    /// `key_id` is the API key that made the create, re-checked at apply
    /// (at `session.created_at_ms`), so a key revoked meanwhile creates
    /// nothing; the tenant's quota is checked too.
    CreateSession {
        session: SessionRecord,
        #[serde(default)]
        key_id: Option<String>,
    },
    /// Terminates sessions (client delete or expiry). With `tenant`, a
    /// session of another tenant counts as missing (a user's delete).
    TerminateSessions {
        ids: Vec<String>,
        message: String,
        now_ms: i64,
        #[serde(default)]
        tenant: Option<String>,
    },
    /// Sets a new expiry. With `tenant`, a session of another tenant counts as missing.
    RenewSession {
        id: String,
        expires_at_ms: i64,
        now_ms: i64,
        #[serde(default)]
        tenant: Option<String>,
    },
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
    /// An operator (or the node's own agent, `by`) stops or resumes new
    /// placements on a node: sets or removes that source's hold, which for
    /// an operator also ends its drain. The other source's hold stays.
    /// Refused for a down node when an operator asks; the agent's hold is
    /// kept for when the node is back.
    CordonNode {
        node_id: String,
        cordoned: bool,
        #[serde(default)]
        by: HoldBy,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        now_ms: i64,
    },
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
    /// Starts (or updates) a drain of an operator (or of the node's own
    /// agent, `by`): no new placements, sessions move off.
    DrainNode {
        node_id: String,
        drain: DrainRecord,
        #[serde(default)]
        by: HoldBy,
        #[serde(default)]
        reason: String,
    },
    /// Moves sessions off a draining node: they become unplaced and are placed
    /// elsewhere with a new generation, which stops the old copy.
    MoveSessions { node_id: String, ids: Vec<String>, now_ms: i64 },
    /// An operator pauses (or resumes) placement cluster-wide.
    SetSchedulerPaused { paused: bool },
    /// Creates a tenant; refused when the name is taken.
    CreateTenant { tenant: TenantRecord },
    /// Changes a tenant's quota (the default tenant's record is created on first update).
    UpdateTenant { name: String, update: QuotaUpdate },
    /// Deletes a tenant without live sessions or active keys.
    DeleteTenant { name: String, now_ms: i64 },
    /// Stores a new API key (its hash) for an existing tenant.
    CreateApiKey { key: ApiKeyRecord },
    /// Revokes an API key; idempotent.
    RevokeApiKey { id: String, now_ms: i64 },
    /// Creates a batch of sessions, all or none: `batch.session_ids[i]` is
    /// replica `i`, running `batch.spec` patched with `patches[i]` (see
    /// `SpecRecord::patched`), placed on `nodes[i]` when set (re-checked
    /// against capacity like a create's), else waiting for `waiting`. A request id already used for a
    /// batch answers that batch; the API key and the tenant's quota are checked
    /// for the whole batch at once.
    CreateBatch(NewBatch),
    /// Deletes a batch: terminates its live sessions. With `tenant`, another
    /// tenant's batch counts as missing.
    DeleteBatch {
        id: String,
        now_ms: i64,
        #[serde(default)]
        tenant: Option<String>,
    },
    /// Creates a warm pool; refused when the tenant has one of that name.
    CreatePool { pool: PoolRecord },
    /// Changes a pool's bounds (checked again in order at apply).
    UpdatePool { tenant: String, name: String, bounds: PoolBounds },
    /// Deletes a pool and ends its idle sandboxes (claimed ones stay).
    DeletePool { tenant: String, name: String, now_ms: i64 },
    /// The leader refills a pool: one idle sandbox per id (unplaced, for the
    /// placement round), as many as its `max` and the tenant's quota allow.
    FillPool { tenant: String, name: String, ids: Vec<String>, now_ms: i64 },
    /// A client claims an idle RUNNING sandbox of a pool: it becomes the
    /// client's session under `request_id` (idempotent like a create), with
    /// its TTL counted from now. Answers `PoolEmpty` when none is idle.
    ClaimSession {
        tenant: String,
        pool: String,
        request_id: String,
        now_ms: i64,
        #[serde(default)]
        key_id: Option<String>,
    },
    /// An admin creates a cluster template; refused when the name is taken
    /// or the cluster holds [`sandfleet_common::limits::MAX_TEMPLATES`].
    CreateTemplate { template: TemplateRecord },
    /// Replaces a template (its creation time kept); sessions and pools
    /// made from it keep their spec.
    UpdateTemplate { template: TemplateRecord },
    /// Deletes a template; refused while live sessions or pools use it
    /// unless `force`.
    DeleteTemplate { name: String, force: bool },
    /// Concurrent proposals group-committed as one Raft entry (see
    /// `commit.rs`): applied one after another, exactly as if each had been
    /// its own entry, with one response each. Never nested.
    Batch { commands: Vec<Command> },
}

#[cfg(test)]
impl Command {
    /// An operator's cordon (or uncordon) of `node_id`, for tests.
    pub(crate) fn cordon(node_id: String, cordoned: bool) -> Self {
        Command::CordonNode { node_id, cordoned, by: HoldBy::Operator, reason: String::new(), now_ms: 0 }
    }

    /// An operator's drain of `node_id`, for tests.
    pub(crate) fn drain(node_id: String, drain: DrainRecord) -> Self {
        Command::DrainNode { node_id, drain, by: HoldBy::Operator, reason: String::new() }
    }
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
    /// A tenant after the change.
    Tenant(TenantRecord),
    /// An API key after the change.
    ApiKey(ApiKeyRecord),
    /// Something other than a session is missing; the text says what.
    Missing(String),
    /// The name or id is taken; the text says which.
    AlreadyExists(String),
    /// A tenant quota would be exceeded; names the quota, its limit and its use.
    QuotaExceeded(String),
    /// The API key that made the command is no longer valid (revoked,
    /// expired, or gone); nothing changed.
    KeyRefused,
    /// The responses of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResponse>),
    /// A batch of sessions after the change (created or deleted).
    SessionBatch(BatchRecord),
    /// A batch create whose request id had been seen: the first batch.
    ExistingBatch(BatchRecord),
    /// A pool after the change.
    Pool(PoolRecord),
    /// A claim found no idle RUNNING sandbox in the pool; nothing changed.
    PoolEmpty,
    /// A template after the change.
    Template(TemplateRecord),
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
    /// Tenants by name. `default` is implicit until an admin gives it quotas.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantRecord>,
    /// API keys by id.
    #[serde(default)]
    pub api_keys: BTreeMap<String, ApiKeyRecord>,
    /// Creates that made a new session since the cluster began (an idempotent
    /// replay is not one): ClusterStatus's `sessions_created`. Replicated, so it
    /// survives leader changes and snapshots; a snapshot from before it reads as 0.
    #[serde(default)]
    pub sessions_created: u64,
    /// Batches of sessions by id.
    #[serde(default)]
    pub batches: BTreeMap<String, BatchRecord>,
    /// A batch's request key (as [`request_key`]) → batch id.
    #[serde(skip)]
    pub batch_requests: HashMap<String, String>,
    /// Warm pools by [`pool_key`].
    #[serde(default)]
    pub pools: BTreeMap<String, PoolRecord>,
    /// Cluster templates by name (the built-in ones are not stored).
    #[serde(default)]
    pub templates: BTreeMap<String, TemplateRecord>,
    /// Per pool key: its live sessions (idle and claimed).
    #[serde(skip)]
    pub pool_live: HashMap<String, BTreeSet<String>>,
    /// Per pool key: its idle RUNNING sessions, what a claim hands out (lowest id first).
    #[serde(skip)]
    pub pool_ready: HashMap<String, BTreeSet<String>>,
    /// Per pool key: its idle sessions that FAILED.
    #[serde(skip)]
    pub pool_failed: HashMap<String, BTreeSet<String>>,
    /// Session → the pool key it is indexed under.
    #[serde(skip)]
    pool_of: HashMap<String, String>,
    /// What each tenant's live sessions hold (sessions, CPU reserved, memory).
    #[serde(skip)]
    pub tenant_usage: HashMap<String, Resources>,
    /// The tenant and resources each live session is counted under in `tenant_usage`.
    #[serde(skip)]
    usage_index: HashMap<String, (String, Resources)>,
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
    /// (node, session) for every session that may have joined, changed in or
    /// left a node's assignment set since the last
    /// [`ClusterState::take_assignment_changes`]: the store hands them to
    /// that node's watchers after each apply, so a watch wakes only for its
    /// own node and recomputes only the sessions named.
    #[serde(skip)]
    assignment_changes: Vec<(String, String)>,
}

/// The keys an apply touched, so the store can write them through.
#[derive(Debug, Default)]
pub struct Touched {
    pub sessions: Vec<String>,
    pub nodes: Vec<String>,
    pub request_ids: Vec<String>,
    pub meta: bool,
    /// Tenants or API keys changed.
    pub auth: bool,
    pub batches: Vec<String>,
    /// Pool keys written (or, when gone from the state, deleted).
    pub pools: Vec<String>,
    /// Template names written (or, when gone from the state, deleted).
    pub templates: Vec<String>,
}

impl ClusterState {
    /// Rebuilds derived indexes after loading from disk or a snapshot.
    pub fn rebuild_indexes(&mut self) {
        // A cordon or drain stored before holds existed was an operator's.
        for n in self.nodes.values_mut() {
            if n.operator_hold.is_none() && n.agent_hold.is_none() {
                n.operator_hold = match n.phase {
                    NodePhase::Cordoned => Some(NodeHold { drain: None, reason: String::new(), since_ms: 0 }),
                    NodePhase::Draining => {
                        n.drain.map(|d| NodeHold { drain: Some(d), reason: String::new(), since_ms: d.started_at_ms })
                    }
                    NodePhase::Ready | NodePhase::Down => None,
                };
            }
        }
        self.allocated.clear();
        self.node_sessions.clear();
        self.unplaced.clear();
        self.expiring.clear();
        self.expiry_of.clear();
        self.idle.clear();
        self.moving.clear();
        self.moving_of.clear();
        self.tenant_usage.clear();
        self.usage_index.clear();
        self.batch_requests =
            self.batches.values().map(|b| (request_key(&b.tenant, &b.request_id), b.id.clone())).collect();
        self.pool_live.clear();
        self.pool_ready.clear();
        self.pool_failed.clear();
        self.pool_of.clear();
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for id in ids {
            self.reindex(&id);
        }
        // Whoever rebuilds (a load, a snapshot install) resyncs watchers whole.
        self.assignment_changes.clear();
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
        if let Some((tenant, r)) = self.usage_index.remove(id) {
            if let Some(u) = self.tenant_usage.get_mut(&tenant) {
                u.sub(&r);
                if u.slots == 0 {
                    self.tenant_usage.remove(&tenant);
                }
            }
        }
        if let Some(from) = self.moving_of.remove(id) {
            if let Some(set) = self.moving.get_mut(&from) {
                set.remove(id);
                if set.is_empty() {
                    self.moving.remove(&from);
                }
            }
        }
        if let Some(key) = self.pool_of.remove(id) {
            for index in [&mut self.pool_live, &mut self.pool_ready, &mut self.pool_failed] {
                if let Some(set) = index.get_mut(&key) {
                    set.remove(id);
                }
            }
        }
        let Some(s) = self.sessions.get(id) else { return };
        if let Some(node) = &s.node_id {
            self.assignment_changes.push((node.clone(), s.id.clone()));
        }
        if !s.pool.is_empty() {
            let key = pool_key(&s.tenant, &s.pool);
            let index = match s.phase {
                SessionPhase::Failed if s.pool_idle() => Some(&mut self.pool_failed),
                SessionPhase::Terminated | SessionPhase::Failed => None,
                _ => Some(&mut self.pool_live),
            };
            if let Some(index) = index {
                index.entry(key.clone()).or_default().insert(s.id.clone());
                if s.pool_idle() && s.phase == SessionPhase::Running {
                    self.pool_ready.entry(key.clone()).or_default().insert(s.id.clone());
                }
                self.pool_of.insert(s.id.clone(), key);
            }
        }
        if s.phase.is_terminal() {
            return;
        }
        let r = Resources::of(&s.spec);
        self.tenant_usage.entry(s.tenant.clone()).or_default().add(&r);
        self.usage_index.insert(s.id.clone(), (s.tenant.clone(), r));
        self.expiring.insert((s.expires_at_ms, s.id.clone()));
        if s.node_id.is_none() && matches!(s.phase, SessionPhase::Pending | SessionPhase::Lost) {
            self.unplaced.insert((s.created_at_ms, s.id.clone()));
        }
        // An idle pool sandbox is unused by design: its idle timeout starts at its claim.
        if s.spec.idle_timeout_seconds > 0 && !s.pool_idle() {
            self.idle.insert(s.id.clone());
        }
        if let (Some(from), false) = (&s.moved_from, s.phase == SessionPhase::Running) {
            self.moving.entry(from.clone()).or_default().insert(s.id.clone());
            self.moving_of.insert(s.id.clone(), from.clone());
        }
        self.expiry_of.insert(s.id.clone(), (s.created_at_ms, s.expires_at_ms));
    }

    /// The (node, session) pairs whose assignment may have changed since the
    /// last call, in apply order and possibly repeated; the list starts empty.
    pub fn take_assignment_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.assignment_changes)
    }

    /// Live sessions whose expiry is at or before `now_ms`.
    pub fn expired_at(&self, now_ms: i64) -> Vec<String> {
        self.expiring.range(..(now_ms.saturating_add(1), String::new())).map(|(_, id)| id.clone()).collect()
    }

    /// Live sessions in RUNNING: those placed on a node whose agent reported
    /// them started (walks the placed sessions, not every record).
    pub fn running_sessions(&self) -> u64 {
        self.node_sessions
            .values()
            .flatten()
            .filter(|id| self.sessions.get(*id).is_some_and(|s| s.phase == SessionPhase::Running))
            .count() as u64
    }

    /// Resources held on a node.
    pub fn allocated_on(&self, node: &str) -> Resources {
        self.allocated.get(node).copied().unwrap_or_default()
    }

    fn release(&mut self, s: &SessionRecord) {
        if let Some(node) = &s.node_id {
            self.assignment_changes.push((node.clone(), s.id.clone()));
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

    /// A tenant by name; the default tenant always exists.
    pub fn tenant(&self, name: &str) -> Option<TenantRecord> {
        match self.tenants.get(name) {
            Some(t) => Some(t.clone()),
            None if name == DEFAULT_TENANT => Some(TenantRecord::implicit_default()),
            None => None,
        }
    }

    /// Every tenant, the default one included, by name.
    pub fn all_tenants(&self) -> Vec<TenantRecord> {
        let mut out: Vec<TenantRecord> = self.tenants.values().cloned().collect();
        if !self.tenants.contains_key(DEFAULT_TENANT) {
            out.push(TenantRecord::implicit_default());
            out.sort_by(|a, b| a.name.cmp(&b.name));
        }
        out
    }

    /// What a tenant's live sessions hold (`slots` = sessions).
    pub fn usage_of(&self, tenant: &str) -> Resources {
        self.tenant_usage.get(tenant).copied().unwrap_or_default()
    }

    /// Whether one more session needing `need` fits the tenant's quota; the
    /// error names the quota, its limit and its use.
    pub fn quota_allows(&self, tenant: &TenantRecord, need: &Resources) -> Result<(), String> {
        let used = self.usage_of(&tenant.name);
        let q = &tenant.quota;
        let name = &tenant.name;
        if q.max_sessions > 0 && used.slots + need.slots > q.max_sessions {
            return Err(format!(
                "tenant {name:?} quota exceeded: sessions {} of {} in use",
                used.slots, q.max_sessions
            ));
        }
        if q.max_cpu_millis > 0 && used.cpu_millis + need.cpu_millis > q.max_cpu_millis {
            return Err(format!(
                "tenant {name:?} quota exceeded: cpu {}m of {}m in use; this session reserves {}m",
                used.cpu_millis, q.max_cpu_millis, need.cpu_millis
            ));
        }
        if q.max_memory_bytes > 0 && used.memory_bytes + need.memory_bytes > q.max_memory_bytes {
            return Err(format!(
                "tenant {name:?} quota exceeded: memory {} of {} bytes in use; this session needs {}",
                used.memory_bytes, q.max_memory_bytes, need.memory_bytes
            ));
        }
        Ok(())
    }

    /// Resolves an API key to its caller: the record must exist, hold this
    /// key's hash, and be neither revoked nor expired at `now_ms`.
    pub fn authenticate_key(&self, key: &ApiKey, now_ms: i64) -> Result<Caller, KeyRefused> {
        let rec = self.api_keys.get(&key.id).ok_or(KeyRefused::Unknown)?;
        if !key.matches(&rec.secret_hash) {
            return Err(KeyRefused::WrongSecret);
        }
        if rec.revoked_at_ms != 0 {
            return Err(KeyRefused::Revoked);
        }
        if rec.expires_at_ms != 0 && now_ms >= rec.expires_at_ms {
            return Err(KeyRefused::Expired);
        }
        Ok(Caller {
            principal: Principal::ApiKey { key_id: rec.id.clone() },
            tenant: rec.tenant.clone(),
            role: rec.role,
        })
    }

    /// What uses template `name`: its live sessions, and the pools (by key) whose spec it made.
    pub fn template_users(&self, name: &str) -> (u32, Vec<String>) {
        let live = self
            .sessions
            .values()
            .filter(|s| !s.phase.is_terminal() && s.spec.template_name == name)
            .count()
            .try_into()
            .unwrap_or(u32::MAX);
        let pools = self.pools.iter().filter(|(_, p)| p.spec.template_name == name).map(|(k, _)| k.clone()).collect();
        (live, pools)
    }

    /// Counts a pool's sandboxes by state.
    pub fn pool_counts(&self, key: &str) -> PoolCounts {
        let mut c =
            PoolCounts { failed: self.pool_failed.get(key).map_or(0, |s| s.len() as u32), ..Default::default() };
        for s in self.pool_live.get(key).into_iter().flatten().filter_map(|id| self.sessions.get(id)) {
            match (s.pool_idle(), s.phase) {
                (false, _) => c.claimed += 1,
                (true, SessionPhase::Running) => c.idle += 1,
                (true, _) => c.starting += 1,
            }
        }
        c
    }

    fn fill_pool(&mut self, key: &str, ids: Vec<String>, now_ms: i64, touched: &mut Touched) -> CommandResponse {
        let Some(pool) = self.pools.get(key).cloned() else {
            return CommandResponse::Missing(format!("pool {key} not found"));
        };
        let Some(tenant) = self.tenant(&pool.tenant) else {
            return CommandResponse::Rejected(format!("tenant {:?} does not exist", pool.tenant));
        };
        let live = self.pool_live.get(key).map_or(0, |s| s.len());
        let room = (pool.max as usize).saturating_sub(live);
        let mut made = Vec::new();
        for id in ids.into_iter().take(room) {
            if self.sessions.contains_key(&id) {
                continue;
            }
            if self.quota_allows(&tenant, &Resources::of(&pool.spec)).is_err() {
                break;
            }
            let session = SessionRecord {
                id: id.clone(),
                spec: pool.spec.clone(),
                phase: SessionPhase::Pending,
                node_id: None,
                generation: 0,
                request_id: format!("pool:{}:{id}", pool.name),
                created_at_ms: now_ms,
                // Idle sandboxes do not expire; a claim sets the expiry from its TTL.
                expires_at_ms: now_ms + (sandfleet_common::limits::MAX_TTL_SECONDS as i64) * 1000,
                updated_at_ms: now_ms,
                pending_reason: PendingReason::AwaitingLeader,
                message: String::new(),
                restarts: 0,
                not_before_ms: 0,
                moved_from: None,
                renewed_at_ms: 0,
                tenant: pool.tenant.clone(),
                traceparent: String::new(),
                pool: pool.name.clone(),
                claimed_at_ms: 0,
            };
            touched.sessions.push(id.clone());
            self.sessions.insert(id.clone(), session.clone());
            // Counted at once, so the next quota check of this loop sees it.
            self.reindex(&id);
            made.push(session);
        }
        self.sessions_created += made.len() as u64;
        CommandResponse::Sessions(made)
    }

    fn claim(
        &mut self,
        key: &str,
        request_id: &str,
        now_ms: i64,
        key_id: Option<&str>,
        touched: &mut Touched,
    ) -> CommandResponse {
        let Some(pool) = self.pools.get(key).cloned() else {
            return CommandResponse::Missing(format!("pool {:?} not found", key.split_once('/').map_or(key, |k| k.1)));
        };
        let rkey = request_key(&pool.tenant, request_id);
        if let Some(existing) = self.request_ids.get(&rkey).and_then(|id| self.sessions.get(id)) {
            return CommandResponse::Existing(existing.clone());
        }
        if let Some(key_id) = key_id {
            let valid = self
                .api_keys
                .get(key_id)
                .is_some_and(|k| k.is_active(now_ms) && (k.role == Role::Admin || k.tenant == pool.tenant));
            if !valid {
                return CommandResponse::KeyRefused;
            }
        }
        let Some(id) = self.pool_ready.get(key).and_then(|s| s.iter().next().cloned()) else {
            return CommandResponse::PoolEmpty;
        };
        let Some(s) = self.sessions.get_mut(&id) else { return CommandResponse::PoolEmpty };
        s.claimed_at_ms = now_ms;
        s.request_id = request_id.to_string();
        s.expires_at_ms = now_ms + (s.spec.ttl_seconds as i64) * 1000;
        s.renewed_at_ms = now_ms;
        s.updated_at_ms = now_ms;
        let s = s.clone();
        self.request_ids.insert(rkey.clone(), id.clone());
        touched.request_ids.push(rkey);
        touched.sessions.push(id);
        CommandResponse::Session(s)
    }

    /// Counts a batch's replicas by where they stand.
    pub fn batch_counts(&self, batch: &BatchRecord) -> BatchCounts {
        let mut c = BatchCounts::default();
        for s in batch.session_ids.iter().filter_map(|id| self.sessions.get(id)) {
            match s.phase {
                SessionPhase::Running => {
                    c.running += 1;
                    c.placed += 1;
                }
                SessionPhase::Pending if s.node_id.is_some() => c.placed += 1,
                SessionPhase::Pending | SessionPhase::Lost => c.pending += 1,
                SessionPhase::Failed => c.failed += 1,
                SessionPhase::Terminated => c.terminated += 1,
            }
        }
        c
    }

    fn create_batch(&mut self, new: NewBatch, touched: &mut Touched) -> CommandResponse {
        let NewBatch { mut batch, patches, nodes, waiting, key_id, traceparent } = new;
        let rkey = request_key(&batch.tenant, &batch.request_id);
        if let Some(existing) = self.batch_requests.get(&rkey).and_then(|id| self.batches.get(id)) {
            return CommandResponse::ExistingBatch(existing.clone());
        }
        if self.batches.contains_key(&batch.id) {
            return CommandResponse::Rejected(format!("batch id {} already exists", batch.id));
        }
        if let Some(id) = batch.session_ids.iter().find(|id| self.sessions.contains_key(*id)) {
            return CommandResponse::Rejected(format!("session id {id} already exists"));
        }
        if nodes.len() > batch.session_ids.len() || patches.len() > batch.session_ids.len() {
            return CommandResponse::Rejected("a batch entry with mismatched replica lists".into());
        }
        if let Some(key_id) = &key_id {
            let valid = self.api_keys.get(key_id).is_some_and(|k| {
                k.is_active(batch.created_at_ms) && (k.role == Role::Admin || k.tenant == batch.tenant)
            });
            if !valid {
                return CommandResponse::KeyRefused;
            }
        }
        let Some(tenant) = self.tenant(&batch.tenant) else {
            return CommandResponse::Rejected(format!("tenant {:?} does not exist", batch.tenant));
        };
        let count = batch.session_ids.len();
        // From a pool: its idle RUNNING sandboxes first, as many as there are.
        let ready: Vec<String> = if batch.pool.is_empty() {
            Vec::new()
        } else {
            let key = pool_key(&batch.tenant, &batch.pool);
            if !self.pools.contains_key(&key) {
                return CommandResponse::Missing(format!("pool {:?} not found", batch.pool));
            }
            self.pool_ready.get(&key).map(|r| r.iter().take(count).cloned().collect()).unwrap_or_default()
        };
        let claimed = ready.len();
        let one = Resources::of(&batch.spec);
        let n = (count - claimed) as u64;
        let all = Resources { cpu_millis: one.cpu_millis * n, memory_bytes: one.memory_bytes * n, slots: n };
        if let Err(why) = self.quota_allows(&tenant, &all) {
            return CommandResponse::QuotaExceeded(format!("a batch of {count} sessions does not fit: {why}"));
        }
        let now = batch.created_at_ms;
        batch.session_ids = NewBatch::ids_from_pool(&ready, &batch.session_ids, count);
        batch.claimed = claimed as u32;
        for (i, id) in ready.iter().enumerate() {
            let Some(s) = self.sessions.get_mut(id) else { continue };
            s.claimed_at_ms = now;
            s.request_id = format!("{}#{i}", batch.request_id);
            s.expires_at_ms = now + (s.spec.ttl_seconds as i64) * 1000;
            s.renewed_at_ms = now;
            s.updated_at_ms = now;
            // Labels only (the service refuses env patches for a pool): the sandbox runs already.
            s.spec = s.spec.patched(patches.get(i), &batch.id);
            touched.sessions.push(id.clone());
        }
        let mut nodes = nodes.into_iter();
        for (i, id) in batch.session_ids.iter().enumerate().skip(claimed) {
            let node = nodes.next().flatten();
            let spec = batch.spec.patched(patches.get(i), &batch.id);
            let (node_id, pending_reason) = match node {
                _ if self.scheduler_paused => (None, PendingReason::Paused),
                Some(node) if self.node_fits(&node, &spec) => (Some(node), PendingReason::Starting),
                Some(node) => (None, PendingReason::FilledUp { node }),
                None => (None, waiting.clone()),
            };
            let session = SessionRecord {
                id: id.clone(),
                generation: u64::from(node_id.is_some()),
                node_id,
                phase: SessionPhase::Pending,
                request_id: format!("{}#{i}", batch.request_id),
                created_at_ms: now,
                expires_at_ms: now + (spec.ttl_seconds as i64) * 1000,
                updated_at_ms: now,
                pending_reason,
                message: String::new(),
                spec,
                restarts: 0,
                not_before_ms: 0,
                moved_from: None,
                renewed_at_ms: 0,
                tenant: batch.tenant.clone(),
                traceparent: traceparent.clone(),
                pool: String::new(),
                claimed_at_ms: 0,
            };
            self.hold(&session);
            touched.sessions.push(session.id.clone());
            self.sessions.insert(session.id.clone(), session);
        }
        self.sessions_created += n;
        self.batch_requests.insert(rkey, batch.id.clone());
        touched.batches.push(batch.id.clone());
        self.batches.insert(batch.id.clone(), batch.clone());
        CommandResponse::SessionBatch(batch)
    }

    /// Applies one command. Never fails: a command that cannot apply is
    /// answered with [`CommandResponse::Rejected`] and changes nothing.
    pub fn apply(&mut self, cmd: Command, touched: &mut Touched) -> CommandResponse {
        if let Command::Batch { commands } = cmd {
            return CommandResponse::Batch(commands.into_iter().map(|c| self.apply(c, touched)).collect());
        }
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
            // Unwrapped by `apply`.
            Command::Batch { commands } => {
                CommandResponse::Batch(commands.into_iter().map(|c| self.apply(c, touched)).collect())
            }
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
            Command::CreateSession { mut session, key_id } => {
                let rkey = request_key(&session.tenant, &session.request_id);
                if let Some(existing) = self.request_ids.get(&rkey).and_then(|id| self.sessions.get(id)) {
                    return CommandResponse::Existing(existing.clone());
                }
                if self.sessions.contains_key(&session.id) {
                    return CommandResponse::Rejected(format!("session id {} already exists", session.id));
                }
                if let Some(key_id) = &key_id {
                    let valid = self.api_keys.get(key_id).is_some_and(|k| {
                        k.is_active(session.created_at_ms) && (k.role == Role::Admin || k.tenant == session.tenant)
                    });
                    if !valid {
                        return CommandResponse::KeyRefused;
                    }
                }
                let Some(tenant) = self.tenant(&session.tenant) else {
                    return CommandResponse::Rejected(format!("tenant {:?} does not exist", session.tenant));
                };
                if let Err(why) = self.quota_allows(&tenant, &Resources::of(&session.spec)) {
                    return CommandResponse::QuotaExceeded(why);
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
                self.sessions_created += 1;
                self.request_ids.insert(rkey.clone(), session.id.clone());
                touched.request_ids.push(rkey);
                touched.sessions.push(session.id.clone());
                self.sessions.insert(session.id.clone(), session.clone());
                CommandResponse::Session(session)
            }
            Command::CreateBatch(new) => self.create_batch(new, touched),
            Command::DeleteBatch { id, now_ms, tenant } => {
                let Some(b) = self.batches.get(&id).filter(|b| tenant.as_ref().is_none_or(|t| *t == b.tenant)) else {
                    return CommandResponse::Missing(format!("batch {id} not found"));
                };
                let ids = b.session_ids.clone();
                if b.deleted_at_ms == 0 {
                    if let Some(b) = self.batches.get_mut(&id) {
                        b.deleted_at_ms = now_ms;
                    }
                    touched.batches.push(id.clone());
                }
                let message = format!("batch {id} deleted");
                self.apply_inner(Command::TerminateSessions { ids, message, now_ms, tenant: None }, touched);
                match self.batches.get(&id) {
                    Some(b) => CommandResponse::SessionBatch(b.clone()),
                    None => CommandResponse::Missing(format!("batch {id} not found")),
                }
            }
            Command::CreatePool { pool } => {
                let key = pool_key(&pool.tenant, &pool.name);
                if self.pools.contains_key(&key) {
                    return CommandResponse::AlreadyExists(format!("pool {:?} already exists", pool.name));
                }
                if self.tenant(&pool.tenant).is_none() {
                    return CommandResponse::Rejected(format!("tenant {:?} does not exist", pool.tenant));
                }
                if let Err(why) = pool.check_bounds() {
                    return CommandResponse::Rejected(why);
                }
                touched.pools.push(key.clone());
                self.pools.insert(key, pool.clone());
                CommandResponse::Pool(pool)
            }
            Command::UpdatePool { tenant, name, bounds } => {
                let key = pool_key(&tenant, &name);
                let Some(pool) = self.pools.get(&key) else {
                    return CommandResponse::Missing(format!("pool {name:?} not found"));
                };
                let updated = pool.with_bounds(bounds);
                if let Err(why) = updated.check_bounds() {
                    return CommandResponse::Rejected(why);
                }
                touched.pools.push(key.clone());
                self.pools.insert(key, updated.clone());
                CommandResponse::Pool(updated)
            }
            Command::DeletePool { tenant, name, now_ms } => {
                let key = pool_key(&tenant, &name);
                if self.pools.remove(&key).is_none() {
                    return CommandResponse::Missing(format!("pool {name:?} not found"));
                }
                touched.pools.push(key.clone());
                let idle: Vec<String> = self
                    .pool_live
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter(|id| self.sessions.get(*id).is_some_and(SessionRecord::pool_idle))
                    .cloned()
                    .collect();
                let message = format!("pool {name} deleted");
                self.apply_inner(Command::TerminateSessions { ids: idle, message, now_ms, tenant: None }, touched);
                CommandResponse::Ok
            }
            Command::CreateTemplate { template } => {
                if sandfleet_common::template::is_builtin(&template.name) || self.templates.contains_key(&template.name)
                {
                    return CommandResponse::AlreadyExists(format!("template {:?} already exists", template.name));
                }
                if self.templates.len() >= sandfleet_common::limits::MAX_TEMPLATES {
                    return CommandResponse::QuotaExceeded(format!(
                        "the cluster holds its most templates ({})",
                        sandfleet_common::limits::MAX_TEMPLATES
                    ));
                }
                touched.templates.push(template.name.clone());
                self.templates.insert(template.name.clone(), template.clone());
                CommandResponse::Template(template)
            }
            Command::UpdateTemplate { mut template } => {
                let Some(old) = self.templates.get(&template.name) else {
                    return CommandResponse::Missing(format!("template {:?} not found", template.name));
                };
                template.created_at_ms = old.created_at_ms;
                touched.templates.push(template.name.clone());
                self.templates.insert(template.name.clone(), template.clone());
                CommandResponse::Template(template)
            }
            Command::DeleteTemplate { name, force } => {
                if !self.templates.contains_key(&name) {
                    return CommandResponse::Missing(format!("template {name:?} not found"));
                }
                if !force {
                    let (live, pools) = self.template_users(&name);
                    let mut users = Vec::new();
                    if live > 0 {
                        users.push(format!("{live} live session{}", if live == 1 { "" } else { "s" }));
                    }
                    if !pools.is_empty() {
                        let n = pools.len();
                        users.push(format!("{n} pool{} ({})", if n == 1 { "" } else { "s" }, pools.join(", ")));
                    }
                    if !users.is_empty() {
                        return CommandResponse::Rejected(format!(
                            "template {name} is in use by {}; end them first, or delete it with force (they keep \
                             their spec)",
                            users.join(" and ")
                        ));
                    }
                }
                self.templates.remove(&name);
                touched.templates.push(name);
                CommandResponse::Ok
            }
            Command::FillPool { tenant, name, ids, now_ms } => {
                self.fill_pool(&pool_key(&tenant, &name), ids, now_ms, touched)
            }
            Command::ClaimSession { tenant, pool, request_id, now_ms, key_id } => {
                self.claim(&pool_key(&tenant, &pool), &request_id, now_ms, key_id.as_deref(), touched)
            }
            Command::CreateTenant { tenant } => {
                if tenant.name == DEFAULT_TENANT || self.tenants.contains_key(&tenant.name) {
                    return CommandResponse::AlreadyExists(format!("tenant {:?} already exists", tenant.name));
                }
                touched.auth = true;
                self.tenants.insert(tenant.name.clone(), tenant.clone());
                CommandResponse::Tenant(tenant)
            }
            Command::UpdateTenant { name, update } => {
                let Some(mut t) = self.tenant(&name) else {
                    return CommandResponse::Missing(format!("tenant {name:?} not found"));
                };
                let q = &mut t.quota;
                q.max_sessions = update.max_sessions.unwrap_or(q.max_sessions);
                q.max_cpu_millis = update.max_cpu_millis.unwrap_or(q.max_cpu_millis);
                q.max_memory_bytes = update.max_memory_bytes.unwrap_or(q.max_memory_bytes);
                if self.tenants.get(&name) != Some(&t) {
                    touched.auth = true;
                    self.tenants.insert(name, t.clone());
                }
                CommandResponse::Tenant(t)
            }
            Command::DeleteTenant { name, now_ms } => {
                if name == DEFAULT_TENANT {
                    return CommandResponse::Rejected("the default tenant cannot be deleted".into());
                }
                if !self.tenants.contains_key(&name) {
                    return CommandResponse::Missing(format!("tenant {name:?} not found"));
                }
                let live = self.tenant_usage.get(&name).map_or(0, |u| u.slots);
                let keys = self.api_keys.values().filter(|k| k.tenant == name && k.is_active(now_ms)).count();
                if live > 0 || keys > 0 {
                    return CommandResponse::Rejected(format!(
                        "tenant {name:?} still has {live} live sessions and {keys} active API keys; \
                         delete the sessions and revoke the keys first"
                    ));
                }
                touched.auth = true;
                self.tenants.remove(&name);
                CommandResponse::Ok
            }
            Command::CreateApiKey { key } => {
                if self.tenant(&key.tenant).is_none() {
                    return CommandResponse::Missing(format!("tenant {:?} not found", key.tenant));
                }
                if self.api_keys.contains_key(&key.id) {
                    return CommandResponse::AlreadyExists(format!("API key id {} already exists", key.id));
                }
                touched.auth = true;
                self.api_keys.insert(key.id.clone(), key.clone());
                CommandResponse::ApiKey(key)
            }
            Command::RevokeApiKey { id, now_ms } => {
                let Some(k) = self.api_keys.get_mut(&id) else {
                    return CommandResponse::Missing(format!("API key {id} not found"));
                };
                if k.revoked_at_ms == 0 {
                    k.revoked_at_ms = now_ms;
                    touched.auth = true;
                }
                CommandResponse::ApiKey(k.clone())
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
            Command::DrainNode { node_id, drain, by, reason } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::NotFound(node_id),
                Some(n) if n.phase == NodePhase::Down && by == HoldBy::Operator => CommandResponse::Rejected(format!(
                    "node {node_id} is down; its sessions are placed elsewhere already"
                )),
                Some(n) => {
                    let hold = NodeHold { drain: Some(drain), reason, since_ms: drain.started_at_ms };
                    if n.set_hold(by, Some(hold)) {
                        touched.nodes.push(node_id);
                    }
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
            Command::TerminateSessions { ids, message, now_ms, tenant } => {
                let mut out = Vec::with_capacity(ids.len());
                let single = ids.len() == 1;
                for id in ids {
                    let visible = |s: &SessionRecord| tenant.as_ref().is_none_or(|t| *t == s.tenant);
                    let Some(s) = self.sessions.get(&id).filter(|s| visible(s)).cloned() else {
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
            Command::RenewSession { id, expires_at_ms, now_ms, tenant } => {
                let Some(s) = self.sessions.get_mut(&id).filter(|s| tenant.as_ref().is_none_or(|t| *t == s.tenant))
                else {
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
                let mut node = node;
                // Re-registration keeps an operator's cordon or drain and takes the
                // agent's hold it carries (a repeated one keeps its start); a down
                // node comes back.
                let agent_hold = node.agent_hold.take();
                if let Some(old) = self.nodes.get(&id) {
                    node.operator_hold = old.operator_hold.clone();
                    node.agent_hold = old.agent_hold.clone();
                }
                node.phase = NodePhase::Ready;
                node.set_hold(HoldBy::Agent, agent_hold);
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
            Command::CordonNode { node_id, cordoned, by, reason, now_ms } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::NotFound(node_id),
                Some(n) if n.phase == NodePhase::Down && by == HoldBy::Operator => {
                    CommandResponse::Rejected(format!("node {node_id} is down; cordon or uncordon it once it is back"))
                }
                Some(n) => {
                    let hold = cordoned.then_some(NodeHold { drain: None, reason, since_ms: now_ms });
                    if n.set_hold(by, hold) {
                        touched.nodes.push(node_id);
                    }
                    CommandResponse::Ok
                }
            },
            Command::NodeUp { node_id, now_ms: _ } => match self.nodes.get_mut(&node_id) {
                None => CommandResponse::Rejected(format!("node {node_id} is not registered")),
                Some(n) if n.phase != NodePhase::Down => CommandResponse::Ok,
                Some(n) => {
                    // Back with the holds it had: cordoned or draining if one still holds it.
                    n.phase = NodePhase::Ready;
                    n.settle();
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
        // Only when present, so a state without tenants keeps its old digest.
        for t in self.tenants.values() {
            h.update(serde_json::to_vec(t).unwrap_or_default());
        }
        for k in self.api_keys.values() {
            h.update(serde_json::to_vec(k).unwrap_or_default());
        }
        hex::encode(h.finalize())
    }
}

/// Records for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A small spec of `cpu` millicores (limit and request).
    pub(crate) fn spec(cpu: u32) -> SpecRecord {
        SpecRecord {
            cpu_millis: cpu,
            cpu_request_millis: cpu,
            memory_bytes: 1 << 20,
            pids_limit: 64,
            ttl_seconds: 60,
            ..Default::default()
        }
    }

    /// Session `id` (request id `rid`) of `cpu` millicores, placed on `node` at generation 1 or unplaced.
    pub(crate) fn session(id: &str, rid: &str, node: Option<&str>, cpu: u32) -> SessionRecord {
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
            tenant: DEFAULT_TENANT.into(),
            traceparent: String::new(),
            pool: String::new(),
            claimed_at_ms: 0,
        }
    }

    /// A ready node with `cpu` millicores, a GiB and ten slots.
    pub(crate) fn node(id: &str, cpu: u64) -> NodeRecord {
        NodeRecord {
            images: Default::default(),
            id: id.into(),
            address: "a".into(),
            capacity: Resources { cpu_millis: cpu, memory_bytes: 1 << 30, slots: 10 },
            labels: Default::default(),
            runtimes: vec![sandfleet_common::spec::Runtime::Process],
            phase: NodePhase::Ready,
            registered_at_ms: 0,
            drain: None,
            operator_hold: None,
            agent_hold: None,
        }
    }

    /// The record of `key`, created at 1 ms.
    pub(crate) fn key_record(key: &ApiKey, tenant: &str, role: Role, expires_at_ms: i64) -> ApiKeyRecord {
        ApiKeyRecord {
            id: key.id.clone(),
            tenant: tenant.into(),
            role,
            secret_hash: key.secret_hash(),
            created_at_ms: 1,
            expires_at_ms,
            revoked_at_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{key_record, node, session, spec};
    use super::*;
    use sandfleet_common::spec::ReplicaPatch;

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
        let r1 = st.apply(Command::CreateSession { session: session("a", "r", None, 100), key_id: None }, &mut t);
        assert!(matches!(r1, CommandResponse::Session(_)));
        let r2 = st.apply(Command::CreateSession { session: session("b", "r", None, 100), key_id: None }, &mut t);
        match r2 {
            CommandResponse::Existing(s) => assert_eq!(s.id, "a"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(st.sessions.len(), 1);
    }

    /// A group-committed batch applies its commands in order, each as if it
    /// were its own entry: same responses, same state, same digest, and the
    /// capacity re-check and idempotency work between commands of one batch.
    #[test]
    fn a_batch_applies_like_its_commands_one_by_one() {
        let commands = vec![
            Command::RegisterNode { node: node("n1", 1000) },
            Command::CreateSession { session: session("a", "r1", Some("n1"), 800), key_id: None },
            // The same request id again, in the same batch: the first session.
            Command::CreateSession { session: session("b", "r1", Some("n1"), 800), key_id: None },
            // Placed on capacity the first create took: falls back to pending.
            Command::CreateSession { session: session("c", "r2", Some("n1"), 800), key_id: None },
            Command::RenewSession { id: "missing".into(), expires_at_ms: 9, now_ms: 2, tenant: None },
        ];
        let mut one_by_one = ClusterState::default();
        let mut t1 = Touched::default();
        let expected: Vec<CommandResponse> = commands.iter().cloned().map(|c| one_by_one.apply(c, &mut t1)).collect();

        let mut batched = ClusterState::default();
        let mut t2 = Touched::default();
        let r = batched.apply(Command::Batch { commands }, &mut t2);
        let CommandResponse::Batch(responses) = r else { panic!("{r:?}") };
        assert_eq!(responses, expected);
        assert!(matches!(&responses[2], CommandResponse::Existing(s) if s.id == "a"), "{:?}", responses[2]);
        assert!(matches!(&responses[3], CommandResponse::Session(s) if s.node_id.is_none()), "{:?}", responses[3]);
        assert!(matches!(&responses[4], CommandResponse::NotFound(_)), "{:?}", responses[4]);
        assert_eq!(batched, one_by_one);
        assert_eq!(batched.digest(), one_by_one.digest());
        assert_eq!(t2.sessions, t1.sessions);
        assert_eq!(batched.sessions_created, 2);
    }

    #[test]
    fn sessions_created_counts_new_sessions_only_and_old_snapshots_load() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::CreateSession { session: session("a", "r1", None, 100), key_id: None }, &mut t);
        // A replay of the same request id is not a new create; a refused one neither.
        st.apply(Command::CreateSession { session: session("b", "r1", None, 100), key_id: None }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r2", None, 100), key_id: None }, &mut t);
        st.apply(Command::CreateSession { session: session("c", "r3", None, 100), key_id: None }, &mut t);
        assert_eq!(st.sessions_created, 2);
        // Deleting does not lower it.
        st.apply(
            Command::TerminateSessions { ids: vec!["a".into()], message: "x".into(), now_ms: 2, tenant: None },
            &mut t,
        );
        assert_eq!(st.sessions_created, 2);
        // It travels in a snapshot; a snapshot from before the counter reads as 0.
        let mut json = serde_json::to_value(&st).unwrap();
        let back: ClusterState = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.sessions_created, 2);
        json.as_object_mut().unwrap().remove("sessions_created");
        let old: ClusterState = serde_json::from_value(json).unwrap();
        assert_eq!(old.sessions_created, 0);
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
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
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
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 800), key_id: None }, &mut t);
        // A concurrent placement decided on the same free capacity falls back to pending.
        let r = st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 800), key_id: None }, &mut t);
        let CommandResponse::Session(b) = r else { panic!() };
        assert_eq!(b.node_id, None);
        assert_eq!(b.pending_reason, PendingReason::FilledUp { node: "n1".into() });
        assert_eq!(st.allocated_on("n1").cpu_millis, 800);

        st.apply(
            Command::TerminateSessions { ids: vec!["a".into()], message: "deleted".into(), now_ms: 2, tenant: None },
            &mut t,
        );
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
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
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
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
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
        st.apply(Command::CreateSession { session: session("a", "r1", None, 100), key_id: None }, &mut t);
        st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 100), key_id: None }, &mut t);
        assert_eq!(st.unplaced.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(st.expired_at(99), Vec::<String>::new());
        assert_eq!(st.expired_at(100), ["a", "b"]);

        st.apply(place("a", "n1", 0, 2), &mut t);
        assert!(st.unplaced.is_empty());
        st.apply(Command::RenewSession { id: "a".into(), expires_at_ms: 500, now_ms: 3, tenant: None }, &mut t);
        assert_eq!(st.expired_at(100), ["b"]);
        st.apply(
            Command::TerminateSessions { ids: vec!["b".into()], message: "deleted".into(), now_ms: 4, tenant: None },
            &mut t,
        );
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
        st.apply(Command::CreateSession { session: a, key_id: None }, &mut t);
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
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
        st.apply(Command::CreateSession { session: session("b", "r2", Some("n1"), 100), key_id: None }, &mut t);
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

    fn agent_cordon(node: &str, cordoned: bool, reason: &str, now_ms: i64) -> Command {
        Command::CordonNode { node_id: node.into(), cordoned, by: HoldBy::Agent, reason: reason.into(), now_ms }
    }

    fn agent_drain(node: &str, reason: &str, now_ms: i64) -> Command {
        let drain = DrainRecord { started_at_ms: now_ms, deadline_ms: now_ms + 3_600_000, max_parallel: 1 };
        Command::DrainNode { node_id: node.into(), drain, by: HoldBy::Agent, reason: reason.into() }
    }

    fn phase_of(st: &ClusterState, node: &str) -> (NodePhase, bool) {
        (st.nodes[node].phase, st.nodes[node].drain.is_some())
    }

    #[test]
    fn operator_and_agent_holds_are_kept_apart() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        // The agent cordons; an operator's uncordon does not lift the agent's hold.
        assert_eq!(st.apply(agent_cordon("n1", true, "kubernetes: node cordoned", 10), &mut t), CommandResponse::Ok);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false));
        let h = st.nodes["n1"].agent_hold.clone().unwrap();
        assert_eq!((h.reason.as_str(), h.since_ms, h.drain), ("kubernetes: node cordoned", 10, None));
        st.apply(Command::cordon("n1".into(), false), &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false), "the agent's hold stays");
        // An operator's cordon is not undone by the agent lifting its own.
        st.apply(Command::cordon("n1".into(), true), &mut t);
        st.apply(agent_cordon("n1", false, "", 20), &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false), "the operator's cordon stays");
        assert!(st.nodes["n1"].agent_hold.is_none());
        // The agent drains an operator-cordoned node: draining; when the agent lifts its drain,
        // the operator's cordon is what is left.
        assert_eq!(st.apply(agent_drain("n1", "kubernetes: NoExecute taint t", 30), &mut t), CommandResponse::Ok);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Draining, true));
        assert_eq!(st.nodes["n1"].drain.unwrap().started_at_ms, 30);
        st.apply(agent_cordon("n1", false, "", 40), &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false));
        st.apply(Command::cordon("n1".into(), false), &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Ready, false));
        // An operator's drain wins over the agent's for the drain's parameters.
        st.apply(agent_drain("n1", "taint", 50), &mut t);
        let op = DrainRecord { started_at_ms: 60, deadline_ms: 70, max_parallel: 4 };
        st.apply(Command::drain("n1".into(), op), &mut t);
        assert_eq!(st.nodes["n1"].drain, Some(op));
        st.apply(Command::cordon("n1".into(), false), &mut t);
        assert_eq!(st.nodes["n1"].drain.map(|d| d.started_at_ms), Some(50), "the agent's drain goes on");
    }

    #[test]
    fn holds_are_idempotent_and_keep_their_start() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(agent_drain("n1", "taint a", 10), &mut t);
        let before = st.nodes["n1"].clone();
        let mut t2 = Touched::default();
        st.apply(agent_drain("n1", "taint a", 99), &mut t2);
        assert_eq!(st.nodes["n1"], before, "the agent's repeated drain keeps its deadline");
        assert!(t2.nodes.is_empty(), "nothing to write");
        // A new reason is recorded; the drain keeps its start.
        st.apply(agent_drain("n1", "taint b", 120), &mut t);
        let h = st.nodes["n1"].agent_hold.clone().unwrap();
        assert_eq!((h.reason.as_str(), h.since_ms, h.drain.unwrap().started_at_ms), ("taint b", 10, 10));
        // An operator's repeated drain keeps its start and updates the rest.
        let d1 = DrainRecord { started_at_ms: 200, deadline_ms: 300, max_parallel: 1 };
        let d2 = DrainRecord { started_at_ms: 250, deadline_ms: 900, max_parallel: 3 };
        st.apply(Command::drain("n1".into(), d1), &mut t);
        st.apply(Command::drain("n1".into(), d2), &mut t);
        assert_eq!(st.nodes["n1"].drain, Some(DrainRecord { started_at_ms: 200, deadline_ms: 900, max_parallel: 3 }));
    }

    #[test]
    fn holds_survive_the_node_going_down_and_registering_again() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::cordon("n1".into(), true), &mut t);
        st.apply(Command::NodeDown { node_id: "n1".into(), now_ms: 5, keep: vec![] }, &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Down, false));
        // While down: an operator is refused (as before), the agent's hold is recorded.
        assert!(matches!(st.apply(Command::cordon("n1".into(), false), &mut t), CommandResponse::Rejected(_)));
        assert_eq!(st.apply(agent_drain("n1", "taint", 6), &mut t), CommandResponse::Ok);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Down, false));
        st.apply(Command::NodeUp { node_id: "n1".into(), now_ms: 7 }, &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Draining, true), "back with its holds");
        // A registration carries the agent's hold: without one, the agent's hold goes,
        // the operator's stays.
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false));
        assert!(st.nodes["n1"].agent_hold.is_none() && st.nodes["n1"].operator_hold.is_some());
        // With one, the same hold keeps its start.
        let mut n = node("n1", 1000);
        n.agent_hold = Some(NodeHold { drain: None, reason: "kubernetes: node cordoned".into(), since_ms: 8 });
        st.apply(Command::RegisterNode { node: n.clone() }, &mut t);
        n.agent_hold.as_mut().unwrap().since_ms = 9;
        st.apply(Command::RegisterNode { node: n }, &mut t);
        assert_eq!(st.nodes["n1"].agent_hold.as_ref().map(|h| h.since_ms), Some(8));
        st.apply(Command::cordon("n1".into(), false), &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Cordoned, false), "the agent's cordon");
        // A down node that registers again comes back, with its holds.
        st.apply(Command::NodeDown { node_id: "n1".into(), now_ms: 10, keep: vec![] }, &mut t);
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        assert_eq!(phase_of(&st, "n1"), (NodePhase::Ready, false));
    }

    #[test]
    fn a_cordon_stored_before_holds_is_an_operators() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("c", 1000) }, &mut t);
        st.apply(Command::RegisterNode { node: node("d", 1000) }, &mut t);
        st.apply(Command::RegisterNode { node: node("r", 1000) }, &mut t);
        // As an older version stored them: phase and drain, no holds.
        let drain = DrainRecord { started_at_ms: 5, deadline_ms: 100, max_parallel: 2 };
        let mut json = serde_json::to_value(&st).unwrap();
        json["nodes"]["c"]["phase"] = serde_json::json!("Cordoned");
        json["nodes"]["d"]["phase"] = serde_json::json!("Draining");
        json["nodes"]["d"]["drain"] = serde_json::to_value(drain).unwrap();
        assert!(json["nodes"]["c"].get("operator_hold").is_none(), "no hold is stored without one");
        let mut back: ClusterState = serde_json::from_value(json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.nodes["c"].operator_hold.as_ref().map(|h| h.drain), Some(None));
        assert_eq!(back.nodes["d"].operator_hold.as_ref().and_then(|h| h.drain), Some(drain));
        assert!(back.nodes["r"].operator_hold.is_none());
        // Commands logged before holds existed are an operator's.
        let old: Command = serde_json::from_str(r#"{"CordonNode":{"node_id":"c","cordoned":true}}"#).unwrap();
        assert!(
            matches!(old, Command::CordonNode { by: HoldBy::Operator, ref reason, now_ms: 0, .. } if reason.is_empty())
        );
        let old: Command = serde_json::from_str(
            r#"{"DrainNode":{"node_id":"c","drain":{"started_at_ms":1,"deadline_ms":2,"max_parallel":1}}}"#,
        )
        .unwrap();
        assert!(matches!(old, Command::DrainNode { by: HoldBy::Operator, .. }));
        // Uncordoning works on them as before.
        back.apply(Command::cordon("c".into(), false), &mut t);
        back.apply(Command::cordon("d".into(), false), &mut t);
        assert_eq!(
            (phase_of(&back, "c"), phase_of(&back, "d")),
            ((NodePhase::Ready, false), (NodePhase::Ready, false))
        );
        // Holds round-trip with the digest.
        back.apply(agent_drain("c", "taint", 3), &mut t);
        back.apply(Command::cordon("d".into(), true), &mut t);
        let mut again: ClusterState = serde_json::from_slice(&serde_json::to_vec(&back).unwrap()).unwrap();
        again.rebuild_indexes();
        assert_eq!(again.digest(), back.digest());
        assert_eq!(again.nodes, back.nodes);
    }

    #[test]
    fn drain_moves_sessions_and_tracks_them_until_running_elsewhere() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        st.apply(Command::RegisterNode { node: node("n2", 1000) }, &mut t);
        st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
        st.take_assignment_changes();
        let drain = DrainRecord { started_at_ms: 5, deadline_ms: 100, max_parallel: 1 };
        assert_eq!(st.apply(Command::drain("n1".into(), drain), &mut t), CommandResponse::Ok);
        assert!(!st.node_fits("n1", &spec(1)), "a draining node takes no new sessions");
        st.apply(Command::MoveSessions { node_id: "n1".into(), ids: vec!["a".into()], now_ms: 6 }, &mut t);
        let changes = st.take_assignment_changes();
        assert!(
            changes.contains(&("n1".into(), "a".into())),
            "the old node's watch must see the session go: {changes:?}"
        );
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
        st.apply(Command::cordon("n1".into(), false), &mut t);
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
        let r = st.apply(Command::CreateSession { session: session("a", "r1", Some("n1"), 100), key_id: None }, &mut t);
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

    fn tenant(name: &str, max_sessions: u64, max_cpu_millis: u64, max_memory_bytes: u64) -> Command {
        Command::CreateTenant {
            tenant: TenantRecord {
                name: name.into(),
                quota: Quota { max_sessions, max_cpu_millis, max_memory_bytes },
                created_at_ms: 1,
            },
        }
    }

    fn of_tenant(id: &str, rid: &str, tenant: &str, cpu: u32) -> SessionRecord {
        SessionRecord { tenant: tenant.into(), ..session(id, rid, None, cpu) }
    }

    fn create(st: &mut ClusterState, s: SessionRecord, key_id: Option<&str>) -> CommandResponse {
        st.apply(Command::CreateSession { session: s, key_id: key_id.map(Into::into) }, &mut Touched::default())
    }

    fn new_batch(id: &str, rid: &str, tenant: &str, nodes: Vec<Option<&str>>, patches: Vec<ReplicaPatch>) -> Command {
        let n = nodes.len();
        Command::CreateBatch(NewBatch {
            batch: BatchRecord {
                id: id.into(),
                request_id: rid.into(),
                tenant: tenant.into(),
                created_at_ms: 5,
                spec: spec(300),
                patches_sha256: BatchRecord::digest(&patches),
                session_ids: (0..n).map(|i| format!("{id}-{i}")).collect(),
                deleted_at_ms: 0,
                pool: String::new(),
                claimed: 0,
            },
            patches,
            nodes: nodes.into_iter().map(|n| n.map(Into::into)).collect(),
            waiting: PendingReason::AwaitingLeader,
            key_id: None,
            traceparent: String::new(),
        })
    }

    /// A batch applies whole: each replica gets the spec, its own patch and
    /// the batch label; placements past a node's capacity wait (like a
    /// create's); a retry answers the first batch; delete ends them all.
    #[test]
    fn a_batch_is_created_whole_with_its_patches_and_deleted_whole() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 1000) }, &mut t);
        let patch = |v: &str| ReplicaPatch {
            env: [("SHARD".to_string(), v.to_string())].into(),
            labels: [("shard".to_string(), v.to_string())].into(),
        };
        let nodes = vec![Some("n1"), Some("n1"), Some("n1"), Some("n1")];
        let r = st.apply(new_batch("b", "r1", DEFAULT_TENANT, nodes.clone(), vec![patch("0"), patch("1")]), &mut t);
        let CommandResponse::SessionBatch(b) = r else { panic!("{r:?}") };
        assert_eq!(b.session_ids, ["b-0", "b-1", "b-2", "b-3"]);
        assert_eq!(t.batches, ["b"], "the batch is written through");
        assert_eq!(st.sessions.len(), 4);
        assert_eq!(st.sessions_created, 4);
        for (i, id) in b.session_ids.iter().enumerate() {
            let s = &st.sessions[id];
            assert_eq!(s.spec.labels[sandfleet_common::spec::BATCH_LABEL], "b");
            assert_eq!(s.request_id, format!("r1#{i}"));
            let shard = s.spec.env.get("SHARD").map(String::as_str);
            assert_eq!(shard, [Some("0"), Some("1"), None, None][i], "replica {i}'s own env");
        }
        // 1000m holds three 300m replicas; the fourth waits, as a create would.
        let c = st.batch_counts(&b);
        assert_eq!((c.placed, c.pending), (3, 1));
        assert_eq!(st.sessions["b-3"].pending_reason, PendingReason::FilledUp { node: "n1".into() });
        assert!(!st.request_ids.contains_key("r1#0"), "replicas take no single-create request ids");

        // The same request id again (another batch id, other sessions): the first batch.
        let r = st.apply(new_batch("c", "r1", DEFAULT_TENANT, nodes, vec![]), &mut t);
        assert!(matches!(r, CommandResponse::ExistingBatch(ref e) if e.id == "b"), "{r:?}");
        assert_eq!(st.sessions.len(), 4);

        let r = st.apply(Command::DeleteBatch { id: "b".into(), now_ms: 9, tenant: Some("other".into()) }, &mut t);
        assert_eq!(r, CommandResponse::Missing("batch b not found".into()), "another tenant's batch is missing");
        let r = st.apply(Command::DeleteBatch { id: "b".into(), now_ms: 9, tenant: None }, &mut t);
        let CommandResponse::SessionBatch(b) = r else { panic!("{r:?}") };
        assert_eq!(b.deleted_at_ms, 9);
        assert_eq!(st.batch_counts(&b).terminated, 4);
        assert_eq!(st.allocated_on("n1"), Resources::default(), "every replica's hold is released");
        // Deleting again changes nothing and succeeds.
        let again = st.apply(Command::DeleteBatch { id: "b".into(), now_ms: 10, tenant: None }, &mut t);
        assert!(matches!(again, CommandResponse::SessionBatch(ref b) if b.deleted_at_ms == 9), "{again:?}");

        // The batch and its request id survive a snapshot round trip.
        let mut copy: ClusterState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        copy.rebuild_indexes();
        assert_eq!(copy.batch_requests.get("r1").map(String::as_str), Some("b"));
    }

    fn pool_record(max: u32, buffer: (u32, u32)) -> PoolRecord {
        PoolRecord {
            name: "py".into(),
            tenant: DEFAULT_TENANT.into(),
            spec: spec(100),
            min: 0,
            max,
            buffer_min: buffer.0,
            buffer_max: buffer.1,
            created_at_ms: 1,
        }
    }

    /// Places the pool's unplaced sandboxes on `node` and has its agent report them RUNNING.
    fn start_all(st: &mut ClusterState, node: &str, t: &mut Touched) {
        let ids: Vec<String> = st.unplaced.iter().map(|(_, id)| id.clone()).collect();
        let placements =
            ids.iter().map(|id| Placement { id: id.clone(), node_id: node.into(), expected_generation: 0 }).collect();
        st.apply(Command::PlaceSessions { placements, now_ms: 2 }, t);
        let reports = ids
            .iter()
            .map(|id| Report { id: id.clone(), generation: 1, phase: SessionPhase::Running, message: String::new() })
            .collect();
        st.apply(Command::ReportSessions { node_id: node.into(), reports, now_ms: 3 }, t);
    }

    /// The leader fills a pool to its buffer, claims hand out each idle
    /// RUNNING sandbox once (idempotent on the request id), an empty pool
    /// answers PoolEmpty, and the planner refills after claims, never past `max`.
    #[test]
    fn a_pool_is_filled_claimed_once_per_sandbox_and_refilled() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 10_000) }, &mut t);
        st.apply(Command::CreatePool { pool: pool_record(4, (2, 3)) }, &mut t);
        assert_eq!(t.pools, ["default/py"]);
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("p{n}")
        };
        let plan = crate::plan::plan_pools(&st, 10, &mut next);
        assert!(matches!(&plan[..], [Command::FillPool { ids, .. }] if ids.len() == 3), "{plan:?}");
        for c in plan {
            st.apply(c, &mut t);
        }
        assert_eq!(st.pool_counts("default/py"), PoolCounts { starting: 3, ..Default::default() });
        assert!(crate::plan::plan_pools(&st, 11, &mut next).is_empty(), "starting sandboxes count as idle");
        let claim = |rid: &str| Command::ClaimSession {
            tenant: DEFAULT_TENANT.into(),
            pool: "py".into(),
            request_id: rid.into(),
            now_ms: 20,
            key_id: None,
        };
        assert_eq!(st.apply(claim("c0"), &mut t), CommandResponse::PoolEmpty, "none is RUNNING yet");
        start_all(&mut st, "n1", &mut t);
        assert_eq!(st.pool_counts("default/py").idle, 3);
        let CommandResponse::Session(a) = st.apply(claim("c1"), &mut t) else { panic!() };
        assert_eq!((a.claimed_at_ms, a.request_id.as_str(), a.phase), (20, "c1", SessionPhase::Running));
        assert_eq!(a.expires_at_ms, 20 + 60_000, "the TTL counts from the claim");
        assert!(matches!(st.apply(claim("c1"), &mut t), CommandResponse::Existing(ref e) if e.id == a.id));
        let CommandResponse::Session(b) = st.apply(claim("c2"), &mut t) else { panic!() };
        assert_ne!(a.id, b.id, "each idle sandbox goes to one claim");
        assert_eq!(st.pool_counts("default/py"), PoolCounts { idle: 1, claimed: 2, ..Default::default() });
        // Below buffer_min (2): refill to buffer_max (3), but the pool holds at most 4 in all.
        let plan = crate::plan::plan_pools(&st, 30, &mut next);
        assert!(matches!(&plan[..], [Command::FillPool { ids, .. }] if ids.len() == 1), "{plan:?}");
        // FillPool itself never passes max, whatever it is asked.
        let r = st.apply(
            Command::FillPool {
                tenant: DEFAULT_TENANT.into(),
                name: "py".into(),
                ids: vec!["x1".into(), "x2".into()],
                now_ms: 30,
            },
            &mut t,
        );
        assert!(matches!(r, CommandResponse::Sessions(ref v) if v.len() == 1), "{r:?}");
        assert_eq!(st.pool_live["default/py"].len(), 4);
        // Shrinking the buffer ends the extra idle ones, the unstarted first.
        st.apply(
            Command::UpdatePool {
                tenant: DEFAULT_TENANT.into(),
                name: "py".into(),
                bounds: PoolBounds { buffer_min: Some(0), buffer_max: Some(0), ..Default::default() },
            },
            &mut t,
        );
        let plan = crate::plan::plan_pools(&st, 40, &mut next);
        let [Command::TerminateSessions { ids, .. }] = &plan[..] else { panic!("{plan:?}") };
        assert_eq!(ids, &["x1".to_string(), st.pool_ready["default/py"].iter().next().unwrap().clone()]);
        // Deleting the pool ends its idle sandboxes; claimed ones stay.
        st.apply(Command::DeletePool { tenant: DEFAULT_TENANT.into(), name: "py".into(), now_ms: 50 }, &mut t);
        assert!(st.pools.is_empty());
        assert_eq!(st.sessions[&a.id].phase, SessionPhase::Running);
        assert_eq!(st.sessions.values().filter(|s| s.phase == SessionPhase::Terminated).count(), 2);
        let r = st.apply(claim("c3"), &mut t);
        assert_eq!(r, CommandResponse::Missing("pool \"py\" not found".into()));
        // Bounds out of order are refused at apply too.
        let bad = st.apply(Command::CreatePool { pool: pool_record(1, (2, 3)) }, &mut t);
        assert!(
            matches!(bad, CommandResponse::Rejected(ref why) if why.contains("buffer_max (3) is more than max (1)")),
            "{bad:?}"
        );
    }

    /// A batch from a pool claims the pool's idle RUNNING sandboxes for its
    /// first replicas (with the batch label and their patches' labels) and
    /// creates the rest; the quota is checked for the created ones only.
    #[test]
    fn a_batch_from_a_pool_claims_first_and_creates_the_rest() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("n1", 10_000) }, &mut t);
        st.apply(Command::CreatePool { pool: pool_record(10, (2, 2)) }, &mut t);
        let fill = Command::FillPool {
            tenant: DEFAULT_TENANT.into(),
            name: "py".into(),
            ids: vec!["p1".into(), "p2".into()],
            now_ms: 2,
        };
        st.apply(fill, &mut t);
        start_all(&mut st, "n1", &mut t);
        let label =
            |v: &str| ReplicaPatch { env: Default::default(), labels: [("shard".to_string(), v.to_string())].into() };
        let Command::CreateBatch(mut new) =
            new_batch("b", "r1", DEFAULT_TENANT, vec![None, None, None], vec![label("0"), label("1"), label("2")])
        else {
            unreachable!()
        };
        new.batch.pool = "py".into();
        new.nodes = vec![Some("n1".into())];
        let r = st.apply(Command::CreateBatch(new), &mut t);
        let CommandResponse::SessionBatch(b) = r else { panic!("{r:?}") };
        assert_eq!(b.session_ids, ["p1", "p2", "b-0"], "the pool's sandboxes first, then a created one");
        assert_eq!(b.claimed, 2);
        for (i, id) in b.session_ids.iter().enumerate() {
            let s = &st.sessions[id];
            assert_eq!(s.spec.labels["shard"], i.to_string());
            assert_eq!(s.spec.labels[sandfleet_common::spec::BATCH_LABEL], "b");
            assert_eq!(s.request_id, format!("r1#{i}"));
        }
        assert_eq!(st.sessions["p1"].claimed_at_ms, 5);
        assert_eq!(st.sessions["b-0"].node_id.as_deref(), Some("n1"), "the created replica takes the first node given");
        assert_eq!(st.pool_counts("default/py"), PoolCounts { claimed: 2, ..Default::default() });
        assert_eq!(st.sessions_created, 3, "two pool sandboxes and one replica were ever created");
    }

    /// No refill while the tenant's quota is full, nor while the pool's
    /// sandboxes keep failing (once the failures age out, it tries again).
    #[test]
    fn a_pool_is_not_refilled_past_a_full_quota_or_while_its_sandboxes_fail() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 1, 0, 0), &mut t);
        assert!(matches!(create(&mut st, of_tenant("s0", "r0", "a", 100), None), CommandResponse::Session(_)));
        let pool = PoolRecord { tenant: "a".into(), ..pool_record(4, (2, 2)) };
        st.apply(Command::CreatePool { pool }, &mut t);
        let mut next = || "x".to_string();
        assert!(crate::plan::plan_pools(&st, 10, &mut next).is_empty(), "the quota is full");
        st.apply(
            Command::TerminateSessions { ids: vec!["s0".into()], message: String::new(), now_ms: 11, tenant: None },
            &mut t,
        );
        assert_eq!(crate::plan::plan_pools(&st, 12, &mut next).len(), 1, "room again");

        // Three sandboxes fail to start (more than buffer_max = 2) within the window.
        st.apply(
            Command::UpdateTenant {
                name: "a".into(),
                update: QuotaUpdate { max_sessions: Some(0), ..Default::default() },
            },
            &mut t,
        );
        for i in 0..3 {
            let id = format!("f{i}");
            st.apply(
                Command::FillPool { tenant: "a".into(), name: "py".into(), ids: vec![id.clone()], now_ms: 20 },
                &mut t,
            );
            let s = st.sessions.get_mut(&id).unwrap();
            s.phase = SessionPhase::Failed;
            s.updated_at_ms = 20;
        }
        st.rebuild_indexes();
        assert_eq!(st.pool_counts("a/py").failed, 3);
        assert!(crate::plan::plan_pools(&st, 30, &mut next).is_empty(), "failing: wait");
        let later = 20 + crate::plan::POOL_FAILURE_WINDOW_MS;
        assert_eq!(crate::plan::plan_pools(&st, later, &mut next).len(), 1, "the failures aged out");
    }

    /// A batch larger than what its tenant may still hold is refused whole.
    #[test]
    fn a_batch_over_a_quota_is_refused_whole() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 5, 0, 0), &mut t);
        assert!(matches!(create(&mut st, of_tenant("s0", "r0", "a", 100), None), CommandResponse::Session(_)));
        let r = st.apply(new_batch("b", "r1", "a", vec![None; 5], vec![]), &mut t);
        assert_eq!(
            r,
            CommandResponse::QuotaExceeded(
                "a batch of 5 sessions does not fit: tenant \"a\" quota exceeded: sessions 1 of 5 in use".into()
            )
        );
        assert_eq!(st.sessions.len(), 1, "nothing of the batch was created");
        assert!(st.batches.is_empty() && st.batch_requests.is_empty());
        let r = st.apply(new_batch("b", "r1", "a", vec![None; 4], vec![]), &mut t);
        assert!(matches!(r, CommandResponse::SessionBatch(_)), "{r:?}");
        assert_eq!(st.usage_of("a").slots, 5);
        assert_eq!(st.sessions["b-0"].pending_reason, PendingReason::AwaitingLeader);
        assert_eq!(st.unplaced.len(), 5, "the leader places the unplaced replicas");
    }

    #[test]
    fn quotas_are_checked_at_apply_against_live_sessions() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 2, 0, 0), &mut t);
        assert!(t.auth, "tenants are written through");
        // Sequential applies stand for concurrent creates: each sees the ones before.
        let results: Vec<CommandResponse> =
            (0..5).map(|i| create(&mut st, of_tenant(&format!("s{i}"), &format!("r{i}"), "a", 100), None)).collect();
        let ok = results.iter().filter(|r| matches!(r, CommandResponse::Session(_))).count();
        assert_eq!(ok, 2);
        assert_eq!(
            results[2],
            CommandResponse::QuotaExceeded("tenant \"a\" quota exceeded: sessions 2 of 2 in use".into())
        );
        assert_eq!(st.sessions.len(), 2, "a refused create changes nothing");
        assert!(!st.request_ids.contains_key(&request_key("a", "r2")));
        // Other tenants are not limited by a's quota.
        assert!(matches!(
            create(&mut st, of_tenant("d1", "r9", DEFAULT_TENANT, 100), None),
            CommandResponse::Session(_)
        ));
        // Ending a session frees its place; a retry of a committed create still answers Existing.
        st.apply(
            Command::TerminateSessions { ids: vec!["s0".into()], message: "x".into(), now_ms: 3, tenant: None },
            &mut t,
        );
        assert_eq!(st.usage_of("a").slots, 1);
        assert!(matches!(create(&mut st, of_tenant("s5", "r5", "a", 100), None), CommandResponse::Session(_)));
        assert!(matches!(create(&mut st, of_tenant("s6", "r5", "a", 100), None), CommandResponse::Existing(_)));

        // CPU (reserved millicores) and memory quotas.
        st.apply(tenant("b", 0, 1000, 3 << 20), &mut t);
        assert!(matches!(create(&mut st, of_tenant("b1", "r1", "b", 600), None), CommandResponse::Session(_)));
        let r = create(&mut st, of_tenant("b2", "r2", "b", 600), None);
        let CommandResponse::QuotaExceeded(why) = r else { panic!("{r:?}") };
        assert_eq!(why, "tenant \"b\" quota exceeded: cpu 600m of 1000m in use; this session reserves 600m");
        assert!(matches!(create(&mut st, of_tenant("b3", "r3", "b", 400), None), CommandResponse::Session(_)));
        st.apply(
            Command::UpdateTenant {
                name: "b".into(),
                update: QuotaUpdate { max_cpu_millis: Some(0), ..Default::default() },
            },
            &mut t,
        );
        assert!(matches!(create(&mut st, of_tenant("b4", "r4", "b", 400), None), CommandResponse::Session(_)));
        let r = create(&mut st, of_tenant("b5", "r5", "b", 400), None);
        let CommandResponse::QuotaExceeded(why) = r else { panic!("{r:?}") };
        assert!(why.starts_with("tenant \"b\" quota exceeded: memory 3145728 of 3145728 bytes in use"), "{why}");

        // The usage index survives a reload.
        let mut back: ClusterState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.tenant_usage, st.tenant_usage);
        assert_eq!(back.digest(), st.digest());
    }

    #[test]
    fn request_ids_are_scoped_per_tenant_and_unknown_tenants_create_nothing() {
        let mut st = ClusterState::default();
        st.apply(tenant("a", 0, 0, 0), &mut Touched::default());
        let CommandResponse::Session(x) = create(&mut st, of_tenant("x", "same", DEFAULT_TENANT, 100), None) else {
            panic!()
        };
        let CommandResponse::Session(y) = create(&mut st, of_tenant("y", "same", "a", 100), None) else { panic!() };
        assert_ne!(x.id, y.id, "tenant a's request id must not return the default tenant's session");
        assert_eq!(st.request_ids.get("same"), Some(&x.id));
        assert_eq!(st.request_ids.get("a/same"), Some(&y.id));
        let r = create(&mut st, of_tenant("z", "r", "ghost", 100), None);
        assert!(matches!(r, CommandResponse::Rejected(_)), "{r:?}");
    }

    #[test]
    fn keys_authenticate_only_when_known_right_unrevoked_and_unexpired() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 0, 0, 0), &mut t);
        let key = ApiKey::generate();
        let r = st.apply(Command::CreateApiKey { key: key_record(&key, "ghost", Role::User, 0) }, &mut t);
        assert_eq!(r, CommandResponse::Missing("tenant \"ghost\" not found".into()));
        st.apply(Command::CreateApiKey { key: key_record(&key, "a", Role::User, 1000) }, &mut t);
        let again = st.apply(Command::CreateApiKey { key: key_record(&key, "a", Role::User, 0) }, &mut t);
        assert!(matches!(again, CommandResponse::AlreadyExists(_)));

        let caller = st.authenticate_key(&key, 10).unwrap();
        assert_eq!((caller.tenant.as_str(), caller.role, caller.key_id()), ("a", Role::User, Some(key.id.as_str())));
        let mut wrong = key.clone();
        wrong.secret = ApiKey::generate().secret;
        assert_eq!(st.authenticate_key(&wrong, 10), Err(KeyRefused::WrongSecret));
        assert_eq!(st.authenticate_key(&ApiKey::generate(), 10), Err(KeyRefused::Unknown));
        assert_eq!(st.authenticate_key(&key, 1000), Err(KeyRefused::Expired));
        st.apply(Command::RevokeApiKey { id: key.id.clone(), now_ms: 20 }, &mut t);
        assert_eq!(st.authenticate_key(&key, 10), Err(KeyRefused::Revoked));
        // Revoking again keeps the first revocation time.
        let r = st.apply(Command::RevokeApiKey { id: key.id.clone(), now_ms: 30 }, &mut t);
        let CommandResponse::ApiKey(k) = r else { panic!() };
        assert_eq!(k.revoked_at_ms, 20);
        let r = st.apply(Command::RevokeApiKey { id: "0123456789abcdef".into(), now_ms: 30 }, &mut t);
        assert!(matches!(r, CommandResponse::Missing(_)));
    }

    #[test]
    fn a_create_rechecks_its_key_at_apply() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 0, 0, 0), &mut t);
        let key = ApiKey::generate();
        st.apply(Command::CreateApiKey { key: key_record(&key, "a", Role::User, 0) }, &mut t);
        assert!(matches!(create(&mut st, of_tenant("s1", "r1", "a", 100), Some(&key.id)), CommandResponse::Session(_)));
        // A user key cannot create in another tenant, even if a service got that wrong.
        let r = create(&mut st, of_tenant("s2", "r2", DEFAULT_TENANT, 100), Some(&key.id));
        assert_eq!(r, CommandResponse::KeyRefused);
        // Revoked between the service's check and the commit: nothing is created.
        st.apply(Command::RevokeApiKey { id: key.id.clone(), now_ms: 1 }, &mut t);
        let before = st.digest();
        assert_eq!(create(&mut st, of_tenant("s3", "r3", "a", 100), Some(&key.id)), CommandResponse::KeyRefused);
        assert_eq!(st.digest(), before);
        assert_eq!(
            create(&mut st, of_tenant("s4", "r4", "a", 100), Some("0000000000000000")),
            CommandResponse::KeyRefused
        );
    }

    #[test]
    fn tenants_with_sessions_or_active_keys_are_not_deleted() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 0, 0, 0), &mut t);
        assert!(matches!(st.apply(tenant("a", 0, 0, 0), &mut t), CommandResponse::AlreadyExists(_)));
        assert!(matches!(st.apply(tenant(DEFAULT_TENANT, 0, 0, 0), &mut t), CommandResponse::AlreadyExists(_)));
        let del = |st: &mut ClusterState, name: &str| {
            st.apply(Command::DeleteTenant { name: name.into(), now_ms: 50 }, &mut Touched::default())
        };
        assert!(matches!(del(&mut st, DEFAULT_TENANT), CommandResponse::Rejected(_)));
        assert!(matches!(del(&mut st, "nope"), CommandResponse::Missing(_)));

        create(&mut st, of_tenant("s1", "r1", "a", 100), None);
        let key = ApiKey::generate();
        st.apply(Command::CreateApiKey { key: key_record(&key, "a", Role::Admin, 0) }, &mut t);
        let expired = ApiKey::generate();
        st.apply(Command::CreateApiKey { key: key_record(&expired, "a", Role::User, 40) }, &mut t);
        let r = del(&mut st, "a");
        assert_eq!(
            r,
            CommandResponse::Rejected(
                "tenant \"a\" still has 1 live sessions and 1 active API keys; delete the sessions and revoke the keys first"
                    .into()
            )
        );
        st.apply(
            Command::TerminateSessions { ids: vec!["s1".into()], message: "x".into(), now_ms: 2, tenant: None },
            &mut t,
        );
        assert!(matches!(del(&mut st, "a"), CommandResponse::Rejected(_)), "the key is still active");
        st.apply(Command::RevokeApiKey { id: key.id.clone(), now_ms: 3 }, &mut t);
        assert_eq!(del(&mut st, "a"), CommandResponse::Ok);
        assert!(st.tenant("a").is_none());
        assert_eq!(st.all_tenants().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), [DEFAULT_TENANT]);
    }

    #[test]
    fn scoped_deletes_and_renewals_do_not_see_other_tenants() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(tenant("a", 0, 0, 0), &mut t);
        create(&mut st, of_tenant("s1", "r1", "a", 100), None);
        let other = Some("b".to_string());
        let r = st.apply(
            Command::TerminateSessions {
                ids: vec!["s1".into()],
                message: "x".into(),
                now_ms: 2,
                tenant: other.clone(),
            },
            &mut t,
        );
        assert_eq!(r, CommandResponse::NotFound("s1".into()));
        let r = st.apply(Command::RenewSession { id: "s1".into(), expires_at_ms: 9, now_ms: 2, tenant: other }, &mut t);
        assert_eq!(r, CommandResponse::NotFound("s1".into()));
        assert_eq!(st.sessions["s1"].phase, SessionPhase::Pending);
        let own = Some("a".to_string());
        let r = st.apply(
            Command::TerminateSessions { ids: vec!["s1".into()], message: "x".into(), now_ms: 2, tenant: own },
            &mut t,
        );
        assert!(matches!(r, CommandResponse::Sessions(v) if v[0].phase == SessionPhase::Terminated));
    }

    #[test]
    fn the_creates_trace_parent_is_kept_and_written_only_when_set() {
        let mut s = session("a", "r1", None, 100);
        assert!(serde_json::to_value(&s).unwrap().get("traceparent").is_none(), "an empty one is not written");
        s.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
        let back: SessionRecord = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back.traceparent, s.traceparent);
        let mut st = ClusterState::default();
        st.apply(Command::CreateSession { session: s.clone(), key_id: None }, &mut Touched::default());
        assert_eq!(st.sessions["a"].traceparent, s.traceparent, "the record keeps the create's trace parent");
    }

    #[test]
    fn logs_and_snapshots_from_before_tenants_still_load() {
        // A session, a create command and a whole state as they were written before tenants.
        let mut old = serde_json::to_value(session("a", "r1", None, 100)).unwrap();
        old.as_object_mut().unwrap().remove("tenant");
        let s: SessionRecord = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(s.tenant, DEFAULT_TENANT);
        let cmd = serde_json::json!({ "CreateSession": { "session": old } });
        let Command::CreateSession { session, key_id: None } = serde_json::from_value(cmd).unwrap() else { panic!() };
        assert_eq!(session.tenant, DEFAULT_TENANT);
        let cmd = r#"{"TerminateSessions":{"ids":["a"],"message":"m","now_ms":1}}"#;
        assert!(matches!(serde_json::from_str(cmd).unwrap(), Command::TerminateSessions { tenant: None, .. }));
        let cmd = r#"{"RenewSession":{"id":"a","expires_at_ms":5,"now_ms":1}}"#;
        assert!(matches!(serde_json::from_str(cmd).unwrap(), Command::RenewSession { tenant: None, .. }));

        let mut st = ClusterState::default();
        st.apply(Command::CreateSession { session, key_id: None }, &mut Touched::default());
        let digest = st.digest();
        let mut json = serde_json::to_value(&st).unwrap();
        json.as_object_mut().unwrap().remove("tenants");
        json.as_object_mut().unwrap().remove("api_keys");
        for s in json["sessions"].as_object_mut().unwrap().values_mut() {
            s.as_object_mut().unwrap().remove("tenant");
        }
        let mut back: ClusterState = serde_json::from_value(json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.digest(), digest, "a state without tenants keeps its digest");
        assert_eq!(back.usage_of(DEFAULT_TENANT).slots, 1);
        assert!(back.request_ids.contains_key("r1"), "default-tenant request ids keep their old keys");
    }

    fn template(name: &str) -> TemplateRecord {
        let wire = sandfleet_proto::v1::Template { name: name.into(), ..Default::default() };
        TemplateRecord::from_proto(wire, &Default::default(), 1).unwrap()
    }

    #[test]
    fn a_template_in_use_is_deleted_only_with_force() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        let ml = template("ml");
        assert_eq!(
            st.apply(Command::CreateTemplate { template: ml.clone() }, &mut t),
            CommandResponse::Template(ml.clone())
        );
        assert_eq!(t.templates, ["ml"]);
        assert!(matches!(
            st.apply(Command::CreateTemplate { template: ml.clone() }, &mut t),
            CommandResponse::AlreadyExists(_)
        ));
        assert!(matches!(
            st.apply(Command::CreateTemplate { template: template("python") }, &mut t),
            CommandResponse::AlreadyExists(_)
        ));
        // An update keeps the creation time.
        let mut changed = template("ml");
        changed.created_at_ms = 99;
        changed.spec.memory_bytes = 1 << 30;
        match st.apply(Command::UpdateTemplate { template: changed }, &mut t) {
            CommandResponse::Template(u) => assert_eq!((u.created_at_ms, u.spec.memory_bytes), (1, 1 << 30)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            st.apply(Command::UpdateTemplate { template: template("nope") }, &mut t),
            CommandResponse::Missing(_)
        ));
        // A live session of it holds the template; a pool too.
        let mut a = session("a", "r1", None, 100);
        a.spec = ml.apply(Default::default(), &Default::default()).unwrap();
        st.apply(Command::CreateSession { session: a, key_id: None }, &mut t);
        assert_eq!(st.template_users("ml"), (1, vec![]));
        let del = |force| Command::DeleteTemplate { name: "ml".into(), force };
        match st.apply(del(false), &mut t) {
            CommandResponse::Rejected(why) => assert!(why.contains("in use by 1 live session;"), "{why}"),
            other => panic!("{other:?}"),
        }
        st.apply(
            Command::TerminateSessions { ids: vec!["a".into()], message: "x".into(), now_ms: 5, tenant: None },
            &mut t,
        );
        let mut pool = pool_record(4, (0, 0));
        pool.spec = ml.apply(Default::default(), &Default::default()).unwrap();
        st.apply(Command::CreatePool { pool }, &mut t);
        match st.apply(del(false), &mut t) {
            CommandResponse::Rejected(why) => {
                assert!(why.contains("in use by 1 pool (default/py);"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // Forced: gone, and the pool keeps its spec.
        assert_eq!(st.apply(del(true), &mut t), CommandResponse::Ok);
        assert!(st.templates.is_empty());
        assert_eq!(st.pools["default/py"].spec.template_name, "ml");
        assert!(matches!(st.apply(del(true), &mut t), CommandResponse::Missing(_)));
        // Templates survive a snapshot.
        st.apply(Command::CreateTemplate { template: template("again") }, &mut t);
        let back: ClusterState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(back.templates, st.templates);
    }
}
