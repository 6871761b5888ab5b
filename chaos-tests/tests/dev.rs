//! `sandfleet dev`: the one-process cluster of the Quickstart, started as the
//! real binary, with each runtime: it prints its endpoint, runs code in a
//! sandbox (in a hardened container with `--runtime docker`) and stops cleanly
//! on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandfleet_testkit::helpers::{create_running, exec_argv, stdout};
use sandfleet_testkit::{bin_path, require_docker, require_sandbox_facilities, DEV_READY_PREFIX};

const EXEC: Duration = Duration::from_secs(60);

/// A running `sandfleet dev`, killed if the test panics.
struct Dev {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `sandfleet dev` on free ports and waits for its ready line.
    fn start(extra: &[&str]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dev.log");
        let mut child = Command::new(bin_path("sandfleet"))
            .args(["dev", "--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
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
    let node_id = format!("dev-dozens-{}", sandfleet_testkit::host::nonce());
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
