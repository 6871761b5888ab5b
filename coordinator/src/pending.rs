//! Why a session is not running yet: [`PendingReason`], stored with the
//! session and rendered to the human text of the proto's `pending_reason`.
//!
//! The state machine, the scheduler, the leader's planners and the create
//! path all name reasons with it, so none of them depends on another for a
//! string. Records written before the enum existed hold the text itself;
//! those load as [`PendingReason::Other`] and render the same text.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a session is not running yet. `Display` gives the text clients see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingReason {
    /// Nothing: the session runs, or has ended.
    #[default]
    None,
    /// An operator paused placement cluster-wide.
    Paused,
    /// Placed; its agent is preparing it.
    Starting,
    /// Created on a member that does not lead: the leader places it.
    AwaitingLeader,
    /// The node chosen at create filled up before the create committed.
    FilledUp { node: String },
    /// Moved off a draining node, to be placed elsewhere.
    Moving { node: String },
    /// Its node stopped heartbeating; it is placed again, after `backoff_ms` (0: at once).
    NodeLost { node: String, backoff_ms: u64 },
    /// No node agent has registered.
    NoNodes,
    /// No registered node offers any of `runtimes` ("a or b").
    NoRuntime { runtimes: String },
    /// Of the `nodes` offering one of `runtimes`, none carries `labels` ("k=v,...").
    NoLabels { nodes: usize, runtimes: String, labels: String },
    /// Of the `nodes` offering one of `runtimes` (with the labels asked),
    /// none advertises `image`, the session's template's.
    NoImage { nodes: usize, runtimes: String, image: String },
    /// No eligible node could hold the session even when empty.
    NeverFits { cpu_millis: u64, memory_bytes: u64, largest_cpu_millis: u64, largest_memory_bytes: u64 },
    /// No eligible node has room now; counts per cause, like the Kubernetes scheduler's.
    NoRoom(NoRoom),
    /// Any other text, in particular reasons stored before this type existed.
    #[serde(untagged)]
    Other(String),
}

/// The node counts of [`PendingReason::NoRoom`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoRoom {
    /// Registered nodes.
    pub nodes: usize,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Eligible ready nodes without the free capacity.
    pub full: usize,
    pub down: usize,
    pub cordoned: usize,
    pub draining: usize,
    /// Nodes without the runtime or the selected labels.
    pub filtered: usize,
    /// The runtimes it may run in ("a or b").
    pub runtimes: String,
}

impl PendingReason {
    /// True when there is no reason (the session is not waiting).
    pub fn is_none(&self) -> bool {
        matches!(self, PendingReason::None) || matches!(self, PendingReason::Other(s) if s.is_empty())
    }
}

impl fmt::Display for PendingReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingReason::None => Ok(()),
            PendingReason::Paused => {
                f.write_str("scheduling is paused by an operator (sandfleet cluster scheduler resume)")
            }
            PendingReason::Starting => f.write_str("starting on its node"),
            PendingReason::AwaitingLeader => f.write_str("waiting for the leader to place it"),
            PendingReason::FilledUp { node } => {
                write!(f, "node {node} filled up before placement; waiting for capacity")
            }
            PendingReason::Moving { node } => write!(f, "moving off draining node {node}"),
            PendingReason::NodeLost { node, backoff_ms: 0 } => {
                write!(f, "node {node} stopped heartbeating; placing it again")
            }
            PendingReason::NodeLost { node, backoff_ms } => {
                write!(f, "node {node} stopped heartbeating; placing it again after a {backoff_ms} ms backoff")
            }
            PendingReason::NoNodes => f.write_str("no node agent has registered yet"),
            PendingReason::NoRuntime { runtimes } => write!(f, "no registered node offers the {runtimes} runtime"),
            PendingReason::NoLabels { nodes, runtimes, labels } => {
                write!(f, "none of the {nodes} nodes with the {runtimes} runtime carries the labels {labels}")
            }
            PendingReason::NoImage { nodes, runtimes, image } => write!(
                f,
                "none of the {nodes} nodes with the {runtimes} runtime has image {image} (nodes never pull: load it \
                 into a node's engine, and its agent advertises it within seconds)"
            ),
            PendingReason::NeverFits { cpu_millis, memory_bytes, largest_cpu_millis, largest_memory_bytes } => write!(
                f,
                "no node can ever fit {cpu_millis} mCPU and {memory_bytes} bytes of memory; the largest eligible node \
                 offers {largest_cpu_millis} mCPU and {largest_memory_bytes} bytes"
            ),
            PendingReason::NoRoom(r) => {
                let mut parts = Vec::new();
                for (count, what) in [
                    (r.full, "lack free capacity"),
                    (r.down, "are down"),
                    (r.cordoned, "are cordoned"),
                    (r.draining, "are draining"),
                ] {
                    if count > 0 {
                        parts.push(format!("{count} {what}"));
                    }
                }
                if r.filtered > 0 {
                    parts.push(format!("{} lack the {} runtime or the selected labels", r.filtered, r.runtimes));
                }
                let prefix = if r.full == 0 && r.down + r.cordoned + r.draining > 0 {
                    "no node is ready"
                } else {
                    "waiting for capacity"
                };
                write!(
                    f,
                    "{prefix}: 0/{} nodes can take {} mCPU, {} bytes of memory and a session slot: {}",
                    r.nodes,
                    r.cpu_millis,
                    r.memory_bytes,
                    parts.join(", ")
                )
            }
            PendingReason::Other(text) => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_clients_saw_before() {
        let cases = [
            (PendingReason::None, ""),
            (PendingReason::Paused, "scheduling is paused by an operator (sandfleet cluster scheduler resume)"),
            (PendingReason::Starting, "starting on its node"),
            (PendingReason::FilledUp { node: "n1".into() }, "node n1 filled up before placement; waiting for capacity"),
            (PendingReason::Moving { node: "n1".into() }, "moving off draining node n1"),
            (
                PendingReason::NodeLost { node: "n1".into(), backoff_ms: 0 },
                "node n1 stopped heartbeating; placing it again",
            ),
            (
                PendingReason::NodeLost { node: "n1".into(), backoff_ms: 400 },
                "node n1 stopped heartbeating; placing it again after a 400 ms backoff",
            ),
            (
                PendingReason::NoRoom(NoRoom {
                    nodes: 3,
                    cpu_millis: 100,
                    memory_bytes: 7,
                    cordoned: 1,
                    down: 1,
                    filtered: 1,
                    runtimes: "process".into(),
                    ..Default::default()
                }),
                "no node is ready: 0/3 nodes can take 100 mCPU, 7 bytes of memory and a session slot: 1 are down, \
                 1 are cordoned, 1 lack the process runtime or the selected labels",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn round_trips_through_json_and_loads_the_old_text_form() {
        for reason in [
            PendingReason::None,
            PendingReason::Paused,
            PendingReason::NodeLost { node: "n1".into(), backoff_ms: 400 },
            PendingReason::NoRoom(NoRoom { nodes: 2, full: 2, ..Default::default() }),
            PendingReason::Other("anything".into()),
        ] {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(serde_json::from_str::<PendingReason>(&json).unwrap(), reason, "{json}");
        }
        // Records from before the enum hold the text: it loads and renders unchanged.
        let old: PendingReason = serde_json::from_str(r#""moving off draining node n1""#).unwrap();
        assert_eq!(old, PendingReason::Other("moving off draining node n1".into()));
        assert_eq!(old.to_string(), "moving off draining node n1");
        let empty: PendingReason = serde_json::from_str(r#""""#).unwrap();
        assert!(empty.is_none());
        assert_eq!(empty.to_string(), "");
    }
}
