//! What the catalog's operations fail with. Each lower crate's error is kept as the source.

use std::path::PathBuf;
use std::sync::Arc;

use state_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("invalid disk name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'")]
    InvalidName(String),
    #[error("a disk named {0:?} already exists")]
    NameTaken(String),
    #[error("no disk named {0:?}")]
    NotFound(String),
    #[error("block size {0} is not supported: use 512 or 4096")]
    BadBlockSize(u32),
    #[error("size {size} is not a multiple of the block size {block_size}")]
    SizeNotMultiple { size: u64, block_size: u32 },
    #[error("size must be greater than zero")]
    ZeroSize,
    #[error("size {size} is larger than the {max} bytes a disk may have")]
    TooLarge { size: u64, max: u64 },
    #[error("over-provisioning of {0}% is not supported: use 1 to 400")]
    BadOverProvisioning(u32),
    #[error("disk id {0:?} is not one the catalog makes")]
    BadId(String),
    #[error("disk {name:?} is in use by {users} export connection(s)")]
    InUse { name: String, users: usize },
    #[error("disk {name:?} cannot be deleted: disk(s) {} depend on it", children.join(", "))]
    HasDependents { name: String, children: Vec<String> },
    #[error("disk {0:?} is not a linked clone")]
    NotAClone(String),
    #[error("disk {name:?}: its filters")]
    Filters {
        name: String,
        #[source]
        source: Box<io_filters::ConfigError>,
    },
    #[error("disk {name:?}: its filter chain")]
    Chain {
        name: String,
        #[source]
        source: Box<io_filters::FilterError>,
    },
    #[error("disk {name:?} is an FTL disk, but this daemon has no open-channel device")]
    NoFtl { name: String },
    #[error("disk {name:?}: its FTL")]
    Ftl {
        name: String,
        #[source]
        source: Box<crate::flash::FlashError>,
    },
    #[error("{path} has {actual} bytes, the catalog says {recorded}")]
    SizeMismatch { path: PathBuf, actual: u64, recorded: u64 },
    /// The disk is listed but could not be opened; the source says why.
    #[error("disk {name:?} is unavailable")]
    Unavailable {
        name: String,
        #[source]
        source: Arc<CatalogError>,
    },
    #[error("{action} {path}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog record {key:?} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid catalog record")]
    BadRecord(#[source] Box<CatalogError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, CatalogError>;

pub(crate) fn file_err<'a>(
    action: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> CatalogError + 'a {
    move |source| CatalogError::File { action, path: path.to_path_buf(), source }
}
