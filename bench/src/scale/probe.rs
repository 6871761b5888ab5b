//! Looking at the coordinators from the outside, cheaply enough to do while
//! they are measured: their `/metrics` (Prometheus text on the
//! `--metrics-listen` listener), the size of a data dir, a member's own view.
//!
//! `ClusterService.Status` is avoided while measuring: each call hashes the
//! whole state on every member (its `state_digest`), which at 100,000
//! sessions is itself a load.

use std::path::Path;

use anyhow::{anyhow, Result};
use sandfleet_testkit::{Cluster, Target};

/// Sessions in the applied state, by `state` (and `runtime`).
pub const SESSIONS: &str = "sandfleet_sessions";
/// The last applied log index.
pub const APPLIED: &str = "sandfleet_raft_applied_index";
/// 1 on the leader.
pub const IS_LEADER: &str = "sandfleet_raft_is_leader";
/// The current term.
pub const TERM: &str = "sandfleet_raft_term";
/// Heartbeats this member answered as the leader.
pub const HEARTBEATS: &str = "sandfleet_heartbeats_received_total";
/// Size of the newest snapshot.
pub const SNAPSHOT_BYTES: &str = "sandfleet_raft_snapshot_size_bytes";
/// The snapshot build histogram's sum and count.
pub const SNAPSHOT_BUILD_SUM: &str = "sandfleet_raft_snapshot_build_duration_seconds_sum";
pub const SNAPSHOT_BUILD_COUNT: &str = "sandfleet_raft_snapshot_build_duration_seconds_count";

/// One scrape of a process's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    text: String,
}

impl Scrape {
    /// `GET /metrics` at `addr` (a 10 s deadline).
    pub async fn get(addr: &str) -> Result<Scrape> {
        let (code, text) = sandfleet_testkit::prometheus::http_get(addr, "/metrics")
            .await
            .map_err(|e| anyhow!("scraping {addr}: {e}"))?;
        if code != 200 {
            return Err(anyhow!("scraping {addr}: HTTP {code}"));
        }
        Ok(Scrape { text })
    }

    #[cfg(test)]
    pub fn from_text(text: &str) -> Scrape {
        Scrape { text: text.to_string() }
    }

    /// The sum of every sample named `name` whose labels include all of
    /// `labels`; `None` when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.text.lines().filter_map(parse_sample) {
            if s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)) {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// [`Scrape::sum`] without a label filter, 0 when absent.
    pub fn value(&self, name: &str) -> f64 {
        self.sum(name, &[]).unwrap_or(0.0)
    }
}

/// One sample line of the Prometheus text format.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// Parses `name{k="v",...} value [timestamp]`; comments and blank lines are `None`.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end = loop {
            // Skip separators, then a key up to '=' or the closing brace.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            let (start, c) = *chars.peek()?;
            if c == '}' {
                break start + 1;
            }
            let key_end = inner[start..].find('=')? + start;
            let key = inner[start..key_end].trim();
            while chars.peek().is_some_and(|(i, _)| *i <= key_end) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        };
        rest = &inner[end..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample { name, labels, value })
}

/// The metrics listener of coordinator `i`.
pub fn metrics_addr(cluster: &Cluster, i: usize) -> Result<String> {
    cluster.metrics_addr(Target::Coordinator(i)).ok_or_else(|| anyhow!("coordinator {} has no metrics listener", i + 1))
}

/// Scrapes coordinator `i`.
pub async fn scrape(cluster: &Cluster, i: usize) -> Result<Scrape> {
    Scrape::get(&metrics_addr(cluster, i)?).await
}

/// The index of the coordinator whose metrics say it leads (the one with the
/// highest term if two do), among those that answer.
pub async fn current_leader(cluster: &Cluster) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for i in 0..cluster.coordinators.len() {
        if cluster.coordinators[i].pid().is_none() {
            continue;
        }
        let Ok(s) = scrape(cluster, i).await else { continue };
        if s.value(IS_LEADER) >= 1.0 {
            let term = s.value(TERM);
            if best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// The bytes of every file under `dir` (apparent sizes; symlinks not followed;
/// files that vanish meanwhile, as RocksDB compacts, are skipped).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else { continue };
        if meta.is_dir() {
            total += dir_bytes(&e.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sandfleet_sessions Sessions in this member's applied state
# TYPE sandfleet_sessions gauge
sandfleet_sessions{runtime="any",state="running",otel_scope_name="sandfleet"} 70
sandfleet_sessions{runtime="process",state="running",otel_scope_name="sandfleet"} 30
sandfleet_sessions{runtime="any",state="pending",otel_scope_name="sandfleet"} 5
sandfleet_raft_applied_index{otel_scope_name="sandfleet"} 12345
sandfleet_raft_snapshot_build_duration_seconds_bucket{otel_scope_name="sandfleet",le="+Inf"} 3
sandfleet_raft_snapshot_build_duration_seconds_sum{otel_scope_name="sandfleet"} 0.75
sandfleet_raft_snapshot_build_duration_seconds_count{otel_scope_name="sandfleet"} 3
target_info{service_name="sandfleet-coordinator",note="a \"quoted\", {braced} value"} 1
plain_metric 2.5e3 1700000000000
"#;

    #[test]
    fn sums_samples_by_name_and_labels() {
        let s = Scrape::from_text(TEXT);
        assert_eq!(s.sum(SESSIONS, &[("state", "running")]), Some(100.0));
        assert_eq!(s.sum(SESSIONS, &[("state", "running"), ("runtime", "any")]), Some(70.0));
        assert_eq!(s.sum(SESSIONS, &[("state", "lost")]), None);
        assert_eq!(s.value(APPLIED), 12345.0);
        assert_eq!(s.value(SNAPSHOT_BUILD_SUM), 0.75);
        assert_eq!(s.value(SNAPSHOT_BUILD_COUNT), 3.0);
        assert_eq!(s.value("plain_metric"), 2500.0);
        assert_eq!(s.value("absent"), 0.0);
        // A name is matched whole, not as a prefix.
        assert_eq!(s.sum("sandfleet_raft_snapshot_build_duration_seconds", &[]), None);
    }

    #[test]
    fn parses_quoted_label_values() {
        let line = r#"target_info{service_name="c",note="a \"q\", {b} \\ x"} 1"#;
        let s = parse_sample(line).unwrap();
        assert_eq!(s.name, "target_info");
        assert_eq!(s.labels, vec![("service_name", "c".to_string()), ("note", r#"a "q", {b} \ x"#.to_string())]);
        assert_eq!(s.value, 1.0);
        assert_eq!(parse_sample("x{le=\"+Inf\"} +Inf").unwrap().value, f64::INFINITY);
        assert!(parse_sample("# TYPE x gauge").is_none());
        assert!(parse_sample("broken{a=\"b\" 1").is_none());
        assert!(parse_sample("").is_none());
    }

    #[test]
    fn sums_a_directory_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 24]).unwrap();
        assert_eq!(dir_bytes(dir.path()), 1024);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }
}
