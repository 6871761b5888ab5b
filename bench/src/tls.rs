//! `sandfleet-bench tls`: what mutual TLS costs, against plaintext, in the
//! same run ([`crate::pair`]): two clusters of the same shape (3 coordinators,
//! 1 process-runtime agent, loopback), one with a certificate per process
//! (the testkit's default) and one `--insecure`.
//!
//! Goal: TLS at most 10% slower on both the exec round trip and create
//! throughput.

use std::fmt::Write as _;

use anyhow::Result;

use crate::pair::{self, Report, Settings};

/// The goal: TLS figures at most this much worse than plaintext.
pub const GOAL_OVERHEAD: f64 = 0.10;

pub async fn run(settings: &Settings, child_log: &str) -> Result<Report> {
    let tls = pair::start(pair::builder(child_log).tls(true), "tls").await?;
    let plain = pair::start(pair::builder(child_log).tls(false), "plain").await?;
    let report = pair::measure(settings, [&plain, &tls], ["plaintext", "tls"]).await?;
    tls.cluster.shutdown().await?;
    plain.cluster.shutdown().await?;
    Ok(report)
}

pub fn render(r: &Report, s: &Settings, section: &str, machine: &[(String, String)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{section}\n");
    let _ = writeln!(
        out,
        "Produced by `{}`: two clusters of 3 coordinators and 1 process-runtime agent on loopback, one with \
         mutual TLS on every connection (a certificate per process) and one `--insecure`, measured in the same \
         run. {}\n",
        s.command_line("tls"),
        s.method()
    );
    let _ = writeln!(out, "| measurement | plaintext | mutual TLS | TLS overhead | goal (≤ 10%) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    out.push_str(&pair::rows(r, s, GOAL_OVERHEAD));
    let _ = writeln!(
        out,
        "\nFailed creates: plaintext {}, TLS {}. Overhead of a throughput is plaintext/TLS − 1.\n",
        r.baseline.create_errors, r.candidate.create_errors
    );
    crate::push_machine(&mut out, machine);
    out
}
