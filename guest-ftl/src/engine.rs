//! The FTL's state and its write and read paths.
//!
//! # Lines and streams
//!
//! Space is handed out in *lines*: one free chunk from each parallel unit, opened together and
//! written in stripes, [`Layout::unit`] slots on one member after the other, so consecutive
//! writes spread over every PU in `ws_opt` pieces. Each *stream* has one open line. With
//! `hot_cold` there are four: hot and cold user writes and hot and cold relocated data, chosen
//! by each block's inferred lifetime ([`crate::streams`]). A line is written in full, then
//! *closed*; GC cleans it, and its members are reset and return to the free pool.
//!
//! # Write buffer
//!
//! Accepted data is kept in [`Engine::cache`] (slot → bytes) from the moment it is given a slot
//! until the device can return it: a slot is written once its stripe is full, a unit on every
//! member, submitted together so the PUs program in parallel (or when a flush or FUA write pads
//! the open unit to `ws_min`), and the device cannot read the last
//! `mw_cunits` sectors of an open chunk, so those stay in the cache too. Reads look in the cache
//! first. The map points at the slot from the start, so a read never sees a gap.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use host_ftl::{opcode, Status};
use state_store::Store;

use crate::channel::FlashChannel;
use crate::checkpoint::Records;
use crate::config::FtlConfig;
use crate::error::{FtlError, Result};
use crate::flash::{device_err, unchanged, Flash};
use crate::heat::Heat;
use crate::io::Cmd;
use crate::layout::{Layout, Oob, LBA_BYTES, MAX_GEN, MAX_SEQ, NO_SLOT, OOB_BYTES, PAD_LBA};
use crate::map::{Entry, Map};
use crate::metrics::Metrics;
use crate::notices::Notices;
use crate::streams::Streams;
pub use crate::streams::{GC, GC_OLD, USER, USER_COLD};
use crate::trims::{Trim, TrimLog};

/// Where a line is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineState {
    /// Its stream is filling it.
    Open,
    /// Every slot is handed out; some are not on the device yet.
    Full,
    /// Every slot is on the device.
    Closed,
    /// No more writes: a write to it failed, or it was open when the FTL stopped. It is
    /// relocated and reset as soon as possible.
    Aborted,
    /// Cleaned by GC: no valid block left; reset once the blocks moved out are on the device.
    Drained,
}

/// A set of chunks, one per PU, written and cleaned together.
#[derive(Debug)]
pub struct Line {
    pub gen: u32,
    pub members: Vec<u32>,
    pub stream: usize,
    pub state: LineState,
    /// Slots handed out, in line order.
    pub pos: u32,
    /// Slots handed out per member.
    pub alloc: Vec<u32>,
    /// Valid slots.
    pub valid: u32,
    /// How fast its blocks die (for cost-benefit victims).
    pub heat: Heat,
    /// When drained: (chunk, its line's generation, write pointer) that must be reached on the
    /// device before this line may be reset.
    pub needs: Vec<(u32, u32, u32)>,
}

impl Line {
    pub fn capacity(&self, lay: &Layout) -> u32 {
        self.members.len() as u32 * lay.spc
    }

    /// Member and chunk offset of line position `pos`.
    pub fn place(&self, lay: &Layout, pos: u32) -> (usize, u32) {
        let m = self.members.len() as u32;
        let member = (pos / lay.unit) % m;
        let offset = pos / (lay.unit * m) * lay.unit + pos % lay.unit;
        (member as usize, offset)
    }
}

/// What the FTL knows of one chunk.
#[derive(Clone, Debug, Default)]
pub struct ChunkInfo {
    /// The line it belongs to.
    pub line: Option<u32>,
    /// Retired: never used again.
    pub bad: bool,
    /// Resets it has been through.
    pub wear: u32,
    /// Slots written successfully.
    pub wp: u32,
    /// Slots below this are no longer in the cache.
    pub released: u32,
    /// A write was attempted, so the device has it open or closed.
    pub touched: bool,
}

/// A slot's data held until the device can return it.
pub struct Cached {
    pub data: Box<[u8]>,
    pub lba: u32,
    pub seq: u64,
}

/// The line GC is cleaning and how far it got.
#[derive(Clone, Copy, Debug)]
pub struct Victim {
    pub gen: u32,
    pub cursor: u32,
}

/// All state of one FTL. Every method runs under the FTL's lock.
pub struct Engine {
    pub flash: Flash,
    pub lay: Layout,
    pub cfg: FtlConfig,
    pub records: Records,
    pub user_lbas: u32,
    pub map: Map,
    pub chunks: Vec<ChunkInfo>,
    pub valid: Vec<u64>,
    pub p2l: Vec<u32>,
    pub lines: BTreeMap<u32, Line>,
    pub open: Vec<Option<u32>>,
    pub cache: HashMap<u32, Cached>,
    pub next_seq: u64,
    pub next_gen: u32,
    pub trims: TrimLog,
    pub victim: Option<Victim>,
    /// Lines to relocate before any other: aborted, worn, failing, or moved for wear levelling.
    pub urgent: VecDeque<u32>,
    pub debt: f64,
    pub lines_since_ckpt: u32,
    /// Logical blocks whose data was lost with an offline chunk: reads fail until rewritten.
    pub lost: HashSet<u32>,
    pub notices: Notices,
    pub opens_since_wl: u32,
    pub free: u32,
    pub metrics: Arc<Metrics>,
    /// What is known of each logical block's lifetime and each stream's heat, to choose
    /// streams.
    pub streams: Streams,
}

impl Engine {
    /// An empty engine (no lines, nothing mapped) over `ch`.
    pub fn new(
        ch: Arc<dyn FlashChannel>,
        lay: Layout,
        cfg: FtlConfig,
        store: Arc<Store>,
        ns: String,
        user_lbas: u32,
    ) -> Engine {
        let total = lay.total_slots() as usize;
        let streams = cfg.streams();
        Engine {
            flash: Flash::new(ch, lay.clone()),
            map: Map::new(user_lbas),
            chunks: vec![ChunkInfo::default(); lay.chunks as usize],
            valid: vec![0; total.div_ceil(64)],
            p2l: vec![PAD_LBA; total],
            lines: BTreeMap::new(),
            open: vec![None; streams],
            cache: HashMap::new(),
            next_seq: 1,
            next_gen: 1,
            trims: TrimLog::default(),
            victim: None,
            urgent: VecDeque::new(),
            debt: 0.0,
            lines_since_ckpt: 0,
            lost: HashSet::new(),
            notices: Notices::new(cfg.notify_every),
            opens_since_wl: 0,
            free: 0,
            metrics: Arc::new(Metrics::default()),
            streams: Streams::new(cfg.hot_cold, user_lbas),
            lay,
            cfg,
            records: Records::new(store, ns),
            user_lbas,
        }
    }

    // ---- bookkeeping ----

    pub fn is_valid(&self, slot: u32) -> bool {
        self.valid.get(slot as usize / 64).is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    fn line_of_slot(&mut self, slot: u32) -> Option<&mut Line> {
        let gen = self.chunks.get(self.lay.chunk_of(slot) as usize)?.line?;
        self.lines.get_mut(&gen)
    }

    fn set_valid(&mut self, slot: u32, lba: u32) {
        let Some(w) = self.valid.get_mut(slot as usize / 64) else { return };
        if *w & (1 << (slot % 64)) == 0 {
            *w |= 1 << (slot % 64);
            let now = self.next_seq;
            if let Some(l) = self.line_of_slot(slot) {
                l.heat.expose(l.valid, now);
                l.valid += 1;
            }
        }
        self.p2l[slot as usize] = lba;
    }

    pub fn clear_valid(&mut self, slot: u32) {
        let Some(w) = self.valid.get_mut(slot as usize / 64) else { return };
        if *w & (1 << (slot % 64)) != 0 {
            *w &= !(1 << (slot % 64));
            let now = self.next_seq;
            if let Some(l) = self.line_of_slot(slot) {
                l.heat.expose(l.valid, now);
                l.valid = l.valid.saturating_sub(1);
            }
        }
    }

    /// Points `lba` at `new`, invalidating the slot it had.
    pub fn remap(&mut self, lba: u32, new: Entry) {
        let old = self.map.set(lba, new);
        tracing::trace!(lba, ?old, ?new, "remap");
        if old.is_mapped() {
            // A new version or a trim ends the old one's life; relocation keeps the sequence.
            if new.seq != old.seq && self.is_valid(old.slot) {
                let now = self.next_seq;
                if let Some(l) = self.line_of_slot(old.slot) {
                    l.heat.death(now);
                }
            }
            self.clear_valid(old.slot);
        }
        if new.is_mapped() {
            self.set_valid(new.slot, lba);
        }
        self.lost.remove(&lba);
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

    fn update_free_metric(&self) {
        Metrics::set(&self.metrics.free_chunks, u64::from(self.free));
    }

    /// Chunks kept free for garbage collection alone: a line for each GC stream.
    pub fn reserve_chunks(&self) -> u32 {
        self.lay.pus * if self.cfg.hot_cold { 2 } else { 1 }
    }

    /// Below this many free chunks, user writes pay for garbage collection: the GC reserve
    /// plus `gc_free_lines` lines for each user stream, so that every stream can open its next
    /// line while the lines GC drained wait for their reset without the reserve being touched
    /// (below it, drained lines are freed by padding streams out, which costs space).
    pub fn gc_low_chunks(&self) -> u32 {
        let user_streams = if self.cfg.hot_cold { 2 } else { 1 };
        self.reserve_chunks() + self.lay.pus * self.cfg.gc_free_lines * user_streams
    }

    // ---- lines ----

    /// The free chunk each PU would give a new line of `stream`.
    fn candidates(&self, stream: usize) -> Vec<u32> {
        let num_chk = self.lay.geo.num_chk;
        let mut out = Vec::new();
        for pu in 0..self.lay.pus {
            let free = (0..num_chk).map(|k| self.lay.chunk_on(pu, k)).filter(|&c| {
                let ci = &self.chunks[c as usize];
                ci.line.is_none() && !ci.bad
            });
            // Hot data goes to the least worn chunks; old data rests on the most worn ones.
            let pick = if stream == GC_OLD {
                free.max_by_key(|&c| (self.chunks[c as usize].wear, std::cmp::Reverse(c)))
            } else {
                free.min_by_key(|&c| (self.chunks[c as usize].wear, c))
            };
            out.extend(pick);
        }
        out
    }

    /// Opens a new line for `stream`; user lines must leave the GC reserve untouched.
    fn open_line(&mut self, stream: usize) -> Result<u32> {
        let members = self.candidates(stream);
        if members.is_empty() {
            return Err(FtlError::NoSpace("no free chunk left".into()));
        }
        if stream < GC && self.cfg.hot_cold && self.free < self.reserve_chunks() + members.len() as u32 {
            return Err(FtlError::NoSpace("only the garbage-collection reserve is free".into()));
        }
        let gen = self.next_gen;
        if gen > MAX_GEN {
            return Err(FtlError::Exhausted("line generations"));
        }
        self.next_gen = gen + 1;
        for &c in &members {
            let ci = &mut self.chunks[c as usize];
            ci.line = Some(gen);
            ci.wp = 0;
            ci.released = 0;
            ci.touched = false;
        }
        self.free -= members.len() as u32;
        self.update_free_metric();
        let n = members.len();
        self.lines.insert(
            gen,
            Line {
                gen,
                members,
                stream,
                state: LineState::Open,
                pos: 0,
                alloc: vec![0; n],
                valid: 0,
                heat: Heat::new(self.next_seq),
                needs: Vec::new(),
            },
        );
        self.open[stream] = Some(gen);
        self.lines_since_ckpt += 1;
        self.opens_since_wl += 1;
        tracing::debug!(gen, stream, members = ?self.lines.get(&gen).map(|l| &l.members), free = self.free, "line opened");
        self.check_wear();
        Ok(gen)
    }

    /// Hands out the next slot of `stream`'s line, opening one if needed.
    fn alloc(&mut self, stream: usize) -> Result<u32> {
        let gen = match self.open[stream] {
            Some(g) if self.lines.get(&g).is_some_and(|l| l.state == LineState::Open) => g,
            _ => self.open_line(stream)?,
        };
        let lay = &self.lay;
        let Some(line) = self.lines.get_mut(&gen) else {
            return Err(FtlError::NoSpace("line vanished".into()));
        };
        let (m, off) = line.place(lay, line.pos);
        line.pos += 1;
        line.alloc[m] = off + 1;
        let slot = lay.slot(line.members[m], off);
        if line.pos == line.capacity(lay) {
            line.state = LineState::Full;
            self.open[stream] = None;
        }
        Ok(slot)
    }

    /// The user stream for a write of `lba`, about to replace its current version.
    pub fn user_stream(&mut self, lba: u32) -> usize {
        let prev = self.map.get(lba);
        self.streams.user_stream(lba, prev, self.next_seq)
    }

    /// Stores `data` as the newest version `seq` of `lba` in `stream`.
    pub fn append(&mut self, stream: usize, lba: u32, seq: u64, data: Box<[u8]>) -> Result<()> {
        let stream = if self.cfg.hot_cold { stream } else { USER };
        let slot = self.alloc(stream)?;
        self.cache.insert(slot, Cached { data, lba, seq });
        self.remap(lba, Entry { slot, seq });
        Ok(())
    }

    /// Pads the open line of `stream` to a `ws_min` boundary so that all it holds can be written.
    fn pad(&mut self, stream: usize) {
        let Some(gen) = self.open[stream] else { return };
        let lay = &self.lay;
        let Some(line) = self.lines.get_mut(&gen) else { return };
        let mut pads = 0;
        while line.state == LineState::Open && line.pos % lay.min_slots != 0 {
            let (m, off) = line.place(lay, line.pos);
            line.pos += 1;
            line.alloc[m] = off + 1;
            self.p2l[lay.slot(line.members[m], off) as usize] = PAD_LBA;
            pads += 1;
            if line.pos == line.capacity(lay) {
                line.state = LineState::Full;
                self.open[stream] = None;
            }
        }
        Metrics::add(&self.metrics.pad_slots, pads);
    }

    /// Writes what is ready: full stripes, or (for `force` streams) everything, padded.
    pub async fn submit(&mut self, force: &[usize]) -> Result<()> {
        let force: Vec<usize> = if self.cfg.hot_cold {
            force.to_vec()
        } else if force.is_empty() {
            vec![]
        } else {
            vec![USER]
        };
        for &s in &force {
            if s < self.open.len() {
                self.pad(s);
            }
        }
        // (line, chunk, from, to) per member with something to write.
        let mut work: Vec<(u32, u32, u32, u32)> = Vec::new();
        for line in self.lines.values() {
            let all = match line.state {
                LineState::Full => true,
                LineState::Open => force.contains(&line.stream),
                _ => continue,
            };
            // Without force, whole stripes only: one unit on every member at once, so that a
            // stripe's programs run on all PUs in parallel.
            let stripes = line.pos / (self.lay.unit * line.members.len() as u32);
            for (m, &c) in line.members.iter().enumerate() {
                let from = self.chunks[c as usize].wp;
                let to = if all { line.alloc[m] } else { stripes * self.lay.unit };
                if to > from {
                    work.push((line.gen, c, from, to));
                }
            }
        }
        // Waves: the k-th command of every chunk go together; one chunk's commands in order.
        let max = self.lay.max_cmd_slots;
        let mut wave = 0u32;
        loop {
            let mut pieces = Vec::new();
            for &(gen, c, from, to) in &work {
                let start = from + wave * max;
                if start < to && self.lines.get(&gen).is_some_and(|l| l.state != LineState::Aborted) {
                    pieces.push((gen, c, start, (to - start).min(max)));
                }
            }
            if pieces.is_empty() {
                break;
            }
            let cmds = pieces.iter().map(|&(gen, c, off, n)| self.write_cmd(gen, c, off, n)).collect();
            let done = self.flash.run(cmds).await?;
            let mut transient = None;
            for (&(gen, c, off, n), d) in pieces.iter().zip(done) {
                let st = d.cqe.status;
                if st.is_success() {
                    self.written(c, off + n);
                } else if unchanged(st) {
                    // Nothing happened on the device: the same blocks are written again later.
                    transient = Some(st);
                } else {
                    let first_bad = (0..64).find(|&i| d.failed(i)).unwrap_or(0) as u32;
                    self.written(c, off + first_bad / self.lay.spl);
                    self.chunks[c as usize].touched = true;
                    self.abort(gen, c, st).await?;
                }
            }
            if let Some(st) = transient {
                self.close_written_lines();
                return Err(device_err(opcode::VECTOR_WRITE, st));
            }
            wave += 1;
        }
        self.close_written_lines();
        Ok(())
    }

    /// Marks every full line whose slots are all on the device closed.
    fn close_written_lines(&mut self) {
        let spc = self.lay.spc;
        for line in self.lines.values_mut() {
            if line.state == LineState::Full && line.members.iter().all(|&c| self.chunks[c as usize].wp == spc) {
                line.state = LineState::Closed;
            }
        }
    }

    fn write_cmd(&self, gen: u32, chunk: u32, off: u32, n: u32) -> Cmd {
        let oob_slot = self.lay.oob_per_slot();
        let mut data = vec![0u8; n as usize * LBA_BYTES];
        let mut oob = vec![0u8; n as usize * oob_slot];
        for k in 0..n as usize {
            let slot = self.lay.slot(chunk, off + k as u32);
            let o = match self.cache.get(&slot) {
                Some(c) => {
                    data[k * LBA_BYTES..(k + 1) * LBA_BYTES].copy_from_slice(&c.data);
                    Oob { lba: c.lba, gen, seq: c.seq }
                }
                None => Oob { lba: PAD_LBA, gen, seq: 0 },
            };
            o.encode(&mut oob[k * oob_slot..k * oob_slot + OOB_BYTES]);
        }
        Cmd::write(self.lay.ppas(chunk, off, n), data, oob)
    }

    /// Records that `chunk` is written up to slot `wp` and drops what the device can now return.
    fn written(&mut self, chunk: u32, wp: u32) {
        let spc = self.lay.spc;
        let spl = self.lay.spl;
        let ci = &mut self.chunks[chunk as usize];
        ci.touched |= wp > 0;
        ci.wp = ci.wp.max(wp);
        let readable = self.lay.readable_slots(ci.wp * spl, ci.wp < spc);
        let from = ci.released;
        if readable > from {
            ci.released = readable;
            for off in from..readable {
                self.cache.remove(&(chunk * spc + off));
            }
        }
    }

    /// A write to `chunk` of line `gen` failed: the line takes no more writes, what it holds is
    /// relocated, and a chunk the media failed is retired.
    async fn abort(&mut self, gen: u32, chunk: u32, status: Status) -> Result<()> {
        tracing::warn!(gen, chunk, %status, "write failed; the line is retired");
        self.notices.needed();
        if let Some(line) = self.lines.get_mut(&gen) {
            if line.state != LineState::Aborted {
                line.state = LineState::Aborted;
                if self.open.get(line.stream).copied().flatten() == Some(gen) {
                    self.open[line.stream] = None;
                }
                self.urgent.push_back(gen);
            }
        }
        if matches!(status, Status::WRITE_FAIL | Status::CHUNK_EARLY_CLOSE | Status::OFFLINE_CHUNK) {
            self.retire_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Marks a chunk bad, durably, so that it is never used again.
    pub async fn retire_chunk(&mut self, chunk: u32) -> Result<()> {
        let Some(ci) = self.chunks.get_mut(chunk as usize) else { return Ok(()) };
        if ci.bad {
            return Ok(());
        }
        ci.bad = true;
        if ci.line.is_none() {
            self.free = self.free.saturating_sub(1);
            self.update_free_metric();
        }
        Metrics::add(&self.metrics.bad_chunks, 1);
        tracing::warn!(chunk, "chunk retired");
        self.records.save_bad(chunk).await
    }

    // ---- reads ----

    /// Reads slots from the cache or the device: per slot its data, or the status it failed
    /// with. Lines whose blocks warn of high ECC are queued for refresh.
    pub async fn read_slots(&mut self, slots: &[u32]) -> Result<Vec<std::result::Result<Vec<u8>, Status>>> {
        let mut out: Vec<std::result::Result<Vec<u8>, Status>> = vec![Err(Status::SUCCESS); slots.len()];
        let mut dev: Vec<(usize, u32)> = Vec::new();
        for (i, &slot) in slots.iter().enumerate() {
            match self.cache.get(&slot) {
                Some(c) => out[i] = Ok(c.data.to_vec()),
                None => dev.push((i, slot)),
            }
        }
        let per = self.lay.max_cmd_slots.max(1) as usize;
        let spl = self.lay.spl as usize;
        let cmds: Vec<Cmd> = dev
            .chunks(per)
            .map(|group| {
                let addrs = group
                    .iter()
                    .flat_map(|&(_, s)| self.lay.ppas(self.lay.chunk_of(s), self.lay.offset_of(s), 1))
                    .collect();
                Cmd::read(addrs)
            })
            .collect();
        let done = self.flash.run(cmds).await?;
        let mut refresh = Vec::new();
        let mut retry = Vec::new();
        for (group, d) in dev.chunks(per).zip(&done) {
            for (k, &(i, slot)) in group.iter().enumerate() {
                let bad = (k * spl..(k + 1) * spl).any(|a| d.failed(a));
                if !bad || d.cqe.status.data_valid() {
                    out[i] = Ok(d.data[k * LBA_BYTES..(k + 1) * LBA_BYTES].to_vec());
                    if bad {
                        refresh.push(slot);
                    }
                } else {
                    retry.push((i, slot));
                }
            }
        }
        // A command with a failure names only its first status: ask again one slot at a time.
        for (i, slot) in retry {
            let cmd = Cmd::read(self.lay.ppas(self.lay.chunk_of(slot), self.lay.offset_of(slot), 1));
            let d = self.flash.run(vec![cmd]).await?;
            let Some(d) = d.into_iter().next() else { continue };
            if d.cqe.status.data_valid() {
                if !d.cqe.status.is_success() {
                    refresh.push(slot);
                }
                out[i] = Ok(d.data);
            } else {
                if d.cqe.status == Status::INTERNAL_ERROR {
                    return Err(device_err(opcode::VECTOR_READ, d.cqe.status));
                }
                self.notices.needed();
                out[i] = Err(d.cqe.status);
            }
        }
        for slot in refresh {
            self.queue_refresh(slot);
        }
        Ok(out)
    }

    /// A read of `slot` warned of high ECC: its line is queued for relocation.
    pub fn queue_refresh(&mut self, slot: u32) {
        if let Some(gen) = self.chunks.get(self.lay.chunk_of(slot) as usize).and_then(|c| c.line) {
            if !self.urgent.contains(&gen) {
                tracing::info!(gen, slot, "high ECC warning; line queued for refresh");
                self.urgent.push_back(gen);
            }
        }
    }

    /// The contents of logical blocks `first..first + n`.
    pub async fn read_lbas(&mut self, first: u32, n: u32) -> Result<Vec<u8>> {
        let mut out = vec![0u8; n as usize * LBA_BYTES];
        let mut want = Vec::new();
        for k in 0..n {
            let lba = first + k;
            if self.lost.contains(&lba) {
                return Err(FtlError::Lost { lba, slot: NO_SLOT, status: Status::OFFLINE_CHUNK });
            }
            let e = self.map.get(lba);
            if e.is_mapped() {
                want.push((k, e.slot));
            }
        }
        let slots: Vec<u32> = want.iter().map(|&(_, s)| s).collect();
        let got = self.read_slots(&slots).await?;
        for (&(k, slot), r) in want.iter().zip(got) {
            match r {
                Ok(d) => out[k as usize * LBA_BYTES..(k as usize + 1) * LBA_BYTES].copy_from_slice(&d),
                Err(status) => return Err(FtlError::Lost { lba: first + k, slot, status }),
            }
        }
        Ok(out)
    }

    // ---- durability ----

    /// Writes everything accepted (padded), relocates lines whose writes failed, and flushes
    /// the device: afterwards every mapped block is durable.
    pub async fn sync_all(&mut self) -> Result<()> {
        let all: Vec<usize> = (0..self.open.len()).collect();
        self.sync(&all).await
    }

    /// As [`Engine::sync_all`], forcing only the given streams' open lines (full lines are
    /// always written).
    pub async fn sync(&mut self, streams: &[usize]) -> Result<()> {
        let mut streams = streams.to_vec();
        for _round in 0..8 {
            self.submit(&streams).await?;
            if !self.lines.values().any(|l| l.state == LineState::Aborted) {
                self.device_flush().await?;
                return self.reset_drained(false).await;
            }
            self.relocate_aborted().await?;
            // What was relocated sits in the GC streams: write those out too.
            streams = (0..self.open.len()).collect();
        }
        Err(FtlError::Device { opcode: opcode::VECTOR_WRITE, status: Status::INTERNAL_ERROR })
    }

    pub async fn device_flush(&mut self) -> Result<()> {
        self.flash.flush().await
    }

    /// Resets chunks (in parallel); returns each one's status.
    pub async fn reset_chunks(&mut self, chunks: &[u32]) -> Result<Vec<Status>> {
        self.flash.reset(chunks).await
    }

    /// Unmaps logical blocks `first..first + n` as of a new sequence number.
    pub fn trim(&mut self, first: u32, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let seq = self.take_seq()?;
        for lba in first..first + n {
            self.remap(lba, Entry { slot: NO_SLOT, seq });
        }
        self.trims.push(Trim { seq, start: first, count: n });
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::tests::small;

    pub(crate) fn line(gen: u32, members: Vec<u32>) -> Line {
        let n = members.len();
        Line {
            gen,
            members,
            stream: USER,
            state: LineState::Closed,
            pos: 0,
            alloc: vec![0; n],
            valid: 0,
            heat: Heat::new(0),
            needs: Vec::new(),
        }
    }

    #[test]
    fn a_line_stripes_units_over_its_members() {
        let lay = Layout::new(&small()).unwrap(); // 4-slot units, 16 slots per chunk
        let l = line(1, vec![10, 20, 30]);
        assert_eq!(l.capacity(&lay), 48);
        let places: Vec<(usize, u32)> = [0, 3, 4, 8, 11, 12, 13, 47].iter().map(|&p| l.place(&lay, p)).collect();
        assert_eq!(places, vec![(0, 0), (0, 3), (1, 0), (2, 0), (2, 3), (0, 4), (0, 5), (2, 15)]);
    }

    #[test]
    fn sequence_numbers_and_generations_stop_at_their_bounds() {
        let (mut e, _d) = crate::gc::tests::engine(crate::config::VictimPolicy::Greedy);
        e.next_seq = MAX_SEQ;
        assert_eq!(e.take_seq().unwrap(), MAX_SEQ);
        assert!(matches!(e.take_seq(), Err(FtlError::Exhausted(_))));
        assert!(matches!(e.trim(0, 1), Err(FtlError::Exhausted(_))));
        assert_eq!(e.next_seq, MAX_SEQ + 1, "a refused number is not taken");
        e.free = e.lay.chunks;
        e.next_gen = MAX_GEN;
        assert_eq!(e.open_line(GC).unwrap(), MAX_GEN);
        assert!(matches!(e.open_line(GC_OLD), Err(FtlError::Exhausted(_))));
        assert_eq!(e.next_gen, MAX_GEN + 1);
    }
}
