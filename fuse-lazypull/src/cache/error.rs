//! What can go wrong in the cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;
use crate::registry::RegistryError;

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
    /// [`super::Blob::fetch_all_paced`] was told to stop.
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
        source: Box<rusqlite::Error>,
    },
    /// The index was made by a later version of this program, which may keep what this one
    /// cannot read.
    #[error("cache index at {} has version {found}; this program knows version {known}", path.display())]
    IndexVersion { path: PathBuf, found: i64, known: i64 },
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

/// An I/O error on `path`, doing `what`.
pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}
