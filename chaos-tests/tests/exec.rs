//! End-to-end tests of exec: stdout, stderr and exit codes, timeouts that
//! kill the whole process tree, the memory limit, and fork bombs.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use sandfleet::{CreateSession, ExecRequest};
use sandfleet_testkit::helpers::{
    create_running, describe, eventually, exec_argv, exec_python, request_id, small_session, stderr, stdout,
};
use sandfleet_testkit::host::{self, nonce};

use common::{one_node, SHORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_exec_returns_stdout_stderr_and_exit_code() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("py")).await.unwrap();
    assert!(!s.node_address.is_empty(), "a RUNNING session has a node address: {s:?}");
    assert!(!s.token.is_empty(), "a RUNNING session from wait_running carries a token: {s:?}");

    let out = exec_python(&client, &s, "print(6*7)", SHORT).await.unwrap();
    assert_eq!(stdout(&out), "42\n", "{}", describe(&out));
    assert_eq!(stderr(&out), "", "{}", describe(&out));
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    assert_eq!(out.exit.signal, 0, "{}", describe(&out));
    assert!(!out.exit.timed_out && !out.exit.oom_killed && !out.exit.output_truncated, "{}", describe(&out));

    let out = exec_argv(&client, &s, ["python3", "-c", "print(6*7)"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "42\n", "argv form: {}", describe(&out));
    assert_eq!(out.exit.exit_code, 0, "argv form: {}", describe(&out));

    let out = exec_python(&client, &s, "import sys; sys.exit(3)", SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 3, "{}", describe(&out));
    assert!(!out.exit.timed_out, "{}", describe(&out));

    let out =
        exec_python(&client, &s, "import sys\nprint('to-out')\nprint('to-err', file=sys.stderr)\nsys.exit(0)", SHORT)
            .await
            .unwrap();
    assert_eq!(stdout(&out), "to-out\n", "stdout must not contain stderr: {}", describe(&out));
    assert_eq!(stderr(&out), "to-err\n", "stderr must come through separately: {}", describe(&out));
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));

    let out = exec_argv(&client, &s, ["sh", "-c", "kill -TERM $$"], SHORT).await.unwrap();
    assert_eq!(out.exit.signal, 15, "killed by SIGTERM reports the signal: {}", describe(&out));
    assert_eq!(out.exit.exit_code, 128 + 15, "shell convention 128+N: {}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_tree() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("timeout")).await.unwrap();

    // A unique duration marks this test's sleeps among every process on the host.
    let marker = format!("300.{}", nonce());
    let script = format!("sleep {marker} & sleep {marker}");
    let started = Instant::now();
    let exec = {
        let client = client.clone();
        let s = s.clone();
        tokio::spawn(async move {
            client
                .exec_collect(&s, ExecRequest::argv(["bash", "-c", script.as_str()]).timeout(Duration::from_secs(1)))
                .await
        })
    };
    // Prove the check below is meaningful: the sleeps really ran.
    let mut seen = Vec::new();
    while seen.is_empty() && !exec.is_finished() && started.elapsed() < Duration::from_secs(10) {
        seen = host::processes_matching(&marker);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(20), exec)
        .await
        .expect("exec with a 1 s timeout must end well within 20 s")
        .expect("exec task panicked")
        .expect("exec call failed");
    let elapsed = started.elapsed();
    assert!(!seen.is_empty(), "the sleep processes were never seen on the host; {}", describe(&out));
    assert!(out.exit.timed_out, "timed_out must be set: {}", describe(&out));
    assert_ne!(out.exit.exit_code, 0, "a killed command does not exit 0: {}", describe(&out));
    assert!(!out.exit.message.is_empty(), "a timed-out exec explains itself: {}", describe(&out));
    assert!(elapsed < Duration::from_secs(10), "exec took {elapsed:?} for a 1 s timeout");

    let left = eventually("sleep processes gone", Duration::from_secs(3), || {
        let left = host::processes_matching(&marker);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("still running: {left:?}"))
            }
        }
    })
    .await;
    assert!(left.is_ok(), "the background `sleep` survived the timeout: {left:?}");

    // The session is still usable.
    let out = exec_argv(&client, &s, ["echo", "after"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "after\n", "{}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kills_and_agent_survives() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let spec = CreateSession::new()
        .request_id(request_id("oom"))
        .memory_bytes(64 << 20)
        .cpu_millis(500)
        .pids_limit(64)
        .ttl(Duration::from_secs(600));
    let s = create_running(&client, spec).await.unwrap();

    // b"a" * n writes every byte, so the pages are really touched.
    let out = exec_python(&client, &s, "x = b'a' * (512 * 1024 * 1024)\nprint(len(x))", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(out.exit.oom_killed, "512 MiB in a 64 MiB session must report oom_killed: {}", describe(&out));
    assert_ne!(out.exit.exit_code, 0, "{}", describe(&out));
    assert!(!stdout(&out).contains("536870912"), "the allocation must not succeed: {}", describe(&out));
    assert!(!out.exit.timed_out, "{}", describe(&out));

    let out = exec_argv(&client, &s, ["echo", "alive"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "alive\n", "the session answers after an OOM kill: {}", describe(&out));
    assert_eq!(out.exit.exit_code, 0);
    assert!(!out.exit.oom_killed, "oom_killed is per exec: {}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained() {
    require_facilities!();
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let spec = CreateSession::new()
        .request_id(request_id("forkbomb"))
        .memory_bytes(256 << 20)
        .cpu_millis(500)
        .pids_limit(64)
        .ttl(Duration::from_secs(600));
    let s = create_running(&client, spec).await.unwrap();

    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        exec_argv(&client, &s, ["bash", "-c", ":(){ :|:& };:"], Duration::from_secs(5)),
    )
    .await
    .expect("a fork bomb with a 5 s timeout must end within 60 s")
    .unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(20), "fork bomb exec took {elapsed:?}: {}", describe(&out));

    // The bomb's shells are gone from the session's cgroup.
    let gone = eventually("fork bomb processes gone", Duration::from_secs(10), || {
        let left: Vec<_> = host::processes_in_cgroup_matching(&s.id).into_iter().filter(|p| p.comm == "bash").collect();
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{} bash processes left", left.len()))
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "{gone:?}");

    // The agent still answers, in this session and in a new one.
    assert!(cluster.agents[0].is_running(), "the agent died:\n{}", cluster.logs(80));
    let out = exec_argv(&client, &s, ["echo", "still-here"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "still-here\n", "exec after a fork bomb: {}", describe(&out));
    let other = create_running(&client, small_session("after-bomb")).await.unwrap();
    let out = exec_argv(&client, &other, ["echo", "ok"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "ok\n", "{}", describe(&out));
    let nodes = client.list_nodes().await.unwrap();
    let node = &cluster.agents[0].id;
    assert!(nodes.iter().any(|n| &n.id == node && n.state == "ready"), "{nodes:?}");
}
