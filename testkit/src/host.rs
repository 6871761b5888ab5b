//! Looking at the host from the outside: processes, session cgroups, markers.
//!
//! Tests run concurrently (nextest runs several test processes at once), so
//! every check here is scoped by something unique to the test: a random
//! [`nonce`] put in a command line, a session id, a temporary directory path.
//! Never assert on "no `sleep` process at all".

use std::path::{Path, PathBuf};

/// A random decimal string, unique enough to mark one test's processes.
/// `format!("300.{}", nonce())` is still a valid `sleep` duration.
pub fn nonce() -> String {
    use rand::Rng;
    format!("{:012}", rand::rng().random_range(0..1_000_000_000_000u64))
}

/// One live process on the host, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProcess {
    /// Host pid.
    pub pid: i32,
    /// Host parent pid.
    pub ppid: i32,
    /// State letter from `/proc/<pid>/stat` (`R`, `S`, `D`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks after boot; with the pid it names the process
    /// uniquely even when pids are reused.
    pub start_time: u64,
    /// `comm` (the executable name, at most 15 bytes).
    pub comm: String,
    /// The argument vector.
    pub cmdline: Vec<String>,
}

impl HostProcess {
    /// The command line joined with spaces.
    pub fn command(&self) -> String {
        self.cmdline.join(" ")
    }
}

/// Reads one process; `None` when it is gone or unreadable.
pub fn process(pid: i32) -> Option<HostProcess> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may contain spaces and ')'; the rest follows the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] = state (field 3), rest[1] = ppid (field 4), rest[19] = starttime (field 22).
    let state = rest.first()?.chars().next()?;
    let ppid = rest.get(1)?.parse().ok()?;
    let start_time = rest.get(19)?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline =
        raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    Some(HostProcess { pid, ppid, state, start_time, comm, cmdline })
}

/// Every process on the host that is not a zombie.
pub fn processes() -> Vec<HostProcess> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(process)
        .filter(|p| p.state != 'Z' && p.state != 'X')
        .collect()
}

/// Live (non-zombie) processes whose command line contains `needle`,
/// excluding this process.
pub fn processes_matching(needle: &str) -> Vec<HostProcess> {
    let me = std::process::id() as i32;
    processes().into_iter().filter(|p| p.pid != me && p.command().contains(needle)).collect()
}

/// Whether the process identified by `pid` and `start_time` still lives (and is not a zombie).
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    process(pid).is_some_and(|p| p.start_time == start_time && p.state != 'Z' && p.state != 'X')
}

/// Every process whose `/proc/<pid>/cgroup` mentions `needle` (e.g. a session id).
pub fn processes_in_cgroup_matching(needle: &str) -> Vec<HostProcess> {
    processes()
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).is_ok_and(|c| c.contains(needle)))
        .collect()
}

/// Roots under which the agent creates session cgroups: the v1 hierarchies it
/// uses and the v2 unified tree (either at `/sys/fs/cgroup` or at
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub const CGROUP_ROOTS: &[&str] = &[
    "/sys/fs/cgroup/memory/sandfleet",
    "/sys/fs/cgroup/pids/sandfleet",
    "/sys/fs/cgroup/cpu/sandfleet",
    "/sys/fs/cgroup/cpu,cpuacct/sandfleet",
    "/sys/fs/cgroup/freezer/sandfleet",
    "/sys/fs/cgroup/sandfleet",
    "/sys/fs/cgroup/unified/sandfleet",
];

/// Every cgroup directory under [`CGROUP_ROOTS`] whose name contains
/// `needle` (a session id), searched a few levels deep.
pub fn cgroup_dirs_matching(needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in CGROUP_ROOTS {
        walk(Path::new(root), needle, 4, &mut found);
    }
    found.sort();
    found.dedup();
    found
}

fn walk(dir: &Path, needle: &str, depth: u32, found: &mut Vec<PathBuf>) {
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(path.clone());
        }
        walk(&path, needle, depth - 1, found);
    }
}

/// The cgroup layout of this host, for messages: `"v2"`, `"v1"` or `"none"`.
pub fn cgroup_version() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
        "v1"
    } else {
        "none"
    }
}

/// Removes the cgroup trees of one node (`<root>/sandfleet/<node_id>` in every
/// hierarchy), killing anything still in them. For cleanup after a cluster
/// whose agents are stopped; a no-op when there is nothing.
pub fn remove_node_cgroups(node_id: &str) -> std::io::Result<()> {
    assert!(
        !node_id.is_empty() && !node_id.contains('/') && node_id != "." && node_id != "..",
        "bad node id {node_id:?}"
    );
    let mut first_error = None;
    for root in CGROUP_ROOTS {
        let dir = Path::new(root).join(node_id);
        if dir.is_dir() {
            if let Err(e) = remove_cgroup_tree(&dir) {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(std::io::Error::new(e.kind(), format!("removing {}: {e}", dir.display())));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
