//! Helpers for driver tests: a guest that builds commands in its own region, and a way to wait
//! for a completion on either clock.

#![allow(dead_code)]

use std::cell::Cell;
use std::sync::Arc;

use host_ftl::driver::{ClockConfig, Driver, DriverConfig, Pending, QueuePair, SimClock};
use host_ftl::{opcode, Addr, Cqe, Device, Geometry, Sqe};
use state_store::Store;

/// Where things go in a guest's region.
pub const LIST: u64 = 0;
pub const DST_LIST: u64 = 512;
pub const DATA: u64 = 4096;

/// A driver with its store directory and device.
pub struct Env {
    pub driver: Driver,
    pub device: Arc<Device>,
    pub store: Arc<Store>,
    pub dir: tempfile::TempDir,
    pub clock: Option<Arc<SimClock>>,
}

impl Env {
    /// A driver on the simulated clock over a memory device.
    pub fn sim(geo: &Geometry, config: DriverConfig) -> Env {
        let device = Arc::new(Device::in_memory(geo.clone()).unwrap());
        Env::sim_on(device, config)
    }

    pub fn sim_on(device: Arc<Device>, config: DriverConfig) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let clock = Arc::new(SimClock::new());
        let config = DriverConfig { clock: ClockConfig::Simulated(clock.clone()), ..config };
        let driver = Driver::open(device.clone(), store.clone(), config).unwrap();
        Env { driver, device, store, dir, clock: Some(clock) }
    }

    /// A driver on the real clock (dispatcher thread) over a memory device.
    pub fn real(geo: &Geometry, config: DriverConfig) -> Env {
        let device = Arc::new(Device::in_memory(geo.clone()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let driver =
            Driver::open(device.clone(), store.clone(), DriverConfig { clock: ClockConfig::Real, ..config }).unwrap();
        Env { driver, device, store, dir, clock: None }
    }

    /// Drops the driver (a crash: nothing is flushed or finished) and opens a new one on the
    /// same device and store, same clock.
    pub fn reopen(self, config: DriverConfig) -> Env {
        let Env { driver, device, store, dir, clock } = self;
        drop(driver);
        let clock_cfg = match &clock {
            Some(c) => ClockConfig::Simulated(c.clone()),
            None => ClockConfig::Real,
        };
        let driver = Driver::open(device.clone(), store.clone(), DriverConfig { clock: clock_cfg, ..config }).unwrap();
        Env { driver, device, store, dir, clock }
    }

    pub fn guest(&self, qp: QueuePair) -> Guest {
        Guest::new(qp)
    }

    /// Runs the simulated driver until nothing is left to do.
    pub fn settle(&self) {
        while self.driver.step().unwrap().is_some() {}
    }
}

/// Waits for a completion: drives a simulated driver event by event, or blocks on a real one.
pub fn wait(driver: &Driver, mut p: Pending) -> Cqe {
    loop {
        if let Some(c) = p.try_take() {
            return c;
        }
        match driver.step() {
            Ok(Some(_)) => {}
            Ok(None) => return p.try_take().expect("the driver is idle and the command has not completed"),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                return rt.block_on(p);
            }
        }
    }
}

/// Deterministic bytes for entry `i` of a command seeded with `seed`: the entry's number in the
/// first bytes, the rest a byte that depends on both (cheap to make in a debug build).
pub fn pattern(seed: u8, i: usize, len: usize) -> Vec<u8> {
    let mut v = vec![seed.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(7)) ^ 0x5a; len];
    let tag = (u64::from(seed) << 32 | i as u64 | 1 << 63).to_le_bytes();
    let n = tag.len().min(len);
    v[..n].copy_from_slice(&tag[..n]);
    v
}

/// A guest building commands in its own region.
pub struct Guest {
    pub qp: QueuePair,
    pub geo: Geometry,
    cid: Cell<u16>,
}

impl Guest {
    pub fn new(qp: QueuePair) -> Guest {
        let geo = qp.geometry().clone();
        Guest { qp, geo, cid: Cell::new(0) }
    }

    pub fn oob_at(&self) -> u64 {
        DATA + 64 * u64::from(self.geo.block_size)
    }

    /// A free spot after data and OOB, for admin pages.
    pub fn scratch(&self) -> u64 {
        self.oob_at() + 64 * u64::from(self.geo.oob_size)
    }

    pub fn ppa(&self, grp: u16, pu: u16, chk: u32, blk: u32) -> u64 {
        Addr::new(grp, pu, chk, blk).to_ppa(&self.geo).unwrap().0
    }

    /// Addresses of `len` blocks from `blk` in chunk `chk` of the guest's PU `pu` (a linear
    /// index over its groups).
    pub fn blocks(&self, pu: usize, chk: u32, blk: u32, len: u32) -> Vec<u64> {
        let a = Addr::from_pu_index(&self.geo, pu, chk, 0).unwrap();
        (blk..blk + len).map(|b| self.ppa(a.grp, a.pu, chk, b)).collect()
    }

    pub fn next_cid(&self) -> u16 {
        self.cid.set(self.cid.get().wrapping_add(1));
        self.cid.get()
    }

    fn list(&self, at: u64, addrs: &[u64]) -> u64 {
        if addrs.len() == 1 {
            addrs[0]
        } else {
            self.qp.region().write_u64s(at, addrs).unwrap();
            at
        }
    }

    pub fn sqe(&self, op: u8, addrs: &[u64]) -> Sqe {
        let lba = self.list(LIST, addrs);
        let (data, meta) = match op {
            opcode::VECTOR_READ | opcode::VECTOR_WRITE => (DATA, self.oob_at()),
            _ => (0, 0),
        };
        Sqe::vector(op, self.next_cid(), addrs.len(), lba, data, meta).unwrap()
    }

    /// Puts pattern data for a write in the region; returns the data and OOB.
    pub fn stage(&self, n: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let mut data = Vec::with_capacity(n * bs);
        let mut oob = Vec::with_capacity(n * os);
        for i in 0..n {
            data.extend_from_slice(&pattern(seed, i, bs));
            oob.extend_from_slice(&pattern(seed ^ 0xff, i, os));
        }
        self.qp.region().write(DATA, &data).unwrap();
        self.qp.region().write(self.oob_at(), &oob).unwrap();
        (data, oob)
    }

    pub fn write(&self, d: &Driver, addrs: &[u64], seed: u8) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (data, oob) = self.stage(addrs.len(), seed);
        let c = wait(d, self.qp.submit(self.sqe(opcode::VECTOR_WRITE, addrs)));
        (c, data, oob)
    }

    /// Reads; the slots are filled with 0xEE first, to see what was written into them.
    pub fn read(&self, d: &Driver, addrs: &[u64]) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let r = self.qp.region();
        r.write(DATA, &vec![0xEE; addrs.len() * bs]).unwrap();
        r.write(self.oob_at(), &vec![0xEE; addrs.len() * os]).unwrap();
        let c = wait(d, self.qp.submit(self.sqe(opcode::VECTOR_READ, addrs)));
        (c, r.read_vec(DATA, addrs.len() * bs).unwrap(), r.read_vec(self.oob_at(), addrs.len() * os).unwrap())
    }

    pub fn reset(&self, d: &Driver, addrs: &[u64]) -> Cqe {
        wait(d, self.qp.submit(self.sqe(opcode::VECTOR_RESET, addrs)))
    }

    pub fn copy(&self, d: &Driver, src: &[u64], dst: &[u64]) -> Cqe {
        let s = self.list(LIST, src);
        let t = self.list(DST_LIST, dst);
        wait(d, self.qp.submit(Sqe::vector_copy(self.next_cid(), src.len(), s, t).unwrap()))
    }

    /// Fills chunk `chk` of guest PU `pu` completely with pattern data in 64-block writes;
    /// returns the data written.
    pub fn fill_chunk(&self, d: &Driver, pu: usize, chk: u32, seed: u8) -> Vec<u8> {
        let mut all = Vec::new();
        let step = 64.min(self.geo.clba);
        for start in (0..self.geo.clba).step_by(step as usize) {
            let (c, data, _) = self.write(d, &self.blocks(pu, chk, start, step), seed.wrapping_add(start as u8));
            assert!(c.status.is_success(), "fill: {c:?}");
            all.extend(data);
        }
        all
    }

    /// Reads a whole chunk back in 64-block reads.
    pub fn read_chunk(&self, d: &Driver, pu: usize, chk: u32) -> (Vec<Cqe>, Vec<u8>) {
        let mut all = Vec::new();
        let mut cqes = Vec::new();
        let step = 64.min(self.geo.clba);
        for start in (0..self.geo.clba).step_by(step as usize) {
            let (c, data, _) = self.read(d, &self.blocks(pu, chk, start, step));
            cqes.push(c);
            all.extend(data);
        }
        (cqes, all)
    }
}
