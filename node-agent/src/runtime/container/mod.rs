//! The container runtimes: one hardened container per session, and inside it
//! `sandfleet-executor` running every exec under bubblewrap (two layers).
//! The docker runtime ([`crate::runtime::docker`]) and the CRI runtime
//! ([`crate::runtime::cri`]) are this one [`ContainerRuntime`] over two
//! [`Engine`]s: what differs is only how a container is created, started,
//! listed, re-limited and removed.
//!
//! This module owns the boxes' lifecycle: slots and uids, workspaces and
//! their disks, the optional warm pool, finding boxes again by label after an
//! agent restart, removing orphans, and forwarding execs to the executor over
//! the Unix socket in the session's run directory ([`crate::executor`]).
//! [`hardening`] is the one definition of what a session's container may do,
//! rendered by each engine into its own configuration. File operations use
//! the same [`Workspace`] code as the process runtime on the host side of the
//! workspace bind mount.
//!
//! # On disk
//! `<data_dir>/boxes/<box>/workspace` (0700, the session uid) is bound at
//! `/workspace`; `<data_dir>/boxes/<box>/run` (0700, the session uid) at
//! `/sandfleet` and holds the executor's socket; `<data_dir>/boxes/<box>/session.json`
//! (root, 0600) records the session a box serves. `<data_dir>/seccomp.json`
//! is the profile given to the engine. A box is a container plus these
//! directories; its name is the container's name.
//!
//! # Uids
//! Each box runs as its own host uid `uid_base + slot`, so even an escape
//! from both layers lands as a nobody that cannot read other workspaces.
//!
//! # Warm pool
//! `warm_pool` keeps, per template, that many idle started containers with
//! the template's default limits. A create takes one (recording the claim in
//! `session.json` and changing the limits through the engine only when the
//! session asks for others); a claimed container is never handed out again:
//! it is removed with its session. A background task refills the pool.
//!
//! # Restarts
//! [`ContainerRuntime::with_engine`] lists the containers labelled with this node: a
//! container whose box records a session (or that carries a session label)
//! is that session again (started if it had stopped); every other one (an
//! unclaimed pool container, a half-created box) is removed. A session's box
//! directory whose container is gone gets a new container over the same
//! workspace; other directories without a container are removed. Sessions
//! the cluster no longer assigns are then destroyed by the agent's first
//! reconcile. The `sandfleet.generation` label is the generation a container
//! was created for; `session.json` holds the current one.

pub mod hardening;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sandfleet_common::backoff::Backoff;
use sandfleet_common::ids;
use sandfleet_common::spec::Template;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify, RwLock};
use tracing::{debug, info, instrument, warn};

use self::hardening::{
    ContainerPlan, LABEL_BOX, LABEL_GENERATION, LABEL_NODE, LABEL_POOL, LABEL_SESSION, LABEL_SLOT, LABEL_TEMPLATE,
};
use super::cgroup::AnyCgroupManager;
use super::disk::{DiskQuota, DiskUsage, Disks};
use super::fsutil::{check_node_config, create_dir, invalid, io_ctx, no_free_slot, session_list, write_atomic};
use super::usage::{Usage, UsageMeter};
use super::{
    resolve_spec, ExecEvent, ExecSpec, ExitInfo, ResolvedSpec, Runtime, RuntimeError, SandboxSpec, SessionInfo,
};
use crate::executor::{self, WireExec, EXEC_GRACE, SOCKET_NAME};
use crate::workspace::Workspace;

/// The image every template uses unless configured otherwise.
pub const DEFAULT_IMAGE: &str = "sandfleet/sandbox:latest";
/// The command that builds the image.
pub const BUILD_IMAGE_HINT: &str = "deploy/images/build-sandbox-image (from the repository root, after cargo build)";
/// Timeout of one engine call (Docker API or CRI).
pub const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started container may take until its executor answers.
const EXECUTOR_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Waits between failed warm-pool container creates: 200 ms doubling to 5 s.
const POOL_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).with_floor_percent(50);

/// What an engine reports of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerState {
    /// Whether its process runs.
    pub running: bool,
    /// Its exit code when it has stopped (-1 when unknown).
    pub exit_code: i64,
}

/// A container of this node, as an engine lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The container's (and box's) name.
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Whether it runs.
    pub running: bool,
}

/// How a [`ContainerRuntime`] drives one container engine: the only part
/// that differs between the docker and the CRI runtime. Every call has its
/// own deadline ([`ENGINE_CALL_TIMEOUT`]); a container that does not exist
/// is not an error for [`Engine::remove`] and is `None` for [`Engine::state`].
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The runtime this engine serves.
    fn kind(&self) -> sandfleet_common::spec::Runtime;
    /// Prepares the engine's files under the runtime's data dir (the
    /// seccomp profile, ...). Called once, before any other call.
    async fn init(&mut self, data_dir: &Path) -> Result<(), RuntimeError>;
    /// Whether `image` is present (or made present, as the engine's pull
    /// policy allows); `Err` with a hint when it cannot be.
    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError>;
    /// Creates and starts the container of `plan`.
    async fn run(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError>;
    /// Starts the container of `plan` again after it stopped (the engine
    /// may make a new one in its place).
    async fn start_again(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError>;
    /// The container's state; `None` when it does not exist.
    async fn state(&self, name: &str) -> Result<Option<ContainerState>, RuntimeError>;
    /// Applies new limits to a running container.
    async fn update(&self, name: &str, limits: &ResolvedSpec) -> Result<(), RuntimeError>;
    /// Removes the container and everything the engine made for it. Ok if absent.
    async fn remove(&self, name: &str) -> Result<(), RuntimeError>;
    /// Every container labelled with this node.
    async fn list(&self, node_id: &str) -> Result<Vec<Listed>, RuntimeError>;
    /// The images the engine holds, by every name (repository:tag) it knows them by.
    async fn images(&self) -> Result<Vec<String>, RuntimeError>;
    /// The command an operator runs to read a container's output.
    fn logs_hint(&self, name: &str) -> String;
    /// The container's cgroup, relative to the cgroup root, for reading what
    /// it uses; `None` when the engine cannot tell now (not running).
    async fn cgroup(&self, name: &str) -> Option<String>;
}

/// Configuration of a [`ContainerRuntime`].
#[derive(Debug, Clone)]
pub struct ContainerRuntimeConfig {
    /// Where boxes live.
    pub data_dir: PathBuf,
    /// This node's id; labels its containers.
    pub node_id: String,
    /// First host uid of the session slots.
    pub uid_base: u32,
    /// Number of slots (pool containers included).
    pub slots: u32,
    /// Template → image. The runtime offers exactly these templates.
    pub templates: BTreeMap<Template, String>,
    /// Template → idle containers to keep ready.
    pub warm_pool: BTreeMap<Template, u32>,
    /// How boxes get their disk (default: a filesystem of the session's quota).
    pub disk_quota: DiskQuota,
}

impl ContainerRuntimeConfig {
    /// Defaults: every template on [`DEFAULT_IMAGE`], no warm pool.
    pub fn new(data_dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: node_id.into(),
            uid_base: 300_000,
            slots: 256,
            templates: Template::ALL.iter().map(|t| (*t, DEFAULT_IMAGE.to_string())).collect(),
            warm_pool: BTreeMap::new(),
            disk_quota: DiskQuota::default(),
        }
    }
}

/// What `session.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    session_id: String,
    generation: u64,
    spec: ResolvedSpec,
}

/// A container with its directories, serving one session or waiting in the pool.
struct BoxState {
    name: String,
    slot: u32,
    uid: u32,
    dir: PathBuf,
    /// The limits the container currently has.
    limits: Mutex<ResolvedSpec>,
    /// Its labels besides the node, box and slot ones.
    labels: HashMap<String, String>,
}

impl BoxState {
    fn workspace_dir(&self) -> PathBuf {
        self.dir.join("workspace")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn socket(&self) -> PathBuf {
        self.run_dir().join(SOCKET_NAME)
    }
    fn limits(&self) -> ResolvedSpec {
        self.limits.lock().clone()
    }
}

struct Session {
    id: String,
    bx: Arc<BoxState>,
    generation: AtomicU64,
    spec: Mutex<ResolvedSpec>,
    /// `true` while execs may start; destroy takes the write lock.
    alive: RwLock<bool>,
}

impl Session {
    /// A live session of `spec` in `bx`.
    fn new(spec: &SandboxSpec, bx: Arc<BoxState>, resolved: ResolvedSpec) -> Self {
        Session {
            id: spec.session_id.clone(),
            bx,
            generation: AtomicU64::new(spec.generation),
            spec: Mutex::new(resolved),
            alive: RwLock::new(true),
        }
    }

    fn spec(&self) -> ResolvedSpec {
        self.spec.lock().clone()
    }
}

#[derive(Default)]
struct Tables {
    sessions: HashMap<String, Arc<Session>>,
    /// Idle started pool boxes per template.
    pool: HashMap<Template, Vec<Arc<BoxState>>>,
    /// Slots of boxes that exist or are being created.
    slots: HashSet<u32>,
    /// Pool boxes being created, per template.
    pool_pending: HashMap<Template, u32>,
}

struct Inner<E> {
    cfg: ContainerRuntimeConfig,
    engine: E,
    disks: Disks,
    tables: Mutex<Tables>,
    /// Per-session locks: prepare and destroy of one session never overlap.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    refill: Arc<Notify>,
    /// Set by [`ContainerRuntime::remove_all`]: the pool stops refilling.
    stopped: std::sync::atomic::AtomicBool,
    /// The task that keeps the warm pool filled; dropping the runtime aborts it.
    pool_task: Mutex<Option<tokio_util::task::AbortOnDropHandle<()>>>,
    /// The host's cgroups, for reading what the boxes use; `None` when they
    /// cannot be read here (then [`Runtime::usage`] reports nothing).
    cgroups: Option<AnyCgroupManager>,
    /// Each session box's cgroup as its engine told it, by box name.
    box_cgroups: Mutex<HashMap<String, String>>,
    /// Sums the boxes' use ([`Runtime::usage`]).
    usage: UsageMeter,
}

/// A runtime of one hardened container per session on engine `E`. Cheap to clone.
pub struct ContainerRuntime<E> {
    inner: Arc<Inner<E>>,
}

impl<E> Clone for ContainerRuntime<E> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<E: Engine> std::fmt::Debug for ContainerRuntime<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerRuntime")
            .field("engine", &self.inner.engine.kind())
            .field("data_dir", &self.inner.cfg.data_dir)
            .field("node_id", &self.inner.cfg.node_id)
            .finish()
    }
}

/// Runs one engine call with [`ENGINE_CALL_TIMEOUT`]; `engine` names the
/// engine in the error ("docker engine", "CRI runtime").
pub(crate) async fn with_deadline<T, Err: std::fmt::Display>(
    engine: &str,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, Err>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(ENGINE_CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RuntimeError::Unavailable(format!("{engine}: {what}: {e}"))),
        Err(_) => Err(RuntimeError::Unavailable(format!(
            "{engine}: {what}: no answer within {} s",
            ENGINE_CALL_TIMEOUT.as_secs()
        ))),
    }
}

fn read_record(dir: &Path) -> Option<SessionRecord> {
    let b = fs::read(dir.join("session.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

fn random_suffix() -> String {
    use rand::Rng as _;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

impl<E: Engine> ContainerRuntime<E> {
    /// Checks the configuration and the images, prepares the engine's files,
    /// reconciles the containers of this node and starts the warm pool.
    #[instrument(skip(cfg, engine), fields(node = %cfg.node_id, data_dir = %cfg.data_dir.display(), engine = %engine.kind()))]
    pub async fn with_engine(cfg: ContainerRuntimeConfig, mut engine: E) -> Result<Self, RuntimeError> {
        let kind = engine.kind();
        check_node_config(&cfg.node_id, cfg.slots, cfg.uid_base)?;
        if cfg.templates.is_empty() {
            return Err(invalid(format!("the {kind} runtime needs at least one template")));
        }
        for (t, n) in &cfg.warm_pool {
            if !cfg.templates.contains_key(t) {
                return Err(invalid(format!("warm pool for unknown template {t:?}")));
            }
            if *n > cfg.slots {
                return Err(invalid(format!("warm pool of {n} for {t:?} exceeds the {} slots", cfg.slots)));
            }
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(RuntimeError::Unavailable(format!(
                "the {kind} runtime must run as root (it gives each session's files their own host uid)"
            )));
        }
        let images: HashSet<&String> = cfg.templates.values().collect();
        for image in images {
            engine.ensure_image(image).await?;
        }
        fs::create_dir_all(&cfg.data_dir).map_err(|e| io_ctx(format!("creating {}", cfg.data_dir.display()), e))?;
        let data_dir =
            fs::canonicalize(&cfg.data_dir).map_err(|e| io_ctx(format!("resolving {}", cfg.data_dir.display()), e))?;
        create_dir(&data_dir.join("boxes"), 0o711, None)?;
        engine.init(&data_dir).await?;
        let disks = Disks::new(&cfg.disk_quota, &data_dir.join("disks")).await?;
        let cfg = ContainerRuntimeConfig { data_dir, ..cfg };
        let rt = Self {
            inner: Arc::new(Inner {
                cfg,
                engine,
                disks,
                tables: Mutex::new(Tables::default()),
                locks: Mutex::new(HashMap::new()),
                refill: Arc::new(Notify::new()),
                stopped: std::sync::atomic::AtomicBool::new(false),
                pool_task: Mutex::new(None),
                cgroups: AnyCgroupManager::detect()
                    .inspect_err(|e| warn!(error = %e, "cannot read cgroups; sandbox usage is not reported"))
                    .ok(),
                box_cgroups: Mutex::new(HashMap::new()),
                usage: UsageMeter::new(),
            }),
        };
        rt.rediscover().await?;
        if !rt.inner.cfg.warm_pool.is_empty() {
            let task = tokio::spawn(pool_task(Arc::downgrade(&rt.inner), rt.inner.refill.clone()));
            *rt.inner.pool_task.lock() = Some(tokio_util::task::AbortOnDropHandle::new(task));
        }
        Ok(rt)
    }

    /// The configuration in use.
    pub fn config(&self) -> &ContainerRuntimeConfig {
        &self.inner.cfg
    }

    /// The engine (tests inspect containers through it).
    pub fn engine(&self) -> &E {
        &self.inner.engine
    }

    /// The container name of a session held here.
    pub fn container_name(&self, session_id: &str) -> Option<String> {
        self.tables().sessions.get(session_id).map(|s| s.bx.name.clone())
    }

    /// The host uid of a session held here.
    pub fn session_uid(&self, session_id: &str) -> Option<u32> {
        self.tables().sessions.get(session_id).map(|s| s.bx.uid)
    }

    /// Idle pool containers of a template.
    pub fn pool_size(&self, template: Template) -> usize {
        self.tables().pool.get(&template).map_or(0, Vec::len)
    }

    /// Waits until every template's pool is full (or `timeout` passes); returns whether it is.
    pub async fn wait_pool_full(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let full = self.inner.cfg.warm_pool.iter().all(|(t, n)| self.pool_size(*t) >= *n as usize);
            if full {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops refilling the warm pool and removes its idle containers (agent
    /// shutdown). Sessions keep running; a restarted agent finds them again.
    pub async fn stop_pool(&self) -> Result<(), RuntimeError> {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.refill.notify_one();
        // A pool container being created right now lands in the pool: the
        // refill task ends after it (or is aborted if the engine hangs).
        let task = self.inner.pool_task.lock().take();
        if let Some(task) = task {
            if tokio::time::timeout(ENGINE_CALL_TIMEOUT * 2, task).await.is_err() {
                warn!("the warm pool's refill task did not stop in time; aborted it");
            }
        }
        let pool: Vec<Arc<BoxState>> = self.tables().pool.drain().flat_map(|(_, v)| v).collect();
        for bx in pool {
            self.remove_box(&bx.name, &bx.dir).await?;
            self.tables().slots.remove(&bx.slot);
        }
        Ok(())
    }

    /// Stops the warm pool and destroys every session and pool container of
    /// this node (tests, decommissioning).
    pub async fn remove_all(&self) -> Result<(), RuntimeError> {
        self.stop_pool().await?;
        let ids: Vec<String> = self.tables().sessions.keys().cloned().collect();
        for id in ids {
            self.destroy(&id).await?;
        }
        super::disk::unmount_all_under(&self.boxes_dir());
        Ok(())
    }

    fn tables(&self) -> parking_lot::MutexGuard<'_, Tables> {
        self.inner.tables.lock()
    }

    fn session_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.locks.lock().entry(id.to_string()).or_default().clone()
    }

    fn get(&self, id: &str) -> Result<Arc<Session>, RuntimeError> {
        self.tables().sessions.get(id).cloned().ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    fn boxes_dir(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("boxes")
    }

    fn image_of(&self, template: Template) -> Result<&str, RuntimeError> {
        self.inner.cfg.templates.get(&template).map(String::as_str).ok_or_else(|| {
            invalid(format!(
                "template {template} is not offered by the {} runtime of this node",
                self.inner.engine.kind()
            ))
        })
    }

    /// Checks a sandbox spec against the shared rules and this node's templates.
    fn resolve(&self, spec: &SandboxSpec) -> Result<ResolvedSpec, RuntimeError> {
        resolve_spec(spec, self.inner.engine.kind(), |t| self.inner.cfg.templates.contains_key(&t))
    }

    fn reserve_slot(&self) -> Result<u32, RuntimeError> {
        let mut t = self.tables();
        let slot = (0..self.inner.cfg.slots)
            .find(|s| !t.slots.contains(s))
            .ok_or_else(|| no_free_slot(self.inner.cfg.slots))?;
        t.slots.insert(slot);
        Ok(slot)
    }

    fn release_slot(&self, slot: u32) {
        self.tables().slots.remove(&slot);
    }

    async fn new_box(
        &self,
        slot: u32,
        mut limits: ResolvedSpec,
        labels: HashMap<String, String>,
    ) -> Result<BoxState, RuntimeError> {
        let name = format!("sandfleet-{}-{}", self.inner.cfg.node_id, random_suffix());
        let dir = self.boxes_dir().join(&name);
        let uid = self.inner.cfg.uid_base + slot;
        if !self.inner.disks.enabled() {
            // Recorded as "no filesystem of its own" (see `Runtime::prepare`).
            (limits.disk_bytes, limits.disk_inodes) = (0, 0);
        }
        let made = async {
            create_dir(&dir, 0o711, None)?;
            create_dir(&dir.join("workspace"), 0o700, Some(uid))?;
            self.inner.disks.attach(&name, &dir.join("workspace"), limits.disk_bytes, limits.disk_inodes, uid).await?;
            create_dir(&dir.join("run"), 0o700, Some(uid))
        }
        .await;
        if let Err(e) = made {
            let _ = self.inner.disks.detach(&name, &dir.join("workspace")).await;
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(BoxState { name, slot, uid, dir, limits: Mutex::new(limits), labels })
    }

    /// The container of `bx` as the engine makes it.
    fn plan<'a>(&self, bx: &'a BoxState, limits: &'a ResolvedSpec) -> Result<ContainerPlan<'a>, RuntimeError> {
        // A cluster template's image, else this node's image for the built-in template.
        let image = match limits.image.as_str() {
            "" => self.image_of(limits.template)?.to_string(),
            image => image.to_string(),
        };
        let mut labels = bx.labels.clone();
        labels.insert(LABEL_NODE.into(), self.inner.cfg.node_id.clone());
        labels.insert(LABEL_BOX.into(), bx.name.clone());
        labels.insert(LABEL_SLOT.into(), bx.slot.to_string());
        Ok(ContainerPlan {
            name: &bx.name,
            image,
            uid: bx.uid,
            limits,
            workspace_dir: bx.workspace_dir(),
            run_dir: bx.run_dir(),
            labels,
        })
    }

    /// Creates and starts the container of `bx` and waits for its executor.
    async fn start_box(&self, bx: &BoxState) -> Result<(), RuntimeError> {
        let limits = bx.limits();
        self.inner.engine.run(&self.plan(bx, &limits)?).await?;
        self.wait_ready(bx).await
    }

    async fn wait_ready(&self, bx: &BoxState) -> Result<(), RuntimeError> {
        let started = tokio::time::Instant::now();
        let sock = bx.socket();
        let mut delay = Duration::from_millis(1);
        let mut checks = 0u32;
        loop {
            match executor::ping(&sock).await {
                Ok(v) if v == executor::PROTOCOL_VERSION => {
                    debug!(container = %bx.name, elapsed_ms = started.elapsed().as_millis() as u64, "executor ready");
                    return Ok(());
                }
                Ok(v) => {
                    return Err(RuntimeError::Unavailable(format!(
                        "the executor in the sandbox image speaks protocol {v}, this agent {}; rebuild the image with {BUILD_IMAGE_HINT}",
                        executor::PROTOCOL_VERSION
                    )))
                }
                Err(e) => {
                    if started.elapsed() > EXECUTOR_READY_TIMEOUT {
                        return Err(RuntimeError::Unavailable(format!(
                            "the executor of container {} did not answer within {} s: {e} (see `{}`)",
                            bx.name,
                            EXECUTOR_READY_TIMEOUT.as_secs(),
                            self.inner.engine.logs_hint(&bx.name)
                        )));
                    }
                }
            }
            checks += 1;
            // Every ~50 checks, make sure the container has not died.
            if checks.is_multiple_of(50) {
                if let Some(st) = self.inner.engine.state(&bx.name).await? {
                    if !st.running {
                        return Err(RuntimeError::Unavailable(format!(
                            "container {} exited (code {}) before its executor answered; see `{}`",
                            bx.name,
                            st.exit_code,
                            self.inner.engine.logs_hint(&bx.name)
                        )));
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// Starts the box's container again if the engine says it is not running.
    async fn ensure_running(&self, bx: &BoxState) -> Result<(), RuntimeError> {
        let st = self
            .inner
            .engine
            .state(&bx.name)
            .await?
            .ok_or_else(|| RuntimeError::Unavailable(format!("container {} no longer exists", bx.name)))?;
        if !st.running {
            info!(container = %bx.name, "session container is not running; starting it again");
            let limits = bx.limits();
            self.inner.engine.start_again(&self.plan(bx, &limits)?).await?;
        }
        self.wait_ready(bx).await
    }

    async fn remove_container(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.engine.remove(name).await
    }

    async fn remove_box(&self, name: &str, dir: &Path) -> Result<(), RuntimeError> {
        self.remove_container(name).await?;
        self.inner.disks.detach(name, &dir.join("workspace")).await?;
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_ctx(format!("removing {}", dir.display()), e)),
        }
    }

    fn persist(&self, s: &Session) -> Result<(), RuntimeError> {
        let rec =
            SessionRecord { session_id: s.id.clone(), generation: s.generation.load(Ordering::SeqCst), spec: s.spec() };
        let json = serde_json::to_vec_pretty(&rec)
            .map_err(|e| RuntimeError::Internal(format!("encoding the session record: {e}")))?;
        write_atomic(&s.bx.dir.join("session.json"), &json, 0o600)
    }

    /// Applies `limits` to a running container when they differ from what it has.
    async fn relimit(&self, bx: &BoxState, limits: &ResolvedSpec) -> Result<(), RuntimeError> {
        let current = bx.limits();
        if (current.cpu_millis, current.memory_bytes, current.pids_limit)
            == (limits.cpu_millis, limits.memory_bytes, limits.pids_limit)
        {
            return Ok(());
        }
        self.inner.engine.update(&bx.name, limits).await?;
        *bx.limits.lock() = limits.clone();
        Ok(())
    }

    /// Creates one pool box for `template` and adds it to the pool.
    async fn add_pool_box(&self, template: Template) -> Result<(), RuntimeError> {
        let defaults = self.resolve(&SandboxSpec {
            session_id: String::new(),
            generation: 0,
            spec: sandfleet_proto::v1::SessionSpec { template: template.to_string(), ..Default::default() },
        })?;
        let slot = self.reserve_slot()?;
        let labels = HashMap::from([(LABEL_POOL.to_string(), template.to_string())]);
        let bx = match self.new_box(slot, defaults, labels).await {
            Ok(b) => b,
            Err(e) => {
                self.release_slot(slot);
                return Err(e);
            }
        };
        if let Err(e) = self.start_box(&bx).await {
            let _ = self.remove_box(&bx.name, &bx.dir).await;
            self.release_slot(slot);
            return Err(e);
        }
        debug!(container = %bx.name, %template, "pool container ready");
        self.tables().pool.entry(template).or_default().push(Arc::new(bx));
        Ok(())
    }

    /// Rebuilds the tables from the containers labelled with this node.
    async fn rediscover(&self) -> Result<(), RuntimeError> {
        let list = self.inner.engine.list(&self.inner.cfg.node_id).await?;
        let mut kept: HashSet<String> = HashSet::new();
        for c in list {
            let (name, labels) = (c.name.clone(), c.labels.clone());
            let box_name = labels.get(LABEL_BOX).cloned().unwrap_or_default();
            let valid_box = box_name == name && name.starts_with(&format!("sandfleet-{}-", self.inner.cfg.node_id));
            let dir = self.boxes_dir().join(&name);
            let slot = labels.get(LABEL_SLOT).and_then(|s| s.parse::<u32>().ok()).filter(|s| *s < self.inner.cfg.slots);
            let record = if valid_box { read_record(&dir) } else { None };
            let record = record.or_else(|| {
                // A cold-created container whose record was lost: its labels still say which session.
                let sid = labels.get(LABEL_SESSION)?;
                let generation = labels.get(LABEL_GENERATION)?.parse().ok()?;
                let template = labels.get(LABEL_TEMPLATE).cloned().unwrap_or_else(|| "default".into());
                let mut spec = self
                    .resolve(&SandboxSpec {
                        session_id: sid.clone(),
                        generation,
                        spec: sandfleet_proto::v1::SessionSpec { template, ..Default::default() },
                    })
                    .ok()?;
                if !super::disk::has_own_filesystem(&dir.join("workspace")) {
                    // Not known to have a filesystem of its own: recorded as none, so
                    // nothing is ever mounted over its files.
                    (spec.disk_bytes, spec.disk_inodes) = (0, 0);
                }
                Some(SessionRecord { session_id: sid.clone(), generation, spec })
            });
            let usable = valid_box && dir.join("workspace").is_dir();
            let slot_free = slot.is_some_and(|s| !self.tables().slots.contains(&s));
            match (record, slot) {
                (Some(rec), Some(slot)) if usable && slot_free && ids::validate_session_id(&rec.session_id).is_ok() => {
                    let running = c.running;
                    let own = [LABEL_NODE, LABEL_BOX, LABEL_SLOT];
                    let bx = BoxState {
                        name: name.clone(),
                        slot,
                        uid: self.inner.cfg.uid_base + slot,
                        dir,
                        limits: Mutex::new(rec.spec.clone()),
                        labels: labels.into_iter().filter(|(k, _)| !own.contains(&k.as_str())).collect(),
                    };
                    // Its filesystem first (mounted again after a host reboot): the
                    // container binds whatever is at the workspace path when it starts.
                    if rec.spec.disk_bytes != 0 {
                        if let Err(e) = self.inner.disks.remount(&name, &bx.workspace_dir()).await {
                            tracing::error!(container = %name, error = %e, "cannot mount the session's filesystem again; leaving its box alone");
                            continue;
                        }
                    }
                    if !running {
                        info!(container = %name, session = %rec.session_id, "restarting a stopped session container");
                        let restarted = match self.plan(&bx, &rec.spec) {
                            Ok(plan) => match self.inner.engine.start_again(&plan).await {
                                Ok(()) => self.wait_ready(&bx).await,
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e),
                        };
                        if let Err(e) = restarted {
                            warn!(container = %name, error = %e, "cannot restart the session container; removing it");
                            self.remove_box(&name, &bx.dir).await?;
                            continue;
                        }
                    }
                    info!(container = %name, session = %rec.session_id, generation = rec.generation, "rediscovered session container");
                    let s = Session {
                        id: rec.session_id.clone(),
                        bx: Arc::new(bx),
                        generation: AtomicU64::new(rec.generation),
                        spec: Mutex::new(rec.spec),
                        alive: RwLock::new(true),
                    };
                    let mut t = self.tables();
                    t.slots.insert(slot);
                    t.sessions.insert(rec.session_id, Arc::new(s));
                    kept.insert(name);
                }
                _ => {
                    info!(container = %name, pool = c.labels.get(LABEL_POOL).map(String::as_str).unwrap_or(""), "removing an orphaned container of this node");
                    self.remove_container(&name).await?;
                    if valid_box {
                        let _ = self.inner.disks.detach(&name, &dir.join("workspace")).await;
                        let _ = fs::remove_dir_all(&dir);
                    }
                }
            }
        }
        // Box directories without a container: a session's box (its container was removed
        // behind our back) gets a new container over the same workspace; anything else goes.
        let rd = fs::read_dir(self.boxes_dir()).map_err(|e| io_ctx("reading the boxes dir", e))?;
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if kept.contains(&name) {
                continue;
            }
            let dir = e.path();
            if name.starts_with(&format!("sandfleet-{}-", self.inner.cfg.node_id)) {
                if let Some(rec) = read_record(&dir) {
                    match self.recreate_box(&name, &dir, rec).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            // Kept for the next start: the workspace is the session's data.
                            warn!(dir = %dir.display(), error = %e, "cannot recreate the container of a session's box; keeping its directory");
                            continue;
                        }
                    }
                }
            }
            warn!(dir = %dir.display(), "removing a box directory without a container");
            let _ = self.inner.disks.detach(&name, &dir.join("workspace")).await;
            let _ = fs::remove_dir_all(&dir);
        }
        let boxes: HashSet<String> = self.tables().sessions.values().map(|s| s.bx.name.clone()).collect();
        self.inner.disks.retain(&boxes);
        info!(sessions = self.tables().sessions.len(), "containers reconciled");
        Ok(())
    }
}

impl<E: Engine> ContainerRuntime<E> {
    /// Creates a new container for a session whose box directory survived but
    /// whose container did not; its slot comes from the workspace's owner.
    /// `Ok(false)` when the box cannot be reused.
    async fn recreate_box(&self, name: &str, dir: &Path, rec: SessionRecord) -> Result<bool, RuntimeError> {
        use std::os::unix::fs::MetadataExt as _;
        if ids::validate_session_id(&rec.session_id).is_err() || self.tables().sessions.contains_key(&rec.session_id) {
            return Ok(false);
        }
        let Ok(meta) = fs::symlink_metadata(dir.join("workspace")) else { return Ok(false) };
        let Some(slot) = meta.uid().checked_sub(self.inner.cfg.uid_base).filter(|s| *s < self.inner.cfg.slots) else {
            return Ok(false);
        };
        if !meta.is_dir() || !self.tables().slots.insert(slot) {
            return Ok(false);
        }
        let bx = Arc::new(BoxState {
            name: name.to_string(),
            slot,
            uid: self.inner.cfg.uid_base + slot,
            dir: dir.to_path_buf(),
            limits: Mutex::new(rec.spec.clone()),
            labels: session_labels(&rec.session_id, rec.generation, rec.spec.template),
        });
        create_dir(&bx.run_dir(), 0o700, Some(bx.uid))?;
        if rec.spec.disk_bytes != 0 {
            // Its filesystem again (mounted still, or from its image after a
            // reboot); never a new one over its files.
            self.inner.disks.remount(name, &bx.workspace_dir()).await?;
        }
        if let Err(e) = self.start_box(&bx).await {
            let _ = self.remove_container(name).await;
            // The slot stays reserved: its uid still owns the kept workspace.
            return Err(e);
        }
        info!(container = %name, session = %rec.session_id, "recreated the container of a session whose container was gone; its workspace is kept");
        let s = Session {
            id: rec.session_id.clone(),
            bx,
            generation: AtomicU64::new(rec.generation),
            spec: Mutex::new(rec.spec),
            alive: RwLock::new(true),
        };
        self.tables().sessions.insert(rec.session_id, Arc::new(s));
        Ok(true)
    }
}

/// The labels of a session's cold-created container (besides the node, box and slot).
fn session_labels(session_id: &str, generation: u64, template: Template) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_SESSION.to_string(), session_id.to_string()),
        (LABEL_GENERATION.to_string(), generation.to_string()),
        (LABEL_TEMPLATE.to_string(), template.to_string()),
    ])
}

/// Keeps the warm pool filled until the pool is stopped or the runtime is dropped.
async fn pool_task<E: Engine>(inner: Weak<Inner<E>>, refill: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        if strong.stopped.load(Ordering::SeqCst) {
            return;
        }
        let rt = ContainerRuntime { inner: strong };
        let wanted: Vec<(Template, u32)> = rt.inner.cfg.warm_pool.iter().map(|(t, n)| (*t, *n)).collect();
        let mut next: Option<Template> = None;
        {
            let mut t = rt.tables();
            for (tpl, n) in &wanted {
                let have = t.pool.get(tpl).map_or(0, Vec::len) as u32 + t.pool_pending.get(tpl).copied().unwrap_or(0);
                if have < *n {
                    *t.pool_pending.entry(*tpl).or_default() += 1;
                    next = Some(*tpl);
                    break;
                }
            }
        }
        match next {
            Some(tpl) => {
                let res = rt.add_pool_box(tpl).await;
                if let Some(p) = rt.tables().pool_pending.get_mut(&tpl) {
                    *p = p.saturating_sub(1);
                }
                match res {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        warn!(template = %tpl, error = %e, "could not add a warm pool container");
                        let backoff = POOL_RETRY.delay(failures - 1);
                        drop(rt);
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            None => {
                drop(rt);
                let notified = refill.notified();
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl<E: Engine> Runtime for ContainerRuntime<E> {
    fn kind(&self) -> sandfleet_common::spec::Runtime {
        self.inner.engine.kind()
    }

    async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        self.inner.engine.images().await
    }

    #[instrument(skip(self, spec), fields(session = %spec.session_id, generation = spec.generation))]
    async fn prepare(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        ids::validate_session_id(&spec.session_id).map_err(|e| invalid(e.to_string()))?;
        let mut resolved = self.resolve(spec)?;
        if !self.inner.disks.enabled() {
            // Recorded as "no filesystem of its own", so a later agent with
            // quotas on never mounts an empty one over its files.
            (resolved.disk_bytes, resolved.disk_inodes) = (0, 0);
        }
        let lock = self.session_lock(&spec.session_id);
        let _guard = lock.lock().await;
        let existing = self.tables().sessions.get(&spec.session_id).cloned();
        if let Some(s) = existing {
            // A filesystem does not change its size in place: the disk stays what it was made with.
            let had = s.spec();
            (resolved.disk_bytes, resolved.disk_inodes) = (had.disk_bytes, had.disk_inodes);
            s.generation.fetch_max(spec.generation, Ordering::SeqCst);
            if s.spec().template != resolved.template {
                warn!(old = %s.spec().template, new = %resolved.template, "a session cannot change its template in place; keeping its container");
            }
            self.relimit(&s.bx, &resolved).await?;
            *s.spec.lock() = resolved;
            self.persist(&s)?;
            debug!("session already prepared; updated");
            return Ok(());
        }

        // Warm pool first, when its boxes' disk is the one asked for (a
        // filesystem cannot change its size in place) and the session runs
        // this node's own image (the pool holds no other).
        let pooled = self
            .tables()
            .pool
            .get_mut(&resolved.template)
            .filter(|_| resolved.image.is_empty())
            .filter(|p| p.last().is_some_and(|b| same_disk(&b.limits(), &resolved, &self.inner.disks)))
            .and_then(Vec::pop);
        if let Some(bx) = pooled {
            self.inner.refill.notify_one();
            let s = Session::new(spec, bx.clone(), resolved.clone());
            let claimed = async {
                self.persist(&s)?;
                self.relimit(&bx, &resolved).await
            }
            .await;
            if let Err(e) = claimed {
                warn!(container = %bx.name, error = %e, "claiming a pool container failed; removing it");
                let _ = self.remove_box(&bx.name, &bx.dir).await;
                self.release_slot(bx.slot);
                return Err(e);
            }
            info!(container = %bx.name, "session prepared from the warm pool");
            self.tables().sessions.insert(spec.session_id.clone(), Arc::new(s));
            return Ok(());
        }

        // Cold create. A cluster template's image must be here: nodes never
        // pull for a session (the coordinators place it only where its agent
        // advertised the image, but it may have been removed since).
        if !resolved.image.is_empty() {
            self.inner.engine.ensure_image(&resolved.image).await?;
        }
        let slot = self.reserve_slot()?;
        let labels = session_labels(&spec.session_id, spec.generation, resolved.template);
        let bx = match self.new_box(slot, resolved.clone(), labels).await {
            Ok(b) => Arc::new(b),
            Err(e) => {
                self.release_slot(slot);
                return Err(e);
            }
        };
        let s = Session::new(spec, bx.clone(), resolved.clone());
        let res = async {
            self.persist(&s)?;
            self.start_box(&bx).await
        }
        .await;
        if let Err(e) = res {
            warn!(error = %e, "prepare failed; rolling back");
            let _ = self.remove_box(&bx.name, &bx.dir).await;
            self.release_slot(slot);
            return Err(e);
        }
        info!(container = %bx.name, uid = bx.uid, "session prepared");
        self.tables().sessions.insert(spec.session_id.clone(), Arc::new(s));
        Ok(())
    }

    #[instrument(skip(self, spec, out), fields(session = %session_id))]
    async fn exec(
        &self,
        session_id: &str,
        spec: ExecSpec,
        out: mpsc::Sender<ExecEvent>,
    ) -> Result<ExitInfo, RuntimeError> {
        ids::validate_session_id(session_id).map_err(|e| invalid(e.to_string()))?;
        // Checked here too, so a bad request gets its precise error without a round trip.
        let v = crate::exec::validate(&spec, super::bwrap::CODE_PATH)?;
        let s = self.get(session_id)?;
        let alive = s.alive.read().await;
        if !*alive {
            return Err(RuntimeError::NotFound(session_id.to_string()));
        }
        let stored = s.spec();
        let req = WireExec::new(&spec, &stored.env, stored.memory_bytes, stored.pids_limit);
        let sock = s.bx.socket();
        let conn = match executor::connect(&sock).await {
            Ok(c) => c,
            Err(first) => {
                // Ask the engine rather than trust our table: a container that stopped (killed,
                // host restart) is started again; its workspace is on the host and survives.
                warn!(container = %s.bx.name, error = %first, "the executor is not reachable; checking the container");
                self.ensure_running(&s.bx)
                    .await
                    .map_err(|e| RuntimeError::Unavailable(format!("{first}; restarting the container failed: {e}")))?;
                executor::connect(&sock).await?
            }
        };
        drop(alive);
        executor::exec_on(conn, req, out, v.timeout + EXEC_GRACE).await
    }

    #[instrument(skip(self), fields(session = %session_id))]
    async fn stop(&self, session_id: &str) -> Result<(), RuntimeError> {
        ids::validate_session_id(session_id).map_err(|e| invalid(e.to_string()))?;
        let lock = self.session_lock(session_id);
        let _guard = lock.lock().await;
        let Some(s) = self.tables().sessions.get(session_id).cloned() else {
            return Ok(());
        };
        *s.alive.write().await = false;
        // The container goes (every process in it); its workspace directory on the host stays.
        self.remove_container(&s.bx.name).await
    }

    async fn destroy(&self, session_id: &str) -> Result<(), RuntimeError> {
        ids::validate_session_id(session_id).map_err(|e| invalid(e.to_string()))?;
        let lock = self.session_lock(session_id);
        let _guard = lock.lock().await;
        let Some(s) = self.tables().sessions.get(session_id).cloned() else {
            return Ok(());
        };
        *s.alive.write().await = false;
        self.remove_box(&s.bx.name, &s.bx.dir).await?;
        {
            let mut t = self.tables();
            t.sessions.remove(session_id);
            // Freed last: a new box cannot get this uid while files of the old one exist.
            t.slots.remove(&s.bx.slot);
        }
        self.inner.locks.lock().remove(session_id);
        info!(container = %s.bx.name, "session destroyed");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SessionInfo>, RuntimeError> {
        Ok(session_list(self.tables().sessions.values().map(|s| (&s.id, &s.generation))))
    }

    fn workspace(&self, session_id: &str) -> Result<Workspace, RuntimeError> {
        ids::validate_session_id(session_id).map_err(|e| invalid(e.to_string()))?;
        let s = self.get(session_id)?;
        Ok(Workspace::new(s.bx.workspace_dir(), s.bx.uid, s.bx.uid))
    }

    async fn release(&self) -> Result<(), RuntimeError> {
        // The pool's containers first: their filesystems are the disks' to release too.
        let res = self.stop_pool().await;
        self.inner.disks.release_pool().await;
        res
    }

    fn disk_usage(&self, session_id: &str) -> Result<DiskUsage, RuntimeError> {
        ids::validate_session_id(session_id).map_err(|e| invalid(e.to_string()))?;
        let s = self.get(session_id)?;
        self.inner.disks.usage(&s.bx.workspace_dir())
    }

    /// The session boxes' cgroups, read on the host (idle warm-pool boxes are
    /// not counted). The engine names each container's cgroup: the CRI
    /// runtime's pod cgroup, or the Docker container's as its init's
    /// `/proc/PID/cgroup` says. A box whose cgroup is unknown counts with its
    /// last reading; without readable host cgroups everything is 0.
    async fn usage(&self) -> Usage {
        let boxes: Vec<String> = self.tables().sessions.values().map(|s| s.bx.name.clone()).collect();
        let Some(cg) = &self.inner.cgroups else { return self.inner.usage.observe([]) };
        self.inner.box_cgroups.lock().retain(|name, _| boxes.contains(name));
        let mut samples = Vec::with_capacity(boxes.len());
        for name in boxes {
            let known = self.inner.box_cgroups.lock().get(&name).cloned();
            let rel = match known {
                Some(rel) => Some(rel),
                None => {
                    let found = self.inner.engine.cgroup(&name).await;
                    if let Some(rel) = &found {
                        self.inner.box_cgroups.lock().insert(name.clone(), rel.clone());
                    }
                    found
                }
            };
            let sample = rel.and_then(|rel| {
                // Unreadable (the container was made again elsewhere?): ask the engine next time.
                cg.usage(&rel).inspect_err(|_| drop(self.inner.box_cgroups.lock().remove(&name))).ok()
            });
            samples.push((name, sample));
        }
        self.inner.usage.observe(samples)
    }
}

/// Whether a box made with `have` gives a session asking for `want` its disk.
fn same_disk(have: &ResolvedSpec, want: &ResolvedSpec, disks: &Disks) -> bool {
    !disks.enabled() || (have.disk_bytes, have.disk_inodes) == (want.disk_bytes, want.disk_inodes)
}
