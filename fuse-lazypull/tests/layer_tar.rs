//! Gzip tar layers indexed and read through `LayerIndex`, and every refusal of malicious input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::path::{Path, PathBuf};

use fuse_lazypull::layer::tar::RawKind;
use fuse_lazypull::layer::{EntryKind, LayerError, LayerIndex, Limits};
use layer_support::{descriptor, global_pax, gzip, header_block, zero_bomb, MemSource, Tar, E};

fn build(tar: Vec<u8>) -> Result<(LayerIndex, MemSource), LayerError> {
    build_limited(tar, &Limits::default())
}

fn build_limited(tar: Vec<u8>, limits: &Limits) -> Result<(LayerIndex, MemSource), LayerError> {
    let blob = gzip(&tar);
    let source = MemSource::new(blob.clone());
    let index = LayerIndex::build(&descriptor(&blob, &[]), &source, limits)?;
    Ok((index, source))
}

fn read_all(index: &LayerIndex, source: &MemSource, path: &str) -> Vec<u8> {
    let e = index.entries.iter().rev().find(|e| e.path == Path::new(path)).unwrap();
    let EntryKind::File(data) = &e.kind else { panic!("{path} is not a file") };
    let mut buf = vec![0u8; e.size as usize + 10];
    let n = index.read(source, data, 0, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn refused(result: Result<(LayerIndex, MemSource), LayerError>, name: &str) -> String {
    match result {
        Err(e @ (LayerError::Malicious { .. } | LayerError::Unsupported { .. })) => {
            let text = e.to_string();
            assert!(text.contains(name), "error {text:?} does not name {name:?}");
            text
        }
        Err(other) => panic!("wrong error for {name}: {other:?}"),
        Ok(_) => panic!("{name} was accepted"),
    }
}

#[test]
fn entries_and_file_bytes() {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let long = format!("{}/file", "d".repeat(150));
    let mut tar = Tar::default();
    tar.add(E::dir("./"))
        .add(E::dir("etc/"))
        .add(E { uid: 1000, gid: 3_000_000, mtime: 1_234_567_890, ..E::file("/etc/hosts", b"127.0.0.1 localhost\n") })
        .add(E::file("big", &big))
        .add(E { xattrs: vec![(b"user.note".to_vec(), b"\x00bin\xff".to_vec())], ..E::file(&long, b"long") })
        .add(E::symlink("etc/link", "/absolute/elsewhere"))
        .add(E::hardlink("etc/hosts2", "etc/hosts"))
        .add(E { kind: RawKind::CharDev { major: 1, minor: 3 }, ..E::file("dev/null", b"") })
        .add(E { kind: RawKind::Fifo, ..E::file("fifo", b"") })
        .add(E::file("etc/.wh.gone", b""))
        .add(E::file("etc/.wh..wh..opq", b""));
    let (index, source) = build(tar.finish()).unwrap();
    let paths: Vec<&Path> = index.entries.iter().map(|e| e.path.as_path()).collect();
    assert_eq!(paths[..4], [Path::new(""), Path::new("etc"), Path::new("etc/hosts"), Path::new("big")]);
    let hosts = &index.entries[2];
    assert_eq!((hosts.uid, hosts.gid, hosts.mtime, hosts.size), (1000, 3_000_000, 1_234_567_890, 20));
    assert_eq!(read_all(&index, &source, "etc/hosts"), b"127.0.0.1 localhost\n");
    assert_eq!(read_all(&index, &source, "big"), big);
    assert_eq!(read_all(&index, &source, &long), b"long");
    let long_entry = index.entries.iter().find(|e| e.path == Path::new(&long)).unwrap();
    assert_eq!(long_entry.xattrs, vec![(b"user.note".to_vec(), b"\x00bin\xff".to_vec())]);
    let kinds: Vec<String> = index.entries[5..].iter().map(|e| format!("{:?} {:?}", e.path, e.kind)).collect();
    assert_eq!(
        kinds,
        [
            "\"etc/link\" Symlink(\"/absolute/elsewhere\")",
            "\"etc/hosts2\" HardLink(\"etc/hosts\")",
            "\"dev/null\" CharDev { major: 1, minor: 3 }",
            "\"fifo\" Fifo",
            "\"etc/gone\" Whiteout",
            "\"etc\" Opaque",
        ]
    );
    // Reads in the middle of the big file.
    let EntryKind::File(data) = &index.entries[3].kind else { panic!() };
    let mut buf = vec![0u8; 5000];
    assert_eq!(index.read(&source, data, 2_999_000, &mut buf).unwrap(), 1000);
    assert_eq!(&buf[..1000], &big[2_999_000..]);
    // The index survives serialization.
    let again = LayerIndex::from_bytes(&index.to_bytes().unwrap()).unwrap();
    assert_eq!(read_all(&again, &source, "big"), big);
}

#[test]
fn gnu_long_names_and_links() {
    let name = format!("{}/n", "x".repeat(200));
    let target = format!("{}/t", "y".repeat(200));
    let mut tar = Tar::default();
    for (flag, value) in [(b'L', &name), (b'K', &target)] {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        tar.raw_header(header_block(b"././@LongLink", flag, data.len() as u64, b""));
        data.resize(512, 0);
        tar.raw(&data);
    }
    tar.raw_header(header_block(b"truncated", b'2', 0, b"trunc"));
    let (index, _) = build(tar.finish()).unwrap();
    assert_eq!(index.entries[0].path, PathBuf::from(&name));
    assert!(matches!(&index.entries[0].kind, EntryKind::Symlink(t) if t == Path::new(&target)));
}

#[test]
fn absolute_paths_are_made_relative() {
    let mut tar = Tar::default();
    tar.add(E::file("/etc/passwd", b"x")).add(E::file("./a/./b/../c", b"y"));
    let (index, _) = build(tar.finish()).unwrap();
    assert_eq!(index.entries[0].path, Path::new("etc/passwd"));
    assert_eq!(index.entries[1].path, Path::new("a/c"));
}

#[test]
fn dot_dot_escaping_the_root_is_refused() {
    for name in ["../escape", "a/../../escape", "/../../etc/shadow"] {
        let mut tar = Tar::default();
        tar.add(E::file(name, b"x"));
        refused(build(tar.finish()), name);
    }
}

#[test]
fn pax_path_escaping_the_root_is_refused() {
    let name = format!("{}/../../../../x", "a");
    let long = format!("{}{}", "b/".repeat(60), "../".repeat(62));
    for n in [name, long] {
        let mut tar = Tar::default();
        tar.add(E::file(&n, b"x"));
        refused(build(tar.finish()), "..");
    }
}

#[test]
fn hard_link_escaping_the_root_is_refused() {
    let mut tar = Tar::default();
    tar.add(E::hardlink("innocent", "../../etc/shadow"));
    let text = refused(build(tar.finish()), "innocent");
    assert!(text.contains("hard link target"), "{text}");
}

#[test]
fn hard_link_to_a_later_entry_is_refused() {
    let mut tar = Tar::default();
    tar.add(E::hardlink("first", "second")).add(E::file("second", b"x"));
    refused(build(tar.finish()), "first");
}

#[test]
fn hard_link_to_itself_is_refused() {
    let mut tar = Tar::default();
    tar.add(E::hardlink("me", "me"));
    refused(build(tar.finish()), "me");
}

#[test]
fn huge_pax_header_is_refused() {
    let mut tar = Tar::default();
    tar.raw_header(header_block(b"PaxHeaders/huge", b'x', 100 << 20, b""));
    refused(build(tar.finish()), "PaxHeaders/huge");
}

#[test]
fn huge_gnu_long_name_is_refused() {
    let mut tar = Tar::default();
    tar.raw_header(header_block(b"././@LongLink", b'L', 50 << 20, b""));
    refused(build(tar.finish()), "@LongLink");
}

#[test]
fn too_many_entries_is_refused() {
    let mut tar = Tar::default();
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    for n in &names {
        tar.add(E::file(n, b""));
    }
    let limits = Limits { max_entries: 10, ..Limits::default() };
    let text = refused(build_limited(tar.finish(), &limits), "f10");
    assert!(text.contains("entries"), "{text}");
}

#[test]
fn too_many_bytes_is_refused() {
    let data = vec![7u8; 4096];
    let mut tar = Tar::default();
    for i in 0..10 {
        tar.add(E::file(&format!("bomb{i}"), &data));
    }
    let limits = Limits { max_total_size: 20_000, ..Limits::default() };
    refused(build_limited(tar.finish(), &limits), "bomb4");
}

/// A 3 KB layer: one global PAX header with a 1000 KiB extended attribute, then 300 empty
/// files. Copied onto every file, it once made 292 MiB of attributes in memory; the default
/// limits refuse the first file that would carry it.
#[test]
fn a_global_pax_xattr_bomb_is_refused_by_the_default_limits() {
    let big = vec![b'x'; 1000 << 10];
    let mut tar = Tar::default();
    tar.raw(&global_pax(&[("SCHILY.xattr.user.bomb", &big)]));
    let names: Vec<String> = (0..300).map(|i| format!("f{i}")).collect();
    for n in &names {
        tar.add(E::file(n, b""));
    }
    let tar = tar.finish();
    assert!(gzip(&tar).len() < 8 << 10, "the bomb is small: {} bytes", gzip(&tar).len());
    let text = refused(build(tar), "f0");
    assert!(text.contains("extended attributes of 1024009 bytes (limit 65536)"), "{text}");
}

/// Global attributes under the per-entry limit still add up, entry after entry, to the layer's
/// metadata limit.
#[test]
fn global_pax_xattrs_add_up_to_the_default_metadata_limit() {
    let attr = vec![b'y'; 60 << 10];
    let mut tar = Tar::default();
    tar.raw(&global_pax(&[("SCHILY.xattr.user.a", &attr)]));
    let names: Vec<String> = (0..2500).map(|i| format!("f{i}")).collect();
    for n in &names {
        tar.add(E::file(n, b""));
    }
    let text = refused(build(tar.finish()), "f2");
    assert!(text.contains("bytes of metadata in the layer"), "{text}");
}

/// Global records still apply to every later entry, and an entry's own empty record hides one.
#[test]
fn global_pax_records_apply_to_later_entries() {
    let mut tar = Tar::default();
    tar.add(E::file("before", b""));
    tar.raw(&global_pax(&[("SCHILY.xattr.user.g", b"global"), ("uid", b"42")]));
    tar.add(E::file("after", b""));
    tar.add(E { xattrs: vec![(b"user.own".to_vec(), b"mine".to_vec())], ..E::file("own", b"") });
    let (index, _) = build(tar.finish()).unwrap();
    let e = |i: usize| (&index.entries[i].xattrs, index.entries[i].uid);
    assert_eq!(e(0), (&vec![], 0));
    assert_eq!(e(1), (&vec![(b"user.g".to_vec(), b"global".to_vec())], 42));
    assert_eq!(e(2).0, &vec![(b"user.g".to_vec(), b"global".to_vec()), (b"user.own".to_vec(), b"mine".to_vec())]);
}

/// A 2 MB layer that inflates to a 2 GiB file (1000:1) is refused by the default limits long
/// before it is all inflated.
#[test]
fn a_gzip_bomb_is_refused_by_the_default_limits() {
    let blob = zero_bomb("bomb", 2048);
    assert!(blob.len() < 3 << 20, "{} bytes", blob.len());
    let source = MemSource::new(blob.clone());
    match LayerIndex::build(&descriptor(&blob, &[]), &source, &Limits::DEFAULT) {
        Err(e @ LayerError::Expansion { .. }) => {
            assert!(e.to_string().contains("inflates to more than 100 times"), "{e}");
        }
        Err(other) => panic!("wrong error: {other:?}"),
        Ok(_) => panic!("the bomb was indexed"),
    }
    assert!(source.bytes_read() < blob.len() as u64, "refused before the end of the blob");
}

/// The index keeps extended attributes as base64 text, not as JSON arrays of numbers.
#[test]
fn the_index_keeps_xattrs_compactly() {
    let value = vec![0xabu8; 30_000];
    let mut tar = Tar::default();
    tar.add(E { xattrs: vec![(b"user.big".to_vec(), value.clone())], ..E::file("f", b"") });
    let (index, _) = build(tar.finish()).unwrap();
    let bytes = index.to_bytes().unwrap();
    assert!(bytes.len() < 45_000, "{} bytes for a 30 kB attribute", bytes.len());
    let again = LayerIndex::from_bytes(&bytes).unwrap();
    assert_eq!(again.entries[0].xattrs, vec![(b"user.big".to_vec(), value)]);
}

/// Attributes overlayfs would interpret after the handoff, or that it would enforce and FUSE
/// does not, never come from the image; the others stay.
#[test]
fn xattrs_overlayfs_interprets_are_dropped() {
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = [
        "trusted.overlay.opaque",
        "trusted.overlay.redirect",
        "user.overlay.opaque",
        "system.posix_acl_access",
        "security.selinux",
        "security.capability",
        "trusted.other",
        "user.keep",
    ]
    .iter()
    .map(|n| (n.as_bytes().to_vec(), b"y".to_vec()))
    .collect();
    let mut tar = Tar::default();
    tar.add(E { xattrs, ..E::dir("d/") });
    tar.raw(&global_pax(&[("SCHILY.xattr.trusted.overlay.origin", b"x")]));
    tar.add(E::file("f", b""));
    let (index, _) = build(tar.finish()).unwrap();
    let names = |i: usize| -> Vec<String> {
        index.entries[i].xattrs.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
    };
    assert_eq!(names(0), ["security.capability", "trusted.other", "user.keep"]);
    assert!(names(1).is_empty());
}

/// A 0:0 character device is overlayfs' whiteout: after the handoff it would hide a file, not
/// show a device, so it is refused.
#[test]
fn a_whiteout_device_is_refused() {
    let mut tar = Tar::default();
    tar.add(E { kind: RawKind::CharDev { major: 0, minor: 0 }, ..E::file("dev/wh", b"") });
    refused(build(tar.finish()), "dev/wh");
}

/// A hard link to a file of a lower layer makes the unpacked layer depend on the layers below
/// (it becomes a copy, so it is unpacked under its chain ID); one to an earlier entry of its own
/// layer does not.
#[test]
fn a_hard_link_below_makes_the_layer_depend_on_its_lowers() {
    let mut own = Tar::default();
    own.add(E::file("a", b"x")).add(E::hardlink("b", "a"));
    assert!(!build(own.finish()).unwrap().0.depends_on_lowers());
    let mut below = Tar::default();
    below.add(E::file("a", b"x")).add(E::hardlink("b", "lower/file"));
    assert!(build(below.finish()).unwrap().0.depends_on_lowers());
}

#[test]
fn gnu_sparse_files_are_refused() {
    let mut tar = Tar::default();
    tar.raw_header(header_block(b"sparse", b'S', 0, b""));
    let text = refused(build(tar.finish()), "sparse");
    assert!(text.contains("sparse"), "{text}");

    let mut tar = Tar::default();
    let records = b"22 GNU.sparse.major=1\n";
    tar.raw_header(header_block(b"PaxHeaders/s", b'x', records.len() as u64, b""));
    let mut data = records.to_vec();
    data.resize(512, 0);
    tar.raw(&data).add(E::file("pax-sparse", b""));
    refused(build(tar.finish()), "pax-sparse");
}

#[test]
fn nul_in_a_pax_path_is_refused() {
    let mut tar = Tar::default();
    let records = b"16 path=a\x00/../x\n";
    tar.raw_header(header_block(b"PaxHeaders/n", b'x', records.len() as u64, b""));
    let mut data = records.to_vec();
    data.resize(512, 0);
    tar.raw(&data).add(E::file("plain", b""));
    let text = refused(build(tar.finish()), "a");
    assert!(text.contains("NUL"), "{text}");
}

#[test]
fn bad_whiteout_names_are_refused() {
    let mut tar = Tar::default();
    tar.add(E::file("dir/.wh..", b""));
    refused(build(tar.finish()), ".wh..");
}

#[test]
fn bad_checksum_and_truncation_are_errors() {
    let mut tar = Tar::default();
    tar.add(E::file("ok", b"data"));
    let mut bytes = tar.finish();
    bytes[0] ^= 1;
    assert!(matches!(build(bytes), Err(LayerError::BadHeader { offset: 0, .. })));

    let mut tar = Tar::default();
    tar.add(E::file("cut", &[1u8; 3000]));
    let bytes = tar.finish();
    assert!(matches!(build(bytes[..2000].to_vec()), Err(LayerError::Truncated { .. })));
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let mut tar = Tar::default();
    tar.add(E::file("x", b"data"));
    let blob = gzip(&tar.finish());
    let desc = descriptor(b"something else", &[]);
    let source = MemSource::new(blob);
    assert!(matches!(LayerIndex::build(&desc, &source, &Limits::DEFAULT), Err(LayerError::BlobDigest { .. })));
}

#[test]
fn zstd_layers_are_refused_clearly() {
    let mut desc = descriptor(b"", &[]);
    desc.media_type = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    let source = MemSource::new(Vec::new());
    let err = LayerIndex::build(&desc, &source, &Limits::DEFAULT).unwrap_err();
    assert!(err.to_string().contains("zstd"), "{err}");
}

#[test]
fn a_global_pax_path_does_not_rename_every_entry() {
    let mut tar = Tar::default();
    let records = b"16 path=../evil\n16 uid=12345678\n";
    tar.raw_header(header_block(b"pax_global_header", b'g', records.len() as u64, b""));
    let mut data = records.to_vec();
    data.resize(512, 0);
    tar.raw(&data).add(E::file("one", b"1")).add(E::file("two", b"2"));
    let (index, _) = build(tar.finish()).unwrap();
    let got: Vec<(&Path, u32)> = index.entries.iter().map(|e| (e.path.as_path(), e.uid)).collect();
    assert_eq!(got, [(Path::new("one"), 12345678), (Path::new("two"), 12345678)]);
}

#[test]
fn an_index_with_a_name_that_is_not_utf8_is_not_cached_as_nothing() {
    // Found by the tar_layer fuzz target: JSON cannot hold this name, and the index was cached
    // as an empty file, read back as corrupt on every mount.
    let mut tar = Tar::default();
    let mut data = b"x".to_vec();
    data.resize(512, 0);
    tar.raw_header(header_block(b"caf\xe9", b'0', 1, b"")).raw(&data);
    let (index, _) = build(tar.finish()).unwrap();
    assert_eq!(index.entries[0].path.as_os_str().as_encoded_bytes(), b"caf\xe9");
    assert!(matches!(index.to_bytes(), Err(LayerError::Index(_))));
}

#[test]
fn a_damaged_stored_index_is_refused() {
    let mut tar = Tar::default();
    tar.add(E::file("x", b"data"));
    let (index, _) = build(tar.finish()).unwrap();
    let text = String::from_utf8(index.to_bytes().unwrap()).unwrap();
    assert!(LayerIndex::from_bytes(&text.as_bytes()[..text.len() / 2]).is_err());
    let damaged = text.replacen("\"bits\":0", "\"bits\":9", 1);
    assert_ne!(damaged, text);
    assert!(matches!(LayerIndex::from_bytes(damaged.as_bytes()), Err(LayerError::Index(_))));
}

#[test]
fn uncompressed_tar_layers_are_read_in_verified_spans() {
    let big: Vec<u8> = (0..2_600_000u32).map(|i| (i % 253) as u8).collect();
    let mut tar = Tar::default();
    tar.add(E::file("small", b"hello")).add(E::file("big", &big));
    let blob = tar.finish();
    let mut desc = descriptor(&blob, &[]);
    desc.media_type = "application/vnd.oci.image.layer.v1.tar".into();
    let source = MemSource::new(blob.clone());
    let index = LayerIndex::build(&desc, &source, &Limits::DEFAULT).unwrap();
    assert!(!index.is_compressed());
    assert_eq!(read_all(&index, &source, "small"), b"hello");
    assert_eq!(read_all(&index, &source, "big"), big);
    let index = LayerIndex::from_bytes(&index.to_bytes().unwrap()).unwrap();

    let EntryKind::File(data) = &index.entries[1].kind else { panic!() };
    source.corrupt(1_500_000..1_500_001, 1);
    let mut buf = vec![0u8; 100_000];
    assert_eq!(index.read(&source, data, 1_450_000, &mut buf).unwrap(), 100_000);
    assert_eq!(buf, big[1_450_000..1_550_000]);
    assert_eq!(source.discards.lock().unwrap().len(), 1);
    source.corrupt(2_200_000..2_200_001, 2);
    assert!(matches!(index.read(&source, data, 2_150_000, &mut buf), Err(LayerError::Corrupt { .. })));

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, &blob).unwrap();
        fuse_lazypull::layer::unpack(&index, &file, &dir.path().join("lower"), &[], &Limits::DEFAULT).unwrap();
        assert_eq!(std::fs::read(dir.path().join("lower/big")).unwrap(), big);
    }
}
