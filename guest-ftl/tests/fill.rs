//! A full disk overwritten randomly several times over slows down but never stalls or errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use common::*;
use guest_ftl::{FtlConfig, VictimPolicy};
use host_ftl::Geometry;
use test_support::Rng;
use vdisk::BlockDevice;

/// 4 PUs × 40 chunks × 16 blocks: 2560 slots (10 MiB).
fn geometry() -> Geometry {
    Geometry { num_chk: 40, ..small_geometry() }
}

async fn fill_and_overwrite(cfg: FtlConfig, passes: u64) {
    let rig = Rig::new(geometry(), cfg);
    let ftl = rig.open().await;
    let lbas = ftl.info().capacity / 4096;
    let mut version = vec![0u32; lbas as usize];
    for lba in 0..lbas {
        version[lba as usize] = 1;
        write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
    }
    let full = ftl.metrics();
    let mut rng = Rng::new(1);
    for i in 0..passes * lbas {
        let lba = rng.below(lbas);
        version[lba as usize] += 1;
        // Every 97th write is FUA and every 501st request a flush, as a guest would mix them.
        write(&ftl, lba * 4096, &pattern(lba, version[lba as usize], 4096), i % 97 == 0).await;
        if i % 501 == 0 {
            ftl.flush().await.unwrap();
        }
    }
    for lba in 0..lbas {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, version[lba as usize], 4096), "lba {lba}");
    }
    let m = ftl.metrics();
    assert!(m.gc_runs > full.gc_runs + 10, "garbage collection ran: {m:?}");
    assert!(m.write_amplification() > 1.0);
    assert!(m.throttled_ns > 0, "user writes paid for GC");
    assert!(m.checkpoints > 0);
    assert_eq!(m.lost_blocks, 0);
    // Everything still holds after a clean restart.
    ftl.shutdown().await.unwrap();
    drop(ftl);
    let ftl = rig.open().await;
    for lba in (0..lbas).step_by(7) {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, version[lba as usize], 4096), "lba {lba}");
    }
}

#[tokio::test]
async fn full_disk_overwritten_with_hot_cold_streams_and_cost_benefit() {
    let cfg = FtlConfig {
        over_provisioning: 0.35,
        victim: VictimPolicy::CostBenefit,
        hot_cold: true,
        ..FtlConfig::default()
    };
    fill_and_overwrite(cfg, 3).await;
}

#[tokio::test]
async fn full_disk_overwritten_with_one_stream_and_greedy() {
    let cfg =
        FtlConfig { over_provisioning: 0.15, victim: VictimPolicy::Greedy, hot_cold: false, ..FtlConfig::default() };
    fill_and_overwrite(cfg, 3).await;
}

#[tokio::test]
async fn over_provisioning_too_small_for_gc_is_refused() {
    let cfg = FtlConfig { over_provisioning: 0.01, ..FtlConfig::default() };
    let rig = Rig::new(geometry(), cfg.clone());
    let ch: std::sync::Arc<dyn guest_ftl::FlashChannel> = rig.ch.clone();
    let r = guest_ftl::Ftl::open(ch, rig.store.clone(), "disk", cfg).await;
    assert!(matches!(r, Err(guest_ftl::FtlError::Config(_))));
}
