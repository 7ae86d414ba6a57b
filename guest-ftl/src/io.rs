//! Running batches of vector commands through a [`FlashChannel`].
//!
//! Each command of a batch gets its own piece of the DMA region (address list, data, OOB), laid
//! out one after the other; the batch is submitted at once and awaited together. A batch that
//! does not fit its window of the region is run in several rounds, in order, so commands that
//! must follow each other (writes to one chunk) are never put in one batch by callers.
//!
//! # Who uses which part of the region
//!
//! The engine (under the FTL's lock) uses the front of the region ([`engine_window`], see
//! [`crate::region`]). When the region is big enough, its tail is a [`ReadArea`]: [`READ_SLOTS`] fixed slots, each holding one
//! read of up to [`READ_SLOT_BLOCKS`] blocks, which reads use *without* the lock, so that many
//! reads have their flash I/O in flight at once, beside the engine's.

use std::sync::Mutex;

use futures_util::future::join_all;
use host_ftl::command::FUA as FUA_BIT;
use host_ftl::{opcode, Cqe, Sqe};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::channel::{next_cid, FlashChannel};
use crate::error::{FtlError, Result};
use crate::region::read_bytes;
pub use crate::region::{engine_window, region_bytes, READ_SLOTS, READ_SLOT_BLOCKS};

/// One vector command (or a flush, with no addresses).
#[derive(Debug)]
pub struct Cmd {
    pub op: u8,
    pub addrs: Vec<u64>,
    /// Data to write (`block_size` per address); empty for other commands.
    pub data: Vec<u8>,
    /// OOB to write (`oob_size` per address); empty for other commands.
    pub oob: Vec<u8>,
    pub fua: bool,
}

impl Cmd {
    pub fn read(addrs: Vec<u64>) -> Cmd {
        Cmd { op: opcode::VECTOR_READ, addrs, data: Vec::new(), oob: Vec::new(), fua: false }
    }

    pub fn write(addrs: Vec<u64>, data: Vec<u8>, oob: Vec<u8>) -> Cmd {
        Cmd { op: opcode::VECTOR_WRITE, addrs, data, oob, fua: false }
    }

    pub fn reset(addrs: Vec<u64>) -> Cmd {
        Cmd { op: opcode::VECTOR_RESET, addrs, data: Vec::new(), oob: Vec::new(), fua: false }
    }

    pub fn flush() -> Cmd {
        Cmd { op: opcode::FLUSH, addrs: Vec::new(), data: Vec::new(), oob: Vec::new(), fua: false }
    }

    fn bytes(&self, bs: usize, os: usize) -> (usize, usize, usize) {
        let n = self.addrs.len();
        let list = if n > 1 { n * 8 } else { 0 };
        match self.op {
            opcode::VECTOR_READ | opcode::VECTOR_WRITE => (list, n * bs, n * os),
            _ => (list, 0, 0),
        }
    }
}

/// A completion, with the data and OOB a read brought back.
#[derive(Debug)]
pub struct Done {
    pub cqe: Cqe,
    pub data: Vec<u8>,
    pub oob: Vec<u8>,
}

/// A read's completion whose data was left in the region, at `data_at`.
#[derive(Debug)]
pub struct InPlace {
    pub cqe: Cqe,
    pub data_at: u64,
}

impl Done {
    /// Whether address `i` failed (or warned).
    pub fn failed(&self, i: usize) -> bool {
        address_failed(&self.cqe, i)
    }
}

impl InPlace {
    /// Whether address `i` failed (or warned).
    pub fn failed(&self, i: usize) -> bool {
        address_failed(&self.cqe, i)
    }
}

fn address_failed(cqe: &Cqe, i: usize) -> bool {
    i < 64 && cqe.bitmap() & (1 << i) != 0
}

struct Placed {
    list: u64,
    data: u64,
    oob: u64,
}

/// Commands of one round at most: a quarter of the host driver's queue depth
/// ([`host_ftl::driver::MAX_QUEUE_DEPTH`]), so a round never meets its limit, with room for the
/// lock-free reads beside it (at most [`READ_SLOTS`](crate::region::READ_SLOTS) reads of at most 7 commands). Resets take
/// no room in the region, so without this a format or recovery put every chunk's in one round.
pub const MAX_ROUND: usize = 256;
const _: () = assert!(MAX_ROUND + READ_SLOTS * 7 <= host_ftl::driver::MAX_QUEUE_DEPTH);

/// The slots of the region that reads use without the FTL's lock (see the module docs).
pub struct ReadArea {
    slot_bytes: usize,
    free: Mutex<Vec<usize>>,
    permits: Semaphore,
}

/// One slot of the read area, given back when dropped.
pub struct ReadSlot<'a> {
    area: &'a ReadArea,
    at: usize,
    _permit: SemaphorePermit<'a>,
}

impl ReadArea {
    /// The read area of `ch`'s region, if it is big enough to have one.
    pub fn new(ch: &dyn FlashChannel) -> Option<ReadArea> {
        let geo = ch.geometry();
        let len = ch.region().len() as usize;
        let base = engine_window(geo, len);
        if base == len {
            return None;
        }
        let slot_bytes = read_bytes(geo, READ_SLOT_BLOCKS);
        Some(ReadArea {
            slot_bytes,
            free: Mutex::new((0..READ_SLOTS).map(|i| base + i * slot_bytes).collect()),
            permits: Semaphore::new(READ_SLOTS),
        })
    }

    /// Waits for a free slot.
    pub async fn take(&self) -> Result<ReadSlot<'_>> {
        let permit = self.permits.acquire().await.map_err(|_| FtlError::Config("read area closed".into()))?;
        let at = plumbing::lock(&self.free).pop();
        // A permit is only ever held with a slot, so a permit always finds one.
        let at = at.ok_or_else(|| FtlError::Config("read area out of slots".into()))?;
        Ok(ReadSlot { area: self, at, _permit: permit })
    }
}

impl ReadSlot<'_> {
    /// Runs the read commands `cmds` (of at most [`READ_SLOT_BLOCKS`] blocks in all) in this
    /// slot and leaves their data there, for the caller to copy straight to where it goes.
    pub async fn read(&self, ch: &dyn FlashChannel, cmds: &[Cmd]) -> Result<Vec<InPlace>> {
        let placed = place(ch, self.at, self.area.slot_bytes, cmds)?;
        if placed.len() < cmds.len() {
            return Err(FtlError::Config(format!("a read of {} commands does not fit a read slot", cmds.len())));
        }
        let cqes = submit_placed(ch, cmds, &placed).await?;
        Ok(placed.iter().zip(cqes).map(|(p, cqe)| InPlace { cqe, data_at: p.data }).collect())
    }
}

impl Drop for ReadSlot<'_> {
    fn drop(&mut self) {
        plumbing::lock(&self.area.free).push(self.at);
    }
}

/// Runs the commands in the engine's window of the region, overlapping as many as it holds;
/// completions in command order.
pub async fn run(ch: &dyn FlashChannel, cmds: Vec<Cmd>) -> Result<Vec<Done>> {
    let window = engine_window(ch.geometry(), ch.region().len() as usize);
    run_in(ch, 0, window, cmds).await
}

/// Runs the commands in `cap` bytes of the region from `base`, in as many rounds as it takes.
async fn run_in(ch: &dyn FlashChannel, base: usize, cap: usize, cmds: Vec<Cmd>) -> Result<Vec<Done>> {
    let geo = ch.geometry();
    let (bs, os) = (geo.block_size as usize, geo.oob_size as usize);
    let mut out = Vec::with_capacity(cmds.len());
    let mut start = 0;
    while start < cmds.len() {
        let placed = place(ch, base, cap, &cmds[start..])?;
        let cqes = submit_placed(ch, &cmds[start..], &placed).await?;
        for ((cmd, p), cqe) in cmds[start..].iter().zip(&placed).zip(cqes) {
            let (_, d, o) = cmd.bytes(bs, os);
            let (data, oob) = if cmd.op == opcode::VECTOR_READ {
                let mem = ch.region();
                (mem.read_vec(p.data, d).map_err(FtlError::Dma)?, mem.read_vec(p.oob, o).map_err(FtlError::Dma)?)
            } else {
                (Vec::new(), Vec::new())
            };
            out.push(Done { cqe, data, oob });
        }
        start += placed.len();
    }
    Ok(out)
}

/// Where in `cap` bytes of the region from `base` the first of `cmds` go: as many as fit (at
/// most [`MAX_ROUND`]), at least one.
fn place(ch: &dyn FlashChannel, base: usize, cap: usize, cmds: &[Cmd]) -> Result<Vec<Placed>> {
    let geo = ch.geometry();
    let (bs, os) = (geo.block_size as usize, geo.oob_size as usize);
    let mut at = 0usize;
    let mut placed = Vec::with_capacity(cmds.len());
    for cmd in cmds.iter().take(MAX_ROUND) {
        let (l, d, o) = cmd.bytes(bs, os);
        if at + l + d + o > cap {
            break;
        }
        let p = base + at;
        placed.push(Placed { list: p as u64, data: (p + l) as u64, oob: (p + l + d) as u64 });
        at += l + d + o;
    }
    if placed.is_empty() {
        return Err(FtlError::Config(format!("the DMA region of {cap} bytes cannot hold one command")));
    }
    Ok(placed)
}

/// Submits the placed commands (the first `placed.len()` of `cmds`) together and waits for all
/// of them; their completions in command order.
async fn submit_placed(ch: &dyn FlashChannel, cmds: &[Cmd], placed: &[Placed]) -> Result<Vec<Cqe>> {
    // One command (a small read) needs no joining.
    if let ([cmd, ..], [p]) = (cmds, placed) {
        return Ok(vec![ch.submit(sqe_of(ch, cmd, p)?).await]);
    }
    let mut futs = Vec::with_capacity(placed.len());
    for (cmd, p) in cmds.iter().zip(placed) {
        futs.push(ch.submit(sqe_of(ch, cmd, p)?));
    }
    Ok(join_all(futs).await)
}

/// Writes a command's address list and data into the region and makes its 64-byte command.
fn sqe_of(ch: &dyn FlashChannel, cmd: &Cmd, p: &Placed) -> Result<Sqe> {
    if cmd.op == opcode::FLUSH {
        return Ok(Sqe::flush(next_cid()));
    }
    let mem = ch.region();
    let lba = if cmd.addrs.len() == 1 {
        cmd.addrs[0]
    } else {
        mem.write_u64s(p.list, &cmd.addrs).map_err(FtlError::Dma)?;
        p.list
    };
    if cmd.op == opcode::VECTOR_WRITE {
        mem.write(p.data, &cmd.data).map_err(FtlError::Dma)?;
        mem.write(p.oob, &cmd.oob).map_err(FtlError::Dma)?;
    }
    let mut s = Sqe::vector(cmd.op, next_cid(), cmd.addrs.len(), lba, p.data, p.oob)
        .map_err(|e| FtlError::Config(e.to_string()))?;
    if cmd.fua {
        s.cdw12 |= FUA_BIT;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::DirectChannel;
    use crate::layout::tests::small;

    #[test]
    fn a_round_holds_at_most_max_round_commands_even_when_they_take_no_room() {
        let geo = small();
        let dev = host_ftl::Device::in_memory(geo.clone()).unwrap();
        let ch = DirectChannel::new(dev, DirectChannel::default_region_bytes(&geo));
        let resets: Vec<Cmd> = (0..1000).map(|_| Cmd::reset(vec![0])).collect();
        assert_eq!(place(&ch, 0, 1 << 20, &resets).unwrap().len(), MAX_ROUND);
        // Commands that need room still stop where the room ends.
        let reads: Vec<Cmd> = (0..1000).map(|_| Cmd::read(vec![0, 1])).collect();
        let per = 2 * 8 + 2 * 4096 + 2 * 16;
        assert_eq!(place(&ch, 0, 10 * per, &reads).unwrap().len(), 10);
    }
}
