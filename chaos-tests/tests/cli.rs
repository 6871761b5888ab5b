//! End-to-end tests of the `sandfleet` CLI.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use sandfleet::proto;
use sandfleet_testkit::helpers::{exec_python, state_of};

use common::{cli, one_node, show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_and_session_commands() {
    require_facilities!();
    let cluster = one_node().await;
    let endpoint = cluster.endpoint();

    let out = cli(
        &cluster,
        &[
            "--endpoint",
            &endpoint,
            "run",
            "--memory",
            "256Mi",
            "--cpu",
            "0.5",
            "--timeout",
            "30s",
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "42"), "{}", show(&out));

    let out = cli(&cluster, &["--endpoint", &endpoint, "run", "--", "sh", "-c", "exit 7"], None).await;
    assert_eq!(out.status.code(), Some(7), "run exits with the command's exit code: {}", show(&out));

    let out = cli(&cluster, &["--endpoint", &endpoint, "session", "create", "--output", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("session create --output json is not JSON ({e}): {}", show(&out)));
    let id = v["id"].as_str().unwrap_or_else(|| panic!("no string \"id\": {v}")).to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "id is a UUID: {v}");
    assert!(v.get("state").is_some_and(|s| !s.is_null()), "no \"state\": {v}");

    let out = cli(&cluster, &["--endpoint", &endpoint, "session", "get", &id, "--output", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    assert_eq!(got["id"], serde_json::json!(id), "{got}");

    let out = cli(&cluster, &["--endpoint", &endpoint, "session", "rm", &id], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let client = cluster.client().await;
    let gone = client.get_session(&id).await.unwrap();
    assert_eq!(state_of(&gone), proto::SessionState::Terminated, "{gone:?}");

    let unknown = uuid::Uuid::new_v4().to_string();
    let out = cli(&cluster, &["--endpoint", &endpoint, "session", "get", &unknown], None).await;
    assert_ne!(out.status.code(), Some(0), "getting an unknown session fails: {}", show(&out));
}

/// `sandfleet top --once` (text and JSON) shows what the cluster holds: its
/// leader, the node, the running sessions and what a session really uses;
/// without a terminal, `top` prints frames one after another with no cursor
/// control, and `session create --wait` draws no progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_top_shows_the_cluster_nodes_and_usage() {
    require_facilities!();
    let cluster = one_node().await;
    let endpoint = cluster.endpoint();
    let client = cluster.client().await;
    let node_id = cluster.agents[0].id.clone();

    // Two sessions through the CLI; with stderr a pipe, --wait prints no progress.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = cli(
            &cluster,
            &["--endpoint", &endpoint, "session", "create", "--memory", "256Mi", "--ttl", "10m", "--wait"],
            None,
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        assert!(out.stderr.is_empty(), "no progress on a pipe: {}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("state:    RUNNING"), "{}", show(&out));
        let id = text.lines().find_map(|l| l.strip_prefix("id:")).map(|s| s.trim().to_string()).unwrap();
        ids.push(id);
    }
    let busy = client.get_session(&ids[0]).await.unwrap();

    // One session holds 96 MiB for a while.
    let hog = {
        let (client, busy) = (client.clone(), busy.clone());
        tokio::spawn(async move {
            let code =
                "import time\nb = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(20)\n";
            exec_python(&client, &busy, code, Duration::from_secs(40)).await
        })
    };

    let until = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = top_json(&cluster, &endpoint).await;
        let used = v["nodes"][0]["memory_bytes"]["used"].as_u64().unwrap_or(0);
        if used >= 64 << 20 {
            break v;
        }
        assert!(Instant::now() < until, "the node's memory use never showed the 96 MiB session: {v:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let status = client.cluster_status().await.unwrap();
    assert_eq!(v["cluster"]["leader_id"].as_u64(), Some(status.leader_id), "{v:#}");
    assert_ne!(status.leader_id, 0);
    assert_eq!(v["cluster"]["members"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert_eq!(v["cluster"]["running_sessions"], 2, "{v:#}");
    assert_eq!(v["cluster"]["pending_sessions"], 0, "{v:#}");
    assert!(v["cluster"]["sessions_created"].as_u64() >= Some(2), "{v:#}");
    assert!(v["cluster"]["creates_per_second"].is_null(), "one frame has no rate: {v:#}");
    let node = &v["nodes"][0];
    assert_eq!(node["id"].as_str(), Some(node_id.as_str()), "{v:#}");
    assert_eq!(node["state"], "ready", "{v:#}");
    assert_eq!(node["sessions"], 2, "{v:#}");
    assert_eq!(node["memory_bytes"]["allocated"], 512u64 << 20, "{v:#}");
    let cap = node["memory_bytes"]["capacity"].as_u64().unwrap();
    assert_eq!(node["memory_bytes"]["free"].as_u64(), Some(cap - (512 << 20)), "{v:#}");
    assert!(node["cpu_seconds_total"].as_f64().is_some(), "{v:#}");

    // The text frame shows the same.
    let out = cli(&cluster, &["--endpoint", &endpoint, "top", "--once"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("cluster: leader {}, term", status.leader_id)), "{text}");
    assert!(text.contains("0 pending, 2 running"), "{text}");
    let row: Vec<&str> =
        text.lines().find(|l| l.starts_with(&node_id)).unwrap_or_else(|| panic!("{text}")).split_whitespace().collect();
    assert_eq!(row[1], "ready", "{text}");
    assert!(row[2] == "2" || row[2].starts_with("2/"), "two sessions: {text}");

    // Not a terminal and no --once: frames one after another, no cursor control; the second has a rate.
    let out = cli(&cluster, &["--endpoint", &endpoint, "top", "--interval", "500ms", "--count", "2"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("sandfleet top ").count(), 2, "{text}");
    assert!(!text.contains('\x1b'), "no escape sequences on a pipe: {text:?}");
    assert!(text.contains("creates -/s") && text.contains("creates 0.0/s"), "{text}");

    hog.abort();
    for id in &ids {
        let _ = client.delete_session(id).await;
    }
}

/// `sandfleet top --once --output json`, parsed.
async fn top_json(cluster: &sandfleet_testkit::Cluster, endpoint: &str) -> serde_json::Value {
    let out = cli(cluster, &["--endpoint", endpoint, "top", "--once", "--output", "json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("top --once --output json is not JSON ({e}): {}", show(&out)))
}
