//! `sandfleet session create --count N` and `sandfleet batch get|list|wait|rm`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use sandfleet::{proto, CreateBatch, CreateSession, Error};
use serde::Deserialize;

use super::output::{format_age, format_time, out, print_json, table, OutputFormat};
use super::progress::Progress;
use super::Ctx;

/// `sandfleet batch ...`.
#[derive(Debug, Subcommand)]
pub enum BatchCmd {
    /// Show a batch: its replicas counted by state, and their session ids.
    Get {
        /// Batch id.
        id: String,
    },
    /// List batches, oldest first.
    #[command(alias = "ls")]
    List {
        /// Only this tenant's batches (admins; users always see their own).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Wait until every replica of a batch runs (progress on a terminal).
    Wait {
        /// Batch id.
        id: String,
        /// How long to wait.
        #[arg(long, value_parser = super::args::parse_duration, default_value = "120s", value_name = "DURATION")]
        timeout: Duration,
    },
    /// Delete a batch: terminate all its sessions.
    #[command(alias = "delete")]
    Rm {
        /// Batch id.
        id: String,
    },
}

/// One line of a `--patch-file`: replica i's env and labels.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchLine {
    #[serde(default)]
    env: std::collections::HashMap<String, String>,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
}

/// Reads a JSON Lines patch file: line i is replica i's patch, an object
/// with optional `env` and `labels` maps of strings, e.g.
/// `{"env": {"SHARD": "3"}, "labels": {"shard": "3"}}`.
pub fn read_patch_file(path: &Path) -> anyhow::Result<Vec<proto::ReplicaPatch>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_patches(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_patches(text: &str) -> anyhow::Result<Vec<proto::ReplicaPatch>> {
    let mut patches = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            anyhow::bail!(
                "line {}: empty; each line is replica {}'s patch, a JSON object (use {{}} for none)",
                n + 1,
                n
            );
        }
        let p: PatchLine = serde_json::from_str(line).with_context(|| {
            format!("line {} (replica {n}): expected {{\"env\": {{..}}, \"labels\": {{..}}}}", n + 1)
        })?;
        patches.push(proto::ReplicaPatch { env: p.env, labels: p.labels });
    }
    Ok(patches)
}

/// `session create --count N`: creates the batch, waits when asked, prints it.
pub async fn create(
    ctx: &Ctx,
    count: u32,
    request_id: Option<String>,
    session: CreateSession,
    patches: Vec<proto::ReplicaPatch>,
    pool: Option<String>,
    wait: Option<Duration>,
) -> anyhow::Result<i32> {
    let mut req = match pool {
        Some(pool) => CreateBatch::from_pool(count, pool),
        None => CreateBatch::new(count, session),
    };
    if let Some(id) = request_id {
        req = req.request_id(id);
    }
    req.patches = patches;
    let resp = ctx.client.create_batch(req).await?;
    let mut batch = resp.batch.ok_or_else(|| Error::Protocol("the answer has no batch".into()))?;
    if resp.existing {
        eprintln!("sandfleet: this request id already created batch {}", batch.id);
    }
    if let Some(timeout) = wait {
        batch = wait_shown(ctx, &batch.id, timeout).await?;
    }
    print_batch(ctx, &batch)?;
    Ok(0)
}

/// Waits for a batch with a progress bar of running replicas.
async fn wait_shown(ctx: &Ctx, id: &str, timeout: Duration) -> anyhow::Result<proto::Batch> {
    let bar = Progress::bar(ctx.output, 0, "running");
    let batch = ctx
        .client
        .wait_batch(id, timeout, |b| {
            bar.set(u64::from(b.running), u64::from(b.desired));
            bar.set_message(format!("running ({} placed, {} pending)", b.placed, b.pending));
        })
        .await;
    bar.finish();
    Ok(batch?)
}

/// Dispatches `batch` subcommands.
pub async fn run(ctx: &Ctx, cmd: BatchCmd) -> anyhow::Result<i32> {
    match cmd {
        BatchCmd::Get { id } => {
            let b = ctx.client.get_batch(&id).await?;
            print_batch(ctx, &b)?;
        }
        BatchCmd::List { tenant } => {
            let batches = ctx.client.list_batches(tenant.as_deref()).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&batches)?,
                OutputFormat::Text => out(&batches_table(&batches, sandfleet_common::time::now_ms()))?,
            }
        }
        BatchCmd::Wait { id, timeout } => {
            let b = wait_shown(ctx, &id, timeout).await?;
            print_batch(ctx, &b)?;
        }
        BatchCmd::Rm { id } => {
            let b = ctx.client.delete_batch(&id).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&b)?,
                OutputFormat::Text => out(&format!("deleted batch {} ({} sessions)\n", b.id, b.desired))?,
            }
        }
    }
    Ok(0)
}

fn print_batch(ctx: &Ctx, b: &proto::Batch) -> std::io::Result<()> {
    match ctx.output {
        OutputFormat::Json => print_json(b),
        OutputFormat::Text => out(&batch_text(b)),
    }
}

/// A batch as a key/value block, then its session ids, one per line.
pub fn batch_text(b: &proto::Batch) -> String {
    let mut rows = vec![
        ("id", b.id.clone()),
        ("request", b.request_id.clone()),
        ("tenant", b.tenant.clone()),
        ("created", format_time(b.created_at_ms)),
        ("desired", b.desired.to_string()),
        ("placed", b.placed.to_string()),
        ("running", b.running.to_string()),
        ("pending", b.pending.to_string()),
        ("failed", b.failed.to_string()),
        ("ended", b.terminated.to_string()),
    ];
    if !b.pool.is_empty() {
        rows.push(("pool", format!("{} ({} claimed, the rest cold)", b.pool, b.claimed)));
    }
    if b.deleted_at_ms != 0 {
        rows.push(("deleted", format_time(b.deleted_at_ms)));
    }
    let mut text = String::new();
    for (k, v) in rows {
        text.push_str(&format!("{:<10}{v}\n", format!("{k}:")));
    }
    if !b.session_ids.is_empty() {
        text.push_str("sessions:\n");
        for id in &b.session_ids {
            text.push_str(&format!("  {id}\n"));
        }
    }
    text
}

/// The `batch list` table.
pub fn batches_table(batches: &[proto::Batch], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = batches
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.tenant.clone(),
                b.desired.to_string(),
                b.running.to_string(),
                b.pending.to_string(),
                b.failed.to_string(),
                if b.deleted_at_ms != 0 { "deleted".into() } else { format_age(b.created_at_ms, now_ms) },
            ]
        })
        .collect();
    table(&["ID", "TENANT", "DESIRED", "RUNNING", "PENDING", "FAILED", "AGE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_files_are_one_object_per_replica() {
        let p = parse_patches("{\"env\": {\"SHARD\": \"0\"}}\n{}\n{\"labels\": {\"shard\": \"2\"}}\n").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].env["SHARD"], "0");
        assert_eq!(p[1], proto::ReplicaPatch::default());
        assert_eq!(p[2].labels["shard"], "2");
        let e = format!("{:#}", parse_patches("{}\n\n{}\n").unwrap_err());
        assert!(e.contains("line 2: empty"), "{e}");
        let e = format!("{:#}", parse_patches("{\"env\": {\"A\": 1}}\n").unwrap_err());
        assert!(e.contains("line 1 (replica 0)"), "{e}");
        let e = format!("{:#}", parse_patches("{\"envs\": {}}\n").unwrap_err());
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_batch_shows_its_counts_and_sessions() {
        let b = proto::Batch {
            id: "b1".into(),
            desired: 2,
            running: 1,
            session_ids: vec!["s1".into(), "s2".into()],
            ..Default::default()
        };
        let text = batch_text(&b);
        assert!(text.contains("desired:  2\n") && text.contains("running:  1\n"), "{text}");
        assert!(text.ends_with("sessions:\n  s1\n  s2\n"), "{text}");
    }
}
