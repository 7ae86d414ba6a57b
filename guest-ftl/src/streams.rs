//! Which stream (open line) a block is written to: hot/cold separation by inferred lifetime.
//!
//! With `hot_cold` there are four streams: hot and cold user writes ([`USER`], [`USER_COLD`])
//! and hot and cold relocated blocks ([`GC`], [`GC_OLD`]). Lines then hold blocks that die at
//! about the same time, so GC finds hot lines nearly empty and leaves cold lines alone, and
//! cost-benefit victims split the spare space between the two (cold lines are cleaned fuller
//! than hot ones, which is what minimises the total write amplification).
//!
//! The lifetime of a block is inferred as SepBIT (FAST'22) does, from the lifespans of the
//! versions it replaces (a block that lived briefly last time will again), smoothed over its
//! recent writes so that one short or long life by chance does not move it: each logical
//! block keeps an estimate, the average of its last lifespan and its previous estimate
//! (lifespans counted in writes). A user write is hot when the estimate is below the hot bound:
//! the geometric mean of the lifetimes GC measures for the hot and the cold user stream (see
//! [`crate::heat::Heat`]), one disk's worth of writes until it has: a bound measured rather than
//! set sits between the temperatures of whatever the workload is. A relocated block stays hot
//! only when it comes from a hot line and is younger than that bound: following the line's
//! class keeps the survivors of cold lines (cleaned long after they were written, but usually
//! before they reach the bound) out of the hot stream, and the age bound moves out the cold
//! blocks a hot line caught.
//!
//! The estimates live in memory only: after a restart every block starts unknown (cold until
//! it is rewritten), which costs some separation for a while, never correctness.

use crate::map::Entry;

/// Stream of user writes (with `hot_cold`: of blocks rewritten soon after their last write).
pub const USER: usize = 0;
/// Stream of user writes of blocks not rewritten for a long time, or never written.
pub const USER_COLD: usize = 1;
/// Stream of relocated data last written recently.
pub const GC: usize = 2;
/// Stream of relocated data not rewritten for a long time (it rests on the most worn chunks).
pub const GC_OLD: usize = 3;

/// Per logical block, the smoothed lifespan of its recent versions, in writes.
pub struct Lifetimes {
    estimate: Vec<f32>,
}

/// No lifespan seen yet.
const UNKNOWN: f32 = f32::INFINITY;

impl Lifetimes {
    pub fn new(user_lbas: u32) -> Lifetimes {
        Lifetimes { estimate: vec![UNKNOWN; user_lbas as usize] }
    }

    /// Records that a version of `lba` lived `lifespan` writes; returns the new estimate.
    fn observe(&mut self, lba: u32, lifespan: u64) -> f32 {
        let Some(e) = self.estimate.get_mut(lba as usize) else { return UNKNOWN };
        let l = lifespan as f32;
        *e = if e.is_finite() { (*e + l) / 2.0 } else { l };
        *e
    }
}

/// Which stream each block goes to: the lifetimes of the logical blocks and the streams' update
/// frequencies as GC last measured them. Without `hot_cold` everything is [`USER`].
pub struct Streams {
    hot_cold: bool,
    user_lbas: u32,
    lifetimes: Lifetimes,
    /// Each stream's update frequency, as GC last measured it (see [`crate::heat`]).
    rates: Vec<f64>,
}

impl Streams {
    pub fn new(hot_cold: bool, user_lbas: u32) -> Streams {
        Streams { hot_cold, user_lbas, lifetimes: Lifetimes::new(user_lbas), rates: Vec::new() }
    }

    /// The streams' update frequencies GC measured last.
    pub fn set_rates(&mut self, rates: &[f64]) {
        self.rates.clear();
        self.rates.extend_from_slice(rates);
    }

    /// The bound between hot and cold lifetimes, in writes: the geometric mean of the hot and
    /// cold user streams' measured lifetimes (the reciprocals of their update frequencies), so
    /// that the bound sits between the two temperatures whatever the workload; one disk's worth
    /// of writes until GC has measured both.
    fn hot_bound(&self) -> f64 {
        let hot = self.rates.get(USER).copied().unwrap_or(0.0);
        let cold = self.rates.get(USER_COLD).copied().unwrap_or(0.0);
        let f = (hot * cold).sqrt();
        if f.is_finite() && f > 0.0 {
            1.0 / f
        } else {
            f64::from(self.user_lbas)
        }
    }

    /// The user stream for a write of `lba` at sequence number `now`, about to replace its
    /// current version `prev`.
    pub fn user_stream(&mut self, lba: u32, prev: Entry, now: u64) -> usize {
        if !self.hot_cold {
            return USER;
        }
        if !prev.is_mapped() {
            return USER_COLD;
        }
        let estimate = self.lifetimes.observe(lba, now.saturating_sub(prev.seq));
        if f64::from(estimate) <= self.hot_bound() {
            USER
        } else {
            USER_COLD
        }
    }

    /// The stream a block last written at `seq` is relocated to, at sequence number `now`, from
    /// a line of stream `from`.
    pub fn gc_stream(&self, seq: u64, from: usize, now: u64) -> usize {
        if !self.hot_cold {
            return USER;
        }
        let hot_line = from == USER || from == GC;
        let age = now.saturating_sub(seq) as f64;
        if hot_line && age <= self.hot_bound() {
            GC
        } else {
            GC_OLD
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_bound_sits_between_the_measured_temperatures() {
        let mut s = Streams::new(true, 100);
        assert_eq!(s.hot_bound(), 100.0, "a disk's worth of writes before anything is measured");
        s.set_rates(&[4e-3, 2.5e-4, 1e-3, 1e-4]);
        assert!((s.hot_bound() - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn the_estimate_averages_recent_lifespans() {
        let mut l = Lifetimes::new(4);
        assert_eq!(l.observe(1, 100), 100.0, "the first lifespan is the estimate");
        assert_eq!(l.observe(1, 300), 200.0);
        assert_eq!(l.observe(1, 0), 100.0);
        assert_eq!(l.observe(9, 5), UNKNOWN, "beyond the disk");
    }

    #[test]
    fn relocated_blocks_are_split_by_age() {
        let s = Streams::new(true, 100);
        let now = 1000;
        assert_eq!(s.gc_stream(950, USER, now), GC);
        assert_eq!(s.gc_stream(950, GC, now), GC);
        assert_eq!(s.gc_stream(10, USER, now), GC_OLD, "old");
        assert_eq!(s.gc_stream(950, USER_COLD, now), GC_OLD, "from a cold line");
        assert_eq!(s.gc_stream(950, GC_OLD, now), GC_OLD, "from a cold line");
    }
}
