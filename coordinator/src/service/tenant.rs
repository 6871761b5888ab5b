//! TenantService and ApiKeyService: tenants with their quotas, and API keys.
//! Admin only. Writes go through Raft ([`Core::propose`], forwarded to the
//! leader); reads pass the read barrier first, like every other service.
//! Every mutating call logs one audit event ([`super::auth::audited`]).

use std::sync::Arc;

use sandfleet_common::auth::{ApiKey, Role};
use sandfleet_common::{ids, ValidationError};
use sandfleet_proto::v1::{self as pb, api_key_service_server::ApiKeyService, tenant_service_server::TenantService};
use tonic::{Request, Response, Status};

use super::auth::{audited, Authenticator};
use crate::core::Core;
use crate::state::{ApiKeyRecord, ClusterState, Command, CommandResponse, Quota, QuotaUpdate, TenantRecord};

/// Most tenants a cluster holds.
pub const MAX_TENANTS: usize = 10_000;
/// Most API keys a cluster holds, revoked ones included.
pub const MAX_API_KEYS: usize = 100_000;
/// Largest `max_sessions`.
pub const MAX_QUOTA_SESSIONS: u64 = 1_000_000;
/// Largest `max_cpu_millis` (a million cores).
pub const MAX_QUOTA_CPU_MILLIS: u64 = 1_024_000_000;
/// Largest `max_memory_bytes` (1 EiB).
pub const MAX_QUOTA_MEMORY_BYTES: u64 = 1 << 60;
/// Longest API key lifetime (10 years).
pub const MAX_KEY_LIFETIME_SECONDS: u64 = 315_360_000;

/// The TenantService implementation.
pub struct TenantApi {
    core: Arc<Core>,
    auth: Authenticator,
}

impl TenantApi {
    pub fn new(core: Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }
}

/// The ApiKeyService implementation.
pub struct ApiKeyApi {
    core: Arc<Core>,
    auth: Authenticator,
}

impl ApiKeyApi {
    pub fn new(core: Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }
}

fn validate_tenant_name(name: &str) -> Result<(), Status> {
    Ok(ids::validate_dns_label("tenant", name)?)
}

fn check_limit(field: &'static str, value: u64, max: u64) -> Result<u64, Status> {
    if value > max {
        return Err(ValidationError::over(field, max, value).into());
    }
    Ok(value)
}

fn quota_from_proto(q: Option<pb::TenantQuota>) -> Result<Quota, Status> {
    let q = q.unwrap_or_default();
    Ok(Quota {
        max_sessions: check_limit("max_sessions", q.max_sessions, MAX_QUOTA_SESSIONS)?,
        max_cpu_millis: check_limit("max_cpu_millis", q.max_cpu_millis, MAX_QUOTA_CPU_MILLIS)?,
        max_memory_bytes: check_limit("max_memory_bytes", q.max_memory_bytes, MAX_QUOTA_MEMORY_BYTES)?,
    })
}

/// A tenant for the wire, with its use as this member sees it.
pub fn tenant_to_proto(st: &ClusterState, t: &TenantRecord) -> pb::Tenant {
    let used = st.usage_of(&t.name);
    pb::Tenant {
        name: t.name.clone(),
        quota: Some(pb::TenantQuota {
            max_sessions: t.quota.max_sessions,
            max_cpu_millis: t.quota.max_cpu_millis,
            max_memory_bytes: t.quota.max_memory_bytes,
        }),
        usage: Some(pb::TenantUsage {
            sessions: used.slots,
            cpu_millis: used.cpu_millis,
            memory_bytes: used.memory_bytes,
        }),
        created_at_ms: t.created_at_ms,
    }
}

/// A key for the wire: never its hash.
pub fn key_to_proto(k: &ApiKeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        role: role_to_proto(k.role) as i32,
        created_at_ms: k.created_at_ms,
        expires_at_ms: k.expires_at_ms,
        revoked_at_ms: k.revoked_at_ms,
    }
}

pub fn role_to_proto(r: Role) -> pb::ApiKeyRole {
    match r {
        Role::User => pb::ApiKeyRole::User,
        Role::Admin => pb::ApiKeyRole::Admin,
    }
}

/// Maps the apply results of tenant and key commands that are not the success expected.
fn refused(r: CommandResponse) -> Status {
    match r {
        CommandResponse::Missing(why) => Status::not_found(why),
        CommandResponse::AlreadyExists(why) => Status::already_exists(why),
        CommandResponse::Rejected(why) => Status::failed_precondition(why),
        other => Status::internal(format!("unexpected apply result {other:?}")),
    }
}

impl TenantApi {
    async fn create(&self, req: pb::CreateTenantRequest) -> Result<pb::CreateTenantResponse, Status> {
        validate_tenant_name(&req.name)?;
        let quota = quota_from_proto(req.quota)?;
        if self.core.state.read(|st| st.tenants.len()) >= MAX_TENANTS {
            return Err(Status::resource_exhausted(format!("the cluster holds the most tenants, {MAX_TENANTS}")));
        }
        let tenant = TenantRecord { name: req.name, quota, created_at_ms: crate::now_ms() };
        match self.core.propose(Command::CreateTenant { tenant }).await? {
            CommandResponse::Tenant(t) => {
                let tenant = self.core.state.read(|st| tenant_to_proto(st, &t));
                Ok(pb::CreateTenantResponse { tenant: Some(tenant) })
            }
            other => Err(refused(other)),
        }
    }

    async fn update(&self, req: pb::UpdateTenantRequest) -> Result<pb::UpdateTenantResponse, Status> {
        validate_tenant_name(&req.name)?;
        let update = QuotaUpdate {
            max_sessions: req.max_sessions.map(|v| check_limit("max_sessions", v, MAX_QUOTA_SESSIONS)).transpose()?,
            max_cpu_millis: req
                .max_cpu_millis
                .map(|v| check_limit("max_cpu_millis", v, MAX_QUOTA_CPU_MILLIS))
                .transpose()?,
            max_memory_bytes: req
                .max_memory_bytes
                .map(|v| check_limit("max_memory_bytes", v, MAX_QUOTA_MEMORY_BYTES))
                .transpose()?,
        };
        match self.core.propose(Command::UpdateTenant { name: req.name, update }).await? {
            CommandResponse::Tenant(t) => {
                let tenant = self.core.state.read(|st| tenant_to_proto(st, &t));
                Ok(pb::UpdateTenantResponse { tenant: Some(tenant) })
            }
            other => Err(refused(other)),
        }
    }

    async fn delete(&self, req: pb::DeleteTenantRequest) -> Result<pb::DeleteTenantResponse, Status> {
        validate_tenant_name(&req.name)?;
        match self.core.propose(Command::DeleteTenant { name: req.name, now_ms: crate::now_ms() }).await? {
            CommandResponse::Ok => Ok(pb::DeleteTenantResponse {}),
            other => Err(refused(other)),
        }
    }
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    #[tracing::instrument(skip_all, fields(tenant = %req.get_ref().name))]
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let resource = format!("tenant/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "CreateTenant",
            Role::Admin,
            |_| resource,
            |_, req| self.create(req.into_inner()),
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(tenant = %req.get_ref().name))]
    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Result<Response<pb::GetTenantResponse>, Status> {
        self.auth.admin(&req)?;
        let name = req.into_inner().name;
        validate_tenant_name(&name)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let tenant = self
            .core
            .state
            .read(|st| st.tenant(&name).map(|t| tenant_to_proto(st, &t)))
            .ok_or_else(|| Status::not_found(format!("tenant {name:?} not found")))?;
        Ok(Response::new(pb::GetTenantResponse { tenant: Some(tenant) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.auth.admin(&req)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let tenants = self.core.state.read(|st| st.all_tenants().iter().map(|t| tenant_to_proto(st, t)).collect());
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    #[tracing::instrument(skip_all, fields(tenant = %req.get_ref().name))]
    async fn update_tenant(
        &self,
        req: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let resource = format!("tenant/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "UpdateTenant",
            Role::Admin,
            |_| resource,
            |_, req| self.update(req.into_inner()),
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(tenant = %req.get_ref().name))]
    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let resource = format!("tenant/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "DeleteTenant",
            Role::Admin,
            |_| resource,
            |_, req| self.delete(req.into_inner()),
        )
        .await
        .map(Response::new)
    }
}

/// Proposes a new key of `tenant` with `role` and returns its record and the
/// whole key text (shown once). Also used by InitCluster and `--admin-key-file`.
pub async fn create_key(
    core: &Core,
    tenant: &str,
    role: Role,
    expires_in_seconds: u64,
) -> Result<(ApiKeyRecord, String), Status> {
    let key = ApiKey::generate();
    let now = crate::now_ms();
    let record = ApiKeyRecord {
        id: key.id.clone(),
        tenant: tenant.to_string(),
        role,
        secret_hash: key.secret_hash(),
        created_at_ms: now,
        expires_at_ms: if expires_in_seconds == 0 { 0 } else { now + expires_in_seconds as i64 * 1000 },
        revoked_at_ms: 0,
    };
    match core.propose(Command::CreateApiKey { key: record }).await? {
        CommandResponse::ApiKey(k) => Ok((k, key.expose())),
        other => Err(refused(other)),
    }
}

impl ApiKeyApi {
    async fn create(&self, req: pb::CreateApiKeyRequest) -> Result<pb::CreateApiKeyResponse, Status> {
        validate_tenant_name(&req.tenant)?;
        let role = match pb::ApiKeyRole::try_from(req.role) {
            Ok(pb::ApiKeyRole::User) => Role::User,
            Ok(pb::ApiKeyRole::Admin) => Role::Admin,
            _ => return Err(Status::invalid_argument("invalid role: use API_KEY_ROLE_USER or API_KEY_ROLE_ADMIN")),
        };
        check_limit("expires_in_seconds", req.expires_in_seconds, MAX_KEY_LIFETIME_SECONDS)?;
        if self.core.state.read(|st| st.api_keys.len()) >= MAX_API_KEYS {
            return Err(Status::resource_exhausted(format!(
                "the cluster holds the most API keys, {MAX_API_KEYS} (revoked ones included)"
            )));
        }
        let (record, secret) = create_key(&self.core, &req.tenant, role, req.expires_in_seconds).await?;
        Ok(pb::CreateApiKeyResponse { key: Some(key_to_proto(&record)), secret })
    }

    async fn revoke(&self, req: pb::RevokeApiKeyRequest) -> Result<pb::RevokeApiKeyResponse, Status> {
        validate_key_id(&req.id)?;
        match self.core.propose(Command::RevokeApiKey { id: req.id, now_ms: crate::now_ms() }).await? {
            CommandResponse::ApiKey(k) => Ok(pb::RevokeApiKeyResponse { key: Some(key_to_proto(&k)) }),
            other => Err(refused(other)),
        }
    }
}

fn validate_key_id(id: &str) -> Result<(), Status> {
    let ok = id.len() == sandfleet_common::auth::API_KEY_ID_LEN
        && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid id: an API key id is {} lowercase hex characters (the part after sfk_)",
            sandfleet_common::auth::API_KEY_ID_LEN
        )))
    }
}

#[tonic::async_trait]
impl ApiKeyService for ApiKeyApi {
    #[tracing::instrument(skip_all, fields(tenant = %req.get_ref().tenant))]
    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let tenant = req.get_ref().tenant.clone();
        let resource = |r: Option<&pb::CreateApiKeyResponse>| match r {
            Some(r) => format!("apikey/{}", r.key.as_ref().map_or("", |k| k.id.as_str())),
            None => format!("tenant/{tenant}"),
        };
        audited(self.auth.caller(&req), req, "CreateApiKey", Role::Admin, resource, |_, req| {
            self.create(req.into_inner())
        })
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.auth.admin(&req)?;
        let tenant = req.into_inner().tenant;
        if !tenant.is_empty() {
            validate_tenant_name(&tenant)?;
        }
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let keys = self.core.state.read(|st| {
            st.api_keys.values().filter(|k| tenant.is_empty() || k.tenant == tenant).map(key_to_proto).collect()
        });
        Ok(Response::new(pb::ListApiKeysResponse { keys }))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().id))]
    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let resource = format!("apikey/{}", req.get_ref().id);
        audited(
            self.auth.caller(&req),
            req,
            "RevokeApiKey",
            Role::Admin,
            |_| resource,
            |_, req| self.revoke(req.into_inner()),
        )
        .await
        .map(Response::new)
    }
}
