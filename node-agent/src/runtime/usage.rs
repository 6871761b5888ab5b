//! What a node's sandboxes use: the one definition behind
//! [`super::Runtime::usage`], the `NodeUsage` of each heartbeat and the
//! agent's sandbox CPU and memory gauges.
//!
//! A runtime reads each sandbox's cgroup ([`super::cgroup::AnyCgroupManager::usage`])
//! and hands the samples to its [`UsageMeter`], which sums them into a
//! [`Usage`]. The meter keeps the CPU time of sandboxes that ended (a
//! retired total), so the node's cumulative CPU seconds never decrease while
//! the agent runs, as a Prometheus counter must not. [`UsageRate`] turns two
//! successive readings into the cores in use between them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sandfleet_proto::v1 as pb;

use super::cgroup::CgroupUsage;

/// What the sandboxes of a runtime use, summed over all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU time the sandboxes used since the agent started, seconds. Never
    /// decreases within one agent process.
    pub cpu_seconds_total: f64,
    /// Memory the live sandboxes use now, bytes (less inactive file cache).
    pub memory_bytes: u64,
}

/// One sandbox's reading, keyed by something stable for the sandbox's life
/// (its session id or box name). `None`: it exists but could not be read
/// this time (its last reading counts on).
pub type Sample = (String, Option<CgroupUsage>);

#[derive(Debug, Default)]
struct MeterState {
    /// The last CPU nanoseconds read of each live sandbox.
    last_cpu: HashMap<String, u64>,
    /// CPU nanoseconds of the sandboxes that ended.
    retired_cpu: u128,
    /// The largest total reported so far (the floor of the next one).
    reported_cpu: u128,
}

/// Sums sandbox samples into a [`Usage`] that keeps ended sandboxes' CPU time.
#[derive(Debug, Default)]
pub struct UsageMeter {
    state: Mutex<MeterState>,
}

impl UsageMeter {
    /// A meter that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one reading of every live sandbox: a sandbox missing from
    /// `samples` has ended, and its last CPU time moves to the retired total.
    /// A sandbox whose CPU time went back (its cgroup was made again) keeps
    /// its old time in the retired total; the CPU total never drops.
    pub fn observe(&self, samples: impl IntoIterator<Item = Sample>) -> Usage {
        let mut st = self.state.lock();
        let mut live: HashMap<String, u64> = HashMap::new();
        let mut memory_bytes = 0u64;
        for (key, sample) in samples {
            let previous = st.last_cpu.get(&key).copied();
            let cpu = match sample {
                Some(u) => {
                    memory_bytes = memory_bytes.saturating_add(u.memory_bytes);
                    u.cpu_nanos.unwrap_or(0)
                }
                None => previous.unwrap_or(0),
            };
            if let Some(prev) = previous.filter(|p| cpu < *p) {
                // Its cgroup was made again and counts from 0: keep the old time.
                st.retired_cpu += u128::from(prev);
            }
            live.insert(key, cpu);
        }
        let ended: u128 = st.last_cpu.iter().filter(|(k, _)| !live.contains_key(*k)).map(|(_, v)| u128::from(*v)).sum();
        st.retired_cpu += ended;
        let current: u128 = live.values().map(|v| u128::from(*v)).sum();
        let total = (st.retired_cpu + current).max(st.reported_cpu);
        st.reported_cpu = total;
        st.last_cpu = live;
        Usage { cpu_seconds_total: total as f64 / 1e9, memory_bytes }
    }
}

/// Turns successive [`Usage`] readings into a heartbeat's `NodeUsage`: the
/// cores in use over the time between two readings.
#[derive(Debug, Default)]
pub struct UsageRate {
    last: Option<(Instant, f64)>,
}

impl UsageRate {
    /// Reads `runtime`'s usage for a heartbeat, within `budget`: a runtime
    /// that cannot answer in time (a stuck container engine) must not delay
    /// the heartbeat, which then carries no usage.
    pub async fn measure(&mut self, runtime: &dyn super::Runtime, budget: Duration) -> Option<pb::NodeUsage> {
        let usage = tokio::time::timeout(budget, runtime.usage()).await.ok()?;
        Some(self.sample(usage, Instant::now()))
    }

    /// The `NodeUsage` for a reading taken at `at`; the first reading has no
    /// interval and reports 0 millicores.
    pub fn sample(&mut self, usage: Usage, at: Instant) -> pb::NodeUsage {
        let cpu_millis = match self.last {
            Some((then, cpu)) => cpu_millis(cpu, usage.cpu_seconds_total, at.saturating_duration_since(then)),
            None => 0,
        };
        self.last = Some((at, usage.cpu_seconds_total));
        pb::NodeUsage { cpu_millis, memory_bytes: usage.memory_bytes, cpu_seconds_total: usage.cpu_seconds_total }
    }
}

/// Millicores used between two cumulative CPU readings `elapsed` apart (0
/// for no time, or a counter that went back).
pub fn cpu_millis(before_seconds: f64, after_seconds: f64, elapsed: std::time::Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 || after_seconds <= before_seconds {
        return 0;
    }
    ((after_seconds - before_seconds) / secs * 1000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(key: &str, cpu_s: u64, mem: u64) -> Sample {
        (key.into(), Some(CgroupUsage { cpu_nanos: Some(cpu_s * 1_000_000_000), memory_bytes: mem }))
    }

    #[test]
    fn ended_sandboxes_keep_their_cpu_time() {
        let m = UsageMeter::new();
        assert_eq!(m.observe([s("a", 2, 100), s("b", 3, 50)]), Usage { cpu_seconds_total: 5.0, memory_bytes: 150 });
        // b ended: its 3 s stay, its memory goes.
        assert_eq!(m.observe([s("a", 4, 100)]), Usage { cpu_seconds_total: 7.0, memory_bytes: 100 });
        // An unreadable sandbox counts with its last CPU time and no memory.
        assert_eq!(m.observe([("a".into(), None), s("c", 1, 10)]).cpu_seconds_total, 8.0);
        // a made again from 0 (a recreated cgroup): its old 4 s stay, its new time adds.
        assert_eq!(m.observe([s("a", 0, 0), s("c", 1, 10)]).cpu_seconds_total, 8.0);
        assert_eq!(m.observe([s("a", 2, 0), s("c", 1, 10)]).cpu_seconds_total, 10.0);
        assert_eq!(m.observe([]), Usage { cpu_seconds_total: 10.0, memory_bytes: 0 });
        // No CPU accounting (v1 without cpuacct): memory only.
        let none = ("d".to_string(), Some(CgroupUsage { cpu_nanos: None, memory_bytes: 7 }));
        assert_eq!(m.observe([none]), Usage { cpu_seconds_total: 10.0, memory_bytes: 7 });
    }

    #[test]
    fn rate_is_cores_over_the_interval() {
        assert_eq!(cpu_millis(1.0, 2.0, Duration::from_secs(2)), 500);
        assert_eq!(cpu_millis(1.0, 5.0, Duration::from_secs(2)), 2000);
        assert_eq!(cpu_millis(1.0, 1.0, Duration::from_secs(2)), 0);
        assert_eq!(cpu_millis(2.0, 1.0, Duration::from_secs(2)), 0);
        assert_eq!(cpu_millis(1.0, 2.0, Duration::ZERO), 0);

        let mut r = UsageRate::default();
        let t0 = Instant::now();
        let first = r.sample(Usage { cpu_seconds_total: 10.0, memory_bytes: 5 }, t0);
        assert_eq!((first.cpu_millis, first.memory_bytes, first.cpu_seconds_total), (0, 5, 10.0));
        let next = r.sample(Usage { cpu_seconds_total: 10.25, memory_bytes: 6 }, t0 + Duration::from_millis(500));
        assert_eq!((next.cpu_millis, next.memory_bytes), (500, 6));
    }
}
