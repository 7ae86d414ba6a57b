//! The crate's error: one enum per part, gathered here.

use crate::cache::CacheError;
use crate::layer::LayerError;
use crate::registry::RegistryError;

/// An error with its causes as one line (kept here too, where callers have always found it).
pub use crate::error_text::chain;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Mount(#[from] crate::mount::MountError),
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
}
