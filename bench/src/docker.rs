//! `sandfleet-bench docker`: the docker runtime against plain Docker, side
//! by side in one run on this machine.
//!
//! - cold create: `CreateSession` → RUNNING on an agent with `--runtime docker`
//!   and no warm pool (a hardened container is created and started and its
//!   executor answers), against `docker run --rm --network none IMAGE true`
//!   (the anchor: create + start + run + remove of the same image);
//! - warm create: the same on an agent with `--warm-pool python=N`, waiting
//!   between creates so that every one is served from the pool;
//! - exec round trip: `true` through the SDK (client → agent → executor →
//!   bwrap) in one session, against `docker exec CONTAINER true` into that
//!   session's own container.
//!
//! Goals (issue 5): cold create p50 no slower than `docker run`; warm create
//! p50 ≤ 30 ms; exec p50 ≤ 1/5 of `docker exec`.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandfleet::{Client, CreateSession, ExecRequest};
use sandfleet_testkit::helpers::percentile;
use sandfleet_testkit::{Cluster, ClusterBuilder};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Measured runs of each create measurement.
    pub creates: usize,
    /// Measured exec round trips.
    pub execs: usize,
    /// Warm-up runs before each measurement.
    pub warmup: usize,
    /// Warm pool size of the warm-create agent.
    pub pool: u32,
}

/// One measured series.
#[derive(Debug, Clone)]
pub struct Series {
    /// What it measures.
    pub name: String,
    /// The samples.
    pub samples: Vec<Duration>,
}

impl Series {
    pub(crate) fn new(name: &str) -> Self {
        Self { name: name.to_string(), samples: Vec::new() }
    }
    /// Median.
    pub fn p50(&self) -> Duration {
        percentile(&self.samples, 50.0)
    }
    /// 99th percentile.
    pub fn p99(&self) -> Duration {
        percentile(&self.samples, 99.0)
    }
    /// Maximum.
    pub fn max(&self) -> Duration {
        self.samples.iter().max().copied().unwrap_or_default()
    }
}

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// The image used.
    pub image: String,
    /// `docker run --rm IMAGE true`.
    pub docker_run: Series,
    /// Cold create → RUNNING.
    pub cold: Series,
    /// Warm create → RUNNING.
    pub warm: Series,
    /// Exec round trip of `true`.
    pub exec: Series,
    /// `docker exec CONTAINER true`.
    pub docker_exec: Series,
    /// Docker server version.
    pub engine: String,
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds (or finds, by content hash) the sandbox image with this build's executor.
fn image() -> Result<String> {
    sandfleet_testkit::facilities::build_sandbox_image().map_err(anyhow::Error::msg)
}

fn spec(i: usize, tag: &str) -> CreateSession {
    CreateSession::new()
        .request_id(format!("bench-docker-{tag}-{}-{i}", std::process::id()))
        .template("python")
        .runtime("docker")
        .ttl(Duration::from_secs(600))
}

/// One coordinator and one agent on the docker runtime with the python
/// template on `image`, and a warm pool of `pool` when given.
async fn start_cluster(image: &str, pool: Option<u32>, child_log: &str) -> Result<Cluster> {
    let mut args = vec!["--runtime".to_string(), "docker".to_string(), "--template-image".to_string()];
    args.push(format!("python={image}"));
    if let Some(n) = pool {
        args.extend(["--warm-pool".to_string(), format!("python={n}")]);
    }
    ClusterBuilder::new().coordinators(1).agents(1).agent_args(args).env("RUST_LOG", child_log).start().await
}

/// Create -> RUNNING of `warmup + creates` sessions one at a time (the
/// `i`th made by `spec(i)`), each deleted once RUNNING, with `pause` after
/// each; the first `warmup` are not measured. Shared by the container benches.
pub(crate) async fn create_series(
    client: &Client,
    (warmup, creates): (usize, usize),
    name: &str,
    pause: Duration,
    spec: impl Fn(usize) -> CreateSession,
) -> Result<Series> {
    let mut series = Series::new(name);
    for i in 0..warmup + creates {
        let t = Instant::now();
        let c = client.create_session(spec(i)).await.map_err(|e| anyhow!("create: {e}"))?;
        let sess =
            client.wait_running(&c.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
        let d = t.elapsed();
        client.delete_session(&sess.id).await.map_err(|e| anyhow!("delete: {e}"))?;
        if i >= warmup {
            series.samples.push(d);
        }
        tokio::time::sleep(pause).await;
    }
    Ok(series)
}

/// Runs every measurement.
pub async fn run(s: &Settings) -> Result<Report> {
    let engine = docker(&["info", "--format", "{{.ServerVersion}}"]).context("the Docker engine must be running")?;
    let image = tokio::task::spawn_blocking(image).await??;
    eprintln!("sandfleet-bench docker: image {image}, engine {engine}");
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());

    // Anchor: docker run --rm IMAGE true.
    let mut docker_run = Series::new("`docker run --rm --network none IMAGE true`");
    for i in 0..s.warmup + s.creates {
        let img = image.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            docker(&["run", "--rm", "--network", "none", "--entrypoint", "true", &img])
        })
        .await??;
        if i >= s.warmup {
            docker_run.samples.push(t.elapsed());
        }
    }
    eprintln!("  docker run --rm true: p50 {}", ms(docker_run.p50()));

    // Cold creates, then exec round trips, on an agent without a pool.
    let cluster = start_cluster(&image, None, &child_log).await?;
    let client = cluster.try_client().await?;
    let runs = (s.warmup, s.creates);
    let cold =
        create_series(&client, runs, "cold create -> RUNNING (no pool)", Duration::ZERO, |i| spec(i, "cold")).await?;
    eprintln!("  cold create:          p50 {}", ms(cold.p50()));

    let c = client.create_session(spec(usize::MAX, "exec")).await.map_err(|e| anyhow!("create: {e}"))?;
    let sess = client.wait_running(&c.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
    let mut exec = Series::new("exec round trip (`true`, SDK -> agent -> executor -> bwrap)");
    for i in 0..s.warmup + s.execs {
        let t = Instant::now();
        let out = client.exec_collect(&sess, ExecRequest::argv(["true"])).await.map_err(|e| anyhow!("exec: {e}"))?;
        let d = t.elapsed();
        if out.exit.exit_code != 0 {
            bail!("exec true exited with {:?}", out.exit);
        }
        if i >= s.warmup {
            exec.samples.push(d);
        }
    }
    eprintln!("  exec round trip:      p50 {}", ms(exec.p50()));
    let name = docker(&["ps", "--filter", &format!("label=sandfleet.session={}", sess.id), "--format", "{{.Names}}"])?;
    if name.is_empty() {
        bail!("cannot find the container of session {}", sess.id);
    }
    let mut docker_exec = Series::new("`docker exec CONTAINER true` (same container)");
    for i in 0..s.warmup + s.execs.min(100) {
        let n = name.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || docker(&["exec", &n, "true"])).await??;
        if i >= s.warmup {
            docker_exec.samples.push(t.elapsed());
        }
    }
    eprintln!("  docker exec true:     p50 {}", ms(docker_exec.p50()));
    client.delete_session(&sess.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    cluster.shutdown().await?;

    // Warm creates on an agent with a pool.
    let cluster = start_cluster(&image, Some(s.pool), &child_log).await?;
    let client = cluster.try_client().await?;
    // Let the pool fill, and refill between creates (a container start takes a few hundred ms).
    let refill = Duration::from_millis(400 * u64::from(s.pool.max(1)) + 600);
    tokio::time::sleep(refill * 2).await;
    let warm =
        create_series(&client, runs, "warm create -> RUNNING (from the pool)", refill, |i| spec(i, "warm")).await?;
    eprintln!("  warm create:          p50 {}", ms(warm.p50()));
    cluster.shutdown().await?;
    Ok(Report { image, docker_run, cold, warm, exec, docker_exec, engine })
}

/// The table of measured series (p50, p99, max, runs) of a results section.
pub(crate) fn series_table(out: &mut String, series: &[&Series]) {
    let _ = writeln!(out, "| measurement | p50 | p99 | max | runs |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for s in series {
        let _ =
            writeln!(out, "| {} | {} | {} | {} | {} |", s.name, ms(s.p50()), ms(s.p99()), ms(s.max()), s.samples.len());
    }
}

/// The results section.
pub fn render(r: &Report, s: &Settings, title: &str, machine: &[(String, String)]) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let cold_ratio = r.cold.p50().as_secs_f64() / r.docker_run.p50().as_secs_f64().max(1e-9);
    let exec_ratio = r.exec.p50().as_secs_f64() / r.docker_exec.p50().as_secs_f64().max(1e-9);
    let warm_ok = r.warm.p50() <= Duration::from_millis(30);
    let mut out = String::new();
    let _ = writeln!(out, "{title}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench docker --creates {} --execs {} --pool {}`: one coordinator and one agent with \
         `--runtime docker` (Docker {}), image `{}`, all measurements in the same run. Creates use template `python` \
         with the default limits; create -> RUNNING is measured at the SDK (CreateSession, then WatchSession until \
         RUNNING), so it includes the Raft commit, the assignment push and the agent's report.\n",
        s.creates, s.execs, s.pool, r.engine, r.image
    );
    series_table(&mut out, &[&r.docker_run, &r.cold, &r.warm, &r.exec, &r.docker_exec]);
    let _ = writeln!(out);
    let _ = writeln!(out, "| goal | measured | verdict |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| cold create p50 <= `docker run` p50 | {} vs {} = **{cold_ratio:.2}x** | {} |",
        ms(r.cold.p50()),
        ms(r.docker_run.p50()),
        verdict(cold_ratio <= 1.0)
    );
    let _ = writeln!(out, "| warm create p50 <= 30 ms | **{}** | {} |", ms(r.warm.p50()), verdict(warm_ok));
    let _ = writeln!(
        out,
        "| exec p50 <= 1/5 of `docker exec` p50 | {} vs {} = **{exec_ratio:.2}x** (goal <= 0.20x) | {} |",
        ms(r.exec.p50()),
        ms(r.docker_exec.p50()),
        verdict(exec_ratio <= 0.2)
    );
    out.push('\n');
    crate::push_machine(&mut out, machine);
    out
}
