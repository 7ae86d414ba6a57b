//! Counters for a metrics endpoint. Updated with relaxed atomics; read with [`Metrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one FTL.
#[derive(Default, Debug)]
pub struct Metrics {
    pub user_slots: AtomicU64,
    pub gc_slots: AtomicU64,
    pub pad_slots: AtomicU64,
    pub gc_runs: AtomicU64,
    pub free_chunks: AtomicU64,
    pub free_lines: AtomicU64,
    pub bad_chunks: AtomicU64,
    pub throttled_ns: AtomicU64,
    pub checkpoints: AtomicU64,
    pub resets: AtomicU64,
    pub lost_blocks: AtomicU64,
    pub wl_migrations: AtomicU64,
    pub recovery_scanned: AtomicU64,
    pub erases: AtomicU64,
    pub wear_max: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// 4 KiB blocks written for users.
    pub user_slots: u64,
    /// 4 KiB blocks written by garbage collection (relocation).
    pub gc_slots: u64,
    /// Padding blocks written to honour flush/FUA and write-unit rules.
    pub pad_slots: u64,
    /// Lines garbage collection has cleaned.
    pub gc_runs: u64,
    /// Good chunks in no line.
    pub free_chunks: u64,
    /// Whole lines' worth of free chunks (free chunks over the partition's PUs).
    pub free_lines: u64,
    pub bad_chunks: u64,
    /// Time user writes spent doing garbage collection before they could go on.
    pub throttled_ns: u64,
    pub checkpoints: u64,
    pub resets: u64,
    /// Blocks lost to chunks that went offline (reads of them fail).
    pub lost_blocks: u64,
    /// Lines moved by static wear levelling.
    pub wl_migrations: u64,
    /// Blocks whose OOB the last recovery read to replay writes after the checkpoint.
    pub recovery_scanned: u64,
    /// Erases (resets) of the partition's chunks over the disk's life, as its chunk wear says.
    pub erases: u64,
    /// The most erases of any one chunk.
    pub wear_max: u64,
}

impl MetricsSnapshot {
    /// Write amplification: flash blocks written per user block (1.0 before any write).
    pub fn write_amplification(&self) -> f64 {
        if self.user_slots == 0 {
            return 1.0;
        }
        (self.user_slots + self.gc_slots + self.pad_slots) as f64 / self.user_slots as f64
    }

    /// Write amplification from relocation alone (what the GC models predict).
    pub fn gc_write_amplification(&self) -> f64 {
        if self.user_slots == 0 {
            return 1.0;
        }
        (self.user_slots + self.gc_slots) as f64 / self.user_slots as f64
    }
}

impl Metrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            user_slots: g(&self.user_slots),
            gc_slots: g(&self.gc_slots),
            pad_slots: g(&self.pad_slots),
            gc_runs: g(&self.gc_runs),
            free_chunks: g(&self.free_chunks),
            free_lines: g(&self.free_lines),
            bad_chunks: g(&self.bad_chunks),
            throttled_ns: g(&self.throttled_ns),
            checkpoints: g(&self.checkpoints),
            resets: g(&self.resets),
            lost_blocks: g(&self.lost_blocks),
            wl_migrations: g(&self.wl_migrations),
            recovery_scanned: g(&self.recovery_scanned),
            erases: g(&self.erases),
            wear_max: g(&self.wear_max),
        }
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set(a: &AtomicU64, n: u64) {
        a.store(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_amplification_counts_relocation_and_padding() {
        let m = Metrics::default();
        assert_eq!(m.snapshot().write_amplification(), 1.0);
        Metrics::add(&m.user_slots, 100);
        Metrics::add(&m.gc_slots, 150);
        Metrics::add(&m.pad_slots, 10);
        let s = m.snapshot();
        assert!((s.write_amplification() - 2.6).abs() < 1e-9);
        assert!((s.gc_write_amplification() - 2.5).abs() < 1e-9);
    }
}
