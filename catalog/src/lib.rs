//! The disk catalog: which disks exist, what each is made of, and the disks themselves, composed.
//!
//! The catalog sits above what it composes and knows each part by its real type: a disk's
//! backend (a raw file, [`vdisk::raw::RawFile`], or a guest FTL on the daemon's open-channel
//! device, [`flash::FlashBackend`]), its filter chain ([`io_filters`]), and the checked handle
//! the frontends get through [`vdisk::DiskLookup`] ([`vdisk::Disk`]). See [`compose`] for the
//! order a request goes through them.
//!
//! Records live in the `catalog` namespace of the state store; each disk also owns a namespace of
//! its own (`disk-<id>`) for the state of the layers above its backend. Creating and deleting a
//! disk are atomic: the single synced write of its catalog record is the commit point, and
//! whatever a crash leaves on either side of it (a namespace, a file or a partition without a
//! record) is removed when the catalog is next opened.
//!
//! A disk that others redirect to (a linked clone's parent) is held read-only while they do, and
//! cannot be deleted. Disks are opened parents first, and closed clones first.

mod compose;
mod error;
pub mod flash;
mod record;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use guest_ftl::Ftl;
use io_filters::{Chain, FilterFramework, FilterSpec};
use state_store::{Batch, Store};
use vdisk::raw::RawFile;
use vdisk::{error_chain, BlockDevice, Disk, DiskLookup, LookupError};

use crate::compose::{Opened, Parts};
use crate::error::file_err;
pub use crate::error::{CatalogError, Result};
pub use crate::flash::{FlashBackend, FlashError, OcssdConfig};
use crate::record::{is_id, DISK_NS_PREFIX};
pub use crate::record::{validate, Backend, DiskRecord, DiskSpec, MAX_DISK_BYTES};

const CATALOG_NS: &str = "catalog";
const RECORD_PREFIX: &str = "disk/";
const RAW_SUFFIX: &str = ".raw";
/// Records read at open, at most: far more disks than one daemon serves.
const MAX_RECORDS: usize = 1 << 20;

/// One disk of the catalog: its record and, if it could be opened, the disk.
#[derive(Clone)]
pub struct Entry {
    pub record: DiskRecord,
    /// The disk as the frontends see it, or why it could not be opened.
    pub disk: std::result::Result<Arc<Disk>, Arc<CatalogError>>,
    /// Where a raw disk's file is.
    pub path: PathBuf,
    opened: Option<Opened>,
}

impl Entry {
    /// The disk's guest FTL, if it is an FTL disk and open.
    pub fn ftl(&self) -> Option<&Arc<Ftl>> {
        self.opened.as_ref().and_then(|o| o.ftl.as_ref())
    }

    fn chain(&self) -> Option<Arc<Chain>> {
        self.opened.as_ref().map(|o| o.chain.clone())
    }
}

/// The disks and who depends on whom, under one lock.
#[derive(Default)]
struct Disks {
    entries: BTreeMap<String, Entry>,
    /// Each disk's children: the disks that redirect to it.
    children: BTreeMap<String, BTreeSet<String>>,
}

impl Disks {
    fn view(&self, name: &str) -> Option<io_filters::DiskFilters> {
        self.entries.get(name).map(|e| e.record.spec.filters_view())
    }

    fn chain(&self, name: &str) -> Option<Arc<Chain>> {
        self.entries.get(name).and_then(Entry::chain)
    }

    /// Notes the links of `spec` to its parents, and freezes them.
    fn link(&mut self, spec: &DiskSpec) {
        for parent in spec.parents() {
            if let Some(Ok(disk)) = self.entries.get(&parent).map(|e| &e.disk) {
                disk.set_frozen(true);
            }
            self.children.entry(parent).or_default().insert(spec.name.clone());
        }
    }

    /// Forgets the links of `spec` to its parents; a parent left without children is writable.
    fn unlink(&mut self, spec: &DiskSpec) {
        for parent in spec.parents() {
            let now_free = self.children.get_mut(&parent).is_some_and(|c| {
                c.remove(&spec.name);
                c.is_empty()
            });
            if now_free {
                self.children.remove(&parent);
                if let Some(Ok(disk)) = self.entries.get(&parent).map(|e| &e.disk) {
                    disk.set_frozen(false);
                }
            }
        }
    }

    fn children_of(&self, name: &str) -> Vec<String> {
        self.children.get(name).map(|c| c.iter().cloned().collect()).unwrap_or_default()
    }
}

/// All disks of one daemon.
pub struct Catalog {
    store: Arc<Store>,
    disk_dir: PathBuf,
    disks: Mutex<Disks>,
    filters: Arc<FilterFramework>,
    flash: Option<Arc<FlashBackend>>,
}

impl Catalog {
    /// Opens the catalog, removes what an interrupted create or delete left behind, and opens
    /// every disk, parents first. A disk that cannot be opened stays listed, marked unavailable
    /// with the reason. Blocking; call it inside a tokio runtime (the devices register with it).
    pub fn open(
        store: Arc<Store>,
        disk_dir: &Path,
        filters: Arc<FilterFramework>,
        flash: Option<Arc<FlashBackend>>,
    ) -> Result<Catalog> {
        state_store::private_dir(disk_dir).map_err(file_err("cannot create", disk_dir))?;
        if !store.has_namespace(CATALOG_NS) {
            store.create_namespace(CATALOG_NS)?;
        }
        let mut records = Vec::new();
        store.for_each_prefix(CATALOG_NS, RECORD_PREFIX, MAX_RECORDS, |key, value| {
            let key = String::from_utf8_lossy(key).into_owned();
            let record: DiskRecord =
                serde_json::from_slice(value).map_err(|source| CatalogError::Corrupt { key, source })?;
            records.push(record);
            Ok::<(), CatalogError>(())
        })?;
        let catalog = Catalog { store, disk_dir: disk_dir.to_path_buf(), disks: Mutex::default(), filters, flash };
        catalog.remove_orphans(&records)?;
        let by_name: BTreeMap<String, DiskRecord> = records.into_iter().map(|r| (r.spec.name.clone(), r)).collect();
        let mut disks = catalog.lock();
        for name in parents_first(&by_name) {
            let Some(record) = by_name.get(&name) else { continue };
            let path = catalog.raw_path(&record.id);
            // A record read back is input like any other: one that breaks the rules a create
            // follows is listed unavailable, and nothing is opened, sized or removed for it.
            let others = |n: &str| by_name.get(n).map(|r| r.spec.filters_view());
            let checked = record
                .check()
                .and_then(|()| {
                    catalog
                        .filters
                        .check(&record.spec.filters_view(), &others)
                        .map_err(|source| CatalogError::Filters { name: name.clone(), source: Box::new(source) })
                })
                .map_err(|e| CatalogError::BadRecord(Box::new(e)));
            let opened = checked.and_then(|()| catalog.open_disk(record, &path, &disks));
            disks.link(&record.spec);
            disks.entries.insert(name, entry(record.clone(), path, opened));
        }
        drop(disks);
        Ok(catalog)
    }

    /// Creates a disk: its backend, its namespace, then its record (the commit point). Blocking.
    pub fn create(&self, spec: DiskSpec) -> Result<Entry> {
        validate(&spec)?;
        let mut disks = self.lock();
        if disks.entries.contains_key(&spec.name) {
            return Err(CatalogError::NameTaken(spec.name));
        }
        self.filters
            .check(&spec.filters_view(), &|n| disks.view(n))
            .map_err(|source| CatalogError::Filters { name: spec.name.clone(), source: Box::new(source) })?;
        let record = DiskRecord::new(spec);
        let path = self.raw_path(&record.id);
        match record.spec.backend {
            Backend::Raw { .. } => {
                RawFile::create(&path, record.spec.size).map_err(file_err("cannot create", &path))?
            }
            Backend::Ftl { over_provisioning } => {
                let name = record.spec.name.clone();
                let flash = self.flash.as_ref().ok_or_else(|| CatalogError::NoFtl { name: name.clone() })?;
                flash
                    .create(&record.id, record.spec.size, over_provisioning)
                    .map_err(|source| CatalogError::Ftl { name, source: Box::new(source) })?;
            }
        }
        // The file or partition is there; no namespace, no record yet.
        failpoint::hit("catalog::create::backend-made");
        let committed = self.store.create_namespace(&record.namespace()).and_then(|()| {
            // The namespace too; still no record.
            failpoint::hit("catalog::create::namespace-made");
            let mut batch = Batch::new();
            batch.put(CATALOG_NS, record_key(&record.spec.name), record.to_json());
            self.store.commit(batch)
        });
        if let Err(e) = committed {
            self.remove_backend(&record, &path);
            return Err(e.into());
        }
        // The record commits the disk; its backend has not been opened (an FTL not formatted).
        failpoint::hit("catalog::create::committed");
        let opened = self.open_disk(&record, &path, &disks);
        let entry = entry(record, path, opened);
        disks.link(&entry.record.spec);
        disks.entries.insert(entry.record.spec.name.clone(), entry.clone());
        let r = &entry.record;
        tracing::info!(disk = %r.spec.name, id = %r.id, size = r.spec.size, "disk created");
        Ok(entry)
    }

    /// Deletes a disk that no export is using and no disk depends on, with its namespace and its
    /// data. Blocking.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut disks = self.lock();
        let entry = disks.entries.get(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        if let Ok(disk) = &entry.disk {
            if disk.users() > 0 {
                return Err(CatalogError::InUse { name: name.to_owned(), users: disk.users() });
            }
        }
        let children = disks.children_of(name);
        if !children.is_empty() {
            return Err(CatalogError::HasDependents { name: name.to_owned(), children });
        }
        let mut batch = Batch::new();
        batch.delete(CATALOG_NS, record_key(name));
        self.store.commit(batch)?;
        // The record is gone; the namespace and the file or partition are still there.
        failpoint::hit("catalog::delete::record-deleted");
        if let Some(entry) = disks.entries.remove(name) {
            disks.unlink(&entry.record.spec);
            self.remove_backend(&entry.record, &entry.path);
        }
        tracing::info!(disk = %name, "disk deleted");
        Ok(())
    }

    /// Copies the rest of a linked clone's data from its parent, then cuts the link: the clone's
    /// record loses its linked_clone filter and its bitmap in one commit, and the parent becomes
    /// writable again if no other disk depends on it. Returns the 4 KiB grains copied.
    pub async fn flatten(&self, name: &str) -> Result<u64> {
        let entry = self.entry(name)?;
        let (id, spec) = (&entry.record.id, &entry.record.spec);
        let flattened = self.filters.flatten_copy(id, name, &spec.filters).await.map_err(|e| match e {
            io_filters::FilterError::NotAClone(n) => CatalogError::NotAClone(n),
            source => CatalogError::Chain { name: name.to_owned(), source: Box::new(source) },
        })?;
        // Every grain is in the clone, durably, with its bit; the record still names the parent.
        failpoint::hit("linked_clone::flatten::copied");
        {
            let mut disks = self.lock();
            let entry = disks.entries.get_mut(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
            let before = entry.record.spec.clone();
            let mut record = entry.record.clone();
            record.spec.filters = flattened.filters;
            let mut batch = flattened.batch;
            batch.put(CATALOG_NS, record_key(name), record.to_json());
            self.store.commit(batch)?;
            entry.record = record;
            disks.unlink(&before);
        }
        self.filters.flatten_done(id);
        tracing::info!(disk = %name, parent = %flattened.parent, copied = flattened.copied, "linked clone flattened");
        Ok(flattened.copied)
    }

    /// Makes every disk's writes durable and closes what keeps state across restarts: clones
    /// before their parents, each disk's chain flushed, each FTL checkpointed, so that the next
    /// open recovers nothing. For a clean stop, after the exports are gone.
    pub async fn close(&self) {
        let open: Vec<(String, Opened)> = {
            let disks = self.lock();
            let records: BTreeMap<String, DiskRecord> =
                disks.entries.iter().map(|(n, e)| (n.clone(), e.record.clone())).collect();
            let order = parents_first(&records).into_iter().rev();
            order.filter_map(|n| Some((n.clone(), disks.entries.get(&n)?.opened.clone()?))).collect()
        };
        for (name, opened) in open {
            if let Err(e) = opened.chain.flush().await {
                tracing::warn!(disk = %name, error = %error_chain(&e), "flush at close failed");
            }
            if let Some(ftl) = &opened.ftl {
                match ftl.shutdown().await {
                    Ok(()) => tracing::info!(disk = %name, "FTL checkpointed"),
                    Err(e) => tracing::warn!(disk = %name, error = %error_chain(&e), "FTL checkpoint at close failed"),
                }
            }
        }
    }

    /// The disk named `name`, for an export.
    pub fn disk(&self, name: &str) -> Result<Arc<Disk>> {
        let disks = self.lock();
        let entry = disks.entries.get(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        entry.disk.clone().map_err(|source| CatalogError::Unavailable { name: name.to_owned(), source })
    }

    pub fn entry(&self, name: &str) -> Result<Entry> {
        self.lock().entries.get(name).cloned().ok_or_else(|| CatalogError::NotFound(name.to_owned()))
    }

    /// Every disk, by name.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.values().cloned().collect()
    }

    /// The disks a disk redirects to (its parent), per its filters.
    pub fn parents(&self, name: &str) -> Vec<String> {
        self.lock().entries.get(name).map(|e| e.record.spec.parents()).unwrap_or_default()
    }

    /// The disks that redirect to `name` (its children).
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.lock().children_of(name)
    }

    /// The spec of a new linked clone of `parent`: its shape, a linked_clone filter, and `extra`
    /// filters of the clone's own.
    pub fn clone_spec(
        &self,
        parent: &str,
        child: &str,
        backend: Backend,
        copy_on_read: bool,
        extra: Vec<FilterSpec>,
    ) -> Result<DiskSpec> {
        let parent = self.entry(parent)?.record.spec;
        Ok(DiskSpec {
            name: child.to_owned(),
            size: parent.size,
            block_size: parent.block_size,
            read_only: false,
            backend,
            filters: io_filters::clone_filters(&parent.name, copy_on_read, extra),
        })
    }

    pub fn filters(&self) -> &Arc<FilterFramework> {
        &self.filters
    }

    pub fn flash(&self) -> Option<&Arc<FlashBackend>> {
        self.flash.as_ref()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Disks> {
        plumbing::lock(&self.disks)
    }

    fn raw_path(&self, id: &str) -> PathBuf {
        self.disk_dir.join(format!("{id}{RAW_SUFFIX}"))
    }

    /// Opens a disk, its parents' chains taken from `disks`. Blocking.
    fn open_disk(&self, record: &DiskRecord, path: &Path, disks: &Disks) -> Result<Opened> {
        let parts = Parts {
            store: &self.store,
            filters: &self.filters,
            flash: self.flash.as_deref(),
            parents: &|n| disks.chain(n),
        };
        compose::open(record, path, parts)
    }

    /// Best-effort removal of a disk's namespace and file or partition; leftovers go at the next
    /// open.
    fn remove_backend(&self, record: &DiskRecord, path: &Path) {
        if !is_id(&record.id) {
            // An id from a damaged record names no file or namespace of ours.
            return;
        }
        if let (Backend::Ftl { .. }, Some(flash)) = (&record.spec.backend, &self.flash) {
            flash.remove(&record.id);
            // The partition is reclaiming; the namespace is still there.
            failpoint::hit("catalog::remove::partition-released");
        }
        if self.store.has_namespace(&record.namespace()) {
            if let Err(e) = self.store.drop_namespace(&record.namespace()) {
                tracing::warn!(error = %error_chain(&e), "cannot drop namespace; it goes at the next start");
            }
        }
        // The namespace is dropped; a raw disk's file is still there.
        failpoint::hit("catalog::remove::namespace-dropped");
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove disk file; it goes at the next start");
            }
        }
    }

    /// Removes namespaces, partitions and files that belong to no record: the remains of a
    /// create or delete that a crash interrupted.
    fn remove_orphans(&self, records: &[DiskRecord]) -> Result<()> {
        let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        for ns in self.store.namespaces()? {
            if let Some(id) = ns.strip_prefix(DISK_NS_PREFIX) {
                if !ids.contains(id) {
                    tracing::info!(namespace = %ns, "removing namespace of an unfinished create or delete");
                    self.store.drop_namespace(&ns)?;
                    // One leftover is gone, others may remain for the next open.
                    failpoint::hit("catalog::open::orphan-removed");
                }
            }
        }
        if let Some(flash) = &self.flash {
            for id in flash.ids() {
                if !ids.contains(id.as_str()) {
                    tracing::info!(%id, "removing partition of an unfinished create or delete");
                    flash.remove(&id);
                    failpoint::hit("catalog::open::orphan-removed");
                }
            }
        }
        let dir = std::fs::read_dir(&self.disk_dir).map_err(file_err("cannot read", &self.disk_dir))?;
        for item in dir.flatten() {
            let name = item.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(RAW_SUFFIX)) else { continue };
            if is_id(id) && !ids.contains(id) {
                tracing::info!(path = %item.path().display(), "removing file of an unfinished create or delete");
                std::fs::remove_file(item.path()).map_err(file_err("cannot remove", &item.path()))?;
                failpoint::hit("catalog::open::orphan-removed");
            }
        }
        Ok(())
    }
}

impl DiskLookup for Catalog {
    fn open(&self, name: &str) -> std::result::Result<Arc<Disk>, LookupError> {
        self.disk(name).map_err(|e| match e {
            CatalogError::NotFound(name) => LookupError::NotFound(name),
            e => LookupError::Unavailable { name: name.to_owned(), source: Box::new(e) },
        })
    }

    fn names(&self) -> Vec<String> {
        self.lock().entries.keys().cloned().collect()
    }
}

fn entry(record: DiskRecord, path: PathBuf, opened: Result<Opened>) -> Entry {
    match opened {
        Ok(o) => Entry { record, disk: Ok(o.disk.clone()), path, opened: Some(o) },
        Err(e) => {
            tracing::error!(disk = %record.spec.name, reason = %error_chain(&e), "disk unavailable");
            Entry { record, disk: Err(Arc::new(e)), path, opened: None }
        }
    }
}

/// The names of `records` in an order that has each disk's parents before it. Disks caught in a
/// cycle (which create refuses; only damaged records hold one) come last, in name order: their
/// parents' chains are not there when they open, so they stay unavailable.
fn parents_first(records: &BTreeMap<String, DiskRecord>) -> Vec<String> {
    let mut order = Vec::with_capacity(records.len());
    let mut placed = BTreeSet::new();
    for start in records.keys() {
        // Walk up to the first ancestor not placed yet, then place the walk top-down.
        let mut path = Vec::new();
        let mut at = Some(start.clone());
        while let Some(name) = at.take() {
            if placed.contains(&name) || path.contains(&name) {
                break;
            }
            at = records.get(&name).and_then(|r| r.spec.parents().into_iter().next());
            path.push(name);
        }
        for name in path.into_iter().rev() {
            if placed.insert(name.clone()) && records.contains_key(&name) {
                order.push(name);
            }
        }
    }
    order
}

fn record_key(name: &str) -> String {
    format!("{RECORD_PREFIX}{name}")
}

#[cfg(test)]
mod tests;
