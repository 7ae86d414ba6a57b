//! Media that can lose power: for crash tests of the FTL on the device model.
//!
//! [`PowerLossMedia`] keeps two images of the device: what the device has done (`live`, which
//! reads see) and what is durable (the state at the last media flush). Every batch of media
//! operations since the last flush (the device hands the media one batch per command: data,
//! erases and the chunk records they change) is kept in order. [`PowerLossMedia::power_loss`]
//! makes a new media holding the durable image plus the first `keep` of those batches, as if
//! power failed at that point of the device's write-back (the chunk table, too, is durable only
//! after a flush). A command's batch survives whole or not at all: the model does not tear a
//! reset from its chunk record. A device reopened on the new media sees what survived.
//!
//! The whole device is held in memory: for small test geometries only.

use std::sync::Mutex;

use host_ftl::{ChunkMeta, Geometry, Media, MediaOp};
use plumbing::lock;

/// One device image.
#[derive(Clone)]
struct Image {
    data: Vec<u8>,
    oob: Vec<u8>,
    records: Vec<ChunkMeta>,
}

/// A media operation kept until the next flush.
enum Op {
    Write { chunk: usize, blk: u32, data: Vec<u8>, oob: Vec<u8> },
    Erase { chunk: usize },
    Save { chunk: usize, meta: ChunkMeta },
}

/// Memory media whose unflushed operations can be lost (see the module docs).
pub struct PowerLossMedia {
    geo: Geometry,
    live: Mutex<Image>,
    durable: Mutex<Image>,
    pending: Mutex<Vec<Vec<Op>>>,
}

fn range_err(what: String) -> host_ftl::Error {
    host_ftl::Error::MediaRange(what)
}

impl Image {
    fn new(geo: &Geometry) -> Image {
        let sectors = geo.total_chunks() * geo.clba as usize;
        Image {
            data: vec![0; sectors * geo.block_size as usize],
            oob: vec![0; sectors * geo.oob_size as usize],
            records: vec![ChunkMeta::default(); geo.total_chunks()],
        }
    }

    fn apply(&mut self, geo: &Geometry, op: &Op) {
        let (bs, os, clba) = (geo.block_size as usize, geo.oob_size as usize, geo.clba as usize);
        match op {
            Op::Write { chunk, blk, data, oob } => {
                let s = chunk * clba + *blk as usize;
                self.data[s * bs..s * bs + data.len()].copy_from_slice(data);
                self.oob[s * os..s * os + oob.len()].copy_from_slice(oob);
            }
            Op::Erase { chunk } => {
                let s = chunk * clba;
                self.data[s * bs..(s + clba) * bs].fill(0);
                self.oob[s * os..(s + clba) * os].fill(0);
            }
            Op::Save { chunk, meta } => self.records[*chunk] = meta.clone(),
        }
    }
}

impl PowerLossMedia {
    pub fn new(geo: &Geometry) -> host_ftl::Result<PowerLossMedia> {
        geo.validate()?;
        let img = Image::new(geo);
        Ok(PowerLossMedia {
            geo: geo.clone(),
            live: Mutex::new(img.clone()),
            durable: Mutex::new(img),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Batches done since the last flush.
    pub fn unflushed(&self) -> usize {
        lock(&self.pending).len()
    }

    /// The media after a power loss that let the first `keep` unflushed batches through.
    pub fn power_loss(&self, keep: usize) -> PowerLossMedia {
        let mut img = lock(&self.durable).clone();
        for op in lock(&self.pending).iter().take(keep).flatten() {
            img.apply(&self.geo, op);
        }
        PowerLossMedia {
            geo: self.geo.clone(),
            live: Mutex::new(img.clone()),
            durable: Mutex::new(img),
            pending: Mutex::new(Vec::new()),
        }
    }

    fn check(&self, chunk: usize, blk: u32, data: usize, oob: usize) -> host_ftl::Result<()> {
        let g = &self.geo;
        let blocks = data / g.block_size as usize;
        if chunk >= g.total_chunks()
            || data % g.block_size as usize != 0
            || u64::from(blk) + blocks as u64 > u64::from(g.clba)
            || oob != blocks * g.oob_size as usize
        {
            return Err(range_err(format!("chunk {chunk} block {blk}: {data} data and {oob} OOB bytes")));
        }
        Ok(())
    }
}

impl Media for PowerLossMedia {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn load_chunks(&self) -> host_ftl::Result<Vec<ChunkMeta>> {
        Ok(lock(&self.live).records.clone())
    }

    fn submit(&self, ops: &mut [MediaOp<'_>]) -> host_ftl::Result<()> {
        for op in ops.iter() {
            match op {
                MediaOp::Write { chunk, blk, data, oob } => self.check(*chunk, *blk, data.len(), oob.len())?,
                MediaOp::Read { chunk, blk, data, oob } => self.check(*chunk, *blk, data.len(), oob.len())?,
                MediaOp::Erase { chunk } | MediaOp::SaveChunk { chunk, .. } => {
                    if *chunk >= self.geo.total_chunks() {
                        return Err(range_err(format!("chunk {chunk}")));
                    }
                }
            }
        }
        let (bs, os, clba) = (self.geo.block_size as usize, self.geo.oob_size as usize, self.geo.clba as usize);
        let mut live = lock(&self.live);
        let mut batch = Vec::new();
        for op in ops.iter_mut() {
            let kept = match op {
                MediaOp::Read { chunk, blk, data, oob } => {
                    let s = *chunk * clba + *blk as usize;
                    data.copy_from_slice(&live.data[s * bs..s * bs + data.len()]);
                    oob.copy_from_slice(&live.oob[s * os..s * os + oob.len()]);
                    continue;
                }
                MediaOp::Write { chunk, blk, data, oob } => {
                    Op::Write { chunk: *chunk, blk: *blk, data: data.to_vec(), oob: oob.to_vec() }
                }
                MediaOp::Erase { chunk } => Op::Erase { chunk: *chunk },
                MediaOp::SaveChunk { chunk, meta } => Op::Save { chunk: *chunk, meta: (*meta).clone() },
            };
            live.apply(&self.geo, &kept);
            batch.push(kept);
        }
        if !batch.is_empty() {
            lock(&self.pending).push(batch);
        }
        Ok(())
    }

    fn flush(&self) -> host_ftl::Result<()> {
        let mut durable = lock(&self.durable);
        for op in lock(&self.pending).drain(..).flatten() {
            durable.apply(&self.geo, &op);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use host_ftl::ChunkState;

    #[test]
    fn loses_what_was_not_flushed() {
        let geo = crate::layout::tests::small();
        let m = PowerLossMedia::new(&geo).unwrap();
        let d = vec![7u8; 4096 * 2];
        let o = vec![1u8; 32];
        let meta = ChunkMeta { state: ChunkState::Open, wp: 2, wear: 0, failed_units: vec![] };
        m.submit(&mut [
            MediaOp::Write { chunk: 3, blk: 0, data: &d, oob: &o },
            MediaOp::SaveChunk { chunk: 3, meta: &meta },
        ])
        .unwrap();
        m.flush().unwrap();
        m.submit(&mut [MediaOp::Write { chunk: 3, blk: 2, data: &d, oob: &o }]).unwrap();
        assert_eq!(m.unflushed(), 1);
        let lost = m.power_loss(0);
        let (mut rd, mut ro) = (vec![0u8; 4 * 4096], vec![0u8; 64]);
        lost.submit(&mut [MediaOp::Read { chunk: 3, blk: 0, data: &mut rd, oob: &mut ro }]).unwrap();
        assert_eq!(&rd[..8192], &d[..]);
        assert!(rd[8192..].iter().all(|&b| b == 0), "the unflushed write is gone");
        assert_eq!(lost.load_chunks().unwrap()[3], meta);
        let kept = m.power_loss(1);
        kept.submit(&mut [MediaOp::Read { chunk: 3, blk: 0, data: &mut rd, oob: &mut ro }]).unwrap();
        assert_eq!(&rd[8192..], &d[..]);
        assert!(m.submit(&mut [MediaOp::Erase { chunk: 999 }]).is_err());
    }
}
