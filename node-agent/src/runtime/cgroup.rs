//! cgroup v1 and v2 management behind one enum, in the spirit of youki's
//! `AnyCgroupManager`.
//!
//! Every cgroup is named by a path relative to the hierarchy root, like
//! `sandfleet/<node>/<session>/exec-3`. On v1 the same relative path exists
//! under each controller the runtime needs (memory, cpu, pids); on v2 it
//! exists once under the unified root, with the controllers enabled in the
//! parents' `cgroup.subtree_control`.
//!
//! Only the layout and the limits are here; which cgroup a session or an
//! exec gets is decided by [`super::process`].

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

use super::RuntimeError;

/// Where cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers the runtime needs, in the order processes join them.
pub const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// CFS period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Resource limits of a session cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes; swap is not allowed on top.
    pub memory_bytes: u64,
    /// CPU limit in millicores.
    pub cpu_millis: u32,
    /// Maximum processes and threads.
    pub pids_limit: u32,
}

/// cgroup v1: one hierarchy per controller.
#[derive(Debug, Clone)]
pub struct V1Manager {
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    /// The cpuacct hierarchy when it is mounted apart from cpu (the usual
    /// layout co-mounts them, and then `cpu` has the cpuacct files): sessions
    /// join it too, so their CPU time can be read ([`AnyCgroupManager::usage`]).
    cpuacct: Option<PathBuf>,
}

/// What a cgroup (with its descendants) uses, as [`AnyCgroupManager::usage`] reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time used since the cgroup was made, nanoseconds; `None` when this
    /// host's cgroups do not account it (v1 without a cpuacct controller).
    pub cpu_nanos: Option<u64>,
    /// Memory in use now, bytes: the charge less the inactive file cache.
    pub memory_bytes: u64,
}

/// cgroup v2: one unified hierarchy.
#[derive(Debug, Clone)]
pub struct V2Manager {
    root: PathBuf,
}

/// A cgroup manager for whichever version the host runs.
#[derive(Debug, Clone)]
pub enum AnyCgroupManager {
    /// Legacy or hybrid hierarchy.
    V1(V1Manager),
    /// Unified hierarchy.
    V2(V2Manager),
}

fn unavailable(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Unavailable(msg.into())
}

fn ctx(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(|e| ctx(path, "opening", e))?;
    f.write_all(value.as_bytes()).map_err(|e| ctx(path, &format!("writing {value:?} to"), e))
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ctx(path, "creating cgroup", e)),
    }
}

/// Reads `key N` from a flat-keyed cgroup file (memory.events, pids.events, memory.oom_control).
fn read_key(path: &Path, key: &str) -> io::Result<u64> {
    let text = fs::read_to_string(path).map_err(|e| ctx(path, "reading", e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0))
}

fn read_pids(procs: &Path) -> io::Result<Vec<i32>> {
    match fs::read_to_string(procs) {
        Ok(t) => Ok(t.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(ctx(procs, "reading", e)),
    }
}

/// Child cgroup directories of `dir`, recursively, deepest first, as paths relative to `base`.
fn descendants_of(base: &Path, rel: &str, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(base.join(rel)) else { return };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for n in names {
        let child = format!("{rel}/{n}");
        descendants_of(base, &child, out);
        out.push(child);
    }
}

fn rmdir(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ctx(path, "removing cgroup", e)),
    }
}

/// SIGKILLs `pid` if it is still in cgroup `rel`, through a pidfd so a
/// recycled pid is never hit. Returns whether a signal was sent.
fn kill_if_member(pid: i32, rel: &str) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: plain syscall with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSYS) {
            // Old kernel: plain kill (the pid was just read from cgroup.procs).
            // SAFETY: kill with integer arguments.
            return unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
        }
        return false;
    }
    let pidfd = pidfd as i32;
    // The pidfd pins the process the pid named when it was opened; check that one is ours.
    let member = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|t| {
            t.lines().any(|l| {
                let path = l.splitn(3, ':').nth(2).unwrap_or("");
                path.trim_end_matches('/').ends_with(&format!("/{rel}"))
            })
        })
        .unwrap_or(false);
    let sent = member
        // SAFETY: pidfd_send_signal on the pidfd we own, no siginfo.
        && unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) } == 0;
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(pidfd) };
    sent
}

/// A process's cgroup from its `/proc/PID/cgroup` text: the v1 memory
/// hierarchy's path, else the v2 line's (as written there, with a leading `/`).
pub fn proc_cgroup_path(text: &str) -> Option<String> {
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if controllers.split(',').any(|c| c == "memory") {
            return Some(path.to_string());
        }
        if controllers.is_empty() {
            v2 = Some(path.to_string());
        }
    }
    v2
}

impl AnyCgroupManager {
    /// Detects the host's cgroup layout under [`CGROUP_ROOT`].
    pub fn detect() -> Result<Self, RuntimeError> {
        Self::detect_at(Path::new(CGROUP_ROOT))
    }

    /// Detects the cgroup layout under `root`: v2 when `root/cgroup.controllers`
    /// exists, else v1 with memory, cpu and pids hierarchies under `root`.
    pub fn detect_at(root: &Path) -> Result<Self, RuntimeError> {
        let controllers = root.join("cgroup.controllers");
        if controllers.exists() {
            let text = fs::read_to_string(&controllers)
                .map_err(|e| unavailable(format!("cannot read {}: {e}", controllers.display())))?;
            let have: BTreeSet<&str> = text.split_whitespace().collect();
            let missing: Vec<&str> = ["memory", "cpu", "pids"].into_iter().filter(|c| !have.contains(c)).collect();
            if !missing.is_empty() {
                return Err(unavailable(format!(
                    "cgroup v2 at {} lacks the controllers {} (available: {:?}); the process runtime needs memory, cpu and pids",
                    root.display(),
                    missing.join(", "),
                    text.trim()
                )));
            }
            return Ok(Self::V2(V2Manager { root: root.to_path_buf() }));
        }
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            let dir = root.join(c);
            if !dir.join("cgroup.procs").exists() {
                return Err(unavailable(format!(
                    "no usable cgroups: {} has no cgroup.controllers (not v2) and {} is not a mounted cgroup v1 {c} hierarchy",
                    root.display(),
                    dir.display()
                )));
            }
            dirs.push(dir);
        }
        let [memory, cpu, pids]: [PathBuf; 3] =
            dirs.try_into().map_err(|_| RuntimeError::Internal("controller count".into()))?;
        let cpuacct = root.join("cpuacct");
        let cpuacct = (!cpu.join("cpuacct.usage").exists()
            && cpuacct.join("cpuacct.usage").exists()
            && cpuacct.join("cgroup.procs").exists())
        .then_some(cpuacct);
        Ok(Self::V1(V1Manager { memory, cpu, pids, cpuacct }))
    }

    /// 1 or 2.
    pub fn version(&self) -> u32 {
        match self {
            Self::V1(_) => 1,
            Self::V2(_) => 2,
        }
    }

    /// The hierarchy roots (one per v1 controller, or the v2 root).
    fn bases(&self) -> Vec<&Path> {
        match self {
            Self::V1(m) => {
                [&m.memory, &m.cpu, &m.pids].into_iter().map(PathBuf::as_path).chain(m.cpuacct.as_deref()).collect()
            }
            Self::V2(m) => vec![&m.root],
        }
    }

    /// The directory of `rel` in the hierarchy holding `controller`
    /// ("memory", "cpu" or "pids"; any name on v2).
    pub fn dir(&self, controller: &str, rel: &str) -> PathBuf {
        match self {
            Self::V1(m) => match controller {
                "cpu" => m.cpu.join(rel),
                "pids" => m.pids.join(rel),
                _ => m.memory.join(rel),
            },
            Self::V2(m) => m.root.join(rel),
        }
    }

    /// Creates `rel` and its ancestors, enabling the controllers on the way
    /// (v2) so that children of `rel` can be limited.
    pub fn ensure_root(&self, rel: &str) -> Result<(), RuntimeError> {
        match self {
            Self::V1(m) => {
                for base in self.bases() {
                    let mut p = base.to_path_buf();
                    for comp in rel.split('/').filter(|c| !c.is_empty()) {
                        p.push(comp);
                        mkdir(&p).map_err(|e| unavailable(format!("cgroups are not writable: {e}")))?;
                    }
                }
                // Hierarchical accounting is the default on current kernels; ask for it on old ones.
                let uh = m.memory.join(rel).join("memory.use_hierarchy");
                if fs::read_to_string(&uh).map(|v| v.trim() == "0").unwrap_or(false) {
                    if let Err(e) = write_file(&uh, "1") {
                        warn!(error = %e, "could not enable memory.use_hierarchy");
                    }
                }
                Ok(())
            }
            Self::V2(m) => {
                let mut p = m.root.clone();
                enable_v2_controllers(&p, true)?;
                for comp in rel.split('/').filter(|c| !c.is_empty()) {
                    p.push(comp);
                    mkdir(&p).map_err(|e| unavailable(format!("cgroups are not writable: {e}")))?;
                    enable_v2_controllers(&p, false)?;
                }
                Ok(())
            }
        }
    }

    /// Creates cgroup `rel` (its parent must exist). Ok if it exists.
    pub fn create(&self, rel: &str) -> io::Result<()> {
        for base in self.bases() {
            mkdir(&base.join(rel))?;
        }
        Ok(())
    }

    /// Whether cgroup `rel` exists (in every hierarchy).
    pub fn exists(&self, rel: &str) -> bool {
        self.bases().iter().all(|b| b.join(rel).is_dir())
    }

    /// Sets memory (no swap), CPU and pids limits on `rel`.
    pub fn set_limits(&self, rel: &str, l: &Limits) -> io::Result<()> {
        let quota = u64::from(l.cpu_millis) * CPU_PERIOD_US / 1000;
        match self {
            Self::V1(m) => {
                let mem = m.memory.join(rel);
                let limit = l.memory_bytes.to_string();
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    // memsw must stay >= the memory limit: order the writes by direction.
                    if write_file(&mem.join("memory.limit_in_bytes"), &limit).is_err() {
                        write_file(&memsw, &limit)?;
                        write_file(&mem.join("memory.limit_in_bytes"), &limit)?;
                    } else {
                        write_file(&memsw, &limit)?;
                    }
                } else {
                    write_file(&mem.join("memory.limit_in_bytes"), &limit)?;
                    // No swap accounting on this kernel: at least keep the kernel from swapping us.
                    if let Err(e) = write_file(&mem.join("memory.swappiness"), "0") {
                        warn!(error = %e, "memory.memsw is unavailable and memory.swappiness could not be set; swap cannot be excluded");
                    }
                }
                let cpu = m.cpu.join(rel);
                write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write_file(&m.pids.join(rel).join("pids.max"), &l.pids_limit.to_string())?;
            }
            Self::V2(m) => {
                let d = m.root.join(rel);
                write_file(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write_file(&swap, "0")?;
                } else {
                    warn!("memory.swap.max is unavailable (no swap accounting); swap cannot be excluded");
                }
                write_file(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                write_file(&d.join("pids.max"), &l.pids_limit.to_string())?;
            }
        }
        Ok(())
    }

    /// Sets only `pids.max` on `rel`.
    pub fn set_pids_max(&self, rel: &str, max: u64) -> io::Result<()> {
        match self {
            Self::V1(m) => write_file(&m.pids.join(rel).join("pids.max"), &max.to_string()),
            Self::V2(m) => write_file(&m.root.join(rel).join("pids.max"), &max.to_string()),
        }
    }

    /// The `cgroup.procs` files a process writes "0" to in order to join `rel`.
    pub fn procs_files(&self, rel: &str) -> Vec<PathBuf> {
        self.bases().iter().map(|b| b.join(rel).join("cgroup.procs")).collect()
    }

    /// Descendant cgroups of `rel` (relative paths), deepest first.
    pub fn descendants(&self, rel: &str) -> Vec<String> {
        let mut all = BTreeSet::new();
        let mut ordered = Vec::new();
        for base in self.bases() {
            let mut v = Vec::new();
            descendants_of(base, rel, &mut v);
            for d in v {
                if all.insert(d.clone()) {
                    ordered.push(d);
                }
            }
        }
        // Deepest first across hierarchies.
        ordered.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        ordered
    }

    /// The processes directly in `rel` (union over hierarchies).
    pub fn pids(&self, rel: &str) -> io::Result<Vec<i32>> {
        let mut set = BTreeSet::new();
        for base in self.bases() {
            set.extend(read_pids(&base.join(rel).join("cgroup.procs"))?);
        }
        Ok(set.into_iter().collect())
    }

    /// The processes in `rel` and all its descendants.
    pub fn pids_recursive(&self, rel: &str) -> io::Result<Vec<i32>> {
        let mut set = BTreeSet::new();
        for d in self.descendants(rel).iter().map(String::as_str).chain([rel]) {
            set.extend(self.pids(d)?);
        }
        Ok(set.into_iter().collect())
    }

    /// One pass of SIGKILL over every process in `rel` and its descendants.
    /// Synchronous and bounded, for use from a kill callback. Returns how
    /// many processes were found.
    pub fn kill_once(&self, rel: &str) -> usize {
        let mut found = 0;
        for d in self.descendants(rel).iter().map(String::as_str).chain([rel]) {
            if let Self::V2(m) = self {
                let kill = m.root.join(d).join("cgroup.kill");
                if kill.exists() {
                    found += self.pids(d).map(|p| p.len()).unwrap_or(0);
                    if write_file(&kill, "1").is_ok() {
                        continue;
                    }
                }
            }
            for pid in self.pids(d).unwrap_or_default() {
                found += 1;
                kill_if_member(pid, d);
            }
        }
        found
    }

    /// Kills every process in `rel` and its descendants, until none is left
    /// or `timeout` passes.
    pub async fn kill_all(&self, rel: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.kill_once(rel);
            let left = self.pids_recursive(rel)?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Internal(format!(
                    "processes {left:?} are still in cgroup {rel} after {timeout:?} of SIGKILL"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Removes `rel` and its descendants (deepest first). Ok if absent. The
    /// cgroups must have no processes left.
    pub fn remove(&self, rel: &str) -> io::Result<()> {
        for d in self.descendants(rel).iter().map(String::as_str).chain([rel]) {
            for base in self.bases() {
                rmdir(&base.join(d))?;
            }
        }
        Ok(())
    }

    /// Kills everything in `rel` and removes it, retrying while the kernel
    /// still reports the cgroup busy.
    pub async fn destroy(&self, rel: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let killed = self.kill_all(rel, timeout).await;
            match self.remove(rel) {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    debug!(cgroup = rel, "cgroup still busy; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    killed?;
                    return Err(e.into());
                }
            }
        }
    }

    /// The OOM-kill counter of `rel`: hierarchical on v2 (`memory.events`),
    /// this cgroup only on v1 (`memory.oom_control`). 0 if absent.
    pub fn oom_kills(&self, rel: &str) -> u64 {
        let path = match self {
            Self::V1(m) => m.memory.join(rel).join("memory.oom_control"),
            Self::V2(m) => m.root.join(rel).join("memory.events"),
        };
        read_key(&path, "oom_kill").unwrap_or(0)
    }

    /// What `rel` and its descendants use now: their CPU time so far and
    /// their memory. Err (NotFound) when `rel` does not exist. On v1 the CPU
    /// time is the cpuacct controller's (co-mounted with cpu, or apart);
    /// memory is `usage_in_bytes` (v1) or `memory.current` (v2) less the
    /// inactive file cache, as `docker stats` counts it.
    pub fn usage(&self, rel: &str) -> io::Result<CgroupUsage> {
        let read_u64 = |path: PathBuf| -> io::Result<u64> {
            let text = fs::read_to_string(&path).map_err(|e| ctx(&path, "reading", e))?;
            text.trim()
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
        };
        match self {
            Self::V1(m) => {
                let mem = m.memory.join(rel);
                let charged = read_u64(mem.join("memory.usage_in_bytes"))?;
                let inactive = read_key(&mem.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                let acct = m.cpuacct.as_ref().unwrap_or(&m.cpu).join(rel).join("cpuacct.usage");
                let cpu_nanos = match read_u64(acct) {
                    Ok(n) => Some(n),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                Ok(CgroupUsage { cpu_nanos, memory_bytes: charged.saturating_sub(inactive) })
            }
            Self::V2(m) => {
                let d = m.root.join(rel);
                let usage_usec = read_key(&d.join("cpu.stat"), "usage_usec")?;
                let charged = read_u64(d.join("memory.current"))?;
                let inactive = read_key(&d.join("memory.stat"), "inactive_file").unwrap_or(0);
                Ok(CgroupUsage {
                    cpu_nanos: Some(usage_usec.saturating_mul(1000)),
                    memory_bytes: charged.saturating_sub(inactive),
                })
            }
        }
    }

    /// `pids.events` "max" of `rel`: on v2 the forks refused because `rel`
    /// (or a descendant) was at its limit; on v1 the forks refused to
    /// processes *in* `rel`, whichever ancestor's limit was hit.
    pub fn pids_max_events(&self, rel: &str) -> u64 {
        read_key(&self.dir("pids", rel).join("pids.events"), "max").unwrap_or(0)
    }
}

/// Enables memory, cpu and pids for the children of `dir`. At the root of
/// a cgroup namespace that holds processes (a container), v2's
/// no-internal-process rule refuses that; then the processes are moved to a
/// leaf `init` first, as container inits do.
fn enable_v2_controllers(dir: &Path, is_root: bool) -> Result<(), RuntimeError> {
    let sc = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&sc).unwrap_or_default();
    let need: Vec<&str> =
        ["memory", "cpu", "pids"].into_iter().filter(|c| !current.split_whitespace().any(|x| x == *c)).collect();
    if need.is_empty() {
        return Ok(());
    }
    let value = need.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    match write_file(&sc, &value) {
        Ok(()) => Ok(()),
        Err(e) if is_root && e.raw_os_error() == Some(libc::EBUSY) => {
            let init = dir.join("init");
            warn!(cgroup = %dir.display(), "cgroup v2 root holds processes; moving them to {} to enable controllers", init.display());
            mkdir(&init).map_err(|e| unavailable(format!("cgroups are not writable: {e}")))?;
            let procs = read_pids(&dir.join("cgroup.procs")).map_err(|e| unavailable(e.to_string()))?;
            for pid in procs {
                // Kernel threads cannot move; ignore them.
                let _ = write_file(&init.join("cgroup.procs"), &pid.to_string());
            }
            write_file(&sc, &value).map_err(|e| {
                unavailable(format!(
                    "cannot enable {value} in {}: {e} (cgroup v2 allows controllers only in cgroups without processes; run the agent in a leaf cgroup)",
                    sc.display()
                ))
            })
        }
        Err(e) => Err(unavailable(format!("cannot enable {value} in {}: {e}", sc.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_and_v2_layouts() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(AnyCgroupManager::detect_at(t.path()), Err(RuntimeError::Unavailable(_))));
        fs::write(t.path().join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        let m = AnyCgroupManager::detect_at(t.path()).unwrap();
        assert_eq!(m.version(), 2);
        assert_eq!(m.procs_files("a/b"), vec![t.path().join("a/b/cgroup.procs")]);
        fs::write(t.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        let e = AnyCgroupManager::detect_at(t.path()).unwrap_err().to_string();
        assert!(e.contains("memory, pids"), "{e}");

        let t = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS {
            fs::create_dir(t.path().join(c)).unwrap();
            fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let m = AnyCgroupManager::detect_at(t.path()).unwrap();
        assert_eq!(m.version(), 1);
        assert_eq!(m.procs_files("x").len(), 3);
        assert_eq!(m.dir("pids", "x"), t.path().join("pids/x"));
    }

    #[test]
    fn reads_usage_on_v1_with_cpuacct_apart_and_on_v2() {
        let t = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS.into_iter().chain(["cpuacct"]) {
            fs::create_dir_all(t.path().join(c).join("s")).unwrap();
            fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::write(t.path().join("cpuacct/cpuacct.usage"), "0\n").unwrap();
        let m = AnyCgroupManager::detect_at(t.path()).unwrap();
        // Sessions join cpuacct too, so their CPU time is accounted.
        assert_eq!(m.procs_files("s").len(), 4);
        fs::write(t.path().join("memory/s/memory.usage_in_bytes"), "10000\n").unwrap();
        fs::write(t.path().join("memory/s/memory.stat"), "cache 5\ninactive_file 1\ntotal_inactive_file 4000\n")
            .unwrap();
        fs::write(t.path().join("cpuacct/s/cpuacct.usage"), "2500000000\n").unwrap();
        assert_eq!(m.usage("s").unwrap(), CgroupUsage { cpu_nanos: Some(2_500_000_000), memory_bytes: 6000 });
        // No cpuacct file: memory only.
        fs::remove_file(t.path().join("cpuacct/s/cpuacct.usage")).unwrap();
        assert_eq!(m.usage("s").unwrap(), CgroupUsage { cpu_nanos: None, memory_bytes: 6000 });
        assert_eq!(m.usage("gone").unwrap_err().kind(), io::ErrorKind::NotFound);

        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::create_dir(t.path().join("s")).unwrap();
        fs::write(t.path().join("s/cpu.stat"), "usage_usec 1500000\nuser_usec 1000000\n").unwrap();
        fs::write(t.path().join("s/memory.current"), "8192\n").unwrap();
        fs::write(t.path().join("s/memory.stat"), "anon 4096\ninactive_file 4096\n").unwrap();
        let m = AnyCgroupManager::detect_at(t.path()).unwrap();
        assert_eq!(m.usage("s").unwrap(), CgroupUsage { cpu_nanos: Some(1_500_000_000), memory_bytes: 4096 });
    }

    #[test]
    fn finds_a_process_cgroup() {
        let v1 = "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n";
        assert_eq!(proc_cgroup_path(v1).as_deref(), Some("/docker/abc"));
        assert_eq!(
            proc_cgroup_path("0::/system.slice/docker-abc.scope\n").as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
        assert_eq!(proc_cgroup_path(""), None);
    }

    #[test]
    fn reads_flat_keys() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(read_key(&p, "oom_kill").unwrap(), 2);
        assert_eq!(read_key(&p, "oom").unwrap(), 1);
        fs::write(&p, "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n").unwrap();
        assert_eq!(read_key(&p, "oom_kill").unwrap(), 5);
    }

    #[test]
    fn descendants_are_deepest_first() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("r/a/x")).unwrap();
        fs::create_dir_all(t.path().join("r/b")).unwrap();
        let mut v = Vec::new();
        descendants_of(t.path(), "r", &mut v);
        assert_eq!(v, vec!["r/a/x", "r/a", "r/b"]);
    }
}
