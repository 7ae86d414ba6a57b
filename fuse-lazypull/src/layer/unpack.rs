//! Unpacking a complete, verified layer blob into an overlayfs lower directory.
//!
//! Nothing is created by path: every parent directory is opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and entries are made with the `*at` calls relative to
//! it, so a symlink in the layer (or one planted by an earlier entry) can never redirect a write
//! outside `dest`. Whiteouts become 0/0 character devices and opaque directories get
//! `trusted.overlay.opaque=y`, as overlayfs expects. Every entry must match the layer index the
//! FUSE tree was built from, or the handoff would change the view. Directory times are set last,
//! after their contents. Extended attributes are set on files and directories (Linux allows
//! `user.*` only on those); those overlayfs interprets never come from the image
//! ([`super::keeps_xattr`]).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::gzip::Inflate;
use super::tar::TarReader;
use super::{estargz, EntriesBuilder, EntryKind, LayerError, LayerIndex, Limits};

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

fn cstr(name: &OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` (relative; empty is the root itself) beneath `root` without following any
/// symlink.
fn open_beneath(root: &OwnedFd, path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let p = if path.as_os_str().is_empty() { cstr(OsStr::new("."))? } else { cstr(path.as_os_str())? };
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `p` is a NUL-terminated string and `how` a valid open_how, both alive for the call;
    // the size passed is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

struct Unpacker {
    root: OwnedFd,
    dest: PathBuf,
    /// The unpacked layers below this one, top first, for hard links to their files.
    lowers: Vec<OwnedFd>,
    /// Directories whose times are set at the end, with the entry's metadata.
    dirs: Vec<(PathBuf, i64)>,
}

impl Unpacker {
    fn err(&self, path: &Path) -> impl Fn(std::io::Error) -> LayerError {
        let path = self.dest.join(path);
        move |source| LayerError::Unpack { path: path.clone(), source }
    }

    /// The parent directory of `path`, created (0755, root-owned) if missing.
    fn parent(&self, path: &Path) -> std::io::Result<OwnedFd> {
        let parent = path.parent().unwrap_or(Path::new(""));
        match open_beneath(&self.root, parent, libc::O_PATH | libc::O_DIRECTORY) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut at = PathBuf::new();
                for c in parent.components() {
                    let dir = open_beneath(&self.root, &at, libc::O_PATH | libc::O_DIRECTORY)?;
                    let name = cstr(c.as_os_str())?;
                    // SAFETY: `dir` is an open directory descriptor and `name` a NUL-terminated
                    // single path component.
                    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
                    if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                        return Err(std::io::Error::last_os_error());
                    }
                    at.push(c);
                }
                open_beneath(&self.root, parent, libc::O_PATH | libc::O_DIRECTORY)
            }
            other => other,
        }
    }

    /// The file a hard link to `target` means when this layer does not hold it: the topmost
    /// lower layer's, unless a whiteout or an opaque directory above hides it. `None` when no
    /// lower layer shows a regular file there.
    fn find_lower(&self, target: &Path) -> std::io::Result<Option<OwnedFd>> {
        for lower in &self.lowers {
            // O_PATH first: a device node or FIFO there must not be opened for real.
            match open_beneath(lower, target, libc::O_PATH) {
                Ok(fd) => {
                    // SAFETY: `st` is plain data filled by fstat on an open descriptor.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    // SAFETY: as above.
                    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                        return Ok(None);
                    }
                    return open_beneath(lower, target, libc::O_RDONLY).map(Some);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                // A symlink on the way (ELOOP), or a path through a non-directory: not a file.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV)) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
            // Not here: an opaque directory on the way hides every layer further down.
            let mut at = PathBuf::new();
            for c in target.parent().unwrap_or(Path::new("")).components() {
                at.push(c);
                match open_beneath(lower, &at, libc::O_RDONLY | libc::O_DIRECTORY) {
                    Ok(dir) if get_xattr(&dir, b"trusted.overlay.opaque")?.as_deref() == Some(b"y") => return Ok(None),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        Ok(None)
    }

    /// Removes whatever is at `path` unless it is a directory and `keep_dir`.
    fn clear(&self, parent: &OwnedFd, path: &Path, keep_dir: bool) -> std::io::Result<()> {
        let name = cstr(path.file_name().unwrap_or_default())?;
        // SAFETY: `st` is plain data filled by fstatat; `name` is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; AT_SYMLINK_NOFOLLOW so a symlink is looked at, not followed.
        let rc = unsafe { libc::fstatat(parent.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(()) } else { Err(e) };
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if keep_dir {
                return Ok(());
            }
            // `path` was reached without symlinks, and remove_dir_all does not follow them.
            return std::fs::remove_dir_all(self.dest.join(path));
        }
        // SAFETY: `parent` is an open directory and `name` a NUL-terminated component.
        check(unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) })
    }

    fn apply(&mut self, e: &super::Entry, tar: &mut TarReader<impl std::io::Read>) -> Result<(), LayerError> {
        let path = e.path.clone();
        let err = self.err(&path);
        if path.as_os_str().is_empty() {
            // The root directory's own attributes.
            let fd = open_beneath(&self.root, &path, libc::O_RDONLY | libc::O_DIRECTORY).map_err(&err)?;
            if let EntryKind::Opaque = e.kind {
                set_xattr(&fd, b"trusted.overlay.opaque", b"y").map_err(&err)?;
            } else {
                set_attrs(&fd, e).map_err(&err)?;
                self.dirs.push((path, e.mtime));
            }
            return Ok(());
        }
        let parent = self.parent(&path).map_err(&err)?;
        let name = cstr(path.file_name().unwrap_or_default()).map_err(&err)?;
        let pfd = parent.as_raw_fd();
        let keep_dir = matches!(e.kind, EntryKind::Dir | EntryKind::Opaque);
        self.clear(&parent, &path, keep_dir).map_err(&err)?;
        match &e.kind {
            EntryKind::File(_) => {
                // SAFETY: `pfd` is an open directory, `name` a NUL-terminated component; O_EXCL
                // and O_NOFOLLOW make sure a new file is created, never an existing one opened.
                let fd = unsafe {
                    libc::openat(
                        pfd,
                        name.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd < 0 {
                    return Err(err(std::io::Error::last_os_error()));
                }
                // SAFETY: openat returned a new descriptor that nothing else owns.
                let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                tar.copy_data(e.size, &mut file)?;
                file.flush().map_err(&err)?;
                let fd = OwnedFd::from(file);
                set_attrs(&fd, e).map_err(&err)?;
                set_times(pfd, &name, e.mtime).map_err(&err)?;
            }
            EntryKind::Dir | EntryKind::Opaque => {
                // SAFETY: `pfd` is an open directory, `name` a NUL-terminated component.
                let rc = unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) };
                if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                    return Err(err(std::io::Error::last_os_error()));
                }
                let fd = open_beneath(&self.root, &path, libc::O_RDONLY | libc::O_DIRECTORY).map_err(&err)?;
                if let EntryKind::Opaque = e.kind {
                    set_xattr(&fd, b"trusted.overlay.opaque", b"y").map_err(&err)?;
                } else {
                    set_attrs(&fd, e).map_err(&err)?;
                    self.dirs.push((path, e.mtime));
                }
            }
            EntryKind::Symlink(target) => {
                let t = cstr(target.as_os_str()).map_err(&err)?;
                // SAFETY: both strings are NUL-terminated; `pfd` is an open directory.
                check(unsafe { libc::symlinkat(t.as_ptr(), pfd, name.as_ptr()) }).map_err(&err)?;
                chown_at(pfd, &name, e).map_err(&err)?;
                set_times(pfd, &name, e.mtime).map_err(&err)?;
            }
            EntryKind::HardLink(target) => {
                let tparent = self.parent(target).map_err(self.err(target))?;
                let tname = cstr(target.file_name().unwrap_or_default()).map_err(&err)?;
                // SAFETY: both directories are open, both names NUL-terminated components; flags
                // 0 means a symlink target is linked itself, never followed.
                let rc = unsafe { libc::linkat(tparent.as_raw_fd(), tname.as_ptr(), pfd, name.as_ptr(), 0) };
                if rc < 0 {
                    let source = std::io::Error::last_os_error();
                    if source.raw_os_error() != Some(libc::ENOENT) {
                        return Err(err(source));
                    }
                    // A link to a file of a lower layer: an overlayfs layer cannot share an inode
                    // with another, so it gets a copy (as a copy-up would make it).
                    let Some(from) = self.find_lower(target).map_err(&err)? else {
                        return Err(LayerError::Malicious {
                            path: path.display().to_string(),
                            why: format!(
                                "hard link to {}, which is in neither this layer nor a lower one",
                                target.display()
                            ),
                        });
                    };
                    copy_file(&from, pfd, &name).map_err(&err)?;
                }
            }
            EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => {
                let kind = if matches!(e.kind, EntryKind::CharDev { .. }) { libc::S_IFCHR } else { libc::S_IFBLK };
                mknod(pfd, &name, kind | (e.mode & 0o7777), libc::makedev(*major, *minor)).map_err(&err)?;
                chown_at(pfd, &name, e).map_err(&err)?;
                chmod_at(pfd, &name, e.mode).map_err(&err)?;
                set_times(pfd, &name, e.mtime).map_err(&err)?;
            }
            EntryKind::Fifo => {
                mknod(pfd, &name, libc::S_IFIFO | (e.mode & 0o7777), 0).map_err(&err)?;
                chown_at(pfd, &name, e).map_err(&err)?;
                chmod_at(pfd, &name, e.mode).map_err(&err)?;
                set_times(pfd, &name, e.mtime).map_err(&err)?;
            }
            EntryKind::Whiteout => {
                mknod(pfd, &name, libc::S_IFCHR, libc::makedev(0, 0)).map_err(&err)?;
            }
        }
        Ok(())
    }
}

fn mknod(dir: i32, name: &CString, mode: u32, dev: libc::dev_t) -> std::io::Result<()> {
    // SAFETY: `dir` is an open directory and `name` a NUL-terminated component.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, dev) })
}

fn chown_at(dir: i32, name: &CString, e: &super::Entry) -> std::io::Result<()> {
    // SAFETY: as in `mknod`; AT_SYMLINK_NOFOLLOW changes a symlink itself.
    check(unsafe { libc::fchownat(dir, name.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW) })
}

fn chmod_at(dir: i32, name: &CString, mode: u32) -> std::io::Result<()> {
    // SAFETY: as in `mknod`; the name was just created as a non-symlink by us.
    check(unsafe { libc::fchmodat(dir, name.as_ptr(), mode & 0o7777, 0) })
}

fn set_times(dir: i32, name: &CString, mtime: i64) -> std::io::Result<()> {
    let t = libc::timespec { tv_sec: mtime as libc::time_t, tv_nsec: 0 };
    let times = [t, t];
    // SAFETY: `times` holds two timespecs; AT_SYMLINK_NOFOLLOW never follows a symlink.
    check(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// The value of extended attribute `name` of an open file, `None` if it has none.
fn get_xattr(fd: &OwnedFd, name: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let n = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: `fd` is open, `n` NUL-terminated, `buf` writable for its length.
    let len = unsafe { libc::fgetxattr(fd.as_raw_fd(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = std::io::Error::last_os_error();
        return if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) { Ok(None) } else { Err(e) };
    }
    buf.truncate(len as usize);
    Ok(Some(buf))
}

/// Copies the open regular file `from` (data, owner, mode, extended attributes, mtime) to a
/// new file `name` in directory `dir`.
fn copy_file(from: &OwnedFd, dir: i32, name: &CString) -> std::io::Result<()> {
    // SAFETY: `st` is plain data filled by fstat on an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::fstat(from.as_raw_fd(), &mut st) })?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `dir` is an open directory and `name` a NUL-terminated component.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let to = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut src = File::from(from.try_clone()?);
    let mut dst = File::from(to.try_clone()?);
    std::io::copy(&mut src, &mut dst)?;
    // SAFETY: `to` is open.
    check(unsafe { libc::fchown(to.as_raw_fd(), st.st_uid, st.st_gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::fchmod(to.as_raw_fd(), st.st_mode & 0o7777) })?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `from` is open and `names` writable for its length.
    let len = unsafe { libc::flistxattr(from.as_raw_fd(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    for xname in names[..len as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if let Some(value) = get_xattr(from, xname)? {
            set_xattr(&to, xname, &value)?;
        }
    }
    let t = libc::timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec };
    // SAFETY: `to` is open and the array holds two timespecs.
    check(unsafe { libc::futimens(to.as_raw_fd(), [t, t].as_ptr()) })
}

fn set_xattr(fd: &OwnedFd, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fd` is open, `n` NUL-terminated, `value` valid for its length.
    check(unsafe { libc::fsetxattr(fd.as_raw_fd(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Owner, then mode (chown clears setuid bits), then xattrs, of an open file or directory.
fn set_attrs(fd: &OwnedFd, e: &super::Entry) -> std::io::Result<()> {
    // SAFETY: `fd` is an open descriptor.
    check(unsafe { libc::fchown(fd.as_raw_fd(), e.uid, e.gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), e.mode & 0o7777) })?;
    for (k, v) in &e.xattrs {
        set_xattr(fd, k, v)?;
    }
    Ok(())
}

/// Unpacks a complete, verified layer blob into `dest` as an overlayfs lower directory
/// (whiteouts as 0/0 character devices, opaque directories with `trusted.overlay.opaque=y`),
/// refusing anything that would write outside `dest`. `index` must be the blob's own index; the
/// entries met while streaming the blob are checked against it. `lowers` are the unpacked
/// layers below it, bottom first: a hard link to a file of theirs becomes a copy (so the
/// unpacked layer depends on them, a corner OCI allows and images rarely use). The blob is read
/// within `limits`.
pub fn unpack(
    index: &LayerIndex,
    blob: &Path,
    dest: &Path,
    lowers: &[PathBuf],
    limits: &Limits,
) -> Result<(), LayerError> {
    let io = |source| LayerError::Unpack { path: dest.to_path_buf(), source };
    std::fs::create_dir_all(dest).map_err(io)?;
    let root = File::open(dest).map_err(io)?;
    let mut opened = Vec::with_capacity(lowers.len());
    for lower in lowers.iter().rev() {
        let dir = File::open(lower).map_err(|source| LayerError::Unpack { path: lower.clone(), source })?;
        opened.push(OwnedFd::from(dir));
    }
    let mut u = Unpacker { root: OwnedFd::from(root), dest: dest.to_path_buf(), lowers: opened, dirs: Vec::new() };
    let file = File::open(blob).map_err(|source| LayerError::Unpack { path: blob.to_path_buf(), source })?;
    let buffered = BufReader::with_capacity(1 << 20, file);
    let stream: Box<dyn std::io::Read> =
        if index.is_compressed() { Box::new(Inflate::new(buffered, limits)) } else { Box::new(buffered) };
    let mut tar = TarReader::new(stream, limits.clone());
    let mut seen = 0usize;
    while let Some(raw) = tar.next_entry()? {
        if index.is_estargz() {
            let name = raw.path.as_os_str();
            if name == estargz::TOC_NAME || name == estargz::PREFETCH_LANDMARK || name == estargz::NO_PREFETCH_LANDMARK
            {
                continue;
            }
        }
        let mut one = EntriesBuilder::default();
        let loc = super::FileLoc::Tar(raw.data_offset);
        one.push(raw, loc)?;
        for e in one.entries {
            // The FUSE tree was built from the index: what is unpacked must be the same, or the
            // view would change at the handoff (an eStargz table of contents is not the tar).
            let Some(expected) = index.entries.get(seen) else {
                return Err(LayerError::Index(format!("blob entry {} is not in the layer index", e.path.display())));
            };
            if let Some(difference) = e.differs_from(expected) {
                return Err(LayerError::Index(format!("the blob does not match the layer index: {difference}")));
            }
            seen += 1;
            u.apply(&e, &mut tar)?;
        }
    }
    if seen != index.entries.len() {
        return Err(LayerError::Index(format!("blob has {seen} entries, the index {}", index.entries.len())));
    }
    // Directory times last (deepest first), since creating their contents changed them.
    let dirs = std::mem::take(&mut u.dirs);
    for (path, mtime) in dirs.iter().rev() {
        if path.as_os_str().is_empty() {
            let fd = open_beneath(&u.root, path, libc::O_RDONLY | libc::O_DIRECTORY).map_err(u.err(path))?;
            let t = libc::timespec { tv_sec: *mtime as libc::time_t, tv_nsec: 0 };
            // SAFETY: `fd` is open and the array holds two timespecs.
            check(unsafe { libc::futimens(fd.as_raw_fd(), [t, t].as_ptr()) }).map_err(u.err(path))?;
        } else {
            let parent = u.parent(path).map_err(u.err(path))?;
            let name = cstr(path.file_name().unwrap_or_default()).map_err(u.err(path))?;
            set_times(parent.as_raw_fd(), &name, *mtime).map_err(u.err(path))?;
        }
    }
    Ok(())
}
