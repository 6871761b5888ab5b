//! End-to-end tests of the `sandfleet` CLI.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use sandfleet::proto;
use sandfleet_testkit::helpers::state_of;

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
