//! A test rig: an FTL on a device with power-loss media and a real state store.

#![allow(dead_code)]

use std::sync::Arc;

use guest_ftl::{DirectChannel, FlashChannel, Ftl, FtlConfig, PowerLossMedia};
use host_ftl::{Device, FaultConfig, Geometry};
use state_store::Store;
use vdisk::{BlockDevice, IoBuf};

/// 1 group × 4 PUs × 32 chunks × 16 blocks of 4 KiB (8 MiB), 16 bytes of OOB.
pub fn small_geometry() -> Geometry {
    Geometry {
        num_grp: 1,
        num_pu: 4,
        num_chk: 32,
        clba: 16,
        block_size: 4096,
        oob_size: 16,
        ws_min: 2,
        ws_opt: 4,
        mw_cunits: 4,
        maxoc: 32,
        maxocpu: 8,
        endurance: 1000,
        ..Geometry::default()
    }
}

pub fn small_config() -> FtlConfig {
    FtlConfig { over_provisioning: 0.5, checkpoint_lines: 4, ..FtlConfig::default() }
}

pub struct Rig {
    pub geo: Geometry,
    pub cfg: FtlConfig,
    pub media: Arc<PowerLossMedia>,
    pub ch: Arc<DirectChannel>,
    pub store: Arc<Store>,
    _dir: tempfile::TempDir,
}

pub fn channel(geo: &Geometry, media: &Arc<PowerLossMedia>) -> Arc<DirectChannel> {
    let dev = Device::open(geo.clone(), Box::new(media.clone()), FaultConfig::default()).unwrap();
    Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(geo)))
}

impl Rig {
    pub fn new(geo: Geometry, cfg: FtlConfig) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let media = Arc::new(PowerLossMedia::new(&geo).unwrap());
        let ch = channel(&geo, &media);
        Rig { geo, cfg, media, ch, store, _dir: dir }
    }

    pub async fn open(&self) -> Ftl {
        let ch: Arc<dyn FlashChannel> = self.ch.clone();
        Ftl::open(ch, self.store.clone(), "disk", self.cfg.clone()).await.unwrap()
    }

    /// Power fails after the first `keep` unflushed media operations reached the media; the
    /// FTL must have been dropped. The device comes back on what survived.
    pub fn crash(&mut self, keep: usize) {
        let media = Arc::new(self.media.power_loss(keep));
        self.ch = channel(&self.geo, &media);
        self.media = media;
    }
}

pub fn pattern(lba: u64, version: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (lba as u32).wrapping_mul(131).wrapping_add(version * 7 + i as u32 / 512) as u8).collect()
}

pub async fn write(ftl: &Ftl, offset: u64, data: &[u8], fua: bool) {
    ftl.write(offset, IoBuf::copy_from(data), fua).await.unwrap();
}

pub async fn read(ftl: &Ftl, offset: u64, len: usize) -> Vec<u8> {
    ftl.read(offset, IoBuf::zeroed(len)).await.unwrap().as_slice().to_vec()
}
