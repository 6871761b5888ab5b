//! Scheduling and lifetimes with real processes: node selectors, drains with
//! `max_parallel`, per-session restart policies (`lost_after`, attempts),
//! idle timeouts, and an agent cut off from every coordinator ending expired
//! sessions on its own.
//!
//! The coordinators run with a short node TTL (`--agent-heartbeat 500ms
//! --node-ttl 3s`) to keep the tests quick.

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sandfleet::{proto, Client, CreateSession};
use sandfleet_testkit::helpers::{create_running, exec_python, small_session, state_of, stdout};
use sandfleet_testkit::host;
use sandfleet_testkit::{require_sandbox_facilities, Cluster, ClusterBuilder, Target};

use common::agent_index;

macro_rules! require_facilities {
    () => {
        if !require_sandbox_facilities() {
            return;
        }
    };
}

async fn cluster(agents: usize) -> Cluster {
    let builder = ClusterBuilder::new().coordinators(1).agents(agents).coordinator_args([
        "--agent-heartbeat",
        "500ms",
        "--node-ttl",
        "3s",
    ]);
    match builder.start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

fn on_node(prefix: &str, node: &str) -> CreateSession {
    small_session(prefix).node_selector("sandfleet.node", node)
}

async fn node(client: &Client, id: &str) -> proto::Node {
    client.list_nodes().await.unwrap().into_iter().find(|n| n.id == id).expect("a registered node")
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let until = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < until, "{what}: not within {timeout:?}; last: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_selector_pins_sessions_and_explains_what_cannot_fit() {
    require_facilities!();
    let cluster = cluster(2).await;
    let client = cluster.client().await;
    let b = cluster.agents[1].id.clone();
    for i in 0..3 {
        let s = create_running(&client, on_node(&format!("pin{i}"), &b)).await.unwrap();
        assert_eq!(s.node_id, b, "the selector pins the session to {b}");
        assert_eq!(s.spec.unwrap().node_selector["sandfleet.node"], b);
    }
    let s = client.create_session(small_session("nowhere").node_selector("zone", "mars")).await.unwrap();
    let s = client.get_session(&s.id).await.unwrap();
    assert_eq!(state_of(&s), proto::SessionState::Pending);
    assert!(s.pending_reason.contains("carries the labels zone=mars"), "{}", s.pending_reason);

    // Malformed selectors are refused and create nothing.
    let before = client.list_sessions(Default::default()).await.unwrap().sessions.len();
    let err = client.create_session(small_session("bad").node_selector("bad key", "x")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("node_selector"), "{err}");
    assert_eq!(client.list_sessions(Default::default()).await.unwrap().sessions.len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_sessions_at_most_max_parallel_at_a_time() {
    require_facilities!();
    let cluster = cluster(2).await;
    let client = cluster.client().await;
    let (a, b) = (cluster.agents[0].id.clone(), cluster.agents[1].id.clone());
    let mut sessions = Vec::new();
    // Unpinned sessions, all on a (b is cordoned meanwhile), so they can move to b.
    client.cordon_node(&b, true).await.unwrap();
    for i in 0..4 {
        let s = create_running(&client, small_session(&format!("drain{i}"))).await.unwrap();
        assert_eq!(s.node_id, a);
        sessions.push(s);
    }
    client.cordon_node(&b, false).await.unwrap();
    let old_cgroups: Vec<_> = sessions
        .iter()
        .flat_map(|s| host::cgroup_dirs_matching(&s.id))
        .filter(|p| p.to_string_lossy().contains(&a))
        .collect();
    assert!(!old_cgroups.is_empty());

    // Bad input changes nothing.
    let err = client.drain_node("no-such-node", Duration::from_secs(60), 1).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    let err = client.drain_node(&a, Duration::from_secs(60), 5000).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");
    let err = client.drain_node(&a, Duration::from_secs(100_000), 1).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");
    assert_eq!(node(&client, &a).await.state, "ready");

    let n = client.drain_node(&a, Duration::from_secs(600), 1).await.unwrap();
    assert_eq!(n.state, "draining");
    let started = Instant::now();
    let mut most_moving = 0;
    loop {
        let n = node(&client, &a).await;
        let d = n.drain.expect("drain progress while draining");
        most_moving = most_moving.max(d.moving);
        assert!(d.moving <= 1, "max_parallel 1 but {} moving", d.moving);
        if d.remaining == 0 && d.moving == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "drain did not finish: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Polling can miss a move entirely (a move takes a few ms), so "one at a time" is judged by
    // the leader's own account below: four moves of one session each.
    eprintln!("drained 4 sessions in {:?}; at most {most_moving} seen moving at once", started.elapsed());
    let log = std::fs::read_to_string(&cluster.coordinators[0].log_path).unwrap();
    let moves: Vec<&str> = log.lines().filter(|l| l.contains("moving sessions off a draining node")).collect();
    assert_eq!(moves.len(), 4, "{moves:#?}");
    assert!(moves.iter().all(|l| l.contains("sessions=1")), "{moves:#?}");
    for s in &sessions {
        let now = client.get_session(&s.id).await.unwrap();
        assert_eq!(
            (state_of(&now), now.node_id.as_str(), now.generation),
            (proto::SessionState::Running, b.as_str(), s.generation + 1)
        );
        let out = exec_python(&client, &now, "print(6*7)", Duration::from_secs(30)).await.unwrap();
        assert_eq!(stdout(&out).trim(), "42");
    }
    // The old copies are gone from the drained node, and nothing new lands there.
    wait_until("old copies removed", Duration::from_secs(10), || async {
        let left: Vec<_> = old_cgroups.iter().filter(|p| p.exists()).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await;
    let s = client.create_session(on_node("after-drain", &a)).await.unwrap();
    let s = client.get_session(&s.id).await.unwrap();
    assert_eq!(state_of(&s), proto::SessionState::Pending);
    assert!(s.pending_reason.contains("1 are draining"), "{}", s.pending_reason);
    // Uncordon ends the drain, and the waiting session lands.
    let n = client.cordon_node(&a, false).await.unwrap();
    assert_eq!((n.state.as_str(), n.drain.is_none()), ("ready", true));
    let s = client.wait_running(&s.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.node_id, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_lost_after_and_attempts() {
    require_facilities!();
    let mut cluster = cluster(2).await;
    let client = cluster.client().await;
    let (a, b) = (cluster.agents[0].id.clone(), cluster.agents[1].id.clone());
    client.cordon_node(&b, true).await.unwrap();
    let quick = create_running(&client, small_session("quick").max_attempts(1)).await.unwrap();
    let patient = create_running(&client, small_session("patient").lost_after(Duration::from_secs(9))).await.unwrap();
    assert_eq!((quick.node_id.as_str(), patient.node_id.as_str()), (a.as_str(), a.as_str()));
    client.cordon_node(&b, false).await.unwrap();

    // Bad policies are refused.
    let err =
        client.create_session(small_session("too-eager").lost_after(Duration::from_millis(200))).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");
    let err = client.create_session(small_session("too-many").max_attempts(1_000_000)).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange), "{err}");

    cluster.kill(Target::Agent(agent_index(&cluster, &a))).await.unwrap();
    let killed = Instant::now();
    // The default session moves after the node TTL; the patient one waits for its 9 s.
    wait_until("quick session running on b", Duration::from_secs(15), || async {
        let s = client.get_session(&quick.id).await.map_err(|e| e.to_string())?;
        if state_of(&s) == proto::SessionState::Running && s.node_id == b {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let quick_moved = killed.elapsed();
    let p = client.get_session(&patient.id).await.unwrap();
    if killed.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            (p.node_id.as_str(), p.generation),
            (a.as_str(), patient.generation),
            "lost_after 9s keeps it on {a} for now"
        );
    }
    wait_until("patient session running on b", Duration::from_secs(20), || async {
        let s = client.get_session(&patient.id).await.map_err(|e| e.to_string())?;
        if state_of(&s) == proto::SessionState::Running && s.node_id == b {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let patient_moved = killed.elapsed();
    eprintln!("after SIGKILL: default session moved in {quick_moved:?}, lost_after=9s session in {patient_moved:?}");
    assert!(patient_moved >= Duration::from_secs(9), "moved before its lost_after: {patient_moved:?}");
    let q = client.get_session(&quick.id).await.unwrap();
    assert_eq!(q.restarts, 1);

    // The quick session has used its one attempt: losing b fails it for good.
    cluster.restart(Target::Agent(agent_index(&cluster, &a))).await.unwrap();
    wait_until("a ready again", Duration::from_secs(20), || async {
        let n = node(&client, &a).await;
        if n.state == "ready" {
            Ok(())
        } else {
            Err(n.state)
        }
    })
    .await;
    cluster.kill(Target::Agent(agent_index(&cluster, &b))).await.unwrap();
    wait_until("quick session failed", Duration::from_secs(15), || async {
        let s = client.get_session(&quick.id).await.map_err(|e| e.to_string())?;
        if state_of(&s) == proto::SessionState::Failed {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let q = client.get_session(&quick.id).await.unwrap();
    assert!(q.message.contains("restart attempts"), "{}", q.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_and_use_keeps_them_alive() {
    require_facilities!();
    let cluster = cluster(1).await;
    let client = cluster.client().await;
    let busy = create_running(&client, small_session("busy").idle_timeout(Duration::from_secs(3))).await.unwrap();
    let idle = create_running(&client, small_session("idle").idle_timeout(Duration::from_secs(3))).await.unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        exec_python(&client, &busy, "print(1)", Duration::from_secs(30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = client.get_session(&busy.id).await.unwrap();
    assert_eq!(state_of(&b), proto::SessionState::Running, "used every 0.5 s, so not idle: {}", b.message);
    let i = client.get_session(&idle.id).await.unwrap();
    assert_eq!(state_of(&i), proto::SessionState::Terminated, "unused for 6 s with a 3 s idle timeout");
    assert!(i.message.contains("idle"), "{}", i.message);
    // Nothing of it is left on the node.
    wait_until("idle session cleaned up", Duration::from_secs(10), || async {
        let dirs = host::cgroup_dirs_matching(&idle.id);
        if dirs.is_empty() {
            Ok(())
        } else {
            Err(format!("{dirs:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_agent_ends_expired_and_idle_sessions_itself() {
    require_facilities!();
    let cluster = cluster(1).await;
    let client = cluster.client().await;
    // Long lost_after, so fencing does not stop them first.
    let ttl =
        create_running(&client, small_session("ttl").ttl(Duration::from_secs(4)).lost_after(Duration::from_secs(600)))
            .await
            .unwrap();
    let idle = create_running(
        &client,
        small_session("idle")
            .idle_timeout(Duration::from_secs(3))
            .ttl(Duration::from_secs(600))
            .lost_after(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    let keep = create_running(
        &client,
        small_session("keep").ttl(Duration::from_secs(600)).lost_after(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    let dirs = |id: &str| host::cgroup_dirs_matching(id);
    assert!(!dirs(&ttl.id).is_empty() && !dirs(&idle.id).is_empty());

    // Freeze the only coordinator: the agent is cut off from any quorum.
    cluster.proc(Target::Coordinator(0)).signal(Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    let until = frozen + Duration::from_secs(15);
    while !(dirs(&ttl.id).is_empty() && dirs(&idle.id).is_empty()) {
        assert!(
            Instant::now() < until,
            "the cut-off agent did not end them: ttl {:?} idle {:?}",
            dirs(&ttl.id),
            dirs(&idle.id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = frozen.elapsed();
    assert!(!dirs(&keep.id).is_empty(), "a session within its lifetimes keeps running");
    cluster.proc(Target::Coordinator(0)).signal(Signal::SIGCONT).unwrap();
    eprintln!("cut-off agent ended the expired and idle sessions {took:?} after losing the coordinator");
    let log = std::fs::read_to_string(&cluster.agents[0].log_path).unwrap();
    assert!(
        log.contains("past its ttl while cut off") && log.contains("past its idle timeout while cut off"),
        "agent log says why"
    );

    // Back in contact, the coordinator agrees: both ended, the third runs.
    wait_until("coordinator ends them too", Duration::from_secs(20), || async {
        let t = client.get_session(&ttl.id).await.map_err(|e| e.to_string())?;
        let i = client.get_session(&idle.id).await.map_err(|e| e.to_string())?;
        let k = client.get_session(&keep.id).await.map_err(|e| e.to_string())?;
        let states = (state_of(&t), state_of(&i), state_of(&k));
        if states == (proto::SessionState::Terminated, proto::SessionState::Terminated, proto::SessionState::Running) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
    let k = client.get_session(&keep.id).await.unwrap();
    let out = exec_python(&client, &k, "print(6*7)", Duration::from_secs(30)).await.unwrap();
    assert_eq!(stdout(&out).trim(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_scheduler_queues_sessions_and_resume_places_them() {
    require_facilities!();
    let cluster = cluster(1).await;
    let client = cluster.client().await;
    let running = create_running(&client, small_session("before-pause")).await.unwrap();

    // Paused through the CLI, as an operator would.
    let out = tokio::process::Command::new(sandfleet_testkit::bin_path("sandfleet"))
        .envs(cluster.cli_env())
        .args(["--endpoint", &cluster.endpoint(), "--output", "json", "cluster", "scheduler", "pause"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["paused"], true, "{v}");

    let queued: Vec<proto::Session> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(client.create_session(small_session(&format!("queued{i}"))).await.unwrap());
        }
        v
    };
    // Nothing is placed while paused, every waiting session says why, and what ran goes on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for q in &queued {
        let s = client.get_session(&q.id).await.unwrap();
        assert_eq!((state_of(&s), s.node_id.as_str(), s.generation), (proto::SessionState::Pending, "", 0), "{s:?}");
        assert!(s.pending_reason.contains("scheduling is paused"), "{}", s.pending_reason);
    }
    let status = client.cluster_status().await.unwrap();
    assert!(status.scheduler_paused);
    assert_eq!(status.unplaced_sessions, 3);
    let out = exec_python(&client, &running, "print('still here')", Duration::from_secs(30)).await.unwrap();
    assert_eq!(stdout(&out), "still here\n");
    // Idempotent.
    assert!(client.set_scheduler_paused(true).await.unwrap().paused);

    let r = client.set_scheduler_paused(false).await.unwrap();
    assert!(!r.paused);
    for q in &queued {
        let s = client.wait_running(&q.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(s.generation, 1, "{s:?}");
    }
    let status = client.cluster_status().await.unwrap();
    assert_eq!((status.scheduler_paused, status.unplaced_sessions), (false, 0));
}

/// Concurrent creates spread over equal nodes: each create's placement counts
/// the creates placed before it that have not committed yet (group commit
/// commits many creates at once, so without that they would all choose the
/// node that was emptiest before any of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_spread_over_equal_nodes() {
    require_facilities!();
    let cluster = cluster(2).await;
    let client = cluster.client().await;
    const CREATES: usize = 24;
    let created = futures::future::join_all((0..CREATES).map(|i| {
        let client = client.clone();
        let spec = small_session(&format!("spread{i}")).cpu_millis(10).memory_bytes(32 << 20);
        async move { client.create_session(spec).await }
    }))
    .await;
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for s in created {
        let s = s.expect("create");
        *per_node.entry(s.node_id).or_default() += 1;
    }
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.id.clone()).collect();
    for id in &ids {
        let n = per_node.get(id).copied().unwrap_or(0);
        assert!(
            (CREATES / 2 - 2..=CREATES / 2 + 2).contains(&n),
            "{CREATES} concurrent creates placed {per_node:?} on nodes {ids:?}: not spread"
        );
    }
}
