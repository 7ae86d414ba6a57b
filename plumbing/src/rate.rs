//! A token bucket: a rate limit with a burst, for the filters' throttle and the host FTL's
//! per-guest limits.
//!
//! The bucket refills continuously at its rate and holds at most its burst. Something may go
//! while the bucket holds more than zero tokens, and then takes its whole cost, even into debt:
//! a request larger than the burst is never stuck, and the long-run rate is exact (over any span
//! of T seconds at most `burst + rate × T` units, plus one request's cost, go through).
//!
//! Time is the caller's (nanoseconds on any [`crate::clock::Clock`]); tokens are kept in
//! units × 10⁹, so that refilling at `rate` units per second adds exactly `rate` per nanosecond
//! and no rounding builds up.

use std::time::Duration;

const NS_PER_S: i128 = 1_000_000_000;

/// A token bucket (see the module docs).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    cap: i128,
    tokens: i128,
    last: u64,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` units per second (at least one) that holds `burst` worth
    /// of its rate (at least one unit), at time `now` (ns).
    pub fn new(rate: u64, burst: Duration, now: u64) -> TokenBucket {
        let rate = rate.max(1);
        let burst_ns = i128::try_from(burst.as_nanos()).unwrap_or(i128::MAX);
        let cap = i128::from(rate).saturating_mul(burst_ns).max(NS_PER_S);
        TokenBucket { rate, cap, tokens: cap, last: now }
    }

    /// Adds the tokens earned since the last refill (a `now` in the past adds none).
    pub fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + i128::from(dt) * i128::from(self.rate)).min(self.cap);
    }

    /// Whether something may go: more than zero tokens.
    pub fn ready(&self) -> bool {
        self.tokens > 0
    }

    /// Takes `units`, possibly into debt.
    pub fn take(&mut self, units: u64) {
        self.tokens -= i128::from(units) * NS_PER_S;
    }

    /// Nanoseconds until the bucket is ready again (0 if it is), as of its last refill.
    pub fn wait_ns(&self) -> u64 {
        if self.ready() {
            return 0;
        }
        let ns = (-self.tokens) / i128::from(self.rate) + 1;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst_and_allows_debt() {
        let mut b = TokenBucket::new(1000, 2 * MS, 0); // 1000/s = one per ms, burst 2
        assert!(b.ready());
        b.take(1);
        b.take(1);
        assert!(!b.ready());
        assert_eq!(b.wait_ns(), 1);
        b.refill(500_000);
        assert!(b.ready(), "half a token is more than zero");
        b.take(5);
        assert_eq!(b.wait_ns(), 4_500_001, "4.5 tokens of debt at one per ms");
        b.refill(100_000_000);
        b.take(2);
        assert!(!b.ready(), "the burst caps what idle time earns");
    }

    #[test]
    fn a_burst_below_one_unit_holds_one() {
        let mut b = TokenBucket::new(10, MS, 0); // a hundredth of a unit, rounded up to one
        b.take(1);
        assert!(!b.ready());
        b.refill(1_000_000_000);
        b.take(1);
        assert!(!b.ready(), "a second earned only the one unit it can hold");
    }

    #[test]
    fn the_long_run_rate_is_exact() {
        // 3 units a second with a burst of one: over 100 s, taking one whenever ready, exactly
        // the burst and 300 go.
        let mut b = TokenBucket::new(3, Duration::from_millis(100), 0);
        let (mut now, mut taken) = (0u64, 0u64);
        while now <= 100_000_000_000 {
            b.refill(now);
            if b.ready() {
                b.take(1);
                taken += 1;
            }
            now += b.wait_ns().max(1);
        }
        assert_eq!(taken, 1 + 300);
    }
}
