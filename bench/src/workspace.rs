//! `sandfleet-bench workspace`: the agent's workspace sync and restore against
//! `aws s3 sync` (awscli), both on the same S3-compatible server
//! (`sandfleet-s3-server`, s3s-fs) in the same run.
//!
//! The workspace: `files` files totalling `total_mib` MiB of random bytes (most
//! small, a few large, like a source tree with some data files). Measured,
//! each `runs` times with a fresh prefix (median reported):
//! - first sync: everything uploaded (`Syncer::sync_now` vs `aws s3 sync DIR s3://...`);
//! - no-change sync: nothing changed since the last one;
//! - restore: into an empty directory (`Syncer::restore` vs `aws s3 sync s3://... DIR`).
//!
//! Ours runs in-process through the same code the agent runs (the agent adds
//! only a gRPC hop on top); awscli runs as the CLI a user would script.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use sandfleet_agent::store::s3::{S3Config, S3Store};
use sandfleet_agent::store::sync::{SyncConfig, Syncer};
use sandfleet_agent::store::WorkspaceStore;
use sandfleet_agent::workspace::Workspace;
use sandfleet_testkit::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use tokio_util::sync::CancellationToken;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Files in the workspace.
    pub files: usize,
    /// Total size in MiB.
    pub total_mib: u64,
    /// Repetitions of each measurement.
    pub runs: usize,
}

/// Medians of one tool.
#[derive(Debug, Clone, Default)]
pub struct Times {
    pub first_sync: Duration,
    pub nochange_sync: Duration,
    pub restore: Duration,
}

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub ours: Times,
    pub aws: Times,
    pub aws_version: String,
    pub bytes: u64,
    pub files: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Writes the test workspace: `files` files, ~`total` bytes; 1% of the
/// files carry half the bytes.
fn make_workspace(dir: &Path, files: usize, total: u64) -> Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let big = (files / 100).max(1);
    let small = files - big;
    let small_each = (total / 2) / small.max(1) as u64;
    let big_each = (total - small_each * small as u64) / big as u64;
    let mut written = 0;
    for i in 0..files {
        let size = if i < small { small_each } else { big_each };
        let sub = dir.join(format!("src/mod{:02}", i % 20));
        std::fs::create_dir_all(&sub)?;
        let mut data = vec![0u8; size as usize];
        rng.fill(&mut data[..]);
        std::fs::write(sub.join(format!("file{i:04}.bin")), &data)?;
        written += size;
    }
    Ok(written)
}

fn aws(args: &[&str], endpoint: &str, config: &Path) -> Result<Duration> {
    let started = Instant::now();
    let out = Command::new("aws")
        .args(args)
        .args(["--endpoint-url", endpoint, "--only-show-errors"])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", config)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .context("running aws (install awscli: bench/setup)")?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!("aws {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

fn same_tree(a: &Path, b: &Path) -> Result<()> {
    let out = Command::new("diff").arg("-r").arg(a).arg(b).output()?;
    if !out.status.success() {
        bail!(
            "restored tree differs from the original: {}",
            String::from_utf8_lossy(&out.stdout).lines().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

/// Runs the comparison.
pub async fn run(s: &Settings) -> Result<Report> {
    let tmp = tempfile::tempdir()?;
    let s3 = S3Server::start(tmp.path()).await?;
    let src = tmp.path().join("workspace");
    std::fs::create_dir_all(&src)?;
    let bytes = make_workspace(&src, s.files, s.total_mib << 20)?;
    eprintln!("sandfleet-bench: workspace of {} files, {} MiB", s.files, bytes >> 20);
    let aws_config = tmp.path().join("aws-config");
    std::fs::write(&aws_config, "[default]\ns3 =\n  addressing_style = path\n  max_concurrent_requests = 10\n")?;
    let aws_version = Command::new("aws")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // The SDK takes credentials from the standard chain: the environment here.
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
    let mut ours = (Vec::new(), Vec::new(), Vec::new());
    let mut theirs = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..s.runs {
        // Ours: a fresh prefix per run, so the first sync uploads everything.
        let store: Arc<dyn WorkspaceStore> = Arc::new(
            S3Store::new(S3Config {
                endpoint: Some(s3.endpoint()),
                bucket: BUCKET.into(),
                prefix: format!("bench-{run}"),
                path_style: true,
                ..Default::default()
            })
            .await?,
        );
        let stop = CancellationToken::new();
        let cfg = SyncConfig { interval: Duration::from_secs(3600), ..Default::default() };
        let sid = uuid_like(run);
        let syncer = Syncer::new(store.clone(), cfg.clone(), stop.clone());
        syncer.restore(&sid, 1, Workspace::new(&src, uid, gid), false).await?;
        let t = Instant::now();
        let st = syncer.sync_now(&sid).await?;
        ours.0.push(t.elapsed());
        if st.transferred_bytes != bytes {
            bail!("first sync sent {} bytes, expected {bytes}", st.transferred_bytes);
        }
        let t = Instant::now();
        let st = syncer.sync_now(&sid).await?;
        ours.1.push(t.elapsed());
        if !st.unchanged {
            bail!("a sync with nothing changed wrote a manifest");
        }
        let dst = tmp.path().join(format!("restore-ours-{run}"));
        std::fs::create_dir_all(&dst)?;
        let other = Syncer::new(store, cfg, stop.clone());
        let t = Instant::now();
        other.restore(&sid, 2, Workspace::new(&dst, uid, gid), false).await?;
        ours.2.push(t.elapsed());
        same_tree(&src, &dst)?;
        stop.cancel();

        // awscli, same server, same tree.
        let url = format!("s3://{BUCKET}/aws-{run}/");
        let src_s = src.display().to_string();
        theirs.0.push(aws(&["s3", "sync", &src_s, &url], &s3.endpoint(), &aws_config)?);
        theirs.1.push(aws(&["s3", "sync", &src_s, &url], &s3.endpoint(), &aws_config)?);
        let dst = tmp.path().join(format!("restore-aws-{run}"));
        let dst_s = dst.display().to_string();
        theirs.2.push(aws(&["s3", "sync", &url, &dst_s], &s3.endpoint(), &aws_config)?);
        same_tree(&src, &dst)?;
        eprintln!(
            "sandfleet-bench: run {}: ours {:.2?} / {:.2?} / {:.2?}, aws {:.2?} / {:.2?} / {:.2?}",
            run + 1,
            ours.0[run],
            ours.1[run],
            ours.2[run],
            theirs.0[run],
            theirs.1[run],
            theirs.2[run]
        );
        let _ = std::fs::remove_dir_all(tmp.path().join(format!("restore-ours-{run}")));
        let _ = std::fs::remove_dir_all(&dst);
    }
    Ok(Report {
        ours: Times { first_sync: median(ours.0), nochange_sync: median(ours.1), restore: median(ours.2) },
        aws: Times { first_sync: median(theirs.0), nochange_sync: median(theirs.1), restore: median(theirs.2) },
        aws_version,
        bytes,
        files: s.files,
    })
}

fn uuid_like(run: usize) -> String {
    format!("0190b8f2-1c3d-7e4f-8a9b-{:012x}", run + 1)
}

/// The results section.
pub fn render(r: &Report, s: &Settings, title: &str, machine: &[(String, String)]) -> String {
    let mib = r.bytes as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let _ = writeln!(out, "{title}\n");
    let _ = writeln!(
        out,
        "Workspace of {} files, {:.0} MiB of random bytes (99% small files with half the bytes, 1% large), synced to and restored from \
         `sandfleet-s3-server` (s3s-fs on loopback) by the agent's sync engine and by `aws s3 sync` in the same run; median of {} runs.\n",
        r.files, mib, s.runs
    );
    for (k, v) in machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(out, "- awscli: {}\n", r.aws_version);
    let _ = writeln!(out, "| measurement | sandfleet | aws s3 sync | ratio (aws / ours) | goal |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    let row = |out: &mut String, what: &str, a: Duration, b: Duration, with_rate: bool| {
        let verdict = if a <= b { "met" } else { "MISSED" };
        let (ra, rb) = if with_rate {
            (format!(" ({:.0} MiB/s)", rate(a)), format!(" ({:.0} MiB/s)", rate(b)))
        } else {
            Default::default()
        };
        let _ = writeln!(
            out,
            "| {what} | {:.2?}{ra} | {:.2?}{rb} | {:.2}x | as fast or faster: {verdict} |",
            a,
            b,
            b.as_secs_f64() / a.as_secs_f64().max(1e-9)
        );
    };
    row(&mut out, "first sync (upload all)", r.ours.first_sync, r.aws.first_sync, true);
    row(&mut out, "sync, nothing changed", r.ours.nochange_sync, r.aws.nochange_sync, false);
    row(&mut out, "restore into an empty dir", r.ours.restore, r.aws.restore, true);
    out
}
