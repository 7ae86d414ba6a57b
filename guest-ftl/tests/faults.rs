//! Injected media faults lose no acknowledged data: failed programs, early closes, chunks
//! going offline (free, open with buffered data, worn out at reset), failed resets and high-ECC
//! warnings. A closed chunk going offline loses its blocks (no parity): reads of them fail
//! instead of returning wrong data, and rewriting them heals the disk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::*;
use guest_ftl::FtlConfig;
use host_ftl::{Addr, Fault, FaultKind, Geometry};
use vdisk::{BlockDevice, IoBuf};

fn cfg() -> FtlConfig {
    FtlConfig { over_provisioning: 0.3, notify_every: 8, ..FtlConfig::default() }
}

fn geometry() -> Geometry {
    Geometry { num_chk: 40, ..small_geometry() }
}

async fn write_all(ftl: &guest_ftl::Ftl, n: u64, version: u32) {
    for lba in 0..n {
        write(ftl, lba * 4096, &pattern(lba, version, 4096), false).await;
    }
}

async fn check_all(ftl: &guest_ftl::Ftl, n: u64, version: u32) {
    for lba in 0..n {
        assert_eq!(read(ftl, lba * 4096, 4096).await, pattern(lba, version, 4096), "lba {lba}");
    }
}

fn chunk_index(geo: &Geometry, pu: u16, chk: u32) -> u32 {
    u32::from(pu) * geo.num_chk + chk
}

#[tokio::test]
async fn program_failures_and_early_close_retire_the_chunk_and_keep_the_data() {
    // The first user line takes chunk 0 of every PU, written in 4-block units, stripe by stripe.
    let faults = [
        Fault::once(FaultKind::ProgramFail, Addr::new(0, 1, 0, 0)),
        Fault::once(FaultKind::ProgramFail, Addr::new(0, 2, 0, 6)),
        Fault::once(FaultKind::EarlyClose, Addr::new(0, 3, 0, 8)),
    ];
    for fault in faults {
        let mut rig = Rig::new(geometry(), cfg());
        rig.ch.device().inject(fault.clone()).unwrap();
        let ftl = rig.open().await;
        write_all(&ftl, 200, 1).await;
        ftl.flush().await.unwrap();
        check_all(&ftl, 200, 1).await;
        let bad = ftl.bad_chunks().await;
        assert_eq!(bad, vec![chunk_index(&rig.geo, fault.at.pu, 0)], "{fault:?}");
        drop(ftl);
        rig.crash(0);
        let ftl = rig.open().await;
        check_all(&ftl, 200, 1).await;
        assert_eq!(ftl.bad_chunks().await, bad, "retired chunks stay retired");
    }
}

#[tokio::test]
async fn a_fua_write_whose_program_fails_is_made_durable_elsewhere() {
    let mut rig = Rig::new(geometry(), cfg());
    rig.ch.device().inject(Fault::sticky(FaultKind::ProgramFail, Addr::new(0, 0, 0, 0))).unwrap();
    let ftl = rig.open().await;
    write(&ftl, 0, &pattern(0, 7, 4096), true).await;
    drop(ftl);
    rig.crash(0);
    let ftl = rig.open().await;
    assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 7, 4096));
}

#[tokio::test]
async fn offline_free_and_open_chunks_lose_nothing() {
    let mut rig = Rig::new(geometry(), cfg());
    let ftl = rig.open().await;
    // Buffered data (less than a stripe unit) whose chunk goes offline before it is written.
    write(&ftl, 0, &pattern(0, 1, 4096), false).await;
    write(&ftl, 4096, &pattern(1, 1, 4096), false).await;
    rig.ch.device().set_offline(Addr::new(0, 0, 0, 0)).unwrap();
    // Free chunks going offline are skipped.
    for chk in [3, 5, 9] {
        rig.ch.device().set_offline(Addr::new(0, 2, chk, 0)).unwrap();
    }
    ftl.flush().await.unwrap();
    write_all(&ftl, 300, 2).await;
    ftl.flush().await.unwrap();
    check_all(&ftl, 300, 2).await;
    let bad = ftl.bad_chunks().await;
    for (pu, chk) in [(0, 0), (2, 3), (2, 5), (2, 9)] {
        assert!(bad.contains(&chunk_index(&rig.geo, pu, chk)), "chunk {pu}/{chk} retired: {bad:?}");
    }
    drop(ftl);
    rig.crash(0);
    let ftl = rig.open().await;
    check_all(&ftl, 300, 2).await;
}

#[tokio::test]
async fn worn_out_chunks_are_retired_and_the_disk_degrades_without_hanging() {
    let geo = Geometry { endurance: 3, ..geometry() };
    let rig = Rig::new(geo, FtlConfig { over_provisioning: 0.6, ..cfg() });
    let ftl = rig.open().await;
    let lbas = ftl.info().capacity / 4096;
    let mut version = vec![0u32; lbas as usize];
    let mut failed = None;
    'outer: for pass in 1..40u32 {
        for lba in 0..lbas {
            let r = ftl.write(lba * 4096, IoBuf::copy_from(&pattern(lba, pass, 4096)), false).await;
            if let Err(e) = r {
                failed = Some(e.to_string());
                break 'outer;
            }
            version[lba as usize] = pass;
        }
    }
    assert!(!ftl.bad_chunks().await.is_empty(), "chunks wore out");
    assert!(failed.is_some(), "with endurance 3 the disk runs out of good chunks");
    // Every acknowledged write still reads back (those that never got written read as zeros).
    for lba in 0..lbas {
        let want = if version[lba as usize] == 0 { vec![0; 4096] } else { pattern(lba, version[lba as usize], 4096) };
        assert_eq!(read(&ftl, lba * 4096, 4096).await, want, "lba {lba}");
    }
}

#[tokio::test]
async fn failed_resets_retire_the_chunk() {
    let rig = Rig::new(geometry(), cfg());
    rig.ch.device().inject(Fault::sticky(FaultKind::ResetFail, Addr::new(0, 1, 0, 0))).unwrap();
    let ftl = rig.open().await;
    for v in 1..11 {
        write_all(&ftl, 400, v).await;
    }
    check_all(&ftl, 400, 10).await;
    assert!(ftl.bad_chunks().await.contains(&chunk_index(&rig.geo, 1, 0)));
}

#[tokio::test]
async fn high_ecc_warnings_return_the_data_and_refresh_the_line() {
    let rig = Rig::new(geometry(), cfg());
    let ftl = rig.open().await;
    write_all(&ftl, 64, 1).await; // exactly the first line: 4 chunks × 16 blocks
    ftl.flush().await.unwrap();
    let wear_before = rig.ch.device().wear(Addr::new(0, 0, 0, 0)).unwrap();
    rig.ch.device().inject(Fault::once(FaultKind::HighEcc, Addr::new(0, 0, 0, 1))).unwrap();
    check_all(&ftl, 64, 1).await;
    ftl.flush().await.unwrap(); // the next request relocates the warned line
    check_all(&ftl, 64, 1).await;
    assert_eq!(rig.ch.device().wear(Addr::new(0, 0, 0, 0)).unwrap(), wear_before + 1, "the line was moved and reset");
}

#[tokio::test]
async fn a_closed_chunk_going_offline_fails_reads_of_its_blocks_until_rewritten() {
    let rig = Rig::new(geometry(), cfg());
    let ftl = rig.open().await;
    write_all(&ftl, 128, 1).await;
    ftl.flush().await.unwrap();
    // Lines are striped in 4-block units: blocks 0-3, 16-19, ... of the disk sit on PU 0 chunk 0.
    rig.ch.device().set_offline(Addr::new(0, 0, 0, 0)).unwrap();
    ftl.flush().await.unwrap(); // polls notifications, relocates what can be read
    assert!(ftl.read(0, IoBuf::zeroed(4096)).await.is_err(), "a lost block fails, never reads wrong data");
    for lba in [4u64, 5, 8, 12, 15, 20, 100] {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "lba {lba}");
    }
    assert!(ftl.metrics().lost_blocks > 0);
    write(&ftl, 0, &pattern(0, 2, 4096), false).await;
    assert_eq!(read(&ftl, 0, 4096).await, pattern(0, 2, 4096));
}
