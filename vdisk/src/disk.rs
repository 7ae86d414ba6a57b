//! A disk as the frontends see it: every request checked, then counted; the handle an export
//! holds, with its connection accounting.

use std::future::{ready, Future};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::buffer::IoBuf;
use crate::device::{check_range, BlockDevice, DeviceInfo, IoFuture, IoResult, RequestKind};

/// Counters of one disk, by request kind.
#[derive(Default)]
pub struct DiskStats {
    counters: [KindCounters; 5],
}

#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// A copy of one kind's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KindSnapshot {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl DiskStats {
    fn record(&self, kind: RequestKind, bytes: u64, ok: bool) {
        let c = &self.counters[kind as usize];
        c.ops.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self, kind: RequestKind) -> KindSnapshot {
        let c = &self.counters[kind as usize];
        KindSnapshot { ops: c.ops.load(Relaxed), bytes: c.bytes.load(Relaxed), errors: c.errors.load(Relaxed) }
    }
}

/// A disk: the device behind it (its filter chain), its name and id, and its counters.
pub struct Disk {
    name: String,
    id: String,
    info: DeviceInfo,
    device: Arc<dyn BlockDevice>,
    stats: DiskStats,
    users: AtomicUsize,
    /// Held read-only because other disks depend on its contents (a linked clone's parent).
    frozen: AtomicBool,
}

/// Marks a disk as in use (by an export connection) while it lives.
pub struct DiskUser(Arc<Disk>);

impl Drop for DiskUser {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Relaxed);
    }
}

impl std::ops::Deref for DiskUser {
    type Target = Arc<Disk>;
    fn deref(&self) -> &Arc<Disk> {
        &self.0
    }
}

impl Disk {
    pub fn new(name: &str, id: &str, device: Arc<dyn BlockDevice>) -> Disk {
        Disk {
            name: name.to_owned(),
            id: id.to_owned(),
            info: device.info(),
            device,
            stats: DiskStats::default(),
            users: AtomicUsize::new(0),
            frozen: AtomicBool::new(false),
        }
    }

    /// The same disk, refusing changes whatever its device says (a disk configured read-only
    /// over a backend that could write).
    pub fn with_read_only(mut self, read_only: bool) -> Disk {
        self.info.read_only |= read_only;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device behind the checks: the disk's filter chain, or its backend when it has none.
    /// Redirects between disks' chains go here, not through the checks and counters.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Makes the disk refuse changes (`BlockError::ReadOnly`) while other disks depend on it, and
    /// say so in [`BlockDevice::info`] to exports opened from now on.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Relaxed);
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Relaxed)
    }

    pub fn stats(&self) -> &DiskStats {
        &self.stats
    }

    /// How many export connections have the disk open.
    pub fn users(&self) -> usize {
        self.users.load(Relaxed)
    }

    pub fn acquire(self: &Arc<Self>) -> DiskUser {
        self.users.fetch_add(1, Relaxed);
        DiskUser(self.clone())
    }

    /// Checks a request, sends it on if it is valid, and counts its outcome either way.
    fn tracked<'a, T: Send + 'a, F>(&'a self, kind: RequestKind, offset: u64, len: u64, send: F) -> IoFuture<'a, T>
    where
        F: FnOnce(&'a dyn BlockDevice) -> IoFuture<'a, T>,
    {
        if let Err(e) = check_range(&self.info(), kind, offset, len) {
            self.stats.record(kind, 0, false);
            return Box::pin(ready(Err(e)));
        }
        let inner = send(self.device.as_ref());
        Box::pin(Counted { inner, stats: &self.stats, kind, bytes: len })
    }
}

/// The most a discard or write-zeroes asks of the layers below at once. A client may ask for a
/// whole disk (a guest's mkfs does), and a layer may work per block of what it is given (clone
/// bitmaps, checksums, the FTL's map): in pieces, each request's work and memory stay bounded.
/// A multiple of every block size.
pub const MAX_RANGE_PIECE: u64 = 1 << 30;

/// Runs `op` over `offset..offset + len` in pieces of at most [`MAX_RANGE_PIECE`], one after the
/// other; the first error ends it.
fn in_pieces<'a, F>(offset: u64, len: u64, mut op: F) -> IoFuture<'a, ()>
where
    F: FnMut(u64, u64) -> IoFuture<'a, ()> + Send + 'a,
{
    if len <= MAX_RANGE_PIECE {
        return op(offset, len);
    }
    Box::pin(async move {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_RANGE_PIECE);
            op(at, n).await?;
            at += n;
        }
        Ok(())
    })
}

/// Wraps a request's future to count its outcome when it completes.
struct Counted<'a, T> {
    inner: IoFuture<'a, T>,
    stats: &'a DiskStats,
    kind: RequestKind,
    bytes: u64,
}

impl<T> Future for Counted<'_, T> {
    type Output = IoResult<T>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let out = std::task::ready!(self.inner.as_mut().poll(cx));
        self.stats.record(self.kind, self.bytes, out.is_ok());
        std::task::Poll::Ready(out)
    }
}

impl BlockDevice for Disk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { read_only: self.info.read_only || self.is_frozen(), ..self.info }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.tracked(RequestKind::Read, offset, buf.len() as u64, move |d| d.read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        self.tracked(RequestKind::Write, offset, buf.len() as u64, move |d| d.write(offset, buf, fua))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.tracked(RequestKind::Flush, 0, 0, |d| d.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.tracked(RequestKind::Discard, offset, len, move |d| in_pieces(offset, len, move |o, n| d.discard(o, n)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.tracked(RequestKind::WriteZeroes, offset, len, move |d| {
            in_pieces(offset, len, move |o, n| d.write_zeroes(o, n, fua))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the ranges of the discards and write-zeroes it is sent.
    #[derive(Default)]
    struct Ranges(Mutex<Vec<(u64, u64)>>);

    impl BlockDevice for Ranges {
        fn info(&self) -> DeviceInfo {
            DeviceInfo { capacity: 4 << 40, block_size: 4096, read_only: false }
        }
        fn read(&self, _: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
            Box::pin(ready(Ok(buf)))
        }
        fn write(&self, _: u64, buf: IoBuf, _: bool) -> IoFuture<'_, IoBuf> {
            Box::pin(ready(Ok(buf)))
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(ready(Ok(())))
        }
        fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            self.0.lock().unwrap().push((offset, len));
            Box::pin(ready(Ok(())))
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> IoFuture<'_, ()> {
            self.discard(offset, len)
        }
    }

    #[test]
    fn large_ranges_reach_the_device_in_bounded_pieces() {
        let ranges = Arc::new(Ranges::default());
        let disk = Disk::new("d", "id", ranges.clone());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        const G: u64 = 1 << 30;
        rt.block_on(disk.discard(4096, 2 * G + G / 2)).unwrap();
        rt.block_on(disk.write_zeroes(0, G, true)).unwrap();
        let got = ranges.0.lock().unwrap().clone();
        assert_eq!(got, [(4096, G), (4096 + G, G), (4096 + 2 * G, G / 2), (0, G)]);
        let stats = disk.stats().snapshot(RequestKind::Discard);
        assert_eq!((stats.ops, stats.bytes), (1, 2 * G + G / 2), "one request, counted once");
    }
}
