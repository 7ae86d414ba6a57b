//! Where a layer's bytes come from, as the layer code sees it: random access to a blob, and why
//! a read failed, told only as far as the layer code acts on it (trying again may help, or not).
//! The blob cache is the real source; tests and fuzz targets use bytes in memory.

use std::ops::Range;

/// A cause of a failed read, whatever the source's own error type is.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a read of a layer blob failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes did not come (a timeout, a failed fetch): the bytes already local are sound,
    /// and trying again fetches only what is missing.
    #[error(transparent)]
    Transient(Cause),
    /// Anything else: trying again cannot help.
    #[error(transparent)]
    Failed(Cause),
    #[error("read of {len} bytes at {offset} is past the end of the blob ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl ReadError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ReadError::Transient(_))
    }
}

/// Random access to a layer blob's (compressed) bytes.
pub trait BlobSource: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`, waiting for missing bytes to be fetched.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError>;
    /// Forgets the local bytes of a range that failed verification, so the next read fetches them
    /// again.
    fn discard(&self, offset: u64, len: u64);
    /// Whether every byte of `range` is local, so reading it cannot wait on the network.
    fn is_local(&self, _range: Range<u64>) -> bool {
        false
    }
}
