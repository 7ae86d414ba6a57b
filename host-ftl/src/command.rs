//! The NVMe wire format: 64-byte submission entries and 16-byte completions (their status
//! codes are in [`crate::status`]).
//!
//! Pointers in a submission entry (data pointer PRP1, metadata pointer MPTR, address lists) are
//! byte offsets into the submitter's [`crate::dma::DmaRegion`], not host memory addresses.

use crate::error::{Error, Result};
use crate::geometry::MAX_VECTOR;
pub use crate::status::{sct, Status};

/// I/O command opcodes (submitted with [`crate::Device::execute`]).
pub mod opcode {
    /// Flush: everything completed before is durable when this completes.
    pub const FLUSH: u8 = 0x00;
    /// Vector chunk reset.
    pub const VECTOR_RESET: u8 = 0x90;
    /// Vector write.
    pub const VECTOR_WRITE: u8 = 0x91;
    /// Vector read.
    pub const VECTOR_READ: u8 = 0x92;
    /// Vector copy.
    pub const VECTOR_COPY: u8 = 0x93;
}

/// Admin command opcodes (submitted with [`crate::Device::execute_admin`]). NVMe numbers admin
/// and I/O opcodes separately (0x02 is Get Log Page here, Read on an I/O queue), so the two
/// kinds go to separate entry points, as they go to separate queues on a real device.
pub mod admin {
    /// Get Log Page; CDW10 bits 0-7 = log id, bits 16-31 = dwords − 1 (low), CDW11 bits 0-15 =
    /// dwords − 1 (high), CDW12-13 = byte offset into the page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Geometry: 4096 bytes written at the data pointer.
    pub const GEOMETRY: u8 = 0xE2;
    /// Log id of the chunk information page (32 bytes per chunk).
    pub const LOG_CHUNK_INFO: u8 = 0xCA;
    /// Log id of the chunk notification page (64 bytes per entry).
    pub const LOG_CHUNK_NOTIFICATION: u8 = 0xD0;
}

/// CDW12 bit 30 on a vector write or copy: force unit access, the data is durable when the
/// command completes.
pub const FUA: u32 = 1 << 30;

/// The one namespace the device has.
pub const NSID: u32 = 1;

/// A 64-byte submission queue entry.
///
/// | bytes | field |
/// |---|---|
/// | 0 | opcode |
/// | 1 | flags (ignored) |
/// | 2-3 | command id |
/// | 4-7 | namespace id |
/// | 16-23 | metadata pointer (MPTR): out-of-band bytes, `oob_size` per address |
/// | 24-31 | data pointer (PRP1): data, `block_size` per address |
/// | 32-39 | PRP2 (ignored) |
/// | 40-47 | CDW10-11: address list pointer, or the address itself when there is one address |
/// | 48-51 | CDW12: bits 0-5 = number of addresses − 1; bit 30 = FUA |
/// | 56-63 | CDW14-15: destination address list pointer (vector copy), or the address itself |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

fn le32(b: &[u8; 64], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8; 64], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

impl Sqe {
    /// Decodes any 64 bytes; whether the command makes sense is for the device to say.
    pub fn from_bytes(b: &[u8; 64]) -> Sqe {
        Sqe {
            opcode: b[0],
            flags: b[1],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            mptr: le64(b, 16),
            prp1: le64(b, 24),
            prp2: le64(b, 32),
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        let words = [
            (4, self.nsid),
            (8, self.cdw2),
            (12, self.cdw3),
            (40, self.cdw10),
            (44, self.cdw11),
            (48, self.cdw12),
            (52, self.cdw13),
            (56, self.cdw14),
            (60, self.cdw15),
        ];
        for (at, v) in words {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (at, v) in [(16, self.mptr), (24, self.prp1), (32, self.prp2)] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// A vector command of `naddr` addresses (1 to 64). `lba` is the address list's offset in
    /// the region, or the address itself when `naddr` is 1; `data` and `meta` are the offsets
    /// of the data and out-of-band buffers.
    pub fn vector(opcode: u8, cid: u16, naddr: usize, lba: u64, data: u64, meta: u64) -> Result<Sqe> {
        if naddr == 0 || naddr > MAX_VECTOR {
            return Err(Error::BadAddressCount(naddr));
        }
        let mut s =
            Sqe { opcode, cid, nsid: NSID, mptr: meta, prp1: data, cdw12: (naddr - 1) as u32, ..Sqe::default() };
        s.set_lba_field(lba);
        Ok(s)
    }

    /// A vector copy from the sources at `src` to the destinations at `dst` (list offsets, or
    /// the addresses themselves when `naddr` is 1).
    pub fn vector_copy(cid: u16, naddr: usize, src: u64, dst: u64) -> Result<Sqe> {
        let mut s = Sqe::vector(opcode::VECTOR_COPY, cid, naddr, src, 0, 0)?;
        s.set_dst_field(dst);
        Ok(s)
    }

    /// A flush.
    pub fn flush(cid: u16) -> Sqe {
        Sqe { opcode: opcode::FLUSH, cid, nsid: NSID, ..Sqe::default() }
    }

    /// The admin Geometry command, writing the 4096-byte structure at `data`.
    pub fn geometry(cid: u16, data: u64) -> Sqe {
        Sqe { opcode: admin::GEOMETRY, cid, nsid: NSID, prp1: data, ..Sqe::default() }
    }

    /// The admin Get Log Page command: `len` bytes (a multiple of 4, at least 4) of log `lid`
    /// from byte `offset`, written at `data`.
    pub fn get_log_page(cid: u16, lid: u8, offset: u64, len: u32, data: u64) -> Sqe {
        let numd = (len / 4).saturating_sub(1);
        Sqe {
            opcode: admin::GET_LOG_PAGE,
            cid,
            nsid: NSID,
            prp1: data,
            cdw10: u32::from(lid) | (numd & 0xffff) << 16,
            cdw11: numd >> 16,
            cdw12: offset as u32,
            cdw13: (offset >> 32) as u32,
            ..Sqe::default()
        }
    }

    /// Number of addresses of a vector command (1 to 64).
    pub fn naddr(&self) -> usize {
        (self.cdw12 & 0x3f) as usize + 1
    }

    /// CDW10-11: the address list pointer, or the address itself.
    pub fn lba_field(&self) -> u64 {
        u64::from(self.cdw10) | u64::from(self.cdw11) << 32
    }

    pub fn set_lba_field(&mut self, v: u64) {
        self.cdw10 = v as u32;
        self.cdw11 = (v >> 32) as u32;
    }

    /// CDW14-15: the destination list pointer of a copy, or the address itself.
    pub fn dst_field(&self) -> u64 {
        u64::from(self.cdw14) | u64::from(self.cdw15) << 32
    }

    pub fn set_dst_field(&mut self, v: u64) {
        self.cdw14 = v as u32;
        self.cdw15 = (v >> 32) as u32;
    }

    /// Whether the FUA bit is set.
    pub fn fua(&self) -> bool {
        self.cdw12 & FUA != 0
    }
}

/// A 16-byte completion queue entry.
///
/// | bytes | field |
/// |---|---|
/// | 0-7 | DW0-1: for vector commands, bit *i* set ⇔ address *i* failed (or warned, see [`Status::HIGH_ECC`]) |
/// | 8-9 | SQ head (filled by whoever owns the queue; 0 from the device) |
/// | 10-11 | SQ id (likewise) |
/// | 12-13 | command id |
/// | 14-15 | bit 0 phase, bits 1-8 status code, bits 9-11 status code type, bit 15 do-not-retry |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cqe {
    pub result: u64,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub phase: bool,
    pub status: Status,
    /// Do not retry: set on every error except internal (media) errors; not on the warning.
    pub dnr: bool,
}

impl Cqe {
    /// The completion of command `cid` with a status and status bitmap.
    pub fn new(cid: u16, status: Status, bitmap: u64) -> Cqe {
        let dnr = !status.data_valid() && status != Status::INTERNAL_ERROR && status != Status::QUEUE_FULL;
        Cqe { result: bitmap, cid, status, dnr, ..Cqe::default() }
    }

    pub fn from_bytes(b: &[u8; 16]) -> Cqe {
        let mut r = [0u8; 8];
        r.copy_from_slice(&b[0..8]);
        let sf = u16::from_le_bytes([b[14], b[15]]);
        Cqe {
            result: u64::from_le_bytes(r),
            sqhd: u16::from_le_bytes([b[8], b[9]]),
            sqid: u16::from_le_bytes([b[10], b[11]]),
            cid: u16::from_le_bytes([b[12], b[13]]),
            phase: sf & 1 != 0,
            status: Status { sc: (sf >> 1) as u8, sct: ((sf >> 9) & 7) as u8 },
            dnr: sf & 0x8000 != 0,
        }
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.result.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        let sf = u16::from(self.phase)
            | u16::from(self.status.sc) << 1
            | u16::from(self.status.sct & 7) << 9
            | u16::from(self.dnr) << 15;
        b[14..16].copy_from_slice(&sf.to_le_bytes());
        b
    }

    /// The per-address status bitmap of a vector command.
    pub fn bitmap(&self) -> u64 {
        self.result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sqe_fields_sit_at_their_offsets() {
        let mut s = Sqe::vector(opcode::VECTOR_WRITE, 0x1234, 3, 0x1122_3344_5566_7788, 0x4000, 0x8000).unwrap();
        s.cdw12 |= FUA;
        let b = s.to_bytes();
        assert_eq!(b[0], 0x91);
        assert_eq!(&b[2..4], &[0x34, 0x12]);
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[16..24], &0x8000u64.to_le_bytes());
        assert_eq!(&b[24..32], &0x4000u64.to_le_bytes());
        assert_eq!(&b[40..48], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[48] & 0x3f, 2);
        assert_eq!(s.naddr(), 3);
        assert!(s.fua());
        assert_eq!(Sqe::from_bytes(&b), s);
        let c = Sqe::vector_copy(1, 2, 0x100, 0x200).unwrap();
        assert_eq!(&c.to_bytes()[56..64], &0x200u64.to_le_bytes());
        assert_eq!(c.dst_field(), 0x200);
    }

    #[test]
    fn vector_builder_refuses_bad_counts() {
        assert!(Sqe::vector(opcode::VECTOR_READ, 0, 0, 0, 0, 0).is_err());
        assert!(Sqe::vector(opcode::VECTOR_READ, 0, 65, 0, 0, 0).is_err());
        assert_eq!(Sqe::vector(opcode::VECTOR_READ, 0, 64, 0, 0, 0).unwrap().naddr(), 64);
    }

    #[test]
    fn log_page_fields() {
        let s = Sqe::get_log_page(7, admin::LOG_CHUNK_INFO, 0x1_0000_0020, 0x40000 * 4, 0x10);
        assert_eq!(s.cdw10 & 0xff, 0xCA);
        let numd = ((s.cdw11 & 0xffff) << 16 | s.cdw10 >> 16) + 1;
        assert_eq!(numd, 0x40000);
        assert_eq!((s.cdw12, s.cdw13), (0x20, 1));
    }

    #[test]
    fn cqe_status_field_layout() {
        let c = Cqe { phase: true, sqhd: 3, sqid: 4, ..Cqe::new(9, Status::OUT_OF_ORDER_WRITE, 0b101) };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &5u64.to_le_bytes());
        assert_eq!(&b[12..14], &9u16.to_le_bytes());
        let sf = u16::from_le_bytes([b[14], b[15]]);
        assert_eq!(sf, 1 | 0xF2 << 1 | 2 << 9 | 1 << 15);
        assert_eq!(Cqe::from_bytes(&b), c);
        assert!(!Cqe::new(0, Status::HIGH_ECC, 1).dnr);
        assert!(!Cqe::new(0, Status::SUCCESS, 0).dnr);
    }

    proptest! {
        #[test]
        fn sqe_bytes_round_trip(bytes in proptest::array::uniform32(any::<u8>()), more in proptest::array::uniform32(any::<u8>())) {
            let mut b = [0u8; 64];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&more);
            prop_assert_eq!(Sqe::from_bytes(&b).to_bytes(), b);
        }

        #[test]
        fn cqe_bytes_round_trip(bytes in proptest::array::uniform16(any::<u8>())) {
            let mut b = bytes;
            b[15] &= 0x8f; // CRD and More bits are not modelled
            prop_assert_eq!(Cqe::from_bytes(&b).to_bytes(), b);
        }
    }
}
