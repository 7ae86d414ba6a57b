//! The FUSE file system over a merged [`crate::tree::Tree`].
//!
//! The image is immutable, so attributes and entries are cached by the kernel for a long time
//! and open files keep their page cache. Metadata answers come straight from the tree on the
//! session thread; file reads run on worker threads, so a slow read never holds up lookups. A
//! read whose bytes are all local goes to a pool of its own: reads waiting on the registry may
//! take every worker of theirs, and local data is still served.
//!
//! The mount is made here with `mount(2)` on our own `/dev/fuse` descriptor, not through
//! fuser's mount helper: fuser unmounts its mount point *by path* when its session ends, which
//! after a handoff would take down the overlay now at that path. The session ends when the
//! kernel drops the connection: after the FUSE mount was detached and the last file opened
//! through it was closed.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::ops::Bound;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::consts::{FOPEN_KEEP_CACHE, FUSE_CACHE_SYMLINKS, FUSE_DO_READDIRPLUS, FUSE_PARALLEL_DIROPS};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, Session, SessionACL,
};

use crate::layer::{BlobSource, LayerIndex};
use crate::tree::{Ino, Node, NodeKind, Tree};

/// How long the kernel may cache attributes and entries: the image never changes.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Threads serving reads that may wait on the registry.
const FETCH_WORKERS: usize = 8;
/// Threads serving reads of local data (they only inflate and copy).
const LOCAL_WORKERS: usize = 4;
const BLOCK_SIZE: u32 = 4096;

/// One layer as the file system reads it: its index and its blob's bytes.
pub struct LayerData {
    pub index: Arc<LayerIndex>,
    pub source: Arc<dyn BlobSource>,
}

/// Counters for metrics and tests, and when the file system was last read (so background work
/// can keep out of the way of a starting container).
#[derive(Default, Debug)]
pub struct FsStats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub read_errors: AtomicU64,
    /// Directory entries readdir has stepped over, sent or skipped: what listing costs.
    pub dir_entries_walked: AtomicU64,
    /// When the last read arrived (at first: when the file system was made), in nanoseconds
    /// since [`FsStats::clock`]'s start.
    last_read_ns: AtomicU64,
}

impl FsStats {
    /// Counters at zero; the file system counts as just read, so background work waits for a
    /// first quiet moment after the mount too.
    pub fn new() -> FsStats {
        FsStats { last_read_ns: AtomicU64::new(Self::clock()), ..FsStats::default() }
    }

    /// Nanoseconds on a process-wide monotonic clock, never 0.
    fn clock() -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64 + 1
    }

    /// Notes that a read arrived now.
    pub fn read_arrived(&self) {
        self.last_read_ns.store(Self::clock(), Relaxed);
    }

    /// How long no read has arrived.
    pub fn idle_for(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(Self::clock().saturating_sub(self.last_read_ns.load(Relaxed)))
    }
}

/// What the session thread and the read workers share.
struct Shared {
    tree: Tree,
    layers: Vec<LayerData>,
    stats: Arc<FsStats>,
    /// Blocks of all files, for statfs (the tree never changes).
    blocks: u64,
    /// Failed reads are logged at most this often: during a registry outage every read fails.
    error_log: RateLimit,
}

/// How often failed reads are logged.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one event through per interval and counts the others.
struct RateLimit {
    interval: Duration,
    /// When the last event was let through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    fn new(interval: Duration) -> RateLimit {
        RateLimit { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(events held back since the last one let through)` if an event at `now` goes
    /// through.
    fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = plumbing::lock(&self.state);
        if state.0.is_some_and(|last| now.saturating_duration_since(last) < self.interval) {
            state.1 += 1;
            return None;
        }
        state.0 = Some(now);
        Some(std::mem::take(&mut state.1))
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run jobs from one queue.
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(name: &str, threads: usize) -> io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let worker = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
                // A poisoned lock only means another worker panicked while holding it; the
                // receiver is still sound.
                let job = plumbing::lock(&rx).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            })?;
            workers.push(worker);
        }
        Ok(Pool { jobs: Some(tx), workers })
    }

    fn run(&self, job: Job) {
        if let Some(Err(mpsc::SendError(job))) = self.jobs.as_ref().map(|jobs| jobs.send(job)) {
            // Every worker is gone (they only stop when dropped); run it here rather than drop it.
            job();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// The read-only image file system.
pub struct ImageFs {
    shared: Arc<Shared>,
    /// Reads that may wait on the registry.
    fetch: Pool,
    /// Reads of local data.
    local: Pool,
    /// Open directory handles (one per opendir until its releasedir) and where each listing got.
    dirs: HashMap<u64, DirCursor>,
    next_fh: u64,
}

/// Where the listing of an open directory got to, so the next readdir goes on from the last
/// name returned instead of walking the directory from its start to the offset (which made
/// listing a directory of n entries cost n² / entries per reply).
struct DirCursor {
    ino: Ino,
    /// The offset the kernel passes to continue after `last`.
    offset: i64,
    /// The last child returned, if the listing got past `.` and `..`.
    last: Option<OsString>,
}

impl ImageFs {
    /// `tree` was built from `layers` (the tree's `File { layer, .. }` indexes this slice).
    pub fn new(tree: Tree, layers: Vec<LayerData>, stats: Arc<FsStats>) -> io::Result<ImageFs> {
        let bytes: u64 = (1..=tree.len() as u64).filter_map(|ino| tree.node(ino)).map(|n| n.size).sum();
        let blocks = bytes.div_ceil(u64::from(BLOCK_SIZE));
        let error_log = RateLimit::new(ERROR_LOG_INTERVAL);
        Ok(ImageFs {
            shared: Arc::new(Shared { tree, layers, stats, blocks, error_log }),
            fetch: Pool::new("image-read", FETCH_WORKERS)?,
            local: Pool::new("image-read-local", LOCAL_WORKERS)?,
            dirs: HashMap::new(),
            next_fh: 1,
        })
    }

    fn node(&self, ino: u64) -> Result<&Node, i32> {
        self.shared.tree.node(ino).ok_or(libc::ENOENT)
    }

    fn attr(&self, ino: Ino) -> Result<FileAttr, i32> {
        Ok(attr_of(ino, self.node(ino)?))
    }
}

fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Dir { .. } => FileType::Directory,
        NodeKind::File { .. } => FileType::RegularFile,
        NodeKind::Symlink(_) => FileType::Symlink,
        NodeKind::CharDev { .. } => FileType::CharDevice,
        NodeKind::BlockDev { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn attr_of(ino: Ino, node: &Node) -> FileAttr {
    let mtime = if node.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(node.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(node.mtime.unsigned_abs())
    };
    let rdev = match node.kind {
        NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => libc::makedev(major, minor) as u32,
        _ => 0,
    };
    FileAttr {
        ino,
        size: node.size,
        blocks: node.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(&node.kind),
        perm: (node.mode & 0o7777) as u16,
        nlink: node.nlink.max(1),
        uid: node.uid,
        gid: node.gid,
        rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Each capability is optional: an older kernel just goes without it.
        for cap in [FUSE_PARALLEL_DIROPS, FUSE_CACHE_SYMLINKS, FUSE_DO_READDIRPLUS] {
            let _ = config.add_capabilities(cap);
        }
        // Many reads in flight at once: they are served in parallel by the workers.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.node(parent).map(|n| &n.kind) {
            Ok(NodeKind::Dir { .. }) => {}
            Ok(_) => return reply.error(libc::ENOTDIR),
            Err(e) => return reply.error(e),
        }
        match self.shared.tree.lookup(parent, name).map(|ino| self.attr(ino)) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, 0),
            Some(Err(e)) => reply.error(e),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.node(ino).map(|n| &n.kind) {
            Ok(NodeKind::Symlink(target)) => reply.data(target.as_os_str().as_bytes()),
            Ok(_) => reply.error(libc::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return reply.error(libc::EROFS);
        }
        match self.node(ino).map(|n| &n.kind) {
            // The contents never change: let the kernel keep its page cache across opens.
            Ok(NodeKind::File { .. }) => reply.opened(0, FOPEN_KEEP_CACHE),
            Ok(NodeKind::Dir { .. }) => reply.error(libc::EISDIR),
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        self.shared.stats.read_arrived();
        let shared = Arc::clone(&self.shared);
        let job: Job = Box::new(move || match read_file(&shared, ino, offset, size) {
            Ok(data) => {
                shared.stats.reads.fetch_add(1, Relaxed);
                shared.stats.bytes_read.fetch_add(data.len() as u64, Relaxed);
                reply.data(&data)
            }
            Err(e) => {
                shared.stats.read_errors.fetch_add(1, Relaxed);
                reply.error(e)
            }
        });
        if self.shared.is_local(ino, offset, size) {
            self.local.run(job);
        } else {
            self.fetch.run(job);
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.node(ino).map(|n| &n.kind) {
            Ok(NodeKind::Dir { .. }) => {
                let fh = self.next_fh;
                self.next_fh += 1;
                self.dirs.insert(fh, DirCursor { ino, offset: 0, last: None });
                reply.opened(fh, 0)
            }
            Ok(_) => reply.error(libc::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _flags: i32, reply: ReplyEmpty) {
        self.dirs.remove(&fh);
        reply.ok()
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let shared = Arc::clone(&self.shared);
        let listed = self.list(ino, fh, offset, |child, next, name| {
            let kind = shared.tree.node(child).map(|n| file_type(&n.kind)).unwrap_or(FileType::RegularFile);
            reply.add(child, next, kind, name)
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(&mut self, _req: &Request<'_>, ino: u64, fh: u64, offset: i64, mut reply: ReplyDirectoryPlus) {
        let shared = Arc::clone(&self.shared);
        let listed = self.list(ino, fh, offset, |child, next, name| match shared.tree.node(child) {
            Some(node) => reply.add(child, next, name, &TTL, &attr_of(child, node), 0),
            None => false,
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let files = self.shared.tree.len() as u64;
        reply.statfs(self.shared.blocks, 0, 0, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE)
    }

    fn getxattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let Some((_, value)) = node.xattrs.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) else {
            return reply.error(libc::ENODATA);
        };
        xattr_reply(value, size, reply)
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (name, _) in &node.xattrs {
            names.extend_from_slice(name);
            names.push(0);
        }
        xattr_reply(&names, size, reply)
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); only writes are refused.
        match self.node(ino) {
            Ok(_) if mask & libc::W_OK != 0 => reply.error(libc::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(libc::EROFS)
    }

    fn removexattr(&mut self, _req: &Request<'_>, _ino: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(libc::EROFS)
    }
}

impl ImageFs {
    /// Lists directory `ino` from `offset` for handle `fh`: `.`, `..`, then the children in name
    /// order, the entry at position i (from 0) with offset i + 1. Each entry (its inode, its
    /// offset, its name) goes to `add` until `add` says the reply is full. A listing that goes
    /// on where the handle's last one ended starts at the name after the last one returned;
    /// any other offset (a seekdir) walks from the start.
    fn list(
        &mut self,
        ino: u64,
        fh: u64,
        offset: i64,
        mut add: impl FnMut(Ino, i64, &OsStr) -> bool,
    ) -> Result<(), i32> {
        let shared = Arc::clone(&self.shared);
        let NodeKind::Dir { parent, children } = &shared.tree.node(ino).ok_or(libc::ENOENT)?.kind else {
            return Err(libc::ENOTDIR);
        };
        let mut at = offset.max(0);
        let resume = match self.dirs.get(&fh) {
            Some(c) if c.ino == ino && c.offset == at && at > 2 => c.last.clone(),
            _ => None,
        };
        let mut last: Option<&OsString> = None;
        'fill: {
            for (entry, name) in [(ino, "."), (*parent, "..")].into_iter().skip(at.min(2) as usize) {
                if add(entry, at + 1, OsStr::new(name)) {
                    break 'fill;
                }
                at += 1;
            }
            let rest: Box<dyn Iterator<Item = (&OsString, &Ino)>> = match &resume {
                Some(after) => {
                    Box::new(children.range::<OsStr, _>((Bound::Excluded(after.as_os_str()), Bound::Unbounded)))
                }
                None => {
                    let skipped = (at - 2).max(0) as usize;
                    shared.stats.dir_entries_walked.fetch_add(skipped as u64, Relaxed);
                    Box::new(children.iter().skip(skipped))
                }
            };
            for (name, child) in rest {
                shared.stats.dir_entries_walked.fetch_add(1, Relaxed);
                if add(*child, at + 1, name) {
                    break;
                }
                at += 1;
                last = Some(name);
            }
        }
        if let Some(cursor) = self.dirs.get_mut(&fh) {
            let last = last.cloned().or(resume);
            *cursor = DirCursor { ino, offset: at, last: if at > 2 { last } else { None } };
        }
        Ok(())
    }
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(libc::ERANGE)
    } else {
        reply.data(value)
    }
}

impl Shared {
    /// Whether reading `size` bytes of `ino` at `offset` takes only local blob bytes.
    fn is_local(&self, ino: u64, offset: u64, size: u32) -> bool {
        let Some(NodeKind::File { layer, data }) = self.tree.node(ino).map(|n| &n.kind) else { return true };
        let Some(layer) = self.layers.get(*layer) else { return true };
        layer.index.is_local(layer.source.as_ref(), data, offset, u64::from(size))
    }
}

/// Reads up to `size` bytes of file `ino` at `offset` (short only at the end of the file).
fn read_file(shared: &Shared, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
    let node = shared.tree.node(ino).ok_or(libc::ENOENT)?;
    let NodeKind::File { layer, data } = &node.kind else { return Err(libc::EINVAL) };
    if offset >= node.size {
        return Ok(Vec::new());
    }
    let len = (node.size - offset).min(u64::from(size)) as usize;
    let layer_data = shared.layers.get(*layer).ok_or(libc::EIO)?;
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        match layer_data.index.read(layer_data.source.as_ref(), data, offset + done as u64, &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                if let Some(held_back) = shared.error_log.allow(Instant::now()) {
                    let error = crate::error_text::chain(&e);
                    tracing::error!(ino, offset, size, %error, failed_reads_not_logged = held_back, "image read failed");
                }
                return Err(libc::EIO);
            }
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// A mounted image file system, served by a thread until the kernel drops the connection.
pub struct FuseMount {
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl FuseMount {
    /// Mounts `fs` read-only at `target` and serves it on a new thread.
    pub fn mount(fs: ImageFs, target: &Path) -> io::Result<FuseMount> {
        let dev = c"/dev/fuse";
        // SAFETY: a NUL-terminated path; open returns a new descriptor or -1.
        let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let options = format!(
            "fd={fd},rootmode=40755,user_id=0,group_id=0,default_permissions,allow_other",
            fd = std::os::fd::AsRawFd::as_raw_fd(&fd)
        );
        let (target_c, options_c) = (
            CString::new(target.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            CString::new(options).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        );
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let ret = unsafe {
            libc::mount(
                c"vstor-image".as_ptr(),
                target_c.as_ptr(),
                c"fuse.vstor-image".as_ptr(),
                crate::handoff::IMAGE_MOUNT_FLAGS,
                options_c.as_ptr().cast(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut session = Session::from_fd(fs, fd, SessionACL::All);
        let thread = std::thread::Builder::new().name("image-fuse".into()).spawn(move || session.run())?;
        Ok(FuseMount { thread: Some(thread) })
    }

    /// Waits until the kernel drops the connection (the mount is gone and no file opened through
    /// it is still open).
    pub fn join(mut self) -> io::Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the FUSE session thread panicked")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reads_are_logged_once_per_interval_with_a_count_of_the_others() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        for s in 1..6 {
            assert_eq!(limit.allow(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(limit.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(limit.allow(t0 + Duration::from_secs(11)), None);
    }
}
