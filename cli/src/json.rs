//! JSON views of the API messages (prost types are not serde types).
//!
//! Enums are written by their short names (`"RUNNING"`, `"FILE"`), timestamps
//! as Unix milliseconds, and byte strings not at all (they never appear in
//! these messages).

use serde_json::{json, Value};

use sandfleet::proto;
use sandfleet::session::state_name;

/// A session spec.
pub fn spec_to_json(spec: &proto::SessionSpec) -> Value {
    json!({
        "template": spec.template,
        "cpu_millis": spec.cpu_millis,
        "memory_bytes": spec.memory_bytes,
        "pids_limit": spec.pids_limit,
        "env": spec.env,
        "labels": spec.labels,
        "ttl_seconds": spec.ttl_seconds,
        "node_selector": spec.node_selector,
        "runtime": spec.runtime,
        "idle_timeout_seconds": spec.idle_timeout_seconds,
        "restart_policy": spec.restart_policy.as_ref().map(|p| json!({
            "lost_after_ms": p.lost_after_ms,
            "max_attempts": p.max_attempts,
            "backoff_ms": p.backoff_ms,
        })),
    })
}

/// A whole session, token included when the server sent one.
pub fn session_to_json(s: &proto::Session) -> Value {
    json!({
        "id": s.id,
        "state": state_name(s.state),
        "spec": s.spec.as_ref().map(spec_to_json),
        "node_id": s.node_id,
        "node_address": s.node_address,
        "generation": s.generation,
        "request_id": s.request_id,
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "expires_at_ms": s.expires_at_ms,
        "pending_reason": s.pending_reason,
        "message": s.message,
        "restarts": s.restarts,
        "not_before_ms": s.not_before_ms,
        "token": s.token,
    })
}

fn capacity_to_json(c: Option<&proto::NodeCapacity>) -> Value {
    let c = c.cloned().unwrap_or_default();
    json!({ "cpu_millis": c.cpu_millis, "memory_bytes": c.memory_bytes, "session_slots": c.session_slots })
}

/// A node agent.
pub fn node_to_json(n: &proto::Node) -> Value {
    json!({
        "id": n.id,
        "address": n.address,
        "state": n.state,
        "capacity": capacity_to_json(n.capacity.as_ref()),
        "allocated": capacity_to_json(n.allocated.as_ref()),
        "labels": n.labels,
        "last_heartbeat_ms": n.last_heartbeat_ms,
        "session_count": n.session_count,
        "runtimes": n.runtimes,
        "drain": n.drain.as_ref().map(|d| json!({
            "started_at_ms": d.started_at_ms,
            "deadline_ms": d.deadline_ms,
            "max_parallel": d.max_parallel,
            "remaining": d.remaining,
            "moving": d.moving,
        })),
    })
}

/// One coordinator.
pub fn member_to_json(m: &proto::ClusterMember) -> Value {
    json!({
        "id": m.id,
        "address": m.address,
        "role": m.role,
        "term": m.term,
        "last_log_index": m.last_log_index,
        "applied_index": m.applied_index,
        "snapshot_index": m.snapshot_index,
        "purged_index": m.purged_index,
        "state_digest": m.state_digest,
        "voter": m.voter,
    })
}

/// Cluster status: the leader id and every member.
pub fn cluster_status_to_json(s: &proto::ClusterStatusResponse) -> Value {
    json!({
        "leader_id": s.leader_id,
        "members": s.members.iter().map(member_to_json).collect::<Vec<_>>(),
        "scheduler_paused": s.scheduler_paused,
        "unplaced_sessions": s.unplaced_sessions,
    })
}

/// A directory entry.
pub fn file_entry_to_json(e: &proto::FileEntry) -> Value {
    let kind = proto::FileKind::try_from(e.kind)
        .map(|k| k.as_str_name().trim_start_matches("FILE_KIND_"))
        .unwrap_or("UNKNOWN");
    json!({
        "name": e.name,
        "kind": kind,
        "size": e.size,
        "mode": e.mode,
        "modified_at_ms": e.modified_at_ms,
    })
}

/// How an exec ended.
pub fn exit_status_to_json(e: &proto::ExitStatus) -> Value {
    json!({
        "exit_code": e.exit_code,
        "signal": e.signal,
        "duration_ms": e.duration_ms,
        "timed_out": e.timed_out,
        "oom_killed": e.oom_killed,
        "output_truncated": e.output_truncated,
        "message": e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_json_has_names_and_spec() {
        let mut spec = proto::SessionSpec { template: "default".into(), cpu_millis: 500, ..Default::default() };
        spec.labels.insert("team".into(), "ml".into());
        let s = proto::Session {
            id: "0190c8f2-0000-7000-8000-000000000001".into(),
            spec: Some(spec),
            state: proto::SessionState::Running as i32,
            node_id: "n1".into(),
            node_address: "10.0.0.1:7071".into(),
            generation: 2,
            created_at_ms: 1_700_000_000_000,
            token: "sf1.x.y".into(),
            ..Default::default()
        };
        let v = session_to_json(&s);
        assert_eq!(v["state"], "RUNNING");
        assert_eq!(v["id"], s.id);
        assert_eq!(v["spec"]["cpu_millis"], 500);
        assert_eq!(v["spec"]["labels"]["team"], "ml");
        assert_eq!(v["generation"], 2);
        assert_eq!(v["created_at_ms"], 1_700_000_000_000_i64);
        assert_eq!(v["token"], "sf1.x.y");

        let bare = session_to_json(&proto::Session { state: 42, ..Default::default() });
        assert_eq!(bare["state"], "UNKNOWN");
        assert!(bare["spec"].is_null());
    }

    #[test]
    fn other_views() {
        let st = proto::ClusterStatusResponse {
            leader_id: 1,
            members: vec![proto::ClusterMember { id: 1, role: "leader".into(), voter: true, ..Default::default() }],
            scheduler_paused: true,
            unplaced_sessions: 3,
        };
        let v = cluster_status_to_json(&st);
        assert_eq!(v["leader_id"], 1);
        assert_eq!((v["scheduler_paused"].as_bool(), v["unplaced_sessions"].as_u64()), (Some(true), Some(3)));
        assert_eq!(v["members"][0]["role"], "leader");
        let e = proto::FileEntry { name: "a".into(), kind: proto::FileKind::Directory as i32, ..Default::default() };
        assert_eq!(file_entry_to_json(&e)["kind"], "DIRECTORY");
        let n = proto::Node { id: "n1".into(), ..Default::default() };
        assert_eq!(node_to_json(&n)["capacity"]["cpu_millis"], 0);
    }
}
