//! IOPS and bandwidth limits: a token bucket per disk, or one shared by a named group of disks.
//!
//! Each bucket refills at its rate up to a burst (`burst_ms` worth of the rate). A request is
//! admitted when the bucket is not in debt, and takes its cost even if that puts the bucket in
//! debt, so a request larger than the burst still passes, and the long-run rate holds exactly:
//! over any span of T seconds at most `burst + rate * T` (plus one request) is admitted.
//!
//! Time comes from a [`Clock`], so tests run the throttle on a simulated clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vdisk::{IoFuture, RequestKind};

use crate::chain::{Filter, Next, Verdict};
use crate::config::ThrottleOptions;
use crate::request::{Reply, Request};

/// Where a throttle gets the time, and how it waits.
pub trait Clock: Send + Sync {
    /// Time since some fixed start.
    fn now(&self) -> Duration;
    /// Waits for `d` to pass.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The wall clock, waiting on tokio's timer.
pub struct RealClock(Instant);

impl Default for RealClock {
    fn default() -> Self {
        RealClock(Instant::now())
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// A clock that moves only when someone sleeps on it: each sleep jumps it forward.
#[derive(Default)]
pub struct SimClock {
    nanos: AtomicU64,
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Relaxed))
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        Box::pin(std::future::ready(()))
    }
}

/// One rate: tokens refilled per second and the most it holds.
struct Rate {
    per_sec: f64,
    burst: f64,
    tokens: f64,
}

impl Rate {
    fn new(per_sec: u64, burst_ms: u64) -> Rate {
        let per_sec = per_sec as f64;
        let burst = (per_sec * burst_ms as f64 / 1000.0).max(1.0);
        Rate { per_sec, burst, tokens: burst }
    }

    fn refill(&mut self, elapsed: f64) {
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
    }

    /// Seconds until the bucket is out of debt.
    fn wait(&self) -> f64 {
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.per_sec
        }
    }
}

struct BucketState {
    last: Duration,
    iops: Option<Rate>,
    bps: Option<Rate>,
}

/// A token bucket for operations and bytes, shared by the disks of a group.
pub struct Bucket {
    options: ThrottleOptions,
    clock: Arc<dyn Clock>,
    state: Mutex<BucketState>,
    delayed: AtomicU64,
    admitted: AtomicU64,
}

impl Bucket {
    pub fn new(options: &ThrottleOptions, clock: Arc<dyn Clock>) -> Bucket {
        let state = BucketState {
            last: clock.now(),
            iops: options.iops.map(|r| Rate::new(r, options.burst_ms)),
            bps: options.bps.map(|r| Rate::new(r, options.burst_ms)),
        };
        Bucket {
            options: options.clone(),
            clock,
            state: Mutex::new(state),
            delayed: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        }
    }

    pub fn options(&self) -> &ThrottleOptions {
        &self.options
    }

    /// Admits a request of `bytes` if the bucket is not in debt; otherwise says how long to wait
    /// before asking again.
    pub fn try_admit(&self, bytes: u64) -> Result<(), Duration> {
        let now = self.clock.now();
        let mut guard = plumbing::lock(&self.state);
        let s = &mut *guard;
        let elapsed = now.saturating_sub(s.last).as_secs_f64();
        s.last = s.last.max(now);
        let mut wait: f64 = 0.0;
        for rate in [&mut s.iops, &mut s.bps].into_iter().flatten() {
            rate.refill(elapsed);
            wait = wait.max(rate.wait());
        }
        if wait > 0.0 {
            // At least a microsecond, so a simulated clock always moves.
            return Err(Duration::from_secs_f64(wait).max(Duration::from_micros(1)));
        }
        if let Some(r) = &mut s.iops {
            r.tokens -= 1.0;
        }
        if let Some(r) = &mut s.bps {
            r.tokens -= bytes as f64;
        }
        self.admitted.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Waits until a request of `bytes` is admitted.
    pub async fn admit(&self, bytes: u64) {
        let mut counted = false;
        while let Err(wait) = self.try_admit(bytes) {
            if !counted {
                self.delayed.fetch_add(1, Relaxed);
                counted = true;
            }
            self.clock.sleep(wait).await;
        }
    }

    /// Requests made to wait at least once.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Relaxed)
    }

    pub fn admitted(&self) -> u64 {
        self.admitted.load(Relaxed)
    }
}

/// The throttle filter of one disk.
pub struct Throttle {
    bucket: Arc<Bucket>,
}

impl Throttle {
    pub fn new(bucket: Arc<Bucket>) -> Throttle {
        Throttle { bucket }
    }

    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }
}

/// What a request costs in bytes; flushes cost nothing and are never held.
fn cost(req: &Request) -> Option<u64> {
    match req.head.kind {
        RequestKind::Flush => None,
        RequestKind::Read | RequestKind::Write => Some(req.head.len),
        RequestKind::Discard | RequestKind::WriteZeroes => Some(0),
    }
}

impl Filter for Throttle {
    fn kind(&self) -> &'static str {
        "throttle"
    }

    fn pre(&self, req: &mut Request) -> Verdict {
        match cost(req) {
            None => Verdict::Continue,
            Some(bytes) => match self.bucket.try_admit(bytes) {
                Ok(()) => Verdict::Continue,
                Err(_) => Verdict::Handle,
            },
        }
    }

    fn handle<'a>(&'a self, req: Request, next: Next<'a>) -> IoFuture<'a, Reply> {
        Box::pin(async move {
            self.bucket.admit(cost(&req).unwrap_or(0)).await;
            next.submit(req).await
        })
    }
}
