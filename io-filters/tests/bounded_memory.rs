//! Filters keep memory by what was written, not by a disk's size or a request's length.
//!
//! A counting allocator measures the peak of the Rust heap while each test runs (tests of this
//! binary take turns), and refuses any single allocation over 1 GiB: the process then aborts,
//! as the daemon would, so an allocation sized by outside input fails the run instead of
//! taking the machine's memory. RocksDB's own memory is not counted (it is not Rust's heap).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::sync::{Arc, Mutex};

use io_filters::filters::integrity::Integrity;
use io_filters::filters::linked_clone::{CloneSetup, LinkedClone, GRAIN, MIXED_PIECE};
use io_filters::{Chain, Filter, FilterError};
use test_support::alloc::{peak_in_process, refuse_above, Counting};
use test_support::{read, runtime, write, SparseDisk};
use vdisk::BlockDevice;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Larger single allocations are refused (the process aborts).
const REFUSE_ABOVE: usize = 1 << 30;

/// Tests of this binary take turns: each measures the whole heap.
static TURN: Mutex<()> = Mutex::new(());

/// Takes this test's turn, with allocations past [`REFUSE_ABOVE`] refused.
fn turn() -> std::sync::MutexGuard<'static, ()> {
    refuse_above(REFUSE_ABOVE);
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` and returns its result and the most the heap grew above where it was at the start.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    peak_in_process(f)
}

const MIB: usize = 1 << 20;
const TIB: u64 = 1 << 40;

fn store_with(ns: &str) -> (tempfile::TempDir, Arc<state_store::Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path().join("db")).unwrap();
    store.create_namespace(ns).unwrap();
    (dir, store)
}

#[test]
fn integrity_on_a_64_tib_disk_opens_writes_and_reopens_in_a_few_mib() {
    let _turn = turn();
    let rt = runtime();
    let (_dir, store) = store_with("d");
    let capacity = 64 * TIB;
    let backend = Arc::new(SparseDisk::new(capacity, 512));
    let chain = |store: &Arc<state_store::Store>| {
        let f: Arc<dyn Filter> = Arc::new(Integrity::open("d", store.clone(), "d", capacity, 512).unwrap());
        Chain::new("d", vec![f], backend.clone())
    };
    let ends = [0, capacity / 3 / 4096 * 4096, capacity - 4096];
    let ((), peak) = peak_of(|| {
        let c = chain(&store);
        rt.block_on(async {
            for (i, &at) in ends.iter().enumerate() {
                write(&c, at, &[i as u8 + 1; 4096], false).await.unwrap();
            }
            c.flush().await.unwrap();
        });
    });
    eprintln!("64 TiB integrity disk, 3 pages written and flushed: heap peak {} KiB", peak >> 10);
    assert!(peak < 8 * MIB, "a 64 TiB disk with 3 pages written took {} KiB", peak >> 10);
    // Reopened: the stored pages are loaded, the rest still costs nothing.
    let (c, peak) = peak_of(|| chain(&store));
    eprintln!("64 TiB integrity disk reopened: heap peak {} KiB", peak >> 10);
    assert!(peak < 8 * MIB, "reopening took {} KiB", peak >> 10);
    rt.block_on(async {
        for (i, &at) in ends.iter().enumerate() {
            assert_eq!(read(&c, at, 4096).await.unwrap(), vec![i as u8 + 1; 4096]);
        }
        assert_eq!(read(&c, 1 << 30, 4096).await.unwrap(), vec![0; 4096]);
    });
    // A bit flipped below is still caught.
    backend.blocks.lock().unwrap().get_mut(&0).unwrap()[7] ^= 1;
    assert!(rt.block_on(read(&c, 0, 512)).is_err());
}

#[test]
fn integrity_refuses_a_disk_beyond_its_bound_before_allocating_for_it() {
    let _turn = turn();
    let (_dir, store) = store_with("d");
    let (r, peak) = peak_of(|| Integrity::open("d", store.clone(), "d", 1 << 50, 512).map(drop));
    assert!(matches!(r, Err(FilterError::Shape { .. })), "{r:?}");
    assert!(peak < MIB, "{peak} bytes");
}

#[test]
fn a_discard_of_a_whole_1_tib_clone_takes_no_memory_per_grain() {
    let _turn = turn();
    let rt = runtime();
    let (_dir, store) = store_with("c");
    let capacity = TIB;
    let parent = Arc::new(SparseDisk::new(capacity, 512));
    let last = capacity - 4096;
    rt.block_on(async {
        write(parent.as_ref(), 0, &[1; 4096], false).await.unwrap();
        write(parent.as_ref(), last, &[2; 4096], false).await.unwrap();
        write(parent.as_ref(), 1 << 30, &[3; 4096], false).await.unwrap();
    });
    let parent_chain = Arc::new(Chain::new("p", Vec::new(), parent.clone()));
    let clone = Arc::new(
        LinkedClone::open(CloneSetup {
            disk: "c",
            parent: parent_chain.clone(),
            copy_on_read: false,
            capacity,
            store: store.clone(),
            namespace: "c",
        })
        .unwrap(),
    );
    let chain = Chain::new("c", vec![clone.clone() as Arc<dyn Filter>], Arc::new(SparseDisk::new(capacity, 512)));
    let grains = capacity / 4096;
    let ((), peak) = peak_of(|| {
        rt.block_on(async {
            // Leaves the first and last 512 bytes: the grains at the ends are filled from the
            // parent first.
            chain.discard(512, capacity - 1024).await.unwrap();
        })
    });
    eprintln!("discard of a whole 1 TiB clone ({grains} grains): heap peak {} KiB", peak >> 10);
    assert!(peak < 64 * MIB, "a whole-clone discard took {} MiB", peak / MIB);
    assert_eq!(clone.bitmap().allocated(), grains);
    rt.block_on(async {
        let head = read(&chain, 0, 4096).await.unwrap();
        assert_eq!(head[..512], [1; 512]);
        assert!(head[512..].iter().all(|b| *b == 0));
        let tail = read(&chain, last, 4096).await.unwrap();
        assert_eq!(tail[3584..], [2; 512]);
        assert!(tail[..3584].iter().all(|b| *b == 0));
        assert_eq!(read(&chain, 1 << 30, 4096).await.unwrap(), vec![0; 4096]);
    });
    // Write-zeroes with FUA over a clone whose grains are partly set: the same, and its bits
    // are durable when it completes.
    let (_dir2, store2) = store_with("z");
    let setup = |store: &Arc<state_store::Store>| CloneSetup {
        disk: "z",
        parent: parent_chain.clone(),
        copy_on_read: false,
        capacity,
        store: store.clone(),
        namespace: "z",
    };
    let zclone = Arc::new(LinkedClone::open(setup(&store2)).unwrap());
    let zchain = Chain::new("z", vec![zclone.clone() as Arc<dyn Filter>], Arc::new(SparseDisk::new(capacity, 512)));
    rt.block_on(write(&zchain, 1 << 30, &[4; 8192], false)).unwrap();
    let ((), peak) = peak_of(|| rt.block_on(zchain.write_zeroes(0, capacity, true)).unwrap());
    eprintln!("FUA write-zeroes of a whole 1 TiB clone: heap peak {} KiB", peak >> 10);
    // The FUA's flush commits every page of the bitmap (32 MiB here): a snapshot and its batch
    // are copies of the bitmap, the size of the disk's state, not of the request.
    let bitmap = zclone.bitmap().memory_bytes();
    assert!(peak < 16 * MIB + 3 * bitmap, "a whole-clone write-zeroes took {} MiB", peak / MIB);
    assert_eq!(LinkedClone::open(setup(&store2)).unwrap().bitmap().allocated(), grains);
}

#[test]
fn a_read_mixed_at_every_level_holds_a_bounded_piece_per_level() {
    let _turn = turn();
    const DEPTH: u64 = 16;
    const READ: u64 = 32 << 20;
    let rt = runtime();
    let (_dir, store) = store_with("c");
    let mut parent = Arc::new(Chain::new("d0", Vec::new(), Arc::new(SparseDisk::new(READ, 512))));
    let at = |k: u64| READ / GRAIN - 1 - (DEPTH - k);
    for k in 1..=DEPTH {
        let clone = LinkedClone::open(CloneSetup {
            disk: &format!("d{k}"),
            parent: parent.clone(),
            copy_on_read: false,
            capacity: READ,
            store: store.clone(),
            namespace: "c",
        })
        .unwrap();
        let chain = Arc::new(Chain::new(&format!("d{k}"), vec![Arc::new(clone)], Arc::new(SparseDisk::new(READ, 512))));
        // Clone k holds grain `at(k)`, the one just before its child's: a 32 MiB read from the
        // top leaves nearly all of it to the parent, mixed, at every level.
        rt.block_on(write(chain.as_ref(), at(k) * GRAIN, &[k as u8; GRAIN as usize], false)).unwrap();
        parent = chain;
    }
    let top = parent;
    let (got, peak) = peak_of(|| rt.block_on(read(top.as_ref(), 0, READ as usize)).unwrap());
    eprintln!("32 MiB read mixed at each of {DEPTH} levels: heap peak {} MiB", peak / MIB);
    for k in 1..=DEPTH {
        assert!(got[(at(k) * GRAIN) as usize..((at(k) + 1) * GRAIN) as usize].iter().all(|b| *b == k as u8));
    }
    // The request's buffer and its copy, then a piece per level.
    let bound = 2 * READ as usize + DEPTH as usize * 2 * MIXED_PIECE as usize;
    assert!(peak < bound, "{} MiB held for a 32 MiB read {DEPTH} levels deep", peak / MIB);
}
