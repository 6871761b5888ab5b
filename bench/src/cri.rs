//! `sandfleet-bench cri`: the CRI runtime against raw CRI calls and Docker,
//! side by side in one run, against a real containerd started for the run
//! (`sandfleet_testkit::containerd`):
//!
//! - raw CRI create: `RunPodSandbox` + `CreateContainer` + `StartContainer` of
//!   the sandbox image (its executor as the command), timed at the client, as
//!   a kubelet would issue them (the anchor), then torn down untimed;
//! - cold create: `CreateSession` → RUNNING on an agent with `--runtime cri`
//!   (Raft commit, assignment, the pod sandbox and container, the executor
//!   answering, the report);
//! - warm create: the same from the agent's warm pool;
//! - exec round trip: `true` through the SDK (client → agent → executor →
//!   bwrap), against `ExecSync` of `true` into that session's own container;
//! - `docker run --rm --network none IMAGE true`, for scale.
//!
//! Goals (issue 16): cold create p50 ≤ 1.1× the raw CRI calls; exec p50 ≤
//! 0.3× `ExecSync`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_cri::v1 as cri;
use sandfleet::{CreateSession, ExecRequest};
use sandfleet_testkit::containerd::{cri_client, Containerd};
use sandfleet_testkit::{Cluster, ClusterBuilder};

use crate::docker::{create_series, ms, series_table, Series};

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

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    /// The image used.
    pub image: String,
    /// containerd's version.
    pub runtime: String,
    /// RunPodSandbox + CreateContainer + StartContainer.
    pub raw_create: Series,
    /// `docker run --rm IMAGE true`.
    pub docker_run: Series,
    /// Cold create → RUNNING.
    pub cold: Series,
    /// Warm create → RUNNING.
    pub warm: Series,
    /// Exec round trip of `true`.
    pub exec: Series,
    /// ExecSync `true` into the same container.
    pub exec_sync: Series,
}

type Cri = cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

fn spec(i: usize, tag: &str) -> CreateSession {
    CreateSession::new()
        .request_id(format!("bench-cri-{tag}-{}-{i}", std::process::id()))
        .template("python")
        .runtime("cri")
        .ttl(Duration::from_secs(600))
}

/// One coordinator and one agent on the CRI runtime.
async fn start_cluster(containerd: &Containerd, image: &str, pool: Option<u32>, child_log: &str) -> Result<Cluster> {
    let mut args: Vec<String> = [
        "--runtime",
        "cri",
        "--cri-endpoint",
        &containerd.endpoint(),
        "--cri-cgroup-parent",
        "/sandfleet-bench-cri/{host}",
        "--template-image",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("python={image}"));
    if let Some(n) = pool {
        args.extend(["--warm-pool".to_string(), format!("python={n}")]);
    }
    ClusterBuilder::new().coordinators(1).agents(1).agent_args(args).env("RUST_LOG", child_log).start().await
}

/// The raw calls a kubelet makes for one pod of one container: the anchor.
/// Returns the pod id (torn down by the caller, untimed).
async fn raw_pod(c: &mut Cri, image: &str, i: usize) -> Result<String> {
    let name = format!("bench-raw-{}-{i}", std::process::id());
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: name.clone(),
            namespace: "sandfleet-bench".into(),
            attempt: 0,
        }),
        hostname: "bench".into(),
        labels: HashMap::from([("sandfleet.bench".to_string(), "raw".to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/sandfleet-bench-raw/{name}"),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = c
        .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(pod.clone()), runtime_handler: String::new() })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "c".into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
        command: vec!["/bin/sleep".into(), "infinity".into()],
        ..Default::default()
    };
    let ctr = c
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: id.clone(),
            config: Some(config),
            sandbox_config: Some(pod),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    c.start_container(cri::StartContainerRequest { container_id: ctr }).await.context("StartContainer")?;
    Ok(id)
}

async fn remove_pod(c: &mut Cri, id: String) -> Result<()> {
    c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await.context("StopPodSandbox")?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await.context("RemovePodSandbox")?;
    Ok(())
}

/// Removes the (empty) cgroup directories the raw pods left, in every hierarchy.
fn remove_cgroups(prefix: &str) {
    for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let base = root.path().join(prefix);
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            for sub in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(sub.path());
            }
            let _ = std::fs::remove_dir(e.path());
        }
        let _ = std::fs::remove_dir(&base);
    }
}

/// Runs every measurement.
pub async fn run(s: &Settings) -> Result<Report> {
    let image = tokio::task::spawn_blocking(sandfleet_testkit::facilities::build_sandbox_image)
        .await?
        .map_err(anyhow::Error::msg)?;
    let img = image.clone();
    let containerd = tokio::task::spawn_blocking(move || Containerd::start(&[img.as_str()]))
        .await?
        .map_err(|e| anyhow!("starting the test containerd: {e}"))?;
    let mut c = cri_client(&containerd.endpoint()).await.map_err(anyhow::Error::msg)?;
    let v = c.version(cri::VersionRequest { version: "v1".into() }).await?.into_inner();
    let runtime = format!("{} {}", v.runtime_name, v.runtime_version);
    eprintln!("sandfleet-bench cri: image {image}, {runtime}");
    let child_log = std::env::var("SANDFLEET_CHILD_LOG").unwrap_or_else(|_| "warn".to_string());

    // Anchors: the raw CRI calls, and docker run.
    let mut raw_create = Series::new("raw CRI: RunPodSandbox + CreateContainer + StartContainer");
    for i in 0..s.warmup + s.creates {
        let t = Instant::now();
        let id = raw_pod(&mut c, &image, i).await?;
        let d = t.elapsed();
        remove_pod(&mut c, id).await?;
        if i >= s.warmup {
            raw_create.samples.push(d);
        }
    }
    remove_cgroups("sandfleet-bench-raw");
    eprintln!("  raw CRI create:       p50 {}", ms(raw_create.p50()));
    let mut docker_run = Series::new("`docker run --rm --network none IMAGE true`");
    for i in 0..s.warmup + s.creates.min(10) {
        let img = image.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            crate::docker::docker(&["run", "--rm", "--network", "none", "--entrypoint", "true", &img])
        })
        .await??;
        if i >= s.warmup {
            docker_run.samples.push(t.elapsed());
        }
    }
    eprintln!("  docker run --rm true: p50 {}", ms(docker_run.p50()));

    // Cold creates and exec round trips on an agent without a pool.
    let cluster = start_cluster(&containerd, &image, None, &child_log).await?;
    let client = cluster.try_client().await?;
    // A pause after each create: the deleted session's pod is torn down before the next create,
    // as the raw anchor's is (untimed there too).
    let runs = (s.warmup, s.creates);
    let cold = create_series(&client, runs, "cold create -> RUNNING (no pool)", Duration::from_millis(500), |i| {
        spec(i, "cold")
    })
    .await?;
    eprintln!("  cold create:          p50 {}", ms(cold.p50()));
    let created = client.create_session(spec(usize::MAX, "exec")).await.map_err(|e| anyhow!("create: {e}"))?;
    let sess =
        client.wait_running(&created.id, Duration::from_secs(60)).await.map_err(|e| anyhow!("wait_running: {e}"))?;
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
    let filter = cri::ContainerFilter {
        label_selector: HashMap::from([("sandfleet.session".to_string(), sess.id.clone())]),
        ..Default::default()
    };
    let ctrs = c.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await?.into_inner().containers;
    let Some(ctr) = ctrs.first() else { bail!("cannot find the container of session {}", sess.id) };
    let mut exec_sync = Series::new("`ExecSync true` (same container)");
    for i in 0..s.warmup + s.execs.min(100) {
        let t = Instant::now();
        let r = c
            .exec_sync(cri::ExecSyncRequest { container_id: ctr.id.clone(), cmd: vec!["true".into()], timeout: 10 })
            .await?
            .into_inner();
        let d = t.elapsed();
        if r.exit_code != 0 {
            bail!("ExecSync true exited with {}", r.exit_code);
        }
        if i >= s.warmup {
            exec_sync.samples.push(d);
        }
    }
    eprintln!("  ExecSync true:        p50 {}", ms(exec_sync.p50()));
    client.delete_session(&sess.id).await.map_err(|e| anyhow!("delete: {e}"))?;
    cluster.shutdown().await?;

    // Warm creates on an agent with a pool.
    let cluster = start_cluster(&containerd, &image, Some(s.pool), &child_log).await?;
    let client = cluster.try_client().await?;
    let refill = Duration::from_millis(400 * u64::from(s.pool.max(1)) + 600);
    tokio::time::sleep(refill * 2).await;
    let warm =
        create_series(&client, runs, "warm create -> RUNNING (from the pool)", refill, |i| spec(i, "warm")).await?;
    eprintln!("  warm create:          p50 {}", ms(warm.p50()));
    cluster.shutdown().await?;
    drop(containerd);
    remove_cgroups("sandfleet-bench-cri");
    Ok(Report { image, runtime, raw_create, docker_run, cold, warm, exec, exec_sync })
}

/// The results section.
pub fn render(r: &Report, s: &Settings, title: &str, machine: &[(String, String)]) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let create_ratio = r.cold.p50().as_secs_f64() / r.raw_create.p50().as_secs_f64().max(1e-9);
    let exec_ratio = r.exec.p50().as_secs_f64() / r.exec_sync.p50().as_secs_f64().max(1e-9);
    let mut out = String::new();
    let _ = writeln!(out, "{title}\n");
    let _ = writeln!(
        out,
        "Produced by `sandfleet-bench cri --creates {} --execs {} --pool {}`: a containerd started for the run ({}, \
         CRI plugin, runc, overlayfs, a CNI config that gives pods only `lo`), one coordinator and one agent with \
         `--runtime cri`, image `{}`, all measurements in the same run. Create -> RUNNING is measured at the SDK \
         (CreateSession, then WatchSession until RUNNING): the Raft commit, the assignment push, the pod sandbox and \
         container, the executor answering and the agent's report. The raw CRI anchor is the three calls a kubelet \
         makes for a one-container pod of the same image (a plain `sleep`, no hardening), timed at the client.\n",
        s.creates, s.execs, s.pool, r.runtime, r.image
    );
    series_table(&mut out, &[&r.raw_create, &r.cold, &r.warm, &r.docker_run, &r.exec, &r.exec_sync]);
    let _ = writeln!(out);
    let _ = writeln!(out, "| goal | measured | verdict |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| cold create p50 <= 1.1x the raw CRI calls | {} vs {} = **{create_ratio:.2}x** | {} |",
        ms(r.cold.p50()),
        ms(r.raw_create.p50()),
        verdict(create_ratio <= 1.1)
    );
    let _ = writeln!(
        out,
        "| exec p50 <= 0.3x `ExecSync` | {} vs {} = **{exec_ratio:.2}x** | {} |",
        ms(r.exec.p50()),
        ms(r.exec_sync.p50()),
        verdict(exec_ratio <= 0.3)
    );
    out.push('\n');
    crate::push_machine(&mut out, machine);
    out
}
