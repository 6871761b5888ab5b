//! The sync engine: keeps each running session's workspace copied to the
//! [`WorkspaceStore`], and restores it when a session is placed on this node.
//!
//! A sync scans the workspace (never following a symlink: links are recorded
//! as links, FIFOs, sockets and devices are skipped), hashes only files whose
//! size or mtime changed since the last manifest, uploads only contents the
//! store does not hold yet (a bounded number at once; the SDK retries each
//! request with backoff), then writes the manifest, and only then deletes
//! blobs the new manifest no longer names.
//!
//! Generations fence copies: a restore writes a manifest with its own
//! generation before the session reports RUNNING, and a sync reads the stored
//! manifest's generation before writing its own; a copy that finds a newer
//! generation stops syncing, so a stale copy on a cut-off node cannot
//! overwrite the workspace of its replacement.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cap_std::fs::{Dir, MetadataExt as _, OpenOptions, OpenOptionsExt as _, PermissionsExt as _};
use futures::{StreamExt as _, TryStreamExt as _};
use sandfleet_common::backoff::Backoff;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{BlobBody, Manifest, ManifestEntry, StoreError, WorkspaceStore, PART_BYTES};
use crate::workspace::Workspace;

/// Waits between failed syncs of one session: 1 s doubling to 30 s, jittered.
const SYNC_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).with_floor_percent(50);
/// A triggered background sync starts this long after its trigger, so a
/// burst of execs or writes becomes one sync.
const TRIGGER_COALESCE: Duration = Duration::from_millis(200);

/// Most entries one workspace may hold for syncing, whatever its inode quota.
/// A sync holds several copies of the manifest while it runs, about 0.7 KiB
/// an entry in all (measured: a 65,526-file workspace raised the agent's RSS
/// by 43 MiB, a 200,000-file one by 350 MiB).
pub const MAX_ENTRIES: usize = 100_000;
/// Most bytes of paths one workspace's manifest may hold (paths are up to 4 KiB each).
pub const MAX_PATH_BYTES: usize = 16 * 1024 * 1024;
/// Sessions scanned and uploaded at once: with the per-session bounds, what
/// the agent holds in memory for syncs stays bounded however many sessions write.
pub const CONCURRENT_SESSION_SYNCS: usize = 4;

/// Hands memory that a large sync freed back to the kernel: glibc keeps
/// freed heap in its arenas otherwise, and the agent's resident size would
/// stay at the sync's peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only returns free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one session's workspace may hold to be synced: its disk quota, so
/// what the agent writes to the store for a session never exceeds that quota.
/// File sizes count at their full length, so a sparse file is not amplified
/// past the quota: a 1 TiB file with holes counts as 1 TiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncLimits {
    /// Files, directories and symlinks.
    pub max_entries: usize,
    /// The sum of file sizes (logical).
    pub max_bytes: u64,
}

impl SyncLimits {
    /// The limits of the workspace at `root`: the size and inode count of its
    /// own filesystem (its disk quota), or the default quota's for a workspace
    /// that has none (quotas off, or a session from before them).
    pub fn of_workspace(root: &Path) -> Self {
        use sandfleet_common::limits;
        let own = (|| {
            let m = std::fs::metadata(root).ok()?;
            let p = std::fs::metadata(root.parent()?).ok()?;
            use std::os::unix::fs::MetadataExt as _;
            if m.dev() == p.dev() {
                return None;
            }
            let s = nix::sys::statvfs::statvfs(root).ok()?;
            Some((s.blocks() as u64 * s.fragment_size() as u64, s.files() as u64))
        })();
        let (bytes, inodes) = own.unwrap_or((
            limits::DEFAULT_DISK_BYTES,
            sandfleet_common::spec::default_disk_inodes(limits::DEFAULT_DISK_BYTES),
        ));
        Self { max_entries: usize::try_from(inodes).unwrap_or(usize::MAX).min(MAX_ENTRIES), max_bytes: bytes }
    }

    /// Checks a running count against the limits.
    fn check(&self, entries: usize, bytes: u64, path_bytes: usize) -> Result<(), StoreError> {
        if entries > self.max_entries {
            return Err(StoreError::TooLarge(format!(
                "the workspace has more than {} files, directories and symlinks; it is not synced",
                self.max_entries
            )));
        }
        if bytes > self.max_bytes {
            return Err(StoreError::TooLarge(format!(
                "the workspace's files add up to more than {} bytes, its disk quota (sizes count in full: a sparse file counts at its length); it is not synced",
                self.max_bytes
            )));
        }
        if path_bytes > MAX_PATH_BYTES {
            return Err(StoreError::TooLarge(format!(
                "the workspace's paths add up to more than {MAX_PATH_BYTES} bytes; it is not synced"
            )));
        }
        Ok(())
    }
}

/// How workspaces are synced.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Sync a running session at least this often (when something changed).
    pub interval: Duration,
    /// Keep a session's objects when it is deleted.
    pub retain_on_delete: bool,
    /// Files uploaded or downloaded at once.
    pub concurrency: usize,
    /// How long a session moved off a live (draining) node waits for the old
    /// copy's final sync before it restores what the store has.
    pub handoff_wait: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            retain_on_delete: false,
            concurrency: 8,
            handoff_wait: Duration::from_secs(30),
        }
    }
}

/// What one sync or restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Regular files in the workspace.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Files whose content was sent (or fetched, for a restore).
    pub transferred_files: u64,
    /// Bytes sent (or fetched).
    pub transferred_bytes: u64,
    /// The manifest version now current.
    pub version: u64,
    /// Nothing changed since the last manifest; nothing was written.
    pub unchanged: bool,
}

/// Last outcome of a session's background sync.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    /// When the last successful sync ended (Unix ms; 0 = never).
    pub last_ok_ms: i64,
    /// The error of the last failed attempt, cleared by a success.
    pub last_error: Option<String>,
}

struct SessionSync {
    generation: u64,
    workspace: Workspace,
    /// The manifest in the store as this copy last wrote or read it. Held
    /// across a whole sync, so syncs of one session never overlap.
    current: tokio::sync::Mutex<Option<Manifest>>,
    trigger: tokio::sync::Notify,
    status: Mutex<SyncStatus>,
    stop: CancellationToken,
    superseded: std::sync::atomic::AtomicBool,
    /// Read the stored manifest at the first sync (a session rediscovered after an agent restart).
    seed: std::sync::atomic::AtomicBool,
    /// The store may hold something of this session (so an ended session's prefix must be removed).
    stored: std::sync::atomic::AtomicBool,
    /// The background loop ([`Syncer::sync_loop`]), awaited when syncing stops.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SessionSync {
    /// Stops the background loop and waits until it has ended: a sync it
    /// has in flight finishes first, and none starts after.
    async fn stop_loop(&self) {
        self.stop.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Syncs every session of this agent to one store.
pub struct Syncer {
    store: Arc<dyn WorkspaceStore>,
    config: SyncConfig,
    sessions: Mutex<HashMap<String, Arc<SessionSync>>>,
    shutdown: CancellationToken,
    /// Bounds how many sessions scan and upload at once.
    running: tokio::sync::Semaphore,
}

fn now_ms() -> i64 {
    sandfleet_common::time::now_ms()
}

fn io_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(std::io::Error::other(e.to_string()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

impl Syncer {
    /// A syncer over `store`; its background loops end when `shutdown` fires.
    pub fn new(store: Arc<dyn WorkspaceStore>, config: SyncConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            store,
            config,
            sessions: Mutex::new(HashMap::new()),
            shutdown,
            running: tokio::sync::Semaphore::new(CONCURRENT_SESSION_SYNCS),
        })
    }

    /// The store, for logs and presigning.
    pub fn store(&self) -> &Arc<dyn WorkspaceStore> {
        &self.store
    }

    fn get(&self, session: &str) -> Option<Arc<SessionSync>> {
        self.sessions.lock().get(session).cloned()
    }

    /// Fills a freshly prepared workspace from the store, claims the workspace
    /// for `generation`, and starts syncing it. With `handoff` (the previous
    /// copy is being stopped on a live node) it first waits, up to the
    /// configured handoff wait, for that copy's final, sealed manifest.
    #[tracing::instrument(skip(self, workspace), fields(session = %session))]
    pub async fn restore(
        self: &Arc<Self>,
        session: &str,
        generation: u64,
        workspace: Workspace,
        handoff: bool,
    ) -> Result<SyncStats, StoreError> {
        let started = Instant::now();
        let result = self.restore_once(session, generation, workspace, handoff).await;
        crate::metrics::record_transfer("restore", started.elapsed(), &result);
        result
    }

    async fn restore_once(
        self: &Arc<Self>,
        session: &str,
        generation: u64,
        workspace: Workspace,
        handoff: bool,
    ) -> Result<SyncStats, StoreError> {
        let started = Instant::now();
        let mut stats = SyncStats::default();
        // Generation 1 is the first placement: nothing can be in the store yet.
        let manifest = if generation <= 1 {
            None
        } else {
            let mut m = self.read_manifest(session).await?;
            if handoff {
                let deadline = Instant::now() + self.config.handoff_wait;
                while m.as_ref().is_some_and(|m| !m.sealed && m.generation < generation) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    m = self.read_manifest(session).await?;
                }
                if m.as_ref().is_some_and(|m| !m.sealed && m.generation < generation) {
                    warn!(waited = ?self.config.handoff_wait, "the previous copy did not seal its workspace in time; restoring its last sync");
                }
            }
            m
        };
        if let Some(m) = &manifest {
            if m.generation > generation {
                return Err(StoreError::Superseded {
                    session: session.to_string(),
                    current: m.generation,
                    ours: generation,
                });
            }
            // What is written for the session never exceeds its quota, whatever the store holds.
            let limits = SyncLimits::of_workspace(workspace.root());
            let bytes: u64 =
                m.entries.iter().map(|e| if let ManifestEntry::File { size, .. } = e { *size } else { 0 }).sum();
            let paths: usize = m.entries.iter().map(|e| e.path().len()).sum();
            limits.check(m.entries.len(), bytes, paths).map_err(|e| {
                StoreError::TooLarge(format!("the stored workspace does not fit this session's disk quota: {e}"))
            })?;
            stats = self.download(session, m, &workspace).await?;
        }
        let claimed = if generation <= 1 {
            None
        } else {
            // Claim the workspace: from now on an older copy's sync is refused.
            let mut m = manifest.unwrap_or_else(|| empty_manifest(session, generation));
            m.generation = generation;
            m.sealed = false;
            m.version += 1;
            m.written_at_ms = now_ms();
            self.store.put_manifest(session, m.to_bytes()).await?;
            stats.version = m.version;
            Some(m)
        };
        info!(
            files = stats.transferred_files,
            bytes = stats.transferred_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "workspace restored"
        );
        self.track(session, generation, workspace, claimed);
        Ok(stats)
    }

    /// Starts syncing a session that survived an agent restart (its files are
    /// on disk already); the stored manifest, if readable, seeds the hash cache.
    pub fn attach(self: &Arc<Self>, session: &str, generation: u64, workspace: Workspace) {
        // The stored manifest seeds the hash cache at the first sync, not here:
        // an agent restart must not wait on the store once per session.
        let s = self.track(session, generation, workspace, None);
        s.seed.store(true, std::sync::atomic::Ordering::SeqCst);
        s.stored.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn track(
        self: &Arc<Self>,
        session: &str,
        generation: u64,
        workspace: Workspace,
        current: Option<Manifest>,
    ) -> Arc<SessionSync> {
        let stored = current.is_some();
        let s = Arc::new(SessionSync {
            seed: std::sync::atomic::AtomicBool::new(false),
            stored: std::sync::atomic::AtomicBool::new(stored),
            generation,
            workspace,
            current: tokio::sync::Mutex::new(current),
            trigger: tokio::sync::Notify::new(),
            status: Mutex::new(SyncStatus::default()),
            stop: self.shutdown.child_token(),
            superseded: std::sync::atomic::AtomicBool::new(false),
            task: Mutex::new(None),
        });
        if let Some(old) = self.sessions.lock().insert(session.to_string(), s.clone()) {
            old.stop.cancel();
        }
        *s.task.lock() = Some(tokio::spawn(self.clone().sync_loop(session.to_string(), s.clone())));
        s
    }

    /// Asks for a sync of the session soon (after an exec or a file change).
    pub fn trigger(&self, session: &str) {
        if let Some(s) = self.get(session) {
            s.trigger.notify_one();
        }
    }

    /// The last outcome of the session's background syncs.
    pub fn status(&self, session: &str) -> Option<SyncStatus> {
        self.get(session).map(|s| s.status.lock().clone())
    }

    /// Syncs the session now and returns what it did: a durability barrier
    /// for clients (everything written before the call is in the store when it returns).
    pub async fn sync_now(&self, session: &str) -> Result<SyncStats, StoreError> {
        let s = self.get(session).ok_or_else(|| StoreError::NotFound(format!("session {session} on this node")))?;
        let r = self.sync_session(session, &s, false).await;
        record(&s, &r);
        r
    }

    /// The file at `path` as of a fresh sync: its blob's hash, for presigning.
    pub async fn blob_of(&self, session: &str, path: &str) -> Result<(String, u64), StoreError> {
        self.sync_now(session).await?;
        let s = self.get(session).ok_or_else(|| StoreError::NotFound(format!("session {session} on this node")))?;
        let current = s.current.lock().await;
        current
            .as_ref()
            .and_then(|m| {
                m.entries.iter().find_map(|e| match e {
                    ManifestEntry::File { path: p, sha256, size, .. } if p == path => Some((sha256.clone(), *size)),
                    _ => None,
                })
            })
            .ok_or_else(|| StoreError::NotFound(format!("regular file {path:?} in the workspace")))
    }

    /// Stops syncing a session that leaves this node. With `seal`, the
    /// background loop is awaited and a final sync (both bounded by `timeout`)
    /// writes a sealed manifest, for the copy that replaces it. Returns the
    /// final sync's error, if any.
    /// Returns whether the store may hold anything of the session (an empty
    /// workspace that was never synced leaves nothing to seal or delete).
    pub async fn finish(&self, session: &str, seal: bool, timeout: Duration) -> Result<bool, StoreError> {
        let Some(s) = self.sessions.lock().remove(session) else { return Ok(true) };
        s.stop.cancel();
        if !seal || s.superseded.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(true);
        }
        let last = async {
            s.stop_loop().await;
            self.sync_session(session, &s, true).await
        };
        match tokio::time::timeout(timeout, last).await {
            Ok(Ok(stats)) => {
                if !stats.unchanged {
                    info!(session, version = stats.version, files = stats.files, "final workspace sync done (sealed)");
                }
                Ok(s.stored.load(std::sync::atomic::Ordering::SeqCst))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable(format!("final sync did not finish within {timeout:?}"))),
        }
    }

    /// Stops every session's background loop and syncs each once more (agent
    /// shutdown), each bounded by `timeout`.
    pub async fn sync_all(&self, timeout: Duration) {
        let all: Vec<(String, Arc<SessionSync>)> =
            self.sessions.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        futures::future::join_all(all.into_iter().map(|(id, s)| async move {
            let last = async {
                s.stop_loop().await;
                self.sync_session(&id, &s, false).await
            };
            match tokio::time::timeout(timeout, last).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(session = %id, error = %e, "workspace sync at shutdown failed"),
                Err(_) => warn!(session = %id, "workspace sync at shutdown timed out"),
            }
        }))
        .await;
    }

    /// Removes the session's objects from the store, unless the agent retains
    /// them, once its background loop has ended (no sync writes after the removal).
    pub async fn delete(&self, session: &str) -> Result<(), StoreError> {
        let removed = self.sessions.lock().remove(session);
        if let Some(s) = removed {
            s.stop_loop().await;
        }
        if self.config.retain_on_delete {
            info!(session, "session ended; keeping its workspace in the store (retention on)");
            return Ok(());
        }
        self.store.delete_session(session).await?;
        info!(session, "session ended; its workspace was removed from the store");
        Ok(())
    }

    async fn sync_loop(self: Arc<Self>, session: String, s: Arc<SessionSync>) {
        let mut failures = 0u32;
        loop {
            let wait = if failures == 0 { self.config.interval } else { SYNC_RETRY.delay(failures - 1) };
            tokio::select! {
                _ = s.stop.cancelled() => return,
                _ = s.trigger.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            // Coalesce bursts of triggers (many quick execs) into one sync.
            tokio::select! {
                _ = s.stop.cancelled() => return,
                _ = tokio::time::sleep(TRIGGER_COALESCE) => {}
            }
            let r = self.sync_session(&session, &s, false).await;
            record(&s, &r);
            match r {
                Ok(stats) => {
                    failures = 0;
                    if !stats.unchanged {
                        debug!(session, version = stats.version, sent = stats.transferred_files, "workspace synced");
                    }
                }
                Err(StoreError::Superseded { current, ours, .. }) => {
                    warn!(session, current, ours, "a newer copy owns this workspace now; this copy stops syncing");
                    s.superseded.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    failures += 1;
                    warn!(session, error = %e, failures, "workspace sync failed; retrying with backoff");
                }
            }
        }
    }

    async fn read_manifest(&self, session: &str) -> Result<Option<Manifest>, StoreError> {
        match self.store.get_manifest(session).await? {
            Some(b) => Ok(Some(Manifest::parse(session, &b)?)),
            None => Ok(None),
        }
    }

    /// One sync of one session (serialized per session by the `current` lock).
    async fn sync_session(&self, session: &str, s: &SessionSync, seal: bool) -> Result<SyncStats, StoreError> {
        let started = Instant::now();
        let result = self.sync_session_once(session, s, seal).await;
        crate::metrics::record_transfer("sync", started.elapsed(), &result);
        result
    }

    async fn sync_session_once(&self, session: &str, s: &SessionSync, seal: bool) -> Result<SyncStats, StoreError> {
        if s.superseded.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Superseded {
                session: session.into(),
                current: s.generation + 1,
                ours: s.generation,
            });
        }
        let mut current = s.current.lock().await;
        // Routine syncs take a permit; a session's final (sealed) sync and the
        // syncs at shutdown do not wait behind them (each is bounded per session).
        let _running = if seal || self.shutdown.is_cancelled() {
            None
        } else {
            Some(self.running.acquire().await.map_err(|_| StoreError::Unavailable("the agent is stopping".into()))?)
        };
        if current.is_none() && s.seed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            match self.read_manifest(session).await {
                Ok(m) => *current = m.filter(|m| m.generation <= s.generation),
                Err(e) => {
                    warn!(session, error = %e, "could not read the stored manifest; this sync uploads every file")
                }
            }
        }
        let prev: HashMap<String, ManifestEntry> = current
            .as_ref()
            .map(|m| m.entries.iter().map(|e| (e.path().to_string(), e.clone())).collect())
            .unwrap_or_default();
        let known: HashSet<String> = current.as_ref().map(blobs_of).unwrap_or_default();
        let root = s.workspace.root().to_path_buf();
        let prev_for_scan = prev.clone();
        let scanned = match blocking(move || scan(&root, &prev_for_scan, SyncLimits::of_workspace(&root))).await {
            Ok(s) => s,
            Err(e) => {
                // A scan stopped at the limits may have held a large partial listing.
                release_freed_memory();
                return Err(e);
            }
        };

        let mut stats = SyncStats::default();
        let uploaded: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
        let changed = std::sync::atomic::AtomicBool::new(false);
        let (prev_ref, changed_ref) = (&prev, &changed);
        let results: Vec<ManifestEntry> = futures::stream::iter(scanned)
            .map(|e| {
                let fut = self.settle(session, s, e, &known, &uploaded);
                async move {
                    match fut.await {
                        // A file being written while it was read keeps its last synced
                        // version this time; another sync follows soon.
                        Err(StoreError::Changed(path)) => {
                            changed_ref.store(true, std::sync::atomic::Ordering::SeqCst);
                            Ok(prev_ref
                                .get(&path)
                                .filter(|e| matches!(e, ManifestEntry::File { .. }))
                                .cloned()
                                .map(|e| (e, 0)))
                        }
                        other => other,
                    }
                }
            })
            .buffered(self.config.concurrency.max(1))
            .try_collect::<Vec<Option<(ManifestEntry, u64)>>>()
            .await?
            .into_iter()
            .flatten()
            .map(|(e, sent)| {
                if let ManifestEntry::File { size, .. } = &e {
                    stats.files += 1;
                    stats.bytes += size;
                }
                if sent > 0 {
                    stats.transferred_files += 1;
                    stats.transferred_bytes += sent;
                }
                e
            })
            .collect();
        if changed.load(std::sync::atomic::Ordering::SeqCst) {
            s.trigger.notify_one();
        }
        // Nothing stored and nothing to store (an empty workspace never synced): no writes.
        let same =
            current.as_ref().map_or(results.is_empty() && !s.stored.load(std::sync::atomic::Ordering::SeqCst), |m| {
                m.entries == results && m.sealed == seal
            });
        if same {
            stats.unchanged = true;
            stats.version = current.as_ref().map_or(0, |m| m.version);
            return Ok(stats);
        }
        // Fencing: never overwrite the manifest of a newer placement.
        let stored = self.read_manifest(session).await?;
        if let Some(m) = &stored {
            if m.generation > s.generation {
                return Err(StoreError::Superseded {
                    session: session.into(),
                    current: m.generation,
                    ours: s.generation,
                });
            }
        }
        let version = stored.as_ref().map_or(0, |m| m.version).max(current.as_ref().map_or(0, |m| m.version)) + 1;
        let next = Manifest {
            format: 1,
            session_id: session.to_string(),
            generation: s.generation,
            sealed: seal,
            version,
            written_at_ms: now_ms(),
            entries: results,
        };
        s.stored.store(true, std::sync::atomic::Ordering::SeqCst);
        self.store.put_manifest(session, next.to_bytes()).await?;
        stats.version = version;
        // Only now may blobs that the old manifest named go.
        let still = blobs_of(&next);
        let garbage: Vec<String> = known.into_iter().filter(|h| !still.contains(h)).collect();
        if !garbage.is_empty() {
            if let Err(e) = self.store.delete_blobs(session, &garbage).await {
                warn!(session, error = %e, count = garbage.len(), "could not delete unreferenced blobs; they stay until the session is deleted");
            }
        }
        *current = Some(next);
        drop(current);
        if stats.files > 10_000 {
            release_freed_memory();
        }
        Ok(stats)
    }

    /// Turns a scanned entry into a manifest entry: hashes and uploads a file
    /// whose content is not in the store yet. `None` drops the entry (it went
    /// away or turned into something unsyncable during the scan). The second
    /// value is the bytes sent.
    async fn settle(
        &self,
        session: &str,
        s: &SessionSync,
        e: Scanned,
        known: &HashSet<String>,
        uploaded: &Mutex<HashSet<String>>,
    ) -> Result<Option<(ManifestEntry, u64)>, StoreError> {
        let path = match e {
            Scanned::File { path, hash: None, .. } => path,
            other => return Ok(Some((other.into_entry(), 0))),
        };
        let root = s.workspace.root().to_path_buf();
        let p = path.clone();
        // Open without following a symlink: the sandbox may have swapped one in since the scan.
        let opened = blocking(move || open_nofollow(&root, &p)).await?;
        let Some((file, meta_size, meta_mode, meta_mtime)) = opened else { return Ok(None) };
        let file = Arc::new(file);
        let entry = |sha256: String, size: u64| ManifestEntry::File {
            path: path.clone(),
            size,
            mode: meta_mode,
            mtime_ns: meta_mtime,
            sha256,
        };
        if meta_size <= PART_BYTES {
            let f = file.clone();
            let data = blocking(move || {
                let mut buf = Vec::with_capacity(meta_size as usize);
                (&*f).take(PART_BYTES + 1).read_to_end(&mut buf)?;
                Ok(buf)
            })
            .await?;
            if data.len() as u64 > PART_BYTES {
                return Err(StoreError::Changed(path)); // grew past the part size while read; next sync
            }
            let hash = hex::encode(Sha256::digest(&data));
            let len = data.len() as u64;
            let fresh = !known.contains(&hash) && uploaded.lock().insert(hash.clone());
            if fresh {
                self.store.put_blob(session, &hash, BlobBody::Bytes(Bytes::from(data))).await?;
            }
            return Ok(Some((entry(hash, len), if fresh { len } else { 0 })));
        }
        let f = file.clone();
        let hash = blocking(move || {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let n = std::os::unix::fs::FileExt::read_at(&*f, &mut buf, off)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                off += n as u64;
            }
            if off != meta_size {
                return Err(StoreError::Changed(String::new()));
            }
            Ok(hex::encode(hasher.finalize()))
        })
        .await
        .map_err(|e| if matches!(e, StoreError::Changed(_)) { StoreError::Changed(path.clone()) } else { e })?;
        let fresh = !known.contains(&hash) && uploaded.lock().insert(hash.clone());
        if fresh {
            self.store.put_blob(session, &hash, BlobBody::File { file, size: meta_size, path: path.clone() }).await?;
        }
        Ok(Some((entry(hash, meta_size), if fresh { meta_size } else { 0 })))
    }

    /// Writes every entry of `m` into the (empty) workspace: directories, then
    /// files (each checked against its hash, written to a temporary name and
    /// renamed), then symlinks last, so no restored file is written through a
    /// restored link. Owner is the session's uid; mtimes are the stored ones.
    async fn download(&self, session: &str, m: &Manifest, ws: &Workspace) -> Result<SyncStats, StoreError> {
        let mut stats = SyncStats { version: m.version, ..Default::default() };
        let root_path = ws.root().to_path_buf();
        let (uid, gid) = (ws.uid(), ws.gid());
        let dirs: Vec<(String, u32)> = m
            .entries
            .iter()
            .filter_map(|e| if let ManifestEntry::Dir { path, mode } = e { Some((path.clone(), *mode)) } else { None })
            .collect();
        let rp = root_path.clone();
        blocking(move || {
            let root = open_root(&rp)?;
            for (path, mode) in dirs {
                ensure_dir(&root, Path::new(&path), mode, uid, gid)?;
            }
            Ok(())
        })
        .await?;
        let files: Vec<(String, u64, u32, i64, String)> = m
            .entries
            .iter()
            .filter_map(|e| match e {
                ManifestEntry::File { path, size, mode, mtime_ns, sha256 } => {
                    Some((path.clone(), *size, *mode, *mtime_ns, sha256.clone()))
                }
                _ => None,
            })
            .collect();
        let root_ref = &root_path;
        let sizes: Vec<u64> = futures::stream::iter(files)
            .map(|(path, size, mode, mtime_ns, sha256)| async move {
                self.fetch_file(session, root_ref, &path, size, mode, mtime_ns, &sha256, uid, gid).await?;
                Ok::<u64, StoreError>(size)
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .try_collect()
            .await?;
        stats.files = sizes.len() as u64;
        stats.bytes = sizes.iter().sum();
        stats.transferred_files = stats.files;
        stats.transferred_bytes = stats.bytes;
        let links: Vec<(String, String)> = m
            .entries
            .iter()
            .filter_map(|e| {
                if let ManifestEntry::Symlink { path, target } = e {
                    Some((path.clone(), target.clone()))
                } else {
                    None
                }
            })
            .collect();
        blocking(move || {
            let root = open_root(&root_path)?;
            for (path, target) in links {
                let rel = Path::new(&path);
                let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(p) => {
                        ensure_dir(&root, p, 0o755, uid, gid)?;
                        root.open_dir(p)?
                    }
                    None => root.try_clone()?,
                };
                let name =
                    rel.file_name().ok_or_else(|| StoreError::Corrupt(format!("symlink {path:?} has no name")))?;
                let cname = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(name)).map_err(io_err)?;
                let ctarget = std::ffi::CString::new(target.as_bytes()).map_err(io_err)?;
                // symlinkat/fchownat relative to the parent's handle: nothing is followed.
                // SAFETY: valid C strings and an open directory fd.
                let rc = unsafe { libc::symlinkat(ctarget.as_ptr(), parent.as_raw_fd(), cname.as_ptr()) };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(err.into());
                    }
                }
                // SAFETY: as above.
                unsafe { libc::fchownat(parent.as_raw_fd(), cname.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
            }
            Ok(())
        })
        .await?;
        Ok(stats)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_file(
        &self,
        session: &str,
        root_path: &Path,
        path: &str,
        size: u64,
        mode: u32,
        mtime_ns: i64,
        sha256: &str,
        uid: u32,
        gid: u32,
    ) -> Result<(), StoreError> {
        let rp = root_path.to_path_buf();
        let p = path.to_string();
        let (parent, tmp, file) = blocking(move || {
            let root = open_root(&rp)?;
            let rel = Path::new(&p);
            let parent = match rel.parent().filter(|x| !x.as_os_str().is_empty()) {
                Some(x) => {
                    ensure_dir(&root, x, 0o755, uid, gid)?;
                    root.open_dir(x)?
                }
                None => root,
            };
            let tmp = format!("{}{:016x}", crate::workspace::TEMP_PREFIX, rand::random::<u64>());
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
            let f = parent.open_with(&tmp, &opts)?;
            Ok((parent, tmp, f.into_std()))
        })
        .await?;
        let cleanup = |parent: &Dir, tmp: &str| {
            let _ = parent.remove_file(tmp);
        };
        let mut out = tokio::fs::File::from_std(file);
        let result: Result<(), StoreError> = async {
            let mut body = self.store.get_blob(session, sha256).await?;
            let mut hasher = Sha256::new();
            let mut got = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                got += chunk.len() as u64;
                if got > size {
                    break;
                }
                hasher.update(&chunk);
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
            }
            if got != size || hex::encode(hasher.finalize()) != sha256 {
                return Err(StoreError::Corrupt(format!(
                    "blob {sha256} for {path:?} does not match its manifest entry"
                )));
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            cleanup(&parent, &tmp);
            return Err(e);
        }
        let std_file = out.into_std().await;
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| StoreError::Corrupt(format!("{path:?} has no name")))?;
        blocking(move || {
            let r = (|| -> Result<(), StoreError> {
                std_file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777 & !0o6000))?;
                std::os::unix::fs::fchown(&std_file, Some(uid), Some(gid))?;
                let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns.max(0) as u64);
                std_file.set_times(std::fs::FileTimes::new().set_modified(mtime))?;
                std_file.sync_data()?;
                parent.rename(&tmp, &parent, &name)?;
                Ok(())
            })();
            if r.is_err() {
                let _ = parent.remove_file(&tmp);
            }
            r
        })
        .await
    }
}

fn record(s: &SessionSync, r: &Result<SyncStats, StoreError>) {
    let mut st = s.status.lock();
    match r {
        Ok(_) => {
            st.last_ok_ms = now_ms();
            st.last_error = None;
        }
        Err(e) => st.last_error = Some(e.to_string()),
    }
}

fn empty_manifest(session: &str, generation: u64) -> Manifest {
    Manifest {
        format: 1,
        session_id: session.into(),
        generation,
        sealed: false,
        version: 0,
        written_at_ms: 0,
        entries: Vec::new(),
    }
}

fn blobs_of(m: &Manifest) -> HashSet<String> {
    m.entries
        .iter()
        .filter_map(|e| if let ManifestEntry::File { sha256, .. } = e { Some(sha256.clone()) } else { None })
        .collect()
}

fn open_root(root: &Path) -> Result<Dir, StoreError> {
    Ok(Dir::open_ambient_dir(root, cap_std::ambient_authority())?)
}

/// Creates `rel` and its missing parents (owned by the session), refusing to pass through a symlink.
fn ensure_dir(root: &Dir, rel: &Path, mode: u32, uid: u32, gid: u32) -> Result<(), StoreError> {
    let mut prefix = PathBuf::new();
    let count = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        prefix.push(c);
        match root.symlink_metadata(&prefix) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err(StoreError::Corrupt(format!("{} is not a directory", prefix.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        root.create_dir(&prefix)?;
        let d = root.open_dir(&prefix)?;
        let m = if i + 1 == count { mode & 0o7777 & !0o6000 } else { 0o755 };
        // SAFETY: a valid open directory fd.
        unsafe { libc::fchown(d.as_raw_fd(), uid, gid) };
        root.set_permissions(&prefix, cap_std::fs::Permissions::from_mode(m))?;
    }
    Ok(())
}

/// Opens a regular file without following a final symlink (or blocking on a
/// FIFO); `None` when it is gone or no longer a regular file.
fn open_nofollow(root: &Path, rel: &str) -> Result<Option<(std::fs::File, u64, u32, i64)>, StoreError> {
    let root = open_root(root)?;
    let mut opts = OpenOptions::new();
    opts.read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
    let f = match root.open_with(rel, &opts) {
        Ok(f) => f.into_std(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        // cap-std refuses paths that escape the root (a parent swapped for an outward link).
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    use std::os::unix::fs::MetadataExt as _;
    Ok(Some((
        f,
        meta.len(),
        meta.mode() & 0o7777,
        meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
    )))
}

/// A workspace entry as the scan found it.
#[derive(Debug, Clone)]
enum Scanned {
    File { path: String, size: u64, mode: u32, mtime_ns: i64, hash: Option<String> },
    Dir { path: String, mode: u32 },
    Symlink { path: String, target: String },
}

impl Scanned {
    fn into_entry(self) -> ManifestEntry {
        match self {
            Scanned::File { path, size, mode, mtime_ns, hash } => {
                ManifestEntry::File { path, size, mode, mtime_ns, sha256: hash.unwrap_or_default() }
            }
            Scanned::Dir { path, mode } => ManifestEntry::Dir { path, mode },
            Scanned::Symlink { path, target } => ManifestEntry::Symlink { path, target },
        }
    }
}

/// Walks the workspace without following symlinks. A file whose size and
/// mtime match the previous manifest keeps its hash (not read again).
/// Stops with [`StoreError::TooLarge`] as soon as the workspace passes `limits`.
fn scan(root: &Path, prev: &HashMap<String, ManifestEntry>, limits: SyncLimits) -> Result<Vec<Scanned>, StoreError> {
    let dir = open_root(root)?;
    let mut out = BTreeMap::new();
    let mut tally = Tally { limits, bytes: 0, path_bytes: 0 };
    walk(&dir, "", prev, &mut out, &mut tally, 0)?;
    Ok(out.into_values().collect())
}

/// What a scan has found so far, against the limits.
struct Tally {
    limits: SyncLimits,
    bytes: u64,
    path_bytes: usize,
}

fn walk(
    dir: &Dir,
    base: &str,
    prev: &HashMap<String, ManifestEntry>,
    out: &mut BTreeMap<String, Scanned>,
    tally: &mut Tally,
    depth: usize,
) -> Result<(), StoreError> {
    if depth > 256 {
        return Err(StoreError::Corrupt(format!("directory {base:?} is nested too deep to sync")));
    }
    for entry in dir.entries()? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            warn!(dir = base, "skipping a workspace entry whose name is not UTF-8");
            continue;
        };
        if name.starts_with(crate::workspace::TEMP_PREFIX) {
            continue; // an upload or restore in progress
        }
        let path = if base.is_empty() { name.to_string() } else { format!("{base}/{name}") };
        tally.path_bytes += path.len();
        tally.limits.check(out.len() + 1, tally.bytes, tally.path_bytes)?;
        let ft = match entry.file_type() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if ft.is_symlink() {
            let target = match dir.read_link_contents(name) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let Some(target) = target.to_str().map(str::to_string) else { continue };
            out.insert(path.clone(), Scanned::Symlink { path, target });
        } else if ft.is_dir() {
            let mut o = OpenOptions::new();
            o.read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW);
            let sub = match dir.open_with(name, &o) {
                Ok(f) => Dir::from_std_file(f.into_std()),
                // Swapped for a symlink since the listing: not followed.
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let mode = sub.dir_metadata()?.mode() & 0o7777;
            out.insert(path.clone(), Scanned::Dir { path: path.clone(), mode });
            walk(&sub, &path, prev, out, tally, depth + 1)?;
        } else if ft.is_file() {
            let meta = match dir.symlink_metadata(name) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
            let (size, mode) = (meta.len(), meta.mode() & 0o7777);
            tally.bytes = tally.bytes.saturating_add(size);
            tally.limits.check(out.len() + 1, tally.bytes, tally.path_bytes)?;
            let hash = match prev.get(&path) {
                Some(ManifestEntry::File { size: s, mtime_ns: m, mode: md, sha256, .. })
                    if *s == size && *m == mtime_ns && *md == mode =>
                {
                    Some(sha256.clone())
                }
                _ => None,
            };
            out.insert(path.clone(), Scanned::File { path, size, mode, mtime_ns, hash });
        }
        // FIFOs, sockets and device nodes are not synced.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    const SID: &str = "0190b8f2-1c3d-7e4f-8a9b-0c1d2e3f4a5b";

    fn ws(dir: &Path) -> Workspace {
        std::fs::create_dir_all(dir).unwrap();
        Workspace::new(dir, nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    }

    /// Bytes allocated on disk below `dir`.
    fn allocated(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let mut n = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            n += m.blocks() * 512;
            if m.is_dir() {
                n += allocated(&e.path());
            }
        }
        n
    }

    #[tokio::test]
    async fn a_sparse_file_is_not_amplified_past_the_quota() {
        let tmp = tempfile::tempdir().unwrap();
        let store_dir = tmp.path().join("store");
        let store: Arc<dyn WorkspaceStore> = Arc::new(LocalStore::new(store_dir.clone()).unwrap());
        let syncer = Syncer::new(store, SyncConfig::default(), CancellationToken::new());
        let a = tmp.path().join("a");
        let wa = ws(&a);
        syncer.restore(SID, 1, wa.clone(), false).await.unwrap();
        std::fs::write(a.join("small.txt"), b"kept\n").unwrap();
        assert!(!syncer.sync_now(SID).await.unwrap().unchanged);
        // 1 TiB long, a few KiB on disk: counted at its length, over the default 1 GiB quota.
        let f = std::fs::File::create(a.join("sparse")).unwrap();
        f.set_len(1 << 40).unwrap();
        drop(f);
        let before = allocated(&store_dir);
        let err = syncer.sync_now(SID).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge(_)), "{err}");
        assert!(err.to_string().contains("disk quota"), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
        assert!(allocated(&store_dir) <= before + 64 * 1024, "the store grew: {} -> {}", before, allocated(&store_dir));
        // The last good sync stays the workspace's copy.
        let m = syncer.read_manifest(SID).await.unwrap().unwrap();
        assert_eq!(m.entries.iter().map(|e| e.path()).collect::<Vec<_>>(), ["small.txt"]);
    }

    #[test]
    fn a_scan_stops_at_the_entry_and_byte_limits() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(tmp.path().join(format!("f{i}")), vec![1u8; 100]).unwrap();
        }
        let ok = scan(tmp.path(), &HashMap::new(), SyncLimits { max_entries: 50, max_bytes: 5000 }).unwrap();
        assert_eq!(ok.len(), 50);
        let e = scan(tmp.path(), &HashMap::new(), SyncLimits { max_entries: 49, max_bytes: 5000 }).unwrap_err();
        assert!(e.to_string().contains("more than 49 files"), "{e}");
        let e = scan(tmp.path(), &HashMap::new(), SyncLimits { max_entries: 50, max_bytes: 4999 }).unwrap_err();
        assert!(e.to_string().contains("more than 4999 bytes"), "{e}");
        // A plain directory (no filesystem of its own) gets the default quota's limits.
        let l = SyncLimits::of_workspace(tmp.path());
        assert_eq!(l.max_bytes, sandfleet_common::limits::DEFAULT_DISK_BYTES);
        assert_eq!(l.max_entries, 65_536);
    }

    #[tokio::test]
    async fn sync_restore_round_trip_skips_symlinks_and_uploads_only_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn WorkspaceStore> = Arc::new(LocalStore::new(tmp.path().join("store")).unwrap());
        let stop = CancellationToken::new();
        let cfg = SyncConfig { interval: Duration::from_secs(3600), ..Default::default() };
        let syncer = Syncer::new(store.clone(), cfg.clone(), stop.clone());
        let a = tmp.path().join("a");
        let wa = ws(&a);
        std::fs::create_dir_all(a.join("src/empty")).unwrap();
        std::fs::write(a.join("src/main.py"), b"print(1)\n").unwrap();
        std::fs::write(a.join("big.bin"), vec![7u8; (PART_BYTES + 12345) as usize]).unwrap();
        std::fs::write(tmp.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), a.join("escape")).unwrap();
        std::os::unix::fs::symlink("src/main.py", a.join("inside")).unwrap();
        syncer.restore(SID, 1, wa.clone(), false).await.unwrap();
        let first = syncer.sync_now(SID).await.unwrap();
        assert_eq!(first.files, 2);
        assert_eq!(first.transferred_files, 2);
        // The outward symlink is stored as a link, never as the host file's content.
        let m = Manifest::parse(SID, &store.get_manifest(SID).await.unwrap().unwrap()).unwrap();
        assert!(m.entries.iter().any(|e| matches!(e, ManifestEntry::Symlink { path, .. } if path == "escape")));
        let blob_dir = tmp.path().join("store").join(SID).join("blobs");
        for b in std::fs::read_dir(&blob_dir).unwrap() {
            assert_ne!(std::fs::read(b.unwrap().path()).unwrap(), b"host secret");
        }
        // Nothing changed: nothing sent, no new manifest.
        let again = syncer.sync_now(SID).await.unwrap();
        assert!(again.unchanged);
        std::fs::write(a.join("src/main.py"), b"print(2)\n").unwrap();
        let third = syncer.sync_now(SID).await.unwrap();
        assert_eq!((third.transferred_files, third.transferred_bytes), (1, 9));
        assert_eq!(std::fs::read_dir(&blob_dir).unwrap().count(), 2, "the old content's blob is collected");

        // Another node restores generation 2: same files, links as links.
        let b = tmp.path().join("b");
        let syncer2 = Syncer::new(store.clone(), cfg, stop.clone());
        let restored = syncer2.restore(SID, 2, ws(&b), false).await.unwrap();
        assert_eq!(restored.files, 2);
        assert_eq!(std::fs::read(b.join("src/main.py")).unwrap(), b"print(2)\n");
        assert_eq!(std::fs::read(b.join("big.bin")).unwrap(), std::fs::read(a.join("big.bin")).unwrap());
        assert!(b.join("src/empty").is_dir());
        assert_eq!(std::fs::read_link(b.join("escape")).unwrap(), tmp.path().join("secret"));
        // The restored node's first sync sends nothing (mtimes were restored).
        let s2 = syncer2.sync_now(SID).await.unwrap();
        assert_eq!(s2.transferred_files, 0);
        // The old copy is fenced off by generation 2's claim.
        std::fs::write(a.join("late.txt"), b"stale").unwrap();
        match syncer.sync_now(SID).await {
            Err(StoreError::Superseded { current: 2, ours: 1, .. }) => {}
            other => panic!("expected Superseded, got {other:?}"),
        }
        syncer2.delete(SID).await.unwrap();
        assert!(!tmp.path().join("store").join(SID).exists());
        stop.cancel();
    }

    /// Finishing, deleting and the shutdown's last sync end a session's
    /// background loop before they return: nothing syncs after them.
    #[tokio::test]
    async fn stopping_a_session_awaits_its_background_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn WorkspaceStore> = Arc::new(LocalStore::new(tmp.path().join("store")).unwrap());
        let cfg = SyncConfig { interval: Duration::from_millis(10), ..Default::default() };
        let syncer = Syncer::new(store, cfg, CancellationToken::new());
        let ids = ["0190b8f2-1c3d-7e4f-8a9b-000000000001", "0190b8f2-1c3d-7e4f-8a9b-000000000002", SID];
        for (i, id) in ids.iter().enumerate() {
            syncer.restore(id, 1, ws(&tmp.path().join(format!("w{i}"))), false).await.unwrap();
        }
        let held: Vec<Arc<SessionSync>> = ids.iter().map(|id| syncer.get(id).unwrap()).collect();
        // The loops sync every 10 ms meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        syncer.finish(ids[0], true, Duration::from_secs(10)).await.unwrap();
        syncer.delete(ids[1]).await.unwrap();
        syncer.sync_all(Duration::from_secs(10)).await;
        for (id, s) in ids.iter().zip(&held) {
            assert!(s.task.lock().is_none(), "{id}: the loop was not awaited");
            // Held here, and by the syncer's table until the session is finished or deleted.
            let tracked = usize::from(syncer.sessions.lock().contains_key(*id));
            assert_eq!(Arc::strong_count(s), 1 + tracked, "{id}: the loop still holds the session");
        }
    }

    #[tokio::test]
    async fn restore_refuses_a_manifest_that_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn WorkspaceStore> = Arc::new(LocalStore::new(tmp.path().join("store")).unwrap());
        let bad = Manifest {
            format: 1,
            session_id: SID.into(),
            generation: 1,
            sealed: true,
            version: 1,
            written_at_ms: 0,
            entries: vec![ManifestEntry::Dir { path: "../outside".into(), mode: 0o755 }],
        };
        store.put_manifest(SID, bad.to_bytes()).await.unwrap();
        let syncer = Syncer::new(store, SyncConfig::default(), CancellationToken::new());
        let err = syncer.restore(SID, 2, ws(&tmp.path().join("w")), false).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(!tmp.path().join("outside").exists());
    }
}
