//! Batches of sessions (`SessionService.CreateSessions`, `GetBatch`,
//! `ListBatches`, `DeleteBatch`): OpenSandbox's BatchSandbox as one Raft entry.
//!
//! A batch is checked whole before anything is proposed (the count, the
//! patches, each replica's patched spec with the one spec validator), placed
//! whole against one scheduler view when this member leads, and committed as
//! one `CreateBatch` entry whose apply re-checks the API key, the tenant's
//! quota for every replica at once, and each node's capacity. So a batch is
//! created whole or not at all, and a retry with its request id answers the
//! first batch.

use sandfleet_common::auth::Caller;
use sandfleet_common::ids;
use sandfleet_common::spec::{self as spec_rules};
use sandfleet_proto::v1 as pb;
use tonic::Status;

use crate::core::Core;
use crate::scheduler::Unplaceable;
use crate::service::response_status;
use crate::service::session::{cluster_bounds, list_scope, scope, validate_spec, SessionApi};
use crate::state::{BatchRecord, ClusterState, Command, CommandResponse, NewBatch, PendingReason, SpecRecord};

/// What a missing batch, and another tenant's, answers.
fn not_found(id: &str) -> Status {
    Status::not_found(format!("batch {id} not found"))
}

/// A batch for the wire, its replicas counted; `with_ids` adds the session ids.
pub fn batch_to_proto(st: &ClusterState, b: &BatchRecord, with_ids: bool) -> pb::Batch {
    let c = st.batch_counts(b);
    pb::Batch {
        id: b.id.clone(),
        request_id: b.request_id.clone(),
        tenant: b.tenant.clone(),
        created_at_ms: b.created_at_ms,
        desired: b.session_ids.len() as u32,
        placed: c.placed,
        running: c.running,
        failed: c.failed,
        pending: c.pending,
        terminated: c.terminated,
        deleted_at_ms: b.deleted_at_ms,
        session_ids: if with_ids { b.session_ids.clone() } else { Vec::new() },
        pool: b.pool.clone(),
        claimed: b.claimed,
    }
}

/// The spec of a batch from a pool: the pool's (without its label), when the
/// request gives no spec and its patches set labels only.
fn pool_spec(core: &Core, caller: &Caller, req: &pb::CreateSessionsRequest) -> Result<SpecRecord, Status> {
    ids::validate_dns_label("pool", &req.pool)?;
    if req.spec.as_ref().is_some_and(|s| *s != pb::SessionSpec::default()) {
        return Err(Status::invalid_argument(
            "invalid spec: give a spec or a pool, not both (a pool's sandboxes run the pool's spec)",
        ));
    }
    if let Some(i) = req.patches.iter().position(|p| !p.env.is_empty()) {
        return Err(Status::invalid_argument(format!(
            "patches[{i}]: invalid env: a pool's sandboxes run with the pool's env; patches of a batch from a pool \
             may set labels only"
        )));
    }
    let key = crate::state::pool_key(&caller.tenant, &req.pool);
    let mut spec = core
        .state
        .read(|st| st.pools.get(&key).map(|p| p.spec.clone()))
        .ok_or_else(|| Status::not_found(format!("pool {:?} not found", req.pool)))?;
    spec.labels.remove(crate::service::pool::POOL_LABEL);
    Ok(spec)
}

/// The answer to a batch create whose request id names an existing batch:
/// that batch when the request is the same, ALREADY_EXISTS naming what differs.
fn existing_answer(
    existing: &BatchRecord,
    count: u32,
    spec: &SpecRecord,
    digest: &str,
    pool: &str,
) -> Result<(), Status> {
    let mut differ: Vec<&str> = Vec::new();
    if existing.pool != pool {
        differ.push("pool");
    }
    if existing.session_ids.len() != count as usize {
        differ.push("count");
    }
    differ.extend(existing.spec.differing_fields(spec).into_iter().map(|f| match f {
        "env" => "spec.env",
        "labels" => "spec.labels",
        other => other,
    }));
    if existing.patches_sha256 != digest {
        differ.push("patches");
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Status::already_exists(format!(
            "request_id {:?} was already used to create batch {} with a different request (differing: {}); \
             retry with the same request, or use a new request_id for a new batch",
            existing.request_id,
            existing.id,
            differ.join(", ")
        )))
    }
}

impl SessionApi {
    pub(crate) async fn batch_create(
        &self,
        caller: &Caller,
        req: pb::CreateSessionsRequest,
    ) -> Result<pb::CreateSessionsResponse, Status> {
        let core: &Core = &self.core;
        ids::validate_request_id(&req.request_id)?;
        let spec = if req.pool.is_empty() {
            validate_spec(core, req.spec.clone()).await?
        } else {
            pool_spec(core, caller, &req)?
        };
        let bounds = cluster_bounds(&core.tunables);
        let patches = spec_rules::check_batch(&spec, req.count, &req.patches, &bounds)?;
        // A cluster template's rules hold for every replica's patch too.
        if let Some(t) = core.state.read(|st| st.templates.get(&spec.template_name).cloned()) {
            for (i, p) in patches.iter().enumerate() {
                t.check_patch(i, p)?;
            }
        }
        let digest = BatchRecord::digest(&patches);
        let rkey = crate::state::request_key(&caller.tenant, &req.request_id);

        // A request id this member has already seen answers at once.
        let seen = core.state.read(|st| {
            st.batch_requests
                .get(&rkey)
                .and_then(|id| st.batches.get(id))
                .map(|b| (b.clone(), batch_to_proto(st, b, true)))
        });
        if let Some((existing, batch)) = seen {
            existing_answer(&existing, req.count, &spec, &digest, &req.pool)?;
            return Ok(pb::CreateSessionsResponse { batch: Some(batch), existing: true });
        }

        let count = req.count as usize;
        // The replicas a pool cannot give start cold: placed whole against one
        // view when this member leads; the nodes stay reserved until the entry
        // is applied.
        let idle = if req.pool.is_empty() {
            0
        } else {
            let key = crate::state::pool_key(&caller.tenant, &req.pool);
            core.state.read(|st| st.pool_ready.get(&key).map_or(0, |r| r.len()))
        };
        let cold = count.saturating_sub(idle);
        let (placed, _reservation, paused) =
            tracing::info_span!("placement", replicas = cold).in_scope(|| core.place_and_reserve_many(&spec, cold));
        let mut waiting = PendingReason::AwaitingLeader;
        let mut nodes = Vec::with_capacity(count);
        for p in placed {
            match p {
                Err(Unplaceable::Never(why)) => return Err(Status::resource_exhausted(why.to_string())),
                _ if paused => {
                    waiting = PendingReason::Paused;
                    nodes.push(None);
                }
                Ok(node) if core.is_leader() => nodes.push(Some(node)),
                Ok(_) => nodes.push(None),
                Err(Unplaceable::Wait(why)) => {
                    waiting = why;
                    nodes.push(None);
                }
            }
        }
        let batch = BatchRecord {
            id: ids::new_session_id(),
            request_id: req.request_id.clone(),
            tenant: caller.tenant.clone(),
            created_at_ms: crate::now_ms(),
            spec: spec.clone(),
            patches_sha256: digest.clone(),
            session_ids: (0..count).map(|_| ids::new_session_id()).collect(),
            deleted_at_ms: 0,
            pool: req.pool.clone(),
            claimed: 0,
        };
        let new = NewBatch {
            batch,
            patches,
            nodes,
            waiting,
            key_id: caller.key_id().map(str::to_string),
            traceparent: sandfleet_common::trace_context::current_traceparent(),
        };
        let resp = core.propose(Command::CreateBatch(new)).await?;
        core.wake.notify_one();
        match resp {
            CommandResponse::SessionBatch(b) => {
                let batch = core.state.read(|st| batch_to_proto(st, &b, true));
                if batch.placed > 0 {
                    crate::metrics::metrics().placements.add(u64::from(batch.placed), &[]);
                }
                tracing::info!(batch = %b.id, replicas = count, placed = batch.placed, tenant = %b.tenant, "batch created");
                Ok(pb::CreateSessionsResponse { batch: Some(batch), existing: false })
            }
            CommandResponse::ExistingBatch(b) => {
                // Another create with this request id committed first.
                existing_answer(&b, req.count, &spec, &digest, &req.pool)?;
                let batch = core.state.read(|st| batch_to_proto(st, &b, true));
                Ok(pb::CreateSessionsResponse { batch: Some(batch), existing: true })
            }
            other => Err(response_status(other)),
        }
    }

    pub(crate) async fn batch_get(
        &self,
        caller: &Caller,
        req: pb::GetBatchRequest,
    ) -> Result<pb::GetBatchResponse, Status> {
        ids::validate_session_id(&req.id).map_err(|_| {
            Status::invalid_argument(format!(
                "invalid id: {:?} is not a batch id (a lowercase, hyphenated UUID)",
                req.id.chars().take(80).collect::<String>()
            ))
        })?;
        self.core.read_barrier(req.consistency).await?;
        let batch = self.core.state.read(|st| {
            st.batches.get(&req.id).filter(|b| caller.may_access_tenant(&b.tenant)).map(|b| batch_to_proto(st, b, true))
        });
        Ok(pb::GetBatchResponse { batch: Some(batch.ok_or_else(|| not_found(&req.id))?) })
    }

    pub(crate) async fn batch_list(
        &self,
        caller: &Caller,
        req: pb::ListBatchesRequest,
    ) -> Result<pb::ListBatchesResponse, Status> {
        let (tenant, empty) = list_scope(caller, &req.tenant)?;
        self.core.read_barrier(req.consistency).await?;
        let mut batches: Vec<pb::Batch> = self.core.state.read(|st| {
            st.batches
                .values()
                .filter(|_| !empty)
                .filter(|b| tenant.as_ref().is_none_or(|t| *t == b.tenant))
                .map(|b| batch_to_proto(st, b, false))
                .collect()
        });
        batches.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(pb::ListBatchesResponse { batches })
    }

    pub(crate) async fn batch_delete(
        &self,
        caller: &Caller,
        req: pb::DeleteBatchRequest,
    ) -> Result<pb::DeleteBatchResponse, Status> {
        ids::validate_session_id(&req.id).map_err(|_| {
            Status::invalid_argument(format!(
                "invalid id: {:?} is not a batch id (a lowercase, hyphenated UUID)",
                req.id.chars().take(80).collect::<String>()
            ))
        })?;
        let resp = self
            .core
            .propose(Command::DeleteBatch { id: req.id.clone(), now_ms: crate::now_ms(), tenant: scope(caller) })
            .await?;
        self.core.wake.notify_one();
        match resp {
            CommandResponse::SessionBatch(b) => {
                tracing::info!(batch = %b.id, replicas = b.session_ids.len(), "batch deleted");
                Ok(pb::DeleteBatchResponse { batch: Some(self.core.state.read(|st| batch_to_proto(st, &b, true))) })
            }
            other => Err(response_status(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandfleet_common::spec::ReplicaPatch;

    /// The patches of a request as stored.
    fn stored(patches: &[pb::ReplicaPatch]) -> Vec<ReplicaPatch> {
        patches.iter().map(ReplicaPatch::from_proto).collect()
    }

    #[test]
    fn the_digest_tells_patches_apart_and_ignores_map_order() {
        let p = |k: &str, v: &str| pb::ReplicaPatch {
            env: [(k.to_string(), v.to_string())].into(),
            labels: Default::default(),
        };
        let a = BatchRecord::digest(&stored(&[p("A", "1"), p("A", "2")]));
        assert_eq!(a, BatchRecord::digest(&stored(&[p("A", "1"), p("A", "2")])));
        assert_ne!(a, BatchRecord::digest(&stored(&[p("A", "2"), p("A", "1")])));
        assert_ne!(a, BatchRecord::digest(&stored(&[p("A", "1")])));
        let two = pb::ReplicaPatch {
            env: [("B".to_string(), "2".to_string()), ("A".to_string(), "1".to_string())].into(),
            labels: Default::default(),
        };
        let two_again = pb::ReplicaPatch {
            env: [("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())].into(),
            labels: Default::default(),
        };
        assert_eq!(BatchRecord::digest(&stored(&[two])), BatchRecord::digest(&stored(&[two_again])));
    }
}
