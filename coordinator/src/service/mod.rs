//! The coordinator's gRPC services, one file each.
//!
//! - [`session`]: the public SessionService (create, get, list, delete, renew, watch).
//! - [`batch`]: its batches (CreateSessions, GetBatch, ListBatches, DeleteBatch).
//! - [`pool`]: PoolService (warm pools) and the claim of `CreateSession{pool}`.
//! - [`template`]: TemplateService (cluster templates).
//! - [`agent`]: AgentService for node agents (register, heartbeat, assignments).
//! - [`node`]: NodeService (node listing for operators).
//! - [`cluster`]: ClusterService (membership and status).
//! - [`raft`]: RaftService (Raft transport, write forwarding, read-index).
//! - [`tenant`]: TenantService and ApiKeyService (tenants, quotas, API keys).
//! - [`auth`]: who calls the public services (API key, client certificate,
//!   anonymous on loopback), role checks, and the audit event.
//!
//! The one mapping of the core's [`CoreError`] and of refused commands to
//! gRPC statuses lives here.

pub mod agent;
pub mod auth;
pub mod batch;
pub mod cluster;
pub mod node;
pub mod pool;
pub mod raft;
pub mod session;
pub mod template;
pub mod tenant;

use sandfleet_common::auth::{Identity, IdentityKind};
use tonic::{Request, Status};

use crate::core::Core;
use crate::error::CoreError;
use crate::state::CommandResponse;

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Self {
        let message = e.to_string();
        match e {
            CoreError::NoLeader
            | CoreError::NotLeader
            | CoreError::WriteTimeout(_)
            | CoreError::ReadTimeout(_)
            | CoreError::Unavailable(_)
            | CoreError::Lagging(_)
            | CoreError::RaftStopped(_) => Status::unavailable(message),
            CoreError::Membership(_) => Status::failed_precondition(message),
            CoreError::Internal(_) => Status::internal(message),
        }
    }
}

/// The certificate identity of a caller of a member-only (RaftService) or
/// agent-only (AgentService) call, which must be one of `kinds`. On an
/// `--insecure` loopback cluster there are no certificates: `Ok(None)`.
/// No certificate is UNAUTHENTICATED; a certificate of another kind (a client
/// certificate used as an agent) is PERMISSION_DENIED.
pub fn require_peer<T>(core: &Core, req: &Request<T>, kinds: &[IdentityKind]) -> Result<Option<Identity>, Status> {
    if !core.secure() {
        return Ok(None);
    }
    let wanted = || kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" or ");
    match sandfleet_common::tls::peer_identity(req) {
        None => Err(Status::unauthenticated(format!("this call needs a {} certificate from the cluster CA", wanted()))),
        Some(id) if kinds.contains(&id.kind) => Ok(Some(id.clone())),
        Some(id) => {
            Err(Status::permission_denied(format!("{id} may not make this call; only {} identities may", wanted())))
        }
    }
}

/// Binds an agent call to the node id in the caller's certificate: an agent
/// whose certificate says `node-a` acts only as `node-a`. A coordinator
/// identity is a member forwarding a heartbeat it has already checked.
pub fn require_agent<T>(core: &Core, req: &Request<T>, node_id: &str) -> Result<(), Status> {
    match require_peer(core, req, &[IdentityKind::Agent, IdentityKind::Coordinator])? {
        Some(id) if id.kind == IdentityKind::Agent && id.name != node_id => Err(Status::permission_denied(format!(
            "the certificate of {id} may act only as node {:?}, not {node_id:?}",
            id.name
        ))),
        _ => Ok(()),
    }
}

/// Maps an apply result that is not the expected success to a status.
pub fn response_status(r: CommandResponse) -> Status {
    match r {
        CommandResponse::NotFound(id) => Status::not_found(format!("session {id} not found")),
        CommandResponse::Rejected(why) => Status::failed_precondition(why),
        CommandResponse::Missing(why) => Status::not_found(why),
        CommandResponse::AlreadyExists(why) => Status::already_exists(why),
        CommandResponse::QuotaExceeded(why) => Status::resource_exhausted(why),
        CommandResponse::KeyRefused => Status::unauthenticated(auth::KEY_REFUSED),
        other => Status::internal(format!("unexpected apply result {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_keep_their_status_codes_and_text() {
        let cases = [
            (CoreError::NoLeader, tonic::Code::Unavailable),
            (CoreError::NotLeader, tonic::Code::Unavailable),
            (CoreError::WriteTimeout(std::time::Duration::from_secs(5)), tonic::Code::Unavailable),
            (CoreError::ReadTimeout(std::time::Duration::from_secs(5)), tonic::Code::Unavailable),
            (CoreError::Unavailable("leadership moved while forwarding; retry".into()), tonic::Code::Unavailable),
            (CoreError::Lagging("timeout".into()), tonic::Code::Unavailable),
            (CoreError::RaftStopped("panicked".into()), tonic::Code::Unavailable),
            (CoreError::Membership("a change is in progress".into()), tonic::Code::FailedPrecondition),
            (CoreError::Internal("bad leader address x: y".into()), tonic::Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let status = Status::from(e);
            assert_eq!((status.code(), status.message()), (code, text.as_str()));
        }
        let s = Status::from(CoreError::WriteTimeout(std::time::Duration::from_secs(5)));
        assert!(s.message().starts_with("the write did not commit within 5s"), "{}", s.message());
        assert_eq!(
            Status::from(CoreError::NoLeader).message(),
            "no coordinator leader is elected right now; retry shortly"
        );
    }
}
