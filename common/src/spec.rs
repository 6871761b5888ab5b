//! One definition of a session spec: the runtimes and templates the cluster
//! offers, the defaults, and every range check.
//!
//! The coordinator resolves a client's `SessionSpec` with
//! [`SessionSpec::from_proto`] once per create and stores the result in Raft;
//! the node agent resolves the sandbox part of an assignment with
//! [`SandboxSpec::resolve`]; the SDK runs the same checks before it sends a
//! create. So one bad value gets one status code wherever it is caught:
//!
//! - a value outside its documented range (too small or too large) is
//!   `OUT_OF_RANGE` ([`ValidationError::OverLimit`]);
//! - a malformed or unknown value (a bad name, an unknown template or runtime,
//!   a CPU request above the CPU limit) is `INVALID_ARGUMENT`
//!   ([`ValidationError::Invalid`]).
//!
//! The limits themselves live in [`crate::limits`] and are documented beside
//! each field in `proto/sandfleet/v1/sandfleet.proto`.
//!
//! Adding a spec field means: the proto field, its default and check here
//! (in [`SessionSpec::from_proto`] and [`SessionSpec::to_proto`]), and the one
//! place that acts on it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use sandfleet_proto::v1 as pb;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{self, ValidationError};
use crate::limits;

/// A sandbox runtime a node agent can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Runtime {
    /// bubblewrap plus cgroups on the host (the embedded default).
    #[default]
    Process,
    /// A hardened container per session through the Docker engine, bubblewrap inside it.
    Docker,
    /// A pod sandbox and a hardened container per session through the node's
    /// CRI socket (containerd), as a kubelet drives it; bubblewrap inside it.
    Cri,
}

impl Runtime {
    /// Every runtime, in the order error messages list them.
    pub const ALL: [Runtime; 3] = [Runtime::Process, Runtime::Docker, Runtime::Cri];

    /// The name on the wire and on command lines.
    pub const fn as_str(self) -> &'static str {
        match self {
            Runtime::Process => "process",
            Runtime::Docker => "docker",
            Runtime::Cri => "cri",
        }
    }

    /// The names of every runtime, for help texts and errors.
    pub fn names() -> String {
        names(&Self::ALL)
    }
}

/// A template: what is installed in a sandbox and what it runs by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Template {
    /// Python 3, Node.js and bash.
    #[default]
    Default,
    /// The same sandbox, named for Python work.
    Python,
    /// The same sandbox, named for Node.js work.
    Node,
    /// The same sandbox, named for shell work.
    Bash,
}

impl Template {
    /// Every template, in the order error messages list them.
    pub const ALL: [Template; 4] = [Template::Default, Template::Python, Template::Node, Template::Bash];

    /// The name on the wire and on command lines.
    pub const fn as_str(self) -> &'static str {
        match self {
            Template::Default => "default",
            Template::Python => "python",
            Template::Node => "node",
            Template::Bash => "bash",
        }
    }

    /// The runtimes that offer this template.
    pub const fn runtimes(self) -> &'static [Runtime] {
        &Runtime::ALL
    }

    /// The names of every template, for help texts and errors.
    pub fn names() -> String {
        names(&Self::ALL)
    }
}

fn names<T: fmt::Display>(all: &[T]) -> String {
    all.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

macro_rules! named_enum {
    ($ty:ident, $field:literal, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    ValidationError::invalid(
                        $field,
                        format!(
                            concat!("unknown ", $what, " {:?}; use one of {}"),
                            s.chars().take(64).collect::<String>(),
                            Self::names()
                        ),
                    )
                })
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_enum!(Runtime, "runtime", "runtime");
named_enum!(Template, "template", "template");

/// Parses a template name as a client gives it: empty means [`Template::Default`].
pub fn parse_template(s: &str) -> Result<Template, ValidationError> {
    if s.is_empty() {
        return Ok(Template::Default);
    }
    ids::validate_template(s)?;
    s.parse()
}

/// An OCI image reference, checked and normalized as the Docker and
/// containerd tools read it (`alpine` is `docker.io/library/alpine:latest`),
/// so a template's image and the images nodes advertise compare as strings.
pub fn normalize_image(field: &'static str, image: &str) -> Result<String, ValidationError> {
    if image.len() > limits::MAX_IMAGE_REF_BYTES {
        return Err(ValidationError::over(field, format!("{} bytes", limits::MAX_IMAGE_REF_BYTES), image.len()));
    }
    oci_spec::distribution::Reference::from_str(image).map(|r| r.whole()).map_err(|e| {
        ValidationError::invalid(
            field,
            format!("{:?} is not an OCI image reference: {e}", image.chars().take(64).collect::<String>()),
        )
    })
}

/// The runtimes that run OCI images: a session whose template names an image runs only in these.
pub const IMAGE_RUNTIMES: &[Runtime] = &[Runtime::Docker, Runtime::Cri];

/// Parses a runtime name as a client gives it: empty means any runtime.
pub fn parse_runtime(s: &str) -> Result<Option<Runtime>, ValidationError> {
    if s.is_empty() {
        Ok(None)
    } else {
        s.parse().map(Some)
    }
}

/// What a runtime needs to build a session's sandbox: resolved (defaults
/// filled in) and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The template.
    pub template: Template,
    /// CPU limit in millicores.
    pub cpu_millis: u32,
    /// Memory limit in bytes (swap never allowed).
    pub memory_bytes: u64,
    /// Maximum processes and threads.
    pub pids_limit: u32,
    /// Environment given to every exec.
    pub env: BTreeMap<String, String>,
    /// Disk quota in bytes. 0 in specs recorded before quotas existed (such a
    /// session keeps the disk it had).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Inode quota. 0 in specs recorded before quotas existed.
    #[serde(default)]
    pub disk_inodes: u64,
    /// The OCI image to run, normalized; empty: the runtime's image for `template`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
}

impl Default for SandboxSpec {
    /// An all-defaults sandbox.
    fn default() -> Self {
        Self {
            template: Template::Default,
            cpu_millis: limits::DEFAULT_CPU_MILLIS,
            memory_bytes: limits::DEFAULT_MEMORY_BYTES,
            pids_limit: limits::DEFAULT_PIDS_LIMIT,
            env: BTreeMap::new(),
            disk_bytes: limits::DEFAULT_DISK_BYTES,
            disk_inodes: default_disk_inodes(limits::DEFAULT_DISK_BYTES),
            image: String::new(),
        }
    }
}

/// The inode quota of a disk quota that gives none: one per
/// [`limits::DEFAULT_DISK_BYTES_PER_INODE`] bytes, within the inode range.
pub fn default_disk_inodes(disk_bytes: u64) -> u64 {
    (disk_bytes / limits::DEFAULT_DISK_BYTES_PER_INODE).clamp(limits::MIN_DISK_INODES, limits::MAX_DISK_INODES)
}

/// The disk and inode quotas, checked, with their defaults.
pub fn resolve_disk(disk_bytes: u64, disk_inodes: u64) -> Result<(u64, u64), ValidationError> {
    let disk_bytes = in_range(
        "disk_bytes",
        or_default(disk_bytes, limits::DEFAULT_DISK_BYTES),
        limits::MIN_DISK_BYTES,
        limits::MAX_DISK_BYTES,
        "bytes",
    )?;
    let disk_inodes = match disk_inodes {
        0 => default_disk_inodes(disk_bytes),
        n => in_range(
            "disk_inodes",
            n,
            limits::MIN_DISK_INODES,
            (disk_bytes / limits::MIN_DISK_BYTES_PER_INODE).min(limits::MAX_DISK_INODES),
            "inodes (at most one per 4096 bytes of disk_bytes)",
        )?,
    };
    Ok((disk_bytes, disk_inodes))
}

impl SandboxSpec {
    /// Checks the sandbox fields of a spec and fills in their defaults (a zero
    /// or empty value takes the default).
    pub fn resolve(
        template: &str,
        cpu_millis: u32,
        memory_bytes: u64,
        pids_limit: u32,
        env: impl IntoIterator<Item = (String, String)>,
        disk: (u64, u64),
    ) -> Result<Self, ValidationError> {
        let template = parse_template(template)?;
        let cpu_millis = in_range(
            "cpu_millis",
            or_default(cpu_millis, limits::DEFAULT_CPU_MILLIS),
            limits::MIN_CPU_MILLIS,
            limits::MAX_CPU_MILLIS,
            "mCPU",
        )?;
        let memory_bytes = in_range(
            "memory_bytes",
            or_default(memory_bytes, limits::DEFAULT_MEMORY_BYTES),
            limits::MIN_MEMORY_BYTES,
            limits::MAX_MEMORY_BYTES,
            "bytes",
        )?;
        let pids_limit = in_range(
            "pids_limit",
            or_default(pids_limit, limits::DEFAULT_PIDS_LIMIT),
            limits::MIN_PIDS_LIMIT,
            limits::MAX_PIDS_LIMIT,
            "processes",
        )?;
        let env: BTreeMap<String, String> = env.into_iter().collect();
        ids::validate_env("env", &env)?;
        let (disk_bytes, disk_inodes) = resolve_disk(disk.0, disk.1)?;
        Ok(Self { template, cpu_millis, memory_bytes, pids_limit, env, disk_bytes, disk_inodes, image: String::new() })
    }

    /// The sandbox part of a wire spec, checked: what an agent gets in an
    /// assignment ([`SessionSpec::sandbox_proto`]), its image included.
    pub fn from_proto(spec: &pb::SessionSpec) -> Result<Self, ValidationError> {
        let mut sandbox = Self::resolve(
            &spec.template,
            spec.cpu_millis,
            spec.memory_bytes,
            spec.pids_limit,
            spec.env.iter().map(|(k, v)| (k.clone(), v.clone())),
            (spec.disk_bytes, spec.disk_inodes),
        )?;
        if !spec.image.is_empty() {
            sandbox.image = normalize_image("image", &spec.image)?;
        }
        Ok(sandbox)
    }
}

/// Bounds that depend on the cluster's settings rather than on constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterBounds {
    /// The smallest non-zero `restart_policy.lost_after_ms` (three agent
    /// heartbeats and a margin); 0 when the caller does not know it (the SDK).
    pub min_lost_after_ms: u64,
}

/// A session's spec as the cluster stores it: every default filled in and
/// every field checked. The Raft log and snapshots hold it as JSON with these
/// field names, so fields are only ever added, with `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// The built-in template the sandbox starts from (for a session of a
    /// cluster template, that template's base).
    pub template: Template,
    /// The cluster template the session was created from ([`crate::template`]);
    /// empty for a session of the built-in `template`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template_name: String,
    /// The OCI image it runs, normalized, from its cluster template; empty:
    /// the runtime's image for `template`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// CPU limit in millicores.
    pub cpu_millis: u32,
    /// CPU reserved on the node for placement, in millicores; at most
    /// `cpu_millis`. 0 in entries written before the field existed, which
    /// reserved their whole limit (see [`SessionSpec::cpu_reserved_millis`]).
    #[serde(default)]
    pub cpu_request_millis: u32,
    /// Memory limit in bytes (swap never allowed); also what placement reserves.
    pub memory_bytes: u64,
    /// Maximum processes and threads.
    pub pids_limit: u32,
    /// Environment given to every exec.
    pub env: BTreeMap<String, String>,
    /// Labels for selection and listing.
    pub labels: BTreeMap<String, String>,
    /// Time to live in seconds, from creation and from each renewal.
    pub ttl_seconds: u64,
    /// Node labels a node must carry to run the session.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// The runtime it must run in; `None` = any that offers the template.
    #[serde(default, with = "optional_runtime")]
    pub runtime: Option<Runtime>,
    /// End the session after this long without data-plane use; 0 = never.
    #[serde(default)]
    pub idle_timeout_seconds: u64,
    /// Node silence after which the session is LOST; 0 = the node TTL.
    #[serde(default)]
    pub lost_after_ms: u64,
    /// Placements allowed after losses; 0 = unlimited.
    #[serde(default)]
    pub max_attempts: u32,
    /// Delay before the first placement after a loss; doubles per loss.
    #[serde(default)]
    pub backoff_ms: u64,
    /// Disk quota in bytes; 0 in entries written before quotas existed (the
    /// default applies to them).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Inode quota; 0 in entries written before quotas existed.
    #[serde(default)]
    pub disk_inodes: u64,
}

impl Default for SessionSpec {
    /// An all-defaults spec, as an empty wire spec resolves to.
    fn default() -> Self {
        Self::from_proto(pb::SessionSpec::default(), &ClusterBounds::default())
            .expect("the default spec satisfies every check")
    }
}

impl SessionSpec {
    /// Checks a client's spec of a built-in template and fills in its
    /// defaults. Changes nothing; the error names the field and the rule. (A
    /// cluster template's spec comes from [`crate::template::TemplateRecord::apply`].)
    pub fn from_proto(spec: pb::SessionSpec, bounds: &ClusterBounds) -> Result<Self, ValidationError> {
        if !spec.image.is_empty() {
            return Err(ValidationError::invalid(
                "image",
                "is read only: a session runs the image of its template (create a template with the image and name it)",
            ));
        }
        let sandbox = SandboxSpec::from_proto(&spec)?;
        let runtime = parse_runtime(&spec.runtime)?;
        if let Some(r) = runtime {
            if !sandbox.template.runtimes().contains(&r) {
                return Err(ValidationError::invalid(
                    "runtime",
                    format!("the {r} runtime does not offer template {}", sandbox.template),
                ));
            }
        }
        let cpu_request_millis = match spec.cpu_request_millis {
            // Kubernetes' rule: a request defaults to the limit when only the
            // limit is given; with neither, the cluster's default request.
            0 if spec.cpu_millis == 0 => limits::DEFAULT_CPU_REQUEST_MILLIS.min(sandbox.cpu_millis),
            0 => sandbox.cpu_millis,
            r if r > sandbox.cpu_millis => {
                return Err(ValidationError::invalid(
                    "cpu_request_millis",
                    format!("{r} mCPU is more than the CPU limit cpu_millis ({} mCPU)", sandbox.cpu_millis),
                ));
            }
            r => in_range("cpu_request_millis", r, limits::MIN_CPU_MILLIS, limits::MAX_CPU_MILLIS, "mCPU")?,
        };
        let ttl_seconds = in_range(
            "ttl_seconds",
            or_default(spec.ttl_seconds, limits::DEFAULT_TTL_SECONDS),
            1,
            limits::MAX_TTL_SECONDS,
            "seconds",
        )?;
        ids::validate_labels("labels", &spec.labels)?;
        ids::validate_labels("node_selector", &spec.node_selector)?;
        let idle_timeout_seconds =
            in_range("idle_timeout_seconds", spec.idle_timeout_seconds, 0, limits::MAX_TTL_SECONDS, "seconds")?;
        let policy = spec.restart_policy.unwrap_or_default();
        let lost_after_ms = match policy.lost_after_ms {
            0 => 0,
            ms => in_range(
                "restart_policy.lost_after_ms",
                ms,
                bounds.min_lost_after_ms.max(1),
                limits::MAX_LOST_AFTER_MS,
                "ms (0 means the cluster's node TTL; the least is three agent heartbeats and a margin)",
            )?,
        };
        let max_attempts =
            in_range("restart_policy.max_attempts", policy.max_attempts, 0, limits::MAX_RESTART_ATTEMPTS, "attempts")?;
        let backoff_ms =
            in_range("restart_policy.backoff_ms", policy.backoff_ms, 0, limits::MAX_RESTART_BACKOFF_MS, "ms")?;
        let SandboxSpec { template, cpu_millis, memory_bytes, pids_limit, env, disk_bytes, disk_inodes, image: _ } =
            sandbox;
        Ok(Self {
            template,
            template_name: String::new(),
            image: String::new(),
            cpu_millis,
            cpu_request_millis,
            memory_bytes,
            pids_limit,
            env,
            labels: spec.labels.into_iter().collect(),
            ttl_seconds,
            node_selector: spec.node_selector.into_iter().collect(),
            runtime,
            idle_timeout_seconds,
            lost_after_ms,
            max_attempts,
            backoff_ms,
            disk_bytes,
            disk_inodes,
        })
    }

    /// The checks a client runs before it sends a create, without the
    /// cluster's templates: the spec of a built-in template is checked whole;
    /// for a cluster template's name, the name's syntax and every value the
    /// spec sets (the server then applies the template and its allowed
    /// overrides). Returns the spec as checked.
    pub fn precheck(spec: &pb::SessionSpec, bounds: &ClusterBounds) -> Result<Self, ValidationError> {
        let mut spec = spec.clone();
        if !spec.template.is_empty() && !Template::ALL.iter().any(|t| t.as_str() == spec.template) {
            ids::validate_template(&spec.template)?;
            spec.template = String::new();
        }
        Self::from_proto(spec, bounds)
    }

    /// The spec for the wire, every default shown, named by the template the
    /// session was created from.
    pub fn to_proto(&self) -> pb::SessionSpec {
        pb::SessionSpec { template: self.template_shown().to_string(), image: self.image.clone(), ..self.base_proto() }
    }

    /// The name of the template the session was created from.
    pub fn template_shown(&self) -> &str {
        if self.template_name.is_empty() {
            self.template.as_str()
        } else {
            &self.template_name
        }
    }

    /// The spec as an agent runs it: the built-in template it starts from and its image.
    pub fn sandbox_proto(&self) -> pb::SessionSpec {
        pb::SessionSpec { image: self.image.clone(), ..self.base_proto() }
    }

    /// The spec of its built-in template, without an image: what
    /// [`SessionSpec::from_proto`] takes back unchanged but for the two.
    pub fn base_proto(&self) -> pb::SessionSpec {
        let policy = self.lost_after_ms != 0 || self.max_attempts != 0 || self.backoff_ms != 0;
        pb::SessionSpec {
            template: self.template.to_string(),
            image: String::new(),
            cpu_millis: self.cpu_millis,
            cpu_request_millis: self.cpu_reserved_millis(),
            memory_bytes: self.memory_bytes,
            pids_limit: self.pids_limit,
            env: self.env.clone().into_iter().collect(),
            labels: self.labels.clone().into_iter().collect(),
            ttl_seconds: self.ttl_seconds,
            node_selector: self.node_selector.clone().into_iter().collect(),
            runtime: self.runtime.map(|r| r.to_string()).unwrap_or_default(),
            idle_timeout_seconds: self.idle_timeout_seconds,
            restart_policy: policy.then_some(pb::RestartPolicy {
                lost_after_ms: self.lost_after_ms,
                max_attempts: self.max_attempts,
                backoff_ms: self.backoff_ms,
            }),
            disk_bytes: self.disk().0,
            disk_inodes: self.disk().1,
        }
    }

    /// The disk and inode quotas; the defaults for an entry written before quotas existed.
    pub fn disk(&self) -> (u64, u64) {
        if self.disk_bytes == 0 {
            (limits::DEFAULT_DISK_BYTES, default_disk_inodes(limits::DEFAULT_DISK_BYTES))
        } else {
            (self.disk_bytes, self.disk_inodes)
        }
    }

    /// The sandbox part.
    pub fn sandbox(&self) -> SandboxSpec {
        SandboxSpec {
            template: self.template,
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            pids_limit: self.pids_limit,
            env: self.env.clone(),
            disk_bytes: self.disk().0,
            disk_inodes: self.disk().1,
            image: self.image.clone(),
        }
    }

    /// The CPU placement reserves on a node for this session.
    pub fn cpu_reserved_millis(&self) -> u32 {
        if self.cpu_request_millis == 0 {
            self.cpu_millis
        } else {
            self.cpu_request_millis
        }
    }

    /// The runtimes the session may run in: the one it names, or any offering
    /// its template (only container runtimes for an image).
    pub fn runtimes(&self) -> &'static [Runtime] {
        match self.runtime {
            Some(Runtime::Process) => &[Runtime::Process],
            Some(Runtime::Docker) => &[Runtime::Docker],
            Some(Runtime::Cri) => &[Runtime::Cri],
            None if !self.image.is_empty() => IMAGE_RUNTIMES,
            None => self.template.runtimes(),
        }
    }

    /// The names of the fields in which `other` differs from `self`, in wire
    /// order; empty when the two are the same.
    pub fn differing_fields(&self, other: &SessionSpec) -> Vec<&'static str> {
        let (a, b) = (self.normalized(), other.normalized());
        let mut out = Vec::new();
        macro_rules! cmp {
            ($($f:ident => $name:literal),* $(,)?) => { $( if a.$f != b.$f { out.push($name); } )* };
        }
        cmp!(
            template => "template",
            template_name => "template",
            image => "image",
            cpu_millis => "cpu_millis",
            cpu_request_millis => "cpu_request_millis",
            memory_bytes => "memory_bytes",
            pids_limit => "pids_limit",
            env => "env",
            labels => "labels",
            ttl_seconds => "ttl_seconds",
            node_selector => "node_selector",
            idle_timeout_seconds => "idle_timeout_seconds",
            lost_after_ms => "restart_policy.lost_after_ms",
            max_attempts => "restart_policy.max_attempts",
            backoff_ms => "restart_policy.backoff_ms",
            runtime => "runtime",
            disk_bytes => "disk_bytes",
            disk_inodes => "disk_inodes",
        );
        out.dedup();
        out
    }

    /// The same spec with a stored zero request written as the limit it stood for.
    fn normalized(&self) -> SessionSpec {
        let (disk_bytes, disk_inodes) = self.disk();
        SessionSpec { cpu_request_millis: self.cpu_reserved_millis(), disk_bytes, disk_inodes, ..self.clone() }
    }
}

/// The label every replica of a batch carries: `sandfleet.io/batch=<batch id>`.
pub const BATCH_LABEL: &str = "sandfleet.io/batch";
/// Label keys under this prefix are the cluster's own; clients cannot set them.
pub const RESERVED_LABEL_PREFIX: &str = "sandfleet.io/";

/// Refuses labels under [`RESERVED_LABEL_PREFIX`] (INVALID_ARGUMENT), so no
/// client can make a session look like a member of a batch.
pub fn check_reserved_labels<'a>(
    field: &'static str,
    mut keys: impl Iterator<Item = &'a String>,
) -> Result<(), ValidationError> {
    match keys.find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
        Some(k) => Err(ValidationError::invalid(
            field,
            format!("label key {k:?} is under the reserved prefix {RESERVED_LABEL_PREFIX:?}"),
        )),
        None => Ok(()),
    }
}

/// What one replica of a batch changes in the batch's spec (OpenSandbox's
/// `shardTaskPatches`): its env and labels are merged over the spec's, a key
/// here replacing the spec's value. Stored in the batch's Raft entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPatch {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ReplicaPatch {
    /// The patch from the wire (checked with the spec it patches, by [`check_batch`]).
    pub fn from_proto(p: &pb::ReplicaPatch) -> Self {
        ReplicaPatch {
            env: p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// Keys and values in bytes, counted against [`limits::MAX_BATCH_PATCH_BYTES`].
    pub fn bytes(&self) -> usize {
        self.env.iter().chain(&self.labels).map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl SessionSpec {
    /// Replica `spec` of batch `batch_id`: this spec with `patch` merged over
    /// it and the batch label added. The one definition of a replica's spec,
    /// used when the batch is checked and when it is applied.
    pub fn patched(&self, patch: Option<&ReplicaPatch>, batch_id: &str) -> SessionSpec {
        let mut spec = self.clone();
        if let Some(p) = patch {
            spec.env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            spec.labels.extend(p.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        spec.labels.insert(BATCH_LABEL.to_string(), batch_id.to_string());
        spec
    }
}

/// Checks a batch of `count` replicas of `spec` (already resolved by
/// [`SessionSpec::from_proto`]) with `patches`: the count (0 is
/// INVALID_ARGUMENT, above [`limits::MAX_BATCH_REPLICAS`] OUT_OF_RANGE), no
/// more patches than replicas, their total size, no reserved label, and each
/// patched spec against every rule of a spec ([`ValidationError::InPatch`]
/// names the replica). Returns the patches as stored.
pub fn check_batch(
    spec: &SessionSpec,
    count: u32,
    patches: &[pb::ReplicaPatch],
    bounds: &ClusterBounds,
) -> Result<Vec<ReplicaPatch>, ValidationError> {
    if count == 0 {
        return Err(ValidationError::invalid("count", "a batch needs at least 1 replica"));
    }
    if count > limits::MAX_BATCH_REPLICAS {
        return Err(ValidationError::out_of_range(
            "count",
            format!("1..={} replicas", limits::MAX_BATCH_REPLICAS),
            count,
        ));
    }
    if patches.len() > count as usize {
        return Err(ValidationError::invalid(
            "patches",
            format!("{} patches for {count} replicas: patch {count} and later have no replica", patches.len()),
        ));
    }
    check_reserved_labels("labels", spec.labels.keys())?;
    let patches: Vec<ReplicaPatch> = patches.iter().map(ReplicaPatch::from_proto).collect();
    let bytes: usize = patches.iter().map(ReplicaPatch::bytes).sum();
    if bytes > limits::MAX_BATCH_PATCH_BYTES {
        return Err(ValidationError::over(
            "patches",
            format!("{} bytes of keys and values in all", limits::MAX_BATCH_PATCH_BYTES),
            bytes,
        ));
    }
    // A placeholder id of the real one's length: the batch label is checked with the rest.
    let placeholder = "00000000-0000-0000-0000-000000000000";
    SessionSpec::from_proto(spec.patched(None, placeholder).base_proto(), bounds)?;
    for (index, patch) in patches.iter().enumerate() {
        let in_patch = |e: ValidationError| ValidationError::InPatch { index, source: Box::new(e) };
        check_reserved_labels("labels", patch.labels.keys()).map_err(in_patch)?;
        // The replica's spec must pass every check a spec passes, and mean the
        // same after the round trip (nothing the patch set was dropped).
        let replica = spec.patched(Some(patch), placeholder);
        let checked = SessionSpec::from_proto(replica.base_proto(), bounds).map_err(in_patch)?;
        debug_assert_eq!(checked.env, replica.env);
    }
    Ok(patches)
}

/// A zero means the default.
fn or_default<T: PartialEq + Default>(v: T, default: T) -> T {
    if v == T::default() {
        default
    } else {
        v
    }
}

/// `v` when it lies in `min..=max`; otherwise OUT_OF_RANGE naming the range.
fn in_range<T>(field: &'static str, v: T, min: T, max: T, unit: &str) -> Result<T, ValidationError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if v < min || v > max {
        Err(ValidationError::out_of_range(field, format!("{min}..={max} {unit}"), v))
    } else {
        Ok(v)
    }
}

/// `runtime` is stored as its name, "" for any.
mod optional_runtime {
    use super::*;

    pub fn serialize<S: Serializer>(r: &Option<Runtime>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.map(Runtime::as_str).unwrap_or(""))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Runtime>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // Entries from before the runtime list was typed may name a runtime
        // that never existed ("kubernetes"); such a session could never be
        // placed. It is read as "any runtime" rather than failing the log.
        Ok(parse_runtime(&s).unwrap_or(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(env: &[(&str, &str)], labels: &[(&str, &str)]) -> pb::ReplicaPatch {
        pb::ReplicaPatch {
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn batches_are_checked_whole_with_the_spec_rules() {
        let b = ClusterBounds::default();
        let base = SessionSpec::from_proto(pb::SessionSpec::default(), &b).unwrap();
        let code = |count: u32, patches: &[pb::ReplicaPatch]| {
            tonic::Status::from(check_batch(&base, count, patches, &b).unwrap_err()).code()
        };
        assert_eq!(code(0, &[]), tonic::Code::InvalidArgument);
        assert_eq!(code(limits::MAX_BATCH_REPLICAS + 1, &[]), tonic::Code::OutOfRange);
        assert_eq!(code(1, &[patch(&[], &[]), patch(&[], &[])]), tonic::Code::InvalidArgument);
        // A bad key, a reserved label, and too many labels once merged: each names its replica.
        let e = check_batch(&base, 3, &[patch(&[], &[]), patch(&[("1BAD", "x")], &[])], &b).unwrap_err();
        assert!(matches!(e, ValidationError::InPatch { index: 1, .. }), "{e}");
        assert!(e.to_string().starts_with("patches[1]: invalid env"), "{e}");
        let e = check_batch(&base, 1, &[patch(&[], &[("sandfleet.io/batch", "x")])], &b).unwrap_err();
        assert_eq!(tonic::Status::from(e.clone()).code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("reserved prefix"), "{e}");
        let many: Vec<(String, String)> = (0..limits::MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let e = check_batch(&base, 1, &[patch(&[], &many)], &b).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::OutOfRange, "64 labels and the batch label are 65");
        let big = "x".repeat(limits::MAX_ENV_VALUE_BYTES);
        let patches: Vec<pb::ReplicaPatch> = (0..40).map(|_| patch(&[("V", &big)], &[])).collect();
        assert_eq!(code(40, &patches), tonic::Code::OutOfRange, "more than 1 MiB of patches");
        // A good batch: patches kept in order, merged over the spec by `patched`.
        let spec = SessionSpec::from_proto(
            pb::SessionSpec { env: [("A".into(), "1".into())].into(), ..Default::default() },
            &b,
        )
        .unwrap();
        let stored = check_batch(&spec, 3, &[patch(&[("A", "2"), ("B", "3")], &[("shard", "0")])], &b).unwrap();
        assert_eq!(stored.len(), 1);
        let r0 = spec.patched(stored.first(), "b1");
        assert_eq!((r0.env["A"].as_str(), r0.env["B"].as_str(), r0.labels["shard"].as_str()), ("2", "3", "0"));
        assert_eq!(r0.labels[BATCH_LABEL], "b1");
        let r2 = spec.patched(stored.get(2), "b1");
        assert_eq!((r2.env.len(), r2.labels.len()), (1, 1), "an unpatched replica has the spec and the batch label");
    }

    fn spec() -> pb::SessionSpec {
        pb::SessionSpec::default()
    }

    fn resolve(s: pb::SessionSpec) -> Result<SessionSpec, ValidationError> {
        SessionSpec::from_proto(s, &ClusterBounds { min_lost_after_ms: 3500 })
    }

    fn code(r: Result<SessionSpec, ValidationError>) -> tonic::Code {
        tonic::Status::from(r.expect_err("must be refused")).code()
    }

    #[test]
    fn defaults_fill_every_zero_field() {
        let s = resolve(spec()).unwrap();
        assert_eq!(s.template, Template::Default);
        assert_eq!(s.cpu_millis, limits::DEFAULT_CPU_MILLIS);
        assert_eq!(s.cpu_request_millis, limits::DEFAULT_CPU_REQUEST_MILLIS);
        assert_eq!(s.memory_bytes, limits::DEFAULT_MEMORY_BYTES);
        assert_eq!(s.pids_limit, limits::DEFAULT_PIDS_LIMIT);
        assert_eq!(s.ttl_seconds, limits::DEFAULT_TTL_SECONDS);
        assert_eq!(s.runtime, None);
        assert_eq!(SessionSpec::default(), s);
    }

    #[test]
    fn disk_quotas_default_and_scale_their_inodes() {
        let s = resolve(spec()).unwrap();
        assert_eq!(s.disk(), (limits::DEFAULT_DISK_BYTES, 65_536));
        let s = resolve(pb::SessionSpec { disk_bytes: limits::MIN_DISK_BYTES, ..spec() }).unwrap();
        assert_eq!(s.disk(), (limits::MIN_DISK_BYTES, 4096));
        let s = resolve(pb::SessionSpec { disk_bytes: 256 << 30, ..spec() }).unwrap();
        assert_eq!(s.disk().1, limits::MAX_DISK_INODES, "the default inode count is capped");
        let s = resolve(pb::SessionSpec { disk_inodes: 2000, ..spec() }).unwrap();
        assert_eq!(s.disk(), (limits::DEFAULT_DISK_BYTES, 2000));
        assert_eq!(s.to_proto().disk_inodes, 2000);
        assert_eq!(s.sandbox().disk_bytes, limits::DEFAULT_DISK_BYTES);
        // An entry from before quotas loads with the defaults, and equals a new default spec.
        let mut old = serde_json::to_value(SessionSpec::default()).unwrap();
        old.as_object_mut().unwrap().remove("disk_bytes");
        old.as_object_mut().unwrap().remove("disk_inodes");
        let old: SessionSpec = serde_json::from_value(old).unwrap();
        assert_eq!(old.disk_bytes, 0);
        assert_eq!(old.disk(), SessionSpec::default().disk());
        assert!(old.differing_fields(&SessionSpec::default()).is_empty());
    }

    #[test]
    fn a_limit_alone_is_also_the_request_and_a_request_above_the_limit_is_refused() {
        let s = resolve(pb::SessionSpec { cpu_millis: 2000, ..spec() }).unwrap();
        assert_eq!(s.cpu_request_millis, 2000);
        let s = resolve(pb::SessionSpec { cpu_millis: 2000, cpu_request_millis: 250, ..spec() }).unwrap();
        assert_eq!(s.cpu_request_millis, 250);
        let s = resolve(pb::SessionSpec { cpu_millis: 50, ..spec() }).unwrap();
        assert_eq!(s.cpu_request_millis, 50);
        let e = resolve(pb::SessionSpec { cpu_request_millis: 1500, ..spec() }).unwrap_err();
        assert!(e.to_string().contains("cpu_request_millis"), "{e}");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn every_range_is_out_of_range_on_both_sides() {
        let cases: Vec<(&str, pb::SessionSpec)> = vec![
            ("cpu_millis", pb::SessionSpec { cpu_millis: limits::MIN_CPU_MILLIS - 1, ..spec() }),
            ("cpu_millis", pb::SessionSpec { cpu_millis: limits::MAX_CPU_MILLIS + 1, ..spec() }),
            ("memory_bytes", pb::SessionSpec { memory_bytes: limits::MIN_MEMORY_BYTES - 1, ..spec() }),
            ("memory_bytes", pb::SessionSpec { memory_bytes: limits::MAX_MEMORY_BYTES + 1, ..spec() }),
            ("pids_limit", pb::SessionSpec { pids_limit: limits::MIN_PIDS_LIMIT - 1, ..spec() }),
            ("pids_limit", pb::SessionSpec { pids_limit: limits::MAX_PIDS_LIMIT + 1, ..spec() }),
            ("disk_bytes", pb::SessionSpec { disk_bytes: limits::MIN_DISK_BYTES - 1, ..spec() }),
            ("disk_bytes", pb::SessionSpec { disk_bytes: limits::MAX_DISK_BYTES + 1, ..spec() }),
            ("disk_inodes", pb::SessionSpec { disk_inodes: limits::MIN_DISK_INODES - 1, ..spec() }),
            ("disk_inodes", pb::SessionSpec { disk_inodes: limits::MAX_DISK_INODES + 1, ..spec() }),
            (
                "disk_inodes",
                pb::SessionSpec {
                    disk_bytes: limits::MIN_DISK_BYTES,
                    disk_inodes: limits::MIN_DISK_BYTES / 4096 + 1,
                    ..spec()
                },
            ),
            ("ttl_seconds", pb::SessionSpec { ttl_seconds: limits::MAX_TTL_SECONDS + 1, ..spec() }),
            ("idle_timeout_seconds", pb::SessionSpec { idle_timeout_seconds: limits::MAX_TTL_SECONDS + 1, ..spec() }),
            (
                "restart_policy.lost_after_ms",
                pb::SessionSpec {
                    restart_policy: Some(pb::RestartPolicy { lost_after_ms: 3499, ..Default::default() }),
                    ..spec()
                },
            ),
            (
                "restart_policy.lost_after_ms",
                pb::SessionSpec {
                    restart_policy: Some(pb::RestartPolicy {
                        lost_after_ms: limits::MAX_LOST_AFTER_MS + 1,
                        ..Default::default()
                    }),
                    ..spec()
                },
            ),
            (
                "restart_policy.max_attempts",
                pb::SessionSpec {
                    restart_policy: Some(pb::RestartPolicy {
                        max_attempts: limits::MAX_RESTART_ATTEMPTS + 1,
                        ..Default::default()
                    }),
                    ..spec()
                },
            ),
            (
                "restart_policy.backoff_ms",
                pb::SessionSpec {
                    restart_policy: Some(pb::RestartPolicy {
                        backoff_ms: limits::MAX_RESTART_BACKOFF_MS + 1,
                        ..Default::default()
                    }),
                    ..spec()
                },
            ),
        ];
        for (field, s) in cases {
            let e = resolve(s).unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::OutOfRange, "{field}");
        }
        // The bounds themselves are allowed.
        resolve(pb::SessionSpec {
            cpu_millis: limits::MAX_CPU_MILLIS,
            memory_bytes: limits::MIN_MEMORY_BYTES,
            pids_limit: limits::MAX_PIDS_LIMIT,
            ttl_seconds: limits::MAX_TTL_SECONDS,
            restart_policy: Some(pb::RestartPolicy {
                lost_after_ms: 3500,
                max_attempts: limits::MAX_RESTART_ATTEMPTS,
                backoff_ms: 0,
            }),
            ..spec()
        })
        .unwrap();
    }

    #[test]
    fn names_are_checked_and_listed() {
        assert_eq!(code(resolve(pb::SessionSpec { template: "ruby".into(), ..spec() })), tonic::Code::InvalidArgument);
        assert_eq!(
            code(resolve(pb::SessionSpec { template: "Bad Name".into(), ..spec() })),
            tonic::Code::InvalidArgument
        );
        let e = resolve(pb::SessionSpec { runtime: "kubernetes".into(), ..spec() }).unwrap_err();
        assert_eq!(e.to_string(), "invalid runtime: unknown runtime \"kubernetes\"; use one of process, docker, cri");
        let s = resolve(pb::SessionSpec { template: "python".into(), runtime: "docker".into(), ..spec() }).unwrap();
        assert_eq!((s.template, s.runtime), (Template::Python, Some(Runtime::Docker)));
        assert_eq!(s.runtimes(), &[Runtime::Docker]);
        assert_eq!(resolve(spec()).unwrap().runtimes(), &Runtime::ALL);
        for r in Runtime::ALL {
            assert_eq!(r.as_str().parse::<Runtime>().unwrap(), r);
        }
        for t in Template::ALL {
            assert_eq!(t.as_str().parse::<Template>().unwrap(), t);
        }
    }

    #[test]
    fn the_wire_form_round_trips() {
        let s = resolve(pb::SessionSpec {
            template: "node".into(),
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            env: [("A".to_string(), "1".to_string())].into(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            runtime: "process".into(),
            restart_policy: Some(pb::RestartPolicy { lost_after_ms: 10_000, max_attempts: 3, backoff_ms: 100 }),
            ..spec()
        })
        .unwrap();
        assert_eq!(resolve(s.to_proto()).unwrap(), s);
    }

    #[test]
    fn stored_entries_from_before_typed_names_and_requests_still_load() {
        // The JSON of a spec as the coordinator stored it before this module existed.
        let old = r#"{"template":"python","cpu_millis":2000,"memory_bytes":536870912,"pids_limit":128,
            "env":{},"labels":{},"ttl_seconds":3600,"runtime":"kubernetes"}"#;
        let s: SessionSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s.template, Template::Python);
        assert_eq!(s.runtime, None);
        assert_eq!(s.cpu_reserved_millis(), 2000, "an old entry reserved its whole limit");
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""template":"python""#) && json.contains(r#""runtime":"""#), "{json}");
        assert_eq!(serde_json::from_str::<SessionSpec>(&json).unwrap(), s);
    }

    #[test]
    fn differing_fields_name_what_changed() {
        let a = resolve(spec()).unwrap();
        assert!(a.differing_fields(&a).is_empty());
        let b =
            resolve(pb::SessionSpec { cpu_millis: 2000, labels: [("x".into(), "y".into())].into(), ..spec() }).unwrap();
        assert_eq!(a.differing_fields(&b), vec!["cpu_millis", "cpu_request_millis", "labels"]);
        // A stored zero request stands for the limit.
        let old = SessionSpec { cpu_request_millis: 0, ..b.clone() };
        assert!(old.differing_fields(&b).is_empty());
    }
}
