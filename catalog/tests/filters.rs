//! The framework and the built-in filters on real catalogs (RocksDB, raw files on io_uring).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock, Weak};

use catalog::CatalogError;
use common::{clone_of, filter, read, runtime, spec, write, MemDisk, Rig};
use io_filters::filters::throttle::Bucket;
use io_filters::{Chain, Filter, FilterFramework, Request, Verdict};
use plumbing::clock::{Clock, SimClock};
use serde_json::json;
use vdisk::{error_chain, BlockDevice, BlockError};

fn refused(rig: &Rig, s: catalog::DiskSpec) -> String {
    match rig.catalog.create(s) {
        Err(e @ CatalogError::Filters { .. }) => error_chain(&e),
        Err(e) => panic!("expected a filter configuration error, got {e}"),
        Ok(_) => panic!("a bad filter configuration was accepted"),
    }
}

#[test]
fn configuration_errors_are_refused_with_a_message_naming_the_problem() {
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    rig.catalog.create(spec("base", 1 << 20, vec![])).unwrap();
    let cases: Vec<(Vec<io_filters::FilterSpec>, &str)> = vec![
        (vec![filter("compress", json!({}))], "unknown filter \"compress\""),
        (vec![filter("throttle", json!({"iopz": 5}))], "unknown field `iopz`"),
        (vec![filter("throttle", json!({}))], "give iops, bps or both"),
        (vec![filter("throttle", json!({"iops": "many"}))], "invalid type"),
        (vec![filter("cache", json!({"size": "lots"}))], "invalid size"),
        (vec![filter("cache", json!({"size": "2T"}))], "more than the 1073741824 bytes a disk's cache may hold"),
        (vec![filter("integrity", json!({"strong": true}))], "unknown field `strong`"),
        (vec![filter("stats", json!({})), filter("stats", json!({}))], "\"stats\" is configured twice"),
        (vec![filter("passthrough", json!({})); 17], "17 filters; a disk may have at most 16"),
        (vec![clone_of("nope")], "linked clone of a missing parent: no disk named \"nope\""),
        (vec![clone_of("x")], "redirect cycle: x -> x"),
        (vec![filter("linked_clone", json!({"parent": "base", "copy_on_reed": true}))], "unknown field `copy_on_reed`"),
        (
            vec![clone_of("base"), io_filters::FilterSpec { order: Some(1), ..filter("integrity", json!({})) }],
            "\"integrity\" must come after \"linked_clone\"",
        ),
    ];
    for (filters, message) in cases {
        let got = refused(&rig, spec("x", 1 << 20, filters.clone()));
        assert!(got.contains(message), "{filters:?}: expected {message:?} in {got:?}");
        assert!(got.contains("disk \"x\""), "{got}");
    }
    rig.catalog.create(spec("sixteen", 1 << 20, vec![filter("passthrough", json!({})); 16])).unwrap();
    rig.catalog.delete("sixteen").unwrap();
    let got = refused(&rig, spec("x", 2 << 20, vec![clone_of("base")]));
    assert!(got.contains("must have its parent's size"), "{got}");
    // Nothing of the refused disks was made.
    assert_eq!(rig.catalog.entries().len(), 1);
    // A throttle group has one set of limits.
    let g = |iops: u64| filter("throttle", json!({"iops": iops, "group": "g"}));
    rig.catalog.create(spec("t1", 1 << 20, vec![g(100)])).unwrap();
    rig.catalog.create(spec("t2", 1 << 20, vec![g(100)])).unwrap();
    let got = refused(&rig, spec("t3", 1 << 20, vec![g(200)]));
    assert!(got.contains("throttle group \"g\" has iops Some(100)"), "{got}");
}

#[test]
fn chains_follow_class_order_unless_told_otherwise() {
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    rig.catalog.create(spec("base", 1 << 20, vec![])).unwrap();
    let filters = vec![
        filter("integrity", json!({})),
        filter("cache", json!({"size": "1M"})),
        clone_of("base"),
        filter("throttle", json!({"iops": 1000})),
        filter("stats", json!({})),
    ];
    let id = rig.catalog.create(spec("c", 1 << 20, filters)).unwrap().record.id;
    assert_eq!(rig.framework().chain_of(&id).unwrap(), ["stats", "throttle", "cache", "linked_clone", "integrity"]);
    let mut stats = filter("stats", json!({}));
    stats.order = Some(450);
    let id = rig.catalog.create(spec("d", 1 << 20, vec![filter("cache", json!({})), stats])).unwrap().record.id;
    assert_eq!(rig.framework().chain_of(&id).unwrap(), ["cache", "stats"]);
    // No filters: an empty chain, straight to the backend.
    let id = rig.catalog.create(spec("plain", 1 << 20, vec![])).unwrap().record.id;
    assert!(rig.framework().chain_of(&id).unwrap().is_empty());
}

/// Redirects every request to the chain it sits in.
struct Loop(OnceLock<Weak<Chain>>);

impl Filter for Loop {
    fn kind(&self) -> &'static str {
        "loop"
    }
    fn pre(&self, _req: &mut Request) -> Verdict {
        match self.0.get().and_then(Weak::upgrade) {
            Some(chain) => Verdict::Redirect(chain),
            None => Verdict::Continue,
        }
    }
}

#[test]
fn a_redirect_loop_at_run_time_fails_the_request_without_exhausting_the_stack() {
    let rt = runtime();
    let looping = Arc::new(Loop(OnceLock::new()));
    let chain = Arc::new(Chain::new("l", vec![looping.clone()], Arc::new(MemDisk::new(1 << 20, 512))));
    looping.0.set(Arc::downgrade(&chain)).ok();
    // A small stack: the loop must not recurse.
    let err = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || rt.block_on(read(chain.as_ref(), 0, 4096)).unwrap_err())
        .unwrap()
        .join()
        .unwrap();
    assert!(
        err.to_string() == "I/O error" && format!("{:?}", err).contains("redirected more than 1024 times"),
        "{err:?}"
    );
}

#[test]
fn flipped_bits_in_the_backend_file_give_read_errors_not_data() {
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    let entry = rig.catalog.create(spec("d", 1 << 20, vec![filter("integrity", json!({}))])).unwrap();
    let disk = rig.dev("d");
    let data: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    rt.block_on(async {
        write(disk.as_ref(), 0, &data, false).await.unwrap();
        disk.flush().await.unwrap();
        assert_eq!(read(disk.as_ref(), 0, data.len()).await.unwrap(), data);
    });
    // Flip one bit of block 5 in the file, through the page cache the backend reads from.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&entry.path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 5 * 512 + 100).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], 5 * 512 + 100).unwrap();
    rt.block_on(async {
        let err = read(disk.as_ref(), 0, 8192).await.unwrap_err();
        assert!(format!("{err:?}").contains("checksum mismatch in block 5"), "{err:?}");
        assert!(matches!(err, BlockError::Io(_)));
        // The blocks around it still read; the bad one alone keeps failing.
        assert_eq!(read(disk.as_ref(), 0, 2560).await.unwrap(), data[..2560]);
        assert_eq!(read(disk.as_ref(), 3072, 4096).await.unwrap(), data[3072..7168]);
        assert!(read(disk.as_ref(), 2560, 512).await.is_err());
        // Rewriting the block heals it.
        write(disk.as_ref(), 2560, &data[2560..3072], true).await.unwrap();
        assert_eq!(read(disk.as_ref(), 0, data.len()).await.unwrap(), data);
    });
    let (_, mismatches) = rig.framework().integrity_of(&entry.record.id).unwrap();
    assert_eq!(mismatches, 2);
    assert!(rig.framework().render_metrics().contains("vstor_integrity_mismatches_total{disk=\"d\"} 2"));
}

#[test]
fn integrity_checksums_survive_a_restart_and_an_unclean_stop_gives_no_false_errors() {
    let rt = runtime();
    let _g = rt.enter();
    let mut rig = Rig::new();
    let path = rig.catalog.create(spec("d", 4 << 20, vec![filter("integrity", json!({}))])).unwrap().path;
    let a: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let b: Vec<u8> = (0..1 << 20).map(|i| (i % 249) as u8 ^ 0x5a).collect();
    rt.block_on(async {
        let disk = rig.dev("d");
        write(disk.as_ref(), 0, &a, false).await.unwrap();
        disk.flush().await.unwrap();
        // Written after the last flush, and never flushed: its checksums are not stored.
        write(disk.as_ref(), 2 << 20, &b, false).await.unwrap();
    });
    rig.reopen();
    rt.block_on(async {
        let disk = rig.dev("d");
        // The unflushed range reads as whatever reached the file, without a false mismatch.
        assert_eq!(read(disk.as_ref(), 2 << 20, 1 << 20).await.unwrap(), b);
        assert_eq!(read(disk.as_ref(), 0, 1 << 20).await.unwrap(), a);
        disk.flush().await.unwrap();
    });
    rig.reopen();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xff], 12345).unwrap();
    file.write_all_at(&[0xff], (2 << 20) + 999).unwrap();
    rt.block_on(async {
        let disk = rig.dev("d");
        // Checksums committed by the flushes catch both changes after the restart.
        assert!(read(disk.as_ref(), 12288, 512).await.is_err());
        assert!(read(disk.as_ref(), 2 << 20, 1024).await.is_err());
        assert_eq!(read(disk.as_ref(), 0, 12288).await.unwrap(), a[..12288]);
    });
}

#[test]
fn the_cache_answers_repeated_reads_and_never_returns_stale_data() {
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    let id = rig.catalog.create(spec("c", 4 << 20, vec![filter("cache", json!({"size": "64K"}))])).unwrap().record.id;
    let disk = rig.dev("c");
    let counters = || {
        let text = rig.framework().render_metrics();
        let get = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}{{disk=\"c\"}} ")).map(|v| v.parse::<u64>().unwrap()))
                .unwrap()
        };
        (get("vstor_cache_hits_total"), get("vstor_cache_misses_total"), get("vstor_cache_bytes"))
    };
    assert_eq!(rig.framework().chain_of(&id).unwrap(), ["cache"]);
    rt.block_on(async {
        write(disk.as_ref(), 0, &[1; 8192], false).await.unwrap();
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), [1; 8192]);
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), [1; 8192]);
        assert_eq!(counters().0, 1, "the second read is a hit");
        write(disk.as_ref(), 4096, &[2; 512], false).await.unwrap();
        let mut want = vec![1u8; 8192];
        want[4096..4608].fill(2);
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), want);
        disk.write_zeroes(0, 1024, false).await.unwrap();
        want[..1024].fill(0);
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), want);
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), want);
        disk.discard(7680, 512).await.unwrap();
        want[7680..].fill(0);
        assert_eq!(read(disk.as_ref(), 0, 8192).await.unwrap(), want);
        // Reading far more than the cache holds keeps it within its bound.
        for i in 0..32u64 {
            read(disk.as_ref(), i * 65536, 65536).await.unwrap();
        }
        let (hits, misses, bytes) = counters();
        assert!(bytes <= 64 << 10, "{bytes} bytes cached");
        assert!(hits >= 2 && misses >= 30, "{hits} hits, {misses} misses");
    });
}

/// Runs `n` requests of `bytes` each through a throttle and gives the simulated seconds taken.
fn throttled(options: serde_json::Value, disks: usize, n: usize, bytes: usize) -> (f64, Arc<Bucket>) {
    let clock = Arc::new(SimClock::default());
    let framework = Arc::new(FilterFramework::with_clock(clock.clone()));
    let rt = runtime();
    let _g = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path().join("db")).unwrap();
    let catalog = catalog::Catalog::open(store, &dir.path().join("disks"), framework.clone(), None).unwrap();
    let mut ids = Vec::new();
    for d in 0..disks {
        let s = spec(&format!("t{d}"), 4 << 20, vec![filter("throttle", options.clone())]);
        ids.push(catalog.create(s).unwrap().record.id);
    }
    let start = clock.now();
    rt.block_on(async {
        for i in 0..n {
            let disk = catalog.disk(&format!("t{}", i % disks)).unwrap();
            read(disk.as_ref(), 0, bytes).await.unwrap();
        }
    });
    let bucket = framework.throttle_of(&ids[0]).unwrap();
    ((clock.now() - start).as_secs_f64(), bucket)
}

#[test]
fn the_throttle_holds_its_iops_limit_on_a_simulated_clock() {
    // 100 IOPS with a burst of 100 ms (10 requests): 1000 requests take 9.9 s.
    let (secs, bucket) = throttled(json!({"iops": 100}), 1, 1000, 512);
    assert!((9.85..=9.95).contains(&secs), "{secs} s for 1000 requests at 100 IOPS");
    assert_eq!(bucket.admitted(), 1000);
    assert!(bucket.delayed() >= 985, "{} delayed", bucket.delayed());
}

#[test]
fn the_throttle_holds_its_bandwidth_limit_on_a_simulated_clock() {
    // 1 MiB/s, 100 ms burst: 100 reads of 64 KiB (6.25 MiB) take 6.15 s, one request's debt
    // aside.
    let (secs, _) = throttled(json!({"bps": 1 << 20}), 1, 100, 65536);
    assert!((6.0..=6.25).contains(&secs), "{secs} s for 6.25 MiB at 1 MiB/s");
}

#[test]
fn a_throttle_group_shares_one_budget_between_disks() {
    // Two disks in one group of 100 IOPS: 1000 requests between them still take 9.9 s.
    let (secs, bucket) = throttled(json!({"iops": 100, "group": "tenant"}), 2, 1000, 512);
    assert!((9.85..=9.95).contains(&secs), "{secs} s");
    assert_eq!(bucket.admitted(), 1000, "both disks drew from the one bucket");
    // Without a group each disk has its own budget: half the time.
    let (secs, _) = throttled(json!({"iops": 100}), 2, 1000, 512);
    assert!((4.85..=4.95).contains(&secs), "{secs} s");
}

#[test]
fn the_throttle_never_admits_more_than_burst_plus_rate_times_time() {
    let clock = Arc::new(SimClock::default());
    let options = io_filters::config::ThrottleOptions { iops: Some(50), bps: None, burst_ms: 200, group: None };
    let bucket = Bucket::new(&options, clock.clone());
    let mut admitted = 0u64;
    for _ in 0..5000 {
        match bucket.try_admit(0) {
            Ok(()) => admitted += 1,
            Err(wait) => {
                // Wait only part of the time asked, as an impatient caller would.
                drop(clock.sleep(wait / 3));
            }
        }
        let t = clock.now().as_secs_f64();
        assert!(admitted as f64 <= 10.0 + 50.0 * t + 1.0, "{admitted} admitted by {t} s");
    }
    assert!(admitted > 100);
}

#[test]
fn stats_count_and_time_requests_per_kind() {
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    rig.catalog.create(spec("s", 1 << 20, vec![filter("stats", json!({}))])).unwrap();
    let disk = rig.dev("s");
    rt.block_on(async {
        for i in 0..10 {
            write(disk.as_ref(), i * 4096, &[3; 4096], false).await.unwrap();
        }
        read(disk.as_ref(), 0, 4096).await.unwrap();
        disk.flush().await.unwrap();
    });
    let text = rig.framework().render_metrics();
    assert!(text.contains("vstor_filter_requests_total{disk=\"s\",kind=\"write\"} 10"), "{text}");
    assert!(text.contains("vstor_filter_bytes_total{disk=\"s\",kind=\"write\"} 40960"), "{text}");
    assert!(text.contains("vstor_filter_latency_seconds_count{disk=\"s\",kind=\"read\"} 1"), "{text}");
    assert!(text.contains("vstor_filter_latency_seconds_bucket{disk=\"s\",kind=\"write\",le=\"+Inf\"} 10"), "{text}");
    assert!(text.contains("# TYPE vstor_filter_latency_seconds histogram"), "{text}");
}

/// Puts a raw record into a disk's namespace, as a damaged store or another writer would.
fn tamper(rig: &Rig, disk: &str, key: &str, value: &[u8]) {
    let ns = rig.catalog.entry(disk).unwrap().record.namespace();
    let mut batch = state_store::Batch::new();
    batch.put(&ns, key, value);
    rig.catalog.store().commit(batch).unwrap();
}

#[test]
fn a_malformed_integrity_record_makes_the_disk_unavailable_without_a_panic() {
    let rt = runtime();
    let _g = rt.enter();
    let bad: [(&str, Vec<u8>); 4] = [
        // A page number whose first block overflows: debug builds panicked, release builds
        // stored a checksum for some other block.
        ("integrity/crc/ffffffffffffffff", vec![0xff; 4096]),
        // Past the disk's 2 pages.
        ("integrity/crc/0000000000000002", vec![0; 4096]),
        // A page of the wrong length.
        ("integrity/crc/0000000000000000", vec![0; 4095]),
        ("integrity/intent/ffffffffffffffff", vec![]),
    ];
    for (key, value) in bad {
        let mut rig = Rig::new();
        rig.catalog.create(spec("d", 1 << 20, vec![filter("integrity", json!({}))])).unwrap();
        rig.catalog.create(spec("other", 1 << 20, vec![filter("integrity", json!({}))])).unwrap();
        rt.block_on(async {
            let d = rig.dev("d");
            write(d.as_ref(), 0, &[5; 4096], false).await.unwrap();
            d.flush().await.unwrap();
        });
        tamper(&rig, "d", key, &value);
        rig.reopen();
        match rig.catalog.disk("d") {
            Err(e @ CatalogError::Unavailable { .. }) => {
                let reason = error_chain(&e);
                assert!(reason.contains("is malformed") && reason.contains(key), "{key}: {reason}")
            }
            Err(e) => panic!("{key}: {e}"),
            Ok(_) => panic!("{key}: a disk with a malformed record opened"),
        }
        // The other disk is untouched.
        let other = rig.dev("other");
        assert_eq!(rt.block_on(read(other.as_ref(), 0, 4096)).unwrap(), vec![0; 4096]);
    }
}

#[test]
fn a_malformed_clone_bitmap_page_makes_the_clone_unavailable_without_a_panic() {
    let rt = runtime();
    let _g = rt.enter();
    // A 1 MiB clone: 256 grains, one page of 32 words.
    let bad: [(&str, Vec<u8>); 5] = [
        // A page number that overflows the word index: debug builds panicked, release builds
        // set some other page's bits, and the clone read its own never-written grains.
        ("clone/bitmap/ffffffffffffffff", vec![0xff; 4096]),
        ("clone/bitmap/0000000000000001", vec![0xff; 256]),
        ("clone/bitmap/0000000000000000", vec![0xff; 4096]),
        ("clone/bitmap/0", vec![0xff; 256]),
        ("clone/bitmap/0000000000000000", vec![0xff; 255]),
    ];
    for (key, value) in bad {
        let mut rig = Rig::new();
        rig.catalog.create(spec("base", 1 << 20, vec![])).unwrap();
        rt.block_on(write(rig.dev("base").as_ref(), 0, &[6; 1 << 20], false)).unwrap();
        rig.catalog.create(spec("c", 1 << 20, vec![clone_of("base")])).unwrap();
        tamper(&rig, "c", key, &value);
        rig.reopen();
        match rig.catalog.disk("c") {
            Err(e @ CatalogError::Unavailable { .. }) => {
                let reason = error_chain(&e);
                assert!(reason.contains("is malformed") && reason.contains(key), "{key}: {reason}")
            }
            Err(e) => panic!("{key}: {e}"),
            Ok(_) => panic!("{key}: a clone with a malformed bitmap page opened"),
        }
        assert_eq!(rt.block_on(read(rig.dev("base").as_ref(), 0, 4096)).unwrap(), vec![6; 4096]);
    }
    // A well-formed page still loads.
    let mut rig = Rig::new();
    rig.catalog.create(spec("base", 1 << 20, vec![])).unwrap();
    rig.catalog.create(spec("c", 1 << 20, vec![clone_of("base")])).unwrap();
    let mut page = vec![0u8; 32];
    page[0] = 1;
    tamper(&rig, "c", "clone/bitmap/0000000000000000", &page);
    rig.reopen();
    let id = rig.catalog.entry("c").unwrap().record.id;
    assert!(rig.framework().render_metrics().contains("vstor_clone_allocated_blocks{disk=\"c\"} 1"));
    assert!(rig.framework().chain_of(&id).is_some());
}

/// A disk whose discards fail after scribbling on the first block of their range.
struct ScribblingDiscard(MemDisk);

impl BlockDevice for ScribblingDiscard {
    fn info(&self) -> vdisk::DeviceInfo {
        self.0.info()
    }
    fn read(&self, offset: u64, buf: vdisk::IoBuf) -> vdisk::IoFuture<'_, vdisk::IoBuf> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: vdisk::IoBuf, fua: bool) -> vdisk::IoFuture<'_, vdisk::IoBuf> {
        self.0.write(offset, buf, fua)
    }
    fn flush(&self) -> vdisk::IoFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, _len: u64) -> vdisk::IoFuture<'_, ()> {
        self.0.data.lock().unwrap()[offset as usize..offset as usize + 512].fill(0xab);
        Box::pin(std::future::ready(Err(BlockError::Io(std::io::Error::other("discard failed")))))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> vdisk::IoFuture<'_, ()> {
        self.0.write_zeroes(offset, len, fua)
    }
}

#[test]
fn a_failed_discard_on_never_written_blocks_leaves_checksums_that_survive_a_restart() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path().join("db")).unwrap();
    store.create_namespace("d").unwrap();
    let backend = Arc::new(ScribblingDiscard(MemDisk::new(1 << 20, 512)));
    let chain = |store: &Arc<state_store::Store>| {
        let f = io_filters::filters::integrity::Integrity::open("d", store.clone(), "d", 1 << 20, 512).unwrap();
        Chain::new("d", vec![Arc::new(f) as Arc<dyn Filter>], backend.clone())
    };
    let c = chain(&store);
    rt.block_on(async {
        // The pages were never written: the discard alone would leave them alone, but it
        // failed and changed a block, whose checksum is taken from what it holds now.
        assert!(c.discard(0, 1 << 20).await.is_err());
        assert_eq!(read(&c, 0, 512).await.unwrap(), vec![0xab; 512]);
        c.flush().await.unwrap();
    });
    let c = chain(&store);
    assert_eq!(rt.block_on(read(&c, 0, 4096)).unwrap()[..512], [0xab; 512]);
}
