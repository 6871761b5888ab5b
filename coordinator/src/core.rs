//! The coordinator's shared core: the Raft handle, the applied state, and the
//! two primitives every API call is built on — [`Core::propose`] (a write,
//! forwarded to the leader when this member is not it) and
//! [`Core::read_barrier`] (a linearizable read-index, also through the leader).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use sandfleet_common::tls::TlsDialer;
use sandfleet_common::token::{SessionClaims, TokenSigner};
use sandfleet_proto::v1::{self as pb, raft_service_client::RaftServiceClient, RaftPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::commit::{Committed, Committer};
use crate::error::CoreError;
use crate::raft::store::StateHandle;
use crate::raft::{network, typ, Raft};
use crate::state::{Command, CommandResponse, SessionPhase, SessionRecord};

/// Deadline of a forwarded write or read-index.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write or read-index may wait for a quorum before the caller is
/// told to retry elsewhere. A leader cut off from the other coordinators
/// keeps believing it leads; without this bound its callers would hang.
pub const QUORUM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a data-plane token lives at most.
const TOKEN_TTL_MS: i64 = 3600 * 1000;

/// The answer to a forwarded proposal or read-index.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResult<T> {
    Ok(T),
    /// The callee is not the leader either; try this one.
    NotLeader {
        leader: Option<String>,
    },
    Err(String),
}

/// Tunables of the control loops.
#[derive(Debug, Clone)]
pub struct Tunables {
    /// How often agents are asked to heartbeat.
    pub agent_heartbeat: Duration,
    /// A node with no heartbeat for this long is declared down by the leader.
    pub node_ttl: Duration,
    /// Node silence after which a session without its own `lost_after` is
    /// LOST and placed elsewhere (the cluster default; normally `node_ttl`).
    pub lost_after: Duration,
    /// How the scheduler picks nodes.
    pub placement: crate::scheduler::PlacementOptions,
    /// Most placements per Raft entry.
    pub placement_batch: usize,
    /// Most commands group-committed in one Raft entry (1: no batching, the
    /// entries older members can apply; see `commit.rs`).
    pub group_commit: usize,
    /// Longest a heartbeat from an agent that re-sends uncommitted reports
    /// waits for their commit (see [`crate::reports`]).
    pub report_wait: Duration,
}

/// The default of [`Tunables::report_wait`]: a heartbeat is answered within
/// it (plus the quorum check) however busy the log is.
pub const DEFAULT_REPORT_WAIT: Duration = Duration::from_millis(150);

impl Tunables {
    /// How long an agent may go without a quorum-confirmed heartbeat before it
    /// stops its sessions: the cluster's lost-after time minus two heartbeat
    /// intervals (the longest a heartbeat call may take) minus a safety
    /// margin, so the old copies are gone before the leader places the
    /// sessions elsewhere.
    pub fn fence_after(&self) -> Duration {
        self.fence_for(self.lost_after)
    }

    /// The same for a session with its own `lost_after`.
    pub fn fence_for(&self, lost_after: Duration) -> Duration {
        let margin = Duration::from_millis(500);
        lost_after.saturating_sub(self.agent_heartbeat * 2 + margin).max(self.agent_heartbeat)
    }

    /// The shortest `lost_after` a session may ask for: its agent must be able
    /// to fence itself in time (two heartbeats and a margin) with a heartbeat to spare.
    pub fn min_lost_after(&self) -> Duration {
        self.agent_heartbeat * 3 + Duration::from_millis(500)
    }

    /// A session's effective `lost_after`.
    pub fn lost_after_of(&self, spec: &crate::state::SpecRecord) -> Duration {
        if spec.lost_after_ms == 0 {
            self.lost_after
        } else {
            Duration::from_millis(spec.lost_after_ms)
        }
    }
}

/// When this member last heard from a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    /// On the monotonic clock: what node liveness measures silence on, so a
    /// step of the wall clock can neither mark a node silent nor keep it alive.
    pub at: tokio::time::Instant,
    /// On the wall clock (Unix ms), for operators (`ListNodes`).
    pub at_ms: i64,
}

impl Heard {
    /// Now, on both clocks.
    pub fn now() -> Self {
        Self { at: tokio::time::Instant::now(), at_ms: crate::now_ms() }
    }
}

/// Shared by every service of one coordinator.
pub struct Core {
    pub id: u64,
    pub addr: String,
    pub raft: Raft,
    pub state: StateHandle,
    pub tunables: Tunables,
    /// Last heartbeat per node, in memory only (not replicated).
    pub heartbeats: Mutex<HashMap<String, Heard>>,
    /// What each node's sandboxes used at its last heartbeat through this
    /// member (forwarded or not), in memory only: `Node.usage` in ListNodes.
    pub node_usage: Mutex<HashMap<String, pb::NodeUsage>>,
    /// Last data-plane use per session as agents report it, in memory only
    /// (for idle timeouts; a new leader starts everyone at its first term).
    pub activity: Mutex<HashMap<String, i64>>,
    /// When this member last started leading (Unix ms); idle timeouts never
    /// count from before it.
    pub lead_since_ms: std::sync::atomic::AtomicI64,
    /// Coalesces the quorum checks of concurrent heartbeats: the instant the
    /// last successful check started.
    pub quorum_checked: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Wakes the leader loop (new pending session, new node, deletion).
    pub wake: Notify,
    /// The heartbeats' report proposals in flight (see [`crate::reports`]).
    pub reports: crate::reports::InFlight,
    /// The group-commit queue every write of this member goes through.
    committer: Committer,
    /// Resources of the creates this leader placed that are not applied yet,
    /// per node: the next create's placement counts them as taken.
    reserved: Mutex<HashMap<String, crate::state::Resources>>,
    /// Dials peers over mutual TLS; `None` on an `--insecure` loopback cluster,
    /// where callers need no certificate.
    pub peer_tls: Option<TlsDialer>,
    peers: Mutex<HashMap<String, Channel>>,
    /// The signer of the cluster key, kept with the seed it was made from:
    /// making one derives the public key (a scalar multiplication, as costly
    /// as a signature), which every create's token would otherwise pay.
    signer: Mutex<Option<(Vec<u8>, TokenSigner)>>,
}

impl Core {
    pub fn new(
        id: u64,
        addr: String,
        raft: Raft,
        state: StateHandle,
        tunables: Tunables,
        peer_tls: Option<TlsDialer>,
    ) -> Self {
        let committer = Committer::start(raft.clone(), QUORUM_TIMEOUT, tunables.group_commit);
        Self {
            id,
            addr,
            raft,
            state,
            tunables,
            heartbeats: Mutex::new(HashMap::new()),
            node_usage: Mutex::new(HashMap::new()),
            activity: Mutex::new(HashMap::new()),
            lead_since_ms: std::sync::atomic::AtomicI64::new(0),
            quorum_checked: tokio::sync::Mutex::new(None),
            wake: Notify::new(),
            reports: Default::default(),
            committer,
            reserved: Mutex::new(HashMap::new()),
            peer_tls,
            peers: Mutex::new(HashMap::new()),
            signer: Mutex::new(None),
        }
    }

    /// Whether this cluster runs mutual TLS (every caller must authenticate).
    pub fn secure(&self) -> bool {
        self.peer_tls.is_some()
    }

    /// True when this member currently believes it leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// The current leader's address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }

    /// A cached, lazily connected channel to another coordinator.
    pub fn peer_channel(&self, addr: &str) -> Result<Channel, CoreError> {
        let mut peers = self.peers.lock();
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let ch = network::channel(addr, self.peer_tls.as_ref())
            .map_err(|e| CoreError::Internal(format!("bad leader address {addr}: {e}")))?;
        peers.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn peer(&self, addr: &str) -> Result<RaftServiceClient<Channel>, CoreError> {
        Ok(RaftServiceClient::new(self.peer_channel(addr)?)
            .max_decoding_message_size(sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES))
    }

    /// Commits a command and returns what applying it produced. On a follower
    /// the command is forwarded to the leader, so callers never hunt for it.
    /// Its span, `raft.commit`, is the proposal's in a request's trace (the
    /// forward carries the trace context to the leader).
    #[tracing::instrument(name = "raft.commit", skip_all)]
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, CoreError> {
        let started = std::time::Instant::now();
        let result = self.propose_uncounted(cmd).await;
        crate::metrics::metrics().proposal.record(started.elapsed().as_secs_f64(), &[]);
        result
    }

    async fn propose_uncounted(&self, cmd: Command) -> Result<CommandResponse, CoreError> {
        match self.write_here(cmd.clone()).await? {
            Ok(resp) => Ok(resp),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let Some(node) = f.leader_node else {
                    return Err(CoreError::NoLeader);
                };
                self.forward_propose(&node.addr, &cmd).await
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(CoreError::Membership(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(CoreError::RaftStopped(e.to_string())),
        }
    }

    /// Commits a command only if this member leads; never forwards. The
    /// leader loop uses it: its decisions (a node is down, a session is lost)
    /// rest on the leader's own in-memory view and must not be carried out by
    /// another leader after this one was deposed.
    pub async fn propose_as_leader(&self, cmd: Command) -> Result<CommandResponse, CoreError> {
        let started = std::time::Instant::now();
        let result = self.write_here(cmd).await;
        crate::metrics::metrics().proposal.record(started.elapsed().as_secs_f64(), &[]);
        match result? {
            Ok(resp) => Ok(resp),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(CoreError::NotLeader),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(CoreError::Membership(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(CoreError::RaftStopped(e.to_string())),
        }
    }

    /// Commits through the group-commit queue ([`crate::commit`]), bounded by
    /// [`QUORUM_TIMEOUT`].
    async fn write_here(&self, cmd: Command) -> Result<Committed, CoreError> {
        tokio::time::timeout(QUORUM_TIMEOUT, self.committer.commit(cmd))
            .await
            .map_err(|_| CoreError::WriteTimeout(QUORUM_TIMEOUT))?
    }

    async fn forward_propose(&self, leader: &str, cmd: &Command) -> Result<CommandResponse, CoreError> {
        let mut client = self.peer(leader)?;
        let data = serde_json::to_vec(cmd).map_err(|e| CoreError::Internal(e.to_string()))?;
        let mut req = tonic::Request::new(RaftPayload { data });
        req.set_timeout(FORWARD_TIMEOUT);
        sandfleet_common::trace_context::inject(req.metadata_mut());
        let resp = client
            .propose(req)
            .await
            .map_err(|s| CoreError::Unavailable(format!("forwarding to leader {leader} failed: {}", s.message())))?;
        match serde_json::from_slice::<ForwardResult<CommandResponse>>(&resp.into_inner().data) {
            Ok(ForwardResult::Ok(r)) => Ok(r),
            Ok(ForwardResult::NotLeader { .. }) => {
                Err(CoreError::Unavailable("leadership moved while forwarding; retry".into()))
            }
            Ok(ForwardResult::Err(e)) => Err(CoreError::Unavailable(e)),
            Err(e) => Err(CoreError::Internal(format!("bad forward response: {e}"))),
        }
    }

    /// Serves a forwarded proposal on the leader.
    pub async fn handle_forwarded_propose(&self, cmd: Command) -> ForwardResult<CommandResponse> {
        let written = match self.write_here(cmd).await {
            Ok(w) => w,
            Err(e) => return ForwardResult::Err(e.to_string()),
        };
        match written {
            Ok(r) => ForwardResult::Ok(r),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                ForwardResult::NotLeader { leader: f.leader_node.map(|n| n.addr) }
            }
            Err(e) => ForwardResult::Err(e.to_string()),
        }
    }

    /// Waits until this member has applied everything committed before the
    /// call started, as confirmed by the leader (read-index).
    pub async fn read_barrier(&self, consistency: i32) -> Result<(), CoreError> {
        if consistency == pb::ReadConsistency::Stale as i32 {
            return Ok(());
        }
        let confirmed = tokio::time::timeout(QUORUM_TIMEOUT, self.raft.ensure_linearizable())
            .await
            .map_err(|_| CoreError::ReadTimeout(QUORUM_TIMEOUT))?;
        let index = match confirmed {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(typ::CheckIsLeaderError::ForwardToLeader(f))) => {
                let Some(node) = f.leader_node else {
                    return Err(CoreError::Unavailable(
                        "no coordinator leader is elected right now; retry, or ask for a stale read".into(),
                    ));
                };
                let mut client = self.peer(&node.addr)?;
                let mut req = tonic::Request::new(RaftPayload { data: Vec::new() });
                req.set_timeout(FORWARD_TIMEOUT);
                let resp = client.read_index(req).await.map_err(|s| CoreError::Unavailable(s.message().to_string()))?;
                match serde_json::from_slice::<ForwardResult<u64>>(&resp.into_inner().data) {
                    Ok(ForwardResult::Ok(i)) => i,
                    Ok(_) | Err(_) => {
                        return Err(CoreError::Unavailable("leader could not confirm a read index; retry".into()))
                    }
                }
            }
            Err(e) => return Err(CoreError::Unavailable(format!("cannot confirm leadership: {e}"))),
        };
        self.raft
            .wait(Some(FORWARD_TIMEOUT))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| CoreError::Lagging(e.to_string()))?;
        Ok(())
    }

    /// Serves a forwarded read-index on the leader.
    pub async fn handle_read_index(&self) -> ForwardResult<u64> {
        let Ok(confirmed) = tokio::time::timeout(QUORUM_TIMEOUT, self.raft.ensure_linearizable()).await else {
            return ForwardResult::Err(format!("no quorum confirmed the read within {QUORUM_TIMEOUT:?}"));
        };
        match confirmed {
            Ok(id) => ForwardResult::Ok(id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(typ::CheckIsLeaderError::ForwardToLeader(f))) => {
                ForwardResult::NotLeader { leader: f.leader_node.map(|n| n.addr) }
            }
            Err(e) => ForwardResult::Err(e.to_string()),
        }
    }

    /// Create-time placement: picks a node for `spec` against the applied
    /// state plus the creates still in flight, and reserves its resources
    /// there until the returned guard drops (after the create is applied).
    /// Also returns whether placement is paused.
    pub fn place_and_reserve(
        &self,
        spec: &crate::state::SpecRecord,
    ) -> (Result<(String, Reservation<'_>), crate::scheduler::Unplaceable>, bool) {
        let (mut placed, reservation, paused) = self.place_and_reserve_many(spec, 1);
        let placed =
            placed.pop().unwrap_or(Err(crate::scheduler::Unplaceable::Wait(crate::state::PendingReason::NoNodes)));
        (placed.map(|node| (node, reservation)), paused)
    }

    /// Places `count` sessions of one spec (a batch's replicas) against one
    /// view of the state, as [`Core::place_and_reserve`] places one: each gets
    /// a node or why it waits (once one fails, the rest of the same shape fail
    /// the same way). The nodes stay reserved until the reservation drops.
    pub fn place_and_reserve_many(
        &self,
        spec: &crate::state::SpecRecord,
        count: usize,
    ) -> (Vec<Result<String, crate::scheduler::Unplaceable>>, Reservation<'_>, bool) {
        let mut reserved = self.reserved.lock();
        let (placed, paused) = self.state.read(|st| {
            let mut placer = crate::scheduler::Placer::with_reserved(st, self.tunables.placement, &reserved);
            ((0..count).map(|_| placer.place(spec)).collect::<Vec<_>>(), st.scheduler_paused)
        });
        let need = crate::state::Resources::of(spec);
        let mut held = Vec::new();
        for node in placed.iter().flatten() {
            reserved.entry(node.clone()).or_default().add(&need);
            held.push((node.clone(), need));
        }
        (placed, Reservation { core: self, held }, paused)
    }

    /// The token signer, once the cluster has its key.
    pub fn signer(&self) -> Option<TokenSigner> {
        let mut cached = self.signer.lock();
        self.state.read(|s| {
            if s.signing_seed.is_empty() {
                return None;
            }
            match &*cached {
                Some((seed, signer)) if *seed == s.signing_seed => Some(signer.clone()),
                _ => {
                    let signer = TokenSigner::from_seed(&s.signing_seed).ok()?;
                    *cached = Some((s.signing_seed.clone(), signer.clone()));
                    Some(signer)
                }
            }
        })
    }

    /// Converts a record for the wire, with a fresh token when asked.
    pub fn to_proto(&self, s: &SessionRecord, with_token: bool) -> pb::Session {
        let node_address = s
            .node_id
            .as_ref()
            .and_then(|n| self.state.read(|st| st.nodes.get(n).map(|n| n.address.clone())))
            .unwrap_or_default();
        // An idle pool sandbox gets no token: nobody may use it before its
        // claim, so what a claim hands out was never used.
        let token = if with_token && !s.phase.is_terminal() && !s.pool_idle() {
            self.signer()
                .map(|signer| {
                    signer.sign(&SessionClaims {
                        sid: s.id.clone(),
                        node: s.node_id.clone().unwrap_or_default(),
                        generation: s.generation,
                        exp_ms: s.expires_at_ms.min(crate::now_ms() + TOKEN_TTL_MS),
                        tenant: s.tenant.clone(),
                    })
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        pb::Session {
            id: s.id.clone(),
            spec: Some(s.spec.to_proto()),
            state: phase_to_proto(s.phase) as i32,
            node_id: s.node_id.clone().unwrap_or_default(),
            node_address,
            generation: s.generation,
            request_id: s.request_id.clone(),
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
            pending_reason: s.pending_reason.to_string(),
            message: s.message.clone(),
            token,
            updated_at_ms: s.updated_at_ms,
            restarts: s.restarts,
            not_before_ms: s.not_before_ms,
            tenant: s.tenant.clone(),
            pool: s.pool.clone(),
            claimed_at_ms: s.claimed_at_ms,
        }
    }
}

/// A create's hold on a node's resources while its entry commits (see
/// [`Core::place_and_reserve`]); released when dropped.
pub struct Reservation<'a> {
    core: &'a Core,
    held: Vec<(String, crate::state::Resources)>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.core.reserved.lock();
        for (node, need) in &self.held {
            if let Some(r) = reserved.get_mut(node) {
                r.sub(need);
                if *r == crate::state::Resources::default() {
                    reserved.remove(node);
                }
            }
        }
    }
}

/// Stored phase → wire state.
pub fn phase_to_proto(p: SessionPhase) -> pb::SessionState {
    match p {
        SessionPhase::Pending => pb::SessionState::Pending,
        SessionPhase::Running => pb::SessionState::Running,
        SessionPhase::Lost => pb::SessionState::Lost,
        SessionPhase::Terminated => pb::SessionState::Terminated,
        SessionPhase::Failed => pb::SessionState::Failed,
    }
}
