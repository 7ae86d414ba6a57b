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

mod background;
mod error;
mod indexing;
mod progress;
mod unpacked;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::cache::BlobCache;
use crate::digest::Digest;
use crate::error_text::chain;
use crate::fs::{FsStats, FuseMount, ImageFs, LayerData};
use crate::handoff;
use crate::layer::{BlobSource, LayerIndex, Limits};
use crate::reference::ImageRef;
use crate::registry::Registry;
use crate::tree::Tree;

use background::Background;
pub use error::MountError;
pub use indexing::{check_image_size, index_layers, layer_index, LAYER_INDEX};
pub use progress::{LayerProgress, Phase, Progress};
pub use unpacked::{chain_ids, unpack_once};

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
        check_image_size(&image.layers, &options.limits)?;
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
        let tree = Tree::build_within(&indexes, &options.limits)
            .map_err(|source| MountError::Tree { reference: name.clone(), source })?;
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

        let layer_progress = image
            .layers
            .iter()
            .zip(&layers)
            .map(|(d, b)| LayerProgress::new(d.digest.clone(), d.size, Arc::clone(b)))
            .collect();
        let progress = Arc::new(Progress::new(name, layer_progress, fs_stats, Arc::clone(&registry)));
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(Background {
            cache,
            _hold: hold,
            image,
            blobs: layers,
            indexes,
            target: target.to_path_buf(),
            fetch: options.background_fetch,
            handoff: options.handoff,
            limits: options.limits,
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
