//! Time for the driver: a real monotonic clock, or a simulated one moved by hand.
//!
//! The scheduling core never reads the time itself; it is handed `now` by whoever drives it.
//! With the real clock a dispatcher thread drives it; with the simulated clock the caller does
//! (see [`crate::driver::Driver::advance_to`]), so fairness can be tested deterministically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A source of nanosecond timestamps that never go backwards.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ns(&self) -> u64;
}

/// Real time: nanoseconds since the first use of any `MonotonicClock` in this process, so that
/// every driver opened on one device books the device's timing model on the same time line.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Simulated time, starting at 0 and moved only by [`SimClock::set`] or [`SimClock::advance`].
#[derive(Debug, Default)]
pub struct SimClock {
    now: AtomicU64,
}

impl SimClock {
    pub fn new() -> SimClock {
        SimClock::default()
    }

    /// Moves the clock to `t`; a `t` in the past leaves it where it is.
    pub fn set(&self, t: u64) {
        self.now.fetch_max(t, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        let _ = self.now.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| Some(t.saturating_add(ns)));
    }
}

impl Clock for SimClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_time_moves_only_forward_and_by_hand() {
        let c = SimClock::new();
        assert_eq!(c.now_ns(), 0);
        c.advance(10);
        c.set(5);
        assert_eq!(c.now_ns(), 10);
        c.set(25);
        assert_eq!(c.now_ns(), 25);
        let m = MonotonicClock;
        let a = m.now_ns();
        assert!(m.now_ns() >= a);
    }
}
