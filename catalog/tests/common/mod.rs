//! Helpers of io-filters' tests: a catalog with the filter framework in a temporary directory,
//! and disk specs.
#![allow(dead_code)]

use std::sync::Arc;

use io_filters::FilterFramework;
use state_store::Store;
use vdisk::catalog::Backend;
use vdisk::{BlockDevice, Catalog, DiskSpec, FilterSpec, IoBuf};

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub framework: Arc<FilterFramework>,
    pub catalog: Arc<Catalog>,
}

impl Rig {
    /// Call inside a tokio runtime context.
    pub fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let framework = FilterFramework::new();
        let catalog = Rig::open_catalog(&dir, &framework);
        Rig { dir, framework, catalog }
    }

    fn open_catalog(dir: &tempfile::TempDir, framework: &Arc<FilterFramework>) -> Arc<Catalog> {
        let store = Store::open(dir.path().join("db")).unwrap();
        Arc::new(Catalog::open_with(store, &dir.path().join("disks"), Some(framework.clone())).unwrap())
    }

    /// Drops the catalog (no flush: as a crash leaves it, but for the page cache) and opens it
    /// again with a fresh framework.
    pub fn reopen(&mut self) {
        // The old catalog and framework (and the store they hold) must go before the store is
        // opened again.
        drop(std::mem::replace(&mut self.catalog, Rig::open_catalog_tmp()));
        self.framework = FilterFramework::new();
        self.catalog = Rig::open_catalog(&self.dir, &self.framework);
    }

    fn open_catalog_tmp() -> Arc<Catalog> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        let catalog = Arc::new(Catalog::open(store, &dir.path().join("disks")).unwrap());
        drop(dir);
        catalog
    }

    pub fn dev(&self, name: &str) -> Arc<vdisk::Disk> {
        self.catalog.disk(name).unwrap()
    }
}

pub fn spec(name: &str, size: u64, filters: Vec<FilterSpec>) -> DiskSpec {
    DiskSpec { name: name.into(), size, block_size: 512, read_only: false, backend: Backend::default(), filters }
}

/// A filter entry from JSON options, e.g. `filter("throttle", json!({"iops": 10}))`.
pub fn filter(kind: &str, options: serde_json::Value) -> FilterSpec {
    let options = match options {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    FilterSpec { kind: kind.into(), order: None, options }
}

pub fn clone_of(parent: &str) -> FilterSpec {
    filter(io_filters::LINKED_CLONE, serde_json::json!({ "parent": parent }))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Result<Vec<u8>, vdisk::BlockError> {
    dev.read(offset, IoBuf::zeroed(len)).await.map(|b| b.as_slice().to_vec())
}

pub async fn write(dev: &dyn BlockDevice, offset: u64, data: &[u8], fua: bool) -> Result<(), vdisk::BlockError> {
    dev.write(offset, IoBuf::copy_from(data), fua).await.map(drop)
}

/// A disk in memory, for tests that need no files.
pub struct MemDisk {
    pub data: std::sync::Mutex<Vec<u8>>,
    pub info: vdisk::DeviceInfo,
}

impl MemDisk {
    pub fn new(capacity: u64, block_size: u32) -> MemDisk {
        MemDisk {
            data: std::sync::Mutex::new(vec![0; capacity as usize]),
            info: vdisk::DeviceInfo { capacity, block_size, read_only: false },
        }
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> vdisk::DeviceInfo {
        self.info
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> vdisk::IoFuture<'_, IoBuf> {
        let data = self.data.lock().unwrap();
        let len = buf.len();
        buf.as_mut_slice().copy_from_slice(&data[offset as usize..offset as usize + len]);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> vdisk::IoFuture<'_, IoBuf> {
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf.as_slice());
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> vdisk::IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, offset: u64, len: u64) -> vdisk::IoFuture<'_, ()> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> vdisk::IoFuture<'_, ()> {
        self.discard(offset, len)
    }
}
