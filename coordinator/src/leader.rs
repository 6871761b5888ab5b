//! The leader's control loop: initialises the cluster key, declares silent
//! nodes down and their sessions lost, expires sessions past their TTL or idle
//! timeout, moves sessions off draining nodes, and places unplaced sessions in
//! batches. It runs on every member and acts only while that member leads; it
//! wakes on every state change and at least every `tick`, and stops with the
//! shutdown token. A step costs what there is to do, not the size of the
//! state: the state keeps ordered indexes of unplaced, expiring, idle-timed
//! and moving sessions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::token::TokenSigner;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::scheduler::{Placer, Unplaceable};
use crate::state::{Command, CommandResponse, NodePhase, Placement};

/// The pending reason of every unplaced session while placement is paused.
pub const PAUSED_REASON: &str = "scheduling is paused by an operator (sandfleet cluster scheduler resume)";

/// Runs until `shutdown`.
pub async fn run(core: Arc<Core>, tick: Duration, shutdown: CancellationToken) {
    let mut version = core.state.version.subscribe();
    let mut led_term: Option<u64> = None;
    let mut last_round = std::time::Instant::now();
    loop {
        if core.is_leader() {
            let term = core.raft.metrics().borrow().current_term;
            // A leader that was itself frozen (SIGSTOP, a stalled VM) heard no
            // heartbeats meanwhile through no fault of the agents: it grants the
            // same grace as a new leader instead of declaring every node down.
            let stalled = last_round.elapsed() > core.tunables.node_ttl / 2;
            if stalled && led_term == Some(term) {
                tracing::warn!(
                    stalled_ms = last_round.elapsed().as_millis() as u64,
                    "the leader loop stalled; granting nodes a fresh TTL"
                );
            }
            if led_term != Some(term) || stalled {
                // A new leader knows no heartbeat yet: every node gets a full
                // TTL from now (the grace after a leader change), and idle
                // timeouts count from now at the earliest.
                led_term = Some(term);
                let now = crate::now_ms();
                core.lead_since_ms.store(now, Ordering::Relaxed);
                let nodes: Vec<String> = core.state.read(|st| st.nodes.keys().cloned().collect());
                let mut hb = core.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
                for n in nodes {
                    hb.insert(n, now);
                }
                tracing::info!(term, "leading: node liveness starts with a full TTL of grace");
            }
            // A step may wait on a write that cannot commit (lost quorum); shutdown must not.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = step(&core) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "leader step failed; retrying");
                    }
                }
            }
        } else {
            led_term = None;
        }
        last_round = std::time::Instant::now();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = core.wake.notified() => {}
            _ = version.changed() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

async fn step(core: &Core) -> Result<(), tonic::Status> {
    if core.state.read(|s| s.signing_seed.is_empty()) {
        core.propose_as_leader(Command::InitCluster { signing_seed: TokenSigner::generate().seed().to_vec() }).await?;
    }
    liveness(core).await?;
    lifetimes(core).await?;
    drains(core).await?;
    place(core).await
}

/// Node liveness. A node silent for `node_ttl` goes down; each of its sessions
/// is LOST once the node has been silent for that session's `lost_after`
/// (the cluster default unless the session set its own).
async fn liveness(core: &Core) -> Result<(), tonic::Status> {
    let now = crate::now_ms();
    let ttl = core.tunables.node_ttl.as_millis() as i64;
    // The shortest silence that can matter: the smallest lost_after allowed.
    let floor = core.tunables.min_lost_after().min(core.tunables.node_ttl).as_millis() as i64;
    let nodes: Vec<(String, NodePhase)> =
        core.state.read(|st| st.nodes.values().map(|n| (n.id.clone(), n.phase)).collect());
    let silent: Vec<(String, NodePhase, i64)> = {
        let mut hb = core.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .into_iter()
            .filter_map(|(id, phase)| {
                let seen = *hb.entry(id.clone()).or_insert(now);
                (now - seen > floor).then_some((id, phase, now - seen))
            })
            .collect()
    };
    for (node_id, phase, silent_ms) in silent {
        // Sessions on the node whose own lost_after has not passed yet are kept.
        let (due, keep): (Vec<String>, Vec<String>) = core.state.read(|st| {
            let ids = st.node_sessions.get(&node_id).cloned().unwrap_or_default();
            ids.into_iter().filter_map(|id| st.sessions.get(&id)).fold(
                (Vec::new(), Vec::new()),
                |(mut due, mut keep), s| {
                    if silent_ms > core.tunables.lost_after_of(&s.spec).as_millis() as i64 {
                        due.push(s.id.clone());
                    } else {
                        keep.push(s.id.clone());
                    }
                    (due, keep)
                },
            )
        });
        if phase != NodePhase::Down && silent_ms > ttl {
            tracing::warn!(node = %node_id, silent_ms, kept = keep.len(), "no heartbeat within the node TTL; declaring the node down");
            let cmd = Command::NodeDown { node_id: node_id.clone(), now_ms: now, keep };
            if let CommandResponse::Sessions(lost) = core.propose_as_leader(cmd).await? {
                if !lost.is_empty() {
                    tracing::warn!(node = %node_id, sessions = lost.len(), "sessions lost with their node; placing them again");
                }
            }
        } else if !due.is_empty() {
            tracing::warn!(node = %node_id, silent_ms, sessions = due.len(), "sessions past their lost_after; placing them again");
            core.propose_as_leader(Command::SessionsLost { node_id, ids: due, now_ms: now }).await?;
        }
    }
    Ok(())
}

/// Session TTLs and idle timeouts.
async fn lifetimes(core: &Core) -> Result<(), tonic::Status> {
    let now = crate::now_ms();
    let expired: Vec<String> = core.state.read(|st| st.expired_at(now));
    if !expired.is_empty() {
        tracing::info!(count = expired.len(), "expiring sessions past their ttl");
        core.propose_as_leader(Command::TerminateSessions {
            ids: expired,
            message: "expired (ttl)".into(),
            now_ms: now,
        })
        .await?;
    }
    let lead_since = core.lead_since_ms.load(Ordering::Relaxed);
    let idle: Vec<String> = {
        let activity = core.activity.lock().unwrap_or_else(|p| p.into_inner());
        core.state.read(|st| {
            st.idle
                .iter()
                .filter_map(|id| st.sessions.get(id))
                .filter(|s| {
                    let last =
                        [s.created_at_ms, s.renewed_at_ms, lead_since, activity.get(&s.id).copied().unwrap_or(0)]
                            .into_iter()
                            .max()
                            .unwrap_or(0);
                    now - last > (s.spec.idle_timeout_seconds as i64) * 1000
                })
                .map(|s| s.id.clone())
                .collect()
        })
    };
    if !idle.is_empty() {
        tracing::info!(count = idle.len(), "ending sessions past their idle timeout");
        let ended = core
            .propose_as_leader(Command::TerminateSessions {
                ids: idle.clone(),
                message: "expired (idle timeout)".into(),
                now_ms: now,
            })
            .await?;
        if matches!(ended, CommandResponse::Sessions(_)) {
            let mut activity = core.activity.lock().unwrap_or_else(|p| p.into_inner());
            for id in idle {
                activity.remove(&id);
            }
        }
    }
    Ok(())
}

/// Moves sessions off draining nodes: at most `max_parallel` of a node's
/// sessions are on their way at a time; past the deadline, all of them go.
async fn drains(core: &Core) -> Result<(), tonic::Status> {
    // A moved session needs a placement; while placement is paused it stays where it is.
    if core.state.read(|st| st.scheduler_paused) {
        return Ok(());
    }
    let now = crate::now_ms();
    let moves: Vec<(String, Vec<String>)> = core.state.read(|st| {
        st.nodes
            .values()
            .filter(|n| n.phase == NodePhase::Draining)
            .filter_map(|n| {
                let drain = n.drain?;
                let on_node = st.node_sessions.get(&n.id)?;
                let moving = st.moving.get(&n.id).map_or(0, |m| m.len());
                let allowed = if now >= drain.deadline_ms {
                    on_node.len()
                } else {
                    (drain.max_parallel as usize).saturating_sub(moving)
                };
                let ids: Vec<String> = on_node.iter().take(allowed).cloned().collect();
                (!ids.is_empty()).then(|| (n.id.clone(), ids))
            })
            .collect()
    });
    for (node_id, ids) in moves {
        tracing::info!(node = %node_id, sessions = ids.len(), "moving sessions off a draining node");
        core.propose_as_leader(Command::MoveSessions { node_id, ids, now_ms: now }).await?;
    }
    Ok(())
}

/// Places unplaced sessions, oldest first (the index is ordered by creation),
/// in batches of up to `placement_batch` per Raft entry. Sessions that fit
/// nowhere get their reason recorded, also in one entry. While an operator
/// has paused placement, sessions only get that as their reason.
async fn place(core: &Core) -> Result<(), tonic::Status> {
    let now = crate::now_ms();
    let reason_budget = core.tunables.placement_batch.max(1);
    let (placements, reasons) = core.state.read(|st| {
        let mut placer = Placer::new(st, core.tunables.placement);
        let mut placements = Vec::new();
        let mut reasons = Vec::new();
        for (_, id) in &st.unplaced {
            let Some(s) = st.sessions.get(id) else { continue };
            if st.scheduler_paused {
                if s.pending_reason != PAUSED_REASON && reasons.len() < reason_budget {
                    reasons.push((id.clone(), PAUSED_REASON.to_string()));
                }
                continue;
            }
            // Lost sessions in restart backoff wait; the tick brings the loop back.
            if s.not_before_ms > now {
                continue;
            }
            match placer.place(&s.spec) {
                Ok(node_id) => {
                    placements.push(Placement { id: id.clone(), node_id, expected_generation: s.generation })
                }
                Err(Unplaceable::Wait(why) | Unplaceable::Never(why)) => {
                    // At most one entry of reasons per round, oldest sessions first:
                    // while nodes come and go every waiting session's reason (its
                    // counts) changes each round, and rewriting all of them through
                    // Raft every round would crowd out the placements themselves.
                    if why != s.pending_reason && reasons.len() < reason_budget {
                        reasons.push((id.clone(), why));
                    }
                }
            }
        }
        (placements, reasons)
    });
    let batch = core.tunables.placement_batch.max(1);
    for chunk in placements.chunks(batch) {
        core.propose_as_leader(Command::PlaceSessions { placements: chunk.to_vec(), now_ms: now }).await?;
    }
    for chunk in reasons.chunks(batch) {
        core.propose_as_leader(Command::SetPendingReasons { reasons: chunk.to_vec(), now_ms: now }).await?;
    }
    Ok(())
}
