//! Recovery reads only what was written since the last checkpoint, whatever the disk's size;
//! wear levelling keeps chunks in rotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::*;
use guest_ftl::FtlConfig;
use host_ftl::Geometry;
use vdisk::BlockDevice;

#[tokio::test]
async fn recovery_scans_about_the_checkpoint_interval_not_the_disk() {
    let geo = Geometry { num_chk: 64, ..small_geometry() }; // 64 lines of 64 blocks
    let cfg = FtlConfig { over_provisioning: 0.3, checkpoint_lines: 2, ..FtlConfig::default() };
    let mut rig = Rig::new(geo, cfg);
    let ftl = rig.open().await;
    let lbas = ftl.info().capacity / 4096;
    for pass in 1..=2u32 {
        for lba in 0..lbas {
            write(&ftl, lba * 4096, &pattern(lba, pass, 4096), false).await;
        }
    }
    ftl.flush().await.unwrap();
    assert!(ftl.metrics().checkpoints > 10);
    drop(ftl);
    rig.crash(0);
    let ftl = rig.open().await;
    let scanned = ftl.metrics().recovery_scanned;
    // At most the lines opened since the checkpoint (2) and those open at it (4 streams), with
    // a line of slack for the checkpoint being taken after the request that crossed the limit.
    let line = 4 * 16;
    assert!(scanned <= (2 + 4 + 1) * line, "scanned {scanned} blocks of a {}-block disk", 64 * line);
    for lba in (0..lbas).step_by(5) {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 2, 4096), "lba {lba}");
    }
}

/// Writes half the disk once and rewrites the other half many times; returns how many chunks
/// were never reset, and the wear-levelling migrations.
async fn unworn_chunks(wear_spread: u32) -> (usize, u64) {
    let cfg = FtlConfig { over_provisioning: 0.5, wear_spread, ..FtlConfig::default() };
    let rig = Rig::new(small_geometry(), cfg);
    let ftl = rig.open().await;
    let lbas = ftl.info().capacity / 4096;
    for lba in 0..lbas / 2 {
        write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
    }
    for pass in 2..18u32 {
        for lba in lbas / 2..lbas {
            write(&ftl, lba * 4096, &pattern(lba, pass, 4096), false).await;
        }
    }
    for lba in 0..lbas / 2 {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "cold lba {lba}");
    }
    let wear = ftl.chunk_wear().await;
    let m = ftl.metrics();
    // The erase gauges follow the chunk wear.
    assert_eq!(m.erases, wear.iter().map(|&w| u64::from(w)).sum::<u64>());
    assert_eq!(m.wear_max, u64::from(wear.iter().copied().max().unwrap_or(0)));
    assert!(m.erases > 0);
    let unworn = wear.iter().filter(|&&w| w == 0).count();
    (unworn, m.wl_migrations)
}

#[tokio::test]
async fn static_wear_levelling_moves_cold_data_off_fresh_chunks() {
    let (without, none) = unworn_chunks(u32::MAX).await;
    let (with, moved) = unworn_chunks(3).await;
    assert_eq!(none, 0);
    assert!(moved > 0);
    // Without it the lines of cold data never move; with it, only chunks of lines still open
    // (four streams of four PUs) may never have been reset.
    assert!(without > 16, "{without} chunks never reset without wear levelling");
    assert!(with <= 16, "{with} chunks never reset with wear levelling");
}

/// A clean stop leaves nothing for the next open to scan; a write after the stop (or after the
/// restart) still reaches a line that recovery scans.
#[tokio::test]
async fn a_clean_stop_leaves_nothing_to_scan() {
    let mut rig = Rig::new(small_geometry(), small_config());
    let ftl = rig.open().await;
    let lbas = ftl.info().capacity / 4096;
    // A third of the disk: lines of every user stream are left open.
    for lba in 0..lbas / 3 {
        write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
    }
    ftl.shutdown().await.unwrap();
    // The FTL keeps working after its stop; this write must survive a crash.
    write(&ftl, 0, &pattern(0, 2, 4096), true).await;
    drop(ftl);
    rig.crash(0);
    let ftl = rig.open().await;
    assert!(ftl.metrics().recovery_scanned > 0, "the write after the stop is in a scanned line");
    assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 2, 4096));
    for lba in 1..lbas / 3 {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "lba {lba}");
    }
    for lba in lbas / 3..lbas / 2 {
        write(&ftl, lba * 4096, &pattern(lba, 3, 4096), false).await;
    }
    ftl.shutdown().await.unwrap();
    drop(ftl);
    let ftl = rig.open().await;
    assert_eq!(ftl.metrics().recovery_scanned, 0, "a clean stop leaves nothing to scan");
    assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 2, 4096));
    for lba in 1..lbas / 2 {
        let version = if lba < lbas / 3 { 1 } else { 3 };
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, version, 4096), "lba {lba} after a clean stop");
    }
}
