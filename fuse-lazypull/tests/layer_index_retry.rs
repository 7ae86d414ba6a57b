//! Indexing a layer whose download fails on the way: a registry failure costs only the bytes
//! that were missing, damaged bytes are fetched again.

mod layer_support;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_lazypull::cache::{BlobCache, CacheConfig, RangeSource};
use fuse_lazypull::layer::Limits;
use fuse_lazypull::mount::layer_index;
use fuse_lazypull::registry::RegistryError;
use layer_support::{descriptor, gzip, Tar, E};

/// A registry in memory whose fetches reaching byte `fail_at` fail (`failures` times) or come
/// back damaged (`damage` times).
struct Flaky {
    data: Vec<u8>,
    fail_at: u64,
    failures: AtomicU32,
    damage: AtomicU32,
    fetched: AtomicU64,
}

impl RangeSource for Flaky {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        let hit = range.contains(&self.fail_at);
        let take =
            |n: &AtomicU32| hit && n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1)).is_ok();
        if take(&self.failures) {
            return Err(RegistryError::Config("connection reset".into()));
        }
        self.fetched.fetch_add(range.end - range.start, Ordering::SeqCst);
        let mut out = self.data[range.start as usize..range.end as usize].to_vec();
        if take(&self.damage) {
            out[(self.fail_at - range.start) as usize] ^= 0xff;
        }
        Ok(out)
    }
}

/// A gzip layer of incompressible files, about 2.4 MB.
fn layer() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let files: Vec<Vec<u8>> = (0..6).map(|_| random(400_000)).collect();
    let names: Vec<String> = (0..6).map(|i| format!("f{i}")).collect();
    let mut tar = Tar::default();
    for (name, data) in names.iter().zip(&files) {
        tar.add(E::file(name, data));
    }
    gzip(&tar.finish())
}

fn index_through(source: Arc<Flaky>) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(
        dir.path(),
        CacheConfig { size_limit: u64::MAX, fetch_timeout: Duration::from_secs(10), ..CacheConfig::default() },
    )
    .unwrap();
    let desc = descriptor(&source.data, &[]);
    let blob = cache.blob_from(&desc, source).unwrap();
    layer_index(&cache, &desc, &blob, &Limits::DEFAULT).map(|_| ()).map_err(|e| fuse_lazypull::error::chain(&e))
}

/// A fetch that fails halfway through the layer is retried; what was fetched before stays.
#[test]
fn a_registry_failure_while_indexing_keeps_what_was_fetched() {
    let data = layer();
    let size = data.len() as u64;
    let source = Arc::new(Flaky {
        fail_at: size / 2,
        failures: AtomicU32::new(1),
        damage: AtomicU32::new(0),
        fetched: AtomicU64::new(0),
        data,
    });
    index_through(Arc::clone(&source)).unwrap();
    assert_eq!(source.failures.load(Ordering::SeqCst), 0, "the fetch failed once");
    assert_eq!(source.fetched.load(Ordering::SeqCst), size, "every byte fetched once");
}

/// A damaged byte makes the layer fail its digest: the whole layer is fetched again.
#[test]
fn damage_while_indexing_fetches_the_layer_again() {
    let data = layer();
    let size = data.len() as u64;
    let source = Arc::new(Flaky {
        fail_at: size / 2,
        failures: AtomicU32::new(0),
        damage: AtomicU32::new(1),
        fetched: AtomicU64::new(0),
        data,
    });
    index_through(Arc::clone(&source)).unwrap();
    assert_eq!(source.damage.load(Ordering::SeqCst), 0, "one fetch was damaged");
    assert_eq!(source.fetched.load(Ordering::SeqCst), 2 * size, "fetched again, whole");
}
