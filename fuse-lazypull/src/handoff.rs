//! Putting overlayfs beneath the FUSE mount at the same path, then detaching FUSE.
//!
//! The overlay is built with the new mount API (`fsopen("overlay")`, one `lowerdir+` per layer,
//! `fsmount`) so it never appears at any path before it is in place. `move_mount` with
//! `MOVE_MOUNT_BENEATH` (Linux ≥ 6.5) slides it under the mount on top of TARGET, and
//! `umount2(TARGET, MNT_DETACH)` takes the FUSE mount off: new lookups reach overlayfs at once,
//! while files opened before keep reading through FUSE until they are closed (so the FUSE server
//! must keep serving until the kernel drops the connection).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

// From linux/mount.h; not all of them are in the libc crate.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_BENEATH: libc::c_uint = 0x200;

/// How an image is mounted, over FUSE and after the handoff alike, so that the view does not
/// change at the switch: read-only, device nodes not openable, setuid bits and file
/// capabilities not honoured (the image is not trusted by the host).
pub const IMAGE_MOUNT_FLAGS: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

/// [`IMAGE_MOUNT_FLAGS`] as the new mount API's attributes.
const fn mount_attrs(flags: libc::c_ulong) -> libc::c_uint {
    let mut attrs = 0;
    if flags & libc::MS_RDONLY != 0 {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    if flags & libc::MS_NOSUID != 0 {
        attrs |= MOUNT_ATTR_NOSUID;
    }
    if flags & libc::MS_NODEV != 0 {
        attrs |= MOUNT_ATTR_NODEV;
    }
    attrs
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no lower directories to build the overlay from")]
    NoLayers,
    #[error("path {0:?} holds a NUL byte")]
    BadPath(PathBuf),
    #[error("{step} failed")]
    Syscall {
        step: String,
        #[source]
        source: io::Error,
    },
}

fn cstring(path: &Path) -> Result<CString, HandoffError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| HandoffError::BadPath(path.to_path_buf()))
}

/// Turns a raw syscall return into a result naming the step that failed.
fn check(ret: libc::c_long, step: impl FnOnce() -> String) -> Result<libc::c_long, HandoffError> {
    if ret < 0 {
        Err(HandoffError::Syscall { step: step(), source: io::Error::last_os_error() })
    } else {
        Ok(ret)
    }
}

/// A detached, read-only overlay mount of `lowers` (top first), not yet attached anywhere.
pub fn overlay_mount(lowers: &[PathBuf]) -> Result<OwnedFd, HandoffError> {
    if lowers.is_empty() {
        return Err(HandoffError::NoLayers);
    }
    let fstype = c"overlay";
    // SAFETY: fsopen takes a NUL-terminated name and flags; it returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    let fs_fd = check(ret, || "fsopen(overlay)".into())?;
    // SAFETY: `fs_fd` was just returned by fsopen and nothing else owns it.
    let fs_fd = unsafe { OwnedFd::from_raw_fd(fs_fd as i32) };
    let set = |key: &std::ffi::CStr, value: Option<&CString>, what: &dyn Fn() -> String| {
        let (cmd, value) = match value {
            Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
            None => (FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: the key and value are NUL-terminated strings that outlive the call (or the
        // value is NULL for a flag); aux is 0 as these commands require.
        let ret = unsafe { libc::syscall(libc::SYS_fsconfig, fs_fd.as_raw_fd(), cmd, key.as_ptr(), value, 0) };
        check(ret, what).map(|_| ())
    };
    for lower in lowers {
        let dir = cstring(lower)?;
        set(c"lowerdir+", Some(&dir), &|| format!("fsconfig(lowerdir+={})", lower.display()))?;
    }
    set(c"ro", None, &|| "fsconfig(ro)".into())?;
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    check(ret, || "fsconfig(create overlay)".into())?;
    // SAFETY: fsmount on the configured context returns a new mount descriptor or -1.
    let ret =
        unsafe { libc::syscall(libc::SYS_fsmount, fs_fd.as_raw_fd(), FSMOUNT_CLOEXEC, mount_attrs(IMAGE_MOUNT_FLAGS)) };
    let mnt = check(ret, || "fsmount(overlay)".into())?;
    // SAFETY: `mnt` was just returned by fsmount and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as i32) })
}

/// Attaches the detached mount `mnt` beneath whatever is mounted on top of `target`.
pub fn move_beneath(mnt: &OwnedFd, target: &Path) -> Result<(), HandoffError> {
    let to = cstring(target)?;
    // SAFETY: `mnt` is a mount descriptor we own; "" with MOVE_MOUNT_F_EMPTY_PATH means the
    // descriptor itself; `to` is NUL-terminated and outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_BENEATH,
        )
    };
    check(ret, || format!("move_mount(beneath {})", target.display())).map(|_| ())
}

/// Lazily detaches the mount on top of `target` (busy files keep it alive until closed).
pub fn detach(target: &Path) -> Result<(), HandoffError> {
    let path = cstring(target)?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    check(ret.into(), || format!("umount2({}, MNT_DETACH)", target.display())).map(|_| ())
}

/// The whole handoff: a read-only overlay of `lowers` (top first) goes beneath the mount at
/// `target`, which is then detached.
pub fn hand_off(target: &Path, lowers: &[PathBuf]) -> Result<(), HandoffError> {
    let mnt = overlay_mount(lowers)?;
    move_beneath(&mnt, target)?;
    detach(target)
}

/// The file system type of the mount whose mount point is `target`, from
/// `/proc/self/mountinfo` (the last, i.e. topmost, mount there).
pub fn mounted_fs_type(target: &Path) -> io::Result<Option<String>> {
    Ok(mounted(target)?.map(|m| m.fs_type))
}

/// What `/proc/self/mountinfo` says of one mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub fs_type: String,
    /// Per-mount options, e.g. `ro,nosuid,nodev,relatime`.
    pub options: Vec<String>,
    /// The file system's own options (for overlayfs: `lowerdir=...`), unescaped.
    pub super_options: String,
}

/// The topmost mount at `target`.
pub fn mounted(target: &Path) -> io::Result<Option<MountInfo>> {
    let want = target.as_os_str().as_bytes();
    Ok(mounts()?.into_iter().rev().find(|(point, _)| point.as_slice() == want).map(|(_, info)| info))
}

/// Every mount of this process's namespace, in mountinfo's order, with its mount point.
pub fn mounts() -> io::Result<Vec<(Vec<u8>, MountInfo)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source super
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < sep + 2 || fields.len() < 6 {
            continue;
        }
        let info = MountInfo {
            fs_type: fields[sep + 1].to_string(),
            options: fields[5].split(',').map(str::to_string).collect(),
            super_options: fields
                .get(sep + 3)
                .map(|f| String::from_utf8_lossy(&unescape(f)).into_owned())
                .unwrap_or_default(),
        };
        out.push((unescape(fields[4]), info));
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape(r"/tmp/a\040b"), b"/tmp/a b");
        assert_eq!(unescape("/plain"), b"/plain");
    }

    #[test]
    fn no_layers_is_an_error() {
        assert!(matches!(overlay_mount(&[]), Err(HandoffError::NoLayers)));
    }

    /// A tmpfs stands in for the FUSE mount: after the handoff TARGET shows the overlay of the
    /// two lower dirs, and a file opened on the tmpfs before still reads.
    #[test]
    fn handoff_puts_overlay_beneath_and_detaches_needs_root() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, lower, target) = (dir.path().join("l1"), dir.path().join("l2"), dir.path().join("t"));
        for d in [&upper, &lower, &target] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(upper.join("a"), b"top").unwrap();
        std::fs::write(lower.join("a"), b"hidden").unwrap();
        std::fs::write(lower.join("b"), b"low").unwrap();
        let t = cstring(&target).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let ret = unsafe { libc::mount(c"tmpfs".as_ptr(), t.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
        assert_eq!(ret, 0, "mount tmpfs: {}", io::Error::last_os_error());
        std::fs::write(target.join("old"), b"before").unwrap();
        let mut old = std::fs::File::open(target.join("old")).unwrap();

        hand_off(&target, &[upper.clone(), lower.clone()]).unwrap();

        let overlay = mounted(&target).unwrap().unwrap();
        assert_eq!(overlay.fs_type, "overlay");
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(overlay.options.iter().any(|o| o == flag), "{flag} missing from {:?}", overlay.options);
        }
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"top");
        assert_eq!(std::fs::read(target.join("b")).unwrap(), b"low");
        assert!(!target.join("old").exists());
        assert!(std::fs::write(target.join("c"), b"x").is_err(), "the overlay is read-only");
        let mut s = String::new();
        old.read_to_string(&mut s).unwrap();
        assert_eq!(s, "before");
        detach(&target).unwrap();
    }
}
