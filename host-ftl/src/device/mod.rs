//! The open-channel SSD: executes 64-byte NVMe commands against its chunks and media.
//!
//! # Rules and their statuses
//!
//! Every address of a vector command gets a status; the completion's bitmap has bit *i* set
//! when address *i*'s status is not success, and the completion's status is that of the first
//! failing address in list order. The high-ECC read warning counts in the bitmap but gives the
//! command status only when no address failed outright. A command-level error (bad namespace,
//! address count or pointer) sets every address's bit and does nothing; an unknown opcode is
//! invalid opcode (0x01) with an empty bitmap.
//!
//! * Any address with bits above the LBA format or a field beyond the geometry: LBA out of range
//!   (generic 0x80).
//! * **Write (0x91).** The addresses form *runs*: maximal stretches of consecutive list entries
//!   that are in the same chunk at consecutive, increasing blocks. Runs are done in list order,
//!   each against the chunk as the runs before left it, so one command may write several chunks
//!   on several PUs and even the same chunk twice. For each run, in this order: chunk offline →
//!   0xC0; closed → 0xF2 out-of-order; length not a multiple of `ws_min` → invalid field (0x02);
//!   first block ≠ write pointer → 0xF2; chunk free and opening it would exceed `maxocpu` or
//!   `maxoc` → too many open chunks (command specific 0xBE). A failing run fails all its
//!   addresses and changes nothing; other runs go on. The first write opens a free chunk; writing
//!   its last block closes it. Injected program faults: see [`crate::fault`].
//! * **Read (0x92).** Per address: offline → 0xC0; a closed chunk reads below its write pointer,
//!   an open chunk only below `wp − mw_cunits` (the blocks above are still in the device's write
//!   cache: the host must serve them from its own buffer); anything else, and any block of a
//!   write unit whose program failed, reads as deallocated/unwritten (media 0x87). Failing
//!   addresses get **zeros** in their data and OOB slots.
//! * **Reset (0x90).** Per address, which must name block 0 of its chunk (else invalid field):
//!   offline → 0xC1; free → 0xC1 unless `mccap` allows multiple resets; otherwise the chunk is
//!   erased and its wear goes up by one: to free with `wp = slba`, or, when the wear passes
//!   `endurance`, to offline with status 0xC0 ("marked offline by the reset") and a
//!   notification.
//! * **Copy (0x93, when `mccap` bit 0 is set).** Reads the sources under the read rules, then
//!   writes the destinations (CDW14-15) under the write rules, runs formed on the destinations.
//!   A destination run whose sources did not all read fails whole, with the status of its first
//!   failing source; an invalid destination address fails with 0x80. Data and OOB are copied.
//! * **Flush (0x00).** Makes everything completed durable (`fdatasync` on file media). A
//!   write or copy with FUA (CDW12 bit 30) flushes before it completes.
//!
//! A media I/O error fails the addresses it concerned with internal error (0x06) and leaves the
//! chunk records as they were before the command.
//!
//! # Layout
//!
//! This file holds the device's state (chunks per PU, open-chunk counts, faults, notifications)
//! and what can be asked of it outside commands; `vector.rs` executes the I/O commands and
//! books their media work on the timing model; `admin.rs` answers the admin commands.
//!
//! # Concurrency
//!
//! A driver that has checked and translated a guest's address list passes it with
//! [`Device::execute_vector`], so that the list the device uses is the list that was checked.
//!
//! `execute` may be called from many threads. Each PU has its own lock; a command takes the locks
//! of the PUs it names (in PU order, so commands cannot deadlock) for its checks, media I/O and
//! chunk updates, so commands on different PUs run in parallel and commands on one PU are
//! atomic with respect to each other.

mod admin;
mod vector;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::address::{Addr, Ppa};
use crate::chunk::{ChunkDescriptor, ChunkMeta, ChunkState, CT_SEQUENTIAL};
use crate::command::{Cqe, Sqe};
use crate::dma::DmaRegion;
use crate::error::{Error, Result};
use crate::fault::{Fault, FaultConfig, FaultInjector};
use crate::geometry::{Geometry, GEOMETRY_PAGE_SIZE};
use crate::media::{bitmap_words, Media, MediaOp, MemMedia};
use crate::notify::{ChunkNotification, NotificationLog, MASK_CHUNK, STATE_UNRECOVERABLE};
use crate::open_channel::OpenChannel;
use crate::timing::{Costs, TimingModel};

/// The open-channel SSD model.
pub struct Device {
    geo: Geometry,
    media: Box<dyn Media>,
    pus: Vec<Mutex<PuState>>,
    open_total: AtomicU32,
    faults: FaultInjector,
    notes: NotificationLog,
    timing: TimingModel,
}

/// The chunks of one parallel unit.
struct PuState {
    chunks: Vec<ChunkMeta>,
    open: u32,
}

/// A decoded address and where its chunk lives.
#[derive(Clone, Copy, Debug)]
struct Loc {
    addr: Addr,
    pu: usize,
    /// Chunk index within the PU.
    local: usize,
    /// Chunk index in the device.
    chunk: usize,
}

impl Device {
    /// Opens a device on a media made for `geometry` (timings may differ). The chunk records
    /// come from the media; `faults` are armed and its offline chunks taken offline.
    pub fn open(geometry: Geometry, media: Box<dyn Media>, faults: FaultConfig) -> Result<Device> {
        geometry.validate()?;
        media.geometry().check_same_media(&geometry)?;
        let metas = media.load_chunks()?;
        let bad = |reason: String| Error::Malformed { what: "chunk table", reason };
        if metas.len() != geometry.total_chunks() {
            return Err(bad(format!("{} records for {} chunks", metas.len(), geometry.total_chunks())));
        }
        for (i, m) in metas.iter().enumerate() {
            check_meta(&geometry, m).map_err(|r| bad(format!("chunk {i}: {r}")))?;
        }
        for f in &faults.faults {
            f.at.check(&geometry)?;
        }
        let num_chk = geometry.num_chk as usize;
        let mut it = metas.into_iter();
        let mut pus = Vec::with_capacity(geometry.total_pus());
        let mut open_total = 0;
        for _ in 0..geometry.total_pus() {
            let chunks: Vec<ChunkMeta> = it.by_ref().take(num_chk).collect();
            let open = chunks.iter().filter(|c| c.state == ChunkState::Open).count() as u32;
            open_total += open;
            pus.push(Mutex::new(PuState { chunks, open }));
        }
        let dev = Device {
            timing: TimingModel::new(&geometry),
            geo: geometry,
            media,
            pus,
            open_total: AtomicU32::new(open_total),
            faults: FaultInjector::new(faults.faults),
            notes: NotificationLog::new(),
        };
        for a in faults.offline {
            dev.set_offline(a)?;
        }
        Ok(dev)
    }

    /// A device on fresh memory media, with no faults.
    pub fn in_memory(geometry: Geometry) -> Result<Device> {
        let media = MemMedia::new(&geometry)?;
        Device::open(geometry, Box::new(media), FaultConfig::default())
    }

    /// Gives the media back (e.g. to open a new device on it, as after a power cycle).
    pub fn into_media(self) -> Box<dyn Media> {
        self.media
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The timing model's per-PU state.
    pub fn timing(&self) -> &TimingModel {
        &self.timing
    }

    /// The 4096-byte geometry structure.
    pub fn geometry_page(&self) -> Box<[u8; GEOMETRY_PAGE_SIZE]> {
        self.geo.to_page()
    }

    /// The descriptor of the chunk holding `ppa`.
    pub fn chunk(&self, ppa: Ppa) -> Result<ChunkDescriptor> {
        self.chunk_at(ppa.to_addr(&self.geo)?)
    }

    /// The descriptor of the chunk holding `addr`.
    pub fn chunk_at(&self, addr: Addr) -> Result<ChunkDescriptor> {
        let loc = self.locate_addr(addr)?;
        let pu = self.lock_pu(loc.pu);
        Ok(self.descriptor(loc.chunk, &pu.chunks[loc.local]))
    }

    /// The wear (resets so far) of the chunk holding `addr`.
    pub fn wear(&self, addr: Addr) -> Result<u32> {
        let loc = self.locate_addr(addr)?;
        Ok(self.lock_pu(loc.pu).chunks[loc.local].wear)
    }

    /// Descriptors of the chunks with linear indexes in `range` (clamped to the device), as in
    /// the chunk information log page.
    pub fn chunk_info(&self, range: Range<usize>) -> Vec<ChunkDescriptor> {
        let num_chk = self.geo.num_chk as usize;
        let end = range.end.min(self.geo.total_chunks());
        let mut out = Vec::with_capacity(end.saturating_sub(range.start));
        let mut i = range.start;
        while i < end {
            let pu_index = i / num_chk;
            let pu = self.lock_pu(pu_index);
            let pu_end = ((pu_index + 1) * num_chk).min(end);
            out.extend((i..pu_end).map(|c| self.descriptor(c, &pu.chunks[c % num_chk])));
            i = pu_end;
        }
        out
    }

    /// Notifications with a count above `after`, oldest first (see [`crate::notify`]).
    pub fn notifications(&self, after: u64) -> Vec<ChunkNotification> {
        self.notes.since(after)
    }

    /// The count of the newest notification (0 before the first): a cheap way to see whether
    /// there is anything new to read with [`Device::notifications`].
    pub fn last_notification(&self) -> u64 {
        self.notes.last()
    }

    /// Chunks open right now.
    pub fn open_chunks(&self) -> u32 {
        self.open_total.load(Ordering::SeqCst)
    }

    /// Arms a fault (see [`crate::fault`]).
    pub fn inject(&self, fault: Fault) -> Result<()> {
        fault.at.check(&self.geo)?;
        self.faults.add(fault);
        Ok(())
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.faults.clear();
    }

    /// The armed faults.
    pub fn faults(&self) -> Vec<Fault> {
        self.faults.list()
    }

    /// Takes the chunk holding `addr` offline now, as a failing die would, and logs a
    /// notification. Reads, writes and resets of it fail from now on. Does nothing if it is
    /// offline already.
    pub fn set_offline(&self, addr: Addr) -> Result<()> {
        let loc = self.locate_addr(addr)?;
        let mut pu = self.lock_pu(loc.pu);
        if pu.chunks[loc.local].state == ChunkState::Offline {
            return Ok(());
        }
        let before = pu.chunks[loc.local].clone();
        self.set_state(&mut pu, loc.local, ChunkState::Offline);
        let meta = pu.chunks[loc.local].clone();
        if let Err(e) = self.media.submit(&mut [MediaOp::SaveChunk { chunk: loc.chunk, meta: &meta }]) {
            self.set_state(&mut pu, loc.local, before.state);
            return Err(e);
        }
        drop(pu);
        self.notes.push(self.slba(loc), STATE_UNRECOVERABLE, MASK_CHUNK, 0);
        Ok(())
    }

    /// Makes everything completed so far durable.
    pub fn flush(&self) -> Result<()> {
        self.media.flush()
    }

    fn lock_pu(&self, pu: usize) -> MutexGuard<'_, PuState> {
        plumbing::lock(&self.pus[pu])
    }

    fn locate_addr(&self, a: Addr) -> Result<Loc> {
        let pu = a.pu_index(&self.geo)?;
        let chunk = a.chunk_index(&self.geo)?;
        Ok(Loc { addr: a, pu, local: a.chk as usize, chunk })
    }

    fn slba(&self, loc: Loc) -> Ppa {
        loc.addr.chunk_start().to_ppa(&self.geo).unwrap_or_default()
    }

    fn descriptor(&self, chunk: usize, meta: &ChunkMeta) -> ChunkDescriptor {
        let slba = Addr::from_chunk_index(&self.geo, chunk, 0).and_then(|a| a.to_ppa(&self.geo)).unwrap_or_default();
        ChunkDescriptor {
            state: meta.state,
            ctype: CT_SEQUENTIAL,
            wli: self.geo.wli(meta.wear),
            slba,
            cnlb: self.geo.clba.into(),
            wp: Ppa(slba.0 + u64::from(meta.wp)),
        }
    }

    /// Moves a chunk to a new state, keeping the open-chunk counts right.
    fn set_state(&self, pu: &mut PuState, local: usize, new: ChunkState) {
        let old = pu.chunks[local].state;
        if old == new {
            return;
        }
        if old == ChunkState::Open {
            pu.open -= 1;
            self.open_total.fetch_sub(1, Ordering::SeqCst);
        }
        if new == ChunkState::Open {
            pu.open += 1;
            self.open_total.fetch_add(1, Ordering::SeqCst);
        }
        pu.chunks[local].state = new;
    }

    /// Opens a free chunk if the open-chunk limits allow.
    fn try_open(&self, pu: &mut PuState, local: usize) -> bool {
        if pu.open >= self.geo.maxocpu {
            return false;
        }
        let maxoc = self.geo.maxoc;
        if self.open_total.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < maxoc).then_some(n + 1)).is_err() {
            return false;
        }
        pu.open += 1;
        pu.chunks[local].state = ChunkState::Open;
        true
    }
}

/// The emulator under the host FTL driver: every method is the inherent one of the same name.
impl OpenChannel for Device {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn execute(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        Device::execute(self, sqe, mem)
    }

    fn execute_vector(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion) -> Cqe {
        Device::execute_vector(self, sqe, addrs, dst, mem)
    }

    fn execute_admin(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        Device::execute_admin(self, sqe, mem)
    }

    fn costs(&self) -> Costs {
        *self.timing.costs()
    }

    fn execute_vector_at(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion, now_ns: u64) -> (Cqe, u64) {
        Device::execute_vector_at(self, sqe, addrs, dst, mem, now_ns)
    }

    fn chunk_info(&self, range: Range<usize>) -> Result<Vec<ChunkDescriptor>> {
        Ok(Device::chunk_info(self, range))
    }

    fn notifications(&self, after: u64) -> Result<Vec<ChunkNotification>> {
        Ok(Device::notifications(self, after))
    }

    fn last_notification(&self) -> Result<u64> {
        Ok(Device::last_notification(self))
    }

    fn flush(&self) -> Result<()> {
        Device::flush(self)
    }

    fn set_offline(&self, addr: Addr) -> Result<()> {
        Device::set_offline(self, addr)
    }
}

/// Checks a chunk record loaded from media.
fn check_meta(geo: &Geometry, m: &ChunkMeta) -> std::result::Result<(), String> {
    if m.wp > geo.clba || m.wp % geo.ws_min != 0 {
        return Err(format!("write pointer {} is not a unit boundary within the chunk", m.wp));
    }
    if m.failed_units.len() > bitmap_words(geo) {
        return Err("failed-unit bitmap too long".into());
    }
    match m.state {
        ChunkState::Free if m.wp != 0 || !m.failed_units.is_empty() => Err("free chunk with data".into()),
        ChunkState::Open if m.wp >= geo.clba => Err("open chunk that is full".into()),
        _ => Ok(()),
    }
}
