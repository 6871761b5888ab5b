//! Real tests of the process runtime: bubblewrap, cgroups, seccomp, uids.
//!
//! They need root, /usr/bin/bwrap and writable cgroups (v1 or v2). When one
//! of those is missing each test prints `SKIPPED: <reason>` to stderr and
//! returns; anything else that goes wrong fails the test.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sandfleet_agent::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use sandfleet_agent::runtime::{Command, ExecEvent, ExecSpec, ExitInfo, Language, Runtime, RuntimeError, SandboxSpec};
use sandfleet_agent::workspace::FsError;
use sandfleet_common::ids::new_session_id;
use tokio::sync::mpsc;

/// The heavy tests (OOM, fork bomb, timeouts) are timing-sensitive on small
/// machines; run them one at a time even when the harness runs tests in parallel.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip_reason() -> Option<String> {
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
    None
}

struct Env {
    rt: ProcessRuntime,
    cfg: ProcessRuntimeConfig,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn cleanup(self) {
        self.rt.remove_all().await.expect("remove_all");
    }
}

impl Drop for Env {
    /// Best effort when a test failed half way: no process or cgroup of the
    /// test may outlive it.
    fn drop(&mut self) {
        sandfleet_agent::runtime::disk::unmount_all_under(self._dir.path());
        let cg = self.rt.cgroups();
        let root = self.rt.cgroup_root();
        for _ in 0..200 {
            cg.kill_once(root);
            if cg.remove(root).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove cgroup {root}");
    }
}

/// A fresh runtime with its own data dir, node id and uid range.
async fn setup(tag: &str, uid_base: u32) -> Option<Env> {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ProcessRuntimeConfig {
        data_dir: dir.path().join("data"),
        node_id: format!("t-{tag}-{}", std::process::id()),
        uid_base,
        slots: 8,
        bwrap_path: PathBuf::from("/usr/bin/bwrap"),
        disk_quota: Default::default(),
    };
    let t = Instant::now();
    let rt =
        ProcessRuntime::new(cfg.clone()).await.expect("ProcessRuntime::new on a host that has root, bwrap and cgroups");
    eprintln!("ProcessRuntime::new took {:?} (cgroup v{})", t.elapsed(), rt.cgroups().version());
    Some(Env { rt, cfg, _dir: dir })
}

fn sandbox(id: &str) -> SandboxSpec {
    SandboxSpec {
        session_id: id.to_string(),
        generation: 1,
        template: "default".into(),
        cpu_millis: 1000,
        memory_bytes: 256 << 20,
        pids_limit: 64,
        env: BTreeMap::new(),
        disk_bytes: 0,
        disk_inodes: 0,
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

async fn run(rt: &ProcessRuntime, id: &str, spec: ExecSpec) -> Result<Ran, RuntimeError> {
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

/// Host pids whose real uid is `uid` and whose argv is exactly `argv`.
/// Live processes of `uid` running exactly `argv`, after giving processes that were
/// just SIGKILLed up to two seconds to finish exiting (a killed process can leave its
/// cgroup a moment before its memory, and so its cmdline, is torn down).
fn host_procs(uid: u32, argv: &[&str]) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found = host_procs_now(uid, argv);
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn host_procs_now(uid: u32, argv: &[&str]) -> Vec<i32> {
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
    found
}

#[tokio::test]
async fn python_node_bash_and_exit_codes() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("basic", 300_000).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();

    let r = run(rt, &id, code(Language::Python, "print(6*7)")).await.unwrap();
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert_eq!((r.info.exit_code, r.info.signal), (0, 0));
    assert!(!r.info.timed_out && !r.info.oom_killed && !r.info.output_truncated && r.info.message.is_empty());

    let r = run(rt, &id, code(Language::Node, "console.log(6*7)")).await.unwrap();
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);

    let r = run(rt, &id, bash("echo out; echo err >&2; exit 7")).await.unwrap();
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    assert_eq!((r.info.exit_code, r.info.signal), (7, 0));

    let r = run(rt, &id, bash("kill -9 $$")).await.unwrap();
    assert_eq!((r.info.exit_code, r.info.signal), (137, 9));

    // Argv form, stdin, env, identity.
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

    // Round trip of `true`.
    let mut total = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = run(rt, &id, ExecSpec { command: Command::Argv(vec!["true".into()]), ..bash("") }).await.unwrap();
        total += t.elapsed();
        assert_eq!(r.info.exit_code, 0);
    }
    eprintln!("exec of `true` round trip: {:?} on average", total / 5);

    // Unknown session, bad input.
    let other = new_session_id();
    assert!(matches!(run(rt, &other, bash("true")).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(run(rt, "../x", bash("true")).await, Err(RuntimeError::InvalidArgument(_))));
    assert!(matches!(
        run(rt, &id, ExecSpec { command: Command::Argv(vec![]), ..bash("") }).await,
        Err(RuntimeError::InvalidArgument(_))
    ));
    env.cleanup().await;
}

#[tokio::test]
async fn workdir_files_and_large_code() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("files", 300_100).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let ws = rt.workspace(&id).unwrap();
    let uid = rt.session_uid(&id).unwrap();
    assert_eq!(uid, ws.uid());
    let chunks = futures::stream::iter(vec![Ok::<_, FsError>(Bytes::from_static(b"print('from file')\n"))]);
    ws.write_file("src/main.py", 0o644, chunks).await.unwrap();
    assert_eq!(std::fs::metadata(ws.root().join("src/main.py")).unwrap().uid(), uid);

    let mut spec = ExecSpec { command: Command::Argv(vec!["python3".into(), "main.py".into()]), ..bash("") };
    spec.workdir = "src".into();
    let r = run(rt, &id, spec).await.unwrap();
    assert_eq!(r.stdout, "from file\n", "{}", r.stderr);

    // Files written by the sandbox are the session's and visible to the file API.
    let r =
        run(rt, &id, bash("mkdir -p out && echo hi > out/x.txt && touch /usr/x 2>/dev/null || echo ro")).await.unwrap();
    assert_eq!(r.stdout, "ro\n");
    let entries = ws.list("out").await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(std::fs::metadata(ws.root().join("out/x.txt")).unwrap().uid(), uid);

    for bad in ["../", "/etc", "nope", "src/main.py"] {
        let mut spec = bash("pwd");
        spec.workdir = bad.into();
        assert!(matches!(run(rt, &id, spec).await, Err(RuntimeError::InvalidArgument(_))), "workdir {bad}");
    }

    // Code larger than one kernel argv string goes through a file.
    let big = format!("#{}\nprint('big', len(open('/run/sandfleet/code').read()))\n", "x".repeat(200_000));
    let r = run(rt, &id, code(Language::Python, &big)).await.unwrap();
    assert_eq!(r.stdout, format!("big {}\n", big.len()), "{}", r.stderr);
    env.cleanup().await;
}

#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("timeout", 300_200).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let uid = rt.session_uid(&id).unwrap();
    let mut spec = bash("sleep 100 & sleep 100");
    spec.timeout = Duration::from_millis(500);
    let t = Instant::now();
    let r = run(rt, &id, spec).await.unwrap();
    let took = t.elapsed();
    assert!(r.info.timed_out, "{:?}", r.info);
    assert_eq!((r.info.exit_code, r.info.signal), (137, 9));
    assert_eq!(r.info.message, "timed out after 0.5s (timeout_ms limit)");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let cg = rt.session_cgroup(&id);
    assert!(rt.cgroups().pids_recursive(&cg).unwrap().is_empty(), "processes left in the session cgroup");
    assert!(rt.cgroups().descendants(&cg).is_empty(), "exec cgroup left behind");
    assert!(host_procs(uid, &["sleep", "100"]).is_empty(), "a `sleep 100` of uid {uid} survived");

    // Caller going away kills the command too.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let t = Instant::now();
    let info = rt.exec(&id, bash("sleep 100"), tx).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(info.message.contains("cancelled"), "{info:?}");
    assert!(host_procs(uid, &["sleep", "100"]).is_empty());

    // Dropping the exec future (a cancelled RPC) kills the tree and removes the exec cgroup.
    let (tx, mut rx) = mpsc::channel(8);
    let (rt2, id2) = (rt.clone(), id.clone());
    let task = tokio::spawn(async move { rt2.exec(&id2, bash("echo started; sleep 100"), tx).await });
    assert!(matches!(rx.recv().await, Some(ExecEvent::Stdout(_))));
    task.abort();
    let _ = task.await;
    let t = Instant::now();
    while !(rt.cgroups().pids_recursive(&cg).unwrap().is_empty() && rt.cgroups().descendants(&cg).is_empty()) {
        assert!(t.elapsed() < Duration::from_secs(5), "an aborted exec left processes or its cgroup behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(host_procs(uid, &["sleep", "100"]).is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn memory_limit_oom_kills() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("oom", 300_300).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.memory_bytes = 64 << 20;
    rt.prepare(&spec).await.unwrap();
    let r = run(rt, &id, code(Language::Python, "x = b'a' * (300 * 1024 * 1024)\nprint('survived', len(x))"))
        .await
        .unwrap();
    assert!(r.info.oom_killed, "{:?} stdout={} stderr={}", r.info, r.stdout, r.stderr);
    assert!(!r.stdout.contains("survived"));
    assert_eq!(r.info.signal, 9);
    assert!(r.info.message.contains("67108864") && r.info.message.contains("64Mi"), "{}", r.info.message);
    // The session still works afterwards and the next exec is not blamed.
    let r = run(rt, &id, code(Language::Python, "print(1)")).await.unwrap();
    assert_eq!(r.stdout, "1\n");
    assert!(!r.info.oom_killed);
    env.cleanup().await;
}

#[tokio::test]
async fn fork_bomb_is_held_by_the_pids_limit() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("forkbomb", 300_400).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.pids_limit = 16;
    rt.prepare(&spec).await.unwrap();
    // The main shell must stay alive: when it exits, the sandbox's pid
    // namespace (and so the whole bomb) dies with it.
    let mut spec = bash("bomb() { bomb | bomb & }; bomb; sleep 100");
    spec.timeout = Duration::from_secs(3);
    let t = Instant::now();
    let r = run(rt, &id, spec).await.unwrap();
    eprintln!("fork bomb ended after {:?}: {:?}", t.elapsed(), r.info);
    assert!(t.elapsed() < Duration::from_secs(15));
    let cg = rt.session_cgroup(&id);
    assert!(r.info.timed_out);
    assert!(
        r.info.message.contains("pids limit of 16 (pids_limit)"),
        "pids.max never refused a fork: {}",
        r.info.message
    );
    let peak = rt.cgroups().dir("pids", &cg).join("pids.peak");
    if let Ok(p) = std::fs::read_to_string(&peak) {
        let p: u64 = p.trim().parse().unwrap();
        assert!(p <= 16, "pids.peak {p} exceeded the limit");
    }
    assert!(rt.cgroups().pids_recursive(&cg).unwrap().is_empty());
    // The node is fine: the session runs commands again at once.
    let t = Instant::now();
    let r = run(rt, &id, bash("echo alive")).await.unwrap();
    assert_eq!(r.stdout, "alive\n");
    assert!(t.elapsed() < Duration::from_secs(5));
    env.cleanup().await;
}

#[tokio::test]
async fn no_network() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("net", 300_500).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let py = format!(
        r#"
import socket
for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
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
    assert_eq!(r.stdout.matches("blocked").count(), 3, "{} {}", r.stdout, r.stderr);
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the host listener saw a connection");
    env.cleanup().await;
}

#[tokio::test]
async fn host_files_are_invisible() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("hostfs", 300_600).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let data_dir = rt.config().data_dir.display().to_string();
    let script = format!(
        r#"
for p in /root /home /var /run/user /sys /etc/shadow /etc/sudoers /etc/ssh "{data_dir}" /work /tmp/bash_jobs.0 /proc/1/root/etc/shadow; do
  if [ -e "$p" ] || ls "$p" >/dev/null 2>&1; then echo "VISIBLE $p"; fi
done
cat /etc/shadow 2>/dev/null && echo READ-SHADOW
grep -c . /etc/passwd
ls /
ps -e -o pid= | wc -l
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
    let r = r.unwrap();
    assert!(r.stdout.contains("fds: 0 1 2 3 \n"), "fds leaked into the sandbox: {}", r.stdout);
    assert!(!r.stdout.contains("VISIBLE") && !r.stdout.contains("READ-SHADOW"), "{}", r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "3", "the sandbox /etc/passwd is not the agent's: {}", r.stdout);
    assert!(r.stdout.contains("CapEff:\t0000000000000000"), "{}", r.stdout);
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
    assert!(r.stdout.contains("Seccomp:\t2"), "{}", r.stdout);
    eprintln!("sandbox view: {}", r.stdout.replace('\n', " | "));
    env.cleanup().await;
}

#[tokio::test]
async fn sessions_cannot_read_each_other() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("cross", 300_700).await else { return };
    let rt = &env.rt;
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

#[tokio::test]
async fn seccomp_denies_dangerous_syscalls() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("seccomp", 300_800).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
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
    let eperm = libc::EPERM;
    for name in ["ptrace", "unshare", "mount", "keyctl"] {
        assert!(r.stdout.contains(&format!("{name} -1 {eperm}\n")), "{name}: {} {}", r.stdout, r.stderr);
    }
    // Threads still work (clone3 -> ENOSYS falls back to clone).
    let r = run(
        rt,
        &id,
        code(
            Language::Python,
            "import threading\nt=threading.Thread(target=print, args=('thread ok',))\nt.start(); t.join()",
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.stdout, "thread ok\n", "{}", r.stderr);
    env.cleanup().await;
}

#[tokio::test]
async fn output_cap_truncates_and_kills() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("cap", 300_900).await else { return };
    let rt = &env.rt;
    let id = new_session_id();
    rt.prepare(&sandbox(&id)).await.unwrap();
    let mut spec = bash("yes");
    spec.output_cap = 100_000;
    let r = run(rt, &id, spec).await.unwrap();
    assert_eq!(r.stdout.len(), 100_000);
    assert!(r.chunks >= 2);
    assert!(r.info.output_truncated);
    assert_eq!(r.info.message, "output exceeded the limit of 100000 bytes");
    assert!(rt.cgroups().pids_recursive(&rt.session_cgroup(&id)).unwrap().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn prepare_is_idempotent_and_destroy_removes_everything() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("destroy", 301_000).await else { return };
    let rt = &env.rt;
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
    let info = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
    assert_ne!(info.exit_code, 0);
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

#[tokio::test]
async fn restart_kills_leftovers_and_rediscovers_sessions() {
    let _g = SERIAL.lock().await;
    let Some(env) = setup("restart", 301_100).await else { return };
    let rt = env.rt.clone();
    let id = new_session_id();
    let mut spec = sandbox(&id);
    spec.generation = 7;
    spec.env.insert("FROM_SESSION".into(), "yes".into());
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
    assert_eq!(rt.cgroups().pids_recursive(&cg).unwrap(), vec![leaked.id() as i32]);
    drop(rt);

    let t = Instant::now();
    let rt = ProcessRuntime::new(env.cfg.clone()).await.unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    let st = leaked.wait().unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(st.signal(), Some(9), "the leftover process was not killed");
    assert!(!rt.cgroups().exists(&leaf), "exec cgroup left behind");
    let l = rt.list().await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].session_id.as_str(), l[0].generation), (id.as_str(), 7));
    assert_eq!(rt.session_uid(&id), Some(uid));
    let r = run(&rt, &id, bash("cat kept.txt; echo $FROM_SESSION")).await.unwrap();
    assert_eq!(r.stdout, "keep\nyes\n", "{}", r.stderr);
    rt.remove_all().await.unwrap();
    assert!(!rt.cgroups().exists(rt.cgroup_root()));
}
