//! The test rig of host-ftl: commands laid out in a DMA region ([`Commands`]), run straight on a
//! device by a [`Host`], or submitted by a [`Guest`] through its queue pair to a driver that an
//! [`Env`] holds on either clock.
//!
//! Layout of a region: the address list at [`LIST`] (a copy's destinations at [`DST_LIST`]), data
//! at [`DATA`], OOB after 64 blocks of data, and a free spot after that for admin pages.

#![allow(dead_code)]

use std::cell::Cell;
use std::ops::Deref;
use std::sync::Arc;

use host_ftl::driver::{ClockConfig, Driver, DriverConfig, Pending, QueuePair};
use host_ftl::{opcode, Addr, Cqe, Device, DmaRegion, Geometry, OpenChannel, Sqe};
use plumbing::clock::SimClock;
use state_store::Store;

/// One group of 4 PUs × 6 chunks × 16 blocks of 512 bytes, the timing model's default times: a
/// device small enough to fill and reclaim in a test.
pub fn one_group_geometry() -> Geometry {
    Geometry {
        num_grp: 1,
        num_pu: 4,
        num_chk: 6,
        clba: 16,
        block_size: 512,
        oob_size: 16,
        ws_min: 4,
        ws_opt: 8,
        mw_cunits: 4,
        maxoc: 24,
        maxocpu: 6,
        ..Geometry::default()
    }
}

pub const LIST: u64 = 0;
pub const DST_LIST: u64 = 512;
pub const DATA: u64 = 4096;

/// Deterministic bytes for entry `i` of a command seeded with `seed`: the entry's number in the
/// first bytes, the rest a byte that depends on both (cheap to make in a debug build).
pub fn pattern(seed: u8, i: usize, len: usize) -> Vec<u8> {
    let mut v = vec![seed.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(7)) ^ 0x5a; len];
    let tag = (u64::from(seed) << 32 | i as u64 | 1 << 63).to_le_bytes();
    let n = tag.len().min(len);
    v[..n].copy_from_slice(&tag[..n]);
    v
}

/// Builds commands in a region, for a geometry (the device's, or a guest's virtual one).
pub struct Commands {
    pub geo: Geometry,
    pub mem: Arc<DmaRegion>,
    cid: Cell<u16>,
}

impl Commands {
    pub fn new(geo: Geometry, mem: Arc<DmaRegion>) -> Commands {
        Commands { geo, mem, cid: Cell::new(0) }
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

    pub fn next_cid(&self) -> u16 {
        self.cid.set(self.cid.get().wrapping_add(1));
        self.cid.get()
    }

    /// Puts an address list in the region; returns what CDW10-11 (or 14-15) should hold.
    pub fn list(&self, at: u64, addrs: &[u64]) -> u64 {
        if addrs.len() == 1 {
            addrs[0]
        } else {
            self.mem.write_u64s(at, addrs).unwrap();
            at
        }
    }

    /// A vector command on `addrs`; only a read or write points at data and OOB.
    pub fn sqe(&self, op: u8, addrs: &[u64]) -> Sqe {
        let lba = self.list(LIST, addrs);
        let (data, meta) = match op {
            opcode::VECTOR_READ | opcode::VECTOR_WRITE => (DATA, self.oob_at()),
            _ => (0, 0),
        };
        Sqe::vector(op, self.next_cid(), addrs.len(), lba, data, meta).unwrap()
    }

    /// A vector copy from `src` to `dst`.
    pub fn copy_sqe(&self, src: &[u64], dst: &[u64]) -> Sqe {
        assert_eq!(src.len(), dst.len());
        let s = self.list(LIST, src);
        let d = self.list(DST_LIST, dst);
        Sqe::vector_copy(self.next_cid(), src.len(), s, d).unwrap()
    }

    /// Puts data and OOB for a write of `n` blocks in the region.
    pub fn put(&self, data: &[u8], oob: &[u8]) {
        self.mem.write(DATA, data).unwrap();
        self.mem.write(self.oob_at(), oob).unwrap();
    }

    /// Puts pattern data for a write of `n` blocks seeded with `seed` in the region; returns
    /// the data and OOB.
    pub fn stage(&self, n: usize, seed: u8) -> (Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let mut data = Vec::with_capacity(n * bs);
        let mut oob = Vec::with_capacity(n * os);
        for i in 0..n {
            data.extend_from_slice(&pattern(seed, i, bs));
            oob.extend_from_slice(&pattern(seed ^ 0xff, i, os));
        }
        self.put(&data, &oob);
        (data, oob)
    }

    /// Fills the data and OOB slots of `n` blocks with 0xEE, to see what a read wrote.
    pub fn mark_slots(&self, n: usize) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        self.put(&vec![0xEE; n * bs], &vec![0xEE; n * os]);
    }

    /// The data and OOB slots of `n` blocks.
    pub fn slots(&self, n: usize) -> (Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        (self.mem.read_vec(DATA, n * bs).unwrap(), self.mem.read_vec(self.oob_at(), n * os).unwrap())
    }
}

// ---- a host on the device ----

/// Runs commands straight on a device.
pub struct Host {
    pub dev: Device,
    cmds: Commands,
}

impl Deref for Host {
    type Target = Commands;

    fn deref(&self) -> &Commands {
        &self.cmds
    }
}

impl Host {
    pub fn new(dev: Device) -> Host {
        let geo = dev.geometry().clone();
        let size = DATA as usize + 64 * (geo.block_size + geo.oob_size) as usize + 2 * 4096;
        Host { dev, cmds: Commands::new(geo, Arc::new(DmaRegion::new(size))) }
    }

    pub fn mem_device(geo: &Geometry) -> Host {
        Host::new(Device::in_memory(geo.clone()).unwrap())
    }

    /// Addresses of `len` blocks from `blk` in one chunk of PU `pu` of group 0.
    pub fn blocks(&self, pu: u16, chk: u32, blk: u32, len: u32) -> Vec<u64> {
        (blk..blk + len).map(|b| self.ppa(0, pu, chk, b)).collect()
    }

    fn run(&self, sqe: &Sqe) -> Cqe {
        let cqe = self.dev.execute(sqe, &self.mem);
        assert_eq!(cqe.cid, sqe.cid, "the command id is echoed");
        cqe
    }

    /// Writes entry data `data` (block_size per address) and OOB.
    pub fn write(&self, addrs: &[u64], data: &[u8], oob: &[u8]) -> Cqe {
        self.put(data, oob);
        self.run(&self.sqe(opcode::VECTOR_WRITE, addrs))
    }

    /// Writes pattern data seeded with `seed`; returns the completion and the data and OOB.
    pub fn write_pattern(&self, addrs: &[u64], seed: u8) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (data, oob) = self.stage(addrs.len(), seed);
        (self.run(&self.sqe(opcode::VECTOR_WRITE, addrs)), data, oob)
    }

    /// Reads; the data and OOB slots are filled with 0xEE first, to see what the device wrote.
    pub fn read(&self, addrs: &[u64]) -> (Cqe, Vec<u8>, Vec<u8>) {
        self.mark_slots(addrs.len());
        let cqe = self.run(&self.sqe(opcode::VECTOR_READ, addrs));
        let (data, oob) = self.slots(addrs.len());
        (cqe, data, oob)
    }

    pub fn reset(&self, addrs: &[u64]) -> Cqe {
        self.run(&self.sqe(opcode::VECTOR_RESET, addrs))
    }

    pub fn copy(&self, src: &[u64], dst: &[u64]) -> Cqe {
        self.run(&self.copy_sqe(src, dst))
    }
}

// ---- a driver and its guests ----

/// A driver with its store directory and device. The driver may run on another device built
/// over `device` (see [`CommandsOnly`]); `device` is the emulator, to look at and to break.
pub struct Env {
    pub driver: Driver,
    pub device: Arc<Device>,
    /// What the driver runs on.
    pub under: Arc<dyn OpenChannel>,
    pub store: Arc<Store>,
    pub dir: tempfile::TempDir,
    pub clock: Option<Arc<SimClock>>,
}

fn clock_config(clock: &Option<Arc<SimClock>>) -> ClockConfig {
    match clock {
        Some(c) => ClockConfig::Simulated(c.clone()),
        None => ClockConfig::Real,
    }
}

impl Env {
    /// A driver on the simulated clock over a memory device.
    pub fn sim(geo: &Geometry, config: DriverConfig) -> Env {
        Env::sim_on(Arc::new(Device::in_memory(geo.clone()).unwrap()), config)
    }

    pub fn sim_on(device: Arc<Device>, config: DriverConfig) -> Env {
        Env::open(device.clone(), device, Some(Arc::new(SimClock::new())), config)
    }

    /// A driver on the real clock (dispatcher thread) over a memory device.
    pub fn real(geo: &Geometry, config: DriverConfig) -> Env {
        let device = Arc::new(Device::in_memory(geo.clone()).unwrap());
        Env::open(device.clone(), device, None, config)
    }

    /// A driver on `under` (built over `device`), on the simulated clock if `clock` is given.
    pub fn open(
        device: Arc<Device>,
        under: Arc<dyn OpenChannel>,
        clock: Option<Arc<SimClock>>,
        config: DriverConfig,
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = DriverConfig { clock: clock_config(&clock), ..config };
        let driver = Driver::open(under.clone(), store.clone(), config).unwrap();
        Env { driver, device, under, store, dir, clock }
    }

    /// Drops the driver (a crash: nothing is flushed or finished) and opens a new one on the
    /// same device and store, same clock.
    pub fn reopen(self, config: DriverConfig) -> Env {
        let Env { driver, device, under, store, dir, clock } = self;
        drop(driver);
        let config = DriverConfig { clock: clock_config(&clock), ..config };
        let driver = Driver::open(under.clone(), store.clone(), config).unwrap();
        Env { driver, device, under, store, dir, clock }
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

/// A guest building commands in its own region.
pub struct Guest {
    pub qp: QueuePair,
    cmds: Commands,
}

impl Deref for Guest {
    type Target = Commands;

    fn deref(&self) -> &Commands {
        &self.cmds
    }
}

impl Guest {
    pub fn new(qp: QueuePair) -> Guest {
        let cmds = Commands::new(qp.geometry().clone(), qp.region_arc());
        Guest { qp, cmds }
    }

    /// Addresses of `len` blocks from `blk` in chunk `chk` of the guest's PU `pu` (a linear
    /// index over its groups).
    pub fn blocks(&self, pu: usize, chk: u32, blk: u32, len: u32) -> Vec<u64> {
        let a = Addr::from_pu_index(&self.geo, pu, chk, 0).unwrap();
        (blk..blk + len).map(|b| self.ppa(a.grp, a.pu, chk, b)).collect()
    }

    pub fn write(&self, d: &Driver, addrs: &[u64], seed: u8) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (data, oob) = self.stage(addrs.len(), seed);
        let c = wait(d, self.qp.submit(self.sqe(opcode::VECTOR_WRITE, addrs)));
        (c, data, oob)
    }

    /// Reads; the slots are filled with 0xEE first, to see what was written into them.
    pub fn read(&self, d: &Driver, addrs: &[u64]) -> (Cqe, Vec<u8>, Vec<u8>) {
        self.mark_slots(addrs.len());
        let c = wait(d, self.qp.submit(self.sqe(opcode::VECTOR_READ, addrs)));
        let (data, oob) = self.slots(addrs.len());
        (c, data, oob)
    }

    pub fn reset(&self, d: &Driver, addrs: &[u64]) -> Cqe {
        wait(d, self.qp.submit(self.sqe(opcode::VECTOR_RESET, addrs)))
    }

    pub fn copy(&self, d: &Driver, src: &[u64], dst: &[u64]) -> Cqe {
        wait(d, self.qp.submit(self.copy_sqe(src, dst)))
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

// ---- another device under the driver ----

/// A device that only executes commands: the four required methods of [`OpenChannel`], passed
/// to the emulator's commands. Everything else the driver needs (chunk information,
/// notifications, flush) comes from the trait's defaults, through log pages and commands.
pub struct CommandsOnly(pub Arc<Device>);

impl OpenChannel for CommandsOnly {
    fn geometry(&self) -> &Geometry {
        self.0.geometry()
    }

    fn execute(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        self.0.execute(sqe, mem)
    }

    fn execute_vector(&self, sqe: &Sqe, addrs: &[u64], dst: &[u64], mem: &DmaRegion) -> Cqe {
        self.0.execute_vector(sqe, addrs, dst, mem)
    }

    fn execute_admin(&self, sqe: &Sqe, mem: &DmaRegion) -> Cqe {
        self.0.execute_admin(sqe, mem)
    }
}
