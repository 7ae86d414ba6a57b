//! One image mount, from resolving the reference to the handoff.
//!
//! [`ImageMount::start`] resolves the reference, opens every layer blob through the shared
//! cache, indexes the layers side by side (the index is kept in the cache as derived data, so a
//! second mount of the same layer does not index it again; a gzip layer, read whole to be
//! indexed, is fetched whole beside its indexer), merges them into a tree and mounts the FUSE
//! file system at the target. A background thread then fetches the layers (eStargz prefetch
//! ranges first, then every missing byte while the file system is not being read, retrying
//! while the registry fails), unpacks each layer into the cache (once per layer, atomically
//! through a temporary directory), hands the target to overlayfs, and collects the cache's
//! garbage. The FUSE session keeps serving files opened before the handoff until the kernel
//! drops the connection. The mount holds its layers in the cache ([`crate::cache::Hold`]) until
//! it ends; an overlay left behind keeps its unpacked layers by being mounted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cache::{Blob, BlobCache, CacheError, Hold};
use crate::digest::Digest;
use crate::error::chain;
use crate::fs::{FsStats, FuseMount, ImageFs, LayerData};
use crate::handoff::{self, HandoffError};
use crate::layer::{self, BlobSource, LayerError, LayerIndex, Limits};
use crate::reference::ImageRef;
use crate::registry::{Descriptor, Image, Registry, RegistryError};
use crate::tree::Tree;

/// Kind of the derived data under which a layer's index is cached.
/// Its number changes when what an index holds or refuses changes, so indexes made before are
/// built again (and collected with their blob).
pub const LAYER_INDEX: &str = "layer-index-2";
/// The first wait before the background fetch retries; it doubles up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(200);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// How many layers of an image are indexed at once.
const INDEXERS: usize = 4;
/// How many times a layer is indexed before its error is final (after a registry failure the
/// missing bytes are fetched, after a corrupt or truncated download the whole layer).
const INDEX_ATTEMPTS: u32 = 3;
/// Prefetch ranges are read in pieces of at most this many bytes.
const PREFETCH_PIECE: u64 = 4 << 20;
/// The background fetch waits until the file system has not been read for this long, so that a
/// starting container has the link (and the CPU) to itself...
const BACKGROUND_IDLE: Duration = Duration::from_millis(250);
/// ...but never more than this per run of chunks, so a file system that is read all the time
/// still gets its image local.
const BACKGROUND_MAX_DEFER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("resolving {reference}")]
    Resolve {
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error("registering the mount's layers in the cache")]
    Hold(#[source] CacheError),
    #[error("opening blob {digest}")]
    Blob {
        digest: Digest,
        #[source]
        source: CacheError,
    },
    #[error("indexing layer {digest}")]
    Index {
        digest: Digest,
        #[source]
        source: LayerError,
    },
    #[error("merging the layers of {reference}")]
    Tree {
        reference: String,
        #[source]
        source: LayerError,
    },
    #[error("target {0} is not a directory")]
    BadTarget(PathBuf),
    #[error("mounting FUSE at {target}")]
    Fuse {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching layer {digest}")]
    Fetch {
        digest: Digest,
        #[source]
        source: CacheError,
    },
    #[error("layer {0} is not complete locally")]
    NotLocal(Digest),
    #[error("unpacking layer {digest} into {dir}")]
    Unpack {
        digest: Digest,
        dir: PathBuf,
        #[source]
        source: LayerError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handing {target} over to overlayfs")]
    Handoff {
        target: PathBuf,
        #[source]
        source: HandoffError,
    },
    #[error("layer {digest} unpacks to about {needed} bytes, more than {what} ({room} bytes)")]
    TooLarge { digest: Digest, needed: u64, what: &'static str, room: u64 },
    #[error("cannot hand off in phase {0:?}: the image must be complete")]
    NotComplete(Phase),
    #[error("the mount was stopped before the image was complete")]
    Stopped,
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Hand the target over to overlayfs once the image is local.
    pub handoff: bool,
    /// Fetch the whole image in the background; without it only what is read is fetched (and
    /// there is no handoff).
    pub background_fetch: bool,
    /// What a layer may make the mount hold or write.
    pub limits: Limits,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions { handoff: true, background_fetch: true, limits: Limits::DEFAULT }
    }
}

/// Where a mount is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving over FUSE while the layers are fetched.
    Fetching,
    Unpacking,
    /// Every byte is local; FUSE keeps serving (no handoff asked for).
    Complete,
    /// overlayfs serves the target; FUSE serves only files opened before.
    HandedOff,
    /// The background work failed for good; FUSE keeps serving what it can.
    Failed(String),
}

/// One layer's fetch progress.
pub struct LayerProgress {
    pub digest: Digest,
    pub size: u64,
    blob: Arc<Blob>,
}

impl LayerProgress {
    pub fn local_bytes(&self) -> u64 {
        self.blob.local_bytes().min(self.size)
    }
}

/// Progress of a mount, for the progress bar and the metrics endpoint.
pub struct Progress {
    pub reference: String,
    pub layers: Vec<LayerProgress>,
    pub fs: Arc<FsStats>,
    registry: Arc<Registry>,
    phase: Mutex<Phase>,
}

impl Progress {
    pub fn phase(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }
    pub fn total_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
    pub fn local_bytes(&self) -> u64 {
        self.layers.iter().map(LayerProgress::local_bytes).sum()
    }
    /// Bytes this process received from registries.
    pub fn fetched_bytes(&self) -> u64 {
        self.registry.bytes_fetched()
    }

    /// The progress in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let image = escape_label(&self.reference);
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let per_layer = |f: &dyn Fn(&LayerProgress) -> u64| {
            self.layers.iter().map(|l| (format!("image=\"{image}\",layer=\"{}\"", l.digest), f(l))).collect()
        };
        metric("vstor_image_layer_bytes", "gauge", "Size of each layer blob.", per_layer(&|l| l.size));
        metric(
            "vstor_image_layer_local_bytes",
            "gauge",
            "Bytes of each layer blob held locally.",
            per_layer(&|l| l.local_bytes()),
        );
        let image_label = format!("image=\"{image}\"");
        let one = |v: u64| vec![(image_label.clone(), v)];
        metric("vstor_image_bytes", "gauge", "Size of all layer blobs.", one(self.total_bytes()));
        metric("vstor_image_local_bytes", "gauge", "Bytes of all layer blobs held locally.", one(self.local_bytes()));
        metric(
            "vstor_image_fetched_bytes_total",
            "counter",
            "Blob bytes received from the registry.",
            one(self.fetched_bytes()),
        );
        metric(
            "vstor_image_fuse_reads_total",
            "counter",
            "File reads served through FUSE.",
            one(self.fs.reads.load(Relaxed)),
        );
        metric(
            "vstor_image_fuse_read_bytes_total",
            "counter",
            "Bytes served through FUSE.",
            one(self.fs.bytes_read.load(Relaxed)),
        );
        metric(
            "vstor_image_fuse_read_errors_total",
            "counter",
            "File reads that failed (EIO).",
            one(self.fs.read_errors.load(Relaxed)),
        );
        let phase = self.phase();
        let phases = ["fetching", "unpacking", "complete", "handed_off", "failed"];
        let current = match phase {
            Phase::Fetching => 0,
            Phase::Unpacking => 1,
            Phase::Complete => 2,
            Phase::HandedOff => 3,
            Phase::Failed(_) => 4,
        };
        metric(
            "vstor_image_phase",
            "gauge",
            "1 for the phase the mount is in.",
            phases
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("{image_label},phase=\"{p}\""), u64::from(i == current)))
                .collect(),
        );
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Indexes a layer within `limits`, or takes its index from the cache.
pub fn layer_index(
    cache: &BlobCache,
    desc: &Descriptor,
    blob: &Blob,
    limits: &Limits,
) -> Result<LayerIndex, MountError> {
    let index_err = |source| MountError::Index { digest: desc.digest.clone(), source };
    let cached = cache
        .get_derived(&desc.digest, LAYER_INDEX)
        .map_err(|source| MountError::Blob { digest: desc.digest.clone(), source })?;
    if let Some(bytes) = cached {
        match LayerIndex::from_bytes(&bytes) {
            Ok(index) => return Ok(index),
            Err(e) => {
                tracing::warn!(layer = %desc.digest, error = %chain(&e), "cached layer index unreadable; indexing again")
            }
        }
    }
    // A gzip or plain tar layer is indexed by reading all of it: fetch it whole beside the
    // indexer, in large runs ahead of its small reads (an eStargz layer reads only its TOC).
    let ahead = !desc.annotations.contains_key(layer::TOC_DIGEST_ANNOTATION) && !blob.is_complete();
    let indexing = AtomicBool::new(true);
    let index = std::thread::scope(|s| {
        let fetch = ahead.then(|| s.spawn(|| blob.fetch_all_paced(&|| indexing.load(Relaxed))));
        let index = build_index(desc, blob, limits, fetch);
        // A layer indexed was read whole, so the fetch beside it only verifies and keeps it.
        if index.is_err() {
            indexing.store(false, Relaxed);
        }
        index
    })
    .map_err(index_err)?;
    match index.to_bytes() {
        Ok(bytes) => {
            if let Err(e) = cache.put_derived(&desc.digest, LAYER_INDEX, &bytes) {
                tracing::warn!(layer = %desc.digest, error = %chain(&e), "could not keep the layer index in the cache");
            }
        }
        Err(e) => tracing::warn!(layer = %desc.digest, error = %chain(&e), "the layer index cannot be cached"),
    }
    Ok(index)
}

/// Indexes a layer, trying again after a registry failure (reading what is local, fetching
/// what is missing) or damage: the bytes of a blob not verified yet are fetched again, by
/// `fetch` (a whole-blob fetch running beside, which verifies the blob and fetches it again
/// itself if it must) if there is one, else here.
fn build_index(
    desc: &Descriptor,
    blob: &Blob,
    limits: &Limits,
    mut fetch: Option<std::thread::ScopedJoinHandle<'_, Result<(), CacheError>>>,
) -> Result<LayerIndex, LayerError> {
    let mut attempt = 1;
    loop {
        // A blob verified before the attempt has only its own errors.
        let verified = blob.is_complete();
        match LayerIndex::build(desc, blob, limits) {
            Ok(index) => return Ok(index),
            Err(e) if attempt < INDEX_ATTEMPTS && e.is_transport() => {
                tracing::warn!(layer = %desc.digest, attempt, error = %chain(&e), "indexing failed; trying again");
            }
            Err(e) if attempt < INDEX_ATTEMPTS && !verified && e.is_damage() => {
                tracing::warn!(layer = %desc.digest, attempt, error = %chain(&e), "indexing failed; fetching the layer again");
                match fetch.take().map(|f| f.join()) {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        tracing::warn!(layer = %desc.digest, error = %chain(&e), "fetching the layer whole failed");
                        blob.discard(0, blob.size());
                    }
                    Some(Err(panic)) => std::panic::resume_unwind(panic),
                    None => blob.discard(0, blob.size()),
                }
            }
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

/// Indexes the layers of an image ([`layer_index`]), [`INDEXERS`] at a time: a first mount of a
/// gzip image reads every layer whole before it can serve. The first error is returned (and no
/// further layer is started).
pub fn index_layers(
    cache: &BlobCache,
    descs: &[Descriptor],
    blobs: &[Arc<Blob>],
    limits: &Limits,
) -> Result<Vec<LayerIndex>, MountError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<Mutex<Option<Result<LayerIndex, MountError>>>> = descs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..INDEXERS.min(descs.len()) {
            s.spawn(|| {
                while !failed.load(Relaxed) {
                    let i = next.fetch_add(1, Relaxed);
                    let (Some(desc), Some(blob)) = (descs.get(i), blobs.get(i)) else { return };
                    let result = layer_index(cache, desc, blob, limits);
                    if result.is_err() {
                        failed.store(true, Relaxed);
                    }
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    let mut indexes = Vec::with_capacity(descs.len());
    for result in results {
        match result.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(result) => indexes.push(result?),
            // Layers are started in order and none after one failed: its error came first.
            None => return Err(MountError::Stopped),
        }
    }
    Ok(indexes)
}

/// An image mounted at a target: FUSE first, overlayfs once the image is local.
pub struct ImageMount {
    target: PathBuf,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    fuse: FuseMount,
    background: JoinHandle<Result<(), MountError>>,
    work: Arc<Background>,
}

impl ImageMount {
    /// Mounts `reference` at `target` and starts fetching it in the background.
    pub fn start(
        cache: Arc<BlobCache>,
        registry: Arc<Registry>,
        reference: &ImageRef,
        target: &Path,
        options: MountOptions,
    ) -> Result<ImageMount, MountError> {
        if !target.is_dir() {
            return Err(MountError::BadTarget(target.to_path_buf()));
        }
        let name = display_ref(reference);
        let image =
            registry.resolve(reference).map_err(|source| MountError::Resolve { reference: name.clone(), source })?;
        tracing::info!(image = %name, manifest = %image.digest, layers = image.layers.len(), "resolved");
        // Before any blob is opened, so another daemon's gc sees that they are needed: the
        // layers, and the unpacked layers that may be keyed by their chain.
        let digests: Vec<Digest> = image.layers.iter().map(|d| d.digest.clone()).collect();
        let keys: Vec<Digest> = digests.iter().cloned().chain(chain_ids(&digests)).collect();
        let hold = cache.hold(&format!("mount of {name} at {}", target.display()), &keys).map_err(MountError::Hold)?;
        let layers = image
            .layers
            .iter()
            .map(|desc| {
                cache
                    .blob(&registry, reference, desc)
                    .map_err(|source| MountError::Blob { digest: desc.digest.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let indexes = index_layers(&cache, &image.layers, &layers, &options.limits)?;
        let tree = Tree::build(&indexes).map_err(|source| MountError::Tree { reference: name.clone(), source })?;
        let indexes: Vec<Arc<LayerIndex>> = indexes.into_iter().map(Arc::new).collect();
        let fs_stats = Arc::new(FsStats::new());
        let layer_data = layers
            .iter()
            .zip(&indexes)
            .map(|(blob, index)| LayerData {
                index: Arc::clone(index),
                source: Arc::clone(blob) as Arc<dyn BlobSource>,
            })
            .collect();
        let fs = ImageFs::new(tree, layer_data, Arc::clone(&fs_stats))
            .map_err(|source| MountError::Fuse { target: target.to_path_buf(), source })?;
        let fuse =
            FuseMount::mount(fs, target).map_err(|source| MountError::Fuse { target: target.to_path_buf(), source })?;
        tracing::info!(image = %name, target = %target.display(), "mounted over FUSE");

        let progress = Arc::new(Progress {
            reference: name,
            layers: image
                .layers
                .iter()
                .zip(&layers)
                .map(|(d, b)| LayerProgress { digest: d.digest.clone(), size: d.size, blob: Arc::clone(b) })
                .collect(),
            fs: fs_stats,
            registry: Arc::clone(&registry),
            phase: Mutex::new(Phase::Fetching),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(Background {
            cache,
            _hold: hold,
            image,
            blobs: layers,
            indexes,
            target: target.to_path_buf(),
            options,
            progress: Arc::clone(&progress),
            stop: Arc::clone(&stop),
        });
        let worker = Arc::clone(&work);
        let background =
            std::thread::Builder::new().name("image-fetch".into()).spawn(move || worker.run()).map_err(|source| {
                MountError::Io { what: "starting the fetch thread for", path: target.to_path_buf(), source }
            })?;
        Ok(ImageMount { target: target.to_path_buf(), progress, stop, fuse, background, work })
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Stops the background work and detaches the FUSE mount if it is still at the target
    /// (after a handoff the overlay stays: it no longer needs this process).
    pub fn stop(&self) {
        self.stopper().stop()
    }

    /// A handle that stops this mount from another thread (e.g. on a signal).
    pub fn stopper(&self) -> MountStopper {
        MountStopper { target: self.target.clone(), progress: Arc::clone(&self.progress), stop: Arc::clone(&self.stop) }
    }

    /// Hands the target over to overlayfs now, for a mount started without `handoff` whose
    /// image is complete ([`Phase::Complete`]).
    pub fn hand_off(&self) -> Result<(), MountError> {
        self.work.hand_off()
    }

    /// Waits for the background work, then for the kernel to release the FUSE connection
    /// (after a handoff: when the last file opened through FUSE is closed).
    pub fn wait(self) -> Result<(), MountError> {
        let background = match self.background.join() {
            Ok(result) => result,
            Err(_) => Err(MountError::Stopped),
        };
        if let Err(e) = &background {
            tracing::error!(error = %chain(e), "background fetch ended");
        }
        self.fuse.join().map_err(|source| MountError::Fuse { target: self.target.clone(), source })?;
        background
    }
}

/// Stops a mount: see [`ImageMount::stop`].
pub struct MountStopper {
    target: PathBuf,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
}

impl MountStopper {
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        if !matches!(self.progress.phase(), Phase::HandedOff) {
            if let Err(e) = handoff::detach(&self.target) {
                tracing::warn!(target = %self.target.display(), error = %chain(&e), "detaching the FUSE mount");
            }
        }
    }
}

/// `registry/repository:tag@digest`, for logs and labels.
pub fn display_ref(r: &ImageRef) -> String {
    let mut s = format!("{}/{}", r.registry, r.repository);
    if let Some(tag) = &r.tag {
        s.push(':');
        s.push_str(tag);
    }
    if let Some(digest) = &r.digest {
        s.push('@');
        s.push_str(digest.as_str());
    }
    s
}

/// The background fetch, unpack and handoff of one mount.
struct Background {
    cache: Arc<BlobCache>,
    /// Keeps the mount's layers from gc until the mount ends.
    _hold: Hold,
    image: Image,
    blobs: Vec<Arc<Blob>>,
    indexes: Vec<Arc<LayerIndex>>,
    target: PathBuf,
    options: MountOptions,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
}

impl Background {
    fn run(&self) -> Result<(), MountError> {
        let result = self.fetch_and_hand_off();
        match &result {
            Ok(()) => {
                // The image has grown the cache: back under its limit (this mount's layers stay).
                if let Err(e) = self.cache.gc() {
                    tracing::warn!(error = %chain(&e), "cache gc failed");
                }
            }
            Err(MountError::Stopped) => tracing::info!("background fetch stopped"),
            Err(e) => self.progress.set_phase(Phase::Failed(chain(e))),
        }
        result
    }

    fn fetch_and_hand_off(&self) -> Result<(), MountError> {
        if !self.options.background_fetch {
            return Ok(());
        }
        self.prefetch();
        for (desc, blob) in self.image.layers.iter().zip(&self.blobs) {
            self.retrying(&desc.digest, || blob.fetch_all_paced(&|| self.yield_to_readers()))?;
        }
        tracing::info!(image = %self.progress.reference, "every layer is local");
        self.progress.set_phase(Phase::Complete);
        if self.options.handoff {
            self.hand_off()?;
        }
        Ok(())
    }

    /// Unpacks every layer (once) and hands the target over to overlayfs. Only one caller at a
    /// time gets past the phase check.
    fn hand_off(&self) -> Result<(), MountError> {
        {
            let mut phase = self.progress.phase.lock().unwrap_or_else(|e| e.into_inner());
            if *phase != Phase::Complete {
                return Err(MountError::NotComplete(phase.clone()));
            }
            *phase = Phase::Unpacking;
        }
        let result = self.unpack_and_hand_off();
        self.progress.set_phase(match &result {
            Ok(()) => Phase::HandedOff,
            Err(e) => Phase::Failed(chain(e)),
        });
        result
    }

    fn unpack_and_hand_off(&self) -> Result<(), MountError> {
        let digests: Vec<Digest> = self.image.layers.iter().map(|d| d.digest.clone()).collect();
        let mut lowers = Vec::with_capacity(self.blobs.len());
        for (((digest, chain), blob), index) in
            digests.iter().zip(chain_ids(&digests)).zip(&self.blobs).zip(&self.indexes)
        {
            let key = if index.depends_on_lowers() { chain } else { digest.clone() };
            let dir = unpack_once(&self.cache, &key, blob, index, &lowers, &self.options.limits)?;
            lowers.push(dir);
        }
        if self.stop.load(Relaxed) {
            return Err(MountError::Stopped);
        }
        lowers.reverse(); // overlayfs wants the top layer first
        if lowers.len() == 1 {
            // overlayfs without an upper directory needs two lower ones; an empty one is neutral.
            lowers.push(empty_lower(&self.cache)?);
        }
        handoff::hand_off(&self.target, &lowers)
            .map_err(|source| MountError::Handoff { target: self.target.clone(), source })?;
        tracing::info!(target = %self.target.display(), "handed over to overlayfs");
        Ok(())
    }

    /// Waits while the file system is being read (see [`BACKGROUND_IDLE`]); demand reads fetch
    /// what they need themselves, ahead of this. False once the mount is stopped.
    fn yield_to_readers(&self) -> bool {
        let started = std::time::Instant::now();
        while !self.stop.load(Relaxed) && started.elapsed() < BACKGROUND_MAX_DEFER {
            match self.progress.fs.idle_for() {
                idle if idle < BACKGROUND_IDLE => std::thread::sleep(BACKGROUND_IDLE - idle),
                _ => break,
            }
        }
        !self.stop.load(Relaxed)
    }

    /// Reads the eStargz prefetch ranges first, so the files a container starts with are local
    /// early. Failures only cost time: the full fetch follows.
    fn prefetch(&self) {
        for (blob, index) in self.blobs.iter().zip(&self.indexes) {
            for range in index.prefetch_ranges() {
                let mut at = range.start;
                while at < range.end && !self.stop.load(Relaxed) {
                    let len = (range.end - at).min(PREFETCH_PIECE);
                    let mut buf = vec![0; len as usize];
                    if let Err(e) = blob.read_at(at, &mut buf) {
                        tracing::warn!(layer = %blob.digest(), error = %chain(&e), "prefetch failed; the full fetch follows");
                        break;
                    }
                    at += len;
                }
            }
        }
    }

    fn retrying(&self, digest: &Digest, fetch: impl Fn() -> Result<(), CacheError>) -> Result<(), MountError> {
        fetch_until_done(&self.stop, digest, FIRST_RETRY_WAIT, fetch)
    }
}

/// Runs `fetch` until it succeeds, the mount is stopped, or it fails for good. Registry failures
/// are retried, waiting twice as long each time up to [`MAX_RETRY_WAIT`] (a registry may be
/// down for a while); anything else is final: a blob that did not match its digest however often
/// it was fetched ([`CacheError::Corrupt`]) would otherwise be fetched again forever.
fn fetch_until_done(
    stop: &AtomicBool,
    digest: &Digest,
    first_wait: Duration,
    fetch: impl Fn() -> Result<(), CacheError>,
) -> Result<(), MountError> {
    let mut wait = first_wait;
    loop {
        if stop.load(Relaxed) {
            return Err(MountError::Stopped);
        }
        match fetch() {
            Ok(()) => return Ok(()),
            Err(CacheError::Stopped) => return Err(MountError::Stopped),
            Err(e @ (CacheError::Timeout { .. } | CacheError::Fetch { .. })) => {
                tracing::warn!(layer = %digest, error = %chain(&e), retry_in = ?wait, "background fetch failed; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
            Err(source) => return Err(MountError::Fetch { digest: digest.clone(), source }),
        }
    }
}

/// The chain ID of each layer of a stack (bottom first), as OCI defines it over diff IDs but
/// over blob digests: the bottom layer's digest, then `sha256(below + " " + digest)`. A layer
/// whose unpacked form depends on the layers below ([`LayerIndex::depends_on_lowers`]) is
/// unpacked under its chain ID, so stacks that differ below it never share it.
pub fn chain_ids(digests: &[Digest]) -> Vec<Digest> {
    let mut below: Option<Digest> = None;
    digests
        .iter()
        .map(|digest| {
            let chain = match &below {
                None => digest.clone(),
                Some(below) => Digest::of(format!("{below} {digest}").as_bytes()),
            };
            below = Some(chain.clone());
            chain
        })
        .collect()
}

/// Unpacks a complete layer into the cache's directory for `key` (the layer's digest, or its
/// chain ID: see [`chain_ids`]), unless that exists already. The layer goes to a temporary
/// directory first and is renamed into place, so a directory at the final path is always
/// complete, whichever process or mount wrote it. `lowers` are the layers below it, bottom
/// first, already unpacked. A layer that would not fit the free space or the cache's size limit
/// is refused before anything is written.
pub fn unpack_once(
    cache: &BlobCache,
    key: &Digest,
    blob: &Blob,
    index: &LayerIndex,
    lowers: &[PathBuf],
    limits: &Limits,
) -> Result<PathBuf, MountError> {
    let dir = cache.unpacked_dir(key);
    if dir.is_dir() {
        return Ok(dir);
    }
    let digest = blob.digest();
    let needed = index.unpacked_bytes();
    let free = cache.available_bytes().map_err(|source| MountError::Blob { digest: digest.clone(), source })?;
    for (what, room) in [("the free space", free), ("the cache's size limit", cache.size_limit())] {
        if needed > room {
            return Err(MountError::TooLarge { digest: digest.clone(), needed, what, room });
        }
    }
    // Under the cache's tmp/, so what a crash leaves is removed once this process is gone.
    let tmp = cache.temp_path(&format!("unpack-{}", key.hex()));
    std::fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
    let blob_path = blob.path().ok_or_else(|| MountError::NotLocal(digest.clone()))?;
    let unpacked = layer::unpack(index, &blob_path, &tmp, lowers, limits);
    if let Err(source) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(MountError::Unpack { digest: digest.clone(), dir: dir.clone(), source });
    }
    // The layer is unpacked under tmp/, not under its name.
    failpoint::hit("cache::unpack::unpacked");
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another mount or process unpacked it meanwhile: keep theirs.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => Err(MountError::Io { what: "renaming the unpacked layer to", path: dir, source }),
    }
}

/// An empty directory beside the unpacked layers, for single-layer images.
fn empty_lower(cache: &BlobCache) -> Result<PathBuf, MountError> {
    let some_layer = cache.unpacked_dir(&Digest::of(b""));
    let dir = some_layer.parent().unwrap_or(Path::new("/")).join(".empty-lower");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    Ok(dir)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn digest() -> Digest {
        Digest::of(b"layer")
    }

    #[test]
    fn registry_failures_are_retried_until_the_fetch_succeeds() {
        let calls = Cell::new(0);
        let result = fetch_until_done(&AtomicBool::new(false), &digest(), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            match calls.get() {
                1 => Err(CacheError::Timeout { digest: digest(), start: 0, end: 1, secs: 1 }),
                2 => Err(CacheError::Fetch {
                    digest: digest(),
                    start: 0,
                    end: 1,
                    source: Arc::new(RegistryError::Config("down".into())),
                }),
                _ => Ok(()),
            }
        });
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(calls.get(), 3);
    }

    /// A blob corrupt every time is given up on with its error, not fetched again forever.
    #[test]
    fn a_corrupt_blob_is_given_up_on() {
        let calls = Cell::new(0);
        let result = fetch_until_done(&AtomicBool::new(false), &digest(), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            Err(CacheError::Corrupt { digest: digest(), actual: Digest::of(b"other"), attempts: 3 })
        });
        let err = result.unwrap_err();
        assert!(matches!(err, MountError::Fetch { source: CacheError::Corrupt { .. }, .. }), "{err:?}");
        assert!(chain(&err).contains("is corrupt: fetched 3 times"), "{}", chain(&err));
        assert_eq!(calls.get(), 1);
    }

    /// A layer's chain ID depends on every layer below it and on nothing above.
    #[test]
    fn chain_ids_follow_the_layers_below() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        let one = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(one[0], a);
        assert_eq!(one[1], Digest::of(format!("{a} {b}").as_bytes()));
        let other = chain_ids(&[b.clone(), c.clone()]);
        assert_ne!(one[2], other[1], "the same top layer over other layers");
        assert_eq!(chain_ids(&[a, b, c.clone(), c])[..3], one[..]);
    }

    #[test]
    fn a_stopped_mount_stops_retrying() {
        let stop = AtomicBool::new(false);
        let result = fetch_until_done(&stop, &digest(), Duration::from_millis(1), || {
            stop.store(true, Relaxed);
            Err(CacheError::Timeout { digest: digest(), start: 0, end: 1, secs: 1 })
        });
        assert!(matches!(result, Err(MountError::Stopped)), "{result:?}");
    }
}
