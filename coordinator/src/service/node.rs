//! NodeService: node listing and cordoning for operators.

use std::sync::Arc;

use sandfleet_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

use sandfleet_common::auth::Role;
use sandfleet_common::{ids, ValidationError};

use crate::core::{Core, Heard};
use crate::service::auth::{audited, Authenticator};
use crate::state::{ClusterState, Command, CommandResponse, DrainRecord, HoldBy, NodeRecord};

/// The NodeService implementation. Admin only.
pub struct NodeApi {
    core: Arc<Core>,
    auth: Authenticator,
}

impl NodeApi {
    pub fn new(core: Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }

    async fn cordon(&self, req: pb::CordonNodeRequest) -> Result<Response<pb::CordonNodeResponse>, Status> {
        ids::validate_node_id(&req.node_id)?;
        let cmd = Command::CordonNode {
            node_id: req.node_id.clone(),
            cordoned: req.cordoned,
            by: HoldBy::Operator,
            reason: String::new(),
            now_ms: crate::now_ms(),
        };
        match self.core.propose(cmd).await? {
            CommandResponse::Ok => {}
            CommandResponse::NotFound(id) => return Err(Status::not_found(format!("node {id} is not registered"))),
            CommandResponse::Rejected(why) => return Err(Status::failed_precondition(why)),
            other => return Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
        self.core.wake.notify_one();
        tracing::info!(node = %req.node_id, cordoned = req.cordoned, "node cordon changed");
        let seen = self.core.heartbeats.lock().clone();
        let node = self.core.state.read(|st| st.nodes.get(&req.node_id).map(|n| node_to_proto(st, n, &seen)));
        Ok(Response::new(pb::CordonNodeResponse { node }))
    }

    async fn drain(&self, req: pb::DrainNodeRequest) -> Result<Response<pb::DrainNodeResponse>, Status> {
        ids::validate_node_id(&req.node_id)?;
        let drain = drain_record(crate::now_ms(), req.deadline_seconds, req.max_parallel)?;
        let (deadline_seconds, max_parallel) = ((drain.deadline_ms - drain.started_at_ms) / 1000, drain.max_parallel);
        let cmd =
            Command::DrainNode { node_id: req.node_id.clone(), drain, by: HoldBy::Operator, reason: String::new() };
        match self.core.propose(cmd).await? {
            CommandResponse::Ok => {}
            CommandResponse::NotFound(id) => return Err(Status::not_found(format!("node {id} is not registered"))),
            CommandResponse::Rejected(why) => return Err(Status::failed_precondition(why)),
            other => return Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
        self.core.wake.notify_one();
        tracing::info!(node = %req.node_id, deadline_seconds, max_parallel, "node drain started");
        let seen = self.core.heartbeats.lock().clone();
        let node = self.core.state.read(|st| st.nodes.get(&req.node_id).map(|n| node_to_proto(st, n, &seen)));
        Ok(Response::new(pb::DrainNodeResponse { node }))
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    #[tracing::instrument(skip_all)]
    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.auth.admin(&req)?;
        let seen = self.core.heartbeats.lock().clone();
        let mut nodes: Vec<pb::Node> =
            self.core.state.read(|st| st.nodes.values().map(|n| node_to_proto(st, n, &seen)).collect());
        let usage = self.core.node_usage.lock();
        for n in &mut nodes {
            n.usage = usage.get(&n.id).copied();
        }
        drop(usage);
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id, cordoned = req.get_ref().cordoned))]
    async fn cordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::CordonNodeResponse>, Status> {
        let resource = format!("node/{}", req.get_ref().node_id);
        audited(
            self.auth.caller(&req),
            req,
            "CordonNode",
            Role::Admin,
            |_| resource,
            |_, req| self.cordon(req.into_inner()),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id))]
    async fn drain_node(&self, req: Request<pb::DrainNodeRequest>) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let resource = format!("node/{}", req.get_ref().node_id);
        audited(
            self.auth.caller(&req),
            req,
            "DrainNode",
            Role::Admin,
            |_| resource,
            |_, req| self.drain(req.into_inner()),
        )
        .await
    }
}

/// Drain deadline when the request gives none.
const DEFAULT_DRAIN_DEADLINE_SECONDS: u64 = 3600;
/// Longest drain deadline.
const MAX_DRAIN_DEADLINE_SECONDS: u64 = 86_400;
/// Most sessions of one node moving at a time.
const MAX_DRAIN_PARALLEL: u32 = 1000;

/// A drain starting at `now_ms`, from a request's parameters (0: the
/// defaults, one hour and one session at a time): the one definition of a
/// drain's parameters, for an operator's drain and the agent's alike.
pub(crate) fn drain_record(now_ms: i64, deadline_seconds: u64, max_parallel: u32) -> Result<DrainRecord, Status> {
    let deadline_seconds = match deadline_seconds {
        0 => DEFAULT_DRAIN_DEADLINE_SECONDS,
        n if n > MAX_DRAIN_DEADLINE_SECONDS => {
            return Err(
                ValidationError::over("deadline_seconds", format!("{MAX_DRAIN_DEADLINE_SECONDS} seconds"), n).into()
            )
        }
        n => n,
    };
    let max_parallel = match max_parallel {
        0 => 1,
        n if n > MAX_DRAIN_PARALLEL => return Err(ValidationError::over("max_parallel", MAX_DRAIN_PARALLEL, n).into()),
        n => n,
    };
    Ok(DrainRecord { started_at_ms: now_ms, deadline_ms: now_ms + deadline_seconds as i64 * 1000, max_parallel })
}

/// A node as the API shows it.
pub(crate) fn node_to_proto(
    st: &ClusterState,
    n: &NodeRecord,
    seen: &std::collections::HashMap<String, Heard>,
) -> pb::Node {
    let used = st.allocated_on(&n.id);
    pb::Node {
        id: n.id.clone(),
        address: n.address.clone(),
        capacity: Some(pb::NodeCapacity {
            cpu_millis: n.capacity.cpu_millis as u32,
            memory_bytes: n.capacity.memory_bytes,
            session_slots: n.capacity.slots as u32,
        }),
        allocated: Some(pb::NodeCapacity {
            cpu_millis: used.cpu_millis as u32,
            memory_bytes: used.memory_bytes,
            session_slots: used.slots as u32,
        }),
        labels: n.labels.clone().into_iter().collect(),
        state: n.phase.as_str().to_string(),
        last_heartbeat_ms: seen.get(&n.id).map_or(0, |h| h.at_ms),
        session_count: st.node_sessions.get(&n.id).map(|s| s.len() as u32).unwrap_or(0),
        runtimes: n.runtimes.iter().map(|r| r.to_string()).collect(),
        images: n.images.iter().cloned().collect(),
        drain: n.drain.map(|d| pb::DrainStatus {
            started_at_ms: d.started_at_ms,
            deadline_ms: d.deadline_ms,
            max_parallel: d.max_parallel,
            remaining: st.node_sessions.get(&n.id).map_or(0, |s| s.len() as u32),
            moving: st.moving.get(&n.id).map_or(0, |s| s.len() as u32),
        }),
        holds: [HoldBy::Operator, HoldBy::Agent]
            .into_iter()
            .filter_map(|by| {
                n.hold(by).map(|h| pb::NodeHold {
                    by: by.as_str().to_string(),
                    drain: h.drain.is_some(),
                    reason: h.reason.clone(),
                    since_ms: h.since_ms,
                })
            })
            .collect(),
        // ListNodes adds the node's last report from this member's memory.
        usage: None,
    }
}
