//! The Sandfleet node agent.
//!
//! This crate owns everything that happens on one host: registering the node
//! with the coordinators, heartbeating, reconciling assigned sessions against
//! what runs, running sessions through a [`runtime::Runtime`] backend, and
//! serving the data plane (exec and files) directly to clients.
//!
//! # Layout
//! - [`control`]: registration, heartbeats, the assignment watch and reconciliation.
//! - [`coordinator_link`]: call deadline, retry backoff and connection settings towards the coordinators.
//! - [`dataplane`]: ExecService and FileService, with session-token checks.
//! - [`runtime`]: the `Runtime` trait and its backends (`process`: bubblewrap + cgroups;
//!   `docker`: a hardened container per session with bubblewrap inside).
//! - [`executor`]: `sandfleet-executor`, which runs execs inside a container, and its client.
//! - [`lock`]: the locks that keep a second agent off this one's node id and data dir.
//! - [`exec`]: the one implementation of exec semantics (timeout, caps, exit, OOM).
//! - [`workspace`]: safe file operations inside a session's workspace.
//! - [`kubernetes`]: with `--kube-node-name`, the agent's Kubernetes Node: its labels,
//!   cordon and NoExecute taints (the agent's own hold on its node), the session count annotation.
//! - [`store`]: the `WorkspaceStore` trait (local directory, S3) and the sync
//!   engine that keeps workspaces durable across nodes.

pub mod control;
pub mod coordinator_link;
pub mod dataplane;
pub mod exec;
pub mod executor;
pub mod kubernetes;
pub mod lock;
pub mod metrics;
pub mod runtime;
pub mod store;
pub mod workspace;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sandfleet_common::auth::{Identity, IdentityKind};
use sandfleet_common::limits::{self, MAX_GRPC_MESSAGE_BYTES};
use sandfleet_common::tls::{spawn_server, ClientTls, ServerTls, Serving};
use sandfleet_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::control::{AgentState, Control, ControlConfig};
use crate::runtime::cri::{CriConfig, CriRuntime, CriRuntimeConfig};
use crate::runtime::docker::{DockerRuntime, DockerRuntimeConfig};
use crate::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use crate::runtime::Runtime;

/// Which runtime backend runs sessions: the one list of runtimes, in `sandfleet-common`.
pub use sandfleet_common::spec::Runtime as RuntimeKind;

/// The CPU overcommit of `sandfleet dev`: four times the cores, as E2B's
/// scheduler overcommits CPU by default.
pub const DEV_CPU_OVERCOMMIT: f64 = 4.0;

/// How an agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stable node name (a DNS label).
    pub node_id: String,
    /// Data-plane listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The address clients reach this agent at; defaults to the bound address.
    pub advertise: Option<String>,
    /// Where session workspaces and runtime state live.
    pub data_dir: PathBuf,
    /// Coordinator addresses.
    pub coordinators: Vec<String>,
    /// The runtime backend.
    pub runtime: RuntimeKind,
    /// Schedulable CPU in millicores; 0 means all of the host's, times `cpu_overcommit`.
    pub cpu_millis: u32,
    /// How many times its cores a node offers for placement when `cpu_millis`
    /// is 0 (sessions reserve their CPU request, and idle sandboxes use little).
    /// 1.0 offers exactly the cores; `sandfleet dev` uses [`DEV_CPU_OVERCOMMIT`].
    pub cpu_overcommit: f64,
    /// Schedulable memory in bytes; 0 means the host's total.
    pub memory_bytes: u64,
    /// Concurrent session slots.
    pub slots: u32,
    /// Node labels.
    pub labels: HashMap<String, String>,
    /// First host uid handed to sessions (each session gets its own).
    pub uid_base: u32,
    /// Output cap per exec.
    pub output_cap: u64,
    /// Container runtimes (docker, cri): template name → image (empty: every template on the default image).
    pub docker_templates: std::collections::BTreeMap<sandfleet_common::spec::Template, String>,
    /// Container runtimes (docker, cri): template name → idle containers to keep ready.
    pub warm_pool: std::collections::BTreeMap<sandfleet_common::spec::Template, u32>,
    /// CRI runtime: the socket, runtime handler, pull policy and cgroup parent.
    pub cri: CriConfig,
    /// How sessions get their disk and inode quotas.
    pub disk_quota: runtime::disk::DiskQuota,
    /// Process runtime: the `sandfleet-executor` binary started per session
    /// (`None`: [`runtime::process::locate_executor`]).
    pub executor_path: Option<PathBuf>,
    /// Where workspaces are kept durably (the library default: nowhere; the
    /// `sandfleet-agent` binary and `sandfleet dev` default to a local directory).
    pub store: store::StoreConfig,
    /// How workspaces are synced to the store.
    pub sync: store::sync::SyncConfig,
    /// Mutual TLS toward the coordinators and on the data plane; `None` is
    /// `--insecure`, allowed only on a loopback listen address.
    pub tls: Option<sandfleet_common::tls::TlsFiles>,
    /// `--health-listen`: also serve `grpc.health.v1` alone, in plaintext, here
    /// (for Kubernetes probes, which speak no TLS).
    pub health_listen: Option<SocketAddr>,
    /// `--metrics-listen`: serve `/metrics` (Prometheus text), `/healthz` and
    /// `/readyz` in plaintext HTTP here.
    pub metrics_listen: Option<SocketAddr>,
    /// Follow this Kubernetes Node (`--kube-node-name`); `None`: nothing
    /// Kubernetes-related runs.
    pub kube: Option<kubernetes::KubeNodeConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            listen: "127.0.0.1:7071".parse().expect("literal address"),
            advertise: None,
            data_dir: PathBuf::from("sandfleet-agent"),
            coordinators: vec!["127.0.0.1:7070".into()],
            runtime: RuntimeKind::Process,
            cpu_millis: 0,
            cpu_overcommit: 1.0,
            memory_bytes: 0,
            slots: 64,
            labels: HashMap::new(),
            uid_base: 200_000,
            output_cap: limits::DEFAULT_OUTPUT_CAP_BYTES,
            docker_templates: std::collections::BTreeMap::new(),
            warm_pool: std::collections::BTreeMap::new(),
            cri: CriConfig::default(),
            disk_quota: runtime::disk::DiskQuota::default(),
            executor_path: None,
            store: store::StoreConfig::None,
            sync: store::sync::SyncConfig::default(),
            tls: None,
            health_listen: None,
            metrics_listen: None,
            kube: None,
        }
    }
}

/// An agent failed to start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("runtime unavailable: {0}")]
    Runtime(#[from] runtime::RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("shut down before registering with the coordinators")]
    Cancelled,
    #[error("task failed: {0}")]
    Join(String),
    #[error("workspace store: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error("Kubernetes: {0}")]
    Kube(String),
}

/// How long the agent tries to read its Kubernetes Node at start before it gives up.
pub const KUBE_START_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the data-plane server may take to finish its open calls after
/// the shutdown token fired, before they are cut.
pub const SERVER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running agent. [`Agent::join`] awaits its tasks after the shutdown
/// token fired; dropping it (or a failed start) aborts them.
pub struct Agent {
    addr: SocketAddr,
    server: AbortOnDropHandle<Result<(), tonic::transport::Error>>,
    control: AbortOnDropHandle<()>,
    /// Runtime cleanup at shutdown (warm pool containers, ready filesystems).
    cleanup: Option<AbortOnDropHandle<()>>,
    /// Reloads the TLS files on SIGHUP or change; `None` on plaintext.
    reloader: Option<AbortOnDropHandle<()>>,
    /// Follows the Kubernetes Node and writes its annotation (`--kube-node-name`).
    kube: Option<AbortOnDropHandle<()>>,
    syncer: Option<Arc<store::sync::Syncer>>,
    /// Sets the health statuses NOT_SERVING when the shutdown begins.
    _health_watch: AbortOnDropHandle<()>,
    /// The `--health-listen` server (stopped last, in [`Agent::join`]).
    health_server: Option<sandfleet_common::health::Listener>,
    /// The `--metrics-listen` server (stopped last, with the health listener).
    metrics_server: Option<sandfleet_common::metrics::Listener>,
    /// The gauges read at collection time (they hold the state weakly).
    _observers: metrics::Observers,
    /// Held until the agent has stopped.
    _lock: lock::AgentLock,
}

impl Agent {
    /// The bound data-plane address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound `--health-listen` address, if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_server.as_ref().map(|l| l.addr())
    }

    /// The bound `--metrics-listen` address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|l| l.addr())
    }

    /// Waits until the agent has stopped after the shutdown token fired.
    pub async fn join(mut self) -> Result<(), AgentError> {
        let health_server = self.health_server.take();
        let metrics_server = self.metrics_server.take();
        let _ = self.control.await;
        if let Some(k) = self.kube {
            let _ = k.await;
        }
        if let Some(s) = &self.syncer {
            // Sessions outlive the agent process; their latest changes go to the store first.
            s.sync_all(std::time::Duration::from_secs(10)).await;
        }
        if let Some(c) = self.cleanup {
            let _ = c.await;
        }
        if let Some(r) = self.reloader {
            let _ = r.await;
        }
        // Execs end at the shutdown (see `dataplane`), but a client may still hold a
        // stream open (an upload that never ends): the graceful stop gets a bound.
        let mut server = self.server;
        let served = match tokio::time::timeout(SERVER_STOP_TIMEOUT, &mut server).await {
            Ok(r) => r.map_err(|e| AgentError::Join(e.to_string())).and_then(|r| r.map_err(AgentError::from)),
            Err(_) => {
                tracing::warn!("calls still open {SERVER_STOP_TIMEOUT:?} after the shutdown; closing them");
                server.abort();
                Ok(())
            }
        };
        // Probes saw NOT_SERVING on the health listener until now.
        if let Some(listener) = health_server {
            listener.stop(SERVER_STOP_TIMEOUT).await;
        }
        if let Some(listener) = metrics_server {
            listener.stop(SERVER_STOP_TIMEOUT).await;
        }
        served
    }
}

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

/// Starts the runtime, the data plane and the control loop; returns once the
/// node has registered with the coordinators.
pub async fn serve(config: AgentConfig, shutdown: CancellationToken) -> Result<Agent, AgentError> {
    sandfleet_common::ids::validate_node_id(&config.node_id).map_err(|e| AgentError::Config(e.to_string()))?;
    if config.coordinators.is_empty() {
        return Err(AgentError::Config("at least one coordinator address is required".into()));
    }
    if config.slots == 0 {
        return Err(AgentError::Config("slots must be positive".into()));
    }
    let tls = match &config.tls {
        Some(files) => {
            let server = ServerTls::load(files.clone()).map_err(|e| AgentError::Config(e.to_string()))?;
            let identity = server.identity();
            if identity != Identity::new(IdentityKind::Agent, config.node_id.clone()) {
                return Err(AgentError::Config(format!(
                    "{} holds the identity {identity}; node {:?} needs the certificate agent/{} \
                     (sandfleet pki issue --kind agent --name {})",
                    files.cert.display(),
                    config.node_id,
                    config.node_id,
                    config.node_id
                )));
            }
            let client = ClientTls::load(files).map_err(|e| AgentError::Config(e.to_string()))?;
            tracing::info!(%identity, "mutual TLS toward the coordinators and on the data plane");
            Some((server, client))
        }
        None if !sandfleet_common::tls::is_loopback(&config.listen) => {
            return Err(AgentError::Config(sandfleet_common::tls::insecure_refusal(&config.listen)));
        }
        None => None,
    };
    let coordinator_tls = tls.as_ref().map(|(_, client)| client.dialer(Some(IdentityKind::Coordinator)));
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| AgentError::Config(format!("cannot create data dir {}: {e}", config.data_dir.display())))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|e| AgentError::Config(format!("cannot resolve data dir {}: {e}", config.data_dir.display())))?;
    // Before the runtime takes over (and cleans up) what the node id names on this host.
    let agent_lock = lock::AgentLock::acquire(&config.node_id, &data_dir)?;
    // The Kubernetes Node is read before anything starts: a missing config or an
    // unreadable Node is a startup error, and its labels and hold go with the registration.
    let kube = match &config.kube {
        None => None,
        Some(k) => {
            let client =
                kubernetes::client(std::env::var_os("KUBECONFIG"), std::env::var_os("KUBERNETES_SERVICE_HOST"))
                    .await
                    .map_err(AgentError::Config)?;
            let follower = kubernetes::NodeFollower::new(client, k, kubernetes::Timing::default());
            match follower.get_at_start(KUBE_START_PATIENCE, &shutdown).await {
                None => return Err(AgentError::Cancelled),
                Some(Err(e)) => {
                    return Err(AgentError::Kube(format!(
                        "cannot read this agent's Node (the service account needs get, watch and patch on nodes): {e}"
                    )))
                }
                Some(Ok(node)) => Some((follower, node)),
            }
        }
    };

    let runtime: Arc<dyn Runtime> = match config.runtime {
        RuntimeKind::Process => Arc::new(
            ProcessRuntime::new(ProcessRuntimeConfig {
                data_dir: data_dir.join("process"),
                node_id: config.node_id.clone(),
                uid_base: config.uid_base,
                slots: config.slots,
                bwrap_path: PathBuf::from("/usr/bin/bwrap"),
                disk_quota: config.disk_quota.clone(),
                executor_path: config.executor_path.clone().unwrap_or_else(runtime::process::locate_executor),
            })
            .await?,
        ),
        RuntimeKind::Docker => {
            let mut cfg = DockerRuntimeConfig::new(data_dir.join("docker"), config.node_id.clone());
            cfg.uid_base = config.uid_base;
            cfg.slots = config.slots;
            cfg.templates.extend(config.docker_templates.clone());
            cfg.warm_pool = config.warm_pool.clone();
            cfg.disk_quota = config.disk_quota.clone();
            Arc::new(DockerRuntime::new(cfg).await?)
        }
        RuntimeKind::Cri => {
            let mut cfg = CriRuntimeConfig::new(data_dir.join("cri"), config.node_id.clone());
            cfg.uid_base = config.uid_base;
            cfg.slots = config.slots;
            cfg.templates.extend(config.docker_templates.clone());
            cfg.warm_pool = config.warm_pool.clone();
            cfg.disk_quota = config.disk_quota.clone();
            Arc::new(CriRuntime::new(cfg, config.cri.clone()).await?)
        }
    };
    let (rt, stop) = (runtime.clone(), shutdown.clone());
    let cleanup = Some(AbortOnDropHandle::new(tokio::spawn(async move {
        stop.cancelled().await;
        if let Err(e) = rt.release().await {
            tracing::warn!(error = %e, "could not release the runtime's ready containers or filesystems at shutdown");
        }
    })));
    let syncer = match store::open(&config.store).await? {
        Some(store) => {
            tracing::info!(store = %store.describe(), "keeping workspaces in the store");
            Some(store::sync::Syncer::new(store, config.sync.clone(), shutdown.child_token()))
        }
        None => None,
    };
    let health = sandfleet_common::health::Health::new(&[
        pb::exec_service_server::SERVICE_NAME,
        pb::file_service_server::SERVICE_NAME,
    ])
    .await;
    let health_watch = AbortOnDropHandle::new(health.spawn_shutdown_watch(shutdown.clone()));
    let health_server = match config.health_listen {
        Some(at) => Some(
            sandfleet_common::health::Listener::bind(at, &health)
                .await
                .map_err(|source| AgentError::Bind { addr: at, source })?,
        ),
        None => None,
    };
    let mut state = AgentState::new(config.node_id.clone(), runtime);
    state.health = Some(health.clone());
    state.syncer = syncer.clone();
    state.coordinators = config.coordinators.clone();
    state.coordinator_tls = coordinator_tls.clone();
    let mut labels = config.labels.clone();
    if let Some((follower, node)) = &kube {
        let (from_node, skipped) = kubernetes::node_labels(node);
        for why in skipped {
            tracing::warn!(node = %follower.name(), "skipping a label of the Kubernetes Node: {why}");
        }
        let (merged, left_out) = kubernetes::merge_labels(&labels, &from_node);
        if !left_out.is_empty() {
            tracing::warn!(
                node = %follower.name(),
                ?left_out,
                "skipping labels of the Kubernetes Node: a node has at most {} labels",
                limits::MAX_LABELS
            );
        }
        labels = merged;
        state.hold.send_replace(follower.hold_of(node));
        tracing::info!(node = %follower.name(), labels = labels.len(), "following the Kubernetes Node");
    }
    let state = Arc::new(state);
    state.rediscover().await?;
    let observers = metrics::observe(&state);
    let metrics_server = match config.metrics_listen {
        Some(at) => Some(
            sandfleet_common::metrics::Listener::bind(at, health.clone())
                .await
                .map_err(|source| AgentError::Bind { addr: at, source })?,
        ),
        None => None,
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind { addr: config.listen, source })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let plane = dataplane::DataPlane::new(state.clone(), config.output_cap, shutdown.clone());
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .trace_fn(sandfleet_common::trace_context::server_span)
        .add_service(health.service())
        .add_service(
            pb::exec_service_server::ExecServiceServer::new(plane.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
        )
        .add_service(
            pb::file_service_server::FileServiceServer::new(plane).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES),
        );
    // Nagle off on accepted connections (the builder's `tcp_nodelay` only applies
    // to listeners tonic binds itself): small responses must not wait for a delayed ACK.
    let Serving { server, reloader } = spawn_server(server, listener, tls, shutdown.clone());

    // Under Kubernetes (the CRI runtime) the agent's pod is what the kubelet
    // accounts sessions to: its resource limits are the node's capacity.
    let (pod_cpu, pod_memory) = match config.runtime {
        RuntimeKind::Cri => runtime::cri::agent_pod_limits(),
        _ => (None, None),
    };
    let cpu_millis = match (config.cpu_millis, pod_cpu) {
        (0, Some(pod)) => pod,
        (0, None) => {
            let cores = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
            (cores * 1000.0 * config.cpu_overcommit.max(1.0)) as u32
        }
        (c, _) => c,
    };
    let memory_bytes = match (config.memory_bytes, pod_memory) {
        (0, Some(pod)) => pod,
        (0, None) => host_memory_bytes(),
        (m, _) => m,
    };
    let register = pb::RegisterNodeRequest {
        node_id: config.node_id.clone(),
        address: advertise,
        capacity: Some(pb::NodeCapacity { cpu_millis, memory_bytes, session_slots: config.slots }),
        labels,
        runtimes: vec![config.runtime.as_str().to_string()],
        hold: None,
        // Read from the runtime at each registration (`Control::register`).
        images: Vec::new(),
    };
    let mut control = Control::new(
        state.clone(),
        ControlConfig {
            coordinators: config.coordinators.clone(),
            register,
            tls: coordinator_tls,
            report_hold: kube.is_some(),
        },
    )?;
    let Some(interval) = control.register(&shutdown).await else {
        return Err(AgentError::Cancelled);
    };
    let control = AbortOnDropHandle::new(tokio::spawn(control.run(interval, shutdown.clone())));
    let kube = kube.map(|(follower, _)| {
        let (state, stop) = (state.clone(), shutdown.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            let count = {
                let state = state.clone();
                move || state.running_sessions()
            };
            tokio::join!(follower.clone().follow(&state.hold, stop.clone()), follower.annotate(count, stop));
        }))
    });
    tracing::info!(node = %config.node_id, %addr, "agent serving");
    Ok(Agent {
        addr,
        server,
        control,
        cleanup,
        reloader,
        kube,
        syncer,
        _health_watch: health_watch,
        health_server,
        metrics_server,
        _observers: observers,
        _lock: agent_lock,
    })
}
