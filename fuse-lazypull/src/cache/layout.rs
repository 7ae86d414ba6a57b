//! Where each thing lives in the cache directory (see [`super`] for what each is), and the
//! removal of what processes that are gone left half made.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{io, CacheError};
use crate::digest::Digest;

/// The folders whose entries are named by a digest's hex: what gc counts and removes.
pub(super) const KEYED: [&str; 3] = ["blobs/sha256", "derived", "unpacked"];

/// The paths of one cache directory.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Creates the folders of a cache at `dir` (if they are not there) and resolves `dir`.
    pub(super) fn create(dir: &Path) -> Result<Layout, CacheError> {
        for sub in ["blobs/sha256", "partial", "derived", "unpacked", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io("creating", &path))?;
        }
        let dir = dir.canonicalize().map_err(io("resolving", dir))?;
        Ok(Layout { dir })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index that every process using the directory shares.
    pub(super) fn index(&self) -> PathBuf {
        self.dir.join("index.db")
    }

    /// Where the complete, verified blob `digest` is.
    pub(super) fn blob(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// A new partial file for blob `digest`, named for this process.
    pub(super) fn partial(&self, digest: &Digest) -> PathBuf {
        // Unique per Blob: a Blob being dropped removes its file while a new one may start.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.join("partial").join(format!("{}.{}.{n}", digest.hex(), std::process::id()))
    }

    /// The folder of the data derived from blob `digest`.
    pub(super) fn derived_dir(&self, digest: &Digest) -> PathBuf {
        self.dir.join("derived").join(digest.hex())
    }

    /// Where derived data of `kind` is kept; `kind` must be a plain name.
    pub(super) fn derived(&self, digest: &Digest, kind: &str) -> Result<PathBuf, CacheError> {
        let ok = !kind.is_empty()
            && kind.len() <= 64
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(CacheError::BadKind(kind.to_owned()));
        }
        Ok(self.derived_dir(digest).join(kind))
    }

    /// Where the layer of key `digest` (its digest or chain ID) is unpacked.
    pub(super) fn unpacked(&self, digest: &Digest) -> PathBuf {
        self.dir.join("unpacked").join(digest.hex())
    }

    /// A fresh path under `tmp/`, named for this process.
    pub(super) fn temp(&self, name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{name}.{}.{n}", std::process::id()))
    }

    /// Removes partial blobs and temporary files (`NAME.PID.N`) of processes that are gone.
    pub(super) fn remove_leftovers(&self) {
        for sub in ["partial", "tmp"] {
            let dir = self.dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                    continue;
                }
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    make_removable(&path);
                    let _ = std::fs::remove_dir_all(&path);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Unpacked layers may hold read-only directories; give the owner write access so they can be
/// removed.
pub(super) fn make_removable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return };
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                make_removable(&e.path());
            }
        }
    }
}
