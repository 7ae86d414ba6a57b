//! What can go wrong with a mount.

use std::path::PathBuf;

use super::progress::Phase;
use crate::cache::CacheError;
use crate::digest::Digest;
use crate::handoff::HandoffError;
use crate::layer::LayerError;
use crate::registry::RegistryError;

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
    /// The image as a whole is over [`crate::layer::Limits::max_image_bytes`] or
    /// [`crate::layer::Limits::max_image_entries`].
    #[error("the image is over its limits: {0}")]
    ImageLimits(String),
}
