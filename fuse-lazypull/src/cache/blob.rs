//! One blob: random access to its bytes, fetching missing chunks from the registry on demand
//! and the rest in the background, then verifying the whole and publishing it under its digest
//! (or adopting the copy another process published). See [`super`] for how fetching works.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use plumbing::lock;

use super::chunk_map::{Chunk, ChunkMap};
use super::error::{io, CacheError};
use super::index::{now_secs, BlobRecord, Index};
use super::layout::Layout;
use crate::digest::{Digest, Hasher};
use crate::layer::ReadError;
use crate::reference::ImageRef;
use crate::registry::{Descriptor, Registry, RegistryError};

/// The unit of fetching and of the present-chunk map.
pub const CHUNK: u64 = 64 << 10;
/// The background fetch asks for this much per ranged GET.
const BACKGROUND_RUN: u64 = 4 << 20;
/// How many times `fetch_all` fetches a blob whose digest does not match before giving up.
const FETCH_ATTEMPTS: u32 = 3;
/// Blobs larger than this are refused (a manifest must not make us map petabytes).
const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Threads fetching for the readers of one blob at most; a reader that finds them all busy waits
/// for one to end. Each holds a connection and reserves 8 MiB of stack, and a reader gives up
/// after `fetch_timeout` while its fetch goes on: a registry that stalls would otherwise collect
/// one thread for every missing range the container reads.
const MAX_FETCH_THREADS: usize = 16;

/// Where a blob's missing bytes come from. The registry is the real one; tests use others.
pub trait RangeSource: Send + Sync {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError>;
}

/// A blob in one repository of a registry.
pub(super) struct RegistrySource {
    pub(super) registry: Arc<Registry>,
    pub(super) image: ImageRef,
    pub(super) digest: Digest,
}

impl RangeSource for RegistrySource {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        self.registry.fetch_range(&self.image, &self.digest, range)
    }
}

/// Where a blob's bytes are locally.
struct Local {
    file: Arc<File>,
    /// Empty once the blob is complete.
    chunks: ChunkMap,
    complete: bool,
    path: PathBuf,
    /// The last failed fetch, for readers that waited on it.
    last_error: Option<Arc<RegistryError>>,
    /// Counts changes to the chunk map, so `fetch_all` knows the bytes it hashed are still there.
    changes: u64,
    /// Threads fetching for readers now ([`MAX_FETCH_THREADS`]).
    fetchers: usize,
    /// Fetches that failed so far, so a reader can tell whether its own did.
    failed_fetches: u64,
}

/// Random access to one blob: missing ranges are fetched on demand (ahead of background work);
/// `fetch_all` fills the rest. Bytes of a complete blob were checked against its digest.
pub struct Blob {
    digest: Digest,
    size: u64,
    fetch_timeout: Duration,
    complete_path: PathBuf,
    sources: Mutex<Vec<Arc<dyn RangeSource>>>,
    local: Mutex<Local>,
    changed: Condvar,
    local_bytes: AtomicU64,
    /// One `fetch_all` at a time.
    filling: Mutex<()>,
    /// To mark the blob complete in the index.
    index: Arc<Index>,
    /// This blob, for the threads that fetch for readers.
    me: Weak<Blob>,
}

impl Blob {
    /// Blob `desc` in the cache at `layout`: the published file if there is one, else a new
    /// partial file that `source` fills.
    pub(super) fn new(
        layout: &Layout,
        index: &Arc<Index>,
        fetch_timeout: Duration,
        desc: &Descriptor,
        source: Arc<dyn RangeSource>,
    ) -> Result<Arc<Blob>, CacheError> {
        if desc.size > MAX_BLOB_SIZE {
            return Err(CacheError::BadBlob {
                digest: desc.digest.clone(),
                detail: format!("size {} is over the limit of {MAX_BLOB_SIZE}", desc.size),
            });
        }
        let complete_path = layout.blob(&desc.digest);
        let partial_path = layout.partial(&desc.digest);
        let local = match open_complete(&complete_path, desc)? {
            Some(file) => Local {
                file: Arc::new(file),
                chunks: ChunkMap::new(0),
                complete: true,
                path: complete_path.clone(),
                last_error: None,
                changes: 0,
                fetchers: 0,
                failed_fetches: 0,
            },
            None => {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&partial_path)
                    .map_err(io("creating", &partial_path))?;
                file.set_len(desc.size).map_err(io("sizing", &partial_path))?;
                Local {
                    file: Arc::new(file),
                    chunks: ChunkMap::new(desc.size.div_ceil(CHUNK) as usize),
                    complete: false,
                    path: partial_path,
                    last_error: None,
                    changes: 0,
                    fetchers: 0,
                    failed_fetches: 0,
                }
            }
        };
        let local_bytes = if local.complete { desc.size } else { 0 };
        Ok(Arc::new_cyclic(|me| Blob {
            digest: desc.digest.clone(),
            size: desc.size,
            fetch_timeout,
            complete_path,
            sources: Mutex::new(vec![source]),
            local: Mutex::new(local),
            changed: Condvar::new(),
            local_bytes: AtomicU64::new(local_bytes),
            filling: Mutex::new(()),
            index: Arc::clone(index),
            me: me.clone(),
        }))
    }

    /// Adds a fallback source for the blob, opened again as `desc`, which must match.
    pub(super) fn add_source(&self, desc: &Descriptor, source: Arc<dyn RangeSource>) -> Result<(), CacheError> {
        if self.size != desc.size {
            return Err(CacheError::BadBlob {
                digest: desc.digest.clone(),
                detail: format!("size {} given, {} known", desc.size, self.size),
            });
        }
        lock(&self.sources).push(source);
        Ok(())
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Fetches every missing byte, verifies the whole blob against its digest and keeps it.
    pub fn fetch_all(&self) -> Result<(), CacheError> {
        self.fetch_all_paced(&|| true)
    }

    /// As [`Blob::fetch_all`], calling `pace` before each run of chunks it fetches, which may
    /// wait to let other work go first, and stops the fetch ([`CacheError::Stopped`]) by
    /// returning false.
    pub fn fetch_all_paced(&self, pace: &dyn Fn() -> bool) -> Result<(), CacheError> {
        let _one = lock(&self.filling);
        let mut attempt = 0;
        loop {
            if self.is_complete() || self.adopt_published()? {
                return Ok(());
            }
            self.fill(pace)?;
            let (file, changes) = {
                let local = lock(&self.local);
                (Arc::clone(&local.file), local.changes)
            };
            let actual = hash_file(&file, self.size).map_err(io("hashing", &self.complete_path))?;
            if actual == self.digest {
                if self.publish(&file, changes)? {
                    return Ok(());
                }
                // Readers discarded or refetched bytes while they were hashed: again.
                continue;
            }
            attempt += 1;
            tracing::warn!(digest = %self.digest, %actual, attempt, "blob does not match its digest; fetching it again");
            self.forget_all();
            if attempt == FETCH_ATTEMPTS {
                return Err(CacheError::Corrupt { digest: self.digest.clone(), actual, attempts: attempt });
            }
        }
    }

    pub fn is_complete(&self) -> bool {
        lock(&self.local).complete
    }

    /// The local file of a complete, verified blob.
    pub fn path(&self) -> Option<PathBuf> {
        let local = lock(&self.local);
        local.complete.then(|| local.path.clone())
    }

    /// Bytes held locally, for progress.
    pub fn local_bytes(&self) -> u64 {
        self.local_bytes.load(Ordering::Relaxed)
    }

    /// Fetches every chunk not present, in large runs, waiting for runs readers are fetching.
    fn fill(&self, pace: &dyn Fn() -> bool) -> Result<(), CacheError> {
        loop {
            if !pace() {
                return Err(CacheError::Stopped);
            }
            let run = {
                let mut local = lock(&self.local);
                if local.complete {
                    return Ok(());
                }
                match local.chunks.first_missing() {
                    Some(first) => {
                        let max = (BACKGROUND_RUN / CHUNK) as usize;
                        let len =
                            (first..first + max).take_while(|&i| local.chunks.get(i) == Some(Chunk::Missing)).count();
                        local.chunks.set(first..first + len, Chunk::Missing, Chunk::Fetching);
                        first..first + len
                    }
                    None if local.chunks.present() == local.chunks.len() => return Ok(()),
                    None => {
                        // Readers are fetching the rest; their fetches end in bytes or an error.
                        let _ = self.changed.wait_timeout(local, Duration::from_millis(200));
                        continue;
                    }
                }
            };
            self.fetch_run(run.clone()).map_err(|source| {
                let bytes = self.chunk_bytes(run);
                CacheError::Fetch { digest: self.digest.clone(), start: bytes.start, end: bytes.end, source }
            })?;
        }
    }

    /// Byte range of chunks `run`.
    fn chunk_bytes(&self, run: Range<usize>) -> Range<u64> {
        (run.start as u64 * CHUNK)..(run.end as u64 * CHUNK).min(self.size)
    }

    /// Fetches chunks `run` (marked `Fetching` by the caller) from the first source that answers,
    /// stores them and marks them present; on failure marks them missing again.
    fn fetch_run(&self, run: Range<usize>) -> Result<(), Arc<RegistryError>> {
        let bytes = self.chunk_bytes(run.clone());
        let sources = lock(&self.sources).clone();
        let mut result = Err(Arc::new(RegistryError::Config("no source for the blob".into())));
        for source in &sources {
            result = source.fetch(bytes.clone()).map_err(Arc::new);
            if result.is_ok() {
                break;
            }
        }
        let stored = result.and_then(|data| {
            if data.len() as u64 != bytes.end - bytes.start {
                return Err(Arc::new(RegistryError::Config(format!(
                    "source sent {} bytes for {}..{}",
                    data.len(),
                    bytes.start,
                    bytes.end
                ))));
            }
            let file = Arc::clone(&lock(&self.local).file);
            file.write_all_at(&data, bytes.start).map_err(|source| {
                Arc::new(RegistryError::Io { what: format!("writing blob {} to the cache", self.digest), source })
            })
        });
        let mut local = lock(&self.local);
        if !local.complete {
            let mark = if stored.is_ok() { Chunk::Present } else { Chunk::Missing };
            local.changes += 1;
            local.chunks.set(run.clone(), Chunk::Fetching, mark);
            if let Err(e) = &stored {
                tracing::warn!(digest = %self.digest, start = bytes.start, end = bytes.end, error = %crate::error_text::chain(&**e), "fetch failed");
                local.last_error = Some(Arc::clone(e));
                local.failed_fetches += 1;
            }
            self.note_present(&local);
        }
        drop(local);
        self.changed.notify_all();
        stored
    }

    /// Takes the blob another process (or an earlier run) published, if there is one.
    fn adopt_published(&self) -> Result<bool, CacheError> {
        let desc = Descriptor {
            media_type: String::new(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: BTreeMap::new(),
        };
        let Some(file) = open_complete(&self.complete_path, &desc)? else { return Ok(false) };
        self.become_complete(file);
        Ok(true)
    }

    /// Moves the verified partial file to its published name.
    /// Publishes the partial file whose bytes, as of `changes`, matched the digest; false if the
    /// chunk map changed since (the bytes must be hashed again). Under the lock with every chunk
    /// present no fetch is writing, so what is renamed is what was hashed.
    fn publish(&self, file: &Arc<File>, changes: u64) -> Result<bool, CacheError> {
        file.sync_all().map_err(io("syncing", &self.complete_path))?;
        // The verified bytes are durable under the partial name; nothing is published.
        failpoint::hit("cache::publish::synced");
        {
            let mut local = lock(&self.local);
            if local.complete {
                return Ok(true);
            }
            if local.changes != changes || local.chunks.present() != local.chunks.len() {
                return Ok(false);
            }
            std::fs::rename(&local.path, &self.complete_path).map_err(io("publishing", &self.complete_path))?;
            local.chunks = ChunkMap::new(0);
            local.complete = true;
            local.path = self.complete_path.clone();
            self.local_bytes.store(self.size, Ordering::Relaxed);
        }
        self.changed.notify_all();
        // The blob is published; the index does not say it is complete.
        failpoint::hit("cache::publish::renamed");
        let record = BlobRecord { size: self.size, last_use: now_secs(), complete: true };
        if let Err(e) = self.index.record_blob(&self.digest, &record) {
            // gc then goes by when the blob appeared.
            tracing::warn!(digest = %self.digest, error = %crate::error_text::chain(&e), "could not record a published blob in the cache index");
        }
        Ok(true)
    }

    /// Switches to a blob another process published.
    fn become_complete(&self, file: File) {
        let mut local = lock(&self.local);
        if !local.complete {
            let _ = std::fs::remove_file(&local.path);
            local.file = Arc::new(file);
            local.chunks = ChunkMap::new(0);
            local.complete = true;
            local.path = self.complete_path.clone();
            self.local_bytes.store(self.size, Ordering::Relaxed);
        }
        drop(local);
        self.changed.notify_all();
    }

    /// Forgets every fetched byte of a partial blob.
    fn forget_all(&self) {
        let mut local = lock(&self.local);
        if local.complete {
            return;
        }
        let all = 0..local.chunks.len();
        local.chunks.set(all, Chunk::Present, Chunk::Missing);
        local.changes += 1;
        self.local_bytes.store(0, Ordering::Relaxed);
    }

    /// Publishes how many bytes are local, from the chunk map (the last chunk may be short).
    fn note_present(&self, local: &Local) {
        let held = local.chunks.present() as u64 * CHUNK;
        self.local_bytes.store(held.min(self.size), Ordering::Relaxed);
    }

    /// Marks the missing chunks of `wanted` as being fetched and returns them as runs, at most
    /// `max` runs, for the caller to fetch. A complete blob (no chunk map) has nothing to fetch.
    fn start_fetches(&self, local: &mut Local, wanted: Range<usize>, max: usize) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let end = wanted.end.min(local.chunks.len());
        let mut i = wanted.start;
        while i < end && runs.len() < max {
            if local.chunks.get(i) != Some(Chunk::Missing) {
                i += 1;
                continue;
            }
            let start = i;
            while i < end && local.chunks.get(i) == Some(Chunk::Missing) {
                i += 1;
            }
            local.chunks.set(start..i, Chunk::Missing, Chunk::Fetching);
            runs.push(start..i);
        }
        runs
    }

    /// Fetches chunks `run` (marked `Fetching`) on a thread of its own, counted against
    /// [`MAX_FETCH_THREADS`].
    fn spawn_fetch(&self, local: &mut Local, run: Range<usize>) -> Result<(), CacheError> {
        let blob = self.me.upgrade();
        let thread_run = run.clone();
        let spawned = std::thread::Builder::new().name("blob-fetch".into()).spawn(move || {
            if let Some(blob) = blob {
                let _ = blob.fetch_run(thread_run);
                lock(&blob.local).fetchers -= 1;
                blob.changed.notify_all();
            }
        });
        match spawned {
            Ok(_) => {
                local.fetchers += 1;
                Ok(())
            }
            Err(e) => {
                local.chunks.set(run, Chunk::Fetching, Chunk::Missing);
                Err(CacheError::Io { what: "starting a fetch thread for", path: self.complete_path.clone(), source: e })
            }
        }
    }
}

/// Opens a published blob if it is there and has the right size (a wrong size means it is not
/// this blob: it is removed).
fn open_complete(path: &Path, desc: &Descriptor) -> Result<Option<File>, CacheError> {
    match File::open(path) {
        Ok(file) => {
            let len = file.metadata().map_err(io("reading", path))?.len();
            if len == desc.size {
                Ok(Some(file))
            } else {
                tracing::warn!(path = %path.display(), len, expected = desc.size, "cached blob has the wrong size; removing it");
                let _ = std::fs::remove_file(path);
                Ok(None)
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::Io { what: "opening", path: path.to_path_buf(), source: e }),
    }
}

fn hash_file(file: &File, size: u64) -> std::io::Result<Digest> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finish())
}

impl Drop for Blob {
    /// A partial blob's bytes go with it (fetching starts again from nothing next time).
    fn drop(&mut self) {
        let local = self.local.get_mut().unwrap_or_else(|e| e.into_inner());
        if !local.complete {
            let _ = std::fs::remove_file(&local.path);
        }
    }
}

impl Blob {
    /// Fills `buf` from `offset`, fetching missing chunks (see the module docs).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        let len = buf.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.size).ok_or_else(|| CacheError::OutOfRange {
            digest: self.digest.clone(),
            offset,
            len,
            size: self.size,
        })?;
        if len == 0 {
            return Ok(());
        }
        let wanted = (offset / CHUNK) as usize..end.div_ceil(CHUNK) as usize;
        let deadline = Instant::now() + self.fetch_timeout;
        let mut local = lock(&self.local);
        // Failed fetches of this blob when this reader last started its own.
        let mut failed_before = None;
        let file = loop {
            if local.complete || local.chunks.all(wanted.clone(), Chunk::Present) {
                break Arc::clone(&local.file);
            }
            // With every fetch thread busy, wait for one to end.
            if local.chunks.any(wanted.clone(), Chunk::Missing) && local.fetchers < MAX_FETCH_THREADS {
                // Missing chunks again after a fetch failed since ours started mean ours failed
                // (rather than its bytes being discarded): fail rather than spin, unless another
                // blob published.
                if failed_before.is_some_and(|n| local.failed_fetches > n) {
                    if let Some(e) = &local.last_error {
                        return Err(CacheError::Fetch {
                            digest: self.digest.clone(),
                            start: offset,
                            end,
                            source: Arc::clone(e),
                        });
                    }
                }
                drop(local);
                let adopted = self.adopt_published()?;
                local = lock(&self.local);
                // Another reader may have adopted the published blob while the lock was free
                // (then there is no chunk map left to fetch into).
                if adopted || local.complete {
                    continue;
                }
                failed_before = Some(local.failed_fetches);
                let free = MAX_FETCH_THREADS.saturating_sub(local.fetchers);
                for run in self.start_fetches(&mut local, wanted.clone(), free) {
                    self.spawn_fetch(&mut local, run)?;
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(digest = %self.digest, offset, end, "read timed out waiting for the registry");
                return Err(CacheError::Timeout {
                    digest: self.digest.clone(),
                    start: offset,
                    end,
                    secs: self.fetch_timeout.as_secs(),
                });
            }
            local = self.changed.wait_timeout(local, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(local);
        file.read_exact_at(buf, offset).map_err(io("reading", &self.complete_path))
    }
}

/// The layer code reads blobs through this; it needs to know only whether trying again helps.
impl crate::layer::BlobSource for Blob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        Blob::read_at(self, offset, buf).map_err(|e| match e {
            CacheError::Timeout { .. } | CacheError::Fetch { .. } => ReadError::Transient(Box::new(e)),
            e => ReadError::Failed(Box::new(e)),
        })
    }

    fn is_local(&self, range: Range<u64>) -> bool {
        let local = lock(&self.local);
        if local.complete || range.is_empty() {
            return true;
        }
        let chunks = (range.start / CHUNK) as usize..range.end.div_ceil(CHUNK) as usize;
        local.chunks.all(chunks, Chunk::Present)
    }

    fn discard(&self, offset: u64, len: u64) {
        let mut local = lock(&self.local);
        if local.complete || len == 0 {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let chunks = (offset / CHUNK) as usize..end.div_ceil(CHUNK) as usize;
        local.chunks.set(chunks, Chunk::Present, Chunk::Missing);
        self.note_present(&local);
        local.last_error = None;
        local.changes += 1;
    }
}
