//! Garbage collection: victims, relocation, and the reset of cleaned lines.
//!
//! # Victims
//!
//! Lines queued as *urgent* go first: lines whose writes failed, lines left open by a crash,
//! lines holding blocks that warned of high ECC or sit on a chunk reported offline, and lines
//! picked by static wear levelling. Otherwise a closed line is picked by the configured
//! [`VictimPolicy`]: greedy (fewest valid blocks) or cost-benefit, which weighs the space a
//! line gives back against how fast its blocks die ([`crate::heat::Heat`], measured per line
//! from the overwrites it sees) so that the spare space is split between hot and cold data as
//! the write amplification model says is best (see [`spare_value`]).
//!
//! Relocated blocks keep their logical block and sequence number; with `hot_cold` they go to
//! one of two GC streams by the line they come from and their age ([`crate::streams`]), so
//! data that survived GC lands with data like it, apart from the user streams. A cleaned victim
//! is *drained*: it is reset only once the current version of every logical block it held is
//! on the device and the device has been flushed: the copies of the blocks moved out of it, and
//! the newer versions of the blocks overwritten in it (until those are durable, the victim may
//! hold the only durable copy of their logical block). So a crash can never lose a block's last
//! durable version. Those blocks usually reach the device with the stripes that follow; only
//! when space is short are the streams holding them padded out to free drained lines at once.
//!
//! User writes pay for this work as they go (see `limiter`): there is no background thread.

use std::collections::BTreeMap;

use host_ftl::Status;

use super::Engine;
use crate::blocks::{LineState, Victim};
use crate::config::VictimPolicy;
use crate::error::{FtlError, Result};
use crate::flash::unchanged;
use crate::metrics::Metrics;

/// Blocks relocated per GC read batch: a few commands' worth on every PU, so that reads cover
/// whole write units (the device reads a part of a unit in the time of the whole unit).
pub(super) const GC_BATCH: u32 = 512;

/// What cleaning a line at valid fraction `u` is worth per unit of its blocks' update frequency.
///
/// In the usual model of garbage collection (a class of blocks overwritten uniformly at random,
/// its lines cleaned at valid fraction `u = exp(-(1 - u) / r)`, `r` = its data over its flash,
/// write amplification `1 / (1 - u)`), the write amplification of a class of update frequency
/// `f` falls with extra spare at a rate proportional to `f / (ln u + (1 - u) / u)`. Spare is best split when that is the same for
/// every class (Desnoyers, SYSTOR'12; Stoica and Ailamaki, VLDB'13), so GC cleans the line with
/// the highest `(ln u + (1 - u) / u) / f`: each class ends up cleaned at its optimal `u`, cold
/// lines fuller than hot ones, without any class being named or counted.
fn spare_value(u: f64) -> f64 {
    if u <= 0.0 {
        return f64::INFINITY;
    }
    u.ln() + (1.0 - u) / u
}

impl Engine {
    /// The next line to clean, if any would free space.
    pub(super) fn pick_victim(&mut self) -> Option<u32> {
        if let Some(gen) = self.blocks.lines_mut().next_urgent() {
            return Some(gen);
        }
        let now = self.blocks.mapping().next_seq();
        let lines = self.blocks.lines();
        let priors = lines.stream_rates(now);
        self.streams.set_rates(&priors);
        let lay = &self.lay;
        let best = lines
            .iter()
            .filter(|l| l.state() == LineState::Closed && l.valid() < l.capacity(lay))
            .map(|l| {
                let u = f64::from(l.valid()) / f64::from(l.capacity(lay));
                let score = match self.cfg.victim {
                    VictimPolicy::Greedy => -u,
                    VictimPolicy::CostBenefit => {
                        let prior = priors.get(l.stream()).copied().unwrap_or(priors[0]);
                        spare_value(u) / l.heat().rate(l.valid(), now, prior)
                    }
                };
                (score, l.gen())
            })
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        best.map(|(_, g)| g)
    }

    /// Relocates up to `budget` valid blocks; returns how many it moved. Cleans (resets)
    /// victims whose valid blocks are all gone. With `only`, stops when the current victim is
    /// done instead of picking another.
    pub async fn gc_step(&mut self, mut budget: u32, only: bool) -> Result<u32> {
        let mut moved = 0;
        loop {
            // A victim is never left half done while only the GC reserve is free: finishing it
            // later must not need more space than is left.
            if self.free_chunks() < self.reserve_chunks() {
                // Space held by drained lines comes back first: the ready ones, and only if
                // that is not enough, the others, by padding out what they wait for.
                self.reset_drained(false).await?;
                if self.free_chunks() < self.reserve_chunks() {
                    self.reset_drained(true).await?;
                }
            }
            let victim = self.blocks.lines().victim();
            let pressed = victim.is_some() && self.free_chunks() < self.reserve_chunks();
            if budget == 0 && !pressed {
                break;
            }
            let v = match victim {
                Some(v) if self.blocks.lines().contains(v.gen) => v,
                _ if only => break,
                _ => match self.pick_victim() {
                    Some(gen) => {
                        tracing::debug!(gen, "GC victim");
                        let v = Victim { gen, cursor: 0 };
                        self.blocks.lines_mut().set_victim(Some(v));
                        v
                    }
                    None => {
                        self.blocks.lines_mut().set_victim(None);
                        break;
                    }
                },
            };
            let Some(line) = self.blocks.lines().get(v.gen) else { break };
            let cap = line.capacity(&self.lay);
            let from = line.stream();
            let valid = line.valid();
            let members = line.members().to_vec();
            let mut cursor = v.cursor;
            let mut batch = Vec::new();
            let limit = if budget > 0 { budget.min(GC_BATCH) } else { GC_BATCH };
            if valid > 0 {
                while cursor < cap && (batch.len() as u32) < limit {
                    // Across the members in turn, so that the reads load every PU alike.
                    let m = members.len() as u32;
                    let slot = self.lay.slot(members[(cursor % m) as usize], cursor / m);
                    if self.blocks.mapping().is_valid(slot) {
                        batch.push(slot);
                    }
                    cursor += 1;
                }
            }
            if batch.is_empty() {
                if valid > 0 {
                    if v.cursor == 0 {
                        return Err(FtlError::Metadata(format!("line {} counts valid blocks it does not have", v.gen)));
                    }
                    // Blocks before the cursor became valid again (a failed pass): start over.
                    self.blocks.lines_mut().set_victim(Some(Victim { gen: v.gen, cursor: 0 }));
                    continue;
                }
                self.finish_victim(v.gen).await?;
                if only {
                    break;
                }
                continue;
            }
            // One PU's blocks together: each read command then covers one PU, in whole units.
            batch.sort_by_key(|&slot| self.lay.chunk_of(slot));
            let data = self.read_slots(&batch).await?;
            // Only now, with the batch read, is the cursor moved past it.
            self.blocks.lines_mut().set_victim(Some(Victim { gen: v.gen, cursor }));
            for (slot, r) in batch.iter().copied().zip(data) {
                let map = self.blocks.mapping();
                let lba = map.lba_at(slot);
                let e = map.get(lba);
                if !map.is_valid(slot) || e.slot != slot {
                    continue;
                }
                match r {
                    Ok(d) => {
                        let stream = self.streams.gc_stream(e.seq, from, map.next_seq());
                        self.blocks.append(stream, lba, e.seq, d.into_boxed_slice())?;
                        Metrics::add(&self.metrics.gc_slots, 1);
                    }
                    Err(status) => {
                        // Its chunk is offline: unmap it and fail reads of it.
                        tracing::error!(lba, slot, %status, "block lost");
                        self.blocks.lose(lba, e.seq);
                        Metrics::add(&self.metrics.lost_blocks, 1);
                    }
                }
                moved += 1;
            }
            budget = budget.saturating_sub(batch.len() as u32);
            self.submit(&[]).await?;
        }
        Ok(moved)
    }

    /// The victim holds no valid block: it is *drained*, and reset once the current version of
    /// every block it holds is on the device (see [`Engine::reset_drained`]): the copies of the
    /// blocks moved out of it, and the newer versions of the blocks overwritten in it, whose old
    /// copy here may be the only durable one until the new version is durable.
    async fn finish_victim(&mut self, gen: u32) -> Result<()> {
        self.blocks.lines_mut().set_victim(None);
        let (map, lines) = (self.blocks.mapping(), self.blocks.lines());
        let mut needs: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
        if let Some(line) = lines.get(gen) {
            for (&c, &alloc) in line.members().iter().zip(line.alloc()) {
                for off in 0..alloc.min(self.lay.spc) {
                    let lba = map.lba_at(self.lay.slot(c, off));
                    if lba >= map.user_lbas() {
                        continue;
                    }
                    let e = map.get(lba);
                    if !e.is_mapped() {
                        continue;
                    }
                    let (c2, o2) = (self.lay.chunk_of(e.slot), self.lay.offset_of(e.slot));
                    let ci = lines.chunk(c2);
                    if let (Some(g2), true) = (ci.line(), ci.wp() <= o2) {
                        let n = needs.entry(c2).or_insert((g2, 0));
                        n.1 = n.1.max(o2 + 1);
                    }
                }
            }
        }
        let needs: Vec<(u32, u32, u32)> = needs.into_iter().map(|(c, (g, wp))| (c, g, wp)).collect();
        self.blocks.lines_mut().drain(gen, needs);
        self.reset_drained(false).await
    }

    /// Resets the drained lines whose needed blocks are all written (with `force`, after
    /// writing out, padded, the open lines that hold needed blocks). The device is flushed
    /// first, so that no block's only durable copy is erased. Lines wait while any line whose
    /// write failed still holds blocks.
    pub async fn reset_drained(&mut self, force: bool) -> Result<()> {
        if !self.blocks.lines().iter().any(|l| l.state() == LineState::Drained) {
            return Ok(());
        }
        if force {
            let streams = self.streams_holding_needs();
            self.submit(&streams).await?;
        }
        let lines = self.blocks.lines();
        if lines.iter().any(|l| l.state() == LineState::Aborted && l.valid() > 0 && lines.unwritten(l)) {
            return Ok(());
        }
        let ready: Vec<u32> = lines
            .iter()
            .filter(|l| l.state() == LineState::Drained)
            .filter(|l| {
                // A need is met when the block is written, or when its line is gone (it was
                // relocated, durably, before that line was reset).
                l.needs().iter().all(|&(c, g, wp)| {
                    let ci = lines.chunk(c);
                    ci.line() != Some(g) || ci.wp() >= wp
                })
            })
            .map(|l| l.gen())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        self.flash.flush().await?;
        // The drained lines' blocks have durable newer copies; the lines are not reset yet.
        failpoint::hit("guest_ftl::gc::before-reset");
        let mut touched = Vec::new();
        let lines = self.blocks.lines();
        for gen in &ready {
            if let Some(l) = lines.get(*gen) {
                touched.extend(l.members().iter().copied().filter(|&c| lines.chunk(c).touched()));
            }
        }
        let statuses = self.flash.reset(&touched).await?;
        // The lines are reset; the last checkpoint may still map blocks into them (recovery
        // finds their newer copies by scanning the lines written since).
        failpoint::hit("guest_ftl::gc::after-reset");
        let mut failed = Vec::new();
        let mut transient = None;
        for (&c, st) in touched.iter().zip(&statuses) {
            if st.is_success() {
                self.blocks.lines_mut().reset_done(c);
                Metrics::add(&self.metrics.resets, 1);
            } else if unchanged(*st) {
                transient = Some(*st);
            } else if *st == Status::INVALID_RESET && self.chunk_is_free(c).await? {
                // Never opened after all (its only write failed before reaching the media).
                self.blocks.lines_mut().untouched(c);
            } else {
                tracing::warn!(chunk = c, status = %st, "reset failed");
                self.blocks.lines_mut().untouched(c);
                failed.push(c);
            }
        }
        if let Some(st) = transient {
            // Those lines stay drained; chunks already reset are simply not reset again.
            return Err(FtlError::Device { opcode: host_ftl::opcode::VECTOR_RESET, status: st });
        }
        for gen in ready {
            if self.blocks.reset_line(gen) {
                Metrics::add(&self.metrics.gc_runs, 1);
                tracing::debug!(gen, free = self.free_chunks(), "line cleaned");
            }
        }
        for c in failed {
            self.retire_chunk(c).await?;
        }
        Ok(())
    }

    /// The streams whose open lines hold blocks a drained line waits for. Only those are padded
    /// out to free drained lines: a padding slot takes space like a block written to its line,
    /// and in a cold line, cleaned when nearly full, that space costs many relocations.
    fn streams_holding_needs(&self) -> Vec<usize> {
        let lines = self.blocks.lines();
        let mut out = Vec::new();
        for line in lines.iter().filter(|l| l.state() == LineState::Drained) {
            for &(c, g, wp) in line.needs() {
                let ci = lines.chunk(c);
                if ci.line() != Some(g) || ci.wp() >= wp {
                    continue;
                }
                let open = lines.get(g).filter(|h| h.state() == LineState::Open);
                if let Some(h) = open.filter(|h| !out.contains(&h.stream())) {
                    out.push(h.stream());
                }
            }
        }
        out
    }

    /// Whether the device says a chunk is free.
    async fn chunk_is_free(&mut self, chunk: u32) -> Result<bool> {
        let table = self.flash.chunk_table().await?;
        Ok(table.get(chunk as usize).is_some_and(|d| d.state == host_ftl::ChunkState::Free))
    }

    /// Relocates every aborted line completely.
    pub async fn relocate_aborted(&mut self) -> Result<()> {
        loop {
            let aborted = self.blocks.lines().iter().find(|l| l.state() == LineState::Aborted).map(|l| l.gen());
            let Some(gen) = aborted else { return Ok(()) };
            self.clean_line(gen).await?;
        }
    }

    /// Relocates one line completely and resets it. Lines whose writes fail on the way are
    /// relocated first (the target keeps its data until theirs is safe).
    pub async fn clean_line(&mut self, gen: u32) -> Result<()> {
        let budget = 64 + 4 * self.blocks.lines().len();
        for _ in 0..budget {
            let lines = self.blocks.lines();
            if !lines.contains(gen) {
                return Ok(());
            }
            let next = lines
                .iter()
                .find(|l| l.state() == LineState::Aborted && l.gen() != gen && l.valid() > 0 && lines.unwritten(l))
                .map_or(gen, |l| l.gen());
            let lines = self.blocks.lines_mut();
            match lines.victim() {
                Some(v) if v.gen == next => {}
                Some(v) => {
                    // Put the current victim back; it is picked up again later.
                    lines.requeue_first(v.gen);
                    lines.set_victim(Some(Victim { gen: next, cursor: 0 }));
                }
                None => lines.set_victim(Some(Victim { gen: next, cursor: 0 })),
            }
            lines.unqueue(next);
            if lines.get(next).is_some_and(|l| l.state() == LineState::Drained) {
                self.reset_drained(true).await?;
            } else {
                self.gc_step(u32::MAX, true).await?;
            }
        }
        Err(FtlError::Device { opcode: host_ftl::opcode::VECTOR_WRITE, status: Status::INTERNAL_ERROR })
    }

    /// Cleans queued urgent lines (failures, refresh, wear levelling).
    pub async fn clean_urgent(&mut self) -> Result<()> {
        let mut rounds = 0;
        while let Some(gen) = self.blocks.lines().first_urgent() {
            rounds += 1;
            if rounds > 64 {
                break;
            }
            if !self.blocks.lines().contains(gen) {
                self.blocks.lines_mut().drop_first_urgent();
                continue;
            }
            self.clean_line(gen).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::line_tests::line;
    use crate::blocks::Line;
    use crate::engine::tests::engine;
    use crate::heat::Heat;
    use crate::streams::GC_OLD;

    /// A line opened at `born` with every slot valid, whose blocks then die one by one, evenly
    /// spread until sequence number 1000, until `valid` are left.
    fn dying_line(gen: u32, members: Vec<u32>, born: u64, valid: u32) -> Line {
        let mut l = line(gen, members);
        l.set_heat(Heat::new(born));
        let mut v = 64;
        let deaths = u64::from(v - valid);
        for k in 1..=deaths {
            let t = born + (1000 - born) * k / deaths;
            l.heat_mut().expose(v, t);
            l.heat_mut().death(t);
            v -= 1;
        }
        l.set_valid(valid);
        l
    }

    /// Line 1: 10% valid, its blocks died within the last 100 writes (hot); line 2: 40% valid,
    /// its blocks died over 1000 writes (cold).
    fn two_lines(e: &mut Engine) {
        e.blocks.lines_mut().insert(dying_line(1, vec![0, 16, 32, 48], 900, 6));
        e.blocks.lines_mut().insert(dying_line(2, vec![1, 17, 33, 49], 0, 26));
        e.blocks.restore_next_seq(1001);
    }

    #[test]
    fn greedy_takes_the_emptiest_line_and_cost_benefit_weighs_update_frequency() {
        let (mut e, _d) = engine(VictimPolicy::Greedy);
        two_lines(&mut e);
        assert_eq!(e.pick_victim(), Some(1));
        let (mut e, _d) = engine(VictimPolicy::CostBenefit);
        two_lines(&mut e);
        assert_eq!(e.pick_victim(), Some(2), "cold and 60% invalid beats hot and 90% invalid");
    }

    #[test]
    fn spare_value_puts_each_class_at_the_models_optimum() {
        // The model's best split for 80% of the writes to 20% of the blocks at 28% OP cleans hot
        // lines at 31.5% valid and cold ones at 71.4% (update frequencies 4 and 1/4): both
        // then weigh the same.
        let (hot, cold) = (spare_value(0.3145) / 4.0, spare_value(0.7136) / 0.25);
        assert!((hot / cold - 1.0).abs() < 0.02, "{hot} {cold}");
        assert!(spare_value(0.2) > spare_value(0.5) && spare_value(0.5) > spare_value(0.9));
        assert_eq!(spare_value(0.0), f64::INFINITY);
    }

    #[test]
    fn only_streams_holding_what_drained_lines_wait_for_are_padded() {
        let (mut e, _d) = engine(VictimPolicy::CostBenefit);
        let mut open = line(5, vec![2, 18, 34, 50]);
        open.set_state(LineState::Open);
        open.set_stream(GC_OLD);
        e.blocks.lines_mut().insert(open);
        let mut drained = line(6, vec![3, 19, 35, 51]);
        drained.set_state(LineState::Drained);
        drained.set_needs(vec![(18, 5, 3)]);
        e.blocks.lines_mut().insert(drained);
        assert_eq!(e.streams_holding_needs(), vec![GC_OLD]);
        e.blocks.lines_mut().set_wp(18, 4);
        assert!(e.streams_holding_needs().is_empty(), "written: nothing to pad");
    }

    #[test]
    fn urgent_lines_go_first_and_full_lines_are_never_victims() {
        let (mut e, _d) = engine(VictimPolicy::Greedy);
        two_lines(&mut e);
        e.blocks.lines_mut().queue_urgent(2);
        assert_eq!(e.pick_victim(), Some(2));
        let cap = e.blocks.lines().get(1).unwrap().capacity(&e.lay);
        for gen in [1, 2] {
            e.blocks.lines_mut().get_mut(gen).unwrap().set_valid(cap);
        }
        assert_eq!(e.pick_victim(), None, "cleaning a full line frees nothing");
    }
}
