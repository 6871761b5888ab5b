//! The agent's metrics (`docs/operations.md` lists them with their meaning).
//! Instruments come from [`sandfleet_common::metrics::meter`]:
//! - the recorded ones ([`Metrics`], one set per process, made on first use)
//!   are updated where things happen: the sandbox start, the exec service,
//!   the heartbeat loop, the reconcile, fencing and the workspace syncer;
//! - the observed ones ([`observe`]) are read from the agent's state when
//!   `/metrics` is scraped (or the OTLP reader collects).
//!
//! Labels are bounded: the runtime's name, a result, a direction or a reason;
//! never a session id.

use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, ObservableCounter, ObservableGauge};
use opentelemetry::KeyValue;
use sandfleet_common::metrics::{latency_histogram, meter};

use crate::control::AgentState;
use crate::runtime::ExitInfo;

/// The recorded instruments.
pub struct Metrics {
    /// `sandfleet_agent_sandbox_prepare_duration_seconds{runtime}`.
    pub prepare: Histogram<f64>,
    /// `sandfleet_agent_sandbox_start_duration_seconds{runtime}`.
    pub start: Histogram<f64>,
    /// `sandfleet_agent_exec_duration_seconds{runtime}`.
    pub exec: Histogram<f64>,
    /// `sandfleet_agent_execs_total{runtime, result}`.
    pub execs: Counter<u64>,
    /// `sandfleet_agent_exec_output_capped_total{runtime}`.
    pub output_capped: Counter<u64>,
    /// `sandfleet_agent_heartbeat_rtt_seconds`.
    pub heartbeat_rtt: Histogram<f64>,
    /// `sandfleet_agent_heartbeat_failures_total`.
    pub heartbeat_failures: Counter<u64>,
    /// `sandfleet_agent_heartbeat_reports_resent_total`.
    pub reports_resent: Counter<u64>,
    /// `sandfleet_agent_sessions_fenced_total{reason}`.
    pub fenced: Counter<u64>,
    /// `sandfleet_agent_workspace_transfer_bytes_total{direction}`.
    pub transfer_bytes: Counter<u64>,
    /// `sandfleet_agent_workspace_transfer_duration_seconds{direction}`.
    pub transfer: Histogram<f64>,
    /// `sandfleet_agent_workspace_transfer_failures_total{direction}`.
    pub transfer_failures: Counter<u64>,
    /// `sandfleet_agent_reconcile_duration_seconds`.
    pub reconcile: Histogram<f64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = meter();
    let seconds = |name: &'static str, description: &'static str| latency_histogram(&m, name, description);
    Metrics {
        prepare: seconds(
            "sandfleet.agent.sandbox.prepare.duration",
            "The runtime making and starting a session's sandbox",
        ),
        start: seconds(
            "sandfleet.agent.sandbox.start.duration",
            "From an assignment to its session ready to report RUNNING (sandbox and workspace restore)",
        ),
        exec: seconds("sandfleet.agent.exec.duration", "One exec, from its start to its exit"),
        execs: m.u64_counter("sandfleet.agent.execs").with_description("Finished execs, by runtime and result").build(),
        output_capped: m
            .u64_counter("sandfleet.agent.exec.output_capped")
            .with_description("Execs whose output reached the cap")
            .build(),
        heartbeat_rtt: seconds("sandfleet.agent.heartbeat.rtt", "A heartbeat's round trip to the coordinators"),
        heartbeat_failures: m
            .u64_counter("sandfleet.agent.heartbeat.failures")
            .with_description("Heartbeats that got no answer or an error")
            .build(),
        reports_resent: m
            .u64_counter("sandfleet.agent.heartbeat.reports_resent")
            .with_description("Heartbeats answered before the session reports they carried were committed; they go again")
            .build(),
        fenced: m
            .u64_counter("sandfleet.agent.sessions.fenced")
            .with_description(
                "Sessions this agent stopped because a newer generation replaced them (superseded) or because it lost the coordinators' quorum (self_fenced)",
            )
            .build(),
        transfer_bytes: m
            .u64_counter("sandfleet.agent.workspace.transfer")
            .with_unit("By")
            .with_description("Workspace bytes uploaded (sync) or downloaded (restore)")
            .build(),
        transfer: seconds("sandfleet.agent.workspace.transfer.duration", "One workspace sync or restore"),
        transfer_failures: m
            .u64_counter("sandfleet.agent.workspace.transfer.failures")
            .with_description("Failed workspace syncs or restores")
            .build(),
        reconcile: seconds("sandfleet.agent.reconcile.duration", "One reconcile of the assignment set"),
    }
});

/// The recorded instruments (made on first use, after the daemon's
/// `telemetry::init`).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Records one finished exec: its duration and how it ended.
pub fn record_exec(runtime: &'static str, result: &Result<ExitInfo, crate::runtime::RuntimeError>) {
    let m = metrics();
    let rt = KeyValue::new("runtime", runtime);
    let outcome = match result {
        Ok(exit) => {
            m.exec.record(exit.duration.as_secs_f64(), std::slice::from_ref(&rt));
            if exit.output_truncated {
                m.output_capped.add(1, std::slice::from_ref(&rt));
            }
            exec_result(exit)
        }
        Err(_) => "error",
    };
    m.execs.add(1, &[rt, KeyValue::new("result", outcome)]);
}

/// The `result` label of a finished exec.
pub fn exec_result(exit: &ExitInfo) -> &'static str {
    if exit.timed_out {
        "timeout"
    } else if exit.oom_killed {
        "oom_killed"
    } else if exit.exit_code == 0 {
        "ok"
    } else {
        "nonzero_exit"
    }
}

/// Records one workspace sync or restore (`direction` is `sync` or
/// `restore`). A sync refused because a newer copy owns the workspace is
/// fencing, not a failure.
pub fn record_transfer(
    direction: &'static str,
    took: Duration,
    result: &Result<crate::store::sync::SyncStats, crate::store::StoreError>,
) {
    let m = metrics();
    let dir = [KeyValue::new("direction", direction)];
    match result {
        Ok(stats) => {
            m.transfer.record(took.as_secs_f64(), &dir);
            m.transfer_bytes.add(stats.transferred_bytes, &dir);
        }
        Err(crate::store::StoreError::Superseded { .. }) => {}
        Err(_) => m.transfer_failures.add(1, &dir),
    }
}

/// The observed instruments of one agent; their callbacks hold only a weak
/// reference to it and observe nothing once it is gone.
pub struct Observers {
    _gauges: Vec<ObservableGauge<u64>>,
    _cpu: ObservableCounter<f64>,
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observers").finish_non_exhaustive()
    }
}

/// Registers the gauges read from `state` at collection time.
pub fn observe(state: &Arc<AgentState>) -> Observers {
    let m = meter();
    let weak: Weak<AgentState> = Arc::downgrade(state);
    let gauge = |name: &'static str, description: &'static str, f: fn(&AgentState) -> u64, by_runtime: bool| {
        let weak = weak.clone();
        m.u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| {
                if let Some(state) = weak.upgrade() {
                    let labels =
                        if by_runtime { vec![KeyValue::new("runtime", state.runtime.kind().as_str())] } else { vec![] };
                    o.observe(f(&state), &labels);
                }
            })
            .build()
    };
    // The sandboxes' cgroups as last measured for a heartbeat (Runtime::usage):
    // measuring here would make a scrape wait on the container engine.
    let cpu = {
        let weak = weak.clone();
        m.f64_observable_counter("sandfleet.agent.sandbox.cpu")
            .with_unit("s")
            .with_description(
                "CPU time used by the sandboxes' cgroups since the agent started (ended sessions included)",
            )
            .with_callback(move |o| {
                if let Some(state) = weak.upgrade() {
                    if let Some(u) = state.last_usage.lock().as_ref() {
                        o.observe(u.cpu_seconds_total, &[KeyValue::new("runtime", state.runtime.kind().as_str())]);
                    }
                }
            })
            .build()
    };
    let memory = {
        let weak = weak.clone();
        m.u64_observable_gauge("sandfleet.agent.sandbox.memory")
            .with_unit("By")
            .with_description("Memory the sandboxes' cgroups use now (less inactive file cache)")
            .with_callback(move |o| {
                if let Some(state) = weak.upgrade() {
                    if let Some(u) = state.last_usage.lock().as_ref() {
                        o.observe(u.memory_bytes, &[KeyValue::new("runtime", state.runtime.kind().as_str())]);
                    }
                }
            })
            .build()
    };
    Observers {
        _cpu: cpu,
        _gauges: vec![
            memory,
            gauge(
                "sandfleet.agent.sandboxes.running",
                "Sandboxes this agent runs (sessions ready for exec and file calls)",
                |s| s.running_sessions() as u64,
                true,
            ),
            gauge(
                "sandfleet.agent.registered",
                "1 while the agent is registered and its last heartbeat was acknowledged, else 0",
                |s| u64::from(s.is_ready()),
                false,
            ),
            gauge(
                "sandfleet.agent.self_fenced",
                "1 while the agent is cut off from the coordinators' quorum and fences its sessions, else 0",
                |s| u64::from(s.is_fenced()),
                false,
            ),
        ],
    }
}
