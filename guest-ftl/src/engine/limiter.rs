//! The rate limiter between user writes and garbage collection.
//!
//! No background thread: user writes do the GC work themselves, in proportion to what they
//! consume. Once fewer than [`Engine::gc_low_chunks`] chunks are free, every user block written
//! owes `u / (1 - u)` relocated blocks (`u` the victim's valid fraction: the exact price of the
//! space it frees), scaled up the further free space falls below the threshold. A user write
//! that needs a new line while only the GC reserve is left cleans whole victims first. Every
//! victim frees more than it consumes (the greedy victim of a disk with over-provisioning always
//! has invalid blocks), so a full disk slows down to the GC rate but never stalls; only when
//! retired chunks have eaten the whole over-provisioning does a write fail, with
//! [`crate::FtlError::NoSpace`].

use std::time::Instant;

use super::gc::GC_BATCH;
use super::Engine;
use crate::blocks::Victim;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::streams::USER;

impl Engine {
    /// The rate limiter: called before a user write of `n` blocks.
    pub async fn pay_for_writes(&mut self, n: u32) -> Result<()> {
        let low = self.gc_low_chunks();
        let start = Instant::now();
        let mut worked = false;
        if self.free_chunks() < low {
            let u = self.victim_fill();
            let urgency = 1.0 + f64::from(low - self.free_chunks()) / f64::from(self.lay.pus.max(1));
            self.debt += f64::from(n) * (u / (1.0 - u)).min(64.0) * urgency;
            // Whole batches: the device reads a few blocks of a PU in the time of a whole write
            // unit, so GC reads are worth batching (many blocks per PU per command).
            let batch = self.gc_batch();
            while self.debt >= f64::from(batch) {
                let budget = batch;
                let moved = self.gc_step(budget, false).await?;
                worked = true;
                if moved == 0 && self.blocks.lines().victim().is_none() {
                    self.debt = 0.0;
                    break;
                }
                self.debt -= f64::from(moved.max(1));
            }
        } else {
            self.debt = 0.0;
        }
        if worked {
            Metrics::add(&self.metrics.throttled_ns, start.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// The floor of the rate limiter: before a user write opens a new line in `stream`, whole
    /// victims are cleaned until a line can be opened without touching the GC reserve.
    pub async fn make_room_for_user_line(&mut self, stream: usize) -> Result<()> {
        let stream = if self.cfg.hot_cold { stream } else { USER };
        if self.blocks.lines().open_line(stream).is_some() {
            return Ok(());
        }
        let need = self.reserve_chunks() + self.lay.pus;
        let max_rounds = self.lay.total_slots() / u64::from(GC_BATCH) * 4 + 16;
        let start = Instant::now();
        let mut rounds = 0;
        while self.free_chunks() < need && rounds < max_rounds {
            rounds += 1;
            let before = self.free_chunks();
            let moved = self.gc_step(GC_BATCH, false).await?;
            if moved == 0 && self.blocks.lines().victim().is_none() && self.free_chunks() == before {
                self.reset_drained(true).await?;
                if self.free_chunks() == before {
                    break;
                }
            }
        }
        if rounds > 0 {
            Metrics::add(&self.metrics.throttled_ns, start.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// Blocks GC relocates at a time when paying for user writes: [`GC_BATCH`], or a line's
    /// worth if that is less, so that the debt never runs ahead by more than a line of space.
    fn gc_batch(&self) -> u32 {
        GC_BATCH.min(self.lay.pus * self.lay.spc).max(1)
    }

    /// Valid fraction of the current (or next) victim.
    fn victim_fill(&mut self) -> f64 {
        if self.blocks.lines().victim().is_none() {
            if let Some(gen) = self.pick_victim() {
                self.blocks.lines_mut().set_victim(Some(Victim { gen, cursor: 0 }));
            }
        }
        let lines = self.blocks.lines();
        lines
            .victim()
            .and_then(|v| lines.get(v.gen))
            .map(|l| f64::from(l.valid()) / f64::from(l.capacity(&self.lay).max(1)))
            .unwrap_or(0.0)
            .min(0.99)
    }
}
