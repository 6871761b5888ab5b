//! The agent's control loop: register with the coordinators, watch the
//! assignment set, heartbeat with session reports, and reconcile what should
//! run against what does run.
//!
//! Reconciliation is level-based: every assignment message carries the full
//! set, so a missed message is repaired by the next one. A session runs only
//! at the newest generation assigned to this node; anything else the runtime
//! holds is destroyed. What to start, keep and stop, and what a cut-off agent
//! stops by itself, are decided by the pure planners of [`plan`]; this module
//! carries their decisions out.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::tls::TlsDialer;
use sandfleet_common::token::TokenVerifier;
use sandfleet_proto::v1 as pb;
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::Instrument as _;

use crate::coordinator_link::{backoff, CoordinatorClient, CALL_TIMEOUT};
use crate::runtime::{Runtime, SandboxSpec};
use crate::store::sync::Syncer;
use crate::store::StoreError;

pub mod plan;

/// Where a local session is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalPhase {
    /// The runtime is preparing it.
    Preparing,
    /// Ready for exec and file calls.
    Ready,
    /// Could not be prepared.
    Failed(String),
}

/// A session this agent holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSession {
    pub generation: u64,
    pub phase: LocalPhase,
    pub expires_at_ms: i64,
    /// Stop it after this long without a quorum-confirmed heartbeat; 0 = the node's.
    pub fence_after_ms: u64,
    /// End it after this long without exec or file calls; 0 = never.
    pub idle_timeout_ms: u64,
    /// Last exec or file call, or when it was assigned or renewed (Unix ms).
    pub last_active_ms: i64,
    /// The session's tenant, from its assignment; empty while unknown (a
    /// session rediscovered after a restart, until its assignment arrives).
    pub tenant: String,
}

impl LocalSession {
    fn new(a: &pb::Assignment, now_ms: i64) -> Self {
        LocalSession {
            generation: a.generation,
            phase: LocalPhase::Preparing,
            expires_at_ms: a.expires_at_ms,
            fence_after_ms: a.fence_after_ms,
            idle_timeout_ms: a.spec.as_ref().map_or(0, |s| s.idle_timeout_seconds.saturating_mul(1000)),
            last_active_ms: now_ms,
            // An assignment from a coordinator older than tenants is the default tenant's.
            tenant: if a.tenant.is_empty() {
                sandfleet_common::auth::DEFAULT_TENANT.to_string()
            } else {
                a.tenant.clone()
            },
        }
    }
}

/// State shared by the control loop and the data plane.
pub struct AgentState {
    pub node_id: String,
    pub runtime: Arc<dyn Runtime>,
    pub sessions: Mutex<HashMap<String, LocalSession>>,
    pub verifier: RwLock<Option<TokenVerifier>>,
    reports: Mutex<Vec<pb::SessionReport>>,
    report_ready: Notify,
    reconcile_lock: tokio::sync::Mutex<()>,
    /// When a leader with a quorum last answered a heartbeat.
    last_contact: Mutex<std::time::Instant>,
    /// Stop every session after this long without contact (0: never), as the cluster says.
    fence_after_ms: std::sync::atomic::AtomicU64,
    /// True while cut off: sessions were stopped and assignment pushes from a
    /// possibly stale coordinator are ignored until a heartbeat succeeds again.
    fenced: std::sync::atomic::AtomicBool,
    /// The heartbeat interval the cluster asked for (ms).
    heartbeat_ms: std::sync::atomic::AtomicU64,
    /// Sessions used since the last heartbeat, with the time of last use.
    activity: Mutex<HashMap<String, i64>>,
    /// Raft index of the newest assignment set followed.
    assignments_version: std::sync::atomic::AtomicU64,
    /// Keeps workspaces in the durable store (None: workspaces live and die with the node).
    pub syncer: Option<Arc<Syncer>>,
    /// Coordinator addresses, to ask whether a session that left this node ended for good.
    pub coordinators: Vec<String>,
    /// Mutual TLS toward `coordinators`; `None` on an `--insecure` loopback cluster.
    pub coordinator_tls: Option<TlsDialer>,
    /// Sessions being taken off this node (final sync, destroy) right now.
    stopping: Mutex<std::collections::HashSet<String>>,
    /// Channels to `coordinators`, made on first use.
    coordinator_channels: std::sync::OnceLock<Vec<Channel>>,
    /// The agent's `grpc.health.v1` statuses: SERVING while registered and
    /// the last heartbeat was answered by a leader with a quorum.
    pub health: Option<Arc<sandfleet_common::health::Health>>,
    /// What the agent itself asks of placement on its node (it follows its
    /// Kubernetes Node): carried by each registration, and sent to the
    /// coordinators when it changes (see [`hold_loop`]).
    pub hold: tokio::sync::watch::Sender<Option<pb::AgentHold>>,
    /// The sandboxes' usage as last measured for a heartbeat (for the metrics).
    pub last_usage: Mutex<Option<pb::NodeUsage>>,
    /// Bumped after each successful registration.
    registrations: tokio::sync::watch::Sender<u64>,
}

/// How often the agent reads its runtime's images, to advertise a change.
const IMAGES_REFRESH: Duration = Duration::from_secs(5);

/// Longest a stopping session's final workspace sync may hold up its stop.
const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the final sync of a session fenced off a cut-off node may take:
/// the cluster places it elsewhere soon after.
const FENCE_SYNC_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a session leaves this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// No longer assigned here: moved elsewhere, or ended (the cluster says which).
    Unassigned,
    /// Stopped by the agent itself while cut off from the coordinators.
    Fenced,
}

impl AgentState {
    pub fn new(node_id: String, runtime: Arc<dyn Runtime>) -> Self {
        Self {
            node_id,
            runtime,
            sessions: Mutex::new(HashMap::new()),
            verifier: RwLock::new(None),
            reports: Mutex::new(Vec::new()),
            report_ready: Notify::new(),
            reconcile_lock: tokio::sync::Mutex::new(()),
            last_contact: Mutex::new(std::time::Instant::now()),
            fence_after_ms: std::sync::atomic::AtomicU64::new(0),
            fenced: std::sync::atomic::AtomicBool::new(false),
            heartbeat_ms: std::sync::atomic::AtomicU64::new(1000),
            activity: Mutex::new(HashMap::new()),
            assignments_version: std::sync::atomic::AtomicU64::new(0),
            syncer: None,
            coordinators: Vec::new(),
            coordinator_tls: None,
            stopping: Mutex::new(std::collections::HashSet::new()),
            coordinator_channels: std::sync::OnceLock::new(),
            health: None,
            hold: tokio::sync::watch::Sender::new(None),
            last_usage: Mutex::new(None),
            registrations: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Ready (`Ok`) or not (`Err` with the reason), for the health service.
    async fn set_ready(&self, ready: Result<(), String>) {
        if let Some(h) = &self.health {
            h.set_ready(ready).await;
        }
    }

    /// Whether the health statuses say ready (registered, last heartbeat acknowledged).
    pub fn is_ready(&self) -> bool {
        self.health.as_ref().is_some_and(|h| h.is_ready())
    }

    /// Sessions ready for exec and file calls on this node.
    pub fn running_sessions(&self) -> usize {
        self.sessions.lock().values().filter(|s| s.phase == LocalPhase::Ready).count()
    }

    /// Asks for a workspace sync of the session soon (after an exec or a file change).
    pub fn trigger_sync(&self, session_id: &str) {
        if let Some(s) = &self.syncer {
            s.trigger(session_id);
        }
    }

    /// Takes sessions off this node. Their processes are killed first (a copy
    /// must never run beside its replacement); then each workspace gets a
    /// last, sealed sync (for the copy that replaces it); then the runtime
    /// destroys what is left, freeing the slot. Only after that, off this
    /// path, the cluster is asked whether the session ended for good, and if
    /// so its prefix is removed from the store. A start of the same session
    /// waits until the destroy is done.
    async fn leave(self: &Arc<Self>, ids: Vec<String>, why: Leaving) {
        if ids.is_empty() {
            return;
        }
        self.stopping.lock().extend(ids.iter().cloned());
        // Per id: may the store hold something of it (then an ended session's prefix is removed)?
        let mut stored = vec![false; ids.len()];
        if let Some(syncer) = &self.syncer {
            for id in &ids {
                if let Err(e) = self.runtime.stop(id).await {
                    tracing::warn!(session = %id, error = %e, "failed to stop a session's processes");
                }
            }
            let timeout = if why == Leaving::Fenced { FENCE_SYNC_TIMEOUT } else { FINAL_SYNC_TIMEOUT };
            stored = futures::future::join_all(ids.iter().map(|id| async move {
                match syncer.finish(id, true, timeout).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::error!(session = %id, error = %e, "final workspace sync failed; the next copy restores the last completed sync");
                        true
                    }
                }
            }))
            .await;
        }
        for id in &ids {
            match self.runtime.destroy(id).await {
                Ok(()) if why == Leaving::Unassigned => {
                    tracing::info!(session = %id, "session stopped: no longer assigned here")
                }
                Ok(()) => {}
                Err(e) => tracing::warn!(session = %id, error = %e, "failed to destroy a session"),
            }
            self.stopping.lock().remove(id);
        }
        if let (Some(syncer), Leaving::Unassigned) = (&self.syncer, why) {
            let (this, syncer) = (self.clone(), syncer.clone());
            let ids: Vec<String> =
                ids.into_iter().zip(stored).filter(|(_, stored)| *stored).map(|(id, _)| id).collect();
            if ids.is_empty() {
                return;
            }
            tokio::spawn(async move {
                for id in ids {
                    if this.ended_for_good(&id).await {
                        if let Err(e) = syncer.delete(&id).await {
                            tracing::warn!(session = %id, error = %e, "could not remove the ended session's workspace from the store");
                        }
                    }
                }
            });
        }
    }

    /// Waits (bounded) while an earlier copy of the session is being taken off this node.
    async fn wait_not_stopping(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + FINAL_SYNC_TIMEOUT + Duration::from_secs(30);
        while self.stopping.lock().contains(id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True when the cluster says the session is over (deleted, expired or
    /// failed) rather than moved. Unknown (no coordinator answers) counts as
    /// moved, so a workspace is never deleted on a guess.
    async fn ended_for_good(&self, id: &str) -> bool {
        // Lazy channels, made once and reused: this runs for every session that leaves.
        let channels = self.coordinator_channels.get_or_init(|| {
            self.coordinators.iter().filter_map(|a| channel(a, self.coordinator_tls.as_ref()).ok()).collect()
        });
        for ch in channels.iter().cloned() {
            let mut req = tonic::Request::new(pb::SessionEndedRequest {
                node_id: self.node_id.clone(),
                session_id: id.to_string(),
            });
            req.set_timeout(Duration::from_secs(2));
            match crate::coordinator_link::client(ch).session_ended(req).await {
                Ok(resp) => return resp.into_inner().ended,
                Err(_) => continue,
            }
        }
        false
    }

    /// Records an exec or file call on a session (for idle timeouts).
    pub fn touch(&self, session_id: &str) {
        let now = sandfleet_common::time::now_ms();
        if let Some(s) = self.sessions.lock().get_mut(session_id) {
            s.last_active_ms = now;
        } else {
            return;
        }
        self.activity.lock().insert(session_id.to_string(), now);
    }

    fn take_activity(&self) -> Vec<pb::SessionActivity> {
        std::mem::take(&mut *self.activity.lock())
            .into_iter()
            .map(|(session_id, last_active_ms)| pb::SessionActivity { session_id, last_active_ms })
            .collect()
    }

    /// True while the agent is cut off from a quorum and has stopped its sessions.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A leader holding a quorum answered a call sent at `sent`. An answer to
    /// a call sent longer ago than the node's fence time (it waited in the
    /// socket through a freeze: SIGSTOP, a stalled VM) is not contact: it
    /// describes the cluster as it was before the fence, and acting on it
    /// could revive copies placed elsewhere since. Returns whether the answer
    /// counts; only then may the agent run sessions again.
    fn contact(&self, sent: std::time::Instant) -> bool {
        let fence_ms = self.fence_after_ms.load(std::sync::atomic::Ordering::SeqCst);
        if fence_ms > 0 && sent.elapsed().as_millis() as u64 >= fence_ms {
            tracing::warn!(
                age_ms = sent.elapsed().as_millis() as u64,
                "a coordinator's answer arrived after the fence time (the agent was frozen?); not acting on it"
            );
            return false;
        }
        *self.last_contact.lock() = std::time::Instant::now();
        if self.fenced.swap(false, std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("back in contact with a leader; following its assignments again");
        }
        true
    }

    /// Enforces what the cluster cannot while this agent is cut off from a
    /// quorum: a session whose fence time (its own `lost_after` less two
    /// heartbeats and a margin, or the node's `fence_after`) has passed is
    /// stopped, because the cluster is about to place it elsewhere and two
    /// live copies must never run; and a session past its TTL or idle timeout
    /// is ended, as the coordinators would have done.
    async fn fence_if_cut_off(self: &Arc<Self>) {
        let silent_ms = self.last_contact.lock().elapsed().as_millis() as u64;
        let contact = plan::Contact {
            node_fence_ms: self.fence_after_ms.load(std::sync::atomic::Ordering::SeqCst),
            heartbeat_ms: self.heartbeat_ms.load(std::sync::atomic::Ordering::SeqCst),
            silent_ms,
            fenced: self.is_fenced(),
        };
        let now = sandfleet_common::time::now_ms();
        let decided = plan::plan_fence(&self.sessions.lock(), contact, now);
        let Some(fence) = decided else { return };
        let _guard = self.reconcile_lock.lock().await;
        if fence.enter && !self.fenced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::error!(
                silent_ms,
                "cut off from a coordinator quorum; fencing: ignoring assignment pushes until a heartbeat succeeds"
            );
        }
        let mut leaving = Vec::new();
        for (id, why) in fence.stop {
            if self.sessions.lock().remove(&id).is_none() {
                continue;
            }
            tracing::error!(session = %id, silent_ms, "stopping session: {why}");
            leaving.push(id);
        }
        if !leaving.is_empty() {
            crate::metrics::metrics()
                .fenced
                .add(leaving.len() as u64, &[opentelemetry::KeyValue::new("reason", "self_fenced")]);
        }
        self.leave(leaving, Leaving::Fenced).await;
    }

    /// The local session, if this node holds it.
    pub fn session(&self, id: &str) -> Option<LocalSession> {
        self.sessions.lock().get(id).cloned()
    }

    fn report(&self, r: pb::SessionReport) {
        self.reports.lock().push(r);
        self.report_ready.notify_one();
    }

    /// Loads what the runtime already holds (after an agent restart).
    pub async fn rediscover(&self) -> Result<(), crate::runtime::RuntimeError> {
        let found = self.runtime.list().await?;
        for s in found {
            tracing::info!(session = %s.session_id, generation = s.generation, "rediscovered session");
            self.sessions.lock().insert(
                s.session_id.clone(),
                LocalSession {
                    generation: s.generation,
                    phase: LocalPhase::Ready,
                    expires_at_ms: 0,
                    fence_after_ms: 0,
                    idle_timeout_ms: 0,
                    last_active_ms: sandfleet_common::time::now_ms(),
                    tenant: String::new(),
                },
            );
            if let Some(syncer) = &self.syncer {
                match self.runtime.workspace(&s.session_id) {
                    Ok(ws) => syncer.attach(&s.session_id, s.generation, ws),
                    Err(e) => {
                        tracing::warn!(session = %s.session_id, error = %e, "rediscovered session has no workspace to sync")
                    }
                }
            }
            // Tell the coordinators it runs, in case the last report was lost with the old
            // process; a report for a superseded generation is ignored by the cluster.
            self.report(pb::SessionReport {
                session_id: s.session_id,
                generation: s.generation,
                state: pb::SessionState::Running as i32,
                message: String::new(),
            });
        }
        Ok(())
    }

    /// Brings local sessions in line with the full assignment set, computed
    /// by a coordinator at Raft index `version`. A set older than one already
    /// followed (from a lagging coordinator) is ignored: following it would
    /// stop sessions that were placed here since, and start them again empty.
    /// `pushed` sets (from a watch stream) are also ignored while fenced.
    pub async fn reconcile(self: &Arc<Self>, assignments: Vec<pb::Assignment>, version: u64, pushed: bool) {
        let _guard = self.reconcile_lock.lock().await;
        let started = std::time::Instant::now();
        let followed = self.assignments_version.load(std::sync::atomic::Ordering::SeqCst);
        let (to_start, to_stop) = {
            let mut sessions = self.sessions.lock();
            let now = sandfleet_common::time::now_ms();
            let fenced = pushed && self.is_fenced();
            let Some(actions) = plan::plan_reconcile(&assignments, version, followed, fenced, &sessions, now) else {
                if !fenced {
                    tracing::debug!(version, followed, "ignoring an older assignment set");
                }
                return;
            };
            self.assignments_version.store(version, std::sync::atomic::Ordering::SeqCst);
            let (mut to_start, mut to_stop) = (Vec::new(), Vec::new());
            for action in actions {
                match action {
                    plan::Action::Stop(id) => {
                        let old = sessions.remove(&id).map(|s| s.generation);
                        // A newer generation of it in the set: this copy is fenced off.
                        if assignments.iter().any(|a| a.session_id == id && Some(a.generation) > old) {
                            crate::metrics::metrics()
                                .fenced
                                .add(1, &[opentelemetry::KeyValue::new("reason", "superseded")]);
                        }
                        to_stop.push(id);
                    }
                    plan::Action::Update(id, local) => {
                        sessions.insert(id, local);
                    }
                    plan::Action::Start(a) => {
                        sessions.insert(a.session_id.clone(), LocalSession::new(&a, now));
                        to_start.push(a);
                    }
                }
            }
            (to_start, to_stop)
        };
        if self.syncer.is_none() {
            self.leave(to_stop, Leaving::Unassigned).await;
        } else if !to_stop.is_empty() {
            // Final syncs can take a while: off the reconcile lock. Their processes
            // are killed first thing, and a new start of the same id waits for them.
            self.stopping.lock().extend(to_stop.iter().cloned());
            let this = self.clone();
            tokio::spawn(async move { this.leave(to_stop, Leaving::Unassigned).await });
        }
        for a in to_start {
            let this = self.clone();
            // In the trace of the session's create, when it was traced.
            let span =
                tracing::info_span!(parent: None, "session.start", session = %a.session_id, generation = a.generation);
            sandfleet_common::trace_context::set_parent(&span, &a.traceparent);
            tokio::spawn(async move { this.start(a).await }.instrument(span));
        }
        crate::metrics::metrics().reconcile.record(started.elapsed().as_secs_f64(), &[]);
    }

    /// Fills the new sandbox's workspace from the store before the session
    /// reports RUNNING. A store that cannot be reached is retried (with
    /// backoff) for as long as the session stays assigned here: reporting it
    /// FAILED would end it, and its files are still safe in the store.
    async fn restore(&self, syncer: &Arc<Syncer>, a: &pb::Assignment) -> Result<(), crate::runtime::RuntimeError> {
        let ws = self.runtime.workspace(&a.session_id)?;
        let mut attempt = 0u32;
        loop {
            match syncer.restore(&a.session_id, a.generation, ws.clone(), a.handoff).await {
                Ok(stats) => {
                    tracing::info!(files = stats.files, bytes = stats.bytes, "workspace restored from the store");
                    return Ok(());
                }
                Err(e @ (StoreError::Corrupt(_) | StoreError::Superseded { .. } | StoreError::TooLarge(_))) => {
                    return Err(crate::runtime::RuntimeError::Internal(format!("cannot restore the workspace: {e}")));
                }
                Err(e) => {
                    attempt += 1;
                    let still_here = self.session(&a.session_id).is_some_and(|s| s.generation == a.generation);
                    if !still_here {
                        return Err(crate::runtime::RuntimeError::Unavailable(format!(
                            "unassigned while restoring: {e}"
                        )));
                    }
                    let wait = Duration::from_millis((250u64 << attempt.min(7)).min(30_000));
                    tracing::error!(error = %e, attempt, retry_in = ?wait, "cannot restore the workspace yet; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Prepares the sandbox and restores its workspace, then reports the session
    /// RUNNING or FAILED; runs in the `session.start` span the reconcile made.
    async fn start(self: Arc<Self>, a: pb::Assignment) {
        let sandbox = SandboxSpec {
            session_id: a.session_id.clone(),
            generation: a.generation,
            spec: a.spec.clone().unwrap_or_default(),
        };
        let started = std::time::Instant::now();
        let runtime = [opentelemetry::KeyValue::new("runtime", self.runtime.kind().as_str())];
        self.wait_not_stopping(&a.session_id).await;
        let prepare_started = std::time::Instant::now();
        let mut result = self.runtime.prepare(&sandbox).instrument(tracing::info_span!("sandbox.prepare")).await;
        // The slot it needs may be held by a session still being taken off this
        // node (its final workspace sync): try again as those finish.
        let deadline = tokio::time::Instant::now() + FINAL_SYNC_TIMEOUT + Duration::from_secs(5);
        while matches!(result, Err(crate::runtime::RuntimeError::Unavailable(_)))
            && !self.stopping.lock().is_empty()
            && tokio::time::Instant::now() < deadline
            && self.session(&a.session_id).is_some_and(|s| s.generation == a.generation)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            result = self.runtime.prepare(&sandbox).instrument(tracing::info_span!("sandbox.prepare")).await;
        }
        if result.is_ok() {
            crate::metrics::metrics().prepare.record(prepare_started.elapsed().as_secs_f64(), &runtime);
        }
        if let (Ok(()), Some(syncer)) = (&result, &self.syncer) {
            result = self.restore(syncer, &a).instrument(tracing::info_span!("workspace.restore")).await;
        }
        let phase = match &result {
            Ok(()) => LocalPhase::Ready,
            Err(e) => LocalPhase::Failed(e.to_string()),
        };
        let removed = {
            let mut sessions = self.sessions.lock();
            match sessions.get_mut(&a.session_id) {
                Some(local) if local.generation == a.generation => {
                    local.phase = phase.clone();
                    false
                }
                Some(_) => return, // superseded by a newer generation, which has its own start
                None => true,
            }
        };
        if removed {
            // Unassigned (or fenced) while preparing: the reconcile that dropped it
            // found nothing to destroy yet, so undo the prepare here. Under the
            // reconcile lock, so a newer assignment cannot slip in between.
            let _guard = self.reconcile_lock.lock().await;
            let reassigned = self.sessions.lock().contains_key(&a.session_id);
            if !reassigned {
                if let Some(syncer) = &self.syncer {
                    let _ = syncer.finish(&a.session_id, false, Duration::ZERO).await;
                }
                match self.runtime.destroy(&a.session_id).await {
                    Ok(()) => tracing::info!("session removed while it was being prepared; cleaned up"),
                    Err(e) => tracing::warn!(error = %e, "failed to clean up a session removed while preparing"),
                }
            }
            return;
        }
        let (state, message) = match result {
            Ok(()) => {
                crate::metrics::metrics().start.record(started.elapsed().as_secs_f64(), &runtime);
                tracing::info!("session ready");
                (pb::SessionState::Running, String::new())
            }
            Err(e) => {
                tracing::warn!(error = %e, "session failed to start");
                (pb::SessionState::Failed, e.to_string())
            }
        };
        self.report(pb::SessionReport {
            session_id: a.session_id,
            generation: a.generation,
            state: state as i32,
            message,
        });
    }
}

/// How the agent reaches the coordinators.
pub struct ControlConfig {
    pub coordinators: Vec<String>,
    pub register: pb::RegisterNodeRequest,
    /// Mutual TLS toward the coordinators; `None` on an `--insecure` loopback cluster.
    pub tls: Option<TlsDialer>,
    /// Send the agent's hold on its node ([`AgentState::hold`]) to the
    /// coordinators when it changes (with `--kube-node-name`).
    pub report_hold: bool,
}

fn channel(addr: &str, tls: Option<&TlsDialer>) -> Result<Channel, tonic::transport::Error> {
    crate::coordinator_link::channel(addr, tls)
}

/// The control loop. `registered` fires after the first successful registration.
pub struct Control {
    state: Arc<AgentState>,
    config: ControlConfig,
    clients: Vec<CoordinatorClient>,
    current: usize,
}

impl Control {
    pub fn new(state: Arc<AgentState>, config: ControlConfig) -> Result<Self, tonic::transport::Error> {
        let clients = config
            .coordinators
            .iter()
            .map(|a| channel(a, config.tls.as_ref()).map(crate::coordinator_link::client))
            .collect::<Result<_, _>>()?;
        Ok(Self { state, config, clients, current: 0 })
    }

    fn client(&self) -> CoordinatorClient {
        self.clients[self.current % self.clients.len()].clone()
    }

    fn rotate(&mut self) {
        self.current = (self.current + 1) % self.clients.len();
    }

    /// Reads the images the runtime holds into the registration, normalized
    /// and sorted (a name that is not a valid reference is left out); true
    /// when they changed. On an error the last set stays.
    async fn refresh_images(&mut self) -> bool {
        let listed = match self.state.runtime.images().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the runtime's images; advertising the last set");
                return false;
            }
        };
        let mut images: Vec<String> = listed
            .iter()
            .filter_map(|i| sandfleet_common::spec::normalize_image("images", i).ok())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if images.len() > sandfleet_common::limits::MAX_NODE_IMAGES {
            tracing::warn!(
                images = images.len(),
                advertised = sandfleet_common::limits::MAX_NODE_IMAGES,
                "the runtime holds more images than an agent may advertise; advertising the first by name"
            );
            images.truncate(sandfleet_common::limits::MAX_NODE_IMAGES);
        }
        if images == self.config.register.images {
            return false;
        }
        tracing::info!(images = images.len(), "the runtime's images changed");
        self.config.register.images = images;
        true
    }

    /// Registers, retrying across coordinators until it works or `shutdown` fires.
    pub async fn register(&mut self, shutdown: &CancellationToken) -> Option<Duration> {
        self.refresh_images().await;
        let mut attempt = 0;
        loop {
            let mut register = self.config.register.clone();
            register.hold = self.state.hold.borrow().clone();
            let mut req = tonic::Request::new(register);
            req.set_timeout(CALL_TIMEOUT);
            let sent = std::time::Instant::now();
            match self.client().register_node(req).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    match TokenVerifier::from_public_key(&resp.token_public_key) {
                        Ok(v) => *self.state.verifier.write().await = Some(v),
                        Err(e) => tracing::error!(error = %e, "coordinator sent a bad token key"),
                    }
                    self.state.fence_after_ms.store(resp.fence_after_ms, std::sync::atomic::Ordering::SeqCst);
                    self.state
                        .heartbeat_ms
                        .store(resp.heartbeat_interval_ms.max(100), std::sync::atomic::Ordering::SeqCst);
                    if self.state.contact(sent) {
                        self.state.set_ready(Ok(())).await;
                    }
                    self.state.registrations.send_modify(|n| *n += 1);
                    tracing::info!(
                        node = %self.config.register.node_id,
                        fence_after_ms = resp.fence_after_ms,
                        "registered with the coordinators"
                    );
                    return Some(Duration::from_millis(resp.heartbeat_interval_ms.max(100)));
                }
                Err(status) => {
                    tracing::warn!(error = %status, "registration failed; retrying");
                    self.state.set_ready(Err(format!("not registered: {}", status.message()))).await;
                    self.rotate();
                }
            }
            attempt += 1;
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff(attempt)) => {}
            }
        }
    }

    /// Heartbeats and watches assignments until `shutdown`.
    pub async fn run(mut self, mut interval: Duration, shutdown: CancellationToken) {
        let watch_stop = shutdown.child_token();
        let watcher = tokio::spawn(watch_loop(
            self.state.clone(),
            self.config.coordinators.clone(),
            self.config.register.node_id.clone(),
            self.config.tls.clone(),
            watch_stop.clone(),
        ));
        let holder = self.config.report_hold.then(|| {
            tokio::spawn(hold_loop(
                self.clients.clone(),
                self.config.register.node_id.clone(),
                self.state.hold.subscribe(),
                self.state.registrations.subscribe(),
                watch_stop.clone(),
            ))
        });
        let fencer = {
            let (state, stop) = (self.state.clone(), watch_stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => state.fence_if_cut_off().await,
                    }
                }
            })
        };
        let mut failures = 0u32;
        let mut usage_rate = crate::runtime::usage::UsageRate::default();
        let mut images_read = std::time::Instant::now();
        // Reports sent but not committed yet go again soon, not a whole interval later.
        let mut resend_soon = false;
        loop {
            let wait = if resend_soon { interval / 4 } else { interval };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.state.report_ready.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            // After a freeze (SIGSTOP, a stalled VM) the fence check comes first: a
            // heartbeat must not revive copies the cluster has already replaced.
            self.state.fence_if_cut_off().await;
            // Images loaded or removed since: register again with the new set.
            if images_read.elapsed() >= IMAGES_REFRESH {
                images_read = std::time::Instant::now();
                if self.refresh_images().await {
                    if let Some(i) = self.register(&shutdown).await {
                        interval = i;
                    }
                }
            }
            let reports = std::mem::take(&mut *self.state.reports.lock());
            let activity = self.state.take_activity();
            let mut req = tonic::Request::new(pb::HeartbeatRequest {
                node_id: self.config.register.node_id.clone(),
                reports: reports.clone(),
                activity: activity.clone(),
                // Reports stay here until an answer says they are committed.
                resend_uncommitted: true,
                usage: {
                    let usage = usage_rate.measure(self.state.runtime.as_ref(), interval / 4).await;
                    if usage.is_some() {
                        *self.state.last_usage.lock() = usage;
                    }
                    usage
                },
            });
            // Two intervals at most: the cluster's fence_after assumes it.
            req.set_timeout(CALL_TIMEOUT.min(interval * 2));
            let sent = std::time::Instant::now();
            let answered = self.client().heartbeat(req).await;
            match &answered {
                Ok(_) => crate::metrics::metrics().heartbeat_rtt.record(sent.elapsed().as_secs_f64(), &[]),
                Err(_) => crate::metrics::metrics().heartbeat_failures.add(1, &[]),
            }
            match answered {
                Ok(resp) => {
                    failures = 0;
                    let resp = resp.into_inner();
                    resend_soon = !resp.reports_committed && !reports.is_empty();
                    if resend_soon {
                        // Answered before the leader committed them: send them again
                        // (a report that arrives twice applies once).
                        self.state.reports.lock().splice(0..0, reports);
                        crate::metrics::metrics().reports_resent.add(1, &[]);
                    }
                    if self.state.contact(sent) {
                        self.state.set_ready(Ok(())).await;
                        self.state.reconcile(resp.assignments, resp.assignments_version, false).await;
                    } else {
                        // Too old to act on; the reports it carried are committed or kept
                        // to send again. The fence check decides, and the next heartbeat is fresh.
                        self.state.set_ready(Err("the last heartbeat's answer came too late".into())).await;
                        self.state.fence_if_cut_off().await;
                    }
                }
                Err(status) => {
                    // Keep the reports and activity for the next attempt.
                    self.state.reports.lock().splice(0..0, reports);
                    {
                        let mut pending = self.state.activity.lock();
                        for a in activity {
                            let e = pending.entry(a.session_id).or_insert(a.last_active_ms);
                            *e = (*e).max(a.last_active_ms);
                        }
                    }
                    failures += 1;
                    tracing::warn!(error = %status, failures, "heartbeat failed");
                    self.state.set_ready(Err(format!("the last heartbeat failed: {}", status.message()))).await;
                    if status.code() == tonic::Code::NotFound {
                        if let Some(i) = self.register(&shutdown).await {
                            interval = i;
                        }
                    } else {
                        self.rotate();
                        tokio::time::sleep(backoff(failures)).await;
                    }
                }
            }
        }
        watch_stop.cancel();
        let _ = watcher.await;
        let _ = fencer.await;
        if let Some(h) = holder {
            let _ = h.await;
        }
    }
}

/// Sends the agent's hold on its node to the coordinators
/// (AgentService.SetNodeSchedulable) whenever it changes, and again after
/// each registration (a registration carries the hold it read, which a
/// change that raced it may have overtaken). A failed call is retried across
/// coordinators with backoff until it succeeds or a newer hold replaces it.
/// Ends with `shutdown`.
pub async fn hold_loop(
    clients: Vec<CoordinatorClient>,
    node_id: String,
    mut hold: tokio::sync::watch::Receiver<Option<pb::AgentHold>>,
    mut registrations: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    if clients.is_empty() {
        return;
    }
    // What the cluster was last told; None: nothing yet (the registration's is sent again).
    let mut sent: Option<Option<pb::AgentHold>> = None;
    let mut current = 0usize;
    let mut failures = 0u32;
    loop {
        let want = hold.borrow_and_update().clone();
        registrations.borrow_and_update();
        if sent.as_ref() != Some(&want) {
            let mut req =
                tonic::Request::new(pb::SetNodeSchedulableRequest { node_id: node_id.clone(), hold: want.clone() });
            req.set_timeout(CALL_TIMEOUT);
            let mut client = clients[current % clients.len()].clone();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = client.set_node_schedulable(req) => r,
            };
            match result {
                Ok(resp) => {
                    let state = resp.into_inner().node.map(|n| n.state).unwrap_or_default();
                    tracing::info!(
                        cordoned = want.as_ref().is_some_and(|h| h.cordoned),
                        drain = want.as_ref().is_some_and(|h| h.drain),
                        reason = want.as_ref().map_or("", |h| h.reason.as_str()),
                        %state,
                        "the coordinators took this node's own hold"
                    );
                    sent = Some(want);
                    failures = 0;
                }
                Err(status) => {
                    failures = failures.saturating_add(1);
                    current += 1;
                    tracing::warn!(error = %status, failures, "cannot set this node's own hold on the coordinators yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = hold.changed() => if changed.is_err() { return },
            changed = registrations.changed() => {
                if changed.is_err() {
                    return;
                }
                sent = None;
            }
        }
    }
}

/// Follows WatchAssignments, reconnecting across coordinators.
async fn watch_loop(
    state: Arc<AgentState>,
    coordinators: Vec<String>,
    node_id: String,
    tls: Option<TlsDialer>,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut i = 0usize;
    loop {
        let addr = &coordinators[i % coordinators.len()];
        i += 1;
        let result = async {
            let mut client = crate::coordinator_link::client(
                channel(addr, tls.as_ref()).map_err(|e| tonic::Status::unavailable(e.to_string()))?,
            );
            let request = pb::WatchAssignmentsRequest { node_id: node_id.clone(), deltas: true };
            let mut stream = client.watch_assignments(request).await?.into_inner();
            // The set this stream has pushed: its first push, then the deltas.
            let mut pushed = plan::PushedSet::default();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), tonic::Status>(()),
                    msg = stream.message() => match msg? {
                        Some(m) => {
                            let version = m.assignments_version;
                            let set = pushed.follow(m).map_err(|e| tonic::Status::internal(e.to_string()))?;
                            // A push read right after a freeze (SIGSTOP, a stalled VM) may
                            // have waited in the socket: the fence check comes first, as it
                            // does before a heartbeat. While fenced, only a heartbeat
                            // (answered with a quorum) may restart sessions.
                            state.fence_if_cut_off().await;
                            if !state.is_fenced() {
                                state.reconcile(set, version, true).await;
                            }
                        }
                        None => return Err(tonic::Status::unavailable("assignment stream ended")),
                    },
                }
            }
        }
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, coordinator = %addr, "assignment watch broke; reconnecting");
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff(attempt.min(6))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandfleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
    use std::pin::Pin;

    /// A coordinator that only takes SetNodeSchedulable: records each call, and
    /// refuses the first `fail` of them with UNAVAILABLE.
    #[derive(Clone, Default)]
    struct FakeCoordinator {
        calls: Arc<Mutex<Vec<pb::SetNodeSchedulableRequest>>>,
        fail: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl AgentService for FakeCoordinator {
        async fn register_node(
            &self,
            _: tonic::Request<pb::RegisterNodeRequest>,
        ) -> Result<tonic::Response<pb::RegisterNodeResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn heartbeat(
            &self,
            _: tonic::Request<pb::HeartbeatRequest>,
        ) -> Result<tonic::Response<pb::HeartbeatResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        type WatchAssignmentsStream =
            Pin<Box<dyn futures::Stream<Item = Result<pb::HeartbeatResponse, tonic::Status>> + Send>>;
        async fn watch_assignments(
            &self,
            _: tonic::Request<pb::WatchAssignmentsRequest>,
        ) -> Result<tonic::Response<Self::WatchAssignmentsStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn session_ended(
            &self,
            _: tonic::Request<pb::SessionEndedRequest>,
        ) -> Result<tonic::Response<pb::SessionEndedResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }
        async fn set_node_schedulable(
            &self,
            req: tonic::Request<pb::SetNodeSchedulableRequest>,
        ) -> Result<tonic::Response<pb::SetNodeSchedulableResponse>, tonic::Status> {
            self.calls.lock().push(req.into_inner());
            let refuse = self
                .fail
                .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                    n.checked_sub(1)
                })
                .is_ok();
            if refuse {
                return Err(tonic::Status::unavailable("no leader right now"));
            }
            Ok(tonic::Response::new(pb::SetNodeSchedulableResponse {
                node: Some(pb::Node { state: "cordoned".into(), ..Default::default() }),
            }))
        }
    }

    async fn wait_calls(fake: &FakeCoordinator, n: usize) -> Vec<pb::SetNodeSchedulableRequest> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let calls = fake.calls.lock().clone();
            if calls.len() >= n {
                return calls;
            }
            assert!(tokio::time::Instant::now() < deadline, "{} of {n} calls after 10 s: {calls:?}", calls.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_agents_hold_reaches_the_coordinators_again_after_failures_and_registrations() {
        let fake = FakeCoordinator::default();
        fake.fail.store(2, std::sync::atomic::Ordering::SeqCst);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let (svc, stop) = (AgentServiceServer::new(fake.clone()), stop.clone());
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            )
        });
        let clients = vec![crate::coordinator_link::client(channel(&addr.to_string(), None).unwrap())];
        let hold = tokio::sync::watch::Sender::new(Some(pb::AgentHold {
            cordoned: true,
            drain: false,
            reason: "kubernetes: node cordoned".into(),
        }));
        let registrations = tokio::sync::watch::Sender::new(1u64);
        let task = tokio::spawn(hold_loop(
            clients,
            "node-a".into(),
            hold.subscribe(),
            registrations.subscribe(),
            stop.clone(),
        ));
        // Sent at start (the registration's hold is sent again), retried through two refusals.
        let calls = wait_calls(&fake, 3).await;
        for c in &calls {
            assert_eq!(c.node_id, "node-a");
            let h = c.hold.clone().unwrap();
            assert!(h.cordoned && !h.drain && h.reason == "kubernetes: node cordoned", "{c:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.calls.lock().len(), 3, "nothing more once the coordinators took it");
        // A taint: a drain.
        hold.send_replace(Some(pb::AgentHold {
            cordoned: true,
            drain: true,
            reason: "kubernetes: NoExecute taint t".into(),
        }));
        let calls = wait_calls(&fake, 4).await;
        assert!(calls[3].hold.as_ref().is_some_and(|h| h.drain));
        // After a registration, the current hold is sent again.
        registrations.send_modify(|n| *n += 1);
        let calls = wait_calls(&fake, 5).await;
        assert_eq!(calls[4].hold, calls[3].hold);
        // Lifted: no hold.
        hold.send_replace(None);
        let calls = wait_calls(&fake, 6).await;
        assert_eq!(calls[5].hold, None);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("ends on shutdown").unwrap();
        let _ = server.await;
    }
}
