//! Turning a virtio-blk descriptor chain into a request, checking everything the guest wrote.
//!
//! The virtio spec lays a request out as device-readable bytes (the 16-byte header, then a
//! write's data) followed by device-writable bytes (a read's data, then the status byte). Nothing
//! else is assumed: the header and data may share descriptors or be split across several.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// virtio-blk always counts in 512-byte sectors, whatever the logical block size.
pub const SECTOR: u64 = 512;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_BYTES: usize = 16;
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// A run of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub addr: GuestAddress,
    pub len: usize,
}

/// One descriptor as the chain gives it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// A request whose layout is sound: it can be answered, even if only with an error status.
#[derive(Debug)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable bytes after the header (a write's data, discard segments).
    pub readable: Vec<Region>,
    /// Device-writable bytes before the status byte (a read's data, the id).
    pub writable: Vec<Region>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain cannot be answered at all: there is no status byte to write. The chain is only
/// returned to the guest, with nothing written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor at {addr:#x} of {len} bytes lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    WrongDirection,
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the chain is shorter than the 16-byte request header")]
    ShortHeader,
}

/// Checks a chain's descriptors and finds its header, data and status.
pub fn parse<M: GuestMemory>(mem: &M, descs: impl IntoIterator<Item = Desc>) -> Result<Request, ChainError> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in descs {
        let access = if d.write_only { Permissions::Write } else { Permissions::Read };
        if !mem.check_range(d.addr, d.len as usize, access) {
            return Err(ChainError::OutsideMemory { addr: d.addr.0, len: d.len });
        }
        if d.len == 0 {
            continue;
        }
        let region = Region { addr: d.addr, len: d.len as usize };
        match d.write_only {
            true => writable.push(region),
            false if writable.is_empty() => readable.push(region),
            false => return Err(ChainError::WrongDirection),
        }
    }
    let status = take_last_byte(&mut writable).ok_or(ChainError::NoStatus)?;
    let mut header = [0u8; 16];
    if total(&readable) < header.len() {
        return Err(ChainError::ShortHeader);
    }
    gather(mem, &readable, &mut header).map_err(|_| ChainError::ShortHeader)?;
    skip_front(&mut readable, header.len());
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);
    Ok(Request { kind, sector, readable, writable, status })
}

pub fn total(regions: &[Region]) -> usize {
    regions.iter().map(|r| r.len).sum()
}

/// Copies the first `out.len()` bytes of `regions` into `out`.
pub fn gather<M: GuestMemory>(mem: &M, regions: &[Region], out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for r in regions {
        if done == out.len() {
            break;
        }
        let n = r.len.min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], r.addr)?;
        done += n;
    }
    Ok(())
}

/// Copies `data` into the start of `regions`; returns how many bytes fitted.
pub fn scatter<M: GuestMemory>(mem: &M, regions: &[Region], data: &[u8]) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0;
    for r in regions {
        if done == data.len() {
            break;
        }
        let n = r.len.min(data.len() - done);
        mem.write_slice(&data[done..done + n], r.addr)?;
        done += n;
    }
    Ok(done)
}

fn take_last_byte(regions: &mut Vec<Region>) -> Option<GuestAddress> {
    let last = regions.last_mut()?;
    let addr = GuestAddress(last.addr.0 + last.len as u64 - 1);
    last.len -= 1;
    if last.len == 0 {
        regions.pop();
    }
    Some(addr)
}

fn skip_front(regions: &mut Vec<Region>, mut n: usize) {
    while n > 0 && !regions.is_empty() {
        let first = &mut regions[0];
        let k = first.len.min(n);
        first.addr = GuestAddress(first.addr.0 + k as u64);
        first.len -= k;
        n -= k;
        if first.len == 0 {
            regions.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, write_only: bool) -> Desc {
        Desc { addr: GuestAddress(addr), len, write_only }
    }

    #[test]
    fn the_usual_three_descriptor_layout() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 7);
        let req = parse(&mem, [d(0x1000, 16, false), d(0x2000, 4096, true), d(0x3000, 1, true)]).unwrap();
        assert_eq!((req.kind, req.sector), (VIRTIO_BLK_T_IN, 7));
        assert!(req.readable.is_empty());
        assert_eq!(req.writable, [Region { addr: GuestAddress(0x2000), len: 4096 }]);
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 3);
        // Header and 512 bytes of data in one readable descriptor; data split; status at the end
        // of a writable descriptor that holds nothing else.
        let req = parse(&mem, [d(0x1000, 16 + 512, false), d(0x4000, 512, false), d(0x5000, 1, true)]).unwrap();
        assert_eq!(req.kind, VIRTIO_BLK_T_OUT);
        assert_eq!(total(&req.readable), 1024);
        assert_eq!(req.readable[0].addr, GuestAddress(0x1010));
        // A header split over two descriptors.
        header(&mem, 0x6000, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse(&mem, [d(0x6000, 8, false), d(0x6008, 8, false), d(0x7000, 1, true)]).unwrap();
        assert_eq!(req.kind, VIRTIO_BLK_T_FLUSH);
    }

    #[test]
    fn chains_that_cannot_be_answered() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(&mem, [d(0x1000, 16, false), d(MEM - 8, 4096, true), d(0x3000, 1, true)]).unwrap_err(),
            ChainError::OutsideMemory { addr: MEM - 8, len: 4096 }
        );
        assert_eq!(
            parse(&mem, [d(u64::MAX - 1, 16, false), d(0x3000, 1, true)]).unwrap_err(),
            ChainError::OutsideMemory { addr: u64::MAX - 1, len: 16 }
        );
        assert_eq!(parse(&mem, [d(0x1000, 16, false), d(0x2000, 512, false)]).unwrap_err(), ChainError::NoStatus);
        assert_eq!(
            parse(&mem, [d(0x1000, 16, false), d(0x3000, 1, true), d(0x2000, 512, false)]).unwrap_err(),
            ChainError::WrongDirection
        );
        assert_eq!(parse(&mem, [d(0x1000, 8, false), d(0x3000, 1, true)]).unwrap_err(), ChainError::ShortHeader);
        assert_eq!(parse(&mem, []).unwrap_err(), ChainError::NoStatus);
    }

    #[test]
    fn gather_and_scatter_follow_the_regions() {
        let mem = memory();
        let regions = [Region { addr: GuestAddress(0x8000), len: 3 }, Region { addr: GuestAddress(0x9000), len: 5 }];
        assert_eq!(scatter(&mem, &regions, b"abcdefgh").unwrap(), 8);
        let mut out = [0u8; 8];
        gather(&mem, &regions, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        assert_eq!(scatter(&mem, &regions, b"0123456789").unwrap(), 8);
    }
}
