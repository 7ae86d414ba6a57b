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
use guest_ftl::checkpoint::Format;
use guest_ftl::{FlashChannel, Ftl, FtlError};

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
