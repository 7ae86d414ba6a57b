//! Disks the catalog creates keep memory by what was written, not by their size: a counting
//! allocator measures the Rust heap while each test runs (they take turns), and refuses any single
//! allocation over 1 GiB, so that an allocation sized by a disk's size fails the run instead of
//! taking the machine's memory. RocksDB's own memory is not counted (it is not Rust's heap).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::sync::Mutex;

use common::{filter, read, runtime, spec, write, Rig};
use serde_json::json;
use test_support::alloc::{peak_in_process, refuse_above, Counting};
use vdisk::{error_chain, BlockDevice};

#[global_allocator]
static ALLOC: Counting = Counting;

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    refuse_above(1 << 30);
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: usize = 1 << 20;
const TIB: u64 = 1 << 40;

#[test]
fn a_disk_past_the_integrity_filters_bound_is_refused_before_its_record_exists() {
    let _turn = turn();
    let rt = runtime();
    let _g = rt.enter();
    let rig = Rig::new();
    let Err(err) = rig.catalog.create(spec("big", 1 << 50, vec![filter("integrity", json!({}))])) else {
        panic!("a disk past the integrity filter's bound was created");
    };
    // The catalog's own bound on disk size (64 TiB) comes first; the filter's is the same.
    let said = error_chain(&err);
    assert!(said.contains("bytes a disk may have") || said.contains("at most 137438953472 blocks"), "{said}");
    assert!(rig.catalog.entries().is_empty());
}

#[test]
fn an_8_tib_integrity_disk_is_created_discarded_and_reopened_without_memory_for_its_size() {
    let _turn = turn();
    let rt = runtime();
    let _g = rt.enter();
    let mut rig = Rig::new();
    let size = 8 * TIB;
    let ((), peak) = peak_in_process(|| {
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
    let ((), peak) = peak_in_process(|| rig.reopen());
    eprintln!("8 TiB integrity disk reopened: heap peak {} KiB", peak >> 10);
    assert!(peak < 64 * MIB, "reopening took {} MiB", peak / MIB);
    let disk = rig.dev("big");
    rt.block_on(async {
        assert_eq!(read(disk.as_ref(), size - 8192, 8192).await.unwrap()[4096..], [7; 4096]);
        assert_eq!(read(disk.as_ref(), 1 << 20, 4096).await.unwrap(), vec![0; 4096]);
    });
}
