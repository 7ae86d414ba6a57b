//! virtio-blk requests from a guest: a split virtqueue laid out by the input in guest memory,
//! through [`BlkBackend::handle_event`] (the vhost-user request path: the queue pops the chains,
//! `request::parse` checks them, `execute` runs them) against a memory disk.
//!
//! Guest memory is two regions with a hole between them. The queue (32 entries) sits at the
//! start; the input writes its first 16 descriptors, its available ring and the data area.
//! Whatever the chains are, the backend writes guest memory only inside device-writable
//! descriptors and the used ring, returns no chain with more bytes than its writable buffers
//! hold, and afterwards still answers a good request put on the same queue (a bad chain costs
//! itself, not the queue).

use std::sync::Arc;

use vdisk::vhost_user::BlkBackend;
use vdisk::Disk;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::memdisk::MemDisk;

/// Queue entries; the input fills the first [`FUZZ_DESCS`], the probe request uses two after.
pub const QSIZE: u16 = 32;
pub const FUZZ_DESCS: usize = 16;
pub const DESC_TABLE: u64 = 0x0;
pub const AVAIL_RING: u64 = 0x200;
pub const USED_RING: u64 = 0x300;
/// Where the input's bytes go in guest memory (up to [`PROBE`]).
pub const DATA: u64 = 0x1000;
/// The probe request: its header and status byte.
const PROBE: u64 = 0xf000;
const PROBE_HEAD: u16 = 16;
/// Guest memory: [0, 64 KiB) and [128 KiB, 192 KiB).
pub const REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];
const DISK_BYTES: u64 = 64 << 10;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Bytes of the input before the data: the available index, the ring's 16 heads, 16 descriptors.
pub const HEADER_BYTES: usize = 2 + 2 * FUZZ_DESCS + 16 * FUZZ_DESCS;

/// One descriptor as it lies in a table.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> RawDesc {
        RawDesc {
            addr: u64::from_le_bytes(b[..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

fn read_all(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, len)| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(start)).unwrap();
            v
        })
        .collect()
}

/// Guest memory a descriptor may have the device write: every device-writable descriptor of
/// the table and of the indirect tables it points to.
fn writable_ranges(mem: &GuestMemoryMmap, table: &[RawDesc]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut tables = vec![table.to_vec()];
    let mut seen = 0;
    while let Some(t) = tables.pop() {
        seen += 1;
        for d in t {
            if d.flags & F_WRITE != 0 {
                out.push((d.addr, d.addr.saturating_add(u64::from(d.len))));
            }
            if d.flags & F_INDIRECT != 0 && seen < 64 {
                let n = (d.len / 16).min(u32::from(QSIZE)) as usize;
                let mut raw = vec![0u8; n * 16];
                if mem.read_slice(&mut raw, GuestAddress(d.addr)).is_ok() {
                    tables.push(raw.chunks_exact(16).map(RawDesc::from_bytes).collect());
                }
            }
        }
    }
    out
}

/// One backend for every input (its io_uring is costly to make): each input brings its own
/// guest memory and queue, and leaves no request waiting, as the memory disk answers at once.
fn backend() -> &'static (BlkBackend, Arc<MemDisk>) {
    static BACKEND: std::sync::OnceLock<(BlkBackend, Arc<MemDisk>)> = std::sync::OnceLock::new();
    BACKEND.get_or_init(|| {
        let mem = Arc::new(MemDisk::new(DISK_BYTES, 512, false));
        let disk = Arc::new(Disk::new("d", "0123456789abcdef", mem.clone()));
        (BlkBackend::new(disk, 1, crate::runtime().handle().clone()).unwrap(), mem)
    })
}

/// The input: the available index (two bytes, little endian), the 16 heads of the available
/// ring, 16 descriptors of 16 bytes (address, length, flags, next, as in the table), then the
/// bytes of the data area at [`DATA`].
pub fn vhost_chain(data: &[u8]) {
    if data.len() < HEADER_BYTES {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&REGIONS.map(|(s, l)| (GuestAddress(s), l))).unwrap();
    let avail_idx = u16::from_le_bytes([data[0], data[1]]);
    let heads = &data[2..2 + 2 * FUZZ_DESCS];
    let table: Vec<RawDesc> =
        data[2 + 2 * FUZZ_DESCS..HEADER_BYTES].chunks_exact(16).map(RawDesc::from_bytes).collect();
    let body = &data[HEADER_BYTES..];
    let body = &body[..body.len().min((PROBE - DATA) as usize)];
    // The table, the available ring (its 16 first entries; the rest point at the probe), data.
    for (i, d) in table.iter().enumerate() {
        mem.write_slice(&d.to_bytes(), GuestAddress(DESC_TABLE + 16 * i as u64)).unwrap();
    }
    for i in 0..QSIZE as u64 {
        let head = match heads.get(2 * i as usize..2 * i as usize + 2) {
            Some(h) => u16::from_le_bytes([h[0], h[1]]),
            None => PROBE_HEAD,
        };
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * i)).unwrap();
    }
    mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
    mem.write_slice(body, GuestAddress(DATA)).unwrap();
    let probe = [
        RawDesc { addr: PROBE, len: 16, flags: F_NEXT, next: PROBE_HEAD + 1 },
        RawDesc { addr: PROBE + 16, len: 1, flags: F_WRITE, next: 0 },
    ];
    for (i, d) in probe.iter().enumerate() {
        mem.write_slice(&d.to_bytes(), GuestAddress(DESC_TABLE + 16 * (u64::from(PROBE_HEAD) + i as u64))).unwrap();
    }

    let (backend, disk) = backend();
    disk.set(&[0u8; DISK_BYTES as usize]);
    let atomic = GuestMemoryAtomic::new(mem.clone());
    backend.update_memory(atomic.clone()).unwrap();
    let vring = VringRwLock::new(atomic, QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    // The whole table as the device will see it: the input's descriptors and the probe's.
    let mut raw = vec![0u8; 16 * usize::from(QSIZE)];
    mem.read_slice(&mut raw, GuestAddress(DESC_TABLE)).unwrap();
    let full_table: Vec<RawDesc> = raw.chunks_exact(16).map(RawDesc::from_bytes).collect();
    let before = read_all(&mem);
    let kicked = backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0);
    crate::debug!("vhost_chain: avail {avail_idx}, kick {:?}", kicked.as_ref().err());
    let after = read_all(&mem);

    // What the device wrote lies in writable descriptors or the used ring; unless the device
    // was told to write over the descriptors themselves, so that later chains were not those
    // the table held before.
    let writable = writable_ranges(&mem, &full_table);
    let used_ring = (USED_RING, USED_RING + 4 + 8 * u64::from(QSIZE) + 2);
    let mut tables = vec![(DESC_TABLE, DESC_TABLE + 16 * u64::from(QSIZE))];
    tables.extend(
        full_table
            .iter()
            .filter(|d| d.flags & F_INDIRECT != 0)
            .map(|d| (d.addr, d.addr.saturating_add(u64::from(d.len)))),
    );
    let self_modifying = writable.iter().any(|&(s, e)| tables.iter().any(|&(ts, te)| s < te && ts < e));
    for (r, (old, new)) in before.iter().zip(&after).enumerate().filter(|_| !self_modifying) {
        // Compared a page at a time first: most of memory is unchanged.
        for (p, (old, new)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
            if old == new {
                continue;
            }
            for (i, (a, b)) in old.iter().zip(new).enumerate() {
                let at = REGIONS[r].0 + (p * 4096 + i) as u64;
                if a != b {
                    let inside = |&(s, e): &(u64, u64)| s <= at && at < e;
                    assert!(inside(&used_ring) || writable.iter().any(inside), "the device wrote guest byte {at:#x}");
                }
            }
        }
    }

    // Every chain returned is a head of the table with no more bytes than it can hold.
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    let returned = used_idx.min(QSIZE);
    let room: u64 = writable.iter().map(|(s, e)| e - s).sum::<u64>() + 1;
    for i in 0..u64::from(returned) {
        let id: u32 = mem.read_obj(GuestAddress(USED_RING + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED_RING + 8 + 8 * i)).unwrap();
        crate::debug!("vhost_chain: used {id} with {len} bytes");
        assert!(id < u32::from(QSIZE), "used element {i} names descriptor {id}");
        assert!(u64::from(len) <= room, "used element {i} claims {len} bytes written");
    }

    // The next request is still answered. It goes where the device will look next (its own
    // next available index, not the input's): a chain may have had the device write over the
    // available ring itself, so that the ring's index and heads are no longer those the input
    // gave, and the slots after it would only run the input's chains again. The probe's
    // descriptors are written again for the same reason.
    if kicked.is_ok() {
        for (i, d) in probe.iter().enumerate() {
            mem.write_slice(&d.to_bytes(), GuestAddress(DESC_TABLE + 16 * (u64::from(PROBE_HEAD) + i as u64))).unwrap();
        }
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&4u32.to_le_bytes()); // FLUSH
        mem.write_slice(&header, GuestAddress(PROBE)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(PROBE + 16)).unwrap();
        let next = vring.queue_next_avail();
        mem.write_obj(PROBE_HEAD, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(next % QSIZE))).unwrap();
        mem.write_obj(next.wrapping_add(1), GuestAddress(AVAIL_RING + 2)).unwrap();
        backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).expect("a kick after bad chains");
        let status: u8 = mem.read_obj(GuestAddress(PROBE + 16)).unwrap();
        assert_eq!(status, 0, "a flush after the input's chains was not answered");
    }
}
