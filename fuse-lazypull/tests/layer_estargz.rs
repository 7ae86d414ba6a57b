//! eStargz: the writer's output read back through the footer and table of contents, chunk
//! digests checked, the prefetch landmark, and the blob still a plain tar.gz for other tools.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::io::Read;
use std::path::{Path, PathBuf};

use fuse_lazypull::layer::estargz;
use fuse_lazypull::layer::tar::RawKind;
use fuse_lazypull::layer::{
    convert_to_estargz, Converted, EntryKind, LayerError, LayerIndex, Limits, TOC_DIGEST_ANNOTATION,
};
use layer_support::{descriptor, gzip, random_bytes, sha256_digest, MemSource, Tar, E};

/// Bytes that do not compress: three chunks (4 + 4 + 0.5 MiB) at the real chunk size, many at
/// the small chunk size the tests use to stay quick in debug builds.
fn big() -> Vec<u8> {
    random_bytes(890_000, 88172645463325252)
}

fn source_layer(big: &[u8]) -> Vec<u8> {
    let mut tar = Tar::default();
    tar.add(E::dir("./"))
        .add(E::dir("etc/"))
        .add(E { uid: 5, gid: 6, ..E::file("etc/hosts", b"127.0.0.1 localhost\n") })
        .add(E::file("etc/empty", b""))
        .add(E {
            xattrs: vec![(b"user.k".to_vec(), b"v\x00\xff".to_vec())],
            ..E::file("bin/tool", b"#!/bin/sh\necho hi\n")
        })
        .add(E::file("big", big))
        .add(E::symlink("etc/link", "../big"))
        .add(E::hardlink("bin/tool2", "bin/tool"))
        .add(E { kind: RawKind::CharDev { major: 1, minor: 5 }, ..E::file("dev/zero", b"") })
        .add(E::file("old/.wh.gone", b""))
        .add(E::file("opq/.wh..wh..opq", b""));
    gzip(&tar.finish())
}

fn convert(layer: &[u8], prefetch: &[&str]) -> (Vec<u8>, Converted) {
    let mut out = Vec::new();
    let prefetch: Vec<PathBuf> = prefetch.iter().map(PathBuf::from).collect();
    let converted =
        estargz::convert_with_chunk_size(&mut &layer[..], &mut out, &prefetch, CHUNK, &Limits::DEFAULT).unwrap();
    (out, converted)
}

/// A tenth of the real chunk size, with a tenth of the data.
const CHUNK: u64 = 4 << 20 >> 4;

fn index_of(blob: &[u8], toc_digest: &str) -> Result<(LayerIndex, MemSource), LayerError> {
    let source = MemSource::new(blob.to_vec());
    let desc = descriptor(blob, &[(TOC_DIGEST_ANNOTATION, toc_digest)]);
    Ok((LayerIndex::build(&desc, &source, &Limits::DEFAULT)?, source))
}

fn read_file(index: &LayerIndex, source: &MemSource, path: &str) -> Vec<u8> {
    let e = index.entries.iter().find(|e| e.path == Path::new(path)).unwrap();
    let EntryKind::File(data) = &e.kind else { panic!("{path}") };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 100_000];
    loop {
        let n = index.read(source, data, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn summary(index: &LayerIndex) -> Vec<String> {
    index
        .entries
        .iter()
        .map(|e| {
            let kind = match &e.kind {
                EntryKind::File(d) => format!("file {}", d.size()),
                other => format!("{other:?}"),
            };
            format!("{:?} {kind} {:o} {}:{} {} {:?}", e.path, e.mode, e.uid, e.gid, e.mtime, e.xattrs)
        })
        .collect()
}

#[test]
fn round_trip_through_writer_and_reader() {
    let big = big();
    let layer = source_layer(&big);
    let (blob, c) = convert(&layer, &["etc/hosts", "big"]);
    assert_eq!(c.size, blob.len() as u64);
    assert_eq!(c.digest, sha256_digest(&blob));
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut plain).unwrap();
    assert_eq!(c.diff_id, sha256_digest(&plain));
    assert_eq!(c.uncompressed_size, plain.len() as u64);

    let (index, source) = index_of(&blob, c.toc_digest.as_str()).unwrap();
    assert!(index.is_estargz());
    // The same entries as the plain gzip layer, prefetched files first.
    let plain_source = MemSource::new(layer.clone());
    let plain_index = LayerIndex::build(&descriptor(&layer, &[]), &plain_source, &Limits::DEFAULT).unwrap();
    let mut want = summary(&plain_index);
    let got = summary(&index);
    assert!(got[0].starts_with("\"etc/hosts\" file 20"), "{got:?}");
    assert!(got[1].starts_with("\"big\" file 890000"), "{got:?}");
    let moved: Vec<String> =
        want.iter().filter(|s| s.starts_with("\"etc/hosts\"") || s.starts_with("\"big\"")).cloned().collect();
    want.retain(|s| !moved.contains(s));
    assert_eq!(got[..2], moved[..]);
    assert_eq!(got[2..], want[..]);

    // Files read chunk by chunk, verified.
    assert_eq!(read_file(&index, &source, "etc/hosts"), b"127.0.0.1 localhost\n");
    assert_eq!(read_file(&index, &source, "big"), big);
    assert_eq!(read_file(&index, &source, "etc/empty"), b"");
    let EntryKind::File(data) = &index.entries[1].kind else { panic!() };
    let mut buf = vec![0u8; 10];
    assert_eq!(index.read(&source, data, CHUNK - 5, &mut buf).unwrap(), 10);
    assert_eq!(buf, big[CHUNK as usize - 5..CHUNK as usize + 5]);

    // The prefetch range covers the two files and stops well before the rest.
    let ranges = index.prefetch_ranges();
    assert_eq!(ranges.len(), 1);
    assert!(ranges[0].start == 0 && ranges[0].end > 890_000 && ranges[0].end < blob.len() as u64, "{ranges:?}");

    // The index survives serialization (as the cache keeps it).
    let again = LayerIndex::from_bytes(&index.to_bytes().unwrap()).unwrap();
    assert_eq!(read_file(&again, &source, "big"), big);
    assert_eq!(again.prefetch_ranges(), index.prefetch_ranges());

    // Reading a small file fetches its chunk, not the blob.
    let fresh = MemSource::new(blob.clone());
    let before = fresh.bytes_read();
    let _ = read_file(&index, &fresh, "bin/tool");
    assert!(fresh.bytes_read() - before < 10_000);
}

#[test]
fn real_chunk_size_cuts_large_files_in_4_mib_chunks() {
    let layer = source_layer(&[7u8; 9 << 20]);
    let mut blob = Vec::new();
    let c = convert_to_estargz(&mut &layer[..], &mut blob, &[], &Limits::DEFAULT).unwrap();
    let (index, source) = index_of(&blob, c.toc_digest.as_str()).unwrap();
    let e = index.entries.iter().find(|e| e.path == Path::new("big")).unwrap();
    let EntryKind::File(data) = &e.kind else { panic!() };
    let mut buf = vec![0u8; 16];
    assert_eq!(index.read(&source, data, (8 << 20) - 8, &mut buf).unwrap(), 16);
    assert_eq!(buf, [7u8; 16]);
    // Three gzip members for the file: its chunks' entries in the TOC.
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut plain).unwrap();
    let toc = String::from_utf8_lossy(&plain);
    assert_eq!(toc.matches("\"type\":\"chunk\"").count(), 2, "two chunk entries after the first");
}

#[test]
fn an_estargz_blob_unpacks_without_its_toc_and_landmark_needs_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "unpacking owners needs root");
    let layer = source_layer(b"contents");
    let (blob, c) = convert(&layer, &["etc/hosts"]);
    let (index, _) = index_of(&blob, c.toc_digest.as_str()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, &blob).unwrap();
    let dest = dir.path().join("lower");
    fuse_lazypull::layer::unpack(&index, &file, &dest, &[], &Limits::DEFAULT).unwrap();
    assert_eq!(std::fs::read(dest.join("big")).unwrap(), b"contents");
    assert_eq!(std::fs::read(dest.join("etc/hosts")).unwrap(), b"127.0.0.1 localhost\n");
    for hidden in ["stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"] {
        assert!(!dest.join(hidden).exists(), "{hidden}");
    }
}

#[test]
fn without_prefetch_files_there_is_no_prefetch_range() {
    let layer = source_layer(b"small");
    let (blob, c) = convert(&layer, &[]);
    let (index, _) = index_of(&blob, c.toc_digest.as_str()).unwrap();
    assert!(index.prefetch_ranges().is_empty());
    assert!(!index.entries.iter().any(|e| e.path.to_str().unwrap().contains("landmark")));
}

#[test]
fn output_is_a_plain_tar_gz_for_other_tools() {
    let layer = source_layer(b"small big file");
    let (blob, _) = convert(&layer, &["bin/tool"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar.gz");
    std::fs::write(&path, &blob).unwrap();
    let out = std::process::Command::new("tar").arg("tzf").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout).unwrap();
    for name in ["bin/tool", ".prefetch.landmark", "etc/hosts", "big", "stargz.index.json", "opq/.wh..wh..opq"] {
        assert!(listing.lines().any(|l| l == name), "{name} missing from:\n{listing}");
    }
    // And our own gzip reader reads it as a plain gzip layer too.
    let source = MemSource::new(blob.clone());
    let index = LayerIndex::build(&descriptor(&blob, &[]), &source, &Limits::DEFAULT).unwrap();
    assert!(!index.is_estargz());
    assert_eq!(read_file(&index, &source, "big"), b"small big file");
}

#[test]
fn a_wrong_toc_digest_is_refused() {
    let layer = source_layer(b"x");
    let (blob, _) = convert(&layer, &[]);
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(index_of(&blob, &wrong), Err(LayerError::TocDigest { .. })));
}

#[test]
fn a_corrupt_chunk_is_discarded_and_fetched_again_then_refused() {
    let layer = source_layer(b"not big");
    let (blob, c) = convert(&layer, &[]);
    let (index, source) = index_of(&blob, c.toc_digest.as_str()).unwrap();
    let e = index.entries.iter().find(|e| e.path == Path::new("bin/tool")).unwrap();
    let EntryKind::File(data) = &e.kind else { panic!() };
    // Corrupt everything before the table of contents (its offset is in the footer).
    let footer = &blob[blob.len() - 51..];
    let toc_offset = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap();
    source.corrupt(0..toc_offset, 1);
    let mut buf = vec![0u8; 100];
    let n = index.read(&source, data, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"#!/bin/sh\necho hi\n");
    assert_eq!(source.discards.lock().unwrap().len(), 1);

    let e = index.entries.iter().find(|e| e.path == Path::new("etc/hosts")).unwrap();
    let EntryKind::File(data) = &e.kind else { panic!() };
    source.corrupt(0..toc_offset, 2);
    assert!(matches!(index.read(&source, data, 0, &mut buf), Err(LayerError::Corrupt { .. })));
}

#[test]
fn annotation_without_footer_reads_as_gzip() {
    let layer = source_layer(b"x");
    let (index, _) = index_of(&layer, &format!("sha256:{}", "1".repeat(64))).unwrap();
    assert!(!index.is_estargz());
}

/// Converting a decompression bomb stops at the default expansion limit.
#[test]
fn converting_a_gzip_bomb_is_refused_by_the_default_limits() {
    let bomb = layer_support::zero_bomb("bomb", 256);
    let mut out = Vec::new();
    match convert_to_estargz(&mut &bomb[..], &mut out, &[], &Limits::DEFAULT) {
        Err(LayerError::Expansion { .. }) => {}
        Err(other) => panic!("wrong error: {other:?}"),
        Ok(_) => panic!("the bomb was converted"),
    }
    assert!(out.is_empty(), "nothing was written");
}

/// `blob` with its table of contents rewritten by `edit`, and the new TOC's digest. The TOC is
/// the last gzip member before the footer, so every other offset stays valid.
fn with_toc_edited(blob: &[u8], edit: impl Fn(&mut serde_json::Value)) -> (Vec<u8>, String) {
    let footer = &blob[blob.len() - 51..];
    let toc_offset = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap() as usize;
    let mut member = Vec::new();
    flate2::read::GzDecoder::new(&blob[toc_offset..blob.len() - 51]).read_to_end(&mut member).unwrap();
    let size = usize::from_str_radix(std::str::from_utf8(&member[124..135]).unwrap(), 8).unwrap();
    let mut toc: serde_json::Value = serde_json::from_slice(&member[512..512 + size]).unwrap();
    edit(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    let mut tar = Tar::default();
    tar.add(E::file(estargz::TOC_NAME, &json));
    let mut out = blob[..toc_offset].to_vec();
    out.extend_from_slice(&gzip(&tar.finish()));
    out.extend_from_slice(footer);
    (out, sha256_digest(&json).to_string())
}

/// A table of contents that says one thing and a tar stream that says another: the FUSE tree
/// (from the TOC) and the unpacked layer (from the tar) would differ after the handoff, so
/// unpacking refuses it, naming the difference.
#[test]
fn a_toc_that_does_not_match_the_tar_fails_the_unpack_needs_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "unpacking owners needs root");
    let layer = source_layer(b"contents");
    let (blob, _) = convert(&layer, &[]);
    let (blob, toc_digest) = with_toc_edited(&blob, |toc| {
        for e in toc["entries"].as_array_mut().unwrap() {
            if e["name"] == "bin/tool" {
                e["mode"] = serde_json::json!(0o4755);
            }
        }
    });
    let (index, _) = index_of(&blob, &toc_digest).unwrap();
    let tool = index.entries.iter().find(|e| e.path == Path::new("bin/tool")).unwrap();
    assert_eq!(tool.mode, 0o4755, "the index follows the TOC");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, &blob).unwrap();
    let err = fuse_lazypull::layer::unpack(&index, &file, &dir.path().join("lower"), &[], &Limits::DEFAULT)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bin/tool: mode is 644 in the blob, 4755 in the index"), "{err}");
}
