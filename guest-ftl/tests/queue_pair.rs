//! The guest FTL over a real queue pair of the host FTL driver: every command goes through the
//! driver's validation, translation to device PUs and scheduling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod common;

use std::sync::Arc;

use common::{pattern, read, write};
use guest_ftl::{FlashChannel, Ftl, FtlConfig};
use host_ftl::driver::{Driver, DriverConfig, GuestSpec};
use host_ftl::{Device, Geometry};
use vdisk::BlockDevice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftl_on_a_driver_queue_pair_writes_recovers_and_stays_in_its_partition() {
    let geo = Geometry {
        num_grp: 1,
        num_pu: 8,
        num_chk: 24,
        clba: 16,
        ws_min: 2,
        ws_opt: 4,
        mw_cunits: 4,
        ..Geometry::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = state_store::Store::open(dir.path()).unwrap();
    let device = Arc::new(Device::in_memory(geo.clone()).unwrap());
    let driver = Driver::open(device.clone(), store.clone(), DriverConfig::default()).unwrap();
    let qp = Arc::new(driver.add_guest("vm1", GuestSpec::new(4)).unwrap());
    assert_eq!(qp.geometry().total_pus(), 4, "the guest sees its own PUs only");
    let cfg = FtlConfig { over_provisioning: 0.5, ..FtlConfig::default() };
    let ch: Arc<dyn FlashChannel> = qp.clone();
    let ftl = Ftl::open(ch.clone(), store.clone(), "vm1-disk", cfg.clone()).await.unwrap();
    let lbas = ftl.info().capacity / 4096;
    // Fill and overwrite so that garbage collection runs through the driver too.
    for pass in 1..=3u32 {
        for lba in 0..lbas {
            write(&ftl, lba * 4096, &pattern(lba, pass, 4096), lba % 50 == 0).await;
        }
    }
    ftl.flush().await.unwrap();
    assert!(ftl.metrics().gc_runs > 0);
    drop(ftl);
    // A new FTL on the same queue pair recovers everything flushed.
    let ftl = Ftl::open(ch, store, "vm1-disk", cfg).await.unwrap();
    for lba in 0..lbas {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 3, 4096), "lba {lba}");
    }
    // The driver put the guest on 4 of the device's 8 PUs: the others were never written.
    let written: Vec<usize> = (0..geo.total_pus())
        .filter(|&pu| {
            device
                .chunk_info(pu * geo.num_chk as usize..(pu + 1) * geo.num_chk as usize)
                .iter()
                .any(|d| d.state != host_ftl::ChunkState::Free || d.wli > 0)
        })
        .collect();
    assert_eq!(written.len(), 4, "PUs written: {written:?}");
}
