//! Exponential backoff: the one formula every retry loop in Sandfleet uses.
//!
//! Before retry `n` (0-based) a caller waits up to `min(cap, base * 2^n)`.
//! [`Backoff::delay`] draws the wait with *jitter*, so many callers failing at
//! once (agents re-registering after a leader change, clients failing over)
//! do not retry in lockstep; [`Backoff::ceiling`] is the deterministic bound,
//! for state machines that must compute the same wait on every replica.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first wait.
    pub base: Duration,
    /// Largest wait ever.
    pub cap: Duration,
    /// The least share of the ceiling a wait takes, in percent: 0 is "full
    /// jitter" (a wait anywhere in `[0, ceiling]`), 50 is "equal jitter"
    /// (`[ceiling/2, ceiling]`), 100 is no jitter.
    pub floor_percent: u8,
}

impl Default for Backoff {
    /// 50 ms doubling up to 2 s, full jitter.
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }
}

impl Backoff {
    /// `base` doubling up to `cap`, full jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, floor_percent: 0 }
    }

    /// The same backoff with each wait at least `percent`% of its ceiling.
    pub const fn with_floor_percent(mut self, percent: u8) -> Self {
        self.floor_percent = if percent > 100 { 100 } else { percent };
        self
    }

    /// The upper bound of the wait before retry `attempt` (0-based): `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait in `[ceiling * floor_percent / 100, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        let floor = (u128::from(ceiling) * u128::from(self.floor_percent) / 100) as u64;
        Duration::from_nanos(rand::random_range(floor..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let got: Vec<u128> = (0..6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1), "no overflow at any attempt");
    }

    #[test]
    fn delays_stay_between_the_floor_and_the_ceiling() {
        let full = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let equal = full.with_floor_percent(50);
        let fixed = full.with_floor_percent(100);
        for n in 0..20 {
            let c = full.ceiling(n);
            assert!(full.delay(n) <= c);
            let d = equal.delay(n);
            assert!(d >= c / 2 && d <= c, "{d:?} of {c:?}");
            assert_eq!(fixed.delay(n), c);
        }
        assert_eq!(full.with_floor_percent(250).floor_percent, 100);
    }
}
