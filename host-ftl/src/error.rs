//! The crate's error type.
//!
//! Commands never return these: a command's failure is an NVMe status in its completion
//! (see [`crate::command::Status`]). These errors are for configuration, addresses handled by
//! callers, DMA access by the submitter, and opening or running the media.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong outside a command's status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A geometry field has a value the device cannot work with.
    #[error("invalid geometry: {field}: {reason}")]
    InvalidGeometry { field: &'static str, reason: String },

    /// A field of a physical address is outside the geometry.
    #[error("address field {field} = {value} is out of range (must be below {limit})")]
    AddressOutOfRange { field: &'static str, value: u64, limit: u64 },

    /// A physical address has bits set above the fields of the LBA format.
    #[error("address {0:#x} has bits set above the LBA format")]
    AddressReservedBits(u64),

    /// An access to a DMA region falls outside it.
    #[error("DMA access of {len} bytes at offset {offset} is outside the region of {size} bytes")]
    DmaOutOfBounds { offset: u64, len: u64, size: u64 },

    /// A vector command was built with no addresses or more than 64.
    #[error("a vector command carries 1 to 64 addresses, not {0}")]
    BadAddressCount(usize),

    /// A structure read from bytes is not well formed.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// The media file was made for another geometry.
    #[error("media geometry differs from the requested one: {field} is {found} in the media, {wanted} requested")]
    GeometryMismatch { field: &'static str, found: u64, wanted: u64 },

    /// The media file is not one of ours, or its metadata does not make sense.
    #[error("media {path}: {reason}")]
    BadMedia { path: PathBuf, reason: String },

    /// A media operation names blocks outside the geometry, or buffers of the wrong size.
    #[error("media operation out of range: {0}")]
    MediaRange(String),

    /// A command the host needed (a log page, a flush) completed with an error status.
    #[error("the device answered {what} with {status}")]
    Command { what: &'static str, status: crate::status::Status },

    /// The device cannot do what was asked (see [`crate::OpenChannel`]).
    #[error("the device does not support {0}")]
    Unsupported(&'static str),

    /// An I/O error from the media's backing file.
    #[error("media I/O: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
