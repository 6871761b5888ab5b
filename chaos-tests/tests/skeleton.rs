//! Walking-skeleton end-to-end tests: real coordinator and agent processes,
//! real bubblewrap sandboxes, driven through the SDK and the CLI.
//!
//! Every test starts its own cluster (a coordinator and an agent in a fresh
//! temporary directory), so tests are independent and safe under nextest's
//! process-per-test model and under `cargo test`'s threads alike. Host-side
//! checks (processes, cgroups) are scoped by a per-test nonce or session id,
//! because other tests run at the same time.
//!
//! Needs the binaries (`cargo build --workspace --bins`) and root, bubblewrap
//! and writable cgroups; without them each test prints a SKIPPED banner and
//! returns, unless `SANDFLEET_REQUIRE_FACILITIES=1`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sandfleet::{proto, CreateSession, ExecRequest};
use sandfleet_chaos::host::{self, nonce};
use sandfleet_chaos::testkit::{
    create_running, describe, eventually, exec_argv, exec_python, expect_code, expect_one_of, list_all_sessions, raw,
    request_id, small_session, state_of, stderr, stdout,
};
use sandfleet_chaos::{bin_path, require_sandbox_facilities, Cluster, ClusterBuilder, Target};
use sha2::{Digest, Sha256};
use tonic::Code;

/// Returns early from a test when the machine cannot run sandboxes.
macro_rules! require_facilities {
    () => {
        if !require_sandbox_facilities() {
            return;
        }
    };
}

async fn start(builder: ClusterBuilder) -> Cluster {
    match builder.start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

async fn one_node() -> Cluster {
    start(ClusterBuilder::new().coordinators(1).agents(1)).await
}

const SHORT: Duration = Duration::from_secs(30);

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A Python string literal for `s` (JSON string syntax is valid Python for these inputs).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn parse_json_line(out: &sandfleet::ExecOutput) -> serde_json::Value {
    let text = stdout(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("sandbox script printed no JSON ({e}): {}", describe(out)))
}

// ---------------------------------------------------------------------------
// Exec basics
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_has_no_network() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("net")).await.unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let coordinator_port = port_of(&cluster.coordinators[0].addr);
    let agent_port = port_of(&cluster.agents[0].addr);

    let code = format!(
        r#"
import json, socket
res = {{}}
for name, port in [("listener", {port}), ("coordinator", {coordinator_port}), ("agent", {agent_port})]:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=3)
        c.close()
        res[name] = "connected"
    except OSError as e:
        res[name] = "failed: %s" % e
try:
    c = socket.create_connection(("10.255.255.1", 80), timeout=2)
    c.close()
    res["outside"] = "connected"
except OSError as e:
    res["outside"] = "failed: %s" % e
try:
    res["interfaces"] = sorted(n for _, n in socket.if_nameindex())
except OSError:
    res["interfaces"] = []
print(json.dumps(res))
"#
    );
    let out = exec_python(&client, &s, &code, Duration::from_secs(60)).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let res = parse_json_line(&out);
    for name in ["listener", "coordinator", "agent", "outside"] {
        let r = res[name].as_str().unwrap_or_default();
        assert!(r.starts_with("failed"), "connecting to the host's {name} from the sandbox must fail, got {r:?}");
    }
    let ifaces: Vec<&str> = res["interfaces"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(ifaces.iter().all(|i| *i == "lo"), "only loopback may exist in the sandbox, got {ifaces:?}");
    assert!(
        matches!(listener.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the test's listener received a connection from the sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_invisible() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("hostfs")).await.unwrap();

    let marker = std::env::temp_dir().join(format!("sandfleet-marker-{}", nonce()));
    std::fs::write(&marker, b"host secret").unwrap();
    let _cleanup = RemoveOnDrop(marker.clone());
    let agent_dir = cluster.agents[0].data_dir.display().to_string();
    let cluster_dir = cluster.dir().display().to_string();
    let marker_s = marker.display().to_string();

    let code = format!(
        r#"
import json, os
def read(p):
    try:
        with open(p, "rb") as f:
            return "read:" + f.read().decode("latin-1")
    except Exception as e:
        return "error:" + type(e).__name__
def ls(p):
    try:
        return sorted(os.listdir(p))
    except Exception as e:
        return "error:" + type(e).__name__
leaks = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode("latin-1")
            if argv0.endswith("/sandfleet-" + "agent") or argv0.endswith("/sandfleet-" + "coordinator"):
                leaks.append(argv0)
        except Exception:
            pass
print(json.dumps({{
    "shadow": read("/etc/shadow"),
    "root": ls("/root"),
    "home": ls("/home"),
    "agent_dir": os.path.exists({agent_dir}),
    "cluster_dir": os.path.exists({cluster_dir}),
    "marker": os.path.exists({marker}),
    "marker_read": read({marker}),
    "proc_leaks": leaks,
}}))
"#,
        agent_dir = py_str(&agent_dir),
        cluster_dir = py_str(&cluster_dir),
        marker = py_str(&marker_s),
    );
    let out = exec_python(&client, &s, &code, SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let r = parse_json_line(&out);

    if let Ok(host_shadow) = std::fs::read("/etc/shadow") {
        let host = format!("read:{}", host_shadow.iter().map(|b| *b as char).collect::<String>());
        assert_ne!(r["shadow"].as_str(), Some(host.as_str()), "the host's /etc/shadow is readable in the sandbox");
    }
    for dir in ["/root", "/home"] {
        let host: BTreeSet<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let key = dir.trim_start_matches('/');
        if let Some(inside) = r[key].as_array() {
            let inside: BTreeSet<String> = inside.iter().filter_map(|v| v.as_str().map(String::from)).collect();
            let shared: Vec<_> = host.intersection(&inside).collect();
            assert!(shared.is_empty(), "host entries of {dir} are visible in the sandbox: {shared:?}");
        }
    }
    assert_eq!(r["agent_dir"], false, "the agent's data dir {agent_dir} exists in the sandbox");
    assert_eq!(r["cluster_dir"], false, "the test's cluster dir {cluster_dir} exists in the sandbox");
    assert_eq!(r["marker"], false, "a host file in {} is visible in the sandbox", std::env::temp_dir().display());
    assert!(r["marker_read"].as_str().unwrap_or_default().starts_with("error:"), "{r}");
    assert_eq!(r["proc_leaks"], serde_json::json!([]), "host processes are visible in the sandbox's /proc");

    // The file API refuses absolute paths outright.
    expect_code("read /etc/shadow", client.read_file_bytes(&s, "/etc/shadow").await, Code::InvalidArgument);
    expect_code("list /root", client.list_files(&s, "/root").await, Code::InvalidArgument);
    expect_code("read agent dir", client.read_file_bytes(&s, &agent_dir).await, Code::InvalidArgument);
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_file_round_trips_byte_for_byte() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("files")).await.unwrap();

    // Download: 10 MiB made inside the sandbox reads back with the same digest.
    let out =
        exec_argv(&client, &s, ["sh", "-c", "head -c 10485760 /dev/urandom > made.bin && sha256sum made.bin"], SHORT)
            .await
            .unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let inside = stdout(&out).split_whitespace().next().unwrap_or_default().to_string();
    let back = client.read_file_bytes(&s, "made.bin").await.expect("read 10 MiB");
    assert_eq!(back.len(), 10 << 20, "read back a different length");
    assert_eq!(sha256_hex(&back), inside, "read_file disagrees with sha256sum inside the sandbox");

    // Upload: 10 MiB of random bytes written through the API.
    let mut data = vec![0u8; 10 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let want = sha256_hex(&data);

    client.write_file_bytes(&s, "blob.bin", data.clone()).await.expect("write 10 MiB");
    let back = client.read_file_bytes(&s, "blob.bin").await.expect("read back");
    assert_eq!(back.len(), data.len(), "read back a different length");
    assert_eq!(sha256_hex(&back), want, "read back different bytes");

    let out = exec_argv(&client, &s, ["sha256sum", "blob.bin"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let inside = stdout(&out).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(inside, want, "sha256sum inside the sandbox disagrees: {}", describe(&out));
}

// ---------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------

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
    let client = sandfleet::Client::connect(cluster.coordinator_addrs()[1..].to_vec()).await.unwrap();
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

// ---------------------------------------------------------------------------
// Bad input: each with its precise gRPC code, and nothing changed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_session_ids() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let unknown = uuid::Uuid::new_v4().hyphenated().to_string();
    expect_code("get unknown id", client.get_session(&unknown).await, Code::NotFound);
    expect_code("delete unknown id", client.delete_session(&unknown).await, Code::NotFound);
    expect_code(
        "renew unknown id",
        client.renew_session(&unknown, Some(Duration::from_secs(60))).await,
        Code::NotFound,
    );
    for bad in ["not-a-uuid", "../../etc/passwd", "", &unknown.to_uppercase()] {
        expect_code(&format!("get {bad:?}"), client.get_session(bad).await, Code::InvalidArgument);
    }
    expect_code("delete malformed id", client.delete_session("x/../y").await, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_template_and_request_id_create_nothing() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let err = expect_code(
        "template Bad_Template",
        client
            .create_session(
                CreateSession::new().request_id(request_id("tpl")).template("Bad_Template").label("test", tag.clone()),
            )
            .await,
        Code::InvalidArgument,
    );
    assert!(err.to_string().contains("template"), "the error names the field: {err}");
    expect_code(
        "request id with a space",
        client.create_session(CreateSession::new().request_id("has space").label("test", tag.clone())).await,
        Code::InvalidArgument,
    );
    expect_code(
        "label key with a slash",
        client
            .create_session(
                CreateSession::new().request_id(request_id("lbl")).label("a/b", "v").label("test", tag.clone()),
            )
            .await,
        Code::InvalidArgument,
    );
    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "rejected creates must create nothing: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_paths_and_symlinks_cannot_escape() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("paths")).await.unwrap();
    let host_passwd = std::fs::read("/etc/passwd").unwrap();

    for p in ["../etc/passwd", "a/../../etc/passwd", "..", "/etc/passwd"] {
        expect_code(&format!("read {p:?}"), client.read_file_bytes(&s, p).await, Code::InvalidArgument);
    }
    expect_code("write ../evil", client.write_file_bytes(&s, "../evil", b"x".to_vec()).await, Code::InvalidArgument);
    expect_code("list ..", client.list_files(&s, "..").await, Code::InvalidArgument);
    expect_code("remove ../x", client.remove_file(&s, "../x", false).await, Code::InvalidArgument);
    // The agent itself refuses them (not only the SDK).
    let node = s.node_address.as_str();
    raw::expect_status(
        "raw read ../etc/passwd",
        raw::read_file(node, &s.id, Some(&s.token), "../etc/passwd").await,
        Code::InvalidArgument,
    );
    raw::expect_status(
        "raw write a/../../x",
        raw::write_file(node, &s.id, Some(&s.token), "a/../../x", vec![b"x".to_vec()]).await,
        Code::InvalidArgument,
    );
    raw::expect_status("raw list /", raw::list_files(node, &s.id, Some(&s.token), "/").await, Code::InvalidArgument);

    // Symlinks planted by code in the sandbox point at the host's / and /etc/passwd.
    let out = exec_argv(&client, &s, ["sh", "-c", "ln -s /etc/passwd leak && ln -s / root"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    for p in ["leak", "root/etc/passwd", "./root/etc/passwd"] {
        let r = client.read_file_bytes(&s, p).await;
        if let Ok(bytes) = &r {
            assert_ne!(bytes, &host_passwd, "read_file({p:?}) returned the host's /etc/passwd");
        }
        expect_code(&format!("read through symlink {p:?}"), r, Code::InvalidArgument);
    }
    expect_code("list through symlink", client.list_files(&s, "root").await, Code::InvalidArgument);
    expect_code("list through symlink subdir", client.list_files(&s, "root/etc").await, Code::InvalidArgument);

    let victim = std::env::temp_dir().join(format!("sandfleet-victim-{}", nonce()));
    std::fs::write(&victim, b"keep me").unwrap();
    let _cleanup = RemoveOnDrop(victim.clone());
    let via_link = format!("root{}", victim.display());
    expect_code("remove through symlink", client.remove_file(&s, &via_link, false).await, Code::InvalidArgument);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me", "a host file was changed through a symlink");
    let planted = std::env::temp_dir().join(format!("sandfleet-planted-{}", nonce()));
    let _cleanup2 = RemoveOnDrop(planted.clone());
    let via_link = format!("root{}", planted.display());
    expect_code(
        "write through symlink",
        client.write_file_bytes(&s, &via_link, b"x".to_vec()).await,
        Code::InvalidArgument,
    );
    assert!(!planted.exists(), "a host file was created through a symlink");
    // Inside the workspace, the links themselves are harmless and can be removed.
    client.remove_file(&s, "leak", false).await.expect("removing a symlink removes the link");
    assert!(std::fs::read("/etc/passwd").unwrap() == host_passwd, "the host's /etc/passwd changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfittable_sessions_are_resource_exhausted_and_create_nothing() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();
    let nodes = client.list_nodes().await.unwrap();
    let max_mem = nodes.iter().filter_map(|n| n.capacity.as_ref()).map(|c| c.memory_bytes).max().unwrap();
    let max_cpu = nodes.iter().filter_map(|n| n.capacity.as_ref()).map(|c| c.cpu_millis).max().unwrap();

    // Within the documented limits (64 GiB, 64 cores), but larger than any node.
    let too_much_mem = max_mem + (1 << 30);
    if too_much_mem <= 64 << 30 {
        expect_code(
            "memory larger than every node",
            client
                .create_session(
                    CreateSession::new()
                        .request_id(request_id("huge"))
                        .memory_bytes(too_much_mem)
                        .label("test", tag.clone()),
                )
                .await,
            Code::ResourceExhausted,
        );
    } else {
        eprintln!("note: node memory {max_mem} is too large to test RESOURCE_EXHAUSTED on memory");
    }
    let too_much_cpu = max_cpu + 1000;
    if too_much_cpu <= 64_000 {
        expect_code(
            "cpu larger than every node",
            client
                .create_session(
                    CreateSession::new()
                        .request_id(request_id("hugecpu"))
                        .cpu_millis(too_much_cpu)
                        .label("test", tag.clone()),
                )
                .await,
            Code::ResourceExhausted,
        );
    }
    // 1 TiB: no node can ever fit it.
    expect_code(
        "memory 1Ti",
        client
            .create_session(
                CreateSession::new().request_id(request_id("1ti")).memory_bytes(1 << 40).label("test", tag.clone()),
            )
            .await,
        Code::ResourceExhausted,
    );

    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "refused creates must create nothing: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_requests_name_the_limit() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let tag = nonce();

    let mut spec = CreateSession::new().request_id(request_id("labels")).label("test", tag.clone());
    for i in 0..2000 {
        spec = spec.label(format!("k{i}"), "v");
    }
    let err =
        expect_one_of("2000 labels", client.create_session(spec).await, &[Code::OutOfRange, Code::InvalidArgument]);
    let msg = err.to_string();
    assert!(msg.contains("64") && msg.contains("label"), "the error names the 64-label limit: {msg}");
    let listed = list_all_sessions(&client, &[("test", &tag)], &[]).await.unwrap();
    assert!(listed.is_empty(), "refused creates must create nothing: {listed:?}");

    let s = create_running(&client, small_session("limits")).await.unwrap();
    let big_arg = "a".repeat(300 * 1024);
    let err = expect_one_of(
        "argv over 256 KiB",
        client.exec_collect(&s, ExecRequest::argv(["echo", big_arg.as_str()])).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("argv") && msg.contains("limit"), "the error names the argv limit: {msg}");

    let big_code = format!("#{}\nprint(1)", "x".repeat(1024 * 1024 + 16));
    let err = expect_one_of(
        "code over 1 MiB",
        client.exec_collect(&s, ExecRequest::code(proto::Language::Python, big_code)).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(err.to_string().to_lowercase().contains("limit"), "the error names the limit: {err}");

    let err = expect_one_of(
        "stdin over 1 MiB",
        client.exec_collect(&s, ExecRequest::argv(["cat"]).stdin(vec![b'x'; (1 << 20) + 1])).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(err.to_string().to_lowercase().contains("stdin"), "the error names stdin: {err}");

    // A write chunk over 1 MiB, sent raw (the SDK always chunks at 1 MiB).
    let st = raw::expect_one_of(
        "write chunk over 1 MiB",
        raw::write_file(&s.node_address, &s.id, Some(&s.token), "big.bin", vec![vec![b'x'; (1 << 20) + 1]]).await,
        &[Code::OutOfRange, Code::InvalidArgument],
    );
    assert!(st.message().to_lowercase().contains("limit"), "the error names the limit: {}", st.message());
    raw::expect_status(
        "the refused upload left no file",
        raw::read_file(&s.node_address, &s.id, Some(&s.token), "big.bin").await,
        Code::NotFound,
    );

    // The session is unharmed.
    let out = exec_argv(&client, &s, ["echo", "fine"], SHORT).await.unwrap();
    assert_eq!(stdout(&out), "fine\n", "{}", describe(&out));
}

fn tamper(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let mid = chars.len() / 2;
    let i = (mid..chars.len()).chain(0..mid).find(|i| chars[*i].is_ascii_alphanumeric()).expect("token has letters");
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_unauthenticated() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let a = create_running(&client, small_session("tok-a")).await.unwrap();
    let b = create_running(&client, small_session("tok-b")).await.unwrap();
    let out = exec_argv(&client, &b, ["sh", "-c", "printf \"b's secret\" > secret.txt"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let node = b.node_address.as_str();

    // Straight to the agent: the SDK would fetch a fresh token and retry.
    let tampered = tamper(&b.token);
    assert_ne!(tampered, b.token);
    let cases: [(&str, Option<&str>); 4] = [
        ("a tampered token", Some(tampered.as_str())),
        ("an empty token", Some("")),
        ("no authorization header", None),
        ("another session's token", Some(a.token.as_str())),
    ];
    for (what, token) in cases {
        raw::expect_status(
            &format!("exec with {what}"),
            raw::exec(node, &b.id, token, &["true"]).await,
            Code::Unauthenticated,
        );
        let r = raw::read_file(node, &b.id, token, "secret.txt").await;
        if let Ok(bytes) = &r {
            assert_ne!(bytes.as_slice(), b"b's secret", "read with {what} returned the file");
        }
        raw::expect_status(&format!("read with {what}"), r, Code::Unauthenticated);
        raw::expect_status(
            &format!("write with {what}"),
            raw::write_file(node, &b.id, token, "planted.txt", vec![b"x".to_vec()]).await,
            Code::Unauthenticated,
        );
        raw::expect_status(
            &format!("list with {what}"),
            raw::list_files(node, &b.id, token, "").await,
            Code::Unauthenticated,
        );
    }
    // A valid token of one session does not open another (checked above), and opens its own.
    let out = raw::exec(node, &a.id, Some(&a.token), &["true"]).await.expect("exec with the right token");
    assert!(
        matches!(out.last().and_then(|m| m.event.as_ref()), Some(proto::exec_response::Event::Exit(e)) if e.exit_code == 0),
        "{out:?}"
    );
    raw::expect_status(
        "read a missing file with the right token",
        raw::read_file(node, &b.id, Some(&b.token), "planted.txt").await,
        Code::NotFound,
    );
    assert_eq!(raw::read_file(node, &b.id, Some(&b.token), "secret.txt").await.unwrap(), b"b's secret".to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_waits_pending_while_the_node_is_full() {
    require_facilities!();
    let cluster = start(ClusterBuilder::new().agent_args(["--cpu", "2", "--slots", "2"])).await;
    let client = cluster.client().await;
    let spec = |p: &str| {
        CreateSession::new()
            .request_id(request_id(p))
            .cpu_millis(1000)
            .memory_bytes(128 << 20)
            .ttl(Duration::from_secs(600))
    };
    let first = create_running(&client, spec("full-1")).await.unwrap();
    let _second = create_running(&client, spec("full-2")).await.unwrap();

    // Fits the node's capacity, but not what is free now: it waits, it is not refused.
    let third = client.create_session(spec("full-3")).await.expect("a create that only has to wait is accepted");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = client.get_session(&third.id).await.unwrap();
    assert_eq!(state_of(&now), proto::SessionState::Pending, "{now:?}");
    assert!(!now.pending_reason.is_empty(), "a PENDING session says what it waits for: {now:?}");
    assert!(now.node_id.is_empty(), "{now:?}");

    client.delete_session(&first.id).await.unwrap();
    let running = client.wait_running(&third.id, Duration::from_secs(60)).await;
    assert!(running.is_ok(), "the pending session must start once capacity frees up: {running:?}");
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

async fn cli(args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin_path("sandfleet"));
    cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("running sandfleet {args:?}: {e}"),
        Err(_) => panic!("sandfleet {args:?} did not finish within 120 s"),
    }
}

fn show(out: &std::process::Output) -> String {
    format!(
        "status={} stdout={:?} stderr={:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_run_and_session_commands() {
    require_facilities!();
    let cluster = one_node().await;
    let endpoint = cluster.endpoint();

    let out = cli(&[
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
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "42"), "{}", show(&out));

    let out = cli(&["--endpoint", &endpoint, "run", "--", "sh", "-c", "exit 7"]).await;
    assert_eq!(out.status.code(), Some(7), "run exits with the command's exit code: {}", show(&out));

    let out = cli(&["--endpoint", &endpoint, "session", "create", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("session create --output json is not JSON ({e}): {}", show(&out)));
    let id = v["id"].as_str().unwrap_or_else(|| panic!("no string \"id\": {v}")).to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "id is a UUID: {v}");
    assert!(v.get("state").is_some_and(|s| !s.is_null()), "no \"state\": {v}");

    let out = cli(&["--endpoint", &endpoint, "session", "get", &id, "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    assert_eq!(got["id"], serde_json::json!(id), "{got}");

    let out = cli(&["--endpoint", &endpoint, "session", "rm", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let client = cluster.client().await;
    let gone = client.get_session(&id).await.unwrap();
    assert_eq!(state_of(&gone), proto::SessionState::Terminated, "{gone:?}");

    let unknown = uuid::Uuid::new_v4().to_string();
    let out = cli(&["--endpoint", &endpoint, "session", "get", &unknown]).await;
    assert_ne!(out.status.code(), Some(0), "getting an unknown session fails: {}", show(&out));
}
