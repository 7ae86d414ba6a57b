//! What the host FTL driver needs of an open-channel SSD, and nothing more.
//!
//! The driver holds its device as an `Arc<dyn OpenChannel>`: [`crate::Device`], the emulator,
//! is one such device; a device behind a real NVMe queue pair could be another. Everything is
//! in the terms of OCSSD 2.0 (`reference/ocssd.md`): 64-byte submission entries, completions
//! with a per-address status bitmap, the geometry structure, and the chunk information (0xCA)
//! and chunk notification (0xD0) log pages.
//!
//! The required methods are the commands themselves. The others have default implementations
//! built on them (log pages read through a scratch DMA region), so a device that can only
//! execute commands goes under the driver as it is; a device may replace them with faster
//! equivalents that give the same answers, as the emulator does.
//!
//! # Promises
//!
//! * A command's outcome is its completion, with the device's status for every address; no
//!   method panics on anything a command or an address holds.
//! * Commands may come from several threads at once; commands on different PUs may run in
//!   parallel, commands on one PU are atomic with respect to each other.
//! * The geometry does not change while the device is open.
//! * A write or copy whose completion said success is durable after a successful
//!   [`OpenChannel::flush`] (or at once when it carried FUA).
//! * No method sleeps for the media: a device that models time says when a command would be
//!   done ([`OpenChannel::execute_vector_at`]), and the driver delivers the completion then.

use std::ops::Range;

use crate::address::Addr;
use crate::chunk::{ChunkDescriptor, CHUNK_DESCRIPTOR_SIZE};
use crate::command::{admin, Cqe, Sqe};
use crate::dma::DmaRegion;
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::notify::{ChunkNotification, NOTIFICATION_CAPACITY, NOTIFICATION_SIZE};
use crate::timing::Costs;

/// An open-channel SSD as the host FTL driver sees it.
pub trait OpenChannel: Send + Sync {
    /// The device's geometry, as its Geometry admin command (0xE2) reports it.
    fn geometry(&self) -> &Geometry;

    /// Executes an I/O command as submitted: flush (0x00), or vector reset, write, read or copy
    /// (0x90-0x93) with their address lists in `mem` (CDW10-11, and CDW14-15 for a copy) and
    /// their data and OOB at PRP1 and MPTR.
    fn execute(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe;

    /// Executes a vector command with address lists the caller supplies: `addrs` (the sources
    /// of a copy) and `dst` (a copy's destinations, same length; empty otherwise). The device
    /// uses exactly these lists, so a host that checked and translated them knows what runs;
    /// the list fields and the count of the entry are ignored. Data and OOB move through `mem`
    /// at PRP1 and MPTR.
    fn execute_vector(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion) -> Cqe;

    /// Executes an admin command: Geometry (0xE2) or Get Log Page (0x02) of log 0xCA or 0xD0,
    /// with the page written into `mem` at PRP1.
    fn execute_admin(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe;

    /// What media operations cost: the driver predicts every command's device time with it, to
    /// share the device fairly and keep its queues short. By default the typical times and
    /// channel bandwidth of the geometry; a device that books its operations on a timing model
    /// gives the costs it books with.
    fn costs(&self) -> Costs {
        Costs::new(self.geometry())
    }

    /// [`OpenChannel::execute_vector`] issued at `now_ns` (the driver's clock); also returns
    /// when the command is done, never before `now_ns`. By default `now_ns`: the device has
    /// done the command when it returns. A device that models time returns when its media
    /// would be done, without waiting for it.
    fn execute_vector_at(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion, now_ns: u64) -> (Cqe, u64) {
        (self.execute_vector(sqe, addrs, dst, mem), now_ns)
    }

    /// Descriptors of the chunks with linear indexes in `range` (clamped to the device), in
    /// order: log page 0xCA.
    fn chunk_info(&self, range: Range<usize>) -> Result<Vec<ChunkDescriptor>> {
        let end = range.end.min(self.geometry().total_chunks());
        if range.start >= end {
            return Ok(Vec::new());
        }
        let offset = (range.start * CHUNK_DESCRIPTOR_SIZE) as u64;
        let page = read_log_page(self, admin::LOG_CHUNK_INFO, offset, (end - range.start) * CHUNK_DESCRIPTOR_SIZE)?;
        page.chunks_exact(CHUNK_DESCRIPTOR_SIZE).map(ChunkDescriptor::from_bytes).collect()
    }

    /// The device's chunk notifications with a count above `after`, oldest first: log page
    /// 0xD0 (see [`crate::notify`]).
    fn notifications(&self, after: u64) -> Result<Vec<ChunkNotification>> {
        let page = read_log_page(self, admin::LOG_CHUNK_NOTIFICATION, 0, NOTIFICATION_CAPACITY * NOTIFICATION_SIZE)?;
        let mut out = Vec::new();
        for entry in page.chunks_exact(NOTIFICATION_SIZE) {
            let n = ChunkNotification::from_bytes(entry)?;
            // Counts start at 1: a zero count is the padding after the last entry.
            if n.nc == 0 {
                break;
            }
            if n.nc > after {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// The count of the newest notification (0 before the first). The driver asks after every
    /// command whether there is anything new, so a device should answer this cheaply.
    fn last_notification(&self) -> Result<u64> {
        Ok(self.notifications(0)?.last().map_or(0, |n| n.nc))
    }

    /// Makes every completed write durable: a flush command.
    fn flush(&self) -> Result<()> {
        let cqe = self.execute(&Sqe::flush(0), &DmaRegion::new(0));
        if !cqe.status.is_success() {
            return Err(Error::Command { what: "flush", status: cqe.status });
        }
        Ok(())
    }

    /// Takes the chunk holding `addr` offline for good, so that nobody can read it again.
    /// OCSSD 2.0 has no command for this (a vendor-specific one would do); the driver asks only
    /// for a removed guest's chunk that keeps failing its reset. By default the device cannot,
    /// and the driver keeps that guest's PUs reserved.
    fn set_offline(&self, addr: Addr) -> Result<()> {
        let _ = addr;
        Err(Error::Unsupported("taking a chunk offline"))
    }
}

/// Reads `len` bytes of log page `lid` from byte `offset` through a scratch region.
fn read_log_page<D: OpenChannel + ?Sized>(dev: &D, lid: u8, offset: u64, len: usize) -> Result<Vec<u8>> {
    let len32 =
        u32::try_from(len).map_err(|_| Error::Malformed { what: "log page read", reason: "too long".into() })?;
    let mem = DmaRegion::new(len);
    let cqe = dev.execute_admin(&Sqe::get_log_page(0, lid, offset, len32, 0), &mem);
    if !cqe.status.is_success() {
        return Err(Error::Command { what: "get log page", status: cqe.status });
    }
    mem.read_vec(0, len)
}
