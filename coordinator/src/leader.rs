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
use crate::state::Command;

/// Runs until `shutdown`.
pub async fn run(core: Arc<Core>, tick: Duration, shutdown: CancellationToken) {
    let mut version = core.state.version.subscribe();
    loop {
        if core.is_leader() {
            // A step may wait on a write that cannot commit (lost quorum); shutdown must not.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = step(&core) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "leader step failed; retrying");
                    }
                }
            }
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

    let now = crate::now_ms();
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
