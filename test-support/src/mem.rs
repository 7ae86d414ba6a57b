//! A disk in memory, for tests that need no files.

use std::collections::HashMap;
use std::sync::Mutex;

use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture};

/// A disk whose bytes are a vector; every request completes at once. Requests must be in range
/// (a `vdisk::Disk` or a chain above it checks them).
pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    pub info: DeviceInfo,
}

impl MemDisk {
    pub fn new(capacity: u64, block_size: u32) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0; capacity as usize]),
            info: DeviceInfo { capacity, block_size, read_only: false },
        }
    }

    /// A copy of every byte.
    pub fn contents(&self) -> Vec<u8> {
        plumbing::lock(&self.data).clone()
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let data = plumbing::lock(&self.data);
        let len = buf.len();
        buf.as_mut_slice().copy_from_slice(&data[offset as usize..offset as usize + len]);
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        plumbing::lock(&self.data)[offset as usize..offset as usize + buf.len()].copy_from_slice(buf.as_slice());
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        plumbing::lock(&self.data)[offset as usize..(offset + len) as usize].fill(0);
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        self.discard(offset, len)
    }
}

/// A disk that keeps only the blocks written to it (zeroes elsewhere), of any size.
pub struct SparseDisk {
    info: DeviceInfo,
    pub blocks: Mutex<HashMap<u64, Vec<u8>>>,
}

impl SparseDisk {
    pub fn new(capacity: u64, block_size: u32) -> SparseDisk {
        SparseDisk { info: DeviceInfo { capacity, block_size, read_only: false }, blocks: Mutex::new(HashMap::new()) }
    }

    fn bs(&self) -> u64 {
        u64::from(self.info.block_size)
    }

    fn zero(&self, offset: u64, len: u64) {
        let range = offset / self.bs()..(offset + len) / self.bs();
        plumbing::lock(&self.blocks).retain(|b, _| !range.contains(b));
    }
}

impl BlockDevice for SparseDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let bs = self.bs() as usize;
        let blocks = plumbing::lock(&self.blocks);
        for (i, out) in buf.as_mut_slice().chunks_mut(bs).enumerate() {
            match blocks.get(&(offset / bs as u64 + i as u64)) {
                Some(data) => out.copy_from_slice(data),
                None => out.fill(0),
            }
        }
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        let bs = self.bs() as usize;
        let mut blocks = plumbing::lock(&self.blocks);
        for (i, data) in buf.as_slice().chunks(bs).enumerate() {
            blocks.insert(offset / bs as u64 + i as u64, data.to_vec());
        }
        drop(blocks);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.zero(offset, len);
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        self.zero(offset, len);
        Box::pin(std::future::ready(Ok(())))
    }
}
