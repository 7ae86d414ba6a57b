//! Image layers: tar headers, gzip streams and the gzip index, eStargz footers and tables of
//! contents, through [`LayerIndex::build`], [`LayerIndex::from_bytes`] (an index read back from
//! the cache) and [`LayerIndex::read`], with the blob in memory.

use std::io::{Read, Write};
use std::path::{Component, Path};

use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::gzip::GzipIndexer;
use fuse_lazypull::layer::tar::{header_bytes, padding, NewHeader, RawKind};
use fuse_lazypull::layer::{BlobSource, EntryKind, LayerError, LayerIndex, Limits, ReadError, TOC_DIGEST_ANNOTATION};
use fuse_lazypull::registry::{Descriptor, OCI_LAYER_GZIP};

/// Media type of an uncompressed tar layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// File bytes read back per input, at most.
const READ_BUDGET: u64 = 4 << 20;
/// Output a gzip stream may inflate to beyond its expansion ratio, in these targets.
const EXPANSION_ALLOWANCE: u64 = 8 << 20;

/// A layer blob in memory. Reads outside it fail as the cache's do.
pub struct MemBlob {
    bytes: Vec<u8>,
}

impl MemBlob {
    pub fn new(bytes: Vec<u8>) -> MemBlob {
        MemBlob { bytes }
    }
}

impl BlobSource for MemBlob {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        let range = offset.checked_add(len).filter(|&e| e <= self.size()).map(|e| offset as usize..e as usize);
        let Some(range) = range else {
            return Err(ReadError::OutOfRange { offset, len, size: self.size() });
        };
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) {}

    fn is_local(&self, range: std::ops::Range<u64>) -> bool {
        assert!(range.start <= range.end, "a backwards blob range {range:?}");
        range.end <= self.size()
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::of(blob),
        size: blob.len() as u64,
        annotations: Default::default(),
    }
}

fn limits() -> Limits {
    Limits { expansion_allowance: EXPANSION_ALLOWANCE, ..Limits::DEFAULT }
}

/// A path inside the image root: relative, with no `.` or `..`.
fn check_path(path: &Path) {
    assert!(path.components().all(|c| matches!(c, Component::Normal(_))), "entry path {path:?} is not normalized");
}

/// What every index, built or read back, must hold to.
fn check_entries(index: &LayerIndex) {
    for e in &index.entries {
        check_path(&e.path);
        assert!(e.mode & !0o7777 == 0, "mode {:o} has file-type bits", e.mode);
        match &e.kind {
            EntryKind::File(d) => assert_eq!(d.size(), e.size),
            EntryKind::HardLink(target) => check_path(target),
            _ => assert_eq!(e.size, 0, "{:?} has a size", e.path),
        }
        if e.path.as_os_str().is_empty() {
            assert!(matches!(e.kind, EntryKind::Dir | EntryKind::Opaque), "the root is not a directory");
        }
    }
    let _ = (index.depends_on_lowers(), index.unpacked_bytes(), index.is_compressed(), index.is_estargz());
}

/// An index serialized for the cache reads back as itself; only an index with a path JSON
/// cannot hold (not UTF-8) may not be serialized.
fn check_round_trip(index: &LayerIndex) {
    let bytes = match index.to_bytes() {
        Ok(bytes) => bytes,
        Err(e) => {
            let utf8 = |p: &Path| p.to_str().is_some();
            let all_utf8 = index.entries.iter().all(|e| {
                utf8(&e.path) && !matches!(&e.kind, EntryKind::Symlink(t) | EntryKind::HardLink(t) if !utf8(t))
            });
            assert!(!all_utf8, "an index of UTF-8 paths cannot be written: {e}");
            return;
        }
    };
    let back = LayerIndex::from_bytes(&bytes).unwrap_or_else(|e| panic!("a written index does not read back: {e}"));
    assert!(back.to_bytes().ok() == Some(bytes), "an index changes when read back");
}

/// Reads every file of the index back, within a budget. A read is short only at the end of the
/// file, and fails with a typed error rather than returning bytes it could not verify.
fn read_files(index: &LayerIndex, source: &dyn BlobSource) {
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 64 << 10];
    for e in &index.entries {
        let EntryKind::File(data) = &e.kind else { continue };
        let mut offset = 0;
        while offset < data.size() && budget > 0 {
            let want = (buf.len() as u64).min(budget) as usize;
            let _ = index.is_local(source, data, offset, want as u64);
            match index.read(source, data, offset, &mut buf[..want]) {
                Ok(n) => {
                    assert!(n > 0, "a read of {:?} at {offset} of {} bytes returned nothing", e.path, data.size());
                    assert!(n <= want);
                    offset += n as u64;
                    budget -= n as u64;
                }
                Err(_) => break,
            }
        }
        // Past the end there is nothing.
        assert_eq!(index.read(source, data, data.size(), &mut buf[..1]).ok(), Some(0));
    }
    for r in index.prefetch_ranges() {
        assert!(
            r.start <= r.end && r.end <= source.size(),
            "prefetch range {r:?} outside the blob of {}",
            source.size()
        );
    }
}

/// Indexes a blob as a layer of `media_type`; checks and reads back what it gets.
fn build_and_read(media_type: &str, desc: Descriptor, blob: Vec<u8>) -> Result<LayerIndex, LayerError> {
    let source = MemBlob::new(blob);
    let built = LayerIndex::build(&desc, &source, &limits());
    crate::debug!(
        "{media_type}: {:?}",
        built.as_ref().map(|i| (i.entries.len(), i.is_estargz())).map_err(|e| e.to_string())
    );
    match &built {
        Ok(index) => {
            check_entries(index);
            check_round_trip(index);
            read_files(index, &source);
        }
        Err(LayerError::Source(e)) => panic!("{media_type}: the indexer read outside the blob: {e}"),
        Err(_) => {}
    }
    built
}

/// An uncompressed tar layer: the input is the tar stream.
pub fn tar_layer(data: &[u8]) {
    let built = build_and_read(OCI_LAYER_TAR, descriptor(OCI_LAYER_TAR, data), data.to_vec());
    if let Ok(index) = built {
        assert!(!index.is_compressed() && !index.is_estargz());
    }
}

/// A gzip layer: the input is the gzip blob. Besides indexing it as a layer, the stream is
/// inflated with checkpoints every 16 KiB and compared with what flate2 makes of it; reads
/// through the checkpoints must give the same bytes.
pub fn gzip_layer(data: &[u8]) {
    let _ = build_and_read(OCI_LAYER_GZIP, descriptor(OCI_LAYER_GZIP, data), data.to_vec());

    let source = MemBlob::new(data.to_vec());
    let limits = limits();
    let Ok(mut indexer) = GzipIndexer::with_span(&source, 16 << 10, &limits) else { return };
    let mut ours = Vec::new();
    let read = indexer.read_to_end(&mut ours);
    let mut reference = Vec::new();
    let _ = flate2::read::MultiGzDecoder::new(data).take(ours.len() as u64).read_to_end(&mut reference);
    let common = ours.len().min(reference.len());
    assert!(ours[..common] == reference[..common], "the indexer inflates to other bytes than flate2");
    if read.is_err() {
        return;
    }
    let Ok((index, sha256)) = indexer.finish() else { return };
    assert_eq!(sha256, Digest::of(data).hex(), "the blob's digest");
    assert_eq!(index.uncompressed_size, ours.len() as u64);
    if index.checkpoints.is_empty() {
        return;
    }
    index.validate().unwrap_or_else(|e| panic!("a built gzip index fails validation: {e}"));
    let back: fuse_lazypull::layer::gzip::GzipIndex =
        serde_json::from_slice(&serde_json::to_vec(&index).unwrap()).expect("the gzip index reads back");
    back.validate().expect("the gzip index validates when read back");
    // Reads from checkpoints: around each one, and at the start and end.
    let mut offsets: Vec<u64> = index.checkpoints.iter().flat_map(|cp| [cp.out.saturating_sub(7), cp.out]).collect();
    offsets.extend([0, (ours.len() as u64).saturating_sub(100)]);
    for off in offsets {
        let mut buf = vec![0u8; 4096];
        let n = back.read_at(&source, off, &mut buf).expect("a read through a checkpoint of a sound stream");
        let want = (ours.len() as u64).saturating_sub(off).min(4096) as usize;
        assert_eq!(n, want, "read at {off}");
        assert!(buf[..n] == ours[off as usize..off as usize + n], "read at {off} gives other bytes");
    }
}

/// A layer index read back from the cache (`derived/<digest>/layer-index`), and the blob it
/// reads: two parts (see [`crate::parts`]), the serialized index and the blob.
pub fn gzip_index(data: &[u8]) {
    let [json, blob] = crate::parts(data, 2)[..] else { return };
    let index = LayerIndex::from_bytes(json);
    crate::debug!("gzip_index: {:?}", index.as_ref().map(|i| i.entries.len()).map_err(|e| e.to_string()));
    let Ok(index) = index else { return };
    check_round_trip(&index);
    let source = MemBlob::new(blob.to_vec());
    read_files(&index, &source);
}

/// The 51-byte eStargz footer pointing at the table of contents at `toc_offset`.
pub fn estargz_footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 26, 0, b'S', b'G', 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    f
}

/// The gzip member holding the table of contents `json` as the tar entry `stargz.index.json`.
pub fn estargz_toc_member(json: &[u8]) -> Vec<u8> {
    let mut tar = header_bytes(&NewHeader {
        name: b"stargz.index.json",
        kind: &RawKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: json.len() as u64,
        xattrs: &[],
    });
    tar.extend_from_slice(json);
    tar.resize(tar.len() + padding(json.len() as u64) + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// An eStargz layer. First byte even: the rest is the whole blob (footer, table-of-contents
/// member and all; its digest cannot match the annotation). Odd: the rest is two parts, the
/// blob's file members and the table of contents JSON, which the harness wraps into its member
/// and footer, annotating its true digest, so the table of contents itself is read.
pub fn estargz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (blob, toc_digest) = if mode & 1 == 0 {
        (rest.to_vec(), format!("sha256:{}", "0".repeat(64)))
    } else {
        let [members, json] = crate::parts(rest, 2)[..] else { return };
        let mut blob = members.to_vec();
        blob.extend_from_slice(&estargz_toc_member(json));
        blob.extend_from_slice(&estargz_footer(members.len() as u64));
        (blob, Digest::of(json).to_string())
    };
    let mut desc = descriptor(OCI_LAYER_GZIP, &blob);
    desc.annotations.insert(TOC_DIGEST_ANNOTATION.into(), toc_digest);
    let _ = build_and_read(OCI_LAYER_GZIP, desc, blob);
}
