//! End-to-end tests of the control plane: idempotent creates, and sessions
//! that survive coordinator and agent restarts.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::Duration;

use sandfleet::{proto, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::{
    create_running, describe, eventually, exec_argv, list_all_sessions, request_id, small_session, state_of, stdout,
};
use sandfleet_testkit::host::{self, nonce};
use sandfleet_testkit::{ClusterBuilder, Target};

use common::{one_node, start, SHORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_on_request_id() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let rid = request_id("idem");
    let spec = || {
        CreateSession::new()
            .request_id(rid.clone())
            .memory_bytes(128 << 20)
            .cpu_millis(250)
            .ttl(Duration::from_secs(600))
            .label("test", tag.clone())
    };

    let first = client.create_session_full(spec()).await.unwrap();
    let second = client.create_session_full(spec()).await.unwrap();
    let a = first.session.expect("first response has a session");
    let b = second.session.expect("second response has a session");
    assert!(!first.existing, "the first create is not `existing`");
    assert!(second.existing, "a retried create must say `existing`");
    assert_eq!(a.id, b.id, "a retried create must return the first session");
    assert_eq!(b.request_id, rid);

    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert_eq!(listed.len(), 1, "exactly one session for one request id: {listed:?}");
    assert_eq!(listed[0].id, a.id);
    assert!(listed[0].token.is_empty(), "ListSessions must not include tokens");
}

async fn get_all(client: &sandfleet::Client, ids: &[(String, String)], when: &str) {
    for (id, rid) in ids {
        let got = eventually(&format!("get {id} {when}"), Duration::from_secs(30), || {
            let client = client.clone();
            let id = id.clone();
            async move { client.get_session(&id).await.map_err(|e| anyhow::anyhow!("{e}")) }
        })
        .await
        .unwrap_or_else(|e| panic!("session lost {when}: {e:#}"));
        assert_eq!(&got.id, id);
        assert_eq!(&got.request_id, rid, "{when}: session {id} changed its request id");
        assert_ne!(state_of(&got), proto::SessionState::Failed, "{when}: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_keeps_every_session() {
    require_facilities!();
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let rid = request_id(&format!("durable{i}"));
        let s = client
            .create_session(
                CreateSession::new()
                    .request_id(rid.clone())
                    .memory_bytes(64 << 20)
                    .cpu_millis(100)
                    .ttl(Duration::from_secs(900)),
            )
            .await
            .unwrap();
        ids.push((s.id, rid));
    }
    let running = client.wait_running(&ids[0].0, Duration::from_secs(60)).await.unwrap();

    let status = cluster.terminate(Target::Coordinator(0)).await.unwrap();
    assert!(status.success(), "SIGTERM must shut the coordinator down cleanly, got {status}");
    cluster.restart_coordinator(0).await.unwrap();
    let client = cluster.client().await;
    get_all(&client, &ids, "after SIGTERM + restart").await;

    // It accepts writes again, and what it accepts is durable too.
    let rid = request_id("after-restart");
    let s = client
        .create_session(CreateSession::new().request_id(rid.clone()).memory_bytes(64 << 20).cpu_millis(100))
        .await
        .unwrap();
    ids.push((s.id, rid));

    cluster.kill(Target::Coordinator(0)).await.unwrap();
    cluster.restart_coordinator(0).await.unwrap();
    let client = cluster.client().await;
    get_all(&client, &ids, "after SIGKILL + restart").await;

    // The running session still runs and answers.
    let s = client.wait_running(&running.id, Duration::from_secs(60)).await.unwrap();
    let out = exec_argv(&client, &s, ["echo", "survived"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "survived\n", "{}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_keep_sessions_when_one_dies() {
    require_facilities!();
    let mut cluster = start(ClusterBuilder::new().coordinators(3).agents(1)).await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let rid = request_id(&format!("ha{i}"));
        let s = client
            .create_session(CreateSession::new().request_id(rid.clone()).memory_bytes(64 << 20).cpu_millis(100))
            .await
            .unwrap();
        ids.push((s.id, rid));
    }
    // Kill the bootstrap member (often the leader); the other two keep a quorum.
    cluster.kill(Target::Coordinator(0)).await.unwrap();
    let client = cluster.client_for(cluster.coordinator_addrs()[1..].to_vec()).connect().await.unwrap();
    get_all(&client, &ids, "with coordinator 1 dead").await;
    let rid = request_id("ha-after");
    let s = eventually("create with coordinator 1 dead", Duration::from_secs(30), || {
        let rid = rid.clone();
        let client = client.clone();
        async move {
            client
                .create_session(CreateSession::new().request_id(rid).memory_bytes(64 << 20).cpu_millis(100))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
    })
    .await
    .unwrap();
    ids.push((s.id, rid));

    cluster.restart_coordinator(0).await.unwrap();
    let client = cluster.client().await;
    get_all(&client, &ids, "after coordinator 1 came back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_cleans_up_sandboxes_and_cgroups() {
    require_facilities!();
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let kept = create_running(&client, small_session("kept")).await.unwrap();
    let dropped = create_running(&client, small_session("dropped")).await.unwrap();
    let agent_pid = cluster.agents[0].pid().unwrap() as i32;
    let agent_dir = cluster.agents[0].data_dir.display().to_string();

    let markers = [format!("300.{}", nonce()), format!("300.{}", nonce())];
    let mut execs = Vec::new();
    for (s, marker) in [(&kept, &markers[0]), (&dropped, &markers[1])] {
        let client = client.clone();
        let s = s.clone();
        let marker = marker.clone();
        execs.push(tokio::spawn(async move {
            client
                .exec_collect(&s, ExecRequest::argv(["sleep", marker.as_str()]).timeout(Duration::from_secs(600)))
                .await
        }));
    }
    for marker in &markers {
        eventually("long exec started", Duration::from_secs(20), || {
            let found = host::processes_matching(marker);
            async move {
                if found.is_empty() {
                    Err(anyhow::anyhow!("no process yet"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    }
    // Everything that belongs to the sandboxes now: the sleeps, the processes
    // in the sessions' cgroups, and bubblewrap processes working for this agent.
    let mut doomed: Vec<host::HostProcess> = Vec::new();
    for marker in &markers {
        doomed.extend(host::processes_matching(marker));
    }
    doomed.extend(host::processes_in_cgroup_matching(&kept.id));
    doomed.extend(host::processes_in_cgroup_matching(&dropped.id));
    doomed.extend(host::processes_matching(&agent_dir).into_iter().filter(|p| p.comm == "bwrap"));
    doomed.retain(|p| p.pid != agent_pid);
    let dropped_cgroups = host::cgroup_dirs_matching(&dropped.id);
    assert!(
        !dropped_cgroups.is_empty(),
        "expected a cgroup named after session {} under one of {:?} ({} host)",
        dropped.id,
        host::CGROUP_ROOTS,
        host::cgroup_version()
    );

    cluster.kill(Target::Agent(0)).await.unwrap();
    // While the agent is down, one session stops being assigned to it.
    client.delete_session(&dropped.id).await.expect("delete works while the agent is down");
    cluster.restart_agent(0).await.unwrap();

    for exec in execs {
        let ended = tokio::time::timeout(Duration::from_secs(60), exec).await;
        assert!(ended.is_ok(), "an exec stream to a killed agent did not end");
    }
    let survivors = eventually("old sandbox processes gone", Duration::from_secs(20), || {
        let alive: Vec<_> = doomed.iter().filter(|p| host::is_alive(p.pid, p.start_time)).cloned().collect();
        let sleeps: Vec<_> = markers.iter().flat_map(|m| host::processes_matching(m)).collect();
        async move {
            if alive.is_empty() && sleeps.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("alive: {alive:?}; sleeps: {sleeps:?}"))
            }
        }
    })
    .await;
    assert!(survivors.is_ok(), "sandbox processes survived the agent's crash and restart: {survivors:?}");
    let cgroups = eventually("cgroups of the deleted session gone", Duration::from_secs(20), || {
        let left = host::cgroup_dirs_matching(&dropped.id);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("left: {left:?}"))
            }
        }
    })
    .await;
    assert!(cgroups.is_ok(), "the restarted agent left the unassigned session's cgroups: {cgroups:?}");

    // The session that is still assigned works again.
    let out = eventually("exec in the kept session", Duration::from_secs(60), || {
        let client = client.clone();
        let id = kept.id.clone();
        async move {
            let s = client.wait_running(&id, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            exec_argv(&client, &s, ["echo", "back"], SHORT).await
        }
    })
    .await
    .unwrap();
    assert_eq!(stdout(&out), "back\n", "{}", describe(&out));
    let gone = client.get_session(&dropped.id).await.unwrap();
    assert_eq!(state_of(&gone), proto::SessionState::Terminated, "{gone:?}");
}
