//! End-to-end tests of batches (`CreateSessions`) against the real binaries:
//! 200 replicas with patches, each running with exactly its own env; a batch
//! retried across a leader SIGKILL making one batch; bad batches refused
//! whole with their precise codes; and delete ending every replica.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use sandfleet::proto::session_service_client::SessionServiceClient;
use sandfleet::{proto, Client, CreateBatch, CreateSession};
use sandfleet_common::auth::IdentityKind;
use sandfleet_common::spec::BATCH_LABEL;
use sandfleet_testkit::helpers::{exec_argv, expect_code, list_all_sessions, request_id, stdout};
use sandfleet_testkit::host::nonce;
use sandfleet_testkit::{Cluster, ClusterBuilder, Target};
use tonic::Code;

use common::{cli, retrying_client, show, start, SHORT};

/// Room for hundreds of tiny sessions per agent; plain-directory workspaces,
/// so 200 sessions do not need 200 loop devices.
const ROOMY: [&str; 8] = ["--slots", "1000", "--cpu", "1000", "--memory", "64Gi", "--disk-quota", "off"];

fn tiny() -> CreateSession {
    CreateSession::new().memory_bytes(32 << 20).cpu_millis(50).pids_limit(32).ttl(Duration::from_secs(600))
}

/// The sessions carrying a batch's label.
async fn members(client: &Client, batch: &str) -> Vec<proto::Session> {
    list_all_sessions(client, &[(BATCH_LABEL, batch)], &[]).await.unwrap()
}

/// A batch call sent as raw gRPC, past the SDK's own checks.
async fn raw_batch(
    cluster: &Cluster,
    req: proto::CreateSessionsRequest,
) -> Result<proto::CreateSessionsResponse, tonic::Status> {
    let endpoint = &cluster.coordinator_addrs()[0];
    let mut api = SessionServiceClient::new(cluster.channel(endpoint, IdentityKind::Coordinator).expect("a channel"));
    let mut req = tonic::Request::new(req);
    req.set_timeout(SHORT);
    api.create_sessions(req).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_200_with_patches_runs_each_replica_with_its_own_env() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(2).agent_args(ROOMY)).await;
    let client = cluster.client().await;
    const N: usize = 200;
    let tag = nonce();
    let mut req = CreateBatch::new(N as u32, tiny().env("COMMON", "same").label("test", tag.clone()));
    for i in 0..N {
        req = req.patch(i, [("SHARD", i.to_string())], [("shard", i.to_string())]);
    }
    let created = client.create_batch(req).await.expect("the batch").batch.expect("a batch");
    assert_eq!((created.desired, created.session_ids.len()), (N as u32, N));
    // Placed whole by the create itself (one coordinator: the leader), spread over both nodes.
    assert_eq!(created.placed, N as u32, "{created:?}");
    let running = client.wait_batch(&created.id, Duration::from_secs(180), |_| {}).await.expect("all running");
    assert_eq!((running.running, running.failed, running.pending), (N as u32, 0, 0));

    let sessions = members(&client, &created.id).await;
    assert_eq!(sessions.len(), N, "every replica carries the batch label, and nothing else does");
    let mut per_node = BTreeMap::<String, usize>::new();
    for s in &sessions {
        *per_node.entry(s.node_id.clone()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 2, "spread over both nodes: {per_node:?}");
    assert!(per_node.values().all(|&n| n >= N / 2 - 20), "spread evenly: {per_node:?}");

    // Each replica runs with exactly its own env: its shard, the common value, nothing of another's.
    let checks = futures::stream::iter(created.session_ids.iter().enumerate().map(|(i, id)| {
        let client = client.clone();
        let tag = tag.clone();
        async move {
            let s = client.get_session(id).await.unwrap();
            let spec = s.spec.clone().unwrap();
            assert_eq!(spec.labels["shard"], i.to_string(), "replica {i}'s labels");
            assert_eq!(spec.labels["test"], tag, "replica {i} keeps the spec's labels");
            let out = exec_argv(&client, &s, ["sh", "-c", "echo $SHARD:$COMMON"], SHORT).await.unwrap();
            assert_eq!(stdout(&out).trim(), format!("{i}:same"), "replica {i}'s env");
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<()>>();
    checks.await;

    // Deleting the batch ends every replica.
    let deleted = client.delete_batch(&created.id).await.unwrap();
    assert_eq!(deleted.terminated, N as u32, "{deleted:?}");
    let live =
        list_all_sessions(&client, &[(BATCH_LABEL, &created.id)], &[proto::SessionState::Running]).await.unwrap();
    assert!(live.is_empty(), "no replica runs after the delete: {}", live.len());
}

/// A batch whose create is cut short by a leader SIGKILL, retried by the SDK
/// (same request id) on the next leader, makes one batch: one set of
/// replicas, and the replicated create counter grows by its size exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_leader_kill_is_one_batch() {
    require_facilities!();
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(1).agent_args(ROOMY)).await;
    let before = cluster.wait_converged(Duration::from_secs(30)).await.unwrap();
    let leader = cluster.coordinator_index(before.leader_id).expect("the leader is one of ours");
    let client = retrying_client(&cluster).await;
    const N: u32 = 50;
    let rid = request_id("batch-kill");
    let req =
        CreateBatch::new(N, tiny()).request_id(rid.clone()).patch(0, [("FIRST", "1")], Vec::<(String, String)>::new());
    // The create goes out, and the leader dies while it may be replicating or answering.
    let create = tokio::spawn({
        let client = client.clone();
        let req = req.clone();
        async move { client.create_batch(req).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    cluster.kill(Target::Coordinator(leader)).await.unwrap();
    let first = create.await.unwrap().expect("the batch commits on the next leader").batch.unwrap();

    // The same request again, explicitly: the same batch, marked existing.
    let again = client.create_batch(req).await.unwrap();
    assert!(again.existing, "a retry answers the first batch");
    assert_eq!(again.batch.as_ref().unwrap().id, first.id);
    assert_eq!(again.batch.unwrap().session_ids, first.session_ids);

    cluster.restart(Target::Coordinator(leader)).await.unwrap();
    let after = cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
    let batches: Vec<proto::Batch> =
        client.list_batches(None).await.unwrap().into_iter().filter(|b| b.request_id == rid).collect();
    assert_eq!(batches.len(), 1, "one batch for one request id: {batches:?}");
    let sessions = members(&client, &first.id).await;
    assert_eq!(sessions.len(), N as usize, "one set of replicas");
    let ids: BTreeSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, first.session_ids.iter().map(String::as_str).collect());
    assert_eq!(after.sessions_created - before.sessions_created, u64::from(N), "counted once");
    // Every member holds the same batch (the restarted one included).
    for addr in cluster.coordinator_addrs() {
        let c = cluster.client_for([addr.clone()]).connect().await.unwrap();
        assert_eq!(c.get_batch(&first.id).await.unwrap().desired, N, "on {addr}");
    }
    let running = client.wait_batch(&first.id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(running.running, N);
}

/// Bad batches get their precise codes and create nothing; the same request
/// id with another request is ALREADY_EXISTS; other tenants see no batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_whole_and_change_nothing() {
    require_facilities!();
    let mut cluster = start(ClusterBuilder::new().coordinators(1).agents(1).agent_args(ROOMY)).await;
    let admin = cluster.client().await;
    let tag = nonce();
    let spec = || proto::SessionSpec {
        memory_bytes: 32 << 20,
        cpu_millis: 50,
        labels: [("test".to_string(), tag.clone())].into(),
        ..Default::default()
    };
    let patch =
        |k: &str, v: &str| proto::ReplicaPatch { env: [(k.to_string(), v.to_string())].into(), ..Default::default() };
    let label = |k: &str, v: &str| proto::ReplicaPatch {
        labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    };
    let req = |count: u32, spec: proto::SessionSpec, patches: Vec<proto::ReplicaPatch>| proto::CreateSessionsRequest {
        request_id: request_id("bad"),
        count,
        spec: Some(spec),
        patches,
        pool: String::new(),
    };
    let before = cluster.status().await.unwrap().sessions_created;
    let cases: Vec<(&str, proto::CreateSessionsRequest, Code, &str)> = vec![
        ("no replicas", req(0, spec(), vec![]), Code::InvalidArgument, "count"),
        ("over the limit", req(10_001, spec(), vec![]), Code::OutOfRange, "count"),
        ("more patches than replicas", req(2, spec(), vec![patch("A", "1"); 3]), Code::InvalidArgument, "patches"),
        (
            "a bad env key in a patch",
            req(3, spec(), vec![patch("A", "1"), patch("1A", "x")]),
            Code::InvalidArgument,
            "patches[1]",
        ),
        ("a NUL in a patch value", req(3, spec(), vec![patch("A", "a\0b")]), Code::InvalidArgument, "patches[0]"),
        ("a bad label in a patch", req(2, spec(), vec![label("a/b/c", "x")]), Code::InvalidArgument, "patches[0]"),
        (
            "a reserved label in a patch",
            req(2, spec(), vec![label(BATCH_LABEL, "x")]),
            Code::InvalidArgument,
            "reserved",
        ),
        (
            "a reserved label in the spec",
            req(
                2,
                proto::SessionSpec { labels: [("sandfleet.io/x".to_string(), "y".to_string())].into(), ..spec() },
                vec![],
            ),
            Code::InvalidArgument,
            "reserved",
        ),
        (
            "a bad request id",
            proto::CreateSessionsRequest { request_id: "has space".into(), ..req(1, spec(), vec![]) },
            Code::InvalidArgument,
            "request_id",
        ),
        ("a bad spec", req(2, proto::SessionSpec { pids_limit: 1, ..spec() }, vec![]), Code::OutOfRange, "pids_limit"),
        (
            "a size no node can hold",
            req(2, proto::SessionSpec { memory_bytes: 1 << 40, ..spec() }, vec![]),
            Code::ResourceExhausted,
            "",
        ),
        (
            "more than 1 MiB of patches",
            req(40, spec(), (0..40).map(|_| patch("V", &"x".repeat(32 * 1024))).collect()),
            Code::OutOfRange,
            "patches",
        ),
    ];
    for (what, r, code, names) in cases {
        let e = raw_batch(&cluster, r).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(names), "{what}: the error names {names:?}: {}", e.message());
    }
    // The SDK refuses the same before sending.
    expect_code("SDK: no replicas", admin.create_batch(CreateBatch::new(0, tiny())).await, Code::InvalidArgument);
    assert_eq!(cluster.status().await.unwrap().sessions_created, before, "refused batches create nothing");
    assert!(list_all_sessions(&admin, &[("test", &tag)], &[]).await.unwrap().is_empty());
    assert!(admin.list_batches(None).await.unwrap().is_empty(), "and no batch");

    // The same request id with another count or other patches.
    let good = CreateBatch::new(2, tiny()).request_id(request_id("same")).patch(
        1,
        [("A", "1")],
        Vec::<(String, String)>::new(),
    );
    let first = admin.create_batch(good.clone()).await.unwrap().batch.unwrap();
    let e = expect_code(
        "another count",
        admin.create_batch(CreateBatch { count: 3, ..good.clone() }).await,
        Code::AlreadyExists,
    );
    assert!(e.to_string().contains("count") && e.to_string().contains(&first.id), "{e}");
    let other = CreateBatch { patches: vec![], ..good.clone() };
    let e = expect_code("other patches", admin.create_batch(other).await, Code::AlreadyExists);
    assert!(e.to_string().contains("patches"), "{e}");

    // Unknown and malformed batch ids.
    let unknown = uuid::Uuid::new_v4().hyphenated().to_string();
    expect_code("get unknown", admin.get_batch(&unknown).await, Code::NotFound);
    expect_code("delete unknown", admin.delete_batch(&unknown).await, Code::NotFound);
    expect_code("get malformed", admin.get_batch("../x").await, Code::InvalidArgument);
    expect_code("delete malformed", admin.delete_batch("").await, Code::InvalidArgument);

    // A tenant's quota: a batch larger than what is left is refused whole.
    admin.create_tenant("small", proto::TenantQuota { max_sessions: 3, ..Default::default() }).await.unwrap();
    let key = admin.create_api_key("small", proto::ApiKeyRole::User, None).await.unwrap().secret;
    let user = cluster.try_client_with_key(Some(&key)).await.unwrap();
    let e =
        expect_code("over the quota", user.create_batch(CreateBatch::new(4, tiny())).await, Code::ResourceExhausted);
    assert!(e.to_string().contains("batch of 4"), "{e}");
    assert_eq!(
        admin.get_tenant("small").await.unwrap().usage.unwrap_or_default().sessions,
        0,
        "nothing of it was created"
    );
    let mine = user.create_batch(CreateBatch::new(3, tiny())).await.unwrap().batch.unwrap();
    assert_eq!(mine.tenant, "small");
    // Tenants do not see each other's batches.
    expect_code("another tenant's batch", user.get_batch(&first.id).await, Code::NotFound);
    expect_code("another tenant's delete", user.delete_batch(&first.id).await, Code::NotFound);
    let listed: Vec<String> = user.list_batches(None).await.unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(listed, std::slice::from_ref(&mine.id));
    assert_eq!(admin.get_batch(&first.id).await.unwrap().deleted_at_ms, 0, "the refused delete changed nothing");
}

/// `sandfleet session create --count N --patch-file F --wait`, then `batch get|list|rm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_waits_for_and_deletes_a_batch() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(1).agent_args(ROOMY)).await;
    let client = cluster.client().await;
    let patches = cluster.dir().join("patches.jsonl");
    std::fs::write(
        &patches,
        "{\"env\": {\"SHARD\": \"a\"}}\n{}\n{\"env\": {\"SHARD\": \"c\"}, \"labels\": {\"shard\": \"c\"}}\n",
    )
    .unwrap();
    let p = patches.to_str().unwrap();
    let endpoint = cluster.endpoint();
    let sandfleet = |args: &[&str]| {
        let mut all = vec!["--endpoint".to_string(), endpoint.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        let cluster = &cluster;
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            cli(cluster, &all, None).await
        }
    };
    let out = sandfleet(&[
        "-o",
        "json",
        "session",
        "create",
        "--count",
        "3",
        "--patch-file",
        p,
        "--memory",
        "32Mi",
        "--wait",
    ])
    .await;
    assert!(out.status.success(), "{}", show(&out));
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((batch["desired"].as_u64(), batch["running"].as_u64()), (Some(3), Some(3)), "{batch:#}");
    let id = batch["id"].as_str().unwrap().to_string();
    let third = batch["session_ids"][2].as_str().unwrap().to_string();
    let s = client.get_session(&third).await.unwrap();
    assert_eq!(s.spec.unwrap().labels["shard"], "c");
    let out = exec_argv(&client, &client.get_session(&third).await.unwrap(), ["sh", "-c", "echo $SHARD"], SHORT)
        .await
        .unwrap();
    assert_eq!(stdout(&out).trim(), "c");

    let got = sandfleet(&["batch", "get", &id]).await;
    assert!(got.status.success(), "{}", show(&got));
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(text.contains("running:  3") && text.contains(&third), "{text}");
    let listed = sandfleet(&["batch", "list"]).await;
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id), "{}", show(&listed));
    // A patch file with more lines than --count is refused, and nothing is made.
    let bad = sandfleet(&["session", "create", "--count", "2", "--patch-file", p]).await;
    assert!(!bad.status.success(), "{}", show(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_ARGUMENT"), "{}", show(&bad));
    let rm = sandfleet(&["batch", "rm", &id]).await;
    assert!(rm.status.success(), "{}", show(&rm));
    assert_eq!(client.get_batch(&id).await.unwrap().terminated, 3);
    assert_eq!(client.list_batches(None).await.unwrap().len(), 1);
}
