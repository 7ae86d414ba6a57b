//! The per-disk chain of I/O filters.
//!
//! Each disk's backend sits behind a [`Chain`] of [`Filter`]s built from the disk's configuration
//! (see [`config`] for the types, their options and the class order). A filter sees each request
//! on its way down (`pre`) and, if it asks, its completion (`post`); it answers continue,
//! complete, redirect to another disk's chain, or handle (do asynchronous work itself). A chain is
//! itself a `vdisk::BlockDevice`.
//!
//! The catalog, above, composes disks: it asks the [`FilterFramework`] to check a disk's filters
//! against the other disks, to build its chain over its backend (handing it the chains of the
//! disks it redirects to: a linked clone's parent), and to copy a clone's data for a flatten. This
//! crate sees other disks only as the chains it is given.
//!
//! Built-in filters: `stats`, `throttle`, `cache`, `linked_clone`, `integrity`, and
//! `passthrough` (does nothing; measures the framework).

mod blocking;
pub mod chain;
pub mod config;
pub mod filters;
pub mod framework;
pub mod request;

pub use chain::{Chain, Filter, Next, Verdict};
pub use config::{ConfigError, DiskFilters, FilterSpec, LINKED_CLONE, MAX_CLONE_DEPTH};
pub use framework::{clone_filters, ChainSetup, FilterFramework, Flattened};
pub use request::{Completion, Head, Reply, Request, MAX_HOPS};

/// What the framework's own operations (flatten) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("disk {disk:?} is a linked clone of {parent:?}, which is not open")]
    NoParent { disk: String, parent: String },
    #[error("disk {0:?} is not a linked clone")]
    NotAClone(String),
    #[error("I/O on disk {disk:?} failed")]
    Io {
        disk: String,
        #[source]
        source: vdisk::BlockError,
    },
    /// A record of a filter's state read back from the disk's namespace is malformed: the store
    /// was damaged, or written by something else. The disk stays unavailable; nothing is guessed.
    #[error("disk {disk:?}: stored record {key:?} is malformed: {reason}")]
    BadRecord { disk: String, key: String, reason: String },
    /// The disk's size or block size is beyond what a filter keeps state for.
    #[error("disk {disk:?}: {reason}")]
    Shape { disk: String, reason: String },
    #[error("state store")]
    Store(#[from] state_store::StoreError),
}
