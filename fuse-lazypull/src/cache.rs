//! The content-addressed blob cache, shared by every mount and by several daemons pointed at one
//! directory.
//!
//! # Layout of the cache directory
//! - `blobs/sha256/HEX`: complete blobs. A file appears here only by a rename after its bytes
//!   matched the digest, so whatever is here is verified and shared by every process.
//! - `partial/HEX.PID.N`: a blob being fetched by process PID: a sparse file whose present chunks
//!   are kept in memory (a [`Blob`]'s chunk map). Partial blobs are per process: two daemons
//!   fetching the same blob at once each fetch what they read, and whichever completes first
//!   publishes the blob, which the other then adopts at its next miss or background step. A
//!   partial file outlives its process only until the next [`BlobCache::open`] or
//!   [`BlobCache::gc`], which remove partial files of processes that are gone (fetching restarts
//!   from nothing after a restart).
//! - `derived/HEX/KIND`: data derived from a blob (a layer's index), [`BlobCache::put_derived`].
//! - `unpacked/HEX/`: a layer unpacked for overlayfs ([`BlobCache::unpacked_dir`]), under the
//!   layer's digest, or under its chain ID when it depends on the layers below it
//!   ([`crate::mount::chain_ids`]).
//! - `tmp/`: files and directories being written (named `NAME.PID.N`), removed once their
//!   process is gone.
//! - `index/`: the index in `state-store`, namespace [`INDEX_NAMESPACE`]: per blob its size, last
//!   use and completeness (`blob/DIGEST`); the images pinned in the cache (`ref/DIGEST/IMAGE` and
//!   `image/IMAGE/DIGEST`); and what live processes hold (`held/DIGEST/HOLDER`,
//!   `hold/HOLDER/DIGEST`). RocksDB lets one process open a database at a time, so the index is
//!   opened briefly for each index operation, retrying while another process holds it. Records
//!   of blobs opened and completed are written behind by a thread, so no read waits on the
//!   index; pins and holds are written at once, and gc and listings write what is pending first.

//! # Fetching
//! A blob is cut into [`CHUNK`]-sized chunks, each missing, being fetched, or present. A read of
//! missing chunks starts their fetch at once on a thread of its own (one ranged GET per run of
//! missing chunks, at most [`MAX_FETCH_THREADS`] per blob at once: a reader finding them all busy
//! waits for one), so it never queues behind the background [`Blob::fetch_all`]; readers of
//! chunks already being fetched wait for that fetch. A read waits at most the configured
//! `fetch_timeout` and then fails with [`CacheError::Timeout`]; the fetch goes on and its bytes
//! serve later reads. Bytes of a partial blob are served unverified: the layer code checks them
//! against chunk digests and calls [`BlobSource::discard`] on a mismatch. `fetch_all` hashes the
//! whole blob before publishing it; a blob that does not match is thrown away and fetched again.
//!
//! # Garbage collection
//! Content is kept while something needs it: an image pinned with [`BlobCache::pin`] (by
//! `vstor image prefetch`, until [`BlobCache::remove_image`]), a [`Hold`] of a live process (a
//! mount holds its layers until it ends; a process that died holds nothing), a [`Blob`] open in
//! this process, an unpacked layer a mounted overlay uses as a lower directory (from
//! `/proc/self/mountinfo`, since an overlay outlives the mount that made it), and anything used or
//! written within the grace period (another daemon's records are written behind, and it may be
//! about to use a blob it just published). [`BlobCache::gc`] removes the rest, least recently
//! used first, until the cache is within `size_limit`. It decides and moves what it removes aside
//! while it has the index open, so a hold another process writes meanwhile is seen, or comes
//! after the content is gone (and is fetched again).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use state_store::{Batch, Store, StoreError};

mod chunk_map;

use chunk_map::{Chunk, ChunkMap};

use crate::digest::{Digest, Hasher};
use crate::layer::ReadError;
use crate::reference::ImageRef;
use crate::registry::{Descriptor, Image, Registry, RegistryError};

/// The unit of fetching and of the present-chunk map.
pub const CHUNK: u64 = 64 << 10;
/// The background fetch asks for this much per ranged GET.
const BACKGROUND_RUN: u64 = 4 << 20;
/// How many times `fetch_all` fetches a blob whose digest does not match before giving up.
const FETCH_ATTEMPTS: u32 = 3;
/// How long an index operation waits for another process to release the index.
const INDEX_WAIT: Duration = Duration::from_secs(30);
/// Blobs larger than this are refused (a manifest must not make us map petabytes).
const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Derived data is read back only up to this size: a layer index of a million entries is about
/// 200 MB. Anything larger in the shared directory is not what we wrote, and is ignored (and
/// written again).
const MAX_DERIVED_BYTES: u64 = 512 << 20;
/// Threads fetching for the readers of one blob at most; a reader that finds them all busy waits
/// for one to end. Each holds a connection and reserves 8 MiB of stack, and a reader gives up
/// after `fetch_timeout` while its fetch goes on: a registry that stalls would otherwise collect
/// one thread for every missing range the container reads.
const MAX_FETCH_THREADS: usize = 16;
/// The state-store namespace of the cache's index.
pub const INDEX_NAMESPACE: &str = "blob-cache";

/// Large causes are boxed to keep the error small: it is returned on every read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The registry did not deliver a range in time (a read of missing data gets EIO).
    #[error("timed out after {secs} s waiting for bytes {start}..{end} of {digest}")]
    Timeout { digest: Digest, start: u64, end: u64, secs: u64 },
    #[error("fetching bytes {start}..{end} of {digest} failed")]
    Fetch {
        digest: Digest,
        start: u64,
        end: u64,
        #[source]
        source: Arc<RegistryError>,
    },
    /// The whole blob did not match its digest, every time it was fetched.
    #[error("blob {digest} is corrupt: fetched {attempts} times, its bytes hash to {actual}")]
    Corrupt { digest: Digest, actual: Digest, attempts: u32 },
    /// [`Blob::fetch_all_paced`] was told to stop.
    #[error("the fetch was stopped")]
    Stopped,
    #[error("read of {len} bytes at {offset} is past the end of {digest} ({size} bytes)")]
    OutOfRange { digest: Digest, offset: u64, len: u64, size: u64 },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache index at {}", path.display())]
    Index {
        path: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("bad derived-data kind {0:?} (lowercase letters, digits and '-')")]
    BadKind(String),
    #[error("blob {digest}: {detail}")]
    BadBlob { digest: Digest, detail: String },
    #[error("resolving {reference}")]
    Resolve {
        reference: String,
        #[source]
        source: Box<RegistryError>,
    },
}

impl CacheError {
    /// Whether a fetch failed because the registry ignores `Range` for a range it cannot skip
    /// to ([`RegistryError::IgnoresRange`]): trying again cannot help.
    pub fn is_ignored_range(&self) -> bool {
        matches!(self, CacheError::Fetch { source, .. } if matches!(**source, RegistryError::IgnoresRange { .. }))
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Unreferenced content is garbage-collected down to this many bytes.
    pub size_limit: u64,
    /// How long a read waits for missing bytes before it fails.
    pub fetch_timeout: std::time::Duration,
    /// Content used or written this recently is never garbage-collected.
    pub gc_grace: std::time::Duration,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            size_limit: 20 << 30,
            fetch_timeout: Duration::from_secs(30),
            gc_grace: Duration::from_secs(10 * 60),
        }
    }
}

/// Where a blob's missing bytes come from. The registry is the real one; tests use others.
pub trait RangeSource: Send + Sync {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError>;
}

/// A blob in one repository of a registry.
struct RegistrySource {
    registry: Arc<Registry>,
    image: ImageRef,
    digest: Digest,
}

impl RangeSource for RegistrySource {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        self.registry.fetch_range(&self.image, &self.digest, range)
    }
}

/// What [`BlobCache::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed (with their derived data and unpacked directories), oldest use first.
    pub removed: Vec<Digest>,
    pub freed_bytes: u64,
    /// Bytes the cache holds after the collection.
    pub total_bytes: u64,
}

/// The index entry of a blob.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct BlobRecord {
    size: u64,
    /// Seconds since the epoch.
    last_use: u64,
    complete: bool,
}

/// What every `BlobCache` of one directory in this process shares: one `Blob` per digest.
struct Shared {
    blobs: Mutex<HashMap<Digest, Weak<Blob>>>,
    index: Index,
}

pub struct BlobCache {
    dir: PathBuf,
    config: CacheConfig,
    shared: Arc<Shared>,
}

impl BlobCache {
    pub fn open(dir: &Path, config: CacheConfig) -> Result<Arc<BlobCache>, CacheError> {
        for sub in ["blobs/sha256", "partial", "derived", "unpacked", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io("creating", &path))?;
        }
        let dir = dir.canonicalize().map_err(io("resolving", dir))?;
        static SHARED: OnceLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> = OnceLock::new();
        let shared = {
            let mut all = lock(SHARED.get_or_init(Default::default));
            all.retain(|_, s| s.strong_count() > 0);
            match all.get(&dir).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let s = Arc::new(Shared { blobs: Mutex::default(), index: Index::new(dir.join("index")) });
                    all.insert(dir.clone(), Arc::downgrade(&s));
                    s
                }
            }
        };
        let cache = Arc::new(BlobCache { dir, config, shared });
        cache.remove_leftovers();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size_limit(&self) -> u64 {
        self.config.size_limit
    }

    /// Bytes free for us on the cache's file system.
    pub fn available_bytes(&self) -> Result<u64, CacheError> {
        use std::os::unix::ffi::OsStrExt as _;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).map_err(|_| CacheError::Io {
            what: "checking free space of",
            path: self.dir.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `st` is plain data that statvfs fills; `path` is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers are valid for the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(CacheError::Io {
                what: "checking free space of",
                path: self.dir.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// The blob `desc` of `image`'s repository, shared by every caller in this process (and its
    /// bytes by every process using this directory). Nothing is fetched yet, and nothing keeps
    /// the blob from gc beyond this process's use: see [`BlobCache::pin`] and [`BlobCache::hold`].
    pub fn blob(&self, registry: &Arc<Registry>, image: &ImageRef, desc: &Descriptor) -> Result<Arc<Blob>, CacheError> {
        let source = Arc::new(RegistrySource {
            registry: Arc::clone(registry),
            image: image.clone(),
            digest: desc.digest.clone(),
        });
        self.blob_from(desc, source)
    }

    /// [`BlobCache::blob`] with any source of bytes. A second source for a blob already open is
    /// kept as a fallback.
    pub fn blob_from(&self, desc: &Descriptor, source: Arc<dyn RangeSource>) -> Result<Arc<Blob>, CacheError> {
        let blob = {
            let mut blobs = lock(&self.shared.blobs);
            blobs.retain(|_, b| b.strong_count() > 0);
            match blobs.get(&desc.digest).and_then(Weak::upgrade) {
                Some(blob) => {
                    if blob.size != desc.size {
                        return Err(CacheError::BadBlob {
                            digest: desc.digest.clone(),
                            detail: format!("size {} given, {} known", desc.size, blob.size),
                        });
                    }
                    lock(&blob.sources).push(source);
                    blob
                }
                None => {
                    let blob = Blob::new(self, desc, source)?;
                    blobs.insert(desc.digest.clone(), Arc::downgrade(&blob));
                    blob
                }
            }
        };
        let record = BlobRecord { size: desc.size, last_use: now_secs(), complete: blob.is_complete() };
        Index::record(&self.shared, vec![(blob_key(&desc.digest), json(&record))]);
        Ok(blob)
    }

    /// Pins `image`'s content (`keys`: its config and layer digests) until
    /// [`BlobCache::remove_image`]. Written at once, before the content is fetched.
    pub fn pin(&self, image: &ImageRef, keys: &[Digest]) -> Result<(), CacheError> {
        let image = image_key(image);
        self.shared.index.with(|store| {
            let mut batch = Batch::new();
            for key in keys {
                batch.put(INDEX_NAMESPACE, format!("ref/{key}/{image}"), b"");
                batch.put(INDEX_NAMESPACE, format!("image/{image}/{key}"), b"");
            }
            store.commit(batch)
        })
    }

    /// Keeps `keys` (blob digests, or keys of unpacked layers) from gc while the returned
    /// [`Hold`] lives, or as long as this process does. `what` says who holds them, for people
    /// reading the index. Written at once, so another daemon's gc sees it before the content is
    /// used.
    pub fn hold(&self, what: &str, keys: &[Digest]) -> Result<Hold, CacheError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let holder = format!(
            "{}.{}.{}",
            std::process::id(),
            process_start(std::process::id()).unwrap_or(0),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.shared.index.with(|store| {
            let mut batch = Batch::new();
            for key in keys {
                batch.put(INDEX_NAMESPACE, format!("held/{key}/{holder}"), what.as_bytes());
                batch.put(INDEX_NAMESPACE, format!("hold/{holder}/{key}"), b"");
            }
            store.commit(batch)
        })?;
        Ok(Hold { shared: Arc::clone(&self.shared), holder, keys: keys.to_vec() })
    }

    /// Drops `image`'s references; its blobs become collectable unless another image holds them.
    pub fn remove_image(&self, image: &ImageRef) -> Result<(), CacheError> {
        let key = image_key(image);
        self.shared.index.with(|store| {
            let mut batch = Batch::new();
            for (k, _) in store.scan_prefix(INDEX_NAMESPACE, format!("image/{key}/"))? {
                let digest = String::from_utf8_lossy(&k[format!("image/{key}/").len()..]).into_owned();
                batch.delete(INDEX_NAMESPACE, format!("ref/{digest}/{key}"));
                batch.delete(INDEX_NAMESPACE, k);
            }
            store.commit(batch)
        })
    }

    /// The images the index knows, as `registry/repository:tag@digest` strings.
    pub fn images(&self) -> Result<Vec<String>, CacheError> {
        self.shared.index.with(|store| {
            let mut out: Vec<String> = Vec::new();
            for (k, _) in store.scan_prefix(INDEX_NAMESPACE, "image/")? {
                let k = String::from_utf8_lossy(&k["image/".len()..]).into_owned();
                if let Some((image, _)) = k.rsplit_once('/') {
                    if out.last().map(String::as_str) != Some(image) {
                        out.push(image.to_owned());
                    }
                }
            }
            Ok(out)
        })
    }

    /// Derived data kept beside a blob, e.g. a layer's index (`kind` = "layer-index"); none if
    /// it is larger than [`MAX_DERIVED_BYTES`].
    pub fn get_derived(&self, digest: &Digest, kind: &str) -> Result<Option<Vec<u8>>, CacheError> {
        use std::io::Read as _;
        let path = self.derived_path(digest, kind)?;
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { what: "reading", path, source: e }),
        };
        let len = file.metadata().map_err(io("reading", &path))?.len();
        let mut bytes = Vec::new();
        if len <= MAX_DERIVED_BYTES {
            bytes.reserve(len as usize);
            // At most one byte more than allowed, in case the file grew since.
            file.take(MAX_DERIVED_BYTES + 1).read_to_end(&mut bytes).map_err(io("reading", &path))?;
        }
        if len > MAX_DERIVED_BYTES || bytes.len() as u64 > MAX_DERIVED_BYTES {
            tracing::warn!(path = %path.display(), len, "derived data larger than {MAX_DERIVED_BYTES} bytes; ignoring it");
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    pub fn put_derived(&self, digest: &Digest, kind: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.derived_path(digest, kind)?;
        let parent = self.dir.join("derived").join(digest.hex());
        std::fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
        let tmp = self.temp_path(&format!("derived-{}-{kind}", digest.hex()));
        std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
        // Written under tmp/, not under its name.
        failpoint::hit("cache::derived::written");
        std::fs::rename(&tmp, &path).map_err(io("renaming to", &path))
    }

    /// Where the layer of key `digest` (its digest or chain ID) is (or will be) unpacked for
    /// overlayfs.
    pub fn unpacked_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join("unpacked").join(digest.hex())
    }

    /// A fresh path under the cache's `tmp/` (same file system as the blobs, for renames).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{name}.{}.{n}", std::process::id()))
    }

    /// Bytes on disk for every blob the cache holds (blob, derived data, unpacked directory).
    pub fn usage(&self) -> Result<BTreeMap<Digest, u64>, CacheError> {
        Ok(self.usage_detail()?.into_iter().map(|(d, u)| (d, u.bytes)).collect())
    }

    /// Bytes on disk, and when its newest part appeared, for everything the cache holds.
    fn usage_detail(&self) -> Result<BTreeMap<Digest, Usage>, CacheError> {
        use std::os::unix::fs::MetadataExt as _;
        let mut out: BTreeMap<Digest, Usage> = BTreeMap::new();
        for sub in ["blobs/sha256", "derived", "unpacked"] {
            let dir = self.dir.join(sub);
            for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
                let entry = entry.map_err(io("listing", &dir))?;
                let Ok(digest) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() else {
                    continue;
                };
                // A rename into place sets the ctime, which nothing in an image can.
                let appeared = entry.metadata().map_or(0, |m| u64::try_from(m.ctime()).unwrap_or(0));
                let usage = out.entry(digest).or_default();
                usage.bytes += disk_usage(&entry.path());
                usage.appeared = usage.appeared.max(appeared);
            }
        }
        Ok(out)
    }

    /// Removes what nothing needs (see the module docs), least recently used first, until the
    /// cache holds at most `size_limit` bytes; and what processes that are gone left behind.
    pub fn gc(&self) -> Result<GcReport, CacheError> {
        self.remove_leftovers();
        let usage = self.usage_detail()?;
        let in_overlays = unpacked_in_overlays();
        if let Err(e) = &in_overlays {
            tracing::warn!(error = %e, "cannot read the mount table; gc keeps every unpacked layer");
        }
        let in_overlay = |d: &Digest| match &in_overlays {
            Ok(used) => used.contains(d.hex()),
            Err(_) => self.unpacked_dir(d).exists(),
        };
        let live: HashSet<Digest> = {
            let blobs = lock(&self.shared.blobs);
            blobs.iter().filter(|(_, b)| b.strong_count() > 0).map(|(d, _)| d.clone()).collect()
        };
        let now = now_secs();
        let (report, trash) = self.shared.index.with(|store| {
            let mut records = HashMap::new();
            for (k, v) in store.scan_prefix(INDEX_NAMESPACE, "blob/")? {
                let digest = String::from_utf8_lossy(&k["blob/".len()..]).parse::<Digest>();
                if let (Ok(d), Ok(r)) = (digest, serde_json::from_slice::<BlobRecord>(&v)) {
                    records.insert(d, r);
                }
            }
            let mut needed = HashSet::new();
            for (k, _) in store.scan_prefix(INDEX_NAMESPACE, "ref/")? {
                let rest = String::from_utf8_lossy(&k["ref/".len()..]).into_owned();
                if let Some(d) = rest.split('/').next().and_then(|d| d.parse::<Digest>().ok()) {
                    needed.insert(d);
                }
            }
            let mut batch = Batch::new();
            for (k, _) in store.scan_prefix(INDEX_NAMESPACE, "held/")? {
                let rest = String::from_utf8_lossy(&k["held/".len()..]).into_owned();
                let Some((digest, holder)) = rest.rsplit_once('/') else { continue };
                if holder_alive(holder) {
                    if let Ok(d) = digest.parse::<Digest>() {
                        needed.insert(d);
                    }
                } else {
                    batch.delete(INDEX_NAMESPACE, k.clone());
                    batch.delete(INDEX_NAMESPACE, format!("hold/{holder}/{digest}"));
                }
            }
            // Least recently used (or written) first; content the index does not know (left by
            // a crash, or recorded behind by another process) goes by when it appeared.
            let touched = |d: &Digest, u: &Usage| records.get(d).map_or(0, |r| r.last_use).max(u.appeared);
            let mut candidates: Vec<(u64, Digest, u64)> = usage
                .iter()
                .filter(|(d, _)| !needed.contains(*d) && !live.contains(*d) && !in_overlay(d))
                .map(|(d, u)| (touched(d, u), d.clone(), u.bytes))
                .filter(|(t, _, _)| now.saturating_sub(*t) >= self.config.gc_grace.as_secs())
                .collect();
            candidates.sort();
            let mut report = GcReport::default();
            let mut total: u64 = usage.values().map(|u| u.bytes).sum();
            let mut trash = Vec::new();
            for (_, digest, bytes) in candidates {
                if total <= self.config.size_limit {
                    break;
                }
                match self.move_aside(&digest) {
                    Ok(dir) => trash.push(dir),
                    Err(e) => {
                        tracing::warn!(%digest, error = %crate::error_text::chain(&e), "gc could not remove content");
                        continue;
                    }
                }
                batch.delete(INDEX_NAMESPACE, blob_key(&digest));
                total = total.saturating_sub(bytes);
                report.freed_bytes += bytes;
                report.removed.push(digest);
            }
            // Index entries of blobs with nothing on disk and nothing needing them go too.
            for digest in records.keys() {
                if !usage.contains_key(digest) && !needed.contains(digest) && !live.contains(digest) {
                    batch.delete(INDEX_NAMESPACE, blob_key(digest));
                }
            }
            // What gc removes is moved aside; the index still lists it.
            failpoint::hit("cache::gc::moved-aside");
            store.commit(batch)?;
            // The index no longer lists it; it is still on disk, under tmp/.
            failpoint::hit("cache::gc::committed");
            report.total_bytes = total;
            Ok((report, trash))
        })?;
        for dir in trash {
            make_removable(&dir);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "gc could not delete what it moved aside");
            }
        }
        if !report.removed.is_empty() {
            tracing::info!(
                removed = report.removed.len(),
                freed = report.freed_bytes,
                total = report.total_bytes,
                "cache gc"
            );
        }
        Ok(report)
    }

    /// Moves the blob, derived data and unpacked directory of `digest` into a new directory
    /// under `tmp/`, to be deleted at leisure; returns that directory.
    fn move_aside(&self, digest: &Digest) -> Result<PathBuf, CacheError> {
        let trash = self.temp_path("gc");
        std::fs::create_dir(&trash).map_err(io("creating", &trash))?;
        let parts =
            [self.complete_path(digest), self.dir.join("derived").join(digest.hex()), self.unpacked_dir(digest)];
        for (i, part) in parts.iter().enumerate() {
            match std::fs::rename(part, trash.join(i.to_string())) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::Io { what: "removing", path: part.clone(), source: e }),
            }
        }
        Ok(trash)
    }

    /// Removes partial blobs and temporary files (`NAME.PID.N`) of processes that are gone.
    fn remove_leftovers(&self) {
        for sub in ["partial", "tmp"] {
            let dir = self.dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                    continue;
                }
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    make_removable(&path);
                    let _ = std::fs::remove_dir_all(&path);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    fn complete_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn derived_path(&self, digest: &Digest, kind: &str) -> Result<PathBuf, CacheError> {
        let ok = !kind.is_empty()
            && kind.len() <= 64
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(CacheError::BadKind(kind.to_owned()));
        }
        Ok(self.dir.join("derived").join(digest.hex()).join(kind))
    }
}

/// Fills the cache with a whole image ahead of time: its config and every layer, pinned (until
/// [`BlobCache::remove_image`]), fetched and verified. Returns the resolved image.
pub fn prefetch(cache: &BlobCache, registry: &Arc<Registry>, image: &ImageRef) -> Result<Image, CacheError> {
    let resolved = registry
        .resolve(image)
        .map_err(|source| CacheError::Resolve { reference: image.to_string(), source: Box::new(source) })?;
    let keys: Vec<Digest> =
        std::iter::once(&resolved.config).chain(&resolved.layers).map(|d| d.digest.clone()).collect();
    cache.pin(image, &keys)?;
    let mut blobs = vec![cache.blob(registry, image, &resolved.config)?];
    for layer in &resolved.layers {
        blobs.push(cache.blob(registry, image, layer)?);
    }
    // A few layers at a time: enough to fill a fast link, few enough connections.
    for group in blobs.chunks(3) {
        std::thread::scope(|s| {
            let handles: Vec<_> = group.iter().map(|b| s.spawn(|| b.fetch_all())).collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
    }
    Ok(resolved)
}

/// How an image is named in the index: by the reference as given.
fn image_key(image: &ImageRef) -> String {
    image.to_string()
}

/// What [`BlobCache::gc`] knows of one key's content on disk.
#[derive(Default)]
struct Usage {
    bytes: u64,
    /// Seconds since the epoch when its newest part appeared.
    appeared: u64,
}

/// Content a live process needs: see [`BlobCache::hold`]. Dropping it lets gc have the content.
pub struct Hold {
    shared: Arc<Shared>,
    holder: String,
    keys: Vec<Digest>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let dropped = self.shared.index.with(|store| {
            let mut batch = Batch::new();
            for key in &self.keys {
                batch.delete(INDEX_NAMESPACE, format!("held/{key}/{}", self.holder));
                batch.delete(INDEX_NAMESPACE, format!("hold/{}/{key}", self.holder));
            }
            store.commit(batch)
        });
        if let Err(e) = dropped {
            tracing::warn!(error = %crate::error_text::chain(&e), "could not drop a cache hold; gc drops it when this process is gone");
        }
    }
}

/// When process `pid` started (in clock ticks since boot, from `/proc/PID/stat`), so a holder
/// is not taken for alive because a new process got its pid.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces; field 22 is the 20th after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process of holder `PID.START.N` still runs.
fn holder_alive(holder: &str) -> bool {
    let mut parts = holder.split('.');
    let (Some(pid), Some(start)) = (parts.next().and_then(|p| p.parse().ok()), parts.next()) else { return false };
    match (process_start(pid), start.parse::<u64>()) {
        (Some(now), Ok(then)) => then == 0 || now == then,
        _ => false,
    }
}

/// The keys (hex) of unpacked layers that mounted overlays use as lower directories: they stay,
/// whatever the index says, until the overlay is unmounted.
fn unpacked_in_overlays() -> std::io::Result<HashSet<String>> {
    let mut out = HashSet::new();
    for (_, info) in crate::handoff::mounts()?.iter().filter(|(_, m)| m.fs_type == "overlay") {
        let opts = info.super_options.as_str();
        for (at, _) in opts.match_indices("/unpacked/") {
            let rest = &opts[at + "/unpacked/".len()..];
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            let after = rest[hex.len()..].chars().next();
            if hex.len() == 64 && matches!(after, None | Some(',' | ':')) {
                out.insert(hex);
            }
        }
    }
    Ok(out)
}

fn blob_key(digest: &Digest) -> String {
    format!("blob/{digest}")
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}

/// Bytes of a file or of everything under a directory (symlinks not followed).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries.flatten().map(|e| disk_usage(&e.path())).sum()
}

/// Unpacked layers may hold read-only directories; give the owner write access so they can be
/// removed.
fn make_removable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return };
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                make_removable(&e.path());
            }
        }
    }
}

/// The index in `state-store`, opened for each operation (RocksDB admits one process at a time).
///
/// Opening it takes tens of milliseconds (more under load), so what opening a blob or completing
/// one records is written behind, by a thread of its own: [`Index::record`] returns at once. Every
/// operation that reads the index ([`Index::with`]) first writes what is pending, so gc and
/// listings see it. What is pending when the process dies is lost: at worst a blob looks older or
/// unreferenced, and gc may remove it (it is fetched again when needed).
struct Index {
    path: PathBuf,
    /// One opener at a time in this process.
    busy: Mutex<()>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    puts: Vec<(String, Vec<u8>)>,
    writer_running: bool,
    /// The last writer thread started, for [`Index::flush`].
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Index {
    fn new(path: PathBuf) -> Index {
        Index { path, busy: Mutex::new(()), pending: Mutex::default() }
    }

    /// Queues index writes; a writer thread makes them soon.
    fn record(shared: &Arc<Shared>, puts: Vec<(String, Vec<u8>)>) {
        let mut pending = lock(&shared.index.pending);
        pending.puts.extend(puts);
        if pending.writer_running {
            return;
        }
        pending.writer_running = true;
        let writer = Arc::clone(shared);
        let spawned =
            std::thread::Builder::new().name("cache-index".into()).spawn(move || writer.index.write_pending());
        match spawned {
            Ok(handle) => pending.writer = Some(handle),
            Err(e) => {
                // The next index operation writes them instead.
                tracing::warn!(error = %e, "cannot start the cache index writer");
                pending.writer_running = false;
            }
        }
    }

    /// Waits for the writer thread to write what is pending. A process must not exit while it
    /// runs: RocksDB's static state is torn down at exit under a thread still using it.
    fn flush(&self) {
        let writer = lock(&self.pending).writer.take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }

    fn write_pending(&self) {
        let mut failures = 0;
        loop {
            match self.with(|_| Ok(())) {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %crate::error_text::chain(&e), failures, "cache index write failed");
                    if failures >= 5 {
                        let mut pending = lock(&self.pending);
                        tracing::warn!(dropped = pending.puts.len(), "giving up on cache index writes");
                        pending.puts.clear();
                        pending.writer_running = false;
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            let mut pending = lock(&self.pending);
            if pending.puts.is_empty() {
                pending.writer_running = false;
                return;
            }
        }
    }

    /// Runs `op` on the opened index, after writing what is pending.
    fn with<T>(&self, op: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, CacheError> {
        let _busy = lock(&self.busy);
        let err = |source| CacheError::Index { path: self.path.clone(), source: Box::new(source) };
        let deadline = Instant::now() + INDEX_WAIT;
        let mut wait = Duration::from_millis(5);
        let store = loop {
            match Store::open(&self.path) {
                Ok(store) => break store,
                // Another process has it open: wait for it to finish its operation.
                Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(err(e)),
            }
        };
        if !store.has_namespace(INDEX_NAMESPACE) {
            store.create_namespace(INDEX_NAMESPACE).map_err(err)?;
        }
        let puts = std::mem::take(&mut lock(&self.pending).puts);
        if !puts.is_empty() {
            let mut batch = Batch::new();
            for (k, v) in &puts {
                batch.put(INDEX_NAMESPACE, k, v);
            }
            if let Err(e) = store.commit(batch) {
                // Keep them for the next try, before anything queued since.
                let mut pending = lock(&self.pending);
                let newer = std::mem::replace(&mut pending.puts, puts);
                pending.puts.extend(newer);
                return Err(err(e));
            }
        }
        op(&store).map_err(err)
    }
}

fn is_lock_error(e: &StoreError) -> bool {
    let text = crate::error_text::chain(e).to_ascii_lowercase();
    text.contains("lock")
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
    shared: Weak<Shared>,
    /// This blob, for the threads that fetch for readers.
    me: Weak<Blob>,
}

impl Blob {
    fn new(cache: &BlobCache, desc: &Descriptor, source: Arc<dyn RangeSource>) -> Result<Arc<Blob>, CacheError> {
        if desc.size > MAX_BLOB_SIZE {
            return Err(CacheError::BadBlob {
                digest: desc.digest.clone(),
                detail: format!("size {} is over the limit of {MAX_BLOB_SIZE}", desc.size),
            });
        }
        let complete_path = cache.complete_path(&desc.digest);
        // Unique per Blob: a Blob being dropped removes its file while a new one may start.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let partial_path = cache.dir.join("partial").join(format!("{}.{}.{n}", desc.digest.hex(), std::process::id()));
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
            fetch_timeout: cache.config.fetch_timeout,
            complete_path,
            sources: Mutex::new(vec![source]),
            local: Mutex::new(local),
            changed: Condvar::new(),
            local_bytes: AtomicU64::new(local_bytes),
            filling: Mutex::new(()),
            shared: Arc::downgrade(&cache.shared),
            me: me.clone(),
        }))
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
        if let Some(shared) = self.shared.upgrade() {
            let record = BlobRecord { size: self.size, last_use: now_secs(), complete: true };
            Index::record(&shared, vec![(blob_key(&self.digest), json(&record))]);
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

impl Drop for BlobCache {
    /// What this cache recorded is written before it goes (and before the process can exit).
    fn drop(&mut self) {
        self.shared.index.flush();
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
