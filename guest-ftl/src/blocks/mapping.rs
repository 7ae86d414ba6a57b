//! The mapping both ways: each logical block's current slot and version ([`Map`]), and each
//! slot's logical block (`p2l`) and whether it is the current version (a valid bit).
//!
//! [`Mapping`] keeps the two directions in step: a logical block mapped to a slot has that
//! slot's valid bit set and is what `p2l` says the slot holds, and every valid slot is some
//! block's current one. The line counts of valid slots move with the bits (see
//! [`Mapping::remap`]). It also gives out sequence numbers (the versions) and knows which
//! logical blocks were lost with an offline chunk, until they are written again.

use std::collections::HashSet;

use super::lines::Lines;
use crate::error::{FtlError, Result};
use crate::layout::{Layout, MAX_SEQ, PAD_LBA};
use crate::map::{Entry, Map};

/// The L2P map, the reverse map, the valid bits, the lost blocks and the sequence counter.
pub struct Mapping {
    map: Map,
    /// Per slot, the logical block written to it since it was handed out ([`PAD_LBA`] for
    /// padding); still there after the block moved on, so that GC can find its newer version.
    p2l: Vec<u32>,
    /// Per slot, whether it holds its logical block's current version.
    valid: Vec<u64>,
    /// Logical blocks whose data was lost with an offline chunk: reads fail until rewritten.
    lost: HashSet<u32>,
    next_seq: u64,
}

impl Mapping {
    /// Nothing mapped: `user_lbas` logical blocks over the slots of `lay`.
    pub fn new(lay: &Layout, user_lbas: u32) -> Mapping {
        let total = lay.total_slots() as usize;
        Mapping {
            map: Map::new(user_lbas),
            p2l: vec![PAD_LBA; total],
            valid: vec![0; total.div_ceil(64)],
            lost: HashSet::new(),
            next_seq: 1,
        }
    }

    pub fn user_lbas(&self) -> u32 {
        self.map.len()
    }

    pub fn get(&self, lba: u32) -> Entry {
        self.map.get(lba)
    }

    /// Whether the slot holds its logical block's current version.
    pub fn is_valid(&self, slot: u32) -> bool {
        self.valid.get(slot as usize / 64).is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// The logical block last written to `slot` ([`PAD_LBA`] for padding).
    pub fn lba_at(&self, slot: u32) -> u32 {
        self.p2l[slot as usize]
    }

    /// Whether reads of `lba` fail because its data was lost.
    pub fn is_lost(&self, lba: u32) -> bool {
        self.lost.contains(&lba)
    }

    pub fn lost_count(&self) -> usize {
        self.lost.len()
    }

    /// The next sequence number, not taken yet: "now" for lifetimes and line heat.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next sequence number; none past [`MAX_SEQ`].
    pub fn take_seq(&mut self) -> Result<u64> {
        let s = self.next_seq;
        if s > MAX_SEQ {
            return Err(FtlError::Exhausted("sequence numbers"));
        }
        self.next_seq = s + 1;
        Ok(s)
    }

    /// Sequence numbers from now on are at least `seq`.
    pub fn restore_next_seq(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// Map pages changed since the last checkpoint.
    pub fn dirty_pages(&self) -> Vec<usize> {
        self.map.dirty_pages()
    }

    pub fn encode_page(&self, p: usize) -> Vec<u8> {
        self.map.encode_page(p)
    }

    /// The pages are in a checkpoint now.
    pub fn clear_dirty(&mut self, pages: &[usize]) {
        self.map.clear_dirty(pages);
    }

    // ---- changes, through `Blocks` ----

    /// Points `lba` at `new`, invalidating the slot it had; the lines' valid counts and heat
    /// follow.
    pub(super) fn remap(&mut self, lines: &mut Lines, lba: u32, new: Entry) {
        let old = self.map.set(lba, new);
        tracing::trace!(lba, ?old, ?new, "remap");
        if old.is_mapped() {
            // A new version or a trim ends the old one's life; relocation keeps the sequence.
            if new.seq != old.seq && self.is_valid(old.slot) {
                lines.count_death(old.slot, self.next_seq);
            }
            self.clear_valid(lines, old.slot);
        }
        if new.is_mapped() {
            self.set_valid(lines, new.slot, lba);
        }
        self.lost.remove(&lba);
    }

    fn set_valid(&mut self, lines: &mut Lines, slot: u32, lba: u32) {
        let Some(w) = self.valid.get_mut(slot as usize / 64) else { return };
        if *w & (1 << (slot % 64)) == 0 {
            *w |= 1 << (slot % 64);
            lines.count_valid(slot, self.next_seq);
        }
        self.p2l[slot as usize] = lba;
    }

    /// The slot holds nothing current any more (its line is being reset).
    pub(super) fn clear_valid(&mut self, lines: &mut Lines, slot: u32) {
        let Some(w) = self.valid.get_mut(slot as usize / 64) else { return };
        if *w & (1 << (slot % 64)) != 0 {
            *w &= !(1 << (slot % 64));
            lines.count_invalid(slot, self.next_seq);
        }
    }

    /// The slot was handed out as padding.
    pub(super) fn set_pad(&mut self, slot: u32) {
        self.p2l[slot as usize] = PAD_LBA;
    }

    /// Reads of `lba` fail until it is written again.
    pub(super) fn set_lost(&mut self, lba: u32) {
        self.lost.insert(lba);
    }

    // ---- recovery, before any slot is valid ----

    /// Loads a map page of the checkpoint.
    pub(super) fn decode_page(&mut self, p: usize, bytes: &[u8]) -> Result<()> {
        self.map.decode_page(p, bytes)
    }

    /// Sets an entry as recovery found it; [`Mapping::recount`] sets the valid bits after.
    pub(super) fn restore(&mut self, lba: u32, e: Entry) {
        self.map.set(lba, e);
    }

    /// Recovery found `lba` lost, or found it again.
    pub(super) fn restore_lost(&mut self, lba: u32, lost: bool) {
        if lost {
            self.lost.insert(lba);
        } else {
            self.lost.remove(&lba);
        }
    }

    /// Sets the valid bit (and the line's count) of every mapped block's slot, once recovery
    /// has rebuilt the map and the lines.
    pub(super) fn recount(&mut self, lines: &mut Lines) {
        for lba in 0..self.user_lbas() {
            let e = self.map.get(lba);
            if e.is_mapped() {
                // Re-setting the entry marks the slot valid in its line.
                self.map.set(lba, Entry::UNMAPPED);
                self.remap(lines, lba, e);
                debug_assert_eq!(self.map.get(lba).slot, e.slot);
            }
        }
    }
}
