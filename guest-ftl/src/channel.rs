//! The boundary between the guest FTL and the host FTL driver.
//!
//! Everything the guest FTL does to flash goes through a [`FlashChannel`]: 64-byte NVMe vector
//! commands with guest-relative physical addresses, whose pointers are byte offsets into the
//! channel's own [`DmaRegion`], plus the admin commands (geometry, chunk information log 0xCA,
//! chunk notification log 0xD0). Nothing else of the device is touched, so a guest FTL could run
//! in another process over a shared-memory queue pair.
//!
//! The host FTL driver's [`host_ftl::driver::QueuePair`] implements it (commands validated,
//! translated and scheduled by the driver); [`DirectChannel`] implements it straight over a
//! [`host_ftl::Device`] for tests and benchmarks, optionally on a simulated clock driven by the
//! device's timing model.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};

use host_ftl::{admin, ChunkDescriptor, ChunkNotification, Cqe, Device, DmaRegion, Geometry, Sqe, Status};

use crate::error::{FtlError, Result};

/// A command's completion, as a future.
pub type CmdFuture<'a> = Pin<Box<dyn Future<Output = Cqe> + Send + 'a>>;

/// A queue pair to the guest's partition: a virtual geometry (PUs numbered from 0), a DMA
/// region, and asynchronous submission of I/O and admin commands (many may be in flight).
pub trait FlashChannel: Send + Sync {
    /// The guest's (virtual) geometry.
    fn geometry(&self) -> &Geometry;
    /// The memory commands point into.
    fn region(&self) -> &DmaRegion;
    /// Submits an I/O command (flush, vector reset/write/read/copy).
    fn submit(&self, sqe: Sqe) -> CmdFuture<'_>;
    /// Submits an admin command (geometry, get log page).
    fn admin(&self, sqe: Sqe) -> CmdFuture<'_>;
}

/// A channel straight over a device, for tests and benchmarks.
///
/// With the timing model on, each command starts at the channel's simulated clock and the clock
/// moves to the command's completion time when its future is polled, so commands submitted
/// together overlap across PUs as they would on the device. [`DirectChannel::kill_after`]
/// simulates the process dying: from then on nothing reaches the device.
pub struct DirectChannel {
    dev: Device,
    region: DmaRegion,
    timed: bool,
    clock: AtomicU64,
    /// Commands left before the channel goes dead; negative = never.
    lives: AtomicI64,
}

impl DirectChannel {
    /// A channel over `dev` with a DMA region of `region_bytes`.
    pub fn new(dev: Device, region_bytes: usize) -> DirectChannel {
        DirectChannel {
            dev,
            region: DmaRegion::new(region_bytes),
            timed: false,
            clock: AtomicU64::new(0),
            lives: AtomicI64::new(-1),
        }
    }

    /// A region big enough for the FTL on `geo` (see [`crate::region::region_bytes`]).
    pub fn default_region_bytes(geo: &Geometry) -> usize {
        crate::region::region_bytes(geo, geo.total_pus())
    }

    /// Runs commands under the device's timing model on a simulated clock.
    pub fn timed(mut self) -> DirectChannel {
        self.timed = true;
        self
    }

    /// The simulated time in nanoseconds (0 unless timed).
    pub fn now_ns(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// After `n` more commands every command fails with an internal error and does nothing, as
    /// if the process had been killed at that point.
    pub fn kill_after(&self, n: u64) {
        self.lives.store(n.min(i64::MAX as u64) as i64, Ordering::SeqCst);
    }

    /// Whether the channel has gone dead.
    pub fn is_dead(&self) -> bool {
        self.lives.load(Ordering::SeqCst) == 0
    }

    /// The device, e.g. to inject faults.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Gives the device back (to take its media after a simulated crash).
    pub fn into_device(self) -> Device {
        self.dev
    }

    /// Takes one life; false when the channel is dead.
    fn alive(&self) -> bool {
        self.lives.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| if l > 0 { Some(l - 1) } else { None }).is_ok()
            || self.lives.load(Ordering::SeqCst) < 0
    }
}

fn dead(sqe: &Sqe) -> Cqe {
    let n = sqe.naddr();
    Cqe::new(sqe.cid, Status::INTERNAL_ERROR, if n >= 64 { u64::MAX } else { (1u64 << n) - 1 })
}

impl FlashChannel for DirectChannel {
    fn geometry(&self) -> &Geometry {
        self.dev.geometry()
    }

    fn region(&self) -> &DmaRegion {
        &self.region
    }

    fn submit(&self, sqe: Sqe) -> CmdFuture<'_> {
        if !self.alive() {
            return Box::pin(std::future::ready(dead(&sqe)));
        }
        if !self.timed {
            return Box::pin(std::future::ready(self.dev.execute(&sqe, &self.region)));
        }
        let (cqe, done) = self.dev.execute_at(&sqe, &self.region, self.clock.load(Ordering::SeqCst));
        Box::pin(async move {
            self.clock.fetch_max(done, Ordering::SeqCst);
            cqe
        })
    }

    fn admin(&self, sqe: Sqe) -> CmdFuture<'_> {
        if !self.alive() {
            return Box::pin(std::future::ready(Cqe::new(sqe.cid, Status::INTERNAL_ERROR, 0)));
        }
        Box::pin(std::future::ready(self.dev.execute_admin(&sqe, &self.region)))
    }
}

/// A guest's queue pair of the host FTL driver is the production channel: commands go through
/// the driver's validation, translation and fair scheduling to the device.
impl FlashChannel for host_ftl::driver::QueuePair {
    fn geometry(&self) -> &Geometry {
        host_ftl::driver::QueuePair::geometry(self)
    }

    fn region(&self) -> &DmaRegion {
        host_ftl::driver::QueuePair::region(self)
    }

    fn submit(&self, sqe: Sqe) -> CmdFuture<'_> {
        Box::pin(host_ftl::driver::QueuePair::submit(self, sqe))
    }

    fn admin(&self, sqe: Sqe) -> CmdFuture<'_> {
        Box::pin(host_ftl::driver::QueuePair::admin(self, sqe))
    }
}

/// Command ids: wrap around; the FTL matches completions by future, not by id.
static CID: AtomicU16 = AtomicU16::new(1);

pub(crate) fn next_cid() -> u16 {
    CID.fetch_add(1, Ordering::Relaxed)
}

/// Reads a log page of `len` bytes from `offset` through the channel, at DMA offset 0.
async fn log_page(ch: &dyn FlashChannel, lid: u8, offset: u64, len: usize) -> Result<Vec<u8>> {
    let len4 = len.next_multiple_of(4).max(4);
    ch.region().check(0, len4).map_err(FtlError::Dma)?;
    let sqe = Sqe::get_log_page(next_cid(), lid, offset, len4 as u32, 0);
    let cqe = ch.admin(sqe).await;
    if !cqe.status.is_success() {
        return Err(FtlError::Device { opcode: admin::GET_LOG_PAGE, status: cqe.status });
    }
    let mut out = ch.region().read_vec(0, len4).map_err(FtlError::Dma)?;
    out.truncate(len);
    Ok(out)
}

/// Every chunk's descriptor (log page 0xCA), in chunk-index order. Reads in pieces that fit the
/// region. Must not run while other commands use the region.
pub(crate) async fn chunk_table(ch: &dyn FlashChannel) -> Result<Vec<ChunkDescriptor>> {
    let total = ch.geometry().total_chunks();
    let per = (ch.region().len() as usize / host_ftl::chunk::CHUNK_DESCRIPTOR_SIZE).clamp(1, 4096);
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let n = per.min(total - out.len());
        let size = host_ftl::chunk::CHUNK_DESCRIPTOR_SIZE;
        let bytes = log_page(ch, admin::LOG_CHUNK_INFO, (out.len() * size) as u64, n * size).await?;
        for d in bytes.chunks_exact(size) {
            out.push(ChunkDescriptor::from_bytes(d).map_err(|e| FtlError::Metadata(e.to_string()))?);
        }
    }
    Ok(out)
}

/// Chunk notifications newer than `after` (log page 0xD0). Must not run while other commands
/// use the region.
pub(crate) async fn notifications(ch: &dyn FlashChannel, after: u64) -> Result<Vec<ChunkNotification>> {
    let size = host_ftl::notify::NOTIFICATION_SIZE;
    let cap = host_ftl::notify::NOTIFICATION_CAPACITY;
    let per = (ch.region().len() as usize / size).clamp(1, cap);
    let mut out = Vec::new();
    let mut at = 0;
    while at < cap {
        let n = per.min(cap - at);
        let bytes = log_page(ch, admin::LOG_CHUNK_NOTIFICATION, (at * size) as u64, n * size).await?;
        let mut end = false;
        for e in bytes.chunks_exact(size) {
            let note = ChunkNotification::from_bytes(e).map_err(|e| FtlError::Metadata(e.to_string()))?;
            if note.nc == 0 {
                end = true;
                break;
            }
            if note.nc > after {
                out.push(note);
            }
        }
        if end {
            break;
        }
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use host_ftl::{opcode, Addr};

    #[test]
    fn direct_channel_runs_commands_and_dies_on_request() {
        let geo = Geometry::tiny();
        let ch = DirectChannel::new(Device::in_memory(geo.clone()).unwrap(), 4096).timed();
        let addrs: Vec<u64> = (0..2).map(|b| Addr::new(0, 0, 0, b).to_ppa(&geo).unwrap().0).collect();
        ch.region().write_u64s(0, &addrs).unwrap();
        let sqe = Sqe::vector(opcode::VECTOR_WRITE, 1, 2, 0, 1024, 2048).unwrap();
        let cqe = futures_util::FutureExt::now_or_never(ch.submit(sqe)).unwrap();
        assert!(cqe.status.is_success());
        assert!(ch.now_ns() > 0, "the simulated clock moved");
        ch.kill_after(0);
        let cqe = futures_util::FutureExt::now_or_never(ch.submit(Sqe::flush(2))).unwrap();
        assert_eq!(cqe.status, Status::INTERNAL_ERROR);
        assert!(ch.is_dead());
    }

    #[test]
    fn reads_chunk_table_and_notifications() {
        let geo = Geometry::tiny();
        let ch = DirectChannel::new(Device::in_memory(geo.clone()).unwrap(), 256);
        ch.device().set_offline(Addr::new(0, 1, 2, 0)).unwrap();
        let table = futures_util::FutureExt::now_or_never(chunk_table(&ch)).unwrap().unwrap();
        assert_eq!(table.len(), geo.total_chunks());
        assert_eq!(table[geo.num_chk as usize + 2].state, host_ftl::ChunkState::Offline);
        let notes = futures_util::FutureExt::now_or_never(notifications(&ch, 0)).unwrap().unwrap();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].is_offline());
        assert!(futures_util::FutureExt::now_or_never(notifications(&ch, 1)).unwrap().unwrap().is_empty());
    }
}
