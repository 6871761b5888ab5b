//! The DaemonSet rehearsal (issue 16): the agent pod of the rendered dev
//! overlay run on this Docker host by `deploy/kubernetes/rehearse-daemonset`,
//! with exactly the DaemonSet's containers (the sessions' own containerd and
//! the agent), images, args, env, user, privileges, read-only root, volumes
//! and mount propagation, as two "nodes" `node-a` and `node-b`, registered
//! with one coordinator pod of the rendered StatefulSet.
//!
//! Sessions run on the `cri` runtime through the pod's containerd. Killing
//! node A's pod (`docker kill` of its agent, its containerd and its infra
//! container: the pod is gone, its sessions with it) moves its session to
//! node B, placed again with a higher generation and its workspace restored
//! from the store both agents share (a host directory standing in for S3).
//!
//! Needs a Docker engine and root; without them the test prints a SKIPPED
//! banner, unless `SANDFLEET_REQUIRE_FACILITIES=1` (CI). Everything it makes
//! (containers, network, the agents' mounts, loop devices, cgroups) is
//! removed by `rehearse-daemonset down`, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandfleet::{proto, Client};
use sandfleet_testkit::bin_path;
use sandfleet_testkit::facilities::{build_daemon_image, build_sandbox_image, REQUIRE_ENV};
use sandfleet_testkit::helpers::{exec_python, small_session, stdout};
use sandfleet_testkit::require_docker;

const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
/// Registration, from `docker run` of the agent.
const REGISTER_BOUND: Duration = Duration::from_secs(90);
/// A moved session runs again within this after the pod is killed (node TTL 5 s in the ConfigMap).
const MOVE_BOUND: Duration = Duration::from_secs(90);
const RUNNING_BOUND: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/rehearse-daemonset")
}

/// Runs the rehearsal script; its stdout, or an error with its stderr.
fn rehearse(args: &[&str]) -> Result<String> {
    let t = Instant::now();
    let out = Command::new("timeout")
        .arg("600")
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running rehearse-daemonset {args:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The script's deviations and notes, for the test's output.
    eprint!("{stderr}");
    if !out.status.success() {
        bail!("rehearse-daemonset {args:?} failed ({}): {}", out.status, stderr.trim());
    }
    eprintln!("rehearse-daemonset {} took {:?}", args[0], t.elapsed());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The rehearsal's work dir; `down` when dropped (container logs first, on failure).
struct Rehearsal {
    work: tempfile::TempDir,
    state: serde_json::Value,
}

impl Rehearsal {
    fn work(&self) -> &str {
        self.work.path().to_str().unwrap()
    }

    fn reload(&mut self) -> Result<()> {
        self.state = serde_json::from_slice(&std::fs::read(self.work.path().join("state.json"))?)?;
        Ok(())
    }

    fn node(&mut self, node: &str, store: &Path) -> Result<()> {
        let store = store.to_str().unwrap().to_string();
        rehearse(&["node", node, "--work", self.work(), "--shared-store", &store])?;
        self.reload()
    }

    fn containers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(pods) = self.state["coordinator"]["pods"].as_array() {
            for p in pods {
                out.extend(
                    p["containers"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)),
                );
            }
        }
        if let Some(nodes) = self.state["nodes"].as_object() {
            for n in nodes.values() {
                out.extend(
                    n["containers"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)),
                );
            }
        }
        out
    }

    async fn client(&self) -> Result<Client> {
        let pki = self.work.path().join("pki");
        let tls = sandfleet::TlsOptions {
            ca: pki.join("ca.crt"),
            cert_and_key: Some((pki.join("ops.crt"), pki.join("ops.key"))),
        };
        let endpoints: Vec<String> = self.state["coordinator"]["endpoints"]
            .as_array()
            .context("no coordinator endpoints")?
            .iter()
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
        Ok(Client::builder(endpoints).tls(Some(tls)).connect().await?)
    }
}

impl Drop for Rehearsal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.reload();
            eprintln!("\n===== daemonset rehearsal failed; container logs follow =====");
            for c in self.containers() {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "60", &c])
                    .output()
                    .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
                    .unwrap_or_else(|e| format!("(docker logs failed: {e})"));
                eprintln!("----- {c} -----\n{logs}");
            }
        }
        if let Err(e) = rehearse(&["down", "--work", self.work()]) {
            eprintln!("rehearse-daemonset down failed: {e:#}");
        }
    }
}

async fn wait_nodes(client: &Client, want: &[&str], within: Duration) -> Vec<proto::Node> {
    let deadline = Instant::now() + within;
    loop {
        let last = match client.list_nodes().await {
            Ok(nodes) if want.iter().all(|w| nodes.iter().any(|n| n.id == *w && n.state == "ready")) => return nodes,
            Ok(nodes) => format!("{:?}", nodes.iter().map(|n| (&n.id, &n.state)).collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "nodes {want:?} not ready within {within:?}: {last}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether any file under `dir` contains `needle` (the shared store holds the workspace's files).
fn store_holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if store_holds(&p, needle) {
                return true;
            }
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            return true;
        }
    }
    false
}

/// The testkit's contract for a missing facility: a loud banner and `false`,
/// or a panic under `SANDFLEET_REQUIRE_FACILITIES=1` or `CI=true`.
fn skip_or_fail(what: &str) -> bool {
    let line = "=".repeat(78);
    let banner = format!(
        "\n{line}\nSKIPPED (facility missing): {what}\nThe DaemonSet rehearsal needs Docker, root, kubectl, \
         python3 with PyYAML and the daemon images (deploy/images). Set {REQUIRE_ENV}=1 to make this a failure.\n{line}\n"
    );
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") || std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{banner}");
    }
    use std::io::Write;
    let _ = std::io::stderr().write_all(banner.as_bytes());
    false
}

/// kubectl (renders the overlay) and python3 with PyYAML (the script), or the
/// venv of scripts/check-manifests.
fn require_tools() -> bool {
    let ok = |cmd: &str, args: &[&str]| {
        Command::new(cmd).args(args).stdin(Stdio::null()).output().is_ok_and(|o| o.status.success())
    };
    if !ok("kubectl", &["version", "--client"]) {
        return skip_or_fail("kubectl (renders deploy/kubernetes/overlays/dev)");
    }
    let venv = std::env::var("HOME").unwrap_or_default() + "/.cache/sandfleet-venv-k8s/bin/python";
    if !ok("python3", &["-c", "import yaml"]) && !ok(&venv, &["-c", "import yaml"]) {
        return skip_or_fail("python3 with PyYAML (apt-get install python3-yaml)");
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_rehearsal_runs_cri_sessions_and_moves_them_when_a_node_dies() {
    if !require_docker() || !require_tools() {
        return;
    }
    // The images, from this build (cheap when they exist already).
    let t = Instant::now();
    let built = ["coordinator", "agent", "pause"]
        .iter()
        .map(|i| build_daemon_image(i))
        .chain([build_sandbox_image()])
        .collect::<Result<Vec<String>, String>>();
    let images = match built {
        Ok(images) => images,
        Err(e) => {
            // Returns only when skipping (it panics under CI).
            skip_or_fail(&format!("the images: {e}"));
            return;
        }
    };
    let images_took = t.elapsed();
    eprintln!("images {images:?} ready in {images_took:?}");

    let started = Instant::now();
    let work = tempfile::Builder::new().prefix("sandfleet-ds-").tempdir().unwrap();
    let store = tempfile::Builder::new().prefix("sandfleet-ds-store-").tempdir().unwrap();
    let sandfleet_cli = bin_path("sandfleet");
    let mut r = Rehearsal { work, state: serde_json::Value::Null };
    rehearse(&["up", "--work", r.work(), "--sandfleet", sandfleet_cli.to_str().unwrap()]).unwrap();
    r.reload().unwrap();
    r.node(NODE_A, store.path()).unwrap();
    let client = r.client().await.unwrap();
    wait_nodes(&client, &[NODE_A], REGISTER_BOUND).await;
    let a_ready = started.elapsed();
    r.node(NODE_B, store.path()).unwrap();
    let nodes = wait_nodes(&client, &[NODE_A, NODE_B], REGISTER_BOUND).await;
    let both_ready = started.elapsed();
    for n in &nodes {
        let ip = r.state["nodes"][&n.id]["ip"].as_str().unwrap_or_default();
        assert_eq!(n.address, format!("{ip}:7071"), "advertised HOST_IP:7071");
        let cap = n.capacity.unwrap_or_default();
        eprintln!("node {} at {}: capacity {cap:?}", n.id, n.address);
        // --cpu and --memory from the downward API: the dev overlay's agent limits.
        assert_eq!((cap.cpu_millis, cap.memory_bytes), (2000, 4 << 30), "{}", n.id);
    }

    // A session on node A (B cordoned for the placement), on the cri runtime.
    client.cordon_node(NODE_B, true).await.unwrap();
    let created = client.create_session(small_session("ds").runtime("cri")).await.unwrap();
    let s = client.wait_running(&created.id, RUNNING_BOUND).await.unwrap();
    client.cordon_node(NODE_B, false).await.unwrap();
    assert_eq!(s.node_id, NODE_A);
    let out = exec_python(&client, &s, "print(6*7)", EXEC_TIMEOUT).await.unwrap();
    assert_eq!(stdout(&out), "42\n");
    let token = format!("rehearsed-{}", uuid::Uuid::new_v4().simple());
    client.write_file_bytes(&s, "rehearsal.txt", token.clone().into_bytes()).await.unwrap();
    let out = exec_python(&client, &s, "print(open('rehearsal.txt').read())", EXEC_TIMEOUT).await.unwrap();
    assert_eq!(stdout(&out), format!("{token}\n"));
    // The write reaches the shared store (synced after the exec).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store_holds(store.path(), token.as_bytes()) {
        assert!(Instant::now() < deadline, "the workspace never reached the shared store");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let session_ready = started.elapsed();

    // Node A's pod dies: every container of it.
    let killed = Instant::now();
    rehearse(&["kill", NODE_A, "--work", r.work()]).unwrap();
    let deadline = killed + MOVE_BOUND;
    let moved = loop {
        let last = match client.get_session(&s.id).await {
            Ok(m)
                if m.node_id == NODE_B
                    && m.generation > s.generation
                    && m.state == proto::SessionState::Running as i32 =>
            {
                break m
            }
            Ok(m) => format!("{m:?}"),
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "session not RUNNING on {NODE_B} within {MOVE_BOUND:?}: {last}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let move_took = killed.elapsed();
    let out = exec_python(&client, &moved, "print(6*7)", EXEC_TIMEOUT).await.unwrap();
    assert_eq!(stdout(&out), "42\n");
    let back = client.read_file_bytes(&moved, "rehearsal.txt").await.unwrap();
    assert_eq!(back, token.as_bytes(), "the workspace file came back on {NODE_B}");
    let nodes = client.list_nodes().await.unwrap();
    let a = nodes.iter().find(|n| n.id == NODE_A).map(|n| n.state.clone());
    assert_eq!(a.as_deref(), Some("down"));

    eprintln!(
        "TIMINGS: images {images_took:?}; node A registered {a_ready:?} and both {both_ready:?} after start; \
         first session with a synced file {session_ready:?}; moved to {NODE_B} {move_took:?} after the kill \
         (generation {} -> {}); total {:?}",
        s.generation,
        moved.generation,
        started.elapsed()
    );
    println!("deviations:\n{}", rehearse(&["deviations", "--work", r.work()]).unwrap());
}
