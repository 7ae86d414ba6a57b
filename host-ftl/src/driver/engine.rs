//! The dispatching core: the scheduler, the device and the commands in flight, driven by an
//! explicit `now`.
//!
//! Everything that changes what the device does goes through [`Engine::handle`] (messages from
//! queue pairs and the driver, in the order they were sent) and [`Engine::run`] (complete what
//! is due, dispatch what may go). Both take `now` from their caller and nothing else reads a
//! clock, so a run on the simulated clock is deterministic, and the dispatcher thread runs the
//! same code on the real clock. Commands are executed on the device when they are dispatched
//! (the device model does its work at once and says when the media would be done); with the
//! timing model on, the completion is delivered at that `done_at`, else at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::fair::{Dispatched, Estimate, Limits, SchedConfig, Scheduler};
use super::notify::{GuestLog, Router};
use super::partition::Partition;
use super::reclaim::{Next, ReclaimJob};
use super::validate::{estimate, Checked, POISON};
use crate::address::{Addr, Ppa};
use crate::chunk::ChunkState;
use crate::command::{opcode, Cqe, Sqe, Status};
use crate::dma::DmaRegion;
use crate::open_channel::OpenChannel;
use crate::timing::Costs;

/// Counters of one guest, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCounters {
    /// Commands completed (I/O and admin, refused ones included).
    pub commands: u64,
    /// Bytes of data moved by commands that succeeded.
    pub bytes: u64,
    /// Commands that completed with an error status (refused ones included; the high-ECC
    /// warning is not an error).
    pub errors: u64,
    /// Nanoseconds the guest had work queued but was held back by its rate limits.
    pub throttled_ns: u64,
    /// Device time its commands were charged by the fair scheduler (the timing model's
    /// estimate), in nanoseconds.
    pub device_ns: u64,
    /// Commands accepted and not completed yet (at most [`super::MAX_QUEUE_DEPTH`]).
    pub queued: u64,
}

#[derive(Default)]
pub(crate) struct GuestStats {
    commands: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    throttled_ns: AtomicU64,
    device_ns: AtomicU64,
}

impl GuestStats {
    pub(crate) fn record(&self, cqe: &Cqe, bytes: u64) {
        self.commands.fetch_add(1, Ordering::Relaxed);
        if cqe.status.data_valid() {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The device time the scheduler charged for one of the guest's commands.
    pub(crate) fn charge(&self, est: &Estimate) {
        self.device_ns.fetch_add(est.cost, Ordering::Relaxed);
    }

    /// The counters, with `queued` commands outstanding.
    pub(crate) fn snapshot(&self, queued: usize) -> GuestCounters {
        GuestCounters {
            commands: self.commands.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            throttled_ns: self.throttled_ns.load(Ordering::Relaxed),
            device_ns: self.device_ns.load(Ordering::Relaxed),
            queued: queued as u64,
        }
    }
}

/// What a guest's queue pair and the engine share.
pub(crate) struct GuestShared {
    pub name: String,
    pub id: u64,
    pub part: Arc<Partition>,
    pub region: Arc<DmaRegion>,
    pub stats: GuestStats,
    pub log: Arc<GuestLog>,
    /// Set when the guest is removed (or the driver closes): no more commands.
    pub closed: AtomicBool,
    pub weight: u32,
    pub limits: super::fair::Limits,
    /// Commands accepted and not completed yet, at most [`super::MAX_QUEUE_DEPTH`].
    pub queued: AtomicUsize,
}

/// A place in a guest's queue, given back when dropped: when its command completes or is
/// aborted, or the driver goes away with it.
pub(crate) struct QueueSlot(Arc<GuestShared>);

impl QueueSlot {
    /// A place for one more command of `guest`, if it has fewer than the queue depth.
    pub(crate) fn take(guest: &Arc<GuestShared>) -> Option<QueueSlot> {
        let depth = super::MAX_QUEUE_DEPTH;
        guest.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < depth).then_some(n + 1)).ok()?;
        Some(QueueSlot(guest.clone()))
    }

    pub(crate) fn guest(&self) -> &Arc<GuestShared> {
        &self.0
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a command's completion goes.
pub(crate) enum Reply {
    /// The slot is given back before the completion is sent, so a guest that submits as soon as
    /// it sees one finds the place free.
    Guest {
        tx: oneshot::Sender<Cqe>,
        slot: QueueSlot,
    },
    Reclaim {
        job: u64,
    },
}

/// A checked command on its way to the device.
pub(crate) struct Job {
    pub checked: Checked,
    pub region: Arc<DmaRegion>,
    pub reply: Reply,
}

/// Messages to the engine, handled in the order sent.
pub(crate) enum Msg {
    AddGuest(Arc<GuestShared>),
    /// Stop serving a guest: its queued commands are aborted.
    RemoveGuest(u64),
    Submit {
        guest: u64,
        job: Job,
        at: u64,
    },
    /// Reset every chunk of these PUs, then report the name as reclaimed.
    Reclaim {
        name: String,
        pus: Vec<usize>,
    },
}

/// A completion failing all `n` addresses of a command with `status`.
pub(crate) fn aborted_with(cid: u16, n: usize, status: Status) -> Cqe {
    let bitmap = if n >= 64 { u64::MAX } else { (1u64 << n.max(1)) - 1 };
    Cqe::new(cid, status, if n == 0 { 0 } else { bitmap })
}

/// The completion of a command that was never executed because its queue went away.
pub(crate) fn aborted(cid: u16, n: usize) -> Cqe {
    aborted_with(cid, n, Status::ABORTED_SQ_DELETION)
}

fn abort(job: Job) {
    let n = job.checked.addrs.len();
    let cqe = aborted(job.checked.sqe.cid, n);
    if let Reply::Guest { tx, slot } = job.reply {
        slot.guest().stats.record(&cqe, 0);
        drop(slot);
        let _ = tx.send(cqe);
    }
}

struct EngineGuest {
    shared: Arc<GuestShared>,
    /// Device chunk indexes of the guest's open chunks, kept only when the driver must enforce
    /// the guest's share of open chunks.
    open: Option<BTreeSet<usize>>,
}

struct InFlight {
    flow: u64,
    reply: Reply,
    est: Estimate,
    cqe: Cqe,
    bytes: u64,
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub(crate) struct EngineConfig {
    pub sched: SchedConfig,
    /// Deliver completions at the timing model's `done_at`.
    pub timing: bool,
    pub reclaim_weight: u32,
    /// Chunks per reset command while reclaiming.
    pub reclaim_batch: usize,
}

/// The scheduler, the device and everything in flight.
pub(crate) struct Engine {
    device: Arc<dyn OpenChannel>,
    cfg: EngineConfig,
    sched: Scheduler<Job>,
    costs: Costs,
    inflight: BTreeMap<(u64, u64), InFlight>,
    seq: u64,
    guests: BTreeMap<u64, EngineGuest>,
    jobs: BTreeMap<u64, ReclaimJob>,
    next_flow: Arc<AtomicU64>,
    router: Arc<Router>,
    /// Names whose reclaim finished since the last [`Engine::run`].
    pub(crate) reclaimed: Vec<String>,
    /// A region for commands that move no host data (resets).
    empty_region: Arc<DmaRegion>,
}

impl Engine {
    pub(crate) fn new(
        device: Arc<dyn OpenChannel>,
        costs: Costs,
        cfg: EngineConfig,
        router: Arc<Router>,
        next_flow: Arc<AtomicU64>,
    ) -> Engine {
        Engine {
            sched: Scheduler::new(cfg.sched.clone()),
            costs,
            device,
            cfg,
            inflight: BTreeMap::new(),
            seq: 0,
            guests: BTreeMap::new(),
            jobs: BTreeMap::new(),
            next_flow,
            router,
            reclaimed: Vec::new(),
            empty_region: Arc::new(DmaRegion::new(0)),
        }
    }

    pub(crate) fn handle(&mut self, msg: Msg, now: u64) {
        match msg {
            Msg::AddGuest(g) => {
                self.sched.add_flow(g.id, g.weight, g.limits, now);
                let open = g.part.open_limit_binds().then(|| self.open_chunks_of(g.part.device_pus()));
                self.guests.insert(g.id, EngineGuest { shared: g, open });
            }
            Msg::RemoveGuest(id) => {
                self.guests.remove(&id);
                for job in self.sched.remove_flow(id) {
                    abort(job);
                }
            }
            Msg::Submit { guest, job, at } => {
                let Job { checked, region, reply } = job;
                let est = checked.est.clone();
                let bytes = checked.bytes;
                if let Err(job) = self.sched.enqueue(guest, est, bytes, Job { checked, region, reply }, at) {
                    abort(job);
                }
            }
            Msg::Reclaim { name, pus } => self.start_reclaim(name, pus, now),
        }
    }

    /// Completes what is due at `now` and dispatches what may go, until neither makes progress.
    pub(crate) fn run(&mut self, now: u64) {
        loop {
            let mut progressed = false;
            while let Some(entry) = self.inflight.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let f = entry.remove();
                self.finish(f, now);
                progressed = true;
            }
            let batch = self.sched.dispatch(now);
            if batch.is_empty() && !progressed {
                break;
            }
            for d in batch {
                self.execute(d, now);
            }
        }
        self.router.poll(&*self.device);
        for g in self.guests.values() {
            g.shared.stats.throttled_ns.store(self.sched.throttled_ns(g.shared.id, now), Ordering::Relaxed);
        }
    }

    /// When something next needs doing: a completion falls due or a rate limit lets a guest go.
    pub(crate) fn next_event(&self, now: u64) -> Option<u64> {
        let done = self.inflight.keys().next().map(|k| k.0);
        [done, self.sched.next_wakeup(now)].into_iter().flatten().min()
    }

    /// Commands queued or in flight.
    pub(crate) fn busy(&self) -> usize {
        self.sched.total_queued() + self.inflight.len()
    }

    fn execute(&mut self, d: Dispatched<Job>, now: u64) {
        let Job { checked, region, reply } = d.item;
        let guest = match &reply {
            Reply::Guest { slot, .. } => Some(slot.guest().id),
            Reply::Reclaim { .. } => None,
        };
        let (cqe, done_at) = self.on_device(guest, &checked, &region, now);
        self.seq += 1;
        let f = InFlight { flow: d.flow, reply, est: d.est, cqe, bytes: checked.bytes };
        self.inflight.insert((done_at.max(now), self.seq), f);
    }

    /// Runs a guest's command on the device right away when the scheduler would let it go at
    /// once and its completion is due at once (no timing model): booked, executed and completed
    /// as [`Engine::handle`] and [`Engine::run`] would do it, without the queue, the in-flight
    /// table and the reply channel; `None` (nothing done) otherwise.
    pub(crate) fn run_now(&mut self, guest: &GuestShared, checked: &Checked, now: u64) -> Option<Cqe> {
        if self.cfg.timing || !self.inflight.is_empty() || !self.guests.contains_key(&guest.id) {
            return None;
        }
        if !self.sched.admit(guest.id, &checked.est, checked.bytes, now) {
            return None;
        }
        let (cqe, _) = self.on_device(Some(guest.id), checked, &guest.region, now);
        self.sched.complete(guest.id, &checked.est);
        guest.stats.charge(&checked.est);
        guest.stats.record(&cqe, checked.bytes);
        self.router.poll(&*self.device);
        Some(cqe)
    }

    /// Executes a checked command on the device, keeping the open chunks of a guest whose share
    /// of them the driver enforces; returns the completion and when it is due.
    fn on_device(&mut self, guest: Option<u64>, checked: &Checked, region: &DmaRegion, now: u64) -> (Cqe, u64) {
        let sqe = &checked.sqe;
        let device = &*self.device;
        let guest = guest.and_then(|id| self.guests.get_mut(&id));
        let targets = match sqe.opcode {
            opcode::VECTOR_WRITE | opcode::VECTOR_RESET => &checked.addrs[..],
            opcode::VECTOR_COPY => &checked.dst[..],
            _ => &[],
        };
        let tracked = guest.and_then(|g| g.open.as_mut().map(|open| (open, g.shared.part.max_open())));
        let chunks = match &tracked {
            Some(_) => chunk_indexes(device, targets),
            None => BTreeSet::new(),
        };
        match tracked {
            Some((open, limit)) if sqe.opcode != opcode::VECTOR_RESET && !may_open(device, open, limit, &chunks) => {
                (aborted_with(sqe.cid, checked.addrs.len(), Status::TOO_MANY_OPEN_CHUNKS), now)
            }
            tracked => {
                let out = run_on_device(device, self.cfg.timing, checked, region, now);
                if let Some((open, _)) = tracked {
                    for &c in &chunks {
                        match chunk_state(device, c) {
                            Some(ChunkState::Open) => open.insert(c),
                            _ => open.remove(&c),
                        };
                    }
                }
                out
            }
        }
    }

    fn open_chunks_of(&self, pus: &[usize]) -> BTreeSet<usize> {
        let num_chk = self.device.geometry().num_chk as usize;
        let mut open = BTreeSet::new();
        for &pu in pus {
            let first = pu * num_chk;
            let descs = self.device.chunk_info(first..first + num_chk).unwrap_or_else(|e| {
                tracing::warn!(pu, error = %e, "cannot read chunk information: the PU's open chunks are not counted");
                Vec::new()
            });
            for (i, d) in descs.iter().enumerate() {
                if d.state == ChunkState::Open {
                    open.insert(first + i);
                }
            }
        }
        open
    }

    fn finish(&mut self, f: InFlight, now: u64) {
        self.sched.complete(f.flow, &f.est);
        match f.reply {
            Reply::Guest { tx, slot } => {
                slot.guest().stats.charge(&f.est);
                slot.guest().stats.record(&f.cqe, f.bytes);
                drop(slot);
                let _ = tx.send(f.cqe);
            }
            Reply::Reclaim { job } => self.reclaim_batch_done(job, now),
        }
    }
}

/// Reclaims (see [`super::reclaim`]): the resets go through the scheduler as a flow of their own.
impl Engine {
    fn start_reclaim(&mut self, name: String, pus: Vec<usize>, now: u64) {
        let id = self.next_flow.fetch_add(1, Ordering::Relaxed);
        self.sched.add_flow(id, self.cfg.reclaim_weight, Limits::default(), now);
        tracing::info!(guest = %name, ?pus, "reclaiming the PUs of a removed guest");
        self.jobs.insert(id, ReclaimJob::new(name, pus));
        self.reclaim_round(id, now);
    }

    /// Queues the resets of the job's next round, or ends the job.
    fn reclaim_round(&mut self, id: u64, now: u64) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let batches = match job.next(&*self.device, self.cfg.reclaim_batch) {
            Next::Reset(batches) => batches,
            Next::Done => return self.finish_reclaim(id),
            Next::Stuck => {
                self.jobs.remove(&id);
                self.sched.remove_flow(id);
                return;
            }
        };
        let mut queued = 0;
        for (pu, chunks) in batches {
            let Ok(sqe) = Sqe::vector(opcode::VECTOR_RESET, 0, chunks.len(), 0, 0, 0) else { continue };
            let est = estimate(&self.costs, &[], &[], &[(pu, chunks.len() as u64)]);
            let checked = Checked { sqe, addrs: chunks, dst: Vec::new(), est: est.clone(), bytes: 0 };
            let job = Job { checked, region: self.empty_region.clone(), reply: Reply::Reclaim { job: id } };
            if self.sched.enqueue(id, est, 0, job, now).is_ok() {
                queued += 1;
            }
        }
        if let Some(job) = self.jobs.get_mut(&id) {
            job.queued(queued);
        }
    }

    fn reclaim_batch_done(&mut self, id: u64, now: u64) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.batch_done() {
            self.reclaim_round(id, now);
        }
    }

    fn finish_reclaim(&mut self, id: u64) {
        self.sched.remove_flow(id);
        if let Some(job) = self.jobs.remove(&id) {
            tracing::info!(guest = %job.name, "every chunk of the removed guest is reset");
            self.reclaimed.push(job.name);
        }
    }
}

fn run_on_device(device: &dyn OpenChannel, timing: bool, c: &Checked, region: &DmaRegion, now: u64) -> (Cqe, u64) {
    if c.is_flush() {
        return (device.execute(&c.sqe, region), now);
    }
    if timing {
        device.execute_vector_at(&c.sqe, &c.addrs, &c.dst, region, now)
    } else {
        (device.execute_vector(&c.sqe, &c.addrs, &c.dst, region), now)
    }
}

/// The state of device chunk `c`; `None` if the device cannot say.
fn chunk_state(device: &dyn OpenChannel, c: usize) -> Option<ChunkState> {
    device.chunk_info(c..c + 1).ok()?.first().map(|d| d.state)
}

/// Whether writing `chunks` keeps a guest with `open` chunks within its share of `limit`.
fn may_open(device: &dyn OpenChannel, open: &BTreeSet<usize>, limit: u32, chunks: &BTreeSet<usize>) -> bool {
    let new = chunks
        .iter()
        .filter(|c| !open.contains(c))
        .filter(|&&c| chunk_state(device, c) == Some(ChunkState::Free))
        .count();
    open.len() + new <= limit as usize
}

/// Device chunk indexes of the valid addresses in `addrs`.
fn chunk_indexes(device: &dyn OpenChannel, addrs: &[u64]) -> BTreeSet<usize> {
    let geo = device.geometry();
    addrs
        .iter()
        .filter(|&&a| a != POISON)
        .filter_map(|&a| Addr::from_ppa(geo, Ppa(a)).ok()?.chunk_index(geo).ok())
        .collect()
}
