//! Records read back from storage: the catalog's disk records, a linked clone's bitmap pages,
//! the integrity filter's checksum pages and intent marks, the guest FTL's checkpoint, and the
//! image cache's index. Each target writes the input's records into a real state store and
//! opens the real owner of those records on them.
//!
//! Record inputs are parts (see [`crate::parts`]) of the form `SELECTOR LEN KEY VALUE`: one byte
//! choosing the key's prefix, one byte of key length, the rest of the key, and the value.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use state_store::{Batch, Store};
use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture};

/// Records per input, at most.
const MAX_RECORDS: usize = 16;
/// How long a read may take before the target stops waiting for it.
const SLOW: std::time::Duration = std::time::Duration::from_millis(200);

/// One record of the input: the selector byte, the key after it, the value.
pub fn record(part: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let [selector, len, rest @ ..] = part else { return None };
    let len = usize::from(*len).min(rest.len());
    Some((*selector, &rest[..len], &rest[len..]))
}

/// Writes a record part, for seeds (keys up to 255 bytes).
pub fn encode_record(selector: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![selector, key.len() as u8];
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// The records of an input, with their keys made from `prefixes` (indexed by the selector
/// modulo their count; the last one is usually empty, for keys of any shape).
fn records(data: &[u8], prefixes: &[&[u8]]) -> Vec<(Vec<u8>, Vec<u8>)> {
    crate::parts(data, MAX_RECORDS)
        .into_iter()
        .filter_map(record)
        .map(|(sel, key, value)| {
            let mut k = prefixes[usize::from(sel) % prefixes.len()].to_vec();
            k.extend_from_slice(key);
            (k, value.to_vec())
        })
        .collect()
}

/// A store shared by the record targets, each in namespaces of its own.
fn store() -> &'static (Arc<Store>, tempfile::TempDir) {
    static STORE: OnceLock<(Arc<Store>, tempfile::TempDir)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = crate::temp_dir();
        (Store::open(dir.path().join("db")).unwrap(), dir)
    })
}

/// Empties namespace `ns` (creating it if need be) and writes `records` into it, in one batch.
/// Making a namespace costs RocksDB an options file, so it is emptied by deletes, and made
/// afresh only every so often, before its tombstones slow scans down.
fn fill(store: &Store, ns: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    static FILLS: AtomicU32 = AtomicU32::new(0);
    let fresh = FILLS.fetch_add(1, Relaxed) % 512 == 0;
    if fresh && store.has_namespace(ns) {
        store.drop_namespace(ns).unwrap();
    }
    if !store.has_namespace(ns) {
        store.create_namespace(ns).unwrap();
    }
    let mut batch = Batch::new();
    for k in store.scan_prefix(ns, b"").unwrap().into_keys() {
        batch.delete(ns, k);
    }
    for (k, v) in records {
        batch.put(ns, k, v);
    }
    store.commit(batch).unwrap();
}

/// A disk whose every byte is `byte`; writes are dropped.
struct ConstDisk {
    byte: u8,
    info: DeviceInfo,
}

impl BlockDevice for ConstDisk {
    fn info(&self) -> DeviceInfo {
        self.info
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let end = offset.checked_add(buf.len() as u64);
        assert!(end.is_some_and(|e| e <= self.info.capacity), "an unchecked read reached the disk");
        buf.as_mut_slice().fill(self.byte);
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn write(&self, _offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

// ---------------------------------------------------------------------------------------------
// The catalog.

/// The catalog's records (`disk/<name>` in namespace `catalog`, JSON), opened by
/// [`catalog::Catalog::open`] with the filter framework. The harness makes the disk file a
/// record names (sparse, on tmpfs) when the record's `id` and `size` look usable, so the catalog
/// goes on to open the disk. Whatever the records say, the catalog opens or refuses with a typed
/// error; a disk it opens has a shape the catalog would have accepted at create, and (without
/// filters) serves a read of its first block.
pub fn catalog_record(data: &[u8]) {
    let (store, dir) = store();
    let records = records(data, &[b"disk/", b""]);
    fill(store, "catalog", &records);
    let disks = dir.path().join("disks");
    let _ = std::fs::remove_dir_all(&disks);
    std::fs::create_dir_all(&disks).unwrap();
    for (_, value) in &records {
        make_disk(store, &disks, value);
    }
    let rt = crate::runtime();
    let _guard = rt.enter();
    let framework = io_filters::FilterFramework::new();
    let Ok(opened) = catalog::Catalog::open(store.clone(), &disks, framework, None) else { return };
    for entry in opened.entries() {
        crate::debug!("catalog_record: {} {:?}", entry.record.spec.name, entry.disk.as_ref().map(|_| ()));
        let record = &entry.record;
        let back: catalog::DiskRecord =
            serde_json::from_slice(&serde_json::to_vec(record).unwrap()).expect("a record reads back");
        assert_eq!(&back, record, "a record changes when written and read");
        let Ok(disk) = &entry.disk else { continue };
        let info = disk.info();
        catalog::validate(&record.spec)
            .unwrap_or_else(|e| panic!("disk {:?} opened from a record create would refuse: {e}", record.spec.name));
        assert_eq!(info.capacity, record.spec.size);
        assert_eq!(info.block_size, record.spec.block_size);
        let bs = info.block_size as usize;
        // A clone's parent may be missing (its reads then fail), a throttle may hold a read for
        // as long as its record says; a disk without filters reads at once.
        let first = rt.block_on(async { tokio::time::timeout(SLOW, disk.read(0, IoBuf::zeroed(bs))).await });
        let plain = record.spec.filters.is_empty();
        crate::debug!("catalog_record: read of {}: {:?}", record.spec.name, first.as_ref().map(|r| r.as_ref().err()));
        assert!(
            matches!(first, Ok(Ok(_))) || !plain,
            "disk {:?} does not read its first block: {:?}",
            record.spec.name,
            first.map(|r| r.err())
        );
        assert!(rt.block_on(disk.read(info.capacity, IoBuf::zeroed(bs))).is_err());
    }
    // The disks' namespaces stay for the next input: the catalog removes those without a
    // record when it opens.
    drop(opened);
}

/// Creates what a disk's create leaves besides its record: the file `disks/<id>.raw` of the
/// record's size and the namespace `disk-<id>`, if the value looks like a record with an id the
/// catalog would use and a size a sparse file can have.
fn make_disk(store: &Store, disks: &Path, value: &[u8]) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(value) else { return };
    let (Some(id), Some(size)) = (map.get("id").and_then(|v| v.as_str()), map.get("size").and_then(|v| v.as_u64()))
    else {
        return;
    };
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || size > 1 << 40 {
        return;
    }
    if let Ok(f) = std::fs::File::create(disks.join(format!("{id}.raw"))) {
        let _ = f.set_len(size);
    }
    let ns = format!("disk-{id}");
    if !store.has_namespace(&ns) {
        store.create_namespace(&ns).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Linked clones.

/// Bytes the clone and its parent hold, so a read shows where it was served from.
const CLONE_BYTE: u8 = 0xc1;
const PARENT_BYTE: u8 = 0x9a;
const GRAIN: u64 = io_filters::filters::linked_clone::GRAIN;
const PAGE_GRAINS: u64 = io_filters::filters::linked_clone::PAGE_GRAINS;

/// A linked clone's bitmap pages (`clone/bitmap/<page>` in the disk's namespace), loaded by
/// [`io_filters::filters::linked_clone::LinkedClone::open`]. The first two bytes (little
/// endian) size the disk in grains, up to four bitmap pages; the rest are records. The bitmap
/// then never counts a grain beyond the disk, and reads through the clone's chain come from the
/// clone exactly for the grains whose bits are set, from the parent for the others.
pub fn clone_bitmap(data: &[u8]) {
    use io_filters::filters::linked_clone::{CloneSetup, LinkedClone};
    let [lo, hi, rest @ ..] = data else { return };
    let grains = u64::from(u16::from_le_bytes([*lo, *hi])) * 2 % (4 * PAGE_GRAINS) + 1;
    let capacity = grains * GRAIN;
    let (store, _) = store();
    fill(store, "clone", &records(rest, &[b"clone/bitmap/", b""]));
    let info = DeviceInfo { capacity, block_size: 512, read_only: false };
    let parent =
        Arc::new(io_filters::Chain::new("parent", Vec::new(), Arc::new(ConstDisk { byte: PARENT_BYTE, info })));
    let setup =
        CloneSetup { disk: "clone", parent, copy_on_read: false, capacity, store: store.clone(), namespace: "clone" };
    let Ok(clone) = LinkedClone::open(setup) else { return };
    let clone = Arc::new(clone);
    let bitmap = clone.bitmap();
    crate::debug!("clone_bitmap: {grains} grains, {} set", bitmap.allocated());
    assert_eq!(bitmap.grains(), grains);
    assert_eq!(bitmap.allocated(), bitmap.count(0..grains), "bits set beyond the disk's last grain");
    let filters: Vec<Arc<dyn io_filters::Filter>> = vec![clone.clone()];
    let chain = io_filters::Chain::new("clone", filters, Arc::new(ConstDisk { byte: CLONE_BYTE, info }));
    // Grains at the start, the end, and around each page boundary, read one by one and in pairs.
    let mut samples: Vec<u64> = (0..8).chain(grains.saturating_sub(8)..grains).collect();
    samples.extend((1..4).flat_map(|p| [p * PAGE_GRAINS - 1, p * PAGE_GRAINS]));
    samples.retain(|&g| g < grains);
    let rt = crate::runtime();
    for &g in &samples {
        let n = if g + 1 < grains { 2 } else { 1 };
        let got = rt.block_on(chain.read(g * GRAIN, IoBuf::zeroed((n * GRAIN) as usize))).expect("a read of the clone");
        for i in 0..n {
            let want = if bitmap.is_set(g + i) { CLONE_BYTE } else { PARENT_BYTE };
            let piece = &got.as_slice()[(i * GRAIN) as usize..((i + 1) * GRAIN) as usize];
            assert!(piece.iter().all(|&b| b == want), "grain {} read from the wrong disk", g + i);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The integrity filter.

/// The integrity filter's checksum pages (`integrity/crc/<page>`) and intent marks
/// (`integrity/intent/<page>`), loaded by [`io_filters::filters::integrity::Integrity::open`] for
/// a zeroed memory disk (first two bytes: its size in 512-byte blocks, up to three pages of
/// checksums). Reads through its chain either return the disk's zeroes or fail as corrupt; a
/// page with an intent mark is recomputed from the disk, so it always reads.
pub fn integrity_records(data: &[u8]) {
    use io_filters::filters::integrity::{Integrity, PAGE_BLOCKS};
    let [lo, hi, rest @ ..] = data else { return };
    let blocks = u64::from(u16::from_le_bytes([*lo, *hi])) % (3 * PAGE_BLOCKS) + 1;
    let capacity = blocks * 512;
    let (store, _) = store();
    let records = records(rest, &[b"integrity/crc/", b"integrity/intent/", b""]);
    fill(store, "integrity", &records);
    let Ok(filter) = Integrity::open("disk", store.clone(), "integrity", capacity, 512) else { return };
    let marked: Vec<u64> = records
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(b"integrity/intent/".as_slice()))
        .filter_map(|h| std::str::from_utf8(h).ok().and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect();
    let chain = io_filters::Chain::new(
        "disk",
        vec![Arc::new(filter)],
        Arc::new(crate::memdisk::MemDisk::new(capacity, 512, false)),
    );
    let rt = crate::runtime();
    for page in 0..blocks.div_ceil(PAGE_BLOCKS) {
        let first = page * PAGE_BLOCKS;
        let n = PAGE_BLOCKS.min(blocks - first);
        for (b, len) in [(first, n), (first + n - 1, 1)] {
            let read = rt.block_on(chain.read(b * 512, IoBuf::zeroed((len * 512) as usize)));
            crate::debug!(
                "integrity_records: page {page} block {b}: {:?}",
                read.as_ref().map(|_| ()).map_err(|e| e.to_string())
            );
            match read {
                Ok(buf) => assert!(buf.as_slice().iter().all(|&x| x == 0), "the integrity filter changed data"),
                Err(e) => {
                    assert!(!marked.contains(&page), "page {page} was recomputed, yet a read fails: {e}");
                    assert!(matches!(e, vdisk::BlockError::Io(_)), "a mismatch is reported as {e:?}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guest FTL's checkpoint.

mod ftl {
    use super::*;
    use guest_ftl::{DirectChannel, FlashChannel, Ftl, FtlConfig, PowerLossMedia};
    use host_ftl::{Device, FaultConfig, Geometry};

    /// 1 group × 4 PUs × 16 chunks × 16 blocks of 4 KiB (4 MiB).
    pub fn geometry() -> Geometry {
        Geometry {
            num_grp: 1,
            num_pu: 4,
            num_chk: 16,
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

    pub fn config() -> FtlConfig {
        FtlConfig { over_provisioning: 1.0, checkpoint_lines: 4, ..FtlConfig::default() }
    }

    /// The device the seeds' records were taken from: formatted, some blocks written and
    /// trimmed, shut down. Each input starts from a copy of it.
    pub struct Template {
        pub media: PowerLossMedia,
        pub records: Vec<(Vec<u8>, Vec<u8>)>,
    }

    pub fn channel(media: PowerLossMedia) -> Arc<DirectChannel> {
        let geo = geometry();
        let dev = Device::open(geo.clone(), Box::new(media), FaultConfig::default()).unwrap();
        Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(&geo)))
    }

    pub fn template() -> &'static Template {
        static TEMPLATE: OnceLock<Template> = OnceLock::new();
        TEMPLATE.get_or_init(|| {
            let (store, _) = store();
            let media = Arc::new(PowerLossMedia::new(&geometry()).unwrap());
            let dev = Device::open(geometry(), Box::new(media.clone()), FaultConfig::default()).unwrap();
            let ch: Arc<dyn FlashChannel> =
                Arc::new(DirectChannel::new(dev, DirectChannel::default_region_bytes(&geometry())));
            let ns = "ftl-template";
            fill(store, ns, &[]);
            crate::runtime().block_on(async {
                let ftl = Ftl::open(ch, store.clone(), ns, config()).await.unwrap();
                for lba in 0..96u64 {
                    ftl.write(lba * 4096, IoBuf::copy_from(&[lba as u8; 4096]), false).await.unwrap();
                }
                ftl.discard(8 * 4096, 8 * 4096).await.unwrap();
                ftl.flush().await.unwrap();
                ftl.shutdown().await.unwrap();
                for lba in 96..112u64 {
                    ftl.write(lba * 4096, IoBuf::copy_from(&[lba as u8; 4096]), false).await.unwrap();
                }
                ftl.discard(100 * 4096, 4 * 4096).await.unwrap();
                ftl.flush().await.unwrap();
            });
            let records = store.scan_prefix(ns, b"").unwrap().into_iter().collect();
            Template { media: media.power_loss(0), records }
        })
    }
}

pub use ftl::geometry as ftl_geometry;

/// The guest FTL's records (`ftl/format`, `ftl/meta`, `ftl/map/<page>`, `ftl/trim/<seq>`,
/// `ftl/bad/<chunk>`), recovered by [`guest_ftl::Ftl::open`] on a copy of the device they were
/// taken from. Whatever they say, the FTL opens or refuses with a typed error; an FTL that opens
/// serves reads (data or a typed error), and a block written after it opened reads back.
pub fn ftl_checkpoint(data: &[u8]) {
    let template = ftl::template();
    let (store, _) = store();
    fill(store, "ftl", &records(data, &[b"ftl/", b""]));
    let ch = ftl::channel(template.media.power_loss(0));
    crate::runtime().block_on(async {
        let opened = guest_ftl::Ftl::open(ch, store.clone(), "ftl", ftl::config()).await;
        crate::debug!("ftl_checkpoint: {:?}", opened.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let Ok(ftl) = opened else { return };
        let lbas = ftl.info().capacity / 4096;
        assert!(lbas > 0 && lbas * 4096 == ftl.info().capacity);
        for lba in (0..lbas).filter(|l| l % 7 == 0 || *l < 16) {
            let _ = ftl.read(lba * 4096, IoBuf::zeroed(4096)).await;
        }
        let lba = lbas / 2;
        let data = IoBuf::copy_from(&[0x5e; 4096]);
        if ftl.write(lba * 4096, data, true).await.is_ok() {
            let back = ftl.read(lba * 4096, IoBuf::zeroed(4096)).await.expect("a block just written reads");
            assert!(back.as_slice().iter().all(|&b| b == 0x5e), "a block just written reads back other data");
        }
    });
}

/// The seeds of [`ftl_checkpoint`]: the template's own records.
pub fn ftl_template_records() -> Vec<(Vec<u8>, Vec<u8>)> {
    ftl::template().records.clone()
}

// ---------------------------------------------------------------------------------------------
// The image cache's index.

/// A blob kept in the cache directory, for gc to keep or remove.
pub const CACHE_BLOB: &[u8] = b"a blob in the cache";

/// The image cache's index (`<cache>/index.db`, SQLite, shared by every process on the
/// directory), read back by [`fuse_lazypull::cache::BlobCache::images`] and
/// [`fuse_lazypull::cache::BlobCache::gc`] with a grace period of zero and a size limit of zero.
/// Another process, or a damaged file, can leave any row: each record of the input is one row,
/// its selector choosing the table, the key its first text column, the value the rest:
///
/// - `blobs`: the key is the digest, the value the size, last use and completeness as three
///   little-endian i64s (missing bytes are zeroes);
/// - `pins`: the key is the image, the value the digest;
/// - `holds`: the key is the holder, the value the digest.
///
/// Text columns take the bytes as they are, valid UTF-8 or not. gc keeps a blob that a
/// well-formed pin names, removes only what it reports, and neither call panics.
pub fn cache_index(data: &[u8]) {
    use fuse_lazypull::cache::{BlobCache, CacheConfig};
    use fuse_lazypull::digest::Digest;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::Builder::new().prefix("vstor-fuzz").tempdir().unwrap()).path();
    let digest = Digest::of(CACHE_BLOB);
    let blob_path = dir.join("blobs/sha256").join(digest.hex());
    std::fs::create_dir_all(blob_path.parent().unwrap()).unwrap();
    std::fs::write(&blob_path, CACHE_BLOB).unwrap();
    let config = || CacheConfig { size_limit: 0, gc_grace: std::time::Duration::ZERO, ..CacheConfig::default() };
    // The cache makes the file and its tables; the rows are then the input's alone.
    drop(BlobCache::open(dir, config()).unwrap());
    let parts: Vec<(u8, Vec<u8>, Vec<u8>)> = crate::parts(data, MAX_RECORDS)
        .into_iter()
        .filter_map(record)
        .map(|(sel, key, value)| (sel % 3, key.to_vec(), value.to_vec()))
        .collect();
    {
        let db = rusqlite::Connection::open(dir.join("index.db")).unwrap();
        db.execute_batch("DELETE FROM blobs; DELETE FROM pins; DELETE FROM holds;").unwrap();
        for (table, key, value) in &parts {
            let int = |i: usize| {
                let mut b = [0u8; 8];
                for (j, x) in value.iter().skip(8 * i).take(8).enumerate() {
                    b[j] = *x;
                }
                i64::from_le_bytes(b)
            };
            let _ = match table {
                0 => db.execute(
                    "INSERT OR REPLACE INTO blobs VALUES (CAST(?1 AS TEXT), ?2, ?3, ?4)",
                    rusqlite::params![key, int(0), int(1), int(2)],
                ),
                1 => {
                    db.execute("INSERT OR REPLACE INTO pins VALUES (CAST(?1 AS TEXT), CAST(?2 AS TEXT))", [key, value])
                }
                _ => db.execute(
                    "INSERT OR REPLACE INTO holds VALUES (CAST(?1 AS TEXT), CAST(?2 AS TEXT), 'fuzz')",
                    [key, value],
                ),
            };
        }
    }
    let cache = BlobCache::open(dir, config()).unwrap();
    let images = cache.images().expect("listing the images of an index");
    for image in &images {
        let listed = parts.iter().any(|(t, k, _)| *t == 1 && String::from_utf8_lossy(k) == *image);
        assert!(listed, "image {image} listed from no row");
    }
    let pinned = parts.iter().any(|(t, _, v)| *t == 1 && v.as_slice() == digest.as_str().as_bytes());
    let report = cache.gc().expect("gc of an index");
    crate::debug!("cache_index: images {images:?}, pinned {pinned}, removed {:?}", report.removed);
    let kept = blob_path.exists();
    assert_eq!(kept, !report.removed.contains(&digest), "gc removed other than it reported");
    if pinned {
        assert!(kept, "gc removed a pinned blob");
    }
}
