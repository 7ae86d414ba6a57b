#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking
mod common;

use common::*;
use vdisk::BlockDevice;

#[tokio::test]
async fn writes_read_back_and_survive_a_clean_restart() {
    let rig = Rig::new(small_geometry(), small_config());
    let ftl = rig.open().await;
    let cap = ftl.info().capacity;
    assert!(cap > 0);
    for lba in 0..cap / 4096 {
        write(&ftl, lba * 4096, &pattern(lba, 1, 4096), false).await;
    }
    for lba in 0..cap / 4096 {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "lba {lba}");
    }
    ftl.shutdown().await.unwrap();
    drop(ftl);
    let ftl = rig.open().await;
    for lba in 0..cap / 4096 {
        assert_eq!(read(&ftl, lba * 4096, 4096).await, pattern(lba, 1, 4096), "lba {lba} after restart");
    }
}

#[tokio::test]
async fn a_damaged_format_record_is_refused_before_the_map_is_made() {
    // Found by the ftl_checkpoint fuzz target: a format record claiming 2^32 - 1 blocks made
    // the FTL allocate a 16 GiB map before reading anything else.
    let rig = Rig::new(small_geometry(), small_config());
    let ftl = rig.open().await;
    ftl.shutdown().await.unwrap();
    drop(ftl);
    let saved = rig.store.get("disk", b"ftl/format").unwrap().unwrap();
    let good = guest_ftl::checkpoint::Format::decode(&saved).unwrap();
    for bad in [
        guest_ftl::checkpoint::Format { user_lbas: u32::MAX, ..good },
        guest_ftl::checkpoint::Format { user_lbas: 0, ..good },
        guest_ftl::checkpoint::Format { block_size: 0, ..good },
    ] {
        let mut batch = state_store::Batch::new();
        batch.put("disk", b"ftl/format", bad.encode());
        rig.store.commit(batch).unwrap();
        let ch: std::sync::Arc<dyn guest_ftl::FlashChannel> = rig.ch.clone();
        let opened = guest_ftl::Ftl::open(ch, rig.store.clone(), "disk", rig.cfg.clone()).await;
        assert!(matches!(opened, Err(guest_ftl::FtlError::Metadata(_))), "{bad:?}");
    }
}
