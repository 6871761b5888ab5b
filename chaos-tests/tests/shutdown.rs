//! How a real `sandfleet-agent` stops, and when it refuses to start.
//!
//! - SIGTERM while an exec runs: the exec is killed, its caller gets
//!   UNAVAILABLE "the node agent is shutting down; the command was stopped",
//!   and the agent exits 0 within seconds (not at the exec's own timeout).
//! - A call that a client holds open (an upload that never ends) delays the
//!   stop by at most the agent's server stop bound; a second SIGTERM ends the
//!   process at once with code 130.
//! - A second agent with the node id (or the data dir) of a running one
//!   refuses to start, naming the node id, the lock file and the fix, and
//!   the first agent's sessions keep running.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nix::sys::signal::Signal;
use sandfleet::proto::file_service_client::FileServiceClient;
use sandfleet::{proto, ExecEvent, ExecRequest};
use sandfleet_common::auth::IdentityKind;
use sandfleet_testkit::helpers::{create_running, exec_argv, small_session, stdout};
use sandfleet_testkit::{host, require_sandbox_facilities, Cluster, ClusterBuilder, Target};

/// What the caller of an exec stopped by the agent's shutdown is told.
const SHUTDOWN_MESSAGE: &str = "the node agent is shutting down; the command was stopped";
/// Bound on an agent's exit after SIGTERM with an exec running: the exec's
/// kill grace (5 s) plus slack for a debug build on a busy machine.
const STOP_BOUND: Duration = Duration::from_secs(12);

async fn one_node() -> Cluster {
    match ClusterBuilder::new().coordinators(1).agents(1).start().await {
        Ok(c) => c,
        Err(e) => panic!("cluster did not start: {e:#}"),
    }
}

/// Starts `sleep <secs>.<nonce>` in the session and waits until it printed
/// "started"; returns the stream (at its next event) and the sleep's argument.
async fn start_sleep(client: &sandfleet::Client, s: &proto::Session, secs: u32) -> (sandfleet::ExecStream, String) {
    let arg = format!("{secs}.{}", host::nonce());
    let req = ExecRequest::argv(["bash", "-c", &format!("echo started; exec sleep {arg}")])
        .timeout(Duration::from_secs(3600));
    let mut stream = client.exec(s, req).await.expect("exec started");
    match stream.next().await {
        Some(Ok(ExecEvent::Stdout(d))) => assert_eq!(d, b"started\n"),
        other => panic!("expected the command's first output, got {other:?}"),
    }
    (stream, arg)
}

/// The host process of the `sleep` that [`start_sleep`] started (bash
/// prints "started" just before it execs the sleep).
fn the_sleep(arg: &str) -> host::HostProcess {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut found: Vec<_> = host::processes_matching(arg).into_iter().filter(|p| p.cmdline[0] == "sleep").collect();
        if found.len() == 1 {
            return found.remove(0);
        }
        assert!(Instant::now() < deadline, "not one `sleep {arg}` on the host: {found:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_running_exec_and_the_agent_exits_within_seconds() {
    if !require_sandbox_facilities() {
        return;
    }
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("stop-exec")).await.unwrap();
    let (mut stream, arg) = start_sleep(&client, &s, 600).await;
    the_sleep(&arg);

    let caller = tokio::spawn(async move { stream.next().await });
    let t = Instant::now();
    let status = cluster.terminate_agent(0).await.unwrap();
    let took = t.elapsed();
    assert!(status.success(), "the agent exited with {status} after SIGTERM:\n{}", cluster.logs(40));
    assert!(took < STOP_BOUND, "the agent took {took:?} to stop with an exec running:\n{}", cluster.logs(40));

    match tokio::time::timeout(Duration::from_secs(5), caller).await.expect("the caller got an answer").unwrap() {
        Some(Err(e)) => {
            assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
            assert!(e.to_string().contains(SHUTDOWN_MESSAGE), "{e}");
        }
        other => panic!("expected UNAVAILABLE {SHUTDOWN_MESSAGE:?}, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host::processes_matching(&arg).is_empty() {
        assert!(Instant::now() < deadline, "the exec's sleep outlived the agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await.unwrap();
}

/// Opens an upload to the session's agent that sends one chunk and then
/// never ends, and returns the task waiting for its answer.
async fn hold_an_upload_open(
    cluster: &Cluster,
    s: &proto::Session,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let channel = cluster.channel(&s.node_address, IdentityKind::Agent).expect("a channel to the agent");
    let first = proto::WriteFileRequest {
        session_id: s.id.clone(),
        path: "held-open".into(),
        mode: 0,
        data: b"first chunk".to_vec(),
    };
    let mut req = tonic::Request::new(
        futures::stream::once(async move { first }).chain(futures::stream::pending::<proto::WriteFileRequest>()),
    );
    req.metadata_mut().insert("authorization", format!("Bearer {}", s.token).parse().unwrap());
    let task = tokio::spawn(async move { FileServiceClient::new(channel).write_file(req).await.map(|_| ()) });
    // The agent has the call once the file exists.
    tokio::time::sleep(Duration::from_millis(500)).await;
    task
}

/// Polls until the process of `agent` has exited, for at most `within`.
async fn exited_within(cluster: &mut Cluster, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        let p = cluster.proc_mut(Target::Agent(0));
        if !p.is_running() {
            return p.last_exit();
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_open_delays_the_stop_boundedly_and_a_second_signal_exits_at_once() {
    if !require_sandbox_facilities() {
        return;
    }
    // One SIGTERM: the held-open upload is cut at the server's stop bound (10 s).
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("held-open")).await.unwrap();
    let upload = hold_an_upload_open(&cluster, &s).await;
    let t = Instant::now();
    cluster.proc(Target::Agent(0)).signal(Signal::SIGTERM).unwrap();
    let status = exited_within(&mut cluster, Duration::from_secs(18)).await;
    let took = t.elapsed();
    let status = status.unwrap_or_else(|| panic!("no exit 18 s after SIGTERM:\n{}", cluster.logs(40)));
    assert!(status.success(), "exit {status} after one SIGTERM:\n{}", cluster.logs(40));
    assert!(took >= Duration::from_secs(8), "the upload held open did not delay the stop ({took:?})");
    assert!(upload.await.unwrap().is_err(), "the upload held open cannot have succeeded");
    cluster.shutdown().await.unwrap();

    // Two SIGTERMs: the second one ends the waiting process at once.
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("second-signal")).await.unwrap();
    let _upload = hold_an_upload_open(&cluster, &s).await;
    cluster.proc(Target::Agent(0)).signal(Signal::SIGTERM).unwrap();
    assert!(
        exited_within(&mut cluster, Duration::from_secs(2)).await.is_none(),
        "the agent must still wait for the upload held open"
    );
    let t = Instant::now();
    cluster.proc(Target::Agent(0)).signal(Signal::SIGTERM).unwrap();
    let status = exited_within(&mut cluster, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("no exit within 3 s of the second SIGTERM:\n{}", cluster.logs(40)));
    assert_eq!(status.code(), Some(130), "exit {status} after the second SIGTERM (took {:?})", t.elapsed());
    assert!(cluster.agents[0].log_tail(20).contains("second shutdown signal"), "{}", cluster.logs(20));
    cluster.shutdown().await.unwrap();
}

/// Runs `sandfleet-agent` with `args` until it exits (at most 60 s); returns its status and stderr.
async fn run_agent(args: Vec<String>) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(sandfleet_testkit::bin_path("sandfleet-agent"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting a second sandfleet-agent");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("a refused agent exits at once")
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `args` with the value of `flag` replaced.
fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut args = args.to_vec();
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[i + 1] = value.to_string();
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_node_id_or_data_dir_refuses_to_start() {
    if !require_sandbox_facilities() {
        return;
    }
    let mut cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("lock")).await.unwrap();
    let (running, arg) = start_sleep(&client, &s, 600).await;
    let sleep = the_sleep(&arg);
    let first = cluster.agents[0].args.clone();
    let node_id = cluster.agents[0].id.clone();
    let other_dir = cluster.dir().join("second-agent");

    // Same node id, another data dir and port.
    let args = with_flag(&with_flag(&first, "--data-dir", &other_dir.to_string_lossy()), "--listen", "127.0.0.1:0");
    let (status, stderr) = run_agent(args).await;
    assert!(!status.success(), "a second agent with node id {node_id} started:\n{stderr}");
    for part in [
        format!("node id {node_id:?} is in use by another sandfleet agent"),
        format!("/run/sandfleet/agent-{node_id}.lock"),
        "another --node-id".to_string(),
    ] {
        assert!(stderr.contains(&part), "the refusal does not say {part:?}:\n{stderr}");
    }

    // Another node id on the same data dir.
    let data_dir = cluster.agents[0].data_dir.clone();
    let other = format!("{node_id}-b");
    let mut args = with_flag(&with_flag(&first, "--node-id", &other), "--listen", "127.0.0.1:0");
    if let Some(pki) = cluster.pki() {
        // Its own certificate, so that only the data dir is in the way.
        let cert = pki.issue(IdentityKind::Agent, &other, &["127.0.0.1".into()]).unwrap();
        args = with_flag(
            &with_flag(&args, "--tls-cert", &cert.cert.to_string_lossy()),
            "--tls-key",
            &cert.key.to_string_lossy(),
        );
    }
    let (status, stderr) = run_agent(args).await;
    assert!(!status.success(), "a second agent on data dir {} started:\n{stderr}", data_dir.display());
    assert!(stderr.contains(&format!("data dir {} is in use", data_dir.display())), "{stderr}");

    // The first agent's session lives on: its running exec and a new one.
    assert!(host::is_alive(sleep.pid, sleep.start_time), "the first agent's running exec was killed");
    let out = exec_argv(&client, &s, ["echo", "still here"], Duration::from_secs(30)).await.unwrap();
    assert_eq!(stdout(&out), "still here\n");
    assert!(cluster.proc_mut(Target::Agent(0)).is_running());
    drop(running);
    cluster.shutdown().await.unwrap();
}
