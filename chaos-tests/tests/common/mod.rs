//! What the end-to-end test files share: the facilities gate, starting a
//! cluster, running the CLI against it, and the waits on nodes and moved sessions.
//!
//! Every test starts its own cluster (coordinators and agents in a fresh
//! temporary directory), so tests are independent and safe under nextest's
//! process-per-test model and under `cargo test`'s threads alike. Host-side
//! checks (processes, cgroups) are scoped by a per-test nonce or session id,
//! because other tests run at the same time.
//!
//! The tests need the binaries (`cargo build --workspace --bins`) and root,
//! bubblewrap and writable cgroups; without them each test prints a SKIPPED
//! banner and returns, unless `SANDFLEET_REQUIRE_FACILITIES=1`.

// Each test file uses its own part of this module.
#![allow(dead_code, unused_macros)]

use std::time::{Duration, Instant};

use sandfleet::{proto, Client};
use sandfleet_testkit::helpers::{exec_python, state_of, stdout};
use sandfleet_testkit::{host, Cluster, ClusterBuilder};

/// Returns early from a test when the machine cannot run sandboxes.
macro_rules! require_facilities {
    () => {
        if !sandfleet_testkit::require_sandbox_facilities() {
            return;
        }
    };
}

/// The time a single exec or call of a test may take.
pub const SHORT: Duration = Duration::from_secs(30);

/// The node TTL of the liveness and partition tests' clusters.
pub const NODE_TTL: Duration = Duration::from_secs(3);
/// Generous bound for "placed again and RUNNING" after the TTL (debug build, busy CI).
pub const MOVE_SLACK: Duration = Duration::from_secs(12);

/// Removes a host file when dropped (files a test plants on the host).
pub struct RemoveOnDrop(pub std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A client that retries for as long as a leader change takes, quickly (2 s
/// deadlines, backoff 20-200 ms): for calls that must succeed across a kill.
pub async fn retrying_client(cluster: &Cluster) -> Client {
    cluster
        .client_builder()
        .request_timeout(Duration::from_secs(2))
        .max_retries(1000)
        .backoff(sandfleet::Backoff::new(Duration::from_millis(20), Duration::from_millis(200)))
        .connect()
        .await
        .unwrap()
}

/// Runs the `sandfleet` CLI against `cluster`, for at most 120 s: with
/// `api_key`, authenticated by the key alone (the CLI trusts the cluster CA
/// but has no client certificate); without, as the test's client certificate
/// (cluster admin). A SANDFLEET_API_KEY of the test's own environment is never passed on.
pub async fn cli(cluster: &Cluster, args: &[&str], api_key: Option<&str>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(sandfleet_testkit::bin_path("sandfleet"));
    cmd.args(args).stdin(std::process::Stdio::null()).env_remove("SANDFLEET_API_KEY").kill_on_drop(true);
    match api_key {
        Some(k) => {
            cmd.env("SANDFLEET_API_KEY", k);
            if let Some(tls) = cluster.client_tls() {
                cmd.env(sandfleet::ENV_TLS_CA, &tls.ca);
            }
        }
        None => {
            cmd.envs(cluster.cli_env());
        }
    }
    match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("running sandfleet {args:?}: {e}"),
        Err(_) => panic!("sandfleet {args:?} did not finish within 120 s"),
    }
}

/// A finished command's status and output, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "status={} stdout={:?} stderr={:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts the cluster, or fails the test with the reason.
pub async fn start(builder: ClusterBuilder) -> Cluster {
    match builder.start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

/// The agent API as a raw agent uses it.
pub type AgentApi = proto::agent_service_client::AgentServiceClient<tonic::transport::Channel>;

/// Registers node `node_id` (8 slots, no agent behind it) on coordinator
/// `coordinator` with an agent's credentials, and returns that agent's API.
pub async fn raw_agent(cluster: &Cluster, coordinator: usize, node_id: &str) -> AgentApi {
    let endpoint = cluster.coordinator_addrs()[coordinator].clone();
    let cert = cluster
        .pki()
        .map(|pki| pki.issue(sandfleet_common::auth::IdentityKind::Agent, node_id, &[]).expect("an agent certificate"));
    let channel = cluster
        .channel_as(&endpoint, sandfleet_common::auth::IdentityKind::Coordinator, cert.as_ref())
        .expect("a channel");
    let mut api = AgentApi::new(channel);
    let register = proto::RegisterNodeRequest {
        node_id: node_id.into(),
        address: "127.0.0.1:1".into(),
        capacity: Some(proto::NodeCapacity { cpu_millis: 4000, memory_bytes: 4 << 30, session_slots: 8 }),
        runtimes: vec!["process".into()],
        ..Default::default()
    };
    // The cluster may still be initialising its signing key; that answer is UNAVAILABLE.
    let until = Instant::now() + SHORT;
    loop {
        match api.register_node(register.clone()).await {
            Ok(_) => return api,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("registering {node_id}: {s:?}"),
        }
    }
}

/// One coordinator and one agent.
pub async fn one_node() -> Cluster {
    start(ClusterBuilder::new().coordinators(1).agents(1)).await
}

/// The index in `cluster.agents` of node `node_id`.
pub fn agent_index(cluster: &Cluster, node_id: &str) -> usize {
    cluster.agents.iter().position(|a| a.id == node_id).expect("a node of this cluster")
}

/// The node's state as `ListNodes` reports it, or "" when the node is not listed.
pub async fn node_state(client: &Client, node_id: &str) -> String {
    client.list_nodes().await.unwrap().into_iter().find(|n| n.id == node_id).map(|n| n.state).unwrap_or_default()
}

/// The cgroup directories of `sessions` on node `node` (not empty: each runs there).
pub fn cgroups_on(sessions: &[proto::Session], node: &str) -> Vec<std::path::PathBuf> {
    let dirs: Vec<_> = sessions
        .iter()
        .flat_map(|s| host::cgroup_dirs_matching(&s.id))
        .filter(|p| p.to_string_lossy().contains(node))
        .collect();
    assert!(!dirs.is_empty(), "the sessions have cgroups on {node}");
    dirs
}

/// After `event` (a thaw, a heal) the old agent `node` stops its old copies
/// at once and is ready again: waits up to 20 s until none of `old` (their
/// cgroups) is left and the node is ready, then checks that each of `moved`
/// has its cgroups on `to` and none left on `node`: exactly one copy.
pub async fn wait_old_copies_gone(
    client: &Client,
    old: &[std::path::PathBuf],
    node: &str,
    event: &str,
    moved: &[proto::Session],
    to: &str,
) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<_> = old.iter().filter(|p| p.exists()).collect();
        let state = node_state(client, node).await;
        if left.is_empty() && state == "ready" {
            break;
        }
        assert!(Instant::now() < until, "after {event}: old copies left {left:?}, node {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in moved {
        let dirs = host::cgroup_dirs_matching(&s.id);
        assert!(dirs.iter().all(|p| !p.to_string_lossy().contains(node)), "{dirs:?}");
        assert!(dirs.iter().any(|p| p.to_string_lossy().contains(to)), "{dirs:?}");
    }
}

/// After a node's sessions moved to `alive`: each of `moved` runs code there
/// (with a fresh token for its new generation), and each of `kept` (already
/// on `alive`) was not touched.
pub async fn assert_moved_work_and_kept_stay(
    client: &Client,
    moved: &[proto::Session],
    kept: &[proto::Session],
    alive: &str,
) {
    for s in moved {
        let out = exec_python(client, s, "print(6*7)", Duration::from_secs(30)).await.unwrap();
        assert_eq!(stdout(&out).trim(), "42");
    }
    for s in kept {
        let now = client.get_session(&s.id).await.unwrap();
        assert_eq!((now.node_id.as_str(), now.generation), (alive, s.generation));
    }
}

/// Waits until every session in `moved` runs on `to` with a newer generation.
pub async fn wait_moved(
    client: &Client,
    moved: &[proto::Session],
    to: &str,
    deadline: Duration,
) -> Vec<proto::Session> {
    let until = Instant::now() + deadline;
    loop {
        let mut now = Vec::new();
        for s in moved {
            now.push(client.get_session(&s.id).await.unwrap());
        }
        let done = now.iter().zip(moved).all(|(n, old)| {
            state_of(n) == proto::SessionState::Running && n.node_id == to && n.generation > old.generation
        });
        if done {
            return now;
        }
        assert!(
            Instant::now() < until,
            "sessions not running on {to} with a new generation within {deadline:?}: {:?}",
            now.iter()
                .map(|s| (s.id.clone(), s.state, s.node_id.clone(), s.generation, s.pending_reason.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
