//! Indexing the layers of a mount: a registry failure on the way costs only the bytes that were
//! missing, damaged bytes are fetched again, a gzip layer is fetched in large runs ahead of the
//! indexer, and the layers of an image are indexed side by side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fuse_lazypull::cache::{BlobCache, CacheConfig, RangeSource};
use fuse_lazypull::layer::Limits;
use fuse_lazypull::mount::{index_layers, layer_index, MountError};
use fuse_lazypull::registry::RegistryError;
use layer_support::{descriptor, gzip, random_bytes, Tar, E};

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
    layer_of(6, 0x9e37_79b9_7f4a_7c15)
}

/// A gzip layer of `files` incompressible files of 400 kB.
fn layer_of(files: usize, seed: u64) -> Vec<u8> {
    let names: Vec<String> = (0..files).map(|i| format!("f{i}")).collect();
    let files: Vec<Vec<u8>> = (0..files as u64).map(|i| random_bytes(400_000, seed + i)).collect();
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

/// A registry in memory that counts its ranged GETs.
struct Counting {
    data: Vec<u8>,
    gets: AtomicU32,
}

impl RangeSource for Counting {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        Ok(self.data[range.start as usize..range.end as usize].to_vec())
    }
}

/// A gzip layer is read whole to be indexed: it is fetched in large runs ahead of the indexer's
/// 256 KiB reads (a GET for each of those before), and kept verified.
#[test]
fn a_gzip_layer_is_fetched_ahead_of_its_indexer() {
    let data = layer_of(28, 7);
    let size = data.len() as u64;
    assert!(size > 10 << 20);
    let source = Arc::new(Counting { data, gets: AtomicU32::new(0) });
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), CacheConfig::default()).unwrap();
    let desc = descriptor(&source.data, &[]);
    let blob = cache.blob_from(&desc, Arc::clone(&source) as Arc<dyn RangeSource>).unwrap();
    layer_index(&cache, &desc, &blob, &Limits::DEFAULT).unwrap();
    let gets = source.gets.load(Ordering::SeqCst);
    assert!(gets < 12, "{gets} GETs for {size} bytes");
    assert!(blob.is_complete(), "verified and kept");
}

/// The first GET of one layer waits (up to 20 s, then gives up) until the other layer has been
/// asked for: indexed one after the other, the first layer would give up.
struct Rendezvous {
    data: Vec<u8>,
    first: bool,
    met: Arc<(Mutex<bool>, Condvar)>,
    gave_up: Arc<std::sync::atomic::AtomicBool>,
}

impl RangeSource for Rendezvous {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        let (met, changed) = &*self.met;
        let mut met_now = met.lock().unwrap();
        if self.first {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !*met_now && Instant::now() < deadline {
                met_now = changed.wait_timeout(met_now, Duration::from_millis(100)).unwrap().0;
            }
            if !*met_now {
                self.gave_up.store(true, Ordering::SeqCst);
            }
        } else {
            *met_now = true;
            changed.notify_all();
        }
        Ok(self.data[range.start as usize..range.end as usize].to_vec())
    }
}

#[test]
fn the_layers_of_an_image_are_indexed_side_by_side() {
    let met = Arc::new((Mutex::new(false), Condvar::new()));
    let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let layers = [layer_of(2, 11), layer_of(2, 12)];
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), CacheConfig::default()).unwrap();
    let descs: Vec<_> = layers.iter().map(|l| descriptor(l, &[])).collect();
    let blobs: Vec<_> = layers
        .iter()
        .zip(&descs)
        .enumerate()
        .map(|(i, (data, desc))| {
            let source =
                Rendezvous { data: data.clone(), first: i == 0, met: Arc::clone(&met), gave_up: Arc::clone(&gave_up) };
            cache.blob_from(desc, Arc::new(source)).unwrap()
        })
        .collect();
    let indexes = index_layers(&cache, &descs, &blobs, &Limits::DEFAULT).unwrap();
    assert_eq!(indexes.len(), 2);
    assert_eq!(indexes[1].entries[0].path, std::path::Path::new("f0"));
    assert!(!gave_up.load(Ordering::SeqCst), "the second layer was indexed while the first waited");
}

/// The layers of an image together are bounded: their declared size before a blob is read,
/// their entries as each layer is indexed.
#[test]
fn an_image_over_its_limits_is_refused() {
    let layers = [layer_of(2, 21), layer_of(2, 22)];
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), CacheConfig::default()).unwrap();
    let descs: Vec<_> = layers.iter().map(|l| descriptor(l, &[])).collect();
    let blobs: Vec<_> = layers
        .iter()
        .zip(&descs)
        .map(|(data, desc)| {
            let source = Flaky {
                data: data.clone(),
                fail_at: u64::MAX,
                failures: AtomicU32::new(0),
                damage: AtomicU32::new(0),
                fetched: AtomicU64::new(0),
            };
            cache.blob_from(desc, Arc::new(source)).unwrap()
        })
        .collect();
    let bytes: u64 = descs.iter().map(|d| d.size).sum();
    let small = Limits { max_image_bytes: bytes - 1, ..Limits::DEFAULT };
    let err = index_layers(&cache, &descs, &blobs, &small).unwrap_err();
    assert!(matches!(&err, MountError::ImageLimits(why) if why.contains("bytes")), "{err:?}");
    assert!(blobs.iter().all(|b| b.local_bytes() == 0), "nothing was fetched");
    let few = Limits { max_image_entries: 3, ..Limits::DEFAULT };
    let err = index_layers(&cache, &descs, &blobs, &few).unwrap_err();
    assert!(matches!(&err, MountError::ImageLimits(why) if why.contains("more than 3 entries")), "{err:?}");
    assert_eq!(index_layers(&cache, &descs, &blobs, &Limits::DEFAULT).unwrap().len(), 2);
}
