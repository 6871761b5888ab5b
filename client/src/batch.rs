//! Batches of sessions: [`CreateBatch`] and the batch calls
//! (CreateSessions, GetBatch, ListBatches, DeleteBatch).
//!
//! A batch is created whole or not at all and is idempotent on its request
//! id, so [`Client::create_batch`] retries it like a single create: a retry
//! after a lost answer returns the first batch with `existing` set.

use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::client::{humanize, missing, session_client, with_timeout};
use crate::proto;
use crate::retry::RetryPolicy;
use crate::{Client, CreateSession, Error};

/// A batch create: `count` replicas of one spec, with per-replica patches.
///
/// ```
/// use sandfleet::{CreateBatch, CreateSession};
/// let batch = CreateBatch::new(3, CreateSession::new().template("python"))
///     .patch(0, [("SHARD", "0")], [("role", "leader")])
///     .patch(2, [("SHARD", "2")], []);
/// assert_eq!(batch.patches.len(), 3);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CreateBatch {
    /// Client-chosen idempotency key of the whole batch.
    pub request_id: String,
    /// How many sessions.
    pub count: u32,
    /// What every replica runs.
    pub spec: proto::SessionSpec,
    /// `patches[i]` changes replica `i`'s env and labels.
    pub patches: Vec<proto::ReplicaPatch>,
    /// Claim the replicas from this warm pool (the rest start cold from its spec).
    pub pool: Option<String>,
}

impl CreateBatch {
    /// `count` replicas of `session`'s spec, with a fresh request id
    /// (`sdk-batch-<uuid>`; `session`'s own request id is not used).
    pub fn new(count: u32, session: CreateSession) -> Self {
        Self {
            request_id: format!("sdk-batch-{}", uuid::Uuid::new_v4()),
            count,
            spec: session.spec,
            patches: Vec::new(),
            pool: None,
        }
    }

    /// `count` replicas taken from warm pool `pool`: as many idle sandboxes as
    /// it holds are claimed in the batch's one Raft entry (RUNNING at once), the
    /// rest start cold from the pool's spec. Patches may set labels only.
    pub fn from_pool(count: u32, pool: impl Into<String>) -> Self {
        Self { pool: Some(pool.into()), ..Self::new(count, CreateSession::new()) }
    }

    /// Sets the idempotency key.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }

    /// Sets replica `index`'s env and labels (merged over the spec's). The
    /// replicas before it that have no patch yet get an empty one.
    pub fn patch<K: Into<String>, V: Into<String>, L: Into<String>, W: Into<String>>(
        mut self,
        index: usize,
        env: impl IntoIterator<Item = (K, V)>,
        labels: impl IntoIterator<Item = (L, W)>,
    ) -> Self {
        if self.patches.len() <= index {
            self.patches.resize(index + 1, proto::ReplicaPatch::default());
        }
        let p = &mut self.patches[index];
        p.env.extend(env.into_iter().map(|(k, v)| (k.into(), v.into())));
        p.labels.extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Runs the checks the server runs on a batch (the shared definitions in
    /// [`sandfleet_common::spec`]); the error carries the server's status code.
    pub fn validate(&self) -> Result<(), Error> {
        let check = || -> Result<(), sandfleet_common::ValidationError> {
            sandfleet_common::ids::validate_request_id(&self.request_id)?;
            let bounds = Default::default();
            if let Some(pool) = &self.pool {
                sandfleet_common::ids::validate_dns_label("pool", pool)?;
                if self.spec != proto::SessionSpec::default() {
                    return Err(sandfleet_common::ValidationError::invalid("spec", "give a spec or a pool, not both"));
                }
                if self.patches.iter().any(|p| !p.env.is_empty()) {
                    return Err(sandfleet_common::ValidationError::invalid(
                        "patches",
                        "a pool's sandboxes run with the pool's env; patches of a batch from a pool may set labels only",
                    ));
                }
            }
            let spec = sandfleet_common::spec::SessionSpec::precheck(&self.spec, &bounds)?;
            sandfleet_common::spec::check_batch(&spec, self.count, &self.patches, &bounds)?;
            Ok(())
        };
        check().map_err(|e| Error::Status(e.into()))
    }

    /// The wire request.
    pub fn into_proto(self) -> proto::CreateSessionsRequest {
        proto::CreateSessionsRequest {
            request_id: self.request_id,
            count: self.count,
            spec: self.pool.is_none().then_some(self.spec),
            patches: self.patches,
            pool: self.pool.unwrap_or_default(),
        }
    }
}

/// How often [`Client::wait_batch`] reads the batch.
const BATCH_POLL: Duration = Duration::from_millis(100);

impl Client {
    /// Creates a batch of sessions, whole or not at all. Retried with the same
    /// request id, so a retry never makes a second batch; `existing` is set
    /// when the request id had already made it.
    pub async fn create_batch(&self, req: CreateBatch) -> Result<proto::CreateSessionsResponse, Error> {
        let span = tracing::info_span!("create_batch", request_id = %req.request_id, count = req.count);
        req.validate()?;
        let msg = req.into_proto();
        self.control("create_sessions", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).create_sessions(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(span)
        .await
    }

    /// One batch, its replicas counted by state, with its session ids (linearizable read).
    pub async fn get_batch(&self, id: &str) -> Result<proto::Batch, Error> {
        let msg =
            proto::GetBatchRequest { id: id.to_string(), consistency: proto::ReadConsistency::Linearizable as i32 };
        self.control("get_batch", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).get_batch(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("get_batch", id))
        .await?
        .batch
        .ok_or_else(|| missing("batch"))
    }

    /// Batches (of `tenant`, or the caller's own; every tenant's for an admin
    /// who names none), oldest first, without their session ids.
    pub async fn list_batches(&self, tenant: Option<&str>) -> Result<Vec<proto::Batch>, Error> {
        let msg = proto::ListBatchesRequest {
            tenant: tenant.unwrap_or_default().to_string(),
            consistency: proto::ReadConsistency::Linearizable as i32,
        };
        self.control("list_batches", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).list_batches(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await
        .map(|r| r.batches)
    }

    /// Deletes a batch: terminates all its sessions (a no-op for a deleted batch).
    pub async fn delete_batch(&self, id: &str) -> Result<proto::Batch, Error> {
        let msg = proto::DeleteBatchRequest { id: id.to_string() };
        self.control("delete_batch", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(session_client(ch).delete_batch(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::info_span!("delete_batch", id))
        .await?
        .batch
        .ok_or_else(|| missing("batch"))
    }

    /// Waits until every replica of a batch is RUNNING, calling `progress`
    /// with the batch each time it changes. Fails with [`Error::BatchFailed`]
    /// when a replica FAILED or was terminated, and with [`Error::Timeout`]
    /// after `timeout`, naming the counts.
    pub async fn wait_batch(
        &self,
        id: &str,
        timeout: Duration,
        mut progress: impl FnMut(&proto::Batch),
    ) -> Result<proto::Batch, Error> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<proto::Batch> = None;
        loop {
            let b = self.get_batch(id).await?;
            if last.as_ref() != Some(&b) {
                progress(&b);
            }
            if b.failed > 0 || b.terminated > 0 || b.deleted_at_ms != 0 {
                return Err(Error::BatchFailed {
                    id: id.to_string(),
                    failed: b.failed,
                    terminated: b.terminated,
                    deleted: b.deleted_at_ms != 0,
                });
            }
            if b.running == b.desired {
                return Ok(b);
            }
            if Instant::now() + BATCH_POLL > deadline {
                return Err(Error::Timeout(format!(
                    "batch {id} is not all running after {}: {} of {} running, {} placed, {} pending",
                    humanize(timeout),
                    b.running,
                    b.desired,
                    b.placed,
                    b.pending
                )));
            }
            last = Some(b);
            tokio::time::sleep(BATCH_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_fill_up_to_their_index_and_merge() {
        let b = CreateBatch::new(4, CreateSession::new().env("A", "1"))
            .patch(2, [("A", "2")], [("shard", "two")])
            .patch(2, [("B", "3")], Vec::<(String, String)>::new());
        assert!(b.request_id.starts_with("sdk-batch-"));
        assert_eq!(b.patches.len(), 3);
        assert_eq!(b.patches[0], proto::ReplicaPatch::default());
        assert_eq!(b.patches[2].env.len(), 2);
        assert_eq!(b.patches[2].labels["shard"], "two");
        b.validate().expect("a valid batch");
    }

    #[test]
    fn bad_batches_fail_before_sending_with_the_servers_codes() {
        let code = |b: CreateBatch| b.validate().unwrap_err().code();
        assert_eq!(code(CreateBatch::new(0, CreateSession::new())), Some(tonic::Code::InvalidArgument));
        assert_eq!(code(CreateBatch::new(10_001, CreateSession::new())), Some(tonic::Code::OutOfRange));
        let too_many = CreateBatch::new(1, CreateSession::new()).patch(1, [("A", "1")], Vec::<(String, String)>::new());
        assert_eq!(code(too_many), Some(tonic::Code::InvalidArgument));
        let bad_key = CreateBatch::new(2, CreateSession::new()).patch(1, [("1A", "x")], Vec::<(String, String)>::new());
        let e = bad_key.validate().unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
        assert!(e.to_string().contains("patches[1]"), "{e}");
        let reserved = CreateBatch::new(2, CreateSession::new().label("sandfleet.io/batch", "x"));
        assert_eq!(code(reserved), Some(tonic::Code::InvalidArgument));
    }
}
