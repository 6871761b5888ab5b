//! `sandfleet-bench telemetry`: what metrics and trace propagation cost at
//! their defaults, against `SANDFLEET_TELEMETRY=off` (logs only), in the same
//! run ([`crate::pair`]): two clusters of the same shape (3 coordinators, 1
//! process-runtime agent, loopback, mutual TLS).
//!
//! The candidate runs as deployed: every process with `--metrics-listen`,
//! every `/metrics` scraped once a second (as a Prometheus with a 1 s scrape
//! interval would, fifteen times the usual rate), the W3C propagator
//! installed; no OTLP endpoint (the default). The baseline has no meter
//! provider (every instrument is a no-op) and no propagator.
//!
//! Goal: at most 3% slower on the exec round trip and on create throughput.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use sandfleet_common::telemetry::TELEMETRY_ENV;
use sandfleet_testkit::Target;

use crate::pair::{self, Report, Settings};

/// The goal: figures with telemetry at most this much worse than without.
pub const GOAL_OVERHEAD: f64 = 0.03;

/// What the scraper saw.
#[derive(Debug, Default)]
pub struct Scrapes {
    pub ok: u64,
    pub failed: u64,
    pub bytes: u64,
}

pub async fn run(settings: &Settings, child_log: &str) -> Result<(Report, Scrapes)> {
    let on = pair::start(pair::builder(child_log).metrics_listeners(true), "telemetry-on").await?;
    let off = pair::start(pair::builder(child_log).env(TELEMETRY_ENV, "off"), "telemetry-off").await?;
    let mut targets = Vec::new();
    for t in (0..3).map(Target::Coordinator).chain([Target::Agent(0)]) {
        match on.cluster.metrics_addr(t) {
            Some(addr) => targets.push(addr),
            None => bail!("{t:?} has no metrics listener"),
        }
    }
    let (ok, failed, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let scraper = {
        let (ok, failed, bytes) = (ok.clone(), failed.clone(), bytes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                for addr in &targets {
                    match sandfleet_testkit::prometheus::http_get(addr, "/metrics").await {
                        Ok((200, body)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    let report = pair::measure(settings, [&off, &on], ["off", "defaults"]).await;
    scraper.abort();
    on.cluster.shutdown().await?;
    off.cluster.shutdown().await?;
    let scrapes = Scrapes {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
    };
    Ok((report?, scrapes))
}

pub fn render(r: &Report, scrapes: &Scrapes, s: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `{}`: two clusters of 3 coordinators and 1 process-runtime agent on loopback with mutual \
         TLS, measured in the same run. \"defaults\": metrics on (`--metrics-listen` on every process, each \
         `/metrics` scraped every second) and the W3C trace propagator, no OTLP endpoint. \"off\": \
         `{TELEMETRY_ENV}=off` (no meter provider, no propagator; logs only). {}\n",
        s.command_line("telemetry"),
        s.method()
    );
    let _ = writeln!(out, "| measurement | off | defaults | overhead | goal (≤ 3%) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    out.push_str(&pair::rows(r, s, GOAL_OVERHEAD));
    let _ = writeln!(
        out,
        "\nFailed creates: off {}, defaults {}. Scrapes during the run: {} answered ({:.0} KiB on average), {} \
         failed. Overhead of a throughput is off/defaults − 1.\n",
        r.baseline.create_errors,
        r.candidate.create_errors,
        scrapes.ok,
        scrapes.bytes as f64 / 1024.0 / scrapes.ok.max(1) as f64,
        scrapes.failed
    );
    crate::push_machine(&mut out, machine);
    out
}
