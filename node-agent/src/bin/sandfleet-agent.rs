//! `sandfleet-agent`: the node agent of one host.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use sandfleet_agent::{serve, AgentConfig, RuntimeKind};
use tokio_util::sync::CancellationToken;

/// A Sandfleet node agent: runs sessions in sandboxes and serves their data plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Stable node name (lowercase letters, digits and '-').
    #[arg(long)]
    node_id: String,
    /// Data-plane listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7071")]
    listen: SocketAddr,
    /// Address clients reach this agent at (defaults to the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for workspaces and runtime state.
    #[arg(long)]
    data_dir: PathBuf,
    /// Coordinator addresses, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    coordinators: Vec<String>,
    /// Runtime backend (given twice, the last one counts).
    #[arg(long, value_enum, default_value = "process", overrides_with = "runtime")]
    runtime: RuntimeKind,
    /// Schedulable CPU (cores like 2 or 0.5, or millicores like 1500m); default: all cores.
    #[arg(long)]
    cpu: Option<String>,
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
    /// Docker runtime: keep N idle containers of TEMPLATE ready, TEMPLATE=N (repeatable).
    #[arg(long = "warm-pool", value_name = "TEMPLATE=N")]
    warm_pool: Vec<String>,
    /// Docker runtime: run TEMPLATE on IMAGE, TEMPLATE=IMAGE (repeatable; default: every
    /// template on sandfleet/sandbox:latest, built by deploy/images/build-sandbox-image).
    #[arg(long = "template-image", value_name = "TEMPLATE=IMAGE")]
    template_images: Vec<String>,
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
    let mut warm_pool = std::collections::BTreeMap::new();
    for w in &args.warm_pool {
        let Some((t, n)) = w.split_once('=') else { bail!("invalid --warm-pool {w:?}: expected TEMPLATE=N") };
        let n: u32 = n.parse().with_context(|| format!("invalid --warm-pool {w:?}: N must be a non-negative integer"))?;
        warm_pool.insert(t.to_string(), n);
    }
    let mut docker_templates = std::collections::BTreeMap::new();
    for w in &args.template_images {
        let Some((t, img)) = w.split_once('=') else { bail!("invalid --template-image {w:?}: expected TEMPLATE=IMAGE") };
        if t.is_empty() || img.is_empty() {
            bail!("invalid --template-image {w:?}: template and image must not be empty");
        }
        docker_templates.insert(t.to_string(), img.to_string());
    }
    if args.runtime != RuntimeKind::Docker && (!warm_pool.is_empty() || !docker_templates.is_empty()) {
        bail!("--warm-pool and --template-image apply to --runtime docker only");
    }
    let cpu_millis = args.cpu.as_deref().map(sandfleet_common::quantity::parse_cpu).transpose()?.unwrap_or(0);
    let memory_bytes = args.memory.as_deref().map(sandfleet_common::quantity::parse_memory).transpose()?.unwrap_or(0);
    let shutdown = CancellationToken::new();
    let signal = sandfleet_common::signal::shutdown_signal();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    let config = AgentConfig {
        node_id: args.node_id.clone(),
        listen: args.listen,
        advertise: args.advertise,
        data_dir: args.data_dir,
        coordinators: args.coordinators,
        runtime: args.runtime,
        cpu_millis,
        memory_bytes,
        slots: args.slots,
        labels,
        uid_base: args.uid_base,
        warm_pool,
        docker_templates,
        ..Default::default()
    };
    let agent = serve(config, shutdown.clone()).await.context("failed to start the agent")?;
    println!("{}", serde_json::json!({"ready": "agent", "node_id": args.node_id, "addr": agent.addr().to_string()}));
    agent.join().await.context("agent stopped with an error")?;
    Ok(())
}
