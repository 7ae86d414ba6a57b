//! Reads run without the FTL's lock, beside writes and garbage collection: they must still see
//! every block's data while GC moves it and resets the chunks it came from.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use guest_ftl::{Ftl, FtlConfig};
use host_ftl::Geometry;
use vdisk::BlockDevice;

/// 4 PUs × 40 chunks × 16 blocks: 2560 slots (10 MiB).
fn geometry() -> Geometry {
    Geometry { num_chk: 40, ..small_geometry() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_beside_overwrites_and_gc_see_the_data_of_moved_blocks() {
    let cfg = FtlConfig { over_provisioning: 0.3, ..small_config() };
    let rig = Rig::new(geometry(), cfg);
    let ftl: Arc<Ftl> = Arc::new(rig.open().await);
    let lbas = ftl.info().capacity / 4096;
    // Even blocks are written once (cold), odd ones over and over (hot): every line holds both,
    // so garbage collection keeps moving cold blocks and resetting their old chunks.
    for lba in 0..lbas {
        write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
    }
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ftl, done) = (ftl.clone(), done.clone());
        tokio::spawn(async move {
            for pass in 2..=6u32 {
                for lba in (1..lbas).step_by(2) {
                    write(&ftl, lba * 4096, &pattern(lba, pass, 4096), lba % 101 == 1).await;
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut readers = Vec::new();
    for r in 0..6u64 {
        let (ftl, done) = (ftl.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut lba = r * 2;
            let mut reads = 0u64;
            while !done.load(Ordering::SeqCst) {
                // One block, and a run of two (one cold, one hot: the hot one may be any version).
                assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "lba {lba}");
                let two = read(&ftl, lba * 4096, 8192).await;
                assert_eq!(&two[..4096], &pattern(lba, 1, 4096)[..], "lba {lba} of two");
                lba = (lba + 2 * 7) % (lbas - 1) / 2 * 2;
                reads += 2;
            }
            reads
        }));
    }
    writer.await.unwrap();
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 0);
    assert!(ftl.metrics().gc_runs > 0, "garbage collection ran meanwhile");
    for lba in 0..lbas {
        let v = if lba % 2 == 0 { 1 } else { 6 };
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, v, 4096), "lba {lba}");
    }
}
