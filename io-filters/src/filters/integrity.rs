//! A crc32 per logical block, checked on every read: corrupt data is never returned.
//!
//! Checksums live in memory and in the disk's namespace, in pages of [`PAGE_BLOCKS`] checksums
//! (a missing page means every block in it holds zeroes, as a new disk does).
//!
//! In memory a page exists only once it was written (or loaded with checksums other than
//! zeroes'), in a two-level table, so what a disk costs follows what was written to it, not
//! its size: a 64 TiB disk nobody wrote opens with 2 MiB of table. A discard or write-zeroes
//! leaves pages that do not exist alone: they already say "zeroes", on disk and in the store,
//! so they need neither a mark nor a change.
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

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use plumbing::lock;
use state_store::{Batch, Store};
use tokio::sync::{Mutex, OnceCell, RwLock};
use vdisk::{BlockError, IoBuf, IoFuture, IoResult, RequestKind};

use crate::blocking::{offload, store_error};
use crate::chain::{Filter, Next, Verdict};
use crate::request::{io_error, Reply, Request};
use crate::FilterError;

/// Checksums per stored page.
pub const PAGE_BLOCKS: u64 = 1024;
/// Pages per directory of the in-memory page table: a directory (16 KiB of pointers) covers
/// 2^20 blocks, and is allocated with the first of its pages.
const DIR_PAGES: u64 = 1024;
/// Most blocks a disk with the integrity filter may have: 2^37, 64 TiB in 512-byte blocks
/// (512 TiB in 4 KiB ones). The table's top level costs 16 bytes per directory whether used or
/// not: 2 MiB at this size.
pub const MAX_BLOCKS: u64 = 1 << 37;
/// Intent marks committed in one batch: a discard over many written pages commits its marks in
/// pieces of this many (about 100 KiB of keys), not in one batch as large as the range.
const MARK_BATCH: usize = 4096;
/// Write-activity counters, shared by pages with the same number modulo this: a count per page
/// would cost memory per page of the disk. A read retried because a write to another page of
/// its stripe was in flight costs a retry, nothing else.
const ACTIVITY_STRIPES: u64 = 1024;
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

/// One page of checksums in memory, with its flags.
struct Page {
    crcs: [AtomicU32; PAGE_BLOCKS as usize],
    /// The intent mark is committed.
    marked: AtomicBool,
    /// Written since the last flush.
    written: AtomicBool,
    /// Checksums changed since they were last committed.
    dirty: AtomicBool,
}

type Dir = Box<[OnceLock<Box<Page>>]>;

/// The pages that exist, by page number (see the module docs).
struct PageTable {
    dirs: Box<[OnceLock<Dir>]>,
    npages: u64,
    zero_crc: u32,
}

impl PageTable {
    fn new(npages: u64, zero_crc: u32) -> PageTable {
        let dirs = (0..npages.div_ceil(DIR_PAGES)).map(|_| OnceLock::new()).collect();
        PageTable { dirs, npages, zero_crc }
    }

    fn get(&self, p: u64) -> Option<&Page> {
        let dir = self.dirs.get((p / DIR_PAGES) as usize)?.get()?;
        dir[(p % DIR_PAGES) as usize].get().map(|b| &**b)
    }

    /// Page `p`, made (all zeroes' checksums) if it does not exist; `None` past the disk.
    fn get_or_make(&self, p: u64) -> Option<&Page> {
        let dir =
            self.dirs.get((p / DIR_PAGES) as usize)?.get_or_init(|| (0..DIR_PAGES).map(|_| OnceLock::new()).collect());
        let page = dir[(p % DIR_PAGES) as usize].get_or_init(|| {
            Box::new(Page {
                crcs: std::array::from_fn(|_| AtomicU32::new(self.zero_crc)),
                marked: AtomicBool::new(false),
                written: AtomicBool::new(false),
                dirty: AtomicBool::new(false),
            })
        });
        Some(page)
    }
}

#[derive(Default)]
struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
}

/// The integrity filter of one disk.
pub struct Integrity {
    disk: String,
    store: Arc<Store>,
    namespace: String,
    block: u64,
    /// Blocks of the disk.
    blocks: u64,
    table: PageTable,
    zero_crc: u32,
    /// Writes started and finished, by page modulo [`ACTIVITY_STRIPES`].
    activity: Box<[Activity]>,
    /// Pages whose intent mark is committed (each at most once): what a flush looks at.
    marked_pages: std::sync::Mutex<Vec<u64>>,
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
    ) -> Result<Integrity, FilterError> {
        let shape = |reason: String| FilterError::Shape { disk: disk.to_owned(), reason };
        let block = u64::from(block_size);
        let blocks = capacity.checked_div(block).ok_or_else(|| shape("block size 0".into()))?;
        if blocks > MAX_BLOCKS {
            return Err(shape(format!(
                "the integrity filter keeps checksums of at most {MAX_BLOCKS} blocks; the disk has {blocks}"
            )));
        }
        let zero_crc = crc32fast::hash(&vec![0u8; block_size as usize]);
        let npages = blocks.div_ceil(PAGE_BLOCKS);
        let table = PageTable::new(npages, zero_crc);
        let bad = |key: &[u8], reason: String| FilterError::BadRecord {
            disk: disk.to_owned(),
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        };
        let page_in = |key: &[u8], prefix: &str| {
            page_of_key(key, prefix)
                .filter(|p| *p < npages)
                .ok_or_else(|| bad(key, format!("not a page of this disk's {npages}")))
        };
        store.for_each_prefix(namespace, CRC_PREFIX, npages as usize, |key, value| {
            let page = page_in(key, CRC_PREFIX)?;
            let want = (blocks - page * PAGE_BLOCKS).min(PAGE_BLOCKS) * 4;
            if value.len() as u64 != want {
                return Err(bad(key, format!("{} bytes, a page of checksums here has {want}", value.len())));
            }
            let crcs = value.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            if crcs.clone().all(|c| c == zero_crc) {
                // Zeroes: what a page that does not exist says already.
                return Ok(());
            }
            let p = table.get_or_make(page).ok_or_else(|| bad(key, "past the disk".into()))?;
            for (slot, crc) in p.crcs.iter().zip(crcs) {
                slot.store(crc, SeqCst);
            }
            Ok(())
        })?;
        let mut suspects = Vec::new();
        store.for_each_prefix(namespace, INTENT_PREFIX, npages as usize, |key, _| {
            let page = page_in(key, INTENT_PREFIX)?;
            let p = table.get_or_make(page).ok_or_else(|| bad(key, "past the disk".into()))?;
            p.marked.store(true, SeqCst);
            suspects.push(page);
            Ok::<(), FilterError>(())
        })?;
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
            blocks,
            table,
            zero_crc,
            activity: (0..ACTIVITY_STRIPES).map(|_| Activity::default()).collect(),
            marked_pages: std::sync::Mutex::new(Vec::new()),
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

    fn pages_of(&self, offset: u64, len: u64) -> Range<u64> {
        let first = offset / self.block;
        let last = (offset + len).div_ceil(self.block);
        first / PAGE_BLOCKS..last.div_ceil(PAGE_BLOCKS)
    }

    /// The blocks of page `p` that are blocks of the disk.
    fn blocks_of_page(&self, p: u64) -> Range<u64> {
        p * PAGE_BLOCKS..((p + 1) * PAGE_BLOCKS).min(self.blocks)
    }

    /// The checksum of block `b` in memory.
    fn crc_of(&self, b: u64) -> u32 {
        match self.table.get(b / PAGE_BLOCKS) {
            Some(page) => page.crcs[(b % PAGE_BLOCKS) as usize].load(SeqCst),
            None => self.zero_crc,
        }
    }

    /// A page of checksums as stored.
    fn page_bytes(&self, p: u64, page: &Page) -> Vec<u8> {
        let n = self.blocks_of_page(p).count();
        page.crcs[..n].iter().flat_map(|c| c.load(SeqCst).to_le_bytes()).collect()
    }

    /// The write-activity stripes of `pages`: each stripe once (all of them for a range that
    /// long), so that the count of a request is the same when it starts and when it finishes.
    fn stripes(pages: Range<u64>) -> impl Iterator<Item = usize> {
        let n = (pages.end - pages.start).min(ACTIVITY_STRIPES);
        (pages.start..pages.start + n).map(|p| (p % ACTIVITY_STRIPES) as usize)
    }

    async fn commit(&self, batch: Batch) -> IoResult<()> {
        let store = self.store.clone();
        offload(move || store.commit(batch).map_err(store_error)).await
    }

    /// Recomputes the checksums of pages marked when the disk was opened. Runs once.
    async fn recover(&self, next: Next<'_>) -> IoResult<()> {
        for &p in &self.suspects {
            let Some(page) = self.table.get(p) else { continue };
            let blocks = self.blocks_of_page(p);
            let (first, n) = (blocks.start, blocks.end - blocks.start);
            let buf = next.read(first * self.block, IoBuf::scratch((n * self.block) as usize)).await?;
            for (slot, data) in page.crcs.iter().zip(buf.as_slice().chunks(self.block as usize)) {
                slot.store(crc32fast::hash(data), SeqCst);
            }
            let mut batch = Batch::new();
            batch.put(&self.namespace, crc_key(p), self.page_bytes(p, page));
            batch.delete(&self.namespace, intent_key(p));
            self.commit(batch).await?;
            page.marked.store(false, SeqCst);
            // This page is recovered and unmarked; the pages after it are still marked.
            failpoint::hit("integrity::recover::page-done");
        }
        if !self.suspects.is_empty() {
            tracing::info!(disk = %self.disk, pages = self.suspects.len(), "integrity: checksums recovered");
        }
        Ok(())
    }

    /// Whether page `p` needs its intent mark committed before a change: a write makes the page;
    /// zeroes need nothing on a page that does not exist.
    fn needs_mark(&self, p: u64, zeroes: bool) -> bool {
        match self.table.get(p) {
            Some(page) => !page.marked.load(SeqCst),
            None => !zeroes,
        }
    }

    /// Commits the intent marks of the pages not marked yet, before data goes to them, in
    /// batches of at most [`MARK_BATCH`].
    async fn mark(&self, pages: Range<u64>, zeroes: bool) -> IoResult<()> {
        if !pages.clone().any(|p| self.needs_mark(p, zeroes)) {
            return Ok(());
        }
        let _one = self.marking.lock().await;
        let mut todo = Vec::new();
        let mut pending = pages.filter(|&p| self.needs_mark(p, zeroes)).peekable();
        while pending.peek().is_some() {
            let mut batch = Batch::new();
            todo.clear();
            for p in pending.by_ref().take(MARK_BATCH) {
                batch.put(&self.namespace, intent_key(p), []);
                todo.push(p);
            }
            self.commit(batch).await?;
            // The marks are durable; the data write has not gone out.
            failpoint::hit("integrity::mark::committed");
            let mut listed = lock(&self.marked_pages);
            for &p in &todo {
                if let Some(page) = self.table.get_or_make(p) {
                    if !page.marked.swap(true, SeqCst) {
                        listed.push(p);
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets the checksums of a range from its new data (`None`: zeroes, on the pages that exist).
    fn set_crcs(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        let first = offset / self.block;
        let end = first + len / self.block;
        for p in self.pages_of(offset, len) {
            let page = match data {
                Some(_) => self.table.get_or_make(p),
                None => self.table.get(p),
            };
            let Some(page) = page else { continue };
            let blocks = self.blocks_of_page(p);
            for b in blocks.start.max(first)..blocks.end.min(end) {
                let crc = match data {
                    Some(d) => {
                        let at = ((b - first) * self.block) as usize;
                        d.get(at..at + self.block as usize).map_or(self.zero_crc, crc32fast::hash)
                    }
                    None => self.zero_crc,
                };
                page.crcs[(b % PAGE_BLOCKS) as usize].store(crc, SeqCst);
            }
            page.dirty.store(true, SeqCst);
        }
    }

    async fn change(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        let zeroes = req.buf.is_none();
        let _shared = self.barrier.read().await;
        let pages = self.pages_of(head.offset, head.len);
        if pages.end > self.table.npages {
            return Err(io_error(std::io::ErrorKind::InvalidInput, "request past the end of the disk"));
        }
        self.mark(pages.clone(), zeroes).await?;
        for s in Self::stripes(pages.clone()) {
            self.activity[s].started.fetch_add(1, SeqCst);
        }
        for p in pages.clone() {
            if let Some(page) = self.table.get(p) {
                page.written.store(true, SeqCst);
            }
        }
        self.set_crcs(head.offset, head.len, req.buf.as_ref().map(|b| b.as_slice()));
        let result = next.submit(req).await;
        if result.is_err() {
            // What the range holds now is unknown: take the checksums of whatever is there.
            // Pages zeroes left alone may now hold something: they are made, and marked first.
            if let Ok(buf) =
                next.read(head.offset, IoBuf::scratch(head.len.min(vdisk::device::MAX_IO_BYTES) as usize)).await
            {
                let len = buf.len() as u64;
                if self.mark(self.pages_of(head.offset, len), false).await.is_ok() {
                    self.set_crcs(head.offset, len, Some(buf.as_slice()));
                }
            }
        }
        for s in Self::stripes(pages) {
            self.activity[s].finished.fetch_add(1, SeqCst);
        }
        result
    }

    /// (started, finished) write counts of the stripes of a range's pages, summed. Finished is
    /// read first, so a sum of started below finished never shows.
    fn activity(&self, pages: Range<u64>) -> (u64, u64) {
        let finished = Self::stripes(pages.clone()).map(|s| self.activity[s].finished.load(SeqCst)).sum();
        let started = Self::stripes(pages).map(|s| self.activity[s].started.load(SeqCst)).sum();
        (started, finished)
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
            let raced = before != after || after.0 != after.1;
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
            .find(|(i, chunk)| crc32fast::hash(chunk) != self.crc_of(first + *i as u64))
            .map(|(i, _)| first + i as u64)
    }

    /// Commits the changed checksum pages and clears the marks of pages not written since the
    /// last flush. Looks only at the pages marked, not at every page of the disk.
    async fn flush(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let _alone = self.barrier.write().await;
        let reply = next.submit(req).await?;
        // The data is durable; the checksums that match it are not committed.
        failpoint::hit("integrity::flush::data-flushed");
        let listed = lock(&self.marked_pages).clone();
        let mut batch = Batch::new();
        let (mut committed, mut cleared) = (Vec::new(), Vec::new());
        for &p in &listed {
            let Some(page) = self.table.get(p) else { continue };
            if page.dirty.swap(false, SeqCst) {
                batch.put(&self.namespace, crc_key(p), self.page_bytes(p, page));
                committed.push(page);
            }
            if !page.written.swap(false, SeqCst) && page.marked.load(SeqCst) {
                batch.delete(&self.namespace, intent_key(p));
                page.marked.store(false, SeqCst);
                cleared.push(page);
            }
        }
        if batch.is_empty() {
            return Ok(reply);
        }
        if let Err(e) = self.commit(batch).await {
            // Nothing was committed: the pages stay dirty and marked.
            for page in committed {
                page.dirty.store(true, SeqCst);
            }
            for page in cleared {
                page.marked.store(true, SeqCst);
            }
            return Err(e);
        }
        lock(&self.marked_pages).retain(|&p| self.table.get(p).is_some_and(|page| page.marked.load(SeqCst)));
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

    /// Found by the integrity_records fuzz target: a page number near u64::MAX overflowed, and a
    /// value longer than a page set the checksums of the next page. Each damaged record is now
    /// refused on its own, and a sound page still loads.
    #[test]
    fn a_damaged_checksum_page_is_refused_and_sets_nothing() {
        let size = 2 * PAGE_BLOCKS * 512;
        let open_with = |key: String, value: Vec<u8>| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            store.create_namespace("d").unwrap();
            let mut batch = Batch::new();
            batch.put("d", key, value);
            store.commit(batch).unwrap();
            Integrity::open("d", store, "d", size, 512)
        };
        for (key, value) in [
            (crc_key(u64::MAX), vec![1u8; 8]),
            (crc_key(u64::MAX / 1024 + 1), vec![1u8; 8]),
            (crc_key(0), vec![7u8; 8 * PAGE_BLOCKS as usize]),
        ] {
            let shown = key.clone();
            assert!(matches!(open_with(key, value), Err(FilterError::BadRecord { .. })), "{shown}");
        }
        let f = open_with(crc_key(0), vec![7u8; 4 * PAGE_BLOCKS as usize]).unwrap();
        let page = f.table.get(0).unwrap();
        assert!(page.crcs.iter().all(|c| c.load(SeqCst) == u32::from_le_bytes([7; 4])));
        assert!(f.table.get(1).is_none(), "page 0's record made page 1");
    }
}
