//! Formatting a new disk and recovering an existing one after a stop or a crash.
//!
//! See the crate documentation for the protocol; in short, recovery:
//!
//! 1. loads the last checkpoint (map pages, meta), the trim records and the retired chunks;
//! 2. reads the chunk table (log page 0xCA): state, write pointer and wear of every chunk;
//! 3. pads every open chunk by `mw_cunits` sectors, so that its last blocks, still in the
//!    device's cache window, become readable;
//! 4. reads the OOB of the first block of every written chunk: its line generation; chunks of
//!    lines opened after the checkpoint (generation ≥ the checkpoint's next generation) or open
//!    at it are *scanned*: the OOB of every block says which logical block and version it holds;
//! 5. rebuilds the map: checkpoint entries stand unless their chunk has been reset (free) or
//!    rewritten (scanned) since; a scanned block wins over the entry when its sequence number is
//!    higher; a trim record unmaps blocks older than it (the newest trim of each block counts,
//!    so the trims are applied as disjoint ranges, each block visited once);
//! 6. rebuilds lines, valid counts and free chunks; lines that were open are relocated and reset
//!    (they are never written again) and a new checkpoint is taken.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ops::Range;

use host_ftl::{ChunkState, Status};

use super::Engine;
use crate::checkpoint::Saved;
use crate::error::{FtlError, Result};
use crate::io::Cmd;
use crate::layout::{Oob, MAX_GEN, MAX_SEQ, NO_SLOT, OOB_BYTES, PAD_LBA};
use crate::map::Entry;
use crate::metrics::Metrics;
use crate::trims::Trim;

/// Generation written in the OOB of padding added by recovery (belongs to no line).
const RECOVERY_GEN: u32 = u32::MAX;

impl Engine {
    /// Prepares a new disk: every chunk the device has written is reset, offline ones retired.
    pub async fn format(&mut self) -> Result<()> {
        let table = self.flash.chunk_table().await?;
        let mut dirty = Vec::new();
        for (c, d) in table.iter().enumerate() {
            match d.state {
                ChunkState::Offline => self.blocks.lines_mut().mark_bad(c as u32),
                ChunkState::Open | ChunkState::Closed => dirty.push(c as u32),
                ChunkState::Free => {}
            }
            let wear = wear_from_wli(self, d.wli);
            self.blocks.lines_mut().set_wear(c as u32, wear);
        }
        let st = self.flash.reset(&dirty).await?;
        for (&c, s) in dirty.iter().zip(st) {
            if !s.is_success() {
                self.blocks.lines_mut().mark_bad(c);
            }
        }
        self.blocks.lines_mut().recount();
        Ok(())
    }

    /// Rebuilds the state from the store and the device.
    pub async fn recover(&mut self, saved: Saved) -> Result<()> {
        let meta = saved.meta.unwrap_or_default();
        for (p, bytes) in &saved.pages {
            self.blocks.load_page(*p, bytes)?;
        }
        for &c in &saved.bad {
            self.blocks.lines_mut().mark_bad(c);
        }
        self.pad_open_chunks().await?;
        let table = self.flash.chunk_table().await?;
        let lay = self.lay.clone();
        let mut readable = vec![0u32; lay.chunks as usize];
        let mut written = Vec::new();
        for (c, d) in table.iter().enumerate() {
            let w = wear_from_wli(self, d.wli).max(meta.wear.get(c).copied().unwrap_or(0));
            self.blocks.lines_mut().set_wear(c as u32, w);
            match d.state {
                ChunkState::Offline => self.blocks.lines_mut().mark_bad(c as u32),
                ChunkState::Open | ChunkState::Closed => {
                    tracing::trace!(chunk = c, state = ?d.state, wp = d.written(), "written chunk");
                    readable[c] = lay.readable_slots(d.written() as u32, d.state == ChunkState::Open);
                    written.push(c as u32);
                }
                ChunkState::Free => {}
            }
        }
        // Line generation of every written chunk.
        let mut gen_of: BTreeMap<u32, u32> = BTreeMap::new();
        let firsts: Vec<u32> = written.iter().copied().filter(|&c| readable[c as usize] > 0).collect();
        let heads = self.read_oobs(&firsts.iter().map(|&c| lay.slot(c, 0)).collect::<Vec<_>>()).await?;
        let mut unknown = Vec::new();
        for (&c, o) in firsts.iter().zip(&heads) {
            tracing::trace!(chunk = c, oob = ?o, "first block");
            match o {
                Some(o) if o.gen != RECOVERY_GEN => {
                    gen_of.insert(c, o.gen);
                }
                _ => unknown.push(c),
            }
        }
        for c in unknown {
            let slots: Vec<u32> = (0..readable[c as usize]).map(|k| lay.slot(c, k)).collect();
            let oobs = self.read_oobs(&slots).await?;
            if let Some(o) = oobs.iter().flatten().find(|o| o.gen != RECOVERY_GEN) {
                gen_of.insert(c, o.gen);
            }
        }
        let scanned = |g: u32| g >= meta.next_gen || meta.open_gens.contains(&g);
        // Checkpoint entries stand only on chunks nobody reset or rewrote since.
        let mut max_seq = meta.next_seq.saturating_sub(1);
        for lba in 0..self.user_lbas() {
            let e = self.blocks.mapping().get(lba);
            if !e.is_mapped() {
                continue;
            }
            let c = lay.chunk_of(e.slot);
            let keep = (c as usize) < table.len()
                && gen_of.get(&c).is_some_and(|&g| !scanned(g))
                && lay.offset_of(e.slot) < readable[c as usize];
            tracing::trace!(lba, slot = e.slot, chunk = c, keep, gen = ?gen_of.get(&c), "checkpoint entry");
            if !keep {
                if table.get(c as usize).is_some_and(|d| d.state == ChunkState::Offline) {
                    self.blocks.restore_lost(lba, true);
                }
                self.blocks.restore(lba, Entry { slot: NO_SLOT, seq: e.seq });
            }
        }
        // Blocks written since the checkpoint.
        let scan: Vec<u32> = gen_of.iter().filter(|(_, &g)| scanned(g)).map(|(&c, _)| c).collect();
        let mut scanned_blocks = 0u64;
        for c in scan {
            let g = gen_of[&c];
            let slots: Vec<u32> = (0..readable[c as usize]).map(|k| lay.slot(c, k)).collect();
            Metrics::add(&self.metrics.recovery_scanned, slots.len() as u64);
            let oobs = self.read_oobs(&slots).await?;
            for (&slot, o) in slots.iter().zip(oobs) {
                let Some(o) = o else { continue };
                if o.gen != g || o.lba == PAD_LBA || o.lba >= self.user_lbas() {
                    continue;
                }
                scanned_blocks += 1;
                tracing::trace!(lba = o.lba, slot, seq = o.seq, gen = g, "scanned");
                max_seq = max_seq.max(o.seq);
                let cur = self.blocks.mapping().get(o.lba);
                if o.seq > cur.seq || (o.seq == cur.seq && !cur.is_mapped()) {
                    self.blocks.restore(o.lba, Entry { slot, seq: o.seq });
                    self.blocks.restore_lost(o.lba, false);
                }
            }
        }
        self.trims.stored(saved.trims.iter().map(|t| t.seq));
        max_seq = saved.trims.iter().map(|t| t.seq).fold(max_seq, u64::max);
        for (range, seq) in newest_trims(saved.trims, self.user_lbas()) {
            for lba in range {
                if self.blocks.mapping().get(lba).seq < seq {
                    self.blocks.restore(lba, Entry { slot: NO_SLOT, seq });
                    self.blocks.restore_lost(lba, false);
                }
            }
        }
        // Lines, valid blocks, free chunks.
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&c, &g) in &gen_of {
            groups.entry(g).or_default().push(c);
        }
        for (g, members) in groups {
            let open = members.iter().any(|&c| table[c as usize].state == ChunkState::Open);
            self.blocks.lines_mut().add_recovered(g, members, open, &readable, meta.next_seq);
        }
        self.blocks.recount();
        // Written chunks of no line (only recovery padding, or unreadable): reset them.
        let orphans: Vec<u32> = written.iter().copied().filter(|c| !gen_of.contains_key(c)).collect();
        let st = self.flash.reset(&orphans).await?;
        for (&c, s) in orphans.iter().zip(st) {
            if s.is_success() {
                self.blocks.lines_mut().reset_done(c);
            } else {
                self.blocks.lines_mut().mark_bad(c);
            }
        }
        self.blocks.lines_mut().recount();
        // Every input was checked (records at decode, OOB by `ours`): no overflow is left.
        self.blocks.restore_next_seq(meta.next_seq.max(max_seq.saturating_add(1)));
        let max_gen = gen_of.values().copied().max().unwrap_or(0);
        self.blocks.lines_mut().restore_next_gen(meta.next_gen.max(max_gen.saturating_add(1)));
        Metrics::set(&self.metrics.lost_blocks, self.blocks.mapping().lost_count() as u64);
        tracing::info!(
            lines = self.blocks.lines().len(),
            scanned_blocks,
            reopened = self.blocks.lines().urgent_len(),
            free = self.free_chunks(),
            "guest FTL recovered"
        );
        Ok(())
    }

    /// Writes `mw_cunits` sectors of padding at the end of every open chunk so that the blocks
    /// still in the device's cache window can be read.
    async fn pad_open_chunks(&mut self) -> Result<()> {
        let table = self.flash.chunk_table().await?;
        let geo = self.lay.geo.clone();
        let want = geo.mw_cunits.next_multiple_of(geo.ws_min);
        let mut todo: Vec<(u32, u32, u32)> = Vec::new();
        for (c, d) in table.iter().enumerate() {
            if d.state == ChunkState::Open && want > 0 {
                let wp = d.written() as u32;
                // The host keeps wp <= clba; a table that said otherwise pads nothing.
                let n = want.min(geo.clba.saturating_sub(wp));
                if n > 0 {
                    todo.push((c as u32, wp, n));
                }
            }
        }
        let per = 64 / geo.ws_min * geo.ws_min;
        let os = geo.oob_size as usize;
        let mut wave = 0;
        loop {
            let mut cmds = Vec::new();
            for &(c, wp, n) in &todo {
                let start = wave * per;
                if start < n {
                    let k = (n - start).min(per);
                    let addrs: Vec<u64> = (wp + start..wp + start + k).map(|b| self.lay.sector_ppa(c, b)).collect();
                    let mut oob = vec![0u8; k as usize * os];
                    for s in 0..k as usize {
                        Oob { lba: PAD_LBA, gen: RECOVERY_GEN, seq: 0 }.encode(&mut oob[s * os..s * os + OOB_BYTES]);
                    }
                    cmds.push(Cmd::write(addrs, vec![0u8; k as usize * geo.block_size as usize], oob));
                }
            }
            if cmds.is_empty() {
                break;
            }
            for d in self.flash.run(cmds).await? {
                if d.cqe.status == Status::INTERNAL_ERROR {
                    return Err(FtlError::Device { opcode: host_ftl::opcode::VECTOR_WRITE, status: d.cqe.status });
                }
            }
            wave += 1;
        }
        Ok(())
    }

    /// The OOB of each slot (None where the device returned no data).
    async fn read_oobs(&mut self, slots: &[u32]) -> Result<Vec<Option<Oob>>> {
        let per = self.lay.max_cmd_slots as usize;
        let spl = self.lay.spl as usize;
        let os = self.lay.geo.oob_size as usize;
        let cmds: Vec<Cmd> = slots
            .chunks(per)
            .map(|g| {
                Cmd::read(
                    g.iter().flat_map(|&s| self.lay.ppas(self.lay.chunk_of(s), self.lay.offset_of(s), 1)).collect(),
                )
            })
            .collect();
        let done = self.flash.run(cmds).await?;
        let mut out = Vec::with_capacity(slots.len());
        for (g, d) in slots.chunks(per).zip(&done) {
            if d.cqe.status == Status::INTERNAL_ERROR {
                return Err(FtlError::Device { opcode: host_ftl::opcode::VECTOR_READ, status: d.cqe.status });
            }
            for k in 0..g.len() {
                let ok = !d.failed(k * spl) || d.cqe.status.data_valid();
                out.push(if ok { Oob::decode(&d.oob[k * spl * os..]).filter(ours) } else { None });
            }
        }
        Ok(out)
    }
}

/// The blocks the trims cover, below `user_lbas`, as disjoint ranges, each with the newest
/// trim's sequence number: a block is unmapped by the newest trim of it, so applying these
/// visits each block once, however many trims overlap (rather than once per trim).
fn newest_trims(mut trims: Vec<Trim>, user_lbas: u32) -> Vec<(Range<u32>, u64)> {
    trims.sort_unstable_by_key(|t| Reverse(t.seq));
    // Ranges already given to a newer trim: start -> end, disjoint and not touching.
    let mut covered: BTreeMap<u32, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for t in trims {
        let (start, end) = (t.start.min(user_lbas), t.start.saturating_add(t.count).min(user_lbas));
        if start >= end {
            continue;
        }
        // The covered ranges this one overlaps or touches, in order.
        let mut touching: Vec<(u32, u32)> =
            covered.range(..=end).rev().take_while(|(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        touching.reverse();
        let mut at = start;
        for &(s, e) in &touching {
            if s > at {
                out.push((at..s, t.seq));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at..end, t.seq));
        }
        let merged_start = touching.first().map_or(start, |&(s, _)| s.min(start));
        let merged_end = touching.last().map_or(end, |&(_, e)| e.max(end));
        for (s, _) in touching {
            covered.remove(&s);
        }
        covered.insert(merged_start, merged_end);
    }
    out
}

/// Whether OOB bytes can be the FTL's: its sequence numbers and generations stay in bounds (see
/// [`MAX_SEQ`], [`MAX_GEN`]), so anything else on flash is foreign and read as never written.
fn ours(o: &Oob) -> bool {
    o.gen == RECOVERY_GEN || (o.gen <= MAX_GEN && o.seq <= MAX_SEQ)
}

fn wear_from_wli(eng: &Engine, wli: u8) -> u32 {
    (u64::from(wli) * u64::from(eng.lay.geo.endurance) / 255) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Each block is in at most one range, with the newest sequence number of the trims
        /// covering it, and blocks past the disk are in none.
        #[test]
        fn newest_trims_give_each_block_its_newest_trim_once(
            raw in proptest::collection::vec((0u32..80, 0u32..40), 0..40),
            user_lbas in 1u32..70,
        ) {
            let trims: Vec<Trim> =
                raw.iter().enumerate().map(|(i, &(start, count))| Trim { seq: 1000 - i as u64 * 7 % 500, start, count }).collect();
            let mut seqs: Vec<u64> = trims.iter().map(|t| t.seq).collect();
            seqs.sort_unstable();
            seqs.dedup();
            prop_assume!(seqs.len() == trims.len());
            let mut naive = vec![None; user_lbas as usize];
            for t in &trims {
                for lba in t.start..t.start.saturating_add(t.count).min(user_lbas) {
                    let cur: &mut Option<u64> = &mut naive[lba as usize];
                    *cur = Some(cur.map_or(t.seq, |s| s.max(t.seq)));
                }
            }
            let mut got = vec![None; user_lbas as usize];
            for (range, seq) in newest_trims(trims, user_lbas) {
                for lba in range {
                    prop_assert!(got[lba as usize].is_none(), "block {} twice", lba);
                    got[lba as usize] = Some(seq);
                }
            }
            prop_assert_eq!(got, naive);
        }
    }

    #[test]
    fn a_thousand_whole_disk_trims_visit_each_block_once() {
        let trims: Vec<Trim> = (1..=1000).map(|seq| Trim { seq, start: 0, count: u32::MAX }).collect();
        let ranges = newest_trims(trims, 1 << 20);
        assert_eq!(ranges, vec![(0..1 << 20, 1000)]);
    }
}
