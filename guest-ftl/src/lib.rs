//! One flash translation layer per VM.
//!
//! A guest FTL turns the VM's partition of an open-channel SSD (whole parallel units, seen
//! through a [`FlashChannel`] with guest-relative addresses) into a [`vdisk::BlockDevice`]:
//! 4 KiB logical blocks mapped to physical slots, writes striped over the PUs in `ws_opt` units,
//! a write buffer for what the device cannot return yet, garbage collection with hot/cold
//! separation and a rate limiter, trim, wear levelling, retirement of failing chunks, and crash
//! recovery from the blocks' out-of-band bytes and map checkpoints in the state store.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use guest_ftl::{DirectChannel, Ftl, FtlConfig};
//! use host_ftl::{Device, Geometry};
//!
//! let geo = Geometry::default();
//! let ch = DirectChannel::new(Device::in_memory(geo.clone())?, DirectChannel::default_region_bytes(&geo));
//! let store = state_store::Store::open("/tmp/state")?;
//! let ftl = Ftl::open(Arc::new(ch), store, "disk-1", FtlConfig::default()).await?;
//! # Ok(()) }
//! ```
//!
//! # Modules
//!
//! From the bottom up (each uses only modules of its own row or the rows above):
//!
//! | module | idea |
//! |---|---|
//! | [`error`], [`config`], [`metrics`], [`layout`] | errors, settings, counters; slots, units and OOB on the geometry |
//! | [`region`], [`channel`], [`io`] | the DMA region's division; the boundary to the host driver; running command batches |
//! | [`map`], [`checkpoint`], `trims`, `notices` | the L2P map and its pages; what is stored where; trims on their way to a checkpoint; when notifications are read |
//! | `heat`, `streams` | how fast blocks die; which stream (open line) a block goes to |
//! | `blocks` | the mapping both ways, the lines and the write buffer, kept in step (`Blocks`) |
//! | `flash` | the channel, layout and erase gate as the engine uses them |
//! | `engine` | what the FTL does with its state: write and read paths, GC and its rate limiter, durability, format and recovery |
//! | [`ftl`] | the `BlockDevice` |
//! | [`sim`] | power-loss media for tests |
//!
//! # Durability and crash recovery
//!
//! The promise kept is `BlockDevice`'s: a write completed with FUA, and every write completed
//! before a completed flush, read back after a crash with their data; nothing else changes.
//!
//! **What is written where.**
//! * Each 4 KiB slot carries in its OOB the logical block it holds, the *generation* of its
//!   line (a counter bumped at every line opening) and the data's *sequence number* (a counter
//!   bumped at every user write and trim). Relocation keeps the sequence number, so of all
//!   copies of a logical block the one with the highest sequence number is the newest, wherever
//!   it lies; padding slots say so.
//! * A trim is recorded in the store (`ftl/trim/<seq>`) at the next flush (or at once for
//!   write-zeroes with FUA).
//! * A checkpoint (every `checkpoint_lines` line openings, at shutdown and after recovery)
//!   first writes out every buffered block (padding units to `ws_min`) and flushes the device;
//!   only then it commits, in one synced batch, the map pages changed since the last checkpoint
//!   (slot and sequence number per logical block), the next sequence number and generation, the
//!   generations of lines still open, and chunk wear; the batch deletes the trim records it
//!   covers. So every map entry a checkpoint holds points at data that is durable.
//! * A chunk is retired by a store record (`ftl/bad/<chunk>`) before anything relies on it.
//!
//! **In which order.**
//! * Flush: write every buffered block (padded), relocate lines whose writes failed, device
//!   flush (opcode 0x00), then commit pending trim records. FUA write: the same for the user
//!   stream (the device flush makes the blocks durable, as on a real device FUA covers only its
//!   own command).
//! * Garbage collection: the current version of every logical block the victim ever held (the
//!   copies of its valid blocks, and the newer versions of the blocks overwritten in it) is
//!   written and the device flushed *before* the victim's chunks are reset (the victim waits,
//!   drained, until then). So at every moment each logical block's newest durable version is
//!   still on flash where recovery finds it, even when a newer version is not durable yet.
//! * A write that fails on the media (0xF0 write fail, 0xF1 early close, 0xC0 offline) retires
//!   the chunk (store record first), stops its line, and relocates everything the line holds,
//!   from the write buffer where the device has nothing; a flush or FUA write completes only
//!   after that relocation is durable. A write the device did not execute (internal error, a
//!   dead queue) is simply tried again later, and the request fails.
//!
//! **Why every acknowledged write is found.** Recovery (the engine's `recovery` module) starts from the last
//! checkpoint, whose entries point at durable data. Everything written after it went to a line
//! opened after it (generation ≥ the checkpoint's) or to a line open at it: recovery reads the
//! chunk table, reads the generation from the first block of every written chunk, and reads the
//! OOB of every block of exactly those lines (their open chunks padded first by `mw_cunits`, so
//! that the device's cache window can be read). A durable write is in one of them with its
//! sequence number, higher than any older copy's, so it wins; a durable trim's record unmaps
//! every older version. A checkpoint entry whose chunk has been reset (free) or rewritten
//! (scanned) since is dropped: before that reset, the block's current version (a relocated copy
//! with the same sequence number, or a newer write) was made durable, and as it was written
//! after the checkpoint it lies in a line the scan reads. Non-durable writes may or may not come
//! back, each logical block as one of its versions written since its last durable one. The crash
//! property test (`tests/crash_model.rs`) checks exactly this on power-loss media.
//!
//! **Bounded recovery.** The scan covers the lines opened since the last checkpoint plus those
//! open at it: about `checkpoint_lines + 4` lines, whatever the partition's size. Everything
//! else recovery does is per chunk (the chunk table, one block per written chunk) or per map
//! page. Lines left open by the crash are relocated and reset, never written again.
//!
//! # Concurrency
//!
//! The engine (map, write buffer, lines, GC) is behind one async lock. A read holds it only to
//! look its blocks up: the flash reads run after the lock is let go, in a slot of the DMA
//! region's read area ([`io::ReadArea`]), so the reads of many requests are in flight at once,
//! beside the engine's commands; an *erase gate* (held shared by those reads, exclusively by chunk
//! resets) keeps a chunk from being reset under a read of it. Writes, trims and flushes hold the
//! lock throughout; within one, commands to different PUs are submitted together (a stripe, a
//! GC batch, a set of resets) and overlap on the device. So a read waits for the engine only
//! while a write or garbage collection holds it, not for other reads.
//!
//! # Limits
//!
//! * No parity across PUs: the data of a *closed* chunk that goes offline is lost (reads of
//!   those blocks fail with an I/O error until they are rewritten; they are never returned
//!   wrong). Blocks still in the write buffer, chunks going offline while free or on a reset
//!   (worn out), and failed programs lose nothing.
//! * A storm of program failures (every chunk of a PU failing in turn) chains relocations,
//!   each into a new line, and can run out of free lines: the request then fails with
//!   [`FtlError::NoSpace`] rather than hanging.
//! * Metadata is in memory: 12 bytes of map per 4 KiB block, 4 bytes of reverse map and a bit
//!   per physical slot.

mod blocks;
pub mod channel;
pub mod checkpoint;
pub mod config;
mod engine;
pub mod error;
mod flash;
pub mod ftl;
mod heat;
pub mod io;
pub mod layout;
pub mod map;
pub mod metrics;
mod notices;
pub mod region;
pub mod sim;
mod streams;
mod trims;

pub use channel::{CmdFuture, DirectChannel, FlashChannel};
pub use config::{FtlConfig, VictimPolicy};
pub use error::{FtlError, Result};
pub use ftl::{Ftl, Space};
pub use metrics::{Metrics, MetricsSnapshot};
pub use sim::PowerLossMedia;
