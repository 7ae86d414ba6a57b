//! The virtio-blk device a vhost-user frontend (QEMU, cloud-hypervisor, libblkio) drives.
//!
//! Each queue has its own worker thread (from vhost-user-backend) that pops requests and runs
//! them itself, without waiting for earlier ones: a request that completes at once (the page
//! cache often completes it inside io_uring_enter) goes straight back to the guest; one that must
//! wait is parked in the queue's pending set, and its waker rings the queue's own eventfd so that
//! the same thread polls it again. Only the queue's thread touches its vring and its pending set,
//! so queues share no lock on the request path.
//!
//! Each queue also has an io_uring of its own that its thread enters while it runs requests, so
//! that the file I/O they start completes straight to the queue's thread (one wakeup, as in
//! qemu-storage-daemon) rather than through a tokio worker and then the queue's eventfd.

use std::future::Future;
use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::*;
use crate::buffer::IoBuf;
use crate::device::BlockDevice;
use crate::disk::Disk;
use crate::uring::Uring;

/// Largest queue a frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Data bytes one queue may have waiting on its disk. Past it the queue stops taking requests
/// until some complete, so that a guest filling its queue with the largest requests on a slow
/// disk (a throttled one, an FTL in GC) holds at most this much of the daemon's memory (plus one
/// request), not queue size times 32 MiB.
const QUEUE_BYTES: usize = 64 << 20;
/// How long GET_VRING_BASE waits for a stopping queue's requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A request finished on the runtime, for its queue thread to return to the guest.
struct Done {
    head: u16,
    used: u32,
}

/// A request that has to wait for its backend.
type Task = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The requests of one queue that are waiting, polled by the queue's own thread when their
/// wakers ring the queue's eventfd.
struct Pending {
    tasks: Mutex<Slots>,
    /// Slots whose wakers fired since the queue thread last looked.
    ready: Mutex<Vec<usize>>,
    event: EventFd,
    in_flight: AtomicUsize,
    /// Data bytes of the waiting requests, held to QUEUE_BYTES.
    bytes: AtomicUsize,
    /// The queue stopped taking requests at QUEUE_BYTES: completing one takes it up again.
    full: AtomicBool,
    /// The ring this queue's requests submit their file I/O to, reaped by the queue's thread.
    ring: Uring,
    /// Chains refused so far, for logging a hostile driver without flooding the log.
    refused: AtomicU64,
}

/// A request waiting for its disk, with the data bytes it holds.
struct Parked {
    task: Task,
    waker: Waker,
    bytes: usize,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Option<Parked>>,
    free: Vec<usize>,
}

impl Slots {
    fn reserve(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    fn release(&mut self, slot: usize) {
        self.slots[slot] = None;
        self.free.push(slot);
    }
}

/// Wakes one waiting request: marks its slot ready and rings its queue's eventfd.
struct TaskWaker {
    pending: Arc<Pending>,
    slot: usize,
}

impl std::task::Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut ready = plumbing::lock(&self.pending.ready);
        ready.push(self.slot);
        // The queue thread reads the eventfd before it takes the whole list, so one signal per
        // batch is enough: a slot pushed after an earlier one's signal is taken along with it.
        if ready.len() == 1 {
            let _ = self.pending.event.write(1);
        }
    }
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        plumbing::lock(&self.tasks)
    }

    /// Notes a refused chain; logs the 1st, 2nd, 4th, 8th, ... so that a driver sending nothing
    /// else cannot flood the log.
    fn refused(&self, disk: &Disk, queue: usize, why: &dyn std::fmt::Display) {
        let n = self.refused.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(disk = %disk.name(), queue, refused = n, "bad descriptor chain: {why}");
        }
    }
}

pub struct BlkBackend {
    disk: Arc<Disk>,
    runtime: tokio::runtime::Handle,
    num_queues: usize,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: AtomicBool,
    /// The guest's choice of cache mode: with writeback off, every write is FUA.
    writeback: AtomicBool,
    queues: Vec<Arc<Pending>>,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, num_queues: usize, runtime: tokio::runtime::Handle) -> io::Result<BlkBackend> {
        let queues = (0..num_queues)
            .map(|_| {
                Ok(Arc::new(Pending {
                    tasks: Mutex::new(Slots::default()),
                    ready: Mutex::new(Vec::new()),
                    event: EventFd::new(EFD_NONBLOCK)?,
                    in_flight: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    full: AtomicBool::new(false),
                    ring: Uring::self_reaped()?,
                    refused: AtomicU64::new(0),
                }))
            })
            .collect::<io::Result<_>>()?;
        Ok(BlkBackend {
            disk,
            runtime,
            num_queues,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            queues,
        })
    }

    /// The descriptors each queue's thread must watch besides its vring, with the event ids the
    /// thread knows them by: the queue's eventfd, which wakes it for its pending requests, and
    /// its ring's eventfd.
    pub fn queue_events(&self) -> impl Iterator<Item = (usize, i32, u64)> + '_ {
        self.queues.iter().enumerate().flat_map(|(q, p)| {
            [(q, p.event.as_raw_fd(), self.completion_event()), (q, p.ring.event_fd(), self.ring_event())]
        })
    }

    /// Event ids up to num_queues belong to vhost-user-backend; ours come after. Each thread
    /// has its own set of ids.
    fn completion_event(&self) -> u64 {
        (self.num_queues + 1) as u64
    }

    fn ring_event(&self) -> u64 {
        (self.num_queues + 2) as u64
    }

    fn config_space(&self) -> ConfigSpace {
        let info = self.disk.info();
        ConfigSpace::new(info.capacity, info.block_size, self.num_queues as u16, self.writeback.load(Relaxed))
    }

    /// The guest memory as the frontend has mapped it so far.
    fn memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.mem.read().ok().and_then(|m| m.as_ref().map(|m| m.memory().into_inner()))
    }

    /// Pops every available request of a queue and starts it. Requests that finish at once (the
    /// page cache often completes them inside io_uring_enter) go straight back to the guest.
    fn process_queue(&self, q: usize, vring: &VringRwLock) -> io::Result<()> {
        // Requests are first polled on this thread; anything they touch of tokio needs its context.
        let _runtime = self.runtime.enter();
        let _ring = self.queues[q].ring.enter();
        let event_idx = self.event_idx.load(Relaxed);
        let mut returned = false;
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // A frontend maps a buffer (ADD_MEM_REG, acknowledged) before it makes a request on
            // it available, and may do so while this thread runs: the memory the requests are
            // read with is loaded only after the available index that shows them, so that it
            // holds every buffer they use. (libblkio maps its buffers just after the queues start.)
            let Some(ring_mem) = self.memory() else { break };
            let (avail, size) = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                // As popping would: nothing to do on a queue the frontend has not set up.
                if !queue.ready() || queue.avail_ring() == 0 {
                    break;
                }
                (queue.avail_idx(&*ring_mem, Acquire).map_err(io::Error::other)?, queue.size())
            };
            let Some(mem) = self.memory() else { break };
            let mut stuck = false;
            loop {
                // Leave requests on the ring while the waiting ones hold the queue's share of
                // memory; `complete` comes back for them.
                if self.queues[q].bytes.load(Relaxed) >= QUEUE_BYTES {
                    self.queues[q].full.store(true, Relaxed);
                    stuck = true;
                    break;
                }
                let chain = {
                    let mut state = vring.get_mut();
                    let queue = state.get_queue_mut();
                    // Requests made available after `avail` wait for the next round.
                    if Wrapping(queue.next_avail()) == avail {
                        break;
                    }
                    queue.pop_descriptor_chain(mem.clone())
                };
                // The queue cannot give what the driver made available (an available index more
                // than a queue ahead, or a ring outside its memory): the driver broke its own
                // queue. Stop rather than spin on it; the frontend can reset the queue.
                let Some(chain) = chain else {
                    self.queues[q].refused(&self.disk, q, &"the available ring cannot be read");
                    stuck = true;
                    break;
                };
                let head = chain.head_index();
                // A head outside the queue cannot go into the used ring: the request is lost to
                // the driver that made it, and the queue goes on.
                if head >= size {
                    self.queues[q].refused(&self.disk, q, &"descriptor head index outside the queue");
                    continue;
                }
                let descs = chain.map(|d| Desc {
                    addr: d.addr(),
                    len: d.len(),
                    write_only: d.is_write_only(),
                    has_next: d.has_next(),
                });
                let finished = match parse(&*mem, descs) {
                    Ok(req) => self.start(q, head, req, mem.clone()),
                    Err(Refused { status, error }) => {
                        self.queues[q].refused(&self.disk, q, &error);
                        // Only a status byte the chain really ends with is written.
                        let used = match status {
                            Some(at) if mem.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok() => 1,
                            _ => 0,
                        };
                        Some(Done { head, used })
                    }
                };
                if let Some(done) = finished {
                    vring.add_used(done.head, done.used).map_err(io::Error::other)?;
                    returned = true;
                }
            }
            if stuck || !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        self.signal(vring, returned)
    }

    /// Starts one request on this thread. A request that must wait is parked in its queue's
    /// pending set; its waker brings it back to this thread (see `complete`).
    fn start(&self, q: usize, head: u16, req: Request, mem: Arc<GuestMemoryMmap>) -> Option<Done> {
        let disk = self.disk.clone();
        let fua = !self.writeback.load(Relaxed);
        // At most MAX_IO_BYTES (parse bounded both directions), so it fits.
        let bytes = (req.readable.total() + req.writable.total()) as usize;
        let mut task: Task = Box::pin(async move {
            let (status, written) = execute(&disk, &mem, &req, fua).await;
            let used = match mem.write_obj(status, req.status) {
                Ok(()) => written as u32 + 1,
                Err(_) => 0,
            };
            Done { head, used }
        });
        let pending = &self.queues[q];
        let slot = pending.lock().reserve();
        let waker = Waker::from(Arc::new(TaskWaker { pending: pending.clone(), slot }));
        match task.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(done) => {
                pending.lock().release(slot);
                Some(done)
            }
            Poll::Pending => {
                pending.lock().slots[slot] = Some(Parked { task, waker, bytes });
                pending.in_flight.fetch_add(1, Relaxed);
                pending.bytes.fetch_add(bytes, Relaxed);
                None
            }
        }
    }

    /// Polls the queue's woken requests and returns those that finished to the guest.
    fn complete(&self, q: usize, vring: &VringRwLock) -> io::Result<()> {
        let pending = &self.queues[q];
        let _ = pending.event.read();
        let _runtime = self.runtime.enter();
        let _ring = pending.ring.enter();
        let ready = std::mem::take(&mut *plumbing::lock(&pending.ready));
        let mut returned = false;
        for slot in ready {
            // A slot may be woken twice, or after its request finished: then it is empty.
            let Some(Parked { mut task, waker, bytes }) = pending.lock().slots.get_mut(slot).and_then(Option::take)
            else {
                continue;
            };
            match task.as_mut().poll(&mut Context::from_waker(&waker)) {
                Poll::Ready(done) => {
                    pending.lock().release(slot);
                    pending.in_flight.fetch_sub(1, Relaxed);
                    pending.bytes.fetch_sub(bytes, Relaxed);
                    vring.add_used(done.head, done.used).map_err(io::Error::other)?;
                    returned = true;
                }
                Poll::Pending => pending.lock().slots[slot] = Some(Parked { task, waker, bytes }),
            }
        }
        self.signal(vring, returned)?;
        if pending.bytes.load(Relaxed) < QUEUE_BYTES && pending.full.swap(false, Relaxed) {
            // Requests left on the ring while the queue was full: take them up now.
            self.process_queue(q, vring)?;
        }
        Ok(())
    }

    /// Interrupts the guest after requests were returned, unless it asked not to be (EVENT_IDX).
    fn signal(&self, vring: &VringRwLock, returned: bool) -> io::Result<()> {
        if returned && (!self.event_idx.load(Relaxed) || vring.needs_notification().map_err(io::Error::other)?) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // A parked request's waker holds its queue's pending set, which holds the request: drop
        // the requests still waiting when the frontend goes, or that cycle would keep them.
        for pending in &self.queues {
            let mut slots = pending.lock();
            slots.slots.clear();
            slots.free.clear();
        }
    }
}

/// Does what a request asks; gives its status and how many bytes went into guest memory. The
/// request's lengths were bounded when it was parsed, so what is allocated here is too.
async fn execute(disk: &Disk, mem: &GuestMemoryMmap, req: &Request, fua: bool) -> (u8, usize) {
    let offset = req.sector.checked_mul(SECTOR);
    match req.kind {
        VIRTIO_BLK_T_IN => {
            let Some(offset) = offset else { return (VIRTIO_BLK_S_IOERR, 0) };
            let len = req.writable.total() as usize;
            match disk.read(offset, IoBuf::scratch(len)).await {
                Ok(buf) => match scatter(mem, req.writable.as_slice(), buf.as_slice()) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                },
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let Some(offset) = offset else { return (VIRTIO_BLK_S_IOERR, 0) };
            let mut buf = IoBuf::scratch(req.readable.total() as usize);
            if gather(mem, req.readable.as_slice(), buf.as_mut_slice()).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            (status_of(disk.write(offset, buf, fua).await.map(drop)), 0)
        }
        VIRTIO_BLK_T_FLUSH => (status_of(disk.flush().await), 0),
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let name = disk.id().as_bytes();
            id[..name.len().min(ID_BYTES)].copy_from_slice(&name[..name.len().min(ID_BYTES)]);
            match scatter(mem, req.writable.as_slice(), &id) {
                Ok(n) => (VIRTIO_BLK_S_OK, n),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            // Parsing let through exactly one segment.
            let mut seg = [0u8; SEGMENT_BYTES];
            if gather(mem, req.readable.as_slice(), &mut seg).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let allowed = if req.kind == VIRTIO_BLK_T_DISCARD { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
            if flags & !allowed != 0 {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            let Some(offset) = sector.checked_mul(SECTOR) else { return (VIRTIO_BLK_S_IOERR, 0) };
            let len = u64::from(sectors) * SECTOR;
            let result = if req.kind == VIRTIO_BLK_T_DISCARD {
                disk.discard(offset, len).await
            } else {
                disk.write_zeroes(offset, len, fua).await
            };
            (status_of(result), 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

fn status_of<E>(r: Result<(), E>) -> u8 {
    if r.is_ok() {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.info().read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let config = space.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize).saturating_add(size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the cache mode is writable.
        match (offset, buf) {
            (CONFIG_WCE_OFFSET, [wce]) => {
                self.writeback.store(*wce != 0, Relaxed);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        if let Ok(mut slot) = self.mem.write() {
            *slot = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1 << q).collect()
    }

    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, a queue thread never ends, and dropping the connection's handler (which
        // joins the threads) hangs: the daemon could then neither reconnect nor stop.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a queue thread's exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Requests already popped must be returned before the frontend reads the ring's index.
        let Some(pending) = self.queues.get(queue_index as usize) else { return Ok(()) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while pending.in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread (queues_per_thread): the thread's index is the queue's, `vrings`
        // holds just that queue, and its kick arrives as the thread's event 0.
        let (q, Some(vring)) = (thread, vrings.first()) else {
            return Err(io::Error::other("event on a thread without a queue"));
        };
        match device_event as usize {
            0 => self.process_queue(q, vring),
            e if e == self.completion_event() as usize => self.complete(q, vring),
            e if e == self.ring_event() as usize => {
                // Reaping wakes the requests whose I/O finished, which queues them for `complete`.
                self.queues[q].ring.reap();
                self.complete(q, vring)
            }
            _ => Err(io::Error::other(format!("unknown device event {device_event}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawFile;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const MEM: u64 = 16 << 20;
    const DISK: u64 = 1 << 20;
    const QSIZE: u16 = 256;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A backend on a 1 MiB raw disk with two queues in 16 MiB of test guest memory.
    struct Rig<'a> {
        backend: BlkBackend,
        mem: &'a GuestMemoryMmap,
        queues: Vec<(MockSplitQueue<'a, GuestMemoryMmap>, VringRwLock, u16)>,
    }

    impl<'a> Rig<'a> {
        fn new(mem: &'a GuestMemoryMmap, rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Rig<'a> {
            let path = dir.join("d.raw");
            RawFile::create(&path, DISK).unwrap();
            let raw = rt.block_on(async { RawFile::open(&path, 512, false, false) }).unwrap();
            Rig::with_device(mem, rt, Arc::new(raw))
        }

        fn with_device(
            mem: &'a GuestMemoryMmap,
            rt: &tokio::runtime::Runtime,
            device: Arc<dyn BlockDevice>,
        ) -> Rig<'a> {
            let disk = Arc::new(Disk::new("d", "0123456789abcdef", device));
            let backend = BlkBackend::new(disk, 2, rt.handle().clone()).unwrap();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            backend.update_memory(atomic.clone()).unwrap();
            let queues = (0..2u64)
                .map(|q| {
                    let mock = MockSplitQueue::create(mem, GuestAddress(q * 0x10000), QSIZE);
                    let vring = VringRwLock::new(atomic.clone(), QSIZE).unwrap();
                    vring.set_queue_size(QSIZE);
                    vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, mock.used_addr().0).unwrap();
                    vring.set_queue_ready(true);
                    vring.set_enabled(true);
                    (mock, vring, 0)
                })
                .collect();
            Rig { backend, mem, queues }
        }

        /// Puts a request on queue `q`: a header, the given data descriptors, a status byte.
        fn push(&mut self, q: usize, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> GuestAddress {
            let base = 0x100000 + (q as u64) * 0x400000 + u64::from(self.queues[q].2) * 0x10000;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(base)).unwrap();
            let status = GuestAddress(base + 0x20);
            self.mem.write_obj(0xffu8, status).unwrap();
            let mut descs = vec![(base, 16, false)];
            descs.extend_from_slice(data);
            descs.push((status.0, 1, true));
            self.push_raw(q, &descs);
            status
        }

        /// Puts a chain of arbitrary descriptors on queue `q`.
        fn push_raw(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
            let (mock, _, next_free) = &mut self.queues[q];
            let offset = *next_free;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, write))| {
                    let last = i + 1 == descs.len();
                    let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
                    let next = if last { 0 } else { offset + i as u16 + 1 };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
                })
                .collect();
            mock.add_desc_chains(&raw, offset).unwrap();
            *next_free += descs.len() as u16;
        }

        /// Kicks queue `q` and returns the used entries once `expect` requests are back.
        fn run(&self, q: usize, expect: u16) -> Vec<(u32, u32)> {
            let (mock, vring, _) = &self.queues[q];
            self.backend.handle_event(0, EventSet::IN, std::slice::from_ref(vring), q).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while mock.used().idx().load() < expect {
                assert!(Instant::now() < deadline, "queue {q}: requests not returned");
                // The ring event reaps the queue's ring and then polls every woken request.
                let event = self.backend.ring_event() as u16;
                self.backend.handle_event(event, EventSet::IN, std::slice::from_ref(vring), q).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            (0..expect as usize)
                .map(|i| {
                    let e = mock.used().ring().ref_at(i).unwrap().load();
                    (e.id(), e.len())
                })
                .collect()
        }

        fn status(&self, at: GuestAddress) -> u8 {
            self.mem.read_obj(at).unwrap()
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    #[test]
    fn good_and_bad_requests_each_get_their_own_answer() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let mut rig = Rig::new(&mem, &rt, dir.path());
        let data = 0xA00000;
        mem.write_slice(&[0x5a; 4096], GuestAddress(data)).unwrap();

        let write = rig.push(0, VIRTIO_BLK_T_OUT, 8, &[(data, 4096, false)]);
        let unknown = rig.push(0, 99, 0, &[]);
        let odd_length = rig.push(0, VIRTIO_BLK_T_IN, 0, &[(data + 8192, 100, true)]);
        let past_end = rig.push(0, VIRTIO_BLK_T_IN, DISK / 512, &[(data + 8192, 512, true)]);
        let huge_sector = rig.push(0, VIRTIO_BLK_T_OUT, u64::MAX / 256, &[(data, 512, false)]);
        let bad_discard_flags = rig.push(0, VIRTIO_BLK_T_DISCARD, 0, &[(data + 0x3000, 16, false)]);
        mem.write_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0], GuestAddress(data + 0x3000)).unwrap();
        // A chain reaching past guest memory, and one whose readable part follows a writable one:
        // neither can be answered, so they come back untouched with nothing written.
        mem.write_obj(0xeeu8, GuestAddress(0x300100)).unwrap();
        rig.push_raw(0, &[(0x300000, 16, false), (MEM - 100, 4096, true), (0x300100, 1, true)]);
        rig.push_raw(0, &[(0x300000, 16, false), (0x300100, 1, true), (data, 512, false)]);
        let used = rig.run(0, 8);

        assert_eq!(rig.status(write), VIRTIO_BLK_S_OK);
        assert_eq!(rig.status(unknown), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(rig.status(odd_length), VIRTIO_BLK_S_IOERR);
        assert_eq!(rig.status(past_end), VIRTIO_BLK_S_IOERR);
        assert_eq!(rig.status(huge_sector), VIRTIO_BLK_S_IOERR);
        assert_eq!(rig.status(bad_discard_flags), VIRTIO_BLK_S_UNSUPP);
        let lens: std::collections::HashMap<u32, u32> = used.into_iter().collect();
        assert_eq!(lens.len(), 8, "every chain is returned once");
        assert_eq!(lens.values().filter(|&&l| l == 0).count(), 2, "the unanswerable chains are returned empty");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x300100)).unwrap(), 0xee, "no status written into them");

        // Queue 1 meanwhile reads what queue 0 wrote, and gets the disk's id.
        let back = 0xB00000;
        let read = rig.push(1, VIRTIO_BLK_T_IN, 8, &[(back, 2048, true), (back + 0x1000, 2048, true)]);
        let id = rig.push(1, VIRTIO_BLK_T_GET_ID, 0, &[(back + 0x2000, 20, true)]);
        let used = rig.run(1, 2);
        assert_eq!(rig.status(read), VIRTIO_BLK_S_OK);
        assert_eq!(rig.status(id), VIRTIO_BLK_S_OK);
        assert!(used.contains(&(0, 4097)), "a read's used length is its data and status: {used:?}");
        let mut got = [0u8; 2048];
        mem.read_slice(&mut got, GuestAddress(back + 0x1000)).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
        let mut serial = [0u8; 16];
        mem.read_slice(&mut serial, GuestAddress(back + 0x2000)).unwrap();
        assert_eq!(&serial, b"0123456789abcdef");
    }

    /// A device whose reads never finish; each waiting read holds a clone of `token`.
    struct Stuck {
        token: Arc<()>,
    }

    impl BlockDevice for Stuck {
        fn info(&self) -> crate::device::DeviceInfo {
            crate::device::DeviceInfo { capacity: DISK, block_size: 512, read_only: false }
        }
        fn read(&self, _: u64, _: IoBuf) -> crate::device::IoFuture<'_, IoBuf> {
            let token = self.token.clone();
            Box::pin(async move {
                std::future::pending::<()>().await;
                drop(token);
                unreachable!()
            })
        }
        fn write(&self, _: u64, b: IoBuf, _: bool) -> crate::device::IoFuture<'_, IoBuf> {
            Box::pin(std::future::ready(Ok(b)))
        }
        fn flush(&self) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn discard(&self, _: u64, _: u64) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[test]
    fn requests_still_waiting_when_the_frontend_goes_are_dropped() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mem = memory();
        let token = Arc::new(());
        let mut rig = Rig::with_device(&mem, &rt, Arc::new(Stuck { token: token.clone() }));
        for i in 0..4u64 {
            rig.push(0, VIRTIO_BLK_T_IN, i, &[(0xA00000 + i * 0x1000, 512, true)]);
        }
        let (_, vring, _) = &rig.queues[0];
        rig.backend.handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0).unwrap();
        assert_eq!(rig.backend.queues[0].in_flight.load(Relaxed), 4, "four reads wait");
        assert_eq!(Arc::strong_count(&token), 6, "ours, the device's, and one per waiting read");
        drop(rig);
        assert_eq!(Arc::strong_count(&token), 1, "the waiting requests went with the backend");
    }

    #[test]
    fn config_space_and_cache_mode() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let rig = Rig::new(&mem, &rt, dir.path());
        let b = &rig.backend;
        let config = b.get_config(0, 60);
        assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), DISK / 512);
        assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 2);
        assert_eq!(config[32], 1, "writeback by default");
        b.set_config(CONFIG_WCE_OFFSET, &[0]).unwrap();
        assert_eq!(b.get_config(CONFIG_WCE_OFFSET, 1), [0]);
        assert!(b.set_config(0, &[1; 8]).is_err(), "capacity is not writable");
        // Reads past the config space are zero-filled, not refused.
        assert_eq!(b.get_config(56, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    /// Counts, per thread, the bytes allocated and not yet freed, and their peak: a request is
    /// first polled on the thread that pops it, so whatever it allocates up front is seen here.
    struct Counting;

    thread_local! {
        static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
        static PEAK: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    fn note(delta: isize) {
        let _ = LIVE.try_with(|live| {
            live.set(live.get() + delta);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
    }

    // SAFETY: every call goes straight to the system allocator; counting touches only
    // thread-locals that need no allocation.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            note(layout.size() as isize);
            // SAFETY: the caller's contract is passed on unchanged.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            note(layout.size() as isize);
            // SAFETY: as above.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            note(-(layout.size() as isize));
            // SAFETY: as above.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
            note(new_size as isize - layout.size() as isize);
            // SAFETY: as above.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Runs `f` and gives the most bytes this thread held at once above what it held before.
    fn peak_allocation(f: impl FnOnce()) -> isize {
        let base = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(base));
        f();
        PEAK.with(|p| p.get()) - base
    }

    const MIB: u64 = 1 << 20;

    /// Puts a chain on queue `q` whose descriptors link to the next, except that the last one
    /// points back to `loop_to` (an index within the chain) when given.
    fn linked(rig: &mut Rig<'_>, q: usize, descs: &[(u64, u32, bool)], loop_to: Option<u16>) {
        let (mock, _, next_free) = &mut rig.queues[q];
        let offset = *next_free;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i + 1 == descs.len();
                let (flags, next) = match (last, loop_to) {
                    (false, _) => (NEXT, offset + i as u16 + 1),
                    (true, Some(to)) => (NEXT, offset + to),
                    (true, None) => (0, 0),
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | if write { WRITE } else { 0 }, next))
            })
            .collect();
        mock.add_desc_chains(&raw, offset).unwrap();
        *next_free += descs.len() as u16;
    }

    #[test]
    fn huge_chains_get_an_error_before_anything_is_allocated_for_them() {
        // As a hostile driver can: 63 descriptors of 64 MiB over one 64 MiB region, just under
        // the 4 GiB the queue lets a chain carry. Each must cost the daemon nothing.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
        let mut rig = Rig::new(&mem, &rt, dir.path());
        let header = 0x300000;
        let status = GuestAddress(0x300100);
        for (i, kind) in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES].into_iter().enumerate() {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).unwrap();
            mem.write_obj(0xffu8, status).unwrap();
            let data_is_writable = kind == VIRTIO_BLK_T_IN;
            let mut descs = vec![(header, 16, false)];
            descs.extend((0..63).map(|_| (0, (64 * MIB) as u32, data_is_writable)));
            descs.push((status.0, 1, true));
            rig.push_raw(0, &descs);
            let peak = peak_allocation(|| {
                rig.run(0, i as u16 + 1);
            });
            assert_eq!(rig.status(status), VIRTIO_BLK_S_IOERR, "type {kind}");
            assert!(peak < MIB as isize, "type {kind}: {peak} bytes allocated for a refused request");
        }
    }

    #[test]
    fn a_chain_the_queue_cut_short_is_returned_with_nothing_written() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let mut rig = Rig::new(&mem, &rt, dir.path());
        let header = 0x300000;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(header)).unwrap();
        // A read whose data descriptor links back to itself: the queue stops after as many
        // descriptors as it has slots. The last byte of the data buffer is no status byte.
        let data = 0xA00000;
        let canary = GuestAddress(data + 4095);
        mem.write_obj(0x5au8, canary).unwrap();
        linked(&mut rig, 0, &[(header, 16, false), (data, 4096, true)], Some(1));
        let used = rig.run(0, 1);
        assert_eq!(used, [(0, 0)], "returned with nothing written");
        assert_eq!(mem.read_obj::<u8>(canary).unwrap(), 0x5a, "no status written into the data");
    }

    #[test]
    fn a_head_outside_the_queue_costs_that_request_not_the_queue() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let mut rig = Rig::new(&mem, &rt, dir.path());
        {
            let (mock, _, _) = &rig.queues[0];
            let idx = mock.avail().idx().load();
            mock.avail().ring().ref_at(usize::from(idx % QSIZE)).unwrap().store(u16::MAX);
            mock.avail().idx().store(idx + 1);
        }
        let (_, vring, _) = &rig.queues[0];
        rig.backend.handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0).unwrap();
        // The next request on the same queue is answered.
        let flush = rig.push(0, VIRTIO_BLK_T_FLUSH, 0, &[]);
        let used = rig.run(0, 1);
        assert_eq!(rig.status(flush), VIRTIO_BLK_S_OK);
        assert_eq!(used, [(0, 1)], "the flush, head 0, comes back with its status");
    }

    #[test]
    fn an_available_index_beyond_the_queue_stops_the_queue_without_spinning() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let rig = Rig::new(&mem, &rt, dir.path());
        let (mock, vring, _) = &rig.queues[0];
        mock.avail().idx().store(QSIZE * 3);
        vring.set_queue_event_idx(true);
        rig.backend.set_event_idx(true);
        // Returns (rather than looping on a queue it cannot read) and leaves the used ring alone.
        rig.backend.handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0).unwrap();
        assert_eq!(mock.used().idx().load(), 0);
    }

    /// A device whose reads wait for a permit of `gate` each.
    struct Gated {
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl BlockDevice for Gated {
        fn info(&self) -> crate::device::DeviceInfo {
            crate::device::DeviceInfo { capacity: 1 << 30, block_size: 512, read_only: false }
        }
        fn read(&self, _: u64, buf: IoBuf) -> crate::device::IoFuture<'_, IoBuf> {
            Box::pin(async move {
                let permit = self.gate.acquire().await;
                permit.map(tokio::sync::SemaphorePermit::forget).map_err(|_| crate::device::BlockError::Unsupported)?;
                Ok(buf)
            })
        }
        fn write(&self, _: u64, b: IoBuf, _: bool) -> crate::device::IoFuture<'_, IoBuf> {
            Box::pin(std::future::ready(Ok(b)))
        }
        fn flush(&self) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn discard(&self, _: u64, _: u64) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::device::IoFuture<'_, ()> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[test]
    fn a_queue_holds_at_most_its_share_of_memory_in_waiting_requests() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mem = memory();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut rig = Rig::with_device(&mem, &rt, Arc::new(Gated { gate: gate.clone() }));
        // Six reads of the largest size, each over the same 4 MiB of guest memory (above the
        // queue and the headers).
        let data: Vec<(u64, u32, bool)> = (0..SEG_MAX as u64).map(|i| ((12 + i % 4) * MIB, SIZE_MAX, true)).collect();
        for i in 0..6 {
            rig.push(0, VIRTIO_BLK_T_IN, i * 65536, &data);
        }
        let (_, vring, _) = &rig.queues[0];
        let peak = peak_allocation(|| {
            rig.backend.handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0).unwrap();
        });
        let pending = &rig.backend.queues[0];
        assert_eq!(pending.in_flight.load(Relaxed), 2, "two 32 MiB reads fill the queue's 64 MiB");
        assert_eq!(pending.bytes.load(Relaxed), QUEUE_BYTES);
        assert!(peak <= (QUEUE_BYTES + MIB as usize) as isize, "{peak} bytes held by waiting requests");
        // As they complete, the ones left on the ring are taken up, and all come back.
        gate.add_permits(6);
        let used = rig.run(0, 6);
        assert_eq!(used.len(), 6);
        assert!(used.iter().all(|&(_, len)| len == crate::device::MAX_IO_BYTES as u32 + 1), "{used:?}");
        assert_eq!(rig.backend.queues[0].bytes.load(Relaxed), 0);
    }
}
