//! Turning a virtio-blk descriptor chain into a request, checking everything the guest wrote.
//!
//! The virtio spec lays a request out as device-readable bytes (the 16-byte header, then a
//! write's data) followed by device-writable bytes (a read's data, then the status byte). Nothing
//! else is assumed: the header and data may share descriptors or be split across several.
//!
//! Every length is bounded here, once, before anything is allocated or started for the request:
//! a chain may hold at most [`MAX_DESCRIPTORS`] descriptors of each direction, a request at most
//! [`SEG_MAX`] data segments and [`MAX_IO_BYTES`] in all, and a discard or write-zeroes request
//! exactly one 16-byte segment. These are the limits the config space advertises
//! ([`ConfigSpace`]), so a driver that follows the spec never meets them. One is not held: a
//! segment may be larger than [`SIZE_MAX`], as libblkio sends a caller's buffer as one segment
//! whatever its size; the total is what bounds memory. A chain that breaks a limit gets `IOERR`
//! for itself alone; a chain with no place for a status byte (it reaches outside guest memory,
//! its directions are mixed, or the queue cut it short) is returned with nothing written.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::device::MAX_IO_BYTES;

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
/// Length of the request header.
const HEADER_BYTES: usize = 16;

/// Largest data segment a driver should send (config `size_max`); [`SIZE_MAX`] times [`SEG_MAX`]
/// is the largest request, as Linux sizes its requests by their product.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments in one request (config `seg_max`): together at most [`MAX_IO_BYTES`].
pub const SEG_MAX: u32 = (MAX_IO_BYTES / SIZE_MAX as u64) as u32;
/// Discard and write-zeroes segments in one request (config `max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_RANGE_SEGMENTS: u32 = 1;
/// Most descriptors of one direction: the data segments plus one for the header or the status.
/// (A driver may split the header, or share a descriptor between header and data; what counts
/// against `seg_max` is checked on the data once the header and status are taken off.)
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 1;

/// A run of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    /// The descriptor says another follows. The last one a chain yields must not: if it does, the
    /// queue stopped the chain early (a loop, or more than 4 GiB) and its status byte is unknown.
    pub has_next: bool,
}

/// At most [`MAX_DESCRIPTORS`] regions, kept inline: parsing allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    regions: [Region; MAX_DESCRIPTORS],
    len: usize,
}

impl Default for Regions {
    fn default() -> Regions {
        Regions { regions: [Region::default(); MAX_DESCRIPTORS], len: 0 }
    }
}

impl Regions {
    fn push(&mut self, region: Region) -> bool {
        let Some(slot) = self.regions.get_mut(self.len) else { return false };
        *slot = region;
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[Region] {
        &self.regions[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes; cannot overflow, as there are few regions of at most 4 GiB each.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|r| r.len as u64).sum()
    }

    /// Takes the last byte off the end, for the status.
    fn take_last_byte(&mut self) -> Option<GuestAddress> {
        let last = self.as_slice().last().copied()?;
        let addr = GuestAddress(last.addr.0 + last.len as u64 - 1);
        self.regions[self.len - 1].len -= 1;
        if last.len == 1 {
            self.len -= 1;
        }
        Some(addr)
    }

    /// Takes `n` bytes off the front, for the header.
    fn skip_front(&mut self, mut n: usize) {
        let mut first = 0;
        while n > 0 && first < self.len {
            let r = &mut self.regions[first];
            let k = r.len.min(n);
            r.addr = GuestAddress(r.addr.0 + k as u64);
            r.len -= k;
            n -= k;
            if r.len == 0 {
                first += 1;
            }
        }
        self.regions.copy_within(first..self.len, 0);
        self.len -= first;
    }
}

/// A request whose layout is sound and whose every length is within the advertised limits.
#[derive(Debug)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable bytes after the header (a write's data, discard segments).
    pub readable: Regions,
    /// Device-writable bytes before the status byte (a read's data, the id).
    pub writable: Regions,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor at {addr:#x} of {len} bytes lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    WrongDirection,
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the queue cut the chain short (a loop, or over 4 GiB), so its status byte is unknown")]
    Truncated,
    #[error("the chain is shorter than the 16-byte request header")]
    ShortHeader,
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors of one direction")]
    TooManyDescriptors,
    #[error("{segments} data segments, more than the {max} advertised")]
    TooManySegments { segments: usize, max: u32 },
    #[error("{len} bytes of data, more than the {MAX_IO_BYTES} a request may carry")]
    TooLarge { len: u64 },
    #[error("{len} bytes of data is not a whole number of 512-byte sectors")]
    Misaligned { len: u64 },
    #[error("a request of type {kind} carries data in the wrong direction")]
    UnexpectedData { kind: u32 },
}

/// A refused chain: where its status goes, if it has a trustworthy one, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// `None` when the chain cannot be answered at all; it is only returned, with nothing written.
    pub status: Option<GuestAddress>,
    pub error: ChainError,
}

impl ChainError {
    fn without_status(self) -> Refused {
        Refused { status: None, error: self }
    }

    fn with_status(self, status: GuestAddress) -> Refused {
        Refused { status: Some(status), error: self }
    }
}

/// Checks a chain's descriptors, finds its header, data and status, and holds its lengths to the
/// advertised limits.
pub fn parse<M: GuestMemory>(mem: &M, descs: impl IntoIterator<Item = Desc>) -> Result<Request, Refused> {
    let mut readable = Regions::default();
    let mut writable = Regions::default();
    let mut too_many = false;
    let mut last_has_next = false;
    let mut any = false;
    for d in descs {
        any = true;
        last_has_next = d.has_next;
        let access = if d.write_only { Permissions::Write } else { Permissions::Read };
        if !mem.check_range(d.addr, d.len as usize, access) {
            return Err(ChainError::OutsideMemory { addr: d.addr.0, len: d.len }.without_status());
        }
        if d.len == 0 {
            continue;
        }
        let region = Region { addr: d.addr, len: d.len as usize };
        let pushed = match d.write_only {
            // The last writable descriptor holds the status, so keep it even past the limit.
            true if !writable.push(region) => {
                writable.regions[MAX_DESCRIPTORS - 1] = region;
                false
            }
            true => true,
            false if writable.is_empty() => readable.push(region),
            false => return Err(ChainError::WrongDirection.without_status()),
        };
        too_many |= !pushed;
    }
    if any && last_has_next {
        return Err(ChainError::Truncated.without_status());
    }
    let status = writable.take_last_byte().ok_or(ChainError::NoStatus.without_status())?;
    if too_many {
        return Err(ChainError::TooManyDescriptors.with_status(status));
    }
    if readable.total() < HEADER_BYTES as u64 {
        return Err(ChainError::ShortHeader.with_status(status));
    }
    let mut header = [0u8; HEADER_BYTES];
    gather(mem, readable.as_slice(), &mut header).map_err(|_| ChainError::ShortHeader.with_status(status))?;
    readable.skip_front(HEADER_BYTES);
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);
    let req = Request { kind, sector, readable, writable, status };
    check_lengths(&req).map_err(|e| e.with_status(status))?;
    Ok(req)
}

/// Holds a request's data to what its type carries and to the advertised limits.
fn check_lengths(req: &Request) -> Result<(), ChainError> {
    let (data, other) = match req.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => (&req.writable, &req.readable),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES | VIRTIO_BLK_T_FLUSH => {
            (&req.readable, &req.writable)
        }
        // Unknown types are answered UNSUPP without looking at their data, which the bounds on
        // descriptors already limit.
        _ => return Ok(()),
    };
    if !other.is_empty() {
        return Err(ChainError::UnexpectedData { kind: req.kind });
    }
    let len = data.total();
    match req.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if data.len() > SEG_MAX as usize {
                return Err(ChainError::TooManySegments { segments: data.len(), max: SEG_MAX });
            }
            if len > MAX_IO_BYTES {
                return Err(ChainError::TooLarge { len });
            }
            if len % SECTOR != 0 {
                return Err(ChainError::Misaligned { len });
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let segments = len / SEGMENT_BYTES as u64;
            if len % SEGMENT_BYTES as u64 != 0 || segments == 0 {
                return Err(ChainError::Misaligned { len });
            }
            if segments > u64::from(MAX_RANGE_SEGMENTS) {
                return Err(ChainError::TooManySegments { segments: segments as usize, max: MAX_RANGE_SEGMENTS });
            }
        }
        VIRTIO_BLK_T_FLUSH if len != 0 => return Err(ChainError::UnexpectedData { kind: req.kind }),
        // GET_ID writes at most ID_BYTES into whatever the guest gave.
        _ => {}
    }
    Ok(())
}

/// The virtio-blk configuration space (virtio 1.2, 5.2.4), as far as the features vstor offers
/// reach: little-endian fields at the offsets the spec gives, without padding.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigSpace {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry: [u8; 4],
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub unused: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<ConfigSpace>() == 60);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, wce) == 32);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, write_zeroes_may_unmap) == 56);

// SAFETY: a packed struct of integers and byte arrays: no padding, and every bit pattern is a
// valid value.
unsafe impl ByteValued for ConfigSpace {}

/// Offset of `wce` (writeback cache enabled), the one field a driver may write.
pub const CONFIG_WCE_OFFSET: u32 = std::mem::offset_of!(ConfigSpace, wce) as u32;

impl ConfigSpace {
    /// The config of a disk: its size and block size, the request limits [`parse`] holds every
    /// request to, and the cache mode.
    pub fn new(capacity: u64, block_size: u32, num_queues: u16, writeback: bool) -> ConfigSpace {
        let sectors_per_block = block_size / SECTOR as u32;
        // A discard or write-zeroes segment counts sectors in a u32; keep it block-aligned.
        let max_range_sectors = u32::MAX - (u32::MAX % sectors_per_block.max(1));
        ConfigSpace {
            capacity: (capacity / SECTOR).to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: SEG_MAX.to_le(),
            blk_size: block_size.to_le(),
            // One logical block is one physical block; optimal I/O is a page.
            min_io_size: 1u16.to_le(),
            opt_io_size: (4096 / block_size).max(1).to_le(),
            wce: u8::from(writeback),
            num_queues: num_queues.to_le(),
            max_discard_sectors: max_range_sectors.to_le(),
            max_discard_seg: MAX_RANGE_SEGMENTS.to_le(),
            discard_sector_alignment: sectors_per_block.to_le(),
            max_write_zeroes_sectors: max_range_sectors.to_le(),
            max_write_zeroes_seg: MAX_RANGE_SEGMENTS.to_le(),
            write_zeroes_may_unmap: 1,
            ..ConfigSpace::default()
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 4 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// A chain as a driver links it: every descriptor but the last says another follows.
    fn chain(descs: &[(u64, u32, bool)]) -> Vec<Desc> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write_only))| Desc {
                addr: GuestAddress(addr),
                len,
                write_only,
                has_next: i + 1 < n,
            })
            .collect()
    }

    fn refused(mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> Refused {
        parse(mem, chain(descs)).unwrap_err()
    }

    #[test]
    fn the_usual_three_descriptor_layout() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 7);
        let req = parse(&mem, chain(&[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)])).unwrap();
        assert_eq!((req.kind, req.sector), (VIRTIO_BLK_T_IN, 7));
        assert!(req.readable.is_empty());
        assert_eq!(req.writable.as_slice(), [Region { addr: GuestAddress(0x2000), len: 4096 }]);
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 3);
        // Header and 512 bytes of data in one readable descriptor; data split; status at the end
        // of a writable descriptor that holds nothing else.
        let req = parse(&mem, chain(&[(0x1000, 16 + 512, false), (0x4000, 512, false), (0x5000, 1, true)])).unwrap();
        assert_eq!(req.kind, VIRTIO_BLK_T_OUT);
        assert_eq!(req.readable.total(), 1024);
        assert_eq!(req.readable.as_slice()[0].addr, GuestAddress(0x1010));
        // A header split over two descriptors.
        header(&mem, 0x6000, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse(&mem, chain(&[(0x6000, 8, false), (0x6008, 8, false), (0x7000, 1, true)])).unwrap();
        assert_eq!(req.kind, VIRTIO_BLK_T_FLUSH);
        // A read's data and its status in one writable descriptor.
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let req = parse(&mem, chain(&[(0x1000, 16, false), (0x8000, 513, true)])).unwrap();
        assert_eq!(req.writable.total(), 512);
        assert_eq!(req.status, GuestAddress(0x8200));
    }

    #[test]
    fn chains_that_cannot_be_answered() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let no_status = |error| Refused { status: None, error };
        assert_eq!(
            refused(&mem, &[(0x1000, 16, false), (MEM - 8, 4096, true), (0x3000, 1, true)]),
            no_status(ChainError::OutsideMemory { addr: MEM - 8, len: 4096 })
        );
        assert_eq!(
            refused(&mem, &[(u64::MAX - 1, 16, false), (0x3000, 1, true)]),
            no_status(ChainError::OutsideMemory { addr: u64::MAX - 1, len: 16 })
        );
        assert_eq!(refused(&mem, &[(0x1000, 16, false), (0x2000, 512, false)]), no_status(ChainError::NoStatus));
        assert_eq!(
            refused(&mem, &[(0x1000, 16, false), (0x3000, 1, true), (0x2000, 512, false)]),
            no_status(ChainError::WrongDirection)
        );
        assert_eq!(parse(&mem, []).unwrap_err(), no_status(ChainError::NoStatus));
        // The queue stopped yielding a chain whose last descriptor still points on: the byte that
        // looks like the status is data.
        let mut cut = chain(&[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 4096, true)]);
        cut[2].has_next = true;
        assert_eq!(parse(&mem, cut).unwrap_err(), no_status(ChainError::Truncated));
    }

    #[test]
    fn chains_beyond_the_limits_get_an_error_status() {
        let mem = memory();
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let status = GuestAddress(0x3000);
        let err = |error| Refused { status: Some(status), error };
        assert_eq!(refused(&mem, &[(0x1000, 8, false), (0x3000, 1, true)]), err(ChainError::ShortHeader));
        // Reads and writes: seg_max segments, MAX_IO_BYTES in all, whole sectors. A segment
        // larger than size_max is let through (libblkio sends one), as long as the total fits.
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert!(parse(&mem, chain(&[(0x1000, 16, false), (0, 2 * SIZE_MAX, true), (0x3000, 1, true)])).is_ok());
        let mut descs = vec![(0x1000, 16, false)];
        descs.extend((0..SEG_MAX).map(|_| (0, 4 << 20, true)));
        descs.push((0x3000, 1, true));
        assert_eq!(refused(&mem, &descs), err(ChainError::TooLarge { len: u64::from(SEG_MAX) * (4 << 20) }));
        // One data segment too many, the status sharing the last one's descriptor.
        let mut descs = vec![(0x1000, 16, false)];
        descs.extend((0..SEG_MAX).map(|_| (0x4000, 512, true)));
        descs.push((0x2e00, 513, true));
        assert_eq!(
            refused(&mem, &descs),
            err(ChainError::TooManySegments { segments: SEG_MAX as usize + 1, max: SEG_MAX })
        );
        assert_eq!(
            refused(&mem, &[(0x1000, 16, false), (0x4000, 100, true), (0x3000, 1, true)]),
            err(ChainError::Misaligned { len: 100 })
        );
        // Far more descriptors than any request has: refused, and the status still found.
        let mut descs = vec![(0x1000, 16, false)];
        descs.extend((0..1000).map(|_| (0x4000, 512, true)));
        descs.push((0x3000, 1, true));
        assert_eq!(refused(&mem, &descs), err(ChainError::TooManyDescriptors));
        // Data in the direction the type does not use.
        assert_eq!(
            refused(&mem, &[(0x1000, 16 + 512, false), (0x4000, 512, true), (0x3000, 1, true)]),
            err(ChainError::UnexpectedData { kind: VIRTIO_BLK_T_IN })
        );
        // Discard and write-zeroes: exactly one 16-byte segment.
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            header(&mem, 0x1000, kind, 0);
            assert!(parse(&mem, chain(&[(0x1000, 16, false), (0x5000, 16, false), (0x3000, 1, true)])).is_ok());
            assert_eq!(
                refused(&mem, &[(0x1000, 16, false), (0x5000, 32, false), (0x3000, 1, true)]),
                err(ChainError::TooManySegments { segments: 2, max: MAX_RANGE_SEGMENTS })
            );
            assert_eq!(
                refused(&mem, &[(0x1000, 16, false), (0x5000, 20, false), (0x3000, 1, true)]),
                err(ChainError::Misaligned { len: 20 })
            );
            assert_eq!(
                refused(&mem, &[(0x1000, 16, false), (0x3000, 1, true)]),
                err(ChainError::Misaligned { len: 0 })
            );
        }
        // The largest request the config allows is accepted.
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![(0x1000, 16, false)];
        descs.extend((0..SEG_MAX).map(|_| (0, SIZE_MAX, false)));
        descs.push((0x3000, 1, true));
        assert_eq!(parse(&mem, chain(&descs)).unwrap().readable.total(), MAX_IO_BYTES);
    }

    #[test]
    fn the_config_space_advertises_the_limits_parse_holds_to() {
        let config = ConfigSpace::new(1 << 30, 4096, 2, true);
        let bytes = config.as_slice();
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(bytes[0..8].try_into().unwrap()), (1 << 30) / 512);
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(12), SEG_MAX);
        assert_eq!(u64::from(u32_at(8)) * u64::from(u32_at(12)), MAX_IO_BYTES);
        assert_eq!(u32_at(20), 4096);
        assert_eq!(bytes[CONFIG_WCE_OFFSET as usize], 1);
        assert_eq!(u16::from_le_bytes([bytes[34], bytes[35]]), 2);
        assert_eq!((u32_at(40), u32_at(52)), (MAX_RANGE_SEGMENTS, MAX_RANGE_SEGMENTS));
        assert_eq!(u32_at(44), 8, "discards are aligned to whole 4 KiB blocks");
        assert_eq!(u32_at(36) % 8, 0);
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
