//! Warm pools (PoolService): sandboxes of one spec started ahead, claimed by
//! [`CreateSession::pool`](crate::CreateSession::pool) in one Raft write.
//!
//! Reads, updates and deletes are retried like any idempotent call; a create
//! only when no coordinator was reached (a retried create whose first attempt
//! committed would answer ALREADY_EXISTS).

use tracing::Instrument;

use crate::client::{missing, pool_client, with_timeout};
use crate::proto;
use crate::retry::RetryPolicy;
use crate::{Client, Error};

impl Client {
    /// Creates a warm pool of the caller's tenant (`pool`'s read-only fields are ignored).
    pub async fn create_pool(&self, pool: proto::Pool) -> Result<proto::Pool, Error> {
        let span = tracing::info_span!("create_pool", name = %pool.name);
        let msg = proto::CreatePoolRequest { pool: Some(pool) };
        self.control("create_pool", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(pool_client(ch).create_pool(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(span)
        .await?
        .pool
        .ok_or_else(|| missing("pool"))
    }

    /// One pool with its sandboxes counted (idle, starting, claimed, failed).
    pub async fn get_pool(&self, name: &str) -> Result<proto::Pool, Error> {
        let msg = proto::GetPoolRequest { name: name.to_string() };
        self.control("get_pool", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(pool_client(ch).get_pool(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .pool
        .ok_or_else(|| missing("pool"))
    }

    /// The caller's tenant's pools (every tenant's for an admin).
    pub async fn list_pools(&self) -> Result<Vec<proto::Pool>, Error> {
        self.control("list_pools", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| async move {
            Ok(pool_client(ch).list_pools(with_timeout(proto::ListPoolsRequest {}, t)).await?.into_inner())
        })
        .await
        .map(|r| r.pools)
    }

    /// Changes the bounds set in `req` (absent ones stay).
    pub async fn update_pool(&self, req: proto::UpdatePoolRequest) -> Result<proto::Pool, Error> {
        self.control("update_pool", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = req.clone();
            async move { Ok(pool_client(ch).update_pool(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .pool
        .ok_or_else(|| missing("pool"))
    }

    /// Deletes a pool and ends its idle sandboxes (claimed ones stay).
    pub async fn delete_pool(&self, name: &str) -> Result<(), Error> {
        let msg = proto::DeletePoolRequest { name: name.to_string() };
        self.control("delete_pool", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(pool_client(ch).delete_pool(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::info_span!("delete_pool", name))
        .await
        .map(|_| ())
    }
}
