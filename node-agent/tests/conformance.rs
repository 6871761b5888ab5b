//! One conformance suite, run against every runtime: the process runtime
//! (bubblewrap + cgroups on the host), the docker runtime (a hardened
//! container per session, bubblewrap inside it) and the CRI runtime (a pod
//! sandbox and a hardened container per session through a real containerd,
//! bubblewrap inside it). Each case is written once and instantiated in
//! `mod process`, `mod docker` and `mod cri`.
//!
//! Cases: exit codes, timeout, OOM, fork bomb, no network, no host files, a
//! file round trip, path traversal and symlink escape (plus seccomp and the
//! output cap), and what the sandboxes use (`Runtime::usage`). On the process runtime they also check that no process and no
//! exec cgroup of the session is left behind. The process-only tests after
//! them check sessions' uids against each other, idempotent prepare and
//! destroy, and a restart over a crashed agent's leftovers. The container
//! tests at the end check every hardening field with `docker inspect` and
//! the CRI's container status, that bwrap runs inside the hardened
//! container, the warm pool, and (on both container runtimes) that
//! restarting the agent leaves no orphaned container.
//!
//! Facilities: the process runtime needs root, /usr/bin/bwrap and writable
//! cgroups; the docker runtime needs a Docker engine and the sandbox image,
//! which the tests build with deploy/images/build-sandbox-image (cached by
//! content hash); the CRI runtime needs that image too, and containerd, runc,
//! the CNI plugins and gcc: each test starts its own containerd
//! ([`sandfleet_testkit::containerd`]). When one is missing a test prints `SKIPPED` and passes,
//! unless SANDFLEET_REQUIRE_FACILITIES=1 (CI), which makes it fail.
//!
//! The tests of this file run one at a time, across processes too (nextest
//! runs each test in its own process): a file lock serializes them, since
//! OOM, fork-bomb and timeout cases are timing-sensitive on two cores.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sandfleet_agent::runtime::cri::{CriConfig, CriRuntime};
use sandfleet_agent::runtime::disk::DiskQuota;
use sandfleet_agent::runtime::docker::{DockerRuntime, DockerRuntimeConfig};
use sandfleet_agent::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use sandfleet_agent::runtime::{Command, ExecEvent, ExecSpec, ExitInfo, Language, Runtime, RuntimeError, SandboxSpec};
use sandfleet_agent::workspace::FsError;
use sandfleet_common::ids::new_session_id;
use sandfleet_common::spec::Template;
use tokio::sync::mpsc;

const REQUIRE_ENV: &str = "SANDFLEET_REQUIRE_FACILITIES";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Process,
    Docker,
    Cri,
}

/// Skips (prints a banner, returns None) or, under SANDFLEET_REQUIRE_FACILITIES=1, fails.
fn missing(what: &str) -> Option<Env> {
    let line = "=".repeat(78);
    let banner =
        format!("\n{line}\nSKIPPED (facility missing): {what}\nSet {REQUIRE_ENV}=1 to make this a failure.\n{line}\n");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{banner}");
    }
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(banner.as_bytes());
    None
}

/// An exclusive lock across the test processes of this file.
struct SerialLock {
    _file: std::fs::File,
}

async fn serial() -> SerialLock {
    tokio::task::spawn_blocking(|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/sandfleet-conformance.lock")
            .expect("lock file");
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock");
        SerialLock { _file: f }
    })
    .await
    .expect("lock task")
}

enum Backend {
    Process(ProcessRuntime),
    Docker(DockerRuntime),
    Cri(CriRuntime, CriConfig, sandfleet_testkit::containerd::Containerd),
}

struct Env {
    rt: Arc<dyn Runtime>,
    backend: Backend,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
    _lock: SerialLock,
}

impl Drop for Env {
    /// Best effort when a test failed half way: no process, cgroup, mount or
    /// container of the test may outlive it.
    fn drop(&mut self) {
        sandfleet_agent::runtime::disk::unmount_all_under(self._dir.path());
        match &self.backend {
            Backend::Process(p) => {
                let (cg, root) = (p.cgroups(), p.cgroup_root());
                for _ in 0..200 {
                    cg.kill_once(root);
                    if cg.remove(root).is_ok() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                eprintln!("could not remove cgroup {root}");
            }
            Backend::Docker(d) => {
                let prefix = format!("sandfleet-{}", d.config().node_id);
                for name in docker_names("label=sandfleet.node") {
                    if name.starts_with(&prefix) {
                        let _ = std::process::Command::new("docker").args(["rm", "-f", &name]).output();
                    }
                }
            }
            // The test containerd removes every pod sandbox when dropped; the
            // pod cgroups' parent goes after it (see `cri_cgroup_parent`).
            Backend::Cri(..) => {}
        }
    }
}

impl Env {
    fn uid(&self, id: &str) -> u32 {
        match &self.backend {
            Backend::Process(p) => p.session_uid(id).expect("session uid"),
            Backend::Docker(d) => d.session_uid(id).expect("session uid"),
            Backend::Cri(c, ..) => c.session_uid(id).expect("session uid"),
        }
    }

    async fn cleanup(self) {
        match &self.backend {
            Backend::Process(p) => p.remove_all().await.expect("remove_all"),
            Backend::Docker(d) => d.remove_all().await.expect("remove_all"),
            Backend::Cri(c, cfg, _) => {
                c.remove_all().await.expect("remove_all");
                remove_cgroup_parent(cfg);
            }
        }
    }

    /// A new runtime over the same data dir and node (an agent restart).
    async fn restarted(&self) -> Arc<dyn Runtime> {
        match &self.backend {
            Backend::Process(p) => Arc::new(ProcessRuntime::new(p.config().clone()).await.unwrap()),
            Backend::Docker(d) => Arc::new(DockerRuntime::new(d.config().clone()).await.unwrap()),
            Backend::Cri(c, cfg, _) => Arc::new(CriRuntime::new(c.config().clone(), cfg.clone()).await.unwrap()),
        }
    }

    /// Stops a session's container from outside the runtime (what a host
    /// reboot does to it).
    async fn stop_container_behind_its_back(&self, id: &str) {
        match &self.backend {
            Backend::Process(_) => {}
            Backend::Docker(d) => {
                let name = d.container_name(id).unwrap();
                let out = std::process::Command::new("docker").args(["stop", "-t", "1", &name]).output().unwrap();
                assert!(out.status.success(), "{out:?}");
            }
            Backend::Cri(c, _, containerd) => {
                let name = c.container_name(id).unwrap();
                for pod in cri_pods(containerd, &[("sandfleet.box", &name)]).await {
                    let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
                    cri.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest { pod_sandbox_id: pod.id }).await.unwrap();
                }
            }
        }
    }

    /// On the process runtime: within `grace` (zero: at once), no process is
    /// left in the session's cgroup and no exec cgroup under it. (What a
    /// docker session leaves is in its container, and `host_procs` sees it.)
    async fn assert_exec_cleaned_up(&self, id: &str, grace: Duration) {
        let Backend::Process(p) = &self.backend else { return };
        let cg = p.session_cgroup(id);
        let t = Instant::now();
        loop {
            // The session's executor stays; nothing else may.
            let executor = p.executor_pid(id).await.map(|p| p as i32);
            let pids: Vec<i32> =
                p.cgroups().pids_recursive(&cg).unwrap().into_iter().filter(|&p| Some(p) != executor).collect();
            let leaves = p.cgroups().descendants(&cg);
            if pids.is_empty() && leaves.is_empty() {
                return;
            }
            assert!(t.elapsed() <= grace, "processes {pids:?} or cgroups {leaves:?} left in the session cgroup");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn process_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the process runtime tests need root".into());
    }
    if !Path::new("/usr/bin/bwrap").exists() {
        return Some("/usr/bin/bwrap is not installed".into());
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let v1 =
        ["memory", "cpu", "pids"].iter().all(|c| Path::new("/sys/fs/cgroup").join(c).join("cgroup.procs").exists());
    if !v1 && !v2 {
        return Some("no cgroup v1 (memory, cpu, pids) or v2 hierarchy at /sys/fs/cgroup".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no loop devices (/dev/loop-control) for the per-session disk quotas".into());
    }
    None
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The exact command that builds the image for these tests.
fn build_command() -> String {
    format!(
        "{}/deploy/images/build-sandbox-image --executor {}",
        repo_root().display(),
        env!("CARGO_BIN_EXE_sandfleet-executor")
    )
}

/// Checks the engine and builds (or finds, by content hash) the sandbox
/// image with this build's executor; returns its tag.
fn docker_image() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the docker runtime tests need root".into());
    }
    let info =
        std::process::Command::new("timeout").args(["60", "docker", "info", "--format", "{{.ServerVersion}}"]).output();
    match info {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!("the Docker engine is not answering: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Err(e) => return Err(format!("cannot run the docker CLI: {e}")),
    }
    let out = std::process::Command::new(repo_root().join("deploy/images/build-sandbox-image"))
        .args(["--executor", env!("CARGO_BIN_EXE_sandfleet-executor"), "--print-tag"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", build_command()))?;
    if !out.status.success() {
        return Err(format!(
            "building the sandbox image failed; run it by hand: {}\n{}",
            build_command(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let tag = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if tag.is_empty() {
        return Err(format!("the image build printed no tag; run {}", build_command()));
    }
    Ok(tag)
}

fn docker_config(dir: &Path, tag: &str, uid_base: u32, image: &str) -> DockerRuntimeConfig {
    let mut cfg = DockerRuntimeConfig::new(dir.join("data"), format!("t-{tag}-{}", std::process::id()));
    cfg.uid_base = uid_base;
    cfg.slots = 8;
    for v in cfg.templates.values_mut() {
        *v = image.to_string();
    }
    cfg
}

/// A fresh runtime of `kind` with its own data dir, node id and uid range.
async fn setup(kind: Kind, tag: &str, uid_base: u32) -> Option<Env> {
    let lock = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let (rt, backend, data_dir): (Arc<dyn Runtime>, Backend, PathBuf) = match kind {
        Kind::Process => {
            if let Some(why) = process_missing() {
                return missing(&why);
            }
            let cfg = ProcessRuntimeConfig {
                data_dir: dir.path().join("data"),
                node_id: format!("t-{tag}-{}", std::process::id()),
                uid_base,
                slots: 8,
                bwrap_path: PathBuf::from("/usr/bin/bwrap"),
                disk_quota: Default::default(),
                executor_path: sandfleet_agent::runtime::process::locate_executor(),
            };
            let rt =
                ProcessRuntime::new(cfg).await.expect("ProcessRuntime::new on a host that has root, bwrap and cgroups");
            let data_dir = rt.config().data_dir.clone();
            (Arc::new(rt.clone()), Backend::Process(rt), data_dir)
        }
        Kind::Docker => {
            let image = match docker_image() {
                Ok(i) => i,
                Err(why) => return missing(&why),
            };
            let cfg = docker_config(dir.path(), tag, uid_base + 400_000, &image);
            let rt = DockerRuntime::new(cfg).await.expect("DockerRuntime::new with an engine and the image");
            let data_dir = rt.config().data_dir.clone();
            (Arc::new(rt.clone()), Backend::Docker(rt), data_dir)
        }
        Kind::Cri => {
            let image = match docker_image() {
                Ok(i) => i,
                Err(why) => return missing(&why),
            };
            let lacking = sandfleet_testkit::containerd::missing();
            if !lacking.is_empty() {
                return missing(&format!("the CRI runtime's tests need {}", lacking.join(", ")));
            }
            let containerd = tokio::task::spawn_blocking(move || {
                // `:latest` too (the build script tags it): the default of the templates an agent is not told about.
                sandfleet_testkit::containerd::Containerd::start(&[image.as_str(), "sandfleet/sandbox:latest"])
                    .map(|c| (c, image))
            })
            .await
            .expect("containerd start task");
            let (containerd, image) = containerd.unwrap_or_else(|e| panic!("starting the test containerd: {e}"));
            let mut cfg = docker_config(dir.path(), tag, uid_base + 450_000, &image);
            cfg.data_dir = dir.path().join("cri-data");
            let cri = cri_config(&containerd, &cfg.node_id);
            let rt = CriRuntime::new(cfg, cri.clone()).await.expect("CriRuntime::new with containerd and the image");
            let data_dir = rt.config().data_dir.clone();
            (Arc::new(rt.clone()), Backend::Cri(rt, cri, containerd), data_dir)
        }
    };
    eprintln!("{kind:?} runtime ready in {:?}", t.elapsed());
    Some(Env { rt, backend, data_dir, _dir: dir, _lock: lock })
}

/// The CRI runtime's configuration for the test containerd, with a cgroup
/// parent of the node's own.
fn cri_config(containerd: &sandfleet_testkit::containerd::Containerd, node_id: &str) -> CriConfig {
    CriConfig {
        endpoint: containerd.endpoint(),
        cgroup_parent: Some(format!("/sandfleet-test-cri/{node_id}")),
        ..Default::default()
    }
}

/// Removes the test's cgroup parent (every pod cgroup under it is gone by then).
fn remove_cgroup_parent(cfg: &CriConfig) {
    let Some(parent) = &cfg.cgroup_parent else { return };
    for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        // Pod cgroups a test made behind the runtime's back, and what containerd left in them.
        let dir = root.path().join(parent.trim_start_matches('/'));
        for pod in std::fs::read_dir(&dir).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
            for c in std::fs::read_dir(pod.path()).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(c.path());
            }
            let _ = std::fs::remove_dir(pod.path());
        }
        let _ = std::fs::remove_dir(root.path().join(parent.trim_start_matches('/')));
        let _ = std::fs::remove_dir(root.path().join("sandfleet-test-cri"));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/')));
}

/// The test containerd's pod sandboxes carrying every label of `labels`.
async fn cri_pods(
    containerd: &sandfleet_testkit::containerd::Containerd,
    labels: &[(&str, &str)],
) -> Vec<k8s_cri::v1::PodSandbox> {
    let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
    let filter = k8s_cri::v1::PodSandboxFilter {
        label_selector: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    cri.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: Some(filter) }).await.unwrap().into_inner().items
}

fn sandbox(id: &str) -> SandboxSpec {
    SandboxSpec {
        session_id: id.to_string(),
        generation: 1,
        spec: sandfleet_proto::v1::SessionSpec {
            template: "default".into(),
            cpu_millis: 1000,
            memory_bytes: 256 << 20,
            pids_limit: 64,
            ..Default::default()
        },
    }
}

fn code(language: Language, code: &str) -> ExecSpec {
    ExecSpec {
        command: Command::Code { language, code: code.to_string() },
        env: BTreeMap::new(),
        stdin: vec![],
        workdir: String::new(),
        timeout: Duration::from_secs(20),
        output_cap: 0,
    }
}

fn bash(script: &str) -> ExecSpec {
    code(Language::Bash, script)
}

struct Ran {
    info: ExitInfo,
    stdout: String,
    stderr: String,
    chunks: usize,
}

async fn run(rt: &dyn Runtime, id: &str, spec: ExecSpec) -> Result<Ran, RuntimeError> {
    let (tx, mut rx) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        let (mut o, mut e, mut n) = (Vec::new(), Vec::new(), 0);
        while let Some(ev) = rx.recv().await {
            n += 1;
            match ev {
                ExecEvent::Stdout(b) => {
                    assert!(b.len() <= sandfleet_common::limits::OUTPUT_CHUNK_BYTES);
                    o.extend_from_slice(&b)
                }
                ExecEvent::Stderr(b) => e.extend_from_slice(&b),
            }
        }
        (o, e, n)
    });
    let info = rt.exec(id, spec, tx).await;
    let (o, e, chunks) = reader.await.expect("reader");
    let info = info?;
    Ok(Ran {
        info,
        stdout: String::from_utf8_lossy(&o).into_owned(),
        stderr: String::from_utf8_lossy(&e).into_owned(),
        chunks,
    })
}

/// Live host processes of `uid` running exactly `argv` (after a grace for
/// processes that were just killed).
fn host_procs(uid: u32, argv: &[&str]) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(meta) = std::fs::metadata(e.path()) else { continue };
            if meta.uid() != uid {
                continue;
            }
            if std::fs::read(e.path().join("cmdline")).map(|c| c == want).unwrap_or(false) {
                found.push(pid);
            }
        }
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

async fn exit_codes(kind: Kind) {
    let Some(env) = setup(kind, "exit", 310_000).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    let t = Instant::now();
    rt.prepare(&sandbox(&id)).await.unwrap();
    eprintln!("{kind:?}: prepare took {:?}", t.elapsed());

    let r = run(rt, &id, code(Language::Python, "print(6*7)")).await.unwrap();
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert_eq!((r.info.exit_code, r.info.signal), (0, 0));
    assert!(
        !r.info.timed_out && !r.info.oom_killed && !r.info.output_truncated && r.info.message.is_empty(),
        "{:?}",
        r.info
    );
    let r = run(rt, &id, code(Language::Node, "console.log(6*7)")).await.unwrap();
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    let r = run(rt, &id, bash("echo out; echo err >&2; exit 7")).await.unwrap();
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    assert_eq!((r.info.exit_code, r.info.signal), (7, 0));
    let r = run(rt, &id, bash("kill -9 $$")).await.unwrap();
    assert_eq!((r.info.exit_code, r.info.signal), (137, 9));

    let mut spec = ExecSpec { command: Command::Argv(vec!["cat".into()]), stdin: b"from stdin".to_vec(), ..bash("") };
    spec.env.insert("X".into(), "1".into());
    let r = run(rt, &id, spec).await.unwrap();
    assert_eq!(r.stdout, "from stdin");
    let mut spec = bash("echo \"$PATH|$HOME|$LANG|$TMPDIR|$X|$(id -u):$(id -g)|$(hostname)|$(pwd)\"");
    spec.env.insert("X".into(), "exec-env".into());
    let r = run(rt, &id, spec).await.unwrap();
    assert_eq!(
        r.stdout, "/usr/local/bin:/usr/bin:/bin|/workspace|C.UTF-8|/tmp|exec-env|1000:1000|sandbox|/workspace\n",
        "{}",
        r.stderr
    );

    let (mut total, mut inside) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..10 {
        let t = Instant::now();
        let r = run(rt, &id, ExecSpec { command: Command::Argv(vec!["true".into()]), ..bash("") }).await.unwrap();
        total += t.elapsed();
        inside += r.info.duration;
        assert_eq!(r.info.exit_code, 0);
    }
    eprintln!(
        "{kind:?}: exec of `true` round trip {:?} on average, of which spawn to exit {:?}",
        total / 10,
        inside / 10
    );

    let other = new_session_id();
    assert!(matches!(run(rt, &other, bash("true")).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(run(rt, "../x", bash("true")).await, Err(RuntimeError::InvalidArgument(_))));
    assert!(matches!(
        run(rt, &id, ExecSpec { command: Command::Argv(vec![]), ..bash("") }).await,
        Err(RuntimeError::InvalidArgument(_))
    ));
    let mut bad = sandbox(&new_session_id());
    bad.spec.template = "gpu".into();
    let e = rt.prepare(&bad).await.unwrap_err();
    assert!(e.to_string().contains("unknown template"), "{e}");
    env.cleanup().await;
}

async fn timeout(kind: Kind) {
    let Some(env) = setup(kind, "timeout", 310_100).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let uid = env.uid(&id);
    let mut spec = bash("sleep 100 & sleep 100");
    spec.timeout = Duration::from_millis(500);
    let t = Instant::now();
    let r = run(rt, &id, spec).await.unwrap();
    let took = t.elapsed();
    assert!(r.info.timed_out, "{:?}", r.info);
    assert_eq!((r.info.exit_code, r.info.signal), (137, 9));
    assert_eq!(r.info.message, "timed out after 0.5s (timeout_ms limit)");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(host_procs(uid, &["sleep", "100"]).is_empty(), "a `sleep 100` of uid {uid} survived the timeout");
    env.assert_exec_cleaned_up(&id, Duration::ZERO).await;

    // A caller gone before the command starts: it is killed at once, and the end says why.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let t = Instant::now();
    let why = match rt.exec(&id, bash("sleep 100"), tx).await {
        Ok(info) => info.message,
        Err(e) => e.to_string(),
    };
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(why.contains("cancelled"), "{why}");
    assert!(host_procs(uid, &["sleep", "100"]).is_empty(), "an exec without a caller left its process behind");

    // The caller going away kills the command too.
    let (tx, mut rx) = mpsc::channel(8);
    let rt2 = env.rt.clone();
    let id2 = id.clone();
    let task = tokio::spawn(async move { rt2.exec(&id2, bash("echo started; sleep 100"), tx).await });
    assert!(matches!(rx.recv().await, Some(ExecEvent::Stdout(_))));
    drop(rx);
    task.abort();
    let _ = task.await;
    assert!(host_procs(uid, &["sleep", "100"]).is_empty(), "a cancelled exec left its process behind");
    env.assert_exec_cleaned_up(&id, Duration::from_secs(5)).await;
    env.cleanup().await;
}

async fn oom(kind: Kind) {
    let Some(env) = setup(kind, "oom", 310_200).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.spec.memory_bytes = 64 << 20;
    rt.prepare(&spec).await.unwrap();
    let r = run(rt, &id, code(Language::Python, "x = b'a' * (300 * 1024 * 1024)\nprint('survived', len(x))"))
        .await
        .unwrap();
    assert!(r.info.oom_killed, "{:?} stdout={} stderr={}", r.info, r.stdout, r.stderr);
    assert!(!r.stdout.contains("survived"));
    assert_eq!(r.info.signal, 9);
    assert!(r.info.message.contains("67108864") && r.info.message.contains("64Mi"), "{}", r.info.message);
    let r = run(rt, &id, code(Language::Python, "print(1)")).await.unwrap();
    assert_eq!(r.stdout, "1\n", "the session must survive an OOM kill: {}", r.stderr);
    assert!(!r.info.oom_killed);
    env.cleanup().await;
}

/// Execs back to back in a session with a small pids limit all run: what a
/// command leaves behind (bwrap's pid-namespace init, orphaned for a moment)
/// is reaped by the session's executor at once, not left a zombie charged to
/// the session's pids until the host's init gets to it.
async fn quick_execs_do_not_use_up_the_pids_limit(kind: Kind) {
    let Some(env) = setup(kind, "quick", 312_700).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.spec.pids_limit = 8;
    rt.prepare(&spec).await.unwrap();
    const EXECS: usize = 120;
    for i in 0..EXECS {
        let r = run(rt, &id, ExecSpec { command: Command::Argv(vec!["true".into()]), ..bash("") }).await.unwrap();
        assert_eq!(
            (r.info.exit_code, r.info.message.as_str()),
            (0, ""),
            "exec {i} of {EXECS} back to back failed: {} {}",
            r.stderr,
            r.info.message
        );
    }
    rt.destroy(&id).await.unwrap();
    env.cleanup().await;
}

async fn fork_bomb(kind: Kind) {
    let Some(env) = setup(kind, "bomb", 310_300).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.spec.pids_limit = 16;
    rt.prepare(&spec).await.unwrap();
    let mut spec = bash("bomb() { bomb | bomb & }; bomb; sleep 100");
    spec.timeout = Duration::from_secs(3);
    let t = Instant::now();
    let r = run(rt, &id, spec).await.unwrap();
    eprintln!("{kind:?}: fork bomb ended after {:?}: {:?}", t.elapsed(), r.info);
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(r.info.timed_out);
    assert!(
        r.info.message.contains("pids limit of 16 (pids_limit)"),
        "pids.max never refused a fork: {}",
        r.info.message
    );
    if let Backend::Process(p) = &env.backend {
        let peak = p.cgroups().dir("pids", &p.session_cgroup(&id)).join("pids.peak");
        if let Ok(peak) = std::fs::read_to_string(&peak) {
            // The session cgroup holds the executor too: it has the same headroom as a container.
            let peak: u64 = peak.trim().parse().unwrap();
            let max = 16 + u64::from(sandfleet_agent::executor::EXECUTOR_PIDS_HEADROOM);
            assert!(peak <= max, "pids.peak {peak} exceeded the limit of {max}");
        }
    }
    env.assert_exec_cleaned_up(&id, Duration::ZERO).await;
    // The session runs commands again at once.
    let t = Instant::now();
    loop {
        match run(rt, &id, bash("echo alive")).await {
            Ok(r) if r.stdout == "alive\n" => break,
            other => {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "the session did not recover from the fork bomb: {:?}",
                    other.map(|r| r.stderr)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!("{kind:?}: recovered after {:?}", t.elapsed());
    if kind == Kind::Process {
        assert!(t.elapsed() < Duration::from_secs(5), "the node took {:?} to run a command again", t.elapsed());
    }
    env.cleanup().await;
}

async fn no_network(kind: Kind) {
    let Some(env) = setup(kind, "net", 310_400).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let py = format!(
        r#"
import socket
for addr in [("127.0.0.1", {port}), ("172.17.0.1", {port}), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(addr)
        print("CONNECTED", addr)
    except OSError as e:
        print("blocked", addr, e.errno)
import os
print(sorted(os.listdir("/sys/class/net")) if os.path.exists("/sys/class/net") else "no-sys")
"#
    );
    let r = run(rt, &id, code(Language::Python, &py)).await.unwrap();
    assert!(!r.stdout.contains("CONNECTED"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("blocked").count(), 4, "{} {}", r.stdout, r.stderr);
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the host listener saw a connection");
    // No network tools either.
    let r = run(rt, &id, bash("for t in curl wget nc ping; do command -v $t && echo HAS-$t; done; echo done"))
        .await
        .unwrap();
    if kind != Kind::Process {
        assert_eq!(r.stdout, "done\n", "network tools in the image: {}", r.stdout);
    }
    env.cleanup().await;
}

/// Only unix, inet, inet6 and rtnetlink sockets open: vsock (which network
/// namespaces do not isolate: on a VM host it reaches the hypervisor's
/// services), packet, alg and other netlink protocols are refused (EPERM).
async fn only_needed_socket_families(kind: Kind) {
    let Some(env) = setup(kind, "sockfam", 311_500).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let py = r#"
import socket
for name, family, kind, proto in [
    ("vsock", 40, socket.SOCK_STREAM, 0),
    ("packet", 17, socket.SOCK_RAW, 0),
    ("alg", 38, socket.SOCK_SEQPACKET, 0),
    ("bluetooth", 31, socket.SOCK_STREAM, 0),
    ("netlink-uevent", 16, socket.SOCK_RAW, 15),
    ("unix", 1, socket.SOCK_STREAM, 0),
    ("inet", 2, socket.SOCK_DGRAM, 0),
    ("inet6", 10, socket.SOCK_DGRAM, 0),
    ("netlink-route", 16, socket.SOCK_RAW, 0),
]:
    try:
        socket.socket(family, kind, proto).close()
        print(name, "open")
    except OSError as e:
        print(name, "refused", e.errno)
try:
    socket.socketpair(40, socket.SOCK_STREAM)
    print("vsock-pair open")
except OSError as e:
    print("vsock-pair refused", e.errno)
"#;
    let r = run(rt, &id, code(Language::Python, py)).await.unwrap();
    let eperm = libc::EPERM;
    for refused in ["vsock", "packet", "alg", "bluetooth", "netlink-uevent", "vsock-pair"] {
        assert!(r.stdout.contains(&format!("{refused} refused {eperm}\n")), "{refused}: {} {}", r.stdout, r.stderr);
    }
    for open in ["unix", "inet", "inet6", "netlink-route"] {
        assert!(r.stdout.contains(&format!("{open} open\n")), "{open}: {} {}", r.stdout, r.stderr);
    }
    env.cleanup().await;
}

/// Every process's command line on the host, as `ps -eo args` shows them.
fn host_command_lines() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            out.push(String::from_utf8_lossy(&raw).replace('\0', " "));
        }
    }
    out
}

/// The session's and the exec's environment reach the command, but no
/// command line on the host shows their values while the exec runs (bwrap
/// reads its arguments from a sealed memfd, `--args FD`).
async fn secrets_stay_off_command_lines(kind: Kind) {
    let Some(env) = setup(kind, "secret", 311_600).await else { return };
    let id = new_session_id();
    let session_secret = format!("s3cr3t-session-{}", new_session_id());
    let exec_secret = format!("s3cr3t-exec-{}", new_session_id());
    let marker = format!("marker-{}", &id[id.len() - 12..]);
    let mut sb = sandbox(&id);
    sb.spec.env.insert("SESSION_SECRET".into(), session_secret.clone());
    env.rt.prepare(&sb).await.unwrap();
    let mut spec = bash(&format!("echo \"$SESSION_SECRET $EXEC_SECRET\"; sleep 3 # {marker}"));
    spec.env.insert("EXEC_SECRET".into(), exec_secret.clone());
    let rt = env.rt.clone();
    let exec_id = id.clone();
    let running = tokio::spawn(async move { run(rt.as_ref(), &exec_id, spec).await });
    // While the command runs (its own command line shows the marker), no
    // command line on the host holds either value.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen_running = false;
    while !running.is_finished() && std::time::Instant::now() < deadline {
        let lines = host_command_lines();
        seen_running |= lines.iter().any(|l| l.contains(&marker));
        for l in &lines {
            assert!(!l.contains(&session_secret) && !l.contains(&exec_secret), "a command line shows a secret: {l}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_running, "never saw the exec running");
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.stdout, format!("{session_secret} {exec_secret}\n"), "{}", r.stderr);
    env.cleanup().await;
}

async fn no_host_files(kind: Kind) {
    let Some(env) = setup(kind, "hostfs", 310_500).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let data_dir = env.data_dir.display().to_string();
    // A file in the host's /tmp (the sandbox's /tmp is its own).
    let host_tmp = std::env::temp_dir().join(format!("sandfleet-host-file-{id}"));
    std::fs::write(&host_tmp, b"host").unwrap();
    let host_tmp_path = host_tmp.display().to_string();
    let script = format!(
        r#"
for p in /root /home /var /run/user /sys /etc/shadow /etc/sudoers /etc/ssh "{data_dir}" /work /sandfleet "{host_tmp_path}" /proc/1/root/etc/shadow; do
  if [ -e "$p" ] || ls "$p" >/dev/null 2>&1; then echo "VISIBLE $p"; fi
done
cat /etc/shadow 2>/dev/null && echo READ-SHADOW
grep -c . /etc/passwd
cat /proc/self/status | grep -E '^(CapEff|NoNewPrivs|Seccomp):'
echo "fds: $(ls /proc/self/fd | tr '\n' ' ')"
"#
    );
    // An fd the agent forgot to mark close-on-exec must not reach the sandbox.
    // SAFETY: open with a valid C string; the fd is closed below.
    let leak = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    assert!(leak >= 0);
    let r = run(rt, &id, bash(&script)).await;
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(leak) };
    let _ = std::fs::remove_file(&host_tmp);
    let r = r.unwrap();
    assert!(r.stdout.contains("fds: 0 1 2 3 \n"), "fds leaked into the sandbox: {}", r.stdout);
    assert!(!r.stdout.contains("VISIBLE") && !r.stdout.contains("READ-SHADOW"), "{}", r.stdout);
    assert_eq!(r.stdout.lines().next(), Some("3"), "the sandbox /etc/passwd is not the agent's: {}", r.stdout);
    assert!(r.stdout.contains("CapEff:\t0000000000000000"), "{}", r.stdout);
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
    assert!(r.stdout.contains("Seccomp:\t2"), "{}", r.stdout);
    // Dangerous syscalls are refused by the inner filter.
    let py = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    ctypes.set_errno(0)
    r = getattr(libc, name)(*args)
    return r, ctypes.get_errno()
print("ptrace", *call("ptrace", 0, 0, None, None))
print("unshare", *call("unshare", 0x10000000))
print("mount", *call("mount", b"none", b"/tmp", b"tmpfs", 0, None))
print("keyctl", *call("syscall", 250 if os.uname().machine == "x86_64" else 219, 0, 0, 0, 0))
"#;
    let r = run(rt, &id, code(Language::Python, py)).await.unwrap();
    for name in ["ptrace", "unshare", "mount", "keyctl"] {
        assert!(r.stdout.contains(&format!("{name} -1 {}\n", libc::EPERM)), "{name}: {} {}", r.stdout, r.stderr);
    }
    // Threads still work (clone3 -> ENOSYS falls back to clone).
    let threads = "import threading\nt=threading.Thread(target=print, args=('thread ok',))\nt.start(); t.join()";
    let r = run(rt, &id, code(Language::Python, threads)).await.unwrap();
    assert_eq!(r.stdout, "thread ok\n", "{}", r.stderr);
    env.cleanup().await;
}

async fn file_round_trip(kind: Kind) {
    let Some(env) = setup(kind, "files", 310_600).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let ws = rt.workspace(&id).unwrap();
    let uid = env.uid(&id);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let chunks = futures::stream::iter(vec![
        Ok::<_, FsError>(Bytes::from(payload[..100_000].to_vec())),
        Ok(Bytes::from(payload[100_000..].to_vec())),
    ]);
    ws.write_file("src/data.bin", 0o644, chunks).await.unwrap();
    assert_eq!(std::fs::metadata(ws.root().join("src/data.bin")).unwrap().uid(), uid);
    // The sandbox sees the exact bytes, and writes a file the API reads back.
    let py = "import hashlib\nd=open('data.bin','rb').read()\nprint(len(d), hashlib.sha256(d).hexdigest())\nopen('out.txt','w').write('written inside')";
    let mut spec = code(Language::Python, py);
    spec.workdir = "src".into();
    let r = run(rt, &id, spec).await.unwrap();
    use sha2::Digest as _;
    let want = format!("200000 {}\n", hex::encode(sha2::Sha256::digest(&payload)));
    assert_eq!(r.stdout, want, "{}", r.stderr);
    let back = sandfleet_agent::workspace::read_to_vec(&ws, "src/out.txt").await.unwrap();
    assert_eq!(back, b"written inside");
    assert_eq!(std::fs::metadata(ws.root().join("src/out.txt")).unwrap().uid(), uid);
    let names: Vec<String> = ws.list("src").await.unwrap().into_iter().map(|e| e.name).collect();
    assert!(names.contains(&"data.bin".to_string()) && names.contains(&"out.txt".to_string()), "{names:?}");
    ws.remove("src", true).await.unwrap();
    let r = run(rt, &id, bash("ls -A")).await.unwrap();
    assert_eq!(r.stdout, "");
    // Only the workspace (and /tmp) take writes.
    let r = run(rt, &id, bash("touch /usr/x 2>/dev/null || echo ro")).await.unwrap();
    assert_eq!(r.stdout, "ro\n", "{}", r.stderr);
    env.cleanup().await;
}

async fn traversal_and_symlinks(kind: Kind) {
    let Some(env) = setup(kind, "escape", 310_700).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let ws = rt.workspace(&id).unwrap();
    // Lexical traversal.
    for bad in ["../etc/passwd", "/etc/passwd", "a/../../x"] {
        assert!(matches!(ws.read_file(bad).await, Err(FsError::InvalidPath(_))), "{bad}");
        let chunks = futures::stream::iter(vec![Ok::<_, FsError>(Bytes::from_static(b"x"))]);
        assert!(matches!(ws.write_file(bad, 0o644, chunks).await, Err(FsError::InvalidPath(_))), "{bad}");
    }
    // Symlinks planted by sandboxed code.
    let r = run(rt, &id, bash("ln -s /etc/passwd passwd; ln -s / root; ln -s ../../../../../../etc up; mkdir d; ln -s d inside; echo ok > d/f; echo ok")).await.unwrap();
    assert_eq!(r.stdout, "ok\n", "{}", r.stderr);
    for esc in ["passwd", "root/etc/shadow", "up/shadow"] {
        match ws.read_file(esc).await {
            Err(FsError::Escape(_)) | Err(FsError::NotFound(_)) => {}
            other => panic!("{esc}: expected an escape error, got {:?}", other.map(|_| "a file")),
        }
    }
    let chunks = futures::stream::iter(vec![Ok::<_, FsError>(Bytes::from_static(b"pwned"))]);
    assert!(ws.write_file("root/tmp/pwned", 0o644, chunks).await.is_err());
    assert!(!Path::new("/tmp/pwned").exists());
    let chunks = futures::stream::iter(vec![Ok::<_, FsError>(Bytes::from_static(b"x"))]);
    assert!(ws.write_file("passwd", 0o644, chunks).await.is_err(), "wrote through a final symlink");
    // A symlink that stays inside is followed.
    assert_eq!(sandfleet_agent::workspace::read_to_vec(&ws, "inside/f").await.unwrap(), b"ok\n");
    // A workdir through an escaping symlink, outside, absolute, missing, or a file.
    for bad in ["root", "../", "/etc", "nope", "d/f"] {
        let mut spec = bash("pwd");
        spec.workdir = bad.into();
        assert!(matches!(run(rt, &id, spec).await, Err(RuntimeError::InvalidArgument(_))), "workdir {bad}");
    }
    env.cleanup().await;
}

async fn output_cap_and_large_code(kind: Kind) {
    let Some(env) = setup(kind, "cap", 310_800).await else { return };
    let rt = env.rt.as_ref();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let mut spec = bash("yes");
    spec.output_cap = 100_000;
    let r = run(rt, &id, spec).await.unwrap();
    assert_eq!(r.stdout.len(), 100_000);
    assert!(r.chunks >= 2);
    assert!(r.info.output_truncated);
    assert_eq!(r.info.message, "output exceeded the limit of 100000 bytes");
    env.assert_exec_cleaned_up(&id, Duration::ZERO).await;
    let big = format!("#{}\nprint('big', len(open('/run/sandfleet/code').read()))\n", "x".repeat(200_000));
    let r = run(rt, &id, code(Language::Python, &big)).await.unwrap();
    assert_eq!(r.stdout, format!("big {}\n", big.len()), "{}", r.stderr);
    env.cleanup().await;
}

/// A command killed from the host (no limit of the exec hit) ends with SIGKILL
/// and a message that says so, not with a bare 137.
async fn killed_from_outside(kind: Kind) {
    let Some(env) = setup(kind, "killed", 310_900).await else { return };
    let id = new_session_id();
    env.rt.prepare(&sandbox(&id)).await.unwrap();
    let uid = env.uid(&id);
    let (tx, mut rx) = mpsc::channel(8);
    let (rt, sid) = (env.rt.clone(), id.clone());
    let task = tokio::spawn(async move { rt.exec(&sid, bash("echo started; exec sleep 313"), tx).await });
    assert!(matches!(rx.recv().await, Some(ExecEvent::Stdout(_))), "the command did not start");
    let reader = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    // bash prints "started" just before it execs the sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    let pids = loop {
        let pids = host_procs(uid, &["sleep", "313"]);
        if !pids.is_empty() || Instant::now() > deadline {
            break pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(pids.len(), 1, "one `sleep 313` of uid {uid} on the host: {pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let info = tokio::time::timeout(Duration::from_secs(20), task).await.expect("the exec ended").unwrap().unwrap();
    reader.await.unwrap();
    assert_eq!((info.exit_code, info.signal), (137, 9), "{info:?}");
    assert!(!info.timed_out && !info.oom_killed && !info.output_truncated, "{info:?}");
    assert!(info.message.starts_with("killed by signal 9 (SIGKILL) from outside the command"), "{:?}", info.message);
    env.cleanup().await;
}

/// Free bytes of the filesystem holding `path`.
fn host_free_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Bytes the host's disk holds for the sessions' filesystem images (not the pool's).
fn image_bytes(data_dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(data_dir.join("disks")) else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".img") && !n.starts_with("pool-")))
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

/// The count a program printed as `stopped ENOSPC <count>`.
fn stopped_by_enospc(r: &Ran) -> u64 {
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    assert_eq!(words.get(..2), Some(&["stopped", "ENOSPC"][..]), "{} {}", r.stdout, r.stderr);
    words[2].parse().expect("a count")
}

async fn disk_and_inode_quotas(kind: Kind) {
    let Some(env) = setup(kind, "disk", 311_700).await else { return };
    let rt = env.rt.as_ref();
    let quota: u64 = 64 << 20;
    let small = new_session_id();
    let mut spec = sandbox(&small);
    (spec.spec.disk_bytes, spec.spec.disk_inodes) = (quota, 2048);
    rt.prepare(&spec).await.unwrap();
    let neighbour = new_session_id();
    rt.prepare(&sandbox(&neighbour)).await.unwrap();
    let u = rt.disk_usage(&small).unwrap();
    assert!(u.limit_bytes <= quota && u.limit_bytes > quota / 2, "{u:?}");
    assert!(u.limit_inodes >= 2048 && u.limit_inodes < 2048 + 512, "{u:?}");
    let free_before = host_free_bytes(&env.data_dir);
    let images_before = image_bytes(&env.data_dir);

    // Bytes: a program that writes 200 MiB gets ENOSPC at the quota.
    let py = r#"
import errno, os
n = 0
try:
    with open("/workspace/big", "wb") as f:
        for _ in range(200):
            f.write(b"x" * (1 << 20)); f.flush(); os.fsync(f.fileno()); n += 1
except OSError as e:
    print("stopped", errno.errorcode[e.errno], n)
"#;
    let written = stopped_by_enospc(&run(rt, &small, code(Language::Python, py)).await.unwrap());
    assert!((32..64).contains(&written), "MiB written before ENOSPC: {written}");
    let u = rt.disk_usage(&small).unwrap();
    assert!(u.used_bytes > (written << 20) && u.used_bytes <= u.limit_bytes, "{u:?}");
    // What the host's disk holds for the session grew by at most the quota,
    // and its free space fell by less than the 200 MiB the program tried to
    // write. (The host-wide figure is only a cross-check: builds and other
    // tests on this machine write too, so it gets a wide margin; the image's
    // allocated size is the exact measure.)
    let grown = image_bytes(&env.data_dir) - images_before;
    assert!(grown <= quota && grown >= written << 20, "the session's image grew by {grown} bytes, quota {quota}");
    let dropped = free_before.saturating_sub(host_free_bytes(&env.data_dir));
    assert!(
        dropped < 200 << 20,
        "the host's free space dropped by {dropped} bytes: the 200 MiB write was not held to the {quota}-byte quota"
    );

    // The file API hits the same wall.
    let ws = rt.workspace(&small).unwrap();
    let chunks = futures::stream::iter((0..16).map(|_| Ok::<_, FsError>(Bytes::from(vec![7u8; 1 << 20]))));
    let err = ws.write_file("more", 0o644, chunks).await.expect_err("the disk is full");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");

    // Inodes: free the bytes, then make empty files until the kernel refuses.
    let py = r#"
import errno, os
os.remove("/workspace/big")
n = 0
try:
    while n < 100000:
        open("/workspace/f%d" % n, "w").close(); n += 1
except OSError as e:
    print("stopped", errno.errorcode[e.errno], n)
"#;
    let files = stopped_by_enospc(&run(rt, &small, code(Language::Python, py)).await.unwrap());
    let u = rt.disk_usage(&small).unwrap();
    assert!(files >= 1900 && files <= u.limit_inodes, "files made before ENOSPC: {files}, {u:?}");
    assert_eq!(u.used_inodes, u.limit_inodes, "{u:?}");

    // The neighbour and the runtime go on.
    let r = run(rt, &neighbour, bash("echo ok > /workspace/n && cat /workspace/n")).await.unwrap();
    assert_eq!((r.info.exit_code, r.stdout.as_str()), (0, "ok\n"), "{}", r.stderr);
    let third = new_session_id();
    rt.prepare(&sandbox(&third)).await.unwrap();
    let u = rt.disk_usage(&third).unwrap();
    assert!(u.limit_bytes > (1 << 30) * 9 / 10 && u.used_inodes < 64, "a default session's disk: {u:?}");
    rt.destroy(&small).await.unwrap();
    assert!(!env.data_dir.join("disks").join(format!("{small}.img")).exists() || kind != Kind::Process);
    env.cleanup().await;
}

/// After a host reboot the processes and the mounts are gone and the images
/// stay: a new runtime mounts each session's filesystem again before anything
/// reads it, and the session finds its files.
async fn disk_mounted_again_after_a_reboot(kind: Kind) {
    let Some(env) = setup(kind, "reboot", 311_800).await else { return };
    let id = new_session_id();
    env.rt.prepare(&sandbox(&id)).await.unwrap();
    let r = run(env.rt.as_ref(), &id, bash("echo kept > /workspace/f")).await.unwrap();
    assert_eq!(r.info.exit_code, 0, "{}", r.stderr);
    let ws = env.rt.workspace(&id).unwrap().root().to_path_buf();
    env.stop_container_behind_its_back(&id).await;
    sandfleet_agent::runtime::disk::unmount_all_under(&ws);
    assert!(!ws.join("f").exists(), "the reboot took the mount");
    // An agent without quotas cannot serve sessions that have filesystems of their own.
    if let Backend::Process(p) = &env.backend {
        let off = ProcessRuntimeConfig { disk_quota: DiskQuota::Off, ..p.config().clone() };
        let e = ProcessRuntime::new(off).await.expect_err("refused while sessions have their own filesystems");
        assert!(e.to_string().contains("--disk-quota loop"), "{e}");
    }
    let rt2 = env.restarted().await;
    assert_eq!(std::fs::read_to_string(rt2.workspace(&id).unwrap().root().join("f")).unwrap(), "kept\n");
    let r = run(rt2.as_ref(), &id, bash("cat /workspace/f")).await.unwrap();
    assert_eq!((r.info.exit_code, r.stdout.as_str()), (0, "kept\n"), "{}", r.stderr);
    assert!(rt2.disk_usage(&id).unwrap().limit_bytes > 0);
    rt2.destroy(&id).await.unwrap();
    env.cleanup().await;
}

/// `Runtime::usage` sums what the sessions use: memory while a session
/// holds it, CPU time that only grows, also after the session ended.
async fn usage_counts_cpu_and_memory(kind: Kind) {
    let Some(env) = setup(kind, "usage", 312_400).await else { return };
    let rt = env.rt.clone();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let before = rt.usage().await;
    // About a second of CPU, then 96 MiB held for a few seconds.
    let script = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.2: pass\n\
                  b = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(4)\nprint('done')";
    let exec = {
        let (rt, id) = (rt.clone(), id.clone());
        tokio::spawn(async move { run(rt.as_ref(), &id, code(Language::Python, script)).await })
    };
    let until = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let u = rt.usage().await;
        if u.memory_bytes >= 64 << 20 {
            break u;
        }
        assert!(Instant::now() < until, "the session's 96 MiB never showed: {u:?} (before {before:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = exec.await.unwrap().unwrap();
    assert_eq!(r.stdout, "done\n", "{}", r.stderr);
    let after = rt.usage().await;
    assert!(after.cpu_seconds_total >= held.cpu_seconds_total, "{held:?} then {after:?}");
    let cpu_accounted = after.cpu_seconds_total > 0.0;
    if cpu_accounted {
        assert!(after.cpu_seconds_total - before.cpu_seconds_total >= 1.0, "{before:?} then {after:?}");
    } else {
        eprintln!("this host accounts no CPU time for the sandboxes (cgroup v1 without cpuacct)");
    }
    // Ended: its memory goes, its CPU time stays.
    rt.destroy(&id).await.unwrap();
    let gone = rt.usage().await;
    assert_eq!(gone.memory_bytes, 0, "{gone:?}");
    assert!(gone.cpu_seconds_total >= after.cpu_seconds_total, "{after:?} then {gone:?}");
    env.cleanup().await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Process).await
                }
            )*
        }
        mod docker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Docker).await
                }
            )*
        }
        mod cri {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Cri).await
                }
            )*
        }
    };
}

conformance!(
    exit_codes,
    timeout,
    oom,
    fork_bomb,
    quick_execs_do_not_use_up_the_pids_limit,
    no_network,
    only_needed_socket_families,
    secrets_stay_off_command_lines,
    no_host_files,
    file_round_trip,
    traversal_and_symlinks,
    output_cap_and_large_code,
    killed_from_outside,
    disk_and_inode_quotas,
    disk_mounted_again_after_a_reboot,
    usage_counts_cpu_and_memory
);

// ---------------------------------------------------------------------------
// Process only
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_sessions_cannot_read_each_other() {
    let Some(env) = setup(Kind::Process, "cross", 300_700).await else { return };
    let Backend::Process(rt) = &env.backend else { unreachable!() };
    let a = new_session_id();
    let b = new_session_id();
    rt.prepare(&sandbox(&a)).await.unwrap();
    rt.prepare(&sandbox(&b)).await.unwrap();
    let (ua, ub) = (rt.session_uid(&a).unwrap(), rt.session_uid(&b).unwrap());
    assert_ne!(ua, ub);
    let r = run(rt, &a, bash("echo secret-of-a > secret.txt; chmod 644 secret.txt; echo ok")).await.unwrap();
    assert_eq!(r.stdout, "ok\n");
    let ws_a = rt.workspace(&a).unwrap().root().to_path_buf();
    let meta = std::fs::metadata(&ws_a).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (ua, 0o700));

    // Inside B's sandbox, A's workspace does not exist at all.
    let script = format!("cat {}/secret.txt 2>&1; ls /workspace", ws_a.display());
    let r = run(rt, &b, bash(&script)).await.unwrap();
    assert!(!r.stdout.contains("secret-of-a"), "{}", r.stdout);
    // And even on the host, B's uid cannot read it (what an escape would land as).
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", &ub.to_string(), "--regid", &ub.to_string(), "--clear-groups", "cat"])
        .arg(ws_a.join("secret.txt"))
        .output();
    if let Ok(out) = out {
        assert!(!out.status.success(), "uid {ub} read session A's file on the host");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("secret-of-a"));
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_prepare_is_idempotent_and_destroy_removes_everything() {
    let Some(env) = setup(Kind::Process, "destroy", 301_000).await else { return };
    let Backend::Process(rt) = &env.backend else { unreachable!() };
    let id = new_session_id();
    let mut spec = sandbox(&id);
    rt.prepare(&spec).await.unwrap();
    let uid = rt.session_uid(&id).unwrap();
    spec.generation = 5;
    rt.prepare(&spec).await.unwrap();
    spec.generation = 3;
    rt.prepare(&spec).await.unwrap();
    let l = rt.list().await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].session_id.as_str(), l[0].generation), (id.as_str(), 5));
    assert_eq!(rt.session_uid(&id), Some(uid), "re-prepare kept the slot");

    let cg = rt.session_cgroup(&id);
    let dirs: Vec<PathBuf> = ["memory", "cpu", "pids"].iter().map(|c| rt.cgroups().dir(c, &cg)).collect();
    assert!(dirs.iter().all(|d| d.is_dir()));
    let ws = rt.workspace(&id).unwrap().root().to_path_buf();
    let session_dir = ws.parent().unwrap().to_path_buf();
    // A background process must not survive destroy either.
    let (tx, mut rx) = mpsc::channel(8);
    let rt2 = rt.clone();
    let id2 = id.clone();
    let running = tokio::spawn(async move { rt2.exec(&id2, bash("echo started; sleep 100"), tx).await });
    assert!(matches!(rx.recv().await, Some(ExecEvent::Stdout(_))));

    rt.destroy(&id).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap();
    match ended {
        Err(RuntimeError::Unavailable(m)) => assert!(m.contains("stopped or deleted while the command ran"), "{m}"),
        other => panic!("an exec cut off by destroy must end with UNAVAILABLE: {other:?}"),
    }
    assert!(dirs.iter().all(|d| !d.exists()), "cgroup left behind");
    assert!(!session_dir.exists(), "session dir left behind");
    assert!(host_procs(uid, &["sleep", "100"]).is_empty());
    assert!(rt.list().await.unwrap().is_empty());
    assert!(matches!(rt.workspace(&id), Err(RuntimeError::NotFound(_))));
    assert!(matches!(run(rt, &id, bash("true")).await, Err(RuntimeError::NotFound(_))));
    rt.destroy(&id).await.unwrap();

    // The slot is free again.
    let other = new_session_id();
    rt.prepare(&sandbox(&other)).await.unwrap();
    assert_eq!(rt.session_uid(&other), Some(uid));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_restart_kills_leftovers_and_rediscovers_sessions() {
    let Some(env) = setup(Kind::Process, "p-restart", 301_100).await else { return };
    let Backend::Process(first) = &env.backend else { unreachable!() };
    let cfg = first.config().clone();
    let rt = first.clone();
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.generation = 7;
    spec.spec.env.insert("FROM_SESSION".into(), "yes".into());
    rt.prepare(&spec).await.unwrap();
    let uid = rt.session_uid(&id).unwrap();
    let r = run(&rt, &id, bash("echo keep > kept.txt; echo ok")).await.unwrap();
    assert_eq!(r.stdout, "ok\n");

    // Simulate a crash in the middle of an exec: a process stuck in an exec
    // cgroup of the session that no agent supervises any more.
    let cg = rt.session_cgroup(&id);
    let leaf = format!("{cg}/exec-99");
    rt.cgroups().create(&leaf).unwrap();
    let mut leaked = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
    for procs in rt.cgroups().procs_files(&leaf) {
        std::fs::write(procs, leaked.id().to_string()).unwrap();
    }
    let executor = rt.executor_pid(&id).await.expect("the session's executor runs") as i32;
    let mut pids = rt.cgroups().pids_recursive(&cg).unwrap();
    pids.sort();
    let mut want = vec![leaked.id() as i32, executor];
    want.sort();
    assert_eq!(pids, want);
    drop(rt);

    let t = Instant::now();
    let rt = ProcessRuntime::new(cfg).await.unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    let st = leaked.wait().unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(st.signal(), Some(9), "the leftover process was not killed");
    assert!(!rt.cgroups().exists(&leaf), "exec cgroup left behind");
    // Killed by the restart (its last threads may still be exiting).
    let t = Instant::now();
    while process_runs(executor) {
        assert!(t.elapsed() < Duration::from_secs(5), "the old agent's executor survived the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let l = rt.list().await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].session_id.as_str(), l[0].generation), (id.as_str(), 7));
    assert_eq!(rt.session_uid(&id), Some(uid));
    let r = run(&rt, &id, bash("cat kept.txt; echo $FROM_SESSION")).await.unwrap();
    assert_eq!(r.stdout, "keep\nyes\n", "{}", r.stderr);
    rt.remove_all().await.unwrap();
    assert!(!rt.cgroups().exists(rt.cgroup_root()));
}

/// Whether `pid` is a process that has not exited (a zombie has).
/// True while any thread of `pid` has not exited. The thread-group leader
/// shows as a zombie as soon as it exits, while its other threads may still
/// be exiting and holding the process's files (a listening socket still
/// queues connections then); a thread that has exited leaves `task/`.
fn process_runs(pid: i32) -> bool {
    let running = |stat: String| {
        stat.rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().to_string())
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(running))
}

/// Each session's execs go through its own executor: on the host as the
/// session's uid, inside the session's cgroups (so no exec pays a cgroup
/// migration), with its socket in a directory only that uid can enter. One
/// that dies is started again by the next exec, and it goes with the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_execs_go_through_the_sessions_own_executor() {
    let Some(env) = setup(Kind::Process, "executor", 301_200).await else { return };
    let Backend::Process(rt) = &env.backend else { unreachable!() };
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let uid = rt.session_uid(&id).unwrap();
    let r = run(rt, &id, bash("echo $$")).await.unwrap();
    assert_eq!(r.info.exit_code, 0, "{}", r.stderr);
    let pid = rt.executor_pid(&id).await.expect("the executor runs after an exec") as i32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(ids("Uid:").iter().all(|u| *u == uid.to_string()), "executor uids {:?}", ids("Uid:"));
    assert!(ids("Gid:").iter().all(|g| *g == uid.to_string()), "executor gids {:?}", ids("Gid:"));
    assert!(ids("Groups:").is_empty(), "executor groups {:?}", ids("Groups:"));
    assert_eq!(ids("CapEff:"), vec!["0000000000000000"]);
    let cg = rt.session_cgroup(&id);
    assert!(rt.cgroups().pids(&cg).unwrap().contains(&pid), "the executor is not in the session's cgroups");
    let ws = rt.workspace(&id).unwrap().root().to_path_buf();
    let run_dir = ws.parent().unwrap().join("run");
    let meta = std::fs::metadata(&run_dir).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));

    // Killed (an OOM kill, an operator): the next exec starts it again.
    // SAFETY: kill with a plain pid and signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while process_runs(pid) {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = run(rt, &id, bash("echo again")).await.unwrap();
    assert_eq!(r.stdout, "again\n", "{}", r.stderr);
    let second = rt.executor_pid(&id).await.unwrap() as i32;
    assert_ne!(second, pid);

    rt.destroy(&id).await.unwrap();
    let t = Instant::now();
    while process_runs(second) {
        assert!(t.elapsed() < Duration::from_secs(5), "the executor outlived its session");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.cleanup().await;
}

// ---------------------------------------------------------------------------
// Docker only
// ---------------------------------------------------------------------------

/// What a container's own processes print of themselves (`id -u` first, then
/// their status lines): the session's uid, no capabilities, no_new_privs and
/// a seccomp filter. Returns stdout and stderr together.
fn assert_hardened_inside(stdout: &[u8], stderr: &[u8], uid: u32) -> String {
    let text = String::from_utf8_lossy(stdout).into_owned() + &String::from_utf8_lossy(stderr);
    eprintln!("inside the container: {text}");
    assert!(text.starts_with(&format!("{uid}\n")), "{text}");
    assert!(
        text.contains("CapEff:\t0000000000000000") && text.contains("NoNewPrivs:\t1") && text.contains("Seccomp:\t2"),
        "{text}"
    );
    text
}

fn docker_inspect(name: &str) -> serde_json::Value {
    let out = std::process::Command::new("docker").args(["inspect", name]).output().expect("docker inspect");
    assert!(out.status.success(), "docker inspect {name}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    v[0].clone()
}

/// Names of the containers matching every `--filter` (separated by `&`).
fn docker_names(filters: &str) -> Vec<String> {
    let mut cmd = std::process::Command::new("docker");
    cmd.args(["ps", "-a", "--format", "{{.Names}}"]);
    for f in filters.split('&') {
        cmd.args(["--filter", f]);
    }
    let out = cmd.output().expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_inspect_shows_every_hardening_field() {
    let Some(env) = setup(Kind::Docker, "inspect", 311_000).await else { return };
    let Backend::Docker(d) = &env.backend else { unreachable!() };
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.generation = 4;
    spec.spec.cpu_millis = 500;
    spec.spec.memory_bytes = 128 << 20;
    spec.spec.pids_limit = 50;
    d.prepare(&spec).await.unwrap();
    let name = d.container_name(&id).unwrap();
    let uid = d.session_uid(&id).unwrap();
    let c = docker_inspect(&name);
    let h = &c["HostConfig"];
    eprintln!(
        "HostConfig: {}",
        serde_json::to_string(h).unwrap().chars().filter(|_| true).take(3000).collect::<String>()
    );
    assert_eq!(h["Memory"], 128 << 20);
    assert_eq!(h["MemorySwap"], 128 << 20, "memory+swap must equal memory (no swap)");
    assert_eq!(h["CpuPeriod"], 100_000);
    assert_eq!(h["CpuQuota"], 50_000);
    assert_eq!(h["PidsLimit"], 50 + 32);
    assert_eq!(h["NetworkMode"], "none");
    assert_eq!(h["CapDrop"], serde_json::json!(["ALL"]));
    assert!(h["CapAdd"].is_null() || h["CapAdd"] == serde_json::json!([]));
    assert_eq!(h["Privileged"], false);
    let sec: Vec<String> =
        h["SecurityOpt"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(sec.iter().any(|s| s == "no-new-privileges:true" || s == "no-new-privileges"), "{sec:?}");
    let profile = sec.iter().find_map(|s| s.strip_prefix("seccomp=")).expect("a seccomp profile");
    let profile: serde_json::Value = serde_json::from_str(profile).expect("profile json");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    assert!(!profile.to_string().contains("\"ptrace\""));
    assert_eq!(h["ReadonlyRootfs"], true);
    let tmp = h["Tmpfs"]["/tmp"].as_str().expect("tmpfs /tmp");
    for opt in ["noexec", "nosuid", "size="] {
        assert!(tmp.contains(opt), "/tmp options {tmp}");
    }
    let binds: Vec<String> = h["Binds"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(binds.iter().any(|b| b.ends_with(":/workspace:rw")), "{binds:?}");
    assert!(binds.iter().any(|b| b.ends_with(":/sandfleet:rw")), "{binds:?}");
    assert_eq!(h["LogConfig"]["Type"], "json-file");
    assert_eq!(h["LogConfig"]["Config"]["max-size"], "10m");
    assert_eq!(h["LogConfig"]["Config"]["max-file"], "3");
    assert_eq!(h["Init"], true);
    let cfg = &c["Config"];
    assert_eq!(cfg["User"], format!("{uid}:{uid}"));
    assert_ne!(uid, 0);
    assert_eq!(cfg["Labels"]["sandfleet.session"], id.as_str());
    assert_eq!(cfg["Labels"]["sandfleet.generation"], "4");
    assert_eq!(cfg["Labels"]["sandfleet.node"], d.config().node_id.as_str());
    assert_eq!(c["State"]["Running"], true);

    // The container really runs that way: executor as the session uid with no
    // capabilities, no-new-privs and the seccomp filter (mode 2), read-only root.
    let out = std::process::Command::new("docker")
        .args([
            "exec",
            &name,
            "sh",
            "-c",
            "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/1/status; touch /x 2>&1 || true; ls /sys/class/net",
        ])
        .output()
        .unwrap();
    let text = assert_hardened_inside(&out.stdout, &out.stderr, uid);
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(!text.contains("eth0"), "the container has a network interface: {text}");

    // And bwrap works inside it: a second, nested sandbox with its own pid namespace.
    let r = run(d, &id, bash("echo $$; echo kept > kept.txt")).await.unwrap();
    assert!(r.stdout.starts_with("2\n") || r.stdout.starts_with("1\n"), "not in a fresh pid namespace: {}", r.stdout);

    // A container that dies (killed from outside) is started again on the next exec,
    // with its workspace.
    let out = std::process::Command::new("docker").args(["kill", &name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = run(d, &id, bash("cat kept.txt")).await.unwrap();
    assert_eq!(r.stdout, "kept\n", "{}", r.stderr);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_serves_creates_and_never_reuses_a_container() {
    let Some(env) = setup(Kind::Docker, "pool", 311_100).await else { return };
    let Backend::Docker(first) = &env.backend else { unreachable!() };
    // A second runtime on its own data dir and node id, with a warm pool.
    let mut cfg = first.config().clone();
    cfg.node_id = format!("{}-pool", cfg.node_id);
    cfg.data_dir = env._dir.path().join("pool-data");
    cfg.uid_base += 100;
    cfg.warm_pool = BTreeMap::from([(Template::Python, 2)]);
    let d = DockerRuntime::new(cfg).await.unwrap();
    assert!(d.wait_pool_full(Duration::from_secs(60)).await, "the pool never filled");
    let pooled_before =
        docker_names(&format!("label=sandfleet.pool=python&label=sandfleet.node={}", d.config().node_id));
    assert_eq!(pooled_before.len(), 2, "{pooled_before:?}");

    let a = new_session_id();
    let mut spec = sandbox(&a);
    spec.spec.template = "python".into();
    spec.spec.memory_bytes = 0;
    spec.spec.cpu_millis = 0;
    spec.spec.pids_limit = 0;
    let t = Instant::now();
    d.prepare(&spec).await.unwrap();
    let warm = t.elapsed();
    eprintln!("warm create took {warm:?}");
    let name_a = d.container_name(&a).unwrap();
    assert!(pooled_before.contains(&name_a), "session A did not get a pool container");
    let r = run(&d, &a, code(Language::Python, "print('warm')")).await.unwrap();
    assert_eq!(r.stdout, "warm\n", "{}", r.stderr);
    // Limits other than the template's defaults are applied to the claimed container.
    let b = new_session_id();
    let mut spec_b = spec.clone();
    spec_b.session_id = b.clone();
    spec_b.spec.memory_bytes = 96 << 20;
    d.prepare(&spec_b).await.unwrap();
    let name_b = d.container_name(&b).unwrap();
    assert_eq!(docker_inspect(&name_b)["HostConfig"]["Memory"], 96 << 20);

    // Destroying A removes its container: it never goes back to the pool.
    d.destroy(&a).await.unwrap();
    assert!(docker_names(&format!("name={name_a}")).is_empty(), "a claimed container outlived its session");
    assert!(d.wait_pool_full(Duration::from_secs(60)).await, "the pool did not refill");
    let c = new_session_id();
    let mut spec_c = spec.clone();
    spec_c.session_id = c.clone();
    d.prepare(&spec_c).await.unwrap();
    let name_c = d.container_name(&c).unwrap();
    assert_ne!(name_c, name_a);
    assert_ne!(name_c, name_b);
    // The pool's refill task has ended when remove_all returns.
    d.remove_all().await.unwrap();
    drop(d);
    env.cleanup().await;
}

/// The boxes (docker: containers; CRI: pod sandboxes) of `node`, by name,
/// with `label=value` too when given.
async fn boxes(env: &Env, node: &str, label: Option<(&str, &str)>) -> Vec<String> {
    match &env.backend {
        Backend::Process(_) => vec![],
        Backend::Docker(_) => {
            let mut f = format!("label=sandfleet.node={node}");
            if let Some((k, v)) = label {
                f.push_str(&format!("&label={k}={v}"));
            }
            docker_names(&f)
        }
        Backend::Cri(_, _, containerd) => {
            let mut labels = vec![("sandfleet.node", node)];
            labels.extend(label);
            cri_pods(containerd, &labels).await.into_iter().filter_map(|p| Some(p.metadata?.name)).collect()
        }
    }
}

/// Removes a box behind the runtime's back.
async fn remove_box_behind_its_back(env: &Env, name: &str) {
    match &env.backend {
        Backend::Process(_) => {}
        Backend::Docker(_) => {
            let out = std::process::Command::new("docker").args(["rm", "-f", name]).output().unwrap();
            assert!(out.status.success());
        }
        Backend::Cri(_, _, containerd) => {
            let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
            for pod in cri_pods(containerd, &[("sandfleet.box", name)]).await {
                cri.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() })
                    .await
                    .unwrap();
                cri.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest { pod_sandbox_id: pod.id }).await.unwrap();
            }
        }
    }
}

/// A box of `node` that no session owns: what an agent that died between
/// create and start leaves.
async fn stray_box(env: &Env, node: &str, image: &str) {
    let stray = format!("sandfleet-{node}-stray");
    match &env.backend {
        Backend::Process(_) => {}
        Backend::Docker(_) => {
            let out = std::process::Command::new("docker")
                .args(["create", "--name", &stray, "--label", &format!("sandfleet.node={node}"), "--network", "none"])
                .arg(image)
                .arg("true")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        Backend::Cri(_, cfg, containerd) => {
            let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
            let labels = std::collections::HashMap::from([
                ("sandfleet.node".to_string(), node.to_string()),
                ("sandfleet.box".to_string(), stray.clone()),
            ]);
            let config = k8s_cri::v1::PodSandboxConfig {
                metadata: Some(k8s_cri::v1::PodSandboxMetadata {
                    name: stray.clone(),
                    uid: stray.clone(),
                    namespace: "sandfleet".into(),
                    attempt: 0,
                }),
                labels,
                linux: Some(k8s_cri::v1::LinuxPodSandboxConfig {
                    cgroup_parent: format!("{}/{stray}", cfg.cgroup_parent.as_deref().unwrap()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            cri.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .unwrap();
        }
    }
}

/// A new container runtime of `env`'s kind over `cfg`.
async fn container_runtime(env: &Env, cfg: DockerRuntimeConfig) -> Arc<dyn Runtime> {
    match &env.backend {
        Backend::Cri(_, cri, _) => Arc::new(CriRuntime::new(cfg, cri.clone()).await.unwrap()),
        _ => Arc::new(DockerRuntime::new(cfg).await.unwrap()),
    }
}

/// The configuration of `env`'s container runtime.
fn container_config(env: &Env) -> DockerRuntimeConfig {
    match &env.backend {
        Backend::Docker(d) => d.config().clone(),
        Backend::Cri(c, ..) => c.config().clone(),
        Backend::Process(_) => unreachable!("a container runtime"),
    }
}

/// Waits until `node` has `want` idle pool boxes of the default template.
async fn pool_full(env: &Env, node: &str, want: usize) -> bool {
    let t = Instant::now();
    while boxes(env, node, Some(("sandfleet.pool", "default"))).await.len() < want {
        if t.elapsed() > Duration::from_secs(60) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

async fn agent_restart_reconciles_and_leaves_no_orphan(kind: Kind) {
    let Some(env) = setup(kind, "restart", 311_200).await else { return };
    let mut cfg = container_config(&env);
    cfg.warm_pool = BTreeMap::from([(Template::Default, 1)]);
    let node = cfg.node_id.clone();
    let image = cfg.templates.values().next().cloned().expect("an image");
    let rt = container_runtime(&env, cfg.clone()).await;
    assert!(pool_full(&env, &node, 1).await, "the pool never filled");
    let keep = new_session_id();
    let gone = new_session_id();
    let mut spec = sandbox(&keep);
    spec.generation = 7;
    spec.spec.env.insert("FROM_SESSION".into(), "yes".into());
    rt.prepare(&spec).await.unwrap();
    rt.prepare(&sandbox(&gone)).await.unwrap();
    let r = run(rt.as_ref(), &keep, bash("echo keep > kept.txt; echo ok")).await.unwrap();
    assert_eq!(r.stdout, "ok\n");
    // One box was claimed from the pool, which refills: 3 boxes of this node.
    let t = Instant::now();
    while boxes(&env, &node, None).await.len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "the pool did not refill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = boxes(&env, &node, None).await;
    assert_eq!(before.len(), 3, "{before:?}");
    // A half-created box (the agent died between create and start).
    stray_box(&env, &node, &image).await;

    // The agent dies (no cleanup runs; dropping the runtime aborts its idle
    // refill task) and starts again, without a pool this time.
    drop(rt);
    cfg.warm_pool.clear();
    let rt = container_runtime(&env, cfg.clone()).await;
    let listed = rt.list().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|s| s.session_id.as_str()).collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(ids.contains(&keep.as_str()) && ids.contains(&gone.as_str()));
    assert_eq!(listed.iter().find(|s| s.session_id == keep).unwrap().generation, 7);
    let after = boxes(&env, &node, None).await;
    assert_eq!(after.len(), 2, "the pool box and the stray one must be removed: {after:?}");

    // The agent's reconcile: the cluster assigns only `keep`; `gone` is an orphan.
    let state = Arc::new(sandfleet_agent::control::AgentState::new(node.clone(), rt.clone()));
    state.rediscover().await.unwrap();
    let assignment = sandfleet_proto::v1::Assignment {
        session_id: keep.clone(),
        generation: 7,
        spec: Some(sandfleet_proto::v1::SessionSpec { template: "default".into(), ..Default::default() }),
        ..Default::default()
    };
    state.reconcile(vec![assignment], 1, false).await;
    let t = Instant::now();
    while boxes(&env, &node, None).await.len() != 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "the orphaned session's box was not removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = run(rt.as_ref(), &keep, bash("cat kept.txt; echo $FROM_SESSION")).await.unwrap();
    assert_eq!(r.stdout, "keep\nyes\n", "{}", r.stderr);

    // The box is removed behind the agent's back; at the next start the
    // session gets a new one over the same workspace.
    let name = boxes(&env, &node, None).await.pop().unwrap();
    remove_box_behind_its_back(&env, &name).await;
    drop(state);
    drop(rt);
    let rt = container_runtime(&env, cfg.clone()).await;
    assert_eq!(rt.list().await.unwrap().len(), 1);
    let r = run(rt.as_ref(), &keep, bash("cat kept.txt; echo $FROM_SESSION")).await.unwrap();
    assert_eq!(r.stdout, "keep\nyes\n", "{}", r.stderr);
    rt.destroy(&keep).await.unwrap();
    assert!(boxes(&env, &node, None).await.is_empty());
    env.cleanup().await;
}

/// The real `sandfleet-agent` process, SIGKILLed: its warm-pool containers are
/// orphans when it starts again (without a pool), and are removed.
async fn killed_agent_process_leaves_no_orphan_after_restart(kind: Kind) {
    let Some(env) = setup(kind, "kill", 311_300).await else { return };
    let cfg = container_config(&env);
    let node = format!("{}-proc", cfg.node_id);
    let data_dir = env._dir.path().join("agent-data");
    let log = env._dir.path().join("agent.log");
    let image = cfg.templates.values().next().cloned().expect("an image");
    let runtime_args: Vec<String> = match &env.backend {
        Backend::Cri(_, cri, _) => vec![
            "--runtime".into(),
            "cri".into(),
            "--cri-endpoint".into(),
            cri.endpoint.clone(),
            "--cri-cgroup-parent".into(),
            cri.cgroup_parent.clone().unwrap(),
        ],
        _ => vec!["--runtime".into(), "docker".into()],
    };
    // No coordinator answers at this address: the agent starts its runtime (and pool)
    // and keeps trying to register, which is all this test needs.
    let start = |pool: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sandfleet-agent"));
        cmd.args(["--node-id", &node, "--listen", "127.0.0.1:0", "--coordinators", "127.0.0.1:1", "--insecure"])
            .args(&runtime_args)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--uid-base", "712000", "--slots", "4"])
            .args(["--template-image", &format!("default={image}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        if pool {
            cmd.args(["--warm-pool", "default=2"]);
        }
        cmd.spawn().expect("spawning sandfleet-agent")
    };
    let mut agent = start(true);
    let t = Instant::now();
    while boxes(&env, &node, None).await.len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the agent's warm pool never filled; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.kill().unwrap(); // SIGKILL: no cleanup runs
    agent.wait().unwrap();
    assert_eq!(boxes(&env, &node, None).await.len(), 2, "the pool boxes outlive a killed agent (until it restarts)");

    let mut agent = start(false);
    let t = Instant::now();
    while !boxes(&env, &node, None).await.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the restarted agent left orphaned boxes: {:?}",
            boxes(&env, &node, None).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    for name in boxes(&env, &node, None).await {
        remove_box_behind_its_back(&env, &name).await;
    }
    env.cleanup().await;
}

/// The cases for both container runtimes.
macro_rules! containers {
    ($($name:ident),* $(,)?) => {
        mod containers {
            mod docker {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name(super::super::Kind::Docker).await
                    }
                )*
            }
            mod cri {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name(super::super::Kind::Cri).await
                    }
                )*
            }
        }
    };
}

containers!(agent_restart_reconciles_and_leaves_no_orphan, killed_agent_process_leaves_no_orphan_after_restart);

// ---------------------------------------------------------------------------
// CRI only
// ---------------------------------------------------------------------------

/// What containerd made of a session's pod sandbox and container, read back
/// through the CRI (the OCI spec runc received, the pod cgroup), and how the
/// container really runs (`ExecSync` inside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_status_shows_every_hardening_field() {
    let Some(env) = setup(Kind::Cri, "inspect", 311_900).await else { return };
    let Backend::Cri(c, cfg, containerd) = &env.backend else { unreachable!() };
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.generation = 4;
    spec.spec.cpu_millis = 500;
    spec.spec.memory_bytes = 128 << 20;
    spec.spec.pids_limit = 50;
    c.prepare(&spec).await.unwrap();
    let name = c.container_name(&id).unwrap();
    let uid = c.session_uid(&id).unwrap();
    let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
    let pods = cri_pods(containerd, &[("sandfleet.box", &name)]).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    let pod = &pods[0];
    assert_eq!(pod.labels["sandfleet.session"], id);
    assert_eq!(pod.labels["sandfleet.generation"], "4");
    assert_eq!(pod.labels["sandfleet.node"], c.config().node_id);
    assert_eq!(pod.metadata.as_ref().unwrap().namespace, "sandfleet");
    let filter = k8s_cri::v1::ContainerFilter { pod_sandbox_id: pod.id.clone(), ..Default::default() };
    let ctrs = cri
        .list_containers(k8s_cri::v1::ListContainersRequest { filter: Some(filter) })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(ctrs.len(), 1, "{ctrs:?}");
    assert_eq!(ctrs[0].state, k8s_cri::v1::ContainerState::ContainerRunning as i32);
    let cid = ctrs[0].id.clone();
    let status = cri
        .container_status(k8s_cri::v1::ContainerStatusRequest { container_id: cid.clone(), verbose: true })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).expect("verbose info json");
    let oci = &info["runtimeSpec"];
    eprintln!("OCI spec: {}", serde_json::to_string(oci).unwrap().chars().take(3000).collect::<String>());
    assert_eq!(oci["process"]["user"]["uid"], uid);
    assert_eq!(oci["process"]["user"]["gid"], uid);
    assert_ne!(uid, 0);
    assert_eq!(oci["process"]["noNewPrivileges"], true);
    for set in ["bounding", "effective", "permitted"] {
        let caps = &oci["process"]["capabilities"][set];
        assert!(caps.is_null() || caps == &serde_json::json!([]), "{set} capabilities: {caps}");
    }
    assert_eq!(oci["root"]["readonly"], true);
    let res = &oci["linux"]["resources"];
    assert_eq!(res["memory"]["limit"], 128 << 20);
    assert_eq!(res["memory"]["swap"], 128 << 20, "memory+swap must equal memory (no swap)");
    assert_eq!(res["cpu"]["quota"], 50_000);
    assert_eq!(res["cpu"]["period"], 100_000);
    assert_eq!(oci["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    assert!(!oci["linux"]["seccomp"].to_string().contains("\"ptrace\""));
    let ns = oci["linux"]["namespaces"].as_array().unwrap();
    for kind in ["pid", "network", "ipc"] {
        let n = ns.iter().find(|n| n["type"] == kind).unwrap_or_else(|| panic!("no {kind} namespace: {ns:?}"));
        assert!(n["path"].as_str().is_some_and(|p| !p.is_empty()), "the {kind} namespace is not the pod's: {n}");
    }
    let mounts = oci["mounts"].as_array().unwrap();
    for dest in ["/workspace", "/sandfleet"] {
        assert!(mounts.iter().any(|m| m["destination"] == dest), "no {dest} mount: {mounts:?}");
    }
    // CRI has no pids field: the pod cgroup carries the limit.
    let parent = cfg.cgroup_parent.as_deref().unwrap().trim_start_matches('/');
    let pids_max = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .find_map(|r| std::fs::read_to_string(Path::new(r).join(parent).join(&name).join("pids.max")).ok())
        .expect("the pod cgroup's pids.max");
    assert_eq!(pids_max.trim(), (50 + 32).to_string());

    // The container really runs that way.
    let out = cri
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; tr '\\0' ' ' </proc/1/cmdline; echo; touch /x 2>&1 || true; ls /sys/class/net".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let text = assert_hardened_inside(&out.stdout, &out.stderr, uid);
    assert!(text.contains("/pause"), "pid 1 is not the pod's pause process: {text}");
    assert!(text.contains("Read-only file system"), "{text}");
    assert_eq!(text.lines().last(), Some("lo"), "the pod has a network interface besides lo: {text}");

    // bwrap works inside it: a nested sandbox with its own pid namespace.
    let r = run(c, &id, bash("echo $$; echo kept > kept.txt")).await.unwrap();
    assert!(r.stdout.starts_with("2\n") || r.stdout.starts_with("1\n"), "not in a fresh pid namespace: {}", r.stdout);

    // A container stopped from outside is replaced on the next exec, with its workspace.
    cri.stop_container(k8s_cri::v1::StopContainerRequest { container_id: cid, timeout: 0 }).await.unwrap();
    let r = run(c, &id, bash("cat kept.txt")).await.unwrap();
    assert_eq!(r.stdout, "kept\n", "{}", r.stderr);
    env.cleanup().await;
}

/// A CRI runtime that a kubelet drives (it holds a sandbox the kubelet made)
/// is refused at start: the kubelet would kill every session's sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_refuses_a_kubelets_runtime() {
    let Some(env) = setup(Kind::Cri, "kubelet", 312_000).await else { return };
    let Backend::Cri(c, cri_cfg, containerd) = &env.backend else { unreachable!() };
    let mut cri = sandfleet_testkit::containerd::cri_client(&containerd.endpoint()).await.unwrap();
    // What a kubelet's pod sandbox looks like to the CRI: its labels.
    let name = "coredns-5d78c9869d-abcde";
    let config = k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: name.into(),
            uid: "8c3f2f57-5b4e-4d1e-9d59-4b0c6c1a2b3c".into(),
            namespace: "kube-system".into(),
            attempt: 0,
        }),
        labels: std::collections::HashMap::from([
            ("io.kubernetes.pod.uid".to_string(), "8c3f2f57-5b4e-4d1e-9d59-4b0c6c1a2b3c".to_string()),
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
        ]),
        linux: Some(k8s_cri::v1::LinuxPodSandboxConfig {
            cgroup_parent: format!("{}/kubelet-pod", cri_cfg.cgroup_parent.as_deref().unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = cri
        .run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let err = CriRuntime::new(c.config().clone(), cri_cfg.clone()).await.expect_err("a kubelet's CRI is refused");
    let msg = err.to_string();
    assert!(msg.contains("kubelet") && msg.contains(&format!("kube-system/{name}")), "{msg}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    cri.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    cri.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    env.cleanup().await;
}

/// `--cri-runtime-handler`: sessions' pod sandboxes run under the handler
/// named (gVisor's or Kata's where a node has them; here a second runc
/// handler of the test containerd), and a handler the runtime lacks fails
/// the session's prepare with the runtime's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_runtime_handler_is_used_and_a_missing_one_is_refused() {
    let Some(env) = setup(Kind::Cri, "handler", 312_100).await else { return };
    let Backend::Cri(c, cri_cfg, containerd) = &env.backend else { unreachable!() };
    let mut cfg = c.config().clone();
    cfg.node_id = format!("{}-h", cfg.node_id);
    cfg.data_dir = env._dir.path().join("handler-data");
    cfg.uid_base += 100;
    let with = |handler: &str| CriConfig { runtime_handler: handler.to_string(), ..cri_cfg.clone() };
    let rt = CriRuntime::new(cfg.clone(), with(sandfleet_testkit::containerd::ALT_HANDLER)).await.unwrap();
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let r = run(&rt, &id, bash("echo under-the-handler")).await.unwrap();
    assert_eq!(r.stdout, "under-the-handler\n", "{}", r.stderr);
    let name = rt.container_name(&id).unwrap();
    let pods = cri_pods(containerd, &[("sandfleet.box", &name)]).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].runtime_handler, sandfleet_testkit::containerd::ALT_HANDLER);
    rt.remove_all().await.unwrap();
    drop(rt);

    let rt = CriRuntime::new(cfg, with("runsc")).await.unwrap();
    let err = rt.prepare(&sandbox(&new_session_id())).await.expect_err("no runsc handler here");
    assert!(err.to_string().contains("runsc"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    assert!(rt.list().await.unwrap().is_empty(), "a failed prepare leaves nothing");
    rt.remove_all().await.unwrap();
    env.cleanup().await;
}
