//! Printing: text tables and key/value blocks, JSON, and small formatters.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sandfleet::proto;
use sandfleet::session::state_name;
use serde::Serialize;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Text,
    /// JSON, one document (or one object per line for `session watch`).
    Json,
}

/// Writes text to stdout in one go.
pub fn out(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Prints a value as pretty JSON. API messages print in the proto3 JSON
/// mapping (their serde impls come from the proto): the proto's field names,
/// every field present, enums by value name (`"SESSION_STATE_RUNNING"`) and
/// 64-bit integers as strings, as grpcurl prints them.
pub fn print_json(v: &impl Serialize) -> std::io::Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    s.push('\n');
    out(&s)
}

/// Prints a JSON value on one line (for streams of events).
pub fn print_json_line(v: &impl Serialize) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    out(&s)
}

/// Renders a table: left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count());
            l.extend(std::iter::repeat_n(' ', pad));
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    s
}

/// Millicores as people write them: `2` for whole cores, else `500m`.
pub fn format_cpu(millis: u32) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Bytes for people: exact binary units when they fit (`256Mi`), else one
/// decimal of the largest unit (`23.5Gi`).
pub fn format_memory(bytes: u64) -> String {
    let exact = sandfleet_common::quantity::format_memory(bytes);
    let digits = exact.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    if bytes < 1024 || (exact.ends_with('i') && digits <= 4) {
        return exact;
    }
    for (unit, m) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if bytes >= m {
            let v = bytes as f64 / m as f64;
            return if (v - v.round()).abs() < 0.05 { format!("{}{unit}", v.round()) } else { format!("{v:.1}{unit}") };
        }
    }
    exact
}

/// A file kind's short name, e.g. `directory` (`?` for a kind this CLI does not know).
pub fn file_kind_name(kind: i32) -> String {
    proto::FileKind::try_from(kind)
        .map(|k| k.as_str_name().trim_start_matches("FILE_KIND_").to_lowercase())
        .unwrap_or_else(|_| "?".into())
}

/// A short age: `42s`, `5m`, `3h`, `2d`.
pub fn format_age(since_ms: i64, now_ms: i64) -> String {
    if since_ms <= 0 {
        return "-".into();
    }
    let secs = (now_ms - since_ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A Unix-ms timestamp as RFC 3339 (UTC, seconds), or `-` for 0.
pub fn format_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now, as a timestamp string.
pub fn now_string() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

pub fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn sorted_pairs(m: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// A session's disk use, as a `disk used` row aligned with [`session_text`].
pub fn disk_usage_text(u: &proto::GetDiskUsageResponse) -> String {
    let pct = |used: u64, limit: u64| if limit == 0 { 0.0 } else { used as f64 * 100.0 / limit as f64 };
    format!(
        "{:<10}{} of {} ({:.0}%), {} of {} inodes ({:.0}%)\n",
        "disk use:",
        format_memory(u.used_bytes),
        format_memory(u.limit_bytes),
        pct(u.used_bytes, u.limit_bytes),
        u.used_inodes,
        u.limit_inodes,
        pct(u.used_inodes, u.limit_inodes)
    )
}

/// A session as a key/value block.
pub fn session_text(s: &proto::Session) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("id", s.id.clone()),
        ("state", state_name(s.state).to_string()),
        ("node", or_dash(&s.node_id).to_string()),
    ];
    if !s.node_address.is_empty() {
        rows.push(("address", s.node_address.clone()));
    }
    rows.extend([
        ("template", or_dash(&spec.template).to_string()),
        ("cpu", format_cpu(spec.cpu_millis)),
        ("cpu request", format_cpu(spec.cpu_request_millis)),
        ("memory", format_memory(spec.memory_bytes)),
        ("pids", spec.pids_limit.to_string()),
        ("disk", format!("{} ({} inodes)", format_memory(spec.disk_bytes), spec.disk_inodes)),
        ("labels", sorted_pairs(&spec.labels)),
        ("created", format_time(s.created_at_ms)),
        ("expires", format_time(s.expires_at_ms)),
    ]);
    if !spec.node_selector.is_empty() {
        rows.push(("selector", sorted_pairs(&spec.node_selector)));
    }
    if spec.idle_timeout_seconds > 0 {
        rows.push(("idle", format!("{}s", spec.idle_timeout_seconds)));
    }
    if let Some(p) = &spec.restart_policy {
        rows.push((
            "restart",
            format!("lost after {} ms, max attempts {}, backoff {} ms", p.lost_after_ms, p.max_attempts, p.backoff_ms),
        ));
    }
    if s.restarts > 0 {
        rows.push(("restarts", s.restarts.to_string()));
    }
    if !s.pending_reason.is_empty() {
        rows.push(("pending", s.pending_reason.clone()));
    }
    if !s.message.is_empty() {
        rows.push(("message", s.message.clone()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<10}{v}\n", format!("{k}:")));
    }
    out
}

/// The `session list` table.
pub fn sessions_table(sessions: &[proto::Session], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            vec![
                s.id.clone(),
                state_name(s.state).to_string(),
                or_dash(&s.node_id).to_string(),
                or_dash(&spec.template).to_string(),
                format_cpu(spec.cpu_millis),
                format_memory(spec.memory_bytes),
                format_age(s.created_at_ms, now_ms),
            ]
        })
        .collect();
    table(&["ID", "STATE", "NODE", "TEMPLATE", "CPU", "MEMORY", "AGE"], &rows)
}

/// A node as a key/value block (`node get`): what `node list` shows, and
/// its labels, runtimes and who holds it out of placement, and why.
pub fn node_text(n: &proto::Node) -> String {
    let cap = n.capacity.unwrap_or_default();
    let used = n.allocated.unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("id", n.id.clone()),
        ("state", or_dash(&n.state).to_string()),
        ("address", or_dash(&n.address).to_string()),
        ("cpu", format!("{}/{}", format_cpu(used.cpu_millis), format_cpu(cap.cpu_millis))),
        ("memory", format!("{}/{}", format_memory(used.memory_bytes), format_memory(cap.memory_bytes))),
        ("sessions", format!("{}/{}", n.session_count, cap.session_slots)),
        ("in use", usage_text(n.usage.as_ref())),
        ("runtimes", if n.runtimes.is_empty() { "-".into() } else { n.runtimes.join(",") }),
        ("labels", sorted_pairs(&n.labels)),
        ("heartbeat", format_time(n.last_heartbeat_ms)),
    ];
    for h in &n.holds {
        let what = if h.drain { "drained" } else { "cordoned" };
        let why = if h.reason.is_empty() { String::new() } else { format!(": {}", h.reason) };
        rows.push(("hold", format!("{what} by the {}{why} (since {})", h.by, format_time(h.since_ms))));
    }
    if let Some(d) = &n.drain {
        rows.push((
            "drain",
            format!(
                "{} left, {} moving, {} at a time, deadline {}",
                d.remaining,
                d.moving,
                d.max_parallel,
                format_time(d.deadline_ms)
            ),
        ));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<11}{v}\n", format!("{k}:")));
    }
    out
}

/// What a node's sandboxes use now, e.g. `250m CPU, 300Mi memory (12.5 CPU
/// seconds since the agent started)`; `-` without a report.
pub fn usage_text(u: Option<&proto::NodeUsage>) -> String {
    match u {
        None => "-".into(),
        Some(u) => format!(
            "{} CPU, {} memory ({:.1} CPU seconds since the agent started)",
            format_cpu(u32::try_from(u.cpu_millis).unwrap_or(u32::MAX)),
            format_memory(u.memory_bytes),
            u.cpu_seconds_total
        ),
    }
}

/// The `node list` table; CPU and MEM are `allocated/capacity`, CPU USED and
/// MEM USED what the node's sandboxes use now (`-` without a report).
pub fn nodes_table(nodes: &[proto::Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let cap = n.capacity.unwrap_or_default();
            let used = n.allocated.unwrap_or_default();
            let sessions = if cap.session_slots > 0 {
                format!("{}/{}", n.session_count, cap.session_slots)
            } else {
                n.session_count.to_string()
            };
            let state = match &n.drain {
                Some(d) => format!("{} ({} left, {} moving)", n.state, d.remaining, d.moving),
                None => or_dash(&n.state).to_string(),
            };
            vec![
                n.id.clone(),
                state,
                or_dash(&n.address).to_string(),
                format!("{}/{}", format_cpu(used.cpu_millis), format_cpu(cap.cpu_millis)),
                n.usage.map_or("-".into(), |u| format_cpu(u32::try_from(u.cpu_millis).unwrap_or(u32::MAX))),
                format!("{}/{}", format_memory(used.memory_bytes), format_memory(cap.memory_bytes)),
                n.usage.map_or("-".into(), |u| format_memory(u.memory_bytes)),
                sessions,
            ]
        })
        .collect();
    table(&["ID", "STATE", "ADDRESS", "CPU", "CPU USED", "MEM", "MEM USED", "SESSIONS"], &rows)
}

/// The `cluster status` table; the leader's id carries a `*`.
pub fn cluster_table(status: &proto::ClusterStatusResponse) -> String {
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            let id = if m.id == status.leader_id && m.id != 0 { format!("{}*", m.id) } else { m.id.to_string() };
            let role = if m.voter || m.role == "learner" { m.role.clone() } else { format!("{} (non-voter)", m.role) };
            vec![
                id,
                or_dash(&m.address).to_string(),
                or_dash(&role).to_string(),
                m.term.to_string(),
                m.last_log_index.to_string(),
                m.applied_index.to_string(),
                m.snapshot_index.to_string(),
                or_dash(&m.state_digest.chars().take(12).collect::<String>()).to_string(),
            ]
        })
        .collect();
    let mut s = table(&["ID", "ADDRESS", "ROLE", "TERM", "LAST_LOG", "APPLIED", "SNAPSHOT", "DIGEST"], &rows);
    if status.leader_id == 0 {
        s.push_str("(no leader known)\n");
    }
    if status.scheduler_paused {
        s.push_str(&format!(
            "scheduling is PAUSED ({} sessions waiting); resume with: sandfleet cluster scheduler resume\n",
            status.unplaced_sessions
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["ID", "STATE"], &[vec!["a-long-id".into(), "RUNNING".into()], vec!["b".into(), "X".into()]]);
        assert_eq!(t, "ID         STATE\na-long-id  RUNNING\nb          X\n");
    }

    #[test]
    fn formatters() {
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(500), "500m");
        assert_eq!(format_age(1_000, 43_000), "42s");
        assert_eq!(format_age(0, 43_000), "-");
        assert_eq!(format_age(1, 3 * 3600 * 1000), "2h");
        assert_eq!(format_time(0), "-");
        assert_eq!(format_memory(256 << 20), "256Mi");
        assert_eq!(format_memory(24_683_656 * 1024), "23.5Gi");
        assert_eq!(format_memory(1000), "1000");
        assert_eq!(format_memory(0), "0");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn json_is_the_proto3_mapping_with_proto_field_names() {
        let mut spec = proto::SessionSpec { template: "default".into(), cpu_millis: 500, ..Default::default() };
        spec.labels.insert("team".into(), "ml".into());
        let s = proto::Session {
            id: "0190c8f2-0000-7000-8000-000000000001".into(),
            spec: Some(spec),
            state: proto::SessionState::Running as i32,
            generation: 2,
            created_at_ms: 1_700_000_000_000,
            token: "sf1.x.y".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&s).expect("serializes");
        assert_eq!(v["id"], s.id);
        assert_eq!(v["state"], "SESSION_STATE_RUNNING");
        assert_eq!(v["spec"]["cpu_millis"], 500);
        assert_eq!(v["spec"]["labels"]["team"], "ml");
        assert_eq!(v["token"], "sf1.x.y");
        // 64-bit integers are strings; fields at their defaults are still there.
        assert_eq!((v["generation"].as_str(), v["created_at_ms"].as_str()), (Some("2"), Some("1700000000000")));
        assert_eq!((v["node_id"].as_str(), v["restarts"].as_u64()), (Some(""), Some(0)));
        assert_eq!(v["spec"]["memory_bytes"], "0");
        assert!(v.get("restart_policy").is_none() && v["spec"].get("restart_policy").is_none(), "{v}");
        // It reads back as the same message.
        assert_eq!(serde_json::from_value::<proto::Session>(v).expect("parses"), s);

        let paused = serde_json::to_value(proto::SetSchedulerPausedResponse { paused: true, unplaced_sessions: 3 })
            .expect("serializes");
        assert_eq!(paused, serde_json::json!({"paused": true, "unplaced_sessions": "3"}));
        let e = proto::FileEntry { name: "a".into(), kind: proto::FileKind::Directory as i32, ..Default::default() };
        assert_eq!(serde_json::to_value(&e).expect("serializes")["kind"], "FILE_KIND_DIRECTORY");
        assert_eq!(file_kind_name(e.kind), "directory");
        assert_eq!(file_kind_name(99), "?");
    }

    #[test]
    fn node_text_names_each_hold_and_its_reason() {
        let n = proto::Node {
            id: "node-a".into(),
            state: "draining".into(),
            labels: [("topology.kubernetes.io/zone".to_string(), "a".to_string())].into(),
            holds: vec![
                proto::NodeHold { by: "operator".into(), drain: false, reason: String::new(), since_ms: 0 },
                proto::NodeHold {
                    by: "agent".into(),
                    drain: true,
                    reason: "kubernetes: NoExecute taint example.com/maintenance".into(),
                    since_ms: 1_700_000_000_000,
                },
            ],
            ..Default::default()
        };
        let text = node_text(&n);
        assert!(text.contains("state:     draining\n"), "{text}");
        assert!(text.contains("labels:    topology.kubernetes.io/zone=a\n"), "{text}");
        assert!(text.contains("in use:    -\n"), "{text}");
        let used = proto::Node {
            usage: Some(proto::NodeUsage { cpu_millis: 1500, memory_bytes: 64 << 20, cpu_seconds_total: 3.25 }),
            ..n.clone()
        };
        assert!(
            node_text(&used).contains("in use:    1500m CPU, 64Mi memory (3.2 CPU seconds since the agent started)\n"),
            "{}",
            node_text(&used)
        );
        let t = nodes_table(std::slice::from_ref(&used));
        assert!(t.starts_with("ID      STATE     ADDRESS  CPU  CPU USED  MEM  MEM USED  SESSIONS\n"), "{t}");
        assert!(t.contains("1500m     0/0  64Mi"), "{t}");
        assert!(text.contains("hold:      cordoned by the operator (since -)\n"), "{text}");
        assert!(
            text.contains(
                "hold:      drained by the agent: kubernetes: NoExecute taint example.com/maintenance (since 2023-11-14T22:13:20Z)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn cluster_marks_leader() {
        let st = proto::ClusterStatusResponse {
            leader_id: 2,
            members: vec![
                proto::ClusterMember { id: 1, role: "follower".into(), voter: true, ..Default::default() },
                proto::ClusterMember { id: 2, role: "leader".into(), voter: true, ..Default::default() },
            ],
            ..Default::default()
        };
        let t = cluster_table(&st);
        assert!(t.contains("\n2*  "), "{t}");
        assert!(t.contains("\n1   "), "{t}");
        assert!(!t.contains("PAUSED"), "{t}");
        let paused =
            cluster_table(&proto::ClusterStatusResponse { scheduler_paused: true, unplaced_sessions: 7, ..st });
        assert!(paused.contains("scheduling is PAUSED (7 sessions waiting)"), "{paused}");
    }
}
