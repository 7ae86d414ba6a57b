//! The write buffer: accepted data kept from the moment it is given a slot until the device can
//! return it.
//!
//! A slot is written once its stripe is full, a unit on every member, submitted together so the
//! PUs program in parallel (or when a flush or FUA write pads the open unit to `ws_min`), and
//! the device cannot read the last `mw_cunits` sectors of an open chunk, so those stay here too.
//! Reads look here first. The map points at the slot from the start, so a read never sees a gap.
//! Slots enter and leave through [`super::Blocks`], with the slot's mapping and its chunk's
//! write pointer.

use std::collections::HashMap;
use std::ops::Range;

/// A slot's data held until the device can return it.
struct Cached {
    data: Box<[u8]>,
    lba: u32,
    seq: u64,
}

/// Slot → the data (and the OOB's logical block and version) the device cannot return yet.
#[derive(Default)]
pub struct WriteBuffer {
    slots: HashMap<u32, Cached>,
}

impl WriteBuffer {
    /// The data held for `slot`.
    pub fn data(&self, slot: u32) -> Option<&[u8]> {
        self.slots.get(&slot).map(|c| &*c.data)
    }

    /// The data, logical block and version held for `slot`, to write it.
    pub fn get(&self, slot: u32) -> Option<(&[u8], u32, u64)> {
        self.slots.get(&slot).map(|c| (&*c.data, c.lba, c.seq))
    }

    pub(super) fn insert(&mut self, slot: u32, data: Box<[u8]>, lba: u32, seq: u64) {
        self.slots.insert(slot, Cached { data, lba, seq });
    }

    /// Drops the slots the device can return now.
    pub(super) fn release(&mut self, slots: Range<u32>) {
        for slot in slots {
            self.slots.remove(&slot);
        }
    }
}
