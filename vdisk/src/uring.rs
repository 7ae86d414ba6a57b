//! io_uring rings that async requests submit to.
//!
//! Any thread may submit: a ring sits behind a short mutex that is held only to push an entry
//! and to reap completions, never across a wait. Completions are reaped by whoever gets there
//! first: the submitter right after `io_uring_enter` (the page cache often completes a request
//! inline), the request's own poll, or whoever waits on the eventfd the ring signals.
//!
//! A disk's own ring is reaped by a tokio task. A thread with an event loop of its own (a
//! vhost-user queue) instead owns a ring it reaps itself and *enters* it while it runs requests:
//! everything those requests submit goes to that ring, so their completions wake that thread
//! directly instead of a tokio worker that would then have to wake it.
//!
//! The kernel writes into a request's buffer until its completion arrives, so a request future
//! dropped early leaves its buffer with the ring, which frees it when the completion comes.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};
use tokio::io::unix::AsyncFd;

const RING_ENTRIES: u32 = 256;

/// One io_uring and the requests in flight on it.
pub struct Uring {
    shared: Arc<Shared>,
}

struct Shared {
    ring: Mutex<RingState>,
    /// The eventfd the ring signals on completions.
    event: OwnedFd,
}

thread_local! {
    /// The ring this thread has entered (see [`Uring::enter`]), if any.
    static ENTERED: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

struct RingState {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
}

enum Slot {
    Free,
    Waiting(Option<Waker>),
    Done(i32),
    /// The request's future was dropped; the buffer waits here for the kernel to finish.
    Orphaned(#[allow(dead_code)] Box<dyn Any + Send>),
}

impl Uring {
    /// Creates a ring and its reaper task; must be called inside a tokio runtime.
    pub fn new() -> io::Result<Uring> {
        let uring = Uring::self_reaped()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let _entered = runtime.enter();
        let efd = uring.shared.event.try_clone()?;
        // SAFETY: `efd` is an open eventfd owned by the AsyncFd for its whole life.
        let reaper = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        runtime.spawn(reap(reaper, Arc::downgrade(&uring.shared)));
        Ok(uring)
    }

    /// Creates a ring whose owner reaps it: it waits for [`Uring::event_fd`] to become readable
    /// and then calls [`Uring::reap`].
    pub fn self_reaped() -> io::Result<Uring> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor owned by nobody else.
        let event = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let state = RingState { ring, slots: Vec::new(), free: Vec::new(), in_flight: 0 };
        Ok(Uring { shared: Arc::new(Shared { ring: Mutex::new(state), event }) })
    }

    /// The eventfd the ring signals when completions arrive.
    pub fn event_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    /// Clears the eventfd and wakes the requests whose completions have arrived.
    pub fn reap(&self) {
        self.shared.clear_event();
        self.shared.reap_and_wake();
    }

    /// Sends every operation this thread submits, through any ring, to this one until the guard
    /// is dropped.
    pub fn enter(&self) -> Entered {
        let previous = ENTERED.with(|e| e.replace(Some(self.shared.clone())));
        Entered { previous }
    }

    /// Submits one operation. `build` makes the entry from the buffer, which then stays with the
    /// operation until the kernel completes it; the future yields the result and the buffer.
    ///
    /// # Safety
    /// Every pointer in the entry must point into `buf` (or be otherwise valid until completion),
    /// and `buf` must not move its heap memory while owned by the operation.
    pub unsafe fn submit<B: Send + 'static>(
        &self,
        buf: B,
        build: impl FnOnce(&mut B) -> squeue::Entry,
    ) -> Operation<B> {
        let mut buf = buf;
        let entry = build(&mut buf);
        let shared = ENTERED.with(|e| e.borrow().clone()).unwrap_or_else(|| self.shared.clone());
        let mut state = shared.lock();
        let slot = state.alloc_slot();
        let entry = entry.user_data(slot as u64);
        // The page cache often completes a request inside io_uring_enter, and it is reaped right
        // below: an eventfd signal for it would only wake the reaper (often on another thread) for
        // nothing. Completions posted while notifications are off are all reaped below too.
        state.ring.completion().disable_eventfd();
        // SAFETY: the caller vouches for the entry's pointers.
        let pushed = unsafe { state.push(&entry) };
        let submitted = pushed.and_then(|()| state.ring.submit().map(drop));
        state.ring.completion().enable_eventfd();
        let mut wakers = Vec::new();
        let result = match submitted {
            Ok(()) => {
                state.in_flight += 1;
                state.reap(&mut wakers);
                Ok(())
            }
            Err(e) => {
                state.release(slot);
                Err(e)
            }
        };
        drop(state);
        wakers.into_iter().for_each(Waker::wake);
        Operation { shared, slot: result.as_ref().ok().map(|_| slot), buf: Some(buf), error: result.err() }
    }
}

/// Restores the ring the thread had entered before; see [`Uring::enter`].
pub struct Entered {
    previous: Option<Arc<Shared>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ENTERED.with(|e| *e.borrow_mut() = previous);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        plumbing::lock(&self.ring)
    }

    fn clear_event(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
        unsafe { libc::read(self.event.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
    }

    fn reap_and_wake(&self) {
        let mut wakers = Vec::new();
        self.lock().reap(&mut wakers);
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Wake a reaper task so that it sees the ring is gone and ends.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl RingState {
    fn alloc_slot(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Slot::Waiting(None);
                i
            }
            None => {
                self.slots.push(Slot::Waiting(None));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, slot: usize) {
        self.slots[slot] = Slot::Free;
        self.free.push(slot);
    }

    /// Pushes an entry, making room by handing queued entries to the kernel when the queue is full.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Moves every available completion into its slot and collects the wakers to call.
    fn reap(&mut self, wakers: &mut Vec<Waker>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let Some(slot) = self.slots.get_mut(cqe.user_data() as usize) else { continue };
            self.in_flight -= 1;
            match std::mem::replace(slot, Slot::Done(cqe.result())) {
                Slot::Waiting(Some(w)) => wakers.push(w),
                Slot::Orphaned(_) => {
                    *slot = Slot::Free;
                    self.free.push(cqe.user_data() as usize);
                }
                _ => {}
            }
        }
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        // Orphaned buffers must outlive the kernel's use of them: wait for every completion.
        while self.in_flight > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut Vec::new());
        }
    }
}

/// Reaps completions whenever the ring signals its eventfd, until the ring is dropped.
async fn reap(fd: AsyncFd<OwnedFd>, shared: Weak<Shared>) {
    loop {
        let Ok(mut guard) = fd.readable().await else { return };
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
        unsafe { libc::read(fd.get_ref().as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        guard.clear_ready();
        let Some(shared) = shared.upgrade() else { return };
        shared.reap_and_wake();
    }
}

/// A submitted operation: resolves to the kernel's result (a byte count or `-errno`) and the buffer.
pub struct Operation<B: Send + 'static> {
    shared: Arc<Shared>,
    slot: Option<usize>,
    buf: Option<B>,
    error: Option<io::Error>,
}

impl<B: Send + 'static> Unpin for Operation<B> {}

impl<B: Send + 'static> Future for Operation<B> {
    type Output = (io::Result<i32>, B);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(slot) = this.slot else {
            let err = this.error.take().unwrap_or_else(|| io::Error::other("operation polled after completion"));
            return Poll::Ready((Err(err), this.take_buf()));
        };
        let mut state = this.shared.lock();
        let mut wakers = Vec::new();
        state.reap(&mut wakers);
        let outcome = match &mut state.slots[slot] {
            Slot::Done(res) => Some(*res),
            Slot::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                None
            }
            Slot::Free | Slot::Orphaned(_) => Some(-libc::EIO),
        };
        if outcome.is_some() {
            state.release(slot);
            this.slot = None;
        }
        drop(state);
        wakers.into_iter().for_each(Waker::wake);
        match outcome {
            Some(res) if res < 0 => Poll::Ready((Err(io::Error::from_raw_os_error(-res)), this.take_buf())),
            Some(res) => Poll::Ready((Ok(res), this.take_buf())),
            None => Poll::Pending,
        }
    }
}

impl<B: Send + 'static> Operation<B> {
    fn take_buf(&mut self) -> B {
        // `buf` is Some until the single Ready this future returns.
        self.buf.take().unwrap_or_else(|| unreachable!("operation completed twice"))
    }
}

impl<B: Send + 'static> Drop for Operation<B> {
    fn drop(&mut self) {
        let Some(slot) = self.slot else { return };
        let mut state = self.shared.lock();
        match &state.slots[slot] {
            Slot::Done(_) => state.release(slot),
            _ => {
                let buf: Box<dyn Any + Send> = match self.buf.take() {
                    Some(b) => Box::new(b),
                    None => Box::new(()),
                };
                state.slots[slot] = Slot::Orphaned(buf);
            }
        }
    }
}
