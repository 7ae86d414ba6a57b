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
//! - `index.db`: the index every process shares, in SQLite (module `index`): per blob its size, last
//!   use and completeness; the images pinned in the cache; and what live processes hold.

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
//! written within the grace period (another daemon may be about to use a blob it just
//! published). [`BlobCache::gc`] removes the rest, least recently used first, until the cache is
//! within `size_limit`. It decides and moves what it removes aside inside one write transaction
//! of the index, so a hold another process writes meanwhile comes after the content is gone (and
//! is fetched again).
//!
//! # Modules
//! `layout`: the paths; `index`: the shared index; `blob`: fetch, verify, publish and adopt one
//! blob; `holds`: holds and whether their processes live; `gc`: the collection.

mod blob;
mod chunk_map;
mod error;
mod gc;
mod holds;
mod index;
mod layout;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use blob::RegistrySource;
use error::io;
use index::{now_secs, Index};
use layout::Layout;
use plumbing::lock;

pub use blob::{Blob, RangeSource, CHUNK};
pub use error::CacheError;
pub use gc::GcReport;
pub use holds::{Hold, Holder};
pub use index::{decode_blob_row, decode_hold_row, BlobRecord};

use crate::digest::Digest;
use crate::reference::ImageRef;
use crate::registry::{Descriptor, Image, Registry};

/// Derived data is read back only up to this size: a layer index of a million entries is about
/// 200 MB. Anything larger in the shared directory is not what we wrote, and is ignored (and
/// written again).
const MAX_DERIVED_BYTES: u64 = 512 << 20;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Unreferenced content is garbage-collected down to this many bytes.
    pub size_limit: u64,
    /// How long a read waits for missing bytes before it fails.
    pub fetch_timeout: Duration,
    /// Content used or written this recently is never garbage-collected.
    pub gc_grace: Duration,
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

/// What every `BlobCache` of one directory in this process shares: one `Blob` per digest, and
/// one connection to the index.
struct Shared {
    blobs: Mutex<HashMap<Digest, Weak<Blob>>>,
    index: Arc<Index>,
}

pub struct BlobCache {
    layout: Layout,
    config: CacheConfig,
    shared: Arc<Shared>,
}

impl BlobCache {
    pub fn open(dir: &Path, config: CacheConfig) -> Result<Arc<BlobCache>, CacheError> {
        let layout = Layout::create(dir)?;
        static SHARED: OnceLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> = OnceLock::new();
        let shared = {
            let mut all = lock(SHARED.get_or_init(Default::default));
            all.retain(|_, s| s.strong_count() > 0);
            match all.get(layout.dir()).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let index = Arc::new(Index::open(&layout)?);
                    let s = Arc::new(Shared { blobs: Mutex::default(), index });
                    all.insert(layout.dir().to_path_buf(), Arc::downgrade(&s));
                    s
                }
            }
        };
        layout.remove_leftovers();
        Ok(Arc::new(BlobCache { layout, config, shared }))
    }

    pub fn dir(&self) -> &Path {
        self.layout.dir()
    }

    pub fn size_limit(&self) -> u64 {
        self.config.size_limit
    }

    /// Bytes free for us on the cache's file system.
    pub fn available_bytes(&self) -> Result<u64, CacheError> {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = self.layout.dir();
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| CacheError::Io {
            what: "checking free space of",
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `st` is plain data that statvfs fills; `path` is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers are valid for the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(CacheError::Io {
                what: "checking free space of",
                path: dir.to_path_buf(),
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
                    blob.add_source(desc, source)?;
                    blob
                }
                None => {
                    let blob = Blob::new(&self.layout, &self.shared.index, self.config.fetch_timeout, desc, source)?;
                    blobs.insert(desc.digest.clone(), Arc::downgrade(&blob));
                    blob
                }
            }
        };
        let record = BlobRecord { size: desc.size, last_use: now_secs(), complete: blob.is_complete() };
        if let Err(e) = self.shared.index.record_blob(&desc.digest, &record) {
            // gc then goes by when the blob appeared.
            tracing::warn!(digest = %desc.digest, error = %crate::error_text::chain(&e), "could not record the use of a blob in the cache index");
        }
        Ok(blob)
    }

    /// Pins `image`'s content (`keys`: its config and layer digests) until
    /// [`BlobCache::remove_image`]. Written (and synced) at once, before the content is fetched.
    pub fn pin(&self, image: &ImageRef, keys: &[Digest]) -> Result<(), CacheError> {
        self.shared.index.pin(&image_key(image), keys)
    }

    /// Keeps `keys` (blob digests, or keys of unpacked layers) from gc while the returned
    /// [`Hold`] lives, or as long as this process does. `what` says who holds them, for people
    /// reading the index. Written at once, so another daemon's gc sees it before the content is
    /// used.
    pub fn hold(&self, what: &str, keys: &[Digest]) -> Result<Hold, CacheError> {
        Hold::new(&self.shared.index, what, keys)
    }

    /// Drops `image`'s references; its blobs become collectable unless another image holds them.
    pub fn remove_image(&self, image: &ImageRef) -> Result<(), CacheError> {
        self.shared.index.unpin(&image_key(image))
    }

    /// The images the index knows, as `registry/repository:tag@digest` strings.
    pub fn images(&self) -> Result<Vec<String>, CacheError> {
        self.shared.index.images()
    }

    /// Derived data kept beside a blob, e.g. a layer's index (`kind` = "layer-index"); none if
    /// it is larger than [`MAX_DERIVED_BYTES`].
    pub fn get_derived(&self, digest: &Digest, kind: &str) -> Result<Option<Vec<u8>>, CacheError> {
        use std::io::Read as _;
        let path = self.layout.derived(digest, kind)?;
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
        let path = self.layout.derived(digest, kind)?;
        let parent = self.layout.derived_dir(digest);
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
        self.layout.unpacked(digest)
    }

    /// A fresh path under the cache's `tmp/` (same file system as the blobs, for renames).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.layout.temp(name)
    }

    /// Bytes on disk for every blob the cache holds (blob, derived data, unpacked directory).
    pub fn usage(&self) -> Result<BTreeMap<Digest, u64>, CacheError> {
        Ok(gc::usage(&self.layout)?.into_iter().map(|(d, u)| (d, u.bytes)).collect())
    }

    /// Removes what nothing needs (see the module docs), least recently used first, until the
    /// cache holds at most `size_limit` bytes; and what processes that are gone left behind.
    pub fn gc(&self) -> Result<GcReport, CacheError> {
        let live: HashSet<Digest> = {
            let blobs = lock(&self.shared.blobs);
            blobs.iter().filter(|(_, b)| b.strong_count() > 0).map(|(d, _)| d.clone()).collect()
        };
        gc::collect(&self.layout, &self.shared.index, &live, self.config.size_limit, self.config.gc_grace)
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
