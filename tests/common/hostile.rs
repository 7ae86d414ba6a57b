//! A hostile vhost-user-blk frontend: it speaks the vhost-user protocol itself (the `vhost`
//! crate's frontend side) and lays out one split virtqueue by hand in guest memory it shares with
//! the daemon, so that it can put any descriptor chain on the ring, however wrong: huge, looping,
//! outside guest memory, bad indirect tables, out-of-range heads, an avail index far ahead.
//!
//! Guest memory is one memfd region at guest address 0:
//!
//! ```text
//! 0        descriptor table (QSIZE entries)
//! 0x10000  avail ring
//! 0x20000  used ring
//! 0x100000 small buffers: headers, status bytes, short data, indirect tables (a bump allocator)
//! DATA     DATA_LEN bytes that huge chains point at again and again
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Entries of the one queue; virtio-queue also cuts a chain off after this many descriptors.
pub const QSIZE: u16 = 256;
/// Where the large data area starts.
pub const DATA: u64 = 8 << 20;
/// 64 MiB: 63 descriptors over it come to just under 4 GiB.
pub const DATA_LEN: u64 = 64 << 20;
/// All of guest memory; anything at or past it lies outside.
pub const MEM_LEN: u64 = DATA + DATA_LEN;

const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;
const SMALL: u64 = 0x10_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;

/// What a fresh status byte holds, so that any status the device writes shows.
pub const STATUS_UNTOUCHED: u8 = 0xff;

const VIRTIO_RING_F_EVENT_IDX: u64 = 29;

/// One descriptor exactly as it goes into a table.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable descriptor (`chain` and `table` set NEXT and `next`).
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc { addr, len, flags: 0, next: 0 }
    }

    /// A device-writable descriptor.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc { addr, len, flags: F_WRITE, next: 0 }
    }

    /// A descriptor that refers to an indirect table of `len` bytes at `addr`.
    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc { addr, len, flags: F_INDIRECT, next: 0 }
    }

    fn bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// What came back while waiting.
#[derive(Debug, Default)]
pub struct Answers {
    pub used: Vec<Used>,
    /// The daemon closed the connection (or died).
    pub gone: bool,
}

impl Answers {
    /// The entry returned for `head`, if any.
    pub fn of(&self, head: u16) -> Option<Used> {
        self.used.iter().copied().find(|u| u.id == u32::from(head))
    }
}

/// A READ put on the ring by [`Hostile::read_request`].
pub struct ReadReq {
    pub head: u16,
    pub data: u64,
    pub len: u32,
    pub status: u64,
}

/// A connected frontend with queue 0 running.
pub struct Hostile {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_small: u64,
}

impl Hostile {
    /// Connects to a vhost-user-blk socket, maps fresh guest memory and starts queue 0 with
    /// every feature the device offers but EVENT_IDX (so that it interrupts after every return).
    pub fn connect(socket: &Path) -> Hostile {
        Hostile::connect_with(socket, false)
    }

    /// As [`Hostile::connect`], with EVENT_IDX too if `event_idx`: the device then re-reads the
    /// avail index after re-enabling notifications, a loop a bad index must not keep spinning.
    pub fn connect_with(socket: &Path, event_idx: bool) -> Hostile {
        let mem = guest_memory();
        let region = mem.find_region(GuestAddress(0)).expect("the one region");
        let region = VhostUserMemoryRegionInfo::from_guest_region(region).expect("a file-backed region");
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).expect("inside guest memory") as u64;

        let mut frontend = Frontend::connect(socket, 1).expect("connect to the vhost-user socket");
        frontend.set_owner().expect("SET_OWNER");
        let offered = frontend.get_features().expect("GET_FEATURES");
        let features = if event_idx { offered } else { offered & !(1 << VIRTIO_RING_F_EVENT_IDX) };
        frontend.set_features(features).expect("SET_FEATURES");
        let protocol = frontend.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        frontend.set_protocol_features(protocol & wanted).expect("SET_PROTOCOL_FEATURES");
        frontend.set_mem_table(&[region]).expect("SET_MEM_TABLE");

        let kick = EventFd::new(EFD_NONBLOCK).expect("kick eventfd");
        let call = EventFd::new(EFD_NONBLOCK).expect("call eventfd");
        frontend.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        frontend.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let addrs = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(DESC_TABLE),
            used_ring_addr: host(USED),
            avail_ring_addr: host(AVAIL),
            log_addr: None,
        };
        frontend.set_vring_addr(0, &addrs).expect("SET_VRING_ADDR");
        frontend.set_vring_call(0, &call).expect("SET_VRING_CALL");
        frontend.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        frontend.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        // The backend handles messages in order: once this answers, the queue is set up.
        frontend.get_features().expect("GET_FEATURES after setup");
        Hostile { frontend, mem, kick, call, next_desc: 0, avail_idx: 0, used_seen: 0, next_small: SMALL }
    }

    /// `len` bytes of the small-buffer area, 16-byte aligned, filled with `fill`.
    pub fn alloc(&mut self, len: u64, fill: u8) -> u64 {
        let at = self.next_small;
        self.next_small = (at + len.max(1)).next_multiple_of(16);
        assert!(self.next_small <= DATA, "small-buffer area exhausted");
        self.fill(at, len, fill);
        at
    }

    /// A 16-byte request header.
    pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16, 0);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(at, &h);
        at
    }

    /// A status byte holding [`STATUS_UNTOUCHED`].
    pub fn status(&mut self) -> u64 {
        self.alloc(1, STATUS_UNTOUCHED)
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).expect("write guest memory");
    }

    pub fn read(&self, gpa: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(gpa)).expect("read guest memory");
        out
    }

    pub fn byte(&self, gpa: u64) -> u8 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read guest memory")
    }

    pub fn fill(&self, gpa: u64, len: u64, value: u8) {
        let chunk = vec![value; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write(gpa + done, &chunk[..n as usize]);
            done += n;
        }
    }

    /// Where the first byte that differs from `before` is, reading `before.len()` bytes at `gpa`.
    pub fn changed_since(&self, gpa: u64, before: &[u8]) -> Option<u64> {
        let now = self.read(gpa, before.len() as u64);
        now.iter().zip(before).position(|(a, b)| a != b).map(|i| gpa + i as u64)
    }

    /// Takes `n` consecutive slots of the descriptor table.
    pub fn reserve(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        assert!(u32::from(first) + u32::from(n) <= u32::from(QSIZE), "descriptor table full");
        self.next_desc += n;
        first
    }

    /// Forgets every descriptor slot handed out, once all chains using them came back.
    pub fn recycle_descs(&mut self) {
        self.next_desc = 0;
    }

    /// Writes `desc` as it is into slot `index` of the descriptor table.
    pub fn put(&self, index: u16, desc: Desc) {
        self.write(DESC_TABLE + u64::from(index) * 16, &desc.bytes());
    }

    /// Puts `descs` into consecutive slots, each but the last pointing to the next; gives the head.
    pub fn chain(&mut self, descs: &[Desc]) -> u16 {
        let first = self.reserve(descs.len() as u16);
        for (i, d) in descs.iter().enumerate() {
            let index = first + i as u16;
            let linked = if i + 1 < descs.len() { Desc { flags: d.flags | F_NEXT, next: index + 1, ..*d } } else { *d };
            self.put(index, linked);
        }
        first
    }

    /// Writes `descs` as an indirect table, each but the last pointing to the next; gives its
    /// address and length in bytes.
    pub fn table(&mut self, descs: &[Desc]) -> (u64, u32) {
        let linked: Vec<Desc> = descs
            .iter()
            .enumerate()
            .map(
                |(i, d)| {
                    if i + 1 < descs.len() {
                        Desc { flags: d.flags | F_NEXT, next: i as u16 + 1, ..*d }
                    } else {
                        *d
                    }
                },
            )
            .collect();
        self.raw_table(&linked)
    }

    /// Writes `descs` exactly as they are as an indirect table; gives its address and length.
    pub fn raw_table(&mut self, descs: &[Desc]) -> (u64, u32) {
        let len = descs.len() as u64 * 16;
        let at = self.alloc(len, 0);
        for (i, d) in descs.iter().enumerate() {
            self.write(at + i as u64 * 16, &d.bytes());
        }
        (at, len as u32)
    }

    /// Puts `heads` (any values, in range or not) on the avail ring, publishes them and kicks.
    pub fn submit(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.avail_idx % QSIZE);
            self.mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + slot * 2)).expect("write avail ring");
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.publish(self.avail_idx);
    }

    /// Overwrites every slot of the avail ring with `head`, publishing nothing.
    pub fn fill_avail_ring(&self, head: u16) {
        for slot in 0..u64::from(QSIZE) {
            self.mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + slot * 2)).expect("write avail ring");
        }
    }

    /// Stores `idx` as the avail ring's index, whatever the ring holds, and kicks.
    pub fn publish(&mut self, idx: u16) {
        // With EVENT_IDX, ask to be interrupted at the next used entry (used_event, after the ring).
        let used_event = GuestAddress(AVAIL + 4 + u64::from(QSIZE) * 2);
        self.mem.write_obj(self.used_seen.to_le(), used_event).expect("write used_event");
        self.mem.store(idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release).expect("publish avail idx");
        self.kick.write(1).expect("kick");
    }

    /// The used ring's index as the device last stored it.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.load(GuestAddress(USED + 2), Ordering::Acquire).expect("read used idx"))
    }

    /// Collects used entries until `n` came back, the daemon hung up, or `timeout` passed.
    pub fn wait_used(&mut self, n: usize, timeout: Duration) -> Answers {
        let deadline = Instant::now() + timeout;
        let mut answers = Answers::default();
        loop {
            let idx = self.used_idx();
            while self.used_seen != idx {
                let at = USED + 4 + u64::from(self.used_seen % QSIZE) * 8;
                let id = u32::from_le(self.mem.read_obj(GuestAddress(at)).expect("read used entry"));
                let len = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).expect("read used entry"));
                answers.used.push(Used { id, len });
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            if answers.used.len() >= n || answers.gone || Instant::now() >= deadline {
                return answers;
            }
            let mut fds = [
                libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.frontend.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 },
            ];
            // SAFETY: fds is a live array of two pollfd structs, and its length is passed with it.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if ready > 0 && fds[0].revents != 0 {
                let _ = self.call.read();
            }
            // The backend sends nothing unasked on this socket: anything there is its end closing.
            if ready > 0 && fds[1].revents != 0 {
                answers.gone = true;
            }
        }
    }

    /// A READ of `len` bytes at `sector` into a fresh buffer filled with `fill`, put on the ring.
    pub fn read_request(&mut self, sector: u64, len: u32, fill: u8) -> ReadReq {
        let header = self.header(VIRTIO_BLK_T_IN, sector);
        let data = self.alloc(u64::from(len), fill);
        let status = self.status();
        let head = self.chain(&[Desc::r(header, 16), Desc::w(data, len), Desc::w(status, 1)]);
        ReadReq { head, data, len, status }
    }

    /// GET_VRING_BASE: stops queue 0 and gives the next avail index the device would have read.
    /// An answer also shows the connection's control path still works.
    pub fn stop_queue(&mut self) -> Result<u32, vhost::Error> {
        self.frontend.get_vring_base(0)
    }
}

/// MEM_LEN bytes of a memfd, mapped shared here and handed to the daemon.
fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"vstor-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_LEN).expect("size the memfd");
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_LEN as usize, Some(FileOffset::new(file, 0)))])
        .expect("map guest memory")
}

/// A process's memory as `/proc/<pid>/status` gives it, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// Peak resident memory (`VmHWM`).
    pub peak: u64,
    /// Resident memory now (`VmRSS`).
    pub resident: u64,
    /// Address space in use (`VmSize`), what RLIMIT_AS counts.
    pub size: u64,
}

pub fn memory_of(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some(Memory { peak: field("VmHWM:")?, resident: field("VmRSS:")?, size: field("VmSize:")? })
}

/// CPU time a process has used, user and system (`/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends at the last ')': state is field 3, utime 14.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|&t| t > 0)?;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// Caps a process's address space (RLIMIT_AS) at `bytes`: an allocation past it fails at once
/// instead of taking the host's memory.
pub fn cap_address_space(pid: u32, bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: prlimit on a live child of ours with a valid rlimit and no old-limit output.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_AS, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit RLIMIT_AS: {}", std::io::Error::last_os_error());
}
