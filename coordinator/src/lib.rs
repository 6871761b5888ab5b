//! The Sandfleet coordinator.
//!
//! This crate owns the cluster's replicated state and its control plane: the
//! Raft group (openraft, with log and state machine in RocksDB), placement of
//! sessions onto node agents, session lifetimes, the signing of data-plane
//! tokens, and every coordinator-side gRPC service.
//!
//! # Layout
//! - [`state`]: the replicated state, its commands and their deterministic apply.
//! - [`raft`]: openraft types, the RocksDB stores, the tonic transport.
//! - [`core`]: proposals (forwarded to the leader), read barriers, tokens.
//! - [`scheduler`]: which node a session goes to, or why it waits.
//! - [`leader`]: the leader loop (cluster key, placement, expiry).
//! - [`service`]: the gRPC services.

pub mod core;
pub mod leader;
pub mod raft;
pub mod scheduler;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES;
use sandfleet_proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use sandfleet_common::time::now_ms;

/// How a coordinator is started.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Raft member id (non-zero, unique in the cluster).
    pub id: u64,
    /// Where to listen for gRPC (public API, agents and peers).
    pub listen: SocketAddr,
    /// The address peers and agents use to reach this member; defaults to the bound address.
    pub advertise: Option<String>,
    /// Where RocksDB keeps the Raft log and state machine.
    pub data_dir: PathBuf,
    /// Initialise a new one-member cluster if this member's log is empty.
    pub bootstrap: bool,
    /// Raft heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Raft election timeout (the minimum; the maximum is twice as long).
    pub election_timeout: Duration,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// How often agents heartbeat.
    pub agent_heartbeat: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7070".parse().expect("literal address"),
            advertise: None,
            data_dir: PathBuf::from("sandfleet-coordinator"),
            bootstrap: false,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_after_entries: 5000,
            agent_heartbeat: Duration::from_secs(1),
        }
    }
}

/// A coordinator failed to start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the RocksDB store in {path}: {source}")]
    Storage { path: PathBuf, source: rocksdb::Error },
    #[error("cannot load the state machine: {0}")]
    StateMachine(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("raft failed: {0}")]
    Raft(String),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// A running coordinator.
pub struct Coordinator {
    addr: SocketAddr,
    core: Arc<core::Core>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    leader_loop: JoinHandle<()>,
}

impl Coordinator {
    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared core (for tests and embedding).
    pub fn core(&self) -> &Arc<core::Core> {
        &self.core
    }

    /// Waits until the server has stopped (after the shutdown token fired), then stops Raft.
    pub async fn join(self) -> Result<(), CoordinatorError> {
        let served = self.server.await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        let _ = self.leader_loop.await;
        self.core.raft.shutdown().await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        served?;
        Ok(())
    }
}

/// Opens the store, starts Raft and the gRPC server, and returns once it is
/// listening (and, with `bootstrap`, once this member leads its new cluster).
pub async fn serve(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<Coordinator, CoordinatorError> {
    if config.id == 0 {
        return Err(CoordinatorError::Config("--id must be a positive integer".into()));
    }
    if config.election_timeout <= config.heartbeat_interval * 2 {
        return Err(CoordinatorError::Config("the election timeout must exceed twice the heartbeat interval".into()));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| CoordinatorError::Config(format!("cannot create data dir {}: {e}", config.data_dir.display())))?;
    let db_path = config.data_dir.join("raft.rocksdb");
    let db = raft::store::open_db(&db_path).map_err(|source| CoordinatorError::Storage { path: db_path.clone(), source })?;
    let log_store = raft::store::LogStore::new(db.clone());
    let sm = raft::store::StateMachineStore::load(db).map_err(|e| CoordinatorError::StateMachine(e.to_string()))?;
    let state = sm.handle();

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let raft_config = openraft::Config {
        cluster_name: "sandfleet".into(),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min: config.election_timeout.as_millis() as u64,
        election_timeout_max: config.election_timeout.as_millis() as u64 * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
        max_in_snapshot_log_to_keep: 500,
        ..Default::default()
    }
    .validate()
    .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    let raft = raft::Raft::new(config.id, Arc::new(raft_config), raft::network::NetworkFactory, log_store, sm)
        .await
        .map_err(|e| CoordinatorError::Raft(e.to_string()))?;

    let core = Arc::new(core::Core::new(
        config.id,
        advertise.clone(),
        raft.clone(),
        state,
        core::Tunables { agent_heartbeat: config.agent_heartbeat },
    ));

    let session = service::session::SessionApi::new(core.clone(), shutdown.clone());
    let agent = service::agent::AgentApi::new(core.clone(), shutdown.clone());
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        .add_service(
            pb::session_service_server::SessionServiceServer::new(session)
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
        )
        .add_service(pb::agent_service_server::AgentServiceServer::new(agent))
        .add_service(pb::node_service_server::NodeServiceServer::new(service::node::NodeApi::new(core.clone())))
        .add_service(pb::cluster_service_server::ClusterServiceServer::new(service::cluster::ClusterApi::new(core.clone())))
        .add_service(
            pb::raft_service_server::RaftServiceServer::new(service::raft::RaftApi::new(core.clone()))
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    let server = tokio::spawn(async move { server.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await });

    if config.bootstrap {
        let initialized = raft.is_initialized().await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        if !initialized {
            let mut members = std::collections::BTreeMap::new();
            members.insert(config.id, raft::Member { addr: advertise.clone() });
            raft.initialize(members).await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
            tracing::info!(id = config.id, addr = %advertise, "bootstrapped a new cluster");
        }
        raft.wait(Some(config.election_timeout * 10))
            .metrics(|m| m.current_leader.is_some(), "leader elected")
            .await
            .map_err(|e| CoordinatorError::Raft(format!("no leader after bootstrap: {e}")))?;
    }

    let leader_loop = tokio::spawn(leader::run(core.clone(), Duration::from_millis(500), shutdown.clone()));
    if config.bootstrap {
        // Wait for the cluster key, so agents can register as soon as we report ready.
        let mut v = core.state.version.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while core.state.read(|s| s.signing_seed.is_empty()) && core.is_leader() {
            if tokio::time::timeout_at(deadline, v.changed()).await.is_err() {
                return Err(CoordinatorError::Raft("the cluster key was not committed within 10s".into()));
            }
        }
    }
    tracing::info!(id = config.id, %addr, "coordinator serving");
    Ok(Coordinator { addr, core, server, leader_loop })
}
