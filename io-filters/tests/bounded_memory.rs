//! Filters keep memory by what was written, not by a disk's size or a request's length.
//!
//! A counting allocator measures the peak of the Rust heap while each test runs (tests of this
//! binary take turns), and refuses any single allocation over 1 GiB: the process then aborts,
//! as the daemon would, so an allocation sized by outside input fails the run instead of
//! taking the machine's memory. RocksDB's own memory is not counted (it is not Rust's heap).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use common::{filter, read, runtime, spec, write, Rig};
use io_filters::filters::integrity::Integrity;
use io_filters::filters::linked_clone::{CloneSetup, LinkedClone, GRAIN, MIXED_PIECE};
use io_filters::{Chain, Filter, FilterError};
use serde_json::json;
use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture};

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

/// Runs `f` and returns its result and the most the heap grew above where it was at the start.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(SeqCst);
    PEAK.store(base, SeqCst);
    let out = f();
    (out, PEAK.load(SeqCst).saturating_sub(base))
}

const MIB: usize = 1 << 20;
const TIB: u64 = 1 << 40;

/// A disk that keeps only the blocks written to it (zeroes elsewhere), of any size.
struct SparseDisk {
    info: DeviceInfo,
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
}

impl SparseDisk {
    fn new(capacity: u64, block_size: u32) -> SparseDisk {
        SparseDisk { info: DeviceInfo { capacity, block_size, read_only: false }, blocks: Mutex::new(HashMap::new()) }
    }

    fn bs(&self) -> u64 {
        u64::from(self.info.block_size)
    }

    fn zero(&self, offset: u64, len: u64) {
        let range = offset / self.bs()..(offset + len) / self.bs();
        self.blocks.lock().unwrap().retain(|b, _| !range.contains(b));
    }
}

impl BlockDevice for SparseDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let bs = self.bs() as usize;
        let blocks = self.blocks.lock().unwrap();
        for (i, out) in buf.as_mut_slice().chunks_mut(bs).enumerate() {
            match blocks.get(&(offset / bs as u64 + i as u64)) {
                Some(data) => out.copy_from_slice(data),
                None => out.fill(0),
            }
        }
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        let bs = self.bs() as usize;
        let mut blocks = self.blocks.lock().unwrap();
        for (i, data) in buf.as_slice().chunks(bs).enumerate() {
            blocks.insert(offset / bs as u64 + i as u64, data.to_vec());
        }
        drop(blocks);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.zero(offset, len);
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        self.zero(offset, len);
        Box::pin(std::future::ready(Ok(())))
    }
}

fn store_with(ns: &str) -> (tempfile::TempDir, Arc<state_store::Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path().join("db")).unwrap();
    store.create_namespace(ns).unwrap();
    (dir, store)
}

#[test]
fn integrity_on_a_64_tib_disk_opens_writes_and_reopens_in_a_few_mib() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
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
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (_dir, store) = store_with("d");
    let (r, peak) = peak_of(|| Integrity::open("d", store.clone(), "d", 1 << 50, 512).map(drop));
    assert!(matches!(r, Err(FilterError::Shape { .. })), "{r:?}");
    assert!(peak < MIB, "{peak} bytes");
    // The catalog refuses to create such a disk, so no record is left to fail every start.
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    let Err(err) = rig.catalog.create(spec("big", 1 << 50, vec![filter("integrity", json!({}))])) else {
        panic!("a disk past the integrity filter's bound was created");
    };
    // The catalog's own bound on disk size (64 TiB) comes first; the filter's is the same.
    let said = err.to_string();
    assert!(said.contains("bytes a disk may have") || said.contains("at most 137438953472 blocks"), "{err}");
    assert!(rig.catalog.entries().is_empty());
}

#[test]
fn an_8_tib_integrity_disk_is_created_discarded_and_reopened_without_memory_for_its_size() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let rt = runtime();
    let _g = rt.enter();
    let mut rig = Rig::new();
    let size = 8 * TIB;
    let ((), peak) = peak_of(|| {
        rig.catalog.create(spec("big", size, vec![filter("integrity", json!({}))])).unwrap();
        let disk = rig.dev("big");
        rt.block_on(async {
            write(disk.as_ref(), size - 8192, &[9; 8192], false).await.unwrap();
            write(disk.as_ref(), 1 << 20, &[8; 4096], false).await.unwrap();
            disk.flush().await.unwrap();
            // A discard of the whole disk (as mkfs sends) marks and zeroes only the pages that
            // exist.
            disk.discard(0, size).await.unwrap();
            disk.flush().await.unwrap();
            assert_eq!(read(disk.as_ref(), size - 8192, 8192).await.unwrap(), vec![0; 8192]);
            write(disk.as_ref(), size - 4096, &[7; 4096], false).await.unwrap();
            disk.flush().await.unwrap();
        });
    });
    eprintln!("8 TiB integrity disk created, written, discarded whole: heap peak {} KiB", peak >> 10);
    assert!(peak < 64 * MIB, "creating and using an 8 TiB disk took {} MiB", peak / MIB);
    let ((), peak) = peak_of(|| rig.reopen());
    eprintln!("8 TiB integrity disk reopened: heap peak {} KiB", peak >> 10);
    assert!(peak < 64 * MIB, "reopening took {} MiB", peak / MIB);
    let disk = rig.dev("big");
    rt.block_on(async {
        assert_eq!(read(disk.as_ref(), size - 8192, 8192).await.unwrap()[4096..], [7; 4096]);
        assert_eq!(read(disk.as_ref(), 1 << 20, 4096).await.unwrap(), vec![0; 4096]);
    });
}

/// Finds disks by name in a fixed set.
struct Disks(HashMap<String, Arc<dyn BlockDevice>>);

impl vdisk::DiskResolver for Disks {
    fn resolve(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.0.get(name).cloned()
    }
}

#[test]
fn a_discard_of_a_whole_1_tib_clone_takes_no_memory_per_grain() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
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
    let resolver = Arc::new(Disks(HashMap::from([("p".to_string(), parent.clone() as Arc<dyn BlockDevice>)])));
    let clone = Arc::new(
        LinkedClone::open(CloneSetup {
            disk: "c",
            parent: "p",
            copy_on_read: false,
            capacity,
            store: store.clone(),
            namespace: "c",
            resolver,
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
    let resolver = Arc::new(Disks(HashMap::from([("p".to_string(), parent.clone() as Arc<dyn BlockDevice>)])));
    let setup = |store: &Arc<state_store::Store>| CloneSetup {
        disk: "z",
        parent: "p",
        copy_on_read: false,
        capacity,
        store: store.clone(),
        namespace: "z",
        resolver: resolver.clone(),
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
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    const DEPTH: u64 = 16;
    const READ: u64 = 32 << 20;
    let rt = runtime();
    let (_dir, store) = store_with("c");
    let base: Arc<dyn BlockDevice> = Arc::new(SparseDisk::new(READ, 512));
    let disks = Arc::new(LateDisks::default());
    disks.0.lock().unwrap().insert("d0".into(), base);
    let at = |k: u64| READ / GRAIN - 1 - (DEPTH - k);
    let mut top = None;
    for k in 1..=DEPTH {
        let clone = LinkedClone::open(CloneSetup {
            disk: &format!("d{k}"),
            parent: &format!("d{}", k - 1),
            copy_on_read: false,
            capacity: READ,
            store: store.clone(),
            namespace: "c",
            resolver: disks.clone(),
        })
        .unwrap();
        let chain: Arc<dyn BlockDevice> =
            Arc::new(Chain::new(&format!("d{k}"), vec![Arc::new(clone)], Arc::new(SparseDisk::new(READ, 512))));
        // Clone k holds grain `at(k)`, the one just before its child's: a 32 MiB read from the
        // top leaves nearly all of it to the parent, mixed, at every level.
        rt.block_on(write(chain.as_ref(), at(k) * GRAIN, &[k as u8; GRAIN as usize], false)).unwrap();
        disks.0.lock().unwrap().insert(format!("d{k}"), chain.clone());
        top = Some(chain);
    }
    let top = top.unwrap();
    let (got, peak) = peak_of(|| rt.block_on(read(top.as_ref(), 0, READ as usize)).unwrap());
    eprintln!("32 MiB read mixed at each of {DEPTH} levels: heap peak {} MiB", peak / MIB);
    for k in 1..=DEPTH {
        assert!(got[(at(k) * GRAIN) as usize..((at(k) + 1) * GRAIN) as usize].iter().all(|b| *b == k as u8));
    }
    // The request's buffer and its copy, then a piece per level.
    let bound = 2 * READ as usize + DEPTH as usize * 2 * MIXED_PIECE as usize;
    assert!(peak < bound, "{} MiB held for a 32 MiB read {DEPTH} levels deep", peak / MIB);
}

/// Disks by name, filled in once the chains exist.
#[derive(Default)]
struct LateDisks(Mutex<HashMap<String, Arc<dyn BlockDevice>>>);

impl vdisk::DiskResolver for LateDisks {
    fn resolve(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.0.lock().unwrap().get(name).cloned()
    }
}
