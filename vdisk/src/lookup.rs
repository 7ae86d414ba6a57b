//! How the frontends find disks: by name, through [`DiskLookup`], which whatever composes the
//! disks (the catalog) implements. The frontends know nothing of what a disk is made of.

use std::sync::Arc;

use crate::disk::Disk;

/// The disks a frontend may export.
pub trait DiskLookup: Send + Sync {
    /// The disk named `name`: its device behind the checks, whether it is read-only, and its
    /// connection accounting ([`Disk::acquire`]).
    fn open(&self, name: &str) -> Result<Arc<Disk>, LookupError>;

    /// The names of the disks, in order, for a client that asks what there is.
    fn names(&self) -> Vec<String>;
}

/// Why a disk cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no disk named {0:?}")]
    NotFound(String),
    /// The disk exists but could not be opened (its file is missing, its record is damaged...);
    /// the source says why, in the composing layer's own error type.
    #[error("disk {name:?} is unavailable")]
    Unavailable {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
