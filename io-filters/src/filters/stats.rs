//! Counters and latency histograms per disk and request kind, for the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use plumbing::metrics::{Kind, Writer};
use vdisk::RequestKind;

use crate::chain::{Filter, Verdict};
use crate::request::{Completion, Request};

/// Histogram buckets: latencies up to 2^i microseconds, i = 0..BUCKETS (1 µs to about 17 s).
const BUCKETS: usize = 25;

#[derive(Default)]
struct KindStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_ns: AtomicU64,
    /// Counts per bucket (not cumulative); the last slot is above the largest bound.
    buckets: [AtomicU64; BUCKETS + 1],
}

/// The stats filter of one disk.
#[derive(Default)]
pub struct Stats {
    kinds: [KindStats; 5],
}

impl Filter for Stats {
    fn kind(&self) -> &'static str {
        "stats"
    }

    fn pre(&self, _req: &mut Request) -> Verdict {
        Verdict::Continue
    }

    fn watches_completions(&self) -> bool {
        true
    }

    fn wants_clock(&self) -> bool {
        true
    }

    fn post(&self, done: Completion<'_>) {
        let s = &self.kinds[done.head.kind as usize];
        s.ops.fetch_add(1, Relaxed);
        if done.result.is_ok() {
            s.bytes.fetch_add(done.head.len, Relaxed);
        } else {
            s.errors.fetch_add(1, Relaxed);
        }
        let ns = done.started.map(|t| t.elapsed().as_nanos() as u64).unwrap_or(0);
        s.latency_ns.fetch_add(ns, Relaxed);
        let us = ns.div_ceil(1000);
        let bucket = if us <= 1 { 0 } else { (64 - (us - 1).leading_zeros()) as usize };
        s.buckets[bucket.min(BUCKETS)].fetch_add(1, Relaxed);
    }
}

impl Stats {
    /// Requests of a kind seen completing, and how many failed.
    pub fn counts(&self, kind: RequestKind) -> (u64, u64) {
        let s = &self.kinds[kind as usize];
        (s.ops.load(Relaxed), s.errors.load(Relaxed))
    }

    /// Adds this disk's series to `out` (the families are declared by [`declare`]).
    pub fn render(&self, disk: &str, out: &mut Writer) {
        for kind in RequestKind::ALL {
            let s = &self.kinds[kind as usize];
            let labels = [("disk", disk), ("kind", kind.name())];
            out.sample("vstor_filter_requests_total", &labels, s.ops.load(Relaxed));
            out.sample("vstor_filter_bytes_total", &labels, s.bytes.load(Relaxed));
            out.sample("vstor_filter_errors_total", &labels, s.errors.load(Relaxed));
            let bound = |i: usize| if i == BUCKETS { f64::INFINITY } else { (1u64 << i) as f64 / 1e6 };
            let buckets = s.buckets.iter().enumerate().map(|(i, b)| (bound(i), b.load(Relaxed)));
            let sum = s.latency_ns.load(Relaxed) as f64 / 1e9;
            out.histogram("vstor_filter_latency_seconds", &labels, buckets, sum);
        }
    }
}

/// Declares the families the filters export, in the order they are shown.
pub fn declare(out: &mut Writer) {
    for (name, kind, help) in FAMILIES {
        out.family(name, *kind, help);
    }
}

/// Name, type and help text of each family the filters export.
const FAMILIES: &[(&str, Kind, &str)] = &[
    ("vstor_filter_requests_total", Kind::Counter, "Requests completed through the stats filter, by disk and kind."),
    ("vstor_filter_bytes_total", Kind::Counter, "Bytes of successful requests through the stats filter."),
    ("vstor_filter_errors_total", Kind::Counter, "Failed requests through the stats filter."),
    ("vstor_filter_latency_seconds", Kind::Histogram, "Request latency below the stats filter."),
    ("vstor_integrity_mismatches_total", Kind::Counter, "Blocks whose data did not match their checksum on read."),
    ("vstor_integrity_checked_blocks_total", Kind::Counter, "Blocks checked against their checksum on read."),
    ("vstor_cache_hits_total", Kind::Counter, "Reads answered from the cache."),
    ("vstor_cache_misses_total", Kind::Counter, "Reads the cache passed on."),
    ("vstor_cache_bytes", Kind::Gauge, "Bytes of data held in the cache."),
    ("vstor_throttle_delayed_total", Kind::Counter, "Requests the throttle made wait."),
    ("vstor_clone_redirected_reads_total", Kind::Counter, "Reads a linked clone sent to its parent, whole or in part."),
    ("vstor_clone_allocated_blocks", Kind::Gauge, "4 KiB blocks a linked clone holds itself."),
];
