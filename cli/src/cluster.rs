//! `sandfleet node list` and `sandfleet cluster ...`.

use anyhow::Context as _;

use super::output::{cluster_table, node_text, nodes_table, out, print_json, OutputFormat};
use super::{ClusterCmd, Ctx};

/// `node list`.
pub async fn node_list(ctx: &Ctx) -> anyhow::Result<i32> {
    let nodes = ctx.client.list_nodes().await?;
    match ctx.output {
        OutputFormat::Json => print_json(&nodes)?,
        OutputFormat::Text => out(&nodes_table(&nodes))?,
    }
    Ok(0)
}

/// `node get ID`: NOT_FOUND-like exit (1) with a message when no such node is registered.
pub async fn node_get(ctx: &Ctx, id: &str) -> anyhow::Result<i32> {
    let Some(node) = ctx.client.list_nodes().await?.into_iter().find(|n| n.id == id) else {
        eprintln!("node {id:?} is not registered");
        return Ok(1);
    };
    match ctx.output {
        OutputFormat::Json => print_json(&node)?,
        OutputFormat::Text => out(&node_text(&node))?,
    }
    Ok(0)
}

/// `node cordon|uncordon ID`: prints the node after the change.
pub async fn node_cordon(ctx: &Ctx, id: &str, cordoned: bool) -> anyhow::Result<i32> {
    let node = ctx.client.cordon_node(id, cordoned).await?;
    match ctx.output {
        OutputFormat::Json => print_json(&node)?,
        OutputFormat::Text => out(&nodes_table(std::slice::from_ref(&node)))?,
    }
    Ok(0)
}

/// `node drain ID`: starts the drain, then (unless detached) follows it and
/// prints progress to stderr until no session is left on the node. Exits 0
/// when drained, 1 when the node stopped draining (uncordoned, or down),
/// 2 when `wait_timeout` passed first (the drain goes on).
pub async fn node_drain(
    ctx: &Ctx,
    id: &str,
    deadline: std::time::Duration,
    max_parallel: u32,
    detach: bool,
    wait_timeout: std::time::Duration,
) -> anyhow::Result<i32> {
    let mut node = ctx.client.drain_node(id, deadline, max_parallel).await?;
    let started = std::time::Instant::now();
    let mut last = None;
    let code = loop {
        let progress = node.drain.as_ref().map(|d| (d.remaining, d.moving));
        if detach {
            break 0;
        }
        match progress {
            None => {
                eprintln!("node {id} is {} and no longer draining", node.state);
                break 1;
            }
            Some((0, 0)) => {
                eprintln!("node {id} is drained");
                break 0;
            }
            Some(p) if last != Some(p) => {
                eprintln!("node {id}: {} sessions left, {} moving", p.0, p.1);
                last = Some(p);
            }
            Some(_) => {}
        }
        if started.elapsed() > wait_timeout {
            eprintln!("stopped following after {}; the drain goes on", humantime::format_duration(wait_timeout));
            break 2;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        node = match ctx.client.list_nodes().await?.into_iter().find(|n| n.id == id) {
            Some(n) => n,
            None => anyhow::bail!("node {id} disappeared while draining"),
        };
    };
    match ctx.output {
        OutputFormat::Json => print_json(&node)?,
        OutputFormat::Text => out(&nodes_table(std::slice::from_ref(&node)))?,
    }
    Ok(code)
}

/// `cluster status|init|add|remove`; each prints the resulting membership.
/// `cluster scheduler pause|resume` prints the setting and the waiting count.
pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> anyhow::Result<i32> {
    let status = match cmd {
        ClusterCmd::Scheduler(s) => {
            let r = ctx.client.set_scheduler_paused(matches!(s, super::SchedulerCmd::Pause)).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&r)?,
                OutputFormat::Text => out(&format!(
                    "scheduling {}; {} sessions waiting for a node\n",
                    if r.paused { "paused" } else { "resumed" },
                    r.unplaced_sessions
                ))?,
            }
            return Ok(0);
        }
        ClusterCmd::Status => ctx.client.cluster_status().await?,
        ClusterCmd::Init { members, admin_key_file: None } => ctx.client.init_cluster(members).await?,
        ClusterCmd::Init { members, admin_key_file: Some(path) } => {
            // Claimed before the call, so an existing file is refused before the cluster changes.
            let mut file = create_key_file(&path)?;
            match ctx.client.init_cluster_with_admin_key(members).await {
                Ok((status, key)) => {
                    use std::io::Write as _;
                    file.write_all(format!("{key}\n").as_bytes())
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing the admin key to {}", path.display()))?;
                    eprintln!("wrote the first admin API key to {}", path.display());
                    status
                }
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    return Err(e.into());
                }
            }
        }
        ClusterCmd::Add { id, address } => ctx.client.add_member(id, &address).await?,
        ClusterCmd::Remove { id } => ctx.client.remove_member(id).await?,
    };
    match ctx.output {
        OutputFormat::Json => print_json(&status)?,
        OutputFormat::Text => out(&cluster_table(&status))?,
    }
    Ok(0)
}

/// Creates `path` for a secret: exclusively (an existing file is an error) and mode 0600 from the start.
fn create_key_file(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| {
        format!("cannot create the admin key file {} (an existing file is never overwritten)", path.display())
    })
}
