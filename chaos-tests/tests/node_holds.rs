//! An agent's own hold on its node (AgentService.SetNodeSchedulable), with real
//! coordinator and agent binaries over mutual TLS: an agent cordons and drains
//! its own node and lifts its hold again, an operator's cordon stays through
//! the agent's lifting (and the agent's through an operator's uncordon), and an
//! agent cannot touch another node (PERMISSION_DENIED).
//!
//! `sandfleet-agent --kube-node-name` is what calls this RPC, following its
//! Kubernetes Node. That part is not run here: it needs an API server, and
//! none can run on these machines (its watch loop is tested against kube-rs's
//! mock service in node-agent/src/kubernetes). The test calls the RPC as the
//! agent does, with the agent's own certificate.

#[macro_use]
mod common;

use std::time::Instant;

use sandfleet::{proto, Client};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{create_running, small_session};
use sandfleet_testkit::{Cluster, ClusterBuilder, Target, TlsPaths};

use common::{agent_index, cli, show, start, wait_moved, MOVE_SLACK};

/// The TLS files agent `node` runs with, from its command line.
fn agent_tls(cluster: &Cluster, node: &str) -> TlsPaths {
    let args = &cluster.proc(Target::Agent(agent_index(cluster, node))).args;
    let flag = |f: &str| {
        let i = args.iter().position(|a| a == f).unwrap_or_else(|| panic!("the agent runs with {f}: {args:?}"));
        std::path::PathBuf::from(&args[i + 1])
    };
    TlsPaths { cert: flag("--tls-cert"), key: flag("--tls-key"), ca: flag("--tls-ca") }
}

/// AgentService as agent `node` (its certificate), on the first coordinator.
fn as_agent(
    cluster: &Cluster,
    node: &str,
) -> proto::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let tls = agent_tls(cluster, node);
    let channel =
        cluster.channel_as(&cluster.coordinator_addrs()[0], IdentityKind::Coordinator, Some(&tls)).expect("a channel");
    proto::agent_service_client::AgentServiceClient::new(channel)
}

fn hold(cordoned: bool, drain: bool, reason: &str) -> Option<proto::AgentHold> {
    Some(proto::AgentHold { cordoned, drain, reason: reason.into() })
}

async fn set(
    api: &mut proto::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    node: &str,
    hold: Option<proto::AgentHold>,
) -> Result<proto::Node, tonic::Status> {
    let req = proto::SetNodeSchedulableRequest { node_id: node.into(), hold };
    Ok(api.set_node_schedulable(req).await?.into_inner().node.expect("the node after the change"))
}

async fn node(client: &Client, id: &str) -> proto::Node {
    client.list_nodes().await.unwrap().into_iter().find(|n| n.id == id).expect("a registered node")
}

fn holds(n: &proto::Node) -> Vec<(String, bool, String)> {
    n.holds.iter().map(|h| (h.by.clone(), h.drain, h.reason.clone())).collect()
}

const TAINT: &str = "kubernetes: NoExecute taint example.com/maintenance";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cordons_and_drains_its_own_node_and_no_other() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(2)).await;
    assert!(cluster.pki().is_some(), "the test runs with mutual TLS, so agent identities are bound");
    let client = cluster.client().await;
    let (a, b) = (cluster.agents[0].id.clone(), cluster.agents[1].id.clone());

    // Two sessions on a: b is cordoned (by the operator) meanwhile.
    client.cordon_node(&b, true).await.unwrap();
    let mut on_a = Vec::new();
    for i in 0..2 {
        let s = create_running(&client, small_session(&format!("hold{i}"))).await.unwrap();
        assert_eq!(s.node_id, a);
        on_a.push(s);
    }
    assert_eq!(client.cordon_node(&b, false).await.unwrap().state, "ready");

    // The agent cordons its node ("kubectl cordon"): nothing new lands there.
    let mut api = as_agent(&cluster, &a);
    let n = set(&mut api, &a, hold(true, false, "kubernetes: node cordoned")).await.unwrap();
    assert_eq!(n.state, "cordoned");
    assert_eq!(holds(&n), vec![("agent".into(), false, "kubernetes: node cordoned".into())]);
    let again = set(&mut api, &a, hold(true, false, "kubernetes: node cordoned")).await.unwrap();
    assert_eq!(again.holds, n.holds, "idempotent: the same hold keeps its start");
    let s = create_running(&client, small_session("while-cordoned")).await.unwrap();
    assert_eq!(s.node_id, b, "a cordoned node takes no new session");
    // An operator's uncordon does not lift the agent's hold.
    let n = client.cordon_node(&a, false).await.unwrap();
    assert_eq!((n.state.as_str(), holds(&n).len()), ("cordoned", 1), "{n:?}");
    // And the agent lifting its hold does not lift an operator's cordon.
    client.cordon_node(&a, true).await.unwrap();
    let n = set(&mut api, &a, None).await.unwrap();
    assert_eq!(n.state, "cordoned");
    assert_eq!(holds(&n), vec![("operator".into(), false, String::new())]);
    assert_eq!(client.cordon_node(&a, false).await.unwrap().state, "ready");

    // A NoExecute taint: the agent drains its node; its sessions move to b, as
    // `sandfleet node drain` moves them (one at a time).
    let started = Instant::now();
    let n = set(&mut api, &a, hold(true, true, TAINT)).await.unwrap();
    assert_eq!(n.state, "draining");
    assert_eq!(n.drain.as_ref().map(|d| d.max_parallel), Some(1));
    let first_drain = n.drain.unwrap();
    let moved = wait_moved(&client, &on_a, &b, MOVE_SLACK * 2).await;
    eprintln!("the agent's drain moved {} sessions in {:?}", moved.len(), started.elapsed());
    let n = node(&client, &a).await;
    assert_eq!(n.state, "draining", "a drained node stays draining until the hold is lifted");
    assert_eq!(n.session_count, 0);
    // Sent again (after a registration, say): the same drain, deadline unchanged.
    let n = set(&mut api, &a, hold(true, true, TAINT)).await.unwrap();
    assert_eq!(
        n.drain.as_ref().map(|d| (d.started_at_ms, d.deadline_ms)),
        Some((first_drain.started_at_ms, first_drain.deadline_ms))
    );
    // `sandfleet node get` says who holds the node and why.
    let endpoint = cluster.endpoint();
    let out = cli(&cluster, &["--endpoint", &endpoint, "node", "get", &a], None).await;
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state:     draining"), "{text}");
    assert!(text.contains(&format!("drained by the agent: {TAINT}")), "{text}");

    // An agent cannot set another node's hold.
    let err = set(&mut api, &b, hold(true, true, "not mine")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let nb = node(&client, &b).await;
    assert_eq!((nb.state.as_str(), nb.holds.len()), ("ready", 0));
    // Nor can a client certificate act as an agent.
    let channel = cluster.channel(&cluster.coordinator_addrs()[0], IdentityKind::Coordinator).unwrap();
    let err = proto::agent_service_client::AgentServiceClient::new(channel)
        .set_node_schedulable(proto::SetNodeSchedulableRequest { node_id: a.clone(), hold: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A reason over the limit is refused.
    let err = set(&mut api, &a, hold(true, false, &"r".repeat(300))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");

    // The taint goes: the agent lifts its hold, and the node takes sessions again.
    let n = set(&mut api, &a, None).await.unwrap();
    assert_eq!((n.state.as_str(), n.drain.is_none(), n.holds.len()), ("ready", true, 0));
    let s = create_running(&client, small_session("after").node_selector("sandfleet.node", &a)).await.unwrap();
    assert_eq!(s.node_id, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_node_name_without_a_kubernetes_config_stops_the_agent_at_start() {
    require_facilities!();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], env: Option<(&str, std::path::PathBuf)>| {
        let mut cmd = std::process::Command::new(sandfleet_testkit::bin_path("sandfleet-agent"));
        cmd.args(["--node-id", "kube-start", "--insecure", "--listen", "127.0.0.1:0", "--coordinators", "127.0.0.1:9"])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .args(extra)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(std::process::Stdio::null());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("the agent runs");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, stderr) = run(&["--kube-node-name", "ip-10-0-0-7.eu-west-1.compute.internal"], None);
    assert!(!ok);
    assert!(stderr.contains("--kube-node-name needs the Kubernetes API"), "{stderr}");
    assert!(stderr.contains("KUBERNETES_SERVICE_HOST is not set here"), "{stderr}");
    let missing = dir.path().join("no-such-kubeconfig");
    let (ok, stderr) = run(&["--kube-node-name", "node-a"], Some(("KUBECONFIG", missing.clone())));
    assert!(!ok);
    assert!(stderr.contains(&format!("cannot load KUBECONFIG={}", missing.display())), "{stderr}");
    let (ok, stderr) = run(&["--kube-ignore-taint", "example.com/x"], None);
    assert!(!ok && stderr.contains("--kube-ignore-taint needs --kube-node-name"), "{stderr}");
    let (ok, stderr) = run(&["--kube-node-name", "Not A Node"], None);
    assert!(!ok && stderr.contains("invalid --kube-node-name"), "{stderr}");
}
