//! IOPS and bandwidth limits: a token bucket per disk, or one shared by a named group of disks.
//!
//! Each bucket is a [`TokenBucket`] refilled at its rate up to a burst (`burst_ms` worth of the
//! rate). A request is admitted while the bucket holds tokens, and takes its cost even if that
//! puts the bucket in debt, so a request larger than the burst still passes, and the long-run
//! rate holds exactly: over any span of T seconds at most `burst + rate * T` (plus one request)
//! is admitted.
//!
//! Time comes from a [`Clock`], so tests run the throttle on a simulated clock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::clock::Clock;
use plumbing::rate::TokenBucket;
use vdisk::{IoFuture, RequestKind};

use crate::chain::{Filter, Next, Verdict};
use crate::config::ThrottleOptions;
use crate::request::{Reply, Request};

struct BucketState {
    iops: Option<TokenBucket>,
    bps: Option<TokenBucket>,
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
        let (now, burst) = (clock.now_ns(), Duration::from_millis(options.burst_ms));
        let state = BucketState {
            iops: options.iops.map(|r| TokenBucket::new(r, burst, now)),
            bps: options.bps.map(|r| TokenBucket::new(r, burst, now)),
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

    /// Admits a request of `bytes` if the bucket holds tokens; otherwise says how long to wait
    /// before asking again.
    pub fn try_admit(&self, bytes: u64) -> Result<(), Duration> {
        let now = self.clock.now_ns();
        let mut guard = plumbing::lock(&self.state);
        let s = &mut *guard;
        let mut wait = 0;
        for bucket in [&mut s.iops, &mut s.bps].into_iter().flatten() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_ns());
        }
        if wait > 0 {
            // At least a microsecond, so a simulated clock always moves.
            return Err(Duration::from_nanos(wait).max(Duration::from_micros(1)));
        }
        if let Some(b) = &mut s.iops {
            b.take(1);
        }
        if let Some(b) = &mut s.bps {
            b.take(bytes);
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
