//! The OCI distribution client. OWNER: H7a. SKELETON: keep these public signatures (H7b and H7c
//! code against them); add what you need, and make this a directory module if it grows.
//!
//! The public API is blocking (the FUSE side runs on threads); inside, use what fits (hyper is
//! already a workspace dependency; TLS through rustls with the `ring` provider, not aws-lc).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crate::digest::Digest;
use crate::reference::ImageRef;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad image reference {0:?}: {1}")]
    BadReference(String, String),
}

/// Which registries to reach how. Loopback registries (127.0.0.0/8, ::1, localhost) are spoken
/// to over plain HTTP, as Docker does; so are those listed in `insecure`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct RegistryConfig {
    pub insecure: Vec<String>,
}

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A resolved image: the linux/amd64 manifest of a reference.
#[derive(Clone, Debug)]
pub struct Image {
    pub reference: ImageRef,
    /// Digest of the (platform) manifest.
    pub digest: Digest,
    pub config: Descriptor,
    /// Bottom layer first.
    pub layers: Vec<Descriptor>,
}

pub struct Registry {}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Arc<Registry>, RegistryError> {
        todo!("H7a")
    }
    /// Resolves a reference to its linux/amd64 manifest (through an index if there is one).
    pub fn resolve(&self, image: &ImageRef) -> Result<Image, RegistryError> {
        todo!("H7a")
    }
    /// Fetches `range` of a blob (a ranged GET; the caller checks digests).
    pub fn fetch_range(&self, image: &ImageRef, digest: &Digest, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        todo!("H7a")
    }
    /// Bytes received from registries so far (blob bodies), for tests and benchmarks.
    pub fn bytes_fetched(&self) -> u64 {
        todo!("H7a")
    }
}
