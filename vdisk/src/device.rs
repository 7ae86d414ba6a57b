//! The `BlockDevice` interface that frontends, filters, backends and replication all speak.

use std::future::Future;
use std::pin::Pin;

use crate::buffer::IoBuf;

/// The largest read or write one request may carry (NBD's recommended maximum payload).
pub const MAX_IO_BYTES: u64 = 32 << 20;

/// What a device is: fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes, a multiple of `block_size`.
    pub capacity: u64,
    /// The logical block size: 512 or 4096. Every offset and length is a multiple of it.
    pub block_size: u32,
    pub read_only: bool,
}

/// Why a request failed. Each kind maps onto one NBD error and one virtio-blk status.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request at offset {offset} of {len} bytes is not aligned to the {block_size}-byte block size")]
    Misaligned { offset: u64, len: u64, block_size: u32 },
    #[error("request at offset {offset} of {len} bytes reaches past the end of the disk ({capacity} bytes)")]
    OutOfRange { offset: u64, len: u64, capacity: u64 },
    #[error("request of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("request has zero length")]
    Empty,
    #[error("disk is read-only")]
    ReadOnly,
    #[error("operation not supported by this disk")]
    Unsupported,
    #[error("media returned {done} of {len} bytes at offset {offset}")]
    ShortTransfer { offset: u64, len: u64, done: u64 },
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

impl BlockError {
    /// True when the request itself was wrong, as opposed to the device failing it.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, Self::Misaligned { .. } | Self::OutOfRange { .. } | Self::TooLarge { .. } | Self::Empty)
    }
}

pub type IoResult<T> = Result<T, BlockError>;

/// The future every request returns. Boxed so that `BlockDevice` stays object-safe.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = IoResult<T>> + Send + 'a>>;

/// A disk as every layer of vstor sees it.
///
/// Promises: a write completed with `fua`, and every write completed before a `flush` that has
/// completed, survive a crash. Requests may complete in any order; a caller that needs an order
/// waits for one request before sending the next. Offsets and lengths reaching an implementation
/// have been checked against [`DeviceInfo`] by [`check_range`] ([`crate::Disk`] does this for
/// every request from outside).
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> DeviceInfo;

    /// Reads `buf.len()` bytes at `offset` into `buf` and gives it back filled.
    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf>;

    /// Writes all of `buf` at `offset`; gives the buffer back for reuse.
    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf>;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Tells the device a range is no longer needed; it then reads as zeroes.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Writes zeroes over a range without sending them.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()>;
}

/// The kinds of request, for checks and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl RequestKind {
    pub const ALL: [RequestKind; 5] = [Self::Read, Self::Write, Self::Flush, Self::Discard, Self::WriteZeroes];

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Discard => "discard",
            Self::WriteZeroes => "write_zeroes",
        }
    }

    fn modifies(self) -> bool {
        !matches!(self, Self::Read | Self::Flush)
    }
}

/// Checks a request against the device before it may reach a backend.
pub fn check_range(info: &DeviceInfo, kind: RequestKind, offset: u64, len: u64) -> IoResult<()> {
    if info.read_only && kind.modifies() {
        return Err(BlockError::ReadOnly);
    }
    if kind == RequestKind::Flush {
        return Ok(());
    }
    if len == 0 {
        return Err(BlockError::Empty);
    }
    let bs = u64::from(info.block_size);
    if offset % bs != 0 || len % bs != 0 {
        return Err(BlockError::Misaligned { offset, len, block_size: info.block_size });
    }
    if matches!(kind, RequestKind::Read | RequestKind::Write) && len > MAX_IO_BYTES {
        return Err(BlockError::TooLarge { len, max: MAX_IO_BYTES });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.capacity => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, capacity: info.capacity }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: DeviceInfo = DeviceInfo { capacity: 1 << 20, block_size: 512, read_only: false };

    #[test]
    fn range_checks() {
        use RequestKind::*;
        assert!(check_range(&INFO, Read, 0, 512).is_ok());
        assert!(check_range(&INFO, Write, (1 << 20) - 512, 512).is_ok());
        assert!(matches!(check_range(&INFO, Read, 1, 512), Err(BlockError::Misaligned { .. })));
        assert!(matches!(check_range(&INFO, Read, 0, 100), Err(BlockError::Misaligned { .. })));
        assert!(matches!(check_range(&INFO, Read, 0, 0), Err(BlockError::Empty)));
        assert!(matches!(check_range(&INFO, Write, 1 << 20, 512), Err(BlockError::OutOfRange { .. })));
        assert!(matches!(check_range(&INFO, Discard, u64::MAX - 511, 512), Err(BlockError::OutOfRange { .. })));
        let big = DeviceInfo { capacity: 1 << 30, ..INFO };
        assert!(matches!(check_range(&big, Read, 0, 64 << 20), Err(BlockError::TooLarge { .. })));
        assert!(check_range(&big, Discard, 0, 64 << 20).is_ok());
        let ro = DeviceInfo { read_only: true, ..INFO };
        assert!(matches!(check_range(&ro, WriteZeroes, 0, 512), Err(BlockError::ReadOnly)));
        assert!(check_range(&ro, Read, 0, 512).is_ok());
        assert!(check_range(&ro, Flush, 0, 0).is_ok());
    }
}
