//! End-to-end tests of warm pools against the real binaries: a pool fills to
//! its buffer and refills after claims; claims across a leader SIGKILL hand
//! out each idle sandbox at most once; a pool's idle sandboxes lost with their
//! agent are replaced on another node; bad pools are refused.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sandfleet::{proto, Client, CreateSession};
use sandfleet_testkit::helpers::{exec_argv, expect_code, request_id, stdout};
use sandfleet_testkit::{ClusterBuilder, Target};
use tonic::Code;

use common::{agent_index, retrying_client, start, SHORT};

const ROOMY: [&str; 6] = ["--slots", "1000", "--cpu", "1000", "--memory", "64Gi"];

fn pool(name: &str, min: u32, max: u32, buffer_min: u32, buffer_max: u32) -> proto::Pool {
    proto::Pool {
        name: name.into(),
        spec: Some(proto::SessionSpec {
            memory_bytes: 32 << 20,
            cpu_millis: 50,
            env: [("FROM_POOL".to_string(), name.to_string())].into(),
            ..Default::default()
        }),
        min,
        max,
        buffer_min,
        buffer_max,
        ..Default::default()
    }
}

/// Waits until `check` holds for the pool, returning it.
async fn wait_pool(client: &Client, name: &str, what: &str, check: impl Fn(&proto::Pool) -> bool) -> proto::Pool {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let p = client.get_pool(name).await.unwrap();
        if check(&p) {
            return p;
        }
        assert!(Instant::now() < until, "pool {name}: {what} not within 60 s; last {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn claim(name: &str) -> CreateSession {
    CreateSession::new().request_id(request_id("claim")).pool(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_fills_hands_out_running_sandboxes_and_refills() {
    require_facilities!();
    let builder = ClusterBuilder::new().coordinators(1).agents(1).agent_args(ROOMY).metrics_listeners(true);
    let cluster = start(builder).await;
    let client = cluster.client().await;
    client.create_pool(pool("py", 0, 6, 2, 3)).await.unwrap();
    wait_pool(&client, "py", "3 idle", |p| p.idle == 3).await;
    // The pool's sandboxes on the coordinator's /metrics, as `pool get` counts them.
    let metrics = cluster.metrics_addr(Target::Coordinator(0)).expect("a metrics listener");
    let (code, text) = sandfleet_testkit::prometheus::http_get(&metrics, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let line = text.lines().find(|l| l.starts_with("sandfleet_pool_sandboxes{") && l.contains("state=\"idle\""));
    let line = line.unwrap_or_else(|| panic!("no idle series of sandfleet_pool_sandboxes:\n{text}"));
    assert!(line.contains("pool=\"py\"") && line.contains("tenant=\"default\"") && line.ends_with(" 3"), "{line}");
    // Idle sandboxes are listed but carry no token: nobody uses one before its claim.
    let all = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    let idle = all.iter().find(|s| s.pool == "py").expect("an idle sandbox");
    let got = client.get_session(&idle.id).await.unwrap();
    assert!(got.token.is_empty(), "an idle pool sandbox has no data-plane token");
    assert!(exec_argv(&client, &got, ["true"], SHORT).await.is_err(), "no exec before a claim");

    // Two claims: RUNNING at once, with the pool's spec, each a different sandbox.
    let mut claimed = Vec::new();
    for _ in 0..2 {
        let resp = client.create_session_full(claim("py")).await.unwrap();
        assert!(resp.claimed, "an idle sandbox was there: {resp:?}");
        let s = resp.session.unwrap();
        assert_eq!(s.state, proto::SessionState::Running as i32, "a claimed sandbox runs already");
        assert_eq!((s.pool.as_str(), s.claimed_at_ms > 0), ("py", true));
        let out = exec_argv(&client, &s, ["sh", "-c", "echo $FROM_POOL"], SHORT).await.unwrap();
        assert_eq!(stdout(&out).trim(), "py");
        claimed.push(s.id);
    }
    assert_ne!(claimed[0], claimed[1]);
    // The leader refills the buffer; the pool (idle plus claimed) stays within max.
    let p = wait_pool(&client, "py", "refilled", |p| p.idle == 3 && p.claimed == 2).await;
    assert_eq!(p.starting, 0);
    // The same request id again: the same session, not another sandbox.
    let again = CreateSession::new().request_id("same-claim").pool("py");
    let first = client.create_session_full(again.clone()).await.unwrap().session.unwrap();
    let second = client.create_session_full(again).await.unwrap();
    assert!(second.existing && second.claimed);
    assert_eq!(second.session.unwrap().id, first.id);
    // 2 idle is not below buffer_min: no refill. Two more claims empty it; the
    // refill stops at max (6 in all: one more), and at max nothing more comes.
    wait_pool(&client, "py", "2 idle, 3 claimed", |p| p.idle == 2 && p.claimed == 3).await;
    for _ in 0..2 {
        assert!(client.create_session_full(claim("py")).await.unwrap().claimed);
    }
    wait_pool(&client, "py", "refilled up to max", |p| p.idle == 1 && p.claimed == 5).await;
    assert!(client.create_session_full(claim("py")).await.unwrap().claimed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = client.get_pool("py").await.unwrap();
    assert_eq!((p.claimed, p.idle, p.starting), (6, 0, 0), "never past max: {p:?}");
    let cold = client.create_session_full(claim("py")).await.unwrap();
    assert!(!cold.claimed);
    let cold = cold.session.unwrap();
    assert!(cold.message.contains("pool py had no idle sandbox: started cold"), "{cold:?}");
    assert!(cold.pool.is_empty(), "a cold start is not one of the pool's sandboxes");
    let cold = client.wait_running(&cold.id, Duration::from_secs(60)).await.unwrap();
    let out = exec_argv(&client, &cold, ["sh", "-c", "echo $FROM_POOL"], SHORT).await.unwrap();
    assert_eq!(stdout(&out).trim(), "py", "the cold start runs the pool's spec");

    // Deleting the pool ends its idle sandboxes and leaves the claimed ones running.
    client
        .update_pool(proto::UpdatePoolRequest { name: "py".into(), max: Some(10), ..Default::default() })
        .await
        .unwrap();
    wait_pool(&client, "py", "refilled after raising max", |p| p.idle == 3).await;
    client.delete_pool("py").await.unwrap();
    expect_code("get deleted", client.get_pool("py").await, Code::NotFound);
    let s = client.get_session(&claimed[0]).await.unwrap();
    assert_eq!(s.state, proto::SessionState::Running as i32, "claimed sandboxes stay");
}

/// Claims racing a leader SIGKILL: every claim gets an answer (retried by the
/// SDK with its request id), no sandbox goes to two claims, and a retry of
/// each request id answers its own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_across_a_leader_kill_hand_out_each_sandbox_once() {
    require_facilities!();
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(1).agent_args(ROOMY)).await;
    let status = cluster.wait_converged(Duration::from_secs(30)).await.unwrap();
    let leader = cluster.coordinator_index(status.leader_id).unwrap();
    let client = retrying_client(&cluster).await;
    client.create_pool(pool("kill", 0, 40, 6, 6)).await.unwrap();
    wait_pool(&client, "kill", "6 idle", |p| p.idle == 6).await;

    const CLAIMS: usize = 12;
    let rids: Vec<String> = (0..CLAIMS).map(|i| format!("kill-claim-{i}-{}", request_id("k"))).collect();
    let tasks: Vec<_> = rids
        .iter()
        .map(|rid| {
            let client = client.clone();
            let req = CreateSession::new().request_id(rid.clone()).pool("kill");
            tokio::spawn(async move { client.create_session_full(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3)).await;
    cluster.kill(Target::Coordinator(leader)).await.unwrap();
    let mut by_rid = BTreeMap::new();
    for (rid, t) in rids.iter().zip(tasks) {
        let resp = t.await.unwrap().unwrap_or_else(|e| panic!("claim {rid}: {e}"));
        by_rid.insert(rid.clone(), (resp.session.unwrap().id, resp.claimed));
    }
    let ids: BTreeSet<&String> = by_rid.values().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), CLAIMS, "one session per claim: {by_rid:?}");
    let claimed = by_rid.values().filter(|(_, c)| *c).count();
    assert!(claimed >= 1, "no claim found an idle sandbox: {by_rid:?}");

    cluster.restart(Target::Coordinator(leader)).await.unwrap();
    cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
    for (rid, (id, _)) in &by_rid {
        let again =
            client.create_session_full(CreateSession::new().request_id(rid.clone()).pool("kill")).await.unwrap();
        assert!(again.existing, "{rid}");
        assert_eq!(&again.session.unwrap().id, id, "a retried claim answers its own session");
    }
    // Every claimed sandbox is claimed by exactly one request id, on every member.
    let all = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    let mut owners = BTreeMap::<String, usize>::new();
    for s in all.iter().filter(|s| s.pool == "kill" && s.claimed_at_ms > 0) {
        *owners.entry(s.request_id.clone()).or_default() += 1;
    }
    assert!(owners.values().all(|n| *n == 1), "{owners:?}");
    assert_eq!(owners.len(), claimed, "the pool's claimed sandboxes are exactly the claims answered as claimed");
}

/// An agent holding idle pool sandboxes is SIGKILLed: its sandboxes are
/// placed again on the other node and the pool is back to its buffer there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_lost_with_their_agent_are_replaced_elsewhere() {
    require_facilities!();
    let builder = ClusterBuilder::new().coordinators(1).agents(2).agent_args(ROOMY).coordinator_args([
        "--agent-heartbeat",
        "500ms",
        "--node-ttl",
        "3s",
    ]);
    let mut cluster = start(builder).await;
    let client = cluster.client().await;
    client.create_pool(pool("spread", 0, 20, 4, 4)).await.unwrap();
    wait_pool(&client, "spread", "4 idle", |p| p.idle == 4).await;
    let idle_on = |sessions: &[proto::Session]| {
        let mut m = BTreeMap::<String, usize>::new();
        for s in sessions.iter().filter(|s| s.pool == "spread" && s.claimed_at_ms == 0) {
            if s.state == proto::SessionState::Running as i32 {
                *m.entry(s.node_id.clone()).or_default() += 1;
            }
        }
        m
    };
    let all = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
    let before = idle_on(&all);
    assert_eq!(before.len(), 2, "spread over both nodes: {before:?}");
    let (victim, _) = before.iter().max_by_key(|(_, n)| **n).unwrap();
    let survivor = cluster.agents.iter().map(|a| a.id.clone()).find(|id| id != victim).unwrap();
    cluster.kill(Target::Agent(agent_index(&cluster, victim))).await.unwrap();

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let all = client.list_all_sessions(proto::ListSessionsRequest::default()).await.unwrap();
        let now = idle_on(&all);
        if now.get(&survivor) == Some(&4) && now.len() == 1 {
            break;
        }
        assert!(Instant::now() < until, "the pool was not back to 4 idle on {survivor}: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = client.get_pool("spread").await.unwrap();
    assert_eq!((p.idle, p.starting), (4, 0), "{p:?}");
    assert!(client.create_session_full(claim("spread")).await.unwrap().claimed);
}

/// Bad pools and bad claims get their precise codes and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pools_and_claims_are_refused() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(1).agent_args(ROOMY)).await;
    let client = cluster.client().await;
    let cases = [
        ("min > max", pool("a", 5, 4, 0, 0), Code::InvalidArgument, "min (5) is more than max (4)"),
        ("buffer_min > buffer_max", pool("a", 0, 9, 3, 2), Code::InvalidArgument, "buffer_min"),
        ("buffer_max > max", pool("a", 0, 2, 0, 3), Code::InvalidArgument, "buffer_max (3) is more than max (2)"),
        ("max over the limit", pool("a", 0, 10_001, 0, 0), Code::OutOfRange, "max"),
        ("a bad name", pool("Not_A_Label", 0, 1, 0, 0), Code::InvalidArgument, "name"),
        (
            "an unknown template",
            proto::Pool {
                spec: Some(proto::SessionSpec { template: "nope".into(), ..Default::default() }),
                ..pool("a", 0, 1, 0, 0)
            },
            Code::InvalidArgument,
            "template",
        ),
        (
            "a reserved label",
            proto::Pool {
                spec: Some(proto::SessionSpec {
                    labels: [("sandfleet.io/pool".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                ..pool("a", 0, 1, 0, 0)
            },
            Code::InvalidArgument,
            "reserved",
        ),
    ];
    for (what, p, code, names) in cases {
        let e = expect_code(what, client.create_pool(p).await, code);
        assert!(e.to_string().contains(names), "{what}: {e}");
    }
    assert!(client.list_pools().await.unwrap().is_empty(), "refused pools create nothing");
    client.create_pool(pool("ok", 0, 2, 0, 0)).await.unwrap();
    expect_code("the same name", client.create_pool(pool("ok", 0, 2, 0, 0)).await, Code::AlreadyExists);
    let e = expect_code(
        "update out of order",
        client
            .update_pool(proto::UpdatePoolRequest { name: "ok".into(), buffer_max: Some(3), ..Default::default() })
            .await,
        Code::InvalidArgument,
    );
    assert!(e.to_string().contains("buffer_max (3) is more than max (2)"), "{e}");
    assert_eq!(client.get_pool("ok").await.unwrap().buffer_max, 0, "the refused update changed nothing");
    expect_code("claim from an unknown pool", client.create_session(claim("nope")).await, Code::NotFound);
    let both = CreateSession::new().memory_bytes(64 << 20).pool("ok");
    expect_code("a spec and a pool", client.create_session(both).await, Code::InvalidArgument);
    expect_code("delete unknown", client.delete_pool("nope").await, Code::NotFound);
}

/// A batch from a pool claims as many idle sandboxes as the pool holds (in
/// the batch's one entry, RUNNING at once) and starts the rest cold from the
/// pool's spec; patches set labels; env patches are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_from_a_pool_claims_what_it_holds_and_starts_the_rest_cold() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().coordinators(1).agents(1).agent_args(ROOMY)).await;
    let client = cluster.client().await;
    client.create_pool(pool("jobs", 0, 20, 0, 5)).await.unwrap();
    client
        .update_pool(proto::UpdatePoolRequest { name: "jobs".into(), buffer_min: Some(5), ..Default::default() })
        .await
        .unwrap();
    wait_pool(&client, "jobs", "5 idle", |p| p.idle == 5).await;
    let mut req = sandfleet::CreateBatch::from_pool(7, "jobs").request_id(request_id("from-pool"));
    for i in 0..7 {
        req = req.patch(i, Vec::<(String, String)>::new(), [("shard", i.to_string())]);
    }
    let batch = client.create_batch(req.clone()).await.unwrap().batch.unwrap();
    assert_eq!((batch.pool.as_str(), batch.claimed, batch.desired), ("jobs", 5, 7), "{batch:?}");
    assert_eq!(batch.running, 5, "the claimed replicas run at once");
    let running = client.wait_batch(&batch.id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(running.running, 7);
    for (i, id) in batch.session_ids.iter().enumerate() {
        let s = client.get_session(id).await.unwrap();
        let spec = s.spec.clone().unwrap();
        assert_eq!(spec.labels["shard"], i.to_string(), "replica {i}'s own label");
        assert_eq!(spec.labels[sandfleet_common::spec::BATCH_LABEL], batch.id);
        assert_eq!(s.pool.is_empty(), i >= 5, "replica {i}: the first 5 come from the pool");
        let out = exec_argv(&client, &s, ["sh", "-c", "echo $FROM_POOL"], SHORT).await.unwrap();
        assert_eq!(stdout(&out).trim(), "jobs", "every replica runs the pool's spec");
    }
    let again = client.create_batch(req).await.unwrap();
    assert!(again.existing);
    assert_eq!(again.batch.unwrap().session_ids, batch.session_ids);
    let env = sandfleet::CreateBatch::from_pool(2, "jobs").patch(0, [("A", "1")], Vec::<(String, String)>::new());
    expect_code("an env patch from a pool", client.create_batch(env).await, Code::InvalidArgument);
    expect_code(
        "an unknown pool",
        client.create_batch(sandfleet::CreateBatch::from_pool(2, "nope")).await,
        Code::NotFound,
    );
    // The pool refills behind the batch.
    wait_pool(&client, "jobs", "refilled", |p| p.idle == 5 && p.claimed == 5).await;
}
