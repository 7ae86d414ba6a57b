//! An optional timing model: each parallel unit does one operation at a time, each operation
//! takes the geometry's typical time, and the PUs of a group share the group's channel for
//! their data transfers.
//!
//! Time is plain `u64` nanoseconds supplied by the caller, so the model runs the same on a
//! simulated clock (deterministic tests of fairness) as on a real one (sleep until `done_at`).
//! The device itself never sleeps.
//!
//! Costs ([`Costs`], which the host FTL driver predicts with too): reading or programming `n` blocks on a PU takes `ceil(n / ws_min)` times the typical
//! read or program time of a write unit; a reset takes the typical reset time per chunk. An
//! operation on a PU starts when the PU is free (at `now` or when its previous operation ends,
//! whichever is later).
//!
//! # Channels
//!
//! When the geometry gives a channel bandwidth (`channel_mb_s`), every block read or programmed
//! also crosses its group's channel, one block taking [`Geometry::transfer_ns`]. An operation
//! goes write unit by write unit, as a die does it: a read senses a unit (read time) and then
//! moves it out over the channel; a program moves a unit in over the channel and then programs
//! it. The PU stays busy while its unit waits for the channel. A transfer takes the first gap
//! on its channel, at or after the moment its data is ready, that is long enough for it: a
//! channel is a timeline of booked transfers, not a queue, so a transfer booked for later does
//! not hold up one that is ready now. Without a channel bandwidth the model is exactly the
//! per-PU one above.
//!
//! Booked transfers that end at or before a call's `now` are forgotten; callers give times that
//! do not go backwards (a call with an earlier `now` would not see the forgotten ones).
//!
//! # Read suspend
//!
//! With [`TimingModel::set_read_suspend`], a read does not queue behind the programs and resets
//! booked on its PU: it suspends them, as NAND dies with program/erase suspend do, and runs at
//! once; everything booked on the PU ends that much later. Off by default.
//!
//! # Write buffer
//!
//! With [`TimingModel::set_write_buffer`], each PU has a buffer in front of its media, as an
//! SSD's write cache is (OCSSD 2.0's `mw_cunits` exists because of it): a write completes once
//! its data is in the buffer, that is as soon as no more than the buffer's worth of programs is
//! left booked on its PU after it, and a flush completes when every PU has programmed all it
//! was given. Off (write-through) by default.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::geometry::Geometry;

/// The kinds of media operation the model times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Program,
    Reset,
}

/// What each media operation costs on an idle PU and channel: the one formula the device books
/// its operations with and the driver predicts them with (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Costs {
    read_ns: u64,
    program_ns: u64,
    reset_ns: u64,
    ws_min: u64,
    /// Nanoseconds per block on a channel; 0 when channels are not modelled.
    xfer_ns: u64,
    /// PUs per group: the PUs that share one channel.
    num_pu: usize,
}

impl Costs {
    /// The costs of the geometry's typical times and channel bandwidth.
    pub fn new(geo: &Geometry) -> Costs {
        Costs {
            read_ns: geo.read_ns.into(),
            program_ns: geo.program_ns.into(),
            reset_ns: geo.reset_ns.into(),
            ws_min: u64::from(geo.ws_min.max(1)),
            xfer_ns: geo.transfer_ns(),
            num_pu: usize::from(geo.num_pu.max(1)),
        }
    }

    /// How long the media part of an operation on `count` blocks (read, program) or chunks
    /// (reset) takes, channel transfers not included: whole write units for reads and
    /// programs.
    pub fn media(&self, op: OpKind, count: u64) -> u64 {
        match op {
            OpKind::Read => count.div_ceil(self.ws_min) * self.read_ns,
            OpKind::Program => count.div_ceil(self.ws_min) * self.program_ns,
            OpKind::Reset => count * self.reset_ns,
        }
    }

    /// How long `blocks` blocks take on a channel (0 when channels are not modelled).
    pub fn transfer(&self, blocks: u64) -> u64 {
        blocks * self.xfer_ns
    }

    /// The group, whose channel PU `pu` (a linear device PU index) uses.
    pub fn channel_of(&self, pu: usize) -> usize {
        pu / self.num_pu
    }
}

/// Per-PU busy times and per-group channel bookings.
pub struct TimingModel {
    state: Mutex<State>,
    costs: Costs,
    read_suspend: AtomicBool,
    /// Nanoseconds of programs a PU's write buffer holds; 0: write-through.
    buffer_ns: AtomicU64,
}

struct State {
    busy_until: Vec<u64>,
    channels: Vec<Channel>,
}

/// The booked transfers of one channel: sorted, disjoint, touching ones merged.
#[derive(Default)]
struct Channel {
    booked: Vec<(u64, u64)>,
}

impl Channel {
    /// Books `len` ns at the first gap at or after `ready`; returns the start.
    fn reserve(&mut self, ready: u64, len: u64, now: u64) -> u64 {
        let past = self.booked.partition_point(|&(_, end)| end <= now);
        self.booked.drain(..past);
        let mut start = ready;
        let mut i = self.booked.partition_point(|&(_, end)| end <= start);
        while let Some(&(s, e)) = self.booked.get(i) {
            if s >= start.saturating_add(len) {
                break;
            }
            start = start.max(e);
            i += 1;
        }
        let end = start.saturating_add(len);
        // Merge with the neighbours it touches, to keep the list short.
        let joins_prev = i > 0 && self.booked[i - 1].1 == start;
        let joins_next = self.booked.get(i).is_some_and(|&(s, _)| s == end);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.booked[i - 1].1 = self.booked[i].1;
                self.booked.remove(i);
            }
            (true, false) => self.booked[i - 1].1 = end,
            (false, true) => self.booked[i].0 = start,
            (false, false) => self.booked.insert(i, (start, end)),
        }
        start
    }

    fn busy_until(&self) -> u64 {
        self.booked.last().map_or(0, |&(_, e)| e)
    }
}

impl TimingModel {
    pub fn new(geo: &Geometry) -> TimingModel {
        TimingModel {
            state: Mutex::new(State {
                busy_until: vec![0; geo.total_pus()],
                channels: (0..geo.num_grp).map(|_| Channel::default()).collect(),
            }),
            costs: Costs::new(geo),
            read_suspend: AtomicBool::new(false),
            buffer_ns: AtomicU64::new(0),
        }
    }

    /// Gives each PU a write buffer of `blocks` blocks, 0 for none (see the module docs).
    pub fn set_write_buffer(&self, blocks: u32) {
        self.buffer_ns.store(self.cost(OpKind::Program, blocks), Ordering::Relaxed);
    }

    /// When a write issued at `now` whose programs end at `programmed` completes to the host.
    pub fn write_completes(&self, programmed: u64, now: u64) -> u64 {
        programmed.saturating_sub(self.buffer_ns.load(Ordering::Relaxed)).max(now)
    }

    /// When a flush issued at `now` completes: once every buffered program is done.
    pub fn flush_completes(&self, now: u64) -> u64 {
        if self.buffer_ns.load(Ordering::Relaxed) == 0 {
            return now;
        }
        self.lock().busy_until.iter().copied().fold(now, u64::max)
    }

    /// Lets reads suspend the programs and resets queued on their PU (see the module docs).
    pub fn set_read_suspend(&self, on: bool) {
        self.read_suspend.store(on, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        plumbing::lock(&self.state)
    }

    /// The costs it books operations with.
    pub fn costs(&self) -> &Costs {
        &self.costs
    }

    /// How long the media part of an operation on `count` blocks (read, program) or chunks
    /// (reset) takes, channel transfers not included (see [`Costs::media`]).
    pub fn cost(&self, op: OpKind, count: u32) -> u64 {
        self.costs.media(op, count.into())
    }

    /// How long `blocks` blocks take on a channel (0 when channels are not modelled).
    pub fn transfer_cost(&self, blocks: u32) -> u64 {
        self.costs.transfer(blocks.into())
    }

    /// Books an operation on PU `pu` issued at `now`; returns when it is done. A PU index out of
    /// range books nothing and is done at `now`.
    pub fn schedule(&self, pu: usize, op: OpKind, count: u32, now: u64) -> u64 {
        let mut state = self.lock();
        let State { busy_until, channels } = &mut *state;
        let Some(until) = busy_until.get_mut(pu) else { return now };
        let suspend = op == OpKind::Read && self.read_suspend.load(Ordering::Relaxed);
        let start = if suspend { now } else { (*until).max(now) };
        let channel =
            channels.get_mut(self.costs.channel_of(pu)).filter(|_| self.costs.xfer_ns > 0 && op != OpKind::Reset);
        let done = match channel {
            None => start.saturating_add(self.cost(op, count)),
            Some(ch) => self.by_units(ch, op, count, start, now),
        };
        // A suspending read pushes back what was booked by as long as it took.
        *until = if suspend { (*until).max(now).saturating_add(done - start) } else { done };
        done
    }

    /// Runs a read or program unit by unit with a transfer on the channel for each unit.
    fn by_units(&self, ch: &mut Channel, op: OpKind, count: u32, start: u64, now: u64) -> u64 {
        let mut t = start;
        let mut left = u64::from(count);
        let c = &self.costs;
        while left > 0 {
            let blocks = left.min(c.ws_min);
            left -= blocks;
            let xfer = c.transfer(blocks);
            // One unit: sense then move out, or move in then program.
            t = match op {
                OpKind::Read => {
                    let sensed = t.saturating_add(c.media(op, blocks));
                    ch.reserve(sensed, xfer, now).saturating_add(xfer)
                }
                _ => ch.reserve(t, xfer, now).saturating_add(xfer).saturating_add(c.media(op, blocks)),
            };
        }
        t
    }

    /// When PU `pu` finishes the operations booked so far.
    pub fn busy_until(&self, pu: usize) -> u64 {
        self.lock().busy_until.get(pu).copied().unwrap_or(0)
    }

    /// When the channel of group `grp` finishes the transfers booked so far.
    pub fn channel_busy_until(&self, grp: usize) -> u64 {
        self.lock().channels.get(grp).map_or(0, Channel::busy_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_on_one_pu_serialize_and_on_two_overlap() {
        let g = Geometry { read_ns: 100, program_ns: 1000, reset_ns: 5000, ..Geometry::default() };
        let t = TimingModel::new(&g);
        assert_eq!(t.schedule(0, OpKind::Read, 4, 10), 110);
        assert_eq!(t.schedule(0, OpKind::Read, 4, 10), 210, "waits for the first read");
        assert_eq!(t.schedule(1, OpKind::Read, 4, 10), 110, "another PU runs at once");
        assert_eq!(t.schedule(0, OpKind::Program, 8, 1000), 3000, "idle PU starts at now");
        assert_eq!(t.schedule(1, OpKind::Reset, 2, 0), 10_110);
        assert_eq!(t.cost(OpKind::Read, 5), 200, "partial units count whole");
        assert_eq!(t.schedule(99, OpKind::Read, 4, 7), 7);
        assert_eq!(t.busy_until(0), 3000);
    }

    /// 2 groups of 2 PUs; a block of 1024 bytes takes 10 ns on a channel.
    fn channel_geo() -> Geometry {
        Geometry {
            num_grp: 2,
            num_pu: 2,
            block_size: 1024,
            ws_min: 2,
            ws_opt: 2,
            read_ns: 100,
            program_ns: 1000,
            reset_ns: 5000,
            channel_mb_s: 1024 * 100, // 1024 bytes in 10 ns
            ..Geometry::default()
        }
    }

    #[test]
    fn pus_of_one_group_take_turns_on_its_channel() {
        let g = channel_geo();
        assert_eq!(g.transfer_ns(), 10);
        let t = TimingModel::new(&g);
        // PU 0 reads 4 blocks = 2 units: sense 100, move 20, sense 100, move 20.
        assert_eq!(t.schedule(0, OpKind::Read, 4, 0), 240);
        // PU 1 (same group) senses in parallel but its first unit waits for PU 0's transfer.
        assert_eq!(t.schedule(1, OpKind::Read, 2, 0), 140);
        // PU 2 is on group 1: its own channel.
        assert_eq!(t.schedule(2, OpKind::Read, 2, 0), 120);
        assert_eq!(t.channel_busy_until(0), 240);
        assert_eq!(t.channel_busy_until(1), 120);
        // A program moves its unit in first, then programs it.
        assert_eq!(t.schedule(3, OpKind::Program, 2, 1000), 1000 + 20 + 1000);
        // Resets do not use the channel.
        assert_eq!(t.schedule(3, OpKind::Reset, 1, 0), 2020 + 5000);
        assert_eq!(t.cost(OpKind::Read, 4), 200);
        assert_eq!(t.transfer_cost(4), 40);
    }

    #[test]
    fn on_idle_resources_an_operation_takes_exactly_its_costs() {
        let g = channel_geo();
        let c = Costs::new(&g);
        for (pu, op, n) in [(0, OpKind::Read, 5), (1, OpKind::Program, 8), (2, OpKind::Reset, 3)] {
            let t = TimingModel::new(&g);
            let xfer = if op == OpKind::Reset { 0 } else { c.transfer(n) };
            assert_eq!(t.schedule(pu, op, n as u32, 7), 7 + c.media(op, n) + xfer, "{op:?}");
        }
        assert_eq!((c.channel_of(1), c.channel_of(2)), (0, 1));
    }

    #[test]
    fn a_transfer_booked_for_later_does_not_hold_up_one_ready_now() {
        let g = channel_geo();
        let t = TimingModel::new(&g);
        // PU 0: a long read whose transfers come at 100..120, 220..240, ...
        assert_eq!(t.schedule(0, OpKind::Read, 8, 0), 4 * 120);
        // PU 1's program is ready at 0: it moves its unit in at once, in the gap before 100.
        assert_eq!(t.schedule(1, OpKind::Program, 2, 0), 20 + 1000);
        // A second program on PU 1 at 1020 finds the channel free.
        assert_eq!(t.schedule(1, OpKind::Program, 2, 1020), 1020 + 20 + 1000);
        // A transfer that does not fit a gap goes after the booking it would overlap.
        let t = TimingModel::new(&g);
        t.schedule(0, OpKind::Read, 2, 0); // channel 100..120
        assert_eq!(t.schedule(1, OpKind::Program, 2, 90), 120 + 20 + 1000);
    }

    #[test]
    fn a_write_buffer_completes_writes_early_and_flushes_when_programmed() {
        let g = Geometry { program_ns: 1000, ws_min: 4, ..Geometry::default() };
        let t = TimingModel::new(&g);
        assert_eq!(t.write_completes(t.schedule(0, OpKind::Program, 8, 0), 0), 2000, "write-through");
        assert_eq!(t.flush_completes(10), 10, "nothing buffered without a buffer");
        t.set_write_buffer(8); // two units: 2000 ns of programs
        let done = t.schedule(0, OpKind::Program, 4, 0); // PU 0 busy until 3000
        assert_eq!(t.write_completes(done, 0), 1000, "waits until 2000 ns are left");
        assert_eq!(t.write_completes(t.schedule(1, OpKind::Program, 4, 0), 0), 0, "fits in PU 1's buffer");
        assert_eq!(t.flush_completes(5), 3000, "a flush waits for every PU");
    }

    #[test]
    fn a_suspending_read_runs_at_once_and_delays_what_was_booked() {
        let g = Geometry { read_ns: 100, program_ns: 1000, reset_ns: 5000, ..Geometry::default() };
        let t = TimingModel::new(&g);
        t.set_read_suspend(true);
        assert_eq!(t.schedule(0, OpKind::Program, 4, 0), 1000);
        assert_eq!(t.schedule(0, OpKind::Read, 4, 10), 110, "does not wait for the program");
        assert_eq!(t.busy_until(0), 1100, "the program ends a read later");
        assert_eq!(t.schedule(0, OpKind::Program, 4, 20), 2100, "programs still queue");
        assert_eq!(t.schedule(1, OpKind::Read, 4, 5000), 5100, "an idle PU reads as before");
        assert_eq!(t.busy_until(1), 5100);
    }

    #[test]
    fn without_a_channel_bandwidth_the_model_is_per_pu_only() {
        let g = Geometry { channel_mb_s: 0, ..channel_geo() };
        let t = TimingModel::new(&g);
        assert_eq!(t.schedule(0, OpKind::Read, 4, 0), 200);
        assert_eq!(t.schedule(1, OpKind::Read, 4, 0), 200);
        assert_eq!(t.channel_busy_until(0), 0);
    }

    #[test]
    fn the_channel_forgets_what_has_passed_and_merges_neighbours() {
        let mut ch = Channel::default();
        assert_eq!(ch.reserve(0, 10, 0), 0);
        assert_eq!(ch.reserve(0, 10, 0), 10);
        assert_eq!(ch.booked, vec![(0, 20)]);
        assert_eq!(ch.reserve(50, 10, 0), 50);
        assert_eq!(ch.reserve(20, 30, 0), 20, "fits the gap exactly");
        assert_eq!(ch.booked, vec![(0, 60)]);
        assert_eq!(ch.reserve(100, 5, 70), 100);
        assert_eq!(ch.booked, vec![(100, 105)], "bookings that ended by now are dropped");
    }
}
