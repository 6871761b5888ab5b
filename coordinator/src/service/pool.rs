//! Warm pools: `PoolService` (create, get, list, update, delete) and the
//! claim of an idle sandbox by `CreateSession{pool}`.
//!
//! A pool is replicated state (`PoolRecord`); its sandboxes are ordinary
//! sessions of the pool's tenant carrying the pool's name, made by the leader
//! loop (`plan::plan_pools` -> `FillPool`) and placed and started like any
//! other. A claim is one Raft entry (`ClaimSession`) whose apply hands out
//! one idle RUNNING sandbox, so across leader changes and retries each idle
//! sandbox goes to at most one request id. When none is idle, the create
//! starts a session cold from the pool's spec and says so in its message.

use sandfleet_common::auth::{Caller, Role};
use sandfleet_common::{ids, limits, ValidationError};
use sandfleet_proto::v1::{self as pb, pool_service_server::PoolService};
use tonic::{Request, Response, Status};

use crate::core::Core;
use crate::service::auth::{audited, Authenticator};
use crate::service::response_status;
use crate::service::session::{validate_spec, SessionApi};
use crate::state::{pool_key, ClusterState, Command, CommandResponse, PoolBounds, PoolRecord};

/// Most sandboxes a pool may hold (`max`).
pub const MAX_POOL_SIZE: u32 = 10_000;
/// The label every sandbox of a pool carries: `sandfleet.io/pool=<name>`.
pub const POOL_LABEL: &str = "sandfleet.io/pool";

/// The message of a session started cold because pool `name` had no idle
/// sandbox; it also tells a retry of that create that it came from the pool.
fn cold_message(name: &str) -> String {
    format!("pool {name} had no idle sandbox: started cold")
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("pool {name:?} not found"))
}

/// A pool for the wire, with its sandboxes counted.
pub fn pool_to_proto(st: &ClusterState, p: &PoolRecord) -> pb::Pool {
    let c = st.pool_counts(&pool_key(&p.tenant, &p.name));
    let mut spec = p.spec.to_proto();
    spec.labels.remove(POOL_LABEL);
    pb::Pool {
        name: p.name.clone(),
        spec: Some(spec),
        min: p.min,
        max: p.max,
        buffer_min: p.buffer_min,
        buffer_max: p.buffer_max,
        tenant: p.tenant.clone(),
        idle: c.idle,
        starting: c.starting,
        claimed: c.claimed,
        failed: c.failed,
        created_at_ms: p.created_at_ms,
    }
}

/// Each bound at most [`MAX_POOL_SIZE`] (OUT_OF_RANGE), and in order (INVALID_ARGUMENT).
fn check_bounds(p: &PoolRecord) -> Result<(), Status> {
    for (field, v) in [("min", p.min), ("max", p.max), ("buffer_min", p.buffer_min), ("buffer_max", p.buffer_max)] {
        if v > MAX_POOL_SIZE {
            return Err(ValidationError::out_of_range(field, format!("0..={MAX_POOL_SIZE} sandboxes"), v).into());
        }
    }
    p.check_bounds().map_err(|why| Status::invalid_argument(format!("invalid pool bounds: {why}")))
}

/// The PoolService implementation.
pub struct PoolApi {
    core: std::sync::Arc<Core>,
    auth: Authenticator,
}

impl PoolApi {
    pub fn new(core: std::sync::Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }

    async fn create(&self, caller: &Caller, req: pb::CreatePoolRequest) -> Result<pb::CreatePoolResponse, Status> {
        let p = req.pool.ok_or_else(|| Status::invalid_argument("invalid pool: missing"))?;
        ids::validate_dns_label("name", &p.name)?;
        let mut spec = validate_spec(&self.core, p.spec).await?;
        sandfleet_common::spec::check_reserved_labels("spec.labels", spec.labels.keys())?;
        spec.labels.insert(POOL_LABEL.to_string(), p.name.clone());
        if spec.labels.len() > limits::MAX_LABELS {
            return Err(ValidationError::over(
                "spec.labels",
                format!("{} labels with the pool label", limits::MAX_LABELS),
                spec.labels.len(),
            )
            .into());
        }
        let pool = PoolRecord {
            name: p.name,
            tenant: caller.tenant.clone(),
            spec,
            min: p.min,
            max: p.max,
            buffer_min: p.buffer_min,
            buffer_max: p.buffer_max,
            created_at_ms: crate::now_ms(),
        };
        check_bounds(&pool)?;
        let resp = self.core.propose(Command::CreatePool { pool }).await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::Pool(p) => {
                tracing::info!(pool = %p.name, tenant = %p.tenant, min = p.min, max = p.max, "pool created");
                Ok(pb::CreatePoolResponse { pool: Some(self.core.state.read(|st| pool_to_proto(st, &p))) })
            }
            other => Err(response_status(other)),
        }
    }

    async fn update(&self, caller: &Caller, req: pb::UpdatePoolRequest) -> Result<pb::UpdatePoolResponse, Status> {
        ids::validate_dns_label("name", &req.name)?;
        let bounds = PoolBounds { min: req.min, max: req.max, buffer_min: req.buffer_min, buffer_max: req.buffer_max };
        let key = pool_key(&caller.tenant, &req.name);
        let current = self.core.state.read(|st| st.pools.get(&key).cloned()).ok_or_else(|| not_found(&req.name))?;
        check_bounds(&current.with_bounds(bounds))?;
        let resp = self
            .core
            .propose(Command::UpdatePool { tenant: caller.tenant.clone(), name: req.name.clone(), bounds })
            .await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::Pool(p) => {
                Ok(pb::UpdatePoolResponse { pool: Some(self.core.state.read(|st| pool_to_proto(st, &p))) })
            }
            other => Err(response_status(other)),
        }
    }

    async fn delete(&self, caller: &Caller, req: pb::DeletePoolRequest) -> Result<pb::DeletePoolResponse, Status> {
        ids::validate_dns_label("name", &req.name)?;
        let now_ms = crate::now_ms();
        let resp = self
            .core
            .propose(Command::DeletePool { tenant: caller.tenant.clone(), name: req.name.clone(), now_ms })
            .await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::Ok => {
                tracing::info!(pool = %req.name, tenant = %caller.tenant, "pool deleted");
                Ok(pb::DeletePoolResponse {})
            }
            other => Err(response_status(other)),
        }
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    #[tracing::instrument(skip_all)]
    async fn create_pool(
        &self,
        req: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let name = req.get_ref().pool.as_ref().map(|p| p.name.clone()).unwrap_or_default();
        audited(
            self.auth.caller(&req),
            req,
            "CreatePool",
            Role::User,
            |_| format!("pool/{name}"),
            |caller, req| async move { self.create(&caller, req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(pool = %req.get_ref().name))]
    async fn get_pool(&self, req: Request<pb::GetPoolRequest>) -> Result<Response<pb::GetPoolResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        let name = req.into_inner().name;
        ids::validate_dns_label("name", &name)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let key = pool_key(&caller.tenant, &name);
        let pool = self.core.state.read(|st| st.pools.get(&key).map(|p| pool_to_proto(st, p)));
        Ok(Response::new(pb::GetPoolResponse { pool: Some(pool.ok_or_else(|| not_found(&name))?) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(&self, req: Request<pb::ListPoolsRequest>) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        self.core.read_barrier(pb::ReadConsistency::Linearizable as i32).await?;
        let pools = self.core.state.read(|st| {
            st.pools.values().filter(|p| caller.may_access_tenant(&p.tenant)).map(|p| pool_to_proto(st, p)).collect()
        });
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    #[tracing::instrument(skip_all, fields(pool = %req.get_ref().name))]
    async fn update_pool(
        &self,
        req: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<pb::UpdatePoolResponse>, Status> {
        let resource = format!("pool/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "UpdatePool",
            Role::User,
            |_| resource,
            |caller, req| async move { self.update(&caller, req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(pool = %req.get_ref().name))]
    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let resource = format!("pool/{}", req.get_ref().name);
        audited(
            self.auth.caller(&req),
            req,
            "DeletePool",
            Role::User,
            |_| resource,
            |caller, req| async move { self.delete(&caller, req.into_inner()).await },
        )
        .await
        .map(Response::new)
    }
}

impl SessionApi {
    /// `CreateSession{pool}`: claims an idle sandbox of the caller's tenant's
    /// pool, or starts one cold from the pool's spec when none is idle.
    pub(crate) async fn claim(
        &self,
        caller: &Caller,
        req: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, Status> {
        ids::validate_dns_label("pool", &req.pool)?;
        if req.spec.as_ref().is_some_and(|s| *s != pb::SessionSpec::default()) {
            return Err(Status::invalid_argument(
                "invalid spec: give a spec or a pool, not both (a pool's sandboxes run the pool's spec)",
            ));
        }
        let core: &Core = &self.core;
        let key = pool_key(&caller.tenant, &req.pool);
        let rkey = crate::state::request_key(&caller.tenant, &req.request_id);
        let (pool, seen) = core.state.read(|st| {
            (st.pools.get(&key).cloned(), st.request_ids.get(&rkey).and_then(|id| st.sessions.get(id)).cloned())
        });
        let answer = |s: &crate::state::SessionRecord, existing: bool| -> Result<pb::CreateSessionResponse, Status> {
            // Claimed from this pool, or started cold for it: the same request.
            if s.pool != req.pool && s.message != cold_message(&req.pool) {
                return Err(Status::already_exists(format!(
                    "request_id {:?} was already used to create session {}, not from pool {:?}; use a new request_id",
                    req.request_id, s.id, req.pool
                )));
            }
            Ok(pb::CreateSessionResponse {
                session: Some(core.to_proto(s, true)),
                existing,
                claimed: s.claimed_at_ms != 0,
            })
        };
        if let Some(s) = &seen {
            return answer(s, true);
        }
        let pool = pool.ok_or_else(|| not_found(&req.pool))?;
        let cmd = Command::ClaimSession {
            tenant: caller.tenant.clone(),
            pool: req.pool.clone(),
            request_id: req.request_id.clone(),
            now_ms: crate::now_ms(),
            key_id: caller.key_id().map(str::to_string),
        };
        let resp = core.propose(cmd).await?;
        // The pool is one short of its buffer now: refill at once.
        core.wake.notify_one();
        match resp {
            CommandResponse::Session(s) => {
                tracing::info!(session = %s.id, pool = %req.pool, node = ?s.node_id, "claimed from the pool");
                answer(&s, false)
            }
            CommandResponse::Existing(s) => answer(&s, true),
            CommandResponse::PoolEmpty => {
                let mut spec = pool.spec.clone();
                spec.labels.remove(POOL_LABEL);
                let message = cold_message(&req.pool);
                tracing::info!(pool = %req.pool, "the pool is empty; starting cold");
                self.create_spec(caller, &req.request_id, spec, message).await
            }
            other => Err(response_status(other)),
        }
    }
}
