//! An optional timing model: each parallel unit does one operation at a time, and each operation
//! takes the geometry's typical time.
//!
//! Time is plain `u64` nanoseconds supplied by the caller, so the model runs the same on a
//! simulated clock (deterministic tests of fairness) as on a real one (sleep until `done_at`).
//! The device itself never sleeps.
//!
//! Costs: reading or programming `n` blocks on a PU takes `ceil(n / ws_min)` times the typical
//! read or program time of a write unit; a reset takes the typical reset time per chunk. An
//! operation on a PU starts when the PU is free (at `now` or when its previous operation ends,
//! whichever is later).

use std::sync::{Mutex, MutexGuard};

use crate::geometry::Geometry;

/// The kinds of media operation the model times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Program,
    Reset,
}

/// Per-PU busy times.
pub struct TimingModel {
    busy_until: Mutex<Vec<u64>>,
    read_ns: u64,
    program_ns: u64,
    reset_ns: u64,
    ws_min: u64,
}

impl TimingModel {
    pub fn new(geo: &Geometry) -> TimingModel {
        TimingModel {
            busy_until: Mutex::new(vec![0; geo.total_pus()]),
            read_ns: geo.read_ns.into(),
            program_ns: geo.program_ns.into(),
            reset_ns: geo.reset_ns.into(),
            ws_min: u64::from(geo.ws_min.max(1)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u64>> {
        // Plain numbers: a poisoned lock is still consistent.
        self.busy_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long an operation on `count` blocks (read, program) or chunks (reset) takes.
    pub fn cost(&self, op: OpKind, count: u32) -> u64 {
        let count = u64::from(count);
        match op {
            OpKind::Read => count.div_ceil(self.ws_min) * self.read_ns,
            OpKind::Program => count.div_ceil(self.ws_min) * self.program_ns,
            OpKind::Reset => count * self.reset_ns,
        }
    }

    /// Books an operation on PU `pu` issued at `now`; returns when it is done. A PU index out of
    /// range books nothing and is done at `now`.
    pub fn schedule(&self, pu: usize, op: OpKind, count: u32, now: u64) -> u64 {
        let mut busy = self.lock();
        let Some(until) = busy.get_mut(pu) else { return now };
        let done = (*until).max(now).saturating_add(self.cost(op, count));
        *until = done;
        done
    }

    /// When PU `pu` finishes the operations booked so far.
    pub fn busy_until(&self, pu: usize) -> u64 {
        self.lock().get(pu).copied().unwrap_or(0)
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
}
