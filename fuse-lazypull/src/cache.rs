//! The content-addressed blob cache, shared by every mount and by several daemons pointed at one
//! directory. OWNER: H7a. SKELETON: keep these public signatures (H7b and H7c code against them);
//! add what you need, and make this a directory module if it grows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;
use crate::reference::ImageRef;
use crate::registry::{Descriptor, Registry};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The registry did not deliver a range in time (a read of missing data gets EIO).
    #[error("timed out after {secs} s waiting for bytes {start}..{end} of {digest}")]
    Timeout { digest: Digest, start: u64, end: u64, secs: u64 },
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Unreferenced content is garbage-collected down to this many bytes.
    pub size_limit: u64,
    /// How long a read waits for missing bytes before it fails.
    pub fetch_timeout: std::time::Duration,
}

pub struct BlobCache {}

impl BlobCache {
    pub fn open(dir: &Path, config: CacheConfig) -> Result<Arc<BlobCache>, CacheError> {
        todo!("H7a")
    }
    /// The blob `desc` of `image`'s repository, shared by every caller in this process (and its
    /// bytes by every process using this directory). Nothing is fetched yet.
    pub fn blob(&self, registry: &Arc<Registry>, image: &ImageRef, desc: &Descriptor) -> Result<Arc<Blob>, CacheError> {
        todo!("H7a")
    }
    /// Derived data kept beside a blob, e.g. a layer's index (`kind` = "layer-index").
    pub fn get_derived(&self, digest: &Digest, kind: &str) -> Result<Option<Vec<u8>>, CacheError> {
        todo!("H7a")
    }
    pub fn put_derived(&self, digest: &Digest, kind: &str, bytes: &[u8]) -> Result<(), CacheError> {
        todo!("H7a")
    }
    /// Where the layer `digest` is (or will be) unpacked for overlayfs.
    pub fn unpacked_dir(&self, digest: &Digest) -> PathBuf {
        todo!("H7a")
    }
}

/// Random access to one blob: missing ranges are fetched on demand (ahead of background work);
/// `fetch_all` fills the rest. Bytes of a complete blob were checked against its digest.
pub struct Blob {}

impl Blob {
    pub fn digest(&self) -> &Digest {
        todo!("H7a")
    }
    /// Fetches every missing byte, verifies the whole blob against its digest and keeps it.
    pub fn fetch_all(&self) -> Result<(), CacheError> {
        todo!("H7a")
    }
    pub fn is_complete(&self) -> bool {
        todo!("H7a")
    }
    /// The local file of a complete, verified blob.
    pub fn path(&self) -> Option<PathBuf> {
        todo!("H7a")
    }
    /// Bytes held locally, for progress.
    pub fn local_bytes(&self) -> u64 {
        todo!("H7a")
    }
}

impl crate::layer::BlobSource for Blob {
    fn size(&self) -> u64 {
        todo!("H7a")
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        todo!("H7a")
    }
    fn discard(&self, offset: u64, len: u64) {
        todo!("H7a")
    }
}
