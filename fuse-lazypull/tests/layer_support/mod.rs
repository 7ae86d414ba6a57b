//! Helpers for the layer and tree tests: blobs in memory, tar and gzip built in the test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::tar::{header_bytes, padding, NewHeader, RawKind};
use fuse_lazypull::layer::{BlobSource, ReadError};
use fuse_lazypull::registry::Descriptor;
use sha2::Digest as _;

/// `n` incompressible bytes from `seed`, the same for the same seed.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    test_support::random_bytes(seed, n)
}

/// A blob in memory. `corrupt` flips a byte in the given range for that many reads, to test
/// verification and retry; every discard is recorded.
pub struct MemSource {
    pub bytes: Vec<u8>,
    pub corrupt: Mutex<Option<(std::ops::Range<u64>, u32)>>,
    pub discards: Mutex<Vec<(u64, u64)>>,
    pub reads: Mutex<u64>,
}

impl MemSource {
    pub fn new(bytes: Vec<u8>) -> MemSource {
        MemSource { bytes, corrupt: Mutex::new(None), discards: Mutex::new(Vec::new()), reads: Mutex::new(0) }
    }
    pub fn corrupt(&self, range: std::ops::Range<u64>, times: u32) {
        *self.corrupt.lock().unwrap() = Some((range, times));
    }
    pub fn bytes_read(&self) -> u64 {
        *self.reads.lock().unwrap()
    }
}

impl BlobSource for MemSource {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        *self.reads.lock().unwrap() += buf.len() as u64;
        let mut c = self.corrupt.lock().unwrap();
        if let Some((range, times)) = c.as_mut() {
            let end = offset + buf.len() as u64;
            if *times > 0 && range.start < end && offset < range.end {
                let at = range.start.max(offset) - offset;
                buf[at as usize] ^= 0xff;
                *times -= 1;
            }
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) {
        self.discards.lock().unwrap().push((offset, len));
    }
}

pub fn sha256_digest(bytes: &[u8]) -> Digest {
    let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}").parse().unwrap()
}

pub const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn descriptor(blob: &[u8], annotations: &[(&str, &str)]) -> Descriptor {
    Descriptor {
        media_type: GZIP_LAYER.into(),
        digest: sha256_digest(blob),
        size: blob.len() as u64,
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A tar stream built entry by entry.
#[derive(Default)]
pub struct Tar {
    pub bytes: Vec<u8>,
}

pub struct E<'a> {
    pub name: &'a str,
    pub kind: RawKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub data: &'a [u8],
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> E<'a> {
    pub fn file(name: &'a str, data: &'a [u8]) -> E<'a> {
        E { name, kind: RawKind::File, mode: 0o644, uid: 0, gid: 0, mtime: 1_600_000_000, data, xattrs: Vec::new() }
    }
    pub fn dir(name: &'a str) -> E<'a> {
        E { kind: RawKind::Dir, mode: 0o755, ..E::file(name, b"") }
    }
    pub fn symlink(name: &'a str, target: &str) -> E<'a> {
        E { kind: RawKind::Symlink(PathBuf::from(target)), mode: 0o777, ..E::file(name, b"") }
    }
    pub fn hardlink(name: &'a str, target: &str) -> E<'a> {
        E { kind: RawKind::HardLink(PathBuf::from(target)), ..E::file(name, b"") }
    }
}

impl Tar {
    pub fn add(&mut self, e: E<'_>) -> &mut Tar {
        let size = if e.kind == RawKind::File { e.data.len() as u64 } else { 0 };
        self.bytes.extend_from_slice(&header_bytes(&NewHeader {
            name: e.name.as_bytes(),
            kind: &e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size,
            xattrs: &e.xattrs,
        }));
        if size > 0 {
            self.bytes.extend_from_slice(e.data);
            self.bytes.resize(self.bytes.len() + padding(size), 0);
        }
        self
    }
    /// A raw 512-byte header block with a correct checksum, for malformed entries.
    pub fn raw_header(&mut self, mut block: [u8; 512]) -> &mut Tar {
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.bytes.extend_from_slice(&block);
        self
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Tar {
        self.bytes.extend_from_slice(bytes);
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.bytes);
        b.extend_from_slice(&[0u8; 1024]);
        b
    }
}

/// A ustar header block (checksum filled in by [`Tar::raw_header`]).
pub fn header_block(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name);
    b[100..107].copy_from_slice(b"0000644");
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"00000000000");
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b
}

/// A decompression bomb: a gzip tar holding one file `name` of `mib` MiB of zeros, made of one
/// gzip member per MiB (each about 1 KiB), so the blob is about a thousandth of the tar.
pub fn zero_bomb(name: &str, mib: u64) -> Vec<u8> {
    let header = header_bytes(&NewHeader {
        name: name.as_bytes(),
        kind: &RawKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: mib << 20,
        xattrs: &[],
    });
    let zeros = gzip(&vec![0u8; 1 << 20]);
    let mut blob = gzip(&header);
    for _ in 0..mib {
        blob.extend_from_slice(&zeros);
    }
    blob.extend_from_slice(&gzip(&[0u8; 1024]));
    blob
}

/// A PAX global header whose records are `records` (key, value).
pub fn global_pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while body + len.to_string().len() != len {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut tar = Tar::default();
    tar.raw_header(header_block(b"pax_global_header", b'g', data.len() as u64, b""));
    data.resize(data.len() + padding(data.len() as u64), 0);
    tar.raw(&data);
    tar.bytes
}

/// `bytes` as a complete blob of `cache`, as if fetched and verified earlier.
pub fn complete_blob(
    cache: &fuse_lazypull::cache::BlobCache,
    bytes: &[u8],
) -> std::sync::Arc<fuse_lazypull::cache::Blob> {
    struct Nowhere;
    impl fuse_lazypull::cache::RangeSource for Nowhere {
        fn fetch(&self, _: std::ops::Range<u64>) -> Result<Vec<u8>, fuse_lazypull::registry::RegistryError> {
            Err(fuse_lazypull::registry::RegistryError::Config("no registry in this test".into()))
        }
    }
    let desc = descriptor(bytes, &[]);
    std::fs::write(cache.dir().join("blobs/sha256").join(desc.digest.hex()), bytes).unwrap();
    let blob = cache.blob_from(&desc, std::sync::Arc::new(Nowhere)).unwrap();
    assert!(blob.is_complete());
    blob
}

/// Bytes in memory, served as ranges (a registry that always answers).
pub struct Bytes(pub Vec<u8>);

impl fuse_lazypull::cache::RangeSource for Bytes {
    fn fetch(&self, range: std::ops::Range<u64>) -> Result<Vec<u8>, fuse_lazypull::registry::RegistryError> {
        Ok(self.0[range.start as usize..range.end as usize].to_vec())
    }
}

/// The descriptor of `data` as an opaque blob.
pub fn desc(data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: "application/octet-stream".into(),
        digest: Digest::of(data),
        size: data.len() as u64,
        annotations: BTreeMap::new(),
    }
}

/// A cache at `dir` with no grace period: gc takes whatever nothing needs down to `size_limit`.
pub fn cache(dir: &std::path::Path, size_limit: u64) -> std::sync::Arc<fuse_lazypull::cache::BlobCache> {
    let config = fuse_lazypull::cache::CacheConfig {
        size_limit,
        fetch_timeout: std::time::Duration::from_secs(30),
        gc_grace: std::time::Duration::ZERO,
    };
    fuse_lazypull::cache::BlobCache::open(dir, config).unwrap()
}
