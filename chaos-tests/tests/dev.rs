//! `sandfleet dev`: the one-process cluster of the Quickstart, started as the
//! real binary, with each runtime: it prints its endpoint, runs code in a
//! sandbox (in a hardened container with `--runtime docker`) and stops cleanly
//! on SIGTERM, within seconds even while an exec runs; a second `dev` with the
//! node id of a running one refuses to start.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sandfleet::{ExecEvent, ExecRequest};
use sandfleet_testkit::helpers::{create_running, exec_argv, stdout};
use sandfleet_testkit::{bin_path, host, require_docker, require_sandbox_facilities, DEV_READY_PREFIX};

const EXEC: Duration = Duration::from_secs(60);

/// A running `sandfleet dev`, killed if the test panics.
struct Dev {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `sandfleet dev` on free ports and waits for its ready line. Its
    /// node id is unique unless `extra` names one: tests run at once, and one
    /// node id per host is all an agent allows.
    fn start(extra: &[&str]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dev.log");
        let mut cmd = Command::new(bin_path("sandfleet"));
        cmd.args(["dev", "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra);
        if !extra.contains(&"--node-id") {
            cmd.args(["--node-id", &format!("dev-{}", host::nonce())]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting sandfleet dev");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let endpoint = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    if let Some(e) = line.strip_prefix(DEV_READY_PREFIX) {
                        break e.trim_start_matches("http://").to_string();
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    panic!(
                        "sandfleet dev exited ({status}) before it was ready:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sandfleet dev not ready within 120 s:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        Dev { child: Some(child), endpoint, log, _dir: dir }
    }

    async fn client(&self) -> sandfleet::Client {
        sandfleet::Client::connect(vec![self.endpoint.clone()]).await.expect("connecting to sandfleet dev")
    }

    /// SIGTERM, then the exit status (killed after 30 s).
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sandfleet dev did not stop within 30 s of SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("--- sandfleet dev log ---\n{}", self.logs());
        }
        // Sessions outlive `sandfleet dev` (their filesystems stay mounted for the
        // next start); this test's data dir goes, so they go too.
        sandfleet_common::mounts::unmount_all_under(self._dir.path());
    }
}

/// Containers the docker runtime made for a session.
fn containers_of(session: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter", &format!("label=sandfleet.session={session}")])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_code_in_a_process_sandbox_and_stops_on_sigterm() {
    if !require_sandbox_facilities() {
        return;
    }
    let mut dev = Dev::start(&[]);
    let client = dev.client().await;
    let s = create_running(&client, sandfleet::CreateSession::new().template("python")).await.unwrap();
    let out = exec_argv(&client, &s, ["python3", "-c", "print(6*7)"], EXEC).await.unwrap();
    assert_eq!(stdout(&out), "42\n", "{out:?}");
    if docker_answers() {
        assert!(containers_of(&s.id).is_empty(), "the process runtime made a container");
    }
    let status = dev.stop();
    assert!(status.success(), "sandfleet dev exited with {status} after SIGTERM:\n{}", dev.logs());
}

/// `docker` answers (no banner: only used for an extra check).
fn docker_answers() -> bool {
    Command::new("docker")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_the_docker_runtime_runs_code_in_a_container() {
    if !require_sandbox_facilities() || !require_docker() {
        return;
    }
    // The image `sandfleet dev --runtime docker` uses (sandfleet/sandbox:latest), with this
    // build's executor; cached by content hash, so usually instant.
    sandfleet_testkit::facilities::sandbox_image();

    let mut dev = Dev::start(&["--runtime", "docker"]);
    let client = dev.client().await;
    let s = create_running(&client, sandfleet::CreateSession::new().template("python")).await.unwrap();
    let names = containers_of(&s.id);
    assert_eq!(names.len(), 1, "one container for session {}: {names:?}\n{}", s.id, dev.logs());
    let out = exec_argv(&client, &s, ["python3", "-c", "print(6*7)"], EXEC).await.unwrap();
    assert_eq!(stdout(&out), "42\n", "{out:?}");
    client.delete_session(&s.id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !containers_of(&s.id).is_empty() {
        assert!(Instant::now() < deadline, "the container of a deleted session is still there:\n{}", dev.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = dev.stop();
    assert!(status.success(), "sandfleet dev exited with {status} after SIGTERM:\n{}", dev.logs());
}

/// A default session reserves a CPU request (100m), not its 1-core limit, and
/// `dev` offers four times the cores: a 2-core machine runs dozens at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_dozens_of_default_sessions_on_a_small_machine() {
    if !require_sandbox_facilities() {
        return;
    }
    const SESSIONS: usize = 30;
    let node_id = format!("dev-dozens-{}", host::nonce());
    let mut dev = Dev::start(&["--node-id", &node_id]);
    let client = dev.client().await;
    let node = client.list_nodes().await.unwrap().into_iter().find(|n| n.id == node_id).expect("the dev node");
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    assert_eq!(node.capacity.unwrap().cpu_millis, cores * 1000 * 4, "dev offers 4x its cores");

    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let s = client.create_session(sandfleet::CreateSession::new().ttl(Duration::from_secs(600))).await.unwrap();
        let spec = s.spec.clone().unwrap();
        assert_eq!((spec.cpu_millis, spec.cpu_request_millis), (1000, 100), "the defaults in force");
        ids.push(s.id);
    }
    let mut running = Vec::new();
    for id in &ids {
        match client.wait_running(id, Duration::from_secs(120)).await {
            Ok(s) => running.push(s),
            Err(e) => panic!("session {id} of {SESSIONS} did not run: {e}\n{}", dev.logs()),
        }
    }
    for s in [&running[0], &running[SESSIONS / 2], &running[SESSIONS - 1]] {
        let out = exec_argv(&client, s, ["python3", "-c", "print(6*7)"], EXEC).await.unwrap();
        assert_eq!(stdout(&out), "42\n", "{out:?}");
    }
    for id in &ids {
        client.delete_session(id).await.unwrap();
    }
    let status = dev.stop();
    assert!(status.success(), "sandfleet dev exited with {status} after SIGTERM:\n{}", dev.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_stops_within_seconds_of_sigterm_while_an_exec_runs() {
    if !require_sandbox_facilities() {
        return;
    }
    let mut dev = Dev::start(&[]);
    let client = dev.client().await;
    let s = create_running(&client, sandfleet::CreateSession::new()).await.unwrap();
    let arg = format!("600.{}", host::nonce());
    let req = ExecRequest::argv(["bash", "-c", &format!("echo started; exec sleep {arg}")])
        .timeout(Duration::from_secs(3600));
    let mut stream = client.exec(&s, req).await.unwrap();
    match stream.next().await {
        Some(Ok(ExecEvent::Stdout(d))) => assert_eq!(d, b"started\n"),
        other => panic!("expected the command's first output, got {other:?}"),
    }
    let caller = tokio::spawn(async move { stream.next().await });
    let t = Instant::now();
    let status = tokio::task::block_in_place(|| dev.stop());
    let took = t.elapsed();
    assert!(status.success(), "sandfleet dev exited with {status} after SIGTERM:\n{}", dev.logs());
    assert!(took < Duration::from_secs(15), "sandfleet dev took {took:?} to stop:\n{}", dev.logs());
    match tokio::time::timeout(Duration::from_secs(5), caller).await.expect("the caller got an answer").unwrap() {
        Some(Err(e)) => {
            assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
            assert!(e.to_string().contains("the node agent is shutting down; the command was stopped"), "{e}");
        }
        other => panic!("expected UNAVAILABLE from the stopped exec, got {other:?}"),
    }
    assert!(host::processes_matching(&arg).is_empty(), "the exec's sleep outlived sandfleet dev");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dev_with_the_same_node_id_refuses_to_start() {
    if !require_sandbox_facilities() {
        return;
    }
    let node = format!("dev-lock-{}", host::nonce());
    let mut dev = Dev::start(&["--node-id", &node]);
    let client = dev.client().await;
    let s = create_running(&client, sandfleet::CreateSession::new()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let second = Command::new(bin_path("sandfleet"))
        .args(["dev", "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0", "--node-id", &node, "--data-dir"])
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a second sandfleet dev");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(second.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(60)).expect("the second sandfleet dev exits at once").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second sandfleet dev with node id {node} started:\n{stderr}");
    for part in [format!("node id {node:?} is in use by another sandfleet agent"), "another --node-id".to_string()] {
        assert!(stderr.contains(&part), "the refusal does not say {part:?}:\n{stderr}");
    }

    let out = exec_argv(&client, &s, ["echo", "still here"], EXEC).await.unwrap();
    assert_eq!(stdout(&out), "still here\n", "the first dev's session was harmed");
    let status = dev.stop();
    assert!(status.success(), "sandfleet dev exited with {status} after SIGTERM:\n{}", dev.logs());
}
