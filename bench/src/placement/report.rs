//! What a placement run measured ([`Report`], with its [`Cpu`] and [`Beats`]
//! per phase) and its Markdown section for `bench/RESULTS.md` ([`render`]).

use std::fmt::Write as _;
use std::time::Duration;

use sandfleet_testkit::helpers::percentile;

use super::{Settings, Start, GOAL_PER_SEC, HEARTBEAT_P99_GOAL, NOMAD_C1M_PER_SEC};
use crate::raft;

/// CPU seconds used by each process in one phase, and who led.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    pub wall: Duration,
    /// (name, CPU seconds); the member leading at the end of the phase is marked.
    pub procs: Vec<(String, f64)>,
    /// Leader and term at the start and at the end of the phase.
    pub leader: ((u64, u64), (u64, u64)),
}

impl Cpu {
    pub(super) fn line(&self) -> String {
        let wall = self.wall.as_secs_f64().max(1e-9);
        let mut line =
            self.procs.iter().map(|(n, s)| format!("{n} {:.0}%", s / wall * 100.0)).collect::<Vec<_>>().join(", ");
        let ((l0, t0), (l1, t1)) = self.leader;
        if (l0, t0) != (l1, t1) {
            let _ = write!(
                line,
                " (LEADER CHANGED in this phase: coordinator-{l0} term {t0} -> coordinator-{l1} term {t1})"
            );
        }
        line
    }

    pub(super) fn leader_changed(&self) -> bool {
        self.leader.0 != self.leader.1
    }
}

/// Heartbeats answered in one window.
#[derive(Debug, Clone, Default)]
pub struct Beats {
    pub window: Duration,
    pub ok: u64,
    pub failed: u64,
    /// Answered before the reports they carried were committed (sent again).
    pub resent: u64,
    pub latencies: Vec<Duration>,
}

impl Beats {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    pub anchor: raft::Load,
    pub created: usize,
    pub create_elapsed: Duration,
    pub heartbeat_interval: Duration,
    pub node_ttl: Duration,
    pub registered_after: Option<Duration>,
    /// Start::Uncordon: how long uncordoning every node took (inside the clock);
    /// Start::Resume: when the resume call was answered.
    pub uncordon_took: Option<Duration>,
    pub all_placed: Duration,
    pub all_running: Duration,
    pub placed_via_watch: u64,
    pub placed_via_heartbeat: u64,
    pub replaced: u64,
    pub verified_running: usize,
    pub min_per_node: usize,
    pub max_per_node: usize,
    pub nodes_used: usize,
    /// Nodes holding as many sessions as they have slots.
    pub nodes_full: usize,
    pub placing_beats: Beats,
    pub steady_beats: Beats,
    pub watch_reconnects: u64,
    /// Heartbeat failures over the whole run by reason, most frequent first.
    pub beat_failures: Vec<(String, u64)>,
    pub create_cpu: Cpu,
    pub placing_cpu: Cpu,
    pub steady_cpu: Cpu,
}

impl Report {
    pub fn placements_per_sec(&self) -> f64 {
        self.created as f64 / self.all_placed.as_secs_f64().max(1e-9)
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The Markdown section for `bench/RESULTS.md`.
pub fn render(r: &Report, settings: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let rate = r.placements_per_sec();
    let verdict = if rate >= GOAL_PER_SEC { "met" } else { "MISSED" };
    let anchor_rate = r.anchor.throughput();
    let _ = writeln!(out, "{section}\n");
    let how = match settings.start {
        Start::Uncordon => format!(
            "The agents register first and every node is cordoned (`NodeService.CordonNode`); {} sessions are created \
             PENDING (\"no node is ready\"); then the clock starts and every node is uncordoned, {} calls at a time \
             (all uncordoned {} after the start).",
            settings.sessions,
            settings.create_clients,
            r.uncordon_took.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
        Start::Resume => format!(
            "The agents register first and every node is ready; placement is paused \
             (`ClusterService.SetSchedulerPaused`, `sandfleet cluster scheduler pause`) and {} sessions are created \
             PENDING (\"scheduling is paused\"); then the clock starts with the one call that resumes placement \
             (answered {} after the start). All capacity and all work are there when the clock starts, so this \
             measures placement itself.",
            settings.sessions,
            r.uncordon_took.map(|d| format!("{:.3} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
        Start::Register => format!(
            "{} sessions are created PENDING with no node registered; then the clock starts and every agent registers \
             at once (all registered {} after the start).",
            settings.sessions,
            r.registered_after.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "?".into())
        ),
    };
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench placement --sessions {} --agents {} --start {}{}{}`: three `sandfleet-coordinator` \
         processes on loopback on this machine at the default agent timings (heartbeat {} ms, node TTL {} ms), and {} \
         simulated node agents in the benchmark process that speak the real `AgentService` protocol as `sandfleet-agent` \
         does (RegisterNode, a heartbeat every interval, phases spread over the interval, and at once when they have \
         reports, a WatchAssignments stream of deltas, a \
         RUNNING report per new assignment; {} HTTP/2 connections per coordinator; no sandboxes; {} session slots per \
         node). {how} Placed: an \
         agent has seen the session assigned (watch stream or heartbeat answer). RUNNING: a heartbeat carrying its \
         report was answered saying its reports are committed (agents set `resend_uncommitted`: the leader answers \
         within `--report-wait` and an agent sends reports not committed yet again a quarter interval later).\n",
        settings.sessions,
        settings.agents,
        match settings.start {
            Start::Resume => "resume",
            Start::Uncordon => "uncordon",
            Start::Register => "register",
        },
        if settings.spread { " --spread" } else { "" },
        settings.coordinator_args.iter().map(|a| format!(" --coordinator-arg={a}")).collect::<String>(),
        r.heartbeat_interval.as_millis(),
        r.node_ttl.as_millis(),
        settings.agents,
        settings.connections,
        settings.slots,
    );
    let _ = writeln!(out, "| measurement | value | vs goal / reference |");
    let _ = writeln!(out, "|---|---:|---|");
    let _ = writeln!(
        out,
        "| **placements/s** ({} sessions / time to all placed) | **{rate:.0}** | goal >= {GOAL_PER_SEC:.0}/s: {:.2}x, {verdict} |",
        r.created,
        rate / GOAL_PER_SEC
    );
    let _ = writeln!(out, "| time to all placed | {:.2} s | - |", r.all_placed.as_secs_f64());
    let _ = writeln!(out, "| time to all RUNNING | {:.2} s | - |", r.all_running.as_secs_f64());
    let _ = writeln!(
        out,
        "| anchor, same run: raw commit rate (single-session creates, {} clients, fresh cluster as `bench raft`) | {anchor_rate:.0}/s | placements/s = {:.2}x the commit rate |",
        r.anchor.clients,
        rate / anchor_rate.max(1e-9)
    );
    let _ = writeln!(
        out,
        "| reference, not measured: Nomad C1M (published, 2016) | {NOMAD_C1M_PER_SEC:.0}/s | placements/s = {:.2}x |",
        rate / NOMAD_C1M_PER_SEC
    );
    let _ = writeln!(
        out,
        "| sessions per node (min / max over {} nodes, {} used, {} full at {} slots) | {} / {} | even spread: {} |",
        settings.agents,
        r.nodes_used,
        r.nodes_full,
        settings.slots,
        r.min_per_node,
        r.max_per_node,
        r.created.div_ceil(settings.agents)
    );
    let beat_row = |out: &mut String, what: &str, b: &Beats, goal: &str| {
        let _ = writeln!(
            out,
            "| heartbeats answered {what} | {:.0}/s | p50 {:.1} ms, p99 {:.1} ms, {} failed, {} answered before their reports were committed{goal} |",
            b.rate(),
            ms(percentile(&b.latencies, 50.0)),
            ms(percentile(&b.latencies, 99.0)),
            b.failed,
            b.resent
        );
    };
    let placing = &r.placing_beats;
    let beats_met = percentile(&placing.latencies, 99.0) < HEARTBEAT_P99_GOAL && placing.failed == 0;
    let goal = format!(
        "; goal p99 < {} ms and none failed: {}",
        HEARTBEAT_P99_GOAL.as_millis(),
        if beats_met { "met" } else { "MISSED" }
    );
    beat_row(&mut out, "while placing", placing, &goal);
    beat_row(&mut out, &format!("in steady state ({} s)", r.steady_beats.window.as_secs()), &r.steady_beats, "");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Checks: `ListSessions` found {} of {} sessions RUNNING at the end; first seen on a watch stream {} / in a heartbeat \
         answer {}; {} re-placements (a session seen again at a newer generation); {} watch-stream reconnects.\n",
        r.verified_running, r.created, r.placed_via_watch, r.placed_via_heartbeat, r.replaced, r.watch_reconnects,
    );
    if !r.beat_failures.is_empty() {
        let _ = writeln!(out, "Heartbeat failures over the whole run (setup included), by reason:\n");
        for (why, n) in r.beat_failures.iter().take(5) {
            let _ = writeln!(out, "- {n} x `{why}`");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "Setup, not measured: the {} PENDING creates took {:.1} s ({:.0}/s at {} clients).\n",
        r.created,
        r.create_elapsed.as_secs_f64(),
        r.created as f64 / r.create_elapsed.as_secs_f64().max(1e-9),
        settings.create_clients
    );
    let _ = writeln!(out, "CPU (share of one core) per phase; this machine has 2 cores shared by everything:\n");
    let _ = writeln!(out, "- creating PENDING sessions: {}", r.create_cpu.line());
    let _ = writeln!(out, "- placing (clock running): {}", r.placing_cpu.line());
    let _ = writeln!(out, "- steady state, heartbeats only: {}\n", r.steady_cpu.line());
    let changed: Vec<&str> =
        [("creating", &r.create_cpu), ("placing", &r.placing_cpu), ("steady state", &r.steady_cpu)]
            .into_iter()
            .filter(|(_, c)| c.leader_changed())
            .map(|(n, _)| n)
            .collect();
    if !changed.is_empty() {
        let _ = writeln!(
            out,
            "**The Raft leader changed while {}** (an overloaded leader missed its heartbeats).\n",
            changed.join(", ")
        );
    }
    crate::push_machine(&mut out, machine);
    out
}
