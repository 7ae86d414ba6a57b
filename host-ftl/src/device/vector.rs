//! The I/O commands: flush, and vector reset, write, read and copy under the rules of
//! [`super`], with their media work booked on the timing model.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::MutexGuard;

use super::{Device, Loc, PuState};
use crate::address::{Addr, Ppa};
use crate::chunk::{ChunkMeta, ChunkState};
use crate::command::{opcode, Cqe, Sqe, Status, NSID};
use crate::dma::DmaRegion;
use crate::error::Result;
use crate::fault::FaultKind;
use crate::geometry::MAX_VECTOR;
use crate::media::MediaOp;
use crate::notify::{MASK_BLOCK, MASK_CHUNK, STATE_ERROR_HIGH, STATE_UNRECOVERABLE};
use crate::timing::OpKind;

/// Blocks (or chunks, for resets) a command had the media work on, per PU.
#[derive(Default)]
struct Work {
    reads: PerPu,
    programs: PerPu,
    resets: PerPu,
    /// A flush: done when the media has everything (see the timing model's write buffer).
    flush: bool,
}

/// Counts per PU. A command names few PUs, so a short list beats a map (and allocates nothing
/// until the first count).
#[derive(Default)]
struct PerPu(Vec<(usize, u32)>);

impl PerPu {
    fn add(&mut self, pu: usize, n: u32) {
        match self.0.iter_mut().find(|e| e.0 == pu) {
            Some(e) => e.1 += n,
            None => self.0.push((pu, n)),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A run of list entries `entries` going to (or coming from) consecutive blocks from `blk` of
/// chunk `chunk`.
struct Run {
    chunk: usize,
    blk: u32,
    entries: Range<usize>,
}

/// What a command changed, to persist it, or to undo it if the media fails.
#[derive(Default)]
struct Plan {
    /// Each touched chunk as it was before the command, with its PU.
    originals: BTreeMap<usize, (usize, ChunkMeta)>,
    /// Notifications to log once the media has done its part: address, state bits, mask.
    notes: Vec<(Ppa, u16, u8)>,
    /// Entries whose fate depends on the media batch.
    attempted: Vec<Range<usize>>,
}

impl Plan {
    fn touch(&mut self, loc: &Loc, meta: &ChunkMeta) {
        self.originals.entry(loc.chunk).or_insert_with(|| (loc.pu, meta.clone()));
    }
}

/// The PU locks a command holds, by PU index.
struct Locked<'a> {
    guards: Vec<(usize, MutexGuard<'a, PuState>)>,
}

impl Locked<'_> {
    fn pu(&mut self, pu: usize) -> Option<&mut PuState> {
        let i = self.guards.binary_search_by_key(&pu, |(p, _)| *p).ok()?;
        Some(&mut self.guards[i].1)
    }
}

fn fill(statuses: &mut [Status], range: Range<usize>, s: Status) {
    if let Some(slots) = statuses.get_mut(range) {
        slots.fill(s);
    }
}

/// The completion of a vector command from its per-address statuses.
fn complete(cid: u16, statuses: &[Status]) -> Cqe {
    let bitmap = statuses.iter().enumerate().filter(|(_, s)| !s.is_success()).fold(0u64, |b, (i, _)| b | 1 << i);
    let status = statuses
        .iter()
        .find(|s| !s.data_valid())
        .or_else(|| statuses.iter().find(|s| !s.is_success()))
        .copied()
        .unwrap_or(Status::SUCCESS);
    Cqe::new(cid, status, bitmap)
}

/// A command-level failure: every one of the `n` addresses failed.
fn fail_all(cid: u16, n: usize, s: Status) -> Cqe {
    let bitmap = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    Cqe::new(cid, s, bitmap)
}

fn is_vector(op: u8) -> bool {
    matches!(op, opcode::VECTOR_RESET | opcode::VECTOR_WRITE | opcode::VECTOR_READ | opcode::VECTOR_COPY)
}

/// Splits `buf` into the slots of `runs` (ascending, disjoint entry ranges), `unit` bytes per
/// entry.
fn carve<'b>(runs: &[Run], buf: &'b mut [u8], unit: usize) -> Vec<&'b mut [u8]> {
    let mut out = Vec::with_capacity(runs.len());
    let mut rest = buf;
    let mut at = 0;
    for r in runs {
        let skip = (r.entries.start.saturating_sub(at)) * unit;
        let Some((_, tail)) = rest.split_at_mut_checked(skip) else { break };
        let Some((this, next)) = tail.split_at_mut_checked(r.entries.len() * unit) else { break };
        out.push(this);
        rest = next;
        at = r.entries.end;
    }
    out
}

impl Device {
    /// Executes one I/O command (flush, vector reset/write/read/copy).
    pub fn execute(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        self.run_io(sqe, mem).0
    }

    /// Executes one I/O command issued at `now_ns` and returns when the media would have
    /// finished it under the timing model (see [`crate::timing`]). The device does not wait.
    pub fn execute_at(&self, sqe: &Sqe, mem: &DmaRegion, now_ns: u64) -> (Cqe, u64) {
        let (cqe, work) = self.run_io(sqe, mem);
        (cqe, self.book(&work, now_ns))
    }

    /// Books a command's media work on the timing model; returns when it is done.
    fn book(&self, work: &Work, now_ns: u64) -> u64 {
        let schedule = |ops: &PerPu, kind: OpKind, start: u64| {
            ops.0.iter().map(|&(pu, n)| self.timing.schedule(pu, kind, n, start)).max().unwrap_or(start)
        };
        if work.flush {
            return self.timing.flush_completes(now_ns);
        }
        let read_done = schedule(&work.reads, OpKind::Read, now_ns);
        // A copy programs after its reads; a write has no reads, so it starts at now and
        // completes when its data is in the write buffer.
        let mut program_done = schedule(&work.programs, OpKind::Program, read_done);
        if work.reads.is_empty() {
            program_done = self.timing.write_completes(program_done, now_ns);
        }
        let reset_done = schedule(&work.resets, OpKind::Reset, now_ns);
        read_done.max(program_done).max(reset_done)
    }

    /// Executes a vector command whose address lists the caller supplies instead of the region.
    ///
    /// This is for a driver that validates and translates a guest's addresses: the device then
    /// uses exactly the checked list, which the guest can no longer change. CDW10-11, CDW14-15
    /// and the count in CDW12 are ignored; `addrs` holds the 1 to 64 addresses (sources of a
    /// copy) and `dst` the copy's destinations (same length; empty for other commands). The
    /// data and OOB still move through `mem` at PRP1 and MPTR. A count out of range, or `dst`
    /// of another length for a copy, is an invalid field.
    pub fn execute_vector(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion) -> Cqe {
        self.run_vector(sqe, addrs, dst, mem).0
    }

    /// [`Device::execute_vector`] under the timing model, as [`Device::execute_at`].
    pub fn execute_vector_at(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion, now_ns: u64) -> (Cqe, u64) {
        let (cqe, work) = self.run_vector(sqe, addrs, dst, mem);
        (cqe, self.book(&work, now_ns))
    }

    /// Locks the PUs of `locs`, in PU order.
    fn lock_pus<'a>(&'a self, locs: impl IntoIterator<Item = &'a Option<Loc>>) -> Locked<'a> {
        let mut pus: Vec<usize> = locs.into_iter().flatten().map(|l| l.pu).collect();
        pus.sort_unstable();
        pus.dedup();
        Locked { guards: pus.into_iter().map(|p| (p, self.lock_pu(p))).collect() }
    }

    /// Decodes raw addresses; an undecodable one gets LBA out of range.
    fn locate_all(&self, raw: &[u64]) -> (Vec<Option<Loc>>, Vec<Status>) {
        let locs: Vec<Option<Loc>> =
            raw.iter().map(|&r| Addr::from_ppa(&self.geo, Ppa(r)).and_then(|a| self.locate_addr(a)).ok()).collect();
        let statuses =
            locs.iter().map(|l| if l.is_some() { Status::SUCCESS } else { Status::LBA_OUT_OF_RANGE }).collect();
        (locs, statuses)
    }

    /// The address list of a vector command: the field itself for one address, else `n`
    /// addresses read from the region.
    fn address_list(&self, mem: &DmaRegion, field: u64, n: usize) -> std::result::Result<Vec<u64>, Status> {
        if n == 1 {
            return Ok(vec![field]);
        }
        mem.read_u64s(field, n).map_err(|_| Status::DATA_TRANSFER_ERROR)
    }

    /// Copies of the touched chunks' records, to persist.
    fn saves(&self, locked: &mut Locked<'_>, plan: &Plan) -> Vec<(usize, ChunkMeta)> {
        let num_chk = self.geo.num_chk as usize;
        let mut out = Vec::new();
        for (&chunk, (pu, _)) in &plan.originals {
            if let Some(p) = locked.pu(*pu) {
                out.push((chunk, p.chunks[chunk % num_chk].clone()));
            }
        }
        out
    }

    /// Puts every touched chunk back as it was.
    fn rollback(&self, locked: &mut Locked<'_>, plan: &Plan) {
        let num_chk = self.geo.num_chk as usize;
        for (&chunk, (pu, orig)) in &plan.originals {
            if let Some(p) = locked.pu(*pu) {
                self.set_state(p, chunk % num_chk, orig.state);
                p.chunks[chunk % num_chk] = orig.clone();
            }
        }
    }

    fn submit(&self, ops: &mut [MediaOp<'_>]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.media.submit(ops).inspect_err(|e| tracing::warn!(error = %e, "media batch failed"))
    }

    fn log_notes(&self, plan: &mut Plan) {
        for (ppa, state, mask) in plan.notes.drain(..) {
            self.notes.push(ppa, state, mask, 0);
        }
    }

    fn run_io(&self, sqe: &Sqe, mem: &DmaRegion) -> (Cqe, Work) {
        let n = sqe.naddr();
        let done = |cqe| (cqe, Work::default());
        let lists = match sqe.opcode {
            opcode::FLUSH if sqe.nsid != NSID && sqe.nsid != u32::MAX => {
                return done(Cqe::new(sqe.cid, Status::INVALID_NAMESPACE, 0));
            }
            opcode::FLUSH => {
                let status = if self.media.flush().is_ok() { Status::SUCCESS } else { Status::INTERNAL_ERROR };
                return (Cqe::new(sqe.cid, status, 0), Work { flush: true, ..Work::default() });
            }
            op if !is_vector(op) => return done(Cqe::new(sqe.cid, Status::INVALID_OPCODE, 0)),
            _ if sqe.nsid != NSID => return done(fail_all(sqe.cid, n, Status::INVALID_NAMESPACE)),
            opcode::VECTOR_COPY => self
                .address_list(mem, sqe.lba_field(), n)
                .and_then(|src| Ok((src, self.address_list(mem, sqe.dst_field(), n)?))),
            _ => self.address_list(mem, sqe.lba_field(), n).map(|src| (src, Vec::new())),
        };
        match lists {
            Ok((src, dst)) => self.run_vector(sqe, &src, &dst, mem),
            Err(s) => done(fail_all(sqe.cid, n, s)),
        }
    }

    fn run_vector(&self, sqe: &Sqe, src: &[u64], dst: &[u64], mem: &DmaRegion) -> (Cqe, Work) {
        let mut work = Work::default();
        let n = src.len();
        if !is_vector(sqe.opcode) || (sqe.opcode == opcode::VECTOR_COPY && !self.geo.copy_supported()) {
            return (Cqe::new(sqe.cid, Status::INVALID_OPCODE, 0), work);
        }
        if sqe.nsid != NSID {
            return (fail_all(sqe.cid, n, Status::INVALID_NAMESPACE), work);
        }
        if n == 0 || n > MAX_VECTOR || (sqe.opcode == opcode::VECTOR_COPY && dst.len() != n) {
            return (fail_all(sqe.cid, n, Status::INVALID_FIELD), work);
        }
        let cqe = match sqe.opcode {
            opcode::VECTOR_RESET => self.reset(sqe, src, &mut work),
            opcode::VECTOR_WRITE => self.write(sqe, src, mem, &mut work),
            opcode::VECTOR_READ => self.read(sqe, src, mem, &mut work),
            _ => self.copy(sqe, src, dst, &mut work),
        };
        (cqe, work)
    }

    fn reset(&self, sqe: &Sqe, raw: &[u64], work: &mut Work) -> Cqe {
        let (locs, mut statuses) = self.locate_all(raw);
        let mut locked = self.lock_pus(&locs);
        let mut plan = Plan::default();
        let mut erased = Vec::new();
        for (i, loc) in locs.iter().enumerate() {
            let Some(loc) = loc else { continue };
            if loc.addr.blk != 0 {
                statuses[i] = Status::INVALID_FIELD;
                continue;
            }
            let Some(pu) = locked.pu(loc.pu) else { continue };
            let meta = &pu.chunks[loc.local];
            let refused = match meta.state {
                ChunkState::Offline => true,
                ChunkState::Free => !self.geo.multi_reset(),
                ChunkState::Open | ChunkState::Closed => false,
            };
            if refused || self.faults.fire(FaultKind::ResetFail, loc.addr) {
                statuses[i] = Status::INVALID_RESET;
                continue;
            }
            plan.touch(loc, meta);
            plan.attempted.push(i..i + 1);
            work.resets.add(loc.pu, 1);
            let meta = &mut pu.chunks[loc.local];
            meta.wear = meta.wear.saturating_add(1);
            meta.wp = 0;
            meta.failed_units.clear();
            if meta.wear > self.geo.endurance {
                self.set_state(pu, loc.local, ChunkState::Offline);
                statuses[i] = Status::OFFLINE_CHUNK;
                plan.notes.push((self.slba(*loc), STATE_UNRECOVERABLE, MASK_CHUNK));
            } else {
                self.set_state(pu, loc.local, ChunkState::Free);
            }
            erased.push(loc.chunk);
        }
        let saves = self.saves(&mut locked, &plan);
        let mut ops: Vec<MediaOp<'_>> = erased.iter().map(|&chunk| MediaOp::Erase { chunk }).collect();
        ops.extend(saves.iter().map(|(chunk, meta)| MediaOp::SaveChunk { chunk: *chunk, meta }));
        if self.submit(&mut ops).is_err() {
            self.rollback(&mut locked, &plan);
            plan.notes.clear();
            for r in plan.attempted.clone() {
                fill(&mut statuses, r, Status::INTERNAL_ERROR);
            }
        }
        drop(locked);
        self.log_notes(&mut plan);
        complete(sqe.cid, &statuses)
    }

    fn write(&self, sqe: &Sqe, raw: &[u64], mem: &DmaRegion, work: &mut Work) -> Cqe {
        let n = raw.len();
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let Ok(data) = mem.read_vec(sqe.prp1, n * bs) else {
            return fail_all(sqe.cid, n, Status::DATA_TRANSFER_ERROR);
        };
        let oob = if os == 0 { Ok(Vec::new()) } else { mem.read_vec(sqe.mptr, n * os) };
        let Ok(oob) = oob else { return fail_all(sqe.cid, n, Status::DATA_TRANSFER_ERROR) };
        let (locs, mut statuses) = self.locate_all(raw);
        let mut locked = self.lock_pus(&locs);
        let mut plan = Plan::default();
        let mut writes = Vec::new();
        for run in self.runs(&locs) {
            self.plan_write_run(&mut locked, &locs, run, &mut statuses, &mut plan, &mut writes, work);
        }
        self.finish_writes(sqe, &mut locked, &mut plan, &writes, &data, &oob, &mut statuses);
        complete(sqe.cid, &statuses)
    }

    fn read(&self, sqe: &Sqe, raw: &[u64], mem: &DmaRegion, work: &mut Work) -> Cqe {
        let n = raw.len();
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        if mem.check(sqe.prp1, n * bs).is_err() || (os > 0 && mem.check(sqe.mptr, n * os).is_err()) {
            return fail_all(sqe.cid, n, Status::DATA_TRANSFER_ERROR);
        }
        let (locs, mut statuses) = self.locate_all(raw);
        let mut data = vec![0u8; n * bs];
        let mut oob = vec![0u8; n * os];
        let mut locked = self.lock_pus(&locs);
        let mut plan = Plan::default();
        let reads = self.plan_reads(&mut locked, &locs, &mut statuses, &mut plan, work);
        self.do_reads(&reads, &mut data, &mut oob, &mut statuses, &mut plan);
        drop(locked);
        self.log_notes(&mut plan);
        if mem.write(sqe.prp1, &data).is_err() || (os > 0 && mem.write(sqe.mptr, &oob).is_err()) {
            return fail_all(sqe.cid, n, Status::DATA_TRANSFER_ERROR);
        }
        complete(sqe.cid, &statuses)
    }

    fn copy(&self, sqe: &Sqe, src: &[u64], dst: &[u64], work: &mut Work) -> Cqe {
        let n = src.len();
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let (src_locs, mut src_statuses) = self.locate_all(src);
        let (dst_locs, mut statuses) = self.locate_all(dst);
        let mut data = vec![0u8; n * bs];
        let mut oob = vec![0u8; n * os];
        let mut locked = self.lock_pus(src_locs.iter().chain(&dst_locs));
        let mut plan = Plan::default();
        let reads = self.plan_reads(&mut locked, &src_locs, &mut src_statuses, &mut plan, work);
        self.do_reads(&reads, &mut data, &mut oob, &mut src_statuses, &mut plan);
        self.log_notes(&mut plan);
        let mut writes = Vec::new();
        for run in self.runs(&dst_locs) {
            let entries = run.clone();
            if let Some(&s) = src_statuses[entries.clone()].iter().find(|s| !s.data_valid()) {
                fill(&mut statuses, entries, s);
                continue;
            }
            statuses[entries.clone()].copy_from_slice(&src_statuses[entries]);
            self.plan_write_run(&mut locked, &dst_locs, run, &mut statuses, &mut plan, &mut writes, work);
        }
        self.finish_writes(sqe, &mut locked, &mut plan, &writes, &data, &oob, &mut statuses);
        complete(sqe.cid, &statuses)
    }

    /// Splits valid addresses into runs: maximal stretches of list entries in one chunk at
    /// consecutive blocks.
    fn runs(&self, locs: &[Option<Loc>]) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (i, loc) in locs.iter().enumerate() {
            let Some(loc) = loc else { continue };
            if let Some(last) = runs.last_mut() {
                let prev = if last.end == i { locs[i - 1] } else { None };
                if prev.is_some_and(|p| p.chunk == loc.chunk && p.addr.blk.checked_add(1) == Some(loc.addr.blk)) {
                    last.end = i + 1;
                    continue;
                }
            }
            runs.push(i..i + 1);
        }
        runs
    }

    /// Checks one write run against its chunk and, if it may go ahead, updates the chunk and
    /// records the blocks to program in `writes`.
    #[allow(clippy::too_many_arguments)]
    fn plan_write_run(
        &self,
        locked: &mut Locked<'_>,
        locs: &[Option<Loc>],
        run: Range<usize>,
        statuses: &mut [Status],
        plan: &mut Plan,
        writes: &mut Vec<Run>,
        work: &mut Work,
    ) {
        let Some(first) = locs.get(run.start).copied().flatten() else { return };
        let Some(pu) = locked.pu(first.pu) else { return };
        let ws = self.geo.ws_min;
        let len = run.len() as u32;
        let l = first.local;
        let meta = &pu.chunks[l];
        let refused = match meta.state {
            ChunkState::Offline => Some(Status::OFFLINE_CHUNK),
            ChunkState::Closed => Some(Status::OUT_OF_ORDER_WRITE),
            _ if len % ws != 0 => Some(Status::INVALID_FIELD),
            _ if first.addr.blk != meta.wp => Some(Status::OUT_OF_ORDER_WRITE),
            _ => None,
        };
        if let Some(s) = refused {
            fill(statuses, run, s);
            return;
        }
        let before = meta.clone();
        if meta.state == ChunkState::Free && !self.try_open(pu, l) {
            fill(statuses, run, Status::TOO_MANY_OPEN_CHUNKS);
            return;
        }
        plan.touch(&first, &before);
        plan.attempted.push(run.clone());
        let mut written_end = run.start;
        for u in 0..len / ws {
            let e0 = run.start + (u * ws) as usize;
            let blk0 = first.addr.blk + u * ws;
            work.programs.add(first.pu, ws);
            let fault = (0..ws).find_map(|k| self.faults.fire_program(Addr { blk: blk0 + k, ..first.addr }));
            match fault {
                None => {
                    pu.chunks[l].wp += ws;
                    written_end = e0 + ws as usize;
                }
                Some(FaultKind::EarlyClose) => {
                    fill(statuses, e0..run.end, Status::CHUNK_EARLY_CLOSE);
                    self.set_state(pu, l, ChunkState::Closed);
                    break;
                }
                Some(_) => {
                    fill(statuses, e0..run.end, Status::WRITE_FAIL);
                    pu.chunks[l].fail_unit(blk0 / ws);
                    pu.chunks[l].wp += ws;
                    break;
                }
            }
        }
        if pu.chunks[l].wp >= self.geo.clba {
            self.set_state(pu, l, ChunkState::Closed);
        }
        if written_end > run.start {
            writes.push(Run { chunk: first.chunk, blk: first.addr.blk, entries: run.start..written_end });
        }
    }

    /// Programs the planned writes and persists the touched chunks in one media batch; undoes
    /// the plan if the media fails. Flushes afterwards for FUA.
    #[allow(clippy::too_many_arguments)]
    fn finish_writes(
        &self,
        sqe: &Sqe,
        locked: &mut Locked<'_>,
        plan: &mut Plan,
        writes: &[Run],
        data: &[u8],
        oob: &[u8],
        statuses: &mut [Status],
    ) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let saves = self.saves(locked, plan);
        let mut ops: Vec<MediaOp<'_>> = Vec::with_capacity(writes.len() + saves.len());
        for w in writes {
            let (Some(d), Some(o)) =
                (data.get(w.entries.start * bs..w.entries.end * bs), oob.get(w.entries.start * os..w.entries.end * os))
            else {
                continue;
            };
            ops.push(MediaOp::Write { chunk: w.chunk, blk: w.blk, data: d, oob: o });
        }
        ops.extend(saves.iter().map(|(chunk, meta)| MediaOp::SaveChunk { chunk: *chunk, meta }));
        let mut ok = self.submit(&mut ops).is_ok();
        if !ok {
            self.rollback(locked, plan);
        } else if sqe.fua() && !writes.is_empty() {
            ok = self.media.flush().is_ok();
        }
        if !ok {
            plan.notes.clear();
            for r in plan.attempted.drain(..) {
                fill(statuses, r, Status::INTERNAL_ERROR);
            }
        }
    }

    /// Checks each address for reading; returns the runs of readable blocks.
    fn plan_reads(
        &self,
        locked: &mut Locked<'_>,
        locs: &[Option<Loc>],
        statuses: &mut [Status],
        plan: &mut Plan,
        work: &mut Work,
    ) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for (i, loc) in locs.iter().enumerate() {
            let Some(loc) = loc else { continue };
            let Some(pu) = locked.pu(loc.pu) else { continue };
            let meta = &pu.chunks[loc.local];
            let blk = loc.addr.blk;
            let readable = match meta.state {
                ChunkState::Offline => {
                    statuses[i] = Status::OFFLINE_CHUNK;
                    continue;
                }
                ChunkState::Closed => blk < meta.wp,
                ChunkState::Open => meta.wp >= self.geo.mw_cunits && blk < meta.wp - self.geo.mw_cunits,
                ChunkState::Free => false,
            };
            if !readable || meta.unit_failed(blk / self.geo.ws_min) {
                statuses[i] = Status::UNWRITTEN;
                continue;
            }
            work.reads.add(loc.pu, 1);
            if self.faults.fire(FaultKind::HighEcc, loc.addr) {
                statuses[i] = Status::HIGH_ECC;
                let ppa = loc.addr.to_ppa(&self.geo).unwrap_or_default();
                plan.notes.push((ppa, STATE_ERROR_HIGH, MASK_BLOCK));
            }
            match runs.last_mut() {
                Some(r) if r.chunk == loc.chunk && r.entries.end == i && r.blk + r.entries.len() as u32 == blk => {
                    r.entries.end = i + 1;
                }
                _ => runs.push(Run { chunk: loc.chunk, blk, entries: i..i + 1 }),
            }
        }
        runs
    }

    /// Reads the planned runs into the bounce buffers; on a media error the runs' slots are
    /// zeroed and their addresses fail.
    fn do_reads(&self, runs: &[Run], data: &mut [u8], oob: &mut [u8], statuses: &mut [Status], plan: &mut Plan) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let data_slots = carve(runs, data, bs);
        let oob_slots = carve(runs, oob, os);
        let mut ops: Vec<MediaOp<'_>> = runs
            .iter()
            .zip(data_slots)
            .zip(oob_slots)
            .map(|((r, d), o)| MediaOp::Read { chunk: r.chunk, blk: r.blk, data: d, oob: o })
            .collect();
        let failed = self.submit(&mut ops).is_err();
        drop(ops);
        if failed {
            plan.notes.clear();
            for r in runs {
                fill(statuses, r.entries.clone(), Status::INTERNAL_ERROR);
                if let Some(d) = data.get_mut(r.entries.start * bs..r.entries.end * bs) {
                    d.fill(0);
                }
                if let Some(o) = oob.get_mut(r.entries.start * os..r.entries.end * os) {
                    o.fill(0);
                }
            }
        }
    }
}
