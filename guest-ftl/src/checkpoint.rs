//! What the FTL keeps in the state store, in the disk's namespace.
//!
//! | key | value | written |
//! |---|---|---|
//! | `ftl/format` | user blocks, disk block size, chunks, slots per chunk | once, when the disk is formatted |
//! | `ftl/meta` | next sequence number and line generation, the generations of lines open at the checkpoint, each chunk's wear | every checkpoint |
//! | `ftl/map/<page>` | 1024 map entries (slot, sequence) | every checkpoint, pages changed since the last one |
//! | `ftl/trim/<seq>` | a trimmed range | at the flush after the trim; deleted by the next checkpoint |
//! | `ftl/bad/<chunk>` | a retired chunk | when the chunk is retired |
//!
//! Each checkpoint is one atomic, synced batch, so a crash leaves either the old or the new one.

use std::sync::Arc;

use state_store::{Batch, Store};

use crate::error::{FtlError, Result};
use crate::layout::{Layout, MAX_GEN, MAX_SEQ};
use crate::map::PAGE_ENTRIES;
use crate::trims::Trim;

const FORMAT_KEY: &[u8] = b"ftl/format";
const META_KEY: &[u8] = b"ftl/meta";
const MAP_PREFIX: &[u8] = b"ftl/map/";
const TRIM_PREFIX: &[u8] = b"ftl/trim/";
const BAD_PREFIX: &[u8] = b"ftl/bad/";
const FORMAT_MAGIC: &[u8; 8] = b"GFTLFMT1";
/// Trim records a disk keeps at most between checkpoints: once the stored and pending ones
/// reach this many, the end of the request takes a checkpoint, which folds them into the map
/// and deletes them. A guest that only discards and flushes opens no lines, so the line count
/// alone never took one: every discard left a record, and 8 bytes of memory, for good.
pub const MAX_TRIM_RECORDS: usize = 4096;
/// Trim records `load` accepts: many more than the engine keeps (for stores written before it
/// kept a bound, or while checkpoints failed), and still a bound.
const MAX_STORED_TRIMS: usize = 65_536;
const META_MAGIC: &[u8; 8] = b"GFTLCKP1";

/// The disk's shape, fixed at format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub user_lbas: u32,
    pub block_size: u32,
    pub chunks: u32,
    pub spc: u32,
}

/// The checkpoint's own record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Every write and trim in the checkpoint has a smaller sequence number.
    pub next_seq: u64,
    /// Every line opened after the checkpoint has at least this generation.
    pub next_gen: u32,
    /// Lines that were still being written at the checkpoint.
    pub open_gens: Vec<u32>,
    /// Resets per chunk.
    pub wear: Vec<u32>,
}

/// Runs a store call off the async workers when a tokio runtime is there to take it.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.spawn_blocking(f).await.map_err(|e| FtlError::Task(e.to_string()))?,
        Err(_) => f(),
    }
}

fn key(prefix: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(id);
    k
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| FtlError::Metadata("record too short".into()))?;
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from(self.u32()?) | u64::from(self.u32()?) << 32)
    }
}

impl Format {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = FORMAT_MAGIC.to_vec();
        for x in [self.user_lbas, self.block_size, self.chunks, self.spc] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    /// Decodes a format record; a block size other than 512 or 4096, or no user blocks, is
    /// an error (the block size becomes a divisor of every request's offset).
    pub fn decode(b: &[u8]) -> Result<Format> {
        if !b.starts_with(FORMAT_MAGIC) {
            return Err(FtlError::Metadata("format record has no magic".into()));
        }
        let mut r = Reader { b, at: 8 };
        let f = Format { user_lbas: r.u32()?, block_size: r.u32()?, chunks: r.u32()?, spc: r.u32()? };
        if f.block_size != 512 && f.block_size != 4096 {
            return Err(FtlError::Metadata(format!("format record: block size {}", f.block_size)));
        }
        if f.user_lbas == 0 {
            return Err(FtlError::Metadata("format record: no user blocks".into()));
        }
        Ok(f)
    }

    /// Checks the record against the partition before anything is sized by it: its chunks and
    /// slots must be the partition's, and its user blocks no more than the partition's slots
    /// (the most it could ever have been formatted with).
    pub fn check(&self, lay: &Layout) -> Result<()> {
        if self.chunks != lay.chunks || self.spc != lay.spc {
            return Err(FtlError::Metadata(format!(
                "disk was formatted for {} chunks of {} blocks, the partition has {} of {}",
                self.chunks, self.spc, lay.chunks, lay.spc
            )));
        }
        if u64::from(self.user_lbas) > lay.total_slots() {
            return Err(FtlError::Metadata(format!(
                "format record has {} user blocks, the partition {} slots",
                self.user_lbas,
                lay.total_slots()
            )));
        }
        Ok(())
    }
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = META_MAGIC.to_vec();
        v.extend_from_slice(&self.next_seq.to_le_bytes());
        v.extend_from_slice(&self.next_gen.to_le_bytes());
        v.extend_from_slice(&(self.open_gens.len() as u32).to_le_bytes());
        for g in &self.open_gens {
            v.extend_from_slice(&g.to_le_bytes());
        }
        v.extend_from_slice(&(self.wear.len() as u32).to_le_bytes());
        for w in &self.wear {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Meta> {
        if !b.starts_with(META_MAGIC) {
            return Err(FtlError::Metadata("checkpoint record has no magic".into()));
        }
        let mut r = Reader { b, at: 8 };
        let next_seq = r.u64()?;
        let next_gen = r.u32()?;
        if next_seq > MAX_SEQ || next_gen > MAX_GEN {
            return Err(FtlError::Metadata(format!(
                "checkpoint record: next sequence number {next_seq}, next generation {next_gen}"
            )));
        }
        let n = r.u32()? as usize;
        let open_gens = (0..n.min(b.len())).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
        let n = r.u32()? as usize;
        let wear = (0..n.min(b.len())).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
        Ok(Meta { next_seq, next_gen, open_gens, wear })
    }
}

/// Everything a disk has in the store.
pub struct Saved {
    pub format: Option<Format>,
    pub meta: Option<Meta>,
    pub pages: Vec<(usize, Vec<u8>)>,
    pub trims: Vec<Trim>,
    pub bad: Vec<u32>,
}

/// Reads the disk's records (creating its namespace if it has none). The format record is
/// checked against the partition's layout first; every scan after it is bounded by what a disk
/// of that format can have.
pub async fn load(store: Arc<Store>, ns: String, lay: &Layout) -> Result<Saved> {
    let lay = lay.clone();
    blocking(move || {
        if !store.has_namespace(&ns) {
            store.create_namespace(&ns)?;
        }
        let format = store.get(&ns, FORMAT_KEY)?.map(|b| Format::decode(&b)).transpose()?;
        let meta = store.get(&ns, META_KEY)?.map(|b| Meta::decode(&b)).transpose()?;
        let (mut pages, mut trims, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        let Some(f) = format else {
            // A new disk: the format record is always the first one written.
            return Ok(Saved { format, meta, pages, trims, bad });
        };
        f.check(&lay)?;
        let id = |k: &[u8], p: &[u8]| k.get(p.len()..).map(<[u8]>::to_vec).unwrap_or_default();
        let map_pages = (f.user_lbas as usize).div_ceil(PAGE_ENTRIES);
        store.for_each_prefix(&ns, MAP_PREFIX, map_pages, |k, v| {
            let b: [u8; 4] = id(k, MAP_PREFIX).try_into().map_err(|_| FtlError::Metadata("bad map key".into()))?;
            pages.push((u32::from_be_bytes(b) as usize, v.to_vec()));
            Ok::<(), FtlError>(())
        })?;
        store.for_each_prefix(&ns, TRIM_PREFIX, MAX_STORED_TRIMS, |k, v| {
            let b: [u8; 8] = id(k, TRIM_PREFIX).try_into().map_err(|_| FtlError::Metadata("bad trim key".into()))?;
            let seq = u64::from_be_bytes(b);
            if seq > MAX_SEQ {
                return Err(FtlError::Metadata(format!("trim record with sequence number {seq}")));
            }
            let mut r = Reader { b: v, at: 0 };
            trims.push(Trim { seq, start: r.u32()?, count: r.u32()? });
            Ok::<(), FtlError>(())
        })?;
        store.for_each_prefix(&ns, BAD_PREFIX, lay.chunks as usize, |k, _| {
            let b: [u8; 4] = id(k, BAD_PREFIX).try_into().map_err(|_| FtlError::Metadata("bad chunk key".into()))?;
            bad.push(u32::from_be_bytes(b));
            Ok::<(), FtlError>(())
        })?;
        Ok(Saved { format, meta, pages, trims, bad })
    })
    .await
}

/// Writes the format record and an empty checkpoint of a new disk.
pub async fn save_format(store: Arc<Store>, ns: String, format: Format, meta: Meta) -> Result<()> {
    blocking(move || {
        let mut b = Batch::new();
        b.put(&ns, FORMAT_KEY, format.encode());
        b.put(&ns, META_KEY, meta.encode());
        Ok(store.commit(b)?)
    })
    .await
}

/// The disk's namespace in the store: where its records are read and written.
pub struct Records {
    store: Arc<Store>,
    ns: String,
}

impl Records {
    pub fn new(store: Arc<Store>, ns: String) -> Records {
        Records { store, ns }
    }

    /// Reads the disk's records (see [`load`]).
    pub async fn load(&self, lay: &Layout) -> Result<Saved> {
        load(self.store.clone(), self.ns.clone(), lay).await
    }

    /// Writes the format record and an empty checkpoint of a new disk.
    pub async fn save_format(&self, format: Format, meta: Meta) -> Result<()> {
        save_format(self.store.clone(), self.ns.clone(), format, meta).await
    }

    /// Records a retired chunk.
    pub async fn save_bad(&self, chunk: u32) -> Result<()> {
        let (store, ns) = (self.store.clone(), self.ns.clone());
        blocking(move || {
            let mut b = Batch::new();
            b.put(&ns, key(BAD_PREFIX, &chunk.to_be_bytes()), [1u8]);
            Ok(store.commit(b)?)
        })
        .await
    }

    /// Records trims (the device must have been flushed first, so that the writes before them
    /// are durable).
    pub async fn save_trims(&self, trims: Vec<Trim>) -> Result<()> {
        let (store, ns) = (self.store.clone(), self.ns.clone());
        blocking(move || {
            let mut b = Batch::new();
            for t in &trims {
                let mut v = t.start.to_le_bytes().to_vec();
                v.extend_from_slice(&t.count.to_le_bytes());
                b.put(&ns, key(TRIM_PREFIX, &t.seq.to_be_bytes()), v);
            }
            Ok(store.commit(b)?)
        })
        .await
    }

    /// Commits a checkpoint in one synced batch: the map pages given (page number, encoded),
    /// the meta record, and the deletion of the trim records `folded` (by sequence number).
    pub async fn save_checkpoint(
        &self,
        pages: impl Iterator<Item = (usize, Vec<u8>)>,
        meta: &Meta,
        folded: &[u64],
    ) -> Result<()> {
        let mut b = Batch::new();
        for (p, bytes) in pages {
            b.put(&self.ns, key(MAP_PREFIX, &(p as u32).to_be_bytes()), bytes);
        }
        b.put(&self.ns, META_KEY, meta.encode());
        for s in folded {
            b.delete(&self.ns, key(TRIM_PREFIX, &s.to_be_bytes()));
        }
        let store = self.store.clone();
        blocking(move || Ok(store.commit(b)?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let f = Format { user_lbas: 100, block_size: 512, chunks: 64, spc: 16 };
        assert_eq!(Format::decode(&f.encode()).unwrap(), f);
        let m = Meta { next_seq: 1 << 40, next_gen: 7, open_gens: vec![5, 6], wear: vec![1, 2, 3] };
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        assert!(Meta::decode(&m.encode()[..20]).is_err());
        assert!(Format::decode(b"nonsense").is_err());
        let mut huge = m.encode();
        huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Meta::decode(&huge).is_err(), "a count beyond the record is an error, not an allocation");
        let m = Meta { next_seq: MAX_SEQ, next_gen: MAX_GEN, ..Meta::default() };
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        assert!(Meta::decode(&Meta { next_seq: MAX_SEQ + 1, ..m.clone() }.encode()).is_err());
        assert!(Meta::decode(&Meta { next_gen: MAX_GEN + 1, ..m }.encode()).is_err());
        assert!(Format::decode(&Format { block_size: 0, ..f }.encode()).is_err());
    }
}
