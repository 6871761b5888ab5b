//! `sandfleet node list` and `sandfleet cluster ...`.

use anyhow::Context as _;

use super::output::{cluster_table, node_text, nodes_table, out, print_json, OutputFormat};
use super::progress::Progress;
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

/// `node drain ID`: starts the drain, then (unless detached) follows it until
/// no session is left on the node; on a terminal a bar shows the sessions
/// moved out of the total ([`crate::progress`]). Exits 0 when drained, 1 when
/// the node stopped draining (uncordoned, or down), 2 when `wait_timeout`
/// passed first (the drain goes on).
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
    let progress = if detach { Progress::hidden() } else { Progress::bar(ctx.output, 0, format!("draining {id}")) };
    let mut total = 0u32;
    let code = loop {
        if detach {
            break 0;
        }
        match &node.drain {
            None => {
                progress.finish();
                eprintln!("node {id} is {} and no longer draining", node.state);
                break 1;
            }
            Some(d) if d.remaining == 0 && d.moving == 0 => {
                progress.finish();
                eprintln!("node {id} is drained");
                break 0;
            }
            Some(d) => {
                let (moved, of) = drain_progress(&mut total, d);
                progress.set(moved, of);
                progress.set_message(format!("sessions moved off {id}, {} moving", d.moving));
            }
        }
        if started.elapsed() > wait_timeout {
            progress.finish();
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

/// A drain's progress as (moved off, total): the total is the most sessions
/// seen on the node since following began (`total` keeps it between calls),
/// and those still moving do not count as moved until they run elsewhere.
pub fn drain_progress(total: &mut u32, d: &sandfleet::proto::DrainStatus) -> (u64, u64) {
    *total = (*total).max(d.remaining + d.moving);
    let left = d.remaining + d.moving;
    (u64::from(total.saturating_sub(left)), u64::from(*total))
}

/// `cluster add`: the call returns once the new member has caught up and
/// joined; meanwhile, on a terminal, a bar shows its applied index against
/// the leader's log.
async fn add_member_shown(
    ctx: &Ctx,
    id: u64,
    address: &str,
) -> anyhow::Result<sandfleet::proto::ClusterStatusResponse> {
    let progress = Progress::bar(ctx.output, 0, format!("coordinator {id} catching up"));
    if !progress.is_shown() {
        return Ok(ctx.client.add_member(id, address).await?);
    }
    let add = ctx.client.add_member(id, address);
    tokio::pin!(add);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            done = &mut add => {
                progress.finish();
                return Ok(done?);
            }
            _ = poll.tick() => {
                if let Ok(status) = ctx.client.cluster_status().await {
                    match catch_up(&status, id) {
                        Some((applied, of)) => {
                            progress.set(applied, of);
                            progress.set_message(format!("coordinator {id}: applied {applied} of the leader's {of}"));
                        }
                        None => progress.set_message(format!("waiting for coordinator {id} to join")),
                    }
                }
            }
        }
    }
}

/// The member `id`'s applied index and the leader's last log index, once the
/// member is in the membership and reports itself.
pub fn catch_up(status: &sandfleet::proto::ClusterStatusResponse, id: u64) -> Option<(u64, u64)> {
    let member = status.members.iter().find(|m| m.id == id && m.role != "unreachable")?;
    let leader = status.members.iter().find(|m| m.id == status.leader_id)?;
    Some((member.applied_index, leader.last_log_index.max(member.applied_index)))
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
        ClusterCmd::Add { id, address } => add_member_shown(ctx, id, &address).await?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use sandfleet::proto;

    #[test]
    fn drain_progress_counts_moved_sessions_out_of_the_most_seen() {
        let mut total = 0;
        let d = |remaining, moving| proto::DrainStatus { remaining, moving, ..Default::default() };
        assert_eq!(drain_progress(&mut total, &d(4, 0)), (0, 4));
        assert_eq!(drain_progress(&mut total, &d(3, 1)), (0, 4));
        assert_eq!(drain_progress(&mut total, &d(3, 0)), (1, 4));
        assert_eq!(drain_progress(&mut total, &d(0, 0)), (4, 4));
    }

    #[test]
    fn catch_up_compares_with_the_leaders_log() {
        let m = |id, role: &str, last, applied| proto::ClusterMember {
            id,
            role: role.into(),
            last_log_index: last,
            applied_index: applied,
            ..Default::default()
        };
        let mut st = proto::ClusterStatusResponse {
            leader_id: 1,
            members: vec![m(1, "leader", 120, 120), m(4, "learner", 40, 40)],
            ..Default::default()
        };
        assert_eq!(catch_up(&st, 4), Some((40, 120)));
        assert_eq!(catch_up(&st, 5), None);
        st.members[1].role = "unreachable".into();
        assert_eq!(catch_up(&st, 4), None);
    }
}
