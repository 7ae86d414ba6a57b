//! The memory a submitter shares with the device.
//!
//! Commands point into a region by byte offset. The device reads address lists, write data and
//! out-of-band bytes from it and writes read data, out-of-band bytes and admin pages into it.
//! Every access is bounds-checked: a pointer outside the region is an error, never a panic.
//! The bytes sit behind one mutex held only for the copy, so several commands may be in flight
//! on disjoint parts of one region from several threads.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// A region of bytes shared between a submitter and the device.
pub struct DmaRegion {
    bytes: Mutex<Box<[u8]>>,
    len: u64,
}

impl DmaRegion {
    /// A zeroed region of `len` bytes.
    pub fn new(len: usize) -> DmaRegion {
        DmaRegion { bytes: Mutex::new(vec![0u8; len].into_boxed_slice()), len: len as u64 }
    }

    /// The region's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn lock(&self) -> MutexGuard<'_, Box<[u8]>> {
        plumbing::lock(&self.bytes)
    }

    /// The byte range `offset..offset + len` if it lies inside the region.
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.len);
        match end {
            // Both ends are at most self.len, which came from a usize.
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(Error::DmaOutOfBounds { offset, len: len as u64, size: self.len }),
        }
    }

    /// Checks that `len` bytes at `offset` lie inside the region.
    pub fn check(&self, offset: u64, len: usize) -> Result<()> {
        self.range(offset, len).map(drop)
    }

    /// Copies bytes out of the region into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }

    /// Copies `len` bytes out of the region.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let r = self.range(offset, len)?;
        Ok(self.lock()[r].to_vec())
    }

    /// Copies `data` into the region.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.range(offset, data.len())?;
        self.lock()[r].copy_from_slice(data);
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeros.
    pub fn zero(&self, offset: u64, len: usize) -> Result<()> {
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }

    /// Reads `count` little-endian u64 values (an address list).
    pub fn read_u64s(&self, offset: u64, count: usize) -> Result<Vec<u64>> {
        let bytes = self.read_vec(offset, count.saturating_mul(8))?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect())
    }

    /// Writes little-endian u64 values (an address list).
    pub fn write_u64s(&self, offset: u64, values: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write(offset, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reads_and_writes_inside_the_region() {
        let r = DmaRegion::new(64);
        r.write(10, &[1, 2, 3]).unwrap();
        assert_eq!(r.read_vec(9, 5).unwrap(), vec![0, 1, 2, 3, 0]);
        r.write_u64s(16, &[7, u64::MAX]).unwrap();
        assert_eq!(r.read_u64s(16, 2).unwrap(), vec![7, u64::MAX]);
        r.zero(10, 2).unwrap();
        assert_eq!(r.read_vec(10, 3).unwrap(), vec![0, 0, 3]);
        r.write(60, &[9; 4]).unwrap();
        assert_eq!(r.read_vec(63, 1).unwrap(), vec![9]);
    }

    #[test]
    fn out_of_region_accesses_are_errors() {
        let r = DmaRegion::new(64);
        assert!(r.write(61, &[0; 4]).is_err());
        assert!(r.read_vec(64, 1).is_err());
        assert!(r.read_vec(u64::MAX, 2).is_err());
        assert!(r.read_u64s(u64::MAX - 3, usize::MAX).is_err());
        assert!(r.check(0, 65).is_err());
        r.check(64, 0).unwrap();
        assert!(matches!(r.zero(100, 0), Err(Error::DmaOutOfBounds { offset: 100, .. })));
    }

    #[test]
    fn threads_share_a_region_on_disjoint_parts() {
        let r = Arc::new(DmaRegion::new(4 * 1024));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        r.write(u64::from(t) * 1024, &[t; 1024]).unwrap();
                        assert_eq!(r.read_vec(u64::from(t) * 1024, 1024).unwrap(), vec![t; 1024]);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
