//! `convert` end to end against a real registry: an image of several layers (whiteouts, opaque
//! directory, links, xattrs, a large file) is converted to eStargz and pushed; the copy carries
//! the stargz annotations, its config's diff_ids are the sha256 of its uncompressed layers, and
//! skopeo + `umoci unpack` of the copy give the same tree as of the source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_lazypull::cache::{BlobCache, CacheConfig};
use fuse_lazypull::convert::{self, UNCOMPRESSED_SIZE};
use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::{EntryKind, LayerIndex, Limits, TOC_DIGEST_ANNOTATION};
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Registry, RegistryConfig, OCI_LAYER_GZIP};
use test_support::registry as harness;
use test_support::registry::ImageBuilder;

/// What a tree holds, path by path: kind, mode, owner, size, contents digest or link target.
fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let name = rel.file_name().unwrap().to_string_lossy().into_owned();
            // The eStargz tar's own entries.
            if rel.parent() == Some(Path::new("")) && (name == "stargz.index.json" || name.ends_with(".landmark")) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                "dir".to_owned()
            } else if meta.is_file() {
                format!("file {}", Digest::of(&std::fs::read(&path).unwrap()))
            } else {
                format!("special {:o} {}", meta.mode() & 0o170000, meta.rdev())
            };
            let mode = meta.permissions().mode() & 0o7777;
            out.insert(rel, format!("{what} mode {mode:o} owner {}:{}", meta.uid(), meta.gid()));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn convert_round_trip_gives_the_same_tree_with_stargz_annotations_needs_root() {
    let reg = harness::Registry::start();
    let mut b = ImageBuilder::new();
    b.layer(|l| {
        l.file("etc/os-release", b"NAME=test\n", 0o644)
            .file("bin/start", b"#!/bin/sh\nexec app\n", 0o755)
            .file("etc/old.conf", b"old\n", 0o600)
            .file("var/cache/a", b"a\n", 0o644)
            .file("var/cache/b", b"b\n", 0o644)
            .symlink("bin/sh", "/bin/busybox")
            .file("usr/share/data", b"shared data\n", 0o644)
            .hardlink("usr/share/data-link", "usr/share/data")
            .chown("etc/old.conf", 1000, 1000)
            .xattr("bin/start", "user.note", b"hello");
    });
    b.layer(|l| {
        l.whiteout("etc/old.conf").opaque("var/cache").file("var/cache/c", b"c\n", 0o644).large_file(
            "opt/big.bin",
            5 << 20,
            3,
        );
    });
    let src = b.push(&reg.host(), "test/conv:v1");
    let src: ImageRef = src.parse().unwrap();
    let dst: ImageRef = reg.reference("test/conv:v1-estargz").parse().unwrap();
    let registry = Registry::new(RegistryConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(
        &dir.path().join("cache"),
        CacheConfig { size_limit: u64::MAX, fetch_timeout: Duration::from_secs(30), ..CacheConfig::default() },
    )
    .unwrap();

    let digest =
        convert::convert(&registry, &cache, &src, &dst, &[PathBuf::from("bin/start")], &Limits::DEFAULT).unwrap();
    let converted = registry.resolve(&dst).unwrap();
    assert_eq!(converted.digest, digest);
    assert_eq!(converted.layers.len(), 2);
    let config: serde_json::Value =
        serde_json::from_slice(&registry.fetch_blob(&dst, &converted.config.digest).unwrap()).unwrap();
    for (i, layer) in converted.layers.iter().enumerate() {
        assert_eq!(layer.media_type, OCI_LAYER_GZIP);
        assert!(layer.annotations[TOC_DIGEST_ANNOTATION].parse::<Digest>().is_ok(), "{:?}", layer.annotations);
        let blob = registry.fetch_blob(&dst, &layer.digest).unwrap();
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut tar).unwrap();
        assert_eq!(layer.annotations[UNCOMPRESSED_SIZE], tar.len().to_string());
        assert_eq!(config["rootfs"]["diff_ids"][i], Digest::of(&tar).as_str());
    }

    // Through a fresh cache, the large layer is indexed from its table of contents and one small
    // file read with a few ranged GETs: far less than the layer.
    let lazy = BlobCache::open(
        &dir.path().join("lazy"),
        CacheConfig { size_limit: u64::MAX, fetch_timeout: Duration::from_secs(30), ..CacheConfig::default() },
    )
    .unwrap();
    let client = Registry::new(RegistryConfig::default()).unwrap();
    let top = &converted.layers[1];
    let blob = lazy.blob(&client, &dst, top).unwrap();
    let index = LayerIndex::build(top, &*blob, &Limits::DEFAULT).unwrap();
    assert!(index.is_estargz());
    let entry = index.entries.iter().find(|e| e.path == Path::new("var/cache/c")).unwrap();
    let EntryKind::File(data) = &entry.kind else { panic!("{entry:?}") };
    let mut buf = [0u8; 16];
    let n = index.read(&*blob, data, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"c\n");
    eprintln!("one small file of a {} byte eStargz layer: {} bytes fetched", top.size, client.bytes_fetched());
    assert!(client.bytes_fetched() < top.size / 10, "fetched {} of {}", client.bytes_fetched(), top.size);

    // The copy unpacks to the source's tree.
    let want = describe(&b.unpack(&dir.path().join("src-bundle")));
    let layout = dir.path().join("dst-oci");
    harness::run(
        std::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{dst}"))
            .arg(format!("oci:{}:x", layout.display())),
    );
    let bundle = dir.path().join("dst-bundle");
    harness::run(
        std::process::Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:x", layout.display()))
            .arg(&bundle),
    );
    let got = describe(&bundle.join("rootfs"));
    assert_eq!(got, want);
    assert!(!want.contains_key(Path::new("etc/old.conf")));
    assert!(!want.contains_key(Path::new("var/cache/a")));
}
