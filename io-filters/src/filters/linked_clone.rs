//! Linked clones: a disk that reads what it has not written from its parent's chain.
//!
//! The clone keeps one bit per 4 KiB grain ([`GRAIN`]): set once the grain's data is in the
//! clone. Reads of grains not set are redirected to the parent (whole requests by the chain's
//! loop, mixed ones piece by piece); writes land in the clone, a grain written only in part being
//! filled from the parent first. With `copy_on_read`, grains read from the parent are copied in.
//!
//! The bitmap lives in memory and, in pages of [`PAGE_GRAINS`] bits, in the clone's namespace.
//! Crash consistency rests on two rules:
//!
//! * A stored bit never points at data that is not durable. A bit is set in memory only after
//!   the write that filled its grain completed; a flush snapshots the changed pages *before* it
//!   flushes the clone's data below, and commits the snapshot only after, so every bit committed
//!   belongs to a write the flush made durable.
//! * A write acknowledged as durable has its bit stored: a flush commits the bits of every write
//!   completed before it (above). A FUA write to a grain whose bit is not stored yet (it may have
//!   been allocated by an earlier write, whose data is not durable either) runs a flush of its
//!   own after it: the clone's data below is flushed, then the bits committed. Flushes are
//!   serialised, so a FUA write never completes while an earlier flush's commit is outstanding.
//!
//! Commits OR the bits into what is stored, so concurrent commits never clear each other's bits.
//! After a crash, a grain whose bit did not reach the store reads from the parent again: the
//! write that filled it was never acknowledged as durable, so its loss is allowed; the next write
//! to the grain fills it afresh.
//!
//! Grains being allocated (written for the first time, copied on read, copied by `flatten`) are
//! serialised by striped locks; writes to allocated grains take no lock.
//!
//! Nothing here is sized by a request's length: a discard or write-zeroes (which may cover the
//! whole disk) is run in pieces of [`PIECE_GRAINS`], the stripes a piece locks are a 256-bit
//! set, and the bitmap is read and set a 64-bit word at a time.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use state_store::{Batch, Store};
use tokio::sync::{Mutex, MutexGuard};
use vdisk::{IoBuf, IoFuture, IoResult, RequestKind};

use crate::blocking::{offload, store_error};
use crate::chain::{Chain, Filter, Next, Verdict};
use crate::request::{Reply, Request};
use crate::FilterError;

/// Bytes per bitmap bit.
pub const GRAIN: u64 = 4096;
/// Bits per stored page: 4 KiB of bitmap, 128 MiB of disk.
pub const PAGE_GRAINS: u64 = 32768;
const PAGE_WORDS: usize = (PAGE_GRAINS / 64) as usize;
const BITMAP_PREFIX: &str = "clone/bitmap/";
const STRIPES: usize = 256;
/// Grains copied by one step of a flatten or a copy-on-read.
const RUN_GRAINS: u64 = 256;
/// Grains of a discard or write-zeroes allocated in one piece (64 MiB): a request longer than
/// this is sent below in pieces, each locked, filled and set on its own, so what one request
/// holds and walks at once does not grow with its length.
pub const PIECE_GRAINS: u64 = RUN_GRAINS * 64;
/// Bytes of a mixed read sent below or to the parent at once (1 MiB). A read mixed at every
/// level of a family nests one level per clone, each holding its piece while the level above
/// waits, so a read holds at most the family's depth times this (256 MiB at the deepest),
/// not the depth times its own length.
pub const MIXED_PIECE: u64 = 1 << 20;

fn page_key(page: usize) -> String {
    format!("{BITMAP_PREFIX}{page:016x}")
}

/// The allocation bitmap of one clone.
pub struct Bitmap {
    words: Vec<AtomicU64>,
    dirty: Vec<AtomicBool>,
    grains: u64,
}

impl Bitmap {
    pub fn new(capacity: u64) -> Bitmap {
        let grains = capacity.div_ceil(GRAIN);
        let words = grains.div_ceil(64) as usize;
        let pages = words.div_ceil(PAGE_WORDS);
        Bitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            grains,
        }
    }

    /// Bytes of memory the bitmap takes.
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 8 + self.dirty.len() + std::mem::size_of::<Bitmap>()
    }

    pub fn grains(&self) -> u64 {
        self.grains
    }

    pub fn is_set(&self, g: u64) -> bool {
        self.words[(g / 64) as usize].load(SeqCst) & (1 << (g % 64)) != 0
    }

    /// Each word of `range` with the mask of the range's bits in it.
    fn masks(&self, range: Range<u64>) -> impl Iterator<Item = (&AtomicU64, u64)> {
        let (a, b) = (range.start, range.end.min(self.grains));
        let words = if a < b { a / 64..(b - 1) / 64 + 1 } else { 0..0 };
        words.filter_map(move |w| {
            let lo = if w == a / 64 { a % 64 } else { 0 };
            let hi = if w == (b - 1) / 64 { (b - 1) % 64 + 1 } else { 64 };
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            self.words.get(w as usize).map(|word| (word, mask))
        })
    }

    /// Whether every grain of `range` is set.
    pub fn all_set(&self, range: Range<u64>) -> bool {
        self.masks(range).all(|(w, m)| w.load(SeqCst) & m == m)
    }

    /// Whether no grain of `range` is set.
    pub fn none_set(&self, range: Range<u64>) -> bool {
        self.masks(range).all(|(w, m)| w.load(SeqCst) & m == 0)
    }

    /// Sets every grain of `range`.
    fn set_range(&self, range: Range<u64>) {
        let first = range.start / 64;
        for (i, (w, m)) in self.masks(range).enumerate() {
            if w.fetch_or(m, SeqCst) & m != m {
                self.dirty[(first as usize + i) / PAGE_WORDS].store(true, SeqCst);
            }
        }
    }

    pub fn set(&self, g: u64) {
        let w = (g / 64) as usize;
        if self.words[w].fetch_or(1 << (g % 64), SeqCst) & (1 << (g % 64)) == 0 {
            self.dirty[w / PAGE_WORDS].store(true, SeqCst);
        }
    }

    /// How many grains of `range` are set.
    pub fn count(&self, range: Range<u64>) -> u64 {
        self.masks(range).map(|(w, m)| u64::from((w.load(SeqCst) & m).count_ones())).sum()
    }

    pub fn allocated(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(SeqCst).count_ones())).sum()
    }

    /// The words of the pages changed since the last snapshot, marking them clean.
    fn take_dirty(&self) -> Vec<(usize, Vec<u64>)> {
        let mut out = Vec::new();
        for (p, d) in self.dirty.iter().enumerate() {
            if d.swap(false, SeqCst) {
                out.push((p, self.page_words(p)));
            }
        }
        out
    }

    fn page_words(&self, p: usize) -> Vec<u64> {
        let first = p * PAGE_WORDS;
        let last = (first + PAGE_WORDS).min(self.words.len());
        self.words[first..last].iter().map(|w| w.load(SeqCst)).collect()
    }

    /// ORs a stored page into the bitmap, if it is one of this bitmap's pages: its number
    /// below the page count, its length that of the page, no bit past the last grain.
    fn load_page(&self, p: u64, bytes: &[u8]) -> Result<(), String> {
        let pages = self.dirty.len() as u64;
        if p >= pages {
            return Err(format!("page {p} of a bitmap of {pages}"));
        }
        let first = p as usize * PAGE_WORDS;
        let words = &self.words[first..(first + PAGE_WORDS).min(self.words.len())];
        if bytes.len() != words.len() * 8 {
            return Err(format!("{} bytes, the page has {}", bytes.len(), words.len() * 8));
        }
        let tail = self.grains % 64;
        for (i, (w, chunk)) in words.iter().zip(bytes.chunks_exact(8)).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let bits = u64::from_le_bytes(b);
            if first + i + 1 == self.words.len() && tail != 0 && bits >> tail != 0 {
                return Err("bits set past the last grain".into());
            }
            w.fetch_or(bits, SeqCst);
        }
        Ok(())
    }
}

/// Lock stripes, a bit each: a request names at most all [`STRIPES`] of them, whatever its
/// length.
#[derive(Default)]
struct StripeSet([u64; STRIPES / 64]);

impl StripeSet {
    fn insert(&mut self, s: usize) {
        self.0[s / 64] |= 1 << (s % 64);
    }

    fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn is_full(&self) -> bool {
        self.0.iter().all(|w| *w == u64::MAX)
    }

    /// The stripes in increasing order (the order locks are taken in).
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..STRIPES).filter(|s| self.0[s / 64] & (1 << (s % 64)) != 0)
    }
}

/// The linked-clone filter of one disk.
pub struct LinkedClone {
    disk: String,
    parent_name: String,
    copy_on_read: bool,
    /// The parent's chain, which unwritten grains are read from.
    parent: Arc<Chain>,
    capacity: u64,
    bitmap: Bitmap,
    store: Arc<Store>,
    namespace: String,
    /// Serialises commits of bitmap pages (each ORs into what is stored).
    commit_lock: Arc<std::sync::Mutex<()>>,
    stripes: Box<[Mutex<()>]>,
    /// Held across a flush's snapshot, flush below and commit.
    flushing: Mutex<()>,
    flattened: AtomicBool,
    redirected: AtomicU64,
}

/// What a clone is made with.
pub struct CloneSetup<'a> {
    pub disk: &'a str,
    /// The parent disk's chain: its name is the parent's name.
    pub parent: Arc<Chain>,
    pub copy_on_read: bool,
    pub capacity: u64,
    pub store: Arc<Store>,
    pub namespace: &'a str,
}

impl LinkedClone {
    /// Loads the clone's bitmap. Blocking (state-store reads). A stored page that is not one of
    /// this bitmap's is an error: the disk stays unavailable rather than read the wrong grains.
    pub fn open(setup: CloneSetup<'_>) -> Result<LinkedClone, FilterError> {
        let bitmap = Bitmap::new(setup.capacity);
        let pages = bitmap.dirty.len();
        setup.store.for_each_prefix(setup.namespace, BITMAP_PREFIX, pages, |key, value| {
            let bad = |reason: String| FilterError::BadRecord {
                disk: setup.disk.to_owned(),
                key: String::from_utf8_lossy(key).into_owned(),
                reason,
            };
            let page = std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.strip_prefix(BITMAP_PREFIX))
                .filter(|h| h.len() == 16)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("not a page key".into()))?;
            bitmap.load_page(page, value).map_err(bad)
        })?;
        Ok(LinkedClone {
            disk: setup.disk.to_owned(),
            parent_name: setup.parent.name().to_owned(),
            copy_on_read: setup.copy_on_read,
            parent: setup.parent,
            capacity: setup.capacity,
            bitmap,
            store: setup.store,
            namespace: setup.namespace.to_owned(),
            commit_lock: Arc::new(std::sync::Mutex::new(())),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flushing: Mutex::new(()),
            flattened: AtomicBool::new(false),
            redirected: AtomicU64::new(0),
        })
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn parent_name(&self) -> &str {
        &self.parent_name
    }

    /// The clone's own disk.
    pub fn name(&self) -> &str {
        &self.disk
    }

    pub fn redirected(&self) -> u64 {
        self.redirected.load(SeqCst)
    }

    pub fn is_flattened(&self) -> bool {
        self.flattened.load(SeqCst)
    }

    /// After a flatten has cut the link durably: everything passes through from now on.
    pub fn set_flattened(&self) {
        self.flattened.store(true, SeqCst);
    }

    /// The state-store keys of the bitmap, for the batch that cuts the link.
    pub fn delete_bitmap(&self, batch: &mut Batch) -> Result<(), FilterError> {
        self.store.for_each_prefix(&self.namespace, BITMAP_PREFIX, self.bitmap.dirty.len(), |key, _| {
            batch.delete(&self.namespace, key);
            Ok::<(), FilterError>(())
        })
    }

    fn parent(&self) -> Arc<Chain> {
        self.parent.clone()
    }

    fn grains(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / GRAIN..(offset + len).div_ceil(GRAIN)
    }

    /// The bytes of grain `g` (the last may be short).
    fn grain_bytes(&self, g: u64) -> std::ops::Range<u64> {
        g * GRAIN..((g + 1) * GRAIN).min(self.capacity)
    }

    /// Takes the locks of the grains of `grains` not set yet (at most every stripe once, in
    /// stripe order). A grain set meanwhile needs none; a grain set stays set.
    async fn lock(&self, grains: Range<u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut set = StripeSet::default();
        let first_word = grains.start / 64;
        for (i, (w, m)) in self.bitmap.masks(grains).enumerate() {
            let mut unset = !w.load(SeqCst) & m;
            while unset != 0 {
                let g = (first_word + i as u64) * 64 + u64::from(unset.trailing_zeros());
                set.insert((g % STRIPES as u64) as usize);
                unset &= unset - 1;
            }
            if set.is_full() {
                break;
            }
        }
        let mut guards = Vec::with_capacity(set.len());
        for s in set.iter() {
            guards.push(self.stripes[s].lock().await);
        }
        guards
    }

    /// Copies the grains of `range` not set yet from the parent into the clone. The caller
    /// holds their locks.
    async fn fill_locked(&self, range: std::ops::Range<u64>, next: Next<'_>, fua: bool) -> IoResult<()> {
        let mut g = range.start;
        while g < range.end {
            if self.bitmap.is_set(g) {
                g += 1;
                continue;
            }
            let mut end = g + 1;
            while end < range.end && !self.bitmap.is_set(end) {
                end += 1;
            }
            let bytes = self.grain_bytes(g).start..self.grain_bytes(end - 1).end;
            let data =
                next.read_from(self.parent(), bytes.start, IoBuf::scratch((bytes.end - bytes.start) as usize)).await?;
            next.write(bytes.start, data, fua).await?;
            for x in g..end {
                self.bitmap.set(x);
            }
            g = end;
        }
        Ok(())
    }

    /// Copies the grains of `range` not set yet from the parent, taking their locks.
    pub async fn fill(&self, range: std::ops::Range<u64>, next: Next<'_>) -> IoResult<()> {
        let _locks = self.lock(range.clone()).await;
        self.fill_locked(range, next, false).await
    }

    /// Commits bit pages, ORed into what is stored. Blocking work, offloaded.
    async fn commit(&self, pages: Vec<(usize, Vec<u64>)>) -> IoResult<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let (store, ns, lock) = (self.store.clone(), self.namespace.clone(), self.commit_lock.clone());
        offload(move || {
            let _one = plumbing::lock(&lock);
            let mut batch = Batch::new();
            for (p, mut words) in pages {
                let key = page_key(p);
                if let Some(stored) = store.get(&ns, &key).map_err(store_error)? {
                    for (w, chunk) in words.iter_mut().zip(stored.chunks_exact(8)) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(chunk);
                        *w |= u64::from_le_bytes(b);
                    }
                }
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                batch.put(&ns, key, bytes);
            }
            store.commit(batch).map_err(store_error)
        })
        .await
    }

    /// Reads a request that touches both the clone's grains and the parent's, piece by piece.
    async fn read_mixed(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        let Some(mut buf) = req.buf else { return Ok(None) };
        let mut pos = head.offset;
        while pos < head.end() {
            let own = self.bitmap.is_set(pos / GRAIN);
            let mut end = (pos / GRAIN + 1) * GRAIN;
            while end < head.end() && end - pos < MIXED_PIECE && self.bitmap.is_set(end / GRAIN) == own {
                end += GRAIN;
            }
            let end = end.min(head.end());
            let piece = IoBuf::scratch((end - pos) as usize);
            let piece = if own {
                next.read(pos, piece).await?
            } else {
                self.redirected.fetch_add(1, SeqCst);
                next.read_from(self.parent(), pos, piece).await?
            };
            let at = (pos - head.offset) as usize;
            buf.as_mut_slice()[at..at + piece.len()].copy_from_slice(piece.as_slice());
            pos = end;
        }
        Ok(Some(buf))
    }

    /// Runs a write, discard or write-zeroes that reaches grains not allocated yet; a discard
    /// or write-zeroes longer than [`PIECE_GRAINS`] in pieces (writes are shorter than one).
    async fn allocate(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        if req.buf.is_some() || head.len <= PIECE_GRAINS * GRAIN {
            let reply = self.allocate_piece(req, next).await?;
            if head.fua {
                self.flush(Request::flush(), next).await?;
            }
            return Ok(reply);
        }
        let mut at = head.offset;
        while at < head.end() {
            let end = ((at / GRAIN + PIECE_GRAINS) * GRAIN).min(head.end());
            let piece = match head.kind {
                RequestKind::Discard => Request::discard(at, end - at),
                _ => Request::write_zeroes(at, end - at, false),
            };
            self.allocate_piece(req.child(piece), next).await?;
            at = end;
        }
        // The pieces went without FUA: one flush makes them and their bits durable.
        if head.fua {
            self.flush(Request::flush(), next).await?;
        }
        Ok(None)
    }

    /// Allocates the grains of one request (at most [`PIECE_GRAINS`] for zeroes).
    async fn allocate_piece(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let head = req.head;
        let grains = self.grains(head.offset, head.len);
        // The grains not set yet are ours to set while we hold their stripes: nobody else sets
        // them meanwhile, so every grain of the range is set once the request is done.
        let _locks = self.lock(grains.clone()).await;
        // Grains the request covers only in part get the parent's data first.
        let first = grains.start;
        let last = grains.end - 1;
        if head.offset > self.grain_bytes(first).start {
            self.fill_locked(first..first + 1, next, head.fua).await?;
        }
        if head.end() < self.grain_bytes(last).end {
            self.fill_locked(last..last + 1, next, head.fua).await?;
        }
        let reply = next.submit(req).await?;
        self.bitmap.set_range(grains);
        Ok(reply)
    }

    /// Whether a FUA request to `grains` needs a flush of the bitmap after it: some bit of them
    /// may not be stored yet.
    fn needs_sync(&self, grains: std::ops::Range<u64>) -> bool {
        let pages = grains.start / PAGE_GRAINS..=(grains.end - 1) / PAGE_GRAINS;
        pages.into_iter().any(|p| self.bitmap.dirty[p as usize].load(SeqCst)) || self.flushing.try_lock().is_err()
    }

    /// Snapshots the changed bitmap pages, runs `req` (a flush) below, then commits the snapshot.
    async fn flush(&self, req: Request, next: Next<'_>) -> IoResult<Reply> {
        let _one = self.flushing.lock().await;
        let snapshot = self.bitmap.take_dirty();
        // The bits are snapshot; the data they point at may not be durable yet.
        failpoint::hit("linked_clone::flush::snapshot-taken");
        let result = next.submit(req).await;
        let committed = match result {
            Ok(_) => {
                // The data is durable; its bits are not committed.
                failpoint::hit("linked_clone::flush::data-flushed");
                self.commit(snapshot.clone()).await
            }
            Err(_) => Ok(()),
        };
        if result.is_err() || committed.is_err() {
            for (p, _) in &snapshot {
                self.bitmap.dirty[*p].store(true, SeqCst);
            }
        }
        committed?;
        result
    }

    /// Copies every grain not allocated yet from the parent and makes it durable: the first half
    /// of a flatten. `next` is the chain below this filter.
    pub async fn copy_all(&self, next: Next<'_>) -> IoResult<u64> {
        let mut copied = 0;
        let mut g = 0;
        while g < self.bitmap.grains {
            let end = (g + RUN_GRAINS).min(self.bitmap.grains);
            let missing = end - g - self.bitmap.count(g..end);
            if missing > 0 {
                self.fill(g..end, next).await?;
                copied += missing;
            }
            g = end;
        }
        self.flush(Request::flush(), next).await?;
        Ok(copied)
    }
}

impl Filter for LinkedClone {
    fn kind(&self) -> &'static str {
        "linked_clone"
    }

    fn pre(&self, req: &mut Request) -> Verdict {
        if self.flattened.load(SeqCst) {
            return Verdict::Continue;
        }
        let head = req.head;
        match head.kind {
            RequestKind::Flush => {
                if self.bitmap.dirty.iter().any(|d| d.load(SeqCst)) {
                    Verdict::Handle
                } else {
                    Verdict::Continue
                }
            }
            kind => {
                let grains = self.grains(head.offset, head.len);
                if self.bitmap.all_set(grains.clone()) {
                    if head.fua && self.needs_sync(grains) {
                        Verdict::Handle
                    } else {
                        Verdict::Continue
                    }
                } else if kind == RequestKind::Read && !self.copy_on_read && self.bitmap.none_set(grains) {
                    self.redirected.fetch_add(1, SeqCst);
                    Verdict::Redirect(self.parent())
                } else {
                    Verdict::Handle
                }
            }
        }
    }

    fn handle<'a>(&'a self, req: Request, next: Next<'a>) -> IoFuture<'a, Reply> {
        Box::pin(async move {
            match req.head.kind {
                RequestKind::Flush => self.flush(req, next).await,
                RequestKind::Read if self.copy_on_read => {
                    let grains = self.grains(req.head.offset, req.head.len);
                    if !self.bitmap.all_set(grains.clone()) {
                        self.redirected.fetch_add(1, SeqCst);
                    }
                    self.fill(grains, next).await?;
                    next.submit(req).await
                }
                RequestKind::Read => self.read_mixed(req, next).await,
                RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
                    let grains = self.grains(req.head.offset, req.head.len);
                    if !self.bitmap.all_set(grains) {
                        self.allocate(req, next).await
                    } else {
                        // A FUA request to allocated grains whose bits may not be stored yet.
                        let reply = next.submit(req).await?;
                        self.flush(Request::flush(), next).await?;
                        Ok(reply)
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_operations_agree_with_bit_by_bit_ones() {
        // 1000 grains: the last word holds 40 of them.
        let bitmap = Bitmap::new(1000 * GRAIN);
        for g in [0, 1, 63, 64, 65, 200, 511, 512, 998, 999] {
            bitmap.set(g);
        }
        let mut rng = test_support::Rng::new(7);
        for _ in 0..2000 {
            let a = rng.below(1000);
            let b = a + rng.below(1001 - a);
            let naive = (a..b).filter(|g| bitmap.is_set(*g)).count() as u64;
            assert_eq!(bitmap.count(a..b), naive, "{a}..{b}");
            assert_eq!(bitmap.all_set(a..b), naive == b - a, "{a}..{b}");
            assert_eq!(bitmap.none_set(a..b), naive == 0, "{a}..{b}");
        }
        bitmap.set_range(100..700);
        assert!(bitmap.all_set(100..700));
        assert_eq!(bitmap.count(0..1000), 600 + 7);
        assert!(!bitmap.is_set(99) && !bitmap.is_set(700));
        assert!(bitmap.dirty[0].load(SeqCst));
    }

    #[test]
    fn a_stored_page_must_be_one_of_the_bitmaps() {
        // 1000 grains: one page of 16 words, the last one holding 40 grains.
        let bitmap = Bitmap::new(1000 * GRAIN);
        assert!(bitmap.load_page(1, &[0; 128]).is_err());
        assert!(bitmap.load_page(u64::MAX, &[0xff; 128]).is_err());
        assert!(bitmap.load_page(0, &[0xff; 120]).is_err());
        let mut page = vec![0u8; 128];
        page[127] = 0x80; // grain 1023
        assert!(bitmap.load_page(0, &page).is_err());
        assert_eq!(bitmap.allocated(), 0, "nothing of a refused page is loaded");
        page[127] = 0;
        page[124] = 0x80; // grain 999
        bitmap.load_page(0, &page).unwrap();
        assert!(bitmap.is_set(999) && bitmap.allocated() == 1);
    }
}
