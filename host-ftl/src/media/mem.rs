//! Media in memory. Sparse: a chunk's storage is allocated on its first write and dropped when
//! it is erased, so a large device costs memory only for what is written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use plumbing::lock;

use super::{check_op, Media, MediaOp};
use crate::chunk::ChunkMeta;
use crate::error::{Error, Result};
use crate::geometry::Geometry;

/// Memory media. Chunk records are kept too, so a device reopened on the same media (see
/// [`crate::Device::into_media`]) finds its chunks as it left them.
pub struct MemMedia {
    geo: Geometry,
    chunks: Vec<Mutex<Option<ChunkStore>>>,
    records: Mutex<Vec<ChunkMeta>>,
    fail_next: AtomicBool,
}

struct ChunkStore {
    data: Vec<u8>,
    oob: Vec<u8>,
}

impl MemMedia {
    pub fn new(geo: &Geometry) -> Result<MemMedia> {
        geo.validate()?;
        Ok(MemMedia {
            geo: geo.clone(),
            chunks: (0..geo.total_chunks()).map(|_| Mutex::new(None)).collect(),
            records: Mutex::new(vec![ChunkMeta::default(); geo.total_chunks()]),
            fail_next: AtomicBool::new(false),
        })
    }

    /// Makes the next batch fail with an I/O error before doing anything (to test how the
    /// device handles a failing media).
    pub fn fail_next_submit(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }

    /// Chunks that currently hold allocated storage.
    pub fn allocated_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| lock(c).is_some()).count()
    }
}

impl Media for MemMedia {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn load_chunks(&self) -> Result<Vec<ChunkMeta>> {
        Ok(lock(&self.records).clone())
    }

    fn submit(&self, ops: &mut [MediaOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            check_op(&self.geo, op)?;
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(Error::io("injected media failure", std::io::Error::other("injected")));
        }
        let bs = self.geo.block_size as usize;
        let os = self.geo.oob_size as usize;
        let chunk_data = self.geo.clba as usize * bs;
        let chunk_oob = self.geo.clba as usize * os;
        for op in ops.iter_mut() {
            match op {
                MediaOp::Write { chunk, blk, data, oob } => {
                    let mut c = lock(&self.chunks[*chunk]);
                    let store =
                        c.get_or_insert_with(|| ChunkStore { data: vec![0; chunk_data], oob: vec![0; chunk_oob] });
                    let b = *blk as usize;
                    store.data[b * bs..b * bs + data.len()].copy_from_slice(data);
                    store.oob[b * os..b * os + oob.len()].copy_from_slice(oob);
                }
                MediaOp::Read { chunk, blk, data, oob } => {
                    let c = lock(&self.chunks[*chunk]);
                    let b = *blk as usize;
                    match c.as_ref() {
                        Some(store) => {
                            data.copy_from_slice(&store.data[b * bs..b * bs + data.len()]);
                            oob.copy_from_slice(&store.oob[b * os..b * os + oob.len()]);
                        }
                        None => {
                            data.fill(0);
                            oob.fill(0);
                        }
                    }
                }
                MediaOp::Erase { chunk } => *lock(&self.chunks[*chunk]) = None,
                MediaOp::SaveChunk { chunk, meta } => lock(&self.records)[*chunk] = (*meta).clone(),
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkState;

    #[test]
    fn stores_blocks_sparsely_and_keeps_records() {
        let geo = Geometry::tiny();
        let m = MemMedia::new(&geo).unwrap();
        assert_eq!(m.allocated_chunks(), 0);
        let data = vec![7u8; 2 * 64];
        let oob = vec![9u8; 2 * 8];
        let meta = ChunkMeta { state: ChunkState::Open, wp: 4, wear: 2, failed_units: vec![1] };
        m.submit(&mut [
            MediaOp::Write { chunk: 3, blk: 2, data: &data, oob: &oob },
            MediaOp::SaveChunk { chunk: 3, meta: &meta },
        ])
        .unwrap();
        assert_eq!(m.allocated_chunks(), 1);
        let (mut d, mut o) = (vec![0u8; 3 * 64], vec![0u8; 3 * 8]);
        m.submit(&mut [MediaOp::Read { chunk: 3, blk: 1, data: &mut d, oob: &mut o }]).unwrap();
        assert_eq!(&d[..64], &[0u8; 64][..]);
        assert_eq!(&d[64..], &data[..]);
        assert_eq!(&o[8..], &oob[..]);
        assert_eq!(m.load_chunks().unwrap()[3], meta);
        m.submit(&mut [MediaOp::Erase { chunk: 3 }]).unwrap();
        assert_eq!(m.allocated_chunks(), 0);
    }

    #[test]
    fn bad_operations_are_errors_and_do_nothing() {
        let geo = Geometry::tiny();
        let m = MemMedia::new(&geo).unwrap();
        let d = vec![0u8; 64];
        let o = vec![0u8; 8];
        let bad: Vec<MediaOp<'_>> = vec![
            MediaOp::Write { chunk: 8, blk: 0, data: &d, oob: &o },
            MediaOp::Write { chunk: 0, blk: 16, data: &d, oob: &o },
            MediaOp::Write { chunk: 0, blk: 0, data: &d[..10], oob: &o },
            MediaOp::Write { chunk: 0, blk: 0, data: &d, oob: &o[..4] },
            MediaOp::Erase { chunk: 99 },
        ];
        for op in bad {
            let good = MediaOp::Write { chunk: 1, blk: 0, data: &d, oob: &o };
            assert!(matches!(m.submit(&mut [good, op]), Err(Error::MediaRange(_))));
        }
        assert_eq!(m.allocated_chunks(), 0, "a batch with a bad operation does nothing");
        m.fail_next_submit();
        assert!(m.submit(&mut [MediaOp::Erase { chunk: 0 }]).is_err());
        m.submit(&mut [MediaOp::Erase { chunk: 0 }]).unwrap();
    }
}
