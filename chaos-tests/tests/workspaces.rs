//! Durable workspaces against a real S3-compatible server (s3s-fs in its own
//! process, started by the test): a session's files survive the SIGKILL of its
//! agent, a 100 MiB workspace round-trips exactly, sessions never see each
//! other's files, symlinks that point outside are stored as links and never
//! followed, an S3 outage is reported and retried without losing anything,
//! and deleting a session removes its prefix (unless retention is on). The
//! same holds on the docker runtime, whose old copy's commands die with its
//! agent, and on the CRI runtime (against a containerd the test starts).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandfleet::{proto, Client};
use sandfleet_testkit::helpers::{
    create_running, eventually, exec_argv, exec_python, expect_code, small_session, state_of, stdout,
};
use sandfleet_testkit::s3::S3Server;
use sandfleet_testkit::{require_sandbox_facilities, Cluster, ClusterBuilder, NetworkChoice, Target};

use common::agent_index;

macro_rules! require_facilities {
    () => {
        if !require_sandbox_facilities() {
            return;
        }
    };
}

const PREFIX: &str = "ws-test";
const EXEC: Duration = Duration::from_secs(60);

struct Setup {
    s3: S3Server,
    cluster: Cluster,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn setup(agents: usize, extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path()).await.expect("S3 server starts");
    let mut b = ClusterBuilder::new()
        .coordinators(1)
        .agents(agents)
        .network(NetworkChoice::Loopback)
        .coordinator_args(["--agent-heartbeat", "500ms", "--node-ttl", "3s"])
        .agent_args(s3.agent_args(PREFIX))
        .agent_args(["--sync-interval", "1s"])
        .agent_args(extra.iter().copied());
    for (k, v) in S3Server::env() {
        b = b.env(k, v);
    }
    let cluster = match b.start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    };
    let client = cluster.client().await;
    Setup { s3, cluster, client, _dir: dir }
}

fn session_dir(s3: &S3Server, id: &str) -> PathBuf {
    s3.bucket_dir().join(PREFIX).join(id)
}

fn stored_manifest(s3: &S3Server, id: &str) -> Option<serde_json::Value> {
    let raw = std::fs::read(session_dir(s3, id).join("manifest.json")).ok()?;
    serde_json::from_slice(&raw).ok()
}

fn manifest_paths(m: &serde_json::Value) -> Vec<(String, String)> {
    m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_string(), e["kind"].as_str().unwrap().to_string()))
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn wait_moved(client: &Client, s: &proto::Session, deadline: Duration) -> proto::Session {
    let until = Instant::now() + deadline;
    loop {
        let now = client.get_session(&s.id).await.unwrap();
        if state_of(&now) == proto::SessionState::Running && now.node_id != s.node_id && now.generation > s.generation {
            return now;
        }
        assert!(Instant::now() < until, "session not running elsewhere within {deadline:?}: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_agent_session_resumes_elsewhere_with_every_file() {
    require_facilities!();
    let mut t = setup(2, &[]).await;
    let s = create_running(&t.client, small_session("ws-kill")).await.unwrap();
    // Files through the API, nested, and an exec that writes more (and a link out of the workspace).
    t.client.write_file_bytes(&s, "notes/todo.txt", b"buy milk\n".to_vec()).await.unwrap();
    t.client.write_file_bytes(&s, "data.bin", (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect()).await.unwrap();
    let out = exec_python(
        &t.client,
        &s,
        "import os\nos.makedirs('out/deep', exist_ok=True)\nopen('out/deep/result.txt','w').write('42\\n')\nos.makedirs('empty', exist_ok=True)\nos.symlink('/etc/passwd', 'escape')\nos.symlink('notes/todo.txt', 'todo-link')\nprint('ok')",
        EXEC,
    )
    .await
    .unwrap();
    assert_eq!(stdout(&out).trim(), "ok", "{out:?}");
    // The agent holds S3 credentials; nothing in the sandbox can read them.
    let out = exec_argv(&t.client, &s, ["sh", "-c", "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"], EXEC)
        .await
        .unwrap();
    let seen = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        !seen.contains(sandfleet_testkit::s3::SECRET_KEY) && !seen.contains("AWS_"),
        "credentials visible in the sandbox: {seen}"
    );
    let synced = t.client.sync_workspace(&s).await.unwrap();
    assert_eq!(synced.files, 3, "{synced:?}");
    assert!(synced.store.starts_with("s3://"), "{synced:?}");

    // What the store holds: links as links, never the host file behind one.
    let m = stored_manifest(&t.s3, &s.id).expect("a manifest in the bucket");
    let entries = manifest_paths(&m);
    assert!(entries.contains(&("escape".into(), "symlink".into())), "{entries:?}");
    assert!(entries.contains(&("empty".into(), "dir".into())), "{entries:?}");
    let passwd = std::fs::read("/etc/passwd").unwrap();
    for f in files_under(&session_dir(&t.s3, &s.id)) {
        assert_ne!(std::fs::read(&f).unwrap(), passwd, "{} holds the host's /etc/passwd", f.display());
    }

    let old = agent_index(&t.cluster, &s.node_id);
    t.cluster.kill_agent(old).await.unwrap();
    let moved = wait_moved(&t.client, &s, Duration::from_secs(20)).await;
    assert_eq!(t.client.read_file_bytes(&moved, "notes/todo.txt").await.unwrap(), b"buy milk\n");
    assert_eq!(
        t.client.read_file_bytes(&moved, "data.bin").await.unwrap(),
        (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()
    );
    let out = exec_argv(
        &t.client,
        &moved,
        ["sh", "-c", "cat out/deep/result.txt; readlink escape todo-link; test -d empty && echo dir"],
        EXEC,
    )
    .await
    .unwrap();
    assert_eq!(stdout(&out), "42\n/etc/passwd\nnotes/todo.txt\ndir\n", "{out:?}");
    // The restored copy keeps syncing under the new generation.
    t.client.write_file_bytes(&moved, "after.txt", b"new node".to_vec()).await.unwrap();
    let again = t.client.sync_workspace(&moved).await.unwrap();
    assert_eq!((again.files, again.uploaded_files), (4, 1), "{again:?}");
    let m = stored_manifest(&t.s3, &s.id).unwrap();
    assert_eq!(m["generation"].as_u64(), Some(moved.generation));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_workspace_round_trips_and_sessions_are_isolated() {
    require_facilities!();
    let mut t = setup(2, &[]).await;
    let a = create_running(&t.client, small_session("ws-big").memory_bytes(512 << 20)).await.unwrap();
    let b = create_running(&t.client, small_session("ws-other")).await.unwrap();
    // 100 MiB of pseudo-random bytes, written by the sandbox.
    let code = "import hashlib,random\nr=random.Random(7)\nh=hashlib.sha256()\nwith open('big.bin','wb') as f:\n  for _ in range(100):\n    b=r.randbytes(1<<20); h.update(b); f.write(b)\nprint(h.hexdigest())";
    let out = exec_python(&t.client, &a, code, Duration::from_secs(120)).await.unwrap();
    let want = stdout(&out).trim().to_string();
    assert_eq!(want.len(), 64, "{out:?}");
    t.client.write_file_bytes(&b, "mine.txt", b"b's file".to_vec()).await.unwrap();
    let synced = t.client.sync_workspace(&a).await.unwrap();
    assert_eq!((synced.files, synced.bytes), (1, 100 << 20), "{synced:?}");
    t.client.sync_workspace(&b).await.unwrap();

    // Isolation: each session's prefix names only its own files, and neither sees the other's.
    let ma = manifest_paths(&stored_manifest(&t.s3, &a.id).unwrap());
    let mb = manifest_paths(&stored_manifest(&t.s3, &b.id).unwrap());
    assert_eq!(ma, vec![("big.bin".to_string(), "file".to_string())]);
    assert_eq!(mb, vec![("mine.txt".to_string(), "file".to_string())]);
    expect_code("read another session's file", t.client.read_file_bytes(&a, "mine.txt").await, tonic::Code::NotFound);
    let out = exec_argv(&t.client, &b, ["sh", "-c", "ls -a; ls /workspace/.. 2>&1 | head -5"], EXEC).await.unwrap();
    assert!(!stdout(&out).contains("big.bin"), "{out:?}");

    // Round trip: the node goes, the 100 MiB file comes back bit for bit.
    let old = agent_index(&t.cluster, &a.node_id);
    t.cluster.kill_agent(old).await.unwrap();
    let moved = wait_moved(&t.client, &a, Duration::from_secs(60)).await;
    let out = exec_python(
        &t.client,
        &moved,
        "import hashlib\nprint(hashlib.sha256(open('big.bin','rb').read()).hexdigest())",
        EXEC,
    )
    .await
    .unwrap();
    assert_eq!(stdout(&out).trim(), want);
    let _ = &mut t.cluster;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_outage_is_reported_and_retried_then_delete_removes_the_prefix() {
    require_facilities!();
    let mut t = setup(1, &[]).await;
    let s = create_running(&t.client, small_session("ws-outage")).await.unwrap();
    t.client.write_file_bytes(&s, "before.txt", b"1".to_vec()).await.unwrap();
    t.client.sync_workspace(&s).await.unwrap();

    t.s3.kill().await.unwrap();
    t.client.write_file_bytes(&s, "during.txt", b"written while S3 was down".to_vec()).await.unwrap();
    let out = exec_argv(&t.client, &s, ["sh", "-c", "echo from-exec > during-exec.txt"], EXEC).await.unwrap();
    assert!(out.success(), "{out:?}");
    let err = expect_code("sync while S3 is down", t.client.sync_workspace(&s).await, tonic::Code::Unavailable);
    assert!(err.to_string().contains("workspace store unavailable"), "{err}");

    // Back up: the agent's own retries (no client call) bring the store up to date.
    t.s3.restart().await.unwrap();
    let paths = eventually("background sync after S3 is back", Duration::from_secs(60), || async {
        let m = stored_manifest(&t.s3, &s.id).ok_or_else(|| anyhow::anyhow!("no manifest"))?;
        let p = manifest_paths(&m);
        anyhow::ensure!(p.iter().any(|(p, _)| p == "during-exec.txt"), "not yet: {p:?}");
        Ok(p)
    })
    .await
    .unwrap();
    assert!(paths.iter().any(|(p, _)| p == "during.txt"), "{paths:?}");

    // Presigned download straight from the store, without credentials.
    let url = t.client.download_url(&s, "during.txt", Duration::from_secs(60)).await.unwrap();
    assert!(url.url.starts_with(&t.s3.endpoint()) || url.url.contains(&format!(":{}/", t.s3.port())), "{url:?}");
    let body = http_get(&url.url).await;
    assert_eq!(body, b"written while S3 was down");
    expect_code(
        "url of a missing file",
        t.client.download_url(&s, "nope.txt", Duration::ZERO).await,
        tonic::Code::NotFound,
    );
    expect_code(
        "url out of the workspace",
        t.client.download_url(&s, "../x", Duration::ZERO).await,
        tonic::Code::InvalidArgument,
    );

    // Deleting the session removes its prefix, and the test server leaves no empty directory behind
    // (so its prefix lists stay proportional to what is live).
    assert!(session_dir(&t.s3, &s.id).exists());
    t.client.delete_session(&s.id).await.unwrap();
    eventually("prefix removed after delete", Duration::from_secs(30), || async {
        let left = files_under(&session_dir(&t.s3, &s.id));
        anyhow::ensure!(left.is_empty(), "still there: {left:?}");
        anyhow::ensure!(!session_dir(&t.s3, &s.id).exists(), "empty directories left: {:?}", session_dir(&t.s3, &s.id));
        Ok(())
    })
    .await
    .unwrap();
    let _ = &mut t.cluster;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_hands_the_workspace_over_without_an_explicit_sync() {
    require_facilities!();
    // A long sync interval: the last write reaches the store only through the sync its exec
    // triggers, racing the drain, or the old copy's final, sealed sync, which the new copy waits for.
    let t = setup(2, &["--sync-interval", "1h"]).await;
    let s = create_running(&t.client, small_session("ws-drain")).await.unwrap();
    t.client.write_file_bytes(&s, "early.txt", b"early".to_vec()).await.unwrap();
    t.client.sync_workspace(&s).await.unwrap();
    // Written after the last sync, then the node is drained at once.
    let out = exec_argv(&t.client, &s, ["sh", "-c", "seq 1 5000 > late.txt"], EXEC).await.unwrap();
    assert!(out.success(), "{out:?}");
    t.client.drain_node(&s.node_id, Duration::from_secs(60), 1).await.unwrap();
    let moved = wait_moved(&t.client, &s, Duration::from_secs(40)).await;
    assert_eq!(t.client.read_file_bytes(&moved, "early.txt").await.unwrap(), b"early");
    let late = t.client.read_file_bytes(&moved, "late.txt").await.unwrap();
    let want: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(late).unwrap(), want);
    let m = stored_manifest(&t.s3, &s.id).unwrap();
    assert_eq!(m["generation"].as_u64(), Some(moved.generation), "the new copy claimed the workspace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_keeps_a_deleted_sessions_workspace() {
    require_facilities!();
    let t = setup(1, &["--retain-workspaces"]).await;
    let s = create_running(&t.client, small_session("ws-retain")).await.unwrap();
    t.client.write_file_bytes(&s, "keep.txt", b"kept".to_vec()).await.unwrap();
    t.client.sync_workspace(&s).await.unwrap();
    t.client.delete_session(&s.id).await.unwrap();
    // The agent stops the session and, asked whether it ended for good, keeps the objects.
    eventually("agent kept the workspace", Duration::from_secs(20), || async {
        let log = t.cluster.proc(Target::Agent(0)).log_tail(400);
        anyhow::ensure!(log.contains("keeping its workspace in the store"), "not yet");
        Ok(())
    })
    .await
    .unwrap();
    let m = stored_manifest(&t.s3, &s.id).expect("retained manifest");
    assert!(manifest_paths(&m).contains(&("keep.txt".into(), "file".into())));
}

/// GET with a plain HTTP/1.1 client (the presigned URL needs no credentials).
async fn http_get(url: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut sock = tokio::net::TcpStream::connect(host).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + n]);
            rest = &rest[line_end + 2 + n + 2..];
        }
        return out;
    }
    body
}

/// Processes in a container, as `docker top` shows them (command names).
fn container_commands(name: &str) -> Vec<String> {
    // docker top needs a PID column.
    let out = std::process::Command::new("docker").args(["top", name, "-eo", "pid,comm"]).output().unwrap();
    assert!(out.status.success(), "docker top {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
        .collect()
}

fn containers(filters: &[String]) -> Vec<String> {
    let mut args = vec!["ps".to_string(), "-a".into(), "--format".into(), "{{.Names}}".into()];
    for f in filters {
        args.extend(["--filter".to_string(), f.clone()]);
    }
    let out = std::process::Command::new("docker").args(&args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_runtime_session_resumes_elsewhere_with_its_files_and_its_old_commands_die() {
    require_facilities!();
    if !sandfleet_testkit::require_docker() {
        return;
    }
    let image = sandfleet_testkit::facilities::sandbox_image();
    let mut t = setup(2, &["--runtime", "docker", "--template-image", &format!("default={image}")]).await;
    let s = create_running(&t.client, small_session("ws-docker")).await.unwrap();
    // The killed agent never comes back to remove its container: remove every container of
    // this session when the test ends, whatever happens.
    struct RemoveContainers(String);
    impl Drop for RemoveContainers {
        fn drop(&mut self) {
            for name in containers(&[format!("label=sandfleet.session={}", self.0)]) {
                let _ = std::process::Command::new("docker").args(["rm", "-f", &name]).output();
            }
        }
    }
    let _cleanup = RemoveContainers(s.id.clone());
    t.client.write_file_bytes(&s, "api.txt", b"through the API\n".to_vec()).await.unwrap();
    let out = exec_argv(
        &t.client,
        &s,
        ["sh", "-c", "mkdir -p out && echo from-the-container > out/exec.txt && ln -s /etc/shadow leak"],
        EXEC,
    )
    .await
    .unwrap();
    assert!(out.success(), "{out:?}");
    t.client.sync_workspace(&s).await.unwrap();

    // A command still running when its agent dies: the executor sees the agent's
    // connection close and kills it, so the old container runs nothing once the
    // session is placed elsewhere.
    let long = {
        let (client, s) = (t.client.clone(), s.clone());
        tokio::spawn(async move {
            exec_argv(&client, &s, ["sh", "-c", "while :; do sleep 0.2; done"], Duration::from_secs(120)).await
        })
    };
    let old_container =
        containers(&[format!("label=sandfleet.session={}", s.id), format!("label=sandfleet.node={}", s.node_id)]);
    assert_eq!(old_container.len(), 1, "{old_container:?}");
    eventually("the long command runs", Duration::from_secs(20), || async {
        let cmds = container_commands(&old_container[0]);
        anyhow::ensure!(cmds.iter().any(|c| c == "sleep"), "{cmds:?}");
        Ok(())
    })
    .await
    .unwrap();

    let old = agent_index(&t.cluster, &s.node_id);
    t.cluster.kill_agent(old).await.unwrap();
    eventually("the old copy's command is killed with its agent", Duration::from_secs(5), || async {
        let cmds = container_commands(&old_container[0]);
        anyhow::ensure!(!cmds.iter().any(|c| c == "sleep" || c == "sh" || c == "bwrap"), "{cmds:?}");
        Ok(())
    })
    .await
    .unwrap();
    let moved = wait_moved(&t.client, &s, Duration::from_secs(30)).await;
    assert_eq!(t.client.read_file_bytes(&moved, "api.txt").await.unwrap(), b"through the API\n");
    let out = exec_argv(&t.client, &moved, ["sh", "-c", "cat out/exec.txt; readlink leak; id -u"], EXEC).await.unwrap();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(&lines[..2], ["from-the-container", "/etc/shadow"], "{out:?}");
    assert_ne!(lines[2], "0", "runs as a non-root user: {out:?}");
    // It runs in a container of the other node.
    let new_container =
        containers(&[format!("label=sandfleet.session={}", s.id), format!("label=sandfleet.node={}", moved.node_id)]);
    assert_eq!(new_container.len(), 1, "{new_container:?}");
    let _ = long.await;
}

/// The CRI runtime end to end, with the real binaries and a real containerd:
/// two agents with `--runtime cri` on one containerd; a session's pod
/// sandbox runs code, keeps its files through the API and an exec, and when
/// its agent is SIGKILLed the session comes back RUNNING in a pod sandbox of
/// the other node with its files; deleting it removes that sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cri_runtime_session_resumes_elsewhere_with_its_files() {
    require_facilities!();
    if !sandfleet_testkit::require_docker() {
        return;
    }
    let missing = sandfleet_testkit::containerd::missing();
    if !missing.is_empty() {
        assert!(
            std::env::var(sandfleet_testkit::facilities::REQUIRE_ENV).as_deref() != Ok("1"),
            "the CRI runtime's end-to-end test needs {}",
            missing.join(", ")
        );
        eprintln!("SKIPPED (facility missing): {}", missing.join(", "));
        return;
    }
    let image = sandfleet_testkit::facilities::sandbox_image();
    let img = image.clone();
    let containerd = tokio::task::spawn_blocking(move || {
        sandfleet_testkit::containerd::Containerd::start(&[img.as_str(), "sandfleet/sandbox:latest"])
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("starting the test containerd: {e}"));
    let endpoint = containerd.endpoint();
    let mut t = setup(
        2,
        &[
            "--runtime",
            "cri",
            "--cri-endpoint",
            &endpoint,
            "--cri-cgroup-parent",
            "/sandfleet-e2e-cri",
            "--template-image",
            &format!("default={image}"),
        ],
    )
    .await;
    let s = create_running(&t.client, small_session("ws-cri").runtime("cri")).await.unwrap();
    // Each agent advertises the images of its CRI runtime's store (what a template's image is placed by).
    let advertised = sandfleet_common::spec::normalize_image("image", &image).unwrap();
    for node in t.client.list_nodes().await.unwrap() {
        assert!(node.images.contains(&advertised), "node {} advertises {:?}", node.id, node.images);
    }
    let out = exec_argv(&t.client, &s, ["python3", "-c", "print(6*7)"], EXEC).await.unwrap();
    assert_eq!(stdout(&out), "42\n", "{out:?}");
    t.client.write_file_bytes(&s, "api.txt", b"through the API\n".to_vec()).await.unwrap();
    let out = exec_argv(&t.client, &s, ["sh", "-c", "echo from-the-pod > exec.txt"], EXEC).await.unwrap();
    assert!(out.success(), "{out:?}");
    t.client.sync_workspace(&s).await.unwrap();
    // The session's pod sandbox, as the CRI lists it.
    let cri = sandfleet_testkit::containerd::cri_client(&endpoint).await.unwrap();
    let pods_of = |node: String| {
        let mut cri = cri.clone();
        let id = s.id.clone();
        async move {
            let filter = k8s_cri::v1::PodSandboxFilter {
                label_selector: [("sandfleet.session".to_string(), id), ("sandfleet.node".to_string(), node)].into(),
                state: Some(k8s_cri::v1::PodSandboxStateValue {
                    state: k8s_cri::v1::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            };
            cri.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: Some(filter) })
                .await
                .unwrap()
                .into_inner()
                .items
        }
    };
    assert_eq!(pods_of(s.node_id.clone()).await.len(), 1, "one ready pod sandbox of the session on its node");

    let old = agent_index(&t.cluster, &s.node_id);
    t.cluster.kill_agent(old).await.unwrap();
    let moved = wait_moved(&t.client, &s, Duration::from_secs(30)).await;
    assert_eq!(t.client.read_file_bytes(&moved, "api.txt").await.unwrap(), b"through the API\n");
    let out = exec_argv(&t.client, &moved, ["sh", "-c", "cat exec.txt; id -u"], EXEC).await.unwrap();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"from-the-pod"), "{out:?}");
    assert_ne!(lines.get(1), Some(&"0"), "runs as a non-root user: {out:?}");
    assert_eq!(pods_of(moved.node_id.clone()).await.len(), 1, "the session runs in a pod sandbox of the new node");
    t.client.delete_session(&moved.id).await.unwrap();
    eventually("the new node removes the session's pod sandbox", Duration::from_secs(20), || async {
        let n = pods_of(moved.node_id.clone()).await.len();
        anyhow::ensure!(n == 0, "{n} pod sandboxes left");
        Ok(())
    })
    .await
    .unwrap();
    drop(t);
    // The killed agent's pod sandbox (its old copy) goes with the test containerd.
    drop(containerd);
    for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let dir = root.path().join("sandfleet-e2e-cri");
        for pod in std::fs::read_dir(&dir).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
            for c in std::fs::read_dir(pod.path()).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(c.path());
            }
            let _ = std::fs::remove_dir(pod.path());
        }
        let _ = std::fs::remove_dir(dir);
    }
}
