//! A disk in memory, so that targets do no file I/O.
//!
//! Every layer above must have checked a request's range ([`vdisk::device::check_range`]) before
//! it reaches a device: a range outside the disk panics here, and the fuzzer reports it.

use std::sync::Mutex;

use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture};

pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    info: DeviceInfo,
}

impl MemDisk {
    pub fn new(capacity: u64, block_size: u32, read_only: bool) -> MemDisk {
        MemDisk { data: Mutex::new(vec![0; capacity as usize]), info: DeviceInfo { capacity, block_size, read_only } }
    }

    /// Sets the disk's contents (`contents` as long as the disk).
    pub fn set(&self, contents: &[u8]) {
        self.lock().copy_from_slice(contents);
    }

    /// Whether the disk holds `contents`.
    pub fn holds(&self, contents: &[u8]) -> bool {
        *self.lock() == contents
    }

    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).filter(|&e| e <= self.info.capacity);
        let bs = u64::from(self.info.block_size);
        assert!(
            end.is_some() && offset % bs == 0 && len % bs == 0,
            "unchecked {what} at {offset} of {len} bytes reached a disk of {} bytes",
            self.info.capacity
        );
        offset as usize..(offset + len) as usize
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let r = self.range("read", offset, buf.len() as u64);
        buf.as_mut_slice().copy_from_slice(&self.lock()[r]);
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        assert!(!self.info.read_only, "a write reached a read-only disk");
        let r = self.range("write", offset, buf.len() as u64);
        self.lock()[r].copy_from_slice(buf.as_slice());
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        assert!(!self.info.read_only, "a discard reached a read-only disk");
        let r = self.range("discard", offset, len);
        self.lock()[r].fill(0);
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        assert!(!self.info.read_only, "write-zeroes reached a read-only disk");
        let r = self.range("write-zeroes", offset, len);
        self.lock()[r].fill(0);
        Box::pin(std::future::ready(Ok(())))
    }
}
