//! The leader's control loop: initialises the cluster key, declares silent
//! nodes down and their sessions lost, expires sessions past their TTL or idle
//! timeout, moves sessions off draining nodes, keeps warm pools within their
//! bounds, and places unplaced sessions in batches. The decisions are the pure planners of [`crate::plan`]; this loop
//! reads the clocks and the state, calls them and proposes what they return.
//! Node silence is measured on the monotonic clock ([`Heard`]); the wall
//! clock stamps the commands and meets the replicated deadlines.
//! It runs on every member and acts only while that member leads; it
//! wakes on every state change and at least every `tick`, and stops with the
//! shutdown token. A step costs what there is to do, not the size of the
//! state: the state keeps ordered indexes of unplaced, expiring, idle-timed
//! and moving sessions. The planners driven by the clocks alone (node
//! liveness, TTL and idle expiry) run at most once per `tick`: a change to
//! the state does not make their work due, and their round walks every node
//! and every idle-timed session, which on every applied entry would make each
//! write cost the size of the fleet.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::token::TokenSigner;
use tokio_util::sync::CancellationToken;

use crate::core::{Core, Heard};
use crate::error::CoreError;
use crate::plan;
use crate::state::{Command, CommandResponse};

/// Runs until `shutdown`.
pub async fn run(core: Arc<Core>, tick: Duration, shutdown: CancellationToken) {
    let mut version = core.state.version.subscribe();
    let mut led_term: Option<u64> = None;
    let mut last_round = std::time::Instant::now();
    // When the clock-driven planners last ran (None: due now).
    let mut timed_at: Option<std::time::Instant> = None;
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
                timed_at = None;
                let now = Heard::now();
                core.lead_since_ms.store(now.at_ms, Ordering::Relaxed);
                let nodes: Vec<String> = core.state.read(|st| st.nodes.keys().cloned().collect());
                let mut hb = core.heartbeats.lock();
                for n in nodes {
                    hb.insert(n, now);
                }
                tracing::info!(term, "leading: node liveness starts with a full TTL of grace");
            }
            let timed = timed_at.is_none_or(|at| at.elapsed() >= tick);
            if timed {
                timed_at = Some(std::time::Instant::now());
            }
            // A step may wait on a write that cannot commit (lost quorum); shutdown must not.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = step(&core, timed) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "leader step failed; retrying");
                    }
                }
            }
        } else {
            led_term = None;
            timed_at = None;
        }
        last_round = std::time::Instant::now();
        // Until the clock-driven planners are due again, or a change comes.
        let due_in = timed_at.map_or(tick, |at| tick.saturating_sub(at.elapsed()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = core.wake.notified() => {}
            _ = version.changed() => {}
            _ = tokio::time::sleep(due_in) => {}
        }
    }
}

/// One round of the leader's planners; `timed`: the clock-driven ones too.
async fn step(core: &Core, timed: bool) -> Result<(), CoreError> {
    if core.state.read(|s| s.signing_seed.is_empty()) {
        core.propose_as_leader(Command::InitCluster { signing_seed: TokenSigner::generate().seed().to_vec() }).await?;
    }
    if timed {
        step_timed(core).await?;
    }
    step_changes(core).await
}

/// Node liveness, then TTL and idle expiry: work that only the clocks make due.
async fn step_timed(core: &Core) -> Result<(), CoreError> {
    // Each round reads the state as the previous round's commands left it.
    // Silence is measured on the monotonic clock; commands carry the wall time.
    let now = Heard::now();
    let planned = {
        let mut hb = core.heartbeats.lock();
        core.state.read(|st| {
            // A node this leader never heard from gets a full TTL from now.
            for id in st.nodes.keys() {
                hb.entry(id.clone()).or_insert(now);
            }
            plan::plan_liveness(st, &core.tunables, &hb, now.at, now.at_ms)
        })
    };
    propose_all(core, planned).await?;

    let now = crate::now_ms();
    let lead_since = core.lead_since_ms.load(Ordering::Relaxed);
    let planned = {
        let activity = core.activity.lock();
        core.state.read(|st| plan::plan_lifetimes(st, &activity, lead_since, now))
    };
    propose_all(core, planned).await.map(|_| ())
}

/// Drains, warm pools and placement: work that changes to the state make due.
async fn step_changes(core: &Core) -> Result<(), CoreError> {
    let now = crate::now_ms();
    propose_all(core, core.state.read(|st| plan::plan_drains(st, now))).await?;

    // Warm pools: refill (placed by this same step's placement round) or shrink.
    let now = crate::now_ms();
    let mut new_id = sandfleet_common::ids::new_session_id;
    propose_all(core, core.state.read(|st| plan::plan_pools(st, now, &mut new_id))).await?;

    let now = crate::now_ms();
    let started = std::time::Instant::now();
    let planned = core.state.read(|st| plan::plan_placement(st, &core.tunables, now));
    if planned.is_empty() {
        return Ok(());
    }
    let placed = propose_pipelined(core, planned).await;
    let m = crate::metrics::metrics();
    m.placement_round.record(started.elapsed().as_secs_f64(), &[]);
    let count = *placed.as_ref().unwrap_or(&0);
    m.placement_round_placements.record(count, &[]);
    m.placements.add(count, &[]);
    placed.map(|_| ())
}

/// Proposes planned commands in order, stopping at the first that fails, and
/// logs what each did. Returns how many sessions the committed PlaceSessions
/// entries placed.
async fn propose_all(core: &Core, commands: Vec<Command>) -> Result<u64, CoreError> {
    let mut placed = 0;
    for cmd in commands {
        let placing = matches!(cmd, Command::PlaceSessions { .. });
        log_planned(&cmd);
        let ended = match &cmd {
            Command::TerminateSessions { ids, .. } => ids.clone(),
            _ => Vec::new(),
        };
        let node_down = match &cmd {
            Command::NodeDown { node_id, .. } => Some(node_id.clone()),
            _ => None,
        };
        let _placement_spans = placement_spans(core, &cmd);
        let response = core.propose_as_leader(cmd).await?;
        if let (true, CommandResponse::Sessions(sessions)) = (placing, &response) {
            placed += sessions.len() as u64;
        }
        if let CommandResponse::Sessions(sessions) = response {
            if let Some(node) = node_down.filter(|_| !sessions.is_empty()) {
                tracing::warn!(node = %node, sessions = sessions.len(), "sessions lost with their node; placing them again");
            }
            // Ended sessions need no activity record any more.
            if !ended.is_empty() {
                let mut activity = core.activity.lock();
                for id in &ended {
                    activity.remove(id);
                }
            }
        }
    }
    Ok(placed)
}

/// Proposes a round's `PlaceSessions` batches all at once: they touch
/// disjoint sessions and each re-checks capacity at apply, so their order does
/// not matter, and Raft replicates and fsyncs them together instead of one
/// round trip after another. Returns how many sessions they placed; the first
/// error, if any, once every proposal has ended.
async fn propose_pipelined(core: &Core, commands: Vec<Command>) -> Result<u64, CoreError> {
    let proposals = commands.into_iter().map(|cmd| async move {
        let _placement_spans = placement_spans(core, &cmd);
        match core.propose_as_leader(cmd).await? {
            CommandResponse::Sessions(sessions) => Ok(sessions.len() as u64),
            _ => Ok(0),
        }
    });
    let mut placed = 0;
    let mut first_err = None;
    for r in futures::future::join_all(proposals).await {
        match r {
            Ok(n) => placed += n,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if placed == 0 => Err(e),
        Some(e) => {
            tracing::debug!(error = %e, placed, "a placement batch failed; the next round retries it");
            Ok(placed)
        }
        None => Ok(placed),
    }
}

/// One `placement` span per traced session of a placement batch, each in the
/// trace of the session's create (its stored `traceparent`): a round places
/// sessions of many traces, so no span of the round could be their parent.
/// They last while the batch is proposed. None when spans are not exported.
fn placement_spans(core: &Core, cmd: &Command) -> Vec<tracing::Span> {
    let Command::PlaceSessions { placements, .. } = cmd else { return Vec::new() };
    if !sandfleet_common::trace_context::enabled() {
        return Vec::new();
    }
    core.state.read(|st| {
        placements
            .iter()
            .filter_map(|p| {
                let s = st.sessions.get(&p.id).filter(|s| !s.traceparent.is_empty())?;
                let span = tracing::info_span!(parent: None, "placement", session = %p.id, node = %p.node_id);
                sandfleet_common::trace_context::set_parent(&span, &s.traceparent);
                Some(span)
            })
            .collect()
    })
}

fn log_planned(cmd: &Command) {
    match cmd {
        Command::NodeDown { node_id, keep, .. } => {
            tracing::warn!(node = %node_id, kept = keep.len(), "no heartbeat within the node TTL; declaring the node down")
        }
        Command::SessionsLost { node_id, ids, .. } => {
            tracing::warn!(node = %node_id, sessions = ids.len(), "sessions past their lost_after; placing them again")
        }
        Command::TerminateSessions { ids, message, .. } => {
            tracing::info!(count = ids.len(), message = %message, "ending sessions past their lifetime")
        }
        Command::MoveSessions { node_id, ids, .. } => {
            tracing::info!(node = %node_id, sessions = ids.len(), "moving sessions off a draining node")
        }
        _ => {}
    }
}
