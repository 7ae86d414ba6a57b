//! Reads through the FUSE file system while the registry stalls: reads of local data are
//! served even when every worker for reads of missing data is waiting on the registry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test reports by panicking

mod layer_support;

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuse_lazypull::cache::{BlobCache, CacheConfig, RangeSource};
use fuse_lazypull::fs::{FsStats, FuseMount, ImageFs, LayerData};
use fuse_lazypull::layer::{convert_to_estargz, BlobSource, EntryKind, LayerIndex, Limits, TOC_DIGEST_ANNOTATION};
use fuse_lazypull::registry::RegistryError;
use fuse_lazypull::tree::Tree;
use layer_support::{descriptor, gzip, random_bytes, MemSource, Tar, E};

/// A registry that can stall, counting the fetches it holds.
struct Stalling {
    data: Vec<u8>,
    stalled: Mutex<bool>,
    changed: Condvar,
    waiting: AtomicU32,
}

impl RangeSource for Stalling {
    fn fetch(&self, range: Range<u64>) -> Result<Vec<u8>, RegistryError> {
        let mut stalled = self.stalled.lock().unwrap();
        if *stalled {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_all();
            while *stalled {
                stalled = self.changed.wait(stalled).unwrap();
            }
        }
        Ok(self.data[range.start as usize..range.end as usize].to_vec())
    }
}

/// Reads the first page of `path` without readahead, so the kernel sends one FUSE read.
fn first_page(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    // SAFETY: the descriptor is open for the call.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut page = vec![0u8; 4096];
    let n = file.read_at(&mut page, 0)?;
    page.truncate(n);
    Ok(page)
}

#[test]
fn a_read_of_local_data_is_served_while_eight_reads_wait_on_the_registry_needs_root_fuse() {
    // An eStargz layer: each file its own gzip member; unread "gap" files between the files
    // read, so no two of those share a 64 KiB chunk of the cache.
    let files: Vec<(String, Vec<u8>)> = (0..9u64)
        .flat_map(|i| {
            [(format!("f{i}"), random_bytes(200_000, 2 * i + 1)), (format!("gap{i}"), random_bytes(200_000, 2 * i + 2))]
        })
        .collect();
    let mut tar = Tar::default();
    for (name, data) in &files {
        tar.add(E::file(name, data));
    }
    let mut blob = Vec::new();
    let converted = convert_to_estargz(&mut &gzip(&tar.finish())[..], &mut blob, &[], &Limits::DEFAULT).unwrap();
    let desc = descriptor(&blob, &[(TOC_DIGEST_ANNOTATION, converted.toc_digest.as_str())]);
    let index = Arc::new(LayerIndex::build(&desc, &MemSource::new(blob.clone()), &Limits::DEFAULT).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig { fetch_timeout: Duration::from_secs(20), ..CacheConfig::default() };
    let cache = BlobCache::open(&dir.path().join("cache"), config).unwrap();
    let registry = Arc::new(Stalling {
        data: blob.clone(),
        stalled: Mutex::new(false),
        changed: Condvar::new(),
        waiting: AtomicU32::new(0),
    });
    let source = cache.blob_from(&desc, Arc::clone(&registry) as Arc<dyn RangeSource>).unwrap();
    // f0 is local: read once before the registry stalls.
    let f0 = index.entries.iter().find(|e| e.path == Path::new("f0")).unwrap();
    let EntryKind::File(data) = &f0.kind else { panic!("f0 is a file") };
    let mut buf = vec![0u8; 4096];
    index.read(&*source, data, 0, &mut buf).unwrap();
    *registry.stalled.lock().unwrap() = true;

    let tree = Tree::build(&[(*index).clone()]).unwrap();
    let layers = vec![LayerData { index, source: Arc::clone(&source) as Arc<dyn BlobSource> }];
    let stats = Arc::new(FsStats::new());
    let fs = ImageFs::new(tree, layers, Arc::clone(&stats)).unwrap();
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let fuse = FuseMount::mount(fs, &target).unwrap();
    // Detached however the test ends, so a failure leaves no dead mount behind.
    struct Detach<'a>(&'a Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = fuse_lazypull::handoff::detach(self.0);
        }
    }
    let detach = Detach(&target);

    let finished = AtomicU32::new(0);
    std::thread::scope(|s| {
        for i in 1..=8 {
            let (target, finished) = (&target, &finished);
            s.spawn(move || {
                let page = first_page(&target.join(format!("f{i}")));
                finished.fetch_add(1, Ordering::SeqCst);
                page
            });
        }
        // Every worker for reads of missing data now waits on the registry.
        let mut stalled = registry.stalled.lock().unwrap();
        while registry.waiting.load(Ordering::SeqCst) < 8 {
            stalled = registry.changed.wait(stalled).unwrap();
        }
        drop(stalled);

        let local = first_page(&target.join("f0")).unwrap();
        assert_eq!(local, files[0].1[..4096], "the local read is served");
        // A worker freed by a stalled read that timed out would have counted its error first.
        assert_eq!(stats.read_errors.load(Ordering::SeqCst), 0, "while all eight reads still wait on the registry");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        *registry.stalled.lock().unwrap() = false;
        registry.changed.notify_all();
    });
    assert_eq!(first_page(&target.join("f8")).unwrap(), files[16].1[..4096]);
    // statfs: 18 files and the root; 18 files of 200 000 bytes.
    let path = std::ffi::CString::new(target.to_str().unwrap()).unwrap();
    // SAFETY: `st` is plain data statvfs fills; `path` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    assert_eq!((st.f_files, st.f_blocks), (19, (18u64 * 200_000).div_ceil(4096)));
    drop(detach);
    fuse.join().unwrap();
}

/// A directory of 300 000 entries is listed through the mount. Each readdir used to rebuild the
/// whole listing and skip to its offset, so a listing cost n² / (entries per reply): about a
/// minute and a half for this directory in a debug build (83 s measured). With a cursor per open
/// directory each reply goes on where the last ended (under 2 s). The bound below is far from
/// both. A seekdir back still lists from there.
#[test]
fn a_directory_of_300000_entries_is_listed_in_one_pass_needs_root_fuse() {
    const N: usize = 300_000;
    let entries: Vec<String> = (0..N)
        .map(|i| {
            format!(r#"{{"path":"d/f{i:06}","kind":"Fifo","mode":420,"uid":0,"gid":0,"mtime":0,"size":0,"xattrs":[]}}"#)
        })
        .collect();
    let json = format!(
        r#"{{"entries":[{{"path":"d","kind":"Dir","mode":493,"uid":0,"gid":0,"mtime":0,"size":0,"xattrs":[]}},{}],"format":{{"Tar":{{"size":0,"spans":["{}"]}}}}}}"#,
        entries.join(","),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let index = Arc::new(LayerIndex::from_bytes(json.as_bytes()).unwrap());
    let tree = Tree::build(&[(*index).clone()]).unwrap();
    let layers = vec![LayerData { index, source: Arc::new(MemSource::new(Vec::new())) as Arc<dyn BlobSource> }];
    let stats = Arc::new(FsStats::new());
    let fs = ImageFs::new(tree, layers, stats.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let fuse = FuseMount::mount(fs, &target).unwrap();
    struct Detach<'a>(&'a Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = fuse_lazypull::handoff::detach(self.0);
        }
    }
    let detach = Detach(&target);

    let mut names: Vec<String> =
        std::fs::read_dir(target.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let walked = stats.dir_entries_walked.load(std::sync::atomic::Ordering::Relaxed);
    names.sort();
    assert_eq!(names.len(), N);
    assert!(names.iter().enumerate().all(|(i, n)| *n == format!("f{i:06}")));
    // A second listing through another handle.
    assert_eq!(std::fs::read_dir(target.join("d")).unwrap().count(), N);
    assert_eq!(names_after_seeking_back(&target.join("d")), (names[999].clone(), names[1000].clone()));
    // One pass: each entry stepped over once, plus the one per reply that did not fit (a listing
    // from the start per reply would step over about N * N / 2 / (entries per reply), some 10^8
    // here).
    assert!((N as u64..2 * N as u64).contains(&walked), "{walked} entries stepped over to list {N}");
    drop(detach);
    fuse.join().unwrap();
}

/// Through libc's directory stream: reads 1002 entries (`.`, `..`, then children), notes the
/// position, reads 5000 more, seeks back; gives the last name before the position and the first
/// after it once seeked back.
fn names_after_seeking_back(dir: &Path) -> (String, String) {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the stream is closed below.
    let stream = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!stream.is_null());
    let next = || {
        // SAFETY: `stream` is open; the entry is read before the next call.
        let entry = unsafe { libc::readdir(stream) };
        assert!(!entry.is_null());
        // SAFETY: readdir gives a NUL-terminated name in the entry.
        unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }.to_string_lossy().into_owned()
    };
    let mut before = String::new();
    for _ in 0..1002 {
        before = next();
    }
    // SAFETY: `stream` is open.
    let at = unsafe { libc::telldir(stream) };
    for _ in 0..5000 {
        next();
    }
    // SAFETY: `stream` is open and `at` came from telldir on it.
    unsafe { libc::seekdir(stream, at) };
    let after = next();
    // SAFETY: `stream` is open and closed once.
    unsafe { libc::closedir(stream) };
    (before, after)
}
