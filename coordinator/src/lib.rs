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
//! - [`error`]: the core's error type, mapped to gRPC statuses only in [`service`].
//! - [`scheduler`]: which node a session goes to, or why it waits.
//! - [`pending`]: why a session waits, as stored and as clients read it.
//! - [`plan`]: the leader's decisions (liveness, lifetimes, drains, placement) as pure functions.
//! - [`leader`]: the leader loop that runs the planners and proposes what they decide.
//! - [`formation`]: member ids from StatefulSet hostnames, and the automatic `cluster init`.
//! - [`readiness`]: when the member reports SERVING on `grpc.health.v1`.
//! - [`service`]: the gRPC services.

pub mod commit;
pub mod core;
pub mod error;
pub mod formation;
pub mod leader;
pub mod metrics;
pub mod pending;
pub mod plan;
pub mod raft;
pub mod readiness;
pub mod reports;
pub mod scheduler;
pub mod service;
pub mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_common::auth::IdentityKind;
use sandfleet_common::health::Health;
use sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES;
pub use sandfleet_common::tls::TlsFiles;
use sandfleet_common::tls::{spawn_server, ClientTls, ServerTls, Serving};
use sandfleet_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

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
    /// Disaster recovery: drop this member's Raft log and membership, keep its
    /// applied state, and start a new one-member cluster with it.
    pub force_new_cluster: bool,
    /// Raft heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Raft election timeout `T`: a follower that hears nothing from the leader
    /// for a random time in `[0.8T, T)` campaigns (see [`raft_timing`]).
    pub election_timeout: Duration,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind the newest snapshot.
    pub keep_log_entries: u64,
    /// How often agents heartbeat.
    pub agent_heartbeat: Duration,
    /// How long the leader waits for a heartbeat before it declares a node
    /// down and places its sessions elsewhere (also the grace after a leader change).
    pub node_ttl: Duration,
    /// Node silence after which a session without its own `lost_after` is
    /// placed elsewhere; `None` means `node_ttl`. Agents cut off from a quorum
    /// stop their sessions before this passes.
    pub lost_after: Option<Duration>,
    /// How the scheduler scores nodes.
    pub placement_strategy: scheduler::Strategy,
    /// Feasible nodes scored per placement (best-of-K); 0 scores all.
    pub placement_candidates: usize,
    /// Most placements per Raft entry.
    pub placement_batch: usize,
    /// Most commands group-committed in one Raft entry; 1 turns group commit
    /// off (for a rolling upgrade from a version without it).
    pub group_commit: usize,
    /// Longest a heartbeat waits for the commit of the session reports it
    /// carries, from an agent that sends uncommitted reports again
    /// (`HeartbeatRequest.resend_uncommitted`); past it the answer says they
    /// are not committed yet. Keeps heartbeats fast while the log is busy.
    pub report_wait: Duration,
    /// Mutual TLS for every connection (peers, agents, clients). `None` is
    /// `--insecure`: plaintext, allowed only on a loopback listen address, where
    /// a caller without a credential acts as the admin of the `default` tenant.
    pub tls: Option<TlsFiles>,
    /// With `bootstrap`: once the new cluster has a leader, create an admin API
    /// key of the default tenant and write it to this file (mode 0600, created
    /// exclusively; an existing file is left alone and no key is created).
    /// With `initial_members`: the same, by the member that initializes the cluster.
    pub admin_key_file: Option<PathBuf>,
    /// `--initial-members`: every initial voter, id -> `host:port` (this member
    /// included). The cluster forms by itself: the lowest id initializes it
    /// once every member answers (see [`formation`]). Empty: no automatic init.
    pub initial_members: BTreeMap<u64, String>,
    /// `--health-listen`: also serve `grpc.health.v1` alone, in plaintext, here
    /// (for Kubernetes probes, which speak no TLS).
    pub health_listen: Option<SocketAddr>,
    /// `--metrics-listen`: serve `/metrics` (Prometheus text), `/healthz` and
    /// `/readyz` in plaintext HTTP here.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7070".parse().expect("literal address"),
            advertise: None,
            data_dir: PathBuf::from("sandfleet-coordinator"),
            bootstrap: false,
            force_new_cluster: false,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_after_entries: 5000,
            keep_log_entries: 1000,
            agent_heartbeat: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            lost_after: None,
            placement_strategy: scheduler::Strategy::Spread,
            placement_candidates: 16,
            placement_batch: 1024,
            group_commit: commit::MAX_COMMANDS,
            report_wait: core::DEFAULT_REPORT_WAIT,
            tls: None,
            admin_key_file: None,
            initial_members: BTreeMap::new(),
            health_listen: None,
            metrics_listen: None,
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

/// How long a stopping coordinator lets in-flight calls finish.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// A running coordinator. [`Coordinator::join`] awaits its tasks after the
/// shutdown token fired; dropping it (or a failed start) aborts them.
pub struct Coordinator {
    addr: SocketAddr,
    core: Arc<core::Core>,
    server: AbortOnDropHandle<Result<(), tonic::transport::Error>>,
    leader_loop: AbortOnDropHandle<()>,
    /// The automatic init of `--initial-members` (ends once done).
    formation: Option<AbortOnDropHandle<()>>,
    /// Keeps the health statuses up to date.
    readiness: AbortOnDropHandle<()>,
    health: Arc<Health>,
    /// The `--health-listen` server (stopped last, in [`Coordinator::join`]).
    health_server: Option<sandfleet_common::health::Listener>,
    /// The `--metrics-listen` server (stopped last, with the health listener).
    metrics_server: Option<sandfleet_common::metrics::Listener>,
    /// The gauges read at collection time (they hold the core weakly).
    _observers: metrics::Observers,
    /// Reloads the TLS files on SIGHUP or change; `None` on plaintext.
    reloader: Option<AbortOnDropHandle<()>>,
    shutdown: CancellationToken,
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

    /// The bound `--health-listen` address, if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_server.as_ref().map(|l| l.addr())
    }

    /// The bound `--metrics-listen` address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|l| l.addr())
    }

    /// The health statuses (SERVING once ready, see [`readiness`]).
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Waits until the server has stopped (after the shutdown token fired), then stops Raft.
    ///
    /// In-flight calls get [`SHUTDOWN_DRAIN`] to finish (a write that waits for a
    /// quorum that is gone would otherwise hold the process forever); then the
    /// remaining connections are dropped.
    pub async fn join(mut self) -> Result<(), CoordinatorError> {
        let joined = tokio::select! {
            joined = &mut self.server => Some(joined),
            _ = self.shutdown.cancelled() => None,
        };
        let joined = match joined {
            Some(joined) => Some(joined),
            None => tokio::time::timeout(SHUTDOWN_DRAIN, &mut self.server).await.ok(),
        };
        let served = match joined {
            Some(joined) => joined.map_err(|e| CoordinatorError::Raft(e.to_string()))?,
            None => {
                tracing::warn!(drain = ?SHUTDOWN_DRAIN, "in-flight calls did not finish; closing their connections");
                self.server.abort();
                Ok(())
            }
        };
        let _ = self.leader_loop.await;
        if let Some(formation) = self.formation.take() {
            let _ = formation.await;
        }
        let _ = self.readiness.await;
        if let Some(reloader) = self.reloader.take() {
            let _ = reloader.await;
        }
        let stopped = match tokio::time::timeout(SHUTDOWN_DRAIN, self.core.raft.shutdown()).await {
            Ok(r) => r.map_err(|e| CoordinatorError::Raft(e.to_string())),
            Err(_) => {
                tracing::warn!("raft did not stop in time; exiting anyway");
                Ok(())
            }
        };
        // Probes saw NOT_SERVING on the health listener until now.
        if let Some(listener) = self.health_server.take() {
            listener.stop(SHUTDOWN_DRAIN).await;
        }
        if let Some(listener) = self.metrics_server.take() {
            listener.stop(SHUTDOWN_DRAIN).await;
        }
        stopped?;
        served?;
        Ok(())
    }
}

/// openraft's `(election_timeout_min, election_timeout_max)` in ms for an
/// election timeout `t`.
///
/// openraft 0.9 makes a follower whose leader was committed wait for the
/// leader lease (`election_timeout_max`) *plus* its randomized election timeout
/// (`[min, max)`) before it campaigns, so the two add up. With `max = t/2` and
/// `min = 0.3 t`, a follower campaigns after `[0.8 t, t)` of silence, which is
/// what an etcd operator means by an election timeout of `t`.
pub fn raft_timing(t: Duration) -> (u64, u64) {
    let t = t.as_millis() as u64;
    (t * 3 / 10, t / 2)
}

/// Opens the store, starts Raft and the gRPC server, and returns once it is
/// listening (and, with `bootstrap`, once this member leads its new cluster).
pub async fn serve(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<Coordinator, CoordinatorError> {
    if config.id == 0 {
        return Err(CoordinatorError::Config("--id must be a positive integer".into()));
    }
    if config.node_ttl < config.agent_heartbeat * 3 {
        return Err(CoordinatorError::Config("--node-ttl must be at least three agent heartbeat intervals".into()));
    }
    if config.lost_after.is_some_and(|l| l < config.agent_heartbeat * 3 + Duration::from_millis(500)) {
        return Err(CoordinatorError::Config(
            "--lost-after must be at least three agent heartbeat intervals plus 500ms (agents must fence themselves first)".into(),
        ));
    }
    if !(1..=commit::MAX_COMMANDS).contains(&config.group_commit) {
        return Err(CoordinatorError::Config(format!(
            "--group-commit must be between 1 and {} (got {})",
            commit::MAX_COMMANDS,
            config.group_commit
        )));
    }
    if config.report_wait >= config.agent_heartbeat {
        return Err(CoordinatorError::Config(format!(
            "--report-wait ({:?}) must be shorter than the agent heartbeat interval ({:?})",
            config.report_wait, config.agent_heartbeat
        )));
    }
    if config.placement_batch == 0 {
        return Err(CoordinatorError::Config("--placement-batch must be at least 1".into()));
    }
    if config.election_timeout < config.heartbeat_interval * 4 {
        return Err(CoordinatorError::Config("the election timeout must be at least four heartbeat intervals".into()));
    }
    let mut config = config;
    if !config.initial_members.is_empty() {
        if config.bootstrap || config.force_new_cluster {
            return Err(CoordinatorError::Config(
                "--initial-members forms a cluster of several members; it excludes --bootstrap and --force-new-cluster"
                    .into(),
            ));
        }
        service::cluster::check_members(config.id, &config.initial_members)
            .map_err(|s| CoordinatorError::Config(format!("--initial-members: {}", s.message())))?;
        // Peers reach this member at the address the list gives it.
        let own = config.initial_members[&config.id].clone();
        match &config.advertise {
            None => config.advertise = Some(own),
            Some(a) if *a == own => {}
            Some(a) => {
                return Err(CoordinatorError::Config(format!(
                    "--advertise {a} differs from this member's address in --initial-members ({own}); \
                     drop --advertise or make them equal"
                )))
            }
        }
    }
    if config.admin_key_file.is_some() && !config.bootstrap && config.initial_members.is_empty() {
        return Err(CoordinatorError::Config("--admin-key-file needs --bootstrap or --initial-members".into()));
    }
    let tls = match &config.tls {
        Some(files) => {
            let server = ServerTls::load(files.clone()).map_err(|e| CoordinatorError::Config(e.to_string()))?;
            let identity = server.identity();
            if identity.kind != IdentityKind::Coordinator {
                return Err(CoordinatorError::Config(format!(
                    "{} holds the identity {identity}; a coordinator needs a coordinator certificate \
                     (sandfleet pki issue --kind coordinator)",
                    files.cert.display()
                )));
            }
            let client = ClientTls::load(files).map_err(|e| CoordinatorError::Config(e.to_string()))?;
            tracing::info!(%identity, "mutual TLS on every connection");
            Some((server, client))
        }
        None if !sandfleet_common::tls::is_loopback(&config.listen) => {
            return Err(CoordinatorError::Config(sandfleet_common::tls::insecure_refusal(&config.listen)));
        }
        None => {
            tracing::warn!(listen = %config.listen, "--insecure: plaintext on loopback, callers without a credential act as admin");
            None
        }
    };
    let peer_tls = tls.as_ref().map(|(_, client)| client.dialer(Some(IdentityKind::Coordinator)));
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| CoordinatorError::Config(format!("cannot create data dir {}: {e}", config.data_dir.display())))?;
    let db_path = config.data_dir.join("raft.rocksdb");
    let db =
        raft::store::open_db(&db_path).map_err(|source| CoordinatorError::Storage { path: db_path.clone(), source })?;
    if config.force_new_cluster {
        tracing::warn!(
            id = config.id,
            "--force-new-cluster: dropping the Raft log and membership, keeping the applied state"
        );
        raft::store::reset_for_new_cluster(&db)
            .map_err(|source| CoordinatorError::Storage { path: db_path.clone(), source })?;
        config.bootstrap = true;
    }
    let raft_stats = Arc::new(metrics::RaftStats::default());
    let log_store = raft::store::LogStore::new(db.clone()).with_stats(raft_stats.clone());
    let sm = raft::store::StateMachineStore::load(db)
        .map_err(|e| CoordinatorError::StateMachine(e.to_string()))?
        .with_stats(raft_stats.clone());
    let state = sm.handle();

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let raft_config = openraft::Config {
        cluster_name: "sandfleet".into(),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min: raft_timing(config.election_timeout).0,
        election_timeout_max: raft_timing(config.election_timeout).1,
        // Per chunk of a streamed snapshot (see raft::network).
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
        max_in_snapshot_log_to_keep: config.keep_log_entries,
        purge_batch_size: 1,
        // Group-committed entries are up to commit::MAX_BYTES each.
        max_payload_entries: commit::MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
    .validate()
    .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    let raft = raft::Raft::new(
        config.id,
        Arc::new(raft_config),
        raft::network::NetworkFactory { tls: peer_tls.clone() },
        log_store,
        sm,
    )
    .await
    .map_err(|e| CoordinatorError::Raft(e.to_string()))?;

    let core = Arc::new(core::Core::new(
        config.id,
        advertise.clone(),
        raft.clone(),
        state,
        core::Tunables {
            agent_heartbeat: config.agent_heartbeat,
            node_ttl: config.node_ttl,
            lost_after: config.lost_after.unwrap_or(config.node_ttl),
            placement: scheduler::PlacementOptions {
                strategy: config.placement_strategy,
                candidates: config.placement_candidates,
            },
            placement_batch: config.placement_batch,
            group_commit: config.group_commit,
            report_wait: config.report_wait,
        },
        peer_tls,
    ));

    let health = Health::new(&[
        pb::session_service_server::SERVICE_NAME,
        pb::agent_service_server::SERVICE_NAME,
        pb::node_service_server::SERVICE_NAME,
        pb::cluster_service_server::SERVICE_NAME,
        pb::pool_service_server::SERVICE_NAME,
        pb::template_service_server::SERVICE_NAME,
        pb::tenant_service_server::SERVICE_NAME,
        pb::api_key_service_server::SERVICE_NAME,
        pb::raft_service_server::SERVICE_NAME,
    ])
    .await;
    let health_server = match config.health_listen {
        Some(at) => Some(
            sandfleet_common::health::Listener::bind(at, &health)
                .await
                .map_err(|source| CoordinatorError::Bind { addr: at, source })?,
        ),
        None => None,
    };
    let observers = metrics::observe(&core, raft_stats);
    let metrics_server = match config.metrics_listen {
        Some(at) => Some(
            sandfleet_common::metrics::Listener::bind(at, health.clone())
                .await
                .map_err(|source| CoordinatorError::Bind { addr: at, source })?,
        ),
        None => None,
    };

    let auth = service::auth::Authenticator::new(core.clone(), config.tls.is_none());
    let session = service::session::SessionApi::new(core.clone(), shutdown.clone(), auth.clone());
    let agent = service::agent::AgentApi::new(core.clone(), shutdown.clone());
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(sandfleet_common::trace_context::server_span)
        .add_service(health.service())
        .add_service(
            pb::session_service_server::SessionServiceServer::new(session)
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
        )
        .add_service(pb::agent_service_server::AgentServiceServer::new(agent))
        .add_service(pb::node_service_server::NodeServiceServer::new(service::node::NodeApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(pb::cluster_service_server::ClusterServiceServer::new(service::cluster::ClusterApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(pb::pool_service_server::PoolServiceServer::new(service::pool::PoolApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(pb::template_service_server::TemplateServiceServer::new(service::template::TemplateApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(pb::tenant_service_server::TenantServiceServer::new(service::tenant::TenantApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(pb::api_key_service_server::ApiKeyServiceServer::new(service::tenant::ApiKeyApi::new(
            core.clone(),
            auth.clone(),
        )))
        .add_service(
            pb::raft_service_server::RaftServiceServer::new(service::raft::RaftApi::new(core.clone()))
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        );
    // Nagle off on accepted connections (the builder's `tcp_nodelay` only applies
    // to listeners tonic binds itself): small responses must not wait for a delayed ACK.
    let Serving { server, reloader } = spawn_server(server, listener, tls, shutdown.clone());

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

    if config.force_new_cluster {
        // Members added later must start from this state, not from an empty
        // one plus the new log: snapshot it and drop the log behind it.
        raft.trigger().snapshot().await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        let m = raft
            .wait(Some(Duration::from_secs(60)))
            .metrics(|m| m.snapshot.is_some(), "restored state snapshotted")
            .await
            .map_err(|e| CoordinatorError::Raft(format!("cannot snapshot the restored state: {e}")))?;
        if let Some(snapshot) = m.snapshot {
            raft.trigger().purge_log(snapshot.index).await.map_err(|e| CoordinatorError::Raft(e.to_string()))?;
        }
        let sessions = core.state.read(|s| s.sessions.len());
        tracing::warn!(
            sessions,
            "started a new one-member cluster from the restored state; remove --force-new-cluster now"
        );
    }

    let leader_loop =
        AbortOnDropHandle::new(tokio::spawn(leader::run(core.clone(), Duration::from_millis(250), shutdown.clone())));
    let readiness =
        AbortOnDropHandle::new(tokio::spawn(readiness::run(core.clone(), health.clone(), shutdown.clone())));
    let formation = (!config.initial_members.is_empty()).then(|| {
        AbortOnDropHandle::new(tokio::spawn(formation::run(
            core.clone(),
            config.initial_members.clone(),
            config.admin_key_file.clone(),
            shutdown.clone(),
        )))
    });
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
    if let (true, Some(path)) = (config.bootstrap, &config.admin_key_file) {
        write_admin_key(&core, path).await?;
    }
    tracing::info!(id = config.id, %addr, "coordinator serving");
    Ok(Coordinator {
        addr,
        core,
        server,
        leader_loop,
        formation,
        readiness,
        health,
        health_server,
        metrics_server,
        _observers: observers,
        reloader,
        shutdown,
    })
}

/// `--admin-key-file`: creates the file exclusively with mode 0600, then an
/// admin key of the default tenant (retrying while a new cluster's first
/// leader settles), and writes the key into it. An existing file is left
/// alone and no key is created.
pub(crate) async fn write_admin_key(core: &core::Core, path: &std::path::Path) -> Result<(), CoordinatorError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::info!(
                path = %path.display(),
                "the admin key file exists already; not creating another admin key"
            );
            return Ok(());
        }
        Err(e) => {
            return Err(CoordinatorError::Config(format!("cannot create the admin key file {}: {e}", path.display())))
        }
    };
    let created = service::cluster::first_admin_key(core).await;
    let written = created.map_err(|s| s.message().to_string()).and_then(|text| {
        file.write_all(format!("{text}\n").as_bytes()).and_then(|()| file.sync_all()).map_err(|e| e.to_string())
    });
    match written {
        Ok(()) => {
            tracing::info!(path = %path.display(), "wrote the first admin API key");
            Ok(())
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(path);
            Err(CoordinatorError::Config(format!("cannot create the admin key for {}: {e}", path.display())))
        }
    }
}
