//! CPU accounting per phase: the CPU time of every coordinator and of the
//! bench process, read from `/proc`, and who led the cluster meanwhile.

use std::time::Instant;

use sandfleet::Client;
use sandfleet_testkit::Cluster;

use super::report::Cpu;

/// utime + stime of a process in seconds (`/proc/<pid>/stat`, USER_HZ = 100 on Linux).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime in seconds from the text of `/proc/<pid>/stat`.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The resident set size of a process in bytes (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS` in bytes from the text of `/proc/<pid>/status` (`VmRSS:   1234 kB`).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut f = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

pub(super) struct CpuProbe {
    /// (Raft id, pid) of every coordinator, then (0, pid) of this process.
    procs: Vec<(u64, u32)>,
    client: Client,
}

pub(super) struct CpuMark {
    at: Instant,
    secs: Vec<f64>,
    leader: (u64, u64),
}

impl CpuProbe {
    pub(super) fn new(cluster: &Cluster, client: Client) -> Self {
        let mut procs: Vec<(u64, u32)> =
            cluster.coordinators.iter().filter_map(|c| Some((c.id.parse().ok()?, c.pid()?))).collect();
        procs.push((0, std::process::id()));
        Self { procs, client }
    }

    /// (leader id, term) as the cluster reports it; (0, 0) when it does not answer.
    async fn leader(&self) -> (u64, u64) {
        match self.client.cluster_status().await {
            Ok(s) => (s.leader_id, s.members.iter().map(|m| m.term).max().unwrap_or(0)),
            Err(_) => (0, 0),
        }
    }

    pub(super) async fn sample(&self) -> CpuMark {
        let leader = self.leader().await;
        CpuMark {
            at: Instant::now(),
            secs: self.procs.iter().map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0)).collect(),
            leader,
        }
    }

    pub(super) async fn since(&self, mark: &CpuMark) -> Cpu {
        let now = self.sample().await;
        let procs = self
            .procs
            .iter()
            .zip(now.secs.iter().zip(mark.secs.iter()))
            .map(|((id, _), (a, b))| {
                let name = match *id {
                    0 => "bench (sim agents + clients)".to_string(),
                    id if id == now.leader.0 => format!("coordinator-{id} (leader)"),
                    id => format!("coordinator-{id}"),
                };
                (name, a - b)
            })
            .collect();
        Cpu { wall: now.at - mark.at, procs, leader: (mark.leader, now.leader) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (sandfleet (co) x) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 12 0 100 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.25));
        assert_eq!(parse_cpu_seconds("4242 (x"), None);
        assert_eq!(parse_cpu_seconds(""), None);
    }

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tsandfleet-coord\nVmPeak:\t  900000 kB\nVmRSS:\t  123456 kB\nThreads:\t12\n";
        assert_eq!(parse_vm_rss(status), Some(123_456 * 1024));
        assert_eq!(parse_vm_rss("Name:\tzombie\n"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }
}
