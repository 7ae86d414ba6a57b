//! Opening a disk: its backend (a raw file or a guest FTL), its filter chain above it, and the
//! checked handle the frontends use above that. A request reads this top-down: frontend ->
//! [`vdisk::Disk`] (checks, counters, connection accounting) -> [`io_filters::Chain`] ->
//! backend.

use std::path::Path;
use std::sync::Arc;

use guest_ftl::Ftl;
use io_filters::{Chain, ChainSetup, FilterFramework};
use state_store::Store;
use vdisk::raw::RawFile;
use vdisk::{BlockDevice, Disk};

use crate::error::{file_err, CatalogError, Result};
use crate::flash::FlashBackend;
use crate::record::{Backend, DiskRecord};

/// A disk opened: what the frontends use, its chain (which clones of it redirect to), and its
/// FTL if it has one (checkpointed when the catalog closes).
#[derive(Clone)]
pub(crate) struct Opened {
    pub disk: Arc<Disk>,
    pub chain: Arc<Chain>,
    pub ftl: Option<Arc<Ftl>>,
}

/// What a disk is opened with.
pub(crate) struct Parts<'a> {
    pub store: &'a Arc<Store>,
    pub filters: &'a FilterFramework,
    pub flash: Option<&'a FlashBackend>,
    /// The chains of the disks this one redirects to, by name.
    pub parents: &'a dyn Fn(&str) -> Option<Arc<Chain>>,
}

/// Opens a disk's backend and puts it behind its filter chain. Blocking.
pub(crate) fn open(record: &DiskRecord, raw_path: &Path, parts: Parts<'_>) -> Result<Opened> {
    let spec = &record.spec;
    let name = &spec.name;
    let namespace = record.namespace();
    let (backend, ftl): (Arc<dyn BlockDevice>, Option<Arc<Ftl>>) = match spec.backend {
        Backend::Raw { direct } => (open_raw(record, raw_path, direct)?, None),
        Backend::Ftl { over_provisioning } => {
            let flash = parts.flash.ok_or_else(|| CatalogError::NoFtl { name: name.clone() })?;
            let ftl = flash
                .open_disk(&record.id, spec.size, spec.block_size, over_provisioning, parts.store, &namespace)
                .map_err(|source| CatalogError::Ftl { name: name.clone(), source: Box::new(source) })?;
            (ftl.clone(), Some(ftl))
        }
    };
    let setup = ChainSetup {
        name,
        id: &record.id,
        filters: &spec.filters,
        namespace: &namespace,
        store: parts.store,
        parents: parts.parents,
    };
    let chain = parts
        .filters
        .build(setup, backend)
        .map_err(|source| CatalogError::Chain { name: name.clone(), source: Box::new(source) })?;
    let disk = Disk::new(name, &record.id, chain.clone()).with_read_only(spec.read_only);
    Ok(Opened { disk: Arc::new(disk), chain, ftl })
}

fn open_raw(record: &DiskRecord, path: &Path, direct: bool) -> Result<Arc<dyn BlockDevice>> {
    let raw = RawFile::open(path, record.spec.block_size, record.spec.read_only, direct)
        .map_err(file_err("cannot open disk file", path))?;
    let actual = raw.info().capacity;
    if actual != record.spec.size {
        return Err(CatalogError::SizeMismatch { path: path.to_path_buf(), actual, recorded: record.spec.size });
    }
    Ok(Arc::new(raw))
}
