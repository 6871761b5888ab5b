//! Tests of the harness itself, against stand-in binaries.
//!
//! A small Python script plays `sandfleet-coordinator` and `sandfleet-agent`:
//! it binds `--listen`, prints the ready line and exits 0 on SIGTERM. That
//! exercises ready-line parsing, address pinning, kill / terminate / restart,
//! start failures and cleanup without the real binaries, root or cgroups.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sandfleet_testkit::{bins, host, ClusterBuilder, ReadyLine, Target};
use tempfile::TempDir;

const FAKE: &str = r#"#!/usr/bin/env python3
import json, os, signal, socket, sys, time
args = sys.argv[1:]
def arg(name):
    return args[args.index(name) + 1] if name in args else None
role = "agent" if os.path.basename(sys.argv[0]) == "sandfleet-agent" else "coordinator"
mode = os.environ.get("FAKE_MODE", "ok")
print("fake %s starting with %s" % (role, " ".join(args)), file=sys.stderr, flush=True)
if mode == "crash":
    print("fake %s: giving up" % role, file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(3600)
host, port = arg("--listen").rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(16)
data = arg("--data-dir")
os.makedirs(data, exist_ok=True)
with open(os.path.join(data, "starts"), "a") as f:
    f.write("start\n")
ready = {"ready": role, "addr": "%s:%d" % s.getsockname()}
if role == "agent":
    ready["node_id"] = arg("--node-id")
else:
    ready["id"] = int(arg("--id"))
print("not json, ignored", flush=True)
print(json.dumps(ready), flush=True)
def term(*_):
    print("fake %s: SIGTERM, bye" % role, file=sys.stderr, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    c, _ = s.accept()
    c.close()
"#;

fn fake_bins() -> TempDir {
    let dir = tempfile::Builder::new().prefix("sandfleet-fake-bins-").tempdir().unwrap();
    for name in ["sandfleet-coordinator", "sandfleet-agent"] {
        let p = dir.path().join(name);
        std::fs::write(&p, FAKE).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn python_available() -> bool {
    let ok = std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED (facility missing): python3 on PATH, needed by the stand-in binaries");
    }
    ok
}

fn starts(data_dir: &Path) -> usize {
    std::fs::read_to_string(data_dir.join("starts")).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn starts_kills_terminates_and_restarts_processes() {
    if !python_available() {
        return;
    }
    let fakes = fake_bins();
    let mut c = ClusterBuilder::new()
        .coordinators(2)
        .agents(2)
        .bin_dir(fakes.path())
        .tmp_in(fakes.path())
        .join_with_add_member(false)
        .wait_for_nodes(false)
        .ready_timeout(Duration::from_secs(20))
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    assert_eq!(c.coordinators.len(), 2);
    assert_eq!(c.agents.len(), 2);
    assert!(c.coordinators[0].args.contains(&"--bootstrap".to_string()), "{:?}", c.coordinators[0].args);
    assert!(!c.coordinators[1].args.contains(&"--bootstrap".to_string()), "{:?}", c.coordinators[1].args);
    assert_eq!(c.endpoint(), format!("{},{}", c.coordinators[0].addr, c.coordinators[1].addr));
    for a in &c.agents {
        let i = a.args.iter().position(|x| x == "--coordinators").expect("agents get --coordinators");
        assert_eq!(a.args[i + 1], c.endpoint());
        assert!(a.args.windows(2).any(|w| w[0] == "--runtime" && w[1] == "process"), "{:?}", a.args);
    }
    assert!(c.agents[1].id.starts_with("n2-"), "{}", c.agents[1].id);
    assert_eq!(
        c.agents[1].ready,
        Some(ReadyLine::Agent {
            node_id: c.agents[1].id.clone(),
            addr: c.agents[1].addr.clone(),
            health: None,
            metrics: None
        })
    );
    assert_eq!(&c.agents[0].id[2..], &c.agents[1].id[2..], "one suffix per cluster");
    let uid_base = |a: &sandfleet_testkit::Proc| {
        let i = a.args.iter().position(|x| x == "--uid-base").expect("agents get a --uid-base");
        a.args[i + 1].parse::<u32>().unwrap()
    };
    assert!(uid_base(&c.agents[1]) >= uid_base(&c.agents[0]) + 1024, "agents get disjoint uid ranges");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o001, 0o001, "the cluster dir is traversable by session uids: {mode:o}");
    }
    for p in c.coordinators.iter().chain(c.agents.iter()) {
        assert!(!p.addr.ends_with(":0"), "{p:?}");
        assert!(p.args.contains(&p.addr), "--listen is pinned to the bound address: {:?}", p.args);
        TcpStream::connect(&p.addr).unwrap_or_else(|e| panic!("{} does not listen on {}: {e}", p.name, p.addr));
        assert!(p.log_tail(20).contains("starting with"), "stderr goes to the log: {}", p.log_tail(20));
        assert!(p.log_tail(20).contains("[stdout] not json, ignored"), "stdout goes to the log: {}", p.log_tail(20));
    }

    // SIGKILL and restart on the same address and data dir.
    let addr = c.agents[0].addr.clone();
    let status = c.kill(Target::Agent(0)).await.unwrap();
    assert!(!status.success());
    assert!(!c.agents[0].is_running());
    c.restart(Target::Agent(0)).await.unwrap();
    assert_eq!(c.agents[0].addr, addr);
    assert_eq!(c.agents[0].starts, 2);
    assert_eq!(starts(&c.agents[0].data_dir), 2, "the same data dir is reused");
    TcpStream::connect(&addr).unwrap();

    // SIGTERM is a clean exit; restart keeps the address.
    let addr = c.coordinators[1].addr.clone();
    let status = c.terminate(Target::Coordinator(1)).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(c.coordinators[1].log_tail(5).contains("SIGTERM, bye"));
    c.restart(Target::Coordinator(1)).await.unwrap();
    assert_eq!(c.coordinators[1].addr, addr);

    // Restarting a running process terminates it first.
    c.restart(Target::Coordinator(0)).await.unwrap();
    assert_eq!(c.coordinators[0].starts, 2);

    // Dropping the cluster stops every process and removes the directory.
    let pids: Vec<i32> =
        c.coordinators.iter().chain(c.agents.iter()).map(|p| p.pid().expect("running") as i32).collect();
    let dir = c.dir().to_path_buf();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| host::process(*p).is_some_and(|p| p.state != 'Z')) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in pids {
        assert!(host::process(pid).is_none_or(|p| p.state == 'Z'), "pid {pid} survived the cluster's drop");
    }
    assert!(!dir.exists(), "the cluster directory is removed");
}

#[tokio::test]
async fn a_process_that_never_gets_ready_fails_the_start_with_its_log() {
    if !python_available() {
        return;
    }
    let fakes = fake_bins();
    let started = Instant::now();
    let err = ClusterBuilder::new()
        .agents(0)
        .bin_dir(fakes.path())
        .tmp_in(fakes.path())
        .env("FAKE_MODE", "hang")
        .ready_timeout(Duration::from_secs(2))
        .start()
        .await
        .expect_err("a hanging process must fail the start");
    let msg = format!("{err:#}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(msg.contains("did not print its ready line within"), "{msg}");
    assert!(msg.contains("fake coordinator starting"), "the error carries the log tail: {msg}");
    assert!(msg.contains("logs kept in"), "{msg}");
}

#[tokio::test]
async fn a_process_that_exits_early_fails_the_start_with_its_status() {
    if !python_available() {
        return;
    }
    let fakes = fake_bins();
    let err = ClusterBuilder::new()
        .agents(0)
        .bin_dir(fakes.path())
        .tmp_in(fakes.path())
        .env("FAKE_MODE", "crash")
        .start()
        .await
        .expect_err("a crashing process must fail the start");
    let msg = format!("{err:#}");
    assert!(msg.contains("without printing a ready line"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("giving up"), "{msg}");
}

#[test]
fn binaries_are_looked_up_next_to_the_test_executable() {
    if std::env::var_os(bins::BIN_DIR_ENV).is_some() {
        return;
    }
    let dir = bins::bin_dir();
    assert_ne!(dir.file_name().and_then(|n| n.to_str()), Some("deps"), "{}", dir.display());
    let exe = std::env::current_exe().unwrap();
    assert!(exe.starts_with(&dir), "{} is not under {}", exe.display(), dir.display());
}

#[test]
fn sandbox_facility_probe_answers() {
    // Whatever the machine, the probe returns without panicking when not required.
    if std::env::var("SANDFLEET_REQUIRE_FACILITIES").is_ok_and(|v| v == "1") {
        assert!(sandfleet_testkit::require_sandbox_facilities());
    } else {
        let missing = sandfleet_testkit::missing_facilities();
        assert_eq!(sandfleet_testkit::require_sandbox_facilities(), missing.is_empty());
    }
}

#[tokio::test]
async fn metrics_listeners_get_an_address_each_that_restarts_keep() {
    if !python_available() {
        return;
    }
    let fakes = fake_bins();
    let start = |metrics: bool| {
        ClusterBuilder::new()
            .coordinators(2)
            .agents(2)
            .bin_dir(fakes.path())
            .tmp_in(fakes.path())
            .join_with_add_member(false)
            .wait_for_nodes(false)
            .metrics_listeners(metrics)
            .ready_timeout(Duration::from_secs(20))
            .start()
    };
    let plain = start(false).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(plain.metrics_addrs().is_empty());
    assert!(plain.coordinators.iter().chain(plain.agents.iter()).all(|p| !p.args.contains(&"--metrics-listen".into())));
    drop(plain);

    let mut c = start(true).await.unwrap_or_else(|e| panic!("{e:#}"));
    let addrs = c.metrics_addrs();
    let targets: Vec<Target> = addrs.iter().map(|(t, _)| *t).collect();
    assert_eq!(targets, [Target::Coordinator(0), Target::Coordinator(1), Target::Agent(0), Target::Agent(1)]);
    let mut distinct: Vec<&String> = addrs.iter().map(|(_, a)| a).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "one metrics address per process: {addrs:?}");
    for (t, addr) in &addrs {
        let p = c.proc(*t);
        let (ip, port) = addr.rsplit_once(':').expect("host:port");
        assert_ne!(port, "0", "fixed before the start, so a scraper can be configured: {addr}");
        assert_eq!(ip, p.addr.rsplit_once(':').unwrap().0, "on the process's own address: {p:?}");
        assert!(p.args.windows(2).any(|w| w[0] == "--metrics-listen" && &w[1] == addr), "{:?}", p.args);
    }
    let before = c.metrics_addr(Target::Agent(1));
    c.kill(Target::Agent(1)).await.unwrap();
    c.restart(Target::Agent(1)).await.unwrap();
    assert_eq!(c.metrics_addr(Target::Agent(1)), before, "a restart keeps the metrics address");
}
