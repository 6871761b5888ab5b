//! `sandfleet top`: a live view of the cluster and its nodes.
//!
//! Each refresh fetches ClusterStatus and ListNodes into a [`Sample`]; a
//! frame is a pure function of the newest sample and the one before it
//! ([`frame_text`], [`frame_json`]), which gives the rates (creates per
//! second from `sessions_created`). How frames reach the screen:
//! - on a terminal: redrawn in place every `--interval`, the cursor hidden
//!   until Ctrl-C (or `--count` frames);
//! - not on a terminal (a pipe, a file): frames one after another with no
//!   cursor control, as `top -b` does;
//! - `--once`: one frame, then exit (the rate needs two frames, so it is
//!   unknown there);
//! - `--output json`: one JSON object per frame, one per line (pretty with `--once`).

use std::io::IsTerminal as _;
use std::time::Duration;

use sandfleet::proto;
use serde_json::{json, Value};

use super::output::{format_cpu, format_memory, out, print_json, print_json_line, table, OutputFormat};
use super::Ctx;

/// What one refresh fetched.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// When it was taken, Unix ms (rates are per second of this clock).
    pub taken_ms: i64,
    /// ClusterStatus.
    pub status: proto::ClusterStatusResponse,
    /// ListNodes.
    pub nodes: Vec<proto::Node>,
}

/// `top`'s options.
#[derive(Debug, Clone, Copy)]
pub struct TopOptions {
    /// Time between frames.
    pub interval: Duration,
    /// One frame, then exit.
    pub once: bool,
    /// Stop after this many frames (0: until interrupted).
    pub count: u64,
}

/// Fetches one sample.
pub async fn fetch(ctx: &Ctx) -> anyhow::Result<Sample> {
    let (status, nodes) = tokio::try_join!(ctx.client.cluster_status(), ctx.client.list_nodes())?;
    Ok(Sample { taken_ms: sandfleet_common::time::now_ms(), status, nodes })
}

/// Creates per second between two samples; `None` without an earlier one
/// or any time between them. A counter that went back (another cluster
/// answered) gives 0.
pub fn creates_per_second(prev: Option<&Sample>, cur: &Sample) -> Option<f64> {
    let prev = prev?;
    let secs = (cur.taken_ms - prev.taken_ms) as f64 / 1000.0;
    if secs <= 0.0 {
        return None;
    }
    Some(cur.status.sessions_created.saturating_sub(prev.status.sessions_created) as f64 / secs)
}

/// The leader's term: the one the leader reports, else the highest any member reports.
pub fn term(status: &proto::ClusterStatusResponse) -> u64 {
    status
        .members
        .iter()
        .find(|m| m.id == status.leader_id && status.leader_id != 0)
        .map(|m| m.term)
        .unwrap_or_else(|| status.members.iter().map(|m| m.term).max().unwrap_or(0))
}

/// A node's resources as `top` shows them: `(allocated, capacity, used, free)`
/// for CPU (millicores) and memory (bytes). Free is capacity less allocated
/// (what placement may still give). Used is `None` when the answering
/// coordinator has no usage report from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFigures {
    pub cpu_allocated: u64,
    pub cpu_capacity: u64,
    pub cpu_used: Option<u64>,
    pub cpu_free: u64,
    pub memory_allocated: u64,
    pub memory_capacity: u64,
    pub memory_used: Option<u64>,
    pub memory_free: u64,
}

impl NodeFigures {
    /// The figures of `n`.
    pub fn of(n: &proto::Node) -> Self {
        let cap = n.capacity.unwrap_or_default();
        let alloc = n.allocated.unwrap_or_default();
        let (cpu_capacity, cpu_allocated) = (u64::from(cap.cpu_millis), u64::from(alloc.cpu_millis));
        Self {
            cpu_allocated,
            cpu_capacity,
            cpu_used: n.usage.map(|u| u.cpu_millis),
            cpu_free: cpu_capacity.saturating_sub(cpu_allocated),
            memory_allocated: alloc.memory_bytes,
            memory_capacity: cap.memory_bytes,
            memory_used: n.usage.map(|u| u.memory_bytes),
            memory_free: cap.memory_bytes.saturating_sub(alloc.memory_bytes),
        }
    }
}

fn cpu_text(millis: u64) -> String {
    format_cpu(u32::try_from(millis).unwrap_or(u32::MAX))
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// The text frame: a cluster line, the members, the nodes.
pub fn frame_text(prev: Option<&Sample>, cur: &Sample) -> String {
    let st = &cur.status;
    let mut s = String::new();
    let leader = if st.leader_id == 0 { "none known".to_string() } else { st.leader_id.to_string() };
    let rate = match creates_per_second(prev, cur) {
        Some(r) => format!("{r:.1}/s"),
        None => "-/s".into(),
    };
    s.push_str(&format!(
        "sandfleet top  {}\ncluster: leader {leader}, term {}; scheduler {}; sessions: {} pending, {} running; creates {rate} ({} in all)\n\n",
        super::output::format_time(cur.taken_ms),
        term(st),
        if st.scheduler_paused { "PAUSED" } else { "placing" },
        st.unplaced_sessions,
        st.running_sessions,
        st.sessions_created,
    ));
    let members: Vec<Vec<String>> = st
        .members
        .iter()
        .map(|m| {
            let id = if m.id == st.leader_id && m.id != 0 { format!("{}*", m.id) } else { m.id.to_string() };
            let role = if m.voter || m.role == "learner" { m.role.clone() } else { format!("{} (non-voter)", m.role) };
            vec![id, m.address.clone(), role, m.term.to_string(), m.applied_index.to_string()]
        })
        .collect();
    s.push_str(&table(&["MEMBER", "ADDRESS", "ROLE", "TERM", "APPLIED"], &members));
    s.push('\n');
    let nodes: Vec<Vec<String>> = cur
        .nodes
        .iter()
        .map(|n| {
            let f = NodeFigures::of(n);
            let slots = n.capacity.unwrap_or_default().session_slots;
            vec![
                n.id.clone(),
                if n.state.is_empty() { "-".into() } else { n.state.clone() },
                if slots > 0 { format!("{}/{slots}", n.session_count) } else { n.session_count.to_string() },
                or_dash(f.cpu_used.map(cpu_text)),
                format!("{}/{}", cpu_text(f.cpu_allocated), cpu_text(f.cpu_capacity)),
                cpu_text(f.cpu_free),
                or_dash(f.memory_used.map(format_memory)),
                format!("{}/{}", format_memory(f.memory_allocated), format_memory(f.memory_capacity)),
                format_memory(f.memory_free),
            ]
        })
        .collect();
    s.push_str(&table(
        &[
            "NODE",
            "STATE",
            "SESSIONS",
            "CPU USED",
            "CPU ALLOC/CAP",
            "CPU FREE",
            "MEM USED",
            "MEM ALLOC/CAP",
            "MEM FREE",
        ],
        &nodes,
    ));
    if cur.nodes.is_empty() {
        s.push_str("(no nodes registered)\n");
    }
    s
}

/// The JSON frame. Numbers are JSON numbers; unknown values are null (the
/// rate without an earlier frame, a node's use without a report).
pub fn frame_json(prev: Option<&Sample>, cur: &Sample) -> Value {
    let st = &cur.status;
    let members: Vec<Value> = st
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "address": m.address,
                "role": m.role,
                "voter": m.voter,
                "term": m.term,
                "applied_index": m.applied_index,
                "leader": m.id == st.leader_id && m.id != 0,
            })
        })
        .collect();
    let nodes: Vec<Value> = cur
        .nodes
        .iter()
        .map(|n| {
            let f = NodeFigures::of(n);
            json!({
                "id": n.id,
                "state": n.state,
                "sessions": n.session_count,
                "session_slots": n.capacity.unwrap_or_default().session_slots,
                "cpu_millis": {
                    "allocated": f.cpu_allocated,
                    "capacity": f.cpu_capacity,
                    "used": f.cpu_used,
                    "free": f.cpu_free,
                },
                "memory_bytes": {
                    "allocated": f.memory_allocated,
                    "capacity": f.memory_capacity,
                    "used": f.memory_used,
                    "free": f.memory_free,
                },
                "cpu_seconds_total": n.usage.map(|u| u.cpu_seconds_total),
                "last_heartbeat_ms": n.last_heartbeat_ms,
            })
        })
        .collect();
    json!({
        "taken_at": super::output::format_time(cur.taken_ms),
        "cluster": {
            "leader_id": st.leader_id,
            "term": term(st),
            "members": members,
            "scheduler_paused": st.scheduler_paused,
            "pending_sessions": st.unplaced_sessions,
            "running_sessions": st.running_sessions,
            "sessions_created": st.sessions_created,
            "creates_per_second": creates_per_second(prev, cur),
        },
        "nodes": nodes,
    })
}

/// Shows the cursor again however `top` ends.
struct CursorGuard(console::Term);

impl Drop for CursorGuard {
    fn drop(&mut self) {
        let _ = self.0.show_cursor();
    }
}

/// Redraws `frame` over the previous one: from the top left, each line cut
/// or padded to the terminal's width (so it covers the old line), then the
/// rest of the screen cleared.
fn redraw(term: &console::Term, frame: &str) -> std::io::Result<()> {
    let (rows, cols) = term.size();
    // One column short of the edge: a full line would wrap on some terminals.
    let width = usize::from(cols.saturating_sub(1)).max(1);
    term.move_cursor_to(0, 0)?;
    let mut text = String::new();
    for line in frame.lines().take(usize::from(rows.saturating_sub(1)).max(1)) {
        text.push_str(&console::pad_str(line, width, console::Alignment::Left, Some("")));
        text.push('\n');
    }
    term.write_str(&text)?;
    term.clear_to_end_of_screen()
}

/// `sandfleet top`.
pub async fn run(ctx: &Ctx, opts: TopOptions) -> anyhow::Result<i32> {
    if opts.once {
        let cur = fetch(ctx).await?;
        match ctx.output {
            OutputFormat::Json => print_json(&frame_json(None, &cur))?,
            OutputFormat::Text => out(&frame_text(None, &cur))?,
        }
        return Ok(0);
    }
    let live = ctx.output == OutputFormat::Text && std::io::stdout().is_terminal();
    let term = console::Term::stdout();
    let _guard = if live {
        term.hide_cursor()?;
        term.clear_screen()?;
        Some(CursorGuard(term.clone()))
    } else {
        None
    };
    let mut prev: Option<Sample> = None;
    let mut frames = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let started = tokio::time::Instant::now();
        let fetched = tokio::select! {
            r = fetch(ctx) => r,
            _ = &mut ctrl_c => break,
        };
        match fetched {
            Ok(cur) => {
                match (ctx.output, live) {
                    (OutputFormat::Json, _) => print_json_line(&frame_json(prev.as_ref(), &cur))?,
                    (OutputFormat::Text, true) => redraw(&term, &frame_text(prev.as_ref(), &cur))?,
                    (OutputFormat::Text, false) => out(&format!("{}\n", frame_text(prev.as_ref(), &cur)))?,
                }
                prev = Some(cur);
            }
            // A failed refresh is shown and retried; the view goes on.
            Err(e) if live => redraw(&term, &format!("sandfleet top: {}\n", super::error_line(&e)))?,
            Err(e) => eprintln!("sandfleet top: {}", super::error_line(&e)),
        }
        frames += 1;
        if opts.count > 0 && frames >= opts.count {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + opts.interval) => {}
            _ = &mut ctrl_c => break,
        }
    }
    if live {
        // Leave the last frame on screen, with the prompt below it.
        term.write_line("")?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(taken_ms: i64, created: u64) -> Sample {
        Sample {
            taken_ms,
            status: proto::ClusterStatusResponse {
                leader_id: 2,
                members: vec![
                    proto::ClusterMember { id: 1, role: "follower".into(), voter: true, term: 3, ..Default::default() },
                    proto::ClusterMember {
                        id: 2,
                        address: "127.0.0.1:7070".into(),
                        role: "leader".into(),
                        voter: true,
                        term: 4,
                        applied_index: 77,
                        ..Default::default()
                    },
                ],
                scheduler_paused: false,
                unplaced_sessions: 1,
                sessions_created: created,
                running_sessions: 2,
            },
            nodes: vec![
                proto::Node {
                    id: "node-a".into(),
                    state: "ready".into(),
                    session_count: 2,
                    capacity: Some(proto::NodeCapacity { cpu_millis: 4000, memory_bytes: 8 << 30, session_slots: 10 }),
                    allocated: Some(proto::NodeCapacity { cpu_millis: 1500, memory_bytes: 1 << 30, session_slots: 2 }),
                    usage: Some(proto::NodeUsage { cpu_millis: 250, memory_bytes: 300 << 20, cpu_seconds_total: 12.5 }),
                    ..Default::default()
                },
                proto::Node { id: "node-b".into(), state: "down".into(), ..Default::default() },
            ],
        }
    }

    #[test]
    fn rate_is_creates_over_the_time_between_frames() {
        let (a, b) = (sample(10_000, 100), sample(12_000, 107));
        assert_eq!(creates_per_second(Some(&a), &b), Some(3.5));
        assert_eq!(creates_per_second(None, &b), None);
        assert_eq!(creates_per_second(Some(&b), &b), None, "no time between them");
        // Another cluster's lower counter: no negative rate.
        assert_eq!(creates_per_second(Some(&b), &sample(14_000, 5)), Some(0.0));
    }

    #[test]
    fn text_frame_shows_cluster_members_and_nodes() {
        let (a, b) = (sample(10_000, 100), sample(12_000, 107));
        let f = frame_text(Some(&a), &b);
        assert!(f.contains("cluster: leader 2, term 4; scheduler placing; sessions: 1 pending, 2 running; creates 3.5/s (107 in all)"), "{f}");
        assert!(f.contains("\n2*      127.0.0.1:7070  leader    4     77\n"), "{f}");
        let a_line = f.lines().find(|l| l.starts_with("node-a")).unwrap_or_else(|| panic!("{f}"));
        let cells: Vec<&str> = a_line.split_whitespace().collect();
        assert_eq!(cells, ["node-a", "ready", "2/10", "250m", "1500m/4", "2500m", "300Mi", "1Gi/8Gi", "7Gi"], "{f}");
        // A node without a usage report shows dashes for use.
        let b_line = f.lines().find(|l| l.starts_with("node-b")).unwrap_or_else(|| panic!("{f}"));
        assert_eq!(
            b_line.split_whitespace().collect::<Vec<_>>(),
            ["node-b", "down", "0", "-", "0/0", "0", "-", "0/0", "0"]
        );
        // One frame alone has no rate.
        assert!(frame_text(None, &b).contains("creates -/s (107 in all)"));
        let paused =
            Sample { status: proto::ClusterStatusResponse { scheduler_paused: true, ..b.status.clone() }, ..b };
        assert!(frame_text(None, &paused).contains("scheduler PAUSED"));
    }

    #[test]
    fn json_frame_has_numbers_and_nulls_for_unknowns() {
        let (a, b) = (sample(10_000, 100), sample(12_000, 107));
        let v = frame_json(Some(&a), &b);
        assert_eq!(v["cluster"]["leader_id"], 2);
        assert_eq!(v["cluster"]["term"], 4);
        assert_eq!(v["cluster"]["running_sessions"], 2);
        assert_eq!(v["cluster"]["pending_sessions"], 1);
        assert_eq!(v["cluster"]["creates_per_second"], 3.5);
        assert_eq!(v["cluster"]["members"][1]["leader"], true);
        assert_eq!(
            v["nodes"][0]["cpu_millis"],
            json!({"allocated": 1500, "capacity": 4000, "used": 250, "free": 2500})
        );
        assert_eq!(v["nodes"][0]["memory_bytes"]["used"], 300u64 << 20);
        assert_eq!(v["nodes"][0]["cpu_seconds_total"], 12.5);
        assert!(v["nodes"][1]["memory_bytes"]["used"].is_null());
        assert!(frame_json(None, &b)["cluster"]["creates_per_second"].is_null());
    }

    #[test]
    fn term_falls_back_to_the_highest_reported() {
        let mut st = sample(0, 0).status;
        assert_eq!(term(&st), 4);
        st.leader_id = 0;
        st.members[0].term = 9;
        assert_eq!(term(&st), 9);
    }
}
