//! How a channel's DMA region is divided: the engine's window at the front, and, when the region
//! is big enough, a read area at its tail whose fixed slots reads use without the FTL's lock
//! so that many reads have their flash I/O in flight at once. Both the channel (to size a region)
//! and the command runner (to place commands) follow this one division.

use host_ftl::Geometry;

use crate::layout::LBA_BYTES;

/// Reads in flight without the FTL's lock at most (the slots of the read area).
pub const READ_SLOTS: usize = 32;
/// 4 KiB blocks one lock-free read may cover (128 KiB); longer reads take the lock.
pub const READ_SLOT_BLOCKS: u32 = 32;

/// Bytes of the region one read of `blocks` 4 KiB blocks needs at most (address lists, data,
/// OOB of all its commands).
pub(crate) fn read_bytes(geo: &Geometry, blocks: u32) -> usize {
    let spl = (LBA_BYTES / geo.block_size.max(1) as usize).max(1);
    let per_block = spl * 8 + LBA_BYTES + spl * geo.oob_size as usize;
    blocks as usize * per_block
}

/// Bytes of the read area, when the region has one.
fn read_area_bytes(geo: &Geometry) -> usize {
    READ_SLOTS * read_bytes(geo, READ_SLOT_BLOCKS)
}

/// Bytes of one full vector command (64 addresses, their data and OOB).
fn full_cmd_bytes(geo: &Geometry) -> usize {
    64 * (8 + geo.block_size as usize + geo.oob_size as usize)
}

/// A region big enough for an FTL on `pus` parallel units of a device shaped like `geo`: a full
/// vector command per PU plus two for garbage collection and admin (at least eight) for the
/// engine, and the read area.
pub fn region_bytes(geo: &Geometry, pus: usize) -> usize {
    full_cmd_bytes(geo) * (pus + 2).max(8) + read_area_bytes(geo)
}

/// The bytes at the front of a region of `len` bytes that the engine uses: all of it, unless
/// the region is big enough to give the read area its tail and keep eight full commands for the
/// engine (regions made before the read area existed are all the engine's).
pub fn engine_window(geo: &Geometry, len: usize) -> usize {
    let area = read_area_bytes(geo);
    if len >= area + 8 * full_cmd_bytes(geo) {
        len - area
    } else {
        len
    }
}
