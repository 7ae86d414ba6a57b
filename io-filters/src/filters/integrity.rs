//! A crc32 per logical block, checked on every read: corrupt data is never returned.
//!
//! Checksums live in memory and in the disk's namespace, in pages of [`PAGE_BLOCKS`] checksums
//! (a missing page means every block in it holds zeroes, as a new disk does).
//!
//! Keeping them consistent with the data across a crash, without a synced state-store write per
//! data write, follows md RAID's write-intent bitmap:
//!
//! 1. Before the first write (or discard, write-zeroes) to a page since that page was last clean,
//!    an *intent* mark for the page is committed (synced). The data write goes out only after.
//! 2. The page's checksums change in memory as the write goes out.
//! 3. A flush is a barrier: it waits for the writes in flight, flushes the data below, and only
//!    then commits the changed checksum pages, and clears the marks of pages not written since
//!    the flush before (so a busy page does not pay for a mark after every flush).
//!
//! So a page's stored checksums can trail its data only while its mark is set. After a crash,
//! each marked page is *recovered* before the disk serves its first request: its checksums are
//! recomputed from the data the disk holds, committed, and the mark cleared. Those blocks hold
//! either old or new data of writes never acknowledged as durable, and the block device's promise
//! lets either stand; every other page keeps checksums that match data made durable by a flush,
//! so corruption there is caught. The cost: corruption that happened in a marked page before the
//! crash goes unnoticed, as md's resync does. A FUA write needs nothing more, as its page is
//! marked before it is written.
//!
//! A read racing a write to the same block may see the old data with the new checksum; such a
//! mismatch is told apart by a per-page count of writes started and finished, and the read is
//! tried again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use state_store::{Batch, Store};
use tokio::sync::{Mutex, OnceCell, RwLock};
use vdisk::{BlockError, IoBuf, IoFuture, IoResult, RequestKind};

use crate::blocking::{offload, store_error};
use crate::chain::{Filter, Next};
use crate::request::{io_error, Reply, Request, Verdict};

/// Checksums per stored page.
pub const PAGE_BLOCKS: u64 = 1024;
const CRC_PREFIX: &str = "integrity/crc/";
const INTENT_PREFIX: &str = "integrity/intent/";
/// Reads tried again after a mismatch that a concurrent write explains.
const RETRIES: usize = 8;

fn crc_key(page: u64) -> String {
    format!("{CRC_PREFIX}{page:016x}")
}

fn intent_key(page: u64) -> String {
    format!("{INTENT_PREFIX}{page:016x}")
}

fn page_of_key(key: &[u8], prefix: &str) -> Option<u64> {
    let hex = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    u64::from_str_radix(hex, 16).ok()
}

#[derive(Default)]
struct PageState {
    /// The intent mark is committed.
    marked: AtomicBool,
    /// Written since the last flush.
    written: AtomicBool,
    /// Checksums changed since they were last committed.
    dirty: AtomicBool,
    started: AtomicU64,
    finished: AtomicU64,
}

/// The integrity filter of one disk.
pub struct Integrity {
    disk: String,
    store: Arc<Store>,
    namespace: String,
    block: u64,
    crcs: Vec<AtomicU32>,
    pages: Vec<PageState>,
    zero_crc: u32,
    /// Pages marked when the disk was opened: recomputed before the first request.
    suspects: Vec<u64>,
    recovered: OnceCell<()>,
    /// Writes hold it shared; a flush holds it alone.
    barrier: RwLock<()>,
    marking: Mutex<()>,
    mismatches: AtomicU64,
    checked: AtomicU64,
}

impl Integrity {
    /// Loads the disk's checksums and intent marks. Blocking (state-store reads).
    pub fn open(
        disk: &str,
        store: Arc<Store>,
        namespace: &str,
        capacity: u64,
        block_size: u32,
    ) -> Result<Integrity, String> {
        let block = u64::from(block_size);
        let blocks = capacity / block;
        let zero_crc = crc32fast::hash(&vec![0u8; block_size as usize]);
        let crcs: Vec<AtomicU32> = (0..blocks).map(|_| AtomicU32::new(zero_crc)).collect();
        let npages = blocks.div_ceil(PAGE_BLOCKS);
        let pages: Vec<PageState> = (0..npages).map(|_| PageState::default()).collect();
        let stored = store.scan_prefix(namespace, CRC_PREFIX).map_err(|e| format!("cannot load checksums: {e}"))?;
        for (key, value) in stored {
            // A damaged record (a page past the disk, a value longer than a page) sets no
            // checksum beyond its own page.
            let Some(page) = page_of_key(&key, CRC_PREFIX).filter(|p| *p < npages) else { continue };
            for (i, word) in value.chunks_exact(4).take(PAGE_BLOCKS as usize).enumerate() {
                let b = page * PAGE_BLOCKS + i as u64;
                if let Some(slot) = crcs.get(b as usize) {
                    slot.store(u32::from_le_bytes([word[0], word[1], word[2], word[3]]), SeqCst);
                }
            }
        }
        let marks =
            store.scan_prefix(namespace, INTENT_PREFIX).map_err(|e| format!("cannot load intent marks: {e}"))?;
        let mut suspects = Vec::new();
        for key in marks.keys() {
            if let Some(page) = page_of_key(key, INTENT_PREFIX).filter(|p| *p < npages) {
                pages[page as usize].marked.store(true, SeqCst);
                suspects.push(page);
            }
        }
        if !suspects.is_empty() {
            tracing::warn!(
                disk,
                pages = suspects.len(),
                "integrity: pages written before an unclean stop; their checksums are recomputed"
            );
        }
        Ok(Integrity {
            disk: disk.to_owned(),
            store,
            namespace: namespace.to_owned(),
            block,
            crcs,
            pages,
            zero_crc,
            suspects,
            recovered: OnceCell::new(),
            barrier: RwLock::new(()),
            marking: Mutex::new(()),
            mismatches: AtomicU64::new(0),
            checked: AtomicU64::new(0),
        })
    }

    /// (blocks checked, mismatches found)
    pub fn counters(&self) -> (u64, u64) {
        (self.checked.load(SeqCst), self.mismatches.load(SeqCst))
    }

    fn pages_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.block;
        let last = (offset + len).div_ceil(self.block);
        first / PAGE_BLOCKS..last.div_ceil(PAGE_BLOCKS)
    }

    /// The committed page of checksums as bytes.
    fn page_bytes(&self, page: u64) -> Vec<u8> {
        let first = (page * PAGE_BLOCKS) as usize;
        let last = (first + PAGE_BLOCKS as usize).min(self.crcs.len());
        self.crcs[first..last].iter().flat_map(|c| c.load(SeqCst).to_le_bytes()).collect()
    }

    async fn commit(&self, batch: Batch) -> IoResult<()> {
        let store = self.store.clone();
        offload(move || store.commit(batch).map_err(store_error)).await
    }

    /// Recomputes the checksums of pages marked when the disk was opened. Runs once.
    async fn recover(&self, next: Next<'_>) -> IoResult<()> {
        for &page in &self.suspects {
            let first = page * PAGE_BLOCKS;
            let blocks = PAGE_BLOCKS.min(self.crcs.len() as u64 - first);
            let buf = next.read(first * self.block, IoBuf::scratch((blocks * self.block) as usize)).await?;
            for (i, data) in buf.as_slice().chunks(self.block as usize).enumerate() {
                self.crcs[(first + i as u64) as usize].store(crc32fast::hash(data), SeqCst);
            }
            let mut batch = Batch::new();
            batch.put(&self.namespace, crc_key(page), self.page_bytes(page));
            batch.delete(&self.namespace, intent_key(page));
            self.commit(batch).await?;
            self.pages[page as usize].marked.store(false, SeqCst);
            // This page is recovered and unmarked; the pages after it are still marked.
            failpoint::hit("integrity::recover::page-done");
        }
        if !self.suspects.is_empty() {
            tracing::info!(disk = %self.disk, pages = self.suspects.len(), "integrity: checksums recovered");
        }
        Ok(())
    }

    /// Commits the intent marks of the pages not marked yet, before data goes to them.
    async fn mark(&self, pages: std::ops::Range<u64>) -> IoResult<()> {
        if pages.clone().all(|p| self.pages[p as usize].marked.load(SeqCst)) {
            return Ok(());
        }
        let _one = self.marking.lock().await;
        let mut batch = Batch::new();
        let mut todo = Vec::new();
        for p in pages {
            if !self.pages[p as usize].marked.load(SeqCst) {
                batch.put(&self.namespace, intent_key(p), []);
                todo.push(p);
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        self.commit(batch).await?;
        // The marks are durable; the data write has not gone out.
        failpoint::hit("integrity::mark::committed");
        for p in todo {
            self.pages[p as usize].marked.store(true, SeqCst);
        }
        Ok(())
    }

    /// Sets the checksums of a range from its new data (`None`: zeroes).
    fn set_crcs(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        let first = offset / self.block;
        match data {
            Some(data) => {
                for (i, chunk) in data.chunks(self.block as usize).enumerate() {
                    self.crcs[first as usize + i].store(crc32fast::hash(chunk), SeqCst);
                }
            }
            None => {
                for b in first..first + len / self.block {
                    self.crcs[b as usize].store(self.zero_crc, SeqCst);
                }
            }
        }
        for p in self.pages_of(offset, len) {
            self.pages[p as usize].dirty.store(true, SeqCst);
        }
    }

    async fn change(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        let _shared = self.barrier.read().await;
        let pages = self.pages_of(head.offset, head.len);
        self.mark(pages.clone()).await?;
        for p in pages.clone() {
            let state = &self.pages[p as usize];
            state.started.fetch_add(1, SeqCst);
            state.written.store(true, SeqCst);
        }
        self.set_crcs(head.offset, head.len, req.buf.as_ref().map(|b| b.as_slice()));
        let result = next.submit(req).await;
        if result.is_err() {
            // What the range holds now is unknown: take the checksums of whatever is there.
            if let Ok(buf) =
                next.read(head.offset, IoBuf::scratch(head.len.min(vdisk::device::MAX_IO_BYTES) as usize)).await
            {
                self.set_crcs(head.offset, buf.len() as u64, Some(buf.as_slice()));
            }
        }
        for p in pages {
            self.pages[p as usize].finished.fetch_add(1, SeqCst);
        }
        result
    }

    /// (started, finished) write counts of the pages of a range.
    fn activity(&self, pages: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        pages
            .map(|p| (self.pages[p as usize].started.load(SeqCst), self.pages[p as usize].finished.load(SeqCst)))
            .collect()
    }

    async fn read(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        let pages = self.pages_of(head.offset, head.len);
        let mut buf = req.buf.ok_or(BlockError::Empty)?;
        for attempt in 0.. {
            let before = self.activity(pages.clone());
            buf = next.read(head.offset, buf).await?;
            let bad = self.first_mismatch(head.offset, buf.as_slice());
            self.checked.fetch_add(head.len / self.block, SeqCst);
            let Some(block) = bad else { return Ok(Some(buf)) };
            let after = self.activity(pages.clone());
            let raced = before != after || after.iter().any(|(s, f)| s != f);
            if raced && attempt < RETRIES {
                tokio::task::yield_now().await;
                continue;
            }
            self.mismatches.fetch_add(1, SeqCst);
            tracing::error!(disk = %self.disk, block, "integrity: checksum mismatch, read failed");
            return Err(io_error(
                std::io::ErrorKind::InvalidData,
                format!("checksum mismatch in block {block} of disk {:?}", self.disk),
            ));
        }
        unreachable!("the loop returns")
    }

    fn first_mismatch(&self, offset: u64, data: &[u8]) -> Option<u64> {
        let first = offset / self.block;
        data.chunks(self.block as usize)
            .enumerate()
            .find(|(i, chunk)| crc32fast::hash(chunk) != self.crcs[first as usize + i].load(SeqCst))
            .map(|(i, _)| first + i as u64)
    }

    async fn flush(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let _alone = self.barrier.write().await;
        let reply = next.submit(req).await?;
        // The data is durable; the checksums that match it are not committed.
        failpoint::hit("integrity::flush::data-flushed");
        let mut batch = Batch::new();
        let (mut committed, mut cleared) = (Vec::new(), Vec::new());
        for (p, state) in self.pages.iter().enumerate() {
            let p = p as u64;
            if state.dirty.swap(false, SeqCst) {
                batch.put(&self.namespace, crc_key(p), self.page_bytes(p));
                committed.push(p);
            }
            if !state.written.swap(false, SeqCst) && state.marked.load(SeqCst) {
                batch.delete(&self.namespace, intent_key(p));
                state.marked.store(false, SeqCst);
                cleared.push(p);
            }
        }
        if batch.is_empty() {
            return Ok(reply);
        }
        if let Err(e) = self.commit(batch).await {
            // Nothing was committed: the pages stay dirty and marked.
            for p in committed {
                self.pages[p as usize].dirty.store(true, SeqCst);
            }
            for p in cleared {
                self.pages[p as usize].marked.store(true, SeqCst);
            }
            return Err(e);
        }
        Ok(reply)
    }
}

impl Filter for Integrity {
    fn kind(&self) -> &'static str {
        "integrity"
    }

    fn pre(&self, _req: &mut Request) -> Verdict {
        Verdict::Handle
    }

    fn handle<'a>(&'a self, req: Request, next: Next<'a>) -> IoFuture<'a, Reply> {
        Box::pin(async move {
            self.recovered.get_or_try_init(|| self.recover(next)).await?;
            match req.head.kind {
                RequestKind::Read => self.read(req, next).await,
                RequestKind::Flush => self.flush(req, next).await,
                RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => self.change(req, next).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_checksum_page_sets_nothing_beyond_its_page() {
        // Found by the integrity_records fuzz target: a page number near u64::MAX overflowed,
        // and a long value set the checksums of the next page.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_namespace("d").unwrap();
        let mut batch = Batch::new();
        batch.put("d", crc_key(u64::MAX), [1u8; 8]);
        batch.put("d", crc_key(u64::MAX / 1024 + 1), [1u8; 8]);
        batch.put("d", crc_key(0), vec![7u8; 8 * PAGE_BLOCKS as usize]);
        store.commit(batch).unwrap();
        let f = Integrity::open("d", store, "d", 2 * PAGE_BLOCKS * 512, 512).unwrap();
        let page = |p: u64| f.crcs[(p * PAGE_BLOCKS) as usize..((p + 1) * PAGE_BLOCKS) as usize].iter();
        assert!(page(0).all(|c| c.load(SeqCst) == u32::from_le_bytes([7; 4])));
        assert!(page(1).all(|c| c.load(SeqCst) == f.zero_crc), "page 0's record reached page 1");
    }
}
