//! The image cache's process made to die at each fail point between two durable steps (built
//! with the `failpoints` feature): a child process (this test binary, running one test) works
//! on a cache directory with `FAILPOINTS` set and kills itself there; then a new process (the
//! parent) opens the same directory and checks that nothing is left behind, nothing needed is
//! lost, and the step can be done again.

#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;

use fuse_lazypull::cache::{Blob, BlobCache};
use fuse_lazypull::digest::Digest;
use fuse_lazypull::layer::{BlobSource, LayerIndex, Limits};
use fuse_lazypull::mount::unpack_once;
use fuse_lazypull::reference::ImageRef;
use layer_support::{cache, complete_blob, desc, descriptor, gzip, random_bytes, Bytes, Tar, E};

/// Set in the child: the cache directory it works on.
const CHILD: &str = "FUSE_LAZYPULL_FAILPOINT_CHILD";

/// A blob of `n` bytes from `seed`, fetched into `cache` and verified.
fn fetched(cache: &BlobCache, n: usize, seed: u64) -> (Arc<Blob>, Vec<u8>) {
    let data = random_bytes(n, seed);
    let blob = cache.blob_from(&desc(&data), Arc::new(Bytes(data.clone()))).unwrap();
    blob.fetch_all().unwrap();
    (blob, data)
}

fn read_all(blob: &Blob) -> Vec<u8> {
    let mut buf = vec![0; BlobSource::size(blob) as usize];
    blob.read_at(0, &mut buf).unwrap();
    buf
}

fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    out.sort();
    out
}

/// In the child (`CHILD` set): configures the fail points, runs `work` on the cache directory,
/// and fails if it returns (the fail point was not reached). In the parent: runs test `test`
/// in a child with `point` armed, checks that it died there, and returns the directory.
fn child_dies_at(test: &str, point: &str, work: impl FnOnce(&Path)) -> tempfile::TempDir {
    if let Ok(dir) = std::env::var(CHILD) {
        let _failpoints = failpoint::setup();
        work(Path::new(&dir));
        panic!("the child never reached fail point {point}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env(CHILD, dir.path())
        .env("FAILPOINTS", format!("{point}=return"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(9), "the child should die of SIGKILL at {point}: {}\n{stderr}", out.status);
    assert!(stderr.contains(&failpoint::dying_message(point)), "the child did not die at {point}\n{stderr}");
    dir
}

/// Whatever the dead process left in `partial/` and `tmp/` is gone once the cache is opened.
fn assert_no_leftovers(dir: &Path) {
    assert_eq!(names(&dir.join("partial")), Vec::<String>::new(), "partial blobs of a dead process");
    assert_eq!(names(&dir.join("tmp")), Vec::<String>::new(), "temporary files of a dead process");
}

/// The blob is verified and synced under its partial name; not published.
#[test]
fn publish_dies_before_the_rename() {
    let test = "publish_dies_before_the_rename";
    let dir = child_dies_at(test, "cache::publish::synced", |dir| {
        fetched(&cache(dir, u64::MAX), 300_000, 11);
    });
    let c = cache(dir.path(), u64::MAX);
    assert_no_leftovers(dir.path());
    assert_eq!(names(&dir.path().join("blobs/sha256")), Vec::<String>::new(), "nothing was published");
    // Fetched again from nothing, and published this time.
    let (blob, data) = fetched(&c, 300_000, 11);
    assert!(blob.is_complete());
    assert_eq!(read_all(&blob), data);
    assert_eq!(c.usage().unwrap().len(), 1);
}

/// The blob is published; the index does not say so.
#[test]
fn publish_dies_before_the_index_record() {
    let test = "publish_dies_before_the_index_record";
    let dir = child_dies_at(test, "cache::publish::renamed", |dir| {
        fetched(&cache(dir, u64::MAX), 300_000, 12);
    });
    let c = cache(dir.path(), u64::MAX);
    assert_no_leftovers(dir.path());
    let data = random_bytes(300_000, 12);
    // The published blob is found complete, and it is the right one.
    let blob = c.blob_from(&desc(&data), Arc::new(Bytes(Vec::new()))).unwrap();
    assert!(blob.is_complete(), "the published blob is adopted");
    assert_eq!(read_all(&blob), data);
    drop(blob);
    // Content the index never heard of complete is still collected when nothing needs it.
    let limited = cache(dir.path(), 0);
    assert_eq!(limited.gc().unwrap().removed, vec![Digest::of(&data)]);
    assert!(c.usage().unwrap().is_empty());
}

/// gc of a cache over its limit, with one image pinned and one blob unused.
fn gc_dies(dir: &Path) {
    let c = cache(dir, 0);
    let (pinned, _) = fetched(&c, 100_000, 21);
    let image: ImageRef = "127.0.0.1:1/app:1".parse().unwrap();
    c.pin(&image, &[pinned.digest().clone()]).unwrap();
    let (unused, _) = fetched(&c, 200_000, 22);
    c.put_derived(unused.digest(), "layer-index", b"index of the unused blob").unwrap();
    drop((pinned, unused));
    c.gc().unwrap();
}

/// After a gc that died: the pinned blob is intact, the unused one gone (its removal was
/// decided), nothing is left in tmp/, and the cache works on.
fn check_after_gc(dir: &Path) {
    let c = cache(dir, 0);
    assert_no_leftovers(dir);
    let (pinned, unused) = (random_bytes(100_000, 21), random_bytes(200_000, 22));
    let usage = c.usage().unwrap();
    assert_eq!(usage.keys().collect::<Vec<_>>(), [&Digest::of(&pinned)], "only the pinned blob is left");
    let blob = c.blob_from(&desc(&pinned), Arc::new(Bytes(Vec::new()))).unwrap();
    assert!(blob.is_complete());
    assert_eq!(read_all(&blob), pinned);
    drop(blob);
    assert_eq!(c.get_derived(&Digest::of(&unused), "layer-index").unwrap(), None);
    assert!(c.gc().unwrap().removed.is_empty(), "the pinned blob stays");
    assert_eq!(c.images().unwrap(), ["127.0.0.1:1/app:1"]);
    // The removed blob is fetched again when it is needed.
    let (again, data) = fetched(&cache(dir, u64::MAX), 200_000, 22);
    assert_eq!(read_all(&again), data);
}

#[test]
fn gc_dies_after_moving_content_aside() {
    let dir = child_dies_at("gc_dies_after_moving_content_aside", "cache::gc::moved-aside", gc_dies);
    check_after_gc(dir.path());
}

#[test]
fn gc_dies_after_the_index_commit() {
    let dir = child_dies_at("gc_dies_after_the_index_commit", "cache::gc::committed", gc_dies);
    check_after_gc(dir.path());
}

/// Derived data written under tmp/, not renamed to its name.
#[test]
fn derived_data_dies_before_the_rename() {
    let digest = Digest::of(b"some blob");
    let dir = child_dies_at("derived_data_dies_before_the_rename", "cache::derived::written", |dir| {
        cache(dir, u64::MAX).put_derived(&Digest::of(b"some blob"), "layer-index", b"half a story").unwrap();
    });
    let c = cache(dir.path(), u64::MAX);
    assert_no_leftovers(dir.path());
    assert_eq!(c.get_derived(&digest, "layer-index").unwrap(), None);
    c.put_derived(&digest, "layer-index", b"the whole story").unwrap();
    assert_eq!(c.get_derived(&digest, "layer-index").unwrap().as_deref(), Some(&b"the whole story"[..]));
}

/// A layer with two files, gzipped.
fn layer() -> Vec<u8> {
    let mut tar = Tar::default();
    tar.add(E::dir("etc/")).add(E::file("etc/motd", b"hello from the layer\n")).add(E::file("big", &[9u8; 70_000]));
    gzip(&tar.finish())
}

fn unpack(c: &BlobCache) -> std::path::PathBuf {
    let bytes = layer();
    let blob = complete_blob(c, &bytes);
    let index = LayerIndex::build(&descriptor(&bytes, &[]), &*blob, &Limits::DEFAULT).unwrap();
    unpack_once(c, blob.digest(), &blob, &index, &[], &Limits::DEFAULT).unwrap()
}

/// A layer unpacked under tmp/, not renamed to its place.
#[test]
fn unpack_dies_before_the_rename() {
    let dir = child_dies_at("unpack_dies_before_the_rename", "cache::unpack::unpacked", |dir| {
        unpack(&cache(dir, u64::MAX));
    });
    let c = cache(dir.path(), u64::MAX);
    assert_no_leftovers(dir.path());
    assert_eq!(names(&dir.path().join("unpacked")), Vec::<String>::new(), "no half-unpacked layer in place");
    let at = unpack(&c);
    assert_eq!(std::fs::read(at.join("etc/motd")).unwrap(), b"hello from the layer\n");
    assert_eq!(std::fs::read(at.join("big")).unwrap(), vec![9u8; 70_000]);
}
