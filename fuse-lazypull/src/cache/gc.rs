//! Garbage collection: what nothing needs goes, least recently used first, until the cache is
//! within its size limit (see [`super`] for what keeps content).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{io, CacheError};
use super::holds::holder_alive;
use super::index::{now_secs, Index};
use super::layout::{make_removable, Layout, KEYED};
use crate::digest::Digest;

/// What [`super::BlobCache::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed (with their derived data and unpacked directories), oldest use first.
    pub removed: Vec<Digest>,
    pub freed_bytes: u64,
    /// Bytes the cache holds after the collection.
    pub total_bytes: u64,
}

/// What gc knows of one key's content on disk.
#[derive(Default)]
pub(super) struct Usage {
    pub(super) bytes: u64,
    /// Seconds since the epoch when its newest part appeared.
    appeared: u64,
}

/// Bytes on disk, and when its newest part appeared, for everything the cache holds.
pub(super) fn usage(layout: &Layout) -> Result<BTreeMap<Digest, Usage>, CacheError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out: BTreeMap<Digest, Usage> = BTreeMap::new();
    for sub in KEYED {
        let dir = layout.dir().join(sub);
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            let Ok(digest) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            // A rename into place sets the ctime, which nothing in an image can.
            let appeared = entry.metadata().map_or(0, |m| u64::try_from(m.ctime()).unwrap_or(0));
            let usage = out.entry(digest).or_default();
            usage.bytes += disk_usage(&entry.path());
            usage.appeared = usage.appeared.max(appeared);
        }
    }
    Ok(out)
}

/// Removes what nothing needs until the cache holds at most `size_limit` bytes. `live` are the
/// blobs open in this process; content used or written within `grace` stays.
pub(super) fn collect(
    layout: &Layout,
    index: &Index,
    live: &HashSet<Digest>,
    size_limit: u64,
    grace: Duration,
) -> Result<GcReport, CacheError> {
    layout.remove_leftovers();
    let usage = usage(layout)?;
    let in_overlays = unpacked_in_overlays();
    if let Err(e) = &in_overlays {
        tracing::warn!(error = %e, "cannot read the mount table; gc keeps every unpacked layer");
    }
    let in_overlay = |d: &Digest| match &in_overlays {
        Ok(used) => used.contains(d.hex()),
        Err(_) => layout.unpacked(d).exists(),
    };
    let now = now_secs();
    // Decided and moved aside inside one write transaction of the index: a hold another
    // process writes meanwhile waits for it, and comes after the content is gone (and is
    // fetched again).
    let (report, trash) = index.collect(|index| {
        let records = index.blobs()?;
        let mut needed = index.pinned()?;
        for holder in index.holders()? {
            if !holder_alive(&holder) {
                index.release(&holder)?;
            }
        }
        needed.extend(index.holds()?.into_iter().map(|(_, digest)| digest));
        // Least recently used (or written) first; content the index does not know (left by
        // a crash) goes by when it appeared.
        let touched = |d: &Digest, u: &Usage| records.get(d).map_or(0, |r| r.last_use).max(u.appeared);
        let mut candidates: Vec<(u64, Digest, u64)> = usage
            .iter()
            .filter(|(d, _)| !needed.contains(*d) && !live.contains(*d) && !in_overlay(d))
            .map(|(d, u)| (touched(d, u), d.clone(), u.bytes))
            .filter(|(t, _, _)| now.saturating_sub(*t) >= grace.as_secs())
            .collect();
        candidates.sort();
        let mut report = GcReport::default();
        let mut total: u64 = usage.values().map(|u| u.bytes).sum();
        let mut trash = Vec::new();
        for (_, digest, bytes) in candidates {
            if total <= size_limit {
                break;
            }
            match move_aside(layout, &digest) {
                Ok(dir) => trash.push(dir),
                Err(e) => {
                    tracing::warn!(%digest, error = %crate::error_text::chain(&e), "gc could not remove content");
                    continue;
                }
            }
            index.forget_blob(&digest)?;
            total = total.saturating_sub(bytes);
            report.freed_bytes += bytes;
            report.removed.push(digest);
        }
        // Index entries of blobs with nothing on disk and nothing needing them go too.
        for digest in records.keys() {
            if !usage.contains_key(digest) && !needed.contains(digest) && !live.contains(digest) {
                index.forget_blob(digest)?;
            }
        }
        // What gc removes is moved aside; the index still lists it.
        failpoint::hit("cache::gc::moved-aside");
        report.total_bytes = total;
        Ok((report, trash))
    })?;
    // The index no longer lists it; it is still on disk, under tmp/.
    failpoint::hit("cache::gc::committed");
    for dir in trash {
        make_removable(&dir);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "gc could not delete what it moved aside");
        }
    }
    if !report.removed.is_empty() {
        tracing::info!(
            removed = report.removed.len(),
            freed = report.freed_bytes,
            total = report.total_bytes,
            "cache gc"
        );
    }
    Ok(report)
}

/// Moves the blob, derived data and unpacked directory of `digest` into a new directory
/// under `tmp/`, to be deleted at leisure; returns that directory.
fn move_aside(layout: &Layout, digest: &Digest) -> Result<PathBuf, CacheError> {
    let trash = layout.temp("gc");
    std::fs::create_dir(&trash).map_err(io("creating", &trash))?;
    let parts = [layout.blob(digest), layout.derived_dir(digest), layout.unpacked(digest)];
    for (i, part) in parts.iter().enumerate() {
        match std::fs::rename(part, trash.join(i.to_string())) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::Io { what: "removing", path: part.clone(), source: e }),
        }
    }
    Ok(trash)
}

/// The keys (hex) of unpacked layers that mounted overlays use as lower directories: they stay,
/// whatever the index says, until the overlay is unmounted.
fn unpacked_in_overlays() -> std::io::Result<HashSet<String>> {
    let mut out = HashSet::new();
    for (_, info) in crate::handoff::mounts()?.iter().filter(|(_, m)| m.fs_type == "overlay") {
        let opts = info.super_options.as_str();
        for (at, _) in opts.match_indices("/unpacked/") {
            let rest = &opts[at + "/unpacked/".len()..];
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            let after = rest[hex.len()..].chars().next();
            if hex.len() == 64 && matches!(after, None | Some(',' | ':')) {
                out.insert(hex);
            }
        }
    }
    Ok(out)
}

/// Bytes of a file or of everything under a directory (symlinks not followed).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries.flatten().map(|e| disk_usage(&e.path())).sum()
}
