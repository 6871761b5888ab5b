//! Tenants, their quotas and API keys (TenantService, ApiKeyService): admin calls.
//!
//! Reads, updates and revocations are retried like any idempotent call;
//! creates and deletes only when no coordinator was reached (a retried create
//! whose first attempt committed would answer ALREADY_EXISTS).

use std::time::Duration;

use tracing::Instrument;

use crate::client::{api_key_client, cluster_client, missing, tenant_client, with_timeout};
use crate::proto;
use crate::retry::RetryPolicy;
use crate::{Client, Error};

/// Deadline of InitCluster, which waits for the new cluster's first leader.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// Creates a tenant with a quota (0 fields are unlimited).
    pub async fn create_tenant(&self, name: &str, quota: proto::TenantQuota) -> Result<proto::Tenant, Error> {
        let msg = proto::CreateTenantRequest { name: name.to_string(), quota: Some(quota) };
        self.control("create_tenant", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(tenant_client(ch).create_tenant(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("create_tenant", name))
        .await?
        .tenant
        .ok_or_else(|| missing("tenant"))
    }

    /// One tenant with its quota and use.
    pub async fn get_tenant(&self, name: &str) -> Result<proto::Tenant, Error> {
        let msg = proto::GetTenantRequest { name: name.to_string() };
        self.control("get_tenant", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(tenant_client(ch).get_tenant(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .tenant
        .ok_or_else(|| missing("tenant"))
    }

    /// Every tenant ("default" included) with its quota and use.
    pub async fn list_tenants(&self) -> Result<Vec<proto::Tenant>, Error> {
        self.control("list_tenants", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| async move {
            Ok(tenant_client(ch).list_tenants(with_timeout(proto::ListTenantsRequest {}, t)).await?.into_inner())
        })
        .await
        .map(|r| r.tenants)
    }

    /// Changes the limits set in `req` (absent ones stay).
    pub async fn update_tenant(&self, req: proto::UpdateTenantRequest) -> Result<proto::Tenant, Error> {
        self.control("update_tenant", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = req.clone();
            async move { Ok(tenant_client(ch).update_tenant(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .tenant
        .ok_or_else(|| missing("tenant"))
    }

    /// Deletes a tenant without live sessions or active keys.
    pub async fn delete_tenant(&self, name: &str) -> Result<(), Error> {
        let msg = proto::DeleteTenantRequest { name: name.to_string() };
        self.control("delete_tenant", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(tenant_client(ch).delete_tenant(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await
        .map(|_| ())
    }

    /// Creates an API key; the response's `secret` is the whole key, shown this once.
    pub async fn create_api_key(
        &self,
        tenant: &str,
        role: proto::ApiKeyRole,
        expires_in: Option<Duration>,
    ) -> Result<proto::CreateApiKeyResponse, Error> {
        let msg = proto::CreateApiKeyRequest {
            tenant: tenant.to_string(),
            role: role as i32,
            expires_in_seconds: expires_in.map_or(0, |d| d.as_secs().max(1)),
        };
        self.control("create_api_key", RetryPolicy::ConnectOnly, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(api_key_client(ch).create_api_key(with_timeout(msg, t)).await?.into_inner()) }
        })
        .instrument(tracing::debug_span!("create_api_key", tenant))
        .await
    }

    /// API keys (never their secrets), of one tenant or all.
    pub async fn list_api_keys(&self, tenant: Option<&str>) -> Result<Vec<proto::ApiKey>, Error> {
        let msg = proto::ListApiKeysRequest { tenant: tenant.unwrap_or_default().to_string() };
        self.control("list_api_keys", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(api_key_client(ch).list_api_keys(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await
        .map(|r| r.keys)
    }

    /// Revokes an API key by id; every coordinator refuses it once applied.
    pub async fn revoke_api_key(&self, id: &str) -> Result<proto::ApiKey, Error> {
        let msg = proto::RevokeApiKeyRequest { id: id.to_string() };
        self.control("revoke_api_key", RetryPolicy::Idempotent, self.request_timeout(), |ch, t| {
            let msg = msg.clone();
            async move { Ok(api_key_client(ch).revoke_api_key(with_timeout(msg, t)).await?.into_inner()) }
        })
        .await?
        .key
        .ok_or_else(|| missing("key"))
    }

    /// Like [`Client::init_cluster`], and also creates the first admin API key
    /// (tenant "default"), returned with the membership: shown this once.
    pub async fn init_cluster_with_admin_key(
        &self,
        members: impl IntoIterator<Item = (u64, String)>,
    ) -> Result<(proto::ClusterStatusResponse, String), Error> {
        let msg = proto::InitClusterRequest { members: members.into_iter().collect(), create_admin_key: true };
        let timeout = self.request_timeout().max(INIT_TIMEOUT);
        let r = self
            .control("init_cluster", RetryPolicy::ConnectOnly, timeout, |ch, t| {
                let msg = msg.clone();
                async move { Ok(cluster_client(ch).init_cluster(with_timeout(msg, t)).await?.into_inner()) }
            })
            .instrument(tracing::debug_span!("init_cluster"))
            .await?;
        Ok((r.status.ok_or_else(|| missing("status"))?, r.admin_key))
    }
}
