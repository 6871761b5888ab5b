//! AgentService: node agents register, heartbeat with session reports, and
//! watch their assignment set.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sandfleet_common::ids;
use sandfleet_proto::v1::{self as pb, agent_service_server::AgentService};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::core::{Core, Tunables};
use crate::raft::store::NodeChange;
use crate::service::node::{drain_record, node_to_proto};
use crate::service::{require_agent, response_status};
use crate::state::{
    ClusterState, Command, CommandResponse, HoldBy, NodeHold, NodePhase, NodeRecord, Report, Resources, SessionPhase,
};

/// Deadline of a heartbeat forwarded to the leader.
const HEARTBEAT_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The AgentService implementation.
pub struct AgentApi {
    core: Arc<Core>,
    shutdown: CancellationToken,
}

impl AgentApi {
    pub fn new(core: Arc<Core>, shutdown: CancellationToken) -> Self {
        Self { core, shutdown }
    }

    /// Confirms that this leader still holds a quorum (openraft's leadership
    /// check: a heartbeat round answered by a quorum). Concurrent
    /// heartbeats share one check: a check that started after a heartbeat
    /// arrived, or at most 50 ms before, answers for it.
    async fn confirm_quorum(&self) -> Result<(), Status> {
        let arrived = std::time::Instant::now();
        let mut last = self.core.quorum_checked.lock().await;
        if last.is_some_and(|t| t + std::time::Duration::from_millis(50) >= arrived) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // The first half of a read-index only: leadership confirmed by a
        // heartbeat round to a quorum. Waiting for the state machine to apply
        // up to the read index (`ensure_linearizable`) would hold every
        // heartbeat behind a busy log's applies; a heartbeat reads no state
        // that must be that fresh (assignment sets carry their version).
        tokio::time::timeout(self.core.tunables.agent_heartbeat * 2, self.core.raft.get_read_log_id())
            .await
            .map_err(|_| Status::unavailable("this leader could not confirm a quorum in time"))?
            .map_err(|e| Status::unavailable(format!("this leader cannot confirm a quorum: {e}")))?;
        *last = Some(started);
        Ok(())
    }

    /// Keeps the node's reported usage for ListNodes on this member, which
    /// may be a follower forwarding the heartbeat (registered nodes only, so
    /// the map stays as small as the cluster).
    fn record_usage(&self, req: &pb::HeartbeatRequest) {
        let Some(usage) = req.usage else { return };
        if self.core.state.read(|st| st.nodes.contains_key(&req.node_id)) {
            self.core.node_usage.lock().insert(req.node_id.clone(), usage);
        }
    }

    fn touch(&self, node_id: &str) {
        let now = crate::core::Heard::now();
        let at = now.at;
        let before = self.core.heartbeats.lock().insert(node_id.to_string(), now);
        let m = crate::metrics::metrics();
        m.heartbeats.add(1, &[]);
        if let Some(before) = before {
            let late = at.saturating_duration_since(before.at).saturating_sub(self.core.tunables.agent_heartbeat);
            m.heartbeat_lateness.record(late.as_secs_f64(), &[]);
        }
    }
}

/// The agent's hold on its node as stored, from its request, starting at
/// `now_ms` (None: no hold). A drain has the default parameters of
/// NodeService's (one hour, one session at a time).
fn agent_hold(h: Option<&pb::AgentHold>, now_ms: i64) -> Result<Option<NodeHold>, Status> {
    let Some(h) = h.filter(|h| h.cordoned || h.drain) else { return Ok(None) };
    ids::validate_hold_reason(&h.reason)?;
    let drain = if h.drain { Some(drain_record(now_ms, 0, 0)?) } else { None };
    Ok(Some(NodeHold { drain, reason: h.reason.clone(), since_ms: now_ms }))
}

/// Whether two holds ask the same (the same kind and reason), whatever their start.
fn same_hold(a: Option<&NodeHold>, b: Option<&NodeHold>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.drain.is_some() == b.drain.is_some() && a.reason == b.reason,
        _ => false,
    }
}

/// The command that sets the agent's hold on `node_id` (a cordon, a drain, or none).
fn agent_hold_command(node_id: String, hold: Option<NodeHold>, now_ms: i64) -> Command {
    match hold {
        Some(NodeHold { drain: Some(drain), reason, .. }) => {
            Command::DrainNode { node_id, drain, by: HoldBy::Agent, reason }
        }
        Some(NodeHold { drain: None, reason, .. }) => {
            Command::CordonNode { node_id, cordoned: true, by: HoldBy::Agent, reason, now_ms }
        }
        None => Command::CordonNode { node_id, cordoned: false, by: HoldBy::Agent, reason: String::new(), now_ms },
    }
}

/// The full assignment set of a node, by session id.
pub fn assignments(st: &ClusterState, tunables: &Tunables, node_id: &str) -> Vec<pb::Assignment> {
    let Some(ids) = st.node_sessions.get(node_id) else { return Vec::new() };
    ids.iter().filter_map(|id| assignment(st, tunables, node_id, id)).collect()
}

/// Session `id` as `node_id` must run it, if it is in that node's set.
fn assignment(st: &ClusterState, tunables: &Tunables, node_id: &str, id: &str) -> Option<pb::Assignment> {
    let s = st.sessions.get(id)?;
    if !s.phase.holds_resources() || s.node_id.as_deref() != Some(node_id) {
        return None;
    }
    Some(pb::Assignment {
        session_id: s.id.clone(),
        generation: s.generation,
        // The sandbox as the agent builds it: the built-in template it starts from, and its image.
        spec: Some(s.spec.sandbox_proto()),
        expires_at_ms: s.expires_at_ms,
        fence_after_ms: if s.spec.lost_after_ms == 0 {
            0
        } else {
            tunables.fence_for(std::time::Duration::from_millis(s.spec.lost_after_ms)).as_millis() as u64
        },
        handoff: s.moved_from.is_some(),
        tenant: s.tenant.clone(),
        traceparent: s.traceparent.clone(),
    })
}

/// What one WatchAssignments stream has pushed, and so what its next push is.
struct Pushes {
    node_id: String,
    /// Push deltas after the first (full) push.
    deltas: bool,
    /// The set as the watcher has it; None before the first push.
    sent: Option<BTreeMap<String, pb::Assignment>>,
}

impl Pushes {
    /// The push that brings the watcher from what it was sent to the node's
    /// set in `st`, looking at the sessions `changed` names (None: at the
    /// whole set). None when nothing the watcher has changed; the first push
    /// always goes, even empty.
    fn next(
        &mut self,
        st: &ClusterState,
        tunables: &Tunables,
        changed: Option<&BTreeSet<String>>,
    ) -> Option<pb::HeartbeatResponse> {
        let first = self.sent.is_none();
        let sent = self.sent.get_or_insert_with(BTreeMap::new);
        // Each session looked at, with its assignment now (None: not in the set).
        let now: Vec<(String, Option<pb::Assignment>)> = match changed {
            Some(ids) => ids.iter().map(|id| (id.clone(), assignment(st, tunables, &self.node_id, id))).collect(),
            None => {
                let whole = assignments(st, tunables, &self.node_id);
                let gone: Vec<(String, Option<pb::Assignment>)> = sent
                    .keys()
                    // `assignments` is sorted by id.
                    .filter(|id| whole.binary_search_by(|a| a.session_id.as_str().cmp(id.as_str())).is_err())
                    .map(|id| (id.clone(), None))
                    .collect();
                gone.into_iter().chain(whole.into_iter().map(|a| (a.session_id.clone(), Some(a)))).collect()
            }
        };
        let (mut upserts, mut removed) = (Vec::new(), Vec::new());
        for (id, now) in now {
            match now {
                Some(a) if sent.get(&id) != Some(&a) => {
                    sent.insert(id, a.clone());
                    upserts.push(a);
                }
                Some(_) => {}
                None => {
                    if sent.remove(&id).is_some() {
                        removed.push(id);
                    }
                }
            }
        }
        if !first && upserts.is_empty() && removed.is_empty() {
            return None;
        }
        removed.sort_unstable();
        let version = st.applied_index;
        Some(if first || !self.deltas {
            pb::HeartbeatResponse {
                assignments: sent.values().cloned().collect(),
                assignments_version: version,
                ..Default::default()
            }
        } else {
            pb::HeartbeatResponse {
                assignments: upserts,
                assignments_version: version,
                reports_committed: false,
                delta: true,
                removed_session_ids: removed,
            }
        })
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id))]
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        require_agent(&self.core, &req, &req.get_ref().node_id)?;
        let req = req.into_inner();
        ids::validate_node_id(&req.node_id)?;
        ids::validate_labels("labels", &req.labels)?;
        if req.address.parse::<std::net::SocketAddr>().is_err() && !req.address.contains(':') {
            return Err(Status::invalid_argument(format!("invalid address {:?}: expected host:port", req.address)));
        }
        let cap = req.capacity.unwrap_or_default();
        if cap.cpu_millis == 0 || cap.memory_bytes == 0 || cap.session_slots == 0 {
            return Err(Status::invalid_argument(
                "invalid capacity: cpu, memory and session slots must all be positive",
            ));
        }
        let runtimes =
            req.runtimes.iter().map(|r| r.parse::<sandfleet_common::spec::Runtime>()).collect::<Result<Vec<_>, _>>()?;
        let Some(signer) = self.core.signer() else {
            return Err(Status::unavailable("the cluster is still initializing; retry shortly"));
        };
        let hold = agent_hold(req.hold.as_ref(), crate::now_ms())?;
        if req.images.len() > sandfleet_common::limits::MAX_NODE_IMAGES {
            return Err(sandfleet_common::ValidationError::over(
                "images",
                sandfleet_common::limits::MAX_NODE_IMAGES,
                req.images.len(),
            )
            .into());
        }
        let images = req
            .images
            .iter()
            .map(|i| sandfleet_common::spec::normalize_image("images", i))
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        let node = NodeRecord {
            id: req.node_id.clone(),
            address: req.address,
            capacity: Resources {
                cpu_millis: cap.cpu_millis as u64,
                memory_bytes: cap.memory_bytes,
                slots: cap.session_slots as u64,
            },
            labels: req.labels.into_iter().collect(),
            runtimes,
            images,
            phase: NodePhase::Ready,
            registered_at_ms: 0,
            drain: None,
            operator_hold: None,
            agent_hold: hold,
        };
        let unchanged = self.core.state.read(|st| {
            st.nodes.get(&node.id).is_some_and(|n| {
                n.address == node.address
                    && n.capacity == node.capacity
                    && n.labels == node.labels
                    && n.runtimes == node.runtimes
                    && n.images == node.images
                    && same_hold(n.agent_hold.as_ref(), node.agent_hold.as_ref())
            })
        });
        if !unchanged {
            let mut node = node;
            node.registered_at_ms = crate::now_ms();
            self.core.propose(Command::RegisterNode { node }).await?;
            self.core.wake.notify_one();
        }
        self.touch(&req.node_id);
        tracing::info!(node = %req.node_id, "node registered");
        Ok(Response::new(pb::RegisterNodeResponse {
            token_public_key: signer.public_key().to_vec(),
            heartbeat_interval_ms: self.core.tunables.agent_heartbeat.as_millis() as u64,
            node_ttl_ms: self.core.tunables.node_ttl.as_millis() as u64,
            fence_after_ms: self.core.tunables.fence_after().as_millis() as u64,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(node = %req.get_ref().node_id))]
    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        require_agent(&self.core, &req, &req.get_ref().node_id)?;
        let req = req.into_inner();
        ids::validate_node_id(&req.node_id)?;
        self.record_usage(&req);
        // Liveness lives in the leader's memory, so heartbeats go there.
        if !self.core.is_leader() {
            let leader = self
                .core
                .leader_addr()
                .ok_or_else(|| Status::unavailable("no coordinator leader is elected right now; retry"))?;
            let mut client = pb::agent_service_client::AgentServiceClient::new(self.core.peer_channel(&leader)?);
            let mut forwarded = Request::new(req);
            forwarded.set_timeout(HEARTBEAT_FORWARD_TIMEOUT);
            return client.heartbeat(forwarded).await.map_err(|s| {
                if s.code() == tonic::Code::NotFound {
                    s
                } else {
                    Status::unavailable(format!("forwarding the heartbeat to leader {leader} failed: {}", s.message()))
                }
            });
        }
        if !self.core.state.read(|st| st.nodes.contains_key(&req.node_id)) {
            return Err(Status::not_found(format!("node {} is not registered; register first", req.node_id)));
        }
        // Answer only while a quorum follows this leader: an agent that gets no
        // answer for `fence_after` stops its sessions, which is what makes
        // placing them elsewhere safe. A leader cut off in a minority must not
        // keep such an agent alive.
        self.confirm_quorum().await?;
        self.touch(&req.node_id);
        if !req.activity.is_empty() {
            let mut act = self.core.activity.lock();
            let now = crate::now_ms();
            for a in &req.activity {
                // An agent's clock may run ahead; never record activity in the future.
                let at = a.last_active_ms.min(now);
                let e = act.entry(a.session_id.clone()).or_insert(at);
                *e = (*e).max(at);
            }
        }
        if self.core.state.read(|st| st.nodes.get(&req.node_id).is_some_and(|n| n.phase == NodePhase::Down)) {
            tracing::info!(node = %req.node_id, "node heartbeats again; marking it ready");
            self.core.propose(Command::NodeUp { node_id: req.node_id.clone(), now_ms: crate::now_ms() }).await?;
            self.core.wake.notify_one();
        }
        let mut reports = Vec::with_capacity(req.reports.len());
        for r in req.reports {
            let phase = match pb::SessionState::try_from(r.state) {
                Ok(pb::SessionState::Running) => SessionPhase::Running,
                Ok(pb::SessionState::Failed) => SessionPhase::Failed,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "invalid report state {} for session {}",
                        r.state, r.session_id
                    )))
                }
            };
            reports.push(Report { id: r.session_id, generation: r.generation, phase, message: r.message });
        }
        let mut reports_committed = true;
        if !reports.is_empty() {
            // The ones that can still change the state, in one entry (unless a
            // proposal of this leader already carries them). Stale reports are
            // fenced off by the state machine one by one; that is not an error
            // for the agent. First starts (generation 1) this entry turns
            // RUNNING, for the create -> RUNNING histogram.
            let (fresh, starting) = self.core.state.read(|st| {
                let fresh = crate::plan::plan_reports(st, &req.node_id, &reports);
                let starting: Vec<(i64, &'static str)> = fresh
                    .iter()
                    .filter(|r| r.phase == SessionPhase::Running && r.generation == 1)
                    .filter_map(|r| st.sessions.get(&r.id))
                    .filter(|s| {
                        s.phase == SessionPhase::Pending
                            && s.generation == 1
                            && s.node_id.as_deref() == Some(&req.node_id)
                    })
                    .map(|s| (s.created_at_ms, crate::metrics::runtime_label(s.spec.runtime)))
                    .collect();
                (fresh, starting)
            });
            let outcomes = self.core.reports.submit(&self.core, &req.node_id, fresh, starting);
            if req.resend_uncommitted {
                // The agent keeps what is not committed yet and sends it again:
                // answer within the bound, however busy the log is.
                reports_committed = crate::reports::committed(outcomes, Some(self.core.tunables.report_wait)).await;
                if !reports_committed {
                    crate::metrics::metrics().reports_uncommitted.add(1, &[]);
                }
            } else if !crate::reports::committed(outcomes, None).await {
                // An agent that does not re-send keeps its reports only on an error.
                return Err(Status::unavailable("the session reports could not be committed; retry"));
            }
        }
        let (assignments, version) =
            self.core.state.read(|st| (assignments(st, &self.core.tunables, &req.node_id), st.applied_index));
        Ok(Response::new(pb::HeartbeatResponse {
            assignments,
            assignments_version: version,
            reports_committed,
            ..Default::default()
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(node = %req.get_ref().node_id))]
    async fn session_ended(
        &self,
        req: Request<pb::SessionEndedRequest>,
    ) -> Result<Response<pb::SessionEndedResponse>, Status> {
        require_agent(&self.core, &req, &req.get_ref().node_id)?;
        let req = req.into_inner();
        ids::validate_node_id(&req.node_id)?;
        ids::validate_session_id(&req.session_id)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let ended = self.core.state.read(|st| st.sessions.get(&req.session_id).is_none_or(|s| s.phase.is_terminal()));
        Ok(Response::new(pb::SessionEndedResponse { ended }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id))]
    async fn set_node_schedulable(
        &self,
        req: Request<pb::SetNodeSchedulableRequest>,
    ) -> Result<Response<pb::SetNodeSchedulableResponse>, Status> {
        require_agent(&self.core, &req, &req.get_ref().node_id)?;
        let req = req.into_inner();
        ids::validate_node_id(&req.node_id)?;
        let now = crate::now_ms();
        let hold = agent_hold(req.hold.as_ref(), now)?;
        let what = match &hold {
            None => "none".to_string(),
            Some(h) => format!("{} ({})", if h.drain.is_some() { "drain" } else { "cordon" }, h.reason),
        };
        let result = match self.core.propose(agent_hold_command(req.node_id.clone(), hold, now)).await? {
            CommandResponse::Ok => Ok(()),
            CommandResponse::NotFound(id) => {
                Err(Status::not_found(format!("node {id} is not registered; register first")))
            }
            other => Err(response_status(other)),
        };
        crate::service::auth::audit_agent(
            &req.node_id,
            "SetNodeSchedulable",
            &format!("node/{}: {what}", req.node_id),
            &result,
        );
        result?;
        self.core.wake.notify_one();
        tracing::info!(node = %req.node_id, hold = %what, "the node's agent set its hold");
        let seen = self.core.heartbeats.lock().clone();
        let node = self.core.state.read(|st| st.nodes.get(&req.node_id).map(|n| node_to_proto(st, n, &seen)));
        Ok(Response::new(pb::SetNodeSchedulableResponse { node }))
    }

    type WatchAssignmentsStream = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id))]
    async fn watch_assignments(
        &self,
        req: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        require_agent(&self.core, &req, &req.get_ref().node_id)?;
        let pb::WatchAssignmentsRequest { node_id, deltas } = req.into_inner();
        ids::validate_node_id(&node_id)?;
        let core = self.core.clone();
        let shutdown = self.shutdown.clone();
        // Before the first read: every change after it is queued here.
        let mut changes = core.state.watch_node(&node_id);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut pushes = Pushes { node_id, deltas, sent: None };
            // What woke this round (None: the first push, of the whole set).
            let mut woke: Option<NodeChange> = None;
            let mut first = true;
            loop {
                let push = core.state.read(|st| {
                    // Under the read lock no apply runs, and what is queued is
                    // exactly what this state includes (see `watch_node`).
                    let mut whole = first;
                    let mut ids = BTreeSet::new();
                    let mut take = |change: NodeChange| match change {
                        NodeChange::Sessions { ids: some, .. } => ids.extend(some),
                        NodeChange::Resync => whole = true,
                    };
                    if let Some(change) = woke.take() {
                        take(change);
                    }
                    loop {
                        match changes.try_recv() {
                            Ok(change) => take(change),
                            Err(TryRecvError::Lagged(_)) => take(NodeChange::Resync),
                            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                        }
                    }
                    if whole {
                        pushes.next(st, &core.tunables, None)
                    } else if ids.is_empty() {
                        None
                    } else {
                        pushes.next(st, &core.tunables, Some(&ids))
                    }
                });
                first = false;
                if let Some(msg) = push {
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    change = changes.recv() => match change {
                        Ok(change) => woke = Some(change),
                        // Fell behind: the next round recomputes the whole set.
                        Err(RecvError::Lagged(_)) => woke = Some(NodeChange::Resync),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{PlacementOptions, Strategy};
    use crate::state::fixtures::{node, session};
    use crate::state::Touched;
    use std::time::Duration;

    fn tunables() -> Tunables {
        Tunables {
            agent_heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            lost_after: Duration::from_secs(5),
            placement: PlacementOptions { strategy: Strategy::Spread, candidates: 0 },
            placement_batch: 1024,
            group_commit: crate::commit::MAX_COMMANDS,
            report_wait: crate::core::DEFAULT_REPORT_WAIT,
        }
    }

    /// Applies `cmd` as the store does, and returns the sessions it names for `node_id`'s watchers.
    fn apply(st: &mut ClusterState, cmd: Command, node_id: &str) -> BTreeSet<String> {
        st.apply(cmd, &mut Touched::default());
        st.applied_index += 1;
        st.take_assignment_changes().into_iter().filter(|(n, _)| n == node_id).map(|(_, id)| id).collect()
    }

    /// What a delta-following watcher holds after `push`.
    fn follow(held: &mut BTreeMap<String, pb::Assignment>, push: pb::HeartbeatResponse) {
        if !push.delta {
            held.clear();
        }
        for id in &push.removed_session_ids {
            assert!(held.remove(id).is_some(), "{id} removed but never pushed");
        }
        held.extend(push.assignments.into_iter().map(|a| (a.session_id.clone(), a)));
    }

    fn ids(assignments: &[pb::Assignment]) -> Vec<&str> {
        assignments.iter().map(|a| a.session_id.as_str()).collect()
    }

    /// A watcher that follows the deltas holds exactly the node's full set
    /// after every change; unchanged sessions and other nodes' changes push nothing.
    #[test]
    fn deltas_rebuild_the_full_set_and_name_only_what_changed() {
        let t = tunables();
        let mut st = ClusterState::default();
        for n in ["n1", "n2"] {
            apply(&mut st, Command::RegisterNode { node: node(n, 1000) }, "n1");
        }
        for id in ["a", "b"] {
            let create =
                Command::CreateSession { session: session(id, &format!("r-{id}"), Some("n1"), 100), key_id: None };
            apply(&mut st, create, "n1");
        }
        let mut deltas = Pushes { node_id: "n1".into(), deltas: true, sent: None };
        let mut full = Pushes { node_id: "n1".into(), deltas: false, sent: None };
        let mut held = BTreeMap::new();

        let first = deltas.next(&st, &t, None).expect("the first push always goes");
        assert!(!first.delta, "the first push is the full set");
        assert_eq!(ids(&first.assignments), ["a", "b"]);
        assert_eq!(first.assignments_version, st.applied_index);
        follow(&mut held, first);
        assert_eq!(full.next(&st, &t, None).map(|p| p.assignments.len()), Some(2));
        assert_eq!(deltas.next(&st, &t, None), None, "nothing changed: no push");

        // Another node's session is not in this node's changes, and pushes nothing.
        let other = Command::CreateSession { session: session("c", "r-c", Some("n2"), 100), key_id: None };
        assert!(apply(&mut st, other, "n1").is_empty());

        // A renewal changes one assignment: the delta carries that one alone.
        let renew = Command::RenewSession { id: "a".into(), expires_at_ms: 5_000, now_ms: 2, tenant: None };
        let changed = apply(&mut st, renew, "n1");
        assert_eq!(changed, BTreeSet::from(["a".to_string()]));
        let push = deltas.next(&st, &t, Some(&changed)).expect("a changed");
        assert!(push.delta);
        assert_eq!(ids(&push.assignments), ["a"]);
        assert_eq!(push.assignments[0].expires_at_ms, 5_000);
        assert!(push.removed_session_ids.is_empty());
        follow(&mut held, push);
        assert_eq!(held.values().cloned().collect::<Vec<_>>(), assignments(&st, &t, "n1"));
        assert_eq!(
            full.next(&st, &t, Some(&changed)).map(|p| ids(&p.assignments).len()),
            Some(2),
            "full pushes stay full"
        );

        // A change that leaves the assignment as it was (a report) pushes nothing.
        let report = crate::state::Report {
            id: "a".into(),
            generation: 1,
            phase: crate::state::SessionPhase::Running,
            message: String::new(),
        };
        let changed =
            apply(&mut st, Command::ReportSessions { node_id: "n1".into(), reports: vec![report], now_ms: 3 }, "n1");
        assert_eq!(changed, BTreeSet::from(["a".to_string()]));
        assert_eq!(deltas.next(&st, &t, Some(&changed)), None);

        // A terminated session leaves the set.
        let end = Command::TerminateSessions { ids: vec!["b".into()], message: "done".into(), now_ms: 4, tenant: None };
        let changed = apply(&mut st, end, "n1");
        let push = deltas.next(&st, &t, Some(&changed)).expect("b left");
        assert!(push.delta && push.assignments.is_empty());
        assert_eq!(push.removed_session_ids, ["b"]);
        assert_eq!(push.assignments_version, st.applied_index);
        follow(&mut held, push);
        assert_eq!(held.values().cloned().collect::<Vec<_>>(), assignments(&st, &t, "n1"));
        assert_eq!(ids(&full.next(&st, &t, Some(&changed)).expect("b left").assignments), ["a"]);

        // A resync (the whole set) after changes the watcher missed: still a delta, and exact.
        let late = Command::CreateSession { session: session("d", "r-d", Some("n1"), 100), key_id: None };
        apply(&mut st, late, "n1");
        let end = Command::TerminateSessions { ids: vec!["a".into()], message: "done".into(), now_ms: 5, tenant: None };
        apply(&mut st, end, "n1");
        let push = deltas.next(&st, &t, None).expect("a left, d came");
        assert!(push.delta);
        assert_eq!(ids(&push.assignments), ["d"]);
        assert_eq!(push.removed_session_ids, ["a"]);
        follow(&mut held, push);
        assert_eq!(held.values().cloned().collect::<Vec<_>>(), assignments(&st, &t, "n1"));
    }
}
