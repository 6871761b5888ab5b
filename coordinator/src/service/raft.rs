//! RaftService: the server side of the Raft transport, plus write forwarding
//! and read-index for followers, and this member's own status.

use std::sync::Arc;

use std::io::Cursor;

use sandfleet_common::auth::IdentityKind;
use sandfleet_proto::v1::{self as pb, raft_service_server::RaftService, RaftPayload, SnapshotChunk};
use serde::Serialize;
use tonic::{Request, Response, Status, Streaming};

use crate::core::Core;
use crate::raft::codec::{self, Format};
use crate::raft::network::{SnapshotHeader, MALFORMED_PAYLOAD};
use crate::service::require_peer;
use crate::state::Command;

/// The largest snapshot a member accepts.
const MAX_SNAPSHOT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The RaftService implementation.
pub struct RaftApi {
    core: Arc<Core>,
}

impl RaftApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// Decodes a payload in any encoding; returns its format too, so the answer
/// goes back in kind (a member from before the binary codec reads only JSON).
fn decode<T: for<'de> serde::Deserialize<'de>>(p: &RaftPayload) -> Result<(T, Format), Status> {
    let v = codec::decode(&p.data).map_err(|e| Status::invalid_argument(format!("{MALFORMED_PAYLOAD}: {e}")))?;
    Ok((v, Format::of(&p.data)))
}

fn encode<T: Serialize>(v: &T, format: Format) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { data: format.encode(v).map_err(|e| Status::internal(e.to_string()))? }))
}

/// This member's status, as ClusterService reports it.
pub fn member_status(core: &Core) -> pb::ClusterMember {
    let m = core.raft.metrics().borrow().clone();
    let role = match m.state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    };
    pb::ClusterMember {
        id: core.id,
        address: core.addr.clone(),
        role: role.to_string(),
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        state_digest: core.state.read(|s| s.digest()),
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        voter: m.membership_config.membership().voter_ids().any(|v| v == core.id),
        initialized: initialized(&m),
    }
}

/// Whether a member belongs to an initialized cluster, by openraft's own rule
/// (`Raft::is_initialized`): it has a log (the initial membership is entry 0)
/// or it has voted (a peer of an initialized cluster asked it for its vote).
pub fn initialized(m: &crate::raft::typ::Metrics) -> bool {
    m.last_log_index.is_some() || m.vote != openraft::Vote::default()
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        let (rpc, format) = decode(req.get_ref())?;
        encode(&self.core.raft.append_entries(rpc).await, format)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        let (rpc, format) = decode(req.get_ref())?;
        encode(&self.core.raft.vote(rpc).await, format)
    }

    #[tracing::instrument(skip_all)]
    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftPayload>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let header: SnapshotHeader = serde_json::from_slice(&first.header)
            .map_err(|e| Status::invalid_argument(format!("malformed snapshot header: {e}")))?;
        if header.size > MAX_SNAPSHOT_BYTES {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {} bytes exceeds {MAX_SNAPSHOT_BYTES}",
                header.size
            )));
        }
        let mut data = Vec::with_capacity(header.size.min(64 * 1024 * 1024) as usize);
        data.extend_from_slice(&first.data);
        while let Some(chunk) = stream.message().await? {
            if !chunk.header.is_empty() {
                return Err(Status::invalid_argument("snapshot header repeated mid-stream"));
            }
            if data.len() as u64 + chunk.data.len() as u64 > header.size {
                return Err(Status::invalid_argument("snapshot stream is longer than its header says"));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended after {} of {} bytes",
                data.len(),
                header.size
            )));
        }
        tracing::info!(
            snapshot = %header.meta.snapshot_id,
            last_log = ?header.meta.last_log_id.map(|l| l.index),
            bytes = header.size,
            "installing snapshot streamed from the leader"
        );
        let snapshot = openraft::Snapshot { meta: header.meta, snapshot: Box::new(Cursor::new(data)) };
        // Snapshot headers stay JSON; so does the answer.
        encode(&self.core.raft.install_full_snapshot(header.vote, snapshot).await, Format::Json)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn propose(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        let (cmd, format): (Command, _) = decode(req.get_ref())?;
        encode(&self.core.handle_forwarded_propose(cmd).await, format)
    }

    async fn read_index(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        let format = Format::of(&req.get_ref().data);
        encode(&self.core.handle_read_index().await, format)
    }

    async fn member_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterMember>, Status> {
        require_peer(&self.core, &req, &[IdentityKind::Coordinator])?;
        Ok(Response::new(member_status(&self.core)))
    }
}
