//! `sandfleet-bench python`: the Python SDK (`sdk/python`) against the Rust
//! SDK, in the same run, on the same cluster (1 coordinator and 1
//! process-runtime agent on loopback, mutual TLS as the testkit makes it).
//!
//! The Python side is `bench/python/driver.py`, started once with the
//! cluster in `SANDFLEET_ENDPOINT` and `SANDFLEET_TLS_*` and driven over its
//! stdin one batch at a time, so its interpreter and channels are warm and the
//! two SDKs alternate batch by batch (drift of the machine hits both):
//!
//! - **exec round trip**: `true` in one warm session per SDK (Rust:
//!   `exec_collect`; Python: `Session.exec`, which collects the output too).
//! - **create -> RUNNING**: a create and the wait until the session runs
//!   (Rust: `create_session` + `wait_running`; Python:
//!   `sessions.create(wait=True)`), the session deleted outside the clock.
//!
//! Goal: the Python figures at most 1.2x the Rust ones at p50.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::millis as ms;
use anyhow::{anyhow, bail, Context, Result};
use sandfleet::{Client, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{ClusterBuilder, NetworkChoice};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The goal: Python figures at most this many times the Rust ones (p50).
pub const GOAL_RATIO: f64 = 1.2;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Measured exec round trips per SDK.
    pub runs: usize,
    /// Unmeasured exec round trips per SDK first.
    pub warmup: usize,
    /// Measured create -> RUNNING per SDK.
    pub creates: usize,
    /// Batches per measurement and SDK (the SDKs alternate batch by batch).
    pub rounds: usize,
    /// The interpreter that runs the driver; it must import `sandfleet`.
    pub python: PathBuf,
}

/// The interpreter to use when none is given: the virtualenv `scripts/test-python`
/// makes (`$SANDFLEET_VENV`, else `~/.cache/sandfleet-venv-py`), else `python3`.
pub fn default_python() -> PathBuf {
    let venv = std::env::var_os("SANDFLEET_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sandfleet-venv-py")));
    match venv.map(|v| v.join("bin/python")) {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("python3"),
    }
}

#[derive(Debug, Default)]
pub struct Side {
    pub exec: Vec<Duration>,
    pub running: Vec<Duration>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rust: Side,
    pub python: Side,
    /// What the driver said it runs: Python, grpcio and SDK versions.
    pub python_versions: String,
}

/// The driver process and its pipes.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Driver {
    async fn start(python: &Path, endpoint: &str, env: &[(String, String)]) -> Result<(Driver, serde_json::Value)> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/driver.py");
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(&script)
            .env("SANDFLEET_ENDPOINT", endpoint)
            .env_remove("SANDFLEET_API_KEY")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("the driver has no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("the driver has no stdout"))?;
        let mut driver = Driver { child, stdin, lines: BufReader::new(stdout).lines() };
        let ready = tokio::time::timeout(Duration::from_secs(120), driver.answer())
            .await
            .map_err(|_| anyhow!("the Python driver was not ready within 120 s"))??;
        if ready.get("ready").is_none() {
            bail!("the Python driver did not start: {ready}");
        }
        Ok((driver, ready))
    }

    async fn answer(&mut self) -> Result<serde_json::Value> {
        let line = self.lines.next_line().await?.ok_or_else(|| anyhow!("the Python driver exited"))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the Python driver said {line:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("the Python driver failed: {e}");
        }
        Ok(v)
    }

    /// Runs `n` operations `op` and returns their latencies.
    async fn batch(&mut self, op: &str, n: usize) -> Result<Vec<Duration>> {
        let cmd = serde_json::json!({ "op": op, "n": n }).to_string();
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let v = self.answer().await?;
        let samples = v
            .get("ms")
            .and_then(|m| m.as_array())
            .ok_or_else(|| anyhow!("the Python driver's answer has no latencies: {v}"))?;
        samples
            .iter()
            .map(|x| x.as_f64().map(|f| Duration::from_secs_f64(f / 1000.0)).ok_or_else(|| anyhow!("bad latency {x}")))
            .collect()
    }

    async fn quit(mut self) -> Result<()> {
        self.stdin.write_all(b"{\"op\": \"quit\"}\n").await?;
        self.stdin.flush().await?;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the Python driver exited with {status}");
                }
                Ok(())
            }
            Err(_) => bail!("the Python driver did not exit within 30 s"),
        }
    }
}

fn spec(tag: &str) -> CreateSession {
    CreateSession::new()
        .request_id(tag.to_string())
        .memory_bytes(128 << 20)
        .cpu_millis(250)
        .pids_limit(64)
        .ttl(Duration::from_secs(600))
}

async fn rust_execs(client: &Client, session: &sandfleet::proto::Session, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.exec_collect(session, ExecRequest::argv(["true"])).await.map_err(|e| anyhow!("exec: {e}"))?;
        out.push(t.elapsed());
        if r.exit.exit_code != 0 {
            bail!("exec true exited with {:?}", r.exit);
        }
    }
    Ok(out)
}

async fn rust_creates(client: &Client, n: usize, next: &mut usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        *next += 1;
        let t = Instant::now();
        let s = client
            .create_session(spec(&format!("bench-rs-{}-{next}", std::process::id())))
            .await
            .map_err(|e| anyhow!("create: {e}"))?;
        client.wait_running(&s.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
        out.push(t.elapsed());
        client.delete_session(&s.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    }
    Ok(out)
}

/// `total` split into `rounds` batches (the first ones one larger).
fn split(total: usize, rounds: usize) -> Vec<usize> {
    (0..rounds).map(|i| total / rounds + usize::from(i < total % rounds)).collect()
}

pub async fn run(settings: &Settings, child_log: &str) -> Result<Report> {
    eprintln!("sandfleet-bench python: starting a cluster and the Python driver ({})", settings.python.display());
    let cluster = ClusterBuilder::new()
        .network(NetworkChoice::Loopback)
        .coordinators(1)
        .agents(1)
        .env("RUST_LOG", child_log)
        .start()
        .await?;
    let client = cluster.try_client().await?;
    let (mut driver, ready) = Driver::start(&settings.python, &cluster.endpoint(), &cluster.cli_env()).await?;
    let mut report = Report {
        python_versions: format!(
            "Python {}, grpcio {}, sandfleet (Python SDK) {}",
            ready.get("python").and_then(|v| v.as_str()).unwrap_or("?"),
            ready.get("grpcio").and_then(|v| v.as_str()).unwrap_or("?"),
            ready.get("sdk").and_then(|v| v.as_str()).unwrap_or("?"),
        ),
        ..Report::default()
    };
    let created = client
        .create_session(spec(&format!("bench-rs-{}-warm", std::process::id())))
        .await
        .map_err(|e| anyhow!("create: {e}"))?;
    let warm = client.wait_running(&created.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait: {e}"))?;

    // Warm-up, unmeasured, both sides.
    rust_execs(&client, &warm, settings.warmup).await?;
    driver.batch("exec", settings.warmup).await?;

    let mut next = 0usize;
    let execs = split(settings.runs, settings.rounds);
    let creates = split(settings.creates, settings.rounds);
    for round in 0..settings.rounds {
        // Alternate which SDK goes first.
        for python in if round % 2 == 0 { [false, true] } else { [true, false] } {
            if python {
                report.python.exec.extend(driver.batch("exec", execs[round]).await?);
                report.python.running.extend(driver.batch("create", creates[round]).await?);
            } else {
                report.rust.exec.extend(rust_execs(&client, &warm, execs[round]).await?);
                report.rust.running.extend(rust_creates(&client, creates[round], &mut next).await?);
            }
        }
        eprintln!(
            "  round {}/{}: exec p50 Rust {:.2} ms, Python {:.2} ms; create -> RUNNING p50 Rust {:.2} ms, Python {:.2} ms",
            round + 1,
            settings.rounds,
            ms(percentile(&report.rust.exec, 50.0)),
            ms(percentile(&report.python.exec, 50.0)),
            ms(percentile(&report.rust.running, 50.0)),
            ms(percentile(&report.python.running, 50.0)),
        );
    }
    driver.quit().await?;
    client.delete_session(&warm.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    cluster.shutdown().await?;
    Ok(report)
}

pub fn render(r: &Report, s: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench python --runs {} --creates {} --rounds {}`: one coordinator and one \
         process-runtime agent on loopback (mutual TLS), the Rust SDK in the bench and the Python SDK \
         (`sdk/python`, {}) in `bench/python/driver.py`, started once and warm, measured in the same run on the \
         same cluster, the two alternating in {} batches. Exec: `true` in a warm session ({} runs each, after {} \
         unmeasured). Create -> RUNNING: create, then wait until RUNNING, one session at a time ({} each), deleted \
         outside the clock.\n",
        s.runs, s.creates, s.rounds, r.python_versions, s.rounds, s.runs, s.warmup, s.creates
    );
    let _ = writeln!(out, "| measurement | Rust SDK p50 | Rust SDK p99 | Python SDK p50 | Python SDK p99 | Python / Rust (p50) | goal (≤ {GOAL_RATIO}x) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for (name, rust, python) in [
        ("exec round trip (`true`, warm session)", &r.rust.exec, &r.python.exec),
        ("create -> RUNNING", &r.rust.running, &r.python.running),
    ] {
        let (a, b) = (percentile(rust, 50.0), percentile(python, 50.0));
        let ratio = b.as_secs_f64() / a.as_secs_f64().max(1e-9);
        let verdict = if ratio <= GOAL_RATIO { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {ratio:.2}x | {verdict} |",
            ms(a),
            ms(percentile(rust, 99.0)),
            ms(b),
            ms(percentile(python, 99.0)),
        );
    }
    let _ = writeln!(out);
    crate::push_machine(&mut out, machine);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_add_up() {
        assert_eq!(split(10, 4), [3, 3, 2, 2]);
        assert_eq!(split(200, 4).iter().sum::<usize>(), 200);
        assert_eq!(split(3, 4), [1, 1, 1, 0]);
    }
}
