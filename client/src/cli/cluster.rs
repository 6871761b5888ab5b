//! `sandfleet node list` and `sandfleet cluster ...`.

use sandfleet::json;
use serde_json::Value;

use super::output::{cluster_table, nodes_table, out, print_json, OutputFormat};
use super::{ClusterCmd, Ctx};

/// `node list`.
pub async fn node_list(ctx: &Ctx) -> anyhow::Result<i32> {
    let nodes = ctx.client.list_nodes().await?;
    match ctx.output {
        OutputFormat::Json => print_json(&Value::Array(nodes.iter().map(json::node_to_json).collect()))?,
        OutputFormat::Text => out(&nodes_table(&nodes))?,
    }
    Ok(0)
}

/// `node cordon|uncordon ID`: prints the node after the change.
pub async fn node_cordon(ctx: &Ctx, id: &str, cordoned: bool) -> anyhow::Result<i32> {
    let node = ctx.client.cordon_node(id, cordoned).await?;
    match ctx.output {
        OutputFormat::Json => print_json(&json::node_to_json(&node))?,
        OutputFormat::Text => out(&nodes_table(std::slice::from_ref(&node)))?,
    }
    Ok(0)
}

/// `cluster status|init|add|remove`; each prints the resulting membership.
pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> anyhow::Result<i32> {
    let status = match cmd {
        ClusterCmd::Status => ctx.client.cluster_status().await?,
        ClusterCmd::Init { members } => ctx.client.init_cluster(members).await?,
        ClusterCmd::Add { id, address } => ctx.client.add_member(id, &address).await?,
        ClusterCmd::Remove { id } => ctx.client.remove_member(id).await?,
    };
    match ctx.output {
        OutputFormat::Json => print_json(&json::cluster_status_to_json(&status))?,
        OutputFormat::Text => out(&cluster_table(&status))?,
    }
    Ok(0)
}
