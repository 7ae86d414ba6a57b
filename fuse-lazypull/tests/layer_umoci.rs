//! Layers made by umoci: the merged tree, and the layers unpacked and stacked by the kernel's
//! overlayfs, both equal the tree `umoci unpack` gives (types, modes, owners, times, sizes,
//! contents, link targets, hard links, device numbers, xattrs). Needs root and umoci (CI has both);
//! fails without them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fuse_lazypull::layer::{unpack, LayerIndex, Limits};
use fuse_lazypull::registry::Descriptor;
use fuse_lazypull::tree::{Ino, NodeKind, Tree, ROOT};
use layer_support::MemSource;
use sha2::Digest as _;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn umoci(dir: &Path, args: &[&str]) {
    run(Command::new("umoci").current_dir(dir).args(args));
}

fn c(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a value buffer of the length given.
    let rc = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {}", p.display());
}

fn user_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    // SAFETY: valid C string and buffer of the length given.
    let len = unsafe { libc::llistxattr(c(p).as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return Vec::new();
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let n = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: as above.
        let l = unsafe { libc::lgetxattr(c(p).as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(l.max(0) as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// What the comparison looks at, for one path.
fn describe_fs(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink {}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                let data = std::fs::read(&path).unwrap();
                format!("file {} {:?} nlink {}", data.len(), sha2::Sha256::digest(&data).as_slice(), m.nlink())
            } else {
                format!("special {:o} rdev {}", m.mode() & libc::S_IFMT, m.rdev())
            };
            let mtime = if ft.is_dir() { String::new() } else { format!(" mtime {}", m.mtime()) };
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                format!("{what} mode {:o} {}:{}{mtime} {:?}", m.mode() & 0o7777, m.uid(), m.gid(), user_xattrs(&path)),
            );
        }
    }
    out
}

fn describe_tree(tree: &Tree, indexes: &[LayerIndex], sources: &[MemSource]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(PathBuf, Ino)> = vec![(PathBuf::new(), ROOT)];
    while let Some((path, ino)) = stack.pop() {
        let NodeKind::Dir { children, .. } = &tree.node(ino).unwrap().kind else { continue };
        for (name, &child) in children {
            let p = path.join(name);
            let n = tree.node(child).unwrap();
            let what = match &n.kind {
                NodeKind::Dir { .. } => {
                    stack.push((p.clone(), child));
                    "dir".to_string()
                }
                NodeKind::Symlink(t) => format!("symlink {}", t.display()),
                NodeKind::File { layer, data } => {
                    let mut buf = vec![0u8; n.size as usize];
                    let got = indexes[*layer].read(&sources[*layer], data, 0, &mut buf).unwrap();
                    assert_eq!(got as u64, n.size);
                    format!("file {} {:?} nlink {}", n.size, sha2::Sha256::digest(&buf).as_slice(), n.nlink)
                }
                NodeKind::CharDev { major, minor } => {
                    format!("special {:o} rdev {}", libc::S_IFCHR, libc::makedev(*major, *minor))
                }
                NodeKind::BlockDev { major, minor } => {
                    format!("special {:o} rdev {}", libc::S_IFBLK, libc::makedev(*major, *minor))
                }
                NodeKind::Fifo => format!("special {:o} rdev 0", libc::S_IFIFO),
            };
            let mtime =
                if matches!(n.kind, NodeKind::Dir { .. }) { String::new() } else { format!(" mtime {}", n.mtime) };
            let mut xattrs = n.xattrs.clone();
            xattrs.sort();
            out.insert(p, format!("{what} mode {:o} {}:{}{mtime} {:?}", n.mode, n.uid, n.gid, xattrs));
        }
    }
    out
}

#[test]
fn umoci_layers_match_umoci_unpack_needs_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    assert!(Command::new("umoci").arg("--version").output().is_ok(), "needs umoci (scripts/setup.sh)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    umoci(dir, &["init", "--layout", "img"]);
    umoci(dir, &["new", "--image", "img:t"]);
    umoci(dir, &["unpack", "--image", "img:t", "bundle"]);
    let r = dir.join("bundle/rootfs");
    for d in ["etc", "usr/bin", "opq/sub", "dev", "keep"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
    std::fs::write(r.join("usr/bin/big"), &big).unwrap();
    std::fs::hard_link(r.join("usr/bin/big"), r.join("usr/bin/big2")).unwrap();
    std::os::unix::fs::symlink("/etc/hosts", r.join("etc/link")).unwrap();
    std::fs::write(r.join("opq/sub/f"), b"lower").unwrap();
    std::fs::write(r.join("etc/gone"), b"deleted above").unwrap();
    std::fs::write(r.join("keep/a"), b"a").unwrap();
    set_xattr(&r.join("etc/hosts"), "user.note", b"from umoci");
    run(Command::new("mknod").arg(r.join("dev/null")).args(["c", "1", "3"]));
    run(Command::new("mkfifo").arg(r.join("fifo")));
    run(Command::new("chown").arg("1000:1001").arg(r.join("etc/hosts")));
    run(Command::new("chmod").arg("4750").arg(r.join("usr/bin/big")));
    umoci(dir, &["repack", "--image", "img:t", "bundle"]);
    std::fs::remove_dir_all(dir.join("bundle")).unwrap();

    // A second layer: a deletion, a directory replaced, a file replaced by a directory.
    umoci(dir, &["unpack", "--image", "img:t", "bundle"]);
    std::fs::remove_file(r.join("etc/gone")).unwrap();
    std::fs::remove_dir_all(r.join("opq")).unwrap();
    std::fs::create_dir(r.join("opq")).unwrap();
    std::fs::write(r.join("opq/new"), b"upper").unwrap();
    std::fs::remove_file(r.join("keep/a")).unwrap();
    std::fs::create_dir(r.join("keep/a")).unwrap();
    std::fs::write(r.join("keep/a/inner"), b"i").unwrap();
    umoci(dir, &["repack", "--image", "img:t", "bundle"]);
    umoci(dir, &["unpack", "--image", "img:t", "reference"]);
    let want = describe_fs(&dir.join("reference/rootfs"));
    for present in ["opq/new", "keep/a/inner", "dev/null", "fifo", "usr/bin/big2", "etc/link"] {
        assert!(want.contains_key(Path::new(present)), "{present} missing from umoci's tree");
    }
    for absent in ["etc/gone", "opq/sub"] {
        assert!(!want.contains_key(Path::new(absent)), "{absent} still in umoci's tree");
    }
    let hosts_xattrs = user_xattrs(&dir.join("reference/rootfs/etc/hosts"));
    assert_eq!(hosts_xattrs, vec![(b"user.note".to_vec(), b"from umoci".to_vec())]);

    // The layers, from the image's manifest.
    let blobs = dir.join("img/blobs/sha256");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("img/index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(manifest_digest)).unwrap()).unwrap();
    let layers: Vec<Descriptor> = serde_json::from_value(manifest["layers"].clone()).unwrap();
    assert_eq!(layers.len(), 2);
    let mut indexes = Vec::new();
    let mut sources = Vec::new();
    for desc in &layers {
        let blob = std::fs::read(blobs.join(desc.digest.as_str().strip_prefix("sha256:").unwrap())).unwrap();
        let source = MemSource::new(blob);
        indexes.push(LayerIndex::build(desc, &source, &Limits::DEFAULT).unwrap());
        sources.push(source);
    }

    let tree = Tree::build(&indexes).unwrap();
    let got = describe_tree(&tree, &indexes, &sources);
    assert_eq!(got, want);

    // Unpacked for overlayfs and stacked by the kernel: the same tree again.
    let mut lowers = Vec::new();
    for (i, desc) in layers.iter().enumerate() {
        let lower = dir.join(format!("lower{i}"));
        let blob = blobs.join(desc.digest.as_str().strip_prefix("sha256:").unwrap());
        unpack(&indexes[i], &blob, &lower, &lowers, &Limits::DEFAULT).unwrap();
        lowers.push(lower);
    }
    let mnt = dir.join("merged");
    std::fs::create_dir(&mnt).unwrap();
    let lowerdir = format!("lowerdir={}:{}", lowers[1].display(), lowers[0].display());
    let mounted = Command::new("mount").args(["-t", "overlay", "overlay", "-o", &lowerdir]).arg(&mnt).status().unwrap();
    assert!(mounted.success(), "mounting the overlay");
    let merged = describe_fs(&mnt);
    run(Command::new("umount").arg(&mnt));
    assert_eq!(merged, want);
}
