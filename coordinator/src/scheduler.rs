//! Placement: which node a session goes to.
//!
//! Filters drop nodes that are not ready (down, cordoned or draining), lack
//! the session's runtime, do not carry the labels of its `node_selector`, or
//! lack free CPU, memory or a session slot. Among the rest the best score wins:
//! the emptiest node (spread, the default) or the fullest node that still fits
//! (bin-pack). On a large fleet the scheduler does not score every node: it
//! walks the ready nodes from a random start and stops after `candidates`
//! feasible ones (best-of-K, as Nomad and Sparrow do).
//!
//! A [`Placer`] places many sessions against one view of the state and counts
//! what it already handed out, so the leader can batch a whole round of
//! placements into one Raft entry. The state machine checks every placement
//! again at apply time, so a stale decision is skipped, never over-commits.
//!
//! A session that fits no node now but might later waits as PENDING with the
//! reason; one that no registered node could hold even when empty is refused
//! at create with RESOURCE_EXHAUSTED.

use std::collections::{BTreeMap, HashMap};

use rand::Rng;

use sandfleet_common::spec::Runtime;

use crate::pending::NoRoom;
use crate::state::{ClusterState, NodePhase, NodeRecord, PendingReason, Resources, SpecRecord};

/// Why a session cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplaceable {
    /// Wait: some node could take it once capacity frees up or a node comes back.
    Wait(PendingReason),
    /// Never: no registered node could hold it even when empty.
    Never(PendingReason),
}

/// How the scheduler scores feasible nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Strategy {
    /// Prefer the emptiest node (lowest peak utilisation after placement).
    #[default]
    Spread,
    /// Prefer the fullest node that still fits, keeping others empty.
    Binpack,
}

/// Scheduler settings, per cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementOptions {
    pub strategy: Strategy,
    /// Feasible nodes to score per placement; 0 scores every node.
    pub candidates: usize,
}

impl Default for PlacementOptions {
    fn default() -> Self {
        PlacementOptions { strategy: Strategy::Spread, candidates: 16 }
    }
}

/// Places one session (create-time placement), counting `reserved` (what the
/// creates placed but not yet applied hold, per node) as taken, so concurrent
/// creates spread instead of all choosing the node that was emptiest before
/// any of them committed.
pub fn place(
    state: &ClusterState,
    spec: &SpecRecord,
    opts: PlacementOptions,
    reserved: &HashMap<String, Resources>,
) -> Result<String, Unplaceable> {
    Placer::with_reserved(state, opts, reserved).place(spec)
}

/// Places sessions against one view of the state, remembering what it
/// already gave out.
pub struct Placer<'a> {
    state: &'a ClusterState,
    opts: PlacementOptions,
    ready: Vec<&'a NodeRecord>,
    /// Resources handed out by this placer, on top of `state.allocated`.
    given: HashMap<&'a str, Resources>,
    /// Shapes (runtime, selector hash, resources) already found to fit
    /// nowhere in this round, with the reason.
    failed: HashMap<(&'static [Runtime], u64, Resources), Unplaceable>,
    rng: rand::rngs::ThreadRng,
}

impl<'a> Placer<'a> {
    pub fn new(state: &'a ClusterState, opts: PlacementOptions) -> Self {
        let ready = state.nodes.values().filter(|n| n.phase == NodePhase::Ready).collect();
        Placer { state, opts, ready, given: HashMap::new(), failed: HashMap::new(), rng: rand::rng() }
    }

    /// A placer that counts `reserved` (creates placed but not yet applied,
    /// per node) as already given out.
    pub fn with_reserved(
        state: &'a ClusterState,
        opts: PlacementOptions,
        reserved: &HashMap<String, Resources>,
    ) -> Self {
        let mut placer = Placer::new(state, opts);
        if !reserved.is_empty() {
            let held: Vec<(&str, Resources)> =
                placer.ready.iter().filter_map(|n| reserved.get(&n.id).map(|r| (n.id.as_str(), *r))).collect();
            placer.given.extend(held);
        }
        placer
    }

    fn used(&self, node: &str) -> Resources {
        let mut used = self.state.allocated_on(node);
        if let Some(g) = self.given.get(node) {
            used.cpu_millis += g.cpu_millis;
            used.memory_bytes += g.memory_bytes;
            used.slots += g.slots;
        }
        used
    }

    /// Picks a node for `spec` and counts it as taken.
    pub fn place(&mut self, spec: &SpecRecord) -> Result<String, Unplaceable> {
        let runtime = spec.runtimes();
        let need = Resources::of(spec);
        let shape = (runtime, selector_hash(&spec.node_selector, &spec.image), need);
        // Capacity only shrinks within a round, so a shape that fit nowhere still fits nowhere.
        if let Some(why) = self.failed.get(&shape) {
            return Err(why.clone());
        }
        let n = self.ready.len();
        let limit = if self.opts.candidates == 0 { n } else { self.opts.candidates };
        let start = if n == 0 { 0 } else { self.rng.random_range(0..n) };
        let mut best: Option<(f64, &'a NodeRecord)> = None;
        let mut feasible = 0;
        for k in 0..n {
            let node = self.ready[(start + k) % n];
            if !node_matches(node, runtime, &spec.node_selector, &spec.image) {
                continue;
            }
            let used = self.used(&node.id);
            if !node.capacity.fits(&used, &need) {
                continue;
            }
            let frac = |u: u64, c: u64| if c == 0 { 1.0 } else { u as f64 / c as f64 };
            let peak = frac(used.cpu_millis + need.cpu_millis, node.capacity.cpu_millis)
                .max(frac(used.memory_bytes + need.memory_bytes, node.capacity.memory_bytes))
                .max(frac(used.slots + 1, node.capacity.slots));
            let score = match self.opts.strategy {
                Strategy::Spread => peak,
                Strategy::Binpack => -peak,
            };
            if best.is_none_or(|(b, bn)| score < b || (score == b && node.id < bn.id)) {
                best = Some((score, node));
            }
            feasible += 1;
            if feasible >= limit {
                break;
            }
        }
        match best {
            Some((_, node)) => {
                let g = self.given.entry(node.id.as_str()).or_default();
                g.cpu_millis += need.cpu_millis;
                g.memory_bytes += need.memory_bytes;
                g.slots += need.slots;
                Ok(node.id.clone())
            }
            None => {
                let why = self.explain(runtime, &spec.node_selector, &spec.image, &need);
                self.failed.insert(shape, why.clone());
                Err(why)
            }
        }
    }

    /// Why no node fits: a count of nodes per reason, like the Kubernetes scheduler's.
    fn explain(
        &self,
        runtime: &[Runtime],
        selector: &BTreeMap<String, String>,
        image: &str,
        need: &Resources,
    ) -> Unplaceable {
        let runtimes = runtime.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ");
        let nodes = &self.state.nodes;
        if nodes.is_empty() {
            return Unplaceable::Wait(PendingReason::NoNodes);
        }
        let eligible: Vec<&NodeRecord> = nodes.values().filter(|n| node_matches(n, runtime, selector, image)).collect();
        if eligible.is_empty() {
            let with_runtime = nodes.values().filter(|n| n.runtimes.iter().any(|r| runtime.contains(r))).count();
            let with_labels = nodes.values().filter(|n| node_matches(n, runtime, selector, "")).count();
            return Unplaceable::Wait(if with_runtime == 0 {
                PendingReason::NoRuntime { runtimes }
            } else if with_labels == 0 {
                PendingReason::NoLabels { nodes: with_runtime, runtimes, labels: show_labels(selector) }
            } else {
                PendingReason::NoImage { nodes: with_labels, runtimes, image: image.to_string() }
            });
        }
        let empty = Resources::default();
        if !eligible.iter().any(|n| n.capacity.fits(&empty, need)) {
            let biggest =
                eligible.iter().map(|n| n.capacity).max_by_key(|c| (c.memory_bytes, c.cpu_millis)).unwrap_or_default();
            return Unplaceable::Never(PendingReason::NeverFits {
                cpu_millis: need.cpu_millis,
                memory_bytes: need.memory_bytes,
                largest_cpu_millis: biggest.cpu_millis,
                largest_memory_bytes: biggest.memory_bytes,
            });
        }
        let mut room = NoRoom {
            nodes: nodes.len(),
            cpu_millis: need.cpu_millis,
            memory_bytes: need.memory_bytes,
            filtered: nodes.len() - eligible.len(),
            runtimes,
            ..Default::default()
        };
        for n in &eligible {
            match n.phase {
                NodePhase::Down => room.down += 1,
                NodePhase::Cordoned => room.cordoned += 1,
                NodePhase::Draining => room.draining += 1,
                NodePhase::Ready => room.full += 1,
            }
        }
        Unplaceable::Wait(PendingReason::NoRoom(room))
    }
}

/// What besides runtime and resources sets where a session may go: its node selector and image.
fn selector_hash(selector: &BTreeMap<String, String>, image: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    if selector.is_empty() && image.is_empty() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    selector.hash(&mut h);
    image.hash(&mut h);
    h.finish()
}

/// Whether `node` offers one of `runtimes`, carries every label of
/// `selector`, and holds `image` (when one is asked).
fn node_matches(node: &NodeRecord, runtimes: &[Runtime], selector: &BTreeMap<String, String>, image: &str) -> bool {
    node.runtimes.iter().any(|r| runtimes.contains(r))
        && selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
        && (image.is_empty() || node.images.contains(image))
}

fn show_labels(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::spec;
    use crate::state::{Command, NodeRecord, Touched};

    fn node(id: &str, cpu: u64, slots: u64) -> NodeRecord {
        NodeRecord {
            images: Default::default(),
            id: id.into(),
            address: "x".into(),
            capacity: Resources { cpu_millis: cpu, memory_bytes: 1 << 30, slots },
            labels: Default::default(),
            runtimes: vec![Runtime::Process],
            phase: NodePhase::Ready,
            registered_at_ms: 0,
            drain: None,
            operator_hold: None,
            agent_hold: None,
        }
    }

    const ALL: PlacementOptions = PlacementOptions { strategy: Strategy::Spread, candidates: 0 };

    #[test]
    fn spreads_waits_and_refuses() {
        let mut st = ClusterState::default();
        assert!(matches!(place(&st, &spec(100), ALL, &HashMap::new()), Err(Unplaceable::Wait(_))));
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("a", 2000, 4) }, &mut t);
        st.apply(Command::RegisterNode { node: node("b", 2000, 4) }, &mut t);
        assert!(matches!(place(&st, &spec(4000), ALL, &HashMap::new()), Err(Unplaceable::Never(_))));
        let first = place(&st, &spec(1500), ALL, &HashMap::new()).unwrap();
        st.allocated.insert(first.clone(), Resources { cpu_millis: 1500, memory_bytes: 1 << 20, slots: 1 });
        let second = place(&st, &spec(100), ALL, &HashMap::new()).unwrap();
        assert_ne!(first, second, "spread places on the emptier node");
        st.allocated.insert(second, Resources { cpu_millis: 1500, memory_bytes: 1 << 20, slots: 1 });
        assert!(
            matches!(place(&st, &spec(1000), ALL, &HashMap::new()), Err(Unplaceable::Wait(r)) if r.to_string().contains("waiting for capacity") && r.to_string().contains("2 lack free capacity"))
        );
    }

    /// Creates in flight (reserved, not yet applied) count as taken, so
    /// concurrent creates spread over equal nodes instead of piling onto one.
    #[test]
    fn reserved_resources_of_creates_in_flight_count_as_taken() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("a", 2000, 4) }, &mut t);
        st.apply(Command::RegisterNode { node: node("b", 2000, 4) }, &mut t);
        let mut reserved: HashMap<String, Resources> = HashMap::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = place(&st, &spec(500), ALL, &reserved).unwrap();
            reserved.entry(n.clone()).or_default().add(&Resources::of(&spec(500)));
            got.push(n);
        }
        got.sort();
        assert_eq!(got, ["a", "a", "b", "b"]);
        // A full reservation makes a node unfit, as an applied allocation would.
        let full = HashMap::from([("a".to_string(), Resources { cpu_millis: 2000, memory_bytes: 0, slots: 0 })]);
        for _ in 0..4 {
            assert_eq!(place(&st, &spec(500), ALL, &full).unwrap(), "b");
        }
    }

    #[test]
    fn binpack_fills_one_node_first() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        st.apply(Command::RegisterNode { node: node("a", 4000, 10) }, &mut t);
        st.apply(Command::RegisterNode { node: node("b", 4000, 10) }, &mut t);
        let opts = PlacementOptions { strategy: Strategy::Binpack, candidates: 0 };
        let mut p = Placer::new(&st, opts);
        let got: Vec<String> = (0..4).map(|_| p.place(&spec(1000)).unwrap()).collect();
        assert!(got.iter().all(|n| n == &got[0]), "bin-pack keeps to one node until it is full: {got:?}");
        assert_ne!(p.place(&spec(1000)).unwrap(), got[0], "the fifth goes to the other node");
        let mut p = Placer::new(&st, ALL);
        let got: Vec<String> = (0..4).map(|_| p.place(&spec(1000)).unwrap()).collect();
        assert_eq!(got.iter().filter(|n| *n == "a").count(), 2, "spread alternates: {got:?}");
    }

    #[test]
    fn a_session_with_an_image_goes_only_where_the_image_is() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        let mut docker = node("docker", 4000, 10);
        docker.runtimes = vec![Runtime::Docker];
        let mut with_image = docker.clone();
        with_image.id = "with-image".into();
        with_image.images.insert("docker.io/team/ml:1".into());
        let mut process = node("process", 4000, 10);
        process.images.insert("docker.io/team/ml:1".into());
        for n in [docker, with_image, process] {
            st.apply(Command::RegisterNode { node: n }, &mut t);
        }
        let mut s = spec(100);
        s.image = "docker.io/team/ml:1".into();
        for _ in 0..10 {
            // Not the process node, though it (wrongly) lists the image: it runs no images.
            assert_eq!(place(&st, &s, ALL, &HashMap::new()).unwrap(), "with-image");
        }
        s.image = "docker.io/team/other:2".into();
        let why = place(&st, &s, ALL, &HashMap::new()).unwrap_err();
        assert!(
            matches!(&why, Unplaceable::Wait(r) if r.to_string().contains("none of the 2 nodes with the docker or cri runtime has image docker.io/team/other:2")),
            "{why:?}"
        );
        // The shape cache tells images apart within one round.
        let mut p = Placer::new(&st, ALL);
        assert!(p.place(&s).is_err());
        s.image = "docker.io/team/ml:1".into();
        assert_eq!(p.place(&s).unwrap(), "with-image");
    }

    #[test]
    fn node_selector_runtime_and_phase_filter_nodes() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        let mut gpu = node("gpu", 4000, 10);
        gpu.labels.insert("zone".into(), "b".into());
        st.apply(Command::RegisterNode { node: node("plain", 4000, 10) }, &mut t);
        st.apply(Command::RegisterNode { node: gpu }, &mut t);
        let mut s = spec(100);
        s.node_selector.insert("zone".into(), "b".into());
        for _ in 0..10 {
            assert_eq!(place(&st, &s, ALL, &HashMap::new()).unwrap(), "gpu");
        }
        s.node_selector.insert("zone".into(), "c".into());
        assert!(
            matches!(place(&st, &s, ALL, &HashMap::new()), Err(Unplaceable::Wait(r)) if r.to_string().contains("carries the labels zone=c"))
        );
        st.apply(Command::cordon("plain".into(), true), &mut t);
        st.apply(Command::NodeDown { node_id: "gpu".into(), now_ms: 1, keep: vec![] }, &mut t);
        assert!(
            matches!(place(&st, &spec(100), ALL, &HashMap::new()), Err(Unplaceable::Wait(r)) if r.to_string().starts_with("no node is ready") && r.to_string().contains("1 are down") && r.to_string().contains("1 are cordoned"))
        );
    }

    #[test]
    fn a_batch_never_overcommits_and_best_of_k_stays_feasible() {
        let mut st = ClusterState::default();
        let mut t = Touched::default();
        for i in 0..200 {
            st.apply(Command::RegisterNode { node: node(&format!("n{i:03}"), 1000, 3) }, &mut t);
        }
        let mut p = Placer::new(&st, PlacementOptions { strategy: Strategy::Spread, candidates: 4 });
        let mut per_node: HashMap<String, u64> = HashMap::new();
        for _ in 0..600 {
            *per_node.entry(p.place(&spec(300)).unwrap()).or_default() += 1;
        }
        assert_eq!(per_node.len(), 200);
        assert!(per_node.values().all(|&c| c == 3), "every slot used exactly once");
        assert!(matches!(p.place(&spec(300)), Err(Unplaceable::Wait(_))), "the 601st finds no room");
    }
}
