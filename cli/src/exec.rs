//! `sandfleet run` and `sandfleet session exec`: stream a command's output and
//! exit with its exit code.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use sandfleet::{exit_code_of, proto, CreateSession, ExecEvent, ExecRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument as _;

use super::output::{print_json, OutputFormat};
use super::{shutdown_signal, Ctx, ExecArgs, ResourceArgs, RunArgs};

/// The exit code after Ctrl-C / SIGTERM (128 + SIGINT).
const INTERRUPTED: i32 = 130;
/// Session ttl of `run` beyond the command's timeout, when not given.
const RUN_TTL_SLACK: Duration = Duration::from_secs(600);
/// How long `run` tries to delete its session on the way out.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Applies the resource flags to a create.
pub fn apply_resources(mut c: CreateSession, r: &ResourceArgs) -> CreateSession {
    if let Some(m) = r.memory {
        c = c.memory_bytes(m);
    }
    if let Some(cpu) = r.cpu {
        c = c.cpu_millis(cpu);
    }
    if let Some(cpu) = r.cpu_request {
        c = c.cpu_request_millis(cpu);
    }
    if let Some(p) = r.pids {
        c = c.pids_limit(p);
    }
    if let Some(d) = r.disk {
        c = c.disk_bytes(d);
    }
    if let Some(n) = r.disk_inodes {
        c = c.disk_inodes(n);
    }
    if let Some(t) = &r.template {
        c = c.template(t.clone());
    }
    for (k, v) in &r.labels {
        c = c.label(k.clone(), v.clone());
    }
    if let Some(rt) = r.runtime {
        c = c.runtime(rt.as_str());
    }
    for (k, v) in &r.node_selector {
        c = c.node_selector(k.clone(), v.clone());
    }
    if let Some(d) = r.idle_timeout {
        c = c.idle_timeout(d);
    }
    if let Some(d) = r.lost_after {
        c = c.lost_after(d);
    }
    if let Some(n) = r.max_attempts {
        c = c.max_attempts(n);
    }
    if let Some(d) = r.restart_backoff {
        c = c.restart_backoff(d);
    }
    c
}

/// Builds the exec request, reading local stdin if asked.
pub async fn build_request(args: &ExecArgs) -> anyhow::Result<ExecRequest> {
    let mut req = match &args.code {
        Some(code) => ExecRequest::code(args.language.into(), code.clone()),
        None => ExecRequest::argv(args.cmd.iter().cloned()),
    };
    if let Some(t) = args.timeout {
        req = req.timeout(t);
    }
    for (k, v) in &args.env {
        req = req.env(k.clone(), v.clone());
    }
    if let Some(w) = &args.workdir {
        req = req.workdir(w.clone());
    }
    if args.stdin {
        let limit = sandfleet_common::limits::MAX_STDIN_BYTES;
        let mut data = Vec::new();
        tokio::io::stdin().take(limit as u64 + 1).read_to_end(&mut data).await.context("reading standard input")?;
        if data.len() > limit {
            anyhow::bail!(
                "standard input is over the exec limit of {limit} bytes; upload it with `session cp` instead"
            );
        }
        req = req.stdin(data);
    }
    Ok(req)
}

/// Runs the command, streaming its output to this process's stdout/stderr (or,
/// with `--output json`, collecting it into one JSON document). Returns the
/// exit code to exit with.
pub async fn stream_exec(ctx: &Ctx, session: &proto::Session, req: ExecRequest) -> anyhow::Result<i32> {
    let mut stream = ctx.client.exec(session, req).await?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let json_mode = ctx.output == OutputFormat::Json;
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(d) if json_mode => out_buf.extend_from_slice(&d),
            ExecEvent::Stderr(d) if json_mode => err_buf.extend_from_slice(&d),
            ExecEvent::Stdout(d) => {
                stdout.write_all(&d).await.context("writing to stdout")?;
                stdout.flush().await.context("writing to stdout")?;
            }
            ExecEvent::Stderr(d) => {
                stderr.write_all(&d).await.context("writing to stderr")?;
                stderr.flush().await.context("writing to stderr")?;
            }
            ExecEvent::Exit(exit) => {
                if json_mode {
                    print_json(&json!({
                        "session_id": session.id,
                        "stdout": String::from_utf8_lossy(&out_buf),
                        "stderr": String::from_utf8_lossy(&err_buf),
                        "exit": serde_json::to_value(&exit)?,
                    }))?;
                }
                for note in exit_notes(&exit) {
                    eprintln!("sandfleet: {note}");
                }
                return Ok(exit_code_of(&exit));
            }
        }
    }
    Err(sandfleet::Error::Protocol("stream ended without an exit status".into()).into())
}

/// Why a command did not end on its own, one note per limit hit.
pub fn exit_notes(exit: &proto::ExitStatus) -> Vec<String> {
    let detail = |default: &str| {
        if exit.message.is_empty() {
            default.to_string()
        } else {
            exit.message.clone()
        }
    };
    let mut notes = Vec::new();
    if exit.timed_out {
        notes.push(format!("command timed out: {}", detail("the exec timeout expired")));
    }
    if exit.oom_killed {
        notes.push(format!("command ran out of memory: {}", detail("the OOM killer ended a process")));
    }
    if exit.output_truncated {
        notes.push(format!("output truncated: {}", detail("the output cap was reached")));
    }
    notes
}

/// `sandfleet run`, in one root span (`run`), so the create, the exec and
/// the delete, and all they cause in the coordinators, the agent and the
/// executor, are one trace; `--verbose` prints its id.
pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<i32> {
    let span = tracing::info_span!(parent: None, "run");
    if ctx.verbose {
        if let Some(id) = span.in_scope(sandfleet_common::trace_context::current_trace_id) {
            eprintln!("trace id: {id}");
        }
    }
    run_traced(ctx, args).instrument(span).await
}

async fn run_traced(ctx: &Ctx, args: RunArgs) -> anyhow::Result<i32> {
    let req = build_request(&args.exec).await?;
    let exec_timeout = args.exec.timeout.unwrap_or(sandfleet_common::limits::DEFAULT_EXEC_TIMEOUT);
    let ttl = args.ttl.unwrap_or(exec_timeout + args.wait_timeout + RUN_TTL_SLACK);
    let create = apply_resources(CreateSession::new(), &args.resources)
        .request_id(format!("cli-{}", uuid::Uuid::new_v4()))
        .ttl(ttl);
    let request_id = create.request_id.clone();

    let session = tokio::select! {
        r = ctx.client.create_session(create.clone()) => r?,
        _ = shutdown_signal() => {
            // The create may have gone through: repeat it (same request id, so
            // nothing new is made) to learn the session, and delete it.
            tracing::debug!(%request_id, "interrupted during create; cleaning up");
            let cleanup = async {
                let s = ctx.client.create_session(create).await?;
                ctx.client.delete_session(&s.id).await
            };
            let _ = tokio::time::timeout(CLEANUP_TIMEOUT, cleanup).await;
            return Ok(INTERRUPTED);
        }
    };
    let id = session.id.clone();
    tracing::debug!(%id, "session created");

    let work = async {
        let running = ctx.client.wait_running(&id, args.wait_timeout).await?;
        stream_exec(ctx, &running, req).await
    };
    let outcome = tokio::select! {
        r = work => Some(r),
        _ = shutdown_signal() => None,
    };

    // Delete the session whatever happened; a second Ctrl-C stops waiting for it.
    let cleanup = tokio::time::timeout(CLEANUP_TIMEOUT, ctx.client.delete_session(&id));
    tokio::select! {
        r = cleanup => match r {
            Ok(Ok(_)) => tracing::debug!(%id, "session deleted"),
            Ok(Err(e)) => eprintln!("sandfleet: warning: could not delete session {id}: {e}"),
            Err(_) => eprintln!("sandfleet: warning: could not delete session {id} in time; it expires after {}",
                humantime::format_duration(ttl)),
        },
        _ = shutdown_signal() => eprintln!("sandfleet: left session {id} to expire"),
    }

    match outcome {
        Some(r) => r,
        None => {
            eprintln!("sandfleet: interrupted");
            Ok(INTERRUPTED)
        }
    }
}

/// `sandfleet session exec`.
pub async fn session_exec(ctx: &Ctx, id: &str, args: ExecArgs) -> anyhow::Result<i32> {
    let req = build_request(&args).await?;
    let session = ctx.client.get_session(id).await?;
    stream_exec(ctx, &session, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_the_limit() {
        let ok = proto::ExitStatus::default();
        assert!(exit_notes(&ok).is_empty());
        let e = proto::ExitStatus { timed_out: true, message: "killed after 30s".into(), ..Default::default() };
        assert_eq!(exit_notes(&e), ["command timed out: killed after 30s"]);
        let e = proto::ExitStatus { oom_killed: true, output_truncated: true, ..Default::default() };
        assert_eq!(exit_notes(&e).len(), 2);
    }

    #[test]
    fn resources_apply() {
        let r = ResourceArgs {
            memory: Some(1 << 30),
            cpu: Some(250),
            cpu_request: Some(100),
            pids: Some(32),
            disk: Some(2 << 30),
            disk_inodes: Some(10_000),
            template: Some("python".into()),
            labels: vec![("a".into(), "b".into())],
            runtime: None,
            node_selector: vec![("zone".into(), "b".into())],
            idle_timeout: Some(Duration::from_secs(90)),
            lost_after: Some(Duration::from_secs(12)),
            max_attempts: Some(3),
            restart_backoff: Some(Duration::from_millis(500)),
        };
        let c = apply_resources(CreateSession::new(), &r);
        assert_eq!(c.spec.node_selector["zone"], "b");
        assert_eq!((c.spec.cpu_millis, c.spec.cpu_request_millis), (250, 100));
        assert_eq!(c.spec.idle_timeout_seconds, 90);
        let p = c.spec.restart_policy.unwrap();
        assert_eq!((p.lost_after_ms, p.max_attempts, p.backoff_ms), (12_000, 3, 500));
        assert_eq!(c.spec.memory_bytes, 1 << 30);
        assert_eq!(c.spec.cpu_millis, 250);
        assert_eq!(c.spec.pids_limit, 32);
        assert_eq!((c.spec.disk_bytes, c.spec.disk_inodes), (2 << 30, 10_000));
        assert_eq!(c.spec.template, "python");
        assert_eq!(c.spec.labels["a"], "b");
    }
}
