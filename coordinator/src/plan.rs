//! The leader's decisions as pure functions: each `plan_*` reads one view of
//! the replicated [`ClusterState`], the [`Tunables`], the leader's in-memory
//! inputs (heartbeats, activity, when it started leading) and the time, and
//! returns the [`Command`]s to propose, in order. None of them reads a clock
//! or proposes anything: [`crate::leader`] is the thin loop that does, and the
//! tests below drive them with an injected clock against the real state
//! machine.
//!
//! Two clocks: how long a node has been silent is measured on the monotonic
//! clock (a step of the wall clock marks no node silent); the wall clock
//! (Unix ms) stamps the commands and is what the replicated deadlines (TTLs,
//! drains, restart backoffs) are compared with.

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use crate::core::{Heard, Tunables};
use crate::scheduler::{Placer, Unplaceable};
use crate::state::{ClusterState, Command, NodePhase, PendingReason, Placement, Report, SessionRecord};

/// Message of a session ended past its TTL.
pub const EXPIRED_TTL: &str = "expired (ttl)";
/// Message of a session ended past its idle timeout.
pub const EXPIRED_IDLE: &str = "expired (idle timeout)";

/// Node liveness. A node silent for `node_ttl` goes down (`NodeDown`); each of
/// its sessions is LOST once the node has been silent for that session's
/// `lost_after` (the cluster default unless the session set its own): with the
/// node going down, or later with `SessionsLost`.
///
/// `heartbeats` holds the last heartbeat per node as this leader heard it,
/// and `now` is the monotonic time of the round: silence is `now` minus the
/// heartbeat's [`Heard::at`]. A node missing from it counts as heard now (the
/// caller records that, so its grace starts now). `now_ms` (wall) stamps the
/// commands.
pub fn plan_liveness(
    st: &ClusterState,
    tunables: &Tunables,
    heartbeats: &HashMap<String, Heard>,
    now: Instant,
    now_ms: i64,
) -> Vec<Command> {
    let ttl = tunables.node_ttl;
    // The shortest silence that can matter: the smallest lost_after allowed.
    let floor = tunables.min_lost_after().min(tunables.node_ttl);
    let mut out = Vec::new();
    for node in st.nodes.values() {
        let seen = heartbeats.get(&node.id).map_or(now, |h| h.at);
        let silent = now.saturating_duration_since(seen);
        if silent <= floor {
            continue;
        }
        // Sessions on the node whose own lost_after has not passed yet are kept.
        // Nothing is copied unless a command comes of it: a silent node in its
        // grace costs a walk over its sessions, not a copy of their ids.
        let sessions = || st.node_sessions.get(&node.id).into_iter().flatten().filter_map(|id| st.sessions.get(id));
        let due = |s: &&SessionRecord| silent > tunables.lost_after_of(&s.spec);
        if node.phase != NodePhase::Down && silent > ttl {
            let keep = sessions().filter(|s| !due(s)).map(|s| s.id.clone()).collect();
            out.push(Command::NodeDown { node_id: node.id.clone(), now_ms, keep });
        } else if sessions().any(|s| due(&s)) {
            let ids = sessions().filter(due).map(|s| s.id.clone()).collect();
            out.push(Command::SessionsLost { node_id: node.id.clone(), ids, now_ms });
        }
    }
    out
}

/// Session TTLs and idle timeouts: one `TerminateSessions` for the sessions
/// past their expiry, then one for those idle past their timeout. Idle time
/// counts from the latest of creation, renewal, `lead_since_ms` (a new leader
/// knows no activity from before it led) and the last data-plane use in
/// `activity`.
pub fn plan_lifetimes(
    st: &ClusterState,
    activity: &HashMap<String, i64>,
    lead_since_ms: i64,
    now_ms: i64,
) -> Vec<Command> {
    let mut out = Vec::new();
    let expired = st.expired_at(now_ms);
    let expired_set: BTreeSet<&str> = expired.iter().map(String::as_str).collect();
    let idle: Vec<String> = st
        .idle
        .iter()
        // Those expire by TTL in the same round already.
        .filter(|id| !expired_set.contains(id.as_str()))
        .filter_map(|id| st.sessions.get(id))
        .filter(|s| {
            let last = [s.created_at_ms, s.renewed_at_ms, lead_since_ms, activity.get(&s.id).copied().unwrap_or(0)]
                .into_iter()
                .max()
                .unwrap_or(0);
            now_ms - last > (s.spec.idle_timeout_seconds as i64) * 1000
        })
        .map(|s| s.id.clone())
        .collect();
    if !expired.is_empty() {
        out.push(Command::TerminateSessions { ids: expired, message: EXPIRED_TTL.into(), now_ms, tenant: None });
    }
    if !idle.is_empty() {
        out.push(Command::TerminateSessions { ids: idle, message: EXPIRED_IDLE.into(), now_ms, tenant: None });
    }
    out
}

/// Moves sessions off draining nodes: at most `max_parallel` of a node's
/// sessions are on their way at a time; past the deadline, all of them go.
/// While placement is paused nothing moves (a moved session needs a placement).
pub fn plan_drains(st: &ClusterState, now_ms: i64) -> Vec<Command> {
    if st.scheduler_paused {
        return Vec::new();
    }
    st.nodes
        .values()
        .filter(|n| n.phase == NodePhase::Draining)
        .filter_map(|n| {
            let drain = n.drain?;
            let on_node = st.node_sessions.get(&n.id)?;
            let moving = st.moving.get(&n.id).map_or(0, |m| m.len());
            let allowed = if now_ms >= drain.deadline_ms {
                on_node.len()
            } else {
                (drain.max_parallel as usize).saturating_sub(moving)
            };
            let ids: Vec<String> = on_node.iter().take(allowed).cloned().collect();
            (!ids.is_empty()).then(|| Command::MoveSessions { node_id: n.id.clone(), ids, now_ms })
        })
        .collect()
}

/// A pool whose sandboxes failed more than its `buffer_max` times within this
/// window is not refilled until the failures age out of it.
pub const POOL_FAILURE_WINDOW_MS: i64 = 60_000;

/// Message of an idle pool sandbox ended because its pool holds more idle ones than `buffer_max`.
pub const POOL_SHRUNK: &str = "pool holds more idle sandboxes than its buffer_max";

/// Keeps each warm pool within its bounds (OpenSandbox's): below
/// `buffer_min` idle sandboxes (starting ones count), refill up to
/// `buffer_max`; below `min` in all, fill up to it; never above `max`. Above
/// `buffer_max` idle, end the extra idle ones (the unplaced first, then those
/// not running yet, then the newest), never below `min` in all. `new_id` names
/// the sandboxes to make.
///
/// No refill is proposed while it could make nothing: when the tenant's quota
/// has no room for one more sandbox, or while more of the pool's sandboxes
/// FAILED in the last [`POOL_FAILURE_WINDOW_MS`] than its `buffer_max` (a
/// spec that cannot start is retried once a window, not in a tight loop).
pub fn plan_pools(st: &ClusterState, now_ms: i64, new_id: &mut dyn FnMut() -> String) -> Vec<Command> {
    let mut out = Vec::new();
    for (key, pool) in &st.pools {
        let c = st.pool_counts(key);
        let idle = c.idle + c.starting;
        let total = idle + c.claimed;
        let mut want = 0;
        if idle < pool.buffer_min {
            want = pool.buffer_max - idle;
        }
        want = want.max(pool.min.saturating_sub(total)).min(pool.max.saturating_sub(total));
        let quota_room = st
            .tenant(&pool.tenant)
            .is_some_and(|t| st.quota_allows(&t, &crate::state::Resources::of(&pool.spec)).is_ok());
        let recent_failures = st
            .pool_failed
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| st.sessions.get(id))
            .filter(|s| now_ms - s.updated_at_ms < POOL_FAILURE_WINDOW_MS)
            .count();
        if want > 0 && (!quota_room || recent_failures > pool.buffer_max.max(1) as usize) {
            continue;
        }
        if want > 0 {
            out.push(Command::FillPool {
                tenant: pool.tenant.clone(),
                name: pool.name.clone(),
                ids: (0..want).map(|_| new_id()).collect(),
                now_ms,
            });
            continue;
        }
        let excess = idle.saturating_sub(pool.buffer_max).min(total.saturating_sub(pool.min));
        if excess > 0 {
            let mut idle_ones: Vec<&crate::state::SessionRecord> = st
                .pool_live
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|id| st.sessions.get(id))
                .filter(|s| s.pool_idle())
                .collect();
            // Unplaced first, then not running yet, then the newest.
            idle_ones.sort_by_key(|s| {
                (
                    s.node_id.is_some(),
                    s.phase == crate::state::SessionPhase::Running,
                    std::cmp::Reverse(s.created_at_ms),
                )
            });
            let ids = idle_ones.iter().take(excess as usize).map(|s| s.id.clone()).collect();
            out.push(Command::TerminateSessions { ids, message: POOL_SHRUNK.into(), now_ms, tenant: None });
        }
    }
    out
}

/// Places unplaced sessions, oldest first (the index is ordered by creation),
/// in batches of up to `placement_batch` per `PlaceSessions`. Sessions that
/// fit nowhere get their reason recorded, at most one batch of reasons per
/// round. While an operator has paused placement, sessions only get that as
/// their reason. Lost sessions in restart backoff wait until `not_before_ms`.
pub fn plan_placement(st: &ClusterState, tunables: &Tunables, now_ms: i64) -> Vec<Command> {
    let batch = tunables.placement_batch.max(1);
    let mut placer = Placer::new(st, tunables.placement);
    let mut placements = Vec::new();
    let mut reasons = Vec::new();
    for (_, id) in &st.unplaced {
        let Some(s) = st.sessions.get(id) else { continue };
        if st.scheduler_paused {
            if s.pending_reason != PendingReason::Paused && reasons.len() < batch {
                reasons.push((id.clone(), PendingReason::Paused));
            }
            continue;
        }
        if s.not_before_ms > now_ms {
            continue;
        }
        match placer.place(&s.spec) {
            Ok(node_id) => placements.push(Placement { id: id.clone(), node_id, expected_generation: s.generation }),
            Err(Unplaceable::Wait(why) | Unplaceable::Never(why)) => {
                // At most one entry of reasons per round, oldest sessions first:
                // while nodes come and go every waiting session's reason (its
                // counts) changes each round, and rewriting all of them through
                // Raft every round would crowd out the placements themselves.
                if why != s.pending_reason && reasons.len() < batch {
                    reasons.push((id.clone(), why));
                }
            }
        }
    }
    let mut out: Vec<Command> =
        placements.chunks(batch).map(|chunk| Command::PlaceSessions { placements: chunk.to_vec(), now_ms }).collect();
    out.extend(reasons.chunks(batch).map(|chunk| Command::SetPendingReasons { reasons: chunk.to_vec(), now_ms }));
    out
}

/// The reports of a heartbeat from `node_id` that may still change the
/// state, in their order: a report is left out only when applying it is
/// certainly a no-op, because its session has ended, has moved on to a newer
/// generation, or is already in the reported phase at that generation on
/// this node (a report the agent sent again after its first commit). The
/// rest are proposed; the state machine still fences each one at apply, so
/// keeping a stale one costs an entry, never a wrong state.
pub fn plan_reports(st: &ClusterState, node_id: &str, reports: &[Report]) -> Vec<Report> {
    reports
        .iter()
        .filter(|r| match st.sessions.get(&r.id) {
            // Not applied here yet (or deleted): let the state machine decide.
            None => true,
            Some(s) if s.phase.is_terminal() || s.generation > r.generation => false,
            Some(s) => !(s.generation == r.generation && s.node_id.as_deref() == Some(node_id) && s.phase == r.phase),
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    //! Every case is driven through the real state machine: the state is built
    //! by applying `Command`s, and what a planner returns is applied too.
    use std::time::Duration;

    use super::*;
    use crate::scheduler::{PlacementOptions, Strategy};
    use crate::state::{
        CommandResponse, DrainRecord, NodeRecord, Resources, SessionPhase, SessionRecord, SpecRecord, Touched,
    };

    const TTL: i64 = 5_000;
    /// A heartbeat time later than any round of a test: a node that stays alive.
    const FOREVER: i64 = 1 << 40;

    fn tunables() -> Tunables {
        Tunables {
            agent_heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_millis(TTL as u64),
            lost_after: Duration::from_millis(TTL as u64),
            placement: PlacementOptions { strategy: Strategy::Spread, candidates: 0 },
            placement_batch: 1024,
            group_commit: crate::commit::MAX_COMMANDS,
            report_wait: crate::core::DEFAULT_REPORT_WAIT,
        }
    }

    fn spec() -> SpecRecord {
        SpecRecord {
            cpu_millis: 100,
            cpu_request_millis: 100,
            memory_bytes: 1 << 20,
            pids_limit: 64,
            ttl_seconds: 3600,
            ..Default::default()
        }
    }

    /// A cluster under test: the state machine and the leader's in-memory inputs.
    /// Times are milliseconds: heartbeats on the monotonic clock (since `base`),
    /// everything else on the wall clock; a round passes both (the same number
    /// unless a test steps the wall clock).
    struct Cluster {
        st: ClusterState,
        heartbeats: HashMap<String, i64>,
        activity: HashMap<String, i64>,
        lead_since: i64,
        base: Instant,
    }

    impl Cluster {
        fn new() -> Self {
            Cluster {
                st: ClusterState::default(),
                heartbeats: HashMap::new(),
                activity: HashMap::new(),
                lead_since: 0,
                base: Instant::now(),
            }
        }

        /// `ms` on the monotonic clock.
        fn mono(&self, ms: i64) -> Instant {
            self.base + Duration::from_millis(ms as u64)
        }

        fn apply(&mut self, cmd: Command) -> CommandResponse {
            self.st.apply(cmd, &mut Touched::default())
        }

        fn apply_all(&mut self, cmds: Vec<Command>) {
            for cmd in cmds {
                self.apply(cmd);
            }
        }

        /// Registers a ready node with room for ten default sessions, heard from at `at`.
        fn node(&mut self, id: &str, at: i64) {
            self.node_with(id, at, Default::default());
        }

        fn node_with(&mut self, id: &str, at: i64, labels: std::collections::BTreeMap<String, String>) {
            let node = NodeRecord {
                images: Default::default(),
                id: id.into(),
                address: format!("{id}:1"),
                capacity: Resources { cpu_millis: 1000, memory_bytes: 1 << 30, slots: 10 },
                labels,
                runtimes: vec![sandfleet_common::spec::Runtime::Process],
                phase: NodePhase::Ready,
                registered_at_ms: at,
                drain: None,
                operator_hold: None,
                agent_hold: None,
            };
            self.apply(Command::RegisterNode { node });
            self.heartbeats.insert(id.into(), at);
        }

        /// Creates a session at `at` (unplaced, or placed on `node`), with its spec changed by `f`.
        fn session(&mut self, id: &str, node: Option<&str>, at: i64, f: impl FnOnce(&mut SpecRecord)) {
            let mut spec = spec();
            f(&mut spec);
            let session = SessionRecord {
                id: id.into(),
                expires_at_ms: at + spec.ttl_seconds as i64 * 1000,
                spec,
                phase: SessionPhase::Pending,
                node_id: node.map(Into::into),
                generation: u64::from(node.is_some()),
                request_id: format!("req-{id}"),
                created_at_ms: at,
                updated_at_ms: at,
                pending_reason: Default::default(),
                message: String::new(),
                restarts: 0,
                not_before_ms: 0,
                moved_from: None,
                renewed_at_ms: 0,
                tenant: sandfleet_common::auth::DEFAULT_TENANT.into(),
                traceparent: String::new(),
                pool: String::new(),
                claimed_at_ms: 0,
            };
            let r = self.apply(Command::CreateSession { session, key_id: None });
            assert!(matches!(r, CommandResponse::Session(_)), "{r:?}");
        }

        /// The session's agent reports it running.
        fn running(&mut self, id: &str) {
            let s = &self.st.sessions[id];
            let node_id = s.node_id.clone().expect("placed");
            let report = Report {
                id: id.into(),
                generation: s.generation,
                phase: SessionPhase::Running,
                message: String::new(),
            };
            self.apply(Command::ReportSessions { node_id, reports: vec![report], now_ms: 0 });
            assert_eq!(self.st.sessions[id].phase, SessionPhase::Running);
        }

        fn liveness(&self, now: i64) -> Vec<Command> {
            self.liveness_at(now, now)
        }

        /// Liveness at `mono` on the monotonic clock and `wall` on the wall clock.
        fn liveness_at(&self, mono: i64, wall: i64) -> Vec<Command> {
            let heard = |&ms: &i64| Heard { at: self.mono(ms), at_ms: ms };
            let heartbeats = self.heartbeats.iter().map(|(id, ms)| (id.clone(), heard(ms))).collect();
            plan_liveness(&self.st, &tunables(), &heartbeats, self.mono(mono), wall)
        }

        fn lifetimes(&self, now: i64) -> Vec<Command> {
            plan_lifetimes(&self.st, &self.activity, self.lead_since, now)
        }

        fn placement(&self, now: i64) -> Vec<Command> {
            plan_placement(&self.st, &tunables(), now)
        }

        /// One whole leader round at `now`, each planner on the state the previous one left.
        fn round(&mut self, now: i64) {
            let cmds = self.liveness(now);
            self.apply_all(cmds);
            let cmds = self.lifetimes(now);
            self.apply_all(cmds);
            let cmds = plan_drains(&self.st, now);
            self.apply_all(cmds);
            let cmds = self.placement(now);
            self.apply_all(cmds);
        }

        fn phase(&self, id: &str) -> (SessionPhase, Option<&str>, u64) {
            let s = &self.st.sessions[id];
            (s.phase, s.node_id.as_deref(), s.generation)
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // ---- liveness ----

    #[test]
    fn a_silent_node_goes_down_after_its_ttl_and_its_sessions_run_elsewhere() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("a", Some("n1"), 0, |_| {});
        c.running("a");
        c.heartbeats.insert("n2".into(), TTL);
        assert!(c.liveness(TTL).is_empty(), "silent for exactly the TTL is still alive");
        let cmds = c.liveness(TTL + 1);
        assert!(
            matches!(&cmds[..], [Command::NodeDown { node_id, now_ms, keep }] if node_id == "n1" && *now_ms == TTL + 1 && keep.is_empty()),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert_eq!(c.st.nodes["n1"].phase, NodePhase::Down);
        assert_eq!(c.phase("a"), (SessionPhase::Lost, None, 1));
        assert!(c.liveness(TTL + 2).is_empty(), "a down node is declared down once");
        c.apply_all(c.placement(TTL + 2));
        assert_eq!(c.phase("a"), (SessionPhase::Pending, Some("n2"), 2), "placed elsewhere with a new generation");
    }

    #[test]
    fn a_new_leader_grants_every_node_a_full_ttl() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.session("a", Some("n1"), 0, |_| {});
        // A new leader heard no heartbeat at all: nodes count as heard now.
        c.heartbeats.clear();
        assert!(c.liveness(100 * TTL).is_empty());
    }

    #[test]
    fn sessions_with_their_own_lost_after_leave_before_or_after_their_node() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        let min = tunables().min_lost_after().as_millis() as i64;
        c.session("short", Some("n1"), 0, |s| s.lost_after_ms = min as u64);
        c.session("default", Some("n1"), 0, |_| {});
        c.session("long", Some("n1"), 0, |s| s.lost_after_ms = 3 * TTL as u64);
        c.heartbeats.insert("n2".into(), FOREVER);
        assert!(c.liveness(min).is_empty());
        let cmds = c.liveness(min + 1);
        assert!(
            matches!(&cmds[..], [Command::SessionsLost { node_id, ids: lost, .. }] if node_id == "n1" && *lost == ids(&["short"])),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert_eq!(c.st.sessions["short"].phase, SessionPhase::Lost);
        let cmds = c.liveness(TTL + 1);
        assert!(
            matches!(&cmds[..], [Command::NodeDown { keep, .. }] if *keep == ids(&["long"])),
            "the node goes down but keeps the session with the longer lost_after: {cmds:?}"
        );
        c.apply_all(cmds);
        assert_eq!(c.st.sessions["default"].phase, SessionPhase::Lost);
        assert_eq!(c.phase("long"), (SessionPhase::Pending, Some("n1"), 1));
        assert!(c.liveness(3 * TTL).is_empty());
        let cmds = c.liveness(3 * TTL + 1);
        assert!(matches!(&cmds[..], [Command::SessionsLost { ids: lost, .. }] if *lost == ids(&["long"])), "{cmds:?}");
        c.apply_all(cmds);
        assert_eq!(c.st.sessions["long"].phase, SessionPhase::Lost);
    }

    #[test]
    fn a_flapping_node_loses_its_sessions_once_and_keeps_what_came_back_in_time() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("long", Some("n1"), 0, |s| s.lost_after_ms = 2 * TTL as u64);
        c.session("a", Some("n1"), 0, |_| {});
        // Heartbeats arrive just inside the TTL, again and again: nothing happens.
        for beat in 1..10 {
            let now = beat * TTL;
            assert!(c.liveness(now).is_empty(), "beat {beat}");
            c.heartbeats.insert("n1".into(), now);
            c.heartbeats.insert("n2".into(), now);
        }
        let t = 9 * TTL;
        // Then one just too late: down, keeping the session with the longer lost_after.
        c.apply_all(c.liveness(t + TTL + 1));
        assert_eq!(c.st.nodes["n1"].phase, NodePhase::Down);
        assert_eq!(c.st.sessions["a"].phase, SessionPhase::Lost);
        // It heartbeats again (the agent service proposes NodeUp) before the kept one's lost_after.
        c.heartbeats.insert("n1".into(), t + TTL + 2);
        c.apply(Command::NodeUp { node_id: "n1".into(), now_ms: t + TTL + 2 });
        assert_eq!(c.st.nodes["n1"].phase, NodePhase::Ready);
        assert!(c.liveness(t + 2 * TTL).is_empty());
        assert_eq!(c.phase("long"), (SessionPhase::Pending, Some("n1"), 1), "kept across the flap");
        // And silent again: down again, and now the kept session goes too once its lost_after passes.
        let again = t + TTL + 2;
        let cmds = c.liveness(again + TTL + 1);
        assert!(matches!(&cmds[..], [Command::NodeDown { keep, .. }] if *keep == ids(&["long"])), "{cmds:?}");
        c.apply_all(cmds);
        let cmds = c.liveness(again + 2 * TTL + 1);
        assert!(matches!(&cmds[..], [Command::SessionsLost { ids: lost, .. }] if *lost == ids(&["long"])), "{cmds:?}");
        c.apply_all(cmds);
        assert_eq!(c.st.sessions["a"].restarts, 1, "lost once, not once per flap");
    }

    #[test]
    fn clock_steps_backwards_change_nothing_and_forwards_act_on_wall_time() {
        let mut c = Cluster::new();
        c.node("n1", 100_000);
        c.session("a", Some("n1"), 100_000, |s| {
            s.ttl_seconds = 60;
            s.idle_timeout_seconds = 10;
        });
        c.running("a");
        c.lead_since = 100_000;
        // The clock steps back an hour: heartbeats look to come from the future, expiry is far.
        for now in [0, 50_000, 99_999] {
            c.round(now);
            assert_eq!(c.st.nodes["n1"].phase, NodePhase::Ready, "at {now}");
            assert_eq!(c.phase("a"), (SessionPhase::Running, Some("n1"), 1), "at {now}");
        }
        // Forwards, within the idle timeout and the node TTL: nothing.
        c.heartbeats.insert("n1".into(), 105_000);
        c.round(109_000);
        assert_eq!(c.phase("a").0, SessionPhase::Running);
        // Forwards past the TTL of the session: it expires, by the TTL, not by idleness.
        let cmds = c.lifetimes(160_000);
        assert!(
            matches!(&cmds[..], [Command::TerminateSessions { ids: ended, message, .. }] if *ended == ids(&["a"]) && message == EXPIRED_TTL),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_wall_clock_step_marks_no_node_silent_and_keeps_none_alive() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("a", Some("n1"), 0, |_| {});
        c.running("a");
        // A second after the last heartbeats, the wall clock steps an hour ahead, or back.
        for wall in [3_600_000, -3_600_000] {
            assert!(c.liveness_at(1_000, wall).is_empty(), "wall clock at {wall}");
        }
        // Silent past the TTL on the monotonic clock: down, whatever the wall clock says
        // (the command carries the wall time).
        c.heartbeats.insert("n2".into(), FOREVER);
        let cmds = c.liveness_at(TTL + 1, -3_600_000);
        assert!(
            matches!(&cmds[..], [Command::NodeDown { node_id, now_ms: -3_600_000, .. }] if node_id == "n1"),
            "{cmds:?}"
        );
    }

    // ---- lifetimes ----

    #[test]
    fn ttls_expire_at_their_time() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.session("a", Some("n1"), 0, |s| s.ttl_seconds = 10);
        c.session("b", None, 0, |s| s.ttl_seconds = 20);
        assert!(c.lifetimes(9_999).is_empty());
        let cmds = c.lifetimes(10_000);
        assert!(
            matches!(&cmds[..], [Command::TerminateSessions { ids: ended, message, now_ms: 10_000, .. }] if *ended == ids(&["a"]) && message == EXPIRED_TTL),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert_eq!(c.st.sessions["a"].phase, SessionPhase::Terminated);
        assert_eq!(c.st.allocated_on("n1").slots, 0);
        // Renewed before its end, b lives on.
        c.apply(Command::RenewSession { id: "b".into(), expires_at_ms: 30_000, now_ms: 15_000, tenant: None });
        assert!(c.lifetimes(20_000).is_empty());
        c.apply_all(c.lifetimes(30_000));
        assert_eq!(c.st.sessions["b"].phase, SessionPhase::Terminated);
        assert!(c.lifetimes(40_000).is_empty(), "ended sessions are not ended again");
    }

    #[test]
    fn idle_sessions_end_and_every_kind_of_use_keeps_them_alive() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        for id in ["idle", "used", "renewed", "never"] {
            c.session(id, Some("n1"), 0, |s| s.idle_timeout_seconds = if id == "never" { 0 } else { 10 });
        }
        c.activity.insert("used".into(), 8_000);
        c.apply(Command::RenewSession { id: "renewed".into(), expires_at_ms: 1 << 40, now_ms: 9_000, tenant: None });
        assert!(c.lifetimes(10_000).is_empty(), "idle for exactly the timeout is not past it");
        let cmds = c.lifetimes(10_001);
        assert!(
            matches!(&cmds[..], [Command::TerminateSessions { ids: ended, message, .. }] if *ended == ids(&["idle"]) && message == EXPIRED_IDLE),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        let cmds = c.lifetimes(19_001);
        assert!(
            matches!(&cmds[..], [Command::TerminateSessions { ids: ended, .. }] if *ended == ids(&["renewed", "used"])),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert!(c.lifetimes(1_000_000).is_empty(), "a session without an idle timeout never idles out");
        assert_eq!(c.st.sessions["never"].phase, SessionPhase::Pending);
    }

    #[test]
    fn a_new_leader_counts_idleness_from_its_own_start() {
        let mut c = Cluster::new();
        c.session("a", None, 0, |s| s.idle_timeout_seconds = 10);
        // The old leader's activity records are gone; the new one led from 50 s.
        c.lead_since = 50_000;
        assert!(c.lifetimes(60_000).is_empty());
        assert_eq!(c.lifetimes(60_001).len(), 1);
    }

    #[test]
    fn a_session_past_both_its_ttl_and_idle_timeout_ends_once_by_ttl() {
        let mut c = Cluster::new();
        c.session("a", None, 0, |s| {
            s.ttl_seconds = 10;
            s.idle_timeout_seconds = 5;
        });
        let cmds = c.lifetimes(20_000);
        assert!(
            matches!(&cmds[..], [Command::TerminateSessions { ids: ended, message, .. }] if *ended == ids(&["a"]) && message == EXPIRED_TTL),
            "{cmds:?}"
        );
    }

    // ---- drains ----

    fn drain(c: &mut Cluster, node: &str, deadline_ms: i64, max_parallel: u32) {
        let drain = DrainRecord { started_at_ms: 0, deadline_ms, max_parallel };
        assert_eq!(c.apply(Command::drain(node.into(), drain)), CommandResponse::Ok);
    }

    /// Places what can be placed and reports every placed session running.
    fn place_and_run(c: &mut Cluster, now: i64) {
        c.apply_all(c.placement(now));
        let placed: Vec<String> =
            c.st.sessions
                .values()
                .filter(|s| s.phase == SessionPhase::Pending && s.node_id.is_some())
                .map(|s| s.id.clone())
                .collect();
        for id in placed {
            c.running(&id);
        }
    }

    #[test]
    fn a_drain_moves_at_most_max_parallel_at_a_time_then_everything_at_its_deadline() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        for id in ["a", "b", "c", "d"] {
            c.session(id, Some("n1"), 0, |_| {});
            c.running(id);
        }
        c.node("n2", 0);
        drain(&mut c, "n1", 100_000, 1);
        let cmds = plan_drains(&c.st, 1_000);
        assert!(
            matches!(&cmds[..], [Command::MoveSessions { node_id, ids: moved, .. }] if node_id == "n1" && *moved == ids(&["a"])),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert!(plan_drains(&c.st, 1_000).is_empty(), "one is on its way");
        c.apply_all(c.placement(1_000));
        assert!(plan_drains(&c.st, 1_000).is_empty(), "placed is not yet running");
        c.running("a");
        assert_eq!(c.phase("a"), (SessionPhase::Running, Some("n2"), 2));
        let cmds = plan_drains(&c.st, 2_000);
        assert!(matches!(&cmds[..], [Command::MoveSessions { ids: moved, .. }] if *moved == ids(&["b"])), "{cmds:?}");
        c.apply_all(cmds);
        // Past the deadline the rest go at once, even with one still moving.
        let cmds = plan_drains(&c.st, 100_000);
        assert!(
            matches!(&cmds[..], [Command::MoveSessions { ids: moved, .. }] if *moved == ids(&["c", "d"])),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        place_and_run(&mut c, 100_000);
        assert!(c.st.sessions.values().all(|s| s.node_id.as_deref() == Some("n2") && s.phase == SessionPhase::Running));
        assert!(plan_drains(&c.st, 200_000).is_empty(), "an empty draining node needs nothing");
    }

    #[test]
    fn a_new_leader_mid_drain_keeps_to_max_parallel() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        for id in ["a", "b", "c"] {
            c.session(id, Some("n1"), 0, |_| {});
            c.running(id);
        }
        drain(&mut c, "n1", 100_000, 2);
        c.apply_all(plan_drains(&c.st, 1_000));
        c.apply_all(c.placement(1_000));
        c.running("a");
        // The old leader is deposed here. The new one has only the replicated
        // state: as a snapshot holds it, with every index rebuilt.
        let mut st: ClusterState = serde_json::from_slice(&serde_json::to_vec(&c.st).unwrap()).unwrap();
        st.rebuild_indexes();
        assert_eq!(st.moving, c.st.moving, "the moving set is rebuilt from the records");
        let cmds = plan_drains(&st, 2_000);
        assert!(
            matches!(&cmds[..], [Command::MoveSessions { ids: moved, .. }] if *moved == ids(&["c"])),
            "b is still moving, so only one more may go: {cmds:?}"
        );
        assert_eq!(
            format!("{cmds:?}"),
            format!("{:?}", plan_drains(&c.st, 2_000)),
            "the same decision as the old leader"
        );
        // An uncordon (by an operator, on any leader) ends the drain.
        c.apply(Command::cordon("n1".into(), false));
        assert!(plan_drains(&c.st, 2_000).is_empty());
    }

    #[test]
    fn a_paused_scheduler_moves_and_places_nothing_and_says_why_once() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("a", Some("n1"), 0, |_| {});
        c.running("a");
        drain(&mut c, "n1", 0, 1);
        c.apply(Command::SetSchedulerPaused { paused: true });
        c.session("b", None, 0, |_| {});
        assert!(plan_drains(&c.st, 1_000).is_empty(), "not even past the drain's deadline");
        let cmds = c.placement(1_000);
        assert!(
            matches!(&cmds[..], [Command::SetPendingReasons { reasons, .. }] if reasons.len() == 1 && reasons[0].0 == "b" && reasons[0].1 == PendingReason::Paused),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        assert!(c.placement(2_000).is_empty(), "the reason is written once");
        c.apply(Command::SetSchedulerPaused { paused: false });
        c.round(3_000);
        assert_eq!(c.phase("b"), (SessionPhase::Pending, Some("n2"), 1));
        assert_eq!(c.phase("a"), (SessionPhase::Pending, Some("n2"), 2), "the drain resumes");
    }

    // ---- placement ----

    #[test]
    fn placement_goes_oldest_first_in_batches_of_placement_batch() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        for (i, id) in ["e", "d", "c", "b", "a"].into_iter().enumerate() {
            c.session(id, None, i as i64, |_| {});
        }
        let t = Tunables { placement_batch: 2, ..tunables() };
        let cmds = plan_placement(&c.st, &t, 10);
        let batches: Vec<Vec<&str>> = cmds
            .iter()
            .map(|cmd| match cmd {
                Command::PlaceSessions { placements, now_ms: 10 } => placements.iter().map(|p| p.id.as_str()).collect(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(batches, [vec!["e", "d"], vec!["c", "b"], vec!["a"]]);
        c.apply_all(cmds);
        assert!(c.st.unplaced.is_empty());
        assert_eq!(c.st.allocated_on("n1").slots, 5);
    }

    #[test]
    fn unplaceable_sessions_get_a_reason_in_one_bounded_entry_and_only_when_it_changes() {
        let mut c = Cluster::new();
        for i in 0..3 {
            c.session(&format!("s{i}"), None, i, |_| {});
        }
        let t = Tunables { placement_batch: 2, ..tunables() };
        let cmds = plan_placement(&c.st, &t, 10);
        assert!(
            matches!(&cmds[..], [Command::SetPendingReasons { reasons, .. }] if reasons.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>() == ["s0", "s1"]
                && reasons.iter().all(|(_, r)| *r == PendingReason::NoNodes)),
            "{cmds:?}"
        );
        c.apply_all(cmds);
        let cmds = plan_placement(&c.st, &t, 20);
        assert!(
            matches!(&cmds[..], [Command::SetPendingReasons { reasons, .. }] if reasons.len() == 1 && reasons[0].0 == "s2"),
            "the others' reason did not change: {cmds:?}"
        );
        c.apply_all(cmds);
        assert!(plan_placement(&c.st, &t, 30).is_empty());
    }

    #[test]
    fn selectors_and_cordons_filter_nodes() {
        let mut c = Cluster::new();
        c.node_with("mars", 0, [("zone".to_string(), "mars".to_string())].into());
        c.node("plain", 0);
        c.session("pinned", None, 0, |s| s.node_selector = [("zone".to_string(), "mars".to_string())].into());
        c.session("nowhere", None, 1, |s| s.node_selector = [("zone".to_string(), "venus".to_string())].into());
        c.apply(Command::cordon("plain".into(), true));
        c.session("any", None, 2, |_| {});
        c.round(10);
        assert_eq!(c.phase("pinned").1, Some("mars"));
        assert_eq!(c.phase("any").1, Some("mars"), "a cordoned node gets no new sessions");
        assert_eq!(c.phase("nowhere").1, None);
        assert!(c.st.sessions["nowhere"].pending_reason.to_string().contains("carries the labels zone=venus"));
        c.apply(Command::cordon("mars".into(), true));
        c.session("later", None, 3, |_| {});
        c.round(20);
        assert_eq!(c.phase("later").1, None);
        assert!(
            c.st.sessions["later"].pending_reason.to_string().starts_with("no node is ready"),
            "{}",
            c.st.sessions["later"].pending_reason
        );
    }

    #[test]
    fn lost_sessions_wait_out_their_backoff_and_fail_out_of_attempts() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("a", Some("n1"), 0, |s| {
            s.backoff_ms = 1_000;
            s.max_attempts = 2;
        });
        c.running("a");
        c.heartbeats.insert("n2".into(), FOREVER);
        c.round(TTL + 1);
        let a = &c.st.sessions["a"];
        assert_eq!((a.phase, a.restarts, a.not_before_ms), (SessionPhase::Lost, 1, TTL + 1 + 1_000));
        c.round(TTL + 1_000);
        assert_eq!(c.phase("a").1, None, "still in its backoff");
        c.round(TTL + 1_001);
        assert_eq!(c.phase("a"), (SessionPhase::Pending, Some("n2"), 2));
        c.running("a");
        // The second loss doubles the backoff.
        c.heartbeats.insert("n1".into(), FOREVER);
        c.heartbeats.insert("n2".into(), 10_000);
        c.apply(Command::NodeUp { node_id: "n1".into(), now_ms: 10_000 });
        c.round(10_000 + TTL + 1);
        assert_eq!(c.st.sessions["a"].not_before_ms, 10_000 + TTL + 1 + 2_000);
        c.round(10_000 + TTL + 2_001);
        assert_eq!(c.phase("a"), (SessionPhase::Pending, Some("n1"), 3));
        // The third loss is past max_attempts = 2: FAILED, never placed again.
        c.heartbeats.insert("n1".into(), 20_000);
        c.round(20_000 + TTL + 1);
        assert_eq!(c.phase("a").0, SessionPhase::Failed);
        assert!(c.placement(1 << 40).is_empty());
    }

    #[test]
    fn a_placement_decided_on_an_old_generation_is_skipped_at_apply() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        c.session("a", None, 0, |_| {});
        let stale = c.placement(10);
        // Before the stale decision commits, another leader places the session
        // (it could equally have been lost and placed again).
        c.apply(Command::PlaceSessions {
            placements: vec![Placement { id: "a".into(), node_id: "n2".into(), expected_generation: 0 }],
            now_ms: 11,
        });
        let placed = c.st.sessions["a"].clone();
        for cmd in stale {
            assert!(matches!(c.apply(cmd), CommandResponse::Sessions(s) if s.is_empty()), "nothing applies");
        }
        assert_eq!(c.st.sessions["a"], placed);
        assert_eq!((placed.node_id.as_deref(), placed.generation), (Some("n2"), 1));
        assert_eq!(c.st.allocated_on("n1").slots + c.st.allocated_on("n2").slots, 1, "held once");
    }

    #[test]
    fn a_round_on_a_full_cluster_never_overcommits_and_places_the_rest_when_room_frees() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        for i in 0..12 {
            c.session(&format!("s{i:02}"), None, i, |_| {});
        }
        c.round(100);
        assert_eq!(c.st.allocated_on("n1").slots, 10);
        let waiting: Vec<&str> = c.st.unplaced.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(waiting, ["s10", "s11"]);
        assert!(c.st.sessions["s10"].pending_reason.to_string().starts_with("waiting for capacity"));
        c.apply(Command::TerminateSessions {
            ids: vec!["s00".into()],
            message: "deleted".into(),
            now_ms: 200,
            tenant: None,
        });
        c.round(200);
        assert_eq!(c.phase("s10").1, Some("n1"));
        assert_eq!(c.phase("s11").1, None);
    }

    #[test]
    fn only_reports_that_can_still_change_the_state_are_proposed() {
        let mut c = Cluster::new();
        c.node("n1", 0);
        c.node("n2", 0);
        for id in ["pending", "running", "failed", "moved"] {
            c.session(id, Some("n1"), 0, |_| {});
        }
        c.running("running");
        let failed = Report { id: "failed".into(), generation: 1, phase: SessionPhase::Failed, message: "boom".into() };
        c.apply(Command::ReportSessions { node_id: "n1".into(), reports: vec![failed], now_ms: 0 });
        c.apply(Command::SessionsLost { node_id: "n1".into(), ids: vec!["moved".into()], now_ms: 0 });
        // Past any restart backoff.
        c.apply_all(c.placement(60_000));
        let moved = &c.st.sessions["moved"];
        assert_eq!(moved.generation, 2, "placed again: {moved:?}");
        let report = |id: &str, generation, phase| Report { id: id.into(), generation, phase, message: String::new() };
        let sent = vec![
            report("pending", 1, SessionPhase::Running), // not applied yet: proposed
            report("running", 1, SessionPhase::Running), // sent again after its commit: left out
            report("running", 1, SessionPhase::Failed),  // a change: proposed
            report("failed", 1, SessionPhase::Running),  // ended: left out
            report("moved", 1, SessionPhase::Running),   // superseded generation: left out
            report("unknown", 1, SessionPhase::Running), // not in this state (yet): proposed
        ];
        let kept = plan_reports(&c.st, "n1", &sent);
        assert_eq!(kept, vec![sent[0].clone(), sent[2].clone(), sent[5].clone()]);
        // The same report from another node is not this node's to skip.
        assert_eq!(plan_reports(&c.st, "n2", &sent[1..2]), vec![sent[1].clone()]);
        // Applying what was kept, then planning the same reports again, keeps nothing but the unknown.
        c.apply(Command::ReportSessions { node_id: "n1".into(), reports: kept, now_ms: 1 });
        assert_eq!(plan_reports(&c.st, "n1", &sent), vec![sent[5].clone()]);
    }
}
