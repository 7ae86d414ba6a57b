//! Records read back from the store (and OOB read back from flash) are checked before anything
//! is sized or counted by them: a damaged or foreign record fails the open with a metadata
//! error, it does not abort the daemon, panic, or bend the FTL's ordering.
//!
//! A counting allocator measures the peak of the Rust heap while each test runs (tests of this
//! binary take turns), and refuses any single allocation over 1 GiB: the process then aborts,
//! as the daemon would, so an allocation sized by a record fails the run instead of taking the
//! machine's memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use common::*;
use guest_ftl::checkpoint::{Format, Meta, MAX_TRIM_RECORDS};
use guest_ftl::layout::{Oob, MAX_GEN, MAX_SEQ, PAD_LBA};
use guest_ftl::{FlashChannel, Ftl, FtlError};
use host_ftl::{opcode, Addr, Sqe, Status};
use vdisk::BlockDevice;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Larger single allocations are refused (the process aborts).
const REFUSE_ABOVE: usize = 1 << 30;

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, SeqCst) + size;
    PEAK.fetch_max(now, SeqCst);
}

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted,
// and a refusal is a null pointer, which the GlobalAlloc contract allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout has a non-zero size, as `alloc` requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), SeqCst);
        // SAFETY: `ptr` was allocated by `System` with this layout (every path above uses it).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; the caller keeps realloc's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static TURN: Mutex<()> = Mutex::new(());

/// Runs `f` on a runtime of its own, in turn with the other tests, and returns its result and
/// the most the heap grew while it ran.
fn run<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let base = CURRENT.load(SeqCst);
    PEAK.store(base, SeqCst);
    let out = rt.block_on(f);
    (out, PEAK.load(SeqCst).saturating_sub(base))
}

const MIB: usize = 1 << 20;

fn put(rig: &Rig, key: &[u8], value: &[u8]) {
    let mut b = state_store::Batch::new();
    b.put("disk", key, value);
    rig.store.commit(b).unwrap();
}

fn get(rig: &Rig, key: &[u8]) -> Vec<u8> {
    rig.store.get("disk", key).unwrap().unwrap()
}

async fn try_open(rig: &Rig) -> Result<Ftl, FtlError> {
    let ch: Arc<dyn FlashChannel> = rig.ch.clone();
    Ftl::open(ch, rig.store.clone(), "disk", rig.cfg.clone()).await
}

fn expect_metadata(r: Result<Ftl, FtlError>, what: &str) -> String {
    match r {
        Err(FtlError::Metadata(m)) => m,
        Err(e) => panic!("{what}: expected a metadata error, got {e}"),
        Ok(_) => panic!("{what}: the disk opened"),
    }
}

#[test]
fn a_format_record_the_partition_cannot_hold_is_refused_before_anything_is_sized() {
    let rig = Rig::new(small_geometry(), small_config());
    let ((), _) = run(async {
        let ftl = rig.open().await;
        write(&ftl, 0, &pattern(0, 1, 4096), false).await;
        ftl.shutdown().await.unwrap();
    });
    let good = Format::decode(&get(&rig, b"ftl/format")).unwrap();
    let cases = [
        // Three arrays of u32::MAX entries (64 GiB): the open aborted the daemon.
        (Format { user_lbas: u32::MAX, ..good }, "user blocks"),
        (Format { user_lbas: good.chunks * good.spc + 1, ..good }, "user blocks"),
        (Format { user_lbas: 0, ..good }, "no user blocks"),
        // The disk's block size divides every request's offset.
        (Format { block_size: 0, ..good }, "block size 0"),
        (Format { block_size: 100, ..good }, "block size 100"),
        (Format { chunks: good.chunks + 1, ..good }, "formatted for"),
    ];
    for (bad, why) in cases {
        put(&rig, b"ftl/format", &bad.encode());
        let (r, peak) = run(try_open(&rig));
        let m = expect_metadata(r, why);
        assert!(m.contains(why), "{bad:?}: {m}");
        assert!(peak < 16 * MIB, "{bad:?}: refusing took {} MiB", peak / MIB);
    }
    put(&rig, b"ftl/format", &good.encode());
    let ((), _) = run(async {
        let ftl = rig.open().await;
        assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 1, 4096));
    });
}

/// A disk with version 1 of blocks 0..4 written and a checkpoint taken.
fn written_rig() -> Rig {
    let rig = Rig::new(small_geometry(), small_config());
    let ((), _) = run(async {
        let ftl = rig.open().await;
        for lba in 0..4 {
            write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
        }
        ftl.shutdown().await.unwrap();
    });
    rig
}

#[test]
fn checkpoint_and_trim_records_near_the_end_of_their_counters_are_refused() {
    let rig = written_rig();
    let good = Meta::decode(&get(&rig, b"ftl/meta")).unwrap();
    for bad in [
        // Every write after it would overflow the counter (a panic in debug builds; in
        // release, sequence numbers wrapping below older versions).
        Meta { next_seq: u64::MAX, ..good.clone() },
        Meta { next_seq: MAX_SEQ + 1, ..good.clone() },
        // The next line would take recovery's own generation, then wrap to "never written".
        Meta { next_gen: u32::MAX, ..good.clone() },
        Meta { next_gen: MAX_GEN + 1, ..good.clone() },
    ] {
        put(&rig, b"ftl/meta", &bad.encode());
        let (r, _) = run(try_open(&rig));
        let m = expect_metadata(r, "meta");
        assert!(m.contains("checkpoint record"), "{m}");
    }
    put(&rig, b"ftl/meta", &good.encode());
    let mut key = b"ftl/trim/".to_vec();
    key.extend_from_slice(&u64::MAX.to_be_bytes());
    put(&rig, &key, &[0, 0, 0, 0, 1, 0, 0, 0]);
    let (r, _) = run(try_open(&rig));
    assert!(expect_metadata(r, "trim").contains("trim record"));
    // More trim records than the engine ever keeps (it checkpoints at MAX_TRIM_RECORDS) are
    // refused, not collected.
    let mut b = state_store::Batch::new();
    b.delete("disk", &key);
    for seq in 1..=65_537u64 {
        let mut k = b"ftl/trim/".to_vec();
        k.extend_from_slice(&seq.to_be_bytes());
        b.put("disk", k, [0, 0, 0, 0, 1, 0, 0, 0]);
    }
    rig.store.commit(b).unwrap();
    match run(try_open(&rig)).0 {
        Err(FtlError::Store(state_store::StoreError::TooMany { max: 65_536, .. })) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("65537 trim records were taken"),
    }
}

/// Writes two sectors at the start of chunk `chk` of PU 3 straight to the device, carrying
/// `first` and a padding OOB, as something other than the FTL might have.
async fn plant(rig: &Rig, chk: u32, first: Oob) {
    let geo = &rig.geo;
    let ch = rig.ch.as_ref();
    let list: Vec<u64> = (0..2).map(|b| Addr::new(0, 3, chk, b).to_ppa(geo).unwrap().0).collect();
    let (at_list, at_data, at_oob) = (0u64, 4096u64, 3 * 4096u64);
    let mut oob = vec![0u8; 2 * geo.oob_size as usize];
    first.encode(&mut oob[..16]);
    Oob { lba: PAD_LBA, gen: first.gen, seq: 0 }.encode(&mut oob[16..32]);
    ch.region().write_u64s(at_list, &list).unwrap();
    ch.region().write(at_data, &[0xee; 2 * 4096]).unwrap();
    ch.region().write(at_oob, &oob).unwrap();
    let sqe = Sqe::vector(opcode::VECTOR_WRITE, 1, 2, at_list, at_data, at_oob).unwrap();
    assert_eq!(ch.submit(sqe).await.status, Status::SUCCESS);
    ch.device().flush().unwrap();
}

#[test]
fn oob_past_the_counters_bounds_is_read_as_foreign_and_ordering_holds() {
    type Planted = fn(u32) -> Oob;
    let cases: [(&str, Planted); 2] = [
        // Sequence number u64::MAX for block 0 in a line recovery scans: max_seq + 1 overflowed
        // (a panic in debug builds; in release, later writes numbered below this stale copy).
        ("seq", |gen: u32| Oob { lba: 0, gen, seq: u64::MAX }),
        // Generation just below recovery's: the next line would have taken recovery's own.
        ("gen", |_: u32| Oob { lba: 0, gen: u32::MAX - 1, seq: 1 }),
    ];
    for (what, oob) in cases {
        let mut rig = written_rig();
        let gen = Meta::decode(&get(&rig, b"ftl/meta")).unwrap().next_gen;
        let ((), _) = run(plant(&rig, rig.geo.num_chk - 1, oob(gen)));
        let ((), _) = run(async {
            let ftl = try_open(&rig).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 1, 4096), "{what}: the foreign copy won");
            // New versions still win over old ones across a crash.
            for lba in 0..4 {
                write(&ftl, lba * 4096, &pattern(lba, 2, 4096), false).await;
            }
            ftl.flush().await.unwrap();
        });
        rig.crash(0);
        let ((), _) = run(async {
            let ftl = try_open(&rig).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            for lba in 0..4 {
                assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 2, 4096), "{what}: lba {lba}");
            }
        });
    }
}

#[test]
fn a_guest_that_only_discards_and_flushes_keeps_a_bounded_number_of_trim_records() {
    let mut rig = written_rig();
    let discards = MAX_TRIM_RECORDS + 904;
    let trim_records = |rig: &Rig| rig.store.scan_prefix("disk", "ftl/trim/").unwrap().len();
    let (most, _) = run(async {
        let ftl = rig.open().await;
        let capacity = ftl.info().capacity;
        let mut most = 0;
        for i in 0..discards {
            // Discards and flushes open no lines: before, no checkpoint ever came.
            ftl.discard(0, capacity).await.unwrap();
            if i % 10 == 9 {
                ftl.flush().await.unwrap();
                most = most.max(trim_records(&rig));
            }
        }
        ftl.flush().await.unwrap();
        most.max(trim_records(&rig))
    });
    eprintln!("{discards} whole-disk discards, a flush every 10: at most {most} trim records");
    assert!(most <= MAX_TRIM_RECORDS, "{most} trim records after {discards} discards");
    rig.crash(0);
    let ((), _) = run(async {
        let ftl = try_open(&rig).await.unwrap();
        for lba in 0..4 {
            assert_eq!(read(&ftl, lba * 4096, 4096).await, vec![0; 4096], "lba {lba}");
        }
    });
}
