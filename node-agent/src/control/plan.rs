//! The agent's decisions as pure functions: [`plan_reconcile`] (an
//! assignment set against the local sessions) and [`plan_fence`] (what a
//! cut-off agent stops by itself). Neither reads a clock, takes a lock or
//! touches the runtime: the control loop in [`super`] passes the time in and
//! carries out the [`Action`]s, and the tests below drive them with an
//! injected clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use sandfleet_proto::v1 as pb;

use super::LocalSession;

/// How long past its end a cut-off agent lets a session run before it ends
/// it itself (the coordinators' clocks may differ a little from ours).
pub const SELF_EXPIRY_GRACE_MS: i64 = 1000;

/// One step of bringing the local sessions in line with an assignment set.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a handful per round, consumed at once
pub enum Action {
    /// Not assigned here any more: remove it and take it off this node.
    Stop(String),
    /// Assigned at the generation held: keep it, with this updated record
    /// (new expiry and limits; a renewal restarts the idle clock).
    Update(String, LocalSession),
    /// Assigned and not held at this generation: record it and start it.
    Start(pb::Assignment),
}

/// What to do with an assignment set computed at Raft index `version`, given
/// the newest index already followed. `None`: ignore the whole set, because
/// it is older than one already followed (from a lagging coordinator;
/// following it would stop sessions placed here since, and start them again
/// empty), or it was pushed by a watch stream while the agent is fenced (only
/// a heartbeat, answered with a quorum, may restart sessions).
///
/// Otherwise the actions, stops first (by id), then the assigned sessions by
/// id. A session held at a newer generation than assigned is left alone: the
/// message is stale.
pub fn plan_reconcile(
    assignments: &[pb::Assignment],
    version: u64,
    followed: u64,
    pushed_while_fenced: bool,
    local: &HashMap<String, LocalSession>,
    now_ms: i64,
) -> Option<Vec<Action>> {
    if pushed_while_fenced || version < followed {
        return None;
    }
    let desired: BTreeMap<&str, &pb::Assignment> = assignments.iter().map(|a| (a.session_id.as_str(), a)).collect();
    let mut stops: Vec<&String> = local.keys().filter(|id| !desired.contains_key(id.as_str())).collect();
    stops.sort();
    let mut actions: Vec<Action> = stops.into_iter().map(|id| Action::Stop(id.clone())).collect();
    for (id, a) in desired {
        match local.get(id) {
            Some(held) if held.generation == a.generation => {
                let fresh = LocalSession::new(a, now_ms);
                let mut next = held.clone();
                if held.expires_at_ms != a.expires_at_ms {
                    // Renewed: renewal also restarts the idle clock.
                    next.last_active_ms = held.last_active_ms.max(now_ms);
                }
                next.expires_at_ms = a.expires_at_ms;
                next.fence_after_ms = fresh.fence_after_ms;
                next.idle_timeout_ms = fresh.idle_timeout_ms;
                next.tenant = fresh.tenant;
                actions.push(Action::Update(id.to_string(), next));
            }
            Some(held) if held.generation > a.generation => {} // stale assignment message
            _ => actions.push(Action::Start(a.clone())),
        }
    }
    Some(actions)
}

/// The assignment set a WatchAssignments stream has pushed so far: the first
/// push is the full set, and with `deltas` requested the later ones change it.
#[derive(Debug, Default)]
pub struct PushedSet {
    /// None before the stream's first push.
    set: Option<BTreeMap<String, pb::Assignment>>,
}

/// A push that cannot follow the pushes before it (a broken stream).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("assignment stream: a delta came before the first full set")]
pub struct DeltaBeforeFullSet;

impl PushedSet {
    /// Follows `push` and returns the node's full set as it now stands (by session id).
    pub fn follow(&mut self, push: pb::HeartbeatResponse) -> Result<Vec<pb::Assignment>, DeltaBeforeFullSet> {
        let set = match (&mut self.set, push.delta) {
            (None, true) => return Err(DeltaBeforeFullSet),
            (Some(set), true) => {
                for id in &push.removed_session_ids {
                    set.remove(id);
                }
                set
            }
            (slot, false) => slot.insert(BTreeMap::new()),
        };
        set.extend(push.assignments.into_iter().map(|a| (a.session_id.clone(), a)));
        Ok(set.values().cloned().collect())
    }
}

/// Why a cut-off agent stops a session by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Its fence time passed: the cluster is about to place it elsewhere.
    Fencing,
    /// Past its TTL, which the coordinators cannot enforce from afar.
    Expired,
    /// Past its idle timeout, likewise.
    Idle,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cut::Fencing => "cut off from a coordinator quorum (fencing)",
            Cut::Expired => "past its ttl while cut off",
            Cut::Idle => "past its idle timeout while cut off",
        })
    }
}

/// What [`plan_fence`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fence {
    /// Enter the fenced state (ignore assignment pushes until a heartbeat
    /// succeeds); set only when the agent is not fenced yet.
    pub enter: bool,
    /// Sessions to stop, by id, with the reason.
    pub stop: Vec<(String, Cut)>,
}

/// The inputs of [`plan_fence`] that are not the sessions.
#[derive(Debug, Clone, Copy)]
pub struct Contact {
    /// Stop every session after this long without contact, as the cluster
    /// said at registration; 0 = not registered yet (nothing to enforce).
    pub node_fence_ms: u64,
    /// The heartbeat interval the cluster asked for.
    pub heartbeat_ms: u64,
    /// Time since a leader with a quorum last answered (a monotonic clock).
    pub silent_ms: u64,
    /// True when already fenced.
    pub fenced: bool,
}

/// Enforces what the cluster cannot while this agent is cut off from a
/// quorum: a session whose fence time (its own, or the node's) has passed is
/// stopped, because the cluster is about to place it elsewhere and two live
/// copies must never run; and a session past its TTL or idle timeout (by the
/// wall clock `now_ms`, with [`SELF_EXPIRY_GRACE_MS`]) is ended, as the
/// coordinators would have done. Connected agents (silent for less than two
/// heartbeats) leave all this to the coordinators. `None`: nothing to do.
pub fn plan_fence(local: &HashMap<String, LocalSession>, contact: Contact, now_ms: i64) -> Option<Fence> {
    let Contact { node_fence_ms, heartbeat_ms, silent_ms, fenced } = contact;
    if node_fence_ms == 0 || silent_ms < heartbeat_ms.saturating_mul(2) {
        return None;
    }
    let mut stop: Vec<(String, Cut)> = local
        .iter()
        .filter_map(|(id, s)| {
            let fence = if s.fence_after_ms == 0 { node_fence_ms } else { s.fence_after_ms };
            let why = if silent_ms >= fence {
                Cut::Fencing
            } else if s.expires_at_ms > 0 && now_ms > s.expires_at_ms + SELF_EXPIRY_GRACE_MS {
                Cut::Expired
            } else if s.idle_timeout_ms > 0
                && now_ms - s.last_active_ms > s.idle_timeout_ms as i64 + SELF_EXPIRY_GRACE_MS
            {
                Cut::Idle
            } else {
                return None;
            };
            Some((id.clone(), why))
        })
        .collect();
    stop.sort_by(|a, b| a.0.cmp(&b.0));
    // Past the node's fence time (or having fenced any session), assignment
    // pushes from a possibly stale coordinator are ignored until a heartbeat
    // that a quorum backs succeeds.
    let fence = silent_ms >= node_fence_ms || stop.iter().any(|(_, why)| *why == Cut::Fencing);
    if stop.is_empty() && (!fence || fenced) {
        return None;
    }
    Some(Fence { enter: fence && !fenced, stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::LocalPhase;

    fn assignment(id: &str, generation: u64, expires_at_ms: i64) -> pb::Assignment {
        pb::Assignment {
            session_id: id.into(),
            generation,
            expires_at_ms,
            spec: Some(pb::SessionSpec { idle_timeout_seconds: 30, ..Default::default() }),
            ..Default::default()
        }
    }

    /// A full set replaces, a delta changes only what it names, and a delta
    /// before any full set is refused.
    #[test]
    fn a_pushed_set_follows_full_sets_and_deltas() {
        let push = |delta: bool, assignments: Vec<pb::Assignment>, removed: &[&str]| pb::HeartbeatResponse {
            assignments,
            assignments_version: 1,
            reports_committed: false,
            delta,
            removed_session_ids: removed.iter().map(|s| s.to_string()).collect(),
        };
        let ids =
            |set: &[pb::Assignment]| set.iter().map(|a| (a.session_id.clone(), a.expires_at_ms)).collect::<Vec<_>>();
        let mut set = PushedSet::default();
        assert_eq!(set.follow(push(true, vec![assignment("a", 1, 5)], &[])), Err(DeltaBeforeFullSet));
        let full = set.follow(push(false, vec![assignment("b", 1, 5), assignment("a", 1, 5)], &[])).unwrap();
        assert_eq!(ids(&full), [("a".into(), 5), ("b".into(), 5)]);
        let changed = set.follow(push(true, vec![assignment("a", 1, 9), assignment("c", 2, 5)], &["b"])).unwrap();
        assert_eq!(ids(&changed), [("a".into(), 9), ("c".into(), 5)]);
        let unknown = set.follow(push(true, vec![], &["zz"])).unwrap();
        assert_eq!(ids(&unknown), ids(&changed), "removing a session the set lacks changes nothing");
        let replaced = set.follow(push(false, vec![assignment("d", 1, 5)], &[])).unwrap();
        assert_eq!(ids(&replaced), [("d".into(), 5)], "a full set replaces everything");
    }

    fn local_session(generation: u64, expires_at_ms: i64, last_active_ms: i64) -> LocalSession {
        LocalSession {
            generation,
            phase: LocalPhase::Ready,
            expires_at_ms,
            fence_after_ms: 0,
            idle_timeout_ms: 0,
            last_active_ms,
            tenant: sandfleet_common::auth::DEFAULT_TENANT.into(),
        }
    }

    fn local(v: &[(&str, LocalSession)]) -> HashMap<String, LocalSession> {
        v.iter().map(|(id, s)| (id.to_string(), s.clone())).collect()
    }

    #[test]
    fn a_new_assignment_starts_and_an_unassigned_session_stops() {
        let held = local(&[("old", local_session(1, 10_000, 0))]);
        let got = plan_reconcile(&[assignment("new", 1, 10_000)], 5, 4, false, &held, 100).unwrap();
        assert_eq!(got, [Action::Stop("old".into()), Action::Start(assignment("new", 1, 10_000))]);
        assert_eq!(plan_reconcile(&[], 5, 4, false, &HashMap::new(), 100).unwrap(), Vec::<Action>::new());
    }

    #[test]
    fn a_newer_generation_starts_again_and_an_older_one_is_a_stale_message() {
        let held = local(&[("a", local_session(3, 10_000, 0))]);
        let got = plan_reconcile(&[assignment("a", 4, 10_000)], 5, 4, false, &held, 100).unwrap();
        assert_eq!(got, [Action::Start(assignment("a", 4, 10_000))]);
        let got = plan_reconcile(&[assignment("a", 2, 10_000)], 5, 4, false, &held, 100).unwrap();
        assert_eq!(got, Vec::<Action>::new(), "the held newer copy is neither restarted nor stopped");
    }

    #[test]
    fn the_held_generation_takes_new_limits_and_a_renewal_restarts_the_idle_clock() {
        let held = local(&[("a", local_session(1, 10_000, 50))]);
        let mut a = assignment("a", 1, 10_000);
        a.fence_after_ms = 2_500;
        let got = plan_reconcile(&[a.clone()], 5, 4, false, &held, 100).unwrap();
        let expected = LocalSession { fence_after_ms: 2_500, idle_timeout_ms: 30_000, ..held["a"].clone() };
        assert_eq!(got, [Action::Update("a".into(), expected.clone())], "same expiry: the idle clock keeps its time");
        a.expires_at_ms = 20_000;
        let got = plan_reconcile(&[a], 5, 4, false, &held, 100).unwrap();
        let renewed = LocalSession { expires_at_ms: 20_000, last_active_ms: 100, ..expected };
        assert_eq!(got, [Action::Update("a".into(), renewed)]);
        // A renewal seen with a clock that stepped back keeps the later activity.
        let got = plan_reconcile(&[assignment("a", 1, 30_000)], 5, 4, false, &held, 10).unwrap();
        assert!(matches!(&got[..], [Action::Update(_, s)] if s.last_active_ms == 50), "{got:?}");
    }

    #[test]
    fn an_older_assignment_set_is_ignored_by_its_raft_index() {
        let held = local(&[("a", local_session(1, 10_000, 0))]);
        assert_eq!(plan_reconcile(&[], 4, 5, false, &held, 100), None, "a lagging coordinator's set");
        assert_eq!(
            plan_reconcile(&[], 5, 5, false, &held, 100),
            Some(vec![Action::Stop("a".into())]),
            "the same index again is followed (a heartbeat's answer after a push)"
        );
    }

    #[test]
    fn a_set_pushed_while_fenced_is_ignored() {
        let held = HashMap::new();
        assert_eq!(plan_reconcile(&[assignment("a", 1, 10_000)], 9, 1, true, &held, 100), None);
    }

    fn contact(silent_ms: u64) -> Contact {
        Contact { node_fence_ms: 3_000, heartbeat_ms: 500, silent_ms, fenced: false }
    }

    #[test]
    fn nothing_is_enforced_before_registration_or_while_connected() {
        let held = local(&[("a", local_session(1, 10, 0))]);
        assert_eq!(plan_fence(&held, Contact { node_fence_ms: 0, ..contact(1 << 40) }, 1 << 40), None);
        assert_eq!(plan_fence(&held, contact(999), 1 << 40), None, "the coordinators expire it, not the agent");
    }

    #[test]
    fn coordinator_silence_past_the_fence_time_stops_every_session_and_fences() {
        let held = local(&[("a", local_session(1, 1 << 40, 0)), ("b", local_session(2, 1 << 40, 0))]);
        assert_eq!(plan_fence(&held, contact(2_999), 100), None);
        let got = plan_fence(&held, contact(3_000), 100).unwrap();
        assert_eq!(got, Fence { enter: true, stop: vec![("a".into(), Cut::Fencing), ("b".into(), Cut::Fencing)] });
        // Once fenced with nothing left, there is nothing more to do.
        assert_eq!(plan_fence(&HashMap::new(), Contact { fenced: true, ..contact(10_000) }, 100), None);
        // Cut off with no session at all, it still fences (pushes are ignored from now on).
        assert_eq!(plan_fence(&HashMap::new(), contact(3_000), 100), Some(Fence { enter: true, stop: vec![] }));
    }

    #[test]
    fn a_session_with_a_shorter_lost_after_is_fenced_first() {
        let short = LocalSession { fence_after_ms: 1_500, ..local_session(1, 1 << 40, 0) };
        let held = local(&[("short", short), ("a", local_session(1, 1 << 40, 0))]);
        let got = plan_fence(&held, contact(1_500), 100).unwrap();
        assert_eq!(got, Fence { enter: true, stop: vec![("short".into(), Cut::Fencing)] });
    }

    #[test]
    fn a_cut_off_agent_ends_expired_sessions_after_a_grace() {
        let held = local(&[("a", local_session(1, 10_000, 9_999))]);
        assert_eq!(plan_fence(&held, contact(1_000), 11_000), None, "within the grace");
        let got = plan_fence(&held, contact(1_000), 11_001).unwrap();
        assert_eq!(
            got,
            Fence { enter: false, stop: vec![("a".into(), Cut::Expired)] },
            "not a fence: pushes still count"
        );
        let no_ttl = local(&[("a", local_session(1, 0, 1 << 40))]);
        assert_eq!(plan_fence(&no_ttl, contact(1_000), 1 << 41), None, "no expiry known (rediscovered): never");
    }

    #[test]
    fn a_cut_off_agent_ends_idle_sessions_after_a_grace() {
        let idle = LocalSession { idle_timeout_ms: 5_000, ..local_session(1, 1 << 40, 10_000) };
        let held = local(&[("a", idle)]);
        assert_eq!(plan_fence(&held, contact(1_000), 16_000), None);
        let got = plan_fence(&held, contact(1_000), 16_001).unwrap();
        assert_eq!(got.stop, [("a".to_string(), Cut::Idle)]);
        assert_eq!(Cut::Idle.to_string(), "past its idle timeout while cut off");
    }

    #[test]
    fn the_wall_clock_stepping_does_not_fence_and_a_monotonic_silence_does() {
        let held = local(&[("a", local_session(1, 100_000, 90_000))]);
        // The wall clock steps back an hour while cut off: nothing expires.
        assert_eq!(plan_fence(&held, contact(1_000), 100_000 - 3_600_000), None);
        // It jumps forward a day while connected: the coordinators decide, not the agent.
        assert_eq!(plan_fence(&held, contact(0), 100_000 + 86_400_000), None);
        // Fencing follows the monotonic silence whatever the wall clock says.
        let got = plan_fence(&held, contact(3_000), 0).unwrap();
        assert_eq!(got.stop, [("a".to_string(), Cut::Fencing)]);
    }
}
