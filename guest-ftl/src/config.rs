//! Per-disk settings of a guest FTL.

use crate::error::{FtlError, Result};

/// How garbage collection picks the line to clean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VictimPolicy {
    /// The closed line with the fewest valid blocks.
    Greedy,
    /// Cost-benefit: the closed line whose free space is worth most for how fast its blocks
    /// die (see the `heat` module): hot lines are cleaned emptier and cold lines fuller, so that cold
    /// data is not moved again and again just because its line is a little emptier than a hot
    /// one, and the spare space is split between temperatures as the write amplification model
    /// says is best.
    CostBenefit,
}

/// Settings of one FTL disk.
#[derive(Clone, Debug)]
pub struct FtlConfig {
    /// Over-provisioning: `(physical - user) / user`. The user capacity is the partition's
    /// slots divided by `1 + over_provisioning`. Fixed when the disk is formatted.
    pub over_provisioning: f64,
    /// The disk's logical block size: 512 or 4096.
    pub block_size: u32,
    pub victim: VictimPolicy,
    /// Separate streams (open lines) for hot and cold user writes and for recently and long
    /// ago written relocated data, instead of one stream for everything.
    pub hot_cold: bool,
    /// A map checkpoint is taken after this many lines have been opened: recovery scans at most
    /// about this many lines (plus those open at the checkpoint).
    pub checkpoint_lines: u32,
    /// Garbage collection starts when fewer than this many lines' worth of chunks per user
    /// stream are free, beyond the lines kept for GC alone (one per GC stream).
    pub gc_free_lines: u32,
    /// Static wear levelling moves cold data off the least worn chunks when the wear of free
    /// and used chunks differs by more than this many resets.
    pub wear_spread: u32,
    /// Chunk notifications are polled every this many requests (and after any media error).
    pub notify_every: u32,
    /// The disk shows exactly this many bytes, if given: a partition is whole parallel units, so
    /// the FTL may hold a little more than the disk was asked to be. Opening fails if it holds
    /// less.
    pub capacity: Option<u64>,
}

impl Default for FtlConfig {
    fn default() -> FtlConfig {
        FtlConfig {
            over_provisioning: 0.11,
            block_size: 4096,
            victim: VictimPolicy::CostBenefit,
            hot_cold: true,
            checkpoint_lines: 16,
            gc_free_lines: 1,
            wear_spread: 64,
            notify_every: 1024,
            capacity: None,
        }
    }
}

impl FtlConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.over_provisioning.is_finite() && self.over_provisioning > 0.0 && self.over_provisioning <= 10.0) {
            return Err(FtlError::Config(format!("over-provisioning {} is not in (0, 10]", self.over_provisioning)));
        }
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(FtlError::Config(format!("block size {} is not 512 or 4096", self.block_size)));
        }
        if self.checkpoint_lines == 0 {
            return Err(FtlError::Config("checkpoint_lines must be at least 1".into()));
        }
        if self.notify_every == 0 {
            return Err(FtlError::Config("notify_every must be at least 1".into()));
        }
        if self.capacity.is_some_and(|c| c == 0 || c % u64::from(self.block_size) != 0) {
            return Err(FtlError::Config("capacity must be a positive multiple of the block size".into()));
        }
        Ok(())
    }

    /// Open lines the FTL uses at most at once (hot user, cold user, young and old relocated).
    pub fn streams(&self) -> usize {
        if self.hot_cold {
            4
        } else {
            1
        }
    }
}
