//! How the FTL lays 4 KiB logical blocks onto the guest's chunks.
//!
//! A *slot* holds one 4 KiB logical block: `4096 / block_size` consecutive device blocks
//! (sectors) of one chunk. Slots are numbered globally as `chunk * slots_per_chunk + s`, with
//! chunks in log-page order (`pu * num_chk + chk`), so a slot fits a `u32` and the map is a flat
//! array. Every write to a chunk is a multiple of [`Layout::min_slots`] slots (a multiple of
//! `ws_min` sectors); a full stripe unit is [`Layout::unit`] slots (`ws_opt` sectors, rounded up
//! to whole slots).
//!
//! Each slot carries 16 bytes of out-of-band metadata in its first sector ([`Oob`]): the logical
//! block it holds, the generation of the line its chunk belongs to, and the sequence number of
//! the data's version.

use host_ftl::{Addr, Geometry};

use crate::error::{FtlError, Result};

/// Bytes in a logical block.
pub const LBA_BYTES: usize = 4096;
/// Bytes of OOB metadata the FTL needs per slot.
pub const OOB_BYTES: usize = 16;
/// No slot: an unmapped logical block.
pub const NO_SLOT: u32 = u32::MAX;
/// OOB `lba` of a padding slot.
pub const PAD_LBA: u32 = u32::MAX;
/// Sequence numbers the FTL gives out stay at or below this (2^62: a write every nanosecond
/// for 146 years). A larger one in a record or an OOB was not written by the FTL, and taking
/// it would leave no room to count on: the next writes would wrap below older versions.
pub const MAX_SEQ: u64 = 1 << 62;
/// Line generations the FTL gives out stay at or below this; the 2^20 above it are not used,
/// so recovery's own generation (`u32::MAX`) and a generation read from flash plus one never
/// wrap. A device's lines are opened far fewer times (each opening wears a chunk per PU).
pub const MAX_GEN: u32 = u32::MAX - (1 << 20);

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The geometry as the FTL sees it.
#[derive(Clone, Debug)]
pub struct Layout {
    pub geo: Geometry,
    /// Sectors per slot.
    pub spl: u32,
    /// Slots per chunk.
    pub spc: u32,
    /// Slots in the smallest write (a multiple of `ws_min` sectors).
    pub min_slots: u32,
    /// Slots in a stripe unit (about `ws_opt` sectors).
    pub unit: u32,
    /// Slots one command may carry (at most 64 sectors, a multiple of `min_slots`).
    pub max_cmd_slots: u32,
    /// Chunks in the partition.
    pub chunks: u32,
    /// Parallel units in the partition.
    pub pus: u32,
}

impl Layout {
    /// Checks that the geometry can carry 4 KiB slots and derives the layout.
    pub fn new(geo: &Geometry) -> Result<Layout> {
        geo.validate().map_err(|e| FtlError::Geometry(e.to_string()))?;
        let bs = geo.block_size as usize;
        if bs > LBA_BYTES || LBA_BYTES % bs != 0 {
            return Err(FtlError::Geometry(format!("block size {bs} does not divide 4096")));
        }
        let spl = (LBA_BYTES / bs) as u32;
        if (geo.oob_size as usize) < OOB_BYTES {
            return Err(FtlError::Geometry(format!("{} OOB bytes per block, need {OOB_BYTES}", geo.oob_size)));
        }
        if geo.clba % spl != 0 {
            return Err(FtlError::Geometry(format!("clba {} is not a multiple of {spl} blocks", geo.clba)));
        }
        let spc = geo.clba / spl;
        let min_sectors = geo.ws_min / gcd(geo.ws_min, spl) * spl;
        let min_slots = min_sectors / spl;
        let unit = geo.ws_opt.div_ceil(spl).next_multiple_of(min_slots).max(min_slots);
        let max_cmd_slots = (64 / spl) / min_slots * min_slots;
        if max_cmd_slots == 0 {
            return Err(FtlError::Geometry(format!("a write of {min_slots} slots does not fit one command")));
        }
        if spc % unit != 0 || spc < unit {
            return Err(FtlError::Geometry(format!("{spc} slots per chunk is not a multiple of a {unit}-slot unit")));
        }
        Ok(Layout {
            geo: geo.clone(),
            spl,
            spc,
            min_slots,
            unit,
            max_cmd_slots,
            chunks: geo.total_chunks() as u32,
            pus: geo.total_pus() as u32,
        })
    }

    /// All slots of the partition.
    pub fn total_slots(&self) -> u64 {
        u64::from(self.chunks) * u64::from(self.spc)
    }

    pub fn chunk_of(&self, slot: u32) -> u32 {
        slot / self.spc
    }

    pub fn offset_of(&self, slot: u32) -> u32 {
        slot % self.spc
    }

    pub fn slot(&self, chunk: u32, offset: u32) -> u32 {
        chunk * self.spc + offset
    }

    pub fn pu_of_chunk(&self, chunk: u32) -> u32 {
        chunk / self.geo.num_chk
    }

    /// Chunk index of chunk `chk` of PU `pu`.
    pub fn chunk_on(&self, pu: u32, chk: u32) -> u32 {
        pu * self.geo.num_chk + chk
    }

    /// The device addresses of the sectors of slots `offset..offset + n` of `chunk`.
    pub fn ppas(&self, chunk: u32, offset: u32, n: u32) -> Vec<u64> {
        let first = offset * self.spl;
        (first..first + n * self.spl).map(|blk| self.sector_ppa(chunk, blk)).collect()
    }

    /// The device address of sector `blk` of `chunk`.
    pub fn sector_ppa(&self, chunk: u32, blk: u32) -> u64 {
        // Chunk indexes come from the layout and blocks stay below clba, so this always encodes;
        // 0 is never used as a fallback for a real address.
        Addr::from_chunk_index(&self.geo, chunk as usize, blk)
            .and_then(|a| a.to_ppa(&self.geo))
            .map(|p| p.0)
            .unwrap_or(0)
    }

    /// The address of a chunk's first sector (for resets).
    pub fn chunk_ppa(&self, chunk: u32) -> u64 {
        self.sector_ppa(chunk, 0)
    }

    /// The chunk index of a device address, if it is one of ours.
    pub fn chunk_of_ppa(&self, ppa: u64) -> Option<u32> {
        let a = host_ftl::Ppa(ppa).to_addr(&self.geo).ok()?;
        a.chunk_index(&self.geo).ok().map(|c| c as u32)
    }

    /// Slots a chunk whose write pointer is at sector `wp` can return: an open chunk keeps its
    /// last `mw_cunits` sectors in the device's cache.
    pub fn readable_slots(&self, wp_sectors: u32, open: bool) -> u32 {
        if !open {
            return wp_sectors / self.spl;
        }
        wp_sectors.saturating_sub(self.geo.mw_cunits) / self.spl
    }

    /// Bytes of OOB per slot on the device.
    pub fn oob_per_slot(&self) -> usize {
        self.spl as usize * self.geo.oob_size as usize
    }
}

/// What a slot's out-of-band bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Oob {
    /// The logical block, or [`PAD_LBA`].
    pub lba: u32,
    /// Generation of the line the chunk was written in.
    pub gen: u32,
    /// Version of the data: the sequence number of the user write (kept by relocation).
    pub seq: u64,
}

impl Oob {
    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.lba.to_le_bytes());
        out[4..8].copy_from_slice(&self.gen.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
    }

    /// Decodes OOB bytes; None for bytes the FTL never wrote (generation 0 is never used).
    pub fn decode(b: &[u8]) -> Option<Oob> {
        if b.len() < OOB_BYTES {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        let o = Oob { lba: u32_at(0), gen: u32_at(4), seq: u64::from_le_bytes(s) };
        (o.gen != 0).then_some(o)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 1 group × 4 PUs × 16 chunks × 16 blocks of 4 KiB: 4 MiB, small enough for many tests.
    pub fn small() -> Geometry {
        Geometry {
            num_grp: 1,
            num_pu: 4,
            num_chk: 16,
            clba: 16,
            block_size: 4096,
            oob_size: 16,
            ws_min: 2,
            ws_opt: 4,
            mw_cunits: 4,
            maxoc: 32,
            maxocpu: 8,
            endurance: 1000,
            ..Geometry::default()
        }
    }

    #[test]
    fn derives_units_from_the_geometry() {
        let l = Layout::new(&Geometry::default()).unwrap();
        assert_eq!((l.spl, l.spc, l.min_slots, l.unit, l.max_cmd_slots), (1, 1024, 4, 8, 64));
        let g512 = Geometry { block_size: 512, clba: 1024, ws_min: 4, ws_opt: 16, ..Geometry::default() };
        let l = Layout::new(&g512).unwrap();
        assert_eq!((l.spl, l.spc, l.min_slots, l.unit, l.max_cmd_slots), (8, 128, 1, 2, 8));
        let l = Layout::new(&small()).unwrap();
        assert_eq!((l.spc, l.min_slots, l.unit, l.chunks, l.pus), (16, 2, 4, 64, 4));
        assert_eq!(l.slot(3, 5), 53);
        assert_eq!((l.chunk_of(53), l.offset_of(53)), (3, 5));
        assert_eq!(l.chunk_of_ppa(l.sector_ppa(37, 9)), Some(37));
        assert_eq!(l.readable_slots(10, true), 6);
        assert_eq!(l.readable_slots(16, false), 16);
    }

    #[test]
    fn refuses_geometries_without_room() {
        assert!(Layout::new(&Geometry::tiny()).is_err(), "64-byte chunks of 1 KiB cannot hold 4 KiB");
        assert!(Layout::new(&Geometry { oob_size: 8, ..small() }).is_err());
    }

    #[test]
    fn oob_round_trips() {
        let o = Oob { lba: 7, gen: 9, seq: 1 << 40 };
        let mut b = [0u8; 16];
        o.encode(&mut b);
        assert_eq!(Oob::decode(&b), Some(o));
        assert_eq!(Oob::decode(&b[..8]), None);
        assert_eq!(Oob::decode(&[0u8; 16]), None, "erased or never written");
    }
}
