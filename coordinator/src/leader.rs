//! The leader's control loop: initialises the cluster key, places pending
//! sessions, and expires sessions past their TTL. It runs on every member and
//! acts only while that member leads; it wakes on every state change and at
//! least every `tick`, and stops with the shutdown token. A step costs what
//! there is to do, not the size of the state: the state keeps ordered indexes
//! of unplaced and expiring sessions.

use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::token::TokenSigner;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::scheduler::{self, Unplaceable};
use crate::state::{Command, CommandResponse, NodePhase};

/// Runs until `shutdown`.
pub async fn run(core: Arc<Core>, tick: Duration, shutdown: CancellationToken) {
    let mut version = core.state.version.subscribe();
    let mut led_term: Option<u64> = None;
    loop {
        if core.is_leader() {
            let term = core.raft.metrics().borrow().current_term;
            if led_term != Some(term) {
                // A new leader knows no heartbeat yet: every node gets a full
                // TTL from now (the grace after a leader change).
                led_term = Some(term);
                let now = crate::now_ms();
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
        core.propose(Command::InitCluster { signing_seed: TokenSigner::generate().seed().to_vec() }).await?;
    }

    // Node liveness: no heartbeat for node_ttl -> NodeDown (sessions LOST, placed again).
    let now = crate::now_ms();
    let ttl = core.tunables.node_ttl.as_millis() as i64;
    let live: Vec<String> =
        core.state.read(|st| st.nodes.values().filter(|n| n.phase != NodePhase::Down).map(|n| n.id.clone()).collect());
    let silent: Vec<(String, i64)> = {
        let mut hb = core.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        live.into_iter()
            .filter_map(|id| {
                let seen = *hb.entry(id.clone()).or_insert(now);
                (now - seen > ttl).then_some((id, now - seen))
            })
            .collect()
    };
    for (node_id, silent_ms) in silent {
        tracing::warn!(node = %node_id, silent_ms, "no heartbeat within the node TTL; declaring the node down");
        if let CommandResponse::Sessions(lost) = core.propose(Command::NodeDown { node_id: node_id.clone(), now_ms: now }).await? {
            if !lost.is_empty() {
                tracing::warn!(node = %node_id, sessions = lost.len(), "sessions lost with their node; placing them again");
            }
        }
    }

    let expired: Vec<String> = core.state.read(|st| st.expired_at(now));
    if !expired.is_empty() {
        tracing::info!(count = expired.len(), "expiring sessions past their ttl");
        core.propose(Command::TerminateSessions { ids: expired, message: "expired (ttl)".into(), now_ms: now }).await?;
    }

    // Place unplaced sessions, oldest first (the index is ordered by creation).
    let pending: Vec<_> = core.state.read(|st| {
        st.unplaced
            .iter()
            .filter_map(|(_, id)| st.sessions.get(id))
            .map(|s| (s.id.clone(), s.generation, s.spec.clone(), s.pending_reason.clone()))
            .collect()
    });
    for (id, generation, spec, reason) in pending {
        let placement = core.state.read(|st| scheduler::place(st, &spec));
        let now = crate::now_ms();
        match placement {
            Ok(node_id) => {
                core.propose(Command::PlaceSession { id, node_id, expected_generation: generation, now_ms: now }).await?;
            }
            Err(Unplaceable::Wait(why) | Unplaceable::Never(why)) if why != reason => {
                core.propose(Command::SetPendingReason { id, reason: why, now_ms: now }).await?;
            }
            Err(_) => {}
        }
    }
    Ok(())
}
