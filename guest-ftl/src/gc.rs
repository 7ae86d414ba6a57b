//! Garbage collection, the rate limiter between user writes and GC, and wear levelling.
//!
//! # Victims
//!
//! Lines queued as *urgent* go first: lines whose writes failed, lines left open by a crash,
//! lines holding blocks that warned of high ECC or sit on a chunk reported offline, and lines
//! picked by static wear levelling. Otherwise a closed line is picked by the configured
//! [`VictimPolicy`]: greedy (fewest valid blocks) or cost-benefit, which weighs the space a
//! line gives back against how fast its blocks die ([`Heat`], measured per line from the
//! overwrites it sees) so that the spare space is split between hot and cold data as the write
//! amplification model says is best (see [`spare_value`]).
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
//! # Rate limiter
//!
//! No background thread: user writes do the GC work themselves, in proportion to what they
//! consume. Once fewer than [`Engine::gc_low_chunks`] chunks are free, every user block written
//! owes `u / (1 - u)` relocated blocks (`u` the victim's valid fraction: the exact price of the
//! space it frees), scaled up the further free space falls below the threshold. A user write
//! that needs a new line while only the GC reserve is left cleans whole victims first. Every
//! victim frees more than it consumes (the greedy victim of a disk with over-provisioning always
//! has invalid blocks), so a full disk slows down to the GC rate but never stalls; only when
//! retired chunks have eaten the whole over-provisioning does a write fail, with
//! [`FtlError::NoSpace`].
//!
//! # Wear levelling
//!
//! New lines take the least worn free chunk of each PU (old relocated data takes the most worn,
//! where it rests). When the wear of chunks differs by more than `wear_spread` resets, the closed
//! line on the least worn chunks (cold data that never moves) is queued for relocation, so its
//! chunks go back into rotation.

use std::time::Instant;

use host_ftl::Status;

use crate::config::VictimPolicy;
#[cfg(test)]
use crate::engine::Line;
#[cfg(test)]
use crate::engine::GC_OLD;
use crate::engine::{Engine, LineState, Victim, USER};
use crate::error::{FtlError, Result};
use crate::layout::NO_SLOT;
use crate::map::Entry;
use crate::metrics::Metrics;

/// Blocks relocated per GC read batch: a few commands' worth on every PU, so that reads cover
/// whole write units (the device reads a part of a unit in the time of the whole unit).
const GC_BATCH: u32 = 512;

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
    fn pick_victim(&mut self) -> Option<u32> {
        while let Some(gen) = self.urgent.pop_front() {
            match self.lines.get(&gen).map(|l| l.state) {
                Some(LineState::Closed | LineState::Aborted) => return Some(gen),
                // A line still being written is retired by aborting it.
                Some(LineState::Open | LineState::Full) => {
                    if let Some(l) = self.lines.get_mut(&gen) {
                        l.state = LineState::Aborted;
                        let stream = l.stream;
                        if self.open.get(stream).copied().flatten() == Some(gen) {
                            self.open[stream] = None;
                        }
                    }
                    return Some(gen);
                }
                Some(LineState::Drained) | None => {}
            }
        }
        let now = self.next_seq;
        let priors =
            crate::heat::pooled_rates(self.lines.values().map(|l| (l.stream, &l.heat, l.valid)), self.open.len(), now);
        self.streams.set_rates(&priors);
        let lay = &self.lay;
        let best = self
            .lines
            .values()
            .filter(|l| l.state == LineState::Closed && l.valid < l.capacity(lay))
            .map(|l| {
                let u = f64::from(l.valid) / f64::from(l.capacity(lay));
                let score = match self.cfg.victim {
                    VictimPolicy::Greedy => -u,
                    VictimPolicy::CostBenefit => {
                        let prior = priors.get(l.stream).copied().unwrap_or(priors[0]);
                        spare_value(u) / l.heat.rate(l.valid, now, prior)
                    }
                };
                (score, l.gen)
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
            if self.free < self.reserve_chunks() {
                // Space held by drained lines comes back first: the ready ones, and only if
                // that is not enough, the others, by padding out what they wait for.
                self.reset_drained(false).await?;
                if self.free < self.reserve_chunks() {
                    self.reset_drained(true).await?;
                }
            }
            let pressed = self.victim.is_some() && self.free < self.reserve_chunks();
            if budget == 0 && !pressed {
                break;
            }
            let v = match self.victim {
                Some(v) if self.lines.contains_key(&v.gen) => v,
                _ if only => break,
                _ => match self.pick_victim() {
                    Some(gen) => {
                        tracing::debug!(gen, "GC victim");
                        let v = Victim { gen, cursor: 0 };
                        self.victim = Some(v);
                        v
                    }
                    None => {
                        self.victim = None;
                        break;
                    }
                },
            };
            let Some(line) = self.lines.get(&v.gen) else { break };
            let cap = line.capacity(&self.lay);
            let from = line.stream;
            let members = line.members.clone();
            let mut cursor = v.cursor;
            let mut batch = Vec::new();
            let limit = if budget > 0 { budget.min(GC_BATCH) } else { GC_BATCH };
            if line.valid > 0 {
                while cursor < cap && (batch.len() as u32) < limit {
                    // Across the members in turn, so that the reads load every PU alike.
                    let m = members.len() as u32;
                    let slot = self.lay.slot(members[(cursor % m) as usize], cursor / m);
                    if self.is_valid(slot) {
                        batch.push(slot);
                    }
                    cursor += 1;
                }
            }
            if batch.is_empty() {
                if line.valid > 0 {
                    if v.cursor == 0 {
                        return Err(FtlError::Metadata(format!("line {} counts valid blocks it does not have", v.gen)));
                    }
                    // Blocks before the cursor became valid again (a failed pass): start over.
                    self.victim = Some(Victim { gen: v.gen, cursor: 0 });
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
            self.victim = Some(Victim { gen: v.gen, cursor });
            for (slot, r) in batch.iter().copied().zip(data) {
                let lba = self.p2l[slot as usize];
                let e = self.map.get(lba);
                if !self.is_valid(slot) || e.slot != slot {
                    continue;
                }
                match r {
                    Ok(d) => {
                        let stream = self.streams.gc_stream(e.seq, from, self.next_seq);
                        self.append(stream, lba, e.seq, d.into_boxed_slice())?;
                        Metrics::add(&self.metrics.gc_slots, 1);
                    }
                    Err(status) => self.lose(lba, slot, e.seq, status),
                }
                moved += 1;
            }
            budget = budget.saturating_sub(batch.len() as u32);
            self.submit(&[]).await?;
        }
        Ok(moved)
    }

    /// A block could not be read (its chunk is offline): unmap it and fail reads of it.
    fn lose(&mut self, lba: u32, slot: u32, seq: u64, status: Status) {
        tracing::error!(lba, slot, %status, "block lost");
        self.remap(lba, Entry { slot: NO_SLOT, seq });
        self.lost.insert(lba);
        Metrics::add(&self.metrics.lost_blocks, 1);
    }

    /// The victim holds no valid block: it is *drained*, and reset once the current version of
    /// every block it holds is on the device (see [`Engine::reset_drained`]): the copies of the
    /// blocks moved out of it, and the newer versions of the blocks overwritten in it, whose old
    /// copy here may be the only durable one until the new version is durable.
    async fn finish_victim(&mut self, gen: u32) -> Result<()> {
        self.victim = None;
        let mut needs: std::collections::BTreeMap<u32, (u32, u32)> = std::collections::BTreeMap::new();
        if let Some(line) = self.lines.get(&gen) {
            for (&c, &alloc) in line.members.iter().zip(&line.alloc) {
                for off in 0..alloc.min(self.lay.spc) {
                    let lba = self.p2l[self.lay.slot(c, off) as usize];
                    if lba >= self.user_lbas {
                        continue;
                    }
                    let e = self.map.get(lba);
                    if !e.is_mapped() {
                        continue;
                    }
                    let (c2, o2) = (self.lay.chunk_of(e.slot), self.lay.offset_of(e.slot));
                    let ci = &self.chunks[c2 as usize];
                    if let (Some(g2), true) = (ci.line, ci.wp <= o2) {
                        let n = needs.entry(c2).or_insert((g2, 0));
                        n.1 = n.1.max(o2 + 1);
                    }
                }
            }
        }
        let needs: Vec<(u32, u32, u32)> = needs.into_iter().map(|(c, (g, wp))| (c, g, wp)).collect();
        if let Some(line) = self.lines.get_mut(&gen) {
            line.state = LineState::Drained;
            line.needs = needs;
        }
        for s in self.open.iter_mut() {
            if *s == Some(gen) {
                *s = None;
            }
        }
        self.urgent.retain(|&g| g != gen);
        self.reset_drained(false).await
    }

    /// Resets the drained lines whose needed blocks are all written (with `force`, after
    /// writing out, padded, the open lines that hold needed blocks). The device is flushed
    /// first, so that no block's only durable copy is erased. Lines wait while any line whose
    /// write failed still holds blocks.
    pub async fn reset_drained(&mut self, force: bool) -> Result<()> {
        if !self.lines.values().any(|l| l.state == LineState::Drained) {
            return Ok(());
        }
        if force {
            let streams = self.streams_holding_needs();
            self.submit(&streams).await?;
        }
        if self.lines.values().any(|l| l.state == LineState::Aborted && l.valid > 0 && self.unwritten(l)) {
            return Ok(());
        }
        let ready: Vec<u32> = self
            .lines
            .values()
            .filter(|l| l.state == LineState::Drained)
            .filter(|l| {
                // A need is met when the block is written, or when its line is gone (it was
                // relocated, durably, before that line was reset).
                l.needs.iter().all(|&(c, g, wp)| {
                    let ci = &self.chunks[c as usize];
                    ci.line != Some(g) || ci.wp >= wp
                })
            })
            .map(|l| l.gen)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        self.device_flush().await?;
        // The drained lines' blocks have durable newer copies; the lines are not reset yet.
        failpoint::hit("guest_ftl::gc::before-reset");
        let mut touched = Vec::new();
        for gen in &ready {
            if let Some(l) = self.lines.get(gen) {
                touched.extend(l.members.iter().copied().filter(|&c| self.chunks[c as usize].touched));
            }
        }
        let statuses = self.reset_chunks(&touched).await?;
        // The lines are reset; the last checkpoint may still map blocks into them (recovery
        // finds their newer copies by scanning the lines written since).
        failpoint::hit("guest_ftl::gc::after-reset");
        let mut failed = Vec::new();
        let mut transient = None;
        for (&c, st) in touched.iter().zip(&statuses) {
            if st.is_success() {
                self.chunks[c as usize].wear += 1;
                self.chunks[c as usize].touched = false;
                Metrics::add(&self.metrics.resets, 1);
            } else if crate::flash::unchanged(*st) {
                transient = Some(*st);
            } else if *st == Status::INVALID_RESET && self.chunk_is_free(c).await? {
                // Never opened after all (its only write failed before reaching the media).
                self.chunks[c as usize].touched = false;
            } else {
                tracing::warn!(chunk = c, status = %st, "reset failed");
                self.chunks[c as usize].touched = false;
                failed.push(c);
            }
        }
        if let Some(st) = transient {
            // Those lines stay drained; chunks already reset are simply not reset again.
            return Err(FtlError::Device { opcode: host_ftl::opcode::VECTOR_RESET, status: st });
        }
        let spc = self.lay.spc;
        for gen in ready {
            let Some(line) = self.lines.remove(&gen) else { continue };
            for &c in &line.members {
                for off in 0..spc {
                    let slot = c * spc + off;
                    self.cache.remove(&slot);
                    self.clear_valid(slot);
                }
                let ci = &mut self.chunks[c as usize];
                ci.line = None;
                ci.wp = 0;
                ci.released = 0;
                if !ci.bad {
                    self.free += 1;
                }
            }
            Metrics::add(&self.metrics.gc_runs, 1);
            tracing::debug!(gen, free = self.free, "line cleaned");
        }
        for c in failed {
            self.retire_chunk(c).await?;
        }
        Metrics::set(&self.metrics.free_chunks, u64::from(self.free));
        Ok(())
    }

    /// The streams whose open lines hold blocks a drained line waits for. Only those are padded
    /// out to free drained lines: a padding slot takes space like a block written to its line,
    /// and in a cold line, cleaned when nearly full, that space costs many relocations.
    fn streams_holding_needs(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for line in self.lines.values().filter(|l| l.state == LineState::Drained) {
            for &(c, g, wp) in &line.needs {
                let ci = &self.chunks[c as usize];
                if ci.line != Some(g) || ci.wp >= wp {
                    continue;
                }
                let open = self.lines.get(&g).filter(|h| h.state == LineState::Open);
                if let Some(h) = open.filter(|h| !out.contains(&h.stream)) {
                    out.push(h.stream);
                }
            }
        }
        out
    }

    /// Whether a line holds blocks that are only in the write buffer.
    fn unwritten(&self, line: &crate::engine::Line) -> bool {
        line.members.iter().zip(&line.alloc).any(|(&c, &a)| a > self.chunks[c as usize].wp)
    }

    /// Whether the device says a chunk is free.
    async fn chunk_is_free(&mut self, chunk: u32) -> Result<bool> {
        let table = self.flash.chunk_table().await?;
        Ok(table.get(chunk as usize).is_some_and(|d| d.state == host_ftl::ChunkState::Free))
    }

    /// Relocates every aborted line completely.
    pub async fn relocate_aborted(&mut self) -> Result<()> {
        while let Some(gen) = self.lines.values().find(|l| l.state == LineState::Aborted).map(|l| l.gen) {
            self.clean_line(gen).await?;
        }
        Ok(())
    }

    /// Relocates one line completely and resets it. Lines whose writes fail on the way are
    /// relocated first (the target keeps its data until theirs is safe).
    pub async fn clean_line(&mut self, gen: u32) -> Result<()> {
        let budget = 64 + 4 * self.lines.len();
        for _ in 0..budget {
            if !self.lines.contains_key(&gen) {
                return Ok(());
            }
            let next = self
                .lines
                .values()
                .find(|l| l.state == LineState::Aborted && l.gen != gen && l.valid > 0 && self.unwritten(l))
                .map_or(gen, |l| l.gen);
            match self.victim {
                Some(v) if v.gen == next => {}
                Some(v) => {
                    // Put the current victim back; it is picked up again later.
                    if self.lines.contains_key(&v.gen) && !self.urgent.contains(&v.gen) {
                        self.urgent.push_front(v.gen);
                    }
                    self.victim = Some(Victim { gen: next, cursor: 0 });
                }
                None => self.victim = Some(Victim { gen: next, cursor: 0 }),
            }
            self.urgent.retain(|&g| g != next);
            if self.lines.get(&next).is_some_and(|l| l.state == LineState::Drained) {
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
        while let Some(&gen) = self.urgent.front() {
            rounds += 1;
            if rounds > 64 {
                break;
            }
            if !self.lines.contains_key(&gen) {
                self.urgent.pop_front();
                continue;
            }
            self.clean_line(gen).await?;
        }
        Ok(())
    }

    /// The rate limiter: called before a user write of `n` blocks.
    pub async fn pay_for_writes(&mut self, n: u32) -> Result<()> {
        let low = self.gc_low_chunks();
        let start = Instant::now();
        let mut worked = false;
        if self.free < low {
            let u = self.victim_fill();
            let urgency = 1.0 + f64::from(low - self.free) / f64::from(self.lay.pus.max(1));
            self.debt += f64::from(n) * (u / (1.0 - u)).min(64.0) * urgency;
            // Whole batches: the device reads a few blocks of a PU in the time of a whole write
            // unit, so GC reads are worth batching (many blocks per PU per command).
            let batch = self.gc_batch();
            while self.debt >= f64::from(batch) {
                let budget = batch;
                let moved = self.gc_step(budget, false).await?;
                worked = true;
                if moved == 0 && self.victim.is_none() {
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
        let user_line_open =
            self.open[stream].is_some_and(|g| self.lines.get(&g).is_some_and(|l| l.state == LineState::Open));
        if user_line_open {
            return Ok(());
        }
        let need = self.reserve_chunks() + self.lay.pus;
        let max_rounds = self.lay.total_slots() / u64::from(GC_BATCH) * 4 + 16;
        let start = Instant::now();
        let mut rounds = 0;
        while self.free < need && rounds < max_rounds {
            rounds += 1;
            let before = self.free;
            let moved = self.gc_step(GC_BATCH, false).await?;
            if moved == 0 && self.victim.is_none() && self.free == before {
                self.reset_drained(true).await?;
                if self.free == before {
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
        if self.victim.is_none() {
            if let Some(gen) = self.pick_victim() {
                self.victim = Some(Victim { gen, cursor: 0 });
            }
        }
        let lay = &self.lay;
        self.victim
            .and_then(|v| self.lines.get(&v.gen))
            .map(|l| f64::from(l.valid) / f64::from(l.capacity(lay).max(1)))
            .unwrap_or(0.0)
            .min(0.99)
    }

    /// Static wear levelling: queue the closed line on the least worn chunks when wear has
    /// spread too far.
    pub fn check_wear(&mut self) {
        if self.opens_since_wl < 4 {
            return;
        }
        let good = self.chunks.iter().filter(|c| !c.bad);
        let (Some(min), Some(max)) = (good.clone().map(|c| c.wear).min(), good.map(|c| c.wear).max()) else {
            return;
        };
        if max - min <= self.cfg.wear_spread {
            return;
        }
        self.opens_since_wl = 0;
        let coldest = self
            .lines
            .values()
            .filter(|l| l.state == LineState::Closed && !self.urgent.contains(&l.gen))
            .min_by_key(|l| (l.members.iter().map(|&c| self.chunks[c as usize].wear).min().unwrap_or(0), l.gen));
        if let Some(l) = coldest {
            let lw = l.members.iter().map(|&c| self.chunks[c as usize].wear).min().unwrap_or(0);
            if max - lw > self.cfg.wear_spread {
                tracing::info!(gen = l.gen, wear = lw, max, "wear levelling moves a cold line");
                self.urgent.push_back(l.gen);
                Metrics::add(&self.metrics.wl_migrations, 1);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::channel::DirectChannel;
    use crate::config::FtlConfig;
    use crate::layout::{tests::small, Layout};

    pub(crate) fn engine(victim: VictimPolicy) -> (Engine, tempfile::TempDir) {
        let geo = small();
        let dev = host_ftl::Device::in_memory(geo.clone()).unwrap();
        let ch = Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(&geo)));
        let dir = tempfile::tempdir().unwrap();
        let store = state_store::Store::open(dir.path()).unwrap();
        let cfg = FtlConfig { victim, ..FtlConfig::default() };
        let lay = Layout::new(&geo).unwrap();
        (Engine::new(ch, lay, cfg, store, "t".into(), 100), dir)
    }

    /// A line opened at `born` with every slot valid, whose blocks then die one by one, evenly
    /// spread until sequence number 1000, until `valid` are left.
    fn dying_line(gen: u32, members: Vec<u32>, born: u64, valid: u32) -> Line {
        let mut l = crate::engine::tests::line(gen, members);
        l.heat = crate::heat::Heat::new(born);
        let mut v = 64;
        let deaths = u64::from(v - valid);
        for k in 1..=deaths {
            let t = born + (1000 - born) * k / deaths;
            l.heat.expose(v, t);
            l.heat.death(t);
            v -= 1;
        }
        l.valid = valid;
        l
    }

    /// Line 1: 10% valid, its blocks died within the last 100 writes (hot); line 2: 40% valid,
    /// its blocks died over 1000 writes (cold).
    fn two_lines(e: &mut Engine) {
        e.lines.insert(1, dying_line(1, vec![0, 16, 32, 48], 900, 6));
        e.lines.insert(2, dying_line(2, vec![1, 17, 33, 49], 0, 26));
        e.next_seq = 1001;
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
        let mut open = crate::engine::tests::line(5, vec![2, 18, 34, 50]);
        open.state = LineState::Open;
        open.stream = GC_OLD;
        e.lines.insert(5, open);
        for c in [2, 18, 34, 50] {
            e.chunks[c as usize].line = Some(5);
        }
        let mut drained = crate::engine::tests::line(6, vec![3, 19, 35, 51]);
        drained.state = LineState::Drained;
        drained.needs = vec![(18, 5, 3)];
        e.lines.insert(6, drained);
        assert_eq!(e.streams_holding_needs(), vec![GC_OLD]);
        e.chunks[18].wp = 4;
        assert!(e.streams_holding_needs().is_empty(), "written: nothing to pad");
    }

    #[test]
    fn urgent_lines_go_first_and_full_lines_are_never_victims() {
        let (mut e, _d) = engine(VictimPolicy::Greedy);
        two_lines(&mut e);
        e.urgent.push_back(2);
        assert_eq!(e.pick_victim(), Some(2));
        for l in e.lines.values_mut() {
            l.valid = l.capacity(&e.lay);
        }
        assert_eq!(e.pick_victim(), None, "cleaning a full line frees nothing");
    }
}
