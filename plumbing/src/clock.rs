//! Time for whatever paces or schedules work: the real monotonic clock, or a simulated one that
//! tests move by hand, so rate limits and fair sharing can be tested without waiting.
//!
//! Both count nanoseconds on one time line per clock. The real clock's line starts at its first
//! use in the process, so every user of it (every driver on one device, every throttle) books on
//! the same line.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A future that waits on a [`Clock`].
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of time that never goes backwards, and a way to wait on it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Nanoseconds since the clock's start.
    fn now_ns(&self) -> u64;

    /// Waits for `d` to pass: on the real clock a tokio timer (so a runtime must be running); on
    /// a simulated one the clock jumps forward by `d` and the wait ends at once.
    fn sleep(&self, d: Duration) -> Sleep<'_>;

    /// Time since the clock's start.
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns())
    }
}

/// Real time: nanoseconds since the first use of any `MonotonicClock` in this process.
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

    fn sleep(&self, d: Duration) -> Sleep<'_> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// Simulated time, starting at 0 and moved only by [`SimClock::set`], [`SimClock::advance`] or
/// a sleep on it.
#[derive(Debug, Default)]
pub struct SimClock {
    now: AtomicU64,
}

impl SimClock {
    pub fn new() -> SimClock {
        SimClock::default()
    }

    /// Moves the clock to `ns`; a time in the past leaves it where it is.
    pub fn set(&self, ns: u64) {
        self.now.fetch_max(ns, SeqCst);
    }

    /// Moves the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        let _ = self.now.fetch_update(SeqCst, SeqCst, |t| Some(t.saturating_add(ns)));
    }
}

impl Clock for SimClock {
    fn now_ns(&self) -> u64 {
        self.now.load(SeqCst)
    }

    fn sleep(&self, d: Duration) -> Sleep<'_> {
        self.advance(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Box::pin(std::future::ready(()))
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
        drop(c.sleep(Duration::from_micros(1)));
        assert_eq!(c.now(), Duration::from_nanos(1025), "a sleep moves it");
        let m = MonotonicClock;
        let a = m.now_ns();
        assert!(m.now_ns() >= a);
    }
}
