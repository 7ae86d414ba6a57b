//! Unpacking a layer into an overlayfs lower directory: every kind of entry as in the image,
//! whiteouts and opaque directories in overlayfs' form, and no write outside the destination.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use fuse_lazypull::cache::{BlobCache, CacheConfig};
use fuse_lazypull::layer::tar::RawKind;
use fuse_lazypull::layer::{unpack, LayerError, LayerIndex, Limits};
use fuse_lazypull::mount::{unpack_once, MountError};
use layer_support::{complete_blob, descriptor, gzip, zero_bomb, MemSource, Tar, E};

fn unpack_tar(tar: Vec<u8>, dest: &Path) -> Result<(), LayerError> {
    let blob = gzip(&tar);
    let source = MemSource::new(blob.clone());
    let index = LayerIndex::build(&descriptor(&blob, &[]), &source, &Limits::DEFAULT)?;
    let file = dest.parent().unwrap().join(format!("{}.blob", dest.file_name().unwrap().to_str().unwrap()));
    std::fs::write(&file, &blob).unwrap();
    unpack(&index, &file, dest, &[], &Limits::DEFAULT)
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let len = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}

/// Owners, device nodes and `trusted.*` xattrs need root; CI runs as root.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
}

#[test]
fn every_kind_of_entry_lands_as_in_the_image_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("lower");
    let mut tar = Tar::default();
    tar.add(E { mode: 0o750, mtime: 1_000_000, ..E::dir("./") })
        .add(E { mode: 0o711, uid: 7, gid: 8, mtime: 1_500_000_000, ..E::dir("etc/") })
        .add(E { mode: 0o4755, uid: 1000, gid: 1001, mtime: 1_600_000_000, ..E::file("etc/prog", b"binary") })
        .add(E { xattrs: vec![(b"user.note".to_vec(), b"hello".to_vec())], ..E::file("deep/er/file", b"x") })
        .add(E { uid: 3, gid: 4, mtime: 1_234, ..E::symlink("etc/link", "/etc/passwd") })
        .add(E::hardlink("etc/prog2", "etc/prog"))
        .add(E { kind: RawKind::CharDev { major: 1, minor: 3 }, mode: 0o666, ..E::file("dev/null", b"") })
        .add(E { kind: RawKind::BlockDev { major: 7, minor: 0 }, mode: 0o660, ..E::file("dev/loop0", b"") })
        .add(E { kind: RawKind::Fifo, mode: 0o600, ..E::file("fifo", b"") })
        .add(E::file("etc/.wh.removed", b""))
        .add(E::dir("opq/"))
        .add(E::file("opq/.wh..wh..opq", b""))
        .add(E::file("opq/kept", b"k"))
        .add(E { xattrs: vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())], ..E::dir("fake-opq/") });
    unpack_tar(tar.finish(), &dest).unwrap();

    let meta = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap();
    let prog = meta("etc/prog");
    assert_eq!(std::fs::read(dest.join("etc/prog")).unwrap(), b"binary");
    assert_eq!((prog.mode() & 0o7777, prog.uid(), prog.gid(), prog.mtime()), (0o4755, 1000, 1001, 1_600_000_000));
    assert_eq!(prog.nlink(), 2);
    assert_eq!(meta("etc/prog2").ino(), prog.ino());
    let etc = meta("etc");
    assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid(), etc.mtime()), (0o711, 7, 8, 1_500_000_000));
    let root = meta("");
    assert_eq!((root.permissions().mode() & 0o7777, root.mtime()), (0o750, 1_000_000));
    assert_eq!(xattr(&dest.join("deep/er/file"), "user.note").as_deref(), Some(&b"hello"[..]));
    assert_eq!(meta("deep/er").mode() & 0o7777, 0o755);
    let link = meta("etc/link");
    assert!(link.file_type().is_symlink());
    assert_eq!(std::fs::read_link(dest.join("etc/link")).unwrap(), Path::new("/etc/passwd"));
    assert_eq!((link.uid(), link.gid(), link.mtime()), (3, 4, 1_234));
    let null = meta("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!((null.rdev(), null.mode() & 0o7777), (libc::makedev(1, 3), 0o666));
    assert!(meta("dev/loop0").file_type().is_block_device());
    assert!(meta("fifo").file_type().is_fifo());
    let wh = meta("etc/removed");
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!(xattr(&dest.join("opq"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert_eq!(std::fs::read(dest.join("opq/kept")).unwrap(), b"k");
    assert!(!dest.join("opq/.wh..wh..opq").exists());
    assert_eq!(xattr(&dest.join("fake-opq"), "trusted.overlay.opaque"), None, "the image cannot mark it opaque");
}

#[test]
fn a_symlinked_parent_is_never_followed_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for (i, target) in [outside.to_str().unwrap(), "../outside", "."].into_iter().enumerate() {
        let dest = dir.path().join(format!("lower{i}"));
        let mut tar = Tar::default();
        tar.add(E::symlink("evil", target)).add(E::file("evil/planted", b"gotcha"));
        let err = unpack_tar(tar.finish(), &dest).unwrap_err();
        assert!(matches!(err, LayerError::Unpack { .. }), "{err:?}");
        assert!(err.to_string().contains("evil/planted"), "{err}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "wrote outside through {target}");
        assert!(!dest.join("planted").exists());
    }
}

#[test]
fn a_hard_link_to_a_symlink_links_the_symlink_itself_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("secret");
    std::fs::write(&outside, b"secret").unwrap();
    let dest = dir.path().join("lower");
    let mut tar = Tar::default();
    tar.add(E::symlink("s", outside.to_str().unwrap())).add(E::hardlink("h", "s"));
    unpack_tar(tar.finish(), &dest).unwrap();
    assert!(std::fs::symlink_metadata(dest.join("h")).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::symlink_metadata(&outside).unwrap().nlink(), 1);
}

#[test]
fn a_later_entry_replaces_an_earlier_one_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("lower");
    let mut tar = Tar::default();
    tar.add(E::file("x", b"first"))
        .add(E::file("x", b"second"))
        .add(E::file("d/in", b""))
        .add(E::file("d", b"file now"));
    unpack_tar(tar.finish(), &dest).unwrap();
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"second");
    assert_eq!(std::fs::read(dest.join("d")).unwrap(), b"file now");
}

#[test]
fn a_hard_link_to_a_lower_layers_file_is_a_copy_and_hidden_files_are_refused_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut tar = Tar::default();
    tar.add(E { mode: 0o4751, uid: 5, gid: 6, mtime: 1_700_000_000, ..E::file("bin/tool", b"tool bytes") })
        .add(E { xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())], ..E::file("gone/file", b"g") })
        .add(E::file("opq/hidden", b"h"))
        .add(E { kind: RawKind::Fifo, mode: 0o600, ..E::file("fifo", b"") });
    unpack_tar(tar.finish(), &base).unwrap();
    let mid = dir.path().join("mid");
    let mut tar = Tar::default();
    tar.add(E::file("gone/.wh.file", b"")).add(E::dir("opq/")).add(E::file("opq/.wh..wh..opq", b""));
    unpack_tar(tar.finish(), &mid).unwrap();

    let top = |name: &str, mut tar: Tar| {
        let blob = gzip(&tar.finish());
        let index =
            LayerIndex::build(&descriptor(&blob, &[]), &MemSource::new(blob.clone()), &Limits::DEFAULT).unwrap();
        let file = dir.path().join(format!("{name}.blob"));
        std::fs::write(&file, &blob).unwrap();
        unpack(&index, &file, &dir.path().join(name), &[base.clone(), mid.clone()], &Limits::DEFAULT)
    };
    let mut tar = Tar::default();
    tar.add(E::hardlink("usr/tool2", "bin/tool"));
    top("top", tar).unwrap();
    let copy = std::fs::symlink_metadata(dir.path().join("top/usr/tool2")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("top/usr/tool2")).unwrap(), b"tool bytes");
    assert_eq!((copy.mode() & 0o7777, copy.uid(), copy.gid(), copy.mtime()), (0o4751, 5, 6, 1_700_000_000));
    assert_eq!(std::fs::symlink_metadata(base.join("bin/tool")).unwrap().nlink(), 1, "the lower file is untouched");

    for (name, target) in [("t1", "gone/file"), ("t2", "opq/hidden"), ("t3", "fifo"), ("t4", "nowhere")] {
        let mut tar = Tar::default();
        tar.add(E::hardlink("link", target));
        let e = top(name, tar).expect_err(target);
        assert!(matches!(e, LayerError::Malicious { .. }), "{target}: {e}");
    }
}

fn cache_at(dir: &Path, size_limit: u64) -> std::sync::Arc<BlobCache> {
    BlobCache::open(
        dir,
        CacheConfig { size_limit, fetch_timeout: std::time::Duration::from_secs(5), ..CacheConfig::default() },
    )
    .unwrap()
}

/// A layer of 256 MiB of zeros in 260 kB, with an index made under limits that let it through
/// (an index made by another configuration, say): unpacking it under the default limits stops
/// at the expansion limit, and nothing stays in the cache or goes anywhere else.
#[test]
fn a_gzip_bomb_is_refused_when_unpacked_and_leaves_nothing_needs_root() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(&dir.path().join("cache"), u64::MAX);
    let bytes = zero_bomb("bomb", 256);
    let blob = complete_blob(&cache, &bytes);
    let lax = Limits { max_expansion: u64::MAX, ..Limits::DEFAULT };
    let index = LayerIndex::build(&descriptor(&bytes, &[]), &*blob, &lax).unwrap();
    match unpack_once(&cache, blob.digest(), &blob, &index, &[], &Limits::DEFAULT) {
        Err(MountError::Unpack { source: LayerError::Expansion { .. }, .. }) => {}
        other => panic!("expected an expansion error, got {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(dir.path().join("cache/unpacked")).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let top: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, ["cache"]);
}

/// A layer that would not fit the cache's size limit is refused before anything is written.
#[test]
fn a_layer_larger_than_the_cache_limit_is_not_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_at(dir.path(), 1 << 20);
    let data = vec![7u8; 2 << 20];
    let mut tar = Tar::default();
    tar.add(E::file("big", &data));
    let bytes = gzip(&tar.finish());
    let blob = complete_blob(&cache, &bytes);
    let index = LayerIndex::build(&descriptor(&bytes, &[]), &*blob, &Limits::DEFAULT).unwrap();
    let err = unpack_once(&cache, blob.digest(), &blob, &index, &[], &Limits::DEFAULT).unwrap_err();
    assert!(matches!(err, MountError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("size limit"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path().join("unpacked")).unwrap().count(), 0);
}
