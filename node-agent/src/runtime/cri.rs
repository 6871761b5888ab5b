//! The CRI runtime: the [`ContainerRuntime`] on the node's CRI socket
//! (containerd), driven as a kubelet drives it. A session's box is a pod
//! sandbox with one container, the executor: `RunPodSandbox` →
//! `CreateContainer` → `StartContainer`, and `StopPodSandbox` →
//! `RemovePodSandbox` (which removes the container) on the way out.
//!
//! The [`Hardening`] of [`crate::runtime::container::hardening`] is rendered
//! into the pod sandbox and container configs ([`pod_config`],
//! [`container_config`]): the session's uid and gid, no capabilities,
//! `no_new_privs`, a read-only root, the OCI-format seccomp profile as a
//! `Localhost` profile, memory equal to memory + swap, the CPU quota, and
//! the pid, ipc and network namespaces of the pod (the pause process is pid
//! 1 and reaps). CRI has no per-container pids limit: like a kubelet, the
//! agent makes the pod's cgroup itself (`<cgroup parent>/<box>`), writes
//! `pids.max` there, and removes it after `RemovePodSandbox` (containerd
//! leaves pod cgroups behind). Labels carry the node, box and session, so a
//! restarted agent finds its sandboxes with `ListPodSandbox`.
//!
//! CRI cannot start an exited container again: [`Engine::start_again`]
//! replaces the pod sandbox (the workspace is on the host and survives).
//!
//! **Never the kubelet's CRI.** A kubelet terminates every running pod
//! sandbox of its CRI runtime that it does not know (its housekeeping,
//! "Clean up orphaned pod containers", every 2 s), so sessions' sandboxes
//! on the kubelet's own containerd would be killed at once. The agent drives
//! a containerd of its own on the node (the DaemonSet runs it in the agent's
//! pod, see docs/kubernetes.md) and refuses a CRI runtime that holds
//! kubelet-made sandboxes ([`kubelet_managed`]).
//!
//! The cgroup parent must be a cgroupfs path (containerd's
//! `SystemdCgroup = false`); under Kubernetes it defaults to the agent
//! pod's own cgroup, so the kubelet counts sessions once, against the agent
//! pod, and never removes them while the agent pod lives (docs/kubernetes.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::cgroup::AnyCgroupManager;
use super::container::hardening::{self, hardening, resources, ContainerPlan, Hardening, LABEL_BOX, LABEL_NODE};
pub use super::container::ContainerRuntimeConfig as CriRuntimeConfig;
use super::container::{with_deadline, ContainerRuntime, ContainerState, Engine, Listed, ENGINE_CALL_TIMEOUT};
use super::fsutil::{create_dir, io_ctx, write_atomic};
use super::{ResolvedSpec, RuntimeError};

/// The CRI runtime.
pub type CriRuntime = ContainerRuntime<CriEngine>;

/// The socket of the node's dedicated containerd for sessions (the
/// DaemonSet runs it beside the agent; never the kubelet's, see
/// [`kubelet_managed`]).
pub const DEFAULT_ENDPOINT: &str = "unix:///run/sandfleet/containerd/containerd.sock";
/// The label a kubelet puts on every pod sandbox it makes.
pub const KUBELET_POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// The CRI namespace (`PodSandboxMetadata.namespace`) of session sandboxes.
pub const POD_NAMESPACE: &str = "sandfleet";
/// The container's name in its pod sandbox.
const CONTAINER_NAME: &str = "executor";
/// Session containers are the first to go when the node runs out of memory.
const OOM_SCORE_ADJ: i64 = 1000;
/// The name of the sessions' cgroup under the agent pod's cgroup.
const SESSIONS_CGROUP: &str = "sandfleet-sessions";

const ENGINE: &str = "CRI runtime";

/// When images are pulled through CRI's ImageService.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Never: a missing image is an error (images are imported offline).
    #[default]
    Never,
    /// Pulled when missing.
    IfNotPresent,
}

/// How to reach and use the CRI runtime.
#[derive(Debug, Clone)]
pub struct CriConfig {
    /// `unix:///path/to/socket`.
    pub endpoint: String,
    /// CRI runtime handler for session sandboxes (gVisor, Kata, ...); empty: the default.
    pub runtime_handler: String,
    /// Image pull policy.
    pub pull_policy: PullPolicy,
    /// cgroupfs path under which each sandbox gets its pod cgroup; `None`:
    /// [`SESSIONS_CGROUP`] under the agent pod's own cgroup ([`default_cgroup_parent`]).
    pub cgroup_parent: Option<String>,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            runtime_handler: String::new(),
            pull_policy: PullPolicy::Never,
            cgroup_parent: None,
        }
    }
}

impl ContainerRuntime<CriEngine> {
    /// Connects to the CRI socket and starts the runtime
    /// ([`ContainerRuntime::with_engine`]).
    pub async fn new(cfg: CriRuntimeConfig, cri: CriConfig) -> Result<Self, RuntimeError> {
        Self::with_engine(cfg, CriEngine::connect(cri).await?).await
    }
}

/// The path of a `unix://` endpoint.
fn socket_path(endpoint: &str) -> Result<PathBuf, RuntimeError> {
    let path = endpoint.strip_prefix("unix://").ok_or_else(|| {
        RuntimeError::InvalidArgument(format!("invalid CRI endpoint {endpoint:?}: expected unix:///path/to/socket"))
    })?;
    if !path.starts_with('/') {
        return Err(RuntimeError::InvalidArgument(format!(
            "invalid CRI endpoint {endpoint:?}: the socket path must be absolute"
        )));
    }
    Ok(PathBuf::from(path))
}

/// The agent's own cgroup (cgroupfs path) as `/proc/self/cgroup` says: the
/// v2 line, else the v1 memory hierarchy's.
fn own_cgroup() -> Result<String, RuntimeError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| io_ctx("reading /proc/self/cgroup", e))?;
    super::cgroup::proc_cgroup_path(&text)
        .ok_or_else(|| RuntimeError::Unavailable("no memory or v2 cgroup in /proc/self/cgroup".into()))
}

/// The default cgroup parent of session sandboxes: [`SESSIONS_CGROUP`]
/// beside the agent's container, under its pod's cgroup; so the kubelet
/// counts sessions against the agent pod, once. A systemd slice cannot be
/// used (set the parent explicitly with containerd's cgroupfs driver).
pub fn default_cgroup_parent() -> Result<String, RuntimeError> {
    let own = own_cgroup()?;
    let pod = Path::new(&own).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into());
    if own.ends_with(".scope") || pod.ends_with(".slice") {
        return Err(RuntimeError::InvalidArgument(format!(
            "the agent runs in the systemd cgroup {own}; the CRI runtime needs containerd's cgroupfs driver \
             and an explicit --cri-cgroup-parent"
        )));
    }
    Ok(format!("{}/{SESSIONS_CGROUP}", pod.trim_end_matches('/')))
}

/// CPU (millicores) and memory (bytes) limits of the cgroup `rel`, when it
/// has any: the agent pod's resource limits under Kubernetes.
pub fn cgroup_limits(rel: &str) -> (Option<u32>, Option<u64>) {
    let rel = rel.trim_start_matches('/');
    let root = Path::new(super::cgroup::CGROUP_ROOT);
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let (cpu, mem) = if root.join("cgroup.controllers").exists() {
        let cpu = read(root.join(rel).join("cpu.max")).and_then(|s| {
            let (q, p) = s.split_once(' ')?;
            Some((q.parse::<i64>().ok()?, p.parse::<i64>().ok()?))
        });
        (cpu, read(root.join(rel).join("memory.max")).and_then(|s| s.parse::<u64>().ok()))
    } else {
        let q = read(root.join("cpu").join(rel).join("cpu.cfs_quota_us")).and_then(|s| s.parse::<i64>().ok());
        let p = read(root.join("cpu").join(rel).join("cpu.cfs_period_us")).and_then(|s| s.parse::<i64>().ok());
        let mem = read(root.join("memory").join(rel).join("memory.limit_in_bytes")).and_then(|s| s.parse::<u64>().ok());
        (q.zip(p), mem)
    };
    let cpu = cpu.filter(|(q, p)| *q > 0 && *p > 0).and_then(|(q, p)| u32::try_from(q * 1000 / p).ok());
    // v1 reports "no limit" as a huge page-aligned number.
    let mem = mem.filter(|m| *m < (1u64 << 60));
    (cpu, mem)
}

/// The CPU and memory limits of the agent's pod (the parent of its own
/// cgroup), when it has them: the node's capacity under Kubernetes.
pub fn agent_pod_limits() -> (Option<u32>, Option<u64>) {
    let Ok(own) = own_cgroup() else { return (None, None) };
    match Path::new(&own).parent() {
        Some(pod) if pod != Path::new("/") => cgroup_limits(&pod.to_string_lossy()),
        _ => (None, None),
    }
}

/// The first pod sandbox a kubelet made (`namespace/name`), if any: then the
/// CRI runtime is a kubelet's, which kills every sandbox it does not know.
pub fn kubelet_managed(pods: &[cri::PodSandbox]) -> Option<String> {
    pods.iter()
        .find(|p| p.labels.contains_key(KUBELET_POD_UID_LABEL))
        .map(|p| p.metadata.as_ref().map(|m| format!("{}/{}", m.namespace, m.name)).unwrap_or_else(|| p.id.clone()))
}

/// The pod sandbox config of a box.
pub fn pod_config(
    plan: &ContainerPlan<'_>,
    h: &Hardening,
    cgroup_parent: &str,
    log_dir: &Path,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: plan.name.to_string(),
            uid: plan.name.to_string(),
            namespace: POD_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: h.hostname.to_string(),
        log_directory: log_dir.display().to_string(),
        labels: plan.labels.clone(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{cgroup_parent}/{}", plan.name),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                run_as_user: Some(cri::Int64Value { value: i64::from(h.uid) }),
                run_as_group: Some(cri::Int64Value { value: i64::from(h.uid) }),
                readonly_rootfs: h.read_only_root,
                privileged: false,
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Network, pid and ipc namespaces of the pod: the executor is not pid 1,
/// the pause process is, and reaps.
fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// The container resources of `limits`: memory + swap equal to memory (no swap).
fn container_resources(limits: &ResolvedSpec) -> cri::LinuxContainerResources {
    let (memory, period, quota, _pids) = resources(limits);
    cri::LinuxContainerResources {
        cpu_period: period,
        cpu_quota: quota,
        memory_limit_in_bytes: memory,
        memory_swap_limit_in_bytes: memory,
        oom_score_adj: OOM_SCORE_ADJ,
        ..Default::default()
    }
}

/// The container config of a box: the [`Hardening`] for CRI.
pub fn container_config(plan: &ContainerPlan<'_>, h: &Hardening, seccomp_path: &Path) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: CONTAINER_NAME.to_string(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: plan.image.clone(), ..Default::default() }),
        // The image's entrypoint is the executor.
        command: vec![],
        args: h.args.clone(),
        working_dir: h.workdir.to_string(),
        envs: h.env.iter().map(|(k, v)| cri::KeyValue { key: k.to_string(), value: v.to_string() }).collect(),
        mounts: h
            .binds
            .iter()
            .map(|b| cri::Mount {
                container_path: b.container.to_string(),
                host_path: b.host.display().to_string(),
                readonly: false,
                propagation: cri::MountPropagation::PropagationPrivate as i32,
                ..Default::default()
            })
            .collect(),
        labels: plan.labels.clone(),
        log_path: format!("{CONTAINER_NAME}.log"),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(container_resources(plan.limits)),
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    drop_capabilities: h.cap_drop.iter().map(|c| c.to_string()).collect(),
                    ..Default::default()
                }),
                privileged: false,
                namespace_options: Some(namespaces()),
                run_as_user: Some(cri::Int64Value { value: i64::from(h.uid) }),
                run_as_group: Some(cri::Int64Value { value: i64::from(h.uid) }),
                readonly_rootfs: h.read_only_root,
                no_new_privs: h.no_new_privileges,
                masked_paths: h.masked_paths.iter().map(|p| p.to_string()).collect(),
                readonly_paths: h.readonly_paths.iter().map(|p| p.to_string()).collect(),
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: seccomp_path.display().to_string(),
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// A CRI runtime (containerd), reached over its Unix socket.
pub struct CriEngine {
    cfg: CriConfig,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    cgroups: AnyCgroupManager,
    /// The cgroupfs parent of the pod cgroups.
    cgroup_parent: String,
    /// Set by `init`.
    seccomp_path: PathBuf,
    logs_dir: PathBuf,
}

impl CriEngine {
    /// Connects to the socket and checks that the runtime answers.
    pub async fn connect(cfg: CriConfig) -> Result<Self, RuntimeError> {
        let path = socket_path(&cfg.endpoint)?;
        let cgroup_parent = match &cfg.cgroup_parent {
            Some(p) if p.starts_with('/') && !p.contains("..") => p.trim_end_matches('/').to_string(),
            Some(p) => {
                return Err(RuntimeError::InvalidArgument(format!(
                    "invalid CRI cgroup parent {p:?}: expected an absolute cgroupfs path"
                )))
            }
            None => default_cgroup_parent()?,
        };
        let cgroups = AnyCgroupManager::detect()?;
        cgroups.ensure_root(cgroup_parent.trim_start_matches('/'))?;
        let channel = sandfleet_common::grpc::unix_channel(path, ENGINE_CALL_TIMEOUT).await.map_err(|e| {
            RuntimeError::Unavailable(format!(
                "cannot reach the CRI runtime at {}: {e} (is containerd running with its CRI plugin?)",
                cfg.endpoint
            ))
        })?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let v = with_deadline(ENGINE, "Version", runtime.version(cri::VersionRequest { version: "v1".into() }))
            .await?
            .into_inner();
        let status =
            with_deadline(ENGINE, "Status", runtime.status(cri::StatusRequest { verbose: false })).await?.into_inner();
        let not_ready: Vec<String> = status
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .filter(|c| !c.status)
            .map(|c| format!("{} ({}: {})", c.r#type, c.reason, c.message))
            .collect();
        if !not_ready.is_empty() {
            return Err(RuntimeError::Unavailable(format!("the CRI runtime is not ready: {}", not_ready.join("; "))));
        }
        let pods = with_deadline(
            ENGINE,
            "ListPodSandbox",
            runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
        )
        .await?
        .into_inner()
        .items;
        if let Some(pod) = kubelet_managed(&pods) {
            return Err(RuntimeError::Unavailable(format!(
                "the CRI runtime at {} is a kubelet's (it holds the pod sandbox of {pod}): the kubelet kills every \
                 sandbox it did not make, so sessions cannot run there; give the agent a containerd of its own \
                 (docs/kubernetes.md, \"The sessions' containerd\")",
                cfg.endpoint
            )));
        }
        info!(runtime = %v.runtime_name, version = %v.runtime_version, api = %v.runtime_api_version, %cgroup_parent, handler = %cfg.runtime_handler, "connected to the CRI runtime");
        Ok(Self {
            runtime,
            images: ImageServiceClient::new(channel),
            cgroups,
            cgroup_parent,
            cfg,
            seccomp_path: PathBuf::new(),
            logs_dir: PathBuf::new(),
        })
    }

    /// The pod cgroup of a box, relative to the cgroup root.
    fn pod_cgroup(&self, name: &str) -> String {
        format!("{}/{name}", self.cgroup_parent.trim_start_matches('/'))
    }

    /// The pod sandboxes of a box (normally one).
    async fn pods_of(&self, name: &str) -> Result<Vec<cri::PodSandbox>, RuntimeError> {
        let filter = cri::PodSandboxFilter {
            label_selector: HashMap::from([(LABEL_BOX.to_string(), name.to_string())]),
            ..Default::default()
        };
        let mut c = self.runtime.clone();
        Ok(with_deadline(
            ENGINE,
            "listing pod sandboxes",
            c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) }),
        )
        .await?
        .into_inner()
        .items)
    }

    /// The containers of a box, newest first.
    async fn containers_of(&self, name: &str) -> Result<Vec<cri::Container>, RuntimeError> {
        let filter = cri::ContainerFilter {
            label_selector: HashMap::from([(LABEL_BOX.to_string(), name.to_string())]),
            ..Default::default()
        };
        let mut c = self.runtime.clone();
        let mut list = with_deadline(
            ENGINE,
            "listing containers",
            c.list_containers(cri::ListContainersRequest { filter: Some(filter) }),
        )
        .await?
        .into_inner()
        .containers;
        list.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok(list)
    }

    /// Removes the pod cgroup of a box in every hierarchy that has it
    /// (containerd makes it in every v1 controller and removes none).
    fn remove_pod_cgroup(&self, name: &str) {
        let rel = self.pod_cgroup(name);
        let root = Path::new(super::cgroup::CGROUP_ROOT);
        let mut dirs = vec![root.join(&rel)];
        if let Ok(rd) = std::fs::read_dir(root) {
            dirs.extend(rd.flatten().map(|e| e.path().join(&rel)));
        }
        for d in dirs {
            if !d.is_dir() {
                continue;
            }
            // Deepest first: container cgroups containerd left behind, then the pod's.
            let mut subs: Vec<PathBuf> = std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            subs.push(d.clone());
            for s in subs {
                if let Err(e) = std::fs::remove_dir(&s) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(cgroup = %s.display(), error = %e, "cannot remove a pod cgroup");
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Engine for CriEngine {
    fn kind(&self) -> sandfleet_common::spec::Runtime {
        sandfleet_common::spec::Runtime::Cri
    }

    /// The pod cgroup the agent made for the box (its containers are under it).
    async fn cgroup(&self, name: &str) -> Option<String> {
        Some(self.pod_cgroup(name))
    }

    async fn init(&mut self, data_dir: &Path) -> Result<(), RuntimeError> {
        // containerd reads a Localhost profile as OCI `LinuxSeccomp` JSON.
        self.seccomp_path = data_dir.join("seccomp.oci.json");
        let profile = hardening::oci_seccomp_profile();
        write_atomic(&self.seccomp_path, serde_json::to_string_pretty(&profile).unwrap_or_default().as_bytes(), 0o644)?;
        self.logs_dir = data_dir.join("logs");
        create_dir(&self.logs_dir, 0o700, None)
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        let spec = cri::ImageSpec { image: image.to_string(), ..Default::default() };
        let mut images = self.images.clone();
        let st = with_deadline(
            ENGINE,
            "ImageStatus",
            images.image_status(cri::ImageStatusRequest { image: Some(spec.clone()), verbose: false }),
        )
        .await?
        .into_inner();
        if st.image.is_some() {
            return Ok(());
        }
        match self.cfg.pull_policy {
            PullPolicy::Never => Err(RuntimeError::Unavailable(format!(
                "sandbox image {image} is not in the CRI runtime's image store and --image-pull-policy is never; \
                 build it with {} and import it: docker save IMAGE | ctr -n k8s.io images import -",
                super::container::BUILD_IMAGE_HINT
            ))),
            PullPolicy::IfNotPresent => {
                info!(%image, "pulling the sandbox image");
                with_deadline(
                    ENGINE,
                    &format!("pulling {image}"),
                    images.pull_image(cri::PullImageRequest { image: Some(spec), ..Default::default() }),
                )
                .await?;
                Ok(())
            }
        }
    }

    async fn run(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError> {
        let h = hardening(plan);
        // The pod cgroup first, with the pids limit CRI has no field for.
        let rel = self.pod_cgroup(plan.name);
        self.cgroups.create(&rel).map_err(|e| io_ctx(format!("creating the pod cgroup {rel}"), e))?;
        let pids = u64::try_from(h.pids_limit).unwrap_or(u64::MAX);
        self.cgroups.set_pids_max(&rel, pids).map_err(|e| io_ctx(format!("setting pids.max of {rel}"), e))?;
        let log_dir = self.logs_dir.join(plan.name);
        create_dir(&log_dir, 0o700, None)?;
        let pod = pod_config(plan, &h, &self.cgroup_parent, &log_dir);
        let mut c = self.runtime.clone();
        let started = std::time::Instant::now();
        let pod_id = with_deadline(
            ENGINE,
            "RunPodSandbox",
            c.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: self.cfg.runtime_handler.clone(),
            }),
        )
        .await?
        .into_inner()
        .pod_sandbox_id;
        let pod_ms = started.elapsed().as_secs_f64() * 1000.0;
        let config = container_config(plan, &h, &self.seccomp_path);
        let id = with_deadline(
            ENGINE,
            "CreateContainer",
            c.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod),
            }),
        )
        .await?
        .into_inner()
        .container_id;
        let created_ms = started.elapsed().as_secs_f64() * 1000.0;
        with_deadline(
            ENGINE,
            "StartContainer",
            c.start_container(cri::StartContainerRequest { container_id: id.clone() }),
        )
        .await?;
        let started_ms = started.elapsed().as_secs_f64() * 1000.0;
        debug!(box_name = %plan.name, pod = %pod_id, container = %id, pod_ms, created_ms, started_ms, "pod sandbox running");
        Ok(())
    }

    async fn start_again(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError> {
        self.remove(plan.name).await?;
        self.run(plan).await
    }

    async fn state(&self, name: &str) -> Result<Option<ContainerState>, RuntimeError> {
        let Some(c) = self.containers_of(name).await?.into_iter().next() else {
            return Ok(if self.pods_of(name).await?.is_empty() {
                None
            } else {
                Some(ContainerState { running: false, exit_code: -1 })
            });
        };
        if c.state == cri::ContainerState::ContainerRunning as i32 {
            return Ok(Some(ContainerState { running: true, exit_code: 0 }));
        }
        let mut rt = self.runtime.clone();
        let exit_code = with_deadline(
            ENGINE,
            "ContainerStatus",
            rt.container_status(cri::ContainerStatusRequest { container_id: c.id, verbose: false }),
        )
        .await
        .ok()
        .and_then(|r| r.into_inner().status)
        .map_or(-1, |s| i64::from(s.exit_code));
        Ok(Some(ContainerState { running: false, exit_code }))
    }

    async fn update(&self, name: &str, limits: &ResolvedSpec) -> Result<(), RuntimeError> {
        let (_, _, _, pids) = resources(limits);
        let rel = self.pod_cgroup(name);
        self.cgroups
            .set_pids_max(&rel, u64::try_from(pids).unwrap_or(u64::MAX))
            .map_err(|e| io_ctx(format!("setting pids.max of {rel}"), e))?;
        let mut c = self.runtime.clone();
        for ctr in self.containers_of(name).await? {
            with_deadline(
                ENGINE,
                "UpdateContainerResources",
                c.update_container_resources(cri::UpdateContainerResourcesRequest {
                    container_id: ctr.id,
                    linux: Some(container_resources(limits)),
                    ..Default::default()
                }),
            )
            .await?;
        }
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime.clone();
        for pod in self.pods_of(name).await? {
            // Stop kills the pod's processes; remove takes its containers with it.
            with_deadline(
                ENGINE,
                "StopPodSandbox",
                c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() }),
            )
            .await?;
            with_deadline(
                ENGINE,
                "RemovePodSandbox",
                c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.id }),
            )
            .await?;
        }
        self.remove_pod_cgroup(name);
        let log_dir = self.logs_dir.join(name);
        if log_dir.starts_with(&self.logs_dir) && log_dir != self.logs_dir {
            let _ = std::fs::remove_dir_all(log_dir);
        }
        Ok(())
    }

    async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        let mut images = self.images.clone();
        let list = with_deadline(ENGINE, "ListImages", images.list_images(cri::ListImagesRequest { filter: None }))
            .await?
            .into_inner();
        Ok(list.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    async fn list(&self, node_id: &str) -> Result<Vec<Listed>, RuntimeError> {
        let mut c = self.runtime.clone();
        let selector = HashMap::from([(LABEL_NODE.to_string(), node_id.to_string())]);
        let pods = with_deadline(
            ENGINE,
            "listing this node's pod sandboxes",
            c.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter { label_selector: selector.clone(), ..Default::default() }),
            }),
        )
        .await?
        .into_inner()
        .items;
        let containers = with_deadline(
            ENGINE,
            "listing this node's containers",
            c.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter { label_selector: selector, ..Default::default() }),
            }),
        )
        .await?
        .into_inner()
        .containers;
        Ok(pods
            .into_iter()
            .filter_map(|p| {
                let name = p.labels.get(LABEL_BOX)?.clone();
                let running = p.state == cri::PodSandboxState::SandboxReady as i32
                    && containers
                        .iter()
                        .any(|c| c.pod_sandbox_id == p.id && c.state == cri::ContainerState::ContainerRunning as i32);
                Some(Listed { name, labels: p.labels, running })
            })
            .collect())
    }

    fn logs_hint(&self, name: &str) -> String {
        format!("crictl logs $(crictl ps -a -q --label {LABEL_BOX}={name}), or {}/{name}", self.logs_dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::hardening::tests::{limits, plan};
    use crate::runtime::container::hardening::EXECUTOR_PIDS_HEADROOM;

    #[test]
    fn configs_carry_every_hardening_option() {
        let l = limits();
        let p = plan(&l);
        let h = hardening(&p);
        let pod = pod_config(&p, &h, "/parent", Path::new("/logs/b"));
        let linux = pod.linux.as_ref().unwrap();
        assert_eq!(linux.cgroup_parent, format!("/parent/{}", p.name));
        let ns = linux.security_context.as_ref().unwrap().namespace_options.as_ref().unwrap();
        assert_eq!((ns.network, ns.pid, ns.ipc), (0, 0, 0), "pod namespaces");
        assert_eq!(pod.labels, p.labels);

        let c = container_config(&p, &h, Path::new("/d/seccomp.oci.json"));
        let lc = c.linux.unwrap();
        let r = lc.resources.unwrap();
        assert_eq!(r.memory_limit_in_bytes, r.memory_swap_limit_in_bytes, "no swap");
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 50_000));
        let s = lc.security_context.unwrap();
        assert_eq!(s.capabilities.unwrap().drop_capabilities, vec!["ALL".to_string()]);
        assert!(s.no_new_privs && s.readonly_rootfs && !s.privileged);
        assert_eq!(s.run_as_user.unwrap().value, 200_001);
        assert_eq!(s.run_as_group.unwrap().value, 200_001);
        let sc = s.seccomp.unwrap();
        assert_eq!(sc.profile_type, cri::security_profile::ProfileType::Localhost as i32);
        assert_eq!(sc.localhost_ref, "/d/seccomp.oci.json");
        assert_eq!(s.namespace_options.unwrap().pid, cri::NamespaceMode::Pod as i32);
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.args, h.args);
        assert_eq!(h.pids_limit, 64 + i64::from(EXECUTOR_PIDS_HEADROOM));
    }

    #[test]
    fn a_kubelets_cri_is_refused() {
        let ours = cri::PodSandbox {
            labels: HashMap::from([(LABEL_NODE.to_string(), "n".to_string())]),
            ..Default::default()
        };
        assert_eq!(kubelet_managed(std::slice::from_ref(&ours)), None);
        let kubelets = cri::PodSandbox {
            metadata: Some(cri::PodSandboxMetadata {
                name: "sandfleet-agent-x2".into(),
                namespace: "sandfleet".into(),
                ..Default::default()
            }),
            labels: HashMap::from([(KUBELET_POD_UID_LABEL.to_string(), "0b1c".to_string())]),
            ..Default::default()
        };
        assert_eq!(kubelet_managed(&[ours, kubelets]).as_deref(), Some("sandfleet/sandfleet-agent-x2"));
    }

    #[test]
    fn endpoint_must_be_an_absolute_unix_socket() {
        assert_eq!(socket_path("unix:///run/c.sock").unwrap(), PathBuf::from("/run/c.sock"));
        for bad in ["/run/c.sock", "tcp://1.2.3.4:1", "unix://run/c.sock"] {
            assert!(matches!(socket_path(bad), Err(RuntimeError::InvalidArgument(_))), "{bad}");
        }
    }
}
