//! `sandfleet session ...`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures::StreamExt;
use sandfleet::session::{is_terminal, state_name};
use sandfleet::{proto, CreateSession, Error};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::args::CpSpec;
use super::exec::{apply_resources, session_exec};
use super::output::{
    disk_usage_text, file_kind_name, format_time, now_string, out, print_json, print_json_line, session_text,
    sessions_table, table, OutputFormat,
};
use super::progress::Progress;
use super::{Ctx, SessionCmd};

/// Dispatches `session` subcommands.
pub async fn run(ctx: &Ctx, cmd: SessionCmd) -> anyhow::Result<i32> {
    match cmd {
        SessionCmd::Create { request_id, resources, ttl, env, count, patch_file, pool, wait, wait_timeout } => {
            let mut c = apply_resources(CreateSession::new(), &resources);
            if let Some(ttl) = ttl {
                c = c.ttl(ttl);
            }
            for (k, v) in env {
                c = c.env(k, v);
            }
            if count.is_some() || patch_file.is_some() {
                let patches = match &patch_file {
                    Some(path) => super::batch::read_patch_file(path)?,
                    None => Vec::new(),
                };
                // Without --count, a patch file makes one replica per line.
                let count = count.unwrap_or(patches.len() as u32);
                let wait = wait.then_some(wait_timeout);
                return super::batch::create(ctx, count, request_id, c, patches, pool, wait).await;
            }
            if let Some(id) = request_id {
                c = c.request_id(id);
            }
            if let Some(pool) = pool {
                // The pool's spec is the session's: resource flags do not apply.
                c = CreateSession { spec: Default::default(), ..c.pool(pool) };
            }
            let resp = ctx.client.create_session_full(c).await?;
            let mut session = resp.session.ok_or_else(|| Error::Protocol("the answer has no session".into()))?;
            if resp.existing {
                eprintln!("sandfleet: this request id already created session {}", session.id);
            }
            if !session.message.is_empty() && !resp.claimed && session.pool.is_empty() {
                // A pool with no idle sandbox: say that it started cold.
                eprintln!("sandfleet: {}", session.message);
            }
            if wait {
                session = wait_running_shown(ctx, &session, wait_timeout).await?;
            }
            print_session(ctx, &session)?;
            Ok(0)
        }
        SessionCmd::Get { id } => {
            let s = ctx.client.get_session(&id).await?;
            print_session(ctx, &s)?;
            if ctx.output == OutputFormat::Text && s.state == proto::SessionState::Running as i32 {
                // The use is the node agent's to tell; the session is shown either way.
                match ctx.client.disk_usage(&s).await {
                    Ok(u) => out(&disk_usage_text(&u))?,
                    Err(e) => eprintln!("sandfleet: disk use unknown: {e}"),
                }
            }
            Ok(0)
        }
        SessionCmd::List { labels, states, page_size, page_token, all, tenant } => {
            let req = proto::ListSessionsRequest {
                label_selector: labels.into_iter().collect(),
                states: states.into_iter().map(|s| s as i32).collect(),
                page_size: page_size.unwrap_or(0),
                page_token: page_token.unwrap_or_default(),
                consistency: proto::ReadConsistency::Linearizable as i32,
                tenant: tenant.unwrap_or_default(),
            };
            let (sessions, next) = if all {
                (ctx.client.list_all_sessions(req).await?, String::new())
            } else {
                let page = ctx.client.list_sessions(req).await?;
                (page.sessions, page.next_page_token)
            };
            match ctx.output {
                OutputFormat::Json => print_json(&sessions)?,
                OutputFormat::Text => out(&sessions_table(&sessions, sandfleet_common::time::now_ms()))?,
            }
            if !next.is_empty() {
                eprintln!("sandfleet: more sessions: pass --all, or --page-token {next}");
            }
            Ok(0)
        }
        SessionCmd::Rm { ids } => remove(ctx, &ids).await,
        SessionCmd::Renew { id, ttl } => {
            let s = ctx.client.renew_session(&id, ttl).await?;
            print_session(ctx, &s)?;
            Ok(0)
        }
        SessionCmd::Watch { id } => watch(ctx, &id).await,
        SessionCmd::Exec { id, exec } => session_exec(ctx, &id, exec).await,
        SessionCmd::Cp { src, dst, mode } => copy(ctx, src, dst, mode).await,
        SessionCmd::Sync { id } => {
            let session = ctx.client.get_session(&id).await?;
            let r = ctx.client.sync_workspace(&session).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&r)?,
                OutputFormat::Text => out(&format!(
                    "synced {} files ({} bytes) to {}: uploaded {} files ({} bytes), manifest version {}\n",
                    r.files, r.bytes, r.store, r.uploaded_files, r.uploaded_bytes, r.manifest_version
                ))?,
            }
            Ok(0)
        }
        SessionCmd::Url { id, path, expires_in } => {
            let session = ctx.client.get_session(&id).await?;
            let r = ctx.client.download_url(&session, &path, expires_in).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&r)?,
                OutputFormat::Text => out(&format!("{}\n", r.url))?,
            }
            Ok(0)
        }
        SessionCmd::Files { id, path } => {
            let session = ctx.client.get_session(&id).await?;
            let entries = ctx.client.list_files(&session, &path).await?;
            match ctx.output {
                OutputFormat::Json => print_json(&entries)?,
                OutputFormat::Text => {
                    let rows: Vec<Vec<String>> = entries
                        .iter()
                        .map(|e| {
                            let kind = file_kind_name(e.kind);
                            vec![
                                format!("{:o}", e.mode & 0o7777),
                                kind,
                                e.size.to_string(),
                                format_time(e.modified_at_ms),
                                e.name.clone(),
                            ]
                        })
                        .collect();
                    out(&table(&["MODE", "KIND", "SIZE", "MODIFIED", "NAME"], &rows))?;
                }
            }
            Ok(0)
        }
    }
}

fn print_session(ctx: &Ctx, s: &proto::Session) -> std::io::Result<()> {
    match ctx.output {
        OutputFormat::Json => print_json(s),
        OutputFormat::Text => out(&session_text(s)),
    }
}

/// Deletes every id given; reports each failure and exits 1 if there was one.
async fn remove(ctx: &Ctx, ids: &[String]) -> anyhow::Result<i32> {
    let mut deleted = Vec::new();
    let mut failed = 0;
    for id in ids {
        match ctx.client.delete_session(id).await {
            Ok(s) => {
                if ctx.output == OutputFormat::Text {
                    out(&format!("deleted {}\n", s.id))?;
                }
                deleted.push(s);
            }
            Err(e) => {
                eprintln!("error: {id}: {e}");
                failed += 1;
            }
        }
    }
    if ctx.output == OutputFormat::Json {
        print_json(&deleted)?;
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// What makes two watch events different enough to print.
fn watch_key(s: &proto::Session) -> (i32, String, u64, String, String) {
    (s.state, s.node_id.clone(), s.generation, s.pending_reason.clone(), s.message.clone())
}

fn watch_line(s: &proto::Session) -> String {
    let mut line = format!("{}  {:<10}", now_string(), state_name(s.state));
    if !s.node_id.is_empty() {
        line.push_str(&format!("  node={} gen={}", s.node_id, s.generation));
    }
    if !s.pending_reason.is_empty() {
        line.push_str(&format!("  {}", s.pending_reason));
    }
    if !s.message.is_empty() {
        line.push_str(&format!("  {}", s.message));
    }
    line.push('\n');
    line
}

/// Prints each state change until the session ends; re-opens a broken watch.
async fn watch(ctx: &Ctx, id: &str) -> anyhow::Result<i32> {
    let backoff = sandfleet::Backoff::default();
    let mut last = None;
    let mut attempt = 0u32;
    loop {
        let mut w = ctx.client.watch_session(id).await?;
        while let Some(item) = w.next().await {
            let s = match item {
                Ok(s) => s,
                Err(e) if e.code() == Some(tonic::Code::Unavailable) => {
                    tracing::debug!(error = %e, "watch broke; re-opening");
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            attempt = 0;
            let key = watch_key(&s);
            if last.as_ref() != Some(&key) {
                match ctx.output {
                    OutputFormat::Json => print_json_line(&s)?,
                    OutputFormat::Text => out(&watch_line(&s))?,
                }
                last = Some(key);
            }
            if is_terminal(s.state) {
                return Ok(0);
            }
        }
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// The file name at the end of a workspace path.
fn remote_basename(path: &str) -> Option<&str> {
    path.trim_end_matches('/').rsplit('/').next().filter(|s| !s.is_empty() && *s != "." && *s != "..")
}

/// `session cp`.
async fn copy(ctx: &Ctx, src: CpSpec, dst: CpSpec, mode: Option<u32>) -> anyhow::Result<i32> {
    match (src, dst) {
        (local, CpSpec::Remote { id, path }) => upload(ctx, local, &id, &path, mode).await,
        (CpSpec::Remote { id, path }, local) => download(ctx, &id, &path, local).await,
        _ => anyhow::bail!("one side of a copy must be ID:PATH"),
    }
}

async fn upload(ctx: &Ctx, src: CpSpec, id: &str, path: &str, mode: Option<u32>) -> anyhow::Result<i32> {
    let session = ctx.client.get_session(id).await?;
    let (resp, path) = match src {
        CpSpec::Local(local) => {
            let file = tokio::fs::File::open(&local).await.with_context(|| format!("opening {}", local.display()))?;
            let meta = file.metadata().await.with_context(|| format!("reading {}", local.display()))?;
            if meta.is_dir() {
                anyhow::bail!("{} is a directory; only files can be copied", local.display());
            }
            let path = if path.ends_with('/') {
                let name = local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                format!("{path}{name}")
            } else {
                path.to_string()
            };
            let mode = mode.unwrap_or_else(|| local_mode(&meta));
            (ctx.client.write_file(&session, &path, file, mode).await?, path)
        }
        CpSpec::Stdio => {
            if path.ends_with('/') {
                anyhow::bail!("name the file to write from stdin: {id}:{path}<name>");
            }
            (ctx.client.write_file(&session, path, tokio::io::stdin(), mode.unwrap_or(0)).await?, path.to_string())
        }
        CpSpec::Remote { .. } => anyhow::bail!("copies between two sessions are not supported"),
    };
    match ctx.output {
        OutputFormat::Json => print_json(&json!({
            "session_id": id, "path": path, "size": resp.size, "sha256": resp.sha256,
        }))?,
        OutputFormat::Text => out(&format!("wrote {} bytes to {id}:{path} (sha256 {})\n", resp.size, resp.sha256))?,
    }
    Ok(0)
}

#[cfg(unix)]
fn local_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn local_mode(_meta: &std::fs::Metadata) -> u32 {
    0
}

async fn download(ctx: &Ctx, id: &str, path: &str, dst: CpSpec) -> anyhow::Result<i32> {
    let session = ctx.client.get_session(id).await?;
    let mut stream = ctx.client.read_file(&session, path).await?;
    let mut size: u64 = 0;
    match dst {
        CpSpec::Stdio => {
            let mut stdout = tokio::io::stdout();
            while let Some(piece) = stream.next().await {
                stdout.write_all(&piece?).await.context("writing to stdout")?;
            }
            stdout.flush().await.context("writing to stdout")?;
            Ok(0)
        }
        CpSpec::Local(local) => {
            let target = local_target(&local, path).await?;
            let tmp = temp_sibling(&target);
            let result = async {
                let mut file =
                    tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
                while let Some(piece) = stream.next().await {
                    let piece = piece?;
                    size += piece.len() as u64;
                    file.write_all(&piece).await.with_context(|| format!("writing {}", tmp.display()))?;
                }
                file.sync_all().await.with_context(|| format!("writing {}", tmp.display()))?;
                drop(file);
                tokio::fs::rename(&tmp, &target)
                    .await
                    .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            match ctx.output {
                OutputFormat::Json => print_json(&json!({
                    "session_id": id, "path": path, "local": target.display().to_string(), "size": size,
                }))?,
                OutputFormat::Text => out(&format!("read {size} bytes from {id}:{path} into {}\n", target.display()))?,
            }
            Ok(0)
        }
        CpSpec::Remote { .. } => anyhow::bail!("copies between two sessions are not supported"),
    }
}

/// A local destination: into a directory keeps the remote file name.
async fn local_target(local: &Path, remote: &str) -> anyhow::Result<PathBuf> {
    let is_dir = tokio::fs::metadata(local).await.map(|m| m.is_dir()).unwrap_or(false);
    if is_dir {
        let name = remote_basename(remote).with_context(|| format!("{remote:?} names no file"))?;
        Ok(local.join(name))
    } else {
        Ok(local.to_path_buf())
    }
}

/// `dir/.name.sandfleet-<pid>.tmp`, next to the target so the rename is atomic.
fn temp_sibling(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "download".into());
    target.with_file_name(format!(".{name}.sandfleet-{}.tmp", std::process::id()))
}

/// `ctx.client.wait_running`, with a spinner showing the session's state and
/// why it waits, on a terminal only ([`crate::progress`]).
async fn wait_running_shown(
    ctx: &Ctx,
    session: &proto::Session,
    timeout: std::time::Duration,
) -> anyhow::Result<proto::Session> {
    let progress = Progress::spinner(ctx.output, waiting_text(session));
    if !progress.is_shown() {
        return Ok(ctx.client.wait_running(&session.id, timeout).await?);
    }
    let wait = ctx.client.wait_running(&session.id, timeout);
    tokio::pin!(wait);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            done = &mut wait => {
                progress.finish();
                return Ok(done?);
            }
            _ = poll.tick() => {
                if let Ok(now) = ctx.client.get_session(&session.id).await {
                    progress.set_message(waiting_text(&now));
                }
            }
        }
    }
}

/// `session ID: PENDING (why)`, the spinner's text while waiting for RUNNING.
pub fn waiting_text(s: &proto::Session) -> String {
    let mut text = format!("session {}: {}", s.id, state_name(s.state));
    if !s.pending_reason.is_empty() {
        text.push_str(&format!(" ({})", s.pending_reason));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basenames_and_temps() {
        assert_eq!(remote_basename("a/b/c.txt"), Some("c.txt"));
        assert_eq!(remote_basename("c.txt"), Some("c.txt"));
        assert_eq!(remote_basename("dir/"), Some("dir"));
        assert_eq!(remote_basename(".."), None);
        let t = temp_sibling(Path::new("/tmp/x/out.bin"));
        assert_eq!(t.parent(), Some(Path::new("/tmp/x")));
        assert!(t.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".out.bin.sandfleet-")));
    }

    #[tokio::test]
    async fn local_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = local_target(dir.path(), "sub/data.csv").await.expect("target");
        assert_eq!(t, dir.path().join("data.csv"));
        let f = dir.path().join("named.csv");
        assert_eq!(local_target(&f, "sub/data.csv").await.expect("target"), f);
    }

    #[test]
    fn watch_lines() {
        let s = proto::Session {
            state: proto::SessionState::Pending as i32,
            pending_reason: "no ready node".into(),
            ..Default::default()
        };
        assert!(watch_line(&s).contains("PENDING"));
        assert!(watch_line(&s).contains("no ready node"));
    }
}
