//! The open-channel device of the daemon, its host FTL driver, and FTL disks on it.
//!
//! The daemon opens one emulated Open-Channel SSD (a sparse file in the data directory, or
//! memory) and the host FTL driver over it, whose partition table lives in the state store. A
//! disk with `backend = { type = "ftl" }` gets whole parallel units of that device as a guest of
//! the driver, and a guest FTL over its queue pair: VM -> guest FTL -> host FTL -> device.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use guest_ftl::{FlashChannel, Ftl, FtlConfig};
use host_ftl::driver::{Driver, DriverConfig, GuestSpec, GuestState};
use host_ftl::{Device, FaultConfig, FileMedia, Geometry, Media, MemMedia};
use serde::Deserialize;
use state_store::Store;

/// Chunks per parallel unit an FTL disk's partition keeps beyond its data at least: the guest FTL
/// refuses to format with less room than its open lines and GC reserve need (about 8 chunks a PU
/// with its default four streams).
const SPARE_CHUNKS_PER_PU: u64 = 10;
/// The most over-provisioning the guest FTL takes (ten times the data); a disk much smaller than
/// one PU gets more capacity than its size, and shows only its size.
const MAX_OVER_PROVISIONING: f64 = 10.0;

/// The `[ocssd]` section: the emulated open-channel device FTL disks live on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcssdConfig {
    /// Where the device keeps its blocks.
    #[serde(default)]
    pub media: MediaKind,
    /// The device file for `media = "file"`; default `<data_dir>/ocssd.img`.
    pub path: Option<PathBuf>,
    /// Groups, parallel units, chunks, blocks and write rules; defaults give 2 GiB.
    #[serde(default)]
    pub geometry: Geometry,
    /// Complete commands when the device's timing model says the media is done.
    #[serde(default)]
    pub timing: bool,
}

impl Default for OcssdConfig {
    fn default() -> Self {
        OcssdConfig { media: MediaKind::File, path: None, geometry: Geometry::default(), timing: false }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// A sparse file: data, chunk states and wear survive a restart.
    #[default]
    File,
    /// Memory: gone when the daemon stops.
    Memory,
}

/// What setting up the device or an FTL disk on it fails with.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("cannot open the open-channel device at {path}")]
    Device {
        path: PathBuf,
        #[source]
        source: host_ftl::Error,
    },
    #[error("cannot set up the open-channel device")]
    Setup(#[source] host_ftl::Error),
    #[error("cannot start the host FTL driver")]
    Driver(#[source] host_ftl::driver::DriverError),
    #[error("the open-channel device has {chunks} chunks per parallel unit; an FTL disk needs more than {SPARE_CHUNKS_PER_PU}")]
    NoRoomPerUnit { chunks: u32 },
    #[error("{size} bytes with {over_provisioning}% over-provisioning and the FTL's spare chunks needs {pus} parallel units; the open-channel device has {total} in all")]
    DeviceTooSmall { size: u64, over_provisioning: u32, pus: u128, total: usize },
    #[error("needs {pus} parallel units of the open-channel device for {size} bytes with its over-provisioning, {free} are free")]
    NoFreeUnits { size: u64, pus: usize, free: usize },
    #[error("cannot give the disk its partition")]
    Partition(#[source] host_ftl::driver::DriverError),
    #[error("its partition of the open-channel device is gone")]
    NoPartition,
    #[error("guest FTL")]
    Ftl(#[source] guest_ftl::FtlError),
}

/// The device, its driver, and the FTL disks on it.
pub struct FlashBackend {
    driver: Driver,
    runtime: tokio::runtime::Handle,
    /// Where the device lives, for the start-up message.
    pub description: String,
}

impl FlashBackend {
    /// Opens (or creates) the device and starts its driver.
    pub fn open(
        config: &OcssdConfig,
        data_dir: &std::path::Path,
        store: Arc<Store>,
        runtime: tokio::runtime::Handle,
    ) -> Result<FlashBackend, FlashError> {
        let geo = config.geometry.clone();
        geo.validate().map_err(FlashError::Setup)?;
        geo.check_spare_chunks(SPARE_CHUNKS_PER_PU).map_err(FlashError::Setup)?;
        let (media, description): (Box<dyn Media>, String) = match config.media {
            MediaKind::File => {
                let path = config.path.clone().unwrap_or_else(|| data_dir.join("ocssd.img"));
                let media = FileMedia::open_or_create(&path, &geo)
                    .map_err(|source| FlashError::Device { path: path.clone(), source })?;
                (Box::new(media), format!("file {}", path.display()))
            }
            MediaKind::Memory => (Box::new(MemMedia::new(&geo).map_err(FlashError::Setup)?), "memory".into()),
        };
        let device = Device::open(geo.clone(), media, FaultConfig::default()).map_err(FlashError::Setup)?;
        let driver_config = DriverConfig { timing: config.timing, ..DriverConfig::default() };
        let driver = Driver::open(Arc::new(device), store, driver_config).map_err(FlashError::Driver)?;
        let description = format!(
            "emulated open-channel SSD ({}; {} groups x {} PUs x {} chunks x {} blocks of {} bytes = {})",
            description,
            geo.num_grp,
            geo.num_pu,
            geo.num_chk,
            geo.clba,
            geo.block_size,
            vdisk::size::format_size(geo.capacity_bytes()),
        );
        Ok(FlashBackend { driver, runtime, description })
    }

    /// Gives a new disk (`id`, `size` bytes) its partition of the device. Durable when it returns:
    /// the catalog's record, written next, is the commit point.
    pub fn create(&self, id: &str, size: u64, over_provisioning: u32) -> Result<(), FlashError> {
        let pus = pus_needed(self.driver.geometry(), size, over_provisioning)?;
        let free = self.driver.free_pus().len();
        if pus > free {
            return Err(FlashError::NoFreeUnits { size, pus, free });
        }
        let region = region_bytes(self.driver.geometry(), pus);
        self.driver.add_guest(id, GuestSpec::new(pus).region(region)).map_err(FlashError::Partition)?;
        Ok(())
    }

    /// Opens disk `id`'s FTL on its partition (formatting it on first use, recovering it after a
    /// crash) as a device of exactly `size` bytes in `block_size` blocks, its state in
    /// `namespace`. Blocking.
    pub fn open_disk(
        &self,
        id: &str,
        size: u64,
        block_size: u32,
        over_provisioning: u32,
        store: &Arc<Store>,
        namespace: &str,
    ) -> Result<Arc<Ftl>, FlashError> {
        let qp = self.driver.guest(id).ok_or(FlashError::NoPartition)?;
        // The FTL gets all of its partition: the flash beyond the disk's size, which is at least
        // the over-provisioning asked for (whole PUs round it up), all goes to garbage collection.
        // Slightly less than the exact ratio, so that rounding never leaves it short of the size.
        let physical = qp.geometry().capacity_bytes() as f64;
        let effective = (physical / size.max(1) as f64 - 1.0) * 0.999;
        let asked = f64::from(over_provisioning) / 100.0;
        let config = FtlConfig {
            over_provisioning: effective.max(asked).min(MAX_OVER_PROVISIONING),
            block_size,
            capacity: Some(size),
            ..FtlConfig::default()
        };
        let channel: Arc<dyn FlashChannel> = Arc::new(qp);
        let ftl = self.block_on(Ftl::open(channel, store.clone(), namespace, config)).map_err(FlashError::Ftl)?;
        Ok(Arc::new(ftl))
    }

    /// Gives a deleted disk's partition back; its chunks are erased in the background.
    pub fn remove(&self, id: &str) {
        if let Err(e) = self.driver.remove_guest(id) {
            tracing::warn!(%id, error = %vdisk::error_chain(&e), "cannot give back the partition; it goes at the next start");
        }
    }

    /// The disk ids that hold a partition, to find the remains of an interrupted create.
    pub fn ids(&self) -> Vec<String> {
        self.driver
            .guests()
            .into_iter()
            .filter(|g| g.record.state == GuestState::Active)
            .map(|g| g.record.name)
            .collect()
    }

    /// The host FTL driver, for its metrics.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// Runs an FTL future to its end from blocking code, whatever thread that is: the catalog
    /// is called both from the runtime's own thread and from blocking tasks.
    fn block_on<T: Send>(&self, fut: impl Future<Output = T> + Send) -> T {
        std::thread::scope(|s| match s.spawn(|| self.runtime.block_on(fut)).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}

/// A DMA region big enough for the FTL's largest batches and its lock-free reads (see
/// `guest_ftl::io`).
fn region_bytes(geo: &Geometry, pus: usize) -> u64 {
    guest_ftl::io::region_bytes(geo, pus) as u64
}

/// Parallel units a disk of `size` bytes needs: `over_provisioning` percent extra, and on each PU
/// at least [`SPARE_CHUNKS_PER_PU`] chunks beyond the disk's data for the FTL's open lines and
/// garbage collection. In closed form, so that no size, however large, costs more than this.
fn pus_needed(geo: &Geometry, size: u64, over_provisioning: u32) -> Result<usize, FlashError> {
    let chunk = u128::from(geo.chunk_bytes().max(1));
    let pu_bytes = u128::from(geo.num_chk) * chunk;
    // What each PU holds of the disk's data once its spare chunks are set aside.
    let usable = pu_bytes.saturating_sub(u128::from(SPARE_CHUNKS_PER_PU) * chunk);
    if usable == 0 {
        return Err(FlashError::NoRoomPerUnit { chunks: geo.num_chk });
    }
    let needed = (u128::from(size) * (100 + u128::from(over_provisioning))).div_ceil(100);
    let pus = needed.div_ceil(pu_bytes).max(u128::from(size).div_ceil(usable)).max(1);
    let total = geo.total_pus();
    match usize::try_from(pus) {
        Ok(pus) if pus <= total => Ok(pus),
        _ => Err(FlashError::DeviceTooSmall { size, over_provisioning, pus, total }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_units_for_a_disk_in_closed_form() {
        let geo = Geometry::default();
        let chunk = geo.chunk_bytes();
        let pu = u64::from(geo.num_chk) * chunk;
        let usable = pu - SPARE_CHUNKS_PER_PU * chunk;
        // The smallest count that leaves the spare chunks free and the over-provisioning.
        assert_eq!(pus_needed(&geo, 1, 11).unwrap(), 1);
        assert_eq!(pus_needed(&geo, usable, 1).unwrap(), (usable * 101).div_ceil(100).div_ceil(pu) as usize);
        assert_eq!(pus_needed(&geo, usable + 512, 1).unwrap(), 2);
        for pus in 1..=geo.total_pus() as u64 {
            let size = pus * usable;
            let n = pus_needed(&geo, size, 1).unwrap() as u64;
            assert!(n * pu >= size + n * SPARE_CHUNKS_PER_PU * chunk && n * pu >= (size * 101).div_ceil(100));
            assert!(n == 1 || (n - 1) * usable < size || (n - 1) * pu < (size * 101).div_ceil(100), "{n} is the least");
        }
        // Sizes no device holds are refused at once, however large.
        assert!(pus_needed(&geo, u64::MAX - 511, 400).is_err());
        assert!(pus_needed(&geo, 1 << 62, 11).is_err());
        // A device whose PUs cannot even hold their spare chunks takes no FTL disk.
        let tiny = Geometry { num_chk: SPARE_CHUNKS_PER_PU as u32, ..Geometry::default() };
        assert!(matches!(pus_needed(&tiny, 4096, 11), Err(FlashError::NoRoomPerUnit { .. })));
    }
}
