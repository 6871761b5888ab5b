//! The Raft transport over tonic: a client per peer (dialled lazily, so a peer
//! that comes back is reached again) with a deadline on every RPC. Messages are
//! openraft's own types inside `RaftPayload`, in the versioned binary
//! [`codec`](super::codec); a peer that answers that it cannot read them (a
//! member from before the codec, during a rolling upgrade) is spoken to in
//! JSON from then on, and every member answers in the format it was asked
//! in. Snapshots are
//! streamed as raw bytes in [`SNAPSHOT_CHUNK_BYTES`] chunks over one
//! client-streaming call, and installed only once the whole stream arrived.

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::SnapshotResponse;
use openraft::{OptionalSend, Snapshot, SnapshotMeta, Vote};
use sandfleet_common::tls::TlsDialer;
use sandfleet_proto::v1::raft_service_client::RaftServiceClient;
use sandfleet_proto::v1::{RaftPayload, SnapshotChunk};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::codec::{self, Format};
use super::typ::{self, RPCError, RaftError};
use super::{Member, NodeId, TypeConfig};

/// Size of one streamed snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// The header of a streamed snapshot (its first chunk).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, Member>,
    /// Total snapshot size, so the receiver can refuse a truncated stream.
    pub size: u64,
}

/// Dials a coordinator's gRPC address lazily, over mutual TLS when `tls` is
/// given (the peer must then hold a `coordinator` certificate).
pub fn channel(addr: &str, tls: Option<&TlsDialer>) -> Result<Channel, tonic::transport::Error> {
    sandfleet_common::grpc::channel(addr, sandfleet_common::grpc::ChannelOptions::RAFT, tls)
}

/// Creates one [`PeerClient`] per target.
#[derive(Clone, Default)]
pub struct NetworkFactory {
    /// `None` on an `--insecure` loopback cluster.
    pub tls: Option<TlsDialer>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            client: channel(&node.addr, self.tls.as_ref()).ok().map(RaftServiceClient::new),
            format: Format::Binary,
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftServiceClient<Channel>>,
    /// What this peer reads: binary until it says it cannot.
    format: Format,
}

/// The error text with which every member, old or new, refuses a payload it cannot decode.
pub const MALFORMED_PAYLOAD: &str = "malformed raft payload";

/// Whether `status` is a peer refusing a payload it cannot decode.
fn unreadable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::InvalidArgument && status.message().starts_with(MALFORMED_PAYLOAD)
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
        let result = loop {
            let data =
                self.format.encode(req).map_err(|e| openraft::error::RPCError::Network(NetworkError::new(&e)))?;
            let mut request = tonic::Request::new(RaftPayload { data });
            request.set_timeout(timeout);
            let result = match which {
                "append" => client.append_entries(request).await,
                _ => client.vote(request).await,
            };
            match result {
                Err(status) if self.format == Format::Binary && unreadable(&status) => {
                    tracing::info!(peer = %self.addr, "peer cannot read the binary encoding; speaking JSON to it");
                    self.format = Format::Json;
                }
                other => break other,
            }
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
        let decoded: Result<Resp, RaftError<E>> =
            codec::decode(&response.data).map_err(|e| openraft::error::RPCError::Network(NetworkError::new(&e)))?;
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

    /// Never used: [`Self::full_snapshot`] streams whole snapshots instead of
    /// openraft's chunk-per-RPC protocol.
    async fn install_snapshot(
        &mut self,
        _rpc: typ::InstallSnapshotRequest,
        _option: RPCOption,
    ) -> Result<typ::InstallSnapshotResponse, RPCError<InstallSnapshotError>> {
        let e = std::io::Error::other("chunked InstallSnapshot is not supported; snapshots are streamed");
        Err(openraft::error::RPCError::Network(NetworkError::new(&e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let Some(client) = self.client.as_mut() else {
            let e = std::io::Error::other(format!("invalid peer address {}", self.addr));
            return Err(StreamingError::Unreachable(Unreachable::new(&e)));
        };
        let data = (*snapshot.snapshot).into_inner();
        let header = SnapshotHeader { vote, meta: snapshot.meta, size: data.len() as u64 };
        let header = serde_json::to_vec(&header).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let chunks: Vec<SnapshotChunk> = if data.is_empty() {
            vec![SnapshotChunk { header, data: Vec::new() }]
        } else {
            data.chunks(SNAPSHOT_CHUNK_BYTES)
                .enumerate()
                .map(|(i, c)| SnapshotChunk {
                    header: if i == 0 { header.clone() } else { Vec::new() },
                    data: c.to_vec(),
                })
                .collect()
        };
        // The whole stream gets one segment timeout per chunk, plus one for the install.
        let deadline = ttl(&option) * (chunks.len() as u32 + 1);
        let mut request = tonic::Request::new(tokio_stream::iter(chunks));
        request.set_timeout(deadline);
        tracing::debug!(target_id = self.target, bytes = data.len(), "streaming snapshot");
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = client.install_snapshot(request) => r,
        };
        let response = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = std::io::Error::other(format!("snapshot to {}: {status}", self.addr));
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        StreamingError::Unreachable(Unreachable::new(&e))
                    }
                    _ => StreamingError::Network(NetworkError::new(&e)),
                });
            }
        };
        let decoded: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            codec::decode(&response.data).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(&mut self, rpc: typ::VoteRequest, option: RPCOption) -> Result<typ::VoteResponse, RPCError> {
        self.call("vote", &rpc, ttl(&option)).await
    }
}
