//! Lines: the chunks of the partition, grouped one per PU into lines that are opened, written,
//! cleaned and reset together.
//!
//! Space is handed out in *lines*: one free chunk from each parallel unit, opened together and
//! written in stripes, [`Layout::unit`] slots on one member after the other, so consecutive
//! writes spread over every PU in `ws_opt` pieces. Each *stream* has one open line. With
//! `hot_cold` there are four: hot and cold user writes and hot and cold relocated data, chosen
//! by each block's inferred lifetime ([`crate::streams`]). A line is written in full, then
//! *closed*; GC cleans it, and its members are reset and return to the free pool.
//!
//! [`Lines`] owns the chunk table and the line table and keeps them in step: a chunk names the
//! line it is a member of exactly while that line exists, the free count is the number of good
//! chunks in no line (and the `free_chunks` gauge shows it), an open stream names a line of its
//! own, and a line's state only moves forward (open, full, closed; aborted or drained; reset).
//! The *urgent* queue (lines to clean before any other) and GC's current victim live here too,
//! because every change of a line's state touches them. A line's count of valid blocks is kept
//! by [`super::Blocks`] together with the valid bits it counts.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use crate::config::FtlConfig;
use crate::error::{FtlError, Result};
use crate::heat::{pooled_rates, Heat};
use crate::layout::{Layout, MAX_GEN};
use crate::metrics::Metrics;
use crate::streams::{GC, GC_OLD, USER};

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
    gen: u32,
    members: Vec<u32>,
    stream: usize,
    state: LineState,
    /// Slots handed out, in line order.
    pos: u32,
    /// Slots handed out per member.
    alloc: Vec<u32>,
    /// Valid slots.
    valid: u32,
    /// How fast its blocks die (for cost-benefit victims).
    heat: Heat,
    /// When drained: (chunk, its line's generation, write pointer) that must be reached on the
    /// device before this line may be reset.
    needs: Vec<(u32, u32, u32)>,
}

impl Line {
    fn new(gen: u32, members: Vec<u32>, stream: usize, state: LineState, heat: Heat) -> Line {
        let n = members.len();
        Line { gen, members, stream, state, pos: 0, alloc: vec![0; n], valid: 0, heat, needs: Vec::new() }
    }

    pub fn gen(&self) -> u32 {
        self.gen
    }

    /// Its chunks, one per PU.
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    pub fn stream(&self) -> usize {
        self.stream
    }

    pub fn state(&self) -> LineState {
        self.state
    }

    /// Slots handed out, in line order.
    pub fn pos(&self) -> u32 {
        self.pos
    }

    /// Slots handed out per member.
    pub fn alloc(&self) -> &[u32] {
        &self.alloc
    }

    /// Valid slots.
    pub fn valid(&self) -> u32 {
        self.valid
    }

    pub fn heat(&self) -> &Heat {
        &self.heat
    }

    /// When drained: what must be on the device before it may be reset.
    pub fn needs(&self) -> &[(u32, u32, u32)] {
        &self.needs
    }

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

    /// Hands out the next slot; the line is full after the last one.
    fn take_slot(&mut self, lay: &Layout) -> u32 {
        let (m, off) = self.place(lay, self.pos);
        self.pos += 1;
        self.alloc[m] = off + 1;
        if self.pos == self.capacity(lay) {
            self.state = LineState::Full;
        }
        lay.slot(self.members[m], off)
    }
}

/// What the FTL knows of one chunk.
#[derive(Clone, Debug, Default)]
pub struct ChunkInfo {
    /// The line it belongs to.
    line: Option<u32>,
    /// Retired: never used again.
    bad: bool,
    /// Resets it has been through.
    wear: u32,
    /// Slots written successfully.
    wp: u32,
    /// Slots below this are no longer in the write buffer.
    released: u32,
    /// A write was attempted, so the device has it open or closed.
    touched: bool,
}

impl ChunkInfo {
    /// The line it belongs to.
    pub fn line(&self) -> Option<u32> {
        self.line
    }

    /// Retired: never used again.
    pub fn bad(&self) -> bool {
        self.bad
    }

    /// Resets it has been through.
    pub fn wear(&self) -> u32 {
        self.wear
    }

    /// Slots written successfully.
    pub fn wp(&self) -> u32 {
        self.wp
    }

    /// A write was attempted, so the device has it open or closed.
    pub fn touched(&self) -> bool {
        self.touched
    }
}

/// The line GC is cleaning and how far it got.
#[derive(Clone, Copy, Debug)]
pub struct Victim {
    pub gen: u32,
    pub cursor: u32,
}

/// The chunk table, the lines, the open line of each stream, the urgent queue and GC's victim.
pub struct Lines {
    lay: Layout,
    hot_cold: bool,
    wear_spread: u32,
    metrics: Arc<Metrics>,
    lines: BTreeMap<u32, Line>,
    chunks: Vec<ChunkInfo>,
    open: Vec<Option<u32>>,
    /// Good chunks in no line.
    free: u32,
    next_gen: u32,
    /// Lines to relocate before any other: aborted, worn, failing, or moved for wear levelling.
    urgent: VecDeque<u32>,
    victim: Option<Victim>,
    opened_since_checkpoint: u32,
    opened_since_wear_check: u32,
}

impl Lines {
    /// No lines, every chunk free (until [`Lines::recount`] says otherwise).
    pub fn new(lay: Layout, cfg: &FtlConfig, metrics: Arc<Metrics>) -> Lines {
        Lines {
            chunks: vec![ChunkInfo::default(); lay.chunks as usize],
            lay,
            hot_cold: cfg.hot_cold,
            wear_spread: cfg.wear_spread,
            metrics,
            lines: BTreeMap::new(),
            open: vec![None; cfg.streams()],
            free: 0,
            next_gen: 1,
            urgent: VecDeque::new(),
            victim: None,
            opened_since_checkpoint: 0,
            opened_since_wear_check: 0,
        }
    }

    // ---- what is there ----

    pub fn lay(&self) -> &Layout {
        &self.lay
    }

    pub fn get(&self, gen: u32) -> Option<&Line> {
        self.lines.get(&gen)
    }

    pub fn contains(&self, gen: u32) -> bool {
        self.lines.contains_key(&gen)
    }

    /// Every line, oldest generation first.
    pub fn iter(&self) -> impl Iterator<Item = &Line> + '_ {
        self.lines.values()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn chunk(&self, c: u32) -> &ChunkInfo {
        &self.chunks[c as usize]
    }

    /// Every chunk, in chunk-index order.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    /// Good chunks in no line.
    pub fn free(&self) -> u32 {
        self.free
    }

    pub fn next_gen(&self) -> u32 {
        self.next_gen
    }

    /// The number of streams.
    pub fn streams(&self) -> usize {
        self.open.len()
    }

    /// The line `stream` is filling, if it is still open.
    pub fn open_line(&self, stream: usize) -> Option<u32> {
        self.open[stream].filter(|g| self.lines.get(g).is_some_and(|l| l.state == LineState::Open))
    }

    /// The line the chunk of `slot` belongs to.
    fn line_of_slot(&mut self, slot: u32) -> Option<&mut Line> {
        let gen = self.chunks.get(self.lay.chunk_of(slot) as usize)?.line?;
        self.lines.get_mut(&gen)
    }

    /// Chunks kept free for garbage collection alone: a line for each GC stream.
    pub fn reserve_chunks(&self) -> u32 {
        self.lay.pus * if self.hot_cold { 2 } else { 1 }
    }

    /// Lines opened since the last checkpoint.
    pub fn opened_since_checkpoint(&self) -> u32 {
        self.opened_since_checkpoint
    }

    /// Each stream's update frequency, pooled over its lines (see [`pooled_rates`]).
    pub fn stream_rates(&self, now: u64) -> Vec<f64> {
        pooled_rates(self.lines.values().map(|l| (l.stream, &l.heat, l.valid)), self.open.len(), now)
    }

    // ---- handing out slots (through `Blocks`, which records what each slot holds) ----

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

    /// Opens a new line for `stream` at sequence number `now`; user lines must leave the GC
    /// reserve untouched.
    fn open_new(&mut self, stream: usize, now: u64) -> Result<u32> {
        let members = self.candidates(stream);
        if members.is_empty() {
            return Err(FtlError::NoSpace("no free chunk left".into()));
        }
        if stream < GC && self.hot_cold && self.free < self.reserve_chunks() + members.len() as u32 {
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
        self.show_free();
        self.lines.insert(gen, Line::new(gen, members, stream, LineState::Open, Heat::new(now)));
        self.open[stream] = Some(gen);
        self.opened_since_checkpoint += 1;
        self.opened_since_wear_check += 1;
        tracing::debug!(gen, stream, members = ?self.lines.get(&gen).map(|l| &l.members), free = self.free, "line opened");
        self.check_wear();
        Ok(gen)
    }

    /// Hands out the next slot of `stream`'s line (opening one if needed, at sequence number
    /// `now`). The caller records what the slot holds.
    pub(super) fn take_slot(&mut self, stream: usize, now: u64) -> Result<u32> {
        let stream = if self.hot_cold { stream } else { USER };
        let gen = match self.open_line(stream) {
            Some(g) => g,
            None => self.open_new(stream, now)?,
        };
        let lay = &self.lay;
        let Some(line) = self.lines.get_mut(&gen) else {
            return Err(FtlError::NoSpace("line vanished".into()));
        };
        let slot = line.take_slot(lay);
        if line.state == LineState::Full {
            self.open[stream] = None;
        }
        Ok(slot)
    }

    /// Pads the open line of `stream` to a `ws_min` boundary so that all it holds can be
    /// written; `pad` is told each padding slot.
    pub(super) fn pad(&mut self, stream: usize, mut pad: impl FnMut(u32)) {
        let Some(gen) = self.open[stream] else { return };
        let lay = &self.lay;
        let Some(line) = self.lines.get_mut(&gen) else { return };
        let mut pads = 0;
        while line.state == LineState::Open && line.pos % lay.min_slots != 0 {
            pad(line.take_slot(lay));
            pads += 1;
            if line.state == LineState::Full {
                self.open[stream] = None;
            }
        }
        Metrics::add(&self.metrics.pad_slots, pads);
    }

    // ---- valid counts (through `Blocks`, with the valid bits) ----

    /// The slot became valid at sequence number `now`.
    pub(super) fn count_valid(&mut self, slot: u32, now: u64) {
        if let Some(l) = self.line_of_slot(slot) {
            l.heat.expose(l.valid, now);
            l.valid += 1;
        }
    }

    /// The slot is no longer valid, at sequence number `now`.
    pub(super) fn count_invalid(&mut self, slot: u32, now: u64) {
        if let Some(l) = self.line_of_slot(slot) {
            l.heat.expose(l.valid, now);
            l.valid = l.valid.saturating_sub(1);
        }
    }

    /// The valid block in `slot` died (was overwritten or trimmed) at sequence number `now`.
    pub(super) fn count_death(&mut self, slot: u32, now: u64) {
        if let Some(l) = self.line_of_slot(slot) {
            l.heat.death(now);
        }
    }

    // ---- writing ----

    /// Records that `chunk` is written up to slot `wp`; returns the slots of the chunk the
    /// device can return from now on (to drop from the write buffer).
    pub(super) fn written(&mut self, chunk: u32, wp: u32) -> Range<u32> {
        let spc = self.lay.spc;
        let spl = self.lay.spl;
        let ci = &mut self.chunks[chunk as usize];
        ci.touched |= wp > 0;
        ci.wp = ci.wp.max(wp);
        let readable = self.lay.readable_slots(ci.wp * spl, ci.wp < spc);
        let from = ci.released;
        if readable > from {
            ci.released = readable;
            return chunk * spc + from..chunk * spc + readable;
        }
        0..0
    }

    /// A write to the chunk was attempted (it failed part way).
    pub fn touched(&mut self, chunk: u32) {
        self.chunks[chunk as usize].touched = true;
    }

    /// Marks every full line whose slots are all on the device closed.
    pub fn close_written(&mut self) {
        let spc = self.lay.spc;
        for line in self.lines.values_mut() {
            if line.state == LineState::Full && line.members.iter().all(|&c| self.chunks[c as usize].wp == spc) {
                line.state = LineState::Closed;
            }
        }
    }

    /// A write to line `gen` failed: it takes no more writes and is queued for relocation.
    pub fn fail(&mut self, gen: u32) {
        if let Some(line) = self.lines.get_mut(&gen) {
            if line.state != LineState::Aborted {
                line.state = LineState::Aborted;
                if self.open.get(line.stream).copied().flatten() == Some(gen) {
                    self.open[line.stream] = None;
                }
                self.urgent.push_back(gen);
            }
        }
    }

    /// The FTL stops: the lines still open take no more writes (their streams open new lines,
    /// which the next recovery scans) and are relocated when the FTL next cleans. Returns them.
    pub fn stop_open_lines(&mut self) -> Vec<u32> {
        let open: Vec<u32> = (0..self.open.len()).filter_map(|s| self.open_line(s)).collect();
        for &gen in &open {
            self.fail(gen);
        }
        open
    }

    /// Whether a line holds blocks that are only in the write buffer.
    pub fn unwritten(&self, line: &Line) -> bool {
        line.members.iter().zip(&line.alloc).any(|(&c, &a)| a > self.chunks[c as usize].wp)
    }

    // ---- cleaning ----

    pub fn victim(&self) -> Option<Victim> {
        self.victim
    }

    pub fn set_victim(&mut self, v: Option<Victim>) {
        self.victim = v;
    }

    pub fn has_urgent(&self) -> bool {
        !self.urgent.is_empty()
    }

    pub fn first_urgent(&self) -> Option<u32> {
        self.urgent.front().copied()
    }

    pub fn is_urgent(&self, gen: u32) -> bool {
        self.urgent.contains(&gen)
    }

    pub fn urgent_len(&self) -> usize {
        self.urgent.len()
    }

    /// Queues a line for relocation (refresh, an offline chunk), unless it is queued already.
    pub fn queue_urgent(&mut self, gen: u32) {
        if !self.urgent.contains(&gen) {
            self.urgent.push_back(gen);
        }
    }

    /// Puts a line back at the head of the queue (a victim set aside for another).
    pub fn requeue_first(&mut self, gen: u32) {
        if self.lines.contains_key(&gen) && !self.urgent.contains(&gen) {
            self.urgent.push_front(gen);
        }
    }

    /// Takes a line off the queue.
    pub fn unqueue(&mut self, gen: u32) {
        self.urgent.retain(|&g| g != gen);
    }

    /// Drops the head of the queue (a line that is gone).
    pub fn drop_first_urgent(&mut self) {
        self.urgent.pop_front();
    }

    /// The next queued line that can be cleaned; a line still being written is aborted first.
    pub fn next_urgent(&mut self) -> Option<u32> {
        while let Some(gen) = self.urgent.pop_front() {
            match self.lines.get(&gen).map(|l| l.state) {
                Some(LineState::Closed | LineState::Aborted) => return Some(gen),
                // A line still being written is retired by aborting it.
                Some(LineState::Open | LineState::Full) => {
                    if let Some(l) = self.lines.get_mut(&gen) {
                        l.state = LineState::Aborted;
                        let stream = l.stream;
                        if self.open.get(stream).copied().flatten() == Some(gen) {
                            self.open[stream] = None;
                        }
                    }
                    return Some(gen);
                }
                Some(LineState::Drained) | None => {}
            }
        }
        None
    }

    /// The victim holds no valid block: it is drained, waiting for `needs` before its reset.
    pub fn drain(&mut self, gen: u32, needs: Vec<(u32, u32, u32)>) {
        if let Some(line) = self.lines.get_mut(&gen) {
            line.state = LineState::Drained;
            line.needs = needs;
        }
        for s in self.open.iter_mut() {
            if *s == Some(gen) {
                *s = None;
            }
        }
        self.urgent.retain(|&g| g != gen);
    }

    /// The chunk was reset: one more wear, nothing attempted on it since.
    pub fn reset_done(&mut self, c: u32) {
        let ci = &mut self.chunks[c as usize];
        ci.wear += 1;
        ci.touched = false;
        let wear = ci.wear;
        Metrics::add(&self.metrics.erases, 1);
        self.metrics.wear_max.fetch_max(u64::from(wear), std::sync::atomic::Ordering::Relaxed);
    }

    /// The chunk needs no reset (it was never written) or could not be reset.
    pub fn untouched(&mut self, c: u32) {
        self.chunks[c as usize].touched = false;
    }

    /// Removes a reset line (through `Blocks`, which clears its slots first); its good chunks
    /// are free again.
    pub(super) fn remove(&mut self, gen: u32) -> Option<Line> {
        let line = self.lines.remove(&gen)?;
        for &c in &line.members {
            let ci = &mut self.chunks[c as usize];
            ci.line = None;
            ci.wp = 0;
            ci.released = 0;
            if !ci.bad {
                self.free += 1;
            }
        }
        self.show_free();
        Some(line)
    }

    /// Retires a chunk: it is never used again. False when it is retired already (or no chunk).
    pub fn retire(&mut self, chunk: u32) -> bool {
        let Some(ci) = self.chunks.get_mut(chunk as usize) else { return false };
        if ci.bad {
            return false;
        }
        ci.bad = true;
        if ci.line.is_none() {
            self.free = self.free.saturating_sub(1);
            self.show_free();
        }
        Metrics::add(&self.metrics.bad_chunks, 1);
        true
    }

    // ---- wear levelling ----

    /// Static wear levelling: queue the closed line on the least worn chunks when wear has
    /// spread too far.
    fn check_wear(&mut self) {
        if self.opened_since_wear_check < 4 {
            return;
        }
        let good = self.chunks.iter().filter(|c| !c.bad);
        let (Some(min), Some(max)) = (good.clone().map(|c| c.wear).min(), good.map(|c| c.wear).max()) else {
            return;
        };
        if max - min <= self.wear_spread {
            return;
        }
        self.opened_since_wear_check = 0;
        let coldest = self
            .lines
            .values()
            .filter(|l| l.state == LineState::Closed && !self.urgent.contains(&l.gen))
            .min_by_key(|l| (l.members.iter().map(|&c| self.chunks[c as usize].wear).min().unwrap_or(0), l.gen));
        if let Some(l) = coldest {
            let lw = l.members.iter().map(|&c| self.chunks[c as usize].wear).min().unwrap_or(0);
            if max - lw > self.wear_spread {
                tracing::info!(gen = l.gen, wear = lw, max, "wear levelling moves a cold line");
                self.urgent.push_back(l.gen);
                Metrics::add(&self.metrics.wl_migrations, 1);
            }
        }
    }

    // ---- checkpoints, format and recovery ----

    /// A checkpoint was taken.
    pub fn checkpointed(&mut self) {
        self.opened_since_checkpoint = 0;
    }

    /// A chunk found offline or failing at format or recovery, or retired by a record (which
    /// may name a chunk the partition does not have).
    pub fn mark_bad(&mut self, c: u32) {
        if let Some(ci) = self.chunks.get_mut(c as usize) {
            ci.bad = true;
        }
    }

    /// A chunk's wear, as the device or the last checkpoint says.
    pub fn set_wear(&mut self, c: u32, wear: u32) {
        let old = std::mem::replace(&mut self.chunks[c as usize].wear, wear);
        // Wear only grows; what a format or recovery learns replaces the zero it started from.
        Metrics::add(&self.metrics.erases, u64::from(wear.saturating_sub(old)));
        self.metrics.wear_max.fetch_max(u64::from(wear), std::sync::atomic::Ordering::Relaxed);
    }

    /// Recovery found line `gen` on `members`, each readable up to `readable[c]` slots. A line
    /// that was still open is aborted and queued for relocation: it is never written again.
    pub fn add_recovered(&mut self, gen: u32, members: Vec<u32>, open: bool, readable: &[u32], born: u64) {
        let spc = self.lay.spc;
        for &c in &members {
            let ci = &mut self.chunks[c as usize];
            ci.line = Some(gen);
            ci.wp = readable[c as usize];
            ci.released = spc;
            ci.touched = true;
        }
        let n = members.len();
        let state = if open { LineState::Aborted } else { LineState::Closed };
        let mut line = Line::new(gen, members, USER, state, Heat::new(born));
        line.pos = n as u32 * spc;
        line.alloc = line.members.iter().map(|&c| readable[c as usize]).collect();
        self.lines.insert(gen, line);
        if open {
            self.urgent.push_back(gen);
        }
    }

    /// Line generations from now on are at least `gen`.
    pub fn restore_next_gen(&mut self, gen: u32) {
        self.next_gen = self.next_gen.max(gen);
    }

    /// Shows the free count in the `free_chunks` and `free_lines` gauges.
    fn show_free(&self) {
        Metrics::set(&self.metrics.free_chunks, u64::from(self.free));
        Metrics::set(&self.metrics.free_lines, u64::from(self.free / self.lay.pus.max(1)));
    }

    /// Counts the free chunks anew, after format or recovery decided which are bad.
    pub fn recount(&mut self) {
        self.free = self.chunks.iter().filter(|c| !c.bad && c.line.is_none()).count() as u32;
        self.show_free();
        Metrics::set(&self.metrics.bad_chunks, self.chunks.iter().filter(|c| c.bad).count() as u64);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::tests::small;

    /// A closed line of `members` with nothing valid, opened at sequence number 0.
    pub(crate) fn line(gen: u32, members: Vec<u32>) -> Line {
        Line::new(gen, members, USER, LineState::Closed, Heat::new(0))
    }

    impl Line {
        pub(crate) fn set_stream(&mut self, stream: usize) {
            self.stream = stream;
        }

        pub(crate) fn set_state(&mut self, state: LineState) {
            self.state = state;
        }

        pub(crate) fn set_valid(&mut self, valid: u32) {
            self.valid = valid;
        }

        pub(crate) fn set_heat(&mut self, heat: Heat) {
            self.heat = heat;
        }

        pub(crate) fn heat_mut(&mut self) -> &mut Heat {
            &mut self.heat
        }

        pub(crate) fn set_needs(&mut self, needs: Vec<(u32, u32, u32)>) {
            self.needs = needs;
        }
    }

    impl Lines {
        /// Puts a line in the table as it is, its chunks made its members.
        pub(crate) fn insert(&mut self, line: Line) {
            for &c in &line.members {
                self.chunks[c as usize].line = Some(line.gen);
            }
            self.lines.insert(line.gen, line);
        }

        pub(crate) fn get_mut(&mut self, gen: u32) -> Option<&mut Line> {
            self.lines.get_mut(&gen)
        }

        pub(crate) fn set_wp(&mut self, c: u32, wp: u32) {
            self.chunks[c as usize].wp = wp;
        }

        pub(crate) fn set_free(&mut self, free: u32) {
            self.free = free;
        }

        pub(crate) fn set_next_gen(&mut self, gen: u32) {
            self.next_gen = gen;
        }

        pub(crate) fn open_new_line(&mut self, stream: usize) -> Result<u32> {
            self.open_new(stream, 0)
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
}
