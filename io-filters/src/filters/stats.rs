//! Counters and latency histograms per disk and request kind, for the metrics endpoint.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

    /// Appends this disk's series to Prometheus text (headers are written by the caller).
    pub fn render(&self, disk: &str, out: &mut Metrics) {
        for kind in RequestKind::ALL {
            let s = &self.kinds[kind as usize];
            let labels = format!("disk=\"{disk}\",kind=\"{}\"", kind.name());
            out.sample("vstor_filter_requests_total", &labels, s.ops.load(Relaxed));
            out.sample("vstor_filter_bytes_total", &labels, s.bytes.load(Relaxed));
            out.sample("vstor_filter_errors_total", &labels, s.errors.load(Relaxed));
            let mut cumulative = 0;
            for (i, b) in s.buckets.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = if i == BUCKETS { "+Inf".to_owned() } else { format!("{}", (1u64 << i) as f64 / 1e6) };
                out.sample("vstor_filter_latency_seconds_bucket", &format!("{labels},le=\"{le}\""), cumulative);
            }
            let sum = s.latency_ns.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(out.section("vstor_filter_latency_seconds_sum"), "{{{labels}}} {sum}");
            out.sample("vstor_filter_latency_seconds_count", &labels, cumulative);
        }
    }
}

/// Prometheus text being built, one section per metric family so that each family's samples
/// stay together under its header.
#[derive(Default)]
pub struct Metrics {
    sections: Vec<(&'static str, String)>,
}

/// Help text and type of each family the filters export.
const FAMILIES: &[(&str, &str, &str)] = &[
    ("vstor_filter_requests_total", "counter", "Requests completed through the stats filter, by disk and kind."),
    ("vstor_filter_bytes_total", "counter", "Bytes of successful requests through the stats filter."),
    ("vstor_filter_errors_total", "counter", "Failed requests through the stats filter."),
    ("vstor_filter_latency_seconds_bucket", "histogram", "Request latency below the stats filter."),
    ("vstor_filter_latency_seconds_sum", "", ""),
    ("vstor_filter_latency_seconds_count", "", ""),
    ("vstor_integrity_mismatches_total", "counter", "Blocks whose data did not match their checksum on read."),
    ("vstor_integrity_checked_blocks_total", "counter", "Blocks checked against their checksum on read."),
    ("vstor_cache_hits_total", "counter", "Reads answered from the cache."),
    ("vstor_cache_misses_total", "counter", "Reads the cache passed on."),
    ("vstor_cache_bytes", "gauge", "Bytes of data held in the cache."),
    ("vstor_throttle_delayed_total", "counter", "Requests the throttle made wait."),
    ("vstor_clone_redirected_reads_total", "counter", "Reads a linked clone sent to its parent, whole or in part."),
    ("vstor_clone_allocated_blocks", "gauge", "4 KiB blocks a linked clone holds itself."),
];

impl Metrics {
    /// The text of one family's samples.
    pub fn section(&mut self, name: &'static str) -> &mut String {
        let i = match self.sections.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.sections.push((name, String::new()));
                self.sections.len() - 1
            }
        };
        &mut self.sections[i].1
    }

    pub fn sample(&mut self, name: &'static str, labels: &str, value: u64) {
        let _ = writeln!(self.section(name), "{{{labels}}} {value}");
    }

    /// The whole text, families in a fixed order.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for (name, kind, help) in FAMILIES {
            let Some((_, body)) = self.sections.iter().find(|(n, _)| n == name) else { continue };
            if !kind.is_empty() {
                let family = name.strip_suffix("_bucket").unwrap_or(name);
                let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            }
            for line in body.lines() {
                let _ = writeln!(out, "{name}{line}");
            }
        }
        out
    }
}
