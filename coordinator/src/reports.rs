//! Session reports on the heartbeat path, committed off its critical path.
//!
//! An agent reports each session it started (RUNNING) or could not start
//! (FAILED) with its next heartbeat. While the leader places a large backlog,
//! the log is busy and a report's commit can take most of a second; a
//! heartbeat that waited for it would tell the agent late that it is alive.
//!
//! So an agent that sends uncommitted reports again
//! (`HeartbeatRequest.resend_uncommitted`) gets its answer within
//! [`Tunables::report_wait`](crate::core::Tunables::report_wait), with
//! `reports_committed` saying whether every report it carried is committed.
//! The agent keeps the ones that are not and sends them with its next
//! heartbeat. Nothing is lost when this leader fails before the commit, and
//! nothing applies twice:
//! - [`crate::plan::plan_reports`] leaves out a report already applied (or
//!   stale), so one sent again after its commit proposes nothing;
//! - [`InFlight`] remembers the reports this leader proposed and has not seen
//!   committed yet, so one sent again while its first proposal is in flight
//!   waits for that proposal instead of proposing it a second time;
//! - the state machine applies a report that arrives twice anyway (a new
//!   leader re-proposing what the old one committed) as a no-op.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::core::Core;
use crate::state::{Command, Report, SessionPhase};

/// A report as the agent identifies it.
type Key = (String, u64, SessionPhase);

/// The outcome of one proposal of reports: `None` while in flight, then
/// whether it was committed.
type Outcome = watch::Receiver<Option<bool>>;

/// The report proposals of this member that have not finished, by report.
#[derive(Default)]
pub struct InFlight {
    next: AtomicU64,
    /// Report -> (the proposal carrying it, its outcome).
    proposals: Mutex<HashMap<Key, (u64, Outcome)>>,
}

impl InFlight {
    /// Proposes, in one entry and in their order, the `reports` of `node_id`
    /// that no proposal of this member carries yet, and returns the outcome
    /// of every proposal that carries one of `reports`. `starting` are the
    /// creation times and runtime labels of the sessions whose first RUNNING
    /// report this is, recorded once the commit is through.
    pub fn submit(
        &self,
        core: &Arc<Core>,
        node_id: &str,
        reports: Vec<Report>,
        starting: Vec<(i64, &'static str)>,
    ) -> Vec<Outcome> {
        if reports.is_empty() {
            return Vec::new();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let mut outcomes: Vec<(u64, Outcome)> = Vec::new();
        let mut new = Vec::new();
        {
            let mut proposals = self.proposals.lock();
            for r in reports {
                let key = (r.id.clone(), r.generation, r.phase);
                match proposals.get(&key) {
                    Some((other, outcome)) => {
                        if !outcomes.iter().any(|(o, _)| o == other) {
                            outcomes.push((*other, outcome.clone()));
                        }
                    }
                    None => {
                        proposals.insert(key, (id, rx.clone()));
                        new.push(r);
                    }
                }
            }
        }
        if new.is_empty() {
            return outcomes.into_iter().map(|(_, o)| o).collect();
        }
        outcomes.push((id, rx));
        let keys: Vec<Key> = new.iter().map(|r| (r.id.clone(), r.generation, r.phase)).collect();
        let cmd = Command::ReportSessions { node_id: node_id.to_string(), reports: new, now_ms: crate::now_ms() };
        let core = core.clone();
        let node = node_id.to_string();
        // Bounded by the write's own QUORUM_TIMEOUT, so it always ends.
        tokio::spawn(async move {
            let result = core.propose(cmd).await;
            if let Err(e) = &result {
                tracing::debug!(%node, error = %e, "the reports of a heartbeat were not committed; the agent sends them again");
            }
            {
                let mut proposals = core.reports.proposals.lock();
                for key in keys {
                    if proposals.get(&key).is_some_and(|(p, _)| *p == id) {
                        proposals.remove(&key);
                    }
                }
            }
            let _ = tx.send(Some(result.is_ok()));
            if result.is_ok() {
                let now = crate::now_ms();
                for (created, runtime) in starting {
                    crate::metrics::metrics().create_to_running.record(
                        (now - created).max(0) as f64 / 1000.0,
                        &[opentelemetry::KeyValue::new("runtime", runtime)],
                    );
                }
            }
        });
        outcomes.into_iter().map(|(_, o)| o).collect()
    }
}

/// Waits at most `bound` (`None`: until they end; zero: not at all) for
/// every outcome; true when each proposal was committed.
pub async fn committed(outcomes: Vec<Outcome>, bound: Option<Duration>) -> bool {
    let all = async {
        for mut o in outcomes {
            match o.wait_for(Option::is_some).await {
                Ok(v) if *v == Some(true) => {}
                _ => return false,
            }
        }
        true
    };
    match bound {
        // No wait at all: a zero timeout would still wait for the timer's next tick.
        Some(bound) if bound.is_zero() => futures::FutureExt::now_or_never(all).unwrap_or(false),
        Some(bound) => tokio::time::timeout(bound, all).await.unwrap_or(false),
        None => all.await,
    }
}
