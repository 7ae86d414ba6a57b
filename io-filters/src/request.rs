//! What travels down a chain: a request, and the answers a filter gives it.

use std::time::Instant;

use vdisk::{BlockDevice, BlockError, IoBuf, IoResult, RequestKind};

/// Redirects one request may take before it is failed: more than any clone depth the
/// configuration allows, so that only a loop (which the configuration check also refuses)
/// reaches it.
pub const MAX_HOPS: u32 = 1024;

/// The shape of a request, which filters may change before they redirect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub kind: RequestKind,
    pub offset: u64,
    /// Bytes covered; for reads and writes the buffer's length; 0 for a flush.
    pub len: u64,
    pub fua: bool,
}

impl Head {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// One request on its way through chains.
#[derive(Debug)]
pub struct Request {
    pub head: Head,
    /// The data of a write, or the buffer a read fills; `None` for the other kinds.
    pub buf: Option<IoBuf>,
    /// Redirects taken so far.
    pub hops: u32,
}

/// What a request gives back: its buffer, for reads and writes.
pub type Reply = Option<IoBuf>;

impl Request {
    pub fn read(offset: u64, buf: IoBuf) -> Request {
        let len = buf.len() as u64;
        Request { head: Head { kind: RequestKind::Read, offset, len, fua: false }, buf: Some(buf), hops: 0 }
    }

    pub fn write(offset: u64, buf: IoBuf, fua: bool) -> Request {
        let len = buf.len() as u64;
        Request { head: Head { kind: RequestKind::Write, offset, len, fua }, buf: Some(buf), hops: 0 }
    }

    pub fn flush() -> Request {
        Request { head: Head { kind: RequestKind::Flush, offset: 0, len: 0, fua: false }, buf: None, hops: 0 }
    }

    pub fn discard(offset: u64, len: u64) -> Request {
        Request { head: Head { kind: RequestKind::Discard, offset, len, fua: false }, buf: None, hops: 0 }
    }

    pub fn write_zeroes(offset: u64, len: u64, fua: bool) -> Request {
        Request { head: Head { kind: RequestKind::WriteZeroes, offset, len, fua }, buf: None, hops: 0 }
    }

    /// A request of the same lineage (hop count), for a filter that splits or adds requests.
    pub fn child(&self, mut req: Request) -> Request {
        req.hops = self.hops;
        req
    }
}

/// What a filter sees when a request it let through completes.
pub struct Completion<'a> {
    /// The request as it was when the filter let it through.
    pub head: &'a Head,
    /// The outcome, which the filter may change (e.g. turn a read into an error).
    pub result: &'a mut IoResult<Reply>,
    /// When the request entered this chain, if a filter of it asked for the time.
    pub started: Option<Instant>,
}

/// Runs a request on a device that is not a chain.
pub(crate) async fn dispatch(dev: &dyn BlockDevice, req: Request) -> IoResult<Reply> {
    let h = req.head;
    match h.kind {
        RequestKind::Read => Ok(Some(dev.read(h.offset, need_buf(req.buf)?).await?)),
        RequestKind::Write => Ok(Some(dev.write(h.offset, need_buf(req.buf)?, h.fua).await?)),
        RequestKind::Flush => dev.flush().await.map(|()| None),
        RequestKind::Discard => dev.discard(h.offset, h.len).await.map(|()| None),
        RequestKind::WriteZeroes => dev.write_zeroes(h.offset, h.len, h.fua).await.map(|()| None),
    }
}

fn need_buf(buf: Option<IoBuf>) -> IoResult<IoBuf> {
    buf.ok_or_else(|| BlockError::Io(std::io::Error::other("read or write request without a buffer")))
}

/// The buffer a read or write gives back.
pub(crate) fn reply_buf(reply: Reply) -> IoResult<IoBuf> {
    need_buf(reply)
}

/// An I/O error with a message, for failures that are not the kernel's.
pub fn io_error(kind: std::io::ErrorKind, message: impl Into<String>) -> BlockError {
    BlockError::Io(std::io::Error::new(kind, message.into()))
}
