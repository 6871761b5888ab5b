//! Everything openraft. No openraft type leaves this module except through the
//! aliases below, so an openraft upgrade stays local.
//!
//! - [`store`]: the RocksDB log store and state machine (column families).
//! - [`network`]: the Raft transport over tonic (client and server side).
//! - [`codec`]: the versioned binary encoding of log entries and peer messages.

pub mod codec;
pub mod network;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResponse};

/// Raft member id.
pub type NodeId = u64;

/// What the cluster knows about a coordinator: its gRPC address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Error and message aliases.
pub mod typ {
    use super::{Member, NodeId, TypeConfig};

    pub type Entry = openraft::Entry<TypeConfig>;
    pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
    pub type RPCError<E = openraft::error::Infallible> = openraft::error::RPCError<NodeId, Member, RaftError<E>>;
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Member>;
    pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, Member>;
    pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, Member>;
    pub type InitializeError = openraft::error::InitializeError<NodeId, Member>;
    pub type InstallSnapshotError = openraft::error::InstallSnapshotError;
    pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;
    pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
    pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
    pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
    pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
    pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
    pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
    pub type LogId = openraft::LogId<NodeId>;
    pub type Metrics = openraft::RaftMetrics<NodeId, Member>;
}
