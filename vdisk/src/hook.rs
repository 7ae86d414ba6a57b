//! The hook through which a filter framework (the `io-filters` crate) puts each disk's backend
//! behind its filter chain, without vdisk depending on it.
//!
//! The catalog keeps each disk's filter configuration in its record ([`FilterSpec`]s, opaque
//! here), asks the hook to check it before a disk is created, to name the disks a disk redirects
//! to (its parents: they may not change or go away while it depends on them), and to build the
//! chain when it opens the disk. Chains reach other disks' chains by name through a
//! [`DiskResolver`] the catalog hands them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use state_store::Store;

use crate::catalog::DiskSpec;
use crate::device::BlockDevice;

/// One filter of a disk as configured: its type, an optional place in the chain, and options
/// that the filter framework reads (and refuses when it does not know them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// The filter's type, e.g. "integrity" or "linked_clone".
    #[serde(rename = "type")]
    pub kind: String,
    /// Explicit place in the chain: lower runs first (nearer the VM). Default: by class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i32>,
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// Finds a disk's chain by name, for a filter that redirects requests to another disk.
pub trait DiskResolver: Send + Sync {
    /// The device behind the named disk's checks (its chain, or its backend if it has no
    /// filters), or `None` if there is no such disk or it is unavailable.
    fn resolve(&self, name: &str) -> Option<Arc<dyn BlockDevice>>;
}

/// What the catalog knows of the other disks, for checking a new disk's filters.
pub trait DiskLookup {
    /// The spec of a disk in the catalog.
    fn spec(&self, name: &str) -> Option<DiskSpec>;

    /// The names of all disks.
    fn names(&self) -> Vec<String>;
}

/// What a chain is built for.
pub struct ChainContext<'a> {
    pub spec: &'a DiskSpec,
    pub id: &'a str,
    /// The disk's own state-store namespace, where its filters keep their state.
    pub namespace: &'a str,
    pub store: &'a Arc<Store>,
    pub resolver: Arc<dyn DiskResolver>,
}

/// A filter framework, installed in the catalog by the daemon.
pub trait ChainHook: Send + Sync {
    /// Checks a new disk's filters against the catalog: unknown filters, bad options, a parent
    /// that does not exist or does not fit, a redirect cycle. The message names the problem.
    fn check(&self, spec: &DiskSpec, disks: &dyn DiskLookup) -> Result<(), String>;

    /// The disks this disk's filters redirect to.
    fn targets(&self, spec: &DiskSpec) -> Vec<String>;

    /// Puts a disk's backend behind its chain. Called when the catalog opens or creates a disk.
    fn build(&self, ctx: &ChainContext<'_>, backend: Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>, String>;
}

/// What an FTL disk's backend is made for.
pub struct BackendContext<'a> {
    pub spec: &'a DiskSpec,
    pub id: &'a str,
    /// The disk's own state-store namespace, where the FTL keeps its map checkpoints.
    pub namespace: &'a str,
    pub store: &'a Arc<Store>,
}

/// The guest FTL on the host FTL driver's open-channel device, installed in the catalog by the
/// daemon for disks with `backend = { type = "ftl" }` (vdisk cannot depend on the FTL crates).
pub trait FtlHook: Send + Sync {
    /// Gives a new disk its partition of the device. Must be durable before it returns: the
    /// catalog's record, written next, is the commit point.
    fn create(&self, ctx: &BackendContext<'_>) -> Result<(), String>;

    /// Opens the disk's FTL on its partition (formatting it on first use, recovering it after a
    /// crash) as a device of exactly `spec.size` bytes.
    fn open(&self, ctx: &BackendContext<'_>) -> Result<Arc<dyn BlockDevice>, String>;

    /// Gives a deleted disk's partition back; its chunks are erased in the background.
    fn remove(&self, id: &str);

    /// The disk ids that hold a partition, to find the remains of an interrupted create.
    fn ids(&self) -> Vec<String>;
}
