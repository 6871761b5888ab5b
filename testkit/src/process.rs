//! Supervision of one Sandfleet process ([`Proc`]): start it, wait for its
//! typed ready line, signal, kill, terminate and restart it, and keep its log.
//!
//! Every process is started with `--listen <its address>:0`; its ready line
//! ([`ReadyLine`], e.g. `{"ready":"agent","node_id":"n1","addr":"..."}` on
//! stdout) tells the harness the address it got, and from then on the address
//! is pinned: a restart passes `--listen <that address>` so that peers, agents
//! and placed sessions that remember it still reach the process. A process in
//! a network namespace is started through `nsenter` and comes back in the same
//! namespace.
//!
//! stderr goes to `<cluster dir>/<name>.log`, and anything printed on stdout
//! after the ready line is appended there as `[stdout] ...`.
//!
//! Children get `PR_SET_PDEATHSIG = SIGKILL`, so a harness that is itself
//! killed does not leave coordinators and agents behind. The signal follows
//! the *thread* that spawned the child: start and restart processes from the
//! test's own task (not from a `spawn_blocking` thread, which may exit).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sandfleet_common::ready::ReadyLine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::netns::NetHost;

/// How long a process may take to print its ready line.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM before the harness calls it hung.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How many log lines are printed per process when a test fails.
pub const LOG_TAIL_LINES: usize = 80;

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `sandfleet-coordinator`.
    Coordinator,
    /// `sandfleet-agent`.
    Agent,
}

impl Role {
    fn ready_tag(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
        }
    }
}

/// One started Sandfleet process.
pub struct Proc {
    /// Coordinator or agent.
    pub role: Role,
    /// Log name: `coordinator-1`, `agent-n1`.
    pub name: String,
    /// Raft id (coordinators) or node id (agents), as given on the command line.
    pub id: String,
    /// The gRPC address it serves on (`10.X.Y.N:port` in its namespace, or
    /// `127.0.0.1:port` on loopback), from its ready line.
    pub addr: String,
    /// Its network namespace, when the cluster runs in namespaces.
    pub netns: Option<NetHost>,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
    /// Its command-line arguments (without the program). After the first
    /// start `--listen` holds the bound address, so restarts keep it.
    pub args: Vec<String>,
    /// Where its stderr (and stdout after the ready line) goes.
    pub log_path: PathBuf,
    /// The ready line of the latest start (`None` before the first).
    pub ready: Option<ReadyLine>,
    /// How many times it has been started.
    pub starts: u32,
    program: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("pid", &self.pid())
            .field("data_dir", &self.data_dir)
            .field("log_path", &self.log_path)
            .finish()
    }
}

impl Proc {
    pub(crate) fn new(
        role: Role,
        id: String,
        program: PathBuf,
        args: Vec<String>,
        data_dir: PathBuf,
        dir: &Path,
        env: Vec<(String, String)>,
    ) -> Self {
        let name = match role {
            Role::Coordinator => format!("coordinator-{id}"),
            Role::Agent => format!("agent-{id}"),
        };
        let log_path = dir.join(format!("{name}.log"));
        Proc {
            role,
            name,
            id,
            addr: String::new(),
            netns: None,
            data_dir,
            args,
            log_path,
            ready: None,
            starts: 0,
            program,
            env,
            child: None,
            last_exit: None,
        }
    }

    /// The host pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process is running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.last_exit = Some(status);
                self.child = None;
                false
            }
            Some(Err(_)) => true,
            None => false,
        }
    }

    /// How the previous run ended, once it has.
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("{} is not running", self.name))?;
        kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("sending {sig} to {}", self.name))
    }

    /// Starts the process and waits for its ready line.
    pub(crate) async fn launch(&mut self, ready_timeout: Duration) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let netns_prefix =
            self.netns.as_ref().map(|h| format!("nsenter --net={} ", h.ns_path().display())).unwrap_or_default();
        let _ = writeln!(
            log,
            "===== harness: start #{} of {}: {netns_prefix}{} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args.join(" ")
        );
        // nsenter joins the namespace and execs the binary: same pid, so
        // signals and PR_SET_PDEATHSIG reach the binary itself.
        let mut cmd = match &self.netns {
            Some(h) => {
                let mut c = Command::new(crate::netns::nsenter());
                c.arg(format!("--net={}", h.ns_path().display())).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?))
            .env("RUST_LOG", child_log_filter())
            .env("RUST_BACKTRACE", "1")
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning {} ({})", self.name, self.program.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();

        let read_ready = async {
            while let Some(line) = lines.next_line().await? {
                let _ = writeln!(log, "[stdout] {line}");
                if let Some(ready) = ReadyLine::parse(&line) {
                    return Ok::<_, std::io::Error>(Some((line, ready)));
                }
            }
            Ok(None)
        };
        let outcome = tokio::time::timeout(ready_timeout, read_ready).await;
        let (line, ready) = match outcome {
            Ok(Ok(Some(read))) => read,
            other => {
                let why = match other {
                    Err(_) => format!("did not print its ready line within {ready_timeout:?}"),
                    Ok(Err(e)) => format!("stdout could not be read: {e}"),
                    _ => "closed stdout without printing a ready line".to_string(),
                };
                let _ = child.start_kill();
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let status = match status {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "no exit status".to_string(),
                };
                bail!(
                    "{} {why} ({status}).\ncommand: {netns_prefix}{} {}\nlast log lines ({}):\n{}",
                    self.name,
                    self.program.display(),
                    self.args.join(" "),
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
        };

        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "[stdout] {line}");
            }
        });

        let ready = match check_ready(self.role, &self.id, ready) {
            Ok(ready) => ready,
            Err(why) => {
                let _ = child.start_kill();
                bail!("{} printed ready line {line} {why}", self.name);
            }
        };
        let addr = ready.addr().to_string();
        if !self.addr.is_empty() && self.addr != addr {
            let _ = child.start_kill();
            bail!("{} came back on {addr}, not on its pinned address {}", self.name, self.addr);
        }
        self.addr = addr.clone();
        pin_listen(&mut self.args, &addr);
        self.ready = Some(ready);
        self.child = Some(child);
        self.last_exit = None;
        Ok(())
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("{} is not running", self.name))?;
        child.start_kill().with_context(|| format!("killing {}", self.name))?;
        let status = child.wait().await.with_context(|| format!("reaping {}", self.name))?;
        self.note(&format!("SIGKILL -> {status}"));
        self.last_exit = Some(status);
        Ok(status)
    }

    /// SIGTERM, then wait up to [`TERMINATE_TIMEOUT`] for a clean exit. A
    /// process that does not exit in time is killed and reported as an error.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        let mut child = self.child.take().expect("signal() checked it runs");
        match tokio::time::timeout(TERMINATE_TIMEOUT, child.wait()).await {
            Ok(status) => {
                let status = status.with_context(|| format!("reaping {}", self.name))?;
                self.note(&format!("SIGTERM -> {status}"));
                self.last_exit = Some(status);
                Ok(status)
            }
            Err(_) => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                self.last_exit = status;
                self.note("SIGTERM ignored; killed");
                bail!(
                    "{} did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM (killed it).\nlast log lines:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL_LINES)
                )
            }
        }
    }

    /// Stops without async: SIGTERM, poll up to `grace`, then SIGKILL. For `Drop`.
    pub(crate) fn stop_blocking(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn note(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "===== harness: {}: {what}", self.name);
        }
    }
}

/// Checks a ready line against the process that printed it: its role and its
/// id (Raft id or node id, as given on the command line). The error says what
/// is wrong, to follow "printed ready line <line> ".
fn check_ready(
    role: Role,
    id: &str,
    ready: Result<ReadyLine, serde_json::Error>,
) -> std::result::Result<ReadyLine, String> {
    let ready = ready.map_err(|e| format!("that is malformed: {e}"))?;
    match (role, &ready) {
        (Role::Agent, ReadyLine::Agent { node_id, .. }) if node_id != id => {
            Err(format!("with node_id {node_id:?}, expected {id:?}"))
        }
        (Role::Coordinator, ReadyLine::Coordinator { id: got, .. }) if got.to_string() != id => {
            Err(format!("with id {got}, expected {id}"))
        }
        (Role::Agent, ReadyLine::Agent { .. }) | (Role::Coordinator, ReadyLine::Coordinator { .. }) => Ok(ready),
        _ => Err(format!("but \"ready\" should be {:?}", role.ready_tag())),
    }
}

pub(crate) fn pin_listen(args: &mut [String], addr: &str) {
    if let Some(i) = args.iter().position(|a| a == "--listen") {
        if let Some(v) = args.get_mut(i + 1) {
            *v = addr.to_string();
        }
    }
}

fn child_log_filter() -> String {
    std::env::var("SANDFLEET_CHILD_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| "info".to_string())
}

fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let window = 256 * 1024;
    if len > window {
        let _ = f.seek(SeekFrom::Start(len - window));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
