//! When a coordinator reports SERVING on `grpc.health.v1` ([`sandfleet_common::health`]).
//!
//! A member is ready when it can answer the API with current data:
//! 1. a leader is known (so the member belongs to an initialized cluster),
//! 2. the leader confirms a read index with a quorum, and this member has
//!    applied everything up to it: the read barrier every linearizable read
//!    takes ([`Core::read_barrier`]). openraft does not show a follower the
//!    commit index, so "applied up to the commit index it saw" is checked this
//!    way, against the leader's commit index of the moment, at every check;
//! 3. the cluster's token key is committed (agents can register).
//!
//! The check runs every [`READY_INTERVAL`] (every [`NOT_READY_INTERVAL`] while
//! not ready), so a member that loses its leader or its quorum turns
//! NOT_SERVING within about a second and a restarted member turns SERVING
//! once it has caught up. From the shutdown on it stays NOT_SERVING.

use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::health::Health;
use sandfleet_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::core::Core;

/// Between two checks while ready.
pub const READY_INTERVAL: Duration = Duration::from_secs(1);
/// Between two checks while not ready.
pub const NOT_READY_INTERVAL: Duration = Duration::from_millis(250);
/// The longest one check may take (a leader that does not answer is not ready).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether this member is ready, or why not.
pub async fn check(core: &Core) -> Result<(), String> {
    let (leader, initialized) = {
        let m = core.raft.metrics().borrow().clone();
        (m.current_leader, crate::service::raft::initialized(&m))
    };
    let Some(leader) = leader else {
        return Err(if initialized {
            "no leader is elected".into()
        } else {
            "this member does not belong to a cluster yet".into()
        });
    };
    match tokio::time::timeout(CHECK_TIMEOUT, core.read_barrier(pb::ReadConsistency::Linearizable as i32)).await {
        Err(_) => return Err(format!("leader {leader} confirmed no read index within {CHECK_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("not caught up with leader {leader}: {e}")),
        Ok(Ok(())) => {}
    }
    if core.state.read(|s| s.signing_seed.is_empty()) {
        return Err("the cluster's token key is not committed yet".into());
    }
    Ok(())
}

/// Keeps `health` up to date until `shutdown`, then sets it NOT_SERVING.
pub async fn run(core: Arc<Core>, health: Arc<Health>, shutdown: CancellationToken) {
    loop {
        let checked = tokio::select! {
            _ = shutdown.cancelled() => break,
            checked = check(&core) => checked,
        };
        let wait = if checked.is_ok() { READY_INTERVAL } else { NOT_READY_INTERVAL };
        health.set_ready(checked).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    health.shutting_down().await;
}
