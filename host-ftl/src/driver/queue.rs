//! A guest's queue pair: its DMA region, its virtual geometry, and the two entry points for
//! 64-byte commands (I/O and admin), each answered by a future of its completion.
//!
//! Everything a guest FTL needs goes through this boundary, in NVMe terms only, so that a guest
//! FTL could later run in another process behind shared memory. Many commands may be in flight
//! at once from many tasks or threads (a `QueuePair` is cheap to clone); the driver may complete
//! them in any order, as an NVMe device may: a guest that needs an order (two writes to one
//! chunk) waits for the first completion, or relies on the driver keeping one guest's commands
//! on one PU in submission order, which it does.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::admin;
use super::engine::{aborted, aborted_with, GuestCounters, GuestShared, Job, Msg, QueueSlot, Reply};
use super::validate::{self, Checked};
use super::Core;
use crate::command::{Cqe, Sqe, Status};
use crate::dma::DmaRegion;
use crate::geometry::Geometry;
use crate::notify::ChunkNotification;

/// Commands one guest may have accepted and not completed; more are refused at once with
/// [`Status::QUEUE_FULL`], and the guest's other commands and every other guest carry on. The
/// guest FTL keeps a few hundred in flight at most (rounds of 256 commands, beside 32 reads);
/// a guest that submits without waiting holds at most this many checked commands (up to 64
/// addresses each, about 1.5 KiB) in the driver: 1.5 MiB, not what it can submit.
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// One guest's queue pair.
#[derive(Clone)]
pub struct QueuePair {
    pub(crate) guest: Arc<GuestShared>,
    pub(crate) core: Arc<Core>,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair").field("guest", &self.guest.name).finish_non_exhaustive()
    }
}

/// The completion of a submitted command, to await (or to look at with [`Pending::try_take`]
/// when driving a simulated clock by hand).
#[derive(Debug)]
pub struct Pending {
    state: PendingState,
    cid: u16,
    naddr: usize,
}

#[derive(Debug)]
enum PendingState {
    Ready(Option<Cqe>),
    Waiting(oneshot::Receiver<Cqe>),
}

impl Pending {
    fn ready(cqe: Cqe) -> Pending {
        Pending { cid: cqe.cid, naddr: 0, state: PendingState::Ready(Some(cqe)) }
    }

    /// The completion if it has arrived (once; `None` before and after).
    pub fn try_take(&mut self) -> Option<Cqe> {
        match &mut self.state {
            PendingState::Ready(c) => c.take(),
            PendingState::Waiting(rx) => match rx.try_recv() {
                Ok(c) => {
                    self.state = PendingState::Ready(None);
                    Some(c)
                }
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.state = PendingState::Ready(None);
                    Some(aborted(self.cid, self.naddr))
                }
            },
        }
    }
}

impl Future for Pending {
    type Output = Cqe;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Cqe> {
        let this = self.get_mut();
        let (cid, naddr) = (this.cid, this.naddr);
        match &mut this.state {
            PendingState::Ready(c) => Poll::Ready(c.take().unwrap_or_else(|| aborted(cid, naddr))),
            PendingState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(c)) => Poll::Ready(c),
                // The driver went away with the command: it was not completed.
                Poll::Ready(Err(_)) => Poll::Ready(aborted(cid, naddr)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl QueuePair {
    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.guest.name
    }

    /// The guest's virtual geometry (also the 4096-byte page of the admin Geometry command).
    pub fn geometry(&self) -> &Geometry {
        self.guest.part.geometry()
    }

    /// The guest's DMA region: commands point into it by byte offset.
    pub fn region(&self) -> &DmaRegion {
        &self.guest.region
    }

    /// The region, shared.
    pub fn region_arc(&self) -> Arc<DmaRegion> {
        self.guest.region.clone()
    }

    /// Whether the queue pair takes no more commands (its guest was removed or the driver closed).
    pub fn is_closed(&self) -> bool {
        self.guest.closed.load(Ordering::SeqCst)
    }

    /// Submits an I/O command (flush, vector reset/write/read/copy with guest addresses). A
    /// command the driver refuses completes at once with its error status.
    pub fn submit(&self, sqe: Sqe) -> Pending {
        if self.is_closed() {
            return self.refuse(aborted(sqe.cid, naddr(&sqe)));
        }
        match self.check(&sqe) {
            Err(cqe) => self.refuse(cqe),
            Ok(checked) => self.enqueue(checked),
        }
    }

    /// Checks and translates a command without submitting it: what [`QueuePair::submit`] does
    /// first. For tests and for measuring the cost of validation.
    pub fn check(&self, sqe: &Sqe) -> Result<Checked, Cqe> {
        validate::check(&self.guest.part, sqe, &self.guest.region, &self.core.costs)
    }

    fn refuse(&self, cqe: Cqe) -> Pending {
        self.guest.stats.record(&cqe, 0);
        Pending::ready(cqe)
    }

    fn enqueue(&self, checked: Checked) -> Pending {
        if let Some(cqe) = self.core.run_now(&self.guest, &checked) {
            return Pending::ready(cqe);
        }
        let cid = checked.sqe.cid;
        let n = checked.addrs.len();
        let Some(slot) = QueueSlot::take(&self.guest) else {
            return self.refuse(aborted_with(cid, n, Status::QUEUE_FULL));
        };
        let (tx, rx) = oneshot::channel();
        let job = Job { checked, region: self.guest.region.clone(), reply: Reply::Guest { tx, slot } };
        let msg = Msg::Submit { guest: self.guest.id, job, at: self.core.clock.now_ns() };
        if self.core.inbox.push(msg, !self.core.inline).is_err() {
            return self.refuse(aborted(cid, n));
        }
        self.core.run_inline();
        let mut pending = Pending { state: PendingState::Waiting(rx), cid, naddr: n };
        // Run here and completed at once: no channel to poll later.
        if let Some(cqe) = pending.try_take() {
            pending.state = PendingState::Ready(Some(cqe));
        }
        pending
    }

    /// Submits an admin command: Geometry (0xE2) or Get Log Page (0x02) of the chunk
    /// information (0xCA) or chunk notification (0xD0) log, all in the guest's own terms. The
    /// driver answers these itself, at once.
    pub fn admin(&self, sqe: Sqe) -> Pending {
        if self.is_closed() {
            return self.refuse(aborted(sqe.cid, 0));
        }
        let status = admin::execute(&self.guest, &self.core, &sqe);
        let cqe = Cqe::new(sqe.cid, status, 0);
        self.guest.stats.record(&cqe, 0);
        Pending::ready(cqe)
    }

    /// The guest's chunk notifications with a count above `after`, oldest first, in its own
    /// addresses (see [`crate::driver::notify`]).
    pub fn notifications(&self, after: u64) -> Vec<ChunkNotification> {
        self.core.router.poll(&*self.core.device);
        self.guest.log.since(after)
    }

    /// The guest's counters.
    pub fn counters(&self) -> GuestCounters {
        self.guest.stats.snapshot(self.guest.queued.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The address count a command claims, for the bitmap of an abort.
fn naddr(sqe: &Sqe) -> usize {
    if matches!(sqe.opcode, 0x90..=0x93) {
        ((sqe.cdw12 & 0xffff) as usize + 1).min(64)
    } else {
        0
    }
}
