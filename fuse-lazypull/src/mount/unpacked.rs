//! The layers of a complete image unpacked into the cache, once per layer (or per chain, for a
//! layer whose unpacked form depends on the layers below), as overlayfs lower directories.

use std::path::{Path, PathBuf};

use super::error::MountError;
use crate::cache::{Blob, BlobCache};
use crate::digest::Digest;
use crate::layer::{self, LayerIndex, Limits};

/// The chain ID of each layer of a stack (bottom first), as OCI defines it over diff IDs but
/// over blob digests: the bottom layer's digest, then `sha256(below + " " + digest)`. A layer
/// whose unpacked form depends on the layers below ([`LayerIndex::depends_on_lowers`]) is
/// unpacked under its chain ID, so stacks that differ below it never share it.
pub fn chain_ids(digests: &[Digest]) -> Vec<Digest> {
    let mut below: Option<Digest> = None;
    digests
        .iter()
        .map(|digest| {
            let chain = match &below {
                None => digest.clone(),
                Some(below) => Digest::of(format!("{below} {digest}").as_bytes()),
            };
            below = Some(chain.clone());
            chain
        })
        .collect()
}

/// Unpacks a complete layer into the cache's directory for `key` (the layer's digest, or its
/// chain ID: see [`chain_ids`]), unless that exists already. The layer goes to a temporary
/// directory first and is renamed into place, so a directory at the final path is always
/// complete, whichever process or mount wrote it. `lowers` are the layers below it, bottom
/// first, already unpacked. A layer that would not fit the free space or the cache's size limit
/// is refused before anything is written.
pub fn unpack_once(
    cache: &BlobCache,
    key: &Digest,
    blob: &Blob,
    index: &LayerIndex,
    lowers: &[PathBuf],
    limits: &Limits,
) -> Result<PathBuf, MountError> {
    let dir = cache.unpacked_dir(key);
    if dir.is_dir() {
        return Ok(dir);
    }
    let digest = blob.digest();
    let needed = index.unpacked_bytes();
    let free = cache.available_bytes().map_err(|source| MountError::Blob { digest: digest.clone(), source })?;
    for (what, room) in [("the free space", free), ("the cache's size limit", cache.size_limit())] {
        if needed > room {
            return Err(MountError::TooLarge { digest: digest.clone(), needed, what, room });
        }
    }
    // Under the cache's tmp/, so what a crash leaves is removed once this process is gone.
    let tmp = cache.temp_path(&format!("unpack-{}", key.hex()));
    std::fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
    let blob_path = blob.path().ok_or_else(|| MountError::NotLocal(digest.clone()))?;
    let unpacked = layer::unpack(index, &blob_path, &tmp, lowers, limits);
    if let Err(source) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(MountError::Unpack { digest: digest.clone(), dir: dir.clone(), source });
    }
    // The layer is unpacked under tmp/, not under its name.
    failpoint::hit("cache::unpack::unpacked");
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another mount or process unpacked it meanwhile: keep theirs.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => Err(MountError::Io { what: "renaming the unpacked layer to", path: dir, source }),
    }
}

/// An empty directory beside the unpacked layers, for single-layer images.
pub(super) fn empty_lower(cache: &BlobCache) -> Result<PathBuf, MountError> {
    let some_layer = cache.unpacked_dir(&Digest::of(b""));
    let dir = some_layer.parent().unwrap_or(Path::new("/")).join(".empty-lower");
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    Ok(dir)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_path_buf();
    move |source| MountError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer's chain ID depends on every layer below it and on nothing above.
    #[test]
    fn chain_ids_follow_the_layers_below() {
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        let one = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(one[0], a);
        assert_eq!(one[1], Digest::of(format!("{a} {b}").as_bytes()));
        let other = chain_ids(&[b.clone(), c.clone()]);
        assert_ne!(one[2], other[1], "the same top layer over other layers");
        assert_eq!(chain_ids(&[a, b, c.clone(), c])[..3], one[..]);
    }
}
