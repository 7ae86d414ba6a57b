//! End-to-end tests of `vstor image mount` against a real `docker-registry` on loopback, with
//! images built by umoci and pushed by skopeo (fuse-lazypull's test support). They need root
//! (FUSE, overlay mounts, device nodes, owners) and say so in their names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

#[path = "../fuse-lazypull/tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_lazypull::cache::{BlobCache, CacheConfig};
use fuse_lazypull::handoff;
use fuse_lazypull::layer::Limits;
use fuse_lazypull::mount::{ImageMount, MountOptions, Phase};
use fuse_lazypull::reference::ImageRef;
use fuse_lazypull::registry::{Registry, RegistryConfig};
use support::{ImageBuilder, Layer};

const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

fn cache_at(dir: &Path) -> Arc<BlobCache> {
    let config = CacheConfig { size_limit: 1 << 40, fetch_timeout: FETCH_TIMEOUT, ..CacheConfig::default() };
    BlobCache::open(dir, config).expect("opening the cache")
}

fn registry() -> Arc<Registry> {
    Registry::new(RegistryConfig::default()).expect("registry client")
}

fn start(reference: &str, target: &Path, cache: &Arc<BlobCache>, handoff: bool) -> ImageMount {
    start_with(reference, target, cache, MountOptions { handoff, ..MountOptions::default() })
}

fn start_with(reference: &str, target: &Path, cache: &Arc<BlobCache>, options: MountOptions) -> ImageMount {
    let image: ImageRef = reference.parse().expect("reference");
    ImageMount::start(Arc::clone(cache), registry(), &image, target, options).expect("mounting")
}

const ON_DEMAND: MountOptions = MountOptions { handoff: false, background_fetch: false, limits: Limits::DEFAULT };

/// A cache at `dir` that knows the index of every layer of `reference` (learnt through a
/// throwaway cache that fetched the layers) but holds none of their bytes.
fn cache_with_indexes_only(reference: &str, dir: &Path) -> Arc<BlobCache> {
    let scratch = tempfile::tempdir().unwrap();
    let first = cache_at(scratch.path());
    let client = registry();
    let image_ref: ImageRef = reference.parse().unwrap();
    let resolved = client.resolve(&image_ref).unwrap();
    let cache = cache_at(dir);
    for desc in &resolved.layers {
        let blob = first.blob(&client, &image_ref, desc).unwrap();
        let index = fuse_lazypull::mount::layer_index(&first, desc, &blob, &Limits::DEFAULT).unwrap();
        cache.put_derived(&desc.digest, fuse_lazypull::mount::LAYER_INDEX, &index.to_bytes().unwrap()).unwrap();
    }
    cache
}

/// Waits (bounded) until the mount reaches `phase`.
fn wait_phase(mount: &ImageMount, phase: Phase) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = mount.progress().phase();
        if now == phase {
            return;
        }
        assert!(!matches!(now, Phase::Failed(_)), "mount failed: {now:?}");
        assert!(Instant::now() < deadline, "still {now:?}, waiting for {phase:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Detaches whatever is still mounted at `target` (FUSE or overlay) and waits for the mount.
fn finish(mount: ImageMount) {
    let target = mount.target().to_path_buf();
    mount.stop();
    while handoff::mounted_fs_type(&target).ok().flatten().is_some_and(|t| t == "overlay" || t.starts_with("fuse")) {
        if handoff::detach(&target).is_err() {
            break;
        }
    }
    mount.wait().ok();
}

/// The image every tree test uses: several layers with whiteouts, an opaque directory, hard
/// links, symlinks, a large file, a sparse file, xattrs, device nodes, owners and odd modes.
fn rich_image() -> ImageBuilder {
    let mut image = ImageBuilder::new();
    image
        .layer(|l: &mut Layer| {
            l.dir("etc", 0o755)
                .file("etc/hostname", b"base\n", 0o644)
                .file("etc/remove-me", b"gone soon", 0o600)
                .xattr("etc/hostname", "user.origin", b"layer0")
                .dir("opt/a/b", 0o750)
                .file("opt/a/b/old", b"hidden by the opaque dir", 0o644)
                .file("opt/keep", b"kept", 0o644)
                .file("bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
                .file("bin/suid", b"setuid", 0o4755)
                .chown("bin/suid", 1000, 1001)
                .dir("tmp", 0o1777)
                .symlink("bin/sh-link", "tool")
                .symlink("etc/abs-link", "/etc/hostname")
                .file("data/h1", b"hard linked", 0o640)
                .hardlink("data/h2", "data/h1")
                .large_file("data/large", 24 << 20, 7)
                .sparse_file("data/sparse", 8 << 20, &[(0, b"start"), (6 << 20, b"middle")])
                .char_dev("dev/null", 1, 3)
                .block_dev("dev/loop9", 7, 9)
                .fifo("dev/pipe");
        })
        .layer(|l: &mut Layer| {
            l.dir("etc", 0o755)
                .file("etc/hostname", b"top\n", 0o644)
                .xattr("etc/hostname", "user.origin", b"layer1")
                .whiteout("etc/remove-me")
                .dir("opt/a", 0o755)
                .opaque("opt/a")
                .file("opt/a/new", b"new in layer 1", 0o644);
        })
        .layer(|l: &mut Layer| {
            l.dir("srv", 0o700).chown("srv", 33, 33).file("srv/index.html", b"<html></html>", 0o444);
        });
    image
}

/// Everything the tests compare about one path.
#[derive(Debug, PartialEq, Eq)]
struct Item {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    rdev: u64,
    link: Option<PathBuf>,
    digest: Option<u64>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: `c` is NUL-terminated and `names` is a buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}: {}", path.display(), std::io::Error::last_os_error());
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: NUL-terminated strings and a buffer of the given length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(len >= 0, "getxattr {}: {}", path.display(), std::io::Error::last_os_error());
        value.truncate(len as usize);
        out.insert(name.to_vec(), value);
    }
    out
}

/// FNV-1a of a file's bytes.
fn digest(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            return h;
        }
        for b in &buf[..n] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Every path under `root` with what it holds, and the groups of paths sharing an inode.
fn snapshot(root: &Path) -> (BTreeMap<PathBuf, Item>, Vec<Vec<PathBuf>>) {
    let mut items = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let t = meta.file_type();
        let kind = if t.is_dir() {
            "dir"
        } else if t.is_file() {
            "file"
        } else if t.is_symlink() {
            "symlink"
        } else if t.is_char_device() {
            "char"
        } else if t.is_block_device() {
            "block"
        } else if t.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        if t.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
        if t.is_file() {
            inodes.entry((meta.dev(), meta.ino())).or_default().push(rel.clone());
        }
        let item = Item {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if t.is_file() || t.is_symlink() { meta.len() } else { 0 },
            rdev: meta.rdev(),
            link: t.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
            digest: t.is_file().then(|| digest(&path)),
            xattrs: xattrs(&path),
        };
        items.insert(rel, item);
    }
    let mut links: Vec<Vec<PathBuf>> = inodes.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut links {
        g.sort();
    }
    links.sort();
    (items, links)
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    let (want, want_links) = snapshot(expected);
    let (got, got_links) = snapshot(actual);
    for (path, item) in &want {
        match got.get(path) {
            Some(g) => {
                assert_eq!(g, item, "{} differs ({} vs {})", path.display(), actual.display(), expected.display())
            }
            None => panic!("{} is missing from {}", path.display(), actual.display()),
        }
    }
    for path in got.keys() {
        assert!(want.contains_key(path), "{} is in {} but not in umoci's unpack", path.display(), actual.display());
    }
    assert_eq!(got_links, want_links, "hard link groups");
}

#[test]
fn mounted_tree_equals_umoci_unpack_over_fuse_and_after_handoff_needs_root_fuse() {
    let registry = support::Registry::start();
    let image = rich_image();
    let reference = image.push(&registry.host(), "rich/image:v1");
    let work = tempfile::tempdir().unwrap();
    let expected = image.unpack(&work.path().join("bundle"));
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = cache_at(&work.path().join("cache"));

    let mount = start(&reference, &target, &cache, false);
    assert!(handoff::mounted_fs_type(&target).unwrap().unwrap().starts_with("fuse"));
    assert_same_tree(&expected, &target);
    assert!(std::fs::write(target.join("etc/new"), b"x").is_err(), "the mount is read-only");

    wait_phase(&mount, Phase::Complete);
    mount.hand_off().expect("handing off");
    assert_eq!(handoff::mounted_fs_type(&target).unwrap().as_deref(), Some("overlay"));
    assert_same_tree(&expected, &target);
    finish(mount);
}

#[test]
fn handoff_shows_overlay_in_mountinfo_and_an_open_descriptor_still_reads_needs_root_fuse() {
    let registry = support::Registry::start();
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.file("hello", b"hello from the image", 0o644).large_file("big", 4 << 20, 3);
    });
    let reference = image.push(&registry.host(), "handoff/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = cache_at(&work.path().join("cache"));

    let mount = start(&reference, &target, &cache, false);
    let mut before = std::fs::File::open(target.join("big")).unwrap();
    let flags = |info: handoff::MountInfo| -> Vec<String> {
        info.options.into_iter().filter(|o| ["ro", "rw", "nosuid", "nodev", "noexec"].contains(&o.as_str())).collect()
    };
    let fuse_flags = flags(handoff::mounted(&target).unwrap().unwrap());
    assert_eq!(fuse_flags, ["ro", "nosuid", "nodev"]);
    wait_phase(&mount, Phase::Complete);
    mount.hand_off().expect("handing off");
    assert_eq!(flags(handoff::mounted(&target).unwrap().unwrap()), fuse_flags, "same mount flags after the handoff");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line =
        info.lines().rfind(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap())).expect("a mount at the target");
    assert!(line.contains(" - overlay "), "mountinfo: {line}");
    assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"hello from the image");

    // The descriptor opened through FUSE before the switch still reads, through FUSE.
    let mut bytes = Vec::new();
    before.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len(), 4 << 20);
    let fresh = std::fs::read(target.join("big")).unwrap();
    assert_eq!(bytes, fresh, "old descriptor and overlayfs agree");
    assert!(mount.progress().fs.bytes_read.load(std::sync::atomic::Ordering::Relaxed) >= 4 << 20);
    drop(before);
    finish(mount);
}

#[test]
fn two_images_sharing_a_base_layer_fetch_it_once_needs_root_fuse() {
    let registry = support::Registry::start();
    let proxy = support::Proxy::start(&registry, support::Auth::None);
    // One layout: pushed with its base layer only, then again with an app layer on top.
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.large_file("usr/lib/base.so", 8 << 20, 11).file("etc/os-release", b"base", 0o644);
    });
    image.push(&registry.host(), "shared/one:v1");
    image.layer(|l| {
        l.file("app/two", b"second app", 0o755);
    });
    image.push(&registry.host(), "shared/two:v1");
    let work = tempfile::tempdir().unwrap();
    let cache = cache_at(&work.path().join("cache"));
    let (t1, t2) = (work.path().join("one"), work.path().join("two"));
    std::fs::create_dir(&t1).unwrap();
    std::fs::create_dir(&t2).unwrap();

    let one = start(&proxy.reference("shared/one:v1"), &t1, &cache, true);
    wait_phase(&one, Phase::HandedOff);
    let after_first = proxy.blob_bytes();
    assert!(after_first >= 8 << 20, "the base layer was fetched: {after_first}");
    let two = start(&proxy.reference("shared/two:v1"), &t2, &cache, true);
    wait_phase(&two, Phase::HandedOff);
    let second_bytes = proxy.blob_bytes() - after_first;
    assert!(second_bytes < 1 << 20, "the second image fetched {second_bytes} bytes: the base layer again?");
    assert_eq!(std::fs::read(t2.join("app/two")).unwrap(), b"second app");
    assert_eq!(std::fs::read(t1.join("etc/os-release")).unwrap(), std::fs::read(t2.join("etc/os-release")).unwrap());
    finish(one);
    finish(two);
}

#[test]
fn corrupt_and_truncated_blobs_are_refused_and_fetched_again_needs_root_fuse() {
    let registry = support::Registry::start();
    let proxy = support::Proxy::start(&registry, support::Auth::None);
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.large_file("data", 2 << 20, 5).file("small", b"small file", 0o644);
    });
    image.push(&registry.host(), "faulty/image:v1");
    let work = tempfile::tempdir().unwrap();
    let expected = image.unpack(&work.path().join("bundle"));
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = cache_at(&work.path().join("cache"));
    proxy.set_faults(|f| {
        f.corrupt_blobs = 1;
        f.truncate_blobs = 1;
    });
    let mount = start(&proxy.reference("faulty/image:v1"), &target, &cache, true);
    wait_phase(&mount, Phase::HandedOff);
    assert_same_tree(&expected, &target);
    // Both bad bodies were really served (the proxy counts a fault down as it applies it), so
    // the identical tree shows they were refused and their ranges fetched again.
    let mut left = (u32::MAX, u32::MAX);
    proxy.set_faults(|f| left = (f.corrupt_blobs, f.truncate_blobs));
    assert_eq!(left, (0, 0), "the corrupt and the truncated body were both served");
    finish(mount);
}

/// A layer index known in the cache (from an earlier mount) and the blob's bytes not: reads of
/// missing data wait for the registry, and fail with EIO after the bounded timeout when it is
/// stalled or down, while metadata keeps working.
#[test]
fn registry_stalled_or_down_reads_fail_with_eio_after_the_timeout_needs_root_fuse() {
    let registry = support::Registry::start();
    let proxy = support::Proxy::start(&registry, support::Auth::None);
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.large_file("big", 4 << 20, 9).file("small", b"small", 0o644);
    });
    image.push(&registry.host(), "slow/image:v1");
    let reference = proxy.reference("slow/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();

    for (i, fault) in ["stall", "down"].into_iter().enumerate() {
        let cache = cache_with_indexes_only(&reference, &work.path().join(format!("cache{i}")));
        let mount = start_with(&reference, &target, &cache, ON_DEMAND);
        proxy.set_faults(|f| match fault {
            "stall" => f.stall = true,
            _ => f.fail_requests = u32::MAX,
        });
        let started = Instant::now();
        let err = match std::fs::read(target.join("big")) {
            Ok(_) => panic!("a read of missing data succeeded while the registry is {fault}"),
            Err(e) => e,
        };
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{fault}: {err}");
        assert!(started.elapsed() < Duration::from_secs(60), "{fault}: the read failed, and did not hang");
        assert_eq!(std::fs::metadata(target.join("big")).unwrap().len(), 4 << 20, "metadata is served");
        assert!(mount.progress().fs.read_errors.load(std::sync::atomic::Ordering::Relaxed) > 0);
        proxy.set_faults(|f| *f = support::Faults::default());
        // Once the registry is back, the same read succeeds.
        assert_eq!(std::fs::read(target.join("big")).unwrap().len(), 4 << 20);
        finish(mount);
    }
}

fn vstor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vstor"))
}

/// With the layer's index known, a first read of one small file from a large image fetches a
/// small part of it.
#[test]
fn first_read_of_a_small_file_fetches_far_less_than_the_image_needs_root_fuse() {
    let registry = support::Registry::start();
    let proxy = support::Proxy::start(&registry, support::Auth::None);
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.large_file("a/big", 48 << 20, 21).large_file("b/other", 16 << 20, 22).file("z/small", b"tiny", 0o644);
    });
    image.push(&registry.host(), "large/image:v1");
    let reference = proxy.reference("large/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = cache_with_indexes_only(&reference, &work.path().join("cache"));
    let before = proxy.blob_bytes();
    let mount = start_with(&reference, &target, &cache, ON_DEMAND);
    assert_eq!(std::fs::read(target.join("z/small")).unwrap(), b"tiny");
    let fetched = proxy.blob_bytes() - before;
    let image_bytes: u64 = mount.progress().total_bytes();
    assert!(image_bytes > 60 << 20);
    assert!(fetched * 4 < image_bytes, "fetched {fetched} of {image_bytes} bytes for one small file");
    finish(mount);
}

#[test]
fn killing_the_daemon_after_handoff_leaves_the_mount_working_needs_root_fuse() {
    let registry = support::Registry::start();
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.file("etc/motd", b"still here", 0o644);
    });
    let reference = image.push(&registry.host(), "kill/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let mut child = vstor()
        .args(["image", "mount", &reference])
        .arg(&target)
        .arg("--cache")
        .arg(work.path().join("cache"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while handoff::mounted_fs_type(&target).unwrap().as_deref() != Some("overlay") {
        assert!(child.try_wait().unwrap().is_none(), "vstor exited before the handoff");
        assert!(Instant::now() < deadline, "no handoff");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(target.join("etc/motd")).unwrap(), b"still here");
    assert_eq!(handoff::mounted_fs_type(&target).unwrap().as_deref(), Some("overlay"));
    handoff::detach(&target).unwrap();
}

#[test]
fn bad_reference_and_missing_tag_get_clear_messages_needs_root() {
    let registry = support::Registry::start();
    let work = tempfile::tempdir().unwrap();
    let run = |reference: &str| {
        let out = vstor()
            .args(["image", "mount", reference])
            .arg(work.path())
            .arg("--cache")
            .arg(work.path().join("cache"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{reference} mounted?");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bad = run("Not A Reference!!");
    assert!(bad.contains("bad image reference"), "{bad}");
    let missing = run(&registry.reference("nothing/here:nope"));
    assert!(missing.contains("not found"), "{missing}");
    assert!(missing.contains("nothing/here:nope"), "{missing}");
}

/// `vstor image convert` of the rich image: its eStargz copy mounts to the same tree, and a
/// first read of a small file fetches a small part of it with no index known beforehand.
#[test]
fn estargz_copy_mounts_to_the_same_tree_and_reads_lazily_needs_root_fuse() {
    let registry = support::Registry::start();
    let proxy = support::Proxy::start(&registry, support::Auth::None);
    let mut image = rich_image();
    image.layer(|l| {
        l.large_file("opt/huge", 48 << 20, 31).file("zz/small", b"small and late", 0o644);
    });
    let src = image.push(&registry.host(), "rich/image:gzip");
    let dst = registry.reference("rich/image:estargz");
    let work = tempfile::tempdir().unwrap();
    let out = vstor()
        .args(["image", "convert", &src, &dst, "--cache"])
        .arg(work.path().join("convert-cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    let expected = image.unpack(&work.path().join("bundle"));
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();

    let cache = cache_at(&work.path().join("cache"));
    let mount = start_with(&proxy.reference("rich/image:estargz"), &target, &cache, ON_DEMAND);
    assert_eq!(std::fs::read(target.join("zz/small")).unwrap(), b"small and late");
    let fetched = proxy.blob_bytes();
    let total = mount.progress().total_bytes();
    assert!(fetched * 4 < total, "fetched {fetched} of {total} bytes to mount and read one small file");
    assert_same_tree(&expected, &target);
    finish(mount);

    let cache = cache_at(&work.path().join("cache2"));
    let mount = start(&proxy.reference("rich/image:estargz"), &target, &cache, true);
    wait_phase(&mount, Phase::HandedOff);
    assert_same_tree(&expected, &target);
    finish(mount);
}

/// A layer whose tar names `../` paths is refused with an error, and nothing is written
/// outside the mount.
#[test]
fn malicious_layer_gets_an_error_needs_root_fuse() {
    let server = support::Registry::start();
    let image = ImageBuilder::new();
    let staging = tempfile::tempdir().unwrap();
    std::fs::write(staging.path().join("evil"), b"escaped").unwrap();
    let tar = staging.path().join("evil.tar");
    support::run(
        Command::new("tar")
            .args(["--create", "--format=pax", "--absolute-names", "--transform=s,^evil,../../escaped-by-layer,"])
            .arg("--file")
            .arg(&tar)
            .arg("-C")
            .arg(staging.path())
            .arg("evil"),
    );
    let listing = support::run(Command::new("tar").arg("-tvf").arg(&tar).arg("--absolute-names"));
    assert!(listing.contains("../../escaped-by-layer"), "{listing}");
    support::run(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:latest", image.layout().display()))
            .arg(&tar),
    );
    let reference = image.push(&server.host(), "evil/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("a/b/mnt");
    std::fs::create_dir_all(&target).unwrap();
    let cache = cache_at(&work.path().join("cache"));
    let image_ref: ImageRef = reference.parse().unwrap();
    let result = ImageMount::start(Arc::clone(&cache), registry(), &image_ref, &target, MountOptions::default());
    let err = match result {
        Ok(mount) => {
            finish(mount);
            panic!("a layer with ../ paths was mounted");
        }
        Err(e) => fuse_lazypull::error::chain(&e),
    };
    assert!(err.contains("escaped-by-layer"), "{err}");
    assert!(!work.path().join("a/escaped-by-layer").exists());
    assert!(!work.path().join("escaped-by-layer").exists());
    assert_eq!(handoff::mounted_fs_type(&target).unwrap(), None, "nothing mounted");
}

/// A mount holds its layers only while it lives; the overlay it leaves behind keeps its unpacked
/// layers (and their blobs) until it is unmounted, and then gc takes them.
#[test]
fn gc_after_a_mount_keeps_only_what_its_overlay_uses_needs_root_fuse() {
    let registry = support::Registry::start();
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.file("etc/motd", b"collected later", 0o644);
    });
    let reference = image.push(&registry.host(), "gc/image:v1");
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let cache = cache_at(&work.path().join("cache"));
    let mount = start(&reference, &target, &cache, true);
    wait_phase(&mount, Phase::HandedOff);
    let layer = mount.progress().layers[0].digest.clone();
    mount.wait().expect("the mount ends once FUSE is released");

    let tight = CacheConfig { size_limit: 0, gc_grace: Duration::ZERO, ..CacheConfig::default() };
    let tight = BlobCache::open(&work.path().join("cache"), tight).unwrap();
    assert!(tight.gc().unwrap().removed.is_empty(), "the overlay still uses the layer");
    assert_eq!(std::fs::read(target.join("etc/motd")).unwrap(), b"collected later");
    handoff::detach(&target).unwrap();
    assert_eq!(tight.gc().unwrap().removed, vec![layer], "the mount's hold ended with it");
    assert!(tight.usage().unwrap().is_empty());
}

/// `vstor image prefetch`, `remove` and `gc`: a prefetched image is pinned; removing it lets the
/// gc that follows take its content.
#[test]
fn prefetch_remove_and_gc_from_the_command_line_needs_root() {
    let registry = support::Registry::start();
    let mut image = ImageBuilder::new();
    image.layer(|l| {
        l.file("a", b"pinned", 0o644);
    });
    let reference = image.push(&registry.host(), "cli/image:v1");
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = vstor()
            .arg("image")
            .args(args)
            .arg("--cache")
            .arg(work.path().join("cache"))
            .args(["--size-limit", "0", "--gc-grace-secs", "0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let prefetched = run(&["prefetch", &reference]);
    assert!(prefetched.contains("1 layers") && prefetched.contains("gc: removed 0 blobs"), "{prefetched}");
    assert!(run(&["gc"]).contains("gc: removed 0 blobs"), "pinned content stays under a limit of 0");
    let removed = run(&["remove", &reference]);
    assert!(removed.contains("gc: removed 2 blobs"), "the layer and the config go: {removed}");
    assert!(run(&["gc"]).contains("the cache holds 0 B"));
}
