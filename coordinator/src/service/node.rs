//! NodeService: node listing for operators.

use std::sync::Arc;

use sandfleet_proto::v1::{self as pb, node_service_server::NodeService};
use tonic::{Request, Response, Status};

use crate::core::Core;

/// The NodeService implementation.
pub struct NodeApi {
    core: Arc<Core>,
}

impl NodeApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    #[tracing::instrument(skip_all)]
    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let seen = self.core.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let nodes = self.core.state.read(|st| {
            st.nodes
                .values()
                .map(|n| {
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
                        last_heartbeat_ms: seen.get(&n.id).copied().unwrap_or(0),
                        session_count: st.node_sessions.get(&n.id).map(|s| s.len() as u32).unwrap_or(0),
                        runtimes: n.runtimes.clone(),
                    }
                })
                .collect()
        });
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}
