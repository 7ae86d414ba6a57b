//! What a mount does after FUSE serves: fetch the layers (eStargz prefetch ranges first, then
//! every missing byte while the file system is not being read, retrying while the registry
//! fails), unpack them and hand the target over to overlayfs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::error::MountError;
use super::progress::{Phase, Progress};
use super::unpacked::{chain_ids, empty_lower, unpack_once};
use crate::cache::{Blob, BlobCache, CacheError, Hold};
use crate::digest::Digest;
use crate::error_text::chain;
use crate::handoff;
use crate::layer::{LayerIndex, Limits};
use crate::registry::Image;

/// The first wait before the background fetch retries; it doubles up to [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(200);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// Prefetch ranges are read in pieces of at most this many bytes.
const PREFETCH_PIECE: u64 = 4 << 20;
/// The background fetch waits until the file system has not been read for this long, so that a
/// starting container has the link (and the CPU) to itself...
const BACKGROUND_IDLE: Duration = Duration::from_millis(250);
/// ...but never more than this per run of chunks, so a file system that is read all the time
/// still gets its image local.
const BACKGROUND_MAX_DEFER: Duration = Duration::from_secs(1);

/// The background fetch, unpack and handoff of one mount.
pub(super) struct Background {
    pub(super) cache: Arc<BlobCache>,
    /// Keeps the mount's layers from gc until the mount ends.
    pub(super) _hold: Hold,
    pub(super) image: Image,
    pub(super) blobs: Vec<Arc<Blob>>,
    pub(super) indexes: Vec<Arc<LayerIndex>>,
    pub(super) target: PathBuf,
    /// Fetch the whole image (else only what is read is fetched, and there is no handoff).
    pub(super) fetch: bool,
    /// Hand the target over to overlayfs once the image is local.
    pub(super) handoff: bool,
    pub(super) limits: Limits,
    pub(super) progress: Arc<Progress>,
    pub(super) stop: Arc<AtomicBool>,
}

impl Background {
    pub(super) fn run(&self) -> Result<(), MountError> {
        let result = self.fetch_and_hand_off();
        match &result {
            Ok(()) => {
                // The image has grown the cache: back under its limit (this mount's layers stay).
                if let Err(e) = self.cache.gc() {
                    tracing::warn!(error = %chain(&e), "cache gc failed");
                }
            }
            Err(MountError::Stopped) => tracing::info!("background fetch stopped"),
            Err(e) => self.progress.set_phase(Phase::Failed(chain(e))),
        }
        result
    }

    fn fetch_and_hand_off(&self) -> Result<(), MountError> {
        if !self.fetch {
            return Ok(());
        }
        self.prefetch();
        for (desc, blob) in self.image.layers.iter().zip(&self.blobs) {
            self.retrying(&desc.digest, || blob.fetch_all_paced(&|| self.yield_to_readers()))?;
        }
        tracing::info!(image = %self.progress.reference, "every layer is local");
        self.progress.set_phase(Phase::Complete);
        if self.handoff {
            self.hand_off()?;
        }
        Ok(())
    }

    /// Unpacks every layer (once) and hands the target over to overlayfs. Only one caller at a
    /// time gets past the phase check.
    pub(super) fn hand_off(&self) -> Result<(), MountError> {
        self.progress.start_unpacking().map_err(MountError::NotComplete)?;
        let result = self.unpack_and_hand_off();
        self.progress.set_phase(match &result {
            Ok(()) => Phase::HandedOff,
            Err(e) => Phase::Failed(chain(e)),
        });
        result
    }

    fn unpack_and_hand_off(&self) -> Result<(), MountError> {
        let digests: Vec<Digest> = self.image.layers.iter().map(|d| d.digest.clone()).collect();
        let mut lowers = Vec::with_capacity(self.blobs.len());
        for (((digest, chain), blob), index) in
            digests.iter().zip(chain_ids(&digests)).zip(&self.blobs).zip(&self.indexes)
        {
            let key = if index.depends_on_lowers() { chain } else { digest.clone() };
            let dir = unpack_once(&self.cache, &key, blob, index, &lowers, &self.limits)?;
            lowers.push(dir);
        }
        if self.stop.load(Relaxed) {
            return Err(MountError::Stopped);
        }
        lowers.reverse(); // overlayfs wants the top layer first
        if lowers.len() == 1 {
            // overlayfs without an upper directory needs two lower ones; an empty one is neutral.
            lowers.push(empty_lower(&self.cache)?);
        }
        handoff::hand_off(&self.target, &lowers)
            .map_err(|source| MountError::Handoff { target: self.target.clone(), source })?;
        tracing::info!(target = %self.target.display(), "handed over to overlayfs");
        Ok(())
    }

    /// Waits while the file system is being read (see [`BACKGROUND_IDLE`]); demand reads fetch
    /// what they need themselves, ahead of this. False once the mount is stopped.
    fn yield_to_readers(&self) -> bool {
        let started = std::time::Instant::now();
        while !self.stop.load(Relaxed) && started.elapsed() < BACKGROUND_MAX_DEFER {
            match self.progress.fs.idle_for() {
                idle if idle < BACKGROUND_IDLE => std::thread::sleep(BACKGROUND_IDLE - idle),
                _ => break,
            }
        }
        !self.stop.load(Relaxed)
    }

    /// Reads the eStargz prefetch ranges first, so the files a container starts with are local
    /// early. Failures only cost time: the full fetch follows.
    fn prefetch(&self) {
        for (blob, index) in self.blobs.iter().zip(&self.indexes) {
            for range in index.prefetch_ranges() {
                let mut at = range.start;
                while at < range.end && !self.stop.load(Relaxed) {
                    let len = (range.end - at).min(PREFETCH_PIECE);
                    let mut buf = vec![0; len as usize];
                    if let Err(e) = blob.read_at(at, &mut buf) {
                        tracing::warn!(layer = %blob.digest(), error = %chain(&e), "prefetch failed; the full fetch follows");
                        break;
                    }
                    at += len;
                }
            }
        }
    }

    fn retrying(&self, digest: &Digest, fetch: impl Fn() -> Result<(), CacheError>) -> Result<(), MountError> {
        fetch_until_done(&self.stop, digest, FIRST_RETRY_WAIT, fetch)
    }
}

/// Runs `fetch` until it succeeds, the mount is stopped, or it fails for good. Registry failures
/// are retried, waiting twice as long each time up to [`MAX_RETRY_WAIT`] (a registry may be
/// down for a while); anything else is final: a blob that did not match its digest however often
/// it was fetched ([`CacheError::Corrupt`]) would otherwise be fetched again forever.
fn fetch_until_done(
    stop: &AtomicBool,
    digest: &Digest,
    first_wait: Duration,
    fetch: impl Fn() -> Result<(), CacheError>,
) -> Result<(), MountError> {
    let mut wait = first_wait;
    loop {
        if stop.load(Relaxed) {
            return Err(MountError::Stopped);
        }
        match fetch() {
            Ok(()) => return Ok(()),
            Err(CacheError::Stopped) => return Err(MountError::Stopped),
            // A registry that ignores Range for this blob will go on ignoring it.
            Err(source @ CacheError::Fetch { .. }) if source.is_ignored_range() => {
                return Err(MountError::Fetch { digest: digest.clone(), source })
            }
            Err(e @ (CacheError::Timeout { .. } | CacheError::Fetch { .. })) => {
                tracing::warn!(layer = %digest, error = %chain(&e), retry_in = ?wait, "background fetch failed; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
            Err(source) => return Err(MountError::Fetch { digest: digest.clone(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryError;
    use std::cell::Cell;

    fn digest() -> Digest {
        Digest::of(b"layer")
    }

    #[test]
    fn registry_failures_are_retried_until_the_fetch_succeeds() {
        let calls = Cell::new(0);
        let result = fetch_until_done(&AtomicBool::new(false), &digest(), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            match calls.get() {
                1 => Err(CacheError::Timeout { digest: digest(), start: 0, end: 1, secs: 1 }),
                2 => Err(CacheError::Fetch {
                    digest: digest(),
                    start: 0,
                    end: 1,
                    source: Arc::new(RegistryError::Config("down".into())),
                }),
                _ => Ok(()),
            }
        });
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(calls.get(), 3);
    }

    /// A blob corrupt every time is given up on with its error, not fetched again forever.
    #[test]
    fn a_corrupt_blob_is_given_up_on() {
        let calls = Cell::new(0);
        let result = fetch_until_done(&AtomicBool::new(false), &digest(), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            Err(CacheError::Corrupt { digest: digest(), actual: Digest::of(b"other"), attempts: 3 })
        });
        let err = result.unwrap_err();
        assert!(matches!(err, MountError::Fetch { source: CacheError::Corrupt { .. }, .. }), "{err:?}");
        assert!(chain(&err).contains("is corrupt: fetched 3 times"), "{}", chain(&err));
        assert_eq!(calls.get(), 1);
    }

    /// A registry that ignores Range past what can be skipped is given up on, not asked again.
    #[test]
    fn a_registry_ignoring_range_is_given_up_on() {
        let calls = Cell::new(0);
        let result = fetch_until_done(&AtomicBool::new(false), &digest(), Duration::from_millis(1), || {
            calls.set(calls.get() + 1);
            let source = Arc::new(RegistryError::IgnoresRange { url: "http://r/blob".into(), start: 1 << 30 });
            Err(CacheError::Fetch { digest: digest(), start: 1 << 30, end: (1 << 30) + 1, source })
        });
        assert!(matches!(result, Err(MountError::Fetch { .. })), "{result:?}");
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn a_stopped_mount_stops_retrying() {
        let stop = AtomicBool::new(false);
        let result = fetch_until_done(&stop, &digest(), Duration::from_millis(1), || {
            stop.store(true, Relaxed);
            Err(CacheError::Timeout { digest: digest(), start: 0, end: 1, secs: 1 })
        });
        assert!(matches!(result, Err(MountError::Stopped)), "{result:?}");
    }
}
