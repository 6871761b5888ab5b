//! The Raft transport over tonic: a client per peer (dialled lazily, so a peer
//! that comes back is reached again) with a deadline on every RPC. Messages are
//! openraft's own types, JSON-encoded inside `RaftPayload`.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use sandfleet_proto::v1::raft_service_client::RaftServiceClient;
use sandfleet_proto::v1::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::typ::{self, RPCError, RaftError};
use super::{Member, NodeId, TypeConfig};

/// Dials a coordinator's gRPC address lazily.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Creates one [`PeerClient`] per target.
#[derive(Clone, Default)]
pub struct NetworkFactory;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerClient { target, addr: node.addr.clone(), client: channel(&node.addr).ok().map(RaftServiceClient::new) }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftServiceClient<Channel>>,
}

fn encode<T: Serialize>(v: &T) -> Result<RaftPayload, serde_json::Error> {
    Ok(RaftPayload { data: serde_json::to_vec(v)? })
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, openraft::error::RPCError<NodeId, Member, RaftError<E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            let e = std::io::Error::other(format!("invalid peer address {}", self.addr));
            return Err(openraft::error::RPCError::Unreachable(Unreachable::new(&e)));
        };
        let payload = encode(req).map_err(|e| openraft::error::RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(timeout);
        let result = match which {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let response = match result {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = std::io::Error::other(format!("{which} to {}: {status}", self.addr));
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        openraft::error::RPCError::Unreachable(Unreachable::new(&e))
                    }
                    _ => openraft::error::RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let decoded: Result<Resp, RaftError<E>> = serde_json::from_slice(&response.data)
            .map_err(|e| openraft::error::RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| openraft::error::RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn ttl(option: &RPCOption) -> Duration {
    option.hard_ttl()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: typ::AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<typ::AppendEntriesResponse, RPCError> {
        self.call("append", &rpc, ttl(&option)).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: typ::InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<typ::InstallSnapshotResponse, RPCError<InstallSnapshotError>> {
        self.call("snapshot", &rpc, ttl(&option)).await
    }

    async fn vote(&mut self, rpc: typ::VoteRequest, option: RPCOption) -> Result<typ::VoteResponse, RPCError> {
        self.call("vote", &rpc, ttl(&option)).await
    }
}
