//! The crate's error type.

use host_ftl::Status;

/// Everything that can go wrong in the guest FTL.
#[derive(Debug, thiserror::Error)]
pub enum FtlError {
    /// The device's geometry cannot carry this FTL's layout.
    #[error("geometry not supported by the guest FTL: {0}")]
    Geometry(String),
    /// The configuration is invalid (or too tight for the geometry).
    #[error("invalid FTL configuration: {0}")]
    Config(String),
    /// The partition holds less than the disk is to show.
    #[error("the FTL offers {offered} bytes on its partition, less than the disk's {wanted}")]
    TooSmall { wanted: u64, offered: u64 },
    /// The DMA region is too small or an access fell outside it.
    #[error("DMA region")]
    Dma(#[source] host_ftl::Error),
    /// A device command failed in a way the FTL cannot work around.
    #[error("device command {opcode:#04x} failed: {status}")]
    Device { opcode: u8, status: Status },
    /// A block the map says holds data could not be read back.
    #[error("lost data: logical block {lba} at slot {slot}: {status}")]
    Lost { lba: u32, slot: u32, status: Status },
    /// No free space is left even after garbage collection: more chunks went bad than the
    /// over-provisioning can absorb.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// The metadata store failed.
    #[error("state store")]
    Store(#[from] state_store::StoreError),
    /// Stored FTL metadata is malformed or belongs to another layout.
    #[error("bad stored metadata: {0}")]
    Metadata(String),
    /// Sequence numbers or line generations ran out: only a record that set them near their
    /// end gets there.
    #[error("{0} exhausted")]
    Exhausted(&'static str),
    /// A blocking store task could not be joined.
    #[error("background task failed: {0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, FtlError>;

impl From<FtlError> for vdisk::BlockError {
    fn from(e: FtlError) -> vdisk::BlockError {
        vdisk::BlockError::Io(std::io::Error::other(e))
    }
}
