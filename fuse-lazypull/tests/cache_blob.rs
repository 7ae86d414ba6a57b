//! The blob cache against sources in memory: random ranged reads (single and concurrent) compared
//! with the blob's bytes, each chunk fetched once, a corrupt blob refused and fetched again, a
//! stalled source giving a timeout, one `Blob` per digest, readers racing the adoption of a blob
//! another process published, derived data, and gc under a limit with what keeps content: pins,
//! holds (of live processes only), the grace period and overlays using unpacked layers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod alloc_counter;
mod layer_support;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuse_lazypull::cache::{Blob, BlobCache, CacheConfig, CacheError, RangeSource, CHUNK};
use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::BlobSource;
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Descriptor, RegistryError};
use layer_support::random_bytes;
use proptest::prelude::*;

/// A blob in memory that can corrupt its first answers, stall, or fail, and records what it
/// was asked for.
#[derive(Default)]
struct MemSource {
    data: Vec<u8>,
    /// This many fetches get one byte flipped.
    corrupt_fetches: AtomicU32,
    fail: std::sync::atomic::AtomicBool,
    stalled: Mutex<bool>,
    unstall: Condvar,
    /// Fetches held by the stall now, and the most at once.
    waiting: AtomicU32,
    most_waiting: AtomicU32,
    requests: Mutex<Vec<Range<u64>>>,
    bytes: AtomicU64,
}

impl MemSource {
    fn new(data: Vec<u8>) -> Arc<MemSource> {
        Arc::new(MemSource { data, ..Default::default() })
    }
    fn stall(&self, on: bool) {
        *self.stalled.lock().unwrap() = on;
        self.unstall.notify_all();
    }
}

impl RangeSource for MemSource {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        let mut stalled = self.stalled.lock().unwrap();
        if *stalled {
            let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_waiting.fetch_max(now, Ordering::SeqCst);
            while *stalled {
                stalled = self.unstall.wait(stalled).unwrap();
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        drop(stalled);
        if self.fail.load(Ordering::SeqCst) {
            return Err(RegistryError::Config("source is down".into()));
        }
        self.requests.lock().unwrap().push(range.clone());
        self.bytes.fetch_add(range.end - range.start, Ordering::SeqCst);
        let mut out = self.data[range.start as usize..range.end as usize].to_vec();
        if self.corrupt_fetches.load(Ordering::SeqCst) > 0 && !out.is_empty() {
            self.corrupt_fetches.fetch_sub(1, Ordering::SeqCst);
            out[0] ^= 0xff;
        }
        Ok(out)
    }
}

fn desc(data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: "application/octet-stream".into(),
        digest: Digest::of(data),
        size: data.len() as u64,
        annotations: BTreeMap::new(),
    }
}

fn config(timeout: Duration) -> CacheConfig {
    CacheConfig { size_limit: u64::MAX, fetch_timeout: timeout, gc_grace: Duration::ZERO }
}

fn read(blob: &dyn BlobSource, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    blob.read_at(offset, &mut buf).unwrap();
    buf
}

#[derive(Clone, Debug)]
enum Op {
    Read(u64, usize),
    Discard(u64, u64),
    FetchAll,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..=size, 0usize..200_000).prop_map(move |(o, l)| Op::Read(o, l.min((size - o) as usize))),
        1 => (0..=size, 0u64..200_000).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::FetchAll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every read returns the blob's bytes, whatever was fetched, discarded or completed before.
    #[test]
    fn random_reads_match_the_blob((size, ops) in (0u64..700_000).prop_flat_map(|s| (Just(s), prop::collection::vec(op(s), 1..30)))) {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
        let data = random_bytes(size as usize, size + 7);
        let source = MemSource::new(data.clone());
        let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
        for op in ops {
            match op {
                Op::Read(o, l) => prop_assert_eq!(&read(&*blob, o, l)[..], &data[o as usize..o as usize + l]),
                Op::Discard(o, l) => blob.discard(o, l),
                Op::FetchAll => {
                    blob.fetch_all().unwrap();
                    prop_assert!(blob.is_complete());
                    let path = blob.path().unwrap();
                    prop_assert_eq!(std::fs::read(path).unwrap(), data.clone());
                }
            }
        }
        // Past the end is an error, not a short read.
        let mut one = [0u8; 1];
        let past_end = matches!(blob.read_at(size, &mut one), Err(CacheError::OutOfRange { .. }));
        prop_assert!(past_end);
    }
}

/// Readers on several threads get the right bytes, and no byte is fetched twice.
#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let data = random_bytes(3 << 20, 42);
    let source = MemSource::new(data.clone());
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (blob, data) = (&blob, &data);
            s.spawn(move || {
                let mut rng = test_support::Rng::new(t);
                for _ in 0..200 {
                    let x = rng.next_u64();
                    let off = (x >> 20) % data.len() as u64;
                    let len = ((x >> 8) % 100_000).min(data.len() as u64 - off) as usize;
                    assert_eq!(read(&**blob, off, len), &data[off as usize..off as usize + len]);
                }
            });
        }
        // The background fetch runs beside the readers.
        s.spawn(|| blob.fetch_all().unwrap());
    });
    assert!(blob.is_complete());
    let mut requests = source.requests.lock().unwrap().clone();
    requests.sort_by_key(|r| r.start);
    for pair in requests.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlapping fetches {pair:?}");
    }
    assert_eq!(source.bytes.load(Ordering::SeqCst), data.len() as u64);
    assert_eq!(blob.local_bytes(), data.len() as u64);
}

/// A blob whose bytes do not match its digest is thrown away and fetched again; one that never
/// matches is refused and never published.
#[test]
fn corrupt_blob_is_refused_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let data = random_bytes(1 << 20, 3);
    let source = MemSource::new(data.clone());
    source.corrupt_fetches.store(1, Ordering::SeqCst);
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    blob.fetch_all().unwrap();
    assert_eq!(std::fs::read(blob.path().unwrap()).unwrap(), data);
    assert_eq!(source.bytes.load(Ordering::SeqCst), 2 * data.len() as u64, "fetched twice");

    let bad = random_bytes(200_000, 9);
    let source = MemSource::new(bad.clone());
    source.corrupt_fetches.store(u32::MAX, Ordering::SeqCst);
    let blob = cache.blob_from(&desc(&bad), source).unwrap();
    match blob.fetch_all() {
        Err(CacheError::Corrupt { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!blob.is_complete());
    assert!(blob.path().is_none());
    assert!(!dir.path().join("blobs/sha256").join(Digest::of(&bad).hex()).exists());
}

/// A source that never answers makes a read fail with a timeout, not hang; the fetch completes
/// later and serves the next read.
#[test]
fn stalled_source_times_out_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_millis(300))).unwrap();
    let data = random_bytes(500_000, 5);
    let source = MemSource::new(data.clone());
    source.stall(true);
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    let mut buf = vec![0u8; 1000];
    match blob.read_at(100_000, &mut buf) {
        Err(CacheError::Timeout { start, end, .. }) => assert_eq!((start, end), (100_000, 101_000)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    source.stall(false);
    assert_eq!(read(&*blob, 100_000, 1000), &data[100_000..101_000]);
}

/// While the source stalls, reads of 100 distinct missing chunks (each giving up after 20 ms)
/// start at most 16 fetch threads between them; the rest wait for a thread and time out. Once
/// the source answers, every byte comes.
#[test]
fn a_stalled_source_holds_at_most_16_fetch_threads() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_millis(20))).unwrap();
    let data = random_bytes(100 * CHUNK as usize, 8);
    let source = MemSource::new(data.clone());
    source.stall(true);
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    for i in 0..100 {
        let err = blob.read_at(i * CHUNK, &mut [0u8; 10]).unwrap_err();
        assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    }
    // Let every fetch started reach the source.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while source.waiting.load(Ordering::SeqCst) < 16 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let most = source.most_waiting.load(Ordering::SeqCst);
    assert!((1..=16).contains(&most), "{most} fetches at once");
    source.stall(false);
    blob.fetch_all().unwrap();
    assert!(read(&*blob, 0, data.len()) == data);
}

/// A blob declared 1 TiB costs little memory until its bytes come (its chunk map was 16 MiB).
#[test]
fn a_blob_declared_a_terabyte_is_opened_in_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(1))).unwrap();
    let huge = Descriptor { size: 1 << 40, ..desc(b"a terabyte, they say") };
    let (blob, peak) = alloc_counter::peak_during(|| cache.blob_from(&huge, MemSource::new(Vec::new())).unwrap());
    assert!(peak < 1 << 20, "opening the blob held {peak} bytes");
    assert_eq!(blob.size(), 1 << 40);
    assert!(!blob.is_local(0..1));
}

/// A source that fails makes the read fail with the cause, at once.
#[test]
fn failing_source_gives_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(60))).unwrap();
    let data = random_bytes(100_000, 6);
    let source = MemSource::new(data.clone());
    source.fail.store(true, Ordering::SeqCst);
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    let mut buf = vec![0u8; 10];
    let err = blob.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, CacheError::Fetch { .. }), "{err:?}");
    assert!(fuse_lazypull::error::chain(&err).contains("source is down"));
    assert!(matches!(blob.fetch_all(), Err(CacheError::Fetch { .. })));
    source.fail.store(false, Ordering::SeqCst);
    assert_eq!(read(&*blob, 0, 10), &data[..10]);
}

/// One `Blob` per digest in a process, even through two caches of one directory; a published
/// blob is found complete by a cache opened later (as another process would).
#[test]
fn one_blob_per_digest_and_published_blobs_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(300_000, 8);
    let source = MemSource::new(data.clone());
    let a = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let b = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let x = a.blob_from(&desc(&data), source.clone()).unwrap();
    let y = b.blob_from(&desc(&data), source.clone()).unwrap();
    assert!(Arc::ptr_eq(&x, &y));
    x.fetch_all().unwrap();
    assert!(y.is_complete());
    drop((x, y, a, b));

    let other = MemSource::new(data.clone());
    let c = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let z = c.blob_from(&desc(&data), other.clone()).unwrap();
    assert!(z.is_complete());
    assert_eq!(read(&*z, 1000, 10), &data[1000..1010]);
    assert_eq!(other.bytes.load(Ordering::SeqCst), 0, "a published blob is never fetched again");
}

/// A blob another process publishes while this one is partway is adopted at the next miss.
#[test]
fn partial_blob_adopts_one_published_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let data = random_bytes(400_000, 10);
    let source = MemSource::new(data.clone());
    let blob = cache.blob_from(&desc(&data), source.clone()).unwrap();
    assert_eq!(read(&*blob, 0, 10), &data[..10]);
    // "Another process" publishes the whole blob.
    std::fs::write(dir.path().join("blobs/sha256").join(Digest::of(&data).hex()), &data).unwrap();
    let before = source.bytes.load(Ordering::SeqCst);
    assert_eq!(read(&*blob, 300_000, 10), &data[300_000..300_010]);
    assert!(blob.is_complete());
    assert_eq!(source.bytes.load(Ordering::SeqCst), before);
}

/// Readers of a partial blob race with another process publishing it. Whichever reader adopts
/// the published file first empties the chunk map; the readers that had looked for the file just
/// before must see that and read the adopted file, not fetch into the emptied map (which once
/// panicked, killing a FUSE worker or the background fetch).
#[test]
fn readers_racing_the_adoption_of_a_published_blob_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(8 * CHUNK as usize, 200);
    let published = dir.path().join("blobs/sha256").join(Digest::of(&data).hex());
    for round in 0..150u64 {
        let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
        // Fetches fail at once, so readers keep looking for a published blob, many times a
        // millisecond.
        let source = MemSource::new(data.clone());
        source.fail.store(true, Ordering::SeqCst);
        let blob = cache.blob_from(&desc(&data), source).unwrap();
        let staged = dir.path().join("staged");
        std::fs::write(&staged, &data).unwrap();
        std::thread::scope(|s| {
            // One reader per chunk.
            for t in 0..8u64 {
                let (blob, data) = (&blob, &data);
                s.spawn(move || {
                    let offset = t * CHUNK + round % 1000;
                    let mut buf = vec![0u8; 100];
                    while blob.read_at(offset, &mut buf).is_err() {}
                    assert_eq!(&buf[..], &data[offset as usize..offset as usize + 100]);
                });
            }
            std::thread::sleep(Duration::from_micros(300 + round * 37 % 2000));
            std::fs::rename(&staged, &published).unwrap();
        });
        assert!(blob.is_complete());
        drop(blob);
        std::fs::remove_file(&published).unwrap();
    }
}

#[test]
fn derived_data_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(1))).unwrap();
    let d = Digest::of(b"x");
    assert_eq!(cache.get_derived(&d, "layer-index").unwrap(), None);
    cache.put_derived(&d, "layer-index", b"index bytes").unwrap();
    assert_eq!(cache.get_derived(&d, "layer-index").unwrap().as_deref(), Some(&b"index bytes"[..]));
    assert!(matches!(cache.put_derived(&d, "../escape", b""), Err(CacheError::BadKind(_))));
}

/// Derived data larger than any index we write (a sparse file of 600 MiB here) is ignored, not
/// read into memory.
#[test]
fn oversized_derived_data_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(1))).unwrap();
    let d = Digest::of(b"x");
    cache.put_derived(&d, "layer-index", b"index bytes").unwrap();
    let path = dir.path().join("derived").join(d.hex()).join("layer-index");
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(600 << 20).unwrap();
    let got = cache.get_derived(&d, "layer-index").unwrap();
    assert!(got.is_none(), "read {} bytes", got.map_or(0, |b| b.len()));
}

fn gc_config(size_limit: u64, gc_grace: Duration) -> CacheConfig {
    CacheConfig { size_limit, fetch_timeout: Duration::from_secs(30), gc_grace }
}

fn image(name: &str) -> ImageRef {
    name.parse().unwrap()
}

/// A complete blob of `cache` with `n` bytes, and its digest.
fn fetched(cache: &BlobCache, n: usize, seed: u64) -> (Arc<Blob>, Digest) {
    let data = random_bytes(n, seed);
    let blob = cache.blob_from(&desc(&data), MemSource::new(data.clone())).unwrap();
    blob.fetch_all().unwrap();
    (blob, Digest::of(&data))
}

/// gc removes content nothing needs (blob, derived data, unpacked directory) least recently used
/// first until the cache is within its limit, and never pinned or open content.
#[test]
fn gc_removes_unreferenced_content_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), gc_config(250_000, Duration::ZERO)).unwrap();
    let mut digests = Vec::new();
    for i in 0..4 {
        let (blob, digest) = fetched(&cache, 100_000, 100 + 2 * i);
        if i == 0 {
            cache.pin(&image("127.0.0.1:1/keep:v1"), std::slice::from_ref(&digest)).unwrap();
        }
        if i == 1 {
            cache.put_derived(&digest, "layer-index", &[0; 1000]).unwrap();
            let unpacked = cache.unpacked_dir(&digest);
            std::fs::create_dir_all(unpacked.join("etc")).unwrap();
            std::fs::write(unpacked.join("etc/file"), [1; 5000]).unwrap();
        }
        digests.push(digest);
        drop(blob);
        // Last-use times are in seconds: keep them apart.
        if i < 3 {
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    // Blob 3 stays open in this process.
    let (open, _) = fetched(&cache, 100_000, 106);

    let report = cache.gc().unwrap();
    // 406 kB held; removing blob 1 (oldest unreferenced, 106 kB) and blob 2 gets under 250 kB.
    assert_eq!(report.removed, vec![digests[1].clone(), digests[2].clone()]);
    assert_eq!(report.freed_bytes, 206_000);
    assert_eq!(report.total_bytes, 200_000);
    assert!(!cache.unpacked_dir(&digests[1]).exists());
    assert_eq!(cache.get_derived(&digests[1], "layer-index").unwrap(), None);
    let usage = cache.usage().unwrap();
    assert!(usage.contains_key(&digests[0]) && usage.contains_key(&digests[3]));
    assert_eq!(cache.images().unwrap(), vec!["127.0.0.1:1/keep:v1".to_owned()]);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "nothing left aside");

    // Once nothing holds them, everything goes down to the limit.
    drop(open);
    cache.remove_image(&image("127.0.0.1:1/keep:v1")).unwrap();
    assert!(cache.images().unwrap().is_empty());
    let small = BlobCache::open(dir.path(), gc_config(0, Duration::ZERO)).unwrap();
    let report = small.gc().unwrap();
    assert_eq!(report.removed, vec![digests[0].clone(), digests[3].clone()]);
    assert_eq!(report.total_bytes, 0);
}

/// A mount's hold keeps its blobs until it is dropped (the mount ended).
#[test]
fn gc_keeps_held_content_until_the_hold_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path(), gc_config(0, Duration::ZERO)).unwrap();
    let (blob, digest) = fetched(&cache, 50_000, 300);
    drop(blob);
    let hold = cache.hold("a mount", std::slice::from_ref(&digest)).unwrap();
    assert!(cache.gc().unwrap().removed.is_empty());
    drop(hold);
    assert_eq!(cache.gc().unwrap().removed, vec![digest]);
}

/// Content written within the grace period stays, even when the index does not know it (another
/// daemon published it and its record is still being written behind).
#[test]
fn gc_keeps_content_younger_than_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(40_000, 301);
    std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
    std::fs::write(dir.path().join("blobs/sha256").join(Digest::of(&data).hex()), &data).unwrap();
    let patient = BlobCache::open(dir.path(), gc_config(0, Duration::from_secs(3600))).unwrap();
    assert!(patient.gc().unwrap().removed.is_empty());
    let hasty = BlobCache::open(dir.path(), gc_config(0, Duration::ZERO)).unwrap();
    assert_eq!(hasty.gc().unwrap().removed, vec![Digest::of(&data)]);
}

/// A process that died holding content (killed while mounted) holds nothing: the next gc drops
/// its holds.
#[test]
fn gc_drops_the_holds_of_processes_that_are_gone() {
    const CHILD: &str = "FUSE_LAZYPULL_TEST_HOLD_CHILD";
    if let Ok(dir) = std::env::var(CHILD) {
        let cache = BlobCache::open(Path::new(&dir), gc_config(0, Duration::ZERO)).unwrap();
        let (_, digest) = fetched(&cache, 30_000, 302);
        let hold = cache.hold("a mount that dies", &[digest]).unwrap();
        // Gone without dropping it, as a killed process would be.
        #[allow(clippy::mem_forget)]
        std::mem::forget(hold);
        drop(cache);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "gc_drops_the_holds_of_processes_that_are_gone", "--test-threads=1"])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let cache = BlobCache::open(dir.path(), gc_config(0, Duration::ZERO)).unwrap();
    assert_eq!(cache.gc().unwrap().removed, vec![Digest::of(&random_bytes(30_000, 302))]);
}

/// An overlay outlives the mount that made it: gc keeps the unpacked layers it uses as lower
/// directories until it is unmounted.
#[test]
fn gc_keeps_unpacked_layers_a_mounted_overlay_uses_needs_root() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(&dir.path().join("cache"), gc_config(0, Duration::ZERO)).unwrap();
    let (a, b) = (Digest::of(b"layer a"), Digest::of(b"layer b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(cache.unpacked_dir(d)).unwrap();
        std::fs::write(cache.unpacked_dir(d).join("file"), d.hex()).unwrap();
    }
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let t = std::ffi::CString::new(target.to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), t.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    fuse_lazypull::handoff::hand_off(&target, &[cache.unpacked_dir(&a), cache.unpacked_dir(&b)]).unwrap();

    assert!(cache.gc().unwrap().removed.is_empty(), "both are lower directories of the overlay");
    assert_eq!(std::fs::read_to_string(target.join("file")).unwrap(), a.hex());
    fuse_lazypull::handoff::detach(&target).unwrap();
    let mut removed = cache.gc().unwrap().removed;
    removed.sort();
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(removed, both);
}

/// Two processes use one cache directory at once: the index (RocksDB, one process at a time) is
/// opened per operation with retries, so both register their blobs and references, and a blob
/// one publishes the other finds complete.
#[test]
fn cache_index_is_shared_by_two_processes() {
    const CHILD: &str = "FUSE_LAZYPULL_TEST_CACHE_CHILD";
    let work = |dir: &Path, who: &str| {
        let cache = BlobCache::open(dir, config(Duration::from_secs(30))).unwrap();
        for i in 0..15u64 {
            let data = random_bytes(70_000, 1000 + 2 * i);
            let blob = cache.blob_from(&desc(&data), MemSource::new(data.clone())).unwrap();
            cache.pin(&image(&format!("127.0.0.1:1/{who}:{i}")), &[Digest::of(&data)]).unwrap();
            blob.fetch_all().unwrap();
            cache.gc().unwrap();
        }
    };
    if let Ok(dir) = std::env::var(CHILD) {
        work(Path::new(&dir), "child");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cache_index_is_shared_by_two_processes", "--test-threads=1"])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    work(dir.path(), "parent");
    assert!(child.wait().unwrap().success(), "the child process failed");
    let cache = BlobCache::open(dir.path(), config(Duration::from_secs(30))).unwrap();
    let images = cache.images().unwrap();
    assert_eq!(images.len(), 30, "{images:?}");
    // Both processes fetched the same 15 blobs; whichever published first, all are complete.
    assert_eq!(cache.usage().unwrap().len(), 15);
    assert_eq!(std::fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
}
