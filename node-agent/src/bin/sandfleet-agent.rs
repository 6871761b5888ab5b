//! `sandfleet-agent`: the node agent of one host.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use sandfleet_agent::kubernetes::KubeNodeConfig;
use sandfleet_agent::runtime::cri::{CriConfig, PullPolicy};
use sandfleet_agent::runtime::disk::DiskQuota;
use sandfleet_agent::store::s3::S3Config;
use sandfleet_agent::store::sync::SyncConfig;
use sandfleet_agent::store::StoreConfig;
use sandfleet_agent::{serve, AgentConfig, RuntimeKind};
use sandfleet_common::ready::ReadyLine;
use sandfleet_common::spec::Template;
use tokio_util::sync::CancellationToken;

/// A Sandfleet node agent: runs sessions in sandboxes and serves their data plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Stable node name (lowercase letters, digits and '-'). With TLS, the
    /// certificate must be `agent/<node-id>`.
    #[arg(long)]
    node_id: String,
    #[command(flatten)]
    tls: sandfleet_common::tls::DaemonTlsArgs,
    /// Data-plane listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7071")]
    listen: SocketAddr,
    /// Address clients reach this agent at (defaults to the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Also serve the standard gRPC health service (grpc.health.v1) alone, in
    /// plaintext, on this address, for probes that speak no TLS (Kubernetes
    /// grpc probes). Service "" is SERVING while the agent is registered and its
    /// last heartbeat was answered, "liveness" while it runs. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<SocketAddr>,
    /// Serve metrics in plaintext HTTP on this address: `/metrics` (Prometheus
    /// text format), `/healthz` (200 while running) and `/readyz` (200 once
    /// registered with its last heartbeat acknowledged, else 503 and why).
    /// Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Directory for workspaces and runtime state.
    #[arg(long)]
    data_dir: PathBuf,
    /// Coordinator addresses, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    coordinators: Vec<String>,
    /// Runtime backend (given twice, the last one counts).
    #[arg(long, value_enum, default_value = "process", overrides_with = "runtime")]
    runtime: RuntimeKind,
    /// Schedulable CPU (cores like 2 or 0.5, or millicores like 1500m); default: all cores
    /// times --cpu-overcommit.
    #[arg(long)]
    cpu: Option<String>,
    /// Without --cpu, offer this many times the host's cores for placement. Sessions
    /// reserve their CPU request (100m by default) and may burst to their limit.
    #[arg(long, default_value_t = 1.0, value_name = "FACTOR")]
    cpu_overcommit: f64,
    /// Schedulable memory (e.g. 8Gi); default: the host's total.
    #[arg(long)]
    memory: Option<String>,
    /// Concurrent session slots.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Node label, k=v (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// First host uid given to sessions.
    #[arg(long, default_value_t = 200_000)]
    uid_base: u32,
    /// Per-session disk and inode quotas: `loop` gives each session an ext4
    /// filesystem of its quota's size (needs loop devices and mkfs.ext4);
    /// `off` keeps workspaces as plain directories, where one session can fill
    /// the agent's disk.
    #[arg(long, value_enum, default_value_t = DiskQuotaArg::Loop, value_name = "MODE")]
    disk_quota: DiskQuotaArg,
    /// Filesystems of the default disk quota kept made and mounted, so that
    /// creating a session does not wait for mkfs.
    #[arg(long, default_value_t = sandfleet_agent::runtime::disk::DEFAULT_POOL, value_name = "N")]
    disk_pool: usize,
    /// Process runtime: the sandfleet-executor binary each session's execs go
    /// through (default: next to this binary, else on PATH).
    #[arg(long, env = "SANDFLEET_EXECUTOR", value_name = "PATH")]
    executor_path: Option<PathBuf>,
    /// Docker and CRI runtimes: keep N idle containers of TEMPLATE ready, TEMPLATE=N (repeatable).
    #[arg(long = "warm-pool", value_name = "TEMPLATE=N")]
    warm_pool: Vec<String>,
    /// Docker and CRI runtimes: run TEMPLATE on IMAGE, TEMPLATE=IMAGE (repeatable; default: every
    /// template on sandfleet/sandbox:latest, built by deploy/images/build-sandbox-image).
    #[arg(long = "template-image", value_name = "TEMPLATE=IMAGE")]
    template_images: Vec<String>,
    /// CRI runtime: the CRI socket of the node's containerd for sessions (its own, never
    /// the kubelet's: a kubelet kills the sandboxes it did not make).
    #[arg(long, default_value = sandfleet_agent::runtime::cri::DEFAULT_ENDPOINT, value_name = "unix:///PATH")]
    cri_endpoint: String,
    /// CRI runtime: the runtime handler of session sandboxes (a RuntimeClass's
    /// handler, e.g. runsc for gVisor or kata); default: the runtime's default.
    #[arg(long, value_name = "NAME")]
    cri_runtime_handler: Option<String>,
    /// CRI runtime: the cgroupfs path under which each session's pod cgroup is made
    /// [default: sandfleet-sessions beside the agent's container, in its pod's cgroup].
    #[arg(long, value_name = "PATH")]
    cri_cgroup_parent: Option<String>,
    /// CRI runtime: whether a missing sandbox image is pulled through the CRI's ImageService.
    #[arg(long, value_enum, default_value_t = PullPolicyArg::Never, value_name = "POLICY")]
    image_pull_policy: PullPolicyArg,
    /// Where session workspaces are kept durably, so a session placed again
    /// on another node finds its files: a local directory (shared mounts
    /// work), S3, or none.
    #[arg(long, value_enum, default_value = "local")]
    workspace_store: StoreKind,
    /// Directory of the local workspace store [default: DATA_DIR/workspace-store].
    #[arg(long)]
    workspace_store_dir: Option<PathBuf>,
    /// S3 endpoint URL, for S3-compatible services (default: AWS for the region).
    /// Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID, ...), never from flags.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 bucket of the workspaces (must exist).
    #[arg(long)]
    s3_bucket: Option<String>,
    /// Key prefix; a session's workspace lives under PREFIX/SESSION_ID/.
    #[arg(long, default_value = "workspaces")]
    s3_prefix: String,
    /// S3 region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Path-style S3 addressing (ENDPOINT/BUCKET/KEY), which most S3-compatible servers need.
    #[arg(long)]
    s3_path_style: bool,
    /// Sync each running session's workspace at least this often (besides
    /// after every exec and file change, and when the session stops).
    /// Given twice, the last one counts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, overrides_with = "sync_interval")]
    sync_interval: std::time::Duration,
    /// Keep a deleted session's workspace in the store instead of removing it.
    #[arg(long)]
    retain_workspaces: bool,
    /// Follow this Kubernetes Node (pass the downward API's spec.nodeName): its
    /// labels become node labels (under --label), `kubectl cordon` cordons this
    /// node and a NoExecute taint drains it, and its annotation
    /// sandfleet.io/sessions holds the running session count. Needs the pod's
    /// service account (or KUBECONFIG) with get, watch and patch on nodes.
    #[arg(long, value_name = "NAME")]
    kube_node_name: Option<String>,
    /// With --kube-node-name: a NoExecute taint KEY that does not drain this
    /// node, e.g. one that keeps other pods off nodes dedicated to Sandfleet
    /// (repeatable).
    #[arg(long = "kube-ignore-taint", value_name = "KEY")]
    kube_ignore_taints: Vec<String>,
}

/// `--workspace-store` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// No durable copy: a workspace lives and dies with its node.
    None,
    /// A directory on this host (or a shared mount).
    Local,
    /// An S3 bucket (any S3-compatible service).
    S3,
}

/// The label every node carries with its own name.
const NODE_NAME_LABEL: &str = "sandfleet.node";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = sandfleet_common::telemetry::init("sandfleet-agent");
    let mut labels = HashMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else { bail!("invalid --label {l:?}: expected k=v") };
        labels.insert(k.to_string(), v.to_string());
    }
    // Every node carries its own name, so a session can be pinned to one node
    // with `--node-selector sandfleet.node=NAME` (like kubernetes.io/hostname).
    labels.entry(NODE_NAME_LABEL.to_string()).or_insert_with(|| args.node_id.clone());
    if !(1.0..=64.0).contains(&args.cpu_overcommit) {
        bail!("invalid --cpu-overcommit {}: must be between 1 and 64", args.cpu_overcommit);
    }
    let mut warm_pool = std::collections::BTreeMap::new();
    for w in &args.warm_pool {
        let Some((t, n)) = w.split_once('=') else { bail!("invalid --warm-pool {w:?}: expected TEMPLATE=N") };
        let n: u32 =
            n.parse().with_context(|| format!("invalid --warm-pool {w:?}: N must be a non-negative integer"))?;
        let t: Template = t.parse().with_context(|| format!("invalid --warm-pool {w:?}"))?;
        warm_pool.insert(t, n);
    }
    let mut docker_templates = std::collections::BTreeMap::new();
    for w in &args.template_images {
        let Some((t, img)) = w.split_once('=') else {
            bail!("invalid --template-image {w:?}: expected TEMPLATE=IMAGE")
        };
        if t.is_empty() || img.is_empty() {
            bail!("invalid --template-image {w:?}: template and image must not be empty");
        }
        let t: Template = t.parse().with_context(|| format!("invalid --template-image {w:?}"))?;
        docker_templates.insert(t, img.to_string());
    }
    if args.runtime == RuntimeKind::Process && (!warm_pool.is_empty() || !docker_templates.is_empty()) {
        bail!("--warm-pool and --template-image apply to --runtime docker and cri only");
    }
    let cri_flags = args.cri_runtime_handler.is_some()
        || args.cri_cgroup_parent.is_some()
        || args.cri_endpoint != sandfleet_agent::runtime::cri::DEFAULT_ENDPOINT
        || args.image_pull_policy != PullPolicyArg::Never;
    if args.runtime != RuntimeKind::Cri && cri_flags {
        bail!("--cri-endpoint, --cri-runtime-handler, --cri-cgroup-parent and --image-pull-policy apply to --runtime cri only");
    }
    if let Some(h) = &args.cri_runtime_handler {
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            bail!("invalid --cri-runtime-handler {h:?}: expected a runtime handler name such as runsc or kata");
        }
    }
    let s3_flags = args.s3_endpoint.is_some() || args.s3_bucket.is_some() || args.s3_path_style;
    let store = match args.workspace_store {
        StoreKind::None | StoreKind::Local if s3_flags => bail!("--s3-* flags need --workspace-store s3"),
        StoreKind::None => StoreConfig::None,
        StoreKind::Local => StoreConfig::Local {
            root: args.workspace_store_dir.clone().unwrap_or_else(|| args.data_dir.join("workspace-store")),
        },
        StoreKind::S3 => {
            if args.workspace_store_dir.is_some() {
                bail!("--workspace-store-dir applies to --workspace-store local only");
            }
            let Some(bucket) = args.s3_bucket.clone().filter(|b| !b.is_empty()) else {
                bail!("--workspace-store s3 needs --s3-bucket");
            };
            if let Some(e) = &args.s3_endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    bail!("invalid --s3-endpoint {e:?}: expected an http:// or https:// URL");
                }
            }
            StoreConfig::S3(S3Config {
                endpoint: args.s3_endpoint.clone(),
                region: args.s3_region.clone(),
                bucket,
                prefix: args.s3_prefix.clone(),
                path_style: args.s3_path_style,
                ..Default::default()
            })
        }
    };
    if args.sync_interval < std::time::Duration::from_millis(100) {
        bail!("--sync-interval must be at least 100ms");
    }
    let sync =
        SyncConfig { interval: args.sync_interval, retain_on_delete: args.retain_workspaces, ..Default::default() };
    let kube = match &args.kube_node_name {
        None if !args.kube_ignore_taints.is_empty() => bail!("--kube-ignore-taint needs --kube-node-name"),
        None => None,
        Some(name) if !sandfleet_common::ids::is_dns_subdomain(name) => {
            bail!("invalid --kube-node-name {name:?}: expected a Kubernetes node name (a DNS subdomain)")
        }
        Some(name) => {
            for key in &args.kube_ignore_taints {
                sandfleet_common::ids::validate_label_key("--kube-ignore-taint", key)?;
            }
            Some(KubeNodeConfig { node_name: name.clone(), ignore_taints: args.kube_ignore_taints.clone() })
        }
    };
    let cpu_millis = args.cpu.as_deref().map(sandfleet_common::quantity::parse_cpu).transpose()?.unwrap_or(0);
    let memory_bytes = args.memory.as_deref().map(sandfleet_common::quantity::parse_memory).transpose()?.unwrap_or(0);
    let shutdown = CancellationToken::new();
    // A second signal exits at once, should the graceful shutdown hang.
    let stop = shutdown.clone();
    sandfleet_common::signal::on_shutdown_signal(move || stop.cancel());
    let tls = args.tls.files().map_err(anyhow::Error::msg)?;
    let config = AgentConfig {
        tls,
        node_id: args.node_id.clone(),
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        coordinators: args.coordinators,
        runtime: args.runtime,
        cpu_millis,
        cpu_overcommit: args.cpu_overcommit,
        memory_bytes,
        slots: args.slots,
        labels,
        uid_base: args.uid_base,
        warm_pool,
        docker_templates,
        cri: CriConfig {
            endpoint: args.cri_endpoint.clone(),
            runtime_handler: args.cri_runtime_handler.clone().unwrap_or_default(),
            pull_policy: match args.image_pull_policy {
                PullPolicyArg::Never => PullPolicy::Never,
                PullPolicyArg::IfNotPresent => PullPolicy::IfNotPresent,
            },
            cgroup_parent: args.cri_cgroup_parent.clone(),
        },
        disk_quota: match args.disk_quota {
            DiskQuotaArg::Loop => DiskQuota::Loop { pool: args.disk_pool },
            DiskQuotaArg::Off => DiskQuota::Off,
        },
        executor_path: args.executor_path.clone(),
        store,
        sync,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
        kube,
        ..Default::default()
    };
    let agent = serve(config, shutdown.clone()).await.context("failed to start the agent")?;
    let health = agent.health_addr().map(|a| a.to_string());
    let metrics = agent.metrics_addr().map(|a| a.to_string());
    println!("{}", ReadyLine::Agent { node_id: args.node_id.clone(), addr: agent.addr().to_string(), health, metrics });
    agent.join().await.context("agent stopped with an error")?;
    Ok(())
}

/// `--image-pull-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PullPolicyArg {
    /// A missing image is an error (images are imported offline).
    Never,
    /// A missing image is pulled.
    IfNotPresent,
}

/// `--disk-quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DiskQuotaArg {
    /// A filesystem of its quota's size per session.
    Loop,
    /// No per-session disk limit.
    Off,
}
