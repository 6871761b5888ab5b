//! Placement: which node a session goes to.
//!
//! Filters drop nodes that are not ready, lack the session's runtime, or lack
//! free CPU, memory or a session slot. Among the rest the emptiest node wins
//! (spread). A session that fits no node now but would fit an empty one waits
//! as PENDING with the reason; one that would fit no registered node even when
//! empty is refused at create with RESOURCE_EXHAUSTED.

use crate::state::{ClusterState, NodePhase, Resources, SpecRecord};

/// Templates the cluster knows, and the runtime each one needs.
pub fn template_runtime(template: &str) -> Option<&'static str> {
    match template {
        "default" | "python" | "node" | "bash" => Some("process"),
        _ => None,
    }
}

/// Names of the known templates, for error messages.
pub const KNOWN_TEMPLATES: &str = "default, python, node, bash";

/// Why a session cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplaceable {
    /// Wait: some node could take it once capacity frees up or a node comes back.
    Wait(String),
    /// Never: no registered node could hold it even when empty.
    Never(String),
}

/// Picks a node for `spec`.
pub fn place(state: &ClusterState, spec: &SpecRecord) -> Result<String, Unplaceable> {
    let runtime = template_runtime(&spec.template).unwrap_or("process");
    let need = Resources::of(spec);
    if state.nodes.is_empty() {
        return Err(Unplaceable::Wait("no node agent has registered yet".into()));
    }
    let with_runtime: Vec<_> = state.nodes.values().filter(|n| n.runtimes.iter().any(|r| r == runtime)).collect();
    if with_runtime.is_empty() {
        return Err(Unplaceable::Wait(format!("no registered node offers the {runtime} runtime")));
    }
    let empty = Resources::default();
    if !with_runtime.iter().any(|n| n.capacity.fits(&empty, &need)) {
        let biggest = with_runtime.iter().map(|n| n.capacity).max_by_key(|c| (c.memory_bytes, c.cpu_millis)).unwrap_or_default();
        return Err(Unplaceable::Never(format!(
            "no node can ever fit {} mCPU and {} bytes of memory; the largest node offers {} mCPU and {} bytes",
            need.cpu_millis, need.memory_bytes, biggest.cpu_millis, biggest.memory_bytes
        )));
    }
    let mut best: Option<(f64, &str)> = None;
    let mut not_ready = 0;
    for n in &with_runtime {
        if n.phase != NodePhase::Ready {
            not_ready += 1;
            continue;
        }
        let used = state.allocated_on(&n.id);
        if !n.capacity.fits(&used, &need) {
            continue;
        }
        // Spread: the lowest peak utilisation after placement wins; ties go to the lowest id.
        let frac = |u: u64, c: u64| if c == 0 { 1.0 } else { u as f64 / c as f64 };
        let score = frac(used.cpu_millis + need.cpu_millis, n.capacity.cpu_millis)
            .max(frac(used.memory_bytes + need.memory_bytes, n.capacity.memory_bytes))
            .max(frac(used.slots + 1, n.capacity.slots));
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, &n.id));
        }
    }
    match best {
        Some((_, id)) => Ok(id.to_string()),
        None if not_ready == with_runtime.len() => Err(Unplaceable::Wait("no node is ready".into())),
        None => Err(Unplaceable::Wait(format!(
            "waiting for capacity: no ready node has {} mCPU, {} bytes of memory and a free session slot",
            need.cpu_millis, need.memory_bytes
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, NodeRecord, Touched};

    fn node(id: &str, cpu: u64, slots: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: "x".into(),
            capacity: Resources { cpu_millis: cpu, memory_bytes: 1 << 30, slots },
            labels: Default::default(),
            runtimes: vec!["process".into()],
            phase: NodePhase::Ready,
            registered_at_ms: 0,
        }
    }

    fn spec(cpu: u32) -> SpecRecord {
        SpecRecord {
            template: "default".into(),
            cpu_millis: cpu,
            memory_bytes: 1 << 20,
            pids_limit: 64,
            env: Default::default(),
            labels: Default::default(),
            ttl_seconds: 60,
        }
    }

    #[test]
    fn spreads_waits_and_refuses() {
        let mut st = ClusterState::default();
        assert!(matches!(place(&st, &spec(100)), Err(Unplaceable::Wait(_))));
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("a", 2000, 4) }, &mut t);
        st.apply(Command::RegisterNode { node: node("b", 2000, 4) }, &mut t);
        assert!(matches!(place(&st, &spec(4000)), Err(Unplaceable::Never(_))));
        let first = place(&st, &spec(1500)).unwrap();
        st.allocated.insert(first.clone(), Resources { cpu_millis: 1500, memory_bytes: 1 << 20, slots: 1 });
        let second = place(&st, &spec(100)).unwrap();
        assert_ne!(first, second, "spread places on the emptier node");
        st.allocated.insert(second, Resources { cpu_millis: 1500, memory_bytes: 1 << 20, slots: 1 });
        assert!(matches!(place(&st, &spec(1000)), Err(Unplaceable::Wait(r)) if r.contains("waiting for capacity")));
    }
}
