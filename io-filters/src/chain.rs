//! A disk's chain of filters, itself a `BlockDevice`.
//!
//! The chain runs a request through its filters in a loop: each filter's synchronous `pre` hook
//! answers at once, so a request that every filter lets through costs one virtual call per filter
//! on the way down and one on the way back (for those that watch completions), and no allocation
//! beyond one small boxed future that shows the completion to the filters that watch it (none
//! at all when no filter does).
//!
//! A redirect to another disk's chain is followed in the same loop rather than by a nested call,
//! so a read that falls through 256 linked clones to the bottom of their family uses no more stack
//! than one that does not. Each redirect counts a hop; past [`MAX_HOPS`] the request fails.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use vdisk::device::check_range;
use vdisk::{BlockDevice, DeviceInfo, IoBuf, IoFuture, IoResult, RequestKind};

use crate::request::{dispatch, io_error, reply_buf, Completion, Head, Reply, Request, MAX_HOPS};

/// A filter's answer to a request on its way down.
pub enum Verdict {
    /// Pass it to the next filter (the common case: no allocation, no await).
    Continue,
    /// Answered here, e.g. from a cache; the request's buffer is the reply.
    Complete(IoResult<()>),
    /// Send it (as the filter has reshaped it) to the top of another disk's chain.
    Redirect(Arc<Chain>),
    /// The filter runs it itself, asynchronously: the chain calls [`Filter::handle`].
    Handle,
}

/// One filter of a chain.
pub trait Filter: Send + Sync {
    /// The filter's type, as configured.
    fn kind(&self) -> &'static str;

    /// Looks at a request on its way down and answers at once.
    fn pre(&self, req: &mut Request) -> Verdict;

    /// Runs a request that `pre` answered [`Verdict::Handle`] for. `next` sends requests on down
    /// the chain, or to other disks.
    fn handle<'a>(&'a self, req: Request, next: Next<'a>) -> IoFuture<'a, Reply> {
        next.submit(req)
    }

    /// Whether the chain should call [`Filter::post`].
    fn watches_completions(&self) -> bool {
        false
    }

    /// Whether `post` needs to know when the request entered the chain.
    fn wants_clock(&self) -> bool {
        false
    }

    /// Sees the completion of a request this filter let through (answered `Continue`).
    fn post(&self, _done: Completion<'_>) {}
}

struct Slot {
    filter: Arc<dyn Filter>,
    post: bool,
}

/// A disk's filters in order, above its backend. Every disk has one, if only an empty one: a
/// redirect always lands on a chain, and continues in the loop of the chain it came from.
pub struct Chain {
    name: String,
    info: DeviceInfo,
    slots: Box<[Slot]>,
    backend: Arc<dyn BlockDevice>,
    timed: bool,
    /// Whether any filter watches completions.
    posts: bool,
}

/// Where a walk down a chain's filters stopped.
enum Stop {
    Bottom,
    Complete(IoResult<()>),
    Redirect(Arc<Chain>),
    Handle(usize),
}

impl Chain {
    /// A chain of `filters`, first nearest the VM, above `backend`.
    pub fn new(name: &str, filters: Vec<Arc<dyn Filter>>, backend: Arc<dyn BlockDevice>) -> Chain {
        let timed = filters.iter().any(|f| f.wants_clock());
        let slots: Box<[Slot]> =
            filters.into_iter().map(|filter| Slot { post: filter.watches_completions(), filter }).collect();
        let posts = slots.iter().any(|s| s.post);
        Chain { name: name.to_owned(), info: backend.info(), slots, backend, timed, posts }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The filters' types, in order.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.filter.kind()).collect()
    }

    /// The chain below filter `index`: what that filter passes requests to.
    pub fn below(&self, index: usize, hops: u32) -> Next<'_> {
        Next { chain: self, from: index + 1, hops }
    }

    /// Runs a request from the top of the chain.
    pub fn submit(&self, req: Request) -> IoFuture<'_, Reply> {
        Box::pin(self.drive(0, req))
    }

    /// Calls `pre` of filters from `from` on until one does not answer `Continue`.
    fn walk(&self, from: usize, req: &mut Request) -> (usize, Stop) {
        for i in from..self.slots.len() {
            match self.slots[i].filter.pre(req) {
                Verdict::Continue => {}
                Verdict::Complete(r) => return (i, Stop::Complete(r)),
                Verdict::Redirect(dev) => return (i, Stop::Redirect(dev)),
                Verdict::Handle => return (i, Stop::Handle(i)),
            }
        }
        (self.slots.len(), Stop::Bottom)
    }

    /// Shows a completion to the filters in `range` that let the request through, last first.
    fn unwind(&self, range: Range<usize>, head: &Head, result: &mut IoResult<Reply>, started: Option<Instant>) {
        for slot in self.slots[range].iter().rev() {
            if slot.post {
                slot.filter.post(Completion { head, result, started });
            }
        }
    }

    /// Finishes a walk that stopped at a filter answering, or at the bottom.
    async fn finish(&self, stop: Stop, mut req: Request) -> IoResult<Reply> {
        match stop {
            Stop::Bottom => dispatch(self.backend.as_ref(), req).await,
            Stop::Complete(r) => r.map(|()| req.buf.take()),
            Stop::Handle(i) => {
                let next = self.below(i, req.hops);
                self.slots[i].filter.handle(req, next).await
            }
            Stop::Redirect(_) => Err(io_error(std::io::ErrorKind::Other, "redirect reached finish")),
        }
    }

    async fn drive(&self, from: usize, mut req: Request) -> IoResult<Reply> {
        let started = self.timed.then(Instant::now);
        let (passed, stop) = self.walk(from, &mut req);
        self.resume(from, passed, stop, req, started).await
    }

    /// Finishes a request whose walk stopped, and shows its completion to the filters it passed.
    async fn resume(
        &self,
        from: usize,
        passed: usize,
        stop: Stop,
        req: Request,
        started: Option<Instant>,
    ) -> IoResult<Reply> {
        let head = req.head;
        let mut result = match stop {
            Stop::Bottom => dispatch(self.backend.as_ref(), req).await,
            // Boxed, so that the common path's future stays small.
            Stop::Redirect(dev) => Box::pin(follow(dev, req)).await,
            stop => self.finish(stop, req).await,
        };
        self.unwind(from..passed, &head, &mut result, started);
        result
    }

    /// A request from outside: the filters' `pre` hooks run right here; a request they all let
    /// through goes straight to the backend, wrapped only to show its completion.
    fn run<'s, T, B>(&'s self, mut req: Request, bottom: B) -> IoFuture<'s, T>
    where
        T: Answer,
        B: FnOnce(&'s dyn BlockDevice, Request) -> IoFuture<'s, T>,
    {
        let started = self.timed.then(Instant::now);
        let (passed, stop) = self.walk(0, &mut req);
        match stop {
            Stop::Bottom => {
                let head = req.head;
                let inner = bottom(self.backend.as_ref(), req);
                if !self.posts {
                    return inner;
                }
                Box::pin(Posted { chain: self, inner, head, passed, started })
            }
            stop => Box::pin(async move { T::from_reply(self.resume(0, passed, stop, req, started).await?) }),
        }
    }
}

/// What a kind of request gives back: a buffer (reads, writes) or nothing.
trait Answer: Send + Sized + 'static {
    fn into_reply(self) -> Reply;
    fn from_reply(reply: Reply) -> IoResult<Self>;
}

impl Answer for IoBuf {
    fn into_reply(self) -> Reply {
        Some(self)
    }
    fn from_reply(reply: Reply) -> IoResult<Self> {
        reply_buf(reply)
    }
}

impl Answer for () {
    fn into_reply(self) -> Reply {
        None
    }
    fn from_reply(_: Reply) -> IoResult<Self> {
        Ok(())
    }
}

/// A backend request whose completion the chain's filters watch.
struct Posted<'a, T> {
    chain: &'a Chain,
    inner: IoFuture<'a, T>,
    head: Head,
    passed: usize,
    started: Option<Instant>,
}

impl<T: Answer> Future for Posted<'_, T> {
    type Output = IoResult<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = ready!(self.inner.as_mut().poll(cx));
        let mut result = out.map(T::into_reply);
        self.chain.unwind(0..self.passed, &self.head, &mut result, self.started);
        Poll::Ready(result.and_then(T::from_reply))
    }
}

fn no_buffer<'b, T: Send + 'b>() -> IoFuture<'b, T> {
    Box::pin(std::future::ready(Err(io_error(std::io::ErrorKind::Other, "read or write request without a buffer"))))
}

/// A chain a redirected request went through, and how many of its filters let it pass.
struct Passed {
    chain: Arc<Chain>,
    filters: usize,
    head: Head,
    started: Option<Instant>,
}

/// Follows a redirect, and every redirect after it, in one loop; then shows the completion to
/// the filters of each chain passed on the way, nearest the bottom first.
async fn follow(first: Arc<Chain>, mut req: Request) -> IoResult<Reply> {
    let mut passed_chains: Vec<Passed> = Vec::new();
    let mut chain = first;
    let mut result = loop {
        req.hops += 1;
        if req.hops > MAX_HOPS {
            break Err(io_error(std::io::ErrorKind::Other, format!("request redirected more than {MAX_HOPS} times")));
        }
        if let Err(e) =
            check_range(&DeviceInfo { read_only: false, ..chain.info }, req.head.kind, req.head.offset, req.head.len)
        {
            break Err(e);
        }
        let started = chain.timed.then(Instant::now);
        let (passed, stop) = chain.walk(0, &mut req);
        let head = req.head;
        match stop {
            Stop::Redirect(next) => {
                passed_chains.push(Passed { chain, filters: passed, head, started });
                chain = next;
            }
            stop => {
                let mut r = chain.finish(stop, req).await;
                chain.unwind(0..passed, &head, &mut r, started);
                break r;
            }
        }
    };
    for p in passed_chains.iter().rev() {
        p.chain.unwind(0..p.filters, &p.head, &mut result, p.started);
    }
    result
}

/// What a filter that handles a request itself passes requests to: the rest of its chain, or
/// another disk's chain.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    chain: &'a Chain,
    from: usize,
    hops: u32,
}

impl<'a> Next<'a> {
    /// The disk this chain belongs to.
    pub fn info(&self) -> DeviceInfo {
        self.chain.info
    }

    /// Sends a request on down the chain.
    pub fn submit(self, mut req: Request) -> IoFuture<'a, Reply> {
        req.hops = req.hops.max(self.hops);
        Box::pin(self.chain.drive(self.from, req))
    }

    /// Sends a request to the top of another disk's chain, counting a hop.
    pub fn redirect(self, target: Arc<Chain>, mut req: Request) -> IoFuture<'a, Reply> {
        req.hops = req.hops.max(self.hops);
        Box::pin(follow(target, req))
    }

    pub async fn read(self, offset: u64, buf: IoBuf) -> IoResult<IoBuf> {
        reply_buf(self.submit(self.lineage(Request::read(offset, buf))).await?)
    }

    pub async fn write(self, offset: u64, buf: IoBuf, fua: bool) -> IoResult<IoBuf> {
        reply_buf(self.submit(self.lineage(Request::write(offset, buf, fua))).await?)
    }

    pub async fn flush(self) -> IoResult<()> {
        self.submit(self.lineage(Request::flush())).await.map(drop)
    }

    pub async fn discard(self, offset: u64, len: u64) -> IoResult<()> {
        self.submit(self.lineage(Request::discard(offset, len))).await.map(drop)
    }

    pub async fn write_zeroes(self, offset: u64, len: u64, fua: bool) -> IoResult<()> {
        self.submit(self.lineage(Request::write_zeroes(offset, len, fua))).await.map(drop)
    }

    /// Reads from the top of another disk's chain.
    pub async fn read_from(self, target: Arc<Chain>, offset: u64, buf: IoBuf) -> IoResult<IoBuf> {
        reply_buf(self.redirect(target, self.lineage(Request::read(offset, buf))).await?)
    }

    fn lineage(&self, mut req: Request) -> Request {
        req.hops = self.hops;
        req
    }
}

impl BlockDevice for Chain {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn read(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.run(Request::read(offset, buf), |dev, req| match req.buf {
            Some(buf) => dev.read(req.head.offset, buf),
            None => no_buffer(),
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        self.run(Request::write(offset, buf, fua), |dev, req| match req.buf {
            Some(buf) => dev.write(req.head.offset, buf, req.head.fua),
            None => no_buffer(),
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.run(Request::flush(), |dev, _| dev.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run(Request::discard(offset, len), |dev, req| dev.discard(req.head.offset, req.head.len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        self.run(Request::write_zeroes(offset, len, fua), |dev, req| {
            dev.write_zeroes(req.head.offset, req.head.len, req.head.fua)
        })
    }
}

/// Whether a request changes data.
pub fn modifies(kind: RequestKind) -> bool {
    matches!(kind, RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes)
}
