//! Durable metadata for vstor, on RocksDB.
//!
//! Every VM or disk owns one *namespace*, so that no two owners' state is ever mixed: a namespace
//! is reachable only by its name, and dropping it removes everything it held. Changes are grouped
//! in [`Batch`]es that are applied atomically and synced to disk before [`Store::commit`] returns.
//!
//! A namespace is a key range of one column family: its keys are stored behind its name and a
//! zero byte, which no name holds, so no two namespaces' ranges meet, and every call names the
//! namespace it reads or writes. A column family per namespace, as earlier versions kept, made
//! each create cost more the more namespaces there were (RocksDB rewrites and re-reads the options
//! of every column family on each new one): 35 ms at 200 disks, 80 ms at 400. Now creating or
//! dropping one is a single synced write whatever their number. Stores in the old layout are
//! moved over when opened.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use rocksdb::{ColumnFamilyDescriptor, DBWithThreadMode, MultiThreaded, Options, WriteOptions};

/// The column family RocksDB always has: the store's registry of namespaces.
const DEFAULT_CF: &str = "default";
/// The column family every namespace's keys live in.
const DATA_CF: &str = "data";
/// Registry keys: this prefix, then a namespace's name.
const REGISTRY_PREFIX: &[u8] = b"ns/";
/// The longest namespace name.
const MAX_NAME: usize = 255;
/// Records moved per batch when an old store is converted.
const MOVE_BATCH: usize = 4096;

/// Everything that can go wrong with the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("namespace {0:?} does not exist")]
    NoSuchNamespace(String),
    #[error("namespace {0:?} already exists")]
    NamespaceExists(String),
    #[error("namespace name {0:?} is reserved or empty")]
    BadNamespaceName(String),
    #[error("state store operation failed")]
    Db(#[from] rocksdb::Error),
    #[error("cannot make {path} private to the daemon's user")]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bounded scan found more records than its caller allows: the namespace holds more than
    /// the code ever writes there, so it was damaged or written by something else.
    #[error("more than {max} records under {prefix:?} in namespace {namespace:?}")]
    TooMany { namespace: String, prefix: String, max: usize },
    #[error("cannot create checkpoint at {path}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

type Db = DBWithThreadMode<MultiThreaded>;

/// A RocksDB database holding namespaces.
pub struct Store {
    db: Db,
    path: PathBuf,
    /// The namespaces that exist. Commits hold it shared while they write, creating and dropping
    /// hold it alone, so that no write lands in a namespace being dropped.
    names: RwLock<BTreeSet<String>>,
}

/// A set of changes across namespaces that [`Store::commit`] applies all or nothing.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(String, Op)>,
}

enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, namespace: &str, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let op = Op::Put(key.as_ref().to_vec(), value.as_ref().to_vec());
        self.ops.push((namespace.to_owned(), op));
    }

    pub fn delete(&mut self, namespace: &str, key: impl AsRef<[u8]>) {
        self.ops.push((namespace.to_owned(), Op::Delete(key.as_ref().to_vec())));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Creates a directory (and its missing parents) that only its owner may enter, or makes an
/// existing one so: a VM's data and the daemon's state are nobody else's to read, whatever the
/// umask. Files inside need no mode of their own to be out of others' reach.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store at `path` with every namespace it already holds.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Store>> {
        let path = path.as_ref().to_path_buf();
        private_dir(&path).map_err(|source| StoreError::Private { path: path.clone(), source })?;
        let open_err = |source| StoreError::Open { path: path.clone(), source };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut families = match Db::list_cf(&opts, &path) {
            Ok(names) => names,
            // A new store has no column families yet.
            Err(_) if !path.join("CURRENT").exists() => vec![DEFAULT_CF.to_owned()],
            Err(e) => return Err(open_err(e)),
        };
        if !families.iter().any(|f| f == DATA_CF) {
            families.push(DATA_CF.to_owned());
        }
        let descriptors = families.iter().map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = Db::open_cf_descriptors(&opts, &path, descriptors).map_err(open_err)?;
        let store = Store { db, path, names: RwLock::new(BTreeSet::new()) };
        for family in families.iter().filter(|f| *f != DEFAULT_CF && *f != DATA_CF) {
            store.move_old_family(family)?;
        }
        let mut names = BTreeSet::new();
        let registry = store.db.iterator(rocksdb::IteratorMode::From(REGISTRY_PREFIX, rocksdb::Direction::Forward));
        for item in registry {
            let (key, _) = item?;
            let Some(name) = key.strip_prefix(REGISTRY_PREFIX) else { break };
            names.insert(String::from_utf8_lossy(name).into_owned());
        }
        *plumbing::lock::write(&store.names) = names;
        Ok(Arc::new(store))
    }

    /// Moves a namespace kept as a column family of its own (the layout of earlier versions)
    /// into the shared one, then drops the family. A crash part way leaves the family, and the
    /// next open moves it again: the copies are the same keys with the same values.
    fn move_old_family(&self, family: &str) -> Result<()> {
        let (Some(old), Some(data)) = (self.db.cf_handle(family), self.db.cf_handle(DATA_CF)) else {
            return Ok(());
        };
        let mut wb = rocksdb::WriteBatchWithTransaction::<false>::default();
        wb.put(registry_key(family), []);
        for item in self.db.iterator_cf(&old, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            wb.put_cf(&data, data_key(family, &k), v);
            if wb.len() >= MOVE_BATCH {
                self.write_synced(std::mem::take(&mut wb))?;
            }
        }
        self.write_synced(wb)?;
        drop(old);
        self.db.drop_cf(family)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of all namespaces, sorted.
    pub fn namespaces(&self) -> Result<Vec<String>> {
        Ok(self.names().iter().cloned().collect())
    }

    pub fn has_namespace(&self, name: &str) -> bool {
        self.names().contains(name)
    }

    /// Creates an empty namespace. Creation is durable when this returns.
    pub fn create_namespace(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let mut names = plumbing::lock::write(&self.names);
        if names.contains(name) {
            return Err(StoreError::NamespaceExists(name.to_owned()));
        }
        let mut wb = rocksdb::WriteBatchWithTransaction::<false>::default();
        wb.put(registry_key(name), []);
        self.write_synced(wb)?;
        names.insert(name.to_owned());
        Ok(())
    }

    /// Drops a namespace and everything in it, in one synced write.
    pub fn drop_namespace(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let mut names = plumbing::lock::write(&self.names);
        if !names.contains(name) {
            return Err(StoreError::NoSuchNamespace(name.to_owned()));
        }
        let data = self.data()?;
        let mut wb = rocksdb::WriteBatchWithTransaction::<false>::default();
        wb.delete(registry_key(name));
        wb.delete_range_cf(&data, data_key(name, &[]), range_end(name));
        self.write_synced(wb)?;
        names.remove(name);
        Ok(())
    }

    pub fn get(&self, namespace: &str, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.check_exists(&self.names(), namespace)?;
        Ok(self.db.get_cf(&self.data()?, data_key(namespace, key.as_ref()))?)
    }

    /// Calls `f` with each pair of a namespace whose key starts with `prefix`, in key order,
    /// one at a time (nothing is collected). Fails with [`StoreError::TooMany`], before `f` sees
    /// it, at the match past the first `max`: a caller that allocates per record states up
    /// front how many records it can take.
    pub fn for_each_prefix<E: From<StoreError>>(
        &self,
        namespace: &str,
        prefix: impl AsRef<[u8]>,
        max: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let prefix = prefix.as_ref();
        self.check_exists(&self.names(), namespace)?;
        let start = data_key(namespace, prefix);
        let skip = namespace.len() + 1;
        let data = self.data()?;
        let iter = self.db.iterator_cf(&data, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for (seen, item) in iter.enumerate() {
            let (k, v) = item.map_err(StoreError::from)?;
            if !k.starts_with(&start) {
                break;
            }
            if seen == max {
                return Err(StoreError::TooMany {
                    namespace: namespace.to_owned(),
                    prefix: String::from_utf8_lossy(prefix).into_owned(),
                    max,
                }
                .into());
            }
            f(&k[skip..], &v)?;
        }
        Ok(())
    }

    /// [`Store::scan_prefix`] for at most `max` pairs: more is [`StoreError::TooMany`].
    pub fn scan_prefix_limit(
        &self,
        namespace: &str,
        prefix: impl AsRef<[u8]>,
        max: usize,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut out = BTreeMap::new();
        self.for_each_prefix(namespace, prefix, max, |k, v| {
            out.insert(k.to_vec(), v.to_vec());
            Ok::<(), StoreError>(())
        })?;
        Ok(out)
    }

    /// All pairs of a namespace whose key starts with `prefix`, in key order. Unbounded: for
    /// prefixes whose record count the caller cannot bound, prefer [`Store::scan_prefix_limit`].
    pub fn scan_prefix(&self, namespace: &str, prefix: impl AsRef<[u8]>) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        self.scan_prefix_limit(namespace, prefix, usize::MAX)
    }

    /// Applies a batch atomically and syncs the write-ahead log before returning.
    pub fn commit(&self, batch: Batch) -> Result<()> {
        let names = self.names();
        let data = self.data()?;
        let mut wb = rocksdb::WriteBatchWithTransaction::<false>::default();
        for (ns, op) in &batch.ops {
            self.check_exists(&names, ns)?;
            match op {
                Op::Put(k, v) => wb.put_cf(&data, data_key(ns, k), v),
                Op::Delete(k) => wb.delete_cf(&data, data_key(ns, k)),
            }
        }
        // Written while the namespaces are held shared: none of them can be dropped meanwhile.
        self.write_synced(wb)
    }

    /// Writes a consistent copy of the whole store to `path`, which must not exist yet.
    pub fn checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let err = |source| StoreError::Checkpoint { path: path.to_path_buf(), source };
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(err)?;
        cp.create_checkpoint(path).map_err(err)
    }

    fn names(&self) -> RwLockReadGuard<'_, BTreeSet<String>> {
        plumbing::lock::read(&self.names)
    }

    fn check_exists(&self, names: &BTreeSet<String>, namespace: &str) -> Result<()> {
        match names.contains(namespace) {
            true => Ok(()),
            false => Err(StoreError::NoSuchNamespace(namespace.to_owned())),
        }
    }

    fn data(&self) -> Result<Arc<rocksdb::BoundColumnFamily<'_>>> {
        self.db.cf_handle(DATA_CF).ok_or_else(|| StoreError::NoSuchNamespace(DATA_CF.to_owned()))
    }

    fn write_synced(&self, wb: rocksdb::WriteBatchWithTransaction<false>) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(wb, &opts)?;
        Ok(())
    }
}

/// A namespace name: not empty, at most [`MAX_NAME`] bytes, without the zero byte that ends it in
/// keys.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(StoreError::BadNamespaceName(name.to_owned()));
    }
    Ok(())
}

fn registry_key(name: &str) -> Vec<u8> {
    [REGISTRY_PREFIX, name.as_bytes()].concat()
}

/// Where `key` of `namespace` is stored: the name, a zero byte, the key.
fn data_key(namespace: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + 1 + key.len());
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

/// The first key past every key of `namespace`.
fn range_end(namespace: &str) -> Vec<u8> {
    let mut out = namespace.as_bytes().to_vec();
    out.push(1);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn namespaces_are_isolated_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.create_namespace("vm-a").unwrap();
            store.create_namespace("vm-b").unwrap();
            let mut batch = Batch::new();
            batch.put("vm-a", "k", "a");
            batch.put("vm-b", "k", "b");
            store.commit(batch).unwrap();
            assert!(matches!(store.create_namespace("vm-a"), Err(StoreError::NamespaceExists(_))));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.namespaces().unwrap(), vec!["vm-a", "vm-b"]);
        assert_eq!(store.get("vm-a", "k").unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(store.get("vm-b", "k").unwrap().as_deref(), Some(&b"b"[..]));
        store.drop_namespace("vm-a").unwrap();
        assert!(matches!(store.get("vm-a", "k"), Err(StoreError::NoSuchNamespace(_))));
        // Re-creating a dropped namespace gives an empty one: nothing of the old owner is readable.
        store.create_namespace("vm-a").unwrap();
        assert_eq!(store.get("vm-a", "k").unwrap(), None);
    }

    #[test]
    fn a_batch_naming_a_missing_namespace_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_namespace("vm-a").unwrap();
        let mut batch = Batch::new();
        batch.put("vm-a", "k", "v");
        batch.put("missing", "k", "v");
        assert!(matches!(store.commit(batch), Err(StoreError::NoSuchNamespace(_))));
        assert_eq!(store.get("vm-a", "k").unwrap(), None);
        assert!(matches!(store.create_namespace("a\0b"), Err(StoreError::BadNamespaceName(_))));
        assert!(matches!(store.create_namespace(""), Err(StoreError::BadNamespaceName(_))));
    }

    #[test]
    fn a_name_that_starts_another_reaches_none_of_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for ns in ["a", "ab", "a.b"] {
            store.create_namespace(ns).unwrap();
            let mut batch = Batch::new();
            batch.put(ns, "k", ns);
            batch.put(ns, "", "empty key");
            store.commit(batch).unwrap();
        }
        assert_eq!(store.scan_prefix("a", "").unwrap().len(), 2);
        assert_eq!(store.get("a", "k").unwrap().as_deref(), Some(&b"a"[..]));
        store.drop_namespace("a").unwrap();
        assert_eq!(store.get("ab", "k").unwrap().as_deref(), Some(&b"ab"[..]));
        assert_eq!(store.scan_prefix("a.b", "").unwrap().len(), 2);
    }

    #[test]
    fn a_store_with_a_column_family_per_namespace_is_moved_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout of earlier versions, written with RocksDB directly.
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let db = Db::open(&opts, dir.path()).unwrap();
            for (ns, n) in [("disk-1", 3u32), ("catalog", 10_000)] {
                db.create_cf(ns, &Options::default()).unwrap();
                let cf = db.cf_handle(ns).unwrap();
                for i in 0..n {
                    db.put_cf(&cf, format!("k{i:05}"), i.to_le_bytes()).unwrap();
                }
            }
            db.flush().unwrap();
            drop(db);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.namespaces().unwrap(), ["catalog", "disk-1"]);
        assert_eq!(store.get("disk-1", "k00002").unwrap().as_deref(), Some(&2u32.to_le_bytes()[..]));
        assert_eq!(store.scan_prefix("catalog", "k").unwrap().len(), 10_000);
        drop(store);
        let families = Db::list_cf(&Options::default(), dir.path()).unwrap();
        assert_eq!(families, [DEFAULT_CF, DATA_CF], "the old families are gone");
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.scan_prefix("disk-1", "").unwrap().len(), 3);
    }

    #[test]
    fn checkpoint_is_a_readable_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        store.create_namespace("d").unwrap();
        let mut batch = Batch::new();
        batch.put("d", "x", "1");
        store.commit(batch).unwrap();
        store.checkpoint(dir.path().join("cp")).unwrap();
        let copy = Store::open(dir.path().join("cp")).unwrap();
        assert_eq!(copy.get("d", "x").unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn a_bounded_scan_fails_past_its_bound_and_streams_within_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_namespace("d").unwrap();
        let mut batch = Batch::new();
        for i in 0..10_001u32 {
            batch.put("d", format!("p/{i:08}"), i.to_le_bytes());
        }
        batch.put("d", "q/other", "x");
        store.commit(batch).unwrap();
        match store.scan_prefix_limit("d", "p/", 10_000) {
            Err(StoreError::TooMany { max: 10_000, prefix, .. }) => assert_eq!(prefix, "p/"),
            other => panic!("expected TooMany, got {:?}", other.map(|m| m.len())),
        }
        assert_eq!(store.scan_prefix_limit("d", "p/", 10_001).unwrap().len(), 10_001);
        // The streaming form stops at the bound before handing the extra record over.
        let mut seen = 0;
        let r = store.for_each_prefix("d", "p/", 5, |k, _| {
            assert!(k.starts_with(b"p/"));
            seen += 1;
            Ok::<(), StoreError>(())
        });
        assert!(matches!(r, Err(StoreError::TooMany { max: 5, .. })), "{r:?}");
        assert_eq!(seen, 5);
        // The caller's own error stops the scan too.
        let r: std::result::Result<(), StoreError> =
            store.for_each_prefix("d", "q/", 1, |_, _| Err(StoreError::BadNamespaceName("stop".into())));
        assert!(matches!(r, Err(StoreError::BadNamespaceName(_))));
        assert_eq!(store.scan_prefix_limit("d", "none/", 0).unwrap().len(), 0);
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Put(u8, u8, u8),
        Delete(u8, u8),
        Drop(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            (0..3u8, 0..8u8, any::<u8>()).prop_map(|(n, k, v)| ModelOp::Put(n, k, v)),
            (0..3u8, 0..8u8).prop_map(|(n, k)| ModelOp::Delete(n, k)),
            (0..3u8).prop_map(ModelOp::Drop),
            Just(ModelOp::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The store behaves as a map of maps across puts, deletes, drops and reopens.
        #[test]
        fn behaves_like_a_map_of_maps(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path()).unwrap();
            let mut model: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
            for op in ops {
                match op {
                    ModelOp::Put(n, k, v) => {
                        let ns = format!("ns{n}");
                        if !store.has_namespace(&ns) { store.create_namespace(&ns).unwrap(); }
                        let mut b = Batch::new();
                        b.put(&ns, [k], [v]);
                        store.commit(b).unwrap();
                        model.entry(ns).or_default().insert(vec![k], vec![v]);
                    }
                    ModelOp::Delete(n, k) => {
                        let ns = format!("ns{n}");
                        if let Some(m) = model.get_mut(&ns) {
                            let mut b = Batch::new();
                            b.delete(&ns, [k]);
                            store.commit(b).unwrap();
                            m.remove(&vec![k]);
                        }
                    }
                    ModelOp::Drop(n) => {
                        let ns = format!("ns{n}");
                        let existed = model.remove(&ns).is_some();
                        prop_assert_eq!(store.drop_namespace(&ns).is_ok(), existed);
                    }
                    ModelOp::Reopen => {
                        drop(store);
                        store = Store::open(dir.path()).unwrap();
                    }
                }
            }
            prop_assert_eq!(store.namespaces().unwrap(), model.keys().cloned().collect::<Vec<_>>());
            for (ns, m) in &model {
                prop_assert_eq!(&store.scan_prefix(ns, []).unwrap(), m);
            }
        }
    }
}
