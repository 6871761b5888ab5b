//! RocksDB storage for Raft: the log store and the state machine, in one
//! database with one column family per kind of data.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log` | log index (u64 BE) | entry, in the versioned [`codec`](super::codec) (older ones JSON) |
//! | `raft_meta` | `vote`, `committed`, `last_purged` | JSON |
//! | `sm_sessions` | session id | JSON [`SessionRecord`] |
//! | `sm_nodes` | node id | JSON [`NodeRecord`] |
//! | `sm_request_ids` | request id | session id |
//! | `sm_objects` | `batch/<id>`, `pool/<tenant>/<name>`, `template/<name>` | JSON [`BatchRecord`](crate::state::BatchRecord), [`PoolRecord`](crate::state::PoolRecord), [`TemplateRecord`](sandfleet_common::template::TemplateRecord) |
//! | `sm_meta` | `last_applied`, `membership`, `signing_seed`, `scheduler_paused`, `tenants`, `api_keys`, `sessions_created` | JSON |
//! | `snapshot` | `current` | JSON [`StoredSnapshot`] |
//!
//! Log appends, votes and snapshots are fsynced before they are acknowledged.
//! State-machine writes are not: on a crash, openraft replays the durable log
//! from the durable `last_applied`, which is written in the same batch as the
//! state it describes.

// openraft's storage traits return its `StorageError`, a large type; the
// helpers here return it too rather than boxing and unboxing at every call.
#![allow(clippy::result_large_err)]

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{codec, Member, NodeId, TypeConfig};
use crate::metrics::{metrics, RaftStats};
use crate::state::{ClusterState, CommandResponse, SessionRecord, Touched};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const CF_LOG: &str = "raft_log";
const CF_META: &str = "raft_meta";
const CF_SESSIONS: &str = "sm_sessions";
const CF_NODES: &str = "sm_nodes";
const CF_REQUEST_IDS: &str = "sm_request_ids";
const CF_SM_META: &str = "sm_meta";
/// Cluster objects other than sessions and nodes, keyed `<kind>/<id>`.
const CF_OBJECTS: &str = "sm_objects";
const CF_SNAPSHOT: &str = "snapshot";
const ALL_CFS: [&str; 8] =
    [CF_LOG, CF_META, CF_SESSIONS, CF_NODES, CF_REQUEST_IDS, CF_SM_META, CF_OBJECTS, CF_SNAPSHOT];
/// The key prefix of batches in `sm_objects`.
const BATCH_PREFIX: &str = "batch/";
/// The key prefix of pools in `sm_objects` (then the pool key, `<tenant>/<name>`).
const POOL_PREFIX: &str = "pool/";
/// The key prefix of cluster templates in `sm_objects` (then the name).
const TEMPLATE_PREFIX: &str = "template/";

/// Opens (or creates) the database with every column family.
pub fn open_db(path: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = ALL_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// Disaster recovery: forgets this member's Raft identity (log, vote,
/// membership, snapshot) but keeps its applied state, so it can start a new
/// one-member cluster holding that state (`--force-new-cluster`).
pub fn reset_for_new_cluster(db: &DB) -> Result<(), rocksdb::Error> {
    let mut b = WriteBatch::default();
    for name in [CF_LOG, CF_META, CF_SNAPSHOT] {
        for item in db.iterator_cf(cf(db, name), IteratorMode::Start) {
            let (k, _) = item?;
            b.delete_cf(cf(db, name), k);
        }
    }
    let none: Option<LogId<NodeId>> = None;
    b.put_cf(cf(db, CF_SM_META), b"last_applied", serde_json::to_vec(&none).unwrap_or_default());
    let membership = StoredMembership::<NodeId, Member>::default();
    b.put_cf(cf(db, CF_SM_META), b"membership", serde_json::to_vec(&membership).unwrap_or_default());
    db.write_opt(b, &sync_opts())
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO { source: StorageIOError::new(subject, verb, AnyError::new(&e)) }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family created at open")
}

fn get_json<T: for<'de> Deserialize<'de>>(db: &DB, cf_name: &str, key: &[u8]) -> StorageResult<Option<T>> {
    match db.get_cf(cf(db, cf_name), key).map_err(read_err)? {
        None => Ok(None),
        Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(read_err)?)),
    }
}

// ---------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------

/// The Raft log, vote and commit index.
///
/// Appends are group-committed: `append` writes the entries into RocksDB at
/// once (WAL buffer and memtable, so they are readable when it returns, as
/// openraft requires) and hands the flush callback to the WAL syncer thread.
/// That thread syncs the WAL once for every callback that queued up while the
/// previous sync ran, then reports them all durable, in order. Under load one
/// fsync covers many entries; alone, an entry costs one fsync as before.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: Arc<WalSyncer>,
    stats: Arc<RaftStats>,
}

/// The WAL syncer thread's queue, shared by every clone of a [`LogStore`].
/// When the last clone goes, the queue closes and the drop *joins* the
/// thread, so its handle on the database is released before the drop
/// returns. (A detached thread closing RocksDB while the process exits
/// destroys RocksDB's static objects under it: SIGSEGV at exit.)
#[derive(Debug)]
struct WalSyncer {
    queue: Option<std::sync::mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        let (syncer, pending) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
        let wal = db.clone();
        // Exits when the last LogStore clone (and so the sender) is dropped; see WalSyncer.
        let thread = std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = pending.recv() {
                    let mut flushed = vec![first];
                    flushed.extend(pending.try_iter());
                    let started = std::time::Instant::now();
                    let result = wal.flush_wal(true);
                    metrics().fsync.record(started.elapsed().as_secs_f64(), &[]);
                    for callback in flushed {
                        callback.log_io_completed(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::other(format!("syncing the raft log: {e}"))),
                        });
                    }
                }
            })
            .expect("spawning the raft WAL sync thread");
        Self { db, syncer: Arc::new(WalSyncer { queue: Some(syncer), thread: Some(thread) }), stats: Arc::default() }
    }

    /// Shares `stats` with the metrics: this store keeps its `committed` up to date.
    pub fn with_stats(mut self, stats: Arc<RaftStats>) -> Self {
        self.stats = stats;
        self
    }

    fn put_meta_sync<T: Serialize>(&self, key: &[u8], v: &T) -> StorageResult<()> {
        let bytes = serde_json::to_vec(v).map_err(write_err)?;
        self.db.put_cf_opt(cf(&self.db, CF_META), key, bytes, &sync_opts()).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::From(&idx_key(start), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(read_err)?;
            let idx =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| read_err(std::io::Error::other("bad log key")))?);
            if !range.contains(&idx) {
                break;
            }
            out.push(codec::decode(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last = match self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry<TypeConfig> = codec::decode(&v).map_err(read_err)?;
                Some(e.log_id)
            }
        };
        let last_purged: Option<LogId<NodeId>> = get_json(&self.db, CF_META, b"last_purged")?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta_sync(b"vote", vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(&self.db, CF_META, b"vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not fsynced: a lost commit index is recomputed by the leader.
        if let Some(c) = committed {
            self.stats.committed.fetch_max(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.db.put_cf(cf(&self.db, CF_META), b"committed", bytes).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(&self.db, CF_META, b"committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        let log_cf = cf(&self.db, CF_LOG);
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.put_cf(log_cf, idx_key(entry.log_id.index), bytes);
        }
        // Readable now; durable once the syncer has synced the WAL past it.
        self.db.write(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let queue = self.syncer.queue.as_ref().expect("the queue lives as long as the LogStore");
        if let Err(std::sync::mpsc::SendError(callback)) = queue.send(callback) {
            // The syncer is gone (only while shutting down): sync here instead.
            let result = self.db.flush_wal(true);
            callback.log_io_completed(result.map_err(|e| std::io::Error::other(e.to_string())));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG), idx_key(log_id.index), idx_key(u64::MAX));
        self.db.write_opt(batch, &sync_opts()).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.put_meta_sync(b"last_purged", &log_id)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(&self.db, CF_LOG), idx_key(0), idx_key(log_id.index + 1));
        self.db.write(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

// ---------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------

/// A snapshot as stored on disk and sent to lagging members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, Member>,
    /// JSON of [`ClusterState`].
    pub data: Vec<u8>,
}

/// Read access to the applied state, shared with the API layer.
#[derive(Clone)]
pub struct StateHandle {
    state: Arc<RwLock<ClusterState>>,
    /// Every session change, after it is applied on this member.
    pub session_events: broadcast::Sender<SessionRecord>,
    /// Bumped after every applied batch; watchers re-read the state.
    pub version: watch::Sender<u64>,
    /// The channel of every node with an assignment watcher (see [`StateHandle::watch_node`]).
    node_watchers: Arc<Mutex<HashMap<String, broadcast::Sender<NodeChange>>>>,
}

/// What a node's assignment watchers hear after an apply.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeChange {
    /// The entries applied up to Raft index `index` may have added, changed or
    /// removed these sessions (sorted, each once) in the node's set.
    Sessions { index: u64, ids: Vec<String> },
    /// The whole state was replaced (a snapshot install): recompute the set.
    Resync,
}

/// Changes a node's watchers may fall behind by before they must recompute
/// the node's whole set (a `Lagged` receive).
const NODE_CHANGES_QUEUED: usize = 64;

impl StateHandle {
    /// Runs `f` with the current state.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        let g = self.state.read();
        f(&g)
    }

    /// Subscribes to the changes of `node`'s assignment set, from now on.
    ///
    /// An apply queues its changes before it releases the state's write lock,
    /// so inside [`StateHandle::read`] what is queued is exactly what the
    /// state read there already includes: a watcher drains the queue under
    /// the read lock and pushes the state of those sessions, labelled with
    /// the state's `applied_index`.
    pub fn watch_node(&self, node: &str) -> broadcast::Receiver<NodeChange> {
        let mut watchers = self.node_watchers.lock();
        watchers.entry(node.to_string()).or_insert_with(|| broadcast::channel(NODE_CHANGES_QUEUED).0).subscribe()
    }

    /// Queues each watched node's share of `changes` (called under the write lock).
    fn notify_nodes(&self, index: u64, changes: Vec<(String, String)>) {
        if changes.is_empty() {
            return;
        }
        let mut watchers = self.node_watchers.lock();
        if watchers.is_empty() {
            return;
        }
        let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
        for (node, id) in changes {
            if watchers.contains_key(&node) {
                by_node.entry(node).or_default().push(id);
            }
        }
        for (node, mut ids) in by_node {
            ids.sort_unstable();
            ids.dedup();
            let gone = watchers.get(&node).is_some_and(|tx| tx.send(NodeChange::Sessions { index, ids }).is_err());
            if gone {
                // No receiver left: the node's watchers all ended.
                watchers.remove(&node);
            }
        }
    }

    /// Tells every watcher to recompute its node's whole set (called under the write lock).
    fn resync_nodes(&self) {
        self.node_watchers.lock().retain(|_, tx| tx.send(NodeChange::Resync).is_ok());
    }
}

/// The state machine store: the in-memory [`ClusterState`], written through to RocksDB.
pub struct StateMachineStore {
    db: Arc<DB>,
    handle: StateHandle,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    stats: Arc<RaftStats>,
}

impl StateMachineStore {
    /// Loads the state machine from its column families.
    pub fn load(db: Arc<DB>) -> StorageResult<Self> {
        let mut state = ClusterState::default();
        for item in db.iterator_cf(cf(&db, CF_SESSIONS), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            state
                .sessions
                .insert(String::from_utf8_lossy(&k).into_owned(), serde_json::from_slice(&v).map_err(read_err)?);
        }
        for item in db.iterator_cf(cf(&db, CF_NODES), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            state.nodes.insert(String::from_utf8_lossy(&k).into_owned(), serde_json::from_slice(&v).map_err(read_err)?);
        }
        for item in db.iterator_cf(cf(&db, CF_REQUEST_IDS), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            state
                .request_ids
                .insert(String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned());
        }
        load_objects(&db, BATCH_PREFIX, &mut state.batches)?;
        load_objects(&db, POOL_PREFIX, &mut state.pools)?;
        load_objects(&db, TEMPLATE_PREFIX, &mut state.templates)?;
        state.signing_seed = get_json(&db, CF_SM_META, b"signing_seed")?.unwrap_or_default();
        state.scheduler_paused = get_json(&db, CF_SM_META, b"scheduler_paused")?.unwrap_or_default();
        state.tenants = get_json(&db, CF_SM_META, b"tenants")?.unwrap_or_default();
        state.api_keys = get_json(&db, CF_SM_META, b"api_keys")?.unwrap_or_default();
        state.sessions_created = get_json(&db, CF_SM_META, b"sessions_created")?.unwrap_or_default();
        state.rebuild_indexes();
        let last_applied = get_json::<Option<LogId<NodeId>>>(&db, CF_SM_META, b"last_applied")?.flatten();
        state.applied_index = last_applied.map_or(0, |l| l.index);
        let membership = get_json(&db, CF_SM_META, b"membership")?.unwrap_or_default();
        let (session_events, _) = broadcast::channel(4096);
        let (version, _) = watch::channel(0);
        Ok(Self {
            db,
            handle: StateHandle {
                state: Arc::new(RwLock::new(state)),
                session_events,
                version,
                node_watchers: Arc::default(),
            },
            last_applied,
            membership,
            stats: Arc::default(),
        })
    }

    /// The read handle for the API layer.
    /// Shares `stats` with the metrics: this store keeps its `snapshot_bytes` up to date.
    pub fn with_stats(mut self, stats: Arc<RaftStats>) -> Self {
        if let Ok(Some(current)) = self.db.get_pinned_cf(cf(&self.db, CF_SNAPSHOT), b"current") {
            stats.snapshot_bytes.store(current.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.stats = stats;
        self
    }

    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    /// Writes the touched keys, `last_applied` and membership in one batch.
    fn write_through(&self, state: &ClusterState, touched: &Touched) -> StorageResult<()> {
        let db = &self.db;
        let mut b = WriteBatch::default();
        for id in &touched.sessions {
            if let Some(s) = state.sessions.get(id) {
                b.put_cf(cf(db, CF_SESSIONS), id, serde_json::to_vec(s).map_err(write_err)?);
            }
        }
        for id in &touched.nodes {
            if let Some(n) = state.nodes.get(id) {
                b.put_cf(cf(db, CF_NODES), id, serde_json::to_vec(n).map_err(write_err)?);
            }
        }
        for rid in &touched.request_ids {
            if let Some(sid) = state.request_ids.get(rid) {
                b.put_cf(cf(db, CF_REQUEST_IDS), rid, sid);
            }
        }
        for id in &touched.batches {
            if let Some(batch) = state.batches.get(id) {
                b.put_cf(
                    cf(db, CF_OBJECTS),
                    format!("{BATCH_PREFIX}{id}"),
                    serde_json::to_vec(batch).map_err(write_err)?,
                );
            }
        }
        put_objects(db, &mut b, POOL_PREFIX, &state.pools, &touched.pools)?;
        put_objects(db, &mut b, TEMPLATE_PREFIX, &state.templates, &touched.templates)?;
        self.put_meta(&mut b, state, touched.meta)?;
        if touched.auth && !touched.meta {
            self.put_auth(&mut b, state)?;
        }
        db.write(b).map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))
    }

    /// Adds the applied position and membership to `b`, and the cluster-wide
    /// settings (signing seed, scheduler pause) when `settings` changed.
    fn put_meta(&self, b: &mut WriteBatch, state: &ClusterState, settings: bool) -> StorageResult<()> {
        let db = &self.db;
        if settings {
            b.put_cf(cf(db, CF_SM_META), b"signing_seed", serde_json::to_vec(&state.signing_seed).map_err(write_err)?);
            b.put_cf(
                cf(db, CF_SM_META),
                b"scheduler_paused",
                serde_json::to_vec(&state.scheduler_paused).map_err(write_err)?,
            );
            self.put_auth(b, state)?;
        }
        // A few bytes, written with every apply: a create changes it.
        b.put_cf(
            cf(db, CF_SM_META),
            b"sessions_created",
            serde_json::to_vec(&state.sessions_created).map_err(write_err)?,
        );
        b.put_cf(cf(db, CF_SM_META), b"last_applied", serde_json::to_vec(&self.last_applied).map_err(write_err)?);
        b.put_cf(cf(db, CF_SM_META), b"membership", serde_json::to_vec(&self.membership).map_err(write_err)?);
        Ok(())
    }

    /// Adds the tenants and API keys (small maps, written whole when either changes).
    fn put_auth(&self, b: &mut WriteBatch, state: &ClusterState) -> StorageResult<()> {
        let db = &self.db;
        b.put_cf(cf(db, CF_SM_META), b"tenants", serde_json::to_vec(&state.tenants).map_err(write_err)?);
        b.put_cf(cf(db, CF_SM_META), b"api_keys", serde_json::to_vec(&state.api_keys).map_err(write_err)?);
        Ok(())
    }

    /// Replaces the whole state machine (snapshot install).
    fn replace_all(&self, state: &ClusterState) -> StorageResult<()> {
        let db = &self.db;
        let mut b = WriteBatch::default();
        for name in [CF_SESSIONS, CF_NODES, CF_REQUEST_IDS, CF_OBJECTS] {
            // Keys are strings; 0xff sorts after every UTF-8 byte sequence.
            b.delete_range_cf(cf(db, name), b"".as_slice(), [0xffu8; 64].as_slice());
        }
        for (id, s) in &state.sessions {
            b.put_cf(cf(db, CF_SESSIONS), id, serde_json::to_vec(s).map_err(write_err)?);
        }
        for (id, n) in &state.nodes {
            b.put_cf(cf(db, CF_NODES), id, serde_json::to_vec(n).map_err(write_err)?);
        }
        for (rid, sid) in &state.request_ids {
            b.put_cf(cf(db, CF_REQUEST_IDS), rid, sid);
        }
        for (id, batch) in &state.batches {
            b.put_cf(cf(db, CF_OBJECTS), format!("{BATCH_PREFIX}{id}"), serde_json::to_vec(batch).map_err(write_err)?);
        }
        for (key, pool) in &state.pools {
            b.put_cf(cf(db, CF_OBJECTS), format!("{POOL_PREFIX}{key}"), serde_json::to_vec(pool).map_err(write_err)?);
        }
        for (name, t) in &state.templates {
            b.put_cf(cf(db, CF_OBJECTS), format!("{TEMPLATE_PREFIX}{name}"), serde_json::to_vec(t).map_err(write_err)?);
        }
        self.put_meta(&mut b, state, true)?;
        db.write_opt(b, &sync_opts()).map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let bytes = serde_json::to_vec(snap).map_err(write_err)?;
        self.db
            .put_cf_opt(cf(&self.db, CF_SNAPSHOT), b"current", bytes, &sync_opts())
            .map_err(|e| io_err(ErrorSubject::Snapshot(Some(snap.meta.signature())), ErrorVerb::Write, e))
    }
}

/// Reads every object under `prefix` of `sm_objects` into `into`, by the key after the prefix.
fn load_objects<T: serde::de::DeserializeOwned>(
    db: &DB,
    prefix: &str,
    into: &mut std::collections::BTreeMap<String, T>,
) -> StorageResult<()> {
    for item in db.prefix_iterator_cf(cf(db, CF_OBJECTS), prefix.as_bytes()) {
        let (k, v) = item.map_err(read_err)?;
        let Some(key) = k.strip_prefix(prefix.as_bytes()) else { break };
        into.insert(String::from_utf8_lossy(key).into_owned(), serde_json::from_slice(&v).map_err(read_err)?);
    }
    Ok(())
}

/// Adds the objects of `keys` to `b` under `prefix`: written when in `map`, deleted when gone.
fn put_objects<T: serde::Serialize>(
    db: &DB,
    b: &mut WriteBatch,
    prefix: &str,
    map: &std::collections::BTreeMap<String, T>,
    keys: &[String],
) -> StorageResult<()> {
    for key in keys {
        let k = format!("{prefix}{key}");
        match map.get(key) {
            Some(v) => b.put_cf(cf(db, CF_OBJECTS), k, serde_json::to_vec(v).map_err(write_err)?),
            None => b.delete_cf(cf(db, CF_OBJECTS), k),
        }
    }
    Ok(())
}

/// Builds snapshots from a copy of the state taken under the read lock.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    state_json: Vec<u8>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    stats: Arc<RaftStats>,
    /// When the state was serialized: the build's duration counts from here.
    started: std::time::Instant,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, crate::now_ms()),
            None => format!("none-{}", crate::now_ms()),
        };
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: std::mem::take(&mut self.state_json) };
        let bytes = serde_json::to_vec(&stored).map_err(write_err)?;
        let size = bytes.len();
        self.db
            .put_cf_opt(cf(&self.db, CF_SNAPSHOT), b"current", bytes, &sync_opts())
            .map_err(|e| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e))?;
        self.stats.snapshot_bytes.store(size as u64, std::sync::atomic::Ordering::Relaxed);
        metrics().snapshot_build.record(self.started.elapsed().as_secs_f64(), &[]);
        tracing::info!(snapshot = %meta.snapshot_id, bytes = size, "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut touched = Touched::default();
        let state_arc = self.handle.state.clone();
        let mut state = state_arc.write();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(CommandResponse::Ok),
                EntryPayload::Normal(cmd) => replies.push(state.apply(cmd, &mut touched)),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(CommandResponse::Ok);
                }
            }
        }
        state.applied_index = self.last_applied.map_or(0, |l| l.index);
        self.write_through(&state, &touched)?;
        let changes = state.take_assignment_changes();
        self.handle.notify_nodes(state.applied_index, changes);
        let changed: Vec<SessionRecord> =
            touched.sessions.iter().filter_map(|id| state.sessions.get(id).cloned()).collect();
        drop(state);
        for s in changed {
            let _ = self.handle.session_events.send(s);
        }
        self.handle.version.send_modify(|v| *v += 1);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let started = std::time::Instant::now();
        let state_json = self.handle.read(|s| serde_json::to_vec(s).unwrap_or_default());
        SnapshotBuilder {
            db: self.db.clone(),
            state_json,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            stats: self.stats.clone(),
            started,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let mut new_state: ClusterState = serde_json::from_slice(&data)
            .map_err(|e| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        new_state.rebuild_indexes();
        new_state.applied_index = meta.last_log_id.map_or(0, |l| l.index);
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.replace_all(&new_state)?;
        self.stats.snapshot_bytes.store(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.save_snapshot(&StoredSnapshot { meta: meta.clone(), data })?;
        let sessions: Vec<SessionRecord> = new_state.sessions.values().cloned().collect();
        {
            let mut state = self.handle.state.write();
            *state = new_state;
            self.handle.resync_nodes();
        }
        for s in sessions {
            let _ = self.handle.session_events.send(s);
        }
        self.handle.version.send_modify(|v| *v += 1);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> = get_json(&self.db, CF_SNAPSHOT, b"current")?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let db = open_db(dir.path()).map_err(write_err)?;
            Ok((dir, LogStore::new(db.clone()), StateMachineStore::load(db)?))
        }
    }

    /// Tenants and API keys are written through with the apply and load back
    /// from the state machine's column families (not only from a log replay).
    #[tokio::test]
    async fn tenants_and_keys_are_written_through_and_load_back() {
        use crate::state::{ApiKeyRecord, Command, Quota, TenantRecord};
        use sandfleet_common::auth::Role;
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let mut sm = StateMachineStore::load(db.clone()).unwrap();
        let entry = |index: u64, cmd: Command| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        };
        let tenant =
            TenantRecord { name: "a".into(), quota: Quota { max_sessions: 3, ..Default::default() }, created_at_ms: 5 };
        let key = ApiKeyRecord {
            id: "0123456789abcdef".into(),
            tenant: "a".into(),
            role: Role::User,
            secret_hash: "h".into(),
            created_at_ms: 6,
            expires_at_ms: 0,
            revoked_at_ms: 0,
        };
        let replies = sm
            .apply(vec![
                entry(1, Command::CreateTenant { tenant: tenant.clone() }),
                entry(2, Command::CreateApiKey { key: key.clone() }),
                entry(3, Command::RevokeApiKey { id: key.id.clone(), now_ms: 9 }),
            ])
            .await
            .unwrap();
        assert!(matches!(replies[2], CommandResponse::ApiKey(_)), "{replies:?}");
        drop(sm);
        let again = StateMachineStore::load(db).unwrap();
        let (tenants, keys, applied) =
            again.handle().read(|st| (st.tenants.clone(), st.api_keys.clone(), st.applied_index));
        assert_eq!(applied, 3);
        assert_eq!(tenants.get("a"), Some(&tenant));
        assert_eq!(keys.get(&key.id).map(|k| k.revoked_at_ms), Some(9));
    }

    /// openraft's own storage conformance suite, against RocksDB on disk.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
        openraft::testing::Suite::test_all(Builder)?;
        Ok(())
    }
}
