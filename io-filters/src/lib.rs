//! The per-disk chain of I/O filters.
//!
//! Each disk's backend sits behind a [`Chain`] of [`Filter`]s built from the disk's configuration
//! (see [`config`] for the types, their options and the class order). A filter sees each request
//! on its way down (`pre`) and, if it asks, its completion (`post`); it answers continue,
//! complete, redirect to another disk's chain, or handle (do asynchronous work itself). A chain is
//! itself a `vdisk::BlockDevice`.
//!
//! The catalog (vdisk) knows nothing of filters: the daemon installs a [`FilterFramework`] as the
//! catalog's `ChainHook`, which checks configurations when disks are created, names the disks a
//! disk redirects to (so the catalog keeps them read-only and undeletable while it does), and
//! builds chains. Redirecting filters find other disks' chains through the catalog's resolver.
//!
//! Built-in filters: `stats`, `throttle`, `cache`, `linked_clone`, `integrity`, and
//! `passthrough` (does nothing; measures the framework).

mod blocking;
pub mod chain;
pub mod config;
pub mod filters;
pub mod framework;
pub mod request;

pub use chain::{Chain, Filter, Next};
pub use config::{check_all, LINKED_CLONE, MAX_CLONE_DEPTH};
pub use framework::{clone_spec, FilterFramework};
pub use request::{Completion, Head, Reply, Request, Verdict, MAX_HOPS};

/// What the framework's own operations (flatten) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Catalog(#[from] vdisk::CatalogError),
    #[error("disk {0:?} is not a linked clone")]
    NotAClone(String),
    #[error("I/O on disk {disk:?} failed")]
    Io {
        disk: String,
        #[source]
        source: vdisk::BlockError,
    },
    #[error("filter state: {0}")]
    State(String),
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

/// An error and its causes on one line, for the catalog's string errors.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
