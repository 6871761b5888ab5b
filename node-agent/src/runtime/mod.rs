//! Sandbox runtimes: where and how a session's commands run.
//!
//! The agent drives every backend through the [`Runtime`] trait: `prepare`
//! a session (idempotent), `exec` commands in it, `destroy` it, `list` what
//! survived an agent restart, and reach its files through
//! [`Runtime::workspace`]. The command-running semantics (streaming, timeout,
//! output cap) live in [`crate::exec`] and are shared by every backend.
//!
//! # Layout
//! - [`process`]: the bubblewrap + cgroups backend ([`process::ProcessRuntime`]).
//! - [`container`]: a hardened container per session, bubblewrap inside it, over an [`container::Engine`]:
//!   - [`docker`]: the Docker engine ([`docker::DockerRuntime`]);
//!   - [`cri`]: the node's CRI socket, as a kubelet drives it ([`cri::CriRuntime`]).
//! - [`cgroup`]: cgroup v1 / v2 management behind one enum.
//! - [`seccomp`]: the seccomp BPF filter every sandboxed process runs under.
//! - [`disk`]: a filesystem of its quota's size per session (disk and inode quotas).
//! - [`bwrap`]: building the bubblewrap argv.
//! - [`usage`]: what the sandboxes use (CPU time, memory), summed per node.

pub mod bwrap;
pub mod cgroup;
pub mod container;
pub mod cri;
pub mod disk;
pub mod docker;
mod fsutil;
pub mod process;
pub mod seccomp;
pub mod usage;

/// A session a runtime must run: which placement, and the spec as the
/// cluster assigned it. The runtime takes the sandbox part of the spec
/// through [`resolve_spec`] (the one definition in [`sandfleet_common::spec`]),
/// so a new spec field reaches a runtime without being copied here.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The session id (a lowercase hyphenated UUID).
    pub session_id: String,
    /// Placement generation; the agent runs only the newest.
    pub generation: u64,
    /// The session's spec (zero values mean the defaults).
    pub spec: sandfleet_proto::v1::SessionSpec,
}

/// A [`SandboxSpec`] checked against the limits, with defaults filled in:
/// the one definition in [`sandfleet_common::spec`].
pub use sandfleet_common::spec::SandboxSpec as ResolvedSpec;
use sandfleet_common::spec::Template;

/// Checks a sandbox spec and fills in its defaults, with the checks every
/// Sandfleet component shares ([`ResolvedSpec::resolve`]); then checks that
/// `runtime` offers its template (`offers`). Shared by every backend.
pub fn resolve_spec(
    spec: &SandboxSpec,
    runtime: sandfleet_common::spec::Runtime,
    offers: impl Fn(Template) -> bool,
) -> Result<ResolvedSpec, RuntimeError> {
    let r = ResolvedSpec::from_proto(&spec.spec)?;
    if !r.image.is_empty() && !sandfleet_common::spec::IMAGE_RUNTIMES.contains(&runtime) {
        return Err(RuntimeError::InvalidArgument(format!("the {runtime} runtime cannot run image {}", r.image)));
    }
    if !offers(r.template) {
        return Err(RuntimeError::InvalidArgument(format!(
            "template {} is not offered by the {runtime} runtime of this node",
            r.template
        )));
    }
    Ok(r)
}

// The exec types belong to `crate::exec`, which owns exec semantics; they are
// part of the `Runtime` interface, hence re-exported here.
pub use crate::exec::{Command, ExecEvent, ExecSpec, ExitInfo, Language};

/// A session a runtime holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session id.
    pub session_id: String,
    /// The generation it was last prepared with.
    pub generation: u64,
}

/// What a runtime call could not do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The session was never prepared here (or was destroyed).
    #[error("session {0} not found on this node")]
    NotFound(String),
    /// The request is malformed; the text says which.
    #[error("{0}")]
    InvalidArgument(String),
    /// A spec field is malformed or out of its range (the shared checks of
    /// `sandfleet_common::spec`).
    #[error(transparent)]
    Validation(#[from] sandfleet_common::ValidationError),
    /// The node cannot run sandboxes right now (bwrap missing, cgroups not writable, no free slot).
    #[error("{0}")]
    Unavailable(String),
    /// A workspace file operation failed.
    #[error(transparent)]
    Workspace(#[from] crate::workspace::FsError),
    /// An I/O error.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// The session has no disk quota to report on (quotas are off on this
    /// node, or the session predates them).
    #[error("{0}")]
    NoQuota(String),
    /// A bug or an unexpected state.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::exec::ExecError> for RuntimeError {
    fn from(e: crate::exec::ExecError) -> Self {
        match e {
            crate::exec::ExecError::InvalidArgument(m) => RuntimeError::InvalidArgument(m),
            crate::exec::ExecError::Validation(v) => RuntimeError::Validation(v),
            crate::exec::ExecError::Workspace(fs) => RuntimeError::Workspace(fs),
        }
    }
}

impl From<crate::exec::ExecError> for tonic::Status {
    fn from(e: crate::exec::ExecError) -> Self {
        RuntimeError::from(e).into()
    }
}

impl From<RuntimeError> for tonic::Status {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            RuntimeError::InvalidArgument(_) => tonic::Status::invalid_argument(e.to_string()),
            RuntimeError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
            RuntimeError::NoQuota(_) => tonic::Status::failed_precondition(e.to_string()),
            RuntimeError::Validation(v) => v.into(),
            RuntimeError::Workspace(fs) => fs.into(),
            RuntimeError::Io(_) | RuntimeError::Internal(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

/// A sandbox backend.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The runtime this backend is, as reported to coordinators.
    fn kind(&self) -> sandfleet_common::spec::Runtime;
    /// The OCI images this runtime holds and can run for a cluster template
    /// (advertised to the coordinators); none for a runtime that runs no images.
    async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    /// Idempotent: creates the session's cgroup (limits set), its workspace
    /// dir and its uid. Calling again with the same id and a higher
    /// generation updates the recorded generation.
    async fn prepare(&self, spec: &SandboxSpec) -> Result<(), RuntimeError>;
    /// Runs one command in the session's sandbox, sending output chunks
    /// (<= OUTPUT_CHUNK_BYTES each) to `out` as they are read, and returns how
    /// it ended. If `out` is closed (caller went away) the command is killed.
    /// NotFound if not prepared.
    async fn exec(
        &self,
        session_id: &str,
        spec: ExecSpec,
        out: tokio::sync::mpsc::Sender<ExecEvent>,
    ) -> Result<ExitInfo, RuntimeError>;
    /// Kills every process of the session and refuses new execs, but keeps
    /// its workspace on disk (for a last sync to the workspace store);
    /// [`Runtime::destroy`] removes the rest. Idempotent (Ok if absent).
    async fn stop(&self, session_id: &str) -> Result<(), RuntimeError>;
    /// Kills every process of the session, removes its cgroup(s) and its
    /// workspace dir. Idempotent (Ok if absent).
    async fn destroy(&self, session_id: &str) -> Result<(), RuntimeError>;
    /// The sessions this runtime holds on disk/cgroups (rediscovery after an
    /// agent restart).
    async fn list(&self) -> Result<Vec<SessionInfo>, RuntimeError>;
    /// The session's workspace, for the file API. NotFound if not prepared.
    fn workspace(&self, session_id: &str) -> Result<crate::workspace::Workspace, RuntimeError>;
    /// Releases what the runtime keeps ready for sessions to come (warm
    /// containers, ready filesystems) at a clean shutdown; sessions stay.
    async fn release(&self) -> Result<(), RuntimeError>;
    /// How much of its disk quota the session uses. NotFound if not
    /// prepared; [`RuntimeError::NoQuota`] when it has no quota.
    fn disk_usage(&self, session_id: &str) -> Result<disk::DiskUsage, RuntimeError>;
    /// What this runtime's sandboxes use now, summed: their memory, and the
    /// CPU time they used since the agent started, which never decreases
    /// (ended sandboxes' time stays in it, see [`usage::UsageMeter`]). The
    /// one definition behind the heartbeat's `NodeUsage` and the agent's
    /// sandbox CPU and memory gauges. A sandbox whose cgroup cannot be read
    /// counts with what was last read of it; what a runtime cannot measure
    /// at all is 0 (its implementation says which).
    async fn usage(&self) -> usage::Usage;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        let s: tonic::Status = RuntimeError::NotFound("x".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "session x not found on this node");
        let s: tonic::Status = RuntimeError::InvalidArgument("bad".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: tonic::Status = RuntimeError::Unavailable("no bwrap".into()).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let s: tonic::Status = RuntimeError::Workspace(crate::workspace::FsError::TooLarge { limit: 5 }).into();
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        let s: tonic::Status = RuntimeError::Internal("bug".into()).into();
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
