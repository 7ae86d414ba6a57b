//! The virtio-blk device a vhost-user frontend (QEMU, cloud-hypervisor, libblkio) drives.
//!
//! Each queue has its own worker thread (from vhost-user-backend) that pops requests and starts
//! them on the tokio runtime without waiting for earlier ones. A request completes on the runtime:
//! it moves its data to or from guest memory, writes its status, and hands the queue thread a
//! `Done` through that queue's own channel and eventfd. Only the queue thread touches its vring,
//! so queues share no lock on the request path.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
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
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::*;
use crate::buffer::IoBuf;
use crate::device::{BlockDevice, MAX_IO_BYTES};
use crate::disk::Disk;

/// Largest queue a frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest data segment, and segments per request: together at most MAX_IO_BYTES.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = (MAX_IO_BYTES / SIZE_MAX as u64) as u32;
/// Offset of `wce` (writeback cache enabled) in the config space.
const CONFIG_WCE_OFFSET: u32 = 32;
/// How long GET_VRING_BASE waits for a stopping queue's requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A request finished on the runtime, for its queue thread to return to the guest.
struct Done {
    head: u16,
    used: u32,
}

/// One queue's way back from the runtime to its thread.
struct Completions {
    tx: Mutex<Sender<Done>>,
    rx: Mutex<Receiver<Done>>,
    event: EventFd,
    in_flight: AtomicUsize,
}

impl Completions {
    fn push(&self, done: Done) {
        if let Ok(tx) = self.tx.lock() {
            // The receiver lives as long as the backend; a send can only fail after it is gone.
            let _ = tx.send(done);
        }
        let _ = self.event.write(1);
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
    queues: Vec<Arc<Completions>>,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, num_queues: usize, runtime: tokio::runtime::Handle) -> io::Result<BlkBackend> {
        let queues = (0..num_queues)
            .map(|_| {
                let (tx, rx) = channel();
                Ok(Arc::new(Completions {
                    tx: Mutex::new(tx),
                    rx: Mutex::new(rx),
                    event: EventFd::new(EFD_NONBLOCK)?,
                    in_flight: AtomicUsize::new(0),
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

    /// The eventfd of each queue's completions and the event id its thread knows it by.
    pub fn completion_events(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.queues.iter().enumerate().map(|(q, c)| (c.event.as_raw_fd(), self.completion_event(q)))
    }

    /// Event ids up to num_queues belong to vhost-user-backend; ours come after.
    fn completion_event(&self, q: usize) -> u64 {
        (self.num_queues + 1 + q) as u64
    }

    fn config_space(&self) -> Vec<u8> {
        let info = self.disk.info();
        let mut c = vec![0u8; 60];
        let put = |c: &mut Vec<u8>, at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(&mut c, 0, &(info.capacity / SECTOR).to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        put(&mut c, 12, &SEG_MAX.to_le_bytes());
        put(&mut c, 20, &info.block_size.to_le_bytes());
        // Topology: one logical block is one physical block; optimal I/O is a page.
        put(&mut c, 26, &1u16.to_le_bytes());
        put(&mut c, 28, &(4096 / info.block_size).max(1).to_le_bytes());
        c[32] = u8::from(self.writeback.load(Relaxed));
        put(&mut c, 34, &(self.num_queues as u16).to_le_bytes());
        let sectors_per_block = info.block_size / SECTOR as u32;
        let max_sectors = u32::MAX - (u32::MAX % sectors_per_block);
        put(&mut c, 36, &max_sectors.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &1u32.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &sectors_per_block.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Pops every available request of a queue and starts it.
    fn process_queue(&self, q: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.read().ok().and_then(|m| m.as_ref().map(|m| m.memory().into_inner())) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let descs = chain.map(|d| Desc { addr: d.addr(), len: d.len(), write_only: d.is_write_only() });
                self.queues[q].in_flight.fetch_add(1, Relaxed);
                match parse(&*mem, descs) {
                    Ok(req) => self.start(q, head, req, mem.clone()),
                    Err(e) => {
                        tracing::warn!(disk = %self.disk.name(), queue = q, error = %e, "bad descriptor chain");
                        self.queues[q].push(Done { head, used: 0 });
                    }
                }
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Runs one request on the runtime; it reports back through its queue's completions.
    fn start(&self, q: usize, head: u16, req: Request, mem: Arc<GuestMemoryMmap>) {
        let disk = self.disk.clone();
        let done = self.queues[q].clone();
        let fua = !self.writeback.load(Relaxed);
        self.runtime.spawn(async move {
            let (status, written) = execute(&disk, &mem, &req, fua).await;
            let used = match mem.write_obj(status, req.status) {
                Ok(()) => written as u32 + 1,
                Err(_) => 0,
            };
            done.push(Done { head, used });
        });
    }

    /// Returns finished requests to the guest and signals it if it wants to hear.
    fn complete(&self, q: usize, vring: &VringRwLock) -> io::Result<()> {
        let completions = &self.queues[q];
        let _ = completions.event.read();
        let mut returned = false;
        if let Ok(rx) = completions.rx.lock() {
            while let Ok(done) = rx.try_recv() {
                vring.add_used(done.head, done.used).map_err(io::Error::other)?;
                completions.in_flight.fetch_sub(1, Relaxed);
                returned = true;
            }
        }
        if returned && (!self.event_idx.load(Relaxed) || vring.needs_notification().map_err(io::Error::other)?) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Does what a request asks; gives its status and how many bytes went into guest memory.
async fn execute(disk: &Disk, mem: &GuestMemoryMmap, req: &Request, fua: bool) -> (u8, usize) {
    let offset = req.sector.checked_mul(SECTOR);
    match req.kind {
        VIRTIO_BLK_T_IN => {
            let len = total(&req.writable);
            let Some(offset) = offset.filter(|_| len as u64 % SECTOR == 0) else { return (VIRTIO_BLK_S_IOERR, 0) };
            match disk.read(offset, IoBuf::scratch(len)).await {
                Ok(buf) => match scatter(mem, &req.writable, buf.as_slice()) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                },
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = total(&req.readable);
            let Some(offset) = offset.filter(|_| len as u64 % SECTOR == 0) else { return (VIRTIO_BLK_S_IOERR, 0) };
            if len as u64 > MAX_IO_BYTES {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut buf = IoBuf::scratch(len);
            if gather(mem, &req.readable, buf.as_mut_slice()).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            (status_of(disk.write(offset, buf, fua).await.map(drop)), 0)
        }
        VIRTIO_BLK_T_FLUSH => (status_of(disk.flush().await), 0),
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let name = disk.id().as_bytes();
            id[..name.len().min(ID_BYTES)].copy_from_slice(&name[..name.len().min(ID_BYTES)]);
            match scatter(mem, &req.writable, &id) {
                Ok(n) => (VIRTIO_BLK_S_OK, n),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let len = total(&req.readable);
            if len == 0 || len % SEGMENT_BYTES != 0 {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut segments = vec![0u8; len];
            if gather(mem, &req.readable, &mut segments).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            for seg in segments.chunks_exact(SEGMENT_BYTES) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
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
                if result.is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
            }
            (VIRTIO_BLK_S_OK, 0)
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
        let config = self.config_space();
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
        let Some(completions) = self.queues.get(queue_index as usize) else { return Ok(()) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while completions.in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
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
            e if e == self.completion_event(q) as usize => self.complete(q, vring),
            _ => Err(io::Error::other(format!("unknown device event {device_event}"))),
        }
    }
}
