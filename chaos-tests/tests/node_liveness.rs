//! Node liveness, rescheduling and fencing with real processes: an agent that
//! dies or freezes loses its sessions to another node (LOST, then placed again
//! with generation + 1), and an agent cut off from the coordinators stops its
//! own copies before they are placed elsewhere.
//!
//! The coordinators run with a short node TTL (`--agent-heartbeat 500ms
//! --node-ttl 3s`, so agents fence after 1.5 s) to keep the tests quick.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sandfleet::{proto, Client};
use sandfleet_testkit::helpers::{create_running, small_session};
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};

use common::{
    agent_index, assert_moved_work_and_kept_stay, cgroups_on, node_state, start, wait_moved, wait_old_copies_gone,
    MOVE_SLACK, NODE_TTL,
};

async fn two_nodes() -> Cluster {
    let builder = ClusterBuilder::new().coordinators(1).agents(2).coordinator_args([
        "--agent-heartbeat",
        "500ms",
        "--node-ttl",
        "3s",
    ]);
    start(builder).await
}

/// Four running sessions, spread over both nodes; returns them by node.
async fn spread_sessions(client: &Client) -> BTreeMap<String, Vec<proto::Session>> {
    let mut by_node: BTreeMap<String, Vec<proto::Session>> = BTreeMap::new();
    for i in 0..4 {
        let s = create_running(client, small_session(&format!("live{i}"))).await.unwrap();
        by_node.entry(s.node_id.clone()).or_default().push(s);
    }
    assert_eq!(by_node.len(), 2, "spread placement uses both nodes: {:?}", by_node.keys());
    by_node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_killed_agent_run_elsewhere_with_a_new_generation() {
    require_facilities!();
    let mut cluster = two_nodes().await;
    let client = cluster.client().await;
    let by_node = spread_sessions(&client).await;
    let (dead, victims) = by_node.iter().next().map(|(n, v)| (n.clone(), v.clone())).unwrap();
    let (alive, kept) = by_node.iter().nth(1).map(|(n, v)| (n.clone(), v.clone())).unwrap();

    cluster.kill(Target::Agent(agent_index(&cluster, &dead))).await.unwrap();
    let killed = Instant::now();
    let moved = wait_moved(&client, &victims, &alive, NODE_TTL + MOVE_SLACK).await;
    let took = killed.elapsed();
    eprintln!("{} sessions of {dead} running on {alive} {took:?} after SIGKILL", moved.len());
    assert!(took >= NODE_TTL - Duration::from_millis(600), "not moved before the node TTL ran out ({took:?})");
    assert_eq!(node_state(&client, &dead).await, "down");

    // The moved sessions work on their new node; those of the surviving node were not touched.
    assert_moved_work_and_kept_stay(&client, &moved, &kept, &alive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_loses_its_sessions_and_stops_its_old_copies() {
    require_facilities!();
    let cluster = two_nodes().await;
    let client = cluster.client().await;
    let by_node = spread_sessions(&client).await;
    let (frozen, victims) = by_node.iter().next().map(|(n, v)| (n.clone(), v.clone())).unwrap();
    let alive = by_node.keys().nth(1).unwrap().clone();
    let idx = agent_index(&cluster, &frozen);
    let old_cgroups = cgroups_on(&victims, &frozen);

    cluster.proc(Target::Agent(idx)).signal(Signal::SIGSTOP).unwrap();
    wait_moved(&client, &victims, &alive, NODE_TTL + MOVE_SLACK).await;
    assert_eq!(node_state(&client, &frozen).await, "down");

    // Thawed, the old agent finds itself cut off for longer than fence_after:
    // it stops its copies at once, then heartbeats and is ready again; each
    // moved session has exactly one copy, on the new node.
    cluster.proc(Target::Agent(idx)).signal(Signal::SIGCONT).unwrap();
    wait_old_copies_gone(&client, &old_cgroups, &frozen, "SIGCONT", &victims, &alive).await;
    let log = std::fs::read_to_string(&cluster.agents[idx].log_path).unwrap();
    assert!(log.contains("(fencing)"), "the thawed agent fenced itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_gets_no_new_sessions() {
    require_facilities!();
    let cluster = two_nodes().await;
    let client = cluster.client().await;
    let (a, b) = (cluster.agents[0].id.clone(), cluster.agents[1].id.clone());

    let node = client.cordon_node(&a, true).await.unwrap();
    assert_eq!(node.state, "cordoned");
    assert_eq!(client.cordon_node(&a, true).await.unwrap().state, "cordoned", "cordoning twice is fine");
    for i in 0..3 {
        let s = create_running(&client, small_session(&format!("cordon{i}"))).await.unwrap();
        assert_eq!(s.node_id, b, "nothing new lands on the cordoned node");
    }
    assert_eq!(client.cordon_node(&a, false).await.unwrap().state, "ready");
    let s = create_running(&client, small_session("uncordoned")).await.unwrap();
    assert_eq!(s.node_id, a, "spread placement prefers the emptier, uncordoned node");

    // Bad input changes nothing.
    let err = client.cordon_node("no-such-node", true).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    let err = client.cordon_node("Bad Id!", true).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert_eq!(node_state(&client, &a).await, "ready");
}
