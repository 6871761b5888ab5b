//! The coordinator's gRPC services, one file each.
//!
//! - [`session`]: the public SessionService (create, get, list, delete, renew, watch).
//! - [`agent`]: AgentService for node agents (register, heartbeat, assignments).
//! - [`node`]: NodeService (node listing for operators).
//! - [`cluster`]: ClusterService (membership and status).
//! - [`raft`]: RaftService (Raft transport, write forwarding, read-index).

pub mod agent;
pub mod cluster;
pub mod node;
pub mod raft;
pub mod session;
