//! The disk catalog: which disks exist, what they are made of, and their open devices.
//!
//! Records live in the `catalog` namespace of the state store; each disk also owns a namespace of
//! its own (`disk-<id>`) for the state of the layers above its backend. Creating and deleting a
//! disk are atomic: the single synced write of its catalog record is the commit point, and
//! whatever a crash leaves on either side of it (a namespace or a file without a record) is removed
//! when the catalog is next opened.
//!
//! With a [`ChainHook`] installed, each disk's backend sits behind the filter chain its spec
//! configures. A disk that other disks' filters redirect to (a linked clone's parent) is held
//! read-only while they do, and cannot be deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use state_store::{Batch, Store, StoreError};

use crate::device::BlockDevice;
use crate::disk::Disk;
use crate::hook::{BackendContext, ChainContext, ChainHook, DiskLookup, DiskResolver, FilterSpec, FtlHook};
use crate::raw::RawFile;

const CATALOG_NS: &str = "catalog";
const RECORD_PREFIX: &str = "disk/";
const DISK_NS_PREFIX: &str = "disk-";
const RAW_SUFFIX: &str = ".raw";

/// What a user asks for when creating a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    /// Capacity in bytes; "10G" and the like are read too.
    #[serde(deserialize_with = "crate::size::deserialize_size")]
    pub size: u64,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub backend: Backend,
    /// The disk's filter chain, read by the filter framework (io-filters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterSpec>,
}

fn default_block_size() -> u32 {
    512
}

/// What a disk's bytes are stored in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Backend {
    /// A sparse file in the data directory; `direct` bypasses the page cache (O_DIRECT).
    Raw {
        #[serde(default)]
        direct: bool,
    },
    /// A guest FTL on a partition (whole parallel units) of the daemon's open-channel device.
    /// `over_provisioning` is the percentage of flash kept beyond the disk's size for garbage
    /// collection.
    Ftl {
        #[serde(default = "default_over_provisioning")]
        over_provisioning: u32,
    },
}

fn default_over_provisioning() -> u32 {
    11
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Raw { direct: false }
    }
}

/// A disk as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub id: String,
    #[serde(flatten)]
    pub spec: DiskSpec,
    pub created_unix: u64,
}

impl DiskRecord {
    /// The state-store namespace the disk owns.
    pub fn namespace(&self) -> String {
        format!("{DISK_NS_PREFIX}{}", self.id)
    }
}

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
    #[error("disk id {0:?} is not one the catalog makes")]
    BadId(String),
    #[error("disk {name:?} is in use by {users} export connection(s)")]
    InUse { name: String, users: usize },
    #[error("disk {name:?}: {reason}")]
    Filters { name: String, reason: String },
    #[error("disk {name:?} has filters configured, but this catalog has no filter framework")]
    NoFilterFramework { name: String },
    #[error("disk {name:?} cannot be deleted: disk(s) {} depend on it", children.join(", "))]
    HasDependents { name: String, children: Vec<String> },
    #[error("disk {name:?} is an FTL disk, but this daemon has no open-channel device")]
    NoFtl { name: String },
    #[error("disk {name:?}: {reason}")]
    Ftl { name: String, reason: String },
    #[error("over-provisioning of {0}% is not supported: use 1 to 400")]
    BadOverProvisioning(u32),
    #[error("disk {name:?} is unavailable: {reason}")]
    Unavailable { name: String, reason: String },
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, CatalogError>;

/// One disk of the catalog: its record and, if it could be opened, its device.
#[derive(Clone)]
pub struct Entry {
    pub record: DiskRecord,
    pub disk: std::result::Result<Arc<Disk>, String>,
    pub path: PathBuf,
}

type Entries = Mutex<BTreeMap<String, Entry>>;

/// All disks of one daemon.
pub struct Catalog {
    store: Arc<Store>,
    disk_dir: PathBuf,
    entries: Arc<Entries>,
    hook: Option<Arc<dyn ChainHook>>,
    ftl: Option<Arc<dyn FtlHook>>,
}

/// Resolves disk names for redirecting filters. Holds the catalog's entries weakly: chains live
/// inside those entries.
struct Resolver(Weak<Entries>);

impl DiskResolver for Resolver {
    fn resolve(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let entries = self.0.upgrade()?;
        let entries = entries.lock().unwrap_or_else(|p| p.into_inner());
        let disk = entries.get(name)?.disk.as_ref().ok()?;
        Some(disk.device().clone())
    }
}

/// The specs of the records read back, to check each record's filters against the others.
impl DiskLookup for BTreeMap<String, DiskSpec> {
    fn spec(&self, name: &str) -> Option<DiskSpec> {
        self.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

impl DiskLookup for BTreeMap<String, Entry> {
    fn spec(&self, name: &str) -> Option<DiskSpec> {
        self.get(name).map(|e| e.record.spec.clone())
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

impl Catalog {
    /// Opens the catalog, removes what an interrupted create or delete left behind, and opens
    /// every disk. A disk whose backend cannot be opened stays listed, marked unavailable.
    /// Blocking; call it inside a tokio runtime (the devices register with it).
    pub fn open(store: Arc<Store>, disk_dir: &Path) -> Result<Catalog> {
        Catalog::open_with(store, disk_dir, None)
    }

    /// Opens the catalog with a filter framework that builds each disk's chain.
    pub fn open_with(store: Arc<Store>, disk_dir: &Path, hook: Option<Arc<dyn ChainHook>>) -> Result<Catalog> {
        Catalog::open_with_ftl(store, disk_dir, hook, None)
    }

    /// Opens the catalog with a filter framework and the guest FTL backend.
    pub fn open_with_ftl(
        store: Arc<Store>,
        disk_dir: &Path,
        hook: Option<Arc<dyn ChainHook>>,
        ftl: Option<Arc<dyn FtlHook>>,
    ) -> Result<Catalog> {
        state_store::private_dir(disk_dir).map_err(file_err("cannot create", disk_dir))?;
        if !store.has_namespace(CATALOG_NS) {
            store.create_namespace(CATALOG_NS)?;
        }
        let mut records = Vec::new();
        for (key, value) in store.scan_prefix(CATALOG_NS, RECORD_PREFIX)? {
            let key = String::from_utf8_lossy(&key).into_owned();
            let record: DiskRecord =
                serde_json::from_slice(&value).map_err(|source| CatalogError::Corrupt { key, source })?;
            records.push(record);
        }
        let entries = Arc::new(Mutex::new(BTreeMap::new()));
        let catalog = Catalog { store, disk_dir: disk_dir.to_path_buf(), entries, hook, ftl };
        catalog.remove_orphans(&records)?;
        let specs: BTreeMap<String, DiskSpec> = records.iter().map(|r| (r.spec.name.clone(), r.spec.clone())).collect();
        let mut entries = catalog.lock();
        for record in records {
            let path = catalog.raw_path(&record.id);
            // A record read back is input like any other: one that breaks the rules a create
            // follows is listed unavailable, and nothing is opened, sized or removed for it.
            let disk = check_record(&record)
                .map_err(|e| format!("invalid catalog record: {}", error_chain(&e)))
                .and_then(|()| catalog.check_filters(&record.spec, &specs))
                .and_then(|()| catalog.open_device(&record, &path).map_err(|e| error_chain(&e)));
            if let Err(reason) = &disk {
                tracing::error!(disk = %record.spec.name, %reason, "disk unavailable");
            }
            entries.insert(record.spec.name.clone(), Entry { record, disk, path });
        }
        catalog.refresh_frozen(&entries);
        drop(entries);
        Ok(catalog)
    }

    /// A record's filters, checked against the other records as a create checks them (unknown
    /// filters, bad options, a parent missing or of another shape, a redirect cycle): a linked
    /// clone of itself with copy-on-read would otherwise hang its own reads on its grain locks.
    fn check_filters(&self, spec: &DiskSpec, specs: &BTreeMap<String, DiskSpec>) -> std::result::Result<(), String> {
        match &self.hook {
            Some(hook) => hook.check(spec, specs).map_err(|reason| format!("invalid catalog record: {reason}")),
            None => Ok(()),
        }
    }

    /// Creates a disk: its backend, its namespace, then its record. Blocking.
    pub fn create(&self, spec: DiskSpec) -> Result<Entry> {
        validate(&spec)?;
        let mut entries = self.lock();
        if entries.contains_key(&spec.name) {
            return Err(CatalogError::NameTaken(spec.name));
        }
        match &self.hook {
            Some(hook) => hook
                .check(&spec, &*entries)
                .map_err(|reason| CatalogError::Filters { name: spec.name.clone(), reason })?,
            None if !spec.filters.is_empty() => return Err(CatalogError::NoFilterFramework { name: spec.name }),
            None => {}
        }
        let record = DiskRecord { id: new_id(), spec, created_unix: now_unix() };
        let path = self.raw_path(&record.id);
        match record.spec.backend {
            Backend::Raw { .. } => {
                RawFile::create(&path, record.spec.size).map_err(file_err("cannot create", &path))?
            }
            Backend::Ftl { .. } => {
                let name = record.spec.name.clone();
                let ftl = self.ftl.as_ref().ok_or(CatalogError::NoFtl { name: name.clone() })?;
                let namespace = record.namespace();
                ftl.create(&self.backend_context(&record, &namespace))
                    .map_err(|reason| CatalogError::Ftl { name, reason })?;
            }
        }
        // The file or partition is there; no namespace, no record yet.
        failpoint::hit("catalog::create::backend-made");
        let committed = self.store.create_namespace(&record.namespace()).and_then(|()| {
            // The namespace too; still no record.
            failpoint::hit("catalog::create::namespace-made");
            let mut batch = Batch::new();
            batch.put(CATALOG_NS, record_key(&record.spec.name), record_json(&record));
            self.store.commit(batch)
        });
        if let Err(e) = committed {
            self.remove_backend(&record, &path);
            return Err(e.into());
        }
        // The record commits the disk; its backend has not been opened (an FTL not formatted).
        failpoint::hit("catalog::create::committed");
        let disk = self.open_device(&record, &path).map_err(|e| error_chain(&e));
        let entry = Entry { record, disk, path };
        entries.insert(entry.record.spec.name.clone(), entry.clone());
        self.refresh_frozen(&entries);
        tracing::info!(disk = %entry.record.spec.name, id = %entry.record.id, size = entry.record.spec.size, "disk created");
        Ok(entry)
    }

    /// Deletes a disk that no export is using, with its namespace and its data. Blocking.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut entries = self.lock();
        let entry = entries.get(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        if let Ok(disk) = &entry.disk {
            if disk.users() > 0 {
                return Err(CatalogError::InUse { name: name.to_owned(), users: disk.users() });
            }
        }
        let children = self.dependents_in(&entries, name);
        if !children.is_empty() {
            return Err(CatalogError::HasDependents { name: name.to_owned(), children });
        }
        let mut batch = Batch::new();
        batch.delete(CATALOG_NS, record_key(name));
        self.store.commit(batch)?;
        // The record is gone; the namespace and the file or partition are still there.
        failpoint::hit("catalog::delete::record-deleted");
        if let Some(entry) = entries.remove(name) {
            self.remove_backend(&entry.record, &entry.path);
        }
        self.refresh_frozen(&entries);
        tracing::info!(disk = %name, "disk deleted");
        Ok(())
    }

    /// The open device of a disk, for an export.
    pub fn disk(&self, name: &str) -> Result<Arc<Disk>> {
        let entries = self.lock();
        let entry = entries.get(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        entry.disk.clone().map_err(|reason| CatalogError::Unavailable { name: name.to_owned(), reason })
    }

    /// Replaces a disk's filter list in its record, committed atomically with `extra` (changes to
    /// the filters' state in the disk's namespace). The running chain is not rebuilt: the filter
    /// that asked for the change has already switched itself. Disks that lose their last
    /// dependent become writable again.
    pub fn set_filters(&self, name: &str, filters: Vec<FilterSpec>, extra: Batch) -> Result<()> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))?;
        let mut record = entry.record.clone();
        record.spec.filters = filters;
        let mut batch = extra;
        batch.put(CATALOG_NS, record_key(name), record_json(&record));
        self.store.commit(batch)?;
        entry.record = record;
        self.refresh_frozen(&entries);
        tracing::info!(disk = %name, "filters changed");
        Ok(())
    }

    /// The disks a disk redirects to (its parents), per its filters.
    pub fn targets(&self, name: &str) -> Vec<String> {
        let entries = self.lock();
        match (entries.get(name), &self.hook) {
            (Some(entry), Some(hook)) => hook.targets(&entry.record.spec),
            _ => Vec::new(),
        }
    }

    /// The disks whose filters redirect to `name` (its children).
    pub fn dependents(&self, name: &str) -> Vec<String> {
        self.dependents_in(&self.lock(), name)
    }

    fn dependents_in(&self, entries: &BTreeMap<String, Entry>, name: &str) -> Vec<String> {
        let Some(hook) = &self.hook else { return Vec::new() };
        entries
            .values()
            .filter(|e| hook.targets(&e.record.spec).iter().any(|t| t == name))
            .map(|e| e.record.spec.name.clone())
            .collect()
    }

    /// Freezes exactly the disks that others depend on.
    fn refresh_frozen(&self, entries: &BTreeMap<String, Entry>) {
        let Some(hook) = &self.hook else { return };
        let parents: std::collections::HashSet<String> =
            entries.values().flat_map(|e| hook.targets(&e.record.spec)).collect();
        for (name, entry) in entries {
            if let Ok(disk) = &entry.disk {
                disk.set_frozen(parents.contains(name));
            }
        }
    }

    /// What the catalog hands filter chains to find other disks by name.
    pub fn resolver(&self) -> Arc<dyn DiskResolver> {
        Arc::new(Resolver(Arc::downgrade(&self.entries)))
    }

    /// Runs `f` with the catalog's disks as a [`DiskLookup`].
    pub fn with_lookup<T>(&self, f: impl FnOnce(&dyn DiskLookup) -> T) -> T {
        f(&*self.lock())
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn entry(&self, name: &str) -> Result<Entry> {
        self.lock().get(name).cloned().ok_or_else(|| CatalogError::NotFound(name.to_owned()))
    }

    /// Every disk, by name.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw_path(&self, id: &str) -> PathBuf {
        self.disk_dir.join(format!("{id}{RAW_SUFFIX}"))
    }

    /// Best-effort removal of a disk's namespace and file or partition; leftovers go at the next
    /// open.
    fn remove_backend(&self, record: &DiskRecord, path: &Path) {
        if !is_id(&record.id) {
            // An id from a damaged record names no file or namespace of ours.
            return;
        }
        if let (Backend::Ftl { .. }, Some(ftl)) = (&record.spec.backend, &self.ftl) {
            ftl.remove(&record.id);
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

    /// Removes namespaces and files that belong to no record: the remains of a create or delete
    /// that a crash interrupted.
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
        if let Some(ftl) = &self.ftl {
            for id in ftl.ids() {
                if !ids.contains(id.as_str()) {
                    tracing::info!(%id, "removing partition of an unfinished create or delete");
                    ftl.remove(&id);
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

impl Catalog {
    fn backend_context<'a>(&'a self, record: &'a DiskRecord, namespace: &'a str) -> BackendContext<'a> {
        BackendContext { spec: &record.spec, id: &record.id, namespace, store: &self.store }
    }

    /// Opens a disk's backend and puts it behind its filter chain.
    fn open_device(&self, record: &DiskRecord, path: &Path) -> Result<Arc<Disk>> {
        let backend = match record.spec.backend {
            Backend::Raw { direct } => open_raw(record, path, direct)?,
            Backend::Ftl { .. } => {
                let name = record.spec.name.clone();
                let ftl = self.ftl.as_ref().ok_or(CatalogError::NoFtl { name: name.clone() })?;
                let namespace = record.namespace();
                ftl.open(&self.backend_context(record, &namespace))
                    .map_err(|reason| CatalogError::Ftl { name, reason })?
            }
        };
        let name = record.spec.name.clone();
        let device = match &self.hook {
            Some(hook) => {
                let ctx = ChainContext {
                    spec: &record.spec,
                    id: &record.id,
                    namespace: &record.namespace(),
                    store: &self.store,
                    resolver: self.resolver(),
                };
                hook.build(&ctx, backend).map_err(|reason| CatalogError::Filters { name, reason })?
            }
            None if !record.spec.filters.is_empty() => return Err(CatalogError::NoFilterFramework { name }),
            None => backend,
        };
        Ok(Arc::new(Disk::new(&record.spec.name, &record.id, device)))
    }
}

fn open_raw(record: &DiskRecord, path: &Path, direct: bool) -> Result<Arc<dyn BlockDevice>> {
    let raw = RawFile::open(path, record.spec.block_size, record.spec.read_only, direct)
        .map_err(file_err("cannot open disk file", path))?;
    if raw.info().capacity != record.spec.size {
        return Err(CatalogError::Unavailable {
            name: record.spec.name.clone(),
            reason: format!(
                "{} has {} bytes, the catalog says {}",
                path.display(),
                raw.info().capacity,
                record.spec.size
            ),
        });
    }
    Ok(Arc::new(raw))
}

/// The largest disk, 64 TiB: more than any VM disk here needs, and a bound on the per-block state
/// the layers above keep (clone bitmaps, checksums, FTL maps).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// Checks a record read back from the store: its spec as at create, and an id the catalog made.
fn check_record(record: &DiskRecord) -> Result<()> {
    validate(&record.spec)?;
    if !is_id(&record.id) {
        return Err(CatalogError::BadId(record.id.clone()));
    }
    Ok(())
}

/// Checks a spec as a user wrote it.
pub fn validate(spec: &DiskSpec) -> Result<()> {
    let name = &spec.name;
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(CatalogError::InvalidName(name.clone()));
    }
    if !matches!(spec.block_size, 512 | 4096) {
        return Err(CatalogError::BadBlockSize(spec.block_size));
    }
    if spec.size == 0 {
        return Err(CatalogError::ZeroSize);
    }
    if spec.size % u64::from(spec.block_size) != 0 {
        return Err(CatalogError::SizeNotMultiple { size: spec.size, block_size: spec.block_size });
    }
    if spec.size > MAX_DISK_BYTES {
        return Err(CatalogError::TooLarge { size: spec.size, max: MAX_DISK_BYTES });
    }
    if let Backend::Ftl { over_provisioning } = spec.backend {
        if !(1..=400).contains(&over_provisioning) {
            return Err(CatalogError::BadOverProvisioning(over_provisioning));
        }
    }
    Ok(())
}

fn record_key(name: &str) -> String {
    format!("{RECORD_PREFIX}{name}")
}

fn record_json(record: &DiskRecord) -> Vec<u8> {
    // A record is plain strings and numbers: serialising it cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn file_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CatalogError + 'a {
    move |source| CatalogError::File { action, path: path.to_path_buf(), source }
}

/// A 64-bit random id in hex: names files and namespaces so that a re-created name never meets
/// its predecessor's leftovers.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the live array.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != 8 {
        // getrandom cannot fail for 8 bytes once the pool is initialised; fall back to the clock.
        bytes = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::IoBuf;

    fn spec(name: &str, size: u64) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            size,
            block_size: 512,
            read_only: false,
            backend: Backend::default(),
            filters: Vec::new(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn create_survives_reopen_and_delete_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let _guard = rt.enter();
        let id = {
            let store = Store::open(dir.path().join("db")).unwrap();
            let cat = Catalog::open(store, &dir.path().join("disks")).unwrap();
            let entry = cat.create(spec("vm0", 1 << 20)).unwrap();
            let disk = cat.disk("vm0").unwrap();
            rt.block_on(disk.write(0, IoBuf::copy_from(&[7; 512]), true)).unwrap();
            assert!(matches!(cat.create(spec("vm0", 1 << 20)), Err(CatalogError::NameTaken(_))));
            entry.record.id
        };
        let store = Store::open(dir.path().join("db")).unwrap();
        let cat = Catalog::open(store.clone(), &dir.path().join("disks")).unwrap();
        let disk = cat.disk("vm0").unwrap();
        assert_eq!(disk.id(), id);
        let back = rt.block_on(disk.read(0, IoBuf::zeroed(512))).unwrap();
        assert_eq!(back.as_slice(), &[7; 512]);
        {
            let _user = disk.acquire();
            assert!(matches!(cat.delete("vm0"), Err(CatalogError::InUse { .. })));
        }
        cat.delete("vm0").unwrap();
        assert!(matches!(cat.disk("vm0"), Err(CatalogError::NotFound(_))));
        assert!(!store.has_namespace(&format!("disk-{id}")));
        assert!(!dir.path().join(format!("disks/{id}.raw")).exists());
    }

    #[test]
    fn leftovers_of_an_interrupted_create_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let _guard = rt.enter();
        let store = Store::open(dir.path().join("db")).unwrap();
        let disks = dir.path().join("disks");
        std::fs::create_dir_all(&disks).unwrap();
        // A crash after the file and namespace were made but before the record was written.
        RawFile::create(&disks.join("00112233aabbccdd.raw"), 4096).unwrap();
        store.create_namespace("disk-00112233aabbccdd").unwrap();
        std::fs::write(disks.join("not-ours.txt"), b"keep").unwrap();
        let cat = Catalog::open(store.clone(), &disks).unwrap();
        assert!(cat.entries().is_empty());
        assert!(!store.has_namespace("disk-00112233aabbccdd"));
        assert!(!disks.join("00112233aabbccdd.raw").exists());
        assert!(disks.join("not-ours.txt").exists());
    }

    #[test]
    fn a_missing_file_leaves_the_disk_listed_but_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let _guard = rt.enter();
        let store = Store::open(dir.path().join("db")).unwrap();
        let disks = dir.path().join("disks");
        let path = {
            let cat = Catalog::open(store.clone(), &disks).unwrap();
            cat.create(spec("a", 4096)).unwrap();
            cat.create(spec("b", 4096)).unwrap().path
        };
        std::fs::remove_file(&path).unwrap();
        let cat = Catalog::open(store, &disks).unwrap();
        assert!(cat.disk("a").is_ok());
        let err = cat.disk("b").err().unwrap();
        assert!(matches!(err, CatalogError::Unavailable { .. }), "{err}");
        assert!(error_chain(&err).contains("No such file"), "{}", error_chain(&err));
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(matches!(validate(&spec("", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("../x", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("-x", 512)), Err(CatalogError::InvalidName(_))));
        assert!(matches!(validate(&spec("x", 0)), Err(CatalogError::ZeroSize)));
        assert!(matches!(validate(&spec("x", 1000)), Err(CatalogError::SizeNotMultiple { .. })));
        assert!(matches!(
            validate(&DiskSpec { block_size: 1024, ..spec("x", 4096) }),
            Err(CatalogError::BadBlockSize(1024))
        ));
        assert!(validate(&spec("vm-0.data_1", 4096)).is_ok());
        assert!(matches!(validate(&spec("x", MAX_DISK_BYTES + 512)), Err(CatalogError::TooLarge { .. })));
    }

    /// A filter framework with one rule: a disk redirects to another disk that exists.
    struct NoLoops;

    impl ChainHook for NoLoops {
        fn check(&self, spec: &DiskSpec, disks: &dyn DiskLookup) -> std::result::Result<(), String> {
            match self.targets(spec).into_iter().find(|t| *t == spec.name || disks.spec(t).is_none()) {
                Some(t) => Err(format!("bad parent {t:?}")),
                None => Ok(()),
            }
        }

        fn targets(&self, spec: &DiskSpec) -> Vec<String> {
            spec.filters.iter().filter_map(|f| f.options.get("parent")?.as_str().map(str::to_owned)).collect()
        }

        fn build(
            &self,
            _ctx: &ChainContext<'_>,
            backend: Arc<dyn BlockDevice>,
        ) -> std::result::Result<Arc<dyn BlockDevice>, String> {
            Ok(backend)
        }
    }

    #[test]
    fn records_read_back_have_their_filters_checked() {
        // Found by the catalog_record fuzz target: a record of a linked clone of itself (which
        // create refuses as a cycle) was opened, and its copy-on-read reads hung.
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let _guard = rt.enter();
        let store = Store::open(dir.path().join("db")).unwrap();
        let disks = dir.path().join("disks");
        let hook: Arc<dyn ChainHook> = Arc::new(NoLoops);
        let good =
            Catalog::open_with(store.clone(), &disks, Some(hook.clone())).unwrap().create(spec("good", 4096)).unwrap();
        let parent = |of: &str| FilterSpec {
            kind: "linked_clone".into(),
            order: None,
            options: [("parent".to_owned(), serde_json::Value::String(of.into()))].into_iter().collect(),
        };
        let mut record = DiskRecord { spec: spec("loop", 4096), id: "00112233aabbccdd".into(), ..good.record.clone() };
        record.spec.filters = vec![parent("loop")];
        RawFile::create(&disks.join(format!("{}.raw", record.id)), 4096).unwrap();
        store.create_namespace(&record.namespace()).unwrap();
        let mut batch = Batch::new();
        batch.put(CATALOG_NS, record_key("loop"), record_json(&record));
        store.commit(batch).unwrap();
        let cat = Catalog::open_with(store, &disks, Some(hook)).unwrap();
        assert!(cat.disk("good").is_ok());
        let err = cat.disk("loop").err().unwrap();
        assert!(error_chain(&err).contains("invalid catalog record: bad parent"), "{}", error_chain(&err));
    }

    #[test]
    fn damaged_records_leave_their_disk_unavailable_and_the_rest_working() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let _guard = rt.enter();
        let store = Store::open(dir.path().join("db")).unwrap();
        let disks = dir.path().join("disks");
        let (good, zero_block) = {
            let cat = Catalog::open(store.clone(), &disks).unwrap();
            (cat.create(spec("good", 4096)).unwrap(), cat.create(spec("zero-block", 4096)).unwrap())
        };
        // Records as a damaged store or another tool could leave them: a block size the disk file
        // cannot be divided by, a size past every bound, an id that walks out of the disk
        // directory.
        let damage = |name: &str, edit: &dyn Fn(&mut DiskRecord)| {
            let mut record = DiskRecord { spec: spec(name, 4096), ..good.record.clone() };
            edit(&mut record);
            let mut batch = Batch::new();
            batch.put(CATALOG_NS, record_key(name), record_json(&record));
            store.commit(batch).unwrap();
        };
        damage("zero-block", &|r| {
            *r = DiskRecord { spec: DiskSpec { block_size: 0, ..r.spec.clone() }, ..zero_block.record.clone() }
        });
        damage("huge", &|r| r.spec.size = u64::MAX - 511);
        damage("escape", &|r| r.id = "../../etc/passwd".into());
        let cat = Catalog::open(store.clone(), &disks).unwrap();
        assert!(cat.disk("good").is_ok());
        for name in ["zero-block", "huge", "escape"] {
            let err = cat.disk(name).err().unwrap();
            assert!(error_chain(&err).contains("invalid catalog record"), "{name}: {}", error_chain(&err));
        }
        // The damaged disk's data stays where it is until someone deletes it, and deleting the
        // one with a foreign id touches nothing outside the catalog.
        assert!(zero_block.path.exists());
        assert!(store.has_namespace(&zero_block.record.namespace()));
        cat.delete("escape").unwrap();
        assert!(good.path.exists());
    }
}
