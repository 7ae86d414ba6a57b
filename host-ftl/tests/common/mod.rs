//! A small host for tests: builds commands in a DMA region and runs them on a device.

#![allow(dead_code)]

use std::cell::Cell;

use host_ftl::{opcode, Addr, Cqe, Device, DmaRegion, Geometry, Sqe};

/// Where things go in the test region.
pub const LIST: u64 = 0;
pub const DST_LIST: u64 = 512;
pub const DATA: u64 = 4096;

pub struct Host {
    pub dev: Device,
    pub mem: DmaRegion,
    pub geo: Geometry,
    cid: Cell<u16>,
}

/// Deterministic bytes for entry `i` of a command seeded with `seed`.
pub fn pattern(seed: u8, i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| seed.wrapping_mul(31).wrapping_add((i * 7 + j) as u8) ^ 0x5a).collect()
}

impl Host {
    pub fn new(dev: Device) -> Host {
        let geo = dev.geometry().clone();
        let size = DATA as usize + 64 * (geo.block_size + geo.oob_size) as usize + 2 * 4096;
        Host { dev, mem: DmaRegion::new(size), geo, cid: Cell::new(0) }
    }

    pub fn mem_device(geo: &Geometry) -> Host {
        Host::new(Device::in_memory(geo.clone()).unwrap())
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

    /// Addresses of `len` blocks from `blk` in one chunk.
    pub fn blocks(&self, pu: u16, chk: u32, blk: u32, len: u32) -> Vec<u64> {
        (blk..blk + len).map(|b| self.ppa(0, pu, chk, b)).collect()
    }

    fn next_cid(&self) -> u16 {
        self.cid.set(self.cid.get().wrapping_add(1));
        self.cid.get()
    }

    /// Puts an address list in the region; returns what CDW10-11 (or 14-15) should hold.
    fn list(&self, at: u64, addrs: &[u64]) -> u64 {
        if addrs.len() == 1 {
            addrs[0]
        } else {
            self.mem.write_u64s(at, addrs).unwrap();
            at
        }
    }

    pub fn sqe(&self, op: u8, addrs: &[u64]) -> Sqe {
        let lba = self.list(LIST, addrs);
        Sqe::vector(op, self.next_cid(), addrs.len(), lba, DATA, self.oob_at()).unwrap()
    }

    /// Writes entry data `data` (block_size per address) and OOB.
    pub fn write(&self, addrs: &[u64], data: &[u8], oob: &[u8]) -> Cqe {
        self.mem.write(DATA, data).unwrap();
        self.mem.write(self.oob_at(), oob).unwrap();
        let sqe = self.sqe(opcode::VECTOR_WRITE, addrs);
        let cqe = self.dev.execute(&sqe, &self.mem);
        assert_eq!(cqe.cid, sqe.cid, "the command id is echoed");
        cqe
    }

    /// Writes pattern data seeded with `seed`; returns the completion and the data and OOB.
    pub fn write_pattern(&self, addrs: &[u64], seed: u8) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        let data: Vec<u8> = (0..addrs.len()).flat_map(|i| pattern(seed, i, bs)).collect();
        let oob: Vec<u8> = (0..addrs.len()).flat_map(|i| pattern(seed ^ 0xff, i, os)).collect();
        (self.write(addrs, &data, &oob), data, oob)
    }

    /// Reads; the data and OOB slots are filled with 0xEE first, to see what the device wrote.
    pub fn read(&self, addrs: &[u64]) -> (Cqe, Vec<u8>, Vec<u8>) {
        let (bs, os) = (self.geo.block_size as usize, self.geo.oob_size as usize);
        self.mem.write(DATA, &vec![0xEE; addrs.len() * bs]).unwrap();
        self.mem.write(self.oob_at(), &vec![0xEE; addrs.len() * os]).unwrap();
        let sqe = self.sqe(opcode::VECTOR_READ, addrs);
        let cqe = self.dev.execute(&sqe, &self.mem);
        assert_eq!(cqe.cid, sqe.cid);
        let data = self.mem.read_vec(DATA, addrs.len() * bs).unwrap();
        let oob = self.mem.read_vec(self.oob_at(), addrs.len() * os).unwrap();
        (cqe, data, oob)
    }

    pub fn reset(&self, addrs: &[u64]) -> Cqe {
        let sqe = self.sqe(opcode::VECTOR_RESET, addrs);
        self.dev.execute(&sqe, &self.mem)
    }

    pub fn copy(&self, src: &[u64], dst: &[u64]) -> Cqe {
        assert_eq!(src.len(), dst.len());
        let s = self.list(LIST, src);
        let d = self.list(DST_LIST, dst);
        let sqe = Sqe::vector_copy(self.next_cid(), src.len(), s, d).unwrap();
        self.dev.execute(&sqe, &self.mem)
    }
}
