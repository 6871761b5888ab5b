//! ClusterService: membership changes and cluster status. Membership changes
//! run on the leader; a follower forwards them there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sandfleet_proto::v1::{
    self as pb, cluster_service_client::ClusterServiceClient, cluster_service_server::ClusterService,
    raft_service_client::RaftServiceClient,
};
use tonic::{Request, Response, Status};

use super::raft::member_status;
use crate::core::Core;
use crate::raft::{network, Member};
use crate::service::auth::{audited, Authenticator};
use crate::state::{Command, CommandResponse};
use sandfleet_common::auth::Role;

/// Deadline of a call to another member's MemberStatus.
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a membership change forwarded to the leader.
const MEMBERSHIP_FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long InitCluster waits for the new cluster's first leader.
pub const INIT_LEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// A member address must be `host:port`.
fn validate_address(addr: &str) -> Result<(), Status> {
    let bad = |why: &str| Status::invalid_argument(format!("invalid member address {addr:?}: {why}; use host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err(bad("bad host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("bad port")),
    }
}

/// Checks a new cluster's initial voters (id -> `host:port`) for the member
/// `own_id`, which must be one of them: ids start at 1, addresses are
/// `host:port`, no address is given twice. The one rule of `InitCluster` and
/// of `--initial-members`.
pub fn check_members(own_id: u64, members: &BTreeMap<u64, String>) -> Result<(), Status> {
    if members.is_empty() {
        return Err(Status::invalid_argument("members is empty: list every initial voter as id -> host:port"));
    }
    for (id, addr) in members {
        if *id == 0 {
            return Err(Status::invalid_argument("invalid id: member ids start at 1"));
        }
        validate_address(addr)?;
    }
    if !members.contains_key(&own_id) {
        return Err(Status::invalid_argument(format!("members must include this coordinator (id {own_id})")));
    }
    let mut seen = BTreeSet::new();
    if let Some((id, addr)) = members.iter().find(|(_, a)| !seen.insert(a.as_str())) {
        return Err(Status::invalid_argument(format!("address {addr} is given twice (again for member {id})")));
    }
    Ok(())
}

/// Initializes a new cluster of `members` from this (never initialized)
/// member and waits for its first leader: what `InitCluster` and the
/// automatic init of `--initial-members` ([`crate::formation`]) both run.
///
/// FAILED_PRECONDITION when this member already belongs to a cluster;
/// DEADLINE_EXCEEDED when the cluster was initialized but elected no leader
/// within [`INIT_LEADER_TIMEOUT`].
pub async fn initialize(core: &Core, members: &BTreeMap<u64, String>) -> Result<(), Status> {
    check_members(core.id, members)?;
    if core.raft.is_initialized().await.map_err(|e| Status::unavailable(e.to_string()))? {
        return Err(Status::failed_precondition("this coordinator already belongs to an initialized cluster"));
    }
    let nodes: BTreeMap<u64, Member> = members.iter().map(|(id, addr)| (*id, Member { addr: addr.clone() })).collect();
    core.raft.initialize(nodes).await.map_err(|e| Status::failed_precondition(format!("cannot initialize: {e}")))?;
    core.raft.wait(Some(INIT_LEADER_TIMEOUT)).metrics(|m| m.current_leader.is_some(), "leader elected").await.map_err(
        |_| {
            Status::deadline_exceeded(
                "initialized, but no leader was elected in time; check that a majority of members runs",
            )
        },
    )?;
    tracing::info!(?members, "cluster initialized");
    Ok(())
}

/// The ClusterService implementation. Admin only.
pub struct ClusterApi {
    core: Arc<Core>,
    auth: Authenticator,
}

impl ClusterApi {
    pub fn new(core: Arc<Core>, auth: Authenticator) -> Self {
        Self { core, auth }
    }

    async fn init(&self, req: pb::InitClusterRequest) -> Result<Response<pb::InitClusterResponse>, Status> {
        let members: BTreeMap<u64, String> = req.members.into_iter().collect();
        initialize(&self.core, &members).await?;
        let admin_key = if req.create_admin_key { first_admin_key(&self.core).await? } else { String::new() };
        Ok(Response::new(pb::InitClusterResponse { status: Some(self.status().await), admin_key }))
    }

    async fn add(&self, req: Request<pb::AddMemberRequest>) -> Result<Response<pb::AddMemberResponse>, Status> {
        let (req, authz) = with_authz(req);
        if let Some(mut leader) = self.leader_client()? {
            return leader.add_member(forwarded(req, authz)).await.map_err(forward_error);
        }
        if req.id == 0 {
            return Err(Status::invalid_argument("invalid id: member ids start at 1"));
        }
        validate_address(&req.address)?;
        let membership = self.core.raft.metrics().borrow().membership_config.membership().clone();
        if membership.get_node(&req.id).is_some() {
            return Err(Status::already_exists(format!("member {} is already in the cluster", req.id)));
        }
        if membership.nodes().any(|(_, n)| n.addr == req.address) {
            return Err(Status::already_exists(format!("address {} already belongs to a member", req.address)));
        }
        // The new member must answer, and be who it says it is, before anything changes.
        let status = remote_status(&self.core, &req.address).await.map_err(|s| {
            Status::failed_precondition(format!("member {} at {} is unreachable: {}", req.id, req.address, s.message()))
        })?;
        if status.id != req.id {
            return Err(Status::failed_precondition(format!(
                "the coordinator at {} has id {}, not {}",
                req.address, status.id, req.id
            )));
        }
        self.core
            .raft
            .add_learner(req.id, Member { addr: req.address.clone() }, true)
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot add learner: {e}")))?;
        let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
        voters.insert(req.id);
        self.core
            .raft
            .change_membership(voters, false)
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot promote member: {e}")))?;
        tracing::info!(id = req.id, addr = %req.address, "member added");
        Ok(Response::new(pb::AddMemberResponse { status: Some(self.status().await) }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let (req, authz) = with_authz(req);
        if let Some(mut leader) = self.leader_client()? {
            return leader.remove_member(forwarded(req, authz)).await.map_err(forward_error);
        }
        let id = req.id;
        let membership = self.core.raft.metrics().borrow().membership_config.membership().clone();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(format!("member {id} is not in the cluster")));
        }
        let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
        voters.remove(&id);
        if voters.is_empty() {
            return Err(Status::failed_precondition(format!(
                "member {id} is the last voter; add another member first"
            )));
        }
        self.core
            .raft
            .change_membership(voters, false)
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot remove member: {e}")))?;
        tracing::info!(id, "member removed");
        Ok(Response::new(pb::RemoveMemberResponse { status: Some(self.status().await) }))
    }

    async fn set_paused(
        &self,
        req: pb::SetSchedulerPausedRequest,
    ) -> Result<Response<pb::SetSchedulerPausedResponse>, Status> {
        let paused = req.paused;
        match self.core.propose(Command::SetSchedulerPaused { paused }).await? {
            CommandResponse::Ok => {}
            other => return Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
        self.core.wake.notify_one();
        let unplaced = self.core.state.read(|st| st.unplaced.len() as u64);
        tracing::info!(paused, unplaced, "scheduler {}", if paused { "paused" } else { "resumed" });
        Ok(Response::new(pb::SetSchedulerPausedResponse { paused, unplaced_sessions: unplaced }))
    }

    async fn status(&self) -> pb::ClusterStatusResponse {
        let m = self.core.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let mut members = Vec::new();
        for (id, node) in membership.nodes() {
            let status = if *id == self.core.id {
                member_status(&self.core)
            } else {
                match remote_status(&self.core, &node.addr).await {
                    Ok(s) => s,
                    Err(_) => pb::ClusterMember {
                        id: *id,
                        address: node.addr.clone(),
                        role: "unreachable".into(),
                        voter: voters.contains(id),
                        ..Default::default()
                    },
                }
            };
            members.push(pb::ClusterMember { voter: voters.contains(id), ..status });
        }
        let (scheduler_paused, unplaced, sessions_created, running_sessions) = self
            .core
            .state
            .read(|st| (st.scheduler_paused, st.unplaced.len() as u64, st.sessions_created, st.running_sessions()));
        pb::ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            members,
            scheduler_paused,
            unplaced_sessions: unplaced,
            sessions_created,
            running_sessions,
        }
    }

    fn leader_client(&self) -> Result<Option<ClusterServiceClient<tonic::transport::Channel>>, Status> {
        if self.core.is_leader() {
            return Ok(None);
        }
        let addr = self
            .core
            .leader_addr()
            .ok_or_else(|| Status::unavailable("no coordinator leader is elected right now; retry"))?;
        let ch = network::channel(&addr, self.core.peer_tls.as_ref()).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some(ClusterServiceClient::new(ch)))
    }
}

/// The caller's `authorization` header, passed on when a call is forwarded.
type Authz = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;

/// A request's message and its `authorization` header.
fn with_authz<T>(req: Request<T>) -> (T, Authz) {
    let authz = req.metadata().get("authorization").cloned();
    (req.into_inner(), authz)
}

/// A membership change forwarded to the leader, with a deadline and the
/// caller's credential (the leader authenticates the caller again).
fn forwarded<T>(msg: T, authz: Authz) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(MEMBERSHIP_FORWARD_TIMEOUT);
    if let Some(a) = authz {
        req.metadata_mut().insert("authorization", a);
    }
    req
}

/// Creates the first admin key (tenant `default`) of a new cluster, retrying
/// while its first leader settles.
pub(crate) async fn first_admin_key(core: &Core) -> Result<String, Status> {
    let deadline = tokio::time::Instant::now() + INIT_LEADER_TIMEOUT;
    loop {
        match super::tenant::create_key(core, sandfleet_common::auth::DEFAULT_TENANT, Role::Admin, 0).await {
            Ok((record, text)) => {
                tracing::info!(key_id = %record.id, "created the first admin API key");
                return Ok(text);
            }
            Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(Status::new(
                    e.code(),
                    format!("the cluster is initialized, but the admin key could not be created: {}", e.message()),
                ))
            }
        }
    }
}

/// The leader's own answers pass through; a leader that cannot be reached is UNAVAILABLE.
fn forward_error(s: Status) -> Status {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            Status::unavailable(format!("the leader could not be reached: {}; retry", s.message()))
        }
        _ => s,
    }
}

/// What the member at `addr` says about itself (RaftService.MemberStatus),
/// within [`PEER_TIMEOUT`].
pub(crate) async fn remote_status(core: &Core, addr: &str) -> Result<pb::ClusterMember, Status> {
    let ch = network::channel(addr, core.peer_tls.as_ref())
        .map_err(|e| Status::invalid_argument(format!("invalid address {addr:?}: {e}")))?;
    let mut req = Request::new(pb::ClusterStatusRequest {});
    req.set_timeout(PEER_TIMEOUT);
    Ok(RaftServiceClient::new(ch).member_status(req).await?.into_inner())
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    #[tracing::instrument(skip_all)]
    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.auth.admin(&req)?;
        Ok(Response::new(self.status().await))
    }

    #[tracing::instrument(skip_all)]
    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        let resource = |_: Option<&_>| "cluster".to_string();
        audited(self.auth.caller(&req), req, "InitCluster", Role::Admin, resource, |_, req| self.init(req.into_inner()))
            .await
    }

    #[tracing::instrument(skip_all, fields(id = req.get_ref().id, addr = %req.get_ref().address))]
    async fn add_member(&self, req: Request<pb::AddMemberRequest>) -> Result<Response<pb::AddMemberResponse>, Status> {
        let resource = format!("member/{}", req.get_ref().id);
        audited(self.auth.caller(&req), req, "AddMember", Role::Admin, |_| resource, |_, req| self.add(req)).await
    }

    #[tracing::instrument(skip_all, fields(id = req.get_ref().id))]
    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let resource = format!("member/{}", req.get_ref().id);
        audited(self.auth.caller(&req), req, "RemoveMember", Role::Admin, |_| resource, |_, req| self.remove(req)).await
    }

    #[tracing::instrument(skip_all, fields(paused = req.get_ref().paused))]
    async fn set_scheduler_paused(
        &self,
        req: Request<pb::SetSchedulerPausedRequest>,
    ) -> Result<Response<pb::SetSchedulerPausedResponse>, Status> {
        let resource = format!("scheduler/paused={}", req.get_ref().paused);
        audited(
            self.auth.caller(&req),
            req,
            "SetSchedulerPaused",
            Role::Admin,
            |_| resource,
            |_, req| self.set_paused(req.into_inner()),
        )
        .await
    }
}
