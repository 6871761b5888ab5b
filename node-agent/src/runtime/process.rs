//! The process runtime: every exec runs under bubblewrap, as the session's
//! own unprivileged host uid, inside the session's cgroup.
//!
//! # Isolation
//! - **Host uid per session.** Session `n` of the node's slots runs as host
//!   uid/gid `uid_base + n` with no supplementary groups. bwrap started by
//!   host root would keep root's power over host files even with `--uid`;
//!   an unprivileged uid per session means a sandbox escape into the host
//!   filesystem still lands as a nobody that cannot read other workspaces
//!   (each is mode 0700, owned by its session uid).
//! - **Namespaces and root filesystem** by bubblewrap ([`super::bwrap`]):
//!   no network, no host processes, a read-only minimal root.
//! - **seccomp** ([`super::seccomp`]) denies the syscalls with kernel attack surface.
//! - **cgroups** ([`super::cgroup`]): memory without swap, CPU quota and a
//!   pids limit per session; each exec runs in its own leaf
//!   `…/<session>/exec-<n>` so a timeout kills exactly that exec's tree.
//!
//! # Spawning
//! std applies `Command::uid` before `pre_exec` hooks, so joining the cgroup
//! (which needs root) and dropping privileges are both done in our own
//! `pre_exec` hook, with async-signal-safe calls only: write "0" to the
//! pre-opened `cgroup.procs` fds, mark every other fd close-on-exec, keep
//! the seccomp (and code) memfds open, then `setgroups(0)`, `setgid`, `setuid`.
//!
//! # On disk
//! `<data_dir>/sessions/<sid>/workspace` (0700, session uid),
//! `<data_dir>/sessions/<sid>/generation` (text) and `spec.json`;
//! `<data_dir>/rootfs-etc/` holds the sandbox's `/etc` files. The data dir
//! and `sessions/` must be traversable (o+x) by the session uids, because
//! bwrap resolves the workspace path as that uid; nothing in them is
//! readable by others.
//!
//! # Restarts
//! Execs never survive an agent restart: [`ProcessRuntime::new`] kills every
//! process left in the node's cgroups and removes exec leaves, but keeps
//! sessions (directories and cgroups) so [`Runtime::list`] rediscovers them;
//! a session's slot is recovered from its workspace owner.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::ids;
use tokio::sync::{mpsc, RwLock};
use tracing::{debug, info, instrument, warn};

use super::bwrap::{self, RootLayout};
use super::cgroup::{AnyCgroupManager, Limits};
use super::disk::{DiskQuota, DiskUsage, Disks};
use super::fsutil::{
    check_node_config, create_dir, invalid, io_ctx, no_free_slot, session_list, set_mode, write_atomic,
};
use super::usage::{Usage, UsageMeter};
use super::{seccomp, ExecEvent, ExecSpec, ExitInfo, ResolvedSpec, Runtime, RuntimeError, SandboxSpec, SessionInfo};
use crate::exec;
use crate::workspace::Workspace;

/// Default first host uid of session slots.
pub const DEFAULT_UID_BASE: u32 = 200_000;
/// Default number of session slots.
pub const DEFAULT_SLOTS: u32 = 256;
/// Default bubblewrap binary.
pub const DEFAULT_BWRAP_PATH: &str = "/usr/bin/bwrap";

/// How long killing and removing a cgroup may take.
const CGROUP_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of [`ProcessRuntime`].
#[derive(Debug, Clone)]
pub struct ProcessRuntimeConfig {
    /// Where sessions and the sandbox `/etc` live.
    pub data_dir: PathBuf,
    /// This node's id (a DNS label); names the cgroup root `sandfleet/<node_id>`.
    pub node_id: String,
    /// First host uid/gid of the session slots (default 200000).
    pub uid_base: u32,
    /// Number of session slots, i.e. of concurrent sessions.
    pub slots: u32,
    /// The bubblewrap binary (default /usr/bin/bwrap).
    pub bwrap_path: PathBuf,
    /// How sessions get their disk (default: a filesystem of the session's quota).
    pub disk_quota: DiskQuota,
}

impl ProcessRuntimeConfig {
    /// A configuration with the default uid base, slots and bwrap path.
    pub fn new(data_dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: node_id.into(),
            uid_base: DEFAULT_UID_BASE,
            slots: DEFAULT_SLOTS,
            bwrap_path: PathBuf::from(DEFAULT_BWRAP_PATH),
            disk_quota: DiskQuota::default(),
        }
    }
}

/// Extra pids.max on the session cgroup, above `pids_limit`.
///
/// Measured on this kernel (6.18, cgroup v1): the pids charge of a process that
/// ran in a pid namespace (bwrap --unshare-pid) is released some seconds after
/// the process was reaped, even once its cgroup is removed. Back-to-back execs
/// of `true` accumulated 40 such charges in the session cgroup with no task
/// left, and at pids_limit 64 the 65th quick exec could not fork. The per-exec
/// leaf keeps the exact `pids_limit` (a fork bomb in one exec stops there); the
/// session level only absorbs the lingering charges.
const PIDS_TEARDOWN_HEADROOM: u32 = 512;

/// The session cgroup's limits. Its pids.max has [`PIDS_TEARDOWN_HEADROOM`]
/// on top of `pids_limit`; each exec's leaf gets `pids_limit` itself.
fn session_limits(spec: &ResolvedSpec) -> Limits {
    Limits {
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        pids_limit: spec.pids_limit.saturating_add(PIDS_TEARDOWN_HEADROOM),
    }
}

struct Session {
    id: String,
    slot: u32,
    uid: u32,
    dir: PathBuf,
    cgroup: String,
    generation: AtomicU64,
    spec: Mutex<ResolvedSpec>,
    /// `true` while the session may start execs; destroy takes the write lock.
    alive: RwLock<bool>,
    exec_seq: AtomicU64,
}

impl Session {
    fn workspace_dir(&self) -> PathBuf {
        self.dir.join("workspace")
    }

    fn spec(&self) -> ResolvedSpec {
        self.spec.lock().clone()
    }
}

struct Inner {
    cfg: ProcessRuntimeConfig,
    cgroups: AnyCgroupManager,
    /// `sandfleet/<node_id>`.
    cg_root: String,
    layout: RootLayout,
    filter: Vec<u8>,
    disks: Disks,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Serializes prepare and destroy (slot allocation, directory creation).
    admin: tokio::sync::Mutex<()>,
    /// Sums the session cgroups' use ([`Runtime::usage`]).
    usage: UsageMeter,
}

/// The bubblewrap + cgroups runtime. Cheap to clone.
#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("data_dir", &self.inner.cfg.data_dir)
            .field("node_id", &self.inner.cfg.node_id)
            .field("cgroup_version", &self.inner.cgroups.version())
            .finish()
    }
}

/// Changes the owner of a tree without following symlinks. Only called at
/// startup, when no sandboxed process can race it.
fn chown_tree(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            chown_tree(&e?.path(), uid)?;
        }
    }
    Ok(())
}

/// Creates (or repairs) `sessions/<sid>` (0711 root) and its workspace
/// (0700, owned by the session uid).
fn ensure_session_dirs(s: &Session) -> Result<(), RuntimeError> {
    create_dir(&s.dir, 0o711, None)?;
    let ws = s.workspace_dir();
    match fs::create_dir(&ws) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let m = fs::symlink_metadata(&ws)?;
            if !m.is_dir() || (m.uid() != s.uid && m.uid() != 0) {
                return Err(RuntimeError::Internal(format!(
                    "{} exists with owner {}; refusing to hand it to uid {}",
                    ws.display(),
                    m.uid(),
                    s.uid
                )));
            }
        }
        Err(e) => return Err(io_ctx(format!("creating {}", ws.display()), e)),
    }
    std::os::unix::fs::lchown(&ws, Some(s.uid), Some(s.uid))
        .map_err(|e| io_ctx(format!("chown {}", ws.display()), e))?;
    set_mode(&ws, 0o700)
}

/// Validates and fills in the defaults of a sandbox spec (the process
/// runtime offers every template: they are all the same sandbox).
fn stored_spec(spec: &SandboxSpec) -> Result<ResolvedSpec, RuntimeError> {
    super::resolve_spec(spec, sandfleet_common::spec::Runtime::Process, |_| true)
}

fn validate_session_id(id: &str) -> Result<(), RuntimeError> {
    ids::validate_session_id(id).map_err(|e| invalid(e.to_string()))
}

/// The files of the sandbox's `/etc`.
const ETC_FILES: [(&str, &str); 5] = bwrap::ETC_FILES;

impl ProcessRuntime {
    /// Checks bubblewrap and cgroups, creates the node's cgroup root and
    /// the sandbox `/etc`, kills every process left over from a previous
    /// agent, rediscovers sessions and proves a sandbox can start.
    #[instrument(skip(cfg), fields(node = %cfg.node_id, data_dir = %cfg.data_dir.display()))]
    pub async fn new(cfg: ProcessRuntimeConfig) -> Result<Self, RuntimeError> {
        check_node_config(&cfg.node_id, cfg.slots, cfg.uid_base)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(RuntimeError::Unavailable(
                "the process runtime must run as root (it manages cgroups and per-session uids)".to_string(),
            ));
        }
        check_bwrap(&cfg.bwrap_path)?;
        warn_on_uid_overlap(cfg.uid_base, cfg.slots);

        let cgroups = AnyCgroupManager::detect()?;
        let cg_root = format!("sandfleet/{}", cfg.node_id);
        cgroups.ensure_root(&cg_root)?;
        info!(version = cgroups.version(), cgroup = %cg_root, "cgroups ready");

        // Data layout.
        fs::create_dir_all(&cfg.data_dir).map_err(|e| io_ctx(format!("creating {}", cfg.data_dir.display()), e))?;
        let data_dir =
            fs::canonicalize(&cfg.data_dir).map_err(|e| io_ctx(format!("resolving {}", cfg.data_dir.display()), e))?;
        make_traversable(&data_dir)?;
        let etc_dir = data_dir.join("rootfs-etc");
        create_dir(&etc_dir, 0o755, None)?;
        for (name, content) in ETC_FILES {
            write_atomic(&etc_dir.join(name), content.as_bytes(), 0o644)?;
        }
        let sessions_dir = data_dir.join("sessions");
        create_dir(&sessions_dir, 0o711, None)?;
        let probe_dir = data_dir.join("probe");
        create_dir(&probe_dir, 0o755, None)?;

        let layout = RootLayout::detect(&etc_dir)?;
        let filter = seccomp::filter_bytes()?;
        let disks = Disks::new(&cfg.disk_quota, &data_dir.join("disks")).await?;
        let cfg = ProcessRuntimeConfig { data_dir, ..cfg };

        let inner = Inner {
            cfg,
            cgroups,
            cg_root,
            layout,
            filter,
            disks,
            sessions: Mutex::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
            usage: UsageMeter::new(),
        };
        let rt = Self { inner: Arc::new(inner) };
        // Execs never survive a restart: whatever is still running is a leak.
        rt.inner.cgroups.kill_all(&rt.inner.cg_root, CGROUP_KILL_TIMEOUT).await?;
        rt.rediscover().await?;
        rt.probe().await?;
        Ok(rt)
    }

    /// The configuration in use (with `data_dir` resolved).
    pub fn config(&self) -> &ProcessRuntimeConfig {
        &self.inner.cfg
    }

    /// The cgroup manager.
    pub fn cgroups(&self) -> &AnyCgroupManager {
        &self.inner.cgroups
    }

    /// The node's cgroup root, relative to the hierarchy root (`sandfleet/<node_id>`).
    pub fn cgroup_root(&self) -> &str {
        &self.inner.cg_root
    }

    /// The session's cgroup, relative to the hierarchy root.
    pub fn session_cgroup(&self, session_id: &str) -> String {
        format!("{}/{}", self.inner.cg_root, session_id)
    }

    /// The host uid a session runs as, if it is held here.
    pub fn session_uid(&self, session_id: &str) -> Option<u32> {
        self.get(session_id).ok().map(|s| s.uid)
    }

    /// Destroys every session and removes the node's cgroup root. For
    /// tests and node decommissioning; a restart does not need it.
    pub async fn remove_all(&self) -> Result<(), RuntimeError> {
        let ids: Vec<String> = self.lock_sessions().keys().cloned().collect();
        for id in ids {
            self.destroy(&id).await?;
        }
        super::disk::unmount_all_under(&self.sessions_dir());
        self.inner.cgroups.destroy(&self.inner.cg_root, CGROUP_KILL_TIMEOUT).await
    }

    fn lock_sessions(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.inner.sessions.lock()
    }

    fn get(&self, session_id: &str) -> Result<Arc<Session>, RuntimeError> {
        self.lock_sessions().get(session_id).cloned().ok_or_else(|| RuntimeError::NotFound(session_id.to_string()))
    }

    fn sessions_dir(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("sessions")
    }

    fn free_slot(&self, sessions: &HashMap<String, Arc<Session>>) -> Option<u32> {
        let used: std::collections::HashSet<u32> = sessions.values().map(|s| s.slot).collect();
        (0..self.inner.cfg.slots).find(|s| !used.contains(s))
    }

    fn persist(&self, s: &Session) -> Result<(), RuntimeError> {
        write_atomic(
            &s.dir.join("generation"),
            format!("{}\n", s.generation.load(Ordering::SeqCst)).as_bytes(),
            0o600,
        )?;
        let json =
            serde_json::to_vec_pretty(&s.spec()).map_err(|e| RuntimeError::Internal(format!("encoding spec: {e}")))?;
        write_atomic(&s.dir.join("spec.json"), &json, 0o600)
    }

    /// Rebuilds the session table from `<data_dir>/sessions` after a restart,
    /// and removes cgroups that belong to no session.
    async fn rediscover(&self) -> Result<(), RuntimeError> {
        let cg = &self.inner.cgroups;
        let mut found: Vec<(String, PathBuf, u32, u64, ResolvedSpec)> = Vec::new();
        let rd = fs::read_dir(self.sessions_dir()).map_err(|e| io_ctx("reading the sessions dir", e))?;
        for e in rd {
            let e = e?;
            let Some(id) = e.file_name().to_str().map(str::to_string) else { continue };
            let dir = e.path();
            if validate_session_id(&id).is_err() {
                warn!(path = %dir.display(), "ignoring a directory that is not a session");
                continue;
            }
            let ws = dir.join("workspace");
            let owner = match fs::symlink_metadata(&ws) {
                Ok(m) if m.is_dir() => m.uid(),
                _ => {
                    warn!(session = %id, "session has no workspace; removing it");
                    let _ = self.inner.disks.detach(&id, &ws).await;
                    let _ = fs::remove_dir_all(&dir);
                    cg.destroy(&format!("{}/{id}", self.inner.cg_root), CGROUP_KILL_TIMEOUT).await?;
                    continue;
                }
            };
            let generation =
                fs::read_to_string(dir.join("generation")).ok().and_then(|g| g.trim().parse().ok()).unwrap_or(0);
            let spec = fs::read(dir.join("spec.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<ResolvedSpec>(&b).ok())
                // Unknown: no quota is assumed, so nothing is mounted over its files.
                .unwrap_or_else(|| ResolvedSpec { disk_bytes: 0, disk_inodes: 0, ..ResolvedSpec::default() });
            found.push((id, dir, owner, generation, spec));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));

        let base = self.inner.cfg.uid_base;
        let mut table: HashMap<String, Arc<Session>> = HashMap::new();
        let mut need_slot = Vec::new();
        for (id, dir, owner, generation, spec) in found {
            let slot = owner.checked_sub(base).filter(|s| *s < self.inner.cfg.slots);
            match slot {
                Some(slot) if !table.values().any(|s| s.slot == slot) => {
                    table.insert(id.clone(), Arc::new(self.session_obj(&id, dir, slot, generation, spec)));
                }
                _ => need_slot.push((id, dir, owner, generation, spec)),
            }
        }
        for (id, dir, owner, generation, spec) in need_slot {
            let Some(slot) = self.free_slot(&table) else {
                warn!(session = %id, "no free slot for a rediscovered session; removing it");
                let _ = self.inner.disks.detach(&id, &dir.join("workspace")).await;
                let _ = fs::remove_dir_all(&dir);
                cg.destroy(&format!("{}/{id}", self.inner.cg_root), CGROUP_KILL_TIMEOUT).await?;
                continue;
            };
            let uid = base + slot;
            warn!(session = %id, old_uid = owner, new_uid = uid, "session workspace has an unexpected owner; moving it to a free slot");
            chown_tree(&dir.join("workspace"), uid).map_err(|e| io_ctx(format!("re-owning {}", dir.display()), e))?;
            table.insert(id.clone(), Arc::new(self.session_obj(&id, dir, slot, generation, spec)));
        }

        // Filesystems whose mount is gone (a host reboot) are mounted again before
        // anything reads or syncs the workspace; one that cannot be is left on
        // disk, untouched, and its session is not taken over (a later prepare
        // mounts it).
        let mut unmountable = Vec::new();
        for s in table.values() {
            if s.spec().disk_bytes == 0 {
                continue;
            }
            match self.inner.disks.remount(&s.id, &s.workspace_dir()).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(session = %s.id, "the session's filesystem image is gone; its workspace is a plain directory now")
                }
                Err(e) => {
                    tracing::error!(session = %s.id, error = %e, "cannot mount the session's filesystem again; leaving the session alone");
                    unmountable.push(s.id.clone());
                }
            }
        }
        for id in unmountable {
            table.remove(&id);
        }

        // cgroups: keep the sessions', drop exec leaves and orphans.
        for s in table.values() {
            if !cg.exists(&s.cgroup) {
                cg.create(&s.cgroup).map_err(|e| io_ctx("recreating a session cgroup", e))?;
            }
            cg.set_limits(&s.cgroup, &session_limits(&s.spec())).map_err(|e| io_ctx("setting session limits", e))?;
            for leaf in cg.descendants(&s.cgroup) {
                cg.destroy(&leaf, CGROUP_KILL_TIMEOUT).await?;
            }
        }
        let root_depth = self.inner.cg_root.matches('/').count();
        for d in cg.descendants(&self.inner.cg_root) {
            if d.matches('/').count() != root_depth + 1 {
                continue;
            }
            let name = d.rsplit('/').next().unwrap_or("");
            if !table.contains_key(name) {
                info!(cgroup = %d, "removing a cgroup that belongs to no session");
                cg.destroy(&d, CGROUP_KILL_TIMEOUT).await?;
            }
        }
        self.inner.disks.retain(&table.keys().cloned().collect());
        info!(sessions = table.len(), "sessions rediscovered");
        *self.lock_sessions() = table;
        Ok(())
    }

    fn session_obj(&self, id: &str, dir: PathBuf, slot: u32, generation: u64, spec: ResolvedSpec) -> Session {
        Session {
            id: id.to_string(),
            slot,
            uid: self.inner.cfg.uid_base + slot,
            dir,
            cgroup: self.session_cgroup(id),
            generation: AtomicU64::new(generation),
            spec: Mutex::new(spec),
            alive: RwLock::new(true),
            exec_seq: AtomicU64::new(0),
        }
    }

    /// Mounts the session's own filesystem (its disk and inode quota) on its
    /// workspace directory.
    async fn attach_disk(&self, s: &Session, spec: &ResolvedSpec) -> Result<(), RuntimeError> {
        self.inner.disks.attach(&s.id, &s.workspace_dir(), spec.disk_bytes, spec.disk_inodes, s.uid).await
    }

    /// Starts `true` in a sandbox as an unprivileged uid, so a host that
    /// cannot run sandboxes (no user namespaces, AppArmor restrictions, a
    /// broken bwrap) is reported at startup with bwrap's own words.
    async fn probe(&self) -> Result<(), RuntimeError> {
        let started = std::time::Instant::now();
        let probe_dir = self.inner.cfg.data_dir.join("probe");
        let argv = vec!["true".to_string()];
        let (tx, mut rx) = mpsc::channel(16);
        let collect = tokio::spawn(async move {
            let mut err = Vec::new();
            while let Some(ev) = rx.recv().await {
                let (ExecEvent::Stderr(b) | ExecEvent::Stdout(b)) = ev;
                err.extend_from_slice(&b);
            }
            err
        });
        let uid = self.inner.cfg.uid_base;
        let res =
            self.spawn_sandbox(&probe_dir, Path::new(""), &bwrap::base_env(), &argv, None, &[], uid).map_err(|e| {
                RuntimeError::Unavailable(format!("cannot start bwrap {}: {e}", self.inner.cfg.bwrap_path.display()))
            })?;
        let (child, _fds) = res;
        let info =
            exec::supervise(child, tokio::time::Instant::now(), vec![], Duration::from_secs(20), 64 * 1024, tx, || {})
                .await
                .map_err(|e| RuntimeError::Unavailable(format!("running the bwrap probe: {e}")))?;
        let output = collect.await.unwrap_or_default();
        if info.exit_code != 0 || info.timed_out {
            return Err(RuntimeError::Unavailable(format!(
                "bwrap cannot create a sandbox as unprivileged uid {uid} (are unprivileged user namespaces enabled?): exit code {}: {}",
                info.exit_code,
                String::from_utf8_lossy(&output).trim()
            )));
        }
        info!(elapsed_ms = started.elapsed().as_millis() as u64, "sandbox probe succeeded");
        Ok(())
    }

    /// Spawns bwrap for `argv` as host `uid`, joining the cgroups whose
    /// `cgroup.procs` are given (see [`bwrap::spawn`]).
    #[allow(clippy::too_many_arguments)]
    fn spawn_sandbox(
        &self,
        workspace: &Path,
        workdir: &Path,
        env: &BTreeMap<String, String>,
        argv: &[String],
        code: Option<&[u8]>,
        procs_files: &[PathBuf],
        uid: u32,
    ) -> io::Result<(tokio::process::Child, Vec<fs::File>)> {
        bwrap::spawn(&bwrap::Launch {
            bwrap_path: &self.inner.cfg.bwrap_path,
            layout: &self.inner.layout,
            filter: &self.inner.filter,
            workspace,
            workdir,
            env,
            argv,
            code,
            procs_files,
            run_as: Some(uid),
            own_process_group: false,
        })
    }
}

/// Removes an exec's leaf cgroup when the exec future is dropped before its
/// own cleanup ran.
struct LeafGuard {
    cg: AnyCgroupManager,
    leaf: String,
    armed: bool,
}

impl Drop for LeafGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cg = self.cg.clone();
        let leaf = std::mem::take(&mut self.leaf);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = cg.destroy(&leaf, CGROUP_KILL_TIMEOUT).await {
                        warn!(error = %e, cgroup = %leaf, "could not clean up the exec cgroup");
                    }
                });
            }
            Err(_) => {
                cg.kill_once(&leaf);
                let _ = cg.remove(&leaf);
            }
        }
    }
}

fn check_bwrap(path: &Path) -> Result<(), RuntimeError> {
    let meta = fs::metadata(path).map_err(|e| {
        RuntimeError::Unavailable(format!(
            "bubblewrap not found at {}: {e} (install the bubblewrap package)",
            path.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(RuntimeError::Unavailable(format!("bubblewrap at {} is not a regular file", path.display())));
    }
    if meta.permissions().mode() & 0o001 == 0 {
        return Err(RuntimeError::Unavailable(format!(
            "bubblewrap at {} is not executable by other users (mode {:o}); sessions run it as unprivileged uids",
            path.display(),
            meta.permissions().mode() & 0o7777
        )));
    }
    if meta.permissions().mode() & 0o4000 != 0 {
        warn!(path = %path.display(), "bubblewrap is setuid; the process runtime expects a non-setuid bwrap using user namespaces");
    }
    Ok(())
}

/// Warns when host accounts use uids of the session range.
fn warn_on_uid_overlap(base: u32, slots: u32) {
    let Ok(passwd) = fs::read_to_string("/etc/passwd") else { return };
    for line in passwd.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (f.next(), f.next(), f.next()) else { continue };
        if let Ok(uid) = uid.parse::<u32>() {
            if uid >= base && uid - base < slots {
                warn!(
                    user = name,
                    uid, "a host account uses a uid of the session range; sessions should have uids of their own"
                );
            }
        }
    }
}

/// bwrap resolves the workspace path as the session uid, so the data dir and
/// its ancestors must be traversable (o+x). Adds o+x to the data dir itself
/// and reports ancestors that lack it.
fn make_traversable(data_dir: &Path) -> Result<(), RuntimeError> {
    let meta = fs::metadata(data_dir)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o001 == 0 {
        set_mode(data_dir, mode | 0o001)?;
    }
    for anc in data_dir.ancestors().skip(1) {
        let m = fs::metadata(anc)?;
        if m.permissions().mode() & 0o001 == 0 {
            return Err(RuntimeError::Unavailable(format!(
                "{} (an ancestor of the data dir) is not traversable by other users (mode {:o}); session uids must reach their workspace: use a data dir under e.g. /var/lib",
                anc.display(),
                m.permissions().mode() & 0o7777
            )));
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> sandfleet_common::spec::Runtime {
        sandfleet_common::spec::Runtime::Process
    }

    #[instrument(skip(self, spec), fields(session = %spec.session_id, generation = spec.generation))]
    async fn prepare(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        validate_session_id(&spec.session_id)?;
        let mut stored = stored_spec(spec)?;
        let _admin = self.inner.admin.lock().await;
        let cg = &self.inner.cgroups;
        let existing = self.lock_sessions().get(&spec.session_id).cloned();
        if let Some(s) = existing {
            // A recorded quota means the session has a filesystem of its own; a
            // session prepared without one (quotas off, or before they existed)
            // keeps its plain directory and its files.
            // A filesystem does not change its size in place: the disk stays
            // what it was made with (none for a session without one).
            let had = s.spec();
            let has_disk = had.disk_bytes != 0;
            (stored.disk_bytes, stored.disk_inodes) = (had.disk_bytes, had.disk_inodes);
            s.generation.fetch_max(spec.generation, Ordering::SeqCst);
            *s.spec.lock() = stored.clone();
            // Repair whatever went missing, then apply the (possibly new) limits.
            ensure_session_dirs(&s)?;
            if has_disk && !self.inner.disks.remount(&s.id, &s.workspace_dir()).await? {
                warn!("the session's filesystem image is gone; its workspace is a plain directory now");
            }
            if !cg.exists(&s.cgroup) {
                cg.create(&s.cgroup).map_err(|e| io_ctx("creating the session cgroup", e))?;
            }
            cg.set_limits(&s.cgroup, &session_limits(&stored)).map_err(|e| io_ctx("setting session limits", e))?;
            self.persist(&s)?;
            debug!("session already prepared; updated");
            return Ok(());
        }

        let slot = {
            let sessions = self.lock_sessions();
            self.free_slot(&sessions)
        }
        .ok_or_else(|| no_free_slot(self.inner.cfg.slots))?;
        if !self.inner.disks.enabled() {
            (stored.disk_bytes, stored.disk_inodes) = (0, 0);
        }
        let dir = self.sessions_dir().join(&spec.session_id);
        let s = self.session_obj(&spec.session_id, dir, slot, spec.generation, stored.clone());
        let res = async {
            ensure_session_dirs(&s)?;
            self.attach_disk(&s, &stored).await?;
            cg.create(&s.cgroup).map_err(|e| io_ctx("creating the session cgroup", e))?;
            cg.set_limits(&s.cgroup, &session_limits(&stored)).map_err(|e| io_ctx("setting session limits", e))?;
            self.persist(&s)
        }
        .await;
        if let Err(e) = res {
            warn!(error = %e, "prepare failed; rolling back");
            let _ = cg.remove(&s.cgroup);
            let _ = self.inner.disks.detach(&s.id, &s.workspace_dir()).await;
            let _ = fs::remove_dir_all(&s.dir);
            return Err(e);
        }
        info!(slot, uid = s.uid, "session prepared");
        self.lock_sessions().insert(spec.session_id.clone(), Arc::new(s));
        Ok(())
    }

    #[instrument(skip(self, spec, out), fields(session = %session_id))]
    async fn exec(
        &self,
        session_id: &str,
        spec: ExecSpec,
        out: mpsc::Sender<ExecEvent>,
    ) -> Result<ExitInfo, RuntimeError> {
        validate_session_id(session_id)?;
        let exec::ValidatedExec { plan, timeout, output_cap, workdir } = exec::validate(&spec, bwrap::CODE_PATH)?;

        let s = self.get(session_id)?;
        let ws = Workspace::new(s.workspace_dir(), s.uid, s.uid);
        exec::check_workdir(&ws, &spec.workdir).await?;
        let stored = s.spec();
        let mut env = bwrap::base_env();
        env.extend(stored.env.clone());
        env.extend(spec.env.clone());

        let cg = self.inner.cgroups.clone();
        let alive = s.alive.read().await;
        if !*alive {
            return Err(RuntimeError::NotFound(session_id.to_string()));
        }
        let n = s.exec_seq.fetch_add(1, Ordering::SeqCst);
        let leaf = format!("{}/exec-{n}", s.cgroup);
        cg.create(&leaf).map_err(|e| io_ctx("creating the exec cgroup", e))?;
        if let Err(e) = cg.set_pids_max(&leaf, u64::from(stored.pids_limit)) {
            // Without it the session-level limit (with its headroom) still holds.
            warn!(error = %e, cgroup = %leaf, "could not set the exec's pids limit");
        }
        // If this future is dropped mid-exec (the caller went away), kill_on_drop
        // kills bwrap and the guard removes the leaf in the background.
        let mut leaf_guard = LeafGuard { cg: cg.clone(), leaf: leaf.clone(), armed: true };
        let oom_before = cg.oom_kills(&s.cgroup);
        let forkfail_before = cg.pids_max_events(&s.cgroup);
        let started = tokio::time::Instant::now();
        let spawned = self.spawn_sandbox(
            &s.workspace_dir(),
            &workdir,
            &env,
            &plan.argv,
            plan.code_file.as_deref(),
            &cg.procs_files(&leaf),
            s.uid,
        );
        // The child is in the leaf (or failed): destroy may proceed and will kill it.
        drop(alive);
        let (child, fds) = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = cg.remove(&leaf);
                leaf_guard.armed = false;
                if e.raw_os_error() == Some(libc::E2BIG) {
                    return Err(invalid("argv and environment together are too large for the kernel (E2BIG)"));
                }
                return Err(io_ctx("starting bwrap", e));
            }
        };
        drop(fds);
        debug!(pid = child.id(), cgroup = %leaf, "exec started");
        let kill_cg = cg.clone();
        let kill_leaf = leaf.clone();
        let kill_tree = move || {
            for _ in 0..3 {
                if kill_cg.kill_once(&kill_leaf) == 0 {
                    break;
                }
            }
        };
        let result = exec::supervise(child, started, spec.stdin, timeout, output_cap, out, kill_tree).await;

        // Whatever happened, nothing of this exec may outlive it.
        // v1 counts OOM kills and refused forks in the leaf only; v2 also in the session.
        let (leaf_oom, leaf_forkfail) =
            if cg.version() == 1 { (cg.oom_kills(&leaf), cg.pids_max_events(&leaf)) } else { (0, 0) };
        if let Err(e) = cg.destroy(&leaf, CGROUP_KILL_TIMEOUT).await {
            warn!(error = %e, cgroup = %leaf, "could not clean up the exec cgroup");
        }
        leaf_guard.armed = false;
        let mut info = result.map_err(|e| io_ctx("supervising the command", e))?;
        let oom = cg.oom_kills(&s.cgroup).saturating_sub(oom_before) + leaf_oom;
        let forkfail = cg.pids_max_events(&s.cgroup).saturating_sub(forkfail_before) + leaf_forkfail;
        exec::note_limits(&mut info, oom, stored.memory_bytes, forkfail, stored.pids_limit);
        debug!(
            exit_code = info.exit_code,
            signal = info.signal,
            duration_ms = info.duration.as_millis() as u64,
            "exec ended"
        );
        Ok(info)
    }

    #[instrument(skip(self), fields(session = %session_id))]
    async fn stop(&self, session_id: &str) -> Result<(), RuntimeError> {
        validate_session_id(session_id)?;
        let _admin = self.inner.admin.lock().await;
        let s = self.lock_sessions().get(session_id).cloned();
        if let Some(s) = s {
            *s.alive.write().await = false;
        }
        self.inner.cgroups.destroy(&self.session_cgroup(session_id), CGROUP_KILL_TIMEOUT).await
    }

    async fn destroy(&self, session_id: &str) -> Result<(), RuntimeError> {
        validate_session_id(session_id)?;
        let _admin = self.inner.admin.lock().await;
        let s = self.lock_sessions().get(session_id).cloned();
        if let Some(s) = &s {
            *s.alive.write().await = false;
        }
        let rel = self.session_cgroup(session_id);
        self.inner.cgroups.destroy(&rel, CGROUP_KILL_TIMEOUT).await?;
        let dir = self.sessions_dir().join(session_id);
        self.inner.disks.detach(session_id, &dir.join("workspace")).await?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_ctx(format!("removing {}", dir.display()), e)),
        }
        // Freeing the slot last: a new session cannot get this uid while files of the old one exist.
        self.lock_sessions().remove(session_id);
        if s.is_some() {
            info!("session destroyed");
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SessionInfo>, RuntimeError> {
        Ok(session_list(self.lock_sessions().values().map(|s| (&s.id, &s.generation))))
    }

    fn workspace(&self, session_id: &str) -> Result<Workspace, RuntimeError> {
        validate_session_id(session_id)?;
        let s = self.get(session_id)?;
        Ok(Workspace::new(s.workspace_dir(), s.uid, s.uid))
    }

    async fn release(&self) -> Result<(), RuntimeError> {
        self.inner.disks.release_pool().await;
        Ok(())
    }

    fn disk_usage(&self, session_id: &str) -> Result<DiskUsage, RuntimeError> {
        validate_session_id(session_id)?;
        let s = self.get(session_id)?;
        self.inner.disks.usage(&s.workspace_dir())
    }

    /// The session cgroups' use (each with its exec leaves). On cgroup v1
    /// sessions join the cpuacct hierarchy for this; a host without cpuacct
    /// reports memory only.
    async fn usage(&self) -> Usage {
        let cgroups: Vec<(String, String)> =
            self.lock_sessions().values().map(|s| (s.id.clone(), s.cgroup.clone())).collect();
        let cg = &self.inner.cgroups;
        self.inner.usage.observe(cgroups.into_iter().map(|(id, rel)| (id, cg.usage(&rel).ok())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec { session_id: id.to_string(), generation: 1, spec: Default::default() }
    }

    #[test]
    fn spec_defaults_and_limits() {
        let s = stored_spec(&spec("x")).unwrap();
        assert_eq!(s, ResolvedSpec::default());
        let mut bad = spec("x");
        bad.spec.memory_bytes = 1024;
        assert!(stored_spec(&bad).unwrap_err().to_string().contains("memory_bytes"));
        let mut bad = spec("x");
        bad.spec.template = "gpu".into();
        assert!(stored_spec(&bad).unwrap_err().to_string().contains("unknown template"));
        let mut bad = spec("x");
        bad.spec.env.insert("1X".into(), "v".into());
        let e = tonic::Status::from(stored_spec(&bad).unwrap_err());
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let mut bad = spec("x");
        bad.spec.pids_limit = 1_000_000;
        let e = tonic::Status::from(stored_spec(&bad).unwrap_err());
        assert_eq!(e.code(), tonic::Code::OutOfRange, "the coordinator's code for the same value: {e}");
        let mut ok = spec("x");
        ok.spec.template = "python".into();
        ok.spec.pids_limit = 64;
        assert_eq!(stored_spec(&ok).unwrap().pids_limit, 64);
    }
}
