//! Where the device keeps its bytes: each block's data and out-of-band (OOB) area, and the
//! device's own record of every chunk (state, write pointer, wear), which a real SSD keeps in
//! its own flash so that it survives power cycles.
//!
//! The device hands a media a batch of operations for one command at once, so that a backend
//! can issue them together (the file backend puts a whole batch on an io_uring).

mod file;
mod mem;

pub use file::FileMedia;
pub use mem::MemMedia;

use crate::chunk::ChunkMeta;
use crate::error::{Error, Result};
use crate::geometry::Geometry;

/// One operation of a batch. Blocks are numbered within their chunk; chunks by linear index
/// (see [`crate::Addr::chunk_index`]). Data buffers hold `block_size` bytes per block and OOB
/// buffers `oob_size` bytes per block.
pub enum MediaOp<'a> {
    /// Store blocks `blk..` of a chunk.
    Write { chunk: usize, blk: u32, data: &'a [u8], oob: &'a [u8] },
    /// Load blocks `blk..` of a chunk.
    Read { chunk: usize, blk: u32, data: &'a mut [u8], oob: &'a mut [u8] },
    /// Forget a chunk's contents after a reset; the space may be given back.
    Erase { chunk: usize },
    /// Persist a chunk's record.
    SaveChunk { chunk: usize, meta: &'a ChunkMeta },
}

/// A store for the device's bytes and chunk records. Shared by the device's threads.
pub trait Media: Send + Sync {
    /// The geometry the media was made for.
    fn geometry(&self) -> &Geometry;

    /// Every chunk's record, in chunk-index order (all free on new media).
    fn load_chunks(&self) -> Result<Vec<ChunkMeta>>;

    /// Runs a batch. On error some operations may have been done and others not.
    fn submit(&self, ops: &mut [MediaOp<'_>]) -> Result<()>;

    /// Makes everything done so far durable.
    fn flush(&self) -> Result<()>;
}

/// Checks an operation against the geometry; returns the number of blocks it covers.
pub(crate) fn check_op(geo: &Geometry, op: &MediaOp<'_>) -> Result<u32> {
    let bad = |what: String| Err(Error::MediaRange(what));
    let (chunk, blk, data_len, oob_len) = match op {
        MediaOp::Write { chunk, blk, data, oob } => (*chunk, *blk, data.len(), oob.len()),
        MediaOp::Read { chunk, blk, data, oob } => (*chunk, *blk, data.len(), oob.len()),
        MediaOp::Erase { chunk } => {
            return if *chunk < geo.total_chunks() { Ok(0) } else { bad(format!("chunk {chunk}")) };
        }
        MediaOp::SaveChunk { chunk, meta } => {
            if *chunk >= geo.total_chunks() {
                return bad(format!("chunk {chunk}"));
            }
            if meta.wp > geo.clba || meta.failed_units.len() > bitmap_words(geo) {
                return bad(format!("chunk {chunk} record: wp {} or failed-unit bitmap too large", meta.wp));
            }
            return Ok(0);
        }
    };
    if chunk >= geo.total_chunks() {
        return bad(format!("chunk {chunk}"));
    }
    let bs = geo.block_size as usize;
    if data_len == 0 || data_len % bs != 0 {
        return bad(format!("data buffer of {data_len} bytes"));
    }
    let blocks = data_len / bs;
    if u64::from(blk) + blocks as u64 > u64::from(geo.clba) {
        return bad(format!("blocks {blk}+{blocks} of a {}-block chunk", geo.clba));
    }
    if oob_len != blocks * geo.oob_size as usize {
        return bad(format!("OOB buffer of {oob_len} bytes for {blocks} blocks"));
    }
    Ok(blocks as u32)
}

/// Words of the failed-unit bitmap a chunk record can hold.
pub(crate) fn bitmap_words(geo: &Geometry) -> usize {
    geo.units_per_chunk().div_ceil(64) as usize
}

/// A shared media works like the media itself (a test may keep a handle to inject media errors).
impl<M: Media + ?Sized> Media for std::sync::Arc<M> {
    fn geometry(&self) -> &Geometry {
        (**self).geometry()
    }

    fn load_chunks(&self) -> Result<Vec<ChunkMeta>> {
        (**self).load_chunks()
    }

    fn submit(&self, ops: &mut [MediaOp<'_>]) -> Result<()> {
        (**self).submit(ops)
    }

    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
}
