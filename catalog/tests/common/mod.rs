//! Helpers of the catalog's tests: a catalog with the filter framework in a temporary directory,
//! and disk specs.
#![allow(dead_code)]

use std::sync::Arc;

use catalog::{Backend, Catalog, DiskSpec};
use io_filters::{FilterFramework, FilterSpec};
use state_store::Store;

#[allow(unused_imports)]
pub use test_support::{read, runtime, write, MemDisk};

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub catalog: Arc<Catalog>,
}

impl Rig {
    /// Call inside a tokio runtime context.
    pub fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Rig::open_catalog(&dir);
        Rig { dir, catalog }
    }

    fn open_catalog(dir: &tempfile::TempDir) -> Arc<Catalog> {
        let store = Store::open(dir.path().join("db")).unwrap();
        Arc::new(Catalog::open(store, &dir.path().join("disks"), FilterFramework::new(), None).unwrap())
    }

    /// The catalog's filter framework.
    pub fn framework(&self) -> &Arc<FilterFramework> {
        self.catalog.filters()
    }

    /// Drops the catalog (no flush: as a crash leaves it, but for the page cache) and opens it
    /// again with a fresh framework.
    pub fn reopen(&mut self) {
        // The old catalog (and the store it holds) must go before the store is opened again.
        let scratch = tempfile::tempdir().unwrap();
        drop(std::mem::replace(&mut self.catalog, Rig::open_catalog(&scratch)));
        self.catalog = Rig::open_catalog(&self.dir);
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
