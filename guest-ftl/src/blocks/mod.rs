//! Where every block is: the mapping both ways, the lines the slots belong to, and the write
//! buffer holding what the device cannot return yet.
//!
//! [`Blocks`] is the only way to change them, and each of its changes keeps them in step:
//! * a logical block mapped to a slot has the slot's valid bit set and is what the reverse map
//!   says the slot holds; every valid slot is some block's current one;
//! * a line's valid count is the number of valid slots on its chunks, and its heat sees every
//!   change of it;
//! * a slot handed out is recorded at once, as data (its mapping and buffered bytes) or as
//!   padding;
//! * a slot is in the write buffer from the moment it is handed out until its chunk is written
//!   far enough for the device to return it, or its line is reset.
//!
//! Each part checks its own rules ([`Mapping`], [`Lines`], [`WriteBuffer`]); what ties them
//! together is reachable from here only.

mod buffer;
mod lines;
mod mapping;

use std::sync::Arc;

pub use buffer::WriteBuffer;
#[cfg(test)]
pub(crate) use lines::tests as line_tests;
#[cfg(test)]
pub(crate) use lines::Line;
pub use lines::{LineState, Lines, Victim};
pub use mapping::Mapping;

use crate::config::FtlConfig;
use crate::error::Result;
use crate::layout::{Layout, NO_SLOT};
use crate::map::Entry;
use crate::metrics::Metrics;

/// How the partition's space is used (see `Ftl::space`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    pub free_chunks: u32,
    pub open_lines: u32,
    pub full_lines: u32,
    pub closed_lines: u32,
    pub aborted_lines: u32,
    /// Cleaned lines waiting for their reset.
    pub drained_lines: u32,
    /// Slots in all lines.
    pub line_slots: u64,
    /// Valid slots in all lines.
    pub valid_slots: u64,
    /// Mapped logical blocks.
    pub mapped: u64,
}

/// The mapping, the lines and the write buffer of one FTL.
pub struct Blocks {
    mapping: Mapping,
    lines: Lines,
    buffer: WriteBuffer,
}

impl Blocks {
    /// Nothing mapped, no lines, an empty buffer.
    pub fn new(lay: &Layout, cfg: &FtlConfig, user_lbas: u32, metrics: Arc<Metrics>) -> Blocks {
        Blocks {
            mapping: Mapping::new(lay, user_lbas),
            lines: Lines::new(lay.clone(), cfg, metrics),
            buffer: WriteBuffer::default(),
        }
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    pub fn lines(&self) -> &Lines {
        &self.lines
    }

    /// The lines, for what changes no valid count or slot (state, queue, victim, chunks).
    pub fn lines_mut(&mut self) -> &mut Lines {
        &mut self.lines
    }

    pub fn buffer(&self) -> &WriteBuffer {
        &self.buffer
    }

    /// The next sequence number (see [`Mapping::take_seq`]).
    pub fn take_seq(&mut self) -> Result<u64> {
        self.mapping.take_seq()
    }

    /// Stores `data` as the newest version `seq` of `lba` in `stream`'s line: a slot is handed
    /// out, the data buffered, and the block mapped to it.
    pub fn append(&mut self, stream: usize, lba: u32, seq: u64, data: Box<[u8]>) -> Result<()> {
        let slot = self.lines.take_slot(stream, self.mapping.next_seq())?;
        self.buffer.insert(slot, data, lba, seq);
        self.mapping.remap(&mut self.lines, lba, Entry { slot, seq });
        Ok(())
    }

    /// Pads the open line of `stream` to a `ws_min` boundary so that all it holds can be written.
    pub fn pad(&mut self, stream: usize) {
        let mapping = &mut self.mapping;
        self.lines.pad(stream, |slot| mapping.set_pad(slot));
    }

    /// Unmaps `lba` as of `seq` (a trim).
    pub fn unmap(&mut self, lba: u32, seq: u64) {
        self.mapping.remap(&mut self.lines, lba, Entry { slot: NO_SLOT, seq });
    }

    /// `lba` could not be read back (its chunk is offline): it is unmapped as of its version
    /// `seq`, and reads of it fail until it is written again.
    pub fn lose(&mut self, lba: u32, seq: u64) {
        self.unmap(lba, seq);
        self.mapping.set_lost(lba);
    }

    /// Records that `chunk` is written up to slot `wp` and drops what the device can now return.
    pub fn written(&mut self, chunk: u32, wp: u32) {
        let readable = self.lines.written(chunk, wp);
        self.buffer.release(readable);
    }

    /// Line `gen` was reset on the device: its slots hold nothing, and its chunks are free.
    pub fn reset_line(&mut self, gen: u32) -> bool {
        let Some(line) = self.lines.remove(gen) else { return false };
        let spc = self.lines.lay().spc;
        for &c in line.members() {
            self.buffer.release(c * spc..(c + 1) * spc);
            for slot in c * spc..(c + 1) * spc {
                self.mapping.clear_valid(&mut self.lines, slot);
            }
        }
        true
    }

    // ---- recovery ----

    /// Loads a map page of the checkpoint.
    pub fn load_page(&mut self, p: usize, bytes: &[u8]) -> Result<()> {
        self.mapping.decode_page(p, bytes)
    }

    /// Sets `lba`'s entry as recovery found it; valid bits and line counts follow in
    /// [`Blocks::recount`].
    pub fn restore(&mut self, lba: u32, e: Entry) {
        self.mapping.restore(lba, e);
    }

    /// Recovery found `lba`'s data lost (its chunk is offline), or found it again.
    pub fn restore_lost(&mut self, lba: u32, lost: bool) {
        self.mapping.restore_lost(lba, lost);
    }

    /// Once the map and the lines are rebuilt: the valid bits and line counts of every mapped
    /// block.
    pub fn recount(&mut self) {
        self.mapping.recount(&mut self.lines);
    }

    /// Sequence numbers from now on are at least `seq`.
    pub fn restore_next_seq(&mut self, seq: u64) {
        self.mapping.restore_next_seq(seq);
    }

    /// The map pages are in a checkpoint now.
    pub fn clear_dirty(&mut self, pages: &[usize]) {
        self.mapping.clear_dirty(pages);
    }
}
