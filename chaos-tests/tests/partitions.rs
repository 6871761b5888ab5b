//! Network partitions with real processes, each in its own network namespace
//! (see `sandfleet_testkit::netns`):
//! - an agent cut off from every coordinator fences itself, is declared down,
//!   and its sessions run on another node with a newer generation; after the
//!   heal its old copies are gone and the node is ready again;
//! - a leader cut off from the other coordinators is replaced by a leader of
//!   the majority, writes go on, and after the heal every member converges.
//!
//! Coordinators run with `--agent-heartbeat 500ms --node-ttl 3s` (agents fence
//! after 1.5 s).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sandfleet::proto;
use sandfleet_testkit::helpers::{create_running, small_session, state_of};
use sandfleet_testkit::{host, Cluster, ClusterBuilder, NetworkChoice, NetworkMode};

use common::{
    assert_moved_work_and_kept_stay, cgroups_on, node_state, wait_moved, wait_old_copies_gone, MOVE_SLACK, NODE_TTL,
};

/// A cluster in namespaces. Without root/ip/nsenter/iptables the test is
/// skipped like other facility-dependent tests (a failure with
/// `SANDFLEET_REQUIRE_FACILITIES=1`).
async fn start(coordinators: usize, agents: usize) -> Option<Cluster> {
    if let Some(why) = sandfleet_testkit::netns::unavailable_reason() {
        let msg = format!("SKIPPED (facility missing): network namespaces for partitions: {why}");
        if std::env::var("SANDFLEET_REQUIRE_FACILITIES").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("{msg}");
        return None;
    }
    let builder = ClusterBuilder::new()
        .coordinators(coordinators)
        .agents(agents)
        .network(NetworkChoice::Namespaces)
        .coordinator_args(["--agent-heartbeat", "500ms", "--node-ttl", "3s"]);
    let cluster = builder.start().await.unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    assert_eq!(cluster.network_mode(), NetworkMode::Namespaces);
    Some(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_agent_loses_its_sessions_to_another_node_and_returns_after_the_heal() {
    require_facilities!();
    let Some(mut cluster) = start(1, 2).await else { return };
    let client = cluster.client().await;
    // The harness reaches everyone through the bridge, at namespace addresses.
    let gw = cluster.network().unwrap().gateway().to_string();
    assert!(
        cluster.agents.iter().all(|a| a.addr.starts_with(&gw[..gw.len() - 1]) && a.netns.is_some()),
        "agents listen on their namespace addresses: {:?}",
        cluster.agents.iter().map(|a| a.addr.clone()).collect::<Vec<_>>()
    );

    let mut by_node: BTreeMap<String, Vec<proto::Session>> = BTreeMap::new();
    for i in 0..4 {
        let s = create_running(&client, small_session(&format!("part{i}"))).await.unwrap();
        by_node.entry(s.node_id.clone()).or_default().push(s);
    }
    assert_eq!(by_node.len(), 2, "spread placement uses both nodes: {:?}", by_node.keys());
    let (cut, victims) = by_node.iter().next().map(|(n, v)| (n.clone(), v.clone())).unwrap();
    let (alive, kept) = by_node.iter().nth(1).map(|(n, v)| (n.clone(), v.clone())).unwrap();
    let idx = cluster.agents.iter().position(|a| a.id == cut).unwrap();
    let old_cgroups = cgroups_on(&victims, &cut);
    let agent_pid = cluster.agents[idx].pid().unwrap();
    // nsenter execs: the pid the harness signals is the agent itself.
    assert_eq!(host::process(agent_pid as i32).map(|p| p.comm), Some("sandfleet-agent".to_string()));

    cluster.isolate_agent(idx).await.unwrap();
    let isolated = Instant::now();
    assert_eq!(cluster.partitions().len(), 1);
    let moved = wait_moved(&client, &victims, &alive, NODE_TTL + MOVE_SLACK).await;
    let took = isolated.elapsed();
    eprintln!("{} sessions of {cut} running on {alive} {took:?} after the partition", moved.len());
    assert!(took >= NODE_TTL - Duration::from_millis(600), "moved before the node TTL ran out ({took:?})");
    assert_eq!(node_state(&client, &cut).await, "down");
    // The cut-off agent still runs (it was partitioned, not killed) and fenced itself:
    // no process of its old copies is left while the new copies run.
    assert!(cluster.agents[idx].is_running(), "the isolated agent is alive");
    assert_eq!(cluster.agents[idx].pid(), Some(agent_pid));
    for s in &victims {
        let left: Vec<_> = host::processes_in_cgroup_matching(&s.id)
            .into_iter()
            .filter(|p| std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).is_ok_and(|c| c.contains(&cut)))
            .collect();
        assert!(left.is_empty(), "old copy of {} still has processes on {cut}: {left:?}", s.id);
    }
    let log = std::fs::read_to_string(&cluster.agents[idx].log_path).unwrap();
    assert!(log.contains("(fencing)"), "the isolated agent fenced itself");

    cluster.heal().await.unwrap();
    assert!(cluster.partitions().is_empty());
    // One copy of each moved session, on the new node.
    wait_old_copies_gone(&client, &old_cgroups, &cut, "the heal", &victims, &alive).await;
    assert_moved_work_and_kept_stay(&client, &moved, &kept, &alive).await;
    // The healed node takes new sessions again.
    cluster.wait_nodes_ready(Duration::from_secs(20)).await.unwrap();
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_by_the_majority_and_converges_after_the_heal() {
    require_facilities!();
    let Some(mut cluster) = start(3, 1).await else { return };
    let client = cluster.client().await;
    let before = create_running(&client, small_session("before")).await.unwrap();

    let status = cluster.status().await.unwrap();
    let old = status.leader_id;
    let li = cluster.coordinator_index(old).expect("a leader");
    cluster.isolate_coordinator(li).await.unwrap();
    let isolated = Instant::now();

    // The majority elects a new leader.
    let majority: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let new_leader = loop {
        let mut seen = Vec::new();
        for &i in &majority {
            if let Ok(s) = cluster.status_of(i).await {
                seen.push(s.leader_id);
            }
        }
        if seen.len() == majority.len() && seen.iter().all(|l| *l != 0 && *l != old && *l == seen[0]) {
            break seen[0];
        }
        assert!(isolated.elapsed() < Duration::from_secs(30), "no new leader among the majority: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("leader {old} isolated; {new_leader} leads after {:?}", isolated.elapsed());
    assert!(majority.contains(&cluster.coordinator_index(new_leader).unwrap()));

    // Writes succeed through the majority.
    let majority_client =
        cluster.client_for(majority.iter().map(|i| cluster.coordinators[*i].addr.clone())).connect().await.unwrap();
    let during = create_running(&majority_client, small_session("during")).await.unwrap();
    majority_client.delete_session(&before.id).await.unwrap();

    // The isolated old leader cannot commit anything: a write sent only to it fails.
    let lonely = cluster
        .client_for([cluster.coordinators[li].addr.clone()])
        .request_timeout(Duration::from_secs(4))
        .max_retries(0)
        .connect()
        .await
        .unwrap();
    let rid = sandfleet_testkit::helpers::request_id("minority");
    let r = lonely.create_session(small_session("x").request_id(rid.clone())).await;
    assert!(r.is_err(), "a write through the isolated old leader succeeded: {r:?}");

    // Not asserted here: a client configured with every coordinator whose
    // preferred coordinator is the isolated old leader. The old leader never
    // answers a write it cannot commit, so the call ends in a client-side
    // timeout, which the SDK neither retries nor uses to move on to another
    // coordinator; such a client stays stuck until the heal.

    cluster.heal().await.unwrap();
    let converged = cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
    assert!(converged.members.iter().all(|m| m.role != "unreachable"));
    assert_eq!(converged.members.iter().filter(|m| m.role == "leader").count(), 1, "{converged:?}");
    // The old leader rejoined and answers with the same state.
    let back = cluster.status_of(li).await.unwrap();
    assert_ne!(back.leader_id, 0);
    let got = client.get_session(&during.id).await.unwrap();
    assert_eq!(got.request_id, during.request_id);
    assert_eq!(state_of(&client.get_session(&before.id).await.unwrap()), proto::SessionState::Terminated);
    // The write that only reached the minority was never committed.
    let listed = sandfleet_testkit::helpers::list_all_sessions(&client, &[], &[]).await.unwrap();
    assert!(listed.iter().all(|s| s.request_id != rid), "the minority write {rid} became a session");
    // Stopped by Drop, like the other tests: `shutdown()` would also demand a
    // clean exit, and a coordinator SIGTERMed right after a partition heals
    // sometimes aborts in RocksDB ("pthread lock: Invalid argument"), a
    // shutdown bug of the coordinator that this test is not about.
    drop(cluster);
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_are_exact_iptables_rules_and_everything_is_removed_on_drop() {
    require_facilities!();
    let Some(mut cluster) = start(1, 1).await else { return };
    let net = cluster.network().unwrap();
    let (id, bridge) = (net.id().to_string(), net.bridge().to_string());
    let hosts = net.hosts().to_vec();
    assert_eq!(hosts.len(), 2, "one namespace per process: {hosts:?}");
    let agent_ns = cluster.agents[0].netns.clone().unwrap();
    let coordinator_ip = cluster.ip(sandfleet_testkit::Target::Coordinator(0)).unwrap();
    assert!(sh("iptables -w -S FORWARD").contains(&format!("-i {bridge} -o {bridge} -j ACCEPT")));

    let rules = || sh(&format!("nsenter --net={} iptables -w -S", agent_ns.ns_path().display()));
    cluster.isolate_agent(0).await.unwrap();
    let cut = rules();
    assert!(cut.contains(&format!("-A INPUT -s {coordinator_ip}/32 -j DROP")), "{cut}");
    assert!(cut.contains(&format!("-A OUTPUT -d {coordinator_ip}/32 -j DROP")), "{cut}");
    cluster.isolate_agent(0).await.unwrap();
    assert_eq!(rules(), cut, "cutting twice adds nothing");
    cluster.heal_target(sandfleet_testkit::Target::Agent(0)).await.unwrap();
    assert!(!rules().contains("DROP"), "healing removes exactly the cut's rules: {}", rules());
    assert!(cluster.partitions().is_empty());

    drop(cluster);
    let netns = sh("ip netns list");
    let links = sh("ip -o link show");
    for h in &hosts {
        assert!(!netns.contains(&h.ns), "namespace {} left behind: {netns}", h.ns);
        assert!(
            !links.contains(&format!("{}@", h.veth)) && !links.contains(&format!("{}:", h.veth)),
            "veth {} left",
            h.veth
        );
    }
    assert!(!links.contains(&format!("{bridge}:")), "bridge {bridge} left: {links}");
    assert!(!sh("iptables -w -S FORWARD").contains(&bridge), "FORWARD rule of {bridge} left");
    assert!(!std::path::Path::new(&format!("{}/net-{id}.owner", sandfleet_testkit::netns::STATE_DIR)).exists());
}
