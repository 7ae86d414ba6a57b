//! The logical-to-physical map: for each 4 KiB logical block, the slot holding its newest data
//! (or [`NO_SLOT`]) and the sequence number of that version (or of the trim that unmapped it).
//!
//! Lookup is an array index. The map is saved in pages of [`PAGE_ENTRIES`] entries; pages changed
//! since the last checkpoint are marked dirty so that a checkpoint writes only those.

use crate::error::{FtlError, Result};
use crate::layout::NO_SLOT;

/// Entries per saved page.
pub const PAGE_ENTRIES: usize = 1024;
const ENTRY_BYTES: usize = 12;

/// One entry: where a logical block lives and which version it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub seq: u64,
}

impl Entry {
    pub const UNMAPPED: Entry = Entry { slot: NO_SLOT, seq: 0 };

    pub fn is_mapped(&self) -> bool {
        self.slot != NO_SLOT
    }
}

/// The map of one disk.
pub struct Map {
    slots: Vec<u32>,
    seqs: Vec<u64>,
    dirty: Vec<bool>,
}

impl Map {
    pub fn new(lbas: u32) -> Map {
        let n = lbas as usize;
        Map { slots: vec![NO_SLOT; n], seqs: vec![0; n], dirty: vec![false; n.div_ceil(PAGE_ENTRIES)] }
    }

    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, lba: u32) -> Entry {
        match (self.slots.get(lba as usize), self.seqs.get(lba as usize)) {
            (Some(&slot), Some(&seq)) => Entry { slot, seq },
            _ => Entry::UNMAPPED,
        }
    }

    /// Sets an entry and returns the old one.
    pub fn set(&mut self, lba: u32, e: Entry) -> Entry {
        let i = lba as usize;
        if i >= self.slots.len() {
            return Entry::UNMAPPED;
        }
        let old = Entry { slot: self.slots[i], seq: self.seqs[i] };
        self.slots[i] = e.slot;
        self.seqs[i] = e.seq;
        self.dirty[i / PAGE_ENTRIES] = true;
        old
    }

    pub fn pages(&self) -> usize {
        self.dirty.len()
    }

    /// Pages changed since [`Map::clear_dirty`].
    pub fn dirty_pages(&self) -> Vec<usize> {
        self.dirty.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| i).collect()
    }

    pub fn mark_all_dirty(&mut self) {
        self.dirty.fill(true);
    }

    pub fn clear_dirty(&mut self, pages: &[usize]) {
        for &p in pages {
            if let Some(d) = self.dirty.get_mut(p) {
                *d = false;
            }
        }
    }

    /// Encodes page `p`: 12 bytes per entry (slot u32, seq u64, little endian).
    pub fn encode_page(&self, p: usize) -> Vec<u8> {
        let start = (p * PAGE_ENTRIES).min(self.slots.len());
        let end = (start + PAGE_ENTRIES).min(self.slots.len());
        let mut out = Vec::with_capacity((end - start) * ENTRY_BYTES);
        for i in start..end {
            out.extend_from_slice(&self.slots[i].to_le_bytes());
            out.extend_from_slice(&self.seqs[i].to_le_bytes());
        }
        out
    }

    /// Loads page `p` from [`Map::encode_page`] bytes.
    pub fn decode_page(&mut self, p: usize, bytes: &[u8]) -> Result<()> {
        let start = p * PAGE_ENTRIES;
        let want = PAGE_ENTRIES.min(self.slots.len().saturating_sub(start));
        if start >= self.slots.len() || bytes.len() != want * ENTRY_BYTES {
            return Err(FtlError::Metadata(format!("map page {p} has {} bytes", bytes.len())));
        }
        for (k, e) in bytes.chunks_exact(ENTRY_BYTES).enumerate() {
            let mut s = [0u8; 4];
            s.copy_from_slice(&e[0..4]);
            let mut q = [0u8; 8];
            q.copy_from_slice(&e[4..12]);
            self.slots[start + k] = u32::from_le_bytes(s);
            self.seqs[start + k] = u64::from_le_bytes(q);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_dirty_pages() {
        let mut m = Map::new(3000);
        assert_eq!(m.pages(), 3);
        assert_eq!(m.get(5), Entry::UNMAPPED);
        assert_eq!(m.set(2500, Entry { slot: 9, seq: 4 }), Entry::UNMAPPED);
        assert_eq!(m.get(2500), Entry { slot: 9, seq: 4 });
        assert_eq!(m.get(99_999), Entry::UNMAPPED, "out of range reads as unmapped");
        assert_eq!(m.dirty_pages(), vec![2]);
        let bytes = m.encode_page(2);
        assert_eq!(bytes.len(), (3000 - 2048) * 12);
        let mut n = Map::new(3000);
        n.decode_page(2, &bytes).unwrap();
        assert_eq!(n.get(2500), Entry { slot: 9, seq: 4 });
        assert!(n.decode_page(2, &bytes[1..]).is_err());
        assert!(n.decode_page(3, &bytes).is_err());
        m.clear_dirty(&[2]);
        assert!(m.dirty_pages().is_empty());
    }
}
