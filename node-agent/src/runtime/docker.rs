//! The docker runtime: the [`ContainerRuntime`] on a Docker engine, through
//! bollard. A session's container is a plain container with the
//! [`Hardening`] rendered into its HostConfig ([`container_body`]); tini
//! (`init`) is its pid 1 and reaps. See [`crate::runtime::container`] for
//! everything the two container runtimes share.

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, ContainerUpdateBody, HostConfig, HostConfigLogConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListImagesOptions, RemoveContainerOptions,
};
use bollard::Docker;
use tracing::warn;

pub use super::container::hardening;
use super::container::hardening::{hardening, resources, ContainerPlan, Hardening};
use super::container::{with_deadline, ContainerRuntime, ContainerState, Engine, Listed, ENGINE_CALL_TIMEOUT};
pub use super::container::{ContainerRuntimeConfig as DockerRuntimeConfig, DEFAULT_IMAGE};
use super::fsutil::write_atomic;
use super::{ResolvedSpec, RuntimeError};

/// The docker runtime.
pub type DockerRuntime = ContainerRuntime<DockerEngine>;

/// Size of the container's own `/tmp` (each exec gets its own tmpfs `/tmp`
/// from bwrap).
pub const CONTAINER_TMP: &str = "rw,noexec,nosuid,nodev,size=64m";
/// json-file log cap.
pub const LOG_MAX_SIZE: &str = "10m";
/// json-file log files kept.
pub const LOG_MAX_FILE: &str = "3";

const ENGINE: &str = "docker engine";

impl ContainerRuntime<DockerEngine> {
    /// Connects to the local Docker engine and starts the runtime
    /// ([`ContainerRuntime::with_engine`]).
    pub async fn new(cfg: DockerRuntimeConfig) -> Result<Self, RuntimeError> {
        Self::with_engine(cfg, DockerEngine::connect().await?).await
    }

    /// The bollard client (tests inspect containers with it).
    pub fn docker(&self) -> &Docker {
        &self.engine().docker
    }
}

/// A Docker engine, reached through bollard.
pub struct DockerEngine {
    docker: Docker,
    /// The seccomp profile, given to the engine inline with every create.
    seccomp_json: String,
}

impl DockerEngine {
    /// Connects to the engine of `DOCKER_HOST` or the local socket.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| {
                RuntimeError::Unavailable(format!(
                    "cannot reach the Docker engine: {e} (is dockerd running? DOCKER_HOST?)"
                ))
            })?
            .with_timeout(ENGINE_CALL_TIMEOUT);
        let docker = match tokio::time::timeout(ENGINE_CALL_TIMEOUT, docker.negotiate_version()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                return Err(RuntimeError::Unavailable(format!(
                    "the Docker engine does not answer: {e} (is dockerd running?)"
                )))
            }
            Err(_) => return Err(RuntimeError::Unavailable("the Docker engine did not answer within 30 s".into())),
        };
        with_deadline(ENGINE, "ping", docker.ping()).await?;
        Ok(Self { docker, seccomp_json: String::new() })
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

/// Like [`with_deadline`], but a 404 is `Ok(None)`.
async fn call_opt<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<Option<T>, RuntimeError> {
    match with_deadline(ENGINE, what, async {
        match fut.await {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
    {
        Ok(v) => Ok(v),
        Err(e) => Err(e),
    }
}

/// The container create body: the [`Hardening`] of `plan` as a Docker HostConfig.
pub fn container_body(plan: &ContainerPlan<'_>, seccomp_json: &str) -> ContainerCreateBody {
    let h: Hardening = hardening(plan);
    let host = HostConfig {
        // Memory with memory+swap equal to it: no swap.
        memory: Some(h.memory_bytes),
        memory_swap: Some(h.memory_bytes),
        cpu_period: Some(h.cpu_period_us),
        cpu_quota: Some(h.cpu_quota_us),
        pids_limit: Some(h.pids_limit),
        network_mode: h.network_none.then(|| "none".to_string()),
        cap_drop: Some(h.cap_drop.iter().map(|c| c.to_string()).collect()),
        security_opt: Some(
            [
                h.no_new_privileges.then(|| "no-new-privileges:true".to_string()),
                Some(format!("seccomp={seccomp_json}")),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        readonly_rootfs: Some(h.read_only_root),
        tmpfs: Some(HashMap::from([("/tmp".to_string(), CONTAINER_TMP.to_string())])),
        binds: Some(h.binds.iter().map(|b| format!("{}:{}:rw", b.host.display(), b.container)).collect()),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_string()),
            config: Some(HashMap::from([
                ("max-size".to_string(), LOG_MAX_SIZE.to_string()),
                ("max-file".to_string(), LOG_MAX_FILE.to_string()),
            ])),
        }),
        // docker-init (tini) as pid 1 reaps every child.
        init: Some(true),
        ipc_mode: Some("private".to_string()),
        restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
        masked_paths: Some(h.masked_paths.iter().map(|p| p.to_string()).collect()),
        readonly_paths: Some(h.readonly_paths.iter().map(|p| p.to_string()).collect()),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(plan.image.clone()),
        user: Some(format!("{}:{}", h.uid, h.uid)),
        hostname: Some(h.hostname.to_string()),
        working_dir: Some(h.workdir.to_string()),
        cmd: Some(h.args.clone()),
        network_disabled: Some(h.network_none),
        labels: Some(plan.labels.clone()),
        env: Some(h.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        stop_timeout: Some(1),
        host_config: Some(host),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl Engine for DockerEngine {
    fn kind(&self) -> sandfleet_common::spec::Runtime {
        sandfleet_common::spec::Runtime::Docker
    }

    async fn init(&mut self, data_dir: &Path) -> Result<(), RuntimeError> {
        let profile = hardening::seccomp_profile();
        self.seccomp_json = profile.to_string();
        // For operators to read; the engine gets it inline.
        write_atomic(
            &data_dir.join("seccomp.json"),
            serde_json::to_string_pretty(&profile).unwrap_or_default().as_bytes(),
            0o644,
        )
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        if call_opt("inspecting the sandbox image", self.docker.inspect_image(image)).await?.is_none() {
            return Err(RuntimeError::Unavailable(format!(
                "sandbox image {image} is not present in the Docker engine; build it with {}",
                super::container::BUILD_IMAGE_HINT
            )));
        }
        Ok(())
    }

    async fn run(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError> {
        let body = container_body(plan, &self.seccomp_json);
        let created = with_deadline(
            ENGINE,
            "creating the container",
            self.docker.create_container(
                Some(CreateContainerOptions { name: Some(plan.name.to_string()), ..Default::default() }),
                body,
            ),
        )
        .await?;
        for w in &created.warnings {
            // An option the engine did not apply is a hardening gap: say so loudly.
            warn!(container = %plan.name, warning = %w, "the Docker engine warned about the container configuration");
        }
        with_deadline(ENGINE, "starting the container", self.docker.start_container(plan.name, None)).await
    }

    async fn start_again(&self, plan: &ContainerPlan<'_>) -> Result<(), RuntimeError> {
        with_deadline(ENGINE, "starting the container", self.docker.start_container(plan.name, None)).await
    }

    async fn state(&self, name: &str) -> Result<Option<ContainerState>, RuntimeError> {
        let c = call_opt("inspecting the container", self.docker.inspect_container(name, None)).await?;
        Ok(c.map(|c| {
            let st = c.state.unwrap_or_default();
            ContainerState { running: st.running == Some(true), exit_code: st.exit_code.unwrap_or(-1) }
        }))
    }

    /// Where the engine put the container: read from its init's
    /// `/proc/PID/cgroup` (the engine's cgroup driver decides the path). This
    /// assumes the agent shares the host's cgroup namespace, as it must to
    /// manage cgroups; a container that is not running has none.
    async fn cgroup(&self, name: &str) -> Option<String> {
        let c = call_opt("inspecting the container", self.docker.inspect_container(name, None)).await.ok()??;
        let pid = c.state.and_then(|s| s.pid).filter(|p| *p > 0)?;
        let text = tokio::fs::read_to_string(format!("/proc/{pid}/cgroup")).await.ok()?;
        super::cgroup::proc_cgroup_path(&text).map(|p| p.trim_start_matches('/').to_string())
    }

    async fn update(&self, name: &str, limits: &ResolvedSpec) -> Result<(), RuntimeError> {
        let (memory, period, quota, pids) = resources(limits);
        // Raising memory must raise memory+swap first and lowering must lower memory first;
        // the engine applies both in the right order when given together.
        let body = ContainerUpdateBody {
            memory: Some(memory),
            memory_swap: Some(memory),
            cpu_period: Some(period),
            cpu_quota: Some(quota),
            pids_limit: Some(pids),
            ..Default::default()
        };
        with_deadline(ENGINE, "updating the container's limits", self.docker.update_container(name, body)).await
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        call_opt(
            "removing a container",
            self.docker
                .remove_container(name, Some(RemoveContainerOptions { force: true, v: true, ..Default::default() })),
        )
        .await?;
        Ok(())
    }

    async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        let list = with_deadline(ENGINE, "listing images", self.docker.list_images(None::<ListImagesOptions>)).await?;
        // An untagged image is listed as "<none>:<none>": it has no name to advertise.
        Ok(list.into_iter().flat_map(|i| i.repo_tags).filter(|t| !t.starts_with("<none>")).collect())
    }

    async fn list(&self, node_id: &str) -> Result<Vec<Listed>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{}={node_id}", hardening::LABEL_NODE)])]);
        let list = with_deadline(
            ENGINE,
            "listing this node's containers",
            self.docker.list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            })),
        )
        .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c.names.as_ref()?.first()?.trim_start_matches('/').to_string();
                Some(Listed {
                    name,
                    labels: c.labels.unwrap_or_default(),
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }

    fn logs_hint(&self, name: &str) -> String {
        format!("docker logs {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::container::hardening::tests::{limits, plan};
    use crate::runtime::container::hardening::{EXECUTOR_PIDS_HEADROOM, LABEL_NODE};

    #[test]
    fn body_has_every_hardening_option() {
        let l = limits();
        let b = container_body(&plan(&l), "{}");
        let h = b.host_config.unwrap();
        assert_eq!(h.memory, h.memory_swap);
        assert_eq!(h.cpu_quota, Some(50_000));
        assert_eq!(h.pids_limit, Some(64 + i64::from(EXECUTOR_PIDS_HEADROOM)));
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.init, Some(true));
        assert!(h.security_opt.unwrap().contains(&"no-new-privileges:true".to_string()));
        assert_eq!(b.user.as_deref(), Some("200001:200001"));
        assert_eq!(b.labels.unwrap().get(LABEL_NODE).map(String::as_str), Some("n"));
    }
}
