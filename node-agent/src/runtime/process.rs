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
//!   pids limit per session (`pids_limit` plus
//!   [`crate::executor::EXECUTOR_PIDS_HEADROOM`], as for containers).
//!
//! # The exec path: one executor per session
//! Each session has its own `sandfleet-executor` ([`crate::executor`]) on the
//! host, running as the session's uid inside the session's cgroups; every
//! exec is a request on its Unix socket (`sessions/<sid>/run/executor.sock`,
//! in a 0700 directory of the session uid), and the executor starts bwrap
//! as its own child. Exec semantics are the docker and CRI runtimes' very
//! code: the executor validates, starts bwrap, supervises (timeout, output
//! cap, a caller that went away) and reads OOM kills and refused forks from
//! the session cgroup.
//!
//! Why a process that already lives in the cgroups: moving a process into a
//! cgroup (a `cgroup.procs` write) takes the kernel's threadgroup rwsem for
//! writing, which on cgroup v1 waits an RCU grace period, measured at
//! 12–15 ms here, per isolated migration. A fork inherits its parent's
//! cgroups for free, so only the executor pays that once, when it starts.
//! A timeout kills the exec's process group and with it bwrap, whose pid
//! namespace init dies with it (`--die-with-parent`) and takes every process
//! of the exec along; whatever the session leaves behind dies with the session
//! cgroup.
//!
//! The executor starts when the session is prepared (in the background, so
//! RUNNING is not delayed; the first exec waits for it), is started again by
//! the next exec if it died, and exits when the agent's end of its lifeline
//! socket closes: an agent that dies takes its executors along. It is
//! started as root into the session's cgroups (a pre-opened `cgroup.procs`
//! write in the `pre_exec` hook, [`super::bwrap::ChildSetup`]) and drops to
//! the session uid itself before anything else (`--uid`).
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
use tracing::{debug, info, instrument, warn, Instrument as _};

use super::bwrap::{self, RootLayout};
use super::cgroup::{AnyCgroupManager, Limits};
use super::disk::{DiskQuota, DiskUsage, Disks};
use super::fsutil::{
    check_node_config, create_dir, invalid, io_ctx, no_free_slot, session_list, set_mode, write_atomic,
};
use super::usage::{Usage, UsageMeter};
use super::{seccomp, ExecEvent, ExecSpec, ExitInfo, ResolvedSpec, Runtime, RuntimeError, SandboxSpec, SessionInfo};
use crate::exec;
use crate::executor::{self, WireExec, EXECUTOR_PIDS_HEADROOM, EXEC_GRACE, SOCKET_NAME};
use crate::workspace::Workspace;

/// Default first host uid of session slots.
pub const DEFAULT_UID_BASE: u32 = 200_000;
/// Default number of session slots.
pub const DEFAULT_SLOTS: u32 = 256;
/// Default bubblewrap binary.
pub const DEFAULT_BWRAP_PATH: &str = "/usr/bin/bwrap";

/// How long killing and removing a cgroup may take.
const CGROUP_KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session's executor may take to start serving.
const EXECUTOR_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The executor binary's file name.
pub const EXECUTOR_BINARY: &str = "sandfleet-executor";

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
    /// The `sandfleet-executor` binary started per session (default: see
    /// [`locate_executor`]).
    pub executor_path: PathBuf,
}

/// Where `sandfleet-executor` is: `$SANDFLEET_EXECUTOR`, else next to the
/// running binary (or one level up, for test binaries in `deps/`), else
/// `sandfleet-executor` on `PATH`.
pub fn locate_executor() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDFLEET_EXECUTOR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(EXECUTOR_BINARY);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(EXECUTOR_BINARY)
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
            executor_path: locate_executor(),
        }
    }
}

/// The session cgroup's limits: its pids.max is `pids_limit` plus
/// [`EXECUTOR_PIDS_HEADROOM`] for the executor, as in a container.
fn session_limits(spec: &ResolvedSpec) -> Limits {
    Limits {
        memory_bytes: spec.memory_bytes,
        cpu_millis: spec.cpu_millis,
        pids_limit: spec.pids_limit.saturating_add(EXECUTOR_PIDS_HEADROOM),
    }
}

/// A session's running executor.
struct Executor {
    child: tokio::process::Child,
    /// The agent's end of the lifeline: closing it (drop) ends the executor.
    _lifeline: tokio::net::UnixStream,
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
    /// Its executor, once started; the lock serializes (re)starts.
    executor: tokio::sync::Mutex<Option<Executor>>,
}

impl Session {
    fn workspace_dir(&self) -> PathBuf {
        self.dir.join("workspace")
    }

    /// The executor's directory (0700, the session uid): its socket.
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
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
    create_dir(&s.run_dir(), 0o700, Some(s.uid))?;
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
        check_executor(&cfg.executor_path).await?;
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

        // cgroups: keep the sessions', drop leaves (exec leaves of older agents) and orphans.
        // Executors start again with the first exec.
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
            executor: tokio::sync::Mutex::new(None),
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
        let res = self.spawn_sandbox(&probe_dir, Path::new(""), &bwrap::base_env(), &argv, None, uid).map_err(|e| {
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

    /// Spawns bwrap for `argv` as host `uid` (see [`bwrap::spawn`]); only the
    /// startup probe does this itself, execs go through the session's executor.
    #[allow(clippy::too_many_arguments)]
    fn spawn_sandbox(
        &self,
        workspace: &Path,
        workdir: &Path,
        env: &BTreeMap<String, String>,
        argv: &[String],
        code: Option<&[u8]>,
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
            run_as: Some(uid),
            own_process_group: false,
        })
    }

    /// The socket of `s`'s executor, started first if it is not running.
    async fn executor_socket(&self, s: &Session) -> Result<PathBuf, RuntimeError> {
        let mut slot = s.executor.lock().await;
        if let Some(e) = slot.as_mut() {
            match e.child.try_wait() {
                Ok(None) => return Ok(s.run_dir().join(SOCKET_NAME)),
                Ok(Some(status)) => warn!(%status, "the session's executor had exited; starting it again"),
                Err(e) => warn!(error = %e, "cannot check the session's executor; starting it again"),
            }
        }
        *slot = None;
        *slot = Some(self.start_executor(s).await?);
        Ok(s.run_dir().join(SOCKET_NAME))
    }

    /// Starts `s`'s executor: as root into the session's cgroups, where it
    /// drops to the session uid itself, and waits for its "ready".
    #[instrument(skip_all, fields(session = %s.id))]
    async fn start_executor(&self, s: &Session) -> Result<Executor, RuntimeError> {
        use std::os::fd::AsRawFd as _;
        use tokio::io::AsyncReadExt as _;
        let started = std::time::Instant::now();
        let cfg = &self.inner.cfg;
        let unavailable = |what: String| RuntimeError::Unavailable(format!("the session's executor: {what}"));
        let mut procs = Vec::new();
        for p in self.inner.cgroups.procs_files(&s.cgroup) {
            procs.push(
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| io_ctx(format!("opening {}", p.display()), e))?,
            );
        }
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|e| io_ctx("creating the executor's lifeline", e))?;
        let mut cmd = tokio::process::Command::new(&cfg.executor_path);
        // Relative socket path: the run dir's absolute path may exceed sun_path's 108 bytes.
        cmd.arg("--run-dir")
            .arg(".")
            .arg("--workspace")
            .arg(s.workspace_dir())
            .arg("--bwrap")
            .arg(&cfg.bwrap_path)
            .arg("--etc-dir")
            .arg(&self.inner.layout.etc_dir)
            .arg("--etc-prepared")
            .arg("--cgroup")
            .arg(&s.cgroup)
            .arg("--uid")
            .arg(s.uid.to_string())
            .arg("--lifeline-fd")
            .arg(theirs.as_raw_fd().to_string())
            .env_clear()
            .env("SANDFLEET_LOG", "warn")
            .current_dir(s.run_dir())
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        bwrap::ChildSetup {
            procs_fds: procs.iter().map(|f| f.as_raw_fd()).collect(),
            inherit: vec![theirs.as_raw_fd()],
            run_as: None,
            oom_victim: false,
        }
        .install(&mut cmd);
        let mut child =
            cmd.spawn().map_err(|e| unavailable(format!("cannot start {}: {e}", cfg.executor_path.display())))?;
        drop((theirs, procs));
        ours.set_nonblocking(true).map_err(|e| io_ctx("setting up the executor's lifeline", e))?;
        let mut lifeline =
            tokio::net::UnixStream::from_std(ours).map_err(|e| io_ctx("setting up the executor's lifeline", e))?;
        let mut line = Vec::new();
        let ready = tokio::time::timeout(EXECUTOR_START_TIMEOUT, async {
            let mut buf = [0u8; 16];
            while !line.ends_with(b"\n") && line.len() < 64 {
                match lifeline.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => line.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        if ready.is_err() || line != b"ready\n" {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            return Err(unavailable(match (ready, status) {
                (Err(_), _) => format!("did not start within {} s", EXECUTOR_START_TIMEOUT.as_secs()),
                (Ok(()), Some(st)) => format!("exited before serving ({st}); see the agent's log above"),
                (Ok(()), None) => "exited before serving".to_string(),
            }));
        }
        debug!(pid = child.id(), elapsed_us = started.elapsed().as_micros() as u64, "executor ready");
        Ok(Executor { child, _lifeline: lifeline })
    }

    /// Starts `s`'s executor in the background, so the first exec finds it
    /// ready; an exec started meanwhile waits for it.
    fn warm_executor(&self, s: Arc<Session>) {
        let rt = self.clone();
        tokio::spawn(
            async move {
                let alive = s.alive.read().await;
                if *alive {
                    if let Err(e) = rt.executor_socket(&s).await {
                        warn!(error = %e, "could not start the session's executor; the next exec tries again");
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// The pid of the session's executor, when it runs (for tests).
    pub async fn executor_pid(&self, session_id: &str) -> Option<u32> {
        let s = self.get(session_id).ok()?;
        let e = s.executor.lock().await;
        e.as_ref().and_then(|e| e.child.id())
    }
}

/// Runs `sandfleet-executor --version`, so a missing or broken executor is
/// reported at startup rather than by the first exec.
async fn check_executor(path: &Path) -> Result<(), RuntimeError> {
    let hint = "build it with `cargo build --bins`, install it next to sandfleet-agent, or name it with --executor-path / SANDFLEET_EXECUTOR";
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(path).arg("--version").env_clear().kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| RuntimeError::Unavailable(format!("{} --version did not answer within 20 s", path.display())))?
    .map_err(|e| {
        RuntimeError::Unavailable(format!("cannot run the session executor {}: {e}; {hint}", path.display()))
    })?;
    if !out.status.success() {
        return Err(RuntimeError::Unavailable(format!(
            "{} --version failed ({}): {}; {hint}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
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
            self.warm_executor(s);
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
        let s = Arc::new(s);
        self.lock_sessions().insert(spec.session_id.clone(), s.clone());
        self.warm_executor(s);
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
        // Checked here too, so a bad request gets its precise error without a round trip.
        let v = exec::validate(&spec, bwrap::CODE_PATH)?;
        let s = self.get(session_id)?;
        let alive = s.alive.read().await;
        if !*alive {
            return Err(RuntimeError::NotFound(session_id.to_string()));
        }
        let stored = s.spec();
        let req = WireExec::new(&spec, &stored.env, stored.memory_bytes, stored.pids_limit);
        let sock = self.executor_socket(&s).await?;
        let conn = match executor::connect(&sock).await {
            Ok(c) => c,
            Err(first) => {
                // Nothing was sent yet: starting the executor again and retrying is safe.
                warn!(error = %first, "the session's executor is not reachable; starting it again");
                *s.executor.lock().await = None;
                let sock = self.executor_socket(&s).await?;
                executor::connect(&sock).await?
            }
        };
        // Destroy may proceed now: it kills the executor with the session's cgroups.
        drop(alive);
        let res = executor::exec_on(conn, req, out, v.timeout + EXEC_GRACE).await;
        if matches!(res, Err(RuntimeError::Unavailable(_))) && !*s.alive.read().await {
            return Err(RuntimeError::Unavailable("the session was stopped or deleted while the command ran".into()));
        }
        res
    }

    #[instrument(skip(self), fields(session = %session_id))]
    async fn stop(&self, session_id: &str) -> Result<(), RuntimeError> {
        validate_session_id(session_id)?;
        let _admin = self.inner.admin.lock().await;
        let s = self.lock_sessions().get(session_id).cloned();
        if let Some(s) = &s {
            *s.alive.write().await = false;
        }
        self.inner.cgroups.destroy(&self.session_cgroup(session_id), CGROUP_KILL_TIMEOUT).await?;
        if let Some(s) = s {
            *s.executor.lock().await = None;
        }
        Ok(())
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
        if let Some(s) = &s {
            *s.executor.lock().await = None;
        }
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
