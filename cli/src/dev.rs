//! `sandfleet dev`: a coordinator (Raft id 1, bootstrapped) and a node agent
//! (process runtime by default, `--runtime docker` for containers), in this
//! process, for local development.
//!
//! Prints `sandfleet dev ready: endpoint http://<addr>` on stdout once both are
//! up; Ctrl-C or SIGTERM stops both within seconds (running execs end with
//! UNAVAILABLE) and exits 0; a second signal exits at once with code 130.

use super::DevArgs;

/// The agent's node id: this host's name as a DNS label, or `dev`.
#[cfg_attr(not(feature = "dev"), allow(dead_code))]
pub fn dev_node_id() -> String {
    let from_file = |p: &str| std::fs::read_to_string(p).ok();
    from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .and_then(|h| super::args::sanitize_dns_label(&h))
        .unwrap_or_else(|| "dev".to_string())
}

/// Runs until a shutdown signal; returns the exit code.
#[cfg(feature = "dev")]
pub async fn run(args: DevArgs) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    use sandfleet_agent::AgentConfig;
    use sandfleet_coordinator::CoordinatorConfig;
    use tokio_util::sync::CancellationToken;

    let coordinator_dir = args.data_dir.join("coordinator");
    let agent_dir = args.data_dir.join("agent");
    for dir in [&coordinator_dir, &agent_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let shutdown = CancellationToken::new();
    // The first SIGINT/SIGTERM stops both gracefully (running execs end with
    // UNAVAILABLE); a second one exits at once.
    let stop = shutdown.clone();
    sandfleet_common::signal::on_shutdown_signal(move || stop.cancel());

    let coordinator = sandfleet_coordinator::serve(
        CoordinatorConfig {
            id: 1,
            listen: args.listen,
            advertise: None,
            data_dir: coordinator_dir,
            bootstrap: true,
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting the coordinator on {}: {e}", args.listen))?;
    let endpoint = coordinator.addr();
    tracing::info!(%endpoint, "coordinator up");

    let agent = sandfleet_agent::serve(
        AgentConfig {
            node_id: args.node_id.clone().unwrap_or_else(dev_node_id),
            listen: args.agent_listen,
            advertise: None,
            coordinators: vec![endpoint.to_string()],
            runtime: args.runtime,
            // A laptop runs dozens of mostly idle sandboxes: offer 4x the cores.
            cpu_overcommit: sandfleet_agent::DEV_CPU_OVERCOMMIT,
            // Workspaces kept in a local store, as the agent binary does by default.
            store: sandfleet_agent::store::StoreConfig::Local { root: agent_dir.join("workspace-store") },
            data_dir: agent_dir,
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await;
    let agent = match agent {
        Ok(a) => a,
        Err(e) => {
            shutdown.cancel();
            if let Err(ce) = coordinator.join().await {
                tracing::warn!(error = %ce, "coordinator stopped with an error");
            }
            anyhow::bail!("starting the node agent on {}: {e}", args.agent_listen);
        }
    };
    tracing::info!(addr = %agent.addr(), runtime = ?args.runtime, "node agent up and registered");

    super::output::out(&format!("{}http://{endpoint}\n", sandfleet_common::ready::DEV_READY_PREFIX))?;
    eprintln!("export SANDFLEET_ENDPOINT={endpoint}");

    let coordinator_done = coordinator.join();
    let agent_done = agent.join();
    tokio::pin!(coordinator_done, agent_done);
    // A signal cancels `shutdown`, and the coordinator and the agent, which
    // watch the same token, may finish before this select looks at it: with
    // the token cancelled, their end is the shutdown, not a failure.
    tokio::select! {
        biased;
        () = shutdown.cancelled() => tracing::info!("shutting down"),
        r = &mut coordinator_done => {
            if shutdown.is_cancelled() {
                let a = agent_done.await;
                r.map_err(|e| anyhow::anyhow!("the coordinator failed while stopping: {e}"))?;
                a.map_err(|e| anyhow::anyhow!("the node agent failed while stopping: {e}"))?;
                return Ok(0);
            }
            shutdown.cancel();
            let agent_result = agent_done.await;
            if let Err(e) = agent_result {
                tracing::warn!(error = %e, "node agent stopped with an error");
            }
            return match r {
                Ok(()) => Err(anyhow::anyhow!("the coordinator stopped unexpectedly")),
                Err(e) => Err(anyhow::anyhow!("the coordinator failed: {e}")),
            };
        }
        r = &mut agent_done => {
            if shutdown.is_cancelled() {
                let c = coordinator_done.await;
                c.map_err(|e| anyhow::anyhow!("the coordinator failed while stopping: {e}"))?;
                r.map_err(|e| anyhow::anyhow!("the node agent failed while stopping: {e}"))?;
                return Ok(0);
            }
            shutdown.cancel();
            if let Err(e) = coordinator_done.await {
                tracing::warn!(error = %e, "coordinator stopped with an error");
            }
            return match r {
                Ok(()) => Err(anyhow::anyhow!("the node agent stopped unexpectedly")),
                Err(e) => Err(anyhow::anyhow!("the node agent failed: {e}")),
            };
        }
    }
    shutdown.cancel();
    let (c, a) = tokio::join!(coordinator_done, agent_done);
    c.map_err(|e| anyhow::anyhow!("the coordinator failed while stopping: {e}"))?;
    a.map_err(|e| anyhow::anyhow!("the node agent failed while stopping: {e}"))?;
    Ok(0)
}

/// Without the `dev` feature there is nothing to run.
#[cfg(not(feature = "dev"))]
pub async fn run(_args: DevArgs) -> anyhow::Result<i32> {
    anyhow::bail!("this sandfleet was built without the `dev` feature (rebuild with `--features dev`)")
}
