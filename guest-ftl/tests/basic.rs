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
