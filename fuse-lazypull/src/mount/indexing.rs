//! A mount's layers indexed: each layer's entries and where its files' bytes are, built side by
//! side for the layers of an image, or taken from the cache where an earlier mount kept them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::error::MountError;
use crate::cache::{Blob, BlobCache, CacheError};
use crate::error_text::chain;
use crate::layer::{self, BlobSource, LayerError, LayerIndex, Limits};
use crate::registry::Descriptor;

/// Kind of the derived data under which a layer's index is cached.
/// Its number changes when what an index holds or refuses changes, so indexes made before are
/// built again (and collected with their blob).
pub const LAYER_INDEX: &str = "layer-index-3";
/// How many layers of an image are indexed at once.
const INDEXERS: usize = 4;
/// How many times a layer is indexed before its error is final (after a registry failure the
/// missing bytes are fetched, after a corrupt or truncated download the whole layer).
const INDEX_ATTEMPTS: u32 = 3;

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
        match LayerIndex::from_stored(&bytes, desc.size, limits) {
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

/// Refuses an image whose layer blobs together are declared larger than
/// [`Limits::max_image_bytes`], before any of them is opened.
pub fn check_image_size(descs: &[Descriptor], limits: &Limits) -> Result<(), MountError> {
    let bytes = descs.iter().map(|d| d.size).fold(0, u64::saturating_add);
    if bytes > limits.max_image_bytes {
        return Err(MountError::ImageLimits(format!(
            "its layers are {bytes} bytes, more than {}",
            limits.max_image_bytes
        )));
    }
    Ok(())
}

/// Indexes the layers of an image ([`layer_index`]), [`INDEXERS`] at a time: a first mount of a
/// gzip image reads every layer whole before it can serve. The first error is returned (and no
/// further layer is started). The layers together may hold at most
/// [`Limits::max_image_entries`] entries, counted as each layer is indexed.
pub fn index_layers(
    cache: &BlobCache,
    descs: &[Descriptor],
    blobs: &[Arc<Blob>],
    limits: &Limits,
) -> Result<Vec<LayerIndex>, MountError> {
    check_image_size(descs, limits)?;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let entries = AtomicU64::new(0);
    let results: Vec<Mutex<Option<Result<LayerIndex, MountError>>>> = descs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..INDEXERS.min(descs.len()) {
            s.spawn(|| {
                while !failed.load(Relaxed) {
                    let i = next.fetch_add(1, Relaxed);
                    let (Some(desc), Some(blob)) = (descs.get(i), blobs.get(i)) else { return };
                    let result = layer_index(cache, desc, blob, limits).and_then(|index| {
                        let total = entries.fetch_add(index.entries.len() as u64, Relaxed) + index.entries.len() as u64;
                        if total > limits.max_image_entries {
                            return Err(MountError::ImageLimits(format!(
                                "its layers hold more than {} entries",
                                limits.max_image_entries
                            )));
                        }
                        Ok(index)
                    });
                    if result.is_err() {
                        failed.store(true, Relaxed);
                    }
                    *plumbing::lock(&results[i]) = Some(result);
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
